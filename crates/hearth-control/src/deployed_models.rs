//! The DeployedModels service ("Load LoRA"): which addon is loaded onto which deployment.
//! It writes only the spec row; new ones show DEPLOYING until the runtime's reconciler writes
//! DEPLOYED (every ready replica has the adapter) into the status row.

use std::collections::HashMap;

use hearth_api::names::{Collection, ResourceName};
use hearth_api::resources::{DeployedModel, ModelKind, ModelState};
use serde_json::Value;

use crate::auth::Principal;
use crate::error::{ControlError, Result};
use crate::listing::{paginate, render, ListPage, ListRequest, Listable};
use crate::observe::DeploymentKey;
use crate::patch::{Patch, Patchable};
use crate::quotas::QuotaId;
use crate::records::deployed_model::{self as record, DeployedModelSpec, DeployedModelStatus};
use crate::records::Doc;
use crate::ControlPlane;

pub(crate) const DEPLOYED_MODEL_LIST: Listable = Listable {
    fields: &[
        "name",
        "displayName",
        "description",
        "createTime",
        "updateTime",
        "model",
        "deployment",
        "default",
        "state",
        "public",
    ],
    default_order: "name",
};

const DEPLOYED_MODEL_PATCH: Patchable = Patchable {
    resource: "deployed model",
    output_only: &["name", "createTime", "updateTime", "state", "status"],
    mutable: &["displayName", "description", "default", "public", "model", "deployment", "serverless"],
};

fn not_found(account: &str, id: &str) -> ControlError {
    ControlError::NotFound(format!("deployed model accounts/{account}/deployedModels/{id} not found"))
}

fn check_text(dm: &DeployedModel) -> Result<()> {
    if dm.display_name.as_ref().is_some_and(|n| n.chars().count() >= 64) {
        return Err(ControlError::InvalidArgument("displayName must be fewer than 64 characters".to_string()));
    }
    if dm.description.as_ref().is_some_and(|n| n.chars().count() >= 1000) {
        return Err(ControlError::InvalidArgument("description must be fewer than 1000 characters".to_string()));
    }
    if dm.serverless == Some(true) {
        return Err(ControlError::unimplemented_field("deployed model", "serverless"));
    }
    Ok(())
}

impl ControlPlane {
    async fn deployed_model_view(&self, account: &str, doc: &Doc<DeployedModelSpec>) -> DeployedModel {
        let status: Option<Doc<DeployedModelStatus>> = self.load(account, &doc.id).await.unwrap_or(None);
        record::view(account, doc, status.as_ref())
    }

    pub(crate) async fn deployed_models_of(&self, account: &str) -> Result<Vec<DeployedModel>> {
        let statuses: HashMap<String, Doc<DeployedModelStatus>> =
            self.load_all::<DeployedModelStatus>(account).await?.into_iter().map(|d| (d.id.clone(), d)).collect();
        let docs: Vec<Doc<DeployedModelSpec>> = self.load_all(account).await?;
        Ok(docs.iter().map(|d| record::view(account, d, statuses.get(&d.id))).collect())
    }

