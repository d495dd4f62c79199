//! The controller: runs [`reconcile`] for every deployment, each on its own schedule, side by
//! side, in the manner of a kube-rs controller.
//!
//! Every `period` it renews the store's runtime lease, lists the deployments, and stops
//! replicas whose deployment is no longer listed (a replica is an orphan only when its
//! deployment is gone, never because its record could not be read). A deployment is
//! reconciled when it is due: at the next resync when idle, soon after a call that left
//! something in transition, at once when the API changed something or a request woke a
//! deployment, and after a growing backoff when its reconcile failed ([`error_policy`]).
//! Reconciles of different deployments run concurrently (up to `CONCURRENCY`); one
//! deployment is never reconciled twice at once. So a hung replica or a failing record holds
//! up its own deployment only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_control::observe::DeploymentKey;
use hearth_control::ControlError;
use tokio::sync::{mpsc, Semaphore};

use crate::error::RuntimeError;
use crate::reconcile::{error_policy, reconcile, Action, Context};

/// The period while something is in transition (`Action::Soon`).
pub const BUSY_PERIOD: Duration = Duration::from_millis(50);

/// How long the runtime lease lasts without a renewal, by default: a resync renews it, so a
/// gateway that stopped (or died) hands its store over this long after its last resync.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Reconciles running at once, at most.
const CONCURRENCY: usize = 64;

/// Where one deployment stands with the controller.
#[derive(Debug)]
struct Scheduled {
    /// When it is due next.
    due: Instant,
    /// A reconcile of it is running.
    running: bool,
    /// Failures in a row.
    attempts: u32,
    /// It was not listed at the last resync: reconcile it once more (which stops its
    /// replicas if it is gone), then forget it.
    unlisted: bool,
}

pub struct Controller {
    ctx: Arc<Context>,
    /// This gateway's name in the store's runtime lease, renewed every resync.
    holder: String,
    lease_ttl: Duration,
    period: Duration,
}

impl Controller {
    /// `holder` names this gateway in the store's runtime lease, which it must already hold.
    pub fn new(ctx: Arc<Context>, holder: String, lease_ttl: Duration, period: Duration) -> Controller {
        Controller { ctx, holder, lease_ttl, period }
    }

