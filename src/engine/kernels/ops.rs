//! Row-wise f32 operators of the forward passes — norms, rotary embeddings, softmax, activations and
//! attention over a KV cache — each reducing in one fixed order per output element, so that a token's
//! result never depends on which other tokens share its batch (batch invariance).
//!
//! The maths is ported from ggml's CPU backend, `ggml/src/ggml-cpu/ops.cpp` and `vec.h` of llama.cpp commit
//! 0c1e570: `ggml_compute_forward_rms_norm_f32`, `ggml_compute_forward_norm_f32`, `rope_yarn` /
//! `ggml_rope_cache_init`, `ggml_vec_soft_max_f32`, `ggml_vec_silu_f32`, `ggml_gelu_f32`.
//!
//! Every function here is scalar and safe; `dot_f32` has an AVX2+FMA twin (the only `unsafe`, with its
//! `// SAFETY:` note) whose fixed lane order makes it deterministic, and a property test against the
//! scalar version.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// RMS normalisation of one row in place, then multiplication by `weight`:
/// `x[i] = x[i] / sqrt(mean(x²) + eps) * weight[i]`.
///
/// `x` and `weight` have the same length (`n_embd`, or `head_dim` for per-head q/k norms). Each square is
/// computed in f32 and accumulated in f64 in index order, as `ggml_compute_forward_rms_norm_f32` does
/// (`sum += (ggml_float)(x[i]*x[i])`).
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    let mut sum = 0.0f64;
    for &v in x.iter() {
        sum += (v * v) as f64;
    }
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

/// Layer normalisation of one row in place, then affine `x[i] = norm(x)[i] * weight[i] + bias[i]`.
///
/// Mean and variance are accumulated in f64 in index order (`ggml_compute_forward_norm_f32`);
/// the variance is the biased one (divided by `n`).
pub fn layer_norm(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    debug_assert_eq!(x.len(), bias.len());
    let n = x.len() as f64;
    let mut sum = 0.0f64;
    for &v in x.iter() {
        sum += v as f64;
    }
    let mean = (sum / n) as f32;
    let mut sum2 = 0.0f64;
    for v in x.iter_mut() {
        *v -= mean;
        sum2 += (*v as f64) * (*v as f64);
    }
    let variance = (sum2 / n) as f32;
    let scale = 1.0 / (variance + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(weight).zip(bias) {
        *v = (*v * scale) * w + b;
    }
}

/// How rotary embeddings pair the dimensions of a head (`LLAMA_ROPE_TYPE_NORM` / `_NEOX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs `(x[2i], x[2i+1])` (llama, mistral, SmolLM).
    Normal,
    /// Pairs `(x[i], x[i + n_dims/2])` (qwen2, qwen3, GPT-NeoX).
    Neox,
}

/// Rotary-embedding parameters of a model (the non-YaRN subset of `ggml_rope_ext`).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    /// Rotated dimensions per head (`{arch}.rope.dimension_count`); the rest pass through.
    pub n_dims: usize,
    /// `{arch}.rope.freq_base` (θ base, e.g. 10000).
    pub freq_base: f32,
    /// 1 / linear scaling factor (`{arch}.rope.scaling.factor`), 1.0 without scaling.
    pub freq_scale: f32,
    /// Pairing of dimensions.
    pub mode: RopeMode,
}

/// Cosines and sines of one position: `[n_dims / 2]` each, computed as `ggml_rope_cache_init` does
/// (θ multiplied by `theta_scale = base^(-2/n_dims)` step by step in f32, divided by the optional
/// per-dimension `freq_factors` of `rope_freqs.weight`, times `freq_scale`).
pub fn rope_cache(p: &RopeParams, pos: u32, freq_factors: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    rope_cache_at(p, pos as f32, freq_factors)
}

/// [`rope_cache`] for any (possibly negative) position `pos`, as `ggml_rope_cache_init` takes it from
/// an i32 position tensor: the K-shift of a context shift rotates cached keys by the position delta
/// (`llama_kv_cache::build_rope_shift`, llama.cpp `src/llama-kv-cache.cpp`). θ is linear in the
/// position, so rotating a key roped at `p` by the tables of `d` gives the rotation of `p + d` (up to
/// f32 rounding).
pub fn rope_cache_at(
    p: &RopeParams,
    pos: f32,
    freq_factors: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let half = p.n_dims / 2;
    let theta_scale = p.freq_base.powf(-2.0 / p.n_dims as f32);
    let mut cos = Vec::with_capacity(half);
    let mut sin = Vec::with_capacity(half);
    let mut theta_extrap = pos;
    for i in 0..half {
        let ff = freq_factors.map_or(1.0, |f| f.get(i).copied().unwrap_or(1.0));
        let theta = (theta_extrap / ff) * p.freq_scale;
        cos.push(theta.cos());
        sin.push(theta.sin());
        theta_extrap *= theta_scale;
    }
    (cos, sin)
}

/// [`rope_cache`] times ggml's `mscale` (the rope attention factor, `{arch}.rope.scaling.attn_factor`):
/// `cos(θ)·mscale`, `sin(θ)·mscale` as `rope_yarn` computes them without YaRN extrapolation
/// (`ext_factor` 0: linear, LongRoPE and Llama 3 scaling). `mscale` 1 gives [`rope_cache`]'s values.
pub fn rope_cache_scaled(
    p: &RopeParams,
    pos: u32,
    freq_factors: Option<&[f32]>,
    mscale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = rope_cache(p, pos, freq_factors);
    if mscale != 1.0 {
        cos.iter_mut()
            .chain(sin.iter_mut())
            .for_each(|v| *v *= mscale);
    }
    (cos, sin)
}

/// Rotates every head of one token in place: `x` is `[n_heads, head_dim]` (ggml order: `head_dim` fastest),
/// `cos`/`sin` come from [`rope_cache`] for this token's position.
pub fn rope(
    x: &mut [f32],
    head_dim: usize,
    n_dims: usize,
    mode: RopeMode,
    cos: &[f32],
    sin: &[f32],
) {
    debug_assert!(n_dims <= head_dim && x.len().is_multiple_of(head_dim));
    let half = n_dims / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = match mode {
                RopeMode::Normal => (2 * i, 2 * i + 1),
                RopeMode::Neox => (i, i + half),
            };
            let (x0, x1) = (head[a], head[b]);
            // The fused multiply-adds GCC forms from ggml's `x0*cos - x1*sin` / `x0*sin + x1*cos`
            // (`rotate_pairs`, built with -ffp-contract=fast): llama.cpp's exact results.
            head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
            head[b] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
}

