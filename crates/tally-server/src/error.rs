//! The one place where errors become HTTP statuses and `{"error", "message"}` bodies.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Machine-readable kind, stable across versions.
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes (server.max_body)"),
        )
    }

    /// A failure on our side: the client gets a generic message, the log gets the cause.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": self.kind, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

impl From<tally_query::Error> for ApiError {
    fn from(e: tally_query::Error) -> Self {
        use tally_query::Error as Q;
        match e {
            Q::Forbidden(m) => Self::bad_request("forbidden_statement", m),
            Q::InvalidQuery(m) => Self::bad_request("invalid_query", m),
            Q::Timeout(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "query_timeout",
                e.to_string(),
            ),
            Q::TooManyRows(_) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_rows",
                e.to_string(),
            ),
            Q::ResourcesExhausted(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "resources_exhausted",
                e.to_string(),
            ),
            Q::Storage(s) => (*s).into(),
            Q::Execution(_) => Self::internal(&e),
        }
    }
}

impl From<tally_scheduler::Error> for ApiError {
    fn from(e: tally_scheduler::Error) -> Self {
        use tally_scheduler::Error as S;
        match e {
            S::UnknownJob(_) => Self::not_found(e.to_string()),
            S::NotRunnable { .. } => Self::new(StatusCode::CONFLICT, "not_runnable", e.to_string()),
            S::InvalidInterval(_) => Self::bad_request("invalid_interval", e.to_string()),
            S::Storage(s) => (*s).into(),
        }
    }
}

impl From<tally_storage::Error> for ApiError {
    fn from(e: tally_storage::Error) -> Self {
        use tally_storage::Error as S;
        match &e {
            S::TableNotFound(_) => Self::not_found(e.to_string()),
            _ if e.is_user_error() => Self::bad_request("invalid_write", e.to_string()),
            S::Backpressure { .. } | S::WalPoisoned | S::ReadOnly => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            _ => Self::internal(&e),
        }
    }
}
