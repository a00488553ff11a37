//! Scalar dot products of one weight row with one quantized activation row: the oracle every SIMD kernel is
//! tested against. Ported from the `*_generic` functions of `ggml/src/ggml-cpu/quants.c` and
//! `ggml_vec_dot_f16`/`_bf16`/`_f32` of `ggml/src/ggml-cpu/vec.cpp` (commit 0c1e570).
//!
//! Each function takes `n` elements, the weight row bytes `w` and the activation row bytes `a` (in the
//! weight type's vec-dot type) and returns Σ w·a as f32. Integer sums inside a block are exact; the float
//! combination per block is `d_w * d_a * isum` (minus the min term for types with mins), accumulated in
//! block order.

// Index loops mirror ggml's C loops one for one, which keeps the port reviewable.
#![allow(clippy::needless_range_loop)]

use crate::engine::quant::blocks::*;

pub fn f32_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let w: &[[u8; 4]] = bytemuck::cast_slice(&w[..4 * n]);
    let a: &[[u8; 4]] = bytemuck::cast_slice(&a[..4 * n]);
    let mut s = 0f64;
    for (x, y) in w.iter().zip(a) {
        s += (f32::from_le_bytes(*x) * f32::from_le_bytes(*y)) as f64;
    }
    s as f32
}

pub fn f16_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let w: &[F16Le] = bytemuck::cast_slice(&w[..2 * n]);
    let a: &[F16Le] = bytemuck::cast_slice(&a[..2 * n]);
    let mut s = 0f64;
    for (x, y) in w.iter().zip(a) {
        s += (x.get() * y.get()) as f64;
    }
    s as f32
}

pub fn bf16_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let w: &[Bf16Le] = bytemuck::cast_slice(&w[..2 * n]);
    let a: &[Bf16Le] = bytemuck::cast_slice(&a[..2 * n]);
    let mut s = 0f64;
    for (x, y) in w.iter().zip(a) {
        s += (x.get() * y.get()) as f64;
    }
    s as f32
}

fn blocks<T: bytemuck::Pod>(b: &[u8], n: usize, per: usize) -> &[T] {
    bytemuck::cast_slice(&b[..n / per * size_of::<T>()])
}

/// Q4_0 × Q8_0 with the float arithmetic of ggml's repacked x86 GEMV and GEMM (`gemv_q4_b32_8x8_q8_0_lut_avx`,
/// `gemm_q4_b32_8x8_q8_0_lut_avx`, `arch/x86/repack.cpp`, commit 0c1e570; llama.cpp repacks Q4_0 weights on
/// AVX2): per block the exact integer sum, then `sumf = fma(Σ, d·d8, sumf)` in block order, for one token
/// or many alike.
pub fn q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4_0] = blocks(w, n, QK);
    let y: &[BlockQ8_0] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x.qs[j] & 0x0F) as i32 - 8;
            let v1 = (x.qs[j] >> 4) as i32 - 8;
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
        }
        sumf = (sumi as f32).mul_add(x.d.get() * y.d.get(), sumf);
    }
    sumf
}

pub fn q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4_1] = blocks(w, n, QK);
    let y: &[BlockQ8_1] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let v0 = (x.qs[j] & 0x0F) as i32;
            let v1 = (x.qs[j] >> 4) as i32;
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
        }
        sumf += sumi as f32 * (x.d.get() * y.d.get()) + x.m.get() * y.s.get();
    }
    sumf
}

#[inline(always)]
fn q5_vals(qs: &[u8; 16], qh: [u8; 4], j: usize) -> (i32, i32) {
    let qh = u32::from_le_bytes(qh);
    let xh0 = ((qh >> j) << 4) & 0x10;
    let xh1 = (qh >> (j + 12)) & 0x10;
    (
        ((qs[j] as u32 & 0x0F) | xh0) as i32,
        ((qs[j] as u32 >> 4) | xh1) as i32,
    )
}

pub fn q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ5_0] = blocks(w, n, QK);
    let y: &[BlockQ8_0] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let (v0, v1) = q5_vals(&x.qs, x.qh, j);
            sumi += (v0 - 16) * y.qs[j] as i32 + (v1 - 16) * y.qs[j + 16] as i32;
        }
        sumf += sumi as f32 * (x.d.get() * y.d.get());
    }
    sumf
}

pub fn q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ5_1] = blocks(w, n, QK);
    let y: &[BlockQ8_1] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            let (v0, v1) = q5_vals(&x.qs, x.qh, j);
            sumi += v0 * y.qs[j] as i32 + v1 * y.qs[j + 16] as i32;
        }
        sumf += sumi as f32 * (x.d.get() * y.d.get()) + x.m.get() * y.s.get();
    }
    sumf
}

