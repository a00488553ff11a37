//! aarch64 NEON kernels (Jetson, ARM servers), each the twin of a function in [`super::scalar`].
//!
//! Ported from `ggml/src/ggml-cpu/arch/arm/quants.c` of llama.cpp (`ggml_vec_dot_q8_0_q8_0`,
//! `ggml_vec_dot_q4_0_q8_0`, `ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q5_0_q8_0`, `ggml_vec_dot_q4_K_q8_K`,
//! `ggml_vec_dot_q6_K_q8_K`, NEON paths) and the f16 dot product of `ggml/src/ggml-cpu/simd-mappings.h`.
//!
//! - **Quantized types (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K): bit-identical to the scalar oracle.** ggml
//!   keeps per-lane float accumulators; here each block's integer sum (exact in any order) is computed in
//!   NEON and then the oracle's float operations run in the oracle's order (for Q6_K the oracle's eight
//!   integer lanes are NEON's two `int32x4_t`s, and its eight fused multiply-adds are two `vfmaq_f32`).
//!   The four-token kernels (Q4_K, Q6_K) run these per token, so they are bit-identical too.
//! - **F16 is not bit-identical**: the oracle adds the (exact) f32 products into one f64 in element order;
//!   the NEON kernel adds them into eight f64 lanes and sums the lanes at the end. The f64 sums differ by at
//!   most about `n · 2⁻⁵³ · Σ|w·a|`, so the f32 results differ by at most one rounding (tested).
//!
//! Byte dot products use `sdot` (`vdotq_s32`, the Armv8.2 dot-product extension, as inline assembly: the
//! intrinsic is not stable Rust) when `is_aarch64_feature_detected!("dotprod")` says the CPU has it (Jetson
//! Orin, Graviton 2+), and widening multiplies (`smull` + pairwise adds) otherwise (older Jetsons). Both
//! give the same four-byte lane sums, so both kernel sets return the same bits.
//!
//! Each `unsafe fn` here is only reachable through a safe wrapper that checks the slice lengths; the
//! `sdot` wrappers are only handed out after run-time detection of the feature.

// Index loops mirror the oracle's loops one for one, which keeps the port reviewable.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;

use crate::engine::ggml_type::GgmlType;
use crate::engine::quant::blocks::*;

use super::dispatch::{VecDot4Fn, VecDotFn};

/// Whether this CPU has the Armv8.2 dot-product instructions (`sdot`).
pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// The NEON kernel for `ty`, where one exists: the `sdot` version when the CPU has the dot-product
/// extension, the plain NEON one otherwise.
pub fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    kernel(has_dotprod(), ty)
}

/// The four-token kernel for `ty` (Q4_K, Q6_K), where one exists: the [`vec_dot_fn`] kernel run per token,
/// so each result is bit-identical to it (and to the scalar oracle). It exists so that prompt processing
/// does not fall back to the scalar four-token kernels; a NEON version that decodes each weight block once
/// for the four tokens is not written yet.
pub fn vec_dot4_fn(ty: GgmlType) -> Option<VecDot4Fn> {
    use GgmlType::*;
    Some(match (ty, has_dotprod()) {
        (Q4_K, true) => q4_k_q8_k_x4_dp,
        (Q4_K, false) => q4_k_q8_k_x4,
        (Q6_K, true) => q6_k_q8_k_x4_dp,
        (Q6_K, false) => q6_k_q8_k_x4,
        _ => return None,
    })
}

/// Defines `$name`, the four-token form of the single-token kernel `$one`.
macro_rules! per_token {
    ($name:ident, $one:ident) => {
        fn $name(n: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            a.map(|a| $one(n, w, a))
        }
    };
}

per_token!(q4_k_q8_k_x4_dp, q4_k_q8_k_dp);
per_token!(q4_k_q8_k_x4, q4_k_q8_k);
per_token!(q6_k_q8_k_x4_dp, q6_k_q8_k_dp);
per_token!(q6_k_q8_k_x4, q6_k_q8_k);

