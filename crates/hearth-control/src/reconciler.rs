//! The reconciler: level-triggered and idempotent. Each pass reads every deployment from the
//! store, observes the runtime's replicas, starts and stops replicas to close the gap, and
//! writes what it saw back (`replicaCount`, `replicaStats`, `state`, `status`). It runs on a
//! period and whenever kicked, so a missed event, a crashed replica or a restarted gateway is
//! repaired by the next pass rather than by bookkeeping.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_api::names::{Collection, ResourceName};
use hearth_api::resources::{DeployedModel, DeployedModelState, Deployment, DeploymentState, ReplicaStats};
use hearth_api::rpc::ResourceStatus;
use hearth_api::Code;

use crate::autoscale::{Observation, Policy, Scaler};
use crate::error::{ControlError, Result};
use crate::fleet::Fleet;
use crate::records::{Doc, DEPLOYED_MODELS, DEPLOYMENTS};
use crate::runtime::{Phase, Replica, ReplicaSpec, Runtime};
use crate::ControlPlane;

pub struct Reconciler {
    control: ControlPlane,
    runtime: Arc<dyn Runtime>,
    fleet: Arc<Fleet>,
    /// Talks to replicas' admin API (their loaded LoRA adapters).
    http: reqwest::Client,
    /// Each deployment's autoscaler (its pending scale change), by name.
    scalers: std::sync::Mutex<HashMap<String, Scaler>>,
    /// This gateway's name in the store's runtime lease (`lease.rs`), renewed every pass.
    holder: String,
    /// How long each renewal holds the lease.
    lease_ttl: Duration,
    /// Whether the last pass left something in transition (see `run`).
    busy: std::sync::atomic::AtomicBool,
    /// Ready replicas on their way out (scaled down, or replaced by a roll), by id, with when
    /// they stopped getting new requests.
    draining: std::sync::Mutex<HashMap<String, Instant>>,
}

/// How long the runtime lease lasts without a renewal, by default: a pass renews it, so a
/// gateway that stopped passing (or died) hands its store over this long after its last pass.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// The reconciler's period while something is in transition.
const BUSY_PERIOD: Duration = Duration::from_millis(50);

/// How long a retired replica may take to finish the requests it has before it is stopped
/// regardless.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What one pass decided for one deployment, written back if it differs from the store.
#[derive(Debug, PartialEq)]
struct Observed {
    ready: i32,
    starting: i32,
    state: DeploymentState,
    status: Option<ResourceStatus>,
    desired: i32,
    /// The stored `desiredReplicaCount` this pass started from: the autoscaler's `desired`
    /// is written only over that, never over a `:scale` that landed meanwhile.
    desired_from: Option<i32>,
}

impl Reconciler {
    /// `holder` names this gateway in the store's runtime lease, which it must already hold;
    /// each pass renews it for `lease_ttl`.
    pub fn new(
        control: ControlPlane,
        runtime: Arc<dyn Runtime>,
        fleet: Arc<Fleet>,
        holder: String,
        lease_ttl: Duration,
    ) -> Reconciler {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
        Reconciler {
            control,
            runtime,
            fleet,
            http,
            holder,
            lease_ttl,
            busy: Default::default(),
            scalers: Default::default(),
            draining: Default::default(),
        }
    }