/// Softmax of one row in place (max subtracted; the sum accumulated in f64 in index order, as
/// `ggml_vec_soft_max_f32`). An all-`-inf` row becomes all zeros.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.fill(0.0);
        return;
    }
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SiLU `x / (1 + e^-x)` applied to `gate`, multiplied element-wise by `up`, into `gate`
/// (the SwiGLU of llama-family FFNs, `ggml_vec_swiglu_f32`), with ggml's vectorised `expf` ([`expf_ggml`]) so
/// that the result equals llama.cpp's bit for bit.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time just above).
            return unsafe { x86::swiglu_avx2(gate, up) };
        }
    }
    swiglu_scalar(gate, up)
}

/// The scalar twin of [`swiglu`]. Like ggml (16-wide vectors, then a scalar tail with libm's `expf`), the
/// elements past the last multiple of 16 use the exact `expf`.
pub fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let n16 = n / 16 * 16;
    swiglu_vector_part(&mut gate[..n16], &up[..n16]);
    swiglu_scalar_tail(&mut gate[n16..n], &up[n16..n]);
}

/// SwiGLU with [`expf_ggml`] for every element (the part ggml computes in vectors).
fn swiglu_vector_part(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = (*g / (1.0 + expf_ggml(-*g))) * u;
    }
}

/// [`attend_one_f16`] for the consecutive query heads of one KV group: `q` and `out` are `[n_heads, hd]`,
/// `k_row(j)`/`v_row(j)` the group's `[hd]` key and value at position `j`. Each position's key and value are
/// converted once for all heads; every head's result is bit-identical to its own [`attend_one_f16`] call.
#[allow(clippy::too_many_arguments)] // the shape of attend_one_f16 plus head_dim
pub fn attend_heads_f16<'a>(
    q: &[f32],
    hd: usize,
    n_kv: usize,
    scale: f32,
    k_row: impl Fn(usize) -> &'a [f16],
    v_row: impl Fn(usize) -> &'a [f16],
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let n_heads = q.len() / hd.max(1);
        if hd == 64 && (1..=8).contains(&n_heads) && has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above); shapes checked inside.
            return unsafe { x86::attend_heads64_f16_avx2(q, n_kv, scale, k_row, v_row, out) };
        }
    }
    attend_heads_f16_scalar(q, hd, n_kv, scale, k_row, v_row, scratch, out)
}

/// The scalar twin of [`attend_heads_f16`]: one [`attend_one_f16`] per head.
#[allow(clippy::too_many_arguments)]
pub fn attend_heads_f16_scalar<'a>(
    q: &[f32],
    hd: usize,
    n_kv: usize,
    scale: f32,
    k_row: impl Fn(usize) -> &'a [f16],
    v_row: impl Fn(usize) -> &'a [f16],
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        attend_one_f16(qh, n_kv, scale, &k_row, &v_row, scratch, oh);
    }
}

/// The scalar tail of [`swiglu`] past the last multiple of 16 (libm's `expf`, `ggml_silu_f32`).
fn swiglu_scalar_tail(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `e^x` as ggml's vectorised `ggml_v_expf` computes it (AVX-512 variant, `ggml/src/ggml-cpu/vec.h`, commit
/// 0c1e570; from ARM's optimized-routines, ≤ 1.5 ulp from the exact value): `n = round(x/ln2)`, a
/// two-constant Cody–Waite reduction `b = x − n·ln2`, a degree-5 polynomial `j ≈ e^b`, then `j·2ⁿ`
/// (`_mm512_scalef_ps`). Beyond |n| > 192 the result is 0 or +∞. Every step is one correctly rounded IEEE
/// operation, so this scalar version and the SIMD twin in [`swiglu`] agree bit for bit.
#[inline]
pub fn expf_ggml(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010)
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.0e4020p-7, 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    scalef(j, n as i32)
}

/// `j · 2ⁿ` with one rounding (`_mm512_scalef_ps` for integral `n`, |n| ≤ 192).
#[inline]
fn scalef(j: f32, n: i32) -> f32 {
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    if n > 127 {
        (j * pow2(127)) * pow2(n - 127)
    } else if n < -126 {
        // Exact while normal, then one rounding into the subnormal range.
        (j * pow2(n + 64)) * pow2(-64)
    } else {
        j * pow2(n)
    }
}

/// SiLU of one value: `x / (1 + e^-x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU (tanh approximation) in place as ggml's CPU backend computes `ggml_gelu` on f32
/// (`ggml_vec_gelu_f32` with `GGML_GELU_FP16`, `ggml/src/ggml-cpu/vec.h`, commit 0c1e570): 0 for
/// `x ≤ -10`, `x` for `x ≥ 10`, otherwise `x` rounded to f16 and looked up in ggml's f16 GELU table
/// (`f16(0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))))`). The BERT FFN's activation.
pub fn gelu(x: &mut [f32]) {
    let table = gelu_table_f16();
    for v in x.iter_mut() {
        let t = *v;
        *v = if t <= -10.0 {
            0.0
        } else if t >= 10.0 {
            t
        } else {
            table[f16::from_f32(t).to_bits() as usize].to_f32()
        };
    }
}

/// `ggml_gelu_f32` as GCC compiles it for ggml's CPU backend (`-ffp-contract=fast`, FMA available: the
/// `1 + a·x·x` term becomes one fused multiply-add): `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`.
pub fn gelu_ggml_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_COEF_A: f32 = 0.044715;
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
}

/// ggml's `ggml_table_gelu_f16` (built in `ggml_cpu_init`): for every f16 bit pattern `h`,
/// `f16(gelu(f32(h)))`. 65536 entries (128 KiB), computed once.
fn gelu_table_f16() -> &'static [f16] {
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_ggml_f32(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// GeGLU in place: `gate[i] = gelu(gate[i]) · up[i]` (the gated FFN of gemma, `ggml_vec_geglu_f32` with
/// `GGML_GELU_FP16`, `ggml/src/ggml-cpu/vec.h`, commit 0c1e570): for `x ≤ -10` the GELU is 0, for
/// `x ≥ 10` it is `x`, otherwise `x` is rounded to f16 and looked up in ggml's f16 GELU table. ggml runs
/// this loop as scalar code, so there is no SIMD twin.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    let table = gelu_table_f16();
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            table[f16::from_f32(x).to_bits() as usize].to_f32() * u
        };
    }
}

/// Soft-capping in place: `x = cap · tanh(x · (1/cap))` (gemma2/3's final logit soft-capping:
/// `ggml_scale(1/cap)`, `ggml_tanh`, `ggml_scale(cap)`). `cap > 0`.
pub fn softcap(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x.iter_mut() {
        *v = (*v * inv).tanh() * cap;
    }
}

