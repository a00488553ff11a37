//! The one seam between the worker and the engine: two small traits the scheduler and the HTTP layer use,
//! so that everything else in the worker is written (and unit-tested) without knowing the engine's types.
//!
//! [`Codec`] is the thread-safe, read-only part (tokenizer, chat template, model facts) that HTTP handlers
//! call directly; [`Compute`] is the single-threaded part (the context with its KV cache) owned by the
//! scheduler thread. `engine_backend` implements both over `crate::engine`.

use std::fmt;

use crate::engine::constraint::GrammarCompiler;
pub use crate::engine::model::hparams::Pooling;
use crate::engine::sampling::{DEFAULT_CHAIN, Stage};
pub use crate::engine::tokenizer::FimTokens;

/// Facts about the loaded model the worker reports and plans with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelInfo {
    /// GGUF `general.architecture` (`llama`, `qwen2`, `bert`, ...).
    pub arch: String,
    /// Vocabulary size (tokens).
    pub n_vocab: usize,
    /// Embedding width (floats per embedding vector).
    pub n_embd: usize,
    /// Context length the model was trained with (tokens).
    pub n_ctx_train: usize,
    /// Encoder-only model (BERT): embeddings only, no generation.
    pub is_encoder: bool,
    /// The chat template source from the GGUF, when it has one.
    pub chat_template: Option<String>,
    /// Every end-of-generation token id (EOS, EOT, ...), ascending.
    pub eog_tokens: Vec<u32>,
    /// The BOS token when the vocabulary adds one to a prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: Option<u32>,
    /// The fill-in-the-middle tokens (`/infill`).
    pub fim: FimTokens,
    /// Text of the BOS and EOS tokens (`/props`'s `bos_token`, `eos_token`), empty when none.
    pub bos_eos_text: (String, String),
    /// The model's own pooling (`{arch}.pooling_type`) is rank: a reranker, whose pooled output is
    /// scores, not embeddings.
    pub rank_pooling: bool,
}

/// An engine failure, with a message for the log (never sent to clients as is, except template errors).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The chat template could not render these messages (a client-side problem: 400).
    #[error("chat template: {0}")]
    Template(String),
    /// The model has no chat template.
    #[error("the model has no chat template")]
    NoTemplate,
    /// The forward pass or the embedding failed.
    #[error("engine: {0}")]
    Engine(String),
    /// A slot file was refused (another model or cache layout, truncated, malformed: a 400), with
    /// what was wrong.
    #[error("{0}")]
    SlotFile(String),
    /// The engine cannot do this for this model (501), with why.
    #[error("{0}")]
    Unsupported(String),
}

/// Everything about sampling one choice, in llama.cpp's terms (defaults: llama-server's).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Temperature; ≤ 0 = greedy (argmax).
    pub temperature: f32,
    /// Top-k (≤ 0 = off).
    pub top_k: i32,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// Min-p (0 = off).
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    pub repeat_penalty: f32,
    /// Tokens looked back for the penalties (-1 = the whole context).
    pub repeat_last_n: i32,
    /// Presence penalty.
    pub presence_penalty: f32,
    /// Frequency penalty.
    pub frequency_penalty: f32,
    /// Seed of the draw; `None` = random.
    pub seed: Option<u64>,
    /// (token, bias) pairs added to the logits.
    pub logit_bias: Vec<(u32, f32)>,
    /// The sampler stages and their order (llama-server's `samplers`).
    pub chain: Vec<Stage>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
            chain: DEFAULT_CHAIN.to_vec(),
        }
    }
}

