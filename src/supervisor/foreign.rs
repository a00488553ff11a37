//! What the foreign APIs (Ollama's, Anthropic's) share on the supervisor: a request's model resolved
//! (catalogue name or alias), loaded through the manager and leased ([`Run`]), the worker called over
//! HTTP, its SSE stream read back ([`SseReader`]), the request logged, and [`Failure`], the error each
//! API then writes in its own envelope.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::db::ModelRow;
use super::error::ApiError;
use super::hub::HubError;
use super::process::{Lease, WorkerReporter};
use super::settings::RequestField;
use crate::openai::ollama::{self as tr, KeepAlive, TranslateError};
use crate::openai::stream::{SseDecoder, SseItem, StreamError, error_message};

/// A failed request, before it is written in the envelope of the API it came through.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message.
    pub message: String,
}

impl Failure {
    /// A failure with a status and a message.
    pub fn new(status: StatusCode, m: impl Into<String>) -> Self {
        Failure {
            status,
            message: m.into(),
        }
    }
    /// 400.
    pub fn bad(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    /// 499: the client went away before the end.
    pub fn client_closed() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "client closed the request",
        )
    }

    /// 404 for a model name that is not in the catalogue.
    pub fn not_found(name: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("model '{name}' not found"))
    }
    /// 502: the worker failed.
    pub fn bad_gateway(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, m)
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::new(e.status, e.message)
    }
}

impl From<TranslateError> for Failure {
    fn from(e: TranslateError) -> Self {
        Failure::bad(e.0)
    }
}

impl From<crate::openai::anthropic::TranslateError> for Failure {
    fn from(e: crate::openai::anthropic::TranslateError) -> Self {
        Failure::bad(e.0)
    }
}

impl From<super::db::DbError> for Failure {
    fn from(e: super::db::DbError) -> Self {
        Failure::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl From<StreamError> for Failure {
    fn from(e: StreamError) -> Self {
        Failure::bad_gateway(e.to_string())
    }
}

impl From<HubError> for Failure {
    fn from(e: HubError) -> Self {
        Failure::new(
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
            e.to_string(),
        )
    }
}

/// Which API a request came in through, from its logged endpoint: `Ollama` (`/api/*`), `Anthropic`
/// (`/v1/messages*`), `OpenAI Responses` (`/v1/responses*`), `OpenAI` (the rest of `/v1/*`).
pub fn api_of(endpoint: &str) -> &'static str {
    if endpoint.starts_with("/api/") {
        "Ollama"
    } else if endpoint.starts_with("/v1/messages") {
        "Anthropic"
    } else if endpoint.starts_with("/v1/responses") {
        "OpenAI Responses"
    } else {
        "OpenAI"
    }
}

/// The result of the shared steps.
pub type Res<T> = Result<T, Failure>;

/// The catalogue row a name means: the name (without Ollama's `:latest`), else an alias.
pub async fn find_model(st: &AppState, name: &str) -> Res<Option<ModelRow>> {
    let n = tr::strip_latest(name);
    if let Some(m) = st.db.get_model(n).await? {
        return Ok(Some(m));
    }
    for a in [name, n] {
        if let Some(real) = st.db.resolve_alias(a).await? {
            return Ok(st.db.get_model(&real).await?);
        }
    }
    Ok(None)
}

/// A model loaded for one request: the lease on its worker and what the reply and the log need.
pub struct Run {
    pub st: AppState,
    pub row: ModelRow,
    /// The name as the client wrote it (echoed in replies).
    pub shown: String,
    pub endpoint: &'static str,
    pub t0: Instant,
    pub key: Option<i64>,
    pub load: Duration,
    pub keep: Option<KeepAlive>,
    pub lease: Option<Lease>,
    /// The model's per-request defaults (`settings::request_defaults`), given to every request sent.
    pub defaults: Vec<(RequestField, Value)>,
}

impl Run {
    /// Resolves `name`, loads the model (the manager's single-flight acquire) and holds a lease.
    pub async fn start(
        st: &AppState,
        name: &str,
        endpoint: &'static str,
        key: Option<i64>,
        keep_alive: Option<&Value>,
    ) -> Res<Run> {
        let t0 = Instant::now();
        let keep = keep_alive.map(tr::parse_keep_alive).transpose()?;
        let Some(row) = find_model(st, name).await? else {
            st.log_request(name, endpoint, 404, None, t0, key);
            return Err(Failure::not_found(name));
        };
        let values = st.db.model_settings(&row.name).await?.unwrap_or_default();
        let defaults = super::settings::request_defaults(&values);
        let lease = match st.manager.acquire(&row.name).await {
            Ok(l) => l,
            Err(e) => {
                let e = super::proxy::load_error(e);
                st.log_request(&row.name, endpoint, e.status.as_u16(), None, t0, key);
                return Err(e.into());
            }
        };
        let load = if lease.cold {
            t0.elapsed()
        } else {
            Duration::ZERO
        };
        Ok(Run {
            st: st.clone(),
            row,
            shown: name.to_owned(),
            endpoint,
            t0,
            key,
            load,
            keep,
            lease: Some(lease),
            defaults,
        })
    }

