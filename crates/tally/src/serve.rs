//! `tally serve`: startup and ordered shutdown.

use std::sync::Arc;

use anyhow::{Context, Result};
use tally_model::config::Config;
use tally_model::telemetry::Telemetry;
use tally_server::AppState;
use tally_storage::{Flusher, Mode, Storage};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

pub async fn serve(config: Config) -> Result<()> {
    let config = Arc::new(config);
    let telemetry = Telemetry::shared();
    let storage = Arc::new(
        Storage::open(&config.storage, &config.wal, Mode::ReadWrite, telemetry)
            .await
            .context("opening storage")?,
    );
    let listener = TcpListener::bind(&config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    // Everything that can fail at start-up fails before a task is spawned.
    let scheduler = crate::jobs::build_scheduler(&config, &storage, Some(addr)).await?;

    let tracker = TaskTracker::new();
    let http_token = CancellationToken::new();
    let flush_token = CancellationToken::new();

    let metrics = storage
        .metrics()
        .cloned()
        .context("storage opened read-only")?;
    let flusher = tracker.spawn(Flusher::new(metrics).run(flush_token.clone()));

    let scheduler_token = CancellationToken::new();
    let scheduler_task = tracker.spawn(
        scheduler
            .clone()
            .run(scheduler_token.clone(), config.server.shutdown_timeout),
    );

    let kpis = load_kpis(&config);
    let state = AppState::new(Arc::clone(&config), Arc::clone(&storage))
        .with_kpis(kpis)
        .with_scheduler(scheduler);
    // KPIs that parse but do not plan (an unknown column, a table not written yet) are
    // reported once, with their file and line; they stay listed and answer with the error.
    for p in state.engine.check_kpis().await {
        tracing::warn!("KPI does not plan: {p}");
    }
    let router = tally_server::router(state);
    let mut server = tracker.spawn(tally_server::serve(
        listener,
        router,
        http_token.clone(),
        config.server.shutdown_timeout,
    ));
    tracker.close();
    announce(addr);

    // A signal, or the HTTP server dying on its own, starts the same ordered shutdown.
    let server_result = tokio::select! {
        () = shutdown_signal() => {
            info!("shutting down: no new requests");
            http_token.cancel();
            server.await
        }
        r = &mut server => {
            tracing::error!("the HTTP server stopped unexpectedly; shutting down");
            r
        }
    };
    if let Ok(Err(e)) = server_result {
        tracing::warn!(error = %e, "HTTP server ended with an error");
    }
    info!("stopping the scheduler: no new runs");
    scheduler_token.cancel();
    let _ = scheduler_task.await;
    info!("flushing buffered rows");
    flush_token.cancel();
    let _ = flusher.await;
    tracker.wait().await;
    info!("stopped");
    Ok(())
}

/// Loads `queries/`: a broken file is logged with its path and line and left out; the
/// other KPIs load.
fn load_kpis(config: &Config) -> tally_query::Kpis {
    let kpis = tally_query::Kpis::load_dir(&config.query.kpi_dir);
    for p in &kpis.problems {
        tracing::warn!("KPI file skipped: {p}");
    }
    info!(
        count = kpis.len(),
        dir = %config.query.kpi_dir.display(),
        "KPIs loaded"
    );
    kpis
}

/// One line on stdout that scripts and tests can wait for.
#[allow(clippy::print_stdout)]
fn announce(addr: std::net::SocketAddr) {
    println!("tally listening on http://{addr}");
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
