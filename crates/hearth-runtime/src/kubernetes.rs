//! The Kubernetes runtime: each replica is a Pod running `hearth engine` from a configured
//! image, in one namespace.
//!
//! What the runtime knows of its pods comes from a watch (kube's reflector), never from
//! listing in a loop: `replicas()` answers from that cache, so a reconcile costs the API server
//! nothing but the creates and deletes it decides on. Readiness is the pod's `Ready`
//! condition (the kubelet probes the engine's `/health`), and the router sends to ready pods
//! by pod IP.
//!
//! A pod shares nothing with the gateway but the network. Its model and adapters are named by
//! signed manifest URLs that point at the gateways ([`Runtime::replica_files`]), which the
//! engine fetches into an `emptyDir` cache and checks against their digests before loading.
//! Its token cannot be handed over at creation, since it derives from the pod's address,
//! known only once the pod runs: the pod is given the replicas' key from a Secret and derives
//! its own token from `http://$(POD_IP):PORT`, as every gateway does.
//!
//! Pods carry the labels `app.kubernetes.io/managed-by=hearth` and `hearth.dev/installation`
//! (a digest of the store's replica key: hearth installations on different stores may share
//! a namespace, and each sees only its own pods and Secret); the deployment they serve is
//! an annotation (names are longer than label values may be) and a label hash of it, their
//! spec's fingerprint a label. Pods are `restartPolicy: Never`: a crashed engine becomes a
//! Failed pod that the reconciler replaces and a pod that never became ready fails its
//! deployment with the engine's own last words (the termination message falls back to the
//! log's tail).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod,
    PodSpec, Probe, ResourceRequirements, Secret, SecretKeySelector, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;

use hearth_control::ControlPlane;

use crate::credentials::ReplicaCredentials;
use crate::error::{Result, RuntimeError};
use crate::replica::ReplicaApi;
use crate::runtime::{Phase, Replica, ReplicaFiles, ReplicaSpec, Runtime, REPLICA_BATCH_SIZE};

const LABEL_INSTALLATION: &str = "hearth.dev/installation";
const LABEL_DEPLOYMENT: &str = "hearth.dev/deployment-hash";
const LABEL_FINGERPRINT: &str = "hearth.dev/fingerprint";
const ANNOTATION_DEPLOYMENT: &str = "hearth.dev/deployment";
/// The Secret holding the replicas' key (its name ends with the installation), and its data key.
const KEY_SECRET: &str = "hearth-replica-token-key";
const KEY_SECRET_KEY: &str = "key";
/// Where a pod's cache volume is mounted.
const CACHE_DIR: &str = "/var/cache/hearth";
/// How long the manifest URLs a pod is started with last: a pod fetches at start, and a
/// Pending pod may wait for a node a long time.
const MANIFEST_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often a ready pod is asked for its load figures.
const PROBE_READY: Duration = Duration::from_secs(1);

/// What the operator sets (`hearth serve --runtime kubernetes ...`).
#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    /// Where pods are made; empty for the kubeconfig's (or service account's) namespace.
    pub namespace: String,
    /// The image pods run: one that has `hearth` on its PATH.
    pub image: String,
    /// The port the engine listens on inside each pod.
    pub port: u16,
    /// The base URL pods reach a gateway at, for the manifest URLs.
    pub gateway_url: String,
    /// CPU each engine pod requests (Kubernetes quantity, e.g. `2`).
    pub cpu: String,
    /// The extended resource a deployment's accelerators are counted in (`nvidia.com/gpu`).
    pub gpu_resource: String,
    /// Per `acceleratorType` (wire name), the node labels its pods must run on.
    pub node_selectors: BTreeMap<String, BTreeMap<String, String>>,
}