/// The kernel for `ty` of the `sdot` set (`dotprod` true; the caller has checked [`has_dotprod`]) or of the
/// plain NEON set.
fn kernel(dotprod: bool, ty: GgmlType) -> Option<VecDotFn> {
    use GgmlType::*;
    Some(match (ty, dotprod) {
        (F16, _) => f16_f16,
        (Q8_0, true) => q8_0_q8_0_dp,
        (Q8_0, false) => q8_0_q8_0,
        (Q4_0, true) => q4_0_q8_0_dp,
        (Q4_0, false) => q4_0_q8_0,
        (Q4_1, true) => q4_1_q8_1_dp,
        (Q4_1, false) => q4_1_q8_1,
        (Q5_0, true) => q5_0_q8_0_dp,
        (Q5_0, false) => q5_0_q8_0,
        (Q4_K, true) => q4_k_q8_k_dp,
        (Q4_K, false) => q4_k_q8_k,
        (Q6_K, true) => q6_k_q8_k_dp,
        (Q6_K, false) => q6_k_q8_k,
        _ => return None,
    })
}

/// Defines the safe wrapper `$name` around `$inner`, checking that `w` holds `n` elements in blocks of
/// `$wsize` bytes and `a` `n` elements in blocks of `$asize` bytes, and that `n` is a multiple of `$bs`.
macro_rules! safe_wrapper {
    ($name:ident, $inner:ident, $bs:expr, $wsize:expr, $asize:expr) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = n / $bs;
            assert!(
                n.is_multiple_of($bs) && w.len() >= nb * $wsize && a.len() >= nb * $asize,
                concat!(stringify!($name), ": bad row lengths")
            );
            // SAFETY: the lengths were checked just above and `$inner` reads only the first `nb` blocks of
            // each slice (cast to block slices with bytemuck, bounds-checked). NEON is part of every aarch64
            // CPU, and the `*_dp` wrappers (which need dotprod) are only handed out by `kernel(true, _)`,
            // which `vec_dot_fn` calls only after `has_dotprod()`.
            unsafe { $inner(nb, &w[..nb * $wsize], &a[..nb * $asize]) }
        }
    };
}

safe_wrapper!(f16_f16, f16_f16_neon, 1, 2, 2);
safe_wrapper!(q8_0_q8_0, q8_0_q8_0_plain, QK, 34, 34);
safe_wrapper!(q4_0_q8_0, q4_0_q8_0_plain, QK, 18, 34);
safe_wrapper!(q4_1_q8_1, q4_1_q8_1_plain, QK, 20, 36);
safe_wrapper!(q5_0_q8_0, q5_0_q8_0_plain, QK, 22, 34);
safe_wrapper!(q4_k_q8_k, q4_k_q8_k_plain, QK_K, 144, 292);
safe_wrapper!(q6_k_q8_k, q6_k_q8_k_plain, QK_K, 210, 292);
safe_wrapper!(q8_0_q8_0_dp, q8_0_q8_0_sdot, QK, 34, 34);
safe_wrapper!(q4_0_q8_0_dp, q4_0_q8_0_sdot, QK, 18, 34);
safe_wrapper!(q4_1_q8_1_dp, q4_1_q8_1_sdot, QK, 20, 36);
safe_wrapper!(q5_0_q8_0_dp, q5_0_q8_0_sdot, QK, 22, 34);
safe_wrapper!(q4_k_q8_k_dp, q4_k_q8_k_sdot, QK_K, 144, 292);
safe_wrapper!(q6_k_q8_k_dp, q6_k_q8_k_sdot, QK_K, 210, 292);

/// `acc[i] += Σ_{k<4} a[4i+k]·b[4i+k]` over signed bytes: one `sdot`, or its plain NEON equivalent.
trait Dot4 {
    /// # Safety
    /// The CPU must have the instructions the implementation uses.
    unsafe fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// The Armv8.2 dot-product instruction.
struct Sdot;
/// Widening multiplies and pairwise adds (any aarch64 CPU).
struct Plain;

/// `sdot acc.4s, a.16b, b.16b` (`vdotq_s32`).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: the instruction reads and writes only the named registers; the enclosing function requires
    // the dotprod feature.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

impl Dot4 for Sdot {
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        sdot(acc, a, b)
    }
}

