//! Model hyper-parameters, weights and forward passes (llama and Mixtral, qwen2, qwen3, qwen2moe, qwen3moe,
//! phi3, gemma2, gemma3, bert), and the KV cache (full or sliding-window): the engine API that the worker and
//! the CLI drive (`Model::load`, `Context::decode`, logits, embeddings).
//!
//! Ported from llama.cpp commit 0c1e570: `src/llama-model.cpp` (hyper-parameters, tensors),
//! `src/models/llama.cpp`, `qwen2.cpp`, `qwen3.cpp`, `qwen2moe.cpp`, `qwen3moe.cpp`, `phi3.cpp`, `gemma2.cpp`,
//! `gemma3.cpp`, `bert.cpp`
//! (graphs), `src/llama-graph.cpp` (attention, FFN, MoE FFN, pooling) and `src/llama-context.cpp` (batches,
//! outputs).

pub mod cli;
mod forward;
mod gemma;
pub mod hparams;
mod kv_cache;
mod linalg;
pub mod moe;
pub mod phi3;
pub mod seq_state;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use crate::engine::chat::ChatTemplate;
use crate::engine::gguf::{GgufError, GgufFile, LoadMode};
use crate::engine::tokenizer::{Tokenizer, TokenizerError};

use crate::engine::kernels::ops::{self, RopeParams};
pub use gemma::GemmaHParams;
pub use hparams::{Arch, HParams, Pooling};
use kv_cache::KvCache;
pub use kv_cache::KvType;
use linalg::Pool;
use weights::Weights;

/// Errors of model loading and of the forward pass. Each names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(
        "unsupported architecture {name:?} (supported: {list})",
        name = .0,
        list = hparams::Arch::names()
    )]
    UnsupportedArch(String),
    #[error("bad hyper-parameters: {0}")]
    BadHParams(String),
    #[error("tensor {0:?} is missing")]
    MissingTensor(String),
    #[error("tensor {name:?} has dims {dims:?}, expected {expected}")]
    BadTensorShape {
        name: String,
        dims: Vec<u64>,
        expected: String,
    },
    #[error("tensor {name:?} has type {ty}, which this engine cannot use there")]
    UnsupportedTensorType { name: String, ty: String },
    #[error("bad context parameters: {0}")]
    BadContextParams(String),
    #[error("bad batch: {0}")]
    BadBatch(String),
    #[error("token id {token} is out of range (n_vocab {n_vocab})")]
    BadToken { token: u64, n_vocab: usize },
    #[error("sequence id {seq} is out of range (n_seq_max {n_seq_max})")]
    BadSeq { seq: u32, n_seq_max: usize },
    #[error("position {pos} of sequence {seq} is past the context size {n_ctx}")]
    ContextFull { seq: u32, pos: u32, n_ctx: usize },
    #[error("{0}")]
    Unsupported(String),
    /// A saved sequence was refused ([`Context::seq_state_load`]) or could not be written.
    #[error(transparent)]
    SeqState(#[from] seq_state::SeqStateError),
}

/// Options of [`Model::load`].
#[derive(Clone, Debug)]
pub struct ModelParams {
    /// Threads for work done at load time (and the default for contexts).
    pub n_threads: usize,
    /// GPU offload (`-ngl`, `--device`); the default runs on the CPU only.
    pub gpu: crate::engine::gpu::GpuOptions,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            n_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gpu: Default::default(),
        }
    }
}

