//! The second provider's LoRA API, in terms of hearth's own resources.
//!
//! A LoRA named `pirate` is the addon model `accounts/{a}/models/pirate`, imported from its
//! source, and a DeployedModel of it on its base model's default deployment (the oldest live
//! deployment of the base with addons enabled; created with one replica when there is none).
//! The addon cannot be loaded before its import is READY, so the deployment it goes to is
//! kept in the model's record and loaded when the import ends ([`ControlPlane::finish_import`]).
//! The LoRA's `status` is read from the three resources, never stored twice:
//!
//! | model     | DeployedModel        | deployment | status         |
//! |-----------|----------------------|------------|----------------|
//! | UPLOADING | –                    | –          | `initializing` |
//! | FAILED    | –                    | –          | `failed`       |
//! | READY     | DEPLOYING            | live       | `initializing` |
//! | READY     | DEPLOYED             | live       | `deployed`     |
//! | READY     | any                  | FAILED     | `failed`       |
//! | READY     | none, load failed    | –          | `failed`       |
//! | READY     | none (unloaded)      | –          | `deleted`      |

use hearth_api::deepinfra::{
    CreateLoraRequest, DeployInstances, DeployLlmConfig, DeploymentOut, HfWeights, LoraSource, LoraStatus,
    ScaleSettings, UpdateLoraRequest,
};
use hearth_api::names::{validate_id, Collection, ResourceName};
use hearth_api::resources::{
    CivitaiSource, CreateModelRequest, DeployedModel, DeployedModelState, Deployment, DeploymentState,
    HuggingFaceSource, Model, ModelKind, ModelSource, ModelState, PeftDetails, UrlSource,
};
use serde_json::json;

use crate::auth::Principal;
use crate::deployments::CreateDeploymentOptions;
use crate::deployments::REPLICA_BATCH_SIZE;
use crate::error::{ControlError, Result};
use crate::models::ModelRecord;
use crate::records::deployed_model::DeployedModelSpec;
use crate::records::Doc;
use crate::ControlPlane;

fn lora_not_found(name: &str) -> ControlError {
    ControlError::NotFound(format!("LoRA {name} not found"))
}

fn model_source(source: &LoraSource) -> ModelSource {
    match source.clone() {
        LoraSource::Civitai { civit_url, token } => {
            ModelSource { civitai_source: Some(CivitaiSource { civit_url, token }), ..ModelSource::default() }
        }
        LoraSource::Huggingface { repo, revision, token } => ModelSource {
            huggingface_source: Some(HuggingFaceSource { repo, revision, token, files: None }),
            ..ModelSource::default()
        },
        LoraSource::Url { url, headers } => {
            ModelSource { url_source: Some(UrlSource { url, headers }), ..ModelSource::default() }
        }
    }
}

impl ControlPlane {
    /// `POST /v1/lora/create`: imports the adapter and loads it onto the base model's default
    /// deployment once it is READY.
    pub async fn create_lora(&self, who: &Principal, req: CreateLoraRequest) -> Result<DeploymentOut> {
        let account = who.account.clone();
        validate_id("lora", &req.lora_name).map_err(ControlError::InvalidArgument)?;
        let base_name = if req.base_model.contains('/') {
            req.base_model.clone()
        } else {
            ResourceName::new(&account, Collection::Models, &req.base_model).to_string()
        };
        let (base_rn, base) = self.resolve_model(&account, &base_name, "base_model").await?;
        if base.value.model.kind != Some(ModelKind::HfBaseModel) {
            return Err(ControlError::FailedPrecondition(format!("base_model {base_name} is not a base model")));
        }
        if base.value.model.state != Some(ModelState::Ready) {
            return Err(ControlError::FailedPrecondition(format!(
                "base_model {base_name} is not READY: upload and validate it first"
            )));
        }
        let source = model_source(&req.source);
        hearth_artifacts::sources::check(&source)?;
        if self.load::<ModelRecord>(&account, &req.lora_name).await?.is_some() {
            return Err(ControlError::AlreadyExists(format!(
                "a LoRA or model named {} already exists in account {account}",
                req.lora_name
            )));
        }
        let deployment = self.default_lora_deployment(who, &base_rn).await?;
        let model = Model {
            kind: Some(ModelKind::HfPeftAddon),
            display_name: Some(req.lora_name.clone()),
            description: req.description.clone().filter(|d| !d.is_empty()),
            public: Some(!req.private),
            peft_details: Some(PeftDetails { base_model: Some(base_rn.to_string()), ..PeftDetails::default() }),
            ..Model::default()
        };
        let create = CreateModelRequest {
            model_id: Some(req.lora_name.clone()),
            model: Some(model),
            cluster: None,
            source: Some(source),
        };
        self.create_model_for(who, &account, create, Some(deployment)).await?;
        self.lora_view(&account, &req.lora_name).await
    }

