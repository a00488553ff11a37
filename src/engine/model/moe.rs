//! Mixture-of-experts FFNs (Mixtral = llama with experts, qwen2moe, qwen3moe): the router, top-k
//! selection and weight normalisation each architecture uses, per-expert batches, and qwen2moe's shared
//! expert with its sigmoid gate.
//!
//! Ported from llama.cpp commit 0c1e570: `src/llama-graph.cpp` (`llm_graph_context::build_moe_ffn`, softmax
//! gating, `norm_w`), `src/models/llama.cpp`, `src/models/qwen2moe.cpp`, `src/models/qwen3moe.cpp` (graphs
//! and `load_arch_tensors`). Every token's result is computed by the same arithmetic whatever the batch:
//! an expert's matmul over the tokens routed to it gives each token the same bits as a matmul over that
//! token alone (the kernels' batch invariance), and each token sums its experts' outputs in its own
//! top-k order, as ggml does.

use crate::engine::gguf::GgufFile;
use crate::engine::kernels::ops;

use super::ModelError;
use super::hparams::{Arch, HParams};
use super::linalg::{self, Pool};
use super::weights::{Layer, Linear, linear, missing, shape};

/// How the router's probabilities become expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightNorm {
    /// The chosen experts' softmax probabilities as they are (qwen2moe: `norm_w = false`).
    None,
    /// Divided by their sum, clamped below at 2^-14 (Mixtral, qwen3moe: `norm_w = true`, the HF
    /// `norm_topk_prob`).
    Sum,
}

/// qwen2moe's shared expert: a dense SwiGLU FFN run for every token, scaled by `sigmoid(gate_inp · x)`.
#[derive(Debug)]
pub struct SharedExpert {
    /// `ffn_gate_inp_shexp.weight`: one row, `[1, n_embd]` (ggml `[n_embd]`).
    pub gate_inp: Linear,
    /// `ffn_gate_shexp.weight`, `[n_ff_shexp, n_embd]`.
    pub gate: Linear,
    /// `ffn_up_shexp.weight`, `[n_ff_shexp, n_embd]`.
    pub up: Linear,
    /// `ffn_down_shexp.weight`, `[n_embd, n_ff_shexp]`.
    pub down: Linear,
}

/// The routing part of a MoE layer; the experts' matrices live stacked in the layer's `ffn_gate`,
/// `ffn_up`, `ffn_down` (see [`Layer`]).
#[derive(Debug)]
pub struct MoeFfn {
    /// `ffn_gate_inp.weight`: router, `[n_expert, n_embd]`, F32 or F16.
    pub router: Linear,
    /// Experts (`{arch}.expert_count`).
    pub n_expert: usize,
    /// Experts per token (`{arch}.expert_used_count`).
    pub n_expert_used: usize,
    /// Hidden width of one expert.
    pub n_ff_exp: usize,
    /// Weight normalisation of the architecture.
    pub norm: WeightNorm,
    /// qwen2moe's shared expert.
    pub shared: Option<SharedExpert>,
}

/// Loads layer `il`'s experts: `(gate, up, down, routing)` where gate/up/down are the stacked
/// `ffn_{gate,up,down}_exps.weight` tensors as matrices of `n_expert · rows` rows.
///
/// Errors: [`ModelError::MissingTensor`], [`ModelError::BadTensorShape`] (the 3-D shapes of
/// `load_arch_tensors`), [`ModelError::UnsupportedTensorType`], each naming the tensor.
pub(super) fn load(
    f: &GgufFile,
    hp: &HParams,
    il: usize,
) -> Result<(Linear, Linear, Linear, MoeFfn), ModelError> {
    let n = |s: &str| format!("blk.{il}.{s}");
    let (e, ne, nfe) = (hp.n_embd, hp.n_expert, hp.n_ff_exp);
    let router = linear(f, &n("ffn_gate_inp.weight"), ne, e)?;
    let gate = experts(f, &n("ffn_gate_exps.weight"), nfe, e, ne)?;
    let up = experts(f, &n("ffn_up_exps.weight"), nfe, e, ne)?;
    let down = experts(f, &n("ffn_down_exps.weight"), e, nfe, ne)?;
    let shared = if hp.arch == Arch::Qwen2Moe {
        let name = n("ffn_gate_inp_shexp.weight");
        let t = f.tensor(&name).ok_or_else(|| missing(&name))?;
        if t.n_elements() != e as u64 || t.dims[0] != e as u64 {
            return Err(shape(t, &format!("[{e}]")));
        }
        let gate_inp = Linear {
            name: name.clone(),
            ty: t.ty,
            n_rows: 1,
            n_cols: e,
            info: t.clone(),
        };
        // Check the one-row view can be multiplied (F32/F16/quantized with a kernel).
        gate_inp.rows(0, 1, name)?;
        if crate::engine::kernels::vec_dot_fn(gate_inp.ty).is_none() {
            return Err(ModelError::UnsupportedTensorType {
                name: gate_inp.name.clone(),
                ty: gate_inp.ty.name().to_string(),
            });
        }
        let ns = hp.n_ff_shexp;
        Some(SharedExpert {
            gate_inp,
            gate: linear(f, &n("ffn_gate_shexp.weight"), ns, e)?,
            up: linear(f, &n("ffn_up_shexp.weight"), ns, e)?,
            down: linear(f, &n("ffn_down_shexp.weight"), e, ns)?,
        })
    } else {
        None
    };
    let norm = match hp.arch {
        Arch::Qwen2Moe => WeightNorm::None,
        _ => WeightNorm::Sum,
    };
    Ok((
        gate,
        up,
        down,
        MoeFfn {
            router,
            n_expert: ne,
            n_expert_used: hp.n_expert_used,
            n_ff_exp: nfe,
            norm,
            shared,
        },
    ))
}

