//! `POST /api/v1/write`: Prometheus remote_write 1.0.
//!
//! Answers 204 once the samples are durable in the WAL. Statuses follow what senders do with
//! them: 400 (never retried) for a body that can never be stored, 413 for one too large,
//! 415 for another protocol, 5xx (retried with backoff) only for trouble on our side.
//! Retried requests double nothing: the store keeps one row per (source, series, time).

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tally_ingest::remote_write::{self, DecodeError, Limits};
use tally_storage::{MetricMetadata, WriteOutcome};

use crate::routes::sql::body_error;
use crate::{ApiError, AppState};

/// The `source` of every remote-written row.
pub(crate) const SOURCE: &str = "remote_write";

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/write", post(write))
}

/// Plain `application/x-protobuf` or `proto=prometheus.WriteRequest` is v1; remote write 2.0
/// (`proto=io.prometheus.write.v2.Request`) and anything else is refused with 415, which a
/// 2.0 sender takes as "fall back to 1.0".
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let unsupported = |what: String| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            what,
        )
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            unsupported("Content-Type must be application/x-protobuf (remote write 1.0)".into())
        })?;
    let mut parts = ct.split(';').map(|p| p.trim().to_ascii_lowercase());
    let ok_type = parts.next().is_some_and(|t| t == "application/x-protobuf");
    let ok_proto = parts.all(|p| match p.split_once('=') {
        Some(("proto", v)) => v == "prometheus.writerequest",
        _ => true,
    });
    if !(ok_type && ok_proto) {
        return Err(unsupported(format!(
            "Content-Type {ct:?} is not supported: send remote write 1.0 \
             (application/x-protobuf, prometheus.WriteRequest)"
        )));
    }
    if let Some(enc) = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        && !enc.trim().eq_ignore_ascii_case("snappy")
    {
        return Err(unsupported(format!(
            "Content-Encoding {enc:?} is not supported: remote write bodies are snappy"
        )));
    }
    Ok(())
}

async fn write(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_content_type(&headers)?;
    let body = body.map_err(|e| body_error(&state, e))?;
    let limits = Limits {
        // The compressed body is bounded by server.max_body; snappy rarely expands more
        // than 8x on Prometheus payloads, and the header announces the size up front.
        max_decoded_bytes: state.config.server.max_body.as_usize().saturating_mul(8),
        ..Limits::default()
    };
    let decoded = match remote_write::decode(&body, SOURCE, &limits) {
        Ok(d) => d,
        Err(e) => {
            let status = match e {
                DecodeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return Err(ApiError::new(status, "invalid_remote_write", e.to_string()));
        }
    };
    if decoded.stale_markers > 0 {
        state
            .telemetry
            .rows_rejected("stale_marker", decoded.stale_markers);
    }
    let metadata: Vec<MetricMetadata> = decoded
        .metadata
        .iter()
        .map(|(family, kind, help, _unit)| MetricMetadata {
            source: SOURCE.into(),
            metric: family.clone(),
            metric_type: Some((*kind).to_string()),
            description: (!help.is_empty()).then(|| help.clone()),
        })
        .collect();
    if !metadata.is_empty() {
        state.storage.record_metadata(metadata).await?;
    }
    let mut outcome = WriteOutcome::default();
    if !decoded.samples.is_empty() {
        let batch = decoded
            .samples
            .finish()
            .map_err(|e| ApiError::internal(&e))?;
        let metrics = state
            .storage
            .metrics()
            .ok_or_else(|| ApiError::from(tally_storage::Error::ReadOnly))?;
        outcome = metrics.write(batch).await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    // Remote write 2.0 names these; 1.0 senders ignore them. Duplicates count as written:
    // they are stored, once.
    h.insert(
        "x-prometheus-remote-write-samples-written",
        HeaderValue::from(outcome.written + outcome.duplicates),
    );
    h.insert(
        "x-prometheus-remote-write-histograms-written",
        HeaderValue::from(0),
    );
    h.insert(
        "x-prometheus-remote-write-exemplars-written",
        HeaderValue::from(0),
    );
    Ok(resp)
}
