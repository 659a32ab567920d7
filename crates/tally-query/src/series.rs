//! Time series from the `metrics` table without writing SQL: one metric, label matchers, an
//! aggregation per time bucket, optional grouping by labels. Also the catalog questions a
//! metric picker asks (metric names, label names, label values).
//!
//! The SQL reduces each series to one partial per bucket (sum and count, min, max, last, or the
//! reset-aware increase of a counter); series are then combined per group here, so averages
//! and rates stay exact when several series fall into one group.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use arrow::array::{Array, AsArray, MapArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit};
use futures::TryStreamExt;

use crate::macros::{self, MacroContext};
use crate::{Error, QueryEngine, Result};

/// How samples become one value per bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// Mean of every sample in the bucket.
    Avg,
    /// Sum of every sample in the bucket.
    Sum,
    Min,
    Max,
    /// Number of samples.
    Count,
    /// Each series' last sample, added across the series of a group.
    Last,
    /// Counter increase per second over the time the bucket's samples span, reset-aware;
    /// the rates of a group's series are added.
    Rate,
    /// Counter increase over the bucket, reset-aware, added across series.
    Increase,
}

impl Aggregation {
    pub const NAMES: [&'static str; 8] = [
        "avg", "sum", "min", "max", "count", "last", "rate", "increase",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "avg" | "mean" => Self::Avg,
            "sum" => Self::Sum,
            "min" => Self::Min,
            "max" => Self::Max,
            "count" => Self::Count,
            "last" => Self::Last,
            "rate" => Self::Rate,
            "increase" => Self::Increase,
            _ => return None,
        })
    }

    fn is_counter(self) -> bool {
        matches!(self, Self::Rate | Self::Increase)
    }
}

/// A condition on one label; a missing label reads as "", as in PromQL.
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    /// Fully anchored regular expression.
    Regex(String, String),
    NotRegex(String, String),
    /// The label read as a number, compared with `<`, `<=`, `>` or `>=`.
    Compare(String, &'static str, f64),
}

impl Matcher {
    fn sql(&self) -> String {
        let label = |k: &str| format!("coalesce(labels[{}], '')", quote(k));
        let list = |vs: &[String]| vs.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ");
        match self {
            Self::In(_, vs) if vs.is_empty() => "FALSE".into(),
            Self::In(k, vs) => format!("{} IN ({})", label(k), list(vs)),
            Self::NotIn(_, vs) if vs.is_empty() => "TRUE".into(),
            Self::NotIn(k, vs) => format!("{} NOT IN ({})", label(k), list(vs)),
            Self::Regex(k, re) => format!("{} ~ {}", label(k), quote(&format!("^(?:{re})$"))),
            Self::NotRegex(k, re) => {
                format!("{} !~ {}", label(k), quote(&format!("^(?:{re})$")))
            }
            Self::Compare(k, op, v) => {
                format!("TRY_CAST(labels[{}] AS DOUBLE) {op} {v:?}", quote(k))
            }
        }
    }
}

/// One metric, bucketed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesRequest {
    pub metric: String,
    pub matchers: Vec<Matcher>,
    pub aggregation: Aggregation,
    /// `None`: one series per label set. `Some(keys)`: one per distinct value of those labels
    /// (`Some(vec![])`: everything in one series).
    pub group_by: Option<Vec<String>>,
    /// Range and bucket width; buckets start at multiples of the width since the epoch.
    pub range: MacroContext,
}

/// One output series: bucket start times (epoch ms, ascending) and values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub times_ms: Vec<i64>,
    pub values: Vec<f64>,
}

/// Counters need the sample before the first bucket to count the first bucket's increase.
const MIN_COUNTER_LOOKBACK_MS: i64 = 5 * 60 * 1000;

impl QueryEngine {
    /// Runs `sql` under the usual limits and collects the batches.
    pub async fn collect(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let result = self.execute(sql).await?;
        result
            .stream
            .try_collect()
            .await
            .map_err(Error::from_datafusion)
    }

