//! SQL over HTTP: `POST /api/v1/sql` (JSON `{"sql"}` or plain text) and `GET /api/v1/sql?q=`.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde::Deserialize;
use tally_query::Format;

use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/sql", get(get_sql).post(post_sql))
}

#[derive(Debug, Default, Deserialize)]
struct Params {
    q: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlBody {
    sql: String,
    format: Option<String>,
}

async fn get_sql(
    State(state): State<AppState>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(sql) = params.q.as_deref() else {
        return Err(ApiError::bad_request(
            "missing_query",
            "pass the SQL as ?q=...",
        ));
    };
    let format = choose_format(params.format.as_deref(), None, &headers)?;
    run(&state, sql, format).await
}

async fn post_sql(
    State(state): State<AppState>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(&state, e))?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let (sql, body_format) = if is_json {
        let parsed: SqlBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("expected {{\"sql\": \"...\"}}: {e}"),
            )
        })?;
        (parsed.sql, parsed.format)
    } else {
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::bad_request("invalid_body", "the SQL text is not UTF-8"))?;
        (text, None)
    };
    let sql = match params.q {
        Some(q) if sql.trim().is_empty() => q,
        _ => sql,
    };
    let format = choose_format(params.format.as_deref(), body_format.as_deref(), &headers)?;
    run(&state, &sql, format).await
}

pub(crate) fn body_error(state: &AppState, e: BytesRejection) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(state.config.server.max_body.as_usize())
    } else {
        ApiError::bad_request("invalid_body", e.body_text())
    }
}

/// `?format=` wins, then the body's `format`, then `Accept`; JSON by default.
fn choose_format(
    param: Option<&str>,
    body: Option<&str>,
    headers: &HeaderMap,
) -> Result<Format, ApiError> {
    if let Some(name) = param.or(body) {
        return Format::from_name(name).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_format",
                format!("unknown format '{name}' (use {})", Format::NAMES),
            )
        });
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_accept)
        .unwrap_or(Format::Json))
}

async fn run(state: &AppState, sql: &str, format: Format) -> Result<Response, ApiError> {
    if sql.trim().is_empty() {
        return Err(ApiError::bad_request("missing_query", "the SQL is empty"));
    }
    let result = state.engine.execute(sql).await?;
    let mut body = Box::pin(tally_query::format::encode(format, result.stream)?);
    // Wait for the first chunk so errors found early (most of them) get a proper status;
    // later ones end the stream with an error, which the client sees as a broken response.
    let first = match body.next().await {
        Some(Ok(chunk)) => Some(chunk),
        Some(Err(e)) => return Err(e.into()),
        None => None,
    };
    let rest = body.map(|r| {
        r.map_err(|e| {
            tracing::warn!(error = %e, "query failed while streaming");
            std::io::Error::other(e.to_string())
        })
    });
    let stream = futures::stream::iter(first.map(Ok::<Bytes, std::io::Error>)).chain(rest);
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(resp)
}
