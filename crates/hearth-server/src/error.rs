//! The one mapping from errors to HTTP: a google.rpc `Status` body with the status code its
//! `Code` implies.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::{Code, Status};
use hearth_control::ControlError;

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
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
        ApiError { code: e.code(), message: e.public_message() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(Status::new(self.code, self.message))).into_response();
        // The official client retries every 409 unless told otherwise; repeating a create
        // that already exists cannot succeed. ABORTED (also 409) is worth a retry.
        if self.code == Code::AlreadyExists {
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
