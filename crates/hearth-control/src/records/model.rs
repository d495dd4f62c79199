//! A model as stored. The services work on [`ModelRecord`], which holds the API's `Model`
//! for convenience; what reaches the store is [`StoredModel`], hearth's own record: the
//! fields hearth acts on typed, the rest of the API's fields kept for echo in their wire form.
//! The two convert through serde (`from`/`into`), so this file is the model's one boundary.

use std::collections::BTreeMap;

use hearth_api::resources::{Model, ModelKind, ModelSource, ModelState, PeftDetails};
use hearth_api::rpc::ResourceStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{with_echo, Record, MODELS};

/// A model and what hearth knows about its files, as the services use it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "StoredModel", into = "StoredModel")]
pub(crate) struct ModelRecord {
    /// The resource as the API shows it, minus the fields derived on read (name, times,
    /// deployedModelRefs).
    pub model: Model,
    /// The files the last `:getUploadEndpoint` announced, by name, with their sizes.
    pub announced: BTreeMap<String, u64>,
    /// What validation learned about a base model's files.
    pub base: Option<BaseFacts>,
    /// The source of an import still running; cleared when it ends either way. It may hold
    /// credentials, so it is never shown.
    pub import: Option<ModelSource>,
    /// What the source calls the version imported (a Hub commit).
    pub source_version: Option<String>,
    /// The deployment an imported addon is loaded onto once READY (the LoRA API's create).
    pub deploy_onto: Option<String>,
}

impl Record for ModelRecord {
    const KIND: &'static str = MODELS;
    const SCHEMA: u32 = 1;

    /// Schema 0 held the API's `Model` JSON under `model`, with snake_case bookkeeping beside it.
    fn upgrade(mut row: Map<String, Value>, from: u32) -> Result<Map<String, Value>, String> {
        if from >= 1 {
            return Ok(row);
        }
        let wire: Model = super::decode_lenient(row.remove("model").unwrap_or(Value::Null));
        let mut stored = StoredModel::from(ModelRecord { model: wire, ..ModelRecord::default() });
        let take = |row: &mut Map<String, Value>, k: &str| row.remove(k).filter(|v| !v.is_null());
        if let Some(v) = take(&mut row, "announced") {
            stored.announced = serde_json::from_value(v).unwrap_or_default();
        }
        if let Some(v) = take(&mut row, "base") {
            stored.base = serde_json::from_value(v).ok();
        }
        stored.import = take(&mut row, "import");
        stored.source_version = take(&mut row, "source_version").and_then(|v| v.as_str().map(str::to_string));
        stored.deploy_onto = take(&mut row, "deploy_onto").and_then(|v| v.as_str().map(str::to_string));
        match serde_json::to_value(stored) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("could not upgrade a schema 0 model".to_string()),
        }
    }
}

/// A base model's dimensions, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct StoredDims {
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub intermediate_size: u32,
    pub vocab_size: u32,
}

/// What validation learned about a base model, as stored: what an addon's validation checks
/// it against later. (Field names as schema 0 wrote them.)
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct BaseFacts {
    /// "HuggingFace" or "Gguf".
    pub format: String,
    /// "llama", "mistral" or "qwen2".
    pub architecture: String,
    pub dims: StoredDims,
    pub context_length: Option<u32>,
    pub parameter_count: u64,
    pub dtype: String,
    pub files: Vec<String>,
    /// From generation_config.json: what `defaultSamplingParams` reports.
    #[serde(default)]
    pub sampling_defaults: std::collections::BTreeMap<String, f64>,
    /// The tokenizer kind (GGUF `tokenizer.ggml.model`, tokenizer.json's `model.type`), which
    /// a draft model must share with its base model. Absent in records validated before it
    /// was kept.
    #[serde(default)]
    pub tokenizer: Option<String>,
}

impl BaseFacts {
    pub fn from_summary(b: &hearth_formats::BaseSummary) -> BaseFacts {
        let d = &b.config.dims;
        BaseFacts {
            format: match b.format {
                hearth_formats::ModelFormat::HuggingFace => "HuggingFace".to_string(),
                hearth_formats::ModelFormat::Gguf => "Gguf".to_string(),
            },
            architecture: b.config.architecture.name().to_string(),
            dims: StoredDims {
                hidden_size: d.hidden_size,
                num_layers: d.num_layers,
                num_heads: d.num_heads,
                num_kv_heads: d.num_kv_heads,
                head_dim: d.head_dim,
                intermediate_size: d.intermediate_size,
                vocab_size: d.vocab_size,
            },
            context_length: Some(b.config.max_position_embeddings),
            parameter_count: b.parameter_count,
            dtype: b.dtype.clone(),
            files: b.files.clone(),
            sampling_defaults: b.sampling_defaults.clone(),
            tokenizer: b.tokenizer.clone(),
        }
    }

    pub fn dims(&self) -> hearth_formats::ModelDims {
        let d = &self.dims;
        hearth_formats::ModelDims {
            hidden_size: d.hidden_size,
            num_layers: d.num_layers,
            num_heads: d.num_heads,
            num_kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            intermediate_size: d.intermediate_size,
            vocab_size: d.vocab_size,
        }
    }

