//! The compute kernels: the only SIMD and `unsafe` of the engine, each with a scalar twin.
//!
//! - [`matmul`]: `y = x · Wᵀ` with `W` a [`QMatrix`] borrowed from the GGUF mmap, activations quantized per
//!   token to the weight type's vec-dot type (as ggml does), integer dot products per block.
//! - [`ThreadPool`]: a persistent pool that splits output rows (never a reduction).
//! - [`vec_dot`]: one row against one quantized activation row, with the ISA chosen once at start-up
//!   ([`isa`]); [`scalar`] holds the oracles the SIMD versions are tested against.
//!
//! **Batch invariance**: every output element `y[t, r]` is computed by the same dot-product function over
//! the same bytes (row `r` of `W`, token `t` quantized alone), whatever `n_tokens` and the thread count are,
//! so a token's result is bit-identical alone or in a batch.

mod dispatch;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod ops;
mod pool;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::engine::ggml_type::GgmlType;
use crate::engine::quant::{self, QuantError};
use thiserror::Error;

pub use dispatch::{
    ISA_ENV, Isa, VecDot4Fn, VecDot4x4Fn, VecDotFn, check_isa, isa, isa_from_env_value,
    scalar_vec_dot_fn, scalar_vec_dot4_fn, tensor_type_supported, unsupported_tensor_types,
    vec_dot_fn, vec_dot4_fn, vec_dot4x4_fn,
};
pub use pool::ThreadPool;

/// Errors of the kernel layer.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum KernelError {
    /// No dot product exists for this weight type.
    #[error("no matmul kernel for tensor type {0}")]
    UnsupportedType(GgmlType),
    /// A buffer or dimension does not match the others.
    #[error("shape mismatch in {op}: {what}")]
    Shape {
        /// The operation (`"matmul"`, `"vec_dot"`).
        op: &'static str,
        /// What is wrong, with the numbers.
        what: String,
    },
    /// Quantizing the activations failed (a row length that is not a block multiple).
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// `CYBER_INFERENCE_ISA` names an instruction set that is unknown or that this CPU cannot run.
    #[error("CYBER_INFERENCE_ISA={value:?}: {why}")]
    BadIsa {
        /// The variable's value.
        value: String,
        /// Why it cannot be used.
        why: String,
    },
}

/// A weight matrix borrowed from the GGUF mmap: `n_rows` rows of `n_cols` elements (ggml order:
/// ne0 = n_cols, ne1 = n_rows), `data.len() == n_rows * ty.row_bytes(n_cols)`.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    /// The weights' block type.
    pub ty: GgmlType,
    /// Row-major blocks, rows back to back.
    pub data: &'a [u8],
    /// Output features (ne1).
    pub n_rows: usize,
    /// Input features (ne0), a multiple of `ty.block_size()`.
    pub n_cols: usize,
}

impl<'a> QMatrix<'a> {
    /// Checks the sizes and builds the view.
    ///
    /// # Errors
    /// [`KernelError::Quant`] when `n_cols` is not a block multiple, [`KernelError::Shape`] when
    /// `data.len()` is not `n_rows` rows of `n_cols`.
    pub fn new(
        ty: GgmlType,
        data: &'a [u8],
        n_rows: usize,
        n_cols: usize,
    ) -> Result<Self, KernelError> {
        let m = Self {
            ty,
            data,
            n_rows,
            n_cols,
        };
        m.row_bytes()?;
        Ok(m)
    }

    /// Bytes per row, after checking that `data` holds exactly `n_rows` of them.
    ///
    /// # Errors
    /// As [`QMatrix::new`].
    pub fn row_bytes(&self) -> Result<usize, KernelError> {
        let rb = quant::row_bytes(self.ty, self.n_cols)?;
        match rb.checked_mul(self.n_rows) {
            Some(total) if total == self.data.len() => Ok(rb),
            _ => Err(KernelError::Shape {
                op: "matmul",
                what: format!(
                    "{} weights of {} rows x {} cols need {} bytes per row, data has {} bytes",
                    self.ty,
                    self.n_rows,
                    self.n_cols,
                    rb,
                    self.data.len()
                ),
            }),
        }
    }

    /// The bytes of row `r` (`r < n_rows`), or `None` when out of range or the shape is inconsistent.
    pub fn row(&self, r: usize) -> Option<&'a [u8]> {
        let rb = self.row_bytes().ok()?;
        self.data.get(r * rb..(r + 1) * rb)
    }
}

/// Tokens per tile in [`matmul`]: each weight row is used for this many tokens while it is in L1.
const TOKEN_TILE: usize = 8;

