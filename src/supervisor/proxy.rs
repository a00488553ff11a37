//! The OpenAI proxy: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` are routed by the
//! body's `model` to that model's worker (loaded on demand), the body is forwarded untouched (given the
//! model's per-request defaults when it has any, `settings::with_request_defaults`) and the response
//! streamed back chunk by chunk; `GET /v1/models` lists the catalogue with each model's status.
//! Usage is read from the tail of the response (the last SSE chunk or the JSON body) without buffering.

use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;

use super::AppState;
use super::auth::ApiKey;
use super::db::{RequestRow, now_ms};
use super::error::ApiError;
use super::process::{Lease, LoadError};
use super::settings::{request_defaults, with_request_defaults};

/// Bytes of the response tail kept to find `usage`.
const TAIL: usize = 16 * 1024;
/// Longest model name looked up (bytes); a longer one is unknown without a database query.
pub const MAX_MODEL_NAME: usize = 256;
/// The one label requests for a model that is not in the catalogue (or whose name is over
/// [`MAX_MODEL_NAME`]) are counted under in `/metrics` and the request log: names a client made up are
/// never stored, so neither can grow with them.
pub const UNKNOWN_MODEL: &str = "(unknown)";

/// At most `max` bytes of `s` (cut at a character boundary), with `…` when cut: for echoing a
/// client's string in an error message.
fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

#[derive(Deserialize)]
struct ModelField<'a> {
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
}

/// Maps a load failure to its HTTP answer (404 unknown, 403 disabled, 400 a file the engine cannot run,
/// 503 cannot fit / failed to load).
pub fn load_error(e: LoadError) -> ApiError {
    let msg = e.to_string();
    match e {
        LoadError::NotFound(_) => ApiError {
            code: Some("model_not_found"),
            param: Some("model"),
            ..ApiError::not_found(msg)
        },
        LoadError::Disabled(_) => ApiError::forbidden(msg),
        LoadError::Unsupported { .. } => ApiError {
            code: Some("model_not_supported"),
            param: Some("model"),
            ..ApiError::bad_request(msg)
        },
        LoadError::InsufficientMemory { .. } => ApiError::unavailable("insufficient_memory", msg),
        LoadError::InsufficientDeviceMemory { .. } => {
            ApiError::unavailable("insufficient_device_memory", msg)
        }
        LoadError::TooManyLoaded { .. } => ApiError::unavailable("model_capacity", msg),
        LoadError::Failed { .. } | LoadError::Backoff { .. } => {
            ApiError::unavailable("model_load_failed", msg)
        }
        LoadError::Draining { retry_s, .. } => {
            ApiError::unavailable("model_unloading", msg).retry_after(retry_s)
        }
        LoadError::ShuttingDown => ApiError::unavailable("shutting_down", msg),
        LoadError::Db(_) => ApiError::internal(msg),
        LoadError::DatabaseBusy { .. } => {
            ApiError::unavailable("database_busy", msg).retry_after(super::error::DB_BUSY_RETRY_S)
        }
    }
}

async fn proxy(
    State(st): State<AppState>,
    ApiKey(key_id): ApiKey,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let endpoint = uri.path().to_owned();
    let mut model = match serde_json::from_slice::<ModelField>(&body) {
        Ok(m) => m.model.into_owned(),
        Err(e) => {
            return Err(ApiError {
                param: Some("model"),
                ..ApiError::bad_request(format!(
                    "the body must be a JSON object with a string `model`: {e}"
                ))
            });
        }
    };
    // Another name of a model (Ollama's /api/copy, a pulled hf.co/… name) stands for it.
    if model.len() <= MAX_MODEL_NAME
        && st.db.get_model(&model).await?.is_none()
        && let Some(real) = st.db.resolve_alias(&model).await?
    {
        model = real;
    }
    let row = if model.len() <= MAX_MODEL_NAME {
        st.db.get_model(&model).await?
    } else {
        None
    };
    let Some(row) = row else {
        let names: Vec<String> = st
            .db
            .list_models()
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        let e = ApiError {
            code: Some("model_not_found"),
            param: Some("model"),
            ..ApiError::not_found(format!(
                "model `{}` not found; available models: {}",
                clip(&model, 64),
                if names.is_empty() {
                    "(none)".into()
                } else {
                    names.join(", ")
                }
            ))
        };
        st.log_request(UNKNOWN_MODEL, &endpoint, 404, None, t0, key_id);
        return Err(e);
    };
    // The model's per-request defaults (untouched bytes when it has none).
    let values = st.db.model_settings(&row.name).await?.unwrap_or_default();
    let body = with_request_defaults(&request_defaults(&values), &endpoint, body);
    let lease = match st.manager.acquire(&model).await {
        Ok(l) => l,
        Err(e) => {
            let e = load_error(e);
            st.log_request(&model, &endpoint, e.status.as_u16(), None, t0, key_id);
            return Err(e);
        }
    };
    let send = send_to_worker(&st, &model, lease, |lease| {
        let mut req = st
            .proxy_http
            .post(format!("http://127.0.0.1:{}{endpoint}", lease.port))
            .bearer_auth(&*lease.key)
            .body(body.clone());
        for h in [header::CONTENT_TYPE, header::ACCEPT] {
            if let Some(v) = headers.get(&h) {
                req = req.header(h, v);
            }
        }
        req
    })
    .await;
    let (lease, upstream) = match send {
        Ok(ok) => ok,
        Err(e) => {
            let e = e.into_api_error(&model);
            st.log_request(&model, &endpoint, e.status.as_u16(), None, t0, key_id);
            return Err(e);
        }
    };
    if !lease.cold {
        st.metrics.observe_latency(t0.elapsed().as_secs_f64());
    }
    let status = upstream.status();
    let mut resp = Response::builder().status(status.as_u16());
    // Retry-After: the worker's 503 when its queue is full says when to come back.
    for h in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(v) = upstream.headers().get(&h) {
            resp = resp.header(h, v);
        }
    }
    let sse = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse {
        resp = resp.header("x-accel-buffering", HeaderValue::from_static("no"));
    }
    let log = (st.clone(), model, endpoint, t0, key_id);
    let body = relay(upstream, sse, status.as_u16(), log, lease);
    resp.body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Why [`send_to_worker`] got no answer.
