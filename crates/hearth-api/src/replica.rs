//! The protocol between a gateway and its engine replicas, besides the OpenAI inference API:
//! health, load figures, and the LoRA admin calls (load, unload, merge, unmerge, list). The
//! engine server answers with these types and the gateway's replica client sends and reads
//! them, so the two cannot drift apart. Errors travel as the OpenAI error body
//! ([`crate::openai::ErrorBody`]) with an HTTP status.
//!
//! A replica started by a gateway accepts only that gateway: it is given a token at start (in
//! the environment variable [`TOKEN_ENV`], never on its command line, which any local user can
//! read), and every route but [`paths::HEALTH`] requires `Authorization: Bearer <token>`.

use serde::{Deserialize, Serialize};

/// The environment variable that carries a replica's token.
pub const TOKEN_ENV: &str = "HEARTH_ENGINE_TOKEN";

/// The environment variable that carries the replicas' key to a replica that derives its own
/// token from the endpoint it is given (a pod, whose address is known only once it runs).
pub const TOKEN_KEY_ENV: &str = "HEARTH_ENGINE_TOKEN_KEY";

/// The routes, relative to a replica's base URL.
pub mod paths {
    pub const HEALTH: &str = "/health";
    pub const LOAD_FIGURES: &str = "/v1/load";
    pub const ADAPTERS: &str = "/v1/lora_adapters";
    pub const LOAD_ADAPTER: &str = "/v1/load_lora_adapter";
    pub const UNLOAD_ADAPTER: &str = "/v1/unload_lora_adapter";
    pub const MERGE_ADAPTER: &str = "/v1/merge_lora_adapter";
    pub const UNMERGE_ADAPTER: &str = "/v1/unmerge_lora_adapter";
    pub const LOAD_MODEL_VERSION: &str = "/v1/load_model_version";
}

/// A model's files as a replica fetches them itself, where it cannot read the gateway's
/// artifact store (a pod on another node). The gateway answers a signed `GET
/// /replica-files/{account}/{model}` with this manifest; each file has its own signed download
/// URL and its SHA-256, which the replica checks before it loads anything. Engine flags and
/// requests that take a model's files (`--model`, `--draft-model`, `lora_path`, `model_path`)
/// take such a manifest URL too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileManifest {
    /// `accounts/{a}/models/{m}`.
    pub model: String,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    /// 64 lowercase hexadecimal digits.
    pub sha256: String,
    pub url: String,
}

/// `GET /health`: 200 once the model is loaded and the replica serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// "ok".
    pub status: String,
}

/// `GET /v1/load`: what the replica has on its hands, for autoscaling and routing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoadFigures {
    /// Sequences in the running batch.
    pub running: u64,
    /// Requests queued for admission.
    pub waiting: u64,
    /// Sequences it decodes together at most.
    pub max_running: u64,
    /// KV cache bytes the running sequences hold, and the bound on them.
    pub kv_cache_used_bytes: u64,
    pub kv_cache_capacity_bytes: u64,
    /// Tokens speculation proposed since the replica started, and those accepted.
    #[serde(default)]
    pub spec_drafted_tokens: u64,
    #[serde(default)]
    pub spec_accepted_tokens: u64,
    /// The version of the model's weights it serves (a deployment's hot load), if it was given
    /// one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

/// `POST /v1/load_model_version`: serve the weights at `model_path` (a directory or GGUF file
/// the replica can read) as `version`, in place of the current ones. Answered once they serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadModelVersionRequest {
    pub model_path: String,
    pub version: String,
}

/// The answer to a version load: the version now serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub version: String,
}

/// `POST /v1/load_lora_adapter` and `/v1/merge_lora_adapter`: a PEFT directory the replica
/// can read, under the name requests will use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
    /// Refuse the load unless the files' content hash is this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<String>,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

/// One loaded adapter, as load, merge and list report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub name: String,
    /// A content hash of the adapter's files.
    pub version: String,
    /// Prepared for compute (one of the replica's hot adapters), not only held in memory.
    pub hot: bool,
    pub modules_patched: u64,
    pub ranks: Vec<u64>,
    pub target_modules: Vec<String>,
    pub bytes: u64,
    pub requests: u64,
    pub tokens: u64,
}

/// `GET /v1/lora_adapters`: the per-request adapters, and the one merged into the weights.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AdapterList {
    pub adapters: Vec<AdapterInfo>,
    pub merged: Option<AdapterInfo>,
}

/// The answer to an unload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unloaded {
    pub unloaded: String,
}

/// The answer to an unmerge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmerged {
    pub unmerged: bool,
}