    /// Runs forever.
    pub async fn run(self) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(DeploymentKey, Result<Action, RuntimeError>)>();
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        let mut schedule: HashMap<DeploymentKey, Scheduled> = HashMap::new();
        let changes = self.ctx.control.changes();
        let mut next_resync = self.ctx.clock.now();
        loop {
            let now = self.ctx.clock.now();
            if now >= next_resync {
                self.resync(&mut schedule, now).await;
                next_resync = now + self.period;
            }
            for (key, s) in schedule.iter_mut().filter(|(_, s)| !s.running && s.due <= now) {
                s.running = true;
                let (ctx, key, tx, slots) = (self.ctx.clone(), key.clone(), done_tx.clone(), slots.clone());
                tokio::spawn(async move {
                    let _slot = slots.acquire_owned().await;
                    let result = reconcile(&ctx, &key).await;
                    let _ = tx.send((key, result));
                });
            }
            let wake = schedule
                .values()
                .filter(|s| !s.running)
                .map(|s| s.due)
                .chain(std::iter::once(next_resync))
                .min()
                .unwrap_or(next_resync);
            tokio::select! {
                Some((key, result)) = done_rx.recv() => self.finished(&mut schedule, key, result).await,
                // A change may be a new deployment: list them again now.
                _ = changes.notified() => {
                    next_resync = self.ctx.clock.now();
                    due_now(&mut schedule, next_resync);
                }
                _ = self.ctx.fleet.kicker.notified() => due_now(&mut schedule, self.ctx.clock.now()),
                _ = tokio::time::sleep(wake.saturating_duration_since(now)) => {}
            }
        }
    }

    /// Renews the lease, lists the deployments, and stops orphaned replicas.
    async fn resync(&self, schedule: &mut HashMap<DeploymentKey, Scheduled>, now: Instant) {
        match self.ctx.control.hold_runtime_lease(&self.holder, self.lease_ttl).await {
            Ok(()) => {}
            Err(ControlError::FailedPrecondition(why)) => {
                self.stand_down(&why).await;
                schedule.clear();
                return;
            }
            Err(e) => {
                // The store is unreachable: act on nothing until the lease is renewed.
                tracing::warn!(error = %e, "could not renew the runtime lease; retrying");
                return;
            }
        }
        let keys = match self.ctx.control.deployment_keys().await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "could not list deployments; retrying");
                return;
            }
        };
        for s in schedule.values_mut() {
            s.unlisted = true;
        }
        for key in &keys {
            let s = schedule.entry(key.clone()).or_insert(Scheduled {
                due: now,
                running: false,
                attempts: 0,
                unlisted: false,
            });
            s.unlisted = false;
            if s.attempts == 0 {
                s.due = s.due.min(now);
            }
        }
        // An unlisted deployment gets one more reconcile (due now), which stops its replicas.
        for s in schedule.values_mut().filter(|s| s.unlisted) {
            s.due = now;
        }
        // Replicas of no deployment this controller knows of (one purged while this gateway
        // was down, say) are orphans.
        let names: std::collections::HashSet<String> = schedule.keys().map(DeploymentKey::name).collect();
        match self.ctx.runtime.replicas().await {
            Ok(replicas) => {
                for r in replicas.into_iter().filter(|r| !names.contains(&r.deployment)) {
                    tracing::info!(replica = %r.id, deployment = %r.deployment, "stopping a replica of no deployment");
                    if let Err(e) = self.ctx.runtime.stop(&r.id).await {
                        tracing::warn!(replica = %r.id, error = %e, "could not stop an orphaned replica");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list replicas"),
        }
    }

    async fn finished(
        &self,
        schedule: &mut HashMap<DeploymentKey, Scheduled>,
        key: DeploymentKey,
        result: Result<Action, RuntimeError>,
    ) {
        let now = self.ctx.clock.now();
        let Some(s) = schedule.get_mut(&key) else { return };
        s.running = false;
        match result {
            Ok(Action::Forget) => {
                schedule.remove(&key);
            }
            Ok(_) if s.unlisted => {
                schedule.remove(&key);
            }
            Ok(action) => {
                s.attempts = 0;
                s.due = now + if action == Action::Soon { BUSY_PERIOD } else { self.period };
            }
            Err(e) => {
                s.attempts += 1;
                let attempts = s.attempts;
                s.due = now + error_policy(&self.ctx, &key, &e, attempts).await;
            }
        }
    }

    /// Another gateway holds the store's lease now (this one went without a resync for longer
    /// than the lease, stopped or cut off from the store), runs replicas of its own for every
    /// deployment, and ours would be duplicates serving state this gateway no longer follows:
    /// stop them and route nothing more. The next resync that takes the lease back (the other
    /// gateway gone) starts them again.
    async fn stand_down(&self, why: &str) {
        self.ctx.fleet.clear();
        match self.ctx.runtime.replicas().await {
            Ok(replicas) => {
                if !replicas.is_empty() {
                    tracing::warn!(
                        replicas = replicas.len(),
                        reason = why,
                        "lost the runtime lease; stopping this gateway's replicas"
                    );
                }
                for r in replicas {
                    if let Err(e) = self.ctx.runtime.stop(&r.id).await {
                        tracing::warn!(replica = %r.id, error = %e, "stopping a replica after losing the runtime lease");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "lost the runtime lease but could not list this gateway's replicas"),
        }
    }
}

/// Something changed (the API, or a request woke a deployment): every deployment not backing
/// off is due now. Each reconcile is cheap when nothing changed for it.
fn due_now(schedule: &mut HashMap<DeploymentKey, Scheduled>, now: Instant) {
    for s in schedule.values_mut().filter(|s| s.attempts == 0) {
        s.due = s.due.min(now);
    }
}
