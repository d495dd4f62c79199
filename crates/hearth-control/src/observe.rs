//! The control plane as the runtime sees it: which deployments exist, what each one's spec
//! asks for and what its status last said, which addons are loaded onto it and where their
//! files are. The runtime's reconciler writes status rows only, and only through here; the
//! API's services write spec rows only. So neither ever overwrites the other.

use std::path::PathBuf;
use std::sync::Arc;

use hearth_api::names::{Collection, ResourceName};

use crate::error::{ControlError, Result};
use crate::records::deployed_model::DeployedModelSpec;
pub use crate::records::deployed_model::{AddonPhase, DeployedModelStatus};
pub use crate::records::deployment::{
    Autoscaling, DeploymentSpec, DeploymentStatus, Failure, HotLoadProblem, HotLoadSpec, Phase, Problem, ScaleRequest,
};
use crate::records::model::ModelRecord;
use crate::records::{decode_body, Doc, DEPLOYMENTS};
use crate::ControlPlane;

/// The deployments whose desired state changed through the API, for the reconciler to act on
/// first; `all` when a change may concern any (a batch of expiries, say).
#[derive(Debug, Default)]
pub struct Changed {
    pub all: bool,
    pub keys: std::collections::HashSet<DeploymentKey>,
}

/// A deployment's identity: `accounts/{account}/deployments/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeploymentKey {
    pub account: String,
    pub id: String,
}

impl DeploymentKey {
    pub fn new(account: &str, id: &str) -> DeploymentKey {
        DeploymentKey { account: account.to_string(), id: id.to_string() }
    }

    /// `accounts/{account}/deployments/{id}`.
    pub fn name(&self) -> String {
        ResourceName::new(&self.account, Collection::Deployments, &self.id).to_string()
    }

    pub fn from_name(name: &str) -> Option<DeploymentKey> {
        ResourceName::parse(name, Collection::Deployments)
            .ok()
            .map(|rn| DeploymentKey { account: rn.account, id: rn.id })
    }
}

impl std::fmt::Display for DeploymentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// How a model's chats are rendered, beyond its checkpoint (see `chat_settings`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatSettings {
    pub template: Option<String>,
    pub system_prompt: Option<String>,
}

/// An addon loaded onto a deployment, as the runtime needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Addon {
    /// The DeployedModel's account and id (its status row).
    pub account: String,
    pub id: String,
    /// The addon model's name, `accounts/{a}/models/{m}`: what replicas load it as.
    pub model: String,
    /// Where its files are in the artifact store.
    pub dir: PathBuf,
    pub status: DeployedModelStatus,
}

impl ControlPlane {
    /// Every deployment in the store, read from the keys alone: a row that cannot be parsed
    /// is listed too, so its replicas are never mistaken for orphans.
    pub async fn deployment_keys(&self) -> Result<Vec<DeploymentKey>> {
        Ok(self
            .store
            .list_all(DEPLOYMENTS)
            .await?
            .into_iter()
            .map(|r| DeploymentKey { account: r.account, id: r.id })
            .collect())
    }

    /// A deployment's spec and status. `None` when it no longer exists (purged); an error
    /// (DATA_LOSS) when its spec cannot be read.
    pub async fn deployment_for_runtime(
        &self,
        key: &DeploymentKey,
    ) -> Result<Option<(DeploymentSpec, DeploymentStatus)>> {
        let Some(rec) = self.store.get(DEPLOYMENTS, &key.account, &key.id).await? else { return Ok(None) };
        let spec = decode_body::<DeploymentSpec>(&rec.body)
            .map_err(|why| crate::records::unreadable(DEPLOYMENTS, &key.account, &key.id, why))?;
        // A status row that cannot be read is rebuilt by the next observation.
        let status = self.load::<DeploymentStatus>(&key.account, &key.id).await.ok().flatten().map(|d| d.value);
        Ok(Some((spec, status.unwrap_or_default())))
    }

    /// Changes a deployment's status row (creating it if missing); writes only when `change`
    /// changed something. Returns the status as written.
    pub async fn observe_deployment(
        &self,
        key: &DeploymentKey,
        change: impl FnMut(&mut DeploymentStatus),
    ) -> Result<DeploymentStatus> {
        self.upsert(&key.account, &key.id, change).await
    }

