//! `POST /api/v1/import`: a batch job's numbers in one JSON call.
//!
//! Body: `[{"name", "value", "labels"?, "time"?, "metric_type"?, "description"?, "job"?}]`.
//! The whole request is validated before anything is written; the answer comes once the rows
//! are durable in the WAL.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_model::time::{MAX_MICROS, MICROS_PER_MILLI, MIN_MICROS, now_micros, parse_rfc3339};
use tally_model::{Sample, SampleBatchBuilder, valid_label_name, valid_metric_name};
use tally_storage::{MetricMetadata, WriteOutcome};

use crate::routes::sql::body_error;
use crate::{ApiError, AppState};

/// Source of imported rows when neither `?job=` nor `"job"` names one.
const DEFAULT_SOURCE: &str = "import";
const METRIC_TYPES: [&str; 9] = [
    "counter",
    "gauge",
    "histogram",
    "summary",
    "untyped",
    "unknown",
    "info",
    "stateset",
    "gaugehistogram",
];
/// Epoch milliseconds below this (early 1973) are almost surely epoch seconds sent by mistake.
const SECONDS_LOOK_ALIKE: i64 = 100_000_000_000;
/// Errors listed in one response before the rest are counted only.
const MAX_LISTED_ERRORS: usize = 20;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/import", post(import))
}

#[derive(Debug, Default, Deserialize)]
struct Params {
    job: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    name: Option<Value>,
    value: Option<Value>,
    labels: Option<Value>,
    time: Option<Value>,
    metric_type: Option<Value>,
    description: Option<Value>,
    job: Option<Value>,
}

fn valid_source(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

/// JSON has no NaN or infinities; they come as the strings Prometheus uses.
fn parse_value(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| format!("value {n} is not representable as a float")),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "+Inf" | "Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            _ => Err(format!(
                "value must be a number (or \"NaN\", \"+Inf\", \"-Inf\"), got the string {s:?}"
            )),
        },
        other => Err(format!("value must be a number, got {}", kind(other))),
    }
}

fn parse_time(v: &Value) -> Result<i64, String> {
    let micros = match v {
        Value::Number(n) => {
            let ms = n
                .as_i64()
                .ok_or_else(|| format!("time {n} must be whole epoch milliseconds"))?;
            if (0..SECONDS_LOOK_ALIKE).contains(&ms) {
                return Err(format!(
                    "time {ms} looks like epoch seconds; send epoch milliseconds or RFC 3339"
                ));
            }
            ms.checked_mul(MICROS_PER_MILLI)
                .ok_or_else(|| format!("time {n} is out of range"))?
        }
        Value::String(s) => parse_rfc3339(s)?,
        other => {
            return Err(format!(
                "time must be an RFC 3339 string or epoch milliseconds, got {}",
                kind(other)
            ));
        }
    };
    if !(MIN_MICROS..=MAX_MICROS).contains(&micros) {
        return Err(format!(
            "time {v} is outside 1970..9999 (epoch milliseconds expected, not seconds or nanoseconds)"
        ));
    }
    Ok(micros)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_item(
    item: Value,
    default_source: &str,
    now: i64,
) -> Result<(Sample, Option<MetricMetadata>), String> {
    let item: Item = serde_json::from_value(item).map_err(|e| e.to_string())?;
    let name = match item.name {
        Some(Value::String(s)) if valid_metric_name(&s) => s,
        Some(Value::String(s)) => {
            return Err(format!(
                "name {s:?} is not a valid metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
            ));
        }
        Some(other) => return Err(format!("name must be a string, got {}", kind(&other))),
        None => return Err("name is missing".into()),
    };
    let value = parse_value(item.value.as_ref().ok_or("value is missing")?)?;
    let mut labels = BTreeMap::new();
    match item.labels {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                if !valid_label_name(&k) || k.starts_with("__") {
                    return Err(format!(
                        "label name {k:?} is not valid ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
                    ));
                }
                match v {
                    // An empty label value means "no such label", as in Prometheus.
                    Value::String(s) if s.is_empty() => {}
                    Value::String(s) => {
                        labels.insert(k, s);
                    }
                    other => {
                        return Err(format!(
                            "label {k:?} must be a string, got {}",
                            kind(&other)
                        ));
                    }
                }
            }
        }
        Some(other) => return Err(format!("labels must be an object, got {}", kind(&other))),
    }
    let time = match item.time {
        None | Some(Value::Null) => now,
        Some(v) => parse_time(&v)?,
    };
    let metric_type = match item.metric_type {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if METRIC_TYPES.contains(&t.as_str()) => Some(t),
        Some(other) => {
            return Err(format!(
                "metric_type must be one of {}, got {other}",
                METRIC_TYPES.join(", ")
            ));
        }
    };
    let description = match item.description {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d),
        Some(other) => {
            return Err(format!(
                "description must be a string, got {}",
                kind(&other)
            ));
        }
    };
    let source = match item.job {
        None | Some(Value::Null) => default_source.to_string(),
        Some(Value::String(s)) if valid_source(&s) => s,
        Some(other) => {
            return Err(format!(
                "job must be a name of letters, digits, '_', '-', '.', ':', got {other}"
            ));
        }
    };
    let metadata = (metric_type.is_some() || description.is_some()).then(|| MetricMetadata {
        source: source.clone(),
        metric: name.clone(),
        metric_type,
        description,
    });
    Ok((
        Sample {
            time,
            metric: name,
            labels,
            value,
            source,
        },
        metadata,
    ))
}

