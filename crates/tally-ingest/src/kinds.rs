//! The job kinds Tally knows, their settings, and the one `match` that runs them.

use std::time::Duration;

use arrow::array::RecordBatch;
use serde::Deserialize;
use tally_model::SampleBatchBuilder;
use tokio_util::sync::CancellationToken;

use crate::prometheus::{self, PrometheusConfig};
use crate::scrape::{self, ScrapeConfig};

/// A kind and its settings, as written in a job file (`kind = "scrape"` plus its keys).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KindConfig {
    Scrape(ScrapeConfig),
    Prometheus(PrometheusConfig),
}

impl KindConfig {
    pub fn name(&self) -> &'static str {
        match self {
            KindConfig::Scrape(_) => "scrape",
            KindConfig::Prometheus(_) => "prometheus",
        }
    }

    /// Checks what the settings' types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            KindConfig::Scrape(_) => Ok(()),
            KindConfig::Prometheus(c) => c.validate(),
        }
    }

    /// Whether a run reads a past interval (most sources) or only the present (a scrape):
    /// the scheduler aligns intervals accordingly and does not catch up what cannot be read.
    pub fn interval_rule(&self) -> IntervalRule {
        match self {
            KindConfig::Scrape(_) => IntervalRule::Present,
            KindConfig::Prometheus(_) => IntervalRule::Past,
        }
    }

    /// Fetches and decodes one interval. Never retries, sleeps or spawns: the scheduler does.
    pub async fn run(&self, ctx: &RunContext) -> Result<Output, Error> {
        match self {
            KindConfig::Scrape(c) => scrape::run(c, ctx).await,
            KindConfig::Prometheus(c) => prometheus::run(c, ctx).await,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalRule {
    /// The run at tick `t` covers `[previous tick, t)`: data that exists after the fact.
    Past,
    /// The run at tick `t` covers `[t, next tick)` and reads the source as it is now.
    Present,
}

/// What one run is given.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub job: String,
    /// Microseconds since the epoch, inclusive.
    pub start: i64,
    /// Microseconds since the epoch, exclusive.
    pub end: i64,
    /// The scheduler's clock reading when the run started (microseconds).
    pub now: i64,
    pub http: reqwest::Client,
    pub timeout: Duration,
    pub cancel: CancellationToken,
}

/// What one run produced for the `metrics` table.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub batches: Vec<RecordBatch>,
    pub rows: u64,
    pub rejected: u64,
    /// Notes for the run log: what was skipped and why.
    pub log: Vec<String>,
}

impl Output {
    /// Adds the samples of `builder` as one batch; `url` names the source in errors.
    pub(crate) fn add_samples(
        &mut self,
        builder: SampleBatchBuilder,
        url: &str,
    ) -> Result<(), Error> {
        self.rows += builder.len() as u64;
        if !builder.is_empty() {
            self.batches
                .push(builder.finish().map_err(|e| Error::Decode {
                    url: url.to_string(),
                    message: e.to_string(),
                })?);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request to {url} failed: {message}")]
    Http { url: String, message: String },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot decode the response of {url}: {message}")]
    Decode { url: String, message: String },
    #[error("cancelled")]
    Cancelled,
}
