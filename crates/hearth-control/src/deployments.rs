//! The Deployments service: create, read, update, soft delete, undelete, scale, expire and
//! purge deployments. It writes only the spec row of a deployment; the state the API shows
//! comes from the status row the runtime's reconciler writes (`records/deployment.rs`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::Utc;

use hearth_api::duration::ProtoDuration;
use hearth_api::names::{validate_id, Collection, ResourceName};
use hearth_api::resources::{
    AutoscalingPolicy, Deployment, DeploymentState, DirectRouteType, ModelKind, ModelState, Precision,
    ScaleDeploymentRequest,
};
use serde_json::Value;

use crate::auth::Principal;
use crate::error::{ControlError, Result};
use crate::listing::{paginate, render, ListPage, ListRequest, Listable};
use crate::observe::DeploymentKey;
use crate::patch::{Patch, Patchable};
use crate::quotas::QuotaId;
use crate::records::deployed_model::{DeployedModelSpec, DeployedModelStatus};
use crate::records::deployment::{self as record, DeploymentSpec, DeploymentStatus};
use crate::records::{decode_body, random_id, Doc, Record, DEPLOYMENTS};
use crate::ControlPlane;

/// Replica counts above this are refused: a typo, not a plan, on any machine hearth runs on.
pub const MAX_REPLICAS: i32 = 1000;

/// Sequences one replica decodes together at most (the engine's `--max-running`); one
/// replica's capacity, to the autoscaler.
pub const REPLICA_BATCH_SIZE: usize = 64;

pub const DEFAULT_SCALE_UP_WINDOW: u64 = 30;
pub const DEFAULT_SCALE_DOWN_WINDOW: u64 = 600;
pub const DEFAULT_SCALE_TO_ZERO_WINDOW: u64 = 3600;
/// The shortest scale-to-zero window the hosted service accepts; `hearth serve
/// --min-scale-to-zero-window` may lower it.
pub const MIN_SCALE_TO_ZERO_WINDOW: u64 = 300;
pub const MAX_SCALE_WINDOW: u64 = 3600;
pub const DEFAULT_LOAD_TARGET: f64 = 0.8;

pub(crate) const DEPLOYMENT_LIST: Listable = Listable {
    fields: &[
        "name",
        "displayName",
        "description",
        "createTime",
        "updateTime",
        "deleteTime",
        "purgeTime",
        "state",
        "baseModel",
        "minReplicaCount",
        "maxReplicaCount",
        "desiredReplicaCount",
        "replicaCount",
        "acceleratorType",
        "acceleratorCount",
        "precision",
        "enableAddons",
        "enableHotReloadLatestAddon",
        "numPeftDeviceCached",
        "deploymentShape",
    ],
    default_order: "createTime",
};

const DEPLOYMENT_PATCH: Patchable = Patchable {
    resource: "deployment",
    output_only: &[
        "name",
        "createTime",
        "updateTime",
        "purgeTime",
        "deleteTime",
        "state",
        "status",
        "desiredReplicaCount",
        "replicaCount",
        "cluster",
        "directRouteHandle",
        "region",
        "replicaStats",
        "activeModelVersion",
    ],
    mutable: &[
        "displayName",
        "description",
        "expireTime",
        "annotations",
        "minReplicaCount",
        "maxReplicaCount",
        "autoscalingPolicy",
        "baseModel",
        "acceleratorCount",
        "acceleratorType",
        "precision",
        "enableAddons",
        "numPeftDeviceCached",
        "placement",
        "maxContextLength",
        "disableDeploymentSizeValidation",
        "enableHotReloadLatestAddon",
        "deploymentShape",
        "enableSessionAffinity",
        "directRouteApiKeys",
        "directRouteType",
        "engine",
        "forTraining",
        "ngramSpeculationLength",
        "draftTokenCount",
        "draftModel",
        "enableHotLoad",
        "hotLoadBucketType",
        "hotLoadBucketUrl",
        "targetModelVersion",
        // Refused as unimplemented when set.
        "maxWithRevocableReplicaCount",
        "deploymentTemplate",
        "autoTune",
        "pricingPlanId",
        "hotLoadTrainerJob",
        "enableMtp",
    ],
};

/// Query flags of create that hearth acts on. (The others only skip checks hearth does not
/// make: see the gateway's handler.)
#[derive(Debug, Clone, Default)]
pub struct CreateDeploymentOptions {
    pub deployment_id: Option<String>,
    pub validate_only: bool,
    /// Do not make this deployment where the base model's plain name is served.
    pub disable_auto_deploy: bool,
    /// No speculation: the base model's `defaultDraftModel` is not applied.
    pub disable_speculative_decoding: bool,
}

