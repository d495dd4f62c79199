//! The engine server: an OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`,
//! `/v1/models`) over one `Engine`, with `/health` and Prometheus `/metrics`.
//!
//! Handlers turn requests into `GenerateRequest`s and engine events into OpenAI responses or
//! SSE chunks. Dropping a response (the client went away) drops the event receivers, which
//! frees the sequences in the engine at its next step.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use hearth_api::openai::{
    check_fields, ChatCompletionRequest, CompletionRequest, ContextOverflow, FieldError, Prompt, Sampling, Usage,
    CHAT_FIELDS, COMPLETION_FIELDS,
};
use hearth_api::replica::{
    paths, AdapterInfo, AdapterList, Health, LoadAdapterRequest, LoadFigures, LoadModelVersionRequest, ModelVersion,
    UnloadAdapterRequest, Unloaded, Unmerged,
};
use hearth_api::Code;
use hearth_engine::chat::{ChatMessage, ChatTemplate};

use crate::structured::{self, ToolPlan};
use hearth_engine::lora::LoraAdapter;
use hearth_engine::sampling::Sampled;
use hearth_engine::tools::{CallParser, Piece};
use hearth_engine::{Engine, EngineError, Event, GenerateRequest, Grammar, SamplingParams};

pub use crate::error::OpenAiError;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

/// The most completions one request may ask for (`n` times the number of prompts).
const MAX_CHOICES: usize = 16;
const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

#[derive(Clone)]
struct App {
    engine: Engine,
    served_name: Arc<str>,
    template: Option<Arc<ChatTemplate>>,
    /// The system message of a conversation that has none.
    system_prompt: Option<Arc<str>>,
    sampling_defaults: SamplingDefaults,
    metrics: Arc<Counters>,
    loader: Option<ModelLoader>,
    /// One version load at a time: a gateway asking again while a load still waits for the
    /// running requests finds it done, instead of reading the weights a second time.
    loading: Arc<tokio::sync::Mutex<()>>,
    artifact_cache: Option<Arc<std::path::Path>>,
    fetcher: reqwest::Client,
}

/// Reads a model's weights and tokenizer as the replica serves them (its precision, its
/// device): what a new version of the model is loaded with.
pub type ModelLoader =
    Arc<dyn Fn(&std::path::Path) -> hearth_engine::error::Result<hearth_engine::Loaded> + Send + Sync>;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

type ApiResult<T> = Result<T, OpenAiError>;

/// What the engine server does beyond serving its engine.
#[derive(Default)]
pub struct ServerOptions {
    /// With a token, every route but `/health` requires `Authorization: Bearer <token>` (a
    /// replica started by a gateway always has one); without, the server is open, as a
    /// developer running `hearth engine` by hand on loopback expects.
    pub token: Option<String>,
    /// The chat template to render chats with instead of the checkpoint's (a model's
    /// `conversationConfig.template`).
    pub chat_template: Option<ChatTemplate>,
    /// The system message a conversation without one gets (`conversationConfig.system`).
    pub system_prompt: Option<String>,
    /// What a request that leaves a sampling parameter unset gets (the checkpoint's
    /// generation_config.json, as `hearth_formats::sampling_defaults` reads it).
    pub sampling_defaults: SamplingDefaults,
    /// How to read a new version of the model (`POST /v1/load_model_version`); without it
    /// the route refuses.
    pub loader: Option<ModelLoader>,
    /// Where files named by manifest URLs (`lora_path`, `model_path`) are fetched to; without
    /// it only local paths are accepted.
    pub artifact_cache: Option<std::path::PathBuf>,
}

/// The model's own sampling parameters, for requests that do not set them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    /// From the parameters by their OpenAI names.
    pub fn from_map(m: &std::collections::BTreeMap<String, f64>) -> SamplingDefaults {
        SamplingDefaults {
            temperature: m.get("temperature").map(|v| *v as f32),
            top_p: m.get("top_p").map(|v| *v as f32),
            top_k: m.get("top_k").map(|v| *v as u32),
            repetition_penalty: m.get("repetition_penalty").map(|v| *v as f32),
        }
    }
}

/// The engine server's router.
pub fn engine_router(engine: Engine, served_name: String, opts: ServerOptions) -> Router {
    let template = match opts.chat_template.map(Ok).unwrap_or_else(|| ChatTemplate::from_tokenizer(engine.tokenizer()))
    {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            tracing::warn!(error = %e, "no usable chat template; /v1/chat/completions will refuse requests");
            None
        }
    };
    let token = opts.token;
    let app = App {
        engine,
        served_name: served_name.into(),
        template,
        system_prompt: opts.system_prompt.map(Arc::from),
        sampling_defaults: opts.sampling_defaults,
        metrics: Arc::new(Counters::default()),
        loader: opts.loader,
        loading: Default::default(),
        artifact_cache: opts.artifact_cache.map(Arc::from),
        fetcher: reqwest::Client::new(),
    };
    Router::new()
        .route(paths::HEALTH, get(|| async { Json(Health { status: "ok".to_string() }) }))
        .route(paths::LOAD_FIGURES, get(load_figures))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", get(metrics))
        .route(paths::LOAD_ADAPTER, post(load_adapter))
        .route(paths::UNLOAD_ADAPTER, post(unload_adapter))
        .route(paths::ADAPTERS, get(list_adapters))
        .route(paths::MERGE_ADAPTER, post(merge_adapter))
        .route(paths::UNMERGE_ADAPTER, post(unmerge_adapter))
        .route(paths::LOAD_MODEL_VERSION, post(load_model_version))
        .fallback(|| async { OpenAiError::new(Code::NotFound, "no such route") })
        .layer(axum::middleware::from_fn(no_query_parameters))
        .layer(axum::middleware::from_fn_with_state(token.map(Arc::<str>::from), require_token))
        .with_state(app)
}

