//! Hyper-parameters of a model read from its GGUF metadata, with an error naming any missing key.
//!
//! Keys and defaults follow llama.cpp's `src/llama-model.cpp` (`llama_model::load_hparams`) and
//! `src/llama-arch.cpp` (key names) at commit 0c1e570.

use crate::engine::gguf::{GgufError, GgufFile, Value};
use crate::engine::kernels::ops::RopeMode;

use super::ModelError;

/// The architectures this engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// llama 2/3, mistral, TinyLlama, SmolLM: RMS norm, rope (normal), SwiGLU, GQA; Mixtral when the file
    /// has experts (`llama.expert_count`). Mistral's `llama.attention.sliding_window` is ignored, as
    /// llama.cpp 0c1e570 ignores it for this architecture (`llama_model_llama::load_arch_hparams` does not
    /// read it): every layer attends to the whole context.
    Llama,
    /// qwen2: llama plus q/k/v biases, NeoX rope.
    Qwen2,
    /// qwen3: llama plus per-head RMS norm of q and k, NeoX rope.
    Qwen3,
    /// BERT encoders (all-MiniLM…): absolute positions, token types, layer norm, GELU, pooling.
    Bert,
    // gemma
    /// gemma2: scaled embeddings, post-attention/post-FFN norms, GeGLU, interleaved sliding-window
    /// layers, attention and final logit soft-capping, NeoX rope (`src/engine/model/gemma.rs`).
    Gemma2,
    /// gemma3: gemma2 plus per-head q/k RMS norm and a separate rope base for the sliding layers, without
    /// attention soft-capping.
    Gemma3,
    // moe
    /// qwen2moe: qwen2 attention, routed experts (softmax, top-k, no renormalisation) plus a shared expert
    /// scaled by a sigmoid gate.
    Qwen2Moe,
    /// qwen3moe: qwen3 attention, routed experts (softmax, top-k, renormalised).
    Qwen3Moe,
    // phi3
    /// phi3 / phi4-mini: fused `attn_qkv` and gate/up, NeoX rope (possibly partial), LongRoPE factors.
    Phi3,
}

impl Arch {
    /// Every architecture this engine runs, in the order error messages list them.
    pub const ALL: [Arch; 9] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Qwen2Moe,
        Arch::Qwen3Moe,
        Arch::Phi3,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Bert,
    ];

    /// Parses `general.architecture`; `None` for an architecture we do not run.
    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The names of [`Arch::ALL`], comma-separated (for error messages).
    pub fn names() -> String {
        Arch::ALL.map(Arch::name).join(", ")
    }

    /// The GGUF key prefix (`general.architecture`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Bert => "bert",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Phi3 => "phi3",
        }
    }

    /// Rope pairing (`llama_model_rope_type`).
    pub fn rope_mode(self) -> RopeMode {
        match self {
            Arch::Llama | Arch::Bert => RopeMode::Normal,
            Arch::Qwen2
            | Arch::Qwen3
            | Arch::Qwen2Moe
            | Arch::Qwen3Moe
            | Arch::Phi3
            | Arch::Gemma2
            | Arch::Gemma3 => RopeMode::Neox,
        }
    }
}

/// Pooling of per-token embeddings into one vector per sequence (`{arch}.pooling_type`,
/// `enum llama_pooling_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// 0: no pooling, one embedding per token.
    None,
    /// 1: mean over the sequence's tokens.
    Mean,
    /// 2: the first token's (`[CLS]`).
    Cls,
    /// 3: the last token's.
    Last,
    /// 4: rank (rerankers, llama-server's `--reranking`): the first token's row (or the mean, when
    /// `{arch}.classifier.pooling_type` is 1) through the classification head, giving `n_cls_out`
    /// scores per sequence (`build_pooling`, `LLAMA_POOLING_TYPE_RANK`, `src/llama-graph.cpp`).
    /// BERT only.
    Rank,
}

impl Pooling {
    /// llama-server's `--pooling` name (`none`, `mean`, `cls`, `last`, `rank`).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::None => "none",
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
            Pooling::Rank => "rank",
        }
    }
}