fn not_found(account: &str, id: &str) -> ControlError {
    ControlError::NotFound(format!("deployment accounts/{account}/deployments/{id} not found"))
}

/// The longest n-gram and the most drafted tokens a deployment's speculation may ask for:
/// beyond that a verification pass costs more than its drafts save on any machine hearth runs on.
pub(crate) const MAX_SPECULATION: i32 = 16;

/// Refuses the fields hearth parses but does not act on, naming each and saying why: what
/// hearth does instead, so the message says what to do. `docs/fields.md` ("What stays
/// refused") lists the same.
fn refuse_unimplemented(d: &Deployment) -> Result<()> {
    let set_str = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    let checks: [(&str, bool, &str); 7] = [
        (
            "maxWithRevocableReplicaCount",
            d.max_with_revocable_replica_count.is_some_and(|n| n != 0),
            "hearth has no revocable (preemptible) capacity: every replica it runs is a full one; use \
             maxReplicaCount",
        ),
        (
            "directRouteType",
            d.direct_route_type.is_some_and(|t| !matches!(t, DirectRouteType::Unspecified | DirectRouteType::Internet)),
            "private-link direct routes need a cloud provider's network, which hearth does not have; use INTERNET \
             (an endpoint of the deployment's own, on the gateway's host)",
        ),
        (
            "deploymentTemplate",
            set_str(&d.deployment_template),
            "hearth has no deployment templates: set the deployment's own fields",
        ),
        (
            "autoTune",
            d.auto_tune.as_ref().is_some_and(|a| a.long_prompt == Some(true)),
            "hearth has nothing to tune for long prompts: its engine prefills them in bounded chunks \
             (hearth engine --max-step-tokens); leave autoTune unset",
        ),
        (
            "hotLoadTrainerJob",
            set_str(&d.hot_load_trainer_job),
            "hearth runs no trainer jobs: upload a trained adapter as a model and load it onto the deployment",
        ),
        ("pricingPlanId", set_str(&d.pricing_plan_id), "hearth has no pricing plans: it charges nothing"),
        (
            "enableMtp",
            d.enable_mtp == Some(true),
            "multi-token prediction needs a model's MTP heads, which hearth's engine does not run; leave it unset",
        ),
    ];
    if let Some((field, _, why)) = checks.iter().find(|(_, set, _)| *set) {
        return Err(ControlError::Unimplemented(format!("deployment field `{field}` is not supported: {why}")));
    }
    if let Some(engine) = d.engine.as_deref().filter(|e| !e.is_empty() && *e != "ENGINE_UNSPECIFIED") {
        return Err(ControlError::Unimplemented(format!(
            "deployment field engine = {engine:?} is not supported: hearth serves every deployment with its own \
             engine; leave engine unset or ENGINE_UNSPECIFIED"
        )));
    }
    if d.for_training == Some(true) {
        return Err(ControlError::Unimplemented(
            "deployment field forTraining = true is not supported: hearth deployments serve inference; leave it unset \
             or false"
                .to_string(),
        ));
    }
    if let Some(p) = d.precision {
        if !matches!(p, Precision::Unspecified | Precision::Fp16 | Precision::Bf16 | Precision::Fp32) {
            return Err(ControlError::Unimplemented(format!(
                "deployment precision {p} is not supported by hearth; use FP32, BF16 or FP16, or leave it unset \
                 to serve the checkpoint in its own precision"
            )));
        }
    }
    Ok(())
}

/// The most keys one direct route accepts.
const MAX_DIRECT_ROUTE_KEYS: usize = 100;

