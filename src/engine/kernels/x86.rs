//! x86-64 SIMD kernels (AVX2 + FMA + F16C), each the twin of a function in [`super::scalar`].
//!
//! Ported from `ggml/src/ggml-cpu/arch/x86/quants.c` (`ggml_vec_dot_*_q8_*`, AVX2 paths) and
//! `ggml/src/ggml-cpu/simd-mappings.h` (f16/f32 dot products) of llama.cpp commit 0c1e570.
//!
//! - The 32-element-block types Q4_1, Q5_0, Q8_0 keep ggml's `ggml_vec_dot` scheme: an exact integer sum per
//!   block, scaled and accumulated into 8 float lanes with FMA, summed horizontally at the end. Their
//!   results differ from the scalar oracle by float rounding only. So do F32, F16, BF16 and Q5_1.
//! - The types llama.cpp repacks on x86 (Q4_0, IQ4_NL, MXFP4: `arch/x86/repack.cpp`) follow its repacked
//!   GEMV/GEMM instead: the exact integer sum of each block, then one f32 fma chain per output, bit-identical
//!   to the scalar oracle (Q4_K: the GEMV's chain per super-block).
//! - The k-quants (Q2_K … Q6_K) and IQ4_XS compute each super-block's integer sum exactly in SIMD and then do
//!   the same float operations as the oracle (Q5_K, Q6_K, IQ4_XS: ggml's eight AVX2 lanes), so they are
//!   **bit-identical** to it.
//!
//! - Prompt processing uses four-token kernels (one weight row, four activation rows: Q4_0, Q4_1, Q5_0,
//!   Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) and, with AVX-512 VNNI, 4-row x 4-token tiles (Q4_1, Q5_0, Q8_0). They decode a
//!   weight block once for several tokens and may compute the exact integer sums differently (`vpdpbusd`,
//!   `vpdpwssd`, an unsigned offset), but every float operation of a (row, token) result is the
//!   single-token kernel's, in its order: each result is **bit-identical** to the single-token kernel's.
//!
//! Each `unsafe fn` here is only reachable through a safe wrapper that checks the slice lengths, and the
//! wrappers are only handed out with an [`Avx2`] (or [`Vnni`]) token, which proves the CPU has the
//! features.

use std::arch::x86_64::*;

use crate::engine::ggml_type::GgmlType;
use crate::engine::quant::blocks::*;

use super::dispatch::{VecDot4Fn, VecDot4x4Fn, VecDotFn};

/// Proof that this CPU supports AVX2, FMA and F16C (only [`Avx2::detect`] makes one).
#[derive(Clone, Copy, Debug)]
pub struct Avx2(());

impl Avx2 {
    /// The token, when the CPU has every feature these kernels use.
    pub fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2(()))
    }
}

/// The AVX2 kernel for `ty`, where one exists.
pub fn vec_dot_fn(_proof: Avx2, ty: GgmlType) -> Option<VecDotFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => f32_f32,
        F16 => f16_f16,
        BF16 => bf16_bf16,
        Q4_0 => q4_0_q8_0,
        Q4_1 => q4_1_q8_1,
        Q5_0 => q5_0_q8_0,
        Q5_1 => q5_1_q8_1,
        Q8_0 => q8_0_q8_0,
        IQ4_NL => iq4_nl_q8_0,
        MXFP4 => mxfp4_q8_0,
        Q2_K => q2_k_q8_k,
        Q3_K => q3_k_q8_k,
        Q4_K => q4_k_q8_k,
        Q5_K => q5_k_q8_k,
        Q6_K => q6_k_q8_k,
        IQ4_XS => iq4_xs_q8_k,
        _ => return None,
    })
}

/// Defines the safe wrapper `$name` around `$inner`, checking that `w` holds `n` elements of `$wty` and `a`
/// `n` elements of `$aty`, and that `n` is a multiple of `$bs`.
macro_rules! safe_wrapper {
    ($name:ident, $inner:ident, $bs:expr, $wsize:expr, $asize:expr) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = n / $bs;
            assert!(
                n.is_multiple_of($bs) && w.len() >= nb * $wsize && a.len() >= nb * $asize,
                concat!(stringify!($name), ": bad row lengths")
            );
            // SAFETY: the function pointer to this wrapper is only handed out by `vec_dot_fn`, which needs
            // an `Avx2` token (the CPU has AVX2, FMA and F16C); the lengths were checked just above, and
            // `$inner` reads only the first `nb` blocks of each slice.
            unsafe { $inner(nb, &w[..nb * $wsize], &a[..nb * $asize]) }
        }
    };
}

safe_wrapper!(f32_f32, f32_f32_avx2, 1, 4, 4);
safe_wrapper!(f16_f16, f16_f16_avx2, 1, 2, 2);
safe_wrapper!(q4_0_q8_0, q4_0_q8_0_avx2, QK, 18, 34);
safe_wrapper!(q4_1_q8_1, q4_1_q8_1_avx2, QK, 20, 36);
safe_wrapper!(q5_0_q8_0, q5_0_q8_0_avx2, QK, 22, 34);
safe_wrapper!(q8_0_q8_0, q8_0_q8_0_avx2, QK, 34, 34);
safe_wrapper!(q4_k_q8_k, q4_k_q8_k_avx2, QK_K, 144, 292);
safe_wrapper!(q6_k_q8_k, q6_k_q8_k_avx2, QK_K, 210, 292);
safe_wrapper!(bf16_bf16, bf16_bf16_avx2, 1, 2, 2);
safe_wrapper!(q5_1_q8_1, q5_1_q8_1_avx2, QK, 24, 36);
safe_wrapper!(iq4_nl_q8_0, iq4_nl_q8_0_avx2, QK, 18, 34);
safe_wrapper!(mxfp4_q8_0, mxfp4_q8_0_avx2, QK, 17, 34);
safe_wrapper!(q2_k_q8_k, q2_k_q8_k_avx2, QK_K, 84, 292);
safe_wrapper!(q3_k_q8_k, q3_k_q8_k_avx2, QK_K, 110, 292);
safe_wrapper!(q5_k_q8_k, q5_k_q8_k_avx2, QK_K, 176, 292);
safe_wrapper!(iq4_xs_q8_k, iq4_xs_q8_k_avx2, QK_K, 136, 292);

/// An f16 as f32 with the F16C instruction, inlined (the `half` crate's conversion detects the CPU on
/// every call).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h2f(x: F16Le) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        u16::from_le_bytes(x.0) as i32
    )))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_f32x8(x: __m256) -> f32 {
    let mut r = _mm256_extractf128_ps(x, 1);
    r = _mm_add_ps(r, _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_i32x8(x: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// 16 packed bytes → 32 nibbles: low nibbles in bytes 0..16, high nibbles in 16..32 (`bytes_from_nibbles_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32(p: &[u8; 16]) -> __m256i {
    // SAFETY: `p` is 16 readable bytes; the load is unaligned.
    let tmp = unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) };
    let bytes = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

/// 32 bits → 32 bytes, 0xFF where the bit is set (`bytes_from_bits_32`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits32(x: [u8; 4]) -> __m256i {
    let x32 = i32::from_le_bytes(x);
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Σ of unsigned × signed byte pairs, 4 elements per i32 lane (`maddubs` then `madd` by 1).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_us8(ax: __m256i, sy: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy))
}

/// Σ of signed × signed byte pairs as 8 float lanes (`mul_sum_i8_pairs_float`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_sum_i8_f32(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_cvtepi32_ps(mul_sum_us8(ax, sy))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(p: &[i8; 32]) -> __m256i {
    // SAFETY: `p` is 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

/// [`load32`] as a by-value copy, for the 4x4 tiles: there it beats `_mm256_loadu_si256`, whose
/// `copy_nonoverlapping` carries a run-time precondition check in debug-assertion builds (the dev profile),
/// while in the single-token kernels `loadu` is faster (measured: decode about 10 % slower with the copy).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32_copy(p: &[i8; 32]) -> __m256i {
    // SAFETY: both types are 32 plain bytes.
    unsafe { std::mem::transmute::<[i8; 32], __m256i>(*p) }
}

/// Element `i` of four slices given by their base pointers: `[&*p[0].add(i), …, &*p[3].add(i)]` (the
/// kernels over four rows or tokens use raw pointers: indexing four slices per block costs more than the
/// block's arithmetic).
///
/// # Safety
/// Every `p[t]` points to a slice of more than `i` elements that lives for `'a`.
#[inline(always)]
unsafe fn nth4<'a, T>(p: [*const T; 4], i: usize) -> [&'a T; 4] {
    // SAFETY: as the caller promises.
    p.map(|p| unsafe { &*p.add(i) })
}

/// [`nibbles32`] with a by-value copy for the load (see [`load32_copy`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32_copy(p: &[u8; 16]) -> __m256i {
    // SAFETY: both types are 16 plain bytes.
    let tmp = unsafe { std::mem::transmute::<[u8; 16], __m128i>(*p) };
    let bytes = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
    _mm256_and_si256(_mm256_set1_epi8(0x0F), bytes)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let (pw, pa) = (w.as_ptr() as *const f32, a.as_ptr() as *const f32);
    let mut i = 0;
    while i < n32 {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 ≤ n32 ≤ n, and both slices hold n f32s (checked by the wrapper).
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pw.add(i + 8 * k)),
                    _mm256_loadu_ps(pa.add(i + 8 * k)),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    for j in n32..n {
        let x = f32::from_le_bytes([w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]]);
        let y = f32::from_le_bytes([a[4 * j], a[4 * j + 1], a[4 * j + 2], a[4 * j + 3]]);
        sum += x * y;
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f16_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let (pw, pa) = (w.as_ptr(), a.as_ptr());
    let mut i = 0;
    while i < n32 {
        for (k, acc) in acc.iter_mut().enumerate() {
            let off = 2 * (i + 8 * k);
            // SAFETY: elements i + 8k .. i + 8k + 8 are inside the n halves (2n bytes) of each slice.
            let (x, y) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(pw.add(off) as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(pa.add(off) as *const __m128i)),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_f32x8(s);
    let (w16, a16): (&[F16Le], &[F16Le]) = (bytemuck::cast_slice(w), bytemuck::cast_slice(a));
    for j in n32..n {
        sum += h2f(w16[j]) * h2f(a16[j]);
    }
    sum
}

/// A Q4_0 block's 32 quants as signed bytes (the nibble minus 8).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_q4_0(x: &BlockQ4_0) -> __m256i {
    // SAFETY: the nibble field is 16 bytes long.
    _mm256_sub_epi8(unsafe { nibbles32(&x.qs) }, _mm256_set1_epi8(8))
}

