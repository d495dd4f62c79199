//! The gateway app: routes of the Gateway REST API under `/v1/accounts/{account}/...`, the
//! signed upload and download routes, `/health`, `/verifyApiKey`, `/metrics` and
//! `/openapi.json`.
//!
//! Custom methods (`models/{id}:validateUpload`) arrive as one path segment; each resource's
//! handler splits off the verb and dispatches on it.

mod console;
mod deployed_models;
mod deployments;
mod direct;
mod inference;
mod loras;
mod models;
mod quotas;
mod upload;
mod users;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hearth_api::Code;
use hearth_control::{ControlPlane, ListPage, ListRequest, Principal};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;
use crate::params::Params;

pub use inference::Inference;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub control: ControlPlane,
    pub metrics: Arc<Metrics>,
    pub inference: Inference,
}

/// The largest JSON body a control call may send. Model files go through the upload route,
/// which streams and has no such limit.
const MAX_JSON_BODY: usize = 2 << 20;

/// The gateway without a runtime: inference requests find no replicas and answer UNAVAILABLE.
pub fn router(control: ControlPlane) -> Router {
    let fleet = Arc::new(hearth_runtime::fleet::Fleet::default());
    // No replica will ever be called, so any key does.
    let credentials = hearth_runtime::ReplicaCredentials::new(rand::random::<[u8; 32]>().to_vec());
    router_with(control, Inference::new(fleet, credentials, std::time::Duration::ZERO))
}

/// Serves the direct routes of every deployment that has one, on `host`, for as long as the
/// gateway runs (`direct.rs`).
pub async fn serve_direct_routes(control: ControlPlane, inference: Inference, host: std::net::IpAddr) {
    direct::run(AppState { control, metrics: Arc::new(Metrics::default()), inference }, host).await
}

