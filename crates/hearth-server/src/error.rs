//! The one mapping from errors to HTTP. Every error has a google.rpc `Code` (a `ControlError`
//! its own, an `EngineError` the one given here); the code alone decides the HTTP status
//! ([`status_of`]). The body is a google.rpc `Status` on the Gateway API, and OpenAI's error
//! shape on the inference routes (the gateway's and the engine server's), built from the same
//! code.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::openai::{ErrorBody, ErrorDetail};
use hearth_api::{Code, Status};
use hearth_control::ControlError;
use hearth_engine::EngineError;

/// The HTTP status of a google.rpc code (the table of `code.proto`, in `Code::http_status`).
pub fn status_of(code: Code) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Seconds after which the request may pass (a rate limit), sent as `retry-after`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), retry_after: None }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::InvalidArgument, message)
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        if let ControlError::Internal(detail) = &e {
            // The detail may name files or SQL; it goes to the log, not to the client.
            tracing::error!(error = %detail, "internal error");
        }
        let retry_after = match &e {
            ControlError::RateLimited { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        };
        ApiError { code: e.code(), message: e.public_message(), retry_after }
    }
}

/// The headers that tell a client whether to retry: the official clients retry every 409 and
/// 429 unless told otherwise, and wait as long as `retry-after` says.
fn retry_headers(response: &mut Response, code: Code, retry_after: Option<u64>) {
    let headers = response.headers_mut();
    match retry_after {
        Some(secs) => {
            headers.insert("retry-after", HeaderValue::from(secs));
        }
        // Repeating a create that already exists cannot succeed, nor can one over a quota
        // (it frees only when something is deleted). ABORTED (also 409) is worth a retry.
        None if matches!(code, Code::AlreadyExists | Code::ResourceExhausted) => {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        None => {}
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (status_of(self.code), Json(Status::new(self.code, self.message))).into_response();
        retry_headers(&mut response, self.code, self.retry_after);
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// An error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: `type` is
/// OpenAI's name for the kind of error, `code` the google.rpc code's name.
#[derive(Debug)]
pub struct OpenAiError {
    pub code: Code,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl OpenAiError {
    pub fn new(code: Code, message: impl Into<String>) -> OpenAiError {
        OpenAiError { code, message: message.into(), param: None, retry_after: None }
    }

    pub fn bad(message: impl Into<String>) -> OpenAiError {
        OpenAiError::new(Code::InvalidArgument, message)
    }

    /// Names the request field the error is about.
    pub fn param(mut self, param: impl Into<String>) -> OpenAiError {
        self.param = Some(param.into());
        self
    }
}

/// OpenAI's error `type` for a code.
fn openai_type(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => "invalid_request_error",
        Code::Unauthenticated => "authentication_error",
        Code::PermissionDenied => "permission_error",
        Code::NotFound => "not_found_error",
        Code::AlreadyExists | Code::Aborted => "conflict_error",
        Code::ResourceExhausted => "rate_limit_error",
        Code::Unimplemented => "not_implemented",
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => "service_unavailable",
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => "server_error",
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: openai_type(self.code).to_string(),
                param: self.param,
                code: Some(self.code.name().to_string()),
            },
        };
        let mut response = (status_of(self.code), Json(body)).into_response();
        // A full engine (also RESOURCE_EXHAUSTED) is worth a retry; only a rate limit says when.
        if self.retry_after.is_some() {
            retry_headers(&mut response, self.code, self.retry_after);
        }
        response
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> OpenAiError {
        OpenAiError { retry_after: e.retry_after, ..OpenAiError::new(e.code, e.message) }
    }
}

impl From<ControlError> for OpenAiError {
    fn from(e: ControlError) -> OpenAiError {
        ApiError::from(e).into()
    }
}

/// The google.rpc code of an engine error: the engine knows nothing of the API, so its errors
/// get their codes here, once.
pub fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::InvalidRequest(_) => Code::InvalidArgument,
        EngineError::NotFound(_) => Code::NotFound,
        EngineError::Overloaded(_) => Code::ResourceExhausted,
        EngineError::Stopped => Code::Unavailable,
        EngineError::InvalidModel(_) | EngineError::Internal(_) => Code::Internal,
    }
}

impl From<EngineError> for OpenAiError {
    fn from(e: EngineError) -> OpenAiError {
        let code = engine_code(&e);
        let message = match code {
            Code::Internal => {
                tracing::error!(error = %e, "engine error");
                "internal engine error; the server log has the details".to_string()
            }
            _ => e.to_string(),
        };
        OpenAiError::new(code, message)
    }
}