/// What the prober learned of a ready pod.
struct Prober {
    endpoint: String,
    load: Arc<Mutex<Option<hearth_api::replica::LoadFigures>>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct KubernetesRuntime {
    client: kube::Client,
    pods: Api<Pod>,
    /// This store's installation label value, and the name of its key Secret.
    installation: String,
    secret: String,
    /// What every pod is owned by: the installation's Lease (see `installation_lease`).
    owner: OwnerReference,
    cache: Store<Pod>,
    settings: KubernetesSettings,
    control: ControlPlane,
    replicas: Arc<dyn ReplicaApi>,
    probers: Mutex<HashMap<String, Prober>>,
    /// Whether this gateway runs the reconciler: only then are pods asked for their load
    /// (the others route by their own in-flight counts), so 50 gateways do not each probe
    /// every pod every second.
    leading: std::sync::atomic::AtomicBool,
    /// Pods seen ready by this gateway: a pod that fails after that crashed, one that fails
    /// before it could not start.
    seen_ready: Mutex<HashSet<String>>,
    /// Pods this gateway has asked to delete, hidden from `replicas()` until the watch sees
    /// them go, so the reconciler does not count them.
    stopping: Mutex<HashSet<String>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for KubernetesRuntime {
    fn drop(&mut self) {
        self.watch.abort();
        if let Ok(p) = self.probers.lock() {
            for prober in p.values() {
                prober.task.abort();
            }
        }
    }
}

impl KubernetesRuntime {
    /// Connects with the in-cluster service account or the kubeconfig (`KUBECONFIG`), puts
    /// the replicas' key in its Secret, and starts watching the pods hearth manages.
    pub async fn connect(
        mut settings: KubernetesSettings,
        control: ControlPlane,
        replicas: Arc<dyn ReplicaApi>,
        credentials: &ReplicaCredentials,
    ) -> Result<KubernetesRuntime> {
        let config = kube::Config::infer().await.map_err(|e| {
            RuntimeError::Backend(format!("no Kubernetes configuration (in cluster or KUBECONFIG): {e}"))
        })?;
        if settings.namespace.is_empty() {
            settings.namespace = config.default_namespace.clone();
        }
        let client = kube::Client::try_from(config).map_err(RuntimeError::backend)?;
        let ns = settings.namespace.clone();
        let installation = {
            use sha2::{Digest, Sha256};
            hex::encode(&Sha256::digest(format!("hearth installation\n{}", credentials.key_hex()).as_bytes())[..8])
        };
        let secret = format!("{KEY_SECRET}-{installation}");
        put_key_secret(&Api::namespaced(client.clone(), &ns), &secret, &installation, credentials).await?;
        let owner = installation_lease(&Api::namespaced(client.clone(), &ns), &lease_name(&installation)).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let (cache, writer) = reflector::store();
        let selector = format!("app.kubernetes.io/managed-by=hearth,{LABEL_INSTALLATION}={installation}");
        let stream = reflector::reflector(writer, watcher(pods.clone(), watcher::Config::default().labels(&selector)))
            .default_backoff()
            .touched_objects();
        let watch = tokio::spawn(async move {
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "watching pods failed; retrying");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), cache.wait_until_ready())
            .await
            .map_err(|_| RuntimeError::Backend(format!("could not list the pods of namespace {ns} within 30 s")))?
            .map_err(RuntimeError::backend)?;
        tracing::info!(namespace = %ns, image = %settings.image, "kubernetes runtime watching its pods");
        Ok(KubernetesRuntime {
            client,
            pods,
            installation,
            secret,
            owner,
            cache,
            settings,
            control,
            replicas,
            probers: Mutex::default(),
            leading: Default::default(),
            seen_ready: Mutex::default(),
            stopping: Mutex::default(),
            watch,
        })
    }

    /// The election of this installation's reconciler: the Lease `hearth-<installation>` in
    /// the namespace.
    pub fn election(&self) -> crate::election::KubernetesElection {
        crate::election::KubernetesElection::new(
            Api::namespaced(self.client.clone(), &self.settings.namespace),
            lease_name(&self.installation),
        )
    }

    fn manifest_url(&self, model: &str) -> Result<String> {
        let url = self
            .control
            .replica_files_url(model, MANIFEST_TTL)
            .ok_or_else(|| RuntimeError::Backend(format!("{model} is not a model name")))?;
        Ok(self.rebase(&url, "/replica-files/"))
    }

    fn version_url(&self, deployment: &str, version: &str) -> Result<String> {
        let url = self
            .control
            .replica_version_url(deployment, version, MANIFEST_TTL)
            .ok_or_else(|| RuntimeError::Backend(format!("{deployment} is not a deployment name")))?;
        Ok(self.rebase(&url, "/replica-versions/"))
    }

    /// The control plane signs for its public URL; pods reach the gateways at theirs.
    fn rebase(&self, url: &str, route: &str) -> String {
        let path = url.find(route).map(|i| &url[i..]).unwrap_or(url);
        format!("{}{path}", self.settings.gateway_url.trim_end_matches('/'))
    }

    /// The memory a replica of `spec` asks for: its weights as stored (a quantized model is
    /// served quantized; a precision set widens them), the draft model's, the engine's
    /// default KV cache and adapter room, and a margin.
    async fn memory_request(&self, spec: &ReplicaSpec) -> Result<u64> {
        let widen = if spec.precision == "FP32" { 4 } else { 1 };
        let mut weights = self.control.model_bytes(&spec.model).await? * widen;
        if let Some(d) = &spec.draft_model {
            weights += self.control.model_bytes(d).await?;
        }
        Ok(weights + (1 << 30) + (1 << 30) + (512 << 20))
    }

    fn pod(&self, spec: &ReplicaSpec, name: &str, memory: u64) -> Result<Pod> {
        let port = self.settings.port;
        // A deployment serving a hot-loaded version starts new pods on it.
        let model = match &spec.model_version {
            Some((version, _)) => self.version_url(&spec.deployment, version)?,
            None => self.manifest_url(&spec.model)?,
        };
        let mut args: Vec<String> = vec![
            "engine".into(),
            "--model".into(),
            model,
            "--listen".into(),
            format!("$(POD_IP):{port}"),
            "--served-model-name".into(),
            spec.model.clone(),
            "--max-running".into(),
            REPLICA_BATCH_SIZE.to_string(),
        ];
        let mut flag = |name: &str, value: String| {
            args.push(format!("--{name}"));
            args.push(value);
        };
        if !spec.precision.is_empty() {
            flag("precision", spec.precision.clone());
        }
        if spec.max_hot_adapters > 0 {
            flag("max-hot-loras", spec.max_hot_adapters.to_string());
        }
        if spec.max_context_length > 0 {
            flag("max-context-length", spec.max_context_length.to_string());
        }
        if spec.ngram_speculation > 0 {
            flag("ngram-speculation", spec.ngram_speculation.to_string());
        }
        if let Some(d) = &spec.draft_model {
            flag("draft-model", self.manifest_url(d)?);
        }
        if spec.draft_tokens > 0 && (spec.ngram_speculation > 0 || spec.draft_model.is_some()) {
            flag("draft-tokens", spec.draft_tokens.to_string());
        }
        if let Some(t) = &spec.chat_template {
            flag("chat-template", t.clone());
        }
        if let Some(p) = &spec.system_prompt {
            flag("system-prompt", p.clone());
        }
        if let Some((version, _)) = &spec.model_version {
            flag("model-version", version.clone());
        }
        // Kubernetes expands `$(VAR)` in args and in later env values, not in the shell sense.
        let escaped: Vec<String> =
            args.into_iter().map(|a| if a.starts_with("$(POD_IP)") { a } else { a.replace("$(", "$$(") }).collect();
        let env = vec![
            EnvVar {
                name: "POD_IP".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector { field_path: "status.podIP".into(), ..Default::default() }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar {
                name: "HEARTH_ENGINE_ENDPOINT".into(),
                value: Some(format!("http://$(POD_IP):{port}")),
                ..Default::default()
            },
            EnvVar {
                name: hearth_api::replica::TOKEN_KEY_ENV.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: self.secret.clone(),
                        key: KEY_SECRET_KEY.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar { name: "HEARTH_ARTIFACT_CACHE".into(), value: Some(CACHE_DIR.into()), ..Default::default() },
            EnvVar { name: "RUST_BACKTRACE".into(), value: Some("0".into()), ..Default::default() },
            EnvVar { name: "NO_COLOR".into(), value: Some("1".into()), ..Default::default() },
        ];
        let memory = Quantity(format!("{}Mi", memory >> 20));
        let mut requests = BTreeMap::from([
            ("cpu".to_string(), Quantity(self.settings.cpu.clone())),
            ("memory".to_string(), memory.clone()),
        ]);
        let mut limits = BTreeMap::from([("memory".to_string(), memory)]);
        let (mut node_selector, mut tolerations) = (None, None);
        if let Some((kind, count)) = &spec.accelerator {
            // Extended resources are asked for as limits (requests equal to them).
            let gpus = Quantity(count.to_string());
            requests.insert(self.settings.gpu_resource.clone(), gpus.clone());
            limits.insert(self.settings.gpu_resource.clone(), gpus);
            node_selector = self.settings.node_selectors.get(kind).cloned();
            // GPU nodes are commonly tainted with the resource's name, to keep others off.
            tolerations = Some(vec![Toleration {
                key: Some(self.settings.gpu_resource.clone()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }]);
        }
        let resources = ResourceRequirements { requests: Some(requests), limits: Some(limits), ..Default::default() };
        let labels = BTreeMap::from([
            ("app.kubernetes.io/managed-by".to_string(), "hearth".to_string()),
            ("app.kubernetes.io/name".to_string(), "hearth-engine".to_string()),
            (LABEL_INSTALLATION.to_string(), self.installation.clone()),
            (LABEL_DEPLOYMENT.to_string(), deployment_hash(&spec.deployment)),
            (LABEL_FINGERPRINT.to_string(), spec.fingerprint()),
        ]);
        Ok(Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(ANNOTATION_DEPLOYMENT.to_string(), spec.deployment.clone())])),
                owner_references: Some(vec![self.owner.clone()]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                node_selector,
                tolerations,
                termination_grace_period_seconds: Some(30),
                automount_service_account_token: Some(false),
                containers: vec![Container {
                    name: "engine".into(),
                    image: Some(self.settings.image.clone()),
                    command: Some(vec!["hearth".into()]),
                    args: Some(escaped),
                    env: Some(env),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: port as i32,
                        ..Default::default()
                    }]),
                    readiness_probe: Some(Probe {
                        http_get: Some(HTTPGetAction {
                            path: Some(hearth_api::replica::paths::HEALTH.into()),
                            port: IntOrString::String("http".into()),
                            ..Default::default()
                        }),
                        period_seconds: Some(2),
                        ..Default::default()
                    }),
                    resources: Some(resources),
                    termination_message_policy: Some("FallbackToLogsOnError".into()),
                    volume_mounts: Some(vec![VolumeMount {
                        name: "cache".into(),
                        mount_path: CACHE_DIR.into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                volumes: Some(vec![Volume {
                    name: "cache".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// A pod as a replica, or `None` for one that is not hearth's to count (being deleted).
    fn replica(&self, pod: &Pod) -> Option<Replica> {
        let meta = &pod.metadata;
        let id = meta.name.clone()?;
        if meta.deletion_timestamp.is_some() {
            return None;
        }
        let deployment = meta.annotations.as_ref()?.get(ANNOTATION_DEPLOYMENT)?.clone();
        let fingerprint = meta.labels.as_ref()?.get(LABEL_FINGERPRINT)?.clone();
        let status = pod.status.clone().unwrap_or_default();
        let endpoint =
            status.pod_ip.as_ref().map(|ip| format!("http://{ip}:{}", self.settings.port)).unwrap_or_default();
        let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
        let phase = match status.phase.as_deref() {
            Some("Failed") | Some("Succeeded") => Phase::Failed(termination_reason(&status)),
            _ if ready && !endpoint.is_empty() => Phase::Ready,
            _ => Phase::Starting,
        };
        let was_ready = {
            let mut seen = self.seen_ready.lock().unwrap_or_else(|e| e.into_inner());
            if phase == Phase::Ready {
                seen.insert(id.clone());
            }
            seen.contains(&id)
        };
        Some(Replica { id, deployment, fingerprint, endpoint, phase, was_ready, load: None })
    }

    /// Starts a load prober for each ready pod that has none, ends those of pods gone or not
    /// ready, and fills in the figures learned.
    /// `all`: `replicas` are every pod, so probers of pods not among them end too; else only
    /// those of `replicas` that are no longer ready.
    fn probe(&self, replicas: &mut [Replica], all: bool) {
        let mut probers = self.probers.lock().unwrap_or_else(|e| e.into_inner());
        let leading = self.leading.load(std::sync::atomic::Ordering::Relaxed);
        let ready: HashMap<&str, &str> = replicas
            .iter()
            .filter(|r| leading && r.phase == Phase::Ready)
            .map(|r| (r.id.as_str(), r.endpoint.as_str()))
            .collect();
        let listed: HashSet<&str> = replicas.iter().map(|r| r.id.as_str()).collect();
        probers.retain(|id, p| {
            let keep = ready.get(id.as_str()) == Some(&p.endpoint.as_str()) || (!all && !listed.contains(id.as_str()));
            if !keep {
                p.task.abort();
            }
            keep
        });
        for (id, endpoint) in &ready {
            if !probers.contains_key(*id) {
                let load = Arc::new(Mutex::new(None));
                let task = spawn_prober(self.replicas.clone(), endpoint.to_string(), load.clone());
                probers.insert(id.to_string(), Prober { endpoint: endpoint.to_string(), load, task });
            }
        }
        for r in replicas.iter_mut() {
            if let Some(p) = probers.get(&r.id) {
                r.load = p.load.lock().map(|l| l.clone()).unwrap_or_default();
            }
        }
    }
}

#[async_trait]
impl Runtime for KubernetesRuntime {
    async fn start(&self, spec: &ReplicaSpec) -> Result<Replica> {
        let name = pod_name(&spec.deployment);
        let pod = self.pod(spec, &name, self.memory_request(spec).await?)?;
        self.pods.create(&PostParams::default(), &pod).await.map_err(|e| {
            RuntimeError::Backend(format!("creating pod {name} in namespace {}: {e}", self.settings.namespace))
        })?;
        tracing::info!(deployment = %spec.deployment, pod = %name, "replica pod created");
        Ok(Replica {
            id: name,
            deployment: spec.deployment.clone(),
            fingerprint: spec.fingerprint(),
            endpoint: String::new(),
            phase: Phase::Starting,
            was_ready: false,
            load: None,
        })
    }

    async fn stop(&self, id: &str) -> Result<()> {
        self.stopping.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string());
        match self.pods.delete(id, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(pod = %id, "replica pod deleted");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => {
                self.stopping.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                Err(RuntimeError::Backend(format!("deleting pod {id}: {e}")))
            }
        }
    }

    async fn replicas(&self) -> Result<Vec<Replica>> {
        let pods = self.cache.state();
        let present: HashSet<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
        let stopping = {
            let mut s = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            s.retain(|id| present.contains(id));
            s.clone()
        };
        self.seen_ready.lock().unwrap_or_else(|e| e.into_inner()).retain(|id| present.contains(id));
        let mut out: Vec<Replica> =
            pods.iter().filter_map(|p| self.replica(p)).filter(|r| !stopping.contains(&r.id)).collect();
        self.probe(&mut out, true);
        Ok(out)
    }

    /// One deployment's pods, looked at alone: a reconcile reads only its own (thousands of
    /// pods otherwise make every reconcile as costly as all of them).
    async fn replicas_of(&self, deployment: &str) -> Result<Vec<Replica>> {
        let hash = deployment_hash(deployment);
        let mine = self.cache.state_filter(|p| {
            p.metadata.labels.as_ref().and_then(|l| l.get(LABEL_DEPLOYMENT)) == Some(&hash)
                && p.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_DEPLOYMENT)).map(String::as_str)
                    == Some(deployment)
        });
        let stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out: Vec<Replica> =
            mine.iter().filter_map(|p| self.replica(p)).filter(|r| !stopping.contains(&r.id)).collect();
        self.probe(&mut out, false);
        Ok(out)
    }

    fn shared(&self) -> bool {
        true
    }

    fn set_leading(&self, leading: bool) {
        self.leading.store(leading, std::sync::atomic::Ordering::Relaxed);
    }

    fn replica_files(&self, files: &ReplicaFiles<'_>) -> Result<String> {
        match files {
            ReplicaFiles::Model { name, .. } => self.manifest_url(name),
            ReplicaFiles::Version { deployment, version, .. } => self.version_url(deployment, version),
        }
    }
}

/// The Lease that elects the installation's reconciler: `hearth-<installation>`.
fn lease_name(installation: &str) -> String {
    format!("hearth-{installation}")
}

/// The installation's Lease, made (with no holder) if it does not exist yet, as the owner of
/// every pod: Kubernetes' garbage collector removes an installation's pods when its Lease is
/// deleted (uninstalling: `kubectl delete lease hearth-<installation>` once the gateways are
/// gone), where no gateway is left to do it.
async fn installation_lease(leases: &Api<Lease>, name: &str) -> Result<OwnerReference> {
    let found = match leases.get_opt(name).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_string(), "hearth".to_string())])),
                    ..Default::default()
                },
                spec: Some(Default::default()),
            };
            match leases.create(&PostParams::default(), &lease).await {
                Ok(l) => l,
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    leases.get(name).await.map_err(|e| RuntimeError::Backend(format!("reading lease {name}: {e}")))?
                }
                Err(e) => return Err(RuntimeError::Backend(format!("creating lease {name}: {e}"))),
            }
        }
        Err(e) => return Err(RuntimeError::Backend(format!("reading lease {name}: {e}"))),
    };
    let uid = found.metadata.uid.ok_or_else(|| RuntimeError::Backend(format!("lease {name} has no uid")))?;
    Ok(OwnerReference {
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        name: name.to_string(),
        uid,
        ..Default::default()
    })
}