/// A loaded model: the mapped GGUF file, its hyper-parameters and weight views. `Send + Sync`; share it
/// between contexts with `Arc`.
pub struct Model {
    file: Arc<GgufFile>,
    hp: HParams,
    weights: Weights,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    n_vocab: usize,
    arch_name: String,
    params: ModelParams,
    backend: crate::engine::gpu::BackendInfo,
    /// The layers (and output) offloaded to a GPU, when `-ngl` asked and an adapter took them.
    gpu: Option<crate::engine::gpu::llama::GpuModel>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("hparams", &self.hp)
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

/// What [`Model::from_gguf`] reads from a file before it builds the chat template.
struct LoadedParts {
    hp: HParams,
    n_vocab: usize,
    weights: Weights,
    tokenizer: Tokenizer,
}

/// Every load-time check of [`Model::from_gguf`] about the file, in its order: a kernel for every
/// tensor's ggml type, hyper-parameters (architecture and keys),
/// `token_embd.weight`'s shape, every weight (presence, shape, a kernel for its ggml type), the
/// tokenizer and its size against the embedding rows. Cheap: matrices stay in the mmap, only norms and
/// biases are copied.
fn load_parts(file: &GgufFile) -> Result<LoadedParts, ModelError> {
    // A tensor type without a kernel refuses the file before anything else is read.
    if let Some((name, ty)) = crate::engine::kernels::unsupported_tensor_types(file).first() {
        return Err(ModelError::UnsupportedTensorType {
            name: name.clone(),
            ty: ty.name().to_string(),
        });
    }
    let hp = HParams::from_gguf(file)?;
    let te = file
        .tensor("token_embd.weight")
        .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
    if te.dims.len() != 2 || te.dims[1] == 0 {
        return Err(ModelError::BadTensorShape {
            name: te.name.clone(),
            dims: te.dims.clone(),
            expected: format!("[{}, n_vocab]", hp.n_embd),
        });
    }
    let n_vocab = te.dims[1] as usize;
    let weights = Weights::load(file, &hp, n_vocab)?;
    let tokenizer = Tokenizer::from_gguf(file)?;
    if tokenizer.n_vocab() > n_vocab {
        return Err(ModelError::BadTensorShape {
            name: te.name.clone(),
            dims: te.dims.clone(),
            expected: format!(
                "at least {} rows, one per token of the vocabulary",
                tokenizer.n_vocab()
            ),
        });
    }
    Ok(LoadedParts {
        hp,
        n_vocab,
        weights,
        tokenizer,
    })
}

/// Whether this engine can run `file`, decided by the same checks as [`Model::load`] (architecture,
/// hyper-parameter keys, every tensor's presence, shape and ggml type, the tokenizer), without
/// building the model: the catalogue and `inspect` use it to say *before* a load why a file cannot run.
///
/// Errors: the [`ModelError`] that [`Model::load`] would return for this file.
pub fn check_runnable(file: &GgufFile) -> Result<(), ModelError> {
    load_parts(file).map(|_| ())
}

impl Model {
    /// Opens `path` (mmap), reads hyper-parameters and finds every weight.
    ///
    /// Errors: GGUF errors, [`ModelError::UnsupportedArch`], a missing key or tensor (named), a tensor of the
    /// wrong shape or an unsupported type.
    pub fn load(path: &Path, params: &ModelParams) -> Result<Arc<Model>, ModelError> {
        Self::load_with(path, params, LoadMode::default())
    }

    /// [`Model::load`] with the file read or mapped, and locked, as `mode` says (llama.cpp's
    /// `use_mmap`, `use_mlock`). Errors: as [`Model::load`].
    pub fn load_with(
        path: &Path,
        params: &ModelParams,
        mode: LoadMode,
    ) -> Result<Arc<Model>, ModelError> {
        let file = Arc::new(GgufFile::open_with(path, mode)?);
        Self::from_gguf(file, params)
    }

