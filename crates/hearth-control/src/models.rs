//! The Models service: create, read, update and delete models, hand out signed upload and
//! download URLs, receive uploads, and validate what was uploaded.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::Stream;
use hearth_api::names::{validate_id, Collection, ResourceName};
use hearth_api::resources::{
    BaseModelDetails, CheckpointFormat, CreateModelRequest, DeployedModelRef, DeploymentState,
    GetDownloadEndpointResponse, GetUploadEndpointRequest, GetUploadEndpointResponse, Model, ModelKind, ModelSource,
    ModelState, Operation, PeftDetails, Precision, ValidateUploadResponse,
};
use serde_json::Value;

use crate::auth::Principal;
use crate::error::{ControlError, Result};
use crate::listing::{paginate, render, ListPage, ListRequest, Listable};
use crate::patch::{Patch, Patchable};
use crate::quotas::QuotaId;
pub(crate) use crate::records::model::{BaseFacts, ModelRecord};
use crate::records::{Doc, MODELS};
use crate::ControlPlane;
use hearth_artifacts::store::{validate_file_name, Sha256Digest, UploadPart, UploadProgress, MAX_FILES};
use hearth_artifacts::Grant;
use hearth_formats as inspect;

/// `:validateUpload`'s query flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidateOptions {
    pub skip_hf_config_validation: bool,
    pub config_only: bool,
    pub trust_remote_code: bool,
}

pub use hearth_artifacts::store::MAX_FILE_SIZE;

pub(crate) const MODEL_LIST: Listable = Listable {
    fields: &[
        "name",
        "displayName",
        "description",
        "createTime",
        "updateTime",
        "state",
        "kind",
        "public",
        "contextLength",
        "githubUrl",
        "huggingFaceUrl",
        "supportsLora",
        "supportsTools",
        "supportsImageInput",
        "baseModelDetails.parameterCount",
        "baseModelDetails.checkpointFormat",
        "baseModelDetails.modelType",
        "peftDetails.baseModel",
        "peftDetails.r",
    ],
    default_order: "name",
};

const MODEL_PATCH: Patchable = Patchable {
    resource: "model",
    output_only: &[
        "name",
        "createTime",
        "updateTime",
        "state",
        "status",
        "importedFrom",
        "fineTuningJob",
        "deployedModelRefs",
        "cluster",
        "calibrated",
        "tunable",
        "defaultSamplingParams",
        "rlTunable",
        "supportsServerless",
        "supervisedLoraTunable",
        "supervisedFullParameterTunable",
        "rlLoraTunable",
        "rlFullParameterTunable",
    ],
    mutable: &[
        "displayName",
        "description",
        "githubUrl",
        "huggingFaceUrl",
        "public",
        "contextLength",
        "supportsImageInput",
        "supportsTools",
        "supportsLora",
        "useHfApplyChatTemplate",
        "deprecationDate",
        "trainingContextLength",
        "snapshotType",
        "conversationConfig",
        "defaultDraftModel",
        "defaultDraftTokenCount",
        // Accepted so an update can carry them unchanged; a change is refused below.
        "kind",
        "baseModelDetails",
        "peftDetails",
        // Refused as unimplemented when set.
        "teftDetails",
    ],
};

fn not_found(account: &str, id: &str) -> ControlError {
    ControlError::NotFound(format!("model accounts/{account}/models/{id} not found"))
}

/// Checks the fields a user may set on create or update. `stored` is the model before an
/// update (None on create).
/// A default draft size needs the default draft model it sizes; checked on a whole model (as
/// created, or as an update leaves it).
fn check_draft_defaults(m: &Model) -> Result<()> {
    if m.default_draft_token_count.is_some_and(|n| n != 0) && m.default_draft_model.as_deref().is_none_or(str::is_empty)
    {
        return Err(ControlError::InvalidArgument(
            "defaultDraftTokenCount sets how many tokens the default draft model proposes: set defaultDraftModel too"
                .to_string(),
        ));
    }
    Ok(())
}

