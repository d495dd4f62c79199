//! The LoRA step of a mixed batch on the CPU: each run of rows of the step that shares an
//! adapter gets that adapter's delta, `y += scale · (x · Aᵀ) · B`. In a forward pass it runs
//! beside the projection's base product (`QMatrix::matmul_lora`, which has these items write
//! their deltas to scratch and adds them to the product's outputs); [`apply`] adds them in
//! place to outputs already computed.
//!
//! Why a kernel of its own: the work is tiny in arithmetic (rank 16 on SmolLM2 is 5 M
//! multiply-accumulates per token over all seven projections of every layer) but every
//! distinct adapter in a step has its A and B read from memory once per step, so the cost is
//! bytes moved plus per-call overhead. Doing it with tensor ops (narrow, two matmuls, a
//! concatenation and an add per run of rows, per projection) spent more in allocation and
//! dispatch than in the reads, and needed the weights converted to F32 first, doubling the
//! bytes of an F16 adapter. Here the weights stay in the file's format (F32, F16 or BF16;
//! widened in registers, exact), the scale is applied to the rank-sized intermediate, and one
//! call covers every run of rows of the step.
//!
//! Layout ([`LoraPair`]): A and B are packed at load into panels read front to back (the
//! shrink takes four rows of A against each load of the input; the expand keeps eight outputs
//! in a register through every rank). Rows of one run are taken a few at a time, so an
//! adapter's weights, once loaded, serve them all from cache; the first row's pass prefetches
//! ahead of itself into the next item's weights ([`Ahead`]).

use std::ops::Range;

use half::{bf16, f16};

use super::{share_items, Checked, Kernel, PARALLEL_MIN_WORK};

/// Rows of one run an item computes together.
const ROWS_PER_ITEM: usize = 8;
/// f32 lanes of one AVX2 register: the packed layouts' column width.
const LANES: usize = 8;
/// Rows of A the shrink runs against each load of the input.
const A_ROWS: usize = 4;

/// Adapter weights in the float format the file stores, in one of the packed layouts of
/// [`LoraPair`].
#[derive(Debug, Clone)]
pub enum LoraMatrix {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl LoraMatrix {
    pub fn len(&self) -> usize {
        match self {
            LoraMatrix::F32(v) => v.len(),
            LoraMatrix::F16(v) => v.len(),
            LoraMatrix::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            LoraMatrix::F32(v) => v.len() * 4,
            LoraMatrix::F16(v) => v.len() * 2,
            LoraMatrix::BF16(v) => v.len() * 2,
        }
    }

    /// Element `i`, widened to f32.
    fn get(&self, i: usize) -> f32 {
        match self {
            LoraMatrix::F32(v) => v[i],
            LoraMatrix::F16(v) => v[i].to_f32(),
            LoraMatrix::BF16(v) => v[i].to_f32(),
        }
    }

