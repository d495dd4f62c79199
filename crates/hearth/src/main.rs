//! The `hearth` binary. `hearth serve` runs the gateway: the Gateway control API over an
//! embedded SQLite store (or PostgreSQL) and a local artifact directory. `hearth engine`
//! runs one engine server: a model behind an OpenAI-compatible API. The client commands
//! (`model`, `deployment`, `lora`, `chat`) talk to a gateway over HTTP; they live in `cli/`.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use hearth_control::{ArtifactStore, ControlConfig, ControlPlane};

#[derive(Parser)]
#[command(name = "hearth", version, about = "A self-hostable LLM deployment platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: the Gateway REST API (Models, Deployments, DeployedModels).
    Serve(ServeArgs),
    /// Run one engine server: a model behind an OpenAI-compatible API.
    Engine(EngineArgs),
    /// Print the OpenAPI document of the gateway's API.
    Openapi,
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// Print a shell completion script, e.g. `hearth completions bash > /etc/bash_completion.d/hearth`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeKind {
    Local,
    Kubernetes,
    None,
}

#[derive(clap::Args)]
struct EngineArgs {
    /// The model: a GGUF file, or a Hugging Face directory (config.json, safetensors,
    /// tokenizer.json), or a gateway's signed file-manifest URL (a replica that cannot read the
    /// artifact store: the files are fetched into --artifact-cache and checked first).
    #[arg(long, env = "HEARTH_MODEL")]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "HEARTH_ENGINE_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Compute precision: FP32, BF16 or FP16; unset serves the checkpoint as it is (quantized stays quantized).
    #[arg(long, env = "HEARTH_PRECISION")]
    precision: Option<String>,
    /// Where to compute: cpu, cuda, cuda:N, or auto (the first GPU when this build has the
    /// `cuda` feature and the machine a GPU, else the CPU).
    #[arg(long, env = "HEARTH_DEVICE", default_value = "auto")]
    device: String,
    /// The name requests use in "model"; defaults to the model file's or directory's name.
    #[arg(long, env = "HEARTH_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// What one engine step may process (decode rows plus prefill chunks), in
    /// token-equivalents: a token at position p counts 1 + p / S, where S is the context at
    /// which attention costs as much as the rest of a token's work (estimated from the
    /// model's shape). Bounds each step's time, hence how long a new request can wait.
    #[arg(long, env = "HEARTH_MAX_STEP_TOKENS", default_value_t = 256)]
    max_step_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, env = "HEARTH_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Megabytes of KV cache all running sequences may reserve together.
    #[arg(long, env = "HEARTH_KV_CACHE_MB", default_value_t = 1024)]
    kv_cache_mb: usize,
    /// What the KV cache stores keys and values as: f16 (half the memory, and half the bytes a
    /// decode step reads at a long context), f32 (exact), or auto: f32 for a model whose
    /// weights are all f32, f16 otherwise.
    #[arg(long, env = "HEARTH_KV_CACHE_DTYPE", default_value = "auto", value_parser = ["auto", "f16", "f32"])]
    kv_cache_dtype: String,
    /// The most tokens one request may take, prompt and generation together (a deployment's
    /// maxContextLength); 0 for the model's own context, which it never exceeds.
    #[arg(long, env = "HEARTH_MAX_CONTEXT_LENGTH", default_value_t = 0)]
    max_context_length: usize,
    /// Compute every prompt in full: no prefix cache (by default full KV blocks of earlier
    /// prompts are kept, within the KV memory, and later prompts that begin the same way
    /// start from them).
    #[arg(long, env = "HEARTH_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// Prompt-lookup speculation: look the last N tokens of a sequence up in its context and
    /// check what followed them there as a draft, in the same pass (a deployment's
    /// ngramSpeculationLength). Output is what it would be without; 0 turns it off.
    #[arg(long, env = "HEARTH_NGRAM_SPECULATION", default_value_t = 0)]
    ngram_speculation: usize,
    /// The most tokens one speculation drafts (a deployment's draftTokenCount).
    #[arg(long, env = "HEARTH_DRAFT_TOKENS", default_value_t = 4)]
    draft_tokens: usize,
    /// A draft model for speculation (a deployment's draftModel): a GGUF file or Hugging
    /// Face directory of a model with the same tokenizer, served as it is stored (a Q4_1 file
    /// drafts for the same model in FP32, say). It proposes --draft-tokens tokens per step
    /// that the model verifies in one pass; output is what it would be without.
    #[arg(long, env = "HEARTH_DRAFT_MODEL")]
    draft_model: Option<PathBuf>,
    /// The version the model's weights are, reported in the replica's load figures (a
    /// deployment's hot load starts new replicas on its active version). New versions are
    /// loaded in place through POST /v1/load_model_version.
    #[arg(long)]
    model_version: Option<String>,
    /// A LoRA adapter to load at start, as NAME=PATH (a PEFT directory); repeatable. Requests
    /// select it with "model": NAME.
    #[arg(long = "lora", value_name = "NAME=PATH")]
    loras: Vec<String>,
    /// Megabytes of host memory all loaded LoRA adapters may take together.
    #[arg(long, env = "HEARTH_MAX_LORA_MB", default_value_t = 1024)]
    max_lora_mb: usize,
    /// LoRA adapters kept prepared for compute (least recently used dropped first); on a GPU
    /// also the most distinct adapters one step runs. A deployment's numPeftDeviceCached.
    #[arg(long, env = "HEARTH_MAX_HOT_LORAS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_hot_loras: u32,
    /// The most distinct LoRA adapters one step runs (each adds its weights to the bytes the
    /// step reads).
    #[arg(long, env = "HEARTH_MAX_LORAS_PER_STEP", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_loras_per_step: u32,
    /// Exit when the process that started this one exits (replicas started by a gateway).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// Requests that may wait for a slot; beyond it requests are refused with 429.
    #[arg(long, env = "HEARTH_MAX_WAITING", default_value_t = 1024)]
    max_waiting: usize,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "HEARTH_LOG_JSON")]
    log_json: bool,
    /// Where models, adapters and versions named by manifest URLs are fetched to (a pod's
    /// cache volume); one directory per model content, reused by later starts.
    #[arg(long, env = "HEARTH_ARTIFACT_CACHE", default_value = "/tmp/hearth-artifact-cache")]
    artifact_cache: PathBuf,
    /// The base URL gateways reach this replica at (a pod's `http://$(POD_IP):8080`): with
    /// the key in HEARTH_ENGINE_TOKEN_KEY, the replica's token is derived from it, as the
    /// gateways derive it, where a replica whose address is known before it starts is given
    /// its token outright.
    #[arg(long, env = "HEARTH_ENGINE_ENDPOINT")]
    endpoint: Option<String>,
    /// The token every request but a health check must carry as `Authorization: Bearer`.
    /// Read from the environment only (a command line is visible to every local user); a
    /// gateway sets it for each replica it starts. Unset, the engine is open to anyone who
    /// can reach its address.
    #[arg(skip = std::env::var(hearth_api::replica::TOKEN_ENV).ok().filter(|t| !t.is_empty()))]
    token: Option<String>,
    /// A chat template (Jinja source) to render chats with instead of the checkpoint's; a
    /// replica gets its model's conversationConfig.template here.
    #[arg(long, value_name = "JINJA")]
    chat_template: Option<String>,
    /// The system message for conversations that bring none (a model's conversationConfig.system).
    #[arg(long, value_name = "TEXT")]
    system_prompt: Option<String>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A local directory whose folders deployments may hot-load as model versions
    /// (hotLoadBucketUrl file://...); repeatable, or ':'-separated in the environment. None by
    /// default: a local path could name any file this server can read.
    #[arg(long = "hot-load-dir", env = "HEARTH_HOT_LOAD_DIRS", value_delimiter = ':')]
    hot_load_dirs: Vec<PathBuf>,
    /// Directory for the SQLite database and the artifact store.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "./hearth-data")]
    data_dir: PathBuf,
    /// Where model files live: a local directory (default: artifacts/ in --data-dir), or
    /// s3://BUCKET/PREFIX (S3 or an S3-compatible store: endpoint, region and credentials
    /// from the AWS environment variables) for gateways that share no disk, each caching
    /// files in its --data-dir.
    #[arg(long, env = "HEARTH_ARTIFACT_STORE")]
    artifact_store: Option<String>,
    /// A postgres:// URL moves the store to PostgreSQL; unset means SQLite in --data-dir.
    #[arg(long, env = "HEARTH_DATABASE_URL")]
    database_url: Option<String>,
    /// Create this API key at start if it does not exist yet (needs --account).
    #[arg(long, env = "HEARTH_API_KEY", requires = "account")]
    api_key: Option<String>,
    /// The account --api-key belongs to; created at start if it does not exist yet.
    #[arg(long, env = "HEARTH_ACCOUNT", requires = "api_key")]
    account: Option<String>,
    /// More KEY:ACCOUNT pairs to create at start (repeatable).
    #[arg(long = "extra-api-key", value_name = "KEY:ACCOUNT")]
    extra_api_keys: Vec<String>,
    /// The URL clients use to reach this server; signed upload URLs point here. Defaults to
    /// http://<listen address>.
    #[arg(long, env = "HEARTH_PUBLIC_URL")]
    public_url: Option<String>,
    /// Seconds a signed upload or download URL stays valid.
    #[arg(long, env = "HEARTH_SIGNED_URL_TTL", default_value_t = 3600)]
    signed_url_ttl: u64,
    /// Seconds a soft-deleted deployment is kept (and can be undeleted) before it is purged.
    #[arg(long, env = "HEARTH_PURGE_DELAY", default_value_t = 7 * 24 * 3600)]
    purge_delay: u64,
    /// Seconds: the shortest autoscalingPolicy.scaleToZeroWindow a deployment may ask for (the
    /// hosted service's 300; lower it for development and tests).
    #[arg(long, env = "HEARTH_MIN_SCALE_TO_ZERO_WINDOW", default_value_t = 300)]
    min_scale_to_zero_window: u64,
    /// Seconds an inference request for a deployment with no ready replica waits for one
    /// (waking it from zero) before it is answered 503.
    #[arg(long, env = "HEARTH_WAKE_TIMEOUT", default_value_t = 120)]
    wake_timeout: u64,
    /// Where deployments run: `local` starts `hearth engine` replicas as child processes;
    /// `kubernetes` runs them as pods (in-cluster service account or KUBECONFIG; see the
    /// --kube-* settings and docs/kubernetes.md); `none` runs no replicas (a
    /// control-plane-only gateway: deployments are stored and answered for, never started).
    #[arg(long, env = "HEARTH_RUNTIME", value_enum, default_value_t = RuntimeKind::Local)]
    runtime: RuntimeKind,
    /// The namespace replica pods are made in; unset, the kubeconfig's or the service
    /// account's.
    #[arg(long, env = "HEARTH_KUBE_NAMESPACE", default_value = "")]
    kube_namespace: String,
    /// The image replica pods run (one with `hearth` on its PATH; the gateway's own image).
    #[arg(long, env = "HEARTH_KUBE_IMAGE", default_value = "hearth:latest")]
    kube_image: String,
    /// The port the engine listens on in each replica pod.
    #[arg(long, env = "HEARTH_KUBE_ENGINE_PORT", default_value_t = 8080)]
    kube_engine_port: u16,
    /// The CPU each replica pod requests, as a Kubernetes quantity.
    #[arg(long, env = "HEARTH_KUBE_ENGINE_CPU", default_value = "1")]
    kube_engine_cpu: String,
    /// The extended resource a deployment's acceleratorCount is asked for in.
    #[arg(long, env = "HEARTH_KUBE_GPU_RESOURCE", default_value = "nvidia.com/gpu")]
    kube_gpu_resource: String,
    /// The node labels the pods of an acceleratorType must run on, as TYPE=KEY=VALUE (e.g.
    /// NVIDIA_H100_80GB=cloud.google.com/gke-accelerator=nvidia-h100-80gb); repeatable, one
    /// label each.
    #[arg(
        long = "kube-node-selector",
        env = "HEARTH_KUBE_NODE_SELECTORS",
        value_delimiter = ',',
        value_name = "TYPE=KEY=VALUE"
    )]
    kube_node_selectors: Vec<String>,
    /// The URL replica pods reach the gateways at to fetch model files (the gateways'
    /// Service); defaults to --public-url.
    #[arg(long, env = "HEARTH_KUBE_GATEWAY_URL")]
    kube_gateway_url: Option<String>,
    /// Seconds the runtime lease (which gateway runs the reconciler) lasts without a renewal:
    /// every resync of the reconciler renews it; a gateway that makes no resync for this long
    /// hands the store to another. A local-runtime gateway then stops its own replicas; a
    /// kubernetes one follows the new holder. Default 30 (local), 10 (kubernetes).
    #[arg(long, env = "HEARTH_RUNTIME_LEASE_TTL", value_parser = clap::value_parser!(u64).range(1..))]
    runtime_lease_ttl: Option<u64>,
    /// Milliseconds between the reconciler's resyncs: an idle deployment is looked at again
    /// this often (one in transition sooner; any change through the API at once).
    #[arg(long, env = "HEARTH_RECONCILE_INTERVAL_MS", default_value_t = 1000)]
    reconcile_interval_ms: u64,
    /// The address deployments' direct routes listen on (`directRouteType: INTERNET`), each
    /// on a port of its own that its `directRouteHandle` gives.
    #[arg(long, env = "HEARTH_DIRECT_ROUTE_HOST", default_value = "127.0.0.1")]
    direct_route_host: std::net::IpAddr,
    /// The ceiling (maxValue) of a quota for every account, as ID=N: models, deployments,
    /// replicas, accelerators-<type>, stored-bytes, loaded-addons, requests-per-minute,
    /// tokens-per-minute. Repeatable; quotas not named keep their defaults (docs/quotas.md).
    #[arg(long = "quota", value_name = "ID=N")]
    quotas: Vec<String>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "HEARTH_LOG_JSON")]
    log_json: bool,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Engine(args) => engine(args).await,
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&hearth_server::openapi::document())?);
            Ok(())
        }
        // Exiting here skips waiting for the runtime's blocking threads, one of which may be
        // parked reading the terminal (the chat session).
        Command::Client(cmd) => std::process::exit(cli::run(cmd).await),
        Command::Completions { shell } => {
            // Generated into memory first: the generator panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hearth", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let db_url = match &args.database_url {
        Some(url) => url.clone(),
        None => args.data_dir.join("hearth.db").to_string_lossy().into_owned(),
    };
    let store = hearth_store::open(&db_url).await.context("opening the store")?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let mut quotas = hearth_control::quotas::QuotaLimits::default();
    for setting in &args.quotas {
        quotas.set(setting).map_err(|e| anyhow::anyhow!("--quota {setting}: {e}"))?;
    }
    let config = ControlConfig {
        quotas,
        public_url: args.public_url.clone().unwrap_or_else(|| format!("http://{local}")),
        signed_url_ttl: Duration::from_secs(args.signed_url_ttl),
        purge_delay: Duration::from_secs(args.purge_delay),
        min_scale_to_zero_window: Duration::from_secs(args.min_scale_to_zero_window),
        // As with the Hugging Face tools, so a mirror (or a test's local hub) can stand in.
        hf_endpoint: std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".to_string()),
        hot_load_dirs: args.hot_load_dirs.clone(),
    };
    let artifacts = match args.artifact_store.as_deref() {
        None | Some("") => ArtifactStore::new(args.data_dir.join("artifacts")),
        Some(url) if url.contains("://") => {
            // The bucket holds the files; this gateway's directory caches them.
            let mirror = hearth_artifacts::mirror::Mirror::parse(url).map_err(|e| anyhow::anyhow!("{e}"))?;
            ArtifactStore::new(args.data_dir.join("artifacts")).with_mirror(mirror)
        }
        Some(dir) => ArtifactStore::new(dir),
    };
    let control = ControlPlane::new(store, artifacts, config).await.map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut keys: Vec<(String, String)> = Vec::new();
    if let (Some(key), Some(account)) = (&args.api_key, &args.account) {
        keys.push((key.clone(), account.clone()));
    }
    for pair in &args.extra_api_keys {
        let Some((key, account)) = pair.rsplit_once(':') else {
            bail!("--extra-api-key expects KEY:ACCOUNT, got {pair:?}");
        };
        keys.push((key.to_string(), account.to_string()));
    }
    for (key, account) in &keys {
        control.bootstrap_key(account, key).await.map_err(|e| anyhow::anyhow!("--api-key for {account}: {e}"))?;
    }

    let resumed = control.resume_imports().await.map_err(|e| anyhow::anyhow!("resuming imports: {e}"))?;
    if resumed > 0 {
        tracing::info!(resumed, "unfinished model imports started again");
    }

    // Deployments past their expireTime are deleted, and soft-deleted ones past their purge
    // time removed, in the background.
    let purger = control.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Err(e) = purger.expire_deployments().await {
                tracing::warn!(error = %e, "deleting deployments past their expireTime failed; will retry");
            }
            if let Err(e) = purger.purge_expired_deployments().await {
                tracing::warn!(error = %e, "purging deleted deployments failed; will retry");
            }
        }
    });

    let fleet = std::sync::Arc::new(hearth_runtime::Fleet::default());
    let credentials = hearth_runtime::ReplicaCredentials::from_store(&control)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading the replicas' token key")?;
    let mut lease_holder = None;
    if args.runtime != RuntimeKind::None {
        // One gateway manages a store's replicas; it is named by host and data directory, so
        // this same local-runtime gateway restarted takes its lease straight back.
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let dir = std::fs::canonicalize(&args.data_dir).unwrap_or_else(|_| args.data_dir.clone());
        let mut holder = format!("{}:{}", if host.is_empty() { "localhost" } else { &host }, dir.display());
        if args.runtime == RuntimeKind::Kubernetes {
            // Gateways of one installation may share a host and a directory: each is its own.
            holder.push_str(&format!(":{}", std::process::id()));
        }
        // Several gateways share pods: one runs the reconciler, another takes over within
        // about this long of its death; the others follow. Local replicas are one gateway's
        // children, so a second local-runtime gateway on a store is refused here.
        let lease_ttl = Duration::from_secs(args.runtime_lease_ttl.unwrap_or(match args.runtime {
            RuntimeKind::Kubernetes => hearth_runtime::controller::SHARED_LEASE_TTL.as_secs(),
            _ => hearth_runtime::controller::LEASE_TTL.as_secs(),
        }));
        if args.runtime == RuntimeKind::Local {
            control
                .hold_runtime_lease(&holder, lease_ttl)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("taking the store's runtime lease")?;
        }
        let replicas: std::sync::Arc<dyn hearth_runtime::ReplicaApi> =
            std::sync::Arc::new(hearth_runtime::HttpReplicas::new(credentials.clone()));
        // The store's lease elects the reconciler's gateway, or on Kubernetes a Lease object.
        let mut election: std::sync::Arc<dyn hearth_runtime::election::Election> =
            std::sync::Arc::new(hearth_runtime::election::StoreElection(control.clone()));
        let runtime: std::sync::Arc<dyn hearth_runtime::Runtime> = if args.runtime == RuntimeKind::Kubernetes {
            let settings = hearth_runtime::kubernetes::KubernetesSettings {
                namespace: args.kube_namespace.clone(),
                image: args.kube_image.clone(),
                port: args.kube_engine_port,
                gateway_url: args
                    .kube_gateway_url
                    .clone()
                    .or_else(|| args.public_url.clone())
                    .unwrap_or_else(|| format!("http://{local}")),
                cpu: args.kube_engine_cpu.clone(),
                gpu_resource: args.kube_gpu_resource.clone(),
                node_selectors: node_selectors(&args.kube_node_selectors)?,
            };
            let kube = hearth_runtime::kubernetes::KubernetesRuntime::connect(
                settings,
                control.clone(),
                replicas.clone(),
                &credentials,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("starting the kubernetes runtime")?;
            election = std::sync::Arc::new(kube.election());
            std::sync::Arc::new(kube)
        } else {
            // Replicas are `hearth engine` children of this process, started by the reconciler.
            let binary = std::env::current_exe().context("locating the hearth binary to run replicas")?;
            std::sync::Arc::new(hearth_runtime::local::LocalRuntime::new(
                binary,
                control.clone(),
                replicas.clone(),
                credentials.clone(),
            ))
        };
        let ctx = hearth_runtime::Context::new(
            control.clone(),
            runtime,
            replicas,
            fleet.clone(),
            std::sync::Arc::new(hearth_runtime::SystemClock),
        );
        let controller = hearth_runtime::Controller::new(
            std::sync::Arc::new(ctx),
            holder.clone(),
            lease_ttl,
            Duration::from_millis(args.reconcile_interval_ms),
        )
        .with_election(election.clone());
        tokio::spawn(controller.run());
        lease_holder = Some((holder, election));
    }

    let inference = hearth_server::Inference::new(fleet, credentials, Duration::from_secs(args.wake_timeout));
    tokio::spawn(hearth_server::serve_direct_routes(control.clone(), inference.clone(), args.direct_route_host));
    let app = hearth_server::gateway_router_with(control.clone(), inference);
    tracing::info!(
        listen = %local,
        store = if args.database_url.is_some() { "postgres" } else { "sqlite" },
        runtime = match args.runtime {
            RuntimeKind::Local => "local",
            RuntimeKind::Kubernetes => "kubernetes",
            RuntimeKind::None => "none",
        },
        data_dir = %args.data_dir.display(),
        "hearth gateway ready"
    );
    let served = axum_serve(listener, app).await;
    if let Some((holder, election)) = lease_holder {
        // A clean stop hands the store over at once rather than when the lease expires.
        if let Err(e) = election.release(&holder).await {
            tracing::warn!(error = %e, "could not release the runtime lease; it expires on its own");
        }
    }
    served
}

