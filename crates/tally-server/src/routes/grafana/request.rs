//! Reading what the `simpod-json-datasource` plugin sends: tolerant of empty bodies, unknown
//! keys, legacy keys (`data`, `type`, `adhocFilters`) and of list parameters written either as
//! JSON arrays or as Grafana's regex-formatted `(a|b)` strings.

use chrono::DateTime;
use serde_json::{Map, Value};
use tally_query::MacroContext;
use tally_query::series::{Aggregation, Matcher};

use crate::ApiError;

/// Payload keys with a meaning of their own; every other key of a metric target's payload is
/// a label matcher.
pub(crate) const RESERVED: [&str; 6] =
    ["aggregation", "group_by", "format", "labels", "sql", "unit"];

pub(crate) fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// The body as JSON; an empty body (Grafana sends one with `Content-Type: application/json`
/// on `/tag-keys`) is an empty object.
pub(crate) fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("the body is not JSON: {e}")))
}

/// An instant as Grafana writes it (ISO 8601, or epoch milliseconds as number or string).
pub(crate) fn instant_us(v: &Value, what: &str) -> Result<i64, ApiError> {
    let parsed = match v {
        Value::String(s) => DateTime::parse_from_rfc3339(s.trim())
            .map(|t| t.timestamp_micros())
            .ok()
            .or_else(|| s.trim().parse::<i64>().ok().map(|ms| ms * 1000)),
        Value::Number(n) => n.as_i64().map(|ms| ms * 1000),
        _ => None,
    };
    parsed.ok_or_else(|| {
        bad(format!(
            "{what} must be an ISO 8601 time or epoch milliseconds, got {v}"
        ))
    })
}

/// `{from, to}` of a range object; `None` when absent.
pub(crate) fn range_of(v: Option<&Value>, what: &str) -> Result<Option<(i64, i64)>, ApiError> {
    let Some(r) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let (Some(from), Some(to)) = (r.get("from"), r.get("to")) else {
        return Err(bad(format!("{what} needs 'from' and 'to'")));
    };
    let from = instant_us(from, &format!("{what}.from"))?;
    let to = instant_us(to, &format!("{what}.to"))?;
    if to <= from {
        return Err(bad(format!("{what}: 'to' must be after 'from'")));
    }
    Ok(Some((from, to)))
}

/// The bucket width for a range: Grafana's `intervalMs`, widened so no series gets more than
/// `max_points` buckets. Buckets are aligned to multiples of the width since the epoch (panels
/// with the same width agree on bucket edges), so a range of `n` widths can touch `n + 1`.
pub(crate) fn bucket_ms(
    from_us: i64,
    to_us: i64,
    interval_ms: Option<i64>,
    max_points: i64,
) -> i64 {
    let max_points = max_points.max(1);
    // Signed `div_ceil` is unstable; both operands are positive here.
    let ceil = |a: i64, b: i64| (a + b - 1) / b;
    let range_ms = ceil((to_us - from_us).max(1), 1000);
    let floor = if max_points >= 2 {
        ceil(range_ms, max_points - 1)
    } else {
        range_ms
    };
    let mut w = interval_ms.unwrap_or(1).max(floor).max(1);
    let buckets = |w: i64| (to_us - 1).div_euclid(w * 1000) - from_us.div_euclid(w * 1000) + 1;
    while buckets(w) > max_points {
        w = w.saturating_mul(2);
    }
    w
}

/// A list parameter: a JSON array, a single value, or a regex-formatted `(a|b)` / `a\.b`
/// string. `None` means "any value" (`.*`, `$__all`, or nothing).
pub(crate) fn list_param(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Null => None,
        Value::Array(items) => {
            let values: Vec<String> = items.iter().filter_map(scalar).collect();
            if values.iter().any(|v| is_any(v)) {
                None
            } else {
                Some(values.iter().flat_map(|v| split_regex_list(v)).collect())
            }
        }
        other => {
            let s = scalar(other)?;
            if is_any(&s) || s.is_empty() {
                return None;
            }
            Some(split_regex_list(&s))
        }
    }
}

fn is_any(s: &str) -> bool {
    matches!(s, ".*" | ".+" | "$__all" | "*")
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `(a|b\.c)` → `[a, b.c]`; `a\.b` → `[a.b]`. A string that is not wrapped in parentheses is
/// one value.
fn split_regex_list(s: &str) -> Vec<String> {
    let inner = s
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .filter(|x| x.contains('|') || !x.is_empty());
    let Some(inner) = inner else {
        return vec![unescape(s)];
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push('\\');
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '|' => out.push(unescape(&std::mem::take(&mut cur))),
            c => cur.push(c),
        }
    }
    out.push(unescape(&cur));
    out
}

