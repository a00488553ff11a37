//! llama-server's native endpoints, with its request fields and response shapes (tools/server/README.md,
//! server-context.cpp, server-task.cpp, server-common.cpp of llama.cpp): `POST /completion`
//! (`/completions`), `POST /infill`, `GET /slots`, `POST /embedding` (`/embeddings`), and the prompt
//! forms they share (text, token ids, a mix of both, or a list of those).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::backend::{Codec, ModelInfo, Pooling, SamplingParams};
use super::error::{ApiError, parse_json};
use super::http::{
    AppState, GenSpec, Ready, Step, Timings, check_ids, check_prompt_fits, collect, gen_spec,
    l2_normalize, lossy, sse_error, sse_json, sse_stream, submit,
};
use super::metrics::Endpoint;
use super::scheduler::{Command, EmbedRequest, GenEvent, TokenOut};
use super::structured;
use crate::engine::sampling::Stage;
use crate::openai::{SamplingFields, StructuredFields};

/// Most prompts one native request may carry (each is one task, as in llama-server).
pub const MAX_PROMPTS: usize = 64;

/// One prompt of llama-server's mixed form: a string is tokenized (with BOS, when `add_special`, only
/// if it comes first), a number is a token id (llama-server's `tokenize_mixed`).
///
/// Errors: an element that is neither, or a token id out of the vocabulary.
fn tokenize_mixed(
    codec: &dyn Codec,
    v: &Value,
    add_special: bool,
    param: &'static str,
) -> Result<Vec<u32>, ApiError> {
    let bad = |what: String| ApiError::bad(format!("'{param}': {what}"), Some(param));
    let mut out = Vec::new();
    match v {
        Value::String(s) => out = codec.encode(s, add_special, true),
        Value::Array(items) => {
            for (i, p) in items.iter().enumerate() {
                match p {
                    Value::String(s) => out.extend(codec.encode(s, add_special && i == 0, true)),
                    Value::Number(n) => {
                        let id = n
                            .as_u64()
                            .and_then(|id| u32::try_from(id).ok())
                            .ok_or_else(|| bad(format!("element {i} ({n}) is not a token id")))?;
                        out.push(id);
                    }
                    other => {
                        return Err(bad(format!(
                            "element {i} must be a string or a token id, got {other}"
                        )));
                    }
                }
            }
        }
        other => {
            return Err(bad(format!(
                "must be a string, token ids or a list of them, got {other}"
            )));
        }
    }
    check_ids(&out, codec.info().n_vocab, param)?;
    Ok(out)
}

