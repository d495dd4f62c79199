//! HTTP handlers of `/v1/accounts/{account}/models`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::resources::{CreateModelRequest, GetUploadEndpointRequest, Model, ModelSource};
use hearth_api::Code;
use hearth_control::models::ValidateOptions;

use super::{body, empty, list_request, page_json, parse_body, patch_body, split_verb, unknown_verb, AppState, Caller};
use crate::error::{ApiError, ApiResult};
use crate::params::Params;

pub(super) async fn create(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Model>> {
    Params::parse(q.as_deref())?.finish()?;
    let req: CreateModelRequest = parse_body(&body(b)?, "create model request")?;
    Ok(Json(s.control.create_model(&who, &account, req).await?))
}

pub(super) async fn list(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let req = list_request(&mut p, false)?;
    p.finish()?;
    Ok(page_json("models", s.control.list_models(&who, &account, &req).await?).into_response())
}

/// GET of a model, or of its `:validateUpload` and `:getDownloadEndpoint` methods.
pub(super) async fn get_or_verb(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, segment)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let (id, verb) = split_verb(&segment);
    match verb {
        None => {
            let mask = p.str("readMask");
            p.finish()?;
            Ok(Json(s.control.get_model(&who, &account, id, mask.as_deref()).await?).into_response())
        }
        Some("validateUpload") => {
            let opts = ValidateOptions {
                skip_hf_config_validation: p.bool("skipHfConfigValidation")?,
                config_only: p.bool("configOnly")?,
                trust_remote_code: p.bool("trustRemoteCode")?,
            };
            p.finish()?;
            Ok(Json(s.control.validate_upload(&who, &account, id, opts).await?).into_response())
        }
        Some("getDownloadEndpoint") => {
            let mask = p.str("readMask");
            p.finish()?;
            Ok(Json(s.control.get_download_endpoint(&who, &account, id, mask.as_deref()).await?).into_response())
        }
        Some(verb) => Err(unknown_verb("model", verb, "GET")),
    }
}

/// POST `:getUploadEndpoint` and `:import`; `:prepare` exists in the spec but not in hearth.
pub(super) async fn post_verb(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, segment)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    Params::parse(q.as_deref())?.finish()?;
    let (id, verb) = split_verb(&segment);
    match verb {
        Some("getUploadEndpoint") => {
            let req: GetUploadEndpointRequest = parse_body(&body(b)?, "getUploadEndpoint request")?;
            Ok(Json(s.control.get_upload_endpoint(&who, &account, id, req).await?).into_response())
        }
        Some("import") => {
            let source: ModelSource = parse_body(&body(b)?, "import model request")?;
            Ok(Json(s.control.import_model(&who, &account, id, source).await?).into_response())
        }
        Some("prepare") => Err(ApiError::new(Code::Unimplemented, "models:prepare is not supported by hearth")),
        Some(verb) => Err(unknown_verb("model", verb, "POST")),
        None => Err(ApiError::new(Code::Unimplemented, "POST on a model is not supported; use PATCH to update it")),
    }
}

pub(super) async fn update(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, segment)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let mask = p.str("updateMask");
    p.finish()?;
    let (id, verb) = split_verb(&segment);
    if let Some(verb) = verb {
        return Err(unknown_verb("model", verb, "PATCH"));
    }
    let raw = patch_body(&body(b)?, "model")?;
    Ok(Json(s.control.update_model(&who, &account, id, &raw, mask.as_deref()).await?).into_response())
}

pub(super) async fn delete(
    State(s): State<AppState>,
    Caller(who): Caller,
    method: Method,
    Path((account, segment)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    Params::parse(q.as_deref())?.finish()?;
    let (id, verb) = split_verb(&segment);
    if let Some(verb) = verb {
        return Err(unknown_verb("model", verb, method.as_str()));
    }
    s.control.delete_model(&who, &account, id).await?;
    Ok(empty().into_response())
}
