//! How fast this machine streams memory into the cores: GB/s of reading a buffer far larger
//! than the caches, with 1 and N threads (N: RAYON_NUM_THREADS, else every CPU), the best of
//! five passes. `scripts/bench-lora` uses it to say how close the LoRA step comes to the
//! memory's speed.
//!
//! `cargo run --release -p hearth-engine --example membw [-- MIB]` (default 1024). Prints one
//! line per thread count: `threads N: X GB/s`.

use std::time::Instant;

/// Sums a slice as u64 words in eight lanes: integer adds are associative, so the compiler
/// vectorizes the loop and the loads, not the adds, bound it.
fn read(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    for chunk in words.chunks_exact(8) {
        for (l, w) in lanes.iter_mut().zip(chunk) {
            *l = l.wrapping_add(*w);
        }
    }
    lanes.iter().fold(0, |a, b| a.wrapping_add(*b))
}

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let words = mib * (1 << 20) / 8;
    // Every page written, so reads hit memory and not the zero page.
    let buf: Vec<u64> = (0..words as u64).collect();
    let most = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let mut counts = vec![1];
    if most > 1 {
        counts.push(most);
    }
    let mut sink = 0u64;
    for threads in counts {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t0 = Instant::now();
            let part = words.div_ceil(threads);
            sink ^= std::thread::scope(|s| {
                let handles: Vec<_> = buf.chunks(part).map(|c| s.spawn(move || read(c))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, b| a ^ b)
            });
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("threads {threads}: {:.1} GB/s", (words * 8) as f64 / best / 1e9);
    }
    // Keeps the sums observable, so the reads are not optimized away.
    if sink == 42 {
        eprintln!("{sink}");
    }
}
