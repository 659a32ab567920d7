//! Storage behaviour against a real Delta table on a local folder and on `memory://`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{Array, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::prelude::SessionContext;
use tally_model::config::{StorageConfig, WalConfig};
use tally_model::schema::METRICS_TABLE;
use tally_model::telemetry::Telemetry;
use tally_model::{Sample, SampleBatchBuilder};

use crate::{Mode, ReplaceScope, Storage, TableView};

const T0: i64 = 1_704_067_200_000_000; // 2024-01-01T00:00:00Z
const HOUR: i64 = 3_600_000_000;

fn samples(source: &str, n: usize, start: i64, step: i64) -> RecordBatch {
    let mut b = SampleBatchBuilder::new();
    for i in 0..n {
        b.push(Sample {
            time: start + i as i64 * step,
            metric: "requests".into(),
            labels: BTreeMap::from([("host".into(), format!("h{}", i % 3))]),
            value: i as f64,
            source: source.into(),
        });
    }
    b.finish().unwrap()
}

async fn open(dir: &std::path::Path) -> Storage {
    let config = StorageConfig {
        url: dir.join("data").display().to_string(),
        ..Default::default()
    };
    let wal = WalConfig {
        dir: Some(dir.join("wal")),
        ..Default::default()
    };
    Storage::open(&config, &wal, Mode::ReadWrite, Telemetry::shared())
        .await
        .unwrap()
}

/// All rows of a view, as (time, value, source), sorted.
async fn rows(view: &TableView) -> Vec<(i64, f64, String)> {
    let mut batches = view.buffered.clone();
    if let Some(table) = &view.table {
        let ctx = SessionContext::new();
        table.update_datafusion_session(&ctx.state()).unwrap();
        let provider = table.table_provider().await.unwrap();
        ctx.register_table("t", provider).unwrap();
        batches.extend(
            ctx.sql("SELECT * FROM t")
                .await
                .unwrap()
                .collect()
                .await
                .unwrap(),
        );
    }
    let mut out = Vec::new();
    for b in batches {
        let s = b.schema();
        let t = b
            .column(s.index_of("time").unwrap())
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap()
            .clone();
        let v = b
            .column(s.index_of("value").unwrap())
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone();
        let src =
            arrow::compute::cast(b.column(s.index_of("source").unwrap()), &DataType::Utf8).unwrap();
        let src = src.as_any().downcast_ref::<StringArray>().unwrap();
        for i in 0..b.num_rows() {
            out.push((t.value(i), v.value(i), src.value(i).to_string()));
        }
    }
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

#[tokio::test]
async fn push_flush_and_replay_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path()).await;
    let m = storage.metrics().unwrap();
    m.write(samples("push", 10, T0, 1_000_000)).await.unwrap();
    let view = m.handle().view().await.unwrap();
    assert_eq!(
        rows(&view).await.len(),
        10,
        "buffered rows are visible before a flush"
    );

    assert_eq!(m.flush().await.unwrap(), 10);
    let view = m.handle().view().await.unwrap();
    assert!(view.buffered.is_empty());
    assert_eq!(rows(&view).await.len(), 10);

    // Acknowledged but unflushed rows survive a "crash" (drop without flush).
    m.write(samples("push", 5, T0 + HOUR, 1_000_000))
        .await
        .unwrap();
    drop(storage);
    let storage = open(dir.path()).await;
    let view = storage.metrics().unwrap().handle().view().await.unwrap();
    assert_eq!(view.buffered.iter().map(|b| b.num_rows()).sum::<usize>(), 5);
    assert_eq!(rows(&view).await.len(), 15);

    // Flushing the replayed rows, then reopening, must not replay them again.
    storage.metrics().unwrap().flush().await.unwrap();
    drop(storage);
    let storage = open(dir.path()).await;
    let view = storage.metrics().unwrap().handle().view().await.unwrap();
    assert!(view.buffered.is_empty());
    assert_eq!(rows(&view).await.len(), 15);
}

#[tokio::test]
async fn commit_that_landed_but_kept_its_segment_is_not_replayed() {
    // Simulates a crash between the Delta commit and the deletion of the WAL segment.
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path()).await;
    let m = storage.metrics().unwrap();
    m.write(samples("push", 7, T0, 1_000_000)).await.unwrap();
    let wal_dir = dir.path().join("wal");
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    m.flush().await.unwrap();
    drop(storage);
    for (p, bytes) in saved {
        std::fs::write(p, bytes).unwrap();
    }
    let storage = open(dir.path()).await;
    let view = storage.metrics().unwrap().handle().view().await.unwrap();
    assert!(view.buffered.is_empty());
    assert_eq!(rows(&view).await.len(), 7);
}

