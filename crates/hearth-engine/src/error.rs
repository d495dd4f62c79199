//! The engine's one error type, each variant with the google.rpc code a server should answer.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model files are not what they claim to be; the message names the problem.
    #[error("{0}")]
    InvalidModel(String),
    /// A request the engine cannot serve as asked (bad parameters, prompt too long).
    #[error("{0}")]
    InvalidRequest(String),
    /// No such thing (an adapter name that is not loaded).
    #[error("{0}")]
    NotFound(String),
    /// The engine is at capacity and its queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// A failure inside the tensor library or the engine itself.
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl EngineError {
    /// The google.rpc code name a server maps this error to.
    pub fn code_name(&self) -> &'static str {
        match self {
            EngineError::InvalidModel(_) => "FAILED_PRECONDITION",
            EngineError::InvalidRequest(_) => "INVALID_ARGUMENT",
            EngineError::NotFound(_) => "NOT_FOUND",
            EngineError::Overloaded(_) => "RESOURCE_EXHAUSTED",
            EngineError::Stopped => "UNAVAILABLE",
            EngineError::Internal(_) => "INTERNAL",
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> EngineError {
        EngineError::Internal(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
