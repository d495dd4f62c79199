//! A deployment as stored: its spec (what the user asked, written by API calls only) and its
//! status (what the runtime observed, written by the reconciler only), two rows under the same
//! id, and the one conversion of the pair to the API's `Deployment`.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hearth_api::duration::ProtoDuration;
use hearth_api::names::{Collection, ResourceName};
use hearth_api::resources::{
    AutoscalingPolicy, Deployment, DeploymentState, DirectRouteType, HotLoadBucketType, Precision, ReplicaStats,
};
use hearth_api::rpc::ResourceStatus;
use hearth_api::Code;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{echo_of, with_echo, Record, DEPLOYMENTS, DEPLOYMENT_STATUS};
use crate::schedules::{self, Schedule};

/// Wire fields of a deployment stored only to be echoed back: they describe hardware
/// placement, which hearth has no counterpart for, or are annotations.
pub(crate) const ECHO_FIELDS: &[&str] = &[
    "annotations",
    "acceleratorCount",
    "acceleratorType",
    "placement",
    "deploymentShape",
    "disableDeploymentSizeValidation",
    "engine",
    "forTraining",
];

/// The autoscaling knobs, with their defaults filled in on create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Autoscaling {
    pub scale_up_window_seconds: f64,
    pub scale_down_window_seconds: f64,
    pub scale_to_zero_window_seconds: f64,
    /// `loadTargets.default`: the share of a replica's batch to keep busy.
    pub load_target: f64,
    /// `scalingSchedules`, by name.
    pub schedules: BTreeMap<String, Schedule>,
}

impl Default for Autoscaling {
    fn default() -> Autoscaling {
        use crate::deployments::{
            DEFAULT_LOAD_TARGET, DEFAULT_SCALE_DOWN_WINDOW, DEFAULT_SCALE_TO_ZERO_WINDOW, DEFAULT_SCALE_UP_WINDOW,
        };
        Autoscaling {
            scale_up_window_seconds: DEFAULT_SCALE_UP_WINDOW as f64,
            scale_down_window_seconds: DEFAULT_SCALE_DOWN_WINDOW as f64,
            scale_to_zero_window_seconds: DEFAULT_SCALE_TO_ZERO_WINDOW as f64,
            load_target: DEFAULT_LOAD_TARGET,
            schedules: BTreeMap::new(),
        }
    }
}

impl Autoscaling {
    pub fn scale_up_window(&self) -> Duration {
        Duration::from_secs_f64(self.scale_up_window_seconds.max(0.0))
    }

    pub fn scale_down_window(&self) -> Duration {
        Duration::from_secs_f64(self.scale_down_window_seconds.max(0.0))
    }

    pub fn scale_to_zero_window(&self) -> Duration {
        Duration::from_secs_f64(self.scale_to_zero_window_seconds.max(0.0))
    }
}

/// A `:scale` request: the count asked for, numbered so the reconciler can tell a new one
/// from one it already acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleRequest {
    pub replica_count: i32,
    pub seq: i64,
}

/// What a deployment asks for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeploymentSpec {
    /// `accounts/{a}/models/{m}`.
    pub base_model: String,
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub min_replica_count: i32,
    pub max_replica_count: i32,
    pub autoscaling: Autoscaling,
    /// A precision's wire name (`FP32`, `BF16`, `FP16`); none serves the checkpoint as stored.
    pub precision: Option<String>,
    pub enable_addons: Option<bool>,
    pub enable_hot_reload_latest_addon: Option<bool>,
    pub num_peft_device_cached: Option<i32>,
    pub max_context_length: Option<i32>,
    /// When the control plane deletes the deployment by itself.
    pub expire_time: Option<DateTime<Utc>>,
    /// Set by a soft delete; the deployment is DELETED while it is.
    pub delete_time: Option<DateTime<Utc>>,
    pub purge_time: Option<DateTime<Utc>>,
    /// Counts changes to the spec (updates, undeletes), so the status can say which one it
    /// has caught up with.
    pub generation: i64,
    /// The last `:scale`.
    pub scale: Option<ScaleRequest>,
    /// Wire fields kept only for echo ([`ECHO_FIELDS`]), in their wire form.
    pub echo: Map<String, Value>,
    /// A direct route (`directRouteType: INTERNET`): the SHA-256 of each key it accepts. The
    /// keys themselves are never stored, so the API never shows them again.
    pub direct_route_key_hashes: Option<Vec<String>>,
    /// `enableSessionAffinity`.
    pub enable_session_affinity: Option<bool>,
    /// `ngramSpeculationLength`: prompt-lookup speculation on the replicas (0 or none: off).
    pub ngram_speculation_length: Option<i32>,
    /// `draftTokenCount`: the most tokens one speculation drafts.
    pub draft_token_count: Option<i32>,
    /// `draftModel`: the base model whose proposals the replicas verify (checked to share the
    /// base model's tokenizer when set; the model's `defaultDraftModel` when the create named
    /// none).
    pub draft_model: Option<String>,
    /// `enableHotLoad` and its bucket: versions of the weights replaced in place.
    pub hot_load: Option<HotLoadSpec>,
}