    /// The bucketed series of one metric.
    ///
    /// Without grouping, the partials per `(series_id, bucket)` and the labels of each series
    /// are two queries run side by side: carrying the labels map through the window and the
    /// aggregation would hold one map per bucket. With grouping, series are combined in SQL
    /// by their group labels, so the result holds one row per group and bucket however many
    /// series feed it (the row limit then bounds what the panel shows, not the input).
    pub async fn series(&self, req: &SeriesRequest) -> Result<Vec<Series>> {
        let partials_sql = series_sql(req)?;
        let (partials, labels) = if req.group_by.is_some() {
            (self.collect(&partials_sql).await?, HashMap::new())
        } else {
            let labels_sql = labels_sql(req)?;
            let (p, l) =
                futures::try_join!(self.collect(&partials_sql), self.collect(&labels_sql))?;
            (p, series_labels(&l)?)
        };
        combine(req, &partials, &labels)
    }

    /// Every metric name, sorted.
    pub async fn metric_names(&self) -> Result<Vec<String>> {
        let batches = self
            .collect("SELECT DISTINCT metric FROM metrics ORDER BY metric")
            .await?;
        strings(&batches, 0)
    }

    /// Label names per metric, for metrics with samples in `range` when one is given.
    pub async fn metric_label_names(
        &self,
        range: Option<&MacroContext>,
    ) -> Result<BTreeMap<String, Vec<String>>> {
        let filter = where_clause(None, &[], range)?;
        let sql = format!(
            "SELECT metric, k FROM (SELECT metric, unnest(map_keys(labels)) AS k \
             FROM metrics{filter}) WHERE k IS NOT NULL GROUP BY metric, k ORDER BY metric, k"
        );
        let batches = self.collect(&sql).await?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (m, k) in strings(&batches, 0)?.into_iter().zip(strings(&batches, 1)?) {
            out.entry(m).or_default().push(k);
        }
        Ok(out)
    }

    /// Label names of `metric` (or of every metric), among series matching `matchers`,
    /// with samples in `range` when one is given.
    pub async fn label_names(
        &self,
        metric: Option<&str>,
        matchers: &[Matcher],
        range: Option<&MacroContext>,
    ) -> Result<Vec<String>> {
        let filter = where_clause(metric, matchers, range)?;
        let sql = format!(
            "SELECT k FROM (SELECT unnest(map_keys(labels)) AS k FROM metrics{filter}) \
             GROUP BY k ORDER BY k"
        );
        strings(&self.collect(&sql).await?, 0)
    }

    /// Values of label `key` (of `metric` or of every metric), narrowed like
    /// [`Self::label_names`].
    pub async fn label_values(
        &self,
        metric: Option<&str>,
        key: &str,
        matchers: &[Matcher],
        range: Option<&MacroContext>,
    ) -> Result<Vec<String>> {
        let mut filter = where_clause(metric, matchers, range)?;
        let cond = format!("labels[{}] IS NOT NULL", quote(key));
        if filter.is_empty() {
            filter = format!(" WHERE {cond}");
        } else {
            let _ = write!(filter, " AND {cond}");
        }
        let sql = format!(
            "SELECT labels[{k}] AS v FROM metrics{filter} GROUP BY labels[{k}] ORDER BY v",
            k = quote(key)
        );
        strings(&self.collect(&sql).await?, 0)
    }
}

/// A SQL string literal.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn where_clause(
    metric: Option<&str>,
    matchers: &[Matcher],
    range: Option<&MacroContext>,
) -> Result<String> {
    let mut conds = Vec::new();
    if let Some(m) = metric {
        conds.push(format!("metric = {}", quote(m)));
    }
    if let Some(r) = range {
        conds.push(macros::expand("$__timeFilter(time)", r)?);
    }
    conds.extend(matchers.iter().map(Matcher::sql));
    Ok(if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    })
}

