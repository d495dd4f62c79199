//! Prompt-lookup (n-gram) speculation: a decoding sequence whose recent tokens appeared
//! before in its context (a rewrite of a given text, code edits, quoting) probably goes on as
//! it did then. The tokens that followed that earlier occurrence are proposed as a draft; the
//! step feeds the pending token and the draft in one pass, and the sequence keeps the draft's
//! longest prefix that its own sampling agrees with, plus one token of its own.
//!
//! Why the output does not change: the draft is a fixed guess (a one-hot proposal), so the
//! standard speculative rule (accept a drafted token with probability p(token), else sample
//! from p without it) is the same as sampling each position from the model's own distribution
//! p and keeping going while the sample equals the draft. The engine does exactly that, with
//! the sequence's own sampler, one sample per emitted token as without speculation, so a
//! greedy or seeded request gets the very tokens it would get without it. Positions after the
//! first disagreement are dropped from the KV cache.
//!
//! A [`DraftModel`] proposes in the same way where the context holds no repetition to look up.

use crate::error::{EngineError, Result};
use crate::model::{KvCache, KvDtype, LlamaModel};
use crate::tokenizer::Tokenizer;

/// A draft model: a smaller or more compressed model with the target's tokenizer (the same
/// model's Q4_1 file drafting for its FP32 weights, say). It runs in the same scheduler as
/// the target, keeps a KV cache of its own per sequence, and proposes greedily: its most
/// likely token, fed back, `k` times. A greedy proposal is again a fixed guess, so the target
/// verifies it exactly as it verifies an n-gram draft and the output stays the target's own.
/// Adapters are the target's alone: a LoRA request's draft comes from the plain draft model,
/// which lowers its acceptance but not its correctness.
pub struct DraftModel {
    pub(crate) model: LlamaModel,
    /// Token ids it may propose: the tokenizer's, which the target's embeddings cover (a
    /// checkpoint's vocabulary may be padded past them).
    pub(crate) vocab: usize,
}

impl DraftModel {
    /// Pairs `model` (read with `tokenizer`) as a draft for a target read with `target`;
    /// refuses a draft whose tokenizer differs, since its token ids go to the target as they
    /// are.
    pub fn new(model: LlamaModel, tokenizer: &Tokenizer, target: &Tokenizer) -> Result<DraftModel> {
        target.same_as(tokenizer).map_err(|why| {
            EngineError::InvalidModel(format!("the draft model's tokenizer is not the target's: {why}"))
        })?;
        let vocab = tokenizer.vocab_size().min(model.config.vocab_size);
        Ok(DraftModel { model, vocab })
    }

    /// Bytes of KV cache a sequence of `tokens` tokens needs in the draft model.
    pub(crate) fn kv_bytes(&self, tokens: usize, dtype: KvDtype) -> usize {
        let c = &self.model.config;
        KvCache::bytes_for(tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype)
    }
}

/// The most likely token among the first `vocab` of a `[1, vocab']` logits row.
pub(crate) fn greedy(logits: &candle_core::Tensor, vocab: usize) -> Result<u32> {
    let row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &l) in row.iter().enumerate().take(vocab) {
        if l > best.1 {
            best = (i as u32, l);
        }
    }
    Ok(best.0)
}

/// The shortest match a draft is taken from: a single repeated token (a space, a comma)
/// predicts little, and a rejected draft costs its verification.
const MIN_NGRAM: usize = 2;

/// Up to `k` tokens that followed the latest earlier occurrence of the context's last `n`
/// tokens, for the longest `n` from `max_ngram` down to [`MIN_NGRAM`] (or 1, if `max_ngram` is
/// 1) that occurs earlier.
pub fn propose(context: &[u32], max_ngram: usize, k: usize) -> Vec<u32> {
    if k == 0 || context.len() < 2 {
        return Vec::new();
    }
    let shortest = MIN_NGRAM.min(max_ngram).max(1);
    for n in (shortest..=max_ngram.min(context.len() - 1)).rev() {
        let tail = &context[context.len() - n..];
        // Latest first: recent text is the likelier template. The match must end before the
        // tail itself starts, so something follows it.
        let found = (0..context.len() - n).rev().find(|&start| &context[start..start + n] == tail);
        if let Some(start) = found {
            let from = start + n;
            let to = (from + k).min(context.len());
            return context[from..to].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::propose;

    #[test]
    fn proposes_what_followed_the_latest_longest_match() {
        // "1 2 3 4 5 ... 1 2 3" → after "1 2 3" came "4 5".
        assert_eq!(propose(&[1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 2), vec![4, 5]);
        // The latest occurrence wins.
        assert_eq!(propose(&[7, 1, 8, 7, 2, 9, 7], 1, 1), vec![2]);
        // A longer match beats a more recent shorter one.
        assert_eq!(propose(&[1, 2, 3, 6, 5, 3, 7, 1, 2, 3], 3, 1), vec![6]);
        // One repeated token is not enough unless single tokens are asked for.
        assert!(propose(&[7, 1, 8, 7, 2, 9, 7], 3, 1).is_empty());
        // Fewer tokens than asked when the context ends first.
        assert_eq!(propose(&[4, 5, 4, 5], 2, 8), vec![4, 5]);
    }

    #[test]
    fn nothing_to_propose() {
        assert!(propose(&[1, 2, 3, 4], 3, 4).is_empty(), "no repetition");
        assert!(propose(&[1, 1], 2, 0).is_empty(), "no tokens asked");
        assert!(propose(&[1], 3, 4).is_empty(), "too short");
    }
}
