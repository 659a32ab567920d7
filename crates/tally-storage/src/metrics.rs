//! The `metrics` table's push path: WAL, buffer, and the flusher that moves rows to Delta.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use deltalake_core::protocol::SaveMode;
use tally_model::config::WalConfig;
use tally_model::schema::{
    COL_DATE, COL_METRIC, COL_SERIES_ID, COL_TIME, METRICS_TABLE, metrics_schema,
};
use tally_model::telemetry::Telemetry;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dedupe::{Dedupe, WriteOutcome};
use crate::table::{DeltaHandle, commit_properties};
use crate::wal::Wal;
use crate::{Error, Location, Result};

#[derive(Debug)]
pub struct MetricsStore {
    handle: Arc<DeltaHandle>,
    wal: Wal,
    /// Application id of this process's WAL commits; unique per WAL directory so several
    /// Tally processes can share one bucket.
    app_id: String,
    flush_rows: usize,
    max_buffered_rows: usize,
    flush_interval: Duration,
    flush_wanted: Notify,
    flush_lock: Mutex<Option<u64>>,
    /// Held from the duplicate check until the rows are in the WAL and the buffer.
    dedupe: Mutex<Dedupe>,
    telemetry: Arc<Telemetry>,
}

fn wal_dir(location: &Location, config: &WalConfig) -> PathBuf {
    match (&config.dir, location.local_dir()) {
        (Some(dir), _) => dir.clone(),
        (None, Some(local)) => local.join("_wal"),
        (None, None) => PathBuf::from("tally-wal"),
    }
}

fn node_id(dir: &Path) -> Result<String> {
    let path = dir.join("node-id");
    let io = |e| Error::Wal {
        path: path.display().to_string(),
        source: e,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) | Err(_) => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            std::fs::write(&path, &id).map_err(io)?;
            Ok(id)
        }
    }
}

pub(crate) fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(out)
}

fn decode_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let reader = StreamReader::try_new(bytes, None)?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// One batch sorted by metric, series and time: the order each Parquet file keeps.
fn merge_sorted(batches: &[RecordBatch]) -> Result<RecordBatch> {
    let merged = concat_batches(&metrics_schema(), batches)?;
    let key = |name: &str| -> Result<SortColumn> {
        Ok(SortColumn {
            values: Arc::clone(merged.column(merged.schema().index_of(name)?)),
            options: None,
        })
    };
    let indices = lexsort_to_indices(
        &[key(COL_METRIC)?, key(COL_SERIES_ID)?, key(COL_TIME)?],
        None,
    )?;
    Ok(take_record_batch(&merged, &indices)?)
}

