//! At most one row per `(source, series_id, time)` among pushed samples.
//!
//! Senders retry: Prometheus resends a remote_write batch whose answer it never saw, a batch
//! job re-pushes after a timeout. A row that repeats a stored `(source, series, time)` is
//! dropped, whatever its value (first write wins, as in Prometheus' own TSDB).
//!
//! Checking every row against Delta would cost a read per push, so this process remembers,
//! per series, a time `since` and the exact times stored after it (the last few accepted,
//! [`RECENT`]). A point newer than `since` is answered from memory: live traffic, and the
//! reordering of concurrent requests, never read storage. Only points at or before `since`
//! (late retries, backfills) are looked up, in the buffer and in Delta, with one bounded scan
//! per push. A series this process has not seen starts at `ceiling`, the newest time stored
//! anywhere in the table when the process first wrote, which Delta's file statistics give
//! without reading data; nothing older than a restart is ever answered from memory.
//!
//! The check and the WAL write happen under one lock (the fsync after it), so two concurrent
//! retries of the same batch cannot both pass. A write that fails is undone here, so its
//! retry is not mistaken for a duplicate.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use tally_model::schema::{COL_DATE, COL_SERIES_ID, COL_SOURCE, COL_TIME, UTC};
use tally_model::time::day_of;

use crate::table::TableView;
use crate::{DeltaHandle, Error, Result};

/// Accepted times kept exactly per series: enough to absorb the reordering of concurrent
/// requests (Prometheus shards, parallel pushers) without reading storage.
const RECENT: usize = 8;

#[derive(Debug, Default)]
pub(crate) struct Dedupe {
    /// Per source, per series: what this process knows of the series' stored times.
    series: HashMap<String, HashMap<i64, Known>>,
    /// No row stored before this process's first write is newer than this; `None` until read.
    ceiling: Option<i64>,
}

/// Every stored row of the series newer than `since` has its time in `recent`.
#[derive(Debug)]
struct Known {
    since: i64,
    /// Ascending, at most [`RECENT`] long; all greater than `since`.
    recent: Vec<i64>,
}

impl Known {
    fn new(since: i64) -> Self {
        Self {
            since,
            recent: Vec::with_capacity(1),
        }
    }

    /// `Some(true)` when `t` is stored, `Some(false)` when it is not, `None` when only
    /// storage can tell.
    fn stored(&self, t: i64) -> Option<bool> {
        (t > self.since).then(|| self.recent.binary_search(&t).is_ok())
    }

    /// Records `t` as stored. Forgetting the oldest time raises `since` to it, which keeps
    /// the invariant: what falls out of `recent` is answered by storage again.
    fn insert(&mut self, t: i64) {
        if t <= self.since {
            return;
        }
        if let Err(at) = self.recent.binary_search(&t) {
            self.recent.insert(at, t);
            if self.recent.len() > RECENT {
                self.since = self.recent.remove(0);
            }
        }
    }

    /// Forgets `t` (a write that failed); `since` stays, which only sends more to storage.
    fn remove(&mut self, t: i64) {
        if let Ok(at) = self.recent.binary_search(&t) {
            self.recent.remove(at);
        }
    }
}

/// Points recorded by [`Dedupe::filter`], to forget if their write fails.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    sources: Vec<String>,
    /// (index into `sources`, series, time)
    points: Vec<(usize, i64, i64)>,
}

impl Undo {
    fn push(&mut self, source: &str, series: i64, time: i64) {
        // A batch rarely holds more than one source.
        let i = match self.sources.iter().position(|s| s == source) {
            Some(i) => i,
            None => {
                self.sources.push(source.to_string());
                self.sources.len() - 1
            }
        };
        self.points.push((i, series, time));
    }
}

/// What a write kept and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub written: usize,
    pub duplicates: usize,
}

type Key<'a> = (&'a str, i64, i64);

struct Columns<'a> {
    source: &'a arrow::array::StringArray,
    series: &'a arrow::array::PrimitiveArray<Int64Type>,
    time: &'a arrow::array::PrimitiveArray<TimestampMicrosecondType>,
}

