//! What a base checkpoint's hyperparameters mean: one [`ModelConfig`], read from a Hugging Face
//! `config.json` or from GGUF metadata by this crate, and served as read by the engine. Every
//! rule about a hyperparameter (its default, whether hearth can honour it) lives here, so
//! validation and serving cannot disagree about it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ModelDims;

/// The architectures the engine's Llama forward pass serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    /// The `model_type` of config.json and GGUF's `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The transformers class, as config.json's `architectures` names it.
    pub fn class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    pub fn from_name(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    pub fn from_class(class: &str) -> Option<Architecture> {
        [Architecture::Llama, Architecture::Mistral, Architecture::Qwen2].into_iter().find(|a| a.class() == class)
    }

    /// `max_position_embeddings` when config.json leaves it out: transformers' default for
    /// the architecture's config class.
    fn default_context(self) -> u32 {
        match self {
            Architecture::Llama => 2048,
            Architecture::Mistral => 4096 * 32,
            Architecture::Qwen2 => 32768,
        }
    }

    /// `rms_norm_eps` when config.json leaves it out (transformers' defaults).
    fn default_eps(self) -> f64 {
        1e-6
    }

    /// `rope_theta` when config.json leaves it out (transformers' defaults).
    fn default_theta(self) -> f64 {
        10000.0
    }
}

/// How rotary position embeddings stretch beyond the trained context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Positions divided by `factor` (transformers' `linear`, GGUF `rope.scaling.type` linear).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling (transformers' `rope_type: llama3`): long
    /// wavelengths divided by `factor`, short ones kept, the band between blended.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: u32 },
    /// Per-frequency divisors stored in the GGUF tensor `rope_freqs.weight` (how llama.cpp
    /// carries Llama 3 scaling); the engine reads them with the weights.
    FreqFactors,
}

/// A base model's hyperparameters, everything the forward pass depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub dims: ModelDims,
    /// The context the model serves (prompt plus generation).
    pub max_position_embeddings: u32,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    /// The output projection is the token embedding.
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry biases (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection of attention carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// gate, up and down projections carry biases (Llama with `mlp_bias`).
    pub mlp_bias: bool,
}

impl ModelConfig {
    /// The rotary inverse frequencies `θ^(-2i/d)` for `i < head_dim / 2`, scaled as
    /// `rope_scaling` says; `freq_factors` are the GGUF `rope_freqs.weight` values
    /// (for [`RopeScaling::FreqFactors`]; ignored otherwise). Computed in f64, as the
    /// reference implementation does in f32 from float64-exact inputs.
    pub fn rope_inv_freq(&self, freq_factors: Option<&[f32]>) -> Vec<f64> {
        let d = self.dims.head_dim as usize;
        // transformers computes `1 / base ** (arange(0, d, 2).float() / d)` in f32.
        let base: Vec<f64> = (0..d / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / d as f32;
                f64::from(1.0f32 / (self.rope_theta as f32).powf(exponent))
            })
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::FreqFactors => match freq_factors {
                Some(ff) => base.iter().zip(ff).map(|(f, s)| f / f64::from(*s)).collect(),
                None => base,
            },
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = f64::from(*original_max_position_embeddings);
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Reads a float; `Ok(None)` when absent or null.
fn get_f64(obj: &Map<String, Value>, key: &str, what: &str) -> Result<Option<f64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64().filter(|x| x.is_finite() && *x > 0.0) {
            Some(x) => Ok(Some(x)),
            None => Err(format!("{what}: {key} must be a positive number, found {v}")),
        },
    }
}

/// The RoPE settings of a Hugging Face config: transformers 4 writes `rope_theta` and
/// `rope_scaling`, transformers 5 one `rope_parameters` object holding both.
pub(crate) fn hf_rope(obj: &Map<String, Value>, arch: Architecture) -> Result<(f64, RopeScaling), Vec<String>> {
    let mut problems = Vec::new();
    let params = match obj.get("rope_parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => Some(p),
        Some(other) => return Err(vec![format!("config.json: rope_parameters must be an object, found {other}")]),
    };
    let theta = params
        .and_then(|p| get_f64(p, "rope_theta", "config.json: rope_parameters").transpose())
        .or_else(|| get_f64(obj, "rope_theta", "config.json").transpose())
        .transpose()
        .unwrap_or_else(|e| {
            problems.push(e);
            None
        })
        .unwrap_or(arch.default_theta());
    let scaling = match obj.get("rope_scaling") {
        Some(Value::Object(s)) => Some(s),
        None | Some(Value::Null) => params,
        Some(other) => return Err(vec![format!("config.json: rope_scaling must be an object, found {other}")]),
    };
    let scaling = match scaling {
        None => RopeScaling::None,
        Some(s) => match rope_scaling(s) {
            Ok(r) => r,
            Err(e) => {
                problems.push(e);
                RopeScaling::None
            }
        },
    };
    if problems.is_empty() {
        Ok((theta, scaling))
    } else {
        Err(problems)
    }
}

