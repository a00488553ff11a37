//! The web admin UI: server-rendered askama pages (`templates/`, compiled into the binary) and the CSS/JS
//! in `static/` (embedded with `include_bytes!`), on top of the admin JSON API in `admin` and `auth`.
//!
//! | path | page |
//! | --- | --- |
//! | `GET /login?next=PATH` | login form (posts to `/admin/api/login`, then goes to `next`) |
//! | `GET /` | dashboard: resource charts, loaded models, recent requests, uptime, version |
//! | `GET /models`, `GET /models/{name}` | catalogue with actions and the Hugging Face download form (on the hub's `/admin/api/models/repo-files`, `/admin/api/models/download`, `/admin/api/downloads`; a plain notice when the build lacks them); one model's settings form and live logs |
//! | `GET /logs` | live logs of the supervisor or of any worker |
//! | `GET /settings` | settings with sources, API keys, admin password |
//! | `GET /chat` | chat playground (streams `/v1/chat/completions`) |
//! | `GET /static/...` | embedded CSS/JS/vendored uPlot |
//! | `POST /ui/api/models/{name}/settings` | per-model settings (`settings::MODEL_SETTINGS`), every field validated (422 `{errors: {field: msg}}`) |
//! | `POST /ui/api/password` | change the admin password (`{current, new}`) |
//!
//! Pages need a valid session cookie and otherwise redirect (303) to `/login?next=…`. The JWT is never
//! written into a page: it lives only in the HttpOnly cookie. State-changing `/ui/api/*` routes use the
//! `AdminUser` extractor, which refuses foreign Origins.

use std::sync::LazyLock;
use std::time::Instant;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::auth::{ADMIN_USER, AdminUser, COOKIE, hash_password, verify_password};
use super::db::ModelRow;
use super::error::ApiError;
use super::settings::{Applies, Kind, ModelSettingsPatch, SettingValues};

/// When the UI router was built (at supervisor start): the origin of the uptime shown on the dashboard.
static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The version shown in the footer and on the dashboard.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Minimum length of a new admin password (characters).
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Content-Security-Policy of every page: scripts, styles, images and connections only from this origin
/// (uPlot sets element styles through the CSSOM, which CSP allows).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// An error while rendering a page (a template failed or the database did).
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error("cannot render page `{page}`: {source}")]
    Render {
        page: &'static str,
        source: askama::Error,
    },
    #[error("database error while building page `{page}`: {source}")]
    Db {
        page: &'static str,
        source: super::db::DbError,
    },
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        tracing::error!("{self}");
        let body = format!(
            "<!doctype html><meta charset=utf-8><title>Error</title><p role=alert>{}</p>",
            escape(&self.to_string())
        );
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A page's HTML with the security headers every page carries (no caching: pages hold live state).
fn html(page: &'static str, t: &impl Template) -> Result<Response, UiError> {
    let body = t
        .render()
        .map_err(|source| UiError::Render { page, source })?;
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    Ok(r)
}

/// A logged-in admin on a page. Without a valid session cookie the request is answered with a 303 to
/// `/login?next=<the path asked for>`.
pub struct PageUser(pub String);

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

impl axum::extract::FromRequestParts<AppState> for PageUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Response> {
        match cookie_value(&parts.headers, COOKIE).and_then(|t| state.auth.verify(t)) {
            Some(c) => Ok(PageUser(c.sub)),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                Err(Redirect::to(&format!("/login?next={}", urlencode(&next))).into_response())
            }
        }
    }
}

/// Percent-encodes everything but unreserved characters and `/` (for the `next` query parameter).
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `next` as a local path to go back to after login: only paths of this site (`/x`, not `//host` or
/// `/\host`, which browsers treat as another origin); anything else becomes `/`.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.chars().any(|c| c.is_control()) =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// What every page's frame (`base.html`) shows.
pub struct Chrome {
    pub title: String,
    /// The nav entry to mark current: `dashboard`, `models`, `logs`, `settings`, `chat`.
    pub active: &'static str,
    pub user: String,
    pub version: &'static str,
}

impl Chrome {
    fn new(title: impl Into<String>, active: &'static str, user: String) -> Chrome {
        Chrome {
            title: title.into(),
            active,
            user,
            version: VERSION,
        }
    }
}

/// Bytes as `1.23 GB` / `45.6 MB` / `789 kB` (SI units).
pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    if f >= 1e9 {
        format!("{:.2} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} MB", f / 1e6)
    } else {
        format!("{:.0} kB", f / 1e3)
    }
}

