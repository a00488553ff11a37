//! GPU kernels against their CPU scalar twins (`kernels/ops.rs`) on random inputs.
//!
//! Each test states its tolerance and why: the kernels reduce in a different (fixed) order than the CPU,
//! and WGSL's `exp`, `sqrt` and division are not correctly rounded, so most comparisons are relative to
//! the magnitude of the terms; the operations that are a single correctly rounded IEEE operation per
//! element (add, scale, copies) must agree bit for bit.

use half::f16;

use super::device::{Gpu, Recorder};
use super::ops::{self as gops, AttnShape, Eltwise};
use super::test_gpu;
use crate::engine::kernels::ops::{self, RopeMode, RopeParams};

/// Xorshift64 generator of test inputs (deterministic per seed).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[-1, 1)`.
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values uniform in `[-a, a)`.
    fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * a).collect()
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn upload_f32(gpu: &Gpu, label: &str, x: &[f32]) -> wgpu::Buffer {
    gpu.upload(label, bytemuck::cast_slice(x), 0)
}

fn upload_u32(gpu: &Gpu, label: &str, x: &[u32]) -> wgpu::Buffer {
    gpu.upload(label, bytemuck::cast_slice(x), 0)
}

/// Reads `n` f16 values (two per u32 word, the lower half first) from the start of `buf`.
fn read_f16(gpu: &Gpu, buf: &wgpu::Buffer, n: usize) -> Vec<f16> {
    let bytes = gpu.read(buf, 0, (n.div_ceil(2) * 4) as u64).unwrap();
    bytes
        .chunks_exact(2)
        .take(n)
        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
        .collect()
}

/// RMS norm of rows of 576, 64 and 33 elements (33: threads of the workgroup past the row) with random
/// weights, against `ops::rms_norm`. Tolerance: `1e-5·|want|` per element — the GPU sums the squares in
/// f32 in a tree where the CPU sums in f64 in index order (relative error of the mean ≲ 64·2⁻²⁴), and
/// WGSL's `sqrt` and division are a few ulp from the correctly rounded ones.
#[test]
fn rms_norm_agrees_with_the_scalar_twin() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(1);
    for (len, rows, eps) in [(576usize, 7usize, 1e-5f32), (64, 5, 1e-6), (33, 3, 1e-5)] {
        let mut x = rng.vec(rows * len, 3.0);
        // One row of tiny values, where eps matters.
        x[..len].iter_mut().for_each(|v| *v *= 1e-3);
        let g = rng.vec(len, 2.0);
        let xb = upload_f32(&gpu, "x", &x);
        let gb = upload_f32(&gpu, "g", &g);
        let mut rec = Recorder::new(&gpu);
        gops::rms_norm(&mut rec, &xb, &gb, rows, len, eps).unwrap();
        rec.submit();
        let got = gpu.read_f32(&xb, 0, rows * len).unwrap();
        for (r, (row, got)) in x
            .chunks_exact_mut(len)
            .zip(got.chunks_exact(len))
            .enumerate()
        {
            ops::rms_norm(row, &g, eps);
            for (i, (&want, &got)) in row.iter().zip(got).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs(),
                    "rms_norm len={len} row {r} [{i}]: GPU {got} vs scalar {want}"
                );
            }
        }
    }
}