/// A stacked expert tensor of ggml dims `[n_cols, n_rows, n_expert]`, as a matrix of `n_expert · n_rows` rows.
fn experts(
    f: &GgufFile,
    name: &str,
    n_rows: usize,
    n_cols: usize,
    n_expert: usize,
) -> Result<Linear, ModelError> {
    let t = f.tensor(name).ok_or_else(|| missing(name))?;
    let want = [n_cols as u64, n_rows as u64, n_expert as u64];
    if t.dims != want {
        return Err(shape(t, &format!("[{n_cols}, {n_rows}, {n_expert}]")));
    }
    if crate::engine::kernels::vec_dot_fn(t.ty).is_none() {
        return Err(ModelError::UnsupportedTensorType {
            name: name.to_string(),
            ty: t.ty.name().to_string(),
        });
    }
    let mut info = t.clone();
    info.dims = vec![n_cols as u64, (n_rows * n_expert) as u64];
    Ok(Linear {
        name: name.to_string(),
        ty: t.ty,
        n_rows: n_rows * n_expert,
        n_cols,
        info,
    })
}

/// Expert `x` of a stacked matrix of `rows` rows per expert.
fn expert(w: &Linear, x: usize, rows: usize) -> Result<Linear, ModelError> {
    w.rows(x * rows, rows, format!("{}[expert {x}]", w.name))
}

/// Smallest weight sum of `norm_w` (`ggml_clamp(…, 6.103515625e-5, INFINITY)`: 2^-14, the smallest normal
/// f16).
pub const MIN_WEIGHT_SUM: f32 = 1.0 / 16384.0;

