//! Ollama's API on the supervisor's port: `/api/version`, `/api/tags`, `/api/ps`, `/api/show`,
//! `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`, `/api/pull`, `/api/delete`,
//! `/api/copy`. Requests go through [`crate::openai::ollama`]'s translations to the model's worker
//! (loaded on demand by the manager, the same API-key rules and request log as `/v1`), and come back as
//! Ollama's JSON objects or NDJSON lines. Errors are Ollama's `{"error": "..."}` with the right status.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::auth::ApiKey;
use super::db::ModelRow;
use super::error::ApiError;
use super::foreign::{Failure, Res, Run, SseReader, StreamTx, find_model, stream_channel};
use super::hub::{DownloadRequest, DownloadState, HubError};
use super::process::ModelState;
use crate::openai::ollama::{
    self as tr, KeepAlive, OllamaChatRequest, OllamaCopyRequest, OllamaEmbedRequest,
    OllamaEmbeddingsRequest, OllamaGenerateRequest, OllamaModelRef, OllamaPullRequest, Stats,
    TranslateError,
};
use crate::openai::stream::{ChatAccumulator, error_message, parse_chat_chunk};
use crate::openai::{Completion, EmbeddingResponse, EmbeddingVector, FinishReason};

/// The Ollama API version `/api/version` reports: the level of the API this module implements.
pub const API_VERSION: &str = "0.12.0";
/// NDJSON lines buffered towards a slow client before the worker's stream waits.
const LINES_BUFFERED: usize = 32;
/// How often a pull's progress is read.
const PULL_POLL: Duration = Duration::from_millis(200);

/// An error in Ollama's envelope `{"error": "..."}`.
#[derive(Debug)]
pub struct OllamaError(pub Failure);

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        (self.0.status, Json(json!({"error": self.0.message}))).into_response()
    }
}

macro_rules! into_ollama {
    ($($t:ty),*) => {$(
        impl From<$t> for OllamaError {
            fn from(e: $t) -> Self {
                OllamaError(e.into())
            }
        }
    )*};
}
into_ollama!(
    Failure,
    TranslateError,
    super::db::DbError,
    HubError,
    ApiError
);

type Api<T> = Result<T, OllamaError>;

/// The API key rules of `/v1`, answered in Ollama's envelope.
fn key_id(k: Result<ApiKey, ApiError>) -> Res<Option<i64>> {
    k.map(|k| k.0).map_err(Failure::from)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Res<T> {
    serde_json::from_slice(body).map_err(|e| Failure::bad(format!("invalid request body: {e}")))
}

/// RFC 3339 with nanoseconds, as Ollama writes `created_at`.
fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

fn ms_rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(rfc3339)
        .unwrap_or_default()
}

pub(super) fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn ndjson_line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn ndjson_response(rx: mpsc::Receiver<Bytes>) -> Response {
    super::foreign::channel_response(rx, "application/x-ndjson")
        .unwrap_or_else(|e| OllamaError(Failure::bad_gateway(e.to_string())).into_response())
}

/// A streamed reply of `model` at `endpoint`: `work` sends lines into the channel (each waiting at
/// most the idle-write timeout for the client); its error becomes a last `{"error"}` line.
fn streamed<F>(
    st: &AppState,
    model: &str,
    endpoint: &'static str,
    work: impl FnOnce(StreamTx) -> F,
) -> Response
where
    F: std::future::Future<Output = Res<()>> + Send + 'static,
{
    let (tx, rx) = stream_channel(st, model, endpoint, LINES_BUFFERED);
    let fut = work(tx.clone());
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            let _ = tx.send(ndjson_line(&json!({"error": e.message}))).await;
        }
    });
    ndjson_response(rx)
}

async fn send(tx: Option<&StreamTx>, v: &Value) -> Res<()> {
    match tx {
        Some(tx) => tx.send(ndjson_line(v)).await,
        None => Ok(()),
    }
}

fn stats(run: &Run, sent: Instant, first: Option<Instant>, pt: u32, ct: u32) -> Stats {
    let end = Instant::now();
    let first = first.unwrap_or(end);
    Stats {
        total_ns: ns(run.t0.elapsed()),
        load_ns: ns(run.load),
        prompt_eval_count: pt,
        prompt_eval_ns: ns(first.saturating_duration_since(sent)),
        eval_count: ct,
        eval_ns: ns(end.saturating_duration_since(first)),
    }
}