/// Undoes Grafana's regex escaping of a variable value.
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) if r"\.^$*+?()[]{}|-/".contains(n) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A target string, with Grafana's regex escaping of interpolated variables undone
/// (`$metric` holding `a.b` arrives as `a\.b`).
pub(crate) fn target_name(v: &Value) -> String {
    scalar(v).map(|s| unescape(s.trim())).unwrap_or_default()
}

/// A target's payload: `payload`, or the legacy `data` (an object, or JSON text).
pub(crate) fn payload_of(target: &Value) -> Map<String, Value> {
    let raw = target
        .get("payload")
        .filter(|p| !p.is_null())
        .or_else(|| target.get("data"));
    match raw {
        Some(Value::Object(m)) => m.clone(),
        Some(Value::String(s)) if !s.trim().is_empty() => match serde_json::from_str(s) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        _ => Map::new(),
    }
}

/// Label matchers from a payload: every non-reserved key, plus the `labels` object.
pub(crate) fn payload_matchers(payload: &Map<String, Value>, skip: Option<&str>) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut add = |k: &str, v: &Value| {
        if Some(k) == skip {
            return;
        }
        if let Some(values) = list_param(v) {
            out.push(Matcher::In(k.to_string(), values));
        }
    };
    for (k, v) in payload {
        // `{"rate": true}` chooses the aggregation; it is not a label.
        let switch = v.is_boolean() && Aggregation::parse(k).is_some();
        if !RESERVED.contains(&k.as_str()) && !switch {
            add(k, v);
        }
    }
    if let Some(Value::Object(labels)) = payload.get("labels") {
        for (k, v) in labels {
            add(k, v);
        }
    }
    out
}

