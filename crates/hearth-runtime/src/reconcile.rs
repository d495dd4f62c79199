//! One deployment brought to what it asks for: [`reconcile`] reads its spec and status
//! through the control plane, observes its replicas, starts, stops or replaces them, syncs the
//! addons loaded onto it, and writes what it saw into its status row. It is level-triggered
//! and idempotent: it keeps nothing that matters between calls (the autoscaler's pending
//! windows and the drain clocks only delay a change; a restart starts them afresh), so a
//! missed event, a crashed replica or a restarted gateway is repaired by the next call.
//!
//! [`error_policy`] is what happens when a reconcile fails: the error goes into that
//! deployment's status and it is retried after a backoff. Nothing here touches another
//! deployment, so one deployment's failure never holds up the rest (the controller runs
//! them side by side; see `controller.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use hearth_api::replica::{AdapterList, LoadAdapterRequest, LoadModelVersionRequest};
use hearth_api::Code;
use hearth_control::observe::{
    Addon, AddonPhase, ChatSettings, DeploymentKey, DeploymentSpec, DeploymentStatus, Failure, HotLoadProblem,
    HotLoadSpec, Phase as StatusPhase, Problem,
};
use hearth_control::ControlPlane;

use crate::autoscale::{Observation, Policy, Scaler};
use crate::error::{Result, RuntimeError};
use crate::fleet::Fleet;
use crate::replica::ReplicaApi;
use crate::runtime::{Clock, Phase, Replica, ReplicaFiles, ReplicaSpec, Runtime};

/// How long a retired replica may take to finish the requests it has before it is stopped
/// regardless.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What the reconciler works with: the control plane, the runtime and replicas it drives, the
/// fleet it publishes ready endpoints to, and a clock. Fakes of the runtime, the replica API
/// and the clock make it testable without processes, HTTP or sleeps.
pub struct Context {
    pub control: ControlPlane,
    pub runtime: Arc<dyn Runtime>,
    pub replicas: Arc<dyn ReplicaApi>,
    pub fleet: Arc<Fleet>,
    pub clock: Arc<dyn Clock>,
    /// Each deployment's autoscaler (its pending scale change), by name.
    scalers: Mutex<HashMap<String, Scaler>>,
    /// Ready replicas on their way out (scaled down, or replaced by a roll), by id, with when
    /// they stopped getting new requests.
    draining: Mutex<HashMap<String, Instant>>,
    /// The model version each replica endpoint last took from this reconciler: what it
    /// serves, before its load figures (probed every few seconds) say so.
    versions: Mutex<HashMap<String, String>>,
}

impl Context {
    pub fn new(
        control: ControlPlane,
        runtime: Arc<dyn Runtime>,
        replicas: Arc<dyn ReplicaApi>,
        fleet: Arc<Fleet>,
        clock: Arc<dyn Clock>,
    ) -> Context {
        Context {
            control,
            runtime,
            replicas,
            fleet,
            clock,
            scalers: Mutex::default(),
            draining: Mutex::default(),
            versions: Mutex::default(),
        }
    }

    fn draining(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.draining.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops replicas, and forgets their drain clocks.
    async fn stop_all(&self, replicas: &[Replica]) -> Result<()> {
        for r in replicas {
            self.runtime.stop(&r.id).await?;
            self.draining().remove(&r.id);
            // Its port may serve another replica next.
            self.versions.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.endpoint);
        }
        Ok(())
    }
}

/// What to do next with a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Something is on its way (a replica starting, an addon loading, a replica draining):
    /// look again soon, the user is waiting for it to show.
    Soon,
    /// Nothing in transition: look again at the next resync.
    Idle,
    /// The deployment is gone and so are its replicas.
    Forget,
}

