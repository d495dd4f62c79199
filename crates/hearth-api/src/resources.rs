//! The Gateway resources (Model, Deployment, DeployedModel) and their request bodies, field
//! for field as the 4.259.0 spec names them.
//!
//! Every field is optional: the same struct is a create body, a PATCH body and a response.
//! Which fields a request may set, and which hearth acts on, is the control plane's business;
//! this module only guarantees that anything that parsed is a field or enum value the spec
//! knows.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::ProtoDuration;
use crate::rpc::ResourceStatus;

pub type Timestamp = DateTime<Utc>;

/// Declares a proto enum that travels as its value names; any other name fails to parse.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(ModelKind {
    Unspecified = "KIND_UNSPECIFIED",
    HfBaseModel = "HF_BASE_MODEL",
    HfPeftAddon = "HF_PEFT_ADDON",
    HfTeftAddon = "HF_TEFT_ADDON",
    FluminaBaseModel = "FLUMINA_BASE_MODEL",
    FluminaAddon = "FLUMINA_ADDON",
    DraftAddon = "DRAFT_ADDON",
    FireAgent = "FIRE_AGENT",
    LiveMerge = "LIVE_MERGE",
    CustomModel = "CUSTOM_MODEL",
    EmbeddingModel = "EMBEDDING_MODEL",
    SnapshotModel = "SNAPSHOT_MODEL",
});

// FAILED is hearth's own: an import from a source that could not finish ends there, with
// `status` saying why, rather than staying UPLOADING forever.
wire_enum!(ModelState { Unspecified = "STATE_UNSPECIFIED", Uploading = "UPLOADING", Ready = "READY", Failed = "FAILED" });

wire_enum!(CheckpointFormat {
    Unspecified = "CHECKPOINT_FORMAT_UNSPECIFIED",
    Native = "NATIVE",
    Huggingface = "HUGGINGFACE",
    Uninitialized = "UNINITIALIZED",
});

wire_enum!(ModelSnapshotType { Full = "FULL_SNAPSHOT", Incremental = "INCREMENTAL_SNAPSHOT" });

wire_enum!(
    /// `precision` of a deployment. `FP32` is hearth's own addition: full precision on CPU.
    Precision {
        Unspecified = "PRECISION_UNSPECIFIED",
        Fp16 = "FP16",
        Fp8 = "FP8",
        Fp8Mm = "FP8_MM",
        Fp8Ar = "FP8_AR",
        Fp8MmKvAttn = "FP8_MM_KV_ATTN",
        Fp8Kv = "FP8_KV",
        Fp8MmV2 = "FP8_MM_V2",
        Fp8V2 = "FP8_V2",
        Fp8MmKvAttnV2 = "FP8_MM_KV_ATTN_V2",
        Nf4 = "NF4",
        Fp4 = "FP4",
        Bf16 = "BF16",
        Fp4BlockscaledMm = "FP4_BLOCKSCALED_MM",
        Fp4MxMoe = "FP4_MX_MOE",
        Fp32 = "FP32",
    }
);

wire_enum!(DeploymentState {
    Unspecified = "STATE_UNSPECIFIED",
    Creating = "CREATING",
    Ready = "READY",
    Deleting = "DELETING",
    Failed = "FAILED",
    Updating = "UPDATING",
    Deleted = "DELETED",
});

wire_enum!(DeployedModelState {
    Unspecified = "STATE_UNSPECIFIED",
    Undeploying = "UNDEPLOYING",
    Deploying = "DEPLOYING",
    Deployed = "DEPLOYED",
    Updating = "UPDATING",
});

wire_enum!(AcceleratorType {
    Unspecified = "ACCELERATOR_TYPE_UNSPECIFIED",
    NvidiaA100_80gb = "NVIDIA_A100_80GB",
    NvidiaH100_80gb = "NVIDIA_H100_80GB",
    AmdMi300x192gb = "AMD_MI300X_192GB",
    NvidiaA10g24gb = "NVIDIA_A10G_24GB",
    NvidiaA100_40gb = "NVIDIA_A100_40GB",
    NvidiaL4_24gb = "NVIDIA_L4_24GB",
    NvidiaH200_141gb = "NVIDIA_H200_141GB",
    NvidiaB200_180gb = "NVIDIA_B200_180GB",
    AmdMi325x256gb = "AMD_MI325X_256GB",
    AmdMi350x288gb = "AMD_MI350X_288GB",
    NvidiaB300_288gb = "NVIDIA_B300_288GB",
});

