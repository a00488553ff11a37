//! The worker's only module that imports the engine: [`Codec`] and [`Compute`] over `crate::engine`'s
//! `Model`, `Context`, `Tokenizer`, `ChatTemplate` and `Sampler`.
//!
//! Sequence ids: `Context::embed` runs on sequence 0 and clears it, so when a generation model also serves
//! embeddings (`--embedding`) the slots use sequences `1..=n_slots` and sequence 0 is left to embeddings.

use std::sync::Arc;

use super::backend::{
    BackendError, BatchPlan, ChatOptions, Codec, Compute, ModelInfo, SamplingParams, TokenSampler,
};
use super::{LoadParams, Loaded, plan_context};
use crate::engine::chat::{ChatTemplate, RenderOptions};
use crate::engine::constraint::{GrammarCompiler, TokenizeFn};
use crate::engine::model::{Batch, Context, ContextParams, Model, ModelError, ModelParams};
use crate::engine::sampling::{Sampler, SamplerParams};
use crate::engine::tokenizer::Tokenizer;

struct EngineCodec {
    /// Owns the tokenizer and the chat template.
    model: Arc<Model>,
    /// The template of `--chat-template-file` / `--chat-template`, replacing the model's.
    template: Option<ChatTemplate>,
    info: ModelInfo,
    /// Structured-output grammars over the vocabulary (`None` for encoders, or when llguidance
    /// refused the vocabulary: logged at load).
    grammar: Option<GrammarCompiler>,
}

impl EngineCodec {
    fn tokenizer(&self) -> &Tokenizer {
        self.model.tokenizer()
    }
    fn template(&self) -> Option<&ChatTemplate> {
        self.template
            .as_ref()
            .or_else(|| self.model.chat_template())
    }
}

impl Codec for EngineCodec {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        self.tokenizer().encode(text, add_special, parse_special)
    }
    fn piece(&self, id: u32, special: bool) -> Vec<u8> {
        self.tokenizer().token_to_piece(id, special)
    }
    fn decode(&self, ids: &[u32], special: bool) -> String {
        self.tokenizer().decode(ids, special)
    }
    fn is_eog(&self, id: u32) -> bool {
        self.tokenizer().is_eog(id)
    }
    fn rerank_tokens(&self, query: &str, doc: &str) -> Vec<u32> {
        self.model.rerank_tokens(query, doc)
    }
    fn render_chat(&self, messages: &[serde_json::Value]) -> Result<String, BackendError> {
        self.render_chat_with(messages, &ChatOptions::default())
    }
    fn render_chat_with(
        &self,
        messages: &[serde_json::Value],
        o: &ChatOptions,
    ) -> Result<String, BackendError> {
        let t = self.template().ok_or(BackendError::NoTemplate)?;
        let opts = RenderOptions {
            add_generation_prompt: true,
            tools: o.tools.clone(),
            extra_context: o.extra_context.clone(),
            ..RenderOptions::default()
        };
        t.render(messages, &opts)
            .map_err(|e| BackendError::Template(e.to_string()))
    }
    fn grammar_compiler(&self) -> Option<&GrammarCompiler> {
        self.grammar.as_ref()
    }
}

/// The grammar compiler over `model`'s vocabulary, tokenizing forced text as llama.cpp's llguidance
/// glue does (`llama_tokenize(add_special = false, parse_special = true)`).
fn grammar_compiler(model: &Arc<Model>) -> Option<GrammarCompiler> {
    let t = std::time::Instant::now();
    let m = model.clone();
    let tokenize: TokenizeFn = Arc::new(move |s: &str| m.tokenizer().encode(s, false, true));
    match GrammarCompiler::for_tokenizer(model.tokenizer(), tokenize) {
        Ok(g) => {
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "grammar token environment built"
            );
            Some(g)
        }
        Err(e) => {
            tracing::warn!("constrained decoding is off for this model: {e}");
            None
        }
    }
}

struct EngineCompute {
    ctx: Context,
    /// Added to slot ids to get sequence ids (1 when sequence 0 is kept for embeddings).
    seq_offset: u32,
    batch: Batch,
}

struct EngineSampler(Sampler);

impl TokenSampler for EngineSampler {
    fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.0.sample(logits, history)
    }
    fn sample_with_probs(
        &mut self,
        logits: &[f32],
        history: &[u32],
        n: usize,
    ) -> (u32, f32, Vec<(u32, f32)>) {
        self.0.sample_with_probs(logits, history, n)
    }
}

