//! The HTTP/1 server loop both the supervisor and the worker run, with the same bounds: a header-read
//! timeout (a client that opens a connection and trickles its headers is cut), a connection limit (past
//! it the next connection waits in the kernel's accept queue until one closes), a request body limit
//! (tower-http, the same on both servers so a body the supervisor accepts is never refused by the worker
//! behind it) and a cap on the header buffer. `axum::serve` sets none of these: it has no timer, so
//! hyper's header-read timeout is off, and it accepts connections without limit.
//!
//! Graceful shutdown: when `shutdown` completes, the listener closes, every connection finishes its
//! request in progress (hyper's graceful shutdown) and [`serve`] returns once all have closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Largest request body either server accepts (bytes): images and long prompts fit.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Longest a client may take to send a request's headers (also between requests of a kept-alive
/// connection), before the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest header block hyper buffers for one request (bytes).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The bounds of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body once its headers are in; past it the body
    /// read fails (the handler answers 400) — cpp-httplib's read timeout, llama-server's `--timeout`.
    /// `None`: no limit.
    pub body_read_timeout: Option<Duration>,
    /// Longest a write of the response may stay blocked (a client that stops reading); past it the
    /// connection is closed — cpp-httplib's write timeout, llama-server's `--timeout`. `None`: no limit.
    pub write_timeout: Option<Duration>,
}

impl Limits {
    /// The supervisor's: many clients, each cheap.
    pub const SUPERVISOR: Limits = Limits {
        max_connections: 512,
        header_read_timeout: HEADER_READ_TIMEOUT,
        body_read_timeout: None,
        write_timeout: None,
    };
    /// A worker's: its clients are the supervisor and a few direct ones.
    pub const WORKER: Limits = Limits {
        max_connections: 256,
        header_read_timeout: HEADER_READ_TIMEOUT,
        body_read_timeout: None,
        write_timeout: None,
    };

    /// A worker's bounds under llama-server's `--timeout N`: body reads and response writes time out
    /// after `n` (cpp-httplib's `set_read_timeout` / `set_write_timeout`), the headers after
    /// `min(n, HEADER_READ_TIMEOUT)`.
    pub fn worker_with_timeout(n: Duration) -> Limits {
        Limits {
            header_read_timeout: n.min(HEADER_READ_TIMEOUT),
            body_read_timeout: Some(n),
            write_timeout: Some(n),
            ..Limits::WORKER
        }
    }
}

/// A socket whose writes fail with `TimedOut` once one has stayed blocked for `limit` (the peer stopped
/// reading and the kernel's send buffer is full); reads pass through.
struct WriteTimeout<S> {
    io: S,
    limit: Option<Duration>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(io: S, limit: Option<Duration>) -> Self {
        WriteTimeout {
            io,
            limit,
            timer: None,
        }
    }

