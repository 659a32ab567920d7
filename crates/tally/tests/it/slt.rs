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

#[tokio::test]
async fn slt_files() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StorageConfig {
            url: dir.path().join("data").display().to_string(),
            ..Default::default()
        },
        &WalConfig::default(),
        Mode::ReadWrite,
        Telemetry::shared(),
    )
    .await
    .unwrap();
    seed(&storage).await;
    let db = Db {
        engine: Arc::new(QueryEngine::new(Arc::new(storage), QueryConfig::default())),
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
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