    /// POSTs `body` to the worker with the model's per-request defaults
    /// ([`super::settings::with_request_defaults`]) and the worker's per-spawn key (once more to a fresh
    /// worker when this one turns out to be gone, [`super::proxy::send_to_worker`]); a non-2xx answer
    /// becomes its error with the worker's status.
    pub async fn post(
        &mut self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Res<reqwest::Response> {
        let json = serde_json::to_vec(body)
            .map_err(|e| Failure::bad(format!("cannot encode the request: {e}")))?;
        let json = super::settings::with_request_defaults(&self.defaults, path, json.into());
        let Some(lease) = self.lease.take() else {
            return Err(Failure::bad_gateway(format!(
                "the request for '{}' is over",
                self.row.name
            )));
        };
        let http = &self.st.proxy_http;
        let sent = super::proxy::send_to_worker(&self.st, &self.row.name, lease, |l| {
            http.post(format!("http://127.0.0.1:{}{path}", l.port))
                .bearer_auth(&*l.key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.clone())
        })
        .await;
        let r = match sent {
            Ok((lease, r)) => {
                self.lease = Some(lease);
                r
            }
            Err(e) => return Err(e.into_api_error(&self.row.name).into()),
        };
        if r.status().is_success() {
            return Ok(r);
        }
        let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let text = r.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| error_message(&v))
            .unwrap_or(text);
        Err(Failure::new(status, msg))
    }

    pub async fn post_json(&mut self, path: &str, body: &impl serde::Serialize) -> Res<Value> {
        self.post(path, body)
            .await?
            .json()
            .await
            .map_err(|e| Failure::bad_gateway(format!("the worker's answer is not JSON: {e}")))
    }

