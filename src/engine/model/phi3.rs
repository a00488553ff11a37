//! phi3 (Phi-3, Phi-3.5, Phi-4-mini): the fused tensors split into the llama-family layout, the choice of
//! LongRoPE factors, and the query pre-scaling of its graph; the rest of the forward pass is the llama
//! family's.
//!
//! Ported from llama.cpp commit 0c1e570: `src/models/phi3.cpp` (`llama_model_phi3::load_arch_tensors`,
//! `llama_model_phi3::graph`), `src/llama-model.cpp` (`llama_model::get_rope_factors`),
//! `src/llama-graph.cpp` (`build_qkv`: views of the fused `attn_qkv` product; `build_ffn` with
//! `LLM_FFN_SWIGLU`/`LLM_FFN_SEQ`: `ggml_swiglu` of the fused up product, gate first). A row of a fused
//! product is the same dot product as the row of its view, so splitting changes no bit.

use crate::engine::gguf::GgufFile;

use super::ModelError;
use super::hparams::{Arch, HParams};
use super::weights::{Linear, Weights, linear};

/// Q, K and V of layer `il` as views of `blk.{il}.attn_qkv.weight` (`[n_embd_q + 2 · n_embd_kv, n_embd]`,
/// rows Q then K then V), or the separate `attn_q/k/v.weight` when the file has no fused tensor
/// (`create_tensor_qkv` takes either).
///
/// Errors: [`ModelError::MissingTensor`], [`ModelError::BadTensorShape`],
/// [`ModelError::UnsupportedTensorType`], naming the tensor.
pub(super) fn qkv(
    f: &GgufFile,
    hp: &HParams,
    il: usize,
) -> Result<(Linear, Linear, Linear), ModelError> {
    let (e, q, kv) = (hp.n_embd, hp.n_embd_q(), hp.n_embd_kv());
    let fused = format!("blk.{il}.attn_qkv.weight");
    if f.tensor(&fused).is_none() {
        return Ok((
            linear(f, &format!("blk.{il}.attn_q.weight"), q, e)?,
            linear(f, &format!("blk.{il}.attn_k.weight"), kv, e)?,
            linear(f, &format!("blk.{il}.attn_v.weight"), kv, e)?,
        ));
    }
    let w = linear(f, &fused, q + 2 * kv, e)?;
    Ok((
        w.rows(0, q, format!("{fused}[q]"))?,
        w.rows(q, kv, format!("{fused}[k]"))?,
        w.rows(q + kv, kv, format!("{fused}[v]"))?,
    ))
}

/// The SwiGLU gate and up projections of layer `il` as the two halves of `blk.{il}.ffn_up.weight`
/// (`[2 · n_ff, n_embd]`: gate rows first, as `ggml_swiglu` reads them).
///
/// Errors: as [`qkv`].
pub(super) fn gate_up(
    f: &GgufFile,
    hp: &HParams,
    il: usize,
) -> Result<(Linear, Linear), ModelError> {
    let name = format!("blk.{il}.ffn_up.weight");
    let w = linear(f, &name, 2 * hp.n_ff, hp.n_embd)?;
    Ok((
        w.rows(0, hp.n_ff, format!("{name}[gate]"))?,
        w.rows(hp.n_ff, hp.n_ff, format!("{name}[up]"))?,
    ))
}

/// The rope frequency divisors for a context of `n_ctx_seq` positions per sequence
/// (`llama_model::get_rope_factors`): `rope_freqs.weight` when present (Llama 3.x), else phi3's
/// `rope_factors_long` when `n_ctx_seq` exceeds `rope.scaling.original_context_length`, else
/// `rope_factors_short`; `None` when the file has none of them. `[rope_n_dims / 2]`.
pub fn rope_factors<'a>(w: &'a Weights, hp: &HParams, n_ctx_seq: usize) -> Option<&'a [f32]> {
    if let Some(f) = &w.rope_freqs {
        return Some(f);
    }
    if n_ctx_seq > hp.n_ctx_orig {
        w.rope_long.as_deref()
    } else {
        w.rope_short.as_deref()
    }
}

/// Whether the architecture scales Q by `1/√head_dim` before attention (and attends with scale 1), as
/// `llama_model_phi3::graph` does (`ggml_scale` then `build_attn(…, 1.0f, …)`); the rounding differs
/// from scaling the scores.
pub fn prescales_q(arch: Arch) -> bool {
    arch == Arch::Phi3
}
