//! The OpenAI-compatible inference API's wire types: chat completions and completions, their
//! streaming chunks, and the error body.
//!
//! Requests are checked field by field before they are parsed: a field hearth implements is
//! parsed, a field of the API that hearth does not act on yet is refused by name
//! (UNIMPLEMENTED), and anything else is unknown (INVALID_ARGUMENT).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's content: a string, or a list of parts of which hearth reads the text ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant message's calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Fields of OpenAI's response message that a client echoes back when it appends a reply
    /// to the conversation: accepted when empty, refused by name otherwise.
    #[serde(default)]
    pub refusal: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub annotations: Option<Value>,
}

impl Message {
    /// The first echoed response field that holds something hearth does not act on.
    pub fn unsupported_field(&self) -> Option<&'static str> {
        let set = |v: &Option<Value>| match v {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        [
            ("refusal", &self.refusal),
            ("function_call", &self.function_call),
            ("audio", &self.audio),
            ("annotations", &self.annotations),
        ]
        .into_iter()
        .find(|(_, v)| set(v))
        .map(|(k, _)| k)
    }
}

/// A call, in an assistant message and in responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// A tool the model may call: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON schema of the arguments object; none means no arguments.
    #[serde(default)]
    pub parameters: Option<Value>,
    /// OpenAI's structured-output flag; calls hearth constrains always follow the schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or one function by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Function(NamedTool),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: ToolName,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolName {
    pub name: String,
}

/// `response_format`, in OpenAI's shapes and Fireworks': `{"type": "text"}`,
/// `{"type": "json_object"}` (Fireworks lets it carry a `schema`), `{"type": "json_schema",
/// "json_schema": {"name", "schema", "strict"}}` (OpenAI) or with the schema itself as
/// `json_schema` (Fireworks), and `{"type": "grammar", "grammar": "..."}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub json_schema: Option<Value>,
    #[serde(default)]
    pub grammar: Option<String>,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    pub user: Option<String>,
    pub metadata: Option<Value>,
    /// What to do when the prompt plus `max_tokens` overflows the context: `truncate` (the
    /// default, as the inference spec has it) lowers `max_tokens`; `error` refuses.
    pub context_length_exceeded_behavior: Option<ContextOverflow>,
    /// Structured output: the grammar the output must follow.
    pub response_format: Option<ResponseFormat>,
    /// A session's name: with session affinity it picks the replica (at the gateway); the
    /// prefix cache itself finds shared prompt beginnings by their tokens, so on a replica
    /// it adds nothing.
    pub prompt_cache_key: Option<String>,
    /// Requests share cached prompt prefixes only under the same key (tenants apart).
    pub prompt_cache_isolation_key: Option<String>,
}

/// `context_length_exceeded_behavior`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContextOverflow {
    #[default]
    Truncate,
    Error,
}

// By hand so the message names the field: `Sampling` is flattened into the request types, and
// serde reports no field path through a flatten.
impl<'de> Deserialize<'de> for ContextOverflow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "truncate" => Ok(ContextOverflow::Truncate),
            "error" => Ok(ContextOverflow::Error),
            other => Err(serde::de::Error::custom(format!(
                "context_length_exceeded_behavior is {other:?}; it is \"truncate\" or \"error\""
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
}

/// `prompt`: text, several texts, token ids, or several lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    /// The legacy API's top-N logprobs per token.
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: Option<bool>,
}

const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stream",
    "stream_options",
    "ignore_eos",
    "user",
    "metadata",
    "context_length_exceeded_behavior",
    "response_format",
    "prompt_cache_key",
    "prompt_cache_isolation_key",
];

/// Fields of the API (OpenAI's and Fireworks' extensions) that hearth does not act on yet.
const NOT_YET: &[&str] = &[
    "echo_last",
    "function_call",
    "functions",
    "logit_bias",
    "min_p",
    "mirostat_lr",
    "mirostat_target",
    "perf_metrics_in_response",
    "prediction",
    "prompt_truncate_len",
    "raw_output",
    "reasoning_effort",
    "reasoning_history",
    "return_token_ids",
    "safe_tokenization",
    "service_tier",
    "speculation",
    "thinking",
    "typical_p",
    "images",
    "suffix",
    "best_of",
    "modalities",
    "audio",
    "store",
    "web_search_options",
];

/// Why a request body was refused before parsing.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldError {
    Unknown(String),
    NotSupported(String),
}

/// Checks every top-level field: implemented ones pass; API fields hearth does not act on
/// are refused by name unless they hold their "off" value (null, false, empty); anything
/// else is unknown.
pub fn check_fields(body: &Map<String, Value>, endpoint_fields: &[&str]) -> Result<(), FieldError> {
    for (k, v) in body {
        if SAMPLING_FIELDS.contains(&k.as_str()) || endpoint_fields.contains(&k.as_str()) {
            continue;
        }
        if NOT_YET.contains(&k.as_str()) {
            let off = match v {
                Value::Null => true,
                Value::Bool(b) => !b,
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                Value::String(s) => s.is_empty(),
                Value::Number(_) => false,
            };
            if !off {
                return Err(FieldError::NotSupported(k.clone()));
            }
            continue;
        }
        return Err(FieldError::Unknown(k.clone()));
    }
    Ok(())
}

pub const CHAT_FIELDS: &[&str] =
    &["messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"];
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// What of the prompt came from the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_parse_as_the_official_clients_send_them() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
            "stop": "\n", "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2});
        let obj = body.as_object().unwrap();
        check_fields(obj, CHAT_FIELDS).unwrap();
        let r: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        assert_eq!(r.sampling.stop, Some(Stop::One("\n".into())));
        let c: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": [1, 2, 3], "echo": true, "logprobs": 1})).unwrap();
        assert_eq!(c.prompt, Prompt::Tokens(vec![1, 2, 3]));
    }

    #[test]
    fn unimplemented_fields_are_named_and_unknown_ones_refused() {
        let functions = json!({"functions": [{"name": "f"}]});
        assert_eq!(
            check_fields(functions.as_object().unwrap(), CHAT_FIELDS),
            Err(FieldError::NotSupported("functions".into()))
        );
        let off = json!({"functions": [], "logit_bias": null, "tools": [], "tool_choice": "none"});
        assert_eq!(check_fields(off.as_object().unwrap(), CHAT_FIELDS), Ok(()));
        let typo = json!({"temprature": 1});
        assert_eq!(check_fields(typo.as_object().unwrap(), CHAT_FIELDS), Err(FieldError::Unknown("temprature".into())));
    }
}
