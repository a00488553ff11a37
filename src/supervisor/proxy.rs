//! The OpenAI proxy: `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` are routed by the
//! body's `model` to that model's worker (loaded on demand), the body is forwarded untouched and the
//! response streamed back chunk by chunk; `GET /v1/models` lists the catalogue with each model's status.
//! Usage is read from the tail of the response (the last SSE chunk or the JSON body) without buffering.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;

use super::AppState;
use super::auth::ApiKey;
use super::db::{RequestRow, now_ms};
use super::error::ApiError;
use super::process::{Lease, LoadError};

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
        LoadError::TooManyLoaded { .. } => ApiError::unavailable("model_capacity", msg),
        LoadError::Failed { .. } | LoadError::Backoff { .. } => {
            ApiError::unavailable("model_load_failed", msg)
        }
        LoadError::ShuttingDown => ApiError::unavailable("shutting_down", msg),
        LoadError::Db(_) => ApiError::internal(msg),
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
    let known = model.len() <= MAX_MODEL_NAME && st.db.get_model(&model).await?.is_some();
    if !known {
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
    }
    let lease = match st.manager.acquire(&model).await {
        Ok(l) => l,
        Err(e) => {
            let e = load_error(e);
            st.log_request(&model, &endpoint, e.status.as_u16(), None, t0, key_id);
            return Err(e);
        }
    };
    let mut req = st
        .proxy_http
        .post(format!("http://127.0.0.1:{}{endpoint}", lease.port))
        .bearer_auth(&*lease.key)
        .body(body);
    for h in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = headers.get(&h) {
            req = req.header(h, v);
        }
    }
    let upstream = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("the worker of `{model}` failed during the request: {e}");
            st.log_request(&model, &endpoint, 502, None, t0, key_id);
            return Err(ApiError::bad_gateway(msg));
        }
    };
    if !lease.cold {
        st.metrics.observe_latency(t0.elapsed().as_secs_f64());
    }
    let status = upstream.status();
    let mut resp = Response::builder().status(status.as_u16());
    for h in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
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
    let relay = Relay {
        inner: Box::pin(upstream.bytes_stream()),
        tail: Vec::new(),
        sse,
        status: status.as_u16(),
        done: false,
        log: Some((st.clone(), model, endpoint, t0, key_id)),
        _lease: lease,
    };
    resp.body(Body::from_stream(relay))
        .map_err(|e| ApiError::internal(e.to_string()))
}

type LogCtx = (AppState, String, String, Instant, Option<i64>);

/// The response body: passes upstream chunks through as they come, keeps the last [`TAIL`] bytes to read
/// `usage` at the end, holds the in-flight lease until the body ends or the client goes away (dropping
/// it closes the upstream connection), and logs the request once.
struct Relay {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    tail: Vec<u8>,
    sse: bool,
    status: u16,
    done: bool,
    log: Option<LogCtx>,
    _lease: Lease,
}

impl Relay {
    fn finish(&mut self, status: u16) {
        if let Some((st, model, endpoint, t0, key)) = self.log.take() {
            let usage = find_usage(&self.tail);
            st.log_request(&model, &endpoint, status, usage, t0, key);
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                self.tail.extend_from_slice(&b);
                if self.tail.len() > TAIL {
                    let cut = self.tail.len() - TAIL;
                    self.tail.drain(..cut);
                }
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                self.finish(502);
                if self.sse {
                    // Headers are gone already: tell the client in-band, in OpenAI's error shape.
                    let err = ApiError::bad_gateway(format!("the worker failed mid-stream: {e}"));
                    let chunk = format!("data: {}\n\n", err.body());
                    Poll::Ready(Some(Ok(Bytes::from(chunk))))
                } else {
                    Poll::Ready(Some(Err(std::io::Error::other(e))))
                }
            }
            Poll::Ready(None) => {
                self.done = true;
                let s = self.status;
                self.finish(s);
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client went away before the end: 499 (client closed request).
        self.finish(499);
    }
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