/// Seconds as `3d 4h`, `2h 5m`, `4m 10s` or `12s`.
pub fn human_duration(s: u64) -> String {
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

fn human_count(n: i64) -> String {
    crate::engine::inspect::human_count(n.max(0) as u64)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(String::new, |x| x.to_string())
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
fn utc(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- login

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    next: String,
    version: &'static str,
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn login_page(Query(q): Query<NextQuery>) -> Result<Response, UiError> {
    html(
        "login",
        &LoginPage {
            next: safe_next(q.next.as_deref()),
            version: VERSION,
        },
    )
}

// ---------------------------------------------------------------- dashboard

/// One loaded model on the dashboard.
pub struct LoadedRow {
    pub name: String,
    pub state: String,
    pub port: String,
    pub rss: String,
    pub inflight: usize,
    pub idle_unload: String,
    /// What runs it: `vulkan · ADAPTER · 30/30 layers + output`, `cpu`, or `–` while loading.
    pub backend: String,
}

/// One recent request on the dashboard.
pub struct RequestView {
    pub at: String,
    pub model: String,
    /// Which API the request came in through (OpenAI, Ollama, Anthropic).
    pub api: &'static str,
    pub endpoint: String,
    pub status: i64,
    pub tokens: String,
    pub tokens_per_s: String,
    pub duration: String,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    chrome: Chrome,
    uptime: String,
    loaded: Vec<LoadedRow>,
    recent: Vec<RequestView>,
    catalogue_size: usize,
    /// The global idle timeout (s) the live table counts down from.
    idle_timeout: u64,
    /// The HOST when it is a network address and the admin chose `require_api_key = false`: `/v1/*` is
    /// open to anyone who can reach it, and the page says so.
    api_open_on: Option<String>,
}

/// The running workers, with the time left until each is unloaded for idleness (the model's own
/// `idle_timeout` from `models`, else the global one). RSS shows `–` until the monitor has measured it.
fn loaded_rows(st: &AppState, models: &[ModelRow]) -> Vec<LoadedRow> {
    let global = st.settings().model_idle_timeout;
    st.manager
        .views()
        .into_iter()
        .filter(|v| v.state.has_process())
        .map(|v| {
            let timeout = models
                .iter()
                .find(|m| m.name == v.model)
                .and_then(|m| m.idle_timeout)
                .map_or(global, |t| t.max(0) as u64);
            let idle_unload = if v.pinned {
                "never (pinned)".to_owned()
            } else if v.inflight > 0 {
                "busy".to_owned()
            } else if timeout == 0 {
                "never".to_owned()
            } else {
                human_duration(timeout.saturating_sub(v.idle_s))
            };
            LoadedRow {
                name: v.model,
                state: v.state.as_str().to_owned(),
                port: opt(v.port),
                rss: if v.rss_bytes == 0 {
                    "–".to_owned()
                } else {
                    human_bytes(v.rss_bytes)
                },
                inflight: v.inflight,
                idle_unload,
                backend: v
                    .backend
                    .as_ref()
                    .map_or_else(|| "–".to_owned(), |b| b.summary()),
            }
        })
        .collect()
}

fn request_view(r: &super::db::RequestRow) -> RequestView {
    let tps = match r.completion_tokens {
        Some(c) if r.duration_ms > 0 && c > 0 => {
            format!("{:.1}", c as f64 * 1000.0 / r.duration_ms as f64)
        }
        _ => "–".to_owned(),
    };
    RequestView {
        at: utc(r.created_at),
        model: r.model.clone(),
        api: super::foreign::api_of(&r.endpoint),
        endpoint: r.endpoint.clone(),
        status: r.status,
        tokens: format!("{} / {}", opt(r.prompt_tokens), opt(r.completion_tokens)),
        tokens_per_s: tps,
        duration: format!("{} ms", r.duration_ms),
    }
}

async fn dashboard(State(st): State<AppState>, PageUser(u): PageUser) -> Result<Response, UiError> {
    let recent = st
        .db
        .recent_requests(20)
        .await
        .map_err(|source| UiError::Db {
            page: "dashboard",
            source,
        })?;
    let models = st.db.list_models().await.map_err(|source| UiError::Db {
        page: "dashboard",
        source,
    })?;
    html(
        "dashboard",
        &DashboardPage {
            chrome: Chrome::new("Dashboard", "dashboard", u),
            uptime: human_duration(STARTED.elapsed().as_secs()),
            loaded: loaded_rows(&st, &models),
            recent: recent.iter().map(request_view).collect(),
            catalogue_size: models.len(),
            idle_timeout: st.settings().model_idle_timeout,
            api_open_on: (!st.base_settings.host_is_loopback()
                && !st
                    .auth
                    .require_api_key
                    .load(std::sync::atomic::Ordering::Relaxed))
            .then(|| st.base_settings.host.clone()),
        },
    )
}

// ---------------------------------------------------------------- models

/// One catalogue row on the models page.
pub struct ModelView {
    pub name: String,
    pub architecture: String,
    pub parameters: String,
    pub quantization: String,
    pub size: String,
    pub context_length: String,
    pub state: String,
    pub pinned: bool,
    pub running: bool,
    pub enabled: bool,
    /// Why the engine cannot run the file (empty when it can): shown instead of a Load button.
    pub unsupported: String,
    /// What runs it while a worker is ready (see [`LoadedRow::backend`]); empty otherwise.
    pub backend: String,
}

fn model_view(st: &AppState, m: &ModelRow) -> ModelView {
    let state = st.manager.state_of(&m.name);
    ModelView {
        name: m.name.clone(),
        architecture: m.architecture.clone().unwrap_or_else(|| "?".into()),
        parameters: m.parameters.map_or_else(|| "?".into(), human_count),
        quantization: m.quantization.clone().unwrap_or_else(|| "?".into()),
        size: human_bytes(m.size_bytes.max(0) as u64),
        context_length: m
            .context_length
            .map_or_else(|| "?".into(), |c| c.to_string()),
        state: state.as_str().to_owned(),
        pinned: m.pinned,
        running: state.has_process(),
        enabled: m.enabled,
        unsupported: m.unsupported_reason.clone().unwrap_or_default(),
        backend: st
            .manager
            .views()
            .into_iter()
            .find(|v| v.model == m.name)
            .and_then(|v| v.backend)
            .map(|b| b.summary())
            .unwrap_or_default(),
    }
}

#[derive(Template)]
#[template(path = "models.html")]
struct ModelsPage {
    chrome: Chrome,
    models: Vec<ModelView>,
    models_dir: String,
}

async fn models_page(
    State(st): State<AppState>,
    PageUser(u): PageUser,
) -> Result<Response, UiError> {
    let rows = st.db.list_models().await.map_err(|source| UiError::Db {
        page: "models",
        source,
    })?;
    html(
        "models",
        &ModelsPage {
            chrome: Chrome::new("Models", "models", u),
            models: rows.iter().map(|m| model_view(&st, m)).collect(),
            models_dir: st.models_dir.display().to_string(),
        },
    )
}

/// One field of a model's settings form (a row of [`MODEL_SETTINGS`](super::settings::MODEL_SETTINGS)).
pub struct FieldView {
    /// The JSON name (`ctx_size`, `temperature`, ...).
    pub name: &'static str,
    pub label: &'static str,
    pub value: String,
    /// What an empty field means (the global default).
    pub placeholder: String,
    /// The setting's help and when a change applies.
    pub help: String,
    /// The control: `number`, `checkbox`, `textarea` or `select`.
    pub input: &'static str,
    /// A `select`'s values (the empty first option is the default).
    pub options: &'static [&'static str],
    /// A checkbox's state.
    pub checked: bool,
}

#[derive(Template)]
#[template(path = "model.html")]
struct ModelPage {
    chrome: Chrome,
    model: ModelView,
    file_path: String,
    fields: Vec<FieldView>,
    sessions: Vec<SessionView>,
}

/// One past or present worker of a model.
pub struct SessionView {
    pub started: String,
    pub port: i64,
    pub status: String,
    pub reason: String,
    pub peak_rss: String,
}

/// The form's fields: every row of [`MODEL_SETTINGS`](super::settings::MODEL_SETTINGS) with the
/// model's value.
fn fields_of(values: &SettingValues, st: &AppState) -> Vec<FieldView> {
    let s = st.settings();
    values
        .iter()
        .map(|&(d, ref v)| {
            let when = match d.applies {
                Applies::NextLoad => "applies at the next load",
                Applies::Now => "applies at once",
                Applies::PerRequest(_) => "a default: a request's own value wins",
            };
            FieldView {
                name: d.name,
                label: d.label,
                value: match v {
                    Value::Null => String::new(),
                    Value::String(x) => x.clone(),
                    x => x.to_string(),
                },
                placeholder: (d.unset)(&s),
                help: match d.kind {
                    Kind::Bool { .. } => format!("{}; {when}", d.help),
                    _ => format!("{} ({}); {when}", d.help, d.range(&s)),
                },
                input: match d.kind {
                    Kind::Bool { .. } => "checkbox",
                    Kind::Text { .. } => "textarea",
                    Kind::Choice { .. } => "select",
                    Kind::Int { .. } | Kind::Float { .. } => "number",
                },
                options: match d.kind {
                    Kind::Choice { options } => options,
                    _ => &[],
                },
                checked: *v == Value::Bool(true),
            }
        })
        .collect()
}

async fn model_page(
    State(st): State<AppState>,
    PageUser(u): PageUser,
    Path(name): Path<String>,
) -> Result<Response, UiError> {
    let err = |source| UiError::Db {
        page: "model",
        source,
    };
    let Some(m) = st.db.get_model(&name).await.map_err(err)? else {
        let mut r = html(
            "model",
            &NotFoundPage {
                chrome: Chrome::new("Model not found", "models", u),
                what: format!("No model named “{name}” in the catalogue."),
            },
        )?;
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    };
    let sessions = st.db.model_sessions(m.id, 10).await.map_err(err)?;
    let values = st
        .db
        .model_settings(&m.name)
        .await
        .map_err(err)?
        .unwrap_or_default();
    html(
        "model",
        &ModelPage {
            chrome: Chrome::new(m.name.clone(), "models", u),
            model: model_view(&st, &m),
            file_path: m.file_path.clone(),
            fields: fields_of(&values, &st),
            sessions: sessions
                .iter()
                .map(|s| SessionView {
                    started: utc(s.started_at),
                    port: s.port,
                    status: s.status.clone(),
                    reason: s.stop_reason.clone().unwrap_or_default(),
                    peak_rss: s
                        .peak_rss_bytes
                        .map_or_else(String::new, |b| human_bytes(b.max(0) as u64)),
                })
                .collect(),
        },
    )
}

#[derive(Template)]
#[template(path = "not_found.html")]
struct NotFoundPage {
    chrome: Chrome,
    what: String,
}

async fn save_model_settings(
    State(st): State<AppState>,
    _u: AdminUser,
    Path(name): Path<String>,
    body: Result<Json<Map<String, Value>>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(form) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let patch = match ModelSettingsPatch::parse(&form, &st.settings()) {
        Ok(p) => p,
        Err(errors) => {
            return Ok((
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"errors": errors})),
            )
                .into_response());
        }
    };
    let m = st
        .db
        .update_model_settings(&name, &patch)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("model `{name}` not found")))?;
    st.manager.refresh_model(&m);
    Ok(Json(json!({"model": m, "note": patch.note()})).into_response())
}

