//! Direct routes (`directRouteType: INTERNET`): a deployment's own endpoint, a listener of the
//! gateway's process on a port of its own (`directRouteHandle`, `host:port`), that answers
//! `POST /v1/chat/completions` and `/v1/completions` for that deployment only and accepts only
//! the deployment's `directRouteApiKeys`, never an account's keys. Requests go to the
//! deployment's replicas as the gateway's own inference routes send them (same replica choice,
//! same rate limits, charged to the deployment's account).
//!
//! Every gateway process runs the listeners of every deployment with a direct route, from a
//! resync every second: a deployment that gets a direct route is served within a second, one
//! that loses it (or is deleted) stops being served. A key is checked against the stored spec
//! on every request, so a key removed from the list is refused at once. A restarted gateway
//! listens on the same port again when it is free.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::Uri;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use hearth_api::Code;
use hearth_control::observe::DeploymentKey;
use hearth_control::Principal;
use serde_json::Value;

use super::AppState;
use crate::error::OpenAiError;

/// One deployment's listener.
struct Listener {
    handle: String,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Direct {
    state: AppState,
    key: DeploymentKey,
}

/// Keeps a listener for every deployment with a direct route, on `host`, for as long as the
/// gateway runs.
pub async fn run(state: AppState, host: IpAddr) {
    let mut listeners: HashMap<DeploymentKey, Listener> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let wanted = match state.control.direct_routes().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "listing direct routes failed; will retry");
                continue;
            }
        };
        listeners.retain(|key, l| {
            let keep = wanted.contains(key) && !l.task.is_finished();
            if !keep {
                l.task.abort();
                tracing::info!(deployment = %key.name(), handle = %l.handle, "direct route closed");
            }
            keep
        });
        for key in wanted {
            if listeners.contains_key(&key) {
                continue;
            }
            match open(&state, &key, host).await {
                Ok(l) => {
                    listeners.insert(key, l);
                }
                Err(e) => tracing::warn!(deployment = %key.name(), error = %e, "could not open a direct route"),
            }
        }
    }
}

/// Binds the deployment's port (the one it had, when free) and serves it.
async fn open(state: &AppState, key: &DeploymentKey, host: IpAddr) -> std::io::Result<Listener> {
    let previous = state.control.deployment_status(key).await.ok().flatten().and_then(|s| s.direct_route_handle);
    let port = previous.as_deref().and_then(|h| h.rsplit_once(':')).and_then(|(_, p)| p.parse::<u16>().ok());
    let listener = match port {
        Some(p) => match tokio::net::TcpListener::bind((host, p)).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind((host, 0)).await?,
        },
        None => tokio::net::TcpListener::bind((host, 0)).await?,
    };
    let handle = listener.local_addr()?.to_string();
    if let Err(e) = state.control.observe_direct_route(key, Some(handle.clone())).await {
        tracing::warn!(deployment = %key.name(), error = %e, "could not record the direct route's handle");
    }
    let app = Router::new()
        .route("/v1/chat/completions", post(serve))
        .route("/v1/completions", post(serve))
        .fallback(|| async {
            OpenAiError::new(Code::NotFound, "a direct route answers POST /v1/chat/completions and /v1/completions")
        })
        .with_state(Direct { state: state.clone(), key: key.clone() });
    tracing::info!(deployment = %key.name(), handle = %handle, "direct route open");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "a direct route's listener stopped");
        }
    });
    Ok(Listener { handle, task })
}

async fn serve(
    State(d): State<Direct>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    super::inference::no_query(uri.query())?;
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if presented.is_empty() || !d.state.control.direct_route_admits(&d.key, presented).await? {
        return Err(OpenAiError::new(
            Code::Unauthenticated,
            format!("this direct route of deployment {} accepts only the keys in its directRouteApiKeys", d.key.name()),
        ));
    }
    let body = super::body(body)?;
    let mut request: Value =
        serde_json::from_slice(&body).map_err(|e| OpenAiError::bad(format!("invalid JSON: {e}")))?;
    // The model is served from this deployment: `model#deployment` names it.
    let name = d.key.name();
    if let Some(model) = request.get("model").and_then(Value::as_str).filter(|m| !m.contains('#')) {
        request["model"] = Value::String(format!("{model}#{name}"));
    }
    let who = Principal::admin(d.key.account.clone());
    let how =
        super::inference::Forwarding { only: Some(&name), ..super::inference::Forwarding::from_headers(&headers) };
    super::inference::forward(&d.state, &who, uri.path(), request, how).await
}