fn check_user_fields(m: &Model, stored: Option<&Model>) -> Result<()> {
    if let Some(n) = &m.display_name {
        if n.chars().count() >= 64 {
            return Err(ControlError::InvalidArgument(format!(
                "displayName must be fewer than 64 characters, got {}",
                n.chars().count()
            )));
        }
    }
    if let Some(d) = &m.description {
        if d.chars().count() >= 1000 {
            return Err(ControlError::InvalidArgument(format!(
                "description must be fewer than 1000 characters, got {}",
                d.chars().count()
            )));
        }
    }
    if let Some(c) = &m.conversation_config {
        if c.style.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ControlError::Unimplemented(
                "model field `conversationConfig.style` is not supported: hearth has no named conversation styles; \
                 give the chat template itself in conversationConfig.template"
                    .to_string(),
            ));
        }
        for (field, v, max) in [("system", &c.system, 16 << 10), ("template", &c.template, 64 << 10)] {
            if v.as_ref().is_some_and(|v| v.len() > max) {
                return Err(ControlError::InvalidArgument(format!(
                    "conversationConfig.{field} is longer than {} KiB",
                    max >> 10
                )));
            }
        }
    }
    // The default draft model is checked against this model when a deployment uses it
    // (it may be uploaded after this one); here only its form.
    if let Some(d) = m.default_draft_model.as_deref().filter(|s| !s.is_empty()) {
        ResourceName::parse(d, Collection::Models)
            .map_err(|e| ControlError::InvalidArgument(format!("defaultDraftModel: {e}")))?;
    }
    if let Some(n) = m.default_draft_token_count.filter(|n| *n != 0) {
        if !(1..=crate::deployments::MAX_SPECULATION).contains(&n) {
            return Err(ControlError::InvalidArgument(format!(
                "defaultDraftTokenCount must be between 1 and {} (or 0 for the engine's default), got {n}",
                crate::deployments::MAX_SPECULATION
            )));
        }
    }
    if m.teft_details.is_some() {
        return Err(ControlError::unimplemented_field("model", "teftDetails"));
    }
    let own_template =
        m.conversation_config.as_ref().and_then(|c| c.template.as_deref()).is_some_and(|t| !t.is_empty());
    if m.use_hf_apply_chat_template == Some(false) && !own_template {
        return Err(ControlError::Unimplemented(
            "model field `useHfApplyChatTemplate` false is not supported without a template of your own: hearth \
             renders chats with the checkpoint's (Hugging Face) chat template unless conversationConfig.template \
             gives another"
                .to_string(),
        ));
    }
    if let Some(p) = &m.peft_details {
        if p.merge_addon_model_name.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ControlError::unimplemented_field("model", "peftDetails.mergeAddonModelName"));
        }
    }
    for (field, v) in [("contextLength", m.context_length), ("trainingContextLength", m.training_context_length)] {
        if v.is_some_and(|n| n < 0) {
            return Err(ControlError::InvalidArgument(format!("{field} must not be negative")));
        }
    }
    if let Some(stored) = stored {
        // Kind and the addon's base are identity: changing them would invalidate every
        // check validation made. Carrying the stored value unchanged is fine.
        if m.kind != stored.kind {
            return Err(ControlError::InvalidArgument(
                "model field `kind` cannot be changed after creation".to_string(),
            ));
        }
        let base_of = |m: &Model| m.peft_details.as_ref().and_then(|p| p.base_model.clone());
        if base_of(m) != base_of(stored)
            || m.peft_details.as_ref().map(|p| (p.r, p.target_modules.clone()))
                != stored.peft_details.as_ref().map(|p| (p.r, p.target_modules.clone()))
        {
            return Err(ControlError::InvalidArgument(
                "model field `peftDetails` is read from the uploaded files and cannot be changed".to_string(),
            ));
        }
        if m.base_model_details != stored.base_model_details {
            return Err(ControlError::InvalidArgument(
                "model field `baseModelDetails` is read from the uploaded files and cannot be changed".to_string(),
            ));
        }
    }
    Ok(())
}

/// The precision a checkpoint's dtype implies, when the spec has a name for it.
fn default_precision(dtype: &str) -> Option<Precision> {
    match dtype.to_ascii_uppercase().as_str() {
        "BF16" | "BFLOAT16" => Some(Precision::Bf16),
        "F16" | "FP16" | "FLOAT16" => Some(Precision::Fp16),
        "F32" | "FP32" | "FLOAT32" => Some(Precision::Fp32),
        _ => None,
    }
}

impl ControlPlane {
    /// The model as the API shows it: the stored resource plus name and times.
    fn model_view(&self, account: &str, doc: &Doc<ModelRecord>) -> Model {
        let mut m = doc.value.model.clone();
        m.name = Some(ResourceName::new(account, Collection::Models, &doc.id).to_string());
        m.create_time = Some(doc.create_time);
        m.update_time = Some(doc.update_time);
        m
    }

    /// Tidies every model's directory at start (see `ArtifactStore::sweep`): scratch files of
    /// uploads a killed gateway left behind, partial files of READY models, seals of
    /// validations cut short. A record that cannot be read leaves its directory untouched.
    pub(crate) async fn sweep_uploads(&self) -> Result<usize> {
        let mut removed = 0;
        for rec in self.store.list_all(MODELS).await? {
            let Ok(record) = crate::records::decode_body::<ModelRecord>(&rec.body) else { continue };
            let ready = record.model.state == Some(ModelState::Ready);
            removed += self.artifacts.sweep(&rec.account, &rec.id, ready).await?;
        }
        if removed > 0 {
            tracing::info!(files = removed, "partial uploads left by an earlier run removed");
        }
        Ok(removed)
    }

