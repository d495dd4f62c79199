//! Structured output and tool calls on the engine server: `response_format`, `tools`,
//! `tool_choice` and `parallel_tool_calls` checked and turned into what the engine runs (a
//! grammar, a conversation with the tools in it), and the model's output turned back into
//! OpenAI's `tool_calls`. The formats themselves live in `hearth_engine::tools`.

use hearth_api::openai::{ChatCompletionRequest, Content, Message, ResponseFormat, ToolCall, ToolChoice};
use hearth_api::Code;
use hearth_engine::chat::{ChatMessage, ChatTemplate};
use hearth_engine::tools::{self, ToolSpec};
use hearth_engine::{Engine, Grammar};
use serde_json::{json, Value};

use crate::error::OpenAiError;

type ApiResult<T> = Result<T, OpenAiError>;

/// The grammar `response_format` asks for; `None` for free text.
///
/// A JSON schema is enforced as given. With OpenAI's `strict: true` every keyword counts: one
/// the grammar engine cannot enforce is refused by name. Without it (or `strict: false`), such
/// keywords are left out of the constraint and the rest is enforced.
pub fn output_grammar(rf: Option<&ResponseFormat>) -> ApiResult<Option<Grammar>> {
    let Some(rf) = rf else { return Ok(None) };
    let bad = |m: String| Err(OpenAiError::bad(m).param("response_format"));
    let stray = |field: &str, v: bool| -> ApiResult<()> {
        if v {
            return Err(OpenAiError::bad(format!("response_format of type {:?} takes no `{field}`", rf.kind))
                .param("response_format"));
        }
        Ok(())
    };
    match rf.kind.as_str() {
        "text" => {
            stray("schema", rf.schema.is_some())?;
            stray("json_schema", rf.json_schema.is_some())?;
            stray("grammar", rf.grammar.is_some())?;
            Ok(None)
        }
        "json_object" => {
            stray("json_schema", rf.json_schema.is_some())?;
            stray("grammar", rf.grammar.is_some())?;
            match &rf.schema {
                None | Some(Value::Null) => Ok(Some(Grammar::JsonObject)),
                Some(s) => Ok(Some(Grammar::JsonSchema(schema_value(s, "response_format.schema")?))),
            }
        }
        "json_schema" => {
            stray("grammar", rf.grammar.is_some())?;
            let given = match (&rf.json_schema, &rf.schema) {
                (Some(j), None) => j,
                (None, Some(s)) => s,
                (Some(_), Some(_)) => return bad("send the schema once: in `json_schema` or in `schema`".into()),
                (None, None) => return bad("response_format of type \"json_schema\" needs `json_schema`".into()),
            };
            let given = schema_value(given, "response_format.json_schema")?;
            Ok(Some(Grammar::JsonSchema(openai_schema(given)?)))
        }
        "grammar" => {
            stray("schema", rf.schema.is_some())?;
            stray("json_schema", rf.json_schema.is_some())?;
            match rf.grammar.as_deref() {
                Some(g) if !g.trim().is_empty() => Ok(Some(Grammar::Gbnf(g.to_string()))),
                _ => bad("response_format of type \"grammar\" needs `grammar`, a GBNF grammar".into()),
            }
        }
        other => bad(format!(
            "response_format type {other:?} is unknown; it is \"text\", \"json_object\", \"json_schema\" or \"grammar\""
        )),
    }
}

/// A schema given as an object, or as JSON text (the inference spec allows both).
fn schema_value(v: &Value, field: &str) -> ApiResult<Value> {
    match v {
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            OpenAiError::bad(format!("{field} is a string that is not JSON: {e}")).param("response_format")
        }),
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(OpenAiError::bad(format!("{field} must be a JSON schema object")).param("response_format")),
    }
}