/// A deployment's hot load (`crate::hot_load`): where its versions are, and which to serve.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HotLoadSpec {
    /// `hotLoadBucketType` as given (its wire name), or none.
    pub bucket_type: Option<String>,
    /// `hotLoadBucketUrl`: `file:///a/dir` or `s3://bucket/prefix`; a version is a folder
    /// under it.
    pub bucket_url: String,
    /// `targetModelVersion`: the folder to serve; none serves the base model's own files.
    pub target_version: Option<String>,
}

impl Record for DeploymentSpec {
    const KIND: &'static str = DEPLOYMENTS;
    const SCHEMA: u32 = 1;

    /// Schema 0 was the API's `Deployment` JSON holding spec and status together.
    fn upgrade(row: Map<String, Value>, from: u32) -> Result<Map<String, Value>, String> {
        if from >= 1 {
            return Ok(row);
        }
        let wire: Deployment = super::decode_lenient(Value::Object(row));
        let spec = DeploymentSpec { generation: 1, ..DeploymentSpec::from_wire(&wire) };
        match serde_json::to_value(spec) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("could not upgrade a schema 0 deployment".to_string()),
        }
    }
}

impl DeploymentSpec {
    /// The spec part of a wire deployment (already validated and normalised).
    pub(crate) fn from_wire(d: &Deployment) -> DeploymentSpec {
        let policy = d.autoscaling_policy.clone().unwrap_or_default();
        let defaults = Autoscaling::default();
        let secs = |w: Option<ProtoDuration>, default: f64| w.map_or(default, |w| w.0.as_secs_f64());
        DeploymentSpec {
            base_model: d.base_model.clone().unwrap_or_default(),
            display_name: d.display_name.clone(),
            description: d.description.clone(),
            min_replica_count: d.min_replica_count.unwrap_or(0),
            max_replica_count: d.max_replica_count.unwrap_or(1),
            autoscaling: Autoscaling {
                scale_up_window_seconds: secs(policy.scale_up_window, defaults.scale_up_window_seconds),
                scale_down_window_seconds: secs(policy.scale_down_window, defaults.scale_down_window_seconds),
                scale_to_zero_window_seconds: secs(policy.scale_to_zero_window, defaults.scale_to_zero_window_seconds),
                load_target: policy
                    .load_targets
                    .as_ref()
                    .and_then(|t| t.get("default").copied())
                    .unwrap_or(defaults.load_target),
                // Validated in `normalise`; from a stored row, one that no longer reads is dropped.
                schedules: policy
                    .scaling_schedules
                    .as_ref()
                    .and_then(|w| schedules::from_wire(w, d.max_replica_count.unwrap_or(1)).ok())
                    .unwrap_or_default(),
            },
            precision: d.precision.filter(|p| *p != Precision::Unspecified).map(|p| p.as_str().to_string()),
            enable_addons: d.enable_addons,
            enable_hot_reload_latest_addon: d.enable_hot_reload_latest_addon,
            num_peft_device_cached: d.num_peft_device_cached,
            max_context_length: d.max_context_length,
            expire_time: d.expire_time,
            delete_time: d.delete_time,
            purge_time: d.purge_time,
            generation: 0,
            scale: None,
            echo: echo_of(d, ECHO_FIELDS),
            enable_session_affinity: d.enable_session_affinity,
            ngram_speculation_length: d.ngram_speculation_length,
            draft_token_count: d.draft_token_count,
            draft_model: d.draft_model.clone().filter(|m| !m.is_empty()),
            hot_load: (d.enable_hot_load == Some(true)).then(|| HotLoadSpec {
                bucket_type: d
                    .hot_load_bucket_type
                    .filter(|t| *t != HotLoadBucketType::Unspecified)
                    .map(|t| t.as_str().to_string()),
                bucket_url: d.hot_load_bucket_url.clone().unwrap_or_default(),
                target_version: d.target_model_version.clone().filter(|v| !v.is_empty()),
            }),
            direct_route_key_hashes: (d.direct_route_type == Some(DirectRouteType::Internet))
                .then(|| d.direct_route_api_keys.iter().flatten().map(|k| crate::auth::hash_key(k)).collect()),
        }
    }