// ---------------------------------------------------------------- logs

#[derive(Template)]
#[template(path = "logs.html")]
struct LogsPage {
    chrome: Chrome,
    models: Vec<String>,
    selected: String,
}

#[derive(Deserialize)]
struct LogsQuery {
    model: Option<String>,
}

async fn logs_page(
    State(st): State<AppState>,
    PageUser(u): PageUser,
    Query(q): Query<LogsQuery>,
) -> Result<Response, UiError> {
    let models: Vec<String> = st
        .db
        .list_models()
        .await
        .map_err(|source| UiError::Db {
            page: "logs",
            source,
        })?
        .into_iter()
        .map(|m| m.name)
        .collect();
    let selected = q.model.filter(|m| models.contains(m)).unwrap_or_default();
    html(
        "logs",
        &LogsPage {
            chrome: Chrome::new("Logs", "logs", u),
            models,
            selected,
        },
    )
}

// ---------------------------------------------------------------- settings

/// One setting on the settings page.
pub struct SettingView {
    pub name: String,
    pub value: String,
    /// `default`, `file`, `env` or `db`.
    pub source: String,
    /// Changeable at run time (an editable field) rather than needing a restart.
    pub live: bool,
    pub secret: bool,
    /// `bool` for a checkbox, `number`, or `text`.
    pub kind: &'static str,
}

