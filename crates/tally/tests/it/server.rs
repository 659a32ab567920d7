//! The HTTP API through a real loopback socket: round trips, limits, bad input, auth.

use std::time::Duration;

use arrow::array::{Array, Float64Array, MapArray, StringArray, TimestampMicrosecondArray};
use arrow::record_batch::RecordBatch;
use serde_json::{Value, json};
use tally_model::config::Config;
use tally_model::size::ByteSize;

use crate::support::{InProcess, client, count, import, sql};

/// Three samples with distinct labels, sub-second times, a negative and an infinite value.
fn fixture() -> Value {
    json!([
        {"name": "rows_processed", "value": 1250, "labels": {"env": "prod", "table": "orders"},
         "time": "2024-03-01T12:00:00.250Z", "metric_type": "gauge", "description": "rows"},
        {"name": "rows_processed", "value": -3.5, "labels": {"env": "dev"},
         "time": 1_709_294_400_500i64},
        {"name": "model_accuracy", "value": "+Inf", "time": "2024-03-01T13:00:00+01:00"}
    ])
}

const ORDERED: &str =
    "SELECT time, metric, labels, value, source FROM metrics ORDER BY metric, value";

async fn seeded() -> InProcess {
    let s = InProcess::start(Config::default()).await;
    let resp = crate::support::client()
        .post(format!("{}/api/v1/import?job=nightly", s.url))
        .json(&fixture())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"written": 3, "duplicates": 0})
    );
    s
}

