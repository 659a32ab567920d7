//! Scheduled ingestion inside the real binary: the shipped self-scrape job, the jobs API,
//! `_tally.runs`, `tally jobs trigger --wait` and `tally ingest run`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Tally, assert_error, client, count, sql, tally_cli};

fn repo_ingest() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../ingest").to_string()
}

async fn get(url: &str) -> Value {
    let resp = client().get(url).send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    resp.json().await.unwrap()
}

async fn wait_for_run(url: &str, job: &str) -> Value {
    for _ in 0..200 {
        let jobs = get(&format!("{url}/api/v1/jobs")).await;
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["name"] == job)
            .unwrap()
            .clone();
        if j["last_run"]["state"] == "succeeded" {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job} never succeeded");
}

#[tokio::test]
async fn shipped_self_scrape_runs_and_is_observable() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = repo_ingest();
    let tally_srv = Tally::start(
        dir.path(),
        &[("TALLY__SCHEDULER__JOBS_DIR", ingest.as_str())],
    )
    .await;
    let url = tally_srv.url.clone();

    // The current interval runs at start-up.
    let job = wait_for_run(&url, "tally_self").await;
    assert_eq!(job["kind"], "scrape");
    assert_eq!(job["schedule"], "every 1m");
    assert_eq!(job["runnable"], true);
    assert!(job["next_run"].is_string());
    let n = count(
        &url,
        "SELECT count(*) FROM metrics WHERE source = 'tally_self'",
    )
    .await;
    assert!(n > 10, "self-scrape stored {n} samples");
    let names = sql(
        &url,
        "SELECT DISTINCT metric FROM metrics WHERE source = 'tally_self' AND metric IN ('tally_flushes_total', 'tally_buffered_rows', 'tally_wal_bytes') ORDER BY metric",
    )
    .await;
    assert_eq!(
        names,
        vec![
            json!({"metric": "tally_buffered_rows"}),
            json!({"metric": "tally_flushes_total"}),
            json!({"metric": "tally_wal_bytes"})
        ]
    );

    // A script triggers and waits, like the seeds' ops scripts did with Airflow.
    let (ok, out, err) = tally_cli(&["jobs", "trigger", "tally_self", "--wait", "--server", &url]);
    assert!(ok, "{err}");
    let id = out.trim().to_string();
    assert!(err.contains("succeeded"), "{err}");
    let run = get(&format!("{url}/api/v1/jobs/tally_self/runs/{id}")).await;
    assert_eq!(run["state"], "succeeded");
    assert_eq!(run["trigger"], "manual");
    assert!(
        run["log"][0].as_str().unwrap().starts_with("scraped "),
        "{run}"
    );
    let runs = get(&format!("{url}/api/v1/jobs/tally_self/runs")).await;
    let runs = runs.as_array().unwrap();
    assert!(runs.len() >= 2);
    assert_eq!(runs[0]["id"], id.as_str(), "newest first");

    // Runs are counted in Tally's own metrics.
    let text = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("tally_runs_total{job=\"tally_self\",state=\"succeeded\"}"),
        "{text}"
    );

    // Run history is a table too.
    let rows = sql(
        &url,
        "SELECT job, state, rows_written FROM _tally.runs WHERE job = 'tally_self'",
    )
    .await;
    assert!(rows.len() >= 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["state"] == "succeeded"));

    // Errors of the API.
    let resp = client()
        .post(format!("{url}/api/v1/jobs/nope/runs"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client()
        .post(format!("{url}/api/v1/jobs/tally_self/runs"))
        .json(&json!({"from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_error(resp, 400, "reads only the present").await;
    tally_srv.stop().await;
}

#[tokio::test]
async fn failing_jobs_and_runs_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    // Port 9 (discard) on loopback: nothing listens, the connection is refused.
    std::fs::write(
        jobs.join("down.toml"),
        "kind = \"scrape\"\nurl = \"http://127.0.0.1:9/metrics\"\nevery = \"1h\"\nretries = 0\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let jobs_s = jobs.display().to_string();
    let srv = Tally::start(&data, &[("TALLY__SCHEDULER__JOBS_DIR", jobs_s.as_str())]).await;
    let url = srv.url.clone();
    let (ok, _, err) = tally_cli(&["jobs", "trigger", "down", "--wait", "--server", &url]);
    assert!(!ok, "a failed run exits non-zero");
    assert!(err.contains("failed"), "{err}");
    assert_eq!(
        count(&url, "SELECT count(*) FROM metrics WHERE source = 'down'").await,
        0
    );

    // `tally ingest run` against the server's own endpoint, without going through the server.
    std::fs::write(
        jobs.join("remote.toml"),
        format!("kind = \"scrape\"\nurl = \"{url}/metrics\"\nevery = \"1h\"\n"),
    )
    .unwrap();
    let data_s = data.display().to_string();
    let (ok, _, err) = tally_cli(&[
        "ingest", "run", "remote", "--data", &data_s, "--jobs", &jobs_s,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("1 run, 0 failed"), "{err}");
    let (ok, _, err) = tally_cli(&[
        "ingest", "run", "down", "--data", &data_s, "--jobs", &jobs_s,
    ]);
    assert!(!ok);
    assert!(err.contains("1 failed"), "{err}");
    let (ok, _, err) = tally_cli(&[
        "ingest",
        "run",
        "remote",
        "--data",
        &data_s,
        "--jobs",
        &jobs_s,
        "--from",
        "2024-01-01T00:00:00Z",
    ]);
    assert!(!ok);
    assert!(err.contains("reads only the present"), "{err}");
    let (ok, _, err) = tally_cli(&[
        "ingest", "run", "nope", "--data", &data_s, "--jobs", &jobs_s,
    ]);
    assert!(!ok);
    assert!(err.contains("no job named 'nope'"), "{err}");
    srv.stop().await;

    // The CLI's rows and runs are in the same storage the server reads.
    let srv = Tally::start(&data, &[("TALLY__SCHEDULER__JOBS_DIR", jobs_s.as_str())]).await;
    assert!(
        count(
            &srv.url,
            "SELECT count(*) FROM metrics WHERE source = 'remote'"
        )
        .await
            > 0
    );
    let states = sql(
        &srv.url,
        "SELECT job, state FROM _tally.runs WHERE job = 'down'",
    )
    .await;
    assert!(
        states.iter().all(|r| r["state"] == "failed") && states.len() >= 2,
        "{states:?}"
    );
    srv.stop().await;
}
