//! The model's tokenizer: text to token ids and back, built from GGUF metadata or a Hugging Face
//! directory, with the special tokens generation needs (BOS, the end-of-turn tokens) and a
//! streaming detokenizer that never emits half a character.
//!
//! Encoding and decoding are done by the `tokenizers` crate, the same Rust code transformers'
//! fast tokenizers run, so a tokenizer built here gives transformers' ids. For GGUF files the
//! `tokenizers` pipeline is rebuilt from `tokenizer.ggml.*` the way transformers' GGUF
//! converter and llama.cpp read those keys.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "\u{2581}";

/// The Llama-3 split regex (tokenizer.json of Meta-Llama-3, llama.cpp's `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex: Llama-3's with digits split one by one.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens that end an assistant turn in common chat templates. Generation stops on one
/// of them when it is a special token of the vocabulary and the model's chat template writes it:
/// that is how a template that ends turns with `<|im_end|>` while `eos` is `<|endoftext|>` (or
/// the reverse) still stops where the template expects.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|END_OF_TURN_TOKEN|>",
    "<|endoftext|>",
    "<|end_of_text|>",
];

/// A model's tokenizer and the special tokens hearth needs from it.
///
/// Cheap to share across threads (`Send + Sync`); encoding and decoding take `&self`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_id: Option<u32>,
    vocab_size: usize,
    chat_template: Option<String>,
}

