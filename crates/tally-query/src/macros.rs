//! Time macros shared by KPI files and raw-SQL Grafana targets.
//!
//! The spellings are the Grafana FlightSQL datasource's (`$__timeFrom`, `$__timeTo`,
//! `$__timeFilter(col)`, `$__interval`, `$__dateBin(col)`), so a query moves between that
//! datasource and Tally unchanged. Expansion is textual but skips string literals, quoted
//! identifiers and comments, so `'$__timeFrom'` stays what the author wrote.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::{Error, Result};

/// The range and bucket width a query is expanded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacroContext {
    /// Start of the range, epoch microseconds (inclusive).
    pub from_us: i64,
    /// End of the range, epoch microseconds (exclusive).
    pub to_us: i64,
    /// Bucket width, milliseconds (at least 1).
    pub interval_ms: i64,
}

impl MacroContext {
    /// The range a KPI view covers when no one asked for one: all of (reasonable) time.
    pub fn unbounded(interval_ms: i64) -> Self {
        Self {
            from_us: 0,
            // Nanosecond timestamps (what `CAST(.. AS TIMESTAMP)` yields) end in 2262.
            to_us: 7_258_118_400_000_000, // 2200-01-01
            interval_ms: interval_ms.max(1),
        }
    }
}

const NAMES: &str = "$__timeFrom, $__timeTo, $__timeFilter(col), $__interval, $__interval_ms, \
                     $__dateBin(col), $__dateBinAlias(col)";

/// Replaces every macro in `sql`; an unknown `$__name` is an error naming the known ones.
pub fn expand(sql: &str, ctx: &MacroContext) -> Result<String> {
    let mut out = String::with_capacity(sql.len() + 64);
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' | b'"' => {
                let end = quoted_end(bytes, i);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                let end = sql[i..].find('\n').map_or(sql.len(), |n| i + n);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..].find("*/").map_or(sql.len(), |n| i + 2 + n + 2);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'$' if sql[i..].starts_with("$__") => {
                let name_end = i
                    + 3
                    + sql[i + 3..]
                        .bytes()
                        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                        .count();
                let name = &sql[i + 1..name_end];
                let (arg, next) = argument(sql, name_end)?;
                let text = replacement(name, arg, ctx)
                    .map_err(|m| Error::InvalidQuery(format!("{m} (at byte {i} of the query)")))?;
                out.push_str(&text);
                i = next;
            }
            _ => {
                let ch = sql[i..].chars().next().unwrap_or(' ');
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    Ok(out)
}

/// End (exclusive) of the quoted text starting at `start`; doubled quotes stay inside.
fn quoted_end(bytes: &[u8], start: usize) -> usize {
    let q = bytes[start];
    let mut j = start + 1;
    while j < bytes.len() {
        if bytes[j] == q {
            if bytes.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    bytes.len()
}

/// An optional parenthesised argument right after a macro name: `(col)` or `()`.
fn argument(sql: &str, at: usize) -> Result<(Option<&str>, usize)> {
    if !sql[at..].starts_with('(') {
        return Ok((None, at));
    }
    let mut depth = 0usize;
    let bytes = sql.as_bytes();
    let mut j = at;
    while j < bytes.len() {
        match bytes[j] {
            b'\'' | b'"' => {
                j = quoted_end(bytes, j);
                continue;
            }
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Ok((Some(sql[at + 1..j].trim()), j + 1));
                }
            }
            _ => {}
        }
        j += 1;
    }
    Err(Error::InvalidQuery(format!(
        "unclosed parenthesis after macro at byte {at}"
    )))
}

