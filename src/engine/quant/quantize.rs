//! Reference quantizers (f32 → block format), byte-identical to ggml's `quantize_row_*_ref`
//! (ggml/src/ggml-quants.c, commit 0c1e570): plain f32 maths in ggml's order, no fused multiply-adds.
//! Q8_0 / Q8_1 / Q8_K are also how activations are quantized for the integer dot products.

// Index loops mirror ggml's C loops one for one, which keeps the port reviewable.
#![allow(clippy::needless_range_loop)]

use super::blocks::*;

/// `roundf`: round half away from zero (Rust's `f32::round`).
#[inline(always)]
fn roundf(v: f32) -> f32 {
    v.round()
}

/// ggml's `nearest_int` (round half to even through the 1.5·2²³ trick); valid for |v| ≤ 4194303.
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let val = v + 12_582_912.0f32;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// `(int8_t)(v)` for the values the reference quantizers produce (truncation toward zero; Rust saturates
/// where C is undefined, which only matters for NaN/inf input).
#[inline(always)]
fn trunc_i8(v: f32) -> i8 {
    v as i8
}

/// `(uint8_t)(v)`, see [`trunc_i8`].
#[inline(always)]
fn trunc_u8(v: f32) -> u8 {
    v as u8
}

fn absmax_signed(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

pub(super) fn q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (_, max) = absmax_signed(xb);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        for j in 0..16 {
            let x0 = xb[j] * id;
            let x1 = xb[16 + j] * id;
            let xi0 = (trunc_i8(x0 + 8.5)).min(15) as u8;
            let xi1 = (trunc_i8(x1 + 8.5)).min(15) as u8;
            y.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

/// `best_index_int8`: the index of the code-book value nearest to `x` (`val` ascending), ties to the lower.
fn best_index_int8(val: &[i8; 16], x: f32) -> usize {
    if x <= val[0] as f32 {
        return 0;
    }
    if x >= val[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < val[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (val[mu - 1] as f32) < (val[mu] as f32) - x {
        mu - 1
    } else {
        mu
    }
}

/// `quantize_row_iq4_nl_impl` with super-block 32 and block 32, no importance weights (weights `x²`):
/// the scale `∓max / 127` refined by weighted least squares, then (`ntry > 0`) `2·ntry + 1` more scales
/// tried, each value the nearest of [`KVALUES_IQ4NL`]. `ntry = 7` is `quantize_iq4_nl` (what
/// `ggml_quantize_chunk` and llama-quantize use); `ntry = -1` is `quantize_row_iq4_nl_ref`, what
/// ggml-cpu's `from_float` for IQ4_NL calls, so what a `-ctk iq4_nl` KV cache stores.
pub(super) fn iq4_nl(x: &[f32], out: &mut [BlockIq4Nl], ntry: i32) {
    let values = &KVALUES_IQ4NL;
    let v0 = values[0] as f32;
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let mut l = [0u8; QK];
        let (amax, max) = absmax_signed(xb);
        let mut scale = 0.0f32;
        if amax >= 1e-15 {
            let sums = |id: f32, l: &mut [u8; QK]| {
                let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
                for j in 0..QK {
                    let idx = best_index_int8(values, id * xb[j]);
                    l[j] = idx as u8;
                    let q = values[idx] as f32;
                    let w = xb[j] * xb[j];
                    sumqx += w * q * xb[j];
                    sumq2 += w * q * q;
                }
                (sumqx, sumq2)
            };
            let d0 = if ntry > 0 { -max / v0 } else { max / v0 };
            let (sumqx, sumq2) = sums(1.0 / d0, &mut l);
            let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
            let mut best = d * sumqx;
            let mut scratch = [0u8; QK];
            for itry in -ntry..=ntry {
                let id = (itry as f32 + v0) / max;
                let (sumqx, sumq2) = sums(id, &mut scratch);
                if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                    d = sumqx / sumq2;
                    best = d * sumqx;
                }
            }
            scale = d;
        }
        // With a scale search the indices are taken again from the final scale, a block of zeros
        // included (all nearest to 0: index 8); the `_ref` form keeps the first pass.
        if ntry > 0 {
            let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for j in 0..QK {
                l[j] = best_index_int8(values, id * xb[j]) as u8;
            }
        }
        y.d = F16Le::from_f32(scale);
        for j in 0..16 {
            y.qs[j] = l[j] | (l[16 + j] << 4);
        }
    }
}

pub(super) fn q4_1(x: &[f32], out: &mut [BlockQ4_1]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        y.m = F16Le::from_f32(min);
        for j in 0..16 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[16 + j] - min) * id;
            let xi0 = (trunc_i8(x0 + 0.5)).min(15) as u8;
            let xi1 = (trunc_i8(x1 + 0.5)).min(15) as u8;
            y.qs[j] = xi0 | (xi1 << 4);
        }
    }
}