/// Adds `bias` to every row of `x` (`[n_rows, bias.len()]`).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `dst[i] += src[i]` (residual connections).
pub fn add_in_place(dst: &mut [f32], src: &[f32]) {
    debug_assert_eq!(dst.len(), src.len());
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Dot product of two f32 slices of equal length, in a fixed order: eight interleaved lanes
/// (element `i` goes to lane `i % 8`, summed with fused multiply-add in index order), lanes combined
/// pairwise `((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7))`, then the tail added in index order. The AVX2 and scalar
/// versions perform exactly this computation, so they agree bit for bit.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
            return unsafe { x86::dot_f32_avx2(a, b) };
        }
    }
    dot_f32_scalar(a, b)
}

/// The scalar twin of [`dot_f32`] (same lanes, same order, `f32::mul_add` as the fused multiply-add).
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut lanes = [0.0f32; 8];
    let n8 = n / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane = ca[l].mul_add(cb[l], *lane);
        }
    }
    let mut s = combine_lanes(&lanes);
    for (x, y) in a[n8..n].iter().zip(&b[n8..n]) {
        s = x.mul_add(*y, s);
    }
    s
}

/// `y[i] += a * x[i]` (the weighted sum over V rows in attention), element by element.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = a.mul_add(*xv, *yv);
    }
}

#[inline]
fn combine_lanes(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX2 twin of `dot_f32_scalar`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let n8 = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= len of both slices, and loadu has no alignment requirement.
            let (va, vb) = unsafe {
                (
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                )
            };
            acc = _mm256_fmadd_ps(va, vb, acc);
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds exactly 8 f32, the width of one __m256 store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut s = super::combine_lanes(&lanes);
        for (x, y) in a[n8..n].iter().zip(&b[n8..n]) {
            s = x.mul_add(*y, s);
        }
        s
    }

    /// AVX2 twin of `swiglu_scalar` (8 lanes at a time over the first multiple of 16; chunks where some
    /// lane's exponent leaves the normal range, and the tail, go through the scalar code).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn swiglu_avx2(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let n16 = n / 16 * 16;
        let r = _mm256_set1_ps(f32::from_bits(0x4b40_0000));
        let log2e = _mm256_set1_ps(f32::from_bits(0x3fb8_aa3b));
        let ln2_hi = _mm256_set1_ps(f32::from_bits(0x3f31_7200));
        let ln2_lo = _mm256_set1_ps(f32::from_bits(0x35bf_be8e));
        let c5 = _mm256_set1_ps(f32::from_bits(0x3c07_2010));
        let c4 = _mm256_set1_ps(f32::from_bits(0x3d2b_9f17));
        let c3 = _mm256_set1_ps(f32::from_bits(0x3e2a_af33));
        let c2 = _mm256_set1_ps(f32::from_bits(0x3eff_fedb));
        let c1 = _mm256_set1_ps(f32::from_bits(0x3f7f_fff6));
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < n16 {
            // SAFETY: i + 8 <= n16 <= the length of both slices; unaligned loads and store.
            let (g, u) = unsafe {
                (
                    _mm256_loadu_ps(gate.as_ptr().add(i)),
                    _mm256_loadu_ps(up.as_ptr().add(i)),
                )
            };
            let x = _mm256_sub_ps(_mm256_setzero_ps(), g);
            let z = _mm256_fmadd_ps(x, log2e, r);
            let nf = _mm256_sub_ps(z, r);
            let b = _mm256_fnmadd_ps(nf, ln2_lo, _mm256_fnmadd_ps(nf, ln2_hi, x));
            let ni = _mm256_cvtps_epi32(nf);
            let out_of_range = _mm256_or_si256(
                _mm256_cmpgt_epi32(ni, _mm256_set1_epi32(127)),
                _mm256_cmpgt_epi32(_mm256_set1_epi32(-126), ni),
            );
            if _mm256_testz_si256(out_of_range, out_of_range) == 0 {
                super::swiglu_vector_part(&mut gate[i..i + 8], &up[i..i + 8]);
                i += 8;
                continue;
            }
            let u2 = _mm256_mul_ps(b, b);
            let j = _mm256_fmadd_ps(
                _mm256_fmadd_ps(_mm256_fmadd_ps(c5, b, c4), u2, _mm256_fmadd_ps(c3, b, c2)),
                u2,
                _mm256_fmadd_ps(c1, b, one),
            );
            let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(ni, _mm256_set1_epi32(127)),
                23,
            ));
            let e = _mm256_mul_ps(j, pow2);
            let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
            // SAFETY: as for the loads above.
            unsafe { _mm256_storeu_ps(gate.as_mut_ptr().add(i), y) };
            i += 8;
        }
        super::swiglu_scalar_tail(&mut gate[n16..n], &up[n16..n]);
    }

    /// The reduction of `dot_f16_avx2`'s eight accumulators (`acc[2j]`/`acc[2j+1]` are lanes 0..8 / 8..16 of
    /// ggml's 16-lane accumulator `j`): `(a0+a2)+(a1+a3)` lane by lane, then GCC's `_mm512_reduce_add_ps` tree.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn reduce_dot_f16(acc: &[__m256; 8]) -> f32 {
        let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        let t = _mm256_add_ps(hi, lo);
        let mut r = _mm256_extractf128_ps(t, 1);
        r = _mm_add_ps(r, _mm256_castps256_ps128(t));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// AVX2+F16C twin of `dot_f16_scalar` (each 16-lane accumulator of ggml's AVX-512 code is a pair of
    /// `__m256`: lanes 0..8 and 8..16).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2(a: &[half::f16], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        let np = n / 64 * 64;
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < np {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8k + 8 <= np <= the length of both slices (16-byte unaligned loads).
                let (va, vb) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            a.as_ptr().add(i + 8 * k) as *const __m128i
                        )),
                        _mm256_cvtph_ps(_mm_loadu_si128(
                            b.as_ptr().add(i + 8 * k) as *const __m128i
                        )),
                    )
                };
                *acc = _mm256_fmadd_ps(va, vb, *acc);
            }
            i += 64;
        }
        let mut sum = reduce_dot_f16(&acc) as f64;
        for (x, y) in a[np..n].iter().zip(&b[np..n]) {
            sum += (x.to_f32() * y.to_f32()) as f64;
        }
        sum as f32
    }

    /// The AVX2 twin of `attend_heads_f16_scalar` for `head_dim == 64` and 1 to 8 heads: the same operations
    /// per head as `attend_one_f16` (f16-rounded query, `dot_f16_avx2`'s product and reduction order, online
    /// softmax with libm `expf`, an f16-rounded accumulator), with each position's key and value converted
    /// once.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[allow(clippy::needless_range_loop)] // heads × 8-lane pieces, as in the scalar reference
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_heads64_f16_avx2<'a>(
        q: &[f32],
        n_kv: usize,
        scale: f32,
        k_row: impl Fn(usize) -> &'a [half::f16],
        v_row: impl Fn(usize) -> &'a [half::f16],
        out: &mut [f32],
    ) {
        let nh = q.len() / 64;
        assert!((1..=8).contains(&nh) && q.len() == nh * 64 && out.len() == nh * 64);
        let round16 = |x: __m256| _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
        let load8 = |p: &[half::f16], k: usize| {
            assert!(p.len() >= 64);
            // SAFETY: 8k + 8 <= 64 <= p.len() (asserted); an unaligned 16-byte load.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.as_ptr().add(8 * k) as *const __m128i) })
        };
        let mut qf = [[_mm256_setzero_ps(); 8]; 8];
        let mut acc = [[_mm256_setzero_ps(); 8]; 8];
        let mut m = [f32::NEG_INFINITY; 8];
        let mut sum = [0.0f32; 8];
        for h in 0..nh {
            for k in 0..8 {
                // SAFETY: h < nh and 64h + 8k + 8 <= q.len().
                qf[h][k] = round16(unsafe { _mm256_loadu_ps(q.as_ptr().add(64 * h + 8 * k)) });
            }
        }
        for j in 0..n_kv {
            let kr = k_row(j);
            let kf: [__m256; 8] = std::array::from_fn(|k| load8(kr, k));
            let vr = v_row(j);
            let vf: [__m256; 8] = std::array::from_fn(|k| load8(vr, k));
            for h in 0..nh {
                // One 64-element step of `dot_f16_avx2`: fma from zero is the rounded product.
                let p: [__m256; 8] = std::array::from_fn(|k| _mm256_mul_ps(qf[h][k], kf[k]));
                let s = reduce_dot_f16(&p) * scale;
                let (mut ms, mut vs) = (1.0f32, 1.0f32);
                if s > m[h] {
                    let m_old = m[h];
                    m[h] = s;
                    ms = (m_old - s).exp();
                    let msv = _mm256_set1_ps(ms);
                    for a in acc[h].iter_mut() {
                        *a = round16(_mm256_mul_ps(*a, msv));
                    }
                } else {
                    vs = (s - m[h]).exp();
                }
                let vsv = _mm256_set1_ps(vs);
                for (a, v) in acc[h].iter_mut().zip(&vf) {
                    *a = round16(_mm256_fmadd_ps(*v, vsv, *a));
                }
                sum[h] = sum[h].mul_add(ms, vs);
            }
        }
        for h in 0..nh {
            let inv = _mm256_set1_ps(if sum[h] == 0.0 { 0.0 } else { 1.0 / sum[h] });
            for k in 0..8 {
                // SAFETY: 64h + 8k + 8 <= out.len() (asserted).
                unsafe {
                    _mm256_storeu_ps(
                        out.as_mut_ptr().add(64 * h + 8 * k),
                        _mm256_mul_ps(acc[h][k], inv),
                    )
                };
            }
        }
    }

    /// AVX2+F16C twin of `mad_f16_scalar`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad_f16_avx2(y: &mut [half::f16], x: &[half::f16], v: f32) {
        let n = y.len().min(x.len());
        let n8 = n / 8 * 8;
        let vv = _mm256_set1_ps(v);
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= len of both slices; unaligned 16-byte loads and store.
            unsafe {
                let py = y.as_mut_ptr().add(i) as *mut __m128i;
                let vy = _mm256_cvtph_ps(_mm_loadu_si128(py));
                let vx = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(i) as *const __m128i));
                let r = _mm256_fmadd_ps(vx, vv, vy);
                _mm_storeu_si128(py, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
            }
            i += 8;
        }
        super::mad_f16_scalar(&mut y[n8..n], &x[n8..n], v);
    }

    /// AVX2+F16C twin of `scale_f16_scalar`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_f16_avx2(y: &mut [half::f16], v: f32) {
        let n = y.len();
        let n8 = n / 8 * 8;
        let vv = _mm256_set1_ps(v);
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n8 <= y.len(); unaligned 16-byte load and store.
            unsafe {
                let py = y.as_mut_ptr().add(i) as *mut __m128i;
                let r = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(py)), vv);
                _mm_storeu_si128(py, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
            }
            i += 8;
        }
        super::scale_f16_scalar(&mut y[n8..n], v);
    }
}

