//! Tests of the quantized matmul: every kernel this CPU has against an f64 product of the
//! dequantized weights and the unquantized activations (within a worst-case bound derived
//! from the activation quantization), the SIMD kernels against the scalar one (tightly: they
//! share the integer arithmetic), and all of them against candle's `QMatMul` on the same
//! `QTensor`, to show that both read the GGUF formats the same way.
//!
//! The bound. A kernel computes exactly `Σ_k w_k·x̂_k` up to float rounding, where `w` is the
//! dequantized weight and `x̂ = dx·round(x/dx)` with `dx = max|x|/127` per block, so
//! `|x̂_k − x_k| ≤ dx/2` and `|y − y_ref| ≤ Σ_b dx_b/2 · Σ_{k∈b} |w_k|`, plus float rounding
//! (below 1e-5 of `Σ|w||x|` for these sizes). The worst case assumes every rounding
//! error aligned. The typical error, the relative RMS over a case, depends on the
//! activations (0.5–3% here, with outlier channels 8× the rest) and is required to be no
//! worse than that of candle's own Q8 activation quantization, which is llama.cpp's.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Kernel, QMatrix};

/// A standard normal sample (Box–Muller; `rand` without `rand_distr`).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// Weights like a trained layer's: normal, with per-row scales and some rows off-centre (so
/// Q4_1's minimum matters).
fn random_weights(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<f32> {
    let mut w = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 0.02 * (1.0 + (r % 7) as f32);
        let shift = if r % 5 == 0 { 0.03 } else { 0.0 };
        w.extend((0..cols).map(|_| normal(rng) * scale + shift));
    }
    w
}

/// Activations like a residual stream after a norm: normal, a few outlier channels, and for
/// the first token an all-zero block (scale 0).
fn random_acts(rng: &mut StdRng, tokens: usize, cols: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..tokens * cols).map(|_| normal(rng)).collect();
    for t in 0..tokens {
        for c in [5, cols / 3, cols - 1] {
            x[t * cols + c] *= 8.0;
        }
    }
    if cols >= 64 {
        x[32..64].fill(0.0);
    }
    x
}

fn qtensor(w: Vec<f32>, rows: usize, cols: usize, dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// The exact product in f64, and per output the error bound and the magnitude `Σ|w||x|`.
struct Reference {
    y: Vec<f64>,
    bound: Vec<f64>,
    magnitude: Vec<f64>,
    /// The bound for candle's own activation quantization (f16 scales, `Σx̂` for Q4_1's `m`).
    candle_bound: Vec<f64>,
}

fn reference(q: &QTensor, x: &[f32], tokens: usize) -> Reference {
    let (rows, cols) = q.shape().dims2().unwrap();
    let w: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // Each block's minimum (0 for Q8_0), read from the GGUF bytes, for candle's bound.
    let raw = q.data().unwrap();
    let blocks = cols / 32;
    let mins: Vec<f64> = match q.dtype() {
        GgmlDType::Q4_1 => raw.chunks_exact(20).map(|b| half::f16::from_le_bytes([b[2], b[3]]).to_f64()).collect(),
        _ => vec![0.0; rows * blocks],
    };
    let mut r = Reference {
        y: vec![0.0; tokens * rows],
        bound: vec![0.0; tokens * rows],
        magnitude: vec![0.0; tokens * rows],
        candle_bound: vec![0.0; tokens * rows],
    };
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        let half_step: Vec<f64> =
            xt.chunks_exact(32).map(|b| b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)) / 127.0 / 2.0).collect();
        for n in 0..rows {
            let wn = &w[n * cols..(n + 1) * cols];
            let (mut y, mut bound, mut mag, mut cb) = (0.0, 0.0, 0.0, 0.0);
            for b in 0..blocks {
                let m = mins[n * blocks + b];
                let (mut w_abs, mut dq_abs, mut sum_abs) = (0.0, 0.0, 0.0);
                for k in b * 32..(b + 1) * 32 {
                    let (wk, xk) = (wn[k] as f64, xt[k] as f64);
                    y += wk * xk;
                    w_abs += wk.abs();
                    dq_abs += (wk - m).abs();
                    sum_abs += xk.abs();
                    mag += ((wk - m).abs() + m.abs()) * xk.abs();
                }
                bound += half_step[b] * w_abs;
                // candle: the scale rounded to f16 (relative 2^-11, times up to 127 steps)
                // and Q4_1's m multiplying Σx̂ (f16) rather than Σx.
                let step = half_step[b] * (1.0 + 254.0 / 2048.0);
                cb += step * (dq_abs + 32.0 * m.abs()) + m.abs() * (sum_abs / 1024.0 + 2.0 * half_step[b]);
            }
            let i = t * rows + n;
            r.y[i] = y;
            r.bound[i] = bound + 1e-5 * mag + 1e-30;
            r.magnitude[i] = mag;
            r.candle_bound[i] = bound + cb + 1e-4 * mag + 1e-30;
        }
    }
    r
}

