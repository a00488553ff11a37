//! Kernel benchmark (not a test): matmul GFLOP/s per weight type, for decode (1 token) and prefill
//! (64 tokens), at 1 and 2 threads, on a 576 x 1536 matrix (SmolLM2-135M's FFN shape).
//! Run with `scripts/bench-kernels` (dev profile, opt-level 3). `CYBER_INFERENCE_ISA=scalar` measures the
//! scalar oracles instead of the SIMD kernels, `CYBER_INFERENCE_ISA=avx2` the AVX2 kernels without AVX-512.

use cyber_inference::engine::ggml_type::GgmlType;
use cyber_inference::engine::kernels::{QMatrix, ThreadPool, check_isa, matmul};
use cyber_inference::engine::quant::{self, blocks::F16Le};
use std::time::{Duration, Instant};

fn weights(ty: GgmlType, n_rows: usize, n_cols: usize) -> Vec<u8> {
    let rb = quant::row_bytes(ty, n_cols).expect("block multiple");
    let mut s = 12345u64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut out = vec![0u8; rb * n_rows];
    if quant::can_quantize(ty) {
        for r in 0..n_rows {
            let x: Vec<f32> = (0..n_cols)
                .map(|_| next() as f32 / u32::MAX as f32 - 0.25)
                .collect();
            quant::quantize_row(ty, &x, &mut out[r * rb..(r + 1) * rb]).expect("quantize");
        }
    } else {
        // Random bits with small finite f16 scales wherever a scale may sit (valid for any k-quant).
        for b in out.iter_mut() {
            *b = next() as u8;
        }
        let ts = ty.type_size();
        let offs: &[usize] = match ty {
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
            _ => &[0, 2],
        };
        for blk in out.chunks_exact_mut(ts) {
            if ty == GgmlType::MXFP4 {
                blk[0] = 120; // the E8M0 scale 2^-7
                continue;
            }
            for &o in offs {
                blk[o..o + 2].copy_from_slice(&F16Le::from_f32(0.01).0);
            }
        }
    }
    out
}

fn main() {
    let (n_rows, n_cols) = (576, 1536);
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::MXFP4,
    ];
    let isa = match check_isa() {
        Ok(isa) => isa,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "isa: {}   matrix: {n_rows} rows x {n_cols} cols",
        isa.name()
    );
    println!(
        "{:<7} {:>8} {:>14} {:>14} {:>14} {:>14}",
        "type", "", "1tok 1thr", "1tok 2thr", "64tok 1thr", "64tok 2thr"
    );
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    for ty in types {
        let data = weights(ty, n_rows, n_cols);
        let m = QMatrix::new(ty, &data, n_rows, n_cols).expect("shape");
        let mut cells = Vec::new();
        for n_tok in [1usize, 64] {
            let x: Vec<f32> = (0..n_tok * n_cols)
                .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
                .collect();
            let mut y = vec![0f32; n_tok * n_rows];
            for pool in &pools {
                matmul(pool, &m, &x, n_tok, &mut y).expect("matmul");
                let start = Instant::now();
                let mut iters = 0u64;
                while start.elapsed() < Duration::from_millis(300) {
                    matmul(pool, &m, &x, n_tok, &mut y).expect("matmul");
                    iters += 1;
                }
                let secs = start.elapsed().as_secs_f64();
                let gflops = 2.0 * (n_rows * n_cols * n_tok) as f64 * iters as f64 / secs / 1e9;
                cells.push(format!("{gflops:8.2} GF/s"));
            }
        }
        println!(
            "{:<7} {:>8} {:>14} {:>14} {:>14} {:>14}",
            ty.name(),
            "",
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        );
    }
}
