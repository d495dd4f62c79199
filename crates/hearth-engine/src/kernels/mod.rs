//! Quantized matrix multiplication on the CPU for GGUF Q4_1 and Q8_0 weights: the matrix is
//! repacked once at load into 16-row tiles, each call quantizes the activations to 8 bits per
//! 32-element block, and integer dot products run on AVX-512 VNNI or AVX2 (picked at run time)
//! or on a portable scalar path, which is also the oracle the SIMD paths are tested against.
//!
//! Why this shape: candle's Q4_1 dot product is a scalar loop, and its batched path re-reads
//! each weight row per activation row. Here one pass over a tile's weights (a few KiB, held in
//! L1) serves up to eight tokens, so a 32-stream decode step or a prefill chunk reads the
//! weights from DRAM once, and the work is compute bound on `vpdpbusd` instead.
//!
//! Layout. A tile is 16 consecutive output rows; per 32-element block of the input dimension
//! a tile holds one 64-byte header line (scales) and the quants as 64-byte lines, each line
//! being `[16 rows][4 bytes]` — exactly one 512-bit register whose 32-bit lanes are the 16
//! rows, so one `vpdpbusd` against 4 broadcast activation bytes advances all 16 dot products.
//! - Q4_1 (5 lines per tile-block, 320 bytes, the same as GGUF): header = 16 f16 `d` then 16
//!   f16 `m`; line `g` (0..4) holds each row's original quant bytes `4g..4g+4`, whose low
//!   nibbles are elements `4g..4g+4` and high nibbles elements `16+4g..16+4g+4`.
//! - Q8_0 (9 lines, 576 bytes vs GGUF's 544): header = 16 f32 `d` (f32 fills the 64-byte line
//!   that f16 would half-waste); line `g` (0..8) holds elements `4g..4g+4` stored as `q + 128`
//!   (unsigned, because `vpdpbusd` multiplies unsigned by signed bytes; the `128·Σx` this adds
//!   is subtracted per block).
//!
//! Scales stay f16 for Q4_1 because decode streams the whole model from DRAM per token and
//! f32 scales would add 20% to that traffic; converting 16 of them is one `vcvtph2ps`.
//!
//! Threads: the current rayon pool (in an engine, its own pool of `RAYON_NUM_THREADS`, by
//! default one per CPU, whose other threads spin for work during a forward pass: see
//! `crate::threads`), with the calling thread always working too (see `QMatrix::run`).
//!
//! The LoRA step of a mixed batch (shrink and expand per adapter over its rows) is in [`lora`],
//! attention over the KV caches (prefill chunks and decode rows alike) in [`attention`], the
//! elementwise rest of a forward pass in [`ops`].

pub mod attention;
pub mod lora;
pub mod ops;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use crate::error::{EngineError, Result};

/// Output rows per tile: one 32-bit lane per row in a 512-bit register.
const TILE: usize = 16;
/// Elements per quantization block, in both GGUF formats handled and in the activations.
const QK: usize = 32;
/// Most tokens one pass over a tile serves (the register budget of the AVX-512 kernels).
const MAX_NT: usize = 8;
/// Tokens per work item when a batch is split across threads by tokens as well as rows:
/// large enough that a tile's weights, loaded once into L1, serve many tokens.
const TOKEN_CHUNK: usize = 64;

/// One 64-byte, cache-line-aligned line of the repacked matrix.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Line {
    const ZERO: Line = Line([0; 64]);
}

/// The weight formats repacked here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Q4_1,
    Q8_0,
}

impl Format {
    /// Lines per tile per block: the header and the quants.
    const fn lines(self) -> usize {
        match self {
            Format::Q4_1 => 5,
            Format::Q8_0 => 9,
        }
    }

    /// Bytes of one GGUF block of 32 elements.
    const fn gguf_block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// Which implementation runs the dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust; the test oracle.
    Scalar,
    /// 256-bit `vpmaddubsw`/`vpmaddwd` (x86-64 with AVX2, FMA and F16C).
    Avx2,
    /// 512-bit `vpdpbusd` (x86-64 with AVX-512 F, BW and VNNI).
    Avx512Vnni,
}

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Avx512Vnni => false,
        }
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512Vnni].into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest kernel this CPU can run (detected once).
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| Kernel::available().last().copied().unwrap_or(Kernel::Scalar))
    }

    /// Tokens one pass over a tile may serve: AVX2 has 16 vector registers, not 32.
    fn max_tokens_per_pass(self) -> usize {
        match self {
            Kernel::Scalar => 1,
            Kernel::Avx2 => 4,
            Kernel::Avx512Vnni => MAX_NT,
        }
    }
}