#[tokio::test]
async fn replace_interval_is_idempotent_and_scoped() {
    let storage = Storage::open(
        &StorageConfig {
            url: "memory://replace-test/".into(),
            ..Default::default()
        },
        &WalConfig {
            dir: Some(tempfile::tempdir().unwrap().keep()),
            ..Default::default()
        },
        Mode::ReadWrite,
        Telemetry::shared(),
    )
    .await
    .unwrap();
    let scope = ReplaceScope::metrics("job_a", T0, T0 + HOUR);
    for _ in 0..2 {
        storage
            .replace(
                METRICS_TABLE,
                &scope,
                vec![samples("job_a", 60, T0, 60_000_000)],
            )
            .await
            .unwrap();
    }
    // Another source and another interval are left alone.
    storage
        .replace(
            METRICS_TABLE,
            &ReplaceScope::metrics("job_b", T0, T0 + HOUR),
            vec![samples("job_b", 3, T0, 60_000_000)],
        )
        .await
        .unwrap();
    storage
        .replace(
            METRICS_TABLE,
            &ReplaceScope::metrics("job_a", T0 + HOUR, T0 + 2 * HOUR),
            vec![samples("job_a", 2, T0 + HOUR, 60_000_000)],
        )
        .await
        .unwrap();
    let view = storage.table(METRICS_TABLE).unwrap().view().await.unwrap();
    let all = rows(&view).await;
    assert_eq!(all.iter().filter(|r| r.2 == "job_a").count(), 62);
    assert_eq!(all.iter().filter(|r| r.2 == "job_b").count(), 3);

    // Re-running an interval with fewer rows removes the ones the source no longer reports.
    storage
        .replace(
            METRICS_TABLE,
            &scope,
            vec![samples("job_a", 10, T0, 60_000_000)],
        )
        .await
        .unwrap();
    storage
        .replace(
            METRICS_TABLE,
            &ReplaceScope::metrics("job_b", T0, T0 + HOUR),
            vec![],
        )
        .await
        .unwrap();
    let all = rows(&storage.table(METRICS_TABLE).unwrap().view().await.unwrap()).await;
    assert_eq!(all.iter().filter(|r| r.2 == "job_a").count(), 12);
    assert_eq!(all.iter().filter(|r| r.2 == "job_b").count(), 0);

    // A row outside the interval is refused and nothing changes.
    let err = storage
        .replace(
            METRICS_TABLE,
            &scope,
            vec![samples("job_a", 2, T0 + HOUR, 1)],
        )
        .await
        .unwrap_err();
    assert!(err.is_user_error(), "{err}");
    let after = rows(&storage.table(METRICS_TABLE).unwrap().view().await.unwrap()).await;
    assert_eq!(after, all);
}

#[tokio::test]
async fn records_tables_are_created_and_evolve() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path()).await;
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let v1 = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("time", ts.clone(), false),
            Field::new("source", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, true),
        ])),
        vec![
            Arc::new(TimestampMicrosecondArray::from(vec![T0, T0 + 1]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec!["stripe", "stripe"])),
            Arc::new(Float64Array::from(vec![1.5, 2.5])),
        ],
    )
    .unwrap();
    storage
        .append("charges", vec![v1], Some("time"))
        .await
        .unwrap();
    let v2 = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("time", ts, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, true),
            Field::new("currency", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(TimestampMicrosecondArray::from(vec![T0 + 2]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec!["stripe"])),
            Arc::new(Float64Array::from(vec![3.0])),
            Arc::new(StringArray::from(vec!["eur"])),
        ],
    )
    .unwrap();
    storage
        .append("charges", vec![v2], Some("time"))
        .await
        .unwrap();
    let tables: BTreeSet<String> = storage.list_tables().await.unwrap().into_iter().collect();
    assert!(
        tables.contains("charges") && tables.contains("metrics"),
        "{tables:?}"
    );
    let view = storage.table("charges").unwrap().view().await.unwrap();
    let table = view.table.unwrap();
    let schema = table.snapshot().unwrap().snapshot().arrow_schema();
    assert!(schema.field_with_name("currency").is_ok());
    let ctx = SessionContext::new();
    table.update_datafusion_session(&ctx.state()).unwrap();
    ctx.register_table("charges", table.table_provider().await.unwrap())
        .unwrap();
    let batches = ctx
        .sql("SELECT count(*) AS n, count(currency) AS c FROM charges")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let text = arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    assert!(text.contains("| 3 | 1 |"), "{text}");
    assert!(storage.table("Bad-Name").is_err());
}

