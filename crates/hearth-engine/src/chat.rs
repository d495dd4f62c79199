//! Chat templates: turns a conversation into the prompt text the model was trained on by
//! rendering the Jinja template it ships, the way transformers' `apply_chat_template` does.
//!
//! Templates are written for Python's jinja2 as transformers configures it (`trim_blocks`,
//! `lstrip_blocks`, the loop-controls extension, `raise_exception`, `strftime_now` and its own
//! `tojson`); minijinja renders them here, with minijinja-contrib's Python string and dict
//! methods (`.strip()`, `.startswith()`, `.items()`...) and the same helpers defined below.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State, Value};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
///
/// `content` also deserializes from OpenAI's list of content parts
/// (`[{"type": "text", "text": "..."}]`, text parts joined by newlines) and from null (an
/// assistant message that only calls tools), which becomes "".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
    /// An assistant turn's calls, in OpenAI's shape, for templates that render tools
    /// themselves (see `ChatTemplate::renders_tools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool result's call id, for the same templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None }
    }
}

/// A model's chat template, compiled once and rendered per request.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template reads a `tools` variable: it writes the tools and tool turns itself.
    renders_tools: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The most instructions one render may run: the templates models ship take a few thousand
/// for a long conversation, so this only ever stops one that would not end.
const RENDER_FUEL: u64 = 5_000_000;

/// The longest one render may take, far beyond what a model's template needs for a conversation;
/// this stops what fuel cannot see, the work inside one instruction (printing a lazily
/// repeated sequence, `messages * 100000`, is one). minijinja is patched to check it before
/// every instruction and at every item of a lazy sequence (vendor/minijinja/HEARTH-PATCH.md).
const RENDER_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most text one render may produce, or hearth's printing and `tojson` may build for one
/// value: far beyond any model's context (a million tokens is about 4 MiB of text).
const MAX_RENDER_BYTES: usize = 8 << 20;

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts templates see as
    /// `bos_token`/`eos_token` (left undefined when `None`, as transformers does). A syntax
    /// error is `EngineError::InvalidModel` naming the line.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // transformers' environment: jinja2 with trim_blocks and lstrip_blocks on and
        // keep_trailing_newline at jinja2's default (off); no HTML escaping.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // Debug mode would put the template's source into every error message.
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_formatter(python_formatter);
        // jinja2's tests answer by Python's types: a string or dict is a sequence, a bool is a
        // number, none is not iterable. minijinja's built-ins differ on exactly those.
        env.add_test("iterable", is_iterable);
        env.add_test("sequence", is_sequence);
        env.add_test("number", is_number);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // A template comes with an uploaded model: one that loops without end must fail the
        // request, not hold the engine's thread and memory.
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_blocks(source)).map_err(syntax_error)?;
        // Templates that take tools name the variable; those that do not never mention it.
        let renders_tools = source.contains("tools");
        Ok(ChatTemplate {
            env,
            renders_tools,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The template `tokenizer` ships, with its BOS and EOS texts. A model without one cannot
    /// serve chat requests: the error says so and points to /v1/completions.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let source = tokenizer.chat_template().ok_or_else(|| {
            EngineError::InvalidRequest(
                "this model has no chat template, so it cannot serve chat requests; send the prompt as plain text \
                 to /v1/completions instead"
                    .to_string(),
            )
        })?;
        ChatTemplate::new(source, tokenizer.bos_token(), tokenizer.eos_token())
    }

    /// Renders the conversation. With `add_generation_prompt` the text ends with the header
    /// of an assistant turn, ready for the model to write the reply.
    ///
    /// A template that calls `raise_exception` (for example on roles it does not support)
    /// fails with `EngineError::InvalidRequest` carrying its message; any other failure while
    /// rendering is the template's fault, `EngineError::InvalidModel`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Whether the template renders tools and tool turns itself (it reads `tools`); if not,
    /// a conversation with tools is written in `tools`' default format before rendering.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// `render` with the tools the model may call, in OpenAI's shape, as transformers passes
    /// them (`tools`; none is `None`, which templates test for).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Internal(format!("the compiled chat template is missing: {e}")))?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", tools.map(Value::from_serialize).unwrap_or(Value::from(())));
        ctx.insert("documents", Value::from(()));
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        let mut out = BoundedText::default();
        let (result, late) = {
            let deadline = RenderDeadline::start(RENDER_TIME_LIMIT);
            let result = template.render_captured_to(ctx, &mut out).map(drop);
            // A lazy sequence cut short by the deadline in the last instruction ends the
            // render without an error: its output is incomplete all the same.
            (result, deadline.passed())
        };
        if out.overflowed {
            return Err(EngineError::InvalidRequest(format!(
                "the model's chat template wrote more than {} MiB for this conversation; send the prompt as text \
                 to /v1/completions instead",
                MAX_RENDER_BYTES >> 20
            )));
        }
        let result = result.and_then(|()| match late {
            true => Err(minijinja::Error::new(ErrorKind::OutOfFuel, "the render passed its deadline")),
            false => Ok(()),
        });
        result.map_err(|e| match raised_message(&e) {
            Some(message) => EngineError::InvalidRequest(message),
            None if e.kind() == ErrorKind::OutOfFuel => EngineError::InvalidRequest(format!(
                "the model's chat template did not finish rendering this conversation within its bounds \
                 ({RENDER_FUEL} steps, {} s); send the prompt as text to /v1/completions instead",
                RENDER_TIME_LIMIT.as_secs()
            )),
            None => EngineError::InvalidModel(format!("the model's chat template failed to render: {e}")),
        })?;
        String::from_utf8(out.text).map_err(|_| {
            EngineError::InvalidModel("the model's chat template wrote text that is not UTF-8".to_string())
        })
    }
}

