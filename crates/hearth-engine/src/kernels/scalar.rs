//! The portable kernel: plain Rust over the tiled layout, one row and one token at a time.
//! It is the fallback on CPUs without AVX2 and the oracle the SIMD kernels are tested
//! against, so it is written for obviousness, not speed: integer dot product per block, then
//! the same per-block float arithmetic as the SIMD kernels.

use super::{Activations, Format, Line, QK, TILE};

/// Reads the f16 at `index` of a header line.
pub(super) fn f16_at(line: &Line, index: usize) -> f32 {
    half::f16::from_le_bytes([line.0[2 * index], line.0[2 * index + 1]]).to_f32()
}

/// Reads the f32 at `index` of a header line.
pub(super) fn f32_at(line: &Line, index: usize) -> f32 {
    f32::from_le_bytes([line.0[4 * index], line.0[4 * index + 1], line.0[4 * index + 2], line.0[4 * index + 3]])
}

/// Element `k` (0..32) of row `r` of one Q4_1 tile-block (5 lines), as its 4-bit quant.
pub(super) fn q4_1_quant(lines: &[Line], r: usize, k: usize) -> i32 {
    let j = k % 16;
    let byte = lines[1 + j / 4].0[4 * r + j % 4];
    i32::from(if k < 16 { byte & 0x0F } else { byte >> 4 })
}

/// Element `k` (0..32) of row `r` of one Q8_0 tile-block (9 lines), as its signed quant.
pub(super) fn q8_0_quant(lines: &[Line], r: usize, k: usize) -> i32 {
    i32::from((lines[1 + k / 4].0[4 * r + k % 4] ^ 0x80) as i8)
}

/// Activation quant `k` of a block's 8 words.
fn act_quant(words: &[i32; 8], k: usize) -> i32 {
    i32::from(words[k / 4].to_le_bytes()[k % 4] as i8)
}

/// One tile (`w`: all its blocks' lines) against tokens `t0..t0 + out.len()`.
pub(super) fn tile(format: Format, w: &[Line], acts: &Activations, t0: usize, out: &mut [[f32; TILE]]) {
    let lines = format.lines();
    for (i, out) in out.iter_mut().enumerate() {
        let t = t0 + i;
        let (xq, meta) = (acts.q(t), acts.meta(t));
        for (r, out) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, block) in w.chunks_exact(lines).enumerate() {
                match format {
                    Format::Q4_1 => {
                        let isum: i32 = (0..QK).map(|k| q4_1_quant(block, r, k) * act_quant(&xq[b], k)).sum();
                        acc += f16_at(&block[0], r) * meta[b].d * isum as f32;
                        acc += f16_at(&block[0], TILE + r) * meta[b].sum;
                    }
                    Format::Q8_0 => {
                        let isum: i32 = (0..QK).map(|k| q8_0_quant(block, r, k) * act_quant(&xq[b], k)).sum();
                        acc += f32_at(&block[0], r) * meta[b].d * isum as f32;
                    }
                }
            }
            *out = acc;
        }
    }
}
