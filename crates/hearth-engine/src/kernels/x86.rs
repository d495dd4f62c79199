//! The x86-64 SIMD kernels: AVX-512 VNNI (`vpdpbusd`, 16 rows per instruction) and AVX2
//! (`vpmaddubsw` + `vpmaddwd`, 8 rows per instruction), each serving 1, 2, 4 or 8 tokens per
//! pass over a tile so that a batch loads each weight byte once per group of tokens.
//!
//! Safety: the kernels are `#[target_feature]` functions, entered only through `tile` and
//! `quantize_row` with a `Checked` kernel, which exists only once `is_x86_feature_detected!`
//! has confirmed the features. Inside them the only unsafe operations are loads and stores
//! through pointers taken from references to fixed-size arrays of exactly the width accessed.
//!
//! The AVX-512 intrinsics and `is_x86_feature_detected!("avx512vnni")` are stable since Rust
//! 1.89 (candle 0.11 already needs 1.88).

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::{Activations, BlockMeta, Checked, Format, Kernel, Line, TILE};

/// Dispatches one tile against `out.len()` tokens (1, 2, 4 or 8) to the checked kernel.
pub(super) fn tile(
    kernel: Checked,
    format: Format,
    w: &[Line],
    acts: &Activations,
    t0: usize,
    out: &mut [[f32; TILE]],
) {
    macro_rules! by_tokens {
        ($f:ident) => {
            // SAFETY: `kernel` is `Checked`, so the CPU has the features `$f` is compiled for.
            unsafe {
                match out.len() {
                    8 => $f::<8>(w, acts, t0, out),
                    4 => $f::<4>(w, acts, t0, out),
                    2 => $f::<2>(w, acts, t0, out),
                    _ => $f::<1>(w, acts, t0, out),
                }
            }
        };
    }
    match (kernel.0, format) {
        (Kernel::Avx512Vnni, Format::Q4_1) => by_tokens!(q4_1_avx512),
        (Kernel::Avx512Vnni, Format::Q8_0) => by_tokens!(q8_0_avx512),
        (Kernel::Avx2, Format::Q4_1) => by_tokens!(q4_1_avx2),
        (Kernel::Avx2, Format::Q8_0) => by_tokens!(q8_0_avx2),
        (Kernel::Scalar, _) => super::scalar::tile(format, w, acts, t0, out),
    }
}

/// Quantizes one activation row with the checked kernel's instruction set.
pub(super) fn quantize_row(kernel: Checked, x: &[f32], q: &mut [i32], meta: &mut [BlockMeta]) {
    match kernel.0 {
        // SAFETY: `kernel` is `Checked`, so the CPU has AVX-512 F and BW.
        Kernel::Avx512Vnni => unsafe { quantize_avx512(x, q, meta) },
        // SAFETY: `kernel` is `Checked`, so the CPU has AVX2 and FMA.
        Kernel::Avx2 => unsafe { quantize_avx2(x, q, meta) },
        Kernel::Scalar => super::quantize_row_generic(x, q, meta),
    }
}

