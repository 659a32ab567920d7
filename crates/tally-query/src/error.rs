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
    Storage(Box<tally_storage::Error>),

    #[error("query failed: {0}")]
    Execution(Box<DataFusionError>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Sorts a DataFusion error into what the user got wrong and what went wrong on our side.
    pub fn from_datafusion(e: DataFusionError) -> Self {
        // Our own errors travel through DataFusion streams boxed in `External`.
        let e = match e {
            DataFusionError::External(inner) => match inner.downcast::<Error>() {
                Ok(ours) => return *ours,
                Err(other) => DataFusionError::External(other),
            },
            e => e,
        };
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
                _ => Error::Execution(Box::new(e)),
            },
            DataFusionError::External(inner) => match inner.downcast_ref::<Error>() {
                Some(ours) => ours.duplicate(),
                None => Error::Execution(Box::new(e)),
            },
            // Runtime errors raised by functions on bad arguments (e.g. a bad regex, a
            // division by zero in integer arithmetic) come as Execution with a message.
            DataFusionError::Execution(m) if is_user_execution_error(m) => {
                Error::InvalidQuery(m.clone())
            }
            _ => Error::Execution(Box::new(e)),
        }
    }

    /// A copy of an error seen only by reference (nested inside a DataFusion error).
    fn duplicate(&self) -> Self {
        match self {
            Error::Forbidden(m) => Error::Forbidden(m.clone()),
            Error::InvalidQuery(m) => Error::InvalidQuery(m.clone()),
            Error::Timeout(d) => Error::Timeout(*d),
            Error::TooManyRows(n) => Error::TooManyRows(*n),
            Error::ResourcesExhausted(m) => Error::ResourcesExhausted(m.clone()),
            other => Error::Execution(Box::new(DataFusionError::Execution(other.to_string()))),
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

impl From<tally_storage::Error> for Error {
    fn from(e: tally_storage::Error) -> Self {
        Error::Storage(Box::new(e))
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        Error::from_datafusion(e)
    }
}
