//! Quotas (`/v1/accounts/{account}/quotas`): per-account limits on what an account may hold
//! and use, checked wherever it would grow, so one key cannot fill a machine with models or
//! replicas.
//!
//! Every account has every quota. Its `maxValue` is the server's ceiling (a generous default,
//! or the operator's `--quota ID=N`); its `value`, the limit enforced, is the ceiling unless
//! the account lowered it with an update. `usage` is computed live from what is stored (or,
//! for the inference rates, from the gateway's rate limiter), never kept as a counter that
//! could drift.
//!
//! | quota | counts | checked at |
//! | --- | --- | --- |
//! | `models` | models | model create |
//! | `deployments` | deployments not deleted | deployment create, undelete |
//! | `replicas` | `maxReplicaCount` summed over deployments not deleted: what the autoscaler may reach | deployment create, update, undelete (scaling stays within `maxReplicaCount`) |
//! | `accelerators-<type>` | `maxReplicaCount × acceleratorCount` of the deployments with that `acceleratorType` | as `replicas` |
//! | `stored-bytes` | bytes of every model file | upload endpoint (the announced sizes), import |
//! | `loaded-addons` | loaded LoRA addons (deployed models) | load |
//! | `requests-per-minute`, `tokens-per-minute` | inference through this gateway (see `rates`) | each inference request |
//!
//! On one gateway a check and the write it guards are one step: both happen under the
//! account's admission lock, so requests racing for the last unit get it once. Gateways on one
//! store do not share that lock: two of them racing for the last unit can both pass.

use std::collections::BTreeMap;

use chrono::Utc;
use hearth_api::resources::{AcceleratorType, Int64, Quota};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::auth::Principal;
use crate::error::{ControlError, Result};
use crate::listing::{paginate, render, ListPage, ListRequest, Listable};
use crate::records::deployed_model::DeployedModelSpec;
use crate::records::deployment::DeploymentSpec;
use crate::records::{Doc, Record, MODELS};
use crate::ControlPlane;

/// One quota of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaId {
    Models,
    Deployments,
    Replicas,
    Accelerators(AcceleratorType),
    StoredBytes,
    LoadedAddons,
    RequestsPerMinute,
    TokensPerMinute,
}

impl QuotaId {
    /// Every quota, in the order lists show them.
    pub fn all() -> Vec<QuotaId> {
        let mut v = vec![
            QuotaId::Models,
            QuotaId::Deployments,
            QuotaId::Replicas,
            QuotaId::StoredBytes,
            QuotaId::LoadedAddons,
            QuotaId::RequestsPerMinute,
            QuotaId::TokensPerMinute,
        ];
        v.extend(
            AcceleratorType::ALL
                .iter()
                .filter(|t| **t != AcceleratorType::Unspecified)
                .map(|t| QuotaId::Accelerators(*t)),
        );
        v
    }

    /// The quota's id in its resource name: `replicas`, `accelerators-nvidia-h100-80gb`.
    pub fn id(self) -> String {
        match self {
            QuotaId::Models => "models".into(),
            QuotaId::Deployments => "deployments".into(),
            QuotaId::Replicas => "replicas".into(),
            QuotaId::Accelerators(t) => format!("accelerators-{}", t.as_str().to_ascii_lowercase().replace('_', "-")),
            QuotaId::StoredBytes => "stored-bytes".into(),
            QuotaId::LoadedAddons => "loaded-addons".into(),
            QuotaId::RequestsPerMinute => "requests-per-minute".into(),
            QuotaId::TokensPerMinute => "tokens-per-minute".into(),
        }
    }

    pub fn parse(id: &str) -> Option<QuotaId> {
        QuotaId::all().into_iter().find(|q| q.id() == id)
    }

    /// The ceiling when the server sets none: generous for one machine, low enough that a
    /// runaway script is stopped long before the disk or the memory is.
    pub fn default_max(self) -> i64 {
        match self {
            QuotaId::Models => 1_000,
            QuotaId::Deployments => 100,
            QuotaId::Replicas => 64,
            QuotaId::Accelerators(_) => 64,
            QuotaId::StoredBytes => 1 << 40,
            QuotaId::LoadedAddons => 1_000,
            QuotaId::RequestsPerMinute => 6_000,
            QuotaId::TokensPerMinute => 10_000_000,
        }
    }

    fn what(self) -> &'static str {
        match self {
            QuotaId::Models => "models",
            QuotaId::Deployments => "deployments",
            QuotaId::Replicas => "replicas (maxReplicaCount summed over deployments)",
            QuotaId::Accelerators(_) => "accelerators (maxReplicaCount × acceleratorCount)",
            QuotaId::StoredBytes => "bytes of model files",
            QuotaId::LoadedAddons => "loaded LoRA addons",
            QuotaId::RequestsPerMinute => "inference requests per minute",
            QuotaId::TokensPerMinute => "inference tokens per minute",
        }
    }
}

/// The server's ceilings (`maxValue`), from `--quota ID=N`; quotas not named keep their default.
#[derive(Debug, Clone, Default)]
pub struct QuotaLimits {
    set: BTreeMap<String, i64>,
}