pub fn q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ8_0] = blocks(w, n, QK);
    let y: &[BlockQ8_0] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let sumi: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sumf += sumi as f32 * (x.d.get() * y.d.get());
    }
    sumf
}

/// IQ4_NL × Q8_0 with the float arithmetic of ggml's repacked x86 GEMV (`gemv_q4_b32_8x8_q8_0_lut_avx`,
/// `arch/x86/repack.cpp`, commit 0c1e570; llama.cpp repacks IQ4_NL weights on AVX2): per block
/// `sumf = fma(Σ, d·d8, sumf)`.
pub fn iq4_nl_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockIq4Nl] = blocks(w, n, QK);
    let y: &[BlockQ8_0] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += KVALUES_IQ4NL[(x.qs[j] & 0xF) as usize] as i32 * y.qs[j] as i32
                + KVALUES_IQ4NL[(x.qs[j] >> 4) as usize] as i32 * y.qs[j + 16] as i32;
        }
        sumf = (sumi as f32).mul_add(x.d.get() * y.d.get(), sumf);
    }
    sumf
}

/// MXFP4 × Q8_0 with the float arithmetic of ggml's repacked x86 GEMV (as [`iq4_nl_q8_0`], the scale
/// `e8m0_half(e)·d8`): per block `sumf = fma(Σ lo + Σ hi, e8m0_half(e)·d8, sumf)`.
pub fn mxfp4_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockMxfp4] = blocks(w, n, QK);
    let y: &[BlockQ8_0] = blocks(a, n, QK);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += y.qs[j] as i32 * KVALUES_MXFP4[(x.qs[j] & 0xF) as usize] as i32
                + y.qs[j + 16] as i32 * KVALUES_MXFP4[(x.qs[j] >> 4) as usize] as i32;
        }
        sumf = (sumi as f32).mul_add(e8m0_to_fp32_half(x.e) * y.d.get(), sumf);
    }
    sumf
}

/// Σ over 16 consecutive elements of `q[k] * y[k]`.
#[inline(always)]
fn dot16(q: &[i32; 16], y: &[i8]) -> i32 {
    q.iter().zip(y).map(|(&a, &b)| a * b as i32).sum()
}

/// Q2_K × Q8_K with the float arithmetic of ggml's repacked GEMV (`ggml_gemv_q2_K_8x8_q8_K`,
/// `arch/x86/repack.cpp`, commit 0c1e570), which llama.cpp uses for Q2_K weights on AVX-512 machines: per
/// super-block `acc = fma(Σ scale·q·q8, d·d8, acc)` and `acc_min = fma(Σ min·bsum, dmin·d8, acc_min)`, the
/// result `acc − acc_min`. (An AVX2-only build of llama.cpp uses `ggml_vec_dot_q2_K_q8_K` instead, whose
/// eight-lane rounding this does not reproduce.)
pub fn q2_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ2K] = blocks(w, n, QK_K);
    let y: &[BlockQ8K] = blocks(a, n, QK_K);
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (x, y) in x.iter().zip(y) {
        let mut summs = 0i32;
        for g in 0..16 {
            summs += y.bsum(g) as i32 * (x.scales[g] >> 4) as i32;
        }
        let mut isum = 0i32;
        let mut g = 0;
        for half in 0..2 {
            let q2 = &x.qs[32 * half..32 * half + 32];
            for shift in [0, 2, 4, 6] {
                for sub in 0..2 {
                    let mut q = [0i32; 16];
                    for l in 0..16 {
                        q[l] = ((q2[16 * sub + l] >> shift) & 3) as i32;
                    }
                    isum += (x.scales[g] & 0xF) as i32 * dot16(&q, &y.qs[16 * g..16 * g + 16]);
                    g += 1;
                }
            }
        }
        acc = (isum as f32).mul_add(x.d.get() * y.d(), acc);
        acc_min = (summs as f32).mul_add(x.dmin.get() * y.d(), acc_min);
    }
    acc - acc_min
}