/// Hyper-parameters of a model. Lengths are element counts.
#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    pub arch: Arch,
    /// `{arch}.embedding_length`: width of the residual stream.
    pub n_embd: usize,
    /// `{arch}.block_count`: transformer layers.
    pub n_layer: usize,
    /// `{arch}.feed_forward_length`: FFN hidden width.
    pub n_ff: usize,
    /// `{arch}.attention.head_count`.
    pub n_head: usize,
    /// `{arch}.attention.head_count_kv` (defaults to `n_head`, i.e. no GQA).
    pub n_head_kv: usize,
    /// `{arch}.attention.key_length` (defaults to `n_embd / n_head`); also the value length.
    pub head_dim: usize,
    /// `{arch}.context_length`: the context the model was trained with (tokens).
    pub n_ctx_train: usize,
    /// RMS-norm epsilon (`{arch}.attention.layer_norm_rms_epsilon`) for llama-family models,
    /// layer-norm epsilon (`{arch}.attention.layer_norm_epsilon`) for BERT.
    pub norm_eps: f32,
    /// `{arch}.rope.dimension_count` (defaults to `head_dim`).
    pub rope_n_dims: usize,
    /// `{arch}.rope.freq_base` (default 10000).
    pub rope_freq_base: f32,
    /// 1 / `{arch}.rope.scaling.factor` for linear scaling; 1.0 otherwise.
    pub rope_freq_scale: f32,
    /// `{arch}.pooling_type` (BERT default: mean when absent; decoders: none).
    pub pooling: Pooling,
    /// `{arch}.attention.causal` (BERT: false; decoders: true).
    pub causal: bool,
    // rank
    /// Scores per sequence of the classification head (rank pooling): the length of
    /// `{arch}.classifier.output_labels` when the file has it, else 1 (llama.cpp's `n_cls_out`).
    pub n_cls_out: usize,
    /// `{arch}.classifier.pooling_type` is 1 (mean): rank pooling averages the token rows before the
    /// head instead of taking the first (llama.cpp's `pooling_type_cls`).
    pub rank_mean: bool,
    // gemma
    /// Sliding-window attention and the per-layer-kind settings of gemma2/gemma3 (`None` for the other
    /// architectures); read by [`super::gemma::load_hparams`].
    pub gemma: Option<super::gemma::GemmaHParams>,
    // rope scaling
    /// `{arch}.rope.scaling.attn_factor` (default 1): multiplies every rope cosine and sine (ggml's
    /// `mscale`; phi3 LongRoPE files set it).
    pub rope_attn_factor: f32,
    /// `{arch}.rope.scaling.original_context_length` (default `n_ctx_train`): phi3 uses its long rope
    /// factors for contexts above it (`llama_model::get_rope_factors`).
    pub n_ctx_orig: usize,
    // moe
    /// `{arch}.expert_count` (0 for a dense model).
    pub n_expert: usize,
    /// `{arch}.expert_used_count`: experts each token is routed to (top-k).
    pub n_expert_used: usize,
    /// Hidden width of one expert: `{arch}.expert_feed_forward_length`, else `n_ff / n_expert_used`
    /// (qwen2moe, qwen3moe) or `n_ff` (llama/Mixtral).
    pub n_ff_exp: usize,
    /// qwen2moe: hidden width of the shared expert, `{arch}.expert_shared_feed_forward_length` (else `n_ff`).
    pub n_ff_shexp: usize,
}