    /// The deployment a LoRA of `base` goes to: the oldest live one with addons enabled, or
    /// a new one with a single replica.
    async fn default_lora_deployment(&self, who: &Principal, base: &ResourceName) -> Result<String> {
        let account = &who.account;
        let base_name = base.to_string();
        let mut live: Vec<Doc<crate::records::deployment::DeploymentSpec>> = self
            .load_all(account)
            .await?
            .into_iter()
            .filter(|d: &Doc<crate::records::deployment::DeploymentSpec>| {
                d.value.base_model == base_name && !d.value.is_deleted() && d.value.addons_enabled()
            })
            .collect();
        live.sort_by_key(|d| d.create_time);
        if let Some(d) = live.first() {
            return Ok(ResourceName::new(account, Collection::Deployments, &d.id).to_string());
        }
        let body = Deployment {
            base_model: Some(base_name.clone()),
            display_name: Some(format!("LoRA deployment of {}", base.id)),
            min_replica_count: Some(1),
            max_replica_count: Some(1),
            enable_addons: Some(true),
            ..Deployment::default()
        };
        // Named after the base when that id is free, so it is easy to find.
        for id in [Some(format!("{}-loras", base.id).chars().take(63).collect::<String>()), None] {
            let opts = CreateDeploymentOptions { deployment_id: id, ..Default::default() };
            match self.create_deployment(who, account, opts, body.clone()).await {
                Ok(d) => {
                    tracing::info!(account = %account, deployment = ?d.name, base = %base_name, "default LoRA deployment created");
                    return d.name.ok_or_else(|| ControlError::internal("created deployment has no name"));
                }
                Err(ControlError::AlreadyExists(_) | ControlError::InvalidArgument(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ControlError::internal("could not create a default LoRA deployment"))
    }

    /// Loads a freshly imported addon onto the deployment its record names. A failure is
    /// kept in the model's `status`, where the LoRA API reads it as `failed`.
    pub(crate) async fn deploy_imported_addon(&self, account: &str, id: &str, deployment: &str) -> Result<()> {
        let who = Principal::admin(account.to_string());
        let body = DeployedModel {
            model: Some(ResourceName::new(account, Collection::Models, id).to_string()),
            deployment: Some(deployment.to_string()),
            ..DeployedModel::default()
        };
        let outcome = match self.create_deployed_model(&who, account, body, false).await {
            Ok(_) | Err(ControlError::AlreadyExists(_)) => None,
            Err(e) => Some(hearth_api::rpc::ResourceStatus::new(
                e.code(),
                format!("loading onto {deployment} failed: {}", e.public_message()),
            )),
        };
        self.modify(
            account,
            id,
            || lora_not_found(id),
            |doc: &mut Doc<ModelRecord>| {
                doc.value.deploy_onto = None;
                if outcome.is_some() {
                    doc.value.model.status = outcome.clone();
                }
                Ok(())
            },
        )
        .await?;
        Ok(())
    }

    async fn lora_record(&self, account: &str, name: &str) -> Result<Doc<ModelRecord>> {
        let doc = self.load::<ModelRecord>(account, name).await?.ok_or_else(|| lora_not_found(name))?;
        if doc.value.model.kind != Some(ModelKind::HfPeftAddon) {
            return Err(ControlError::NotFound(format!("{name} is a base model, not a LoRA")));
        }
        Ok(doc)
    }

    /// The LoRA as `DeploymentOut`.
    async fn lora_view(&self, account: &str, name: &str) -> Result<DeploymentOut> {
        let doc = self.lora_record(account, name).await?;
        self.render_lora(account, &doc).await
    }

    async fn render_lora(&self, account: &str, doc: &Doc<ModelRecord>) -> Result<DeploymentOut> {
        let m = &doc.value.model;
        let model_name = ResourceName::new(account, Collection::Models, &doc.id).to_string();
        let loaded: Vec<(String, DeployedModel)> = self
            .deployed_models_of(account)
            .await?
            .into_iter()
            .filter(|d| d.model.as_deref() == Some(model_name.as_str()))
            .filter_map(|d| {
                let id = ResourceName::parse(d.name.as_deref()?, Collection::DeployedModels).ok()?.id;
                Some((id, d))
            })
            .collect();
        let chosen = loaded.iter().find(|(_, d)| d.default == Some(true)).or(loaded.first());
        let deployment_name = chosen.and_then(|(_, d)| d.deployment.clone()).or(doc.value.deploy_onto.clone());
        let deployment = match &deployment_name {
            Some(n) => match ResourceName::parse(n, Collection::Deployments) {
                Ok(rn) => match self.deployment_view(&rn.account, &rn.id).await {
                    Ok(d) => Some(d),
                    Err(ControlError::NotFound(_)) => None,
                    Err(e) => return Err(e),
                },
                Err(_) => None,
            },
            None => None,
        };
        let reason = |s: &Option<hearth_api::rpc::ResourceStatus>| {
            s.as_ref().and_then(|s| s.message.clone()).unwrap_or_default()
        };
        let (status, fail_reason) = match (m.state, chosen, &deployment) {
            (Some(ModelState::Failed), _, _) => ("failed", reason(&m.status)),
            (Some(ModelState::Ready), _, Some(d)) if d.state == Some(DeploymentState::Failed) => {
                ("failed", reason(&d.status))
            }
            (Some(ModelState::Ready), Some((_, dm)), _) if dm.state == Some(DeployedModelState::Deployed) => {
                ("deployed", String::new())
            }
            (Some(ModelState::Ready), Some(_), _) => ("initializing", String::new()),
            (Some(ModelState::Ready), None, _) if doc.value.deploy_onto.is_some() => ("initializing", String::new()),
            (Some(ModelState::Ready), None, _) if m.status.is_some() => ("failed", reason(&m.status)),
            (Some(ModelState::Ready), None, _) => ("deleted", String::new()),
            _ => ("initializing", String::new()),
        };
        let (instances, settings, num_gpus) = match &deployment {
            Some(d) => {
                let running = d.replica_count.unwrap_or(0) as i64;
                let desired = d.desired_replica_count.unwrap_or(0) as i64;
                (
                    Some(DeployInstances { running, pending: (desired - running).max(0) }),
                    Some(ScaleSettings {
                        min_instances: d.min_replica_count.unwrap_or(0) as i64,
                        max_instances: d.max_replica_count.unwrap_or(1) as i64,
                    }),
                    d.accelerator_count.unwrap_or(0) as i64,
                )
            }
            None => (None, None, 0),
        };
        let hf = doc.value.hf_weights();
        Ok(DeploymentOut {
            kind: "lora".to_string(),
            deploy_id: chosen
                .map(|(id, _)| ResourceName::new(account, Collection::DeployedModels, id).to_string())
                .unwrap_or_else(|| model_name.clone()),
            model_name: doc.id.clone(),
            version: doc.value.source_version.clone().unwrap_or_default(),
            task: "text-generation".to_string(),
            status: status.to_string(),
            fail_reason,
            created_at: doc.create_time.to_rfc3339(),
            updated_at: doc.update_time.to_rfc3339(),
            instances,
            config: Some(DeployLlmConfig {
                gpu: "other".to_string(),
                num_gpus,
                max_batch_size: REPLICA_BATCH_SIZE as i64,
                weights: hf,
            }),
            settings,
            description: m.description.clone().unwrap_or_default(),
            private: m.public != Some(true),
        })
    }

    pub async fn get_lora(&self, who: &Principal, name: &str) -> Result<DeploymentOut> {
        self.lora_view(&who.account, name).await
    }

    pub async fn lora_status(&self, who: &Principal, name: &str) -> Result<LoraStatus> {
        let out = self.lora_view(&who.account, name).await?;
        Ok(LoraStatus { lora_name: name.to_string(), status: out.status, fail_reason: out.fail_reason })
    }

    pub async fn update_lora(&self, who: &Principal, name: &str, req: UpdateLoraRequest) -> Result<DeploymentOut> {
        let account = who.account.clone();
        self.lora_record(&account, name).await?;
        let mut patch = serde_json::Map::new();
        if let Some(private) = req.private {
            patch.insert("public".to_string(), json!(!private));
        }
        if let Some(d) = req.description {
            patch.insert("description".to_string(), json!(d));
        }
        if !patch.is_empty() {
            let mask = patch.keys().cloned().collect::<Vec<_>>().join(",");
            self.update_model(who, &account, name, &serde_json::Value::Object(patch), Some(&mask)).await?;
        }
        self.lora_view(&account, name).await
    }

    /// Unloads the LoRA from every deployment and deletes its model; answers with its last
    /// view, `deleted`.
    pub async fn delete_lora(&self, who: &Principal, name: &str) -> Result<DeploymentOut> {
        let account = who.account.clone();
        let doc = self.lora_record(&account, name).await?;
        let mut last = self.render_lora(&account, &doc).await?;
        let model_name = ResourceName::new(&account, Collection::Models, name).to_string();
        for dm in self.load_all::<DeployedModelSpec>(&account).await? {
            if dm.value.model == model_name {
                match self.delete_deployed_model(who, &account, &dm.id).await {
                    Ok(()) | Err(ControlError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.delete_model(who, &account, name).await?;
        last.status = "deleted".to_string();
        last.instances = Some(DeployInstances { running: 0, pending: 0 });
        Ok(last)
    }

    /// Every LoRA of the caller's account, oldest first; with `base`, only those of that base.
    pub async fn list_loras(&self, who: &Principal, base: Option<&str>) -> Result<Vec<DeploymentOut>> {
        let account = who.account.clone();
        let base_name = base.map(|b| {
            if b.contains('/') {
                b.to_string()
            } else {
                ResourceName::new(&account, Collection::Models, b).to_string()
            }
        });
        let mut docs: Vec<Doc<ModelRecord>> = self
            .load_all::<ModelRecord>(&account)
            .await?
            .into_iter()
            .filter(|d| d.value.model.kind == Some(ModelKind::HfPeftAddon))
            .filter(|d| {
                base_name.as_deref().is_none_or(|b| {
                    d.value.model.peft_details.as_ref().and_then(|p| p.base_model.as_deref()) == Some(b)
                })
            })
            .collect();
        docs.sort_by_key(|d| d.create_time);
        let mut out = Vec::with_capacity(docs.len());
        for d in &docs {
            out.push(self.render_lora(&account, d).await?);
        }
        Ok(out)
    }
}

impl ModelRecord {
    /// The Hub repository an addon came from, without its token.
    fn hf_weights(&self) -> Option<HfWeights> {
        let from = self.model.imported_from.as_deref()?.strip_prefix("hf://")?;
        let (repo, revision) = from.split_once('@').unwrap_or((from, "main"));
        Some(HfWeights { repo: repo.to_string(), revision: Some(revision.to_string()) })
    }
}