impl fmt::Debug for Tokenizer {
    // By hand: the derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_id", &self.pad_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE, pre-tokenized as
    /// `tokenizer.ggml.pre` names) and "llama" (SentencePiece BPE with byte fallback, merges
    /// taken from `tokenizer.ggml.merges` or derived from `tokenizer.ggml.scores`).
    pub fn from_gguf(content: &Content) -> Result<Tokenizer> {
        let md = &content.metadata;
        let model = meta_str(md, "tokenizer.ggml.model")?.ok_or_else(|| {
            invalid("the GGUF file has no tokenizer metadata (tokenizer.ggml.model is missing)".to_string())
        })?;
        let tokens = meta_strings(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| invalid("the GGUF file has no tokenizer.ggml.tokens".to_string()))?;
        if tokens.is_empty() {
            return Err(invalid("tokenizer.ggml.tokens is empty".to_string()));
        }
        let n_vocab = tokens.len();
        if u32::try_from(n_vocab).is_err() {
            return Err(invalid(format!("tokenizer.ggml.tokens has {n_vocab} entries, more than token ids can hold")));
        }
        let token_types = meta_ints(md, "tokenizer.ggml.token_type")?;
        check_len("tokenizer.ggml.token_type", token_types.as_ref().map(Vec::len), n_vocab)?;
        let merges = meta_strings(md, "tokenizer.ggml.merges")?;

        let bos_id = meta_token_id(md, "tokenizer.ggml.bos_token_id", n_vocab)?;
        let eos_id = meta_token_id(md, "tokenizer.ggml.eos_token_id", n_vocab)?;
        let eot_id = meta_token_id(md, "tokenizer.ggml.eot_token_id", n_vocab)?;
        let eom_id = meta_token_id(md, "tokenizer.ggml.eom_token_id", n_vocab)?;
        // A bad padding or unknown id does not stop a model from generating: ignore it.
        let pad_id = meta_token_id(md, "tokenizer.ggml.padding_token_id", n_vocab).unwrap_or_else(|e| {
            tracing::warn!("ignoring tokenizer.ggml.padding_token_id: {e}");
            None
        });
        let unk_id = meta_token_id(md, "tokenizer.ggml.unknown_token_id", n_vocab).unwrap_or_else(|e| {
            tracing::warn!("ignoring tokenizer.ggml.unknown_token_id: {e}");
            None
        });
        let add_bos_key = meta_bool(md, "tokenizer.ggml.add_bos_token")?;
        let add_space_prefix = meta_bool(md, "tokenizer.ggml.add_space_prefix")?;
        let pre = meta_str(md, "tokenizer.ggml.pre")?;
        let chat_template = meta_str(md, "tokenizer.chat_template")?.map(str::to_string);

        // Like transformers' GGUF converter, a token string listed twice maps to its last id.
        let vocab: Vocab = tokens.iter().enumerate().map(|(id, token)| (token.clone(), id as u32)).collect();

        let (mut inner, default_add_bos) = match model {
            "gpt2" => {
                let merges = merges.ok_or_else(|| {
                    invalid("tokenizer.ggml.merges is missing (a 'gpt2' tokenizer needs its merges)".to_string())
                })?;
                let merges = parse_merges(&merges, &vocab)?;
                let inner = byte_level_bpe(vocab, merges, pre, add_space_prefix.unwrap_or(false), unk_id, &tokens)?;
                // llama.cpp adds BOS by default for the Llama-3 pre-tokenizer only.
                (inner, matches!(pre, Some("llama-bpe" | "llama3" | "smaug-bpe")))
            }
            "llama" => {
                let merges = match merges {
                    Some(merges) if !merges.is_empty() => parse_merges(&merges, &vocab)?,
                    _ => {
                        let scores = meta_floats(md, "tokenizer.ggml.scores")?;
                        check_len("tokenizer.ggml.scores", scores.as_ref().map(Vec::len), n_vocab)?;
                        merges_from_scores(&tokens, scores.as_deref(), token_types.as_deref(), &vocab)
                    }
                };
                let unk = unk_id.map(|id| tokens[id as usize].clone());
                (sentencepiece_bpe(vocab, merges, unk, add_space_prefix.unwrap_or(true))?, true)
            }
            other => {
                return Err(invalid(format!(
                    "unsupported tokenizer.ggml.model '{other}' (hearth supports 'gpt2' and 'llama')"
                )))
            }
        };

        // Control tokens are special added tokens, so "<|im_start|>" in text is one token and
        // decoding can skip them; user-defined ones are added tokens too, matched whole but
        // kept when decoding. BOS and EOS are special even in a file without token types.
        let mut special_ids: Vec<u32> = Vec::new();
        let mut user_ids: Vec<u32> = Vec::new();
        if let Some(types) = &token_types {
            for (id, ty) in types.iter().enumerate() {
                match *ty {
                    TOKEN_TYPE_CONTROL => special_ids.push(id as u32),
                    TOKEN_TYPE_USER_DEFINED => user_ids.push(id as u32),
                    _ => {}
                }
            }
        }
        special_ids.extend([bos_id, eos_id, eot_id, eom_id].into_iter().flatten());
        if token_types.is_none() {
            special_ids.extend(unk_id);
        }
        special_ids.sort_unstable();
        special_ids.dedup();
        // An empty added token would match everywhere.
        let special: Vec<AddedToken> = special_ids
            .iter()
            .map(|&id| &tokens[id as usize])
            .filter(|t| !t.is_empty())
            .map(|t| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(special).map_err(|e| invalid(format!("cannot register the special tokens: {e}")))?;
        let user: Vec<AddedToken> = user_ids
            .iter()
            .map(|&id| &tokens[id as usize])
            .filter(|t| !t.is_empty())
            .map(|t| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner.add_tokens(user).map_err(|e| invalid(format!("cannot register the user-defined tokens: {e}")))?;

        let add_bos = add_bos_key.unwrap_or(default_add_bos);
        let mut eos_ids: Vec<u32> = [eos_id, eot_id, eom_id].into_iter().flatten().collect();
        add_end_of_turn_tokens(&inner, chat_template.as_deref(), &mut eos_ids);
        finish(Tokenizer {
            bos_token: bos_id.map(|id| tokens[id as usize].clone()),
            eos_token: eos_id.map(|id| tokens[id as usize].clone()),
            inner,
            bos_id,
            eos_ids,
            add_bos,
            pad_id,
            vocab_size: n_vocab,
            chat_template,
        })
    }

    /// Builds the tokenizer from a Hugging Face model directory: `tokenizer.json`, and when
    /// present `tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`),
    /// `generation_config.json` (`eos_token_id`) and `chat_template.jinja` (which takes
    /// precedence over the config's template, as in transformers).
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let json_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&json_path).map_err(|e| {
            invalid(format!("cannot read {}: {e} (hearth needs a tokenizer.json)", json_path.display()))
        })?;
        // The tokenizers crate can panic on a malformed file (it slices a buffer sized to the
        // longest token while checking merges); a bad model file must be an error, not a crash.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| invalid(format!("{} is malformed (the tokenizer failed to load it)", json_path.display())))?;
        let mut inner =
            parsed.map_err(|e| invalid(format!("{} is not a valid tokenizer: {e}", json_path.display())))?;
        // Some tokenizer.json files carry truncation or padding settings made for training;
        // left on, they would silently cut prompts.
        inner.with_truncation(None).map_err(|e| EngineError::Internal(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);

        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_json(&dir.join("generation_config.json"))?;
        let config_field = |key: &str| config.as_ref().and_then(|c| c.get(key));

        let mut bos_token = config_field("bos_token").and_then(token_content);
        let eos_token = config_field("eos_token").and_then(token_content);
        let pad_token = config_field("pad_token").and_then(token_content);
        let vocab_size = inner.get_vocab_size(true);
        let lookup = |what: &str, token: &Option<String>| -> Option<u32> {
            let token = token.as_deref()?;
            let id = inner.token_to_id(token);
            if id.is_none() {
                tracing::warn!("the {what} token {token:?} of tokenizer_config.json is not in the vocabulary");
            }
            id
        };
        let mut bos_id = lookup("bos", &bos_token);
        let eos_id = lookup("eos", &eos_token);
        let pad_id = lookup("pad", &pad_token).or_else(|| {
            let id = generation.as_ref()?.get("pad_token_id")?.as_u64()?;
            u32::try_from(id).ok().filter(|&id| (id as usize) < vocab_size)
        });

        // Whether the model wants BOS: the config's add_bos_token when it says, else whether
        // the tokenizer's post-processor prepends a token (Llama 3 does it that way).
        let prepended = post_processor_prefix(&inner)?;
        let add_bos = match config_field("add_bos_token").and_then(serde_json::Value::as_bool) {
            Some(add) => add,
            None => prepended.is_some(),
        };
        if bos_id.is_none() && add_bos {
            if let Some(id) = prepended {
                bos_id = Some(id);
                bos_token = inner.id_to_token(id);
            }
        }

        let chat_template = read_chat_template(dir, config.as_ref())?;

        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(ids) = generation.as_ref().and_then(|g| g.get("eos_token_id")) {
            for id in json_ids(ids) {
                match u32::try_from(id).ok().filter(|&id| (id as usize) < vocab_size) {
                    Some(id) => eos_ids.push(id),
                    None => tracing::warn!("ignoring generation_config.json eos_token_id {id}: not in the vocabulary"),
                }
            }
        }
        add_end_of_turn_tokens(&inner, chat_template.as_deref(), &mut eos_ids);
        let eos_token = eos_token.or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)));

        finish(Tokenizer { inner, bos_id, eos_ids, add_bos, bos_token, eos_token, pad_id, vocab_size, chat_template })
    }

    /// Encodes `text`. Special-token strings in it ("<|im_start|>") become their single ids.
    /// With `add_special`, BOS is prepended when the model adds one (and the text does not
    /// already start with it); nothing else is added.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        // The post-processor is never run: BOS is handled here so it is added exactly once
        // whatever the tokenizer.json's template says.
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EngineError::Internal(format!("tokenization failed: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text; with `skip_special`, special tokens (BOS, EOS, `<|im_end|>`...) are
    /// left out. Ids outside the vocabulary decode to nothing (a model's embedding matrix can
    /// be larger than its vocabulary).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| EngineError::Internal(format!("detokenization failed: {e}")))
    }

    /// A streaming detokenizer for one sequence; see [`DecodeStream`].
    pub fn decode_stream(&self, skip_special: bool) -> DecodeStream {
        DecodeStream::new(skip_special)
    }

    /// The vocabulary's string for `id` as stored (byte-level BPE shows a space as "Ġ",
    /// SentencePiece as "▁"), or `None` when no token has that id.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token given as its vocabulary string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is a special token (one that `decode(.., true)` leaves out).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The beginning-of-sequence token's id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every token that ends generation: EOS first, then the end-of-turn tokens the generation
    /// config or chat template use. May be empty for a model that declares none.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The BOS token's text, for chat templates' `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token's text, for chat templates' `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The padding token's id, if the model names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The model's chat template (Jinja source), if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Why `other` would not turn text into the same ids as this tokenizer, or `Ok` when
    /// every id names the same token and the special tokens agree (a draft model must share
    /// its target's tokenizer: its token ids are fed to the target as they are). The same
    /// model's GGUF file and Hugging Face directory compare equal.
    pub fn same_as(&self, other: &Tokenizer) -> std::result::Result<(), String> {
        if self.vocab_size != other.vocab_size {
            return Err(format!("the vocabularies have {} and {} tokens", self.vocab_size, other.vocab_size));
        }
        if self.bos_id != other.bos_id || self.eos_ids.first() != other.eos_ids.first() {
            return Err(format!(
                "the special tokens differ (BOS {:?} and {:?}, EOS {:?} and {:?})",
                self.bos_id,
                other.bos_id,
                self.eos_ids.first(),
                other.eos_ids.first()
            ));
        }
        for id in 0..self.vocab_size as u32 {
            let (a, b) = (self.inner.id_to_token(id), other.inner.id_to_token(id));
            if a != b {
                return Err(format!("token {id} is {a:?} in one and {b:?} in the other"));
            }
        }
        Ok(())
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns token ids into text one id at a time, for streaming.
///
/// A byte-level BPE token can hold part of a UTF-8 character (an emoji is often two or three
/// tokens), so `step` holds text back until it ends in a complete character. The pieces it
/// returns, followed by what [`DecodeStream::flush`] returns, concatenate to exactly
/// `decode(all ids)`.
///
/// It decodes a short window (the tokens of the last emitted piece plus the tokens since) and
/// emits the part past the previous piece's text; diffing against that prefix, rather than
/// decoding new tokens alone, keeps decoders that look at neighbours (SentencePiece's leading
/// space, byte fallback) correct.
#[derive(Debug, Clone)]
pub struct DecodeStream {
    skip_special: bool,
    /// The window: the last emitted piece's tokens, then the tokens not yet emitted.
    ids: Vec<u32>,
    /// Where the not-yet-emitted tokens start in `ids`.
    read_offset: usize,
}

impl DecodeStream {
    /// A stream for one sequence; `skip_special` as in [`Tokenizer::decode`].
    pub fn new(skip_special: bool) -> DecodeStream {
        DecodeStream { skip_special, ids: Vec::new(), read_offset: 0 }
    }

    /// Adds one token; returns the new text when it ends in a complete character, `None` while
    /// text is held back (or the token adds no text, as a skipped special token does).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[..self.read_offset], self.skip_special)?;
        let text = tokenizer.decode(&self.ids, self.skip_special)?;
        // U+FFFD at the end is what lossy UTF-8 decoding makes of an incomplete character:
        // wait for the token that completes it. (A real U+FFFD is emitted with the next token
        // or by `flush`.)
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = text.strip_prefix(prefix.as_str()) else {
            // Not seen with byte-level or SentencePiece decoders; hold and let flush sort it out.
            return Ok(None);
        };
        let new = new.to_string();
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(Some(new))
    }

    /// Returns whatever text is still held back (an incomplete character at the end of the
    /// sequence decodes to U+FFFD, as `decode` does). Call it once the sequence ends.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = tokenizer.decode(&self.ids[..self.read_offset], self.skip_special)?;
        let text = tokenizer.decode(&self.ids, self.skip_special)?;
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        // Normally `text` extends `prefix`; should a decoder ever rewrite the prefix, emit what
        // follows the part they share rather than lose the tail.
        let shared = text
            .char_indices()
            .zip(prefix.chars())
            .find(|((_, a), b)| a != b)
            .map_or(prefix.len().min(text.len()), |((at, _), _)| at);
        let new = text.get(shared..).unwrap_or_default();
        Ok((!new.is_empty()).then(|| new.to_string()))
    }
}

