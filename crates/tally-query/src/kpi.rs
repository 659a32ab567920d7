//! KPIs: one SQL file each under `queries/`, with a comment header.
//!
//! ```sql
//! -- name: signup_conversion        (optional; the file stem otherwise)
//! -- title: Signup conversion, daily
//! -- unit: percentunit              (a Grafana unit id)
//! -- description: New accounts per GA4 session.
//! -- interval: 1d                   (optional: the smallest bucket; the view's bucket)
//! SELECT $__dateBin(time) AS time, ... FROM metrics WHERE $__timeFilter(time) GROUP BY 1
//! ```
//!
//! The header is the run of `--` lines at the top; lines in it that are not `key: value` with
//! a known key are documentation. A broken file is reported with its path and line and left
//! out; the other KPIs load.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::macros::{self, MacroContext};

/// Bucket of the `kpi.<name>` view when the file sets no `interval`.
pub const DEFAULT_VIEW_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq)]
pub struct Kpi {
    pub name: String,
    pub title: String,
    pub unit: Option<String>,
    pub description: String,
    /// Smallest bucket the KPI is computed at.
    pub interval: Option<Duration>,
    /// The query as written, macros included.
    pub sql: String,
    pub path: PathBuf,
    /// Line of the file where the query starts (1-based).
    pub sql_line: usize,
}

impl Kpi {
    /// The KPI's query for a range and bucket width; the bucket is never below `interval`.
    pub fn expand(&self, ctx: &MacroContext) -> crate::Result<String> {
        let mut ctx = *ctx;
        if let Some(min) = self.interval {
            ctx.interval_ms = ctx.interval_ms.max(min.as_millis() as i64);
        }
        macros::expand(&self.sql, &ctx)
    }

    /// The query a `kpi.<name>` view runs: all time, at the KPI's own interval.
    pub fn view_sql(&self) -> crate::Result<String> {
        let interval = self.interval.unwrap_or(DEFAULT_VIEW_INTERVAL);
        self.expand(&MacroContext::unbounded(interval.as_millis() as i64))
    }

    /// `path:line` of the query, for messages about it.
    pub fn location(&self, offset_line: usize) -> String {
        format!(
            "{}:{}",
            self.path.display(),
            self.sql_line + offset_line.saturating_sub(1)
        )
    }
}

/// A problem in one KPI file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpiProblem {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for KpiProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
        }
    }
}

/// Every KPI that loaded, by name, and every problem found.
#[derive(Debug, Clone, Default)]
pub struct Kpis {
    by_name: BTreeMap<String, Kpi>,
    pub problems: Vec<KpiProblem>,
}

