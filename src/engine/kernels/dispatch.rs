//! Picks the instruction set once per process and hands out the matching dot-product kernels.
//!
//! The choice is made on first use from run-time CPU detection (`is_x86_feature_detected!`), so a default
//! `cargo build` uses AVX2 (and AVX-512 VNNI where the CPU has it) on a machine that has them.
//! `CYBER_INFERENCE_ISA` overrides it: `scalar` forces the scalar oracles, `avx2` the AVX2 kernels without the
//! AVX-512/VNNI ones (to measure the AVX2 paths on an AVX-512 machine), `avx512` and `neon` ask for those
//! explicitly; any other value, or an ISA this CPU lacks, is an error that [`check_isa`] reports at start-up
//! (`Model::load` calls it). On aarch64 NEON is always present, so the choice there is [`Isa::Neon`]; its
//! kernels pick `sdot` or plain NEON by `is_aarch64_feature_detected!("dotprod")`.

use super::{KernelError, scalar};
use crate::engine::ggml_type::GgmlType;
use crate::engine::gguf::GgufFile;
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
        Isa::Scalar | Isa::Avx2 | Isa::Neon => None,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            super::x86::Vnni::detect().and_then(|proof| super::x86::vec_dot4x4_fn_vnni(proof, ty))
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 => None,
    }
}

/// The four-token kernel of the process's [`isa`] for weights of type `ty`, where one exists.
pub fn vec_dot4_fn(ty: GgmlType) -> Option<VecDot4Fn> {
    match isa() {
        Isa::Scalar => scalar_vec_dot4_fn(ty),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            super::x86::Avx2::detect().and_then(|proof| super::x86::vec_dot4_fn(proof, ty))
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => super::x86::Vnni::detect()
            .and_then(|proof| super::x86::vec_dot4_fn_vnni(proof, ty))
            .or_else(|| {
                super::x86::Avx2::detect().and_then(|proof| super::x86::vec_dot4_fn(proof, ty))
            }),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => scalar_vec_dot4_fn(ty),
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
    /// x86-64 AVX2 kernels plus the AVX-512 VNNI ones where they exist (AVX512F + VNNI + VL).
    Avx512,
    /// aarch64 NEON (with `sdot` where the CPU has the dot-product extension).
    Neon,
}

impl Isa {
    /// A short name for logs and for `CYBER_INFERENCE_ISA` (`"scalar"`, `"avx2"`, `"avx512"`, `"neon"`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::x86::Avx2::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => super::x86::Vnni::detect().is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
            Isa::Neon => cfg!(target_arch = "aarch64"),
        }
    }
}

/// The environment variable that overrides the detected instruction set.
pub const ISA_ENV: &str = "CYBER_INFERENCE_ISA";

/// The best instruction set of this CPU.
fn detect() -> Isa {
    // NEON is part of every aarch64 CPU (the dot-product extension is detected by the kernels themselves).
    [Isa::Avx512, Isa::Avx2, Isa::Neon]
        .into_iter()
        .find(|i| i.available())
        .unwrap_or(Isa::Scalar)
}

/// The instruction set asked for by `value` (the content of [`ISA_ENV`]; `None` or empty: detect).
///
/// # Errors
/// [`KernelError::BadIsa`] for an unknown name or an ISA this CPU cannot run.
pub fn isa_from_env_value(value: Option<&str>) -> Result<Isa, KernelError> {
    let v = match value.map(str::trim) {
        None | Some("") => return Ok(detect()),
        Some(v) => v,
    };
    let all = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];
    let Some(want) = all.into_iter().find(|i| i.name() == v) else {
        return Err(KernelError::BadIsa {
            value: v.to_string(),
            why: "unknown instruction set (expected scalar, avx2, avx512 or neon)".into(),
        });
    };
    if !want.available() {
        return Err(KernelError::BadIsa {
            value: v.to_string(),
            why: "this CPU cannot run it".into(),
        });
    }
    Ok(want)
}

fn chosen() -> &'static Result<Isa, KernelError> {
    static ISA: OnceLock<Result<Isa, KernelError>> = OnceLock::new();
    ISA.get_or_init(|| match std::env::var(ISA_ENV) {
        Ok(v) => isa_from_env_value(Some(&v)),
        Err(std::env::VarError::NotPresent) => isa_from_env_value(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(KernelError::BadIsa {
            value: v.to_string_lossy().into_owned(),
            why: "not UTF-8".into(),
        }),
    })
}

/// Checks `CYBER_INFERENCE_ISA` once at start-up and returns the instruction set the kernels will use.
///
/// # Errors
/// [`KernelError::BadIsa`] naming the variable's value and why it cannot be used.
pub fn check_isa() -> Result<Isa, KernelError> {
    chosen().clone()
}

/// The instruction set chosen for this process (decided once). Where `CYBER_INFERENCE_ISA` is invalid
/// ([`check_isa`] reports it, and `Model::load` refuses to start), this is the detected one.
pub fn isa() -> Isa {
    match chosen() {
        Ok(i) => *i,
        Err(_) => detect(),
    }
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
        MXFP4 => scalar::mxfp4_q8_0,
        _ => return None,
    })
}