/// minijinja's render deadline for this thread, set while it lives.
struct RenderDeadline(std::time::Instant);

impl RenderDeadline {
    fn start(limit: std::time::Duration) -> RenderDeadline {
        let deadline = std::time::Instant::now() + limit;
        minijinja::set_render_deadline(Some(deadline));
        RenderDeadline(deadline)
    }

    fn passed(&self) -> bool {
        std::time::Instant::now() >= self.0
    }
}

impl Drop for RenderDeadline {
    fn drop(&mut self) {
        minijinja::set_render_deadline(None);
    }
}

/// The render's output, refusing to grow past `MAX_RENDER_BYTES`.
#[derive(Default)]
struct BoundedText {
    text: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_RENDER_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("chat template output too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The error `raise_exception` returns, found again in the render error's source chain.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: Value) -> std::result::Result<Value, minijinja::Error> {
    let message = message.as_str().map(str::to_string).unwrap_or_else(|| message.to_string());
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

fn raised_message(error: &minijinja::Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        current = e.source();
    }
    None
}

fn syntax_error(e: minijinja::Error) -> EngineError {
    let line = e.line().map(|line| format!(" at line {line}")).unwrap_or_default();
    let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
    EngineError::InvalidModel(format!("the model's chat template has a syntax error{line}: {detail}"))
}

/// Prints values as jinja2 does where minijinja differs: `None`, `True`, `False`, and lists
/// and dicts in Python's repr (`['a', 'b']`, `{'k': None}`).
fn python_formatter(
    out: &mut Output<'_>,
    state: &State<'_, '_>,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None")?,
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            python_repr(&mut text, value, 0)?;
            out.write_str(&text)?
        }
        _ => return minijinja::escape_formatter(out, state, value),
    }
    Ok(())
}

