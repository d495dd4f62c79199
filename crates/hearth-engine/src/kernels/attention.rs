//! Attention on the CPU for a whole step: every sequence's new query rows (a prefill chunk or
//! one decode row) against the keys and values its KV cache holds, read in place.
//!
//! Flash-attention's order of work, on a CPU: keys go by in blocks of [`BLOCK`] tokens, and
//! each query keeps a running maximum, a running sum and an output accumulator (an online
//! softmax), so no `[queries, keys]` score matrix is ever built and memory stays flat however
//! long the context. The `group` query heads that share a KV head go together, so each key
//! and value is loaded once per KV head.
//!
//! The cache layout is made for this loop ([`KvLayout`]): keys are stored a block at a time
//! transposed, `[head_dim][BLOCK]`, so the scores of one query against a block are a sum over
//! `head_dim` of a broadcast query element times a contiguous row of keys, vector FMAs with
//! no horizontal additions and no transposition at run time; values are stored by token,
//! `[BLOCK][head_dim]`, which is what the weighted sum of values reads. A paged cache is a
//! list of such blocks.
//!
//! Work is split into items (KV head × a tile of `TILE_QUERIES` query rows × a range of
//! `SPLIT_KEYS` keys, the ranges combined afterwards as flash-decoding does), claimed by the
//! engine's threads. So one sequence's decode row at a long context, or one long prompt,
//! keeps every thread busy.
//!
//! A query's result does not depend on the step it is computed in: its arithmetic is the same
//! whatever the other queries of its tile, its keys are cut into ranges at the same absolute
//! positions, and the ranges are combined in order (a range it cannot see combines as an exact
//! identity). A prompt prefilled in one step, in chunks, or token by token gets bit-identical
//! attention; with quantized activations downstream, where a difference in the last bit can
//! flip a rounding and grow over the layers, that is what keeps chunking invisible.
//!
//! The cache holds f32 or f16 ([`KvElem`]): at a long context decode reads the whole cache
//! every token, and half the bytes is nearly half the time; the kernel widens f16 as it loads.
//!
//! The arithmetic is written once, generic over a small vector trait ([`Simd`]) implemented
//! with AVX-512 and AVX2 intrinsics and portably (the test oracle), picked at run time.

use half::f16;

use super::{share_items, Kernel, PARALLEL_MIN_WORK};

/// Tokens per block of the KV cache, and keys per step of the online softmax.
pub const BLOCK: usize = 32;
/// Query rows per item, per head of the group.
const TILE_QUERIES: usize = 16;
/// Keys per item: every query's keys are cut at the same multiples of this, whatever step
/// the query is in (see the module's notes).
const SPLIT_KEYS: usize = 512;

/// Tokens per block of a host KV cache (`KvBlock`): four of the kernel's key blocks. Larger
/// blocks mean fewer pages for the kernel to walk at a long context (with 32-token blocks,
/// decode at 4,000 tokens of context ran 15% slower, on TLB misses), smaller ones a finer
/// grain of prefix sharing.
pub const PAGE: usize = 4 * BLOCK;

/// One block of a host KV cache: `PAGE` tokens' keys and values for every layer and KV head.
/// Keys are `[layer][head][PAGE / BLOCK][hd][BLOCK]` (the kernel's key blocks, transposed),
/// values `[layer][head][PAGE][hd]`. A cache is a list of blocks, so sequences with a common
/// prefix share its blocks (`Arc`), and a block once full is never written again.
#[derive(Debug, Clone)]
pub struct KvBlock<T> {
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: KvElem> KvBlock<T> {
    /// A block of zeros for `layers × heads × hd` elements per token.
    pub fn zeros(layers: usize, heads: usize, hd: usize) -> KvBlock<T> {
        let n = layers * heads * hd * PAGE;
        KvBlock { k: vec![T::from_f32(0.0); n], v: vec![T::from_f32(0.0); n] }
    }

    /// Where token `t % PAGE`'s element `d` of layer `layer`, head `h` is in `k`.
    pub fn key_index(heads: usize, hd: usize, layer: usize, h: usize, t: usize, d: usize) -> usize {
        let t = t % PAGE;
        (((layer * heads + h) * (PAGE / BLOCK) + t / BLOCK) * hd + d) * BLOCK + t % BLOCK
    }

    /// Where token `t % PAGE`'s values of layer `layer`, head `h` start in `v`.
    pub fn value_index(heads: usize, hd: usize, layer: usize, h: usize, t: usize) -> usize {
        ((layer * heads + h) * PAGE + t % PAGE) * hd
    }
}

/// One layer of a cache as the kernel reads it, in place: the sequence's blocks in token
/// order, and where the layer starts in each (`layer × heads × hd × PAGE` elements).
pub struct KvLayout<'a, T> {
    pub blocks: &'a [std::sync::Arc<KvBlock<T>>],
    pub offset: usize,
}

