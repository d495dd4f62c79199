//! The runtime's one error type, with the google.rpc code each variant means.

use hearth_api::Code;
use hearth_control::ControlError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Reading a spec or writing a status failed (the store, or an unreadable record).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A replica answered, and refused.
    #[error("replica {endpoint} refused: {message}")]
    Refused { endpoint: String, status: u16, message: String },
    /// A replica could not be reached, or answered with something that is not the protocol.
    #[error("replica {endpoint} is unreachable: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("replica {endpoint} did not answer within {seconds}s")]
    Timeout { endpoint: String, seconds: u64 },
    /// The backend could not start, stop or list replicas.
    #[error("{0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, RuntimeError>;

impl RuntimeError {
    pub fn code(&self) -> Code {
        match self {
            RuntimeError::Control(e) => e.code(),
            RuntimeError::Refused { .. } => Code::FailedPrecondition,
            RuntimeError::Unreachable { .. } | RuntimeError::Timeout { .. } => Code::Unavailable,
            RuntimeError::Backend(_) => Code::Internal,
        }
    }

    pub fn backend(e: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Backend(e.to_string())
    }

    /// What a person reads in a deployment's status.
    pub fn public_message(&self) -> String {
        match self {
            RuntimeError::Control(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}
