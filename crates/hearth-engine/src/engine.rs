//! The `Engine` handle and its scheduler: one thread owns the model and every running
//! sequence, admits new requests between steps, and runs steps that mix decode rows with
//! prefill chunks up to a token budget, so a long prompt never stalls everyone's decoding.
//!
//! Requests arrive over a channel; each gets its own channel of events back. A request whose
//! receiver is dropped (the client went away) is freed at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::constraint::{Constraint, Grammar, Grammars};
use crate::error::{EngineError, Result};
use crate::lora::{LoraAdapter, LoraWeights};
use crate::model::{KvCache, KvDtype, LlamaConfig, LlamaModel, Logits, SeqInput};
use crate::plan::{plan, Cost, Progress, Row, Work};
use crate::sampling::{log_softmax, top_k, Sampled, Sampler, SamplingParams};
use crate::tokenizer::{DecodeStream, Tokenizer};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// What one step may process, in token-equivalents: a token at position `p` counts
    /// `1 + p / attention_span` (see `plan::Cost`), so steps take about as long at any
    /// context and a request arriving during a long prefill waits for at most one of them.
    pub max_step_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Bytes of KV cache all running sequences may hold together.
    pub kv_cache_bytes: usize,
    /// What the KV caches store keys and values as (see `KvDtype`); `None`: F32 for a model
    /// whose weights are all f32, F16 otherwise.
    pub kv_dtype: Option<KvDtype>,
    /// Requests that may wait for admission; beyond it new requests are refused.
    pub max_waiting: usize,
    /// Bytes of host memory all loaded LoRA adapters may take together.
    pub adapter_bytes: usize,
    /// Adapters kept prepared for compute (the deployment's `numPeftDeviceCached`), least
    /// recently used dropped first. A step only runs prepared adapters, so on a GPU, where
    /// the prepared form is a device copy, this also caps the distinct adapters of a step.
    /// On the CPU the prepared form shares the stored bytes (the kernel reads the layout
    /// adapters are loaded in): adapters that running sequences need stay hot beyond this
    /// number, costing no memory, and the set is trimmed back as they finish.
    pub max_hot_adapters: usize,
    /// The most distinct adapters one step runs: each adds its weights' worth of memory
    /// reads to the step.
    pub max_step_adapters: usize,
    /// How long the oldest waiting request may be passed over because its adapter does not
    /// fit in the step's adapter cap; after that nothing else is admitted until it fits, so
    /// no adapter starves.
    pub adapter_wait: std::time::Duration,
    /// The most tokens one sequence may hold, prompt and generation together (a
    /// deployment's `maxContextLength`); 0 for the model's own context, which it never
    /// exceeds.
    pub max_context: usize,
    /// Keep full KV blocks of prompts after their requests end and start later prompts with
    /// the same beginning from them (`crate::prefix`; host caches only). Their memory counts
    /// against `kv_cache_bytes`, and idle blocks give way to running sequences.
    pub prefix_cache: bool,
    /// Prompt-lookup speculation (`crate::speculate`): the longest n-gram of a sequence's
    /// recent tokens looked up in its context (a deployment's `ngramSpeculationLength`); 0
    /// turns it off.
    pub ngram_speculation: usize,
    /// The most tokens one speculation proposes (a deployment's `draftTokenCount`).
    pub draft_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            max_step_tokens: 256,
            max_running: 64,
            kv_cache_bytes: 1 << 30,
            kv_dtype: None,
            max_waiting: 1024,
            adapter_bytes: 1 << 30,
            max_hot_adapters: 32,
            max_step_adapters: 32,
            adapter_wait: std::time::Duration::from_secs(1),
            max_context: 0,
            prefix_cache: true,
            ngram_speculation: 0,
            draft_tokens: 4,
        }
    }
}

/// What the admin API reports per loaded adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AdapterInfo {
    /// Whether the adapter is prepared for compute (one of the `max_hot_adapters` most
    /// recently used), or only held in host memory.
    pub hot: bool,
    pub name: String,
    pub version: String,
    pub modules_patched: usize,
    pub ranks: Vec<usize>,
    pub target_modules: Vec<String>,
    pub bytes: usize,
    pub requests: u64,
    pub tokens: u64,
}

impl AdapterInfo {
    pub fn of(a: &LoraAdapter) -> AdapterInfo {
        AdapterInfo {
            hot: a.is_hot(),
            name: a.name.clone(),
            version: a.version.clone(),
            modules_patched: a.patched(),
            ranks: a.ranks.clone(),
            target_modules: a.target_modules.clone(),
            bytes: a.bytes,
            requests: a.requests.load(Ordering::Relaxed),
            tokens: a.tokens.load(Ordering::Relaxed),
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Report the logprob of every prompt token after the first (echo with logprobs).
    pub prompt_logprobs: bool,
    /// The LoRA adapter this request runs with. The request keeps this version to the end,
    /// even if the name is reloaded meanwhile.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// A grammar the output must follow (structured output, tool calls); compiled when the
    /// request is queued, so a bad one is refused before it waits.
    pub grammar: Option<Grammar>,
    /// Whose cached prefixes this request may use and feed (`prompt_cache_isolation_key`):
    /// requests share prefix-cache blocks only under the same key.
    pub cache_salt: Option<String>,
}

/// What a request receives, in order: optionally its prompt logprobs, then tokens, then one
/// `Finished` (or an `Error`).
#[derive(Debug, Clone)]
pub enum Event {
    PromptLogprobs(Vec<Sampled>),
    Token {
        sampled: Sampled,
        /// The text this token completes; may be empty while a multi-byte character or a
        /// possible stop string is still incomplete.
        text: String,
    },
    Finished {
        reason: FinishReason,
        /// Text held back until now (the tail that might have begun a stop string).
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
    },
    Error(String),
}

/// Upper bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A Prometheus-style histogram: cumulative counts per bucket, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Serving figures per adapter (the base model is labelled "base").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterMetrics {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
}

/// Gauges the server exports.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Per-adapter counters and latency histograms, by adapter name ("base" for none).
    pub per_adapter: std::sync::Mutex<std::collections::BTreeMap<String, AdapterMetrics>>,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    pub steps: AtomicUsize,
    pub generated_tokens: AtomicUsize,
    pub cancelled: AtomicUsize,
    /// Adapters whose prepared form was dropped to make room for another.
    pub adapter_evictions: AtomicUsize,
    /// The prefix cache's counters, and the bytes and blocks it holds.
    pub prefix: std::sync::Mutex<crate::prefix::PrefixStats>,
    pub prefix_bytes: AtomicUsize,
    pub prefix_blocks: AtomicUsize,
    /// Speculation: tokens proposed, and those of them the sequences' own sampling agreed with.
    pub drafted_tokens: AtomicUsize,
    pub accepted_tokens: AtomicUsize,
    /// The adapters of the running sequences, and of the waiting requests, by name (sorted,
    /// each once): what a router with adapter affinity reads.
    pub running_adapters: std::sync::Mutex<Vec<String>>,
    pub waiting_adapters: std::sync::Mutex<Vec<String>>,
}

struct Incoming {
    req: GenerateRequest,
    constraint: Option<Constraint>,
    events: mpsc::UnboundedSender<Event>,
    arrived: Instant,
}

/// A merge (or, with `None`, an unmerge) waiting for the running sequences to finish, and
/// where to answer once it is done.
type PendingMerge = (Option<Arc<LoraAdapter>>, std::sync::mpsc::Sender<Result<()>>);