/// Refuses every request but a health check that does not carry the replica's token.
async fn require_token(
    State(token): State<Option<Arc<str>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = token else { return next.run(req).await };
    if req.uri().path() == paths::HEALTH {
        return next.run(req).await;
    }
    let presented =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if same_secret(p.as_bytes(), token.as_bytes()) => next.run(req).await,
        _ => OpenAiError::new(
            Code::Unauthenticated,
            "this engine serves only its gateway: send requests through the gateway's /inference routes",
        )
        .into_response(),
    }
}

/// Equality whose time does not depend on where two secrets differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// None of the engine server's routes takes query parameters; one sent is a mistake worth
/// saying rather than ignoring.
async fn no_query_parameters(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match req.uri().query().filter(|q| !q.is_empty()) {
        Some(q) => OpenAiError::bad(format!("unknown query parameter(s) in {q:?}: this server's routes take none"))
            .into_response(),
        None => next.run(req).await,
    }
}

async fn models(State(app): State<App>) -> Json<Value> {
    let mut data = vec![json!({
        "id": &*app.served_name, "object": "model", "created": 0, "owned_by": "hearth",
        "max_model_len": app.engine.context_length(),
    })];
    let merged = app.engine.merged_adapter().map(|m| hearth_engine::AdapterInfo::of(&m));
    for a in app.engine.adapters().into_iter().chain(merged) {
        data.push(json!({"id": a.name, "object": "model", "created": 0, "owned_by": "hearth",
            "parent": &*app.served_name, "version": a.version}));
    }
    Json(json!({"object": "list", "data": data}))
}

/// An engine adapter as the replica protocol reports it.
fn adapter_info(a: hearth_engine::AdapterInfo) -> AdapterInfo {
    AdapterInfo {
        name: a.name,
        version: a.version,
        hot: a.hot,
        modules_patched: a.modules_patched as u64,
        ranks: a.ranks.into_iter().map(|r| r as u64).collect(),
        target_modules: a.target_modules,
        bytes: a.bytes as u64,
        requests: a.requests,
        tokens: a.tokens,
    }
}

/// The body of a load or merge: an adapter name that is not the base model's, and its path.
fn adapter_body(app: &App, body: Result<Bytes, BytesRejection>) -> ApiResult<LoadAdapterRequest> {
    let body = body.map_err(|e| OpenAiError::bad(format!("could not read the request body: {e}")))?;
    let req: LoadAdapterRequest =
        serde_json::from_slice(&body).map_err(|e| OpenAiError::bad(format!("invalid request: {e}")))?;
    if req.lora_name == *app.served_name {
        return Err(OpenAiError::bad(format!(
            "{:?} is the base model's name; choose another adapter name",
            req.lora_name
        )));
    }
    Ok(req)
}

/// The local directory of files a request names: a path as it is, a manifest URL fetched into
/// the artifact cache first.
async fn local_files(app: &App, reference: &str) -> ApiResult<String> {
    if !hearth_artifacts::replica_files::is_manifest_url(reference) {
        return Ok(reference.to_string());
    }
    let Some(cache) = &app.artifact_cache else {
        return Err(OpenAiError::bad("this server reads local paths only, not manifest URLs".to_string()));
    };
    let dir = hearth_artifacts::replica_files::local_files(&app.fetcher, reference, cache)
        .await
        .map_err(|e| OpenAiError::new(e.code(), e.to_string()))?;
    Ok(dir.to_string_lossy().into_owned())
}

/// Loads or reloads an adapter from a PEFT directory. The reply reports what it patched.
async fn load_adapter(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let mut req = adapter_body(&app, body)?;
    req.lora_path = local_files(&app, &req.lora_path).await?;
    let engine = app.engine.clone();
    let info = tokio::task::spawn_blocking(move || {
        engine.load_adapter(&req.lora_name, std::path::Path::new(&req.lora_path), req.expected_version.as_deref())
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))??;
    Ok(Json(adapter_info(info)).into_response())
}

/// Merges an adapter into the weights (replacing the merged one), once running requests
/// finish; requests then name it, and the base alone is not served until it is unmerged.
async fn merge_adapter(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let mut req = adapter_body(&app, body)?;
    req.lora_path = local_files(&app, &req.lora_path).await?;
    let engine = app.engine.clone();
    let info = tokio::task::spawn_blocking(move || {
        engine.merge_adapter(&req.lora_name, std::path::Path::new(&req.lora_path), req.expected_version.as_deref())
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))??;
    Ok(Json(adapter_info(info)).into_response())
}