    /// The same format, elements picked by `index` (`None`: a zero of padding).
    fn gather(&self, len: usize, index: impl Fn(usize) -> Option<usize>) -> LoraMatrix {
        fn pick<T: Copy>(v: &[T], zero: T, len: usize, index: impl Fn(usize) -> Option<usize>) -> Vec<T> {
            (0..len).map(|i| index(i).map_or(zero, |j| v[j])).collect()
        }
        match self {
            LoraMatrix::F32(v) => LoraMatrix::F32(pick(v, 0.0, len, index)),
            LoraMatrix::F16(v) => LoraMatrix::F16(pick(v, f16::ZERO, len, index)),
            LoraMatrix::BF16(v) => LoraMatrix::BF16(pick(v, bf16::ZERO, len, index)),
        }
    }
}

/// One patched projection in the layout this kernel reads: `delta(x) = scale · (x · Aᵀ) · B`.
///
/// Both matrices are packed at load so that every pass reads memory front to back, which is
/// what keeps a step with many distinct adapters at the memory's streaming rate:
/// - A `[rank, in]` in panels of [`A_ROWS`] rows: per panel, per 8 input columns, the 4 × 8
///   values (rank padded to a multiple of 4, `in` to a multiple of 8, with zeros);
/// - B `[out, rank]` in panels of 8 outputs: per panel, the rank × 8 values of `Bᵀ` (`out`
///   padded to a multiple of 8), so the expand keeps 8 outputs in a register through every
///   rank and reads and writes `y` once.
#[derive(Debug, Clone)]
pub struct LoraPair {
    a: LoraMatrix,
    b: LoraMatrix,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub scale: f32,
}

impl LoraPair {
    /// Packs A (`[rank, n_in]`, row-major) and B (`[n_out, rank]`, row-major), which must be
    /// in the same format.
    ///
    /// Panics if the lengths do not match the shapes.
    pub fn new(a: &LoraMatrix, b: &LoraMatrix, rank: usize, n_in: usize, n_out: usize, scale: f32) -> LoraPair {
        assert_eq!(a.len(), rank * n_in, "A must be [{rank}, {n_in}]");
        assert_eq!(b.len(), n_out * rank, "B must be [{n_out}, {rank}]");
        let (panels, chunks) = (rank.div_ceil(A_ROWS), n_in.div_ceil(LANES));
        let a = a.gather(panels * chunks * A_ROWS * LANES, |i| {
            let (l, i) = (i % LANES, i / LANES);
            let (row, i) = (i % A_ROWS, i / A_ROWS);
            let (c, g) = (i % chunks, i / chunks);
            let (j, k) = (g * A_ROWS + row, c * LANES + l);
            (j < rank && k < n_in).then_some(j * n_in + k)
        });
        let b = b.gather(n_out.div_ceil(LANES) * rank * LANES, |i| {
            let (l, i) = (i % LANES, i / LANES);
            let (j, c) = (i % rank, i / rank);
            let o = c * LANES + l;
            (o < n_out).then_some(o * rank + j)
        });
        LoraPair { a, b, rank, n_in, n_out, scale }
    }

    /// A as `[rank, n_in]` f32, row-major.
    pub fn a_f32(&self) -> Vec<f32> {
        let chunks = self.n_in.div_ceil(LANES);
        let mut out = Vec::with_capacity(self.rank * self.n_in);
        for j in 0..self.rank {
            for k in 0..self.n_in {
                let (g, row, c, l) = (j / A_ROWS, j % A_ROWS, k / LANES, k % LANES);
                out.push(self.a.get(((g * chunks + c) * A_ROWS + row) * LANES + l));
            }
        }
        out
    }

    /// B as `[n_out, rank]` f32, row-major (without the scale).
    pub fn b_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n_out * self.rank);
        for o in 0..self.n_out {
            for j in 0..self.rank {
                out.push(self.b.get(((o / LANES) * self.rank + j) * LANES + o % LANES));
            }
        }
        out
    }

    /// Host memory the packed matrices take.
    pub fn size_in_bytes(&self) -> usize {
        self.a.size_in_bytes() + self.b.size_in_bytes()
    }
}

/// A run of consecutive rows of the step that get one adapter's delta.
pub struct Group<'a> {
    pub rows: Range<usize>,
    pub pair: &'a LoraPair,
}

