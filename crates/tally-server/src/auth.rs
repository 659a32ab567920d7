//! Bearer tokens: read (SQL), write (pushes), admin (everything).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tally_model::config::AuthConfig;

use crate::{ApiError, AppState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
    Admin,
}

/// Compares without an early exit, so response times do not leak how much of a token matched.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Which roles a presented token holds.
fn roles(auth: &AuthConfig, token: &str) -> Vec<Role> {
    let mut out = Vec::new();
    let has = |list: &[String]| list.iter().any(|t| same(t, token));
    if has(&auth.admin_tokens) {
        out.extend([Role::Admin, Role::Read, Role::Write]);
    }
    if has(&auth.read_tokens) {
        out.push(Role::Read);
    }
    if has(&auth.write_tokens) {
        out.push(Role::Write);
    }
    out
}

pub(crate) fn check(
    auth: &AuthConfig,
    header_value: Option<&str>,
    need: Role,
) -> Result<(), ApiError> {
    if !auth.enabled() {
        return Ok(());
    }
    let Some(value) = header_value else {
        return Err(ApiError::unauthorized(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
    else {
        return Err(ApiError::unauthorized(
            "the Authorization header must be 'Bearer <token>'",
        ));
    };
    let held = roles(auth, token);
    if held.is_empty() {
        return Err(ApiError::unauthorized("invalid token"));
    }
    if held.contains(&need) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "this token may not {}",
            match need {
                Role::Read => "read",
                Role::Write => "write",
                Role::Admin => "administer",
            }
        )))
    }
}

async fn require(state: AppState, need: Role, req: Request, next: Next) -> Response {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match check(&state.config.auth, value, need) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn require_read(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    require(state, Role::Read, req, next).await
}

pub(crate) async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    require(state, Role::Admin, req, next).await
}

pub(crate) async fn require_write(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    require(state, Role::Write, req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_enforced() {
        let open = AuthConfig::default();
        assert!(check(&open, None, Role::Write).is_ok());
        let auth = AuthConfig {
            read_tokens: vec!["r".into()],
            write_tokens: vec!["w".into()],
            admin_tokens: vec!["a".into()],
        };
        assert_eq!(check(&auth, None, Role::Read).unwrap_err().status, 401);
        assert_eq!(
            check(&auth, Some("Bearer x"), Role::Read)
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            check(&auth, Some("Basic r"), Role::Read)
                .unwrap_err()
                .status,
            401
        );
        assert!(check(&auth, Some("Bearer r"), Role::Read).is_ok());
        assert_eq!(
            check(&auth, Some("Bearer r"), Role::Write)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            check(&auth, Some("Bearer w"), Role::Read)
                .unwrap_err()
                .status,
            403
        );
        assert!(check(&auth, Some("Bearer a"), Role::Write).is_ok());
        assert!(check(&auth, Some("Bearer a"), Role::Read).is_ok());
    }
}
