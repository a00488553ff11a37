//! The worker's HTTP API (axum): OpenAI endpoints, llama-server's `/tokenize`, `/detokenize`,
//! `/apply-template`, `/props`, `/health`, `/metrics`. Handlers validate and tokenize, then talk to the
//! scheduler thread only through its channel; each generation carries its own event channel and a
//! cancellation token that fires when the response (or its SSE stream) is dropped — i.e. when the client
//! goes away.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::backend::{Codec, SamplingParams};
use super::error::{ApiError, parse_json};
use super::metrics::{Endpoint, Metrics};
use super::scheduler::{Command, GenEvent, GenerateRequest, TokenOut};
use super::structured;
use crate::engine::constraint::{Constraint, GrammarSpec};
use crate::openai::*;

/// Server-wide generation defaults (the sampling flags, `-n`): what a request that leaves a field out
/// gets.
#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    /// Sampler settings.
    pub sampling: SamplingParams,
    /// Most tokens to generate (-1 = until a stop or the end of the slot's context).
    pub n_predict: i64,
    /// Prompt tokens a context shift keeps (`--keep`; -1 = the whole prompt).
    pub n_keep: i64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            sampling: SamplingParams::default(),
            n_predict: -1,
            n_keep: 0,
        }
    }
}

/// Fixed facts of this worker, known before the model is loaded.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// The model id clients see (the first of `aliases`).
    pub alias: String,
    /// Every name of `--alias`.
    pub aliases: Vec<String>,
    /// Generation defaults.
    pub defaults: Defaults,
    /// `GET /slots` is on (`--no-slots` turns it off).
    pub slots_endpoint: bool,
    /// `--slot-save-path`: the directory of `POST /slots/{id}?action=save|restore` files (None: the
    /// actions answer 501).
    pub slot_save_path: Option<std::path::PathBuf>,
    /// `--pooling` (None = the model's).
    pub pooling: Option<super::backend::Pooling>,
    /// Path of the GGUF file.
    pub model_path: String,
    /// Nonce from `--instance`, echoed by `/props`.
    pub instance: Option<String>,
    /// Required Bearer key, when set.
    pub api_key: Option<String>,
    /// Slots.
    pub n_slots: usize,
    /// `--max-queue`: requests that may wait for a slot.
    pub max_queue: usize,
    /// Tokens per forward pass.
    pub n_batch: usize,
    /// `--embedding` was given.
    pub embedding: bool,
    /// `--reasoning-format`: the default of a chat request's `reasoning_format`.
    pub reasoning_format: crate::engine::chat::reasoning::ReasoningFormat,
    /// `-ctk`, `-ctv`: the KV cache's element types.
    pub cache_types: (crate::engine::model::KvType, crate::engine::model::KvType),
    /// Unix time (s) of the start.
    pub created: u64,
}

impl ServerInfo {
    /// `/rerank` is served: embeddings on with pooling rank (`--reranking`, or `--embedding
    /// --pooling rank`), as llama-server's `post_rerank` checks.
    pub fn reranking(&self) -> bool {
        self.embedding && self.pooling == Some(super::backend::Pooling::Rank)
    }
}

/// What exists once the model is loaded.
pub struct Ready {
    /// Tokenizer, template, facts.
    pub codec: Arc<dyn Codec>,
    /// Commands to the scheduler thread.
    pub tx: mpsc::Sender<Command>,
    /// Total context (tokens), `n_slots × n_ctx_seq`.
    pub n_ctx: usize,
    /// Context of one slot (tokens).
    pub n_ctx_seq: usize,
    /// The largest slot file a slot of this model and context can have (bytes): a restore reads no
    /// more (0: the engine cannot save slots).
    pub slot_file_max_bytes: usize,
    /// What runs the model (`/props`'s `backend`, `/health`'s `backend`).
    pub backend: crate::engine::gpu::BackendInfo,
}

/// Shared state of every handler.
pub struct AppState {
    /// Fixed facts.
    pub info: ServerInfo,
    /// Metrics shared with the scheduler.
    pub metrics: Arc<Metrics>,
    /// Set once the model is loaded.
    pub ready: OnceLock<Ready>,
    /// One permit per generation or embedding request running or waiting for a slot (`-np` +
    /// `--max-queue`): none left = 503.
    pub admission: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub(super) fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or(ApiError::Loading)
    }

    /// The queue length this worker was started with (`--max-queue`).
    fn max_queue(&self) -> usize {
        self.info.max_queue
    }
}

/// Build identifier reported as `system_fingerprint`.
pub fn fingerprint() -> String {
    format!("cyber-inference-{}", env!("CARGO_PKG_VERSION"))
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bodies of at least this many bytes have their chat template rendered and their text tokenized on
/// tokio's blocking pool (see [`prepare`]); smaller ones, the common case, inline (a thread hand-off
/// would cost more than the work).
pub(super) const BLOCKING_BODY_BYTES: usize = 64 * 1024;
/// Most [`prepare`] jobs on the blocking pool at once; more wait for a turn without holding a thread.
pub(super) const MAX_BLOCKING_PREPARE: usize = 4;
static BLOCKING_PREPARE: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_BLOCKING_PREPARE);

/// Runs `f`, the CPU work of preparing a request whose cost grows with its body (chat template
/// rendering, tokenization of prompts and embedding inputs), for a body of `body_len` bytes: inline
/// under [`BLOCKING_BODY_BYTES`], else on tokio's blocking pool, at most [`MAX_BLOCKING_PREPARE`] at
/// once, so that a huge prompt never stalls the async threads that answer everyone else (`/health`,
/// other requests' streams).
///
/// Errors: [`ApiError::Internal`] when the blocking task panicked or could not run.
pub(super) async fn prepare<T: Send + 'static>(
    body_len: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    if body_len < BLOCKING_BODY_BYTES {
        return Ok(f());
    }
    let _turn = BLOCKING_PREPARE
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(format!("request preparation: {e}")))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("request preparation task: {e}")))
}

