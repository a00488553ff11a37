//! The tensors of a model, found by llama.cpp's names (`src/llama-arch.cpp`, `LLM_TENSOR_NAMES`) and
//! checked for shape at load: matrices stay in the mmap in their ggml format; the small vectors (norms,
//! biases, position and token-type tables) are copied out as f32.

use half::f16;

use crate::engine::ggml_type::GgmlType;
use crate::engine::gguf::{GgufFile, TensorInfo};
use crate::engine::{kernels, quant};

use super::ModelError;
use super::hparams::{Arch, HParams};
use super::moe::MoeFfn;

/// A weight matrix in the mmap: `n_rows` rows of `n_cols` elements of type `ty` (ggml dims `[n_cols, n_rows]`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// Tensor name, for error messages.
    pub name: String,
    /// ggml type of the rows.
    pub ty: GgmlType,
    /// Output features (ggml `ne1`).
    pub n_rows: usize,
    /// Input features (ggml `ne0`, the row length).
    pub n_cols: usize,
    /// Byte range of the data inside the file's mapping.
    pub info: TensorInfo,
}

impl Linear {
    /// The view of rows `r0..r0 + n` (ggml dims `[n_cols, n]`): a slice of a fused matrix (phi3's
    /// `attn_qkv` and gate/up `ffn_up`) or one expert of a stacked `ffn_*_exps` tensor. A row's dot products
    /// are the same through the view as through the whole matrix.
    ///
    /// Errors: [`ModelError::BadTensorShape`] when the rows are out of range or `n_cols` is not a multiple of
    /// the type's block size.
    pub fn rows(&self, r0: usize, n: usize, name: String) -> Result<Linear, ModelError> {
        let bad = || ModelError::BadTensorShape {
            name: self.name.clone(),
            dims: self.info.dims.clone(),
            expected: format!("rows {r0}..{} of {} whole blocks", r0 + n, self.n_rows),
        };
        if r0.checked_add(n).is_none_or(|end| end > self.n_rows) {
            return Err(bad());
        }
        let rb = quant::row_bytes(self.ty, self.n_cols).map_err(|_| bad())? as u64;
        let mut info = self.info.clone();
        info.offset += r0 as u64 * rb;
        info.n_bytes = n as u64 * rb;
        info.dims = vec![self.n_cols as u64, n as u64];
        Ok(Linear {
            name,
            ty: self.ty,
            n_rows: n,
            n_cols: self.n_cols,
            info,
        })
    }
}

/// One transformer block's weights. Optional items exist only for some architectures.
#[derive(Debug)]
pub struct Layer {
    /// Pre-attention norm (llama family) — `attn_norm.weight`; BERT: post-attention `attn_output_norm`.
    pub attn_norm: Vec<f32>,
    /// BERT: `attn_output_norm.bias`.
    pub attn_norm_b: Option<Vec<f32>>,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub bo: Option<Vec<f32>>,
    /// qwen3: per-head RMS norm weights of q and k, `[head_dim]`.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Pre-FFN norm (llama family) — `ffn_norm.weight`; BERT: post-FFN `layer_output_norm`.
    pub ffn_norm: Vec<f32>,
    /// BERT: `layer_output_norm.bias`.
    pub ffn_norm_b: Option<Vec<f32>>,
    /// SwiGLU gate (llama family); absent for BERT. MoE layers: every expert's gate rows stacked,
    /// `[n_expert · n_ff_exp, n_embd]` (ggml `ffn_gate_exps` `[n_embd, n_ff_exp, n_expert]`).
    pub ffn_gate: Option<Linear>,
    /// FFN up projection. MoE layers: every expert's rows stacked (`ffn_up_exps`), as `ffn_gate`.
    pub ffn_up: Linear,
    /// FFN down projection. MoE layers: every expert's rows stacked, `[n_expert · n_embd, n_ff_exp]`
    /// (ggml `ffn_down_exps` `[n_ff_exp, n_embd, n_expert]`).
    pub ffn_down: Linear,
    pub ffn_up_b: Option<Vec<f32>>,
    pub ffn_down_b: Option<Vec<f32>>,
    // gemma
    /// gemma2/3: RMS norm of the attention output before the residual, `post_attention_norm.weight`
    /// `[n_embd]`.
    pub attn_post_norm: Option<Vec<f32>>,
    /// gemma2/3: RMS norm of the FFN output before the residual, `post_ffw_norm.weight` `[n_embd]`.
    pub ffn_post_norm: Option<Vec<f32>>,
    // moe
    /// Router and expert layout of a mixture-of-experts FFN (Mixtral, qwen2moe, qwen3moe); the experts'
    /// matrices are `ffn_gate`/`ffn_up`/`ffn_down` above. `None` for a dense FFN.
    pub moe: Option<MoeFfn>,
}

