//! Decode attention on the CPU: one new query per sequence against the keys and values its
//! KV cache holds, read in place (the cache is a strided buffer with room to grow, and copying
//! the used part out, as tensor ops would, costs more than the attention itself at short
//! contexts). The engine runs one `DecodeRow` per decoding sequence, in parallel.
//!
//! The loops are plain Rust with eight independent accumulator lanes; they are compiled twice,
//! for the baseline target and with AVX2 (picked at run time), so the vectorizer can use
//! 256-bit registers without hearth being built for one CPU.

use super::Kernel;

/// A `[heads, tokens, hd]` view into a cache buffer, by element strides.
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub head: usize,
    pub token: usize,
}

impl Strided<'_> {
    #[inline(always)]
    fn at(&self, head: usize, token: usize, hd: usize) -> &[f32] {
        let i = self.offset + head * self.head + token * self.token;
        &self.data[i..i + hd]
    }
}

/// One decode row: its query (row `row` of `q`, `[nh, total, hd]`) against `len` cached keys
/// and values.
pub struct DecodeRow<'a> {
    pub q: &'a [f32],
    pub row: usize,
    pub total: usize,
    pub len: usize,
    pub group: usize,
    pub k: Strided<'a>,
    pub v: Strided<'a>,
}

impl DecodeRow<'_> {
    /// Softmax(q·Kᵀ/√hd)·V for every head, as `[nh * hd]`.
    pub fn attend(&self, nh: usize, hd: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if Kernel::Avx2.is_available() {
            return x86::attend(self, nh, hd);
        }
        self.attend_portable(nh, hd)
    }

    /// The body of `attend`, inlined into each instruction-set version.
    #[inline(always)]
    fn attend_portable(&self, nh: usize, hd: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let (len, group) = (self.len, self.group);
        let mut out = vec![0f32; nh * hd];
        // The `group` query heads that share a KV head go together, so each cached key and
        // value row is loaded once per KV head rather than once per query head.
        let mut scores = vec![0f32; group * len];
        for kv in 0..nh / group {
            let heads = kv * group..(kv + 1) * group;
            for t in 0..len {
                let k = self.k.at(kv, t, hd);
                for (g, h) in heads.clone().enumerate() {
                    let q = &self.q[(h * self.total + self.row) * hd..][..hd];
                    scores[g * len + t] = dot(q, k) * scale;
                }
            }
            for s in scores.chunks_exact_mut(len) {
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for x in s.iter_mut() {
                    *x /= sum;
                }
            }
            let o = &mut out[heads.start * hd..heads.end * hd];
            for t in 0..len {
                let v = self.v.at(kv, t, hd);
                for (g, o) in o.chunks_exact_mut(hd).enumerate() {
                    let w = scores[g * len + t];
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += w * v;
                    }
                }
            }
        }
        out
    }
}

/// `Σ a[i]·b[i]` over eight independent lanes, so the compiler can vectorize it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The AVX2 build of `DecodeRow::attend`.
///
/// Safety: entered only after `Kernel::Avx2.is_available()` confirmed AVX2 and FMA; the body is
/// the safe portable code.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::DecodeRow;

    pub(super) fn attend(row: &DecodeRow<'_>, nh: usize, hd: usize) -> Vec<f32> {
        // SAFETY: the caller checked the CPU features.
        unsafe { attend_avx2(row, nh, hd) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(row: &DecodeRow<'_>, nh: usize, hd: usize) -> Vec<f32> {
        row.attend_portable(nh, hd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax(q·Kᵀ/√hd)·V per head in f64, the cache read through the same strides.
    fn reference(r: &DecodeRow<'_>, nh: usize, hd: usize) -> Vec<f32> {
        let mut out = vec![0f32; nh * hd];
        for h in 0..nh {
            let q = &r.q[(h * r.total + r.row) * hd..][..hd];
            let kv = h / r.group;
            let s: Vec<f64> = (0..r.len)
                .map(|t| {
                    q.iter().zip(r.k.at(kv, t, hd)).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                out[h * hd + d] = (0..r.len).map(|t| e[t] / sum * r.v.at(kv, t, hd)[d] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn grouped_heads_over_a_strided_cache_match_the_reference() {
        let (nh, nkv, hd, total, cap) = (6, 2, 20, 3, 9);
        let mut seed = 3u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let q: Vec<f32> = (0..nh * total * hd).map(|_| next()).collect();
        // Caches `[nkv, cap, hd]` with room past `len`, which must not be read.
        let k: Vec<f32> = (0..nkv * cap * hd).map(|_| next()).collect();
        let v: Vec<f32> = (0..nkv * cap * hd).map(|_| next()).collect();
        for len in [1, 5, 7] {
            let row = DecodeRow {
                q: &q,
                row: 1,
                total,
                len,
                group: nh / nkv,
                k: Strided { data: &k, offset: 0, head: cap * hd, token: hd },
                v: Strided { data: &v, offset: 0, head: cap * hd, token: hd },
            };
            let want = reference(&row, nh, hd);
            for got in [row.attend(nh, hd), row.attend_portable(nh, hd)] {
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 1e-5, "len {len}: max error {err}");
            }
        }
    }
}