impl Dot4 for Plain {
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn dot4(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // Products fit i16; pairs are widened to i32 before the second pairwise add (two products of
        // -128·-128 would overflow i16), so the lane sums are exact, in `sdot`'s lane layout.
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)))
    }
}

/// 32 bytes as two vectors (a by-value copy: no pointer arithmetic).
#[inline]
#[target_feature(enable = "neon")]
fn i8x32(p: &[i8; 32]) -> [int8x16_t; 2] {
    // SAFETY: both types are 32 plain bytes.
    unsafe { std::mem::transmute::<[i8; 32], [int8x16_t; 2]>(*p) }
}

#[inline]
#[target_feature(enable = "neon")]
fn u8x16(p: &[u8; 16]) -> uint8x16_t {
    // SAFETY: both types are 16 plain bytes.
    unsafe { std::mem::transmute::<[u8; 16], uint8x16_t>(*p) }
}

#[inline]
#[target_feature(enable = "neon")]
fn as_s8(v: uint8x16_t) -> int8x16_t {
    vreinterpretq_s8_u8(v)
}

/// Σ x·y over 32 signed bytes given as two vector pairs (exact).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot32<D: Dot4>(x: [int8x16_t; 2], y: [int8x16_t; 2]) -> i32 {
    // SAFETY: forwarded from the caller.
    let v = unsafe { D::dot4(D::dot4(vdupq_n_s32(0), x[0], y[0]), x[1], y[1]) };
    vaddvq_s32(v)
}

fn blocks<T: bytemuck::Pod>(b: &[u8], nb: usize) -> &[T] {
    bytemuck::cast_slice(&b[..nb * size_of::<T>()])
}

/// Elements 0..16 (low nibbles) and 16..32 (high nibbles) of a Q4 block as unsigned bytes.
#[inline]
#[target_feature(enable = "neon")]
fn nibbles(qs: &[u8; 16]) -> [uint8x16_t; 2] {
    let q = u8x16(qs);
    [vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q)]
}

/// Defines the `sdot` and plain-NEON entry points of the generic kernel body `$body::<D>`.
macro_rules! both {
    ($body:ident, $sdot:ident, $plain:ident) => {
        #[target_feature(enable = "neon,dotprod")]
        unsafe fn $sdot(nb: usize, w: &[u8], a: &[u8]) -> f32 {
            // SAFETY: this function requires dotprod.
            unsafe { $body::<Sdot>(nb, w, a) }
        }
        #[target_feature(enable = "neon")]
        unsafe fn $plain(nb: usize, w: &[u8], a: &[u8]) -> f32 {
            // SAFETY: `Plain` uses base NEON only.
            unsafe { $body::<Plain>(nb, w, a) }
        }
    };
}

both!(q8_0_q8_0_body, q8_0_q8_0_sdot, q8_0_q8_0_plain);
both!(q4_0_q8_0_body, q4_0_q8_0_sdot, q4_0_q8_0_plain);
both!(q4_1_q8_1_body, q4_1_q8_1_sdot, q4_1_q8_1_plain);
both!(q5_0_q8_0_body, q5_0_q8_0_sdot, q5_0_q8_0_plain);
both!(q4_k_q8_k_body, q4_k_q8_k_sdot, q4_k_q8_k_plain);
both!(q6_k_q8_k_body, q6_k_q8_k_sdot, q6_k_q8_k_plain);

/// [`super::scalar::q8_0_q8_0`] (`ggml_vec_dot_q8_0_q8_0`, arm).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q8_0_q8_0_body<D: Dot4>(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ8_0] = blocks(w, nb);
    let y: &[BlockQ8_0] = blocks(a, nb);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        // SAFETY: forwarded from the caller.
        let sumi = unsafe { dot32::<D>(i8x32(&x.qs), i8x32(&y.qs)) };
        sumf += sumi as f32 * (x.d.get() * y.d.get());
    }
    sumf
}