/// A Q5_0 block's 32 quants as signed bytes: where the fifth bit is clear, 0xF0 is ORed into the nibble,
/// which is the 5-bit value minus 16 as an i8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_q5_0(x: &BlockQ5_0) -> __m256i {
    let hi = _mm256_andnot_si256(bits32(x.qh), _mm256_set1_epi8(0xF0u8 as i8));
    // SAFETY: the nibble field is 16 bytes long.
    _mm256_or_si256(unsafe { nibbles32(&x.qs) }, hi)
}

/// A Q8_0 block's 32 quants.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_q8_0(x: &BlockQ8_0) -> __m256i {
    // SAFETY: the quant field is 32 bytes long.
    unsafe { load32(&x.qs) }
}

/// Q4_0 with the arithmetic of ggml's repacked GEMV (see `scalar::q4_0_q8_0`): the exact integer sum of
/// each block, then one f32 fma chain.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_q8_0_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4_0] = bytemuck::cast_slice(w);
    let y: &[BlockQ8_0] = bytemuck::cast_slice(a);
    let mut acc = 0f32;
    for (x, y) in x.iter().zip(y) {
        // SAFETY: the block fields are 16 and 32 bytes long.
        let (qx, qy) = (decode_q4_0(x), unsafe { load32(&y.qs) });
        let sum = hsum_i32x8(mul_sum_us8(
            _mm256_sign_epi8(qx, qx),
            _mm256_sign_epi8(qy, qx),
        ));
        acc = (sum as f32).mul_add(h2f(x.d) * h2f(y.d), acc);
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4_1] = bytemuck::cast_slice(w);
    let y: &[BlockQ8_1] = bytemuck::cast_slice(a);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (x, y) in x.iter().zip(y) {
        summs += h2f(x.m) * h2f(y.s);
        let d = _mm256_set1_ps(h2f(x.d) * h2f(y.d));
        // SAFETY: the block fields are 16 and 32 bytes long.
        let (qx, qy) = unsafe { (nibbles32(&x.qs), load32(&y.qs)) };
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_sum_us8(qx, qy)), acc);
    }
    hsum_f32x8(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ5_0] = bytemuck::cast_slice(w);
    let y: &[BlockQ8_0] = bytemuck::cast_slice(a);
    let mut acc = _mm256_setzero_ps();
    for (x, y) in x.iter().zip(y) {
        let d = _mm256_set1_ps(h2f(x.d) * h2f(y.d));
        // SAFETY: the block fields are 16 and 32 bytes long.
        let (qx, qy) = (decode_q5_0(x), unsafe { load32(&y.qs) });
        acc = _mm256_fmadd_ps(d, mul_sum_i8_f32(qx, qy), acc);
    }
    hsum_f32x8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ8_0] = bytemuck::cast_slice(w);
    let y: &[BlockQ8_0] = bytemuck::cast_slice(a);
    let mut acc = _mm256_setzero_ps();
    for (x, y) in x.iter().zip(y) {
        let d = _mm256_set1_ps(h2f(x.d) * h2f(y.d));
        // SAFETY: both fields are 32 bytes long.
        let (qx, qy) = unsafe { (load32(&x.qs), load32(&y.qs)) };
        acc = _mm256_fmadd_ps(d, mul_sum_i8_f32(qx, qy), acc);
    }
    hsum_f32x8(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_q8_k_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ4K] = bytemuck::cast_slice(w);
    let y: &[BlockQ8K] = bytemuck::cast_slice(a);
    let m4 = _mm256_set1_epi8(0x0F);
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (x, y) in x.iter().zip(y) {
        let (sc, mn) = k4_scales_mins(&x.scales);
        let mut summs = 0i32;
        for g in 0..16 {
            summs += y.bsum(g) as i32 * mn[g / 2] as i32;
        }
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            // SAFETY: bytes 32j..32j+32 of the 128-byte `qs`, and 64j..64j+64 of the 256-byte `qs` of y.
            let (q4bits, q8l, q8h) = unsafe {
                (
                    _mm256_loadu_si256(x.qs.as_ptr().add(32 * j) as *const __m256i),
                    _mm256_loadu_si256(y.qs.as_ptr().add(64 * j) as *const __m256i),
                    _mm256_loadu_si256(y.qs.as_ptr().add(64 * j + 32) as *const __m256i),
                )
            };
            let q4l = _mm256_and_si256(q4bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
            let pl = _mm256_madd_epi16(
                _mm256_set1_epi16(sc[2 * j] as i16),
                _mm256_maddubs_epi16(q4l, q8l),
            );
            let ph = _mm256_madd_epi16(
                _mm256_set1_epi16(sc[2 * j + 1] as i16),
                _mm256_maddubs_epi16(q4h, q8h),
            );
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        let isum = hsum_i32x8(sumi);
        // The float arithmetic of ggml's repacked GEMV, as in the scalar twin.
        acc = (isum as f32).mul_add(h2f(x.d) * y.d(), acc);
        acc_min = (summs as f32).mul_add(h2f(x.dmin) * y.d(), acc_min);
    }
    acc - acc_min
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_q8_k_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    // A port of ggml's AVX2 `ggml_vec_dot_q6_K_q8_K` (unsigned quants, the −32 offset through the bsums,
    // eight f32 lanes accumulated per super-block): bit-identical to `scalar::q6_k_q8_k`.
    let x: &[BlockQ6K] = bytemuck::cast_slice(w);
    let y: &[BlockQ8K] = bytemuck::cast_slice(a);
    let m3 = _mm256_set1_epi8(3);
    let m15 = _mm256_set1_epi8(15);
    let mut acc = _mm256_setzero_ps();
    for (x, y) in x.iter().zip(y) {
        let d = _mm256_set1_ps(y.d() * h2f(x.d));
        // SAFETY: `bsums` is 16 i16 (32 bytes) and `scales` 16 bytes.
        let (q8sums, scales) = unsafe {
            (
                _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
                _mm_loadu_si128(x.scales.as_ptr() as *const __m128i),
            )
        };
        let q8sclsub =
            _mm256_slli_epi32(_mm256_madd_epi16(q8sums, _mm256_cvtepi8_epi16(scales)), 5);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            // SAFETY: `ql` has 128 bytes (64h..64h+64 read), `qh` 64 (32h..32h+32), y's `qs` 256
            // (128h..128h+128).
            let (b1, b2, bh, q8) = unsafe {
                let q8p = y.qs.as_ptr().add(128 * h);
                (
                    _mm256_loadu_si256(x.ql.as_ptr().add(64 * h) as *const __m256i),
                    _mm256_loadu_si256(x.ql.as_ptr().add(64 * h + 32) as *const __m256i),
                    _mm256_loadu_si256(x.qh.as_ptr().add(32 * h) as *const __m256i),
                    [
                        _mm256_loadu_si256(q8p as *const __m256i),
                        _mm256_loadu_si256(q8p.add(32) as *const __m256i),
                        _mm256_loadu_si256(q8p.add(64) as *const __m256i),
                        _mm256_loadu_si256(q8p.add(96) as *const __m256i),
                    ],
                )
            };
            let qh0 = _mm256_slli_epi16(_mm256_and_si256(bh, m3), 4);
            let qh1 = _mm256_slli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(12)), 2);
            let qh2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
            let qh3 = _mm256_srli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(-64)), 2);
            let q = [
                _mm256_or_si256(_mm256_and_si256(b1, m15), qh0),
                _mm256_or_si256(_mm256_and_si256(b2, m15), qh1),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m15), qh2),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m15), qh3),
            ];
            for k in 0..4 {
                let c = 4 * h + k;
                let s0 = x.scales[2 * c] as i16;
                let s1 = x.scales[2 * c + 1] as i16;
                let scale = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                let p = _mm256_madd_epi16(scale, _mm256_maddubs_epi16(q[k], q8[k]));
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        sumi = _mm256_sub_epi32(sumi, q8sclsub);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_f32x8(acc)
}

