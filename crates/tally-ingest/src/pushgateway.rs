//! Pushgateway-compatible pushes: the grouping-key path, the two body formats, and the
//! PUT / POST / DELETE semantics over groups.
//!
//! Pushgateway keeps only the latest state of each group. Tally keeps it too, and on every
//! push stores the whole group as it stands after the push, stamped with the push time, as a
//! Prometheus scrape of the Pushgateway at that instant would: the history of a batch job's
//! numbers is then a set of ordinary series.

use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine;
use serde::{Deserialize, Serialize};
use tally_model::time::MICROS_PER_SEC;
use tally_model::{Sample, valid_label_name, valid_metric_name};

use crate::exposition::{self, Format};

/// The only Content-Type Pushgateway reads as protobuf; anything else is text 0.0.4.
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error("{0}")]
    BadPath(String),
    #[error("text format parsing error in {0}")]
    Text(String),
    #[error("protobuf: {0}")]
    Protobuf(String),
    #[error("pushed metrics are invalid or inconsistent with existing metrics: {0}")]
    Invalid(String),
    #[error("body decodes to more than {0} bytes")]
    TooLarge(usize),
    #[error("unsupported Content-Encoding {0:?}: use gzip, snappy or none")]
    Encoding(String),
}

/// Labels identifying a group: `job` first in the path, then any pairs.
pub type GroupingKey = BTreeMap<String, String>;

/// Parses what follows `/metrics/` in a push path (`job/<job>{/<label>/<value>}`), with
/// `@base64` (base64url, padding optional, `=` for empty) after a name marking an encoded
/// value. Segments are percent-decoded here, after splitting, so `%2F` stays in its value.
pub fn parse_grouping_path(path: &str) -> Result<GroupingKey, PushError> {
    let bad = |m: String| PushError::BadPath(m);
    let segments: Vec<&str> = path.split('/').collect();
    if segments.first() != Some(&"job") && segments.first() != Some(&"job@base64") {
        return Err(bad("a push path starts with /metrics/job/<job>".into()));
    }
    if !segments.len().is_multiple_of(2) {
        return Err(bad(format!(
            "label {} has no value (the path needs name/value pairs)",
            segments.last().unwrap_or(&"")
        )));
    }
    let mut key = GroupingKey::new();
    for pair in segments.chunks(2) {
        let raw_name = percent(pair[0]).map_err(bad)?;
        let (name, encoded) = match raw_name.strip_suffix("@base64") {
            Some(n) => (n.to_string(), true),
            None => (raw_name, false),
        };
        let value = if encoded {
            decode_base64(pair[1]).map_err(|e| bad(format!("label {name}: {e}")))?
        } else {
            percent(pair[1]).map_err(bad)?
        };
        if !valid_label_name(&name) || name.starts_with("__") {
            return Err(bad(format!("invalid label name {name:?} in the path")));
        }
        if name == "job" && value.is_empty() {
            return Err(bad("job name is required".into()));
        }
        if key.insert(name.clone(), value).is_some() {
            return Err(bad(format!("label {name} appears twice in the path")));
        }
    }
    Ok(key)
}

fn percent(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("path segment {s:?} is not UTF-8"))
}

