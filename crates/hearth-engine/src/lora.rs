//! LoRA adapters in the PEFT on-disk format (`adapter_config.json` +
//! `adapter_model.safetensors`), loaded for the Llama family: each patched projection gets
//! `A [r, in]` and `B [out, r]` and a scale (`alpha/r`, or `alpha/√r` for rsLoRA, per
//! `rank_pattern` and `alpha_pattern`), kept in the file's float format, so applying it is a
//! shrink and an expand (see `kernels::lora`).
//!
//! What hearth does not implement is refused by name (DoRA, `modules_to_save`, biases,
//! embedding or `lm_head` targets, `.bin` weights), and so is an adapter that does not fit the
//! base model or patches nothing: a silently ignored adapter would answer as the base model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{EngineError, Result};
pub use crate::kernels::lora::{LoraMatrix, LoraPair};
use crate::model::LlamaConfig;

/// The projections an adapter may patch, in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    fn from_module(m: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.module() == m)
    }

    /// (out, in) of this projection in the base model.
    fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (h, q, kv, i) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
            c.intermediate_size,
        );
        match self {
            Target::Q => (q, h),
            Target::K | Target::V => (kv, h),
            Target::O => (h, q),
            Target::Gate | Target::Up => (i, h),
            Target::Down => (h, i),
        }
    }
}

/// Every patched projection of an adapter, by layer and target, in the layout the CPU kernel
/// reads (see [`crate::kernels::lora`]): A and B packed in the file's float format, B's rows
/// already permuted for a GGUF base, the scale kept beside them.
pub type Modules = HashMap<(usize, Target), LoraPair>;

/// An adapter's hot form: what the forward pass reads. On the CPU the kernel reads the
/// stored layout directly, so the hot form shares the stored bytes and preparing costs no
/// copy; on a GPU it is each module's A and scaled B uploaded to the device in F32.
#[derive(Debug)]
pub struct LoraWeights {
    modules: Arc<Modules>,
    /// Device copies, `(A [r, in], B·scale [out, r])`, when the model is not on the CPU.
    on_device: Option<HashMap<(usize, Target), (Tensor, Tensor)>>,
}

impl LoraWeights {
    pub fn module(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.modules.get(&(layer, target))
    }

    /// The device copies of a module (models not on the CPU).
    pub fn device_module(&self, layer: usize, target: Target) -> Option<&(Tensor, Tensor)> {
        self.on_device.as_ref().and_then(|m| m.get(&(layer, target)))
    }

    /// Every patched projection, as (layer, target) and its module.
    pub fn modules(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.modules.iter().map(|((l, t), m)| (*l, *t, m))
    }
}

/// `scale · B · A` as a dense F32 `[out, in]` tensor on `device`: what merging adds to the
/// base weight.
pub fn dense_delta(m: &LoraPair, device: &Device) -> Result<Tensor> {
    let a = Tensor::from_vec(m.a_f32(), (m.rank, m.n_in), device)?;
    let b = Tensor::from_vec(m.b_f32(), (m.n_out, m.rank), device)?;
    Ok((b.matmul(&a)? * m.scale as f64)?)
}

/// A loaded adapter. It always holds its checked modules as loaded (cold: host memory,
/// counted against the adapter budget); it is hot while it also holds the prepared
/// [`LoraWeights`]. The engine's scheduler decides which adapters are hot (an LRU of at most
/// `max_hot_adapters`), preparing one when a request needs it and dropping the prepared form
/// of the least recently used.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// A content hash of the adapter's files: its version.
    pub version: String,
    stored: Arc<Modules>,
    hot: std::sync::RwLock<Option<Arc<LoraWeights>>>,
    pub ranks: Vec<usize>,
    /// Host memory the stored (cold) form takes.
    pub bytes: usize,
    pub target_modules: Vec<String>,
    /// Requests and generated tokens served with this adapter (this version).
    pub requests: std::sync::atomic::AtomicU64,
    pub tokens: std::sync::atomic::AtomicU64,
}

impl LoraAdapter {
    pub fn patched(&self) -> usize {
        self.stored.len()
    }

    /// The prepared form, if the adapter is hot.
    pub fn weights(&self) -> Option<Arc<LoraWeights>> {
        self.hot.read().ok().and_then(|h| h.clone())
    }

    pub fn is_hot(&self) -> bool {
        self.weights().is_some()
    }

    /// Makes the adapter hot for a model on `device` (a no-op when it is) and returns its
    /// prepared form.
    pub fn prepare(&self, device: &Device) -> Result<Arc<LoraWeights>> {
        if let Some(w) = self.weights() {
            return Ok(w);
        }
        let on_device = if device.is_cpu() {
            None
        } else {
            let mut m = HashMap::with_capacity(self.stored.len());
            for (key, p) in self.stored.iter() {
                let a = Tensor::from_vec(p.a_f32(), (p.rank, p.n_in), device)?;
                let b = Tensor::from_vec(p.b_f32(), (p.n_out, p.rank), device)?;
                m.insert(*key, (a, (b * p.scale as f64)?));
            }
            Some(m)
        };
        let w = Arc::new(LoraWeights { modules: self.stored.clone(), on_device });
        if let Ok(mut h) = self.hot.write() {
            *h = Some(w.clone());
        }
        Ok(w)
    }

