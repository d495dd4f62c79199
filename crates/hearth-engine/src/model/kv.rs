//! The KV cache of one sequence: per layer, keys and values for `capacity` tokens, written in
//! place and grown by doubling, so a step costs the new tokens' writes and not a copy of the
//! whole history.
//!
//! On the CPU the buffers are plain host memory in the layout the attention kernel reads in
//! place (`crate::kernels::attention::KvLayout`: keys in transposed blocks of `BLOCK` tokens,
//! values by token), in f32 or f16 ([`KvDtype`]); on a GPU they are device tensors
//! `[kv_heads, capacity, head_dim]`.

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{EngineError, Result};
use crate::kernels::attention::{KvElem, KvLayout, BLOCK};

/// A multiple of `BLOCK`, so every capacity (doubled from it) is whole blocks.
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

/// Per layer, keys and values.
type HostLayers<T> = Vec<(Vec<T>, Vec<T>)>;

#[derive(Debug)]
enum Store {
    HostF32(HostLayers<f32>),
    HostF16(HostLayers<f16>),
    Device(Vec<(Tensor, Tensor)>),
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
        let mut cap = self.capacity.max(INITIAL_CAPACITY);
        while cap < needed {
            cap *= 2;
        }
        let shape = Shape { heads: self.kv_heads, hd: self.head_dim, len: self.len, old_cap: self.capacity, cap };
        match &mut self.store {
            Store::HostF32(layers) => grow_host(layers, self.num_layers, shape),
            Store::HostF16(layers) => grow_host(layers, self.num_layers, shape),
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
        let shape = Shape {
            heads: self.kv_heads,
            hd: self.head_dim,
            len: self.len,
            old_cap: self.capacity,
            cap: self.capacity,
        };
        let n = k.len() / (shape.heads * shape.hd);
        if self.len + n > self.capacity || k.len() != v.len() || k.len() != n * shape.heads * shape.hd {
            return Err(EngineError::Internal("KV rows do not fit the reserved cache".into()));
        }
        match &mut self.store {
            Store::HostF32(layers) => {
                let (ck, cv) = layers.get_mut(layer).ok_or_else(|| Self::missing(layer))?;
                write_host(ck, cv, k, v, shape);
            }
            Store::HostF16(layers) => {
                let (ck, cv) = layers.get_mut(layer).ok_or_else(|| Self::missing(layer))?;
                write_host(ck, cv, k, v, shape);
            }
            Store::Device(_) => return Err(EngineError::Internal("a device KV cache appends tensors".into())),
        }
        Ok(())
    }

    /// The keys and values of one layer of a host cache, for the attention kernel (the caller
    /// knows how many tokens are valid).
    pub fn host_layout(&self, layer: usize) -> Result<HostKv<'_>> {
        let head_stride = self.capacity * self.head_dim;
        Ok(match &self.store {
            Store::HostF32(layers) => {
                let (k, v) = layers.get(layer).ok_or_else(|| Self::missing(layer))?;
                HostKv::F32(KvLayout { k, v, head_stride })
            }
            Store::HostF16(layers) => {
                let (k, v) = layers.get(layer).ok_or_else(|| Self::missing(layer))?;
                HostKv::F16(KvLayout { k, v, head_stride })
            }
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
}

/// A host cache's geometry: KV heads, head size, tokens held, capacity before and after.
#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    hd: usize,
    len: usize,
    old_cap: usize,
    cap: usize,
}

/// Reallocates every layer at `shape.cap`, keeping what is cached. Within a head both layouts
/// are the same whatever the capacity: the first blocks, whole, hold everything cached.
fn grow_host<T: KvElem>(layers: &mut HostLayers<T>, num_layers: usize, shape: Shape) {
    let Shape { heads, hd, len, old_cap, cap } = shape;
    let used = len.next_multiple_of(BLOCK).min(old_cap) * hd;
    let grow = |old: Option<&Vec<T>>| {
        let mut new = vec![T::from_f32(0.0); heads * cap * hd];
        if let Some(old) = old {
            for h in 0..heads {
                new[h * cap * hd..][..used].copy_from_slice(&old[h * old_cap * hd..][..used]);
            }
        }
        new
    };
    let grown = (0..num_layers)
        .map(|l| {
            let old = layers.get(l);
            (grow(old.map(|o| &o.0)), grow(old.map(|o| &o.1)))
        })
        .collect();
    *layers = grown;
}

/// Writes rows `[n, heads, hd]` of keys and values after the `shape.len` cached tokens.
fn write_host<T: KvElem>(ck: &mut [T], cv: &mut [T], k: &[f32], v: &[f32], shape: Shape) {
    let Shape { heads, hd, len, cap, .. } = shape;
    let stride = cap * hd;
    for (t, row) in k.chunks_exact(heads * hd).enumerate() {
        for (h, head) in row.chunks_exact(hd).enumerate() {
            for (d, x) in head.iter().enumerate() {
                ck[KvLayout::<T>::key_index(stride, hd, h, len + t, d)] = T::from_f32(*x);
            }
        }
    }
    for (t, row) in v.chunks_exact(heads * hd).enumerate() {
        for (h, head) in row.chunks_exact(hd).enumerate() {
            for (o, x) in cv[h * stride + (len + t) * hd..][..hd].iter_mut().zip(head) {
                *o = T::from_f32(*x);
            }
        }
    }
}