/// The worker's router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let queued = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/completion", post(super::native::completion))
        .route("/completions", post(super::native::completion))
        .route("/infill", post(super::native::infill))
        .route("/v1/embeddings", post(embeddings))
        .route("/embedding", post(super::native::embedding))
        .route("/embeddings", post(super::native::embedding))
        .route("/rerank", post(super::rerank::rerank))
        .route("/reranking", post(super::rerank::rerank))
        .route("/v1/rerank", post(super::rerank::rerank))
        .route("/v1/reranking", post(super::rerank::rerank))
        .route("/slots/{id_slot}", post(super::slot_files::slot_action))
        .route_layer(middleware::from_fn_with_state(state.clone(), bounded_queue));
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .merge(queued)
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/apply-template", post(apply_template))
        .route("/props", get(props))
        .route("/slots", get(super::native::slots))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(crate::http_server::MAX_BODY_BYTES))
        .with_state(state)
}

/// The bounded queue: a generation or embedding request takes one admission permit for as long as its
/// response lives (a stream holds it to its end), or is refused with 503 + `Retry-After` when the slots
/// and the queue are full.
async fn bounded_queue(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Ok(permit) = st.admission.clone().try_acquire_owned() else {
        let n = st.info.n_slots + st.max_queue();
        return ApiError::Busy(n).into_response();
    };
    let (parts, body) = next.run(req).await.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &permit;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// Bearer check and failure counting (both skip `/health`, whose 503 while loading is not a failure).
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.info.api_key
        && req.uri().path() != "/health"
    {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), key.as_bytes()));
        if !ok {
            st.metrics.requests_failed.fetch_add(1, Relaxed);
            return ApiError::Unauthorized.into_response();
        }
    }
    let is_health = req.uri().path() == "/health";
    let resp = next.run(req).await;
    if !is_health && (resp.status().is_client_error() || resp.status().is_server_error()) {
        st.metrics.requests_failed.fetch_add(1, Relaxed);
    }
    resp
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if let Some(r) = st.ready.get() {
        (
            StatusCode::OK,
            Json(json!({"status": "ok", "backend": r.backend.name})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelObject {
            id: st.info.alias.clone(),
            object: "model".into(),
            created: st.info.created,
            owned_by: "cyber-inference".into(),
        }],
    })
}

async fn props(State(st): State<Arc<AppState>>) -> Response {
    let ready = st.ready.get();
    let mut settings = super::native::settings_json(
        &st.info.defaults.sampling,
        st.info.defaults.n_predict,
        None,
        false,
        false,
        &[],
    );
    settings["n_keep"] = json!(st.info.defaults.n_keep);
    Json(json!({
        "default_generation_settings": {
            "params": settings,
            "n_ctx": ready.map(|r| r.n_ctx_seq),
        },
        "model_alias": st.info.alias,
        "model_path": st.info.model_path,
        "alias": st.info.alias,
        "aliases": st.info.aliases,
        "bos_token": ready.map(|r| r.codec.info().bos_eos_text.0.clone()),
        "eos_token": ready.map(|r| r.codec.info().bos_eos_text.1.clone()),
        "endpoint_slots": st.info.slots_endpoint,
        "endpoint_props": true,
        "endpoint_metrics": true,
        "modalities": {"vision": false, "video": false, "audio": false},
        "infill": ready.map(|r| super::native::fim_missing(r.codec.info()).is_empty()),
        "instance": st.info.instance,
        "n_slots": st.info.n_slots,
        "total_slots": st.info.n_slots,
        "n_batch": st.info.n_batch,
        "cache_type_k": st.info.cache_types.0.name(),
        "cache_type_v": st.info.cache_types.1.name(),
        "n_ctx": ready.map(|r| r.n_ctx),
        "n_ctx_slot": ready.map(|r| r.n_ctx_seq),
        "architecture": ready.map(|r| r.codec.info().arch.clone()),
        "n_vocab": ready.map(|r| r.codec.info().n_vocab),
        "n_embd": ready.map(|r| r.codec.info().n_embd),
        "n_ctx_train": ready.map(|r| r.codec.info().n_ctx_train),
        "eog_token_ids": ready.map(|r| r.codec.info().eog_tokens.clone()),
        "chat_template": ready.and_then(|r| r.codec.info().chat_template.clone()),
        "embedding": st.info.embedding || ready.is_some_and(|r| r.codec.info().is_encoder),
        "is_loading": ready.is_none(),
        "backend": ready.map(|r| &r.backend),
        "build_info": fingerprint(),
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

/// The piece as llama-server's `with_pieces` writes it: a string, or byte values when not valid UTF-8.
pub(super) fn piece_json(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(s) => Value::String(s),
        Err(e) => json!(e.into_bytes()),
    }
}

async fn tokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Tokenize);
    let ready = st.ready()?;
    let req: TokenizeRequest = parse_json(&body)?;
    let codec = ready.codec.clone();
    let content = req.content;
    let (add_special, parse_special) = (req.add_special, req.parse_special);
    let ids = prepare(body.len(), move || {
        codec.encode(&content, add_special, parse_special)
    })
    .await?;
    let tokens: Vec<Value> = if req.with_pieces {
        ids.iter()
            .map(|&id| json!({"id": id, "piece": piece_json(ready.codec.piece(id, true))}))
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

pub(super) fn check_ids(ids: &[u32], n_vocab: usize, param: &'static str) -> Result<(), ApiError> {
    if let Some((i, bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, t)| **t as usize >= n_vocab)
    {
        return Err(ApiError::bad(
            format!("{param}: token id {bad} at index {i} is out of range (n_vocab = {n_vocab})"),
            Some(param),
        ));
    }
    Ok(())
}

async fn detokenize(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Detokenize);
    let ready = st.ready()?;
    let req: DetokenizeRequest = parse_json(&body)?;
    check_ids(&req.tokens, ready.codec.info().n_vocab, "tokens")?;
    let content = ready.codec.decode(&req.tokens, true);
    Ok(Json(json!({ "content": content })).into_response())
}

/// `POST /apply-template`: the prompt a chat request renders to (llama-server's route). The body is
/// `{"messages": [...]}` or a whole chat request: its `tools`, `tool_choice` and
/// `chat_template_kwargs` are rendered exactly as `/v1/chat/completions` renders them, so the prompt's
/// tokens are the ones a chat request would evaluate.
async fn apply_template(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let ready = st.ready()?;
    let req: ChatCompletionRequest = parse_json(&body)?;
    let (codec, format) = (ready.codec.clone(), st.info.reasoning_format);
    let plan = prepare(body.len(), move || {
        super::chat::plan(codec.as_ref(), &req, format)
    })
    .await??;
    Ok(Json(json!({ "prompt": plan.prompt })).into_response())
}

/// Generation settings common to chat and text completions, validated.
#[derive(Clone, Debug)]
pub(super) struct GenSpec {
    pub(super) sampling: SamplingParams,
    pub(super) stops: Vec<String>,
    /// Most tokens to generate; `None` = until a stop or the end of the slot's context.
    pub(super) max_tokens: Option<usize>,
    /// llama-server's `id_slot`, `cache_prompt`, `post_sampling_probs` (native requests).
    pub(super) id_slot: Option<usize>,
    pub(super) cache_prompt: bool,
    pub(super) post_sampling_probs: bool,
    /// The settings as `GET /slots` shows them.
    pub(super) settings: Option<Arc<Value>>,
    /// Context shift: prompt tokens kept (-1 = all) and tokens dropped (0 = half of the rest).
    pub(super) n_keep: i64,
    pub(super) n_discard: usize,
    pub(super) n: usize,
    pub(super) n_probs: Option<usize>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// The compiled structured-output constraint (cloned into every choice), from
    /// [`super::structured::constraint_of`].
    pub(super) constraint: Option<Constraint>,
}

fn in_range(v: Option<f32>, lo: f32, hi: f32, name: &'static str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(x.is_finite() && (lo..=hi).contains(&x)) => Err(ApiError::bad(
            format!("'{name}' must be between {lo} and {hi}, got {x}"),
            Some(name),
        )),
        _ => Ok(()),
    }
}

