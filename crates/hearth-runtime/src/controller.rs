//! The controller: runs [`reconcile`] for every deployment, each on its own schedule, side by
//! side, in the manner of a kube-rs controller.
//!
//! Every `period` it renews its lease (the store's, or its [`Election`]'s), lists the
//! deployments, and stops replicas whose deployment is no longer listed (a replica is an orphan only when its
//! deployment is gone, never because its record could not be read). A deployment is
//! reconciled when it is due: at the next resync when idle, soon after a call that left
//! something in transition, at once when the API changed something or a request woke a
//! deployment, and after a growing backoff when its reconcile failed ([`error_policy`]).
//! Reconciles of different deployments run concurrently (up to `CONCURRENCY`); one
//! deployment is never reconciled twice at once. So a hung replica or a failing record holds
//! up its own deployment only.
//!
//! Without the lease, a gateway whose runtime shares its replicas with the others (pods)
//! follows: every period it publishes the ready replicas it sees to its own fleet, so it
//! routes as the leader does, and its demand (requests waiting, last requests) to the store,
//! where the leader's autoscaler reads it; and it tries the lease, taking over when the
//! leader stops renewing it. Replicas are never stopped on losing the lease then: they are
//! the new leader's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_control::observe::DeploymentKey;
use tokio::sync::{mpsc, Semaphore};

use crate::election::{Election, Holding, StoreElection};
use crate::error::RuntimeError;
use crate::reconcile::{error_policy, reconcile, Action, Context};

/// The period while something is in transition (`Action::Soon`).
pub const BUSY_PERIOD: Duration = Duration::from_millis(50);

/// How long the runtime lease lasts without a renewal, by default: a resync renews it, so a
/// gateway that stopped (or died) hands its store over this long after its last resync.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// The same where gateways share replicas (pods): a standby takes over this long after the
/// leader's last resync at most, plus one period.
pub const SHARED_LEASE_TTL: Duration = Duration::from_secs(10);

/// How recent another gateway's published demand must be to count.
const DEMAND_FRESH: Duration = Duration::from_secs(5);

/// Reconciles running at once, at most.
const CONCURRENCY: usize = 64;
/// The same for reconciles of deployments the API just changed, which have slots of their own.
const URGENT_CONCURRENCY: usize = 16;

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
    /// The API changed it: its next reconcile goes ahead of the idle ones.
    urgent: bool,
}

pub struct Controller {
    ctx: Arc<Context>,
    /// Who runs the reconciler: the store's lease unless told otherwise.
    election: Arc<dyn Election>,
    /// This gateway's name in the store's runtime lease, renewed every resync.
    holder: String,
    lease_ttl: Duration,
    period: Duration,
}

impl Controller {
    /// `holder` names this gateway in the store's runtime lease. The controller takes the
    /// lease when it is free; with a runtime whose replicas are not shared, the caller should
    /// have taken it already, so that a second gateway is refused at start.
    pub fn new(ctx: Arc<Context>, holder: String, lease_ttl: Duration, period: Duration) -> Controller {
        let election = Arc::new(StoreElection(ctx.control.clone()));
        Controller { ctx, election, holder, lease_ttl, period }
    }

    /// Elects the gateway that runs the reconciler with `election` instead of the store's lease.
    pub fn with_election(mut self, election: Arc<dyn Election>) -> Controller {
        self.election = election;
        self
    }

