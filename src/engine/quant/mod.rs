//! ggml block formats: layouts, dequantization, reference quantizers, activation quantization.
//!
//! Everything here is scalar and safe; the dot products and matmul live in [`crate::engine::kernels`].
//! Ported from llama.cpp commit 0c1e570: `ggml/src/ggml-common.h` (layouts), `ggml/src/ggml-quants.c`
//! (dequantizers, reference quantizers).

pub mod blocks;
mod dequant;
mod quantize;

use crate::engine::ggml_type::GgmlType;
use thiserror::Error;

pub use blocks::{QK, QK_K};

/// Errors of the quantization layer.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum QuantError {
    /// The operation is not implemented for this tensor type.
    #[error("{op} is not supported for tensor type {ty}")]
    UnsupportedType {
        /// The tensor type.
        ty: GgmlType,
        /// What was asked (`"dequantize"`, `"quantize"` …).
        op: &'static str,
    },
    /// A row's element count is not a multiple of the type's block size.
    #[error("{ty}: {n} elements is not a multiple of the block size {block}")]
    NotBlockMultiple {
        /// The tensor type.
        ty: GgmlType,
        /// Elements in the row.
        n: usize,
        /// The type's block size.
        block: usize,
    },
    /// The quantized buffer has the wrong number of bytes for the element count.
    #[error("{ty}: {n} elements need {expected} bytes, got {got}")]
    ByteLen {
        /// The tensor type.
        ty: GgmlType,
        /// Elements in the row.
        n: usize,
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The f32 side has a different element count than the other side.
    #[error("f32 buffer has {got} elements, expected {expected}")]
    FloatLen {
        /// Elements needed.
        expected: usize,
        /// Elements given.
        got: usize,
    },
}

/// Bytes of `n` elements of `ty`, checking that `n` is a multiple of its block size.
///
/// # Errors
/// [`QuantError::NotBlockMultiple`].
pub fn row_bytes(ty: GgmlType, n: usize) -> Result<usize, QuantError> {
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(QuantError::NotBlockMultiple { ty, n, block });
    }
    Ok(n / block * ty.type_size())
}

fn check_bytes(ty: GgmlType, n: usize, got: usize) -> Result<(), QuantError> {
    let expected = row_bytes(ty, n)?;
    if expected != got {
        return Err(QuantError::ByteLen {
            ty,
            n,
            expected,
            got,
        });
    }
    Ok(())
}

/// Whether [`dequantize_row`] supports `ty`.
pub fn can_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
            | IQ4_NL
            | IQ4_XS
            | MXFP4
    )
}

/// Dequantizes `dst.len()` elements stored as `ty` in `src` (little-endian blocks, as in GGUF) to f32,
/// bit-exact with ggml's `to_float` for the type.
///
/// # Errors
/// [`QuantError::UnsupportedType`] for a type without a dequantizer ([`can_dequantize`]),
/// [`QuantError::NotBlockMultiple`] when `dst.len()` is not a multiple of the block size,
/// [`QuantError::ByteLen`] when `src.len() != ty.row_bytes(dst.len())`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    use GgmlType::*;
    if !can_dequantize(ty) {
        return Err(QuantError::UnsupportedType {
            ty,
            op: "dequantize",
        });
    }
    check_bytes(ty, dst.len(), src.len())?;
    match ty {
        F32 => dequant::f32_row(src, dst),
        F16 => dequant::f16_row(src, dst),
        BF16 => dequant::bf16_row(src, dst),
        Q4_0 => dequant::q4_0(src, dst),
        Q4_1 => dequant::q4_1(src, dst),
        Q5_0 => dequant::q5_0(src, dst),
        Q5_1 => dequant::q5_1(src, dst),
        Q8_0 => dequant::q8_0(src, dst),
        Q8_1 => dequant::q8_1(src, dst),
        Q2_K => dequant::q2_k(src, dst),
        Q3_K => dequant::q3_k(src, dst),
        Q4_K => dequant::q4_k(src, dst),
        Q5_K => dequant::q5_k(src, dst),
        Q6_K => dequant::q6_k(src, dst),
        Q8_K => dequant::q8_k(src, dst),
        IQ4_NL => dequant::iq4_nl(src, dst),
        IQ4_XS => dequant::iq4_xs(src, dst),
        MXFP4 => dequant::mxfp4(src, dst),
        _ => unreachable!("can_dequantize checked the type"),
    }
    Ok(())
}

/// Whether [`quantize_row`] supports `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | Q8_K | IQ4_NL
    )
}