impl Kpis {
    /// Loads `dir/*.sql`. A missing folder means no KPIs (not an error): the defaults point at
    /// `queries/`, which a user may not have.
    pub fn load_dir(dir: &Path) -> Self {
        let mut out = Kpis::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
            Err(e) => {
                out.problems.push(KpiProblem {
                    path: dir.to_path_buf(),
                    line: 0,
                    message: format!("cannot read the folder: {e}"),
                });
                return out;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        for path in files {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    out.problems.push(KpiProblem {
                        path,
                        line: 0,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            match parse(&path, &text) {
                Ok(kpi) => {
                    if let Some(first) = out.by_name.get(&kpi.name) {
                        out.problems.push(KpiProblem {
                            path: kpi.path.clone(),
                            line: 1,
                            message: format!(
                                "KPI name '{}' is already used by {}",
                                kpi.name,
                                first.path.display()
                            ),
                        });
                    } else {
                        out.by_name.insert(kpi.name.clone(), kpi);
                    }
                }
                Err(p) => out.problems.extend(p),
            }
        }
        out
    }

    pub fn from_kpis(kpis: impl IntoIterator<Item = Kpi>) -> Self {
        Self {
            by_name: kpis.into_iter().map(|k| (k.name.clone(), k)).collect(),
            problems: Vec::new(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Kpi> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Kpi> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Drops a KPI that turned out broken (for example it does not plan).
    pub fn remove(&mut self, name: &str) -> Option<Kpi> {
        self.by_name.remove(name)
    }
}

const KEYS: [&str; 5] = ["name", "title", "unit", "description", "interval"];

/// Parses one KPI file; every problem in it is reported.
pub fn parse(path: &Path, text: &str) -> Result<Kpi, Vec<KpiProblem>> {
    let problem = |line: usize, message: String| KpiProblem {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut problems = Vec::new();
    let mut fields: BTreeMap<&str, (usize, String)> = BTreeMap::new();
    let mut sql_start = None;
    let mut offset = 0;
    for (idx, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim();
        if let Some(comment) = trimmed.strip_prefix("--") {
            if let Some((key, value)) = comment.split_once(':') {
                let key = key.trim().to_ascii_lowercase();
                if let Some(k) = KEYS.iter().find(|k| **k == key) {
                    if fields.contains_key(k) {
                        problems.push(problem(idx + 1, format!("'{k}' is set twice")));
                    }
                    fields.insert(k, (idx + 1, value.trim().to_string()));
                }
            }
        } else if !trimmed.is_empty() {
            sql_start = Some((idx + 1, offset));
            break;
        }
        offset += line.len();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (name_line, name) = fields.remove("name").unwrap_or((1, stem));
    if !valid_name(&name) {
        problems.push(problem(
            name_line,
            format!(
                "KPI name '{name}' must be lowercase letters, digits and _, starting with a \
                 letter (it becomes the view kpi.{name})"
            ),
        ));
    }
    let interval = match fields.remove("interval") {
        Some((line, v)) => match humantime::parse_duration(&v) {
            Ok(d) if d >= Duration::from_millis(1) => Some(d),
            Ok(_) => {
                problems.push(problem(line, "interval must be at least 1ms".into()));
                None
            }
            Err(e) => {
                problems.push(problem(line, format!("interval '{v}': {e}")));
                None
            }
        },
        None => None,
    };
    let Some((sql_line, sql_offset)) = sql_start else {
        problems.push(problem(0, "no SQL query after the header".into()));
        return Err(problems);
    };
    let sql = text[sql_offset..]
        .trim_end()
        .trim_end_matches(';')
        .to_string();
    let kpi = Kpi {
        title: fields
            .remove("title")
            .map(|(_, t)| t)
            .unwrap_or_else(|| name.clone()),
        name,
        unit: fields
            .remove("unit")
            .map(|(_, u)| u)
            .filter(|u| !u.is_empty()),
        description: fields
            .remove("description")
            .map(|(_, d)| d)
            .unwrap_or_default(),
        interval,
        sql,
        path: path.to_path_buf(),
        sql_line,
    };
    // The query must expand and be one reading statement; line numbers survive expansion
    // because no macro spans or adds lines.
    match kpi
        .view_sql()
        .and_then(|sql| crate::check_read_only(&sql).map(|()| sql))
    {
        Ok(_) => {}
        Err(e) => {
            let (line, message) = locate(&e.to_string());
            problems.push(problem(
                kpi.sql_line + line.unwrap_or(1) - 1,
                format!("{}: {message}", kind_of(&e)),
            ));
        }
    }
    if problems.is_empty() {
        Ok(kpi)
    } else {
        Err(problems)
    }
}

fn kind_of(e: &crate::Error) -> &'static str {
    match e {
        crate::Error::Forbidden(_) => "not allowed in a KPI",
        _ => "invalid SQL",
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Pulls sqlparser's "at Line: N, Column: M" out of a message: the line is made
/// file-relative by the caller, the column is dropped (macro expansion shifts it).
pub(crate) fn locate(message: &str) -> (Option<usize>, String) {
    let Some(at) = message.find("Line: ") else {
        return (None, message.to_string());
    };
    let digits: String = message[at + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let line = digits.parse::<usize>().ok().filter(|l| *l > 0);
    let mut end = at + 6 + digits.len();
    if let Some(col) = message[end..].strip_prefix(", Column: ") {
        end += 10 + col.chars().take_while(char::is_ascii_digit).count();
    }
    let start = message[..at].strip_suffix(" at ").map_or(at, str::len);
    (line, format!("{}{}", &message[..start], &message[end..]))
}

/// Planning errors carry no position; for the common ones (an unknown column or table) the
/// line of the query that names the culprit is the one to show.
pub(crate) fn line_of_culprit(sql: &str, message: &str) -> Option<usize> {
    let name = if let Some(rest) = message.split("No field named ").nth(1) {
        rest.split(['.', ' ', ','])
            .find(|s| !s.is_empty())?
            .trim_matches('"')
    } else if let Some(rest) = message.split("table '").nth(1) {
        rest.split('\'').next()?.rsplit('.').next()?
    } else {
        return None;
    };
    let name = name.to_ascii_lowercase();
    sql.lines()
        .position(|l| l.to_ascii_lowercase().contains(&name))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Kpi, Vec<KpiProblem>> {
        parse(Path::new("queries/test_kpi.sql"), text)
    }

    #[test]
    fn reads_header_and_query() {
        let kpi = parse_str(
            "-- name: conv\n-- title: Conversion\n-- unit: percentunit\n\
             -- description: a ratio\n-- Inputs: app_signups_total (documentation)\n\
             -- interval: 1d\n\nSELECT $__dateBin(time) AS time, 1 AS v FROM metrics;\n",
        )
        .unwrap();
        assert_eq!(kpi.name, "conv");
        assert_eq!(kpi.title, "Conversion");
        assert_eq!(kpi.unit.as_deref(), Some("percentunit"));
        assert_eq!(kpi.description, "a ratio");
        assert_eq!(kpi.interval, Some(Duration::from_secs(86_400)));
        assert_eq!(kpi.sql_line, 8);
        assert_eq!(
            kpi.sql,
            "SELECT $__dateBin(time) AS time, 1 AS v FROM metrics"
        );
        assert!(kpi.view_sql().unwrap().contains("86400000 milliseconds"));
        // Without a name header, the file stem names the KPI.
        assert_eq!(parse_str("SELECT 1").unwrap().name, "test_kpi");
    }

    #[test]
    fn reports_path_and_line() {
        let errs = parse_str("-- name: Bad-Name\n-- interval: soon\nSELECT 1").unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            text[0].starts_with("queries/test_kpi.sql:1: KPI name 'Bad-Name'"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("queries/test_kpi.sql:2: interval 'soon'"),
            "{text:?}"
        );

        let errs =
            parse_str("-- title: t\n\nSELECT value\n  FROM metrics WHERE value > > 2").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 4, "{}", errs[0]);
        assert!(errs[0].message.starts_with("invalid SQL"), "{}", errs[0]);

        let errs = parse_str("-- title: t\nDROP TABLE metrics").unwrap_err();
        assert_eq!(errs[0].line, 2);
        assert!(errs[0].message.contains("not allowed"), "{}", errs[0]);

        let errs = parse_str("-- title: t\nSELECT 1\nFROM t WHERE $__nope").unwrap_err();
        assert!(
            errs[0].message.contains("unknown macro $__nope"),
            "{}",
            errs[0]
        );

        let errs = parse_str("-- title: only a header\n").unwrap_err();
        assert!(errs[0].message.contains("no SQL"), "{}", errs[0]);
    }

    #[test]
    fn planning_errors_point_at_the_culprit() {
        let sql = "SELECT time,\n  nosuchcol AS v\nFROM metrics";
        assert_eq!(
            line_of_culprit(
                sql,
                "Schema error: No field named nosuchcol. Valid fields are a."
            ),
            Some(2)
        );
        assert_eq!(
            line_of_culprit("SELECT 1\nFROM foo", "table 'tally.public.foo' not found"),
            Some(2)
        );
        assert_eq!(line_of_culprit(sql, "something else"), None);
    }

    #[test]
    fn a_broken_file_does_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.sql"), "SELECT 1 AS v").unwrap();
        std::fs::write(dir.path().join("b.sql"), "SELEC 1").unwrap();
        std::fs::write(dir.path().join("c.sql"), "-- name: a\nSELECT 2").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a KPI").unwrap();
        let kpis = Kpis::load_dir(dir.path());
        assert_eq!(
            kpis.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(kpis.problems.len(), 2, "{:?}", kpis.problems);
        assert!(
            kpis.problems[0]
                .to_string()
                .contains("b.sql:1: invalid SQL")
        );
        assert!(kpis.problems[1].to_string().contains("already used by"));
        assert!(Kpis::load_dir(&dir.path().join("missing")).is_empty());
    }
}