/// SQL answering `(key..., bucket, a, b)`: the key is `series_id`, or the group labels
/// `g0, g1, ...` when grouping. `a` and `b` are the partials `combine` finishes.
fn series_sql(req: &SeriesRequest) -> Result<String> {
    let r = &req.range;
    if r.to_us <= r.from_us {
        return Err(Error::InvalidQuery("the time range is empty".into()));
    }
    let matchers: String = req
        .matchers
        .iter()
        .map(|m| format!(" AND {}", m.sql()))
        .collect();
    let metric = quote(&req.metric);
    let groups: Vec<String> = req
        .group_by
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, k)| format!("labels[{}] AS g{i}", quote(k)))
        .collect();
    let group_cols: String = (0..groups.len()).map(|i| format!(", g{i}")).collect();
    let group_select: String = groups.iter().map(|g| format!(", {g}")).collect();
    let inner = if req.aggregation.is_counter() {
        let lookback = MacroContext {
            from_us: r.from_us - r.interval_ms.max(MIN_COUNTER_LOOKBACK_MS) * 1000,
            ..*r
        };
        // A drop means the counter restarted from zero: its whole value is the increase. A
        // rate divides each series' increase by the time its deltas span (not by the bucket
        // width), so buckets narrower than the sampling interval still get the true rate.
        let a = match req.aggregation {
            Aggregation::Rate => "sum(delta) / NULLIF(sum(seconds), 0)",
            _ => "sum(delta)",
        };
        format!(
            "WITH s AS (SELECT series_id, time, value{group_select}, \
               lag(value) OVER (PARTITION BY series_id ORDER BY time) AS prev, \
               lag(time) OVER (PARTITION BY series_id ORDER BY time) AS prev_time \
               FROM metrics WHERE metric = {metric} AND {lookback_filter}{matchers}), \
             d AS (SELECT series_id, time{group_cols}, \
               CASE WHEN prev IS NULL THEN 0.0 WHEN value < prev THEN value \
                    ELSE value - prev END AS delta, \
               CASE WHEN prev IS NULL THEN 0.0 \
                    ELSE (CAST(time AS BIGINT) - CAST(prev_time AS BIGINT)) / 1000000.0 END AS seconds \
               FROM s WHERE $__timeFilter(time)) \
             SELECT series_id{group_cols}, $__dateBin(time) AS bucket, \
               {a} AS a, CAST(NULL AS DOUBLE) AS b \
             FROM d GROUP BY series_id{group_cols}, bucket",
            lookback_filter = macros::expand("$__timeFilter(time)", &lookback)?,
        )
    } else {
        let (a, b) = match req.aggregation {
            Aggregation::Avg | Aggregation::Sum => ("sum(value)", "CAST(count(value) AS DOUBLE)"),
            Aggregation::Count => ("CAST(count(value) AS DOUBLE)", "NULL"),
            Aggregation::Min => ("min(value)", "NULL"),
            Aggregation::Max => ("max(value)", "NULL"),
            Aggregation::Last => ("last_value(value ORDER BY time)", "NULL"),
            Aggregation::Rate | Aggregation::Increase => unreachable!("counters handled above"),
        };
        format!(
            "SELECT series_id{group_select}, $__dateBin(time) AS bucket, \
               {a} AS a, CAST({b} AS DOUBLE) AS b \
             FROM metrics WHERE metric = {metric} AND $__timeFilter(time){matchers} \
             GROUP BY series_id{group_cols}, bucket"
        )
    };
    let sql = if req.group_by.is_some() {
        // Series combine per group: min of mins, max of maxes, sums of everything else.
        let outer = match req.aggregation {
            Aggregation::Min => "min(a)",
            Aggregation::Max => "max(a)",
            _ => "sum(a)",
        };
        let keys = if groups.is_empty() {
            String::new()
        } else {
            format!("{}, ", group_cols.trim_start_matches(", "))
        };
        format!(
            "SELECT {keys}bucket, {outer} AS a, sum(b) AS b FROM ({inner}) \
             WHERE a IS NOT NULL GROUP BY {keys}bucket"
        )
    } else {
        format!("SELECT series_id, bucket, a, b FROM ({inner})")
    };
    macros::expand(&sql, r)
}

/// The labels of every series the request matches in its range.
fn labels_sql(req: &SeriesRequest) -> Result<String> {
    let filter = where_clause(Some(&req.metric), &req.matchers, Some(&req.range))?;
    Ok(format!(
        "SELECT series_id, first_value(labels) AS labels FROM metrics{filter} GROUP BY series_id"
    ))
}