/// Eight bf16 values as f32 (the bits shifted left by 16: exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_bf16x8(p: *const u8) -> __m256 {
    // SAFETY: the caller passes a pointer to 16 readable bytes; the load is unaligned.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_bf16_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    // ggml_vec_dot_bf16's AVX2 path (vec.cpp): four 8-lane accumulators of `mul` then `add`, combined as
    // (c1 + c3) + (c2 + c4), a horizontal sum, then the tail.
    let mut c = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let (pw, pa) = (w.as_ptr(), a.as_ptr());
    let mut i = 0;
    while i < n32 {
        for (k, c) in c.iter_mut().enumerate() {
            let off = 2 * (i + 8 * k);
            // SAFETY: elements i + 8k .. i + 8k + 8 are inside the n bf16s (2n bytes) of each slice.
            let (x, y) = unsafe { (load_bf16x8(pw.add(off)), load_bf16x8(pa.add(off))) };
            *c = _mm256_add_ps(_mm256_mul_ps(x, y), *c);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(c[0], c[2]), _mm256_add_ps(c[1], c[3]));
    let mut sum = hsum_f32x8(s);
    let (w16, a16): (&[Bf16Le], &[Bf16Le]) = (bytemuck::cast_slice(w), bytemuck::cast_slice(a));
    for j in n32..n {
        sum += w16[j].get() * a16[j].get();
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_q8_1_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    // ggml's AVX2 `ggml_vec_dot_q5_1_q8_1`: unsigned 5-bit quants, `fma(Σ, d_w·d_a, acc)` per block, the min
    // terms summed apart and added after the horizontal sum.
    let x: &[BlockQ5_1] = bytemuck::cast_slice(w);
    let y: &[BlockQ8_1] = bytemuck::cast_slice(a);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (x, y) in x.iter().zip(y) {
        let dx = _mm256_set1_ps(h2f(x.d));
        summs += h2f(x.m) * h2f(y.s);
        let hi = _mm256_and_si256(bits32(x.qh), _mm256_set1_epi8(0x10));
        // SAFETY: the block fields are 16 and 32 bytes long.
        let (qx, qy) = unsafe { (_mm256_or_si256(nibbles32(&x.qs), hi), load32(&y.qs)) };
        let dy = _mm256_set1_ps(h2f(y.d));
        let q = _mm256_cvtepi32_ps(mul_sum_us8(qx, qy));
        acc = _mm256_fmadd_ps(q, _mm256_mul_ps(dx, dy), acc);
    }
    hsum_f32x8(acc) + summs
}

/// The 32 code-book values of a 16-byte nibble field: low nibbles (elements 0..16) in the low half, high
/// nibbles (16..32) in the high half, looked up with one `pshufb` each in `table`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lookup_nibbles(table: __m128i, qs: &[u8; 16]) -> __m256i {
    // SAFETY: `qs` is 16 readable bytes; the load is unaligned.
    let q = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
    let m4 = _mm_set1_epi8(0x0F);
    let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m4));
    let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
    _mm256_set_m128i(hi, lo)
}

/// Defines the AVX2 kernel `$name` of a 4-bit code-book type against Q8_0 with the float arithmetic of
/// ggml's repacked x86 GEMV (`gemv_q4_b32_8x8_q8_0_lut_avx`, `arch/x86/repack.cpp`, commit 0c1e570), which
/// llama.cpp uses for IQ4_NL and MXFP4 weights on AVX2 machines: per block the exact integer sum `Σ`, then
/// `acc = fma(Σ, d_w·d_a, acc)` in block order (one f32 chain per output, as each lane of ggml's GEMV).
macro_rules! codebook_q8_0 {
    ($name:ident, $block:ty, $table:expr, |$x:ident, $y:ident| $scale:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
            let xs: &[$block] = bytemuck::cast_slice(w);
            let ys: &[BlockQ8_0] = bytemuck::cast_slice(a);
            // SAFETY: the table is 16 bytes.
            let table = unsafe { _mm_loadu_si128($table.as_ptr() as *const __m128i) };
            let mut acc = 0f32;
            for ($x, $y) in xs.iter().zip(ys) {
                // SAFETY: the nibble and quant fields are 16 and 32 bytes long.
                let (qx, qy) = unsafe { (lookup_nibbles(table, &$x.qs), load32(&$y.qs)) };
                let sum = hsum_i32x8(mul_sum_us8(
                    _mm256_sign_epi8(qx, qx),
                    _mm256_sign_epi8(qy, qx),
                ));
                acc = (sum as f32).mul_add($scale, acc);
            }
            acc
        }
    };
}

codebook_q8_0!(iq4_nl_q8_0_avx2, BlockIq4Nl, KVALUES_IQ4NL, |x, y| h2f(x.d)
    * h2f(y.d));
codebook_q8_0!(
    mxfp4_q8_0_avx2,
    BlockMxfp4,
    KVALUES_MXFP4,
    |x, y| e8m0_to_fp32_half(x.e) * h2f(y.d)
);

/// Defines `$name`, the four-token kernel of a signed 32-quant type against Q8_0 whose single-token
/// kernel is `fma(Σ, scale_w·d_a, acc)` per block in block order (Q4_0 and the code-book types of
/// [`codebook_q8_0`]): per block the weights decoded once (`$qx`, after the optional `let $t = $init`
/// set-up) and the four exact sums at once, then four lanes of one 128-bit fma, each lane the
/// single-token kernel's scalar fma (bit-identical to it). `$wscale` is the block's weight scale as f32.
macro_rules! sign_fma_x4 {
    ($name:ident, $block:ty, |$x:ident| $qx:expr, $wscale:expr $(, let $t:ident = $init:expr)?) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let xs: &[$block] = bytemuck::cast_slice(w);
            let y: [&[BlockQ8_0]; 4] = a.map(bytemuck::cast_slice);
            assert!(y.iter().all(|y| y.len() >= xs.len()));
            $(let $t = $init;)?
            let mut acc = _mm_setzero_ps();
            for (i, $x) in xs.iter().enumerate() {
                let qx = $qx;
                let ax = _mm256_sign_epi8(qx, qx);
                let mut lanes = [_mm256_setzero_si256(); 4];
                for t in 0..4 {
                    // SAFETY: the field is 32 bytes long.
                    let qy = unsafe { load32(&y[t][i].qs) };
                    lanes[t] = mul_sum_us8(ax, _mm256_sign_epi8(qy, qx));
                }
                let sums = _mm_cvtepi32_ps(hsum4_i32x8(lanes));
                let d = _mm_mul_ps(
                    _mm_set1_ps($wscale),
                    h2f_x4([y[0][i].d, y[1][i].d, y[2][i].d, y[3][i].d]),
                );
                acc = _mm_fmadd_ps(sums, d, acc);
            }
            let mut out = [0f32; 4];
            // SAFETY: `out` is 16 writable bytes.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
            out
        }
    };
}

// SAFETY (the code-book set-ups and lookups): each table is 16 bytes, each nibble field 16 bytes.
sign_fma_x4!(
    iq4_nl_q8_0_x4_avx2,
    BlockIq4Nl,
    |x| unsafe { lookup_nibbles(table, &x.qs) },
    h2f(x.d),
    let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) }
);
sign_fma_x4!(
    mxfp4_q8_0_x4_avx2,
    BlockMxfp4,
    |x| unsafe { lookup_nibbles(table, &x.qs) },
    e8m0_to_fp32_half(x.e),
    let table = unsafe { _mm_loadu_si128(KVALUES_MXFP4.as_ptr() as *const __m128i) }
);

/// `v >> count` on 16-bit lanes (a run-time count).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn srl16(v: __m256i, count: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(count as i32))
}

/// A 256-bit vector whose low half is `lo` and high half `hi` in every 16-bit lane (the scales of two
/// consecutive 16-element groups).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_pair(lo: i16, hi: i16) -> __m256i {
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// Σ over 8 i32 lanes of `madd(bsums, m)`: Σ_g bsum[g]·m[g] for 16 i16 `m`, exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bsum_dot(y: &BlockQ8K, m: __m256i) -> i32 {
    // SAFETY: `bsums` is 16 i16 (32 bytes).
    let bsums = unsafe { std::mem::transmute::<[[u8; 2]; 16], __m256i>(y.bsums) };
    hsum_i32x8(_mm256_madd_epi16(bsums, m))
}

/// One super-block's weights decoded for the integer dot products of the k-quant kernels below: eight
/// 32-byte quant vectors `q` (element chunk `c` = elements 32c..32c+32, each byte unsigned, or for IQ4_XS the
/// signed code-book value), per chunk a second vector `h` (Q3_K: the `4` to subtract where the high bit is
/// clear; IQ4_XS: |q|), per chunk the i16 scales of its two 16-element halves `sc`, and the 16 i16 `mins`
/// against the bsums (Q2_K, Q5_K).
#[derive(Clone, Copy)]
struct KBlock {
    q: [__m256i; 8],
    h: [__m256i; 8],
    sc: [__m256i; 8],
    mins: __m256i,
}

/// `Σ_c madd(sc[c], maddubs(q[c], y_c))` as eight i32 lanes (lane `l` holds bytes `4l..4l+4` of every
/// chunk), exact (no i16 pair saturates for these quant ranges: |pair| ≤ 2·31·128).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn kblock_lanes_unsigned(k: &KBlock, y: &BlockQ8K, minus_h: bool) -> __m256i {
    let mut sumi = _mm256_setzero_si256();
    for c in 0..8 {
        // SAFETY: bytes 32c..32c+32 of the 256-byte `qs` of y.
        let q8 = unsafe { _mm256_loadu_si256(y.qs.as_ptr().add(32 * c) as *const __m256i) };
        let mut p = _mm256_maddubs_epi16(k.q[c], q8);
        if minus_h {
            p = _mm256_sub_epi16(p, _mm256_maddubs_epi16(k.h[c], q8));
        }
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(k.sc[c], p));
    }
    sumi
}

/// [`kblock_lanes_unsigned`] summed over the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn kblock_dot_unsigned(k: &KBlock, y: &BlockQ8K, minus_h: bool) -> i32 {
    hsum_i32x8(kblock_lanes_unsigned(k, y, minus_h))
}

/// Q2_K: `q` the 2-bit quants, `sc` the low scale nibbles, `mins` the high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_q2_k(x: &BlockQ2K) -> KBlock {
    let m3 = _mm256_set1_epi8(3);
    // SAFETY: `scales` is 16 plain bytes.
    let sc16 = unsafe { std::mem::transmute::<[u8; 16], __m128i>(x.scales) };
    let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc16, 4), _mm_set1_epi8(0xF)));
    let mut k = KBlock {
        q: [_mm256_setzero_si256(); 8],
        h: [_mm256_setzero_si256(); 8],
        sc: [_mm256_setzero_si256(); 8],
        mins,
    };
    for h in 0..2 {
        // SAFETY: bytes 32h..32h+32 of the 64-byte `qs`.
        let q2bits = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(32 * h) as *const __m256i) };
        for j in 0..4 {
            let (c, g) = (4 * h + j, 8 * h + 2 * j);
            k.q[c] = _mm256_and_si256(srl16(q2bits, 2 * j), m3);
            k.sc[c] = scale_pair((x.scales[g] & 0xF) as i16, (x.scales[g + 1] & 0xF) as i16);
        }
    }
    k
}

