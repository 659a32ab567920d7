//! Pushgateway-compatible pushes: the real Python `prometheus_client` against the real binary
//! (across a restart), then the protobuf body, compression and refusals.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use tally_model::config::Config;

use crate::support::{InProcess, Tally, assert_error, client, count, sql};

/// Runs one step of a batch job that reports with `prometheus_client`.
fn python_push(gateway: &str, step: &str) {
    const SCRIPT: &str = r#"
import sys
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import push_to_gateway, pushadd_to_gateway, delete_from_gateway

gw, step = sys.argv[1], sys.argv[2]
group = {"instance": "etl-1"}
r = CollectorRegistry()
if step == "push":
    Gauge("batch_rows", "Rows processed", registry=r).set(100)
    Counter("batch_runs", "Runs", registry=r).inc()
    push_to_gateway(gw, job="nightly", grouping_key=group, registry=r)
elif step == "pushadd":
    Gauge("batch_duration_seconds", "Duration", registry=r).set(12.5)
    pushadd_to_gateway(gw, job="nightly", grouping_key=group, registry=r)
elif step == "put":
    Gauge("batch_rows", "Rows processed", registry=r).set(200)
    push_to_gateway(gw, job="nightly", grouping_key=group, registry=r)
elif step == "delete":
    delete_from_gateway(gw, job="nightly", grouping_key=group)
elif step == "readd":
    Gauge("batch_duration_seconds", "Duration", registry=r).set(7)
    pushadd_to_gateway(gw, job="nightly", grouping_key=group, registry=r)
elif step == "slash":
    Gauge("backup_bytes", "Bytes", registry=r).set(4096)
    push_to_gateway(gw, job="backup", grouping_key={"path": "/var/tmp"}, registry=r)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT, gateway, step])
        .env("PROMETHEUS_DISABLE_CREATED_SERIES", "True")
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{step}: {}; ./scripts/test.sh installs prometheus-client",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each push time (µs) → the (metric, value) pairs stored at it for `job`.
async fn pushes(url: &str, job: &str) -> BTreeMap<i64, BTreeSet<(String, String)>> {
    let rows = sql(
        url,
        &format!(
            "SELECT CAST(time AS BIGINT) AS t, metric, value AS v FROM metrics \
             WHERE source = 'pushgateway' AND labels['job'] = '{job}' ORDER BY t"
        ),
    )
    .await;
    let mut out: BTreeMap<i64, BTreeSet<(String, String)>> = BTreeMap::new();
    for r in rows {
        out.entry(r["t"].as_i64().unwrap()).or_default().insert((
            r["metric"].as_str().unwrap().to_string(),
            r["v"].as_f64().unwrap().to_string(),
        ));
    }
    out
}

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test]
async fn python_client_pushes_push_adds_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]).await;
    python_push(&tally.url, "push");
    // Group state survives a restart: the next push-add still sees the first push.
    tally.stop().await;
    let tally = Tally::start(dir.path(), &[]).await;
    let url = tally.url.clone();
    for step in ["pushadd", "put", "delete", "readd", "slash"] {
        python_push(&url, step);
    }

    let nightly = pushes(&url, "nightly").await;
    let times: Vec<i64> = nightly.keys().copied().collect();
    assert_eq!(times.len(), 4, "push, pushadd, put, readd: {nightly:?}");
    let with_push_time = |t: i64, pairs: &[(&str, &str)]| {
        let mut s = set(pairs);
        s.insert(("push_failure_time_seconds".into(), "0".into()));
        s.insert(("push_time_seconds".into(), (t as f64 / 1e6).to_string()));
        s
    };
    assert_eq!(
        nightly[&times[0]],
        with_push_time(
            times[0],
            &[("batch_rows", "100"), ("batch_runs_total", "1")]
        )
    );
    assert_eq!(
        nightly[&times[1]],
        with_push_time(
            times[1],
            &[
                ("batch_rows", "100"),
                ("batch_runs_total", "1"),
                ("batch_duration_seconds", "12.5")
            ]
        ),
        "POST replaces only the families it pushes"
    );
    assert_eq!(
        nightly[&times[2]],
        with_push_time(times[2], &[("batch_rows", "200")]),
        "PUT replaces the group"
    );
    assert_eq!(
        nightly[&times[3]],
        with_push_time(times[3], &[("batch_duration_seconds", "7")]),
        "a group starts empty after DELETE"
    );

    // `/` in a grouping value travels as @base64 and comes back whole.
    let backup = sql(
        &url,
        "SELECT labels['path'] AS path, value FROM metrics \
         WHERE source = 'pushgateway' AND metric = 'backup_bytes'",
    )
    .await;
    assert_eq!(backup.len(), 1);
    assert_eq!(backup[0]["path"], "/var/tmp");
    assert_eq!(backup[0]["value"], 4096.0);

    // Exactly the expected series, with the grouping labels on each.
    let series = sql(
        &url,
        "SELECT DISTINCT metric, labels['job'] AS job, labels['instance'] AS instance \
         FROM metrics WHERE source = 'pushgateway' ORDER BY job, metric",
    )
    .await;
    let got: Vec<(String, String)> = series
        .iter()
        .map(|r| {
            (
                r["job"].as_str().unwrap().to_string(),
                r["metric"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("backup", "backup_bytes"),
        ("backup", "push_failure_time_seconds"),
        ("backup", "push_time_seconds"),
        ("nightly", "batch_duration_seconds"),
        ("nightly", "batch_rows"),
        ("nightly", "batch_runs_total"),
        ("nightly", "push_failure_time_seconds"),
        ("nightly", "push_time_seconds"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
    assert!(
        series
            .iter()
            .filter(|r| r["job"] == "nightly")
            .all(|r| r["instance"] == "etl-1")
    );

    // A refused push (timestamps) is a 400 with the reason, and the group records the failure.
    let resp = client()
        .put(format!("{url}/metrics/job/nightly/instance/etl-1"))
        .body("batch_rows 5 1700000000000\n")
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "pushed metrics must not have timestamps").await;
    let failed = sql(
        &url,
        "SELECT CAST(time AS BIGINT) AS t, value FROM metrics WHERE source = 'pushgateway' \
         AND metric = 'push_failure_time_seconds' AND value > 0",
    )
    .await;
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0]["value"].as_f64().unwrap(),
        failed[0]["t"].as_f64().unwrap() / 1e6
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM metrics WHERE source = 'pushgateway' AND metric = 'batch_rows' \
             AND value = 5"
        )
        .await,
        0
    );
    tally.stop().await;
}