/// Dot product of two f16 slices of equal length in exactly the order of ggml's `ggml_vec_dot_f16` as built
/// for AVX-512 (`ggml/src/ggml-cpu/vec.cpp`, `simd-mappings.h`, commit 0c1e570), so that attention scores
/// equal llama.cpp's bit for bit: per 64-element step, four accumulators of 16 f32 lanes take fused
/// multiply-adds (element `i` of a step goes to accumulator `i / 16`, lane `i % 16`); then `a0+a2`, `a1+a3`,
/// their sum, and GCC's `_mm512_reduce_add_ps` tree (lanes `k+8`, then `k+4`, then `k+2`, then `k+1`); the
/// elements past the last multiple of 64 are added as f64 products. The AVX2+F16C and scalar versions agree
/// bit for bit.
pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time just above).
            return unsafe { x86::dot_f16_avx2(a, b) };
        }
    }
    dot_f16_scalar(a, b)
}

/// The scalar twin of [`dot_f16`].
pub fn dot_f16_scalar(a: &[f16], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let np = n / 64 * 64;
    let mut acc = [[0.0f32; 16]; 4];
    for (ca, cb) in a[..np].chunks_exact(64).zip(b[..np].chunks_exact(64)) {
        for (i, (x, y)) in ca.iter().zip(cb).enumerate() {
            let lane = &mut acc[i / 16][i % 16];
            *lane = x.to_f32().mul_add(y.to_f32(), *lane);
        }
    }
    let mut r = [0.0f32; 16];
    for l in 0..16 {
        r[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = reduce16(&r) as f64;
    for (x, y) in a[np..n].iter().zip(&b[np..n]) {
        sum += (x.to_f32() * y.to_f32()) as f64;
    }
    sum as f32
}

/// GCC's `_mm512_reduce_add_ps` order: `t[k] = a[k+8]+a[k]`, `u[m] = t[m+4]+t[m]`, `(u0+u2)+(u1+u3)`.
#[inline]
fn reduce16(a: &[f32; 16]) -> f32 {
    let mut t = [0.0f32; 8];
    for k in 0..8 {
        t[k] = a[k + 8] + a[k];
    }
    let u = [t[4] + t[0], t[5] + t[1], t[6] + t[2], t[7] + t[3]];
    (u[0] + u[2]) + (u[1] + u[3])
}

/// `y[i] = f16(f32(y[i]) + f32(x[i])·v)` with one rounding (fused multiply-add in f32, then round to nearest
/// even): ggml's `ggml_vec_mad_f16`, the f16 accumulator of its CPU flash attention.
pub fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    debug_assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time just above).
            return unsafe { x86::mad_f16_avx2(y, x, v) };
        }
    }
    mad_f16_scalar(y, x, v)
}

