//! Where replicas run. The `Runtime` trait is what the reconciler needs from any backend:
//! start a replica from a spec, stop one, and say which replicas exist and how they are. The
//! local backend runs `hearth engine` child processes; a Kubernetes backend would run pods.
//!
//! A runtime is observed, never trusted to remember: the reconciler asks `replicas()` on
//! every reconcile and acts on the difference from what the store wants. `replicas()`
//! answers from what the backend already knows (the local runtime probes its replicas in the
//! background), so it never waits on a replica.

use async_trait::async_trait;
use hearth_api::replica::LoadFigures;

use crate::error::Result;

pub use hearth_control::deployments::REPLICA_BATCH_SIZE;

/// Everything a replica needs to start. Two specs that are equal run interchangeable
/// replicas; a changed spec means replicas must be replaced (a rolling update).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaSpec {
    /// `accounts/{a}/deployments/{d}`: the deployment this replica serves.
    pub deployment: String,
    /// `accounts/{a}/models/{m}`: the base model, as the engine announces it.
    pub model: String,
    /// `FP32`, `BF16`, `FP16`, or empty for the checkpoint's own precision.
    pub precision: String,
    /// The most tokens (prompt plus generation) one request may take; 0 for the model's own.
    pub max_context_length: u32,
    /// LoRA adapters kept hot on the replica (`numPeftDeviceCached`); 0 for the engine's default.
    pub max_hot_adapters: u32,
    /// The model's `conversationConfig.template`: the chat template that replaces the
    /// checkpoint's.
    pub chat_template: Option<String>,
    /// The model's `conversationConfig.system`: the system message of a conversation without one.
    pub system_prompt: Option<String>,
    /// Prompt-lookup speculation (`ngramSpeculationLength`; 0: off) and the most tokens it
    /// drafts (`draftTokenCount`; 0: the engine's default).
    pub ngram_speculation: u32,
    pub draft_tokens: u32,
    /// `accounts/{a}/models/{m}`: the draft model whose proposals the replica verifies
    /// (`draftModel`), loaded beside the base model.
    pub draft_model: Option<String>,
    /// The hot-loaded version to start on, and its files, in place of the base model's files
    /// (a deployment's `activeModelVersion`). Not part of the fingerprint: replicas change
    /// version in place, so replicas on different versions are still interchangeable.
    pub model_version: Option<(String, std::path::PathBuf)>,
    /// The accelerators each replica asks for (`acceleratorType`'s wire name, and
    /// `acceleratorCount`), where the deployment names a type. The local runtime runs on this
    /// machine's devices whatever they are; the Kubernetes runtime asks the scheduler.
    pub accelerator: Option<(String, u32)>,
}

impl ReplicaSpec {
    /// A short fingerprint of the spec, stored with each replica so a changed deployment can
    /// tell its old replicas from its new ones.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let text = format!(
            "{}|{}|{}|{}|{}",
            self.deployment, self.model, self.precision, self.max_context_length, self.max_hot_adapters
        );
        let mut h = Sha256::new();
        h.update(text.as_bytes());
        // Only when set, so the replicas of models without them keep their fingerprints.
        for (tag, v) in [(&b"|template:"[..], &self.chat_template), (&b"|system:"[..], &self.system_prompt)] {
            if let Some(v) = v {
                h.update(tag);
                h.update(v.as_bytes());
            }
        }
        if self.ngram_speculation > 0 {
            h.update(format!("|ngram:{}:{}", self.ngram_speculation, self.draft_tokens).as_bytes());
        }
        if let Some(d) = &self.draft_model {
            h.update(format!("|draft:{d}:{}", self.draft_tokens).as_bytes());
        }
        if let Some((t, n)) = &self.accelerator {
            h.update(format!("|accelerator:{t}:{n}").as_bytes());
        }
        hex::encode(&h.finalize()[..6])
    }
}

/// Files a replica is to load, and where the gateway has them.
#[derive(Debug, Clone, Copy)]
pub enum ReplicaFiles<'a> {
    /// A model's (`accounts/{a}/models/{m}`): an addon's, say.
    Model { name: &'a str, dir: &'a std::path::Path },
    /// A hot-load version of a deployment.
    Version { deployment: &'a str, version: &'a str, dir: &'a std::path::Path },
}

impl ReplicaFiles<'_> {
    pub fn dir(&self) -> &std::path::Path {
        match self {
            ReplicaFiles::Model { dir, .. } | ReplicaFiles::Version { dir, .. } => dir,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Started, not answering its health check yet (loading the model).
    Starting,
    /// Healthy: serves requests at its endpoint.
    Ready,
    /// Exited or refused to start; the message says why (the engine's last log line).
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    pub deployment: String,
    pub fingerprint: String,
    /// Base URL of the replica's OpenAI API, e.g. `http://127.0.0.1:41234`.
    pub endpoint: String,
    pub phase: Phase,
    /// Whether it was ever Ready: a replica that fails before that could not load its model
    /// (the deployment is FAILED); one that fails after it crashed (it is replaced).
    pub was_ready: bool,
    /// What the replica last reported it has on its hands.
    pub load: Option<LoadFigures>,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Starts one replica; it appears in `replicas()` at once, `Starting` until healthy.
    async fn start(&self, spec: &ReplicaSpec) -> Result<Replica>;
    /// Stops a replica; stopping one that is gone is not an error.
    async fn stop(&self, id: &str) -> Result<()>;
    /// Every replica this runtime has, with its current phase.
    async fn replicas(&self) -> Result<Vec<Replica>>;

    /// How a replica of this runtime reaches files the gateway has: where replicas share the
    /// gateway's filesystem, their directory (the default); elsewhere what the replica fetches
    /// them by.
    fn replica_files(&self, files: &ReplicaFiles<'_>) -> Result<String> {
        Ok(files.dir().to_string_lossy().into_owned())
    }

    /// Whether every gateway sees this runtime's replicas and they outlive the gateway that
    /// started them (pods). Then a gateway without the runtime lease follows rather than
    /// standing down: it routes to the ready replicas it sees and leaves them running.
    fn shared(&self) -> bool {
        false
    }

    /// Told when this gateway starts or stops running the reconciler (shared runtimes: only
    /// the leader needs what it learns by asking replicas, their load).
    fn set_leading(&self, leading: bool) {
        let _ = leading;
    }

    /// The replicas of one deployment.
    async fn replicas_of(&self, deployment: &str) -> Result<Vec<Replica>> {
        Ok(self.replicas().await?.into_iter().filter(|r| r.deployment == deployment).collect())
    }
}

/// Where "now" comes from: the system clock in service, a hand-moved one in tests.
pub trait Clock: Send + Sync + 'static {
    /// For windows and timeouts.
    fn now(&self) -> std::time::Instant;
    /// The calendar time, for scaling schedules.
    fn wall(&self) -> chrono::DateTime<chrono::Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }

    fn wall(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }
}
