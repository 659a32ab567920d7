//! Tally's integration tests: one binary (build time is scarce), one module per area.
//!
//! `server` tests run the real router on a loopback port in-process; `binary` tests spawn the
//! real `tally` executable to restart and `kill -9` it; `slt` runs the `.slt` files through
//! the production session factory.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns: a panic is the failure report

mod binary;
pub(crate) mod cli;
mod grafana;
mod jobs;
mod prometheus;
mod pushgateway;
mod server;
mod slt;
mod support;
