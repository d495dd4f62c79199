//! The runtime lease: which gateway manages the replicas of a store's deployments.
//!
//! A reconciler acts on every deployment in its store, and the local runtime's replicas are
//! its own child processes. Two `--runtime local` gateways on one store would each start
//! replicas for every deployment, each from its own artifact directory. So the store holds
//! one lease, taken when such a gateway starts and renewed by every reconciler pass; a second
//! gateway is refused at start with the holder's name, and a gateway that lost its lease
//! stops acting. The holder is named by host and data directory, so the same gateway
//! restarted (even after `kill -9`) takes its lease back at once; any other waits for it to
//! expire.
//!
//! Where replicas are shared (pods every gateway sees), the other gateways follow: they route
//! to the ready replicas they see and publish their demand, the requests waiting on them for
//! a replica and when each deployment last had a request, which the holder's autoscaler adds
//! to its own (a request at any gateway wakes a deployment from zero).

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, Result};
use crate::ControlPlane;

const KIND: &str = "leases";
const ACCOUNT: &str = "";
const ID: &str = "runtime";

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    /// Microseconds since the epoch.
    expires_us: i64,
}

impl ControlPlane {
    /// Takes or renews the runtime lease for `holder`, valid for `ttl` from now. Refused with
    /// FAILED_PRECONDITION, naming the holder, while another holds an unexpired lease.
    pub async fn hold_runtime_lease(&self, holder: &str, ttl: Duration) -> Result<()> {
        let now = Utc::now().timestamp_micros();
        let body =
            serde_json::to_string(&Lease { holder: holder.to_string(), expires_us: now + ttl.as_micros() as i64 })
                .map_err(ControlError::internal)?;
        // Two tries: a competitor may insert or renew between our read and write.
        for _ in 0..2 {
            let result = match self.store.get(KIND, ACCOUNT, ID).await? {
                None => self.store.insert(KIND, ACCOUNT, ID, &body).await.map(|_| ()),
                Some(rec) => {
                    let current: Option<Lease> = serde_json::from_str(&rec.body).ok();
                    if let Some(l) = current.filter(|l| l.holder != holder && l.expires_us > now) {
                        let until = chrono::DateTime::from_timestamp_micros(l.expires_us).unwrap_or_default();
                        return Err(ControlError::FailedPrecondition(format!(
                            "this store's deployments are managed by the gateway at {} (its lease runs until {}); \
                             run one --runtime local gateway per store, or give this one a database of its own",
                            l.holder,
                            until.to_rfc3339()
                        )));
                    }
                    self.store.update(KIND, ACCOUNT, ID, rec.version, &body).await.map(|_| ())
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(hearth_store::StoreError::AlreadyExists { .. } | hearth_store::StoreError::Conflict { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Aborted("the runtime lease changed hands while it was being taken; retry".to_string()))
    }

    /// Gives the lease up (a clean shutdown), if `holder` has it.
    pub async fn release_runtime_lease(&self, holder: &str) -> Result<()> {
        if let Some(rec) = self.store.get(KIND, ACCOUNT, ID).await? {
            let mine = serde_json::from_str::<Lease>(&rec.body).is_ok_and(|l| l.holder == holder);
            if mine {
                self.store.delete(KIND, ACCOUNT, ID, Some(rec.version)).await?;
            }
        }
        Ok(())
    }
}

const DEMAND_KIND: &str = "gateway-demand";
/// Demand records not renewed for this long belong to gateways that are gone.
const DEMAND_FORGOTTEN: Duration = Duration::from_secs(600);

/// What one following gateway asks of the deployments now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayDemand {
    pub holder: String,
    /// When it was published, in microseconds since the epoch.
    pub at_us: i64,
    /// Deployment name → its demand at this gateway (deployments with none are left out).
    pub deployments: std::collections::BTreeMap<String, DeploymentDemand>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentDemand {
    /// Requests waiting for a ready replica.
    pub waiting: u64,
    /// Milliseconds since its last request, when it had one.
    pub idle_ms: Option<u64>,
}

/// A store id for a holder's name (which has slashes and colons).
fn demand_id(holder: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(holder.as_bytes())[..12])
}

impl ControlPlane {
    /// Publishes a following gateway's demand, replacing its last.
    pub async fn publish_demand(&self, demand: &GatewayDemand) -> Result<()> {
        let id = demand_id(&demand.holder);
        let body = serde_json::to_string(demand).map_err(ControlError::internal)?;
        for _ in 0..2 {
            let result = match self.store.get(DEMAND_KIND, ACCOUNT, &id).await? {
                None => self.store.insert(DEMAND_KIND, ACCOUNT, &id, &body).await.map(|_| ()),
                Some(rec) => self.store.update(DEMAND_KIND, ACCOUNT, &id, rec.version, &body).await.map(|_| ()),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(hearth_store::StoreError::AlreadyExists { .. } | hearth_store::StoreError::Conflict { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControlError::Aborted("the gateway's demand record changed while it was written; retry".to_string()))
    }

    /// Every other gateway's demand published within `fresh`; records of gateways long gone
    /// are removed.
    pub async fn gateway_demands(&self, except: &str, fresh: Duration) -> Result<Vec<GatewayDemand>> {
        let now = Utc::now().timestamp_micros();
        let mut out = Vec::new();
        for rec in self.store.list_all(DEMAND_KIND).await? {
            let Ok(d) = serde_json::from_str::<GatewayDemand>(&rec.body) else { continue };
            let age = Duration::from_micros(now.saturating_sub(d.at_us).max(0) as u64);
            if age > DEMAND_FORGOTTEN {
                let _ = self.store.delete(DEMAND_KIND, ACCOUNT, &rec.id, Some(rec.version)).await;
            } else if age <= fresh && d.holder != except {
                out.push(d);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArtifactStore, ControlConfig};

    #[tokio::test]
    async fn one_holder_at_a_time_and_the_same_holder_takes_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = hearth_store::open(&dir.path().join("h.db").to_string_lossy()).await.expect("store");
        let control = ControlPlane::new(store, ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
            .await
            .expect("control");
        let ttl = Duration::from_secs(30);
        control.hold_runtime_lease("host:/data/one", ttl).await.expect("first");
        control.hold_runtime_lease("host:/data/one", ttl).await.expect("renewed, or taken back after a restart");
        let refused = control.hold_runtime_lease("host:/data/two", ttl).await.expect_err("held");
        assert!(matches!(refused, ControlError::FailedPrecondition(_)), "{refused}");
        assert!(refused.to_string().contains("host:/data/one"), "{refused}");
        // An expired lease goes to whoever asks.
        control.hold_runtime_lease("host:/data/one", Duration::ZERO).await.expect("renew with no time left");
        control.hold_runtime_lease("host:/data/two", ttl).await.expect("expired: taken over");
        control.release_runtime_lease("host:/data/one").await.expect("not the holder: nothing happens");
        assert!(control.hold_runtime_lease("host:/data/one", ttl).await.is_err(), "two still holds it");
        control.release_runtime_lease("host:/data/two").await.expect("released");
        control.hold_runtime_lease("host:/data/one", ttl).await.expect("free again");
    }

    #[tokio::test]
    async fn a_gateways_demand_replaces_its_last_and_goes_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = hearth_store::open(&dir.path().join("h.db").to_string_lossy()).await.expect("store");
        let control = ControlPlane::new(store, ArtifactStore::new(dir.path().join("a")), ControlConfig::default())
            .await
            .expect("control");
        let mut d =
            GatewayDemand { holder: "pod-b:/data".into(), at_us: Utc::now().timestamp_micros(), ..Default::default() };
        d.deployments.insert("accounts/a/deployments/x".into(), DeploymentDemand { waiting: 2, idle_ms: Some(5) });
        control.publish_demand(&d).await.expect("first");
        d.deployments.clear();
        control.publish_demand(&d).await.expect("replaced");
        let fresh = Duration::from_secs(5);
        assert_eq!(control.gateway_demands("pod-a:/data", fresh).await.expect("read"), vec![d.clone()]);
        assert!(control.gateway_demands("pod-b:/data", fresh).await.expect("read").is_empty(), "not its own");
        d.at_us -= 10_000_000;
        control.publish_demand(&d).await.expect("older");
        assert!(control.gateway_demands("pod-a:/data", fresh).await.expect("read").is_empty(), "stale");
    }
}
