//! The admin JSON API under `/admin/api/` (every route needs an admin JWT, see `auth`), for the web UI
//! and scripts:
//!
//! | method & path | what |
//! | --- | --- |
//! | `GET /admin/api/models` | catalogue rows + worker state |
//! | `POST /admin/api/models/scan` | rescan MODELS_DIR → `{models, removed, skipped}` |
//! | `GET /admin/api/models/{name}` | one model, its settings (value, type, range, when each applies), its worker and its last 20 sessions |
//! | `PATCH /admin/api/models/{name}` | per-model settings (the names of `settings::MODEL_SETTINGS`; `null` resets), validated |
//! | `POST /admin/api/models/{name}/load` / `unload` / `pin` / `unpin` | control |
//! | `DELETE /admin/api/models/{name}` | unload, delete the file and the row |
//! | `GET /admin/api/workers` | state, port, pid, RSS, CPU, uptime, in-flight of every worker |
//! | `GET /admin/api/models/{name}/logs?tail=N` | last N lines (≤ 1000) of a worker's output |
//! | `GET /admin/api/models/{name}/logs/follow` | the same, then new lines (SSE, event `log`) |
//! | `GET /admin/api/logs?tail=N`, `GET /admin/api/logs/follow` | the supervisor's own log |
//! | `GET /admin/api/resources` | latest resource sample |
//! | `GET /admin/api/resources/history?since=MS` | samples of the last 15 min |
//! | `GET /admin/api/settings` | every setting with value (secrets hidden), source and whether it is live |
//! | `PUT /admin/api/settings` | `{name: value \| null}` DB overrides, validated, applied live |
//! | `GET /admin/api/stats?since=MS` | per-model request statistics + the last 100 requests |
//! | `GET /admin/api/keys`, `POST /admin/api/keys {name}`, `DELETE /admin/api/keys/{id}` | API keys (the key is shown once, at creation) |
//! | `GET /admin/api/models/repo-files?repo_id=&revision=` | a Hugging Face repo's GGUF models (splits as one), sizes, quantization |
//! | `POST /admin/api/models/download` | `{repo_id, filename?, revision?}` → 202 `{id, download}`; runs in the background |
//! | `GET /admin/api/downloads` | downloads: state, bytes, total, rate, error, registered model |
//! | `DELETE /admin/api/downloads/{id}` | cancel (partial files deleted, nothing registered) |
//! | `GET /admin/api/events` | WebSocket: JSON events `model_state`, `resources`, `download`, `log` |

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::AppState;
use super::auth::{AdminUser, generate_api_key, hash_api_key};
use super::error::ApiError;
use super::hub::{DownloadRequest, HubError, choose_model};
use super::logs::{LogLine, SUPERVISOR_LOG};
use super::process::STOP_GRACE_SECS;
use super::settings::{ModelSettingsPatch, SettingValue, describe};
use crate::config::{SECRET_SETTINGS, SETTING_NAMES, Settings, Source};

/// Settings that can be changed at run time through `PUT /admin/api/settings` (plus `require_api_key`).
pub const LIVE_SETTINGS: [&str; 10] = [
    "model_idle_timeout",
    "max_loaded_models",
    "max_memory_percent",
    "default_context_size",
    "max_context_size",
    "threads",
    "gpu_layers",
    "jwt_expiry_hours",
    "drain_timeout",
    "idle_write_timeout",
];

/// The extra (non-`Settings`) override: whether `/v1/*` needs an API key (`true`/`false`).
pub const REQUIRE_API_KEY: &str = "require_api_key";

/// Applies one override `key = value` (JSON text, or a bare string) to a copy of `s` and validates it.
///
/// Errors: a message naming the key and value: not live-changeable, wrong type or out of range.
pub fn apply_override(s: &Settings, key: &str, value: &str) -> Result<Settings, String> {
    if !LIVE_SETTINGS.contains(&key) {
        return Err(format!(
            "`{key}` cannot be changed at run time; set CYBER_INFERENCE_{} or the config file and restart",
            key.to_ascii_uppercase()
        ));
    }
    let mut j = serde_json::to_value(s).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    j[key] = v;
    let n: Settings = serde_json::from_value(j)
        .map_err(|e| format!("invalid value {value:?} for `{key}`: {e}"))?;
    // The check of a start-up, on the settings this change leads to.
    n.check().map_err(|e| {
        if e.name == key {
            format!("invalid value {value:?} for `{key}`: {}", e.reason)
        } else {
            format!(
                "invalid value {value:?} for `{key}`: then `{}` = {} {}",
                e.name, e.value, e.reason
            )
        }
    })?;
    Ok(n)
}

