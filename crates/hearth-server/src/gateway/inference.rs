//! The inference router: OpenAI-style requests at `/inference/v1/...` and `/v1/...`, resolved
//! to a deployment, sent to its least-loaded ready replica, and streamed back as they come.
//!
//! A deployment at zero replicas is woken by the request, which waits (bounded) for a replica
//! to become ready. A request is retried on another replica only if it could not be sent at
//! all; once a byte went out, a replica that dies ends the response with an error instead.
//! Errors here are in OpenAI's shape, as the clients of these routes expect.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use hearth_api::Code;
use hearth_runtime::fleet::InFlight;
use serde_json::{json, Value};

use super::{AppState, Caller};
use crate::error::OpenAiError;

type InferenceResult<T> = Result<T, OpenAiError>;

/// The caller of an inference route, refused in OpenAI's error shape.
pub(super) struct InferenceCaller(pub hearth_control::Principal);

impl axum::extract::FromRequestParts<AppState> for InferenceCaller {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, s: &AppState) -> Result<Self, OpenAiError> {
        Ok(InferenceCaller(Caller::from_request_parts(parts, s).await?.0))
    }
}

/// How many replicas one request may be tried on before giving up.
const MAX_ATTEMPTS: usize = 3;

pub(super) async fn models(
    State(s): State<AppState>,
    InferenceCaller(who): InferenceCaller,
    RawQuery(q): RawQuery,
) -> InferenceResult<Response> {
    no_query(q.as_deref())?;
    let models = s.control.servable_models(&who).await?;
    let data: Vec<Value> = models
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": who.account, "created": 0}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

pub(super) async fn proxy(
    State(s): State<AppState>,
    InferenceCaller(who): InferenceCaller,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> InferenceResult<Response> {
    no_query(uri.query())?;
    let body = super::body(body)?;
    let request: Value = serde_json::from_slice(&body).map_err(|e| OpenAiError::bad(format!("invalid JSON: {e}")))?;
    let path = uri.path().strip_prefix("/inference").unwrap_or(uri.path()).to_string();
    forward(&s, &who, &path, request, Forwarding::from_headers(&headers)).await
}

/// How a request is forwarded, besides its body.
#[derive(Debug, Default)]
pub(super) struct Forwarding<'a> {
    /// A direct route's deployment: the only one the request may go to.
    pub only: Option<&'a str>,
    /// The `x-session-affinity` header: the session, when the body names none.
    pub session_header: Option<String>,
}

impl Forwarding<'_> {
    pub(super) fn from_headers(headers: &axum::http::HeaderMap) -> Forwarding<'static> {
        let session_header = headers
            .get("x-session-affinity")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        Forwarding { only: None, session_header }
    }
}

/// The longest `prompt_cache_key` or `user` accepted: each names a session or a person, and
/// a longer one is a mistake (a prompt sent in the wrong field), not a name.
const MAX_SESSION_KEY: usize = 1024;

/// Refuses a `prompt_cache_key` or `user` too long to be a session's name.
fn check_session_keys(request: &Value) -> InferenceResult<()> {
    for k in ["prompt_cache_key", "user"] {
        if let Some(v) = request.get(k).and_then(Value::as_str) {
            if v.len() > MAX_SESSION_KEY {
                return Err(OpenAiError::bad(format!(
                    "{k} is {} bytes long; it names a session or an end user in at most {MAX_SESSION_KEY} bytes",
                    v.len()
                ))
                .param(k));
            }
        }
    }
    Ok(())
}

/// The session of a request to a deployment with session affinity, as the inference spec
/// orders them: `prompt_cache_key`, else `user`, else the `x-session-affinity` header.
fn session_of(request: &Value, header: Option<String>) -> Option<String> {
    let field = |k: &str| request.get(k).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_string);
    field("prompt_cache_key").or_else(|| field("user")).or(header)
}