    /// Builds a model over an already opened file.
    pub fn from_gguf(file: Arc<GgufFile>, params: &ModelParams) -> Result<Arc<Model>, ModelError> {
        // A bad CYBER_INFERENCE_ISA refuses every model up front (a process setting, not a file's).
        crate::engine::kernels::check_isa().map_err(|e| ModelError::Unsupported(e.to_string()))?;
        let LoadedParts {
            hp,
            n_vocab,
            weights,
            tokenizer,
        } = load_parts(&file)?;
        // A decoder's template (or llama-server's ChatML fallback); a broken one only disables chat.
        let chat_template = if hp.arch == Arch::Bert {
            None
        } else {
            match ChatTemplate::from_gguf(&file) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("chat template unusable, chat disabled: {e}");
                    None
                }
            }
        };
        let mut gpu_err = None;
        let gpu = if params.gpu.n_gpu_layers != 0 && hp.arch != Arch::Bert {
            match crate::engine::gpu::llama::GpuModel::build(&file, &hp, &weights, &params.gpu) {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!("-ngl {}: {e}; running on the CPU", params.gpu.n_gpu_layers);
                    gpu_err = Some(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        let backend = match &gpu {
            Some(g) => {
                let i = g.info();
                tracing::info!(
                    "GPU backend {} on {:?} ({}): {} of {} layers offloaded{}, {:.1} MiB of weights on the device",
                    i.name,
                    i.adapter.as_deref().unwrap_or(""),
                    i.device_type.as_deref().unwrap_or(""),
                    i.offloaded_layers,
                    i.n_layer,
                    if i.output_offloaded {
                        " with the output layer"
                    } else {
                        ""
                    },
                    i.device_weight_bytes as f64 / 1048576.0
                );
                i.clone()
            }
            None => crate::engine::gpu::BackendInfo::cpu(
                hp.n_layer,
                params.gpu.n_gpu_layers,
                (params.gpu.n_gpu_layers != 0)
                    .then(|| gpu_err.unwrap_or_else(|| "encoders run on the CPU".to_string())),
            ),
        };
        Ok(Arc::new(Model {
            backend,
            gpu,
            chat_template,
            arch_name: hp.arch.name().to_string(),
            file,
            hp,
            weights,
            tokenizer,
            n_vocab,
            params: params.clone(),
        }))
    }

    /// What runs the model: the CPU, or a GPU adapter and how many layers it holds.
    pub fn backend(&self) -> &crate::engine::gpu::BackendInfo {
        &self.backend
    }

    /// The GGUF file (metadata for tokenizers and chat templates).
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// The shared handle of the GGUF file.
    pub fn gguf_arc(&self) -> Arc<GgufFile> {
        self.file.clone()
    }

    /// The tokenizer built from the file's `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template (`tokenizer.chat_template`, or ChatML when absent); `None` for encoders or when
    /// the file's template cannot be compiled.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Hyper-parameters.
    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// `general.architecture`: one of [`Arch::ALL`]'s names (`"llama"`, `"qwen3moe"`, `"gemma3"`…).
    pub fn arch(&self) -> &str {
        &self.arch_name
    }

    /// Vocabulary size (rows of `token_embd.weight`); the length of a logits row.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Width of the residual stream; the length of an embedding.
    pub fn n_embd(&self) -> usize {
        self.hp.n_embd
    }

    /// Context length the model was trained with (tokens).
    pub fn n_ctx_train(&self) -> usize {
        self.hp.n_ctx_train
    }

    /// Pooling of embeddings (`{arch}.pooling_type`).
    pub fn pooling(&self) -> Pooling {
        self.hp.pooling
    }

    /// True for encoders (BERT): embeddings only, no logits, whole sequences per batch.
    pub fn is_encoder(&self) -> bool {
        self.hp.arch == Arch::Bert
    }

    /// The load parameters.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// A reranker's input for one query and document, laid out as llama-server's
    /// `format_prompt_rerank` (`tools/server/server-common.cpp`) does: with the model's rerank template
    /// (`tokenizer.chat_template.rerank`), the template with `{query}` and `{document}` replaced,
    /// tokenized without added specials but parsing special-token text; otherwise
    /// `[BOS] query [EOS] [SEP] doc [EOS]`, where BOS is there when the vocabulary adds it, each EOS
    /// (the separator when there is no EOS) when it adds EOS, SEP when it adds a separator
    /// (`tokenizer.ggml.add_sep_token`, WordPiece's default), and the texts are tokenized without
    /// specials.
    pub fn rerank_tokens(&self, query: &str, doc: &str) -> Vec<u32> {
        let t = &self.tokenizer;
        if let Ok(template) = self.file.get_str("tokenizer.chat_template.rerank") {
            let prompt = template
                .replace("{query}", query)
                .replace("{document}", doc);
            return t.encode(&prompt, false, true);
        }
        let eos = t.eos().or(t.sep());
        let mut out = Vec::new();
        if t.add_bos() {
            out.extend(t.bos());
        }
        out.extend(t.encode(query, false, false));
        if t.add_eos() {
            out.extend(eos);
        }
        if t.add_sep() {
            out.extend(t.sep());
        }
        out.extend(t.encode(doc, false, false));
        if t.add_eos() {
            out.extend(eos);
        }
        out
    }
}

/// A batch of tokens (`llama_batch`): token `i` sits at position `pos[i]` of sequence `seq_id[i]`, and an
/// output (logits, or embeddings) is produced for it when `logits[i]`. Within one sequence, positions must
/// follow each other (`p, p+1, …`) and `p` must not exceed the sequence's cached length; starting below it
/// drops the cached cells from `p` on (a rewind).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub pos: Vec<u32>,
    pub seq_id: Vec<u32>,
    pub logits: Vec<bool>,
}

impl Batch {
    /// One sequence's tokens at positions `start..`, with an output only for the last token.
    pub fn single(tokens: &[u32], start: u32, seq: u32) -> Batch {
        let n = tokens.len();
        Batch {
            tokens: tokens.to_vec(),
            pos: (0..n as u32).map(|i| start + i).collect(),
            seq_id: vec![seq; n],
            logits: (0..n).map(|i| i + 1 == n).collect(),
        }
    }

    /// Adds one token.
    pub fn push(&mut self, token: u32, pos: u32, seq: u32, logits: bool) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seq_id.push(seq);
        self.logits.push(logits);
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// Options of a [`Context`].
#[derive(Clone, Debug)]
pub struct ContextParams {
    /// Positions per sequence (tokens).
    pub n_ctx: usize,
    /// Number of sequences (slots) the KV cache holds.
    pub n_seq_max: usize,
    /// Most tokens one [`Context::decode`] call accepts.
    pub n_batch: usize,
    /// Threads of the context's pool.
    pub n_threads: usize,
    /// Also produce embeddings (per output token for decoders, pooled per sequence for encoders).
    pub embeddings: bool,
    /// Element type of the cached keys (`--cache-type-k`).
    pub type_k: KvType,
    /// Element type of the cached values (`--cache-type-v`).
    pub type_v: KvType,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 2048,
            n_seq_max: 1,
            n_batch: 2048,
            n_threads: ModelParams::default().n_threads,
            embeddings: false,
            type_k: KvType::F16,
            type_v: KvType::F16,
        }
    }
}