/// Python's `repr` of a value, as jinja2 prints values inside lists and dicts. (Python would
/// print a tuple, such as an item of `dict.items()`, with parentheses; minijinja has no tuples.)
fn python_repr(out: &mut String, value: &Value, depth: usize) -> std::result::Result<(), minijinja::Error> {
    if out.len() > MAX_RENDER_BYTES {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "printed value too long"));
    }
    if depth > MAX_JSON_DEPTH {
        out.push_str("...");
        return Ok(());
    }
    match value.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(f) if f.is_nan() => out.push_str("nan"),
            Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
            Ok(f) => out.push_str(&python_float(f)),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        ValueKind::String => python_str_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &item, depth + 1)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(out, &key, depth + 1)?;
                out.push_str(": ");
                python_repr(out, &value.get_item(&key).unwrap_or_default(), depth + 1)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr` of a string: single quotes unless the text has one and no double quote.
fn python_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// jinja2's `iterable`: anything Python can iterate; none is not (an undefined value is).
fn is_iterable(value: &Value) -> bool {
    !matches!(value.kind(), ValueKind::None | ValueKind::Bool | ValueKind::Number | ValueKind::Plain)
}

/// jinja2's `sequence`: anything with a length and indexing: strings and dicts included.
fn is_sequence(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::String | ValueKind::Bytes | ValueKind::Seq | ValueKind::Map | ValueKind::Undefined
    )
}

/// jinja2's `number`: Python's bool is an int.
fn is_number(value: &Value) -> bool {
    matches!(value.kind(), ValueKind::Number | ValueKind::Bool)
}

/// transformers' `{% generation %}...{% endgeneration %}` marks assistant text for training
/// masks and renders its body unchanged; minijinja has no such tag, so it becomes an
/// `{% if true %}` block with the same whitespace-control markers.
fn rewrite_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start + 2..];
        let marker_len = usize::from(tag.starts_with(['-', '+']));
        let after_marker = &tag[marker_len..];
        let body = after_marker.trim_start();
        let replacement = [("endgeneration", "endif"), ("generation", "if true")].into_iter().find_map(|(kw, new)| {
            let after_kw = body.strip_prefix(kw)?;
            let end = after_kw.trim_start();
            let closes = end.starts_with("%}") || end.starts_with("-%}") || end.starts_with("+%}");
            let separated =
                after_kw.len() != end.len() || !after_kw.starts_with(|c: char| c.is_alphanumeric() || c == '_');
            (closes && separated).then_some((kw.len(), new))
        });
        match replacement {
            Some((kw_len, new)) => {
                let ws = after_marker.len() - body.len();
                out.push_str("{%");
                out.push_str(&tag[..marker_len]);
                out.push_str(&after_marker[..ws]);
                out.push_str(new);
                rest = &body[kw_len..];
            }
            None => {
                out.push_str("{%");
                rest = tag;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `strftime_now(format)`: the current time (UTC) formatted like Python's `strftime`.
fn strftime_now(format: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    strftime(format, i64::try_from(now).unwrap_or(0))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// Formats a Unix time (UTC) with the strftime directives glibc supports that templates use,
/// including glibc's `%-d` (no padding). Unknown directives are copied as they are.
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let unpadded = spec == Some('-');
        if unpadded {
            spec = chars.next();
        }
        let num = |out: &mut String, value: i64, width: usize| {
            let _ = if unpadded { write!(out, "{value}") } else { write!(out, "{value:0width$}") };
        };
        match spec {
            Some('Y') => num(&mut out, year, 4),
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = if unpadded { write!(out, "{day}") } else { write!(out, "{day:2}") };
            }
            Some('j') => num(&mut out, yday, 3),
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(month_name),
            Some('b' | 'h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(&weekday_name[..3]),
            Some('u') => num(&mut out, if weekday == 0 { 7 } else { weekday as i64 }, 1),
            Some('w') => num(&mut out, weekday as i64, 1),
            Some('F') => {
                let _ = write!(out, "{year:04}-{month:02}-{day:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('D') => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            Some('R') => {
                let _ = write!(out, "{hour:02}:{minute:02}");
            }
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date (the inverse of `civil_from_days`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`. Unlike minijinja's built-in it leaves `<`, `>`, `&` and
/// `'` alone, keeps non-ASCII text, and puts a space after `,` and `:` when not indenting.
fn tojson(value: &Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(flag) => flag,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            let indent = match (v.as_str(), v.as_i64()) {
                (Some(s), _) => s.to_string(),
                (None, Some(n)) => " ".repeat(usize::try_from(n.clamp(0, MAX_JSON_INDENT + 1)).unwrap_or(0)),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an int or a string",
                    ))
                }
            };
            if indent.len() > MAX_JSON_INDENT as usize {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: an indent wider than {MAX_JSON_INDENT} characters"),
                ));
            }
            Some(indent)
        }
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) if seps.len() == 2 => (seps[0].clone(), seps[1].clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = JsonStyle { indent, item_sep, key_sep, sort_keys, ensure_ascii };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// The widest `tojson` indent (Python takes any; real templates use 2 or 4).
const MAX_JSON_INDENT: i64 = 64;

/// Deep enough for any real tool schema; stops a self-referencing value from overflowing the stack.
const MAX_JSON_DEPTH: usize = 128;

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: value nested too deeply"));
    }
    if out.len() > MAX_RENDER_BYTES {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: value too long"));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) => out.push_str(&python_float(f)),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        ValueKind::Bytes => {
            write_json_string(out, &String::from_utf8_lossy(value.as_bytes().unwrap_or_default()), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', items.len(), style, depth, |out, i| {
                write_json(out, &items[i], style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = value
                .try_iter()?
                .map(|key| (json_key(&key), value.get_item(&key)))
                .map(|(k, v)| (k, v.unwrap_or_default()))
                .collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, '{', '}', entries.len(), style, depth, |out, i| {
                write_json_string(out, &entries[i].0, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, &entries[i].1, style, depth + 1)
            })?;
        }
        // Strings, and objects Python's json could not write at all: their text.
        _ => write_json_string(out, &value_text(value), style.ensure_ascii),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    style: &JsonStyle,
    depth: usize,
    mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        item(out, i)?;
    }
    if let Some(indent) = &style.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