/// `quantize_row_generic` in AVX-512: the same values (`sum` aside, whose f32 rounding may
/// differ in the last bit), 16 lanes at a time.
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_avx512(x: &[f32], q: &mut [i32], meta: &mut [BlockMeta]) {
    let (xb, _) = x.as_chunks::<32>();
    let (qb, _) = q.as_chunks_mut::<8>();
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    for ((x, q), meta) in xb.iter().zip(qb).zip(meta) {
        let [x0, x1] = x.as_chunks::<16>().0 else { unreachable!("32 floats are two halves") };
        let (x0, x1) = (load_ps512(x0), load_ps512(x1));
        let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x0), abs_mask));
        let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x1), abs_mask));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // Round to nearest even (the default MXCSR mode, as in the generic code); clamp as it
        // does, then narrow to bytes.
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
        let q0 = _mm512_max_epi32(_mm512_min_epi32(q0, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        let q1 = _mm512_max_epi32(_mm512_min_epi32(q1, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        let [w0, w1] = q.as_chunks_mut::<4>().0 else { unreachable!("8 words are two quarters") };
        store_128(w0, _mm512_cvtsepi32_epi8(q0));
        store_128(w1, _mm512_cvtsepi32_epi8(q1));
        let qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        let d = amax / 127.0;
        *meta = BlockMeta { d, sum: d * qsum as f32, offset: 128 * qsum };
    }
}

#[target_feature(enable = "avx2,fma")]
fn quantize_avx2(x: &[f32], q: &mut [i32], meta: &mut [BlockMeta]) {
    // The generic code, compiled for AVX2: it is a small fraction of the work.
    super::quantize_row_generic(x, q, meta)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_ps512(x: &[f32; 16]) -> __m512 {
    // SAFETY: reads exactly the 16 floats `x` refers to; the load needs no alignment.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load512(bytes: &[u8; 64]) -> __m512i {
    // SAFETY: reads exactly the 64 bytes `bytes` refers to; the load needs no alignment.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx")]
fn load256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: reads exactly the 32 bytes `bytes` refers to; the load needs no alignment.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
fn load128(bytes: &[u8; 16]) -> __m128i {
    // SAFETY: reads exactly the 16 bytes `bytes` refers to; the load needs no alignment.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "sse2")]
fn store_128(words: &mut [i32; 4], v: __m128i) {
    // SAFETY: writes exactly the 16 bytes `words` refers to; the store needs no alignment.
    unsafe { _mm_storeu_si128(words.as_mut_ptr().cast(), v) }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store_ps512(out: &mut [f32; 16], v: __m512) {
    // SAFETY: writes exactly the 16 floats `out` refers to; the store needs no alignment.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx")]
fn store_ps256(out: &mut [f32; 8], v: __m256) {
    // SAFETY: writes exactly the 8 floats `out` refers to; the store needs no alignment.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
}

/// The per-token views a kernel reads, checked once against the tile's block count so the
/// hot loop indexes without bounds checks.
struct Tokens<'a, const NT: usize> {
    q: [&'a [[i32; 8]]; NT],
    meta: [&'a [BlockMeta]; NT],
}

impl<'a, const NT: usize> Tokens<'a, NT> {
    #[inline(always)]
    fn new(acts: &'a Activations, t0: usize, blocks: usize) -> Self {
        assert_eq!(acts.blocks, blocks, "activations and weights disagree on the input dimension");
        Tokens { q: std::array::from_fn(|i| acts.q(t0 + i)), meta: std::array::from_fn(|i| acts.meta(t0 + i)) }
    }
}

/// Q4_1 × Q8, 16 rows × NT tokens per pass. Per block and token: 8 `vpdpbusd` (low and high
/// nibbles of the 4 quant lines against the matching activation words), then
/// `acc += d·dx·Σ(q·xq) + m·dx·Σxq` on the 16 rows at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q4_1_avx512<const NT: usize>(w: &[Line], acts: &Activations, t0: usize, out: &mut [[f32; TILE]]) {
    let (w, _) = w.as_chunks::<5>();
    let x = Tokens::<NT>::new(acts, t0, w.len());
    let nibble = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); NT];
    for (b, wb) in w.iter().enumerate() {
        let [dh, mh] = wb[0].0.as_chunks::<32>().0 else { unreachable!("64 bytes are two halves") };
        let dw = _mm512_cvtph_ps(load256(dh));
        let mw = _mm512_cvtph_ps(load256(mh));
        let mut dot = [_mm512_setzero_si512(); NT];
        for g in 0..4 {
            let v = load512(&wb[1 + g].0);
            let lo = _mm512_and_si512(v, nibble);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
            for (dot, xq) in dot.iter_mut().zip(x.q) {
                *dot = _mm512_dpbusd_epi32(*dot, lo, _mm512_set1_epi32(xq[b][g]));
                *dot = _mm512_dpbusd_epi32(*dot, hi, _mm512_set1_epi32(xq[b][4 + g]));
            }
        }
        for ((acc, dot), meta) in acc.iter_mut().zip(dot).zip(x.meta) {
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(meta[b].d));
            *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *acc);
            *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(meta[b].sum), *acc);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        store_ps512(o, a);
    }
}

/// Q8_0 × Q8, 16 rows × NT tokens per pass: 8 `vpdpbusd` per block and token on the `q + 128`
/// weights, minus `128·Σxq`, then `acc += d·dx·dot`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q8_0_avx512<const NT: usize>(w: &[Line], acts: &Activations, t0: usize, out: &mut [[f32; TILE]]) {
    let (w, _) = w.as_chunks::<9>();
    let x = Tokens::<NT>::new(acts, t0, w.len());
    let mut acc = [_mm512_setzero_ps(); NT];
    for (b, wb) in w.iter().enumerate() {
        let dw = _mm512_castsi512_ps(load512(&wb[0].0));
        let mut dot = [_mm512_setzero_si512(); NT];
        for g in 0..8 {
            let v = load512(&wb[1 + g].0);
            for (dot, xq) in dot.iter_mut().zip(x.q) {
                *dot = _mm512_dpbusd_epi32(*dot, v, _mm512_set1_epi32(xq[b][g]));
            }
        }
        for ((acc, dot), meta) in acc.iter_mut().zip(dot).zip(x.meta) {
            let dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(meta[b].offset));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(meta[b].d));
            *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *acc);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        store_ps512(o, a);
    }
}

