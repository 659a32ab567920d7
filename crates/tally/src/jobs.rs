//! `tally ingest run` (backfill without a server) and `tally jobs ...` (the jobs API).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tally_model::config::Config;
use tally_model::telemetry::Telemetry;
use tally_model::time::{format_rfc3339, parse_rfc3339};
use tally_scheduler::{Reprocess, RunRecord, RunState, Scheduler, SchedulerDeps, SystemClock};
use tally_storage::{Mode, Storage};
use tracing::warn;

use crate::cli::{IngestRunArgs, RemoteArgs, TriggerArgs, load_config};

/// The scheduler over `storage`, with `${TALLY_URL}` pointing at this server when it has one.
pub async fn build_scheduler(
    config: &Config,
    storage: &Arc<Storage>,
    addr: Option<SocketAddr>,
) -> Result<Scheduler> {
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    let listen = addr.map_or_else(|| config.server.listen.clone(), |a| a.to_string());
    vars.insert("TALLY_URL".into(), format!("http://{listen}"));
    let deps = SchedulerDeps {
        storage: Arc::clone(storage),
        clock: Arc::new(SystemClock),
        http: reqwest::Client::builder()
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")))
            .build()?,
        vars,
    };
    let scheduler = Scheduler::build(config.scheduler.clone(), deps)
        .await
        .context("loading jobs and run history")?;
    for p in scheduler.problems() {
        warn!("job file problem: {p}");
    }
    Ok(scheduler)
}

fn time(field: &str, v: Option<&str>) -> Result<Option<i64>> {
    v.map(|s| parse_rfc3339(s).map_err(|e| anyhow::anyhow!("--{field}: {e}")))
        .transpose()
}

pub async fn ingest_run(args: IngestRunArgs) -> Result<ExitCode> {
    let config = load_config(&args.common)?;
    let reprocess = match args.reprocess.as_deref() {
        None => Reprocess::None,
        Some("failed") => Reprocess::Failed,
        Some("all") => Reprocess::All,
        Some(other) => bail!("--reprocess takes failed or all, not '{other}'"),
    };
    let storage = Arc::new(
        Storage::open(
            &config.storage,
            &config.wal,
            Mode::ReadOnly,
            Telemetry::shared(),
        )
        .await
        .context("opening storage")?,
    );
    let scheduler = build_scheduler(&config, &storage, None).await?;
    let from = time("from", args.range.from.as_deref())?;
    let to = time("to", args.range.to.as_deref())?;
    let intervals = scheduler.intervals(&args.job, from, to)?;
    let total = intervals.len();
    // A single latest-interval run always runs, even if it ran before.
    let reprocess = if from.is_none() && to.is_none() {
        Reprocess::All
    } else {
        reprocess
    };
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut done = 0usize;
    let records = scheduler
        .run_intervals(&args.job, intervals, reprocess, |r, note| {
            done += 1;
            progress(done, total, r, note, tty);
        })
        .await?;
    if tty {
        eprintln!();
    }
    let failed: Vec<&RunRecord> = records
        .iter()
        .filter(|r| r.state != RunState::Succeeded)
        .collect();
    let rows: u64 = records.iter().map(|r| r.rows_written).sum();
    eprintln!(
        "{}: {} interval(s), {} run, {} failed, {} rows written in {:.1}s",
        args.job,
        total,
        records.len(),
        failed.len(),
        rows,
        started.elapsed().as_secs_f64()
    );
    for r in &failed {
        eprintln!(
            "  [{}, {}) {}: {}",
            format_rfc3339(r.interval_start),
            format_rfc3339(r.interval_end),
            r.state.as_str(),
            r.error.as_deref().unwrap_or("")
        );
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn progress(done: usize, total: usize, r: &RunRecord, note: Option<&str>, tty: bool) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled));
    let what = match note {
        Some(n) => n.to_string(),
        None => format!("{} ({} rows)", r.state.as_str(), r.rows_written),
    };
    let line = format!(
        "{bar} {done}/{total} {} {what}",
        format_rfc3339(r.interval_start)
    );
    if tty {
        eprint!("\r{line:<100}");
    } else {
        eprintln!("{line}");
    }
}

fn client(remote: &RemoteArgs) -> Result<(reqwest::Client, String)> {
    Ok((
        reqwest::Client::builder().build()?,
        remote.server.trim_end_matches('/').to_string(),
    ))
}

async fn call(req: reqwest::RequestBuilder, token: Option<&str>) -> Result<Value> {
    let req = match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = req.send().await.context("cannot reach Tally")?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        bail!("{status}: {msg}");
    }
    Ok(body)
}

#[allow(clippy::print_stdout)]
pub async fn trigger(args: TriggerArgs) -> Result<ExitCode> {
    let (http, base) = client(&args.remote)?;
    let token = args.remote.token.as_deref();
    let mut body = serde_json::Map::new();
    if let Some(f) = &args.range.from {
        body.insert("from".into(), Value::String(f.clone()));
    }
    if let Some(t) = &args.range.to {
        body.insert("to".into(), Value::String(t.clone()));
    }
    let answer = call(
        http.post(format!("{base}/api/v1/jobs/{}/runs", args.job))
            .json(&Value::Object(body)),
        token,
    )
    .await?;
    let ids: Vec<String> = answer["runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for id in &ids {
        println!("{id}");
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let limit = humantime::parse_duration(&args.wait_timeout)
        .with_context(|| format!("--wait-timeout '{}'", args.wait_timeout))?;
    let deadline = Instant::now() + limit;
    let mut failed = 0;
    for id in &ids {
        loop {
            let run = call(
                http.get(format!("{base}/api/v1/jobs/{}/runs/{id}", args.job)),
                token,
            )
            .await?;
            let state = run["state"].as_str().unwrap_or("");
            if matches!(state, "succeeded" | "failed" | "skipped") {
                eprintln!(
                    "{id} {state} [{}, {}) {} rows{}",
                    run["interval_start"].as_str().unwrap_or(""),
                    run["interval_end"].as_str().unwrap_or(""),
                    run["rows_written"],
                    run["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                if state != "succeeded" {
                    failed += 1;
                }
                break;
            }
            if Instant::now() >= deadline {
                bail!("run {id} still {state} after {}", args.wait_timeout);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[allow(clippy::print_stdout)]
pub async fn list(args: RemoteArgs) -> Result<ExitCode> {
    let (http, base) = client(&args)?;
    let jobs = call(
        http.get(format!("{base}/api/v1/jobs")),
        args.token.as_deref(),
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&jobs)?);
    Ok(ExitCode::SUCCESS)
}
