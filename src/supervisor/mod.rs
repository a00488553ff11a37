//! The supervisor (`serve`): catalogue, worker processes, proxy, eviction, monitor, auth, admin API.
//!
//! Start-up order: refuse a non-loopback HOST without ADMIN_PASSWORD → init steps → DB overrides of
//! settings → reap workers an earlier supervisor left → scan MODELS_DIR → monitor, idle evictor →
//! preload pinned models → listen. SIGTERM/SIGINT: stop accepting, give open requests the grace period,
//! stop every worker (SIGTERM, then SIGKILL), exit 0.

pub(crate) mod admin;
pub(crate) mod anthropic;
pub(crate) mod auth;
pub(crate) mod catalog;
pub(crate) mod db;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod foreign;
pub(crate) mod gpu;
pub(crate) mod init;
pub mod logs;
pub(crate) mod metrics;
pub(crate) mod monitor;
pub(crate) mod ollama;
pub mod process;
pub(crate) mod proxy;
pub(crate) mod responses;
pub mod settings;
pub(crate) mod ui;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::config::{Loaded, Settings, Source};

pub use error::{ApiError, ServeError};

/// Everything the HTTP handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: db::Db,
    /// Live settings: file/env values with DB overrides applied (changed by the admin API).
    pub settings: Arc<RwLock<Settings>>,
    /// Settings as loaded from defaults/file/env, before DB overrides (what a reset returns to).
    pub base_settings: Arc<Settings>,
    pub sources: Arc<RwLock<Vec<(&'static str, Source)>>>,
    pub manager: Arc<process::Manager>,
    pub events: events::Events,
    pub metrics: Arc<metrics::Metrics>,
    pub monitor: Arc<monitor::Monitor>,
    pub auth: Arc<auth::AuthState>,
    /// Client for forwarding to workers (no overall timeout: streams may be long). No idle connection
    /// is kept: each request opens its own loopback connection (tens of µs), so a worker that died is
    /// always a refused connect, which [`proxy::send_to_worker`] can safely send again, never a stale
    /// pooled connection that fails like a request the worker took and died on.
    pub proxy_http: reqwest::Client,
    pub models_dir: PathBuf,
    /// Model downloads started through the admin API (same code as `download-model`).
    pub downloads: Arc<hub::Downloads>,
}

impl AppState {
    /// A copy of the live settings.
    pub fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// `GET /health`: always open, 200 `{"status":"ok", ...}` while the supervisor runs.
async fn health(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "models_loaded": st.manager.loaded_count()}))
}

/// `GET /metrics`: Prometheus text.
async fn metrics_handler(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(st.manager.loaded_count()),
    )
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    // Validated with the settings (Settings::validate): an invalid value never gets here.
    let cors =
        crate::http_server::cors_layer(state.settings().cors_origins.as_deref().unwrap_or(""))
            .unwrap_or_else(|e| {
                tracing::error!("CORS_ORIGINS: {e}; no origin is allowed");
                tower_http::cors::CorsLayer::new()
            });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_handler))
        .merge(proxy::router())
        .merge(ollama::router())
        .merge(anthropic::router())
        .merge(responses::router())
        .merge(auth::router())
        .merge(admin::router())
        .merge(ui::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::request_guard,
        ))
        // Outermost: a preflight is answered before the auth guard (browsers send it without
        // credentials); the real request is checked as any other.
        .layer(cors)
        .with_state(state);
    crate::http_server::with_body_limit(app)
}

