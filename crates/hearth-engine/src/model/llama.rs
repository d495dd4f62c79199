//! The Llama family's forward pass (Llama, Mistral, Qwen2 with q/k/v biases) over a batch of
//! sequences at once: every token of every sequence in the step goes through each matrix
//! multiplication together; only attention runs per sequence, against that sequence's own
//! KV cache. This is what lets prefill chunks and decode rows share one step.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};

use super::config::{LlamaConfig, ModelConfig, RopeScaling};
use super::kv::{HostKv, KvCache, KvDtype};
use super::weights::{Checkpoint, Embedding, Linear, Precision};
use crate::error::{EngineError, Result};
use crate::kernels::attention::{attend, Heads, Rows};
use crate::kernels::lora::Group;
use crate::kernels::ops;
use crate::lora::{LoraWeights, Target};

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The base projections a merge replaced, kept to restore them exactly.
pub struct Unmerge(Vec<(usize, Target, Linear)>);

pub struct LlamaModel {
    pub config: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// GGUF files store Q and K rows permuted for llama.cpp's interleaved rotary embedding;
    /// Hugging Face checkpoints use the rotate-half form.
    rope_interleaved: bool,
    device: Device,
    /// On the CPU, host copies of the small vectors `forward_host` reads.
    host: Option<Host>,
}

/// The norm weights and rotary tables as host buffers.
struct Host {
    /// Per layer, the attention and MLP norms.
    norms: Vec<(Vec<f32>, Vec<f32>)>,
    norm: Vec<f32>,
    /// `[max_positions, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// What the caller wants back for one sequence of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Nothing: a prefill chunk that is not the prompt's last.
    None,
    /// The next-token distribution after the last token.
    Last,
    /// One distribution after every token of the chunk (prompt logprobs, echo).
    All,
}

/// One sequence's part of a step: its new tokens, appended after what its cache holds, and
/// the LoRA adapter (if any, in its prepared form) its projections get.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
    pub adapter: Option<&'a LoraWeights>,
}

/// A run of consecutive rows of the step that share an adapter (or none). Computed once per
/// step; every layer reuses it.
struct Segment<'a> {
    start: usize,
    len: usize,
    adapter: Option<&'a LoraWeights>,
}

/// Attention of one layer for every sequence of a step, from the queries `[total, nh, hd]`,
/// over the host caches (all of one dtype, as the engine makes them).
fn attend_caches(seqs: &[SeqInput<'_>], layer: usize, q: &[f32], total: usize, heads: Heads) -> Result<Vec<f32>> {
    let mut f32s = Vec::new();
    let mut f16s = Vec::new();
    let mut row = 0;
    for s in seqs {
        let n = s.tokens.len();
        if n > 0 {
            let start = s.cache.len();
            match s.cache.host_layout(layer)? {
                HostKv::F32(kv) => f32s.push(Rows { row, n, start, kv }),
                HostKv::F16(kv) => f16s.push(Rows { row, n, start, kv }),
            }
        }
        row += n;
    }
    match (f32s.is_empty(), f16s.is_empty()) {
        (_, true) => Ok(attend(q, total, &f32s, heads)),
        (true, false) => Ok(attend(q, total, &f16s, heads)),
        (false, false) => Err(EngineError::Internal("one step mixes f32 and f16 KV caches".into())),
    }
}

/// What every layer of a step reads: the tokens, their positions, the runs of rows that share
/// an adapter, and the rows whose logits are wanted.
#[derive(Clone, Copy)]
struct Step<'a> {
    ids: &'a [u32],
    positions: &'a [u32],
    segments: &'a [Segment<'a>],
    rows: &'a [u32],
}

