//! The local runtime: each replica is a `hearth engine` child process on a free loopback port,
//! serving the model's files straight from the artifact store. Children are killed when the
//! runtime is dropped, so replicas stop with the gateway.
//!
//! Each replica has a prober task that asks its health until it answers, and its load figures
//! after that, so `replicas()` answers from memory and never waits on a replica.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use hearth_control::ControlPlane;

use crate::credentials::ReplicaCredentials;
use crate::error::{Result, RuntimeError};
use crate::replica::ReplicaApi;
use crate::runtime::{Phase, Replica, ReplicaSpec, Runtime, REPLICA_BATCH_SIZE};

/// What the prober last learned of a replica.
#[derive(Debug, Clone, Default)]
struct Probed {
    healthy: bool,
    load: Option<hearth_api::replica::LoadFigures>,
}

struct Proc {
    replica: Replica,
    child: Child,
    /// The last lines the engine logged, to explain a failure.
    log_tail: Arc<std::sync::Mutex<Vec<String>>>,
    probed: Arc<std::sync::Mutex<Probed>>,
    prober: tokio::task::JoinHandle<()>,
}

pub struct LocalRuntime {
    /// The `hearth` binary to run as `hearth engine`.
    binary: PathBuf,
    /// Where each model's files are (the artifact store).
    control: ControlPlane,
    replicas: Arc<dyn ReplicaApi>,
    /// Each replica is given its own token; the gateway's calls present it.
    credentials: ReplicaCredentials,
    procs: Mutex<HashMap<String, Proc>>,
}

const LOG_TAIL: usize = 20;
/// How often a starting replica is asked whether it is healthy, and a ready one for its load.
const PROBE_STARTING: Duration = Duration::from_millis(100);
const PROBE_READY: Duration = Duration::from_secs(1);

impl LocalRuntime {
    pub fn new(
        binary: PathBuf,
        control: ControlPlane,
        replicas: Arc<dyn ReplicaApi>,
        credentials: ReplicaCredentials,
    ) -> LocalRuntime {
        LocalRuntime { binary, control, replicas, credentials, procs: Mutex::new(HashMap::new()) }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(RuntimeError::backend)?;
    Ok(l.local_addr().map_err(RuntimeError::backend)?.port())
}

/// Asks a replica's health until it answers, then its load figures, for as long as it lives.
fn spawn_prober(
    api: Arc<dyn ReplicaApi>,
    endpoint: String,
    probed: Arc<std::sync::Mutex<Probed>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let healthy = probed.lock().map(|p| p.healthy).unwrap_or(false);
            if !healthy {
                if api.health(&endpoint).await.is_ok() {
                    if let Ok(mut p) = probed.lock() {
                        p.healthy = true;
                    }
                    continue;
                }
                tokio::time::sleep(PROBE_STARTING).await;
            } else {
                let load = api.load_figures(&endpoint).await.ok();
                if let Ok(mut p) = probed.lock() {
                    p.load = load;
                }
                tokio::time::sleep(PROBE_READY).await;
            }
        }
    })
}