pub enum SendError {
    /// The model could not be loaded again for the retry.
    Load(LoadError),
    /// The worker did not answer (and was not found gone, or the retry failed too).
    Http(reqwest::Error),
}

impl SendError {
    /// The client's error: the load error's own status, else 502 `worker_failed`.
    pub fn into_api_error(self, model: &str) -> ApiError {
        match self {
            SendError::Load(e) => load_error(e),
            SendError::Http(e) => ApiError::bad_gateway(format!(
                "the worker of `{model}` failed during the request: {e}"
            )),
        }
    }
}

/// How long a request that got no answer waits to learn whether its worker is gone.
const GONE_WAIT: Duration = Duration::from_secs(2);

/// Sends the request `build` makes for `lease`'s worker and returns the answer's head with the lease.
///
/// A worker that died a moment ago may hold a lease handed out just before its death: a request
/// refused at connect (it never reached a process) waits up to [`GONE_WAIT`] for the manager to cut
/// the lease (the worker's end), then goes once to a fresh worker (`model` loaded again); nothing has
/// reached the client, so the retry is invisible to it. A request the worker took and then died on is
/// not sent again (502): it may be what killed the worker. Every worker-bound request (OpenAI proxy,
/// Ollama, Anthropic, Responses) goes through here.
pub async fn send_to_worker(
    st: &AppState,
    model: &str,
    mut lease: Lease,
    build: impl Fn(&Lease) -> reqwest::RequestBuilder,
) -> Result<(Lease, reqwest::Response), SendError> {
    let mut retried = false;
    loop {
        match build(&lease).send().await {
            Ok(r) => return Ok((lease, r)),
            Err(e) => {
                tracing::warn!(
                    model,
                    port = lease.port,
                    connect = e.is_connect(),
                    retried,
                    "no answer from the worker: {}",
                    error_chain(&e)
                );
                if !e.is_connect() {
                    // Connected, then reset or closed: it may be dying; no new request goes to it
                    // until it is known to be alive or gone.
                    lease.transport_failed();
                }
                if retried || !e.is_connect() {
                    return Err(SendError::Http(e));
                }
                let mut cut = lease.cut.clone();
                let gone = tokio::time::timeout(GONE_WAIT, cut.wait_for(|c| c.is_some()))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !gone {
                    return Err(SendError::Http(e));
                }
                retried = true;
                drop(lease);
                tracing::info!(model, "worker gone before answering ({e}); sending again");
                lease = st.manager.acquire(model).await.map_err(SendError::Load)?;
            }
        }
    }
}

/// `e` with its sources, outermost first, joined by `: ` (reqwest's Display shows only the outermost).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

type LogCtx = (AppState, String, String, Instant, Option<i64>);

/// Longest the proxy waits for a client to take the next chunk of a response (it stopped reading)
/// before it gives up on it: the setting `idle_write_timeout` (`CYBER_INFERENCE_IDLE_WRITE_TIMEOUT`,
/// seconds, default 60, read when the response starts). The request is then logged as 499 with the
/// reason, the worker connection is closed and the worker's slot released, so neither an unload nor
/// the worker's other clients are held up by such a client.
pub(super) fn idle_write_timeout(st: &AppState) -> Duration {
    Duration::from_secs(st.settings().idle_write_timeout.max(1))
}