/// Brings one deployment to what its spec asks for. An error leaves its replicas as they
/// were; [`error_policy`] records it.
pub async fn reconcile(ctx: &Context, key: &DeploymentKey) -> Result<Action> {
    let name = key.name();
    let replicas = ctx.runtime.replicas_of(&name).await?;
    let Some((spec, status)) = ctx.control.deployment_for_runtime(key).await? else {
        // Purged: only now are its replicas orphans.
        ctx.stop_all(&replicas).await?;
        ctx.fleet.set_ready(&name, Vec::new());
        ctx.fleet.set_speculation(&name, None);
        ctx.scalers.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
        return Ok(Action::Forget);
    };
    let generation = spec.generation;

    // Deleted deployments, and those that failed at this generation, run nothing.
    if spec.is_deleted() || status.failed_at(generation).is_some() {
        ctx.stop_all(&replicas).await?;
        ctx.fleet.set_ready(&name, Vec::new());
        ctx.fleet.set_speculation(&name, None);
        let deleted = spec.is_deleted();
        ctx.control
            .observe_deployment(key, |s| {
                if deleted {
                    s.phase = StatusPhase::Deleted;
                    s.desired_replicas = Some(0);
                }
                s.ready_replicas = 0;
                s.starting_replicas = 0;
                s.observed_generation = generation;
                s.error = None;
            })
            .await?;
        return Ok(Action::Idle);
    }

    let chat = ctx.control.chat_settings(&spec.base_model).await;
    let rspec = replica_spec(key, &spec, chat);
    let fingerprint = rspec.fingerprint();
    let (desired, applied_scale) = desired(ctx, &name, &spec, &status, &replicas);

    // A replica that failed before it was ever ready could not load the model: the
    // deployment fails with the engine's reason instead of crash-looping.
    let never_ready =
        replicas.iter().find(|r| !r.was_ready && r.fingerprint == fingerprint && matches!(r.phase, Phase::Failed(_)));
    if let Some(Phase::Failed(why)) = never_ready.map(|r| r.phase.clone()) {
        ctx.stop_all(&replicas).await?;
        ctx.fleet.set_ready(&name, Vec::new());
        ctx.fleet.set_speculation(&name, None);
        tracing::warn!(deployment = %name, reason = %why, "deployment failed");
        let problem = Problem::new(Code::FailedPrecondition, format!("the model could not be served: {why}"));
        ctx.control
            .observe_deployment(key, |s| {
                s.phase = StatusPhase::Creating;
                s.failure = Some(Failure { generation, problem: problem.clone() });
                s.ready_replicas = 0;
                s.starting_replicas = 0;
                s.desired_replicas = Some(desired);
                s.applied_scale = applied_scale;
                s.observed_generation = generation;
                s.error = None;
            })
            .await?;
        return Ok(Action::Idle);
    }

    // Crashed replicas are removed; the counts below start replacements.
    let mut live = Vec::new();
    for r in replicas {
        if matches!(r.phase, Phase::Failed(_)) {
            tracing::warn!(deployment = %name, replica = %r.id, "replica crashed; replacing it");
            ctx.stop_all(std::slice::from_ref(&r)).await?;
        } else {
            live.push(r);
        }
    }
    // Speculation's counts over the replicas running now, for the gateway's metrics.
    let speculates = rspec.ngram_speculation > 0 || rspec.draft_model.is_some();
    let counts = live
        .iter()
        .filter_map(|r| r.load.as_ref())
        .fold((0, 0), |(d, a), l| (d + l.spec_drafted_tokens, a + l.spec_accepted_tokens));
    ctx.fleet.set_speculation(&name, speculates.then_some(counts));
    let (current, stale): (Vec<Replica>, Vec<Replica>) = live.into_iter().partition(|r| r.fingerprint == fingerprint);
    let plan = plan_replicas(&current, &stale, desired, &ctx.draining());
    if plan.start > 0 {
        // New replicas start on the version the others serve.
        let mut rspec = rspec.clone();
        if let (Some(hot), Some(v)) = (&spec.hot_load, &status.active_model_version) {
            rspec.model_version = ctx.control.model_version_files(&name, hot, v).await.ok().map(|d| (v.clone(), d));
        }
        for _ in 0..plan.start {
            ctx.runtime.start(&rspec).await?;
        }
    }
    let mut draining = false;
    for r in current.iter().chain(stale.iter()).filter(|r| plan.retire.contains(&r.id)) {
        draining |= retire(ctx, r).await?;
    }
    ctx.fleet.set_ready(&name, plan.serving.clone());

    let addons = ctx.control.addons_for_runtime(key).await?;
    let addons_busy = sync_addons(ctx, &name, spec.merged_mode(), &plan.serving, addons).await?;
    let versions: HashMap<&str, Option<&str>> = current
        .iter()
        .chain(stale.iter())
        .map(|r| (r.endpoint.as_str(), r.load.as_ref().and_then(|l| l.model_version.as_deref())))
        .collect();
    let serving: Vec<(&str, Option<&str>)> =
        plan.serving.iter().map(|e| (e.as_str(), versions.get(e.as_str()).copied().flatten())).collect();
    let version_busy = sync_version(ctx, key, &name, spec.hot_load.as_ref(), &status, &serving).await?;

    let ready = plan.serving.len() as i32;
    let phase = match status.phase {
        StatusPhase::Creating | StatusPhase::Deleted if ready >= 1 && ready >= spec.min_replica_count => {
            StatusPhase::Ready
        }
        StatusPhase::Creating | StatusPhase::Deleted => StatusPhase::Creating,
        _ if plan.updating => StatusPhase::Updating,
        _ => StatusPhase::Ready,
    };
    ctx.control
        .observe_deployment(key, |s| {
            s.phase = phase;
            s.observed_generation = generation;
            s.ready_replicas = ready;
            s.starting_replicas = plan.starting;
            s.desired_replicas = Some(desired);
            s.applied_scale = applied_scale;
            s.error = None;
        })
        .await?;
    let busy = plan.start > 0 || plan.starting > 0 || plan.updating || draining || addons_busy || version_busy;
    Ok(if busy { Action::Soon } else { Action::Idle })
}