/// The prompts of a request, as llama-server's `tokenize_input_prompts` reads them: a string, a list of
/// token ids (possibly mixed with strings) = one prompt; any other list = one prompt per element.
/// `max` bounds the number of prompts (checked before any is tokenized): [`MAX_PROMPTS`] for
/// completions, [`super::http::MAX_EMBEDDING_INPUTS`] for embeddings.
///
/// Errors: no prompt, more than `max` (`'{param}' has N entries; at most M per request`), or an element
/// [`tokenize_mixed`] refuses.
pub(super) fn tokenize_prompts(
    codec: &dyn Codec,
    v: &Value,
    add_special: bool,
    param: &'static str,
    max: usize,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let prompts = match v {
        Value::Array(items) if !items.iter().any(Value::is_number) => {
            if items.len() > max {
                return Err(ApiError::bad(
                    format!(
                        "'{param}' has {} entries; at most {max} per request",
                        items.len()
                    ),
                    Some(param),
                ));
            }
            items
                .iter()
                .map(|p| tokenize_mixed(codec, p, add_special, param))
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => vec![tokenize_mixed(codec, v, add_special, param)?],
    };
    if prompts.is_empty() {
        return Err(ApiError::bad(
            format!("'{param}' must not be empty"),
            Some(param),
        ));
    }
    Ok(prompts)
}

/// What the model lacks for `/infill`, in llama-server's words; empty when it has all three FIM tokens.
pub(super) fn fim_missing(info: &ModelInfo) -> String {
    let mut err = String::new();
    if info.fim.pre.is_none() {
        err += "prefix token is missing. ";
    }
    if info.fim.suf.is_none() {
        err += "suffix token is missing. ";
    }
    if info.fim.mid.is_none() {
        err += "middle token is missing. ";
    }
    err
}

/// `generation_settings` / `/props`' `default_generation_settings.params` / `/slots`' `params`, with
/// llama-server's field names (`task_params::to_json`) for what this worker has.
pub(super) fn settings_json(
    s: &SamplingParams,
    n_predict: i64,
    n_probs: Option<usize>,
    stream: bool,
    post_sampling_probs: bool,
    stops: &[String],
) -> Value {
    json!({
        "seed": s.seed.map_or(-1i64, |v| v as i64),
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "typical_p": 1.0,
        "repeat_last_n": s.repeat_last_n,
        "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "stop": stops,
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "n_discard": 0,
        "stream": stream,
        "logit_bias": s.logit_bias.iter().map(|&(t, b)| json!({"bias": b, "token": t})).collect::<Vec<_>>(),
        "n_probs": n_probs.unwrap_or(0),
        "samplers": s.chain.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "post_sampling_probs": post_sampling_probs,
    })
}

/// A request to `/completion` or `/infill` (llama-server's field names).
#[derive(Debug, Deserialize)]
struct NativeRequest {
    /// Text, token ids, a mix, or a list of those (`/infill`: text after the prefix).
    #[serde(default)]
    prompt: Option<Value>,
    /// Most tokens to generate (-1 = until a stop or the context's end; 0 = only evaluate the prompt).
    #[serde(default)]
    n_predict: Option<i64>,
    /// Alias of `n_predict`.
    #[serde(default)]
    max_tokens: Option<i64>,
    /// Report the `n_probs` most likely tokens at each position.
    #[serde(default)]
    n_probs: Option<usize>,
    /// Reuse the slot's cached prefix (default true).
    #[serde(default)]
    cache_prompt: Option<bool>,
    /// Sampler order: names, or a string of llama.cpp's one-letter codes.
    #[serde(default)]
    samplers: Option<Value>,
    /// Slot to run on (-1 = any).
    #[serde(default)]
    id_slot: Option<i64>,
    /// Put the generated token ids in `tokens`.
    #[serde(default)]
    return_tokens: bool,
    /// Report probabilities after the sampler chain (`prob`, `top_probs`).
    #[serde(default)]
    post_sampling_probs: bool,
    /// Ban the end-of-generation tokens.
    #[serde(default)]
    ignore_eos: bool,
    /// `/infill`: the code before the cursor.
    #[serde(default)]
    input_prefix: Option<Value>,
    /// `/infill`: the code after the cursor.
    #[serde(default)]
    input_suffix: Option<Value>,
    /// `/infill`: other files, `[{"filename": ..., "text": ...}]`.
    #[serde(default)]
    input_extra: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    structured: StructuredFields,
}

/// `POST /completion`, `POST /completions` (llama-server's native completion).
pub(super) async fn completion(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Completions);
    let ready = st.ready()?;
    let mut req: NativeRequest = parse_json(&body)?;
    let Some(prompt) = req.prompt.take() else {
        return Err(ApiError::bad("\"prompt\" is required", Some("prompt")));
    };
    let codec = ready.codec.clone();
    let prompts = super::http::prepare(body.len(), move || {
        tokenize_prompts(codec.as_ref(), &prompt, true, "prompt", MAX_PROMPTS)
    })
    .await??;
    run(&st, ready, &req, prompts).await
}