impl<T> Clone for KvLayout<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for KvLayout<'_, T> {}

/// What a KV cache may hold: f32, or f16 widened as it is loaded.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    /// The first `V::LANES` elements of `s`, as f32 lanes.
    #[doc(hidden)]
    #[allow(private_bounds)]
    fn load<V: Simd>(s: &[Self]) -> V;
}

impl KvElem for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    #[allow(private_bounds)]
    fn load<V: Simd>(s: &[Self]) -> V {
        V::load(s)
    }
}

impl KvElem for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    #[allow(private_bounds)]
    fn load<V: Simd>(s: &[Self]) -> V {
        V::load_f16(s)
    }
}

impl<T> KvLayout<'_, T> {
    /// Head `h`'s keys of the block starting at token `t0` (a multiple of `BLOCK`),
    /// `[hd][BLOCK]`.
    #[inline(always)]
    fn key_block(&self, h: usize, t0: usize, hd: usize) -> &[T] {
        let at = self.offset + (h * (PAGE / BLOCK) + (t0 % PAGE) / BLOCK) * hd * BLOCK;
        &self.blocks[t0 / PAGE].k[at..][..hd * BLOCK]
    }

    /// Head `h`'s values of the same block, `[BLOCK][hd]`.
    #[inline(always)]
    fn value_block(&self, h: usize, t0: usize, hd: usize) -> &[T] {
        &self.blocks[t0 / PAGE].v[self.offset + (h * PAGE + t0 % PAGE) * hd..][..BLOCK * hd]
    }
}

/// One sequence's part of a step: `n` query rows from row `row` of the step's queries, at
/// positions `start..start + n`, and its cache, which holds `start + n` tokens (these rows'
/// keys and values included). Query `i` sees keys `0..=start + i`.
pub struct Rows<'a, T> {
    pub row: usize,
    pub n: usize,
    pub start: usize,
    pub kv: KvLayout<'a, T>,
}

/// The shape of a step's attention.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads.
    pub nh: usize,
    /// Key/value heads; `nh` is a multiple of it.
    pub nkv: usize,
    pub hd: usize,
}

impl Heads {
    fn group(&self) -> usize {
        self.nh / self.nkv
    }
}

/// One item of work: a KV head, a tile of query rows of one sequence, a range of keys
/// starting at a block boundary.
struct Item {
    seq: usize,
    kv: usize,
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
}

/// The running softmax of a block of queries over the keys seen so far: per query its maximum
/// score, its sum of `exp(score - max)`, and `Σ exp(score - max) · v` (not yet divided).
#[derive(Debug, Clone, Default)]
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Portable,
    Avx2,
    Avx512,
}