/// `--kube-node-selector TYPE=KEY=VALUE`s, by accelerator type; a type that hearth does not
/// know is refused rather than never matched.
fn node_selectors(
    given: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>> {
    let mut out: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> = Default::default();
    for s in given {
        let mut parts = s.splitn(3, '=');
        let (Some(kind), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("--kube-node-selector expects TYPE=KEY=VALUE, got {s:?}");
        };
        if !hearth_api::resources::AcceleratorType::ALL.iter().any(|t| t.as_str() == kind) {
            bail!("--kube-node-selector {s:?}: {kind:?} is not an acceleratorType");
        }
        out.entry(kind.to_string()).or_default().insert(key.to_string(), value.to_string());
    }
    Ok(out)
}

async fn engine(mut args: EngineArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    // A replica whose address was not known when it was made (a pod) derives its token from
    // the replicas' key and the address it was given, as every gateway does.
    if args.token.is_none() {
        if let Ok(key) = std::env::var(hearth_api::replica::TOKEN_KEY_ENV) {
            let endpoint = args.endpoint.as_deref().with_context(|| {
                format!(
                    "{} is set: --endpoint must say where gateways reach this replica",
                    hearth_api::replica::TOKEN_KEY_ENV
                )
            })?;
            let key = hex::decode(key.trim())
                .with_context(|| format!("{} must be hexadecimal", hearth_api::replica::TOKEN_KEY_ENV))?;
            args.token = Some(hearth_runtime::ReplicaCredentials::new(key).token(endpoint));
        }
    }
    // Files named by manifest URLs are fetched (once per cache) before anything loads.
    let fetcher = reqwest::Client::new();
    let cache = args.artifact_cache.clone();
    let local = |p: PathBuf| {
        let (fetcher, cache) = (fetcher.clone(), cache.clone());
        async move {
            let shown = p.to_string_lossy().split('?').next().unwrap_or_default().to_string();
            hearth_artifacts::replica_files::local_files(&fetcher, &p.to_string_lossy(), &cache)
                .await
                .with_context(|| format!("fetching the files of {shown}"))
        }
    };
    args.model = local(args.model.clone()).await?;
    if let Some(d) = args.draft_model.take() {
        args.draft_model = Some(local(d).await?);
    }
    let precision = hearth_engine::Precision::parse(args.precision.as_deref().unwrap_or(""))?;
    let served = match args.served_model_name {
        Some(n) => n,
        None => args.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string()),
    };
    let device = hearth_engine::select_device(&args.device)?;
    let started = std::time::Instant::now();
    let path = args.model.clone();
    let on = device.clone();
    let loaded = tokio::task::spawn_blocking(move || hearth_engine::load(&path, precision, &on))
        .await?
        .with_context(|| format!("loading {}", args.model.display()))?;
    let c = &loaded.model.config;
    tracing::info!(
        model = %args.model.display(),
        device = %hearth_engine::device_name(&device),
        architecture = c.architecture.name(),
        layers = c.num_hidden_layers,
        hidden = c.hidden_size,
        context = c.max_position_embeddings,
        weight_mb = loaded.model.weight_bytes() / (1 << 20),
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let config = hearth_engine::EngineConfig {
        max_step_tokens: args.max_step_tokens,
        max_running: args.max_running,
        kv_cache_bytes: args.kv_cache_mb << 20,
        kv_dtype: hearth_engine::KvDtype::parse(&args.kv_cache_dtype)?,
        max_waiting: args.max_waiting,
        adapter_bytes: args.max_lora_mb << 20,
        max_hot_adapters: args.max_hot_loras as usize,
        max_context: args.max_context_length,
        max_step_adapters: args.max_loras_per_step as usize,
        prefix_cache: !args.no_prefix_cache,
        ngram_speculation: args.ngram_speculation,
        draft_tokens: args.draft_tokens,
        ..hearth_engine::EngineConfig::default()
    };
    // A template of the model's own must compile, or the replica does not start (and its
    // deployment fails, saying why).
    let chat_template = match &args.chat_template {
        Some(source) => Some(
            hearth_engine::chat::ChatTemplate::new(source, loaded.tokenizer.bos_token(), loaded.tokenizer.eos_token())
                .context("--chat-template")?,
        ),
        None => None,
    };
    let drafter = match args.draft_model.clone() {
        Some(path) => {
            let on = device.clone();
            let shown = path.display().to_string();
            let d =
                tokio::task::spawn_blocking(move || hearth_engine::load(&path, hearth_engine::Precision::Native, &on))
                    .await?
                    .with_context(|| format!("loading the draft model {shown}"))?;
            tracing::info!(draft = %shown, weight_mb = d.model.weight_bytes() / (1 << 20), "draft model loaded");
            Some(
                hearth_engine::speculate::DraftModel::new(d.model, &d.tokenizer, &loaded.tokenizer)
                    .with_context(|| format!("--draft-model {shown}"))?,
            )
        }
        None => None,
    };
    let engine = hearth_engine::Engine::start_with_draft(loaded.model, loaded.tokenizer, config, drafter);
    engine.set_model_version(args.model_version.clone());
    for spec in &args.loras {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--lora expects NAME=PATH, got {spec:?}");
        };
        let info =
            engine.load_adapter(name, std::path::Path::new(path), None).with_context(|| format!("--lora {spec}"))?;
        tracing::info!(adapter = name, modules = info.modules_patched, ranks = ?info.ranks, bytes = info.bytes, version = %info.version, "adapter ready");
    }
    if args.exit_with_parent {
        // A replica must not outlive the gateway that manages it, even one killed with -9:
        // an orphan would hold its port and duplicate the replica the next gateway starts.
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                // No log line: stderr is a pipe to the dead gateway, and a failed write must
                // not stop this thread before it ends the process.
                std::process::exit(0);
            }
        });
    }
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    if args.token.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "no {} is set: anyone who can reach this address can use the engine and its admin routes",
            hearth_api::replica::TOKEN_ENV
        );
    }
    tracing::info!(listen = %listener.local_addr()?, served_model_name = %served, authenticated = args.token.is_some(), "hearth engine ready");
    // A Hugging Face checkpoint's generation_config.json gives the defaults of unset parameters.
    let sampling =
        if args.model.is_dir() { hearth_formats::sampling_defaults(&args.model) } else { Default::default() };
    if !sampling.is_empty() {
        tracing::info!(defaults = ?sampling, "sampling defaults from generation_config.json");
    }
    let opts = hearth_server::ServerOptions {
        token: args.token,
        chat_template,
        system_prompt: args.system_prompt,
        sampling_defaults: hearth_server::SamplingDefaults::from_map(&sampling),
        artifact_cache: Some(args.artifact_cache.clone()),
        // New versions of the model are read as the model was: same precision, same device.
        loader: Some(std::sync::Arc::new(move |path: &std::path::Path| hearth_engine::load(path, precision, &device))),
    };
    axum_serve(listener, hearth_server::engine_router(engine, served, opts)).await
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> anyhow::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            // Ctrl-C or SIGTERM: stop accepting, finish what is in flight, and let the
            // runtime stop its replicas on the way out.
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            tracing::info!("shutting down");
        })
        .await
        .context("serving HTTP")
}