/// [`super::scalar::q4_0_q8_0`] (one fma chain per output, as ggml's repacked Q4_0 GEMV on x86).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q4_0_q8_0_body<D: Dot4>(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4_0] = blocks(w, nb);
    let y: &[BlockQ8_0] = blocks(a, nb);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let q = nibbles(&x.qs).map(|v| vsubq_s8(as_s8(v), vdupq_n_s8(8)));
        // SAFETY: forwarded from the caller.
        let sumi = unsafe { dot32::<D>(q, i8x32(&y.qs)) };
        sumf = (sumi as f32).mul_add(x.d.get() * y.d.get(), sumf);
    }
    sumf
}

/// [`super::scalar::q4_1_q8_1`] (`ggml_vec_dot_q4_1_q8_1`, arm).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q4_1_q8_1_body<D: Dot4>(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4_1] = blocks(w, nb);
    let y: &[BlockQ8_1] = blocks(a, nb);
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let q = nibbles(&x.qs).map(|v| as_s8(v));
        // SAFETY: forwarded from the caller.
        let sumi = unsafe { dot32::<D>(q, i8x32(&y.qs)) };
        sumf += sumi as f32 * (x.d.get() * y.d.get()) + x.m.get() * y.s.get();
    }
    sumf
}

/// [`super::scalar::q5_0_q8_0`] (`ggml_vec_dot_q5_0_q8_0`, arm; the fifth bits are spread to bytes with a
/// bit-mask test instead of ggml's table).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q5_0_q8_0_body<D: Dot4>(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ5_0] = blocks(w, nb);
    let y: &[BlockQ8_0] = blocks(a, nb);
    // Byte k of each half tests bit k % 8.
    let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    let mut sumf = 0f32;
    for (x, y) in x.iter().zip(y) {
        let qh = x.qh;
        // Element j (0..32) takes bit j of the little-endian u32 `qh`, i.e. bit j % 8 of byte j / 8.
        let h0 = vcombine_u8(vdup_n_u8(qh[0]), vdup_n_u8(qh[1]));
        let h1 = vcombine_u8(vdup_n_u8(qh[2]), vdup_n_u8(qh[3]));
        let hb = [h0, h1].map(|h| vandq_u8(vtstq_u8(h, bit), vdupq_n_u8(0x10)));
        let nib = nibbles(&x.qs);
        let q = [0, 1].map(|k| vsubq_s8(as_s8(vorrq_u8(nib[k], hb[k])), vdupq_n_s8(16)));
        // SAFETY: forwarded from the caller.
        let sumi = unsafe { dot32::<D>(q, i8x32(&y.qs)) };
        sumf += sumi as f32 * (x.d.get() * y.d.get());
    }
    sumf
}

/// 16 little-endian i16 `bsums` of a Q8_K block as two vectors.
#[inline]
#[target_feature(enable = "neon")]
fn bsums(y: &BlockQ8K) -> [int16x8_t; 2] {
    // SAFETY: both types are 32 plain bytes, and aarch64 Linux is little-endian.
    unsafe { std::mem::transmute::<[[u8; 2]; 16], [int16x8_t; 2]>(y.bsums) }
}

