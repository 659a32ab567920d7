//! Prometheus remote_write 1.0: a snappy block holding a protobuf `prometheus.WriteRequest`.
//!
//! Decoding is all or nothing: a request with one invalid series is refused whole (400, which
//! Prometheus does not retry), so a request is never half stored. Stale markers end a series
//! in Prometheus and are not values, so they are counted and dropped; native histograms and
//! exemplars are counted and not stored (classic histograms arrive as ordinary series).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use tally_model::time::{MAX_MICROS, MICROS_PER_MILLI, MIN_MICROS};
use tally_model::{SampleBatchBuilder, valid_label_name, valid_metric_name};

/// The NaN payload Prometheus writes when a series disappears. Compared bit for bit: NaN
/// never equals anything, and an ordinary NaN sample has a different payload.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
    #[prost(message, repeated, tag = "3")]
    pub metadata: Vec<MetricMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<ProtoSample>,
    #[prost(message, repeated, tag = "3")]
    pub exemplars: Vec<Exemplar>,
    /// Native histograms; only counted (their fields are not decoded).
    #[prost(message, repeated, tag = "4")]
    pub histograms: Vec<Opaque>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoSample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Exemplar {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(double, tag = "2")]
    pub value: f64,
    #[prost(int64, tag = "3")]
    pub timestamp: i64,
}

/// A message whose contents we skip.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Opaque {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricMetadata {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(string, tag = "2")]
    pub metric_family_name: String,
    #[prost(string, tag = "4")]
    pub help: String,
    #[prost(string, tag = "5")]
    pub unit: String,
}

/// Bounds on one request; anything larger is refused before it is allocated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Uncompressed protobuf size (the snappy header announces it).
    pub max_decoded_bytes: usize,
    pub max_labels_per_series: usize,
    pub max_label_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_decoded_bytes: 64 << 20,
            max_labels_per_series: 128,
            max_label_value_bytes: 64 << 10,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("request decodes to {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("snappy: {0}")]
    Snappy(String),
    #[error("protobuf: {0}")]
    Protobuf(String),
    #[error("series {index}: {message}")]
    Invalid { index: usize, message: String },
}

/// One decoded request.
#[derive(Debug, Default)]
pub struct Decoded {
    pub samples: SampleBatchBuilder,
    pub stale_markers: u64,
    pub histograms: u64,
    pub exemplars: u64,
    /// `(family, type, help, unit)`, as Prometheus reported them.
    pub metadata: Vec<(String, &'static str, String, String)>,
}

pub fn metadata_type_name(t: i32) -> &'static str {
    match t {
        1 => "counter",
        2 => "gauge",
        3 => "histogram",
        4 => "gaugehistogram",
        5 => "summary",
        6 => "info",
        7 => "stateset",
        _ => "unknown",
    }
}

/// Decompresses (snappy block format) and decodes a request body; samples are tagged with
/// `source`.
pub fn decode(body: &[u8], source: &str, limits: &Limits) -> Result<Decoded, DecodeError> {
    let size = snap::raw::decompress_len(body).map_err(|e| DecodeError::Snappy(e.to_string()))?;
    if size > limits.max_decoded_bytes {
        return Err(DecodeError::TooLarge {
            size,
            limit: limits.max_decoded_bytes,
        });
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| DecodeError::Snappy(e.to_string()))?;
    let req = <WriteRequest as prost::Message>::decode(raw.as_slice())
        .map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    convert(req, source, limits)
}