    pub(crate) async fn load_model(&self, account: &str, id: &str) -> Result<Doc<ModelRecord>> {
        self.load(account, id).await?.ok_or_else(|| not_found(account, id))
    }

    /// Resolves a model referenced by name from `account`: its own models, or another
    /// account's public ones.
    pub(crate) async fn resolve_model(
        &self,
        account: &str,
        name: &str,
        field: &str,
    ) -> Result<(ResourceName, Doc<ModelRecord>)> {
        let rn = ResourceName::parse(name, Collection::Models)
            .map_err(|e| ControlError::InvalidArgument(format!("{field}: {e}")))?;
        let doc: Option<Doc<ModelRecord>> = self.load(&rn.account, &rn.id).await?;
        match doc {
            Some(doc) if rn.account == account || doc.value.model.public == Some(true) => Ok((rn, doc)),
            Some(_) => Err(ControlError::PermissionDenied(format!(
                "{field}: model {name} belongs to another account and is not public"
            ))),
            None => Err(ControlError::FailedPrecondition(format!("{field}: model {name} does not exist"))),
        }
    }

    pub async fn create_model(&self, who: &Principal, account: &str, req: CreateModelRequest) -> Result<Model> {
        self.create_model_for(who, account, req, None).await
    }

    /// Creates a model; an imported addon with `deploy_onto` is loaded onto that deployment
    /// when its import ends READY.
    pub(crate) async fn create_model_for(
        &self,
        who: &Principal,
        account: &str,
        req: CreateModelRequest,
        deploy_onto: Option<String>,
    ) -> Result<Model> {
        self.authorize(who, account)?;
        let id = req.model_id.unwrap_or_default();
        if id.is_empty() {
            return Err(ControlError::InvalidArgument("modelId is required".to_string()));
        }
        validate_id("model", &id).map_err(ControlError::InvalidArgument)?;
        if req.cluster.as_deref().is_some_and(|c| !c.is_empty()) {
            return Err(ControlError::Unimplemented(
                "create model request field `cluster` is not supported: hearth keeps models in its own artifact \
                 store and runs them on its own runtime, not on a cluster of yours; leave it unset"
                    .to_string(),
            ));
        }
        let input = req.model.unwrap_or_default();
        check_user_fields(&input, None)?;
        check_draft_defaults(&input)?;
        if let Some(source) = &req.source {
            hearth_artifacts::sources::check(source)?;
        }
        // The spec's default kind is an addon.
        let kind = match input.kind.unwrap_or(ModelKind::HfPeftAddon) {
            ModelKind::Unspecified | ModelKind::HfPeftAddon => ModelKind::HfPeftAddon,
            ModelKind::HfBaseModel => ModelKind::HfBaseModel,
            other => {
                return Err(ControlError::Unimplemented(format!(
                    "model kind {other} is not supported by hearth; use HF_BASE_MODEL or HF_PEFT_ADDON"
                )))
            }
        };
        let mut model = Model {
            display_name: input.display_name,
            description: input.description,
            kind: Some(kind),
            github_url: input.github_url,
            hugging_face_url: input.hugging_face_url,
            public: input.public,
            context_length: input.context_length,
            supports_image_input: input.supports_image_input,
            supports_tools: input.supports_tools,
            supports_lora: input.supports_lora,
            use_hf_apply_chat_template: input.use_hf_apply_chat_template,
            conversation_config: input.conversation_config,
            deprecation_date: input.deprecation_date,
            training_context_length: input.training_context_length,
            snapshot_type: input.snapshot_type,
            default_draft_model: input.default_draft_model.filter(|m| !m.is_empty()),
            default_draft_token_count: input.default_draft_token_count.filter(|n| *n > 0),
            state: Some(ModelState::Uploading),
            ..Model::default()
        };
        match kind {
            ModelKind::HfBaseModel => {
                if input.peft_details.is_some() {
                    return Err(ControlError::InvalidArgument(
                        "peftDetails must not be set on an HF_BASE_MODEL; it describes an HF_PEFT_ADDON".to_string(),
                    ));
                }
                let details = input.base_model_details.ok_or_else(|| {
                    ControlError::InvalidArgument(
                        "baseModelDetails is required for an HF_BASE_MODEL (it may be {})".to_string(),
                    )
                })?;
                if details.world_size.is_some_and(|w| w < 0) {
                    return Err(ControlError::InvalidArgument(
                        "baseModelDetails.worldSize must not be negative".to_string(),
                    ));
                }
                model.base_model_details = Some(BaseModelDetails {
                    world_size: details.world_size,
                    checkpoint_format: details.checkpoint_format,
                    moe: details.moe,
                    tunable: details.tunable,
                    supports_fireattention: details.supports_fireattention,
                    supports_mtp: details.supports_mtp,
                    ..BaseModelDetails::default()
                });
            }
            _ => {
                if input.base_model_details.is_some() {
                    return Err(ControlError::InvalidArgument(
                        "baseModelDetails must not be set on an HF_PEFT_ADDON; it describes an HF_BASE_MODEL"
                            .to_string(),
                    ));
                }
                let peft = input.peft_details.ok_or_else(|| {
                    ControlError::InvalidArgument(
                        "peftDetails is required for an HF_PEFT_ADDON: set peftDetails.baseModel to the base model's name"
                            .to_string(),
                    )
                })?;
                let base =
                    peft.base_model.clone().filter(|b| !b.is_empty()).ok_or_else(|| {
                        ControlError::InvalidArgument("peftDetails.baseModel is required".to_string())
                    })?;
                if peft.r.is_some_and(|r| r <= 0) {
                    return Err(ControlError::InvalidArgument("peftDetails.r must be positive".to_string()));
                }
                let (_, base_doc) = self.resolve_model(account, &base, "peftDetails.baseModel").await?;
                if base_doc.value.model.kind != Some(ModelKind::HfBaseModel) {
                    return Err(ControlError::FailedPrecondition(format!(
                        "peftDetails.baseModel {base} is not an HF_BASE_MODEL"
                    )));
                }
                model.peft_details = Some(PeftDetails {
                    base_model: Some(base),
                    r: peft.r,
                    target_modules: peft.target_modules,
                    ..PeftDetails::default()
                });
            }
        }
        model.imported_from = req.source.as_ref().map(hearth_artifacts::sources::describe);
        let record = ModelRecord {
            model,
            announced: BTreeMap::new(),
            base: None,
            import: req.source.clone(),
            source_version: None,
            deploy_onto: deploy_onto.filter(|_| req.source.is_some()),
        };
        let _admission = self.admission(account).await;
        self.check_quota(account, QuotaId::Models, 1, None).await?;
        if record.import.is_some() {
            self.check_quota(account, QuotaId::StoredBytes, 1, None).await?;
        }
        let doc = self.insert_doc(account, &id, &record).await?;
        tracing::info!(account, model = %id, kind = %kind, "model created");
        if let Some(source) = req.source {
            self.spawn_import(account, &id, source);
        }
        Ok(self.model_view(account, &doc))
    }

