//! `metric_metadata`: the type and description pushers report for their metrics.
//!
//! An append-only log (one row per distinct report, with the time it was first seen by this
//! process); the latest row per `(source, metric)` is the current metadata. Reports identical
//! to one already written are skipped, so a job pushing the same description every minute
//! costs nothing after its first push.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parking_lot::Mutex;
use tally_model::schema::{UTC, timestamp_type};
use tally_model::time::now_micros;

use crate::{Result, Storage};

pub const METADATA_TABLE: &str = "metric_metadata";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetricMetadata {
    pub source: String,
    pub metric: String,
    pub metric_type: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct MetadataLog {
    written: Mutex<HashSet<MetricMetadata>>,
}

pub fn metadata_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("time", timestamp_type(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("metric_type", DataType::Utf8, true),
        Field::new("description", DataType::Utf8, true),
    ]))
}

impl Storage {
    /// Writes the reports not yet written by this process, in one commit, and returns how
    /// many that was. Durable when it returns.
    pub async fn record_metadata(&self, reports: Vec<MetricMetadata>) -> Result<usize> {
        let fresh: Vec<MetricMetadata> = {
            let written = self.metadata.written.lock();
            let mut seen = HashSet::new();
            reports
                .into_iter()
                .filter(|r| !written.contains(r) && seen.insert(r.clone()))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(0);
        }
        let now = now_micros();
        let batch = RecordBatch::try_new(
            metadata_schema(),
            vec![
                Arc::new(
                    TimestampMicrosecondArray::from(vec![now; fresh.len()]).with_timezone(UTC),
                ),
                Arc::new(StringArray::from_iter_values(
                    fresh.iter().map(|r| &r.source),
                )),
                Arc::new(StringArray::from_iter_values(
                    fresh.iter().map(|r| &r.metric),
                )),
                Arc::new(StringArray::from_iter(
                    fresh.iter().map(|r| r.metric_type.as_deref()),
                )),
                Arc::new(StringArray::from_iter(
                    fresh.iter().map(|r| r.description.as_deref()),
                )),
            ],
        )?;
        self.append(METADATA_TABLE, vec![batch], None).await?;
        let n = fresh.len();
        self.metadata.written.lock().extend(fresh);
        Ok(n)
    }
}