async fn models(State(st): State<AppState>, _u: AdminUser) -> Result<Json<Value>, ApiError> {
    let views = st.manager.views();
    let rows = st.db.list_models().await?;
    let data: Vec<Value> = rows
        .into_iter()
        .map(|m| {
            let w = views.iter().find(|v| v.model == m.name);
            let est = st.manager.estimate_need(&m);
            json!({"model": m, "worker": w, "state": st.manager.state_of(&m.name),
                   "memory_estimate_bytes": est.host, "device_memory_estimate_bytes": est.device})
        })
        .collect();
    Ok(Json(json!({"models": data})))
}

async fn scan(State(st): State<AppState>, _u: AdminUser) -> Result<Json<Value>, ApiError> {
    let r = super::catalog::scan(&st.db, &st.models_dir)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    for m in st.db.list_models().await? {
        st.manager.refresh_model(&m);
    }
    Ok(Json(json!(r)))
}

async fn model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = st
        .db
        .get_model(&name)
        .await?
        .ok_or_else(|| no_model(&name))?;
    let sessions = st.db.model_sessions(m.id, 20).await?;
    let w = st.manager.views().into_iter().find(|v| v.model == name);
    let est = st.manager.estimate_need(&m);
    Ok(Json(json!({
        "model": m, "state": st.manager.state_of(&name), "worker": w, "sessions": sessions,
        "memory_estimate_bytes": est.host, "device_memory_estimate_bytes": est.device,
        "settings": settings_of(&st, &name).await?,
    })))
}

fn no_model(name: &str) -> ApiError {
    ApiError::not_found(format!("model `{name}` not found"))
}

/// `PATCH /admin/api/models/{name}` with `{setting: value | null}` (the names of
/// [`MODEL_SETTINGS`](super::settings::MODEL_SETTINGS); `null` resets): every field is validated
/// against its type and range, then all are saved. 200 `{"model", "settings", "note"}`; 400 naming each
/// bad setting and its range; 404 for an unknown model.
async fn patch_model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(fields) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let s = st.settings();
    let p = ModelSettingsPatch::parse(&fields, &s).map_err(|errors| {
        let msgs: Vec<String> = errors
            .iter()
            .map(|(k, m)| format!("`{k}` {}", m.as_str().unwrap_or_default()))
            .collect();
        ApiError::bad_request(format!("invalid model settings: {}", msgs.join("; ")))
    })?;
    let m = st
        .db
        .update_model_settings(&name, &p)
        .await?
        .ok_or_else(|| no_model(&name))?;
    st.manager.refresh_model(&m);
    let settings = settings_of(&st, &name).await?;
    Ok(Json(
        json!({"model": m, "settings": settings, "note": p.note()}),
    ))
}

/// The model's settings as `GET /admin/api/models/{name}` shows them ([`describe`]).
async fn settings_of(st: &AppState, name: &str) -> Result<Value, ApiError> {
    let values = st
        .db
        .model_settings(name)
        .await?
        .ok_or_else(|| no_model(name))?;
    Ok(json!(describe(&values, &st.settings())))
}

async fn pin(st: AppState, name: String, pinned: bool) -> Result<Json<Value>, ApiError> {
    let p = ModelSettingsPatch::one("pinned", SettingValue::Bool(pinned));
    let m = st
        .db
        .update_model_settings(&name, &p)
        .await?
        .ok_or_else(|| no_model(&name))?;
    st.manager.refresh_model(&m);
    Ok(Json(json!({"model": m})))
}

async fn pin_model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    pin(st, name, true).await
}

async fn unpin_model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    pin(st, name, false).await
}

async fn load_model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let lease = st
        .manager
        .acquire(&name)
        .await
        .map_err(super::proxy::load_error)?;
    drop(lease);
    Ok(Json(
        json!({"model": name, "state": st.manager.state_of(&name)}),
    ))
}