/// Fills defaults and checks every user-settable field of a deployment about to be stored.
/// `min_to_zero` is the shortest scale-to-zero window accepted (`ControlConfig`).
fn normalise(d: &mut Deployment, min_to_zero: Duration) -> Result<()> {
    refuse_unimplemented(d)?;
    crate::hot_load::check(d)?;
    if let Some(n) = &d.display_name {
        if n.chars().count() >= 64 {
            return Err(ControlError::InvalidArgument(format!(
                "displayName must be fewer than 64 characters, got {}",
                n.chars().count()
            )));
        }
    }
    if d.description.as_ref().is_some_and(|s| s.chars().count() >= 1000) {
        return Err(ControlError::InvalidArgument("description must be fewer than 1000 characters".to_string()));
    }
    let min = d.min_replica_count.unwrap_or(0);
    if !(0..=MAX_REPLICAS).contains(&min) {
        return Err(ControlError::InvalidArgument(format!(
            "minReplicaCount must be between 0 and {MAX_REPLICAS}, got {min}"
        )));
    }
    let max = d.max_replica_count.unwrap_or(min.max(1));
    if !(0..=MAX_REPLICAS).contains(&max) {
        return Err(ControlError::InvalidArgument(format!(
            "maxReplicaCount must be between 0 and {MAX_REPLICAS}, got {max}"
        )));
    }
    if max < min {
        return Err(ControlError::InvalidArgument(format!(
            "maxReplicaCount ({max}) must not be below minReplicaCount ({min})"
        )));
    }
    d.min_replica_count = Some(min);
    d.max_replica_count = Some(max);

    let policy = d.autoscaling_policy.get_or_insert_with(AutoscalingPolicy::default);
    let up = *policy.scale_up_window.get_or_insert(ProtoDuration::from_secs(DEFAULT_SCALE_UP_WINDOW));
    let down = *policy.scale_down_window.get_or_insert(ProtoDuration::from_secs(DEFAULT_SCALE_DOWN_WINDOW));
    let zero = *policy.scale_to_zero_window.get_or_insert(ProtoDuration::from_secs(DEFAULT_SCALE_TO_ZERO_WINDOW));
    for (field, w) in [("scaleUpWindow", up), ("scaleDownWindow", down)] {
        if w.0.as_secs_f64() > MAX_SCALE_WINDOW as f64 {
            return Err(ControlError::InvalidArgument(format!(
                "autoscalingPolicy.{field} must be at most {MAX_SCALE_WINDOW}s (1 hour), got {w}"
            )));
        }
    }
    if zero.0 < min_to_zero {
        return Err(ControlError::InvalidArgument(format!(
            "autoscalingPolicy.scaleToZeroWindow must be at least {}s, got {zero}",
            min_to_zero.as_secs_f64()
        )));
    }
    match (d.direct_route_type == Some(DirectRouteType::Internet), d.direct_route_api_keys.as_deref()) {
        (true, Some(keys)) if !keys.is_empty() => {
            if keys.len() > MAX_DIRECT_ROUTE_KEYS || keys.iter().any(|k| k.trim().is_empty() || k.len() > 256) {
                return Err(ControlError::InvalidArgument(format!(
                    "directRouteApiKeys: at most {MAX_DIRECT_ROUTE_KEYS} keys of 1 to 256 characters"
                )));
            }
        }
        (true, _) => {}
        (false, Some(keys)) if !keys.is_empty() => {
            return Err(ControlError::InvalidArgument(
                "directRouteApiKeys is used only with directRouteType INTERNET; set both".to_string(),
            ))
        }
        (false, _) => {}
    }
    if let Some(schedules) = &policy.scaling_schedules {
        crate::schedules::from_wire(schedules, max)?;
    }
    let targets =
        policy.load_targets.get_or_insert_with(|| BTreeMap::from([("default".to_string(), DEFAULT_LOAD_TARGET)]));
    if targets.is_empty() {
        targets.insert("default".to_string(), DEFAULT_LOAD_TARGET);
    }
    for (k, v) in targets.iter() {
        if k != "default" {
            return Err(ControlError::InvalidArgument(format!(
                "autoscalingPolicy.loadTargets supports only the key \"default\", got {k:?}"
            )));
        }
        if !(v.is_finite() && *v > 0.0) {
            return Err(ControlError::InvalidArgument(format!(
                "autoscalingPolicy.loadTargets.default must be a positive number, got {v}"
            )));
        }
    }
    for (field, v) in [
        ("acceleratorCount", d.accelerator_count),
        ("numPeftDeviceCached", d.num_peft_device_cached),
        ("maxContextLength", d.max_context_length),
    ] {
        if v.is_some_and(|n| n < 0) {
            return Err(ControlError::InvalidArgument(format!("{field} must not be negative")));
        }
    }
    for (field, v) in [("ngramSpeculationLength", d.ngram_speculation_length), ("draftTokenCount", d.draft_token_count)]
    {
        if v.is_some_and(|n| !(0..=MAX_SPECULATION).contains(&n)) {
            return Err(ControlError::InvalidArgument(format!(
                "{field} must be between 1 and {MAX_SPECULATION} (or 0 for none), got {}",
                v.unwrap_or_default()
            )));
        }
    }
    if d.draft_token_count.is_some_and(|n| n > 0)
        && d.ngram_speculation_length.unwrap_or(0) == 0
        && d.draft_model.as_deref().unwrap_or("").is_empty()
    {
        return Err(ControlError::InvalidArgument(
            "draftTokenCount sets how many tokens speculation drafts: set ngramSpeculationLength or draftModel too"
                .to_string(),
        ));
    }
    Ok(())
}