/// Why a chunk of a response did not reach the client's side of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stalled {
    /// The client went away (the body was dropped).
    Closed,
    /// The client took nothing for the idle-write timeout (it stopped reading); logged once here.
    IdleWrite,
}

/// Sends `item` into a response body's bounded channel, waiting at most `idle` for room (the one rule
/// of [`idle_write_timeout`], shared by the OpenAI proxy and the Ollama, Anthropic and Responses
/// streams). A stall is logged with the model and endpoint; the caller then drops the request.
pub(super) async fn send_within<T>(
    tx: &tokio::sync::mpsc::Sender<T>,
    item: T,
    idle: Duration,
    model: &str,
    endpoint: &str,
) -> Result<(), Stalled> {
    match tokio::time::timeout(idle, tx.send(item)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Stalled::Closed),
        Err(_) => {
            tracing::warn!(
                model = %model,
                endpoint = %endpoint,
                "the client took no data for {} s (IDLE_WRITE_TIMEOUT); the request is dropped and its worker slot freed",
                idle.as_secs()
            );
            Err(Stalled::IdleWrite)
        }
    }
}
/// Chunks buffered between the worker and a slow client.
const RELAY_CHUNKS: usize = 16;

/// The response body: a task passes upstream chunks through a bounded channel as they come, keeps the
/// last [`TAIL`] bytes to read `usage` at the end, and holds the in-flight lease until the body ends,
/// the client goes away or stops reading for the idle-write timeout ([`idle_write_timeout`]), or the
/// supervisor cuts the request
/// (drain deadline, worker gone: an SSE stream then gets an error event). Dropping the upstream response
/// closes the worker connection. The request is logged once.
fn relay(upstream: reqwest::Response, sse: bool, status: u16, log: LogCtx, lease: Lease) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(RELAY_CHUNKS);
    tokio::spawn(pump(
        Box::pin(upstream.bytes_stream()),
        tx,
        sse,
        status,
        log,
        lease,
    ));
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Waits until the lease's request is cut; returns the reason.
async fn cut_reason(rx: &mut tokio::sync::watch::Receiver<Option<String>>) -> String {
    let reason = rx
        .wait_for(|c| c.is_some())
        .await
        .map(|r| r.clone().unwrap_or_default());
    match reason {
        Ok(r) => r,
        Err(_) => std::future::pending().await,
    }
}

/// Ends a response early with `err`: in-band as an SSE error event (the headers are gone already), else
/// by aborting the body. Never waits for a client that is not reading.
fn end_with(
    tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    sse: bool,
    err: ApiError,
) {
    let item = if sse {
        Ok(Bytes::from(format!("data: {}\n\n", err.body())))
    } else {
        Err(std::io::Error::other(err.message))
    };
    let _ = tx.try_send(item);
}

async fn pump(
    mut upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    sse: bool,
    status: u16,
    log: LogCtx,
    lease: Lease,
) {
    let mut tail: Vec<u8> = Vec::new();
    let mut cut = lease.cut.clone();
    let idle = idle_write_timeout(&log.0);
    let end: u16 = loop {
        let next = tokio::select! {
            n = upstream.next() => n,
            why = cut_reason(&mut cut) => {
                end_with(&tx, sse, ApiError::unavailable("request_cut", why));
                break 503;
            }
            _ = tx.closed() => break 499,
        };
        match next {
            Some(Ok(b)) => {
                tail.extend_from_slice(&b);
                if tail.len() > TAIL {
                    let cut = tail.len() - TAIL;
                    tail.drain(..cut);
                }
                tokio::select! {
                    r = send_within(&tx, Ok(b), idle, &log.1, &log.2) => if r.is_err() {
                        break 499;
                    },
                    why = cut_reason(&mut cut) => {
                        end_with(&tx, sse, ApiError::unavailable("request_cut", why));
                        break 503;
                    }
                }
            }
            Some(Err(e)) => {
                // Before the client hears of it, so that its next request waits for the verdict.
                lease.transport_failed();
                let err = ApiError::bad_gateway(format!("the worker failed mid-stream: {e}"));
                end_with(&tx, sse, err);
                break 502;
            }
            None => break status,
        }
    };
    drop(upstream);
    drop(lease);
    let (st, model, endpoint, t0, key) = log;
    st.log_request(&model, &endpoint, end, find_usage(&tail), t0, key);
}

/// (prompt_tokens, completion_tokens) of the last `"usage": {…}` object in `tail`, if complete.
pub fn find_usage(tail: &[u8]) -> Option<(Option<i64>, Option<i64>)> {
    let key = b"\"usage\"";
    let mut search = tail;
    while let Some(pos) = search.windows(key.len()).rposition(|w| w == key) {
        let after = &search[pos + key.len()..];
        let colon = after.iter().position(|&c| !c.is_ascii_whitespace());
        if let Some(i) = colon
            && after[i] == b':'
        {
            let mut it = serde_json::Deserializer::from_slice(&after[i + 1..])
                .into_iter::<serde_json::Value>();
            if let Some(Ok(v)) = it.next()
                && v.is_object()
            {
                return Some((
                    v.get("prompt_tokens").and_then(|x| x.as_i64()),
                    v.get("completion_tokens").and_then(|x| x.as_i64()),
                ));
            }
        }
        search = &search[..pos];
    }
    None
}