impl MetricsStore {
    pub(crate) async fn open(
        location: &Location,
        config: &WalConfig,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self> {
        let handle = Arc::new(DeltaHandle::new(location, METRICS_TABLE)?);
        handle.ensure(metrics_schema(), true).await?;
        let dir = wal_dir(location, config);
        let app_id = format!("tally-wal-{}", node_id(&dir)?);
        let committed = handle.app_version(&app_id).await?;
        let (wal, replay) = Wal::open(&dir, committed)?;
        let mut rows = 0;
        for segment in &replay {
            if segment.torn_bytes > 0 {
                warn!(
                    segment = segment.seq,
                    bytes = segment.torn_bytes,
                    "dropped a torn WAL tail (never acknowledged)"
                );
            }
            for record in &segment.records {
                for batch in decode_ipc(record)? {
                    rows += batch.num_rows();
                    handle.buffer(segment.seq, batch);
                }
            }
        }
        if rows > 0 {
            info!(rows, segments = replay.len(), dir = %dir.display(), "replayed write-ahead log");
        }
        telemetry.buffered_rows.set(rows as i64);
        telemetry.wal_bytes.set(wal.live_bytes() as i64);
        Ok(Self {
            handle,
            wal,
            app_id,
            flush_rows: config.flush_rows,
            max_buffered_rows: config.flush_rows.saturating_mul(10).max(1_000_000),
            flush_interval: config.flush_interval,
            flush_wanted: Notify::new(),
            flush_lock: Mutex::new(None),
            dedupe: Mutex::new(Dedupe::default()),
            telemetry,
        })
    }

    pub fn handle(&self) -> &Arc<DeltaHandle> {
        &self.handle
    }

    /// Makes the rows of `batch` (in the `metrics` schema) durable and queryable, except those
    /// repeating a stored `(source, series_id, time)` (see [`crate::dedupe`]). Returns after
    /// fsync.
    pub async fn write(&self, batch: RecordBatch) -> Result<WriteOutcome> {
        if batch.schema() != metrics_schema() {
            return Err(Error::SchemaMismatch {
                table: METRICS_TABLE.into(),
                reason: "batch is not in the metrics schema".into(),
            });
        }
        if batch.num_rows() == 0 {
            return Ok(WriteOutcome::default());
        }
        // The duplicate check and the WAL write form one step, so two retries of a batch
        // cannot both pass; the fsync happens after, shared with concurrent writers.
        let dedupe = self.dedupe.lock().await;
        let (written, duplicates, end) = self.check_and_write(dedupe, batch).await?;
        // Durable before acknowledged, also when every row duplicated rows that another push
        // wrote but has not fsynced yet.
        self.wal.sync_to(end).await?;
        if duplicates > 0 {
            self.telemetry.rows_rejected("duplicate", duplicates as u64);
        }
        if written > 0 {
            self.telemetry.rows_written(METRICS_TABLE, written as u64);
        }
        Ok(WriteOutcome {
            written,
            duplicates,
        })
    }

    /// Drops stored points from `batch` and writes the rest to the WAL (not yet fsynced) and
    /// the buffer; returns (rows written, duplicates, WAL position to sync to).
    async fn check_and_write(
        &self,
        mut dedupe: tokio::sync::MutexGuard<'_, Dedupe>,
        batch: RecordBatch,
    ) -> Result<(usize, usize, u64)> {
        let (batch, duplicates, undo) = dedupe.filter(&self.handle, batch).await?;
        let n = batch.num_rows();
        if n == 0 {
            return Ok((0, duplicates, self.wal.written().await));
        }
        let mut total = 0;
        let written = self.append_to_wal(batch, &mut total).await;
        let end = match written {
            Ok(end) => end,
            Err(e) => {
                dedupe.undo(undo);
                return Err(e);
            }
        };
        drop(dedupe);
        self.telemetry.buffered_rows.set(total as i64);
        self.telemetry.wal_bytes.set(self.wal.live_bytes() as i64);
        if total >= self.flush_rows {
            self.flush_wanted.notify_one();
        }
        Ok((n, duplicates, end))
    }

    /// Writes `batch` to the WAL (no fsync) and the buffer; `total` gets the buffered rows.
    async fn append_to_wal(&self, batch: RecordBatch, total: &mut usize) -> Result<u64> {
        let n = batch.num_rows();
        let buffered = self.handle.buffered_rows();
        if buffered + n > self.max_buffered_rows {
            self.flush_wanted.notify_one();
            return Err(Error::Backpressure {
                rows: buffered,
                limit: self.max_buffered_rows,
            });
        }
        let payload = encode_ipc(&batch)?;
        self.wal
            .write(&payload, |seq| *total = self.handle.buffer(seq, batch))
            .await
    }

    /// Commits every row acknowledged so far to Delta, in one commit. Returns the row count.
    pub async fn flush(&self) -> Result<usize> {
        let mut failed = self.flush_lock.lock().await;
        if let Some(attempted) = *failed {
            // The last commit failed from our side, but it may have landed anyway (a timeout
            // after the object store accepted it). Its WAL version says so; never write twice.
            self.handle.refresh().await?;
            if let Some(v) = self.handle.app_version(&self.app_id).await?
                && v >= attempted as i64
            {
                self.handle.drop_buffered_upto(v as u64);
                self.wal.truncate(v as u64).await?;
            }
        }
        let Some(sealed) = self.wal.rotate().await? else {
            return Ok(0);
        };
        let batches = self.handle.buffered_upto(sealed);
        if batches.is_empty() {
            self.wal.truncate(sealed).await?;
            *failed = None;
            return Ok(0);
        }
        let merged = merge_sorted(&batches)?;
        let rows = merged.num_rows();
        *failed = Some(sealed);
        let props = commit_properties(&self.app_id, sealed as i64);
        self.handle
            .commit(
                |t| {
                    t.write(vec![merged])
                        .with_save_mode(SaveMode::Append)
                        .with_partition_columns([COL_DATE])
                        .with_commit_properties(props)
                },
                |buffered| buffered.retain(|(seq, _)| *seq > sealed),
            )
            .await?;
        *failed = None;
        self.wal.truncate(sealed).await?;
        self.telemetry.flushes.inc();
        self.telemetry
            .buffered_rows
            .set(self.handle.buffered_rows() as i64);
        self.telemetry.wal_bytes.set(self.wal.live_bytes() as i64);
        Ok(rows)
    }
}

/// Flushes the metrics buffer on a timer or when it fills, and picks up other processes'
/// commits. Runs until cancelled, then flushes one last time.
#[derive(Debug)]
pub struct Flusher {
    store: Arc<MetricsStore>,
}

impl Flusher {
    pub fn new(store: Arc<MetricsStore>) -> Self {
        Self { store }
    }

    pub async fn run(self, token: CancellationToken) {
        let s = &self.store;
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep(s.flush_interval) => {}
                () = s.flush_wanted.notified() => {}
            }
            self.flush_once().await;
        }
        for attempt in 1..=3 {
            match s.flush().await {
                Ok(rows) => {
                    info!(rows, "final flush done");
                    return;
                }
                Err(e) => {
                    s.telemetry.flush_errors.inc();
                    warn!(attempt, error = %e, "final flush failed; rows stay in the WAL and are replayed at next start");
                }
            }
        }
    }

    async fn flush_once(&self) {
        let s = &self.store;
        match s.flush().await {
            Ok(0) => {
                if let Err(e) = s.handle.refresh().await {
                    warn!(error = %e, "refreshing the metrics table failed");
                }
            }
            Ok(rows) => tracing::debug!(rows, "flushed metrics"),
            Err(e) => {
                s.telemetry.flush_errors.inc();
                warn!(error = %e, "flush failed; will retry");
            }
        }
    }
}