    /// The user-settable fields as the API shows them: what a PATCH applies to.
    pub(crate) fn to_wire(&self) -> Deployment {
        let d = Deployment {
            base_model: Some(self.base_model.clone()).filter(|b| !b.is_empty()),
            display_name: self.display_name.clone(),
            description: self.description.clone(),
            min_replica_count: Some(self.min_replica_count),
            max_replica_count: Some(self.max_replica_count),
            autoscaling_policy: Some(AutoscalingPolicy {
                scale_up_window: Some(ProtoDuration(self.autoscaling.scale_up_window())),
                scale_down_window: Some(ProtoDuration(self.autoscaling.scale_down_window())),
                scale_to_zero_window: Some(ProtoDuration(self.autoscaling.scale_to_zero_window())),
                load_targets: Some([("default".to_string(), self.autoscaling.load_target)].into()),
                scaling_schedules: Some(
                    self.autoscaling.schedules.iter().map(|(k, v)| (k.clone(), v.to_wire())).collect(),
                )
                .filter(|m: &BTreeMap<String, _>| !m.is_empty()),
            }),
            precision: self.precision.as_deref().and_then(|p| Precision::ALL.iter().copied().find(|x| x.as_str() == p)),
            enable_addons: self.enable_addons,
            enable_hot_reload_latest_addon: self.enable_hot_reload_latest_addon,
            num_peft_device_cached: self.num_peft_device_cached,
            max_context_length: self.max_context_length,
            expire_time: self.expire_time,
            delete_time: self.delete_time,
            purge_time: self.purge_time,
            direct_route_type: self.direct_route_key_hashes.as_ref().map(|_| DirectRouteType::Internet),
            enable_session_affinity: self.enable_session_affinity,
            ngram_speculation_length: self.ngram_speculation_length,
            draft_token_count: self.draft_token_count,
            draft_model: self.draft_model.clone(),
            enable_hot_load: self.hot_load.as_ref().map(|_| true),
            hot_load_bucket_type: self.hot_load.as_ref().and_then(|h| {
                h.bucket_type.as_deref().and_then(|t| HotLoadBucketType::ALL.iter().copied().find(|x| x.as_str() == t))
            }),
            hot_load_bucket_url: self.hot_load.as_ref().map(|h| h.bucket_url.clone()),
            target_model_version: self.hot_load.as_ref().and_then(|h| h.target_version.clone()),
            ..Deployment::default()
        };
        with_echo(d, &self.echo)
    }

    /// The accelerators each replica asks for: `acceleratorType` (none when unset or
    /// unspecified) and `acceleratorCount` (1 when unset). Stored as echo fields; the local
    /// runtime runs on this machine's devices, the Kubernetes runtime asks for them.
    pub fn accelerator(&self) -> (Option<hearth_api::resources::AcceleratorType>, i64) {
        let wire = self.to_wire();
        let t = wire.accelerator_type.filter(|t| *t != hearth_api::resources::AcceleratorType::Unspecified);
        (t, wire.accelerator_count.map_or(1, i64::from).max(1))
    }