/// Q3_K: `q` the low 2 bits, `h` 4 where the high bit is clear, `sc` the 6-bit scales minus 32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_q3_k(x: &BlockQ3K) -> KBlock {
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let scales = q3k_scales(&x.scales);
    // SAFETY: `hmask` is 32 plain bytes.
    let hbits = unsafe { std::mem::transmute::<[u8; 32], __m256i>(x.hmask) };
    let mut k = KBlock {
        q: [_mm256_setzero_si256(); 8],
        h: [_mm256_setzero_si256(); 8],
        sc: [_mm256_setzero_si256(); 8],
        mins: _mm256_setzero_si256(),
    };
    for h in 0..2 {
        // SAFETY: bytes 32h..32h+32 of the 64-byte `qs`.
        let q3bits = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(32 * h) as *const __m256i) };
        for j in 0..4 {
            let (c, g) = (4 * h + j, 8 * h + 2 * j);
            k.q[c] = _mm256_and_si256(srl16(q3bits, 2 * j), m3);
            let bit = _mm256_set1_epi8((1u8 << c) as i8);
            let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bit), _mm256_setzero_si256());
            k.h[c] = _mm256_and_si256(clear, four);
            k.sc[c] = scale_pair(scales[g] as i16 - 32, scales[g + 1] as i16 - 32);
        }
    }
    k
}

/// Q5_K: `q` the 5-bit quants, `sc` the 6-bit scale of each 32-element chunk, `mins` per 16-group.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_q5_k(x: &BlockQ5K) -> KBlock {
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let (sc, mn) = k4_scales_mins(&x.scales);
    let mins: [i16; 16] = std::array::from_fn(|g| mn[g / 2] as i16);
    // SAFETY: `qh` is 32 plain bytes; `mins` 32 plain bytes.
    let (qh, mins) = unsafe {
        (
            std::mem::transmute::<[u8; 32], __m256i>(x.qh),
            std::mem::transmute::<[i16; 16], __m256i>(mins),
        )
    };
    let mut k = KBlock {
        q: [_mm256_setzero_si256(); 8],
        h: [_mm256_setzero_si256(); 8],
        sc: [_mm256_setzero_si256(); 8],
        mins,
    };
    for j in 0..4 {
        // SAFETY: bytes 32j..32j+32 of the 128-byte `qs`.
        let q4bits = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(32 * j) as *const __m256i) };
        let hl = _mm256_slli_epi16(_mm256_and_si256(srl16(qh, 2 * j), one), 4);
        let hh = _mm256_slli_epi16(_mm256_and_si256(srl16(qh, 2 * j + 1), one), 4);
        k.q[2 * j] = _mm256_or_si256(_mm256_and_si256(q4bits, m4), hl);
        k.q[2 * j + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4), hh);
        k.sc[2 * j] = _mm256_set1_epi16(sc[2 * j] as i16);
        k.sc[2 * j + 1] = _mm256_set1_epi16(sc[2 * j + 1] as i16);
    }
    k
}

/// IQ4_XS: `q` the signed code-book values, `h` their absolute values, `sc` the 6-bit scales minus 32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn decode_iq4_xs(x: &BlockIq4Xs) -> KBlock {
    // SAFETY: the table is 16 bytes.
    let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    let sh = u16::from_le_bytes(x.scales_h);
    let mut k = KBlock {
        q: [_mm256_setzero_si256(); 8],
        h: [_mm256_setzero_si256(); 8],
        sc: [_mm256_setzero_si256(); 8],
        mins: _mm256_setzero_si256(),
    };
    for ib in 0..8 {
        let ls = ((x.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) as i16
            | ((((sh >> (2 * ib)) & 3) as i16) << 4);
        let qs: &[u8; 16] = x.qs[16 * ib..16 * ib + 16].try_into().expect("16 bytes");
        // SAFETY: `qs` is 16 bytes.
        let qx = unsafe { lookup_nibbles(table, qs) };
        k.q[ib] = qx;
        k.h[ib] = _mm256_sign_epi8(qx, qx);
        k.sc[ib] = _mm256_set1_epi16(ls - 32);
    }
    k
}

/// IQ4_XS's exact integer sums as eight i32 lanes: `madd(maddubs(|q|, sign(y, q)), sc)` summed over the
/// chunks (no pair saturates: 2·127·127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn iq4_xs_lanes(k: &KBlock, y: &BlockQ8K) -> __m256i {
    let mut sumi = _mm256_setzero_si256();
    for c in 0..8 {
        // SAFETY: bytes 32c..32c+32 of the 256-byte `qs` of y.
        let q8 = unsafe { _mm256_loadu_si256(y.qs.as_ptr().add(32 * c) as *const __m256i) };
        let p16 = _mm256_maddubs_epi16(k.h[c], _mm256_sign_epi8(q8, k.q[c]));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, k.sc[c]));
    }
    sumi
}

/// Q2_K × Q8_K with the arithmetic of ggml's repacked GEMV (see `scalar::q2_k_q8_k`): exact super-block
/// sums, two f32 fma chains.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k_q8_k_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ2K] = bytemuck::cast_slice(w);
    let y: &[BlockQ8K] = bytemuck::cast_slice(a);
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (xb, yb) in x.iter().zip(y) {
        let k = decode_q2_k(xb);
        let isum = kblock_dot_unsigned(&k, yb, false);
        let summs = bsum_dot(yb, k.mins);
        acc = (isum as f32).mul_add(h2f(xb.d) * yb.d(), acc);
        acc_min = (summs as f32).mul_add(h2f(xb.dmin) * yb.d(), acc_min);
    }
    acc - acc_min
}

/// [`q2_k_q8_k_avx2`] for four tokens, each super-block decoded once; bit-identical per token.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k_q8_k_x4_avx2(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let x: &[BlockQ2K] = bytemuck::cast_slice(w);
    let ys: [&[BlockQ8K]; 4] = a.map(bytemuck::cast_slice);
    assert!(ys.iter().all(|y| y.len() >= x.len()));
    let (mut acc, mut acc_min) = ([0f32; 4], [0f32; 4]);
    for (i, xb) in x.iter().enumerate() {
        let k = decode_q2_k(xb);
        for t in 0..4 {
            let yb = &ys[t][i];
            let isum = kblock_dot_unsigned(&k, yb, false);
            let summs = bsum_dot(yb, k.mins);
            acc[t] = (isum as f32).mul_add(h2f(xb.d) * yb.d(), acc[t]);
            acc_min[t] = (summs as f32).mul_add(h2f(xb.dmin) * yb.d(), acc_min[t]);
        }
    }
    [0, 1, 2, 3].map(|t| acc[t] - acc_min[t])
}
/// Defines the single-token kernel `$x1` and the four-token kernel `$x4` of a k-quant type whose float step is
/// ggml's AVX2 eight-lane one (Q3_K, IQ4_XS: see their scalar twins): per super-block the eight exact i32
/// lanes of `$lanes`, `acc = fma(d·d8, lanes, acc)`, then `hsum_float_8`. The four-token kernel decodes each
/// super-block once; every result is bit-identical to the single-token kernel's.
macro_rules! lane_kernels {
    ($x1:ident, $x4:ident, $block:ty, $decode:ident, |$k:ident, $y:ident| $lanes:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $x1(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
            let x: &[$block] = bytemuck::cast_slice(w);
            let y: &[BlockQ8K] = bytemuck::cast_slice(a);
            let mut acc = _mm256_setzero_ps();
            for (xb, yb) in x.iter().zip(y) {
                let ($k, $y) = (&$decode(xb), yb);
                let d = _mm256_set1_ps(h2f(xb.d) * $y.d());
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps($lanes), acc);
            }
            hsum_f32x8(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $x4(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let x: &[$block] = bytemuck::cast_slice(w);
            let ys: [&[BlockQ8K]; 4] = a.map(bytemuck::cast_slice);
            assert!(ys.iter().all(|y| y.len() >= x.len()));
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, xb) in x.iter().enumerate() {
                let kb = $decode(xb);
                for t in 0..4 {
                    let ($k, $y) = (&kb, &ys[t][i]);
                    let d = _mm256_set1_ps(h2f(xb.d) * $y.d());
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps($lanes), acc[t]);
                }
            }
            [0, 1, 2, 3].map(|t| hsum_f32x8(acc[t]))
        }
    };
}

lane_kernels!(
    q3_k_q8_k_avx2,
    q3_k_q8_k_x4_avx2,
    BlockQ3K,
    decode_q3_k,
    |k, y| kblock_lanes_unsigned(k, y, true)
);

/// Q5_K × Q8_K with ggml's AVX2 arithmetic (see `scalar::q5_k_q8_k`): eight f32 lanes, one fused
/// multiply-add per super-block, the mins in a scalar FMA chain.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_q8_k_avx2(_nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let x: &[BlockQ5K] = bytemuck::cast_slice(w);
    let y: &[BlockQ8K] = bytemuck::cast_slice(a);
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for (xb, yb) in x.iter().zip(y) {
        let k = decode_q5_k(xb);
        let lanes = kblock_lanes_unsigned(&k, yb, false);
        let mins = bsum_dot(yb, k.mins);
        let d = yb.d() * h2f(xb.d);
        let dmin = -yb.d() * h2f(xb.dmin);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc);
        summs = dmin.mul_add(mins as f32, summs);
    }
    hsum_f32x8(acc) + summs
}

