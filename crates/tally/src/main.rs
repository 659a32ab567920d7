//! The `tally` binary: CLI, config loading, startup and ordered shutdown. The only place that
//! spawns long-lived tasks.

mod cli;
mod jobs;
mod serve;
mod sql;

use std::process::ExitCode;

use clap::Parser;

/// Ingest is allocation-bound (decoded labels, Arrow builders, flush merges): glibc's malloc
/// and free took a third of the CPU on the remote_write benchmark, and its per-thread arenas
/// held on to memory after flushes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("warn,tally=info,tally_server=info,tally_storage=info,tally_query=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
