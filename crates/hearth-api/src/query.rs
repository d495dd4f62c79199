//! List and Get query parameters: AIP-160 `filter`, AIP-132 `orderBy` and `readMask`, evaluated on resources already rendered as Fireworks-style camelCase JSON.
//!
//! Everything here works on `serde_json::Value` so that one implementation serves every
//! collection, and so that what a filter sees is exactly what the client would see. Inputs come
//! straight from request URLs, so parsing is bounded ([`MAX_QUERY_LEN`], [`MAX_FILTER_DEPTH`],
//! [`MAX_FILTER_TERMS`]) and every failure is a [`QueryError`] worded for the person who wrote the
//! query.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, FixedOffset};
use serde_json::Value;

/// Longest `filter`, `orderBy` or `readMask` accepted, in characters.
pub const MAX_QUERY_LEN: usize = 2048;
/// Deepest nesting of parentheses and negations a filter may use.
pub const MAX_FILTER_DEPTH: usize = 32;
/// Most comparisons one filter may contain (after `f = (a OR b)` expands to two).
pub const MAX_FILTER_TERMS: usize = 64;

/// Field paths longer than this are certainly mistakes, and bounding them bounds the recursion
/// that read masks do.
const MAX_PATH_SEGMENTS: usize = 32;
/// Unknown-field errors list the accepted fields only while the list stays readable.
const MAX_LISTED_FIELDS: usize = 24;
/// Echoing a 2000-character token back in an error helps nobody.
const ECHO_LIMIT: usize = 48;

const FILTER: &str = "filter";
const ORDER_BY: &str = "orderBy";
const READ_MASK: &str = "readMask";

/// Why a `filter`, `orderBy` or `readMask` was rejected. Every variant is the client's fault
/// (google.rpc `INVALID_ARGUMENT`); `Display` names the parameter first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{param}: longer than {max} characters")]
    TooLong { param: &'static str, max: usize },
    #[error("{param}: {message}{}", at_column(.column))]
    Syntax { param: &'static str, message: String, column: Option<usize> },
    #[error("{param}: unknown field \"{field}\"{}{}", paren_column(.column), known_fields(.known))]
    UnknownField {
        param: &'static str,
        field: String,
        column: Option<usize>,
        /// The fields that would have been accepted; `None` when there are too many to list.
        known: Option<Vec<String>>,
    },
    #[error("{param}: invalid field path \"{path}\": {reason}{}", at_column(.column))]
    InvalidPath { param: &'static str, path: String, reason: &'static str, column: Option<usize> },
    #[error("filter: nested more than {max} levels deep at column {column}")]
    TooDeep { max: usize, column: usize },
    #[error("filter: more than {max} comparisons at column {column}")]
    TooManyTerms { max: usize, column: usize },
}

fn at_column(column: &Option<usize>) -> String {
    column.map_or_else(String::new, |c| format!(" at column {c}"))
}

fn paren_column(column: &Option<usize>) -> String {
    column.map_or_else(String::new, |c| format!(" (at column {c})"))
}

fn known_fields(known: &Option<Vec<String>>) -> String {
    match known {
        None => String::new(),
        Some(list) if list.is_empty() => "; no fields are accepted here".to_string(),
        Some(list) => format!("; expected one of: {}", list.join(", ")),
    }
}

fn syntax(param: &'static str, message: impl Into<String>, column: Option<usize>) -> QueryError {
    QueryError::Syntax { param, message: message.into(), column }
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= ECHO_LIMIT {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(ECHO_LIMIT).collect();
        out.push_str("...");
        out
    }
}

fn check_len(param: &'static str, input: &str) -> Result<(), QueryError> {
    // The byte test avoids counting characters of something absurdly large.
    if input.len() > MAX_QUERY_LEN * 4 || input.chars().count() > MAX_QUERY_LEN {
        return Err(QueryError::TooLong { param, max: MAX_QUERY_LEN });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Field paths
// ---------------------------------------------------------------------------------------------

/// A validated field path: `dotted` as the caller listed it in `allowed`, plus its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldPath {
    dotted: String,
    segments: Vec<String>,
}

impl FieldPath {
    fn new(dotted: String) -> FieldPath {
        let segments = dotted.split('.').map(str::to_string).collect();
        FieldPath { dotted, segments }
    }

    fn lookup<'v>(&self, resource: &'v Value) -> Option<&'v Value> {
        let mut current = resource;
        for segment in &self.segments {
            current = current.as_object()?.get(segment)?;
        }
        // JSON null and an omitted field are the same thing to proto3.
        (!current.is_null()).then_some(current)
    }
}

/// proto's JSON-name rule: `peft_details` becomes `peftDetails`; camelCase passes through.
fn camelize(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    let mut upper = false;
    for c in segment.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn camelize_path(path: &str) -> String {
    path.split('.').map(camelize).collect::<Vec<_>>().join(".")
}

fn validate_path(param: &'static str, path: &str, column: Option<usize>) -> Result<(), QueryError> {
    let invalid = |reason| QueryError::InvalidPath { param, path: shorten(path), reason, column };
    if path.is_empty() {
        return Err(invalid("empty path"));
    }
    if !path.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        return Err(invalid("only letters, digits, '_' and '.' may appear in a field path"));
    }
    if path.split('.').any(str::is_empty) {
        return Err(invalid("empty segment"));
    }
    if path.split('.').count() > MAX_PATH_SEGMENTS {
        return Err(invalid("too many segments"));
    }
    Ok(())
}

/// Validates `raw` and maps it onto an entry of `allowed`, accepting the entry's own spelling or
/// the snake_case spelling of it.
fn resolve_field(
    param: &'static str,
    raw: &str,
    column: Option<usize>,
    allowed: &[&str],
) -> Result<FieldPath, QueryError> {
    validate_path(param, raw, column)?;
    if allowed.contains(&raw) {
        return Ok(FieldPath::new(raw.to_string()));
    }
    let camel = camelize_path(raw);
    if allowed.contains(&camel.as_str()) {
        return Ok(FieldPath::new(camel));
    }
    let known = (allowed.len() <= MAX_LISTED_FIELDS).then(|| allowed.iter().map(|a| shorten(a)).collect());
    Err(QueryError::UnknownField { param, field: shorten(raw), column, known })
}

// ---------------------------------------------------------------------------------------------
// Value ordering shared by filters and orderBy
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn from_json(n: &serde_json::Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            return Some(Num::Int(i128::from(i)));
        }
        if let Some(u) = n.as_u64() {
            return Some(Num::Int(i128::from(u)));
        }
        n.as_f64().map(Num::Float)
    }

    /// Numeric comparison for filters: exact for integers, IEEE otherwise (so `1 = 1.0`).
    fn partial(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    /// Total order for sorting. Rust's sort may panic on an inconsistent order, so integers that
    /// collide with a float after rounding are separated by kind rather than called equal.
    fn total(self, other: Num) -> Ordering {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a.cmp(&b),
            (a, b) => a.as_f64().total_cmp(&b.as_f64()).then(a.kind_rank().cmp(&b.kind_rank())),
        }
    }

    fn kind_rank(self) -> u8 {
        match self {
            Num::Int(_) => 0,
            Num::Float(_) => 1,
        }
    }
}

/// proto3 JSON writes int64/uint64 as strings, so a string of digits is really a number.
fn int_string(s: &str) -> Option<Num> {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || digits.len() > 38 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i128>().ok().map(Num::Int)
}