async fn unload_model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    st.db
        .get_model(&name)
        .await?
        .ok_or_else(|| no_model(&name))?;
    let started = st.manager.unload(&name, "unloaded by admin");
    // Draining waits for in-flight requests: answer once stopped or after the grace period.
    st.manager
        .wait_stopped(&name, Duration::from_secs(STOP_GRACE_SECS + 5))
        .await;
    Ok(Json(
        json!({"model": name, "unloading": started, "state": st.manager.state_of(&name)}),
    ))
}

async fn delete_model(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = st
        .db
        .get_model(&name)
        .await?
        .ok_or_else(|| no_model(&name))?;
    st.manager.unload(&name, "deleted by admin");
    if !st
        .manager
        .wait_stopped(&name, Duration::from_secs(STOP_GRACE_SECS + 5))
        .await
    {
        return Err(ApiError::unavailable(
            "model_busy",
            format!("model `{name}` is still running requests; try again"),
        ));
    }
    // Only files inside MODELS_DIR are deleted (every part of a split GGUF).
    let path = std::path::PathBuf::from(&m.file_path);
    let deleted = super::catalog::delete_model_files(&path, &st.models_dir)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    st.db.delete_model(&name).await?;
    let files: Vec<String> = deleted.iter().map(|p| p.display().to_string()).collect();
    Ok(Json(json!({
        "deleted": name,
        "file_deleted": !files.is_empty(),
        "files_deleted": files,
        "path": m.file_path,
    })))
}

/// A hub error in the admin API's error shape: the status of [`HubError::http_status`], the message
/// the CLI prints, and [`HubError::code`] as `error.code`.
fn hub_error(e: HubError) -> ApiError {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let kind = match status.as_u16() {
        403 => "permission_error",
        404 => "not_found_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    ApiError {
        code: Some(e.code()),
        ..ApiError::new(status, kind, e.to_string())
    }
}

#[derive(Deserialize)]
struct RepoFilesQuery {
    repo_id: Option<String>,
    revision: Option<String>,
}

/// `GET /admin/api/models/repo-files?repo_id=OWNER/NAME[&revision=REV]`: the repo's GGUF models, smallest
/// first; the parts of a split GGUF are one entry.
///
/// 200: `{"repo_id": "owner/name", "revision": "main", "recommended": "m.Q4_K_M.gguf" | null,
/// "max_concurrent_downloads": 2, "files": [{"filename": "m.Q4_K_M.gguf", "quantization": "Q4_K_M" | null,
/// "size": 105000000, "parts": 1, "files": [{"filename", "size", "sha256"}], "complete": true,
/// "missing_parts": [], "is_projector": false, "recommended": true, "present": false}]}` — `filename` is
/// what `POST /admin/api/models/download` takes, `size` is the bytes of all parts, `recommended` is the
/// automatic choice (Q4_K_M, else Q8_0, else the smallest), `present` says the files are already in
/// MODELS_DIR.
///
/// Errors (`{"error": {"message", "type", "code"}}`): 400 `invalid_repo_id` (or no `repo_id`), 404
/// `repo_not_found` / `revision_not_found`, 403 `hf_token_required` / `hf_token_rejected` (gated or
/// private repo), 422 `no_gguf`, 502 `network_error` (hub unreachable after retries).
async fn repo_files(
    State(st): State<AppState>,
    _u: AdminUser,
    Query(q): Query<RepoFilesQuery>,
) -> Result<Json<Value>, ApiError> {
    let repo = q
        .repo_id
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "`repo_id` is required, e.g. ?repo_id=bartowski/SmolLM2-135M-Instruct-GGUF",
            )
        })?;
    let revision = q.revision.as_deref().unwrap_or("main");
    let hub = st.downloads.hub();
    let models = hub
        .list_models(repo, Some(revision))
        .await
        .map_err(hub_error)?;
    let recommended = choose_model(&models).map(|m| m.filename.clone());
    let files: Vec<Value> = models
        .iter()
        .map(|m| {
            json!({
                "filename": m.filename,
                "quantization": m.quantization,
                "size": m.total_size,
                "parts": m.files.len() + m.missing_parts.len(),
                "files": m.files.iter().map(|f| json!({
                    "filename": f.filename, "size": f.size, "sha256": f.sha256,
                })).collect::<Vec<_>>(),
                "complete": m.missing_parts.is_empty(),
                "missing_parts": m.missing_parts,
                "is_projector": m.is_projector,
                "recommended": recommended.as_ref() == Some(&m.filename),
                "present": hub.is_present(m),
            })
        })
        .collect();
    Ok(Json(json!({
        "repo_id": repo, "revision": revision, "recommended": recommended,
        "max_concurrent_downloads": hub.max_concurrent(), "files": files,
    })))
}

