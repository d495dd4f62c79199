//! GBNF, llama.cpp's grammar format (what Fireworks' `response_format: {"type": "grammar"}`
//! takes), rewritten into llguidance's Lark dialect, which the constraint engine compiles.
//!
//! Written here rather than taken from a crate: no Rust crate reads GBNF into something
//! llguidance takes (llguidance's own converter is Python), and the mapping is one to one:
//!
//! | GBNF | Lark |
//! | --- | --- |
//! | `name ::= ...` (`root` the start) | `g_name: ...` (`start: g_root`) |
//! | `"text"` | `"text"` (re-escaped as JSON) |
//! | `[a-z]`, `[^"\\]`, `.` | `/[a-z]/`, `/[^"\\]/`, `/(?s:.)/` (every character as `\x{..}`) |
//! | `( )`, `|`, `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}` | the same |
//! | `# comment` | dropped |
//!
//! A rule ends at the end of its line unless the line ends inside parentheses or after `|`,
//! as in llama.cpp. Mistakes are reported with the line they are on.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The Lark text of a GBNF grammar, or what is wrong with it.
pub fn to_lark(src: &str) -> Result<String, String> {
    let mut p = Parser { s: src.as_bytes(), src, pos: 0, defined: BTreeSet::new(), used: Vec::new() };
    let mut out = String::new();
    loop {
        p.skip_space(true);
        if p.pos >= p.s.len() {
            break;
        }
        let name = p.name().ok_or_else(|| p.error("expected a rule name"))?;
        p.skip_space(false);
        if !p.eat("::=") {
            return Err(p.error(&format!("expected `::=` after the rule name {name:?}")));
        }
        // The body may start on the next line.
        p.skip_space(true);
        if !p.defined.insert(name.to_string()) {
            return Err(p.error(&format!("rule {name:?} is defined twice")));
        }
        let body = p.alternates(false)?;
        let _ = writeln!(out, "{}: {body}", mangle(name));
    }
    if !p.defined.contains("root") {
        return Err("a GBNF grammar needs a `root` rule, where the output starts".into());
    }
    if let Some((name, line)) = p.used.iter().find(|(n, _)| !p.defined.contains(n)) {
        return Err(format!("line {line}: rule {name:?} is used but never defined"));
    }
    Ok(format!("start: {}\n{out}", mangle("root")))
}

/// GBNF names are letters, digits and `-`; Lark rule names are lowercase with `_`. Uppercase
/// letters and `-` are spelled out so that distinct names stay distinct.
fn mangle(name: &str) -> String {
    let mut out = String::from("g_");
    for c in name.chars() {
        match c {
            '-' => out.push_str("_d_"),
            c if c.is_ascii_uppercase() => {
                out.push_str("_u");
                out.push(c.to_ascii_lowercase());
            }
            c => out.push(c),
        }
    }
    out
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    pos: usize,
    defined: BTreeSet<String>,
    /// Rules referred to, with the line of the first reference.
    used: Vec<(String, usize)>,
}

impl<'a> Parser<'a> {
    fn line(&self) -> usize {
        self.src[..self.pos.min(self.src.len())].matches('\n').count() + 1
    }

    fn error(&self, what: &str) -> String {
        format!("line {}: {what}", self.line())
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, t: &str) -> bool {
        if self.s[self.pos..].starts_with(t.as_bytes()) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }

    /// Skips spaces and comments, and newlines too where `newlines` (inside parentheses, after
    /// `|`, between rules).
    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newlines => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-') {
            self.pos += 1;
        }
        (self.pos > start).then(|| &self.src[start..self.pos])
    }

    fn alternates(&mut self, nested: bool) -> Result<String, String> {
        let mut alts = Vec::new();
        let mut empty = false;
        loop {
            let seq = self.sequence(nested)?;
            if seq.is_empty() {
                empty = true;
            } else {
                alts.push(seq);
            }
            self.skip_space(nested);
            if self.eat("|") {
                self.skip_space(true);
                continue;
            }
            break;
        }
        match (alts.is_empty(), empty) {
            (true, _) => Err(self.error("a rule or group with nothing in it")),
            // An empty alternative makes the others optional.
            (false, true) => Ok(format!("({})?", alts.join(" | "))),
            // Bare: a rule's body takes it as is, a group puts it in its parentheses.
            (false, false) => Ok(alts.join(" | ")),
        }
    }

    fn sequence(&mut self, nested: bool) -> Result<String, String> {
        let mut items = Vec::new();
        loop {
            self.skip_space(nested);
            match self.peek() {
                None | Some(b'|') | Some(b')') | Some(b'\n') | Some(b'\r') => break,
                _ => {}
            }
            // The next rule's `name ::=` ends this one (on a new line only when not nested,
            // which the newline check above already handles).
            let atom = self.primary()?;
            items.push(format!("{atom}{}", self.repeat()?));
        }
        Ok(items.join(" "))
    }

    fn primary(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None | Some(b'\n') => return Err(self.error("a string that does not end")),
                        Some(b'"') => {
                            self.pos += 1;
                            break;
                        }
                        _ => text.push(self.char_in_literal()?),
                    }
                }
                if text.is_empty() {
                    return Err(self.error("an empty string; leave it out or make its group optional"));
                }
                Ok(serde_json::Value::String(text).to_string())
            }
            Some(b'[') => {
                self.pos += 1;
                let mut class = String::from("/[");
                if self.eat("^") {
                    class.push('^');
                }
                let mut any = false;
                loop {
                    match self.peek() {
                        None | Some(b'\n') => return Err(self.error("a character class that does not end")),
                        Some(b']') => {
                            self.pos += 1;
                            break;
                        }
                        _ => {
                            let lo = self.char_in_literal()?;
                            let _ = write!(class, "\\x{{{:x}}}", lo as u32);
                            if self.peek() == Some(b'-') && self.s.get(self.pos + 1) != Some(&b']') {
                                self.pos += 1;
                                let hi = self.char_in_literal()?;
                                if hi < lo {
                                    return Err(self.error(&format!("the range {lo:?}-{hi:?} runs backwards")));
                                }
                                let _ = write!(class, "-\\x{{{:x}}}", hi as u32);
                            }
                            any = true;
                        }
                    }
                }
                if !any {
                    return Err(self.error("an empty character class"));
                }
                class.push_str("]/");
                Ok(class)
            }
            Some(b'.') => {
                self.pos += 1;
                Ok("/(?s:.)/".into())
            }
            Some(b'(') => {
                self.pos += 1;
                self.skip_space(true);
                let inner = self.alternates(true)?;
                self.skip_space(true);
                if !self.eat(")") {
                    return Err(self.error("a `(` without its `)`"));
                }
                Ok(format!("({inner})"))
            }
            Some(c) if c.is_ascii_alphanumeric() || c == b'-' => {
                let line = self.line();
                let name = self.name().unwrap_or_default();
                let save = self.pos;
                self.skip_space(false);
                if self.eat("::=") {
                    return Err(self.error(&format!("rule {name:?} starts before the previous rule ended")));
                }
                self.pos = save;
                if !self.used.iter().any(|(n, _)| n == name) {
                    self.used.push((name.to_string(), line));
                }
                Ok(mangle(name))
            }
            Some(c) => Err(self.error(&format!("unexpected {:?}", c as char))),
            None => Err(self.error("the grammar ends in the middle of a rule")),
        }
    }

    /// One character of a string or class, escapes decoded.
    fn char_in_literal(&mut self) -> Result<char, String> {
        let rest = &self.src[self.pos..];
        let c = rest.chars().next().ok_or_else(|| self.error("unexpected end"))?;
        self.pos += c.len_utf8();
        if c != '\\' {
            return Ok(c);
        }
        let e = self.peek().ok_or_else(|| self.error("a `\\` at the end"))?;
        self.pos += 1;
        let hex = |p: &mut Self, n: usize| -> Result<char, String> {
            let digits = p.src.get(p.pos..p.pos + n).ok_or_else(|| p.error("a short escape"))?;
            let v = u32::from_str_radix(digits, 16).map_err(|_| p.error(&format!("bad hex escape {digits:?}")))?;
            p.pos += n;
            char::from_u32(v).ok_or_else(|| p.error(&format!("{v:#x} is not a character")))
        };
        match e {
            b'n' => Ok('\n'),
            b't' => Ok('\t'),
            b'r' => Ok('\r'),
            b'x' => hex(self, 2),
            b'u' => hex(self, 4),
            b'U' => hex(self, 8),
            b'\\' | b'"' | b'[' | b']' | b'-' | b'^' | b'/' => Ok(e as char),
            other => Err(self.error(&format!("unknown escape `\\{}`", other as char))),
        }
    }

    fn repeat(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(c @ (b'*' | b'+' | b'?')) => {
                self.pos += 1;
                Ok((c as char).to_string())
            }
            Some(b'{') => {
                let start = self.pos;
                let end = self.src[start..].find('}').ok_or_else(|| self.error("a `{` without its `}`"))? + start;
                let inner: String = self.src[start + 1..end].chars().filter(|c| !c.is_whitespace()).collect();
                let num = |s: &str| -> Result<Option<u32>, String> {
                    if s.is_empty() {
                        Ok(None)
                    } else {
                        s.parse().map(Some).map_err(|_| self.error(&format!("bad repetition {{{inner}}}")))
                    }
                };
                let (lo, hi) = match inner.split_once(',') {
                    None => (num(&inner)?, num(&inner)?),
                    Some((a, b)) => (num(a)?, num(b)?),
                };
                if lo.is_none() && hi.is_none() && !inner.contains(',') {
                    return Err(self.error("an empty repetition `{}`"));
                }
                if let (Some(l), Some(h)) = (lo, hi) {
                    if h < l || h == 0 {
                        return Err(self.error(&format!("the repetition {{{inner}}} allows nothing")));
                    }
                }
                self.pos = end + 1;
                Ok(match (lo, hi) {
                    (l, Some(h)) => format!("{{{},{h}}}", l.unwrap_or(0)),
                    (Some(l), None) => format!("{{{l},}}"),
                    (None, None) => "*".into(),
                })
            }
            _ => Ok(String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_strings_classes_and_repeats_become_lark() {
        let g = r#"
# a list of yes/no answers
root   ::= answer ("," ws answer){0,3}
answer ::= "yes" | "no" | [0-9]+ | Maybe-Val
Maybe-Val ::= "\"maybe\"\n"
ws ::= [ \t]*
"#;
        let lark = to_lark(g).unwrap();
        assert_eq!(
            lark,
            "start: g_root\n\
             g_root: g_answer (\",\" g_ws g_answer){0,3}\n\
             g_answer: \"yes\" | \"no\" | /[\\x{30}-\\x{39}]/+ | g__umaybe_d__uval\n\
             g__umaybe_d__uval: \"\\\"maybe\\\"\\n\"\n\
             g_ws: /[\\x{20}\\x{9}]/*\n"
        );
    }

    #[test]
    fn a_rule_continues_over_lines_inside_parentheses_and_after_a_bar() {
        let lark = to_lark("root ::= (\n  \"a\"\n  | \"b\"\n) |\n \"c\"\n").unwrap();
        assert_eq!(lark, "start: g_root\ng_root: (\"a\" | \"b\") | \"c\"\n");
    }

    #[test]
    fn mistakes_are_named_with_their_line() {
        assert!(to_lark("answer ::= \"x\"").unwrap_err().contains("root"));
        assert_eq!(to_lark("root ::= item\n").unwrap_err(), "line 1: rule \"item\" is used but never defined");
        assert!(to_lark("root ::= \"x\"\nroot ::= \"y\"").unwrap_err().contains("defined twice"));
        assert!(to_lark("root ::= [z-a]").unwrap_err().contains("backwards"));
        assert!(to_lark("root ::= (\"a\"").unwrap_err().contains("`)`"));
        assert!(to_lark("root ::= \"a\"{3,1}").unwrap_err().contains("allows nothing"));
        assert!(to_lark("root ::= \"\\q\"").unwrap_err().contains("unknown escape"));
        assert!(to_lark("root ::= \"a\" b ::= \"c\"").unwrap_err().contains("before the previous rule ended"));
    }
}
