//! What `/query` answers, in the three shapes Grafana's `toDataFrame` reads: data frames
//! (`schema` + `data`, the default: typed, labelled, compact), SimpleJSON time series
//! (`target` + `datapoints`) and SimpleJSON tables (`columns` + `rows`).
//!
//! Times are epoch milliseconds, ascending; NaN and infinities become `null` (JSON has none).

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit};
use serde_json::{Map, Value, json};
use tally_query::series::Series;

use crate::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Grafana data frame JSON (`schema` + `data`).
    Frame,
    /// SimpleJSON `{target, datapoints}`.
    TimeSeries,
    /// SimpleJSON `{columns, rows}`.
    Table,
}

impl Format {
    /// From a payload's `format`, or the legacy target key `type` (`timeserie`/`table`).
    pub(crate) fn from_target(
        payload: &Map<String, Value>,
        target: &Value,
    ) -> Result<Self, ApiError> {
        let name = payload
            .get("format")
            .and_then(Value::as_str)
            .or_else(|| target.get("type").and_then(Value::as_str));
        Ok(match name.map(str::to_ascii_lowercase).as_deref() {
            None | Some("" | "frame" | "frames" | "dataframe" | "data_frame") => Self::Frame,
            Some("timeseries" | "time_series" | "timeserie" | "datapoints") => Self::TimeSeries,
            Some("table") => Self::Table,
            Some(other) => {
                return Err(super::request::bad(format!(
                    "unknown format '{other}' (use frame, timeseries or table)"
                )));
            }
        })
    }
}

/// One named series with its own value column name, ready to render.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Named {
    /// Frame name: the metric, KPI or query.
    pub name: String,
    /// Name of the value field (`value` for metrics, the column for SQL results).
    pub field: String,
    pub series: Series,
}

fn num(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// The unit of one field from a unit spec: one Grafana unit for every field (`percentunit`),
/// or per field (`signups=short, conversion=percentunit`).
pub(crate) fn unit_for<'a>(spec: Option<&'a str>, field: &str) -> Option<&'a str> {
    let spec = spec?.trim();
    if !spec.contains('=') {
        return Some(spec).filter(|s| !s.is_empty());
    }
    spec.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == field).then(|| v.trim())
    })
}

fn display_name(n: &Named) -> String {
    let mut s = n.name.clone();
    if n.field != "value" && n.field != n.name {
        s = format!("{s} {}", n.field);
    }
    if !n.series.labels.is_empty() {
        let labels: Vec<String> = n
            .series
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        s = format!("{s}{{{}}}", labels.join(", "));
    }
    s
}

/// Time series in the requested shape.
pub(crate) fn series(
    ref_id: &str,
    all: &[Named],
    format: Format,
    unit: Option<&str>,
) -> Vec<Value> {
    match format {
        Format::Frame => all
            .iter()
            .map(|n| {
                let mut value_field = json!({"name": n.field, "type": "number"});
                if !n.series.labels.is_empty() {
                    value_field["labels"] = json!(n.series.labels);
                }
                let mut config = json!({"displayNameFromDS": display_name(n)});
                if let Some(u) = unit_for(unit, &n.field) {
                    config["unit"] = json!(u);
                }
                value_field["config"] = config;
                json!({
                    "schema": {
                        "refId": ref_id,
                        "name": n.name,
                        "fields": [{"name": "time", "type": "time"}, value_field],
                    },
                    "data": {"values": [
                        n.series.times_ms,
                        n.series.values.iter().map(|v| num(*v)).collect::<Vec<_>>(),
                    ]},
                })
            })
            .collect(),
        Format::TimeSeries => all
            .iter()
            .map(|n| {
                let mut out = json!({
                    "target": display_name(n),
                    "refId": ref_id,
                    "datapoints": n.series.times_ms.iter().zip(&n.series.values)
                        .map(|(t, v)| json!([num(*v), t]))
                        .collect::<Vec<_>>(),
                });
                if !n.series.labels.is_empty() {
                    out["tags"] = json!(n.series.labels);
                }
                if let Some(u) = unit_for(unit, &n.field) {
                    out["unit"] = json!(u);
                }
                out
            })
            .collect(),
        Format::Table => {
            // One long table: time, every label, which field (when there are several, as in
            // a KPI with numerator, denominator and ratio) and the value.
            let keys: BTreeSet<&String> = all.iter().flat_map(|n| n.series.labels.keys()).collect();
            let several = all.iter().any(|n| n.field != all[0].field);
            let mut rows: Vec<(i64, Vec<Value>)> = Vec::new();
            for n in all {
                for (t, v) in n.series.times_ms.iter().zip(&n.series.values) {
                    let mut row = vec![json!(t)];
                    row.extend(keys.iter().map(|k| json!(n.series.labels.get(*k))));
                    if several {
                        row.push(json!(n.field));
                    }
                    row.push(num(*v));
                    rows.push((*t, row));
                }
            }
            rows.sort_by_key(|(t, _)| *t);
            let mut columns = vec![json!({"text": "time", "type": "time"})];
            columns.extend(keys.iter().map(|k| json!({"text": k, "type": "string"})));
            if several {
                columns.push(json!({"text": "field", "type": "string"}));
            }
            let mut value = json!({"text": "value", "type": "number"});
            // Per-field units cannot apply to a column that mixes fields.
            if let Some(u) = unit.filter(|u| !u.contains('=')) {
                value["unit"] = json!(u);
            }
            columns.push(value);
            // `type` is not needed by Grafana, but the plugin's OpenAPI file requires it.
            vec![json!({
                "type": "table",
                "refId": ref_id,
                "name": all.first().map(|n| n.name.clone()).unwrap_or_default(),
                "columns": columns,
                "rows": rows.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            })]
        }
    }
}