/// `POST /infill`: fill-in-the-middle with the model's FIM tokens, the prompt laid out as llama-server's
/// `format_prompt_infill` does (repository-level pattern with `input_extra` chunks, 3:1 prefix:suffix
/// within a batch). A model without FIM tokens is refused with 501, as llama-server refuses it.
pub(super) async fn infill(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    st.metrics.count_request(Endpoint::Completions);
    let ready = st.ready()?;
    let info = ready.codec.info();
    let missing = fim_missing(info);
    if !missing.is_empty() {
        return Err(ApiError::NotSupported(format!(
            "Infill is not supported by this model: {missing}"
        )));
    }
    let req: NativeRequest = parse_json(&body)?;
    if req.prompt.as_ref().is_some_and(|p| !p.is_string()) {
        return Err(ApiError::bad("\"prompt\" must be a string", Some("prompt")));
    }
    let (Some(prefix), Some(suffix)) = (&req.input_prefix, &req.input_suffix) else {
        let which = if req.input_prefix.is_none() {
            "input_prefix"
        } else {
            "input_suffix"
        };
        return Err(ApiError::bad(
            format!("\"{which}\" is required"),
            Some(which),
        ));
    };
    let extra = match &req.input_extra {
        None => Vec::new(),
        Some(Value::Array(chunks)) => {
            let mut v = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                let Some(text) = c.get("text").and_then(Value::as_str) else {
                    return Err(ApiError::bad(
                        format!(
                            "input_extra[{i}] must contain a \"text\" field with a string value"
                        ),
                        Some("input_extra"),
                    ));
                };
                let filename = match c.get("filename") {
                    None => "tmp",
                    Some(Value::String(f)) => f.as_str(),
                    Some(_) => {
                        return Err(ApiError::bad(
                            format!("input_extra[{i}]'s \"filename\" field must be a string"),
                            Some("input_extra"),
                        ));
                    }
                };
                v.push((filename.to_string(), text.to_string()));
            }
            v
        }
        Some(_) => {
            return Err(ApiError::bad(
                "\"input_extra\" must be an array of {\"filename\": string, \"text\": string}",
                Some("input_extra"),
            ));
        }
    };
    // Tokenizing and laying out a large body runs off the async threads, as for every other prompt.
    let prompt = match &req.prompt {
        Some(Value::String(p)) => p.clone(),
        _ => String::new(),
    };
    let (prefix, suffix) = (prefix.clone(), suffix.clone());
    let codec = ready.codec.clone();
    let (n_batch, n_predict, n_ctx) =
        (st.info.n_batch, st.info.defaults.n_predict, ready.n_ctx_seq);
    let tokens = super::http::prepare(body.len(), move || {
        let codec = codec.as_ref();
        let parts = InfillParts {
            prefix: tokenize_mixed(codec, &prefix, false, "input_prefix")?,
            suffix: tokenize_mixed(codec, &suffix, false, "input_suffix")?,
            extra,
            prompt: codec.encode(&prompt, false, true),
        };
        Ok::<_, ApiError>(parts.layout(codec, n_batch, n_predict, n_ctx))
    })
    .await??;
    run(&st, ready, &req, vec![tokens]).await
}

/// The pieces of an infill prompt, tokenized.
struct InfillParts {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// (file name, text) of `input_extra`.
    extra: Vec<(String, String)>,
    /// `prompt`: text after the prefix (before the middle).
    prompt: Vec<u32>,
}

impl InfillParts {
    /// llama-server's `format_prompt_infill` (not in SPM order):
    /// `[FIM_REP]myproject\n ([FIM_SEP]file\n text)* [FIM_SEP]filename\n [BOS] [FIM_PRE]prefix prompt
    /// [FIM_SUF]suffix [FIM_MID]`, the prefix cut to 3/4 of a batch (its end kept), the suffix to the
    /// rest of that quarter, the extra chunks to what the context leaves (their end kept).
    fn layout(self, codec: &dyn Codec, n_batch: usize, n_predict: i64, n_ctx: usize) -> Vec<u32> {
        let info = codec.info();
        let fim = info.fim;
        let (Some(pre), Some(suf), Some(mid)) = (fim.pre, fim.suf, fim.mid) else {
            return Vec::new();
        };
        let mut extra = Vec::new();
        if let Some(rep) = fim.rep {
            extra.push(rep);
            extra.extend(codec.encode("myproject\n", false, false));
        }
        for (file, text) in &self.extra {
            match fim.sep {
                Some(sep) => {
                    extra.push(sep);
                    extra.extend(codec.encode(&format!("{file}\n"), false, false));
                }
                None => extra.extend(codec.encode("\n\n--- snippet ---\n\n", false, false)),
            }
            extra.extend(codec.encode(text, false, false));
        }
        if let Some(sep) = fim.sep {
            extra.push(sep);
            extra.extend(codec.encode("filename\n", false, false));
        }
        let n_batch = n_batch as i64;
        let n_prefix_take = (self.prefix.len() as i64).min(3 * (n_batch / 4)).max(0) as usize;
        let n_suffix_take = (self.suffix.len() as i64)
            .min((n_batch / 4 - (2 + self.prompt.len() as i64)).max(0))
            as usize;
        let n_extra_take =
            ((n_ctx as i64 - n_batch - 2 * n_predict).max(0) as usize).min(extra.len());
        let mut inp = Vec::new();
        inp.extend_from_slice(&extra[extra.len() - n_extra_take..]);
        if let Some(bos) = info.add_bos {
            inp.push(bos);
        }
        inp.push(pre);
        inp.extend_from_slice(&self.prefix[self.prefix.len() - n_prefix_take..]);
        inp.extend_from_slice(&self.prompt);
        inp.push(suf);
        inp.extend_from_slice(&self.suffix[..n_suffix_take]);
        inp.push(mid);
        inp
    }
}

