//! The scheduler against a real exposition endpoint on loopback, driven by a manual clock.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use parking_lot::Mutex;
use tally_ingest::IntervalRule;
use tally_model::config::{SchedulerConfig, StorageConfig, WalConfig};
use tally_model::telemetry::Telemetry;
use tally_storage::{Mode, Storage};
use tokio_util::sync::CancellationToken;

use crate::{ManualClock, RunRecord, RunState, Scheduler, SchedulerDeps};

const T0: i64 = 1_704_067_200_000_000; // 2024-01-01T00:00:00Z
const MIN: i64 = 60_000_000;

#[derive(Default)]
struct Target {
    /// 0 = answer, 1 = HTTP 500, 2 = never answer.
    mode: AtomicUsize,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    value: AtomicUsize,
    hooks: Mutex<Vec<serde_json::Value>>,
}

async fn metrics(State(t): State<Arc<Target>>) -> (StatusCode, String) {
    t.hits.fetch_add(1, Ordering::SeqCst);
    let now = t.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    t.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Hold each request a little so overlapping runs would overlap here.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let answer = match t.mode.load(Ordering::SeqCst) {
        0 => (
            StatusCode::OK,
            format!(
                "# TYPE jobs_done counter\njobs_done{{queue=\"a\"}} {}\njobs_done{{queue=\"b\"}} 2\n",
                t.value.load(Ordering::SeqCst)
            ),
        ),
        1 => (StatusCode::INTERNAL_SERVER_ERROR, "boom".into()),
        _ => std::future::pending().await,
    };
    t.in_flight.fetch_sub(1, Ordering::SeqCst);
    answer
}

async fn hook(State(t): State<Arc<Target>>, body: axum::Json<serde_json::Value>) -> StatusCode {
    t.hooks.lock().push(body.0);
    StatusCode::OK
}

async fn serve_target() -> (Arc<Target>, String, CancellationToken) {
    let t = Arc::new(Target::default());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/hook", post(hook))
        .with_state(Arc::clone(&t));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    (t, url, stop)
}

struct Env {
    dir: tempfile::TempDir,
    storage: Arc<Storage>,
    clock: Arc<ManualClock>,
    target: Arc<Target>,
    url: String,
    _stop: DropCancel,
}

struct DropCancel(CancellationToken);
impl Drop for DropCancel {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ingest")).unwrap();
    let storage = Arc::new(
        Storage::open(
            &StorageConfig {
                url: dir.path().join("data").display().to_string(),
                ..Default::default()
            },
            &WalConfig::default(),
            Mode::ReadOnly,
            Telemetry::shared(),
        )
        .await
        .unwrap(),
    );
    let (target, url, stop) = serve_target().await;
    Env {
        dir,
        storage,
        clock: Arc::new(ManualClock::new(T0)),
        target,
        url,
        _stop: DropCancel(stop),
    }
}

impl Env {
    fn job(&self, name: &str, extra: &str) {
        std::fs::write(
            self.dir.path().join("ingest").join(format!("{name}.toml")),
            format!(
                "kind = \"scrape\"\nurl = \"{}/metrics\"\n{extra}\n",
                self.url
            ),
        )
        .unwrap();
    }

    async fn scheduler(&self, pools: &[(&str, usize)], vars: &[(&str, &str)]) -> Scheduler {
        let mut config = SchedulerConfig {
            jobs_dir: self.dir.path().join("ingest"),
            webhooks: vec![format!("{}/hook", self.url)],
            ..Default::default()
        };
        for (p, n) in pools {
            config.pools.insert(p.to_string(), *n);
        }
        let deps = SchedulerDeps {
            storage: Arc::clone(&self.storage),
            clock: Arc::clone(&self.clock) as _,
            http: reqwest::Client::new(),
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        };
        Scheduler::build(config, deps).await.unwrap()
    }