/// `logit_bias` in llama-server's forms (tools/server/server-schema.cpp): OpenAI's object
/// `{"TOKEN_ID": bias}` (a key that is not an integer is text: every token of its tokenization, without
/// BOS or special-token parsing, gets the bias), or an array of `[TOKEN_ID, bias]` / `["text", bias]`
/// pairs. A bias is a number or `false`, which bans the token (−∞). Returns (token, bias) pairs in
/// order.
///
/// Errors (400, `param: logit_bias`, naming the entry): a value that is neither object nor array, an
/// entry that is not a pair, a bias that is not a finite number or `false`, a token id that is not an
/// integer in `0..n_vocab`, or text that tokenizes to nothing. (llama-server skips such entries
/// silently; a typo here is better reported.)
pub(super) fn parse_logit_bias(v: &Value, codec: &dyn Codec) -> Result<Vec<(u32, f32)>, ApiError> {
    let n_vocab = codec.info().n_vocab;
    let bad = |msg: String| ApiError::bad(format!("logit_bias: {msg}"), Some("logit_bias"));
    let bias_of = |b: &Value, at: &str| -> Result<f32, ApiError> {
        match b {
            Value::Bool(false) => Ok(f32::NEG_INFINITY),
            Value::Number(n) => n
                .as_f64()
                .map(|x| x as f32)
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("{at}: bias {n} is not a finite number"))),
            other => Err(bad(format!(
                "{at}: bias must be a number or false, got {other}"
            ))),
        }
    };
    let id_of = |n: i128, at: &str| -> Result<u32, ApiError> {
        u32::try_from(n)
            .ok()
            .filter(|&id| (id as usize) < n_vocab)
            .ok_or_else(|| {
                bad(format!(
                    "{at}: token id {n} is out of range (n_vocab = {n_vocab})"
                ))
            })
    };
    let text_ids = |text: &str, at: &str| -> Result<Vec<u32>, ApiError> {
        let ids = codec.encode(text, false, false);
        if ids.is_empty() {
            return Err(bad(format!("{at}: the text {text:?} has no tokens")));
        }
        Ok(ids)
    };
    let mut out = Vec::new();
    match v {
        Value::Object(map) => {
            for (k, b) in map {
                let at = format!("key {k:?}");
                let bias = bias_of(b, &at)?;
                match k.parse::<i128>() {
                    Ok(n) => out.push((id_of(n, &at)?, bias)),
                    Err(_) => out.extend(text_ids(k, &at)?.into_iter().map(|t| (t, bias))),
                }
            }
        }
        Value::Array(entries) => {
            for (i, e) in entries.iter().enumerate() {
                let at = format!("entry {i}");
                let Some([tok, b]) = e.as_array().map(Vec::as_slice) else {
                    return Err(bad(format!("{at} must be a [token, bias] pair, got {e}")));
                };
                let bias = bias_of(b, &at)?;
                match tok {
                    Value::Number(n) => {
                        let id = n
                            .as_i64()
                            .map(i128::from)
                            .or_else(|| n.as_u64().map(i128::from))
                            .ok_or_else(|| bad(format!("{at}: token {n} is not an integer")))?;
                        out.push((id_of(id, &at)?, bias));
                    }
                    Value::String(s) => {
                        out.extend(text_ids(s, &at)?.into_iter().map(|t| (t, bias)));
                    }
                    other => {
                        return Err(bad(format!(
                            "{at}: token must be an id or a string, got {other}"
                        )));
                    }
                }
            }
        }
        other => {
            return Err(bad(format!(
                "must be an object or an array of [token, bias] pairs, got {other}"
            )));
        }
    }
    Ok(out)
}

