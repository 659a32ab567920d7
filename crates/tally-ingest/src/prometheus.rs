//! Kind `prometheus`: pull named PromQL queries over a run's interval from a
//! Prometheus-compatible HTTP API (`/api/v1/query_range`).
//!
//! Evaluation points are aligned to multiples of `step` and lie in `[start, end)`, so
//! consecutive runs neither overlap nor leave gaps, and re-running an interval replaces
//! exactly its own points. Long intervals are split into requests of at most
//! [`MAX_POINTS_PER_REQUEST`] points, under Prometheus' 11,000-points-per-series limit.
//!
//! A series keeps every label; its metric name is its `__name__` when the result has one
//! (a plain selector), else the query's name (aggregations and functions drop `__name__`).
//! Every series also gets `query="<query name>"`, so results of different queries never
//! merge into one series.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tally_model::time::{MICROS_PER_MILLI, MICROS_PER_SEC};
use tally_model::{SampleBatchBuilder, valid_label_name, valid_metric_name};

use crate::exposition::parse_float;
use crate::kinds::{Error, Output, RunContext};
use crate::scrape::{chain, redact};

/// Points per series in one request; Prometheus refuses more than 11,000.
pub const MAX_POINTS_PER_REQUEST: i64 = 10_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    /// Base URL of the server, e.g. `http://prometheus:9090` (paths below it are kept, for
    /// servers behind a prefix).
    pub url: String,
    /// Query name → PromQL. The name becomes the metric name when a result has none.
    pub queries: BTreeMap<String, String>,
    /// Resolution of the pulled series.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub bearer_token: Option<String>,
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// Labels added to every sample (they do not override the result's own).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    #[serde(default)]
    pub password: Option<String>,
}