async fn fetch(url: &str, format: &str) -> (String, bytes::Bytes) {
    let resp = client()
        .get(format!("{url}/api/v1/sql"))
        .query(&[("q", ORDERED), ("format", format)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{format}");
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    (ct, resp.bytes().await.unwrap())
}

fn check_batches(batches: &[RecordBatch]) {
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    let b = arrow::compute::concat_batches(&batches[0].schema(), batches).unwrap();
    let time = b
        .column(0)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .unwrap();
    assert_eq!(
        time.values().to_vec(),
        vec![
            1_709_294_400_000_000,
            1_709_294_400_500_000,
            1_709_294_400_250_000
        ]
    );
    let metric = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
    let metric = metric.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(metric.value(0), "model_accuracy");
    let labels = b.column(2).as_any().downcast_ref::<MapArray>().unwrap();
    assert_eq!(labels.value(2).len(), 2, "env and table");
    assert_eq!(labels.value(0).len(), 0);
    let value = b.column(3).as_any().downcast_ref::<Float64Array>().unwrap();
    assert_eq!(value.value(0), f64::INFINITY);
    assert_eq!(value.value(1), -3.5);
    assert_eq!(value.value(2), 1250.0);
}

async fn check_every_format(url: &str) {
    let (ct, body) = fetch(url, "json").await;
    assert_eq!(ct, "application/json");
    let rows: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        rows,
        json!([
            {"time": "2024-03-01T12:00:00Z", "metric": "model_accuracy", "labels": {},
             "value": null, "source": "nightly"},
            {"time": "2024-03-01T12:00:00.500Z", "metric": "rows_processed",
             "labels": {"env": "dev"}, "value": -3.5, "source": "nightly"},
            {"time": "2024-03-01T12:00:00.250Z", "metric": "rows_processed",
             "labels": {"env": "prod", "table": "orders"}, "value": 1250.0, "source": "nightly"},
        ])
    );

    let (ct, body) = fetch(url, "ndjson").await;
    assert_eq!(ct, "application/x-ndjson");
    let lines: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(Value::Array(lines), rows);

    let (ct, body) = fetch(url, "csv").await;
    assert!(ct.starts_with("text/csv"));
    assert_eq!(
        std::str::from_utf8(&body).unwrap(),
        "time,metric,labels,value,source\n\
         2024-03-01T12:00:00Z,model_accuracy,{},inf,nightly\n\
         2024-03-01T12:00:00.500Z,rows_processed,{env: dev},-3.5,nightly\n\
         2024-03-01T12:00:00.250Z,rows_processed,\"{env: prod, table: orders}\",1250.0,nightly\n"
    );

    let (ct, body) = fetch(url, "arrow").await;
    assert_eq!(ct, "application/vnd.apache.arrow.stream");
    let batches: Vec<RecordBatch> =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    check_batches(&batches);

    let (ct, body) = fetch(url, "parquet").await;
    assert_eq!(ct, "application/vnd.apache.parquet");
    let batches: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(body)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    check_batches(&batches);
}

#[tokio::test]
async fn round_trip_in_every_format_buffered_and_flushed() {
    let s = seeded().await;
    // Straight from the buffer, before any flush...
    check_every_format(&s.url).await;
    // ...and identical once the rows are in Delta.
    assert_eq!(s.flush().await, 3);
    check_every_format(&s.url).await;
    // Accept header picks the format when ?format= is absent.
    let resp = client()
        .get(format!("{}/api/v1/sql", s.url))
        .query(&[("q", "SELECT 1 AS one")])
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "one\n1\n");
    // JSON body form of POST.
    let rows: Value = client()
        .post(format!("{}/api/v1/sql", s.url))
        .json(&json!({"sql": "SELECT count(*) AS n FROM metrics WHERE labels['env'] = 'prod'"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rows, json!([{"n": 1}]));
}

#[tokio::test]
async fn catalog_statements_work() {
    let s = seeded().await;
    let tables = sql(&s.url, "SHOW TABLES").await;
    assert!(tables.iter().any(|t| t["table_name"] == "metrics"));
    let cols = sql(&s.url, "DESCRIBE metrics").await;
    let names: Vec<&str> = cols
        .iter()
        .map(|c| c["column_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "time",
            "metric",
            "labels",
            "series_id",
            "value",
            "source",
            "date"
        ]
    );
    let n = count(
        &s.url,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'metrics'",
    )
    .await;
    assert_eq!(n, 7);
    let plan = sql(&s.url, "EXPLAIN SELECT * FROM metrics").await;
    assert!(!plan.is_empty());
    // The fixture's metric_type and description were kept, once per distinct report.
    let meta = sql(
        &s.url,
        "SELECT source, metric, metric_type, description FROM metric_metadata",
    )
    .await;
    assert_eq!(
        meta,
        vec![json!({"source": "nightly", "metric": "rows_processed",
                    "metric_type": "gauge", "description": "rows"})]
    );
    let again = client()
        .post(format!("{}/api/v1/import?job=nightly", s.url))
        .json(&fixture())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        count(&s.url, "SELECT count(*) FROM metric_metadata").await,
        1
    );
}

async fn expect_error(resp: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(resp.status().as_u16(), status);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], kind, "{body}");
    body["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn bad_pushes_are_refused_and_write_nothing() {
    let mut config = Config::default();
    config.server.max_body = ByteSize(2048);
    let s = InProcess::start(config).await;
    let url = format!("{}/api/v1/import", s.url);
    let raw = |body: &'static str| client().post(&url).body(body).send();

    expect_error(
        raw("[{\"name\": \"x\", ").await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    expect_error(
        raw("{\"name\": \"x\", \"value\": 1}").await.unwrap(),
        400,
        "invalid_body",
    )
    .await;
    for (body, needle) in [
        (
            json!([{"name": "ok", "value": 1}, {"value": 1}]),
            "name is missing",
        ),
        (json!([{"name": "x"}]), "value is missing"),
        (json!([{"name": 5, "value": 1}]), "name must be a string"),
        (json!([{"name": "x", "value": "12"}]), "must be a number"),
        (json!([{"name": "x", "value": "nan"}]), "must be a number"),
        (
            json!([{"name": "x", "value": 1, "labels": ["a"]}]),
            "labels must be an object",
        ),
        (
            json!([{"name": "x", "value": 1, "labels": {"a": true}}]),
            "must be a string",
        ),
        (
            json!([{"name": "x", "value": 1, "time": "yesterday"}]),
            "RFC 3339",
        ),
        (
            json!([{"name": "x", "value": 1, "time": 1_700_000_000}]),
            "epoch seconds",
        ),
        (
            json!([{"name": "x", "value": 1, "metric_type": "meter"}]),
            "metric_type",
        ),
        (
            json!([{"name": "x y", "value": 1}]),
            "not a valid metric name",
        ),
    ] {
        let msg = expect_error(import(&s.url, &body).await, 400, "invalid_metrics").await;
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(msg.contains("nothing was written"), "{msg}");
    }
    let big = format!("[{}]", vec![r#"{"name":"x","value":1}"#; 200].join(","));
    let resp = client().post(&url).body(big).send().await.unwrap();
    let msg = expect_error(resp, 413, "body_too_large").await;
    assert!(msg.contains("2048"), "{msg}");
    let resp = client()
        .post(format!("{url}?job=bad%20name"))
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_job").await;

    assert_eq!(count(&s.url, "SELECT count(*) FROM metrics").await, 0);
    // NaN and infinities travel as the strings Prometheus uses.
    let ok = import(
        &s.url,
        &json!([{"name": "a", "value": "NaN"}, {"name": "b", "value": "-Inf"}, {"name": "c", "value": 1e308}]),
    )
    .await;
    assert_eq!(ok.status(), 200);
    let rows = sql(
        &s.url,
        "SELECT metric, isnan(value) AS nan, value < 0 AS neg FROM metrics ORDER BY metric",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            json!({"metric": "a", "nan": true, "neg": false}),
            json!({"metric": "b", "nan": false, "neg": true}),
            json!({"metric": "c", "nan": false, "neg": false}),
        ]
    );
}

#[tokio::test]
async fn refused_sql_forms() {
    let s = InProcess::start(Config::default()).await;
    let post = |q: &'static str| {
        client()
            .post(format!("{}/api/v1/sql", s.url))
            .body(q)
            .send()
    };
    for q in [
        "CREATE TABLE t AS SELECT 1",
        "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO metrics SELECT * FROM metrics",
        "DELETE FROM metrics",
        "UPDATE metrics SET value = 0",
        "DROP TABLE metrics",
        "COPY (SELECT 1) TO '/tmp/tally-copy-test.csv'",
        "SET datafusion.execution.batch_size = 1",
        "SELECT 1; SELECT 2",
        "SELECT * INTO copy_of FROM metrics",
    ] {
        expect_error(post(q).await.unwrap(), 400, "forbidden_statement").await;
    }
    assert!(!std::path::Path::new("/tmp/tally-copy-test.csv").exists());
    for q in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM 'file:///etc/passwd'",
        "SELECT * FROM 'https://example.com/data.csv'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM nope",
        "SELEC 1",
    ] {
        let msg = expect_error(post(q).await.unwrap(), 400, "invalid_query").await;
        assert!(!msg.contains("root:"), "{msg}");
    }
    let resp = client()
        .get(format!("{}/api/v1/sql?q=SELECT%201&format=xml", s.url))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "invalid_format").await;
    let resp = client()
        .get(format!("{}/api/v1/sql", s.url))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "missing_query").await;
    let resp = client()
        .get(format!("{}/nowhere", s.url))
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "not_found").await;
}