impl<'a> Columns<'a> {
    fn of(batch: &'a RecordBatch) -> Result<Self> {
        let get = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| Error::InvalidWrite(format!("batch has no {name} column")))
        };
        let bad = |name: &str| Error::InvalidWrite(format!("column {name} has the wrong type"));
        Ok(Self {
            source: get(COL_SOURCE)?
                .as_string_opt::<i32>()
                .ok_or_else(|| bad(COL_SOURCE))?,
            series: get(COL_SERIES_ID)?
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| bad(COL_SERIES_ID))?,
            time: get(COL_TIME)?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| bad(COL_TIME))?,
        })
    }

    fn key(&self, i: usize) -> Key<'a> {
        (
            self.source.value(i),
            self.series.value(i),
            self.time.value(i),
        )
    }
}

impl Dedupe {
    /// The rows of `batch` not stored yet (and not repeated within `batch`), how many were
    /// dropped, and how to forget the kept ones if writing them fails. Records the kept rows
    /// as stored: call it right before the write, under the same lock.
    pub(crate) async fn filter(
        &mut self,
        handle: &DeltaHandle,
        batch: RecordBatch,
    ) -> Result<(RecordBatch, usize, Undo)> {
        let n = batch.num_rows();
        let ceiling = match self.ceiling {
            Some(c) => c,
            None => {
                let c = stored_ceiling(&handle.view().await?, handle).await?;
                self.ceiling = Some(c);
                c
            }
        };
        let cols = Columns::of(&batch)?;
        let mut keep = vec![false; n];
        let mut seen: HashSet<Key> = HashSet::with_capacity(n);
        let mut suspects: Vec<usize> = Vec::new();
        for (i, kept) in keep.iter_mut().enumerate() {
            let key @ (source, series, time) = cols.key(i);
            if !seen.insert(key) {
                continue;
            }
            match self.known(source, series, ceiling).stored(time) {
                Some(true) => {}
                Some(false) => *kept = true,
                None => suspects.push(i),
            }
        }
        if !suspects.is_empty() {
            let stored = stored_among(handle, &cols, &suspects).await?;
            for &i in &suspects {
                keep[i] = !stored.contains(&cols.key(i));
            }
        }
        let mut undo = Undo::default();
        for (i, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            let (source, series, time) = cols.key(i);
            self.known(source, series, ceiling).insert(time);
            undo.push(source, series, time);
        }
        let kept = undo.points.len();
        if kept == n {
            return Ok((batch, 0, undo));
        }
        let filtered = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        Ok((filtered, n - kept, undo))
    }

    /// Forgets the points of a write that failed, so its retry is not taken for a duplicate.
    pub(crate) fn undo(&mut self, undo: Undo) {
        for (i, series, time) in undo.points {
            let source = &undo.sources[i];
            if let Some(k) = self.series.get_mut(source).and_then(|m| m.get_mut(&series)) {
                k.remove(time);
            }
        }
    }

    fn known(&mut self, source: &str, series: i64, ceiling: i64) -> &mut Known {
        if !self.series.contains_key(source) {
            self.series.insert(source.to_string(), HashMap::new());
        }
        self.series
            .get_mut(source)
            .map(|m| m.entry(series).or_insert_with(|| Known::new(ceiling)))
            .expect("inserted above")
    }
}

/// A time no stored row is newer than: the largest `max.time` in Delta's file statistics
/// (rounded up a millisecond, since statistics may be truncated to milliseconds) and the
/// newest buffered row. Falls back to reading the column when a file lacks statistics.
async fn stored_ceiling(view: &TableView, handle: &DeltaHandle) -> Result<i64> {
    let mut ceiling = i64::MIN;
    for b in &view.buffered {
        if let Some(max) = Columns::of(b)?.time.iter().flatten().max() {
            ceiling = ceiling.max(max);
        }
    }
    let Some(table) = &view.table else {
        return Ok(ceiling);
    };
    let snapshot = table
        .snapshot()
        .map_err(|e| Error::delta(handle.name(), e))?;
    let actions = snapshot
        .add_actions_table(true)
        .map_err(|e| Error::delta(handle.name(), e))?;
    if actions.num_rows() == 0 {
        return Ok(ceiling);
    }
    let stats = actions.column_by_name("max.time").and_then(|c| {
        arrow::compute::cast(c, &arrow::datatypes::DataType::Int64)
            .ok()
            .filter(|c| c.null_count() == 0)
    });
    let from_files = match stats {
        Some(max) => arrow::compute::max(max.as_primitive::<Int64Type>()).map(|m| m + 1_000),
        None => {
            let batches = handle
                .scan(view, None, &[COL_TIME], |df| {
                    df.aggregate(
                        vec![],
                        vec![datafusion::functions_aggregate::expr_fn::max(col(COL_TIME))],
                    )
                })
                .await?;
            batches
                .first()
                .filter(|b| b.num_rows() > 0)
                .and_then(|b| {
                    arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).ok()
                })
                .and_then(|c| c.as_primitive::<Int64Type>().iter().flatten().next())
        }
    };
    Ok(from_files.map_or(ceiling, |m| ceiling.max(m)))
}