impl ControlPlane {
    pub(crate) async fn deployment_view(&self, account: &str, id: &str) -> Result<Deployment> {
        let status: Option<Doc<DeploymentStatus>> = self.load(account, id).await.unwrap_or(None);
        match self.store.get(DEPLOYMENTS, account, id).await? {
            None => Err(not_found(account, id)),
            Some(rec) => Ok(self.view_of_row(account, rec, status.as_ref())),
        }
    }

    fn view_of_row(
        &self,
        account: &str,
        rec: hearth_store::Record,
        status: Option<&Doc<DeploymentStatus>>,
    ) -> Deployment {
        match decode_body::<DeploymentSpec>(&rec.body) {
            Ok(spec) => {
                let doc = Doc {
                    id: rec.id.clone(),
                    value: spec,
                    version: rec.version,
                    create_time: rec.create_time,
                    update_time: rec.update_time,
                };
                record::view(account, &rec.id, &doc, status)
            }
            Err(why) => record::unreadable_view(account, &rec.id, &why, status),
        }
    }

    /// All deployments of an account as the API shows them, deleted ones included.
    pub(crate) async fn deployments_of(&self, account: &str) -> Result<Vec<Deployment>> {
        let statuses: HashMap<String, Doc<DeploymentStatus>> =
            self.load_all::<DeploymentStatus>(account).await?.into_iter().map(|d| (d.id.clone(), d)).collect();
        let rows = self.store.list(DEPLOYMENTS, account).await?;
        Ok(rows
            .into_iter()
            .map(|rec| {
                let status = statuses.get(&rec.id);
                self.view_of_row(account, rec, status)
            })
            .collect())
    }

    pub(crate) async fn load_deployment(&self, account: &str, id: &str) -> Result<Doc<DeploymentSpec>> {
        self.load(account, id).await?.ok_or_else(|| not_found(account, id))
    }

    /// A deployment's spec and status, for the rules that depend on its state.
    pub(crate) async fn deployment_with_status(
        &self,
        account: &str,
        id: &str,
    ) -> Result<Option<(Doc<DeploymentSpec>, DeploymentStatus)>> {
        let Some(spec) = self.load::<DeploymentSpec>(account, id).await? else { return Ok(None) };
        let status =
            self.load::<DeploymentStatus>(account, id).await.ok().flatten().map(|d| d.value).unwrap_or_default();
        Ok(Some((spec, status)))
    }

    /// The base model of a deployment must be a READY base model the account may use.
    async fn check_base_model(&self, account: &str, base: Option<&str>) -> Result<String> {
        let base = base.filter(|b| !b.is_empty()).ok_or_else(|| {
            ControlError::InvalidArgument("baseModel is required: the name of a READY HF_BASE_MODEL".to_string())
        })?;
        let (_, doc) = self.resolve_model(account, base, "baseModel").await?;
        let m = &doc.value.model;
        if m.kind != Some(ModelKind::HfBaseModel) {
            return Err(ControlError::FailedPrecondition(format!(
                "baseModel {base} is an {}, not an HF_BASE_MODEL; deploy its base model and load the addon onto it",
                m.kind.map(|k| k.as_str()).unwrap_or("addon")
            )));
        }
        if m.state != Some(ModelState::Ready) {
            return Err(ControlError::FailedPrecondition(format!(
                "baseModel {base} is not READY: upload its files and call :validateUpload first"
            )));
        }
        Ok(base.to_string())
    }

