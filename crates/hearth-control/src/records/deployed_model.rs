//! A loaded addon as stored: its spec (which addon on which deployment, written by API calls)
//! and its status (DEPLOYING or DEPLOYED and why, written by the reconciler), and the one
//! conversion of the pair to the API's `DeployedModel`.

use hearth_api::names::{Collection, ResourceName};
use hearth_api::resources::{DeployedModel, DeployedModelState};
use hearth_api::rpc::ResourceStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::deployment::Problem;
use super::{Doc, Record, DEPLOYED_MODELS, DEPLOYED_MODEL_STATUS};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeployedModelSpec {
    /// The addon: `accounts/{a}/models/{m}`.
    pub model: String,
    /// Where it is loaded: `accounts/{a}/deployments/{d}`.
    pub deployment: String,
    /// The deployment requests for the plain model name go to.
    pub default: bool,
    pub public: Option<bool>,
    pub display_name: Option<String>,
    pub description: Option<String>,
}

impl Record for DeployedModelSpec {
    const KIND: &'static str = DEPLOYED_MODELS;
    const SCHEMA: u32 = 1;

    /// Schema 0 was the API's `DeployedModel` JSON with its state and status inside.
    fn upgrade(row: Map<String, Value>, from: u32) -> Result<Map<String, Value>, String> {
        if from >= 1 {
            return Ok(row);
        }
        let wire: DeployedModel = super::decode_lenient(Value::Object(row));
        match serde_json::to_value(DeployedModelSpec::from_wire(&wire)) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("could not upgrade a schema 0 deployed model".to_string()),
        }
    }
}

impl DeployedModelSpec {
    pub(crate) fn from_wire(dm: &DeployedModel) -> DeployedModelSpec {
        DeployedModelSpec {
            model: dm.model.clone().unwrap_or_default(),
            deployment: dm.deployment.clone().unwrap_or_default(),
            default: dm.default == Some(true),
            public: dm.public,
            display_name: dm.display_name.clone(),
            description: dm.description.clone(),
        }
    }

    /// The user-settable fields as the API shows them: what a PATCH applies to.
    pub(crate) fn to_wire(&self) -> DeployedModel {
        DeployedModel {
            model: Some(self.model.clone()),
            deployment: Some(self.deployment.clone()),
            default: Some(self.default),
            public: self.public,
            display_name: self.display_name.clone(),
            description: self.description.clone(),
            ..DeployedModel::default()
        }
    }
}

/// Whether every ready replica of the deployment has the addon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AddonPhase {
    #[default]
    Deploying,
    Deployed,
}

/// What the runtime observed of a loaded addon: written only by the reconciler.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DeployedModelStatus {
    pub phase: AddonPhase,
    /// A replica's refusal, said as the replica said it.
    pub problem: Option<Problem>,
}

impl Record for DeployedModelStatus {
    const KIND: &'static str = DEPLOYED_MODEL_STATUS;
    const SCHEMA: u32 = 1;

    fn upgrade(row: Map<String, Value>, _from: u32) -> Result<Map<String, Value>, String> {
        Ok(row)
    }
}

impl DeployedModelStatus {
    /// The status part of a schema 0 row, for the migration that splits it.
    pub(crate) fn from_v0(wire: &DeployedModel) -> DeployedModelStatus {
        DeployedModelStatus {
            phase: match wire.state {
                Some(DeployedModelState::Deployed) => AddonPhase::Deployed,
                _ => AddonPhase::Deploying,
            },
            problem: wire.status.as_ref().map(|s| Problem {
                code: s.code.clone().unwrap_or_else(|| "UNKNOWN".into()),
                message: s.message.clone().unwrap_or_default(),
            }),
        }
    }
}

/// The API's `DeployedModel` for a stored spec and status.
pub(crate) fn view(
    account: &str,
    spec: &Doc<DeployedModelSpec>,
    status: Option<&Doc<DeployedModelStatus>>,
) -> DeployedModel {
    let mut dm = spec.value.to_wire();
    dm.name = Some(ResourceName::new(account, Collection::DeployedModels, &spec.id).to_string());
    dm.create_time = Some(spec.create_time);
    dm.update_time = Some(status.map_or(spec.update_time, |s| s.update_time.max(spec.update_time)));
    let st = status.map(|s| s.value.clone()).unwrap_or_default();
    dm.state = Some(match st.phase {
        AddonPhase::Deploying => DeployedModelState::Deploying,
        AddonPhase::Deployed => DeployedModelState::Deployed,
    });
    dm.status = st.problem.map(|p| ResourceStatus { code: Some(p.code), message: Some(p.message) });
    dm
}