/// Quantizes the rows of `x` (`[n_tokens, n_cols]` row-major f32) to `vd_ty` into `out` (`n_tokens` rows of
/// `vd_ty.row_bytes(n_cols)` bytes), one token at a time (so a token's bytes never depend on the others).
///
/// # Errors
/// [`QuantError`] for a `vd_ty` that cannot be quantized to or a row length that is not a block multiple.
pub fn quantize_activations(
    vd_ty: GgmlType,
    x: &[f32],
    n_cols: usize,
    out: &mut [u8],
) -> Result<(), QuantError> {
    let arb = quant::row_bytes(vd_ty, n_cols)?;
    if n_cols == 0 {
        return Ok(());
    }
    for (xr, qr) in x.chunks_exact(n_cols).zip(out.chunks_exact_mut(arb)) {
        quant::quantize_row_activation(vd_ty, xr, qr)?;
    }
    Ok(())
}

/// A raw output pointer shared by the tasks of one matmul, each writing a disjoint set of elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own rows) and the pool joins them before the borrow ends.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static ACT_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y = x · Wᵀ`: `x` is `[n_tokens, w.n_cols]` row-major f32, `y` is `[n_tokens, w.n_rows]` row-major f32
/// (ggml's `mul_mat(W, x)`, ne0 of the result = `n_rows`).
///
/// Each token of `x` is quantized alone to the weights' vec-dot type ([`quant::vec_dot_type`]: Q8_0, Q8_1
/// or Q8_K for quantized weights; F16 for F16; BF16 for BF16; F32 stays F32), then every `y[t, r]` is one
/// [`vec_dot_fn`] call on row `r` and token `t`, or an entry of a [`vec_dot4_fn`] (one row, four tokens) or
/// [`vec_dot4x4_fn`] (four rows, four tokens) call, which are bit-identical to it. Rows are split over the
/// pool's threads; tokens are tiled so a weight row is read from memory once per tile. The result for a
/// token is bit-identical for any `n_tokens` and thread count.
///
/// # Errors
/// [`KernelError::UnsupportedType`] for a weight type without a dot product, [`KernelError::Shape`] when
/// `w.data`, `x` or `y` do not have the sizes above, [`KernelError::Quant`] when `n_cols` is not a multiple
/// of the block size.
pub fn matmul(
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let shape = |what: String| KernelError::Shape { op: "matmul", what };
    let wrb = w.row_bytes()?;
    let vd_ty = quant::vec_dot_type(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
    let dot = vec_dot_fn(w.ty).ok_or(KernelError::UnsupportedType(w.ty))?;
    // Tokens in fours share each decoded weight block; the results equal `dot`'s bit for bit.
    let dot4 = vec_dot4_fn(w.ty);
    // Four rows x four tokens share activation loads too, where a tile kernel exists (same bits again).
    let dot4x4 = vec_dot4x4_fn(w.ty);
    let (n_rows, n_cols) = (w.n_rows, w.n_cols);
    if n_tokens.checked_mul(n_cols) != Some(x.len()) {
        return Err(shape(format!(
            "x has {} values, expected n_tokens {} x n_cols {}",
            x.len(),
            n_tokens,
            n_cols
        )));
    }
    if n_tokens.checked_mul(n_rows) != Some(y.len()) {
        return Err(shape(format!(
            "y has {} values, expected n_tokens {} x n_rows {}",
            y.len(),
            n_tokens,
            n_rows
        )));
    }
    if n_tokens == 0 || n_rows == 0 {
        return Ok(());
    }
    let arb = quant::row_bytes(vd_ty, n_cols)?;
    ACT_SCRATCH.with(|cell| {
        let mut act = cell.borrow_mut();
        act.clear();
        act.resize(n_tokens * arb, 0);
        quantize_activations(vd_ty, x, n_cols, &mut act)?;
        let act: &[u8] = &act;

        let n_threads = pool.n_threads();
        // Enough tasks for dynamic balancing, few enough to keep the per-task overhead small.
        let rows_per_task = (n_rows / (n_threads * 4)).clamp(8, 256);
        let n_tasks = n_rows.div_ceil(rows_per_task);
        let out = OutPtr(y.as_mut_ptr());
        let data = w.data;
        pool.parallel_for(n_tasks, |task| {
            let r0 = task * rows_per_task;
            let r1 = (r0 + rows_per_task).min(n_rows);
            for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(n_tokens);
                let a = |t: usize| &act[t * arb..(t + 1) * arb];
                let mut r_tiled = r0;
                if let Some(dot4x4) = dot4x4.filter(|_| t1 - t0 >= 4) {
                    while r_tiled + 4 <= r1 {
                        let r = r_tiled;
                        let wr = |k: usize| &data[(r + k) * wrb..(r + k + 1) * wrb];
                        let w4 = [wr(0), wr(1), wr(2), wr(3)];
                        let mut t = t0;
                        while t + 4 <= t1 {
                            let v = dot4x4(n_cols, w4, [a(t), a(t + 1), a(t + 2), a(t + 3)]);
                            for (k, row) in v.iter().enumerate() {
                                for (j, &v) in row.iter().enumerate() {
                                    // SAFETY: as below, for token t + j < t1 and row r + k < r1.
                                    unsafe { *out.get().add((t + j) * n_rows + r + k) = v };
                                }
                            }
                            t += 4;
                        }
                        for t in t..t1 {
                            for (k, wrow) in w4.iter().enumerate() {
                                let v = dot(n_cols, wrow, a(t));
                                // SAFETY: as below, for token t < t1 and row r + k < r1.
                                unsafe { *out.get().add(t * n_rows + r + k) = v };
                            }
                        }
                        r_tiled += 4;
                    }
                }
                for r in r_tiled..r1 {
                    let wrow = &data[r * wrb..(r + 1) * wrb];
                    let mut t = t0;
                    if let Some(dot4) = dot4 {
                        while t + 4 <= t1 {
                            let a = |k: usize| &act[(t + k) * arb..(t + k + 1) * arb];
                            let v = dot4(n_cols, wrow, [a(0), a(1), a(2), a(3)]);
                            for (k, v) in v.into_iter().enumerate() {
                                // SAFETY: as below, for token t + k < t1 <= n_tokens.
                                unsafe { *out.get().add((t + k) * n_rows + r) = v };
                            }
                            t += 4;
                        }
                    }
                    for t in t..t1 {
                        let v = dot(n_cols, wrow, &act[t * arb..(t + 1) * arb]);
                        // SAFETY: t < n_tokens and r < n_rows, so the index is inside `y`
                        // (len n_tokens * n_rows, checked above); rows r0..r1 belong to this task alone,
                        // and `y` is exclusively borrowed by this call until the pool has joined.
                        unsafe { *out.get().add(t * n_rows + r) = v };
                    }
                }
            }
        });
        Ok(())
    })
}

