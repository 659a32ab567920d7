//! Run history: every run's state in memory for the API, and each finished run as a row of
//! the `_tally_runs` Delta table (queryable as `_tally.runs`), from which watermarks are read
//! back after a restart.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parking_lot::Mutex;
use serde::Serialize;
use tally_model::schema::{UTC, timestamp_type};
use tally_model::time::format_rfc3339;
use tally_storage::Storage;
use tokio::sync::watch;

pub const RUNS_TABLE: &str = "_tally_runs";
/// Runs kept in memory for the API, newest first per job; older ones stay in the table.
const MEMORY_RUNS: usize = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "skipped" => Self::Skipped,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: String,
    pub job: String,
    /// `schedule`, `manual` or `backfill`.
    pub trigger: String,
    pub state: RunState,
    pub attempt: u32,
    #[serde(serialize_with = "ser_time")]
    pub interval_start: i64,
    #[serde(serialize_with = "ser_time")]
    pub interval_end: i64,
    #[serde(serialize_with = "ser_time")]
    pub queued_at: i64,
    #[serde(serialize_with = "ser_opt_time")]
    pub started_at: Option<i64>,
    #[serde(serialize_with = "ser_opt_time")]
    pub finished_at: Option<i64>,
    pub rows_written: u64,
    pub rows_rejected: u64,
    pub error: Option<String>,
    pub log: Vec<String>,
}

impl RunRecord {
    /// A run of `job` over `interval` that has not started.
    pub fn new(
        job: &str,
        interval: (i64, i64),
        trigger: &str,
        state: RunState,
        queued_at: i64,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            job: job.to_string(),
            trigger: trigger.to_string(),
            state,
            attempt: 0,
            interval_start: interval.0,
            interval_end: interval.1,
            queued_at,
            started_at: None,
            finished_at: None,
            rows_written: 0,
            rows_rejected: 0,
            error: None,
            log: Vec::new(),
        }
    }
}

fn ser_time<S: serde::Serializer>(t: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rfc3339(*t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_rfc3339(*t)),
        None => s.serialize_none(),
    }
}

pub fn runs_schema() -> SchemaRef {
    let ts = timestamp_type;
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("job", DataType::Utf8, false),
        Field::new("trigger", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("attempt", DataType::Int64, false),
        Field::new("interval_start", ts(), false),
        Field::new("interval_end", ts(), false),
        Field::new("queued_at", ts(), false),
        Field::new("started_at", ts(), true),
        Field::new("finished_at", ts(), true),
        Field::new("rows_written", DataType::Int64, false),
        Field::new("rows_rejected", DataType::Int64, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("log", DataType::Utf8, false),
    ]))
}

fn to_batch(r: &RunRecord) -> Result<RecordBatch, arrow::error::ArrowError> {
    let ts = |v: Option<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(vec![v]).with_timezone(UTC))
    };
    let s = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v])) };
    let n = |v: i64| -> ArrayRef { Arc::new(Int64Array::from(vec![v])) };
    RecordBatch::try_new(
        runs_schema(),
        vec![
            s(&r.id),
            s(&r.job),
            s(&r.trigger),
            s(r.state.as_str()),
            n(i64::from(r.attempt)),
            ts(Some(r.interval_start)),
            ts(Some(r.interval_end)),
            ts(Some(r.queued_at)),
            ts(r.started_at),
            ts(r.finished_at),
            n(r.rows_written as i64),
            n(r.rows_rejected as i64),
            Arc::new(StringArray::from(vec![r.error.as_deref()])),
            s(&r.log.join("\n")),
        ],
    )
}

fn from_batch(b: &RecordBatch) -> Vec<RunRecord> {
    let col = |name: &str| b.column_by_name(name).cloned();
    let strings = |name: &str| -> Option<StringArray> {
        let c = cast(&col(name)?, &DataType::Utf8).ok()?;
        c.as_any().downcast_ref::<StringArray>().cloned()
    };
    let ints = |name: &str| -> Option<Int64Array> {
        let c = cast(&col(name)?, &DataType::Int64).ok()?;
        c.as_any().downcast_ref::<Int64Array>().cloned()
    };
    let (Some(id), Some(job), Some(trigger), Some(state), Some(error), Some(log)) = (
        strings("id"),
        strings("job"),
        strings("trigger"),
        strings("state"),
        strings("error"),
        strings("log"),
    ) else {
        return Vec::new();
    };
    let (
        Some(attempt),
        Some(start),
        Some(end),
        Some(queued),
        Some(started),
        Some(finished),
        Some(rw),
        Some(rr),
    ) = (
        ints("attempt"),
        ints("interval_start"),
        ints("interval_end"),
        ints("queued_at"),
        ints("started_at"),
        ints("finished_at"),
        ints("rows_written"),
        ints("rows_rejected"),
    )
    else {
        return Vec::new();
    };
    let opt = |a: &Int64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
    (0..b.num_rows())
        .filter_map(|i| {
            Some(RunRecord {
                id: id.value(i).to_string(),
                job: job.value(i).to_string(),
                trigger: trigger.value(i).to_string(),
                state: RunState::parse(state.value(i))?,
                attempt: u32::try_from(attempt.value(i)).unwrap_or(0),
                interval_start: start.value(i),
                interval_end: end.value(i),
                queued_at: queued.value(i),
                started_at: opt(&started, i),
                finished_at: opt(&finished, i),
                rows_written: rw.value(i).max(0) as u64,
                rows_rejected: rr.value(i).max(0) as u64,
                error: (!error.is_null(i)).then(|| error.value(i).to_string()),
                log: log
                    .value(i)
                    .lines()
                    .map(str::to_string)
                    .filter(|l| !l.is_empty())
                    .collect(),
            })
        })
        .collect()
}