    /// Token ids of `text` (the worker's tokenizer).
    pub async fn tokenize(
        &mut self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Res<Vec<u32>> {
        let v = self
            .post_json(
                "/tokenize",
                &json!({"content": text, "add_special": add_special, "parse_special": parse_special}),
            )
            .await?;
        serde_json::from_value(v["tokens"].clone())
            .map_err(|e| Failure::bad_gateway(format!("bad /tokenize answer: {e}")))
    }

    /// [`Run::finish`] of a completed chat or completion: 200 with the worker's token counts.
    pub fn finish_ok(&mut self, u: &crate::openai::Usage) {
        self.finish(
            200,
            Some((
                Some(i64::from(u.prompt_tokens)),
                Some(i64::from(u.completion_tokens)),
            )),
        );
    }

    /// Ends the request: logs it, releases the lease and applies `keep_alive` (a duration or forever
    /// from now on; `0` unloads the model now, draining first).
    pub fn finish(&mut self, status: u16, usage: Option<(Option<i64>, Option<i64>)>) {
        self.st.log_request(
            &self.row.name,
            self.endpoint,
            status,
            usage,
            self.t0,
            self.key,
        );
        self.lease = None;
        self.apply_keep_alive();
    }

    /// Ends the request with an error (logged with its status).
    pub fn fail(&mut self, e: Failure) -> Failure {
        self.finish(e.status.as_u16(), None);
        e
    }

    fn apply_keep_alive(&mut self) {
        match self.keep.take() {
            Some(KeepAlive::For(d)) => self.st.manager.set_keep_alive(&self.row.name, Some(d)),
            Some(KeepAlive::Forever) => self.st.manager.set_keep_alive(&self.row.name, None),
            Some(KeepAlive::Unload) => {
                self.st.manager.unload(&self.row.name, "keep_alive 0");
            }
            None => {}
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.lease.is_some() {
            // Ended without `finish`: the client went away (or an error already answered).
            self.finish(499, None);
        }
    }
}

/// The `data:` payloads of a worker's SSE stream, until `[DONE]` or its end.
pub struct SseReader {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// Told when the body fails in transport ([`WorkerReporter::transport_failed`]).
    reporter: Option<WorkerReporter>,
    dec: SseDecoder,
    pending: std::collections::VecDeque<String>,
    done: bool,
}

impl SseReader {
    /// Reads `resp`'s body, which `run`'s worker sends.
    pub fn new(run: &Run, resp: reqwest::Response) -> Self {
        SseReader {
            body: Box::pin(resp.bytes_stream()),
            reporter: run.lease.as_ref().map(Lease::reporter),
            dec: SseDecoder::new(),
            pending: Default::default(),
            done: false,
        }
    }

    /// The next payload; `None` at `[DONE]` or the end.
    pub async fn next(&mut self) -> Res<Option<String>> {
        loop {
            if let Some(d) = self.pending.pop_front() {
                return Ok(Some(d));
            }
            if self.done {
                return Ok(None);
            }
            let Some(chunk) = self.body.next().await else {
                return Ok(None);
            };
            let chunk = chunk.map_err(|e| {
                if let Some(r) = &self.reporter {
                    r.transport_failed();
                }
                Failure::bad_gateway(format!("the worker failed mid-stream: {e}"))
            })?;
            for item in self.dec.push(&chunk)? {
                match item {
                    SseItem::Done => self.done = true,
                    SseItem::Data(d) if !self.done => self.pending.push_back(d),
                    SseItem::Data(_) => {}
                }
            }
        }
    }
}

/// One server-sent event: `event: NAME` and its JSON `data` (Anthropic's and the Responses API's form).
pub fn sse_event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The sending side of a streamed foreign-API response ([`stream_channel`]): each chunk waits at most
/// the idle-write timeout for the client to make room ([`super::proxy::send_within`], the rule the
/// OpenAI proxy follows too), so a client that stops reading cannot hold a worker slot, a lease or an
/// unload.
#[derive(Clone)]
pub struct StreamTx {
    tx: mpsc::Sender<Bytes>,
    idle: Duration,
    model: String,
    endpoint: &'static str,
    /// Set once a send timed out: the client is not reading, so later sends (a last error line)
    /// fail at once instead of waiting again.
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StreamTx {
    /// Sends one chunk. Errors: 499 ([`Failure::client_closed`]) when the client went away or took
    /// nothing for the idle-write timeout (then logged with the reason, once per stream).
    pub async fn send(&self, chunk: Bytes) -> Res<()> {
        use std::sync::atomic::Ordering;
        if self.stalled.load(Ordering::Acquire) {
            return Err(Failure::client_closed());
        }
        let r =
            super::proxy::send_within(&self.tx, chunk, self.idle, &self.model, self.endpoint).await;
        if r == Err(super::proxy::Stalled::IdleWrite) {
            self.stalled.store(true, Ordering::Release);
        }
        r.map_err(|_| Failure::client_closed())
    }
}

/// A bounded channel of `cap` chunks for a streamed response of `model` at `endpoint`, the idle-write
/// timeout read from the settings now; the receiver goes to [`channel_response`].
pub fn stream_channel(
    st: &AppState,
    model: &str,
    endpoint: &'static str,
    cap: usize,
) -> (StreamTx, mpsc::Receiver<Bytes>) {
    let (tx, rx) = mpsc::channel(cap);
    let tx = StreamTx {
        tx,
        idle: super::proxy::idle_write_timeout(st),
        model: model.to_owned(),
        endpoint,
        stalled: Default::default(),
    };
    (tx, rx)
}

/// A 200 streamed response of `content_type` (`text/event-stream`, `application/x-ndjson`) whose body is
/// the chunks sent into `rx`, each passed on as it comes (no caching, no buffering by a proxy between).
///
/// Errors: the response builder's, which only a bad header value could cause.
pub fn channel_response(
    rx: mpsc::Receiver<Bytes>,
    content_type: &'static str,
) -> Result<Response, axum::http::Error> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose client takes nothing fails its send after the idle-write timeout (499), and
    /// every later send (the last error line) at once, without waiting again.
    #[tokio::test]
    async fn a_stream_send_gives_up_after_the_idle_write_timeout() {
        let (tx, mut rx) = mpsc::channel(1);
        let tx = StreamTx {
            tx,
            idle: Duration::from_millis(200),
            model: "m".into(),
            endpoint: "/api/chat",
            stalled: Default::default(),
        };
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let t0 = Instant::now();
        let e = tx.send(Bytes::from_static(b"b")).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 499);
        assert!(t0.elapsed() >= Duration::from_millis(200));
        let t1 = Instant::now();
        assert!(tx.send(Bytes::from_static(b"c")).await.is_err());
        assert!(t1.elapsed() < Duration::from_millis(100), "no second wait");
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"a"));
        // A reader that keeps up is never cut.
        let (tx2, mut rx2) = mpsc::channel(1);
        let tx2 = StreamTx {
            tx: tx2,
            idle: Duration::from_millis(200),
            model: "m".into(),
            endpoint: "/api/chat",
            stalled: Default::default(),
        };
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while rx2.recv().await.is_some() {
                n += 1;
            }
            n
        });
        for _ in 0..100 {
            tx2.send(Bytes::from_static(b"x")).await.unwrap();
        }
        drop(tx2);
        assert_eq!(reader.await.unwrap(), 100);
        // A client that went away: 499 at once.
        drop(rx);
        let t2 = Instant::now();
        let (tx3, rx3) = mpsc::channel::<Bytes>(1);
        drop(rx3);
        let tx3 = StreamTx {
            tx: tx3,
            idle: Duration::from_secs(60),
            model: "m".into(),
            endpoint: "/api/chat",
            stalled: Default::default(),
        };
        assert_eq!(
            tx3.send(Bytes::new()).await.unwrap_err().status.as_u16(),
            499
        );
        assert!(t2.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_api_of_an_endpoint() {
        assert_eq!(api_of("/api/chat"), "Ollama");
        assert_eq!(api_of("/v1/messages/count_tokens"), "Anthropic");
        assert_eq!(api_of("/v1/chat/completions"), "OpenAI");
        assert_eq!(api_of("/v1/responses"), "OpenAI Responses");
    }
}
