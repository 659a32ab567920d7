//! Runs the repository's `tests/slt/*.slt` through the production session factory ([`QueryEngine`]), over a
//! seeded store where some rows are committed to Delta and the rest are still buffered.
//!
//! `TALLY_SLT_COMPLETE=1 cargo test --test it slt` rewrites the expected results for review.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use tally_model::config::{QueryConfig, StorageConfig, WalConfig};
use tally_model::telemetry::Telemetry;
use tally_model::{Sample, SampleBatchBuilder};
use tally_query::QueryEngine;
use tally_storage::{Mode, Storage};

const T0: i64 = 1_704_067_200_000_000; // 2024-01-01T00:00:00Z
const MIN: i64 = 60_000_000;

#[derive(Clone)]
struct Db {
    engine: Arc<QueryEngine>,
}

#[async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = SltErr;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltErr> {
        let result = self
            .engine
            .execute(sql)
            .await
            .map_err(|e| SltErr(e.to_string()))?;
        let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(result.stream)
            .await
            .map_err(|e| SltErr(tally_query::Error::from_datafusion(e).to_string()))?;
        let opts = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        for b in &batches {
            let fmts: Vec<ArrayFormatter> = b
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
                .collect();
            for i in 0..b.num_rows() {
                rows.push(fmts.iter().map(|f| f.value(i).to_string()).collect());
            }
        }
        let types = vec![DefaultColumnType::Any; result.schema.fields().len()];
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "tally"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

#[derive(Debug)]
pub struct SltErr(String);

impl std::fmt::Display for SltErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltErr {}

fn sample(metric: &str, labels: &[(&str, &str)], time: i64, value: f64, source: &str) -> Sample {
    Sample {
        time,
        metric: metric.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        value,
        source: source.into(),
    }
}

/// Requests per handler every minute for an hour (counters), and a gauge with a gap.
/// The first half hour is flushed to Delta; the rest stays buffered.
async fn seed(storage: &Storage) {
    let m = storage.metrics().unwrap();
    for half in 0..2 {
        let mut b = SampleBatchBuilder::new();
        for i in (half * 30)..(half * 30 + 30) {
            let t = T0 + i * MIN;
            b.push(sample(
                "http_requests_total",
                &[("handler", "/api"), ("status", "200")],
                t,
                (i * 10) as f64,
                "prom",
            ));
            b.push(sample(
                "http_requests_total",
                &[("handler", "/api"), ("status", "500")],
                t,
                i as f64,
                "prom",
            ));
            b.push(sample(
                "http_requests_total",
                &[("handler", "/login"), ("status", "200")],
                t,
                (i * 2) as f64,
                "prom",
            ));
            if i % 10 != 9 {
                b.push(sample(
                    "temperature",
                    &[("room", "lab")],
                    t,
                    20.0 + (i % 5) as f64,
                    "sensors",
                ));
            }
        }
        m.write(b.finish().unwrap()).await.unwrap();
        if half == 0 {
            m.flush().await.unwrap();
        }
    }
}

