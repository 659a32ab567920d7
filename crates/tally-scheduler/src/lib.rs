//! Scheduled ingestion: job files, schedules and data intervals, catch-up and backfill,
//! retries with backoff, timeouts, pools, dependencies, run history and failure webhooks.
//!
//! In: a [`tally_model::config::SchedulerConfig`], job files, a [`tally_storage::Storage`], a
//! [`Clock`]. Out: runs, each writing its interval with "replace `(job, interval)`" and
//! recorded in `_tally_runs`. Owns all timing: ingestors in `tally-ingest` never sleep, retry
//! or spawn.

mod clock;
mod job;
mod runs;
mod schedule;
mod scheduler;

pub use clock::{Clock, ManualClock, SystemClock};
pub use job::{JobProblem, JobSpec, load_dir};
pub use runs::{RUNS_TABLE, RunRecord, RunState, RunStore};
pub use schedule::Schedule;
pub use scheduler::{Error, JobStatus, Reprocess, Scheduler, SchedulerDeps};

#[cfg(test)]
mod tests;