/// The scalar twin of [`mad_f16`].
pub fn mad_f16_scalar(y: &mut [f16], x: &[f16], v: f32) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = f16::from_f32(xv.to_f32().mul_add(v, yv.to_f32()));
    }
}

/// `y[i] = f16(f32(y[i])·v)` (`ggml_vec_scale_f16`).
pub fn scale_f16(y: &mut [f16], v: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time just above).
            return unsafe { x86::scale_f16_avx2(y, v) };
        }
    }
    scale_f16_scalar(y, v)
}

/// The scalar twin of [`scale_f16`].
pub fn scale_f16_scalar(y: &mut [f16], v: f32) {
    for yv in y.iter_mut() {
        *yv = f16::from_f32(yv.to_f32() * v);
    }
}

/// Scratch buffers of [`attend_one_f16`], reused across calls.
#[derive(Default)]
pub struct AttnScratch {
    q16: Vec<f16>,
    acc16: Vec<f16>,
    /// The buffers of [`attend_one_raw`] (quantized or mixed-type caches).
    pub raw: RawAttnScratch,
}

/// Attention of one query head over `n_kv` cached f16 positions, in position order, computed the way
/// ggml's CPU flash attention does (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, llama.cpp commit
/// 0c1e570, which llama.cpp uses on CPU by default): the query rounded to f16, `s = (q·k_j)·scale` in f32,
/// an online softmax (running maximum `M` and sum `S`, `expf`), the weighted values accumulated in an **f16**
/// vector (`ggml_vec_scale_f16`/`ggml_vec_mad_f16`), finally divided by `S` in f32.
///
/// - `q`: `[head_dim]` f32; `k_row(j)`/`v_row(j)`: `[head_dim]` f16 each; `out`: `[head_dim]`, overwritten.
///
/// The result of a (token, head) depends only on its own query and the cached rows, never on the batch.
pub fn attend_one_f16<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    k_row: impl Fn(usize) -> &'a [f16],
    v_row: impl Fn(usize) -> &'a [f16],
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    attend_one_f16_softcap(q, n_kv, scale, 0.0, k_row, v_row, scratch, out)
}

/// [`attend_one_f16`] with attention-logit soft-capping (gemma2's `attn_logit_softcapping`, the
/// `logit_softcap` of `ggml_flash_attn_ext`): the scale is divided by `softcap` and each score becomes
/// `softcap · tanh(s)`. A `softcap` of 0 is [`attend_one_f16`] exactly.
#[allow(clippy::too_many_arguments)] // attend_one_f16's shape plus the cap
pub fn attend_one_f16_softcap<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    softcap: f32,
    k_row: impl Fn(usize) -> &'a [f16],
    v_row: impl Fn(usize) -> &'a [f16],
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let scale = if softcap != 0.0 {
        scale / softcap
    } else {
        scale
    };
    let d = q.len();
    scratch.q16.resize(d, f16::ZERO);
    f32_to_f16(q, &mut scratch.q16);
    scratch.acc16.clear();
    scratch.acc16.resize(out.len(), f16::ZERO);
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    for j in 0..n_kv {
        let mut s = dot_f16(&scratch.q16, k_row(j)) * scale;
        if softcap != 0.0 {
            s = softcap * s.tanh();
        }
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            scale_f16(&mut scratch.acc16, ms);
        } else {
            vs = (s - m).exp();
        }
        mad_f16(&mut scratch.acc16, v_row(j), vs);
        // `S = S*ms + vs`, contracted to a fused multiply-add by GCC in ggml.
        sum = sum.mul_add(ms, vs);
    }
    f16_to_f32(&scratch.acc16, out);
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// One KV head's row (`[head_dim]`) in the cache's own element type, for [`attend_one_raw`].
#[derive(Clone, Copy)]
pub enum KvRow<'a> {
    /// Half precision.
    F16(&'a [f16]),
    /// Single precision.
    F32(&'a [f32]),
    /// BF16 or whole blocks of a quantized type.
    Raw(&'a [u8]),
}

impl<'a> KvRow<'a> {
    /// The row's bytes (little-endian elements or blocks, as ggml stores them).
    pub fn bytes(self) -> &'a [u8] {
        match self {
            KvRow::F16(r) => bytemuck::cast_slice(r),
            KvRow::F32(r) => bytemuck::cast_slice(r),
            KvRow::Raw(r) => r,
        }
    }
}

/// Scratch buffers of [`attend_one_raw`], reused across calls.
#[derive(Default)]
pub struct RawAttnScratch {
    q: Vec<u8>,
    acc16: Vec<f16>,
    acc32: Vec<f32>,
    v32: Vec<f32>,
}

/// Attention of one query head over `n_kv` cached positions whose keys are of type `tk` and values of
/// type `tv` (any [`crate::engine::model::KvType`], read in place), computed as ggml's CPU flash attention
/// does for such a cache (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`, `ggml/src/ggml-cpu/ops.cpp`,
/// llama.cpp commit 0c1e570): the query converted once to the keys' vec-dot type (`q_to_vec_dot`: Q8_0 for
/// q4_0/q5_0/q8_0/iq4_nl, Q8_1 for q4_1/q5_1, F16/BF16/F32 for the float types), each score the type's dot
/// product `kq_vec_dot` times `scale` (soft-capped when `softcap ≠ 0`), an online softmax, the weighted
/// values accumulated in f16 for an f16 `tv` (`ggml_vec_mad_f16`) and otherwise in f32 after converting
/// each value row (`v_to_float`, `ggml_vec_mad_f32`), finally divided by the sum.
///
/// - `q`: `[head_dim]` f32; `k_row(j)`/`v_row(j)`: position `j`'s `[head_dim]` key and value; `out`:
///   `[head_dim]`, overwritten. `head_dim` is a multiple of the block size of `tk` and `tv`.
/// - `dot`: the dot product of `tk` against its vec-dot type ([`super::vec_dot_fn`], or the scalar oracle
///   [`super::scalar_vec_dot_fn`] for [`attend_one_raw_scalar`]).
///
/// A type without a dot product or dequantizer leaves `out` zero (the cache only holds supported types).
#[allow(clippy::too_many_arguments)] // the shape of attend_one_f16_softcap plus the two types
pub fn attend_one_raw<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    softcap: f32,
    tk: crate::engine::ggml_type::GgmlType,
    k_row: impl Fn(usize) -> KvRow<'a>,
    tv: crate::engine::ggml_type::GgmlType,
    v_row: impl Fn(usize) -> KvRow<'a>,
    scratch: &mut RawAttnScratch,
    out: &mut [f32],
) {
    out.fill(0.0);
    if let Some(dot) = super::vec_dot_fn(tk) {
        attend_raw_with(
            q, n_kv, scale, softcap, tk, dot, k_row, tv, v_row, scratch, out,
        );
    }
}