/// Rope, normal and NeoX pairing, on heads of 64 with n_dims 64 and a partial n_dims 32, for tokens at
/// random positions (one at 0, one past 4000), tables from `ops::rope_cache_scaled` (with an attention
/// factor of 1 and of 0.9), against `ops::rope`. Tolerance: `2⁻²²·(|x₀|+|x₁|)` per rotated element
/// (WGSL's `fma` may be evaluated unfused, a few ulp of the terms); the dimensions past n_dims must be
/// unchanged bit for bit.
#[test]
fn rope_agrees_with_the_scalar_twin() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(2);
    let (hd, heads, n) = (64usize, 3usize, 5usize);
    for (mode, n_dims, base, mscale) in [
        (RopeMode::Normal, 64usize, 10_000.0f32, 1.0f32),
        (RopeMode::Normal, 32, 10_000.0, 0.9),
        (RopeMode::Neox, 64, 1_000_000.0, 1.0),
        (RopeMode::Neox, 32, 10_000.0, 0.9),
    ] {
        let p = RopeParams {
            n_dims,
            freq_base: base,
            freq_scale: 1.0,
            mode,
        };
        let positions = [0u32, 1, 17, 4099, rng.below(2048) as u32];
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &pos in &positions {
            let (c, s) = ops::rope_cache_scaled(&p, pos, None, mscale);
            cos.extend(c);
            sin.extend(s);
        }
        let x = rng.vec(n * heads * hd, 2.0);
        let xb = upload_f32(&gpu, "x", &x);
        let cb = upload_f32(&gpu, "cos", &cos);
        let sb = upload_f32(&gpu, "sin", &sin);
        let mut rec = Recorder::new(&gpu);
        gops::rope(
            &mut rec,
            &xb,
            &cb,
            &sb,
            n,
            heads,
            hd,
            n_dims,
            mode == RopeMode::Neox,
        )
        .unwrap();
        rec.submit();
        let got = gpu.read_f32(&xb, 0, x.len()).unwrap();
        let half = n_dims / 2;
        for t in 0..n {
            let row = &x[t * heads * hd..(t + 1) * heads * hd];
            let mut want = row.to_vec();
            let tab = t * half..(t + 1) * half;
            ops::rope(&mut want, hd, n_dims, mode, &cos[tab.clone()], &sin[tab]);
            for h in 0..heads {
                for i in 0..hd {
                    let e = h * hd + i;
                    let (g, w) = (got[t * heads * hd + e], want[e]);
                    let ctx = format!("rope {mode:?} n_dims={n_dims} token {t} head {h} [{i}]");
                    if i >= n_dims {
                        assert_eq!(g.to_bits(), w.to_bits(), "{ctx}: passed-through {g} vs {w}");
                        continue;
                    }
                    // The pair this element belongs to.
                    let (a, b) = match mode {
                        RopeMode::Normal => (i & !1, i | 1),
                        RopeMode::Neox => (i % half, i % half + half),
                    };
                    let mag = row[h * hd + a].abs() + row[h * hd + b].abs();
                    assert!(
                        (g - w).abs() <= mag * 2.0f32.powi(-22),
                        "{ctx}: GPU {g} vs scalar {w}"
                    );
                }
            }
        }
    }
}

/// Runs one `eltwise` op on the GPU over `x` (with `y`) and returns the result.
fn run_eltwise(gpu: &Gpu, op: Eltwise, x: &[f32], y: &[f32]) -> Vec<f32> {
    let xb = upload_f32(gpu, "x", x);
    let yb = upload_f32(gpu, "y", y);
    let mut rec = Recorder::new(gpu);
    gops::eltwise(&mut rec, op, &xb, &yb, x.len()).unwrap();
    rec.submit();
    gpu.read_f32(&xb, 0, x.len()).unwrap()
}

/// Add, AddBias and Scale — one correctly rounded IEEE operation per element — agree with
/// `ops::add_in_place`, `ops::add_bias` (per row) and a scalar multiply bit for bit, on a length that is
/// not a multiple of 64 and (Add) one past 64 · 65535 elements, where the grid has a second dimension.
#[test]
fn eltwise_add_bias_and_scale_are_exact() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(3);
    let exact = |name: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} [{i}]: GPU {g} vs scalar {w}"
            );
        }
    };
    for len in [1000usize, 64 * 65_535 + 100] {
        let x = rng.vec(len, 4.0);
        let y = rng.vec(len, 4.0);
        let got = run_eltwise(&gpu, Eltwise::Add, &x, &y);
        let mut want = x.clone();
        ops::add_in_place(&mut want, &y);
        exact(&format!("add len={len}"), &got, &want);
    }
    let (rows, m) = (13usize, 96usize);
    let x = rng.vec(rows * m, 4.0);
    let bias = rng.vec(m, 1.0);
    let got = run_eltwise(&gpu, Eltwise::AddBias(m), &x, &bias);
    let mut want = x.clone();
    want.chunks_exact_mut(m)
        .for_each(|r| ops::add_bias(r, &bias));
    exact("add_bias", &got, &want);
    for s in [0.125f32, -3.7, 1.0 / 11.0] {
        let got = run_eltwise(&gpu, Eltwise::Scale(s), &x, &[0.0]);
        let want: Vec<f32> = x.iter().map(|v| v * s).collect();
        exact(&format!("scale {s}"), &got, &want);
    }
}