/// `POST /admin/api/models/download` with `{"repo_id": "owner/name", "filename"?: "m.Q4_K_M.gguf",
/// "revision"?: "main"}`: checks the repo (listing, file choice, free disk) and starts the download in
/// the background; without `filename` it picks Q4_K_M, else Q8_0, else the smallest GGUF; any part of a
/// split picks the whole split.
///
/// 202: `{"id": 3, "download": DownloadInfo}` (see [`DownloadInfo`](super::hub::DownloadInfo); state `queued`). Progress follows
/// as `{"type": "download", ...DownloadInfo}` events on `/admin/api/events` and in
/// `GET /admin/api/downloads`; at the end the state is `done` (with `model`, the catalogue name),
/// `failed` (with `error` and `error_code`) or `cancelled`.
///
/// Errors (`{"error": {"message", "type", "code"}}`): 400 `invalid_repo_id` / `invalid_argument` / bad
/// JSON, 404 `repo_not_found` / `revision_not_found` / `file_not_in_repo`, 403 `hf_token_required` /
/// `hf_token_rejected`, 422 `no_gguf` / `incomplete_split`, 409 `download_in_progress` (the same file is
/// already downloading), 507 `insufficient_disk` (with the numbers), 502 `network_error`.
async fn start_download(
    State(st): State<AppState>,
    _u: AdminUser,
    body: Result<Json<DownloadRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(mut req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    req.repo_id = req.repo_id.trim().to_string();
    req.filename = req.filename.filter(|f| !f.trim().is_empty());
    req.revision = req.revision.filter(|r| !r.trim().is_empty());
    let info = st.downloads.start(req).await.map_err(hub_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": info.id, "download": info})),
    ))
}

/// `GET /admin/api/downloads`: `{"downloads": [DownloadInfo…], "max_concurrent": 2}`, oldest first,
/// running and finished ones (the last 50 finished) of this supervisor run. See [`DownloadInfo`](super::hub::DownloadInfo):
/// `state`, `downloaded` and `total` (bytes), `bytes_per_sec`, `error`, `model`.
async fn downloads(State(st): State<AppState>, _u: AdminUser) -> Json<Value> {
    Json(json!({
        "downloads": st.downloads.list(),
        "max_concurrent": st.downloads.hub().max_concurrent(),
    }))
}

/// `DELETE /admin/api/downloads/{id}`: cancels a running or queued download and answers once its
/// partial files are deleted (nothing is registered); a finished one is removed from the list.
///
/// 200: `{"download": DownloadInfo, "cancelled": true}` (state `cancelled`, or `done` when it finished
/// first) or `{"download": …, "cancelled": false}` for a finished one. 404 `not_found_error` for an
/// unknown id, 400 for an id that is not a number.
async fn cancel_download(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("download id `{id}` is not a number")))?;
    let (info, cancelled) = st
        .downloads
        .cancel(id)
        .await
        .ok_or_else(|| ApiError::not_found(format!("no download with id {id}")))?;
    Ok(Json(json!({"download": info, "cancelled": cancelled})))
}

async fn workers(State(st): State<AppState>, _u: AdminUser) -> Json<Value> {
    Json(json!({"workers": st.manager.views()}))
}

#[derive(Deserialize)]
struct TailQuery {
    tail: Option<usize>,
}

async fn model_logs(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
    Query(q): Query<TailQuery>,
) -> Result<Json<Value>, ApiError> {
    st.db
        .get_model(&name)
        .await?
        .ok_or_else(|| no_model(&name))?;
    Ok(Json(
        json!({"model": name, "lines": st.manager.logs(&name).tail(q.tail.unwrap_or(200))}),
    ))
}