/// [`super::scalar::q4_k_q8_k`] (`ggml_vec_dot_q4_K_q8_K`, arm): the integer sums per super-block in NEON,
/// then the oracle's two fused multiply-adds.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q4_k_q8_k_body<D: Dot4>(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4K] = blocks(w, nb);
    let y: &[BlockQ8K] = blocks(a, nb);
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (x, y) in x.iter().zip(y) {
        let (sc, mn) = k4_scales_mins(&x.scales);
        // Σ_g bsum[g]·mn[g/2]: pairs of bsums widened to i32, times the eight mins.
        let b = bsums(y);
        let (pb0, pb1) = (vpaddlq_s16(b[0]), vpaddlq_s16(b[1]));
        // SAFETY: both types are 8 plain bytes.
        let m16 = vmovl_u8(unsafe { std::mem::transmute::<[u8; 8], uint8x8_t>(mn) });
        let m0 = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(m16)));
        let m1 = vreinterpretq_s32_u32(vmovl_high_u16(m16));
        let summs = vaddvq_s32(vmlaq_s32(vmulq_s32(pb0, m0), pb1, m1));
        let mut isum = 0i32;
        for j in 0..4 {
            let qs: &[u8; 32] = x.qs[32 * j..32 * j + 32].try_into().unwrap();
            let (q0, q1) = qs.split_at(16);
            let n0 = nibbles(q0.try_into().unwrap());
            let n1 = nibbles(q1.try_into().unwrap());
            let ys: &[i8; 64] = y.qs[64 * j..64 * j + 64].try_into().unwrap();
            let (ya, yb) = ys.split_at(32);
            // SAFETY: forwarded from the caller.
            let (s_lo, s_hi) = unsafe {
                (
                    dot32::<D>([as_s8(n0[0]), as_s8(n1[0])], i8x32(ya.try_into().unwrap())),
                    dot32::<D>([as_s8(n0[1]), as_s8(n1[1])], i8x32(yb.try_into().unwrap())),
                )
            };
            isum += sc[2 * j] as i32 * s_lo + sc[2 * j + 1] as i32 * s_hi;
        }
        acc = (isum as f32).mul_add(x.d.get() * y.d(), acc);
        acc_min = (summs as f32).mul_add(x.dmin.get() * y.d(), acc_min);
    }
    acc - acc_min
}

