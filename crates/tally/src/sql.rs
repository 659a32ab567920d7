//! `tally sql`: one query, against storage directly or a running server.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use futures::StreamExt;
use tally_model::telemetry::Telemetry;
use tally_query::{Format, QueryEngine};
use tally_storage::{Mode, Storage};

use crate::cli::{SqlArgs, load_config};

enum Output {
    Table,
    Encoded(Format),
}

fn output(name: &str) -> Result<Output> {
    match name {
        "table" => Ok(Output::Table),
        "csv" => Ok(Output::Encoded(Format::Csv)),
        "json" => Ok(Output::Encoded(Format::Json)),
        "ndjson" => Ok(Output::Encoded(Format::Ndjson)),
        other => bail!("unknown --format '{other}' (use table, csv, json or ndjson)"),
    }
}

pub async fn run(args: SqlArgs) -> Result<ExitCode> {
    let out = output(&args.format)?;
    match &args.server {
        Some(url) => remote(url, args.token.as_deref(), &args.sql, out).await?,
        None => local(&args, out).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the Delta tables directly. Rows a running server has acknowledged but not yet
/// flushed are not visible this way; use --server for those.
async fn local(args: &SqlArgs, out: Output) -> Result<()> {
    let config = load_config(&args.common)?;
    let storage = Storage::open(
        &config.storage,
        &config.wal,
        Mode::ReadOnly,
        Telemetry::shared(),
    )
    .await
    .context("opening storage")?;
    let engine = QueryEngine::new(Arc::new(storage), config.query.clone())
        .with_kpis(tally_query::Kpis::load_dir(&config.query.kpi_dir));
    let result = engine.execute(&args.sql).await?;
    match out {
        Output::Table => {
            let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(result.stream)
                .await
                .map_err(tally_query::Error::from_datafusion)?;
            print_table(&batches)?;
        }
        Output::Encoded(format) => {
            let mut stream = Box::pin(tally_query::format::encode(format, result.stream)?);
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk?)?;
            }
            stdout.flush()?;
        }
    }
    Ok(())
}

async fn remote(base: &str, token: Option<&str>, sql: &str, out: Output) -> Result<()> {
    let format = match out {
        Output::Table => Format::Arrow,
        Output::Encoded(f) => f,
    };
    let url = format!("{}/api/v1/sql", base.trim_end_matches('/'));
    let mut req = reqwest::Client::new()
        .post(&url)
        .query(&[("format", format_name(format))])
        .header("content-type", "text/plain")
        .body(sql.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach Tally at {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or(body);
        bail!("{status}: {message}");
    }
    match out {
        Output::Table => {
            let bytes = resp.bytes().await.context("reading the result")?;
            let reader =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
            let batches = reader.collect::<Result<Vec<_>, _>>()?;
            print_table(&batches)?;
        }
        Output::Encoded(_) => {
            let mut stream = resp.bytes_stream();
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.next().await {
                stdout.write_all(&chunk.context("reading the result")?)?;
            }
            stdout.flush()?;
        }
    }
    Ok(())
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Json => "json",
        Format::Ndjson => "ndjson",
        Format::Csv => "csv",
        Format::Arrow => "arrow",
        Format::Parquet => "parquet",
    }
}

#[allow(clippy::print_stdout)]
fn print_table(batches: &[RecordBatch]) -> Result<()> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    println!("{}", arrow::util::pretty::pretty_format_batches(batches)?);
    println!("({rows} row{})", if rows == 1 { "" } else { "s" });
    Ok(())
}