/// Adds each group's delta to its rows of `y` (`[rows, n_out]`), `x` being the projection's
/// input (`[rows, n_in]`). Rows in no group are left alone.
///
/// Panics if the slices do not match the shapes, a group's pair has other dimensions or
/// groups overlap.
pub fn apply(y: &mut [f32], x: &[f32], n_in: usize, n_out: usize, groups: &[Group<'_>]) {
    apply_with(Kernel::best(), y, x, n_in, n_out, groups)
}

/// `apply` with a chosen kernel (for tests; see [`checked`]).
pub fn apply_with(kernel: Kernel, y: &mut [f32], x: &[f32], n_in: usize, n_out: usize, groups: &[Group<'_>]) {
    let kernel = checked(kernel);
    let (items, work) = items(y, x, n_in, n_out, groups, Write::Add);
    if items.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || items.len() == 1 || work < PARALLEL_MIN_WORK {
        let mut t = Vec::new();
        for mut item in items {
            item.run(kernel, &mut t);
        }
        return;
    }
    share_items(items, threads, |mut item: Item<'_>, t: &mut Vec<f32>| item.run(kernel, t));
}

/// The kernel this module runs for `kernel`: AVX2 (with FMA and F16C) serves both SIMD
/// kernels, since reading the weights, not arithmetic, bounds this work.
///
/// Panics if the CPU cannot run `kernel`.
pub(super) fn checked(kernel: Kernel) -> Checked {
    match kernel {
        Kernel::Scalar => Checked(Kernel::Scalar),
        Kernel::Avx2 | Kernel::Avx512Vnni => {
            Checked::new(Kernel::Avx2).unwrap_or_else(|| panic!("this CPU cannot run the {kernel:?} kernel"))
        }
    }
}

/// How an item's result meets the rows of `y` it owns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    /// `y += delta`.
    Add,
    /// `y = delta`: `y` is scratch whose old values are never read (see `QMatrix::matmul_lora`).
    Store,
}

/// Splits the groups' work into items of up to [`ROWS_PER_ITEM`] rows of one group, each
/// owning its rows of `y` (`[rows, n_out]`); returns them with the work's multiply-accumulates.
///
/// Panics if the slices do not match the shapes, a group's pair has other dimensions or
/// groups overlap.
pub(super) fn items<'a>(
    y: &'a mut [f32],
    x: &'a [f32],
    n_in: usize,
    n_out: usize,
    groups: &[Group<'a>],
    write: Write,
) -> (Vec<Item<'a>>, usize) {
    let rows = x.len() / n_in.max(1);
    assert_eq!(x.len(), rows * n_in, "x must be [rows, in={n_in}]");
    assert_eq!(y.len(), rows * n_out, "y must be [rows={rows}, out={n_out}]");
    let mut items: Vec<Item<'a>> = Vec::new();
    let mut rest = y;
    let mut at = 0;
    let mut work = 0usize;
    for g in groups {
        let p = g.pair;
        assert!(p.n_in == n_in && p.n_out == n_out, "the adapter's projection is [{}, {}]", p.n_out, p.n_in);
        assert!(g.rows.start >= at && g.rows.end <= rows, "groups must be in order, disjoint and in range");
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((g.rows.start - at) * n_out);
        rest = tail;
        let mut r = g.rows.start;
        while r < g.rows.end {
            let n = (g.rows.end - r).min(ROWS_PER_ITEM);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n * n_out);
            rest = tail;
            items.push(Item { row: r, pair: p, next: None, x: &x[r * n_in..(r + n) * n_in], y: mine, write });
            r += n;
        }
        at = g.rows.end;
        work += g.rows.len() * p.rank * (n_in + n_out);
    }
    // Each item's next is the next other pair: items of one pair after it find it in cache.
    let mut next = None;
    for item in items.iter_mut().rev() {
        item.next = next;
        if !next.is_some_and(|n| std::ptr::eq(n, item.pair)) {
            next = Some(item.pair);
        }
    }
    (items, work)
}

pub(super) struct Item<'a> {
    /// The step's row that `x` and `y` start at.
    row: usize,
    pair: &'a LoraPair,
    /// The pair the next item in the list reads, whose weights this one prefetches as it
    /// ends (see [`Ahead`]).
    next: Option<&'a LoraPair>,
    x: &'a [f32],
    y: &'a mut [f32],
    write: Write,
}

impl<'a> Item<'a> {
    /// The step's row its rows of `y` start at, and those rows, once it has run.
    pub(super) fn output(self) -> (usize, &'a [f32]) {
        (self.row, self.y)
    }