/// What the handle sends the scheduler thread.
enum Message {
    Request(Box<Incoming>),
    /// Merge this adapter into the weights (replacing any merged one), or with `None` restore
    /// the base; answered once done.
    Merge {
        adapter: Option<Arc<LoraAdapter>>,
        done: std::sync::mpsc::Sender<Result<()>>,
    },
    /// Serve these weights from now on (a new version of the model); answered once done.
    Replace {
        model: Box<LlamaModel>,
        done: std::sync::mpsc::Sender<Result<()>>,
    },
}

/// The handle: cheap to clone; the scheduler stops when the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Message>,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    context_length: usize,
    vocab_size: usize,
    model_config: Arc<LlamaConfig>,
    gguf_layout: bool,
    /// Loaded adapters by name. Swapping an entry is atomic: requests hold their own `Arc`.
    adapters: Arc<std::sync::RwLock<std::collections::HashMap<String, Arc<LoraAdapter>>>>,
    /// The adapter merged into the weights, if any (set by the scheduler once merged).
    merged: Arc<std::sync::RwLock<Option<Arc<LoraAdapter>>>>,
    grammars: Arc<Grammars>,
    /// The version of the weights being served, as whoever loaded them named it (none: the
    /// weights the engine started with, unnamed).
    model_version: Arc<std::sync::RwLock<Option<String>>>,
    /// Serialises version replacements (each waits for the running sequences to finish).
    replacing: Arc<std::sync::Mutex<()>>,
}

impl Engine {
    pub fn start(model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig) -> Engine {
        Engine::start_with_draft(model, tokenizer, config, None)
    }

    /// Starts the engine with a draft model that proposes tokens for speculation (see
    /// `crate::speculate::DraftModel`), up to `config.draft_tokens` per step; where n-gram
    /// speculation is on too, a lookup that finds a draft is used first, as it costs nothing.
    pub fn start_with_draft(
        model: LlamaModel,
        tokenizer: Tokenizer,
        config: EngineConfig,
        draft: Option<crate::speculate::DraftModel>,
    ) -> Engine {
        let (tx, rx) = std::sync::mpsc::channel();
        let tokenizer = Arc::new(tokenizer);
        let stats = Arc::new(EngineStats::default());
        let model_context = model.config.max_position_embeddings;
        let context_length = if config.max_context > 0 { config.max_context.min(model_context) } else { model_context };
        let vocab_size = model.config.vocab_size;
        let model_config = Arc::new(model.config.clone());
        let gguf_layout = model.gguf_layout();
        let merged: Arc<std::sync::RwLock<Option<Arc<LoraAdapter>>>> = Default::default();
        let cost = Cost { attention_span: model.attention_span() };
        let kv_dtype = config.kv_dtype.unwrap_or_else(|| model.default_kv_dtype());
        let block_bytes = KvCache::bytes_for(
            crate::kernels::attention::PAGE,
            model.config.num_hidden_layers,
            model.config.num_key_value_heads,
            model.config.head_dim,
            kv_dtype,
        );
        let sched = Scheduler {
            cost,
            kv_dtype,
            prefix: crate::prefix::PrefixCache::new(block_bytes),
            context_length,
            merged: merged.clone(),
            merge_pending: None,
            replace_pending: None,
            unmerge: None,
            model,
            tokenizer: tokenizer.clone(),
            config: config.clone(),
            stats: stats.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            hot: VecDeque::new(),
            cursor: 0,
            drafter: draft,
        };
        // Without its threads the engine cannot run; its requests then fail with `Stopped`.
        if let Err(e) = crate::threads::spawn_scheduler(move || sched.run(rx)) {
            tracing::error!(error = %e, "the engine did not start");
        }
        Engine {
            tx,
            grammars: Arc::new(Grammars::new(tokenizer.clone(), vocab_size)),
            tokenizer,
            stats,
            config,
            context_length,
            vocab_size,
            model_config,
            gguf_layout,
            adapters: Default::default(),
            merged,
            model_version: Default::default(),
            replacing: Default::default(),
        }
    }

    /// The version of the weights being served (see [`Engine::replace_model`]).
    pub fn model_version(&self) -> Option<String> {
        self.model_version.read().ok().and_then(|v| v.clone())
    }

    /// Names the weights the engine started with (a replica started on a version).
    pub fn set_model_version(&self, version: Option<String>) {
        if let Ok(mut v) = self.model_version.write() {
            *v = version;
        }
    }