fn parse_number(s: &str) -> Option<Num> {
    if let Some(n) = int_string(s) {
        return Some(n);
    }
    // f64::from_str also takes "inf" and "NaN", which are words here, not numbers.
    let plausible = s.bytes().any(|b| b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
    if !plausible {
        return None;
    }
    s.parse::<f64>().ok().filter(|f| f.is_finite()).map(Num::Float)
}

fn parse_time(s: &str) -> Option<DateTime<FixedOffset>> {
    // Cheap pre-check: every RFC 3339 timestamp starts with a four-digit year.
    if s.len() < 20 || !s.bytes().take(4).all(|b| b.is_ascii_digit()) {
        return None;
    }
    DateTime::parse_from_rfc3339(s).ok()
}

/// A JSON value as it sorts: kinds in a fixed order (missing first), then within the kind.
enum SortKey<'a> {
    Missing,
    Bool(bool),
    Num(Num),
    Time(DateTime<FixedOffset>),
    Str(&'a str),
    Array,
    Object,
}

impl<'a> SortKey<'a> {
    fn of(value: Option<&'a Value>) -> SortKey<'a> {
        match value {
            None | Some(Value::Null) => SortKey::Missing,
            Some(Value::Bool(b)) => SortKey::Bool(*b),
            Some(Value::Number(n)) => Num::from_json(n).map_or(SortKey::Missing, SortKey::Num),
            Some(Value::String(s)) => {
                if let Some(n) = int_string(s) {
                    SortKey::Num(n)
                } else if let Some(t) = parse_time(s) {
                    SortKey::Time(t)
                } else {
                    SortKey::Str(s)
                }
            }
            Some(Value::Array(_)) => SortKey::Array,
            Some(Value::Object(_)) => SortKey::Object,
        }
    }

    fn rank(&self) -> u8 {
        match self {
            SortKey::Missing => 0,
            SortKey::Bool(_) => 1,
            SortKey::Num(_) => 2,
            SortKey::Time(_) => 3,
            SortKey::Str(_) => 4,
            SortKey::Array => 5,
            SortKey::Object => 6,
        }
    }

    fn cmp(&self, other: &SortKey<'_>) -> Ordering {
        match (self, other) {
            (SortKey::Bool(a), SortKey::Bool(b)) => a.cmp(b),
            (SortKey::Num(a), SortKey::Num(b)) => a.total(*b),
            (SortKey::Time(a), SortKey::Time(b)) => a.cmp(b),
            (SortKey::Str(a), SortKey::Str(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Filter: lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Has,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Has => ":",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    Minus,
    Not,
    And,
    Or,
    Cmp(Op),
    Word(String),
    /// A quoted string; `glob` holds the pieces between unescaped `*`s when there are any.
    Str {
        text: String,
        glob: Option<Vec<String>>,
    },
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    column: usize,
}

fn describe(tok: Option<&Token>) -> String {
    match tok.map(|t| &t.tok) {
        None => "the end of the filter".to_string(),
        Some(Tok::LParen) => "\"(\"".to_string(),
        Some(Tok::RParen) => "\")\"".to_string(),
        Some(Tok::Minus) => "\"-\"".to_string(),
        Some(Tok::Not) => "\"NOT\"".to_string(),
        Some(Tok::And) => "\"AND\"".to_string(),
        Some(Tok::Or) => "\"OR\"".to_string(),
        Some(Tok::Cmp(op)) => format!("\"{}\"", op.symbol()),
        Some(Tok::Word(w)) => format!("\"{}\"", shorten(w)),
        Some(Tok::Str { text, .. }) => format!("the string \"{}\"", shorten(text)),
    }
}

fn is_word_char(c: char) -> bool {
    !(c.is_whitespace() || matches!(c, '(' | ')' | '=' | '!' | '<' | '>' | ':' | '"' | '\'' | ','))
}

fn lex(chars: &[char]) -> Result<Vec<Token>, QueryError> {
    let mut out: Vec<Token> = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        let column = i + 1;
        let next = chars.get(i + 1).copied();
        // After a comparator everything up to the next delimiter is a value, so `state = NOT`
        // and `x > -5` mean what they say.
        let after_cmp = matches!(out.last(), Some(Token { tok: Tok::Cmp(_), .. }));
        let mut push = |tok: Tok, width: usize| {
            out.push(Token { tok, column });
            i += width;
        };
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => push(Tok::LParen, 1),
            ')' => push(Tok::RParen, 1),
            '=' => push(Tok::Cmp(Op::Eq), 1),
            ':' => push(Tok::Cmp(Op::Has), 1),
            '!' if next == Some('=') => push(Tok::Cmp(Op::Ne), 2),
            '!' => {
                return Err(syntax(
                    FILTER,
                    "unexpected \"!\"; negate with NOT or \"-\", or compare with \"!=\"",
                    Some(column),
                ))
            }
            '<' if next == Some('=') => push(Tok::Cmp(Op::Le), 2),
            '<' => push(Tok::Cmp(Op::Lt), 1),
            '>' if next == Some('=') => push(Tok::Cmp(Op::Ge), 2),
            '>' => push(Tok::Cmp(Op::Gt), 1),
            '"' | '\'' => {
                let (tok, end) = lex_string(chars, i, c)?;
                out.push(Token { tok, column });
                i = end;
            }
            ',' => return Err(syntax(FILTER, "unexpected \",\"; combine conditions with AND or OR", Some(column))),
            '-' if !after_cmp && !next.is_some_and(|n| n.is_ascii_digit()) => push(Tok::Minus, 1),
            _ => {
                let start = i;
                while chars.get(i).is_some_and(|&c| is_word_char(c)) {
                    i += 1;
                }
                let word: String = chars.get(start..i).unwrap_or_default().iter().collect();
                let tok = match word.as_str() {
                    "AND" if !after_cmp => Tok::And,
                    "OR" if !after_cmp => Tok::Or,
                    "NOT" if !after_cmp => Tok::Not,
                    _ => Tok::Word(word),
                };
                out.push(Token { tok, column });
            }
        }
    }
    Ok(out)
}

/// Lexes a string opening at `start`; returns the token and the index just past the closing quote.
fn lex_string(chars: &[char], start: usize, quote: char) -> Result<(Tok, usize), QueryError> {
    let unterminated =
        || syntax(FILTER, format!("unterminated string: no closing {quote} for the one opened"), Some(start + 1));
    let mut text = String::new();
    let mut piece = String::new();
    let mut pieces = Vec::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            None => return Err(unterminated()),
            Some(&c) if c == quote => break,
            Some('\\') => {
                let escaped = match chars.get(i + 1) {
                    None => return Err(unterminated()),
                    Some('n') => '\n',
                    Some('t') => '\t',
                    Some('r') => '\r',
                    // Anything else stands for itself: \" \' \\ and \* (a literal star).
                    Some(&other) => other,
                };
                text.push(escaped);
                piece.push(escaped);
                i += 2;
            }
            Some('*') => {
                text.push('*');
                pieces.push(std::mem::take(&mut piece));
                i += 1;
            }
            Some(&c) => {
                text.push(c);
                piece.push(c);
                i += 1;
            }
        }
    }
    let glob = if pieces.is_empty() {
        None
    } else {
        pieces.push(piece);
        Some(pieces)
    };
    Ok((Tok::Str { text, glob }, i + 1))
}

// ---------------------------------------------------------------------------------------------
// Filter: syntax tree and parser
// ---------------------------------------------------------------------------------------------

/// A value on the right of a comparator, with every reading of it worked out once at parse time.
#[derive(Debug, Clone)]
struct Literal {
    text: String,
    quoted: bool,
    glob: Option<Vec<String>>,
    num: Option<Num>,
    boolean: Option<bool>,
    time: Option<DateTime<FixedOffset>>,
}

impl Literal {
    fn new(text: String, quoted: bool, glob: Option<Vec<String>>) -> Literal {
        let boolean = if text.eq_ignore_ascii_case("true") {
            Some(true)
        } else if text.eq_ignore_ascii_case("false") {
            Some(false)
        } else {
            None
        };
        Literal { num: parse_number(&text), time: parse_time(&text), boolean, text, quoted, glob }
    }

    fn is_bare_star(&self) -> bool {
        self.text == "*" && self.glob.is_some()
    }
}

#[derive(Debug, Clone)]
struct Restriction {
    field: FieldPath,
    op: Op,
    value: Literal,
}

#[derive(Debug, Clone)]
enum Expr {
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
    Cmp(Restriction),
}

impl Expr {
    fn and(mut items: Vec<Expr>) -> Expr {
        if items.len() == 1 {
            if let Some(only) = items.pop() {
                return only;
            }
        }
        Expr::And(items)
    }

    fn or(mut items: Vec<Expr>) -> Expr {
        if items.len() == 1 {
            if let Some(only) = items.pop() {
                return only;
            }
        }
        Expr::Or(items)
    }

    fn eval(&self, resource: &Value) -> bool {
        match self {
            Expr::And(items) => items.iter().all(|e| e.eval(resource)),
            Expr::Or(items) => items.iter().any(|e| e.eval(resource)),
            Expr::Not(inner) => !inner.eval(resource),
            Expr::Cmp(r) => r.eval(resource),
        }
    }
}

/// Inside `field = (a OR b)` the leaves are bare values that borrow the field and comparator.
struct ValueContext {
    field: FieldPath,
    op: Op,
}

struct Parser<'a> {
    tokens: Vec<Token>,
    pos: usize,
    allowed: &'a [&'a str],
    depth: usize,
    terms: usize,
    end_column: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_tok(&self) -> Option<&Tok> {
        self.peek().map(|t| &t.tok)
    }

    fn column(&self) -> usize {
        self.peek().map_or(self.end_column, |t| t.column)
    }

    fn advance(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        token
    }

    fn starts_term(&self) -> bool {
        matches!(self.peek_tok(), Some(Tok::LParen | Tok::Not | Tok::Minus | Tok::Word(_) | Tok::Str { .. }))
    }

    fn enter(&mut self, column: usize) -> Result<(), QueryError> {
        self.depth += 1;
        if self.depth > MAX_FILTER_DEPTH {
            return Err(QueryError::TooDeep { max: MAX_FILTER_DEPTH, column });
        }
        Ok(())
    }

    fn count_term(&mut self, column: usize) -> Result<(), QueryError> {
        self.terms += 1;
        if self.terms > MAX_FILTER_TERMS {
            return Err(QueryError::TooManyTerms { max: MAX_FILTER_TERMS, column });
        }
        Ok(())
    }

    fn expect_term_after(&self, what: &str, column: usize) -> Result<(), QueryError> {
        if self.starts_term() {
            return Ok(());
        }
        Err(syntax(
            FILTER,
            format!("expected a condition after \"{what}\", found {}", describe(self.peek())),
            Some(column),
        ))
    }

    // AIP-160 precedence, loosest first: AND, then juxtaposition (also AND), then OR, then
    // NOT/-. So `a AND b OR c` is `a AND (b OR c)`.

    fn expression(&mut self, ctx: Option<&ValueContext>) -> Result<Expr, QueryError> {
        let mut items = vec![self.sequence(ctx)?];
        while let Some(Tok::And) = self.peek_tok() {
            let column = self.column();
            self.advance();
            self.expect_term_after("AND", column)?;
            items.push(self.sequence(ctx)?);
        }
        Ok(Expr::and(items))
    }

    fn sequence(&mut self, ctx: Option<&ValueContext>) -> Result<Expr, QueryError> {
        let mut items = vec![self.factor(ctx)?];
        while self.starts_term() {
            items.push(self.factor(ctx)?);
        }
        Ok(Expr::and(items))
    }

    fn factor(&mut self, ctx: Option<&ValueContext>) -> Result<Expr, QueryError> {
        let mut items = vec![self.term(ctx)?];
        while let Some(Tok::Or) = self.peek_tok() {
            let column = self.column();
            self.advance();
            self.expect_term_after("OR", column)?;
            items.push(self.term(ctx)?);
        }
        Ok(Expr::or(items))
    }

    fn term(&mut self, ctx: Option<&ValueContext>) -> Result<Expr, QueryError> {
        let negation = match self.peek_tok() {
            Some(Tok::Not) => Some("NOT"),
            Some(Tok::Minus) => Some("-"),
            _ => None,
        };
        let Some(word) = negation else {
            return self.simple(ctx);
        };
        let column = self.column();
        self.advance();
        self.enter(column)?;
        self.expect_term_after(word, column)?;
        let inner = self.term(ctx)?;
        self.depth -= 1;
        Ok(Expr::Not(Box::new(inner)))
    }

    fn simple(&mut self, ctx: Option<&ValueContext>) -> Result<Expr, QueryError> {
        let column = self.column();
        match (self.peek_tok(), ctx) {
            (Some(Tok::LParen), _) => {
                self.advance();
                self.enter(column)?;
                if let Some(Tok::RParen) = self.peek_tok() {
                    return Err(syntax(FILTER, "empty parentheses", Some(column)));
                }
                self.expect_term_after("(", column)?;
                let inner = self.expression(ctx)?;
                match self.peek_tok() {
                    Some(Tok::RParen) => {
                        self.advance();
                    }
                    None => return Err(syntax(FILTER, "unclosed \"(\": no \")\" matches the one", Some(column))),
                    Some(_) => {
                        return Err(syntax(
                            FILTER,
                            format!("expected \")\", AND or OR, found {}", describe(self.peek())),
                            Some(self.column()),
                        ))
                    }
                }
                self.depth -= 1;
                Ok(inner)
            }
            (Some(Tok::Word(_) | Tok::Str { .. }), Some(ctx)) => {
                let value = self.literal()?;
                self.count_term(column)?;
                Ok(Expr::Cmp(Restriction { field: ctx.field.clone(), op: ctx.op, value }))
            }
            (Some(Tok::Word(_)), None) => self.restriction(),
            (Some(Tok::Str { .. }), None) => Err(syntax(
                FILTER,
                format!(
                    "expected a field name, found {} (searching by bare value is not supported; write field = value)",
                    describe(self.peek())
                ),
                Some(column),
            )),
            (_, _) => {
                Err(syntax(FILTER, format!("expected a condition, found {}", describe(self.peek())), Some(column)))
            }
        }
    }

    fn literal(&mut self) -> Result<Literal, QueryError> {
        let column = self.column();
        match self.advance().map(|t| t.tok) {
            Some(Tok::Word(w)) => {
                let glob = w.contains('*').then(|| w.split('*').map(str::to_string).collect());
                Ok(Literal::new(w, false, glob))
            }
            Some(Tok::Str { text, glob }) => Ok(Literal::new(text, true, glob)),
            _ => Err(syntax(FILTER, "expected a value", Some(column))),
        }
    }

    fn restriction(&mut self) -> Result<Expr, QueryError> {
        let column = self.column();
        let Some(Token { tok: Tok::Word(raw), .. }) = self.advance() else {
            return Err(syntax(FILTER, "expected a field name", Some(column)));
        };
        let op_column = self.column();
        let Some(Tok::Cmp(op)) = self.peek_tok().cloned() else {
            let hint = if ["and", "or", "not"].contains(&raw.to_ascii_lowercase().as_str()) {
                " (AND, OR and NOT must be written in upper case)"
            } else {
                ""
            };
            return Err(syntax(
                FILTER,
                format!(
                    "expected a comparison (=, !=, <, <=, >, >= or :) after \"{}\"{hint}, found {}",
                    shorten(&raw),
                    describe(self.peek())
                ),
                Some(column),
            ));
        };
        self.advance();
        let field = resolve_field(FILTER, &raw, Some(column), self.allowed)?;
        match self.peek_tok() {
            Some(Tok::Word(_) | Tok::Str { .. }) => {
                let value = self.literal()?;
                self.count_term(column)?;
                Ok(Expr::Cmp(Restriction { field, op, value }))
            }
            Some(Tok::LParen) => self.simple(Some(&ValueContext { field, op })),
            _ => Err(syntax(
                FILTER,
                format!("expected a value after \"{}\", found {}", op.symbol(), describe(self.peek())),
                Some(op_column),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Filter: evaluation
// ---------------------------------------------------------------------------------------------

impl Restriction {
    fn eval(&self, resource: &Value) -> bool {
        let value = self.field.lookup(resource);
        let ordered = |accept: fn(Ordering) -> bool| compare_literal(value, &self.value).is_some_and(accept);
        match self.op {
            Op::Eq => equals(value, &self.value),
            Op::Ne => !equals(value, &self.value),
            Op::Lt => ordered(Ordering::is_lt),
            Op::Le => ordered(Ordering::is_le),
            Op::Gt => ordered(Ordering::is_gt),
            Op::Ge => ordered(Ordering::is_ge),
            Op::Has => has(value, &self.value),
        }
    }
}

/// Compares a resource value with a literal; `None` when they cannot be compared at all (a
/// number against a word, say), which makes `=` false, `!=` true and orderings false.
fn compare_literal(value: Option<&Value>, lit: &Literal) -> Option<Ordering> {
    match value {
        // proto3 omits fields holding their default, so a missing field is the literal's kind
        // of zero. A timestamp is a message, though, and an unset message has no value at all.
        None | Some(Value::Null) => {
            if lit.quoted {
                if lit.time.is_some() {
                    None
                } else {
                    Some("".cmp(lit.text.as_str()))
                }
            } else if let Some(b) = lit.boolean {
                Some(false.cmp(&b))
            } else if let Some(n) = lit.num {
                Num::Int(0).partial(n)
            } else if lit.time.is_some() {
                None
            } else {
                Some("".cmp(lit.text.as_str()))
            }
        }
        Some(Value::Bool(b)) => lit.boolean.map(|l| b.cmp(&l)),
        Some(Value::Number(n)) => Num::from_json(n)?.partial(lit.num?),
        Some(Value::String(s)) => {
            if let (Some(a), Some(b)) = (int_string(s), lit.num) {
                return a.partial(b);
            }
            if let (Some(b), Some(a)) = (lit.time, parse_time(s)) {
                return Some(a.cmp(&b));
            }
            Some(s.as_str().cmp(lit.text.as_str()))
        }
        Some(Value::Array(_) | Value::Object(_)) => None,
    }
}

fn equals(value: Option<&Value>, lit: &Literal) -> bool {
    if let Some(pieces) = &lit.glob {
        match value {
            None | Some(Value::Null) => return glob_match("", pieces),
            Some(Value::String(s)) => return glob_match(s, pieces),
            _ => {}
        }
    }
    compare_literal(value, lit) == Some(Ordering::Equal)
}

fn has(value: Option<&Value>, lit: &Literal) -> bool {
    if lit.is_bare_star() {
        // `field:*` asks whether the field is set, i.e. holds something other than its default.
        return match value {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
        };
    }
    match value {
        Some(Value::Array(items)) => items.iter().any(|item| equals(Some(item), lit)),
        // On a map, `labels:env` asks for the key.
        Some(Value::Object(map)) => match &lit.glob {
            Some(pieces) => map.keys().any(|k| glob_match(k, pieces)),
            None => map.contains_key(&lit.text),
        },
        _ => equals(value, lit),
    }
}

/// Matches `s` against the pieces of a pattern split at its `*`s.
fn glob_match(s: &str, pieces: &[String]) -> bool {
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
        return s.is_empty();
    };
    if pieces.len() == 1 {
        return s == first;
    }
    if s.len() < first.len() + last.len() || !s.starts_with(first.as_str()) || !s.ends_with(last.as_str()) {
        return false;
    }
    let Some(mut rest) = s.get(first.len()..s.len() - last.len()) else {
        return false;
    };
    // Leftmost matching of each middle piece is optimal when `*` is the only wildcard.
    for piece in pieces.iter().skip(1).take(pieces.len() - 2) {
        match rest.find(piece.as_str()) {
            Some(at) => rest = rest.get(at + piece.len()..).unwrap_or_default(),
            None => return false,
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Filter: public API
// ---------------------------------------------------------------------------------------------

/// A parsed AIP-160 filter over JSON resources.
#[derive(Debug, Clone)]
pub struct Filter {
    expr: Option<Expr>,
}

impl Filter {
    /// Parses `input`, accepting only the fields in `allowed` (camelCase, dotted for sub-fields;
    /// clients may also spell them in snake_case). Blank input matches everything.
    pub fn parse(input: &str, allowed: &[&str]) -> Result<Filter, QueryError> {
        check_len(FILTER, input)?;
        let chars: Vec<char> = input.chars().collect();
        let tokens = lex(&chars)?;
        if tokens.is_empty() {
            return Ok(Filter { expr: None });
        }
        let mut parser = Parser { tokens, pos: 0, allowed, depth: 0, terms: 0, end_column: chars.len() + 1 };
        let expr = parser.expression(None)?;
        if let Some(extra) = parser.peek() {
            let message = match extra.tok {
                Tok::RParen => "unmatched \")\"".to_string(),
                Tok::Cmp(op) => format!(
                    "unexpected \"{}\" (values containing spaces or any of ()=!<>: must be quoted)",
                    op.symbol()
                ),
                _ => format!("unexpected {}", describe(Some(extra))),
            };
            return Err(syntax(FILTER, message, Some(extra.column)));
        }
        Ok(Filter { expr: Some(expr) })
    }

    /// A filter that accepts every resource (what blank input parses to).
    pub fn match_all() -> Filter {
        Filter { expr: None }
    }

    /// Whether this filter accepts everything, so callers can skip evaluating it.
    pub fn is_match_all(&self) -> bool {
        self.expr.is_none()
    }

    pub fn matches(&self, resource: &Value) -> bool {
        self.expr.as_ref().is_none_or(|e| e.eval(resource))
    }
}

// ---------------------------------------------------------------------------------------------
// OrderBy
// ---------------------------------------------------------------------------------------------

/// One `orderBy` entry: a camelCase field path (as listed in `allowed`) and its direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderField {
    pub path: String,
    pub descending: bool,
}

/// A parsed AIP-132 `orderBy`, always finishing with ascending `name` so order is total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBy {
    fields: Vec<OrderField>,
    paths: Vec<FieldPath>,
}

impl OrderBy {
    /// Parses `input` such as `"createTime desc, displayName"`; blank input parses `default`.
    /// A field listed twice keeps its first direction.
    pub fn parse(input: &str, allowed: &[&str], default: &str) -> Result<OrderBy, QueryError> {
        check_len(ORDER_BY, input)?;
        let source = if input.trim().is_empty() { default } else { input };
        let mut order = OrderBy { fields: Vec::new(), paths: Vec::new() };
        if source.trim().is_empty() {
            return Ok(order);
        }
        for entry in source.split(',') {
            let mut words = entry.split_whitespace();
            let Some(raw) = words.next() else {
                return Err(syntax(
                    ORDER_BY,
                    format!("empty entry in \"{}\"; separate fields with single commas", shorten(source)),
                    None,
                ));
            };
            let descending = match words.next() {
                None => false,
                Some(d) if d.eq_ignore_ascii_case("asc") => false,
                Some(d) if d.eq_ignore_ascii_case("desc") => true,
                Some(other) => {
                    return Err(syntax(
                        ORDER_BY,
                        format!(
                            "expected \"asc\" or \"desc\" after \"{}\", found \"{}\"",
                            shorten(raw),
                            shorten(other)
                        ),
                        None,
                    ))
                }
            };
            if let Some(extra) = words.next() {
                return Err(syntax(
                    ORDER_BY,
                    format!(
                        "unexpected \"{}\" after \"{}\"; separate fields with commas",
                        shorten(extra),
                        shorten(entry.trim())
                    ),
                    None,
                ));
            }
            let path = resolve_field(ORDER_BY, raw, None, allowed)?;
            if order.paths.contains(&path) {
                continue;
            }
            order.fields.push(OrderField { path: path.dotted.clone(), descending });
            order.paths.push(path);
        }
        Ok(order)
    }

    /// The requested fields, without the implicit trailing `name`.
    pub fn fields(&self) -> &[OrderField] {
        &self.fields
    }

    /// Orders two resources: each field in turn (missing values first, reversed by `desc`), then
    /// `name` ascending.
    pub fn compare(&self, a: &Value, b: &Value) -> Ordering {
        for (field, path) in self.fields.iter().zip(&self.paths) {
            let ordering = SortKey::of(path.lookup(a)).cmp(&SortKey::of(path.lookup(b)));
            let ordering = if field.descending { ordering.reverse() } else { ordering };
            if ordering.is_ne() {
                return ordering;
            }
        }
        let name = |v: &Value| v.get("name").and_then(Value::as_str).map(str::to_string);
        name(a).cmp(&name(b))
    }

    /// Sorts `resources` in place by [`OrderBy::compare`].
    pub fn sort(&self, resources: &mut [Value]) {
        resources.sort_by(|a, b| self.compare(a, b));
    }
}

/// The canonical spelling, e.g. `createTime desc,displayName`; equal orderings print equally,
/// which makes it usable in page-token checks.
impl fmt::Display for OrderBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&field.path)?;
            if field.descending {
                f.write_str(" desc")?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Read masks
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct MaskNode {
    /// The whole subtree is kept.
    all: bool,
    children: BTreeMap<String, MaskNode>,
}

impl MaskNode {
    fn insert(&mut self, path: &str) {
        let mut node = self;
        for segment in path.split('.') {
            if node.all {
                return;
            }
            node = node.children.entry(segment.to_string()).or_default();
        }
        node.all = true;
        node.children.clear();
    }

    /// Prunes `value` to this node; returns whether anything of it survives.
    fn prune(&self, value: &mut Value) -> bool {
        if self.all {
            return true;
        }
        match value {
            Value::Object(map) => {
                map.retain(|key, child| self.children.get(key).is_some_and(|node| node.prune(child)));
                true
            }
            // A mask reaches through repeated messages into each element.
            Value::Array(items) => {
                for item in items.iter_mut() {
                    if item.is_object() {
                        self.prune(item);
                    }
                }
                true
            }
            // The mask asks for a sub-field of something that has none.
            _ => false,
        }
    }
}

/// Keeps only the fields `mask` names (comma-separated paths, snake_case or camelCase, dotted for
/// sub-fields) plus `name`. Blank or `*` keeps everything. Paths naming absent fields are not
/// errors: proto3 omits empty fields, so their absence says nothing about the mask.
pub fn apply_read_mask(resource: &mut Value, mask: &str) -> Result<(), QueryError> {
    check_len(READ_MASK, mask)?;
    if mask.trim().is_empty() {
        return Ok(());
    }
    let mut root = MaskNode::default();
    for entry in mask.split(',') {
        let path = entry.trim();
        if path == "*" {
            return Ok(());
        }
        validate_path(READ_MASK, path, None)?;
        root.insert(path);
        let camel = camelize_path(path);
        if camel != path {
            root.insert(&camel);
        }
    }
    root.insert("name");
    root.prune(resource);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failed unwrap is a failed test, which is what we want.
mod tests {
    use super::*;
    use serde_json::json;

    const ALLOWED: &[&str] = &[
        "name",
        "displayName",
        "state",
        "kind",
        "createTime",
        "public",
        "contextLength",
        "parameterCount",
        "peftDetails.baseModel",
        "peftDetails.r",
        "tags",
        "labels",
        "score",
    ];

    fn model() -> Value {
        json!({
            "name": "accounts/a/models/m-lora",
            "displayName": "My Model",
            "state": "READY",
            "kind": "HF_PEFT_ADDON",
            "createTime": "2026-01-01T00:00:00Z",
            "peftDetails": {"r": 8, "baseModel": "accounts/fireworks/models/llama"},
            "public": true,
            "contextLength": 2048,
            "parameterCount": "135000000",
            "tags": ["chat", "small"],
            "labels": {"env": "prod"},
            "score": 0.5
        })
    }

    fn sparse() -> Value {
        json!({"name": "accounts/a/models/empty"})
    }

    fn matches(filter: &str, resource: &Value) -> bool {
        match Filter::parse(filter, ALLOWED) {
            Ok(f) => f.matches(resource),
            Err(e) => panic!("{filter:?} failed to parse: {e}"),
        }
    }

    fn error(filter: &str) -> String {
        match Filter::parse(filter, ALLOWED) {
            Ok(f) => panic!("{filter:?} parsed unexpectedly: {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_filter_matches_everything() {
        for input in ["", "   ", "\t\n"] {
            let f = Filter::parse(input, ALLOWED).unwrap();
            assert!(f.is_match_all());
            assert!(f.matches(&model()));
            assert!(f.matches(&json!({})));
        }
        assert!(Filter::match_all().matches(&sparse()));
    }

    #[test]
    fn comparisons() {
        let m = model();
        assert!(matches("state = READY", &m));
        assert!(matches("state=READY", &m));
        assert!(!matches("state = FAILED", &m));
        assert!(matches("state != FAILED", &m));
        assert!(!matches("state != READY", &m));
        assert!(matches("contextLength > 1024", &m));
        assert!(matches("contextLength >= 2048", &m));
        assert!(!matches("contextLength > 2048", &m));
        assert!(matches("contextLength <= 2048", &m));
        assert!(matches("contextLength < 4096", &m));
        assert!(matches("contextLength = 2048.0", &m));
        assert!(matches("score < 1", &m));
        assert!(matches("score = 0.5", &m));
        assert!(matches("score > -1.5", &m));
        assert!(matches("displayName < \"N\"", &m));
        assert!(matches("displayName > 'A'", &m));
        assert!(matches("public = true", &m));
        assert!(!matches("public = false", &m));
        assert!(matches("public != false", &m));
        assert!(matches("public = TRUE", &m));
        // A number never equals a word.
        assert!(!matches("contextLength = big", &m));
        assert!(matches("contextLength != big", &m));
        assert!(!matches("contextLength < big", &m));
    }

    #[test]
    fn has_operator() {
        let m = model();
        assert!(matches("tags:chat", &m));
        assert!(matches("tags:\"small\"", &m));
        assert!(!matches("tags:large", &m));
        assert!(matches("state:READY", &m));
        assert!(!matches("state:FAILED", &m));
        assert!(matches("labels:env", &m));
        assert!(!matches("labels:team", &m));
        assert!(matches("tags:sm*", &m));
        // Presence.
        assert!(matches("displayName:*", &m));
        assert!(matches("tags:*", &m));
        assert!(!matches("displayName:*", &sparse()));
        assert!(!matches("tags:*", &json!({"tags": []})));
        assert!(matches("tags:(large OR chat)", &m));
    }

    #[test]
    fn missing_fields_are_proto_defaults() {
        let s = sparse();
        assert!(matches("public = false", &s));
        assert!(matches("contextLength = 0", &s));
        assert!(matches("displayName = \"\"", &s));
        assert!(matches("displayName = ''", &s));
        assert!(!matches("state = READY", &s));
        assert!(matches("state != READY", &s));
        assert!(!matches("public = true", &s));
        assert!(!matches("contextLength > 0", &s));
        assert!(!matches("createTime > \"2020-01-01T00:00:00Z\"", &s));
        assert!(!matches("createTime < \"2020-01-01T00:00:00Z\"", &s));
        assert!(!matches("peftDetails.baseModel = x", &s));
        assert!(matches("peftDetails.r = 0", &s));
        assert!(matches("public = false", &json!({"public": null})));
    }

    #[test]
    fn precedence_or_binds_tighter_than_and() {
        // a AND b OR c == a AND (b OR c)
        let f = "state = FAILED AND kind = X OR public = true";
        assert!(!matches(f, &model()));
        assert!(matches("(state = FAILED AND kind = X) OR public = true", &model()));
        assert!(matches("public = true OR state = FAILED AND state = READY", &model()));
        // Juxtaposition is AND and sits between AND and OR.
        assert!(matches("state = READY public = true", &model()));
        assert!(!matches("state = READY public = false", &model()));
        assert!(matches("state = READY public = false OR public = true", &model()));
        assert!(!matches("state = FAILED public = false OR public = true", &model()));
        assert!(matches("state = READY AND public = true AND contextLength = 2048", &model()));
    }

    #[test]
    fn negation() {
        let m = model();
        assert!(matches("NOT state = FAILED", &m));
        assert!(!matches("NOT state = READY", &m));
        assert!(matches("-state = FAILED", &m));
        assert!(matches("- state = FAILED", &m));
        assert!(!matches("-state = READY", &m));
        assert!(matches("NOT NOT state = READY", &m));
        assert!(matches("NOT (state = FAILED OR public = false)", &m));
        assert!(!matches("-(state = READY OR public = false)", &m));
        assert!(matches("NOT(state = FAILED)", &m));
        // NOT applies to one term, not to the OR group around it.
        assert!(matches("NOT state = READY OR public = true", &m));
        // A value may itself look like a keyword or start with "-".
        assert!(matches("displayName = NOT", &json!({"displayName": "NOT"})));
        assert!(matches("displayName = -x", &json!({"displayName": "-x"})));
    }

    #[test]
    fn parentheses_and_value_groups() {
        let m = model();
        assert!(matches("(state = READY)", &m));
        assert!(matches("((state = READY))", &m));
        assert!(matches("(state = FAILED OR state = READY) AND public = true", &m));
        assert!(matches("state = (FAILED OR READY)", &m));
        assert!(!matches("state = (FAILED OR DELETING)", &m));
        assert!(matches("state = (READY AND READY)", &m));
        assert!(!matches("state = (READY FAILED)", &m));
        assert!(matches("contextLength > (100 OR 10000)", &m));
    }

    #[test]
    fn quoting_and_escapes() {
        let r = json!({"name": "n", "displayName": "say \"hi\" it's \\ ok"});
        assert!(matches(r#"displayName = "say \"hi\" it's \\ ok""#, &r));
        assert!(matches(r#"displayName = 'say "hi" it\'s \\ ok'"#, &r));
        assert!(!matches(r#"displayName = "say""#, &r));
        let spaced = json!({"displayName": "a b = c (d) : e"});
        assert!(matches("displayName = \"a b = c (d) : e\"", &spaced));
        let tab = json!({"displayName": "a\tb\nc"});
        assert!(matches(r#"displayName = "a\tb\nc""#, &tab));
        // Quoted keywords are plain values.
        assert!(matches("displayName = \"AND\"", &json!({"displayName": "AND"})));
    }

    #[test]
    fn wildcards() {
        let m = model();
        assert!(matches("name = \"accounts/a/models/*-lora\"", &m));
        assert!(matches("name = accounts/a/models/*", &m));
        assert!(matches("name = \"*\"", &m));
        assert!(matches("name = \"acc*/*/m*\"", &m));
        assert!(matches("name = \"*lora\"", &m));
        assert!(!matches("name = \"*-base\"", &m));
        assert!(!matches("name = \"accounts/b/*\"", &m));
        assert!(matches("name != \"accounts/b/*\"", &m));
        // Prefix and suffix must not overlap.
        assert!(!matches("displayName = \"ab*ba\"", &json!({"displayName": "aba"})));
        assert!(matches("displayName = \"ab*ba\"", &json!({"displayName": "abba"})));
        assert!(matches("displayName = \"a*b*c\"", &json!({"displayName": "axxbyyc"})));
        assert!(!matches("displayName = \"a*b*c\"", &json!({"displayName": "axxcyyb"})));
        // An escaped star is literal.
        let starred = json!({"displayName": "a*c"});
        assert!(matches(r#"displayName = "a\*c""#, &starred));
        assert!(!matches(r#"displayName = "a\*c""#, &json!({"displayName": "abc"})));
        assert!(matches(r#"displayName = "a*c""#, &json!({"displayName": "abc"})));
        // Wildcards are for "=" only; ">" compares the literal text.
        assert!(!matches("name > \"z*\"", &m));
    }

    #[test]
    fn numeric_strings_and_timestamps() {
        let m = model();
        assert!(matches("parameterCount = 135000000", &m));
        assert!(matches("parameterCount > 100000000", &m));
        assert!(matches("parameterCount < 1.5e9", &m));
        assert!(!matches("parameterCount < 99999999", &m));
        // Lexicographically "135000000" < "9", numerically it is not.
        assert!(matches("parameterCount > 9", &m));
        let big = json!({"parameterCount": "9223372036854775807"});
        assert!(matches("parameterCount = 9223372036854775807", &big));
        assert!(!matches("parameterCount = 9223372036854775806", &big));

        assert!(matches("createTime = \"2026-01-01T00:00:00Z\"", &m));
        assert!(matches("createTime = \"2026-01-01T01:00:00+01:00\"", &m));
        assert!(matches("createTime = \"2026-01-01T00:00:00.000Z\"", &m));
        assert!(matches("createTime > \"2025-12-31T23:59:59.5Z\"", &m));
        assert!(!matches("createTime < \"2026-01-01T00:30:00+00:30\"", &m));
        assert!(matches("createTime < \"2026-01-01T00:00:00-00:01\"", &m));
        // Not a timestamp: plain string comparison.
        assert!(matches("createTime > \"2025\"", &m));
    }

    #[test]
    fn snake_and_camel_case() {
        let m = model();
        assert!(matches("display_name = \"My Model\"", &m));
        assert!(matches("displayName = \"My Model\"", &m));
        assert!(matches("peft_details.base_model = \"accounts/fireworks/models/llama\"", &m));
        assert!(matches("peftDetails.baseModel = accounts/fireworks/models/*", &m));
        assert!(matches("peft_details.r = 8", &m));
        assert!(matches("context_length > 1", &m));
    }

    #[test]
    fn unknown_fields() {
        let e = error("foo = 1");
        assert!(e.starts_with("filter: unknown field \"foo\" (at column 1)"), "{e}");
        assert!(e.contains("displayName"), "{e}");
        let e = error("state = READY AND peftDetails.rank = 3");
        assert!(e.contains("unknown field \"peftDetails.rank\" (at column 19)"), "{e}");
        // Sub-fields are only allowed where listed.
        assert!(error("peftDetails = x").contains("unknown field \"peftDetails\""));
        // Too many fields to list: the message stays short.
        let many: Vec<String> = (0..100).map(|i| format!("field{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let Err(e) = Filter::parse("nope = 1", &many) else { panic!("accepted an unknown field") };
        assert_eq!(e.to_string(), "filter: unknown field \"nope\" (at column 1)");
        let Err(e) = Filter::parse("nope = 1", &[]) else { panic!("accepted an unknown field") };
        assert!(e.to_string().contains("no fields are accepted"), "{e}");
        // Long garbage is not echoed in full.
        let long = format!("{} = 1", "x".repeat(500));
        assert!(error(&long).len() < 300);
        assert!(error("state/x = 1").contains("invalid field path"));
        assert!(error("state..x = 1").contains("empty segment"));
    }

    #[test]
    fn malformed_filters() {
        let cases = [
            ("state = ", "expected a value after \"=\", found the end of the filter at column 7"),
            ("state =", "expected a value after \"=\""),
            ("state = READY AND", "expected a condition after \"AND\""),
            ("AND state = READY", "expected a condition, found \"AND\" at column 1"),
            ("state = READY OR", "expected a condition after \"OR\""),
            ("state = READY OR AND public = true", "after \"OR\", found \"AND\""),
            ("NOT", "expected a condition after \"NOT\""),
            ("-", "expected a condition after \"-\""),
            ("(state = READY", "unclosed \"(\""),
            ("((state = READY)", "unclosed \"(\""),
            ("state = READY)", "unmatched \")\" at column 14"),
            ("()", "empty parentheses"),
            ("(state = READY public)", "expected a comparison"),
            ("state", "expected a comparison (=, !=, <, <=, >, >= or :) after \"state\""),
            ("state READY", "after \"state\""),
            ("state = READY and public = true", "must be written in upper case"),
            ("state = \"READY", "unterminated string"),
            ("state = 'READY", "unterminated string"),
            ("state = \"READY\\", "unterminated string"),
            ("state == READY", "expected a value after \"=\""),
            ("state ! READY", "unexpected \"!\""),
            ("state = READY, public = true", "unexpected \",\""),
            ("\"READY\"", "searching by bare value is not supported"),
            ("createTime > 2026-01-01T00:00:00Z", "must be quoted) at column 27"),
            ("state = (READY", "unclosed \"(\""),
            ("state = (READY = x)", "expected \")\", AND or OR, found \"=\""),
            ("state = ()", "empty parentheses"),
        ];
        for (input, want) in cases {
            let got = error(input);
            assert!(got.starts_with("filter: "), "{input:?}: {got}");
            assert!(got.contains(want), "{input:?}: {got:?} lacks {want:?}");
        }
        assert_eq!(
            error("state = READY AND displayName ="),
            "filter: expected a value after \"=\", found the end of the filter at column 31"
        );
        assert_eq!(
            error("state = \"READY"),
            "filter: unterminated string: no closing \" for the one opened at column 9"
        );
    }

    #[test]
    fn limits() {
        // Deep parentheses error out instead of overflowing the stack.
        for depth in [33, 100, 1000] {
            let deep = format!("{}state = READY{}", "(".repeat(depth), ")".repeat(depth));
            if deep.len() <= MAX_QUERY_LEN {
                let e = Filter::parse(&deep, ALLOWED).unwrap_err();
                assert!(matches!(e, QueryError::TooDeep { .. }), "{e}");
                assert_eq!(e.to_string(), "filter: nested more than 32 levels deep at column 33");
            }
        }
        let unbalanced = "(".repeat(2000);
        assert!(matches!(Filter::parse(&unbalanced, ALLOWED), Err(QueryError::TooDeep { .. })));
        let nots = format!("{}state = READY", "NOT ".repeat(40));
        assert!(matches!(Filter::parse(&nots, ALLOWED), Err(QueryError::TooDeep { .. })));
        let minuses = format!("{}state = READY", "-".repeat(1500));
        assert!(matches!(Filter::parse(&minuses, ALLOWED), Err(QueryError::TooDeep { .. })));
        // Exactly at the limit is fine.
        let ok = format!("{}state = READY{}", "(".repeat(32), ")".repeat(32));
        assert!(matches(&ok, &model()));

        let terms = |n: usize| vec!["state = READY"; n].join(" AND ");
        assert!(matches(&terms(64), &model()));
        let e = Filter::parse(&terms(65), ALLOWED).unwrap_err();
        assert!(matches!(e, QueryError::TooManyTerms { max: 64, .. }), "{e}");
        let values = format!("state = ({})", vec!["READY"; 65].join(" OR "));
        assert!(matches!(Filter::parse(&values, ALLOWED), Err(QueryError::TooManyTerms { .. })));

        let long = format!("displayName = \"{}\"", "x".repeat(MAX_QUERY_LEN));
        assert_eq!(Filter::parse(&long, ALLOWED).unwrap_err().to_string(), "filter: longer than 2048 characters");
        // Characters, not bytes, are counted.
        let wide = format!("displayName = \"{}\"", "é".repeat(2000));
        assert!(Filter::parse(&wide, ALLOWED).is_ok());
        assert!(Filter::parse(&"é".repeat(1_000_000), ALLOWED).is_err());
    }

    #[test]
    fn columns_count_characters() {
        let e = error("displayName = \"ééé\" AND nope = 1");
        assert!(e.contains("(at column 25)"), "{e}");
    }

    #[test]
    fn glob_edge_cases() {
        let p = |s: &str| s.split('*').map(str::to_string).collect::<Vec<_>>();
        assert!(glob_match("", &p("*")));
        assert!(glob_match("anything", &p("*")));
        assert!(glob_match("ab", &p("a**b")));
        assert!(!glob_match("a", &p("a*a")));
        assert!(glob_match("aa", &p("a*a")));
        assert!(glob_match("ééxé", &p("é*é")));
        assert!(!glob_match("x", &[]));
        assert!(glob_match("", &[]));
    }

    fn names(order: &OrderBy, mut items: Vec<Value>) -> Vec<String> {
        order.sort(&mut items);
        items.iter().map(|v| v["name"].as_str().unwrap_or_default().to_string()).collect()
    }

    #[test]
    fn order_by_parsing() {
        let o = OrderBy::parse("displayName,create_time desc, state asc", ALLOWED, "").unwrap();
        assert_eq!(
            o.fields(),
            &[
                OrderField { path: "displayName".into(), descending: false },
                OrderField { path: "createTime".into(), descending: true },
                OrderField { path: "state".into(), descending: false },
            ]
        );
        assert_eq!(o.to_string(), "displayName,createTime desc,state");
        let o = OrderBy::parse("  ", ALLOWED, "createTime desc").unwrap();
        assert_eq!(o.to_string(), "createTime desc");
        let o = OrderBy::parse("", ALLOWED, "").unwrap();
        assert!(o.fields().is_empty());
        let o = OrderBy::parse("peft_details.base_model DESC", ALLOWED, "").unwrap();
        assert_eq!(o.to_string(), "peftDetails.baseModel desc");
        let o = OrderBy::parse("state desc, state", ALLOWED, "").unwrap();
        assert_eq!(o.to_string(), "state desc");

        let err = |s: &str| OrderBy::parse(s, ALLOWED, "").unwrap_err().to_string();
        assert!(err("bar").starts_with("orderBy: unknown field \"bar\";"), "{}", err("bar"));
        assert!(err("state upward").contains("expected \"asc\" or \"desc\" after \"state\""));
        assert!(err("state desc extra").contains("separate fields with commas"));
        assert!(err("state,,name").contains("empty entry"));
        assert!(err("state,").contains("empty entry"));
        assert!(err("state-x").contains("invalid field path"));
        assert!(err(&"a".repeat(3000)).contains("longer than 2048"));
    }

    #[test]
    fn order_by_sorting() {
        let items = vec![
            json!({"name": "d", "state": "READY", "contextLength": 4096, "createTime": "2026-01-02T00:00:00Z"}),
            json!({"name": "b", "state": "FAILED", "contextLength": 512, "createTime": "2026-01-01T12:00:00+13:00"}),
            json!({"name": "a", "state": "READY", "createTime": "2026-01-01T00:00:00Z"}),
            json!({"name": "c", "state": "READY", "contextLength": 4096}),
        ];
        let by = |s: &str| OrderBy::parse(s, ALLOWED, "").unwrap();
        // Missing sorts first; ties break on name.
        assert_eq!(names(&by("contextLength"), items.clone()), ["a", "b", "c", "d"]);
        assert_eq!(names(&by("contextLength desc"), items.clone()), ["c", "d", "b", "a"]);
        assert_eq!(names(&by("state desc, contextLength"), items.clone()), ["a", "c", "d", "b"]);
        // Timestamps compare as instants: b's is 2025-12-31T23:00Z.
        assert_eq!(names(&by("createTime"), items.clone()), ["c", "b", "a", "d"]);
        assert_eq!(names(&by(""), items.clone()), ["a", "b", "c", "d"]);
        let o = by("state");
        assert_eq!(o.compare(&items[0], &items[0]), Ordering::Equal);
        assert_eq!(o.compare(&items[2], &items[3]), Ordering::Less);

        // int64 as strings sort numerically.
        let counts = vec![
            json!({"name": "x", "parameterCount": "9"}),
            json!({"name": "y", "parameterCount": "135000000"}),
            json!({"name": "z", "parameterCount": "-1"}),
        ];
        assert_eq!(names(&by("parameterCount"), counts), ["z", "x", "y"]);
        let flags =
            vec![json!({"name": "x", "public": true}), json!({"name": "y"}), json!({"name": "z", "public": false})];
        assert_eq!(names(&by("public desc"), flags), ["x", "z", "y"]);
    }

    #[test]
    fn order_by_is_total_on_mixed_values() {
        // Sorting must not panic however odd the data; every pair must compare consistently.
        let values = [
            json!(null),
            json!(true),
            json!(1),
            json!(1.0),
            json!(9007199254740993_i64),
            json!(9007199254740992.0),
            json!("9007199254740992"),
            json!("10"),
            json!("9"),
            json!("1a"),
            json!("2026-01-01T00:00:00Z"),
            json!("2026-01-01T01:00:00+01:00"),
            json!([1]),
            json!({"a": 1}),
        ];
        let items: Vec<Value> =
            values.iter().enumerate().map(|(i, v)| json!({"name": format!("n{i:02}"), "score": v})).collect();
        let o = OrderBy::parse("score", ALLOWED, "").unwrap();
        for a in &items {
            for b in &items {
                assert_eq!(o.compare(a, b), o.compare(b, a).reverse());
                for c in &items {
                    if o.compare(a, b).is_le() && o.compare(b, c).is_le() {
                        assert!(o.compare(a, c).is_le(), "{a} {b} {c}");
                    }
                }
            }
        }
        let mut sorted = items.clone();
        o.sort(&mut sorted);
        assert_eq!(sorted[0]["score"], json!(null));
    }

    #[test]
    fn read_masks() {
        let mut all = model();
        apply_read_mask(&mut all, "").unwrap();
        assert_eq!(all, model());
        apply_read_mask(&mut all, "*").unwrap();
        assert_eq!(all, model());
        apply_read_mask(&mut all, " * ").unwrap();
        assert_eq!(all, model());

        let mut m = model();
        apply_read_mask(&mut m, "display_name, state").unwrap();
        assert_eq!(m, json!({"name": "accounts/a/models/m-lora", "displayName": "My Model", "state": "READY"}));
        // Key order of the original is kept.
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "displayName", "state"]);

        let mut m = model();
        apply_read_mask(&mut m, "peftDetails").unwrap();
        assert_eq!(m["peftDetails"], model()["peftDetails"]);
        assert!(m.get("state").is_none());

        let mut m = model();
        apply_read_mask(&mut m, "peft_details.base_model,peftDetails.nothing").unwrap();
        assert_eq!(
            m,
            json!({
                "name": "accounts/a/models/m-lora",
                "peftDetails": {"baseModel": "accounts/fireworks/models/llama"}
            })
        );

        // A broader path wins over a narrower one, whatever the order.
        let mut m = model();
        apply_read_mask(&mut m, "peftDetails.r,peftDetails").unwrap();
        assert_eq!(m["peftDetails"], model()["peftDetails"]);

        // Unknown or absent fields are fine; name survives anyway.
        let mut m = model();
        apply_read_mask(&mut m, "noSuchField,state.sub").unwrap();
        assert_eq!(m, json!({"name": "accounts/a/models/m-lora"}));

        // Masks reach into repeated messages.
        let mut r = json!({"name": "n", "items": [{"a": 1, "b": 2}, {"a": 3}], "c": 1});
        apply_read_mask(&mut r, "items.a").unwrap();
        assert_eq!(r, json!({"name": "n", "items": [{"a": 1}, {"a": 3}]}));

        for bad in ["a,,b", "a.", ".a", "a..b", "a-b", "a b", "a,", "a/*"] {
            let mut m = model();
            let e = apply_read_mask(&mut m, bad).unwrap_err().to_string();
            assert!(e.starts_with("readMask: invalid field path"), "{bad:?}: {e}");
            assert_eq!(m, model(), "{bad:?} changed the resource");
        }
        let mut m = model();
        assert!(apply_read_mask(&mut m, &"a".repeat(3000)).is_err());
        let deep = vec!["a"; 40].join(".");
        assert!(apply_read_mask(&mut model(), &deep).is_err());
    }
}