    /// The minimum replica count in force at `now`: `minReplicaCount`, raised by the active
    /// scaling schedules ("max wins").
    pub fn effective_min_replica_count(&self, now: chrono::DateTime<chrono::Utc>) -> i32 {
        schedules::effective_min(self.min_replica_count, &self.autoscaling.schedules, now)
    }

    pub fn is_deleted(&self) -> bool {
        self.delete_time.is_some()
    }

    /// Whether requests of one session go to one replica (`enableSessionAffinity`).
    pub fn session_affinity(&self) -> bool {
        self.enable_session_affinity == Some(true)
    }

    /// Whether addons may be loaded onto it side by side.
    pub fn addons_enabled(&self) -> bool {
        self.enable_addons == Some(true)
    }

    /// The merged-addon mode (`enableHotReloadLatestAddon`).
    pub fn merged_mode(&self) -> bool {
        self.enable_hot_reload_latest_addon == Some(true)
    }

    /// Asks for `n` replicas, as a `:scale` does. Its number is above every earlier one, and
    /// so above whatever the status has acted on.
    pub(crate) fn request_scale(&mut self, n: i32) {
        let seq = self.scale.map_or(0, |r| r.seq) + 1;
        self.scale = Some(ScaleRequest { replica_count: n, seq });
    }

    /// A `:scale` the status has not acted on yet.
    pub fn pending_scale(&self, status: &DeploymentStatus) -> Option<i32> {
        self.scale.filter(|s| s.seq > status.applied_scale).map(|s| s.replica_count)
    }
}

/// What the reconciler last did with a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Not yet as ready as it asks to be.
    #[default]
    Creating,
    Ready,
    /// Old replicas still serve while new ones start (a rolling update).
    Updating,
    /// Deleted: runs nothing.
    Deleted,
}

/// A code and message for a person, as the API's `status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A google.rpc code name.
    pub code: String,
    pub message: String,
}

impl Problem {
    pub fn new(code: Code, message: impl Into<String>) -> Problem {
        Problem { code: code.name().to_string(), message: message.into() }
    }

    fn resource_status(&self) -> ResourceStatus {
        ResourceStatus { code: Some(self.code.clone()), message: Some(self.message.clone()) }
    }
}

/// The deployment could not be served at spec generation `generation`; it runs nothing until
/// the spec changes (an update, or an undelete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub generation: i64,
    #[serde(flatten)]
    pub problem: Problem,
}

/// What the runtime observed of a deployment: written only by the reconciler.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeploymentStatus {
    pub phase: Phase,
    /// The spec generation this status describes.
    pub observed_generation: i64,
    pub ready_replicas: i32,
    pub starting_replicas: i32,
    /// The replica count the autoscaler (or the last `:scale`) settled on.
    pub desired_replicas: Option<i32>,
    /// The `seq` of the last `:scale` acted on.
    pub applied_scale: i64,
    pub failure: Option<Failure>,
    /// The last reconcile's error, cleared by the next one that succeeds.
    pub error: Option<Problem>,
    /// `host:port` of the deployment's direct route, once a gateway listens there.
    pub direct_route_handle: Option<String>,
    /// The hot-loaded version every ready replica serves (`activeModelVersion`).
    pub active_model_version: Option<String>,
    /// Why the target version is not serving (it could not be fetched, or a replica refused
    /// it); the previous version goes on serving. Cleared when the target serves or changes.
    pub hot_load_problem: Option<HotLoadProblem>,
}

/// A target version that failed, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HotLoadProblem {
    pub version: String,
    pub problem: Problem,
}

impl Record for DeploymentStatus {
    const KIND: &'static str = DEPLOYMENT_STATUS;
    const SCHEMA: u32 = 1;

    fn upgrade(row: Map<String, Value>, _from: u32) -> Result<Map<String, Value>, String> {
        Ok(row)
    }
}