/// A kernel whose CPU features have been checked; only `Checked::new` makes one, so holding
/// one is the proof the SIMD entry points rely on.
#[derive(Clone, Copy, Debug)]
struct Checked(Kernel);

impl Checked {
    fn new(kernel: Kernel) -> Option<Checked> {
        kernel.is_available().then_some(Checked(kernel))
    }
}

/// A quantized weight matrix `[rows (out), cols (in)]` in the tiled layout described above.
/// Cloning shares the data.
#[derive(Clone)]
pub struct QMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    /// `tiles × blocks × format.lines()` lines, tile-major then block.
    data: Arc<[Line]>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl QMatrix {
    /// Repacks a 2-D CPU `QTensor` of type Q4_1 or Q8_0; `None` for any other type (the caller
    /// keeps candle's path for those).
    pub fn from_qtensor(q: &QTensor) -> Result<Option<QMatrix>> {
        let format = match q.dtype() {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(None),
        };
        let (rows, cols) = match q.shape().dims() {
            &[rows, cols] => (rows, cols),
            dims => return Err(EngineError::InvalidModel(format!("a quantized matrix must be 2-D, not {dims:?}"))),
        };
        let raw = q.data()?;
        Self::from_gguf_bytes(format, rows, cols, &raw).map(Some)
    }

    fn from_gguf_bytes(format: Format, rows: usize, cols: usize, raw: &[u8]) -> Result<QMatrix> {
        if cols == 0 || !cols.is_multiple_of(QK) {
            return Err(EngineError::InvalidModel(format!(
                "a {format:?} matrix needs an input dimension that is a positive multiple of {QK}, not {cols}"
            )));
        }
        let blocks = cols / QK;
        let bb = format.gguf_block_bytes();
        if raw.len() != rows * blocks * bb {
            return Err(EngineError::InvalidModel(format!(
                "a {format:?} matrix [{rows}, {cols}] has {} bytes, expected {}",
                raw.len(),
                rows * blocks * bb
            )));
        }
        let lines = format.lines();
        let tiles = rows.div_ceil(TILE);
        // Padding rows of the last tile keep zero scales (and zero quants), so they add nothing.
        let mut data = vec![Line::ZERO; tiles * blocks * lines];
        if format == Format::Q8_0 {
            // Zero as stored `q + 128`.
            for (i, line) in data.iter_mut().enumerate() {
                if i % lines != 0 {
                    line.0 = [0x80; 64];
                }
            }
        }
        for (n, row) in raw.chunks_exact(blocks * bb).enumerate() {
            let (tile, r) = (n / TILE, n % TILE);
            for (b, block) in row.chunks_exact(bb).enumerate() {
                let base = (tile * blocks + b) * lines;
                let tb = &mut data[base..base + lines];
                match format {
                    Format::Q4_1 => {
                        // d and m stay f16: copy their bits.
                        tb[0].0[2 * r..2 * r + 2].copy_from_slice(&block[0..2]);
                        tb[0].0[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&block[2..4]);
                        for (g, quad) in block[4..20].chunks_exact(4).enumerate() {
                            tb[1 + g].0[4 * r..4 * r + 4].copy_from_slice(quad);
                        }
                    }
                    Format::Q8_0 => {
                        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                        tb[0].0[4 * r..4 * r + 4].copy_from_slice(&d.to_le_bytes());
                        for (g, quad) in block[2..34].chunks_exact(4).enumerate() {
                            for (j, &q) in quad.iter().enumerate() {
                                tb[1 + g].0[4 * r + j] = q ^ 0x80;
                            }
                        }
                    }
                }
            }
        }
        Ok(QMatrix { format, rows, cols, data: data.into() })
    }

    /// Output features (rows of the weight matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of the weight matrix).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<Line>()
    }

    /// The matrix as dense f32 `[rows, cols]`, row-major: `d·q + m` (Q4_1) or `d·q` (Q8_0),
    /// computed as candle's dequantization does, so the two agree bit for bit.
    pub fn dequantize(&self) -> Vec<f32> {
        let (blocks, lines) = (self.blocks(), self.format.lines());
        let mut out = vec![0f32; self.rows * self.cols];
        for (n, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let (tile, r) = (n / TILE, n % TILE);
            for (b, values) in row.chunks_exact_mut(QK).enumerate() {
                let base = (tile * blocks + b) * lines;
                let block = &self.data[base..base + lines];
                for (k, v) in values.iter_mut().enumerate() {
                    *v = match self.format {
                        Format::Q4_1 => {
                            let (d, m) = (scalar::f16_at(&block[0], r), scalar::f16_at(&block[0], TILE + r));
                            scalar::q4_1_quant(block, r, k) as f32 * d + m
                        }
                        Format::Q8_0 => scalar::q8_0_quant(block, r, k) as f32 * scalar::f32_at(&block[0], r),
                    };
                }
            }
        }
        out
    }

    fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// The lines of one tile: `blocks × format.lines()`.
    fn tile_lines(&self, tile: usize) -> &[Line] {
        let n = self.blocks() * self.format.lines();
        &self.data[tile * n..(tile + 1) * n]
    }

    /// `out[t, n] = Σ_k x[t, k] · W[n, k]` for `x` `[tokens, cols]` and `out` `[tokens, rows]`,
    /// both row-major, with the fastest kernel this CPU has.
    ///
    /// Panics if the slice lengths do not match the shapes.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        self.matmul_with(Kernel::best(), x, tokens, out)
    }

    /// `matmul` with a chosen kernel (for tests and benchmarks).
    ///
    /// Panics if the slice lengths do not match the shapes or the CPU cannot run `kernel`.
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], tokens: usize, out: &mut [f32]) {
        assert_eq!(x.len(), tokens * self.cols, "x must be [tokens={tokens}, in={}]", self.cols);
        assert_eq!(out.len(), tokens * self.rows, "out must be [tokens={tokens}, out={}]", self.rows);
        let Some(kernel) = Checked::new(kernel) else {
            panic!("this CPU cannot run the {kernel:?} kernel");
        };
        if tokens == 0 || self.rows == 0 {
            return;
        }
        let acts = Activations::quantize(kernel, x, tokens, self.blocks());
        self.run(kernel, acts, tokens, out);
    }

    /// Runs the product on this thread, and on rayon's pool when it is large enough to repay
    /// a second thread. Two schemes, both with this thread working from the start: a plain
    /// parallel iterator called from outside a pool parks the caller until the pool is done
    /// (two thread wake-ups per call, about 20 µs together on the reference VM, which over
    /// the 211 calls of a decoded token made two threads slower than one). In an engine the
    /// caller is a member of its pool (see `crate::threads`), where either scheme would do.
    /// - small batches (decode): `eager`, which never waits for a helper that has not started;
    /// - large batches (prefill): `scoped`, which writes straight into `out`.
    fn run(&self, kernel: Checked, acts: Activations, tokens: usize, out: &mut [f32]) {
        let tiles = self.rows.div_ceil(TILE);
        let threads = rayon::current_num_threads().max(1);
        if threads == 1 || self.rows * self.cols * tokens < PARALLEL_MIN_WORK {
            let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(self.rows).collect();
            self.run_span(kernel, &acts, 0..tiles, 0..tokens, &mut outs);
        } else if tokens <= EAGER_MAX_TOKENS {
            self.run_eager(kernel, acts, tokens, out, threads);
        } else {
            self.run_scoped(kernel, &acts, tokens, out, threads);
        }
    }

    /// Splits the rows into spans that this thread and `threads − 1` helpers spawned on the
    /// pool claim one at a time, each computing into its own buffer. This thread waits only
    /// for spans a helper has claimed; a helper that starts late finds nothing left and
    /// returns. The price is copying the results into `out`, small for a few tokens.
    fn run_eager(&self, kernel: Checked, acts: Activations, tokens: usize, out: &mut [f32], threads: usize) {
        let tiles = self.rows.div_ceil(TILE);
        // Spans of a few µs: fine enough to share between threads that start at different
        // times, coarse enough that claiming one costs nothing.
        let per_span = tiles.div_ceil(8 * threads).max(EAGER_MIN_SPAN_TILES.div_ceil(tokens));
        let spans: Vec<Range<usize>> = (0..tiles).step_by(per_span).map(|t| t..tiles.min(t + per_span)).collect();
        let job = Arc::new(EagerJob {
            matrix: self.clone(),
            kernel,
            acts,
            tokens,
            results: spans.iter().map(|_| Mutex::new(Vec::new())).collect(),
            spans,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        for _ in 1..threads.min(job.spans.len()) {
            let job = Arc::clone(&job);
            rayon::spawn(move || job.work());
        }
        job.work();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < job.spans.len() {
            if spins < 256 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
        for (span, result) in job.spans.iter().zip(&job.results) {
            let buf = result.lock().unwrap_or_else(PoisonError::into_inner);
            let (c0, c1) = (span.start * TILE, (span.end * TILE).min(self.rows));
            for (row, part) in out.chunks_exact_mut(self.rows).zip(buf.chunks_exact(c1 - c0)) {
                row[c0..c1].copy_from_slice(part);
            }
        }
    }

    /// Splits the work into items (a range of tiles × a range of tokens, each with its own
    /// disjoint slices of `out`) that this thread and `threads − 1` helpers on the pool claim
    /// one at a time; returns when all are done.
    fn run_scoped(&self, kernel: Checked, acts: &Activations, tokens: usize, out: &mut [f32], threads: usize) {
        // A few items per thread so that threads finishing at different times even out.
        let items = self.items(tokens, out, 4 * threads);
        share_items(items, threads, |mut item: Item<'_>, _: &mut ()| {
            self.run_span(kernel, acts, item.tiles, item.tokens, &mut item.outs)
        });
    }

    /// The product's work as about `parts` items (more when the tokens span several chunks),
    /// each owning its slices of `out`.
    fn items<'o>(&self, tokens: usize, out: &'o mut [f32], parts: usize) -> Vec<Item<'o>> {
        let tiles = self.rows.div_ceil(TILE);
        let token_chunk = tokens.clamp(1, TOKEN_CHUNK);
        let token_chunks = tokens.div_ceil(token_chunk);
        let parts = parts.div_ceil(token_chunks).clamp(1, tiles);
        let tiles_per_part = tiles.div_ceil(parts);
        let parts = tiles.div_ceil(tiles_per_part);

        let mut items: Vec<Item<'o>> = Vec::with_capacity(token_chunks * parts);
        for c in 0..token_chunks {
            for p in 0..parts {
                let t0 = p * tiles_per_part;
                items.push(Item {
                    tiles: t0..tiles.min(t0 + tiles_per_part),
                    tokens: c * token_chunk..tokens.min((c + 1) * token_chunk),
                    outs: Vec::with_capacity(token_chunk),
                });
            }
        }
        for (t, mut row) in out.chunks_exact_mut(self.rows).enumerate() {
            let c = t / token_chunk;
            for item in &mut items[c * parts..(c + 1) * parts] {
                let width = (item.tiles.end * TILE).min(self.rows) - item.tiles.start * TILE;
                let (mine, rest) = row.split_at_mut(width);
                item.outs.push(mine);
                row = rest;
            }
        }
        items
    }

    /// `matmul`, then each LoRA group's delta added to its rows of `out` (what
    /// [`lora::apply`] adds), the two computed at the same time on different threads.
    ///
    /// Why together: with many distinct adapters in a step the LoRA work is bound by reading
    /// their weights from memory, while the product is bound by arithmetic on weights it
    /// reads a few KiB at a time. Run one after the other, both threads first compute and
    /// then both wait on memory, and two threads streaming at once each get about half of its
    /// bandwidth. Here this thread starts on the product and the helpers on the LoRA items,
    /// each turning to the other list when its own runs out ([`share_two`]): one thread reads
    /// adapters at the rate one thread can, while the other computes, and one parallel section
    /// replaces two. The LoRA items write their deltas to `delta` (scratch the caller keeps
    /// between calls, so it is neither allocated nor cleared each time), and [`Deltas`] adds
    /// them to the product's outputs once all are known.
    ///
    /// Panics as `matmul` and `lora::apply` do.
    pub fn matmul_lora(
        &self,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        groups: &[lora::Group<'_>],
        delta: &mut Vec<f32>,
    ) {
        self.matmul_lora_with(Kernel::best(), x, tokens, out, groups, delta)
    }

    /// `matmul_lora` with a chosen kernel (for tests and benchmarks).
    pub fn matmul_lora_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        groups: &[lora::Group<'_>],
        delta: &mut Vec<f32>,
    ) {
        if groups.is_empty() {
            return self.matmul_with(kernel, x, tokens, out);
        }
        assert_eq!(x.len(), tokens * self.cols, "x must be [tokens={tokens}, in={}]", self.cols);
        assert_eq!(out.len(), tokens * self.rows, "out must be [tokens={tokens}, out={}]", self.rows);
        let lora_kernel = lora::checked(kernel);
        let Some(kernel) = Checked::new(kernel) else {
            panic!("this CPU cannot run the {kernel:?} kernel");
        };
        if delta.len() < out.len() {
            delta.resize(out.len(), 0.0);
        }
        let delta = &mut delta[..out.len()];
        let (lora_items, lora_work) = lora::items(delta, x, self.cols, self.rows, groups, lora::Write::Store);
        let acts = Activations::quantize(kernel, x, tokens, self.blocks());
        let threads = rayon::current_num_threads().max(1);
        let deltas = Deltas::new(lora_items.len(), tokens, self.rows);
        let product = |item| deltas.product(self, kernel, &acts, item);
        let adapter = |item, t: &mut Vec<f32>| deltas.adapter(lora_kernel, item, t);
        if threads == 1 || self.rows * self.cols * tokens + lora_work < PARALLEL_MIN_WORK {
            let mut t = Vec::new();
            lora_items.into_iter().for_each(|item| adapter(item, &mut t));
            self.items(tokens, out, 1).into_iter().for_each(product);
        } else {
            // More items than `run_scoped` makes: the thread that finishes the LoRA items first
            // takes the product's last ones, so they must be small.
            share_two(self.items(tokens, out, 8 * threads), lora_items, threads, product, adapter);
        }
        deltas.add_waiting();
    }

    /// Tiles `tiles` × tokens `tokens`; `outs[i]` receives token `tokens.start + i`'s outputs
    /// for the columns of those tiles.
    fn run_span(
        &self,
        kernel: Checked,
        acts: &Activations,
        tiles: Range<usize>,
        tokens: Range<usize>,
        outs: &mut [&mut [f32]],
    ) {
        let max_nt = kernel.0.max_tokens_per_pass();
        let mut res = [[0f32; TILE]; MAX_NT];
        for tile in tiles.clone() {
            let w = self.tile_lines(tile);
            let col0 = (tile - tiles.start) * TILE;
            let width = TILE.min(self.rows - tile * TILE);
            let mut t = tokens.start;
            while t < tokens.end {
                let left = (tokens.end - t).min(max_nt);
                // Passes of 8, 4, 2 or 1 tokens: each is its own fully unrolled kernel.
                let nt = if left >= 8 {
                    8
                } else if left >= 4 {
                    4
                } else if left >= 2 {
                    2
                } else {
                    1
                };
                tile_kernel(kernel, self.format, w, acts, t, &mut res[..nt]);
                for (i, r) in res[..nt].iter().enumerate() {
                    outs[t - tokens.start + i][col0..col0 + width].copy_from_slice(&r[..width]);
                }
                t += nt;
            }
        }
    }
}