/// Creates the Secret holding the replicas' key, unless it exists.
async fn put_key_secret(
    secrets: &Api<Secret>,
    name: &str,
    installation: &str,
    credentials: &ReplicaCredentials,
) -> Result<()> {
    let key = credentials.key_hex();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), "hearth".to_string()),
                (LABEL_INSTALLATION.to_string(), installation.to_string()),
            ])),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(KEY_SECRET_KEY.to_string(), key.clone())])),
        ..Default::default()
    };
    // Named by the installation, which derives from the key: one that exists holds this key.
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(RuntimeError::Backend(format!("creating secret {name}: {e}"))),
    }
    Ok(())
}

/// Why a pod stopped: its container's termination reason and message (the engine's last log
/// lines), else the pod's own.
fn termination_reason(status: &k8s_openapi::api::core::v1::PodStatus) -> String {
    let terminated = status.container_statuses.iter().flatten().find_map(|c| c.state.as_ref()?.terminated.clone());
    match terminated {
        Some(t) => {
            let tail: Vec<String> = t.message.as_deref().unwrap_or_default().lines().map(String::from).collect();
            let said = crate::local::failure_reason(&tail);
            format!("engine exited (code {}, {}): {said}", t.exit_code, t.reason.as_deref().unwrap_or("no reason"))
        }
        None => status.message.clone().or_else(|| status.reason.clone()).unwrap_or_else(|| "the pod failed".into()),
    }
}