/// All weights of a model.
#[derive(Debug)]
pub struct Weights {
    /// `token_embd.weight`: `[n_vocab, n_embd]` rows, looked up by token id.
    pub tok_embd: Linear,
    /// BERT: `position_embd.weight`, `[n_pos][n_embd]` flattened.
    pub pos_embd: Option<Vec<f32>>,
    /// BERT: row 0 of `token_types.weight`, `[n_embd]` (every token has type 0).
    pub type_embd0: Option<Vec<f32>>,
    /// BERT: `token_embd_norm.weight` / `.bias`.
    pub tok_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub layers: Vec<Layer>,
    /// `output_norm.weight` (llama family).
    pub output_norm: Option<Vec<f32>>,
    /// `output.weight`, or `token_embd.weight` when the embeddings are tied (SmolLM2); `None` for BERT.
    pub output: Option<Linear>,
    /// `rope_freqs.weight`: per-dimension rope frequency divisors, `[rope_n_dims / 2]`.
    pub rope_freqs: Option<Vec<f32>>,
    // phi3
    /// `rope_factors_long.weight` / `rope_factors_short.weight` (phi3 LongRoPE): the frequency divisors
    /// used when a sequence's context is above / at most `rope.scaling.original_context_length`,
    /// `[rope_n_dims / 2]` each.
    pub rope_long: Option<Vec<f32>>,
    pub rope_short: Option<Vec<f32>>,
    // rank
    /// BERT classification head of rank pooling (llama.cpp `LLM_TENSOR_CLS`, `LLM_TENSOR_CLS_OUT`,
    /// each optional): `cls.weight` `[n_embd, n_embd]` and `cls.bias` `[n_embd]`, then
    /// `cls.output.weight` `[n_embd, n_cls_out]` and `cls.output.bias` `[n_cls_out]`.
    pub cls: Option<Linear>,
    pub cls_b: Option<Vec<f32>>,
    pub cls_out: Option<Linear>,
    pub cls_out_b: Option<Vec<f32>>,
}