/// [`q5_k_q8_k_avx2`] for four tokens, each super-block decoded once; bit-identical per token.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_q8_k_x4_avx2(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let x: &[BlockQ5K] = bytemuck::cast_slice(w);
    let ys: [&[BlockQ8K]; 4] = a.map(bytemuck::cast_slice);
    assert!(ys.iter().all(|y| y.len() >= x.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for (i, xb) in x.iter().enumerate() {
        let k = decode_q5_k(xb);
        for t in 0..4 {
            let yb = &ys[t][i];
            let lanes = kblock_lanes_unsigned(&k, yb, false);
            let mins = bsum_dot(yb, k.mins);
            let d = yb.d() * h2f(xb.d);
            let dmin = -yb.d() * h2f(xb.dmin);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(lanes), acc[t]);
            summs[t] = dmin.mul_add(mins as f32, summs[t]);
        }
    }
    [0, 1, 2, 3].map(|t| hsum_f32x8(acc[t]) + summs[t])
}
lane_kernels!(
    iq4_xs_q8_k_avx2,
    iq4_xs_q8_k_x4_avx2,
    BlockIq4Xs,
    decode_iq4_xs,
    |k, y| iq4_xs_lanes(k, y)
);

/// Four-token kernels for prompt processing: one weight row against four activation rows, each weight block
/// decoded once. Every output is computed with exactly the operations of the single-token kernel of the same
/// type (same per-block products, same lane accumulation, same horizontal sum), so results are bit-identical
/// to four single calls: batching never changes a token's numbers.
pub fn vec_dot4_fn(_proof: Avx2, ty: GgmlType) -> Option<VecDot4Fn> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 => q4_0_q8_0_x4,
        Q4_1 => q4_1_q8_1_x4,
        Q5_0 => q5_0_q8_0_x4,
        Q8_0 => q8_0_q8_0_x4,
        Q4_K => q4_k_q8_k_x4,
        Q6_K => q6_k_q8_k_x4,
        Q2_K => q2_k_q8_k_x4,
        Q3_K => q3_k_q8_k_x4,
        Q5_K => q5_k_q8_k_x4,
        IQ4_XS => iq4_xs_q8_k_x4,
        Q5_1 => q5_1_q8_1_x4,
        IQ4_NL => iq4_nl_q8_0_x4,
        MXFP4 => mxfp4_q8_0_x4,
        _ => return None,
    })
}

macro_rules! safe_wrapper4 {
    ($name:ident, $inner:ident, $wsize:expr, $asize:expr) => {
        safe_wrapper4!($name, $inner, QK, $wsize, $asize);
    };
    ($name:ident, $inner:ident, $bs:expr, $wsize:expr, $asize:expr) => {
        fn $name(n: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let nb = n / $bs;
            assert!(
                n.is_multiple_of($bs)
                    && w.len() >= nb * $wsize
                    && a.iter().all(|a| a.len() >= nb * $asize),
                concat!(stringify!($name), ": bad row lengths")
            );
            // SAFETY: handed out only by `vec_dot4_fn` / `vec_dot4_fn_vnni`, which need an `Avx2` / `Vnni`
            // token for `$inner`'s features; lengths checked above, and `$inner` reads only the first `nb`
            // blocks of each slice.
            unsafe { $inner(&w[..nb * $wsize], a.map(|a| &a[..nb * $asize])) }
        }
    };
}

safe_wrapper4!(q4_0_q8_0_x4, q4_0_q8_0_x4_avx2, 18, 34);
safe_wrapper4!(q4_1_q8_1_x4, q4_1_q8_1_x4_avx2, 20, 36);
safe_wrapper4!(q5_0_q8_0_x4, q5_0_q8_0_x4_avx2, 22, 34);
safe_wrapper4!(q8_0_q8_0_x4, q8_0_q8_0_x4_avx2, 34, 34);
safe_wrapper4!(q4_k_q8_k_x4, q4_k_q8_k_x4_avx2, QK_K, 144, 292);
safe_wrapper4!(q6_k_q8_k_x4, q6_k_q8_k_x4_avx2, QK_K, 210, 292);
safe_wrapper4!(q2_k_q8_k_x4, q2_k_q8_k_x4_avx2, QK_K, 84, 292);
safe_wrapper4!(q3_k_q8_k_x4, q3_k_q8_k_x4_avx2, QK_K, 110, 292);
safe_wrapper4!(q5_k_q8_k_x4, q5_k_q8_k_x4_avx2, QK_K, 176, 292);
safe_wrapper4!(iq4_xs_q8_k_x4, iq4_xs_q8_k_x4_avx2, QK_K, 136, 292);
safe_wrapper4!(q5_1_q8_1_x4, q5_1_q8_1_x4_avx2, 24, 36);
safe_wrapper4!(iq4_nl_q8_0_x4, iq4_nl_q8_0_x4_avx2, 18, 34);
safe_wrapper4!(mxfp4_q8_0_x4, mxfp4_q8_0_x4_avx2, 17, 34);

/// The four i32 sums of `v[0..4]` (lane t = Σ of the eight lanes of `v[t]`), exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum4_i32x8(v: [__m256i; 4]) -> __m128i {
    let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1))
}

/// `acc + madd(a, b)` (sum of adjacent i16 products into i32 lanes, exact): AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn madd_acc_avx2(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// `acc + madd(a, b)` in one `vpdpwssd` (the same exact integers): AVX-512 VNNI.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn madd_acc_vnni(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, a, b)
}

/// Defines `$name`, [`q4_k_q8_k_avx2`] for four tokens with the features `$feat`: the nibbles, scales and mins
/// of a super-block are decoded once; each token's integer sums are exact (so their grouping is free: they
/// are reduced four tokens at a time) and its float steps are the single-token kernel's, in the same order,
/// done in four f32 lanes (one per token).
macro_rules! q4_k_x4 {
    ($name:ident, $feat:literal, $madd_acc:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let x: &[BlockQ4K] = bytemuck::cast_slice(w);
            let y: [&[BlockQ8K]; 4] = a.map(bytemuck::cast_slice);
            assert!(y.iter().all(|y| y.len() >= x.len()));
            let yp = y.map(|y| y.as_ptr());
            let m4 = _mm256_set1_epi8(0x0F);
            let (mut acc, mut acc_min) = (_mm_setzero_ps(), _mm_setzero_ps());
            for (i, xb) in x.iter().enumerate() {
                // SAFETY: i < x.len() ≤ every y[t].len() (asserted above).
                let yb = unsafe { nth4(yp, i) };
                let (sc, mn) = k4_scales_mins(&xb.scales);
                // min[g / 2] for the 16 groups of 16, against the 16 bsums: Σ bsum·min in exact i32 lanes.
                let mins: [i16; 16] = std::array::from_fn(|g| mn[g / 2] as i16);
                // SAFETY: both are 32 plain bytes.
                let mins = unsafe { std::mem::transmute::<[i16; 16], __m256i>(mins) };
                let mut sumi = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    // SAFETY: bytes 32j..32j+32 of the 128-byte `qs`.
                    let q4bits =
                        unsafe { _mm256_loadu_si256(xb.qs.as_ptr().add(32 * j) as *const __m256i) };
                    let q4l = _mm256_and_si256(q4bits, m4);
                    let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
                    let (sl, sh) = (
                        _mm256_set1_epi16(sc[2 * j] as i16),
                        _mm256_set1_epi16(sc[2 * j + 1] as i16),
                    );
                    for t in 0..4 {
                        let yq = yb[t].qs.as_ptr();
                        // SAFETY: bytes 64j..64j+64 of the 256-byte `qs` of token t's block.
                        let (q8l, q8h) = unsafe {
                            (
                                _mm256_loadu_si256(yq.add(64 * j) as *const __m256i),
                                _mm256_loadu_si256(yq.add(64 * j + 32) as *const __m256i),
                            )
                        };
                        sumi[t] = $madd_acc(sumi[t], sl, _mm256_maddubs_epi16(q4l, q8l));
                        sumi[t] = $madd_acc(sumi[t], sh, _mm256_maddubs_epi16(q4h, q8h));
                    }
                }
                let summs = hsum4_i32x8([0, 1, 2, 3].map(|t| {
                    // SAFETY: `bsums` is 16 i16 (32 bytes).
                    let bsums =
                        unsafe { std::mem::transmute::<[[u8; 2]; 16], __m256i>(yb[t].bsums) };
                    _mm256_madd_epi16(bsums, mins)
                }));
                let isum = hsum4_i32x8(sumi);
                let yd = _mm_setr_ps(yb[0].d(), yb[1].d(), yb[2].d(), yb[3].d());
                // Lane t: the single-token kernel's `fma(isum, d·d8, acc)` and `fma(summs, dmin·d8, acc_min)`.
                let d = _mm_mul_ps(_mm_set1_ps(h2f(xb.d)), yd);
                let dmin = _mm_mul_ps(_mm_set1_ps(h2f(xb.dmin)), yd);
                acc = _mm_fmadd_ps(_mm_cvtepi32_ps(isum), d, acc);
                acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(summs), dmin, acc_min);
            }
            let mut out = [0f32; 4];
            // SAFETY: `out` is 4 writable f32s; the store is unaligned.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_sub_ps(acc, acc_min)) };
            out
        }
    };
}

q4_k_x4!(q4_k_q8_k_x4_avx2, "avx2,fma,f16c", madd_acc_avx2);
q4_k_x4!(
    q4_k_x4_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    madd_acc_vnni
);