/// Adds each segment's LoRA delta for `target` of `layer` to `y`, the base projection of `x`.
/// The base matmul already ran once for all rows; each adapter adds its shrink and expand over
/// its own rows only, as two matmuls on the adapter's device copies. (On the CPU,
/// `forward_host` runs one kernel call over every segment, in place.)
fn with_lora<'a>(y: Tensor, x: &Tensor, layer: usize, target: Target, segments: &[Segment<'a>]) -> Result<Tensor> {
    let patched = |s: &Segment<'a>| s.adapter.and_then(|a| a.module(layer, target));
    if !segments.iter().any(|s| patched(s).is_some()) {
        return Ok(y);
    }
    let out = y.dim(1)?;
    let mut pieces = Vec::with_capacity(segments.len());
    for s in segments {
        match s.adapter.and_then(|a| a.device_module(layer, target)) {
            Some((a, b)) => {
                let rows = x.narrow(0, s.start, s.len)?;
                pieces.push(rows.matmul(&a.t()?.to_dtype(rows.dtype())?)?.matmul(&b.t()?.to_dtype(rows.dtype())?)?)
            }
            None if patched(s).is_some() => {
                return Err(EngineError::Internal("an adapter on a GPU model has no device copy".into()))
            }
            None => pieces.push(Tensor::zeros((s.len, out), y.dtype(), y.device())?),
        }
    }
    Ok((y + Tensor::cat(&pieces, 0)?)?)
}