/// Validates the sampling fields of a request over the server's `defaults` (what it leaves out).
pub(super) fn gen_spec(
    f: &SamplingFields,
    max_tokens: Option<u32>,
    n_probs: Option<usize>,
    codec: &dyn Codec,
    defaults: &Defaults,
) -> Result<GenSpec, ApiError> {
    in_range(f.temperature, 0.0, 100.0, "temperature")?;
    in_range(f.top_p, 0.0, 1.0, "top_p")?;
    in_range(f.min_p, 0.0, 1.0, "min_p")?;
    in_range(f.presence_penalty, -2.0, 2.0, "presence_penalty")?;
    in_range(f.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
    in_range(f.repeat_penalty, 0.0, 100.0, "repeat_penalty")?;
    let d = &defaults.sampling;
    let logit_bias = match &f.logit_bias {
        Some(v) => parse_logit_bias(v, codec)?,
        None => Vec::new(),
    };
    let n_keep = f.n_keep.unwrap_or(defaults.n_keep);
    if !(-1..=i64::from(i32::MAX)).contains(&n_keep) {
        return Err(ApiError::bad(
            format!("'n_keep' must be -1 or more, got {n_keep}"),
            Some("n_keep"),
        ));
    }
    let n_discard = match f.n_discard {
        None => 0,
        Some(d) if (0..=i64::from(i32::MAX)).contains(&d) => d as usize,
        Some(d) => {
            return Err(ApiError::bad(
                format!("'n_discard' must be 0 or more, got {d}"),
                Some("n_discard"),
            ));
        }
    };
    let n = f.n.unwrap_or(1);
    if !(1..=64).contains(&n) {
        return Err(ApiError::bad(
            format!("'n' must be between 1 and 64, got {n}"),
            Some("n"),
        ));
    }
    if max_tokens == Some(0) {
        return Err(ApiError::bad(
            "'max_tokens' must be at least 1",
            Some("max_tokens"),
        ));
    }
    if let Some(k) = n_probs
        && k > 20
    {
        return Err(ApiError::bad(
            format!("at most 20 log-probabilities per token, got {k}"),
            Some("top_logprobs"),
        ));
    }
    Ok(GenSpec {
        sampling: SamplingParams {
            temperature: f.temperature.unwrap_or(d.temperature),
            top_k: f.top_k.unwrap_or(d.top_k),
            top_p: f.top_p.unwrap_or(d.top_p),
            min_p: f.min_p.unwrap_or(d.min_p),
            repeat_penalty: f.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: f.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
            // A negative seed (llama.cpp's -1) means random.
            seed: match f.seed {
                Some(s) => u64::try_from(s).ok(),
                None => d.seed,
            },
            logit_bias,
            chain: d.chain.clone(),
        },
        stops: f.stop.clone().map(StopSpec::into_vec).unwrap_or_default(),
        max_tokens: match max_tokens {
            Some(m) => Some(m as usize),
            None => usize::try_from(defaults.n_predict).ok(),
        },
        id_slot: None,
        cache_prompt: true,
        post_sampling_probs: false,
        settings: None,
        n_keep,
        n_discard,
        n: n as usize,
        n_probs,
        stream: f.stream.unwrap_or(false),
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        constraint: None,
    })
}

pub(super) fn check_prompt_fits(
    n_prompt: usize,
    ready: &Ready,
    n_slots: usize,
    param: &'static str,
) -> Result<(), ApiError> {
    if n_prompt == 0 {
        return Err(ApiError::bad("the prompt is empty (0 tokens)", Some(param)));
    }
    if n_prompt >= ready.n_ctx_seq {
        return Err(ApiError::ContextExceeded {
            message: format!(
                "the prompt has {n_prompt} tokens but a slot's context is n_ctx = {} tokens \
                 (-c {} over {n_slots} slots), and at least one token must be generated; \
                 shorten the prompt or restart the worker with a larger -c",
                ready.n_ctx_seq, ready.n_ctx
            ),
            param,
            n_prompt_tokens: n_prompt,
            n_ctx: ready.n_ctx_seq,
        });
    }
    Ok(())
}

/// One submitted choice: its events and the guard that cancels it when dropped.
pub(super) struct Submitted {
    pub(super) rx: UnboundedReceiver<GenEvent>,
    pub(super) guard: DropGuard,
}

pub(super) fn submit(
    ready: &Ready,
    prompt: Vec<u32>,
    spec: &GenSpec,
    choice: usize,
) -> Result<Submitted, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let mut sampling = spec.sampling.clone();
    // Different choices of one request must differ: offset the seed per choice.
    sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice as u64));
    let max_tokens = spec.max_tokens.unwrap_or(ready.n_ctx_seq);
    let mut req = GenerateRequest::new(prompt, max_tokens, sampling, tx, cancel.clone());
    req.stops = spec.stops.clone();
    req.n_probs = spec.n_probs;
    req.constraint = spec.constraint.clone();
    req.id_slot = spec.id_slot;
    req.cache_prompt = spec.cache_prompt;
    req.post_sampling_probs = spec.post_sampling_probs;
    req.settings = spec.settings.clone();
    req.n_keep = spec.n_keep;
    req.n_discard = spec.n_discard;
    ready
        .tx
        .send(Command::Generate(Box::new(req)))
        .map_err(|_| ApiError::ShuttingDown)?;
    Ok(Submitted {
        rx,
        guard: cancel.drop_guard(),
    })
}

