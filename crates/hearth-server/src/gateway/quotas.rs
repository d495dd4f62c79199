//! HTTP handlers of `/v1/accounts/{account}/quotas`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::resources::Quota;

use super::{body, list_query, page_json, parse_body, read_mask_query, AppState, Caller};
use crate::error::ApiResult;
use crate::params::Params;

pub(super) async fn list(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let req = list_query(q.as_deref())?;
    Ok(page_json("quotas", s.control.list_quotas(&who, &account, &req).await?).into_response())
}

pub(super) async fn get(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mask = read_mask_query(q.as_deref())?;
    Ok(Json(s.control.get_quota(&who, &account, &id, mask.as_deref()).await?).into_response())
}

/// `allowMissing` is accepted and has nothing to do: every account has every quota.
pub(super) async fn update(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Quota>> {
    let mut p = Params::parse(q.as_deref())?;
    p.bool("allowMissing")?;
    p.finish()?;
    let quota: Quota = parse_body(&body(b)?, "quota")?;
    Ok(Json(s.control.update_quota(&who, &account, &id, quota).await?))
}