fn decode_base64(s: &str) -> Result<String, String> {
    if s == "=" {
        return Ok(String::new());
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(s)
        .map_err(|e| format!("invalid base64url {s:?}: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "decoded value is not UTF-8".to_string())
}

/// One pushed metric family, as it is kept in a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Family {
    pub name: String,
    /// `counter`, `gauge`, `summary`, `histogram`, `gaugehistogram` or `untyped`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    pub samples: Vec<PushedSample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushedSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Kept as text so NaN and the infinities survive JSON.
    #[serde(with = "float_text")]
    pub value: f64,
}

mod float_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Decompresses a body as its `Content-Encoding` says, refusing to grow past `limit`.
/// Snappy here is the framed format (Pushgateway 1.6), unlike remote_write's block format.
pub fn decompress(body: &[u8], encoding: Option<&str>, limit: usize) -> Result<Vec<u8>, PushError> {
    let reader: Box<dyn Read + '_> = match encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => return within(body.to_vec(), limit),
        Some(e) if e.is_empty() || e == "identity" => return within(body.to_vec(), limit),
        Some(e) if e == "gzip" => Box::new(flate2::read::GzDecoder::new(body)),
        Some(e) if e == "snappy" => Box::new(snap::read::FrameDecoder::new(body)),
        Some(e) => return Err(PushError::Encoding(e)),
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| PushError::Text(format!("the compressed body: {e}")))?;
    within(out, limit)
}

fn within(body: Vec<u8>, limit: usize) -> Result<Vec<u8>, PushError> {
    if body.len() > limit {
        return Err(PushError::TooLarge(limit));
    }
    Ok(body)
}

/// Parses a push body: protobuf-delimited when `content_type` says exactly so, else text.
pub fn parse_body(body: &[u8], content_type: Option<&str>) -> Result<Vec<Family>, PushError> {
    let families = if content_type.is_some_and(is_protobuf) {
        parse_protobuf(body)?
    } else {
        parse_text(body)?
    };
    for f in &families {
        if !valid_metric_name(&f.name) {
            return Err(PushError::Invalid(format!(
                "invalid metric name {:?}",
                f.name
            )));
        }
        for s in &f.samples {
            if let Some(bad) = s
                .labels
                .keys()
                .find(|k| !valid_label_name(k) || k.starts_with("__"))
            {
                return Err(PushError::Invalid(format!(
                    "invalid label name {bad:?} on {}",
                    s.name
                )));
            }
        }
    }
    Ok(families)
}

fn is_protobuf(content_type: &str) -> bool {
    let norm: String = content_type
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    norm.starts_with("application/vnd.google.protobuf")
        && norm.contains("proto=io.prometheus.client.metricfamily")
        && norm.contains("encoding=delimited")
}

fn parse_text(body: &[u8]) -> Result<Vec<Family>, PushError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| PushError::Text(format!("the body: not UTF-8 ({e})")))?;
    let parsed = exposition::parse(text, Format::Text)
        .map_err(|e| PushError::Text(format!("line {}: {}", e.line, e.message)))?;
    let declared: BTreeMap<&str, &exposition::FamilyMeta> = parsed
        .families
        .iter()
        .map(|f| (f.name.as_str(), f))
        .collect();
    let mut families: Vec<Family> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for s in parsed.samples {
        if s.timestamp_ms.is_some() {
            return Err(PushError::Invalid(
                "pushed metrics must not have timestamps".into(),
            ));
        }
        let family = family_of(&s.name, &declared);
        let i = *index.entry(family.clone()).or_insert_with(|| {
            let meta = declared.get(family.as_str());
            families.push(Family {
                name: family.clone(),
                kind: meta.map_or("untyped".into(), |m| m.kind.clone()),
                help: meta.and_then(|m| m.help.clone()),
                samples: Vec::new(),
            });
            families.len() - 1
        });
        let labels = s
            .labels
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        families[i].samples.push(PushedSample {
            name: s.name,
            labels,
            value: s.value,
        });
    }
    Ok(families)
}

/// The family a text sample belongs to: `x_bucket`, `x_sum` and `x_count` belong to a
/// declared histogram or summary `x`; every other sample is its own family.
fn family_of(sample: &str, declared: &BTreeMap<&str, &exposition::FamilyMeta>) -> String {
    for (suffix, kinds) in [
        ("_bucket", &["histogram", "gaugehistogram"][..]),
        ("_sum", &["histogram", "gaugehistogram", "summary"][..]),
        ("_count", &["histogram", "gaugehistogram", "summary"][..]),
    ] {
        if let Some(base) = sample.strip_suffix(suffix)
            && declared
                .get(base)
                .is_some_and(|m| kinds.contains(&m.kind.as_str()))
        {
            return base.to_string();
        }
    }
    sample.to_string()
}