/// Serves a new version of the model's weights in place (see `Engine::replace_model`):
/// requests running finish on the old weights, later ones get the new. A version that cannot
/// be read, or does not fit the one serving, is refused and the old one goes on serving.
async fn load_model_version(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body.map_err(|e| OpenAiError::bad(format!("could not read the request body: {e}")))?;
    let mut req: LoadModelVersionRequest =
        serde_json::from_slice(&body).map_err(|e| OpenAiError::bad(format!("invalid request: {e}")))?;
    if req.version.is_empty() || req.version.len() > 256 {
        return Err(OpenAiError::bad("a model version is named by 1 to 256 characters".to_string()));
    }
    let _one = app.loading.lock().await;
    // Already serving it (a gateway asking again before its probe saw the change): done.
    if app.engine.model_version().as_deref() == Some(req.version.as_str()) {
        return Ok(Json(ModelVersion { version: req.version }).into_response());
    }
    let Some(loader) = app.loader.clone() else {
        return Err(OpenAiError::new(Code::Unimplemented, "this server does not load model versions"));
    };
    req.model_path = local_files(&app, &req.model_path).await?;
    let engine = app.engine.clone();
    let version = req.version.clone();
    tokio::task::spawn_blocking(move || {
        let loaded = loader(std::path::Path::new(&req.model_path))?;
        engine.replace_model(loaded.model, &loaded.tokenizer, &req.version)
    })
    .await
    .map_err(|e| EngineError::Internal(e.to_string()))?
    // Here a model that cannot be served is the caller's to fix, and the reason is theirs to read.
    .map_err(|e| match e {
        EngineError::InvalidModel(m) => OpenAiError::new(Code::FailedPrecondition, m),
        other => other.into(),
    })?;
    Ok(Json(ModelVersion { version }).into_response())
}

async fn unmerge_adapter(State(app): State<App>) -> ApiResult<Response> {
    let engine = app.engine.clone();
    tokio::task::spawn_blocking(move || engine.unmerge_adapter())
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))??;
    Ok(Json(Unmerged { unmerged: true }).into_response())
}

async fn unload_adapter(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body.map_err(|e| OpenAiError::bad(format!("could not read the request body: {e}")))?;
    let req: UnloadAdapterRequest =
        serde_json::from_slice(&body).map_err(|e| OpenAiError::bad(format!("invalid request: {e}")))?;
    app.engine.unload_adapter(&req.lora_name)?;
    Ok(Json(Unloaded { unloaded: req.lora_name }).into_response())
}

async fn list_adapters(State(app): State<App>) -> Json<AdapterList> {
    let merged = app.engine.merged_adapter().map(|m| adapter_info(hearth_engine::AdapterInfo::of(&m)));
    Json(AdapterList { adapters: app.engine.adapters().into_iter().map(adapter_info).collect(), merged })
}

async fn load_figures(State(app): State<App>) -> Json<LoadFigures> {
    let s = app.engine.stats();
    let c = app.engine.config();
    Json(LoadFigures {
        running: s.running.load(Ordering::Relaxed) as u64,
        waiting: s.waiting.load(Ordering::Relaxed) as u64,
        max_running: c.max_running as u64,
        kv_cache_used_bytes: s.kv_bytes.load(Ordering::Relaxed) as u64,
        kv_cache_capacity_bytes: c.kv_cache_bytes as u64,
        spec_drafted_tokens: s.drafted_tokens.load(Ordering::Relaxed) as u64,
        spec_accepted_tokens: s.accepted_tokens.load(Ordering::Relaxed) as u64,
        model_version: app.engine.model_version(),
    })
}