/// [`attend_one_raw`] with the scalar dot-product oracle: the twin the SIMD path is tested against.
#[allow(clippy::too_many_arguments)]
pub fn attend_one_raw_scalar<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    softcap: f32,
    tk: crate::engine::ggml_type::GgmlType,
    k_row: impl Fn(usize) -> KvRow<'a>,
    tv: crate::engine::ggml_type::GgmlType,
    v_row: impl Fn(usize) -> KvRow<'a>,
    scratch: &mut RawAttnScratch,
    out: &mut [f32],
) {
    out.fill(0.0);
    if let Some(dot) = super::scalar_vec_dot_fn(tk) {
        attend_raw_with(
            q, n_kv, scale, softcap, tk, dot, k_row, tv, v_row, scratch, out,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_raw_with<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    softcap: f32,
    tk: crate::engine::ggml_type::GgmlType,
    dot: super::VecDotFn,
    k_row: impl Fn(usize) -> KvRow<'a>,
    tv: crate::engine::ggml_type::GgmlType,
    v_row: impl Fn(usize) -> KvRow<'a>,
    scratch: &mut RawAttnScratch,
    out: &mut [f32],
) {
    use crate::engine::ggml_type::GgmlType;
    use crate::engine::quant;
    let d = q.len();
    let Some(vd) = quant::vec_dot_type(tk) else {
        return;
    };
    let Ok(qb) = quant::row_bytes(vd, d) else {
        return;
    };
    scratch.q.resize(qb, 0);
    if quant::quantize_row_activation(vd, q, &mut scratch.q).is_err() {
        return;
    }
    let scale = if softcap != 0.0 {
        scale / softcap
    } else {
        scale
    };
    let v16 = tv == GgmlType::F16;
    scratch.acc16.clear();
    scratch.acc32.clear();
    if v16 {
        scratch.acc16.resize(d, f16::ZERO);
    } else {
        scratch.acc32.resize(d, 0.0);
        scratch.v32.resize(d, 0.0);
    }
    let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    for j in 0..n_kv {
        let mut s = dot(d, k_row(j).bytes(), &scratch.q) * scale;
        if softcap != 0.0 {
            s = softcap * s.tanh();
        }
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > m {
            let m_old = m;
            m = s;
            ms = (m_old - m).exp();
            if v16 {
                scale_f16(&mut scratch.acc16, ms);
            } else {
                scratch.acc32.iter_mut().for_each(|a| *a *= ms);
            }
        } else {
            vs = (s - m).exp();
        }
        match v_row(j) {
            KvRow::F16(r) if v16 => mad_f16(&mut scratch.acc16, r, vs),
            KvRow::F32(r) => axpy(&mut scratch.acc32, vs, r),
            row => {
                if quant::dequantize_row(tv, row.bytes(), &mut scratch.v32).is_ok() {
                    axpy(&mut scratch.acc32, vs, &scratch.v32);
                }
            }
        }
        sum = sum.mul_add(ms, vs);
    }
    if v16 {
        f16_to_f32(&scratch.acc16, out);
    } else {
        out.copy_from_slice(&scratch.acc32);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Multiplies each consecutive `n` values of `x` (`n` a power of two dividing `x.len()`) by the orthonormal
/// Walsh–Hadamard matrix of size `n` (Sylvester order, `1/√n` scaled, its own inverse): ggml's fast
/// Walsh–Hadamard transform (`ggml_compute_forward_fwht_impl`, `ggml/src/ggml-cpu/ops.cpp`, llama.cpp commit
/// 0c1e570), which llama.cpp applies to the query, keys and values of a quantized KV cache
/// (`llama_mul_mat_hadamard`, `src/llama-graph.cpp` `build_attn`): the values are scaled first, then
/// `log2 n` butterfly passes `(u + v, u − v)`, each an exact IEEE operation, as ggml's SIMD passes are.
/// A length that does not fit leaves `x` unchanged.
pub fn fwht_rows(x: &mut [f32], n: usize) {
    if n < 2 || !n.is_power_of_two() || !x.len().is_multiple_of(n) {
        return;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for row in x.chunks_exact_mut(n) {
        row.iter_mut().for_each(|v| *v *= scale);
        let mut len = 1;
        while len < n {
            for i in (0..n).step_by(2 * len) {
                for j in i..i + len {
                    let (u, v) = (row[j], row[j + len]);
                    row[j] = u + v;
                    row[j + len] = u - v;
                }
            }
            len <<= 1;
        }
    }
}

/// Converts f16 values to f32 into `dst` (same length), using the `half` crate's vectorised conversion.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

/// Converts f32 values to f16 (round to nearest even) into `dst` (same length).
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

/// Attention of one query head over `n_kv` cached positions, in position order.
///
/// - `q`: `[head_dim]`, already scaled or not — `scale` multiplies every score (`1/√head_dim`).
/// - `k_rows(j)`/`v_rows(j)`: the key and value of position `j` for this head's KV group, `[head_dim]` each.
/// - `scores`: scratch of at least `n_kv` floats.
/// - `out`: `[head_dim]`, overwritten with `Σ_j softmax(scores)_j · v_j`.
///
/// This is ggml's non-flash path (`kq = k·q`, `soft_max_ext(kq, mask, scale)`, `kqv = v·softmax`) with
/// the mask expressed by `n_kv` (causal: positions `0..=pos`; non-causal: the whole sequence).
pub fn attend_one<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    k_row: impl Fn(usize) -> &'a [f32],
    v_row: impl Fn(usize) -> &'a [f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_one_softcap(q, n_kv, scale, 0.0, k_row, v_row, scores, out)
}

/// [`attend_one`] with attention-logit soft-capping (`build_attn_mha`: `kq = cap · tanh(kq · (1/cap))`
/// before the scaled softmax). A `softcap` of 0 is [`attend_one`] exactly.
#[allow(clippy::too_many_arguments)] // attend_one's shape plus the cap
pub fn attend_one_softcap<'a>(
    q: &[f32],
    n_kv: usize,
    scale: f32,
    softcap: f32,
    k_row: impl Fn(usize) -> &'a [f32],
    v_row: impl Fn(usize) -> &'a [f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let scores = &mut scores[..n_kv];
    for (j, s) in scores.iter_mut().enumerate() {
        let mut kq = dot_f32(q, k_row(j));
        if softcap != 0.0 {
            kq = (kq * (1.0 / softcap)).tanh() * softcap;
        }
        *s = kq * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        axpy(out, p, v_row(j));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rms_norm_matches_definition() {
        let mut x = vec![1.0f32, -2.0, 3.0, 0.5];
        let w = vec![1.0f32, 2.0, 0.5, 1.0];
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        let s = 1.0 / ((ms as f32) + 1e-5).sqrt();
        let expect: Vec<f32> = [1.0f32, -2.0, 3.0, 0.5]
            .iter()
            .zip(&w)
            .map(|(v, w)| v * s * w)
            .collect();
        rms_norm(&mut x, &w, 1e-5);
        for (a, b) in x.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn layer_norm_zero_mean_unit_variance() {
        let mut x: Vec<f32> = (0..16).map(|i| (i as f32) * 0.7 - 3.0).collect();
        let ones = vec![1.0f32; 16];
        let zeros = vec![0.0f32; 16];
        layer_norm(&mut x, &ones, &zeros, 1e-12);
        let mean: f32 = x.iter().sum::<f32>() / 16.0;
        let var: f32 = x.iter().map(|v| v * v).sum::<f32>() / 16.0;
        assert!(mean.abs() < 1e-5, "mean {mean}");
        assert!((var - 1.0).abs() < 1e-4, "var {var}");
        let mut y = vec![2.0f32; 4];
        layer_norm(&mut y, &[1.0; 4], &[0.5; 4], 1e-5);
        assert_eq!(y, vec![0.5; 4], "a constant row normalises to the bias");
    }

    #[test]
    fn softmax_sums_to_one_and_handles_masked_rows() {
        let mut x = vec![1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
        assert!(x[2] > x[1] && x[1] > x[0]);
        let mut m = vec![f32::NEG_INFINITY; 3];
        softmax(&mut m);
        assert_eq!(m, vec![0.0; 3]);
    }

    #[test]
    fn rope_position_zero_is_identity_and_preserves_norm() {
        let p = RopeParams {
            n_dims: 8,
            freq_base: 10000.0,
            freq_scale: 1.0,
            mode: RopeMode::Normal,
        };
        let x0: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
        let (c, s) = rope_cache(&p, 0, None);
        let mut x = x0.clone();
        rope(&mut x, 8, 8, RopeMode::Normal, &c, &s);
        assert_eq!(x, x0);
        for mode in [RopeMode::Normal, RopeMode::Neox] {
            let (c, s) = rope_cache(&p, 37, None);
            let mut x = x0.clone();
            rope(&mut x, 8, 8, mode, &c, &s);
            let n0: f32 = x0.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
            assert_ne!(x, x0);
        }
    }

    #[test]
    fn rope_normal_rotates_first_pair_by_pos() {
        // The first pair rotates by θ = pos (theta_scale^0 = 1).
        let p = RopeParams {
            n_dims: 4,
            freq_base: 10000.0,
            freq_scale: 1.0,
            mode: RopeMode::Normal,
        };
        let (c, s) = rope_cache(&p, 3, None);
        let mut x = vec![1.0f32, 0.0, 1.0, 0.0];
        rope(&mut x, 4, 4, RopeMode::Normal, &c, &s);
        assert!((x[0] - 3.0f32.cos()).abs() < 1e-6 && (x[1] - 3.0f32.sin()).abs() < 1e-6);
        // NeoX pairs x[0] with x[2].
        let mut y = vec![1.0f32, 1.0, 0.0, 0.0];
        rope(&mut y, 4, 4, RopeMode::Neox, &c, &s);
        assert!((y[0] - 3.0f32.cos()).abs() < 1e-6 && (y[2] - 3.0f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn swiglu_out_of_range_lanes_use_ggml_expf() {
        // A lane whose exponent leaves the normal range sends its chunk through the scalar code, which must
        // still use ggml's expf for the other lanes (a regression: it once used libm's there).
        let mut g = vec![0.5f32; 16];
        g[0] = 116.26614;
        g[1] = -50.185173;
        let u = vec![1.052583f32; 16];
        let (mut a, mut b) = (g.clone(), g.clone());
        swiglu(&mut a, &u);
        swiglu_scalar(&mut b, &u);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn activations() {
        assert!((silu(0.0)).abs() < 1e-7);
        assert!((silu(2.0) - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        let mut g = vec![0.0f32, 1.0, -1.0, 10.0, -10.5, 1.000_3];
        gelu(&mut g);
        assert_eq!(g[0], 0.0);
        // ggml's f16 table: the f16 rounding of the exact value, of the f16-rounded input.
        assert_eq!(g[1], f16::from_f32(gelu_ggml_f32(1.0)).to_f32());
        assert!((g[1] - 0.841_192).abs() < 1e-3, "{}", g[1]);
        assert!((g[2] + 0.158_808).abs() < 1e-3, "{}", g[2]);
        assert_eq!(g[3], 10.0);
        assert_eq!(g[4], 0.0);
        assert_eq!(g[5], g[1], "1.0003 rounds to 1.0 in f16 before the lookup");
    }

    #[test]
    fn geglu_follows_ggml_table_and_limits() {
        let mut g = vec![-11.0f32, 11.0, 0.0, 1.0, -1.0, 2.5];
        geglu(&mut g, &[2.0; 6]);
        assert_eq!(g[0], 0.0);
        assert_eq!(g[1], 22.0);
        assert_eq!(g[2], 0.0);
        // gelu(1) ≈ 0.8412, rounded to f16 by the table, times 2.
        assert_eq!(g[3], f16::from_f32(gelu_ggml_f32(1.0)).to_f32() * 2.0);
        assert!((g[3] - 2.0 * 0.841_192).abs() < 2e-3, "{}", g[3]);
        assert!((g[4] + 2.0 * 0.158_808).abs() < 1e-3, "{}", g[4]);
        // The input itself is rounded to f16 before the lookup.
        let x = 1.000_3f32;
        let mut h = vec![x];
        geglu(&mut h, &[1.0]);
        assert_eq!(h[0], f16::from_f32(gelu_ggml_f32(1.0)).to_f32());
    }

    #[test]
    fn softcap_bounds_values() {
        let mut x = vec![0.0f32, 1.0, 1000.0, -1000.0];
        softcap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 30.0 * (1.0f32 / 30.0).tanh()).abs() < 1e-6);
        assert_eq!(x[2], 30.0);
        assert_eq!(x[3], -30.0);
    }

    #[test]
    fn attention_softcap_zero_is_plain_attention() {
        let q = vec![0.7f32; 8];
        let k: Vec<Vec<f16>> = (0..5)
            .map(|j| {
                (0..8)
                    .map(|i| f16::from_f32((i * j) as f32 * 0.1 - 1.0))
                    .collect()
            })
            .collect();
        let v = k.clone();
        let (mut a, mut b, mut c) = (vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 8]);
        let mut sc = AttnScratch::default();
        attend_one_f16(&q, 5, 0.3, |j| &k[j], |j| &v[j], &mut sc, &mut a);
        attend_one_f16_softcap(&q, 5, 0.3, 0.0, |j| &k[j], |j| &v[j], &mut sc, &mut b);
        assert_eq!(a, b);
        // A tiny cap flattens the scores: the output tends to the mean of the values.
        attend_one_f16_softcap(&q, 5, 0.3, 1e-6, |j| &k[j], |j| &v[j], &mut sc, &mut c);
        let mean0: f32 = v.iter().map(|r| r[0].to_f32()).sum::<f32>() / 5.0;
        assert!((c[0] - mean0).abs() < 1e-2, "{} vs {mean0}", c[0]);
    }

    #[test]
    fn attention_over_identical_keys_averages_values() {
        let q = vec![1.0f32; 4];
        let k = [vec![0.5f32; 4], vec![0.5f32; 4], vec![0.5f32; 4]];
        let v = [vec![1.0f32; 4], vec![2.0f32; 4], vec![6.0f32; 4]];
        let mut scores = vec![0.0; 3];
        let mut out = vec![0.0; 4];
        attend_one(&q, 3, 0.5, |j| &k[j], |j| &v[j], &mut scores, &mut out);
        for o in out {
            assert!((o - 3.0).abs() < 1e-6);
        }
        // Only the first position visible: the output is its value.
        let mut out1 = vec![0.0; 4];
        attend_one(&q, 1, 0.5, |j| &k[j], |j| &v[j], &mut scores, &mut out1);
        assert_eq!(out1, vec![1.0; 4]);
    }

    proptest! {
        #[test]
        fn f16_simd_kernels_equal_scalar(v in proptest::collection::vec((-60.0f32..60.0, -60.0f32..60.0), 0..200), s in -2.0f32..2.0) {
            let a: Vec<f16> = v.iter().map(|p| f16::from_f32(p.0)).collect();
            let b: Vec<f16> = v.iter().map(|p| f16::from_f32(p.1)).collect();
            prop_assert_eq!(dot_f16(&a, &b).to_bits(), dot_f16_scalar(&a, &b).to_bits());
            let (mut y1, mut y2) = (a.clone(), a.clone());
            mad_f16(&mut y1, &b, s);
            mad_f16_scalar(&mut y2, &b, s);
            prop_assert_eq!(&y1, &y2);
            scale_f16(&mut y1, s);
            scale_f16_scalar(&mut y2, s);
            prop_assert_eq!(y1, y2);
        }

        #[test]
        fn swiglu_simd_equals_scalar_and_exact(v in proptest::collection::vec((-120.0f32..120.0, -4.0f32..4.0), 0..100)) {
            let g: Vec<f32> = v.iter().map(|p| p.0).collect();
            let u: Vec<f32> = v.iter().map(|p| p.1).collect();
            let (mut a, mut b) = (g.clone(), g.clone());
            swiglu(&mut a, &u);
            swiglu_scalar(&mut b, &u);
            for (x, y) in a.iter().zip(&b) {
                prop_assert_eq!(x.to_bits(), y.to_bits());
            }
            for ((x, gv), uv) in a.iter().zip(&g).zip(&u) {
                let exact = (*gv as f64 / (1.0 + (-*gv as f64).exp())) * *uv as f64;
                prop_assert!((*x as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()), "{} vs {}", x, exact);
            }
        }

        #[test]
        fn grouped_f16_attention_equals_per_head_bit_for_bit(seed in 0u64..1000, n_kv in 1usize..50, nh in 1usize..5) {
            let d = 64;
            let mut st = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rnd = || { st ^= st << 13; st ^= st >> 7; st ^= st << 17; ((st >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 };
            let q: Vec<f32> = (0..nh * d).map(|_| rnd() * 4.0).collect();
            let k: Vec<Vec<f16>> = (0..n_kv).map(|_| (0..d).map(|_| f16::from_f32(rnd() * 2.0)).collect()).collect();
            let v: Vec<Vec<f16>> = (0..n_kv).map(|_| (0..d).map(|_| f16::from_f32(rnd())).collect()).collect();
            let mut a = vec![0.0f32; nh * d];
            let mut b = vec![0.0f32; nh * d];
            attend_heads_f16(&q, d, n_kv, 0.125, |j| &k[j], |j| &v[j], &mut AttnScratch::default(), &mut a);
            attend_heads_f16_scalar(&q, d, n_kv, 0.125, |j| &k[j], |j| &v[j], &mut AttnScratch::default(), &mut b);
            for (x, y) in a.iter().zip(&b) {
                prop_assert_eq!(x.to_bits(), y.to_bits());
            }
        }

        #[test]
        fn f16_attention_matches_exact_softmax(seed in 0u64..1000, n_kv in 1usize..40) {
            let d = 64;
            let mut st = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rnd = || { st ^= st << 13; st ^= st >> 7; st ^= st << 17; ((st >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 };
            let q: Vec<f32> = (0..d).map(|_| rnd() * 3.0).collect();
            let k: Vec<Vec<f16>> = (0..n_kv).map(|_| (0..d).map(|_| f16::from_f32(rnd())).collect()).collect();
            let v: Vec<Vec<f16>> = (0..n_kv).map(|_| (0..d).map(|_| f16::from_f32(rnd())).collect()).collect();
            let mut out = vec![0.0f32; d];
            attend_one_f16(&q, n_kv, 0.125, |j| &k[j], |j| &v[j], &mut AttnScratch::default(), &mut out);
            let kf: Vec<Vec<f32>> = k.iter().map(|r| r.iter().map(|x| x.to_f32()).collect()).collect();
            let vf: Vec<Vec<f32>> = v.iter().map(|r| r.iter().map(|x| x.to_f32()).collect()).collect();
            let mut exact = vec![0.0f32; d];
            let mut scores = vec![0.0f32; n_kv];
            attend_one(&q, n_kv, 0.125, |j| &kf[j], |j| &vf[j], &mut scores, &mut exact);
            for (a, b) in out.iter().zip(&exact) {
                prop_assert!((a - b).abs() < 4e-3, "{} vs {}", a, b);
            }
        }

        #[test]
        fn dot_simd_equals_scalar(v in proptest::collection::vec((-100.0f32..100.0, -100.0f32..100.0), 0..300)) {
            let a: Vec<f32> = v.iter().map(|p| p.0).collect();
            let b: Vec<f32> = v.iter().map(|p| p.1).collect();
            prop_assert_eq!(dot_f32(&a, &b).to_bits(), dot_f32_scalar(&a, &b).to_bits());
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let tol = 1e-4 * (1.0 + a.iter().zip(&b).map(|(x, y)| (x * y).abs() as f64).sum::<f64>());
            prop_assert!((dot_f32(&a, &b) as f64 - naive).abs() <= tol);
        }
    }
}
