//! The second provider's LoRA API (DeepInfra's `/v1/lora/...`): requests and the
//! `DeploymentOut` answer, snake_case as that API has them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `CreateLoraApiRequest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLoraRequest {
    /// A model id in the caller's account, or a full `accounts/{a}/models/{m}` name.
    pub base_model: String,
    pub lora_name: String,
    pub source: LoraSource,
    pub private: bool,
    #[serde(default)]
    pub description: Option<String>,
}

/// `SourceModel`: where the adapter comes from. The API documents `civitai`; `huggingface`
/// and `url` take the same fields as hearth's model sources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum LoraSource {
    Civitai {
        civit_url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Huggingface {
        repo: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Url {
        url: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
    },
}

/// `UpdateLoraApiRequest`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateLoraRequest {
    #[serde(default)]
    pub private: Option<bool>,
    #[serde(default)]
    pub description: Option<String>,
}

/// `DeploymentOut`, as a LoRA deployment is described.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeploymentOut {
    #[serde(rename = "type")]
    pub kind: String,
    pub deploy_id: String,
    pub model_name: String,
    pub version: String,
    pub task: String,
    /// `initializing`, `deployed`, `failed` or `deleted`.
    pub status: String,
    pub fail_reason: String,
    pub created_at: String,
    pub updated_at: String,
    pub instances: Option<DeployInstances>,
    pub config: Option<DeployLlmConfig>,
    pub settings: Option<ScaleSettings>,
    /// hearth's own: the LoRA's description and whether it is private.
    pub description: String,
    pub private: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeployInstances {
    pub running: i64,
    pub pending: i64,
}

/// `DeployLLMConfig`. hearth runs on whatever the machine has: `gpu` is `other` and
/// `num_gpus` the accelerators the deployment asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeployLlmConfig {
    pub gpu: String,
    pub num_gpus: i64,
    pub max_batch_size: i64,
    pub weights: Option<HfWeights>,
}

/// `HFWeights`, without the token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HfWeights {
    pub repo: String,
    pub revision: Option<String>,
}

/// `ScaleSettings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ScaleSettings {
    pub min_instances: i64,
    pub max_instances: i64,
}

/// The answer of `GET /v1/lora/{lora_name}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LoraStatus {
    pub lora_name: String,
    pub status: String,
    pub fail_reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_tagged_by_type() {
        let r: CreateLoraRequest = serde_json::from_str(
            r#"{"base_model": "smollm2", "lora_name": "pirate", "private": true,
                "source": {"type": "civitai", "civit_url": "https://civitai.com/models/1"}}"#,
        )
        .expect("civitai");
        assert!(matches!(r.source, LoraSource::Civitai { .. }));
        let hf: LoraSource =
            serde_json::from_str(r#"{"type": "huggingface", "repo": "a/b", "revision": "main"}"#).expect("hf");
        assert!(matches!(hf, LoraSource::Huggingface { .. }));
        assert!(serde_json::from_str::<LoraSource>(r#"{"type": "gdrive", "url": "x"}"#).is_err());
        assert!(serde_json::from_str::<LoraSource>(r#"{"type": "url", "url": "x", "extra": 1}"#).is_err());
    }
}