/// Relative RMS error of `got` against the reference.
fn relative_rms(got: &[f32], want: &[f64]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (err / norm).sqrt()
}

fn check_shape(rows: usize, cols: usize, dtype: GgmlDType, token_counts: &[usize], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = random_weights(&mut rng, rows, cols);
    let q = qtensor(w.clone(), rows, cols, dtype);
    let m = QMatrix::from_qtensor(&q).unwrap().expect("Q4_1 and Q8_0 are handled");
    // Quantizing is deterministic: candle gets the very same blocks.
    let twin = qtensor(w, rows, cols, dtype);
    assert_eq!(twin.data().unwrap(), q.data().unwrap());
    let candle = QMatMul::from_qtensor(twin).unwrap();
    for &tokens in token_counts {
        let x = random_acts(&mut rng, tokens, cols);
        let r = reference(&q, &x, tokens);
        let case = format!("{dtype:?} [{rows}, {cols}] × {tokens} tokens");

        let mut rms = Vec::new();
        let mut scalar = vec![f32::NAN; tokens * rows];
        m.matmul_with(Kernel::Scalar, &x, tokens, &mut scalar);
        for kernel in Kernel::available() {
            let mut y = vec![f32::NAN; tokens * rows];
            m.matmul_with(kernel, &x, tokens, &mut y);
            for i in 0..y.len() {
                let err = (y[i] as f64 - r.y[i]).abs();
                assert!(
                    err <= r.bound[i],
                    "{case}, {kernel:?}: output {i} = {} but the reference is {} (error {err:e} > bound {:e})",
                    y[i],
                    r.y[i],
                    r.bound[i]
                );
                // Same quantized activations, same integer sums: only float rounding differs.
                let vs_scalar = (y[i] as f64 - scalar[i] as f64).abs();
                assert!(
                    vs_scalar <= 1e-5 * r.magnitude[i] + 1e-30,
                    "{case}, {kernel:?}: output {i} = {} but the scalar kernel gives {}",
                    y[i],
                    scalar[i]
                );
            }
            rms.push((kernel, relative_rms(&y, &r.y)));
        }

        // candle's Q4_1 dot product needs an even number of blocks.
        if dtype == GgmlDType::Q4_1 && (cols / 32) % 2 == 1 {
            continue;
        }
        let xt = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu).unwrap();
        let theirs: Vec<f32> = candle.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let mut ours = vec![0f32; tokens * rows];
        m.matmul(&x, tokens, &mut ours);
        for i in 0..ours.len() {
            let diff = (ours[i] as f64 - theirs[i] as f64).abs();
            assert!(
                diff <= r.candle_bound[i],
                "{case}: output {i} = {} but candle's QMatMul gives {} (reference {})",
                ours[i],
                theirs[i],
                r.y[i]
            );
        }
        // Typical error: no worse than candle's (llama.cpp's) own Q8 activations.
        let candle_rms = relative_rms(&theirs, &r.y);
        for (kernel, rms) in rms {
            eprintln!("{case}, {kernel:?}: relative RMS error {rms:.2e} (candle {candle_rms:.2e})");
            assert!(
                rms <= 1.1 * candle_rms + 1e-4,
                "{case}, {kernel:?}: relative RMS error {rms:e} vs candle's {candle_rms:e}"
            );
        }
    }
}

const TOKENS: [usize; 4] = [1, 3, 8, 33];