/// Softmax(q·Kᵀ/√hd)·V for every query row of the step, causal within each sequence.
/// `q` is the step's queries `[total, nh, hd]` (row-major, as the projection makes them); the
/// result is `[total, nh, hd]` in the same order, every row of every sequence written.
pub fn attend<T: KvElem>(q: &[f32], total: usize, seqs: &[Rows<'_, T>], heads: Heads) -> Vec<f32> {
    // Both x86 builds also widen f16, which Kernel::Avx2 checks for (F16C).
    let variant = if Kernel::Avx512Vnni.is_available() && Kernel::Avx2.is_available() {
        Variant::Avx512
    } else if Kernel::Avx2.is_available() {
        Variant::Avx2
    } else {
        Variant::Portable
    };
    attend_with(variant, q, total, seqs, heads)
}

fn attend_with<T: KvElem>(variant: Variant, q: &[f32], total: usize, seqs: &[Rows<'_, T>], heads: Heads) -> Vec<f32> {
    let Heads { nh, hd, .. } = heads;
    assert_eq!(q.len(), total * nh * hd, "attend: q is not [total, nh, hd]");
    let mut items = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        for kv in 0..heads.nkv {
            for r0 in (0..seq.n).step_by(TILE_QUERIES) {
                let rows = r0..(r0 + TILE_QUERIES).min(seq.n);
                // Keys past the last row's position are masked for every row: not visited.
                let visible = seq.start + rows.end;
                for k0 in (0..visible).step_by(SPLIT_KEYS) {
                    items.push(Item { seq: s, kv, rows: rows.clone(), keys: k0..(k0 + SPLIT_KEYS).min(visible) });
                }
            }
        }
    }
    let results: Vec<std::sync::Mutex<Partial>> = items.iter().map(|_| Default::default()).collect();
    let indexed: Vec<(usize, &Item)> = items.iter().enumerate().collect();
    // Little work (a decode row at a short context) is done sooner here than by waking helpers.
    let work: usize = items.iter().map(|i| i.rows.len() * heads.group() * i.keys.len() * hd).sum();
    let threads = if work < PARALLEL_MIN_WORK { 1 } else { rayon::current_num_threads().max(1) };
    share_items(indexed, threads, |(i, item), scratch: &mut Scratch| {
        let partial = run(variant, q, &seqs[item.seq], item, heads, scratch);
        if let Ok(mut slot) = results[i].lock() {
            *slot = partial;
        }
    });
    // Combine the items of each (sequence, head, rows) and write the normalized rows.
    let mut out = vec![0f32; total * nh * hd];
    let group = heads.group();
    let mut i = 0;
    while i < items.len() {
        let first = &items[i];
        let mut j = i + 1;
        while j < items.len() && items[j].seq == first.seq && items[j].kv == first.kv && items[j].rows == first.rows {
            j += 1;
        }
        let parts: Vec<Partial> =
            results[i..j].iter().filter_map(|r| r.lock().ok().map(|mut p| std::mem::take(&mut *p))).collect();
        let merged = merge(parts, hd);
        let seq = &seqs[first.seq];
        for (b, r) in first.rows.clone().enumerate() {
            for g in 0..group {
                let h = first.kv * group + g;
                let at = b * group + g;
                let o = &mut out[((seq.row + r) * nh + h) * hd..][..hd];
                let inv = 1.0 / merged.sum[at];
                for (o, a) in o.iter_mut().zip(&merged.acc[at * hd..(at + 1) * hd]) {
                    *o = a * inv;
                }
            }
        }
        i = j;
    }
    out
}

/// Several partial softmaxes of the same queries over consecutive key ranges, as one, folded
/// in order (so the result is the same for every query that saw the same ranges).
fn merge(parts: Vec<Partial>, hd: usize) -> Partial {
    let mut parts = parts.into_iter();
    let Some(mut m) = parts.next() else { return Partial::default() };
    for p in parts {
        for i in 0..m.max.len() {
            let max = m.max[i].max(p.max[i]);
            let (a, b) = (exp_approx(m.max[i] - max), exp_approx(p.max[i] - max));
            m.sum[i] = m.sum[i] * a + p.sum[i] * b;
            for (x, y) in m.acc[i * hd..(i + 1) * hd].iter_mut().zip(&p.acc[i * hd..(i + 1) * hd]) {
                *x = *x * a + y * b;
            }
            m.max[i] = max;
        }
    }
    m
}

/// Buffers an item reuses: the block's queries, their limits, a block of scores.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    limit: Vec<usize>,
    s: Vec<f32>,
}

fn run<T: KvElem>(
    variant: Variant,
    q: &[f32],
    seq: &Rows<'_, T>,
    item: &Item,
    heads: Heads,
    scratch: &mut Scratch,
) -> Partial {
    match variant {
        #[cfg(target_arch = "x86_64")]
        Variant::Avx512 => x86::block_avx512(q, seq, item, heads, scratch),
        #[cfg(target_arch = "x86_64")]
        Variant::Avx2 => x86::block_avx2(q, seq, item, heads, scratch),
        _ => block::<Portable, T, 2, 4, 4>(q, seq, item, heads, scratch),
    }
}

/// The vector operations the kernel is written in.
trait Simd: Copy {
    const LANES: usize;
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// The first `LANES` elements of `s`.
    fn load(s: &[f32]) -> Self;
    /// The first `LANES` elements of `s`, widened.
    fn load_f16(s: &[f16]) -> Self;
    fn store(self, s: &mut [f32]);
    /// `self * b + c`.
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    fn sub(self, b: Self) -> Self;
    fn max(self, b: Self) -> Self;
    /// To the nearest integer (ties either way).
    fn round(self) -> Self;
    /// `2^n` for lanes holding integers in `-127..=127` (`-127` gives 0).
    fn pow2i(self) -> Self;
    fn reduce_max(self) -> f32;
    fn reduce_add(self) -> f32;