fn value_text(value: &Value) -> String {
    value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string())
}

/// A dict key as Python's json writes it: strings as they are, other scalars as JSON text.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::None | ValueKind::Undefined => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number if !key.is_integer() => {
            f64::try_from(key.clone()).map(python_float).unwrap_or_else(|_| key.to_string())
        }
        _ => value_text(key),
    }
}

/// A string as Python's json writes it (escaping `"`, `\` and control characters; with
/// `ensure_ascii`, everything past ASCII as `\uXXXX`).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr`: "1.0", "0.1", "1e+16", "1e-07", "NaN", "Infinity".
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's Debug form is the shortest round-trip text, as Python's repr, and switches to
    // exponents at the same magnitudes; only the exponent's spelling differs.
    let text = format!("{f:?}");
    match text.split_once('e') {
        Some((mantissa, exponent)) => {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(digits) => ('-', digits),
                None => ('+', exponent),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => text,
    }
}

/// Message content as text: a string, null (""), or a list of content parts whose text parts
/// are joined by newlines. Other part types (images, audio) are refused: hearth's models read
/// text only.
fn content_text<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<String, D::Error> {
    use serde::de::Error;
    let value = serde_json::Value::deserialize(deserializer)?;
    match value {
        serde_json::Value::Null => Ok(String::new()),
        serde_json::Value::String(text) => Ok(text),
        serde_json::Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in &parts {
                let kind = part.get("type").and_then(serde_json::Value::as_str).unwrap_or("text");
                if kind != "text" {
                    return Err(D::Error::custom(format!(
                        "content parts of type '{kind}' are not supported: this model reads text only"
                    )));
                }
                let text = part
                    .get("text")
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| D::Error::custom("a text content part needs a string 'text'"))?;
                texts.push(text);
            }
            Ok(texts.join("\n"))
        }
        _ => Err(D::Error::custom("message content must be a string, null or a list of content parts")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Meta-Llama-3-8B-Instruct's template, with a role check that raises as many templates do.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Conversation roles must be system, user or assistant, got ' + message['role']) }}{% endif %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(role, content)| ChatMessage::new(*role, *content)).collect()
    }

    #[test]
    fn smollm2_single_turn_adds_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        let out = t.render(&msgs(&[("user", "Hi!")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_multi_turn_with_system_and_no_generation_prompt() {
        let t = ChatTemplate::new(SMOLLM2, None, None).unwrap();
        let conversation = msgs(&[("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?")]);
        let out = t.render(&conversation, false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_renders_with_bos_and_trims_content() {
        let t = ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
        let out = t.render(&msgs(&[("system", "Sys"), ("user", "  Hello \n")]), true).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let out = t.render(&msgs(&[("user", "a"), ("assistant", "b")]), false).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nb<|eot_id|>"
        );
    }

    #[test]
    fn raise_exception_is_an_invalid_request_with_the_message() {
        let t = ChatTemplate::new(LLAMA3, Some("<s>"), None).unwrap();
        match t.render(&msgs(&[("tool", "x")]), true) {
            Err(EngineError::InvalidRequest(message)) => {
                assert_eq!(message, "Conversation roles must be system, user or assistant, got tool")
            }
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = ChatTemplate::new("line one\n{% for m in messages %}\n{{ m.content }\n", None, None).unwrap_err();
        match err {
            EngineError::InvalidModel(message) => {
                assert!(message.contains("syntax error at line 3"), "{message}")
            }
            other => panic!("expected InvalidModel, got {other:?}"),
        }
    }

    #[test]
    fn a_template_that_would_not_end_fails_the_request_within_its_budget() {
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(endless, None, None).expect("compiles");
        let started = std::time::Instant::now();
        match t.render(&[ChatMessage::new("user", "hi")], true) {
            Err(EngineError::InvalidRequest(m)) => assert!(m.contains("did not finish rendering"), "{m}"),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn a_template_that_walks_a_huge_lazy_sequence_fails_at_once() {
        // `messages * n` repeats lazily, so the sequence exists at no cost until something
        // walks it: printing, a filter, a method. Each of these must be refused, not run.
        let walkers = [
            "{{ 68*messages*773*37**7. }}",
            "{{ (messages * 10**12)|join(',') }}",
            "{{ (messages * 10**12)|list|length }}",
            "{{ (messages * 10**12)|tojson }}",
            "{{ (messages * 10**12)|sort }}",
            "{{ (messages * 10**12)|map(attribute='role')|first }}",
            "{{ (messages * 10**12)|string }}",
            "{{ ', '.join(messages * 10**12) }}",
            "{{ 'user' is in(messages * 10**12) }}",
            "{{ messages*5431*544*3~6. }}",
            "{{ (messages * 400000) ~ '' }}",
            "{{ [messages * 400000] * 1000000 }}",
            "{{ ([messages * 400000] * 1000000)|tojson }}",
            "{% set x = 'ab' * 40000000 %}{{ x ~ x ~ x }}",
            // Each of these runs into the render deadline, inside a single instruction.
            "{{ ([messages * 400000] * 1000000) ~ '' }}",
            "{{ [messages * 400000] * 1000000 == [messages * 400000] * 1000000 }}",
            "{{ messages|tojson(indent=10**12) }}",
        ];
        let conversation = [ChatMessage::new("user", "hi"), ChatMessage::new("assistant", "hello")];
        for source in walkers {
            let t = ChatTemplate::new(source, None, None).expect("compiles");
            let started = std::time::Instant::now();
            let result = t.render(&conversation, true);
            assert!(result.is_err(), "{source}: {result:?}");
            let bound = RENDER_TIME_LIMIT + std::time::Duration::from_secs(1);
            assert!(started.elapsed() < bound, "{source}: {:?}", started.elapsed());
        }
    }

    #[test]
    fn a_template_that_writes_too_much_is_refused_with_the_bound() {
        let long = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}";
        let t = ChatTemplate::new(long, None, None).expect("compiles");
        match t.render(&[ChatMessage::new("user", "hi")], true) {
            Err(EngineError::InvalidRequest(m)) => assert!(m.contains("more than 8 MiB"), "{m}"),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(source, None, None).unwrap();
        // trim_blocks eats the newline after each tag, lstrip_blocks the indentation before
        // it, and the final newline of the source is dropped (keep_trailing_newline=False).
        assert_eq!(t.render(&msgs(&[("user", "a"), ("assistant", "b")]), false).unwrap(), "[a]\n");
    }

    #[test]
    fn python_methods_namespace_and_loop_controls() {
        let source = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
                      {% set ns.n = ns.n + 1 %}{{ m.content.strip().upper() }}|{{ m.content.startswith(' x') }}|\
                      {{ m.content.split(',') | length }};{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        let conversation = msgs(&[("system", "s"), ("user", " x,y "), ("user", "z"), ("user", "never")]);
        assert_eq!(t.render(&conversation, false).unwrap(), "X,Y|True|2;Z|False|1;2");
    }

    #[test]
    fn undefined_bos_and_none_print_like_jinja2() {
        let t = ChatTemplate::new("[{{ bos_token }}][{{ tools }}][{{ add_generation_prompt }}]", None, None).unwrap();
        assert_eq!(t.render(&[], true).unwrap(), "[][None][True]");
    }

    #[test]
    fn lists_dicts_and_type_tests_print_like_jinja2() {
        let source = "{{ [\"it's\", 'a\\n', none, true, 1.5, 2.0, {'k': [1]}] }}|{{ messages[0] }}|\
                      {{ none is iterable }}{{ 'a' is sequence }}{{ {'a': 1} is sequence }}{{ true is number }}{{ 1 is iterable }}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "x")]), false).unwrap(),
            "[\"it's\", 'a\\n', None, True, 1.5, 2.0, {'k': [1]}]|{'role': 'user', 'content': 'x'}|FalseTrueTrueTrueFalse"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'a': [1, 2.5, none, true], 'b': 'é<\"'} | tojson }}\n{{ {'k': [1, {}], 'e': []} | tojson(indent=2) }}\n{{ {'b': 1, 'a': 1e20} | tojson(sort_keys=true, ensure_ascii=true) }}",
            None,
            None,
        )
        .unwrap();
        let out = t.render(&[], false).unwrap();
        let mut lines = out.split('\n');
        let first = lines.next().unwrap();
        // minijinja maps may not keep insertion order; check the pieces Python would write.
        assert!(first.contains("\"a\": [1, 2.5, null, true]"), "{first}");
        assert!(first.contains("\"b\": \"é<\\\"\""), "{first}");
        let rest: Vec<&str> = lines.collect();
        let indented = rest[..rest.len() - 1].join("\n");
        assert!(indented.contains("\"k\": [\n    1,\n    {}\n  ]"), "{indented}");
        assert!(indented.contains("\"e\": []"), "{indented}");
        assert_eq!(rest[rest.len() - 1], "{\"a\": 1e+20, \"b\": 1}");
    }

    #[test]
    fn strftime_formats_like_python() {
        // 2024-07-23 14:05:09 UTC, a Tuesday, day 205.
        let t = 1_721_743_509;
        assert_eq!(strftime("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(strftime("%B %-d, %Y %H:%M:%S %p %A %j %%", t), "July 23, 2024 14:05:09 PM Tuesday 205 %");
        assert_eq!(strftime("%F %I %a %y %e", 0), "1970-01-01 12 Thu 70  1");
        assert_eq!(strftime("%Y-%m-%d", -86_400), "1969-12-31");
        assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
        let t = ChatTemplate::new("{{ strftime_now('%Y') | length }}", None, None).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "4");
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let source = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(source, None, None).unwrap();
        assert_eq!(t.render(&msgs(&[("assistant", "hi")]), false).unwrap(), "hi");
        assert_eq!(rewrite_generation_blocks("{% generations %}{%generation%}"), "{% generations %}{%if true%}");
    }

    #[test]
    fn content_parts_are_joined_and_null_is_empty() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content, "a\nb");
        let m: ChatMessage = serde_json::from_str(r#"{"role":"assistant","content":null}"#).unwrap();
        assert_eq!(m.content, "");
        let m: ChatMessage = serde_json::from_str(r#"{"role":"assistant"}"#).unwrap();
        assert_eq!(m.content, "");
        let err = serde_json::from_str::<ChatMessage>(
            r#"{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("image_url"), "{err}");
    }

    #[test]
    fn missing_template_points_to_completions() {
        // A tokenizer is needed only for its template; build the smallest one.
        let err = match crate::tokenizer::tests_support::tiny_tokenizer_without_template() {
            Ok(tok) => ChatTemplate::from_tokenizer(&tok).unwrap_err(),
            Err(e) => panic!("{e}"),
        };
        match err {
            EngineError::InvalidRequest(message) => {
                assert!(message.contains("no chat template") && message.contains("/v1/completions"), "{message}")
            }
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }
}