async fn metrics(State(app): State<App>) -> Response {
    let s = app.engine.stats();
    let m = &app.metrics;
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    };
    line("hearth_engine_requests_total", "counter", "Inference requests received.", m.requests.load(Ordering::Relaxed));
    line(
        "hearth_engine_request_errors_total",
        "counter",
        "Inference requests refused or failed.",
        m.errors.load(Ordering::Relaxed),
    );
    line(
        "hearth_engine_prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        m.prompt_tokens.load(Ordering::Relaxed),
    );
    line(
        "hearth_engine_generation_tokens_total",
        "counter",
        "Tokens generated.",
        s.generated_tokens.load(Ordering::Relaxed) as u64,
    );
    line(
        "hearth_engine_running_sequences",
        "gauge",
        "Sequences in the running batch.",
        s.running.load(Ordering::Relaxed) as u64,
    );
    line(
        "hearth_engine_waiting_requests",
        "gauge",
        "Requests waiting for admission.",
        s.waiting.load(Ordering::Relaxed) as u64,
    );
    line(
        "hearth_engine_kv_cache_reserved_bytes",
        "gauge",
        "KV cache bytes reserved by running sequences.",
        s.kv_bytes.load(Ordering::Relaxed) as u64,
    );
    line("hearth_engine_steps_total", "counter", "Forward passes run.", s.steps.load(Ordering::Relaxed) as u64);
    let prefix = s.prefix.lock().map(|p| *p).unwrap_or_default();
    line(
        "hearth_engine_prefix_cache_hits_total",
        "counter",
        "Requests that started from cached prompt blocks.",
        prefix.hits,
    );
    line(
        "hearth_engine_prefix_cache_misses_total",
        "counter",
        "Requests that found no cached prompt block.",
        prefix.misses,
    );
    line(
        "hearth_engine_prefix_cache_cached_tokens_total",
        "counter",
        "Prompt tokens taken from the prefix cache instead of computed.",
        prefix.cached_tokens,
    );
    line(
        "hearth_engine_prefix_cache_evictions_total",
        "counter",
        "Cached blocks dropped to make room.",
        prefix.evictions,
    );
    line(
        "hearth_engine_prefix_cache_bytes",
        "gauge",
        "Bytes of KV blocks the prefix cache holds (running sequences may share them).",
        s.prefix_bytes.load(Ordering::Relaxed) as u64,
    );
    let (drafted, accepted) =
        (s.drafted_tokens.load(Ordering::Relaxed) as u64, s.accepted_tokens.load(Ordering::Relaxed) as u64);
    line("hearth_engine_spec_drafted_tokens_total", "counter", "Tokens proposed by speculation.", drafted);
    line(
        "hearth_engine_spec_accepted_tokens_total",
        "counter",
        "Proposed tokens the sequences' own sampling agreed with (acceptance rate: accepted / drafted).",
        accepted,
    );
    line(
        "hearth_engine_cancelled_total",
        "counter",
        "Sequences freed because their client went away.",
        s.cancelled.load(Ordering::Relaxed) as u64,
    );
    line(
        "hearth_engine_adapter_evictions_total",
        "counter",
        "LoRA adapters whose prepared form was dropped to make room for another (--max-hot-loras).",
        s.adapter_evictions.load(Ordering::Relaxed) as u64,
    );
    line(
        "hearth_engine_adapters_hot",
        "gauge",
        "LoRA adapters prepared for compute.",
        app.engine.adapters().iter().filter(|a| a.hot).count() as u64,
    );
    let per = s.per_adapter.lock().map(|m| m.clone()).unwrap_or_default();
    let families: [(&str, &str, &str); 3] = [
        ("hearth_adapter_requests_total", "counter", "Requests served, by LoRA adapter (\"base\" for none)."),
        ("hearth_adapter_prompt_tokens_total", "counter", "Prompt tokens, by LoRA adapter."),
        ("hearth_adapter_generation_tokens_total", "counter", "Generated tokens, by LoRA adapter."),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (adapter, m) in &per {
            let v = [m.requests, m.prompt_tokens, m.generated_tokens][i];
            out.push_str(&format!("{name}{{adapter=\"{}\"}} {v}\n", escape_label(adapter)));
        }
    }
    for (name, help, pick) in [
        ("hearth_adapter_time_to_first_token_seconds", "Time from admission to the first token, by LoRA adapter.", 0),
        ("hearth_adapter_time_per_output_token_seconds", "Time between tokens, by LoRA adapter.", 1),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (adapter, m) in &per {
            let h = if pick == 0 { &m.time_to_first_token } else { &m.time_per_output_token };
            let label = escape_label(adapter);
            for (le, c) in hearth_engine::engine::LATENCY_BUCKETS.iter().zip(h.buckets.iter()) {
                out.push_str(&format!("{name}_bucket{{adapter=\"{label}\",le=\"{le}\"}} {c}\n"));
            }
            out.push_str(&format!("{name}_bucket{{adapter=\"{label}\",le=\"+Inf\"}} {}\n", h.count));
            out.push_str(&format!(
                "{name}_sum{{adapter=\"{label}\"}} {}\n{name}_count{{adapter=\"{label}\"}} {}\n",
                h.sum, h.count
            ));
        }
    }
    out.push_str(&inference_extension_metrics(&app));
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// The figures the Kubernetes Gateway API Inference Extension's endpoint picker scrapes, in
/// vLLM's names and form, so a hearth replica can sit behind that router unchanged: requests
/// waiting and running, the KV cache's use (0 to 1), and `vllm:lora_requests_info`, whose
/// labels list the adapters of running and waiting requests (comma-separated) and the most
/// adapters a step runs, and whose value is the time of the reading (the picker takes the
/// latest series).
fn inference_extension_metrics(app: &App) -> String {
    let s = app.engine.stats();
    let c = app.engine.config();
    let model = escape_label(&app.served_name);
    let used = s.kv_bytes.load(Ordering::Relaxed) as f64;
    let usage = if c.kv_cache_bytes > 0 { (used / c.kv_cache_bytes as f64).min(1.0) } else { 0.0 };
    let list = |m: &std::sync::Mutex<Vec<String>>| {
        m.lock().map(|v| v.iter().map(|n| escape_label(n)).collect::<Vec<_>>().join(",")).unwrap_or_default()
    };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut out = String::new();
    for (name, help, value) in [
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            s.waiting.load(Ordering::Relaxed) as f64,
        ),
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            s.running.load(Ordering::Relaxed) as f64,
        ),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {value}\n"));
    }
    out.push_str(&format!(
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\n\
         vllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now}\n",
        c.max_step_adapters,
        list(&s.running_adapters),
        list(&s.waiting_adapters),
    ));
    out
}

/// Prometheus label values escape backslashes, quotes and newlines.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Parses a JSON object body, refusing unknown and not-yet-supported fields by name.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>, fields: &[&str]) -> ApiResult<T> {
    let body = body.map_err(|e| OpenAiError::bad(format!("could not read the request body: {e}")))?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| OpenAiError::bad(format!("invalid JSON: {e}")))?;
    let obj: &Map<String, Value> =
        value.as_object().ok_or_else(|| OpenAiError::bad("the body must be a JSON object"))?;
    match check_fields(obj, fields) {
        Ok(()) => {}
        Err(FieldError::Unknown(f)) => return Err(OpenAiError::bad(format!("unknown field `{f}`")).param(f)),
        Err(FieldError::NotSupported(f)) => {
            return Err(OpenAiError::new(
                Code::Unimplemented,
                format!("field `{f}` is not supported by hearth yet; remove it from the request"),
            )
            .param(f))
        }
    }
    // The path names the field at fault ("messages[2].role: ..."), which serde's own message
    // leaves out.
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            OpenAiError::bad(format!("invalid request: {inner}"))
        } else {
            OpenAiError::bad(format!("invalid request: {path}: {inner}")).param(path)
        }
    })
}