mod proto {
    //! `io.prometheus.client` messages (proto2), the fields a push can carry.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricFamily {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub help: Option<String>,
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
        #[prost(message, repeated, tag = "4")]
        pub metric: Vec<Metric>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Metric {
        #[prost(message, repeated, tag = "1")]
        pub label: Vec<LabelPair>,
        #[prost(message, optional, tag = "2")]
        pub gauge: Option<Value>,
        #[prost(message, optional, tag = "3")]
        pub counter: Option<Value>,
        #[prost(message, optional, tag = "4")]
        pub summary: Option<Summary>,
        #[prost(message, optional, tag = "5")]
        pub untyped: Option<Value>,
        #[prost(int64, optional, tag = "6")]
        pub timestamp_ms: Option<i64>,
        #[prost(message, optional, tag = "7")]
        pub histogram: Option<Histogram>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(string, optional, tag = "2")]
        pub value: Option<String>,
    }

    /// Gauge, Counter and Untyped share this shape.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(double, optional, tag = "1")]
        pub value: Option<f64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(uint64, optional, tag = "1")]
        pub sample_count: Option<u64>,
        #[prost(double, optional, tag = "2")]
        pub sample_sum: Option<f64>,
        #[prost(message, repeated, tag = "3")]
        pub quantile: Vec<Quantile>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Quantile {
        #[prost(double, optional, tag = "1")]
        pub quantile: Option<f64>,
        #[prost(double, optional, tag = "2")]
        pub value: Option<f64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Histogram {
        #[prost(uint64, optional, tag = "1")]
        pub sample_count: Option<u64>,
        #[prost(double, optional, tag = "2")]
        pub sample_sum: Option<f64>,
        #[prost(message, repeated, tag = "3")]
        pub bucket: Vec<Bucket>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Bucket {
        #[prost(uint64, optional, tag = "1")]
        pub cumulative_count: Option<u64>,
        #[prost(double, optional, tag = "2")]
        pub upper_bound: Option<f64>,
    }
}

/// A float as Prometheus prints it in labels (`le`, `quantile`): Go's shortest `%g`, with
/// `+Inf`, `-Inf` and `NaN` spelled its way.
fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let sci = format!("{v:e}");
    let exp: i32 = sci
        .rsplit_once('e')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0);
    if v != 0.0 && !(-4..21).contains(&exp) {
        let (mantissa, _) = sci.split_once('e').unwrap_or((&sci, ""));
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{v}")
    }
}

fn parse_protobuf(mut body: &[u8]) -> Result<Vec<Family>, PushError> {
    use prost::Message;
    let mut families = Vec::new();
    while !body.is_empty() {
        let mf = proto::MetricFamily::decode_length_delimited(&mut body)
            .map_err(|e| PushError::Protobuf(e.to_string()))?;
        let name = mf.name.unwrap_or_default();
        let kind = match mf.r#type.unwrap_or(0) {
            0 => "counter",
            1 => "gauge",
            2 => "summary",
            3 => "untyped",
            4 => "histogram",
            5 => "gaugehistogram",
            t => {
                return Err(PushError::Protobuf(format!(
                    "{name}: unknown metric type {t}"
                )));
            }
        };
        let mut samples = Vec::new();
        for m in mf.metric {
            if m.timestamp_ms.is_some() {
                return Err(PushError::Invalid(
                    "pushed metrics must not have timestamps".into(),
                ));
            }
            let labels: BTreeMap<String, String> = m
                .label
                .into_iter()
                .map(|l| (l.name.unwrap_or_default(), l.value.unwrap_or_default()))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            let mut push = |suffix: &str, extra: Option<(&str, String)>, value: f64| {
                let mut labels = labels.clone();
                if let Some((k, v)) = extra {
                    labels.insert(k.to_string(), v);
                }
                samples.push(PushedSample {
                    name: format!("{name}{suffix}"),
                    labels,
                    value,
                });
            };
            let plain = match kind {
                "counter" => m.counter.as_ref(),
                "gauge" => m.gauge.as_ref(),
                "untyped" => m.untyped.as_ref(),
                _ => None,
            };
            if let Some(v) = plain {
                push("", None, v.value.unwrap_or(0.0));
            } else if let Some(s) = m.summary.filter(|_| kind == "summary") {
                for q in s.quantile {
                    let at = go_float(q.quantile.unwrap_or(0.0));
                    push("", Some(("quantile", at)), q.value.unwrap_or(0.0));
                }
                push("_sum", None, s.sample_sum.unwrap_or(0.0));
                push("_count", None, s.sample_count.unwrap_or(0) as f64);
            } else if let Some(h) = m.histogram.filter(|_| kind.ends_with("histogram")) {
                let count = h.sample_count.unwrap_or(0);
                let mut saw_inf = false;
                for b in h.bucket {
                    let ub = b.upper_bound.unwrap_or(f64::INFINITY);
                    saw_inf |= ub == f64::INFINITY;
                    push(
                        "_bucket",
                        Some(("le", go_float(ub))),
                        b.cumulative_count.unwrap_or(0) as f64,
                    );
                }
                if !saw_inf {
                    push("_bucket", Some(("le", "+Inf".into())), count as f64);
                }
                push("_sum", None, h.sample_sum.unwrap_or(0.0));
                push("_count", None, count as f64);
            } else {
                return Err(PushError::Invalid(format!(
                    "a metric of {kind} family {name} carries no {kind} value"
                )));
            }
        }
        families.push(Family {
            name,
            kind: kind.into(),
            help: mf.help.filter(|h| !h.is_empty()),
            samples,
        });
    }
    Ok(families)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Replace the whole group.
    Put,
    /// Replace the families pushed, keep the others.
    Post,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub key: GroupingKey,
    pub families: Vec<Family>,
    /// Microseconds since the epoch; 0 when never.
    pub last_push: i64,
    pub last_failure: i64,
}