fn invalid(message: String) -> EngineError {
    EngineError::InvalidModel(message)
}

/// Final checks shared by both loaders.
fn finish(mut tokenizer: Tokenizer) -> Result<Tokenizer> {
    if tokenizer.add_bos && tokenizer.bos_id.is_none() {
        tracing::warn!("the tokenizer asks for a BOS token but names none; not adding one");
        tokenizer.add_bos = false;
    }
    if tokenizer.eos_ids.is_empty() {
        tracing::warn!("the tokenizer names no end-of-sequence token; generation stops only at max_tokens");
    }
    Ok(tokenizer)
}

/// Adds to `eos_ids` the end-of-turn special tokens the chat template writes, without
/// repeating any.
fn add_end_of_turn_tokens(inner: &tokenizers::Tokenizer, template: Option<&str>, eos_ids: &mut Vec<u32>) {
    if let Some(template) = template {
        let added = inner.get_added_vocabulary();
        for token in END_OF_TURN_TOKENS {
            if template.contains(token) && added.is_special_token(token) {
                eos_ids.extend(inner.token_to_id(token));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    eos_ids.retain(|id| seen.insert(*id));
}

/// The byte-level BPE pipeline of a "gpt2" GGUF tokenizer, pre-tokenized as `pre` names.
fn byte_level_bpe(
    vocab: Vocab,
    merges: Vec<(String, String)>,
    pre: Option<&str>,
    add_prefix_space: bool,
    unk_id: Option<u32>,
    tokens: &[String],
) -> Result<tokenizers::Tokenizer> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map(PreTokenizerWrapper::Split)
            .map_err(|e| EngineError::Internal(format!("cannot compile the pre-tokenizer regex: {e}")))
    };
    // (pre-tokenizer steps, normalizer, BPE ignore_merges) as each family's tokenizer.json has them.
    let (steps, normalizer, ignore_merges) = match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => {
            (vec![PreTokenizerWrapper::ByteLevel(ByteLevel::new(add_prefix_space, true, true))], None, false)
        }
        // SmolLM/StarCoder: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => (
            vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(add_prefix_space, true, true)),
            ],
            None,
            false,
        ),
        "llama-bpe" | "llama3" | "smaug-bpe" => (
            vec![split(LLAMA3_REGEX)?, PreTokenizerWrapper::ByteLevel(ByteLevel::new(add_prefix_space, true, false))],
            None,
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            vec![split(QWEN2_REGEX)?, PreTokenizerWrapper::ByteLevel(ByteLevel::new(add_prefix_space, true, false))],
            Some(NormalizerWrapper::NFC(NFC)),
            false,
        ),
        other => {
            return Err(invalid(format!(
                "unsupported tokenizer.ggml.pre '{other}' (hearth knows default, gpt2, smollm, starcoder, refact, \
                 llama-bpe, llama3, smaug-bpe, qwen2, deepseek-r1-qwen)"
            )))
        }
    };
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(ignore_merges);
    if let Some(id) = unk_id {
        builder = builder.unk_token(tokens[id as usize].clone());
    }
    let model = builder.build().map_err(|e| invalid(format!("invalid BPE vocabulary: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    let pre_tokenizer = if steps.len() == 1 {
        steps.into_iter().next()
    } else {
        Some(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(steps)))
    };
    inner.with_pre_tokenizer(pre_tokenizer);
    inner.with_normalizer(normalizer).map_err(|e| EngineError::Internal(format!("cannot set the normalizer: {e}")))?;
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    Ok(inner)
}

