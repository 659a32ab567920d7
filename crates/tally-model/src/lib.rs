//! The shared vocabulary of Tally: the `metrics` table schema, samples and series keys,
//! the typed configuration tree, and time and size helpers.
//!
//! In: nothing but values. Out: types every other crate speaks. No I/O happens here apart from
//! reading a config file in [`config::Config::load`], so every other crate can depend on it.

pub mod config;
pub mod sample;
pub mod schema;
pub mod size;
pub mod telemetry;
pub mod time;

pub use sample::{
    Sample, SampleBatchBuilder, SeriesRef, series_id, valid_label_name, valid_metric_name,
};