#[tokio::test]
async fn push_bodies_and_refusals() {
    let s = InProcess::start(Config::default()).await;
    let push = |method: reqwest::Method, path: &str| {
        client().request(method, format!("{}/metrics/job/{path}", s.url))
    };
    // The captured protobuf body, with Pushgateway's exact Content-Type.
    let proto = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/prometheus/pushgateway/push_body_protobuf_delimited.bin"
    ))
    .unwrap();
    let resp = push(reqwest::Method::PUT, "loadtest/instance/ci")
        .header(
            "content-type",
            tally_ingest::pushgateway::PROTOBUF_CONTENT_TYPE,
        )
        .body(proto.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics: BTreeSet<String> = sql(
        &s.url,
        "SELECT DISTINCT metric FROM metrics WHERE source = 'pushgateway'",
    )
    .await
    .iter()
    .map(|r| r["metric"].as_str().unwrap().to_string())
    .collect();
    assert!(
        metrics.contains("loadtest_pb_requests_total"),
        "{metrics:?}"
    );
    assert!(metrics.iter().any(|m| m.ends_with("_sum")), "{metrics:?}");

    // The text fixture, gzip-compressed.
    let text = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/prometheus/pushgateway/push_body_text_0.0.4.txt"
    ))
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&text).unwrap();
    let resp = push(reqwest::Method::POST, "loadtest/instance@base64/Y2kvMg")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let n = count(
        &s.url,
        "SELECT count(*) FROM metrics WHERE labels['instance'] = 'ci/2' \
         AND metric = 'loadtest_response_seconds_bucket'",
    )
    .await;
    assert_eq!(n, 4);

    // Reading a group is Pushgateway's job, not Tally's: SQL is the read side.
    let get = push(reqwest::Method::GET, "loadtest").send().await.unwrap();
    assert_error(get, 405, "GET is not allowed").await;

    let del = push(reqwest::Method::DELETE, "never-pushed")
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202, "deleting a missing group is no error");

    // Refusals: status and a readable reason in {"error","message"}.
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            push(reqwest::Method::PUT, "other").body(proto),
            400,
            "text format parsing error",
        ),
        (
            push(reqwest::Method::PUT, "other")
                .body("# TYPE loadtest_users counter\nloadtest_users 1\n"),
            400,
            "is a gauge in group",
        ),
        (
            push(reqwest::Method::PUT, "other").body("x{0bad=\"1\"} 1\n"),
            400,
            "",
        ),
        (
            push(reqwest::Method::PUT, "other/instance").body("x 1\n"),
            400,
            "has no value",
        ),
        (
            push(reqwest::Method::PUT, "job@base64/=").body("x 1\n"),
            400,
            "",
        ),
        (
            client()
                .put(format!("{}/metrics/job@base64/=", s.url))
                .body("x 1\n"),
            400,
            "job name is required",
        ),
        (
            push(reqwest::Method::PUT, "other")
                .header("content-encoding", "br")
                .body("x 1\n"),
            415,
            "Content-Encoding",
        ),
        (
            push(reqwest::Method::PUT, "other").body("x 1 17\n"),
            400,
            "timestamps",
        ),
    ];
    for (req, status, needle) in cases {
        assert_error(req.send().await.unwrap(), status, needle).await;
    }
    assert_eq!(
        count(
            &s.url,
            "SELECT count(*) FROM metrics WHERE labels['job'] = 'other'"
        )
        .await,
        0
    );
}