    async fn rows(&self, source: &str) -> Vec<(i64, String, f64)> {
        use arrow::array::{Array, Float64Array, MapArray, StringArray, TimestampMicrosecondArray};
        let batches = self
            .storage
            .table("metrics")
            .unwrap()
            .read(&format!("source = '{source}'"))
            .await
            .unwrap();
        let mut out = Vec::new();
        for b in batches {
            let t = b
                .column_by_name("time")
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap()
                .clone();
            let v = b
                .column_by_name("value")
                .unwrap()
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .clone();
            let l = b
                .column_by_name("labels")
                .unwrap()
                .as_any()
                .downcast_ref::<MapArray>()
                .unwrap()
                .clone();
            for i in 0..b.num_rows() {
                let entries = l.value(i);
                let vals =
                    arrow::compute::cast(entries.column(1), &arrow::datatypes::DataType::Utf8)
                        .unwrap();
                let q = vals
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap()
                    .value(0)
                    .to_string();
                out.push((t.value(i), q, v.value(i)));
            }
        }
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out
    }
}

/// Waits (in real time, briefly) until `f` holds for the run store.
async fn until(s: &Scheduler, what: &str, f: impl Fn(&Scheduler) -> bool) {
    let mut changes = s.run_store().changes();
    let wait = async {
        while !f(s) {
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn finished(s: &Scheduler, job: &str) -> Vec<RunRecord> {
    let mut v: Vec<RunRecord> = s
        .run_store()
        .list(job, 1000)
        .into_iter()
        .filter(|r| r.state.is_terminal())
        .collect();
    v.sort_by_key(|r| r.interval_start);
    v
}

#[tokio::test]
async fn scrapes_on_schedule_and_catches_up_after_downtime() {
    let e = env().await;
    e.job("node", "every = \"1m\"\ncatchup = 3\ntimeout = \"5s\"");
    let s = e.scheduler(&[], &[]).await;
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));

    until(&s, "first run", |s| finished(s, "node").len() == 1).await;
    e.clock.advance(Duration::from_secs(60));
    until(&s, "second run", |s| finished(s, "node").len() == 2).await;
    let runs = finished(&s, "node");
    assert!(
        runs.iter().all(|r| r.state == RunState::Succeeded),
        "{runs:?}"
    );
    assert_eq!(
        runs.iter()
            .map(|r| (r.interval_start, r.interval_end))
            .collect::<Vec<_>>(),
        vec![(T0, T0 + MIN), (T0 + MIN, T0 + 2 * MIN)]
    );
    assert_eq!(runs[0].rows_written, 2);
    // Scrapes are stamped with the scheduler's time, inside their interval.
    assert_eq!(
        e.rows("node").await,
        vec![
            (T0, "a".into(), 0.0),
            (T0, "b".into(), 2.0),
            (T0 + MIN, "a".into(), 0.0),
            (T0 + MIN, "b".into(), 2.0)
        ]
    );
    token.cancel();
    looped.await.unwrap();

    // Down for ten minutes: the history survives, the last three missed intervals are recorded
    // as skipped (a scrape cannot read the past), and the current one runs.
    e.clock.set(T0 + 12 * MIN + 5_000_000);
    let s = e.scheduler(&[], &[]).await;
    assert_eq!(s.run_store().watermark("node"), Some(T0 + 2 * MIN));
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "catch-up", |s| finished(s, "node").len() == 6).await;
    let runs = finished(&s, "node");
    let states: Vec<(i64, RunState)> = runs
        .iter()
        .map(|r| ((r.interval_start - T0) / MIN, r.state))
        .collect();
    assert_eq!(
        states,
        vec![
            (0, RunState::Succeeded),
            (1, RunState::Succeeded),
            (9, RunState::Skipped),
            (10, RunState::Skipped),
            (11, RunState::Skipped),
            (12, RunState::Succeeded),
        ]
    );
    assert_eq!(
        e.rows("node").await.last().unwrap().0,
        T0 + 12 * MIN + 5_000_000
    );
    token.cancel();
    looped.await.unwrap();
}