impl AppState {
    /// Counts a finished proxied request in the metrics and writes it to `requests` (in the background).
    pub fn log_request(
        &self,
        model: &str,
        endpoint: &str,
        status: u16,
        usage: Option<(Option<i64>, Option<i64>)>,
        t0: Instant,
        api_key_id: Option<i64>,
    ) {
        self.metrics.request(model, status);
        let (pt, ct) = usage.unwrap_or((None, None));
        let row = RequestRow {
            model: model.to_owned(),
            endpoint: endpoint.to_owned(),
            status: i64::from(status),
            prompt_tokens: pt,
            completion_tokens: ct,
            duration_ms: t0.elapsed().as_millis() as i64,
            api_key_id,
            created_at: now_ms(),
        };
        let db = self.db.clone();
        let ok = status < 400;
        tokio::spawn(async move {
            if let Err(e) = db.insert_request(&row).await {
                tracing::warn!("{e}");
            }
            if ok && let Err(e) = db.touch_model(&row.model).await {
                tracing::warn!("{e}");
            }
        });
    }
}

/// `GET /v1/models`: the catalogue's enabled models that the engine can run, in OpenAI's list shape, each
/// with `status` (`stopped|loading|ready|draining|failed`) and `loaded`. Files it cannot run are listed
/// with their reason on the admin pages only.
async fn list_models(
    State(st): State<AppState>,
    _k: ApiKey,
) -> Result<Json<serde_json::Value>, ApiError> {
    let data: Vec<serde_json::Value> = st
        .db
        .list_models()
        .await?
        .into_iter()
        .filter(|m| m.enabled && m.unsupported_reason.is_none())
        .map(|m| model_json(&st, &m))
        .collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})))
}

fn model_json(st: &AppState, m: &super::db::ModelRow) -> serde_json::Value {
    let state = st.manager.state_of(&m.name);
    serde_json::json!({
        "id": m.name, "object": "model", "created": m.created_at / 1000, "owned_by": "cyber-inference",
        "status": state, "loaded": state == super::process::ModelState::Ready,
        "architecture": m.architecture, "quantization": m.quantization,
        "context_length": m.context_length, "size_bytes": m.size_bytes,
        "embedding": m.embedding,
    })
}

/// `GET /v1/models/{id}`.
async fn get_model(
    State(st): State<AppState>,
    _k: ApiKey,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match st.db.get_model(&id).await? {
        Some(m) => Ok(Json(model_json(&st, &m))),
        None => Err(ApiError {
            code: Some("model_not_found"),
            ..ApiError::not_found(format!("model `{id}` not found"))
        }),
    }
}

/// The `/v1` routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/embeddings", post(proxy))
        .route("/v1/rerank", post(proxy))
        .route("/v1/reranking", post(proxy))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .layer(DefaultBodyLimit::max(crate::http_server::MAX_BODY_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn usage_from_sse_tail_and_json_body() {
        let sse = b"data: {\"choices\":[]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\ndata: [DONE]\n\n";
        assert_eq!(find_usage(sse), Some((Some(7), Some(3))));
        let json = br#"{"id":"x","usage": {"prompt_tokens": 5, "total_tokens": 5}, "data":[]}"#;
        assert_eq!(find_usage(json), Some((Some(5), None)));
        // A cut-off usage (tail started mid-object) and a `usage` inside a string are skipped.
        assert_eq!(find_usage(b"\"usage\":{\"prompt_tok"), None);
        assert_eq!(find_usage(br#"{"text":"the \"usage\" word"}"#), None);
        assert_eq!(find_usage(b""), None);
    }

    #[test]
    fn long_names_are_clipped_for_messages() {
        assert_eq!(clip("short", 64), "short");
        let long = "é".repeat(100);
        let c = clip(&long, 63);
        assert!(c.len() <= 63 + "…".len() && c.ends_with('…'), "{c}");
    }

    #[test]
    fn load_errors_map_to_statuses() {
        assert_eq!(
            load_error(LoadError::NotFound("a".into())).status,
            StatusCode::NOT_FOUND
        );
        let e = load_error(LoadError::InsufficientMemory {
            model: "a".into(),
            need_mib: 100,
            used_mib: 900,
            total_mib: 1000,
            limit_mib: 10,
            percent: 1,
        });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("100 MiB") && e.message.contains("MAX_MEMORY_PERCENT=1%"));
    }
}