/// The replicas a deployment runs, as its spec and its model's chat settings imply.
pub fn replica_spec(key: &DeploymentKey, spec: &DeploymentSpec, chat: ChatSettings) -> ReplicaSpec {
    ReplicaSpec {
        chat_template: chat.template,
        system_prompt: chat.system_prompt,
        deployment: key.name(),
        model: spec.base_model.clone(),
        precision: spec.precision.clone().unwrap_or_default(),
        max_context_length: spec.max_context_length.unwrap_or(0).max(0) as u32,
        max_hot_adapters: spec.num_peft_device_cached.unwrap_or(0).max(0) as u32,
        ngram_speculation: spec.ngram_speculation_length.unwrap_or(0).max(0) as u32,
        draft_tokens: spec.draft_token_count.unwrap_or(0).max(0) as u32,
        draft_model: spec.draft_model.clone(),
        model_version: None,
        accelerator: match spec.accelerator() {
            (Some(t), n) => Some((t.as_str().to_string(), n.clamp(1, i64::from(u32::MAX)) as u32)),
            (None, _) => None,
        },
    }
}

/// How many replicas a deployment should have now: a `:scale` not yet acted on, else the
/// status's count moved by the autoscaler (`autoscale.rs`) from the load seen, within the
/// spec's bounds. Returns it with the `:scale` it has now acted on.
fn desired(
    ctx: &Context,
    name: &str,
    spec: &DeploymentSpec,
    status: &DeploymentStatus,
    replicas: &[Replica],
) -> (i32, i64) {
    let policy = Policy::of(spec, ctx.clock.wall());
    let (current, applied) = match spec.scale {
        Some(s) if s.seq > status.applied_scale => {
            // A `:scale` is use: the scale-to-zero window counts from it.
            ctx.fleet.touch_at(name, ctx.clock.now());
            (s.replica_count, s.seq)
        }
        _ => (status.desired_replicas.unwrap_or(policy.min), status.applied_scale),
    };
    // The gateway's count (requests in flight here, and waiting for a replica), or what the
    // replicas report when they hold more (requests from other gateways), and the requests
    // waiting at other gateways.
    let reported: u64 = replicas.iter().filter_map(|r| r.load.as_ref()).map(|l| l.running + l.waiting).sum();
    let seen = Observation {
        load: (ctx.fleet.load(name) + ctx.fleet.waiting(name)).max(reported as usize) + ctx.fleet.remote_waiting(name),
        last_request: ctx.fleet.last_request(name),
    };
    let mut scalers = ctx.scalers.lock().unwrap_or_else(|e| e.into_inner());
    let decided = scalers.entry(name.to_string()).or_default().decide(&policy, &seen, current, ctx.clock.now());
    if decided != current {
        tracing::info!(deployment = %name, from = current, to = decided, load = seen.load, "autoscaling");
    }
    (decided, applied)
}