impl PrometheusConfig {
    /// Problems a job file can have before anything runs.
    pub fn validate(&self) -> Result<(), String> {
        if self.queries.is_empty() {
            return Err("prometheus: queries must name at least one query".into());
        }
        if let Some(bad) = self.queries.keys().find(|n| !valid_metric_name(n)) {
            return Err(format!(
                "prometheus: query name {bad:?} must be a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
            ));
        }
        if self.step < Duration::from_millis(1) {
            return Err("prometheus: step must be at least 1ms".into());
        }
        if self.bearer_token.is_some() && self.basic_auth.is_some() {
            return Err("prometheus: use bearer_token or basic_auth, not both".into());
        }
        if let Some(bad) = self.labels.keys().find(|n| !valid_label_name(n)) {
            return Err(format!("prometheus: invalid label name {bad:?}"));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    warnings: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Debug, Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

/// The evaluation points of `[start, end)` (µs): multiples of `step`, split into windows of
/// at most [`MAX_POINTS_PER_REQUEST`] points, as inclusive `(first, last)` pairs.
pub fn windows(start: i64, end: i64, step: i64) -> Vec<(i64, i64)> {
    let first = start.div_euclid(step) * step + if start.rem_euclid(step) == 0 { 0 } else { step };
    let last = (end - 1).div_euclid(step) * step;
    let mut out = Vec::new();
    let mut from = first;
    while from <= last {
        let to = (from + (MAX_POINTS_PER_REQUEST - 1) * step).min(last);
        out.push((from, to));
        from = to + step;
    }
    out
}

/// Seconds with up to 6 decimals, as the API takes them.
fn api_time(micros: i64) -> String {
    let secs = micros.div_euclid(MICROS_PER_SEC);
    let frac = micros.rem_euclid(MICROS_PER_SEC);
    if frac == 0 {
        secs.to_string()
    } else {
        format!("{secs}.{frac:06}")
    }
}

pub async fn run(c: &PrometheusConfig, ctx: &RunContext) -> Result<Output, Error> {
    let base = c.url.trim_end_matches('/');
    let endpoint = format!("{base}/api/v1/query_range");
    let shown = redact(&endpoint);
    let step = i64::try_from(c.step.as_micros()).unwrap_or(i64::MAX).max(1);
    // Float seconds: the API takes "1.5" where its duration syntax would refuse "1.5s".
    let step_param = c.step.as_secs_f64().to_string();
    let spans = windows(ctx.start, ctx.end, step);
    let mut out = Output::default();
    let mut builder = SampleBatchBuilder::new();
    for (name, promql) in &c.queries {
        let mut series = 0usize;
        let mut points = 0usize;
        for &(from, to) in &spans {
            let form = [
                ("query", promql.clone()),
                ("start", api_time(from)),
                ("end", api_time(to)),
                ("step", step_param.clone()),
            ];
            let mut req = ctx.http.post(&endpoint).form(&form).timeout(ctx.timeout);
            for (k, v) in &c.headers {
                req = req.header(k, v);
            }
            if let Some(t) = &c.bearer_token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = &c.basic_auth {
                req = req.basic_auth(&b.username, b.password.as_ref());
            }
            let http_err = |e: reqwest::Error| Error::Http {
                url: shown.clone(),
                message: format!("query {name}: {}", chain(&e.without_url())),
            };
            let resp =
                tokio_util::future::FutureExt::with_cancellation_token(req.send(), &ctx.cancel)
                    .await
                    .ok_or(Error::Cancelled)?
                    .map_err(http_err)?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(http_err)?;
            let envelope: Option<Envelope> = serde_json::from_slice(&bytes).ok();
            let envelope = match envelope {
                Some(e) if e.status == "success" && status.is_success() => e,
                Some(e) => {
                    return Err(Error::Status {
                        url: shown.clone(),
                        status: status.as_u16(),
                        body: format!(
                            "query {name}: {} {}",
                            e.error_type.as_deref().unwrap_or("error"),
                            e.error.as_deref().unwrap_or("(no message)")
                        ),
                    });
                }
                None => {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]);
                    return Err(if status.is_success() {
                        Error::Decode {
                            url: shown.clone(),
                            message: format!("query {name}: not a Prometheus API answer: {text}"),
                        }
                    } else {
                        Error::Status {
                            url: shown.clone(),
                            status: status.as_u16(),
                            body: format!("query {name}: {text}"),
                        }
                    });
                }
            };
            for w in &envelope.warnings {
                out.log.push(format!("query {name}: warning: {w}"));
            }
            let data = envelope.data.ok_or_else(|| Error::Decode {
                url: shown.clone(),
                message: format!("query {name}: success without data"),
            })?;
            if data.result_type != "matrix" {
                return Err(Error::Decode {
                    url: shown.clone(),
                    message: format!("query {name}: expected a matrix, got {}", data.result_type),
                });
            }
            for s in data.result {
                series += 1;
                let mut labels = c.labels.clone();
                let mut metric = name.clone();
                for (k, v) in s.metric {
                    if k == "__name__" {
                        metric = v;
                    } else if !v.is_empty() {
                        labels.insert(k, v);
                    }
                }
                labels.insert("query".into(), name.clone());
                let series = builder.series(metric, labels, ctx.job.clone());
                for (ts, raw) in s.values {
                    let time = (ts * 1000.0).round() as i64 * MICROS_PER_MILLI;
                    let value = parse_float(&raw).ok_or_else(|| Error::Decode {
                        url: shown.clone(),
                        message: format!("query {name}: value {raw:?} is not a number"),
                    })?;
                    if time < ctx.start || time >= ctx.end {
                        out.rejected += 1;
                        continue;
                    }
                    points += 1;
                    builder.point(series, time, value);
                }
            }
        }
        out.log.push(format!(
            "query {name}: {points} points in {series} series ({} requests)",
            spans.len()
        ));
    }
    out.add_samples(builder, &shown)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_half_open_and_split() {
        let s = MICROS_PER_SEC;
        // [10s, 70s) at 15s: 15, 30, 45, 60.
        assert_eq!(windows(10 * s, 70 * s, 15 * s), vec![(15 * s, 60 * s)]);
        // An aligned start is included, an aligned end is not.
        assert_eq!(windows(0, 60 * s, 15 * s), vec![(0, 45 * s)]);
        assert!(windows(s, 14 * s, 15 * s).is_empty());
        // 25,000 points split into 10,000 + 10,000 + 5,000 without gaps or overlap.
        let w = windows(0, 25_000 * s, s);
        assert_eq!(
            w,
            vec![
                (0, 9_999 * s),
                (10_000 * s, 19_999 * s),
                (20_000 * s, 24_999 * s)
            ]
        );
    }

    use std::sync::Arc;

    use arrow::array::{AsArray, Float64Array};
    use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
    use axum::extract::{Form, State};
    use axum::http::StatusCode;
    use parking_lot::Mutex;
    use tokio_util::sync::CancellationToken;

    type Calls = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../../tests/fixtures/prometheus/api/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// A Prometheus API stand-in: answers by query text, with the documented shapes.
    async fn api(
        State(calls): State<Calls>,
        headers: axum::http::HeaderMap,
        Form(mut p): Form<BTreeMap<String, String>>,
    ) -> (StatusCode, String) {
        for h in ["authorization", "x-scope-orgid"] {
            let v = headers.get(h).map(|v| v.to_str().unwrap().to_string());
            p.insert(h.into(), v.unwrap_or_default());
        }
        calls.lock().push(p.clone());
        let q = p["query"].as_str();
        let start: f64 = p["start"].parse().unwrap();
        match q {
            "specials" => (
                StatusCode::OK,
                format!(
                    r#"{{"status":"success","warnings":["w1"],"data":{{"resultType":"matrix","result":[{{"metric":{{"__name__":"m","a":"1","empty":""}},"values":[[{start},"NaN"],[{},"+Inf"],[{},"-Inf"],[{},"1e-07"]]}},{{"metric":{{"a":"2"}},"values":[[{start},"24655933440"]]}}]}}}}"#,
                    start + 15.0,
                    start + 30.0,
                    start + 45.0
                ),
            ),
            "bad" => (StatusCode::BAD_REQUEST, fixture("error_bad_query.json")),
            "many" => (
                StatusCode::UNPROCESSABLE_ENTITY,
                fixture("error_execution_many_to_many.json"),
            ),
            "slow" => (
                StatusCode::SERVICE_UNAVAILABLE,
                fixture("error_timeout.json"),
            ),
            "proxy" => (StatusCode::BAD_GATEWAY, "<html>bad gateway</html>".into()),
            _ => (StatusCode::OK, fixture("query_range_no_data.json")),
        }
    }

    async fn serve() -> (String, Calls, CancellationToken) {
        let calls = Calls::default();
        let app = axum::Router::new()
            .route("/prefix/api/v1/query_range", axum::routing::post(api))
            .with_state(Arc::clone(&calls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/prefix", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
        });
        (url, calls, stop)
    }

    fn config(url: &str, queries: &[(&str, &str)]) -> PrometheusConfig {
        PrometheusConfig {
            url: url.into(),
            queries: queries
                .iter()
                .map(|(n, q)| (n.to_string(), q.to_string()))
                .collect(),
            step: Duration::from_secs(15),
            headers: BTreeMap::from([("x-scope-orgid".into(), "t1".into())]),
            bearer_token: None,
            basic_auth: Some(BasicAuth {
                username: "u".into(),
                password: Some("p".into()),
            }),
            labels: BTreeMap::from([("env".into(), "test".into())]),
        }
    }

    fn ctx(start: i64, end: i64) -> RunContext {
        RunContext {
            job: "prom".into(),
            start,
            end,
            now: end,
            http: reqwest::Client::new(),
            timeout: Duration::from_secs(5),
            cancel: CancellationToken::new(),
        }
    }

    const T: i64 = 1_795_383_000 * MICROS_PER_SEC;

    #[tokio::test]
    async fn values_labels_and_names_come_through_exactly() {
        let (url, calls, stop) = serve().await;
        let c = config(&url, &[("specials", "specials")]);
        let out = run(&c, &ctx(T, T + 60 * MICROS_PER_SEC)).await.unwrap();
        stop.cancel();
        assert_eq!(out.rows, 5);
        assert!(out.log.iter().any(|l| l.contains("warning: w1")));
        let b = &out.batches[0];
        let values: &Float64Array = b.column(4).as_primitive();
        let times = b.column(0).as_primitive::<TimestampMicrosecondType>();
        let metric = b.column(1).as_string::<i32>();
        // Sorted by metric: the named series `m`, then the one named after its query.
        assert_eq!(metric.value(0), "m");
        assert!(values.value(0).is_nan());
        assert_eq!(values.value(1), f64::INFINITY);
        assert_eq!(values.value(2), f64::NEG_INFINITY);
        assert_eq!(values.value(3), 1e-7);
        assert_eq!(times.value(0), T);
        assert_eq!(times.value(3), T + 45 * MICROS_PER_SEC);
        assert_eq!(metric.value(4), "specials");
        assert_eq!(values.value(4), 24_655_933_440.0);
        let ids = b.column(3).as_primitive::<Int64Type>();
        assert_eq!(
            ids.value(4),
            tally_model::series_id(
                "specials",
                [("a", "2"), ("env", "test"), ("query", "specials")]
            )
        );
        let p = &calls.lock()[0];
        assert_eq!(p["start"], (T / MICROS_PER_SEC).to_string());
        assert_eq!(p["end"], (T / MICROS_PER_SEC + 45).to_string());
        assert_eq!(p["step"], "15");
        assert_eq!(p["authorization"], "Basic dTpw", "u:p");
        assert_eq!(p["x-scope-orgid"], "t1");
    }

    #[tokio::test]
    async fn long_intervals_are_split_under_the_point_limit() {
        let (url, calls, stop) = serve().await;
        let c = config(&url, &[("nothing", "nothing")]);
        // 2 days at 15 s = 11,520 points: two requests, contiguous, none over the limit.
        let out = run(&c, &ctx(T, T + 2 * 86_400 * MICROS_PER_SEC))
            .await
            .unwrap();
        stop.cancel();
        assert_eq!(out.rows, 0);
        let calls = calls.lock();
        assert_eq!(calls.len(), 2);
        let secs = |k: &str, i: usize| calls[i][k].parse::<i64>().unwrap();
        assert_eq!(secs("start", 1), secs("end", 0) + 15);
        for i in 0..2 {
            let points = (secs("end", i) - secs("start", i)) / 15 + 1;
            assert!(points <= 11_000, "{points} points");
        }
    }

    #[tokio::test]
    async fn api_errors_fail_the_run_clearly() {
        let (url, _calls, stop) = serve().await;
        for (q, status, needle) in [
            ("bad", 400, "bad_data invalid parameter"),
            ("many", 422, "execution found duplicate series"),
            ("slow", 503, "timeout query timed out"),
            ("proxy", 502, "bad gateway"),
        ] {
            let c = config(&url, &[("q", q)]);
            let e = run(&c, &ctx(T, T + 60 * MICROS_PER_SEC)).await.unwrap_err();
            let text = e.to_string();
            assert!(
                matches!(e, Error::Status { status: s, .. } if s == status),
                "{text}"
            );
            assert!(text.contains(needle) && text.contains("query q"), "{text}");
        }
        stop.cancel();
        let c = config("http://127.0.0.1:9", &[("q", "up")]);
        let e = run(&c, &ctx(T, T + 60 * MICROS_PER_SEC)).await.unwrap_err();
        assert!(matches!(e, Error::Http { .. }), "{e}");
    }

    #[test]
    fn api_times() {
        assert_eq!(api_time(1_795_383_201_000_000), "1795383201");
        assert_eq!(api_time(1_795_383_201_520_000), "1795383201.520000");
    }
}
