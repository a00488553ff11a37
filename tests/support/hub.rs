//! A local Hugging Face–compatible server for the hub tests: the model-info API (siblings with size and
//! LFS sha256, `X-Error-Code` on errors), `resolve` with an optional 302 to a "CDN" path, HTTP Range, and
//! injected faults (a connection dropped at an offset, a corrupted body, a slow body, a required token).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use super::assets;
use super::files::sha256;

/// `$CYBER_INFERENCE_ASSETS/models/NAME`, read once per test binary, with its SHA-256.
pub fn asset(name: &str) -> (Bytes, String) {
    static CACHE: OnceLock<Mutex<HashMap<String, (Bytes, String)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().unwrap().get(name) {
        return v.clone();
    }
    let path = assets::model(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sha = sha256(&data);
    let v = (Bytes::from(data), sha);
    cache.lock().unwrap().insert(name.into(), v.clone());
    v
}

/// The shared model `name` split by `cyber-inference`'s gguf-split into parts of at most `max_tensors`
/// tensors each: `(PREFIX-0000k-of-0000N.gguf, bytes)` in part order.
pub fn split_asset(name: &str, prefix: &str, max_tensors: usize) -> Vec<(String, Bytes)> {
    use cyber_inference::engine::gguf_split::{SplitPlan, split};
    let src = assets::model(name);
    let out = tempfile::tempdir().unwrap();
    let parts = split(
        &src,
        &out.path().join(prefix),
        SplitPlan::MaxTensors(max_tensors),
    )
    .unwrap();
    parts
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                Bytes::from(std::fs::read(p).unwrap()),
            )
        })
        .collect()
}

/// One file of a served repo.
#[derive(Clone)]
pub struct Served {
    pub rfilename: String,
    pub data: Bytes,
    pub sha256: String,
    /// The size the API reports, when it should lie (default: the real size).
    pub advertised_size: Option<u64>,
    /// Served as a non-LFS file (no `lfs` object in the API).
    pub plain: bool,
}

impl Served {
    /// `data` served as `rfilename` (an LFS file of its real size).
    pub fn new(rfilename: &str, data: Bytes) -> Self {
        let sha256 = sha256(&data);
        Served::hashed(rfilename, data, sha256)
    }

    /// The shared model `asset_name` served as `rfilename`.
    pub fn asset(rfilename: &str, asset_name: &str) -> Self {
        let (data, sha256) = asset(asset_name);
        Served::hashed(rfilename, data, sha256)
    }

    fn hashed(rfilename: &str, data: Bytes, sha256: String) -> Self {
        Served {
            rfilename: rfilename.into(),
            data,
            sha256,
            advertised_size: None,
            plain: false,
        }
    }
}

/// A request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct Faults {
    /// Drop the connection once, after sending the file's bytes up to this absolute offset.
    pub drop_at: Mutex<Option<u64>>,
    /// Drop it at this offset on every request (a connection that never gets further).
    pub always_drop_at: Mutex<Option<u64>>,
    /// Flip one byte in the middle of every file body.
    pub corrupt: AtomicBool,
    /// Sleep this long between 64 KiB chunks.
    pub chunk_delay: Mutex<Option<Duration>>,
    /// `resolve` answers 302 to `/cdn/...`.
    pub redirect: AtomicBool,
    /// Files need `Authorization: Bearer TOKEN` (401 without, 403 with another token).
    pub require_token: Mutex<Option<String>>,
}

#[derive(Default)]
pub struct State {
    pub repos: Mutex<HashMap<String, Vec<Served>>>,
    pub faults: Faults,
    pub seen: Mutex<Vec<Seen>>,
    pub active_bodies: AtomicUsize,
    pub max_active_bodies: AtomicUsize,
}

impl State {
    pub fn add_repo(&self, repo: &str, files: Vec<Served>) {
        self.repos.lock().unwrap().insert(repo.into(), files);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests for file bytes (resolve or CDN).
    pub fn file_requests(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.contains("/resolve/") || s.path.starts_with("/cdn/"))
            .collect()
    }
}

/// A running server: its base URL and shared state. Dropped with the test's runtime.
pub struct HfServer {
    pub url: String,
    pub state: Arc<State>,
}

