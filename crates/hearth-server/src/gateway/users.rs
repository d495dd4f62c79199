//! HTTP handlers of `/v1/accounts/{account}/users` and each user's `apiKeys`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::resources::{ApiKey, CreateApiKeyRequest, DeleteApiKeyRequest, User};

use super::{body, empty, list_query, page_json, parse_body, read_mask_query, AppState, Caller};
use crate::error::ApiResult;
use crate::params::Params;

pub(super) async fn create(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<User>> {
    let mut p = Params::parse(q.as_deref())?;
    let user_id = p.str("userId");
    p.finish()?;
    let user: User = parse_body(&body(b)?, "user")?;
    Ok(Json(s.control.create_user(&who, &account, user_id.as_deref(), user).await?))
}

pub(super) async fn list(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let req = list_query(q.as_deref())?;
    Ok(page_json("users", s.control.list_users(&who, &account, &req).await?).into_response())
}

pub(super) async fn get(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mask = read_mask_query(q.as_deref())?;
    Ok(Json(s.control.get_user(&who, &account, &id, mask.as_deref()).await?).into_response())
}

pub(super) async fn update(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<User>> {
    Params::parse(q.as_deref())?.finish()?;
    let user: User = parse_body(&body(b)?, "user")?;
    Ok(Json(s.control.update_user(&who, &account, &id, user).await?))
}

pub(super) async fn create_key(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, user)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ApiKey>> {
    Params::parse(q.as_deref())?.finish()?;
    let req: CreateApiKeyRequest = parse_body(&body(b)?, "API key")?;
    Ok(Json(s.control.create_api_key(&who, &account, &user, req).await?))
}

pub(super) async fn list_keys(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, user)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let req = list_query(q.as_deref())?;
    Ok(page_json("apiKeys", s.control.list_api_keys(&who, &account, &user, &req).await?).into_response())
}

pub(super) async fn delete_key(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, user)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    Params::parse(q.as_deref())?.finish()?;
    let req: DeleteApiKeyRequest = parse_body(&body(b)?, "delete API key request")?;
    s.control.delete_api_key(&who, &account, &user, &req.key_id).await?;
    Ok(empty().into_response())
}