impl DeploymentStatus {
    /// The status part of a schema 0 deployment row, for the migration that splits it.
    pub(crate) fn from_v0(wire: &Deployment) -> DeploymentStatus {
        let state = wire.state.unwrap_or(DeploymentState::Creating);
        DeploymentStatus {
            phase: match state {
                DeploymentState::Ready => Phase::Ready,
                DeploymentState::Updating => Phase::Updating,
                DeploymentState::Deleted => Phase::Deleted,
                _ => Phase::Creating,
            },
            observed_generation: 1,
            ready_replicas: wire.replica_count.unwrap_or(0),
            starting_replicas: wire.replica_stats.as_ref().and_then(|s| s.initializing_replica_count).unwrap_or(0),
            desired_replicas: wire.desired_replica_count,
            applied_scale: 0,
            direct_route_handle: None,
            active_model_version: None,
            hot_load_problem: None,
            failure: (state == DeploymentState::Failed).then(|| Failure {
                generation: 1,
                problem: Problem {
                    code: wire.status.as_ref().and_then(|s| s.code.clone()).unwrap_or_else(|| "UNKNOWN".into()),
                    message: wire.status.as_ref().and_then(|s| s.message.clone()).unwrap_or_default(),
                },
            }),
            error: None,
        }
    }

    /// Whether the deployment failed at the spec's current generation.
    pub fn failed_at(&self, generation: i64) -> Option<&Problem> {
        self.failure.as_ref().filter(|f| f.generation == generation).map(|f| &f.problem)
    }
}

/// The state the API shows for a spec and status.
pub(crate) fn state_of(spec: &DeploymentSpec, status: &DeploymentStatus) -> DeploymentState {
    if spec.is_deleted() {
        return DeploymentState::Deleted;
    }
    if status.failed_at(spec.generation).is_some() {
        return DeploymentState::Failed;
    }
    match status.phase {
        // A spec changed since the runtime last looked: on its way to the new one.
        Phase::Ready if status.observed_generation < spec.generation => DeploymentState::Updating,
        Phase::Ready => DeploymentState::Ready,
        Phase::Updating => DeploymentState::Updating,
        Phase::Creating | Phase::Deleted => DeploymentState::Creating,
    }
}

/// The replica count a deployment is heading for, as the API shows it.
pub(crate) fn desired_of(spec: &DeploymentSpec, status: &DeploymentStatus) -> i32 {
    if spec.is_deleted() {
        return 0;
    }
    let (min, max) = (spec.min_replica_count, spec.max_replica_count.max(spec.min_replica_count));
    match spec.pending_scale(status) {
        Some(n) => n,
        None => status.desired_replicas.unwrap_or(min).clamp(min, max),
    }
}

/// The API's `Deployment` for a stored spec and status.
pub(crate) fn view(
    account: &str,
    id: &str,
    spec: &super::Doc<DeploymentSpec>,
    status: Option<&super::Doc<DeploymentStatus>>,
) -> Deployment {
    let empty = DeploymentStatus::default();
    let st = status.map_or(&empty, |s| &s.value);
    let mut d = spec.value.to_wire();
    d.name = Some(ResourceName::new(account, Collection::Deployments, id).to_string());
    if spec.value.direct_route_key_hashes.is_some() {
        d.direct_route_handle = st.direct_route_handle.clone();
    }
    d.create_time = Some(spec.create_time);
    d.update_time = Some(status.map_or(spec.update_time, |s| s.update_time.max(spec.update_time)));
    let state = state_of(&spec.value, st);
    d.state = Some(state);
    d.status = match state {
        DeploymentState::Failed => st.failed_at(spec.value.generation).map(Problem::resource_status),
        DeploymentState::Deleted => None,
        _ => st.error.as_ref().or(st.hot_load_problem.as_ref().map(|h| &h.problem)).map(Problem::resource_status),
    };
    d.active_model_version = st.active_model_version.clone();
    d.desired_replica_count = Some(desired_of(&spec.value, st));
    d.replica_count = Some(st.ready_replicas);
    d.replica_stats = Some(ReplicaStats {
        ready_replica_count: Some(st.ready_replicas),
        initializing_replica_count: Some(st.starting_replicas),
        ..ReplicaStats::default()
    });
    d
}