#[tokio::test]
async fn query_limits() {
    let mut config = Config::default();
    config.query.max_rows = 10;
    config.query.timeout = Duration::from_millis(300);
    config.query.memory_limit = ByteSize::mib(1);
    let s = InProcess::start(config).await;
    let post = |q: &'static str| {
        client()
            .post(format!("{}/api/v1/sql", s.url))
            .body(q)
            .send()
    };
    // Exactly at the limit is fine; one more row is an error, never a silent cut.
    assert_eq!(
        sql(&s.url, "SELECT * FROM generate_series(1, 10)")
            .await
            .len(),
        10
    );
    expect_error(
        post("SELECT * FROM generate_series(1, 11)").await.unwrap(),
        413,
        "too_many_rows",
    )
    .await;
    expect_error(
        post("SELECT count(*) FROM generate_series(1, 100000000000)")
            .await
            .unwrap(),
        503,
        "query_timeout",
    )
    .await;
    expect_error(
        post("SELECT array_agg(value) FROM generate_series(1, 5000000)")
            .await
            .unwrap(),
        503,
        "resources_exhausted",
    )
    .await;
}

#[tokio::test]
async fn tokens_guard_reads_and_writes() {
    let mut config = Config::default();
    config.auth.read_tokens = vec!["reader".into()];
    config.auth.write_tokens = vec!["writer".into()];
    let s = InProcess::start(config).await;
    let push = |token: Option<&'static str>| {
        let mut r = client()
            .post(format!("{}/api/v1/import", s.url))
            .json(&json!([{"name": "x", "value": 1}]));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let query = |token: Option<&'static str>| {
        let mut r = client()
            .post(format!("{}/api/v1/sql", s.url))
            .body("SELECT count(*) AS n FROM metrics");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let resp = push(None).await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    expect_error(resp, 401, "unauthorized").await;
    expect_error(push(Some("wrong")).await.unwrap(), 401, "unauthorized").await;
    expect_error(push(Some("reader")).await.unwrap(), 403, "forbidden").await;
    expect_error(query(None).await.unwrap(), 401, "unauthorized").await;
    expect_error(query(Some("writer")).await.unwrap(), 403, "forbidden").await;
    assert_eq!(push(Some("writer")).await.unwrap().status(), 200);
    let rows: Value = query(Some("reader")).await.unwrap().json().await.unwrap();
    assert_eq!(rows, json!([{"n": 1}]));
    // remote_write and Pushgateway pushes are writes too.
    for (path, body) in [("/api/v1/write", ""), ("/metrics/job/x", "x 1\n")] {
        let req = || client().post(format!("{}{path}", s.url)).body(body);
        expect_error(req().send().await.unwrap(), 401, "unauthorized").await;
        let resp = req().bearer_auth("reader").send().await.unwrap();
        expect_error(resp, 403, "forbidden").await;
        let resp = req().bearer_auth("writer").send().await.unwrap();
        assert!(![401, 403].contains(&resp.status().as_u16()), "{path}");
    }
    // Health stays open for load balancers.
    let health = client()
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn health_and_self_metrics() {
    let s = seeded().await;
    let _ = sql(&s.url, "SELECT 1").await;
    s.flush().await;
    let health: Value = client()
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let text = client()
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "tally_rows_written_total{table=\"metrics\"} 3",
        "tally_http_requests_total{route=\"/api/v1/import\",status=\"200\"} 1",
        "tally_flushes_total 1",
        "tally_buffered_rows 0",
        "tally_queries_total{outcome=\"ok\"} 1",
        "tally_query_duration_seconds_count 1",
        "tally_wal_bytes",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
}