/// Runs `f` on every item, on this thread and on up to `threads − 1` helpers spawned on
/// rayon's pool, each claiming the next item from a shared counter; returns when all are done.
/// This thread starts at once, so a helper the pool wakes late finds less (or nothing) left.
/// Each worker gets its own scratch `S` for `f`.
pub(crate) fn share_items<T: Send, S: Default>(items: Vec<T>, threads: usize, f: impl Fn(T, &mut S) + Sync) {
    let items = Claims::new(items);
    let work = || {
        let mut scratch = S::default();
        while let Some(item) = items.claim() {
            f(item, &mut scratch);
        }
    };
    let work = &work;
    rayon::in_place_scope(|s| {
        for _ in 1..threads.min(items.len()) {
            s.spawn(move |_| work());
        }
        work();
    });
}

/// Runs `fa` on every item of `a` and `fb` on every item of `b`, on this thread and up to
/// `threads − 1` helpers: this thread takes items of `a` first, the helpers items of `b`, and
/// each turns to the other list once its own is empty; returns when all are done. Items of
/// the two lists must not depend on each other.
pub(crate) fn share_two<A: Send, B: Send, S: Default>(
    a: Vec<A>,
    b: Vec<B>,
    threads: usize,
    fa: impl Fn(A) + Sync,
    fb: impl Fn(B, &mut S) + Sync,
) {
    let (a, b) = (Claims::new(a), Claims::new(b));
    let run_a = || {
        while let Some(item) = a.claim() {
            fa(item);
        }
    };
    let run_b = || {
        let mut scratch = S::default();
        while let Some(item) = b.claim() {
            fb(item, &mut scratch);
        }
    };
    let (run_a, run_b) = (&run_a, &run_b);
    rayon::in_place_scope(|s| {
        for _ in 1..threads.min(a.len() + b.len()) {
            s.spawn(move |_| {
                run_b();
                run_a();
            });
        }
        run_a();
        run_b();
    });
}