/// Inputs of the shipped KPIs (`queries/*.sql`), with the expected values worked out by hand
/// in `tests/slt/kpi/kpis.slt`.
async fn seed_kpis(storage: &Storage) {
    const H: i64 = 60 * MIN;
    const DAY: i64 = 24 * H;
    // 2024-03-01T00:00:00Z
    let d0 = T0 + 60 * DAY;
    let at = |y: i32, mo: u32, d: u32, h: u32| {
        chrono::NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_micros()
    };
    let mut early = Vec::new();
    let mut late = Vec::new();
    // Signups: a counter sampled every 6 h that restarts on day 2, plus a second database.
    for (t, v) in [
        (at(2024, 2, 29, 18), 100.0),
        (at(2024, 3, 1, 0), 110.0),
        (at(2024, 3, 1, 6), 120.0),
        (at(2024, 3, 1, 12), 125.0),
        (at(2024, 3, 1, 18), 130.0),
        (at(2024, 3, 2, 0), 140.0),
        (at(2024, 3, 2, 6), 5.0),
        (at(2024, 3, 2, 12), 15.0),
        (at(2024, 3, 2, 18), 20.0),
        (at(2024, 3, 3, 0), 26.0),
        (at(2024, 3, 3, 12), 30.0),
    ] {
        early.push(sample(
            "app_signups_total",
            &[("db", "main")],
            t,
            v,
            "postgres",
        ));
    }
    early.push(sample(
        "app_signups_total",
        &[("db", "eu")],
        at(2024, 3, 1, 0),
        0.0,
        "postgres",
    ));
    late.push(sample(
        "app_signups_total",
        &[("db", "eu")],
        at(2024, 3, 2, 0),
        4.0,
        "postgres",
    ));
    // Sessions per day and property; day 2 had none (the division-by-zero day).
    for (t, property, v) in [
        (at(2024, 3, 1, 0), "web", 600.0),
        (at(2024, 3, 1, 0), "app", 400.0),
        (at(2024, 3, 2, 0), "web", 0.0),
        (at(2024, 3, 3, 0), "web", 250.0),
    ] {
        late.push(sample(
            "ga4_sessions",
            &[("property", property)],
            t,
            v,
            "ga4",
        ));
    }
    // Requests every minute for two hours from d0: 200s (restarting at 01:30 with 5 counted),
    // 500s, and 503s labelled `status` instead of `code`.
    for i in 0..120i64 {
        let t = d0 + i * MIN;
        let ok = if i < 90 { 10 * i } else { 10 * (i - 90) + 5 };
        let out = if i < 60 { &mut early } else { &mut late };
        out.push(sample(
            "http_requests_total",
            &[("code", "200"), ("handler", "/api")],
            t,
            ok as f64,
            "prom",
        ));
        out.push(sample(
            "http_requests_total",
            &[("code", "500"), ("handler", "/api")],
            t,
            i as f64,
            "prom",
        ));
        out.push(sample(
            "http_requests_total",
            &[("status", "503"), ("handler", "/x")],
            t,
            (2 * i) as f64,
            "prom",
        ));
    }
    // One more series over four months, for the month-over-month KPI (restarts in April).
    for (t, v) in [
        (at(2024, 1, 15, 0), 1000.0),
        (at(2024, 1, 31, 0), 1100.0),
        (at(2024, 2, 10, 0), 1300.0),
        (at(2024, 2, 28, 0), 1400.0),
        (at(2024, 3, 15, 0), 1700.0),
        (at(2024, 4, 2, 0), 50.0),
    ] {
        early.push(sample(
            "http_requests_total",
            &[("code", "200"), ("handler", "/mom")],
            t,
            v,
            "prom",
        ));
    }
    // A latency histogram: instance a in every hour, instance b only slow requests in hour 1.
    let les = ["0.1", "0.5", "1", "+Inf"];
    for (t, inst, counts) in [
        (d0, "a", [0.0, 0.0, 0.0, 0.0]),
        (d0, "b", [0.0, 0.0, 0.0, 0.0]),
        (d0 + 30 * MIN, "a", [50.0, 90.0, 100.0, 100.0]),
        (d0 + 90 * MIN, "a", [60.0, 100.0, 110.0, 110.0]),
        (d0 + 90 * MIN, "b", [0.0, 0.0, 0.0, 100.0]),
        (d0 + 150 * MIN, "a", [160.0, 200.0, 210.0, 210.0]),
    ] {
        for (le, v) in les.iter().zip(counts) {
            let out = if t < d0 + H { &mut early } else { &mut late };
            out.push(sample(
                "http_request_duration_seconds_bucket",
                &[("instance", inst), ("le", le)],
                t,
                v,
                "prom",
            ));
        }
    }
    // Tally's own query-duration histogram: sum and count.
    for (t, sum, count) in [
        (d0, 1.0, 10.0),
        (d0 + 30 * MIN, 3.0, 20.0),
        (d0 + 90 * MIN, 3.5, 30.0),
        (d0 + 150 * MIN, 3.5, 30.0),
    ] {
        early.push(sample(
            "tally_query_duration_seconds_sum",
            &[],
            t,
            sum,
            "self",
        ));
        early.push(sample(
            "tally_query_duration_seconds_count",
            &[],
            t,
            count,
            "self",
        ));
    }
    let m = storage.metrics().unwrap();
    let mut b = SampleBatchBuilder::new();
    early.into_iter().for_each(|s| b.push(s));
    m.write(b.finish().unwrap()).await.unwrap();
    m.flush().await.unwrap();
    let mut b = SampleBatchBuilder::new();
    late.into_iter().for_each(|s| b.push(s));
    m.write(b.finish().unwrap()).await.unwrap();
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs every `.slt` file of `dir` against `engine`.
async fn run_dir(engine: Arc<QueryEngine>, dir: &std::path::Path) {
    let db = Db { engine };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    let complete = std::env::var_os("TALLY_SLT_COMPLETE").is_some();
    for file in files {
        let db = db.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let db = db.clone();
            async move { Ok(db) }
        });
        runner.with_column_validator(|_, _| true);
        if complete {
            runner
                .update_test_file(
                    &file,
                    " ",
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    |_, _| true,
                )
                .await
                .unwrap();
        } else if let Err(e) = runner.run_file_async(&file).await {
            panic!("{}: {}", file.display(), e.display(true));
        }
    }
}

async fn open_store(dir: &std::path::Path) -> Storage {
    Storage::open(
        &StorageConfig {
            url: dir.join("data").display().to_string(),
            ..Default::default()
        },
        &WalConfig::default(),
        Mode::ReadWrite,
        Telemetry::shared(),
    )
    .await
    .unwrap()
}

/// The shipped KPIs, as views over known inputs: `tests/slt/kpi/*.slt`.
#[tokio::test]
async fn slt_kpis() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_store(dir.path()).await;
    seed_kpis(&storage).await;
    let kpis = tally_query::Kpis::load_dir(&repo().join("queries"));
    assert!(kpis.problems.is_empty(), "{:?}", kpis.problems);
    let engine =
        Arc::new(QueryEngine::new(Arc::new(storage), QueryConfig::default()).with_kpis(kpis));
    assert_eq!(engine.check_kpis().await, vec![]);
    run_dir(engine, &repo().join("tests/slt/kpi")).await;
}

#[tokio::test]
async fn slt_files() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open_store(dir.path()).await;
    seed(&storage).await;
    let engine = Arc::new(QueryEngine::new(Arc::new(storage), QueryConfig::default()));
    run_dir(engine, &repo().join("tests/slt")).await;
}