/// What to do with a deployment's replicas this time: a pure function of what runs.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReplicaPlan {
    /// Replicas to start.
    pub start: usize,
    /// Replicas to take out of service (they drain first when ready).
    pub retire: HashSet<String>,
    /// The endpoints requests may go to.
    pub serving: Vec<String>,
    /// Replicas of the current spec still starting, after this plan.
    pub starting: i32,
    /// Replicas of an older spec exist (they drain once the new ones are ready).
    pub rolling: bool,
    /// A roll is under way: old replicas serve because the new ones are not all ready yet.
    pub updating: bool,
}

/// Closes the gap between `desired` and the replicas of the current spec (`current`);
/// replicas of an older spec (`stale`) serve until enough new ones are ready, then retire.
/// Extra replicas retire those still starting first (they serve nobody yet), then those
/// already draining, so a replica is never picked to drain in place of another.
pub(crate) fn plan_replicas(
    current: &[Replica],
    stale: &[Replica],
    desired: i32,
    draining: &HashMap<String, Instant>,
) -> ReplicaPlan {
    let ready_now = current.iter().filter(|r| r.phase == Phase::Ready).count() as i32;
    let starting_now = current.iter().filter(|r| r.phase == Phase::Starting).count() as i32;
    let have = ready_now + starting_now;
    let mut plan = ReplicaPlan { starting: starting_now, ..ReplicaPlan::default() };
    if have < desired {
        plan.start = (desired - have) as usize;
        plan.starting += desired - have;
    } else if have > desired {
        let mut order: Vec<&Replica> = current.iter().collect();
        order.sort_by_key(|r| (r.phase == Phase::Ready, !draining.contains_key(&r.id), r.id.clone()));
        for r in order.into_iter().take((have - desired) as usize) {
            plan.retire.insert(r.id.clone());
            if r.phase == Phase::Starting {
                plan.starting -= 1;
            }
        }
    }
    plan.rolling = !stale.is_empty();
    let roll_done = ready_now >= desired;
    plan.updating = plan.rolling && !roll_done;
    if plan.rolling && roll_done {
        plan.retire.extend(stale.iter().map(|r| r.id.clone()));
    }
    plan.serving = current
        .iter()
        .chain(stale.iter().filter(|_| !roll_done))
        .filter(|r| r.phase == Phase::Ready && !plan.retire.contains(&r.id))
        .map(|r| r.endpoint.clone())
        .collect();
    plan
}

/// Takes a replica out of service without cutting a request short. One still starting stops
/// at once. A ready one first leaves the published ready set (this call), so the router
/// sends it nothing new; a later call stops it once its requests in flight are done, or
/// after `DRAIN_TIMEOUT`. Returns whether it is still draining.
async fn retire(ctx: &Context, r: &Replica) -> Result<bool> {
    let now = ctx.clock.now();
    let since = {
        let mut draining = ctx.draining();
        match draining.get(&r.id) {
            Some(t) => Some(*t),
            None => {
                draining.insert(r.id.clone(), now);
                None
            }
        }
    };
    let done = match since {
        _ if r.phase != Phase::Ready => true,
        None => false,
        Some(t) => ctx.fleet.in_flight(&r.endpoint) == 0 || now.saturating_duration_since(t) >= DRAIN_TIMEOUT,
    };
    if done {
        ctx.stop_all(std::slice::from_ref(r)).await?;
    }
    Ok(!done)
}

/// What one replica said about the addons.
enum Synced {
    /// The addons (by model name) it holds now, and those it refused, with why.
    Answered { has: HashSet<String>, refused: HashMap<String, String> },
    /// It did not answer; the next reconcile asks again.
    Silent,
}