/// Answers a request that has nothing to generate: the model is loaded (or unloaded, `keep_alive: 0`,
/// waiting until its worker stopped).
async fn load_only(mut run: Run, chat: bool) -> Res<Value> {
    let unload = run.keep == Some(KeepAlive::Unload);
    run.finish(200, None);
    if unload {
        run.st
            .manager
            .wait_stopped(&run.row.name, Duration::from_secs(30))
            .await;
    }
    Ok(tr::load_object(&run.shown, &now_rfc3339(), unload, chat))
}

/// `POST /api/chat`.
async fn chat(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Response> {
    let key = key_id(key)?;
    let req: OllamaChatRequest = parse(&body)?;
    let oa = tr::chat_request(&req)?;
    let stream = req.stream.unwrap_or(true);
    let run = Run::start(&st, &req.model, "/api/chat", key, req.keep_alive.as_ref()).await?;
    if req.messages.is_empty() {
        return Ok(Json(load_only(run, true).await?).into_response());
    }
    let mut run = run;
    let sent = Instant::now();
    let resp = match run.post("/v1/chat/completions", &oa).await {
        Ok(r) => r,
        Err(e) => return Err(run.fail(e).into()),
    };
    if !stream {
        return Ok(Json(chat_loop(run, resp, sent, None).await?).into_response());
    }
    let (model, endpoint) = (run.row.name.clone(), run.endpoint);
    Ok(streamed(&st, &model, endpoint, move |tx| async move {
        let last = chat_loop(run, resp, sent, Some(&tx)).await?;
        send(Some(&tx), &last).await
    }))
}

/// Folds the worker's chat stream; streams lines to `tx` when given; returns the final object.
async fn chat_loop(
    mut run: Run,
    resp: reqwest::Response,
    sent: Instant,
    tx: Option<&StreamTx>,
) -> Res<Value> {
    let mut acc = ChatAccumulator::new();
    let mut first = None;
    let shown = run.shown.clone();
    let mut sse = SseReader::new(&run, resp);
    let r: Res<()> = async {
        while let Some(d) = sse.next().await? {
            let step = acc.push(&parse_chat_chunk(&d)?);
            if step.content.is_empty() && step.reasoning.is_empty() {
                continue;
            }
            first.get_or_insert_with(Instant::now);
            let line = tr::chat_object(
                &shown,
                &now_rfc3339(),
                &step.content,
                &step.reasoning,
                &[],
                None,
            );
            send(tx, &line).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        return Err(run.fail(e));
    }
    let u = acc.usage.unwrap_or_default();
    let s = stats(&run, sent, first, u.prompt_tokens, u.completion_tokens);
    let ts = now_rfc3339();
    let last = if tx.is_some() {
        if !acc.tool_calls.is_empty() {
            send(
                tx,
                &tr::chat_object(&shown, &ts, "", "", &acc.tool_calls, None),
            )
            .await?;
        }
        tr::chat_object(&shown, &ts, "", "", &[], Some((acc.finish, &s)))
    } else {
        tr::chat_object(
            &shown,
            &ts,
            &acc.content,
            &acc.reasoning,
            &acc.tool_calls,
            Some((acc.finish, &s)),
        )
    };
    run.finish_ok(&u);
    Ok(last)
}

/// `POST /api/generate`.
async fn generate(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Response> {
    let key = key_id(key)?;
    let req: OllamaGenerateRequest = parse(&body)?;
    tr::check_generate(&req)?;
    // Validate options and format before loading anything.
    tr::completion_request(&req, Vec::new())?;
    let stream = req.stream.unwrap_or(true);
    let run = Run::start(
        &st,
        &req.model,
        "/api/generate",
        key,
        req.keep_alive.as_ref(),
    )
    .await?;
    let prompt = req.prompt.clone().unwrap_or_default();
    let context = req.context.clone().unwrap_or_default();
    if prompt.is_empty() && context.is_empty() {
        return Ok(Json(load_only(run, false).await?).into_response());
    }
    let mut run = run;
    let (resp, ids, sent) = match generate_start(&mut run, &req, prompt, context).await {
        Ok(x) => x,
        Err(e) => return Err(run.fail(e).into()),
    };
    if !stream {
        return Ok(Json(generate_loop(run, resp, sent, ids, None).await?).into_response());
    }
    let (model, endpoint) = (run.row.name.clone(), run.endpoint);
    Ok(streamed(&st, &model, endpoint, move |tx| async move {
        let last = generate_loop(run, resp, sent, ids, Some(&tx)).await?;
        send(Some(&tx), &last).await
    }))
}

/// Renders (unless `raw`) and tokenizes the prompt after the context, and starts the worker's stream.
async fn generate_start(
    run: &mut Run,
    req: &OllamaGenerateRequest,
    prompt: String,
    context: Vec<u32>,
) -> Res<(reqwest::Response, Vec<u32>, Instant)> {
    let text = if req.raw.unwrap_or(false) {
        prompt
    } else {
        let v = run
            .post_json(
                "/apply-template",
                &json!({"messages": tr::generate_messages(req)?}),
            )
            .await?;
        v["prompt"]
            .as_str()
            .ok_or_else(|| Failure::bad_gateway("bad /apply-template answer"))?
            .to_owned()
    };
    let mut ids = context;
    let fresh = ids.is_empty();
    ids.extend(run.tokenize(&text, fresh, true).await?);
    let oa = tr::completion_request(req, ids.clone())?;
    let sent = Instant::now();
    let resp = run.post("/v1/completions", &oa).await?;
    Ok((resp, ids, sent))
}

async fn generate_loop(
    mut run: Run,
    resp: reqwest::Response,
    sent: Instant,
    mut ids: Vec<u32>,
    tx: Option<&StreamTx>,
) -> Res<Value> {
    let mut text = String::new();
    let mut finish: Option<FinishReason> = None;
    let mut usage = None;
    let mut first = None;
    let shown = run.shown.clone();
    let mut sse = SseReader::new(&run, resp);
    let r: Res<()> = async {
        while let Some(d) = sse.next().await? {
            let v: Value = serde_json::from_str(&d)
                .map_err(|e| Failure::bad_gateway(format!("bad event from the worker: {e}")))?;
            if let Some(m) = error_message(&v) {
                return Err(Failure::bad_gateway(m));
            }
            let c: Completion = serde_json::from_value(v)
                .map_err(|e| Failure::bad_gateway(format!("bad event from the worker: {e}")))?;
            if let Some(u) = c.usage {
                usage = Some(u);
            }
            for ch in c.choices.iter().filter(|c| c.index == 0) {
                if ch.finish_reason.is_some() {
                    finish = ch.finish_reason;
                }
                if !ch.text.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    text.push_str(&ch.text);
                    send(
                        tx,
                        &tr::generate_object(&shown, &now_rfc3339(), &ch.text, None),
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = r {
        return Err(run.fail(e));
    }
    match run.tokenize(&text, false, false).await {
        Ok(t) => ids.extend(t),
        Err(e) => return Err(run.fail(e)),
    }
    let u = usage.unwrap_or_default();
    let s = stats(&run, sent, first, u.prompt_tokens, u.completion_tokens);
    let shown_text = if tx.is_some() { "" } else { text.as_str() };
    let last = tr::generate_object(&shown, &now_rfc3339(), shown_text, Some((finish, &s, &ids)));
    run.finish_ok(&u);
    Ok(last)
}

/// Embeddings of `inputs` from the worker.
async fn embed_texts(run: &mut Run, inputs: Vec<String>) -> Res<(Vec<Vec<f32>>, u32)> {
    let v = run
        .post_json(
            "/v1/embeddings",
            &json!({"model": run.row.name, "input": inputs}),
        )
        .await?;
    let r: EmbeddingResponse = serde_json::from_value(v)
        .map_err(|e| Failure::bad_gateway(format!("bad /v1/embeddings answer: {e}")))?;
    let mut data = r.data;
    data.sort_by_key(|d| d.index);
    let vecs = data
        .into_iter()
        .map(|d| match d.embedding {
            EmbeddingVector::Float(v) => Ok(v),
            EmbeddingVector::Base64(_) => Err(Failure::bad_gateway("unexpected base64 vector")),
        })
        .collect::<Res<Vec<_>>>()?;
    Ok((vecs, r.usage.prompt_tokens))
}

/// `POST /api/embed`.
async fn embed(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Json<Value>> {
    let key = key_id(key)?;
    let req: OllamaEmbedRequest = parse(&body)?;
    let inputs = match req.input.clone() {
        tr::EmbedInput::One(s) => vec![s],
        tr::EmbedInput::Many(v) => v,
    };
    let mut run = Run::start(&st, &req.model, "/api/embed", key, req.keep_alive.as_ref()).await?;
    if inputs.is_empty() {
        let shown = run.shown.clone();
        run.finish(200, None);
        return Ok(Json(json!({"model": shown, "embeddings": []})));
    }
    let (mut vecs, pt) = embed_texts(&mut run, inputs).await?;
    if let Some(d) = req.dimensions {
        tr::truncate_dims(&mut vecs, d)?;
    }
    let total = ns(run.t0.elapsed());
    let load = ns(run.load);
    let shown = run.shown.clone();
    run.finish(200, Some((Some(i64::from(pt)), None)));
    Ok(Json(json!({
        "model": shown, "embeddings": vecs, "total_duration": total, "load_duration": load,
        "prompt_eval_count": pt,
    })))
}

/// `POST /api/embeddings` (the older endpoint: one prompt, one vector).
async fn embeddings(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Json<Value>> {
    let key = key_id(key)?;
    let req: OllamaEmbeddingsRequest = parse(&body)?;
    let mut run = Run::start(
        &st,
        &req.model,
        "/api/embeddings",
        key,
        req.keep_alive.as_ref(),
    )
    .await?;
    if req.prompt.is_empty() {
        run.finish(200, None);
        return Ok(Json(json!({"embedding": []})));
    }
    let (mut vecs, pt) = embed_texts(&mut run, vec![req.prompt]).await?;
    run.finish(200, Some((Some(i64::from(pt)), None)));
    Ok(Json(json!({"embedding": vecs.pop().unwrap_or_default()})))
}

/// `GET /api/version`.
async fn version() -> Json<Value> {
    Json(json!({"version": API_VERSION}))
}

/// SHA-256 of a model's file, computed once (off the runtime, one file at a time) and kept in the
/// catalogue.
async fn digest(st: &AppState, m: &ModelRow) -> Option<String> {
    static HASHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    if let Some(s) = &m.sha256 {
        return Some(s.clone());
    }
    let _g = HASHING.lock().await;
    if let Ok(Some(fresh)) = st.db.get_model(&m.name).await
        && let Some(s) = fresh.sha256
    {
        return Some(s);
    }
    let path = m.file_path.clone();
    let sha = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    })
    .await
    .ok()?
    .ok()?;
    if let Err(e) = st
        .db
        .set_model_source(
            &m.name,
            Some(&sha),
            m.hf_repo_id.as_deref(),
            m.hf_filename.as_deref(),
        )
        .await
    {
        tracing::warn!("{e}");
    }
    Some(sha)
}

fn details(m: &ModelRow) -> Value {
    tr::details(
        m.architecture.as_deref(),
        m.parameters,
        m.quantization.as_deref(),
    )
}

/// Every usable catalogue model with its names (its own, then its aliases).
async fn named_models(st: &AppState) -> Res<Vec<(String, ModelRow)>> {
    let rows: Vec<ModelRow> = st
        .db
        .list_models()
        .await?
        .into_iter()
        .filter(|m| m.enabled && m.unsupported_reason.is_none())
        .collect();
    let aliases = st.db.list_aliases().await?;
    let mut out = Vec::new();
    for m in rows {
        for (a, _) in aliases.iter().filter(|(_, id)| *id == m.id) {
            out.push((a.clone(), m.clone()));
        }
        out.push((m.name.clone(), m));
    }
    Ok(out)
}

/// `GET /api/tags`: the catalogue.
async fn tags(State(st): State<AppState>, key: Result<ApiKey, ApiError>) -> Api<Json<Value>> {
    key_id(key)?;
    let mut models = Vec::new();
    for (name, m) in named_models(&st).await? {
        let d = digest(&st, &m).await.unwrap_or_default();
        models.push(json!({
            "name": name, "model": name, "modified_at": ms_rfc3339(m.updated_at),
            "size": m.size_bytes, "digest": d, "details": details(&m),
        }));
    }
    Ok(Json(json!({"models": models})))
}

/// `GET /api/ps`: the models with a worker, their memory and when they will be unloaded.
async fn ps(State(st): State<AppState>, key: Result<ApiKey, ApiError>) -> Api<Json<Value>> {
    key_id(key)?;
    let mut models = Vec::new();
    let views = st.manager.views();
    for (name, m) in named_models(&st).await? {
        let Some(v) = views.iter().find(|v| {
            v.model == m.name && matches!(v.state, ModelState::Ready | ModelState::Draining)
        }) else {
            continue;
        };
        let now = time::OffsetDateTime::now_utc();
        let expires = match st.manager.expires_in(&m.name) {
            Some(d) => now + d,
            // Never: Ollama writes a date far in the future.
            None => now + time::Duration::days(365 * 100),
        };
        let host = if v.rss_bytes > 0 {
            v.rss_bytes
        } else {
            st.manager.estimate(&m)
        };
        // The part on a GPU of its own memory, as the worker reported it (Ollama's `size_vram`; `size`
        // is the whole).
        let vram = v
            .backend
            .as_ref()
            .filter(|b| b.has_device_memory())
            .map_or(0, |b| b.device_weight_bytes);
        let size = host.saturating_add(vram);
        let (ctx, _, _) = st.manager.worker_params(&m);
        models.push(json!({
            "name": name, "model": name, "size": size, "digest": digest(&st, &m).await.unwrap_or_default(),
            "details": details(&m), "expires_at": rfc3339(expires), "size_vram": vram,
            "context_length": ctx,
        }));
    }
    Ok(Json(json!({"models": models})))
}

/// The GGUF metadata as `model_info` (arrays only with `verbose`, as Ollama), the chat template, and
/// whether the template knows tools.
fn gguf_info(path: &str, verbose: bool) -> Result<(Value, String), String> {
    let f = crate::engine::gguf::GgufFile::open(path).map_err(|e| e.to_string())?;
    let mut info = serde_json::Map::new();
    for (k, v) in f.metadata() {
        if k == "tokenizer.chat_template" {
            continue;
        }
        let j = match v {
            crate::engine::gguf::Value::Array(_) if !verbose => Value::Null,
            v => v.to_json(),
        };
        info.insert(k.clone(), j);
    }
    info.insert("general.parameter_count".into(), json!(f.parameter_count()));
    let template = f
        .get("tokenizer.chat_template")
        .and_then(|v| match v {
            crate::engine::gguf::Value::String(s) => Some(s.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    Ok((Value::Object(info), template))
}

/// `POST /api/show`.
async fn show(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Json<Value>> {
    key_id(key)?;
    let req: OllamaModelRef = parse(&body)?;
    let m = find_model(&st, &req.model)
        .await?
        .ok_or_else(|| Failure::not_found(&req.model))?;
    let path = m.file_path.clone();
    let verbose = req.verbose.unwrap_or(false);
    let (info, template) = tokio::task::spawn_blocking(move || gguf_info(&path, verbose))
        .await
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", m.file_path),
            )
        })?;
    let (ctx, _, _) = st.manager.worker_params(&m);
    let values = st.db.model_settings(&m.name).await?.unwrap_or_default();
    let (defaults, system) =
        super::settings::ollama_parameters(&super::settings::request_defaults(&values));
    let mut params: Vec<(&str, String)> = vec![("num_ctx", ctx.to_string())];
    params.extend(defaults);
    let parameters = tr::modelfile_parameters(&params);
    let mut caps = vec![];
    if m.embedding {
        caps.push("embedding");
    } else {
        caps.push("completion");
        if template.contains("tools") {
            caps.push("tools");
        }
    }
    let modelfile = format!(
        "# Modelfile of {} (cyber-inference)\nFROM {}\nTEMPLATE \"\"\"{}\"\"\"\n{}\n",
        m.name,
        m.file_path,
        template,
        params
            .iter()
            .map(|(k, v)| format!("PARAMETER {k} {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let modelfile = match &system {
        Some(sys) => format!("{modelfile}SYSTEM \"\"\"{sys}\"\"\"\n"),
        None => modelfile,
    };
    Ok(Json(json!({
        "modelfile": modelfile, "parameters": parameters, "template": template, "license": "",
        "system": system,
        "details": details(&m), "model_info": info, "capabilities": caps,
        "modified_at": ms_rfc3339(m.updated_at),
    })))
}

/// `POST /api/copy`: `destination` becomes another name of `source`'s model.
async fn copy(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<StatusCode> {
    key_id(key)?;
    let req: OllamaCopyRequest = parse(&body)?;
    let m = find_model(&st, &req.source)
        .await?
        .ok_or_else(|| Failure::not_found(&req.source))?;
    let dest = tr::strip_latest(req.destination.trim());
    if dest.is_empty() || dest.len() > 300 || dest.chars().any(char::is_control) {
        return Err(Failure::bad(format!("invalid destination name {:?}", req.destination)).into());
    }
    if st.db.get_model(dest).await?.is_some() {
        return Err(Failure::bad(format!(
            "destination '{dest}' is the name of a model file in the catalogue; choose another name"
        ))
        .into());
    }
    st.db.set_alias(dest, m.id).await?;
    Ok(StatusCode::OK)
}

/// `DELETE /api/delete`: an alias is removed (and the model with it when the alias is the name it was
/// pulled as and no other alias remains); a catalogue name unloads the model and deletes its files
/// (only inside MODELS_DIR) and its row.
async fn delete_model(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<StatusCode> {
    key_id(key)?;
    let req: OllamaModelRef = parse(&body)?;
    let n = tr::strip_latest(&req.model);
    let alias_of = match st.db.resolve_alias(&req.model).await? {
        Some(r) => Some((req.model.as_str(), r)),
        None => st.db.resolve_alias(n).await?.map(|r| (n, r)),
    };
    let target = match alias_of {
        Some((alias, real)) => {
            st.db.delete_alias(alias).await?;
            let m = st.db.get_model(&real).await?;
            let pulled_as = m
                .as_ref()
                .and_then(|m| m.hf_repo_id.as_ref())
                .is_some_and(|r| {
                    tr::parse_hf_name(alias).is_ok_and(|h| h.repo_id.eq_ignore_ascii_case(r))
                });
            let others = match &m {
                Some(m) => st
                    .db
                    .list_aliases()
                    .await?
                    .iter()
                    .any(|(_, id)| *id == m.id),
                None => true,
            };
            if !pulled_as || others {
                return Ok(StatusCode::OK);
            }
            real
        }
        None => {
            if st.db.get_model(n).await?.is_none() {
                return Err(Failure::not_found(&req.model).into());
            }
            n.to_owned()
        }
    };
    let Some(m) = st.db.get_model(&target).await? else {
        return Ok(StatusCode::OK);
    };
    st.manager.unload(&target, "deleted through /api/delete");
    if !st
        .manager
        .wait_stopped(
            &target,
            Duration::from_secs(super::process::STOP_GRACE_SECS + 5),
        )
        .await
    {
        return Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model '{target}' is still running requests; try again"),
        )
        .into());
    }
    let path = std::path::PathBuf::from(&m.file_path);
    let models_dir = st.models_dir.clone();
    tokio::task::spawn_blocking(move || super::catalog::delete_model_files(&path, &models_dir))
        .await
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    st.db.delete_model(&target).await?;
    Ok(StatusCode::OK)
}

/// The repo file a pull name means: the model whose quantization is the tag, else the hub's choice.
async fn pull_request(st: &AppState, name: &tr::HfName) -> Res<DownloadRequest> {
    let Some(q) = &name.quant else {
        return Ok(DownloadRequest {
            repo_id: name.repo_id.clone(),
            revision: None,
            filename: None,
        });
    };
    let files = st.downloads.hub().list_files(&name.repo_id, None).await?;
    let models = super::hub::group_models(&files);
    let found = models
        .iter()
        .filter(|m| !m.is_projector)
        .find(|m| {
            m.quantization
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(q))
        })
        .ok_or_else(|| {
            let have: Vec<&str> = models
                .iter()
                .filter_map(|m| m.quantization.as_deref())
                .collect();
            Failure::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no {q} GGUF in hf.co/{}; its quantizations: {}",
                    name.repo_id,
                    if have.is_empty() {
                        "(none)".into()
                    } else {
                        have.join(", ")
                    }
                ),
            )
        })?;
    Ok(DownloadRequest {
        repo_id: name.repo_id.clone(),
        revision: None,
        filename: Some(found.filename.clone()),
    })
}

/// `POST /api/pull`: a Hugging Face GGUF through the supervisor's downloads (resume, SHA-256 check,
/// registration), progress streamed as Ollama does (`pulling manifest`, `pulling …` with `total` and
/// `completed`, `verifying sha256 digest`, `writing manifest`, `success`). The model is then known by
/// the name it was pulled as.
async fn pull(
    State(st): State<AppState>,
    key: Result<ApiKey, ApiError>,
    body: Bytes,
) -> Api<Response> {
    key_id(key)?;
    let req: OllamaPullRequest = parse(&body)?;
    let hf = tr::parse_hf_name(&req.model)?;
    let stream = req.stream.unwrap_or(true);
    let dl = pull_request(&st, &hf).await?;
    let info = st.downloads.start(dl).await?;
    let alias = tr::strip_latest(&req.model).to_owned();
    if !stream {
        pull_loop(st, info.id, alias, None).await?;
        return Ok(Json(json!({"status": "success"})).into_response());
    }
    let shown = req.model.clone();
    Ok(streamed(
        &st.clone(),
        &shown,
        "/api/pull",
        move |tx| async move {
            send(Some(&tx), &json!({"status": "pulling manifest"})).await?;
            pull_loop(st, info.id, alias, Some(&tx)).await?;
            send(Some(&tx), &json!({"status": "success"})).await
        },
    ))
}

async fn pull_loop(st: AppState, id: u64, alias: String, tx: Option<&StreamTx>) -> Res<()> {
    let mut verifying_sent = false;
    loop {
        let Some(i) = st.downloads.get(id) else {
            return Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the download was forgotten",
            ));
        };
        match i.state {
            DownloadState::Queued | DownloadState::Downloading => {
                send(
                    tx,
                    &json!({"status": format!("pulling {}", i.file), "digest": i.file,
                            "total": i.total, "completed": i.downloaded}),
                )
                .await?;
            }
            DownloadState::Verifying => {
                if !verifying_sent {
                    send(tx, &json!({"status": "verifying sha256 digest"})).await?;
                    verifying_sent = true;
                }
            }
            DownloadState::Done => {
                send(
                    tx,
                    &json!({"status": format!("pulling {}", i.file), "digest": i.file,
                            "total": i.total, "completed": i.total}),
                )
                .await?;
                if !verifying_sent {
                    send(tx, &json!({"status": "verifying sha256 digest"})).await?;
                }
                send(tx, &json!({"status": "writing manifest"})).await?;
                let name = i.model.unwrap_or_default();
                if let Some(m) = st.db.get_model(&name).await?
                    && alias != m.name
                {
                    st.db.set_alias(&alias, m.id).await?;
                }
                return Ok(());
            }
            DownloadState::Failed => {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    i.error.unwrap_or_else(|| "the download failed".into()),
                ));
            }
            DownloadState::Cancelled => {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    "the download was cancelled",
                ));
            }
        }
        tokio::time::sleep(PULL_POLL).await;
    }
}

/// `HEAD /` and `GET /api/...` fallbacks are the UI's; these are Ollama's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/pull", post(pull))
        .route("/api/delete", delete(delete_model))
        .route("/api/copy", post(copy))
        .layer(DefaultBodyLimit::max(crate::http_server::MAX_BODY_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_ollamas_envelope() {
        let r = OllamaError(Failure::not_found("nope")).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let e: OllamaError = ApiError::invalid_api_key("an API key is required").into();
        assert_eq!(e.0.status, StatusCode::UNAUTHORIZED);
        let e: OllamaError = TranslateError("bad format".into()).into();
        assert_eq!(e.0.status, StatusCode::BAD_REQUEST);
        assert!(ms_rfc3339(1_700_000_000_123).starts_with("2023-11-14T22:13:20.123"));
    }
}
