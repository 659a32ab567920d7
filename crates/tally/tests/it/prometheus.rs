//! Prometheus ingestion against real peers: a real Prometheus remote-writing into Tally and
//! pulled by a `prometheus` job, the captured remote_write bodies, node_exporter scraped by a
//! `scrape` job, and bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tally_model::config::Config;
use tally_model::size::ByteSize;
use tally_model::time::format_rfc3339;
use tokio::process::{Child, Command};

use crate::support::{InProcess, Tally, client, count, sql, tally_cli};

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../../tests/fixtures/prometheus/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn fixture_json(path: &str) -> Value {
    serde_json::from_slice(&fixture(path)).unwrap()
}

/// A port free right now, for servers that cannot report the one they bound.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    async fn start(program: &str, args: &[String], url: String, ready_path: &str) -> Self {
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} is not installed ({e}); ./scripts/test.sh installs it")
            });
        let s = Self { child, url };
        for _ in 0..300 {
            if let Ok(r) = client().get(format!("{}{ready_path}", s.url)).send().await
                && r.status().is_success()
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{program} did not become ready");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn prom_api(prom: &str, path: &str, params: &[(&str, String)]) -> Value {
    let resp = client()
        .post(format!("{prom}{path}"))
        .form(params)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "success", "{v}");
    v["data"]["result"].clone()
}

/// Prometheus JSON `[ts, "value"]` as (µs, value).
fn point(p: &Value) -> (i64, f64) {
    let ts = p[0].as_f64().unwrap();
    let v = p[1].as_str().unwrap().parse::<f64>().unwrap();
    ((ts * 1000.0).round() as i64 * 1000, v)
}