/// One API key on the settings page.
pub struct KeyView {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub created: String,
    pub last_used: String,
    pub revoked: bool,
}

#[derive(Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    chrome: Chrome,
    settings: Vec<SettingView>,
    keys: Vec<KeyView>,
}

async fn settings_page(
    State(st): State<AppState>,
    PageUser(u): PageUser,
) -> Result<Response, UiError> {
    let err = |source| UiError::Db {
        page: "settings",
        source,
    };
    let settings: Vec<SettingView> = super::admin::global_settings(&st)
        .await
        .map_err(err)?
        .into_iter()
        .map(|g| SettingView {
            name: g.name.to_owned(),
            kind: match &g.value {
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                _ if g.name == "threads" => "number",
                _ => "text",
            },
            value: match g.value {
                Value::Null => String::new(),
                Value::String(x) => x,
                x => x.to_string(),
            },
            source: g.source.to_owned(),
            live: g.live,
            secret: g.secret,
        })
        .collect();
    let keys = st
        .db
        .list_api_keys()
        .await
        .map_err(err)?
        .into_iter()
        .map(|k| KeyView {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            created: utc(k.created_at),
            last_used: k.last_used_at.map_or_else(|| "never".to_owned(), utc),
            revoked: k.revoked_at.is_some(),
        })
        .collect();
    html(
        "settings",
        &SettingsPage {
            chrome: Chrome::new("Settings", "settings", u),
            settings,
            keys,
        },
    )
}