async fn supervisor_logs(_u: AdminUser, Query(q): Query<TailQuery>) -> Json<Value> {
    Json(json!({"lines": SUPERVISOR_LOG.tail(q.tail.unwrap_or(200))}))
}

/// Replays `backlog` then follows `rx` as SSE events named `log` (data: a [`LogLine`] as JSON).
fn follow(
    backlog: Vec<LogLine>,
    rx: broadcast::Receiver<LogLine>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let ev = |l: &LogLine| {
        SseEvent::default()
            .event("log")
            .json_data(l)
            .unwrap_or_default()
    };
    let first = futures_util::stream::iter(backlog.iter().map(ev).map(Ok).collect::<Vec<_>>());
    let rest = futures_util::stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(l) => return Some((Ok(ev(&l)), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    Sse::new(first.chain(rest)).keep_alive(KeepAlive::default())
}

async fn model_logs_follow(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
    Query(q): Query<TailQuery>,
) -> Result<Response, ApiError> {
    st.db
        .get_model(&name)
        .await?
        .ok_or_else(|| no_model(&name))?;
    let logs = st.manager.logs(&name);
    let rx = logs.follow();
    Ok(follow(logs.tail(q.tail.unwrap_or(100)), rx).into_response())
}

async fn supervisor_logs_follow(_u: AdminUser, Query(q): Query<TailQuery>) -> Response {
    let rx = SUPERVISOR_LOG.follow();
    follow(SUPERVISOR_LOG.tail(q.tail.unwrap_or(100)), rx).into_response()
}

async fn resources(State(st): State<AppState>, _u: AdminUser) -> Json<Value> {
    Json(json!({"sample": st.monitor.latest()}))
}

#[derive(Deserialize)]
struct SinceQuery {
    since: Option<i64>,
}

async fn resources_history(
    State(st): State<AppState>,
    _u: AdminUser,
    Query(q): Query<SinceQuery>,
) -> Json<Value> {
    Json(json!({"samples": st.monitor.history(q.since.unwrap_or(0))}))
}

/// One global setting as the admin API and the settings page show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GlobalSetting {
    pub name: &'static str,
    /// The live value; a secret only as `"(set)"` or `""`.
    pub value: Value,
    /// `default`, `file`, `env` or `db` (a database override).
    pub source: &'static str,
    /// Changeable at run time (`PUT /admin/api/settings`) rather than at a restart.
    pub live: bool,
    pub secret: bool,
}

/// Every global setting (the `Settings` fields, then [`REQUIRE_API_KEY`]) with its live value and
/// where it came from.
pub async fn global_settings(st: &AppState) -> Result<Vec<GlobalSetting>, super::db::DbError> {
    let s = serde_json::to_value(st.settings()).unwrap_or(Value::Null);
    let overrides = st.db.configurations().await?;
    let sources = st.sources.read().unwrap_or_else(|p| p.into_inner()).clone();
    let overridden = |name: &str| overrides.iter().any(|(k, _)| k == name);
    let mut out: Vec<GlobalSetting> = SETTING_NAMES
        .iter()
        .map(|&name| {
            let secret = SECRET_SETTINGS.contains(&name);
            let value = if secret {
                json!(if s[name].is_null() { "" } else { "(set)" })
            } else {
                s[name].clone()
            };
            let source = if overridden(name) {
                "db"
            } else {
                match sources.iter().find(|(n, _)| *n == name).map(|(_, s)| *s) {
                    Some(Source::File) => "file",
                    Some(Source::Env) => "env",
                    Some(Source::Db) => "db",
                    Some(Source::Default) | None => "default",
                }
            };
            GlobalSetting {
                name,
                value,
                source,
                live: LIVE_SETTINGS.contains(&name),
                secret,
            }
        })
        .collect();
    out.push(GlobalSetting {
        name: REQUIRE_API_KEY,
        value: json!(st.auth.require_api_key.load(Ordering::Relaxed)),
        source: if overridden(REQUIRE_API_KEY) {
            "db"
        } else {
            "default"
        },
        live: true,
        secret: false,
    });
    Ok(out)
}

async fn get_settings(State(st): State<AppState>, _u: AdminUser) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"settings": global_settings(&st).await?})))
}

