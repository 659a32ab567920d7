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
    /// Check a configuration file and report every problem in it.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
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

/// Defaults, then the file, then `TALLY__*` variables, then flags.
pub fn load_config(common: &CommonArgs) -> Result<Config> {
    let mut config = Config::load(common.config.as_deref(), std::env::vars())?;
    if let Some(data) = &common.data {
        config.storage.url = data.clone();
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
        Command::CheckConfig { file } => Ok(check_config(&file)),
    }
}

#[allow(clippy::print_stdout)]
fn check_config(file: &Path) -> ExitCode {
    match Config::load(Some(file), std::env::vars()) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
