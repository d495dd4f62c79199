//! Constrained decoding: a request may ask that its output follow a grammar (any JSON object,
//! a JSON schema, or a Lark grammar), and then every token it samples is one the grammar
//! allows at that point, so the whole output parses.
//!
//! The grammar machinery is llguidance's (the engine llama.cpp and vLLM use): it compiles a
//! grammar against the tokenizer's vocabulary once per request and, before each token,
//! computes the set of tokens that keep the output valid. hearth masks the logits with that
//! set before its own sampler runs, so temperature, top-p, penalties and seeds work as they do
//! without a grammar, over the allowed tokens only.
//!
//! The vocabulary is turned into llguidance's token trie once per engine, on the first
//! constrained request (a few tens of milliseconds), never for engines that get none.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// A JSON value valid against this JSON schema.
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect, which can embed JSON schemas (`%json{...}`):
    /// how tool calls are constrained.
    Lark(String),
    /// A grammar in llama.cpp's GBNF (see `gbnf`).
    Gbnf(String),
}

/// How JSON is laid out unless a schema's own `x-guidance` says otherwise: one space after
/// `,` and `:` and no other whitespace. Flexible whitespace would let a small model emit
/// newlines until it runs out of tokens.
fn layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl Grammar {
    fn top_level(&self) -> Result<TopLevelGrammar> {
        let with_layout = |mut schema: Value| -> Result<TopLevelGrammar> {
            let Some(obj) = schema.as_object_mut() else {
                return match schema {
                    // `true` is the schema every value satisfies; `false` none.
                    Value::Bool(true) => Ok(TopLevelGrammar::from_json_schema(json!({"x-guidance": layout()}))),
                    _ => Err(EngineError::InvalidRequest(
                        "a JSON schema is an object (or `true`); this one is not".into(),
                    )),
                };
            };
            let mut opts = layout();
            if let Some(Value::Object(own)) = obj.get("x-guidance") {
                for (k, v) in own {
                    opts[k] = v.clone();
                }
            }
            obj.insert("x-guidance".into(), opts);
            Ok(TopLevelGrammar::from_json_schema(schema))
        };
        match self {
            Grammar::JsonObject => with_layout(json!({"type": "object"})),
            Grammar::JsonSchema(s) => with_layout(s.clone()),
            Grammar::Lark(g) => Ok(TopLevelGrammar::from_lark(g.clone())),
            Grammar::Gbnf(g) => crate::gbnf::to_lark(g)
                .map(TopLevelGrammar::from_lark)
                .map_err(|e| EngineError::InvalidRequest(format!("the GBNF grammar: {e}"))),
        }
    }
}

/// One request's grammar state: which tokens may come next, advanced by each sampled token.
pub struct Constraint {
    /// Boxed: a matcher is large, and requests travel by value through the engine's queue.
    matcher: Box<Matcher>,
    /// The tokenizer's end-of-sequence ids; the trie knows one, the model may end with any.
    eos: Arc<[u32]>,
    trie_eos: TokenId,
    /// The next mask, computed ahead by `prepare`.
    ready: Option<anyhow::Result<llguidance::toktrie::SimpleVob>>,
}

impl Constraint {
    /// Computes the mask for the next token ahead of `mask`, which then takes it: the engine
    /// computes a step's masks side by side, each sequence's on its own thread.
    pub fn prepare(&mut self) {
        if self.ready.is_none() {
            self.ready = Some(self.matcher.compute_mask_or_eos());
        }
    }

    /// Sets every logit the grammar does not allow now to -inf. Where the grammar is complete
    /// the end-of-sequence tokens stay allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        self.prepare();
        let allowed =
            self.ready.take().unwrap_or_else(|| Err(anyhow::anyhow!("no mask"))).map_err(|e| self.failure(e))?;
        let eos_ok = allowed.is_allowed(self.trie_eos);
        let eos_logits: Vec<(usize, f32)> =
            self.eos.iter().filter_map(|&e| logits.get(e as usize).map(|&l| (e as usize, l))).collect();
        // A word of the bit set at a time: most of a vocabulary is usually disallowed.
        let n = allowed.len().min(logits.len());
        allowed.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        logits[n..].fill(f32::NEG_INFINITY);
        for (e, l) in eos_logits {
            logits[e] = if eos_ok { l } else { f32::NEG_INFINITY };
        }
        Ok(())
    }

    /// Advances the grammar by a sampled token (one `mask` allowed).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        let token = if self.eos.contains(&token) { self.trie_eos } else { token };
        self.matcher.consume_token(token).map_err(|e| self.failure(e))
    }

    /// The grammar allows nothing more: the output is complete.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    fn failure(&self, e: anyhow::Error) -> EngineError {
        let why = self.matcher.get_error().unwrap_or_else(|| e.to_string());
        EngineError::Internal(format!("constrained decoding failed: {why}"))
    }
}

/// Compiles grammars for one engine's vocabulary.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    /// The model's vocabulary size: logits rows may be longer than the tokenizer's vocabulary.
    vocab_size: usize,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Grammars {
        Grammars { tokenizer, vocab_size, factory: OnceLock::new() }
    }

    /// Compiles a request's grammar. A grammar that is invalid, or uses what llguidance does
    /// not support (it names the keyword), is the request's mistake: `InvalidRequest`.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let factory = self.factory.get_or_init(|| factory(&self.tokenizer, self.vocab_size)).as_ref().map_err(|e| {
            EngineError::InvalidRequest(format!("constrained decoding is not available for this model: {e}"))
        })?;
        let parser = factory
            .create_parser(grammar.top_level()?)
            .map_err(|e| EngineError::InvalidRequest(format!("the grammar cannot be used: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!("the grammar cannot be used: {e}")));
        }
        let eos: Arc<[u32]> = self.tokenizer.eos_ids().into();
        Ok(Constraint { matcher: Box::new(matcher), ready: None, trie_eos: eos.first().copied().unwrap_or(0), eos })
    }
}

/// llguidance's view of the tokenizer: the bytes of every token, in a trie.
struct TokenizerView {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerView {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

fn factory(tokenizer: &Arc<Tokenizer>, vocab_size: usize) -> std::result::Result<ParserFactory, String> {
    let json: Value = serde_json::from_str(&tokenizer.inner().to_string(false).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    // llguidance asserts on vocabularies it does not expect; contain that as an error.
    let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
        .map_err(|_| "the tokenizer's vocabulary has a form constrained decoding does not read".to_string())?
        .map_err(|e| e.to_string())?;
    let size = vocab_size.max(words.len());
    // Ids the tokenizer does not define (padding rows of the embedding) get a special-token
    // spelling, which no grammar matches as text.
    let words: Vec<Vec<u8>> = (0..size)
        .map(|i| match words.get(i) {
            Some(w) if !w.is_empty() => w.clone(),
            _ => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], format!("<[{i}]>").as_bytes()].concat(),
        })
        .collect();
    let eos = tokenizer.eos_ids().first().copied().ok_or("the tokenizer has no end-of-sequence token")?;
    let info = TokRxInfo {
        vocab_size: size as u32,
        tok_eos: eos,
        tok_bos: tokenizer.bos_id(),
        tok_pad: tokenizer.pad_id(),
        tok_unk: None,
        tok_end_of_turn: None,
    };
    let view = TokenizerView { trie: TokTrie::from(&info, &words), tokenizer: tokenizer.clone() };
    let env: TokEnv = Arc::new(view);
    let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    // Grammar errors reach the client in the response; nothing goes to stderr.
    f.quiet();
    Ok(f)
}