/// Q3_K × Q8_K with the float arithmetic of ggml's AVX2 `ggml_vec_dot_q3_K_q8_K` (`arch/x86/quants.c`,
/// commit 0c1e570; llama.cpp does not repack Q3_K on x86): per super-block eight i32 lanes (lane `l` holds
/// elements `4l..4l+4` of every 32-element chunk times its 16-group scale − 32), each accumulated into its
/// own f32 lane with `fma(d8·d, lane, acc)`, then `hsum_float_8`.
pub fn q3_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ3K] = blocks(w, n, QK_K);
    let y: &[BlockQ8K] = blocks(a, n, QK_K);
    let mut acc = [0f32; 8];
    for (x, y) in x.iter().zip(y) {
        let scales = q3k_scales(&x.scales);
        // q[e]: the signed 3-bit quant of element e (group g = elements 16g..16g+16).
        let mut q = [0i32; 256];
        let mut g = 0;
        let mut m = 1u8;
        for half in 0..2 {
            let q3 = &x.qs[32 * half..32 * half + 32];
            for shift in [0, 2, 4, 6] {
                for sub in 0..2 {
                    for l in 0..16 {
                        let k = 16 * sub + l;
                        let hi = if x.hmask[k] & m != 0 { 0 } else { 4 };
                        q[16 * g + l] = ((q3[k] >> shift) & 3) as i32 - hi;
                    }
                    g += 1;
                }
                m <<= 1;
            }
        }
        let mut lanes = [0i32; 8];
        for (e, &qe) in q.iter().enumerate() {
            lanes[(e % 32) / 4] += (scales[e / 16] as i32 - 32) * qe * y.qs[e] as i32;
        }
        let d = y.d() * x.d.get();
        for (a, &l) in acc.iter_mut().zip(&lanes) {
            *a = d.mul_add(l as f32, *a);
        }
    }
    hsum8(&acc)
}

/// The exact integer sums of one Q4_K/Q5_K super-block against Q8_K: `(Σ scale·q·q8, Σ min·bsum)`.
fn k4_ints(q: &[i32; 256], scales: &[u8; 12], y: &BlockQ8K) -> (i32, i32) {
    let (sc, mn) = k4_scales_mins(scales);
    let mut summs = 0i32;
    for g in 0..16 {
        summs += y.bsum(g) as i32 * mn[g / 2] as i32;
    }
    let mut isum = 0i32;
    for (j, &s) in sc.iter().enumerate() {
        let mut acc = 0i32;
        for k in 32 * j..32 * j + 32 {
            acc += q[k] * y.qs[k] as i32;
        }
        isum += s as i32 * acc;
    }
    (isum, summs)
}

/// Q4_K × Q8_K with the float arithmetic of ggml's repacked x86 GEMV (`ggml_gemv_q4_K_8x8_q8_K`,
/// `ggml/src/ggml-cpu/arch/x86/repack.cpp`, commit 0c1e570), which llama.cpp uses for Q4_K weights on AVX2
/// machines: per super-block `acc = fma(Σ scale·q·q8, d·d8, acc)` and `acc_min = fma(Σ min·bsum, dmin·d8,
/// acc_min)`, the result `acc − acc_min`.
pub fn q4_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4K] = blocks(w, n, QK_K);
    let y: &[BlockQ8K] = blocks(a, n, QK_K);
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (x, y) in x.iter().zip(y) {
        let mut q = [0i32; 256];
        for j in 0..4 {
            for l in 0..32 {
                q[64 * j + l] = (x.qs[32 * j + l] & 0xF) as i32;
                q[64 * j + 32 + l] = (x.qs[32 * j + l] >> 4) as i32;
            }
        }
        let (isum, summs) = k4_ints(&q, &x.scales, y);
        acc = (isum as f32).mul_add(x.d.get() * y.d(), acc);
        acc_min = (summs as f32).mul_add(x.dmin.get() * y.d(), acc_min);
    }
    acc - acc_min
}

/// [`q4_k_q8_k`] for four tokens (one weight row, four activation rows): each super-block's quants are
/// decoded once; every result is bit-identical to [`q4_k_q8_k`] on that token.
pub fn q4_k_q8_k_x4(n: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let x: &[BlockQ4K] = blocks(w, n, QK_K);
    let y: [&[BlockQ8K]; 4] = a.map(|a| blocks(a, n, QK_K));
    let (mut acc, mut acc_min) = ([0f32; 4], [0f32; 4]);
    for (i, x) in x.iter().enumerate() {
        let mut q = [0i32; 256];
        for j in 0..4 {
            for l in 0..32 {
                q[64 * j + l] = (x.qs[32 * j + l] & 0xF) as i32;
                q[64 * j + 32 + l] = (x.qs[32 * j + l] >> 4) as i32;
            }
        }
        for t in 0..4 {
            let y = &y[t][i];
            let (isum, summs) = k4_ints(&q, &x.scales, y);
            acc[t] = (isum as f32).mul_add(x.d.get() * y.d(), acc[t]);
            acc_min[t] = (summs as f32).mul_add(x.dmin.get() * y.d(), acc_min[t]);
        }
    }
    [0, 1, 2, 3].map(|t| acc[t] - acc_min[t])
}

