//! The Llama family's hyperparameters, read from a GGUF file's metadata or a Hugging Face
//! `config.json`. Field names mirror `config.json`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Architectures served by the Llama forward pass: the same blocks, with q/k/v biases for
/// Qwen2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
}

/// The subset of `config.json` hearth reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

fn check(c: &LlamaConfig) -> Result<()> {
    let bad = |m: String| Err(EngineError::InvalidModel(m));
    if c.hidden_size == 0 || c.num_hidden_layers == 0 || c.num_attention_heads == 0 || c.vocab_size == 0 {
        return bad(format!("model config has a zero dimension: {c:?}"));
    }
    if c.num_key_value_heads == 0 || !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        return bad(format!(
            "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
            c.num_attention_heads, c.num_key_value_heads
        ));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        return bad(format!("head_dim must be even and positive, got {}", c.head_dim));
    }
    Ok(())
}

impl LlamaConfig {
    pub fn from_hf_json(text: &str) -> Result<LlamaConfig> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| EngineError::InvalidModel(format!("config.json is not a Llama-family config: {e}")))?;
        let arch_name = hf.architectures.first().cloned().or(hf.model_type.clone()).unwrap_or_default();
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => {
                return Err(EngineError::InvalidModel(format!(
                    "config.json: architecture {other:?} is not supported (supported: LlamaForCausalLM, \
                     MistralForCausalLM, Qwen2ForCausalLM)"
                )))
            }
        };
        if let Some(s) = hf.rope_scaling.filter(|v| !v.is_null()) {
            return Err(EngineError::InvalidModel(format!("config.json: rope_scaling {s} is not supported yet")));
        }
        let heads = hf.num_attention_heads;
        let c = LlamaConfig {
            architecture,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size.checked_div(heads).unwrap_or(0)),
            vocab_size: hf.vocab_size,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(10000.0),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: hf.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
        };
        check(&c)?;
        Ok(c)
    }

    pub fn from_gguf(
        meta: &HashMap<String, gguf_file::Value>,
        has_output: bool,
        has_q_bias: bool,
    ) -> Result<LlamaConfig> {
        let get = |k: &str| meta.get(k).ok_or_else(|| EngineError::InvalidModel(format!("GGUF metadata lacks {k}")));
        let arch_name = get("general.architecture")?
            .to_string()
            .map_err(|e| EngineError::InvalidModel(format!("general.architecture: {e}")))?
            .clone();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(EngineError::InvalidModel(format!(
                    "GGUF architecture {other:?} is not supported (supported: llama, mistral, qwen2)"
                )))
            }
        };
        let u = |k: &str| -> Result<usize> {
            let key = format!("{arch_name}.{k}");
            let v = get(&key)?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .map(|n| n as usize)
                .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
        };
        let f = |k: &str, default: f64| -> Result<f64> {
            match meta.get(&format!("{arch_name}.{k}")) {
                None => Ok(default),
                Some(v) => v
                    .to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map_err(|e| EngineError::InvalidModel(format!("{arch_name}.{k}: {e}"))),
            }
        };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let vocab = match meta.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().map(|v| v.len()).unwrap_or(0),
            None => u("vocab_size")?,
        };
        let head_dim = match u("attention.key_length") {
            Ok(d) => d,
            Err(_) => hidden.checked_div(heads).unwrap_or(0),
        };
        let c = LlamaConfig {
            architecture,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-5)?,
            rope_theta: f("rope.freq_base", 10000.0)?,
            tie_word_embeddings: !has_output,
            attention_bias: has_q_bias,
        };
        check(&c)?;
        Ok(c)
    }
}
