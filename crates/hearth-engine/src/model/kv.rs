//! The KV cache of one sequence: per layer, keys and values `[kv_heads, capacity, head_dim]`
//! written in place, grown by doubling, so a step costs the new tokens' writes and not a
//! copy of the whole history.
//!
//! On the CPU the buffers are plain host memory in the layout the attention kernel reads in
//! place (`crate::kernels::attention::KvLayout`: keys in transposed blocks of `BLOCK` tokens,
//! values by token); on a GPU they are device tensors `[kv_heads, capacity, head_dim]`.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::kernels::attention::{KvLayout, BLOCK};

/// A multiple of `BLOCK`, so every capacity (doubled from it) is whole blocks.
const INITIAL_CAPACITY: usize = 2 * BLOCK;

#[derive(Debug)]
enum Store {
    /// Per layer, keys and values.
    Host(Vec<(Vec<f32>, Vec<f32>)>),
    Device(Vec<(Tensor, Tensor)>),
}

#[derive(Debug)]
pub struct KvCache {
    /// Empty until the first `reserve`, then one (keys, values) pair per layer.
    store: Store,
    num_layers: usize,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> KvCache {
        let store = if device.is_cpu() { Store::Host(Vec::new()) } else { Store::Device(Vec::new()) };
        KvCache { store, num_layers, len: 0, capacity: 0, kv_heads, head_dim, device: device.clone() }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes this cache holds for `tokens` tokens (keys and values, every layer).
    pub fn bytes_for(tokens: usize, num_layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * kv_heads * head_dim * tokens * 4
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
        let (heads, hd, len, old_cap) = (self.kv_heads, self.head_dim, self.len, self.capacity);
        match &mut self.store {
            Store::Host(layers) => {
                // Within a head both layouts are the same whatever the capacity: the first
                // blocks, whole, hold everything cached.
                let used = len.next_multiple_of(BLOCK).min(old_cap) * hd;
                let grow = |old: Option<&Vec<f32>>| {
                    let mut new = vec![0f32; heads * cap * hd];
                    if let Some(old) = old {
                        for h in 0..heads {
                            new[h * cap * hd..][..used].copy_from_slice(&old[h * old_cap * hd..][..used]);
                        }
                    }
                    new
                };
                let grown = (0..self.num_layers)
                    .map(|l| {
                        let old = layers.get(l);
                        (grow(old.map(|o| &o.0)), grow(old.map(|o| &o.1)))
                    })
                    .collect();
                *layers = grown;
            }
            Store::Device(layers) => {
                let mut grown = Vec::with_capacity(self.num_layers);
                for layer in 0..self.num_layers {
                    let nk = Tensor::zeros((heads, cap, hd), DType::F32, &self.device)?;
                    let nv = Tensor::zeros((heads, cap, hd), DType::F32, &self.device)?;
                    if let (Some((k, v)), true) = (layers.get(layer), len > 0) {
                        nk.slice_set(&k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                        nv.slice_set(&v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
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

    /// Writes `n` new tokens' keys and values `[kv_heads, n, head_dim]` of one layer after the
    /// cached ones and returns views of everything cached for that layer, new tokens included.
    /// For a cache on a device.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let Store::Device(layers) = &self.store else {
            return Err(EngineError::Internal("a host KV cache appends host rows".into()));
        };
        let (ck, cv) = layers.get(layer).ok_or_else(|| Self::missing(layer))?;
        ck.slice_set(&k.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((ck.narrow(1, 0, self.len + n)?, cv.narrow(1, 0, self.len + n)?))
    }

    /// Writes `n` new tokens' keys and values, each `[n, kv_heads, head_dim]` (the rows as the
    /// projections make them), of one layer after the cached ones. For a cache on the host.
    pub fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (heads, hd, cap, len) = (self.kv_heads, self.head_dim, self.capacity, self.len);
        let Store::Host(layers) = &mut self.store else {
            return Err(EngineError::Internal("a device KV cache appends tensors".into()));
        };
        let (ck, cv) = layers.get_mut(layer).ok_or_else(|| Self::missing(layer))?;
        let n = k.len() / (heads * hd);
        if len + n > cap || k.len() != v.len() || k.len() != n * heads * hd {
            return Err(EngineError::Internal("KV rows do not fit the reserved cache".into()));
        }
        let stride = cap * hd;
        for (t, row) in k.chunks_exact(heads * hd).enumerate() {
            for (h, head) in row.chunks_exact(hd).enumerate() {
                for (d, x) in head.iter().enumerate() {
                    ck[KvLayout::key_index(stride, hd, h, len + t, d)] = *x;
                }
            }
        }
        for (t, row) in v.chunks_exact(heads * hd).enumerate() {
            for (h, head) in row.chunks_exact(hd).enumerate() {
                cv[h * stride + (len + t) * hd..][..hd].copy_from_slice(head);
            }
        }
        Ok(())
    }

    /// The keys and values of one layer of a host cache, for the attention kernel (the caller
    /// knows how many tokens are valid).
    pub fn host_layout(&self, layer: usize) -> Result<KvLayout<'_>> {
        let Store::Host(layers) = &self.store else {
            return Err(EngineError::Internal("a device KV cache has no host layout".into()));
        };
        let (k, v) = layers.get(layer).ok_or_else(|| Self::missing(layer))?;
        Ok(KvLayout { k, v, head_stride: self.capacity * self.head_dim })
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