/// Sends an OpenAI request to a replica of the deployment its `model` resolves to; `path` is
/// the replica's route (`/v1/chat/completions`).
pub(super) async fn forward(
    s: &AppState,
    who: &hearth_control::Principal,
    path: &str,
    mut request: Value,
    how: Forwarding<'_>,
) -> InferenceResult<Response> {
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| OpenAiError::bad("model is required").param("model"))?
        .to_string();
    check_session_keys(&request)?;
    s.control.admit_inference(&who.account).await?;
    let route = s.control.resolve_route(who, &model).await?;
    // A direct route serves its own deployment and nothing else.
    if let Some(deployment) = how.only.filter(|d| *d != route.deployment) {
        return Err(OpenAiError::new(
            Code::NotFound,
            format!("{model} is not served by this direct route, which serves deployment {deployment}"),
        )
        .param("model"));
    }
    // Replicas know the deployment by its base model's name.
    request["model"] = Value::String(route.served_model.clone());
    // With session affinity the session picks the replica, where the prefix cache holds what
    // the session's earlier requests computed.
    let session = route.session_affinity.then(|| session_of(&request, how.session_header)).flatten();
    // A stream always carries its usage from the replica, so its tokens can be charged to the
    // account; a client that did not ask for it gets the stream without it.
    let mut strip_usage = false;
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        match request.get_mut("stream_options") {
            None | Some(Value::Null) => {
                request["stream_options"] = json!({"include_usage": true});
                strip_usage = true;
            }
            Some(Value::Object(o)) => {
                strip_usage = o.get("include_usage").and_then(Value::as_bool) != Some(true);
                o.insert("include_usage".to_string(), Value::Bool(true));
            }
            Some(_) => {}
        }
    }
    let payload = Bytes::from(request.to_string());
    let mut meter = Meter::new(s.control.clone(), &who.account, strip_usage);
    let key = crate::recent::SeriesKey {
        account: who.account.clone(),
        deployment: route.deployment.clone(),
        model: route.served_model.clone(),
        adapter: route.adapter,
    };
    meter.recent = Some((s.metrics.recent.clone(), key));

    let fleet = &s.inference.fleet;
    fleet.touch(&route.deployment);
    let deadline = Instant::now() + s.inference.wake_timeout;
    let mut tried: Vec<String> = Vec::new();
    // Counted as load while it waits, so the autoscaler wakes (or grows) the deployment.
    let mut waiting = None;
    loop {
        // An adapter prefers the replica that last served it (it is likely hot there).
        let adapter = route.adapter.then_some(route.served_model.as_str());
        let slot = match fleet.acquire(&route.deployment, &tried, adapter, session.as_deref()) {
            Some(slot) => {
                drop(waiting.take());
                slot
            }
            None => {
                waiting.get_or_insert_with(|| fleet.wait_for(&route.deployment));
                if Instant::now() >= deadline {
                    return Err(OpenAiError::new(
                        Code::Unavailable,
                        format!(
                            "deployment {} has no ready replica yet (waited {}s); it is starting, retry shortly",
                            route.deployment,
                            s.inference.wake_timeout.as_secs()
                        ),
                    ));
                }
                // Wake the deployment (the reconciler sees the recent request) and wait.
                s.inference.fleet.kick();
                fleet.wait_changed().await;
                continue;
            }
        };
        let url = format!("{}{}", slot.endpoint, path);
        let sent = s
            .inference
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("authorization", s.inference.credentials.bearer(&slot.endpoint))
            .body(payload.clone())
            .send()
            .await;
        match sent {
            Ok(upstream) => return Ok(relay(upstream, slot, meter)),
            Err(e) => {
                // Nothing was sent to the client yet: another replica may take it.
                tracing::warn!(endpoint = %slot.endpoint, error = %e, "replica unreachable; trying another");
                tried.push(slot.endpoint.clone());
                s.inference.fleet.kick();
                if tried.len() >= MAX_ATTEMPTS {
                    return Err(OpenAiError::new(
                        Code::Unavailable,
                        format!("replicas of {} are unreachable: {e}", route.deployment),
                    ));
                }
            }
        }
    }
}