    /// Serves `model` (read with `tokenizer`) from now on, as `version`: a new version of the
    /// same model, swapped in without a restart. Sequences running finish on the weights they
    /// started with; requests arriving meanwhile wait (as for a merge) and then run on the new
    /// ones, so no request sees a mix and none fails. The new weights must have the same
    /// shape, tokenizer and checkpoint layout, which loaded LoRA adapters and the HTTP layer's
    /// tokenizer rely on; a version that differs is refused and the old one goes on serving.
    /// Blocking: returns once the new weights serve.
    pub fn replace_model(&self, model: LlamaModel, tokenizer: &Tokenizer, version: &str) -> Result<()> {
        let refuse = |why: String| Err(EngineError::InvalidModel(format!("version {version}: {why}")));
        if let Some(m) = self.merged_adapter() {
            return refuse(format!("adapter {} is merged into the weights; unmerge it before a new version", m.name));
        }
        if let Err(why) = self.tokenizer.same_as(tokenizer) {
            return refuse(format!("its tokenizer is not the one serving: {why}"));
        }
        if model.config.dims() != self.model_config.dims() {
            return refuse(format!(
                "its shape {:?} is not the one serving {:?}; a version replaces weights, not the architecture \
                 (deploy another model for that)",
                model.config.dims(),
                self.model_config.dims()
            ));
        }
        if model.gguf_layout() != self.gguf_layout {
            return refuse("its checkpoint format (GGUF or Hugging Face) is not the one serving".to_string());
        }
        let _one = self.replacing.lock().map_err(|_| EngineError::Internal("replacement lock poisoned".into()))?;
        let (done, wait) = std::sync::mpsc::channel();
        self.tx.send(Message::Replace { model: Box::new(model), done }).map_err(|_| EngineError::Stopped)?;
        wait.recv().map_err(|_| EngineError::Stopped)??;
        self.set_model_version(Some(version.to_string()));
        tracing::info!(version, "model version serving");
        Ok(())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Loads (or reloads) adapter `name` from a PEFT directory. A reload swaps atomically:
    /// requests already running finish on the version they started with. Blocking: it reads
    /// the files.
    pub fn load_adapter(
        &self,
        name: &str,
        dir: &std::path::Path,
        expected_version: Option<&str>,
    ) -> Result<AdapterInfo> {
        if let Some(m) = self.merged_adapter() {
            return Err(EngineError::InvalidRequest(format!(
                "adapter {} is merged into the weights; per-request adapters would apply on top of it. \
                 Unmerge it first",
                m.name
            )));
        }
        let adapter = self.read_adapter(name, dir, expected_version)?;
        let mut map = self.adapters.write().map_err(|_| EngineError::Internal("adapter registry poisoned".into()))?;
        let others: usize = map.iter().filter(|(n, _)| n.as_str() != name).map(|(_, a)| a.bytes).sum();
        if others + adapter.bytes > self.config.adapter_bytes {
            return Err(EngineError::Overloaded(format!(
                "adapter {name} needs {} bytes but only {} of the {}-byte adapter budget are free; unload one first",
                adapter.bytes,
                self.config.adapter_bytes.saturating_sub(others),
                self.config.adapter_bytes
            )));
        }
        let info = AdapterInfo::of(&adapter);
        map.insert(name.to_string(), Arc::new(adapter));
        tracing::info!(adapter = name, version = %info.version, modules = info.modules_patched, bytes = info.bytes, "adapter loaded");
        Ok(info)
    }

    fn read_adapter(&self, name: &str, dir: &std::path::Path, expected_version: Option<&str>) -> Result<LoraAdapter> {
        if name.is_empty() || name.len() > 256 {
            return Err(EngineError::InvalidRequest("an adapter name is 1 to 256 characters".into()));
        }
        let adapter =
            crate::lora::load_peft(name, dir, &self.model_config, self.gguf_layout, &candle_core::Device::Cpu)?;
        if let Some(v) = expected_version.filter(|v| !v.is_empty()) {
            if v != adapter.version {
                return Err(EngineError::InvalidRequest(format!(
                    "adapter {name}: its content hash is {} but {v} was expected",
                    adapter.version
                )));
            }
        }
        Ok(adapter)
    }

    /// Merges adapter `name` into the weights (merged mode: one adapter, no per-token LoRA
    /// work), replacing the one merged before, whose projections are restored exactly first.
    /// The swap waits for running sequences to finish and holds new ones until it is done,
    /// so every request runs on one version from start to end. Requests then name the
    /// adapter; the base alone is not served while it is merged. Blocking.
    pub fn merge_adapter(
        &self,
        name: &str,
        dir: &std::path::Path,
        expected_version: Option<&str>,
    ) -> Result<AdapterInfo> {
        if let Ok(map) = self.adapters.read() {
            if !map.is_empty() {
                return Err(EngineError::InvalidRequest(format!(
                    "{} per-request adapter(s) are loaded; unload them before merging one into the weights",
                    map.len()
                )));
            }
        }
        let adapter = Arc::new(self.read_adapter(name, dir, expected_version)?);
        let info = AdapterInfo::of(&adapter);
        self.send_merge(Some(adapter))?;
        tracing::info!(adapter = name, version = %info.version, modules = info.modules_patched, "adapter merged");
        Ok(info)
    }

    /// Restores the base weights. Blocking, like `merge_adapter`.
    pub fn unmerge_adapter(&self) -> Result<()> {
        if self.merged_adapter().is_none() {
            return Err(EngineError::NotFound("no adapter is merged".into()));
        }
        self.send_merge(None)
    }

    fn send_merge(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<()> {
        let (done, wait) = std::sync::mpsc::channel();
        self.tx.send(Message::Merge { adapter, done }).map_err(|_| EngineError::Stopped)?;
        wait.recv().map_err(|_| EngineError::Stopped)?
    }

    /// The adapter merged into the weights, if any.
    pub fn merged_adapter(&self) -> Option<Arc<LoraAdapter>> {
        self.merged.read().ok().and_then(|m| m.clone())
    }

    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        let mut map = self.adapters.write().map_err(|_| EngineError::Internal("adapter registry poisoned".into()))?;
        match map.remove(name) {
            Some(_) => Ok(()),
            None => Err(EngineError::NotFound(format!("adapter {name} is not loaded"))),
        }
    }

    pub fn adapter(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.adapters.read().ok().and_then(|m| m.get(name).cloned())
    }

    pub fn adapters(&self) -> Vec<AdapterInfo> {
        let mut v: Vec<AdapterInfo> =
            self.adapters.read().map(|m| m.values().map(|a| AdapterInfo::of(a)).collect()).unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Compiles a grammar as a request's would be, to refuse a bad one before anything runs.
    pub fn check_grammar(&self, grammar: &Grammar) -> Result<()> {
        self.grammars.compile(grammar).map(|_| ())
    }

    /// Queues a request. Refuses at once what can never run (empty or too long a prompt, bad
    /// parameters) and what does not fit in the queue.
    pub fn generate(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>> {
        req.params.validate()?;
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        // Checked here, not in the step: one bad request must never fail a whole batch.
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {t} is out of range: the vocabulary has {} tokens",
                self.vocab_size
            )));
        }
        if req.prompt.len() >= self.context_length {
            let whose = if self.context_length < self.model_config.max_position_embeddings {
                "this deployment serves at most"
            } else {
                "the model's context is"
            };
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; {whose} {} tokens, prompt and generation together",
                req.prompt.len(),
                self.context_length
            )));
        }
        if self.stats.waiting.load(Ordering::Relaxed) >= self.config.max_waiting {
            return Err(EngineError::Overloaded(format!(
                "the engine is full: {} requests are already waiting; retry later",
                self.config.max_waiting
            )));
        }
        self.enqueue(req)
    }

    fn enqueue(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>> {
        let constraint = req.grammar.as_ref().map(|g| self.grammars.compile(g)).transpose()?;
        let (events, rx) = mpsc::unbounded_channel();
        if let Some(a) = &req.adapter {
            a.requests.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Message::Request(Box::new(Incoming { req, constraint, events, arrived: Instant::now() })))
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }
}

struct Sequence {
    req: GenerateRequest,
    events: mpsc::UnboundedSender<Event>,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: Vec<u32>,
    /// The next token to feed (the last one sampled).
    pending: Option<u32>,
    /// What its next decode row feeds: the pending token, then this step's draft if any.
    feed: Vec<u32>,
    /// Its KV cache in the draft model, when the engine has one: the sequence's tokens up to
    /// some point (it catches up before it proposes).
    draft_cache: Option<KvCache>,
    sampler: Sampler,
    /// Turns generated tokens into text one at a time, at a cost that does not grow with the
    /// generation.
    detok: DecodeStream,
    /// Text decoded but not sent yet: a tail that might be the start of a stop string. Stop
    /// strings are looked for here only, as nothing sent can begin one.
    held: String,
    kv_reserved: usize,
    /// Steps in a row it was in prefill and got no chunk (see `plan::STARVED_STEPS`).
    passed_over: usize,
    prompt_logprobs: Vec<Sampled>,
    /// The grammar the output follows, if the request gave one.
    constraint: Option<Constraint>,
    /// Where its prefix-cache chain starts (adapter version, isolation key), how many prompt
    /// tokens came from the cache, and how many of its blocks the cache has been offered.
    prefix_root: u64,
    cached_tokens: usize,
    offered_blocks: usize,
    started: Instant,
    /// When the previous token was emitted, for per-token latency.
    last_token: Option<Instant>,
}

impl Sequence {
    fn label(&self) -> String {
        self.req.adapter.as_ref().map(|a| a.name.clone()).unwrap_or_else(|| "base".to_string())
    }
}

impl Sequence {
    fn in_prefill(&self) -> bool {
        self.prefilled < self.req.prompt.len()
    }

    fn progress(&self) -> Progress {
        Progress {
            prompt_len: self.req.prompt.len(),
            prefilled: self.prefilled,
            decoding: self.pending.is_some(),
            prompt_logprobs: self.req.prompt_logprobs,
            context: self.cache.len(),
            passed_over: self.passed_over,
            draft: self.feed.len().saturating_sub(1),
        }
    }
}