async fn put_settings(
    State(st): State<AppState>,
    _u: AdminUser,
    body: Result<Json<serde_json::Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    // Validate everything first, then apply: all or nothing.
    let mut next = st.settings();
    let mut writes: Vec<(String, Option<String>)> = Vec::new();
    let mut require_key = None;
    for (k, v) in &body {
        let text = match v {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            v => Some(v.to_string()),
        };
        if k == REQUIRE_API_KEY {
            let b = match text.as_deref() {
                // Reset: back to the default for this HOST (required on a network address).
                None => super::auth::default_require_api_key(&st.base_settings),
                Some("true") => true,
                Some("false") => false,
                Some(x) => {
                    return Err(ApiError::bad_request(format!(
                        "`{k}` must be true or false, not {x}"
                    )));
                }
            };
            require_key = Some(b);
        } else if let Some(t) = &text {
            next = apply_override(&next, k, t).map_err(ApiError::bad_request)?;
        } else {
            if !LIVE_SETTINGS.contains(&k.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "`{k}` is not a run-time setting"
                )));
            }
            // Reset: back to the value from file/env/default.
            let base = st.base_settings.clone();
            let j = serde_json::to_value(&base).map_err(|e| ApiError::internal(e.to_string()))?;
            next = apply_override(&next, k, &j[k.as_str()].to_string())
                .map_err(ApiError::bad_request)?;
        }
        writes.push((k.clone(), text));
    }
    for (k, v) in &writes {
        match v {
            Some(v) => st.db.set_configuration(k, v).await?,
            None => st.db.delete_configuration(k).await?,
        }
    }
    *st.settings.write().unwrap_or_else(|p| p.into_inner()) = next;
    if let Some(b) = require_key {
        st.auth.require_api_key.store(b, Ordering::Relaxed);
    }
    tracing::info!(keys = ?writes.iter().map(|w| &w.0).collect::<Vec<_>>(), "settings overridden");
    get_settings(State(st), _u).await
}

async fn stats(
    State(st): State<AppState>,
    _u: AdminUser,
    Query(q): Query<SinceQuery>,
) -> Result<Json<Value>, ApiError> {
    let since = q.since.unwrap_or(0);
    Ok(Json(json!({
        "since": since,
        "models": st.db.request_stats(since).await?,
        "recent": st.db.recent_requests(100).await?,
    })))
}

async fn list_keys(State(st): State<AppState>, _u: AdminUser) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({"keys": st.db.list_api_keys().await?, "required": st.auth.require_api_key.load(Ordering::Relaxed)}),
    ))
}

#[derive(Deserialize)]
struct NewKey {
    name: String,
    #[serde(default)]
    scopes: Option<String>,
}

async fn create_key(
    State(st): State<AppState>,
    _u: AdminUser,
    body: Result<Json<NewKey>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(b) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let name = b.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::bad_request("`name` must be 1 to 100 characters"));
    }
    let (key, prefix) = generate_api_key();
    let row = st
        .db
        .insert_api_key(
            name,
            &hash_api_key(&key),
            &prefix,
            b.scopes.as_deref().unwrap_or("inference"),
        )
        .await?;
    Ok(Json(
        json!({"key": key, "api_key": row, "note": "the key is shown only once"}),
    ))
}

async fn revoke_key(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    if st.db.revoke_api_key(id).await? {
        Ok(Json(json!({"revoked": id})))
    } else {
        Err(ApiError::not_found(format!(
            "no active API key with id {id}"
        )))
    }
}

/// `GET /admin/api/events`: the WebSocket. Its upgrade is a GET, which [`AdminUser`] does not check for
/// CSRF, and a browser attaches the session cookie to a WebSocket any page opens (SameSite treats every
/// port of a host as the same site), so the `Origin` a browser always sends must name this server: 403
/// otherwise.
async fn events(
    State(st): State<AppState>,
    _u: AdminUser,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !super::auth::origin_ok(&headers, true) {
        return ApiError::forbidden(
            "cross-origin WebSocket refused: Origin must match the Host of this server",
        )
        .into_response();
    }
    let rx = st.events.subscribe();
    ws.on_upgrade(move |socket| pump(socket, rx))
}