/// The SentencePiece-style BPE pipeline of a "llama" GGUF tokenizer, as transformers' GGUF
/// converter builds it: spaces become "▁" (with one prepended when `add_space_prefix`), no
/// pre-tokenizer, unknown characters fall back to `<0xNN>` byte tokens.
fn sentencepiece_bpe(
    vocab: Vocab,
    merges: Vec<(String, String)>,
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let internal =
        |e: tokenizers::Error| EngineError::Internal(format!("cannot build the SentencePiece pipeline: {e}"));
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let model = builder.build().map_err(|e| invalid(format!("invalid BPE vocabulary: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(model);

    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new(SPM_SPACE.to_string())));
    }
    normalizers.push(NormalizerWrapper::Replace(Replace::new(" ", SPM_SPACE).map_err(internal)?));
    inner.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(normalizers)))).map_err(internal)?;

    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new(SPM_SPACE, " ").map_err(internal)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    inner.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));
    Ok(inner)
}

/// Parses GGUF merges ("a b") and checks that both sides and their concatenation are tokens:
/// the tokenizers crate would otherwise fail (or index past a buffer) while building.
fn parse_merges(raw: &[String], vocab: &Vocab) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::with_capacity(raw.len());
    for (i, merge) in raw.iter().enumerate() {
        // Split at the first space after the first character, as llama.cpp does, so a merge
        // whose left side is a lone space still parses.
        let split = merge.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(at, _)| at).ok_or_else(|| {
            invalid(format!("tokenizer.ggml.merges[{i}] ({merge:?}) is not two tokens separated by a space"))
        })?;
        let (left, right) = (&merge[..split], &merge[split + 1..]);
        let joined = format!("{left}{right}");
        for part in [left, right, joined.as_str()] {
            if !vocab.contains_key(part) {
                return Err(invalid(format!(
                    "tokenizer.ggml.merges[{i}] ({merge:?}) names {part:?}, which is not in tokenizer.ggml.tokens"
                )));
            }
        }
        merges.push((left.to_string(), right.to_string()));
    }
    Ok(merges)
}

