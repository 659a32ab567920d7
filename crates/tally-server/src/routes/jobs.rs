//! Jobs API: list jobs, trigger runs (with an interval for backfill), read run status and log.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tally_model::time::parse_rfc3339;
use tally_scheduler::Scheduler;

use crate::routes::sql::body_error;
use crate::{ApiError, AppState};

pub(crate) fn read_router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", get(list))
        .route("/api/v1/jobs/{job}/runs", get(runs))
        .route("/api/v1/jobs/{job}/runs/{id}", get(run))
}

pub(crate) fn admin_router() -> Router<AppState> {
    Router::new().route("/api/v1/jobs/{job}/runs", axum::routing::post(trigger))
}

fn scheduler(state: &AppState) -> Result<&Scheduler, ApiError> {
    state.scheduler.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "scheduler_unavailable",
            "this Tally runs without a scheduler",
        )
    })
}

async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(scheduler(&state)?.jobs())))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    from: Option<String>,
    to: Option<String>,
}

async fn trigger(
    State(state): State<AppState>,
    Path(job): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body.map_err(|e| body_error(&state, e))?;
    let parsed: TriggerBody = if body.iter().all(u8::is_ascii_whitespace) {
        TriggerBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("expected {{\"from\"?: RFC 3339, \"to\"?: RFC 3339}}: {e}"),
            )
        })?
    };
    let time = |field: &str, v: Option<String>| -> Result<Option<i64>, ApiError> {
        v.map(|s| {
            parse_rfc3339(&s)
                .map_err(|m| ApiError::bad_request("invalid_interval", format!("{field}: {m}")))
        })
        .transpose()
    };
    let from = time("from", parsed.from)?;
    let to = time("to", parsed.to)?;
    let ids = scheduler(&state)?.trigger(&job, from, to)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"job": job, "runs": ids}))))
}

#[derive(Debug, Deserialize)]
struct ListParams {
    limit: Option<usize>,
}

async fn runs(
    State(state): State<AppState>,
    Path(job): Path<String>,
    Query(p): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let s = scheduler(&state)?;
    if s.job(&job).is_none() {
        return Err(ApiError::not_found(format!("no job named '{job}'")));
    }
    Ok(Json(json!(
        s.run_store().list(&job, p.limit.unwrap_or(100).min(5_000))
    )))
}

async fn run(
    State(state): State<AppState>,
    Path((job, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let r = scheduler(&state)?
        .run_store()
        .get(&job, &id)
        .ok_or_else(|| ApiError::not_found(format!("job '{job}' has no run '{id}'")))?;
    Ok(Json(json!(r)))
}
