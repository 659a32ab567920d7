//! Only reading statements reach the engine from outside.

use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;

use crate::{Error, Result};

const ALLOWED: &str = "only SELECT, WITH, EXPLAIN, SHOW and DESCRIBE are allowed";

/// Accepts exactly one SELECT / WITH / EXPLAIN / SHOW / DESCRIBE statement.
///
/// This is the first of two fences: the session also runs with DDL, DML and statements
/// disabled and without URL tables, so a form this parser lets through still cannot write or
/// read files.
pub fn check_read_only(sql: &str) -> Result<()> {
    let statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})
        .map_err(|e| Error::InvalidQuery(e.to_string()))?;
    match statements.len() {
        0 => return Err(Error::InvalidQuery("empty query".into())),
        1 => {}
        n => {
            return Err(Error::Forbidden(format!(
                "one statement per request, got {n}"
            )));
        }
    }
    check_statement(&statements[0])
}

fn check_statement(s: &DfStatement) -> Result<()> {
    match s {
        DfStatement::Statement(inner) => check_sql(inner),
        DfStatement::Explain(e) => check_statement(&e.statement),
        DfStatement::CreateExternalTable(_) => Err(Error::Forbidden(format!(
            "CREATE EXTERNAL TABLE is not allowed: {ALLOWED}"
        ))),
        DfStatement::CopyTo(_) => Err(Error::Forbidden(format!("COPY is not allowed: {ALLOWED}"))),
        DfStatement::Reset(_) => Err(Error::Forbidden(format!("RESET is not allowed: {ALLOWED}"))),
    }
}

fn check_sql(s: &Statement) -> Result<()> {
    match s {
        Statement::Query(q) => {
            // SELECT ... INTO creates a table.
            if let datafusion::sql::sqlparser::ast::SetExpr::Select(sel) = q.body.as_ref()
                && sel.into.is_some()
            {
                return Err(Error::Forbidden(format!(
                    "SELECT INTO is not allowed: {ALLOWED}"
                )));
            }
            Ok(())
        }
        Statement::Explain { statement, .. } => check_sql(statement),
        Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowSchemas { .. } => Ok(()),
        other => {
            let text = other.to_string();
            let verb: String = text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            Err(Error::Forbidden(format!(
                "{verb} is not allowed: {ALLOWED}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_reads() {
        for sql in [
            "SELECT 1",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
            "SHOW TABLES",
            "SHOW COLUMNS FROM metrics",
            "DESCRIBE metrics",
            "select * from metrics where value > 1;",
        ] {
            check_read_only(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }

    #[test]
    fn refuses_writes_and_files() {
        for sql in [
            "CREATE TABLE t AS SELECT 1",
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE VIEW v AS SELECT 1",
            "INSERT INTO metrics VALUES (1)",
            "DELETE FROM metrics",
            "UPDATE metrics SET value = 1",
            "DROP TABLE metrics",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "EXPLAIN COPY (SELECT 1) TO '/tmp/x.csv'",
            "SET datafusion.execution.batch_size = 1",
            "SELECT 1; SELECT 2",
            "SELECT * INTO t2 FROM metrics",
        ] {
            let err = check_read_only(sql).expect_err(sql);
            assert!(matches!(err, Error::Forbidden(_)), "{sql}: {err:?}");
        }
        assert!(matches!(
            check_read_only("SELEC 1"),
            Err(Error::InvalidQuery(_))
        ));
        assert!(matches!(check_read_only("  "), Err(Error::InvalidQuery(_))));
    }
}