/// The keys among `rows` of `cols` that are already stored, in the buffer or in Delta. One
/// Delta scan per source, bounded by the rows' series, times and days.
async fn stored_among<'a>(
    handle: &DeltaHandle,
    cols: &Columns<'a>,
    rows: &[usize],
) -> Result<HashSet<Key<'a>>> {
    let wanted: HashSet<Key> = rows.iter().map(|&i| cols.key(i)).collect();
    let lo = wanted.iter().map(|k| k.2).min().unwrap_or(i64::MIN);
    let hi = wanted.iter().map(|k| k.2).max().unwrap_or(i64::MAX);
    let mut by_point: HashMap<(i64, i64), Vec<&'a str>> = HashMap::new();
    for k in &wanted {
        by_point.entry((k.1, k.2)).or_default().push(k.0);
    }
    let mut found: HashSet<Key<'a>> = HashSet::new();
    let mut note = |source: &str, series: i64, time: i64| {
        if let Some(sources) = by_point.get(&(series, time)) {
            for s in sources.iter().filter(|s| **s == source) {
                found.insert((s, series, time));
            }
        }
    };
    // One view: its snapshot and buffer together hold every acknowledged row exactly once,
    // even while a flush moves rows from one to the other.
    let view = handle.view().await?;
    for b in &view.buffered {
        let c = Columns::of(b)?;
        for i in 0..b.num_rows() {
            let t = c.time.value(i);
            if (lo..=hi).contains(&t) {
                note(c.source.value(i), c.series.value(i), t);
            }
        }
    }
    if view.table.is_some() {
        let mut by_source: HashMap<&str, HashSet<i64>> = HashMap::new();
        for k in &wanted {
            by_source.entry(k.0).or_default().insert(k.1);
        }
        let ts = |t: i64| lit(ScalarValue::TimestampMicrosecond(Some(t), Some(UTC.into())));
        let day = |t: i64| lit(ScalarValue::Date32(Some(day_of(t))));
        for (source, series) in by_source {
            let filter = col(COL_SOURCE)
                .eq(lit(source))
                .and(col(COL_DATE).between(day(lo), day(hi)))
                .and(col(COL_TIME).between(ts(lo), ts(hi)))
                .and(col(COL_SERIES_ID).in_list(series.into_iter().map(lit).collect(), false));
            let batches = handle
                .scan(&view, Some(filter), &[COL_SERIES_ID, COL_TIME], Ok)
                .await?;
            for b in batches {
                let series = b.column(0).as_primitive::<Int64Type>();
                let times = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Int64)?;
                let times = times.as_primitive::<Int64Type>();
                for i in 0..b.num_rows() {
                    note(source, series.value(i), times.value(i));
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_times_answer_exactly_above_since() {
        let mut k = Known::new(100);
        assert_eq!(k.stored(100), None, "at or before since: ask storage");
        assert_eq!(k.stored(101), Some(false));
        for t in [105, 103, 104, 101] {
            k.insert(t);
        }
        assert_eq!(k.stored(103), Some(true));
        assert_eq!(k.stored(102), Some(false), "a gap is known to be empty");
        for t in 106..=112 {
            k.insert(t);
        }
        // Eleven times were kept; the three oldest fell out and `since` rose past them.
        assert_eq!(k.recent.len(), RECENT);
        assert_eq!(k.since, 104);
        assert_eq!(k.stored(103), None);
        assert_eq!(k.stored(105), Some(true));
        k.remove(112);
        assert_eq!(k.stored(112), Some(false), "an undone write is not stored");
    }
}
