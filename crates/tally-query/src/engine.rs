//! The session factory and bounded execution.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::datasource::ViewTable;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tally_model::config::QueryConfig;
use tally_model::schema::{METRICS_TABLE, metrics_schema};
use tally_model::telemetry::Telemetry;
use tally_storage::Storage;
use tokio::time::Sleep;
use tracing::debug;

use crate::provider::LiveTable;
use crate::{Error, KpiProblem, Kpis, Result, check_read_only};

/// Schema holding Tally's own tables (`_tally.runs`).
pub const SYSTEM_SCHEMA: &str = "_tally";

/// Schema holding one view per KPI file (`kpi.signup_conversion`).
pub const KPI_SCHEMA: &str = "kpi";

/// How long a listing of the tables at the storage location is reused.
const TABLE_LIST_TTL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct QueryEngine {
    storage: Arc<Storage>,
    config: QueryConfig,
    telemetry: Arc<Telemetry>,
    tables: Mutex<Option<(Instant, Vec<String>)>>,
    kpis: Arc<Kpis>,
}

/// A running query: its schema and a stream bounded by the configured limits.
pub struct QueryResult {
    pub schema: SchemaRef,
    pub stream: SendableRecordBatchStream,
}

impl std::fmt::Debug for QueryResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryResult")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl QueryEngine {
    pub fn new(storage: Arc<Storage>, config: QueryConfig) -> Self {
        let telemetry = Arc::clone(storage.telemetry());
        Self {
            storage,
            config,
            telemetry,
            tables: Mutex::new(None),
            kpis: Arc::default(),
        }
    }

    /// Serves `kpis` as views `kpi.<name>` (and to the Grafana API).
    pub fn with_kpis(mut self, kpis: Kpis) -> Self {
        self.kpis = Arc::new(kpis);
        self
    }

    pub fn kpis(&self) -> &Arc<Kpis> {
        &self.kpis
    }

    /// Plans every KPI against the tables as they are now; the ones that do not plan are
    /// reported with their path and line (a table that does not exist yet is one reason).
    pub async fn check_kpis(&self) -> Vec<KpiProblem> {
        let ctx = match self.session_with(false).await {
            Ok(c) => c,
            Err(e) => {
                return vec![KpiProblem {
                    path: "queries".into(),
                    line: 0,
                    message: format!("cannot open a session to check KPIs: {e}"),
                }];
            }
        };
        let mut problems = Vec::new();
        for kpi in self.kpis.iter() {
            let planned = match kpi.view_sql() {
                Ok(sql) => ctx
                    .state()
                    .create_logical_plan(&sql)
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::from_datafusion(e).to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(message) = planned {
                let (line, message) = crate::kpi::locate(&message);
                let line = line.or_else(|| crate::kpi::line_of_culprit(&kpi.sql, &message));
                problems.push(KpiProblem {
                    path: kpi.path.clone(),
                    line: kpi.sql_line + line.unwrap_or(1) - 1,
                    message,
                });
            }
        }
        problems
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn config(&self) -> &QueryConfig {
        &self.config
    }

    /// The tables at the storage location (`metrics` always), from a listing renewed every
    /// few seconds: the one listing sessions and front ends share.
    pub async fn table_names(&self) -> Result<Vec<String>> {
        if let Some((at, names)) = self.tables.lock().as_ref()
            && at.elapsed() < TABLE_LIST_TTL
        {
            return Ok(names.clone());
        }
        let mut names = self.storage.list_tables().await?;
        // Tables other processes may have changed are re-read when the listing is renewed;
        // the metrics table is kept fresh by its flusher.
        for name in &names {
            if name != METRICS_TABLE
                && let Ok(h) = self.storage.table(name)
            {
                h.refresh().await?;
            }
        }
        if !names.iter().any(|n| n == METRICS_TABLE) {
            names.push(METRICS_TABLE.to_string());
        }
        *self.tables.lock() = Some((Instant::now(), names.clone()));
        Ok(names)
    }

    /// A fresh session with every table and KPI view registered: the one production path to a
    /// `SessionContext`, used by HTTP, Grafana, the CLI and the `.slt` tests alike.
    pub async fn session(&self) -> Result<SessionContext> {
        self.session_with(true).await
    }

    /// Planning the KPI views costs a few milliseconds, so only queries that may read them
    /// get them.
    async fn session_with(&self, kpi_views: bool) -> Result<SessionContext> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("tally", "public");
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.config.memory_limit.as_usize(), 1.0)
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let system = Arc::new(MemorySchemaProvider::new());
        ctx.catalog("tally")
            .ok_or_else(|| Error::InvalidQuery("catalog tally is missing".into()))?
            .register_schema(SYSTEM_SCHEMA, Arc::clone(&system) as _)?;
        for name in self.table_names().await? {
            // Tally's own state (`_tally_runs`, ...) is shown as `_tally.runs`, ...
            let system_name = name.strip_prefix("_tally_");
            if name.starts_with('_') && system_name.is_none() {
                continue;
            }
            let handle = self.storage.table(&name)?;
            let view = handle.view().await?;
            if let Some(t) = &view.table {
                t.update_datafusion_session(&ctx.state()).map_err(|e| {
                    Error::from(tally_storage::Error::Delta {
                        table: name.clone(),
                        source: e,
                    })
                })?;
            }
            let fallback = (name == METRICS_TABLE).then(metrics_schema);
            if let Some(table) = LiveTable::new(view, fallback).await? {
                match system_name {
                    Some(short) => {
                        system.register_table(short.to_string(), Arc::new(table))?;
                    }
                    None => {
                        ctx.register_table(name.as_str(), Arc::new(table))?;
                    }
                }
            }
        }
        if kpi_views && !self.kpis.is_empty() {
            self.register_kpi_views(&ctx).await?;
        }
        Ok(ctx)
    }

    async fn register_kpi_views(&self, ctx: &SessionContext) -> Result<()> {
        let schema = Arc::new(MemorySchemaProvider::new());
        ctx.catalog("tally")
            .ok_or_else(|| Error::InvalidQuery("catalog tally is missing".into()))?
            .register_schema(KPI_SCHEMA, Arc::clone(&schema) as _)?;
        for kpi in self.kpis.iter() {
            // A KPI that does not plan (reported at start-up) is left out, so it cannot take
            // the other views down; querying it says the table does not exist.
            let Ok(sql) = kpi.view_sql() else { continue };
            match ctx.state().create_logical_plan(&sql).await {
                Ok(plan) => {
                    schema.register_table(
                        kpi.name.clone(),
                        Arc::new(ViewTable::new(plan, Some(sql))),
                    )?;
                }
                Err(e) => debug!(kpi = %kpi.name, error = %e, "KPI view does not plan"),
            }
        }
        Ok(())
    }

    /// Checks, plans and starts one read-only query under the configured limits.
    pub async fn execute(&self, sql: &str) -> Result<QueryResult> {
        let started = Instant::now();
        let result = self.start(sql, started).await;
        if let Err(e) = &result {
            self.telemetry
                .query_finished(outcome(e), started.elapsed().as_secs_f64());
        }
        result
    }

    async fn start(&self, sql: &str, started: Instant) -> Result<QueryResult> {
        check_read_only(sql)?;
        let timeout = self.config.timeout;
        let plan = async {
            let ctx = self.session_with(mentions_kpi(sql)).await?;
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            // No LIMIT is added to the plan (EXPLAIN must stay the root); the row cap is
            // enforced on the stream, which stops pulling once it is exceeded.
            let df = ctx.sql_with_options(sql, options).await?;
            let stream = df.execute_stream().await?;
            Ok::<_, Error>(stream)
        };
        let stream = tokio::time::timeout(timeout, plan)
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "query planned"
        );
        let schema = stream.schema();
        let bounded = Bounded {
            inner: stream,
            deadline: Box::pin(tokio::time::sleep(
                timeout.saturating_sub(started.elapsed()),
            )),
            timeout,
            rows: 0,
            max_rows: self.config.max_rows,
            started,
            telemetry: Arc::clone(&self.telemetry),
            done: false,
        };
        Ok(QueryResult {
            schema: Arc::clone(&schema),
            stream: Box::pin(RecordBatchStreamAdapter::new(schema, bounded)),
        })
    }
}