    /// Runs passes forever: every `period`, or sooner when kicked. A failed pass is logged
    /// and retried on the next tick; nothing it did is lost, because the next pass starts
    /// again from the store and the runtime.
    pub async fn run(self, period: Duration) {
        loop {
            self.busy.store(false, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "reconcile pass failed; retrying");
            }
            // While something is on its way (a replica starting, an addon loading, a replica
            // draining), look again soon: the user is waiting for that change to show.
            let wait =
                if self.busy.load(std::sync::atomic::Ordering::Relaxed) { period.min(BUSY_PERIOD) } else { period };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.fleet.kicker.notified() => {}
                _ = self.control.changes.notified() => {}
            }
        }
    }

    /// Stops every replica of this gateway and routes nothing more to them: another gateway
    /// holds the store's lease now (this one went without a pass for longer than the lease,
    /// stopped or cut off from the store), runs replicas of its own for every deployment, and
    /// ours would be duplicates serving state this gateway no longer follows. The next pass
    /// that takes the lease back (the other gateway gone) starts them again.
    async fn stand_down(&self) {
        self.fleet.publish(HashMap::new());
        let replicas = match self.runtime.replicas().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "lost the runtime lease but could not list this gateway's replicas");
                return;
            }
        };
        if !replicas.is_empty() {
            tracing::warn!(
                replicas = replicas.len(),
                "lost the runtime lease to another gateway; stopping this one's replicas"
            );
        }
        for r in replicas {
            if let Err(e) = self.runtime.stop(&r.id).await {
                tracing::warn!(replica = %r.id, error = %e, "stopping a replica after losing the runtime lease");
            }
        }
        if let Ok(mut d) = self.draining.lock() {
            d.clear();
        }
    }

    /// One pass over every deployment. It first renews the runtime lease: a gateway that lost
    /// it (another took over the store) acts on nothing, and stands down.
    pub async fn pass(&self) -> Result<()> {
        if let Err(e) = self.control.hold_runtime_lease(&self.holder, self.lease_ttl).await {
            if matches!(e, ControlError::FailedPrecondition(_)) {
                self.stand_down().await;
            }
            return Err(e);
        }
        let replicas = self.runtime.replicas().await?;
        let mut by_deployment: HashMap<String, Vec<Replica>> = HashMap::new();
        for r in replicas {
            by_deployment.entry(r.deployment.clone()).or_default().push(r);
        }
        let mut known = HashSet::new();
        let mut ready_map = HashMap::new();
        for rec in self.control.store.list_all(DEPLOYMENTS).await? {
            let name = ResourceName::new(&rec.account, Collection::Deployments, &rec.id).to_string();
            known.insert(name.clone());
            let Ok(d) = serde_json::from_str::<Deployment>(&rec.body) else {
                tracing::warn!(deployment = %name, "unreadable deployment record; skipped");
                continue;
            };
            let mine = by_deployment.remove(&name).unwrap_or_default();
            let ready = self.reconcile_one(&rec.account, &rec.id, &name, &d, mine).await?;
            let merged_mode = d.enable_hot_reload_latest_addon == Some(true);
            self.sync_adapters(&rec.account, &name, &ready, merged_mode).await?;
            if !ready.is_empty() {
                ready_map.insert(name, ready);
            }
        }
        // Replicas of deployments that no longer exist (purged) are stopped.
        for (_, orphans) in by_deployment {
            for r in orphans {
                self.runtime.stop(&r.id).await?;
            }
        }
        self.fleet.publish(ready_map);
        Ok(())
    }

    /// Brings one deployment's replicas to what it asks for; returns its ready endpoints.
    async fn reconcile_one(
        &self,
        account: &str,
        id: &str,
        name: &str,
        d: &Deployment,
        replicas: Vec<Replica>,
    ) -> Result<Vec<String>> {
        let state = d.state.unwrap_or(DeploymentState::Creating);
        // Deleted and failed deployments run nothing.
        if matches!(state, DeploymentState::Deleted | DeploymentState::Failed) {
            for r in &replicas {
                self.runtime.stop(&r.id).await?;
            }
            if !replicas.is_empty() || d.replica_count.unwrap_or(0) != 0 {
                self.write(
                    account,
                    id,
                    Observed { ready: 0, starting: 0, state, status: d.status.clone(), desired: 0, desired_from: None },
                )
                .await?;
            }
            return Ok(Vec::new());
        }
        let Some(spec) = spec_of(account, name, d) else { return Ok(Vec::new()) };
        let fp = spec.fingerprint();
        let desired = self.desired(name, d);

        // A replica that failed before it was ever ready could not load the model: the
        // deployment fails with the engine's reason instead of crash-looping.
        if let Some(Phase::Failed(why)) =
            replicas.iter().find(|r| !r.was_ready && matches!(r.phase, Phase::Failed(_))).map(|r| r.phase.clone())
        {
            for r in &replicas {
                self.runtime.stop(&r.id).await?;
            }
            tracing::warn!(deployment = %name, reason = %why, "deployment failed");
            let status =
                Some(ResourceStatus::new(Code::FailedPrecondition, format!("the model could not be served: {why}")));
            self.write(
                account,
                id,
                Observed { ready: 0, starting: 0, state: DeploymentState::Failed, status, desired, desired_from: None },
            )
            .await?;
            return Ok(Vec::new());
        }
        // Crashed replicas are removed; the counts below start replacements.
        let mut live = Vec::new();
        for r in replicas {
            if matches!(r.phase, Phase::Failed(_)) {
                tracing::warn!(deployment = %name, replica = %r.id, "replica crashed; replacing it");
                self.runtime.stop(&r.id).await?;
                self.draining.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.id);
            } else {
                live.push(r);
            }
        }
        let (current, stale): (Vec<Replica>, Vec<Replica>) = live.into_iter().partition(|r| r.fingerprint == fp);
        let ready_now = current.iter().filter(|r| r.phase == Phase::Ready).count() as i32;
        let starting_now = current.iter().filter(|r| r.phase == Phase::Starting).count() as i32;
        let have = ready_now + starting_now;
        let mut starting = starting_now;
        let mut retiring: HashSet<String> = HashSet::new();
        if have < desired {
            for _ in have..desired {
                self.runtime.start(&spec).await?;
                starting += 1;
            }
        } else if have > desired {
            // Retire the ones still starting first (they serve nobody yet), then those already
            // draining, so a pass never picks a second replica to drain in place of the first.
            let mut extra = (have - desired) as usize;
            let draining = self.draining.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut order: Vec<&Replica> = current.iter().collect();
            order.sort_by_key(|r| (r.phase == Phase::Ready, !draining.contains_key(&r.id)));
            for r in order {
                if extra == 0 {
                    break;
                }
                retiring.insert(r.id.clone());
                if r.phase == Phase::Starting {
                    starting -= 1;
                }
                extra -= 1;
            }
        }
        // Rolling update: old replicas serve until enough new ones are ready.
        let rolling = !stale.is_empty();
        if rolling && ready_now >= desired {
            retiring.extend(stale.iter().map(|r| r.id.clone()));
        }
        for r in current.iter().chain(stale.iter()).filter(|r| retiring.contains(&r.id)) {
            self.retire(r).await?;
        }
        let ready_endpoints: Vec<String> = current
            .iter()
            .chain(stale.iter().filter(|_| ready_now < desired))
            .filter(|r| r.phase == Phase::Ready && !retiring.contains(&r.id))
            .map(|r| r.endpoint.clone())
            .collect();
        let ready = ready_endpoints.len() as i32;
        if starting > 0 || rolling || !retiring.is_empty() {
            self.busy.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let min = d.min_replica_count.unwrap_or(0);
        let new_state = match state {
            DeploymentState::Creating if ready >= 1 && ready >= min => DeploymentState::Ready,
            DeploymentState::Creating => DeploymentState::Creating,
            _ if rolling && ready_now < desired => DeploymentState::Updating,
            _ => DeploymentState::Ready,
        };
        let desired_from = Some(d.desired_replica_count.unwrap_or(min));
        self.write(account, id, Observed { ready, starting, state: new_state, status: None, desired, desired_from })
            .await?;
        Ok(ready_endpoints)
    }

    /// Takes a replica out of service without cutting a request short. One still starting
    /// stops at once. A ready one first leaves the published ready set (this pass), so the
    /// router sends it nothing new; a later pass stops it once its requests in flight are
    /// done, or after `DRAIN_TIMEOUT`.
    async fn retire(&self, r: &Replica) -> Result<()> {
        let since = {
            let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
            match draining.get(&r.id) {
                Some(t) => Some(*t),
                None => {
                    draining.insert(r.id.clone(), Instant::now());
                    None
                }
            }
        };
        let done = match since {
            _ if r.phase != Phase::Ready => true,
            None => false,
            Some(t) => self.fleet.in_flight(&r.endpoint) == 0 || t.elapsed() >= DRAIN_TIMEOUT,
        };
        if done {
            self.runtime.stop(&r.id).await?;
            self.draining.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.id);
        }
        Ok(())
    }

    /// How many replicas a deployment should have now: the stored count (`minReplicaCount`,
    /// `:scale`, or the autoscaler's last decision) moved by its autoscaler (`autoscale.rs`)
    /// from the load this gateway observes.
    fn desired(&self, name: &str, d: &Deployment) -> i32 {
        let policy = policy_of(d);
        let current = d.desired_replica_count.unwrap_or(policy.min);
        let seen = Observation {
            load: self.fleet.load(name) + self.fleet.waiting(name),
            last_request: self.fleet.last_request(name),
        };
        let mut scalers = self.scalers.lock().unwrap_or_else(|e| e.into_inner());
        let decided = scalers.entry(name.to_string()).or_default().decide(&policy, &seen, current, Instant::now());
        if decided != current {
            tracing::info!(deployment = %name, from = current, to = decided, load = seen.load, "autoscaling");
        }
        decided
    }

    /// Writes observed state back, only when it changed, against the stored version.
    async fn write(&self, account: &str, id: &str, o: Observed) -> Result<()> {
        let unchanged = |d: &Deployment| {
            d.replica_count == Some(o.ready)
                && d.state == Some(o.state)
                && d.status == o.status
                && d.replica_stats.as_ref().and_then(|s| s.ready_replica_count) == Some(o.ready)
                && d.replica_stats.as_ref().and_then(|s| s.initializing_replica_count) == Some(o.starting)
                && (o.desired_from.is_none() || d.desired_replica_count == Some(o.desired))
        };
        let current: Option<Doc<Deployment>> = self.control.load(DEPLOYMENTS, account, id).await?;
        match current {
            Some(doc) if !unchanged(&doc.value) => {}
            _ => return Ok(()),
        }
        let result = self
            .control
            .modify(
                DEPLOYMENTS,
                account,
                id,
                || crate::error::ControlError::NotFound(id.to_string()),
                |doc: &mut Doc<Deployment>| {
                    // A user action (delete, undelete) that landed since this pass read the
                    // deployment wins; the next pass sees it.
                    let s = doc.value.state.unwrap_or(DeploymentState::Creating);
                    if matches!(s, DeploymentState::Deleted) && o.state != DeploymentState::Deleted {
                        return Ok(());
                    }
                    if s == DeploymentState::Failed && o.state != DeploymentState::Failed && o.state != s {
                        return Ok(());
                    }
                    if let Some(from) = o.desired_from {
                        let min = doc.value.min_replica_count.unwrap_or(0);
                        if doc.value.desired_replica_count.unwrap_or(min) == from {
                            doc.value.desired_replica_count = Some(o.desired);
                        }
                    }
                    doc.value.replica_count = Some(o.ready);
                    doc.value.replica_stats = Some(ReplicaStats {
                        ready_replica_count: Some(o.ready),
                        initializing_replica_count: Some(o.starting),
                        ..ReplicaStats::default()
                    });
                    doc.value.state = Some(o.state);
                    if o.status.is_some() || o.state != DeploymentState::Failed {
                        doc.value.status = o.status.clone();
                    }
                    Ok(())
                },
            )
            .await;
        match result {
            Ok(_) | Err(crate::error::ControlError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Reconciler {
    /// Asks a replica to drop an adapter; a failure is repaired by a later pass.
    async fn unload_adapter(&self, endpoint: &str, name: &str) {
        let _ = self
            .http
            .post(format!("{endpoint}/v1/unload_lora_adapter"))
            .json(&serde_json::json!({"lora_name": name}))
            .send()
            .await;
    }

    /// Makes every ready replica of a deployment hold exactly the LoRA addons loaded onto it
    /// (its DeployedModels), observing each replica's adapters first, and writes each
    /// DeployedModel's state back: DEPLOYED once every ready replica has it, with a replica's
    /// refusal in `status`. In merged mode (`enableHotReloadLatestAddon`) the one addon is
    /// merged into each replica's weights instead, replacing the one merged before.
    async fn sync_adapters(
        &self,
        account: &str,
        deployment: &str,
        endpoints: &[String],
        merged_mode: bool,
    ) -> Result<()> {
        let dms: Vec<Doc<DeployedModel>> = self
            .control
            .load_all::<DeployedModel>(DEPLOYED_MODELS, account)
            .await?
            .into_iter()
            .filter(|d| d.value.deployment.as_deref() == Some(deployment))
            .collect();
        let mut wanted: HashMap<String, String> = HashMap::new();
        for dm in &dms {
            let Some(model) = dm.value.model.clone() else { continue };
            let Ok(rn) = ResourceName::parse(&model, Collection::Models) else { continue };
            let dir = self.control.artifacts.model_dir(&rn.account, &rn.id);
            wanted.insert(model, dir.to_string_lossy().into_owned());
        }
        let mut missing: HashSet<String> = HashSet::new();
        let mut refused: HashMap<String, String> = HashMap::new();
        for ep in endpoints {
            let listed: serde_json::Value = match self.http.get(format!("{ep}/v1/lora_adapters")).send().await {
                Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
                _ => {
                    missing.extend(wanted.keys().cloned());
                    continue;
                }
            };
            let have: Vec<String> = listed["adapters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["name"].as_str().map(str::to_string))
                .collect();
            if merged_mode {
                // Per-request adapters (from before the deployment switched modes) go first:
                // an engine does not mix them with a merged one.
                for stale in &have {
                    self.unload_adapter(ep, stale).await;
                }
                let merged = listed["merged"]["name"].as_str().map(str::to_string);
                // At most one addon: a newer load replaced the others (replaceMergedAddon).
                let want = wanted.iter().next();
                let call = match (want, &merged) {
                    (Some((model, _)), Some(m)) if m == model => None,
                    (Some((model, path)), _) => Some((
                        "merge_lora_adapter",
                        serde_json::json!({"lora_name": model, "lora_path": path}),
                        Some(model.clone()),
                    )),
                    (None, Some(_)) => Some(("unmerge_lora_adapter", serde_json::json!({}), None)),
                    (None, None) => None,
                };
                if let Some((verb, body, model)) = call {
                    match self.http.post(format!("{ep}/v1/{verb}")).json(&body).send().await {
                        Ok(r) if r.status().is_success() => {
                            tracing::info!(deployment, adapter = ?model, replica = %ep, verb, "merged addon changed");
                        }
                        Ok(r) => {
                            let body: serde_json::Value = r.json().await.unwrap_or_default();
                            let msg = body["error"]["message"].as_str().unwrap_or("the replica refused").to_string();
                            tracing::warn!(deployment, adapter = ?model, replica = %ep, reason = %msg, "merge refused");
                            if let Some(m) = model {
                                refused.insert(m.clone(), msg);
                                missing.insert(m);
                            }
                        }
                        Err(_) => missing.extend(model),
                    }
                }
                continue;
            }
            for (model, path) in &wanted {
                if have.contains(model) {
                    continue;
                }
                let reply = self
                    .http
                    .post(format!("{ep}/v1/load_lora_adapter"))
                    .json(&serde_json::json!({"lora_name": model, "lora_path": path}))
                    .send()
                    .await;
                match reply {
                    Ok(r) if r.status().is_success() => {
                        tracing::info!(deployment, adapter = %model, replica = %ep, "adapter loaded on replica");
                    }
                    Ok(r) => {
                        let body: serde_json::Value = r.json().await.unwrap_or_default();
                        let msg =
                            body["error"]["message"].as_str().unwrap_or("the replica refused the adapter").to_string();
                        tracing::warn!(deployment, adapter = %model, replica = %ep, reason = %msg, "adapter refused");
                        refused.insert(model.clone(), msg);
                        missing.insert(model.clone());
                    }
                    Err(_) => {
                        missing.insert(model.clone());
                    }
                }
            }
            for stale in have.iter().filter(|h| !wanted.contains_key(*h)) {
                self.unload_adapter(ep, stale).await;
                tracing::info!(deployment, adapter = %stale, replica = %ep, "adapter unloaded from replica");
            }
        }
        for dm in dms {
            let model = dm.value.model.clone().unwrap_or_default();
            let deployed = !endpoints.is_empty() && !missing.contains(&model);
            if !deployed && !endpoints.is_empty() && !refused.contains_key(&model) {
                self.busy.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let state = if deployed { DeployedModelState::Deployed } else { DeployedModelState::Deploying };
            let status = refused.get(&model).map(|m| ResourceStatus::new(Code::FailedPrecondition, m.clone()));
            if dm.value.state == Some(state) && dm.value.status == status {
                continue;
            }
            let result = self
                .control
                .modify(
                    DEPLOYED_MODELS,
                    account,
                    &dm.id,
                    || crate::error::ControlError::NotFound(dm.id.clone()),
                    |d: &mut Doc<DeployedModel>| {
                        d.value.state = Some(state);
                        d.value.status = status.clone();
                        Ok(())
                    },
                )
                .await;
            match result {
                Ok(_) | Err(crate::error::ControlError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A deployment's autoscaling knobs, with the defaults `normalise` stores on create.
fn policy_of(d: &Deployment) -> Policy {
    use crate::deployments::{
        DEFAULT_LOAD_TARGET, DEFAULT_SCALE_DOWN_WINDOW, DEFAULT_SCALE_TO_ZERO_WINDOW, DEFAULT_SCALE_UP_WINDOW,
    };
    let p = d.autoscaling_policy.clone().unwrap_or_default();
    let window = |w: Option<hearth_api::duration::ProtoDuration>, default: u64| {
        w.map(|w| w.0).unwrap_or(Duration::from_secs(default))
    };
    Policy {
        min: d.min_replica_count.unwrap_or(0),
        max: d.max_replica_count.unwrap_or(1),
        target: p.load_targets.as_ref().and_then(|t| t.get("default").copied()).unwrap_or(DEFAULT_LOAD_TARGET),
        scale_up_window: window(p.scale_up_window, DEFAULT_SCALE_UP_WINDOW),
        scale_down_window: window(p.scale_down_window, DEFAULT_SCALE_DOWN_WINDOW),
        scale_to_zero_window: window(p.scale_to_zero_window, DEFAULT_SCALE_TO_ZERO_WINDOW),
    }
}

/// The replica spec a deployment implies; None when its base model name is unreadable.
fn spec_of(account: &str, name: &str, d: &Deployment) -> Option<ReplicaSpec> {
    let base = d.base_model.clone()?;
    let rn = ResourceName::parse(&base, Collection::Models).ok()?;
    Some(ReplicaSpec {
        deployment: name.to_string(),
        model: base,
        account: if rn.account.is_empty() { account.to_string() } else { rn.account },
        model_id: rn.id,
        precision: match d.precision {
            Some(p) if p.as_str() != "PRECISION_UNSPECIFIED" => p.as_str().to_string(),
            _ => String::new(),
        },
        max_context_length: d.max_context_length.unwrap_or(0).max(0) as u32,
        max_hot_adapters: d.num_peft_device_cached.unwrap_or(0).max(0) as u32,
    })
}