/// `(series_id, time µs, value)` rows of a query returning `s`, `t` and `v`.
async fn series_points(url: &str, query: &str) -> Vec<(i64, i64, f64)> {
    sql(url, query)
        .await
        .iter()
        .map(|r| {
            (
                r["s"].as_i64().unwrap(),
                r["t"].as_i64().unwrap(),
                r["v"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn rfc(secs: i64) -> String {
    format_rfc3339(secs * 1_000_000)
}

#[tokio::test]
async fn real_prometheus_remote_writes_and_is_pulled() {
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let prom = format!("http://127.0.0.1:{prom_port}");
    let exporter_port = free_port();
    let exporter = format!("http://127.0.0.1:{exporter_port}");

    let jobs = dir.path().join("ingest");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(
        jobs.join("prom.toml"),
        r#"kind = "prometheus"
url = "${PROM_URL}"
every = "10s"
enabled = false
step = "1s"
[queries]
up = 'up{job="prometheus"}'
appended = "prometheus_tsdb_head_samples_appended_total"
appended_rate = "rate(prometheus_tsdb_head_samples_appended_total[5s])"
"#,
    )
    .unwrap();
    std::fs::write(
        jobs.join("node.toml"),
        "kind = \"scrape\"\nurl = \"${EXPORTER_URL}/metrics\"\nevery = \"1h\"\nenabled = false\n",
    )
    .unwrap();
    let tally = Tally::start(
        &dir.path().join("data"),
        &[
            ("TALLY__SCHEDULER__JOBS_DIR", jobs.to_str().unwrap()),
            ("PROM_URL", prom.as_str()),
            ("EXPORTER_URL", exporter.as_str()),
        ],
    )
    .await;
    let url = tally.url.clone();

    let node = Server::start(
        "prometheus-node-exporter",
        &[
            format!("--web.listen-address=127.0.0.1:{exporter_port}"),
            "--collector.disable-defaults".into(),
            "--collector.cpu".into(),
            "--collector.meminfo".into(),
            "--collector.loadavg".into(),
        ],
        exporter.clone(),
        "/metrics",
    )
    .await;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: prometheus
    static_configs: [{{targets: ["127.0.0.1:{prom_port}"]}}]
  - job_name: node
    static_configs: [{{targets: ["127.0.0.1:{exporter_port}"]}}]
remote_write:
  - url: {url}/api/v1/write
    queue_config: {{batch_send_deadline: 1s, min_backoff: 100ms, max_backoff: 1s}}
    metadata_config: {{send_interval: 2s}}
"#
        ),
    )
    .unwrap();
    let prometheus = Server::start(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        prom.clone(),
        "/-/ready",
    )
    .await;

    // Let Prometheus collect a little more than one 10 s interval.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let t1 = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus did not collect 25 s of its own samples within 3 minutes"
        );
        let up = prom_api(
            &prom,
            "/api/v1/query",
            &[(
                "query",
                "count_over_time(up{job=\"prometheus\"}[1m])".into(),
            )],
        )
        .await;
        if up[0]["value"][1]
            .as_str()
            .is_some_and(|n| n.parse::<i64>().unwrap() >= 25)
        {
            break tally_model::time::now_micros() / 1_000_000 - 2;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let t1 = t1 - t1 % 10;
    let t0 = t1 - 10;

    // remote_write: every raw sample Prometheus holds for [t0, t1) is in Tally, exactly.
    for metric in ["up", "prometheus_tsdb_head_samples_appended_total"] {
        let raw = prom_api(
            &prom,
            "/api/v1/query",
            &[
                ("query", format!("{metric}{{job=\"prometheus\"}}[15s]")),
                ("time", t1.to_string()),
            ],
        )
        .await;
        // Every series of the metric (2.42 splits some counters by `type`), point by point.
        let mut want: Vec<(i64, i64, f64)> = Vec::new();
        for series in raw.as_array().unwrap() {
            let mut labels: BTreeMap<String, String> =
                serde_json::from_value(series["metric"].clone()).unwrap();
            let name = labels.remove("__name__").unwrap();
            let id =
                tally_model::series_id(&name, labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            want.extend(
                series["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(point)
                    .filter(|(t, _)| (t0 * 1_000_000..t1 * 1_000_000).contains(t))
                    .map(|(t, v)| (id, t, v)),
            );
        }
        want.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert!(want.len() >= 8, "{metric}: {want:?}");
        let query = format!(
            "SELECT series_id AS s, CAST(time AS BIGINT) AS t, value AS v FROM metrics \
             WHERE source = 'remote_write' AND metric = '{metric}' \
             AND labels['job'] = 'prometheus' AND labels['instance'] = '127.0.0.1:{prom_port}' \
             AND time >= '{}' AND time < '{}' ORDER BY s, t",
            rfc(t0),
            rfc(t1)
        );
        // Remote write trails the scrape by up to its batch deadline.
        let mut got: Vec<(i64, i64, f64)> = Vec::new();
        for _ in 0..100 {
            got = series_points(&url, &query).await;
            if got.len() >= want.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, want, "{metric}");
    }
    // Metadata arrives in its own requests.
    for _ in 0..100 {
        let n = count(
            &url,
            "SELECT count(*) FROM metric_metadata WHERE source = 'remote_write' \
             AND metric = 'prometheus_tsdb_head_samples_appended_total' AND metric_type = 'counter'",
        )
        .await;
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM metric_metadata WHERE source = 'remote_write' \
             AND metric = 'prometheus_tsdb_head_samples_appended_total'"
        )
        .await,
        1
    );

    // The pull job: one 10 s interval, compared point by point with query_range.
    let pull = || {
        let (from, to) = (rfc(t0), rfc(t1));
        tally_cli(&[
            "jobs", "trigger", "prom", "--from", &from, "--to", &to, "--wait", "--server", &url,
        ])
    };
    let (ok, _, err) = pull();
    assert!(ok && err.contains("succeeded"), "{err}");
    let mut pulled = 0;
    for (name, promql) in [
        ("up", "up{job=\"prometheus\"}"),
        ("appended", "prometheus_tsdb_head_samples_appended_total"),
        (
            "appended_rate",
            "rate(prometheus_tsdb_head_samples_appended_total[5s])",
        ),
    ] {
        let series = prom_api(
            &prom,
            "/api/v1/query_range",
            &[
                ("query", promql.into()),
                ("start", t0.to_string()),
                ("end", (t1 - 1).to_string()),
                ("step", "1".into()),
            ],
        )
        .await;
        let mut want: Vec<(i64, i64, f64)> = Vec::new();
        for series in series.as_array().unwrap() {
            let mut labels: BTreeMap<String, String> =
                serde_json::from_value(series["metric"].clone()).unwrap();
            // A plain selector keeps its name; the rate is named after its query.
            let metric = labels
                .remove("__name__")
                .unwrap_or_else(|| name.to_string());
            labels.insert("query".into(), name.into());
            let id = tally_model::series_id(
                &metric,
                labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            );
            let values = series["values"].as_array().unwrap();
            assert_eq!(values.len(), 10, "{name}: one point per second");
            want.extend(values.iter().map(point).map(|(t, v)| (id, t, v)));
        }
        want.sort_by(|a, b| a.partial_cmp(b).unwrap());
        pulled += want.len() as i64;
        let mut got = series_points(
            &url,
            &format!(
                "SELECT series_id AS s, CAST(time AS BIGINT) AS t, value AS v FROM metrics \
                 WHERE source = 'prom' AND labels['query'] = '{name}'"
            ),
        )
        .await;
        got.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(got, want, "{name}");
    }
    // Re-running the interval replaces it: nothing doubles.
    let (ok, _, err) = pull();
    assert!(ok, "{err}");
    assert_eq!(
        count(&url, "SELECT count(*) FROM metrics WHERE source = 'prom'").await,
        pulled
    );

    // A scrape job pointed at node_exporter.
    let (ok, _, err) = tally_cli(&["jobs", "trigger", "node", "--wait", "--server", &url]);
    assert!(ok && err.contains("succeeded"), "{err}");
    let n = count(
        &url,
        "SELECT count(*) FROM metrics WHERE source = 'node' AND metric = 'node_load1'",
    )
    .await;
    assert_eq!(n, 1);
    let cpus = count(
        &url,
        "SELECT count(DISTINCT labels['cpu']) FROM metrics \
         WHERE source = 'node' AND metric = 'node_cpu_seconds_total'",
    )
    .await;
    assert!(cpus >= 1);

    drop(prometheus);
    drop(node);
    tally.stop().await;
}

/// The rows of the captured request `name`, as Prometheus sent them (stale markers left out):
/// (series_id, time µs, value).
fn captured_rows(name: &str) -> (BTreeSet<(i64, i64, u64)>, usize) {
    let decoded = fixture_json(&format!("remote_write/{name}.decoded.json"));
    let mut rows = BTreeSet::new();
    let mut stale = 0;
    for ts in decoded["timeseries"].as_array().unwrap() {
        let mut metric = String::new();
        let mut labels = BTreeMap::new();
        for l in ts["labels"].as_array().unwrap() {
            let (k, v) = (l["name"].as_str().unwrap(), l["value"].as_str().unwrap());
            if k == "__name__" {
                metric = v.to_string();
            } else {
                labels.insert(k.to_string(), v.to_string());
            }
        }
        let id = tally_model::series_id(
            &metric,
            labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        for s in ts["samples"].as_array().unwrap() {
            let bits = u64::from_str_radix(
                s["value_bits"].as_str().unwrap().trim_start_matches("0x"),
                16,
            )
            .unwrap();
            if bits == 0x7ff0_0000_0000_0002 {
                stale += 1;
                continue;
            }
            rows.insert((id, s["timestamp"].as_i64().unwrap() * 1000, bits));
        }
    }
    (rows, stale)
}

async fn post_capture(url: &str, name: &str) -> reqwest::Response {
    let headers = fixture_json(&format!("remote_write/{name}.request_headers.json"));
    let mut req = client()
        .post(format!("{url}/api/v1/write"))
        .body(fixture(&format!("remote_write/{name}.snappy.bin")));
    for (k, v) in headers["headers"].as_object().unwrap() {
        if !matches!(k.as_str(), "Host" | "Content-Length") {
            req = req.header(k, v.as_str().unwrap());
        }
    }
    req.send().await.unwrap()
}

async fn stored_remote_write(url: &str) -> BTreeSet<(i64, i64, u64)> {
    sql(
        url,
        "SELECT series_id, CAST(time AS BIGINT) AS t, CAST(value AS VARCHAR) AS v \
         FROM metrics WHERE source = 'remote_write'",
    )
    .await
    .iter()
    .map(|r| {
        let v: f64 = r["v"].as_str().unwrap().parse().unwrap();
        (
            r["series_id"].as_i64().unwrap(),
            r["t"].as_i64().unwrap(),
            v.to_bits(),
        )
    })
    .collect()
}

#[tokio::test]
async fn captured_remote_write_requests_replay_exactly_once() {
    let s = InProcess::start(Config::default()).await;
    let captures = [
        "rw1_first_request",
        "rw1_samples_with_histogram_buckets",
        "rw1_with_stale_markers",
        "rw1_metadata_only",
    ];
    let mut want = BTreeSet::new();
    let mut stale = 0;
    for name in captures {
        let resp = post_capture(&s.url, name).await;
        assert_eq!(resp.status(), 204, "{name}: {}", resp.text().await.unwrap());
        let (rows, n) = captured_rows(name);
        want.extend(rows);
        stale += n;
    }
    assert_eq!(stale, 9, "the capture's 9 stale markers");
    let stored = stored_remote_write(&s.url).await;
    assert_eq!(stored, want);
    assert!(stored.len() > 20);
    // Histogram buckets arrive as ordinary series.
    let buckets = count(
        &s.url,
        "SELECT count(*) FROM metrics WHERE source = 'remote_write' \
         AND metric LIKE '%_bucket' AND labels['le'] IS NOT NULL",
    )
    .await;
    assert!(buckets >= 4, "{buckets}");
    // The metadata-only request: every family with its type, `unknown` when proto3 left it out.
    let meta = fixture_json("remote_write/rw1_metadata_only.decoded.json");
    let families: BTreeSet<&str> = meta["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["metric_family_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        count(
            &s.url,
            "SELECT count(DISTINCT metric) FROM metric_metadata WHERE source = 'remote_write'"
        )
        .await,
        families.len() as i64
    );

    // Prometheus retries what it never saw acknowledged: from the buffer, then from Delta,
    // nothing doubles.
    for round in 0..2 {
        if round == 1 {
            assert!(s.flush().await > 0);
        }
        for name in captures {
            assert_eq!(post_capture(&s.url, name).await.status(), 204);
        }
        assert_eq!(stored_remote_write(&s.url).await, want, "round {round}");
    }
}

fn snappy(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new().compress_vec(raw).unwrap()
}

/// A one-series WriteRequest encoded by hand (field numbers from the spec).
fn write_request(labels: &[(&str, &str)], value: f64, ts_ms: i64) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        let mut n = bytes.len();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(bytes);
    }
    let mut series = Vec::new();
    for (k, v) in labels {
        let mut l = Vec::new();
        field(&mut l, 0x0a, k.as_bytes());
        field(&mut l, 0x12, v.as_bytes());
        field(&mut series, 0x0a, &l);
    }
    let mut sample = vec![0x09];
    sample.extend_from_slice(&value.to_le_bytes());
    sample.push(0x10);
    let mut t = ts_ms as u64;
    while t >= 0x80 {
        sample.push((t as u8) | 0x80);
        t >>= 7;
    }
    sample.push(t as u8);
    field(&mut series, 0x12, &sample);
    let mut req = Vec::new();
    field(&mut req, 0x0a, &series);
    req
}

#[tokio::test]
async fn remote_write_refuses_bad_input_clearly() {
    let mut config = Config::default();
    config.server.max_body = ByteSize(64 * 1024);
    let s = InProcess::start(config).await;
    let send = |body: Vec<u8>, content_type: Option<&'static str>| {
        let url = format!("{}/api/v1/write", s.url);
        async move {
            let mut req = client()
                .post(url)
                .header("content-encoding", "snappy")
                .body(body);
            if let Some(ct) = content_type {
                req = req.header("content-type", ct);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            assert!(
                body["error"].is_string() && body["message"].is_string(),
                "{body}"
            );
            (status, body["message"].as_str().unwrap().to_string())
        }
    };
    const PB: Option<&str> = Some("application/x-protobuf");
    let good = write_request(
        &[("__name__", "ok_metric"), ("job", "x")],
        1.0,
        1_704_067_200_000,
    );
    let compressed = snappy(&good);
    let cases: Vec<(Vec<u8>, Option<&str>, u16, &str)> = vec![
        (
            compressed[..compressed.len() - 4].to_vec(),
            PB,
            400,
            "snappy",
        ),
        (good.clone(), PB, 400, "snappy"),
        (snappy(&[0x0a, 0x10, 0x0a]), PB, 400, "protobuf"),
        (
            compressed.clone(),
            Some("application/json"),
            415,
            "Content-Type",
        ),
        (compressed.clone(), None, 415, "Content-Type"),
        (
            compressed.clone(),
            Some("application/x-protobuf;proto=io.prometheus.write.v2.Request"),
            415,
            "remote write 1.0",
        ),
        (
            snappy(&write_request(&[("__name__", "bad-name")], 1.0, 1)),
            PB,
            400,
            "invalid metric name",
        ),
        (
            snappy(&write_request(&[("__name__", "m"), ("0bad", "v")], 1.0, 1)),
            PB,
            400,
            "invalid label name",
        ),
        (
            snappy(&write_request(&[("job", "x")], 1.0, 1)),
            PB,
            400,
            "no __name__",
        ),
        (vec![0u8; 100 * 1024], PB, 413, "limit"),
        (snappy(&vec![0u8; 600 * 1024]), PB, 413, "limit"),
    ];
    for (body, ct, status, needle) in cases {
        let (got, message) = send(body, ct).await;
        assert_eq!(got, status, "{needle}: {message}");
        assert!(
            message.contains(needle),
            "{message} should mention {needle}"
        );
    }
    assert_eq!(count(&s.url, "SELECT count(*) FROM metrics").await, 0);
    // And a good request still works afterwards; a stale marker alone stores nothing.
    assert_eq!(send_ok(&s.url, compressed).await, 204);
    let stale = snappy(&write_request(
        &[("__name__", "ok_metric"), ("job", "x")],
        f64::from_bits(0x7ff0_0000_0000_0002),
        1_704_067_201_000,
    ));
    assert_eq!(send_ok(&s.url, stale).await, 204);
    assert_eq!(count(&s.url, "SELECT count(*) FROM metrics").await, 1);
}

async fn send_ok(url: &str, body: Vec<u8>) -> u16 {
    client()
        .post(format!("{url}/api/v1/write"))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "snappy")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}