fn mentions_kpi(sql: &str) -> bool {
    sql.to_ascii_lowercase().contains(KPI_SCHEMA)
}

fn outcome(e: &Error) -> &'static str {
    match e {
        Error::Timeout(_) => "timeout",
        Error::TooManyRows(_) => "too_many_rows",
        e if e.is_user_error() => "invalid",
        _ => "error",
    }
}

/// Enforces the deadline and the row limit while the result streams, and records the
/// query's outcome once it ends.
struct Bounded {
    inner: SendableRecordBatchStream,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    rows: u64,
    max_rows: u64,
    started: Instant,
    telemetry: Arc<Telemetry>,
    done: bool,
}

impl Bounded {
    fn finish(&mut self, outcome: &str) {
        if !self.done {
            self.done = true;
            self.telemetry
                .query_finished(outcome, self.started.elapsed().as_secs_f64());
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<datafusion::error::Result<RecordBatch>>> {
        self.finish(outcome(&e));
        Poll::Ready(Some(Err(DataFusionError::External(Box::new(e)))))
    }
}

impl Stream for Bounded {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let t = self.timeout;
            return self.fail(Error::Timeout(t));
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                self.rows += batch.num_rows() as u64;
                if self.rows > self.max_rows {
                    let n = self.max_rows;
                    return self.fail(Error::TooManyRows(n));
                }
                Poll::Ready(Some(Ok(batch)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e = Error::from_datafusion(e);
                self.fail(e)
            }
            Poll::Ready(None) => {
                self.finish("ok");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