struct Scheduler {
    model: LlamaModel,
    /// The most tokens a sequence may hold: the model's context, or less (`max_context`).
    context_length: usize,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Incoming>,
    running: Vec<Sequence>,
    /// The hot adapters, least recently used first.
    hot: VecDeque<Arc<LoraAdapter>>,
    /// The merged adapter as the handle sees it; what to restore to unmerge it; and a merge
    /// waiting for the running sequences to finish (nothing is admitted meanwhile).
    merged: Arc<std::sync::RwLock<Option<Arc<LoraAdapter>>>>,
    unmerge: Option<crate::model::Unmerge>,
    merge_pending: Option<PendingMerge>,
    /// New weights waiting for the running sequences to finish (nothing is admitted meanwhile).
    replace_pending: Option<(Box<LlamaModel>, std::sync::mpsc::Sender<Result<()>>)>,
    /// Where the next step starts handing out its token budget, so that when the budget is
    /// smaller than the batch every sequence still gets its turn.
    cursor: usize,
    /// What a token costs a step on this model (see `plan::Cost`).
    cost: Cost,
    /// What the KV caches hold (the configured type, or the model's default).
    kv_dtype: KvDtype,
    prefix: crate::prefix::PrefixCache,
    drafter: Option<crate::speculate::DraftModel>,
}

impl Scheduler {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Message>) {
        let helpers = crate::threads::Helpers::start();
        loop {
            // Block only when there is nothing to do; otherwise take what arrived.
            let pending = self.merge_pending.is_some() || self.replace_pending.is_some();
            if self.running.is_empty() && self.waiting.is_empty() && !pending {
                match rx.recv() {
                    Ok(m) => self.receive(m),
                    Err(_) => return,
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.receive(m);
            }
            if self.merge_pending.is_some() && self.running.is_empty() {
                self.apply_merge();
            }
            if self.running.is_empty() {
                if let Some((model, done)) = self.replace_pending.take() {
                    // Keys and values of the old weights are not the new weights'.
                    self.prefix.clear();
                    self.model = *model;
                    self.cost = Cost { attention_span: self.model.attention_span() };
                    let _ = done.send(Ok(()));
                }
            }
            self.admit();
            if let Err(e) = self.step(&helpers) {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                for s in self.running.drain(..) {
                    let _ = s.events.send(Event::Error(e.to_string()));
                }
            }
            self.publish();
        }
    }

    fn receive(&mut self, m: Message) {
        match m {
            Message::Request(inc) => self.waiting.push_back(*inc),
            Message::Replace { model, done } => {
                if let Some((_, old)) = self.replace_pending.replace((model, done)) {
                    let _ = old.send(Err(EngineError::InvalidRequest("superseded by a newer version".into())));
                }
            }
            Message::Merge { adapter, done } => {
                // A newer merge request supersedes one still waiting.
                if let Some((_, old)) = self.merge_pending.replace((adapter, done)) {
                    let _ = old.send(Err(EngineError::InvalidRequest("superseded by a newer merge".into())));
                }
            }
        }
    }

    /// Swaps the merged adapter, with no sequence running: restores the base projections the
    /// previous merge replaced, then merges the new adapter (if any).
    fn apply_merge(&mut self) {
        let Some((adapter, done)) = self.merge_pending.take() else { return };
        // Keys and values computed under the old weights are not the new weights'.
        self.prefix.clear();
        if let Some(u) = self.unmerge.take() {
            self.model.unmerge(u);
        }
        if let Ok(mut m) = self.merged.write() {
            *m = None;
        }
        let result = match &adapter {
            None => Ok(()),
            Some(a) => a.prepare(self.model.device()).and_then(|w| self.model.merge(&w)).map(|u| {
                self.unmerge = Some(u);
                // The merged weights hold the adapter now; its prepared form is not needed.
                a.evict();
                if let Ok(mut m) = self.merged.write() {
                    *m = Some(a.clone());
                }
            }),
        };
        let _ = done.send(result);
    }

    fn kv_bytes(&self, tokens: usize) -> usize {
        let c = &self.model.config;
        KvCache::bytes_for(tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.kv_dtype)
    }