fn series_labels(batches: &[RecordBatch]) -> Result<HashMap<i64, BTreeMap<String, String>>> {
    let mut out = HashMap::new();
    for batch in batches {
        let ids = batch.column(0).as_primitive::<Int64Type>();
        let labels = batch
            .column(1)
            .as_any()
            .downcast_ref::<MapArray>()
            .ok_or_else(|| internal("labels is not a map"))?;
        for row in 0..batch.num_rows() {
            out.insert(ids.value(row), map_row(labels, row));
        }
    }
    Ok(out)
}

fn combine(
    req: &SeriesRequest,
    batches: &[RecordBatch],
    labels: &HashMap<i64, BTreeMap<String, String>>,
) -> Result<Vec<Series>> {
    let mut out: BTreeMap<BTreeMap<String, String>, Vec<(i64, f64)>> = BTreeMap::new();
    let group_keys = req.group_by.as_deref();
    for batch in batches {
        let n = batch.num_columns();
        // date_bin's result unit follows its arguments; epoch ms is what Grafana wants.
        let bucket = arrow::compute::cast(
            batch.column(n - 3),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )
        .and_then(|b| arrow::compute::cast(&b, &DataType::Int64))
        .map_err(|e| internal(&e.to_string()))?;
        let bucket = bucket.as_primitive::<Int64Type>();
        let a = batch.column(n - 2).as_primitive::<Float64Type>();
        let b = batch.column(n - 1).as_primitive::<Float64Type>();
        let keys: Vec<StringArray> = match group_keys {
            Some(_) => (0..n - 3)
                .map(|i| {
                    arrow::compute::cast(batch.column(i), &DataType::Utf8)
                        .map(|c| c.as_string::<i32>().clone())
                        .map_err(|e| internal(&e.to_string()))
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let ids = match group_keys {
            None => Some(batch.column(0).as_primitive::<Int64Type>()),
            Some(_) => None,
        };
        for row in 0..batch.num_rows() {
            if a.is_null(row) {
                continue;
            }
            let key = match (group_keys, ids) {
                (Some(names), _) => names
                    .iter()
                    .zip(&keys)
                    .filter(|(_, col)| !col.is_null(row))
                    .map(|(k, col)| (k.clone(), col.value(row).to_string()))
                    .collect(),
                // Both queries read the same rows; a series written between them may lack
                // its labels and is shown without.
                (None, Some(ids)) => labels.get(&ids.value(row)).cloned().unwrap_or_default(),
                (None, None) => BTreeMap::new(),
            };
            let v = match req.aggregation {
                Aggregation::Avg => a.value(row) / b.value(row),
                _ => a.value(row),
            };
            out.entry(key).or_default().push((bucket.value(row), v));
        }
    }
    Ok(out
        .into_iter()
        .map(|(labels, mut points)| {
            points.sort_by_key(|(t, _)| *t);
            let (times_ms, values) = points.into_iter().unzip();
            Series {
                labels,
                times_ms,
                values,
            }
        })
        .collect())
}

fn internal(what: &str) -> Error {
    Error::Execution(Box::new(datafusion::error::DataFusionError::Internal(
        format!("series query: {what}"),
    )))
}

/// The labels of one row of a `labels` map column.
pub fn map_row(map: &MapArray, row: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if map.is_null(row) {
        return out;
    }
    let entries = map.value(row);
    let (Some(keys), Some(values)) = (
        entries.column(0).as_string_opt::<i32>(),
        entries.column(1).as_string_opt::<i32>(),
    ) else {
        return out;
    };
    for i in 0..entries.len() {
        if !values.is_null(i) {
            out.insert(keys.value(i).to_string(), values.value(i).to_string());
        }
    }
    out
}

/// Column `col` of every batch as strings (nulls skipped); string views and dictionaries are
/// cast first.
fn strings(batches: &[RecordBatch], col: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        let array = arrow::compute::cast(b.column(col), &DataType::Utf8)
            .map_err(|e| internal(&e.to_string()))?;
        let array: &StringArray = array.as_string();
        out.extend(array.iter().flatten().map(str::to_string));
    }
    Ok(out)
}