/// Brings every serving replica to the deployment's target version (`hearth_control::hot_load`)
/// and records the version they all serve as the active one. A target that cannot be fetched,
/// or that a replica refuses, is recorded as the deployment's hot-load problem, with the old
/// version serving, and not tried again until the target changes. Returns whether replicas are
/// still on their way to the target.
async fn sync_version(
    ctx: &Context,
    key: &DeploymentKey,
    name: &str,
    hot: Option<&HotLoadSpec>,
    status: &DeploymentStatus,
    serving: &[(&str, Option<&str>)],
) -> Result<bool> {
    let target = hot.and_then(|h| h.target_version.as_deref());
    let failed = status.hot_load_problem.as_ref().filter(|p| Some(p.version.as_str()) == target);
    let mut at: Vec<Option<String>> = {
        let taken = ctx.versions.lock().unwrap_or_else(|e| e.into_inner());
        serving.iter().map(|(ep, v)| taken.get(*ep).cloned().or(v.map(str::to_string))).collect()
    };
    let mut problem = None;
    let mut busy = false;
    if let (Some(hot), Some(target), None) = (hot, target, failed) {
        let behind: Vec<usize> = (0..serving.len()).filter(|&i| at[i].as_deref() != Some(target)).collect();
        if !behind.is_empty() {
            let files =
                ctx.control.model_version_files(name, hot, target).await.map_err(Problem::from).and_then(|dir| {
                    let files = ReplicaFiles::Version { deployment: name, version: target, dir: &dir };
                    ctx.runtime.replica_files(&files).map_err(|e| Problem::new(e.code(), e.public_message()))
                });
            match files {
                Err(p) => problem = Some(p),
                Ok(model_path) => {
                    let req = LoadModelVersionRequest { model_path, version: target.to_string() };
                    let answers =
                        join_all(behind.iter().map(|&i| ctx.replicas.load_model_version(serving[i].0, &req))).await;
                    for (&i, answer) in behind.iter().zip(answers) {
                        match answer {
                            Ok(()) => {
                                at[i] = Some(target.to_string());
                                ctx.versions
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(serving[i].0.to_string(), target.to_string());
                            }
                            Err(RuntimeError::Refused { message, .. }) => {
                                problem = Some(Problem::new(Code::FailedPrecondition, message))
                            }
                            Err(e) => {
                                tracing::warn!(deployment = name, error = %e, "a replica did not take the version yet");
                                busy = true;
                            }
                        }
                    }
                }
            }
        }
    }
    // The version every serving replica has; while they differ, the one before.
    let common = match at.split_first() {
        Some((first, rest)) if first.is_some() && rest.iter().all(|v| v == first) => first.clone(),
        _ => status.active_model_version.clone(),
    };
    let problem = problem.map(|p| HotLoadProblem {
        version: target.unwrap_or_default().to_string(),
        problem: Problem::new(
            Code::FailedPrecondition,
            format!(
                "model version {} could not be served ({}); {} goes on serving. Set another targetModelVersion to \
                 try again",
                target.unwrap_or_default(),
                p.message,
                common.as_deref().map_or("the base model's own files".to_string(), |v| format!("version {v}"))
            ),
        ),
    });
    let keep_problem = failed.cloned().or(problem);
    if common != status.active_model_version || keep_problem != status.hot_load_problem {
        if let Some(p) = &keep_problem {
            tracing::warn!(deployment = name, reason = %p.problem.message, "model version refused");
        } else if let Some(v) = &common {
            tracing::info!(deployment = name, version = %v, "model version active");
        }
        ctx.control
            .observe_deployment(key, |s| {
                s.active_model_version = common.clone();
                s.hot_load_problem = keep_problem.clone();
            })
            .await?;
        // Fetched versions that are neither serving nor wanted take a model's room each.
        let keep: Vec<&str> = [common.as_deref(), target].into_iter().flatten().collect();
        ctx.control.forget_model_versions(name, &keep).await;
    }
    Ok(busy)
}