#[test]
fn q4_1_attention_q_and_o_shape() {
    check_shape(576, 576, GgmlDType::Q4_1, &TOKENS, 1);
}

#[test]
fn q4_1_attention_k_and_v_shape() {
    check_shape(192, 576, GgmlDType::Q4_1, &TOKENS, 2);
}

#[test]
fn q4_1_mlp_gate_and_up_shape() {
    check_shape(1536, 576, GgmlDType::Q4_1, &TOKENS, 3);
}

#[test]
fn q4_1_mlp_down_shape() {
    check_shape(576, 1536, GgmlDType::Q4_1, &TOKENS, 4);
}

#[test]
fn q8_0_layer_shapes() {
    check_shape(576, 576, GgmlDType::Q8_0, &TOKENS, 5);
    check_shape(576, 1536, GgmlDType::Q8_0, &TOKENS, 6);
}

/// The tied output projection, 49152 × 576 in Q8_0 (fewer token counts: the oracle is slow
/// in an unoptimised test build).
#[test]
fn q8_0_output_projection_shape() {
    check_shape(49152, 576, GgmlDType::Q8_0, &[1, 3], 7);
}

/// Rows that do not fill the last 16-row tile, a single block, and a batch large enough to be
/// split by tokens and to quantize its activations in parallel.
#[test]
fn ragged_shapes_and_large_batches() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        check_shape(200, 128, dtype, &[1, 2, 5, 130], 8);
        // An odd number of blocks (not compared with candle for Q4_1, which refuses them).
        check_shape(7, 96, dtype, &[1, 4, 9], 9);
        check_shape(192, 576, dtype, &[130], 10);
    }
}

#[test]
fn other_types_are_left_to_candle() {
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in [GgmlDType::F32, GgmlDType::Q4_0, GgmlDType::Q8_1] {
        let q = qtensor(random_weights(&mut rng, 16, 64), 16, 64, dtype);
        assert!(QMatrix::from_qtensor(&q).unwrap().is_none(), "{dtype:?}");
    }
}

/// The repacked layout loses nothing: dequantizing it gives candle's dequantization exactly,
/// including rows in a partial last tile.
#[test]
fn repacking_round_trips() {
    let mut rng = StdRng::seed_from_u64(14);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let q = qtensor(random_weights(&mut rng, 200, 96), 200, 96, dtype);
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(m.dequantize().iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype:?}");
    }
}

#[test]
fn q4_1_keeps_the_gguf_size() {
    let mut rng = StdRng::seed_from_u64(12);
    let q = qtensor(random_weights(&mut rng, 192, 576), 192, 576, GgmlDType::Q4_1);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    assert_eq!(m.size_in_bytes(), q.storage_size_in_bytes());
    assert_eq!((m.rows(), m.cols()), (192, 576));
}

#[test]
fn empty_batches_write_nothing() {
    let mut rng = StdRng::seed_from_u64(13);
    let q = qtensor(random_weights(&mut rng, 32, 64), 32, 64, GgmlDType::Q4_1);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    m.matmul(&[], 0, &mut []);
}

/// Every kernel's activation quantizer gives the generic one's quants and scales exactly
/// (ties, zero blocks and outliers included).
#[test]
fn activation_quantizers_agree() {
    use super::{Activations, Checked};
    let mut rng = StdRng::seed_from_u64(15);
    let mut x = random_acts(&mut rng, 5, 576);
    // Exact ties at ±0.5 steps: max 127, so x = k + 0.5 lands halfway.
    x[..6].copy_from_slice(&[127.0, 0.5, 1.5, -2.5, -0.5, 3.5]);
    let want = Activations::quantize(Checked(Kernel::Scalar), &x, 5, 18);
    for kernel in Kernel::available() {
        let got = Activations::quantize(Checked::new(kernel).unwrap(), &x, 5, 18);
        assert_eq!(got.q, want.q, "{kernel:?}");
        for (g, w) in got.meta.iter().zip(&want.meta) {
            assert_eq!(
                (g.d.to_bits(), g.sum.to_bits(), g.offset),
                (w.d.to_bits(), w.sum.to_bits(), w.offset),
                "{kernel:?}"
            );
        }
    }
    // Round half to even: 0.5 → 0, 1.5 → 2, −2.5 → −2, −0.5 → 0, 3.5 → 4.
    assert_eq!(want.q[0], i32::from_le_bytes([127, 0, 2, (-2i8) as u8]));
    assert_eq!(want.q[1] & 0xFFFF, i32::from(u16::from_le_bytes([0, 4])));
}

