//! The OpenAPI 3 document of hearth's API, built from the operation table below and from the
//! wire types themselves (their JSON schemas are derived from the same serde definitions that
//! parse requests). A committed copy in `docs/openapi.json` is compared with this in a test,
//! and every operation listed is checked to be routed, so the document cannot drift from the
//! implementation unnoticed.

use hearth_api::resources::{
    CreateModelRequest, DeployedModel, Deployment, GetDownloadEndpointResponse, GetUploadEndpointRequest,
    GetUploadEndpointResponse, Model, ModelSource, Quota, ScaleDeploymentRequest, UndeleteDeploymentRequest,
    ValidateUploadResponse,
};
use hearth_api::Status;
use schemars::generate::SchemaSettings;
use schemars::SchemaGenerator;
use serde_json::{json, Map, Value};

/// One HTTP operation hearth serves.
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub id: &'static str,
    pub summary: &'static str,
    pub query: &'static [&'static str],
    pub request: Option<&'static str>,
    pub response: Option<&'static str>,
    /// Whether `Authorization: Bearer` is required (the signed file routes use their URL).
    pub auth: bool,
}

const LIST: &[&str] = &["pageSize", "pageToken", "filter", "orderBy", "readMask"];

macro_rules! op {
    ($m:literal $p:literal $id:literal $s:literal, q: $q:expr, req: $req:expr, resp: $resp:expr) => {
        Operation { method: $m, path: $p, id: $id, summary: $s, query: $q, request: $req, response: $resp, auth: true }
    };
}