/// Inference state over one model: the KV cache of `n_seq_max` sequences, the thread pool and the outputs of
/// the last [`Context::decode`]. Used by one thread at a time.
pub struct Context {
    model: Arc<Model>,
    params: ContextParams,
    pool: Pool,
    kv: Option<KvCache>,
    /// `[n_outputs, n_vocab]` of the last decode (decoders).
    logits: Vec<f32>,
    /// `[n_embeddings, n_embd]` of the last decode (when embeddings are on, or for encoders).
    embeddings: Vec<f32>,
    n_outputs: usize,
    n_embeddings: usize,
    /// The pooling an encoder's forward pass uses instead of the model's (set by
    /// [`Context::embed_rows`] for its pass only).
    pooling_override: Option<Pooling>,
    /// What a saved sequence must match, computed at the first save or restore.
    identity: std::cell::OnceCell<seq_state::ModelIdentity>,
}

impl Context {
    /// Creates a context and allocates its KV cache
    /// (`2 · n_layer · n_seq_max · n_ctx · n_embd_kv` elements; none for encoders).
    ///
    /// Errors: [`ModelError::BadContextParams`] for zero sizes, a context longer than an encoder's
    /// position table, or a cache whose size overflows.
    pub fn new(model: Arc<Model>, params: ContextParams) -> Result<Context, ModelError> {
        let hp = model.hparams();
        let bad = |s: String| Err(ModelError::BadContextParams(s));
        if params.n_ctx == 0 || params.n_seq_max == 0 || params.n_batch == 0 {
            return bad(format!(
                "n_ctx {}, n_seq_max {} and n_batch {} must be at least 1",
                params.n_ctx, params.n_seq_max, params.n_batch
            ));
        }
        if params.n_seq_max > 4096 {
            return bad(format!("n_seq_max {} is above 4096", params.n_seq_max));
        }
        let kv = if model.is_encoder() {
            let n_pos = model
                .weights
                .pos_embd
                .as_ref()
                .map_or(0, |p| p.len() / hp.n_embd);
            if params.n_ctx > n_pos {
                return bad(format!(
                    "n_ctx {} exceeds the encoder's {n_pos} positions",
                    params.n_ctx
                ));
            }
            None
        } else {
            let elems = hp
                .n_layer
                .checked_mul(params.n_seq_max)
                .and_then(|v| v.checked_mul(params.n_ctx))
                .and_then(|v| v.checked_mul(hp.n_embd_kv()))
                .filter(|&v| v <= (1usize << 40));
            if elems.is_none() {
                return bad(format!(
                    "a KV cache of {} sequences × {} positions is too large",
                    params.n_seq_max, params.n_ctx
                ));
            }
            for (what, ty) in [("keys", params.type_k), ("values", params.type_v)] {
                if !hp.head_dim.is_multiple_of(ty.block_size()) {
                    return bad(format!(
                        "a KV cache of type {} stores {what} in blocks of {} elements, but this model's head size is {}",
                        ty.name(),
                        ty.block_size(),
                        hp.head_dim
                    ));
                }
            }
            // gemma: sliding-window layers keep a ring of their window.
            let windows: Vec<Option<usize>> = match &hp.gemma {
                Some(g) if g.n_swa > 0 => {
                    g.swa_layers.iter().map(|&s| s.then_some(g.n_swa)).collect()
                }
                _ => vec![None; hp.n_layer],
            };
            let mut cache = KvCache::with_windows(
                &windows,
                params.n_seq_max,
                params.n_ctx,
                hp.n_embd_kv(),
                params.type_k,
                params.type_v,
            )
            .with_rotations(hp.head_dim);
            if let Some(g) = &model.gpu {
                if (params.type_k, params.type_v) != (KvType::F16, KvType::F16) {
                    return Err(ModelError::Unsupported(format!(
                        "the GPU backend keeps its KV cache in f16; cache types {}/{} need -ngl 0",
                        params.type_k.name(),
                        params.type_v.name()
                    )));
                }
                let dev = g
                    .new_kv(params.n_seq_max, params.n_ctx)
                    .map_err(|e| ModelError::Unsupported(e.to_string()))?;
                cache = cache.with_device(Arc::new(dev));
            }
            Some(cache)
        };
        Ok(Context {
            pool: Pool::new(params.n_threads),
            model,
            params,
            kv,
            logits: Vec::new(),
            embeddings: Vec::new(),
            n_outputs: 0,
            n_embeddings: 0,
            pooling_override: None,
            identity: std::cell::OnceCell::new(),
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The parameters this context was made with.
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// Bytes of the KV cache.
    pub fn kv_size_bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |k| k.size_bytes())
    }

    /// Runs the forward pass over a batch that may mix sequences (continuous batching) and keeps the
    /// outputs for [`Context::logits`] / [`Context::embeddings`].
    ///
    /// Errors: [`ModelError::BadBatch`] (empty, unequal lengths, more than `n_batch` tokens, positions not
    /// consecutive within a sequence or past its cached length), [`ModelError::BadToken`] (id ≥ n_vocab),
    /// [`ModelError::BadSeq`] (id ≥ n_seq_max), [`ModelError::ContextFull`] (position ≥ n_ctx).
    /// On error the cache is unchanged.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), ModelError> {
        let new_lens = self.validate(batch)?;
        forward::run(self, batch)?;
        if let (Some(kv), Some(lens)) = (self.kv.as_mut(), new_lens) {
            for (s, l) in lens {
                kv.set_len(s as usize, l);
            }
        }
        Ok(())
    }