/// The gateway whose inference routes use `inference` (the fleet a reconciler maintains).
pub fn router_with(control: ControlPlane, inference: Inference) -> Router {
    let metrics = Arc::new(Metrics::default());
    let state = AppState { control, metrics: metrics.clone(), inference };
    let api = Router::new()
        .route("/v1/accounts/{account}/models", get(models::list).post(models::create))
        .route(
            "/v1/accounts/{account}/models/{model}",
            get(models::get_or_verb).post(models::post_verb).patch(models::update).delete(models::delete),
        )
        .route("/v1/accounts/{account}/deployments", get(deployments::list).post(deployments::create))
        .route(
            "/v1/accounts/{account}/deployments/{deployment}",
            get(deployments::get_or_verb)
                .post(deployments::post_verb)
                .patch(deployments::patch_or_verb)
                .delete(deployments::delete),
        )
        .route("/v1/accounts/{account}/deployedModels", get(deployed_models::list).post(deployed_models::create))
        .route(
            "/v1/accounts/{account}/deployedModels/{deployed_model}",
            get(deployed_models::get).patch(deployed_models::update).delete(deployed_models::delete),
        )
        .route("/v1/accounts/{account}/quotas", get(quotas::list))
        .route("/v1/accounts/{account}/quotas/{quota}", get(quotas::get).patch(quotas::update))
        .route("/v1/accounts/{account}/inferenceMetrics", get(inference_metrics))
        .route("/v1/accounts/{account}/users", get(users::list).post(users::create))
        .route("/v1/accounts/{account}/users/{user}", get(users::get).patch(users::update))
        .route("/v1/accounts/{account}/users/{user}/apiKeys", get(users::list_keys).post(users::create_key))
        .route("/v1/accounts/{account}/users/{user}/apiKeys:delete", post(users::delete_key))
        .route("/verifyApiKey", get(verify_api_key))
        .route("/v1/chat/completions", post(inference::proxy))
        .route("/v1/completions", post(inference::proxy))
        .route("/v1/models", get(inference::models))
        .route("/inference/v1/chat/completions", post(inference::proxy))
        .route("/inference/v1/completions", post(inference::proxy))
        .route("/inference/v1/models", get(inference::models))
        // The second provider's LoRA API and its OpenAI route.
        .route("/v1/lora/create", post(loras::create))
        .route("/v1/lora/{lora_name}", get(loras::get).patch(loras::update).delete(loras::delete))
        .route("/v1/lora/{lora_name}/status", get(loras::status))
        .route("/v1/user/loras", get(loras::list))
        .route("/v1/openai/chat/completions", post(loras::openai))
        .route("/v1/openai/completions", post(loras::openai))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY));
    let files = Router::new()
        .route("/upload/{account}/{model}/{file}", put(upload::put))
        .route("/download/{account}/{model}/{file}", get(upload::get))
        .route("/replica-files/{account}/{model}", get(upload::manifest))
        .route("/replica-versions/{account}/{deployment}/{version}", get(upload::version_manifest))
        .route("/replica-versions/{account}/{deployment}/{version}/{file}", get(upload::version_file))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(api)
        .merge(files)
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(console::root))
        .route("/console", get(console::root))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::asset))
        // After routing, so the metric's route label is the matched pattern.
        .route_layer(axum::middleware::from_fn_with_state(metrics, crate::metrics::track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Refuses query parameters on a route that takes none.
fn no_params(q: Option<&str>) -> ApiResult<()> {
    Params::parse(q)?.finish()
}

async fn health(RawQuery(q): RawQuery) -> ApiResult<Json<Value>> {
    no_params(q.as_deref())?;
    Ok(Json(json!({"status": "ok"})))
}

async fn render_metrics(State(state): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    no_params(q.as_deref())?;
    let mut text = state.metrics.render();
    text.push_str(&crate::metrics::render_speculation(&state.inference.fleet.speculation()));
    Ok(([("content-type", "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi(RawQuery(q): RawQuery) -> ApiResult<Json<Value>> {
    no_params(q.as_deref())?;
    Ok(Json(crate::openapi::document()))
}

async fn not_found() -> ApiError {
    ApiError::new(Code::NotFound, "no such route; GET /openapi.json lists hearth's API")
}

/// HTTP's 405 (axum adds the `Allow` header naming the route's methods), with a google.rpc
/// body like every other refusal. No google.rpc code means "wrong method", so the body says
/// UNIMPLEMENTED while the status says what HTTP clients and schema-driven tools expect.
async fn method_not_allowed() -> Response {
    let mut response = ApiError::new(
        Code::Unimplemented,
        "this method is not supported on this route; the Allow header lists those that are, and GET /openapi.json \
         lists hearth's API",
    )
    .into_response();
    *response.status_mut() = axum::http::StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// hearth's own: the last hour of the account's inference through this gateway, by minute.
async fn inference_metrics(
    State(s): State<AppState>,
    Caller(who): Caller,
    axum::extract::Path(account): axum::extract::Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<hearth_api::resources::InferenceMetrics>> {
    no_params(q.as_deref())?;
    s.control.authorize(&who, &account)?;
    Ok(Json(s.metrics.recent.of_account(&account, std::time::SystemTime::now())))
}

/// The older SDK checks a key by asking which account it belongs to.
async fn verify_api_key(caller: Caller, RawQuery(q): RawQuery) -> ApiResult<Response> {
    no_params(q.as_deref())?;
    let mut headers = HeaderMap::new();
    if let Ok(v) = caller.0.account.parse() {
        headers.insert("x-fireworks-account-id", v);
    }
    // `user` and `role` are hearth's own: the console shows what the signed-in key may do.
    let who = &caller.0;
    let body = json!({
        "accountId": who.account,
        "user": format!("accounts/{}/users/{}", who.account, who.user),
        "role": who.role.as_str(),
    });
    Ok((StatusCode::OK, headers, Json(body)).into_response())
}

/// The authenticated caller, from `Authorization: Bearer <key>`, or `xi-api-key: <key>` as
/// the second provider's clients send it.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = match parts.headers.get("authorization") {
            None => match parts.headers.get("xi-api-key") {
                None => None,
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| ApiError::new(Code::Unauthenticated, "malformed xi-api-key header"))?
                        .trim()
                        .to_string(),
                ),
            },
            Some(v) => {
                let v =
                    v.to_str().map_err(|_| ApiError::new(Code::Unauthenticated, "malformed Authorization header"))?;
                let key = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .ok_or_else(|| ApiError::new(Code::Unauthenticated, "Authorization must be \"Bearer <key>\""))?;
                Some(key.trim().to_string())
            }
        };
        Ok(Caller(state.control.authenticate(key.as_deref()).await?))
    }
}

/// Parses a JSON body into a wire type; syntax errors, unknown fields and unknown enum values
/// become INVALID_ARGUMENT with serde's description of where.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes, what: &str) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_str("{}").map_err(|e| ApiError::invalid(format!("{what}: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid {what}: {e}")))
}

/// A PATCH body as JSON, for the control plane's one typed parse of it (`Patch::parse`),
/// which needs to know which fields were sent.
pub(crate) fn patch_body(body: &Bytes, what: &str) -> ApiResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid {what}: {e}")))
}

/// The list parameters every collection takes; `showDeleted` only where allowed.
pub(crate) fn list_request(params: &mut Params, with_show_deleted: bool) -> ApiResult<ListRequest> {
    Ok(ListRequest {
        page_size: params.i32("pageSize")?,
        page_token: params.str("pageToken"),
        filter: params.str("filter"),
        order_by: params.str("orderBy"),
        read_mask: params.str("readMask"),
        show_deleted: if with_show_deleted { params.bool("showDeleted")? } else { false },
    })
}

/// The query of a plain list call: its list parameters and nothing else.
pub(crate) fn list_query(q: Option<&str>) -> ApiResult<ListRequest> {
    let mut p = Params::parse(q)?;
    let req = list_request(&mut p, false)?;
    p.finish()?;
    Ok(req)
}

/// The query of a plain get: `readMask` and nothing else.
pub(crate) fn read_mask_query(q: Option<&str>) -> ApiResult<Option<String>> {
    let mut p = Params::parse(q)?;
    let mask = p.str("readMask");
    p.finish()?;
    Ok(mask)
}

pub(crate) fn page_json(key: &str, page: ListPage) -> Json<Value> {
    let mut body = serde_json::Map::new();
    body.insert(key.to_string(), Value::Array(page.items));
    if let Some(t) = page.next_page_token {
        body.insert("nextPageToken".to_string(), Value::String(t));
    }
    body.insert("totalSize".to_string(), json!(page.total_size));
    Json(Value::Object(body))
}

/// Splits `id:verb` into the id and the optional custom method.
pub(crate) fn split_verb(segment: &str) -> (&str, Option<&str>) {
    match segment.split_once(':') {
        Some((id, verb)) => (id, Some(verb)),
        None => (segment, None),
    }
}

pub(crate) fn unknown_verb(resource: &str, verb: &str, method: &str) -> ApiError {
    ApiError::new(Code::NotFound, format!("{resource} has no custom method :{verb} for {method}"))
}

pub(crate) fn empty() -> Json<Value> {
    Json(json!({}))
}

/// A body that failed to arrive (too large, broken connection) is still answered with a
/// Status, never a plain-text rejection.
pub(crate) fn body(b: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::invalid(format!("request body is larger than {MAX_JSON_BODY} bytes"))
        } else {
            ApiError::invalid(format!("could not read the request body: {e}"))
        }
    })
}