/// SwiGLU against `ops::swiglu_scalar` on 1000 elements (a scalar tail past the last multiple of 16, and
/// a tail past the last workgroup of 64), gates in ±12 and ups in ±3. Tolerance: `1e-5·|want|` — WGSL's
/// `exp` is within `3 + 2·|x|` ulp (≤ 27 ulp here) and its division within 2.5 ulp, where the CPU uses
/// ggml's `expf` (≤ 1.5 ulp) and a correctly rounded division.
#[test]
fn eltwise_swiglu_agrees_with_the_scalar_twin() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(4);
    let len = 1000;
    let g = rng.vec(len, 12.0);
    let u = rng.vec(len, 3.0);
    let got = run_eltwise(&gpu, Eltwise::SwiGlu, &g, &u);
    let mut want = g.clone();
    ops::swiglu_scalar(&mut want, &u);
    for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "swiglu [{i}] (gate {}, up {}): GPU {got} vs scalar {want}",
            g[i],
            u[i]
        );
    }
}

/// Gather copies the indexed rows (repeated, out of order, the last row) bit for bit, for a row length
/// that is not a multiple of 64.
#[test]
fn gather_copies_the_indexed_rows() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(5);
    let (n_src, len) = (9usize, 70usize);
    let x = rng.vec(n_src * len, 5.0);
    let idx = [8u32, 0, 3, 3, 7, 1, 8];
    let xb = upload_f32(&gpu, "x", &x);
    let ib = upload_u32(&gpu, "idx", &idx);
    let yb = gpu.zeros("y", (idx.len() * len * 4) as u64);
    let mut rec = Recorder::new(&gpu);
    gops::gather(&mut rec, &xb, &ib, &yb, idx.len(), len).unwrap();
    rec.submit();
    let got = gpu.read_f32(&yb, 0, idx.len() * len).unwrap();
    for (r, &src) in idx.iter().enumerate() {
        let want = &x[src as usize * len..(src as usize + 1) * len];
        let got = &got[r * len..(r + 1) * len];
        assert_eq!(
            bytemuck::cast_slice::<f32, u32>(got),
            bytemuck::cast_slice::<f32, u32>(want),
            "gather row {r} (source row {src})"
        );
    }
}

/// What the cache value of a position never stored holds: large enough that a kernel reading it would
/// be far off the reference.
const UNSTORED: f32 = 100.0;

/// A sequence's cache on the GPU, filled through `kv_store`, with the values it holds read back.
struct Cache {
    kc: wgpu::Buffer,
    vc: wgpu::Buffer,
    /// The stored keys and values as the kernel reads them, `[n_pos, nkv]`.
    k16: Vec<f16>,
    v16: Vec<f16>,
}

/// Stores random keys and values (`[n_pos, nkv]`, in ±1 and ±2) for positions `0..n_pos` of a cache of
/// `n_pos + 3` rows through `kv_store`, in two dispatches (the first 2/3 of the rows, then the rest) with
/// source rows in reverse position order (row `r` → position `n_pos − 1 − r`). Checks that every stored
/// value is its f32 input rounded to f16 (within one f16 ulp: the rounding of `pack2x16float` is the
/// driver's) and that the rows past `n_pos` keep their contents.
fn store_kv(gpu: &Gpu, rng: &mut Rng, n_pos: usize, nkv: usize) -> Cache {
    let n_ctx = n_pos + 3;
    let k = rng.vec(n_pos * nkv, 1.0);
    let v = rng.vec(n_pos * nkv, 2.0);
    let fill = u32::from(f16::from_f32(UNSTORED).to_bits()) * 0x1_0001;
    let kc = upload_u32(gpu, "kc", &vec![fill; n_ctx * nkv / 2]);
    let vc = upload_u32(gpu, "vc", &vec![fill; n_ctx * nkv / 2]);
    let kb = upload_f32(gpu, "k", &k);
    let vb = upload_f32(gpu, "v", &v);
    let split = n_pos * 2 / 3;
    let mut rec = Recorder::new(gpu);
    let mut pos_bufs = Vec::new();
    for rows in [0..split, split..n_pos] {
        let pairs: Vec<u32> = rows
            .clone()
            .flat_map(|r| [r as u32, (n_pos - 1 - r) as u32])
            .collect();
        pos_bufs.push(upload_u32(gpu, "pos", &pairs));
        let pb = pos_bufs.last().unwrap();
        gops::kv_store(&mut rec, &kb, &vb, pb, &kc, &vc, rows.len(), nkv).unwrap();
    }
    rec.submit();
    let k_all = read_f16(gpu, &kc, n_ctx * nkv);
    let v_all = read_f16(gpu, &vc, n_ctx * nkv);
    for (name, src, all) in [("k", &k, &k_all), ("v", &v, &v_all)] {
        for pos in 0..n_ctx {
            for e in 0..nkv {
                let got = all[pos * nkv + e];
                if pos >= n_pos {
                    assert_eq!(
                        got.to_f32(),
                        UNSTORED,
                        "kv_store wrote {name} past the stored rows"
                    );
                    continue;
                }
                let x = src[(n_pos - 1 - pos) * nkv + e];
                let want = f16::from_f32(x);
                let ulps = (got.to_bits() as i32 - want.to_bits() as i32).abs();
                assert!(
                    ulps <= 1 && got.is_sign_negative() == want.is_sign_negative(),
                    "kv_store {name} position {pos} [{e}]: stored {got} for {x} (f16 {want})"
                );
            }
        }
    }
    Cache {
        kc,
        vc,
        k16: k_all[..n_pos * nkv].to_vec(),
        v16: v_all[..n_pos * nkv].to_vec(),
    }
}