/// Makes every serving replica hold exactly the addons loaded onto the deployment (in merged
/// mode, have the one addon merged), asking all replicas at once, and writes each addon's
/// status: DEPLOYED once every serving replica has it, a replica's refusal in its status.
/// Returns whether an addon is still on its way.
async fn sync_addons(
    ctx: &Context,
    deployment: &str,
    merged_mode: bool,
    endpoints: &[String],
    addons: Vec<Addon>,
) -> Result<bool> {
    let wanted = addons
        .iter()
        .map(|a| {
            Ok((a.model.clone(), ctx.runtime.replica_files(&ReplicaFiles::Model { name: &a.model, dir: &a.dir })?))
        })
        .collect::<Result<Vec<(String, String)>>>()?;
    let answers = join_all(endpoints.iter().map(|ep| sync_replica(ctx, deployment, ep, merged_mode, &wanted))).await;
    let mut busy = false;
    for addon in addons {
        let mut refused = None;
        let mut everywhere = !endpoints.is_empty();
        for answer in &answers {
            match answer {
                Synced::Answered { has, refused: r } => {
                    if let Some(why) = r.get(&addon.model) {
                        refused = Some(why.clone());
                    }
                    everywhere &= has.contains(&addon.model);
                }
                Synced::Silent => everywhere = false,
            }
        }
        let phase = if everywhere { AddonPhase::Deployed } else { AddonPhase::Deploying };
        let problem = refused.map(|m| Problem::new(Code::FailedPrecondition, m));
        busy |= !everywhere && problem.is_none() && !endpoints.is_empty();
        if addon.status.phase != phase || addon.status.problem != problem {
            ctx.control
                .observe_addon(&addon.account, &addon.id, |s| {
                    s.phase = phase;
                    s.problem = problem.clone();
                })
                .await?;
        }
    }
    Ok(busy)
}

/// Brings one replica's adapters to `wanted` (model name, files), observing them first.
async fn sync_replica(
    ctx: &Context,
    deployment: &str,
    endpoint: &str,
    merged_mode: bool,
    wanted: &[(String, String)],
) -> Synced {
    let api = &ctx.replicas;
    let listed: AdapterList = match api.adapters(endpoint).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(deployment, replica = %endpoint, error = %e, "could not list a replica's adapters");
            return Synced::Silent;
        }
    };
    let mut has: HashSet<String> = listed.adapters.iter().map(|a| a.name.clone()).collect();
    let mut refused = HashMap::new();
    let request = |model: &str, path: &str| LoadAdapterRequest {
        lora_name: model.to_string(),
        lora_path: path.to_string(),
        expected_version: None,
    };
    if merged_mode {
        // Per-request adapters (from before the deployment switched modes) go first: an
        // engine does not mix them with a merged one.
        for stale in std::mem::take(&mut has) {
            if let Err(e) = api.unload_adapter(endpoint, &stale).await {
                tracing::warn!(deployment, replica = %endpoint, adapter = %stale, error = %e, "unload failed");
            }
        }
        let merged = listed.merged.map(|m| m.name);
        // At most one addon: a newer load replaced the others (replaceMergedAddon).
        match (wanted.first(), merged) {
            (Some((model, _)), Some(m)) if *m == *model => {
                has.insert(m);
            }
            (Some((model, path)), _) => match api.merge_adapter(endpoint, &request(model, path)).await {
                Ok(_) => {
                    tracing::info!(deployment, adapter = %model, replica = %endpoint, "merged addon changed");
                    has.insert(model.clone());
                }
                Err(RuntimeError::Refused { message, .. }) => {
                    tracing::warn!(deployment, adapter = %model, replica = %endpoint, reason = %message, "merge refused");
                    refused.insert(model.clone(), message);
                }
                Err(e) => tracing::warn!(deployment, replica = %endpoint, error = %e, "merge failed; retrying"),
            },
            (None, Some(_)) => {
                if let Err(e) = api.unmerge_adapter(endpoint).await {
                    tracing::warn!(deployment, replica = %endpoint, error = %e, "unmerge failed; retrying");
                }
            }
            (None, None) => {}
        }
        return Synced::Answered { has, refused };
    }
    for (model, path) in wanted {
        if has.contains(model) {
            continue;
        }
        match api.load_adapter(endpoint, &request(model, path)).await {
            Ok(_) => {
                tracing::info!(deployment, adapter = %model, replica = %endpoint, "adapter loaded on replica");
                has.insert(model.clone());
            }
            Err(RuntimeError::Refused { message, .. }) => {
                tracing::warn!(deployment, adapter = %model, replica = %endpoint, reason = %message, "adapter refused");
                refused.insert(model.clone(), message);
            }
            Err(e) => {
                tracing::warn!(deployment, adapter = %model, replica = %endpoint, error = %e, "load failed; retrying")
            }
        }
    }
    let wanted_names: HashSet<&str> = wanted.iter().map(|(m, _)| m.as_str()).collect();
    for stale in has.iter().filter(|h| !wanted_names.contains(h.as_str())).cloned().collect::<Vec<_>>() {
        match api.unload_adapter(endpoint, &stale).await {
            Ok(()) => {
                tracing::info!(deployment, adapter = %stale, replica = %endpoint, "adapter unloaded from replica");
                has.remove(&stale);
            }
            Err(e) => tracing::warn!(deployment, adapter = %stale, replica = %endpoint, error = %e, "unload failed"),
        }
    }
    Synced::Answered { has, refused }
}