/// Shared body of `/completion` and `/infill`: validates the fields, runs every prompt (× `n`), and
/// answers one object (one task) or an array, or streams llama-server's chunks.
async fn run(
    st: &Arc<AppState>,
    ready: &Ready,
    req: &NativeRequest,
    prompts: Vec<Vec<u32>>,
) -> Result<Response, ApiError> {
    let info = ready.codec.info();
    if info.is_encoder {
        return Err(ApiError::bad(
            "this model is an embedding model; use /embedding",
            Some("model"),
        ));
    }
    let n_probs = req.n_probs.filter(|&k| k > 0);
    let mut spec: GenSpec = gen_spec(
        &req.sampling,
        None,
        n_probs,
        ready.codec.as_ref(),
        &st.info.defaults,
    )?;
    let n_predict = req
        .n_predict
        .or(req.max_tokens)
        .unwrap_or(st.info.defaults.n_predict);
    if n_predict < -1 {
        return Err(ApiError::bad(
            format!("'n_predict' must be -1 or more, got {n_predict}"),
            Some("n_predict"),
        ));
    }
    spec.max_tokens = usize::try_from(n_predict).ok();
    if let Some(s) = &req.samplers {
        spec.sampling.chain = match s {
            Value::Array(names) => {
                let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
                Stage::chain_from_names(&names)
            }
            Value::String(codes) => Stage::chain_from_chars(codes),
            _ => Err("must be a list of names or a string of codes".to_string()),
        }
        .map_err(|e| ApiError::bad(format!("'samplers': {e}"), Some("samplers")))?;
    }
    if req.ignore_eos {
        for &t in &info.eog_tokens {
            spec.sampling.logit_bias.push((t, f32::NEG_INFINITY));
        }
    }
    spec.id_slot = match req.id_slot {
        None | Some(-1) => None,
        Some(i) if (0..st.info.n_slots as i64).contains(&i) => Some(i as usize),
        Some(i) => {
            return Err(ApiError::bad(
                format!(
                    "'id_slot' {i} does not exist (slots 0..{}, or -1 for any)",
                    st.info.n_slots
                ),
                Some("id_slot"),
            ));
        }
    };
    spec.cache_prompt = req.cache_prompt.unwrap_or(true);
    spec.post_sampling_probs = req.post_sampling_probs;
    let mut settings = settings_json(
        &spec.sampling,
        n_predict,
        n_probs,
        spec.stream,
        spec.post_sampling_probs,
        &spec.stops,
    );
    settings["n_keep"] = json!(spec.n_keep);
    settings["n_discard"] = json!(spec.n_discard);
    spec.settings = Some(Arc::new(settings.clone()));
    if prompts.len().saturating_mul(spec.n) > MAX_PROMPTS {
        return Err(ApiError::bad(
            format!(
                "{} prompt(s) × n = {} is more than {MAX_PROMPTS} tasks",
                prompts.len(),
                spec.n
            ),
            Some("prompt"),
        ));
    }
    for p in &prompts {
        check_prompt_fits(p.len(), ready, st.info.n_slots, "prompt")?;
    }
    spec.constraint = structured::constraint_of(&ready.codec, &req.structured).await?;
    let mut subs = Vec::new();
    let mut tasks = Vec::new();
    for p in &prompts {
        for c in 0..spec.n {
            subs.push(submit(ready, p.clone(), &spec, c)?);
            tasks.push(p.clone());
        }
    }
    let task = Task {
        model: st.info.alias.clone(),
        settings,
        return_tokens: req.return_tokens,
        post: spec.post_sampling_probs,
        want_probs: n_probs.is_some(),
    };
    if !spec.stream {
        let results = futures_util::future::join_all(subs.into_iter().map(collect)).await;
        let mut out = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            let c = r?;
            let prompt_text = ready.codec.decode(&tasks[i], true);
            let mut v = task.final_json(i, &c.text, &c.tokens, &c.timings, &prompt_text);
            if task.want_probs {
                v["completion_probabilities"] = probs_json(&c.tokens, task.post);
            }
            out.push(v);
        }
        return Ok(if out.len() == 1 {
            Json(out.swap_remove(0)).into_response()
        } else {
            Json(Value::Array(out)).into_response()
        });
    }
    let mut predicted = vec![0usize; subs.len()];
    let n_evaluated: Vec<usize> = tasks.iter().map(Vec::len).collect();
    let prompt_texts: Vec<String> = tasks.iter().map(|t| ready.codec.decode(t, true)).collect();
    let id_slot = spec.id_slot.map_or(-1, |i| i as i64);
    Ok(sse_stream(subs, Vec::new(), false, move |i, ev, out| {
        if i == usize::MAX {
            return Step::Continue;
        }
        match ev {
            GenEvent::Delta { text, tokens } => {
                predicted[i] += tokens.len();
                let mut v = json!({
                    "index": i,
                    "content": text,
                    "tokens": if task.return_tokens { tokens.iter().map(|t| t.id).collect::<Vec<_>>() } else { Vec::new() },
                    "stop": false,
                    "id_slot": id_slot,
                    "tokens_predicted": predicted[i],
                    "tokens_evaluated": n_evaluated[i],
                });
                if task.want_probs && !tokens.is_empty() {
                    v["completion_probabilities"] = probs_json(&tokens, task.post);
                }
                out.push_back(sse_json(&v));
                Step::Continue
            }
            ev @ GenEvent::Done { .. } => {
                if let Some(t) = Timings::of(&ev) {
                    out.push_back(sse_json(&task.final_json(i, "", &[], &t, &prompt_texts[i])));
                }
                Step::ChoiceDone
            }
            GenEvent::Failed(m) => {
                out.push_back(sse_error(ApiError::Internal(m)));
                Step::Abort
            }
        }
    }))
}