/// Applies the `configurations` overrides to `s` (invalid ones are logged and skipped); returns the
/// names applied and the `require_api_key` override (`None` when the admin has not chosen: then
/// [`auth::default_require_api_key`] decides).
async fn apply_db_overrides(
    db: &db::Db,
    s: &mut Settings,
) -> Result<(Vec<String>, Option<bool>), ServeError> {
    let mut applied = Vec::new();
    let mut require_key = None;
    for (k, v) in db.configurations().await? {
        if k == admin::REQUIRE_API_KEY {
            require_key = Some(v == "true");
            continue;
        }
        match admin::apply_override(s, &k, &v) {
            Ok(n) => {
                *s = n;
                applied.push(k);
            }
            Err(e) => tracing::warn!("ignoring settings override from the database: {e}"),
        }
    }
    Ok((applied, require_key))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the supervisor until SIGTERM/SIGINT.
///
/// Errors: [`ServeError::NoPasswordOnNetwork`] for a non-loopback HOST without ADMIN_PASSWORD, init
/// and database errors, [`ServeError::Bind`] when the port is taken.
pub async fn serve(loaded: Loaded) -> Result<(), ServeError> {
    let base = loaded.settings.clone();
    if !base.host_is_loopback() && base.admin_password.is_none() {
        return Err(ServeError::NoPasswordOnNetwork {
            host: base.host.clone(),
        });
    }
    let ini = init::run(&base).await?;
    if let Some(pw) = &ini.generated_password {
        println!("cyber-inference: created user `admin` with password: {pw}");
        println!("cyber-inference: (shown once; set CYBER_INFERENCE_ADMIN_PASSWORD to choose it)");
    }
    let db = ini.db.clone();
    let mut settings = base.clone();
    let (applied, require_key) = apply_db_overrides(&db, &mut settings).await?;
    let mut sources = loaded.sources();
    for (name, src) in sources.iter_mut() {
        if applied.iter().any(|a| a == name) {
            *src = Source::Db;
        }
    }
    let settings = Arc::new(RwLock::new(settings));
    let events = events::Events::default();
    let metrics = Arc::new(metrics::Metrics::default());
    let exe = std::env::current_exe()
        .map_err(|e| ServeError::Other(format!("cannot find own executable: {e}")))?;
    let manager = process::Manager::new(
        db.clone(),
        settings.clone(),
        events.clone(),
        metrics.clone(),
        exe,
    );
    let downloads = {
        let hub = hub::Hub::new(hub::HubConfig::from_settings(&loaded))
            .map_err(|e| ServeError::Other(e.to_string()))?;
        let m = manager.clone();
        hub::Downloads::new(
            hub,
            db.clone(),
            events.clone(),
            Box::new(move |row| m.refresh_model(row)),
        )
    };
    let reaped = manager.reap_recorded().await;
    if !reaped.is_empty() {
        tracing::warn!(?reaped, "killed workers left by an earlier supervisor");
    }
    let stale = hub::remove_stale_partials(&base.models_dir, hub::STALE_PARTIAL_AGE);
    if !stale.is_empty() {
        tracing::info!(files = ?stale, "removed stale partial downloads");
    }
    let report = catalog::scan(&db, &base.models_dir).await?;
    tracing::info!(models = ?report.models, skipped = report.skipped.len(), dir = %base.models_dir.display(), "catalogue scanned");
    let rows = db.list_models().await?;
    for m in &rows {
        manager.refresh_model(m);
    }
    // Forward supervisor log lines to the event stream.
    {
        let mut rx = logs::SUPERVISOR_LOG.follow();
        let ev = events.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(line) => ev.send(events::Event::Log { model: None, line }),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            }
        });
    }
    let monitor = monitor::spawn(
        manager.clone(),
        db.clone(),
        events.clone(),
        &base.models_dir,
        &base.data_dir,
    );
    {
        let m = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(process::manager::HEALTH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                m.check_health().await;
            }
        });
    }
    if base.retention_days > 0 {
        let db = db.clone();
        let days = i64::from(base.retention_days);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                match db.prune_history(db::now_ms() - days * 86_400_000).await {
                    Ok((0, 0)) => {}
                    Ok((r, s)) => tracing::info!(
                        "RETENTION_DAYS={days}: pruned {r} request(s) and {s} worker session(s)"
                    ),
                    Err(e) => tracing::warn!("pruning history: {e}"),
                }
            }
        });
    }
    {
        let m = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                for name in m.evict_idle() {
                    tracing::info!(model = %name, "unloading idle model");
                }
            }
        });
    }
    // Pinned models are kept loaded: start them now.
    for m in rows.iter().filter(|m| m.pinned && m.enabled) {
        let mgr = manager.clone();
        let name = m.name.clone();
        tokio::spawn(async move {
            if let Err(e) = mgr.acquire(&name).await {
                tracing::warn!(model = %name, "preload failed: {e}");
            }
        });
    }
    let mut auth = auth::AuthState::new(
        &ini.secret,
        require_key.unwrap_or_else(|| auth::default_require_api_key(&base)),
    );
    auth.allowed_hosts = base.allowed_host_list();
    let auth = Arc::new(auth);
    for (user, version) in db.token_versions().await? {
        auth.set_token_version(&user, version);
    }
    let state = AppState {
        db: db.clone(),
        settings,
        base_settings: Arc::new(base.clone()),
        sources: Arc::new(RwLock::new(sources)),
        manager: manager.clone(),
        events,
        metrics,
        monitor,
        auth,
        proxy_http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| ServeError::Other(e.to_string()))?,
        models_dir: base.models_dir.clone(),
        downloads,
    };
    let addr = format!("{}:{}", base.host, base.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    tracing::info!(%addr, db = %ini.db_path.display(), "supervisor listening");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // Header-read timeout, connection limit, TCP_NODELAY (time to first token is what users see).
    let server = crate::http_server::serve(
        listener,
        router(state),
        crate::http_server::Limits::SUPERVISOR,
        async move {
            let _ = stop_rx.wait_for(|v| *v).await;
        },
    );
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(|e| ServeError::Other(e.to_string()))?,
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing open requests (up to {} s)", process::STOP_GRACE_SECS);
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(process::STOP_GRACE_SECS), &mut server).await;
        }
    }
    manager.shutdown().await;
    db.close().await;
    tracing::info!("supervisor stopped");
    Ok(())
}

