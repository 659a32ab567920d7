//! Prometheus exposition formats: text 0.0.4 and OpenMetrics 1.0 text.
//!
//! Both share one line grammar; they differ in timestamps (integer milliseconds vs. seconds),
//! the `# EOF` terminator, `# UNIT`, and the family types they allow. Histograms, summaries,
//! `_created` and `_info` samples are kept under their sample names, as Prometheus stores them.
//! Exemplars are dropped.

use std::collections::BTreeMap;

/// Which grammar a body follows, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    OpenMetrics,
}

impl Format {
    pub fn from_content_type(content_type: &str) -> Self {
        if content_type
            .to_ascii_lowercase()
            .starts_with("application/openmetrics-text")
        {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    /// What to send as `Accept` to get either, OpenMetrics preferred.
    pub const ACCEPT: &'static str =
        "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    /// Milliseconds since the epoch, when the exposition gave one.
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyMeta {
    pub name: String,
    /// As written in `# TYPE` (`untyped` when absent in text 0.0.4, `unknown` in OpenMetrics).
    pub kind: String,
    pub help: Option<String>,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<ParsedSample>,
    pub families: Vec<FamilyMeta>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

const TEXT_TYPES: [&str; 5] = ["counter", "gauge", "histogram", "summary", "untyped"];
const OM_TYPES: [&str; 8] = [
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "summary",
    "info",
    "stateset",
    "unknown",
];

pub fn parse(body: &str, format: Format) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut saw_eof = false;
    let last_line = body.split('\n').count();
    for (n, raw) in body.split('\n').enumerate() {
        let line_no = n + 1;
        let err = |message: String| ParseError {
            line: line_no,
            message,
        };
        let line = if format == Format::Text {
            raw.trim_end_matches('\r').trim()
        } else {
            raw
        };
        if saw_eof {
            if line.trim().is_empty() {
                continue;
            }
            return Err(err("content after # EOF".into()));
        }
        if line.is_empty() {
            // The final "line" after the last '\n' is empty by construction.
            if format == Format::OpenMetrics && line_no < last_line {
                return Err(err("empty line (not allowed in OpenMetrics)".into()));
            }
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start_matches([' ', '\t']);
            let mut parts = comment.splitn(3, [' ', '\t']);
            let keyword = parts.next().unwrap_or("");
            match keyword {
                "EOF" if format == Format::OpenMetrics => saw_eof = true,
                "HELP" | "TYPE" | "UNIT" => {
                    let Some(name) = parts.next().filter(|s| !s.is_empty()) else {
                        return Err(err(format!("# {keyword} without a metric name")));
                    };
                    let rest = parts.next().unwrap_or("");
                    let i = *index.entry(name.to_string()).or_insert_with(|| {
                        out.families.push(FamilyMeta {
                            name: name.to_string(),
                            kind: default_kind(format).into(),
                            ..Default::default()
                        });
                        out.families.len() - 1
                    });
                    let fam = &mut out.families[i];
                    match keyword {
                        "HELP" => fam.help = Some(unescape_help(rest)),
                        "TYPE" => {
                            let t = rest.trim();
                            let allowed: &[&str] = match format {
                                Format::Text => &TEXT_TYPES,
                                Format::OpenMetrics => &OM_TYPES,
                            };
                            if !allowed.contains(&t) {
                                return Err(err(format!("unknown metric type '{t}' for {name}")));
                            }
                            fam.kind = t.to_string();
                        }
                        _ => fam.unit = Some(rest.trim().to_string()),
                    }
                }
                _ if format == Format::OpenMetrics => {
                    return Err(err(format!("unexpected comment '# {keyword}'")));
                }
                _ => {}
            }
            continue;
        }
        out.samples.push(parse_sample(line, format).map_err(err)?);
    }
    if format == Format::OpenMetrics && !saw_eof {
        return Err(ParseError {
            line: body.lines().count(),
            message: "OpenMetrics body does not end with # EOF".into(),
        });
    }
    Ok(out)
}

fn default_kind(format: Format) -> &'static str {
    match format {
        Format::Text => "untyped",
        Format::OpenMetrics => "unknown",
    }
}

fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A cursor over one sample line.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.pos += 1;
        }
    }

    fn ident(&mut self, allow_colon: bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':') {
                self.pos += 1;
            } else {
                break;
            }
        }
        &self.s[start..self.pos]
    }

    fn quoted(&mut self) -> Result<String, String> {
        if self.bump() != Some('"') {
            return Err("expected '\"'".into());
        }
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return Err("unterminated quoted string".into()),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('n') => out.push('\n'),
                    Some('\\') => out.push('\\'),
                    Some('"') => out.push('"'),
                    Some(other) => return Err(format!("invalid escape '\\{other}'")),
                    None => return Err("unterminated escape".into()),
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == ' ' || c == '\t' {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.s[start..self.pos]
    }
}