/// Q5_K × Q8_K with the float arithmetic of ggml's AVX2 `ggml_vec_dot_q5_K_q8_K` (`arch/x86/quants.c`,
/// commit 0c1e570; llama.cpp does not repack Q5_K on x86): per super-block eight i32 lanes (lane `l` holds
/// elements `4l..4l+4` of every 32-element chunk times the chunk's scale), each accumulated into its own f32
/// lane with `fma(d8·d, lane, acc)`; the mins as `summs += (−d8·dmin)·Σ min·bsum` (GCC contracts it into an
/// FMA); the result is the lanes' `hsum_float_8` plus `summs`.
pub fn q5_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ5K] = blocks(w, n, QK_K);
    let y: &[BlockQ8K] = blocks(a, n, QK_K);
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (x, y) in x.iter().zip(y) {
        let q = q5_k_quants(x);
        let (lanes, mins) = k4_lanes(&q, &x.scales, y);
        q5_k_step(x, y, &lanes, mins, &mut acc, &mut summs);
    }
    hsum8(&acc) + summs
}

/// The 5-bit quants (0..31) of a Q5_K super-block in element order.
#[inline(always)]
fn q5_k_quants(x: &BlockQ5K) -> [i32; 256] {
    let mut q = [0i32; 256];
    for j in 0..4 {
        for l in 0..32 {
            let h1 = ((x.qh[l] >> (2 * j)) & 1) as i32 * 16;
            let h2 = ((x.qh[l] >> (2 * j + 1)) & 1) as i32 * 16;
            q[64 * j + l] = (x.qs[32 * j + l] & 0xF) as i32 + h1;
            q[64 * j + 32 + l] = (x.qs[32 * j + l] >> 4) as i32 + h2;
        }
    }
    q
}

/// The eight i32 lanes of a Q4_K/Q5_K super-block against Q8_K as ggml's AVX2 code forms them (lane `l`:
/// `Σ_c sc[c]·Σ_{k<4} q[32c+4l+k]·q8[32c+4l+k]`) and the exact `Σ min·bsum`.
#[inline(always)]
fn k4_lanes(q: &[i32; 256], scales: &[u8; 12], y: &BlockQ8K) -> ([i32; 8], i32) {
    let (sc, mn) = k4_scales_mins(scales);
    let mut lanes = [0i32; 8];
    for c in 0..8 {
        for m in 0..32 {
            let e = 32 * c + m;
            lanes[m / 4] += sc[c] as i32 * q[e] * y.qs[e] as i32;
        }
    }
    let mut mins = 0i32;
    for g in 0..16 {
        mins += y.bsum(g) as i32 * mn[g / 2] as i32;
    }
    (lanes, mins)
}

/// One Q5_K super-block's float step (see [`q5_k_q8_k`]).
#[inline(always)]
fn q5_k_step(
    x: &BlockQ5K,
    y: &BlockQ8K,
    lanes: &[i32; 8],
    mins: i32,
    acc: &mut [f32; 8],
    summs: &mut f32,
) {
    let d = y.d() * x.d.get();
    let dmin = -y.d() * x.dmin.get();
    for (a, &l) in acc.iter_mut().zip(lanes) {
        *a = d.mul_add(l as f32, *a);
    }
    *summs = dmin.mul_add(mins as f32, *summs);
}

