//! Command-line interface.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tally_model::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Tally: a metrics warehouse with a Grafana datasource"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: HTTP API, push endpoints, flushing.
    Serve(ServeArgs),
    /// Run one SQL query and print the result.
    Sql(SqlArgs),
    /// Check a configuration file (and the job files it points at); report every problem.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
        /// Job folder to check instead of the configured one.
        #[arg(long)]
        jobs: Option<PathBuf>,
    },
    /// Run ingestion jobs without a server (backfill, one-off runs).
    #[command(subcommand)]
    Ingest(IngestCommand),
    /// Talk to the jobs API of a running Tally.
    #[command(subcommand)]
    Jobs(JobsCommand),
}

#[derive(Debug, Subcommand)]
pub enum IngestCommand {
    /// Run JOB for its latest interval, or for every interval in [--from, --to).
    Run(IngestRunArgs),
}

#[derive(Debug, Args)]
pub struct IngestRunArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The job's name (its file stem unless the file sets `name`).
    pub job: String,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Also re-run intervals that already ran: `failed` (and skipped) or `all`.
    #[arg(long)]
    pub reprocess: Option<String>,
}

/// A backfill range; without it, the job's latest interval.
#[derive(Debug, Args, Clone, Default)]
pub struct RangeArgs {
    /// Start of the range (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range (RFC 3339, exclusive; default now).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Trigger a run of JOB (its latest interval, or [--from, --to)).
    Trigger(TriggerArgs),
    /// List the jobs and their last runs.
    List(RemoteArgs),
}

#[derive(Debug, Args, Clone)]
pub struct RemoteArgs {
    /// URL of the running Tally.
    #[arg(long, default_value = "http://127.0.0.1:8181", env = "TALLY_SERVER")]
    pub server: String,
    /// Bearer token (admin to trigger).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct TriggerArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
    pub job: String,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Wait for the runs to finish; exit non-zero if any failed.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "1h")]
    pub wait_timeout: String,
}

/// Options shared by every command that opens storage.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonArgs {
    /// Configuration file (TOML). Without it, built-in defaults apply.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Storage location: a path, file://, s3://, gs://, az:// or memory:// URL.
    #[arg(long)]
    pub data: Option<String>,
    /// Folder of job files (default: scheduler.jobs_dir, `ingest`).
    #[arg(long)]
    pub jobs: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<String>,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Query a running Tally at this URL instead of reading storage directly.
    #[arg(long, conflicts_with = "data")]
    pub server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output: table (default), csv, json or ndjson.
    #[arg(long, default_value = "table")]
    pub format: String,
    /// The query.
    pub sql: String,
}

/// Parses every KPI file and plans it against the standard tables (empty, in memory), so
/// unknown columns and functions show up before a dashboard asks. Returns the problem count.
#[allow(clippy::print_stdout)]
async fn check_kpis(config: &Config) -> usize {
    let dir = &config.query.kpi_dir;
    let mut kpis = tally_query::Kpis::load_dir(dir);
    let mut problems: Vec<String> = kpis.problems.iter().map(ToString::to_string).collect();
    let storage = tally_storage::Storage::open(
        &tally_model::config::StorageConfig {
            url: "memory://".into(),
            ..Default::default()
        },
        &config.wal,
        tally_storage::Mode::ReadOnly,
        tally_model::telemetry::Telemetry::shared(),
    )
    .await;
    let loaded = kpis.len();
    match storage {
        Ok(storage) => {
            let engine =
                tally_query::QueryEngine::new(std::sync::Arc::new(storage), config.query.clone())
                    .with_kpis(std::mem::take(&mut kpis));
            for p in engine.check_kpis().await {
                // Tables other than `metrics` exist once their job has run; that is not a
                // mistake in the file.
                if p.message.contains("not found") && !p.message.contains("metrics") {
                    println!("{p} (checked again when Tally starts)");
                } else {
                    problems.push(p.to_string());
                }
            }
        }
        Err(e) => problems.push(format!("cannot check KPI queries: {e}")),
    }
    for p in &problems {
        eprintln!("{p}");
    }
    println!(
        "{}: {} KPI(s) loaded, {} problem(s)",
        dir.display(),
        loaded,
        problems.len()
    );
    problems.len()
}

/// Defaults, then the file, then `TALLY__*` variables, then flags.
pub fn load_config(common: &CommonArgs) -> Result<Config> {
    let mut config = Config::load(common.config.as_deref(), std::env::vars())?;
    if let Some(data) = &common.data {
        config.storage.url = data.clone();
    }
    if let Some(jobs) = &common.jobs {
        config.scheduler.jobs_dir = jobs.clone();
    }
    Ok(config)
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let mut config = load_config(&args.common)?;
            if let Some(listen) = args.listen {
                config.server.listen = listen;
            }
            let problems = config.validate();
            if !problems.is_empty() {
                anyhow::bail!(tally_model::config::ConfigError {
                    origin: "command line".into(),
                    problems,
                });
            }
            crate::serve::serve(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sql(args) => crate::sql::run(args).await,
        Command::CheckConfig { file, jobs } => Ok(check_config(&file, jobs.as_deref()).await),
        Command::Ingest(IngestCommand::Run(args)) => crate::jobs::ingest_run(args).await,
        Command::Jobs(JobsCommand::Trigger(args)) => crate::jobs::trigger(args).await,
        Command::Jobs(JobsCommand::List(args)) => crate::jobs::list(args).await,
    }
}

#[allow(clippy::print_stdout)]
async fn check_config(file: &Path, jobs: Option<&Path>) -> ExitCode {
    let config = match Config::load(Some(file), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: ok", file.display());
    let dir = jobs.unwrap_or(&config.scheduler.jobs_dir);
    let (loaded, problems) = tally_scheduler::load_dir(dir);
    for p in &problems {
        eprintln!("{p}");
    }
    println!(
        "{}: {} job(s) ok, {} problem(s)",
        dir.display(),
        loaded.len(),
        problems.len()
    );
    let kpi_problems = check_kpis(&config).await;
    if problems.is_empty() && kpi_problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