impl HParams {
    /// Reads the hyper-parameters of `f`.
    ///
    /// Errors: [`ModelError::UnsupportedArch`] for an architecture not in [`Arch::ALL`],
    /// [`ModelError::Gguf`] naming a missing or mistyped key, [`ModelError::BadHParams`] for values that
    /// contradict each other (zero sizes, heads not dividing, unknown rope scaling or pooling).
    pub fn from_gguf(f: &GgufFile) -> Result<HParams, ModelError> {
        let arch_name = f.architecture()?;
        let arch = Arch::from_name(arch_name)
            .ok_or_else(|| ModelError::UnsupportedArch(arch_name.to_string()))?;
        let a = arch.name();
        let req = |k: &str| -> Result<usize, ModelError> { Ok(get_uint(f, &format!("{a}.{k}"))?) };
        let opt = |k: &str| -> Result<Option<usize>, ModelError> {
            let key = format!("{a}.{k}");
            match f.get(&key) {
                None => Ok(None),
                Some(_) => Ok(Some(get_uint(f, &key)?)),
            }
        };
        let n_embd = req("embedding_length")?;
        let n_layer = req("block_count")?;
        // moe: experts, read as llama.cpp's `load_hparams` does (`expert_count`, `expert_used_count`).
        let n_expert = opt("expert_count")?.unwrap_or(0);
        let n_expert_used = opt("expert_used_count")?.unwrap_or(0);
        let moe_arch = matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe);
        // MoE files may leave out the dense width (llama.cpp reads it as optional); experts then need
        // `expert_feed_forward_length`.
        let n_ff = match opt("feed_forward_length")? {
            Some(v) => v,
            None if moe_arch => 0,
            None => req("feed_forward_length")?,
        };
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ctx_train = req("context_length")?;
        let bad = |what: String| ModelError::BadHParams(what);
        if n_embd == 0 || n_layer == 0 || (n_ff == 0 && !moe_arch) || n_head == 0 || n_head_kv == 0
        {
            return Err(bad(format!(
                "zero size: embedding_length {n_embd}, block_count {n_layer}, feed_forward_length {n_ff}, \
                 head_count {n_head}, head_count_kv {n_head_kv}"
            )));
        }
        if n_head % n_head_kv != 0 {
            return Err(bad(format!(
                "head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"
            )));
        }
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(bad(format!(
                        "embedding_length {n_embd} is not a multiple of head_count {n_head}"
                    )));
                }
                n_embd / n_head
            }
        };
        if let Some(vl) = opt("attention.value_length")?
            && vl != head_dim
        {
            return Err(bad(format!(
                "attention.value_length {vl} differs from key_length {head_dim} (unsupported)"
            )));
        }
        if head_dim == 0 || head_dim > 1024 {
            return Err(bad(format!("head dimension {head_dim} out of range")));
        }
        let norm_eps = match arch {
            Arch::Bert => f.get_f32(&format!("{a}.attention.layer_norm_epsilon"))?,
            _ => f.get_f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        };
        let rope_n_dims = opt("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_n_dims > head_dim || rope_n_dims % 2 != 0 {
            return Err(bad(format!(
                "rope.dimension_count {rope_n_dims} must be even and at most the head dimension {head_dim}"
            )));
        }
        let rope_freq_base = match f.get(&format!("{a}.rope.freq_base")) {
            None => 10000.0,
            Some(_) => f.get_f32(&format!("{a}.rope.freq_base"))?,
        };
        // llama.cpp's default scaling type is "linear" (`load_hparams`): a factor without a type scales.
        let scaling_type = match f.get(&format!("{a}.rope.scaling.type")) {
            None => "linear".to_string(),
            Some(_) => f.get_str(&format!("{a}.rope.scaling.type"))?.to_string(),
        };
        let factor = match f.get(&format!("{a}.rope.scaling.factor")) {
            None => 0.0,
            Some(_) => f.get_f32(&format!("{a}.rope.scaling.factor"))?,
        };
        let rope_freq_scale = match scaling_type.as_str() {
            "none" => 1.0,
            // LongRoPE (phi3) scales frequencies by its per-dimension factors, and linearly only when a
            // factor is given.
            "linear" | "longrope" if factor > 0.0 && factor.is_finite() => 1.0 / factor,
            "linear" | "longrope" => 1.0,
            other => {
                return Err(bad(format!(
                    "{a}.rope.scaling.type {other:?} is not supported (none, linear and longrope are)"
                )));
            }
        };
        let rope_attn_factor = match f.get(&format!("{a}.rope.scaling.attn_factor")) {
            None => 1.0,
            Some(_) => f.get_f32(&format!("{a}.rope.scaling.attn_factor"))?,
        };
        if !(rope_attn_factor.is_finite() && rope_attn_factor > 0.0) {
            return Err(bad(format!(
                "{a}.rope.scaling.attn_factor {rope_attn_factor} out of range"
            )));
        }
        let n_ctx_orig = opt("rope.scaling.original_context_length")?.unwrap_or(n_ctx_train);
        // moe
        let (n_ff_exp, n_ff_shexp) = if n_expert > 0 {
            if n_expert_used == 0 || n_expert_used > n_expert || n_expert > 512 {
                return Err(bad(format!(
                    "{a}.expert_used_count {n_expert_used} must be in 1..={a}.expert_count {n_expert} (at most 512)"
                )));
            }
            // llama (Mixtral) experts are n_ff wide (`llama_model_llama::load_arch_tensors`).
            let n_ff_exp = match opt("expert_feed_forward_length")? {
                _ if arch == Arch::Llama => n_ff,
                Some(v) if v > 0 => v,
                _ => n_ff / n_expert_used,
            };
            if n_ff_exp == 0 {
                return Err(bad(format!(
                    "{a}.expert_feed_forward_length is missing and feed_forward_length {n_ff} gives no expert width"
                )));
            }
            let n_ff_shexp = match opt("expert_shared_feed_forward_length")? {
                Some(v) if v > 0 => v,
                _ => n_ff,
            };
            (n_ff_exp, n_ff_shexp)
        } else if moe_arch {
            return Err(bad(format!(
                "{a}.expert_count is missing or 0 (the architecture is a mixture of experts)"
            )));
        } else {
            (0, 0)
        };
        if arch == Arch::Qwen2Moe && n_ff_shexp == 0 {
            return Err(bad(format!(
                "{a}.expert_shared_feed_forward_length is missing and feed_forward_length is 0"
            )));
        }
        if n_expert > 0 && !matches!(arch, Arch::Llama | Arch::Qwen2Moe | Arch::Qwen3Moe) {
            return Err(bad(format!(
                "{a}.expert_count {n_expert}: experts are supported for llama, qwen2moe and qwen3moe only"
            )));
        }
        let pooling = match opt("pooling_type")? {
            None if arch == Arch::Bert => Pooling::Mean,
            None | Some(0) => Pooling::None,
            Some(1) => Pooling::Mean,
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::Last,
            Some(4) if arch == Arch::Bert => Pooling::Rank,
            Some(4) => {
                return Err(bad(format!(
                    "{a}.pooling_type 4 (rank) is supported for bert only"
                )));
            }
            Some(p) => {
                return Err(bad(format!(
                    "{a}.pooling_type {p} is not supported (0 none, 1 mean, 2 cls, 3 last, 4 rank)"
                )));
            }
        };
        // rank: `load_hparams` reads the labels as an optional string array and takes their count.
        let labels_key = format!("{a}.classifier.output_labels");
        let n_cls_out = match f.get(&labels_key) {
            None => 1,
            Some(Value::Array(v)) if !v.is_empty() && v.len() <= 4096 => v.len(),
            Some(Value::Array(v)) if v.is_empty() => 1,
            Some(v) => {
                return Err(bad(format!(
                    "{labels_key} must be an array of at most 4096 labels, found {}",
                    v.describe()
                )));
            }
        };
        let rank_mean = opt("classifier.pooling_type")? == Some(1);
        let causal = match f.get(&format!("{a}.attention.causal")) {
            None => arch != Arch::Bert,
            Some(_) => f.get_bool(&format!("{a}.attention.causal"))?,
        };
        let eps_ok = norm_eps.is_finite() && norm_eps >= 0.0;
        let base_ok = rope_freq_base.is_finite() && rope_freq_base > 0.0;
        if !eps_ok || !base_ok {
            return Err(bad(format!(
                "norm epsilon {norm_eps} or rope.freq_base {rope_freq_base} out of range"
            )));
        }
        let mut hp = HParams {
            arch,
            n_embd,
            n_layer,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            n_ctx_train,
            norm_eps,
            rope_n_dims,
            rope_freq_base,
            rope_freq_scale,
            pooling,
            causal,
            n_cls_out,
            rank_mean,
            rope_attn_factor,
            n_ctx_orig,
            n_expert,
            n_expert_used,
            n_ff_exp,
            n_ff_shexp,
            gemma: None,
        };
        if matches!(arch, Arch::Gemma2 | Arch::Gemma3) {
            hp.gemma = Some(super::gemma::load_hparams(f, &hp)?);
        }
        Ok(hp)
    }

    /// Width of one token's K (or V) for all KV heads: `n_head_kv * head_dim`.
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Width of one token's Q for all heads: `n_head * head_dim`.
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// Reads an unsigned integer of any width (GGUF writers differ: u32 mostly, sometimes u64 or i32).
fn get_uint(f: &GgufFile, key: &str) -> Result<usize, GgufError> {
    match f.get(key) {
        None => Err(GgufError::MissingKey {
            key: key.to_string(),
        }),
        Some(v) => match v {
            Value::Array(_) | Value::String(_) | Value::Bool(_) | Value::F32(_) | Value::F64(_) => {
                Err(GgufError::WrongType {
                    key: key.to_string(),
                    expected: "an unsigned integer",
                    found: v.describe(),
                })
            }
            _ => v
                .as_int()
                .filter(|i| *i >= 0 && *i <= u32::MAX as i128)
                .map(|i| i as usize)
                .ok_or_else(|| GgufError::WrongType {
                    key: key.to_string(),
                    expected: "an unsigned integer below 2^32",
                    found: v.describe(),
                }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF holding only metadata: `(key, value)` with u32, f32 or string values.
    fn gguf(kv: &[(&str, Value)]) -> GgufFile {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, v) in kv {
            s(&mut b, k);
            match v {
                Value::U32(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                Value::F32(x) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                Value::String(x) => {
                    b.extend(8u32.to_le_bytes());
                    s(&mut b, x);
                }
                other => panic!("unsupported in this test: {other:?}"),
            }
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        GgufFile::from_bytes(b).expect("a valid GGUF")
    }

    fn base(arch: &str) -> Vec<(String, Value)> {
        let k = |s: &str| format!("{arch}.{s}");
        vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (k("embedding_length"), Value::U32(64)),
            (k("block_count"), Value::U32(2)),
            (k("feed_forward_length"), Value::U32(128)),
            (k("attention.head_count"), Value::U32(4)),
            (k("context_length"), Value::U32(4096)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        ]
    }

    /// Sets `key` (replacing an earlier value: a GGUF key appears once).
    fn set(kv: &mut Vec<(String, Value)>, key: &str, v: Value) {
        kv.retain(|(k, _)| k != key);
        kv.push((key.to_string(), v));
    }

    fn parse(kv: &[(String, Value)]) -> Result<HParams, ModelError> {
        let kv: Vec<(&str, Value)> = kv.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        HParams::from_gguf(&gguf(&kv))
    }

    #[test]
    fn moe_keys_are_read_and_their_absence_is_named() {
        let mut kv = base("qwen2moe");
        let err = parse(&kv).unwrap_err().to_string();
        assert!(err.contains("qwen2moe.expert_count"), "{err}");
        set(&mut kv, "qwen2moe.expert_count", Value::U32(8));
        let err = parse(&kv).unwrap_err().to_string();
        assert!(err.contains("qwen2moe.expert_used_count"), "{err}");
        set(&mut kv, "qwen2moe.expert_used_count", Value::U32(2));
        let hp = parse(&kv).unwrap();
        assert_eq!((hp.n_expert, hp.n_expert_used), (8, 2));
        // Defaults of load_arch_tensors: n_ff / n_expert_used and n_ff.
        assert_eq!((hp.n_ff_exp, hp.n_ff_shexp), (64, 128));
        set(
            &mut kv,
            "qwen2moe.expert_feed_forward_length",
            Value::U32(32),
        );
        set(
            &mut kv,
            "qwen2moe.expert_shared_feed_forward_length",
            Value::U32(96),
        );
        let hp = parse(&kv).unwrap();
        assert_eq!((hp.n_ff_exp, hp.n_ff_shexp), (32, 96));
        assert_eq!(hp.arch.rope_mode(), RopeMode::Neox);
    }

    #[test]
    fn mixtral_experts_are_n_ff_wide() {
        let mut kv = base("llama");
        set(&mut kv, "llama.expert_count", Value::U32(8));
        set(&mut kv, "llama.expert_used_count", Value::U32(2));
        set(&mut kv, "llama.expert_feed_forward_length", Value::U32(32));
        let hp = parse(&kv).unwrap();
        assert_eq!(hp.n_ff_exp, 128);
        set(&mut kv, "llama.expert_used_count", Value::U32(9));
        let err = parse(&kv).unwrap_err().to_string();
        assert!(err.contains("expert_used_count 9"), "{err}");
    }

    #[test]
    fn rank_pooling_is_read_for_bert_only() {
        let mut kv = base("bert");
        set(
            &mut kv,
            "bert.attention.layer_norm_epsilon",
            Value::F32(1e-12),
        );
        let hp = parse(&kv).unwrap();
        assert_eq!(
            (hp.pooling, hp.n_cls_out, hp.rank_mean),
            (Pooling::Mean, 1, false)
        );
        set(&mut kv, "bert.pooling_type", Value::U32(4));
        set(&mut kv, "bert.classifier.pooling_type", Value::U32(1));
        let hp = parse(&kv).unwrap();
        assert_eq!(
            (hp.pooling, hp.n_cls_out, hp.rank_mean),
            (Pooling::Rank, 1, true)
        );
        assert_eq!(hp.pooling.name(), "rank");
        set(
            &mut kv,
            "bert.classifier.output_labels",
            Value::String("LABEL_0".into()),
        );
        let err = parse(&kv).unwrap_err().to_string();
        assert!(
            err.contains("bert.classifier.output_labels must be an array"),
            "{err}"
        );
        let mut kv = base("llama");
        set(&mut kv, "llama.pooling_type", Value::U32(4));
        let err = parse(&kv).unwrap_err().to_string();
        assert!(
            err.contains("pooling_type 4 (rank) is supported for bert only"),
            "{err}"
        );
        set(&mut kv, "llama.pooling_type", Value::U32(5));
        let err = parse(&kv).unwrap_err().to_string();
        assert!(err.contains("4 rank"), "{err}");
    }

    #[test]
    fn missing_rms_epsilon_is_named() {
        let kv: Vec<_> = base("phi3")
            .into_iter()
            .filter(|(k, _)| !k.ends_with("layer_norm_rms_epsilon"))
            .collect();
        let err = parse(&kv).unwrap_err().to_string();
        assert!(
            err.contains("phi3.attention.layer_norm_rms_epsilon"),
            "{err}"
        );
    }

    #[test]
    fn rope_scaling_keys() {
        let mut kv = base("phi3");
        let hp = parse(&kv).unwrap();
        assert_eq!(
            (hp.rope_attn_factor, hp.n_ctx_orig, hp.rope_freq_scale),
            (1.0, 4096, 1.0)
        );
        set(&mut kv, "phi3.rope.scaling.attn_factor", Value::F32(1.19));
        set(
            &mut kv,
            "phi3.rope.scaling.original_context_length",
            Value::U32(256),
        );
        let hp = parse(&kv).unwrap();
        assert_eq!((hp.rope_attn_factor, hp.n_ctx_orig), (1.19, 256));
        // A factor without a type scales linearly, as llama.cpp's default "linear".
        set(&mut kv, "phi3.rope.scaling.factor", Value::F32(4.0));
        assert_eq!(parse(&kv).unwrap().rope_freq_scale, 0.25);
        set(
            &mut kv,
            "phi3.rope.scaling.type",
            Value::String("none".into()),
        );
        assert_eq!(parse(&kv).unwrap().rope_freq_scale, 1.0);
        set(
            &mut kv,
            "phi3.rope.scaling.type",
            Value::String("yarn".into()),
        );
        let err = parse(&kv).unwrap_err().to_string();
        assert!(err.contains("\"yarn\" is not supported"), "{err}");
    }
}
