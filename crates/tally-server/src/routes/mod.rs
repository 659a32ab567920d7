pub(crate) mod grafana;
pub(crate) mod health;
pub(crate) mod import;
pub(crate) mod jobs;
pub(crate) mod push;
pub(crate) mod remote_write;
pub(crate) mod sql;

use axum::http::{Method, StatusCode, Uri};

use crate::ApiError;

pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
