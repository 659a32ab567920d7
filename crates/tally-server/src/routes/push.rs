//! Pushgateway-compatible pushes: `PUT`/`POST`/`DELETE /metrics/job/<job>{/<label>/<value>}`.
//!
//! Same paths, bodies, semantics and statuses as Pushgateway 1.5 (PUT/POST 200, DELETE 202,
//! 400 with the reason), so `prometheus_client`'s `push_to_gateway`, `pushadd_to_gateway`
//! and `delete_from_gateway` work unchanged. Each accepted push stores the group as it now
//! stands, stamped with the push time (see [`tally_ingest::pushgateway`]); group states are
//! kept in the state document `pushgateway.json` beside the tables, so a restart keeps them.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, Method as HttpMethod, StatusCode, Uri, header};
use axum::routing::put;
use tally_ingest::pushgateway::{self, Groups, Method, PushError};
use tally_model::time::now_micros;
use tally_model::{Sample, SampleBatchBuilder};

use crate::routes::sql::body_error;
use crate::{ApiError, AppState};

/// The `source` of every pushed row.
pub(crate) const SOURCE: &str = "pushgateway";
const STATE_DOC: &str = "pushgateway.json";

pub(crate) fn router() -> Router<AppState> {
    // Everything below /metrics/, so a malformed grouping path gets its reason, not a 404.
    Router::new().route("/metrics/{*rest}", put(push).post(push).delete(push))
}

fn bad(e: PushError) -> ApiError {
    match e {
        PushError::TooLarge(limit) => ApiError::too_large(limit),
        PushError::Encoding(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            e.to_string(),
        ),
        _ => ApiError::bad_request("invalid_push", e.to_string()),
    }
}

async fn load(state: &AppState) -> Result<Groups, ApiError> {
    match state.storage.read_state(STATE_DOC).await? {
        None => Ok(Groups::default()),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::internal(&format!(
                "the stored Pushgateway groups are unreadable: {e}"
            ))
        }),
    }
}

async fn store(state: &AppState, rows: Vec<Sample>) -> Result<(), ApiError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut b = SampleBatchBuilder::with_capacity(rows.len());
    for r in rows {
        b.push(r);
    }
    let batch = b.finish().map_err(|e| ApiError::internal(&e))?;
    let metrics = state
        .storage
        .metrics()
        .ok_or_else(|| ApiError::from(tally_storage::Error::ReadOnly))?;
    metrics.write(batch).await?;
    Ok(())
}

async fn push(
    State(state): State<AppState>,
    method: HttpMethod,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let method = match method {
        HttpMethod::PUT => Method::Put,
        HttpMethod::POST => Method::Post,
        _ => Method::Delete,
    };
    // The raw path: segments are percent-decoded one by one, after splitting on '/'.
    let rest = uri.path().strip_prefix("/metrics/").unwrap_or_default();
    let key = pushgateway::parse_grouping_path(rest).map_err(bad)?;
    let body = body.map_err(|e| body_error(&state, e))?;

    // One push at a time: each reads and replaces the state of every group.
    let mut guard = state.push_groups.lock().await;
    let groups = match guard.as_mut() {
        Some(g) => g,
        None => guard.insert(load(&state).await?),
    };
    let now = now_micros();
    let mut next = groups.clone();
    let applied = parse(
        &headers,
        &body,
        method,
        state.config.server.max_body.as_usize(),
    )
    .and_then(|families| next.apply(method, &key, families, now).map(|g| g.cloned()));
    let rows = match applied {
        Ok(group) => group.map(|g| g.samples(now, SOURCE)).unwrap_or_default(),
        Err(e) => {
            // Pushgateway records the failure time of a group it knows.
            if let Some(g) = groups.fail(&key, now) {
                let rows = g.failure_samples(now, SOURCE);
                store(&state, rows).await?;
                save(&state, groups).await?;
            }
            return Err(bad(e));
        }
    };
    store(&state, rows).await?;
    *groups = next;
    save(&state, groups).await?;
    Ok(if method == Method::Delete {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    })
}

fn parse(
    headers: &HeaderMap,
    body: &[u8],
    method: Method,
    limit: usize,
) -> Result<Vec<pushgateway::Family>, PushError> {
    if method == Method::Delete {
        return Ok(Vec::new());
    }
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let body = pushgateway::decompress(body, header(header::CONTENT_ENCODING), limit)?;
    pushgateway::parse_body(&body, header(header::CONTENT_TYPE))
}

async fn save(state: &AppState, groups: &Groups) -> Result<(), ApiError> {
    let doc = serde_json::to_vec(groups).map_err(|e| ApiError::internal(&e))?;
    state.storage.write_state(STATE_DOC, doc.into()).await?;
    Ok(())
}