/// The OpenAI routes take no query parameters; one sent is a mistake worth saying.
pub(super) fn no_query(q: Option<&str>) -> InferenceResult<()> {
    match q.filter(|q| !q.is_empty()) {
        None => Ok(()),
        Some(q) => {
            let names: Vec<&str> = q.split('&').map(|kv| kv.split('=').next().unwrap_or("")).collect();
            Err(OpenAiError::bad(format!(
                "unknown query parameter(s) {}: this route takes its parameters in the JSON body",
                names.join(", ")
            )))
        }
    }
}

/// Streams the replica's response to the client chunk by chunk. The in-flight slot lives as
/// long as the body, so load counts cover streaming responses; a client that goes away drops
/// the body, which drops the upstream request and frees the sequence on the replica.
fn relay(upstream: reqwest::Response, slot: InFlight, mut meter: Meter) -> Response {
    // Which replica answered, as an opaque id (never its address): for clients that check
    // their session stays on one replica, and for logs.
    let replica = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(slot.endpoint.as_bytes())[..4])
    };
    let status = StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type =
        upstream.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
    let is_sse = content_type.starts_with("text/event-stream");
    meter.sse = is_sse;
    meter.succeeded = status.is_success();
    let stream = upstream.bytes_stream().map(move |chunk| {
        let _slot = &slot;
        match chunk {
            Ok(b) => Ok::<Bytes, std::io::Error>(meter.pass(b)),
            Err(e) if is_sse => {
                // The replica died mid-stream: say so in the stream, then end it.
                tracing::warn!(error = %e, "replica failed mid-stream");
                let msg = json!({"error": {"message": format!("the replica serving this request failed: {e}"), "type": "unavailable"}});
                Ok(Bytes::from(format!("data: {msg}\n\ndata: [DONE]\n\n")))
            }
            Err(e) => Err(std::io::Error::other(format!("the replica serving this request failed: {e}"))),
        }
    });
    // After an error chunk of an event stream, stop reading from the dead replica.
    let mut failed = false;
    let stream = stream.take_while(move |c| {
        let done = failed;
        if let Ok(b) = c {
            failed = b.starts_with(b"data: {\"error\"");
        }
        std::future::ready(!done)
    });
    (status, [("content-type", content_type), ("x-hearth-replica", replica)], Body::from_stream(stream)).into_response()
}

/// What the inference router needs besides the control plane.
#[derive(Clone)]
pub struct Inference {
    pub fleet: std::sync::Arc<hearth_runtime::fleet::Fleet>,
    pub http: reqwest::Client,
    /// Replicas serve only requests that carry their token (the caller's own key is never
    /// passed on).
    pub credentials: hearth_runtime::ReplicaCredentials,
    /// How long a request waits for a deployment at zero to get a ready replica.
    pub wake_timeout: Duration,
}

impl Inference {
    pub fn new(
        fleet: std::sync::Arc<hearth_runtime::fleet::Fleet>,
        credentials: hearth_runtime::ReplicaCredentials,
        wake_timeout: Duration,
    ) -> Inference {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap_or_default();
        Inference { fleet, http, credentials, wake_timeout }
    }
}

/// Counts the tokens a response carries (its `usage`) as it passes, and charges them to the
/// account's `tokens-per-minute` quota when the response ends, or is dropped because its
/// client went away. An event stream is read line by line: its usage chunk is removed when the
/// client did not ask for one. A stream cut before its usage is charged a token per chunk.
struct Meter {
    control: hearth_control::ControlPlane,
    account: String,
    strip_usage: bool,
    sse: bool,
    /// An event stream's bytes after its last complete line.
    pending: Vec<u8>,
    /// A JSON response's bytes, read for its usage at the end.
    body: Vec<u8>,
    usage: Option<u64>,
    chunks: u64,
    /// Where the request's figures go when it ends (a successful answer only).
    recent: Option<(std::sync::Arc<crate::recent::RecentInference>, crate::recent::SeriesKey)>,
    started: Instant,
    first_token: Option<Instant>,
    prompt_tokens: u64,
    completion_tokens: Option<u64>,
    succeeded: bool,
}

/// The most of a JSON response kept to read its usage; a larger one is charged nothing extra.
const MAX_METERED_BODY: usize = 8 << 20;

fn total_tokens(v: &Value) -> Option<u64> {
    v.get("usage").and_then(|u| u.get("total_tokens")).and_then(Value::as_u64)
}