/// Defines `$name`, [`q6_k_q8_k_avx2`] for four tokens with the features `$feat`: the 6-bit quants and scales
/// of a super-block are decoded once; each token's eight i32 lanes hold the same exact sums as in the
/// single-token kernel and go through the same float lane accumulation and horizontal sum.
macro_rules! q6_k_x4 {
    ($name:ident, $feat:literal, $madd_acc:ident) => {
        #[target_feature(enable = $feat)]
        unsafe fn $name(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let x: &[BlockQ6K] = bytemuck::cast_slice(w);
            let y: [&[BlockQ8K]; 4] = a.map(bytemuck::cast_slice);
            assert!(y.iter().all(|y| y.len() >= x.len()));
            let yp = y.map(|y| y.as_ptr());
            let m3 = _mm256_set1_epi8(3);
            let m15 = _mm256_set1_epi8(15);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, xb) in x.iter().enumerate() {
                // SAFETY: i < x.len() ≤ every y[t].len() (asserted above).
                let yb = unsafe { nth4(yp, i) };
                // SAFETY: both are 16 plain bytes.
                let scales = unsafe { std::mem::transmute::<[i8; 16], __m128i>(xb.scales) };
                let scales16 = _mm256_cvtepi8_epi16(scales);
                let mut sumi = [_mm256_setzero_si256(); 4];
                for h in 0..2 {
                    // SAFETY: `ql` has 128 bytes (64h..64h+64 read), `qh` 64 (32h..32h+32).
                    let (b1, b2, bh) = unsafe {
                        (
                            _mm256_loadu_si256(xb.ql.as_ptr().add(64 * h) as *const __m256i),
                            _mm256_loadu_si256(xb.ql.as_ptr().add(64 * h + 32) as *const __m256i),
                            _mm256_loadu_si256(xb.qh.as_ptr().add(32 * h) as *const __m256i),
                        )
                    };
                    let qh0 = _mm256_slli_epi16(_mm256_and_si256(bh, m3), 4);
                    let qh1 = _mm256_slli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(12)), 2);
                    let qh2 = _mm256_and_si256(bh, _mm256_set1_epi8(48));
                    let qh3 = _mm256_srli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(-64)), 2);
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(b1, m15), qh0),
                        _mm256_or_si256(_mm256_and_si256(b2, m15), qh1),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m15), qh2),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m15), qh3),
                    ];
                    for (k, &qk) in q.iter().enumerate() {
                        let c = 4 * h + k;
                        let s0 = xb.scales[2 * c] as i16;
                        let s1 = xb.scales[2 * c + 1] as i16;
                        let scale = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                        for t in 0..4 {
                            // SAFETY: bytes 32c..32c+32 of the 256-byte `qs` of token t's block.
                            let q8 = unsafe {
                                _mm256_loadu_si256(yb[t].qs.as_ptr().add(32 * c) as *const __m256i)
                            };
                            sumi[t] = $madd_acc(sumi[t], scale, _mm256_maddubs_epi16(qk, q8));
                        }
                    }
                }
                let dx = h2f(xb.d);
                for t in 0..4 {
                    // SAFETY: both are 32 plain bytes.
                    let q8sums =
                        unsafe { std::mem::transmute::<[[u8; 2]; 16], __m256i>(yb[t].bsums) };
                    let q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales16), 5);
                    let d = _mm256_set1_ps(yb[t].d() * dx);
                    let lanes = _mm256_sub_epi32(sumi[t], q8sclsub);
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[t]);
                }
            }
            let mut out = [0f32; 4];
            for t in 0..4 {
                out[t] = hsum_f32x8(acc[t]);
            }
            out
        }
    };
}

q6_k_x4!(q6_k_q8_k_x4_avx2, "avx2,fma,f16c", madd_acc_avx2);
q6_k_x4!(
    q6_k_x4_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    madd_acc_vnni
);

/// The shared body of the signed 32-block kernels: `decode(block)` gives the weight block's 32 signed
/// quants; each token accumulates `fma(d_w·d_a, Σ pairs, acc)` as the single-token kernels do.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signed_x4<B: bytemuck::Pod>(
    w: &[u8],
    a: [&[u8]; 4],
    d_of: impl Fn(&B) -> F16Le,
    decode: impl Fn(&B) -> __m256i,
) -> [f32; 4] {
    let x: &[B] = bytemuck::cast_slice(w);
    let y: [&[BlockQ8_0]; 4] = a.map(bytemuck::cast_slice);
    let mut acc = [_mm256_setzero_ps(); 4];
    for (i, xb) in x.iter().enumerate() {
        let qx = decode(xb);
        let ax = _mm256_sign_epi8(qx, qx);
        let dx = h2f(d_of(xb));
        for t in 0..4 {
            let yb = &y[t][i];
            let d = _mm256_set1_ps(dx * h2f(yb.d));
            // SAFETY: the field is 32 bytes long.
            let qy = unsafe { load32(&yb.qs) };
            let sy = _mm256_sign_epi8(qy, qx);
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_sum_us8(ax, sy)), acc[t]);
        }
    }
    [0, 1, 2, 3].map(|t| hsum_f32x8(acc[t]))
}

sign_fma_x4!(q4_0_q8_0_x4_avx2, BlockQ4_0, |x| decode_q4_0(x), h2f(x.d));

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0_x4_avx2(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    // SAFETY: forwarded from the checked wrapper (row lengths checked, CPU features proven).
    unsafe { signed_x4::<BlockQ5_0>(w, a, |x| x.d, |x| decode_q5_0(x)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0_x4_avx2(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    // SAFETY: forwarded from the checked wrapper (row lengths checked, CPU features proven).
    unsafe { signed_x4::<BlockQ8_0>(w, a, |x| x.d, |x| decode_q8_0(x)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1_x4_avx2(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let x: &[BlockQ4_1] = bytemuck::cast_slice(w);
    let y: [&[BlockQ8_1]; 4] = a.map(bytemuck::cast_slice);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for (i, xb) in x.iter().enumerate() {
        // SAFETY: the nibble field is 16 bytes.
        let qx = unsafe { nibbles32(&xb.qs) };
        let (dx, mx) = (h2f(xb.d), h2f(xb.m));
        for t in 0..4 {
            let yb = &y[t][i];
            summs[t] += mx * h2f(yb.s);
            let d = _mm256_set1_ps(dx * h2f(yb.d));
            // SAFETY: the field is 32 bytes long.
            let qy = unsafe { load32(&yb.qs) };
            acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(mul_sum_us8(qx, qy)), acc[t]);
        }
    }
    [0, 1, 2, 3].map(|t| hsum_f32x8(acc[t]) + summs[t])
}

/// [`q5_1_q8_1_avx2`] for four tokens: the block's 5-bit quants decoded once, each token's lane the
/// single-token kernel's arithmetic (bit-identical).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_q8_1_x4_avx2(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let x: &[BlockQ5_1] = bytemuck::cast_slice(w);
    let y: [&[BlockQ8_1]; 4] = a.map(bytemuck::cast_slice);
    assert!(y.iter().all(|y| y.len() >= x.len()));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for (i, xb) in x.iter().enumerate() {
        let hi = _mm256_and_si256(bits32(xb.qh), _mm256_set1_epi8(0x10));
        // SAFETY: the nibble field is 16 bytes.
        let qx = _mm256_or_si256(unsafe { nibbles32(&xb.qs) }, hi);
        let (dx, mx) = (h2f(xb.d), h2f(xb.m));
        for t in 0..4 {
            let yb = &y[t][i];
            summs[t] += mx * h2f(yb.s);
            let d = _mm256_set1_ps(dx * h2f(yb.d));
            // SAFETY: the field is 32 bytes long.
            let qy = unsafe { load32(&yb.qs) };
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mul_sum_us8(qx, qy)), d, acc[t]);
        }
    }
    [0, 1, 2, 3].map(|t| hsum_f32x8(acc[t]) + summs[t])
}

// ---- AVX-512 VNNI variants (`vpdpbusd` on 256-bit vectors) of the signed 32-block kernels -------------------

/// Proof that this CPU also has AVX-512 (`avx512f`) with VNNI (`avx512vnni`) and 256-bit forms (`avx512vl`).
#[derive(Clone, Copy, Debug)]
pub struct Vnni(());

impl Vnni {
    /// The token, when the CPU has AVX2, FMA, F16C, AVX512F, AVX512-VNNI and AVX512-VL.
    pub fn detect() -> Option<Self> {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        let has = *HAS.get_or_init(|| {
            Avx2::detect().is_some()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
        });
        has.then_some(Vnni(()))
    }
}

/// The VNNI single-token kernel for `ty` (Q5_0, Q8_0), bit-identical to the AVX2 one.
pub fn vec_dot_fn_vnni(_proof: Vnni, ty: GgmlType) -> Option<VecDotFn> {
    use GgmlType::*;
    Some(match ty {
        Q5_0 => q5_0_q8_0_vnni,
        Q8_0 => q8_0_q8_0_vnni,
        _ => return None,
    })
}

/// The VNNI four-token kernel for `ty` (Q5_0, Q8_0, Q4_K, Q6_K), bit-identical to the AVX2 one. (Q4_0's fma
/// chain needs a horizontal sum per block, which `vpdpbusd` does not shorten: its AVX2 kernels run.)
pub fn vec_dot4_fn_vnni(_proof: Vnni, ty: GgmlType) -> Option<VecDot4Fn> {
    use GgmlType::*;
    Some(match ty {
        Q5_0 => q5_0_q8_0_x4_vnni,
        Q8_0 => q8_0_q8_0_x4_vnni,
        Q4_K => q4_k_q8_k_x4_vnni,
        Q6_K => q6_k_q8_k_x4_vnni,
        _ => return None,
    })
}

safe_wrapper4!(q4_k_q8_k_x4_vnni, q4_k_x4_vnni, QK_K, 144, 292);
safe_wrapper4!(q6_k_q8_k_x4_vnni, q6_k_x4_vnni, QK_K, 210, 292);

/// Σ of unsigned × signed byte pairs per 4-byte lane in one instruction: the same integers as
/// [`mul_sum_us8`] (its 16-bit intermediate never saturates for these quant ranges: |pair| ≤ 2·128·127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn mul_sum_us8_vnni(ax: __m256i, sy: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
}

macro_rules! vnni_kernels {
    ($x1:ident, $x1_inner:ident, $x4:ident, $x4_inner:ident, $block:ty, $wsize:expr, |$b:ident| $decode:expr) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        unsafe fn $x1_inner(w: &[u8], a: &[u8]) -> f32 {
            let x: &[$block] = bytemuck::cast_slice(w);
            let y: &[BlockQ8_0] = bytemuck::cast_slice(a);
            let mut acc = _mm256_setzero_ps();
            for (xb, yb) in x.iter().zip(y) {
                let $b = xb;
                // SAFETY: the activation block's quant field is 32 bytes long.
                let (qx, qy) = ($decode, unsafe { load32(&yb.qs) });
                let d = _mm256_set1_ps(h2f(xb.d) * h2f(yb.d));
                let p = mul_sum_us8_vnni(_mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx));
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
            }
            hsum_f32x8(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        unsafe fn $x4_inner(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let x: &[$block] = bytemuck::cast_slice(w);
            let y: [&[BlockQ8_0]; 4] = a.map(bytemuck::cast_slice);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (i, xb) in x.iter().enumerate() {
                let $b = xb;
                let qx = $decode;
                let ax = _mm256_sign_epi8(qx, qx);
                let dx = h2f(xb.d);
                for t in 0..4 {
                    let yb = &y[t][i];
                    let d = _mm256_set1_ps(dx * h2f(yb.d));
                    // SAFETY: the field is 32 bytes long.
                    let qy = unsafe { load32(&yb.qs) };
                    let p = mul_sum_us8_vnni(ax, _mm256_sign_epi8(qy, qx));
                    acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[t]);
                }
            }
            [0, 1, 2, 3].map(|t| hsum_f32x8(acc[t]))
        }

        fn $x1(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = n / QK;
            assert!(
                n.is_multiple_of(QK) && w.len() >= nb * $wsize && a.len() >= nb * 34,
                concat!(stringify!($x1), ": bad row lengths")
            );
            // SAFETY: handed out only by `vec_dot_fn_vnni`, which needs a `Vnni` token; lengths checked.
            unsafe { $x1_inner(&w[..nb * $wsize], &a[..nb * 34]) }
        }

        fn $x4(n: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let nb = n / QK;
            assert!(
                n.is_multiple_of(QK)
                    && w.len() >= nb * $wsize
                    && a.iter().all(|a| a.len() >= nb * 34),
                concat!(stringify!($x4), ": bad row lengths")
            );
            // SAFETY: handed out only by `vec_dot4_fn_vnni`, which needs a `Vnni` token; lengths checked.
            unsafe { $x4_inner(&w[..nb * $wsize], a.map(|a| &a[..nb * 34])) }
        }
    };
}