/// Items that several threads take one at a time, each exactly once.
struct Claims<T> {
    slots: Vec<Mutex<Option<T>>>,
    next: AtomicUsize,
}

impl<T> Claims<T> {
    fn new(items: Vec<T>) -> Claims<T> {
        Claims { slots: items.into_iter().map(|i| Mutex::new(Some(i))).collect(), next: AtomicUsize::new(0) }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// The next item no thread has taken, if any is left.
    fn claim(&self) -> Option<T> {
        loop {
            let slot = self.slots.get(self.next.fetch_add(1, Ordering::Relaxed))?;
            if let Some(item) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                return Some(item);
            }
        }
    }
}

/// Multiply-accumulates below which a product runs on the calling thread alone: waking a
/// helper costs the caller a few µs, about the time this much work takes (see `QMatrix::run`).
const PARALLEL_MIN_WORK: usize = 256 * 1024;
/// Batches up to this many tokens use `QMatrix::run_eager`.
const EAGER_MAX_TOKENS: usize = 16;
/// The least tile-tokens a span of `run_eager` holds.
const EAGER_MIN_SPAN_TILES: usize = 4;

/// The shared state of `QMatrix::run_eager`, owned jointly by the caller and its helpers (a
/// helper may start after the caller has returned).
struct EagerJob {
    matrix: QMatrix,
    kernel: Checked,
    acts: Activations,
    tokens: usize,
    spans: Vec<Range<usize>>,
    /// Per span, `[tokens][span's columns]`.
    results: Vec<Mutex<Vec<f32>>>,
    /// The next span to claim.
    next: AtomicUsize,
    /// Spans finished.
    done: AtomicUsize,
}

