//! The KV cache of one sequence: per layer, keys and values `[kv_heads, capacity, head_dim]`
//! written in place, grown by doubling, so a step costs the new tokens' writes and not a
//! copy of the whole history.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

const INITIAL_CAPACITY: usize = 64;

#[derive(Debug)]
pub struct KvCache {
    /// Empty until the first `reserve`, then one (keys, values) pair per layer.
    layers: Vec<(Tensor, Tensor)>,
    num_layers: usize,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, device: &Device) -> KvCache {
        KvCache { layers: Vec::new(), num_layers, len: 0, capacity: 0, kv_heads, head_dim, device: device.clone() }
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
        let mut grown = Vec::with_capacity(self.num_layers);
        for layer in 0..self.num_layers {
            let nk = Tensor::zeros((self.kv_heads, cap, self.head_dim), DType::F32, &self.device)?;
            let nv = Tensor::zeros((self.kv_heads, cap, self.head_dim), DType::F32, &self.device)?;
            if let (Some((k, v)), true) = (self.layers.get(layer), self.len > 0) {
                nk.slice_set(&k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                nv.slice_set(&v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            grown.push((nk, nv));
        }
        self.layers = grown;
        self.capacity = cap;
        Ok(())
    }

    /// Writes `n` new tokens' keys and values `[kv_heads, n, head_dim]` of one layer after the
    /// cached ones and returns views of everything cached for that layer, new tokens included.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let (ck, cv) = self.layers.get(layer).ok_or_else(|| {
            crate::error::EngineError::Internal(format!("KV cache has no layer {layer}; reserve first"))
        })?;
        ck.slice_set(&k.contiguous()?, 1, self.len)?;
        cv.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((ck.narrow(1, 0, self.len + n)?, cv.narrow(1, 0, self.len + n)?))
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