    /// Drops the prepared form; requests that hold it keep it until they finish.
    pub fn evict(&self) {
        if let Ok(mut h) = self.hot.write() {
            *h = None;
        }
    }
}

#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
}

/// PEFT's pattern rule: a key applies to a module whose full name is the key or ends with
/// `.key`.
fn pattern<'a, T>(patterns: &'a BTreeMap<String, T>, full: &str) -> Option<&'a T> {
    patterns.iter().find(|(k, _)| full == k.as_str() || full.ends_with(&format!(".{k}"))).map(|(_, v)| v)
}

fn refuse(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest(msg.into())
}

/// GGUF files store Q and K rows permuted for llama.cpp's interleaved rotary embedding
/// (`convert_hf_to_gguf.py`'s `permute`); an adapter trained on the Hugging Face layout must
/// have its B rows permuted the same way to patch such a base.
fn permute_rows(b: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, r) = b.dims2()?;
    let hd = out / heads;
    Ok(b.reshape((heads, 2, hd / 2, r))?.transpose(1, 2)?.contiguous()?.reshape((out, r))?)
}

/// A 2-D tensor's values, row-major, in its own float format (F64 and F8 narrowed to F32).
fn to_matrix(t: &Tensor) -> Result<LoraMatrix> {
    let t = t.contiguous()?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F16 => LoraMatrix::F16(t.to_vec1()?),
        DType::BF16 => LoraMatrix::BF16(t.to_vec1()?),
        _ => LoraMatrix::F32(t.to_dtype(DType::F32)?.to_vec1()?),
    })
}

