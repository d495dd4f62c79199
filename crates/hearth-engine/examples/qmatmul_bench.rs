//! Micro-benchmark of hearth's quantized matmul (`hearth_engine::kernels::QMatrix`) against
//! candle's `QMatMul` on the same `QTensor`s, in the same run, at SmolLM2-135M's shapes:
//! one matrix at a time (hot in cache) and a sweep over a whole model's worth of distinct
//! matrices (30 layers + the output projection, streamed from DRAM as in real decoding).
//!
//! `cargo run --release -p hearth-engine --example qmatmul_bench [-- --quick] [--sweep] [--no-candle]`
//! Threads: RAYON_NUM_THREADS (both libraries honour it; default: the CPU count).

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hearth_engine::kernels::{Kernel, QMatrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SmolLM2-135M's matrices: name, rows (out), cols (in), type, count per model.
const SHAPES: [(&str, usize, usize, GgmlDType, usize); 5] = [
    ("attn q,o", 576, 576, GgmlDType::Q4_1, 60),
    ("attn k,v", 192, 576, GgmlDType::Q4_1, 60),
    ("mlp gate,up", 1536, 576, GgmlDType::Q4_1, 60),
    ("mlp down", 576, 1536, GgmlDType::Q4_1, 30),
    ("output", 49152, 576, GgmlDType::Q8_0, 1),
];

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.gen::<f32>() + rng.gen::<f32>() + rng.gen::<f32>() - 1.5) * scale).collect()
}

fn qtensor(rng: &mut StdRng, rows: usize, cols: usize, dtype: GgmlDType) -> candle_core::Result<QTensor> {
    let t = Tensor::from_vec(random(rng, rows * cols, 0.05), (rows, cols), &Device::Cpu)?;
    QTensor::quantize(&t, dtype)
}

/// Median wall time of `f`, after a warm-up, over at least `min_runs` runs and about `budget`.
fn median(budget: Duration, min_runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 1000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn gguf_bytes(rows: usize, cols: usize, dtype: GgmlDType) -> usize {
    rows * cols / dtype.block_size() * dtype.type_size()
}

fn main() -> candle_core::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sweep_only = std::env::args().any(|a| a == "--sweep");
    let budget = Duration::from_millis(if quick { 100 } else { 400 });
    let kernels: Vec<Kernel> = Kernel::available().into_iter().filter(|k| *k != Kernel::Scalar).collect();
    println!(
        "threads: rayon {}, kernels: {:?} (best {:?})",
        rayon::current_num_threads(),
        Kernel::available(),
        Kernel::best()
    );
    println!("GFLOP/s = 2·rows·cols·tokens / time; GB/s = GGUF weight bytes / time (one pass per call)\n");
    let mut rng = StdRng::seed_from_u64(42);

    if !sweep_only {
        single_matrices(&mut rng, budget, &kernels)?;
    }
    sweep(&mut rng, !std::env::args().any(|a| a == "--no-candle"))
}

fn single_matrices(rng: &mut StdRng, budget: Duration, kernels: &[Kernel]) -> candle_core::Result<()> {
    let token_counts = [1usize, 8, 32, 512];
    println!("One matrix, repeated (weights hot in L2/L3):");
    print!("{:<12} {:>13} {:>6} {:>18}", "matrix", "shape", "tokens", "candle µs GFLOP/s");
    for k in kernels {
        print!(" {:>26}", format!("{k:?} µs GFLOP/s GB/s"));
    }
    println!(" {:>8}", "speed-up");
    for (name, rows, cols, dtype, _) in SHAPES {
        let q = qtensor(rng, rows, cols, dtype)?;
        let ours = QMatrix::from_qtensor(&q)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .ok_or_else(|| candle_core::Error::Msg(format!("{dtype:?} is not handled")))?;
        let candle = QMatMul::from_qtensor(q)?;
        for tokens in token_counts {
            let x = random(rng, tokens * cols, 1.0);
            let xt = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu)?;
            let mut out = vec![0f32; tokens * rows];
            let flops = 2.0 * (rows * cols * tokens) as f64;
            let bytes = gguf_bytes(rows, cols, dtype) as f64;
            // candle on the 49152-row output with a 512-token batch takes seconds per call.
            let min_runs = if flops > 1e10 { 2 } else { 5 };
            let tc = median(budget, min_runs, || {
                black_box(candle.forward(black_box(&xt)).ok());
            });
            print!(
                "{name:<12} {:>13} {tokens:>6} {:>9.0} {:>8.1}",
                format!("{rows}×{cols}"),
                tc.as_secs_f64() * 1e6,
                flops / tc.as_secs_f64() / 1e9
            );
            let mut best = tc;
            for &k in kernels {
                let t = median(budget, min_runs, || ours.matmul_with(k, black_box(&x), tokens, &mut out));
                best = best.min(t);
                print!(
                    " {:>9.1} {:>8.1} {:>7.1}",
                    t.as_secs_f64() * 1e6,
                    flops / t.as_secs_f64() / 1e9,
                    bytes / t.as_secs_f64() / 1e9
                );
            }
            println!(" {:>7.1}×", tc.as_secs_f64() / best.as_secs_f64());
        }
    }

    Ok(())
}