pub const OPERATIONS: &[Operation] = &[
    op!("post" "/v1/accounts/{account}/models" "CreateModel" "Create a model", q: &[], req: Some("CreateModelRequest"), resp: Some("Model")),
    op!("get" "/v1/accounts/{account}/models" "ListModels" "List models", q: LIST, req: None, resp: Some("ListModelsResponse")),
    op!("get" "/v1/accounts/{account}/models/{model}" "GetModel" "Get a model", q: &["readMask"], req: None, resp: Some("Model")),
    op!("patch" "/v1/accounts/{account}/models/{model}" "UpdateModel" "Update a model; the fields in the body (or updateMask) change", q: &["updateMask"], req: Some("Model"), resp: Some("Model")),
    op!("delete" "/v1/accounts/{account}/models/{model}" "DeleteModel" "Delete a model that is not deployed", q: &[], req: None, resp: None),
    op!("post" "/v1/accounts/{account}/models/{model}:getUploadEndpoint" "GetModelUploadEndpoint" "Signed PUT URLs for the model's files", q: &[], req: Some("GetUploadEndpointRequest"), resp: Some("GetUploadEndpointResponse")),
    op!("get" "/v1/accounts/{account}/models/{model}:validateUpload" "ValidateModelUpload" "Check the uploaded files; READY on success", q: &["skipHfConfigValidation", "trustRemoteCode", "configOnly"], req: None, resp: Some("ValidateUploadResponse")),
    op!("post" "/v1/accounts/{account}/models/{model}:import" "ImportModel" "Fetch the model's files from a source (Hub, URL, S3, Civitai); READY or FAILED when done", q: &[], req: Some("ModelSource"), resp: Some("Operation")),
    op!("get" "/v1/accounts/{account}/models/{model}:getDownloadEndpoint" "GetModelDownloadEndpoint" "Signed GET URLs for the model's files", q: &["readMask"], req: None, resp: Some("GetDownloadEndpointResponse")),
    op!("post" "/v1/accounts/{account}/deployments" "CreateDeployment" "Create a deployment", q: &["deploymentId", "validateOnly", "disableAutoDeploy", "disableSpeculativeDecoding", "skipShapeValidation", "skipImageTagValidation", "acceptShapelessRisk"], req: Some("Deployment"), resp: Some("Deployment")),
    op!("get" "/v1/accounts/{account}/deployments" "ListDeployments" "List deployments", q: &["pageSize", "pageToken", "filter", "orderBy", "readMask", "showDeleted"], req: None, resp: Some("ListDeploymentsResponse")),
    op!("get" "/v1/accounts/{account}/deployments/{deployment}" "GetDeployment" "Get a deployment", q: &["readMask"], req: None, resp: Some("Deployment")),
    op!("patch" "/v1/accounts/{account}/deployments/{deployment}" "UpdateDeployment" "Update a deployment", q: &["updateMask", "skipShapeValidation"], req: Some("Deployment"), resp: Some("Deployment")),
    op!("delete" "/v1/accounts/{account}/deployments/{deployment}" "DeleteDeployment" "Soft-delete a deployment (hard=true purges it)", q: &["hard", "ignoreChecks"], req: None, resp: None),
    op!("post" "/v1/accounts/{account}/deployments/{deployment}:undelete" "UndeleteDeployment" "Bring back a DELETED or FAILED deployment", q: &[], req: Some("UndeleteDeploymentRequest"), resp: Some("Deployment")),
    op!("patch" "/v1/accounts/{account}/deployments/{deployment}:scale" "ScaleDeployment" "Set the replica count", q: &[], req: Some("ScaleDeploymentRequest"), resp: None),
    op!("post" "/v1/accounts/{account}/deployedModels" "CreateDeployedModel" "Load a LoRA addon onto a deployment", q: &["replaceMergedAddon"], req: Some("DeployedModel"), resp: Some("DeployedModel")),
    op!("get" "/v1/accounts/{account}/deployedModels" "ListDeployedModels" "List loaded LoRA addons", q: LIST, req: None, resp: Some("ListDeployedModelsResponse")),
    op!("get" "/v1/accounts/{account}/deployedModels/{deployedModel}" "GetDeployedModel" "Get a loaded LoRA addon", q: &["readMask"], req: None, resp: Some("DeployedModel")),
    op!("patch" "/v1/accounts/{account}/deployedModels/{deployedModel}" "UpdateDeployedModel" "Update a loaded LoRA addon", q: &["updateMask"], req: Some("DeployedModel"), resp: Some("DeployedModel")),
    op!("delete" "/v1/accounts/{account}/deployedModels/{deployedModel}" "DeleteDeployedModel" "Unload a LoRA addon", q: &[], req: None, resp: None),
    op!("get" "/v1/accounts/{account}/quotas" "ListQuotas" "Every quota of the account with its limit, ceiling and live usage", q: LIST, req: None, resp: Some("ListQuotasResponse")),
    op!("get" "/v1/accounts/{account}/quotas/{quota}" "GetQuota" "One quota", q: &["readMask"], req: None, resp: Some("Quota")),
    op!("patch" "/v1/accounts/{account}/quotas/{quota}" "UpdateQuota" "Set the limit the account enforces (value), up to the server's ceiling (maxValue)", q: &["allowMissing"], req: Some("Quota"), resp: Some("Quota")),
    op!("get" "/v1/accounts/{account}/inferenceMetrics" "GetInferenceMetrics" "hearth's own: the last hour of the account's inference through this gateway, per deployment and model, by minute", q: &[], req: None, resp: Some("InferenceMetrics")),
    op!("post" "/v1/accounts/{account}/users" "CreateUser" "Create a user of the account (admins only)", q: &["userId"], req: Some("User"), resp: Some("User")),
    op!("get" "/v1/accounts/{account}/users" "ListUsers" "List the account's users (admins only)", q: LIST, req: None, resp: Some("ListUsersResponse")),
    op!("get" "/v1/accounts/{account}/users/{user}" "GetUser" "Get a user (admins, or the user themself)", q: &["readMask"], req: None, resp: Some("User")),
    op!("patch" "/v1/accounts/{account}/users/{user}" "UpdateUser" "Change a user's role or details (admins only)", q: &[], req: Some("User"), resp: Some("User")),
    op!("post" "/v1/accounts/{account}/users/{user}/apiKeys" "CreateApiKey" "Create an API key for the user; its text is in this answer only", q: &[], req: Some("CreateApiKeyRequest"), resp: Some("ApiKey")),
    op!("get" "/v1/accounts/{account}/users/{user}/apiKeys" "ListApiKeys" "The user's API keys, without their text", q: LIST, req: None, resp: Some("ListApiKeysResponse")),
    op!("post" "/v1/accounts/{account}/users/{user}/apiKeys:delete" "DeleteApiKey" "Delete one of the user's API keys; refused from the next request on", q: &[], req: Some("DeleteApiKeyRequest"), resp: None),
    op!("post" "/inference/v1/chat/completions" "ChatCompletions" "OpenAI chat completions, routed to the deployment `model` names", q: &[], req: Some("ChatCompletionRequest"), resp: None),
    op!("post" "/inference/v1/completions" "Completions" "OpenAI completions, routed to the deployment `model` names", q: &[], req: Some("CompletionRequest"), resp: None),
    op!("get" "/inference/v1/models" "ListServableModels" "Models with a live deployment in the caller's account", q: &[], req: None, resp: None),
    op!("post" "/v1/chat/completions" "ChatCompletionsV1" "Same as /inference/v1/chat/completions", q: &[], req: Some("ChatCompletionRequest"), resp: None),
    op!("post" "/v1/completions" "CompletionsV1" "Same as /inference/v1/completions", q: &[], req: Some("CompletionRequest"), resp: None),
    op!("get" "/v1/models" "ListServableModelsV1" "Same as /inference/v1/models", q: &[], req: None, resp: None),
    op!("post" "/v1/lora/create" "CreateLora" "Import a LoRA from its source and load it onto its base model's default deployment", q: &[], req: Some("CreateLoraRequest"), resp: Some("DeploymentOut")),
    op!("get" "/v1/lora/{lora_name}" "GetLora" "A LoRA as DeploymentOut", q: &[], req: None, resp: Some("DeploymentOut")),
    op!("patch" "/v1/lora/{lora_name}" "UpdateLora" "Change a LoRA's description or privacy", q: &[], req: Some("UpdateLoraRequest"), resp: Some("DeploymentOut")),
    op!("delete" "/v1/lora/{lora_name}" "DeleteLora" "Unload a LoRA and delete its model", q: &[], req: None, resp: Some("DeploymentOut")),
    op!("get" "/v1/lora/{lora_name}/status" "GetLoraStatus" "initializing, deployed, failed (with fail_reason) or deleted", q: &[], req: None, resp: Some("LoraStatus")),
    op!("get" "/v1/user/loras" "ListUserLoras" "Every LoRA of the caller's account", q: &[], req: None, resp: None),
    op!("post" "/v1/openai/chat/completions" "OpenAiChatCompletions" "Chat completions where `model` may be a LoRA's name", q: &[], req: Some("ChatCompletionRequest"), resp: None),
    op!("post" "/v1/openai/completions" "OpenAiCompletions" "Completions where `model` may be a LoRA's name", q: &[], req: Some("CompletionRequest"), resp: None),
    op!("get" "/verifyApiKey" "VerifyApiKey" "The account of the presented key, in x-fireworks-account-id", q: &[], req: None, resp: None),
    Operation {
        method: "put",
        path: "/upload/{account}/{model}/{file}",
        id: "UploadModelFile",
        summary: "Upload one model file through a signed URL: the raw bytes in one request, or in parts with Content-Range (308 with Range until complete); x-hearth-sha256 is checked",
        query: &["size", "expires", "sig"],
        request: None,
        response: None,
        auth: false,
    },
    Operation {
        method: "get",
        path: "/download/{account}/{model}/{file}",
        id: "DownloadModelFile",
        summary: "Download one model file through a signed URL",
        query: &["size", "expires", "sig"],
        request: None,
        response: None,
        auth: false,
    },
    Operation {
        method: "get",
        path: "/health",
        id: "Health",
        summary: "200 once the server is ready",
        query: &[],
        request: None,
        response: None,
        auth: false,
    },
    Operation {
        method: "get",
        path: "/metrics",
        id: "Metrics",
        summary: "Prometheus metrics",
        query: &[],
        request: None,
        response: None,
        auth: false,
    },
    Operation {
        method: "get",
        path: "/openapi.json",
        id: "OpenApi",
        summary: "This document",
        query: &[],
        request: None,
        response: None,
        auth: false,
    },
];