    /// `:import`: fetches an existing model's files from a source. The model must not be
    /// READY; a FAILED one is tried again. The answer is an operation to poll through the
    /// model's `state`.
    pub async fn import_model(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        source: ModelSource,
    ) -> Result<Operation> {
        self.authorize(who, account)?;
        hearth_artifacts::sources::check(&source)?;
        // An import's size is known only as it arrives: it needs room for something.
        self.check_quota(account, QuotaId::StoredBytes, 1, None).await?;
        let from = hearth_artifacts::sources::describe(&source);
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<ModelRecord>| {
                let m = &mut doc.value.model;
                if m.state == Some(ModelState::Ready) {
                    return Err(ControlError::FailedPrecondition(format!(
                        "model accounts/{account}/models/{id} is READY; its files can no longer change. \
                         Create a new model to import other files"
                    )));
                }
                if doc.value.import.is_some() && m.state == Some(ModelState::Uploading) {
                    return Err(ControlError::FailedPrecondition(format!(
                        "model accounts/{account}/models/{id} is already being imported from {}",
                        m.imported_from.clone().unwrap_or_default()
                    )));
                }
                m.state = Some(ModelState::Uploading);
                m.status = None;
                m.imported_from = Some(from.clone());
                doc.value.import = Some(source.clone());
                Ok(())
            },
        )
        .await?;
        self.spawn_import(account, id, source);
        let name = ResourceName::new(account, Collection::Models, id).to_string();
        Ok(Operation {
            name: format!("{name}/operations/import"),
            done: false,
            metadata: Some(serde_json::json!({"model": name, "importedFrom": from})),
        })
    }

    pub async fn get_model(&self, who: &Principal, account: &str, id: &str, read_mask: Option<&str>) -> Result<Value> {
        self.authorize(who, account)?;
        let doc = self.load_model(account, id).await?;
        let mut model = self.model_view(account, &doc);
        // deployedModelRefs is filled by Get only, as the spec says.
        let name = model.name.clone().unwrap_or_default();
        let refs: Vec<DeployedModelRef> = self
            .deployed_models_of(account)
            .await?
            .into_iter()
            .filter(|dm| dm.model.as_deref() == Some(name.as_str()))
            .map(|dm| DeployedModelRef {
                name: dm.name,
                deployment: dm.deployment,
                state: dm.state,
                default: dm.default,
                public: dm.public,
            })
            .collect();
        if !refs.is_empty() {
            model.deployed_model_refs = Some(refs);
        }
        render(&model, read_mask)
    }

    pub async fn list_models(&self, who: &Principal, account: &str, req: &ListRequest) -> Result<ListPage> {
        self.authorize(who, account)?;
        let docs: Vec<Doc<ModelRecord>> = self.load_all(account).await?;
        let items = docs
            .iter()
            .map(|d| serde_json::to_value(self.model_view(account, d)).map_err(ControlError::internal))
            .collect::<Result<Vec<_>>>()?;
        paginate(items, req, &MODEL_LIST)
    }

    pub async fn update_model(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        body: &Value,
        update_mask: Option<&str>,
    ) -> Result<Value> {
        self.authorize(who, account)?;
        let patch: Patch<Model> = Patch::parse(body, update_mask, &MODEL_PATCH)?;
        check_user_fields(
            &Model { kind: None, peft_details: None, base_model_details: None, ..patch.value.clone() },
            None,
        )?;
        let doc = self
            .modify(
                account,
                id,
                || not_found(account, id),
                |doc: &mut Doc<ModelRecord>| {
                    let updated = patch.apply(&doc.value.model)?;
                    check_user_fields(&updated, Some(&doc.value.model))?;
                    check_draft_defaults(&updated)?;
                    doc.value.model = updated;
                    Ok(())
                },
            )
            .await?;
        render(&self.model_view(account, &doc), None)
    }

    pub async fn delete_model(&self, who: &Principal, account: &str, id: &str) -> Result<()> {
        self.authorize(who, account)?;
        let doc = self.load_model(account, id).await?;
        let name = ResourceName::new(account, Collection::Models, id).to_string();
        let loaded: Vec<String> = self
            .deployed_models_of(account)
            .await?
            .into_iter()
            .filter(|dm| dm.model.as_deref() == Some(name.as_str()))
            .filter_map(|dm| dm.name)
            .collect();
        if !loaded.is_empty() {
            return Err(ControlError::FailedPrecondition(format!(
                "model {name} is deployed as {}; unload it first",
                loaded.join(", ")
            )));
        }
        let serving: Vec<String> = self
            .deployments_of(account)
            .await?
            .into_iter()
            .filter(|d| d.base_model.as_deref() == Some(name.as_str()) && d.state != Some(DeploymentState::Deleted))
            .filter_map(|d| d.name)
            .collect();
        if !serving.is_empty() {
            return Err(ControlError::FailedPrecondition(format!(
                "model {name} is the base model of {}; delete those deployments first",
                serving.join(", ")
            )));
        }
        let addons: Vec<String> = self
            .load_all::<ModelRecord>(account)
            .await?
            .into_iter()
            .filter(|d| {
                d.value.model.peft_details.as_ref().and_then(|p| p.base_model.as_deref()) == Some(name.as_str())
            })
            .map(|d| ResourceName::new(account, Collection::Models, &d.id).to_string())
            .collect();
        if !addons.is_empty() {
            return Err(ControlError::FailedPrecondition(format!(
                "model {name} is the base model of addon(s) {}; delete those first",
                addons.join(", ")
            )));
        }
        // The record goes first: once it is gone nothing can reference the files, and a
        // crash between the two steps leaves only unreachable files, never a model without them.
        if !self.store.delete(MODELS, account, id, Some(doc.version)).await? {
            return Err(ControlError::Aborted(format!("model {name} changed while it was being deleted; retry")));
        }
        self.artifacts.remove_model(account, id).await?;
        tracing::info!(account, model = %id, "model deleted");
        Ok(())
    }

    pub async fn get_upload_endpoint(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        req: GetUploadEndpointRequest,
    ) -> Result<GetUploadEndpointResponse> {
        self.authorize(who, account)?;
        // `enableResumableUpload` needs nothing different: every signed URL also takes the
        // file in `Content-Range` parts (see `upload_file`).
        if req.filename_to_size.is_empty() {
            return Err(ControlError::InvalidArgument(
                "filenameToSize is empty: name every file to upload with its size in bytes".to_string(),
            ));
        }
        if req.filename_to_size.len() > MAX_FILES {
            return Err(ControlError::InvalidArgument(format!("at most {MAX_FILES} files may be uploaded per model")));
        }
        let mut announced = BTreeMap::new();
        for (name, size) in &req.filename_to_size {
            validate_file_name(name)?;
            if size.0 < 0 || size.0 as u64 > MAX_FILE_SIZE {
                return Err(ControlError::InvalidArgument(format!(
                    "size of {name} must be between 0 and {MAX_FILE_SIZE} bytes, got {}",
                    size.0
                )));
            }
            announced.insert(name.clone(), size.0 as u64);
        }
        // The files replace what this model holds now, which the usage already counts.
        let held: u64 = self.artifacts.list(account, id).await?.iter().map(|(_, n)| n).sum();
        let adding = announced.values().sum::<u64>() as i64 - held as i64;
        self.check_quota(account, QuotaId::StoredBytes, adding, None).await?;
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<ModelRecord>| {
                if doc.value.model.state == Some(ModelState::Ready) {
                    return Err(ControlError::FailedPrecondition(format!(
                        "model accounts/{account}/models/{id} is READY; its files can no longer change. \
                     Create a new model to upload other files"
                    )));
                }
                if doc.value.import.is_some() && doc.value.model.state == Some(ModelState::Uploading) {
                    return Err(ControlError::FailedPrecondition(format!(
                        "model accounts/{account}/models/{id} is being imported; wait for it to end before uploading"
                    )));
                }
                // A model whose import failed may be uploaded by hand instead.
                if doc.value.model.state == Some(ModelState::Failed) {
                    doc.value.model.state = Some(ModelState::Uploading);
                    doc.value.model.status = None;
                }
                doc.value.announced = announced.clone();
                Ok(())
            },
        )
        .await?;
        let expires = chrono::Utc::now().timestamp() + self.config.signed_url_ttl.as_secs() as i64;
        let urls = announced
            .iter()
            .map(|(file, size)| {
                let grant = Grant {
                    method: "PUT",
                    account: account.to_string(),
                    model: id.to_string(),
                    file: file.clone(),
                    size: *size,
                    expires,
                };
                (file.clone(), self.signer.url(&grant))
            })
            .collect();
        Ok(GetUploadEndpointResponse { filename_to_signed_urls: urls })
    }

    /// Receives one file, or one part of it, through a signed URL. The signature is the
    /// authorisation: no API key is involved, as with a cloud storage upload.
    ///
    /// `part` says what the request carries: the whole file, a byte range of it (resumable
    /// upload; the range's total must be the size the URL was signed for), or nothing but a
    /// question about where the upload stands. `sha256`, when the client sends one, is checked
    /// against the completed file.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_file<S, E>(
        &self,
        account: &str,
        id: &str,
        file: &str,
        size: u64,
        expires: i64,
        sig: &str,
        declared_length: Option<u64>,
        part: UploadPart,
        sha256: Option<Sha256Digest>,
        body: S,
    ) -> Result<UploadProgress>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let grant =
            Grant { method: "PUT", account: account.into(), model: id.into(), file: file.into(), size, expires };
        self.signer.verify(&grant, sig, chrono::Utc::now().timestamp())?;
        let (total, body_len) = match part {
            UploadPart::Whole => (size, size),
            UploadPart::Range { start, end, total } => (total, end.saturating_sub(start).saturating_add(1)),
            UploadPart::Status { total } => (total, 0),
        };
        if total != size {
            return Err(ControlError::InvalidArgument(format!(
                "Content-Range names a file of {total} bytes but the URL for {file} was signed for {size} bytes"
            )));
        }
        if let Some(len) = declared_length {
            if len != body_len {
                return Err(ControlError::InvalidArgument(match part {
                    UploadPart::Whole => {
                        format!("Content-Length is {len} but the URL for {file} was signed for {size} bytes")
                    }
                    _ => format!("Content-Length is {len} but its Content-Range names {body_len} bytes of {file}"),
                }));
            }
        }
        let doc = self.load_model(account, id).await?;
        if doc.value.model.state == Some(ModelState::Ready) {
            return Err(ControlError::FailedPrecondition(format!(
                "model accounts/{account}/models/{id} is READY; its files can no longer change"
            )));
        }
        let progress = match part {
            UploadPart::Whole => {
                self.artifacts.write_verified(account, id, file, size, sha256, body).await?;
                UploadProgress::Complete
            }
            UploadPart::Range { start, end, total } => {
                self.artifacts.write_part(account, id, file, start, end, total, sha256, body).await?
            }
            UploadPart::Status { total } => self.artifacts.part_status(account, id, file, total, sha256).await?,
        };
        match progress {
            UploadProgress::Complete => tracing::info!(account, model = %id, file, size, "file uploaded"),
            UploadProgress::Incomplete { offset } => {
                tracing::debug!(account, model = %id, file, size, offset, "part of a file uploaded")
            }
        }
        Ok(progress)
    }

    /// Checks what was uploaded and, when it is a model hearth can serve, marks the model
    /// READY with the details read from its files. Each problem found is named.
    pub async fn validate_upload(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        opts: ValidateOptions,
    ) -> Result<ValidateUploadResponse> {
        self.authorize(who, account)?;
        // What validates is what serves: the engine loads a model through these same checks,
        // so none of them can be skipped.
        for (flag, set) in
            [("skipHfConfigValidation", opts.skip_hf_config_validation), ("configOnly", opts.config_only)]
        {
            if set {
                return Err(ControlError::Unimplemented(format!(
                    "{flag}=true is not supported: hearth validates a model with the checks its engine loads it \
                     with, all of them, so what validates is what serves"
                )));
            }
        }
        if opts.trust_remote_code {
            return Err(ControlError::Unimplemented(
                "trustRemoteCode is not supported: hearth never runs code that comes with a model".to_string(),
            ));
        }
        let doc = self.load_model(account, id).await?;
        if doc.value.import.is_some() && doc.value.model.state == Some(ModelState::Uploading) {
            return Err(ControlError::FailedPrecondition(format!(
                "model accounts/{account}/models/{id} is being imported from {}; it validates itself when its \
                 files are in",
                doc.value.model.imported_from.clone().unwrap_or_default()
            )));
        }
        self.validate_files(account, id).await
    }

    /// Validation proper, shared by uploads and imports.
    pub(crate) async fn validate_files(&self, account: &str, id: &str) -> Result<ValidateUploadResponse> {
        let doc = self.load_model(account, id).await?;
        if doc.value.model.state == Some(ModelState::Ready) {
            return Ok(ValidateUploadResponse::default());
        }
        // From here no upload can change a file (one still streaming is refused when it ends),
        // so what is checked is what becomes READY. Any early return lifts the seal.
        let seal = self.artifacts.seal(account, id)?;
        // With an object-store artifact store, files may have arrived through other gateways.
        self.artifacts.sync(account, id).await?;
        let mut problems = Vec::new();
        let present: BTreeMap<String, u64> = self.artifacts.list(account, id).await?.into_iter().collect();
        for (file, size) in &doc.value.announced {
            match present.get(file) {
                None => problems.push(format!("{file} was announced but has not been uploaded")),
                Some(actual) if actual != size => {
                    problems.push(format!("{file} has {actual} bytes but {size} were announced"))
                }
                Some(_) => {}
            }
        }
        if present.is_empty() && doc.value.announced.is_empty() {
            problems
                .push("no files have been uploaded: call :getUploadEndpoint and upload the model's files".to_string());
        }
        if !problems.is_empty() {
            return Err(self.validation_failure(account, id, problems));
        }
        let dir = self.artifacts.model_dir(account, id);
        let kind = doc.value.model.kind.unwrap_or(ModelKind::HfPeftAddon);
        let mut warnings = Vec::new();
        // For an addon, the base's architecture is recorded as its `baseModelType`.
        let mut base_arch = None;
        let outcome: std::result::Result<(Option<BaseFacts>, Option<inspect::AdapterSummary>), Vec<String>> = match kind
        {
            ModelKind::HfBaseModel => {
                let summary = tokio::task::spawn_blocking(move || inspect::inspect_base(&dir))
                    .await
                    .map_err(ControlError::internal)?;
                summary.map(|s| (Some(BaseFacts::from_summary(&s)), None)).map_err(|p| p.0)
            }
            _ => {
                let base_name =
                    doc.value.model.peft_details.as_ref().and_then(|p| p.base_model.clone()).unwrap_or_default();
                let (_, base_doc) = self.resolve_model(account, &base_name, "peftDetails.baseModel").await?;
                let Some(base) =
                    base_doc.value.base.clone().filter(|_| base_doc.value.model.state == Some(ModelState::Ready))
                else {
                    return Err(ControlError::FailedPrecondition(format!(
                        "base model {base_name} is not READY yet; validate its upload first"
                    )));
                };
                base_arch = Some(base.architecture.clone());
                let adapter = tokio::task::spawn_blocking(move || inspect::inspect_adapter(&dir))
                    .await
                    .map_err(ControlError::internal)?;
                match adapter {
                    Err(p) => Err(p.0),
                    Ok(a) => {
                        let problems = inspect::check_adapter_against_base(&a, &base.dims(), &base.architecture);
                        if problems.is_empty() {
                            Ok((None, Some(a)))
                        } else {
                            Err(problems)
                        }
                    }
                }
            }
        };
        let (base, adapter) = match outcome {
            Ok(v) => v,
            Err(problems) => return Err(self.validation_failure(account, id, problems)),
        };
        self.modify(
            account,
            id,
            || not_found(account, id),
            |doc: &mut Doc<ModelRecord>| {
                let m = &mut doc.value.model;
                if let Some(b) = &base {
                    let details = m.base_model_details.get_or_insert_with(BaseModelDetails::default);
                    details.parameter_count = i64::try_from(b.parameter_count).ok();
                    details.model_type = Some(b.architecture.clone());
                    details.default_precision = default_precision(&b.dtype);
                    if b.is_gguf() {
                        details.checkpoint_format = Some(CheckpointFormat::Native);
                    } else {
                        details.checkpoint_format = Some(CheckpointFormat::Huggingface);
                        details.huggingface_files = Some(b.files.clone());
                    }
                    if let Some(ctx) = b.context_length {
                        m.context_length = i32::try_from(ctx).ok();
                    }
                    m.default_sampling_params = Some(b.sampling_defaults.clone()).filter(|d| !d.is_empty());
                    m.supports_lora.get_or_insert(true);
                }
                if let Some(a) = &adapter {
                    let peft = m.peft_details.get_or_insert_with(PeftDetails::default);
                    if peft.r.is_some_and(|r| r as i64 != a.r as i64) {
                        warnings.push(format!(
                            "peftDetails.r was {} but adapter_config.json says {}; using the file's value",
                            peft.r.unwrap_or_default(),
                            a.r
                        ));
                    }
                    peft.r = i32::try_from(a.r).ok();
                    peft.target_modules = Some(a.target_modules.clone());
                    peft.base_model_type = base_arch.clone();
                }
                m.state = Some(ModelState::Ready);
                m.status = None;
                doc.value.base = base.clone();
                Ok(())
            },
        )
        .await?;
        seal.keep();
        self.artifacts.publish_seal(account, id).await?;
        tracing::info!(account, model = %id, "model validated and READY");
        Ok(ValidateUploadResponse { warnings })
    }

    /// A refused validation changes nothing stored: the model stays UPLOADING, and the
    /// error names every problem so the user can fix them all in one go.
    fn validation_failure(&self, account: &str, id: &str, problems: Vec<String>) -> ControlError {
        ControlError::FailedPrecondition(format!(
            "upload of accounts/{account}/models/{id} is not valid: {}",
            problems.join("; ")
        ))
    }

    pub async fn get_download_endpoint(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        read_mask: Option<&str>,
    ) -> Result<Value> {
        render(&self.download_endpoint(who, account, id).await?, read_mask)
    }

    async fn download_endpoint(&self, who: &Principal, account: &str, id: &str) -> Result<GetDownloadEndpointResponse> {
        self.authorize(who, account)?;
        let doc = self.load_model(account, id).await?;
        if doc.value.model.state != Some(ModelState::Ready) {
            return Err(ControlError::FailedPrecondition(format!(
                "model accounts/{account}/models/{id} is not READY; validate its upload first"
            )));
        }
        let expires = chrono::Utc::now().timestamp() + self.config.signed_url_ttl.as_secs() as i64;
        let urls = self
            .artifacts
            .list(account, id)
            .await?
            .into_iter()
            .map(|(file, _)| {
                let grant = Grant {
                    method: "GET",
                    account: account.into(),
                    model: id.into(),
                    file: file.clone(),
                    size: 0,
                    expires,
                };
                (file, self.signer.url(&grant))
            })
            .collect();
        Ok(GetDownloadEndpointResponse { filename_to_signed_urls: urls })
    }

    /// The manifest a replica fetches a model's files by (`GET /replica-files/...`, signed by
    /// [`ControlPlane::replica_files_url`]): every file with its size, digest and a download
    /// URL that lasts as long as the manifest's.
    pub async fn replica_manifest(
        &self,
        account: &str,
        id: &str,
        expires: i64,
        sig: &str,
    ) -> Result<hearth_api::replica::FileManifest> {
        let grant =
            Grant { method: "LIST", account: account.into(), model: id.into(), file: String::new(), size: 0, expires };
        self.signer.verify(&grant, sig, chrono::Utc::now().timestamp())?;
        let doc = self.load_model(account, id).await?;
        if doc.value.model.state != Some(ModelState::Ready) {
            return Err(ControlError::FailedPrecondition(format!(
                "model accounts/{account}/models/{id} is not READY; its files cannot be served to replicas"
            )));
        }
        let files = self
            .artifacts
            .digests(account, id)
            .await?
            .into_iter()
            .map(|(name, size, sha256)| {
                let grant = Grant {
                    method: "GET",
                    account: account.into(),
                    model: id.into(),
                    file: name.clone(),
                    size: 0,
                    expires,
                };
                hearth_api::replica::ManifestFile { url: self.signer.url(&grant), name, size, sha256 }
            })
            .collect();
        Ok(hearth_api::replica::FileManifest { model: format!("accounts/{account}/models/{id}"), files })
    }

    /// Opens a file for a signed download URL.
    pub async fn download_file(
        &self,
        account: &str,
        id: &str,
        file: &str,
        expires: i64,
        sig: &str,
    ) -> Result<(tokio::fs::File, u64)> {
        let grant =
            Grant { method: "GET", account: account.into(), model: id.into(), file: file.into(), size: 0, expires };
        self.signer.verify(&grant, sig, chrono::Utc::now().timestamp())?;
        self.load_model(account, id).await?;
        Ok(self.artifacts.open(account, id, file).await?)
    }
}
