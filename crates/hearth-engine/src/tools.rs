//! Tool calls: how a conversation tells the model about its tools, how a call looks in the
//! model's output, and how that output becomes calls again.
//!
//! A model whose chat template renders tools itself gets them through the template (as
//! transformers passes them). Every other model gets hearth's default format: the tools, as
//! JSON, in the system message, with the instruction to answer a call as
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! the form many instruction-tuned models were trained on. Earlier calls in the conversation
//! are written back in that form and tool results as `<tool_response>` blocks in a user turn,
//! so any template renders them. When a call is required (`tool_choice` `required` or a named
//! function), generation is constrained to exactly this form with arguments valid against the
//! function's parameter schema (see `constraint`).

use serde_json::{json, Value};

use crate::constraint::Grammar;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
}

impl ToolSpec {
    /// The tool as templates and the default format show it (OpenAI's shape).
    pub fn to_json(&self) -> Value {
        let mut f = json!({"name": self.name, "parameters": self.parameters});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        json!({"type": "function", "function": f})
    }
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object, as JSON text (what OpenAI's API returns).
    pub arguments: String,
}

/// The system-message text of the default format.
pub fn instructions(tools: &[ToolSpec]) -> String {
    let mut s =
        String::from("You can call functions to help answer. These are the functions, as JSON schemas:\n<tools>\n");
    for t in tools {
        s.push_str(&t.to_json().to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call one, write its name and arguments as a JSON object between tags, like this:\n\
         <tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>\n\
         Write one such block per call. The results come back in <tool_response> blocks.",
    );
    s
}

/// An earlier call, as the default format writes it into an assistant turn.
pub fn render_call(name: &str, arguments: &str) -> String {
    // Arguments arrive as JSON text; text that is not JSON is kept as a string.
    let args: Value = serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()));
    format!("{OPEN}\n{}\n{CLOSE}", json!({"name": name, "arguments": args}))
}

/// A tool's result, as the default format writes it into a user turn.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The grammar of a turn that must call: one call (or, with `parallel`, one or more) of the
/// given tools, each with arguments valid against its parameters.
pub fn call_grammar(tools: &[ToolSpec], parallel: bool) -> Grammar {
    let one = |t: &ToolSpec| {
        json!({"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"], "additionalProperties": false})
    };
    let mut schema =
        if tools.len() == 1 { one(&tools[0]) } else { json!({"anyOf": tools.iter().map(one).collect::<Vec<_>>()}) };
    schema["x-guidance"] = json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
    let start = if parallel { "start: call (\"\\n\" call)*" } else { "start: call" };
    Grammar::Lark(format!("{start}\ncall: \"{OPEN}\\n\" %json {schema} \"\\n{CLOSE}\"\n"))
}

/// What the output holds, piece by piece.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

/// Splits a stream of output text into content and calls as it arrives: text goes out at
/// once except a tail that could begin a call's opening tag; a call goes out when its closing
/// tag arrives. A block whose inside is not a call (`{"name": ..., "arguments": {...}}`) is
/// content after all.
#[derive(Debug, Default)]
pub struct CallParser {
    buf: String,
    inside: bool,
}

impl CallParser {
    pub fn new() -> CallParser {
        CallParser::default()
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.inside {
                let Some(end) = self.buf.find(CLOSE) else { break };
                let block: String = self.buf.drain(..end + CLOSE.len()).collect();
                self.inside = false;
                out.push(parse_block(&block));
            } else if let Some(start) = self.buf.find(OPEN) {
                if start > 0 {
                    out.push(Piece::Text(self.buf.drain(..start).collect()));
                }
                self.inside = true;
            } else {
                let keep = partial_tag_len(&self.buf);
                let emit = self.buf.len() - keep;
                if emit > 0 {
                    out.push(Piece::Text(self.buf.drain(..emit).collect()));
                }
                break;
            }
        }
        out
    }

    /// The end of the output: an unclosed call that is nonetheless complete counts; anything
    /// else left is text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            return vec![];
        }
        if self.inside {
            self.inside = false;
            if let Some(call) = parse_call(&rest[OPEN.len()..]) {
                return vec![Piece::Call(call)];
            }
        }
        vec![Piece::Text(rest)]
    }
}

/// Parses a whole output at once; adjacent text is one piece.
pub fn parse(text: &str) -> Vec<Piece> {
    let mut p = CallParser::new();
    let mut pieces: Vec<Piece> = Vec::new();
    for piece in p.push(text).into_iter().chain(p.finish()) {
        match (pieces.last_mut(), piece) {
            (Some(Piece::Text(t)), Piece::Text(more)) => t.push_str(&more),
            (_, piece) => pieces.push(piece),
        }
    }
    pieces
}

/// The length of the longest tail of `s` that begins the opening tag.
fn partial_tag_len(s: &str) -> usize {
    (1..OPEN.len()).rev().find(|&k| s.ends_with(&OPEN[..k])).unwrap_or(0)
}

fn parse_block(block: &str) -> Piece {
    let inner = &block[OPEN.len()..block.len() - CLOSE.len()];
    match parse_call(inner) {
        Some(call) => Piece::Call(call),
        None => Piece::Text(block.to_string()),
    }
}

fn parse_call(inner: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(inner.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> Piece {
        Piece::Call(ToolCall { name: name.into(), arguments: args.into() })
    }

    #[test]
    fn calls_are_found_however_the_text_is_split() {
        let out =
            "Let me check.<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                   <tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let whole = parse(out);
        assert_eq!(
            whole,
            vec![
                Piece::Text("Let me check.".into()),
                call("weather", r#"{"city":"Paris"}"#),
                Piece::Text("\n".into()),
                call("time", "{}"),
            ]
        );
        // Fed one character at a time, the same calls come, and no text of a tag leaks.
        let mut p = CallParser::new();
        let mut pieces = Vec::new();
        for c in out.chars() {
            pieces.extend(p.push(&c.to_string()));
        }
        pieces.extend(p.finish());
        let calls: Vec<&Piece> = pieces.iter().filter(|p| matches!(p, Piece::Call(_))).collect();
        assert_eq!(calls, vec![&whole[1], &whole[3]]);
        let text: String =
            pieces.iter().filter_map(|p| if let Piece::Text(t) = p { Some(t.as_str()) } else { None }).collect();
        assert_eq!(text, "Let me check.\n");
    }

    #[test]
    fn what_is_not_a_call_stays_text() {
        assert_eq!(parse("a < b and <tool"), vec![Piece::Text("a < b and <tool".into())]);
        assert_eq!(
            parse("<tool_call>not json</tool_call>"),
            vec![Piece::Text("<tool_call>not json</tool_call>".into())]
        );
        // Cut off by max_tokens before the closing tag, but whole: still a call.
        assert_eq!(parse("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}"), vec![call("f", r#"{"x":1}"#)]);
    }

    #[test]
    fn earlier_calls_render_in_the_form_the_parser_reads() {
        let rendered = render_call("f", r#"{"x": [1, 2]}"#);
        assert_eq!(parse(&rendered), vec![call("f", r#"{"x":[1,2]}"#)]);
    }
}