/// The per-request facts of a native completion's answers.
struct Task {
    model: String,
    settings: Value,
    return_tokens: bool,
    post: bool,
    want_probs: bool,
}

impl Task {
    /// llama-server's final result (`server_task_result_cmpl_final::to_json_non_oaicompat`); `content`
    /// and `tokens` are empty when streamed (they went out in the chunks).
    fn final_json(
        &self,
        index: usize,
        content: &str,
        tokens: &[TokenOut],
        t: &Timings,
        prompt: &str,
    ) -> Value {
        let stopping_word = match &t.stop {
            super::scheduler::StopType::Word(w) => w.clone(),
            _ => String::new(),
        };
        json!({
            "index": index,
            "content": content,
            "tokens": if self.return_tokens { tokens.iter().map(|t| t.id).collect::<Vec<_>>() } else { Vec::new() },
            "id_slot": t.id_slot,
            "stop": true,
            "model": self.model,
            "tokens_predicted": t.n_generated,
            "tokens_evaluated": t.n_prompt,
            "generation_settings": self.settings,
            "prompt": prompt,
            "has_new_line": content.contains('\n'),
            "truncated": t.truncated,
            "stop_type": t.stop.as_str(),
            "stopping_word": stopping_word,
            "tokens_cached": t.n_ctx_used,
            "timings": t.to_json(),
        })
    }
}