impl Weights {
    /// Finds and checks every tensor the architecture needs.
    ///
    /// Errors: [`ModelError::MissingTensor`], [`ModelError::BadTensorShape`],
    /// [`ModelError::UnsupportedTensorType`] (vectors must be F32 or F16), each naming the tensor.
    pub fn load(f: &GgufFile, hp: &HParams, n_vocab: usize) -> Result<Weights, ModelError> {
        let e = hp.n_embd;
        let tok_embd = matrix(f, "token_embd.weight", n_vocab, e)?;
        if !quant::can_dequantize(tok_embd.ty) {
            return Err(ModelError::UnsupportedTensorType {
                name: tok_embd.name.clone(),
                ty: tok_embd.ty.name().to_string(),
            });
        }
        let bert = hp.arch == Arch::Bert;
        let (pos_embd, type_embd0, tok_norm) = if bert {
            let pe = f
                .tensor("position_embd.weight")
                .ok_or_else(|| missing("position_embd.weight"))?;
            if pe.dims.len() != 2 || pe.dims[0] as usize != e {
                return Err(shape(pe, &format!("[{e}, n_pos]")));
            }
            let tt = f
                .tensor("token_types.weight")
                .ok_or_else(|| missing("token_types.weight"))?;
            if tt.dims.is_empty() || tt.dims[0] as usize != e {
                return Err(shape(tt, &format!("[{e}, n_types]")));
            }
            let types = vector_any(f, tt)?;
            (
                Some(vector_any(f, pe)?),
                Some(types[..e].to_vec()),
                Some((
                    vector(f, "token_embd_norm.weight", e)?,
                    vector(f, "token_embd_norm.bias", e)?,
                )),
            )
        } else {
            (None, None, None)
        };
        let q = hp.n_embd_q();
        let kv = hp.n_embd_kv();
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let opt_vec = |name: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                if f.tensor(name).is_some() {
                    Ok(Some(vector(f, name, len)?))
                } else {
                    Ok(None)
                }
            };
            let (attn_norm, attn_norm_b, ffn_norm, ffn_norm_b) = if bert {
                (
                    vector(f, &n("attn_output_norm.weight"), e)?,
                    Some(vector(f, &n("attn_output_norm.bias"), e)?),
                    vector(f, &n("layer_output_norm.weight"), e)?,
                    Some(vector(f, &n("layer_output_norm.bias"), e)?),
                )
            } else {
                (
                    vector(f, &n("attn_norm.weight"), e)?,
                    None,
                    vector(f, &n("ffn_norm.weight"), e)?,
                    None,
                )
            };
            let need_bias = |name: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                Ok(Some(vector(f, name, len)?))
            };
            let (bq, bk, bv) = match hp.arch {
                Arch::Bert | Arch::Qwen2 => (
                    need_bias(&n("attn_q.bias"), q)?,
                    need_bias(&n("attn_k.bias"), kv)?,
                    need_bias(&n("attn_v.bias"), kv)?,
                ),
                _ => (
                    opt_vec(&n("attn_q.bias"), q)?,
                    opt_vec(&n("attn_k.bias"), kv)?,
                    opt_vec(&n("attn_v.bias"), kv)?,
                ),
            };
            let (q_norm, k_norm) = if matches!(hp.arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3)
            {
                (
                    Some(vector(f, &n("attn_q_norm.weight"), hp.head_dim)?),
                    Some(vector(f, &n("attn_k_norm.weight"), hp.head_dim)?),
                )
            } else {
                (None, None)
            };
            // gemma
            let gemma = matches!(hp.arch, Arch::Gemma2 | Arch::Gemma3);
            let (attn_post_norm, ffn_post_norm) = if gemma {
                (
                    Some(vector(f, &n("post_attention_norm.weight"), e)?),
                    Some(vector(f, &n("post_ffw_norm.weight"), e)?),
                )
            } else {
                (None, None)
            };
            let (wq, wk, wv) = if hp.arch == Arch::Phi3 {
                super::phi3::qkv(f, hp, i)?
            } else {
                (
                    linear(f, &n("attn_q.weight"), q, e)?,
                    linear(f, &n("attn_k.weight"), kv, e)?,
                    linear(f, &n("attn_v.weight"), kv, e)?,
                )
            };
            let (ffn_gate, ffn_up, ffn_down, moe) = if hp.n_expert > 0 {
                let (g, u, d, m) = super::moe::load(f, hp, i)?;
                (Some(g), u, d, Some(m))
            } else if hp.arch == Arch::Phi3 {
                let (g, u) = super::phi3::gate_up(f, hp, i)?;
                (
                    Some(g),
                    u,
                    linear(f, &n("ffn_down.weight"), e, hp.n_ff)?,
                    None,
                )
            } else {
                (
                    if bert {
                        None
                    } else {
                        Some(linear(f, &n("ffn_gate.weight"), hp.n_ff, e)?)
                    },
                    linear(f, &n("ffn_up.weight"), hp.n_ff, e)?,
                    linear(f, &n("ffn_down.weight"), e, hp.n_ff)?,
                    None,
                )
            };
            layers.push(Layer {
                attn_norm,
                attn_norm_b,
                wq,
                wk,
                wv,
                wo: linear(f, &n("attn_output.weight"), e, q)?,
                bq,
                bk,
                bv,
                bo: if bert {
                    need_bias(&n("attn_output.bias"), e)?
                } else {
                    opt_vec(&n("attn_output.bias"), e)?
                },
                q_norm,
                k_norm,
                ffn_norm,
                ffn_norm_b,
                ffn_gate,
                ffn_up,
                ffn_down,
                ffn_up_b: if bert {
                    need_bias(&n("ffn_up.bias"), hp.n_ff)?
                } else {
                    None
                },
                ffn_down_b: if bert {
                    need_bias(&n("ffn_down.bias"), e)?
                } else {
                    None
                },
                attn_post_norm,
                ffn_post_norm,
                moe,
            });
        }
        let (output_norm, output) = if bert {
            (None, None)
        } else {
            let out = if f.tensor("output.weight").is_some() {
                linear(f, "output.weight", n_vocab, e)?
            } else {
                linear(f, "token_embd.weight", n_vocab, e)?
            };
            (Some(vector(f, "output_norm.weight", e)?), Some(out))
        };
        let opt_rope = |name: &str| -> Result<Option<Vec<f32>>, ModelError> {
            if f.tensor(name).is_some() {
                Ok(Some(vector(f, name, hp.rope_n_dims / 2)?))
            } else {
                Ok(None)
            }
        };
        let rope_freqs = opt_rope("rope_freqs.weight")?;
        let rope_long = opt_rope("rope_factors_long.weight")?;
        let rope_short = opt_rope("rope_factors_short.weight")?;
        // rank: the classification head, each tensor optional but checked when present
        // (`llama_model_bert::load_arch_tensors`, TENSOR_NOT_REQUIRED).
        let opt_linear = |name: &str, rows: usize| -> Result<Option<Linear>, ModelError> {
            match f.tensor(name) {
                Some(_) if bert => Ok(Some(linear(f, name, rows, e)?)),
                _ => Ok(None),
            }
        };
        let opt_vector = |name: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
            match f.tensor(name) {
                Some(_) if bert => Ok(Some(vector(f, name, len)?)),
                _ => Ok(None),
            }
        };
        let cls = opt_linear("cls.weight", e)?;
        let cls_b = opt_vector("cls.bias", e)?;
        let cls_out = opt_linear("cls.output.weight", hp.n_cls_out)?;
        let cls_out_b = opt_vector("cls.output.bias", hp.n_cls_out)?;
        Ok(Weights {
            tok_embd,
            pos_embd,
            type_embd0,
            tok_norm,
            layers,
            output_norm,
            output,
            rope_freqs,
            rope_long,
            rope_short,
            cls,
            cls_b,
            cls_out,
            cls_out_b,
        })
    }
}