wire_enum!(Region {
    Unspecified = "REGION_UNSPECIFIED",
    UsIowa1 = "US_IOWA_1",
    UsVirginia1 = "US_VIRGINIA_1",
    UsVirginia2 = "US_VIRGINIA_2",
    UsIllinois1 = "US_ILLINOIS_1",
    ApTokyo1 = "AP_TOKYO_1",
    UsArizona1 = "US_ARIZONA_1",
    UsTexas1 = "US_TEXAS_1",
    UsIllinois2 = "US_ILLINOIS_2",
    EuFrankfurt1 = "EU_FRANKFURT_1",
    UsTexas2 = "US_TEXAS_2",
    EuIceland1 = "EU_ICELAND_1",
    EuIceland2 = "EU_ICELAND_2",
    UsWashington1 = "US_WASHINGTON_1",
    UsWashington2 = "US_WASHINGTON_2",
    UsWashington3 = "US_WASHINGTON_3",
    ApTokyo2 = "AP_TOKYO_2",
    UsCalifornia1 = "US_CALIFORNIA_1",
    UsUtah1 = "US_UTAH_1",
    UsGeorgia1 = "US_GEORGIA_1",
    UsGeorgia2 = "US_GEORGIA_2",
    UsWashington4 = "US_WASHINGTON_4",
    UsGeorgia3 = "US_GEORGIA_3",
    NaBritishcolumbia1 = "NA_BRITISHCOLUMBIA_1",
    UsGeorgia4 = "US_GEORGIA_4",
    UsOhio1 = "US_OHIO_1",
    UsNewyork1 = "US_NEWYORK_1",
    EuNetherlands1 = "EU_NETHERLANDS_1",
    UsWashington5 = "US_WASHINGTON_5",
    UsMinnesota1 = "US_MINNESOTA_1",
    UsCalifornia2 = "US_CALIFORNIA_2",
    ApMalaysia1 = "AP_MALAYSIA_1",
    UsOhio2 = "US_OHIO_2",
});

wire_enum!(MultiRegion {
    Unspecified = "MULTI_REGION_UNSPECIFIED",
    Global = "GLOBAL",
    Us = "US",
    Europe = "EUROPE",
    Apac = "APAC",
});

wire_enum!(DirectRouteType {
    Unspecified = "DIRECT_ROUTE_TYPE_UNSPECIFIED",
    Internet = "INTERNET",
    GcpPrivateServiceConnect = "GCP_PRIVATE_SERVICE_CONNECT",
    AwsPrivatelink = "AWS_PRIVATELINK",
});

wire_enum!(HotLoadBucketType {
    Unspecified = "BUCKET_TYPE_UNSPECIFIED",
    Minio = "MINIO",
    S3 = "S3",
    Nebius = "NEBIUS",
    FwHosted = "FW_HOSTED",
});

/// int64 fields travel as JSON strings (proto3 JSON mapping); numbers are accepted on input
/// because hand-written clients send them.
pub mod int64_string {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.collect_str(n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            S(String),
            N(i64),
        }
        match Option::<Either>::deserialize(d)? {
            None => Ok(None),
            Some(Either::N(n)) => Ok(Some(n)),
            Some(Either::S(s)) => {
                s.parse().map(Some).map_err(|_| serde::de::Error::custom(format!("invalid int64 {s:?}")))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaseModelDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_format: Option<CheckpointFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface_files: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "int64_string")]
    #[schemars(with = "Option<String>")]
    pub parameter_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_fireattention: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_precision: Option<Precision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_mtp: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeftDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_addon_model_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConversationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TypeDate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub year: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub month: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployedModelRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeployedModelState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
}

/// `gatewayModel`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Model {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ModelState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ResourceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ModelKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_details: Option<BaseModelDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_details: Option<PeftDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teft_details: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_config: Option<ConversationConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_image_input: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_tools: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tuning_job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_draft_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_draft_token_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_model_refs: Option<Vec<DeployedModelRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_date: Option<TypeDate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_lora: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_hf_apply_chat_template: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_sampling_params: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl_tunable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_context_length: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<ModelSnapshotType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supports_serverless: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised_lora_tunable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervised_full_parameter_tunable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl_lora_tunable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl_full_parameter_tunable: Option<bool>,
}