/// Q4_1 × Q8 on 256-bit registers: the tile's two 8-row halves (the low and high 32 bytes of
/// every line) one after the other. Per block the 8 `vpmaddubsw` products are summed in 16
/// bits: each is at most 2·15·127 = 3810 in magnitude, so 8 of them (30480) cannot overflow.
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_avx2<const NT: usize>(w: &[Line], acts: &Activations, t0: usize, out: &mut [[f32; TILE]]) {
    let (w, _) = w.as_chunks::<5>();
    let x = Tokens::<NT>::new(acts, t0, w.len());
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); NT];
        for (b, wb) in w.iter().enumerate() {
            let header = wb[0].0.as_chunks::<16>().0;
            let dw = _mm256_cvtph_ps(load128(&header[h]));
            let mw = _mm256_cvtph_ps(load128(&header[2 + h]));
            let mut dot = [_mm256_setzero_si256(); NT];
            for g in 0..4 {
                let v = load256(&wb[1 + g].0.as_chunks::<32>().0[h]);
                let lo = _mm256_and_si256(v, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                for (dot, xq) in dot.iter_mut().zip(x.q) {
                    *dot = _mm256_add_epi16(*dot, _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xq[b][g])));
                    *dot = _mm256_add_epi16(*dot, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xq[b][4 + g])));
                }
            }
            for ((acc, dot), meta) in acc.iter_mut().zip(dot).zip(x.meta) {
                let dot = _mm256_madd_epi16(dot, ones);
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(meta[b].d));
                *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
                *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(meta[b].sum), *acc);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            store_ps256(&mut o.as_chunks_mut::<8>().0[h], a);
        }
    }
}

/// Q8_0 × Q8 on 256-bit registers. `vpmaddubsw` needs an unsigned operand and saturates at
/// 16 bits, which `q + 128` (up to 255·127·2) would exceed; so the weights go back to signed
/// and the product is taken as |w| · (x · sign w), at most 128·127·2 = 32512 per pair.
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_avx2<const NT: usize>(w: &[Line], acts: &Activations, t0: usize, out: &mut [[f32; TILE]]) {
    let (w, _) = w.as_chunks::<9>();
    let x = Tokens::<NT>::new(acts, t0, w.len());
    let bias = _mm256_set1_epi8(0x80u8 as i8);
    let ones = _mm256_set1_epi16(1);
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); NT];
        for (b, wb) in w.iter().enumerate() {
            let dw = _mm256_castsi256_ps(load256(&wb[0].0.as_chunks::<32>().0[h]));
            let mut dot = [_mm256_setzero_si256(); NT];
            for g in 0..8 {
                let signed = _mm256_xor_si256(load256(&wb[1 + g].0.as_chunks::<32>().0[h]), bias);
                let magnitude = _mm256_sign_epi8(signed, signed);
                for (dot, xq) in dot.iter_mut().zip(x.q) {
                    let xs = _mm256_sign_epi8(_mm256_set1_epi32(xq[b][g]), signed);
                    *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xs), ones));
                }
            }
            for ((acc, dot), meta) in acc.iter_mut().zip(dot).zip(x.meta) {
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(meta[b].d));
                *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *acc);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            store_ps256(&mut o.as_chunks_mut::<8>().0[h], a);
        }
    }
}