vnni_kernels!(
    q5_0_q8_0_vnni,
    q5_0_x1_vnni,
    q5_0_q8_0_x4_vnni,
    q5_0_x4_vnni,
    BlockQ5_0,
    22,
    |b| decode_q5_0(b)
);
vnni_kernels!(
    q8_0_q8_0_vnni,
    q8_0_x1_vnni,
    q8_0_q8_0_x4_vnni,
    q8_0_x4_vnni,
    BlockQ8_0,
    34,
    |b| decode_q8_0(b)
);

// ---- 4 weight rows x 4 tokens tiles (VNNI) for prompt processing ---------------------------------------------

/// The VNNI tile kernel for `ty` (Q4_1, Q5_0, Q8_0; Q4_0 uses the four-token kernel, whose fma chain a tile does not pay for): four weight rows against four tokens, each of the
/// 16 results bit-identical to the single-token kernel on that row and token.
pub fn vec_dot4x4_fn_vnni(_proof: Vnni, ty: GgmlType) -> Option<VecDot4x4Fn> {
    use GgmlType::*;
    Some(match ty {
        Q4_1 => q4_1_q8_1_4x4_vnni,
        Q5_0 => q5_0_q8_0_4x4_vnni,
        Q8_0 => q8_0_q8_0_4x4_vnni,
        _ => return None,
    })
}

macro_rules! safe_wrapper4x4 {
    ($name:ident, $inner:ident, $wsize:expr, $asize:expr) => {
        fn $name(n: usize, w: [&[u8]; 4], a: [&[u8]; 4]) -> [[f32; 4]; 4] {
            let nb = n / QK;
            assert!(
                n.is_multiple_of(QK)
                    && w.iter().all(|w| w.len() >= nb * $wsize)
                    && a.iter().all(|a| a.len() >= nb * $asize),
                concat!(stringify!($name), ": bad row lengths")
            );
            // SAFETY: handed out only by `vec_dot4x4_fn_vnni`, which needs a `Vnni` token; lengths checked
            // above, and `$inner` reads only the first `nb` blocks of each slice.
            unsafe {
                $inner(
                    nb,
                    w.map(|w| &w[..nb * $wsize]),
                    a.map(|a| &a[..nb * $asize]),
                )
            }
        }
    };
}

safe_wrapper4x4!(q5_0_q8_0_4x4_vnni, q5_0_4x4_vnni, 22, 34);
safe_wrapper4x4!(q8_0_q8_0_4x4_vnni, q8_0_4x4_vnni, 34, 34);
safe_wrapper4x4!(q4_1_q8_1_4x4_vnni, q4_1_4x4_vnni, 20, 36);

/// Four f16 scales as four f32 lanes (one F16C conversion; each lane is exactly [`h2f`] of its input).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h2f_x4(d: [F16Le; 4]) -> __m128 {
    let b = |k: usize| u16::from_le_bytes(d[k].0) as u64;
    let packed = b(0) | b(1) << 16 | b(2) << 32 | b(3) << 48;
    _mm_cvtph_ps(_mm_set_epi64x(0, packed as i64))
}

/// Two 256-bit vectors as the low and high halves of one 512-bit vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
fn join512(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Four tokens' 32 activation quants as two 512-bit vectors: tokens 0 and 1, then 2 and 3.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
fn quants_pairs(qs: [&[i8; 32]; 4]) -> [__m512i; 2] {
    // SAFETY: each field is 32 readable bytes.
    let q = qs.map(|q| unsafe { load32_copy(q) });
    [join512(q[0], q[1]), join512(q[2], q[3])]
}

/// The low and high 256-bit halves of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
fn halves(v: __m512) -> [__m256; 2] {
    [
        _mm512_castps512_ps256(v),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
    ]
}

/// The 16 scale products of a 4 x 4 tile, lane `4r + t` = `dx[r] · dy[t]` (one f32 multiplication each,
/// as in the single-token kernels).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
fn scale_products(dx: __m128, dy: __m128) -> __m512 {
    let rows = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    _mm512_mul_ps(
        _mm512_permutexvar_ps(rows, _mm512_castps128_ps512(dx)),
        _mm512_broadcast_f32x4(dy),
    )
}

/// Lane `k` of `v` broadcast to the low half and lane `k + 1` to the high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
fn splat_pair(v: __m512, k: i32) -> __m512 {
    let h = k + 1;
    _mm512_permutexvar_ps(
        _mm512_set_epi32(h, h, h, h, h, h, h, h, k, k, k, k, k, k, k, k),
        v,
    )
}

/// Defines the 32-block tile kernel `$name` for blocks `$block` of signed quants `x`, given as the unsigned
/// bytes `x + $off` by `$decode`. Each (row, token) pair's lane sums are `Σ (x + off)·y − off·Σ y` over the
/// lane's four elements in one `vpdpbusd` (started from `−off·Σ y`, computed once per token and block): the
/// same exact integers as the single-token kernels' `Σ |x|·sign(y, x)`. Two tokens share each 512-bit
/// instruction (token `2p` in the low half, `2p + 1` in the high half), so each 32-bit lane does the
/// single-token kernel's lane operations: per block `fma(d_w·d_a, Σ, acc)`, in block order, then the same
/// horizontal sum of its eight lanes. Per block, each token's quants are loaded once and each row's decoded
/// once. A macro rather than a generic function with closures, so that the decoder is inlined.
macro_rules! offset_4x4_vnni {
    ($name:ident, $block:ty, $off:expr, |$b:ident| $decode:expr) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
        unsafe fn $name(nb: usize, w: [&[u8]; 4], a: [&[u8]; 4]) -> [[f32; 4]; 4] {
            let x: [&[$block]; 4] = w.map(bytemuck::cast_slice);
            let y: [&[BlockQ8_0]; 4] = a.map(bytemuck::cast_slice);
            assert!(x.iter().all(|x| x.len() >= nb) && y.iter().all(|y| y.len() >= nb));
            // Raw pointers: indexing four slices per block costs more than the block's arithmetic.
            let (xp, yp) = (x.map(|x| x.as_ptr()), y.map(|y| y.as_ptr()));
            let off = _mm512_set1_epi8($off as u8 as i8);
            let mut acc = [[_mm512_setzero_ps(); 2]; 4];
            for i in 0..nb {
                // SAFETY: i < nb and every slice holds at least nb blocks (asserted above).
                let yb = unsafe { nth4(yp, i) };
                // SAFETY: i < nb and every slice holds at least nb blocks (asserted above).
                let xb = unsafe { nth4(xp, i) };
                let dxy = scale_products(
                    h2f_x4([xb[0].d, xb[1].d, xb[2].d, xb[3].d]),
                    h2f_x4([yb[0].d, yb[1].d, yb[2].d, yb[3].d]),
                );
                let qy = quants_pairs(yb.map(|b| &b.qs));
                let zero = _mm512_setzero_si512();
                let bias = qy.map(|q| _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, off, q)));
                for r in 0..4 {
                    let $b = xb[r];
                    let xu = _mm512_broadcast_i64x4($decode);
                    for p in 0..2 {
                        let sum = _mm512_dpbusd_epi32(bias[p], xu, qy[p]);
                        let d = splat_pair(dxy, 4 * r as i32 + 2 * p as i32);
                        acc[r][p] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), acc[r][p]);
                    }
                }
            }
            let mut out = [[0f32; 4]; 4];
            for r in 0..4 {
                for p in 0..2 {
                    let [lo, hi] = halves(acc[r][p]);
                    out[r][2 * p] = hsum_f32x8(lo);
                    out[r][2 * p + 1] = hsum_f32x8(hi);
                }
            }
            out
        }
    };
}