impl App {
    /// The base model's name selects no adapter; a loaded adapter's name selects it.
    fn check_model(&self, model: &str) -> ApiResult<Option<Arc<LoraAdapter>>> {
        if let Some(m) = self.engine.merged_adapter() {
            // The weights hold the merged adapter: it is served without per-request work,
            // and the base alone is not served at all.
            return if model == m.name {
                Ok(None)
            } else {
                Err(OpenAiError::new(
                    Code::NotFound,
                    format!(
                        "model {model:?} is not served here: adapter {:?} is merged into {:?}; ask for {:?}",
                        m.name, &*self.served_name, m.name
                    ),
                )
                .param("model"))
            };
        }
        if model == &*self.served_name {
            Ok(None)
        } else if let Some(a) = self.engine.adapter(model) {
            Ok(Some(a))
        } else {
            Err(OpenAiError::new(
                Code::NotFound,
                format!(
                    "model {model:?} is not served here; this server serves {:?} and its loaded adapters",
                    &*self.served_name
                ),
            )
            .param("model"))
        }
    }

    /// Builds one engine request per choice.
    #[allow(clippy::too_many_arguments)]
    fn requests(
        &self,
        prompts: Vec<Vec<u32>>,
        s: &Sampling,
        max_tokens: Option<u32>,
        default_max: Option<usize>,
        logprobs: Option<usize>,
        prompt_logprobs: bool,
        adapter: Option<Arc<LoraAdapter>>,
        grammar: Option<Grammar>,
    ) -> ApiResult<Vec<GenerateRequest>> {
        let n = s.n.unwrap_or(1) as usize;
        if n == 0 {
            return Err(OpenAiError::bad("n must be at least 1"));
        }
        if n * prompts.len() > MAX_CHOICES {
            return Err(OpenAiError::bad(format!("at most {MAX_CHOICES} completions per request (n × prompts)")));
        }
        let ctx = self.engine.context_length();
        let overflow = s.context_length_exceeded_behavior.unwrap_or_default();
        match max_tokens {
            Some(0) => return Err(OpenAiError::bad("max_tokens must be at least 1").param("max_tokens")),
            // More than the whole window can hold whatever the prompt: a mistake, not a limit
            // to lower to.
            Some(m) if m as usize > ctx => {
                return Err(OpenAiError::bad(format!(
                    "max_tokens is {m}, but this model's context holds {ctx} tokens, prompt and generation \
                     together; ask for at most {ctx}"
                ))
                .param("max_tokens"))
            }
            _ => {}
        }
        let mut out = Vec::new();
        for prompt in prompts {
            let room = ctx.saturating_sub(prompt.len());
            let max = match max_tokens {
                Some(m) => m as usize,
                None => default_max.unwrap_or(room),
            };
            if max > room && overflow == ContextOverflow::Error && prompt.len() < ctx {
                return Err(OpenAiError::bad(format!(
                    "the prompt has {} tokens and max_tokens is {max}: together more than the {ctx} tokens of \
                     this model's context; lower max_tokens to {room}, or send \
                     context_length_exceeded_behavior \"truncate\" to have it lowered",
                    prompt.len()
                ))
                .param("max_tokens"));
            }
            for j in 0..n {
                out.push(GenerateRequest {
                    prompt: prompt.clone(),
                    max_tokens: max.min(room.max(1)),
                    params: SamplingParams {
                        temperature: s.temperature.or(self.sampling_defaults.temperature).unwrap_or(1.0),
                        top_p: s.top_p.or(self.sampling_defaults.top_p).unwrap_or(1.0),
                        top_k: s.top_k.or(self.sampling_defaults.top_k).unwrap_or(0) as usize,
                        // Each of n choices gets its own stream of randomness, still reproducible.
                        seed: s.seed.map(|seed| seed.wrapping_add(j as u64)),
                        presence_penalty: s.presence_penalty.unwrap_or(0.0),
                        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
                        repetition_penalty: s
                            .repetition_penalty
                            .or(self.sampling_defaults.repetition_penalty)
                            .unwrap_or(1.0),
                        logprobs,
                    },
                    stop: s.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
                    ignore_eos: s.ignore_eos.unwrap_or(false),
                    prompt_logprobs,
                    adapter: adapter.clone(),
                    grammar: grammar.clone(),
                    cache_salt: s.prompt_cache_isolation_key.clone(),
                });
            }
        }
        Ok(out)
    }

    fn submit(&self, reqs: Vec<GenerateRequest>) -> ApiResult<Vec<UnboundedReceiver<Event>>> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let r: Result<Vec<_>, EngineError> = reqs.into_iter().map(|r| self.engine.generate(r)).collect();
        r.map_err(|e| {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            e.into()
        })
    }

    fn token_text(&self, id: u32) -> String {
        self.engine.tokenizer().decode(&[id], false).unwrap_or_default()
    }
}

/// Everything one choice produced, for non-streaming responses.
#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<Sampled>,
    prompt_logprobs: Vec<Sampled>,
    finish: Option<&'static str>,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> ApiResult<Collected> {
    let mut c = Collected::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::PromptLogprobs(p) => c.prompt_logprobs = p,
            Event::Token { sampled, text } => {
                c.text.push_str(&text);
                c.tokens.push(sampled);
            }
            Event::Finished { reason, text, prompt_tokens, completion_tokens, cached_tokens } => {
                c.cached_tokens = cached_tokens;
                c.text.push_str(&text);
                c.finish = Some(reason.as_str());
                c.prompt_tokens = prompt_tokens;
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
            Event::Error(e) => return Err(EngineError::Internal(e).into()),
        }
    }
    Err(EngineError::Stopped.into())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Usage, with the prompt tokens the prefix cache supplied.
