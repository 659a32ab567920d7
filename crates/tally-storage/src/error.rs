use deltalake_core::DeltaTableError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid storage location '{url}': {reason}")]
    InvalidLocation { url: String, reason: String },

    #[error("invalid table name '{0}': use letters, digits and '_', starting with a letter")]
    InvalidTableName(String),

    #[error("table '{0}' does not exist")]
    TableNotFound(String),

    #[error("the rows do not fit table '{table}': {reason}")]
    SchemaMismatch { table: String, reason: String },

    #[error("invalid write: {0}")]
    InvalidWrite(String),

    #[error("Delta table '{table}': {source}")]
    Delta {
        table: String,
        #[source]
        source: DeltaTableError,
    },

    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),

    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("write-ahead log {path}: {source}")]
    Wal {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("write-ahead log is unusable after an earlier fsync failure; restart Tally")]
    WalPoisoned,

    #[error("{rows} rows are waiting to be flushed (limit {limit}); storage may be unreachable")]
    Backpressure { rows: usize, limit: usize },

    #[error("storage is read-only in this process")]
    ReadOnly,
}

impl Error {
    pub(crate) fn delta(table: &str, source: DeltaTableError) -> Self {
        Error::Delta {
            table: table.to_string(),
            source,
        }
    }

    /// True for problems with what the caller sent, as opposed to trouble on our side.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidTableName(_)
                | Error::TableNotFound(_)
                | Error::SchemaMismatch { .. }
                | Error::InvalidWrite(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
