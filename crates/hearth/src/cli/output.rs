//! Printing resources: a table (the default), JSON, or YAML.
//!
//! YAML comes from a small emitter over `serde_json::Value`: the values are JSON already, and
//! the maintained YAML crates are far larger than what printing them needs.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// A table column: its heading and how to get its cell from a resource.
pub struct Column {
    pub heading: &'static str,
    pub cell: fn(&Value) -> String,
}

/// Prints a list of resources.
pub fn print_list(format: Format, items: &[Value], columns: &[Column]) {
    match format {
        Format::Json => println!("{}", pretty(&Value::Array(items.to_vec()))),
        Format::Yaml => print!("{}", yaml(&Value::Array(items.to_vec()))),
        Format::Table => {
            let rows: Vec<Vec<String>> = items.iter().map(|v| columns.iter().map(|c| (c.cell)(v)).collect()).collect();
            let headings: Vec<String> = columns.iter().map(|c| c.heading.to_string()).collect();
            print!("{}", table(&headings, &rows));
        }
    }
}

/// Prints one resource; as a table, one line per field (nested fields joined with dots).
pub fn print_one(format: Format, item: &Value) {
    match format {
        Format::Json => println!("{}", pretty(item)),
        Format::Yaml => print!("{}", yaml(item)),
        Format::Table => {
            let mut rows = Vec::new();
            flatten("", item, &mut rows);
            let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
            for (k, v) in rows {
                println!("{k:<width$}  {v}");
            }
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// `a.b.c` / value pairs for a key-value listing; arrays of scalars are joined, arrays of
/// objects numbered.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    let key = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(a) if !a.is_empty() && a.iter().any(|x| x.is_object() || x.is_array()) => {
            for (i, x) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
        }
        Value::Array(a) => out.push((prefix.to_string(), a.iter().map(scalar).collect::<Vec<_>>().join(", "))),
        other => out.push((prefix.to_string(), scalar(other))),
    }
}

/// A value as a table cell: strings bare, nothing for null.
pub fn scalar(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Object(m) if m.is_empty() => "{}".to_string(),
        other => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headings: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headings.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(headings).chain(rows.iter().map(Vec::as_slice)) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The last segment of a resource name (`accounts/a/models/m` → `m`).
pub fn short(name: &str) -> String {
    name.rsplit('/').next().unwrap_or(name).to_string()
}

/// A field by dotted path, as a cell.
pub fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(x) => cur = x,
            None => return String::new(),
        }
    }
    scalar(cur)
}

/// A YAML document for `v`, ending in a newline.
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => yaml_map(m, 0, &mut out),
        Value::Array(a) if !a.is_empty() => yaml_seq(a, 0, &mut out),
        other => {
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
    out
}

fn yaml_map(m: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    for (i, (k, v)) in m.iter().enumerate() {
        // The first key of a map in a sequence item goes on the item's `- ` line.
        if i > 0 || !out.ends_with("- ") {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&yaml_string(k));
        out.push(':');
        yaml_value(v, indent, out);
    }
}

fn yaml_seq(a: &[Value], indent: usize, out: &mut String) {
    for (i, v) in a.iter().enumerate() {
        if i > 0 || !out.ends_with("- ") {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str("- ");
        match v {
            Value::Object(m) if !m.is_empty() => yaml_map(m, indent + 2, out),
            Value::Array(a) if !a.is_empty() => yaml_seq(a, indent + 2, out),
            other => {
                out.push_str(&yaml_scalar(other));
                out.push('\n');
            }
        }
    }
}

/// The value after `key:` at `indent`: scalars on the same line, collections below it.
fn yaml_value(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            yaml_map(m, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            yaml_seq(a, indent + 2, out);
        }
        other => {
            out.push(' ');
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => yaml_string(s),
        Value::Array(_) => "[]".to_string(),
        Value::Object(_) => "{}".to_string(),
    }
}

/// A string plain when YAML would read it back as the same string, else double-quoted. A
/// JSON string literal is a valid YAML double-quoted scalar, escapes included.
fn yaml_string(s: &str) -> String {
    if plain_is_safe(s) {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

fn plain_is_safe(s: &str) -> bool {
    const RESERVED: &[&str] = &["null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"];
    let Some(first) = s.chars().next() else { return false };
    if RESERVED.contains(&s.to_ascii_lowercase().as_str()) || s.starts_with(' ') || s.ends_with(' ') {
        return false;
    }
    // Anything that could read as a number (or a date, a version, infinity) is quoted.
    if first.is_ascii_digit() || matches!(first, '-' | '+' | '.') {
        return false;
    }
    if "!&*?|>'\"%@`#,[]{}:".contains(first) {
        return false;
    }
    if s.contains(": ") || s.contains(" #") || s.ends_with(':') {
        return false;
    }
    s.chars().all(|c| !c.is_control() && c != '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_nests_maps_and_sequences_and_quotes_what_would_change_meaning() {
        let v = json!({
            "name": "accounts/a/models/m",
            "state": "READY",
            "replicas": 2,
            "enabled": true,
            "none": null,
            "empty": {},
            "nothing": [],
            "status": {"code": "OK", "message": "a: b"},
            "files": ["config.json", "model.safetensors"],
            "refs": [{"name": "x", "state": "DEPLOYED"}, {"name": "y"}],
            "matrix": [[1, 2], []],
            "tricky": ["true", "123", "", " pad", "line\nbreak", "#hash", "-dash", "1.5", "yes", "v1.2"],
        });
        let expected = r##"name: accounts/a/models/m
state: READY
replicas: 2
enabled: true
none: null
empty: {}
nothing: []
status:
  code: OK
  message: "a: b"
files:
  - config.json
  - model.safetensors
refs:
  - name: x
    state: DEPLOYED
  - name: "y"
matrix:
  - - 1
    - 2
  - []
tricky:
  - "true"
  - "123"
  - ""
  - " pad"
  - "line\nbreak"
  - "#hash"
  - "-dash"
  - "1.5"
  - "yes"
  - v1.2
"##;
        assert_eq!(yaml(&v), expected);
        assert_eq!(yaml(&json!([])), "[]\n");
        assert_eq!(yaml(&json!([{"a": 1}])), "- a: 1\n");
    }

    #[test]
    fn tables_align_columns_and_flatten_one_resource() {
        let t = table(
            &["ID".to_string(), "STATE".to_string()],
            &[vec!["m".into(), "READY".into()], vec!["longer-id".into(), "".into()]],
        );
        assert_eq!(t, "ID         STATE\nm          READY\nlonger-id\n");
        let mut rows = Vec::new();
        flatten("", &json!({"a": {"b": 1, "c": ["x", "y"]}, "d": [{"e": 2}], "f": null}), &mut rows);
        let keys: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a.b", "a.c", "d[0].e", "f"]);
        assert_eq!(rows[1].1, "x, y");
        assert_eq!(field(&json!({"a": {"b": "c"}}), "a.b"), "c");
        assert_eq!(short("accounts/a/models/m"), "m");
    }
}
