//! The Llama family's forward pass (Llama, Mistral, Qwen2 with q/k/v biases) over a batch of
//! sequences at once: every token of every sequence in the step goes through each matrix
//! multiplication together; only attention runs per sequence, against that sequence's own
//! KV cache. This is what lets prefill chunks and decode rows share one step.

use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, DType, Device, Tensor, D};

use super::config::{LlamaConfig, ModelConfig, RopeScaling};
use super::kv::KvCache;
use super::weights::{Checkpoint, Embedding, Linear, Precision};
use crate::error::{EngineError, Result};
use crate::kernels::attention::{DecodeRow, Strided};
use crate::kernels::lora::{self as lora_kernel, Group};
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

/// Adds each segment's LoRA delta for `target` of `layer` to `y`, the base projection of `x`.
/// The base matmul already ran once for all rows; each adapter adds its shrink and expand over
/// its own rows only. On the CPU one kernel call covers every segment, in place; elsewhere
/// each segment's delta is two matmuls on the adapter's device copies.
fn with_lora<'a>(y: Tensor, x: &Tensor, layer: usize, target: Target, segments: &[Segment<'a>]) -> Result<Tensor> {
    let patched = |s: &Segment<'a>| s.adapter.and_then(|a| a.module(layer, target));
    if !segments.iter().any(|s| patched(s).is_some()) {
        return Ok(y);
    }
    if y.device().is_cpu() && y.dtype() == DType::F32 && x.dtype() == DType::F32 {
        let groups: Vec<Group<'_>> = segments
            .iter()
            .filter_map(|s| patched(s).map(|pair| Group { rows: s.start..s.start + s.len, pair }))
            .collect();
        y.inplace_op2(x, &LoraStep(groups))?;
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

/// The CPU LoRA step as an in-place op on a projection's output `[rows, out]`, reading its
/// input `[rows, in]`.
struct LoraStep<'a>(Vec<Group<'a>>);

impl candle_core::InplaceOp2 for LoraStep<'_> {
    fn name(&self) -> &'static str {
        "lora-step"
    }

    fn cpu_fwd(
        &self,
        y: &mut candle_core::CpuStorage,
        yl: &candle_core::Layout,
        x: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let (CpuStorage::F32(y), CpuStorage::F32(x)) = (y, x) else {
            candle_core::bail!("the LoRA step takes F32 activations");
        };
        let (Some((y0, y1)), Some((x0, x1))) = (yl.contiguous_offsets(), xl.contiguous_offsets()) else {
            candle_core::bail!("the LoRA step takes contiguous activations");
        };
        let (&[_, n_out], &[_, n_in]) = (yl.dims(), xl.dims()) else {
            candle_core::bail!("the LoRA step takes [rows, features] activations");
        };
        lora_kernel::apply(&mut y[y0..y1], &x[x0..x1], n_in, n_out, &self.0);
        Ok(())
    }
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
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether Q and K rows are in GGUF's permuted layout (adapters must follow it).
    pub fn gguf_layout(&self) -> bool {
        self.rope_interleaved
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers, self.config.num_key_value_heads, self.config.head_dim, &self.device)
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
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;

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

        let mut x = self.embed.lookup(&ids)?;
        let eps = c.rms_norm_eps as f32;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let q = with_lora(layer.q.forward(&h)?, &h, li, Target::Q, &segments)?;
            let k = with_lora(layer.k.forward(&h)?, &h, li, Target::K, &segments)?;
            let v = with_lora(layer.v.forward(&h)?, &h, li, Target::V, &segments)?;
            let q = self.rope(&q, nh, &cos, &sin)?; // [nh, T, hd]
            let k = self.rope(&k, nkv, &cos, &sin)?; // [nkv, T, hd]
            let v = v.reshape((total, nkv, hd))?.transpose(0, 1)?; // [nkv, T, hd]

            // Every sequence's new keys and values go into its cache first; then each
            // sequence's queries attend over what its cache holds.
            let mut chunks = Vec::with_capacity(seqs.len());
            let mut offset = 0;
            for s in seqs.iter_mut() {
                let n = s.tokens.len();
                if n == 0 {
                    continue;
                }
                let start = s.cache.len();
                let (kc, vc) = s.cache.append(li, &k.narrow(1, offset, n)?, &v.narrow(1, offset, n)?)?;
                chunks.push(Chunk { row: offset, n, start, k: kc, v: vc });
                offset += n;
            }
            // [T, nh*hd]
            let attn = if self.device.is_cpu() {
                attention_cpu(&q, &chunks, total)?
            } else {
                let outs = chunks
                    .iter()
                    .map(|c| attention(&q.narrow(1, c.row, c.n)?, &c.k, &c.v, c.start))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((total, nh * hd))?
            };
            x = (x + with_lora(layer.o.forward(&attn)?, &attn, li, Target::O, &segments)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
            let gate = with_lora(layer.gate.forward(&h)?, &h, li, Target::Gate, &segments)?;
            let up = with_lora(layer.up.forward(&h)?, &h, li, Target::Up, &segments)?;
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + with_lora(layer.down.forward(&act)?, &act, li, Target::Down, &segments)?)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;

        // One lm_head product for every row that needs logits: the head is the largest matrix
        // of a small model, and run per sequence it would be read from memory once per
        // sequence per step instead of once.
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for s in seqs.iter_mut() {
            let n = s.tokens.len();
            s.cache.commit(n);
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
        if rows.is_empty() {
            return Ok(spans.iter().map(|_| None).collect());
        }
        let picked =
            if rows.len() == total { x } else { x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)? };
        let logits = self.lm_head.forward(&picked)?;
        spans.into_iter().map(|span| span.map(|(start, len)| Ok(logits.narrow(0, start, len)?)).transpose()).collect()
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

