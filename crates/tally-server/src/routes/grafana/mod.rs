//! The Grafana JSON datasource API (`simpod-json-datasource`), under a configurable prefix.
//!
//! Targets of `/query`:
//! - a metric name: bucketed series of the `metrics` table, shaped by the payload
//!   (`aggregation`, `group_by`, label matchers, `format`);
//! - `kpi.<name>`: a KPI file from `queries/`, expanded for the panel's range and bucket;
//! - `__sql`: the payload's `sql`, read-only, with the same macros;
//! - `_tally.runs`, `_tally.failed_runs`, `records.<table>`: annotation rows
//!   (`time`, `timeEnd`, `title`, `text`, `tags`).
//!
//! Errors are `{"error", "message"}` with a 4xx/5xx status; Grafana shows `message`.

mod frames;
mod request;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::routing::{get, post};
use axum::{Json, Router};
use datafusion::arrow::array::AsArray;
use serde_json::{Map, Value, json};
use tally_query::series::{Aggregation, Matcher, SeriesRequest, quote};
use tally_query::{MacroContext, macros};

use self::frames::{Format, Named};
use self::request::{
    AdhocFilter, adhoc_filters, bad, json_body, list_param, payload_matchers, payload_of,
    query_context, range_of, target_name,
};
use crate::routes::sql::body_error;
use crate::{ApiError, AppState};

/// Target that runs the payload's `sql`.
const SQL_TARGET: &str = "__sql";
const RUNS_TARGET: &str = "_tally.runs";
const FAILED_RUNS_TARGET: &str = "_tally.failed_runs";
const RECORDS_PREFIX: &str = "records.";
const KPI_PREFIX: &str = "kpi.";

pub(crate) fn router(prefix: &str) -> Router<AppState> {
    Router::new()
        .route(prefix, get(health))
        .route(&format!("{prefix}/"), get(health))
        .route(&format!("{prefix}/metrics"), post(metrics))
        .route(
            &format!("{prefix}/metric-payload-options"),
            post(payload_options),
        )
        .route(&format!("{prefix}/query"), post(query))
        .route(&format!("{prefix}/variable"), post(variable))
        .route(&format!("{prefix}/tag-keys"), post(tag_keys))
        .route(&format!("{prefix}/tag-values"), post(tag_values))
}

type Body = Result<Bytes, BytesRejection>;

fn body_json(state: &AppState, body: Body) -> Result<Value, ApiError> {
    json_body(&body.map_err(|e| body_error(state, e))?)
}

/// "Save & test" needs exactly 200.
async fn health() -> Json<Value> {
    Json(json!({"status": "ok", "message": "Tally: Grafana JSON datasource API"}))
}

// ---------------------------------------------------------------------------------------
// /metrics and /metric-payload-options: the metric picker and its dropdowns.

fn option(value: &str) -> Value {
    json!({"label": value, "value": value})
}

/// Payload fields of a metric: aggregation, grouping, one filter per label, output format.
fn metric_payloads(label_names: &[String]) -> Vec<Value> {
    let mut out = vec![
        json!({
            "name": "aggregation", "label": "Aggregation", "type": "select", "width": 12,
            "placeholder": "avg (rate or increase for counters)",
            "options": Aggregation::NAMES.iter().map(|a| option(a)).collect::<Vec<_>>(),
        }),
        json!({
            "name": "group_by", "label": "Group by", "type": "multi-select", "width": 20,
            "placeholder": "each series",
        }),
    ];
    // Choosing a label value reloads the metric list, which narrows the other label fields
    // to the labels the matching series still have.
    out.extend(
        label_names
            .iter()
            .filter(|k| !request::RESERVED.contains(&k.as_str()))
            .map(|k| json!({"name": k, "label": k, "type": "multi-select", "reloadMetric": true})),
    );
    out.push(format_payload());
    out
}

const FORMATS: [&str; 3] = ["frame", "timeseries", "table"];

fn format_payload() -> Value {
    json!({
        "name": "format", "label": "Format", "type": "select", "placeholder": "frame",
        "options": FORMATS.iter().map(|f| option(f)).collect::<Vec<_>>(),
    })
}