/// A finished choice.
pub(super) struct Collected {
    pub(super) text: String,
    pub(super) tokens: Vec<TokenOut>,
    pub(super) finish: FinishReason,
    pub(super) n_prompt: usize,
    pub(super) n_cached: usize,
    pub(super) n_generated: usize,
    pub(super) timings: Timings,
}

/// What a finished generation reports besides its text (llama-server's `timings`, `stop_type`, ...).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Timings {
    pub(super) stop: super::scheduler::StopType,
    pub(super) id_slot: usize,
    pub(super) n_ctx_used: usize,
    /// The generation reached the end of the slot's context (llama-server's `truncated`).
    pub(super) truncated: bool,
    pub(super) n_prompt: usize,
    pub(super) n_cached: usize,
    pub(super) n_generated: usize,
    pub(super) t_prompt: std::time::Duration,
    pub(super) t_gen: std::time::Duration,
}

impl Timings {
    /// The `Done` event's facts.
    pub(super) fn of(ev: &GenEvent) -> Option<Timings> {
        match ev {
            GenEvent::Done {
                n_prompt,
                n_cached,
                n_generated,
                stop,
                id_slot,
                n_ctx_used,
                truncated,
                t_prompt,
                t_gen,
                ..
            } => Some(Timings {
                stop: stop.clone(),
                id_slot: *id_slot,
                n_ctx_used: *n_ctx_used,
                truncated: *truncated,
                n_prompt: *n_prompt,
                n_cached: *n_cached,
                n_generated: *n_generated,
                t_prompt: *t_prompt,
                t_gen: *t_gen,
            }),
            _ => None,
        }
    }

    /// llama-server's `timings` object (`server_slot_stats::to_json`): times in ms, rates per second.
    pub(super) fn to_json(&self) -> Value {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let per_token = |t: f64, n: usize| if n > 0 { t / n as f64 } else { 0.0 };
        let per_second = |t: f64, n: usize| if t > 0.0 { 1e3 * n as f64 / t } else { 0.0 };
        let prompt_n = self.n_prompt - self.n_cached;
        let (pm, gm) = (ms(self.t_prompt), ms(self.t_gen));
        json!({
            "cache_n": self.n_cached,
            "prompt_n": prompt_n,
            "prompt_ms": pm,
            "prompt_per_token_ms": per_token(pm, prompt_n),
            "prompt_per_second": per_second(pm, prompt_n),
            "predicted_n": self.n_generated,
            "predicted_ms": gm,
            "predicted_per_token_ms": per_token(gm, self.n_generated),
            "predicted_per_second": per_second(gm, self.n_generated),
        })
    }
}

/// The `usage` object; `cached` = prompt tokens reused from a slot's KV cache.
fn usage(prompt: u32, completion: u32, cached: u32) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: Some(PromptTokensDetails {
            cached_tokens: cached,
        }),
    }
}

pub(super) async fn collect(mut s: Submitted) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(ev) = s.rx.recv().await {
        match ev {
            GenEvent::Delta {
                text: t,
                tokens: ts,
            } => {
                text.push_str(&t);
                tokens.extend(ts);
            }
            ev @ GenEvent::Done { .. } => {
                s.guard.disarm();
                let Some(timings) = Timings::of(&ev) else {
                    break;
                };
                let GenEvent::Done {
                    finish,
                    n_prompt,
                    n_cached,
                    n_generated,
                    ..
                } = ev
                else {
                    break;
                };
                return Ok(Collected {
                    text,
                    tokens,
                    finish,
                    n_prompt,
                    n_cached,
                    n_generated,
                    timings,
                });
            }
            GenEvent::Failed(m) => return Err(ApiError::Internal(m)),
        }
    }
    Err(ApiError::ShuttingDown)
}

pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| TokenLogprob {
                token: lossy(&t.bytes),
                logprob: t.logprob.unwrap_or(0.0),
                bytes: t.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(_, lp, b)| TopLogprob {
                        token: lossy(b),
                        logprob: *lp,
                        bytes: b.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub(super) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub(super) fn sse_json<T: serde::Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_else(|_| "{}".into()))
}

pub(super) fn sse_error(e: ApiError) -> Event {
    let (_, env) = e.envelope();
    sse_json(&env)
}

type Tagged = BoxStream<'static, (usize, GenEvent)>;

fn merged(subs: Vec<Submitted>) -> (SelectAll<Tagged>, Vec<DropGuard>) {
    let mut all = SelectAll::new();
    let mut guards = Vec::new();
    for (i, s) in subs.into_iter().enumerate() {
        guards.push(s.guard);
        let st = stream::unfold(
            s.rx,
            |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
        )
        .map(move |e| (i, e));
        all.push(st.boxed());
    }
    (all, guards)
}

/// Shared driver of a streamed response: turns tagged scheduler events into SSE events through
/// `on_event`, appends the usage chunk and `[DONE]`. Dropping the stream drops the guards (cancellation).
struct StreamState<F> {
    events: SelectAll<Tagged>,
    _guards: Vec<DropGuard>,
    out: VecDeque<Event>,
    remaining: usize,
    finished: bool,
    done_marker: bool,
    on_event: F,
}