/// A column of a SQL result as Grafana field values.
struct Column {
    name: String,
    kind: &'static str,
    values: Vec<Value>,
}

/// Epoch ms from a time column: timestamps of any unit, dates, or numbers (seconds, ms, µs or
/// ns told apart by magnitude, as Grafana's SQL datasources do).
fn time_values(array: &dyn Array) -> Option<Vec<Option<i64>>> {
    let ms = match array.data_type() {
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
            let a = cast(array, &DataType::Timestamp(TimeUnit::Millisecond, None)).ok()?;
            let a = cast(&a, &DataType::Int64).ok()?;
            a.as_primitive::<Int64Type>().iter().collect()
        }
        t if t.is_numeric() => {
            let a = cast(array, &DataType::Float64).ok()?;
            a.as_primitive::<Float64Type>()
                .iter()
                .map(|v| {
                    v.map(|v| {
                        let m = v.abs();
                        (if m < 1e11 {
                            v * 1e3
                        } else if m < 1e14 {
                            v
                        } else if m < 1e17 {
                            v / 1e3
                        } else {
                            v / 1e6
                        }) as i64
                    })
                })
                .collect()
        }
        _ => return None,
    };
    Some(ms)
}

fn column(name: &str, array: &dyn Array) -> Result<Column, ApiError> {
    let dt = array.data_type();
    let (kind, values) = if matches!(
        dt,
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64
    ) {
        let v = time_values(array).unwrap_or_default();
        ("time", v.into_iter().map(|t| json!(t)).collect())
    } else if dt.is_numeric() {
        let a = cast(array, &DataType::Float64).map_err(|e| ApiError::internal(&e))?;
        let a = a.as_primitive::<Float64Type>();
        (
            "number",
            a.iter().map(|v| v.map_or(Value::Null, num)).collect(),
        )
    } else if *dt == DataType::Boolean {
        let a = array.as_boolean();
        ("boolean", a.iter().map(|v| json!(v)).collect())
    } else {
        let a = cast(array, &DataType::Utf8).map_err(|e| ApiError::internal(&e))?;
        let a = a.as_string::<i32>();
        ("string", a.iter().map(|v| json!(v)).collect())
    };
    Ok(Column {
        name: name.to_string(),
        kind,
        values,
    })
}

fn columns(batches: &[RecordBatch]) -> Result<Vec<Column>, ApiError> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let schema = first.schema();
    let mut out: Vec<Column> = Vec::with_capacity(schema.fields().len());
    for (i, f) in schema.fields().iter().enumerate() {
        let mut col = Column {
            name: f.name().clone(),
            kind: "string",
            values: Vec::new(),
        };
        for b in batches {
            let c = column(f.name(), b.column(i).as_ref())?;
            col.kind = c.kind;
            col.values.extend(c.values);
        }
        out.push(col);
    }
    Ok(out)
}