impl EagerJob {
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let (Some(span), Some(result)) = (self.spans.get(i), self.results.get(i)) else { return };
            let width = (span.end * TILE).min(self.matrix.rows) - span.start * TILE;
            let mut buf = vec![0f32; self.tokens * width];
            let mut outs: Vec<&mut [f32]> = buf.chunks_exact_mut(width).collect();
            self.matrix.run_span(self.kernel, &self.acts, span.clone(), 0..self.tokens, &mut outs);
            *result.lock().unwrap_or_else(PoisonError::into_inner) = buf;
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// The LoRA deltas of one `QMatrix::matmul_lora` call, gathered as its LoRA items finish, and
/// the product items that finished before all of them had.
///
/// A product item that finishes after the last LoRA item adds the deltas of its rows and
/// columns at once, while its outputs are still in this core's cache. The ones that finished
/// earlier wait here: the thread that finishes the last LoRA item adds theirs while the others
/// go on with the product, and the caller adds those of any item that queued itself just
/// after that. So no thread makes a separate pass over every output once the section is over.
struct Deltas<'a> {
    items: usize,
    tokens: usize,
    n_out: usize,
    finished: Mutex<Vec<(usize, &'a [f32])>>,
    done: AtomicUsize,
    /// Per row of the step, its delta, once every LoRA item is done.
    rows: OnceLock<Vec<Option<&'a [f32]>>>,
    waiting: Mutex<Vec<Item<'a>>>,
}

impl<'a> Deltas<'a> {
    fn new(items: usize, tokens: usize, n_out: usize) -> Deltas<'a> {
        Deltas {
            items,
            tokens,
            n_out,
            finished: Mutex::new(Vec::with_capacity(items)),
            done: AtomicUsize::new(0),
            rows: OnceLock::new(),
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// Runs a LoRA item and takes its rows of deltas.
    fn adapter(&self, kernel: Checked, mut item: lora::Item<'a>, t: &mut Vec<f32>) {
        item.run(kernel, t);
        self.finished.lock().unwrap_or_else(PoisonError::into_inner).push(item.output());
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.items {
            // The last one: the product items that finished before it get their deltas now,
            // while the other threads go on with the product.
            self.add_waiting();
        }
    }

    /// Every row's delta, if every LoRA item is done.
    fn rows(&self) -> Option<&[Option<&'a [f32]>]> {
        if self.done.load(Ordering::Acquire) < self.items {
            return None;
        }
        let rows = self.rows.get_or_init(|| {
            let mut rows = vec![None; self.tokens];
            for &(first, deltas) in self.finished.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                for (i, d) in deltas.chunks_exact(self.n_out).enumerate() {
                    rows[first + i] = Some(d);
                }
            }
            rows
        });
        Some(rows)
    }