    /// Checks a batch; for decoders returns the new length of each sequence it touches.
    fn validate(&self, b: &Batch) -> Result<Option<Vec<(u32, usize)>>, ModelError> {
        let n = b.tokens.len();
        if n == 0 {
            return Err(ModelError::BadBatch("the batch is empty".into()));
        }
        if b.pos.len() != n || b.seq_id.len() != n || b.logits.len() != n {
            return Err(ModelError::BadBatch(format!(
                "tokens {}, pos {}, seq_id {} and logits {} differ in length",
                n,
                b.pos.len(),
                b.seq_id.len(),
                b.logits.len()
            )));
        }
        if n > self.params.n_batch {
            return Err(ModelError::BadBatch(format!(
                "{n} tokens exceed n_batch {}",
                self.params.n_batch
            )));
        }
        let mut lens: Vec<(u32, usize)> = Vec::new();
        for i in 0..n {
            let (tok, pos, seq) = (b.tokens[i], b.pos[i], b.seq_id[i]);
            if tok as usize >= self.model.n_vocab {
                return Err(ModelError::BadToken {
                    token: tok as u64,
                    n_vocab: self.model.n_vocab,
                });
            }
            if seq as usize >= self.params.n_seq_max {
                return Err(ModelError::BadSeq {
                    seq,
                    n_seq_max: self.params.n_seq_max,
                });
            }
            if pos as usize >= self.params.n_ctx {
                return Err(ModelError::ContextFull {
                    seq,
                    pos,
                    n_ctx: self.params.n_ctx,
                });
            }
            let entry = match lens.iter_mut().find(|(s, _)| *s == seq) {
                Some(e) => e,
                None => {
                    let cached = self.seq_len(seq);
                    let start = if self.model.is_encoder() { 0 } else { cached };
                    if pos as usize > start {
                        return Err(ModelError::BadBatch(format!(
                            "token {i}: position {pos} of sequence {seq} leaves a gap after its {start} cached positions"
                        )));
                    }
                    // gemma: a rewind must not reach behind what a sliding-window ring still holds.
                    if let Some(kv) = &self.kv
                        && !kv.can_truncate(seq as usize, pos as usize)
                    {
                        return Err(ModelError::BadBatch(format!(
                            "token {i}: position {pos} of sequence {seq} rewinds past the sliding window \
                             still cached after {start} positions (clear the sequence and start again)"
                        )));
                    }
                    lens.push((seq, pos as usize));
                    lens.last_mut().expect("just pushed")
                }
            };
            if pos as usize != entry.1 {
                return Err(ModelError::BadBatch(format!(
                    "token {i}: position {pos} of sequence {seq}, expected {} (positions of a sequence must follow each other)",
                    entry.1
                )));
            }
            entry.1 += 1;
        }
        Ok(if self.model.is_encoder() {
            None
        } else {
            Some(lens)
        })
    }

    /// Number of outputs (logits rows) of the last decode.
    pub fn n_outputs(&self) -> usize {
        self.n_outputs
    }

    /// The logits `[n_vocab]` of the `i`-th output (the `i`-th token with `logits[i]` set) of the last decode.
    /// Panics when `i ≥ n_outputs()` (a caller bug, like slice indexing). Empty for encoders.
    pub fn logits(&self, i: usize) -> &[f32] {
        assert!(
            i < self.n_outputs,
            "output {i} of {} requested",
            self.n_outputs
        );
        let n = self.model.n_vocab;
        &self.logits[i * n..(i + 1) * n]
    }

    /// Number of embeddings of the last decode.
    pub fn n_embeddings(&self) -> usize {
        self.n_embeddings
    }

    /// Embedding `[n_embd]` number `i` of the last decode: for a pooled encoder, the `i`-th sequence in order
    /// of first appearance in the batch (not normalised; for rank pooling the row its classification head
    /// starts from, see [`Context::rank`] for the scores); otherwise the `i`-th output token's final hidden
    /// state (after the output norm). Panics when `i ≥ n_embeddings()`.
    pub fn embeddings(&self, i: usize) -> &[f32] {
        assert!(
            i < self.n_embeddings,
            "embedding {i} of {} requested",
            self.n_embeddings
        );
        let n = self.model.n_embd();
        &self.embeddings[i * n..(i + 1) * n]
    }