/// The top-k routing of one token: `(expert, weight)` in llama.cpp's order (probability descending, ties by
/// lower expert index: `ggml_argsort` is `std::sort`, an insertion sort at these sizes).
///
/// `logits` is the router's row `[n_expert]`; the softmax is `ggml_soft_max` (`ops::softmax`), the
/// normalisation `ggml_sum_rows` (f64 sum, rounded to f32), `ggml_clamp` at [`MIN_WEIGHT_SUM`] and `ggml_div`.
pub fn route(logits: &[f32], k: usize, norm: WeightNorm) -> Vec<(usize, f32)> {
    let mut probs = logits.to_vec();
    ops::softmax(&mut probs);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Stable: equal probabilities keep index order.
    order.sort_by(|&a, &b| {
        probs[b]
            .partial_cmp(&probs[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut sel: Vec<(usize, f32)> = order.iter().take(k).map(|&x| (x, probs[x])).collect();
    if norm == WeightNorm::Sum {
        let sum = sel.iter().map(|&(_, w)| w as f64).sum::<f64>() as f32;
        let sum = sum.max(MIN_WEIGHT_SUM);
        for (_, w) in sel.iter_mut() {
            *w /= sum;
        }
    }
    sel
}

/// The MoE FFN of one layer over `h` (`[n_tokens, n_embd]`, already normed): returns `[n_tokens, n_embd]`,
/// the routed experts' weighted sum (plus the gated shared expert for qwen2moe), without the residual.
///
/// Each expert runs once over the batch of tokens routed to it (`ggml_mul_mat_id`): gate and up
/// projections, SwiGLU (`ggml_swiglu_split`), down projection, times the token's weight (`ggml_mul`); a
/// token then adds its experts' rows in its top-k order (`ggml_add` chain of `build_moe_ffn`).
///
/// Errors: [`ModelError::MissingTensor`] when the layer has no stacked gate; matmul errors.
pub(super) fn ffn(
    pool: &Pool,
    file: &GgufFile,
    layer: &Layer,
    moe: &MoeFfn,
    h: &[f32],
    n: usize,
    e: usize,
) -> Result<Vec<f32>, ModelError> {
    let nfe = moe.n_ff_exp;
    let k = moe.n_expert_used;
    let mut logits = vec![0.0f32; n * moe.n_expert];
    linalg::matmul(pool, file, &moe.router, h, n, &mut logits)?;
    let routes: Vec<Vec<(usize, f32)>> = logits
        .chunks_exact(moe.n_expert)
        .map(|row| route(row, k, moe.norm))
        .collect();
    let gate_w = layer
        .ffn_gate
        .as_ref()
        .ok_or_else(|| missing(&format!("{} (expert gates)", layer.ffn_up.name)))?;
    // expert_out[t * k + slot]: the weighted output row of token t's slot-th expert.
    let mut expert_out = vec![0.0f32; n * k * e];
    for x in 0..moe.n_expert {
        let tokens: Vec<(usize, usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(t, r)| {
                r.iter()
                    .position(|&(ex, _)| ex == x)
                    .map(|slot| (t, slot, r[slot].1))
            })
            .collect();
        if tokens.is_empty() {
            continue;
        }
        let m = tokens.len();
        let mut xin = vec![0.0f32; m * e];
        for (j, &(t, _, _)) in tokens.iter().enumerate() {
            xin[j * e..(j + 1) * e].copy_from_slice(&h[t * e..(t + 1) * e]);
        }
        let mut g = vec![0.0f32; m * nfe];
        let mut u = vec![0.0f32; m * nfe];
        linalg::matmul(pool, file, &expert(gate_w, x, nfe)?, &xin, m, &mut g)?;
        linalg::matmul(pool, file, &expert(&layer.ffn_up, x, nfe)?, &xin, m, &mut u)?;
        for (gr, ur) in g.chunks_exact_mut(nfe).zip(u.chunks_exact(nfe)) {
            ops::swiglu(gr, ur);
        }
        let mut d = vec![0.0f32; m * e];
        linalg::matmul(pool, file, &expert(&layer.ffn_down, x, e)?, &g, m, &mut d)?;
        for (j, &(t, slot, w)) in tokens.iter().enumerate() {
            let dst = &mut expert_out[(t * k + slot) * e..(t * k + slot + 1) * e];
            for (o, &v) in dst.iter_mut().zip(&d[j * e..(j + 1) * e]) {
                *o = v * w;
            }
        }
    }
    let mut out = vec![0.0f32; n * e];
    for t in 0..n {
        let row = &mut out[t * e..(t + 1) * e];
        row.copy_from_slice(&expert_out[t * k * e..(t * k + 1) * e]);
        for slot in 1..k {
            let src = &expert_out[(t * k + slot) * e..(t * k + slot + 1) * e];
            ops::add_in_place(row, src);
        }
    }
    if let Some(sh) = &moe.shared {
        shared_expert(pool, file, sh, h, n, e, &mut out)?;
    }
    Ok(out)
}

/// qwen2moe's shared expert added to `out` (`[n_tokens, n_embd]`): `out += ffn(h) · sigmoid(gate_inp · h)`,
/// the sigmoid computed as `silu(x) / x` as `llama_model_qwen2moe::graph` does.
fn shared_expert(
    pool: &Pool,
    file: &GgufFile,
    sh: &SharedExpert,
    h: &[f32],
    n: usize,
    e: usize,
    out: &mut [f32],
) -> Result<(), ModelError> {
    let ns = sh.gate.n_rows;
    let mut gi = vec![0.0f32; n];
    linalg::matmul(pool, file, &sh.gate_inp, h, n, &mut gi)?;
    let mut g = vec![0.0f32; n * ns];
    let mut u = vec![0.0f32; n * ns];
    linalg::matmul(pool, file, &sh.gate, h, n, &mut g)?;
    linalg::matmul(pool, file, &sh.up, h, n, &mut u)?;
    for (gr, ur) in g.chunks_exact_mut(ns).zip(u.chunks_exact(ns)) {
        ops::swiglu(gr, ur);
    }
    let mut d = vec![0.0f32; n * e];
    linalg::matmul(pool, file, &sh.down, &g, n, &mut d)?;
    for t in 0..n {
        let x = gi[t];
        let gate = ops::silu(x) / x;
        let row = &mut out[t * e..(t + 1) * e];
        for (o, &v) in row.iter_mut().zip(&d[t * e..(t + 1) * e]) {
            *o += v * gate;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_top_k_in_descending_order_and_normalises() {
        let logits = [0.1f32, 2.0, -1.0, 1.5, 2.0, 0.0, -3.0, 0.5];
        let r = route(&logits, 2, WeightNorm::None);
        // Ties (experts 1 and 4) keep index order.
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 4]);
        let mut p = logits.to_vec();
        ops::softmax(&mut p);
        assert_eq!(r[0].1, p[1]);
        let n = route(&logits, 3, WeightNorm::Sum);
        assert_eq!(n.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 4, 3]);
        let s = ((p[1] as f64 + p[4] as f64 + p[3] as f64) as f32).max(MIN_WEIGHT_SUM);
        assert_eq!(n[2].1, p[3] / s);
        let total: f32 = n.iter().map(|p| p.1).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
    }
}
