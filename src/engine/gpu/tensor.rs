//! Weight matrices on the device: the GGUF bytes of a tensor uploaded once, split by rows into chunks no
//! larger than the adapter's largest storage binding; types the matmul kernel cannot read in place are
//! dequantized to F16 at load.

use crate::engine::ggml_type::GgmlType;
use crate::engine::quant;

use super::GpuError;
use super::device::{Gpu, Recorder, grid};
use super::shaders::{self, MM_TILE};

/// One weight matrix `[n_rows, n_cols]` (ggml dims `[n_cols, n_rows]`) on the device.
pub struct GpuMatrix {
    /// Tensor name, for messages.
    pub name: String,
    /// The type the device holds (the file's, or F16 when it was dequantized at load).
    pub ty: GgmlType,
    /// Output features.
    pub n_rows: usize,
    /// Input features (a multiple of 32).
    pub n_cols: usize,
    /// Bytes of one row on the device.
    pub row_bytes: usize,
    /// `(first row, rows, buffer)` per chunk.
    chunks: Vec<(usize, usize, wgpu::Buffer)>,
}

impl GpuMatrix {
    /// Uploads `data` (`n_rows` rows of `ty`, the tensor's bytes as in the file).
    ///
    /// Errors: [`GpuError::Unsupported`] when a row is not whole units of 32 or a single row exceeds the
    /// binding limit, or the type has no dequantizer.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        ty: GgmlType,
        data: &[u8],
        n_rows: usize,
        n_cols: usize,
    ) -> Result<GpuMatrix, GpuError> {
        let unsupported = |why: String| GpuError::Unsupported(format!("tensor {name:?}: {why}"));
        if !n_cols.is_multiple_of(32) || n_rows == 0 {
            return Err(unsupported(format!(
                "{n_rows} rows of {n_cols} columns (the GPU kernels need whole units of 32)"
            )));
        }
        let src_row = quant::row_bytes(ty, n_cols).map_err(|e| unsupported(e.to_string()))?;
        if data.len() < src_row * n_rows {
            return Err(unsupported(format!(
                "{} bytes for {n_rows} rows of {src_row}",
                data.len()
            )));
        }
        // In place when the kernel reads the type; otherwise F16 rows made once here.
        let (dev_ty, bytes): (GgmlType, std::borrow::Cow<'_, [u8]>) =
            if shaders::matmul_kernel(ty).is_some() {
                (ty, std::borrow::Cow::Borrowed(&data[..src_row * n_rows]))
            } else {
                tracing::info!("{name}: {ty} has no GPU kernel; dequantized to F16 at load");
                let mut row = vec![0.0f32; n_cols];
                let mut out = Vec::with_capacity(n_rows * n_cols * 2);
                for r in 0..n_rows {
                    quant::dequantize_row(ty, &data[r * src_row..(r + 1) * src_row], &mut row)
                        .map_err(|e| unsupported(e.to_string()))?;
                    for v in &row {
                        out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                    }
                }
                (GgmlType::F16, std::borrow::Cow::Owned(out))
            };
        let row_bytes = quant::row_bytes(dev_ty, n_cols).map_err(|e| unsupported(e.to_string()))?;
        // A word of padding after each chunk: the kernel's unaligned reads touch the next word.
        let per_chunk = ((gpu.max_binding as usize).saturating_sub(8) / row_bytes).min(n_rows);
        if per_chunk == 0 {
            return Err(unsupported(format!(
                "one row of {row_bytes} bytes exceeds the adapter's largest binding ({} bytes)",
                gpu.max_binding
            )));
        }
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < n_rows {
            let rows = per_chunk.min(n_rows - r0);
            let part = &bytes[r0 * row_bytes..(r0 + rows) * row_bytes];
            let buf = gpu.upload(name, part, part.len() as u64 + 8);
            chunks.push((r0, rows, buf));
            r0 += rows;
        }
        Ok(GpuMatrix {
            name: name.to_string(),
            ty: dev_ty,
            n_rows,
            n_cols,
            row_bytes,
            chunks,
        })
    }

    /// Bytes held on the device.
    pub fn device_bytes(&self) -> u64 {
        (self.row_bytes * self.n_rows) as u64
    }

    /// Records `y[t, y_off + r] = Σ_k W[r, k] · x[t, k]` for the `n` tokens of `x` (`[n, n_cols]`) into
    /// `y` (row stride `y_stride` elements).
    pub fn record(
        &self,
        rec: &mut Recorder<'_>,
        x: &wgpu::Buffer,
        n: usize,
        y: &wgpu::Buffer,
        y_stride: usize,
        y_off: usize,
    ) -> Result<(), GpuError> {
        let kernel = shaders::matmul_kernel(self.ty).expect("uploaded types have a kernel");
        for (r0, rows, buf) in &self.chunks {
            let (gx, gy) = grid(*rows as u32);
            rec.dispatch(
                kernel,
                &[buf, x, y],
                &[
                    *rows as u32,
                    self.n_cols as u32,
                    n as u32,
                    self.row_bytes as u32,
                    y_stride as u32,
                    (y_off + r0) as u32,
                    gx,
                    0,
                ],
                (gx, gy, (n as u32).div_ceil(MM_TILE)),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gpu::test_gpu;

    /// Random blocks of `ty`: random bytes with every f16 scale replaced by a finite value in ±[0.001, 0.1)
    /// (random bits would make infinities and NaNs), or quantized random floats for the float types.
    fn random_rows(ty: GgmlType, n_rows: usize, n_cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let rb = quant::row_bytes(ty, n_cols).unwrap();
        let mut out = vec![0u8; rb * n_rows];
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            for r in 0..n_rows {
                let row: Vec<f32> = (0..n_cols)
                    .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                    .collect();
                quant::quantize_row(ty, &row, &mut out[r * rb..(r + 1) * rb]).unwrap();
            }
            return out;
        }
        out.iter_mut().for_each(|b| *b = next() as u8);
        let (block, scales): (usize, &[usize]) = match ty {
            GgmlType::Q8_0 => (34, &[0]),
            GgmlType::Q4_0 => (18, &[0]),
            GgmlType::Q4_1 => (20, &[0, 2]),
            GgmlType::Q5_0 => (22, &[0]),
            GgmlType::Q5_1 => (24, &[0, 2]),
            GgmlType::Q4_K => (144, &[0, 2]),
            GgmlType::Q5_K => (176, &[0, 2]),
            GgmlType::Q6_K => (210, &[208]),
            GgmlType::Q2_K => (84, &[80, 82]),
            GgmlType::Q3_K => (110, &[108]),
            _ => panic!("no random blocks for {ty}"),
        };
        for b in out.chunks_exact_mut(block) {
            for &o in scales {
                let v = (next() % 1000) as f32 / 10_000.0 + 0.001;
                let v = if next() % 2 == 0 { v } else { -v };
                b[o..o + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        out
    }

    /// Every matmul type (and a type dequantized at load) agrees with its scalar twin — the ggml
    /// dequantizer (`quant::dequantize_row`) and an f64 dot product — on random blocks, for 1, 3 and 11
    /// tokens. Tolerance: 1e-5 of Σ|w·x| (f32 accumulation in a different order than the f64 reference);
    /// 1e-3 for a type dequantized to F16 at load (F16 rounds each weight by up to 2⁻¹¹ of itself).
    #[test]
    fn every_matmul_type_agrees_with_its_scalar_twin() {
        let Some(gpu) = test_gpu() else { return };
        let (n_rows, n_cols) = (37, 512);
        for ty in shaders::MATMUL_TYPES.into_iter().chain([GgmlType::Q3_K]) {
            let data = random_rows(ty, n_rows, n_cols, 0x9e37_79b9 ^ ty as u64);
            let m = GpuMatrix::upload(&gpu, "w", ty, &data, n_rows, n_cols).unwrap();
            let rb = quant::row_bytes(ty, n_cols).unwrap();
            let mut w = vec![0.0f32; n_rows * n_cols];
            for r in 0..n_rows {
                quant::dequantize_row(
                    ty,
                    &data[r * rb..(r + 1) * rb],
                    &mut w[r * n_cols..(r + 1) * n_cols],
                )
                .unwrap();
            }
            for n in [1usize, 3, 11] {
                let x: Vec<f32> = (0..n * n_cols)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
                    .collect();
                let xb = gpu.upload("x", bytemuck::cast_slice(&x), 0);
                let yb = gpu.zeros("y", (n * n_rows * 4) as u64);
                let mut rec = Recorder::new(&gpu);
                m.record(&mut rec, &xb, n, &yb, n_rows, 0).unwrap();
                rec.submit();
                let y = gpu.read_f32(&yb, 0, n * n_rows).unwrap();
                for t in 0..n {
                    for r in 0..n_rows {
                        let (mut want, mut mag) = (0.0f64, 0.0f64);
                        for k in 0..n_cols {
                            let p = w[r * n_cols + k] as f64 * x[t * n_cols + k] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = y[t * n_rows + r] as f64;
                        let tol = if m.ty == ty { 1e-5 } else { 1e-3 };
                        assert!(
                            (got - want).abs() <= tol * mag.max(1e-30),
                            "{ty} n={n} t={t} r={r}: GPU {got} vs scalar {want} (Σ|wx| {mag})"
                        );
                    }
                }
            }
        }
    }

    /// A matrix larger than the binding limit is split by rows and gives the same numbers as one piece.
    #[test]
    fn a_matrix_split_into_chunks_gives_the_same_numbers() {
        let Some(gpu) = test_gpu() else { return };
        let (n_rows, n_cols) = (50, 64);
        let data = random_rows(GgmlType::Q8_0, n_rows, n_cols, 7);
        let whole = GpuMatrix::upload(&gpu, "w", GgmlType::Q8_0, &data, n_rows, n_cols).unwrap();
        let small = Gpu::with_max_binding(&gpu, 8 + 68 * 7);
        let split = GpuMatrix::upload(&small, "w", GgmlType::Q8_0, &data, n_rows, n_cols).unwrap();
        assert_eq!(split.chunks.len(), 8, "7 rows per chunk");
        let x: Vec<f32> = (0..2 * n_cols).map(|i| i as f32 / 100.0 - 0.6).collect();
        let run = |g: &Gpu, m: &GpuMatrix| {
            let xb = g.upload("x", bytemuck::cast_slice(&x), 0);
            let yb = g.zeros("y", (2 * n_rows * 4) as u64);
            let mut rec = Recorder::new(g);
            m.record(&mut rec, &xb, 2, &yb, n_rows, 0).unwrap();
            rec.submit();
            g.read_f32(&yb, 0, 2 * n_rows).unwrap()
        };
        assert_eq!(run(&gpu, &whole), run(&small, &split));
    }
}
