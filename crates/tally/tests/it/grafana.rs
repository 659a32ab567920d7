//! The Grafana JSON datasource API over real HTTP, driven by the request bodies the
//! `simpod-json-datasource` plugin sends (`tests/fixtures/grafana/`, from the protocol note),
//! over data with known values.

use std::path::PathBuf;

use serde_json::{Value, json};
use tally_model::config::Config;

use crate::support::{InProcess, assert_error, client, import};

/// 2025-03-02T09:00:00Z, the start of the reference request's range.
const BASE_S: i64 = 1_740_906_000;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> Value {
    let path = repo().join("tests/fixtures/grafana").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn iso(s: i64) -> String {
    chrono::DateTime::from_timestamp(s, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Six hours of minute samples from 09:00: three CPU counters (web2 restarts at 12:00 and
/// counts 30 since), two temperature gauges.
async fn seeded() -> InProcess {
    seeded_with(Config::default()).await
}

async fn seeded_with(mut config: Config) -> InProcess {
    config.query.kpi_dir = repo().join("queries");
    let server = InProcess::start(config).await;
    let mut items = Vec::new();
    for i in 0..360i64 {
        let time = iso(BASE_S + 60 * i);
        let web2 = if i < 180 { i } else { 30 + (i - 180) };
        for (host, region, value) in [
            ("web1", "eu", 0.5 * i as f64),
            ("web2", "eu", web2 as f64),
            ("web.3", "us", 2.0 * i as f64),
        ] {
            let mut labels = json!({"host": host, "region": region, "cpu": "0"});
            if region == "us" {
                labels["zone"] = json!("b");
            }
            items.push(json!({"name": "node_cpu_seconds_total", "value": value,
                              "labels": labels, "time": time}));
        }
        items.push(json!({"name": "temperature", "value": (i % 10) as f64,
                          "labels": {"room": "lab", "region": "eu"}, "time": time}));
        items.push(json!({"name": "temperature", "value": (100 + i % 3) as f64,
                          "labels": {"room": "office", "region": "us"}, "time": time}));
    }
    // A type and description fill `metric_metadata`, a records table for annotations.
    items.push(
        json!({"name": "deploys_total", "value": 1, "metric_type": "counter",
                      "description": "Deploys of the API"}),
    );
    let resp = import(&server.url, &Value::Array(items)).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    // Half the rows in Delta, the rest imported after the flush stays buffered.
    server.flush().await;
    server
}

async fn post(url: &str, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{url}/grafana{path}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_ok(url: &str, path: &str, body: &Value) -> Value {
    let resp = post(url, path, body).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// (labels, times, values) of every data frame answered.
fn frames(answer: &Value) -> Vec<(Value, Vec<i64>, Vec<Value>)> {
    answer
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let fields = f["schema"]["fields"].as_array().unwrap();
            assert_eq!(fields[0], json!({"name": "time", "type": "time"}));
            let times: Vec<i64> = f["data"]["values"][0]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_i64().unwrap())
                .collect();
            assert!(times.windows(2).all(|w| w[0] < w[1]), "times ascending");
            let values = f["data"]["values"][1].as_array().unwrap().clone();
            assert_eq!(times.len(), values.len());
            (fields[1]["labels"].clone(), times, values)
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[tokio::test]
async fn save_and_test_answers_200_on_both_spellings() {
    let server = InProcess::start(Config::default()).await;
    check_health(&server.url, "/grafana").await;
    // The prefix is configurable; the default path is then not served.
    let mut config = Config::default();
    config.grafana.prefix = "/tools/json".into();
    let server = InProcess::start(config).await;
    check_health(&server.url, "/tools/json").await;
    let body = json!({"range": {"from": iso(BASE_S), "to": iso(BASE_S + 60)}, "targets": []});
    let resp = client()
        .post(format!("{}/tools/json/query", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!([]));
    let resp = client()
        .get(format!("{}/grafana", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

async fn check_health(url: &str, prefix: &str) {
    for path in [prefix.to_string(), format!("{prefix}/")] {
        let resp = client()
            .get(format!("{url}{path}"))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn reference_query_rate_by_host_with_adhoc_filter_over_a_reset() {
    let server = seeded().await;
    let answer = post_ok(&server.url, "/query", &fixture("query.json")).await;
    // region=eu (ad hoc) and host in [web1, web2] (payload); web.3 is in us.
    let got = frames(&answer);
    assert_eq!(got.len(), 2, "{answer}");
    for f in answer.as_array().unwrap() {
        assert_eq!(f["schema"]["refId"], "A");
        assert_eq!(f["schema"]["name"], "node_cpu_seconds_total");
    }
    for (labels, times, values) in got {
        assert!(times.len() <= 1080);
        // The 09:00 samples have nothing before them: 359 rates per series.
        assert_eq!(times.len(), 359, "{labels}");
        let host = labels["host"].as_str().unwrap();
        assert_eq!(labels["region"], "eu");
        // web1 counts 0.5 a minute; web2 1 a minute, except the bucket of the 12:00 restart,
        // which counted 30 from zero in that minute.
        let restart_ms = (BASE_S + 180 * 60) * 1000;
        let mut restarts = 0;
        for (t, v) in times.iter().zip(&values) {
            let v = v.as_f64().unwrap();
            match host {
                "web1" => assert!(close(v, 0.5 / 60.0), "{host} at {t}: {v}"),
                "web2" if close(v, 0.5) => {
                    assert!(
                        *t <= restart_ms && restart_ms - t < 60_000,
                        "restart at {t}"
                    );
                    restarts += 1;
                }
                "web2" => assert!(close(v, 1.0 / 60.0), "{host} at {t}: {v}"),
                other => panic!("unexpected host {other}"),
            }
        }
        assert_eq!(restarts, usize::from(host == "web2"));
    }
}

#[tokio::test]
async fn legacy_keys_hidden_targets_and_regex_lists() {
    let server = seeded().await;
    let answer = post_ok(&server.url, "/query", &fixture("query-legacy.json")).await;
    let items = answer.as_array().unwrap();
    // A: a table (legacy `type`), B hidden, C without target, D empty: nothing; E: two series.
    assert_eq!(items.len(), 3, "{answer}");

    let table = &items[0];
    assert_eq!(table["refId"], "A");
    let columns: Vec<&str> = table["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["time", "region", "value"]);
    let rows = table["rows"].as_array().unwrap();
    // 6 h in 30 min buckets, per region; web2 is filtered out by `adhocFilters`.
    assert_eq!(rows.len(), 24);
    let mut by_region = std::collections::BTreeMap::<String, Vec<f64>>::new();
    for r in rows {
        by_region
            .entry(r[1].as_str().unwrap().to_string())
            .or_default()
            .push(r[2].as_f64().unwrap());
    }
    let mut eu = vec![15.0; 12];
    eu[0] = 14.5; // the first sample has nothing before it
    let mut us = vec![60.0; 12];
    us[0] = 58.0;
    assert_eq!(by_region["eu"], eu);
    assert_eq!(by_region["us"], us);

    // E: `(web1|web\.3)` from a builder variable, last value per bucket, SimpleJSON shape.
    let mut hosts = Vec::new();
    for s in &items[1..] {
        assert_eq!(s["refId"], "E");
        let host = s["tags"]["host"].as_str().unwrap().to_string();
        let points = s["datapoints"].as_array().unwrap();
        assert_eq!(points.len(), 12);
        let step = if host == "web1" { 0.5 } else { 2.0 };
        for (k, p) in points.iter().enumerate() {
            assert_eq!(p[0].as_f64().unwrap(), step * (30 * k + 29) as f64);
            assert_eq!(p[1].as_i64().unwrap(), (BASE_S + 1800 * k as i64) * 1000);
        }
        hosts.push(host);
    }
    hosts.sort();
    assert_eq!(hosts, ["web.3", "web1"]);
}

/// Query one target over [09:00, 10:00) in 10-minute buckets.
async fn one(url: &str, target: &str, payload: Value) -> Vec<(Value, Vec<i64>, Vec<Value>)> {
    let body = json!({
        "range": {"from": iso(BASE_S), "to": iso(BASE_S + 3600)},
        "intervalMs": 600_000, "maxDataPoints": 100,
        "targets": [{"refId": "A", "target": target, "payload": payload}],
    });
    frames(&post_ok(url, "/query", &body).await)
}

#[tokio::test]
async fn aggregations_are_exact_and_points_never_exceed_max_data_points() {
    let server = seeded().await;
    let url = &server.url;
    // lab: 0..9 in every 10 minutes; office: 100, 101, 102, 100, ... (10 samples: 1009).
    for (agg, lab) in [
        ("avg", 4.5),
        ("sum", 45.0),
        ("min", 0.0),
        ("max", 9.0),
        ("count", 10.0),
        ("last", 9.0),
    ] {
        let got = one(
            url,
            "temperature",
            json!({"aggregation": agg, "room": "lab"}),
        )
        .await;
        assert_eq!(got.len(), 1, "{agg}");
        let (labels, times, values) = &got[0];
        assert_eq!(labels, &json!({"region": "eu", "room": "lab"}));
        assert_eq!(times.len(), 6);
        for v in values {
            assert_eq!(v.as_f64().unwrap(), lab, "{agg}");
        }
    }
    // Everything in one series: sums add, the average weighs every sample.
    let got = one(
        url,
        "temperature",
        json!({"aggregation": "sum", "group_by": "*"}),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, Value::Null, "one series without labels");
    assert_eq!(got[0].2[0].as_f64().unwrap(), 45.0 + 1009.0);
    let got = one(
        url,
        "temperature",
        json!({"aggregation": "avg", "group_by": ["*"]}),
    )
    .await;
    assert!(close(got[0].2[0].as_f64().unwrap(), 1054.0 / 20.0));
    // Grouped by a label: one series per region.
    let got = one(
        url,
        "temperature",
        json!({"aggregation": "max", "group_by": ["region"]}),
    )
    .await;
    let regions: Vec<&Value> = got.iter().map(|g| &g.0["region"]).collect();
    assert_eq!(regions, [&json!("eu"), &json!("us")]);
    // Counter increase per bucket, summed over the group (web1 + web2 in eu).
    let got = one(
        url,
        "node_cpu_seconds_total",
        json!({"aggregation": "increase", "group_by": "region", "region": "eu"}),
    )
    .await;
    assert_eq!(got.len(), 1);
    let v: Vec<f64> = got[0].2.iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(v, [9.0 * 1.5, 15.0, 15.0, 15.0, 15.0, 15.0]);

    // Few points over six hours: never more than asked, and no sample lost.
    for max in [1, 2, 7, 50, 359] {
        let body = json!({
            "range": {"from": iso(BASE_S), "to": iso(BASE_S + 6 * 3600)},
            "intervalMs": 1000, "maxDataPoints": max,
            "targets": [{"refId": "A", "target": "temperature",
                         "payload": {"aggregation": "count"}}],
        });
        let got = frames(&post_ok(url, "/query", &body).await);
        assert_eq!(got.len(), 2);
        for (labels, times, values) in got {
            assert!(
                times.len() <= max,
                "{max}: {} points for {labels}",
                times.len()
            );
            let total: f64 = values.iter().map(|v| v.as_f64().unwrap()).sum();
            assert_eq!(total, 360.0, "{max}");
        }
    }
}

#[tokio::test]
async fn grouping_happens_before_the_row_limit() {
    let mut config = Config::default();
    config.query.max_rows = 20;
    let server = seeded_with(config).await;
    // Two temperature series in 30-minute buckets over 6 h: 24 series-buckets, 12 per group.
    let body = |payload: Value| {
        json!({"range": {"from": iso(BASE_S), "to": iso(BASE_S + 6 * 3600)},
               "intervalMs": 1_800_000, "maxDataPoints": 100,
               "targets": [{"refId": "A", "target": "temperature", "payload": payload}]})
    };
    let one = frames(&post_ok(&server.url, "/query", &body(json!({"group_by": "*"}))).await);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].1.len(), 12);
    // Without grouping the answer itself has 24 points: the limit is an error, never a cut.
    let resp = post(&server.url, "/query", &body(json!({}))).await;
    assert_error(resp, 413, "more than 20 rows").await;
}

#[tokio::test]
async fn metric_picker_payload_options_variables_and_tags() {
    let server = seeded().await;
    let url = &server.url;
    // Code mode asks with `{}`: metrics, KPIs, raw SQL, annotation sources.
    let list = post_ok(url, "/metrics", &fixture("metrics-code.json")).await;
    let values: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_str().unwrap())
        .collect();
    for want in [
        "node_cpu_seconds_total",
        "temperature",
        "kpi.signup_conversion",
        "kpi.api_success_ratio",
        "__sql",
        "_tally.runs",
        "_tally.failed_runs",
    ] {
        assert!(values.contains(&want), "{want} missing from {values:?}");
    }
    let fields = |list: &Value, metric: &str| -> Vec<String> {
        let entry = list
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["value"] == metric)
            .unwrap();
        entry["payloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert!(p["name"].is_string(), "every payload has a name");
                p["name"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(
        fields(&list, "node_cpu_seconds_total"),
        [
            "aggregation",
            "group_by",
            "cpu",
            "host",
            "region",
            "zone",
            "format"
        ]
    );
    // Builder: region=eu chosen; `zone` (only in us) is gone from that metric's fields.
    let narrowed = post_ok(url, "/metrics", &fixture("metrics-builder.json")).await;
    assert_eq!(
        fields(&narrowed, "node_cpu_seconds_total"),
        ["aggregation", "group_by", "cpu", "host", "region", "format"]
    );

    let options = post_ok(
        url,
        "/metric-payload-options",
        &fixture("metric-payload-options.json"),
    )
    .await;
    assert_eq!(
        options,
        json!([{"label": "web1", "value": "web1"}, {"label": "web2", "value": "web2"}])
    );
    let mut body = fixture("metric-payload-options.json");
    body["name"] = json!("group_by");
    let group = post_ok(url, "/metric-payload-options", &body).await;
    let group: Vec<&str> = group
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["value"].as_str().unwrap())
        .collect();
    assert_eq!(group, ["*", "cpu", "host", "region"]);
    assert_error(
        post(url, "/metric-payload-options", &json!({"metric": "x"})).await,
        400,
        "'name'",
    )
    .await;

    // Query variables.
    let vars = post_ok(url, "/variable", &fixture("variable.json")).await;
    assert_eq!(
        vars,
        json!([{"__text": "web.3", "__value": "web.3"}, {"__text": "web1", "__value": "web1"},
               {"__text": "web2", "__value": "web2"}])
    );
    let vars = post_ok(url, "/variable", &fixture("variable-raw.json")).await;
    assert_eq!(
        vars,
        json!([{"__text": "EU", "__value": "eu"}, {"__text": "US", "__value": "us"}])
    );
    let kpis = post_ok(url, "/variable", &json!({"payload": {"target": "kpis"}})).await;
    assert!(
        kpis.as_array()
            .unwrap()
            .iter()
            .any(|k| k["__value"] == "kpi.signup_conversion")
    );
    assert_error(
        post(
            url,
            "/variable",
            &json!({"payload": {"target": "nonsense("}}),
        )
        .await,
        400,
        "variable query",
    )
    .await;

    // Ad hoc filters: an empty body (older Grafana) lists every label name.
    let resp = client()
        .post(format!("{url}/grafana/tag-keys"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let keys: Value = resp.json().await.unwrap();
    assert_eq!(
        keys,
        json!([{"type": "string", "text": "cpu"}, {"type": "string", "text": "host"},
               {"type": "string", "text": "region"}, {"type": "string", "text": "room"},
               {"type": "string", "text": "zone"}])
    );
    let keys = post_ok(url, "/tag-keys", &fixture("tag-keys.json")).await;
    assert_eq!(keys.as_array().unwrap().len(), 5, "{keys}");
    let mut out_of_range = fixture("tag-keys.json");
    out_of_range["timeRange"] = json!({"from": iso(BASE_S - 7200), "to": iso(BASE_S - 3600)});
    assert_eq!(post_ok(url, "/tag-keys", &out_of_range).await, json!([]));
    // The key's own filter does not narrow its own dropdown; region=eu does.
    let values = post_ok(url, "/tag-values", &fixture("tag-values.json")).await;
    assert_eq!(values, json!([{"text": "web1"}, {"text": "web2"}]));
    assert_error(post(url, "/tag-values", &json!({})).await, 400, "'key'").await;
}

#[tokio::test]
async fn kpi_raw_sql_and_annotation_targets() {
    let server = seeded().await;
    let url = &server.url;
    // Signup conversion inputs for two days; the second day had no sessions.
    let day = 86_400;
    let d0 = BASE_S - 9 * 3600; // 2025-03-02T00:00Z
    let mut items = vec![];
    for (t, v) in [
        (d0 - 3600, 10.0),
        (d0 + 3600, 40.0),
        (d0 + day + 3600, 46.0),
    ] {
        items.push(
            json!({"name": "app_signups_total", "value": v, "time": iso(t),
                          "labels": {"db": "main"}}),
        );
    }
    for (t, v) in [(d0, 600.0), (d0 + day, 0.0)] {
        items.push(json!({"name": "ga4_sessions", "value": v, "time": iso(t),
                          "labels": {"property": "web"}}));
    }
    assert_eq!(import(url, &Value::Array(items)).await.status(), 200);
    let body = json!({
        "range": {"from": iso(d0), "to": iso(d0 + 2 * day)},
        "intervalMs": 60_000, "maxDataPoints": 1000,
        "targets": [{"refId": "K", "target": "kpi.signup_conversion"}],
    });
    let answer = post_ok(url, "/query", &body).await;
    let by_field: std::collections::BTreeMap<String, &Value> = answer
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["schema"]["fields"][1]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                f,
            )
        })
        .collect();
    assert_eq!(
        by_field.keys().collect::<Vec<_>>(),
        ["conversion", "sessions", "signups"]
    );
    let conv = by_field["conversion"];
    assert_eq!(conv["schema"]["refId"], "K");
    assert_eq!(conv["schema"]["fields"][1]["config"]["unit"], "percentunit");
    assert_eq!(
        by_field["signups"]["schema"]["fields"][1]["config"]["unit"],
        "short"
    );
    // Day 1: 30 signups / 600 sessions; day 2: 6 / 0 is no value, not an error.
    assert_eq!(
        conv["data"]["values"],
        json!([[d0 * 1000, (d0 + day) * 1000], [0.05, null]])
    );

    // The same KPI is a SQL view over HTTP.
    let rows = crate::support::sql(
        url,
        "SELECT time, conversion FROM kpi.signup_conversion ORDER BY time",
    )
    .await;
    assert_eq!(rows.len(), 3, "{rows:?}"); // the day before, with the first signup sample
    assert_eq!(rows[1]["conversion"], json!(0.05));

    // Raw SQL with macros: a long result pivots by its string columns.
    let sql = "SELECT $__dateBin(time) AS time, labels['room'] AS room, avg(value) AS temp \
               FROM metrics WHERE metric = 'temperature' AND $__timeFilter(time) GROUP BY 1, 2";
    let body = json!({
        "range": {"from": iso(BASE_S), "to": iso(BASE_S + 3600)},
        "intervalMs": 600_000, "maxDataPoints": 100,
        "targets": [{"refId": "S", "target": "__sql", "payload": {"sql": sql}},
                    {"refId": "T", "target": "__sql",
                     "payload": {"sql": "SELECT metric, count(*) AS n FROM metrics GROUP BY 1 ORDER BY 1"}}],
        "filters": [{"key": "room", "operator": "=", "value": "lab"}],
    });
    let answer = post_ok(url, "/query", &body).await;
    let items = answer.as_array().unwrap();
    // The ad hoc filter on `room` applies to the result's `room` column.
    assert_eq!(items.len(), 2, "{answer}");
    assert_eq!(
        items[0]["schema"]["fields"][1]["labels"],
        json!({"room": "lab"})
    );
    assert_eq!(
        items[0]["data"]["values"][1],
        json!([4.5, 4.5, 4.5, 4.5, 4.5, 4.5])
    );
    // No time column: a table.
    assert_eq!(items[1]["schema"]["refId"], "T");
    assert_eq!(
        items[1]["schema"]["fields"],
        json!([{"name": "metric", "type": "string"}, {"name": "n", "type": "number"}])
    );
    assert_eq!(items[1]["data"]["values"][0][0], "app_signups_total");

    // Errors name the target and are 4xx with a message Grafana shows.
    let bad = |target: Value| json!({"range": {"from": iso(BASE_S), "to": iso(BASE_S + 60)}, "targets": [target]});
    for (target, status, needle) in [
        (
            json!({"refId": "X", "target": "__sql", "payload": {"sql": "DROP TABLE metrics"}}),
            400,
            "query X: DROP",
        ),
        (json!({"refId": "X", "target": "__sql"}), 400, "payload.sql"),
        (
            json!({"refId": "X", "target": "kpi.nope"}),
            404,
            "no KPI named 'nope'",
        ),
        (
            json!({"refId": "X", "target": "temperature", "payload": {"aggregation": "median"}}),
            400,
            "unknown aggregation",
        ),
        (
            json!({"refId": "X", "target": "temperature", "payload": {"format": "xml"}}),
            400,
            "unknown format",
        ),
        (
            json!({"refId": "X", "target": "__sql", "payload": {"sql": "SELECT $__nope"}}),
            400,
            "unknown macro",
        ),
    ] {
        assert_error(post(url, "/query", &bad(target)).await, status, needle).await;
    }
    assert_error(
        post(url, "/query", &json!({"targets": []})).await,
        400,
        "range",
    )
    .await;
    let resp = client()
        .post(format!("{url}/grafana/query"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "not JSON").await;

    // Without a scheduler there is no run history: no annotations, not an error.
    let body = json!({"range": {"from": iso(BASE_S), "to": iso(BASE_S + 60)},
                      "targets": [{"refId": "Anno", "target": "_tally.runs"}]});
    assert_eq!(post_ok(url, "/query", &body).await, json!([]));

    // Annotations from a records table the user names (`metric_metadata`, see `seeded`).
    let now = chrono::Utc::now().timestamp();
    let mut body = fixture("annotation.json");
    body["range"] = json!({"from": iso(now - 3600), "to": iso(now + 3600)});
    let answer = post_ok(url, "/query", &body).await;
    let frame = &answer[0];
    assert_eq!(frame["schema"]["refId"], "Anno");
    let names: Vec<&str> = frame["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["time", "title", "text", "tags"]);
    assert_eq!(frame["schema"]["fields"][0]["type"], "time");
    let v = &frame["data"]["values"];
    assert_eq!(v[1], json!(["deploys_total"]));
    assert_eq!(v[2], json!(["Deploys of the API"]));
    assert_eq!(v[3], json!(["import,counter"]));
}

#[tokio::test]
async fn responses_match_the_openapi_file_where_it_is_right() {
    let server = seeded().await;
    let url = &server.url;
    let mut checks = Vec::new();
    checks.push(json!({"path": "/metrics",
                       "body": post_ok(url, "/metrics", &fixture("metrics-code.json")).await}));
    checks.push(json!({"path": "/metrics",
                       "body": post_ok(url, "/metrics", &fixture("metrics-builder.json")).await}));
    checks.push(json!({"path": "/metric-payload-options",
                       "body": post_ok(url, "/metric-payload-options", &fixture("metric-payload-options.json")).await}));
    checks.push(json!({"path": "/tag-keys",
                       "body": post_ok(url, "/tag-keys", &fixture("tag-keys.json")).await}));
    // Of /query, the spec knows SimpleJSON time series; its table rows are declared as
    // scalars (they are arrays of cells, as its own example shows), and data frames are
    // missing.
    let mut ts = fixture("query.json");
    ts["targets"][0]["payload"]["format"] = json!("timeseries");
    checks.push(json!({"path": "/query", "body": post_ok(url, "/query", &ts).await}));
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.json");
    std::fs::write(&answers, serde_json::to_vec(&checks).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/openapi_check.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(repo().join("tests/fixtures/grafana/openapi.yaml"))
        .arg(&answers)
        .output()
        .expect("python3 runs the OpenAPI check");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 answers valid"));

    // Where the file is wrong (data frames, `__text`/`__value` variables, untyped tag
    // values; see the protocol note), the answers are pinned as snapshots.
    let mut frame_query = fixture("query.json");
    frame_query["range"] = json!({"from": iso(BASE_S), "to": iso(BASE_S + 300)});
    snapshot(
        "query-frames.json",
        &post_ok(url, "/query", &frame_query).await,
    );
    snapshot(
        "query-tables.json",
        &post_ok(url, "/query", &fixture("query-legacy.json")).await,
    );
    snapshot(
        "variable.json",
        &post_ok(url, "/variable", &fixture("variable.json")).await,
    );
    snapshot(
        "tag-values.json",
        &post_ok(url, "/tag-values", &fixture("tag-values.json")).await,
    );
}

/// Compares with `tests/fixtures/grafana/snapshots/<name>`; `TALLY_SNAPSHOT_UPDATE=1` rewrites.
fn snapshot(name: &str, got: &Value) {
    let path = repo().join("tests/fixtures/grafana/snapshots").join(name);
    let text = serde_json::to_string_pretty(got).unwrap() + "\n";
    if std::env::var_os("TALLY_SNAPSHOT_UPDATE").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (TALLY_SNAPSHOT_UPDATE=1 writes it)",
            path.display()
        )
    });
    assert_eq!(text, want, "snapshot {name} differs");
}

/// Every target of a shipped dashboard (panels and annotations).
fn dashboard_targets(d: &Value) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let targets = p["targets"].as_array().unwrap().clone();
        out.push((p["title"].as_str().unwrap().to_string(), targets));
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if a["datasource"]["uid"] == "tally" {
            out.push((
                a["name"].as_str().unwrap().to_string(),
                vec![a["target"].clone()],
            ));
        }
    }
    out
}

#[tokio::test]
async fn shipped_dashboards_name_what_exists_and_default_panels_have_data() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = repo().join("ingest").display().to_string();
    let queries = repo().join("queries").display().to_string();
    let server = crate::support::Tally::start(
        dir.path(),
        &[
            ("TALLY__SCHEDULER__JOBS_DIR", ingest.as_str()),
            ("TALLY__QUERY__KPI_DIR", queries.as_str()),
        ],
    )
    .await;
    let url = server.url.clone();
    // The default job runs at start-up, then every minute; rates and latencies need a second
    // minute (a re-run of the same minute replaces its samples), so wait for the next one
    // while the server is used.
    let mut minutes = 0;
    for _ in 0..150 {
        minutes = crate::support::count(
            &url,
            "SELECT count(DISTINCT interval_start) FROM _tally.runs \
             WHERE job = 'tally_self' AND state = 'succeeded'",
        )
        .await;
        if minutes >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(minutes >= 2, "tally_self did not run in two minutes");

    let list = post_ok(&url, "/metrics", &json!({})).await;
    let known: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_str().unwrap().to_string())
        .collect();
    let now = chrono::Utc::now().timestamp();
    let range = json!({"from": iso(now - 3600), "to": iso(now + 300)});
    let files = [
        "tally-health.json",
        "api-quality.json",
        "business-kpis.json",
    ];
    let mut checked = 0;
    for file in files {
        let path = repo().join("grafana/dashboards").join(file);
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let default_fed = file == "tally-health.json";
        for (title, targets) in dashboard_targets(&d) {
            for t in &targets {
                let name = t["target"].as_str().unwrap();
                if t["refId"] != "Anno" {
                    assert_eq!(t["datasource"]["uid"], "tally", "{file} {title}");
                }
                // SQL targets are checked by running them; everything else must be listed.
                if name != "__sql" {
                    assert!(
                        known.iter().any(|k| k == name),
                        "{file} / {title}: '{name}' does not exist"
                    );
                }
            }
            let body = json!({"range": range, "intervalMs": 60_000, "maxDataPoints": 500,
                              "targets": targets});
            let answer = post_ok(&url, "/query", &body).await;
            checked += 1;
            let is_annotation = targets.iter().any(|t| t["refId"] == "Anno");
            if default_fed && !is_annotation {
                for t in &targets {
                    let ref_id = &t["refId"];
                    // A value that is not null, outside the time column.
                    let has_data = answer.as_array().unwrap().iter().any(|f| {
                        let skip = usize::from(f["schema"]["fields"][0]["type"] == "time");
                        f["schema"]["refId"] == *ref_id
                            && f["data"]["values"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .skip(skip)
                                .any(|col| col.as_array().unwrap().iter().any(|v| !v.is_null()))
                    });
                    assert!(has_data, "{file} / {title} / {ref_id}: no data: {answer}");
                }
            }
        }
    }
    assert!(checked >= 15, "{checked} panels and annotations checked");

    // Job runs as annotation regions.
    let body = json!({"range": range, "targets": [{"refId": "Anno", "target": "_tally.runs"}]});
    let answer = post_ok(&url, "/query", &body).await;
    let titles = answer[0]["data"]["values"][2].as_array().unwrap();
    assert!(titles.len() >= 2, "{answer}");
    assert!(
        titles.iter().all(|t| t == "tally_self: succeeded"),
        "{answer}"
    );
    assert_eq!(answer[0]["schema"]["fields"][1]["name"], "timeEnd");
    server.stop().await;
}

#[tokio::test]
async fn broken_kpi_files_leave_the_others_working() {
    let dir = tempfile::tempdir().unwrap();
    let kpis = crate::cli::kpi_dir_with_mistakes(dir.path());
    let kpis = kpis.display().to_string();
    let server = crate::support::Tally::start(
        &dir.path().join("data"),
        &[
            ("TALLY__QUERY__KPI_DIR", kpis.as_str()),
            ("TALLY__SCHEDULER__ENABLED", "false"),
        ],
    )
    .await;
    let url = server.url.clone();
    let list = post_ok(&url, "/metrics", &json!({})).await;
    let kpis: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["value"].as_str().filter(|v| v.starts_with("kpi.")))
        .collect();
    // Files that do not parse are left out; one that parses but does not plan stays listed
    // and answers with its error.
    assert_eq!(kpis, ["kpi.broken", "kpi.good"]);
    let body = |target: &str| {
        json!({"range": {"from": iso(BASE_S), "to": iso(BASE_S + 600)},
               "targets": [{"refId": "A", "target": target}]})
    };
    assert_eq!(post_ok(&url, "/query", &body("kpi.good")).await, json!([]));
    assert_error(
        post(&url, "/query", &body("kpi.broken")).await,
        400,
        "nosuchcol",
    )
    .await;
    assert_error(
        post(&url, "/query", &body("kpi.syntax")).await,
        404,
        "no KPI named",
    )
    .await;
    server.stop().await;
}
