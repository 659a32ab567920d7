//! Test helpers: an in-process server on loopback, and the real binary as a child process.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tally_model::config::Config;
use tally_model::telemetry::Telemetry;
use tally_server::AppState;
use tally_storage::{Mode, Storage};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub const BIN: &str = env!("CARGO_BIN_EXE_tally");

/// The router served on 127.0.0.1 by this test process; stopped on drop.
pub struct InProcess {
    pub url: String,
    pub storage: Arc<Storage>,
    _dir: tempfile::TempDir,
    token: CancellationToken,
}

impl InProcess {
    pub async fn start(mut config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        config.storage.url = dir.path().join("data").display().to_string();
        config.server.listen = "127.0.0.1:0".into();
        let config = Arc::new(config);
        let storage = Arc::new(
            Storage::open(
                &config.storage,
                &config.wal,
                Mode::ReadWrite,
                Telemetry::shared(),
            )
            .await
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let token = CancellationToken::new();
        let kpis = tally_query::Kpis::load_dir(&config.query.kpi_dir);
        let router =
            tally_server::router(AppState::new(config, Arc::clone(&storage)).with_kpis(kpis));
        tokio::spawn(tally_server::serve(
            listener,
            router,
            token.clone(),
            Duration::from_secs(5),
        ));
        Self {
            url,
            storage,
            _dir: dir,
            token,
        }
    }

    pub async fn flush(&self) -> usize {
        self.storage.metrics().unwrap().flush().await.unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The real `tally serve`, on a free loopback port; killed on drop.
pub struct Tally {
    pub child: Child,
    pub url: String,
}

impl Tally {
    pub async fn start(data: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tally");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("tally listening on ") {
                    return url.to_string();
                }
            }
            panic!("tally exited before listening");
        })
        .await
        .expect("tally did not start within 60 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, url }
    }

    /// SIGKILL: no flush, no cleanup.
    pub async fn kill9(mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM and wait for the orderly shutdown.
    pub async fn stop(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("tally did not stop within 60 s")
            .unwrap();
        assert!(exit.success(), "tally exited with {exit}");
    }
}

/// Runs the `tally` CLI: (success, stdout, stderr).
pub fn tally_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Runs a query and returns the JSON rows, failing the test on any error.
pub async fn sql(url: &str, query: &str) -> Vec<Value> {
    let resp = client()
        .post(format!("{url}/api/v1/sql"))
        .body(query.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert!(status.is_success(), "{query}: {status} {body}");
    serde_json::from_str(&body).unwrap()
}

pub async fn count(url: &str, query: &str) -> i64 {
    let rows = sql(url, query).await;
    rows[0]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_i64()
        .unwrap()
}

pub async fn import(url: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{url}/api/v1/import"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Checks an error answer: its status, the `{"error","message"}` shape, and that the message
/// says `needle`. Returns the message.
pub async fn assert_error(resp: reqwest::Response, status: u16, needle: &str) -> String {
    assert_eq!(
        resp.status().as_u16(),
        status,
        "expected {status} for {needle}"
    );
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");
    let message = body["message"].as_str().unwrap().to_string();
    assert!(message.contains(needle), "{message} should say {needle}");
    message
}