/// `GatewayCreateModelBody`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateModelRequest {
    #[serde(default)]
    pub model_id: Option<String>,
    #[serde(default)]
    pub model: Option<Model>,
    #[serde(default)]
    pub cluster: Option<String>,
    /// hearth's extension: fetch the model's files from here instead of waiting for an
    /// upload. The model is created UPLOADING and ends READY or FAILED on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ModelSource>,
}

/// Where an imported model's files come from: exactly one of the fields. This is the body of
/// `:import` (`GatewayImportModelBody`, whose `awsS3Source` it keeps) and the `source` of a
/// create request; the other sources are hearth's.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_s3_source: Option<AwsS3Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_blob_source: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huggingface_source: Option<HuggingFaceSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_source: Option<UrlSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub civitai_source: Option<CivitaiSource>,
}

/// `gatewayAwsS3ModelSource`: every object under `s3Path` in `s3Bucket`. The endpoint and
/// region come from the server's environment (`AWS_ENDPOINT_URL`, `AWS_REGION`) as with the
/// AWS tools; credentials from the request or, when absent, that environment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsS3Source {
    #[serde(default)]
    pub s3_bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_secret: Option<String>,
}

/// A Hugging Face Hub repository at a revision, fetched over the hub's HTTP protocol from
/// `HF_ENDPOINT` (the public hub when unset), as the Hugging Face tools do.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HuggingFaceSource {
    #[serde(default)]
    pub repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Only these files of the repository (default: every file hearth can serve from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<String>>,
}

/// An http(s) URL of one model file or of an archive (.tar, .tar.gz) of a model directory.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlSource {
    #[serde(default)]
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A Civitai model page or download URL.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CivitaiSource {
    #[serde(default)]
    pub civit_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `googlelongrunningOperation`, as `:import` answers: the work goes on in the background and
/// the model's `state` tells when it is done.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub name: String,
    pub done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

/// `GatewayGetModelUploadEndpointBody`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GetUploadEndpointRequest {
    #[serde(default)]
    pub filename_to_size: BTreeMap<String, Int64>,
    #[serde(default)]
    pub enable_resumable_upload: Option<bool>,
    #[serde(default)]
    pub read_mask: Option<String>,
}

/// An int64 map value: a string on the wire, a number accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int64(pub i64);

impl schemars::JsonSchema for Int64 {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Int64".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "int64"})
    }
}

impl Serialize for Int64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Int64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match int64_string::deserialize(d)? {
            Some(n) => Ok(Int64(n)),
            None => Err(serde::de::Error::custom("expected an int64, found null")),
        }
    }
}

/// `gatewayQuota`: a limit on what an account may hold or use. `value` is the limit enforced;
/// `maxValue` the ceiling the server allows it (set by whoever runs hearth); `usage` what the
/// account holds or used now.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Int64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_value: Option<Int64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GetUploadEndpointResponse {
    pub filename_to_signed_urls: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GetDownloadEndpointResponse {
    pub filename_to_signed_urls: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidateUploadResponse {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscalingPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up_window: Option<ProtoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_window: Option<ProtoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_window: Option<ProtoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_targets: Option<BTreeMap<String, f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling_schedules: Option<BTreeMap<String, ScalingSchedule>>,
}

/// `gatewayScalingSchedule`: a window, starting at the times of a cron expression in a time
/// zone, during which a deployment keeps at least `minReplicaCount` replicas.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScalingSchedule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<ProtoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_region: Option<MultiRegion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<Region>>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoTune {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_prompt: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_scheduling_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloading_model_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializing_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocable_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_replica_count: Option<f64>,
}

/// `gatewayDeployment`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Deployment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeploymentState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ResourceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_with_revocable_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling_policy: Option<AutoscalingPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator_type: Option<AcceleratorType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_addons: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_token_count: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ngram_speculation_length: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_session_affinity: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_route_api_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_peft_device_cached: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_route_type: Option<DirectRouteType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_route_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_tune: Option<AutoTune>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_length: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_deployment_size_validation: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_hot_load: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_load_bucket_type: Option<HotLoadBucketType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_hot_reload_latest_addon: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_shape: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_stats: Option<ReplicaStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_load_bucket_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing_plan_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hot_load_trainer_job: Option<String>,
    /// Sent by the 1.2.x SDK although the 4.259.0 spec does not list it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_mtp: Option<bool>,
    /// Of an older API version, still in the documentation's example body: the serving
    /// engine. hearth has one; `ENGINE_UNSPECIFIED` is accepted and echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Of an older API version, still in the documentation's example body: a deployment for
    /// training. hearth serves inference; `false` is accepted and echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_training: Option<bool>,
}