    /// Runs a product item and adds the deltas to its outputs, now if they are all known,
    /// else at `add_waiting`.
    fn product(&self, m: &QMatrix, kernel: Checked, acts: &Activations, mut item: Item<'a>) {
        m.run_span(kernel, acts, item.tiles.clone(), item.tokens.clone(), &mut item.outs);
        match self.rows() {
            Some(rows) => add_deltas(rows, item),
            None => self.waiting.lock().unwrap_or_else(PoisonError::into_inner).push(item),
        }
    }

    /// Adds the deltas of the product items that finished before them; every LoRA item must
    /// have run. Called by the thread that finished the last LoRA item, and once more when
    /// all are done for any item that checked just before that and queued itself after.
    fn add_waiting(&self) {
        let rows = self.rows().expect("every LoRA item has run");
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
        for item in waiting {
            add_deltas(rows, item);
        }
    }
}

/// `out += delta` over a product item's outputs (its tokens × the columns of its tiles).
fn add_deltas(rows: &[Option<&[f32]>], mut item: Item<'_>) {
    let c0 = item.tiles.start * TILE;
    for (out, row) in item.outs.iter_mut().zip(&rows[item.tokens]) {
        if let Some(d) = row {
            for (o, d) in out.iter_mut().zip(&d[c0..]) {
                *o += d;
            }
        }
    }
}

/// One unit of `QMatrix::run_scoped`'s work and the parts of the output it alone writes: for
/// each of its tokens, the columns of its tiles.
struct Item<'a> {
    tiles: Range<usize>,
    tokens: Range<usize>,
    outs: Vec<&'a mut [f32]>,
}