#[derive(Deserialize)]
struct PasswordBody {
    current: String,
    new: String,
}

/// `POST /ui/api/password {current, new}`: 200, or 422 `{errors: {current|new: msg}}`.
async fn change_password(
    State(st): State<AppState>,
    AdminUser(user): AdminUser,
    body: Result<Json<PasswordBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut errors = Map::new();
    if b.new.chars().count() < MIN_PASSWORD_CHARS {
        errors.insert(
            "new".into(),
            json!(format!("at least {MIN_PASSWORD_CHARS} characters")),
        );
    } else if b.new.len() > 1024 {
        errors.insert("new".into(), json!("at most 1024 bytes"));
    }
    let row = st
        .db
        .get_user(&user)
        .await?
        .ok_or_else(|| ApiError::unauthorized(format!("user `{user}` no longer exists")))?;
    let (cur, hash) = (b.current.clone(), row.password_hash.clone());
    let ok = st.auth.argon2(move || verify_password(&cur, &hash)).await?;
    if !ok {
        errors.insert("current".into(), json!("wrong password"));
    }
    if !errors.is_empty() {
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"errors": errors})),
        )
            .into_response());
    }
    let new = b.new;
    let hash = st
        .auth
        .argon2(move || hash_password(&new))
        .await?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    st.db.upsert_user(&user, &hash).await?;
    // Every session made with the old password ends; this one continues with a new token.
    super::auth::revoke_tokens(&st, &user).await?;
    tracing::info!(user = %user, "admin password changed; earlier tokens revoked");
    let hours = st.settings().jwt_expiry_hours;
    let (token, _) = st
        .auth
        .issue(&user, hours)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let note = if user == ADMIN_USER && st.settings().admin_password.is_some() {
        "changed; note CYBER_INFERENCE_ADMIN_PASSWORD is set and may reset it at the next start"
    } else {
        "changed"
    };
    let mut r = Json(json!({"ok": true, "note": note})).into_response();
    if let Ok(v) = super::auth::session_cookie(&token, hours).parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

