//! Which gateway runs the reconciler. Every resync the controller asks its [`Election`] to take
//! or renew the lease for it; the lease lasts `ttl` from then. Where replicas are local child
//! processes the store's lease decides ([`StoreElection`]); on Kubernetes a
//! `coordination.k8s.io` Lease in the gateways' namespace does ([`KubernetesElection`]), as
//! Kubernetes' own controllers elect their leaders.
//!
//! Both are compare-and-swap on one record: a holder renews by writing the version it read,
//! so two gateways that both saw an expired lease cannot both take it.

use std::time::Duration;

use async_trait::async_trait;
use hearth_control::{ControlError, ControlPlane};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::Api;

use crate::error::{Result, RuntimeError};

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// This gateway holds the lease until `ttl` from now.
    Held,
    /// Another holds an unexpired lease; the message says who and until when.
    Other(String),
}

#[async_trait]
pub trait Election: Send + Sync + 'static {
    /// Takes the lease for `holder`, or renews it, for `ttl` from now.
    async fn hold(&self, holder: &str, ttl: Duration) -> Result<Holding>;
    /// Gives the lease up if `holder` has it (a clean stop hands it over at once).
    async fn release(&self, holder: &str) -> Result<()>;
}

/// The store's runtime lease (`hearth_control`'s `lease.rs`).
pub struct StoreElection(pub ControlPlane);

#[async_trait]
impl Election for StoreElection {
    async fn hold(&self, holder: &str, ttl: Duration) -> Result<Holding> {
        match self.0.hold_runtime_lease(holder, ttl).await {
            Ok(()) => Ok(Holding::Held),
            Err(ControlError::FailedPrecondition(why)) => Ok(Holding::Other(why)),
            Err(e) => Err(e.into()),
        }
    }

    async fn release(&self, holder: &str) -> Result<()> {
        Ok(self.0.release_runtime_lease(holder).await?)
    }
}

/// A `coordination.k8s.io/v1` Lease named for the installation.
pub struct KubernetesElection {
    leases: Api<Lease>,
    name: String,
}

impl KubernetesElection {
    pub fn new(leases: Api<Lease>, name: String) -> KubernetesElection {
        KubernetesElection { leases, name }
    }

    fn lease(&self, holder: &str, ttl: Duration, transitions: i32, acquired: MicroTime) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some([("app.kubernetes.io/managed-by".to_string(), "hearth".to_string())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_string()),
                lease_duration_seconds: Some(ttl.as_secs().max(1) as i32),
                acquire_time: Some(acquired),
                renew_time: Some(now()),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Whether a lease's holder renewed it within its duration.
fn live(spec: &LeaseSpec, at: k8s_openapi::jiff::Timestamp) -> bool {
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else { return false };
    let until = renewed.0.as_microsecond() + i64::from(secs) * 1_000_000;
    at.as_microsecond() < until
}

#[async_trait]
impl Election for KubernetesElection {
    async fn hold(&self, holder: &str, ttl: Duration) -> Result<Holding> {
        let found = self
            .leases
            .get_opt(&self.name)
            .await
            .map_err(|e| RuntimeError::Backend(format!("reading lease {}: {e}", self.name)))?;
        let Some(current) = found else {
            return match self.leases.create(&PostParams::default(), &self.lease(holder, ttl, 0, now())).await {
                Ok(_) => Ok(Holding::Held),
                // Another gateway made it first: it holds it.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Ok(Holding::Other(format!("lease {} was just taken", self.name)))
                }
                Err(e) => Err(RuntimeError::Backend(format!("creating lease {}: {e}", self.name))),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(holder);
        if !mine && live(&spec, k8s_openapi::jiff::Timestamp::now()) {
            return Ok(Holding::Other(format!(
                "the gateway {} holds lease {} (renewed {})",
                spec.holder_identity.as_deref().unwrap_or("?"),
                self.name,
                spec.renew_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
            )));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time.clone().unwrap_or_else(now) } else { now() };
        let mut next = self.lease(holder, ttl, transitions, acquired);
        // The version read: a competitor's write in between makes this one fail.
        next.metadata.resource_version = current.metadata.resource_version.clone();
        match self.leases.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) => Ok(Holding::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Holding::Other(format!("lease {} changed hands while it was renewed", self.name)))
            }
            Err(e) => Err(RuntimeError::Backend(format!("renewing lease {}: {e}", self.name))),
        }
    }

    async fn release(&self, holder: &str) -> Result<()> {
        let Some(current) = self
            .leases
            .get_opt(&self.name)
            .await
            .map_err(|e| RuntimeError::Backend(format!("reading lease {}: {e}", self.name)))?
        else {
            return Ok(());
        };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(holder) {
            return Ok(());
        }
        // Expired at once: the next gateway to ask takes it.
        let mut next = current;
        if let Some(s) = next.spec.as_mut() {
            s.lease_duration_seconds = Some(1);
            s.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        match self.leases.replace(&self.name, &PostParams::default(), &next).await {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(RuntimeError::Backend(format!("releasing lease {}: {e}", self.name))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lives_for_its_duration_after_its_renewal() {
        let t = k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap();
        let spec = LeaseSpec { renew_time: Some(MicroTime(t)), lease_duration_seconds: Some(10), ..Default::default() };
        assert!(live(&spec, k8s_openapi::jiff::Timestamp::from_second(1_009).unwrap()));
        assert!(!live(&spec, k8s_openapi::jiff::Timestamp::from_second(1_010).unwrap()));
        assert!(!live(&LeaseSpec::default(), t), "never renewed: free");
    }
}
