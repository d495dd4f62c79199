//! The local runtime: each replica is a `hearth engine` child process on a free loopback port,
//! serving the model's files straight from the artifact store. Children are killed when the
//! runtime is dropped, so replicas stop with the gateway.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{Phase, Replica, ReplicaSpec, Runtime};
use crate::artifacts::ArtifactStore;
use crate::error::{ControlError, Result};

struct Proc {
    replica: Replica,
    child: Child,
    /// The last lines the engine logged, to explain a failure.
    log_tail: Arc<std::sync::Mutex<Vec<String>>>,
}

pub struct LocalRuntime {
    /// The `hearth` binary to run as `hearth engine`.
    binary: PathBuf,
    artifacts: ArtifactStore,
    procs: Mutex<HashMap<String, Proc>>,
    http: reqwest::Client,
}

const LOG_TAIL: usize = 20;

impl LocalRuntime {
    pub fn new(binary: PathBuf, artifacts: ArtifactStore) -> LocalRuntime {
        LocalRuntime {
            binary,
            artifacts,
            procs: Mutex::new(HashMap::new()),
            http: reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap_or_default(),
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(ControlError::internal)?;
    Ok(l.local_addr().map_err(ControlError::internal)?.port())
}

#[async_trait]
impl Runtime for LocalRuntime {
    async fn start(&self, spec: &ReplicaSpec) -> Result<Replica> {
        let port = free_port()?;
        let model_dir = self.artifacts.model_dir(&spec.account, &spec.model_id);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("engine")
            .arg("--model")
            .arg(&model_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--served-model-name")
            .arg(&spec.model)
            .arg("--max-running")
            .arg(super::MAX_BATCH_SIZE.to_string())
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
        let mut child =
            cmd.spawn().map_err(|e| ControlError::Internal(format!("starting {}: {e}", self.binary.display())))?;
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
            endpoint: format!("http://127.0.0.1:{port}"),
            phase: Phase::Starting,
            was_ready: false,
        };
        tracing::info!(deployment = %spec.deployment, replica = %id, port, "replica starting");
        self.procs.lock().await.insert(id, Proc { replica: replica.clone(), child, log_tail });
        Ok(replica)
    }

    async fn stop(&self, id: &str) -> Result<()> {
        let proc = self.procs.lock().await.remove(id);
        if let Some(mut p) = proc {
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
                let tail = p.log_tail.lock().map(|t| t.clone()).unwrap_or_default();
                p.replica.phase = Phase::Failed(format!("engine exited ({status}): {}", failure_reason(&tail)));
            } else if p.replica.phase == Phase::Starting {
                let healthy = self
                    .http
                    .get(format!("{}/health", p.replica.endpoint))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if healthy {
                    tracing::info!(deployment = %p.replica.deployment, replica = %p.replica.id, "replica ready");
                    p.replica.phase = Phase::Ready;
                    p.replica.was_ready = true;
                }
            }
            out.push(p.replica.clone());
        }
        Ok(out)
    }
}

/// The engine's own account of why it stopped: its `Error: ...` line and the causes after it
/// (the binary prints errors that way), else its last log line.
fn failure_reason(tail: &[String]) -> String {
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