/// Runs `attn` for the `(token row, position)` pairs `tokens` over `q` (`[n_rows, n_head · hd]`) into an
/// output buffer filled with NaN; returns the whole output.
fn run_attn(gpu: &Gpu, s: &AttnShape, q: &[f32], cache: &Cache, tokens: &[(u32, u32)]) -> Vec<f32> {
    let qb = upload_f32(gpu, "q", q);
    let pairs: Vec<u32> = tokens.iter().flat_map(|&(t, p)| [t, p]).collect();
    let pb = upload_u32(gpu, "pos", &pairs);
    let ob = upload_f32(gpu, "o", &vec![f32::NAN; q.len()]);
    let mut rec = Recorder::new(gpu);
    gops::attention(
        &mut rec,
        s,
        &qb,
        &cache.kc,
        &cache.vc,
        &pb,
        &ob,
        tokens.len(),
    )
    .unwrap();
    rec.submit();
    gpu.read_f32(&ob, 0, q.len()).unwrap()
}

/// The attention of one query head `q` (`[hd]`) over positions `0 ..= pos` of KV head `kvh` of the
/// stored cache, in f64 (scores, softmax and the weighted sum); also `max_j |v_j[e]|` per element.
fn attend_ref(
    q: &[f32],
    cache: &Cache,
    nkv: usize,
    kvh: usize,
    pos: usize,
    scale: f32,
) -> (Vec<f64>, Vec<f64>) {
    let hd = q.len();
    let row = |c: &[f16], j: usize, e: usize| c[j * nkv + kvh * hd + e].to_f64();
    let scores: Vec<f64> = (0..=pos)
        .map(|j| {
            let d: f64 = (0..hd).map(|e| q[e] as f64 * row(&cache.k16, j, e)).sum();
            d * scale as f64
        })
        .collect();
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let sum: f64 = w.iter().sum();
    let mut out = vec![0.0f64; hd];
    let mut vmax = vec![0.0f64; hd];
    for (j, wj) in w.iter().enumerate() {
        for e in 0..hd {
            let v = row(&cache.v16, j, e);
            out[e] += wj / sum * v;
            vmax[e] = vmax[e].max(v.abs());
        }
    }
    (out, vmax)
}

/// One attention test case.
struct AttnCase {
    n_head: usize,
    gqa: usize,
    hd: usize,
    /// Positions stored in the cache.
    n_pos: usize,
    /// `(token row, position)` pairs of the dispatch.
    tokens: Vec<(u32, u32)>,
    /// Query rows (≥ every token row + 1).
    n_rows: usize,
    /// Query magnitude: larger makes the softmax sharper (the running maximum moves between chunks).
    q_amp: f32,
}

/// Tolerance of the attention kernel, relative to `max_j |v_j[e]|`.
const ATTN_TOL: f64 = 1e-5;

