//! LoRA adapters in the PEFT on-disk format (`adapter_config.json` +
//! `adapter_model.safetensors`), loaded for the Llama family: each patched projection gets
//! `A [r, in]` and `B [out, r]` and a scale (`alpha/r`, or `alpha/√r` for rsLoRA, per
//! `rank_pattern` and `alpha_pattern`), kept in the file's float format, so applying it is a
//! shrink and an expand (see `kernels::lora`).
//!
//! The checks and the rank and scale of each module come from hearth-formats, the code
//! `:validateUpload` runs, so an adapter that validates is one the engine loads. What hearth
//! does not implement is refused by name there (DoRA, `modules_to_save`, biases, embedding or
//! `lm_head` targets, `.bin` weights), and so is an adapter that does not fit the base model or
//! patches nothing: a silently ignored adapter would answer as the base model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

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

    fn from_module(m: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.module() == m)
    }
}

/// Every patched projection of an adapter, by layer and target, in the layout the CPU kernel
/// reads (see [`crate::kernels::lora`]): A and B packed in the file's float format, B's rows
/// already permuted for a GGUF base, the scale kept beside them.
///
/// A slot per (layer, target) rather than a hash map: the forward pass looks a module up for
/// every adapter of a step in every projection (6,720 times a step for 32 adapters on
/// SmolLM2's 30 layers).
#[derive(Debug, Default)]
pub struct Modules {
    slots: Vec<Option<LoraPair>>,
}

impl Modules {
    /// `Target::ALL` lists the targets in declaration order, so `target as usize` is its
    /// index there, which `iter` maps back (a test pins it).
    fn slot(layer: usize, target: Target) -> usize {
        layer * Target::ALL.len() + target as usize
    }

    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.slots.get(Self::slot(layer, target))?.as_ref()
    }

    fn insert(&mut self, layer: usize, target: Target, pair: LoraPair) {
        let i = Self::slot(layer, target);
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        self.slots[i] = Some(pair);
    }

    /// Every patched projection, as (layer, target) and its module.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.slots.iter().enumerate().filter_map(|(i, p)| {
            let n = Target::ALL.len();
            Some((i / n, Target::ALL[i % n], p.as_ref()?))
        })
    }

    /// Projections patched.
    pub fn len(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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
        self.modules.get(layer, target)
    }

    /// The device copies of a module (models not on the CPU).
    pub fn device_module(&self, layer: usize, target: Target) -> Option<&(Tensor, Tensor)> {
        self.on_device.as_ref().and_then(|m| m.get(&(layer, target)))
    }

    /// Every patched projection, as (layer, target) and its module.
    pub fn modules(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.modules.iter()
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
            for (layer, target, p) in self.stored.iter() {
                let a = Tensor::from_vec(p.a_f32(), (p.rank, p.n_in), device)?;
                let b = Tensor::from_vec(p.b_f32(), (p.n_out, p.rank), device)?;
                m.insert((layer, target), (a, (b * p.scale as f64)?));
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

/// Loads a PEFT LoRA adapter directory for a base with config `base`. The checks, and the
/// rank and scale of every module, are hearth-formats' (the same `:validateUpload` runs on
/// an addon against its base); this reads the matrices they name. `gguf_layout` says the base
/// stores Q and K rows as GGUF does.
pub fn load_peft(
    name: &str,
    dir: &Path,
    base: &LlamaConfig,
    gguf_layout: bool,
    device: &Device,
) -> Result<LoraAdapter> {
    let summary = hearth_formats::inspect_adapter(dir).map_err(|p| refuse(p.to_string()))?;
    let problems = hearth_formats::check_adapter_against_base(&summary, &base.dims(), base.architecture.name());
    if !problems.is_empty() {
        return Err(refuse(problems.join("; ")));
    }
    let read = |file: &str| std::fs::read(dir.join(file)).map_err(|e| refuse(format!("{file}: {e}")));
    let config = read("adapter_config.json")?;
    let bytes = read("adapter_model.safetensors")?;
    let version = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(&config);
        h.update(&bytes);
        hex_prefix(&h.finalize())
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| refuse(format!("adapter_model.safetensors: {e}")))?;

    let mut modules = Modules::default();
    let mut total = 0usize;
    for m in &summary.modules {
        let path = m.path();
        let target = Target::from_module(&m.module)
            .ok_or_else(|| refuse(format!("{path}: {} is not a projection hearth patches", m.module)))?;
        let tensor = |which: &str| {
            let key = format!("base_model.model.{path}.{which}.weight");
            tensors.get(&key).ok_or_else(|| refuse(format!("tensor {key} is missing")))
        };
        let (a, b) = (tensor("lora_A")?, tensor("lora_B")?);
        let (rank, n_in, n_out) = (m.rank as usize, m.in_features as usize, m.out_features as usize);
        let permute_heads = match target {
            Target::Q if gguf_layout => Some(base.num_attention_heads),
            Target::K if gguf_layout => Some(base.num_key_value_heads),
            _ => None,
        };
        let b = match permute_heads {
            Some(heads) => permute_rows(b, heads)?,
            None => b.clone(),
        };
        let pair = LoraPair::new(&to_matrix(a)?, &to_matrix(&b)?, rank, n_in, n_out, m.scale as f32);
        total += pair.size_in_bytes();
        modules.insert(m.layer as usize, target, pair);
    }
    let ranks: Vec<usize> = summary.ranks.iter().map(|&r| r as usize).collect();
    Ok(LoraAdapter {
        name: name.to_string(),
        version,
        stored: Arc::new(modules),
        hot: Default::default(),
        ranks,
        bytes: total,
        target_modules: summary.target_modules,
        requests: Default::default(),
        tokens: Default::default(),
    })
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module stored under every (layer, target) is found there again, and `iter` names each
    /// by the layer and target it was stored under (what `Modules::slot` relies on).
    #[test]
    fn modules_are_found_by_layer_and_target() {
        let pair = |n: usize| {
            let m = LoraMatrix::F32(vec![n as f32; 4 * 8]);
            LoraPair::new(&m, &LoraMatrix::F32(vec![0.0; 8 * 4]), 4, 8, 8, n as f32)
        };
        let mut modules = Modules::default();
        let mut stored = Vec::new();
        for layer in [0, 2] {
            for (i, &target) in Target::ALL.iter().enumerate() {
                let n = layer * 10 + i;
                modules.insert(layer, target, pair(n));
                stored.push((layer, target, n as f32));
            }
        }
        assert_eq!(modules.len(), 14);
        assert!(modules.get(1, Target::Q).is_none() && modules.get(3, Target::Q).is_none());
        for &(layer, target, scale) in &stored {
            assert_eq!(modules.get(layer, target).map(|p| p.scale), Some(scale), "{layer} {target:?}");
        }
        let listed: Vec<(usize, Target, f32)> = modules.iter().map(|(l, t, p)| (l, t, p.scale)).collect();
        assert_eq!(listed, stored);
    }
}
