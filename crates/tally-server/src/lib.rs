//! Tally's HTTP surface: SQL over HTTP, JSON import, health and self-metrics, each route group
//! in its own module with its own small `Router`, merged in [`router`].
//!
//! In: a [`AppState`] built by the binary. Out: an axum `Router` and [`serve`], which runs it
//! until cancelled. Owns: authentication, request limits, and the single mapping from errors to
//! HTTP statuses ([`error::ApiError`]).

mod auth;
pub mod error;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use tally_model::config::Config;
use tally_model::telemetry::Telemetry;
use tally_query::QueryEngine;
use tally_scheduler::Scheduler;
use tally_storage::Storage;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use auth::Role;
pub use error::ApiError;

/// Everything handlers need, cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub storage: Arc<Storage>,
    pub engine: Arc<QueryEngine>,
    pub telemetry: Arc<Telemetry>,
    /// Absent in processes that do not schedule (the jobs API then answers 503).
    pub scheduler: Option<Scheduler>,
    /// Pushgateway groups, loaded from storage on the first push.
    pub push_groups: Arc<tokio::sync::Mutex<Option<tally_ingest::pushgateway::Groups>>>,
}

impl AppState {
    pub fn new(config: Arc<Config>, storage: Arc<Storage>) -> Self {
        let telemetry = Arc::clone(storage.telemetry());
        let engine = Arc::new(QueryEngine::new(Arc::clone(&storage), config.query.clone()));
        Self {
            config,
            storage,
            engine,
            telemetry,
            scheduler: None,
            push_groups: Arc::default(),
        }
    }

    /// Serves `kpis` (views `kpi.<name>`, Grafana targets `kpi.<name>`).
    pub fn with_kpis(mut self, kpis: tally_query::Kpis) -> Self {
        self.engine = Arc::new(
            QueryEngine::new(Arc::clone(&self.storage), self.config.query.clone()).with_kpis(kpis),
        );
        self
    }

    pub fn with_scheduler(mut self, scheduler: Scheduler) -> Self {
        self.scheduler = Some(scheduler);
        self
    }
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let read = routes::sql::router()
        .merge(routes::jobs::read_router())
        .merge(routes::grafana::router(&state.config.grafana.prefix))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_read,
        ));
    let admin = routes::jobs::admin_router().route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::require_admin,
    ));
    let write = routes::import::router()
        .merge(routes::remote_write::router())
        .merge(routes::push::router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_write,
        ));
    Router::new()
        .merge(routes::health::router())
        .merge(read)
        .merge(write)
        .merge(admin)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(
            state.config.server.max_body.as_usize(),
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Counts and logs every request in one place, so logs and `/metrics` agree.
async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    state.telemetry.http_request(&route, status);
    debug!(%method, route, status, elapsed_ms = started.elapsed().as_millis() as u64, "request");
    resp
}

/// Serves `router` on `listener` until `token` is cancelled, then lets in-flight requests
/// finish for up to the configured shutdown timeout.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    token: CancellationToken,
    shutdown_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "listening");
    let graceful = token.clone();
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(async move { graceful.cancelled().await });
    tokio::select! {
        r = server => r,
        () = async {
            token.cancelled().await;
            tokio::time::sleep(shutdown_timeout).await;
        } => {
            info!("in-flight requests did not finish in time; closing them");
            Ok(())
        }
    }
}