async fn import(
    State(state): State<AppState>,
    Query(params): Query<Params>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body.map_err(|e| body_error(&state, e))?;
    let reject = |reason: &str, rows: u64, e: ApiError| {
        state.telemetry.rows_rejected(reason, rows);
        e
    };
    let default_source = match params.job.as_deref() {
        Some(j) if valid_source(j) => j.to_string(),
        Some(j) => {
            return Err(reject(
                "invalid_job",
                0,
                ApiError::bad_request("invalid_job", format!("job {j:?} is not a valid name")),
            ));
        }
        None => DEFAULT_SOURCE.to_string(),
    };
    let items: Vec<Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(items)) => items,
        Ok(other) => {
            return Err(reject(
                "invalid_body",
                0,
                ApiError::bad_request(
                    "invalid_body",
                    format!("expected a JSON array of metrics, got {}", kind(&other)),
                ),
            ));
        }
        Err(e) => {
            return Err(reject(
                "invalid_json",
                0,
                ApiError::bad_request("invalid_json", format!("malformed JSON: {e}")),
            ));
        }
    };
    let total = items.len();
    let now = now_micros();
    let mut builder = SampleBatchBuilder::with_capacity(total);
    let mut metadata = Vec::new();
    let mut errors = Vec::new();
    let mut bad = 0usize;
    for (i, item) in items.into_iter().enumerate() {
        match parse_item(item, &default_source, now) {
            Ok((s, meta)) => {
                builder.push(s);
                metadata.extend(meta);
            }
            Err(e) => {
                bad += 1;
                if errors.len() < MAX_LISTED_ERRORS {
                    errors.push(format!("item {i}: {e}"));
                }
            }
        }
    }
    if bad > 0 {
        let more = if bad > errors.len() {
            format!("; and {} more", bad - errors.len())
        } else {
            String::new()
        };
        return Err(reject(
            "invalid_item",
            total as u64,
            ApiError::bad_request(
                "invalid_metrics",
                format!(
                    "{bad} of {total} items are invalid, nothing was written: {}{more}",
                    errors.join("; ")
                ),
            ),
        ));
    }
    // Metadata first: if it fails nothing is acknowledged and a retry doubles nothing.
    state.storage.record_metadata(metadata).await?;
    let mut outcome = WriteOutcome::default();
    if !builder.is_empty() {
        let batch = builder.finish().map_err(|e| ApiError::internal(&e))?;
        let metrics = state
            .storage
            .metrics()
            .ok_or_else(|| ApiError::from(tally_storage::Error::ReadOnly))?;
        outcome = metrics.write(batch).await?;
    }
    Ok((
        StatusCode::OK,
        Json(json!({"written": outcome.written, "duplicates": outcome.duplicates})),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_exactly() {
        // serde_json's default float parsing can be one ULP off; `float_roundtrip` is on.
        let body = r#"{"name": "x", "value": 442.82759999999996}"#;
        let (s, _) = parse_item(serde_json::from_str(body).unwrap(), "b", 1_000).unwrap();
        assert_eq!(s.value, "442.82759999999996".parse::<f64>().unwrap());
        assert_ne!(s.value, 442.8276);
    }

    #[test]
    fn items_are_validated() {
        let now = 1_000;
        let ok = parse_item(
            json!({"name": "rows_processed", "value": 5, "labels": {"env": "prod", "empty": ""},
                   "time": "2024-01-01T00:00:00Z", "metric_type": "gauge"}),
            "batch",
            now,
        )
        .unwrap();
        let (ok, meta) = ok;
        assert_eq!(meta.unwrap().metric_type.as_deref(), Some("gauge"));
        assert_eq!(ok.time, 1_704_067_200_000_000);
        assert_eq!(ok.labels.len(), 1);
        assert_eq!(ok.source, "batch");
        let (ms, meta) = parse_item(
            json!({"name": "x", "value": "NaN", "time": 1_704_067_200_123i64}),
            "b",
            now,
        )
        .unwrap();
        assert!(meta.is_none());
        assert!(ms.value.is_nan());
        assert_eq!(ms.time, 1_704_067_200_123_000);
        assert_eq!(
            parse_item(json!({"name": "x", "value": 1}), "b", now)
                .unwrap()
                .0
                .time,
            now
        );

        for (bad, needle) in [
            (json!({"value": 1}), "name is missing"),
            (json!({"name": "x"}), "value is missing"),
            (json!({"name": "1x", "value": 1}), "not a valid metric name"),
            (json!({"name": "x", "value": "12"}), "must be a number"),
            (json!({"name": "x", "value": true}), "must be a number"),
            (
                json!({"name": "x", "value": 1, "labels": {"a-b": "1"}}),
                "label name",
            ),
            (
                json!({"name": "x", "value": 1, "labels": {"__name__": "1"}}),
                "label name",
            ),
            (
                json!({"name": "x", "value": 1, "labels": {"a": 1}}),
                "must be a string",
            ),
            (
                json!({"name": "x", "value": 1, "time": 1_704_067_200}),
                "looks like epoch seconds",
            ),
            (json!({"name": "x", "value": 1, "time": "noon"}), "RFC 3339"),
            (
                json!({"name": "x", "value": 1, "metric_type": "meter"}),
                "metric_type",
            ),
            (
                json!({"name": "x", "value": 1, "colour": "red"}),
                "unknown field",
            ),
        ] {
            let e = parse_item(bad.clone(), "b", now).expect_err(&bad.to_string());
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