#[tokio::test]
async fn past_reading_jobs_catch_up_bounded_by_catchup() {
    let e = env().await;
    e.job("hist", "every = \"1h\"\ncatchup = 2");
    let s = e.scheduler(&[], &[]).await;
    let mut job = s.job("hist").unwrap().clone();
    job.rule = IntervalRule::Past;
    // First start: the latest whole interval only.
    let hour = 60 * MIN;
    assert_eq!(
        s.due(&job, T0 + 5 * hour + 10),
        vec![((T0 + 4 * hour, T0 + 5 * hour), true)]
    );
    // With a watermark five hours back, only the two newest missed intervals.
    let done = s.plan("hist", (T0 - hour, T0), "schedule");
    s.run_store()
        .update(&done.id, |r| r.state = RunState::Succeeded);
    assert_eq!(
        s.due(&job, T0 + 5 * hour + 10),
        vec![
            ((T0 + 3 * hour, T0 + 4 * hour), true),
            ((T0 + 4 * hour, T0 + 5 * hour), true)
        ]
    );
    // A delay moves when an interval is due, not what it covers.
    job.delay = Duration::from_secs(600);
    assert_eq!(
        s.due(&job, T0 + 5 * hour + 5 * MIN).last(),
        Some(&((T0 + 3 * hour, T0 + 4 * hour), true))
    );
    assert_eq!(
        job.next_start_after(T0 + 5 * hour + 5 * MIN),
        Some(T0 + 5 * hour + 10 * MIN)
    );
    assert_eq!(
        s.due(&job, T0 + 5 * hour + 10 * MIN).last(),
        Some(&((T0 + 4 * hour, T0 + 5 * hour), true))
    );
}

#[tokio::test]
async fn rerunning_an_interval_replaces_its_rows() {
    let e = env().await;
    e.job("node", "every = \"1m\"");
    let s = e.scheduler(&[], &[]).await;
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "scheduled run", |s| finished(s, "node").len() == 1).await;
    let before = e.rows("node").await;
    for round in 2..=3 {
        e.target.value.store(round * 10, Ordering::SeqCst);
        let ids = s.trigger("node", None, None).unwrap();
        assert_eq!(ids.len(), 1);
        until(&s, "manual run", |s| finished(s, "node").len() == round).await;
    }
    let after = e.rows("node").await;
    assert_eq!(after.len(), before.len(), "no doubled rows");
    assert_eq!(
        after[0],
        (T0, "a".into(), 30.0),
        "the last run's values replaced the earlier ones"
    );
    token.cancel();
    looped.await.unwrap();
}

#[tokio::test]
async fn failures_retry_with_backoff_then_notify_and_write_nothing() {
    let e = env().await;
    e.target.mode.store(1, Ordering::SeqCst);
    e.job(
        "flaky",
        "every = \"1m\"\nretries = 2\nretry_backoff = \"10s\"",
    );
    let s = e.scheduler(&[], &[]).await;
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "first attempt", |s| {
        e.target.hits.load(Ordering::SeqCst) == 1
            && s.run_store()
                .last("flaky")
                .is_some_and(|r| r.log.len() <= 1)
    })
    .await;
    // The second attempt waits for the 10 s backoff, the third for 20 s more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.target.hits.load(Ordering::SeqCst), 1);
    e.clock.advance(Duration::from_secs(10));
    until(&s, "second attempt", |_| {
        e.target.hits.load(Ordering::SeqCst) == 2
    })
    .await;
    e.clock.advance(Duration::from_secs(20));
    until(&s, "failure", |s| finished(s, "flaky").len() == 1).await;
    let r = &finished(&s, "flaky")[0];
    assert_eq!((r.state, r.attempt), (RunState::Failed, 3));
    assert!(r.error.as_deref().unwrap().contains("500"), "{r:?}");
    assert_eq!(r.log.len(), 3, "{:?}", r.log);
    assert!(e.rows("flaky").await.is_empty(), "no partial data");
    until(&s, "webhook", |_| !e.target.hooks.lock().is_empty()).await;
    let hook = e.target.hooks.lock()[0].clone();
    let text = hook["text"].as_str().unwrap();
    assert!(
        text.contains("`flaky` failed") && text.contains("3 attempts"),
        "{text}"
    );
    token.cancel();
    looped.await.unwrap();
}