pub(super) fn q5_0(x: &[f32], out: &mut [BlockQ5_0]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (_, max) = absmax_signed(xb);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        let mut qh = 0u32;
        for j in 0..16 {
            let x0 = xb[j] * id;
            let x1 = xb[16 + j] * id;
            let xi0 = (trunc_i8(x0 + 16.5)).min(31) as u8;
            let xi1 = (trunc_i8(x1 + 16.5)).min(31) as u8;
            y.qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
            qh |= (((xi0 & 0x10) >> 4) as u32) << j;
            qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
        }
        y.qh = qh.to_le_bytes();
    }
}

pub(super) fn q5_1(x: &[f32], out: &mut [BlockQ5_1]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        y.m = F16Le::from_f32(min);
        let mut qh = 0u32;
        for j in 0..16 {
            let x0 = (xb[j] - min) * id;
            let x1 = (xb[16 + j] - min) * id;
            let xi0 = trunc_u8(x0 + 0.5);
            let xi1 = trunc_u8(x1 + 0.5);
            y.qs[j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
            qh |= (((xi0 & 0x10) >> 4) as u32) << j;
            qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
        }
        y.qh = qh.to_le_bytes();
    }
}

pub(super) fn q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        for j in 0..QK {
            y.qs[j] = roundf(xb[j] * id) as i8;
        }
    }
}

pub(super) fn q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = F16Le::from_f32(d);
        let mut sum = 0i32;
        for j in 0..QK {
            let q = roundf(xb[j] * id) as i8;
            y.qs[j] = q;
            sum += q as i32;
        }
        y.s = F16Le::from_f32(sum as f32 * d);
    }
}

/// Round half to even into the i8 range, as `_mm256_round_ps(_MM_ROUND_NEAREST)` + `_mm256_cvtps_epi32` +
/// the saturating packs of ggml-cpu's x86 activation quantizers.
#[inline(always)]
fn round_even_sat_i8(v: f32) -> i8 {
    // Adding and removing 1.5·2²³ rounds to an integer, half to even, for |v| < 2²² (a library call
    // otherwise: `round_ties_even` is `rintf` without SSE4.1 in the baseline target).
    let r = if v.abs() < 4_194_304.0 {
        (v + 12_582_912.0) - 12_582_912.0
    } else {
        v
    };
    r.clamp(-128.0, 127.0) as i8
}

/// Activation quantization to Q8_0 as ggml's CPU backend does it on x86 (`quantize_row_q8_0`,
/// `ggml/src/ggml-cpu/arch/x86/quants.c`, commit 0c1e570): `d = amax/127`, the multiplier `127/amax` (not
/// `1/d` as the reference quantizer) and rounding half to even. The weights' reference quantizer stays
/// [`q8_0`]; this one exists so activations round exactly as llama.cpp's do.
pub(super) fn q8_0_act(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        y.d = F16Le::from_f32(amax / 127.0);
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for j in 0..QK {
            y.qs[j] = round_even_sat_i8(xb[j] * id);
        }
    }
}

/// Activation quantization to Q8_1 as ggml's CPU backend does it on x86 (`quantize_row_q8_1`, see
/// [`q8_0_act`]); `s = d · Σq` rounded to f16.
pub(super) fn q8_1_act(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        y.d = F16Le::from_f32(d);
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for j in 0..QK {
            let q = round_even_sat_i8(xb[j] * id);
            y.qs[j] = q;
            sum += q as i32;
        }
        y.s = F16Le::from_f32(d * sum as f32);
    }
}

pub(super) fn q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut max = 0.0f32;
        let mut amax = 0.0f32;
        for &v in xb {
            let ax = v.abs();
            if ax > amax {
                amax = ax;
                max = v;
            }
        }
        if amax == 0.0 {
            y.d = 0.0f32.to_le_bytes();
            y.qs = [0; QK_K];
            y.bsums = [[0; 2]; 16];
            continue;
        }
        let iscale = -127.0f32 / max;
        for j in 0..QK_K {
            let v = nearest_int(iscale * xb[j]);
            y.qs[j] = v.min(127) as i8;
        }
        for g in 0..16 {
            let s: i32 = y.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            y.bsums[g] = (s as i16).to_le_bytes();
        }
        y.d = (1.0 / iscale).to_le_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-126.7), -127);
    }

    #[test]
    fn q8_k_bsums_are_group_sums() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let mut b = [BlockQ8K::zeroed()];
        q8_k(&x, &mut b);
        for g in 0..16 {
            let s: i32 = b[0].qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(b[0].bsum(g) as i32, s);
        }
        // The element of largest magnitude maps to ±127 exactly.
        let imax = x
            .iter()
            .enumerate()
            .fold(0, |m, (i, v)| if v.abs() > x[m].abs() { i } else { m });
        assert_eq!(b[0].qs[imax].unsigned_abs(), 127);
    }

    use bytemuck::Zeroable;
}