/// One tile (16 rows) against `out.len()` consecutive tokens starting at `t0`.
fn tile_kernel(kernel: Checked, format: Format, w: &[Line], acts: &Activations, t0: usize, out: &mut [[f32; TILE]]) {
    match kernel.0 {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni | Kernel::Avx2 => x86::tile(kernel, format, w, acts, t0, out),
        _ => scalar::tile(format, w, acts, t0, out),
    }
}

/// Activations quantized per 32-element block to 8-bit integers with an f32 scale, the form
/// every kernel consumes.
struct Activations {
    blocks: usize,
    /// `[tokens][blocks][8]` words, each 4 consecutive i8 quants in little-endian order, so a
    /// kernel broadcasts one word to pair with a weight line.
    q: Vec<i32>,
    /// `[tokens][blocks]`.
    meta: Vec<BlockMeta>,
}

/// What a kernel needs of one quantized activation block besides its quants.
#[derive(Clone, Copy, Debug, Default)]
struct BlockMeta {
    /// The scale: `x ≈ d · q`.
    d: f32,
    /// `d · Σq`, the block sum of the dequantized activations, for Q4_1's `m · Σx̂`. It must be
    /// `Σx̂`, not the exact `Σx`: then the product is exactly `Σ (d·q + m)·x̂`, whose error
    /// `Σ w·(x̂ − x)` has centred weights; with `Σx` the error is `Σ (w − m)·(x̂ − x)`, and
    /// `w − m ≥ 0` spans the weights' whole range (measured: 2–4× the RMS error).
    sum: f32,
    /// `128 · Σq`, what Q8_0's `q + 128` storage adds to the integer dot product.
    offset: i32,
}