/// A token sampler of one choice (owns its RNG state).
pub trait TokenSampler: Send {
    /// Picks the next token from raw logits `[n_vocab]`; `history` is the sequence so far (prompt and
    /// generated tokens, oldest first) for the penalties.
    fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32;
    /// [`TokenSampler::sample`], also returning the chosen token's probability and the `n` most likely
    /// candidates with their probabilities after the sampler chain (llama-server's
    /// `post_sampling_probs`), best first. The default (samplers without a chain) reports the
    /// probabilities of the raw softmax.
    fn sample_with_probs(
        &mut self,
        logits: &[f32],
        history: &[u32],
        n: usize,
    ) -> (u32, f32, Vec<(u32, f32)>) {
        let id = self.sample(logits, history);
        let (lp, top) = logprobs(logits, id, n);
        (
            id,
            lp.exp(),
            top.into_iter().map(|(t, l)| (t, l.exp())).collect(),
        )
    }
}

/// One forward pass's input, llama_batch style: token `i` at position `pos[i]` of sequence `seq_id[i]`;
/// logits are produced where `logits[i]`, numbered in order of appearance (output 0, 1, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Positions within their sequence (0-based).
    pub pos: Vec<u32>,
    /// Sequence (= slot) ids.
    pub seq_id: Vec<u32>,
    /// Whether to produce logits for the token.
    pub logits: Vec<bool>,
}

impl BatchPlan {
    /// Appends one token.
    pub fn push(&mut self, token: u32, pos: u32, seq: u32, logits: bool) {
        self.tokens.push(token);
        self.pos.push(pos);
        self.seq_id.push(seq);
        self.logits.push(logits);
    }

    /// Number of tokens (the fake backend's checks).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when it holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// The thread-safe, read-only side of the model: tokenizer, chat template, facts.
pub trait Codec: Send + Sync + 'static {
    /// Model facts.
    fn info(&self) -> &ModelInfo;
    /// llama_tokenize(text, add_special, parse_special).
    fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32>;
    /// The bytes of one token (llama_token_to_piece); `special` renders control tokens as text.
    fn piece(&self, id: u32, special: bool) -> Vec<u8>;
    /// ids → text (llama_detokenize).
    fn decode(&self, ids: &[u32], special: bool) -> String;
    /// End-of-generation token (EOS, EOT, ...).
    fn is_eog(&self, id: u32) -> bool;
    /// Renders chat messages (`[{"role","content",...}]`) with the model's template and the generation
    /// prompt appended.
    ///
    /// Errors: [`BackendError::NoTemplate`], [`BackendError::Template`].
    fn render_chat(&self, messages: &[serde_json::Value]) -> Result<String, BackendError>;
    /// A reranker's input for `query` and `doc` (llama-server's `format_prompt_rerank`: the model's
    /// rerank template, else `[BOS] query [EOS] [SEP] doc [EOS]` as the vocabulary's flags say).
    fn rerank_tokens(&self, query: &str, doc: &str) -> Vec<u32>;
    /// [`Codec::render_chat`] with a request's `tools` and template variables
    /// (`chat_template_kwargs`, e.g. `enable_thinking`). The default ignores the options.
    ///
    /// Errors: as [`Codec::render_chat`].
    fn render_chat_with(
        &self,
        messages: &[serde_json::Value],
        opts: &ChatOptions,
    ) -> Result<String, BackendError> {
        let _ = opts;
        self.render_chat(messages)
    }
    /// The compiler of structured-output grammars over this vocabulary; `None` when the model offers
    /// no constrained decoding (then a request asking for it is a 400).
    fn grammar_compiler(&self) -> Option<&GrammarCompiler> {
        None
    }
}

/// Per-request options of a chat rendering.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatOptions {
    /// OpenAI `tools` (an array), given to the template as `tools`.
    pub tools: Option<serde_json::Value>,
    /// Extra template variables (llama-server's `chat_template_kwargs`).
    pub extra_context: serde_json::Map<String, serde_json::Value>,
}

