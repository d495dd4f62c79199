//! The Llama family's hyperparameters as the forward pass reads them. They come from
//! hearth-formats' [`ModelConfig`], which reads a GGUF file's metadata or a Hugging Face
//! `config.json` with the same code `:validateUpload` runs: whatever validates is what serves.

pub use hearth_formats::{Architecture, ModelConfig, RopeScaling};

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
    pub tie_word_embeddings: bool,
    /// The checkpoint's hyperparameters as read: RoPE (theta and scaling) and which
    /// projections carry biases.
    pub hparams: ModelConfig,
}

impl From<&ModelConfig> for LlamaConfig {
    fn from(c: &ModelConfig) -> LlamaConfig {
        let d = &c.dims;
        LlamaConfig {
            architecture: c.architecture,
            hidden_size: d.hidden_size as usize,
            intermediate_size: d.intermediate_size as usize,
            num_hidden_layers: d.num_layers as usize,
            num_attention_heads: d.num_heads as usize,
            num_key_value_heads: d.num_kv_heads as usize,
            head_dim: d.head_dim as usize,
            vocab_size: d.vocab_size as usize,
            max_position_embeddings: c.max_position_embeddings as usize,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            hparams: c.clone(),
        }
    }
}

impl LlamaConfig {
    /// The dimensions, as hearth-formats checks adapters against them.
    pub fn dims(&self) -> hearth_formats::ModelDims {
        self.hparams.dims
    }
}
