//! A table as queries see it: the Delta snapshot plus rows acknowledged but not yet flushed.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use tally_storage::TableView;

#[derive(Debug)]
pub(crate) struct LiveTable {
    schema: SchemaRef,
    delta: Option<Arc<dyn TableProvider>>,
    buffered: Vec<RecordBatch>,
}

impl LiveTable {
    /// `fallback` is the schema to expose when the table has no snapshot yet.
    pub(crate) async fn new(
        view: TableView,
        fallback: Option<SchemaRef>,
    ) -> DfResult<Option<Self>> {
        let delta = match &view.table {
            Some(t) => Some(t.table_provider().await?),
            None => None,
        };
        let Some(schema) = delta.as_ref().map(|d| d.schema()).or(fallback) else {
            return Ok(None);
        };
        // Buffered rows are built in the table's own schema; cast only if the Delta reader
        // chose other physical types (e.g. string views) for the same columns.
        let buffered = view
            .buffered
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| conform(b, &schema))
            .collect::<DfResult<Vec<_>>>()?;
        Ok(Some(Self {
            schema,
            delta,
            buffered,
        }))
    }
}

fn conform(batch: RecordBatch, schema: &SchemaRef) -> DfResult<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.with_schema(Arc::clone(schema))?);
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let col = batch.column_by_name(f.name()).ok_or_else(|| {
                datafusion::error::DataFusionError::Internal(format!(
                    "buffered rows lack column {}",
                    f.name()
                ))
            })?;
            Ok(arrow::compute::cast(col, f.data_type())?)
        })
        .collect::<DfResult<Vec<_>>>()?;
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

#[async_trait]
impl TableProvider for LiveTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters prune Delta files, but DataFusion must still apply them to every row
        // (buffered rows are not filtered here).
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::with_capacity(2);
        if let Some(delta) = &self.delta {
            inputs.push(delta.scan(state, projection, filters, limit).await?);
        }
        if !self.buffered.is_empty() || inputs.is_empty() {
            inputs.push(MemorySourceConfig::try_new_exec(
                std::slice::from_ref(&self.buffered),
                Arc::clone(&self.schema),
                projection.cloned(),
            )?);
        }
        UnionExec::try_new(inputs)
    }
}