/// How long to wait before trying a failing deployment again: doubling from a quarter of a
/// second, at most 30 seconds.
pub fn backoff(attempts: u32) -> Duration {
    let base = Duration::from_millis(250);
    base.saturating_mul(1u32 << attempts.saturating_sub(1).min(7)).min(Duration::from_secs(30))
}

/// Records a failed reconcile in the deployment's status (best effort: the status write may
/// be what failed) and says when to try again. `attempts` counts the failures in a row.
pub async fn error_policy(ctx: &Context, key: &DeploymentKey, error: &RuntimeError, attempts: u32) -> Duration {
    let wait = backoff(attempts);
    tracing::warn!(deployment = %key, error = %error, attempts, retry_in_ms = wait.as_millis() as u64, "reconcile failed");
    let problem = Problem::new(
        error.code(),
        format!("hearth could not bring this deployment to its spec: {}; retrying", error.public_message()),
    );
    if let Err(e) = ctx.control.observe_deployment(key, |s| s.error = Some(problem.clone())).await {
        tracing::warn!(deployment = %key, error = %e, "could not record the reconcile error in the status");
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, phase: Phase) -> Replica {
        Replica {
            id: id.to_string(),
            deployment: "d".to_string(),
            fingerprint: "f".to_string(),
            endpoint: format!("http://{id}"),
            phase,
            was_ready: false,
            load: None,
        }
    }

    #[test]
    fn the_plan_starts_what_is_missing_and_retires_starting_replicas_before_ready_ones() {
        let none = HashMap::new();
        let plan = plan_replicas(&[replica("a", Phase::Ready)], &[], 3, &none);
        assert_eq!((plan.start, plan.starting), (2, 2));
        assert_eq!(plan.serving, vec!["http://a"]);
        let current = [replica("a", Phase::Ready), replica("b", Phase::Starting), replica("c", Phase::Ready)];
        let plan = plan_replicas(&current, &[], 1, &none);
        assert_eq!(plan.retire, HashSet::from(["b".to_string(), "a".to_string()]));
        assert_eq!(plan.serving, vec!["http://c"]);
        // One already draining is retired before a fresh one is picked.
        let draining = HashMap::from([("c".to_string(), Instant::now())]);
        let plan = plan_replicas(&current, &[], 2, &draining);
        assert_eq!(plan.retire, HashSet::from(["b".to_string()]));
        let plan = plan_replicas(&current, &[], 1, &draining);
        assert_eq!(plan.retire, HashSet::from(["b".to_string(), "c".to_string()]));
    }

    #[test]
    fn a_roll_keeps_old_replicas_serving_until_the_new_ones_are_ready() {
        let none = HashMap::new();
        let old = [replica("old", Phase::Ready)];
        let plan = plan_replicas(&[replica("new", Phase::Starting)], &old, 1, &none);
        assert!(plan.rolling && plan.updating && plan.retire.is_empty());
        assert_eq!(plan.serving, vec!["http://old"]);
        let plan = plan_replicas(&[replica("new", Phase::Ready)], &old, 1, &none);
        assert_eq!(plan.retire, HashSet::from(["old".to_string()]));
        assert_eq!(plan.serving, vec!["http://new"]);
        assert!(!plan.updating);
    }

    #[test]
    fn backoff_doubles_and_stops_at_thirty_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(4), Duration::from_secs(2));
        assert_eq!(backoff(50), Duration::from_secs(30));
    }
}