/// `done_marker`: end with OpenAI's `data: [DONE]` (llama-server's native streams do not).
pub(super) fn sse_stream<F>(
    subs: Vec<Submitted>,
    first: Vec<Event>,
    done_marker: bool,
    on_event: F,
) -> Response
where
    F: FnMut(usize, GenEvent, &mut VecDeque<Event>) -> Step + Send + 'static,
{
    let remaining = subs.len();
    let (events, guards) = merged(subs);
    let state = StreamState {
        events,
        _guards: guards,
        out: first.into(),
        remaining,
        finished: false,
        done_marker,
        on_event,
    };
    let s = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.out.pop_front() {
                return Some((Ok::<Event, Infallible>(ev), st));
            }
            if st.finished {
                return None;
            }
            match st.events.next().await {
                Some((i, ev)) => match (st.on_event)(i, ev, &mut st.out) {
                    Step::Continue => {}
                    Step::ChoiceDone => {
                        st.remaining -= 1;
                        if st.remaining == 0 {
                            (st.on_event)(usize::MAX, GenEvent::Failed(String::new()), &mut st.out);
                            if st.done_marker {
                                st.out.push_back(Event::default().data("[DONE]"));
                            }
                            st.finished = true;
                        }
                    }
                    Step::Abort => st.finished = true,
                },
                None => {
                    st.out.push_back(sse_error(ApiError::ShuttingDown));
                    st.finished = true;
                }
            }
        }
    });
    Sse::new(s).into_response()
}

/// What a streamed event did.
pub(super) enum Step {
    /// More events follow.
    Continue,
    /// This choice has ended.
    ChoiceDone,
    /// The stream ends now (an error was sent).
    Abort,
}