fn sweep(rng: &mut StdRng, with_candle: bool) -> candle_core::Result<()> {
    // The whole model's matmuls in order, each matrix distinct, so that the weights come
    // from DRAM as they do when serving: per-token time at decode (1), batched decode (32)
    // and prefill (512; the output projection runs on one token, as for a prompt).
    println!("\nWhole-model sweep (211 distinct matrices, {:.0} MB of GGUF weights):", {
        SHAPES.iter().map(|&(_, r, c, d, n)| (gguf_bytes(r, c, d) * n) as f64).sum::<f64>() / 1e6
    });
    let mut model: Vec<(QMatrix, QMatMul, usize, usize)> = Vec::new();
    for (_, rows, cols, dtype, count) in SHAPES {
        for _ in 0..count {
            let q = qtensor(rng, rows, cols, dtype)?;
            let ours = QMatrix::from_qtensor(&q)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .ok_or_else(|| candle_core::Error::Msg("unhandled".into()))?;
            model.push((ours, QMatMul::from_qtensor(q)?, rows, cols));
        }
    }
    println!("{:>6} {:>22} {:>22} {:>8}", "tokens", "candle ms (tok/s)", "hearth ms (tok/s)", "speed-up");
    for tokens in [1usize, 32, 512] {
        let inputs: Vec<(Vec<f32>, Tensor)> = [576usize, 1536]
            .iter()
            .map(|&cols| {
                let x = random(rng, tokens * cols, 1.0);
                let t = Tensor::from_vec(x.clone(), (tokens, cols), &Device::Cpu)?;
                Ok((x, t))
            })
            .collect::<candle_core::Result<_>>()?;
        let xs = |cols: usize, rows: usize| {
            let i = usize::from(cols == 1536);
            // The output projection sees only the last token of a prompt.
            let n = if rows == 49152 && tokens == 512 { 1 } else { tokens };
            (n, &inputs[i].0[..n * cols], &inputs[i].1)
        };
        let sweeps = if tokens == 512 { 3 } else { 9 };
        let tc = if with_candle {
            median(Duration::ZERO, sweeps, || {
                for (_, c, rows, cols) in &model {
                    let (n, _, t) = xs(*cols, *rows);
                    black_box(c.forward(&t.narrow(0, 0, n).expect("in range")).ok());
                }
            })
        } else {
            Duration::ZERO
        };
        let mut out = vec![0f32; tokens * 49152];
        let th = median(Duration::ZERO, sweeps, || {
            for (m, _, rows, cols) in &model {
                let (n, x, _) = xs(*cols, *rows);
                m.matmul(x, n, &mut out[..n * rows]);
            }
        });
        let rate = |t: Duration| tokens as f64 / t.as_secs_f64();
        println!(
            "{tokens:>6} {:>22} {:>22} {:>7.1}×",
            format!("{:.2} ({:.0})", tc.as_secs_f64() * 1e3, rate(tc)),
            format!("{:.2} ({:.0})", th.as_secs_f64() * 1e3, rate(th)),
            tc.as_secs_f64() / th.as_secs_f64()
        );
    }
    Ok(())
}