    /// One text's embedding: runs `tokens` as sequence 0 (then clears it), pools by the model's pooling
    /// (mean when it has none) and L2-normalises. `[n_embd]`.
    ///
    /// Errors: as [`Context::decode`]; [`ModelError::BadBatch`] for no tokens.
    pub fn embed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::BadBatch("no tokens to embed".into()));
        }
        let mut batch = Batch::single(tokens, 0, 0);
        batch.logits.iter_mut().for_each(|l| *l = true);
        let was = self.params.embeddings;
        self.params.embeddings = true;
        self.seq_clear(0);
        let r = self.decode(&batch);
        self.params.embeddings = was;
        self.seq_clear(0);
        r?;
        if self.model.pooling() == Pooling::Rank {
            return Err(ModelError::Unsupported(
                "this model's pooling is rank: it gives scores, not embeddings (use Context::rank)"
                    .into(),
            ));
        }
        let n = self.model.n_embd();
        let mut v = if self.model.is_encoder() && self.model.pooling() != Pooling::None {
            self.embeddings(0).to_vec()
        } else {
            let rows: Vec<&[f32]> = (0..self.n_embeddings).map(|i| self.embeddings(i)).collect();
            match self.model.pooling() {
                Pooling::Cls => rows[0].to_vec(),
                Pooling::Last => rows[rows.len() - 1].to_vec(),
                Pooling::Mean | Pooling::None | Pooling::Rank => forward::mean_rows(&rows, n),
            }
        };
        l2_normalize(&mut v);
        Ok(v)
    }

    /// One text's embedding rows, not normalised (llama-server's `--pooling`): with `Pooling::None` one
    /// row `[n_embd]` per token (the final hidden states), with `Pooling::Rank` one row of the
    /// `n_cls_out` scores of the classification head (see [`Context::rank`]), otherwise one row pooled
    /// by `pooling` (`None` = the model's pooling, mean when it has none). Runs `tokens` as sequence
    /// 0, then clears it.
    ///
    /// Errors: as [`Context::embed`]; [`ModelError::Unsupported`] for `Pooling::Rank` on a model that
    /// is not a BERT encoder.
    pub fn embed_rows(
        &mut self,
        tokens: &[u32],
        pooling: Option<Pooling>,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::BadBatch("no tokens to embed".into()));
        }
        let pooling = pooling.unwrap_or(match self.model.pooling() {
            Pooling::None => Pooling::Mean,
            p => p,
        });
        if pooling == Pooling::Rank && !self.model.is_encoder() {
            return Err(ModelError::Unsupported(format!(
                "rank pooling (reranking) needs a bert cross-encoder; this model is {}",
                self.model.arch()
            )));
        }
        let mut batch = Batch::single(tokens, 0, 0);
        batch.logits.iter_mut().for_each(|l| *l = true);
        let was = self.params.embeddings;
        self.params.embeddings = true;
        // An encoder pools inside its forward pass: have it keep the token rows and pool here.
        self.pooling_override = Some(Pooling::None);
        self.seq_clear(0);
        let r = self.decode(&batch);
        self.params.embeddings = was;
        self.pooling_override = None;
        self.seq_clear(0);
        r?;
        let n = self.model.n_embd();
        let rows: Vec<&[f32]> = (0..self.n_embeddings).map(|i| self.embeddings(i)).collect();
        Ok(match pooling {
            Pooling::None => rows.iter().map(|r| r.to_vec()).collect(),
            Pooling::Cls => vec![rows[0].to_vec()],
            Pooling::Last => vec![rows[rows.len() - 1].to_vec()],
            Pooling::Mean => vec![forward::mean_rows(&rows, n)],
            Pooling::Rank => vec![forward::rank_head(self, &rows)?],
        })
    }

    /// A reranker's scores for one input (usually a query and a document in the layout of
    /// llama-server's `format_prompt_rerank`): runs `tokens` as sequence 0 (then clears it) and applies
    /// the classification head of rank pooling ([`Pooling::Rank`]) to its final hidden rows, giving
    /// `n_cls_out` values (`HParams::n_cls_out`; llama-server's `/rerank` uses the first). The model's
    /// own `pooling_type` does not matter (llama-server's `--reranking` forces rank).
    ///
    /// Errors: as [`Context::embed_rows`] with `Some(Pooling::Rank)`.
    pub fn rank(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut rows = self.embed_rows(tokens, Some(Pooling::Rank))?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Drops every cached position of `seq` (no effect for an unknown sequence).
    pub fn seq_clear(&mut self, seq: u32) {
        if let Some(kv) = self.kv.as_mut() {
            kv.set_len(seq as usize, 0);
        }
    }

    /// Keeps only the first `len` cached positions of `seq` and drops the rest (llama.cpp's
    /// `llama_memory_seq_rm(mem, seq, len, -1)`): the next token of the sequence then goes at position
    /// `len`. A `len` at or past the cached length changes nothing; so does an unknown sequence or an
    /// encoder (no cache). The kept cells are untouched, so with the engine's batch invariance a
    /// continuation from them gives bit-identical logits to a cold run over the same tokens.
    ///
    /// Returns false, leaving the sequence unchanged, when a sliding-window layer's ring no longer holds
    /// the positions a token at `len` must attend to (the sequence went more than a window past `len`):
    /// the caller then clears the sequence and evaluates the prompt again, as llama-server does for SWA
    /// caches. True otherwise.
    pub fn seq_truncate(&mut self, seq: u32, len: usize) -> bool {
        if let Some(kv) = self.kv.as_mut() {
            let cur = kv.seq_len(seq as usize);
            if !kv.can_truncate(seq as usize, len) {
                return false;
            }
            kv.set_len(seq as usize, len.min(cur));
        }
        true
    }

    /// Whether [`Context::seq_shift`] can work: a decoder whose every layer caches the whole context
    /// (false for encoders and for sliding-window rings shorter than `n_ctx`, as llama.cpp's
    /// `llama_memory_can_shift`).
    pub fn can_shift(&self) -> bool {
        self.kv.as_ref().is_some_and(KvCache::can_shift)
    }

    /// llama-server's context shift of `seq`: drops cached positions `n_keep .. n_keep + n_discard`,
    /// moves the later ones back by `n_discard` and re-ropes their keys by `-n_discard` with each layer's
    /// rope (base, scale, frequency factors and attention factor as the forward pass uses them:
    /// llama.cpp `llama_kv_cache::build_rope_shift`, `src/llama-kv-cache.cpp`, which passes the same
    /// `attn_factor` as the graph). The next token then goes at position `len - n_discard`.
    ///
    /// Returns false, changing nothing, when [`Context::can_shift`] is false, `seq` is unknown or
    /// `n_keep + n_discard` exceeds its cached length.
    pub fn seq_shift(&mut self, seq: u32, n_keep: usize, n_discard: usize) -> bool {
        let model = self.model.clone();
        let hp = &model.hp;
        let w = &model.weights;
        let delta = -(n_discard as f32);
        let base = RopeParams {
            n_dims: hp.rope_n_dims,
            freq_base: hp.rope_freq_base,
            freq_scale: hp.rope_freq_scale,
            mode: hp.arch.rope_mode(),
        };
        let rot: Vec<kv_cache::KeyShift> = match &hp.gemma {
            // gemma: NeoX rope, the sliding layers with their own base and scale, no attention factor.
            Some(g) => {
                let global = RopeParams {
                    mode: ops::RopeMode::Neox,
                    ..base
                };
                let swa = RopeParams {
                    freq_base: g.rope_freq_base_swa,
                    freq_scale: g.rope_freq_scale_swa,
                    ..global.clone()
                };
                (0..hp.n_layer)
                    .map(|il| {
                        let p = if g.swa_layers.get(il).copied().unwrap_or(false) {
                            &swa
                        } else {
                            &global
                        };
                        let (cos, sin) = ops::rope_cache_at(p, delta, w.rope_freqs.as_deref());
                        kv_cache::KeyShift {
                            head_dim: hp.head_dim,
                            n_dims: p.n_dims,
                            mode: p.mode,
                            cos,
                            sin,
                        }
                    })
                    .collect()
            }
            None => {
                let factors = phi3::rope_factors(w, hp, self.params.n_ctx);
                let (mut cos, mut sin) = ops::rope_cache_at(&base, delta, factors);
                if hp.rope_attn_factor != 1.0 {
                    cos.iter_mut()
                        .chain(sin.iter_mut())
                        .for_each(|v| *v *= hp.rope_attn_factor);
                }
                let one = kv_cache::KeyShift {
                    head_dim: hp.head_dim,
                    n_dims: base.n_dims,
                    mode: base.mode,
                    cos,
                    sin,
                };
                vec![one; hp.n_layer]
            }
        };
        match self.kv.as_mut() {
            Some(kv) => kv.shift(seq as usize, n_keep, n_discard, &rot),
            None => false,
        }
    }

    /// Cached positions of `seq` (0 for encoders and unknown sequences).
    pub fn seq_len(&self, seq: u32) -> usize {
        self.kv.as_ref().map_or(0, |kv| kv.seq_len(seq as usize))
    }

    /// The model a saved sequence must come from (its GGUF fingerprint is hashed once, here).
    fn identity(&self) -> &seq_state::ModelIdentity {
        self.identity.get_or_init(|| {
            let f = self.model.gguf();
            seq_state::ModelIdentity {
                arch: self.model.arch().to_string(),
                fingerprint: f.fingerprint(),
                file_size: f.file_size(),
                n_vocab: self.model.n_vocab,
            }
        })
    }

    fn kv_or_unsupported(&self) -> Result<&KvCache, ModelError> {
        self.kv.as_ref().ok_or_else(|| {
            ModelError::Unsupported(
                "this model has no KV cache (an encoder): there is no sequence state to save or restore"
                    .into(),
            )
        })
    }

    /// Sequence `seq`'s state as a slot file ([`seq_state`]'s format): `tokens` (exactly the `seq_len`
    /// tokens the sequence caches, position order) and every layer's cells in the cache's own types.
    /// llama.cpp's `llama_state_seq_get_data` (`src/llama-context.cpp`) in our format.
    ///
    /// Errors: [`ModelError::Unsupported`] for an encoder; [`ModelError::SeqState`] when `seq` is
    /// unknown or `tokens` is not what it caches.
    pub fn seq_state_save(&self, seq: u32, tokens: &[u32]) -> Result<Vec<u8>, ModelError> {
        let kv = self.kv_or_unsupported()?;
        Ok(seq_state::save(kv, self.identity(), seq as usize, tokens)?)
    }

    /// Replaces sequence `seq` with a slot file of [`Context::seq_state_save`] and returns its tokens:
    /// the next token of the sequence goes after them. llama.cpp's `llama_state_seq_set_data`.
    ///
    /// Errors (the sequence unchanged): [`ModelError::Unsupported`] for an encoder;
    /// [`ModelError::SeqState`] for a file of another model or cache layout, a truncated or malformed
    /// one, or more tokens than the context.
    pub fn seq_state_load(&mut self, seq: u32, bytes: &[u8]) -> Result<Vec<u32>, ModelError> {
        self.kv_or_unsupported()?;
        // Computed before the cache is borrowed mutably.
        let id = self.identity().clone();
        let kv = self.kv.as_mut().expect("checked above");
        Ok(seq_state::load(kv, &id, seq as usize, bytes)?)
    }

    /// The largest slot file a sequence of this context can be (bytes; 0 for an encoder): a reader
    /// need never read more.
    pub fn seq_state_max_bytes(&self) -> usize {
        self.kv
            .as_ref()
            .map_or(0, |kv| seq_state::max_bytes(kv, self.identity()))
    }
}