fn schemas() -> Map<String, Value> {
    let mut generator = SchemaGenerator::new(SchemaSettings::openapi3());
    let mut out = Map::new();
    let mut add = |name: &str, schema: schemars::Schema| {
        out.insert(name.to_string(), schema.to_value());
    };
    add("Model", generator.subschema_for::<Model>());
    add("CreateModelRequest", generator.subschema_for::<CreateModelRequest>());
    add("GetUploadEndpointRequest", generator.subschema_for::<GetUploadEndpointRequest>());
    add("GetUploadEndpointResponse", generator.subschema_for::<GetUploadEndpointResponse>());
    add("GetDownloadEndpointResponse", generator.subschema_for::<GetDownloadEndpointResponse>());
    add("ValidateUploadResponse", generator.subschema_for::<ValidateUploadResponse>());
    add("Deployment", generator.subschema_for::<Deployment>());
    add("ScaleDeploymentRequest", generator.subschema_for::<ScaleDeploymentRequest>());
    add("UndeleteDeploymentRequest", generator.subschema_for::<UndeleteDeploymentRequest>());
    add("DeployedModel", generator.subschema_for::<DeployedModel>());
    add("Quota", generator.subschema_for::<Quota>());
    add("User", generator.subschema_for::<hearth_api::resources::User>());
    add("InferenceMetrics", generator.subschema_for::<hearth_api::resources::InferenceMetrics>());
    add("ApiKey", generator.subschema_for::<hearth_api::resources::ApiKey>());
    add("CreateApiKeyRequest", generator.subschema_for::<hearth_api::resources::CreateApiKeyRequest>());
    add("DeleteApiKeyRequest", generator.subschema_for::<hearth_api::resources::DeleteApiKeyRequest>());
    add("Status", generator.subschema_for::<Status>());
    add("OpenAiError", generator.subschema_for::<hearth_api::openai::ErrorBody>());
    add("ModelSource", generator.subschema_for::<ModelSource>());
    add("Operation", generator.subschema_for::<hearth_api::resources::Operation>());
    add("CreateLoraRequest", generator.subschema_for::<hearth_api::deepinfra::CreateLoraRequest>());
    add("UpdateLoraRequest", generator.subschema_for::<hearth_api::deepinfra::UpdateLoraRequest>());
    add("DeploymentOut", generator.subschema_for::<hearth_api::deepinfra::DeploymentOut>());
    add("LoraStatus", generator.subschema_for::<hearth_api::deepinfra::LoraStatus>());
    // subschema_for returns references for named types; the definitions hold the bodies.
    let mut all: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    for (list, item) in [
        ("ListModelsResponse", ("models", "Model")),
        ("ListDeploymentsResponse", ("deployments", "Deployment")),
        ("ListDeployedModelsResponse", ("deployedModels", "DeployedModel")),
        ("ListQuotasResponse", ("quotas", "Quota")),
        ("ListUsersResponse", ("users", "User")),
        ("ListApiKeysResponse", ("apiKeys", "ApiKey")),
    ] {
        all.insert(
            list.to_string(),
            json!({"type": "object", "properties": {
                item.0: {"type": "array", "items": {"$ref": format!("#/components/schemas/{}", item.1)}},
                "nextPageToken": {"type": "string"},
                "totalSize": {"type": "integer", "format": "int32"}
            }}),
        );
    }
    let (chat, completion) = inference_requests();
    all.insert("ChatCompletionRequest".to_string(), chat);
    all.insert("CompletionRequest".to_string(), completion);
    // Names that are inline references (the request aliases above) resolve to the bodies.
    for (name, v) in out {
        all.entry(name).or_insert(v);
    }
    all
}