    /// The write was not accepted: arm the timer (once per blocked stretch) and fail when it fires.
    fn blocked<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future as _;
        let Some(limit) = self.limit else {
            return std::task::Poll::Pending;
        };
        let t = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match t.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timeout",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn done<T>(&mut self, r: std::io::Result<T>) -> std::task::Poll<std::io::Result<T>> {
        self.timer = None;
        std::task::Poll::Ready(r)
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_write(cx, buf) {
            std::task::Poll::Ready(r) => this.done(r),
            std::task::Poll::Pending => this.blocked(cx),
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            std::task::Poll::Ready(r) => this.done(r),
            std::task::Poll::Pending => this.blocked(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_flush(cx) {
            std::task::Poll::Ready(r) => this.done(r),
            std::task::Poll::Pending => this.blocked(cx),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// `router` with the body limit every server applies: 413 for a body over [`MAX_BODY_BYTES`], however
/// it is read. (Extractors keep axum's 2 MB default unless a router raises it with
/// `DefaultBodyLimit::max(MAX_BODY_BYTES)`, as the inference routes do.)
pub fn with_body_limit(router: Router) -> Router {
    router.layer(tower_http::limit::RequestBodyLimitLayer::new(
        MAX_BODY_BYTES,
    ))
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes, then drains (see the module
/// doc). Each request carries the peer address as [`ConnectInfo<SocketAddr>`]; every accepted socket gets
/// TCP_NODELAY (streamed tokens are small writes that must not wait for delayed ACKs).
///
/// Errors: none once listening (accept errors are logged and retried after a pause, as `axum::serve`
/// does); the `Result` is for callers that `?` it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // A free connection slot first: past the limit, connections wait in the accept queue.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
        let app = app.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut req = req.map(|b| match limits.body_read_timeout {
                        Some(d) => {
                            axum::body::Body::new(tower_http::timeout::TimeoutBody::new(d, b))
                        }
                        None => axum::body::Body::new(b),
                    });
                    req.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(req)
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEADER_BYTES);
            let conn = builder
                .serve_connection(
                    TokioIo::new(WriteTimeout::new(tcp, limits.write_timeout)),
                    svc,
                )
                .with_upgrades();
            tokio::pin!(conn);
            let stopping = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    false
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => true,
            };
            if stopping {
                // Finish the request in progress, then close.
                conn.as_mut().graceful_shutdown();
                if let Err(e) = conn.as_mut().await {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot: all slots back = all connections closed.
    let _ = slots
        .acquire_many(u32::try_from(limits.max_connections).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The handler reads the body without a limit of its own (no `Bytes` extractor, whose 2 MB
        // default or `DefaultBodyLimit` would answer 413 by itself): any limit is `with_body_limit`'s.
        // A body cut by it mid-stream is answered 413 too.
        let app = with_body_limit(
            Router::new()
                .route(
                    "/",
                    axum::routing::post(|req: axum::extract::Request| async move {
                        match axum::body::to_bytes(req.into_body(), usize::MAX).await {
                            Ok(b) => Ok(b.len().to_string()),
                            Err(e) => {
                                Err((axum::http::StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))
                            }
                        }
                    }),
                )
                .route("/big", axum::routing::get(|| async { vec![b'x'; BIG] })),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, limits, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut() {
        let (addr, _stop) = start(Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(300),
            ..Limits::WORKER
        })
        .await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let t0 = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "the connection was kept open past the timeout");
        assert!(t0.elapsed() >= Duration::from_millis(250));
    }

    const BIG: usize = 48 << 20;

    /// `--timeout`'s body read timeout: a body that stalls after its headers is cut (an error answer
    /// or a closed connection) once the limit passes; without the limit it would wait forever.
    #[tokio::test]
    async fn a_stalled_request_body_times_out() {
        let (addr, _stop) = start(Limits::worker_with_timeout(Duration::from_millis(300))).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let t0 = std::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        let n = r
            .expect("the stalled body was waited on past the timeout")
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(!head.contains(" 200 "), "{head}");
        assert!(n == 0 || head.starts_with("HTTP/1.1 4"), "{head}");
        assert!(t0.elapsed() >= Duration::from_millis(250));
        // min(N, 10 s) for the headers.
        assert_eq!(
            Limits::worker_with_timeout(Duration::from_secs(3600)).header_read_timeout,
            HEADER_READ_TIMEOUT
        );
    }

    /// `--timeout`'s write timeout: a client that stops reading a large response has its connection
    /// closed, so it never receives the whole body; without the limit it does.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_by_the_write_timeout() {
        for (limit, cut) in [(Some(Duration::from_millis(300)), true), (None, false)] {
            let (addr, _stop) = start(Limits {
                write_timeout: limit,
                ..Limits::WORKER
            })
            .await;
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut got)).await;
            assert_eq!(got.len() < BIG, cut, "{limit:?}: {} bytes", got.len());
        }
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_free_slot() {
        let (addr, _stop) = start(Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(30),
            ..Limits::WORKER
        })
        .await;
        let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/");
        let r = tokio::time::timeout(
            Duration::from_millis(500),
            http.post(&url).body("abc").send(),
        )
        .await;
        assert!(
            r.is_err(),
            "a third connection was served while two were open"
        );
        drop(idle1);
        let r = tokio::time::timeout(Duration::from_secs(5), http.post(&url).body("abc").send())
            .await
            .expect("served once a slot is free")
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "3");
        drop(idle2);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413() {
        let (addr, _stop) = start(Limits::WORKER).await;
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/");
        // Declared too long (Content-Length): refused before the handler runs.
        let r = http
            .post(&url)
            .body(vec![b'x'; MAX_BODY_BYTES + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        // Chunked, no length given: cut once it passes the limit.
        let chunks =
            (0..=MAX_BODY_BYTES / (1 << 20)).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1 << 20]));
        let r = http
            .post(&url)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await;
        // The server may answer and close before it has read the whole upload.
        if let Ok(r) = r {
            assert_eq!(r.status(), 413);
        }
        // Exactly the limit is read whole.
        let r = http
            .post(&url)
            .body(vec![b'x'; MAX_BODY_BYTES])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), MAX_BODY_BYTES.to_string());
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_progress_finish() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, Limits::WORKER, async move {
            let _ = rx.await;
        }));
        let req = tokio::spawn(reqwest::get(format!("http://{addr}/")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tx.send(());
        let r = req.await.unwrap().unwrap();
        assert_eq!(r.text().await.unwrap(), "done");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after the drain")
            .unwrap()
            .unwrap();
    }
}