/// The metric and payload the builder has chosen so far (both may be missing).
fn picked(body: &Value) -> (Option<String>, Map<String, Value>) {
    let metric = body
        .get("metric")
        .map(target_name)
        .filter(|m| !m.is_empty());
    let payload = body
        .get("payload")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    (metric, payload)
}

async fn metrics(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let body = body_json(&state, body)?;
    let (chosen, payload) = picked(&body);
    let engine = &state.engine;
    let names = engine.metric_names().await?;
    let mut labels = engine.metric_label_names(None).await?;
    if let Some(m) = chosen.as_deref().filter(|m| names.iter().any(|n| n == m)) {
        // The chosen metric's fields come from all its data, narrowed by the labels picked
        // so far; a field already in use stays.
        let matchers = payload_matchers(&payload, None);
        let mut keys = engine.label_names(Some(m), &matchers, None).await?;
        keys.extend(
            payload
                .keys()
                .filter(|k| !request::RESERVED.contains(&k.as_str()))
                .cloned(),
        );
        keys.sort();
        keys.dedup();
        labels.insert(m.to_string(), keys);
    }
    let mut out: Vec<Value> = names
        .iter()
        .map(|m| {
            let keys = labels.get(m).map(Vec::as_slice).unwrap_or_default();
            json!({"value": m, "label": m, "payloads": metric_payloads(keys)})
        })
        .collect();
    for kpi in engine.kpis().iter() {
        out.push(json!({
            "value": format!("{KPI_PREFIX}{}", kpi.name),
            "label": format!("KPI: {}", kpi.title),
            "payloads": [format_payload()],
        }));
    }
    out.push(json!({
        "value": SQL_TARGET,
        "label": "Raw SQL",
        "payloads": [
            {"name": "sql", "label": "SQL", "type": "textarea", "width": 60,
             "placeholder": "SELECT $__dateBin(time) AS time, avg(value) AS value FROM metrics WHERE $__timeFilter(time) GROUP BY 1"},
            format_payload(),
        ],
    }));
    out.push(
        json!({"value": RUNS_TARGET, "label": "Annotations: job runs",
        "payloads": [{"name": "job", "label": "Job", "type": "multi-select"}]}),
    );
    out.push(
        json!({"value": FAILED_RUNS_TARGET, "label": "Annotations: failed job runs",
        "payloads": [{"name": "job", "label": "Job", "type": "multi-select"}]}),
    );
    for table in records_tables(&state).await? {
        let column = |name: &str, label: &str, placeholder: &str| json!({"name": name, "label": label, "type": "input", "placeholder": placeholder});
        out.push(json!({
            "value": format!("{RECORDS_PREFIX}{table}"),
            "label": format!("Annotations: table {table}"),
            "payloads": [
                column("time", "Time column", "time"),
                column("time_end", "End column", "(none)"),
                column("title", "Title column", "(none)"),
                column("text", "Text column", "(none)"),
                column("tags", "Tag columns", "col1,col2"),
            ],
        }));
    }
    Ok(Json(Value::Array(out)))
}

/// Tables a user can name for annotations: everything but Tally's own.
async fn records_tables(state: &AppState) -> Result<Vec<String>, ApiError> {
    Ok(state
        .engine
        .table_names()
        .await?
        .into_iter()
        .filter(|t| !t.starts_with('_') && t != "metrics")
        .collect())
}

async fn payload_options(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = body_json(&state, body)?;
    let Some(name) = body.get("name").and_then(Value::as_str) else {
        return Err(bad("'name' (the payload field) is required"));
    };
    let (metric, payload) = picked(&body);
    let engine = &state.engine;
    let values: Vec<Value> = match (name, metric.as_deref()) {
        ("aggregation", _) => Aggregation::NAMES.iter().map(|a| option(a)).collect(),
        ("format", _) => FORMATS.iter().map(|f| option(f)).collect(),
        ("job", Some(RUNS_TARGET | FAILED_RUNS_TARGET)) => {
            job_names(&state).iter().map(|j| option(j)).collect()
        }
        (_, Some(m)) if m.contains('.') || m == SQL_TARGET => Vec::new(),
        ("group_by", m) => {
            let matchers = payload_matchers(&payload, None);
            let mut out = vec![json!({"label": "(all series together)", "value": "*"})];
            out.extend(
                engine
                    .label_names(m, &matchers, None)
                    .await?
                    .iter()
                    .map(|k| option(k)),
            );
            out
        }
        (key, m) => {
            let matchers = payload_matchers(&payload, Some(key));
            engine
                .label_values(m, key, &matchers, None)
                .await?
                .iter()
                .map(|v| option(v))
                .collect()
        }
    };
    Ok(Json(Value::Array(values)))
}

