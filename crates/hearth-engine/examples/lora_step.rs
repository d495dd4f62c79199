//! The LoRA part of one decode step with many distinct adapters: 32 rows, each with its own
//! rank-16 F16 adapter on all seven projections of SmolLM2-135M's 30 layers (what
//! `scripts/bench-lora`'s row (c) runs). Three figures, in one run:
//!
//! - the LoRA step alone (`kernels::lora::apply`), with the rate it read the adapter weights
//!   at;
//! - the same projections' base products (random Q4_1 weights) alone, then followed by the
//!   LoRA step as separate calls, then computed together with it (`QMatrix::matmul_lora`, as
//!   the forward pass runs them), each as ms per step, with the products' time over each of
//!   the other two: the part of `scripts/bench-lora`'s (c)/(a) these calls decide.
//!
//! So a change to the kernels can be judged without the server's noise; `scripts/bench-lora`
//! is the end-to-end figure.
//!
//! `cargo run --release -p hearth-engine --example lora_step [-- ADAPTERS [RANK]]`
//! (default 32 adapters of rank 16). Threads: RAYON_NUM_THREADS (default 2).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use hearth_engine::kernels::lora::{apply, Group, LoraMatrix, LoraPair};
use hearth_engine::kernels::QMatrix;

/// SmolLM2-135M's projections, (in, out): q, k, v, o, gate, up, down.
const PROJECTIONS: [(usize, usize); 7] =
    [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)];
const LAYERS: usize = 30;

fn main() -> candle_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let adapters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    let rank: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let mut seed = 1u64;
    let mut noise = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let half = |v: Vec<f32>| LoraMatrix::F16(v.into_iter().map(f16::from_f32).collect());
    // pairs[layer][projection][adapter]
    let pairs: Vec<Vec<Vec<LoraPair>>> = (0..LAYERS)
        .map(|_| {
            PROJECTIONS
                .iter()
                .map(|&(n_in, n_out)| {
                    (0..adapters)
                        .map(|_| {
                            let (a, b) = (half(noise(rank * n_in)), half(noise(n_out * rank)));
                            LoraPair::new(&a, &b, rank, n_in, n_out, 2.0)
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    // products[layer][projection]
    let mut products: Vec<Vec<QMatrix>> = Vec::new();
    for _ in 0..LAYERS {
        let mut layer = Vec::new();
        for &(n_in, n_out) in &PROJECTIONS {
            let t = Tensor::from_vec(noise(n_out * n_in), (n_out, n_in), &Device::Cpu)?;
            let q = QTensor::quantize(&t, GgmlDType::Q4_1)?;
            layer.push(QMatrix::from_qtensor(&q).map_err(candle_core::Error::wrap)?.expect("Q4_1 is supported"));
        }
        products.push(layer);
    }
    let bytes: usize = pairs.iter().flatten().flatten().map(|p| p.size_in_bytes()).sum();
    let rows = adapters;
    let xs: Vec<Vec<f32>> = PROJECTIONS.iter().map(|&(n_in, _)| noise(rows * n_in)).collect();
    let mut ys: Vec<Vec<f32>> = PROJECTIONS.iter().map(|&(_, n_out)| vec![0.0; rows * n_out]).collect();
    let groups = |layer: usize, p: usize| -> Vec<Group<'_>> {
        pairs[layer][p].iter().enumerate().map(|(i, pair)| Group { rows: i..i + 1, pair }).collect()
    };
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
    let mut delta = Vec::new();
    // The four are timed in turn, round after round, so that a change in the machine's speed
    // during the run weighs on all of them alike.
    let mut times = [(); 4].map(|_| Vec::new());
    pool.install(|| {
        for round in 0..16 {
            let mut timed = |i: usize, f: &mut dyn FnMut()| {
                let t0 = Instant::now();
                f();
                // The first round warms up.
                if round > 0 {
                    times[i].push(t0.elapsed().as_secs_f64());
                }
            };
            timed(0, &mut || {
                for l in 0..LAYERS {
                    for (p, &(n_in, n_out)) in PROJECTIONS.iter().enumerate() {
                        apply(&mut ys[p], &xs[p], n_in, n_out, &groups(l, p));
                    }
                }
            });
            timed(1, &mut || {
                for layer in &products {
                    for (p, m) in layer.iter().enumerate() {
                        m.matmul(&xs[p], rows, &mut ys[p]);
                    }
                }
            });
            timed(2, &mut || {
                for (l, layer) in products.iter().enumerate() {
                    for (p, m) in layer.iter().enumerate() {
                        m.matmul(&xs[p], rows, &mut ys[p]);
                        apply(&mut ys[p], &xs[p], m.cols(), m.rows(), &groups(l, p));
                    }
                }
            });
            timed(3, &mut || {
                for (l, layer) in products.iter().enumerate() {
                    for (p, m) in layer.iter().enumerate() {
                        m.matmul_lora(&xs[p], rows, &mut ys[p], &groups(l, p), &mut delta);
                    }
                }
            });
        }
    });
    let [lora, base, separate, together] = times.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    });
    println!(
        "{adapters} adapters of rank {rank}, {:.0} MB of weights per step, {threads} threads, medians of 15:",
        bytes as f64 / 1e6
    );
    println!("  LoRA step alone {:.2} ms, {:.1} GB/s", lora * 1e3, bytes as f64 / lora / 1e9);
    println!(
        "  products alone {:.2} ms; with the LoRA step after them {:.2} ms (ratio {:.2}); together {:.2} ms (ratio {:.2})",
        base * 1e3,
        separate * 1e3,
        base / separate,
        together * 1e3,
        base / together
    );
    Ok(())
}
