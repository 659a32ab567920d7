//! The real `tally` binary: restarts, `kill -9`, and concurrent pushers and readers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use crate::support::{Tally, count, import, sql};

/// `n` samples of one series starting at `start_ms`, one per second: distinct times, so a
/// doubled row shows up in the distinct count as well as the total.
fn batch(series: &str, start_ms: i64, n: usize) -> Value {
    Value::Array(
        (0..n)
            .map(|i| {
                json!({"name": "pushed", "value": i, "labels": {"series": series},
                       "time": start_ms + i as i64 * 1000})
            })
            .collect(),
    )
}

const T0_MS: i64 = 1_735_689_600_000; // 2025-01-01

async fn totals(url: &str) -> (i64, i64) {
    let rows = sql(
        url,
        "SELECT count(*) AS n, count(DISTINCT (series_id, time)) AS d FROM metrics",
    )
    .await;
    (
        rows[0]["n"].as_i64().unwrap(),
        rows[0]["d"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn data_survives_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]).await;
    assert_eq!(
        import(&tally.url, &batch("a", T0_MS, 100)).await.status(),
        200
    );
    tally.stop().await;
    // The orderly stop flushed to Delta: nothing is left for the WAL to replay.
    let wal: Vec<_> = std::fs::read_dir(dir.path().join("_wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .filter(|p| std::fs::metadata(p).unwrap().len() > 8)
        .collect();
    assert!(
        wal.is_empty(),
        "unflushed segments after a clean stop: {wal:?}"
    );
    let tally = Tally::start(dir.path(), &[]).await;
    assert_eq!(totals(&tally.url).await, (100, 100));
    // Run history exists, empty, even with no job configured.
    assert_eq!(
        count(&tally.url, "SELECT count(*) FROM _tally.runs").await,
        0
    );
    tally.stop().await;
}

#[tokio::test]
async fn kill_9_loses_nothing_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked = 0i64;
    // Round 1: the flusher is idle (1 h), so every row lives only in the WAL when killed.
    // Later rounds flush every 50 ms, so kills land before, during and after Delta commits.
    for (round, interval) in ["1h", "50ms", "50ms", "50ms"].into_iter().enumerate() {
        let env = [("TALLY__WAL__FLUSH_INTERVAL", interval)];
        let tally = Tally::start(dir.path(), &env).await;
        assert_eq!(
            totals(&tally.url).await,
            (acked, acked),
            "after kill before round {round}"
        );
        for i in 0..20 {
            let start = T0_MS + (round as i64 * 1000 + i) * 60_000;
            let resp = import(&tally.url, &batch(&format!("r{round}"), start, 25)).await;
            assert_eq!(resp.status(), 200);
            acked += 25;
        }
        tally.kill9().await;
    }
    let tally = Tally::start(dir.path(), &[]).await;
    assert_eq!(totals(&tally.url).await, (acked, acked));
    tally.stop().await;
    // And once more after a clean stop, when everything has been flushed.
    let tally = Tally::start(dir.path(), &[]).await;
    assert_eq!(totals(&tally.url).await, (acked, acked));
    tally.stop().await;
}

#[tokio::test]
async fn concurrent_pushers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("TALLY__WAL__FLUSH_INTERVAL", "100ms")];
    let tally = Tally::start(dir.path(), &env).await;
    let url = Arc::new(tally.url.clone());
    const PUSHERS: usize = 6;
    const REQUESTS: usize = 30;
    const PER_REQUEST: usize = 20;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in 0..PUSHERS {
        let url = Arc::clone(&url);
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            for r in 0..REQUESTS {
                let start = T0_MS + (r * PER_REQUEST) as i64 * 1000;
                let resp = import(&url, &batch(&format!("p{p}"), start, PER_REQUEST)).await;
                assert_eq!(resp.status(), 200);
            }
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        let url = Arc::clone(&url);
        let done = Arc::clone(&done);
        readers.push(tokio::spawn(async move {
            let mut last = 0;
            while done.load(Ordering::SeqCst) < PUSHERS {
                // Counts only grow: a flush never hides or doubles rows mid-way.
                let (n, d) = totals(&url).await;
                assert_eq!(n, d, "a row was seen twice");
                assert!(n >= last, "count went back from {last} to {n}");
                last = n;
            }
        }));
    }
    for t in tasks.into_iter().chain(readers) {
        t.await.unwrap();
    }
    let expected = (PUSHERS * REQUESTS * PER_REQUEST) as i64;
    assert_eq!(totals(&tally.url).await, (expected, expected));
    assert_eq!(
        count(
            &tally.url,
            "SELECT count(DISTINCT labels['series']) FROM metrics"
        )
        .await,
        PUSHERS as i64
    );
    tally.stop().await;
}