    /// Loads an addon onto a deployment. `replace_merged_addon` is the hot-reload mode: the
    /// new addon replaces whatever addon the deployment had merged.
    pub async fn create_deployed_model(
        &self,
        who: &Principal,
        account: &str,
        body: DeployedModel,
        replace_merged_addon: bool,
    ) -> Result<DeployedModel> {
        self.authorize(who, account)?;
        check_text(&body)?;
        let model_name = body.model.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
            ControlError::InvalidArgument("model is required: the name of a READY HF_PEFT_ADDON".to_string())
        })?;
        let deployment_name = body.deployment.clone().filter(|s| !s.is_empty()).ok_or_else(|| {
            ControlError::InvalidArgument("deployment is required: the name of the deployment to load onto".to_string())
        })?;
        let (_, model) = self.resolve_model(account, &model_name, "model").await?;
        let dep_rn = ResourceName::parse(&deployment_name, Collection::Deployments)
            .map_err(|e| ControlError::InvalidArgument(format!("deployment: {e}")))?;
        if dep_rn.account != account {
            return Err(ControlError::PermissionDenied(format!(
                "deployment {deployment_name} belongs to another account"
            )));
        }
        let deployment = self
            .load_deployment(account, &dep_rn.id)
            .await
            .map_err(|_| ControlError::FailedPrecondition(format!("deployment {deployment_name} does not exist")))?
            .value;
        let deployment_base = Some(deployment.base_model.as_str()).filter(|b| !b.is_empty());

        let m = &model.value.model;
        if m.kind != Some(ModelKind::HfPeftAddon) {
            return Err(ControlError::FailedPrecondition(format!(
                "model {model_name} is not an HF_PEFT_ADDON; only LoRA addons can be loaded onto a deployment"
            )));
        }
        if m.state != Some(ModelState::Ready) {
            return Err(ControlError::FailedPrecondition(format!(
                "model {model_name} is not READY: upload its files and call :validateUpload first"
            )));
        }
        if deployment.is_deleted() {
            return Err(ControlError::FailedPrecondition(format!("deployment {deployment_name} is deleted")));
        }
        let addon_base = m.peft_details.as_ref().and_then(|p| p.base_model.clone()).unwrap_or_default();
        if Some(addon_base.as_str()) != deployment_base {
            return Err(ControlError::FailedPrecondition(format!(
                "model {model_name} is an addon of {addon_base}, but deployment {deployment_name} serves {}",
                deployment_base.unwrap_or("no base model")
            )));
        }
        let hot_reload = deployment.merged_mode();
        if hot_reload && !replace_merged_addon {
            return Err(ControlError::FailedPrecondition(format!(
                "deployment {deployment_name} merges one addon at a time (enableHotReloadLatestAddon); \
                 pass replaceMergedAddon=true to replace it"
            )));
        }
        if !hot_reload && !deployment.addons_enabled() {
            return Err(ControlError::FailedPrecondition(format!(
                "deployment {deployment_name} does not have enableAddons set; update it with enableAddons=true first"
            )));
        }
        if replace_merged_addon && !hot_reload {
            return Err(ControlError::FailedPrecondition(format!(
                "replaceMergedAddon applies only to deployments with enableHotReloadLatestAddon; \
                 {deployment_name} serves addons side by side"
            )));
        }

        let existing = self.load_all::<DeployedModelSpec>(account).await?;
        if let Some(dup) =
            existing.iter().find(|d| d.value.model == model_name && d.value.deployment == deployment_name)
        {
            return Err(ControlError::AlreadyExists(format!(
                "model {model_name} is already loaded onto {deployment_name} as {}",
                ResourceName::new(account, Collection::DeployedModels, &dup.id)
            )));
        }
        let first_for_model = !existing.iter().any(|d| d.value.model == model_name);
        let make_default = first_for_model || body.default == Some(true);

        let dm = DeployedModelSpec {
            display_name: body.display_name,
            description: body.description,
            model: model_name.clone(),
            deployment: deployment_name.clone(),
            default: make_default,
            public: body.public,
        };
        let _admission = self.admission(account).await;
        self.check_quota(account, QuotaId::LoadedAddons, 1, None).await?;
        // An id of eight hex digits, as the hosted service issues; retried on the rare clash.
        let mut doc = None;
        for _ in 0..8 {
            let id = format!("{:08x}", rand::random::<u32>());
            match self.insert_doc(account, &id, &dm).await {
                Ok(d) => {
                    doc = Some(d);
                    break;
                }
                Err(ControlError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        let doc = doc.ok_or_else(|| ControlError::Internal("could not find a free deployed model id".to_string()))?;
        if make_default {
            self.clear_other_defaults(account, &model_name, &doc.id).await?;
        }
        if replace_merged_addon {
            // The merged slot holds one addon: the others on this deployment are replaced.
            for old in existing.iter().filter(|d| d.value.deployment == deployment_name) {
                self.remove_deployed_model_rows(account, &old.id).await?;
            }
        }
        tracing::info!(account, deployed_model = %doc.id, model = %model_name, deployment = %deployment_name, "addon load requested");
        self.changed(DeploymentKey::from_name(&deployment_name));
        Ok(record::view(account, &doc, None))
    }

    /// One deployment per model is its default target; setting a new default clears the rest.
    async fn clear_other_defaults(&self, account: &str, model: &str, keep: &str) -> Result<()> {
        for other in self.load_all::<DeployedModelSpec>(account).await? {
            if other.id != keep && other.value.model == model && other.value.default {
                self.modify(
                    account,
                    &other.id,
                    || not_found(account, &other.id),
                    |d: &mut Doc<DeployedModelSpec>| {
                        d.value.default = false;
                        Ok(())
                    },
                )
                .await?;
            }
        }
        Ok(())
    }

    pub async fn get_deployed_model(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        read_mask: Option<&str>,
    ) -> Result<Value> {
        self.authorize(who, account)?;
        let doc: Doc<DeployedModelSpec> = self.load(account, id).await?.ok_or_else(|| not_found(account, id))?;
        render(&self.deployed_model_view(account, &doc).await, read_mask)
    }

    pub async fn list_deployed_models(&self, who: &Principal, account: &str, req: &ListRequest) -> Result<ListPage> {
        self.authorize(who, account)?;
        let items = self
            .deployed_models_of(account)
            .await?
            .into_iter()
            .map(|d| serde_json::to_value(d).map_err(ControlError::internal))
            .collect::<Result<Vec<_>>>()?;
        paginate(items, req, &DEPLOYED_MODEL_LIST)
    }

    pub async fn update_deployed_model(
        &self,
        who: &Principal,
        account: &str,
        id: &str,
        body: &Value,
        update_mask: Option<&str>,
    ) -> Result<Value> {
        self.authorize(who, account)?;
        let patch: Patch<DeployedModel> = Patch::parse(body, update_mask, &DEPLOYED_MODEL_PATCH)?;
        let mut became_default = None;
        let doc = self
            .modify(
                account,
                id,
                || not_found(account, id),
                |doc: &mut Doc<DeployedModelSpec>| {
                    let updated = patch.apply(&doc.value.to_wire())?;
                    check_text(&updated)?;
                    let new = DeployedModelSpec::from_wire(&updated);
                    if new.model != doc.value.model || new.deployment != doc.value.deployment {
                        return Err(ControlError::InvalidArgument(
                            "model and deployment of a deployed model cannot change; unload it and load the other one"
                                .to_string(),
                        ));
                    }
                    if new.default && !doc.value.default {
                        became_default = Some(new.model.clone());
                    }
                    doc.value = new;
                    Ok(())
                },
            )
            .await?;
        if let Some(model) = became_default {
            self.clear_other_defaults(account, &model, id).await?;
        }
        self.changed(DeploymentKey::from_name(&doc.value.deployment));
        render(&self.deployed_model_view(account, &doc).await, None)
    }

    /// Unloads an addon. If it was its model's default, the oldest remaining deployment of
    /// that model becomes the default, so the plain model name keeps resolving.
    pub async fn delete_deployed_model(&self, who: &Principal, account: &str, id: &str) -> Result<()> {
        self.authorize(who, account)?;
        let doc: Doc<DeployedModelSpec> = self.load(account, id).await?.ok_or_else(|| not_found(account, id))?;
        self.remove_deployed_model_rows(account, id).await?;
        if doc.value.default {
            let model = doc.value.model.clone();
            let mut rest: Vec<Doc<DeployedModelSpec>> = self
                .load_all::<DeployedModelSpec>(account)
                .await?
                .into_iter()
                .filter(|d| d.value.model == model)
                .collect();
            rest.sort_by_key(|d| d.create_time);
            if let Some(next) = rest.first() {
                let next_id = next.id.clone();
                self.modify(
                    account,
                    &next_id,
                    || not_found(account, &next_id),
                    |d: &mut Doc<DeployedModelSpec>| {
                        d.value.default = true;
                        Ok(())
                    },
                )
                .await?;
            }
        }
        tracing::info!(account, deployed_model = %id, "addon unloaded");
        self.changed(DeploymentKey::from_name(&doc.value.deployment));
        Ok(())
    }
}