    /// Shrink then expand, row by row; `t` is scratch for the rank-sized intermediate. The
    /// pair's weights (tens of KiB per projection) stay in cache across the item's rows.
    pub(super) fn run(&mut self, kernel: Checked, t: &mut Vec<f32>) {
        let p = self.pair;
        let store = self.write == Write::Store;
        t.clear();
        t.resize(p.rank.next_multiple_of(A_ROWS), 0.0);
        let mut ahead = Ahead::new(p, self.next);
        for (x, y) in self.x.chunks_exact(p.n_in).zip(self.y.chunks_exact_mut(p.n_out)) {
            #[cfg(target_arch = "x86_64")]
            if kernel.0 != Kernel::Scalar {
                x86::shrink(kernel, p, x, t, &mut ahead);
                x86::expand(kernel, p, &t[..p.rank], y, store, &mut ahead);
                // The item's other rows find its weights in cache.
                ahead.stop();
                continue;
            }
            shrink(p, x, t);
            if store {
                y.fill(0.0);
            }
            expand(p, &t[..p.rank], y);
        }
    }
}

/// How far ahead of its reads the LoRA kernel prefetches, in bytes. `examples/lora_step` on
/// the 2-core reference machine: one thread read 25 GB/s of adapter weights without
/// prefetching, 35 with it 16 KiB ahead (8 KiB: 33, 32 KiB: no better); a plain sequential
/// read there reaches about 36. Ahead of a kernel that jumps between adapters every few tens
/// of KiB, the hardware's prefetcher, which follows a stream within a 4 KiB page, keeps
/// restarting; this one knows where the next item's weights are.
const PREFETCH_DISTANCE: usize = 16 * 1024;

/// A cursor over the bytes an item reads (its A, then its B) followed by those the next item
/// reads first, kept a fixed distance ahead of the kernel: for each 64-byte line the kernel
/// consumes, it names the line to prefetch.
pub(super) struct Ahead {
    spans: [(*const u8, usize); 4],
    span: usize,
    at: usize,
}

impl Ahead {
    fn new(p: &LoraPair, next: Option<&LoraPair>) -> Ahead {
        let bytes = |m: &LoraMatrix| -> (*const u8, usize) {
            match m {
                LoraMatrix::F32(v) => (v.as_ptr().cast(), v.len() * 4),
                LoraMatrix::F16(v) => (v.as_ptr().cast(), v.len() * 2),
                LoraMatrix::BF16(v) => (v.as_ptr().cast(), v.len() * 2),
            }
        };
        let none = (std::ptr::null(), 0);
        let spans = [bytes(&p.a), bytes(&p.b), next.map_or(none, |n| bytes(&n.a)), next.map_or(none, |n| bytes(&n.b))];
        let mut ahead = Ahead { spans, span: 0, at: 0 };
        ahead.skip(PREFETCH_DISTANCE);
        ahead
    }

    fn skip(&mut self, mut bytes: usize) {
        while self.span < self.spans.len() {
            let left = self.spans[self.span].1 - self.at;
            if bytes < left {
                self.at += bytes;
                return;
            }
            bytes -= left;
            self.span += 1;
            self.at = 0;
        }
    }

    /// Prefetches nothing more.
    fn stop(&mut self) {
        self.span = self.spans.len();
    }

    /// The next line to prefetch, if any is left.
    #[inline]
    pub(super) fn line(&mut self) -> Option<*const u8> {
        loop {
            let (base, len) = *self.spans.get(self.span)?;
            if self.at < len {
                let line = base.wrapping_add(self.at);
                self.at += 64;
                return Some(line);
            }
            self.span += 1;
            self.at = 0;
        }
    }
}

/// `t[j] = scale · Σ_k A[j, k] · x[k]` for every row `j` of A (the portable path, in the
/// order the SIMD path adds: per row, 8 lanes, then the lanes together).
fn shrink(p: &LoraPair, x: &[f32], t: &mut [f32]) {
    let chunks = p.n_in.div_ceil(LANES);
    for (j, t) in t.iter_mut().enumerate().take(p.rank) {
        let (g, row) = (j / A_ROWS, j % A_ROWS);
        let mut lanes = [0f32; LANES];
        for c in 0..chunks {
            let base = ((g * chunks + c) * A_ROWS + row) * LANES;
            for (l, acc) in lanes.iter_mut().enumerate() {
                let xv = x.get(c * LANES + l).copied().unwrap_or(0.0);
                *acc += p.a.get(base + l) * xv;
            }
        }
        *t = p.scale * lanes.iter().sum::<f32>();
    }
}