/// `GatewayScaleDeploymentBody`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleDeploymentRequest {
    #[serde(default)]
    pub replica_count: Option<i32>,
}

/// `GatewayUndeleteDeploymentBody`: empty, but a body it is.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UndeleteDeploymentRequest {}

/// `gatewayDeployedModel`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeployedModel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeployedModelState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serverless: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ResourceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Timestamp>,
}

wire_enum!(UserState {
    Unspecified = "STATE_UNSPECIFIED",
    Creating = "CREATING",
    Ready = "READY",
    Updating = "UPDATING",
    Deleting = "DELETING",
});

/// `gatewayUser`: a person or service of an account. `role` is `admin` (manages the account's
/// users and every user's keys, and uses its resources) or `user` (uses the account's
/// resources and manages its own keys).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<UserState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ResourceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_preset: Option<String>,
}

/// `gatewayApiKey`. `key` is set only in the answer to its creation: hearth keeps a hash.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Timestamp>,
}

/// `GatewayCreateApiKeyBody`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    pub api_key: ApiKey,
}

/// `GatewayDeleteApiKeyBody`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteApiKeyRequest {
    pub key_id: String,
}

/// hearth's own: the last hour of inference an account's requests made through a gateway, per
/// deployment and model, by the minute (`GET /v1/accounts/{account}/inferenceMetrics`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceMetrics {
    pub bucket_seconds: i64,
    pub series: Vec<InferenceSeries>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceSeries {
    pub deployment: String,
    /// The model requests named: the base model, or a LoRA addon (`adapter`).
    pub model: String,
    pub adapter: bool,
    pub points: Vec<InferencePoint>,
}

/// One minute. Latencies in seconds; absent when no request of the minute measured them
/// (time to first token is measured on streamed answers).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoint {
    pub time: Timestamp,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Generated tokens per second over the minute.
    pub tokens_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_p50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_p95: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_per_output_token_p50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_per_output_token_p95: Option<f64>,
}

/// A page of a list call. The collection's key (`models`, `deployments`, `deployedModels`)
/// is supplied by the caller, so one type serves all three.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
    pub total_size: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_create_bodies_parse() {
        let body = r#"{"modelId": "my-lora", "model": {"kind": "HF_PEFT_ADDON", "displayName": "my lora",
            "peftDetails": {"baseModel": "accounts/test-account/models/base", "r": 8, "targetModules": ["q_proj", "v_proj"]}}}"#;
        let req: CreateModelRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.model.unwrap().kind, Some(ModelKind::HfPeftAddon));
        let dep = r#"{"baseModel": "accounts/test-account/models/base", "enableAddons": true, "maxReplicaCount": 1, "minReplicaCount": 1}"#;
        let d: Deployment = serde_json::from_str(dep).unwrap();
        assert_eq!(d.max_replica_count, Some(1));
        let up = r#"{"filenameToSize": {"adapter_model.safetensors": "64", "adapter_config.json": 65}}"#;
        let u: GetUploadEndpointRequest = serde_json::from_str(up).unwrap();
        assert_eq!(u.filename_to_size["adapter_config.json"], Int64(65));
    }

    #[test]
    fn unknown_fields_and_enum_values_are_refused() {
        assert!(serde_json::from_str::<Model>(r#"{"kindd": "HF_BASE_MODEL"}"#).is_err());
        assert!(serde_json::from_str::<Model>(r#"{"kind": "HF_BASE"}"#).is_err());
        assert!(serde_json::from_str::<Deployment>(r#"{"autoscalingPolicy": {"scaleUpWindow": "10m"}}"#).is_err());
    }

    #[test]
    fn int64_travels_as_a_string() {
        let d = BaseModelDetails { parameter_count: Some(134_515_008), ..Default::default() };
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"parameterCount":"134515008"}"#);
    }
}
