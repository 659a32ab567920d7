//! Tally's own counters, rendered by `GET /metrics` in Prometheus text format.
//!
//! Every crate counts its events here, in one place, so logs and `/metrics` agree.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    http_requests: Family<Labels, Counter>,
    rows_written: Family<Labels, Counter>,
    rows_rejected: Family<Labels, Counter>,
    queries: Family<Labels, Counter>,
    query_duration: Histogram,
    runs: Family<Labels, Counter>,
    pub flushes: Counter,
    pub flush_errors: Counter,
    pub wal_bytes: Gauge,
    pub buffered_rows: Gauge,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tally");
        let http_requests = Family::<Labels, Counter>::default();
        let rows_written = Family::<Labels, Counter>::default();
        let rows_rejected = Family::<Labels, Counter>::default();
        let queries = Family::<Labels, Counter>::default();
        let runs = Family::<Labels, Counter>::default();
        let query_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let flushes = Counter::default();
        let flush_errors = Counter::default();
        let wal_bytes = Gauge::default();
        let buffered_rows = Gauge::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route group and status code",
            http_requests.clone(),
        );
        registry.register(
            "rows_written",
            "Rows accepted into a table (durable in the WAL or committed to Delta)",
            rows_written.clone(),
        );
        registry.register(
            "rows_rejected",
            "Rows refused, by reason",
            rows_rejected.clone(),
        );
        registry.register("queries", "SQL queries, by outcome", queries.clone());
        registry.register(
            "runs",
            "Ingestion runs finished, by job and final state",
            runs.clone(),
        );
        registry.register(
            "query_duration_seconds",
            "Time from receiving a SQL query to its last row",
            query_duration.clone(),
        );
        registry.register(
            "flushes",
            "Flushes of buffered rows to Delta",
            flushes.clone(),
        );
        registry.register(
            "flush_errors",
            "Flushes that failed and will be retried",
            flush_errors.clone(),
        );
        registry.register(
            "wal_bytes",
            "Bytes in write-ahead log segments not yet flushed",
            wal_bytes.clone(),
        );
        registry.register(
            "buffered_rows",
            "Rows acknowledged but not yet flushed to Delta",
            buffered_rows.clone(),
        );
        Self {
            registry,
            http_requests,
            rows_written,
            rows_rejected,
            queries,
            query_duration,
            runs,
            flushes,
            flush_errors,
            wal_bytes,
            buffered_rows,
        }
    }

    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    pub fn rows_written(&self, table: &str, rows: u64) {
        self.rows_written
            .get_or_create(&vec![("table", table.to_string())])
            .inc_by(rows);
    }

    pub fn rows_rejected(&self, reason: &str, rows: u64) {
        self.rows_rejected
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc_by(rows);
    }

    pub fn query_finished(&self, outcome: &str, seconds: f64) {
        self.queries
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
        self.query_duration.observe(seconds);
    }

    pub fn run_finished(&self, job: &str, state: &str) {
        self.runs
            .get_or_create(&vec![
                ("job", job.to_string()),
                ("state", state.to_string()),
            ])
            .inc();
    }

    /// The registry in Prometheus text exposition format 0.0.4 (OpenMetrics-compatible).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let t = Telemetry::new();
        t.rows_written("metrics", 3);
        t.http_request("sql", 200);
        let text = t.render();
        assert!(
            text.contains("tally_rows_written_total{table=\"metrics\"} 3"),
            "{text}"
        );
        assert!(text.contains("tally_http_requests_total{route=\"sql\",status=\"200\"} 1"));
    }
}