/// The inference request bodies, as the engine server parses them (`hearth_api::openai`):
/// written out here because those types are read field by field (a field of the API that
/// hearth does not act on yet is refused by name), which a derived schema cannot say.
/// Fields hearth refuses are left out; `additionalProperties: false` says any other is refused.
fn inference_requests() -> (Value, Value) {
    let sampling = json!({
        "model": {"type": "string", "description": "a base model, an addon, or model#deployment"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": true, "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer", "minimum": 0},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": true, "minimum": 0},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": false},
        "ignore_eos": {"type": "boolean"},
        "user": {"type": "string"},
        "metadata": {"type": "object"},
        "context_length_exceeded_behavior": {"type": "string", "enum": ["truncate", "error"]},
        "prompt_cache_key": {"type": "string", "maxLength": 1024,
            "description": "a session's name: with enableSessionAffinity it picks the replica"},
        "prompt_cache_isolation_key": {"type": "string",
            "description": "requests share cached prompt prefixes only under the same key"},
        "response_format": {
            "description": "structured output: text, any JSON object, or JSON valid against a schema \
                (OpenAI's {name, schema, strict} or the schema itself), or text of a GBNF grammar",
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema", "grammar"]},
                "schema": {"oneOf": [{"type": "object"}, {"type": "string"}]},
                "json_schema": {"oneOf": [{"type": "object"}, {"type": "string"}]},
                "grammar": {"type": "string"}
            },
            "required": ["type"],
            "additionalProperties": false
        }
    });
    let with = |extra: Value, required: &[&str]| {
        let mut props = sampling.as_object().cloned().unwrap_or_default();
        props.extend(extra.as_object().cloned().unwrap_or_default());
        json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
    };
    let tool_call = json!({
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {
                "type": "string", "description": "the arguments object as JSON text"}},
                "required": ["name", "arguments"], "additionalProperties": false}
        },
        "required": ["id", "type", "function"],
        "additionalProperties": false
    });
    let message = json!({
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"description": "required but on an assistant message, whose content may be null", "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, "required": ["type"]}}
            ]},
            "name": {"type": "string"},
            "tool_calls": {"type": "array", "items": tool_call},
            "tool_call_id": {"type": "string", "description": "on a tool message: the call it answers"},
            "refusal": {"type": "null"},
            "function_call": {"type": "null"},
            "audio": {"type": "null"},
            "annotations": {"type": "array", "maxItems": 0}
        },
        "required": ["role", "content"],
        "additionalProperties": false
    });
    let tool = json!({
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "a JSON schema of the arguments object"},
                "strict": {"type": "boolean"}
            }, "required": ["name"], "additionalProperties": false}
        },
        "required": ["type", "function"],
        "additionalProperties": false
    });
    let chat = with(
        json!({
            "messages": {"type": "array", "items": message, "minItems": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "tools": {"type": "array", "items": tool},
            "tool_choice": {"oneOf": [
                {"type": "string", "enum": ["none", "auto", "required"]},
                {"type": "object", "properties": {"type": {"type": "string", "enum": ["function"]}, "function": {
                    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                    "additionalProperties": false}}, "required": ["type", "function"], "additionalProperties": false}
            ]},
            "parallel_tool_calls": {"type": "boolean"}
        }),
        &["model", "messages"],
    );
    // A token id: an index into the vocabulary (its size depends on the model).
    let token = json!({"type": "integer", "minimum": 0, "maximum": u32::MAX});
    let completion = with(
        json!({
            "prompt": {"oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                {"type": "array", "items": token, "minItems": 1},
                {"type": "array", "items": {"type": "array", "items": token, "minItems": 1}, "minItems": 1}
            ]},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "echo": {"type": "boolean"}
        }),
        &["model", "prompt"],
    );
    (chat, completion)
}