impl QuotaLimits {
    /// Parses one `ID=N` setting.
    pub fn set(&mut self, setting: &str) -> std::result::Result<(), String> {
        let (id, n) = setting.split_once('=').ok_or_else(|| format!("expected ID=N, got {setting:?}"))?;
        let q = QuotaId::parse(id).ok_or_else(|| {
            let ids: Vec<String> = QuotaId::all().into_iter().map(QuotaId::id).collect();
            format!("unknown quota {id:?}; quotas are {}", ids.join(", "))
        })?;
        let n: i64 = n.parse().ok().filter(|n| *n >= 0).ok_or_else(|| format!("{id}: {n:?} is not a count >= 0"))?;
        self.set.insert(q.id(), n);
        Ok(())
    }

    pub fn max(&self, q: QuotaId) -> i64 {
        self.set.get(&q.id()).copied().unwrap_or_else(|| q.default_max())
    }
}

/// An account's own lowered limits, one row per account.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct QuotaValues {
    /// Quota id to the limit the account chose (at most the server's ceiling when set).
    pub values: BTreeMap<String, i64>,
    /// When each was last set.
    pub updated: BTreeMap<String, chrono::DateTime<Utc>>,
}

impl Record for QuotaValues {
    const KIND: &'static str = "quotas";
    const SCHEMA: u32 = 1;

    fn upgrade(row: Map<String, Value>, _from: u32) -> std::result::Result<Map<String, Value>, String> {
        Ok(row)
    }
}

/// The id of the one quota row of an account.
const ROW: &str = "values";

const QUOTA_LIST: Listable =
    Listable { fields: &["name", "value", "maxValue", "usage", "updateTime"], default_order: "name" };

fn not_found(account: &str, id: &str) -> ControlError {
    let ids: Vec<String> = QuotaId::all().into_iter().map(QuotaId::id).collect();
    ControlError::NotFound(format!(
        "quota accounts/{account}/quotas/{id} does not exist; quotas are {}",
        ids.join(", ")
    ))
}

/// The accounts' admission locks.
pub(crate) type Admissions = std::sync::Arc<std::sync::Mutex<BTreeMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>>;