impl Compute for EngineCompute {
    fn decode(&mut self, plan: &BatchPlan) -> Result<(), BackendError> {
        self.batch.tokens.clear();
        self.batch.tokens.extend_from_slice(&plan.tokens);
        self.batch.pos.clear();
        self.batch.pos.extend_from_slice(&plan.pos);
        self.batch.seq_id.clear();
        self.batch
            .seq_id
            .extend(plan.seq_id.iter().map(|s| s + self.seq_offset));
        self.batch.logits.clear();
        self.batch.logits.extend_from_slice(&plan.logits);
        self.ctx
            .decode(&self.batch)
            .map_err(|e| BackendError::Engine(e.to_string()))
    }
    fn logits(&self, i: usize) -> &[f32] {
        self.ctx.logits(i)
    }
    fn embed(
        &mut self,
        tokens: &[u32],
        pooling: Option<super::backend::Pooling>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        self.ctx
            .embed_rows(tokens, pooling)
            .map_err(|e| BackendError::Engine(e.to_string()))
    }
    fn seq_clear(&mut self, seq: u32) {
        self.ctx.seq_clear(seq + self.seq_offset);
    }
    fn seq_keep(&mut self, seq: u32, n: usize) -> bool {
        let s = seq + self.seq_offset;
        self.ctx.seq_truncate(s, n);
        self.ctx.seq_len(s) == n
    }
    fn can_shift(&self) -> bool {
        self.ctx.can_shift()
    }
    fn seq_shift(&mut self, seq: u32, n_keep: usize, n_discard: usize) -> bool {
        self.ctx.seq_shift(seq + self.seq_offset, n_keep, n_discard)
    }
    fn seq_save(&self, seq: u32, tokens: &[u32]) -> Result<Vec<u8>, BackendError> {
        self.ctx
            .seq_state_save(seq + self.seq_offset, tokens)
            .map_err(state_error)
    }
    fn seq_restore(&mut self, seq: u32, bytes: &[u8]) -> Result<Vec<u32>, BackendError> {
        self.ctx
            .seq_state_load(seq + self.seq_offset, bytes)
            .map_err(state_error)
    }
    fn seq_state_max_bytes(&self) -> usize {
        self.ctx.seq_state_max_bytes()
    }
    fn sampler(&self, p: &SamplingParams) -> Box<dyn TokenSampler> {
        Box::new(EngineSampler(Sampler::new(SamplerParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repeat_penalty: p.repeat_penalty,
            repeat_last_n: p.repeat_last_n,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
            logit_bias: p.logit_bias.clone(),
            chain: p.chain.clone(),
            ..SamplerParams::default()
        })))
    }
}

/// A save or restore failure: a refused file is the client's ([`BackendError::SlotFile`]), a model
/// without a KV cache cannot ([`BackendError::Unsupported`]), anything else is ours.
fn state_error(e: ModelError) -> BackendError {
    match e {
        ModelError::SeqState(e) => BackendError::SlotFile(e.to_string()),
        ModelError::Unsupported(m) => BackendError::Unsupported(m),
        other => BackendError::Engine(other.to_string()),
    }
}

/// Loads the model, its tokenizer and chat template, and a context of `n_slots` sequences.
///
/// Errors: the engine's message (GGUF, architecture, tokenizer, context sizes), for stderr.
pub(super) fn load(p: &LoadParams) -> Result<Loaded, String> {
    let model: Arc<Model> = Model::load_with(
        &p.path,
        &ModelParams {
            n_threads: p.n_threads,
            gpu: p.gpu.clone(),
        },
        p.load_mode,
    )
    .map_err(|e| e.to_string())?;
    let template = match &p.chat_template {
        Some(src) if !model.is_encoder() => Some(
            ChatTemplate::from_gguf_with(model.gguf(), Some(src))
                .map_err(|e| format!("--chat-template: {e}"))?,
        ),
        _ => None,
    };
    if template.is_none() && model.chat_template().is_none() && !model.is_encoder() {
        tracing::warn!(
            "the model has no usable chat template; /v1/chat/completions will answer 400"
        );
    }
    let is_encoder = model.is_encoder();
    let (n_ctx, n_ctx_seq) = plan_context(p.ctx_size, model.n_ctx_train(), p.n_slots)?;
    let seq_offset = u32::from(p.embedding && !is_encoder);
    let ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx: n_ctx_seq,
            n_seq_max: p.n_slots + seq_offset as usize,
            n_batch: p.n_batch,
            n_threads: p.n_threads,
            // `Context::embed` turns embeddings on for its own pass; generation needs none.
            embeddings: is_encoder,
            type_k: p.cache_types.0,
            type_v: p.cache_types.1,
        },
    )
    .map_err(|e| e.to_string())?;
    let eog_tokens = (0..model.n_vocab() as u32)
        .filter(|&id| model.tokenizer().is_eog(id))
        .collect();
    let info = ModelInfo {
        arch: model.arch().to_string(),
        n_vocab: model.n_vocab(),
        n_embd: model.n_embd(),
        n_ctx_train: model.n_ctx_train(),
        is_encoder,
        chat_template: match &p.chat_template {
            Some(src) => Some(src.clone()),
            None => model
                .gguf()
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_string),
        },
        eog_tokens,
        add_bos: model
            .tokenizer()
            .add_bos()
            .then(|| model.tokenizer().bos())
            .flatten(),
        fim: model.tokenizer().fim(),
        bos_eos_text: {
            let t = model.tokenizer();
            let text = |id: Option<u32>| {
                id.map(|i| String::from_utf8_lossy(&t.token_to_piece(i, true)).into_owned())
                    .unwrap_or_default()
            };
            (text(t.bos()), text(t.eos()))
        },
        rank_pooling: model.pooling() == crate::engine::model::Pooling::Rank,
    };
    Ok(Loaded {
        codec: Arc::new(EngineCodec {
            grammar: (!is_encoder).then(|| grammar_compiler(&model)).flatten(),
            model: model.clone(),
            template,
            info,
        }),
        compute: Box::new(EngineCompute {
            ctx,
            seq_offset,
            batch: Batch {
                tokens: Vec::new(),
                pos: Vec::new(),
                seq_id: Vec::new(),
                logits: Vec::new(),
            },
        }),
        n_ctx,
        n_ctx_seq,
        backend: model.backend().clone(),
    })
}