impl HfServer {
    pub async fn start() -> HfServer {
        let state = Arc::new(State::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        HfServer { url, state }
    }
}

fn error(status: StatusCode, code: &str, msg: &str) -> Response {
    (
        status,
        [("x-error-code", code.to_string())],
        axum::Json(serde_json::json!({ "error": msg })),
    )
        .into_response()
}

async fn handle(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let header_str = |h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let auth = header_str(header::AUTHORIZATION);
    state.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        range: header_str(header::RANGE),
        auth: auth.clone(),
    });
    if let Some(token) = state.faults.require_token.lock().unwrap().clone() {
        match auth.as_deref() {
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "GatedRepo",
                    "Access to this repo is restricted",
                );
            }
            Some(a) if a != format!("Bearer {token}") => {
                return error(StatusCode::FORBIDDEN, "GatedRepo", "Invalid credentials");
            }
            Some(_) => {}
        }
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let repos = state.repos.lock().unwrap().clone();
    // /api/models/{owner}/{name}/revision/{rev}
    if parts.len() == 6 && parts[0] == "api" && parts[1] == "models" && parts[4] == "revision" {
        let repo = format!("{}/{}", parts[2], parts[3]);
        let Some(files) = repos.get(&repo) else {
            return error(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                "Repository not found",
            );
        };
        if parts[5] != "main" {
            return error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<_> = files
            .iter()
            .map(|f| {
                let size = f.advertised_size.unwrap_or(f.data.len() as u64);
                if f.plain {
                    serde_json::json!({ "rfilename": f.rfilename, "size": size })
                } else {
                    serde_json::json!({ "rfilename": f.rfilename, "size": size,
                        "lfs": { "sha256": f.sha256, "size": size, "pointerSize": 134 } })
                }
            })
            .collect();
        return axum::Json(serde_json::json!({
            "id": repo, "sha": "0123456789abcdef0123456789abcdef01234567", "siblings": siblings
        }))
        .into_response();
    }
    // /{owner}/{name}/resolve/{rev}/{file...} and /cdn/{owner}/{name}/{file...}
    let (repo, file, via_cdn) = if parts.len() >= 5 && parts[2] == "resolve" {
        (
            format!("{}/{}", parts[0], parts[1]),
            parts[4..].join("/"),
            false,
        )
    } else if parts.len() >= 4 && parts[0] == "cdn" {
        (
            format!("{}/{}", parts[1], parts[2]),
            parts[3..].join("/"),
            true,
        )
    } else {
        return error(StatusCode::NOT_FOUND, "", "no such route");
    };
    let Some(files) = repos.get(&repo) else {
        return error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            "Repository not found",
        );
    };
    let Some(f) = files.iter().find(|f| f.rfilename == file) else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    if !via_cdn && state.faults.redirect.load(Ordering::SeqCst) {
        return (
            StatusCode::FOUND,
            [(header::LOCATION, format!("/cdn/{repo}/{file}"))],
        )
            .into_response();
    }
    serve_bytes(&state, f.data.clone(), header_str(header::RANGE))
}

fn serve_bytes(state: &Arc<State>, data: Bytes, range: Option<String>) -> Response {
    let len = data.len() as u64;
    let start = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let s: u64 = r.trim_end_matches('-').parse().unwrap();
            if s >= len {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response();
            }
            Some(s)
        }
        None => None,
    };
    let from = start.unwrap_or(0);
    let mut body = data.slice(from as usize..).to_vec();
    if state.faults.corrupt.load(Ordering::SeqCst) {
        let mid = (len / 2).saturating_sub(from) as usize;
        if mid < body.len() {
            body[mid] ^= 0x55;
        }
    }
    let once = state
        .faults
        .drop_at
        .lock()
        .unwrap()
        .take()
        .filter(|&d| d > from && d < len);
    // A link that never gets past `d`: later requests from beyond it break at once.
    let always = state
        .faults
        .always_drop_at
        .lock()
        .unwrap()
        .map(|d| d.max(from))
        .filter(|&d| d < len);
    let drop_at = once.or(always);
    let delay = *state.faults.chunk_delay.lock().unwrap();
    let stop = drop_at.map(|d| (d - from) as usize);

    struct Active(Arc<State>);
    impl Drop for Active {
        fn drop(&mut self) {
            self.0.active_bodies.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let now = state.active_bodies.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_active_bodies.fetch_max(now, Ordering::SeqCst);
    let guard = Active(state.clone());
    let body = Bytes::from(body);
    let stream = futures_util::stream::unfold((0usize, guard), move |(pos, guard)| {
        let body = body.clone();
        async move {
            if pos == usize::MAX {
                return None;
            }
            let end_limit = stop.unwrap_or(body.len());
            if pos >= end_limit {
                if stop.is_some() {
                    // Let the bytes sent so far reach the client, then abort the connection mid-body.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return Some((
                        Err(std::io::Error::other("injected connection drop")),
                        (usize::MAX, guard),
                    ));
                }
                return None;
            }
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let end = (pos + (64 << 10)).min(end_limit);
            Some((Ok::<_, std::io::Error>(body.slice(pos..end)), (end, guard)))
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, (len - from).into());
    h.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    if let Some(s) = start {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {s}-{}/{len}", len - 1).parse().unwrap(),
        );
    }
    resp
}

/// The supervisor's admin route that starts a download (`POST`, JSON `DownloadRequest`).
pub const DOWNLOAD_ROUTE: &str = "/admin/api/models/download";

/// `(error.code, error.message)` of an admin API error answer (empty where absent).
pub fn error_of(j: &serde_json::Value) -> (String, String) {
    (
        j["error"]["code"].as_str().unwrap_or("").to_string(),
        j["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// Asserts that an admin API answer `(status, JSON)` is the error `status` with `error.code` `code`;
/// returns its `error.message`.
pub fn expect_error((st, j): (u16, serde_json::Value), status: u16, code: &str) -> String {
    let (c, msg) = error_of(&j);
    assert_eq!((st, c.as_str()), (status, code), "{j}");
    msg
}