/// What the API shows for a deployment whose spec row cannot be read: its name, its status as
/// last observed, and why the rest is missing. Its replicas keep running as they were.
pub(crate) fn unreadable_view(
    account: &str,
    id: &str,
    why: &str,
    status: Option<&super::Doc<DeploymentStatus>>,
) -> Deployment {
    let st = status.map(|s| s.value.clone()).unwrap_or_default();
    Deployment {
        name: Some(ResourceName::new(account, Collection::Deployments, id).to_string()),
        update_time: status.map(|s| s.update_time),
        state: Some(match st.phase {
            Phase::Ready => DeploymentState::Ready,
            Phase::Updating => DeploymentState::Updating,
            Phase::Deleted => DeploymentState::Deleted,
            Phase::Creating => DeploymentState::Creating,
        }),
        status: Some(ResourceStatus::new(
            Code::DataLoss,
            format!(
                "the stored deployment record is unreadable ({why}); its replicas keep running as they were. \
                 Delete it with hard=true and create it again, or restore the record"
            ),
        )),
        replica_count: Some(st.ready_replicas),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::decode_body;

    #[test]
    fn a_schema_0_row_reads_and_keeps_what_the_user_set() {
        // Written by an older hearth: the API's JSON, status included, and a field
        // (`engine`) that no version of the record knows.
        let row = r#"{"baseModel": "accounts/a/models/m", "displayName": "x", "minReplicaCount": 1,
            "maxReplicaCount": 2, "state": "READY", "replicaCount": 1, "desiredReplicaCount": 2,
            "acceleratorType": "NVIDIA_H100_80GB", "engine": "ENGINE_UNSPECIFIED",
            "autoscalingPolicy": {"scaleUpWindow": "45s", "loadTargets": {"default": 0.5}}}"#;
        let spec: DeploymentSpec = decode_body(row).expect("reads");
        assert_eq!(spec.base_model, "accounts/a/models/m");
        assert_eq!((spec.min_replica_count, spec.max_replica_count, spec.generation), (1, 2, 1));
        assert_eq!(spec.autoscaling.scale_up_window_seconds, 45.0);
        assert_eq!(spec.autoscaling.load_target, 0.5);
        let wire = spec.to_wire();
        assert_eq!(wire.accelerator_type.map(|t| t.as_str()), Some("NVIDIA_H100_80GB"));
        assert_eq!(wire.display_name.as_deref(), Some("x"));
    }

    #[test]
    fn state_follows_spec_and_status() {
        let spec = DeploymentSpec { generation: 2, min_replica_count: 1, max_replica_count: 3, ..Default::default() };
        let ready = DeploymentStatus { phase: Phase::Ready, observed_generation: 2, ..Default::default() };
        assert_eq!(state_of(&spec, &ready), DeploymentState::Ready);
        let behind = DeploymentStatus { observed_generation: 1, ..ready.clone() };
        assert_eq!(state_of(&spec, &behind), DeploymentState::Updating, "a change not yet observed");
        let failed = DeploymentStatus {
            failure: Some(Failure { generation: 2, problem: Problem::new(Code::FailedPrecondition, "no") }),
            ..ready.clone()
        };
        assert_eq!(state_of(&spec, &failed), DeploymentState::Failed);
        let retried = DeploymentSpec { generation: 3, ..spec.clone() };
        assert_ne!(state_of(&retried, &failed), DeploymentState::Failed, "a new generation tries again");
        let deleted = DeploymentSpec { delete_time: Some(Utc::now()), ..spec.clone() };
        assert_eq!(state_of(&deleted, &ready), DeploymentState::Deleted);
        // desiredReplicaCount: a pending :scale wins, else the status's level within bounds.
        let scaled = DeploymentSpec { scale: Some(ScaleRequest { replica_count: 3, seq: 1 }), ..spec.clone() };
        assert_eq!(desired_of(&scaled, &ready), 3);
        let acted = DeploymentStatus { applied_scale: 1, desired_replicas: Some(5), ..ready.clone() };
        assert_eq!(desired_of(&scaled, &acted), 3, "clamped to maxReplicaCount");
        assert_eq!(desired_of(&deleted, &acted), 0);
    }
}
