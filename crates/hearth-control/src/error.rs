//! The control plane's one error type. Each variant carries a message a person can act on and
//! maps to exactly one google.rpc code; the HTTP layer turns that code into a status once.

use hearth_api::Code;
use hearth_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Over a rate limit: RESOURCE_EXHAUSTED, and worth retrying after `retry_after_secs`.
    #[error("{message}")]
    RateLimited { message: String, retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    /// A stored record that cannot be read.
    #[error("{0}")]
    DataLoss(String),
    /// Something hearth did wrong. The detail is logged; the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, ControlError>;

impl ControlError {
    pub fn code(&self) -> Code {
        match self {
            ControlError::InvalidArgument(_) => Code::InvalidArgument,
            ControlError::NotFound(_) => Code::NotFound,
            ControlError::AlreadyExists(_) => Code::AlreadyExists,
            ControlError::PermissionDenied(_) => Code::PermissionDenied,
            ControlError::Unauthenticated(_) => Code::Unauthenticated,
            ControlError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControlError::Aborted(_) => Code::Aborted,
            ControlError::OutOfRange(_) => Code::OutOfRange,
            ControlError::Unimplemented(_) => Code::Unimplemented,
            ControlError::ResourceExhausted(_) | ControlError::RateLimited { .. } => Code::ResourceExhausted,
            ControlError::Unavailable(_) => Code::Unavailable,
            ControlError::DataLoss(_) => Code::DataLoss,
            ControlError::Internal(_) => Code::Internal,
        }
    }

    /// The message a client may see: everything but internal detail.
    pub fn public_message(&self) -> String {
        match self {
            ControlError::Internal(_) => "internal error; the server log has the details".to_string(),
            other => other.to_string(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> ControlError {
        ControlError::Internal(e.to_string())
    }

    /// A field hearth parses but does not act on yet: refused by name rather than ignored.
    pub fn unimplemented_field(resource: &str, field: &str) -> ControlError {
        ControlError::Unimplemented(format!(
            "{resource} field `{field}` is not supported by hearth yet; remove it from the request"
        ))
    }
}

impl From<hearth_artifacts::ArtifactError> for ControlError {
    fn from(e: hearth_artifacts::ArtifactError) -> ControlError {
        use hearth_artifacts::ArtifactError as A;
        match e {
            A::InvalidArgument(m) => ControlError::InvalidArgument(m),
            A::NotFound(m) => ControlError::NotFound(m),
            A::PermissionDenied(m) => ControlError::PermissionDenied(m),
            A::FailedPrecondition(m) => ControlError::FailedPrecondition(m),
            A::Aborted(m) => ControlError::Aborted(m),
            A::Unimplemented(m) => ControlError::Unimplemented(m),
            A::Unavailable(m) => ControlError::Unavailable(m),
            A::Internal(m) => ControlError::Internal(m),
        }
    }
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> ControlError {
        match e {
            StoreError::AlreadyExists { kind, account, id } => ControlError::AlreadyExists(format!(
                "{} accounts/{account}/{kind}/{id} already exists",
                singular(&kind)
            )),
            StoreError::NotFound { kind, account, id } => {
                ControlError::NotFound(format!("{} accounts/{account}/{kind}/{id} not found", singular(&kind)))
            }
            StoreError::Conflict { kind, account, id } => ControlError::Aborted(format!(
                "{} accounts/{account}/{kind}/{id} was changed by another request; retry",
                singular(&kind)
            )),
            e if e.is_transient() => {
                ControlError::Unavailable(format!("the database is unavailable ({e}); retry shortly"))
            }
            other => ControlError::Internal(other.to_string()),
        }
    }
}

fn singular(kind: &str) -> &str {
    match kind {
        "models" => "model",
        "deployments" => "deployment",
        "deployedModels" => "deployed model",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_codes_a_client_can_act_on() {
        let e: ControlError = StoreError::Database(sqlx_pool_timeout()).into();
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(e.code().http_status(), 503);
        let e: ControlError =
            StoreError::Conflict { kind: "models".into(), account: "a".into(), id: "m".into() }.into();
        assert_eq!(e.code(), Code::Aborted);
        assert_eq!(e.to_string(), "model accounts/a/models/m was changed by another request; retry");
        let e = ControlError::Internal("SELECT secret FROM somewhere".into());
        assert!(!e.public_message().contains("SELECT"), "internal detail leaked");
    }

    fn sqlx_pool_timeout() -> hearth_store::sqlx::Error {
        hearth_store::sqlx::Error::PoolTimedOut
    }
}