impl Activations {
    fn quantize(kernel: Checked, x: &[f32], tokens: usize, blocks: usize) -> Activations {
        let cols = blocks * QK;
        let mut a =
            Activations { blocks, q: vec![0; tokens * blocks * 8], meta: vec![BlockMeta::default(); tokens * blocks] };
        let one = |((q, meta), x): ((&mut [i32], &mut [BlockMeta]), &[f32])| quantize_row(kernel, x, q, meta);
        // Quantizing costs about 1/500 of the product it feeds; only large batches split it,
        // in chunks of rows so that each task is worth its scheduling.
        if tokens >= 64 && rayon::current_num_threads() > 1 {
            a.q.par_chunks_exact_mut(blocks * 8)
                .zip(a.meta.par_chunks_exact_mut(blocks))
                .zip(x.par_chunks_exact(cols))
                .with_min_len(16)
                .for_each(one);
        } else {
            a.q.chunks_exact_mut(blocks * 8)
                .zip(a.meta.chunks_exact_mut(blocks))
                .zip(x.chunks_exact(cols))
                .for_each(one);
        }
        a
    }

    /// The quant words of token `t`, one `[i32; 8]` per block.
    fn q(&self, t: usize) -> &[[i32; 8]] {
        self.q[t * self.blocks * 8..(t + 1) * self.blocks * 8].as_chunks::<8>().0
    }

    fn meta(&self, t: usize) -> &[BlockMeta] {
        &self.meta[t * self.blocks..(t + 1) * self.blocks]
    }
}

fn quantize_row(kernel: Checked, x: &[f32], q: &mut [i32], meta: &mut [BlockMeta]) {
    match kernel.0 {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni | Kernel::Avx2 => x86::quantize_row(kernel, x, q, meta),
        _ => quantize_row_generic(x, q, meta),
    }
}

/// Symmetric 8-bit quantization of one row, block by block: `d = max|x| / 127`,
/// `q = round_ties_even(x / d)` in [-127, 127] (so that the AVX2 kernel may negate it).
/// Inlined into the AVX2 wrapper, where it is compiled with wider instructions; the AVX-512
/// version computes the same values.
#[inline(always)]
fn quantize_row_generic(x: &[f32], q: &mut [i32], meta: &mut [BlockMeta]) {
    let (xb, _) = x.as_chunks::<QK>();
    let (qb, _) = q.as_chunks_mut::<8>();
    for ((x, q), meta) in xb.iter().zip(qb).zip(meta) {
        let amax = x.iter().fold(0f32, |m, &v| if v.abs() > m { v.abs() } else { m });
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut qi = [0i32; QK];
        for (qi, &v) in qi.iter_mut().zip(x) {
            // |v · inv| ≤ 127 up to rounding, and `as` saturates (NaN becomes 0).
            *qi = ((v * inv).round_ties_even() as i32).clamp(-127, 127);
        }
        for (w, quad) in q.iter_mut().zip(qi.as_chunks::<4>().0) {
            *w = i32::from_le_bytes([quad[0] as u8, quad[1] as u8, quad[2] as u8, quad[3] as u8]);
        }
        let qsum = qi.iter().sum::<i32>();
        let d = amax / 127.0;
        *meta = BlockMeta { d, sum: d * qsum as f32, offset: 128 * qsum };
    }
}
