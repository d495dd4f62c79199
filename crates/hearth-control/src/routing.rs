//! Resolving the `model` of an inference request to the deployment that serves it:
//! `accounts/A/models/M` (that model's default deployment), `accounts/A/models/M#accounts/A/deployments/D`
//! (that deployment), or `accounts/A/deployedModels/X`. An account may use its own
//! deployments, of its own models or of public ones.

use hearth_api::names::{Collection, ResourceName};
use hearth_api::resources::{Deployment, DeploymentState, ModelKind};

use crate::auth::Principal;
use crate::error::{ControlError, Result};
use crate::records::deployed_model::DeployedModelSpec;
use crate::records::deployment::{self as record, DeploymentSpec, DeploymentStatus};
use crate::records::Doc;
use crate::ControlPlane;

/// Where an inference request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `accounts/{a}/deployments/{d}`.
    pub deployment: String,
    /// The name to ask the replicas for: the base model's resource name, or the addon's
    /// (replicas load an addon under its model's resource name).
    pub served_model: String,
    /// Whether `served_model` is a LoRA addon (not the base model).
    pub adapter: bool,
    /// `enableSessionAffinity`: requests of one session go to one replica.
    pub session_affinity: bool,
}

fn usable(name: &str, spec: &DeploymentSpec, status: &DeploymentStatus) -> Result<()> {
    match record::state_of(spec, status) {
        DeploymentState::Deleted => Err(ControlError::NotFound(format!("deployment {name} is deleted"))),
        DeploymentState::Failed => Err(ControlError::FailedPrecondition(format!(
            "deployment {name} has FAILED: {}",
            status.failed_at(spec.generation).map(|p| p.message.as_str()).unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

impl ControlPlane {
    pub async fn resolve_route(&self, who: &Principal, model: &str) -> Result<Route> {
        let model = model.trim();
        if model.is_empty() {
            return Err(ControlError::InvalidArgument(
                "model is required: accounts/{account}/models/{model}, optionally #accounts/{account}/deployments/{id}"
                    .to_string(),
            ));
        }
        let (left, deployment) = match model.split_once('#') {
            Some((l, r)) => (l, Some(r)),
            None => (model, None),
        };
        if left.contains("/deployedModels/") {
            let rn = ResourceName::parse(left, Collection::DeployedModels).map_err(ControlError::InvalidArgument)?;
            let dm: Option<Doc<DeployedModelSpec>> = self.load(&rn.account, &rn.id).await?;
            // A public deployed model serves every account; any other only its own.
            if dm.as_ref().is_none_or(|d| d.value.public != Some(true)) {
                self.authorize(who, &rn.account)?;
            }
            let dm = dm.ok_or_else(|| ControlError::NotFound(format!("deployed model {left} not found")))?;
            return self.addon_route(dm.value).await;
        }
        let (model_rn, model_doc) = self.resolve_model(&who.account, left, "model").await.map_err(|e| match e {
            ControlError::FailedPrecondition(m) => ControlError::NotFound(m),
            other => other,
        })?;
        let model_name = model_rn.to_string();
        if model_doc.value.model.kind != Some(ModelKind::HfBaseModel) {
            // An addon runs on a deployment it is loaded onto: the one named, or its default.
            let loaded: Vec<DeployedModelSpec> = self
                .load_all::<DeployedModelSpec>(&who.account)
                .await?
                .into_iter()
                .map(|d| d.value)
                .filter(|d| d.model == model_name)
                .collect();
            let chosen = match deployment {
                Some(dep) => loaded.into_iter().find(|d| d.deployment == dep),
                None => {
                    let mut l = loaded;
                    l.sort_by_key(|d| !d.default);
                    l.into_iter().next()
                }
            };
            let dm = chosen.ok_or_else(|| {
                ControlError::FailedPrecondition(format!(
                    "LoRA addon {model_name} is not loaded onto {}; load it with POST deployedModels first",
                    deployment.unwrap_or("any deployment of this account")
                ))
            })?;
            return self.addon_route(dm).await;
        }
        match deployment {
            Some(dep) => {
                let rn = ResourceName::parse(dep, Collection::Deployments).map_err(ControlError::InvalidArgument)?;
                self.authorize(who, &rn.account)?;
                let (d, status) = self
                    .deployment_with_status(&rn.account, &rn.id)
                    .await?
                    .ok_or_else(|| ControlError::NotFound(format!("deployment {dep} not found")))?;
                usable(dep, &d.value, &status)?;
                if d.value.base_model != model_name {
                    return Err(ControlError::FailedPrecondition(format!(
                        "deployment {dep} serves {}, not {model_name}",
                        d.value.base_model
                    )));
                }
                Ok(Route {
                    deployment: rn.to_string(),
                    served_model: model_name,
                    adapter: false,
                    session_affinity: d.value.session_affinity(),
                })
            }
            None => {
                // The model's default deployment: the oldest live deployment of it in the
                // caller's account.
                let mut candidates: Vec<Doc<DeploymentSpec>> = self
                    .load_all::<DeploymentSpec>(&who.account)
                    .await?
                    .into_iter()
                    .filter(|d| d.value.base_model == model_name && !d.value.is_deleted())
                    .collect();
                candidates.sort_by_key(|d| d.create_time);
                let d = candidates.into_iter().next().ok_or_else(|| {
                    ControlError::FailedPrecondition(format!(
                        "model {model_name} has no deployment in account {}; create one first",
                        who.account
                    ))
                })?;
                let name = ResourceName::new(&who.account, Collection::Deployments, &d.id).to_string();
                let status =
                    self.load::<DeploymentStatus>(&who.account, &d.id).await?.map(|s| s.value).unwrap_or_default();
                usable(&name, &d.value, &status)?;
                Ok(Route {
                    deployment: name,
                    served_model: model_name,
                    adapter: false,
                    session_affinity: d.value.session_affinity(),
                })
            }
        }
    }
}

impl ControlPlane {
    /// The model names an account can send inference requests for: base models with a live
    /// deployment in the account.
    pub async fn servable_models(&self, who: &Principal) -> Result<Vec<String>> {
        let live: Vec<Deployment> = self
            .deployments_of(&who.account)
            .await?
            .into_iter()
            .filter(|d| !matches!(d.state, Some(DeploymentState::Deleted | DeploymentState::Failed)))
            .collect();
        let live_names: std::collections::HashSet<&str> = live.iter().filter_map(|d| d.name.as_deref()).collect();
        // The LoRA addons loaded onto those deployments are served too, by their own names.
        let addons: Vec<String> = self
            .load_all::<DeployedModelSpec>(&who.account)
            .await?
            .into_iter()
            .filter(|dm| live_names.contains(dm.value.deployment.as_str()))
            .map(|dm| dm.value.model)
            .collect();
        let mut names: Vec<String> = live.iter().filter_map(|d| d.base_model.clone()).chain(addons).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

impl ControlPlane {
    /// The route of a LoRA addon loaded as `dm`: its deployment, asking for the addon by name.
    async fn addon_route(&self, dm: DeployedModelSpec) -> Result<Route> {
        let dep = dm.deployment.clone();
        let rn = ResourceName::parse(&dep, Collection::Deployments).map_err(ControlError::Internal)?;
        let (d, status) = self
            .deployment_with_status(&rn.account, &rn.id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("deployment {dep} not found")))?;
        usable(&dep, &d.value, &status)?;
        Ok(Route {
            deployment: dep,
            served_model: dm.model,
            adapter: true,
            session_affinity: d.value.session_affinity(),
        })
    }
}