/// `cyber-inference init`: runs the init steps and prints what was created.
///
/// Errors: as [`init::run`].
pub async fn init_command(s: &Settings) -> Result<(), ServeError> {
    let ini = init::run(s).await?;
    println!("data folder:   {}", s.data_dir.display());
    println!("models folder: {}", s.models_dir.display());
    println!("database:      {}", ini.db_path.display());
    if s.jwt_secret.is_some() {
        println!("JWT secret:    from CYBER_INFERENCE_JWT_SECRET");
    } else {
        println!(
            "JWT secret:    {}",
            s.data_dir.join(init::SECRET_FILE).display()
        );
    }
    match ini.generated_password {
        Some(pw) => println!("admin user:    `admin`, password: {pw}  (shown once)"),
        None => println!(
            "admin user:    `admin` (password unchanged or from CYBER_INFERENCE_ADMIN_PASSWORD)"
        ),
    }
    ini.db.close().await;
    Ok(())
}

fn human_bytes(b: i64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

/// `cyber-inference list-models`: scans MODELS_DIR and prints the catalogue as a table.
///
/// Errors: as [`init::run`] and [`catalog::scan`].
pub async fn list_models_command(s: &Settings) -> Result<(), ServeError> {
    let ini = init::run(s).await?;
    let report = catalog::scan(&ini.db, &s.models_dir).await?;
    let rows = ini.db.list_models().await?;
    let live = ini.db.live_sessions().await?;
    println!(
        "{:<40} {:<10} {:>9} {:<8} {:>7} {:>10} {:<7} STATUS",
        "NAME", "ARCH", "PARAMS", "QUANT", "CTX", "SIZE", "PINNED"
    );
    for m in &rows {
        let status = live
            .iter()
            .find(|l| l.model_id == m.id)
            .map_or("stopped", |l| l.status.as_str());
        println!(
            "{:<40} {:<10} {:>9} {:<8} {:>7} {:>10} {:<7} {}",
            m.name,
            m.architecture.as_deref().unwrap_or("?"),
            m.parameters
                .map_or("?".into(), |p| crate::engine::inspect::human_count(
                    p as u64
                )),
            m.quantization.as_deref().unwrap_or("?"),
            m.context_length.map_or("?".into(), |c| c.to_string()),
            human_bytes(m.size_bytes),
            if m.pinned { "yes" } else { "no" },
            match (&m.unsupported_reason, m.enabled) {
                (Some(why), _) => format!("unsupported: {why}"),
                (None, true) => status.to_owned(),
                (None, false) => "disabled".to_owned(),
            },
        );
    }
    for (path, why) in &report.skipped {
        eprintln!("skipped {path}: {why}");
    }
    if rows.is_empty() {
        eprintln!(
            "no models in {} (put *.gguf files there)",
            s.models_dir.display()
        );
    }
    ini.db.close().await;
    Ok(())
}

/// `cyber-inference remove-model NAME`: deletes the model's file (when inside MODELS_DIR, unless
/// `keep_file`) and its catalogue row. Refuses while a supervisor has a worker of it running.
///
/// Errors: [`ServeError::Other`] for an unknown or running model, I/O and database errors.
pub async fn remove_model_command(
    s: &Settings,
    name: &str,
    keep_file: bool,
) -> Result<(), ServeError> {
    let ini = init::run(s).await?;
    let db = &ini.db;
    let m = db
        .get_model(name)
        .await?
        .ok_or_else(|| ServeError::Other(format!("no model `{name}` in the catalogue")))?;
    let running =
        db.live_sessions().await?.into_iter().any(|l| {
            l.model_id == m.id && l.pid.is_some_and(|p| process::sys::pid_alive(p as u32))
        });
    if running {
        return Err(ServeError::Other(format!(
            "model `{name}` is loaded by a running supervisor; unload it first (admin UI or POST /admin/api/models/{name}/unload)"
        )));
    }
    let path = PathBuf::from(&m.file_path);
    if !keep_file {
        // Every part of a split GGUF; only files inside MODELS_DIR.
        let deleted =
            catalog::delete_model_files(&path, &s.models_dir).map_err(|source| ServeError::Io {
                what: "(delete) model file",
                path: path.display().to_string(),
                source,
            })?;
        for p in deleted {
            println!("deleted {}", p.display());
        }
    }
    db.delete_model(name).await?;
    println!("removed `{name}` from the catalogue");
    db.close().await;
    Ok(())
}
pub mod healthcheck;
pub mod hub;
