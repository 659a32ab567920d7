//! Samples, series keys and the builder that turns samples into `metrics` record batches.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int64Array, MapBuilder, MapFieldNames, RecordBatch,
    StringBuilder, TimestampMicrosecondArray,
};
use arrow::error::ArrowError;

use crate::schema::{UTC, metrics_schema};
use crate::time::day_of;

/// One `(time, metric, labels, value)` point, tagged with the job or push that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Microseconds since the Unix epoch, UTC.
    pub time: i64,
    pub metric: String,
    /// Sorted, so equal label sets always produce the same series key.
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    pub source: String,
}

/// FNV-1a 64-bit offset basis and prime. The series key is persisted in every Parquet file, so
/// this function is frozen: changing it would split every existing series in two.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The canonical series key: a hash of the metric name and the sorted label pairs.
///
/// Stored as `series_id` because DataFusion groups by an integer far faster than by a map.
/// Fields are separated by 0xFF, a byte that never occurs in UTF-8, so `a="b,c"` and
/// `a="b",c=""` cannot collide by construction.
pub fn series_id<'a>(metric: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> i64 {
    let mut h = fnv1a(FNV_OFFSET, metric.as_bytes());
    for (k, v) in labels {
        h = fnv1a(h, &[0xFF]);
        h = fnv1a(h, k.as_bytes());
        h = fnv1a(h, &[0xFF]);
        h = fnv1a(h, v.as_bytes());
    }
    // Delta Lake has no unsigned integers; the bit pattern is what matters.
    h as i64
}

/// Prometheus' metric name rule, `[a-zA-Z_:][a-zA-Z0-9_:]*`, which every Tally ingest path
/// enforces so names stay usable in PromQL-minded tools and in SQL without quoting.
pub fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Prometheus' label name rule, `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

impl Sample {
    pub fn series_id(&self) -> i64 {
        series_id(
            &self.metric,
            self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }
}

/// Collects samples and emits one `metrics` batch sorted by metric, series and time, the order
/// that makes timestamps delta-encode and dictionary runs long in Parquet.
///
/// Sources that deliver several points per series (remote_write, query results) add the
/// series once ([`Self::series`]) and then its points, so labels are neither cloned nor hashed
/// per point.
#[derive(Debug, Default)]
pub struct SampleBatchBuilder {
    series: Vec<SeriesEntry>,
    /// (index into `series`, time, value)
    rows: Vec<(u32, i64, f64)>,
}

#[derive(Debug)]
struct SeriesEntry {
    id: i64,
    metric: String,
    labels: BTreeMap<String, String>,
    source: String,
}

/// A series added to a [`SampleBatchBuilder`].
#[derive(Debug, Clone, Copy)]
pub struct SeriesRef(u32);

impl SampleBatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            series: Vec::with_capacity(n),
            rows: Vec::with_capacity(n),
        }
    }

    /// Adds a series (its key is computed here, once) for [`Self::point`].
    pub fn series(
        &mut self,
        metric: String,
        labels: BTreeMap<String, String>,
        source: String,
    ) -> SeriesRef {
        let id = series_id(
            &metric,
            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        self.series.push(SeriesEntry {
            id,
            metric,
            labels,
            source,
        });
        // More than 4 G series in one batch would exhaust memory long before this wraps.
        SeriesRef((self.series.len() - 1) as u32)
    }

    pub fn point(&mut self, series: SeriesRef, time: i64, value: f64) {
        self.rows.push((series.0, time, value));
    }

    pub fn push(&mut self, sample: Sample) {
        let s = self.series(sample.metric, sample.labels, sample.source);
        self.point(s, sample.time, sample.value);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let series = &self.series;
        self.rows.sort_by(|(a, ta, _), (b, tb, _)| {
            let (a, b) = (&series[*a as usize], &series[*b as usize]);
            a.metric
                .cmp(&b.metric)
                .then(a.id.cmp(&b.id))
                .then(ta.cmp(tb))
        });
        let n = self.rows.len();
        let mut labels = MapBuilder::with_capacity(
            Some(MapFieldNames {
                entry: "key_value".into(),
                key: "key".into(),
                value: "value".into(),
            }),
            StringBuilder::new(),
            StringBuilder::new(),
            n,
        );
        let mut metric = StringBuilder::with_capacity(n, n * 16);
        let mut source = StringBuilder::with_capacity(n, n * 8);
        let mut time = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n);
        let mut dates = Vec::with_capacity(n);
        for &(i, t, v) in &self.rows {
            let s = &series[i as usize];
            time.push(t);
            dates.push(day_of(t));
            metric.append_value(&s.metric);
            for (k, v) in &s.labels {
                labels.keys().append_value(k);
                labels.values().append_value(v);
            }
            labels.append(true)?;
            ids.push(s.id);
            values.push(v);
            source.append_value(&s.source);
        }
        let labels = labels.finish();
        // MapBuilder marks the map values nullable; the table schema does too, and it marks the
        // map itself non-null, which `append(true)` above guarantees.
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMicrosecondArray::from(time).with_timezone(UTC)),
            Arc::new(metric.finish()),
            Arc::new(labels),
            Arc::new(Int64Array::from(ids)),
            Arc::new(Float64Array::from(values)),
            Arc::new(source.finish()),
            Arc::new(Date32Array::from(dates)),
        ];
        RecordBatch::try_new(metrics_schema(), columns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(metric: &str, labels: &[(&str, &str)], time: i64, value: f64) -> Sample {
        Sample {
            time,
            metric: metric.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
            source: "test".into(),
        }
    }

    #[test]
    fn series_id_is_frozen() {
        // Persisted in every file: these values must never change.
        // Values cross-checked against an independent FNV-1a implementation.
        assert_eq!(series_id("up", []), 631_693_652_521_310_592);
        assert_eq!(
            series_id("up", [("job", "node")]),
            3_004_260_764_031_727_641
        );
        assert_ne!(
            series_id("up", [("a", "b,c")]),
            series_id("up", [("a", "b"), ("c", "")])
        );
    }

    #[test]
    fn batch_is_sorted_by_metric_series_time() {
        let mut b = SampleBatchBuilder::new();
        b.push(sample("b", &[], 2, 1.0));
        b.push(sample("a", &[("x", "1")], 5, 2.0));
        b.push(sample("b", &[], 1, 3.0));
        b.push(sample("a", &[("x", "1")], 4, 4.0));
        let batch = b.finish().unwrap();
        assert_eq!(batch.num_rows(), 4);
        let values = batch
            .column(4)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(values.values().to_vec(), vec![4.0, 2.0, 3.0, 1.0]);
        assert_eq!(batch.schema(), metrics_schema());
    }
}
