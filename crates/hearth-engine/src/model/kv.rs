//! The KV cache of one sequence: keys and values of every layer for the tokens it holds,
//! written in place, so a step costs the new tokens' writes and not a copy of the history.
//!
//! On the CPU the cache is a list of blocks of `PAGE` tokens (`KvBlock`, in the layout the
//! attention kernel reads in place: keys transposed, values by token), in f32 or f16
//! ([`KvDtype`]), a new block added as the last fills. Blocks are reference-counted: a
//! sequence may start from another's full blocks (a shared prompt prefix, see
//! `crate::prefix`), which it reads but never writes; writing into a block someone else holds
//! copies it first. On a GPU the cache is device tensors `[kv_heads, capacity, head_dim]`,
//! grown by doubling.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{EngineError, Result};
use crate::kernels::attention::{KvBlock, KvElem, KvLayout, BLOCK, PAGE};

/// A device cache's first capacity, doubled as it fills.
const INITIAL_CAPACITY: usize = 2 * BLOCK;

/// What the cache stores keys and values as. F16 halves the bytes a decode step reads at a
/// long context, where reading the cache is most of the step; the values the projections make
/// are rounded to f16 (about 3 significant digits) on the way in, as llama.cpp's default cache
/// does. On SmolLM2-135M that moves prompt logprobs by up to 1.3e-2 against an f32 cache
/// (`tests/reference.rs`), where its Q4_1 weights move them by 0.07 on average; so the engine's default (`None` in
/// `EngineConfig::kv_dtype`) is F32 for a model whose weights are all f32, F16 otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
}