/// `matmul_lora` (the product and the LoRA step at once, on different threads) gives what the
/// product followed by `lora::apply` gives: up to float rounding in the rows with an adapter
/// (the delta is added after it is summed, not into the product's outputs), exactly in the
/// rows without; whatever the scratch held before, with one thread or several, for decode
/// batches and prefill chunks (100 tokens: two token chunks).
#[test]
fn the_product_with_lora_matches_the_product_then_the_lora_step() {
    use super::lora::{apply_with, Group, LoraMatrix, LoraPair};
    let mut rng = StdRng::seed_from_u64(21);
    for &(rows, cols) in &[(1536, 576), (192, 576)] {
        let q = qtensor(random_weights(&mut rng, rows, cols), rows, cols, GgmlDType::Q4_1);
        let m = QMatrix::from_qtensor(&q).unwrap().expect("Q4_1 is handled");
        let pairs: Vec<LoraPair> = (0..4)
            .map(|i| {
                let rank = [16, 8, 3, 16][i];
                let a: Vec<f32> = (0..rank * cols).map(|_| normal(&mut rng) * 0.05).collect();
                let b: Vec<f32> = (0..rows * rank).map(|_| normal(&mut rng) * 0.05).collect();
                LoraPair::new(&LoraMatrix::F32(a), &LoraMatrix::F32(b), rank, cols, rows, 2.0)
            })
            .collect();
        for &tokens in &[1usize, 5, 32, 100] {
            let x = random_acts(&mut rng, tokens, cols);
            // Row 0 base, then runs on adapters 0, 1 (long), 2 and 3, the last row base.
            let cut = |f: f64| ((tokens as f64 * f) as usize).clamp(1, tokens);
            let bounds = [1, cut(0.2), cut(0.7), cut(0.8), tokens.saturating_sub(1).max(1)];
            let groups: Vec<Group<'_>> = (0..4)
                .filter(|&i| bounds[i] < bounds[i + 1])
                .map(|i| Group { rows: bounds[i]..bounds[i + 1], pair: &pairs[i] })
                .collect();
            for kernel in Kernel::available() {
                let mut want = vec![0f32; tokens * rows];
                m.matmul_with(kernel, &x, tokens, &mut want);
                let base = want.clone();
                apply_with(kernel, &mut want, &x, cols, rows, &groups);
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut got = vec![f32::NAN; tokens * rows];
                    let mut delta = vec![f32::NAN; 7];
                    pool.install(|| m.matmul_lora_with(kernel, &x, tokens, &mut got, &groups, &mut delta));
                    let case = format!("[{rows}, {cols}] × {tokens} tokens, {kernel:?}, {threads} threads");
                    for t in 0..tokens {
                        let in_group = groups.iter().any(|g| g.rows.contains(&t));
                        for o in 0..rows {
                            let (g, w) = (got[t * rows + o], want[t * rows + o]);
                            if in_group {
                                assert!(
                                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                                    "{case}: row {t} output {o}: {g} vs {w}"
                                );
                            } else {
                                assert_eq!(
                                    g.to_bits(),
                                    base[t * rows + o].to_bits(),
                                    "{case}: base row {t} output {o}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `share_two` runs every item of both lists exactly once, whichever thread takes it.
#[test]
fn share_two_runs_every_item_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for threads in [1, 2, 4] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let counts: Vec<AtomicUsize> = (0..300).map(|_| AtomicUsize::new(0)).collect();
        pool.install(|| {
            super::share_two(
                (0..100).collect(),
                (100..300).collect(),
                threads,
                |i: usize| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                },
                |i: usize, seen: &mut Vec<usize>| {
                    seen.push(i);
                    counts[i].fetch_add(1, Ordering::Relaxed);
                },
            )
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{threads} threads");
    }
}