    pub fn is_gguf(&self) -> bool {
        self.format == "Gguf"
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct StoredStatus {
    code: Option<String>,
    message: Option<String>,
}

/// An addon's base and shape.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct StoredPeft {
    base_model: Option<String>,
    r: Option<i32>,
    target_modules: Option<Vec<String>>,
    base_model_type: Option<String>,
}

/// The model row.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct StoredModel {
    /// Enum values by their wire names.
    kind: Option<String>,
    state: Option<String>,
    status: Option<StoredStatus>,
    display_name: Option<String>,
    description: Option<String>,
    public: Option<bool>,
    imported_from: Option<String>,
    peft: Option<StoredPeft>,
    /// Every other field of the API's Model, in its wire form, kept for echo: hearth reports
    /// these (some it fills in from validation) but decides nothing on them.
    echo: Map<String, Value>,
    announced: BTreeMap<String, u64>,
    base: Option<BaseFacts>,
    /// A `ModelSource` in its wire form.
    import: Option<Value>,
    source_version: Option<String>,
    deploy_onto: Option<String>,
}

/// Model fields that are typed in the record, or derived on read and never stored.
const NOT_ECHOED: &[&str] = &[
    "name",
    "createTime",
    "updateTime",
    "deployedModelRefs",
    "kind",
    "state",
    "status",
    "displayName",
    "description",
    "public",
    "importedFrom",
    "peftDetails",
];

impl From<ModelRecord> for StoredModel {
    fn from(r: ModelRecord) -> StoredModel {
        let m = &r.model;
        let echo = match serde_json::to_value(m) {
            Ok(Value::Object(obj)) => {
                obj.into_iter().filter(|(k, v)| !NOT_ECHOED.contains(&k.as_str()) && !v.is_null()).collect()
            }
            _ => Map::new(),
        };
        StoredModel {
            kind: m.kind.map(|k| k.as_str().to_string()),
            state: m.state.map(|s| s.as_str().to_string()),
            status: m.status.as_ref().map(|s| StoredStatus { code: s.code.clone(), message: s.message.clone() }),
            display_name: m.display_name.clone(),
            description: m.description.clone(),
            public: m.public,
            imported_from: m.imported_from.clone(),
            peft: m.peft_details.as_ref().map(|p| StoredPeft {
                base_model: p.base_model.clone(),
                r: p.r,
                target_modules: p.target_modules.clone(),
                base_model_type: p.base_model_type.clone(),
            }),
            echo,
            announced: r.announced,
            base: r.base,
            import: r.import.and_then(|s| serde_json::to_value(s).ok()),
            source_version: r.source_version,
            deploy_onto: r.deploy_onto,
        }
    }
}

impl From<StoredModel> for ModelRecord {
    fn from(s: StoredModel) -> ModelRecord {
        let model = Model {
            kind: s.kind.as_deref().and_then(|k| ModelKind::ALL.iter().copied().find(|x| x.as_str() == k)),
            state: s.state.as_deref().and_then(|k| ModelState::ALL.iter().copied().find(|x| x.as_str() == k)),
            status: s.status.map(|st| ResourceStatus { code: st.code, message: st.message }),
            display_name: s.display_name,
            description: s.description,
            public: s.public,
            imported_from: s.imported_from,
            peft_details: s.peft.map(|p| PeftDetails {
                base_model: p.base_model,
                r: p.r,
                target_modules: p.target_modules,
                base_model_type: p.base_model_type,
                merge_addon_model_name: None,
            }),
            ..Model::default()
        };
        ModelRecord {
            model: with_echo(model, &s.echo),
            announced: s.announced,
            base: s.base,
            import: s.import.and_then(|v| match serde_json::from_value(v) {
                Ok(source) => Some(source),
                Err(e) => {
                    tracing::warn!(error = %e, "a stored import source this version cannot read was dropped");
                    None
                }
            }),
            source_version: s.source_version,
            deploy_onto: s.deploy_onto,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{decode_body, encode};

    #[test]
    fn a_schema_0_model_row_reads_and_round_trips() {
        let row = r#"{"model": {"kind": "HF_BASE_MODEL", "state": "READY", "displayName": "s",
            "contextLength": 8192, "githubUrl": "https://example.com/x", "baseModelDetails": {"parameterCount": "134"},
            "removedField": 1},
            "announced": {"model.gguf": 10},
            "base": {"format": "Gguf", "architecture": "llama", "name": "x", "parameter_count": 134,
                     "context_length": 8192, "dims": {"hidden_size": 576, "num_layers": 30, "num_heads": 9,
                     "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152},
                     "dtype": "Q4_1", "files": ["model.gguf"], "has_chat_template": true, "tokenizer": "gpt2"},
            "adapter": null, "source_version": "abc"}"#;
        let r: ModelRecord = decode_body(row).expect("reads");
        assert_eq!(r.model.kind, Some(ModelKind::HfBaseModel));
        assert_eq!(r.model.state, Some(ModelState::Ready));
        assert_eq!(r.model.context_length, Some(8192));
        assert_eq!(r.model.github_url.as_deref(), Some("https://example.com/x"));
        assert_eq!(r.model.base_model_details.as_ref().and_then(|d| d.parameter_count), Some(134));
        assert_eq!(r.announced.get("model.gguf"), Some(&10));
        let base = r.base.clone().expect("base facts");
        assert!(base.is_gguf());
        assert_eq!(base.dims().hidden_size, 576);
        assert_eq!(r.source_version.as_deref(), Some("abc"));
        // Written back as schema 1, it reads the same.
        let again: ModelRecord = decode_body(&encode(&r).expect("encode")).expect("schema 1");
        assert_eq!(again.model, r.model);
        assert_eq!(again.base, r.base);
    }
}