impl KvDtype {
    /// `f32`, `f16`, or `auto` (`None`: chosen by the weights, as above).
    pub fn parse(s: &str) -> Result<Option<KvDtype>> {
        match s {
            "auto" => Ok(None),
            "f32" => Ok(Some(KvDtype::F32)),
            "f16" => Ok(Some(KvDtype::F16)),
            other => Err(EngineError::InvalidRequest(format!("KV cache type {other:?}: expected auto, f32 or f16"))),
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    fn candle(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        }
    }
}

/// A host cache's blocks, in token order.
type HostBlocks<T> = Vec<Arc<KvBlock<T>>>;

#[derive(Debug)]
enum Store {
    HostF32(HostBlocks<f32>),
    HostF16(HostBlocks<f16>),
    Device(Vec<(Tensor, Tensor)>),
}

/// One full block of a host cache, to share with another sequence.
#[derive(Debug, Clone)]
pub enum SharedBlock {
    F32(Arc<KvBlock<f32>>),
    F16(Arc<KvBlock<f16>>),
}

impl SharedBlock {
    /// Whether a sequence's cache other than the one sharing it holds this block too.
    pub fn in_use(&self) -> bool {
        match self {
            SharedBlock::F32(b) => Arc::strong_count(b) > 1,
            SharedBlock::F16(b) => Arc::strong_count(b) > 1,
        }
    }
}

/// One layer of a host cache as the attention kernel reads it.
pub enum HostKv<'a> {
    F32(KvLayout<'a, f32>),
    F16(KvLayout<'a, f16>),
}

#[derive(Debug)]
pub struct KvCache {
    /// Empty until the first `reserve`, then one (keys, values) pair per layer.
    store: Store,
    dtype: KvDtype,
    num_layers: usize,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, dtype: KvDtype, device: &Device) -> KvCache {
        let store = match (device.is_cpu(), dtype) {
            (true, KvDtype::F32) => Store::HostF32(Vec::new()),
            (true, KvDtype::F16) => Store::HostF16(Vec::new()),
            (false, _) => Store::Device(Vec::new()),
        };
        KvCache { store, dtype, num_layers, len: 0, capacity: 0, kv_heads, head_dim, device: device.clone() }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes a cache holds for `tokens` tokens (keys and values, every layer).
    pub fn bytes_for(tokens: usize, num_layers: usize, kv_heads: usize, head_dim: usize, dtype: KvDtype) -> usize {
        2 * num_layers * kv_heads * head_dim * tokens * dtype.size_in_bytes()
    }

    /// Makes room for `n` more tokens before a forward pass writes them.
    pub fn reserve(&mut self, n: usize) -> Result<()> {
        let needed = self.len + n;
        if needed <= self.capacity {
            return Ok(());
        }
        let (layers_n, heads, hd) = (self.num_layers, self.kv_heads, self.head_dim);
        let blocks = needed.div_ceil(PAGE);
        let mut cap = self.capacity.max(INITIAL_CAPACITY);
        while cap < needed {
            cap *= 2;
        }
        let shape = Shape { heads, hd, len: self.len };
        match &mut self.store {
            Store::HostF32(b) => {
                b.resize_with(blocks, || Arc::new(KvBlock::zeros(layers_n, heads, hd)));
                cap = blocks * PAGE;
            }
            Store::HostF16(b) => {
                b.resize_with(blocks, || Arc::new(KvBlock::zeros(layers_n, heads, hd)));
                cap = blocks * PAGE;
            }
            Store::Device(layers) => {
                let mut grown = Vec::with_capacity(self.num_layers);
                for layer in 0..self.num_layers {
                    let dims = (shape.heads, cap, shape.hd);
                    let nk = Tensor::zeros(dims, self.dtype.candle(), &self.device)?;
                    let nv = Tensor::zeros(dims, self.dtype.candle(), &self.device)?;
                    if let (Some((k, v)), true) = (layers.get(layer), shape.len > 0) {
                        nk.slice_set(&k.narrow(1, 0, shape.len)?.contiguous()?, 1, 0)?;
                        nv.slice_set(&v.narrow(1, 0, shape.len)?.contiguous()?, 1, 0)?;
                    }
                    grown.push((nk, nv));
                }
                *layers = grown;
            }
        }
        self.capacity = cap;
        Ok(())
    }

    fn missing(layer: usize) -> EngineError {
        EngineError::Internal(format!("KV cache has no layer {layer}; reserve first"))
    }

    /// Writes `n` new tokens' keys and values `[kv_heads, n, head_dim]` (f32) of one layer
    /// after the cached ones and returns views of everything cached for that layer, new tokens
    /// included, in f32. For a cache on a device.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let Store::Device(layers) = &self.store else {
            return Err(EngineError::Internal("a host KV cache appends host rows".into()));
        };
        let (ck, cv) = layers.get(layer).ok_or_else(|| Self::missing(layer))?;
        let dtype = self.dtype.candle();
        ck.slice_set(&k.to_dtype(dtype)?.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.to_dtype(dtype)?.contiguous()?, 1, self.len)?;
        let view = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, 0, self.len + n)?.to_dtype(DType::F32)?) };
        Ok((view(ck)?, view(cv)?))
    }

    /// Writes `n` new tokens' keys and values, each `[n, kv_heads, head_dim]` (the rows as the
    /// projections make them), of one layer after the cached ones. For a cache on the host.
    pub fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let shape = Shape { heads: self.kv_heads, hd: self.head_dim, len: self.len };
        let n = k.len() / (shape.heads * shape.hd);
        if self.len + n > self.capacity || k.len() != v.len() || k.len() != n * shape.heads * shape.hd {
            return Err(EngineError::Internal("KV rows do not fit the reserved cache".into()));
        }
        if layer >= self.num_layers {
            return Err(Self::missing(layer));
        }
        match &mut self.store {
            Store::HostF32(blocks) => write_host(blocks, layer, k, v, shape),
            Store::HostF16(blocks) => write_host(blocks, layer, k, v, shape),
            Store::Device(_) => return Err(EngineError::Internal("a device KV cache appends tensors".into())),
        }
        Ok(())
    }

    /// The keys and values of one layer of a host cache, for the attention kernel (the caller
    /// knows how many tokens are valid).
    pub fn host_layout(&self, layer: usize) -> Result<HostKv<'_>> {
        if layer >= self.num_layers {
            return Err(Self::missing(layer));
        }
        let offset = layer * self.kv_heads * self.head_dim * PAGE;
        Ok(match &self.store {
            Store::HostF32(blocks) => HostKv::F32(KvLayout { blocks, offset }),
            Store::HostF16(blocks) => HostKv::F16(KvLayout { blocks, offset }),
            Store::Device(_) => return Err(EngineError::Internal("a device KV cache has no host layout".into())),
        })
    }

    /// Records that the last forward pass added `n` tokens (after every layer appended them).
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets everything past `len` tokens (e.g. to re-run a prompt's tail).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The `i`th block, when it is full, to share; `None` on a device cache.
    pub fn full_block(&self, i: usize) -> Option<SharedBlock> {
        if (i + 1) * PAGE > self.len {
            return None;
        }
        match &self.store {
            Store::HostF32(b) => b.get(i).cloned().map(SharedBlock::F32),
            Store::HostF16(b) => b.get(i).cloned().map(SharedBlock::F16),
            Store::Device(_) => None,
        }
    }

    /// Starts an empty host cache from full blocks another sequence computed (the same tokens
    /// under the same weights and adapter): it holds their tokens at once. Blocks of another
    /// precision are refused.
    pub fn adopt(&mut self, blocks: &[SharedBlock]) -> Result<()> {
        if self.len != 0 {
            return Err(EngineError::Internal("only an empty cache adopts shared blocks".into()));
        }
        let wrong = || EngineError::Internal("a shared block of another KV precision".into());
        match &mut self.store {
            Store::HostF32(own) => {
                *own = blocks
                    .iter()
                    .map(|b| if let SharedBlock::F32(b) = b { Ok(b.clone()) } else { Err(wrong()) })
                    .collect::<Result<_>>()?;
            }
            Store::HostF16(own) => {
                *own = blocks
                    .iter()
                    .map(|b| if let SharedBlock::F16(b) = b { Ok(b.clone()) } else { Err(wrong()) })
                    .collect::<Result<_>>()?;
            }
            Store::Device(_) => return Err(EngineError::Internal("a device cache shares no blocks".into())),
        }
        self.len = blocks.len() * PAGE;
        self.capacity = self.len;
        Ok(())
    }

    /// Whether this cache is host memory, the kind that shares blocks.
    pub fn is_host(&self) -> bool {
        !matches!(self.store, Store::Device(_))
    }
}