/// Derives BPE merges from SentencePiece scores for a "llama" GGUF without merges: every way
/// of splitting a normal token into two tokens is a merge, ranked by the merged token's score
/// (higher first), as transformers does when it converts such a file. Without scores, lower
/// ids rank first.
fn merges_from_scores(
    tokens: &[String],
    scores: Option<&[f32]>,
    types: Option<&[i64]>,
    vocab: &Vocab,
) -> Vec<(String, String)> {
    struct Candidate<'a> {
        score: f32,
        id: u32,
        left_id: u32,
        right_id: u32,
        left: &'a str,
        right: &'a str,
    }
    let mut candidates = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let id = id as u32;
        let normal = types.and_then(|t| t.get(id as usize)).is_none_or(|&t| t == TOKEN_TYPE_NORMAL);
        if !normal || vocab.get(token) != Some(&id) {
            continue;
        }
        let score = scores.and_then(|s| s.get(id as usize).copied()).unwrap_or(-(id as f32));
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&left_id), Some(&right_id)) = (vocab.get(left), vocab.get(right)) {
                candidates.push(Candidate { score, id, left_id, right_id, left, right });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.id.cmp(&b.id))
            .then(a.left_id.cmp(&b.left_id))
            .then(a.right_id.cmp(&b.right_id))
    });
    candidates.into_iter().map(|c| (c.left.to_string(), c.right.to_string())).collect()
}

/// The token a tokenizer.json post-processor puts before the text, if it puts one.
fn post_processor_prefix(inner: &tokenizers::Tokenizer) -> Result<Option<u32>> {
    let encode = |special: bool| -> Result<Vec<u32>> {
        inner
            .encode_fast("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| invalid(format!("the tokenizer cannot encode a test string: {e}")))
    };
    let (plain, with_special) = (encode(false)?, encode(true)?);
    Ok(match with_special.split_first() {
        Some((&first, rest)) if rest.starts_with(&plain) && with_special.len() > plain.len() => Some(first),
        _ => None,
    })
}

/// The model's chat template: `chat_template.jinja`, else `chat_template.json`, else
/// tokenizer_config.json's `chat_template` (a string, or a list of named templates of which
/// "default" is taken).
fn read_chat_template(dir: &Path, config: Option<&serde_json::Value>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(invalid(format!("cannot read {}: {e}", jinja.display()))),
    }
    if let Some(json) = read_json(&dir.join("chat_template.json"))? {
        if let Some(template) = json.get("chat_template").and_then(template_from_json) {
            return Ok(Some(template));
        }
    }
    Ok(config.and_then(|c| c.get("chat_template")).and_then(template_from_json))
}

fn template_from_json(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => {
            let template_of = |entry: &serde_json::Value| entry.get("template")?.as_str().map(str::to_string);
            named
                .iter()
                .find(|entry| entry.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                .and_then(template_of)
                .or_else(|| named.iter().find_map(template_of))
        }
        _ => None,
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object; null is none.
fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Token ids given as one integer or a list of them.
fn json_ids(value: &serde_json::Value) -> Vec<u64> {
    match value {
        serde_json::Value::Array(items) => items.iter().filter_map(serde_json::Value::as_u64).collect(),
        other => other.as_u64().into_iter().collect(),
    }
}

/// A JSON file that may be absent; present but unreadable or malformed is an error.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(invalid(format!("cannot read {}: {e}", path.display()))),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| invalid(format!("{} is not valid JSON: {e}", path.display())))
}

fn check_len(key: &str, len: Option<usize>, n_vocab: usize) -> Result<()> {
    match len {
        Some(len) if len != n_vocab => Err(invalid(format!(
            "{key} has {len} entries but tokenizer.ggml.tokens has {n_vocab}; the file is inconsistent"
        ))),
        _ => Ok(()),
    }
}

fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!("{key} should be a string, found {:?}", other.value_type()))),
    }
}

