//! The elementwise parts of a CPU forward pass on plain `[rows, features]` f32 buffers:
//! RMS norm, SiLU-gated product, residual add, rotary embedding.
//!
//! Why not tensor ops: candle runs its elementwise ops on a thread pool of its own, whose
//! workers spin between ops; beside the engine's threads, which spin too between matrix
//! products, two pools fight over the same cores and a prefill step got slower with a second
//! thread, not faster. Here the work is split among the engine's own threads (the current
//! rayon pool, via `share_items`) only where it is large enough to pay for waking them, and
//! the buffers are reused in place instead of allocated per op.

use super::{attention::exp_approx, share_items};

/// Elements below which an op runs on the calling thread alone.
const PARALLEL_MIN: usize = 64 * 1024;

/// Runs `f` over `rows`-row pieces of `x` (each `width` wide), on the engine's threads when
/// there is enough work. `f` gets the index of the piece's first row.
fn par_rows(x: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = x.len() / width.max(1);
    let threads = rayon::current_num_threads().max(1);
    if x.len() < PARALLEL_MIN || threads == 1 || rows < 2 {
        f(0, x);
        return;
    }
    // A few pieces per thread, so a late helper still finds work.
    let per = rows.div_ceil(threads * 4).max(1);
    let pieces: Vec<(usize, &mut [f32])> = x.chunks_mut(per * width).enumerate().map(|(i, c)| (i * per, c)).collect();
    share_items(pieces, threads, |(row, piece), _: &mut ()| f(row, piece));
}

/// `out[r] = x[r] / rms(x[r]) * w` for every row (`w.len()` wide).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let width = w.len();
    assert_eq!(x.len(), out.len(), "rms_norm: input and output differ in size");
    par_rows(out, width, |row, piece| {
        let x = &x[row * width..row * width + piece.len()];
        for (o, x) in piece.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * inv * w;
            }
        }
    });
}

/// `gate = silu(gate) * up`, elementwise.
pub fn silu_mul(gate: &mut [f32], up: &[f32], width: usize) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up differ in size");
    par_rows(gate, width, |row, piece| {
        let up = &up[row * width..row * width + piece.len()];
        for (g, u) in piece.iter_mut().zip(up) {
            // silu(g) = g / (1 + e^-g); exp_approx takes non-positive arguments.
            let e = exp_approx(-g.abs());
            let sigmoid = if *g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            *g = *g * sigmoid * u;
        }
    });
}

/// `x += y`, elementwise.
pub fn add_assign(x: &mut [f32], y: &[f32], width: usize) {
    assert_eq!(x.len(), y.len(), "add_assign: sizes differ");
    par_rows(x, width, |row, piece| {
        for (a, b) in piece.iter_mut().zip(&y[row * width..]) {
            *a += b;
        }
    });
}

/// `x[r] += b` for every row.
pub fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (a, b) in row.iter_mut().zip(b) {
            *a += b;
        }
    }
}

/// The rotary embedding, in place, of `x` = `[tokens, heads, hd]`, token `t` at position
/// `positions[t]`; `cos` and `sin` are `[positions, hd/2]`. `interleaved` rotates the pairs
/// `(2i, 2i+1)` (GGUF's permuted Q and K), otherwise `(i, i + hd/2)` (Hugging Face's
/// rotate-half).
pub fn rope(x: &mut [f32], heads: usize, hd: usize, positions: &[u32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = hd / 2;
    let width = heads * hd;
    assert_eq!(x.len(), positions.len() * width, "rope: x is not [tokens, heads, hd]");
    par_rows(x, width, |row, piece| {
        for (t, token) in piece.chunks_exact_mut(width).enumerate() {
            let p = positions[row + t] as usize;
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for head in token.chunks_exact_mut(hd) {
                if interleaved {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * c[i] - b * s[i];
                        head[2 * i + 1] = a * s[i] + b * c[i];
                    }
                } else {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * c[i] - b * s[i];
                        hi[i] = a * s[i] + b * c[i];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    /// Each op against candle's, on sizes both under and over the parallel threshold, in a
    /// two-thread pool so the split paths run.
    #[test]
    fn the_ops_match_candle() {
        use candle_core::{Device, Tensor};
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        pool.install(|| {
            for rows in [3usize, 300] {
                let width = 576;
                let x = noise(rows * width, 1);
                let w = noise(width, 2);
                let xt = Tensor::from_slice(&x, (rows, width), &Device::Cpu).expect("tensor");
                let wt = Tensor::from_slice(&w, width, &Device::Cpu).expect("tensor");

                let mut out = vec![0f32; x.len()];
                rms_norm(&x, &w, 1e-5, &mut out);
                let want: Vec<f32> = candle_nn::ops::rms_norm(&xt, &wt, 1e-5)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .expect("candle");
                close(&out, &want, 1e-5, "rms_norm");

                let up = noise(x.len(), 3);
                let upt = Tensor::from_slice(&up, (rows, width), &Device::Cpu).expect("tensor");
                let mut g = x.clone();
                silu_mul(&mut g, &up, width);
                let want: Vec<f32> = (candle_nn::ops::silu(&xt).expect("silu") * &upt)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .expect("candle");
                close(&g, &want, 1e-5, "silu_mul");

                let mut a = x.clone();
                add_assign(&mut a, &up, width);
                let want: Vec<f32> = x.iter().zip(&up).map(|(a, b)| a + b).collect();
                assert_eq!(a, want);

                // Rope: 9 heads of 64, positions scattered over a table of 1000.
                let (heads, hd) = (9, 64);
                let positions: Vec<u32> = (0..rows as u32).map(|t| (t * 37) % 1000).collect();
                let xr = noise(rows * heads * hd, 4);
                let angles: Vec<f32> =
                    (0..1000 * hd / 2).map(|i| (i / (hd / 2)) as f32 * 0.01 * (i % 7) as f32).collect();
                let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
                let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
                for interleaved in [true, false] {
                    let mut got = xr.clone();
                    rope(&mut got, heads, hd, &positions, &cos, &sin, interleaved);
                    let dev = Device::Cpu;
                    let pos = Tensor::from_slice(&positions, rows, &dev).expect("pos");
                    let c = Tensor::from_slice(&cos, (1000, hd / 2), &dev)
                        .and_then(|t| t.index_select(&pos, 0))
                        .expect("cos");
                    let s = Tensor::from_slice(&sin, (1000, hd / 2), &dev)
                        .and_then(|t| t.index_select(&pos, 0))
                        .expect("sin");
                    let t = Tensor::from_slice(&xr, (rows, heads, hd), &dev)
                        .and_then(|t| t.transpose(0, 1)?.contiguous()?.unsqueeze(0))
                        .expect("x");
                    let y = if interleaved {
                        candle_nn::rotary_emb::rope_i(&t, &c, &s)
                    } else {
                        candle_nn::rotary_emb::rope(&t, &c, &s)
                    };
                    let want: Vec<f32> =
                        y.and_then(|y| y.squeeze(0)?.transpose(0, 1)?.flatten_all()?.to_vec1()).expect("candle rope");
                    close(&got, &want, 1e-5, "rope");
                }
            }
        });
    }

    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{i}]: {a} vs {b}");
        }
    }
}
