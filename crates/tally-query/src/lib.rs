//! The read path: one DataFusion session factory for every front end (HTTP SQL, Grafana, CLI,
//! tests), the read-only guard, query limits, and the output encoders.
//!
//! In: SQL text and a [`tally_storage::Storage`]. Out: a bounded stream of Arrow batches, or
//! bytes in JSON, NDJSON, CSV, Arrow IPC or Parquet. Owns: table registration (Delta snapshot
//! plus rows buffered in memory, seen exactly once), statement whitelisting, timeout, memory
//! and row limits, and the classification of query errors.

mod engine;
mod error;
pub mod format;
mod guard;
pub mod kpi;
pub mod macros;
mod provider;
pub mod series;

pub use engine::{QueryEngine, QueryResult};
pub use error::{Error, Result};
pub use format::Format;
pub use guard::check_read_only;
pub use kpi::{Kpi, KpiProblem, Kpis};
pub use macros::MacroContext;