async fn chat(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Chat);
    let ready = st.ready()?;
    let req: ChatCompletionRequest = parse_json(&body)?;
    if ready.codec.info().is_encoder {
        return Err(ApiError::bad(
            "this model is an embedding model; use /v1/embeddings",
            Some("model"),
        ));
    }
    let n_probs = if req.logprobs.unwrap_or(false) {
        Some(req.top_logprobs.unwrap_or(0) as usize)
    } else {
        None
    };
    let mut spec = gen_spec(
        &req.sampling,
        req.max_completion_tokens.or(req.max_tokens),
        n_probs,
        ready.codec.as_ref(),
        &st.info.defaults,
    )?;
    // Rendering and tokenizing a huge conversation is CPU work: off the async threads.
    let (codec, format) = (ready.codec.clone(), st.info.reasoning_format);
    let (req, plan, prompt) = prepare(body.len(), move || {
        let plan = super::chat::plan(codec.as_ref(), &req, format);
        let prompt = plan
            .as_ref()
            .map(|p| codec.encode(&p.prompt, true, true))
            .unwrap_or_default();
        (req, plan, prompt)
    })
    .await?;
    let plan = plan?;
    let mut syntax = plan.syntax;
    spec.constraint = match &plan.grammar {
        // tool_choice "required" or a named function: the reply is a call, by grammar.
        Some(g) => {
            if structured::grammar_spec(&req.structured)?.is_some() {
                return Err(ApiError::bad(
                    "'tool_choice' forcing a tool call cannot be combined with 'response_format', \
                     'json_schema' or 'grammar'",
                    Some("tool_choice"),
                ));
            }
            Some(structured::compile(&ready.codec, GrammarSpec::Lark(g.clone())).await?)
        }
        // A JSON response format takes llama.cpp's chat shape (optional ```json fence), and the
        // reply's content is then the JSON alone.
        None => match structured::grammar_spec(&req.structured)? {
            Some(g) => {
                let g = g.for_chat_reply();
                syntax.json_reply = g.is_chat_json_reply();
                Some(structured::compile(&ready.codec, g).await?)
            }
            None => None,
        },
    };
    check_prompt_fits(prompt.len(), ready, st.info.n_slots, "messages")?;
    let n_prompt = prompt.len() as u32;
    let subs = (0..spec.n)
        .map(|i| submit(ready, prompt.clone(), &spec, i))
        .collect::<Result<Vec<_>, _>>()?;
    let id = new_id("chatcmpl");
    let created = now_secs();
    let model = st.info.alias.clone();
    if !spec.stream {
        let results = futures_util::future::join_all(subs.into_iter().map(collect)).await;
        let mut choices = Vec::new();
        let mut completion = 0u32;
        // The prompt is counted once: its cached part is the first choice's.
        let mut cached = 0u32;
        for (i, r) in results.into_iter().enumerate() {
            let c = r?;
            completion += c.n_generated as u32;
            if i == 0 {
                cached = c.n_cached as u32;
            }
            debug_assert_eq!(c.n_prompt as u32, n_prompt);
            let (message, finish_reason) = super::chat::message(&c.text, &syntax, c.finish);
            choices.push(ChatChoice {
                index: i as u32,
                message,
                logprobs: spec.n_probs.map(|_| chat_logprobs(&c.tokens)),
                finish_reason,
            });
        }
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion".into(),
            created,
            model,
            system_fingerprint: fingerprint(),
            choices,
            usage: usage(n_prompt, completion, cached),
        })
        .into_response());
    }
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage,
        }
    };
    // llama-server's first delta of a choice: the role, with `content: null`.
    let first: Vec<Event> = (0..spec.n)
        .map(|i| {
            let mut v = serde_json::to_value(chunk(
                vec![ChatChunkChoice {
                    index: i as u32,
                    delta: ChatDelta {
                        role: Some("assistant".into()),
                        ..ChatDelta::default()
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            ))
            .unwrap_or_default();
            v["choices"][0]["delta"]["content"] = Value::Null;
            sse_json(&v)
        })
        .collect();
    let want_logprobs = spec.n_probs.is_some();
    let include_usage = spec.include_usage;
    let mut completion = 0u32;
    let mut cached = 0u32;
    let mut timings: Option<Value> = None;
    let mut replies: Vec<super::chat::ReplyStream> = (0..spec.n)
        .map(|_| super::chat::ReplyStream::new(syntax))
        .collect();
    Ok(sse_stream(subs, first, true, move |i, ev, out| {
        if i == usize::MAX {
            if include_usage {
                out.push_back(with_timings(
                    &chunk(Vec::new(), Some(usage(n_prompt, completion, cached))),
                    timings.take(),
                ));
            }
            return Step::Continue;
        }
        match ev {
            GenEvent::Delta { text, tokens } => {
                let parts = replies[i].push(&text);
                if !parts.is_empty() || (want_logprobs && !tokens.is_empty()) {
                    out.push_back(sse_json(&chunk(
                        vec![ChatChunkChoice {
                            index: i as u32,
                            delta: chat_delta(parts),
                            logprobs: want_logprobs.then(|| chat_logprobs(&tokens)),
                            finish_reason: None,
                        }],
                        None,
                    )));
                }
                Step::Continue
            }
            ev @ GenEvent::Done { .. } => {
                let t = Timings::of(&ev);
                let GenEvent::Done {
                    finish,
                    n_cached,
                    n_generated,
                    ..
                } = ev
                else {
                    return Step::Continue;
                };
                completion += n_generated as u32;
                if i == 0 {
                    cached = n_cached as u32;
                }
                let parts = replies[i].finish();
                if !parts.is_empty() {
                    out.push_back(sse_json(&chunk(
                        vec![ChatChunkChoice {
                            index: i as u32,
                            delta: chat_delta(parts),
                            logprobs: None,
                            finish_reason: None,
                        }],
                        None,
                    )));
                }
                let finish = if replies[i].has_calls() && finish == FinishReason::Stop {
                    FinishReason::ToolCalls
                } else {
                    finish
                };
                // llama-server puts `timings` on a task's last chunk: the usage chunk when there is
                // one, else the finish chunk.
                let t = t.map(|t| t.to_json());
                let here = if include_usage {
                    timings = t;
                    None
                } else {
                    t
                };
                out.push_back(with_timings(
                    &chunk(
                        vec![ChatChunkChoice {
                            index: i as u32,
                            delta: ChatDelta::default(),
                            logprobs: None,
                            finish_reason: Some(finish),
                        }],
                        None,
                    ),
                    here,
                ));
                Step::ChoiceDone
            }
            GenEvent::Failed(m) => {
                out.push_back(sse_error(ApiError::Internal(m)));
                Step::Abort
            }
        }
    }))
}

/// An SSE event of `chunk`, with llama-server's `timings` object beside its fields when given.
fn with_timings<T: serde::Serialize>(chunk: &T, timings: Option<Value>) -> Event {
    match timings {
        None => sse_json(chunk),
        Some(t) => {
            let mut v = serde_json::to_value(chunk).unwrap_or_default();
            v["timings"] = t;
            sse_json(&v)
        }
    }
}

/// A streamed chat delta from the parsed parts of the reply.
fn chat_delta(p: super::chat::DeltaParts) -> ChatDelta {
    ChatDelta {
        role: None,
        content: p.content,
        reasoning_content: p.reasoning_content,
        tool_calls: p.tool_calls,
    }
}

/// Legacy completion logprobs for `tokens`, whose text starts at byte `offset` of the choice's text.
fn completion_logprobs(tokens: &[TokenOut], offset: &mut u32, lp: &mut CompletionLogprobs) {
    for t in tokens {
        lp.tokens.push(lossy(&t.bytes));
        lp.token_logprobs.push(t.logprob);
        let mut top = BTreeMap::new();
        for (_, l, b) in &t.top {
            top.entry(lossy(b)).or_insert(*l);
        }
        lp.top_logprobs.push(Some(top));
        lp.text_offset.push(*offset);
        *offset += t.bytes.len() as u32;
    }
}

/// Most completions one `/v1/completions` request may ask for: prompts × `n`.
pub const MAX_CHOICES: usize = 64;
/// Most inputs one `/v1/embeddings` request may carry.
pub const MAX_EMBEDDING_INPUTS: usize = 512;

/// 400 when `prompts` × `n` exceeds [`MAX_CHOICES`] (checked before anything is tokenized).
fn check_choices(prompts: usize, n: usize) -> Result<(), ApiError> {
    if prompts.saturating_mul(n) > MAX_CHOICES {
        return Err(ApiError::bad(
            format!(
                "{prompts} prompt(s) × n = {n} asks for {} completions; at most {MAX_CHOICES} per request",
                prompts.saturating_mul(n)
            ),
            Some("prompt"),
        ));
    }
    Ok(())
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Completions);
    let ready = st.ready()?;
    let req: CompletionRequest = parse_json(&body)?;
    if ready.codec.info().is_encoder {
        return Err(ApiError::bad(
            "this model is an embedding model; use /v1/embeddings",
            Some("model"),
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        tracing::warn!("'suffix' is not supported and was ignored");
    }
    let n_probs = req.logprobs.map(|k| k as usize);
    let mut spec = gen_spec(
        &req.sampling,
        req.max_tokens,
        n_probs,
        ready.codec.as_ref(),
        &st.info.defaults,
    )?;
    let raw_prompts = req.prompt.into_prompts();
    check_choices(raw_prompts.len(), spec.n)?;
    spec.constraint = structured::constraint_of(&ready.codec, &req.structured).await?;
    let echo = req.echo.unwrap_or(false);
    let mut prompts = Vec::new();
    for p in raw_prompts {
        let (ids, text) = match p {
            OnePrompt::Text(t) => {
                let codec = ready.codec.clone();
                prepare(t.len(), move || (codec.encode(&t, true, true), t)).await?
            }
            OnePrompt::Tokens(ids) => {
                check_ids(&ids, ready.codec.info().n_vocab, "prompt")?;
                let t = ready.codec.decode(&ids, false);
                (ids, t)
            }
        };
        check_prompt_fits(ids.len(), ready, st.info.n_slots, "prompt")?;
        prompts.push((ids, text));
    }
    if prompts.is_empty() {
        return Err(ApiError::bad("'prompt' is empty", Some("prompt")));
    }
    let n_prompt: u32 = prompts.iter().map(|p| p.0.len() as u32).sum();
    let mut subs = Vec::new();
    let mut echoes = Vec::new();
    for (ids, text) in prompts {
        for c in 0..spec.n {
            subs.push(submit(ready, ids.clone(), &spec, c)?);
            echoes.push(if echo { text.clone() } else { String::new() });
        }
    }
    let id = new_id("cmpl");
    let created = now_secs();
    let model = st.info.alias.clone();
    let make = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Vec<CompletionChoice>, usage: Option<Usage>| Completion {
            id: id.clone(),
            object: "text_completion".into(),
            created,
            model: model.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage,
        }
    };
    if !spec.stream {
        let results = futures_util::future::join_all(subs.into_iter().map(collect)).await;
        let mut choices = Vec::new();
        let mut completion = 0u32;
        // Each prompt is counted once: its cached part is its first choice's.
        let mut cached = 0u32;
        for (i, r) in results.into_iter().enumerate() {
            let c = r?;
            completion += c.n_generated as u32;
            if i % spec.n == 0 {
                cached += c.n_cached as u32;
            }
            let prefix = &echoes[i];
            let logprobs = n_probs.map(|_| {
                let mut lp = CompletionLogprobs::default();
                let mut off = prefix.len() as u32;
                completion_logprobs(&c.tokens, &mut off, &mut lp);
                lp
            });
            choices.push(CompletionChoice {
                text: format!("{prefix}{}", c.text),
                index: i as u32,
                logprobs,
                finish_reason: Some(c.finish),
            });
        }
        return Ok(Json(make(choices, Some(usage(n_prompt, completion, cached)))).into_response());
    }
    let first: Vec<Event> = echoes
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.is_empty())
        .map(|(i, e)| {
            sse_json(&make(
                vec![CompletionChoice {
                    text: e.clone(),
                    index: i as u32,
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            ))
        })
        .collect();
    let mut offsets: Vec<u32> = echoes.iter().map(|e| e.len() as u32).collect();
    let include_usage = spec.include_usage;
    let n_choices = spec.n;
    let mut completion = 0u32;
    let mut cached = 0u32;
    Ok(sse_stream(subs, first, true, move |i, ev, out| {
        if i == usize::MAX {
            if include_usage {
                out.push_back(sse_json(&make(
                    Vec::new(),
                    Some(usage(n_prompt, completion, cached)),
                )));
            }
            return Step::Continue;
        }
        match ev {
            GenEvent::Delta { text, tokens } => {
                let logprobs = n_probs.map(|_| {
                    let mut lp = CompletionLogprobs::default();
                    completion_logprobs(&tokens, &mut offsets[i], &mut lp);
                    lp
                });
                out.push_back(sse_json(&make(
                    vec![CompletionChoice {
                        text,
                        index: i as u32,
                        logprobs,
                        finish_reason: None,
                    }],
                    None,
                )));
                Step::Continue
            }
            GenEvent::Done {
                finish,
                n_cached,
                n_generated,
                ..
            } => {
                completion += n_generated as u32;
                if i % n_choices == 0 {
                    cached += n_cached as u32;
                }
                out.push_back(sse_json(&make(
                    vec![CompletionChoice {
                        text: String::new(),
                        index: i as u32,
                        logprobs: None,
                        finish_reason: Some(finish),
                    }],
                    None,
                )));
                Step::ChoiceDone
            }
            GenEvent::Failed(m) => {
                out.push_back(sse_error(ApiError::Internal(m)));
                Step::Abort
            }
        }
    }))
}

async fn embeddings(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    /// `/v1/embeddings`: OpenAI's fields, `input` in any of llama-server's prompt forms.
    #[derive(serde::Deserialize)]
    struct Req {
        input: Value,
        #[serde(default)]
        encoding_format: Option<EncodingFormat>,
    }
    st.metrics.count_request(Endpoint::Embeddings);
    let ready = st.ready()?;
    let req: Req = parse_json(&body)?;
    if st.info.pooling == Some(super::backend::Pooling::None) {
        return Err(ApiError::bad(
            "Pooling type 'none' is not OAI compatible. Please use a different pooling type",
            None,
        ));
    }
    let codec = ready.codec.clone();
    let input = req.input;
    let inputs = prepare(body.len(), move || {
        super::native::tokenize_prompts(codec.as_ref(), &input, true, "input", MAX_EMBEDDING_INPUTS)
    })
    .await??;
    super::native::check_embedding_inputs(&st, ready, &inputs)?;
    let n_tokens: u32 = inputs.iter().map(|i| i.len() as u32).sum();
    let rows =
        super::native::embed_all(ready, inputs, st.info.pooling, super::native::Normalize(2))
            .await?;
    let format = req.encoding_format.unwrap_or_default();
    let data = rows
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let v = r.pop().unwrap_or_default();
            let embedding = match format {
                EncodingFormat::Float => EmbeddingVector::Float(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            Embedding {
                object: "embedding".into(),
                embedding,
                index: i as u32,
            }
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: st.info.alias.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: n_tokens,
            total_tokens: n_tokens,
        },
    })
    .into_response())
}

/// Scales `v` to unit Euclidean length (sum of squares in f64); a zero vector stays zero.
pub(super) fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = ((*x as f64) / norm) as f32);
    }
}