#[tokio::test]
async fn a_hanging_source_times_out() {
    let e = env().await;
    e.target.mode.store(2, Ordering::SeqCst);
    e.job("stuck", "every = \"1m\"\nretries = 0\ntimeout = \"30s\"");
    let s = e.scheduler(&[], &[]).await;
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "request", |_| e.target.hits.load(Ordering::SeqCst) == 1).await;
    e.clock.advance(Duration::from_secs(30));
    until(&s, "timeout", |s| finished(s, "stuck").len() == 1).await;
    let r = &finished(&s, "stuck")[0];
    assert_eq!(r.state, RunState::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("timed out after 30s"),
        "{r:?}"
    );
    token.cancel();
    looped.await.unwrap();
}

#[tokio::test]
async fn dependencies_and_pools() {
    let e = env().await;
    e.job("extract", "every = \"1m\"\npool = \"one\"");
    e.job(
        "load",
        "every = \"1m\"\npool = \"one\"\nafter = [\"extract\"]",
    );
    e.job("other", "every = \"1m\"\npool = \"one\"");
    let s = e.scheduler(&[("one", 1)], &[]).await;
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "three runs", |s| {
        ["extract", "load", "other"]
            .iter()
            .all(|j| finished(s, j).len() == 1)
    })
    .await;
    assert_eq!(
        e.target.max_in_flight.load(Ordering::SeqCst),
        1,
        "pool of one"
    );
    let extract = &finished(&s, "extract")[0];
    let load = &finished(&s, "load")[0];
    assert_eq!(load.state, RunState::Succeeded);
    assert!(
        load.started_at >= extract.finished_at,
        "load ran after extract"
    );

    // When the dependency fails, the dependant is skipped for that interval.
    e.target.mode.store(1, Ordering::SeqCst);
    std::fs::write(
        e.dir.path().join("ingest/extract.toml"),
        format!("kind = \"scrape\"\nurl = \"{}/metrics\"\nevery = \"1m\"\npool = \"one\"\nretries = 0\n", e.url),
    )
    .unwrap();
    token.cancel();
    looped.await.unwrap();
    let s = e.scheduler(&[("one", 1)], &[]).await;
    let token = CancellationToken::new();
    e.clock.advance(Duration::from_secs(60));
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "second interval", |s| finished(s, "load").len() == 2).await;
    let load = finished(&s, "load").pop().unwrap();
    assert_eq!(load.state, RunState::Skipped);
    assert!(load.error.unwrap().contains("dependency 'extract'"));
    token.cancel();
    looped.await.unwrap();
}

#[tokio::test]
async fn a_missing_secret_is_reported_not_fatal() {
    let e = env().await;
    e.job(
        "secret",
        "every = \"1m\"\nbearer_token = \"${SCRAPE_TOKEN}\"",
    );
    e.job("plain", "every = \"1m\"");
    std::fs::write(
        e.dir.path().join("ingest/broken.toml"),
        "kind = \"scrape\"\n",
    )
    .unwrap();
    let s = e.scheduler(&[], &[]).await;
    assert_eq!(s.problems().len(), 1);
    assert!(s.problems()[0].file.ends_with(Path::new("broken.toml")));
    let jobs = s.jobs();
    let secret = jobs.iter().find(|j| j.name == "secret").unwrap();
    assert!(!secret.runnable);
    assert_eq!(
        secret.reason.as_deref(),
        Some("environment variable SCRAPE_TOKEN not set")
    );
    assert!(secret.next_run.is_none());
    assert!(jobs.iter().find(|j| j.name == "plain").unwrap().runnable);
    let err = s.trigger("secret", None, None).unwrap_err();
    assert!(err.to_string().contains("SCRAPE_TOKEN"), "{err}");
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_secs(5)));
    until(&s, "plain runs", |s| finished(s, "plain").len() == 1).await;
    assert!(finished(&s, "secret").is_empty());
    token.cancel();
    looped.await.unwrap();
}