// Q5_0: the 5-bit value is x + 16. Q8_0: x + 128 is x with its top bit flipped.
offset_4x4_vnni!(q5_0_4x4_vnni, BlockQ5_0, 16, |b| _mm256_or_si256(
    // SAFETY: the nibble field is 16 bytes long.
    unsafe { nibbles32_copy(&b.qs) },
    _mm256_and_si256(bits32(b.qh), _mm256_set1_epi8(0x10))
));
offset_4x4_vnni!(q8_0_4x4_vnni, BlockQ8_0, 128, |b| _mm256_xor_si256(
    decode_q8_0(b),
    _mm256_set1_epi8(-128)
));

/// The Q4_1 tile: unsigned nibbles against signed activations in one `vpdpbusd` (the integers of
/// [`mul_sum_us8`]), two tokens per 512-bit instruction as in `offset_4x4_vnni`; per (row, token) the float
/// steps of [`q4_1_q8_1_avx2`]: `fma(d_w·d_a, Σ, acc)` lanes and a separate `summs += m_w·s_a`, added after
/// the horizontal sum.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl")]
unsafe fn q4_1_4x4_vnni(nb: usize, w: [&[u8]; 4], a: [&[u8]; 4]) -> [[f32; 4]; 4] {
    let x: [&[BlockQ4_1]; 4] = w.map(bytemuck::cast_slice);
    let y: [&[BlockQ8_1]; 4] = a.map(bytemuck::cast_slice);
    assert!(x.iter().all(|x| x.len() >= nb) && y.iter().all(|y| y.len() >= nb));
    // Raw pointers: indexing four slices per block costs more than the block's arithmetic.
    let (xp, yp) = (x.map(|x| x.as_ptr()), y.map(|y| y.as_ptr()));
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let mut summs = [_mm_setzero_ps(); 4];
    for i in 0..nb {
        // SAFETY: i < nb and every slice holds at least nb blocks (asserted above).
        let yb = unsafe { nth4(yp, i) };
        // SAFETY: i < nb and every slice holds at least nb blocks (asserted above).
        let xb = unsafe { nth4(xp, i) };
        let dxy = scale_products(
            h2f_x4([xb[0].d, xb[1].d, xb[2].d, xb[3].d]),
            h2f_x4([yb[0].d, yb[1].d, yb[2].d, yb[3].d]),
        );
        let sy = h2f_x4([yb[0].s, yb[1].s, yb[2].s, yb[3].s]);
        let qy = quants_pairs(yb.map(|b| &b.qs));
        for r in 0..4 {
            let xb = xb[r];
            // Lane t: m_w·s_a then the add, the single-token kernel's two roundings.
            summs[r] = _mm_add_ps(summs[r], _mm_mul_ps(_mm_set1_ps(h2f(xb.m)), sy));
            // SAFETY: the nibble field is 16 bytes.
            let qx = _mm512_broadcast_i64x4(unsafe { nibbles32_copy(&xb.qs) });
            for p in 0..2 {
                let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qx, qy[p]);
                let d = splat_pair(dxy, 4 * r as i32 + 2 * p as i32);
                acc[r][p] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), acc[r][p]);
            }
        }
    }
    let mut out = [[0f32; 4]; 4];
    for r in 0..4 {
        let mut s = [0f32; 4];
        // SAFETY: `s` is 4 writable f32s; the store is unaligned.
        unsafe { _mm_storeu_ps(s.as_mut_ptr(), summs[r]) };
        for p in 0..2 {
            let [lo, hi] = halves(acc[r][p]);
            out[r][2 * p] = hsum_f32x8(lo) + s[2 * p];
            out[r][2 * p + 1] = hsum_f32x8(hi) + s[2 * p + 1];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn vnni_kernels_equal_avx2_kernels_bit_for_bit() {
        let (Some(vnni), Some(avx2)) = (Vnni::detect(), Avx2::detect()) else {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        };
        let n = 512;
        assert!(vec_dot_fn_vnni(vnni, GgmlType::Q4_0).is_none());
        assert!(vec_dot4_fn_vnni(vnni, GgmlType::Q4_0).is_none());
        for ty in [GgmlType::Q5_0, GgmlType::Q8_0] {
            let (v1, a1) = (
                vec_dot_fn_vnni(vnni, ty).unwrap(),
                vec_dot_fn(avx2, ty).unwrap(),
            );
            let (v4, a4) = (
                vec_dot4_fn_vnni(vnni, ty).unwrap(),
                vec_dot4_fn(avx2, ty).unwrap(),
            );
            for seed in 0..20u64 {
                let mut w = vec![0u8; quant::row_bytes(ty, n).unwrap()];
                let mut wf = rand_vec(n, seed);
                wf[(seed as usize * 7) % n] *= 40.0; // an outlier per row
                quant::quantize_row(ty, &wf, &mut w).unwrap();
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|s| {
                        let mut a = vec![0u8; quant::row_bytes(GgmlType::Q8_0, n).unwrap()];
                        let x = rand_vec(n, 1000 + 4 * seed + s);
                        quant::quantize_row_activation(GgmlType::Q8_0, &x, &mut a).unwrap();
                        a
                    })
                    .collect();
                let refs = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
                assert_eq!(
                    v4(n, &w, refs).map(f32::to_bits),
                    a4(n, &w, refs).map(f32::to_bits),
                    "{ty}"
                );
                for a in &acts {
                    assert_eq!(v1(n, &w, a).to_bits(), a1(n, &w, a).to_bits(), "{ty}");
                }
            }
        }
    }

    /// A row of `nb` random k-quant blocks of `ty` with small random f16 scales at `offs`.
    fn random_k_row(ty: GgmlType, nb: usize, seed: u64, offs: &[usize]) -> Vec<u8> {
        let ts = ty.type_size();
        let r = rand_vec(nb * ts, seed);
        let mut w: Vec<u8> = r.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        for (b, blk) in w.chunks_exact_mut(ts).enumerate() {
            for (k, &o) in offs.iter().enumerate() {
                let v = F16Le::from_f32(r[(b * 7 + k * 3) % r.len()] * 0.03);
                blk[o..o + 2].copy_from_slice(&v.0);
            }
        }
        w
    }

    #[test]
    fn k_quant_four_token_kernels_equal_single_token_kernel_bit_for_bit() {
        let Some(avx2) = Avx2::detect() else {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        };
        let nb = 3;
        let n = nb * QK_K;
        for (ty, offs) in [(GgmlType::Q4_K, &[0, 2][..]), (GgmlType::Q6_K, &[208])] {
            let single = vec_dot_fn(avx2, ty).unwrap();
            let mut quads = vec![("avx2", vec_dot4_fn(avx2, ty).unwrap())];
            if let Some(vnni) = Vnni::detect() {
                quads.push(("vnni", vec_dot4_fn_vnni(vnni, ty).unwrap()));
            }
            for seed in 0..12u64 {
                let w = random_k_row(ty, nb, seed, offs);
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|s| {
                        let mut a = vec![0u8; quant::row_bytes(GgmlType::Q8_K, n).unwrap()];
                        let mut x = rand_vec(n, 500 + 4 * seed + s);
                        x[(seed as usize * 31 + s as usize * 5) % n] *= 25.0;
                        quant::quantize_row_activation(GgmlType::Q8_K, &x, &mut a).unwrap();
                        a
                    })
                    .collect();
                let refs = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
                for (which, quad) in &quads {
                    let got = quad(n, &w, refs);
                    for t in 0..4 {
                        assert_eq!(
                            got[t].to_bits(),
                            single(n, &w, refs[t]).to_bits(),
                            "{which} {ty} seed {seed} token {t}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn vnni_tiles_equal_single_token_kernels_bit_for_bit() {
        let (Some(vnni), Some(avx2)) = (Vnni::detect(), Avx2::detect()) else {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        };
        let n = 512;
        assert!(vec_dot4x4_fn_vnni(vnni, GgmlType::Q4_0).is_none());
        for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0] {
            let tile = vec_dot4x4_fn_vnni(vnni, ty).unwrap();
            let single = vec_dot_fn(avx2, ty).unwrap();
            let vd = quant::vec_dot_type(ty).unwrap();
            for seed in 0..10u64 {
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|r| {
                        let mut w = vec![0u8; quant::row_bytes(ty, n).unwrap()];
                        let mut wf = rand_vec(n, 50 * seed + r);
                        wf[(seed as usize * 7 + r as usize * 13) % n] *= 40.0;
                        quant::quantize_row(ty, &wf, &mut w).unwrap();
                        w
                    })
                    .collect();
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|s| {
                        let mut a = vec![0u8; quant::row_bytes(vd, n).unwrap()];
                        let x = rand_vec(n, 1000 + 4 * seed + s);
                        quant::quantize_row_activation(vd, &x, &mut a).unwrap();
                        a
                    })
                    .collect();
                let w4 = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                let a4 = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
                let got = tile(n, w4, a4);
                for r in 0..4 {
                    for t in 0..4 {
                        assert_eq!(
                            got[r][t].to_bits(),
                            single(n, w4[r], a4[t]).to_bits(),
                            "{ty} seed {seed} row {r} token {t}"
                        );
                    }
                }
            }
        }
    }
}