/// Ad hoc filters: Grafana's `filters`, or the plugin's legacy `adhocFilters`.
pub(crate) fn adhoc_filters(body: &Value) -> Result<Vec<AdhocFilter>, ApiError> {
    let list = body
        .get("filters")
        .filter(|f| f.is_array())
        .or_else(|| body.get("adhocFilters").filter(|f| f.is_array()));
    let Some(Value::Array(items)) = list else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in items {
        let key = item.get("key").and_then(scalar).unwrap_or_default();
        if key.is_empty() {
            continue;
        }
        let operator = item
            .get("operator")
            .and_then(Value::as_str)
            .unwrap_or("=")
            .to_string();
        let value = item.get("value").and_then(scalar).unwrap_or_default();
        let filter = AdhocFilter {
            key,
            operator,
            value,
        };
        filter.matcher()?;
        out.push(filter);
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdhocFilter {
    pub key: String,
    pub operator: String,
    pub value: String,
}

impl AdhocFilter {
    pub(crate) fn matcher(&self) -> Result<Matcher, ApiError> {
        let (k, v) = (self.key.clone(), self.value.clone());
        Ok(match self.operator.as_str() {
            "=" | "==" => Matcher::In(k, vec![v]),
            "!=" => Matcher::NotIn(k, vec![v]),
            "=~" => Matcher::Regex(k, check_regex(&v)?),
            "!~" => Matcher::NotRegex(k, check_regex(&v)?),
            op @ ("<" | "<=" | ">" | ">=") => {
                let n = v.trim().parse::<f64>().ok().filter(|n| n.is_finite());
                let n = n.ok_or_else(|| {
                    bad(format!(
                        "ad hoc filter {k} {op} {v}: the value must be a number"
                    ))
                })?;
                let op = match op {
                    "<" => "<",
                    "<=" => "<=",
                    ">" => ">",
                    _ => ">=",
                };
                Matcher::Compare(k, op, n)
            }
            other => {
                return Err(bad(format!(
                    "ad hoc filter operator '{other}' is not supported (=, !=, =~, !~, <, <=, >, >=)"
                )));
            }
        })
    }

    /// Whether a row whose column `key` holds `value` passes (for KPI and SQL results).
    pub(crate) fn accepts(&self, value: &str) -> bool {
        let number = || value.trim().parse::<f64>().ok();
        let limit = self.value.trim().parse::<f64>().ok();
        match self.operator.as_str() {
            "=" | "==" => value == self.value,
            "!=" => value != self.value,
            "=~" | "!~" => {
                let m = anchored(&self.value).is_some_and(|re| re.is_match(value));
                (self.operator == "=~") == m
            }
            "<" => matches!((number(), limit), (Some(a), Some(b)) if a < b),
            "<=" => matches!((number(), limit), (Some(a), Some(b)) if a <= b),
            ">" => matches!((number(), limit), (Some(a), Some(b)) if a > b),
            ">=" => matches!((number(), limit), (Some(a), Some(b)) if a >= b),
            _ => true,
        }
    }
}

fn anchored(re: &str) -> Option<regex::Regex> {
    regex::Regex::new(&format!("^(?:{re})$")).ok()
}

fn check_regex(re: &str) -> Result<String, ApiError> {
    anchored(re)
        .map(|_| re.to_string())
        .ok_or_else(|| bad(format!("'{re}' is not a valid regular expression")))
}

/// The range and bucket of a `/query` request.
pub(crate) fn query_context(body: &Value) -> Result<MacroContext, ApiError> {
    let (from_us, to_us) = range_of(body.get("range"), "range")?
        .ok_or_else(|| bad("range.from and range.to are required"))?;
    let max_points = body
        .get("maxDataPoints")
        .and_then(Value::as_f64)
        .filter(|n| *n >= 1.0)
        .map_or(1000, |n| n as i64);
    let interval = body
        .get("intervalMs")
        .and_then(Value::as_f64)
        .filter(|n| *n >= 1.0)
        .map(|n| n as i64);
    Ok(MacroContext {
        from_us,
        to_us,
        interval_ms: bucket_ms(from_us, to_us, interval, max_points),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn list_params_in_every_shape() {
        let l = |v: Value| list_param(&v);
        assert_eq!(
            l(json!(["web1", "web2"])),
            Some(vec!["web1".into(), "web2".into()])
        );
        assert_eq!(
            l(json!("(web1|web\\.2)")),
            Some(vec!["web1".into(), "web.2".into()])
        );
        assert_eq!(l(json!("a\\.b")), Some(vec!["a.b".into()]));
        assert_eq!(l(json!("eu")), Some(vec!["eu".into()]));
        assert_eq!(l(json!(15)), Some(vec!["15".into()]));
        assert_eq!(
            l(json!(["(a|b)", "c"])),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(l(json!(".*")), None);
        assert_eq!(l(json!("$__all")), None);
        assert_eq!(l(json!("")), None);
        assert_eq!(l(json!(null)), None);
        assert_eq!(l(json!("(x)")), Some(vec!["x".into()]));
    }

    #[test]
    fn buckets_never_exceed_max_points() {
        for (range_s, interval, max) in [
            (6 * 3600, Some(20_000), 1080),
            (6 * 3600, Some(1), 100),
            (86_400, None, 7),
            (3600, Some(60_000), 2),
            (1, Some(1), 1000),
            (7 * 86_400 + 13, Some(1000), 999),
        ] {
            for from_ms in [0i64, 1_740_927_600_123, 1_740_927_611_777] {
                let from = from_ms * 1000;
                let to = from + range_s * 1_000_000;
                let w = bucket_ms(from, to, interval, max);
                let first = from.div_euclid(w * 1000);
                let last = (to - 1).div_euclid(w * 1000);
                assert!(last - first < max, "{range_s} {interval:?} {max}: {w}");
                assert!(w >= interval.unwrap_or(1));
            }
        }
    }

    #[test]
    fn payloads_and_filters() {
        let t = json!({"refId": "A", "data": "{\"host\": \"web1\"}"});
        assert_eq!(payload_of(&t)["host"], "web1");
        let m = payload_matchers(
            &json!({"host": ["a"], "aggregation": "rate", "labels": {"dc": "(x|y)"}})
                .as_object()
                .unwrap()
                .clone(),
            None,
        );
        assert_eq!(
            m,
            vec![
                Matcher::In("host".into(), vec!["a".into()]),
                Matcher::In("dc".into(), vec!["x".into(), "y".into()]),
            ]
        );
        let f = adhoc_filters(
            &json!({"adhocFilters": [{"key": "region", "operator": "!=", "value": "eu"}]}),
        )
        .unwrap();
        assert_eq!(
            f[0].matcher().unwrap(),
            Matcher::NotIn("region".into(), vec!["eu".into()])
        );
        assert!(
            adhoc_filters(&json!({"filters": [{"key": "a", "operator": "=~", "value": "("}]}))
                .is_err()
        );
        assert!(
            adhoc_filters(&json!({"filters": [{"key": "a", "operator": "<", "value": "x"}]}))
                .is_err()
        );
        assert!(f[0].accepts("us") && !f[0].accepts("eu"));
    }
}