    /// Moves waiting requests into the running set, oldest first, while the KV budget allows
    /// (a request that does not fit stops admission: nobody is overtaken for memory) and while
    /// the running set uses at most `step_adapter_cap` distinct adapters. A request whose
    /// adapter does not fit the cap is passed over, but only for `adapter_wait`: then it
    /// stops admission until running sequences finish and make room, so its wait is bounded.
    fn admit(&mut self) {
        if self.merge_pending.is_some() || self.replace_pending.is_some() {
            return;
        }
        let cap = self.step_adapter_cap();
        let mut i = 0;
        while self.running.len() < self.config.max_running && i < self.waiting.len() {
            let w = &self.waiting[i];
            if w.events.is_closed() {
                self.waiting.remove(i);
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let tokens = (w.req.prompt.len() + w.req.max_tokens).min(self.context_length);
            // The cached blocks its prompt begins with (never all of it: the last prompt
            // token is computed, for the logits of the first new one; and none when the
            // request wants every prompt token's logprobs).
            let root =
                crate::prefix::root(w.req.adapter.as_ref().map(|a| a.version.as_str()), w.req.cache_salt.as_deref());
            let shared = if self.config.prefix_cache && !w.req.prompt_logprobs && self.model.device().is_cpu() {
                let max = (w.req.prompt.len() - 1) / crate::kernels::attention::PAGE;
                self.prefix.lookup(root, &w.req.prompt, max)
            } else {
                Vec::new()
            };
            let cached = shared.len() * crate::kernels::attention::PAGE;
            let need =
                self.kv_bytes(tokens - cached) + self.drafter.as_ref().map_or(0, |d| d.kv_bytes(tokens, self.kv_dtype));
            let used: usize = self.running.iter().map(|s| s.kv_reserved).sum();
            let bound = self.config.kv_cache_bytes;
            // Idle cached blocks give way to a request that needs their memory.
            let fits = self.prefix.evict_for(need, |cache| used + cache <= bound);
            if !fits && !self.running.is_empty() {
                break;
            }
            if let Some(a) = &w.req.adapter {
                let mut distinct: Vec<*const LoraAdapter> =
                    self.running.iter().filter_map(|s| s.req.adapter.as_ref().map(Arc::as_ptr)).collect();
                distinct.sort_unstable();
                distinct.dedup();
                if !distinct.contains(&Arc::as_ptr(a)) && distinct.len() >= cap {
                    if i == 0 && w.arrived.elapsed() >= self.config.adapter_wait {
                        break;
                    }
                    i += 1;
                    continue;
                }
            }
            let Some(inc) = self.waiting.remove(i) else { break };
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if let Some(a) = &inc.req.adapter {
                if let Err(e) = self.make_hot(a) {
                    let _ = inc.events.send(Event::Error(format!("preparing adapter {}: {e}", a.name)));
                    continue;
                }
            }
            let seed = inc.req.params.seed;
            let mut cache = self.model.new_cache(self.kv_dtype);
            let cached = if shared.is_empty() || cache.adopt(&shared).is_err() { 0 } else { cached };
            if self.config.prefix_cache && !inc.req.prompt_logprobs && cache.is_host() {
                self.prefix.record(cached);
            }
            self.running.push(Sequence {
                cache,
                prefilled: cached,
                prefix_root: root,
                cached_tokens: cached,
                offered_blocks: shared.len(),
                generated: Vec::new(),
                pending: None,
                feed: Vec::new(),
                draft_cache: self.drafter.as_ref().map(|d| d.model.new_cache(self.kv_dtype)),
                sampler: Sampler::new(seed),
                detok: self.tokenizer.decode_stream(true),
                held: String::new(),
                kv_reserved: need,
                passed_over: 0,
                prompt_logprobs: Vec::new(),
                started: Instant::now(),
                last_token: None,
                req: inc.req,
                constraint: inc.constraint,
                events: inc.events,
            });
        }
        // Sequences of the same adapter sit together, so a step's rows form one run per
        // adapter and each adapter's weights are read once per step.
        self.running.sort_by_key(|s| s.req.adapter.as_ref().map(|a| Arc::as_ptr(a) as usize).unwrap_or(0));
    }

    /// The most distinct adapters the running set may use: `max_step_adapters`, and on a GPU
    /// no more than can be hot at once (see `EngineConfig::max_hot_adapters`).
    fn step_adapter_cap(&self) -> usize {
        let cap = self.config.max_step_adapters;
        let cap = if self.model.device().is_cpu() { cap } else { cap.min(self.config.max_hot_adapters) };
        cap.max(1)
    }

    /// Makes `a` hot and most recently used, dropping the prepared form of the least recently
    /// used adapters no running sequence needs while more than `max_hot_adapters` would be hot.
    fn make_hot(&mut self, a: &Arc<LoraAdapter>) -> Result<()> {
        if let Some(p) = self.hot.iter().position(|h| Arc::ptr_eq(h, a)) {
            if let Some(h) = self.hot.remove(p) {
                self.hot.push_back(h);
            }
            a.prepare(self.model.device())?;
            return Ok(());
        }
        self.trim_hot(self.config.max_hot_adapters.max(1) - 1);
        a.prepare(self.model.device())?;
        self.hot.push_back(a.clone());
        Ok(())
    }

    /// Drops the prepared form of least recently used adapters that no running sequence
    /// needs while more than `keep` are hot.
    fn trim_hot(&mut self, keep: usize) {
        while self.hot.len() > keep {
            let running = &self.running;
            let idle = self
                .hot
                .iter()
                .position(|h| !running.iter().any(|s| s.req.adapter.as_ref().is_some_and(|r| Arc::ptr_eq(r, h))));
            match idle.and_then(|p| self.hot.remove(p)) {
                Some(old) => {
                    old.evict();
                    self.stats.adapter_evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        let names = |it: &mut dyn Iterator<Item = &GenerateRequest>| {
            let mut v: Vec<String> = it.filter_map(|r| r.adapter.as_ref().map(|a| a.name.clone())).collect();
            v.sort();
            v.dedup();
            v
        };
        let running = names(&mut self.running.iter().map(|s| &s.req));
        let waiting = names(&mut self.waiting.iter().map(|w| &w.req));
        if let Ok(mut r) = self.stats.running_adapters.lock() {
            *r = running;
        }
        if let Ok(mut w) = self.stats.waiting_adapters.lock() {
            *w = waiting;
        }
        self.stats.prefix_bytes.store(self.prefix.bytes(), Ordering::Relaxed);
        self.stats.prefix_blocks.store(self.prefix.blocks(), Ordering::Relaxed);
        if let Ok(mut p) = self.stats.prefix.lock() {
            *p = self.prefix.stats;
        }
        self.stats.kv_bytes.store(self.running.iter().map(|s| s.kv_reserved).sum(), Ordering::Relaxed);
    }

    /// One forward pass over what [`plan`] picks: every decoding sequence's pending token,
    /// then prefill chunks up to the token budget. A sequence whose own part fails (its
    /// adapter, its rows of the pass, its sampling or text) ends with an error event; the
    /// others go on.
    fn step(&mut self, helpers: &crate::threads::Helpers) -> Result<()> {
        // A client that went away frees its sequence now.
        let before = self.running.len();
        self.running.retain(|s| !s.events.is_closed());
        self.stats.cancelled.fetch_add(before - self.running.len(), Ordering::Relaxed);
        if self.running.is_empty() {
            return Ok(());
        }
        self.draft(helpers);
        let progress: Vec<Progress> = self.running.iter().map(Sequence::progress).collect();
        let planned = plan(&progress, self.config.max_step_tokens, self.cost, self.cursor);
        self.cursor = self.cursor.wrapping_add(1);
        for (i, s) in self.running.iter_mut().enumerate() {
            if s.in_prefill() {
                let served = planned.rows.iter().any(|r| r.seq == i);
                s.passed_over = if served { 0 } else { s.passed_over + 1 };
            }
        }
        if planned.is_empty() {
            return Ok(());
        }
        let mut failed: Vec<(usize, String)> = Vec::new();
        // Each row's adapter in its prepared form (admission made it hot).
        let mut rows = Vec::with_capacity(planned.rows.len());
        for row in planned.rows {
            let prepared = self.running[row.seq].req.adapter.as_ref().map(|a| a.prepare(self.model.device()));
            match prepared.transpose() {
                Ok(w) => rows.push((row, w)),
                Err(e) => failed.push((row.seq, format!("preparing its adapter failed: {e}"))),
            }
        }
        let results = self.forward_isolated(helpers, &rows);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        // The grammar masks of the rows that sample a token, side by side: each is a
        // sequence's own work, and serially they would hold the other thread idle.
        if self.running.iter().any(|s| s.constraint.is_some()) {
            use rayon::prelude::*;
            // Which constrained sequences sample a token this step.
            let mut masked = vec![false; self.running.len()];
            for (row, _) in &rows {
                let s = &self.running[row.seq];
                masked[row.seq] = s.constraint.is_some()
                    && match &row.work {
                        Work::Decode => true,
                        Work::Prefill(r) => r.end >= s.req.prompt.len(),
                    };
            }
            if masked.iter().any(|&m| m) {
                self.running
                    .par_iter_mut()
                    .zip(masked.par_iter())
                    .filter(|(_, &m)| m)
                    .for_each(|(s, _)| s.constraint.as_mut().map_or((), Constraint::prepare));
            }
        }

        let mut finished = Vec::new();
        for ((row, _), result) in rows.iter().zip(results) {
            let logits = match result {
                Ok(l) => l,
                Err(e) => {
                    failed.push((row.seq, e.to_string()));
                    continue;
                }
            };
            match self.take_logits(row, logits) {
                Ok(Some(reason)) => finished.push((row.seq, Ok(reason))),
                Ok(None) => {}
                Err(e) => failed.push((row.seq, e.to_string())),
            }
        }
        // Prompt blocks just completed are offered at once: requests arriving while this one
        // still runs can start from them.
        let used: usize = self.running.iter().map(|r| r.kv_reserved).sum();
        for (row, _) in &rows {
            if let (Work::Prefill(_), Some(s)) = (&row.work, self.running.get_mut(row.seq)) {
                let prompt = s.req.prompt[..s.prefilled.min(s.req.prompt.len())].to_vec();
                offer(&mut self.prefix, &self.config, used, s, &prompt);
            }
        }
        finished.extend(failed.into_iter().map(|(i, e)| (i, Err(e))));
        // Remove ended sequences, highest index first so indices stay valid, and trim the
        // hot set to its bound before telling anyone they are done: a client that has seen
        // every request finish also sees the adapters those requests kept hot let go.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        finished.dedup_by_key(|f| f.0);
        let done: Vec<(Sequence, std::result::Result<FinishReason, String>)> =
            finished.into_iter().map(|(i, r)| (self.running.swap_remove(i), r)).collect();
        if self.hot.len() > self.config.max_hot_adapters {
            self.trim_hot(self.config.max_hot_adapters.max(1));
        }
        for (s, ending) in done {
            self.finish(s, ending);
        }
        Ok(())
    }

    /// Runs the rows as one forward pass; should that fail, each row alone, so that a failure
    /// belonging to one sequence stays that sequence's. Caches are rolled back after a failed
    /// pass (a pass commits them only at its end, but the rollback does not rely on it).
    fn forward_isolated(
        &mut self,
        helpers: &crate::threads::Helpers,
        rows: &[(Row, Option<Arc<LoraWeights>>)],
    ) -> Vec<Result<Option<candle_core::Tensor>>> {
        let lens: Vec<usize> = rows.iter().map(|(r, _)| self.running[r.seq].cache.len()).collect();
        match self.forward(helpers, rows) {
            Ok(out) => return out.into_iter().map(Ok).collect(),
            Err(e) if rows.len() == 1 => return vec![Err(e)],
            Err(e) => tracing::warn!(error = %e, rows = rows.len(), "a step failed; running its sequences one by one"),
        }
        for ((r, _), len) in rows.iter().zip(&lens) {
            self.running[r.seq].cache.truncate(*len);
        }
        let mut out = Vec::with_capacity(rows.len());
        for (one, len) in rows.iter().zip(lens) {
            let result = self.forward(helpers, std::slice::from_ref(one)).map(|mut v| v.pop().flatten());
            if result.is_err() {
                self.running[one.0.seq].cache.truncate(len);
            }
            out.push(result);
        }
        out
    }

    /// One forward pass over `rows` (in sequence order).
    fn forward(
        &mut self,
        helpers: &crate::threads::Helpers,
        rows: &[(Row, Option<Arc<LoraWeights>>)],
    ) -> Result<Vec<Option<candle_core::Tensor>>> {
        let model = &self.model;
        let mut inputs = Vec::with_capacity(rows.len());
        let mut next = rows.iter().peekable();
        for (i, s) in self.running.iter_mut().enumerate() {
            let Some((row, weights)) = next.peek() else { break };
            if row.seq != i {
                continue;
            }
            let tokens = match &row.work {
                Work::Decode => s.feed.as_slice(),
                Work::Prefill(range) => s.req.prompt.get(range.clone()).unwrap_or(&[]),
            };
            inputs.push(SeqInput { tokens, cache: &mut s.cache, logits: row.logits, adapter: weights.as_deref() });
            next.next();
        }
        helpers.busy(|| model.forward(&mut inputs))
    }

    /// Takes one row's logits: prompt logprobs, then the next token. Returns whether the
    /// sequence finished.
    fn take_logits(&mut self, row: &Row, logits: Option<candle_core::Tensor>) -> Result<Option<FinishReason>> {
        let s = &mut self.running[row.seq];
        if let Work::Prefill(range) = &row.work {
            s.prefilled = range.end;
        }
        let Some(logits) = logits else { return Ok(None) };
        let rows: Vec<Vec<f32>> = logits.to_vec2::<f32>()?;
        if let (true, Work::Prefill(range)) = (s.req.prompt_logprobs, &row.work) {
            // Row j predicts prompt token range.start + j + 1.
            let k = s.req.params.logprobs.unwrap_or(0);
            for (j, r) in rows.iter().enumerate() {
                if let Some(&tok) = s.req.prompt.get(range.start + j + 1) {
                    let lp = log_softmax(r);
                    s.prompt_logprobs.push(Sampled { token: tok, logprob: Some(lp[tok as usize]), top: top_k(&lp, k) });
                }
            }
            if s.in_prefill() {
                return Ok(None);
            }
            let _ = s.events.send(Event::PromptLogprobs(std::mem::take(&mut s.prompt_logprobs)));
        }
        let drafted = match row.work {
            Work::Decode => s.feed.len().saturating_sub(1),
            Work::Prefill(_) => 0,
        };
        if drafted > 0 {
            return self.check_draft(row.seq, &rows);
        }
        match rows.last() {
            Some(last) => self.advance(row.seq, last),
            None => Ok(None),
        }
    }

    /// Gives each decoding sequence this step's feed: its pending token, and a draft when
    /// speculation is on and the sequence may take one (`crate::speculate`): an n-gram
    /// lookup's, else the draft model's.
    fn draft(&mut self, helpers: &crate::threads::Helpers) {
        let (ngram, most) = (self.config.ngram_speculation, self.config.draft_tokens);
        let ctx = self.context_length;
        let modelled = self.drafter.is_some();
        // Sequences the draft model proposes for this step, with the most tokens each may take.
        let mut wanted: Vec<(usize, usize)> = Vec::new();
        for (i, s) in self.running.iter_mut().enumerate() {
            s.feed.clear();
            let Some(pending) = s.pending else { continue };
            s.feed.push(pending);
            // Not for constrained output (its grammar advances token by token) nor past what
            // the sequence may still generate: its KV reservation covers no more.
            if (ngram == 0 && !modelled) || s.constraint.is_some() {
                continue;
            }
            let held = s.req.prompt.len() + s.generated.len();
            let room = (s.req.max_tokens.saturating_sub(s.generated.len()))
                .saturating_sub(1)
                .min(ctx.saturating_sub(held + 1))
                .min(most);
            if room == 0 {
                continue;
            }
            if let Some(c) = s.draft_cache.as_mut() {
                // Positions past the sequence's tokens hold a draft no pass has verified
                // (verification trims them; this covers a step that did not verify).
                c.truncate(c.len().min(held));
            }
            if ngram > 0 {
                let mut context = Vec::with_capacity(held);
                context.extend_from_slice(&s.req.prompt);
                context.extend_from_slice(&s.generated);
                s.feed.extend(crate::speculate::propose(&context, ngram, room));
            }
            if s.feed.len() == 1 && s.draft_cache.is_some() {
                wanted.push((i, room));
            }
        }
        if !wanted.is_empty() {
            if let Err(e) = self.model_draft(helpers, &wanted) {
                // A draft is only a guess: without one the step decodes as usual. The draft
                // caches start over, as a failed pass may have left them anywhere.
                tracing::warn!(error = %e, "the draft model failed; decoding without a draft this step");
                for &(i, _) in &wanted {
                    let s = &mut self.running[i];
                    s.feed.truncate(1);
                    if let (Some(c), Some(d)) = (s.draft_cache.as_mut(), self.drafter.as_ref()) {
                        *c = d.model.new_cache(self.kv_dtype);
                    }
                }
            }
        }
    }

    /// The draft model's proposals for `wanted` (sequence, most tokens): first each draft
    /// cache catches up with its sequence's tokens through the pending one (all of them
    /// within one step's token budget, so a long prompt catches up over several steps and
    /// drafts only then), then it feeds its own most likely token back, one batched pass per
    /// drafted position.
    fn model_draft(&mut self, helpers: &crate::threads::Helpers, wanted: &[(usize, usize)]) -> Result<()> {
        if self.drafter.is_none() {
            return Ok(());
        }
        let mut budget = self.config.max_step_tokens.max(1);
        // (sequence, catch-up tokens, most tokens it drafts: 0 while it is still catching up).
        let mut catch_up: Vec<(usize, Vec<u32>, usize)> = Vec::new();
        for &(i, room) in wanted {
            let s = &self.running[i];
            let Some(cache) = s.draft_cache.as_ref() else { continue };
            let held = s.req.prompt.len() + s.generated.len();
            let from = cache.len().min(held);
            let take = (held - from).min(budget);
            if take == 0 {
                continue;
            }
            budget -= take;
            let tokens: Vec<u32> = s.req.prompt.iter().chain(&s.generated).skip(from).take(take).copied().collect();
            let proposes = from + take == held;
            catch_up.push((i, tokens, if proposes { room } else { 0 }));
            if budget == 0 {
                break;
            }
        }
        // Positions whose logits propose a token: (sequence, most tokens).
        let mut active: Vec<(usize, usize)> = catch_up.iter().filter(|c| c.2 > 0).map(|c| (c.0, c.2)).collect();
        let fed: Vec<(usize, &[u32], Logits)> = catch_up
            .iter()
            .map(|(i, tokens, room)| (*i, tokens.as_slice(), if *room > 0 { Logits::Last } else { Logits::None }))
            .collect();
        self.draft_pass(helpers, &fed)?;
        // Then one token at a time while any sequence wants more.
        loop {
            active.retain(|&(i, room)| self.running[i].feed.len() - 1 < room);
            if active.is_empty() {
                return Ok(());
            }
            let last: Vec<u32> = active.iter().map(|&(i, _)| *self.running[i].feed.last().unwrap_or(&0)).collect();
            let fed: Vec<(usize, &[u32], Logits)> =
                active.iter().zip(&last).map(|(&(i, _), t)| (i, std::slice::from_ref(t), Logits::Last)).collect();
            self.draft_pass(helpers, &fed)?;
        }
    }

    /// One batched pass of the draft model: each `(sequence, tokens, logits)` in sequence
    /// order feeds its tokens to the sequence's draft cache, and a row that asks for
    /// `Logits::Last` gets the draft's most likely next token appended to its feed.
    fn draft_pass(&mut self, helpers: &crate::threads::Helpers, fed: &[(usize, &[u32], Logits)]) -> Result<()> {
        let Some(drafter) = self.drafter.as_ref() else { return Ok(()) };
        let mut inputs = Vec::with_capacity(fed.len());
        let mut k = 0;
        for (i, s) in self.running.iter_mut().enumerate() {
            let Some(&(j, tokens, logits)) = fed.get(k) else { break };
            if j != i {
                continue;
            }
            let cache = s.draft_cache.as_mut().ok_or_else(|| EngineError::Internal("no draft cache".into()))?;
            inputs.push(SeqInput { tokens, cache, logits, adapter: None });
            k += 1;
        }
        let out = helpers.busy(|| drafter.model.forward(&mut inputs))?;
        drop(inputs);
        for (&(i, _, _), logits) in fed.iter().zip(out) {
            if let Some(logits) = logits {
                let token = crate::speculate::greedy(&logits, drafter.vocab)?;
                self.running[i].feed.push(token);
            }
        }
        Ok(())
    }

    /// Emits a decode row's tokens while the sequence's own sampling agrees with its draft:
    /// row j's distribution is sampled as always; the sample goes on to row j + 1 only if it
    /// is the drafted token there. The cache keeps the positions that were fed what the
    /// sequence emitted, and the draft model's cache the positions it was fed what the
    /// sequence now holds. Returns whether the sequence finished.
    fn check_draft(&mut self, i: usize, rows: &[Vec<f32>]) -> Result<Option<FinishReason>> {
        let draft: Vec<u32> = self.running[i].feed[1..].to_vec();
        let start = self.running[i].cache.len().saturating_sub(draft.len() + 1);
        let held = self.running[i].req.prompt.len() + self.running[i].generated.len();
        let (mut emitted, mut agreed) = (0, 0);
        let mut outcome = Ok(None);
        for (j, logits) in rows.iter().enumerate().take(draft.len() + 1) {
            outcome = self.advance(i, logits);
            emitted += 1;
            let matched = draft.get(j).is_some_and(|d| self.running[i].generated.last() == Some(d));
            agreed += matched as usize;
            if !matches!(outcome, Ok(None)) || !matched {
                break;
            }
        }
        let s = &mut self.running[i];
        s.cache.truncate(start + emitted);
        if let Some(c) = s.draft_cache.as_mut() {
            // It was fed the tokens through the pending one, then the draft but its last.
            c.truncate(c.len().min(held + agreed));
        }
        self.stats.drafted_tokens.fetch_add(draft.len(), Ordering::Relaxed);
        self.stats.accepted_tokens.fetch_add(agreed, Ordering::Relaxed);
        outcome
    }

    /// Sends a sequence's one terminal event: `Finished` with the text it still held, or
    /// `Error`.
    fn finish(&mut self, mut s: Sequence, ending: std::result::Result<FinishReason, String>) {
        // What it computed stays for later prompts that begin the same way: its prompt and
        // its answer (a conversation's next turn starts with both).
        if ending.is_ok() {
            let held = s.cache.len();
            let mut tokens = s.req.prompt.clone();
            tokens.extend_from_slice(&s.generated[..held.saturating_sub(tokens.len()).min(s.generated.len())]);
            let used: usize = self.running.iter().map(|r| r.kv_reserved).sum();
            offer(&mut self.prefix, &self.config, used, &mut s, &tokens);
        }
        let event =
            match ending.and_then(|reason| self.tail_text(&mut s).map(|t| (reason, t)).map_err(|e| e.to_string())) {
                Ok((reason, text)) => {
                    tracing::debug!(
                        prompt = s.req.prompt.len(),
                        generated = s.generated.len(),
                        elapsed_ms = s.started.elapsed().as_millis() as u64,
                        "sequence finished"
                    );
                    Event::Finished {
                        reason,
                        text,
                        prompt_tokens: s.req.prompt.len(),
                        completion_tokens: s.generated.len(),
                        cached_tokens: s.cached_tokens,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a sequence failed; the rest of its batch goes on");
                    Event::Error(e)
                }
            };
        let _ = s.events.send(event);
    }

    /// Samples the next token of sequence `i`, emits it, and says whether it finished.
    fn advance(&mut self, i: usize, logits: &[f32]) -> Result<Option<FinishReason>> {
        let ctx = self.context_length;
        let s = &mut self.running[i];
        let sampled = match &mut s.constraint {
            None => s.sampler.sample(logits, &s.req.prompt, &s.generated, &s.req.params),
            Some(c) => {
                let mut masked = logits.to_vec();
                c.mask(&mut masked)?;
                let sampled = s.sampler.sample(&masked, &s.req.prompt, &s.generated, &s.req.params);
                c.commit(sampled.token)?;
                sampled
            }
        };
        let tok = sampled.token;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(a) = &s.req.adapter {
            a.tokens.fetch_add(1, Ordering::Relaxed);
        }
        let now = Instant::now();
        if let Ok(mut m) = self.stats.per_adapter.lock() {
            let e = m.entry(s.label()).or_default();
            e.generated_tokens += 1;
            match s.last_token {
                None => {
                    e.requests += 1;
                    e.prompt_tokens += s.req.prompt.len() as u64;
                    e.time_to_first_token.observe(now.duration_since(s.started).as_secs_f64());
                }
                Some(prev) => e.time_per_output_token.observe(now.duration_since(prev).as_secs_f64()),
            }
        }
        s.last_token = Some(now);
        s.generated.push(tok);
        if !s.req.ignore_eos && self.tokenizer.is_eos(tok) {
            return Ok(Some(FinishReason::Stop));
        }
        s.pending = Some(tok);
        if let Some(piece) = s.detok.step(&self.tokenizer, tok)? {
            s.held.push_str(&piece);
        }
        // A stop string ends the text where it begins; it is not part of the output.
        if let Some(pos) = find_stop(&s.held, &s.req.stop) {
            let text = s.held[..pos].to_string();
            s.held.clear();
            let _ = s.events.send(Event::Token { sampled, text });
            return Ok(Some(FinishReason::Stop));
        }
        let safe = safe_prefix(&s.held, &s.req.stop);
        let text: String = s.held.drain(..safe).collect();
        if s.events.send(Event::Token { sampled, text }).is_err() {
            // The client went away; the next step frees the sequence and counts it.
            return Ok(None);
        }
        if s.constraint.as_ref().is_some_and(Constraint::finished) {
            return Ok(Some(FinishReason::Stop));
        }
        if s.generated.len() >= s.req.max_tokens || s.req.prompt.len() + s.generated.len() >= ctx {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// The text not sent yet when a sequence ends: what it held back, and what the detokenizer
    /// still had, up to a stop string should the two together complete one.
    fn tail_text(&self, s: &mut Sequence) -> Result<String> {
        if let Some(rest) = s.detok.flush(&self.tokenizer)? {
            s.held.push_str(&rest);
        }
        let end = find_stop(&s.held, &s.req.stop).unwrap_or(s.held.len());
        Ok(s.held[..end].to_string())
    }
}

/// Offers the prefix cache the full blocks of `s`'s cache holding `tokens`, within the memory
/// bound beside `used` bytes reserved by running sequences (idle cached blocks give way;
/// running sequences never do).
fn offer(
    prefix: &mut crate::prefix::PrefixCache,
    config: &EngineConfig,
    used: usize,
    s: &mut Sequence,
    tokens: &[u32],
) {
    if !config.prefix_cache || !s.cache.is_host() {
        return;
    }
    let bound = config.kv_cache_bytes;
    s.offered_blocks = prefix.insert(s.prefix_root, tokens, &s.cache, s.offered_blocks, |cache| used + cache <= bound);
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// How much of `text` can be emitted: everything except an incomplete character at the end
/// and a tail that might be the start of a stop string.
fn safe_prefix(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for stop in stops {
        for k in (1..stop.len()).rev() {
            if !stop.is_char_boundary(k) {
                continue;
            }
            if text[..end].ends_with(&stop[..k]) {
                end = end.min(text[..end].len() - k);
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_engine() -> Engine {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama/model.gguf");
        let loaded = crate::load(&path, crate::Precision::Native, &candle_core::Device::Cpu).expect("tiny model");
        Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default())
    }

    fn request(prompt: Vec<u32>) -> GenerateRequest {
        GenerateRequest {
            prompt,
            max_tokens: 200,
            params: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: Vec::new(),
            ignore_eos: true,
            prompt_logprobs: false,
            adapter: None,
            grammar: None,
            cache_salt: None,
        }
    }

    /// Every event of a request until its channel closes: its tokens, and its terminal events.
    async fn drain(mut rx: mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Vec<Event>) {
        let (mut tokens, mut terminal) = (Vec::new(), Vec::new());
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { sampled, .. } => tokens.push(sampled.token),
                e @ (Event::Finished { .. } | Event::Error(_)) => terminal.push(e),
                Event::PromptLogprobs(_) => {}
            }
        }
        (tokens, terminal)
    }

    /// A request whose prompt holds a token the model has no embedding for is refused at
    /// `generate`; pushed past that check (an injected failure), it makes the batched forward
    /// pass fail. It must end alone, with an error, while the requests batched with it finish
    /// exactly as they do alone; and every request gets exactly one terminal event.
    #[tokio::test]
    async fn one_sequences_failure_ends_that_sequence_and_never_the_batch() {
        let engine = tiny_engine();
        let good: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![9, 10, 11, 12], vec![20, 21]];
        let mut alone = Vec::new();
        for p in &good {
            alone.push(drain(engine.generate(request(p.clone())).expect("queued")).await.0);
        }
        // The good requests are decoding (each has sent a token and has 200 to go) when the
        // bad one arrives, so it joins their batch.
        let mut rxs: Vec<_> = good.iter().map(|p| engine.generate(request(p.clone())).expect("queued")).collect();
        let mut first = Vec::new();
        for rx in &mut rxs {
            match rx.recv().await {
                Some(Event::Token { sampled, .. }) => first.push(sampled.token),
                other => panic!("expected a first token, got {other:?}"),
            }
        }
        let (bad_tokens, bad_end) = drain(engine.enqueue(request(vec![5, 6, 100_000])).expect("queued")).await;
        assert!(bad_tokens.is_empty());
        assert!(
            matches!(bad_end.as_slice(), [Event::Error(m)] if m.contains("out of range")),
            "exactly one error event: {bad_end:?}"
        );
        for ((rx, want), first) in rxs.into_iter().zip(alone).zip(first) {
            let (rest, end) = drain(rx).await;
            assert!(rest.len() > 100, "still decoding when the failure came: {} tokens left", rest.len());
            let tokens: Vec<u32> = std::iter::once(first).chain(rest).collect();
            assert_eq!(tokens, want, "a request batched with the failure answers as it does alone");
            assert!(matches!(end.as_slice(), [Event::Finished { .. }]), "exactly one terminal event: {end:?}");
        }
    }

    /// The text a request gets, token pieces and the final tail together.
    async fn text_of(engine: &Engine, req: GenerateRequest) -> (String, FinishReason) {
        let mut rx = engine.generate(req).expect("queued");
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { text: t, .. } => text.push_str(&t),
                Event::Finished { text: t, reason, .. } => {
                    text.push_str(&t);
                    return (text, reason);
                }
                Event::Error(e) => panic!("{e}"),
                Event::PromptLogprobs(_) => {}
            }
        }
        panic!("no terminal event")
    }

    /// Streaming detokenization gives the text decoding the whole generation gives, and a
    /// stop string, wherever it falls across token boundaries, ends it exactly where the stop
    /// string begins.
    #[tokio::test]
    async fn streamed_text_and_stop_strings_match_the_whole_decoded_text() {
        let engine = tiny_engine();
        let req = GenerateRequest { max_tokens: 60, ..request(vec![5, 6, 7]) };
        let (full, _) = text_of(&engine, req.clone()).await;
        let mut ids = Vec::new();
        let mut rx = engine.generate(req.clone()).expect("queued");
        while let Some(ev) = rx.recv().await {
            if let Event::Token { sampled, .. } = ev {
                ids.push(sampled.token);
            }
        }
        assert_eq!(full, engine.tokenizer().decode(&ids, true).expect("decode"));
        let starts: Vec<usize> = (1..full.len().saturating_sub(6)).filter(|&k| full.is_char_boundary(k)).collect();
        assert!(starts.len() > 20, "the generation is long enough to cut: {full:?}");
        for &k in starts.iter().step_by(7) {
            let end = (k + 4..full.len()).find(|&e| full.is_char_boundary(e)).expect("a boundary");
            let stop = full[k..end].to_string();
            let cut = full.find(&stop).expect("present");
            let (got, reason) = text_of(&engine, GenerateRequest { stop: vec![stop.clone()], ..req.clone() }).await;
            assert_eq!((got.as_str(), reason), (&full[..cut], FinishReason::Stop), "stop {stop:?}");
        }
    }

    #[test]
    fn stop_strings_are_found_across_token_boundaries_and_held_back() {
        let stops = vec!["\n\nUser:".to_string()];
        assert_eq!(safe_prefix("Hello\n\nUs", &stops), 5);
        assert_eq!(safe_prefix("Hello there", &stops), 11);
        assert_eq!(find_stop("Hello\n\nUser: hi", &stops), Some(5));
        assert_eq!(find_stop("Hello", &stops), None);
        assert_eq!(safe_prefix("caf\u{FFFD}", &[]), 3);
    }
}
