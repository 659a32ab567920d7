use std::time::Duration;

use datafusion::error::DataFusionError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement that is valid SQL but not allowed over this interface.
    #[error("{0}")]
    Forbidden(String),

    /// SQL that does not parse or plan: syntax, unknown tables or columns, type errors.
    #[error("{0}")]
    InvalidQuery(String),

    #[error("query did not finish within {0:?}")]
    Timeout(Duration),

    #[error("the result has more than {0} rows; add a LIMIT or narrow the query")]
    TooManyRows(u64),

    #[error("query exceeded its resources: {0}")]
    ResourcesExhausted(String),

    #[error(transparent)]
    Storage(#[from] tally_storage::Error),

    #[error("query failed: {0}")]
    Execution(DataFusionError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Sorts a DataFusion error into what the user got wrong and what went wrong on our side.
    pub fn from_datafusion(e: DataFusionError) -> Self {
        let root = e.find_root();
        match root {
            DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_) => Error::InvalidQuery(root.to_string()),
            DataFusionError::ResourcesExhausted(m) => Error::ResourcesExhausted(m.clone()),
            DataFusionError::ArrowError(a, _) => match a.as_ref() {
                arrow::error::ArrowError::DivideByZero
                | arrow::error::ArrowError::CastError(_)
                | arrow::error::ArrowError::ComputeError(_)
                | arrow::error::ArrowError::ArithmeticOverflow(_)
                | arrow::error::ArrowError::ParseError(_)
                | arrow::error::ArrowError::InvalidArgumentError(_) => {
                    Error::InvalidQuery(root.to_string())
                }
                _ => Error::Execution(e),
            },
            DataFusionError::External(inner) => {
                if let Some(q) = inner.downcast_ref::<Error>() {
                    return match q {
                        Error::Timeout(d) => Error::Timeout(*d),
                        Error::TooManyRows(n) => Error::TooManyRows(*n),
                        other => Error::Execution(DataFusionError::Execution(other.to_string())),
                    };
                }
                Error::Execution(e)
            }
            // Runtime errors raised by functions on bad arguments (e.g. a bad regex, a
            // division by zero in integer arithmetic) come as Execution with a message.
            DataFusionError::Execution(m) if is_user_execution_error(m) => {
                Error::InvalidQuery(m.clone())
            }
            _ => Error::Execution(e),
        }
    }

    /// True when the caller can fix it by changing the request.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Forbidden(_) | Error::InvalidQuery(_) | Error::TooManyRows(_) => true,
            Error::Storage(s) => s.is_user_error(),
            _ => false,
        }
    }
}

fn is_user_execution_error(m: &str) -> bool {
    const MARKERS: [&str; 5] = [
        "Divide by zero",
        "divide by zero",
        "regex",
        "Cannot cast",
        "invalid argument",
    ];
    MARKERS.iter().any(|k| m.contains(k))
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Error::from_datafusion(e)
    }
}