    /// Runs forever.
    pub async fn run(self) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(DeploymentKey, Result<Action, RuntimeError>)>();
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        // Reconciles of what the API just changed do not queue behind the idle passes over
        // every deployment.
        let urgent_slots = Arc::new(Semaphore::new(URGENT_CONCURRENCY));
        let mut schedule: HashMap<DeploymentKey, Scheduled> = HashMap::new();
        let changes = self.ctx.control.changes();
        // What changed before this controller started is read by its first resync anyway.
        let _ = self.ctx.control.take_changes();
        let mut next_resync = self.ctx.clock.now();
        let mut leading = false;
        loop {
            let now = self.ctx.clock.now();
            if now >= next_resync {
                self.resync(&mut schedule, now, &mut leading).await;
                next_resync = now + self.period;
            }
            for (key, s) in schedule.iter_mut().filter(|(_, s)| !s.running && s.due <= now) {
                s.running = true;
                let slots = if std::mem::take(&mut s.urgent) { urgent_slots.clone() } else { slots.clone() };
                let (ctx, key, tx) = (self.ctx.clone(), key.clone(), done_tx.clone());
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
                // The deployments the API changed are reconciled now, ahead of the rest (a
                // new one is added without listing them all); a change that may concern any
                // makes every deployment due.
                _ = changes.notified() => {
                    let now = self.ctx.clock.now();
                    let changed = self.ctx.control.take_changes();
                    if leading {
                        for key in changed.keys {
                            let s = schedule.entry(key).or_insert(Scheduled {
                                due: now,
                                running: false,
                                attempts: 0,
                                unlisted: false,
                                urgent: true,
                            });
                            s.due = now;
                            s.urgent = true;
                        }
                    }
                    if changed.all {
                        next_resync = now;
                        due_now(&mut schedule, now);
                    }
                }
                // Following, a request waiting here must reach the leader's autoscaler now.
                _ = self.ctx.fleet.kicker.notified() => if leading {
                    due_now(&mut schedule, self.ctx.clock.now())
                } else {
                    next_resync = self.ctx.clock.now()
                },
                _ = tokio::time::sleep(wake.saturating_duration_since(now)) => {}
            }
        }
    }

    /// Renews the lease, lists the deployments, and stops orphaned replicas; or, without the
    /// lease and with replicas every gateway shares, follows.
    async fn resync(&self, schedule: &mut HashMap<DeploymentKey, Scheduled>, now: Instant, leading: &mut bool) {
        let shared = self.ctx.runtime.shared();
        match self.election.hold(&self.holder, self.lease_ttl).await {
            Ok(Holding::Held) => {
                if !*leading {
                    tracing::info!(holder = %self.holder, "this gateway holds the runtime lease: it runs the reconciler");
                    self.ctx.runtime.set_leading(true);
                }
                *leading = true;
            }
            Ok(Holding::Other(why)) if shared => {
                if *leading {
                    tracing::warn!(reason = %why, "another gateway runs the reconciler now; following");
                    self.ctx.runtime.set_leading(false);
                }
                *leading = false;
                schedule.clear();
                self.follow().await;
                return;
            }
            Ok(Holding::Other(why)) => {
                *leading = false;
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
        if shared {
            self.read_demand().await;
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
                urgent: false,
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
            // Changed through the API while this reconcile ran: again at once.
            Ok(_) if s.urgent => {
                s.attempts = 0;
                s.due = now;
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

    /// Without the lease, replicas shared: route to every ready replica the runtime sees (it
    /// watches them), and publish this gateway's demand for the leader's autoscaler.
    async fn follow(&self) {
        match self.ctx.runtime.replicas().await {
            Ok(replicas) => {
                let mut ready: HashMap<String, Vec<String>> = HashMap::new();
                for r in replicas.into_iter().filter(|r| r.phase == crate::runtime::Phase::Ready) {
                    ready.entry(r.deployment).or_default().push(r.endpoint);
                }
                for gone in self.ctx.fleet.deployments().into_iter().filter(|d| !ready.contains_key(d)) {
                    self.ctx.fleet.set_ready(&gone, Vec::new());
                }
                for (deployment, mut endpoints) in ready {
                    endpoints.sort();
                    self.ctx.fleet.set_ready(&deployment, endpoints);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list replicas to follow"),
        }
        let now = self.ctx.clock.now();
        let demand = hearth_control::GatewayDemand {
            holder: self.holder.clone(),
            at_us: chrono::Utc::now().timestamp_micros(),
            deployments: self
                .ctx
                .fleet
                .demand()
                .into_iter()
                .map(|(name, waiting, last)| {
                    let idle_ms = last.map(|t| now.saturating_duration_since(t).as_millis() as u64);
                    (name, hearth_control::DeploymentDemand { waiting: waiting as u64, idle_ms })
                })
                .collect(),
        };
        if let Err(e) = self.ctx.control.publish_demand(&demand).await {
            tracing::warn!(error = %e, "could not publish this gateway's demand; retrying");
        }
    }

    /// The other gateways' demand, as the autoscaler reads it: requests waiting there and
    /// their last request, from what each published lately.
    async fn read_demand(&self) {
        let fresh = DEMAND_FRESH.max(self.period * 3);
        match self.ctx.control.gateway_demands(&self.holder, fresh).await {
            Ok(demands) => {
                let now = self.ctx.clock.now();
                let mut remote: HashMap<String, (usize, Option<Instant>)> = HashMap::new();
                for d in demands {
                    for (name, dd) in d.deployments {
                        let e = remote.entry(name).or_insert((0, None));
                        e.0 += dd.waiting as usize;
                        let last = dd.idle_ms.and_then(|ms| now.checked_sub(Duration::from_millis(ms)));
                        e.1 = e.1.max(last);
                    }
                }
                self.ctx.fleet.set_remote(remote);
            }
            Err(e) => tracing::warn!(error = %e, "could not read the other gateways' demand"),
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
