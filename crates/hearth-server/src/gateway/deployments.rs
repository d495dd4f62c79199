//! HTTP handlers of `/v1/accounts/{account}/deployments`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_api::resources::{Deployment, ScaleDeploymentRequest, UndeleteDeploymentRequest};
use hearth_api::Code;
use hearth_control::deployments::CreateDeploymentOptions;

use super::{body, empty, list_request, page_json, parse_body, patch_body, split_verb, unknown_verb, AppState, Caller};
use crate::error::{ApiError, ApiResult};
use crate::params::Params;

pub(super) async fn create(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Deployment>> {
    let mut p = Params::parse(q.as_deref())?;
    let opts = CreateDeploymentOptions {
        deployment_id: p.str("deploymentId"),
        validate_only: p.bool("validateOnly")?,
        disable_auto_deploy: p.bool("disableAutoDeploy")?,
        disable_speculative_decoding: p.bool("disableSpeculativeDecoding")?,
    };
    // Flags that skip what hearth does not do (shape and image-tag validation): honoured as
    // they stand, there being nothing to skip. Parsed, so a malformed one is refused.
    for flag in ["skipShapeValidation", "skipImageTagValidation", "acceptShapelessRisk"] {
        p.bool(flag)?;
    }
    p.finish()?;
    let d: Deployment = parse_body(&body(b)?, "deployment")?;
    Ok(Json(s.control.create_deployment(&who, &account, opts, d).await?))
}

pub(super) async fn list(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path(account): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let req = list_request(&mut p, true)?;
    p.finish()?;
    Ok(page_json("deployments", s.control.list_deployments(&who, &account, &req).await?).into_response())
}

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
            Ok(Json(s.control.get_deployment(&who, &account, id, mask.as_deref()).await?).into_response())
        }
        Some("metrics") => Err(ApiError::new(
            Code::Unimplemented,
            "deployments:metrics is deprecated in the Gateway API and not served by hearth",
        )),
        Some(verb) => Err(unknown_verb("deployment", verb, "GET")),
    }
}

/// POST `:undelete`.
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
        Some("undelete") => {
            let _: UndeleteDeploymentRequest = parse_body(&body(b)?, "undelete request")?;
            Ok(Json(s.control.undelete_deployment(&who, &account, id).await?).into_response())
        }
        Some(verb) => Err(unknown_verb("deployment", verb, "POST")),
        None => {
            Err(ApiError::new(Code::Unimplemented, "POST on a deployment is not supported; use PATCH to update it"))
        }
    }
}

/// PATCH of a deployment, or its `:scale` method.
pub(super) async fn patch_or_verb(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, segment)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let (id, verb) = split_verb(&segment);
    match verb {
        None => {
            let mask = p.str("updateMask");
            p.bool("skipShapeValidation")?;
            p.finish()?;
            let raw = patch_body(&body(b)?, "deployment")?;
            Ok(Json(s.control.update_deployment(&who, &account, id, &raw, mask.as_deref()).await?).into_response())
        }
        Some("scale") => {
            p.finish()?;
            let req: ScaleDeploymentRequest = parse_body(&body(b)?, "scale request")?;
            s.control.scale_deployment(&who, &account, id, req).await?;
            Ok(empty().into_response())
        }
        Some(verb) => Err(unknown_verb("deployment", verb, "PATCH")),
    }
}

pub(super) async fn delete(
    State(s): State<AppState>,
    Caller(who): Caller,
    Path((account, segment)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let mut p = Params::parse(q.as_deref())?;
    let hard = p.bool("hard")?;
    let ignore_checks = p.bool("ignoreChecks")?;
    p.finish()?;
    let (id, verb) = split_verb(&segment);
    if let Some(verb) = verb {
        return Err(unknown_verb("deployment", verb, "DELETE"));
    }
    s.control.delete_deployment(&who, &account, id, hard, ignore_checks).await?;
    Ok(empty().into_response())
}