pub(super) fn missing(name: &str) -> ModelError {
    ModelError::MissingTensor(name.to_string())
}

pub(super) fn shape(t: &TensorInfo, expected: &str) -> ModelError {
    ModelError::BadTensorShape {
        name: t.name.clone(),
        dims: t.dims.clone(),
        expected: expected.to_string(),
    }
}

/// A matrix of `n_rows` rows of `n_cols` (ggml dims `[n_cols, n_rows]`) that the kernels can multiply.
pub(super) fn linear(
    f: &GgufFile,
    name: &str,
    n_rows: usize,
    n_cols: usize,
) -> Result<Linear, ModelError> {
    let m = matrix(f, name, n_rows, n_cols)?;
    if kernels::vec_dot_fn(m.ty).is_none() {
        return Err(ModelError::UnsupportedTensorType {
            name: m.name,
            ty: m.ty.name().to_string(),
        });
    }
    Ok(m)
}

/// A matrix of `n_rows` rows of `n_cols` (ggml dims `[n_cols, n_rows]`).
fn matrix(f: &GgufFile, name: &str, n_rows: usize, n_cols: usize) -> Result<Linear, ModelError> {
    let t = f.tensor(name).ok_or_else(|| missing(name))?;
    let ok = t.dims.len() == 2 && t.dims[0] as usize == n_cols && t.dims[1] as usize == n_rows;
    if !ok {
        return Err(shape(t, &format!("[{n_cols}, {n_rows}]")));
    }
    Ok(Linear {
        name: name.to_string(),
        ty: t.ty,
        n_rows,
        n_cols,
        info: t.clone(),
    })
}

/// A 1-D tensor of exactly `len` elements, as f32.
pub(super) fn vector(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let t = f.tensor(name).ok_or_else(|| missing(name))?;
    if t.n_elements() != len as u64 {
        return Err(shape(t, &format!("[{len}]")));
    }
    vector_any(f, t)
}

/// Any F32 or F16 tensor flattened to f32 (ggml order).
fn vector_any(f: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>, ModelError> {
    let bytes = f.tensor_data(t);
    match t.ty {
        GgmlType::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        GgmlType::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        ty => Err(ModelError::UnsupportedTensorType {
            name: t.name.clone(),
            ty: ty.name().to_string(),
        }),
    }
}