    /// The addons loaded onto a deployment, with their status.
    pub async fn addons_for_runtime(&self, key: &DeploymentKey) -> Result<Vec<Addon>> {
        let name = key.name();
        let specs: Vec<Doc<DeployedModelSpec>> = self
            .load_all::<DeployedModelSpec>(&key.account)
            .await?
            .into_iter()
            .filter(|d| d.value.deployment == name)
            .collect();
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let dir = match self.model_files(&spec.value.model).await {
                Ok(dir) => dir,
                Err(e) => {
                    // Not synced this time; the addon stays DEPLOYING, and the next pass retries.
                    tracing::warn!(addon = %spec.value.model, error = %e, "the addon's files are not available here");
                    continue;
                }
            };
            let status = self.load::<DeployedModelStatus>(&key.account, &spec.id).await.ok().flatten().map(|d| d.value);
            out.push(Addon {
                account: key.account.clone(),
                id: spec.id,
                model: spec.value.model,
                dir,
                status: status.unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// Changes a loaded addon's status row, unless the addon was unloaded meanwhile.
    pub async fn observe_addon(
        &self,
        account: &str,
        id: &str,
        change: impl FnMut(&mut DeployedModelStatus),
    ) -> Result<()> {
        if self.load::<DeployedModelSpec>(account, id).await?.is_none() {
            return Ok(());
        }
        self.upsert(account, id, change).await.map(|_| ())
    }

    /// The deployments that have a direct route.
    pub async fn direct_routes(&self) -> Result<Vec<DeploymentKey>> {
        let mut out = Vec::new();
        for rec in self.store.list_all(DEPLOYMENTS).await? {
            let Ok(spec) = decode_body::<DeploymentSpec>(&rec.body) else { continue };
            if spec.is_deleted() {
                continue;
            }
            if spec.direct_route_key_hashes.is_some() {
                out.push(DeploymentKey { account: rec.account, id: rec.id });
            }
        }
        Ok(out)
    }

    /// Whether `key` opens the direct route of `deployment` now: read from the store on every
    /// request, so a key removed from the list is refused at once.
    pub async fn direct_route_admits(&self, deployment: &DeploymentKey, key: &str) -> Result<bool> {
        let spec: Option<Doc<DeploymentSpec>> = self.load(&deployment.account, &deployment.id).await?;
        let hash = crate::auth::hash_key(key);
        Ok(spec.is_some_and(|s| {
            !s.value.is_deleted() && s.value.direct_route_key_hashes.as_ref().is_some_and(|h| h.contains(&hash))
        }))
    }

    /// A deployment's status row, when it has one.
    pub async fn deployment_status(&self, key: &DeploymentKey) -> Result<Option<DeploymentStatus>> {
        Ok(self.load::<DeploymentStatus>(&key.account, &key.id).await?.map(|d| d.value))
    }

    /// Records where a deployment's direct route listens (`directRouteHandle`).
    pub async fn observe_direct_route(&self, key: &DeploymentKey, handle: Option<String>) -> Result<()> {
        self.upsert::<DeploymentStatus, _>(&key.account, &key.id, |s| s.direct_route_handle = handle.clone())
            .await
            .map(|_| ())
    }

    /// How a base model's replicas render chats: its `conversationConfig` (the chat template
    /// that replaces the checkpoint's, and the system message for conversations without one).
    /// A model that cannot be read serves as its checkpoint says.
    pub async fn chat_settings(&self, model: &str) -> ChatSettings {
        let Ok(rn) = ResourceName::parse(model, Collection::Models) else { return ChatSettings::default() };
        let Ok(Some(doc)) = self.load::<ModelRecord>(&rn.account, &rn.id).await else { return ChatSettings::default() };
        let c = doc.value.model.conversation_config.unwrap_or_default();
        let set = |v: Option<String>| v.filter(|v| !v.is_empty());
        ChatSettings { template: set(c.template), system_prompt: set(c.system) }
    }

    /// The directory of a model's files on this gateway, for `accounts/{a}/models/{m}`; with
    /// an object-store artifact store, a validated model is fetched into it first (once).
    pub async fn model_files(&self, model: &str) -> Result<PathBuf> {
        let rn = ResourceName::parse(model, Collection::Models)
            .map_err(|e| ControlError::InvalidArgument(format!("{model} is not a model name: {e}")))?;
        Ok(self.artifacts.local_dir(&rn.account, &rn.id).await?)
    }

    /// The bytes of a model's files.
    pub async fn model_bytes(&self, model: &str) -> Result<u64> {
        let rn = ResourceName::parse(model, Collection::Models)
            .map_err(|e| ControlError::InvalidArgument(format!("{model} is not a model name: {e}")))?;
        Ok(self.artifacts.list(&rn.account, &rn.id).await?.iter().map(|(_, n)| n).sum())
    }

    /// A signed URL of a model's file manifest, valid for `ttl`: how a replica that cannot read
    /// the artifact store (a pod) gets the files `model_files` names.
    pub fn replica_files_url(&self, model: &str, ttl: std::time::Duration) -> Option<String> {
        let rn = ResourceName::parse(model, Collection::Models).ok()?;
        let expires = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
        let grant = hearth_artifacts::Grant {
            method: "LIST",
            account: rn.account,
            model: rn.id,
            file: String::new(),
            size: 0,
            expires,
        };
        Some(self.signer.manifest_url(&grant))
    }

    /// Signalled when a deployment or a loaded addon changes, so the runtime acts now rather
    /// than at its next resync; [`ControlPlane::take_changes`] says what changed.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changes.clone()
    }

    /// What changed since the last call: the deployments named, or (`all`) possibly any.
    pub fn take_changes(&self) -> Changed {
        self.changed_keys
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or(Changed { all: true, ..Default::default() })
    }
}

impl From<ControlError> for Problem {
    fn from(e: ControlError) -> Problem {
        Problem::new(e.code(), e.public_message())
    }
}