/// `completion_probabilities` (`completion_token_output::probs_vector_to_json`): per token its id,
/// text, bytes and `logprob` with `top_logprobs`, or with `post_sampling_probs` `prob` and `top_probs`.
fn probs_json(tokens: &[TokenOut], post: bool) -> Value {
    let (p_key, top_key) = if post {
        ("prob", "top_probs")
    } else {
        ("logprob", "top_logprobs")
    };
    // llama-server writes the lowest float instead of ln 0 (JSON has no -inf).
    let val = |lp: f32| {
        if post {
            lp.exp()
        } else if lp.is_finite() {
            lp
        } else {
            f32::MIN
        }
    };
    Value::Array(
        tokens
            .iter()
            .map(|t| {
                let top: Vec<Value> = t
                    .top
                    .iter()
                    .map(|(id, lp, b)| {
                        json!({"id": id, "token": lossy(b), "bytes": b, p_key: val(*lp)})
                    })
                    .collect();
                json!({
                    "id": t.id,
                    "token": lossy(&t.bytes),
                    "bytes": t.bytes,
                    p_key: val(t.logprob.unwrap_or(0.0)),
                    top_key: top,
                })
            })
            .collect(),
    )
}

/// `GET /slots`: every slot as llama-server shows it (`server_slot::to_json`); 501 with `--no-slots`;
/// `?fail_on_no_slot=1` answers 503 when no slot is idle.
pub(super) async fn slots(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if !st.info.slots_endpoint {
        return Err(ApiError::NotSupported(
            "This server does not support slots endpoint. Start it with `--slots`".into(),
        ));
    }
    let ready = st.ready()?;
    let (tx, rx) = oneshot::channel();
    ready
        .tx
        .send(Command::Slots(tx))
        .map_err(|_| ApiError::ShuttingDown)?;
    let slots = rx.await.map_err(|_| ApiError::ShuttingDown)?;
    if q.get("fail_on_no_slot").is_some_and(|v| !v.is_empty())
        && slots.iter().all(|s| s.is_processing)
    {
        return Err(ApiError::Unavailable("no slot available".into()));
    }
    let out: Vec<Value> = slots
        .into_iter()
        .map(|s| {
            let mut v = json!({
                "id": s.id,
                "n_ctx": s.n_ctx,
                "speculative": false,
                "is_processing": s.is_processing,
            });
            if s.used {
                v["n_prompt_tokens"] = json!(s.prompt.len());
                v["n_prompt_tokens_processed"] = json!(s.n_prompt_processed);
                v["n_prompt_tokens_cache"] = json!(s.n_prompt_cached);
                v["params"] = s.params.as_deref().cloned().unwrap_or(Value::Null);
                v["next_token"] = json!([{
                    "has_next_token": s.has_next_token,
                    "has_new_line": s.generated.contains('\n'),
                    "n_remain": s.n_remain,
                    "n_decoded": s.n_decoded,
                }]);
                v["prompt"] = json!(ready.codec.decode(&s.prompt, true));
                v["generated"] = json!(s.generated);
            }
            v
        })
        .collect();
    Ok(Json(out).into_response())
}

/// Embeds each input on the scheduler thread: rows `[n_embd]` per input (one per token with
/// `Pooling::None`, else one), L2-normalised when `normalize` and pooled.
pub(super) async fn embed_all(
    ready: &Ready,
    inputs: Vec<Vec<u32>>,
    pooling: Option<Pooling>,
    normalize: Normalize,
) -> Result<Vec<Vec<Vec<f32>>>, ApiError> {
    let mut out = Vec::new();
    for ids in inputs {
        let (tx, rx) = oneshot::channel();
        ready
            .tx
            .send(Command::Embed(EmbedRequest {
                tokens: ids,
                pooling,
                reply: tx,
            }))
            .map_err(|_| ApiError::ShuttingDown)?;
        let mut rows = rx
            .await
            .map_err(|_| ApiError::ShuttingDown)?
            .map_err(ApiError::Internal)?;
        if pooling != Some(Pooling::None) {
            rows.iter_mut().for_each(|r| normalize.apply(r));
        }
        out.push(rows);
    }
    Ok(out)
}

/// llama-server's `embd_normalize`: -1 none, 0 max-absolute (int16 range), 1 taxicab, 2 Euclidean
/// (default), p > 2 the p-norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Normalize(pub(super) i32);

impl Normalize {
    fn apply(self, v: &mut [f32]) {
        let norm: f64 = match self.0 {
            n if n < 0 => return,
            0 => v.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64)) / 32760.0,
            2 => return l2_normalize(v),
            p => v
                .iter()
                .map(|x| (x.abs() as f64).powi(p))
                .sum::<f64>()
                .powf(1.0 / p as f64),
        };
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x = ((*x as f64) / norm) as f32);
        }
    }
}