/// One `rope_scaling` object (or the scaling part of `rope_parameters`).
fn rope_scaling(s: &Map<String, Value>) -> Result<RopeScaling, String> {
    // transformers reads `rope_type`, and `type` from older configs.
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let what = "config.json: rope_scaling";
    let need = |key: &str| -> Result<f64, String> {
        get_f64(s, key, what)?.ok_or_else(|| format!("{what} of type {kind} needs {key}"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: need("factor")? }),
        "llama3" => {
            let (low, high) = (need("low_freq_factor")?, need("high_freq_factor")?);
            if high <= low {
                return Err(format!("{what}: high_freq_factor ({high}) must be above low_freq_factor ({low})"));
            }
            let original = need("original_max_position_embeddings")?;
            if original.fract() != 0.0 || original > f64::from(u32::MAX) {
                return Err(format!("{what}: original_max_position_embeddings must be an integer, found {original}"));
            }
            Ok(RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original as u32,
            })
        }
        other => Err(format!(
            "{what} of type {other} is not supported (supported: default, linear, llama3); \
             hearth would compute different positions than the model was trained with"
        )),
    }
}

/// The rest of a Hugging Face config's hyperparameters, after dimensions and architecture.
pub(crate) fn hf_config(
    obj: &Map<String, Value>,
    arch: Architecture,
    dims: ModelDims,
    max_position_embeddings: Option<u32>,
    attention_bias: bool,
    mlp_bias: bool,
    tie_word_embeddings: bool,
) -> Result<ModelConfig, Vec<String>> {
    let mut problems = Vec::new();
    let eps = get_f64(obj, "rms_norm_eps", "config.json").unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let (rope_theta, rope_scaling) = hf_rope(obj, arch).unwrap_or_else(|p| {
        problems.extend(p);
        (0.0, RopeScaling::None)
    });
    let mut context = max_position_embeddings.unwrap_or(arch.default_context());
    // Mistral-style sliding-window attention equals full attention up to the window; beyond it
    // the two differ, so the context served stops at the window.
    // transformers applies the window to Mistral whenever it is set, and to Qwen2 only with
    // `use_sliding_window`; Llama has none.
    let windowed = match arch {
        Architecture::Mistral => true,
        Architecture::Qwen2 => obj.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false),
        Architecture::Llama => false,
    };
    let sliding = obj.get("sliding_window").and_then(Value::as_u64).filter(|w| windowed && *w > 0);
    if let Some(w) = sliding {
        context = context.min(u32::try_from(w).unwrap_or(u32::MAX));
    }
    if arch == Architecture::Mistral && attention_bias {
        problems.push("config.json: attention_bias is not a Mistral setting (its projections have no biases)".into());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(ModelConfig {
        architecture: arch,
        dims,
        max_position_embeddings: context,
        rms_norm_eps: eps.unwrap_or(arch.default_eps()),
        rope_theta,
        rope_scaling,
        tie_word_embeddings,
        qkv_bias: arch == Architecture::Qwen2 || attention_bias,
        o_bias: arch != Architecture::Qwen2 && attention_bias,
        mlp_bias: arch != Architecture::Qwen2 && mlp_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tiny_dims;
    use serde_json::json;

    fn config_of(arch: Architecture, obj: Value) -> Result<ModelConfig, Vec<String>> {
        let obj = obj.as_object().cloned().unwrap_or_default();
        hf_config(&obj, arch, tiny_dims(), Some(256), false, false, false)
    }

    fn config(obj: Value) -> Result<ModelConfig, Vec<String>> {
        config_of(Architecture::Llama, obj)
    }

    #[test]
    fn rope_settings_read_from_both_transformers_layouts() {
        let v4 = config(json!({"rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}))
        .expect("v4 layout");
        let v5 = config(json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}}))
        .expect("v5 layout");
        assert_eq!(v4, v5);
        assert_eq!(v4.rope_theta, 500000.0);
        assert!(matches!(v4.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let plain = config(json!({})).expect("defaults");
        assert_eq!((plain.rope_theta, plain.rms_norm_eps), (10000.0, 1e-6));
        assert_eq!(plain.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn unsupported_rope_types_are_refused_by_name() {
        let err = config(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})).expect_err("yarn");
        assert!(err[0].contains("rope_scaling of type yarn is not supported"), "{err:?}");
        let err = config(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})).expect_err("incomplete");
        assert!(err[0].contains("needs low_freq_factor"), "{err:?}");
    }

    #[test]
    fn llama3_scaling_keeps_short_wavelengths_and_divides_long_ones() {
        let c = config(json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}))
        .expect("config");
        let plain = ModelConfig { rope_scaling: RopeScaling::None, ..c.clone() }.rope_inv_freq(None);
        let scaled = c.rope_inv_freq(None);
        // The highest frequency has a wavelength of 2π, under 64 / 4: unchanged.
        assert_eq!(scaled[0], plain[0]);
        // The lowest has a wavelength far beyond 64: divided by the factor.
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn a_sliding_window_bounds_the_context() {
        let c = config_of(Architecture::Mistral, json!({"sliding_window": 128})).expect("config");
        assert_eq!(c.max_position_embeddings, 128);
        let c = config_of(Architecture::Qwen2, json!({"sliding_window": 128, "use_sliding_window": false}))
            .expect("config");
        assert_eq!(c.max_position_embeddings, 256);
        let c =
            config_of(Architecture::Qwen2, json!({"sliding_window": 128, "use_sliding_window": true})).expect("config");
        assert_eq!(c.max_position_embeddings, 128);
        assert_eq!(config(json!({"sliding_window": 128})).expect("llama").max_position_embeddings, 256);
    }
}