fn job_names(state: &AppState) -> Vec<String> {
    state
        .scheduler
        .as_ref()
        .map(|s| s.jobs().into_iter().map(|j| j.name).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// /query

async fn query(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let body = body_json(&state, body)?;
    let ctx = query_context(&body)?;
    let filters = adhoc_filters(&body)?;
    let annotation = body.pointer("/scopedVars/__annotation").is_some();
    let targets = match body.get("targets") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(t)) => t.clone(),
        Some(_) => return Err(bad("'targets' must be an array")),
    };
    let answers = targets
        .iter()
        .filter(|t| t.get("hide").and_then(Value::as_bool) != Some(true))
        .map(|t| answer(&state, t, &ctx, &filters, annotation));
    let frames: Vec<Value> = futures::future::try_join_all(answers)
        .await?
        .into_iter()
        .flatten()
        .collect();
    Ok(Json(Value::Array(frames)))
}

/// The frames of one target; its errors name its `refId`.
async fn answer(
    state: &AppState,
    target: &Value,
    ctx: &MacroContext,
    filters: &[AdhocFilter],
    annotation: bool,
) -> Result<Vec<Value>, ApiError> {
    let ref_id = target
        .get("refId")
        .and_then(Value::as_str)
        .unwrap_or("A")
        .to_string();
    let run = async {
        let payload = payload_of(target);
        let format = Format::from_target(&payload, target)?;
        let name = target.get("target").map(target_name).unwrap_or_default();
        let is_annotation = annotation || ref_id == "Anno";
        match name.as_str() {
            "" | SQL_TARGET if payload.contains_key("sql") => {
                raw_sql(state, &ref_id, &payload, ctx, filters, format).await
            }
            "" => Ok(Vec::new()),
            SQL_TARGET => Err(bad("the Raw SQL target needs the query in payload.sql")),
            RUNS_TARGET | FAILED_RUNS_TARGET => {
                runs(state, &ref_id, &payload, ctx, name == FAILED_RUNS_TARGET).await
            }
            n if n.starts_with(RECORDS_PREFIX) => {
                records(state, &ref_id, &n[RECORDS_PREFIX.len()..], &payload, ctx).await
            }
            n if n.starts_with(KPI_PREFIX) => {
                kpi(state, &ref_id, &n[KPI_PREFIX.len()..], ctx, filters, format).await
            }
            _ if is_annotation && payload.contains_key("sql") => {
                raw_sql(state, &ref_id, &payload, ctx, filters, format).await
            }
            metric => metric_series(state, &ref_id, metric, &payload, ctx, filters, format).await,
        }
    };
    run.await.map_err(|mut e| {
        e.message = format!("query {ref_id}: {}", e.message);
        e
    })
}

fn aggregation_of(payload: &Map<String, Value>) -> Result<Aggregation, ApiError> {
    match payload
        .get("aggregation")
        .and_then(Value::as_str)
        .map(str::trim)
    {
        // `{"rate": true}` is a common way to ask in code mode.
        None | Some("") => Ok(Aggregation::NAMES
            .iter()
            .find(|n| payload.get(**n) == Some(&Value::Bool(true)))
            .and_then(|n| Aggregation::parse(n))
            .unwrap_or(Aggregation::Avg)),
        Some(a) => Aggregation::parse(a).ok_or_else(|| {
            bad(format!(
                "unknown aggregation '{a}' (use {})",
                Aggregation::NAMES.join(", ")
            ))
        }),
    }
}