/// Checks that embeddings are on (and the pooling is not rank, whose output is scores) and each input
/// fits a slot.
pub(super) fn check_embedding_inputs(
    st: &AppState,
    ready: &Ready,
    inputs: &[Vec<u32>],
) -> Result<(), ApiError> {
    if !ready.codec.info().is_encoder && !st.info.embedding {
        return Err(ApiError::bad(
            "embeddings are off for this generation model: start the worker with --embedding",
            None,
        ));
    }
    let rank = match st.info.pooling {
        Some(p) => p == Pooling::Rank,
        None => ready.codec.info().rank_pooling,
    };
    if rank {
        return Err(ApiError::NotSupported(
            "this server's pooling is rank (a reranker): it gives scores, not embeddings; use /rerank"
                .into(),
        ));
    }
    for ids in inputs {
        if ids.is_empty() {
            return Err(ApiError::bad("an input is empty (0 tokens)", Some("input")));
        }
        if ids.len() > ready.n_ctx_seq {
            return Err(ApiError::ContextExceeded {
                message: format!(
                    "an input has {} tokens but the context is n_ctx = {} tokens",
                    ids.len(),
                    ready.n_ctx_seq
                ),
                param: "input",
                n_prompt_tokens: ids.len(),
                n_ctx: ready.n_ctx_seq,
            });
        }
    }
    Ok(())
}

