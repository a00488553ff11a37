//! The one place where the forward passes reach the quantized kernels (matmul, row dequantization and the
//! thread pool of `engine::kernels` / `engine::quant`), so that the model code never depends on a
//! particular kernel's signature.

use half::f16;

use crate::engine::ggml_type::GgmlType;
use crate::engine::gguf::GgufFile;

use super::ModelError;
use super::weights::Linear;

/// The worker threads of a context (wraps the kernels' thread pool).
pub struct Pool {
    n_threads: usize,
}

impl Pool {
    /// A pool of `n_threads` (≥ 1) threads.
    pub fn new(n_threads: usize) -> Pool {
        Pool {
            n_threads: n_threads.max(1),
        }
    }

    /// Number of threads.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }
}

/// `y = x · wᵀ`: `x` is `[n_tokens, w.n_cols]`, `y` is `[n_tokens, w.n_rows]` (row-major, one token per
/// row). Each output element is reduced in a fixed order, independent of `n_tokens` (batch invariance).
///
/// Errors: [`ModelError::UnsupportedTensorType`] for a type the kernels cannot multiply.
pub fn matmul(
    pool: &Pool,
    file: &GgufFile,
    w: &Linear,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), ModelError> {
    debug_assert_eq!(x.len(), n_tokens * w.n_cols);
    debug_assert_eq!(y.len(), n_tokens * w.n_rows);
    let _ = pool;
    let data = file.tensor_data(&w.info);
    let row_bytes = data.len() / w.n_rows;
    let mut row = vec![0.0f32; w.n_cols];
    for r in 0..w.n_rows {
        decode_row(w, &data[r * row_bytes..(r + 1) * row_bytes], &mut row)?;
        for t in 0..n_tokens {
            y[t * w.n_rows + r] =
                crate::engine::kernels::ops::dot_f32(&row, &x[t * w.n_cols..(t + 1) * w.n_cols]);
        }
    }
    Ok(())
}

/// Copies row `row` of `w` (an embedding table) into `dst` (`[w.n_cols]`) as f32.
///
/// Errors: [`ModelError::BadToken`] when `row ≥ w.n_rows`, [`ModelError::UnsupportedTensorType`].
pub fn get_row(file: &GgufFile, w: &Linear, row: usize, dst: &mut [f32]) -> Result<(), ModelError> {
    if row >= w.n_rows {
        return Err(ModelError::BadToken {
            token: row as u64,
            n_vocab: w.n_rows,
        });
    }
    let data = file.tensor_data(&w.info);
    let row_bytes = data.len() / w.n_rows;
    decode_row(w, &data[row * row_bytes..(row + 1) * row_bytes], dst)
}

fn decode_row(w: &Linear, bytes: &[u8], dst: &mut [f32]) -> Result<(), ModelError> {
    match w.ty {
        GgmlType::F32 => {
            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            Ok(())
        }
        GgmlType::F16 => {
            for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
            Ok(())
        }
        ty => Err(ModelError::UnsupportedTensorType {
            name: w.name.clone(),
            ty: ty.name().to_string(),
        }),
    }
}