/// One dot product: row `w` of `n` elements of type `ty` against the activation row `a` of `n` elements
/// already quantized to `quant::vec_dot_type(ty)`, with the ISA-dispatched kernel.
///
/// # Errors
/// [`KernelError::UnsupportedType`], [`KernelError::Quant`] when `n` is not a block multiple,
/// [`KernelError::Shape`] when `w` or `a` has the wrong number of bytes.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32, KernelError> {
    check_dot(ty, n, w, a)?;
    let f = vec_dot_fn(ty).ok_or(KernelError::UnsupportedType(ty))?;
    Ok(f(n, w, a))
}

/// [`vec_dot`] with the scalar oracle instead of the dispatched kernel.
///
/// # Errors
/// As [`vec_dot`].
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32, KernelError> {
    check_dot(ty, n, w, a)?;
    let f = scalar_vec_dot_fn(ty).ok_or(KernelError::UnsupportedType(ty))?;
    Ok(f(n, w, a))
}

fn check_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<(), KernelError> {
    let vd = quant::vec_dot_type(ty).ok_or(KernelError::UnsupportedType(ty))?;
    let wb = quant::row_bytes(ty, n)?;
    let ab = quant::row_bytes(vd, n)?;
    if w.len() != wb || a.len() != ab {
        return Err(KernelError::Shape {
            op: "vec_dot",
            what: format!(
                "{n} elements of {ty} x {vd} need {wb} + {ab} bytes, got {} + {}",
                w.len(),
                a.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        let pool = ThreadPool::new(2);
        let (n_rows, n_cols, n_tok) = (37, 512, 5);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            let wf = rand_vec(n_rows * n_cols, 1);
            let rb = quant::row_bytes(ty, n_cols).unwrap();
            let mut wq = vec![0u8; rb * n_rows];
            for r in 0..n_rows {
                quant::quantize_row(
                    ty,
                    &wf[r * n_cols..(r + 1) * n_cols],
                    &mut wq[r * rb..(r + 1) * rb],
                )
                .unwrap();
            }
            let mut wd = vec![0f32; n_rows * n_cols];
            for r in 0..n_rows {
                quant::dequantize_row(
                    ty,
                    &wq[r * rb..(r + 1) * rb],
                    &mut wd[r * n_cols..(r + 1) * n_cols],
                )
                .unwrap();
            }
            let x = rand_vec(n_tok * n_cols, 2);
            let m = QMatrix::new(ty, &wq, n_rows, n_cols).unwrap();
            let mut y = vec![0f32; n_tok * n_rows];
            matmul(&pool, &m, &x, n_tok, &mut y).unwrap();
            for t in 0..n_tok {
                for r in 0..n_rows {
                    let exact: f32 = (0..n_cols)
                        .map(|k| wd[r * n_cols + k] * x[t * n_cols + k])
                        .sum();
                    let got = y[t * n_rows + r];
                    // Activation quantization error: |x| ≤ 1 in steps of 1/127 → ≤ n·|w|/254.
                    assert!(
                        (got - exact).abs() < 0.1,
                        "{ty} t{t} r{r}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// A weight row of `n` elements of `ty`: quantized random values where we can quantize to `ty`, random
    /// quant bits with random finite f16 scales (at `scale_offsets` in each block) otherwise.
    fn weight_row(ty: GgmlType, n: usize, seed: u64, scale_offsets: &[usize]) -> Vec<u8> {
        let mut w = vec![0u8; quant::row_bytes(ty, n).unwrap()];
        if quant::can_quantize(ty) {
            quant::quantize_row(ty, &rand_vec(n, seed), &mut w).unwrap();
            return w;
        }
        let bits = rand_vec(w.len(), seed);
        for (b, r) in w.iter_mut().zip(&bits) {
            *b = ((r + 1.0) * 127.9) as u8;
        }
        let scales = rand_vec(w.len() / ty.type_size() * scale_offsets.len(), seed + 1);
        let mut s = scales.iter();
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for &o in scale_offsets {
                let v = quant::blocks::F16Le::from_f32(s.next().unwrap() * 0.05);
                blk[o..o + 2].copy_from_slice(&v.0);
            }
        }
        w
    }

    #[test]
    fn four_token_kernels_equal_single_token_kernels_bit_for_bit() {
        let n = 768;
        for (ty, offs) in [
            (GgmlType::Q4_0, &[][..]),
            (GgmlType::Q4_1, &[]),
            (GgmlType::Q5_0, &[]),
            (GgmlType::Q8_0, &[]),
            (GgmlType::Q4_K, &[0, 2]),
            (GgmlType::Q6_K, &[208]),
        ] {
            let k_quant = matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K);
            let vd = quant::vec_dot_type(ty).unwrap();
            for seed in 0..8 {
                let w = weight_row(ty, n, 7 + seed, offs);
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|s| {
                        let mut a = vec![0u8; quant::row_bytes(vd, n).unwrap()];
                        let mut x = rand_vec(n, 100 + 4 * seed + s);
                        x[(37 * s as usize + 11 * seed as usize) % n] *= 30.0; // an outlier per row
                        quant::quantize_row_activation(vd, &x, &mut a).unwrap();
                        a
                    })
                    .collect();
                let refs = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
                let mut pairs = vec![];
                if let Some(dot4) = vec_dot4_fn(ty) {
                    pairs.push(("dispatched", dot4, vec_dot_fn(ty).unwrap()));
                } else {
                    assert!(!k_quant, "{ty} has no four-token kernel");
                }
                if let Some(dot4) = scalar_vec_dot4_fn(ty) {
                    pairs.push(("scalar", dot4, scalar_vec_dot_fn(ty).unwrap()));
                } else {
                    assert!(!k_quant, "{ty} has no scalar four-token kernel");
                }
                for (which, dot4, dot) in pairs {
                    let got = dot4(n, &w, refs);
                    for t in 0..4 {
                        assert_eq!(
                            got[t].to_bits(),
                            dot(n, &w, &acts[t]).to_bits(),
                            "{which} {ty} seed {seed} token {t}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_rejects_bad_shapes() {
        let pool = ThreadPool::new(1);
        let data = vec![0u8; 18 * 2];
        let m = QMatrix {
            ty: GgmlType::Q4_0,
            data: &data,
            n_rows: 2,
            n_cols: 32,
        };
        let mut y = vec![0f32; 2];
        assert!(matches!(
            matmul(&pool, &m, &[0.0; 31], 1, &mut y),
            Err(KernelError::Shape { .. })
        ));
        assert!(matches!(
            matmul(&pool, &m, &[0.0; 32], 1, &mut y[..1]),
            Err(KernelError::Shape { .. })
        ));
        let bad = QMatrix { n_rows: 3, ..m };
        assert!(matches!(
            matmul(&pool, &bad, &[0.0; 32], 1, &mut [0.0; 3]),
            Err(KernelError::Shape { .. })
        ));
        let odd = QMatrix { n_cols: 33, ..m };
        assert!(matches!(
            matmul(&pool, &odd, &[0.0; 33], 1, &mut y),
            Err(KernelError::Quant(QuantError::NotBlockMultiple { .. }))
        ));
        let iq = QMatrix {
            ty: GgmlType::IQ2_XXS,
            ..m
        };
        assert!(matches!(
            matmul(&pool, &iq, &[0.0; 32], 1, &mut y),
            Err(KernelError::Quant(_) | KernelError::UnsupportedType(_))
        ));
    }
}