fn meta_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a [Value]>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(invalid(format!("{key} should be an array, found {:?}", other.value_type()))),
    }
}

fn meta_strings(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<String>>> {
    let Some(items) = meta_array(md, key)? else { return Ok(None) };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(invalid(format!("{key}[{i}] should be a string, found {:?}", other.value_type()))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn meta_ints(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(items) = meta_array(md, key)? else { return Ok(None) };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            value_int(item)
                .ok_or_else(|| invalid(format!("{key}[{i}] should be an integer, found {:?}", item.value_type())))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn meta_floats(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<f32>>> {
    let Some(items) = meta_array(md, key)? else { return Ok(None) };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => Err(invalid(format!("{key}[{i}] should be a float, found {:?}", other.value_type()))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn meta_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        // Some converters write flags as integers.
        Some(other) => match value_int(other) {
            Some(0) => Ok(Some(false)),
            Some(1) => Ok(Some(true)),
            _ => Err(invalid(format!("{key} should be a bool, found {:?}", other.value_type()))),
        },
    }
}

/// A token id key: absent is `None`; present, it must be an id of the vocabulary.
fn meta_token_id(md: &HashMap<String, Value>, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    let Some(value) = md.get(key) else { return Ok(None) };
    let id = value_int(value)
        .ok_or_else(|| invalid(format!("{key} should be an integer, found {:?}", value.value_type())))?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
        _ => Err(invalid(format!("{key} is {id}, outside the vocabulary of {n_vocab} tokens"))),
    }
}

/// Any GGUF integer type, widened; `None` for non-integers and u64 values past i64.
fn value_int(value: &Value) -> Option<i64> {
    match value {
        Value::U8(v) => Some(i64::from(*v)),
        Value::I8(v) => Some(i64::from(*v)),
        Value::U16(v) => Some(i64::from(*v)),
        Value::I16(v) => Some(i64::from(*v)),
        Value::U32(v) => Some(i64::from(*v)),
        Value::I32(v) => Some(i64::from(*v)),
        Value::U64(v) => i64::try_from(*v).ok(),
        Value::I64(v) => Some(*v),
        _ => None,
    }
}

/// Synthetic GGUF tokenizers for this crate's unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    pub fn content(entries: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    pub fn strings<S: AsRef<str>>(items: &[S]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.as_ref().to_string())).collect())
    }

    /// A SentencePiece-style vocabulary: specials, the 256 byte tokens, and pieces of
    /// "hello world" whose scores favour longer pieces.
    pub fn tiny_llama_entries() -> Vec<(&'static str, Value)> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2i32, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let pieces = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor", "ld",
            "▁world",
        ];
        for p in pieces {
            tokens.push(p.to_string());
            types.push(1);
        }
        tokens.push("<|im_end|>".into());
        types.push(3);
        let scores: Vec<Value> = tokens.iter().map(|t| Value::F32(t.chars().count() as f32)).collect();
        vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]
    }

    pub fn tiny_tokenizer_without_template() -> Result<Tokenizer> {
        Tokenizer::from_gguf(&content(tiny_llama_entries()))
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    fn replace(entries: &mut Vec<(&'static str, Value)>, key: &'static str, value: Option<Value>) {
        entries.retain(|(k, _)| *k != key);
        if let Some(value) = value {
            entries.push((key, value));
        }
    }

    fn invalid_message(entries: Vec<(&'static str, Value)>) -> String {
        match Tokenizer::from_gguf(&content(entries)) {
            Err(EngineError::InvalidModel(message)) => message,
            other => panic!("expected InvalidModel, got {other:?}"),
        }
    }

    /// A small byte-level ("gpt2") vocabulary: specials, a few letters and merges.
    fn tiny_gpt2_entries() -> Vec<(&'static str, Value)> {
        let tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "h", "i", "Ġ", "1", "2", "hi", "Ġhi", "12"];
        let types: Vec<Value> = tokens.iter().map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 })).collect();
        vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("smollm".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", strings(&["h i", "Ġ hi", "1 2"])),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            (
                "tokenizer.chat_template",
                Value::String("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}".into()),
            ),
        ]
    }

    #[test]
    fn gpt2_special_tokens_digits_and_end_of_turn() {
        let tok = Tokenizer::from_gguf(&content(tiny_gpt2_entries())).unwrap();
        let start = tok.token_id("<|im_start|>").unwrap();
        let end = tok.token_id("<|im_end|>").unwrap();
        let hi = tok.token_id("hi").unwrap();
        let space_hi = tok.token_id("Ġhi").unwrap();
        assert_eq!(tok.encode("<|im_start|>hi hi<|im_end|>", true).unwrap(), vec![start, hi, space_hi, end]);
        // "smollm" splits digits one by one, so the "1 2" merge never applies.
        assert_eq!(tok.encode("12", false).unwrap(), vec![tok.token_id("1").unwrap(), tok.token_id("2").unwrap()]);
        assert!(!tok.add_bos());
        // EOS is <|endoftext|>; the template ends turns with <|im_end|>, which also stops.
        assert_eq!(tok.eos_ids(), &[0, end]);
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
        assert_eq!(tok.vocab_size(), 11);
        assert!(tok.is_special(end) && !tok.is_special(hi));
        assert_eq!(tok.decode(&[start, hi, space_hi, end], true).unwrap(), "hi hi");
        assert_eq!(tok.decode(&[start, hi, end], false).unwrap(), "<|im_start|>hi<|im_end|>");
        assert_eq!(tok.token_str(space_hi).as_deref(), Some("Ġhi"));
    }

    #[test]
    fn pre_tokenizer_families() {
        let tokens = ["<|endoftext|>", "1", "2", "3", "4", "5", "12", "123", "45", "'", "S", "'S"];
        let merges = ["1 2", "12 3", "4 5", "' S"];
        let encode = |pre: &str, text: &str| -> Vec<String> {
            let entries = vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String(pre.into())),
                ("tokenizer.ggml.tokens", strings(&tokens)),
                ("tokenizer.ggml.merges", strings(&merges)),
                ("tokenizer.ggml.eos_token_id", Value::U32(0)),
            ];
            let tok = Tokenizer::from_gguf(&content(entries)).unwrap();
            tok.encode(text, false).unwrap().iter().map(|&id| tok.token_str(id).unwrap()).collect()
        };
        // GPT-2's regex keeps a number whole and splits "'S" (its contractions are lowercase).
        assert_eq!(encode("gpt2", "12345"), ["123", "45"]);
        assert_eq!(encode("gpt2", "'S"), ["'", "S"]);
        // Llama 3: numbers in groups of three, contractions in any case.
        assert_eq!(encode("llama-bpe", "12345"), ["123", "45"]);
        assert_eq!(encode("llama-bpe", "1234"), ["123", "4"]);
        assert_eq!(encode("llama-bpe", "'S"), ["'S"]);
        // Qwen2 and SmolLM: every digit alone.
        assert_eq!(encode("qwen2", "12345"), ["1", "2", "3", "4", "5"]);
        assert_eq!(encode("qwen2", "'S"), ["'S"]);
        assert_eq!(encode("smollm", "12345"), ["1", "2", "3", "4", "5"]);
    }

    #[test]
    fn shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<DecodeStream>();
        assert_send_sync::<crate::chat::ChatTemplate>();
    }

    #[test]
    fn llama_sentencepiece_merges_from_scores_and_byte_fallback() {
        let tok = tiny_tokenizer_without_template().unwrap();
        let ids = tok.encode("hello world", false).unwrap();
        let strs: Vec<String> = ids.iter().map(|&id| tok.token_str(id).unwrap()).collect();
        assert_eq!(strs, ["▁hello", "▁world"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
        // "é" is not a piece: its UTF-8 bytes become <0xC3><0xA9>.
        let ids = tok.encode("hé", false).unwrap();
        let strs: Vec<String> = ids.iter().map(|&id| tok.token_str(id).unwrap()).collect();
        assert_eq!(strs, ["▁", "h", "<0xC3>", "<0xA9>"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hé");
        assert!(tok.chat_template().is_none());
    }

    #[test]
    fn bos_is_added_once() {
        let tok = tiny_tokenizer_without_template().unwrap();
        assert!(tok.add_bos());
        assert_eq!(tok.bos_id(), Some(1));
        let with = tok.encode("hello", true).unwrap();
        assert_eq!(with[0], 1);
        assert_eq!(&with[1..], tok.encode("hello", false).unwrap().as_slice());
        let already = tok.encode("<s>hello", true).unwrap();
        assert_eq!(already.iter().filter(|&&id| id == 1).count(), 1, "{already:?}");
        assert_eq!(tok.decode(&with, true).unwrap(), "hello");

        let mut entries = tiny_llama_entries();
        replace(&mut entries, "tokenizer.ggml.add_bos_token", Some(Value::Bool(false)));
        let tok = Tokenizer::from_gguf(&content(entries)).unwrap();
        assert_eq!(tok.encode("hello", true).unwrap(), tok.encode("hello", false).unwrap());
    }

    #[test]
    fn decode_stream_on_sentencepiece_bytes_and_specials() {
        let tok = tiny_tokenizer_without_template().unwrap();
        let mut ids = tok.encode("hello hé world", true).unwrap();
        ids.push(tok.token_id("<|im_end|>").unwrap());
        for skip in [true, false] {
            let mut stream = tok.decode_stream(skip);
            let mut pieces = Vec::new();
            for &id in &ids {
                if let Some(piece) = stream.step(&tok, id).unwrap() {
                    assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                    pieces.push(piece);
                }
            }
            pieces.extend(stream.flush(&tok).unwrap());
            assert_eq!(pieces.concat(), tok.decode(&ids, skip).unwrap());
            // <0xC3> alone is half of "é": it must have been held back, not emitted.
            assert!(pieces.iter().any(|p| p.contains('é')), "{pieces:?}");
        }
        // An incomplete character at the very end comes out of flush as U+FFFD, as decode does.
        let half = vec![tok.token_id("h").unwrap(), tok.token_id("<0xC3>").unwrap()];
        let mut stream = DecodeStream::new(true);
        let mut out = String::new();
        for &id in &half {
            out.extend(stream.step(&tok, id).unwrap());
        }
        out.extend(stream.flush(&tok).unwrap());
        assert_eq!(out, tok.decode(&half, true).unwrap());
        assert!(stream.flush(&tok).unwrap().is_none());
    }

    #[test]
    fn missing_tokenizer_metadata_is_invalid_model() {
        let message = invalid_message(vec![("general.architecture", Value::String("llama".into()))]);
        assert!(message.contains("tokenizer.ggml.model"), "{message}");
        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.tokens", None);
        assert!(invalid_message(entries).contains("tokenizer.ggml.tokens"));
        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.merges", None);
        assert!(invalid_message(entries).contains("tokenizer.ggml.merges"));
    }

    #[test]
    fn malformed_metadata_is_invalid_model() {
        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.token_type", Some(Value::Array(vec![Value::I32(1); 3])));
        let message = invalid_message(entries);
        assert!(message.contains("tokenizer.ggml.token_type has 3 entries"), "{message}");

        let mut entries = tiny_llama_entries();
        replace(&mut entries, "tokenizer.ggml.scores", Some(Value::Array(vec![Value::F32(0.0)])));
        assert!(invalid_message(entries).contains("tokenizer.ggml.scores"));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.merges", Some(strings(&["h i", "x y"])));
        let message = invalid_message(entries);
        assert!(message.contains("tokenizer.ggml.merges[1]") && message.contains("\"x\""), "{message}");

        // Both sides known but their concatenation not: tokenizers would index past a buffer.
        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.merges", Some(strings(&["hi Ġhi"])));
        assert!(invalid_message(entries).contains("\"hiĠhi\""));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.merges", Some(strings(&["hi"])));
        assert!(invalid_message(entries).contains("not two tokens"));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.pre", Some(Value::String("klingon".into())));
        assert!(invalid_message(entries).contains("'klingon'"));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.model", Some(Value::String("bert".into())));
        assert!(invalid_message(entries).contains("'bert'"));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.eos_token_id", Some(Value::U32(999)));
        assert!(invalid_message(entries).contains("tokenizer.ggml.eos_token_id is 999"));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.tokens", Some(Value::Array(vec![Value::U32(1)])));
        assert!(invalid_message(entries).contains("tokenizer.ggml.tokens[0] should be a string"));

        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.tokens", Some(Value::Array(vec![])));
        assert!(invalid_message(entries).contains("empty"));

        // A bad padding id is ignored rather than fatal.
        let mut entries = tiny_gpt2_entries();
        replace(&mut entries, "tokenizer.ggml.padding_token_id", Some(Value::I32(-1)));
        assert_eq!(Tokenizer::from_gguf(&content(entries)).unwrap().pad_id(), None);
    }

    #[test]
    fn hf_dir_reads_config_generation_config_and_template_files() {
        let dir = tempfile::tempdir().unwrap();
        let built = Tokenizer::from_gguf(&content(tiny_gpt2_entries())).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), built.inner().to_string(false).unwrap()).unwrap();
        // Without a config: no BOS, no EOS, no template.
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert!(tok.bos_id().is_none() && tok.eos_ids().is_empty() && tok.chat_template().is_none());

        let config = serde_json::json!({
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|endoftext|>",
            "pad_token": null,
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ '<|im_end|>' }}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [0, 2, 9999]}"#).unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(tok.bos_id(), Some(1));
        assert!(tok.add_bos());
        assert_eq!(tok.eos_ids(), &[0, 2]);
        assert_eq!(tok.chat_template(), Some("{{ '<|im_end|>' }}"));
        assert_eq!(tok.encode("hi", true).unwrap(), vec![1, 8]);
        assert_eq!(tok.vocab_size(), 11);

        std::fs::write(dir.path().join("chat_template.jinja"), "from the file").unwrap();
        let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(tok.chat_template(), Some("from the file"));

        std::fs::write(dir.path().join("tokenizer_config.json"), "{not json").unwrap();
        match Tokenizer::from_hf_dir(dir.path()) {
            Err(EngineError::InvalidModel(message)) => assert!(message.contains("tokenizer_config.json"), "{message}"),
            other => panic!("expected InvalidModel, got {other:?}"),
        }
        let empty = tempfile::tempdir().unwrap();
        match Tokenizer::from_hf_dir(empty.path()) {
            Err(EngineError::InvalidModel(message)) => assert!(message.contains("tokenizer.json"), "{message}"),
            other => panic!("expected InvalidModel, got {other:?}"),
        }
    }
}