fn replacement(
    name: &str,
    arg: Option<&str>,
    ctx: &MacroContext,
) -> std::result::Result<String, String> {
    let needs_col = |macro_name: &str| -> std::result::Result<String, String> {
        match arg {
            Some(col) if !col.is_empty() => Ok(col.to_string()),
            _ => Err(format!("${macro_name} needs a column: ${macro_name}(time)")),
        }
    };
    let from = timestamp(ctx.from_us);
    let to = timestamp(ctx.to_us);
    let interval = format!("INTERVAL '{} milliseconds'", ctx.interval_ms);
    let bin = |col: &str| format!("date_bin({interval}, {col}, TIMESTAMP '1970-01-01T00:00:00Z')");
    let no_arg = |text: String| -> std::result::Result<String, String> {
        match arg {
            None | Some("") => Ok(text),
            Some(a) => Err(format!("${name} takes no argument, got ({a})")),
        }
    };
    match name {
        "__timeFrom" => no_arg(from),
        "__timeTo" => no_arg(to),
        "__interval" => no_arg(interval),
        "__interval_ms" => no_arg(ctx.interval_ms.to_string()),
        // Half-open, so consecutive ranges never count a row twice.
        "__timeFilter" | "__timeRange" => {
            let col = needs_col(name)?;
            Ok(format!("({col} >= {from} AND {col} < {to})"))
        }
        "__dateBin" => Ok(bin(&needs_col(name)?)),
        "__dateBinAlias" => {
            let col = needs_col(name)?;
            let alias = col.rsplit('.').next().unwrap_or(&col).trim_matches('"');
            Ok(format!("{} AS \"{alias}_binned\"", bin(&col)))
        }
        _ => Err(format!("unknown macro ${name} (known: {NAMES})")),
    }
}

fn timestamp(us: i64) -> String {
    let text = DateTime::<Utc>::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    format!("CAST('{text}' AS TIMESTAMP)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: MacroContext = MacroContext {
        from_us: 1_714_557_600_000_000, // 2024-05-01T10:00:00Z
        to_us: 1_714_561_200_123_000,
        interval_ms: 60_000,
    };

    #[test]
    fn expands_every_macro() {
        let sql = "SELECT $__dateBin(time) AS t, $__interval_ms FROM m \
                   WHERE $__timeFilter(m.time) AND x > $__timeFrom() AND y < $__timeTo \
                   AND d < $__interval";
        assert_eq!(
            expand(sql, &CTX).unwrap(),
            "SELECT date_bin(INTERVAL '60000 milliseconds', time, TIMESTAMP '1970-01-01T00:00:00Z') \
             AS t, 60000 FROM m WHERE (m.time >= CAST('2024-05-01T10:00:00Z' AS TIMESTAMP) AND \
             m.time < CAST('2024-05-01T11:00:00.123Z' AS TIMESTAMP)) AND x > \
             CAST('2024-05-01T10:00:00Z' AS TIMESTAMP) AND y < \
             CAST('2024-05-01T11:00:00.123Z' AS TIMESTAMP) AND d < INTERVAL '60000 milliseconds'"
        );
        assert_eq!(
            expand("SELECT $__dateBinAlias(m.time)", &CTX).unwrap(),
            "SELECT date_bin(INTERVAL '60000 milliseconds', m.time, \
             TIMESTAMP '1970-01-01T00:00:00Z') AS \"time_binned\""
        );
    }

    #[test]
    fn leaves_literals_and_comments_alone() {
        let sql = "SELECT '$__timeFrom', \"$__interval\" -- $__timeTo\n/* $__x */ FROM t";
        assert_eq!(expand(sql, &CTX).unwrap(), sql);
        // A nested call inside the argument is kept whole.
        assert_eq!(
            expand("$__timeFilter(coalesce(a, b))", &CTX).unwrap(),
            "(coalesce(a, b) >= CAST('2024-05-01T10:00:00Z' AS TIMESTAMP) AND coalesce(a, b) < \
             CAST('2024-05-01T11:00:00.123Z' AS TIMESTAMP))"
        );
    }

    #[test]
    fn reports_mistakes() {
        for (sql, needle) in [
            ("SELECT $__timeFilter()", "needs a column"),
            ("SELECT $__timeFilter", "needs a column"),
            ("SELECT $__nope", "unknown macro $__nope"),
            ("SELECT $__timeFilter(time", "unclosed parenthesis"),
            ("SELECT $__timeFrom(x)", "takes no argument"),
        ] {
            let e = expand(sql, &CTX).unwrap_err().to_string();
            assert!(e.contains(needle), "{sql}: {e}");
        }
    }
}