/// Names of one layer's tensors in each checkpoint format.
fn names(gguf: bool, i: usize) -> [String; 9] {
    if gguf {
        ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
            .map(|n| format!("blk.{i}.{n}"))
    } else {
        [
            "input_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
        .map(|n| format!("model.layers.{i}.{n}"))
    }
}

impl LlamaModel {
    /// Loads a GGUF file whose header hearth-formats read as `config`.
    pub fn load_gguf(
        path: &Path,
        config: &ModelConfig,
        precision: Precision,
        device: &Device,
    ) -> Result<(LlamaModel, Checkpoint)> {
        let mut ckpt = Checkpoint::open_gguf(path)?;
        let model = Self::build(LlamaConfig::from(config), &mut ckpt, true, precision, device)?;
        Ok((model, ckpt))
    }

    /// Loads a Hugging Face directory whose `config.json` hearth-formats read as `config`:
    /// its safetensors, one file or an index of shards.
    pub fn load_hf(dir: &Path, config: &ModelConfig, precision: Precision, device: &Device) -> Result<LlamaModel> {
        let files: Vec<PathBuf> = if dir.join("model.safetensors.index.json").exists() {
            let text = std::fs::read_to_string(dir.join("model.safetensors.index.json"))
                .map_err(|e| EngineError::InvalidModel(format!("model.safetensors.index.json: {e}")))?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| EngineError::InvalidModel(format!("model.safetensors.index.json: {e}")))?;
            let mut shards: Vec<String> = index["weight_map"]
                .as_object()
                .ok_or_else(|| EngineError::InvalidModel("model.safetensors.index.json has no weight_map".into()))?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut ckpt = Checkpoint::open_hf(&files)?;
        Self::build(LlamaConfig::from(config), &mut ckpt, false, precision, device)
    }

    fn build(
        config: LlamaConfig,
        ckpt: &mut Checkpoint,
        gguf: bool,
        precision: Precision,
        device: &Device,
    ) -> Result<LlamaModel> {
        let c = &config;
        let (h, q_out, kv_out, inter) = (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
            c.intermediate_size,
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let [an, q, k, v, o, mn, g, u, d] = names(gguf, i);
            let hp = &c.hparams;
            let bias = |n: &str, has: bool| has.then(|| format!("{n}.bias"));
            let mut linear = |n: &str, has_bias: bool, shape: (usize, usize)| {
                ckpt.linear(&format!("{n}.weight"), bias(n, has_bias).as_deref(), shape, precision, device)
            };
            let (q, k, v, o) = (
                linear(&q, hp.qkv_bias, (q_out, h))?,
                linear(&k, hp.qkv_bias, (kv_out, h))?,
                linear(&v, hp.qkv_bias, (kv_out, h))?,
                linear(&o, hp.o_bias, (h, q_out))?,
            );
            let (gate, up, down) = (
                linear(&g, hp.mlp_bias, (inter, h))?,
                linear(&u, hp.mlp_bias, (inter, h))?,
                linear(&d, hp.mlp_bias, (h, inter))?,
            );
            layers.push(Layer {
                attn_norm: ckpt.vector(&format!("{an}.weight"), h, device)?,
                q,
                k,
                v,
                o,
                mlp_norm: ckpt.vector(&format!("{mn}.weight"), h, device)?,
                gate,
                up,
                down,
            });
        }
        let (embed_name, norm_name, out_name) = if gguf {
            ("token_embd.weight", "output_norm.weight", "output.weight")
        } else {
            ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        };
        let embed = ckpt.embedding(embed_name, (c.vocab_size, h), precision, device)?;
        let norm = ckpt.vector(norm_name, h, device)?;
        // A Hugging Face config that ties embeddings uses them even if an lm_head tensor is
        // present; a GGUF is tied exactly when it has no output tensor.
        let lm_head = if (gguf || !c.tie_word_embeddings) && ckpt.has(out_name) {
            ckpt.linear(out_name, None, (c.vocab_size, h), precision, device)?
        } else {
            ckpt.tied_output(embed_name, (c.vocab_size, h), precision, device)?
        };
        // Llama 3 scaling in a GGUF: per-frequency divisors stored beside the weights.
        let freq_factors = match c.hparams.rope_scaling {
            RopeScaling::FreqFactors => {
                Some(ckpt.vector("rope_freqs.weight", c.head_dim / 2, &Device::Cpu)?.to_vec1::<f32>()?)
            }
            _ => None,
        };
        let (cos, sin) = rope_tables(c, freq_factors.as_deref(), device)?;
        let host = if device.is_cpu() {
            let vec = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
            Some(Host {
                norms: layers.iter().map(|l| Ok((vec(&l.attn_norm)?, vec(&l.mlp_norm)?))).collect::<Result<_>>()?,
                norm: vec(&norm)?,
                cos: vec(&cos)?,
                sin: vec(&sin)?,
            })
        } else {
            None
        };
        Ok(LlamaModel {
            config,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            rope_interleaved: gguf,
            device: device.clone(),
            host,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether Q and K rows are in GGUF's permuted layout (adapters must follow it).
    pub fn gguf_layout(&self) -> bool {
        self.rope_interleaved
    }

    /// An empty KV cache for one sequence, storing keys and values as `dtype`.
    pub fn new_cache(&self, dtype: KvDtype) -> KvCache {
        let c = &self.config;
        KvCache::new(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype, &self.device)
    }

    fn projection(&mut self, layer: usize, target: Target) -> Option<&mut Linear> {
        let l = self.layers.get_mut(layer)?;
        Some(match target {
            Target::Q => &mut l.q,
            Target::K => &mut l.k,
            Target::V => &mut l.v,
            Target::O => &mut l.o,
            Target::Gate => &mut l.gate,
            Target::Up => &mut l.up,
            Target::Down => &mut l.down,
        })
    }

    /// Folds an adapter into the weights (`W + B·A` for every projection it patches), so
    /// requests run it with no per-token LoRA work. Returns the projections it replaced;
    /// [`LlamaModel::unmerge`] puts them back, so the base is restored exactly however many
    /// adapters are merged in turn. All new projections are built before any is swapped in: a
    /// failure leaves the model as it was.
    pub fn merge(&mut self, w: &LoraWeights) -> Result<Unmerge> {
        let mut merged = Vec::new();
        for (layer, target, m) in w.modules() {
            let delta = crate::lora::dense_delta(m, &self.device)?;
            let base = self.projection(layer, target).ok_or_else(|| {
                EngineError::InvalidRequest(format!("the adapter patches layer {layer}, which the model lacks"))
            })?;
            merged.push((layer, target, base.merged(&delta)?));
        }
        let mut originals = Vec::with_capacity(merged.len());
        for (layer, target, linear) in merged {
            if let Some(slot) = self.projection(layer, target) {
                originals.push((layer, target, std::mem::replace(slot, linear)));
            }
        }
        Ok(Unmerge(originals))
    }

    /// Restores the projections a merge replaced.
    pub fn unmerge(&mut self, u: Unmerge) {
        for (layer, target, linear) in u.0 {
            if let Some(slot) = self.projection(layer, target) {
                *slot = linear;
            }
        }
    }

    /// The context length at which a token's attention costs a step as much as the rest of
    /// its work (the projections), for the scheduler's cost model (`plan::Cost`): the ratio of
    /// the multiply-adds, weighted by how fast each kind runs. hearth's quantized CPU kernels
    /// multiply in 8-bit integers at about twice the rate of the f32 attention (measured on
    /// SmolLM2-135M Q4_1: equal cost at about 1,450 positions, where the ratio of
    /// multiply-adds is 3,000); dense weights run at about the attention's rate.
    pub fn attention_span(&self) -> f64 {
        let c = &self.config;
        let projections: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|x| x.in_features * x.out_features)
                    .sum::<usize>()
            })
            .sum();
        let attention = 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim;
        let speed = if self.layers.first().is_some_and(|l| l.q.is_fast()) { 0.5 } else { 1.0 };
        (projections as f64 * speed / attention.max(1) as f64).max(1.0)
    }

    /// The KV cache type when none is configured: F32 when every weight is f32 (the exact
    /// path, which the reference tests pin), else F16 (see `KvDtype`).
    pub fn default_kv_dtype(&self) -> KvDtype {
        let all_f32 = self
            .layers
            .iter()
            .all(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().all(|x| x.is_dense_f32()))
            && self.lm_head.is_dense_f32();
        if all_f32 {
            KvDtype::F32
        } else {
            KvDtype::F16
        }
    }

    /// Bytes of the weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|x| x.size_in_bytes()).sum::<usize>())
            .sum::<usize>()
            + self.lm_head.size_in_bytes()
    }

    /// Runs one step over all `seqs` and returns, per sequence, the logits it asked for:
    /// `[1, vocab]` for `Last`, `[tokens, vocab]` for `All`.
    pub fn forward(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<Option<Tensor>>> {
        let c = &self.config;
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if total == 0 {
            return Ok(seqs.iter().map(|_| None).collect());
        }
        let mut ids = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for s in seqs.iter_mut() {
            if s.tokens.iter().any(|&t| t as usize >= c.vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id out of range (vocabulary of {})",
                    c.vocab_size
                )));
            }
            let start = s.cache.len();
            if start + s.tokens.len() > c.max_position_embeddings {
                return Err(EngineError::InvalidRequest(format!(
                    "sequence of {} tokens exceeds the model's context of {}",
                    start + s.tokens.len(),
                    c.max_position_embeddings
                )));
            }
            s.cache.reserve(s.tokens.len())?;
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }

        let mut segments: Vec<Segment<'_>> = Vec::new();
        let mut row = 0;
        for s in seqs.iter() {
            let n = s.tokens.len();
            let same = |a: Option<&LoraWeights>, b: Option<&LoraWeights>| match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => std::ptr::eq(a, b),
                _ => false,
            };
            match segments.last_mut() {
                Some(last) if same(last.adapter, s.adapter) => last.len += n,
                _ => segments.push(Segment { start: row, len: n, adapter: s.adapter }),
            }
            row += n;
        }
        segments.retain(|s| s.len > 0);

        // The rows that need logits. One lm_head product serves them all: the head is the
        // largest matrix of a small model, and run per sequence it would be read from memory
        // once per sequence per step instead of once.
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for s in seqs.iter() {
            let n = s.tokens.len();
            let start = rows.len();
            match s.logits {
                _ if n == 0 => {}
                Logits::None => {}
                Logits::Last => rows.push((offset + n - 1) as u32),
                Logits::All => rows.extend((offset..offset + n).map(|r| r as u32)),
            }
            spans.push((rows.len() > start).then_some((start, rows.len() - start)));
            offset += n;
        }

        let step = Step { ids: &ids, positions: &positions, segments: &segments, rows: &rows };
        let logits = match &self.host {
            Some(host) => self.forward_host(host, seqs, &step)?,
            None => self.forward_device(seqs, &step)?,
        };
        for s in seqs.iter_mut() {
            s.cache.commit(s.tokens.len());
        }
        let Some(logits) = logits else {
            return Ok(spans.iter().map(|_| None).collect());
        };
        spans.into_iter().map(|span| span.map(|(start, len)| Ok(logits.narrow(0, start, len)?)).transpose()).collect()
    }

    /// The layers on the CPU, on plain buffers `[tokens, features]` and the engine's threads
    /// (see `crate::kernels::ops` for why not tensor ops). Returns the logits of `rows`.
    fn forward_host(&self, host: &Host, seqs: &mut [SeqInput<'_>], step: &Step<'_>) -> Result<Option<Tensor>> {
        let Step { ids, positions, segments, rows } = *step;
        let c = &self.config;
        let total = ids.len();
        let (hs, inter, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps as f32);
        let heads = Heads { nh: c.num_attention_heads, nkv: c.num_key_value_heads, hd: c.head_dim };
        let kvw = heads.nkv * heads.hd;
        // Each run of rows with an adapter gets its delta, computed beside the projection's
        // product (`Linear::forward_host_lora`); `delta` is the scratch both share.
        let groups = |layer: usize, target: Target| -> Vec<Group<'_>> {
            segments
                .iter()
                .filter_map(|s| {
                    let pair = s.adapter.and_then(|a| a.module(layer, target))?;
                    Some(Group { rows: s.start..s.start + s.len, pair })
                })
                .collect()
        };
        let mut delta = Vec::new();
        let mut x: Vec<f32> = self.embed.lookup(&Tensor::new(ids, &Device::Cpu)?)?.flatten_all()?.to_vec1()?;
        let mut h = vec![0f32; total * hs];
        for (li, layer) in self.layers.iter().enumerate() {
            let (attn_norm, mlp_norm) = &host.norms[li];
            ops::rms_norm(&x, attn_norm, eps, &mut h);
            let mut q = layer.q.forward_host_lora(&h, total, &groups(li, Target::Q), &mut delta)?;
            let mut k = layer.k.forward_host_lora(&h, total, &groups(li, Target::K), &mut delta)?;
            let v = layer.v.forward_host_lora(&h, total, &groups(li, Target::V), &mut delta)?;
            ops::rope(&mut q, heads.nh, heads.hd, positions, &host.cos, &host.sin, self.rope_interleaved);
            ops::rope(&mut k, heads.nkv, heads.hd, positions, &host.cos, &host.sin, self.rope_interleaved);

            // Every sequence's new keys and values go into its cache first; then each
            // sequence's queries attend over what its cache holds, read in place.
            let mut row = 0;
            for s in seqs.iter_mut() {
                let n = s.tokens.len();
                s.cache.append_host(li, &k[row * kvw..(row + n) * kvw], &v[row * kvw..(row + n) * kvw])?;
                row += n;
            }
            let attn = attend_caches(seqs, li, &q, total, heads)?;

            let o = layer.o.forward_host_lora(&attn, total, &groups(li, Target::O), &mut delta)?;
            ops::add_assign(&mut x, &o, hs);
            ops::rms_norm(&x, mlp_norm, eps, &mut h);
            let mut gate = layer.gate.forward_host_lora(&h, total, &groups(li, Target::Gate), &mut delta)?;
            let up = layer.up.forward_host_lora(&h, total, &groups(li, Target::Up), &mut delta)?;
            ops::silu_mul(&mut gate, &up, inter);
            let down = layer.down.forward_host_lora(&gate, total, &groups(li, Target::Down), &mut delta)?;
            ops::add_assign(&mut x, &down, hs);
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let picked: Vec<f32> =
            rows.iter().flat_map(|&r| x[r as usize * hs..(r as usize + 1) * hs].iter().copied()).collect();
        let mut normed = vec![0f32; picked.len()];
        ops::rms_norm(&picked, &host.norm, eps, &mut normed);
        let logits = self.lm_head.forward_host(&normed, rows.len())?;
        Ok(Some(Tensor::from_vec(logits, (rows.len(), c.vocab_size), &Device::Cpu)?))
    }

    /// The layers as tensor ops on the model's device (a GPU). Returns the logits of `rows`.
    fn forward_device(&self, seqs: &mut [SeqInput<'_>], step: &Step<'_>) -> Result<Option<Tensor>> {
        let Step { ids, positions, segments, rows } = *step;
        let c = &self.config;
        let total = ids.len();
        let ids = Tensor::new(ids, &self.device)?;
        let pos = Tensor::new(positions, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mut x = self.embed.lookup(&ids)?;
        let eps = c.rms_norm_eps as f32;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = with_lora(layer.q.forward(&h)?, &h, li, Target::Q, segments)?;
            let k = with_lora(layer.k.forward(&h)?, &h, li, Target::K, segments)?;
            let v = with_lora(layer.v.forward(&h)?, &h, li, Target::V, segments)?;
            let q = self.rope(&q, nh, &cos, &sin)?; // [nh, T, hd]
            let k = self.rope(&k, nkv, &cos, &sin)?; // [nkv, T, hd]
            let v = v.reshape((total, nkv, hd))?.transpose(0, 1)?; // [nkv, T, hd]
            let mut outs = Vec::with_capacity(seqs.len());
            let mut offset = 0;
            for s in seqs.iter_mut() {
                let n = s.tokens.len();
                if n == 0 {
                    continue;
                }
                let start = s.cache.len();
                let (kc, vc) = s.cache.append(li, &k.narrow(1, offset, n)?, &v.narrow(1, offset, n)?)?;
                outs.push(attention(&q.narrow(1, offset, n)?, &kc, &vc, start)?);
                offset += n;
            }
            let attn = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((total, nh * hd))?;
            x = (x + with_lora(layer.o.forward(&attn)?, &attn, li, Target::O, segments)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
            let gate = with_lora(layer.gate.forward(&h)?, &h, li, Target::Gate, segments)?;
            let up = with_lora(layer.up.forward(&h)?, &h, li, Target::Up, segments)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + with_lora(layer.down.forward(&act)?, &act, li, Target::Down, segments)?)?;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let picked = if rows.len() == total { x } else { x.index_select(&Tensor::new(rows, &self.device)?, 0)? };
        let picked = candle_nn::ops::rms_norm(&picked, &self.norm, eps)?;
        Ok(Some(self.lm_head.forward(&picked)?))
    }

    /// `[T, heads*hd]` → `[heads, T, hd]` with the rotary embedding applied per position.
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let hd = self.config.head_dim;
        let x = x.reshape((t, heads, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?; // [1, heads, T, hd]
        let y = if self.rope_interleaved {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        };
        Ok(y.squeeze(0)?)
    }
}

/// Causal attention of `n` new queries `[nh, n, hd]` (at positions `start..start+n`) over the
/// cached keys and values `[nkv, start+n, hd]`, grouped-query style.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
    let (nh, n, hd) = q.dims3()?;
    let (nkv, len, _) = k.dims3()?;
    let group = nh / nkv;
    // Heads g*j..g*(j+1) share KV head j: fold the group into the query rows.
    let q = q.reshape((nkv, group * n, hd))?;
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.contiguous()?.t()?)? * scale)?; // [nkv, group*n, len]
    let scores = if n > 1 {
        // Query i (at position start+i) sees keys 0..=start+i.
        let mask: Vec<f32> = (0..group * n)
            .flat_map(|row| {
                let i = row % n;
                (0..len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, group * n, len), q.device())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v.contiguous()?)?.reshape((nh, n, hd))?)
}

/// cos and sin of every position × frequency, `[max_positions, head_dim/2]`, with the
/// frequencies hearth-formats derives from the config (RoPE scaling included).
fn rope_tables(c: &LlamaConfig, freq_factors: Option<&[f32]>, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = c.hparams.rope_inv_freq(freq_factors).into_iter().map(|f| f as f32).collect();
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, c.max_position_embeddings as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((c.max_position_embeddings, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// log-softmax over the vocabulary, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?)
}