#[derive(Debug)]
pub struct RunStore {
    storage: Arc<Storage>,
    /// Newest last.
    runs: Mutex<VecDeque<RunRecord>>,
    version: watch::Sender<u64>,
}

impl RunStore {
    /// Loads the persisted history (newest [`MEMORY_RUNS`] runs) from storage.
    pub async fn load(storage: Arc<Storage>) -> tally_storage::Result<Self> {
        let table = storage.table(RUNS_TABLE)?;
        // `_tally.runs` exists, empty, from the first start on, so dashboards never see
        // "table not found".
        table.ensure(runs_schema(), true).await?;
        let batches = table.read("true").await?;
        let mut runs: Vec<RunRecord> = batches.iter().flat_map(from_batch).collect();
        runs.sort_by_key(|r| (r.queued_at, r.finished_at));
        let skip = runs.len().saturating_sub(MEMORY_RUNS);
        Ok(Self {
            storage,
            runs: Mutex::new(runs.into_iter().skip(skip).collect()),
            version: watch::Sender::new(0),
        })
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Resolves on the next change to any run.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn insert(&self, r: RunRecord) {
        let mut runs = self.runs.lock();
        runs.push_back(r);
        while runs.len() > MEMORY_RUNS {
            match runs.iter().position(|r| r.state.is_terminal()) {
                Some(i) => {
                    runs.remove(i);
                }
                None => break,
            }
        }
        drop(runs);
        self.bump();
    }

    pub fn update(&self, id: &str, f: impl FnOnce(&mut RunRecord)) -> Option<RunRecord> {
        let mut runs = self.runs.lock();
        let r = runs.iter_mut().rev().find(|r| r.id == id)?;
        f(r);
        let out = r.clone();
        drop(runs);
        self.bump();
        Some(out)
    }

    /// Persists a finished run and publishes it. It is published even when persisting fails
    /// (the error is returned): the run did finish, and a run stuck as "running" would block
    /// its interval; after a restart the unrecorded interval is simply due again.
    pub async fn finish(&self, r: RunRecord) -> tally_storage::Result<()> {
        let persisted = match to_batch(&r) {
            Ok(batch) => self
                .storage
                .append(RUNS_TABLE, vec![batch], Some("queued_at"))
                .await
                .map(|_| ()),
            Err(e) => Err(e.into()),
        };
        self.update(&r.id, |m| *m = r.clone());
        persisted
    }

    /// Forgets a run that never finished (abandoned at shutdown), so nothing records its
    /// interval as done and it is due again at the next start.
    pub fn forget(&self, id: &str) {
        self.runs.lock().retain(|r| r.id != id);
        self.bump();
    }

    pub fn get(&self, job: &str, id: &str) -> Option<RunRecord> {
        self.runs
            .lock()
            .iter()
            .rev()
            .find(|r| r.id == id && r.job == job)
            .cloned()
    }

    /// Newest first.
    pub fn list(&self, job: &str, limit: usize) -> Vec<RunRecord> {
        self.runs
            .lock()
            .iter()
            .rev()
            .filter(|r| r.job == job)
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn last(&self, job: &str) -> Option<RunRecord> {
        self.list(job, 1).pop()
    }

    /// End of the newest interval of `job` that reached a final state.
    pub fn watermark(&self, job: &str) -> Option<i64> {
        self.runs
            .lock()
            .iter()
            .filter(|r| r.job == job && r.state.is_terminal())
            .map(|r| r.interval_end)
            .max()
    }

    /// The latest run of `job` for exactly this interval, if it ran or is running.
    pub fn find(&self, job: &str, interval: (i64, i64)) -> Option<RunRecord> {
        self.runs
            .lock()
            .iter()
            .rev()
            .find(|r| r.job == job && (r.interval_start, r.interval_end) == interval)
            .cloned()
    }

    /// The latest state of `job` for exactly this interval.
    pub fn state_of(&self, job: &str, interval: (i64, i64)) -> Option<RunState> {
        self.find(job, interval).map(|r| r.state)
    }

    /// Deletes history finished before `cutoff`; returns the rows deleted.
    pub async fn expire(&self, cutoff: i64) -> tally_storage::Result<u64> {
        use datafusion::logical_expr::{ident, lit};
        use datafusion::scalar::ScalarValue;
        let predicate = ident("finished_at").lt(lit(ScalarValue::TimestampMicrosecond(
            Some(cutoff),
            Some(UTC.into()),
        )));
        let n = self.storage.table(RUNS_TABLE)?.delete(predicate).await?;
        self.runs
            .lock()
            .retain(|r| !r.state.is_terminal() || r.finished_at.is_none_or(|f| f >= cutoff));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_arrow() {
        let r = RunRecord {
            id: "r1".into(),
            job: "j".into(),
            trigger: "schedule".into(),
            state: RunState::Failed,
            attempt: 3,
            interval_start: 1,
            interval_end: 2,
            queued_at: 3,
            started_at: Some(4),
            finished_at: None,
            rows_written: 0,
            rows_rejected: 7,
            error: Some("boom".into()),
            log: vec!["a".into(), "b".into()],
        };
        let back = from_batch(&to_batch(&r).unwrap());
        assert_eq!(back, vec![r]);
    }
}