/// `y[o] += Σ_j t[j] · B[o, j]` (the portable path).
fn expand(p: &LoraPair, t: &[f32], y: &mut [f32]) {
    for (o, y) in y.iter_mut().enumerate() {
        let (c, l) = (o / LANES, o % LANES);
        for (j, &tj) in t.iter().enumerate() {
            *y += tj * p.b.get((c * p.rank + j) * LANES + l);
        }
    }
}

/// AVX2 + FMA + F16C versions of `shrink` and `expand` for each weight format: eight lanes,
/// the weights widened to f32 as they are loaded (F16 by `vcvtph2ps`, BF16 by a 16-bit
/// shift), reading the packed layouts of [`LoraPair`] front to back.
///
/// Safety: the entry points take a `Checked` AVX2 kernel as proof of the CPU features and
/// check every length the unsafe loops rely on; a partial last panel of `x` or `y` goes
/// through an 8-lane copy.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::{Ahead, Checked, Kernel, LoraMatrix, LoraPair, A_ROWS, LANES};

    /// Prefetches the next `n` lines `ahead` names, into L2: read once, they need not
    /// displace what L1 holds.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prefetch(ahead: &mut Ahead, n: usize) {
        for _ in 0..n {
            let Some(line) = ahead.line() else { return };
            _mm_prefetch(line.cast::<i8>(), _MM_HINT_T1);
        }
    }

    /// `t` must hold the rank rounded up to a multiple of [`A_ROWS`].
    pub(super) fn shrink(kernel: Checked, p: &LoraPair, x: &[f32], t: &mut [f32], ahead: &mut Ahead) {
        debug_assert_ne!(kernel.0, Kernel::Scalar);
        let (panels, chunks) = (p.rank.div_ceil(A_ROWS), p.n_in.div_ceil(LANES));
        assert!(x.len() == p.n_in && t.len() == panels * A_ROWS, "shrink: x or t has the wrong length");
        assert_eq!(p.a.len(), panels * chunks * A_ROWS * LANES);
        // SAFETY: `kernel` is `Checked` and not scalar, so the CPU has AVX2, FMA and F16C; the
        // lengths were just checked.
        unsafe {
            match &p.a {
                LoraMatrix::F32(a) => shrink_f32(a, panels, chunks, x, p.scale, t, ahead),
                LoraMatrix::F16(a) => shrink_f16(a, panels, chunks, x, p.scale, t, ahead),
                LoraMatrix::BF16(a) => shrink_bf16(a, panels, chunks, x, p.scale, t, ahead),
            }
        }
    }

    /// `t` holds exactly the rank.
    /// `store`: `y = delta` instead of `y += delta` (the old `y` is not read).
    pub(super) fn expand(kernel: Checked, p: &LoraPair, t: &[f32], y: &mut [f32], store: bool, ahead: &mut Ahead) {
        debug_assert_ne!(kernel.0, Kernel::Scalar);
        let chunks = p.n_out.div_ceil(LANES);
        assert!(y.len() == p.n_out && t.len() == p.rank, "expand: y or t has the wrong length");
        assert_eq!(p.b.len(), chunks * p.rank * LANES);
        // SAFETY: as in `shrink`.
        unsafe {
            match &p.b {
                LoraMatrix::F32(b) => expand_f32(b, chunks, t, y, store, ahead),
                LoraMatrix::F16(b) => expand_f16(b, chunks, t, y, store, ahead),
                LoraMatrix::BF16(b) => expand_bf16(b, chunks, t, y, store, ahead),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Lanes `c*8..c*8+8` of `v`, zeros past its end.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_lanes(v: &[f32], c: usize) -> __m256 {
        let at = c * LANES;
        if at + LANES <= v.len() {
            _mm256_loadu_ps(v.as_ptr().add(at))
        } else {
            let mut tmp = [0f32; LANES];
            tmp[..v.len() - at].copy_from_slice(&v[at..]);
            _mm256_loadu_ps(tmp.as_ptr())
        }
    }

    macro_rules! shrink_expand {
        ($shrink:ident, $expand:ident, $t:ty, $load:ident) => {
            /// Requires `a.len() == panels * chunks * 32`, `t.len() == panels * 4` and
            /// `x.len() > (chunks - 1) * 8`.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $shrink(
                a: &[$t],
                panels: usize,
                chunks: usize,
                x: &[f32],
                scale: f32,
                t: &mut [f32],
                ahead: &mut Ahead,
            ) {
                // Lines of A one chunk reads.
                let lines = (A_ROWS * LANES * std::mem::size_of::<$t>()).div_ceil(64);
                let mut w = a.as_ptr();
                for g in 0..panels {
                    let mut acc = [_mm256_setzero_ps(); A_ROWS];
                    for c in 0..chunks {
                        prefetch(ahead, lines);
                        let xv = load_lanes(x, c);
                        for acc in acc.iter_mut() {
                            *acc = _mm256_fmadd_ps($load(w), xv, *acc);
                            w = w.add(LANES);
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        t[g * A_ROWS + i] = scale * hsum(*acc);
                    }
                }
            }

            /// Requires `b.len() == chunks * t.len() * 8` and `y.len() > (chunks - 1) * 8`.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $expand(b: &[$t], chunks: usize, t: &[f32], y: &mut [f32], store: bool, ahead: &mut Ahead) {
                // Lines of B one chunk reads.
                let lines = (t.len() * LANES * std::mem::size_of::<$t>()).div_ceil(64);
                let mut w = b.as_ptr();
                for c in 0..chunks {
                    prefetch(ahead, lines);
                    let mut acc = if store { _mm256_setzero_ps() } else { load_lanes(y, c) };
                    for &tj in t {
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(tj), $load(w), acc);
                        w = w.add(LANES);
                    }
                    let at = c * LANES;
                    if at + LANES <= y.len() {
                        _mm256_storeu_ps(y.as_mut_ptr().add(at), acc);
                    } else {
                        let mut tmp = [0f32; LANES];
                        _mm256_storeu_ps(tmp.as_mut_ptr(), acc);
                        let n = y.len() - at;
                        y[at..].copy_from_slice(&tmp[..n]);
                    }
                }
            }
        };
    }

    shrink_expand!(shrink_f32, expand_f32, f32, load_f32);
    shrink_expand!(shrink_f16, expand_f16, f16, load_f16);
    shrink_expand!(shrink_bf16, expand_bf16, bf16, load_bf16);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream in [-1, 1).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn pair(rng: &mut Lcg, rank: usize, n_in: usize, n_out: usize, format: usize) -> LoraPair {
        let (a, b) = (rng.vec(rank * n_in), rng.vec(n_out * rank));
        let m = |v: Vec<f32>| match format {
            0 => LoraMatrix::F32(v),
            1 => LoraMatrix::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => LoraMatrix::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        let p = LoraPair::new(&m(a.clone()), &m(b.clone()), rank, n_in, n_out, 0.5 + rank as f32 / 8.0);
        // Packing round-trips (exactly for F32; to the format's rounding otherwise).
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(x, y)| (x - y).abs() <= 1e-2 * x.abs().max(1e-2));
        assert!(close(&a, &p.a_f32()) && close(&b, &p.b_f32()), "packing loses values");
        if format == 0 {
            assert_eq!((a, b), (p.a_f32(), p.b_f32()));
        }
        p
    }

    /// `y + scale · (x · Aᵀ) · B` in f64 from the stored values.
    fn reference(y: &[f32], x: &[f32], groups: &[Group<'_>], n_in: usize, n_out: usize) -> Vec<f32> {
        let mut out: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        for g in groups {
            let (a, b) = (g.pair.a_f32(), g.pair.b_f32());
            for row in g.rows.clone() {
                for j in 0..g.pair.rank {
                    let t: f64 = (0..n_in).map(|k| a[j * n_in + k] as f64 * x[row * n_in + k] as f64).sum();
                    for o in 0..n_out {
                        out[row * n_out + o] += g.pair.scale as f64 * t * b[o * g.pair.rank + j] as f64;
                    }
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn every_kernel_and_format_matches_the_reference() {
        let mut rng = Lcg(7);
        // Odd sizes exercise the vector tails; a run of 11 rows spans two items.
        for &(n_in, n_out) in &[(64, 48), (37, 75), (576, 1536)] {
            for format in 0..3 {
                let pairs: Vec<LoraPair> =
                    [1, 3, 5, 16].iter().map(|&r| pair(&mut rng, r, n_in, n_out, format)).collect();
                let rows = 20;
                let x = rng.vec(rows * n_in);
                let y0 = rng.vec(rows * n_out);
                // Rows 0..2 base (no group), then runs of 1, 11, 2 and 1 rows, rows 17..20 base.
                let groups = [
                    Group { rows: 2..3, pair: &pairs[3] },
                    Group { rows: 3..14, pair: &pairs[0] },
                    Group { rows: 14..16, pair: &pairs[1] },
                    Group { rows: 16..17, pair: &pairs[2] },
                ];
                let want = reference(&y0, &x, &groups, n_in, n_out);
                for kernel in Kernel::available() {
                    let mut y = y0.clone();
                    apply_with(kernel, &mut y, &x, n_in, n_out, &groups);
                    let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(
                        err < 1e-3 * (n_in as f32).sqrt(),
                        "{kernel:?} format {format} {n_in}x{n_out}: max error {err}"
                    );
                    assert_eq!(&y[..2 * n_out], &y0[..2 * n_out], "rows outside every group are untouched");
                    assert_eq!(&y[17 * n_out..], &y0[17 * n_out..]);
                }
            }
        }
    }

    /// The prefetch cursor starts [`PREFETCH_DISTANCE`] into the item's bytes, walks the rest
    /// of its A and B and then the next item's, a line at a time, and names nothing else.
    #[test]
    fn the_prefetch_cursor_walks_this_item_then_the_next() {
        let mut rng = Lcg(5);
        let (p, q) = (pair(&mut rng, 16, 576, 1536, 1), pair(&mut rng, 8, 576, 192, 0));
        let span = |m: &LoraMatrix| match m {
            LoraMatrix::F32(v) => (v.as_ptr() as usize, v.len() * 4),
            LoraMatrix::F16(v) => (v.as_ptr() as usize, v.len() * 2),
            LoraMatrix::BF16(v) => (v.as_ptr() as usize, v.len() * 2),
        };
        for next in [None, Some(&q)] {
            let mut spans = vec![span(&p.a), span(&p.b)];
            if let Some(n) = next {
                spans.extend([span(&n.a), span(&n.b)]);
            }
            // The lines expected: every 64th byte of the spans in turn, the first
            // PREFETCH_DISTANCE bytes skipped.
            let mut want = Vec::new();
            let mut skip = PREFETCH_DISTANCE;
            for &(base, len) in &spans {
                let first = skip.min(len);
                skip -= first;
                want.extend((first..len).step_by(64).map(|at| base + at));
            }
            let mut ahead = Ahead::new(&p, next);
            let got: Vec<usize> = std::iter::from_fn(|| ahead.line()).map(|l| l as usize).collect();
            assert_eq!(got, want);
            let mut stopped = Ahead::new(&p, next);
            stopped.stop();
            assert!(stopped.line().is_none());
        }
    }

    #[test]
    fn many_single_row_groups_run_in_parallel_and_match() {
        let mut rng = Lcg(11);
        let (n_in, n_out) = (576, 1536);
        let pairs: Vec<LoraPair> = (0..32).map(|i| pair(&mut rng, 16, n_in, n_out, i % 3)).collect();
        let x = rng.vec(32 * n_in);
        let y0 = rng.vec(32 * n_out);
        let groups: Vec<Group<'_>> = pairs.iter().enumerate().map(|(i, p)| Group { rows: i..i + 1, pair: p }).collect();
        let want = reference(&y0, &x, &groups, n_in, n_out);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut y = y0.clone();
        pool.install(|| apply(&mut y, &x, n_in, n_out, &groups));
        let err = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 0.05, "max error {err}");
    }
}
