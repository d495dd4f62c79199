//! The artifact store's one error type; each variant maps to one google.rpc code.

use hearth_api::Code;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    /// Something hearth did wrong (a file it could not write, say). The detail is logged; a
    /// client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ArtifactError>;

impl ArtifactError {
    pub fn code(&self) -> Code {
        match self {
            ArtifactError::InvalidArgument(_) => Code::InvalidArgument,
            ArtifactError::NotFound(_) => Code::NotFound,
            ArtifactError::PermissionDenied(_) => Code::PermissionDenied,
            ArtifactError::FailedPrecondition(_) => Code::FailedPrecondition,
            ArtifactError::Aborted(_) => Code::Aborted,
            ArtifactError::Unimplemented(_) => Code::Unimplemented,
            ArtifactError::Unavailable(_) => Code::Unavailable,
            ArtifactError::Internal(_) => Code::Internal,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> ArtifactError {
        ArtifactError::Internal(e.to_string())
    }

    /// A field hearth parses but does not act on: refused by name rather than ignored.
    pub fn unimplemented_field(resource: &str, field: &str) -> ArtifactError {
        ArtifactError::Unimplemented(format!(
            "{resource} field `{field}` is not supported by hearth yet; remove it from the request"
        ))
    }
}
