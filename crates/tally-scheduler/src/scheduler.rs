//! The scheduler loop and the execution of one run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tally_ingest::{IntervalRule, RunContext};
use tally_model::config::SchedulerConfig;
use tally_model::schema::METRICS_TABLE;
use tally_model::time::format_rfc3339;
use tally_storage::{ReplaceScope, Storage};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::job::{JobProblem, JobSpec, load_dir};
use crate::runs::{RunRecord, RunState, RunStore};

/// How often finished-run history is trimmed to `runs_retention`.
const EXPIRE_EVERY: i64 = 3_600_000_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no job named '{0}'")]
    UnknownJob(String),
    #[error("job '{job}' cannot run: {reason}")]
    NotRunnable { job: String, reason: String },
    #[error("invalid interval: {0}")]
    InvalidInterval(String),
    #[error(transparent)]
    Storage(Box<tally_storage::Error>),
}

impl From<tally_storage::Error> for Error {
    fn from(e: tally_storage::Error) -> Self {
        Error::Storage(Box::new(e))
    }
}

/// What the scheduler needs from the outside world.
#[derive(Debug, Clone)]
pub struct SchedulerDeps {
    pub storage: Arc<Storage>,
    pub clock: Arc<dyn Clock>,
    pub http: reqwest::Client,
    /// Values for `${VAR}` in job files: the environment plus Tally's own (`TALLY_URL`).
    pub vars: BTreeMap<String, String>,
}

/// Which intervals of a backfill run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reprocess {
    /// Only intervals that never ran.
    #[default]
    None,
    /// Also intervals whose last run failed or was skipped.
    Failed,
    /// Every interval.
    All,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub id: String,
    pub state: RunState,
    pub interval_start: String,
    pub interval_end: String,
    pub finished_at: Option<String>,
}

/// A job as `GET /api/v1/jobs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub name: String,
    pub kind: String,
    pub schedule: String,
    pub enabled: bool,
    pub pool: String,
    pub after: Vec<String>,
    pub next_run: Option<String>,
    pub last_run: Option<RunSummary>,
    pub runnable: bool,
    pub reason: Option<String>,
}

#[derive(Debug)]
struct Planned {
    id: String,
    job: String,
    interval: (i64, i64),
}

#[derive(Debug)]
struct Inner {
    config: SchedulerConfig,
    jobs: BTreeMap<String, JobSpec>,
    problems: Vec<JobProblem>,
    deps: SchedulerDeps,
    runs: RunStore,
    pools: BTreeMap<String, Arc<Semaphore>>,
    queue: mpsc::UnboundedSender<Planned>,
    queue_rx: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Planned>>>,
    /// Cancels runs in progress; the loop fires it after the shutdown grace period.
    runs_cancel: CancellationToken,
}