/// `POST /embedding`, `POST /embeddings` (llama-server's native embeddings): `content` (or `input`) as
/// any prompt form; answers `[{"index": i, "embedding": [[...], ...]}]`, one row per token with
/// `--pooling none`, else one pooled row (normalised by `embd_normalize`, default Euclidean).
pub(super) async fn embedding(
    State(st): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        input: Option<Value>,
        #[serde(default)]
        content: Option<Value>,
        #[serde(default)]
        embd_normalize: Option<i32>,
    }
    st.metrics.count_request(Endpoint::Embeddings);
    let ready = st.ready()?;
    let req: Req = parse_json(&body)?;
    let Some(input) = req.input.or(req.content) else {
        return Err(ApiError::bad(
            "\"input\" or \"content\" must be provided",
            Some("content"),
        ));
    };
    let codec = ready.codec.clone();
    let inputs = super::http::prepare(body.len(), move || {
        tokenize_prompts(
            codec.as_ref(),
            &input,
            true,
            "content",
            super::http::MAX_EMBEDDING_INPUTS,
        )
    })
    .await??;
    check_embedding_inputs(&st, ready, &inputs)?;
    let rows = embed_all(
        ready,
        inputs,
        st.info.pooling,
        Normalize(req.embd_normalize.unwrap_or(2)),
    )
    .await?;
    let out: Vec<Value> = rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| json!({"index": i, "embedding": r}))
        .collect();
    Ok(Json(out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::fake::{BOS, FakeCodec};

    /// `logit_bias` in llama-server's forms: OpenAI's object (ids and text keys), `[[id, bias]]`,
    /// `[["text", bias]]` (every token of the text), `false` = −∞; each malformed entry is a 400 that
    /// names it.
    #[test]
    fn logit_bias_takes_llama_server_forms() {
        use crate::worker::http::parse_logit_bias;
        let c = FakeCodec::default();
        let ok = |v: Value| parse_logit_bias(&v, &c).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            ok(json!({"5": -100, "6": false})),
            vec![(5, -100.0), (6, inf)]
        );
        assert_eq!(ok(json!({"ab": 2.5})), vec![(97, 2.5), (98, 2.5)]);
        assert_eq!(
            ok(json!([[7, 1], ["hi", false], [0, -0.5]])),
            vec![(7, 1.0), (104, inf), (105, inf), (0, -0.5)]
        );
        assert_eq!(ok(json!([])), vec![]);
        for (bad, says) in [
            (json!([[1, 2], [3]]), "entry 1"),
            (json!([[1, 2], 7]), "entry 1"),
            (json!([[1, true]]), "entry 0"),
            (json!([[1, "x"]]), "entry 0"),
            (json!([[999, 1]]), "entry 0: token id 999"),
            (json!([[-1, 1]]), "entry 0: token id -1"),
            (json!([[1.5, 1]]), "entry 0: token 1.5"),
            (json!([[null, 1]]), "entry 0"),
            (json!([["", 1]]), "entry 0: the text"),
            (json!({"5": "high"}), "key \"5\""),
            (json!({"9999": 1}), "key \"9999\": token id 9999"),
            (json!(3), "must be an object or an array"),
        ] {
            let e = parse_logit_bias(&bad, &c).expect_err(&bad.to_string());
            let m = e.to_string();
            assert!(m.contains("logit_bias") && m.contains(says), "{bad}: {m}");
        }
    }

    #[test]
    fn prompts_take_llama_server_forms() {
        let c = FakeCodec::default();
        let one = |v: Value| tokenize_prompts(&c, &v, true, "prompt", MAX_PROMPTS);
        assert_eq!(one(json!("ab")).unwrap(), vec![vec![BOS, 97, 98]]);
        assert_eq!(one(json!([5, 6])).unwrap(), vec![vec![5, 6]]);
        // Mixed: BOS only when a string comes first.
        assert_eq!(one(json!([5, "a"])).unwrap(), vec![vec![5, 97]]);
        assert_eq!(one(json!(["a", 5])).unwrap(), vec![vec![BOS, 97, 5]]);
        // A list without numbers is several prompts.
        assert_eq!(
            one(json!(["a", [7], ["b", 8]])).unwrap(),
            vec![vec![BOS, 97], vec![7], vec![BOS, 98, 8]]
        );
        for bad in [
            json!({"x": 1}),
            json!([1.5]),
            json!([99999]),
            json!([]),
            json!([[true]]),
        ] {
            assert!(one(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn infill_prompt_is_laid_out_as_llama_server() {
        use crate::worker::backend::FimTokens;
        let (pre, suf, mid, rep, sep) = (1, 2, 3, 4, 5);
        let c = FakeCodec::with_fim(FimTokens {
            pre: Some(pre),
            suf: Some(suf),
            mid: Some(mid),
            rep: Some(rep),
            sep: Some(sep),
        });
        let b = |s: &str| s.bytes().map(u32::from).collect::<Vec<_>>();
        let parts = || InfillParts {
            prefix: b("PREFIX"),
            suffix: b("SUFFIX"),
            extra: vec![("f.py".into(), "X".into())],
            prompt: b("p"),
        };
        // Room for everything: extra chunks, BOS, prefix + prompt, suffix, middle.
        let got = parts().layout(&c, 64, -1, 1000);
        let mut want = vec![rep];
        want.extend(b("myproject\n"));
        want.push(sep);
        want.extend(b("f.py\n"));
        want.extend(b("X"));
        want.push(sep);
        want.extend(b("filename\n"));
        want.extend([BOS, pre]);
        want.extend(b("PREFIXp"));
        want.push(suf);
        want.extend(b("SUFFIX"));
        want.push(mid);
        assert_eq!(got, want);
        // A batch of 8: the prefix fits 3·8/4 = 6 tokens, the suffix is cut to 8/4 - (2 + 1) = 0, the extra
        // chunks to their last n_ctx - n_batch - 2·n_predict = 16 - 8 - 0 tokens.
        let got = parts().layout(&c, 8, 0, 16);
        let mut want = b("ilename\n");
        want.extend([BOS, pre]);
        want.extend(b("PREFIXp"));
        want.extend([suf, mid]);
        assert_eq!(got, want);
    }

    #[test]
    fn normalisations_follow_llama_cpp() {
        let mut v = [3.0f32, -4.0];
        Normalize(2).apply(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] + 0.8).abs() < 1e-6);
        let mut v = [3.0f32, -4.0];
        Normalize(1).apply(&mut v);
        assert!((v[0] - 3.0 / 7.0).abs() < 1e-6);
        let mut v = [3.0f32, -4.0];
        Normalize(0).apply(&mut v);
        assert!((v[1] + 32760.0).abs() < 1e-2);
        let mut v = [3.0f32, -4.0];
        Normalize(-1).apply(&mut v);
        assert_eq!(v, [3.0, -4.0]);
    }
}