async fn pump(mut socket: WebSocket, mut rx: broadcast::Receiver<super::events::Event>) {
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    let Ok(text) = serde_json::to_string(&ev) else { continue };
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = socket.send(Message::Text(json!({"type": "lagged", "skipped": n}).to_string().into())).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
        }
    }
}

/// The admin API routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/api/models", get(models))
        .route("/admin/api/models/scan", post(scan))
        .route("/admin/api/models/repo-files", get(repo_files))
        .route("/admin/api/models/download", post(start_download))
        .route("/admin/api/downloads", get(downloads))
        .route(
            "/admin/api/downloads/{id}",
            axum::routing::delete(cancel_download),
        )
        .route(
            "/admin/api/models/{name}",
            get(model).patch(patch_model).delete(delete_model),
        )
        .route("/admin/api/models/{name}/load", post(load_model))
        .route("/admin/api/models/{name}/unload", post(unload_model))
        .route("/admin/api/models/{name}/pin", post(pin_model))
        .route("/admin/api/models/{name}/unpin", post(unpin_model))
        .route("/admin/api/models/{name}/logs", get(model_logs))
        .route(
            "/admin/api/models/{name}/logs/follow",
            get(model_logs_follow),
        )
        .route("/admin/api/workers", get(workers))
        .route("/admin/api/logs", get(supervisor_logs))
        .route("/admin/api/logs/follow", get(supervisor_logs_follow))
        .route("/admin/api/resources", get(resources))
        .route("/admin/api/resources/history", get(resources_history))
        .route("/admin/api/settings", get(get_settings).put(put_settings))
        .route("/admin/api/stats", get(stats))
        .route("/admin/api/keys", get(list_keys).post(create_key))
        .route("/admin/api/keys/{id}", axum::routing::delete(revoke_key))
        .route("/admin/api/events", get(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_validated() {
        let s = Settings::default();
        let n = apply_override(&s, "model_idle_timeout", "2").unwrap();
        assert_eq!(n.model_idle_timeout, 2);
        let n = apply_override(&n, "threads", "null").unwrap();
        assert_eq!(n.threads, None);
        assert!(
            apply_override(&s, "max_memory_percent", "150")
                .unwrap_err()
                .contains("150")
        );
        assert!(apply_override(&s, "max_loaded_models", "0").is_err());
        assert!(
            apply_override(&s, "model_idle_timeout", "soon")
                .unwrap_err()
                .contains("soon")
        );
        assert!(apply_override(&s, "default_context_size", "999999").is_err());
        assert!(
            apply_override(&s, "port", "1")
                .unwrap_err()
                .contains("restart")
        );
    }

    /// Every live setting is refused at run time exactly when the same value is refused at start-up
    /// (`Settings::check` is the one rule), with the same reason.
    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
    fn run_time_changes_are_checked_like_a_start_up() {
        let cases = [
            ("drain_timeout", "0"),
            ("drain_timeout", "5"),
            ("idle_write_timeout", "0"),
            ("idle_write_timeout", "5"),
            ("max_memory_percent", "0"),
            ("max_memory_percent", "101"),
            ("max_loaded_models", "0"),
            ("jwt_expiry_hours", "0"),
            ("gpu_layers", "-2"),
            ("gpu_layers", "12"),
            ("default_context_size", "0"),
            ("default_context_size", "40000"),
            ("max_context_size", "4096"),
            ("model_idle_timeout", "0"),
            ("threads", "0"),
        ];
        for (key, value) in cases {
            let mut at_start = None;
            figment::Jail::expect_with(|jail| {
                jail.clear_env();
                jail.set_env(
                    format!("CYBER_INFERENCE_{}", key.to_ascii_uppercase()),
                    value,
                );
                at_start = Some(Settings::load(None).map(|_| ()).map_err(|e| e.to_string()));
                Ok(())
            });
            let at_start = at_start.unwrap();
            let at_run = apply_override(&Settings::default(), key, value).map(|_| ());
            assert_eq!(
                at_start.is_ok(),
                at_run.is_ok(),
                "{key}={value}: start-up {at_start:?}, run time {at_run:?}"
            );
            if let (Err(a), Err(b)) = (&at_start, &at_run) {
                let reason = a.rsplit(": ").next().unwrap();
                assert!(b.contains(reason), "{key}={value}: {a} vs {b}");
            }
        }
    }
}