#[derive(Debug, Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    /// Loads the job files and the run history. Broken job files are reported in
    /// [`Self::problems`] and left out; the rest work.
    pub async fn build(config: SchedulerConfig, deps: SchedulerDeps) -> Result<Self, Error> {
        let (jobs, mut problems) = load_dir(&config.jobs_dir);
        let mut by_name: BTreeMap<String, JobSpec> =
            jobs.into_iter().map(|j| (j.name.clone(), j)).collect();
        // A dependency must tick with its dependant, or "the same interval" means nothing.
        let schedules: BTreeMap<String, (String, IntervalRule)> = by_name
            .iter()
            .map(|(n, j)| (n.clone(), (j.schedule.describe().to_string(), j.rule)))
            .collect();
        for j in by_name.values_mut() {
            for dep in &j.after {
                if let Some(s) = schedules.get(dep)
                    && (s.0 != j.schedule.describe() || s.1 != j.rule)
                {
                    problems.push(JobProblem {
                        file: j.file.clone(),
                        message: format!(
                            "after = '{dep}' needs the same schedule and interval rule ({} vs {})",
                            j.schedule.describe(),
                            s.0
                        ),
                    });
                }
            }
        }
        let mut pools = BTreeMap::new();
        for j in by_name.values() {
            pools
                .entry(j.pool.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(config.pool_size(&j.pool))));
        }
        let runs = RunStore::load(Arc::clone(&deps.storage)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                jobs: by_name,
                problems,
                deps,
                runs,
                pools,
                queue: tx,
                queue_rx: parking_lot::Mutex::new(Some(rx)),
                runs_cancel: CancellationToken::new(),
            }),
        })
    }

    pub fn problems(&self) -> &[JobProblem] {
        &self.inner.problems
    }

    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.inner.jobs.get(name)
    }

    pub fn run_store(&self) -> &RunStore {
        &self.inner.runs
    }

    /// Why a job cannot run, if it cannot.
    fn not_runnable(&self, job: &JobSpec) -> Option<String> {
        let missing = job.missing_variables(&self.inner.deps.vars);
        if !missing.is_empty() {
            return Some(format!(
                "environment variable{} {} not set",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            ));
        }
        let bad = self
            .inner
            .problems
            .iter()
            .find(|p| p.file == job.file)
            .map(|p| p.message.clone());
        bad.or_else(|| {
            job.after
                .iter()
                .find(|d| !self.inner.jobs.contains_key(*d))
                .map(|d| format!("after names unknown job '{d}'"))
        })
    }

    pub fn jobs(&self) -> Vec<JobStatus> {
        let now = self.inner.deps.clock.now();
        self.inner
            .jobs
            .values()
            .map(|j| {
                let reason = self.not_runnable(j);
                let next = j
                    .next_start_after(now)
                    .filter(|_| j.enabled && reason.is_none() && self.inner.config.enabled);
                JobStatus {
                    name: j.name.clone(),
                    kind: j.kind.clone(),
                    schedule: j.schedule.describe().to_string(),
                    enabled: j.enabled,
                    pool: j.pool.clone(),
                    after: j.after.clone(),
                    next_run: next.map(format_rfc3339),
                    last_run: self.inner.runs.last(&j.name).map(|r| RunSummary {
                        id: r.id,
                        state: r.state,
                        interval_start: format_rfc3339(r.interval_start),
                        interval_end: format_rfc3339(r.interval_end),
                        finished_at: r.finished_at.map(format_rfc3339),
                    }),
                    runnable: reason.is_none(),
                    reason,
                }
            })
            .collect()
    }

    fn runnable_job(&self, name: &str) -> Result<&JobSpec, Error> {
        let job = self
            .inner
            .jobs
            .get(name)
            .ok_or_else(|| Error::UnknownJob(name.to_string()))?;
        if let Some(reason) = self.not_runnable(job) {
            return Err(Error::NotRunnable {
                job: name.to_string(),
                reason,
            });
        }
        Ok(job)
    }

    /// The intervals of `job` due in `[from, to)`, or the latest one when neither is given.
    pub fn intervals(
        &self,
        name: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Vec<(i64, i64)>, Error> {
        let job = self.runnable_job(name)?;
        let now = self.inner.deps.clock.now();
        match (from, to) {
            (None, None) => {
                let tick = job
                    .schedule
                    .last_at_or_before(job.schedule_time(now))
                    .ok_or_else(|| Error::InvalidInterval("the schedule never ticks".into()))?;
                Ok(job.schedule.interval(tick, job.rule).into_iter().collect())
            }
            (from, to) => {
                if job.rule == IntervalRule::Present {
                    return Err(Error::InvalidInterval(format!(
                        "a {} job reads only the present; it cannot backfill a range",
                        job.kind
                    )));
                }
                let to = to.unwrap_or(now);
                let from = from
                    .ok_or_else(|| Error::InvalidInterval("a range needs a start (from)".into()))?;
                if to <= from {
                    return Err(Error::InvalidInterval("to must be after from".into()));
                }
                // Ticks are interval ends for past-reading kinds: (from, to].
                let ivs: Vec<(i64, i64)> = job
                    .schedule
                    .intervals_between(from + 1, to + 1, job.rule, 100_001)
                    .into_iter()
                    .filter(|(s, _)| *s >= from)
                    .collect();
                if ivs.len() > 100_000 {
                    return Err(Error::InvalidInterval(
                        "more than 100,000 intervals; split the range".into(),
                    ));
                }
                if ivs.is_empty() {
                    return Err(Error::InvalidInterval(
                        "no whole interval of the schedule lies in that range".into(),
                    ));
                }
                Ok(ivs)
            }
        }
    }

    pub(crate) fn plan(&self, job: &str, interval: (i64, i64), trigger: &str) -> RunRecord {
        let now = self.inner.deps.clock.now();
        let r = RunRecord::new(job, interval, trigger, RunState::Queued, now);
        self.inner.runs.insert(r.clone());
        r
    }

    /// Queues runs for the scheduler loop (manual trigger). Returns their ids.
    pub fn trigger(
        &self,
        name: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Vec<String>, Error> {
        let intervals = self.intervals(name, from, to)?;
        let trigger = if from.is_some() { "backfill" } else { "manual" };
        let mut ids = Vec::new();
        for iv in intervals {
            if let Some(existing) = self.active_run(name, iv) {
                ids.push(existing);
                continue;
            }
            let r = self.plan(name, iv, trigger);
            ids.push(r.id.clone());
            // The loop owns the receiver for the life of the process.
            let _ = self.inner.queue.send(Planned {
                id: r.id,
                job: name.to_string(),
                interval: iv,
            });
        }
        Ok(ids)
    }

    fn active_run(&self, job: &str, iv: (i64, i64)) -> Option<String> {
        self.inner
            .runs
            .find(job, iv)
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id)
    }

    /// Runs intervals now, at most the job's pool size at once, without the loop (backfill
    /// from the CLI). `progress` sees each run as it finishes.
    pub async fn run_intervals(
        &self,
        name: &str,
        intervals: Vec<(i64, i64)>,
        reprocess: Reprocess,
        mut progress: impl FnMut(&RunRecord, Option<&str>),
    ) -> Result<Vec<RunRecord>, Error> {
        let job = self.runnable_job(name)?.clone();
        let width = self.inner.config.pool_size(&job.pool);
        let mut todo = Vec::new();
        for iv in intervals {
            let state = self.inner.runs.state_of(name, iv);
            let run = matches!(
                (reprocess, state),
                (_, None)
                    | (Reprocess::All, _)
                    | (
                        Reprocess::Failed,
                        Some(RunState::Failed | RunState::Skipped)
                    )
            );
            if run {
                todo.push(self.plan(name, iv, "backfill"));
            } else {
                let r = RunRecord {
                    state: state.unwrap_or(RunState::Skipped),
                    ..self.preview(name, iv)
                };
                progress(&r, Some("already done"));
            }
        }
        let mut results = futures::stream::iter(todo.into_iter().map(|r| {
            let me = self.clone();
            async move {
                me.execute(Planned {
                    id: r.id,
                    job: r.job,
                    interval: (r.interval_start, r.interval_end),
                })
                .await
            }
        }))
        .buffer_unordered(width);
        let mut out = Vec::new();
        while let Some(r) = results.next().await {
            progress(&r, None);
            out.push(r);
        }
        out.sort_by_key(|r| r.interval_start);
        Ok(out)
    }

    /// A record that was never run (an interval left alone, or a run that vanished).
    fn preview(&self, job: &str, iv: (i64, i64)) -> RunRecord {
        RunRecord {
            id: String::new(),
            ..RunRecord::new(job, iv, "backfill", RunState::Skipped, 0)
        }
    }

    /// Intervals of `job` due by `now` that have not run, oldest first, with whether each
    /// can still run. Past-reading kinds catch up everything since their watermark (at most
    /// `catchup` intervals); present-reading kinds run the current interval and record up to
    /// `catchup` missed ones as skipped, so a gap shows in the history instead of hiding.
    pub(crate) fn due(&self, job: &JobSpec, now: i64) -> Vec<((i64, i64), bool)> {
        let Some(last) = job.schedule.last_at_or_before(job.schedule_time(now)) else {
            return Vec::new();
        };
        let wm = self.inner.runs.watermark(&job.name);
        let limit = job.catchup as usize;
        let mut out = Vec::new();
        let mut tick = Some(match job.rule {
            IntervalRule::Past => last,
            IntervalRule::Present => {
                out.extend(job.schedule.interval(last, job.rule).map(|iv| (iv, true)));
                match job.schedule.last_at_or_before(last - 1) {
                    Some(t) => t,
                    None => return out,
                }
            }
        });
        let runnable = job.rule == IntervalRule::Past;
        // With no history yet, a past-reading job starts from its latest interval only.
        let budget = if wm.is_none() && runnable {
            1
        } else {
            limit + usize::from(runnable && limit == 0)
        };
        let mut taken = 0;
        while let Some(t) = tick {
            let Some(iv) = job.schedule.interval(t, job.rule) else {
                break;
            };
            let behind = match wm {
                Some(w) => iv.1 > w,
                None => runnable,
            };
            if !behind || taken >= budget {
                if behind {
                    info!(job = %job.name, catchup = job.catchup, "older missed intervals are not run; backfill them with `tally ingest run`");
                }
                break;
            }
            out.push((iv, runnable));
            taken += 1;
            tick = job.schedule.last_at_or_before(t - 1);
        }
        out.sort_by_key(|(iv, _)| *iv);
        out.retain(|(iv, _)| self.inner.runs.state_of(&job.name, *iv).is_none());
        out
    }

    /// Runs the schedule until `token` is cancelled, then gives runs in progress `grace` to
    /// finish before cancelling them.
    pub async fn run(self, token: CancellationToken, grace: Duration) {
        let Some(mut rx) = self.inner.queue_rx.lock().take() else {
            warn!("scheduler loop started twice");
            return;
        };
        let clock = Arc::clone(&self.inner.deps.clock);
        let mut set = JoinSet::new();
        let mut next_expiry = clock.now();
        info!(jobs = self.inner.jobs.len(), "scheduler started");
        loop {
            let now = clock.now();
            if self.inner.config.enabled {
                for job in self.inner.jobs.values() {
                    if !job.enabled || self.not_runnable(job).is_some() {
                        continue;
                    }
                    for (iv, runnable) in self.due(job, now) {
                        let r = self.plan(&job.name, iv, "schedule");
                        if !runnable {
                            let missed = self.update(&r.id, |r| {
                                r.state = RunState::Skipped;
                                r.error = Some(format!(
                                    "missed while Tally was not running; a {} job cannot read the past",
                                    job.kind
                                ));
                                r.finished_at = Some(now);
                            });
                            self.finish(missed).await;
                            continue;
                        }
                        let me = self.clone();
                        set.spawn(async move {
                            me.execute(Planned {
                                id: r.id,
                                job: r.job,
                                interval: iv,
                            })
                            .await
                        });
                    }
                }
            }
            if now >= next_expiry {
                let cutoff = now.saturating_sub(
                    i64::try_from(self.inner.config.runs_retention.as_micros()).unwrap_or(i64::MAX),
                );
                match self.inner.runs.expire(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => info!(rows = n, "expired old run history"),
                    Err(e) => warn!(error = %e, "expiring run history failed"),
                }
                next_expiry = now + EXPIRE_EVERY;
            }
            let wake = self
                .inner
                .jobs
                .values()
                .filter(|j| j.enabled && self.inner.config.enabled)
                .filter_map(|j| j.next_start_after(now))
                .min()
                .unwrap_or(next_expiry)
                .min(next_expiry);
            tokio::select! {
                () = token.cancelled() => break,
                () = clock.sleep_until(wake) => {}
                Some(p) = rx.recv() => {
                    let me = self.clone();
                    set.spawn(async move { me.execute(p).await });
                }
                Some(_) = set.join_next(), if !set.is_empty() => {}
            }
        }
        info!(running = set.len(), "scheduler stopping: no new runs");
        let drain = async { while set.join_next().await.is_some() {} };
        tokio::pin!(drain);
        tokio::select! {
            () = &mut drain => {}
            () = tokio::time::sleep(grace) => {
                warn!("runs still in progress after the grace period; cancelling them");
                self.inner.runs_cancel.cancel();
                drain.await;
            }
        }
    }

    /// One run: wait for dependencies, take a pool slot, attempt with retries, record.
    async fn execute(&self, p: Planned) -> RunRecord {
        let inner = &self.inner;
        let Some(job) = inner.jobs.get(&p.job).cloned() else {
            return self.preview(&p.job, p.interval);
        };
        let mut log = Vec::new();
        if let Err(reason) = self.wait_for_dependencies(&job, p.interval).await {
            if inner.runs_cancel.is_cancelled() {
                return self.abandon(&p.id);
            }
            let r = self.update(&p.id, |r| {
                r.state = RunState::Skipped;
                r.error = Some(reason.clone());
                r.finished_at = Some(inner.deps.clock.now());
            });
            return self.finish(r).await;
        }
        let pool = inner
            .pools
            .get(&job.pool)
            .cloned()
            .unwrap_or_else(|| Arc::new(Semaphore::new(1)));
        let Ok(_permit) = pool.acquire_owned().await else {
            return self.preview(&p.job, p.interval);
        };
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let started = inner.deps.clock.now();
            self.update(&p.id, |r| {
                r.state = RunState::Running;
                r.attempt = attempt;
                r.started_at = Some(started);
            });
            match self.attempt(&job, p.interval, started).await {
                Ok(out) => break Ok(out),
                Err(e) => {
                    log.push(format!("attempt {attempt} failed: {e}"));
                    warn!(job = %job.name, attempt, error = %e, "run attempt failed");
                    if attempt > job.retries || inner.runs_cancel.is_cancelled() {
                        break Err(e);
                    }
                    let backoff = job.retry_backoff.saturating_mul(1 << (attempt - 1).min(16));
                    let until = inner.deps.clock.now()
                        + i64::try_from(backoff.as_micros()).unwrap_or(i64::MAX);
                    tokio::select! {
                        () = inner.deps.clock.sleep_until(until) => {}
                        () = inner.runs_cancel.cancelled() => break Err(e),
                    }
                }
            }
        };
        if outcome.is_err() && inner.runs_cancel.is_cancelled() {
            return self.abandon(&p.id);
        }
        let finished = inner.deps.clock.now();
        let r = self.update(&p.id, |r| {
            r.finished_at = Some(finished);
            match outcome {
                Ok(out) => {
                    r.state = RunState::Succeeded;
                    r.rows_written = out.rows;
                    r.rows_rejected = out.rejected;
                    log.extend(out.log);
                }
                Err(e) => {
                    r.state = RunState::Failed;
                    r.error = Some(e);
                }
            }
            r.log = std::mem::take(&mut log);
        });
        let r = self.finish(r).await;
        if r.state == RunState::Failed {
            self.notify(&r).await;
        }
        r
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut RunRecord)) -> RunRecord {
        // Runs are inserted before they execute and removed only when finished, so a run
        // being executed is always present; a miss would be a bug in this file.
        self.inner
            .runs
            .update(id, f)
            .unwrap_or_else(|| self.preview("?", (0, 0)))
    }

    /// A run cut short by shutdown is not a failure of its source: it is not recorded, so its
    /// interval runs again at the next start.
    fn abandon(&self, id: &str) -> RunRecord {
        let r = self.update(id, |_| {});
        self.inner.runs.forget(id);
        warn!(job = %r.job, run = %r.id, "run abandoned at shutdown; its interval will run again");
        r
    }

    async fn finish(&self, r: RunRecord) -> RunRecord {
        if let Err(e) = self.inner.runs.finish(r.clone()).await {
            warn!(job = %r.job, run = %r.id, error = %e, "recording the run failed; its interval will run again");
        }
        self.inner
            .deps
            .storage
            .telemetry()
            .run_finished(&r.job, r.state.as_str());
        info!(job = %r.job, run = %r.id, state = r.state.as_str(), rows = r.rows_written,
              interval_start = %format_rfc3339(r.interval_start), "run finished");
        r
    }

    async fn wait_for_dependencies(&self, job: &JobSpec, iv: (i64, i64)) -> Result<(), String> {
        let mut changes = self.inner.runs.changes();
        loop {
            let mut waiting = false;
            for dep in &job.after {
                match self.inner.runs.state_of(dep, iv) {
                    Some(RunState::Succeeded) => {}
                    Some(RunState::Failed | RunState::Skipped) => {
                        return Err(format!(
                            "dependency '{dep}' did not succeed for this interval"
                        ));
                    }
                    Some(RunState::Queued | RunState::Running) => waiting = true,
                    None => {
                        let runnable = self
                            .inner
                            .jobs
                            .get(dep)
                            .is_some_and(|d| d.enabled && self.not_runnable(d).is_none());
                        if !runnable {
                            return Err(format!("dependency '{dep}' is disabled or not runnable"));
                        }
                        waiting = true;
                    }
                }
            }
            if !waiting {
                return Ok(());
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return Err("scheduler stopped".into()) },
                () = self.inner.runs_cancel.cancelled() => return Err("cancelled at shutdown".into()),
            }
        }
    }

    /// Fetch, decode and replace the interval, all under the job's timeout.
    async fn attempt(
        &self,
        job: &JobSpec,
        iv: (i64, i64),
        now: i64,
    ) -> Result<tally_ingest::Output, String> {
        let inner = &self.inner;
        let kind = job.resolve(&inner.deps.vars)?;
        let cancel = inner.runs_cancel.child_token();
        let ctx = RunContext {
            job: job.name.clone(),
            start: iv.0,
            end: iv.1,
            now,
            http: inner.deps.http.clone(),
            timeout: job.timeout,
            cancel: cancel.clone(),
        };
        let work = async {
            let out = kind.run(&ctx).await.map_err(|e| e.to_string())?;
            inner
                .deps
                .storage
                .replace(
                    METRICS_TABLE,
                    &ReplaceScope::metrics(&job.name, iv.0, iv.1),
                    out.batches.clone(),
                )
                .await
                .map_err(|e| format!("writing the interval failed: {e}"))?;
            Ok::<_, String>(out)
        };
        let deadline = now + i64::try_from(job.timeout.as_micros()).unwrap_or(i64::MAX);
        let result = tokio::select! {
            r = work => r,
            () = inner.deps.clock.sleep_until(deadline) => {
                Err(format!("timed out after {}", humantime::format_duration(job.timeout)))
            }
            () = cancel.cancelled() => Err("cancelled at shutdown".into()),
        };
        cancel.cancel();
        result
    }

    /// Tells the webhooks about a run that failed for good. The URLs are secrets: never logged.
    async fn notify(&self, r: &RunRecord) {
        let text = format!(
            "Tally: job `{}` failed for [{}, {}) after {} attempt{}: {}",
            r.job,
            format_rfc3339(r.interval_start),
            format_rfc3339(r.interval_end),
            r.attempt,
            if r.attempt == 1 { "" } else { "s" },
            r.error.as_deref().unwrap_or("unknown error")
        );
        for (i, url) in self.inner.config.webhooks.iter().enumerate() {
            let sent = self
                .inner
                .deps
                .http
                .post(url)
                .timeout(Duration::from_secs(10))
                .json(&serde_json::json!({ "text": text }))
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => {}
                Ok(resp) => warn!(
                    webhook = i,
                    status = resp.status().as_u16(),
                    "webhook refused the notification"
                ),
                Err(e) => warn!(webhook = i, error = %e.without_url(), "webhook unreachable"),
            }
        }
    }
}