/// The fastest kernel of the process's [`isa`] for weights of type `ty` (the scalar one where no SIMD
/// version exists), or `None` when `ty` has no dot product.
pub fn vec_dot_fn(ty: GgmlType) -> Option<VecDotFn> {
    match isa() {
        Isa::Scalar => scalar_vec_dot_fn(ty),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::x86::Avx2::detect()
            .and_then(|proof| super::x86::vec_dot_fn(proof, ty))
            .or_else(|| scalar_vec_dot_fn(ty)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => super::x86::Vnni::detect()
            .and_then(|proof| super::x86::vec_dot_fn_vnni(proof, ty))
            .or_else(|| {
                super::x86::Avx2::detect().and_then(|proof| super::x86::vec_dot_fn(proof, ty))
            })
            .or_else(|| scalar_vec_dot_fn(ty)),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => scalar_vec_dot_fn(ty),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => super::neon::vec_dot_fn(ty).or_else(|| scalar_vec_dot_fn(ty)),
        #[cfg(not(target_arch = "aarch64"))]
        Isa::Neon => scalar_vec_dot_fn(ty),
    }
}

/// The tensors of `f` whose type no kernel of this engine can read (no dot product, hence no matmul and no
/// row lookup), each with its type, in file order: empty when every tensor's type is supported. This is the
/// tensor-type part of "can this GGUF run"; `Model::load` refuses such a file naming the first one.
pub fn unsupported_tensor_types(f: &GgufFile) -> Vec<(String, GgmlType)> {
    f.tensors()
        .iter()
        .filter(|t| !tensor_type_supported(t.ty))
        .map(|t| (t.name.clone(), t.ty))
        .collect()
}

/// Whether tensors of type `ty` can be used by the engine: it has a dot product (the scalar oracle at
/// least), and therefore a dequantizer too.
pub fn tensor_type_supported(ty: GgmlType) -> bool {
    scalar_vec_dot_fn(ty).is_some() && crate::engine::quant::can_dequantize(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF image (version 3, no metadata) with one 1-D tensor of 256 elements per type in `tys`.
    fn gguf_with(tys: &[GgmlType]) -> Vec<u8> {
        let mut ti = Vec::new();
        let mut offset = 0u64;
        for (i, ty) in tys.iter().enumerate() {
            let name = format!("t{i}.{}", ty.name());
            ti.extend((name.len() as u64).to_le_bytes());
            ti.extend(name.as_bytes());
            ti.extend(1u32.to_le_bytes());
            ti.extend(256u64.to_le_bytes());
            ti.extend(ty.id().to_le_bytes());
            ti.extend(offset.to_le_bytes());
            offset += ty.row_bytes(256).unwrap().div_ceil(32) * 32;
        }
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tys.len() as u64).to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(ti);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.resize(b.len() + offset as usize, 0);
        b
    }

    /// The weight types people download, which must all run.
    const SUPPORTED: [GgmlType; 16] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q4_K,
        GgmlType::Q3_K,
        GgmlType::Q2_K,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
    ];

    #[test]
    fn every_known_type_is_either_supported_or_listed() {
        let f = GgufFile::from_bytes(gguf_with(&GgmlType::ALL)).unwrap();
        let bad = unsupported_tensor_types(&f);
        for (i, ty) in GgmlType::ALL.iter().enumerate() {
            let name = format!("t{i}.{}", ty.name());
            let listed = bad.iter().any(|(n, t)| *n == name && t == ty);
            assert_eq!(listed, !tensor_type_supported(*ty), "{ty}");
            // A supported type has a kernel for the dispatched ISA too.
            assert_eq!(
                vec_dot_fn(*ty).is_some(),
                tensor_type_supported(*ty),
                "{ty}"
            );
        }
        for ty in SUPPORTED {
            assert!(tensor_type_supported(ty), "{ty} must be supported");
        }
        // The activation formats, the IQ1/2/3 and ternary types, integers and F64 have no kernel.
        for ty in [
            GgmlType::Q8_1,
            GgmlType::Q8_K,
            GgmlType::IQ2_XXS,
            GgmlType::TQ1_0,
            GgmlType::I32,
        ] {
            assert!(bad.iter().any(|(_, t)| *t == ty), "{ty} must be listed");
        }
        let ok = GgufFile::from_bytes(gguf_with(&SUPPORTED)).unwrap();
        assert!(unsupported_tensor_types(&ok).is_empty());
    }

    #[test]
    fn isa_names_are_checked() {
        assert_eq!(isa_from_env_value(Some("scalar")).unwrap(), Isa::Scalar);
        assert_eq!(isa_from_env_value(None).unwrap(), detect());
        assert_eq!(isa_from_env_value(Some("")).unwrap(), detect());
        let e = isa_from_env_value(Some("avx9")).unwrap_err();
        assert!(e.to_string().contains("avx9"), "{e}");
        assert!(e.to_string().contains(ISA_ENV), "{e}");
        for i in [Isa::Avx2, Isa::Avx512, Isa::Neon] {
            assert_eq!(
                isa_from_env_value(Some(i.name())).is_ok(),
                i.available(),
                "{i:?}"
            );
        }
    }
}
