//! The CLI: `tally sql` locally and against a server, and `tally check-config`.

use serde_json::json;

use crate::support::{Tally, import, tally_cli};

#[tokio::test]
async fn sql_against_server_and_local_data() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(dir.path(), &[]).await;
    let body = json!([{"name": "jobs_done", "value": 7, "labels": {"team": "data"},
                       "time": "2024-05-01T00:00:00Z"}]);
    assert_eq!(import(&tally.url, &body).await.status(), 200);

    let q = "SELECT metric, labels['team'] AS team, value FROM metrics";
    let (ok, out, err) = tally_cli(&["sql", "--server", &tally.url, q]);
    assert!(ok, "{err}");
    assert!(out.contains("| jobs_done | data | 7.0   |"), "{out}");
    assert!(out.contains("(1 row)"), "{out}");
    let (ok, out, _) = tally_cli(&["sql", "--server", &tally.url, "--format", "csv", q]);
    assert!(ok);
    assert_eq!(out, "metric,team,value\njobs_done,data,7.0\n");
    let (ok, _, err) = tally_cli(&["sql", "--server", &tally.url, "DROP TABLE metrics"]);
    assert!(!ok);
    assert!(err.contains("400") && err.contains("DROP"), "{err}");

    tally.stop().await;
    let data = dir.path().display().to_string();
    let (ok, out, err) = tally_cli(&["sql", "--data", &data, "--format", "json", q]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        json!([{"metric": "jobs_done", "team": "data", "value": 7.0}])
    );
    let (ok, _, err) = tally_cli(&["sql", "--data", &data, "SELECT nope FROM metrics"]);
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn check_config_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"nowhere\"\n[query]\nmax_rows = 0\ntimeout = \"soon\"\n[typo]\n",
    )
    .unwrap();
    let (ok, _, err) = tally_cli(&["check-config", bad.to_str().unwrap()]);
    assert!(!ok);
    for needle in [
        "4 problems",
        "server.listen",
        "query.max_rows",
        "query.timeout",
        "typo",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tally.toml");
    let ingest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ingest");
    let (ok, out, err) = tally_cli(&["check-config", shipped, "--jobs", ingest]);
    assert!(ok, "the shipped tally.toml and jobs must be valid: {err}");
    assert!(out.contains("tally.toml: ok"), "{out}");
    assert!(out.contains("1 job(s) ok, 0 problem(s)"), "{out}");
    std::fs::write(dir.path().join("bad_job.toml"), "kind = \"scrape\"\n").unwrap();
    let (ok, _, err) = tally_cli(&[
        "check-config",
        shipped,
        "--jobs",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad_job.toml: missing field `url`"), "{err}");
}

/// A folder with one good KPI and three broken ones (syntax, name, unknown column).
pub(crate) fn kpi_dir_with_mistakes(dir: &std::path::Path) -> std::path::PathBuf {
    let kpis = dir.join("queries");
    std::fs::create_dir_all(&kpis).unwrap();
    std::fs::write(
        kpis.join("good.sql"),
        "-- title: Good\n-- unit: short\nSELECT $__dateBin(time) AS time, count(*) AS n\n\
         FROM metrics WHERE $__timeFilter(time) GROUP BY 1\n",
    )
    .unwrap();
    std::fs::write(
        kpis.join("broken.sql"),
        "-- title: Broken\nSELECT time,\n  nosuchcol AS v\nFROM metrics\n",
    )
    .unwrap();
    std::fs::write(kpis.join("syntax.sql"), "-- title: Syntax\n\nSELECT 1 +\n").unwrap();
    std::fs::write(kpis.join("named.sql"), "-- name: Bad Name\nSELECT 1\n").unwrap();
    kpis
}

#[test]
fn check_config_reports_kpi_files_with_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../queries");
    std::fs::write(&config, format!("[query]\nkpi_dir = \"{shipped}\"\n")).unwrap();
    let ingest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ingest");
    let (ok, out, err) = tally_cli(&["check-config", config.to_str().unwrap(), "--jobs", ingest]);
    assert!(ok, "the shipped KPIs must be valid: {out}{err}");
    assert!(out.contains("5 KPI(s) loaded, 0 problem(s)"), "{out}");

    let kpis = kpi_dir_with_mistakes(dir.path());
    std::fs::write(
        &config,
        format!("[query]\nkpi_dir = \"{}\"\n", kpis.display()),
    )
    .unwrap();
    let (ok, out, err) = tally_cli(&["check-config", config.to_str().unwrap(), "--jobs", ingest]);
    assert!(!ok);
    assert!(out.contains("3 problem(s)"), "{out}");
    let k = kpis.display();
    for needle in [
        format!("{k}/syntax.sql:3: invalid SQL"),
        format!("{k}/named.sql:1: KPI name 'Bad Name'"),
        format!("{k}/broken.sql:3: Schema error: No field named nosuchcol"),
    ] {
        assert!(err.contains(&needle), "{needle}: {err}");
    }
    assert!(!err.contains("good.sql"), "{err}");
}