/// Scales `v` to unit Euclidean length (sum of squares in f64); a zero vector stays zero.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> Arc<Model> {
        let Ok(assets) = std::env::var("CYBER_INFERENCE_ASSETS") else {
            panic!("CYBER_INFERENCE_ASSETS is not set (see ../shared/assets/fetch)");
        };
        let path = Path::new(&assets).join("models/SmolLM2-135M-Instruct.Q4_K_M.gguf");
        Model::load(
            &path,
            &ModelParams {
                n_threads: 2,
                ..Default::default()
            },
        )
        .expect("load SmolLM2")
    }

    fn ctx(model: &Arc<Model>) -> Context {
        Context::new(
            model.clone(),
            ContextParams {
                n_ctx: 64,
                n_seq_max: 2,
                n_batch: 64,
                n_threads: 2,
                embeddings: false,
                type_k: KvType::F16,
                type_v: KvType::F16,
            },
        )
        .expect("context")
    }

    #[test]
    fn seq_truncate_keeps_a_prefix_that_continues_like_a_cold_run() {
        let model = smol();
        let a: Vec<u32> = (0..12).map(|i| 1000 + 37 * i).collect();
        let b: Vec<u32> = (0..5).map(|i| 2000 + 11 * i).collect();
        // Cold: a[..7] then b, in one batch.
        let mut cold = ctx(&model);
        let mut t = a[..7].to_vec();
        t.extend(&b);
        cold.decode(&Batch::single(&t, 0, 1)).unwrap();
        let want = cold.logits(0).to_vec();
        // Warm: all of a, truncate to 7, then b.
        let mut warm = ctx(&model);
        warm.decode(&Batch::single(&a, 0, 1)).unwrap();
        assert_eq!(warm.seq_len(1), 12);
        warm.seq_truncate(1, 20);
        assert_eq!(warm.seq_len(1), 12, "a longer length changes nothing");
        warm.seq_truncate(1, 7);
        assert_eq!(warm.seq_len(1), 7);
        warm.seq_truncate(99, 0); // unknown sequence: no effect, no panic
        // The next position is 7: a token at 12 now leaves a gap.
        assert!(warm.decode(&Batch::single(&b, 12, 1)).is_err());
        warm.decode(&Batch::single(&b, 7, 1)).unwrap();
        assert_eq!(warm.seq_len(1), 12);
        assert_eq!(warm.logits(0), &want[..], "bit-identical to the cold run");
        warm.seq_truncate(1, 0);
        assert_eq!(warm.seq_len(1), 0);
    }
}