/// Loads and checks a PEFT LoRA adapter directory against the base model's config.
/// `gguf_layout` says the base stores Q and K rows as GGUF does.
pub fn load_peft(
    name: &str,
    dir: &Path,
    base: &LlamaConfig,
    gguf_layout: bool,
    device: &Device,
) -> Result<LoraAdapter> {
    if dir.join("adapter_model.bin").exists() && !dir.join("adapter_model.safetensors").exists() {
        return Err(refuse(
            "adapter_model.bin: .bin (pickle) weights are not supported; save the adapter with safe_serialization=True",
        ));
    }
    let cfg_path = dir.join("adapter_config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        refuse(format!("{}: {e} (a PEFT adapter directory has adapter_config.json)", cfg_path.display()))
    })?;
    let cfg: PeftConfig = serde_json::from_str(&cfg_text)
        .map_err(|e| refuse(format!("adapter_config.json is not a PEFT LoRA config: {e}")))?;
    if let Some(t) = cfg.peft_type.as_deref().filter(|t| *t != "LORA") {
        return Err(refuse(format!("peft_type {t} is not supported; only LORA adapters are")));
    }
    if cfg.use_dora {
        return Err(refuse("use_dora: DoRA adapters are not supported; train a plain LoRA (use_dora=False)"));
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(refuse(format!(
            "modules_to_save {:?}: adapters that replace whole modules are not supported",
            cfg.modules_to_save.unwrap_or_default()
        )));
    }
    if cfg.bias.as_deref().is_some_and(|b| b != "none") || cfg.lora_bias {
        return Err(refuse(format!(
            "bias {:?}: adapters that train biases are not supported; use bias=\"none\"",
            cfg.bias.unwrap_or_else(|| "lora_bias".into())
        )));
    }
    if cfg.fan_in_fan_out {
        return Err(refuse("fan_in_fan_out: adapters stored transposed (Conv1D layers) are not supported"));
    }
    let targets: Vec<String> = match &cfg.target_modules {
        Some(serde_json::Value::Array(v)) => v.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        Some(serde_json::Value::String(s)) => {
            return Err(refuse(format!("target_modules as a regex ({s:?}) is not supported; list the module names")))
        }
        _ => Vec::new(),
    };
    for t in &targets {
        if t == "embed_tokens" || t == "lm_head" {
            return Err(refuse(format!(
                "target_modules includes {t}: embedding and lm_head adapters are not supported"
            )));
        }
    }
    let layers: Option<Vec<usize>> = match &cfg.layers_to_transform {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
        Some(serde_json::Value::Array(v)) => Some(v.iter().filter_map(|x| x.as_u64().map(|n| n as usize)).collect()),
        Some(other) => {
            return Err(refuse(format!("layers_to_transform {other} is not a layer index or a list of them")))
        }
    };

    let st_path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st_path).map_err(|e| refuse(format!("{}: {e}", st_path.display())))?;
    let version = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(cfg_text.as_bytes());
        h.update(&bytes);
        hex_prefix(&h.finalize())
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| refuse(format!("adapter_model.safetensors: {e}")))?;

    let alpha = cfg.lora_alpha.unwrap_or(cfg.r as f64);
    let mut pairs: HashMap<(usize, Target), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    // Modules the base architecture does not have; named in the refusal below.
    let mut unknown: Vec<String> = Vec::new();
    for (key, t) in &tensors {
        // base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight
        let Some(rest) = key.strip_prefix("base_model.model.") else {
            return Err(refuse(format!("tensor {key}: not a PEFT LoRA tensor name")));
        };
        if rest.contains("embed_tokens") || rest.contains("lm_head") {
            return Err(refuse(format!("tensor {key}: embedding and lm_head adapters are not supported")));
        }
        let parts: Vec<&str> = rest.split('.').collect();
        let (layer, module, which) = match parts.as_slice() {
            ["model", "layers", i, _, m, ab, "weight"] => (i.parse::<usize>().ok(), *m, *ab),
            _ => return Err(refuse(format!("tensor {key}: not a LoRA weight of a decoder layer"))),
        };
        let Some(layer) = layer else { return Err(refuse(format!("tensor {key}: bad layer index"))) };
        let Some(target) = Target::from_module(module) else {
            if !unknown.iter().any(|u| u == module) {
                unknown.push(module.to_string());
            }
            continue;
        };
        if layer >= base.num_hidden_layers {
            return Err(refuse(format!(
                "tensor {key}: layer {layer} but the base model has {} layers",
                base.num_hidden_layers
            )));
        }
        let entry = pairs.entry((layer, target)).or_default();
        match which {
            "lora_A" => entry.0 = Some(t.clone()),
            "lora_B" => entry.1 = Some(t.clone()),
            other => return Err(refuse(format!("tensor {key}: {other} is not lora_A or lora_B"))),
        }
    }

    let mut modules = HashMap::new();
    let mut ranks = Vec::new();
    let mut total = 0usize;
    for ((layer, target), (a, b)) in pairs {
        let full = format!("model.layers.{layer}.{}.{}", target.path(), target.module());
        let (Some(a), Some(b)) = (a, b) else {
            return Err(refuse(format!("{full}: lora_A and lora_B must both be present")));
        };
        if layers.as_ref().is_some_and(|l| !l.contains(&layer)) {
            return Err(refuse(format!("{full}: weights for a layer outside layers_to_transform")));
        }
        let (out_f, in_f) = target.shape(base);
        let (ra, ia) = a.dims2()?;
        let (ob, rb) = b.dims2()?;
        if ia != in_f || ob != out_f {
            return Err(refuse(format!(
                "{full}: lora_A is [{ra}, {ia}] and lora_B [{ob}, {rb}], but the base model's {} is [{out_f}, {in_f}] \
                 (hidden size {}): the adapter was trained for another base model",
                target.module(),
                base.hidden_size
            )));
        }
        if ra != rb {
            return Err(refuse(format!("{full}: lora_A has rank {ra} but lora_B rank {rb}")));
        }
        let expected_r = *pattern(&cfg.rank_pattern, &full).unwrap_or(&cfg.r);
        if ra != expected_r {
            return Err(refuse(format!("{full}: rank {ra} but adapter_config.json says {expected_r}")));
        }
        let a_alpha = *pattern(&cfg.alpha_pattern, &full).unwrap_or(&alpha);
        let scale = if cfg.use_rslora { a_alpha / (ra as f64).sqrt() } else { a_alpha / ra as f64 };
        let permute_heads = match target {
            Target::Q if gguf_layout => Some(base.num_attention_heads),
            Target::K if gguf_layout => Some(base.num_key_value_heads),
            _ => None,
        };
        if !a.dtype().is_float() || !b.dtype().is_float() {
            return Err(refuse(format!("{full}: LoRA weights must be floating point, found {:?}", a.dtype())));
        }
        let b = match permute_heads {
            Some(heads) => permute_rows(&b, heads)?,
            None => b,
        };
        let pair = LoraPair::new(&to_matrix(&a)?, &to_matrix(&b)?, ra, in_f, out_f, scale as f32);
        total += pair.size_in_bytes();
        ranks.push(ra);
        modules.insert((layer, target), pair);
    }
    if modules.is_empty() {
        return Err(refuse(format!(
            "the adapter patches no module of the base model (target_modules {targets:?}{}); \
             hearth applies LoRA to q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj",
            if unknown.is_empty() { String::new() } else { format!(", tensors for {}", unknown.join(", ")) }
        )));
    }
    if !unknown.is_empty() {
        return Err(refuse(format!(
            "module(s) {} are not projections of the {} architecture; the adapter was made for another model",
            unknown.join(", "),
            base.architecture.name()
        )));
    }
    ranks.sort_unstable();
    ranks.dedup();
    let mut target_modules: Vec<String> = modules.keys().map(|(_, t)| t.module().to_string()).collect();
    target_modules.sort();
    target_modules.dedup();
    Ok(LoraAdapter {
        name: name.to_string(),
        version,
        stored: Arc::new(modules),
        hot: Default::default(),
        ranks,
        bytes: total,
        target_modules,
        requests: Default::default(),
        tokens: Default::default(),
    })
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