impl Meter {
    fn new(control: hearth_control::ControlPlane, account: &str, strip_usage: bool) -> Meter {
        Meter {
            control,
            account: account.to_string(),
            strip_usage,
            sse: false,
            pending: Vec::new(),
            body: Vec::new(),
            usage: None,
            chunks: 0,
            recent: None,
            started: Instant::now(),
            first_token: None,
            prompt_tokens: 0,
            completion_tokens: None,
            succeeded: false,
        }
    }

    /// Reads a usage object's prompt and completion tokens for the recent figures.
    fn note_usage(&mut self, v: &Value) {
        if let Some(u) = v.get("usage") {
            self.prompt_tokens += u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
            *self.completion_tokens.get_or_insert(0) += u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
        }
    }

    /// Notes what a piece of the response says and returns what the client is to get of it.
    fn pass(&mut self, bytes: Bytes) -> Bytes {
        if !self.sse {
            if self.body.len() + bytes.len() <= MAX_METERED_BODY {
                self.body.extend_from_slice(&bytes);
            }
            return bytes;
        }
        self.pending.extend_from_slice(&bytes);
        let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') else { return Bytes::new() };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        let mut out = Vec::with_capacity(complete.len());
        for line in complete.split_inclusive(|&b| b == b'\n') {
            match self.event(line) {
                Some(rewritten) => out.extend_from_slice(&rewritten),
                None => out.extend_from_slice(line),
            }
        }
        Bytes::from(out)
    }

    /// One line of an event stream: `Some` replaces it (empty drops it), `None` keeps it.
    fn event(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        let data = line.strip_prefix(b"data: ")?;
        if !data.starts_with(b"{") {
            return None;
        }
        // Most events are one token's chunk: counted by a byte search, parsed only when they
        // carry a usage (the replica writes compact JSON).
        if contains(data, b"\"choices\":[{") {
            self.chunks += 1;
            // The first chunk carrying output; a chat stream opens with an empty role chunk.
            let opening = contains(data, b"\"role\":\"assistant\"") && contains(data, b"\"content\":\"\"");
            if self.first_token.is_none() && !opening {
                self.first_token = Some(Instant::now());
            }
        }
        if !contains(data, b"\"usage\":{") {
            return None;
        }
        let mut v: Value = serde_json::from_slice(data).ok()?;
        let tokens = total_tokens(&v)?;
        self.note_usage(&v);
        *self.usage.get_or_insert(0) += tokens;
        if !self.strip_usage {
            return None;
        }
        if v.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty()) {
            return Some(Vec::new());
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("usage");
        }
        Some(format!("data: {v}\n").into_bytes())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Drop for Meter {
    fn drop(&mut self) {
        let tokens = if self.sse {
            self.usage.unwrap_or(self.chunks)
        } else {
            let body = serde_json::from_slice::<Value>(&self.body).ok();
            if let Some(v) = &body {
                self.note_usage(v);
            }
            body.as_ref().and_then(total_tokens).unwrap_or(0)
        };
        if tokens > 0 {
            self.control.charge_inference_tokens(&self.account, tokens);
        }
        self.record();
    }
}

impl Meter {
    /// The finished request's latencies and tokens, into the gateway's recent figures.
    fn record(&mut self) {
        let Some((recent, key)) = self.recent.take() else { return };
        if !self.succeeded {
            return;
        }
        let now = Instant::now();
        let completion = self.completion_tokens.unwrap_or(0);
        let (ttft, tpot) = match self.first_token {
            Some(first) => (
                Some(first.duration_since(self.started).as_secs_f64()),
                (completion > 1).then(|| now.duration_since(first).as_secs_f64() / (completion - 1) as f64),
            ),
            None if !self.sse && completion > 0 => {
                (None, Some(now.duration_since(self.started).as_secs_f64() / completion as f64))
            }
            None => (None, None),
        };
        let sample = crate::recent::Sample {
            time_to_first_token: ttft,
            time_per_output_token: tpot,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
        };
        recent.record(key, sample, std::time::SystemTime::now());
    }
}
