//! Dequantizers: one block format to f32, bit-exact with ggml's `dequantize_row_*` (ggml/src/ggml-quants.c,
//! commit 0c1e570). The float operations are done in ggml's order, without fused multiply-adds.

// Index loops mirror ggml's C loops one for one, which keeps the port reviewable.
#![allow(clippy::needless_range_loop)]

use super::blocks::*;

pub(super) fn f32_row(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub(super) fn f16_row(src: &[u8], dst: &mut [f32]) {
    let src: &[F16Le] = bytemuck::cast_slice(src);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.get();
    }
}

pub(super) fn bf16_row(src: &[u8], dst: &mut [f32]) {
    let src: &[Bf16Le] = bytemuck::cast_slice(src);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.get();
    }
}

pub(super) fn q4_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ4_0] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        for j in 0..16 {
            let x0 = (b.qs[j] & 0x0F) as i32 - 8;
            let x1 = (b.qs[j] >> 4) as i32 - 8;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
    }
}

pub(super) fn q4_1(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ4_1] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        let m = b.m.get();
        for j in 0..16 {
            let x0 = (b.qs[j] & 0x0F) as f32;
            let x1 = (b.qs[j] >> 4) as f32;
            y[j] = x0 * d + m;
            y[j + 16] = x1 * d + m;
        }
    }
}

pub(super) fn q5_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ5_0] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..16 {
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            let x0 = ((b.qs[j] as u32 & 0x0F) | xh0) as i32 - 16;
            let x1 = ((b.qs[j] as u32 >> 4) | xh1) as i32 - 16;
            y[j] = x0 as f32 * d;
            y[j + 16] = x1 as f32 * d;
        }
    }
}

pub(super) fn q5_1(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ5_1] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        let m = b.m.get();
        let qh = u32::from_le_bytes(b.qh);
        for j in 0..16 {
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            let x0 = ((b.qs[j] as u32 & 0x0F) | xh0) as f32;
            let x1 = ((b.qs[j] as u32 >> 4) | xh1) as f32;
            y[j] = x0 * d + m;
            y[j + 16] = x1 * d + m;
        }
    }
}

pub(super) fn q8_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ8_0] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        for j in 0..QK {
            y[j] = b.qs[j] as f32 * d;
        }
    }
}

pub(super) fn q8_1(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ8_1] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        for j in 0..QK {
            y[j] = b.qs[j] as f32 * d;
        }
    }
}

pub(super) fn q2_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ2K] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d.get();
        let min = b.dmin.get();
        let mut is = 0;
        let mut o = 0;
        for n in 0..2 {
            let q = &b.qs[32 * n..32 * n + 32];
            let mut shift = 0;
            for _ in 0..4 {
                for half in 0..2 {
                    let sc = b.scales[is];
                    is += 1;
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    for l in 0..16 {
                        let qv = ((q[l + 16 * half] >> shift) & 3) as f32;
                        y[o] = dl * qv - ml;
                        o += 1;
                    }
                }
                shift += 2;
            }
        }
    }
}

pub(super) fn q3_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ3K] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d_all = b.d.get();
        let scales = q3k_scales(&b.scales);
        let mut is = 0;
        let mut o = 0;
        let mut m = 1u8;
        for n in 0..2 {
            let q = &b.qs[32 * n..32 * n + 32];
            let mut shift = 0;
            for _ in 0..4 {
                for half in 0..2 {
                    let dl = d_all * (scales[is] as i32 - 32) as f32;
                    is += 1;
                    for l in 0..16 {
                        let k = l + 16 * half;
                        let lo = ((q[k] >> shift) & 3) as i32;
                        let hi = if b.hmask[k] & m != 0 { 0 } else { 4 };
                        y[o] = dl * (lo - hi) as f32;
                        o += 1;
                    }
                }
                shift += 2;
                m <<= 1;
            }
        }
    }
}

pub(super) fn q4_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ4K] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d.get();
        let min = b.dmin.get();
        for j in 0..4 {
            let q = &b.qs[32 * j..32 * j + 32];
            let (sc, m) = scale_min_k4(2 * j, &b.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = scale_min_k4(2 * j + 1, &b.scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

pub(super) fn q5_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ5K] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d.get();
        let min = b.dmin.get();
        let mut u1 = 1u8;
        let mut u2 = 2u8;
        for j in 0..4 {
            let ql = &b.qs[32 * j..32 * j + 32];
            let (sc, m) = scale_min_k4(2 * j, &b.scales);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = scale_min_k4(2 * j + 1, &b.scales);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            let y = &mut y[64 * j..64 * j + 64];
            for l in 0..32 {
                let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
            }
            u1 <<= 2;
            u2 <<= 2;
        }
    }
}

pub(super) fn q6_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ6K] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d.get();
        for n in 0..2 {
            let ql = &b.ql[64 * n..64 * n + 64];
            let qh = &b.qh[32 * n..32 * n + 32];
            let sc = &b.scales[8 * n..8 * n + 8];
            let y = &mut y[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * sc[is] as f32 * q1 as f32;
                y[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                y[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                y[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

pub(super) fn q8_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ8K] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d();
        for j in 0..QK_K {
            y[j] = d * b.qs[j] as f32;
        }
    }
}

pub(super) fn iq4_nl(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq4Nl] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = b.d.get();
        for j in 0..16 {
            y[j] = d * KVALUES_IQ4NL[(b.qs[j] & 0xF) as usize] as f32;
            y[j + 16] = d * KVALUES_IQ4NL[(b.qs[j] >> 4) as usize] as f32;
        }
    }
}

pub(super) fn iq4_xs(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq4Xs] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = b.d.get();
        let sh = u16::from_le_bytes(b.scales_h);
        for ib in 0..8 {
            let ls = ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) as i32
                | ((((sh >> (2 * ib)) & 3) as i32) << 4);
            let dl = d * (ls - 32) as f32;
            let qs = &b.qs[16 * ib..16 * ib + 16];
            let y = &mut y[32 * ib..32 * ib + 32];
            for j in 0..16 {
                y[j] = dl * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as f32;
                y[j + 16] = dl * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as f32;
            }
        }
    }
}

/// `dequantize_row_mxfp4`: `x * d` with `x` the code-book value and `d = e8m0_to_fp32_half(e)`.
pub(super) fn mxfp4(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockMxfp4] = bytemuck::cast_slice(src);
    for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = e8m0_to_fp32_half(b.e);
        for j in 0..16 {
            y[j] = KVALUES_MXFP4[(b.qs[j] & 0x0F) as usize] as f32 * d;
            y[j + 16] = KVALUES_MXFP4[(b.qs[j] >> 4) as usize] as f32 * d;
        }
    }
}
