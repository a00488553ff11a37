//! The one place where the forward passes reach the quantized kernels (`engine::kernels::matmul`,
//! `engine::quant::dequantize_row` and the kernels' thread pool), so that the model code never depends on a
//! particular kernel's signature.

use crate::engine::gguf::GgufFile;
use crate::engine::kernels::{self, KernelError, QMatrix, ThreadPool};
use crate::engine::quant;

use super::ModelError;
use super::weights::Linear;

/// The worker threads of a context (the kernels' persistent pool).
pub struct Pool {
    pool: ThreadPool,
}

impl Pool {
    /// A pool of `n_threads` (0 is taken as 1) threads, the caller included.
    pub fn new(n_threads: usize) -> Pool {
        Pool {
            pool: ThreadPool::new(n_threads.max(1)),
        }
    }

    /// Threads that run tasks.
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Runs `f(i)` for `i in 0..n_tasks` over the pool's threads.
    pub fn parallel_for<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        self.pool.parallel_for(n_tasks, f);
    }
}

fn kernel_err(w: &Linear, e: KernelError) -> ModelError {
    match e {
        KernelError::UnsupportedType(ty) => ModelError::UnsupportedTensorType {
            name: w.name.clone(),
            ty: ty.name().to_string(),
        },
        e => ModelError::Unsupported(format!("matmul with {}: {e}", w.name)),
    }
}

/// `y = x · wᵀ`: `x` is `[n_tokens, w.n_cols]`, `y` is `[n_tokens, w.n_rows]` (row-major, one token per
/// row). Each output element is reduced in a fixed order, independent of `n_tokens` and of the thread
/// count (the kernels' batch invariance).
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
    let m = QMatrix::new(w.ty, file.tensor_data(&w.info), w.n_rows, w.n_cols)
        .map_err(|e| kernel_err(w, e))?;
    kernels::matmul(&pool.pool, &m, x, n_tokens, y).map_err(|e| kernel_err(w, e))
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
    let m = QMatrix::new(w.ty, file.tensor_data(&w.info), w.n_rows, w.n_cols)
        .map_err(|e| kernel_err(w, e))?;
    let bytes = m.row(row).ok_or(ModelError::BadToken {
        token: row as u64,
        n_vocab: w.n_rows,
    })?;
    quant::dequantize_row(w.ty, bytes, dst).map_err(|e| ModelError::UnsupportedTensorType {
        name: w.name.clone(),
        ty: format!("{} ({e})", w.ty.name()),
    })
}