#[tokio::test]
async fn repeated_rows_are_stored_once_from_buffer_delta_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path()).await;
    let m = storage.metrics().unwrap();
    let first = m.write(samples("push", 10, T0, 1_000_000)).await.unwrap();
    assert_eq!((first.written, first.duplicates), (10, 0));

    // A retry while the rows are only in the buffer.
    let again = m.write(samples("push", 10, T0, 1_000_000)).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 10));

    // The same points from another source are other rows.
    let other = m.write(samples("other", 10, T0, 1_000_000)).await.unwrap();
    assert_eq!(other.written, 10);

    // After a flush the check reads Delta; an overlapping retry keeps only what is new,
    // including an out-of-order point older than everything stored.
    m.flush().await.unwrap();
    let overlap = m.write(samples("push", 15, T0, 1_000_000)).await.unwrap();
    assert_eq!((overlap.written, overlap.duplicates), (5, 10));
    let older = m
        .write(samples("push", 1, T0 - HOUR, 1_000_000))
        .await
        .unwrap();
    assert_eq!(older.written, 1, "out-of-order but new");

    // A restarted process knows nothing in memory: Delta statistics and the replayed WAL
    // still stop the repeat, in one batch that also repeats a point within itself.
    drop(storage);
    let storage = open(dir.path()).await;
    let m = storage.metrics().unwrap();
    let mut twice = vec![samples("push", 16, T0, 1_000_000)];
    twice.push(samples("push", 16, T0, 1_000_000));
    let twice = arrow::compute::concat_batches(&twice[0].schema(), &twice).unwrap();
    let after = m.write(twice).await.unwrap();
    assert_eq!((after.written, after.duplicates), (1, 31));

    let view = m.handle().view().await.unwrap();
    let all = rows(&view).await;
    assert_eq!(all.len(), 16 + 1 + 10);
    let distinct: BTreeSet<(i64, String)> = all.iter().map(|(t, _, s)| (*t, s.clone())).collect();
    assert_eq!(distinct.len(), all.len(), "no point stored twice");
}

#[tokio::test]
async fn concurrent_retries_of_one_batch_store_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(open(dir.path()).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = Arc::clone(&storage);
            tokio::spawn(async move {
                s.metrics()
                    .unwrap()
                    .write(samples("push", 50, T0, 1_000_000))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut written = 0;
    let mut duplicates = 0;
    for t in tasks {
        let o = t.await.unwrap();
        written += o.written;
        duplicates += o.duplicates;
    }
    assert_eq!((written, duplicates), (50, 350));
    let view = storage.metrics().unwrap().handle().view().await.unwrap();
    assert_eq!(rows(&view).await.len(), 50);
}

#[tokio::test]
async fn reordered_and_late_points_are_checked_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path()).await;
    let m = storage.metrics().unwrap();
    // One series (host h0: every third point), points arriving out of order.
    let one = |t: i64| samples("push", 1, t, 1);
    for t in [5, 3, 9, 1, 7] {
        assert_eq!(m.write(one(T0 + t)).await.unwrap().written, 1, "t={t}");
    }
    for t in [3, 9] {
        assert_eq!(m.write(one(T0 + t)).await.unwrap().duplicates, 1, "t={t}");
    }
    // Far more newer points than are kept in memory: a late retry of an old one is looked
    // up in storage (buffer, then Delta after a flush) and still found.
    for t in 10..40 {
        m.write(one(T0 + t)).await.unwrap();
    }
    assert_eq!(m.write(one(T0 + 1)).await.unwrap().duplicates, 1);
    m.flush().await.unwrap();
    assert_eq!(m.write(one(T0 + 5)).await.unwrap().duplicates, 1);
    assert_eq!(
        m.write(one(T0 + 2)).await.unwrap().written,
        1,
        "new, only late"
    );
    let view = m.handle().view().await.unwrap();
    assert_eq!(rows(&view).await.len(), 5 + 30 + 1);
}