/// [`super::scalar::q6_k_q8_k`] (`ggml_vec_dot_q6_K_q8_K`, arm, with the oracle's lane layout): per
/// super-block the oracle's eight i32 lanes (lane `l` holds elements `4l..4l+4` of every 32-element chunk
/// times their scale, which is exactly `sdot`'s lane layout) as two vectors, then its eight fused
/// multiply-adds as two `vfmaq_f32` and its pairwise lane sum.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q6_k_q8_k_body<D: Dot4>(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ6K] = blocks(w, nb);
    let y: &[BlockQ8K] = blocks(a, nb);
    let mut acc = [vdupq_n_f32(0.0); 2];
    let m4 = vdupq_n_u8(0x0F);
    let m3 = vdupq_n_u8(0x03);
    for (x, y) in x.iter().zip(y) {
        let mut lanes = [vdupq_n_s32(0); 2];
        for j in 0..2 {
            // Element p (0..128) of half j: low or high nibble of ql[64j + p % 64], bits 2(p/32).. of
            // qh[32j + p % 32].
            let ql: [uint8x16_t; 4] =
                std::array::from_fn(|i| u8x16(x.ql[64 * j + 16 * i..][..16].try_into().unwrap()));
            let qh: [uint8x16_t; 2] =
                std::array::from_fn(|i| u8x16(x.qh[32 * j + 16 * i..][..16].try_into().unwrap()));
            for k in 0..4 {
                let c = 4 * j + k;
                let ys = i8x32(y.qs[32 * c..32 * c + 32].try_into().unwrap());
                for h in 0..2 {
                    let v = ql[2 * (k % 2) + h];
                    let lo = if k < 2 {
                        vandq_u8(v, m4)
                    } else {
                        vshrq_n_u8::<4>(v)
                    };
                    let hi = vandq_u8(vshlq_u8(qh[h], vdupq_n_s8(-2 * k as i8)), m3);
                    let q = as_s8(vorrq_u8(lo, vshlq_n_u8::<4>(hi)));
                    // SAFETY: forwarded from the caller.
                    let d = unsafe { D::dot4(vdupq_n_s32(0), q, ys[h]) };
                    lanes[h] = vmlaq_n_s32(lanes[h], d, x.scales[2 * c + h] as i32);
                }
            }
        }
        // lane l −= 32·(bsum[2l]·sc[2l] + bsum[2l+1]·sc[2l+1]).
        let b = bsums(y);
        // SAFETY: both types are 16 plain bytes.
        let s = unsafe { std::mem::transmute::<[i8; 16], int8x16_t>(x.scales) };
        let (s0, s1) = (vmovl_s8(vget_low_s8(s)), vmovl_high_s8(s));
        let p = [
            vmull_s16(vget_low_s16(b[0]), vget_low_s16(s0)),
            vmull_high_s16(b[0], s0),
            vmull_s16(vget_low_s16(b[1]), vget_low_s16(s1)),
            vmull_high_s16(b[1], s1),
        ];
        let corr = [vpaddq_s32(p[0], p[1]), vpaddq_s32(p[2], p[3])];
        let d = vdupq_n_f32(y.d() * x.d.get());
        for h in 0..2 {
            let l = vsubq_s32(lanes[h], vshlq_n_s32::<5>(corr[h]));
            acc[h] = vfmaq_f32(acc[h], d, vcvtq_f32_s32(l));
        }
    }
    // SAFETY: both types are 32 plain bytes.
    let acc = unsafe { std::mem::transmute::<[float32x4_t; 2], [f32; 8]>(acc) };
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Four f16s (in the low half of `v`) and four more (the high half) widened to f32 (`fcvtl`, `fcvtl2`:
/// base Armv8, exact).
#[inline]
#[target_feature(enable = "neon")]
fn f16x8_to_f32(v: uint16x8_t) -> [float32x4_t; 2] {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: the instructions read and write only the named registers.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {v:v}.4h",
            "fcvtl2 {hi:v}.4s, {v:v}.8h",
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            v = in(vreg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    [lo, hi]
}

/// [`super::scalar::f16_f16`] (`ggml_vec_dot_f16`, NEON path, accumulating in f64 as the oracle does):
/// each f16·f16 product is exact in f32 and in f64; eight f64 lanes, summed at the end, then the tail.
#[target_feature(enable = "neon")]
unsafe fn f16_f16_neon(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [vdupq_n_f64(0.0); 4];
    let n8 = n / 8 * 8;
    let (wc, wt) = w[..2 * n].split_at(2 * n8);
    let (ac, at) = a[..2 * n].split_at(2 * n8);
    for (x, y) in wc.chunks_exact(16).zip(ac.chunks_exact(16)) {
        // SAFETY: both types are 16 plain bytes; aarch64 Linux is little-endian.
        let (xv, yv) = unsafe {
            (
                std::mem::transmute::<[u8; 16], uint16x8_t>(x.try_into().unwrap()),
                std::mem::transmute::<[u8; 16], uint16x8_t>(y.try_into().unwrap()),
            )
        };
        let (xf, yf) = (f16x8_to_f32(xv), f16x8_to_f32(yv));
        for h in 0..2 {
            let p = vmulq_f32(xf[h], yf[h]);
            acc[2 * h] = vaddq_f64(acc[2 * h], vcvt_f64_f32(vget_low_f32(p)));
            acc[2 * h + 1] = vaddq_f64(acc[2 * h + 1], vcvt_high_f64_f32(p));
        }
    }
    let mut s = vaddvq_f64(vaddq_f64(
        vaddq_f64(acc[0], acc[1]),
        vaddq_f64(acc[2], acc[3]),
    ));
    let wt: &[F16Le] = bytemuck::cast_slice(wt);
    let at: &[F16Le] = bytemuck::cast_slice(at);
    for (x, y) in wt.iter().zip(at) {
        s += (x.get() * y.get()) as f64;
    }
    s as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::{Isa, isa, scalar_vec_dot_fn};
    use crate::engine::quant;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A row of `nb` blocks of `ty` of random bytes (every quant value, including the extremes) with small
    /// random f16 scales at the byte offsets `offs` of each block.
    fn random_row(ty: GgmlType, nb: usize, seed: u64, offs: &[usize]) -> Vec<u8> {
        let ts = ty.type_size();
        let r = rand_vec(nb * ts, seed);
        let mut w: Vec<u8> = r.iter().map(|v| ((v + 1.0) * 127.99) as u8).collect();
        for (b, blk) in w.chunks_exact_mut(ts).enumerate() {
            for (k, &o) in offs.iter().enumerate() {
                let v = F16Le::from_f32(r[(b * 7 + k * 3) % r.len()] * 0.03);
                blk[o..o + 2].copy_from_slice(&v.0);
            }
        }
        w
    }

    /// An activation row of `n` elements in `ty`'s vec-dot type, with an outlier.
    fn activation(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
        let vd = quant::vec_dot_type(ty).unwrap();
        let mut a = vec![0u8; quant::row_bytes(vd, n).unwrap()];
        let mut x = rand_vec(n, 1000 + seed);
        x[(seed as usize * 31) % n] *= 25.0;
        quant::quantize_row_activation(vd, &x, &mut a).unwrap();
        a
    }

    /// The kernel sets this CPU can run: plain NEON always, `sdot` where detected.
    fn kernel_sets() -> Vec<(&'static str, bool)> {
        let mut sets = vec![("plain", false)];
        if has_dotprod() {
            sets.push(("sdot", true));
        } else {
            eprintln!("no dotprod on this CPU: testing the plain NEON kernels only");
        }
        sets
    }

    const QUANT_TYPES: [(GgmlType, &[usize]); 6] = [
        (GgmlType::Q8_0, &[0]),
        (GgmlType::Q4_0, &[0]),
        (GgmlType::Q4_K, &[0, 2]),
        (GgmlType::Q6_K, &[208]),
        (GgmlType::Q5_0, &[0]),
        (GgmlType::Q4_1, &[0, 2]),
    ];

    #[test]
    fn neon_quant_kernels_equal_scalar_bit_for_bit_on_random_blocks() {
        for (set, dotprod) in kernel_sets() {
            for (ty, offs) in QUANT_TYPES {
                let k = kernel(dotprod, ty).unwrap();
                let oracle = scalar_vec_dot_fn(ty).unwrap();
                for (seed, nb) in (0..24u64).zip([1usize, 2, 3, 5].into_iter().cycle()) {
                    let n = nb * 256;
                    let w = random_row(ty, n / ty.block_size(), seed, offs);
                    let a = activation(ty, n, seed);
                    assert_eq!(
                        k(n, &w, &a).to_bits(),
                        oracle(n, &w, &a).to_bits(),
                        "{set} {ty} seed {seed} n {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn neon_quant_kernels_equal_scalar_bit_for_bit_on_quantized_rows() {
        for (set, dotprod) in kernel_sets() {
            // (The engine has no quantizer for k-quant weights; the random-block test covers them.)
            for ty in [
                GgmlType::Q8_0,
                GgmlType::Q4_0,
                GgmlType::Q5_0,
                GgmlType::Q4_1,
            ] {
                let k = kernel(dotprod, ty).unwrap();
                let oracle = scalar_vec_dot_fn(ty).unwrap();
                for seed in 0..8u64 {
                    let n = 512;
                    let mut w = vec![0u8; quant::row_bytes(ty, n).unwrap()];
                    let mut wf = rand_vec(n, seed);
                    wf[(seed as usize * 7) % n] *= 40.0;
                    quant::quantize_row(ty, &wf, &mut w).unwrap();
                    let a = activation(ty, n, seed);
                    let (got, want) = (k(n, &w, &a), oracle(n, &w, &a));
                    assert_eq!(got.to_bits(), want.to_bits(), "{set} {ty} seed {seed}");
                    assert!(want != 0.0, "{ty}: a degenerate row tests nothing");
                }
            }
        }
    }

    #[test]
    fn dotprod_and_plain_byte_dots_agree_on_extremes() {
        if !has_dotprod() {
            eprintln!("no dotprod on this CPU: nothing to compare");
            return;
        }
        let vals = [-128i8, -127, -1, 0, 1, 63, 126, 127];
        let mut a = [0i8; 16];
        let mut b = [0i8; 16];
        for s in 0..64usize {
            for i in 0..16 {
                a[i] = vals[(s + i * 3) % 8];
                b[i] = vals[(s * 5 + i) % 8];
            }
            let (av, bv) = (
                unsafe { std::mem::transmute::<[i8; 16], int8x16_t>(a) },
                unsafe { std::mem::transmute::<[i8; 16], int8x16_t>(b) },
            );
            // SAFETY: NEON is part of every aarch64 CPU.
            let acc = unsafe { vdupq_n_s32(7) };
            // SAFETY: dotprod was detected above; Plain needs base NEON only.
            let (d, p) = unsafe { (Sdot::dot4(acc, av, bv), Plain::dot4(acc, av, bv)) };
            let (d, p) = unsafe {
                (
                    std::mem::transmute::<int32x4_t, [i32; 4]>(d),
                    std::mem::transmute::<int32x4_t, [i32; 4]>(p),
                )
            };
            let want: [i32; 4] = std::array::from_fn(|l| {
                7 + (4 * l..4 * l + 4)
                    .map(|i| a[i] as i32 * b[i] as i32)
                    .sum::<i32>()
            });
            assert_eq!(d, want, "sdot, case {s}");
            assert_eq!(p, want, "plain, case {s}");
        }
    }

    #[test]
    fn neon_f16_is_within_one_rounding_of_scalar() {
        let k = kernel(false, GgmlType::F16).unwrap();
        for (seed, n) in (0..20u64).zip([1usize, 7, 8, 33, 256, 1000, 4096].into_iter().cycle()) {
            let (wf, af) = (rand_vec(n, seed), rand_vec(n, 77 + seed));
            let mut w = vec![0u8; 2 * n];
            let mut a = vec![0u8; 2 * n];
            quant::quantize_row(GgmlType::F16, &wf, &mut w).unwrap();
            quant::quantize_row(GgmlType::F16, &af, &mut a).unwrap();
            let (got, want) = (k(n, &w, &a), super::super::scalar::f16_f16(n, &w, &a));
            let wh: &[F16Le] = bytemuck::cast_slice(&w);
            let ah: &[F16Le] = bytemuck::cast_slice(&a);
            let abs: f64 = wh
                .iter()
                .zip(ah)
                .map(|(x, y)| (x.get() as f64 * y.get() as f64).abs())
                .sum();
            // One f32 rounding of the result, plus the f64 reordering error.
            let tol = f32::EPSILON as f64 * (want as f64).abs() + 1e-12 * abs;
            assert!(
                ((got - want) as f64).abs() <= tol,
                "n {n} seed {seed}: neon {got} scalar {want}"
            );
        }
    }

    #[test]
    fn four_token_kernels_equal_scalar_four_token_kernels_bit_for_bit() {
        for (ty, offs) in [(GgmlType::Q4_K, &[0, 2][..]), (GgmlType::Q6_K, &[208])] {
            let quad = vec_dot4_fn(ty).unwrap();
            let oracle = crate::engine::kernels::scalar_vec_dot4_fn(ty).unwrap();
            for seed in 0..6u64 {
                let n = 3 * 256;
                let w = random_row(ty, 3, seed, offs);
                let acts: Vec<Vec<u8>> = (0..4).map(|t| activation(ty, n, 10 * seed + t)).collect();
                let refs = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
                assert_eq!(
                    quad(n, &w, refs).map(f32::to_bits),
                    oracle(n, &w, refs).map(f32::to_bits),
                    "{ty} seed {seed}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "bad row lengths")]
    fn short_rows_are_refused() {
        let k = kernel(false, GgmlType::Q8_0).unwrap();
        k(64, &[0u8; 34], &[0u8; 68]);
    }

    #[test]
    fn dispatch_picks_neon_on_aarch64() {
        if std::env::var("CYBER_INFERENCE_ISA").is_ok() {
            return;
        }
        assert_eq!(isa(), Isa::Neon);
        for (ty, _) in QUANT_TYPES {
            let got = crate::engine::kernels::vec_dot_fn(ty).unwrap() as usize;
            assert_eq!(got, vec_dot_fn(ty).unwrap() as usize, "{ty}");
            assert_ne!(got, scalar_vec_dot_fn(ty).unwrap() as usize, "{ty}");
        }
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let got = crate::engine::kernels::vec_dot4_fn(ty).unwrap() as usize;
            assert_eq!(got, vec_dot4_fn(ty).unwrap() as usize, "{ty}");
        }
    }
}