/// Every group's current state: what Pushgateway would expose now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Groups {
    groups: Vec<Group>,
}

impl Groups {
    pub fn get(&self, key: &GroupingKey) -> Option<&Group> {
        self.groups.iter().find(|g| &g.key == key)
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Applies a push at `now` (µs) and returns the group after it, or `None` after a delete.
    /// Nothing changes when the push is refused.
    pub fn apply(
        &mut self,
        method: Method,
        key: &GroupingKey,
        pushed: Vec<Family>,
        now: i64,
    ) -> Result<Option<&Group>, PushError> {
        if method == Method::Delete {
            self.groups.retain(|g| &g.key != key);
            return Ok(None);
        }
        for f in &pushed {
            let clash = self
                .groups
                .iter()
                .filter(|g| &g.key != key)
                .flat_map(|g| g.families.iter().map(move |h| (g, h)))
                .find(|(_, h)| h.name == f.name && h.kind != f.kind);
            if let Some((g, h)) = clash {
                return Err(PushError::Invalid(format!(
                    "metric {} is pushed as {} but is a {} in group {}",
                    f.name,
                    f.kind,
                    h.kind,
                    describe(&g.key)
                )));
            }
        }
        let i = match self.groups.iter().position(|g| &g.key == key) {
            Some(i) => i,
            None => {
                self.groups.push(Group {
                    key: key.clone(),
                    families: Vec::new(),
                    last_push: 0,
                    last_failure: 0,
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[i];
        match method {
            Method::Put => g.families = pushed,
            _ => {
                g.families
                    .retain(|old| !pushed.iter().any(|new| new.name == old.name));
                g.families.extend(pushed);
            }
        }
        g.families.sort_by(|a, b| a.name.cmp(&b.name));
        g.last_push = now;
        Ok(Some(&self.groups[i]))
    }

    /// Notes a refused push to an existing group; returns the group when there is one.
    pub fn fail(&mut self, key: &GroupingKey, now: i64) -> Option<&Group> {
        let g = self.groups.iter_mut().find(|g| &g.key == key)?;
        g.last_failure = now;
        Some(g)
    }
}

fn describe(key: &GroupingKey) -> String {
    let pairs: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", pairs.join(","))
}

impl Group {
    /// The group's samples at `time`, as a scrape of Pushgateway would see them: grouping
    /// labels override the pushed ones, plus `push_time_seconds` and
    /// `push_failure_time_seconds`.
    pub fn samples(&self, time: i64, source: &str) -> Vec<Sample> {
        let mut out = Vec::new();
        let key = self.key_labels();
        for f in &self.families {
            for s in &f.samples {
                let mut labels = s.labels.clone();
                labels.extend(key.clone());
                out.push(Sample {
                    time,
                    metric: s.name.clone(),
                    labels,
                    value: s.value,
                    source: source.to_string(),
                });
            }
        }
        self.failure_sample(time, source, &mut out);
        out.push(Sample {
            time,
            metric: "push_time_seconds".into(),
            labels: key,
            value: self.last_push as f64 / MICROS_PER_SEC as f64,
            source: source.to_string(),
        });
        out
    }

    /// The grouping key as stored labels: an empty value means no such label.
    fn key_labels(&self) -> BTreeMap<String, String> {
        self.key
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Only `push_failure_time_seconds`, for a refused push.
    pub fn failure_samples(&self, time: i64, source: &str) -> Vec<Sample> {
        let mut out = Vec::new();
        self.failure_sample(time, source, &mut out);
        out
    }

    fn failure_sample(&self, time: i64, source: &str, out: &mut Vec<Sample>) {
        out.push(Sample {
            time,
            metric: "push_failure_time_seconds".into(),
            labels: self.key_labels(),
            value: self.last_failure as f64 / MICROS_PER_SEC as f64,
            source: source.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pairs: &[(&str, &str)]) -> GroupingKey {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn grouping_paths() {
        assert_eq!(
            parse_grouping_path("job/locust/instance/ci-runner-1").unwrap(),
            key(&[("job", "locust"), ("instance", "ci-runner-1")])
        );
        assert_eq!(
            parse_grouping_path("job/backup/path@base64/L3Zhci90bXA").unwrap(),
            key(&[("job", "backup"), ("path", "/var/tmp")])
        );
        assert_eq!(
            parse_grouping_path("job@base64/L2EvYg==/instance@base64/=").unwrap(),
            key(&[("job", "/a/b"), ("instance", "")])
        );
        assert_eq!(
            parse_grouping_path("job/a%20b/x/c%2Fd").unwrap(),
            key(&[("job", "a b"), ("x", "c/d")])
        );
        for bad in [
            "job",
            "job/",
            "job@base64/=",
            "job/a/instance",
            "job/a/1x/v",
            "job/a/job/b",
            "jobs/a",
            "job/a/p@base64/!!",
        ] {
            assert!(parse_grouping_path(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn go_floats() {
        assert_eq!(go_float(0.005), "0.005");
        assert_eq!(go_float(1.0), "1");
        assert_eq!(go_float(2.5), "2.5");
        assert_eq!(go_float(1e-7), "1e-07");
        assert_eq!(go_float(1e21), "1e+21");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
    }

    #[test]
    fn text_bodies_group_into_families_and_refuse_timestamps() {
        let body = "# TYPE t histogram\nt_bucket{le=\"1\"} 1\nt_bucket{le=\"+Inf\"} 2\nt_sum 3\nt_count 2\nother 4\n";
        let f = parse_body(body.as_bytes(), Some("text/plain")).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].name.as_str(), f[0].samples.len()), ("t", 4));
        assert_eq!(
            (f[1].name.as_str(), f[1].kind.as_str()),
            ("other", "untyped")
        );
        let e = parse_body(b"x 1 1700000000000\n", None).unwrap_err();
        assert!(e.to_string().contains("must not have timestamps"), "{e}");
        let e = parse_body(b"x{a=\"1\" 1\n", None).unwrap_err();
        assert!(
            e.to_string().starts_with("text format parsing error"),
            "{e}"
        );
    }

    #[test]
    fn put_post_delete_semantics() {
        let fam = |name: &str, kind: &str, v: f64| Family {
            name: name.into(),
            kind: kind.into(),
            help: None,
            samples: vec![PushedSample {
                name: name.into(),
                labels: key(&[("job", "body-says-other")]),
                value: v,
            }],
        };
        let k = key(&[("job", "batch")]);
        let mut g = Groups::default();
        g.apply(
            Method::Put,
            &k,
            vec![fam("a", "gauge", 1.0), fam("b", "gauge", 2.0)],
            10,
        )
        .unwrap();
        let after = g
            .apply(Method::Post, &k, vec![fam("b", "gauge", 3.0)], 20)
            .unwrap()
            .unwrap();
        let s = after.samples(20, "pushgateway");
        let names: Vec<(&str, f64)> = s.iter().map(|s| (s.metric.as_str(), s.value)).collect();
        assert_eq!(
            names,
            vec![
                ("a", 1.0),
                ("b", 3.0),
                ("push_failure_time_seconds", 0.0),
                ("push_time_seconds", 20e-6)
            ]
        );
        assert_eq!(s[0].labels["job"], "batch", "the path's labels win");
        let after = g
            .apply(Method::Put, &k, vec![fam("c", "gauge", 4.0)], 30)
            .unwrap()
            .unwrap();
        assert_eq!(after.families.len(), 1);
        // A type clash with another group is refused and changes nothing.
        let other = key(&[("job", "other")]);
        let before = g.clone();
        assert!(
            g.apply(Method::Put, &other, vec![fam("c", "counter", 1.0)], 40)
                .is_err()
        );
        assert_eq!(g, before);
        g.apply(Method::Delete, &k, vec![], 50).unwrap();
        assert!(g.is_empty());
    }

    #[test]
    fn protobuf_fixture_decodes() {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/prometheus/pushgateway/push_body_protobuf_delimited.bin"
        ))
        .unwrap();
        let f = parse_body(&body, Some(PROTOBUF_CONTENT_TYPE)).unwrap();
        let kinds: Vec<&str> = f.iter().map(|f| f.kind.as_str()).collect();
        assert_eq!(kinds, vec!["counter", "gauge", "summary"]);
        // Without the exact Content-Type the same bytes are text, and refused as such.
        assert!(matches!(parse_body(&body, None), Err(PushError::Text(_))));
    }
}