#[async_trait]
impl Runtime for LocalRuntime {
    async fn start(&self, spec: &ReplicaSpec) -> Result<Replica> {
        let port = free_port()?;
        let model_dir = match &spec.model_version {
            Some((_, dir)) => dir.clone(),
            None => self.control.model_files(&spec.model).await?,
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(&self.binary);
        // In the environment, not the command line, which every local user can read.
        cmd.env(hearth_api::replica::TOKEN_ENV, self.credentials.token(&endpoint));
        cmd.arg("engine")
            .arg("--model")
            .arg(&model_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--served-model-name")
            .arg(&spec.model)
            .arg("--max-running")
            .arg(REPLICA_BATCH_SIZE.to_string())
            .arg("--exit-with-parent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // The reason a replica failed is its error chain, not a backtrace.
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        if !spec.precision.is_empty() {
            cmd.arg("--precision").arg(&spec.precision);
        }
        if spec.max_hot_adapters > 0 {
            cmd.arg("--max-hot-loras").arg(spec.max_hot_adapters.to_string());
        }
        if spec.max_context_length > 0 {
            cmd.arg("--max-context-length").arg(spec.max_context_length.to_string());
        }
        if spec.ngram_speculation > 0 {
            cmd.arg("--ngram-speculation").arg(spec.ngram_speculation.to_string());
        }
        if let Some(draft) = &spec.draft_model {
            let files = self.control.model_files(draft).await?;
            cmd.arg("--draft-model").arg(files);
        }
        if spec.draft_tokens > 0 && (spec.ngram_speculation > 0 || spec.draft_model.is_some()) {
            cmd.arg("--draft-tokens").arg(spec.draft_tokens.to_string());
        }
        if let Some((version, _)) = &spec.model_version {
            cmd.arg("--model-version").arg(version);
        }
        if let Some(t) = &spec.chat_template {
            cmd.arg("--chat-template").arg(t);
        }
        if let Some(p) = &spec.system_prompt {
            cmd.arg("--system-prompt").arg(p);
        }
        let mut child =
            cmd.spawn().map_err(|e| RuntimeError::Backend(format!("starting {}: {e}", self.binary.display())))?;
        let log_tail = Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = log_tail.clone();
            let deployment = spec.deployment.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(target: "hearth::replica", deployment = %deployment, "{line}");
                    if let Ok(mut t) = tail.lock() {
                        if t.len() >= LOG_TAIL {
                            t.remove(0);
                        }
                        t.push(line);
                    }
                }
            });
        }
        let id = format!("r-{:08x}", rand::random::<u32>());
        let replica = Replica {
            id: id.clone(),
            deployment: spec.deployment.clone(),
            fingerprint: spec.fingerprint(),
            endpoint,
            phase: Phase::Starting,
            was_ready: false,
            load: None,
        };
        tracing::info!(deployment = %spec.deployment, replica = %id, port, "replica starting");
        let probed = Arc::new(std::sync::Mutex::new(Probed::default()));
        let prober = spawn_prober(self.replicas.clone(), replica.endpoint.clone(), probed.clone());
        self.procs.lock().await.insert(id, Proc { replica: replica.clone(), child, log_tail, probed, prober });
        Ok(replica)
    }

    async fn stop(&self, id: &str) -> Result<()> {
        let proc = self.procs.lock().await.remove(id);
        if let Some(mut p) = proc {
            p.prober.abort();
            let _ = p.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await;
            tracing::info!(deployment = %p.replica.deployment, replica = %id, "replica stopped");
        }
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<Replica>> {
        let mut procs = self.procs.lock().await;
        let mut out = Vec::with_capacity(procs.len());
        for p in procs.values_mut() {
            // An exited process is Failed with the reason it logged; the reconciler replaces it.
            if let Ok(Some(status)) = p.child.try_wait() {
                p.prober.abort();
                let tail = p.log_tail.lock().map(|t| t.clone()).unwrap_or_default();
                p.replica.phase = Phase::Failed(format!("engine exited ({status}): {}", failure_reason(&tail)));
            } else {
                let probed = p.probed.lock().map(|p| p.clone()).unwrap_or_default();
                if probed.healthy && p.replica.phase == Phase::Starting {
                    tracing::info!(deployment = %p.replica.deployment, replica = %p.replica.id, "replica ready");
                    p.replica.phase = Phase::Ready;
                    p.replica.was_ready = true;
                }
                p.replica.load = probed.load;
            }
            out.push(p.replica.clone());
        }
        Ok(out)
    }
}

/// The engine's own account of why it stopped: its `Error: ...` line and the causes after it
/// (the binary prints errors that way), else its last log line.
pub(crate) fn failure_reason(tail: &[String]) -> String {
    let lines: Vec<String> = tail.iter().map(|l| strip_ansi(l)).collect();
    match lines.iter().position(|l| l.starts_with("Error: ")) {
        Some(i) => lines[i..]
            .iter()
            .take_while(|l| !l.starts_with("Stack backtrace"))
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        None => lines.last().cloned().unwrap_or_default(),
    }
}

/// Engine logs are colourful on a terminal; status messages are plain text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
