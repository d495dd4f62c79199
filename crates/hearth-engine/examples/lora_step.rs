//! The LoRA part of one decode step with many distinct adapters, alone: 32 rows, each with its
//! own rank-16 F16 adapter on all seven projections of SmolLM2-135M's 30 layers (what
//! `scripts/bench-lora`'s row (c) runs), through `kernels::lora::apply` as the forward pass
//! calls it. Prints the time per step and the rate the adapter weights were read at, so a
//! change to the kernel can be judged without the server's noise; `scripts/bench-lora` is
//! the end-to-end figure.
//!
//! `cargo run --release -p hearth-engine --example lora_step [-- ADAPTERS [RANK]]`
//! (default 32 adapters of rank 16). Threads: RAYON_NUM_THREADS.

use std::time::Instant;

use half::f16;
use hearth_engine::kernels::lora::{apply, Group, LoraMatrix, LoraPair};

/// SmolLM2-135M's projections, (in, out): q, k, v, o, gate, up, down.
const PROJECTIONS: [(usize, usize); 7] =
    [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)];
const LAYERS: usize = 30;

fn main() {
    let mut args = std::env::args().skip(1);
    let adapters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    let rank: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let mut seed = 1u64;
    let mut noise = |n: usize| -> Vec<f16> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                f16::from_f32(((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
            })
            .collect()
    };
    // pairs[layer][projection][adapter]
    let pairs: Vec<Vec<Vec<LoraPair>>> = (0..LAYERS)
        .map(|_| {
            PROJECTIONS
                .iter()
                .map(|&(n_in, n_out)| {
                    (0..adapters)
                        .map(|_| {
                            let a = LoraMatrix::F16(noise(rank * n_in));
                            let b = LoraMatrix::F16(noise(n_out * rank));
                            LoraPair::new(&a, &b, rank, n_in, n_out, 2.0)
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let bytes: usize = pairs.iter().flatten().flatten().map(|p| p.size_in_bytes()).sum();
    let rows = adapters;
    let xs: Vec<Vec<f32>> = PROJECTIONS.iter().map(|&(n_in, _)| vec![0.5; rows * n_in]).collect();
    let mut ys: Vec<Vec<f32>> = PROJECTIONS.iter().map(|&(_, n_out)| vec![0.0; rows * n_out]).collect();
    let step = |ys: &mut Vec<Vec<f32>>| {
        for layer in &pairs {
            for (p, per_adapter) in layer.iter().enumerate() {
                let (n_in, n_out) = PROJECTIONS[p];
                let groups: Vec<Group<'_>> =
                    per_adapter.iter().enumerate().map(|(i, pair)| Group { rows: i..i + 1, pair }).collect();
                apply(&mut ys[p], &xs[p], n_in, n_out, &groups);
            }
        }
    };
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
    pool.install(|| {
        step(&mut ys);
        let mut times = Vec::new();
        for _ in 0..15 {
            let t0 = Instant::now();
            step(&mut ys);
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{adapters} adapters of rank {rank}, {:.0} MB of weights per step: {:.2} ms per step (median of 15), {:.1} GB/s, {threads} threads",
            bytes as f64 / 1e6,
            median * 1e3,
            bytes as f64 / median / 1e9
        );
    });
}