/// `group_by`: absent or empty is one series per label set; `*` puts every series in one.
fn group_by_of(payload: &Map<String, Value>) -> Option<Vec<String>> {
    let v = payload.get("group_by")?;
    let all = |s: &str| s.trim() == "*";
    match v {
        Value::String(s) if all(s) => Some(Vec::new()),
        Value::Array(a) if a.iter().any(|x| x.as_str().is_some_and(all)) => Some(Vec::new()),
        other => list_param(other).filter(|keys| !keys.is_empty()),
    }
}

async fn metric_series(
    state: &AppState,
    ref_id: &str,
    metric: &str,
    payload: &Map<String, Value>,
    ctx: &MacroContext,
    filters: &[AdhocFilter],
    format: Format,
) -> Result<Vec<Value>, ApiError> {
    let mut matchers = payload_matchers(payload, None);
    for f in filters {
        matchers.push(f.matcher()?);
    }
    let req = SeriesRequest {
        metric: metric.to_string(),
        matchers,
        aggregation: aggregation_of(payload)?,
        group_by: group_by_of(payload),
        range: *ctx,
    };
    let named: Vec<Named> = state
        .engine
        .series(&req)
        .await?
        .into_iter()
        .map(|series| Named {
            name: metric.to_string(),
            field: "value".into(),
            series,
        })
        .collect();
    let unit = payload.get("unit").and_then(Value::as_str);
    Ok(frames::series(ref_id, &named, format, unit))
}

async fn kpi(
    state: &AppState,
    ref_id: &str,
    name: &str,
    ctx: &MacroContext,
    filters: &[AdhocFilter],
    format: Format,
) -> Result<Vec<Value>, ApiError> {
    let kpis = state.engine.kpis();
    let Some(kpi) = kpis.get(name) else {
        return Err(ApiError::not_found(format!(
            "no KPI named '{name}' (KPIs are the *.sql files in {})",
            state.config.query.kpi_dir.display()
        )));
    };
    let sql = kpi.expand(ctx)?;
    let batches = frames::filter_rows(state.engine.collect(&sql).await?, filters)?;
    sql_frames(ref_id, &kpi.name, &batches, format, kpi.unit.as_deref())
}

async fn raw_sql(
    state: &AppState,
    ref_id: &str,
    payload: &Map<String, Value>,
    ctx: &MacroContext,
    filters: &[AdhocFilter],
    format: Format,
) -> Result<Vec<Value>, ApiError> {
    let sql = payload
        .get("sql")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("payload.sql is empty"))?;
    let sql = macros::expand(sql, ctx)?;
    let batches = frames::filter_rows(state.engine.collect(&sql).await?, filters)?;
    let unit = payload.get("unit").and_then(Value::as_str);
    sql_frames(ref_id, ref_id, &batches, format, unit)
}

/// A result with a time column is series; anything else is a table.
fn sql_frames(
    ref_id: &str,
    name: &str,
    batches: &[datafusion::arrow::array::RecordBatch],
    format: Format,
    unit: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    match frames::result_series(name, batches)? {
        Some(named) => Ok(frames::series(ref_id, &named, format, unit)),
        None => Ok(vec![frames::table(ref_id, name, batches, format)?]),
    }
}