/// An error answer: OpenAI's error shape on the inference routes (what their clients parse), a
/// google.rpc Status everywhere else; the HTTP status follows the code either way.
fn error_response(path: &str) -> Value {
    let inference = ["/inference/", "/v1/chat/", "/v1/completions", "/v1/models", "/v1/openai/"];
    let (what, schema) = if inference.iter().any(|p| path.starts_with(p)) {
        ("An OpenAI error body; the HTTP status follows its google.rpc code", "OpenAiError")
    } else {
        ("A google.rpc Status; the HTTP status follows its code", "Status")
    };
    json!({"description": what, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// The type of a query parameter, as the server parses it.
fn query_schema(name: &str) -> Value {
    match name {
        "validateOnly"
        | "disableAutoDeploy"
        | "disableSpeculativeDecoding"
        | "skipShapeValidation"
        | "skipImageTagValidation"
        | "acceptShapelessRisk"
        | "showDeleted"
        | "hard"
        | "ignoreChecks"
        | "replaceMergedAddon"
        | "skipHfConfigValidation"
        | "trustRemoteCode"
        | "configOnly"
        | "allowMissing" => {
            json!({"type": "boolean"})
        }
        "pageSize" => json!({"type": "integer", "format": "int32", "minimum": 0}),
        "size" => json!({"type": "integer", "format": "int64", "minimum": 0}),
        "expires" => json!({"type": "integer", "format": "int64"}),
        _ => json!({"type": "string"}),
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPERATIONS {
        let mut params = Vec::new();
        for seg in op.path.split('/') {
            let name = seg.split(':').next().unwrap_or("");
            if let Some(p) = name.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
                params.push(json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}));
            }
        }
        for q in op.query {
            // The signed file routes are refused without their whole signature.
            let required = !op.auth && matches!(*q, "size" | "expires" | "sig");
            params.push(json!({"name": q, "in": "query", "required": required, "schema": query_schema(q)}));
        }
        let ok = match op.response {
            Some(r) => {
                json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{r}")}}}})
            }
            None => json!({"description": "OK"}),
        };
        let mut operation = json!({
            "operationId": op.id,
            "summary": op.summary,
            "parameters": params,
            "responses": {
                "200": ok,
                "default": error_response(op.path)
            }
        });
        if let Some(r) = op.request {
            operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{r}")}}}});
        }
        if !op.auth {
            operation["security"] = json!([]);
        }
        let entry = paths.entry(op.path.to_string()).or_insert_with(|| json!({}));
        entry[op.method] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "hearth",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "hearth's Gateway API: Models, Deployments and DeployedModels, wire-compatible with the Fireworks AI Gateway REST API."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas()
        },
        "security": [{"bearer": []}],
        "paths": paths
    })
}
