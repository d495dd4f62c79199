//! HTTP handlers of the second provider's LoRA API (`/v1/lora/...`, `/v1/user/loras`) and its
//! OpenAI route (`/v1/openai/...`), where `model` may be a LoRA's plain name.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::Uri;
use axum::response::Response;
use axum::Json;
use hearth_api::deepinfra::{CreateLoraRequest, DeploymentOut, LoraStatus, UpdateLoraRequest};
use hearth_api::names::{Collection, ResourceName};
use serde_json::Value;

use super::inference::InferenceCaller;
use super::{body, parse_body, AppState, Caller};
use crate::error::{ApiResult, OpenAiError};
use crate::params::Params;

pub(super) async fn create(
    State(s): State<AppState>,
    Caller(who): Caller,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DeploymentOut>> {
    Params::parse(q.as_deref())?.finish()?;
    let req: CreateLoraRequest = parse_body(&body(b)?, "create LoRA request")?;
    Ok(Json(s.control.create_lora(&who, req).await?))
}

pub(super) async fn get(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<DeploymentOut>> {
    Params::parse(q.as_deref())?.finish()?;
    Ok(Json(s.control.get_lora(&who, &name).await?))
}

pub(super) async fn status(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<LoraStatus>> {
    Params::parse(q.as_deref())?.finish()?;
    Ok(Json(s.control.lora_status(&who, &name).await?))
}

pub(super) async fn update(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DeploymentOut>> {
    Params::parse(q.as_deref())?.finish()?;
    let req: UpdateLoraRequest = parse_body(&body(b)?, "update LoRA request")?;
    Ok(Json(s.control.update_lora(&who, &name, req).await?))
}

pub(super) async fn delete(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<DeploymentOut>> {
    Params::parse(q.as_deref())?.finish()?;
    Ok(Json(s.control.delete_lora(&who, &name).await?))
}

pub(super) async fn list(
    State(s): State<AppState>,
    Caller(who): Caller,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<DeploymentOut>>> {
    Params::parse(q.as_deref())?.finish()?;
    Ok(Json(s.control.list_loras(&who, None).await?))
}

/// `POST /v1/openai/chat/completions` and `/v1/openai/completions`: a plain `model` (no `/`)
/// names a model of the caller's account, such as a LoRA by its `lora_name`; full names pass
/// through. Then the request goes the way of every inference request.
pub(super) async fn openai(
    State(s): State<AppState>,
    InferenceCaller(who): InferenceCaller,
    uri: Uri,
    headers: axum::http::HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    super::inference::no_query(uri.query())?;
    let raw = body(b)?;
    let mut request: Value =
        serde_json::from_slice(&raw).map_err(|e| OpenAiError::bad(format!("invalid JSON: {e}")))?;
    if let Some(model) = request.get("model").and_then(Value::as_str) {
        if !model.is_empty() && !model.contains('/') {
            let full = ResourceName::new(&who.account, Collection::Models, model).to_string();
            request["model"] = Value::String(full);
        }
    }
    let path = uri.path().replacen("/v1/openai/", "/v1/", 1);
    super::inference::forward(&s, &who, &path, request, super::inference::Forwarding::from_headers(&headers)).await
}
