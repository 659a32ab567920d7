//! Source decoders: each turns what a source returns into Tally samples or Arrow batches.
//!
//! In: bytes from a source (an exposition body, an API response, a CSV file). Out: samples and
//! metric metadata. Knows nothing of schedules, retries or storage: callers own timing and
//! where the rows go.
//!
//! Adding a kind: one module here, one variant in the job-kind enum, one arm where jobs are
//! built.

pub mod exposition;
mod kinds;
pub mod prometheus;
pub mod pushgateway;
pub mod remote_write;
pub mod scrape;

pub use kinds::{Error, IntervalRule, KindConfig, Output, RunContext};