/// Job runs as annotations: a region from start to finish, titled by job and outcome.
async fn runs(
    state: &AppState,
    ref_id: &str,
    payload: &Map<String, Value>,
    ctx: &MacroContext,
    failed_only: bool,
) -> Result<Vec<Value>, ApiError> {
    // A process without a scheduler (or a store no job ever ran in) has no history yet.
    let tables = state.engine.table_names().await?;
    if !tables.iter().any(|t| t == tally_scheduler::RUNS_TABLE) {
        return Ok(Vec::new());
    }
    let mut conds = vec![
        macros::expand("finished_at >= $__timeFrom", ctx)?,
        macros::expand("coalesce(started_at, queued_at) < $__timeTo", ctx)?,
    ];
    if failed_only {
        conds.push("state = 'failed'".into());
    }
    if let Some(jobs) = payload.get("job").and_then(list_param) {
        let list: Vec<String> = jobs.iter().map(|j| quote(j)).collect();
        if !list.is_empty() {
            conds.push(format!("job IN ({})", list.join(", ")));
        }
    }
    let sql = format!(
        "SELECT coalesce(started_at, queued_at) AS time, finished_at AS \"timeEnd\", \
           job || ': ' || state AS title, \
           coalesce(error, CAST(rows_written AS VARCHAR) || ' rows written') AS text, \
           job || ',' || state || ',' || \"trigger\" AS tags \
         FROM _tally.runs WHERE {} ORDER BY 1, job",
        conds.join(" AND ")
    );
    let batches = state.engine.collect(&sql).await?;
    Ok(vec![frames::table(
        ref_id,
        "runs",
        &batches,
        Format::Frame,
    )?])
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Rows of a named table as annotations; the payload names its columns.
async fn records(
    state: &AppState,
    ref_id: &str,
    table: &str,
    payload: &Map<String, Value>,
    ctx: &MacroContext,
) -> Result<Vec<Value>, ApiError> {
    if table.is_empty() || table.starts_with('_') {
        return Err(bad(format!("'{table}' is not a records table")));
    }
    let col = |key: &str| {
        payload
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let time = col("time").unwrap_or_else(|| "time".into());
    let mut select = vec![format!("{} AS time", ident(&time))];
    if let Some(end) = col("time_end") {
        select.push(format!("{} AS \"timeEnd\"", ident(&end)));
    }
    for key in ["title", "text"] {
        if let Some(c) = col(key) {
            select.push(format!("CAST({} AS VARCHAR) AS {key}", ident(&c)));
        }
    }
    if let Some(tags) = payload.get("tags").and_then(list_param) {
        let parts: Vec<String> = tags
            .iter()
            .flat_map(|t| t.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| format!("CAST({} AS VARCHAR)", ident(t)))
            .collect();
        if !parts.is_empty() {
            select.push(format!("concat_ws(',', {}) AS tags", parts.join(", ")));
        }
    }
    let sql = format!(
        "SELECT {} FROM {} WHERE {} ORDER BY 1",
        select.join(", "),
        ident(table),
        macros::expand(&format!("$__timeFilter({})", ident(&time)), ctx)?
    );
    let batches = state.engine.collect(&sql).await?;
    Ok(vec![frames::table(ref_id, table, &batches, Format::Frame)?])
}

// ---------------------------------------------------------------------------------------
// /variable, /tag-keys, /tag-values

fn variable_rows(pairs: impl IntoIterator<Item = (String, String)>) -> Json<Value> {
    Json(Value::Array(
        pairs
            .into_iter()
            .map(|(text, value)| json!({"__text": text, "__value": value}))
            .collect(),
    ))
}

const VARIABLE_HELP: &str = "a variable query is one of: metrics, kpis, jobs, label_names(), \
     label_names(METRIC), label_values(LABEL), label_values(METRIC, LABEL), or a SELECT \
     (columns __text and __value, else the first column)";

async fn variable(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let body = body_json(&state, body)?;
    let range = scope(body.get("range"), "range")?;
    let payload = body.get("payload");
    let text = match payload {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("target")
            .or_else(|| o.get("query"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    };
    let text = text.trim();
    let engine = &state.engine;
    let same = |v: Vec<String>| v.into_iter().map(|s| (s.clone(), s)).collect::<Vec<_>>();
    let (func, args) = match text.split_once('(') {
        Some((f, rest)) if rest.trim_end().ends_with(')') => {
            let inner = rest.trim_end().trim_end_matches(')');
            let args: Vec<String> = inner
                .split(',')
                // A chained `$metric` arrives regex-escaped (`a\.b`).
                .map(|a| request::unescape(a.trim().trim_matches('"').trim_matches('\'')))
                .filter(|a| !a.is_empty())
                .collect();
            (f.trim(), args)
        }
        _ => (text, Vec::new()),
    };
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("select") || lower.starts_with("with") {
        let sql = match &range {
            Some(r) => macros::expand(text, r)?,
            None => macros::expand(text, &MacroContext::unbounded(60_000))?,
        };
        return Ok(variable_rows(sql_options(&engine.collect(&sql).await?)?));
    }
    let rows = match (func, args.as_slice()) {
        ("metrics", []) => same(engine.metric_names().await?),
        ("kpis", []) => engine
            .kpis()
            .iter()
            .map(|k| (k.title.clone(), format!("{KPI_PREFIX}{}", k.name)))
            .collect(),
        ("jobs", []) => same(job_names(&state)),
        ("label_names", []) => same(engine.label_names(None, &[], range.as_ref()).await?),
        ("label_names", [m]) => same(engine.label_names(Some(m), &[], range.as_ref()).await?),
        ("label_values", [k]) => same(engine.label_values(None, k, &[], range.as_ref()).await?),
        ("label_values", [m, k]) => {
            same(engine.label_values(Some(m), k, &[], range.as_ref()).await?)
        }
        _ => {
            let shown = if text.is_empty() { "(empty)" } else { text };
            return Err(bad(format!(
                "unknown variable query {shown}: {VARIABLE_HELP}"
            )));
        }
    };
    Ok(variable_rows(rows))
}

/// Options from a SQL result: `__text`/`__value` columns, else the first column for both.
fn sql_options(
    batches: &[datafusion::arrow::array::RecordBatch],
) -> Result<Vec<(String, String)>, ApiError> {
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let schema = first.schema();
    let text_idx = schema.index_of("__text").unwrap_or(0);
    let value_idx = schema.index_of("__value").unwrap_or(text_idx);
    let mut out = Vec::new();
    for b in batches {
        let cast = |i: usize| {
            datafusion::arrow::compute::cast(
                b.column(i),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
            .map_err(|e| ApiError::internal(&e))
        };
        let (t, v) = (cast(text_idx)?, cast(value_idx)?);
        let (t, v) = (t.as_string::<i32>(), v.as_string::<i32>());
        for (t, v) in t.iter().zip(v.iter()) {
            if let (Some(t), Some(v)) = (t, v) {
                out.push((t.to_string(), v.to_string()));
            }
        }
    }
    Ok(out)
}

/// A dashboard range narrowing a catalog question (the bucket width is not used there).
fn scope(range: Option<&Value>, what: &str) -> Result<Option<MacroContext>, ApiError> {
    Ok(range_of(range, what)?.map(|(from_us, to_us)| MacroContext {
        from_us,
        to_us,
        interval_ms: 60_000,
    }))
}

/// Scope of an ad hoc filter dropdown: the dashboard range and the other filters.
fn tag_scope(body: &Value) -> Result<(Option<MacroContext>, Vec<Matcher>), ApiError> {
    let range = scope(
        body.get("timeRange").or_else(|| body.get("range")),
        "timeRange",
    )?;
    let mut matchers = Vec::new();
    for f in adhoc_filters(body)? {
        matchers.push(f.matcher()?);
    }
    Ok((range, matchers))
}

async fn tag_keys(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let body = body_json(&state, body)?;
    let (range, matchers) = tag_scope(&body)?;
    let keys = state
        .engine
        .label_names(None, &matchers, range.as_ref())
        .await?;
    Ok(Json(Value::Array(
        keys.into_iter()
            .map(|k| json!({"type": "string", "text": k}))
            .collect(),
    )))
}

async fn tag_values(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let body = body_json(&state, body)?;
    let Some(key) = body
        .get("key")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
    else {
        return Err(bad("'key' (the ad hoc filter key) is required"));
    };
    let (range, matchers) = tag_scope(&body)?;
    // The key's own filter would narrow its dropdown to what is already chosen.
    let matchers: Vec<Matcher> = matchers
        .into_iter()
        .filter(|m| label_of(m) != key)
        .collect();
    let values = state
        .engine
        .label_values(None, key, &matchers, range.as_ref())
        .await?;
    Ok(Json(Value::Array(
        values.into_iter().map(|v| json!({"text": v})).collect(),
    )))
}

fn label_of(m: &Matcher) -> &str {
    match m {
        Matcher::In(k, _)
        | Matcher::NotIn(k, _)
        | Matcher::Regex(k, _)
        | Matcher::NotRegex(k, _)
        | Matcher::Compare(k, _, _) => k,
    }
}
