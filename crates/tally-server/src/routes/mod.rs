pub(crate) mod health;
pub(crate) mod import;
pub(crate) mod jobs;
pub(crate) mod push;
pub(crate) mod remote_write;
pub(crate) mod sql;

use axum::http::Uri;

use crate::ApiError;

pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}
