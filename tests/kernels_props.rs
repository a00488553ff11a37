//! Property tests of the kernels: every dispatched (SIMD) dot product against its scalar twin on random
//! blocks, and batch invariance of `matmul` (a token's outputs are bit-identical for any batch size and
//! thread count).

use cyber_inference::engine::ggml_type::GgmlType;
use cyber_inference::engine::kernels::{
    self, Isa, QMatrix, ThreadPool, isa, matmul, vec_dot, vec_dot_scalar,
};
use cyber_inference::engine::quant::{self, blocks::F16Le};
use proptest::prelude::*;

/// Every weight type with a dot product.
const DOT_TYPES: [GgmlType; 16] = [
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

/// Byte offsets of the f16 scale fields inside one block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL | IQ4_XS => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// A small deterministic generator (tests must not depend on the run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() & 0xFF_FFFF) as f32 / 16_777_216.0)
    }
}

/// `n_rows` random rows of `n` elements of `ty`: random quant bits with finite scales for block types,
/// random values for float types.
fn random_rows(ty: GgmlType, n_rows: usize, n: usize, seed: u64) -> Vec<u8> {
    let mut g = Lcg(seed);
    let rb = quant::row_bytes(ty, n).unwrap();
    let mut out = vec![0u8; rb * n_rows];
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            for r in 0..n_rows {
                let x: Vec<f32> = (0..n).map(|_| g.f32(-1.0, 1.0)).collect();
                quant::quantize_row(ty, &x, &mut out[r * rb..(r + 1) * rb]).unwrap();
            }
        }
        _ => {
            for b in out.iter_mut() {
                *b = g.next() as u8;
            }
            let ts = ty.type_size();
            for blk in out.chunks_exact_mut(ts) {
                for &off in f16_fields(ty) {
                    let v = F16Le::from_f32(g.f32(-0.05, 0.05));
                    blk[off..off + 2].copy_from_slice(&v.0);
                }
                if ty == GgmlType::MXFP4 {
                    // The E8M0 scale: 2^-12 .. 2^3 (half of it is used), or the subnormal 0 and 1.
                    blk[0] = match g.next() % 8 {
                        0 => (g.next() % 2) as u8,
                        _ => 115 + (g.next() % 16) as u8,
                    };
                }
            }
        }
    }
    out
}

fn activations(ty: GgmlType, n: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
    let mut g = Lcg(seed ^ 0x9e37_79b9);
    let x: Vec<f32> = (0..n).map(|_| g.f32(-2.0, 2.0)).collect();
    let vd = quant::vec_dot_type(ty).unwrap();
    let mut a = vec![0u8; quant::row_bytes(vd, n).unwrap()];
    quant::quantize_row(vd, &x, &mut a).unwrap();
    (x, a)
}

/// Σ |w_i · a_i| over the dequantized rows: the scale of the rounding error of a float reduction.
fn abs_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> f64 {
    let vd = quant::vec_dot_type(ty).unwrap();
    let mut wf = vec![0f32; n];
    let mut af = vec![0f32; n];
    quant::dequantize_row(ty, w, &mut wf).unwrap();
    quant::dequantize_row(vd, a, &mut af).unwrap();
    wf.iter()
        .zip(&af)
        .map(|(x, y)| (*x as f64 * *y as f64).abs())
        .sum()
}