/// A host cache's geometry: KV heads, head size, tokens held.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    hd: usize,
    len: usize,
}

/// Writes rows `[n, heads, hd]` of one layer's keys and values after the `shape.len` cached
/// tokens. A block someone else also holds is copied before it is written (it never is in
/// practice: shared blocks are full, and writes go past them).
fn write_host<T: KvElem>(blocks: &mut [Arc<KvBlock<T>>], layer: usize, k: &[f32], v: &[f32], shape: Shape) {
    let Shape { heads, hd, len } = shape;
    let row = heads * hd;
    let n = k.len() / row;
    let mut t = 0;
    while t < n {
        let pos = len + t;
        let in_block = (PAGE - pos % PAGE).min(n - t);
        let block = Arc::make_mut(&mut blocks[pos / PAGE]);
        for j in 0..in_block {
            let (kr, vr) = (&k[(t + j) * row..][..row], &v[(t + j) * row..][..row]);
            for h in 0..heads {
                for d in 0..hd {
                    block.k[KvBlock::<T>::key_index(heads, hd, layer, h, pos + j, d)] = T::from_f32(kr[h * hd + d]);
                }
                let vi = KvBlock::<T>::value_index(heads, hd, layer, h, pos + j);
                for (o, x) in block.v[vi..vi + hd].iter_mut().zip(&vr[h * hd..(h + 1) * hd]) {
                    *o = T::from_f32(*x);
                }
            }
        }
        t += in_block;
    }
}