fn parse_sample(line: &str, format: Format) -> Result<ParsedSample, String> {
    let mut c = Cursor { s: line, pos: 0 };
    let mut name = if c.peek() == Some('{') {
        String::new()
    } else {
        let n = c.ident(true);
        if n.is_empty() || n.starts_with(|ch: char| ch.is_ascii_digit()) {
            return Err(format!("invalid metric name at '{}'", truncate(line)));
        }
        n.to_string()
    };
    let mut labels = BTreeMap::new();
    if c.peek() == Some('{') {
        c.bump();
        loop {
            c.skip_ws();
            match c.peek() {
                Some('}') => {
                    c.bump();
                    break;
                }
                None => return Err("unterminated label set".into()),
                _ => {}
            }
            // A quoted name alone (no '=') is the metric name in the UTF-8 form.
            let key = if c.peek() == Some('"') {
                let q = c.quoted()?;
                c.skip_ws();
                if matches!(c.peek(), Some(',' | '}')) {
                    if !name.is_empty() {
                        return Err("metric name given twice".into());
                    }
                    name = q;
                    if c.peek() == Some(',') {
                        c.bump();
                    }
                    continue;
                }
                q
            } else {
                let k = c.ident(false);
                if k.is_empty() {
                    return Err(format!("invalid label name in '{}'", truncate(line)));
                }
                k.to_string()
            };
            c.skip_ws();
            if c.bump() != Some('=') {
                return Err(format!("expected '=' after label {key}"));
            }
            c.skip_ws();
            let value = c.quoted()?;
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} appears twice"));
            }
            c.skip_ws();
            match c.bump() {
                Some(',') => {}
                Some('}') => break,
                _ => return Err(format!("expected ',' or '}}' after label {key}")),
            }
        }
    }
    if name.is_empty() {
        return Err("sample without a metric name".into());
    }
    c.skip_ws();
    let value_tok = c.token();
    let value =
        parse_float(value_tok).ok_or_else(|| format!("invalid value '{value_tok}' for {name}"))?;
    c.skip_ws();
    let mut timestamp_ms = None;
    if c.peek().is_some() && c.peek() != Some('#') {
        let ts = c.token();
        timestamp_ms = Some(match format {
            Format::Text => ts
                .parse::<i64>()
                .map_err(|_| format!("invalid timestamp '{ts}' (integer milliseconds expected)"))?,
            Format::OpenMetrics => {
                let secs = parse_float(ts)
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| format!("invalid timestamp '{ts}' (seconds expected)"))?;
                (secs * 1000.0).round() as i64
            }
        });
        c.skip_ws();
    }
    // Anything left must be an OpenMetrics exemplar (`# {...} v [t]`); it is not stored.
    if let Some(rest) = c.s.get(c.pos..).filter(|r| !r.is_empty())
        && !(format == Format::OpenMetrics && rest.starts_with('#'))
    {
        return Err(format!(
            "unexpected text '{}' after the value",
            truncate(rest)
        ));
    }
    Ok(ParsedSample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// Go's ParseFloat spellings: `NaN`, `+Inf`, `-Inf`, exponents.
pub(crate) fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ if s.is_empty()
            || s.chars()
                .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../../tests/fixtures/prometheus/exposition/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn node_exporter_text() {
        let e = parse(&fixture("node_exporter_1.5.0_metrics.txt"), Format::Text).unwrap();
        assert_eq!(e.samples.len(), 507, "every non-comment line is a sample");
        let kinds = |k: &str| e.families.iter().filter(|f| f.kind == k).count();
        assert_eq!(
            (
                kinds("counter"),
                kinds("gauge"),
                kinds("summary"),
                kinds("untyped")
            ),
            (60, 175, 1, 47)
        );
        let q = e
            .samples
            .iter()
            .find(|s| {
                s.name == "go_gc_duration_seconds"
                    && s.labels.get("quantile").map(String::as_str) == Some("0.25")
            })
            .unwrap();
        assert!(q.value > 0.0 && q.timestamp_ms.is_none());
    }

    #[test]
    fn python_client_both_formats_agree() {
        let text = parse(&fixture("python_client_text_0.0.4.txt"), Format::Text).unwrap();
        let om = parse(
            &fixture("python_client_openmetrics_1.0.txt"),
            Format::OpenMetrics,
        )
        .unwrap();
        let key = |s: &ParsedSample| (s.name.clone(), s.labels.clone());
        let tk: std::collections::BTreeSet<_> = text.samples.iter().map(key).collect();
        let ok: std::collections::BTreeSet<_> = om.samples.iter().map(key).collect();
        assert_eq!(tk, ok, "the same series in both renderings");
        let escaped = om
            .samples
            .iter()
            .find(|s| s.name == "ingest_rows_total" && s.labels["source"] == "locust")
            .unwrap();
        assert_eq!(
            escaped.labels["table"],
            "path with \"quotes\" and \\ backslash\nnewline"
        );
        let lag = |e: &Exposition, src: &str| {
            e.samples
                .iter()
                .find(|s| s.name == "ingest_lag_seconds" && s.labels["source"] == src)
                .unwrap()
                .value
        };
        assert!(lag(&om, "ga4").is_nan());
        assert_eq!(lag(&om, "mailgun"), f64::INFINITY);
        assert_eq!(lag(&text, "stripe"), 12.5);
        let unit = om
            .families
            .iter()
            .find(|f| f.name == "ingest_lag_seconds")
            .unwrap();
        assert_eq!(unit.unit.as_deref(), Some("seconds"));
        assert_eq!(
            om.families
                .iter()
                .find(|f| f.name == "ingest_build")
                .unwrap()
                .kind,
            "info"
        );
    }

    #[test]
    fn federate_timestamps_are_milliseconds() {
        let e = parse(
            &fixture("prometheus_federate_up_with_timestamps.txt"),
            Format::Text,
        )
        .unwrap();
        assert!(e.samples.iter().all(|s| s.timestamp_ms.is_some()));
        assert_eq!(e.samples[0].timestamp_ms, Some(1_795_383_408_169));
        let om = parse("a_total 1 1520879607.789\n# EOF\n", Format::OpenMetrics).unwrap();
        assert_eq!(om.samples[0].timestamp_ms, Some(1_520_879_607_789));
    }

    #[test]
    fn grammar_edges() {
        let e = parse(
            "# HELP x a\\nb \\\\ c\n# TYPE x gauge\nx{a=\"1\",b=\"2\",} 1.5e-3\n\tx{a=\"2\"}\t-Inf\n{\"my.metric\",\"a.b\"=\"v\"} 2\n",
            Format::Text,
        )
        .unwrap();
        assert_eq!(e.families[0].help.as_deref(), Some("a\nb \\ c"));
        assert_eq!(e.samples.len(), 3);
        assert_eq!(e.samples[0].value, 0.0015);
        assert_eq!(e.samples[1].value, f64::NEG_INFINITY);
        assert_eq!(e.samples[2].name, "my.metric");
        assert_eq!(e.samples[2].labels["a.b"], "v");
        let om = parse(
            "foo_bucket{le=\"1\"} 11 # {trace_id=\"abc\"} 0.67 1520879607.789\n# EOF\n",
            Format::OpenMetrics,
        )
        .unwrap();
        assert_eq!(om.samples[0].value, 11.0);

        for (bad, format, needle) in [
            ("x{a=\"1\" 1\n", Format::Text, "expected ',' or '}'"),
            ("x{a=1} 1\n", Format::Text, "expected '\"'"),
            ("x 1 2 3\n", Format::Text, "unexpected text"),
            ("x one\n", Format::Text, "invalid value"),
            ("x 1 1.5\n", Format::Text, "integer milliseconds"),
            ("x{a=\"1\",a=\"2\"} 1\n", Format::Text, "twice"),
            ("# TYPE x meter\n", Format::Text, "unknown metric type"),
            ("x 1\n", Format::OpenMetrics, "# EOF"),
            ("# EOF\nx 1\n", Format::OpenMetrics, "after # EOF"),
            ("x{a=\"\\q\"} 1\n", Format::Text, "invalid escape"),
            ("9x 1\n", Format::Text, "invalid metric name"),
        ] {
            let e = parse(bad, format).unwrap_err();
            assert!(e.message.contains(needle), "{bad:?}: {e}");
        }
    }
}