/// A pod name for a replica of `deployment`: its id (DNS-1123 already) and a random suffix.
fn pod_name(deployment: &str) -> String {
    let id = deployment.rsplit('/').next().unwrap_or("replica");
    let id: String = id.chars().take(40).collect();
    format!("hearth-{}-{:08x}", id.trim_end_matches('-'), rand::random::<u32>())
}

/// A label value for a deployment name (which may be longer than 63 characters).
fn deployment_hash(deployment: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(deployment.as_bytes())[..10])
}

fn spawn_prober(
    api: Arc<dyn ReplicaApi>,
    endpoint: String,
    load: Arc<Mutex<Option<hearth_api::replica::LoadFigures>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let figures = api.load_figures(&endpoint).await.ok();
            if let Ok(mut l) = load.lock() {
                *l = figures;
            }
            tokio::time::sleep(PROBE_READY).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_dns_labels() {
        let n = pod_name("accounts/a/deployments/my-deployment-1");
        assert!(n.starts_with("hearth-my-deployment-1-"), "{n}");
        assert!(n.len() <= 63);
        assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert_eq!(deployment_hash("accounts/a/deployments/x").len(), 20);
    }

    #[test]
    fn the_engine_error_is_the_reason() {
        let log = "INFO loading\nError: loading /m\n\nCaused by:\n    not a GGUF file\n";
        let status = k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Failed".into()),
            container_statuses: Some(vec![k8s_openapi::api::core::v1::ContainerStatus {
                state: Some(k8s_openapi::api::core::v1::ContainerState {
                    terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                        exit_code: 1,
                        reason: Some("Error".into()),
                        message: Some(log.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            termination_reason(&status),
            "engine exited (code 1, Error): Error: loading /m Caused by: not a GGUF file"
        );
    }
}