    /// A draft model must be a READY base model the account may use whose tokenizer is the
    /// base model's: its token ids go to the base model as they are. The vocabularies are
    /// compared here from what validation recorded of each; the replica compares every token
    /// when it loads the pair, and a deployment whose pair differs there fails saying so.
    async fn check_draft_model(&self, account: &str, base: &str, draft: &str) -> Result<String> {
        let draft = self.check_base_model(account, Some(draft)).await.map_err(|e| match e {
            ControlError::FailedPrecondition(m) => {
                ControlError::FailedPrecondition(format!("draftModel: {}", m.replacen("baseModel ", "", 1)))
            }
            other => other,
        })?;
        let (_, b) = self.resolve_model(account, base, "baseModel").await?;
        let (_, d) = self.resolve_model(account, &draft, "draftModel").await?;
        if let (Some(b), Some(d)) = (&b.value.base, &d.value.base) {
            let (bv, bt, dv, dt) = (b.dims.vocab_size, &b.tokenizer, d.dims.vocab_size, &d.tokenizer);
            // The tokenizer kind is compared where both records know it (older ones do not) in
            // the same terms (GGUF and tokenizer.json name kinds differently).
            if bv != dv || (bt.is_some() && dt.is_some() && b.format == d.format && bt != dt) {
                return Err(ControlError::FailedPrecondition(format!(
                    "draftModel {draft} does not share baseModel {base}'s tokenizer ({} tokens, {} against {} \
                     tokens, {}): a draft's token ids go to the base model as they are, so it must be the same \
                     model family with the same tokenizer (a smaller or quantized sibling)",
                    dv,
                    dt.as_deref().unwrap_or("unknown kind"),
                    bv,
                    bt.as_deref().unwrap_or("unknown kind"),
                )));
            }
        }
        Ok(draft)
    }

    pub async fn create_deployment(
        &self,
        who: &Principal,
        account: &str,
        opts: CreateDeploymentOptions,
        body: Deployment,
    ) -> Result<Deployment> {
        self.authorize(who, account)?;
        if opts.disable_auto_deploy {
            return Err(ControlError::Unimplemented(
                "disableAutoDeploy=true is not supported: a base model's plain name is always served by its oldest \
                 live deployment; name a deployment in a request (model#deployment) to choose another"
                    .to_string(),
            ));
        }
        let id = match opts.deployment_id.filter(|s| !s.is_empty()) {
            Some(id) => {
                validate_id("deployment", &id).map_err(ControlError::InvalidArgument)?;
                id
            }
            None => random_id(8),
        };
        let base = self.check_base_model(account, body.base_model.as_deref()).await?;
        let mut body = body;
        let named = body.draft_model.as_deref().is_some_and(|m| !m.is_empty());
        if opts.disable_speculative_decoding {
            if named || body.ngram_speculation_length.is_some_and(|n| n > 0) {
                return Err(ControlError::InvalidArgument(
                    "disableSpeculativeDecoding=true turns speculation off, but the deployment sets draftModel or \
                     ngramSpeculationLength: drop one or the other"
                        .to_string(),
                ));
            }
        } else if !named {
            // The base model's own speculation settings apply when the deployment names none.
            let (_, model) = self.resolve_model(account, &base, "baseModel").await?;
            if let Some(default) = model.value.model.default_draft_model.clone().filter(|m| !m.is_empty()) {
                body.draft_model = Some(default);
                if body.draft_token_count.is_none() {
                    body.draft_token_count = model.value.model.default_draft_token_count.filter(|n| *n > 0);
                }
            }
        }
        if let Some(draft) = body.draft_model.clone().filter(|m| !m.is_empty()) {
            let checked = self.check_draft_model(account, &base, &draft).await;
            body.draft_model = Some(match checked {
                Err(ControlError::FailedPrecondition(m)) if !named => {
                    return Err(ControlError::FailedPrecondition(format!(
                        "the base model's defaultDraftModel cannot be used ({m}); create with \
                         disableSpeculativeDecoding=true to deploy without it"
                    )))
                }
                other => other?,
            });
        }
        // Output-only fields in the body are ignored (AIP-203): start from the user's fields.
        let mut d = Deployment {
            name: None,
            create_time: None,
            update_time: None,
            purge_time: None,
            delete_time: None,
            state: None,
            status: None,
            desired_replica_count: None,
            replica_count: None,
            cluster: None,
            direct_route_handle: None,
            region: None,
            replica_stats: None,
            active_model_version: None,
            base_model: Some(base),
            ..body
        };
        normalise(&mut d, self.config.min_scale_to_zero_window)?;
        if let (Some(true), Some(url)) = (d.enable_hot_load, d.hot_load_bucket_url.as_deref()) {
            self.check_local_bucket(url, None)?;
        }
        let spec = DeploymentSpec { generation: 1, ..DeploymentSpec::from_wire(&d) };
        let _admission = self.admission(account).await;
        self.check_quota(account, QuotaId::Deployments, 1, None).await?;
        self.check_deployment_quotas(account, &id, &spec).await?;
        if opts.validate_only {
            let now = Utc::now();
            let doc = Doc { id: id.clone(), value: spec, version: 0, create_time: now, update_time: now };
            return Ok(record::view(account, &id, &doc, None));
        }
        let doc = self.insert_doc(account, &id, &spec).await?;
        tracing::info!(account, deployment = %id, "deployment created");
        self.changed(Some(DeploymentKey::new(account, &id)));
        Ok(record::view(account, &id, &doc, None))
    }