/// One sequence's part of a step for attention: its `n` new rows from `row` on, at positions
/// `start..start+n`, and views of its cached keys and values `[nkv, start+n, hd]`.
struct Chunk {
    row: usize,
    n: usize,
    start: usize,
    k: Tensor,
    v: Tensor,
}

/// Attention for every chunk of a step on the CPU, as `[total, nh*hd]`, from the rotated
/// queries `[nh, total, hd]`. Decode rows (one new token) attend in one kernel that reads the
/// caches in place, run over the sequences in parallel: as tensor ops, each would copy its
/// whole cache out of the strided buffer and dispatch a dozen small ops, one sequence after
/// another, while the other threads wait. Prefill chunks keep the tensor ops.
fn attention_cpu(q: &Tensor, chunks: &[Chunk], total: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let (nh, _, hd) = q.dims3()?;
    let qs: Vec<f32> = q.contiguous()?.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; total * nh * hd];
    let mut decode = Vec::new();
    for c in chunks {
        if c.n == 1 {
            decode.push(c);
            continue;
        }
        let o = attention(&q.narrow(1, c.row, c.n)?, &c.k, &c.v, c.start)?; // [nh, n, hd]
        let o: Vec<f32> = o.transpose(0, 1)?.flatten_all()?.to_vec1()?;
        out[c.row * nh * hd..(c.row + c.n) * nh * hd].copy_from_slice(&o);
    }
    if decode.is_empty() {
        return Ok(Tensor::from_vec(out, (total, nh * hd), q.device())?);
    }
    let guards: Vec<_> = decode.iter().map(|c| (c.k.storage_and_layout(), c.v.storage_and_layout())).collect();
    let mut jobs = Vec::with_capacity(decode.len());
    for (c, ((kg, kl), (vg, vl))) in decode.iter().zip(&guards) {
        let (candle_core::Storage::Cpu(CpuStorage::F32(k)), candle_core::Storage::Cpu(CpuStorage::F32(v))) =
            (&**kg, &**vg)
        else {
            return Err(EngineError::Internal("the KV cache is not f32 on the CPU".into()));
        };
        let (nkv, len, _) = c.k.dims3()?;
        jobs.push(DecodeRow {
            q: &qs,
            row: c.row,
            total,
            len,
            group: nh / nkv,
            k: Strided { data: k, offset: kl.start_offset(), head: kl.stride()[0], token: kl.stride()[1] },
            v: Strided { data: v, offset: vl.start_offset(), head: vl.stride()[0], token: vl.stride()[1] },
        });
    }
    let rows: Vec<(usize, Vec<f32>)> = if jobs.len() == 1 {
        jobs.iter().map(|j| (j.row, j.attend(nh, hd))).collect()
    } else {
        jobs.par_iter().map(|j| (j.row, j.attend(nh, hd))).collect()
    };
    for (row, o) in rows {
        out[row * nh * hd..(row + 1) * nh * hd].copy_from_slice(&o);
    }
    Ok(Tensor::from_vec(out, (total, nh * hd), q.device())?)
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