/// OpenAI's wrapper (`{"name", "description", "schema", "strict"}`) unwrapped, with `strict`
/// deciding leniency; a bare schema (Fireworks' form) as it is, strict.
fn openai_schema(given: Value) -> ApiResult<Value> {
    const WRAPPER: [&str; 4] = ["name", "description", "schema", "strict"];
    let wrapped =
        given.as_object().is_some_and(|o| o.contains_key("schema") && o.keys().all(|k| WRAPPER.contains(&k.as_str())));
    if !wrapped {
        return Ok(given);
    }
    let strict = match given.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(
                OpenAiError::bad("response_format.json_schema.strict must be a boolean").param("response_format")
            )
        }
    };
    let mut schema = schema_value(&given["schema"], "response_format.json_schema.schema")?;
    if !strict {
        if let Some(o) = schema.as_object_mut() {
            let mut x = o.get("x-guidance").cloned().unwrap_or_else(|| json!({}));
            if x.get("lenient").is_none() {
                x["lenient"] = json!(true);
            }
            o.insert("x-guidance".into(), x);
        }
    }
    Ok(schema)
}

/// What the request's tools ask of this turn.
pub struct ToolPlan {
    /// All the request's tools, as the conversation shows them.
    pub tools: Vec<ToolSpec>,
    /// The grammar of a turn that must call (`required`, a named function); `None` lets the
    /// model answer in text or call (`auto`).
    pub grammar: Option<Grammar>,
    /// Several calls in one turn (`parallel_tool_calls`, on by default).
    pub parallel: bool,
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`. `None`: no tools in play (none
/// given, or `tool_choice: "none"`, which keeps them out of the prompt too).
pub fn tool_plan(engine: &Engine, req: &ChatCompletionRequest) -> ApiResult<Option<ToolPlan>> {
    let tools = req.tools.as_deref().unwrap_or_default();
    let bad = |m: String, p: &str| Err(OpenAiError::bad(m).param(p));
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return bad(format!("tools[{i}].type is {:?}; hearth's tools are of type \"function\"", t.kind), "tools");
        }
        let name = &t.function.name;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad(
                format!("tools[{i}].function.name {name:?} is not a name: 1 to 64 letters, digits, '_' or '-'"),
                "tools",
            );
        }
        if specs.iter().any(|s| &s.name == name) {
            return bad(format!("tools[{i}]: two tools are named {name:?}"), "tools");
        }
        let parameters = match &t.function.parameters {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return bad(format!("tools[{i}].function.parameters must be a JSON schema object"), "tools"),
        };
        specs.push(ToolSpec { name: name.clone(), description: t.function.description.clone(), parameters });
    }
    let named = match &req.tool_choice {
        None => None,
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "none" => return Ok(None),
            "auto" | "required" => Some(m.clone()),
            other => {
                return bad(
                    format!("tool_choice {other:?} is unknown; it is \"none\", \"auto\", \"required\" or a function"),
                    "tool_choice",
                )
            }
        },
        Some(ToolChoice::Function(f)) => {
            if f.kind != "function" {
                return bad(format!("tool_choice.type is {:?}; it is \"function\"", f.kind), "tool_choice");
            }
            if !specs.iter().any(|s| s.name == f.function.name) {
                return bad(
                    format!("tool_choice names {:?}, which is not among the tools", f.function.name),
                    "tool_choice",
                );
            }
            Some(format!("function:{}", f.function.name))
        }
    };
    if specs.is_empty() {
        return match named {
            Some(m) if m != "auto" => bad("tool_choice asks for a call, but there are no tools".into(), "tool_choice"),
            _ => Ok(None),
        };
    }
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let forced: Option<Vec<ToolSpec>> = match named.as_deref() {
        Some("required") => Some(specs.clone()),
        Some(m) if m.starts_with("function:") => {
            Some(specs.iter().filter(|s| s.name == m["function:".len()..]).cloned().collect())
        }
        _ => None,
    };
    // Every tool's schema is compiled, called now or not: a schema the grammar engine
    // refuses is the request's mistake, said before anything runs.
    for s in &specs {
        engine
            .check_grammar(&tools::call_grammar(std::slice::from_ref(s), false))
            .map_err(|e| OpenAiError::bad(format!("tool {:?}: {e}", s.name)).param("tools"))?;
    }
    let grammar = forced.map(|f| tools::call_grammar(&f, parallel));
    Ok(Some(ToolPlan { tools: specs, grammar, parallel }))
}

/// The conversation as the template renders it. Tool turns and the tools themselves go to
/// templates that render tools; for the others they are written in the default format (see
/// `hearth_engine::tools`).
pub fn conversation(
    template: &ChatTemplate,
    messages: &[Message],
    plan: Option<&ToolPlan>,
) -> ApiResult<(Vec<ChatMessage>, Option<Vec<Value>>)> {
    let native = template.renders_tools();
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for (i, m) in messages.iter().enumerate() {
        if let Some(f) = m.unsupported_field() {
            return Err(OpenAiError::new(
                Code::Unimplemented,
                format!("messages[{i}].{f} is not supported; leave it out or null"),
            )
            .param("messages"));
        }
        let role = chat_role(i, m)?;
        if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) && role != "assistant" {
            return Err(OpenAiError::bad(format!(
                "messages[{i}] has tool_calls, which only an assistant message may have"
            ))
            .param("messages"));
        }
        if role == "tool" && m.tool_call_id.as_deref().unwrap_or("").is_empty() {
            return Err(
                OpenAiError::bad(format!("messages[{i}] is a tool result without its tool_call_id")).param("messages")
            );
        }
        let calls = m.tool_calls.as_deref().unwrap_or_default();
        let content = match &m.content {
            None if role == "assistant" => String::new(),
            None => {
                return Err(OpenAiError::bad(format!(
                    "messages[{i}].content is null; a {role} message needs content (only an assistant's may be null)"
                ))
                .param("messages"))
            }
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(OpenAiError::new(
                        Code::Unimplemented,
                        format!("content parts of type {:?} are not supported; send text", p.kind),
                    )
                    .param("messages"));
                }
                parts.iter().filter_map(|p| p.text.clone()).collect::<Vec<_>>().join("\n")
            }
        };
        for (j, c) in calls.iter().enumerate() {
            if c.kind != "function" {
                return Err(OpenAiError::bad(format!(
                    "messages[{i}].tool_calls[{j}].type is {:?}; it is \"function\"",
                    c.kind
                ))
                .param("messages"));
            }
        }
        if native {
            let mut cm = ChatMessage::new(role, content);
            if !calls.is_empty() {
                // Templates read arguments as a mapping, as transformers documents.
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|c| {
                        let args: Value = serde_json::from_str(&c.function.arguments)
                            .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
                        json!({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
                    })
                    .collect();
                cm.tool_calls = Some(Value::Array(calls));
            }
            cm.tool_call_id = m.tool_call_id.clone();
            out.push(cm);
        } else if role == "tool" {
            // Results of one turn's calls go back together, in one user turn.
            let block = tools::render_result(&content);
            match out.last_mut() {
                Some(prev) if prev.role == "user" && prev.content.starts_with("<tool_response>") => {
                    prev.content.push('\n');
                    prev.content.push_str(&block);
                }
                _ => out.push(ChatMessage::new("user", block)),
            }
        } else {
            let mut text = content;
            for c in calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&tools::render_call(&c.function.name, &c.function.arguments));
            }
            out.push(ChatMessage::new(role, text));
        }
    }
    let Some(plan) = plan else { return Ok((out, None)) };
    if native {
        return Ok((out, Some(plan.tools.iter().map(ToolSpec::to_json).collect())));
    }
    let instructions = tools::instructions(&plan.tools);
    match out.iter_mut().find(|m| m.role == "system") {
        Some(sys) => sys.content = format!("{}\n\n{instructions}", sys.content),
        None => out.insert(0, ChatMessage::new("system", instructions)),
    }
    Ok((out, None))
}

/// The role of message `i` as the chat template sees it. OpenAI's `developer` is its newer name
/// for `system`; `function` is the API's retired form of `tool`.
fn chat_role(i: usize, m: &Message) -> ApiResult<&'static str> {
    match m.role.as_str() {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        "tool" => Ok("tool"),
        "function" => Err(OpenAiError::new(
            Code::Unimplemented,
            format!("messages[{i}] has role \"function\", the retired form of tool results; send role \"tool\""),
        )
        .param("messages")),
        other => Err(OpenAiError::bad(format!(
            "messages[{i}] has role {other:?}; a message's role is system, developer, user, assistant or tool"
        ))
        .param("messages")),
    }
}

/// A call as the response shows it, with a fresh id.
pub fn response_call(c: tools::ToolCall) -> ToolCall {
    ToolCall {
        id: format!("call_{:016x}", rand::random::<u64>()),
        kind: "function".into(),
        function: hearth_api::openai::FunctionCall { name: c.name, arguments: c.arguments },
    }
}