impl ControlPlane {
    /// Holds the account's admission lock: taken before a quota's check and kept until the
    /// write it guards is done, so the check holds against what is written.
    pub(crate) async fn admission(&self, account: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut all = self.admissions.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(account.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    async fn quota_values(&self, account: &str) -> Result<QuotaValues> {
        Ok(self.load::<QuotaValues>(account, ROW).await?.map(|d| d.value).unwrap_or_default())
    }

    /// The limit enforced for an account: its own value, capped by the server's ceiling
    /// (which may have been lowered since the value was set).
    fn limit_of(&self, values: &QuotaValues, q: QuotaId) -> i64 {
        let max = self.config.quotas.max(q);
        values.values.get(&q.id()).copied().map_or(max, |v| v.min(max))
    }

    /// The limits of the two inference rates, for the gateway's rate limiter.
    pub async fn rate_limits(&self, account: &str) -> Result<(i64, i64)> {
        let values = self.quota_values(account).await?;
        Ok((self.limit_of(&values, QuotaId::RequestsPerMinute), self.limit_of(&values, QuotaId::TokensPerMinute)))
    }

    /// What an account holds or uses of a quota now. `except` leaves one deployment out (its
    /// own old figures, when it is being updated).
    async fn usage(&self, account: &str, q: QuotaId, except: Option<&str>) -> Result<f64> {
        let live_deployments = || async {
            Ok::<Vec<Doc<DeploymentSpec>>, ControlError>(
                self.load_all::<DeploymentSpec>(account)
                    .await?
                    .into_iter()
                    .filter(|d| !d.value.is_deleted() && Some(d.id.as_str()) != except)
                    .collect(),
            )
        };
        Ok(match q {
            QuotaId::Models => self.store.list(MODELS, account).await?.len() as f64,
            QuotaId::Deployments => live_deployments().await?.len() as f64,
            QuotaId::Replicas | QuotaId::Accelerators(_) => {
                live_deployments().await?.iter().map(|d| reserved(&d.value, q)).sum::<i64>() as f64
            }
            QuotaId::StoredBytes => {
                let mut bytes = 0u64;
                for rec in self.store.list(MODELS, account).await? {
                    bytes += self.artifacts.list(account, &rec.id).await?.iter().map(|(_, n)| n).sum::<u64>();
                }
                bytes as f64
            }
            QuotaId::LoadedAddons => self.load_all::<DeployedModelSpec>(account).await?.len() as f64,
            QuotaId::RequestsPerMinute => self.rates.used(account).0,
            QuotaId::TokensPerMinute => self.rates.used(account).1,
        })
    }

    /// Refuses, with RESOURCE_EXHAUSTED naming the quota, a change that would take the account
    /// past its limit by `adding` more. `except` as for `usage`.
    pub(crate) async fn check_quota(&self, account: &str, q: QuotaId, adding: i64, except: Option<&str>) -> Result<()> {
        if adding <= 0 {
            return Ok(());
        }
        let limit = self.limit_of(&self.quota_values(account).await?, q);
        let used = self.usage(account, q, except).await? as i64;
        if used.saturating_add(adding) > limit {
            return Err(ControlError::ResourceExhausted(format!(
                "quota accounts/{account}/quotas/{} is exhausted: {limit} {} allowed, {used} in use, and this needs \
                 {adding} more; free some, or ask whoever runs hearth to raise it",
                q.id(),
                q.what()
            )));
        }
        Ok(())
    }

    /// Checks the `replicas` and `accelerators-*` quotas for a deployment spec about to be
    /// stored (`id` is left out of the usage, so an update counts only its new figures).
    pub(crate) async fn check_deployment_quotas(&self, account: &str, id: &str, spec: &DeploymentSpec) -> Result<()> {
        self.check_quota(account, QuotaId::Replicas, reserved(spec, QuotaId::Replicas), Some(id)).await?;
        if let Some(t) = spec.accelerator().0 {
            let q = QuotaId::Accelerators(t);
            self.check_quota(account, q, reserved(spec, q), Some(id)).await?;
        }
        Ok(())
    }

    async fn quota_view(&self, account: &str, values: &QuotaValues, q: QuotaId) -> Result<Quota> {
        Ok(Quota {
            name: Some(format!("accounts/{account}/quotas/{}", q.id())),
            value: Some(Int64(self.limit_of(values, q))),
            max_value: Some(Int64(self.config.quotas.max(q))),
            usage: Some(self.usage(account, q, None).await?),
            update_time: values.updated.get(&q.id()).copied(),
        })
    }

    pub async fn list_quotas(&self, who: &Principal, account: &str, req: &ListRequest) -> Result<ListPage> {
        self.authorize(who, account)?;
        let values = self.quota_values(account).await?;
        let mut items = Vec::new();
        for q in QuotaId::all() {
            items.push(
                serde_json::to_value(self.quota_view(account, &values, q).await?).map_err(ControlError::internal)?,
            );
        }
        paginate(items, req, &QUOTA_LIST)
    }

    pub async fn get_quota(&self, who: &Principal, account: &str, id: &str, read_mask: Option<&str>) -> Result<Value> {
        self.authorize(who, account)?;
        let q = QuotaId::parse(id).ok_or_else(|| not_found(account, id))?;
        let values = self.quota_values(account).await?;
        render(&self.quota_view(account, &values, q).await?, read_mask)
    }

    /// Sets the limit an account enforces on itself (`value`), at most the server's ceiling.
    /// `maxValue` is the operator's to set; `name`, `usage` and `updateTime` are output only.
    pub async fn update_quota(&self, who: &Principal, account: &str, id: &str, body: Quota) -> Result<Quota> {
        self.authorize(who, account)?;
        let q = QuotaId::parse(id).ok_or_else(|| not_found(account, id))?;
        let max = self.config.quotas.max(q);
        if body.max_value.is_some_and(|m| m.0 != max) {
            return Err(ControlError::PermissionDenied(format!(
                "maxValue of quota {} is the server's ceiling ({max}), set by whoever runs hearth (--quota {}=N); \
                 an account sets value, up to it",
                q.id(),
                q.id()
            )));
        }
        let Some(Int64(value)) = body.value else {
            return Err(ControlError::InvalidArgument(format!("value is required: the limit to enforce, 0 to {max}")));
        };
        if !(0..=max).contains(&value) {
            return Err(ControlError::InvalidArgument(format!(
                "value {value} of quota {} is out of range: 0 to its maxValue {max}",
                q.id()
            )));
        }
        let now = Utc::now();
        self.upsert::<QuotaValues, _>(account, ROW, |v| {
            v.values.insert(q.id(), value);
            v.updated.insert(q.id(), now);
        })
        .await?;
        tracing::info!(account, quota = %q.id(), value, "quota updated");
        self.quota_view(account, &self.quota_values(account).await?, q).await
    }
}

/// What a deployment reserves of a quota: replicas, or accelerators of the quota's type.
fn reserved(spec: &DeploymentSpec, q: QuotaId) -> i64 {
    let replicas = i64::from(spec.max_replica_count.max(0));
    match q {
        QuotaId::Replicas => replicas,
        QuotaId::Accelerators(want) => match spec.accelerator() {
            (Some(t), n) if t == want => replicas * n,
            _ => 0,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_settings_are_checked() {
        for q in QuotaId::all() {
            assert_eq!(QuotaId::parse(&q.id()), Some(q), "{}", q.id());
        }
        assert_eq!(QuotaId::Accelerators(AcceleratorType::NvidiaH100_80gb).id(), "accelerators-nvidia-h100-80gb");
        let mut limits = QuotaLimits::default();
        limits.set("models=3").unwrap();
        assert_eq!(limits.max(QuotaId::Models), 3);
        assert_eq!(limits.max(QuotaId::Deployments), QuotaId::Deployments.default_max());
        assert!(limits.set("modles=3").unwrap_err().contains("unknown quota"));
        assert!(limits.set("models=-1").is_err());
        assert!(limits.set("models").is_err());
    }
}