/// Types whose SIMD kernel does the oracle's float operations in the oracle's order (the k-quants and
/// IQ4_XS: exact integer sums per super-block, then the oracle's float steps). The others (F32, F16, BF16
/// and the 32-element block types) follow ggml's SIMD scheme of eight float lanes summed at the end, so
/// they differ from the oracle by float rounding only: ≤ 1e-5 · Σ|w·a|.
fn bit_exact_twin(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn simd_vec_dot_matches_scalar_twin(seed in any::<u64>(), n_blocks in 1usize..6, ti in 0usize..16) {
        let ty = DOT_TYPES[ti];
        let n = n_blocks * 256;
        let w = random_rows(ty, 1, n, seed);
        let (_, a) = activations(ty, n, seed);
        let s = vec_dot_scalar(ty, n, &w, &a).unwrap();
        let v = vec_dot(ty, n, &w, &a).unwrap();
        // A float reduction in another order: error ≲ n_blocks · ε · Σ|w·a|.
        let scale = abs_dot(ty, n, &w, &a);
        if bit_exact_twin(ty) {
            prop_assert_eq!(s.to_bits(), v.to_bits(), "{} scalar {} simd {}", ty, s, v);
        } else {
            prop_assert!(((s - v) as f64).abs() <= 1e-5 * scale + 1e-5,
                "{} scalar {} simd {} (scale {})", ty, s, v, scale);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The four-token kernels (dispatched and scalar) give, for each token, the bits of the single-token
    /// kernel of the same ISA, and for the k-quants also of the scalar oracle.
    #[test]
    fn four_token_kernels_match_single_token_kernels_bit_for_bit(
        seed in any::<u64>(), n_blocks in 1usize..6, ti in 0usize..16,
    ) {
        let ty = DOT_TYPES[ti];
        let n = n_blocks * 256;
        let w = random_rows(ty, 1, n, seed);
        let acts: Vec<Vec<u8>> = (0..4u64).map(|t| activations(ty, n, seed.wrapping_add(t)).1).collect();
        let refs = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
        let single = kernels::vec_dot_fn(ty).unwrap();
        let oracle = kernels::scalar_vec_dot_fn(ty).unwrap();
        let quads = [
            (kernels::vec_dot4_fn(ty), single),
            (kernels::scalar_vec_dot4_fn(ty), oracle),
        ];
        for (quad, single) in quads {
            let Some(quad) = quad else { continue };
            let got = quad(n, &w, refs);
            for t in 0..4 {
                prop_assert_eq!(got[t].to_bits(), single(n, &w, &acts[t]).to_bits(), "{} token {}", ty, t);
                if bit_exact_twin(ty) {
                    prop_assert_eq!(got[t].to_bits(), oracle(n, &w, &acts[t]).to_bits(), "{} token {}", ty, t);
                }
            }
        }
    }
}

/// Every type, 24 fixed seeds each (the property tests above draw the type at random): the dispatched kernel
/// against the oracle (bit-identical where [`bit_exact_twin`], else within 1e-5 · Σ|w·a|), and the
/// four-token kernel against the single-token one, bit for bit.
#[test]
fn every_type_matches_its_scalar_twin_on_fixed_seeds() {
    for ty in DOT_TYPES {
        for seed in 0..24u64 {
            let n = (1 + seed as usize % 5) * 256;
            let w = random_rows(ty, 1, n, seed * 7919 + ty.id() as u64);
            let acts: Vec<Vec<u8>> = (0..4u64)
                .map(|t| activations(ty, n, seed * 31 + t).1)
                .collect();
            let s = vec_dot_scalar(ty, n, &w, &acts[0]).unwrap();
            let v = vec_dot(ty, n, &w, &acts[0]).unwrap();
            if bit_exact_twin(ty) {
                assert_eq!(
                    s.to_bits(),
                    v.to_bits(),
                    "{ty} seed {seed}: scalar {s} simd {v}"
                );
            } else {
                let scale = abs_dot(ty, n, &w, &acts[0]);
                assert!(
                    ((s - v) as f64).abs() <= 1e-5 * scale + 1e-5,
                    "{ty} seed {seed}: scalar {s} simd {v} (scale {scale})"
                );
            }
            if let Some(quad) = kernels::vec_dot4_fn(ty) {
                let single = kernels::vec_dot_fn(ty).unwrap();
                let got = quad(n, &w, [&acts[0], &acts[1], &acts[2], &acts[3]]);
                for t in 0..4 {
                    assert_eq!(
                        got[t].to_bits(),
                        single(n, &w, &acts[t]).to_bits(),
                        "{ty} seed {seed} token {t}"
                    );
                }
            }
        }
    }
}

#[test]
fn k_quants_have_four_token_kernels() {
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
        assert!(kernels::vec_dot4_fn(ty).is_some(), "{ty}");
        assert!(kernels::scalar_vec_dot4_fn(ty).is_some(), "{ty}");
    }
}

#[test]
fn the_default_build_uses_avx2_where_the_cpu_has_it() {
    // On aarch64, NEON is part of the base architecture.
    #[cfg(target_arch = "aarch64")]
    if std::env::var("CYBER_INFERENCE_ISA").is_err() {
        assert_eq!(isa(), Isa::Neon);
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && std::env::var("CYBER_INFERENCE_ISA").is_err()
    {
        let vnni = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl");
        assert_eq!(isa(), if vnni { Isa::Avx512 } else { Isa::Avx2 });
        for ty in DOT_TYPES {
            let simd = kernels::vec_dot_fn(ty).unwrap() as usize;
            let scalar = kernels::scalar_vec_dot_fn(ty).unwrap() as usize;
            assert_ne!(simd, scalar, "{ty} has no SIMD kernel");
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::env::var("CYBER_INFERENCE_ISA").is_ok_and(|v| v == "avx2") {
        assert_eq!(isa(), Isa::Avx2);
        assert!(
            kernels::vec_dot4x4_fn(GgmlType::Q8_0).is_none(),
            "no VNNI tiles under avx2"
        );
        for ty in DOT_TYPES {
            let simd = kernels::vec_dot_fn(ty).unwrap() as usize;
            let scalar = kernels::scalar_vec_dot_fn(ty).unwrap() as usize;
            assert_ne!(simd, scalar, "{ty} has no AVX2 kernel");
        }
    }
    eprintln!("kernel ISA: {}", isa().name());
}

/// `y` for the given token range, computed with `pool` in chunks of `batch` tokens.
fn run_batched(
    pool: &ThreadPool,
    m: &QMatrix,
    x: &[f32],
    n_tokens: usize,
    batch: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; n_tokens * m.n_rows];
    let mut t0 = 0;
    while t0 < n_tokens {
        let t1 = (t0 + batch).min(n_tokens);
        matmul(
            pool,
            m,
            &x[t0 * m.n_cols..t1 * m.n_cols],
            t1 - t0,
            &mut y[t0 * m.n_rows..t1 * m.n_rows],
        )
        .unwrap();
        t0 = t1;
    }
    y
}

#[test]
fn matmul_is_batch_and_thread_invariant() {
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let (n_rows, n_cols, n_tokens) = (75, 512, 64);
    let mut g = Lcg(7);
    let x: Vec<f32> = (0..n_tokens * n_cols).map(|_| g.f32(-3.0, 3.0)).collect();
    for ty in DOT_TYPES {
        let data = random_rows(ty, n_rows, n_cols, 11);
        let m = QMatrix::new(ty, &data, n_rows, n_cols).unwrap();
        let reference = run_batched(&pools[0], &m, &x, n_tokens, 1);
        for pool in &pools {
            for batch in [1, 7, 64] {
                let y = run_batched(pool, &m, &x, n_tokens, batch);
                let same = y
                    .iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{ty}: batch {batch}, {} threads differs",
                    pool.n_threads()
                );
            }
        }
    }
}