    /// [`exp_approx`] on every lane.
    #[inline(always)]
    fn exp(self) -> Self {
        let x = self.max(Self::splat(EXP_MIN));
        let n = x.mul(Self::splat(std::f32::consts::LOG2_E)).round();
        let f = n.mul_add(Self::splat(-LN2_HI), x);
        let f = n.mul_add(Self::splat(-LN2_LO), f);
        let mut p = Self::splat(EXP_POLY[6]);
        for c in EXP_POLY[..6].iter().rev() {
            p = p.mul_add(f, Self::splat(*c));
        }
        p.mul(n.pow2i())
    }
}

/// Below this `exp_approx` is 0 (`2^-127`, built as a zero exponent field).
const EXP_MIN: f32 = -88.0;
/// ln 2 in two parts (Cody and Waite): `n · LN2_HI` is exact for the `n` that occur, so the
/// reduced argument carries no rounding error of its own.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Taylor coefficients of `e^f`, exact enough on `[-ln2/2, ln2/2]`.
const EXP_POLY: [f32; 7] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0];

/// `exp(x)` for `x ≤ 0` (where softmax needs it) to about 2e-7 relative error down to -87,
/// 0 below about -87.7 and at -∞: `2^n · e^f` with `n = round(x · log2 e)` and a degree-6
/// polynomial for `e^f`. The scalar form of [`Simd::exp`].
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let x = x.max(EXP_MIN);
    let n = (x * std::f32::consts::LOG2_E).round();
    let f = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = EXP_POLY[6];
    for c in EXP_POLY[..6].iter().rev() {
        p = p * f + c;
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Portable lanes: plain arrays, the reference the SIMD builds are tested against.
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Portable {
    #[inline(always)]
    fn map(self, f: impl Fn(f32) -> f32) -> Self {
        Portable(self.0.map(f))
    }

    #[inline(always)]
    fn zip(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Portable(std::array::from_fn(|i| f(self.0[i], b.0[i])))
    }
}

impl Simd for Portable {
    const LANES: usize = 8;
    fn zero() -> Self {
        Portable([0.0; 8])
    }
    fn splat(x: f32) -> Self {
        Portable([x; 8])
    }
    fn load(s: &[f32]) -> Self {
        let mut a = [0.0; 8];
        a.copy_from_slice(&s[..8]);
        Portable(a)
    }
    fn load_f16(s: &[f16]) -> Self {
        let s = &s[..8];
        Portable(std::array::from_fn(|i| s[i].to_f32()))
    }
    fn store(self, s: &mut [f32]) {
        s[..8].copy_from_slice(&self.0);
    }
    fn mul_add(self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
    fn mul(self, b: Self) -> Self {
        self.zip(b, |x, y| x * y)
    }
    fn sub(self, b: Self) -> Self {
        self.zip(b, |x, y| x - y)
    }
    fn max(self, b: Self) -> Self {
        self.zip(b, f32::max)
    }
    fn round(self) -> Self {
        self.map(f32::round)
    }
    fn pow2i(self) -> Self {
        self.map(|n| f32::from_bits(((n as i32 + 127) as u32) << 23))
    }
    fn reduce_max(self) -> f32 {
        self.0.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
    fn reduce_add(self) -> f32 {
        self.0.iter().sum()
    }
}

/// One item: the `group × rows` queries of KV head `item.kv` over `item.keys`, an online
/// softmax one key block at a time. `QB` queries go together through each block (their
/// scores in `QB × NV` registers, `NV · LANES = BLOCK`), and the weighted sum of values keeps
/// `QB × JB` vectors of outputs in registers. Inlined into each instruction-set version.
#[inline(always)]
fn block<V: Simd, T: KvElem, const QB: usize, const NV: usize, const JB: usize>(
    q: &[f32],
    seq: &Rows<'_, T>,
    item: &Item,
    heads: Heads,
    scratch: &mut Scratch,
) -> Partial {
    debug_assert_eq!(NV * V::LANES, BLOCK);
    let Heads { nh, hd, .. } = heads;
    let group = heads.group();
    let g = group * item.rows.len();
    let scale = 1.0 / (hd as f32).sqrt();
    // The item's queries, pre-scaled, `[g][hd]`; and each one's first invisible key.
    scratch.q.clear();
    scratch.limit.clear();
    for r in item.rows.clone() {
        for j in 0..group {
            let h = item.kv * group + j;
            let row = &q[((seq.row + r) * nh + h) * hd..][..hd];
            scratch.q.extend(row.iter().map(|x| x * scale));
            scratch.limit.push(seq.start + r + 1);
        }
    }
    let mut st = State { max: vec![f32::NEG_INFINITY; g], sum: vec![0f32; g], acc: vec![0f32; g * hd] };
    scratch.s.resize(g * BLOCK, 0.0);
    let mut t0 = item.keys.start;
    while t0 < item.keys.end {
        let tk = (item.keys.end - t0).min(BLOCK);
        let kt = seq.kv.key_block(item.kv, t0, hd);
        let vt = seq.kv.value_block(item.kv, t0, hd);
        // The cache's pages are allocated one by one, so the next page is elsewhere in memory,
        // where the hardware prefetcher, which follows streams within a page, does not look:
        // ask for the blocks ahead while this one is computed.
        if t0 == item.keys.start {
            for ahead in 1..PREFETCH_AHEAD {
                if t0 + ahead * BLOCK < item.keys.end {
                    prefetch(seq.kv.key_block(item.kv, t0 + ahead * BLOCK, hd));
                    prefetch(seq.kv.value_block(item.kv, t0 + ahead * BLOCK, hd));
                }
            }
        }
        if t0 + PREFETCH_AHEAD * BLOCK < item.keys.end {
            prefetch(seq.kv.key_block(item.kv, t0 + PREFETCH_AHEAD * BLOCK, hd));
            prefetch(seq.kv.value_block(item.kv, t0 + PREFETCH_AHEAD * BLOCK, hd));
        }
        let tile = Tile { t0, tk, hd, kt, vt };
        let mut i = 0;
        while i + QB <= g {
            tile.queries::<V, QB, NV, JB>(i, &scratch.q, &scratch.limit, &mut scratch.s, &mut st);
            i += QB;
        }
        while i < g {
            tile.queries::<V, 1, NV, JB>(i, &scratch.q, &scratch.limit, &mut scratch.s, &mut st);
            i += 1;
        }
        t0 += tk;
    }
    Partial { max: st.max, sum: st.sum, acc: st.acc }
}

/// How many key blocks ahead of the one computed the kernel prefetches (a cache page ahead):
/// one block of one head computes faster than memory answers, and the next page is elsewhere.
const PREFETCH_AHEAD: usize = 4;

/// Asks the CPU to bring `s` into its caches (a hint; nothing on other architectures).
#[inline(always)]
fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    x86::prefetch(s);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// An item's running softmax (see [`Partial`]), being built.
struct State {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// One key block of an item: keys `t0..t0 + tk` of KV head `head`.
struct Tile<'a, T> {
    t0: usize,
    tk: usize,
    hd: usize,
    /// The block's keys, `[hd][BLOCK]`, and values, `[BLOCK][hd]`, of the item's KV head.
    kt: &'a [T],
    vt: &'a [T],
}

impl<T: KvElem> Tile<'_, T> {
    /// Queries `i0..i0 + QB` of the item through this block.
    #[inline(always)]
    fn queries<V: Simd, const QB: usize, const NV: usize, const JB: usize>(
        &self,
        i0: usize,
        q: &[f32],
        limit: &[usize],
        s: &mut [f32],
        st: &mut State,
    ) {
        let (hd, l) = (self.hd, V::LANES);
        // Scores: Σ_d q[i][d] · kt[d][·], QB × BLOCK of them in registers.
        let mut acc = [[V::zero(); NV]; QB];
        for d in 0..hd {
            let row = &self.kt[d * BLOCK..(d + 1) * BLOCK];
            let k: [V; NV] = std::array::from_fn(|j| T::load(&row[j * l..]));
            for (b, a) in acc.iter_mut().enumerate() {
                let qd = V::splat(q[(i0 + b) * hd + d]);
                for j in 0..NV {
                    a[j] = qd.mul_add(k[j], a[j]);
                }
            }
        }
        // Online softmax: per query, the block's probabilities (unnormalized) into `s`, and
        // the running max, sum and output rescaled to the new max.
        for (b, a) in acc.iter().enumerate() {
            let i = i0 + b;
            let row = &mut s[i * BLOCK..(i + 1) * BLOCK];
            for (j, v) in a.iter().enumerate() {
                v.store(&mut row[j * l..]);
            }
            // Keys this query cannot see (causal, or past the range) drop out.
            let visible = limit[i].saturating_sub(self.t0).min(self.tk);
            if visible == 0 {
                row.fill(0.0);
                continue;
            }
            row[visible..].fill(f32::NEG_INFINITY);
            let mut m = V::load(row);
            for j in 1..NV {
                m = m.max(V::load(&row[j * l..]));
            }
            let new_max = st.max[i].max(m.reduce_max());
            let correction = exp_approx(st.max[i] - new_max);
            let nm = V::splat(new_max);
            let mut total = V::zero();
            for j in 0..NV {
                let p = V::load(&row[j * l..]).sub(nm).exp();
                p.store(&mut row[j * l..]);
                total = V::splat(1.0).mul_add(p, total);
            }
            st.sum[i] = st.sum[i] * correction + total.reduce_add();
            st.max[i] = new_max;
            if correction != 1.0 {
                for a in &mut st.acc[i * hd..(i + 1) * hd] {
                    *a *= correction;
                }
            }
        }
        // acc[i] += Σ_t p[i][t] · v[t]: JB vectors of each output row at a time, whole
        // vectors first, then the elements of a head size that is not a multiple of LANES.
        let chunks = hd / l;
        let mut c = 0;
        while c + JB <= chunks {
            self.weighted_values::<V, QB, JB>(i0, c, s, &mut st.acc);
            c += JB;
        }
        while c < chunks {
            self.weighted_values::<V, QB, 1>(i0, c, s, &mut st.acc);
            c += 1;
        }
        for t in 0..self.tk {
            let v = &self.vt[t * hd..(t + 1) * hd];
            for b in 0..QB {
                let p = s[(i0 + b) * BLOCK + t];
                let acc = &mut st.acc[(i0 + b) * hd..(i0 + b + 1) * hd];
                for (a, x) in acc[chunks * l..].iter_mut().zip(&v[chunks * l..]) {
                    *a += p * x.to_f32();
                }
            }
        }
    }

    /// `acc[i][c·L..(c+JB)·L] += Σ_t p[i][t] · v[t][same]` for queries `i0..i0 + QB`.
    #[inline(always)]
    fn weighted_values<V: Simd, const QB: usize, const JB: usize>(
        &self,
        i0: usize,
        c: usize,
        s: &[f32],
        acc: &mut [f32],
    ) {
        let (hd, l) = (self.hd, V::LANES);
        let mut o: [[V; JB]; QB] =
            std::array::from_fn(|b| std::array::from_fn(|j| V::load(&acc[(i0 + b) * hd + (c + j) * l..])));
        for t in 0..self.tk {
            let v = &self.vt[t * hd..(t + 1) * hd];
            let vs: [V; JB] = std::array::from_fn(|j| T::load(&v[(c + j) * l..]));
            for (b, o) in o.iter_mut().enumerate() {
                let p = V::splat(s[(i0 + b) * BLOCK + t]);
                for j in 0..JB {
                    o[j] = p.mul_add(vs[j], o[j]);
                }
            }
        }
        for (b, o) in o.iter().enumerate() {
            for (j, v) in o.iter().enumerate() {
                v.store(&mut acc[(i0 + b) * hd + (c + j) * l..]);
            }
        }
    }
}

/// The AVX2 and AVX-512 builds of `block`, with their vector types.
///
/// Safety: the builds are entered only after `Kernel::is_available` confirmed the features;
/// the vector types' methods are inlined into them and are only reached from there. Loads and
/// stores go through slices checked to hold a whole vector.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{block, Heads, Item, KvElem, Partial, Rows, Scratch, Simd};

    /// A prefetch of every cache line of `s` into all cache levels.
    #[inline(always)]
    pub(super) fn prefetch<T>(s: &[T]) {
        let bytes = std::mem::size_of_val(s);
        let p = s.as_ptr() as *const i8;
        let mut at = 0;
        while at < bytes {
            // Safety: SSE is part of x86-64, and a prefetch of an address inside a live slice
            // reads nothing and cannot fault.
            unsafe { _mm_prefetch(p.add(at), _MM_HINT_T0) };
            at += 64;
        }
    }

    pub(super) fn block_avx2<T: KvElem>(
        q: &[f32],
        seq: &Rows<'_, T>,
        item: &Item,
        heads: Heads,
        s: &mut Scratch,
    ) -> Partial {
        // SAFETY: the caller checked AVX2, FMA and F16C.
        unsafe { avx2(q, seq, item, heads, s) }
    }

    pub(super) fn block_avx512<T: KvElem>(
        q: &[f32],
        seq: &Rows<'_, T>,
        item: &Item,
        heads: Heads,
        s: &mut Scratch,
    ) -> Partial {
        // SAFETY: the caller checked AVX-512 F (with BW and VNNI).
        unsafe { avx512(q, seq, item, heads, s) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<T: KvElem>(q: &[f32], seq: &Rows<'_, T>, item: &Item, heads: Heads, s: &mut Scratch) -> Partial {
        // 2 queries × 4 vectors of scores; 2 × 4 output vectors (16 registers in all).
        block::<F32x8, T, 2, 4, 4>(q, seq, item, heads, s)
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn avx512<T: KvElem>(q: &[f32], seq: &Rows<'_, T>, item: &Item, heads: Heads, s: &mut Scratch) -> Partial {
        // 4 queries × 2 vectors of scores; 4 × 4 output vectors (of 32 registers).
        block::<F32x16, T, 4, 2, 4>(q, seq, item, heads, s)
    }

    #[derive(Clone, Copy)]
    struct F32x8(__m256);

    impl Simd for F32x8 {
        const LANES: usize = 8;
        #[inline(always)]
        fn zero() -> Self {
            unsafe { F32x8(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { F32x8(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Self {
            let s = &s[..8];
            unsafe { F32x8(_mm256_loadu_ps(s.as_ptr())) }
        }
        #[inline(always)]
        fn load_f16(s: &[f16]) -> Self {
            let s = &s[..8];
            // f16 is a transparent u16: 8 of them are one 128-bit load.
            unsafe { F32x8(_mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast()))) }
        }
        #[inline(always)]
        fn store(self, s: &mut [f32]) {
            let s = &mut s[..8];
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { F32x8(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { F32x8(_mm256_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            unsafe { F32x8(_mm256_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            unsafe { F32x8(_mm256_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn round(self) -> Self {
            unsafe { F32x8(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)) }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = _mm256_add_epi32(_mm256_cvtps_epi32(self.0), _mm256_set1_epi32(127));
                F32x8(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(n)))
            }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe {
                let m = _mm_max_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
                _mm_cvtss_f32(m)
            }
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            unsafe {
                let m = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
                let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_add_ss(m, _mm_shuffle_ps::<1>(m, m));
                _mm_cvtss_f32(m)
            }
        }
    }

    #[derive(Clone, Copy)]
    struct F32x16(__m512);

    impl Simd for F32x16 {
        const LANES: usize = 16;
        #[inline(always)]
        fn zero() -> Self {
            unsafe { F32x16(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { F32x16(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Self {
            let s = &s[..16];
            unsafe { F32x16(_mm512_loadu_ps(s.as_ptr())) }
        }
        #[inline(always)]
        fn load_f16(s: &[f16]) -> Self {
            let s = &s[..16];
            // f16 is a transparent u16: 16 of them are one 256-bit load.
            unsafe { F32x16(_mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast()))) }
        }
        #[inline(always)]
        fn store(self, s: &mut [f32]) {
            let s = &mut s[..16];
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { F32x16(_mm512_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { F32x16(_mm512_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            unsafe { F32x16(_mm512_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            unsafe { F32x16(_mm512_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn round(self) -> Self {
            unsafe { F32x16(_mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)) }
        }
        #[inline(always)]
        fn pow2i(self) -> Self {
            unsafe {
                let n = _mm512_add_epi32(_mm512_cvtps_epi32(self.0), _mm512_set1_epi32(127));
                F32x16(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(n)))
            }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A one-layer cache of `cap` tokens in the cache's blocks (the last filled with NaN past
    /// `cap`), from keys and values given as `[heads][cap][hd]`.
    fn layout<T: KvElem>(k: &[f32], v: &[f32], heads: usize, cap: usize, hd: usize) -> Vec<Arc<KvBlock<T>>> {
        (0..cap.div_ceil(PAGE))
            .map(|b| {
                let mut block = KvBlock::<T>::zeros(1, heads, hd);
                block.k.fill(T::from_f32(f32::NAN));
                block.v.fill(T::from_f32(f32::NAN));
                for h in 0..heads {
                    for t in b * PAGE..((b + 1) * PAGE).min(cap) {
                        for d in 0..hd {
                            block.k[KvBlock::<T>::key_index(heads, hd, 0, h, t, d)] =
                                T::from_f32(k[(h * cap + t) * hd + d]);
                            block.v[KvBlock::<T>::value_index(heads, hd, 0, h, t) + d] =
                                T::from_f32(v[(h * cap + t) * hd + d]);
                        }
                    }
                }
                Arc::new(block)
            })
            .collect()
    }

    /// Causal softmax(q·Kᵀ/√hd)·V per head in f64, from keys and values `[heads][cap][hd]`.
    fn reference(
        q: &[f32],
        caches: &[(Vec<f32>, Vec<f32>, usize)],
        shapes: &[(usize, usize, usize)],
        heads: Heads,
    ) -> Vec<f32> {
        let Heads { nh, hd, .. } = heads;
        let group = heads.group();
        let total: usize = shapes.iter().map(|s| s.0).sum();
        let mut out = vec![0f32; total * nh * hd];
        let mut r = 0;
        for ((k, v, cap), &(n, start, _)) in caches.iter().zip(shapes) {
            for i in 0..n {
                for h in 0..nh {
                    let qv = &q[(r * nh + h) * hd..][..hd];
                    let kv = h / group;
                    let at = |t: usize| (kv * cap + t) * hd;
                    let len = start + i + 1;
                    let s: Vec<f64> = (0..len)
                        .map(|t| {
                            qv.iter().zip(&k[at(t)..at(t) + hd]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let o: f64 = (0..len).map(|t| e[t] / z * v[at(t) + d] as f64).sum();
                        out[(r * nh + h) * hd + d] = o as f32;
                    }
                }
                r += 1;
            }
        }
        out
    }

    fn noise(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn exp_approx_is_close_to_exp_where_softmax_uses_it() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -87.0 * i as f32 / 100_000.0;
            let (got, want) = (exp_approx(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
        assert_eq!(exp_approx(0.0), 1.0);
    }

    /// Several sequences in one step: a long prefill chunk after a cached prefix, a decode
    /// row at a long context (split among items), short chunks, with caches that have room
    /// past what they hold (NaN there: never to be read into a result), grouped heads, and
    /// a head size that is not a multiple of the vector width. Every build of the kernel, on
    /// f32 and f16 caches, against the f64 reference (over the values the cache holds).
    #[test]
    fn every_kernel_matches_an_f64_reference_over_long_strided_caches() {
        check_against_reference::<f32>();
        check_against_reference::<f16>();
    }

    fn check_against_reference<T: KvElem>() {
        for (nh, nkv, hd) in [(9, 3, 64), (4, 4, 20), (8, 2, 128)] {
            let heads = Heads { nh, nkv, hd };
            let mut seed = 7u64 + hd as u64;
            // (n, start, capacity)
            let shapes = [
                (37, 700, 1024),
                (1, 1500, 1600),
                (5, 0, 32),
                (1, 3, 64),
                (16, 16, 64),
                (300, 0, 320),
                (37, 481, 1024),
            ];
            let caches: Vec<(Vec<f32>, Vec<f32>, usize)> = shapes
                .iter()
                .map(|&(n, start, cap)| {
                    // What the cache holds, as f32 (rounded through T).
                    let round = |x: f32| T::from_f32(x).to_f32();
                    let mut k: Vec<f32> = noise(&mut seed, nkv * cap * hd, 1.0).into_iter().map(round).collect();
                    let mut v: Vec<f32> = noise(&mut seed, nkv * cap * hd, 1.0).into_iter().map(round).collect();
                    for h in 0..nkv {
                        for t in start + n..cap {
                            k[(h * cap + t) * hd..][..hd].fill(f32::NAN);
                            v[(h * cap + t) * hd..][..hd].fill(f32::NAN);
                        }
                    }
                    (k, v, cap)
                })
                .collect();
            let laid: Vec<Vec<Arc<KvBlock<T>>>> =
                caches.iter().map(|(k, v, cap)| layout::<T>(k, v, nkv, *cap, hd)).collect();
            let total: usize = shapes.iter().map(|s| s.0).sum();
            // Large queries make peaked softmaxes, the case where a running maximum matters.
            let q = noise(&mut seed, total * nh * hd, 3.0);
            let mut row = 0;
            let seqs: Vec<Rows<'_, T>> = shapes
                .iter()
                .zip(&laid)
                .map(|(&(n, start, _), blocks)| {
                    let r = Rows { row, n, start, kv: KvLayout { blocks, offset: 0 } };
                    row += n;
                    r
                })
                .collect();
            let want = reference(&q, &caches, &shapes, heads);
            for variant in [Variant::Portable, Variant::Avx2, Variant::Avx512] {
                let available = match variant {
                    Variant::Portable => true,
                    Variant::Avx2 => Kernel::Avx2.is_available(),
                    Variant::Avx512 => Kernel::Avx512Vnni.is_available() && Kernel::Avx2.is_available(),
                };
                if !available {
                    continue;
                }
                let got = attend_with(variant, &q, total, &seqs, heads);
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                let what = std::any::type_name::<T>();
                assert!(err < 2e-5, "{variant:?} {what} nh {nh} nkv {nkv} hd {hd}: max error {err}");
            }
        }
    }
}
