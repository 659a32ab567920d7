//! Arrow schemas of the tables Tally owns.
//!
//! The `metrics` schema is written in the exact shape Delta Lake reads back (map entries named
//! `key_value` with `key`/`value`, microsecond UTC timestamps, the partition column last), so
//! batches built here can be unioned with what the Delta scan returns without a cast.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

pub const METRICS_TABLE: &str = "metrics";

pub const COL_TIME: &str = "time";
pub const COL_METRIC: &str = "metric";
pub const COL_LABELS: &str = "labels";
pub const COL_SERIES_ID: &str = "series_id";
pub const COL_VALUE: &str = "value";
pub const COL_SOURCE: &str = "source";
/// Day partition (`date=YYYY-MM-DD`), derived from `time`.
pub const COL_DATE: &str = "date";

pub const UTC: &str = "UTC";

pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

/// The struct inside the labels map; names follow the Delta protocol's map encoding.
pub fn labels_entries_field() -> Arc<Field> {
    Arc::new(Field::new(
        "key_value",
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
        ])),
        false,
    ))
}

pub fn labels_type() -> DataType {
    DataType::Map(labels_entries_field(), false)
}

static METRICS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(COL_TIME, timestamp_type(), false),
        Field::new(COL_METRIC, DataType::Utf8, false),
        Field::new(COL_LABELS, labels_type(), false),
        Field::new(COL_SERIES_ID, DataType::Int64, false),
        Field::new(COL_VALUE, DataType::Float64, false),
        Field::new(COL_SOURCE, DataType::Utf8, false),
        Field::new(COL_DATE, DataType::Date32, false),
    ]))
});

/// Schema of the `metrics` table (one row per sample).
pub fn metrics_schema() -> SchemaRef {
    Arc::clone(&METRICS_SCHEMA)
}