    pub async fn get_deployment(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        read_mask: Option<&str>,
    ) -> Result<Value> {
        self.authorize(who, account)?;
        render(&self.deployment_view(account, id).await?, read_mask)
    }

    pub async fn list_deployments(&self, who: &Principal, account: &str, req: &ListRequest) -> Result<ListPage> {
        self.authorize(who, account)?;
        let items = self
            .deployments_of(account)
            .await?
            .into_iter()
            .filter(|d| req.show_deleted || d.state != Some(DeploymentState::Deleted))
            .map(|d| serde_json::to_value(d).map_err(ControlError::internal))
            .collect::<Result<Vec<_>>>()?;
        paginate(items, req, &DEPLOYMENT_LIST)
    }

    pub async fn update_deployment(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        body: &Value,
        update_mask: Option<&str>,
    ) -> Result<Value> {
        self.authorize(who, account)?;
        let patch: Patch<Deployment> = Patch::parse(body, update_mask, &DEPLOYMENT_PATCH)?;
        refuse_unimplemented(&patch.value)?;
        // A changed base model must be one this account may deploy, and the deployment must
        // carry no addons: they are LoRAs of the old base, which the new one cannot serve.
        // (Refused rather than unloaded for the user: unloading is theirs to decide.)
        let current = self.load_deployment(account, id).await?;
        let new_base = patch.value.base_model.as_deref().filter(|b| *b != current.value.base_model);
        // A draft model named by the update, or kept across a change of base model, must
        // suit the base model the update leaves.
        let after = patch.apply(&current.value.to_wire())?;
        if let Some(draft) = after.draft_model.as_deref().filter(|d| !d.is_empty()) {
            if new_base.is_some() || current.value.draft_model.as_deref() != Some(draft) {
                let base = after.base_model.as_deref().unwrap_or(&current.value.base_model);
                self.check_draft_model(account, base, draft).await?;
            }
        }
        let current_bucket = current.value.hot_load.as_ref().map(|h| h.bucket_url.as_str());
        if let (Some(true), Some(url)) = (after.enable_hot_load, after.hot_load_bucket_url.as_deref()) {
            if current_bucket != Some(url) {
                crate::hot_load::check(&after)?;
                self.check_local_bucket(url, None)?;
            }
        }
        if let Some(base) = new_base {
            self.check_base_model(account, Some(base)).await?;
            let name = ResourceName::new(account, Collection::Deployments, id).to_string();
            let loaded = self.addons_loaded_on(account, &name).await?;
            if !loaded.is_empty() {
                return Err(ControlError::FailedPrecondition(format!(
                    "deployment {name} has LoRA addons of {} loaded ({}); unload them before changing baseModel \
                     to {base}",
                    current.value.base_model,
                    deployed_model_names(account, &loaded)
                )));
            }
        }
        let min_to_zero = self.config.min_scale_to_zero_window;
        // What the update would reserve, checked against the quotas before it is written.
        let _admission = self.admission(account).await;
        if !current.value.is_deleted() {
            let mut trial = patch.apply(&current.value.to_wire())?;
            normalise(&mut trial, min_to_zero)?;
            self.check_deployment_quotas(account, id, &DeploymentSpec::from_wire(&trial)).await?;
        }
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<DeploymentSpec>| {
                if doc.value.is_deleted() {
                    return Err(ControlError::FailedPrecondition(format!(
                        "deployment accounts/{account}/deployments/{id} is deleted; undelete it before updating"
                    )));
                }
                let mut updated = patch.apply(&doc.value.to_wire())?;
                normalise(&mut updated, min_to_zero)?;
                let old = &doc.value;
                let mut new = DeploymentSpec {
                    delete_time: old.delete_time,
                    purge_time: old.purge_time,
                    generation: old.generation,
                    scale: old.scale,
                    ..DeploymentSpec::from_wire(&updated)
                };
                // The keys are never shown, so an update that does not send them keeps them.
                if updated.direct_route_api_keys.is_none() && new.direct_route_key_hashes.is_some() {
                    new.direct_route_key_hashes = old.direct_route_key_hashes.clone().or(Some(Vec::new()));
                }
                // Any change is a new generation: the runtime rolls to it (and a FAILED
                // deployment tries again).
                if new != *old {
                    doc.value = DeploymentSpec { generation: old.generation + 1, ..new };
                }
                Ok(())
            },
        )
        .await?;
        self.changed(Some(DeploymentKey::new(account, id)));
        render(&self.deployment_view(account, id).await?, None)
    }

    /// Soft delete (the default) marks the deployment DELETED and schedules its purge;
    /// `hard` removes it at once. Deployments with LoRAs loaded are refused unless
    /// `ignore_checks`, in which case the LoRAs are unloaded with it.
    pub async fn delete_deployment(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        hard: bool,
        ignore_checks: bool,
    ) -> Result<()> {
        self.authorize(who, account)?;
        // A hard delete removes even a deployment whose record cannot be read.
        let spec = match self.load_deployment(account, id).await {
            Ok(doc) => Some(doc),
            Err(ControlError::DataLoss(_)) if hard => None,
            Err(e) => return Err(e),
        };
        let name = ResourceName::new(account, Collection::Deployments, id).to_string();
        let loaded = self.addons_loaded_on(account, &name).await?;
        if !loaded.is_empty() && !ignore_checks {
            return Err(ControlError::FailedPrecondition(format!(
                "deployment {name} still has LoRA addons loaded ({}); unload them first or pass ignoreChecks=true",
                deployed_model_names(account, &loaded)
            )));
        }
        if !hard && spec.as_ref().is_some_and(|s| s.value.is_deleted()) {
            return Err(ControlError::NotFound(format!(
                "deployment {name} is already deleted; undelete it, or pass hard=true to purge it now"
            )));
        }
        for dm in &loaded {
            self.remove_deployed_model_rows(account, dm).await?;
        }
        if hard {
            self.remove_deployment_rows(account, id, None).await?;
            tracing::info!(account, deployment = %id, "deployment purged");
            self.changed(Some(DeploymentKey::new(account, id)));
            return Ok(());
        }
        self.soft_delete(account, id).await?;
        tracing::info!(account, deployment = %id, "deployment soft-deleted");
        self.changed(Some(DeploymentKey::new(account, id)));
        Ok(())
    }

    async fn soft_delete(&self, account: &str, id: &str) -> Result<()> {
        let purge_delay = chrono::Duration::from_std(self.config.purge_delay).map_err(ControlError::internal)?;
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<DeploymentSpec>| {
                let now = Utc::now();
                doc.value.delete_time = Some(now);
                doc.value.purge_time = Some(now + purge_delay);
                Ok(())
            },
        )
        .await?;
        Ok(())
    }

    /// The ids of the DeployedModels loaded onto deployment `name`.
    pub(crate) async fn addons_loaded_on(&self, account: &str, name: &str) -> Result<Vec<String>> {
        Ok(self
            .load_all::<DeployedModelSpec>(account)
            .await?
            .into_iter()
            .filter(|dm| dm.value.deployment == name)
            .map(|dm| dm.id)
            .collect())
    }

    /// Removes a deployment's spec (only at `version`, when given) and then its status row.
    /// Returns whether the spec was removed.
    async fn remove_deployment_rows(&self, account: &str, id: &str, version: Option<i64>) -> Result<bool> {
        let removed = self.store.delete(DEPLOYMENTS, account, id, version).await?;
        if removed || version.is_none() {
            self.store.delete(DeploymentStatus::KIND, account, id, None).await?;
            let name = ResourceName::new(account, Collection::Deployments, id).to_string();
            self.forget_model_versions(&name, &[]).await;
        }
        Ok(removed)
    }

    pub(crate) async fn remove_deployed_model_rows(&self, account: &str, id: &str) -> Result<bool> {
        let removed = self.store.delete(DeployedModelSpec::KIND, account, id, None).await?;
        self.store.delete(DeployedModelStatus::KIND, account, id, None).await?;
        Ok(removed)
    }

    /// Brings back a DELETED or FAILED deployment. Anything else is, as AIP-164 asks,
    /// ALREADY_EXISTS: there is nothing to undelete.
    pub async fn undelete_deployment(&self, who: &Principal, account: &str, id: &str) -> Result<Deployment> {
        self.authorize(who, account)?;
        let (spec, status) = self.deployment_with_status(account, id).await?.ok_or_else(|| not_found(account, id))?;
        let state = record::state_of(&spec.value, &status);
        if !matches!(state, DeploymentState::Deleted | DeploymentState::Failed) {
            return Err(ControlError::AlreadyExists(format!(
                "deployment accounts/{account}/deployments/{id} is {state} and not deleted; nothing to undelete"
            )));
        }
        // The base model may have gone while the deployment was deleted.
        self.check_base_model(account, Some(&spec.value.base_model)).await?;
        let _admission = self.admission(account).await;
        if state == DeploymentState::Deleted {
            self.check_quota(account, QuotaId::Deployments, 1, Some(id)).await?;
            self.check_deployment_quotas(account, id, &spec.value).await?;
        }
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<DeploymentSpec>| {
                let s = &mut doc.value;
                if s.generation != spec.value.generation || s.delete_time != spec.value.delete_time {
                    return Err(ControlError::Aborted(format!(
                        "deployment accounts/{account}/deployments/{id} changed while being undeleted; retry"
                    )));
                }
                s.delete_time = None;
                s.purge_time = None;
                // An expireTime that has passed deleted it; kept, it would delete it again at once.
                if s.expire_time.is_some_and(|t| t <= Utc::now()) {
                    s.expire_time = None;
                }
                // A new generation clears the failure; it starts again from its minimum.
                s.generation += 1;
                s.request_scale(s.min_replica_count);
                Ok(())
            },
        )
        .await?;
        tracing::info!(account, deployment = %id, "deployment undeleted");
        self.changed(Some(DeploymentKey::new(account, id)));
        self.deployment_view(account, id).await
    }

    /// Sets the replica count directly, within `0..=maxReplicaCount`.
    pub async fn scale_deployment(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        req: ScaleDeploymentRequest,
    ) -> Result<()> {
        self.authorize(who, account)?;
        let n = req.replica_count.unwrap_or(0);
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<DeploymentSpec>| {
                let s = &mut doc.value;
                if s.is_deleted() {
                    return Err(ControlError::FailedPrecondition(format!(
                        "deployment accounts/{account}/deployments/{id} is deleted; undelete it before scaling"
                    )));
                }
                let max = s.max_replica_count;
                if n < 0 || n > max {
                    return Err(ControlError::OutOfRange(format!(
                    "replicaCount must be between 0 and maxReplicaCount ({max}), got {n}; raise maxReplicaCount first"
                )));
                }
                s.request_scale(n);
                Ok(())
            },
        )
        .await?;
        tracing::info!(account, deployment = %id, replicas = n, "deployment scaled");
        self.changed(Some(DeploymentKey::new(account, id)));
        Ok(())
    }

    /// Soft-deletes deployments whose `expireTime` has passed, as the spec says. Returns how
    /// many.
    pub async fn expire_deployments(&self) -> Result<usize> {
        let now = Utc::now();
        let mut expired = 0;
        for rec in self.store.list_all(DEPLOYMENTS).await? {
            let Ok(spec) = decode_body::<DeploymentSpec>(&rec.body) else { continue };
            if spec.is_deleted() || spec.expire_time.is_none_or(|t| t > now) {
                continue;
            }
            match self.soft_delete(&rec.account, &rec.id).await {
                Ok(()) => {
                    tracing::info!(account = %rec.account, deployment = %rec.id, "deployment deleted at its expireTime");
                    expired += 1;
                }
                Err(ControlError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if expired > 0 {
            self.changed(None);
        }
        Ok(expired)
    }

    /// Removes soft-deleted deployments whose purge time has passed. Returns how many.
    pub async fn purge_expired_deployments(&self) -> Result<usize> {
        let now = Utc::now();
        let mut purged = 0;
        for rec in self.store.list_all(DEPLOYMENTS).await? {
            let Ok(spec) = decode_body::<DeploymentSpec>(&rec.body) else { continue };
            let due = spec.is_deleted() && spec.purge_time.is_some_and(|t| t <= now);
            // The version guard keeps an undelete that raced with the purge.
            if due && self.remove_deployment_rows(&rec.account, &rec.id, Some(rec.version)).await? {
                tracing::info!(account = %rec.account, deployment = %rec.id, "deployment purged after its purge time");
                purged += 1;
            }
        }
        Ok(purged)
    }
}

/// The full names of deployed models, for a message.
fn deployed_model_names(account: &str, ids: &[String]) -> String {
    ids.iter()
        .map(|dm| ResourceName::new(account, Collection::DeployedModels, dm).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