/// A SQL result with a `time` column: one series per distinct combination of its string
/// columns (the labels) and per numeric column, sorted by time. `None` if there is no
/// usable `time` column.
pub(crate) fn result_series(
    name: &str,
    batches: &[RecordBatch],
) -> Result<Option<Vec<Named>>, ApiError> {
    let Some(first) = batches.first() else {
        return Ok(Some(Vec::new()));
    };
    let schema = first.schema();
    let Some(time_idx) = schema
        .fields()
        .iter()
        .position(|f| f.name().eq_ignore_ascii_case("time"))
    else {
        return Ok(None);
    };
    let mut times = Vec::new();
    for b in batches {
        match time_values(b.column(time_idx).as_ref()) {
            Some(t) => times.extend(t),
            None => return Ok(None),
        }
    }
    let cols = columns(batches)?;
    let labels: Vec<&Column> = cols
        .iter()
        .enumerate()
        .filter(|(i, c)| *i != time_idx && c.kind == "string")
        .map(|(_, c)| c)
        .collect();
    let values: Vec<&Column> = cols
        .iter()
        .enumerate()
        .filter(|(i, c)| *i != time_idx && c.kind == "number")
        .map(|(_, c)| c)
        .collect();
    // (labels, index of the value column) -> points
    type Key = (BTreeMap<String, String>, usize);
    let mut grouped: BTreeMap<Key, Vec<(i64, f64)>> = BTreeMap::new();
    for (row, t) in times.iter().enumerate() {
        let Some(t) = t else { continue };
        let key: BTreeMap<String, String> = labels
            .iter()
            .filter_map(|c| {
                c.values[row]
                    .as_str()
                    .map(|v| (c.name.clone(), v.to_string()))
            })
            .collect();
        for (vi, c) in values.iter().enumerate() {
            // SQL NULL (a division by zero guarded with NULLIF) is a gap, not a zero.
            let v = c.values[row].as_f64().unwrap_or(f64::NAN);
            grouped.entry((key.clone(), vi)).or_default().push((*t, v));
        }
    }
    Ok(Some(
        grouped
            .into_iter()
            .map(|((labels, vi), mut points)| {
                points.sort_by_key(|(t, _)| *t);
                let (times_ms, values_out) = points.into_iter().unzip();
                Named {
                    name: name.to_string(),
                    field: values[vi].name.clone(),
                    series: Series {
                        labels,
                        times_ms,
                        values: values_out,
                    },
                }
            })
            .collect(),
    ))
}

/// A SQL result without a time column, as one table.
pub(crate) fn table(
    ref_id: &str,
    name: &str,
    batches: &[RecordBatch],
    format: Format,
) -> Result<Value, ApiError> {
    let cols = columns(batches)?;
    Ok(match format {
        Format::Frame => json!({
            "schema": {
                "refId": ref_id,
                "name": name,
                "fields": cols.iter().map(|c| json!({"name": c.name, "type": c.kind})).collect::<Vec<_>>(),
            },
            "data": {"values": cols.iter().map(|c| &c.values).collect::<Vec<_>>()},
        }),
        // A table cannot be a time series without a time column; both SimpleJSON shapes get
        // the table.
        Format::Table | Format::TimeSeries => {
            let n = cols.first().map_or(0, |c| c.values.len());
            json!({
                "type": "table",
                "refId": ref_id,
                "name": name,
                "columns": cols.iter().map(|c| json!({"text": c.name, "type": c.kind})).collect::<Vec<_>>(),
                "rows": (0..n).map(|r| cols.iter().map(|c| c.values[r].clone()).collect::<Vec<_>>()).collect::<Vec<_>>(),
            })
        }
    })
}

/// Keeps the rows of a SQL result whose columns pass every ad hoc filter that names one of
/// them (filters on other keys do not apply to this result).
pub(crate) fn filter_rows(
    batches: Vec<RecordBatch>,
    filters: &[super::request::AdhocFilter],
) -> Result<Vec<RecordBatch>, ApiError> {
    if filters.is_empty() {
        return Ok(batches);
    }
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let schema = b.schema();
        let applicable: Vec<(usize, &super::request::AdhocFilter)> = filters
            .iter()
            .filter_map(|f| schema.index_of(&f.key).ok().map(|i| (i, f)))
            .collect();
        if applicable.is_empty() {
            out.push(b);
            continue;
        }
        let texts: Vec<_> = applicable
            .iter()
            .map(|(i, _)| cast(b.column(*i), &DataType::Utf8))
            .collect::<Result<_, _>>()
            .map_err(|e| ApiError::internal(&e))?;
        let keep: datafusion::arrow::array::BooleanArray = (0..b.num_rows())
            .map(|row| {
                Some(applicable.iter().zip(&texts).all(|((_, f), t)| {
                    let t = t.as_string::<i32>();
                    f.accepts(if t.is_null(row) { "" } else { t.value(row) })
                }))
            })
            .collect();
        out.push(
            datafusion::arrow::compute::filter_record_batch(&b, &keep)
                .map_err(|e| ApiError::internal(&e))?,
        );
    }
    Ok(out)
}
