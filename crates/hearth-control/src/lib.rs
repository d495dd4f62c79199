//! hearth's control plane: the services that validate and change Models, Deployments and
//! DeployedModels, authentication, the artifact store and signed upload URLs, and the
//! versioned records the store keeps. The runtime (hearth-runtime) reads specs and writes
//! statuses through [`observe`].
//!
//! Services take parsed wire types and return resources or a `ControlError`; they never see
//! HTTP. Every rule about resources (which fields may be set, which transitions are legal,
//! what must exist first) lives here and nowhere else.

pub mod auth;
pub mod deployed_models;
pub mod deployments;
pub mod error;
pub mod hot_load;
mod imports;
mod lease;
pub use lease::{DeploymentDemand, GatewayDemand};
pub mod listing;
mod loras;
pub mod models;
pub mod observe;
mod patch;
pub mod quotas;
pub mod rates;
mod records;
pub mod routing;
pub mod schedules;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use hearth_store::Store;

pub use auth::Principal;
pub use error::{ControlError, Result};
pub use hearth_artifacts::{ArtifactStore, UrlSigner};
pub use listing::{ListPage, ListRequest};

/// The settings the control plane needs; the binary fills them from flags.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Where clients reach this server; signed URLs point here.
    pub public_url: String,
    /// How long a signed upload or download URL stays valid.
    pub signed_url_ttl: Duration,
    /// How long a soft-deleted deployment is kept before it is purged.
    pub purge_delay: Duration,
    /// The Hugging Face Hub (or mirror) that `huggingfaceSource` imports read from.
    pub hf_endpoint: String,
    /// The shortest `scaleToZeroWindow` a deployment may ask for.
    pub min_scale_to_zero_window: Duration,
    /// The ceilings of every account's quotas (`maxValue`).
    pub quotas: quotas::QuotaLimits,
    /// The local directories a deployment's hot load may read versions from (`file://`
    /// buckets); none by default, since a local path could name another account's files.
    pub hot_load_dirs: Vec<std::path::PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> ControlConfig {
        ControlConfig {
            public_url: "http://127.0.0.1:8080".to_string(),
            signed_url_ttl: Duration::from_secs(3600),
            purge_delay: Duration::from_secs(7 * 24 * 3600),
            hf_endpoint: "https://huggingface.co".to_string(),
            min_scale_to_zero_window: Duration::from_secs(deployments::MIN_SCALE_TO_ZERO_WINDOW),
            quotas: quotas::QuotaLimits::default(),
            hot_load_dirs: Vec::new(),
        }
    }
}

/// The handle every request goes through: cheap to clone, shared by all handlers.
#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) artifacts: ArtifactStore,
    pub(crate) signer: UrlSigner,
    pub(crate) config: ControlConfig,
    /// Fetches imported models' files. No overall timeout: a checkpoint may take an hour; a
    /// stalled transfer is caught by the read timeout instead.
    pub(crate) http: reqwest::Client,
    pub(crate) imports: imports::Imports,
    /// Signalled when a deployment or a loaded addon changes, so the reconciler acts now
    /// rather than at its next tick.
    pub(crate) changes: Arc<tokio::sync::Notify>,
    /// What changed since the reconciler last asked ([`ControlPlane::take_changes`]).
    pub(crate) changed_keys: Arc<std::sync::Mutex<observe::Changed>>,
    /// Inference requests and tokens per account, against the rate quotas.
    pub(crate) rates: Arc<rates::Rates>,
    /// One lock per account, held from a quota's check to the write it guards.
    pub(crate) admissions: quotas::Admissions,
}

impl ControlPlane {
    /// Builds the control plane over a store, reading (or creating, once) the URL-signing key
    /// from the store so every gateway on the same store signs alike and URLs survive restarts.
    pub async fn new(store: Arc<dyn Store>, artifacts: ArtifactStore, config: ControlConfig) -> Result<ControlPlane> {
        let candidate: [u8; 32] = rand::random();
        let key = store.secret_or_init("url-signing-key", &candidate).await?;
        let signer = UrlSigner::new(key, config.public_url.clone());
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(ControlError::internal)?;
        let control = ControlPlane {
            store,
            artifacts,
            signer,
            config,
            http,
            imports: Arc::default(),
            changes: Arc::default(),
            changed_keys: Arc::default(),
            rates: Arc::default(),
            admissions: Arc::default(),
        };
        control.migrate_records().await?;
        control.sweep_uploads().await?;
        Ok(control)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// Wakes the reconciler: the desired state of `deployment` changed (`None`: of any
    /// deployment, as far as the caller knows). A wake with no reconciler waiting is kept for
    /// its next wait, so none is lost.
    pub(crate) fn changed(&self, deployment: Option<observe::DeploymentKey>) {
        if let Ok(mut c) = self.changed_keys.lock() {
            match deployment {
                Some(k) => {
                    c.keys.insert(k);
                }
                None => c.all = true,
            }
        }
        self.changes.notify_one();
    }

    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Admits one inference request of `account` under its rate quotas, or refuses it with
    /// RESOURCE_EXHAUSTED and how long to wait.
    pub async fn admit_inference(&self, account: &str) -> Result<()> {
        let (rpm, tpm) = self.rate_limits(account).await?;
        self.rates.admit(account, rpm, tpm, std::time::Instant::now()).map_err(|l| {
            let secs = l.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            ControlError::RateLimited {
                message: format!(
                    "account {account} is over its quota {} ({} per minute); retry in {secs} s",
                    l.quota, l.limit
                ),
                retry_after_secs: secs,
            }
        })
    }

    /// Charges the tokens an admitted request used, once its response has ended.
    pub fn charge_inference_tokens(&self, account: &str, tokens: u64) {
        self.rates.charge(account, tokens);
    }
}
