//! Output encoders. Each turns a stream of batches into a stream of byte chunks, one chunk per
//! batch, so a large result never sits in memory whole.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use datafusion::execution::SendableRecordBatchStream;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;

use crate::{Error, Result};

/// RFC 3339, UTC. DataFusion treats zone-less timestamps as UTC, so they get a `Z` too.
const TS_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.fZ";
const TS_TZ_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.f%:z";
/// Parquet row groups are cut at this many rows, bounding what the encoder holds.
const PARQUET_ROW_GROUP: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Ndjson,
    Csv,
    Arrow,
    Parquet,
}

impl Format {
    pub const NAMES: &'static str = "json, ndjson, csv, arrow, parquet";

    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "json" => Some(Self::Json),
            "ndjson" | "jsonl" | "jsonlines" => Some(Self::Ndjson),
            "csv" => Some(Self::Csv),
            "arrow" | "ipc" | "arrow-stream" => Some(Self::Arrow),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }

    /// The first media type in an `Accept` header that names a format we write.
    pub fn from_accept(accept: &str) -> Option<Self> {
        accept.split(',').find_map(|part| {
            let media = part.split(';').next().unwrap_or("").trim();
            match media.to_ascii_lowercase().as_str() {
                "application/json" => Some(Self::Json),
                "application/x-ndjson" | "application/jsonl" | "application/ndjson" => {
                    Some(Self::Ndjson)
                }
                "text/csv" => Some(Self::Csv),
                "application/vnd.apache.arrow.stream" => Some(Self::Arrow),
                "application/vnd.apache.parquet" | "application/parquet" => Some(Self::Parquet),
                _ => None,
            }
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Arrow => "application/vnd.apache.arrow.stream",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }
}

trait Encoder: Send {
    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>>;
    fn finish(&mut self) -> Result<Vec<u8>>;
}

fn arrow_err(e: impl std::fmt::Display) -> Error {
    Error::Execution(Box::new(datafusion::error::DataFusionError::Execution(
        e.to_string(),
    )))
}

struct JsonArray {
    writer: arrow::json::Writer<Vec<u8>, arrow::json::writer::JsonArray>,
    rows: usize,
}

struct Ndjson;

fn json_builder() -> arrow::json::WriterBuilder {
    arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_timestamp_format(TS_FORMAT.into())
        .with_timestamp_tz_format(TS_TZ_FORMAT.into())
}

impl Encoder for JsonArray {
    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>> {
        let batch = utc_z(batch)?;
        self.rows += batch.num_rows();
        self.writer.write(&batch).map_err(arrow_err)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        if self.rows == 0 {
            return Ok(b"[]".to_vec());
        }
        self.writer.finish().map_err(arrow_err)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }
}

impl Encoder for Ndjson {
    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>> {
        let batch = utc_z(batch)?;
        let mut w = json_builder().build::<_, arrow::json::writer::LineDelimited>(Vec::new());
        w.write(&batch).map_err(arrow_err)?;
        w.finish().map_err(arrow_err)?;
        Ok(w.into_inner())
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

/// Timestamps in UTC come out with a `Z` rather than `+00:00`: they are re-typed as
/// zone-less for the writer, whose zone-less format ends in `Z`.
fn utc_z(batch: &RecordBatch) -> Result<RecordBatch> {
    let utc = |tz: &Option<Arc<str>>| {
        tz.as_deref()
            .is_some_and(|t| matches!(t, "UTC" | "+00:00" | "Z" | "Etc/UTC"))
    };
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Timestamp(_, tz) if utc(tz)))
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        match f.data_type() {
            DataType::Timestamp(unit, tz) if utc(tz) => {
                let t = DataType::Timestamp(*unit, None);
                columns.push(arrow::compute::cast(c, &t).map_err(arrow_err)?);
                fields.push(f.as_ref().clone().with_data_type(t));
            }
            _ => {
                columns.push(Arc::clone(c));
                fields.push(f.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(arrow_err)
}

/// Writes rows only; [`encode`] sends the header line first, so even an empty result has one.
struct Csv;

impl Encoder for Csv {
    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>> {
        let batch = flatten_nested(&utc_z(batch)?)?;
        let mut out = Vec::new();
        {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(false)
                .with_timestamp_format(TS_FORMAT.into())
                .with_timestamp_tz_format(TS_TZ_FORMAT.into())
                .build(&mut out);
            w.write(&batch).map_err(arrow_err)?;
        }
        Ok(out)
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

/// CSV has no nested values: maps, lists and structs become their display text
/// (`{host: a, job: b}`).
fn flatten_nested(batch: &RecordBatch) -> Result<RecordBatch> {
    let nested = |t: &DataType| {
        matches!(
            t,
            DataType::Map(..)
                | DataType::List(_)
                | DataType::LargeList(_)
                | DataType::FixedSizeList(..)
                | DataType::Struct(_)
        )
    };
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| nested(f.data_type()))
    {
        return Ok(batch.clone());
    }
    let opts = FormatOptions::default();
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        if nested(f.data_type()) {
            let fmt = ArrayFormatter::try_new(c.as_ref(), &opts).map_err(arrow_err)?;
            let mut b = StringBuilder::new();
            for i in 0..c.len() {
                if c.is_null(i) {
                    b.append_null();
                } else {
                    b.append_value(fmt.value(i).to_string());
                }
            }
            columns.push(Arc::new(b.finish()));
            fields.push(Field::new(f.name(), DataType::Utf8, true));
        } else {
            columns.push(Arc::clone(c));
            fields.push(f.as_ref().clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(arrow_err)
}

struct Ipc {
    writer: arrow::ipc::writer::StreamWriter<Vec<u8>>,
}

impl Encoder for Ipc {
    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>> {
        self.writer.write(batch).map_err(arrow_err)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        self.writer.finish().map_err(arrow_err)?;
        Ok(std::mem::take(self.writer.get_mut()))
    }
}

/// A `Write` whose bytes the encoder takes away after every batch.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Parquet {
    writer: Option<parquet::arrow::ArrowWriter<SharedBuf>>,
    buf: SharedBuf,
}

impl Encoder for Parquet {
    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>> {
        if let Some(w) = self.writer.as_mut() {
            w.write(batch).map_err(arrow_err)?;
            if w.in_progress_rows() >= PARQUET_ROW_GROUP {
                w.flush().map_err(arrow_err)?;
            }
        }
        Ok(std::mem::take(&mut *self.buf.0.lock()))
    }

    fn finish(&mut self) -> Result<Vec<u8>> {
        if let Some(w) = self.writer.take() {
            w.close().map_err(arrow_err)?;
        }
        Ok(std::mem::take(&mut *self.buf.0.lock()))
    }
}

fn encoder(format: Format, schema: &SchemaRef) -> Result<Box<dyn Encoder>> {
    Ok(match format {
        Format::Json => Box::new(JsonArray {
            writer: json_builder().build::<_, arrow::json::writer::JsonArray>(Vec::new()),
            rows: 0,
        }),
        Format::Ndjson => Box::new(Ndjson),
        Format::Csv => Box::new(Csv),
        Format::Arrow => Box::new(Ipc {
            writer: arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)
                .map_err(arrow_err)?,
        }),
        Format::Parquet => {
            let buf = SharedBuf::default();
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::ZSTD(
                    parquet::basic::ZstdLevel::default(),
                ))
                .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP))
                .build();
            let writer =
                parquet::arrow::ArrowWriter::try_new(buf.clone(), Arc::clone(schema), Some(props))
                    .map_err(arrow_err)?;
            Box::new(Parquet {
                writer: Some(writer),
                buf,
            })
        }
    })
}

/// Encodes `stream` as `format`. An error mid-stream ends the byte stream with that error, so
/// an HTTP client sees a broken response rather than a silently short one.
pub fn encode(
    format: Format,
    stream: SendableRecordBatchStream,
) -> Result<impl Stream<Item = Result<Bytes>> + Send + 'static> {
    let schema = stream.schema();
    let enc = encoder(format, &schema)?;
    let header = if format == Format::Csv {
        let names: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| csv_escape(f.name()))
            .collect();
        format!("{}\n", names.join(",")).into_bytes()
    } else {
        Vec::new()
    };
    struct St {
        stream: SendableRecordBatchStream,
        enc: Box<dyn Encoder>,
        pending: Option<Vec<u8>>,
        finished: bool,
    }
    let state = St {
        stream,
        enc,
        pending: Some(header),
        finished: false,
    };
    Ok(futures::stream::unfold(state, |mut st| async move {
        if let Some(p) = st.pending.take()
            && !p.is_empty()
        {
            return Some((Ok(Bytes::from(p)), st));
        }
        if st.finished {
            return None;
        }
        loop {
            match st.stream.next().await {
                Some(Ok(batch)) => match st.enc.batch(&batch) {
                    Ok(bytes) if bytes.is_empty() => continue,
                    Ok(bytes) => return Some((Ok(Bytes::from(bytes)), st)),
                    Err(e) => {
                        st.finished = true;
                        return Some((Err(e), st));
                    }
                },
                Some(Err(e)) => {
                    st.finished = true;
                    return Some((Err(Error::from_datafusion(e)), st));
                }
                None => {
                    st.finished = true;
                    return match st.enc.finish() {
                        Ok(bytes) if bytes.is_empty() => None,
                        Ok(bytes) => Some((Ok(Bytes::from(bytes)), st)),
                        Err(e) => Some((Err(e), st)),
                    };
                }
            }
        }
    }))
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