#[tokio::test]
async fn run_history_is_kept_bounded() {
    let e = env().await;
    e.job("node", "every = \"1m\"");
    let s = e.scheduler(&[], &[]).await;
    let day = 24 * 60 * MIN;
    for (i, finished) in [T0 - 40 * day, T0 - 31 * day, T0 - day]
        .into_iter()
        .enumerate()
    {
        let mut r = s.plan(
            "node",
            (T0 + i as i64 * MIN, T0 + (i as i64 + 1) * MIN),
            "schedule",
        );
        r.state = RunState::Succeeded;
        r.finished_at = Some(finished);
        s.run_store().finish(r).await.unwrap();
    }
    // Retention is 30 days: the two older runs go, from the table and from memory.
    assert_eq!(s.run_store().expire(T0 - 30 * day).await.unwrap(), 2);
    assert_eq!(finished(&s, "node").len(), 1);
    let reloaded = e.scheduler(&[], &[]).await;
    assert_eq!(finished(&reloaded, "node").len(), 1);
    assert_eq!(reloaded.run_store().watermark("node"), Some(T0 + 3 * MIN));
}

#[tokio::test]
async fn backfill_runs_each_interval_once_unless_reprocessed() {
    use crate::Reprocess;
    let e = env().await;
    e.job("node", "every = \"1m\"\nretries = 0");
    let s = e.scheduler(&[], &[]).await;
    let ivs: Vec<(i64, i64)> = (0..4).map(|i| (T0 + i * MIN, T0 + (i + 1) * MIN)).collect();
    let mut seen = Vec::new();
    let done = s
        .run_intervals("node", ivs[..3].to_vec(), Reprocess::None, |r, note| {
            seen.push((r.interval_start, note.map(String::from)))
        })
        .await
        .unwrap();
    assert_eq!(done.len(), 3);
    assert!(
        done.iter()
            .all(|r| r.state == RunState::Succeeded && r.trigger == "backfill")
    );
    assert_eq!(seen.len(), 3);
    e.target.mode.store(1, Ordering::SeqCst);
    let failed = s
        .run_intervals("node", ivs[3..].to_vec(), Reprocess::None, |_, _| {})
        .await
        .unwrap();
    assert_eq!(failed[0].state, RunState::Failed);
    e.target.mode.store(0, Ordering::SeqCst);

    let mut notes = Vec::new();
    let again = s
        .run_intervals("node", ivs.clone(), Reprocess::None, |_, n| {
            notes.push(n.map(String::from))
        })
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(notes, vec![Some("already done".to_string()); 4]);
    let retried = s
        .run_intervals("node", ivs.clone(), Reprocess::Failed, |_, _| {})
        .await
        .unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(
        (retried[0].interval_start, retried[0].state),
        (T0 + 3 * MIN, RunState::Succeeded)
    );
    let all = s
        .run_intervals("node", ivs, Reprocess::All, |_, _| {})
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    // Four intervals, two series each, however often they ran.
    assert_eq!(e.rows("node").await.len(), 8);
}

#[tokio::test]
async fn shutdown_gives_a_grace_period_then_abandons_without_recording() {
    let e = env().await;
    e.target.mode.store(2, Ordering::SeqCst);
    e.job("stuck", "every = \"1m\"\nretries = 0\ntimeout = \"1h\"");
    let s = e.scheduler(&[], &[]).await;
    let token = CancellationToken::new();
    let looped = tokio::spawn(s.clone().run(token.clone(), Duration::from_millis(300)));
    until(&s, "request", |_| e.target.hits.load(Ordering::SeqCst) == 1).await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), looped)
        .await
        .expect("the loop ends after its grace period")
        .unwrap();
    assert!(
        s.run_store().list("stuck", 10).is_empty(),
        "nothing recorded"
    );
    // At the next start the interval is due again.
    let s = e.scheduler(&[], &[]).await;
    assert_eq!(s.run_store().watermark("stuck"), None);
    let job = s.job("stuck").unwrap().clone();
    assert_eq!(s.due(&job, T0), vec![((T0, T0 + MIN), true)]);
}