/// The CORS layer for an allowed-origins setting (the worker's `--cors-origins`, the supervisor's
/// `CORS_ORIGINS`), with llama-server's values: empty = no origin (preflights are answered, without
/// `Access-Control-Allow-Origin`, so browsers refuse), `*` = any origin, `localhost` = any origin whose
/// host is `localhost`, `127.0.0.1` or `[::1]`, else a comma-separated list of exact origins
/// (`https://app.example:8443`). Preflights (`OPTIONS` with `Access-Control-Request-Method`) are
/// answered by this layer before any authentication, as browsers send them without credentials; the
/// API key is checked on the real request. Allowed: methods GET, POST, PUT, PATCH, DELETE, OPTIONS and
/// the headers `Authorization`, `Content-Type`, `X-Api-Key`; preflights are cached for 10 minutes.
///
/// Errors: an origin that is not a valid header value.
pub fn cors_layer(origins: &str) -> Result<tower_http::cors::CorsLayer, String> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = origins.trim();
    let allow = match origins {
        "*" => AllowOrigin::any(),
        "localhost" => {
            AllowOrigin::predicate(|o: &HeaderValue, _| o.to_str().is_ok_and(origin_is_localhost))
        }
        list => {
            let mut v = Vec::new();
            for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                v.push(
                    HeaderValue::from_str(o.trim_end_matches('/'))
                        .map_err(|_| format!("'{o}' is not a valid origin"))?,
                );
            }
            AllowOrigin::list(v)
        }
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
        ])
        .max_age(Duration::from_secs(600)))
}

/// `http(s)://localhost[:port]`, `127.0.0.1` or `[::1]` (llama-server's `origin_is_localhost`).
fn origin_is_localhost(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().map(|h| format!("[{h}]")),
        None => rest.split(':').next().map(str::to_string),
    };
    matches!(host.as_deref(), Some("localhost" | "127.0.0.1" | "[::1]"))
}

#[cfg(test)]
mod cors_tests {
    use super::*;

    #[test]
    fn localhost_origins_are_recognised() {
        for o in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://[::1]:80",
        ] {
            assert!(origin_is_localhost(o), "{o}");
        }
        for o in [
            "http://localhost.evil.com",
            "http://evil.com",
            "localhost",
            "http://127.0.0.2",
        ] {
            assert!(!origin_is_localhost(o), "{o}");
        }
        assert!(cors_layer("https://a.example, https://b.example:8443").is_ok());
        assert!(cors_layer("bad\norigin").is_err());
    }
}