fn usage(prompt: usize, completion: usize, cached: usize) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: Some(hearth_api::openai::PromptTokensDetails { cached_tokens: cached }),
    }
}

async fn completions(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req: CompletionRequest = parse(body, COMPLETION_FIELDS)?;
    let adapter = app.check_model(&req.model)?;
    let tok = app.engine.tokenizer();
    let prompts: Vec<Vec<u32>> = match req.prompt {
        Prompt::Text(t) => vec![tok.encode(&t, true)?],
        Prompt::Texts(ts) => ts.iter().map(|t| tok.encode(t, true)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids],
        Prompt::TokenLists(l) => l,
    };
    if prompts.is_empty() {
        return Err(OpenAiError::bad("prompt is empty"));
    }
    let echo = req.echo.unwrap_or(false);
    let logprobs = req.logprobs.map(|n| n as usize);
    let reqs = app.requests(
        prompts.clone(),
        &req.sampling,
        req.sampling.max_tokens,
        Some(DEFAULT_COMPLETION_MAX_TOKENS),
        logprobs,
        echo && logprobs.is_some(),
        adapter,
        structured::output_grammar(req.sampling.response_format.as_ref())?,
    )?;
    let n = req.sampling.n.unwrap_or(1) as usize;
    let rxs = app.submit(reqs)?;
    let (id, created, model) = (new_id("cmpl"), now(), req.model.clone());
    if req.sampling.stream.unwrap_or(false) {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let app2 = app.clone();
        let (id2, model2) = (id.clone(), model.clone());
        let chunk = move |index: usize, text: String, finish: Option<&str>, lp: Value| {
            json!({"id": id2, "object": "text_completion", "created": created, "model": model2,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})
        };
        // With echo, each choice starts with its prompt's text.
        let mut first = Vec::new();
        if echo {
            for index in 0..prompts.len() * n {
                first.push(Some(Ok(chunk(index, tok.decode(&prompts[index / n], true)?, None, Value::Null))));
            }
        }
        let chunk2 = chunk.clone();
        let body = merged(rxs).map(move |(index, ev)| match ev {
            Event::PromptLogprobs(_) => None,
            Event::Token { sampled, text } => {
                let lp = if logprobs.is_some() { completion_logprobs(&app2, &[sampled], None) } else { Value::Null };
                Some(Ok(chunk2(index, text, None, lp)))
            }
            Event::Finished { reason, text, prompt_tokens, completion_tokens, cached_tokens } => {
                app2.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                app2.metrics.completion_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
                let mut c = chunk2(index, text, Some(reason.as_str()), Value::Null);
                if include_usage {
                    c["usage"] = json!(usage(prompt_tokens, completion_tokens, cached_tokens));
                }
                Some(Ok(c))
            }
            Event::Error(e) => Some(Err(e)),
        });
        let chunks = stream::iter(first).chain(body);
        return Ok(sse(chunks));
    }
    let mut choices = Vec::new();
    let (mut pt, mut ct, mut cached) = (0, 0, 0);
    for (index, rx) in rxs.into_iter().enumerate() {
        let c = collect(rx).await?;
        let prompt = &prompts[index / n];
        pt += c.prompt_tokens;
        cached += c.cached_tokens;
        ct += c.completion_tokens;
        let mut text = c.text;
        let lp = match logprobs {
            None => Value::Null,
            Some(_) if echo => {
                let prompt_text = tok.decode(prompt, true)?;
                text = format!("{prompt_text}{text}");
                completion_logprobs(&app, &c.tokens, Some((prompt, &c.prompt_logprobs)))
            }
            Some(_) => completion_logprobs(&app, &c.tokens, None),
        };
        if echo && logprobs.is_none() {
            text = format!("{}{text}", tok.decode(prompt, true)?);
        }
        choices.push(json!({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish}));
    }
    // Prompt tokens count once per prompt, not once per choice.
    let (pt, cached) = (pt / n.max(1), cached / n.max(1));
    app.metrics.prompt_tokens.fetch_add(pt as u64, Ordering::Relaxed);
    app.metrics.completion_tokens.fetch_add(ct as u64, Ordering::Relaxed);
    Ok(Json(json!({"id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices, "usage": usage(pt, ct, cached)}))
    .into_response())
}

/// The legacy completions `logprobs` object. With `prompt`, the prompt's tokens come first,
/// the very first with a null logprob (nothing precedes it).
fn completion_logprobs(app: &App, tokens: &[Sampled], prompt: Option<(&[u32], &[Sampled])>) -> Value {
    let mut toks = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    let mut offset = 0;
    let mut push = |text: String, lp: Value, top: Value| {
        offsets.push(offset);
        offset += text.len();
        toks.push(text);
        lps.push(lp);
        tops.push(top);
    };
    let top_map = |s: &Sampled| {
        let m: Map<String, Value> = s.top.iter().map(|(t, l)| (app.token_text(*t), json!(l))).collect();
        Value::Object(m)
    };
    if let Some((ids, scored)) = prompt {
        for (i, id) in ids.iter().enumerate() {
            match i.checked_sub(1).and_then(|j| scored.get(j)) {
                Some(s) => push(app.token_text(*id), json!(s.logprob), top_map(s)),
                None => push(app.token_text(*id), Value::Null, Value::Null),
            }
        }
    }
    for s in tokens {
        push(app.token_text(s.token), json!(s.logprob), top_map(s));
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The chat `logprobs` object.
fn chat_logprobs(app: &App, tokens: &[Sampled]) -> Value {
    let entry = |id: u32, lp: Option<f32>| {
        let t = app.token_text(id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|s| {
            let mut e = entry(s.token, s.logprob);
            e["top_logprobs"] = Value::Array(s.top.iter().map(|(t, l)| entry(*t, Some(*l))).collect());
            e
        })
        .collect();
    json!({"content": content})
}

async fn chat_completions(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req: ChatCompletionRequest = parse(body, CHAT_FIELDS)?;
    let adapter = app.check_model(&req.model)?;
    let template = app.template.clone().ok_or_else(|| {
        OpenAiError::bad("this model has no chat template; use /v1/completions with a prompt instead")
    })?;
    if req.messages.is_empty() {
        return Err(OpenAiError::bad("messages must not be empty"));
    }
    let plan = structured::tool_plan(&app.engine, &req)?;
    let format = structured::output_grammar(req.sampling.response_format.as_ref())?;
    if format.is_some() && plan.as_ref().is_some_and(|p| p.grammar.is_some()) {
        return Err(OpenAiError::bad(
            "a turn that must call a tool (tool_choice \"required\" or a function) has no free-form output for \
             response_format to shape; send one or the other",
        )
        .param("response_format"));
    }
    let (messages, tool_defs) = structured::conversation(&template, &req.messages, plan.as_ref())?;
    if !messages.iter().any(|m| m.role != "assistant") {
        return Err(OpenAiError::bad(
            "messages has only assistant messages; a conversation needs a system or user message to answer",
        )
        .param("messages"));
    }
    // The model's own system message, for a conversation that brings none.
    let mut messages = messages;
    if let Some(system) = app.system_prompt.as_deref() {
        if !messages.iter().any(|m| m.role == "system") {
            messages.insert(0, ChatMessage::new("system", system));
        }
    }
    if req.max_completion_tokens.is_some() && req.sampling.max_tokens.is_some() {
        return Err(OpenAiError::bad("send max_tokens or max_completion_tokens, not both: they are the same limit")
            .param("max_completion_tokens"));
    }
    let prompt_text = template.render_with_tools(&messages, tool_defs.as_deref(), true)?;
    // The template already places any BOS the model wants.
    let prompt = app.engine.tokenizer().encode(&prompt_text, false)?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top = req.top_logprobs.map(|n| n as usize);
    if top.is_some() && !want_logprobs {
        return Err(OpenAiError::bad("top_logprobs requires logprobs: true"));
    }
    let logprobs = want_logprobs.then(|| top.unwrap_or(0));
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let grammar = plan.as_ref().and_then(|p| p.grammar.clone()).or(format);
    let reqs = app.requests(vec![prompt], &req.sampling, max_tokens, None, logprobs, false, adapter, grammar)?;
    let calls = plan.map(Arc::new);
    let rxs = app.submit(reqs)?;
    let (id, created, model) = (new_id("chatcmpl"), now(), req.model.clone());
    if req.sampling.stream.unwrap_or(false) {
        let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let choices = rxs.len();
        let app2 = app.clone();
        let (id2, model2) = (id.clone(), model.clone());
        // prompt tokens, completion tokens, finished choices, cached prompt tokens
        let mut usage_acc = [0usize; 4];
        let mut outputs: Vec<ToolOutput> = (0..choices).map(|_| ToolOutput::new(calls.clone())).collect();
        let first: Vec<Value> = (0..choices)
            .map(|index| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
            })
            .collect();
        let body = merged(rxs).flat_map(move |(index, ev)| {
            let chunk = |delta: Value, lp: Value, finish: Option<&str>| {
                json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]})
            };
            let out: Vec<Result<Value, String>> = match ev {
                Event::PromptLogprobs(_) => vec![],
                Event::Token { sampled, text } => {
                    let lp = if want_logprobs { chat_logprobs(&app2, &[sampled]) } else { Value::Null };
                    let deltas = outputs[index].push(&text);
                    if deltas.is_empty() && want_logprobs {
                        vec![Ok(chunk(json!({"content": ""}), lp, None))]
                    } else {
                        // The token's logprobs ride on the first chunk it produced.
                        let mut lp = Some(lp);
                        deltas.into_iter().map(|d| Ok(chunk(d, lp.take().unwrap_or(Value::Null), None))).collect()
                    }
                }
                Event::Finished { reason, text, prompt_tokens, completion_tokens, cached_tokens } => {
                    app2.metrics.completion_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
                    usage_acc[0] = prompt_tokens;
                    usage_acc[3] = usage_acc[3].max(cached_tokens);
                    usage_acc[1] += completion_tokens;
                    usage_acc[2] += 1;
                    let out = &mut outputs[index];
                    let mut deltas = out.push(&text);
                    deltas.extend(out.finish());
                    let finish = out.finish_reason(reason.as_str());
                    let mut v: Vec<Result<Value, String>> =
                        deltas.into_iter().map(|d| Ok(chunk(d, Value::Null, None))).collect();
                    v.push(Ok(chunk(json!({}), Value::Null, Some(finish))));
                    if include_usage && usage_acc[2] == choices {
                        app2.metrics.prompt_tokens.fetch_add(usage_acc[0] as u64, Ordering::Relaxed);
                        v.push(Ok(json!({"id": id2, "object": "chat.completion.chunk", "created": created,
                            "model": model2, "choices": [], "usage": usage(usage_acc[0], usage_acc[1], usage_acc[3])})));
                    }
                    v
                }
                Event::Error(e) => vec![Err(e)],
            };
            stream::iter(out)
        });
        let all = stream::iter(first.into_iter().map(|v| Some(Ok(v)))).chain(body.map(Some));
        return Ok(sse(all));
    }
    let mut choices = Vec::new();
    let (mut pt, mut ct, mut cached) = (0, 0, 0);
    for (index, rx) in rxs.into_iter().enumerate() {
        let c = collect(rx).await?;
        pt = c.prompt_tokens;
        cached = cached.max(c.cached_tokens);
        ct += c.completion_tokens;
        let lp = if want_logprobs { chat_logprobs(&app, &c.tokens) } else { Value::Null };
        let mut out = ToolOutput::new(calls.clone());
        out.push(&c.text);
        out.finish();
        let finish = out.finish_reason(c.finish.unwrap_or("stop"));
        let mut message = json!({"role": "assistant", "content": out.content});
        if !out.calls.is_empty() {
            if out.content.as_ref().is_none_or(|t: &String| t.trim().is_empty()) {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = json!(out.calls);
        }
        choices.push(json!({"index": index, "message": message, "logprobs": lp, "finish_reason": finish}));
    }
    app.metrics.prompt_tokens.fetch_add(pt as u64, Ordering::Relaxed);
    app.metrics.completion_tokens.fetch_add(ct as u64, Ordering::Relaxed);
    Ok(Json(json!({"id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": usage(pt, ct, cached)}))
    .into_response())
}

/// The events of every choice, interleaved as they arrive, tagged with the choice index.
fn merged(rxs: Vec<UnboundedReceiver<Event>>) -> impl Stream<Item = (usize, Event)> + Send {
    stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) }).map(move |ev| (i, ev)).boxed()
    }))
}

