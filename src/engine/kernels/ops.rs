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
/// `x` and `weight` have the same length (`n_embd`, or `head_dim` for per-head q/k norms). The sum of
/// squares is accumulated in f64 in index order, as `ggml_compute_forward_rms_norm_f32` does.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), weight.len());
    let mut sum = 0.0f64;
    for &v in x.iter() {
        sum += (v as f64) * (v as f64);
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
    let half = p.n_dims / 2;
    let theta_scale = p.freq_base.powf(-2.0 / p.n_dims as f32);
    let mut cos = Vec::with_capacity(half);
    let mut sin = Vec::with_capacity(half);
    let mut theta_extrap = pos as f32;
    for i in 0..half {
        let ff = freq_factors.map_or(1.0, |f| f.get(i).copied().unwrap_or(1.0));
        let theta = (theta_extrap / ff) * p.freq_scale;
        cos.push(theta.cos());
        sin.push(theta.sin());
        theta_extrap *= theta_scale;
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
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
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
/// (the SwiGLU of llama-family FFNs, `ggml_swiglu`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// SiLU of one value: `x / (1 + e^-x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU (tanh approximation, `ggml_gelu_f32`) in place:
/// `0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²)))`.
pub fn gelu(x: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_COEF_A: f32 = 0.044715;
    for v in x.iter_mut() {
        let t = *v;
        *v = 0.5 * t * (1.0 + (SQRT_2_OVER_PI * t * (1.0 + GELU_COEF_A * t * t)).tanh());
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
    let scores = &mut scores[..n_kv];
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot_f32(q, k_row(j)) * scale;
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
    fn activations() {
        assert!((silu(0.0)).abs() < 1e-7);
        assert!((silu(2.0) - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        let mut g = vec![0.0f32, 1.0, -1.0, 10.0];
        gelu(&mut g);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 0.841_192).abs() < 1e-4, "{}", g[1]);
        assert!((g[2] + 0.158_808).abs() < 1e-4, "{}", g[2]);
        assert!((g[3] - 10.0).abs() < 1e-4);
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