fn convert(req: WriteRequest, source: &str, limits: &Limits) -> Result<Decoded, DecodeError> {
    let mut out = Decoded {
        samples: SampleBatchBuilder::with_capacity(
            req.timeseries.iter().map(|t| t.samples.len()).sum(),
        ),
        ..Default::default()
    };
    for (index, ts) in req.timeseries.into_iter().enumerate() {
        let invalid = |message: String| DecodeError::Invalid { index, message };
        out.histograms += ts.histograms.len() as u64;
        out.exemplars += ts.exemplars.len() as u64;
        if ts.labels.len() > limits.max_labels_per_series {
            return Err(invalid(format!(
                "{} labels, more than the limit of {}",
                ts.labels.len(),
                limits.max_labels_per_series
            )));
        }
        let mut name = None;
        let mut labels = BTreeMap::new();
        for l in ts.labels {
            if l.value.len() > limits.max_label_value_bytes {
                return Err(invalid(format!(
                    "label {} is {} bytes long, more than the limit of {}",
                    l.name,
                    l.value.len(),
                    limits.max_label_value_bytes
                )));
            }
            if l.name == "__name__" {
                if name.is_some() {
                    return Err(invalid("__name__ appears twice".into()));
                }
                if !valid_metric_name(&l.value) {
                    return Err(invalid(format!("invalid metric name {:?}", l.value)));
                }
                name = Some(l.value);
                continue;
            }
            if !valid_label_name(&l.name) {
                return Err(invalid(format!("invalid label name {:?}", l.name)));
            }
            // An empty value means the label is absent.
            if l.value.is_empty() {
                continue;
            }
            match labels.entry(l.name) {
                Entry::Vacant(e) => {
                    e.insert(l.value);
                }
                Entry::Occupied(e) => {
                    return Err(invalid(format!("label {} appears twice", e.key())));
                }
            }
        }
        let Some(metric) = name else {
            return Err(invalid("series has no __name__ label".into()));
        };
        let series = out
            .samples
            .series(metric.clone(), labels, source.to_string());
        for s in ts.samples {
            if s.value.to_bits() == STALE_NAN_BITS {
                out.stale_markers += 1;
                continue;
            }
            let time = s
                .timestamp
                .checked_mul(MICROS_PER_MILLI)
                .filter(|t| (MIN_MICROS..=MAX_MICROS).contains(t))
                .ok_or_else(|| {
                    invalid(format!(
                        "{metric}: timestamp {} ms is outside 1970..9999",
                        s.timestamp
                    ))
                })?;
            out.samples.point(series, time, s.value);
        }
    }
    out.metadata = req
        .metadata
        .into_iter()
        .filter(|m| !m.metric_family_name.is_empty())
        .map(|m| {
            (
                m.metric_family_name,
                metadata_type_name(m.r#type),
                m.help,
                m.unit,
            )
        })
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn series(labels: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        TimeSeries {
            labels: labels
                .iter()
                .map(|(n, v)| Label {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: samples
                .iter()
                .map(|&(value, timestamp)| ProtoSample { value, timestamp })
                .collect(),
            ..Default::default()
        }
    }

    fn body(ts: Vec<TimeSeries>) -> Vec<u8> {
        let raw = WriteRequest {
            timeseries: ts,
            metadata: vec![],
        }
        .encode_to_vec();
        snap::raw::Encoder::new().compress_vec(&raw).unwrap()
    }

    #[test]
    fn decodes_values_and_drops_stale_markers() {
        let b = body(vec![series(
            &[("job", "x"), ("__name__", "up"), ("empty", "")],
            &[
                (0.0, 1_000),
                (f64::from_bits(STALE_NAN_BITS), 2_000),
                (f64::NAN, 3_000),
                (f64::INFINITY, 4_000),
            ],
        )]);
        let d = decode(&b, "rw", &Limits::default()).unwrap();
        assert_eq!(d.stale_markers, 1);
        assert_eq!(d.samples.len(), 3, "an ordinary NaN is a value");
    }

    #[test]
    fn refuses_bad_requests_whole() {
        let l = Limits::default();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not snappy at all".to_vec(), "snappy"),
            (
                snap::raw::Encoder::new()
                    .compress_vec(&[0x0a, 0x05, 0x01])
                    .unwrap(),
                "protobuf",
            ),
            (
                body(vec![series(&[("job", "x")], &[(1.0, 1)])]),
                "no __name__",
            ),
            (
                body(vec![series(&[("__name__", "a-b")], &[(1.0, 1)])]),
                "invalid metric name",
            ),
            (
                body(vec![series(&[("__name__", "a"), ("1x", "v")], &[(1.0, 1)])]),
                "invalid label name",
            ),
            (
                body(vec![series(
                    &[("__name__", "a"), ("x", "1"), ("x", "2")],
                    &[(1.0, 1)],
                )]),
                "twice",
            ),
            (
                body(vec![series(&[("__name__", "a")], &[(1.0, i64::MAX / 2)])]),
                "outside",
            ),
        ];
        for (b, want) in cases {
            let e = decode(&b, "rw", &l).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        // The announced size is checked before anything is allocated.
        let big = body(vec![series(&[("__name__", "a")], &[(1.0, 1); 100])]);
        let small = Limits {
            max_decoded_bytes: 100,
            ..Limits::default()
        };
        assert!(matches!(
            decode(&big, "rw", &small),
            Err(DecodeError::TooLarge { .. })
        ));
        // Truncated snappy.
        let b = body(vec![series(&[("__name__", "a")], &[(1.0, 1); 10])]);
        assert!(matches!(
            decode(&b[..b.len() - 3], "rw", &l),
            Err(DecodeError::Snappy(_))
        ));
    }
}