// ---------------------------------------------------------------- chat

#[derive(Template)]
#[template(path = "chat.html")]
struct ChatPage {
    chrome: Chrome,
    models: Vec<ModelView>,
    /// `/v1/*` needs an API key (`require_api_key`): the page says that it chats with the admin session
    /// instead (see `auth::ApiKey`).
    require_api_key: bool,
}

async fn chat_page(State(st): State<AppState>, PageUser(u): PageUser) -> Result<Response, UiError> {
    let rows = st.db.list_models().await.map_err(|source| UiError::Db {
        page: "chat",
        source,
    })?;
    html(
        "chat",
        &ChatPage {
            chrome: Chrome::new("Chat", "chat", u),
            models: rows
                .iter()
                .filter(|m| m.enabled && !m.embedding)
                .map(|m| model_view(&st, m))
                .collect(),
            require_api_key: st
                .auth
                .require_api_key
                .load(std::sync::atomic::Ordering::Relaxed),
        },
    )
}

// ---------------------------------------------------------------- static files

/// The embedded static files: (path under `/static/`, content type, bytes).
pub const STATIC_FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../static/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../static/app.js"),
    ),
    (
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../static/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "vendor/uplot/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../static/vendor/uplot/uPlot.min.css"),
    ),
    (
        "vendor/uplot/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../static/vendor/uplot/LICENSE"),
    ),
];

async fn static_file(Path(path): Path<String>) -> Response {
    match STATIC_FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, ty, bytes)) => (
            [
                (header::CONTENT_TYPE, *ty),
                (header::CACHE_CONTROL, "public, max-age=300"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such static file").into_response(),
    }
}

/// The UI routes (pages, static files, `/ui/api/*`). Also starts the uptime clock.
pub fn router() -> Router<AppState> {
    LazyLock::force(&STARTED);
    Router::new()
        .route("/login", get(login_page))
        .route("/", get(dashboard))
        .route("/models", get(models_page))
        .route("/models/{name}", get(model_page))
        .route("/logs", get(logs_page))
        .route("/settings", get(settings_page))
        .route("/chat", get(chat_page))
        .route("/static/{*path}", get(static_file))
        .route("/ui/api/models/{name}/settings", post(save_model_settings))
        .route("/ui/api/password", post(change_password))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_kept_local() {
        assert_eq!(safe_next(Some("/models/a?x=1")), "/models/a?x=1");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/a\nb")), "/");
        assert_eq!(safe_next(None), "/");
        assert_eq!(urlencode("/models/a b?x=1&y"), "/models/a%20b%3Fx%3D1%26y");
    }

    #[test]
    fn humans() {
        assert_eq!(human_bytes(105_000_000), "105.0 MB");
        assert_eq!(human_bytes(2_340_000_000), "2.34 GB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3_725), "1h 2m");
        assert_eq!(human_duration(90_000), "1d 1h");
    }

    #[test]
    fn static_files_are_embedded() {
        for (p, ty, b) in STATIC_FILES {
            assert!(!b.is_empty(), "{p} is empty");
            assert!(ty.contains('/'));
        }
    }
}
