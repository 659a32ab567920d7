//! Tally's storage: Delta Lake tables on an object store, and the durable write path.
//!
//! In: a storage URL (local path, `file://`, `s3://`, `gs://`, `az://`, `memory://`) and
//! Arrow record batches. Out: committed Delta tables, and a consistent [`TableView`] (a Delta
//! snapshot plus rows acknowledged but not yet flushed) for the query engine.
//!
//! Owns: the `metrics` table and its write-ahead log (pushes are acknowledged once fsynced,
//! flushed to Delta in batches, and replayed exactly once after a crash), records tables
//! (arbitrary schemas, evolving on write), and the two write operations every ingestor uses:
//! append, and replace the rows of `(source, interval)` atomically in one commit.

mod dedupe;
mod error;
mod location;
mod metadata;
mod metrics;
mod table;
mod wal;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use object_store::ObjectStoreExt;
use parking_lot::Mutex;
use tally_model::config::{StorageConfig, WalConfig};
use tally_model::schema::METRICS_TABLE;
use tally_model::telemetry::Telemetry;

pub use dedupe::WriteOutcome;
pub use error::{Error, Result};
pub use location::Location;
pub use metadata::{METADATA_TABLE, MetricMetadata, metadata_schema};
pub use metrics::{Flusher, MetricsStore};
pub use table::{DeltaHandle, ReplaceScope, TableView, WriteSummary};

/// Everything a Tally process stores, at one location.
#[derive(Debug)]
pub struct Storage {
    location: Location,
    metrics: Option<Arc<MetricsStore>>,
    records: Mutex<BTreeMap<String, Arc<DeltaHandle>>>,
    metadata: metadata::MetadataLog,
    telemetry: Arc<Telemetry>,
}

/// How a process uses the storage: a server owns the WAL; a CLI reader must not touch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ReadWrite,
    ReadOnly,
}

impl Storage {
    /// Opens the location, creates the `metrics` table when missing and, in read-write mode,
    /// replays the WAL into the buffer.
    pub async fn open(
        config: &StorageConfig,
        wal: &WalConfig,
        mode: Mode,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self> {
        let location = Location::parse(&config.url, &config.options)?;
        let metrics = match mode {
            Mode::ReadWrite => Some(Arc::new(
                MetricsStore::open(&location, wal, Arc::clone(&telemetry)).await?,
            )),
            Mode::ReadOnly => None,
        };
        Ok(Self {
            location,
            metrics,
            records: Mutex::new(BTreeMap::new()),
            metadata: metadata::MetadataLog::default(),
            telemetry,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// The metrics write path. `None` for a read-only storage.
    pub fn metrics(&self) -> Option<&Arc<MetricsStore>> {
        self.metrics.as_ref()
    }

    /// The handle of a table, opened (not created) on first use.
    pub fn table(&self, name: &str) -> Result<Arc<DeltaHandle>> {
        if name == METRICS_TABLE
            && let Some(m) = &self.metrics
        {
            return Ok(Arc::clone(m.handle()));
        }
        table::validate_table_name(name)?;
        let mut records = self.records.lock();
        if let Some(h) = records.get(name) {
            return Ok(Arc::clone(h));
        }
        let handle = Arc::new(DeltaHandle::new(&self.location, name)?);
        records.insert(name.to_string(), Arc::clone(&handle));
        Ok(handle)
    }

    /// Names of the Delta tables at this location.
    pub async fn list_tables(&self) -> Result<Vec<String>> {
        self.location.list_tables().await
    }

    /// Appends rows to a table, creating it (partitioned by day of `time_column`, if given)
    /// or adding new columns as needed.
    pub async fn append(
        &self,
        table: &str,
        batches: Vec<RecordBatch>,
        time_column: Option<&str>,
    ) -> Result<WriteSummary> {
        let summary = self.table(table)?.append(batches, time_column).await?;
        self.telemetry.rows_written(table, summary.rows);
        Ok(summary)
    }

    /// Replaces every row of `scope` (one source, one time interval) with `batches`, in one
    /// Delta commit: running the same interval twice leaves the same table.
    pub async fn replace(
        &self,
        table: &str,
        scope: &ReplaceScope,
        batches: Vec<RecordBatch>,
    ) -> Result<WriteSummary> {
        let summary = self.table(table)?.replace(scope, batches).await?;
        self.telemetry.rows_written(table, summary.rows);
        Ok(summary)
    }

    /// A small state document kept beside the tables (under `_tally_state/`, never a table),
    /// `None` when it was never written.
    pub async fn read_state(&self, name: &str) -> Result<Option<bytes::Bytes>> {
        let path = self.location.state_path(name);
        match self.location.store().get(&path).await {
            Ok(got) => Ok(Some(got.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a state document in one put: object stores make it atomic, so a reader
    /// sees the old or the new document, never a mix.
    pub async fn write_state(&self, name: &str, contents: bytes::Bytes) -> Result<()> {
        let path = self.location.state_path(name);
        self.location.store().put(&path, contents.into()).await?;
        Ok(())
    }

    /// Checks that the object store answers.
    pub async fn health(&self) -> Result<()> {
        self.location.probe().await
    }
}

#[cfg(test)]
mod tests;
