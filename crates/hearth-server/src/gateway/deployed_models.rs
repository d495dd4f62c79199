//! HTTP handlers of `/v1/accounts/{account}/deployedModels` (Load and Unload LoRA).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::resources::DeployedModel;

use super::{body, empty, list_query, page_json, parse_body, patch_body, read_mask_query, AppState, Caller};
use crate::error::ApiResult;
use crate::params::Params;

pub(super) async fn create(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DeployedModel>> {
    let mut p = Params::parse(q.as_deref())?;
    let replace = p.bool("replaceMergedAddon")?;
    p.finish()?;
    let dm: DeployedModel = parse_body(&body(b)?, "deployed model")?;
    Ok(Json(s.control.create_deployed_model(&who, &account, dm, replace).await?))
}

pub(super) async fn list(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let req = list_query(q.as_deref())?;
    Ok(page_json("deployedModels", s.control.list_deployed_models(&who, &account, &req).await?).into_response())
}

pub(super) async fn get(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mask = read_mask_query(q.as_deref())?;
    Ok(Json(s.control.get_deployed_model(&who, &account, &id, mask.as_deref()).await?).into_response())
}

pub(super) async fn update(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let mask = p.str("updateMask");
    p.finish()?;
    let raw = patch_body(&body(b)?, "deployed model")?;
    Ok(Json(s.control.update_deployed_model(&who, &account, &id, &raw, mask.as_deref()).await?).into_response())
}

pub(super) async fn delete(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    Params::parse(q.as_deref())?.finish()?;
    s.control.delete_deployed_model(&who, &account, &id).await?;
    Ok(empty().into_response())
}