/// Quantizes the f32 row `src` to `ty` into `dst` (`ty.row_bytes(src.len())` bytes).
///
/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 are ggml's `quantize_row_*_ref` (byte-identical); Q8_1 and Q8_K are the
/// activation formats (`quantize_row_q8_1_ref`, `quantize_row_q8_K_ref`); IQ4_NL is
/// `quantize_row_iq4_nl_ref`; F16 rounds to nearest even, BF16
/// as `ggml_fp32_to_bf16` (round to nearest even, NaN kept quiet); F32 copies.
///
/// # Errors
/// [`QuantError::UnsupportedType`] ([`can_quantize`]), [`QuantError::NotBlockMultiple`],
/// [`QuantError::ByteLen`].
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    use GgmlType::*;
    if !can_quantize(ty) {
        return Err(QuantError::UnsupportedType { ty, op: "quantize" });
    }
    check_bytes(ty, src.len(), dst.len())?;
    match ty {
        F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        F16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&blocks::F16Le::from_f32(*s).0);
            }
        }
        BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&fp32_to_bf16_bits(*s).to_le_bytes());
            }
        }
        Q4_0 => quantize::q4_0(src, bytemuck::cast_slice_mut(dst)),
        Q4_1 => quantize::q4_1(src, bytemuck::cast_slice_mut(dst)),
        Q5_0 => quantize::q5_0(src, bytemuck::cast_slice_mut(dst)),
        Q5_1 => quantize::q5_1(src, bytemuck::cast_slice_mut(dst)),
        Q8_0 => quantize::q8_0(src, bytemuck::cast_slice_mut(dst)),
        Q8_1 => quantize::q8_1(src, bytemuck::cast_slice_mut(dst)),
        Q8_K => quantize::q8_k(src, bytemuck::cast_slice_mut(dst)),
        IQ4_NL => quantize::iq4_nl(src, bytemuck::cast_slice_mut(dst), 7),
        _ => unreachable!("can_quantize checked the type"),
    }
    Ok(())
}

/// Quantizes one activation row `src` into `dst` for the integer dot products: as [`quantize_row`], except
/// that Q8_0 and Q8_1 follow ggml-cpu's x86 activation quantizers (multiplier `127/amax`, round half to even)
/// instead of the reference ones, so that activations match llama.cpp's bit for bit (Q8_K is the reference
/// quantizer in ggml-cpu too), and IQ4_NL is `quantize_row_iq4_nl_ref` (no scale search). This is ggml-cpu's
/// `from_float` for the type: also how rows are stored into a quantized KV cache (`ggml_set_rows`).
///
/// # Errors
/// As [`quantize_row`].
pub fn quantize_row_activation(
    ty: GgmlType,
    src: &[f32],
    dst: &mut [u8],
) -> Result<(), QuantError> {
    match ty {
        GgmlType::Q8_0 => {
            check_bytes(ty, src.len(), dst.len())?;
            quantize::q8_0_act(src, bytemuck::cast_slice_mut(dst));
            Ok(())
        }
        GgmlType::Q8_1 => {
            check_bytes(ty, src.len(), dst.len())?;
            quantize::q8_1_act(src, bytemuck::cast_slice_mut(dst));
            Ok(())
        }
        GgmlType::IQ4_NL => {
            check_bytes(ty, src.len(), dst.len())?;
            quantize::iq4_nl(src, bytemuck::cast_slice_mut(dst), -1);
            Ok(())
        }
        _ => quantize_row(ty, src, dst),
    }
}

/// `ggml_compute_fp32_to_bf16` (ggml-impl.h): round to nearest even; NaN becomes a quiet NaN.
pub fn fp32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// The type that activations are quantized to for an integer (or float) dot product with weights of type
/// `ty` (ggml's `vec_dot_type` in `ggml-cpu.c` type traits), or `None` when there is no dot product for `ty`.
///
/// Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4 → Q8_0; Q4_1, Q5_1 → Q8_1; Q2_K…Q6_K, IQ4_XS → Q8_K; F32 → F32; F16 → F16;
/// BF16 → BF16.
pub fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    Some(match ty {
        F32 => F32,
        F16 => F16,
        BF16 => BF16,
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | MXFP4 => Q8_0,
        Q4_1 | Q5_1 => Q8_1,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => Q8_K,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lengths_are_typed_errors() {
        let mut out = vec![0f32; 32];
        assert_eq!(
            dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut out),
            Err(QuantError::ByteLen {
                ty: GgmlType::Q4_0,
                n: 32,
                expected: 18,
                got: 17
            })
        );
        let mut out = vec![0f32; 31];
        assert!(matches!(
            dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut out),
            Err(QuantError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            dequantize_row(GgmlType::IQ2_XXS, &[0u8; 66], &mut [0f32; 256]),
            Err(QuantError::UnsupportedType { .. })
        ));
    }

    #[test]
    fn quantize_then_dequantize_is_close_for_every_quantizer() {
        let x: Vec<f32> = (0..512).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        for (ty, tol) in [
            (GgmlType::Q4_0, 0.4),
            (GgmlType::Q4_1, 0.25),
            (GgmlType::Q5_0, 0.2),
            (GgmlType::Q5_1, 0.12),
            (GgmlType::Q8_0, 0.02),
            (GgmlType::Q8_1, 0.02),
            (GgmlType::Q8_K, 0.02),
            (GgmlType::F16, 0.002),
            (GgmlType::BF16, 0.02),
            (GgmlType::F32, 0.0),
        ] {
            let mut q = vec![0u8; row_bytes(ty, x.len()).unwrap()];
            quantize_row(ty, &x, &mut q).unwrap();
            let mut y = vec![0f32; x.len()];
            dequantize_row(ty, &q, &mut y).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= tol, "{ty}: max error {err}");
        }
    }
}