/// ggml's `hsum_float_8` order: lanes `l` and `l+4`, then pairs `0+2`, `1+3`, then their sum.
#[inline(always)]
fn hsum8(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// The unsigned 6-bit quant (0..63) of element `e` (0..256) of a Q6_K block.
#[inline(always)]
fn q6_u(x: &BlockQ6K, e: usize) -> i32 {
    let (j, p) = (e / 128, e % 128);
    let ql = x.ql[64 * j + p % 64];
    let lo = if p < 64 { ql & 0xF } else { ql >> 4 };
    let hi = (x.qh[32 * j + p % 32] >> (2 * (p / 32))) & 3;
    (lo | (hi << 4)) as i32
}

/// Q6_K × Q8_K with the arithmetic of ggml's AVX2 `ggml_vec_dot_q6_K_q8_K` (`arch/x86/quants.c`, commit
/// 0c1e570): per super-block eight i32 lanes (lane `l` holds elements `4l..4l+4` of every 32-element chunk,
/// times their 16-group scale, minus `32·(bsum[2l]·sc[2l] + bsum[2l+1]·sc[2l+1])`), each accumulated into
/// its own f32 lane with `fma(d8·d, lane, acc)`, lanes summed pairwise at the end.
pub fn q6_k_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ6K] = blocks(w, n, QK_K);
    let y: &[BlockQ8K] = blocks(a, n, QK_K);
    let mut acc = [0f32; 8];
    for (x, y) in x.iter().zip(y) {
        let q: [i32; 256] = std::array::from_fn(|e| q6_u(x, e));
        let lanes = q6_k_lanes(&q, &x.scales, y);
        let d = y.d() * x.d.get();
        for (a, &l) in acc.iter_mut().zip(&lanes) {
            *a = d.mul_add(l as f32, *a);
        }
    }
    hsum8(&acc)
}

/// The eight i32 lanes of one Q6_K super-block against Q8_K (`q[e]` the unsigned quant of element `e`), as
/// in [`q6_k_q8_k`].
#[inline(always)]
fn q6_k_lanes(q: &[i32; 256], scales: &[i8; 16], y: &BlockQ8K) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for c in 0..8 {
        // Chunk c: elements 32c..32c+32, scales 2c (first 16) and 2c+1 (last 16).
        for m in 0..32 {
            let e = 32 * c + m;
            lanes[m / 4] += scales[2 * c + m / 16] as i32 * q[e] * y.qs[e] as i32;
        }
    }
    for (l, lane) in lanes.iter_mut().enumerate() {
        let s0 = scales[2 * l] as i32;
        let s1 = scales[2 * l + 1] as i32;
        *lane -= 32 * (y.bsum(2 * l) as i32 * s0 + y.bsum(2 * l + 1) as i32 * s1);
    }
    lanes
}

/// [`q6_k_q8_k`] for four tokens (one weight row, four activation rows): each super-block's quants are
/// decoded once; every result is bit-identical to [`q6_k_q8_k`] on that token.
pub fn q6_k_q8_k_x4(n: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let x: &[BlockQ6K] = blocks(w, n, QK_K);
    let y: [&[BlockQ8K]; 4] = a.map(|a| blocks(a, n, QK_K));
    let mut acc = [[0f32; 8]; 4];
    for (i, x) in x.iter().enumerate() {
        let q: [i32; 256] = std::array::from_fn(|e| q6_u(x, e));
        for t in 0..4 {
            let y = &y[t][i];
            let lanes = q6_k_lanes(&q, &x.scales, y);
            let d = y.d() * x.d.get();
            for (a, &l) in acc[t].iter_mut().zip(&lanes) {
                *a = d.mul_add(l as f32, *a);
            }
        }
    }
    acc.map(|acc| hsum8(&acc))
}

/// IQ4_XS × Q8_K with the float arithmetic of ggml's AVX2 `ggml_vec_dot_iq4_xs_q8_K` (`arch/x86/quants.c`,
/// commit 0c1e570): per super-block eight i32 lanes (lane `l` holds elements `4l..4l+4` of every 32-element
/// chunk times the chunk's scale − 32), each accumulated into its own f32 lane with `fma(d·d8, lane, acc)`,
/// then `hsum_float_8`.
pub fn iq4_xs_q8_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockIq4Xs] = blocks(w, n, QK_K);
    let y: &[BlockQ8K] = blocks(a, n, QK_K);
    let mut acc = [0f32; 8];
    for (x, y) in x.iter().zip(y) {
        let sh = u16::from_le_bytes(x.scales_h);
        let mut lanes = [0i32; 8];
        for ib in 0..8 {
            let ls = ((x.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) as i32
                | ((((sh >> (2 * ib)) & 3) as i32) << 4);
            let qs = &x.qs[16 * ib..16 * ib + 16];
            let yq = &y.qs[32 * ib..32 * ib + 32];
            for m in 0..32 {
                let nib = if m < 16 { qs[m] & 0xF } else { qs[m - 16] >> 4 };
                lanes[m / 4] += (ls - 32) * KVALUES_IQ4NL[nib as usize] as i32 * yq[m] as i32;
            }
        }
        let d = x.d.get() * y.d();
        for (a, &l) in acc.iter_mut().zip(&lanes) {
            *a = d.mul_add(l as f32, *a);
        }
    }
    hsum8(&acc)
}