/// Server-sent events: one `data:` per chunk, then `data: [DONE]`. An engine error mid-stream
/// ends the stream with an error object, so no client hangs.
fn sse<S>(chunks: S) -> Response
where
    S: Stream<Item = Option<Result<Value, String>>> + Send + 'static,
{
    let events = chunks
        .filter_map(|c| async move { c })
        .map(|c| match c {
            Ok(v) => SseEvent::default().data(v.to_string()),
            Err(e) => SseEvent::default().data(json!({"error": {"message": e, "type": "internal_error"}}).to_string()),
        })
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// One choice's output, split into content and calls when tools are in play (see
/// `hearth_engine::tools`), as stream deltas; without tools all of it is content.
struct ToolOutput {
    plan: Option<Arc<ToolPlan>>,
    parser: CallParser,
    /// The content so far (`None` until there is some).
    content: Option<String>,
    calls: Vec<hearth_api::openai::ToolCall>,
}

impl ToolOutput {
    fn new(plan: Option<Arc<ToolPlan>>) -> ToolOutput {
        ToolOutput { plan, parser: CallParser::new(), content: None, calls: Vec::new() }
    }

    fn push(&mut self, text: &str) -> Vec<Value> {
        if self.plan.is_none() {
            return self.take(vec![Piece::Text(text.to_string())]);
        }
        let pieces = self.parser.push(text);
        self.take(pieces)
    }

    fn finish(&mut self) -> Vec<Value> {
        let pieces = self.parser.finish();
        self.take(pieces)
    }

    /// Deltas for new pieces. A call to a function the request did not offer, or one beyond
    /// the first when `parallel_tool_calls` is off, stays text. A turn that must call has no
    /// text: what its grammar allows between calls is a separator, and a call cut short by
    /// `max_tokens` is left out (the finish reason says `length`).
    fn take(&mut self, pieces: Vec<Piece>) -> Vec<Value> {
        let forced = self.plan.as_ref().is_some_and(|p| p.grammar.is_some());
        let mut deltas = Vec::new();
        for piece in pieces {
            if forced && matches!(piece, Piece::Text(_)) {
                continue;
            }
            let text = match piece {
                Piece::Call(c) => {
                    let plan = self.plan.as_ref();
                    let offered = plan.is_some_and(|p| p.tools.iter().any(|t| t.name == c.name));
                    let room = plan.is_some_and(|p| p.parallel) || self.calls.is_empty();
                    if offered && room {
                        // The id is made once: a stream's delta and a whole answer show the same.
                        let wire = structured::response_call(c);
                        let mut call = json!(wire);
                        call["index"] = json!(self.calls.len());
                        deltas.push(json!({"tool_calls": [call]}));
                        self.calls.push(wire);
                        continue;
                    }
                    hearth_engine::tools::render_call(&c.name, &c.arguments)
                }
                Piece::Text(t) => t,
            };
            if text.is_empty() {
                continue;
            }
            self.content.get_or_insert_with(String::new).push_str(&text);
            deltas.push(json!({"content": text}));
        }
        deltas
    }

    /// `tool_calls` once the model called and ended by itself; the engine's reason otherwise
    /// (`length` tells that the output, calls included, was cut short).
    fn finish_reason(&self, engine_reason: &'static str) -> &'static str {
        if self.calls.is_empty() || engine_reason == "length" {
            engine_reason
        } else {
            "tool_calls"
        }
    }
}
