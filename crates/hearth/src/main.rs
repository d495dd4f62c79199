//! The `hearth` binary. `hearth serve` runs the gateway: the Gateway control API over an
//! embedded SQLite store (or PostgreSQL) and a local artifact directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
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
    /// Print the OpenAPI document of the gateway's API.
    Openapi,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HEARTH_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the SQLite database and the artifact store.
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "./hearth-data")]
    data_dir: PathBuf,
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
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&hearth_server::openapi::document())?);
            Ok(())
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
    let config = ControlConfig {
        public_url: args.public_url.clone().unwrap_or_else(|| format!("http://{local}")),
        signed_url_ttl: Duration::from_secs(args.signed_url_ttl),
        purge_delay: Duration::from_secs(args.purge_delay),
    };
    let artifacts = ArtifactStore::new(args.data_dir.join("artifacts"));
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

    // Soft-deleted deployments past their purge time are removed in the background.
    let purger = control.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = purger.purge_expired_deployments().await {
                tracing::warn!(error = %e, "purging deleted deployments failed; will retry");
            }
        }
    });

    let app = hearth_server::gateway_router(control);
    tracing::info!(listen = %local, store = if args.database_url.is_some() { "postgres" } else { "sqlite" }, data_dir = %args.data_dir.display(), "hearth gateway ready");
    axum_serve(listener, app).await
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) -> anyhow::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
        .await
        .context("serving HTTP")
}
