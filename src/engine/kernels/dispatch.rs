//! Picks the instruction set once per process and hands out the matching dot-product kernels.
//!
//! The choice is made on first use from run-time CPU detection (`is_x86_feature_detected!`), so a default
//! `cargo build` uses AVX2 on a machine that has it. `CYBER_INFERENCE_ISA=scalar` forces the scalar oracles
//! (for debugging and for comparing against them). On aarch64 NEON is always present, so the choice there is
//! [`Isa::Neon`]; its kernels pick `sdot` or plain NEON by `is_aarch64_feature_detected!("dotprod")`.

use super::scalar;
use crate::engine::ggml_type::GgmlType;
use std::sync::OnceLock;

/// `fn(n, w, a) -> Σ w·a`: `n` elements, `w` a weight row of the kernel's type, `a` an activation row of
/// its vec-dot type. Callers pass rows of at least the right byte length (SIMD versions check it and
/// panic otherwise: the public entry points validate first).
pub type VecDotFn = fn(usize, &[u8], &[u8]) -> f32;

/// `fn(n, w, [a0, a1, a2, a3]) -> [Σ w·a0, …]`: one weight row against four activation rows, each result
/// bit-identical to the [`VecDotFn`] of the same type (prompt processing decodes a weight block once).
pub type VecDot4Fn = fn(usize, &[u8], [&[u8]; 4]) -> [f32; 4];

/// `fn(n, [w0, w1, w2, w3], [a0, a1, a2, a3]) -> out` with `out[r][t] = Σ w_r·a_t`: a tile of four weight
/// rows against four activation rows, each result bit-identical to the [`VecDotFn`] of the same type
/// (activation blocks are loaded once for four rows, weight blocks decoded once for four tokens).
pub type VecDot4x4Fn = fn(usize, [&[u8]; 4], [&[u8]; 4]) -> [[f32; 4]; 4];

/// The four-row, four-token tile kernel of the process's [`isa`] for weights of type `ty`, where one exists
/// (x86 with AVX-512 VNNI: Q4_0, Q4_1, Q5_0, Q8_0).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn vec_dot4x4_fn(ty: GgmlType) -> Option<VecDot4x4Fn> {
    match isa() {
        Isa::Scalar => None,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            super::x86::Vnni::detect().and_then(|proof| super::x86::vec_dot4x4_fn_vnni(proof, ty))
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => None,
        Isa::Neon => None,
    }
}

/// The four-token kernel of the process's [`isa`] for weights of type `ty`, where one exists.
pub fn vec_dot4_fn(ty: GgmlType) -> Option<VecDot4Fn> {
    match isa() {
        Isa::Scalar => scalar_vec_dot4_fn(ty),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::x86::Vnni::detect()
            .and_then(|proof| super::x86::vec_dot4_fn_vnni(proof, ty))
            .or_else(|| {
                super::x86::Avx2::detect().and_then(|proof| super::x86::vec_dot4_fn(proof, ty))
            }),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => scalar_vec_dot4_fn(ty),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => super::neon::vec_dot4_fn(ty),
        #[cfg(not(target_arch = "aarch64"))]
        Isa::Neon => scalar_vec_dot4_fn(ty),
    }
}

/// The scalar four-token kernel for weights of type `ty` (Q4_K, Q6_K), where one exists: each result is
/// bit-identical to [`scalar_vec_dot_fn`]'s for that token.
pub fn scalar_vec_dot4_fn(ty: GgmlType) -> Option<VecDot4Fn> {
    match ty {
        GgmlType::Q4_K => Some(scalar::q4_k_q8_k_x4),
        GgmlType::Q6_K => Some(scalar::q6_k_q8_k_x4),
        _ => None,
    }
}

/// The instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust; the oracle.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// aarch64 NEON (with `sdot` where the CPU has the dot-product extension).
    Neon,
}

impl Isa {
    /// A short name for logs (`"scalar"`, `"avx2"`, `"neon"`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
        }
    }
}

fn detect() -> Isa {
    if std::env::var("CYBER_INFERENCE_ISA").is_ok_and(|v| v == "scalar") {
        return Isa::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if super::x86::Avx2::detect().is_some() {
            return Isa::Avx2;
        }
    }
    // NEON is part of every aarch64 CPU (the dot-product extension is detected by the kernels themselves).
    #[cfg(target_arch = "aarch64")]
    return Isa::Neon;
    #[cfg(not(target_arch = "aarch64"))]
    Isa::Scalar
}

/// The instruction set chosen for this process (detected once).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

/// The scalar oracle for weights of type `ty`, or `None` when `ty` has no dot product.
pub fn scalar_vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    use GgmlType::*;
    Some(match ty {
        F32 => scalar::f32_f32,
        F16 => scalar::f16_f16,
        BF16 => scalar::bf16_bf16,
        Q4_0 => scalar::q4_0_q8_0,
        Q4_1 => scalar::q4_1_q8_1,
        Q5_0 => scalar::q5_0_q8_0,
        Q5_1 => scalar::q5_1_q8_1,
        Q8_0 => scalar::q8_0_q8_0,
        IQ4_NL => scalar::iq4_nl_q8_0,
        Q2_K => scalar::q2_k_q8_k,
        Q3_K => scalar::q3_k_q8_k,
        Q4_K => scalar::q4_k_q8_k,
        Q5_K => scalar::q5_k_q8_k,
        Q6_K => scalar::q6_k_q8_k,
        IQ4_XS => scalar::iq4_xs_q8_k,
        _ => return None,
    })
}

/// The fastest kernel of the process's [`isa`] for weights of type `ty` (the scalar one where no SIMD
/// version exists), or `None` when `ty` has no dot product.
pub fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    match isa() {
        Isa::Scalar => scalar_vec_dot_fn(ty),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::x86::Vnni::detect()
            .and_then(|proof| super::x86::vec_dot_fn_vnni(proof, ty))
            .or_else(|| {
                super::x86::Avx2::detect().and_then(|proof| super::x86::vec_dot_fn(proof, ty))
            })
            .or_else(|| scalar_vec_dot_fn(ty)),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => scalar_vec_dot_fn(ty),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => super::neon::vec_dot_fn(ty).or_else(|| scalar_vec_dot_fn(ty)),
        #[cfg(not(target_arch = "aarch64"))]
        Isa::Neon => scalar_vec_dot_fn(ty),
    }
}