/// The single-threaded side: a context holding one KV sequence per slot. Owned by the scheduler thread.
pub trait Compute: Send + 'static {
    /// Runs one forward pass over a batch that may mix sequences.
    ///
    /// Errors: [`BackendError::Engine`] (position past the context, bad token, ...).
    fn decode(&mut self, batch: &BatchPlan) -> Result<(), BackendError>;
    /// Logits `[n_vocab]` of the `i`-th output of the last [`Compute::decode`].
    fn logits(&self, i: usize) -> &[f32];
    /// The embedding rows of `tokens`, not normalised (does not touch the slots' sequences): one row
    /// `[n_embd]` per token for `Some(Pooling::None)`, else one row pooled by `pooling` (`None` = the
    /// model's pooling, mean when it has none).
    ///
    /// Errors: [`BackendError::Engine`].
    fn embed(
        &mut self,
        tokens: &[u32],
        pooling: Option<Pooling>,
    ) -> Result<Vec<Vec<f32>>, BackendError>;
    /// Drops every KV cell of sequence `seq`.
    fn seq_clear(&mut self, seq: u32);
    /// Keeps only the first `n` positions of sequence `seq`; returns false when the engine cannot (the
    /// caller then clears the sequence and recomputes).
    fn seq_keep(&mut self, seq: u32, n: usize) -> bool {
        let _ = (seq, n);
        false
    }
    /// Whether [`Compute::seq_shift`] works (llama.cpp's `llama_memory_can_shift`); false by default.
    fn can_shift(&self) -> bool {
        false
    }
    /// llama-server's context shift of `seq`: drops positions `n_keep .. n_keep + n_discard` and
    /// moves the later ones back by `n_discard` (their keys re-roped), so the next token goes at
    /// `len - n_discard`. Returns false, changing nothing, when the engine cannot (the caller then
    /// stops the generation at the context's end).
    fn seq_shift(&mut self, seq: u32, n_keep: usize, n_discard: usize) -> bool {
        let _ = (seq, n_keep, n_discard);
        false
    }
    /// A fresh sampler for one choice.
    fn sampler(&self, params: &SamplingParams) -> Box<dyn TokenSampler>;
    /// Sequence `seq`'s state as a slot file (llama-server's `POST /slots/{id}?action=save`): `tokens`
    /// are exactly the tokens it caches, position order. The default cannot.
    ///
    /// Errors: [`BackendError::Unsupported`] (no KV cache), [`BackendError::Engine`].
    fn seq_save(&self, seq: u32, tokens: &[u32]) -> Result<Vec<u8>, BackendError> {
        let _ = (seq, tokens);
        Err(BackendError::Unsupported(
            "this engine cannot save slots".into(),
        ))
    }
    /// Replaces sequence `seq` with a slot file of [`Compute::seq_save`]; returns its tokens. On error
    /// the sequence is unchanged. The default cannot.
    ///
    /// Errors: [`BackendError::SlotFile`] (the file is refused, with why),
    /// [`BackendError::Unsupported`].
    fn seq_restore(&mut self, seq: u32, bytes: &[u8]) -> Result<Vec<u32>, BackendError> {
        let _ = (seq, bytes);
        Err(BackendError::Unsupported(
            "this engine cannot restore slots".into(),
        ))
    }
    /// The largest slot file [`Compute::seq_save`] can write for one sequence (bytes), the bound a
    /// restore reads up to; 0 when it cannot save.
    fn seq_state_max_bytes(&self) -> usize {
        0
    }
}

impl fmt::Debug for dyn Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("arch", &self.info().arch)
            .finish()
    }
}

/// Natural log-probability of `chosen` and the `n` most likely tokens (best first, ties by lower id) under
/// the log-softmax of raw `logits` `[n_vocab]` over the whole vocabulary — the quantity llama-server reports
/// as `n_probs` (tools/server/server-context.cpp, commit 0c1e570). Computed in f64.
pub fn logprobs(logits: &[f32], chosen: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| ((l as f64) - max).exp()).sum();
    let log_z = max + sum.ln();
    let lp = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| ((l as f64) - log_z) as f32)
    };
    let mut top = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = n.min(idx.len());
        let cmp = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        top = idx.into_iter().map(|i| (i, lp(i))).collect();
    }
    (lp(chosen), top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 = logits.iter().map(|&l| ((l as f64) - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let (_, all) = logprobs(&logits, 0, 10);
        assert_eq!(all.len(), 4);
    }
}