/// kv_store then attn on random inputs, against an f64 reference over the stored f16 keys and values:
/// gqa 1 and 3, head_dim 64, 128 and 96 (not a multiple of the 64 threads), a single token at position 0,
/// 150 positions (three chunks of 64, the last partial; the cache rows past them hold 100.0, so reading
/// past a token's position would show), and several tokens at different positions (0, 63, 64, 65, 149;
/// rows out of order) in one dispatch; rows not in the dispatch are left untouched. Tolerance:
/// `1e-5 · max_j |v_j[e]|` per output element (lavapipe stays within 3.4e-7) — the output is a convex
/// combination of the values, so an error `δ` in the weights moves it by at most `δ · max|v|`; the
/// weights' errors come from the f32 dot products (≲ hd · 2⁻²⁴ of Σ|q·k| · scale), WGSL's `exp` and the
/// f32 online softmax. Reading one position too many or too few moves outputs by ~1e-2.
#[test]
fn kv_store_and_attention_agree_with_an_f64_reference() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(6);
    let cases = [
        AttnCase {
            n_head: 2,
            gqa: 1,
            hd: 64,
            n_pos: 1,
            tokens: vec![(0, 0)],
            n_rows: 1,
            q_amp: 1.0,
        },
        AttnCase {
            n_head: 6,
            gqa: 3,
            hd: 128,
            n_pos: 1,
            tokens: vec![(0, 0)],
            n_rows: 1,
            q_amp: 1.0,
        },
        AttnCase {
            n_head: 6,
            gqa: 3,
            hd: 128,
            n_pos: 150,
            tokens: vec![(0, 149)],
            n_rows: 1,
            q_amp: 1.0,
        },
        AttnCase {
            n_head: 4,
            gqa: 1,
            hd: 128,
            n_pos: 150,
            tokens: vec![(3, 149), (0, 0), (4, 64), (1, 63), (2, 65)],
            n_rows: 6,
            q_amp: 2.0,
        },
        AttnCase {
            n_head: 3,
            gqa: 3,
            hd: 64,
            n_pos: 150,
            tokens: vec![(1, 100), (0, 149), (2, 7)],
            n_rows: 3,
            q_amp: 8.0,
        },
        AttnCase {
            n_head: 2,
            gqa: 1,
            hd: 96,
            n_pos: 70,
            tokens: vec![(0, 69), (1, 30)],
            n_rows: 2,
            q_amp: 3.0,
        },
    ];
    for c in &cases {
        let name = format!(
            "attn n_head={} gqa={} hd={} n_pos={}",
            c.n_head, c.gqa, c.hd, c.n_pos
        );
        let nkv = c.n_head / c.gqa * c.hd;
        let cache = store_kv(&gpu, &mut rng, c.n_pos, nkv);
        let width = c.n_head * c.hd;
        let q = rng.vec(c.n_rows * width, c.q_amp);
        let s = AttnShape {
            n_head: c.n_head,
            head_dim: c.hd,
            gqa: c.gqa,
            nkv,
            scale: 1.0 / (c.hd as f32).sqrt(),
        };
        let got = run_attn(&gpu, &s, &q, &cache, &c.tokens);
        for r in 0..c.n_rows {
            let Some(&(_, pos)) = c.tokens.iter().find(|t| t.0 as usize == r) else {
                assert!(
                    got[r * width..(r + 1) * width].iter().all(|v| v.is_nan()),
                    "{name}: row {r} is not in the dispatch but was written"
                );
                continue;
            };
            for h in 0..c.n_head {
                let o = r * width + h * c.hd;
                let (want, vmax) = attend_ref(
                    &q[o..o + c.hd],
                    &cache,
                    nkv,
                    h / c.gqa,
                    pos as usize,
                    s.scale,
                );
                for e in 0..c.hd {
                    let g = got[o + e] as f64;
                    assert!(
                        (g - want[e]).abs() <= ATTN_TOL * vmax[e],
                        "{name}: row {r} position {pos} head {h} [{e}]: GPU {g} vs reference {} \
                         (max |v| {})",
                        want[e],
                        vmax[e]
                    );
                }
            }
        }
    }
}

/// A token's attention output is bit-identical whether it is dispatched alone or with other tokens (of
/// other and of the same positions): each (token, head) is reduced in an order that depends only on its
/// position count.
#[test]
fn attention_rows_do_not_depend_on_the_batch() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = Rng::new(7);
    let (n_head, gqa, hd, n_pos) = (6usize, 3usize, 64usize, 150usize);
    let nkv = n_head / gqa * hd;
    let cache = store_kv(&gpu, &mut rng, n_pos, nkv);
    let width = n_head * hd;
    let tokens = [(0u32, 10u32), (1, 70), (2, 149), (3, 149), (4, 0)];
    let q = rng.vec(tokens.len() * width, 4.0);
    let s = AttnShape {
        n_head,
        head_dim: hd,
        gqa,
        nkv,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let together = run_attn(&gpu, &s, &q, &cache, &tokens);
    for &(t, p) in &tokens {
        let alone = run_attn(&gpu, &s, &q, &cache, &[(t, p)]);
        let row = t as usize * width..(t as usize + 1) * width;
        assert_eq!(
            bytemuck::cast_slice::<f32, u32>(&alone[row.clone()]),
            bytemuck::cast_slice::<f32, u32>(&together[row]),
            "token row {t} at position {p}: alone vs in a batch of {}",
            tokens.len()
        );
    }
}
