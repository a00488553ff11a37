//! The manager of worker processes (see `state` for the state machine).
//!
//! Concurrency model: per-model slots live in one `std::sync::Mutex<HashMap>` held only for short,
//! non-async sections; a per-model `tokio::sync::Mutex` makes loads single-flight; one admission mutex
//! serializes "does it fit / whom to evict" decisions; a `watch` generation counter wakes every waiter
//! when a state or in-flight count changes. An in-flight [`Lease`] is taken under the slot lock in the
//! same section that checks `Ready`, so eviction (which checks in-flight = 0 under that lock) can never
//! cut a request.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use crate::config::Settings;
use crate::engine::gguf::GgufFile;
use crate::engine::kv_layout::{KvLayout, kv_layout};

use super::state::{ModelState, check_transition};
use super::sys;
use crate::supervisor::db::{Db, ModelRow, now_ms};
use crate::supervisor::events::{Event, Events};
use crate::supervisor::logs::{LogBuffer, RotatingFile};
use crate::supervisor::metrics::Metrics;

/// Seconds a worker gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(super::STOP_GRACE_SECS);
/// Seconds a worker gets to answer `/health` 200.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a load waits for other models to drain before answering 503.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(120);
/// Interval between health probes of ready workers ([`Manager::check_health`]).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Longest a ready worker may take to answer one `/health` probe.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Probes in a row without an answer after which a ready worker counts as hung and is killed (the next
/// request loads the model again).
pub const HEALTH_FAILURES: u32 = 3;
/// Fixed part of the memory margin added to every estimate (bytes).
pub const MARGIN_BYTES: u64 = 64 * 1024 * 1024;
/// Default number of slots (`-np`) per worker.
pub const DEFAULT_PARALLEL: u32 = 4;
/// The only variables of the supervisor's environment a worker inherits (when set): locale, paths,
/// Rust's own knobs and the engine's. Everything else — ADMIN_PASSWORD, JWT_SECRET, HF_TOKEN, cloud
/// credentials — stays in the supervisor. The worker also gets `CYBER_INFERENCE_LOG_LEVEL` and its key
/// ([`crate::worker::WORKER_API_KEY_ENV`]).
pub const WORKER_ENV_ALLOW: [&str; 12] = [
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    crate::engine::kernels::ISA_ENV,
    "CYBER_INFERENCE_DUMP_DIR",
];

/// A fresh random key for one worker process (256 bits, URL-safe base64).
fn worker_key() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Why a model could not be made ready. Each maps to an HTTP status in `proxy`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("model `{0}` not found")]
    NotFound(String),
    #[error("model `{0}` is disabled")]
    Disabled(String),
    #[error("model `{model}` cannot run on this engine: {reason}")]
    Unsupported { model: String, reason: String },
    #[error(
        "cannot load `{model}`: it needs about {need_mib} MiB, {used_mib} MiB of {total_mib} MiB are in use and the limit is MAX_MEMORY_PERCENT={percent}% ({limit_mib} MiB); no idle model is left to unload"
    )]
    InsufficientMemory {
        model: String,
        need_mib: u64,
        used_mib: u64,
        total_mib: u64,
        limit_mib: u64,
        percent: u8,
    },
    #[error(
        "cannot load `{model}`: {loaded} model(s) loaded (MAX_LOADED_MODELS={max}) and none became idle within {waited_s} s"
    )]
    TooManyLoaded {
        model: String,
        loaded: usize,
        max: u32,
        waited_s: u64,
    },
    #[error("model `{model}` failed to load: {reason}")]
    Failed { model: String, reason: String },
    #[error("model `{model}` failed recently ({reason}); retrying in {retry_s} s")]
    Backoff {
        model: String,
        reason: String,
        retry_s: u64,
    },
    #[error(
        "model `{model}` is being unloaded and did not stop within {waited_s} s; retry in {retry_s} s"
    )]
    Draining {
        model: String,
        waited_s: u64,
        retry_s: u64,
    },
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    #[error("database: {0}")]
    Db(String),
    /// The database is locked by another process, so the worker cannot be recorded (and reaped
    /// after a crash of the supervisor): the load is refused until the lock is gone.
    #[error("model `{model}` cannot be loaded now: {reason}")]
    DatabaseBusy { model: String, reason: String },
}

/// How a worker process ended (exit status or signal, as text).
type ExitInfo = String;

/// One running (or starting) worker process.
struct Worker {
    pid: u32,
    port: u16,
    /// The Bearer key this process requires (given through its environment, never argv).
    key: Arc<str>,
    instance: String,
    session_id: i64,
    model_id: i64,
    started: Instant,
    started_ms: i64,
    /// Set when the supervisor asked it to stop (so its exit is not a crash), with the reason.
    stop_reason: Mutex<Option<String>>,
    exited: watch::Receiver<Option<ExitInfo>>,
    /// Set (with the reason) when the supervisor cuts this worker's in-flight requests: every
    /// [`Lease`] holder ends its stream with an error.
    cut: watch::Sender<Option<String>>,
    /// Health probes in a row that got no answer.
    health_failures: std::sync::atomic::AtomicU32,
    /// Set the moment the supervisor kills the process or it is reaped, before its exit is processed
    /// ([`Manager::on_exit`] runs after the last output lines are read): no new lease goes to a worker
    /// that is gone.
    gone: std::sync::atomic::AtomicBool,
    /// Set while a request to this worker failed in transport (reset, closed mid-body) and no health
    /// probe has answered since: no new lease goes to it until one does or it is found gone. A process
    /// dying from a signal resets the connections the kernel accepted for it before its listening
    /// socket closes, so a request leased in that window would fail too ([`Lease::transport_failed`]).
    suspect: std::sync::atomic::AtomicBool,
}

struct Slot {
    state: ModelState,
    reason: Option<String>,
    worker: Option<Arc<Worker>>,
    inflight: usize,
    last_used: Instant,
    failures: u32,
    retry_at: Option<Instant>,
    pinned: bool,
    idle_timeout: Option<u64>,
    /// A per-request keep-alive (Ollama's `keep_alive`) overriding the idle timeout until the next
    /// load: `Some(None)` = never unloaded for idleness, `Some(Some(d))` = unloaded `d` after the last
    /// request.
    keep_alive: Option<Option<Duration>>,
    rss: u64,
    cpu: f32,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            state: ModelState::Stopped,
            reason: None,
            worker: None,
            inflight: 0,
            last_used: Instant::now(),
            failures: 0,
            retry_at: None,
            pinned: false,
            idle_timeout: None,
            keep_alive: None,
            rss: 0,
            cpu: 0.0,
        }
    }
}

/// What the admin API shows of a model's worker.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerView {
    pub model: String,
    pub state: ModelState,
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub session_id: Option<i64>,
    /// The nonce the worker was started with (`/props` `instance`).
    pub instance: Option<String>,
    pub started_at: Option<i64>,
    pub uptime_s: Option<u64>,
    pub inflight: usize,
    pub idle_s: u64,
    pub rss_bytes: u64,
    pub cpu_percent: f32,
    pub pinned: bool,
}

/// An in-flight guard: while it lives the model's worker is not evicted. Dropping it marks the request
/// finished.
pub struct Lease {
    mgr: Arc<Manager>,
    model: String,
    /// The worker's port on 127.0.0.1.
    pub port: u16,
    /// The worker's key, sent as `Authorization: Bearer` (the worker refuses requests without it).
    pub key: Arc<str>,
    /// Whether this request had to wait for a load (cold start).
    pub cold: bool,
    /// Becomes `Some(reason)` when the supervisor cuts the request (drain deadline, worker gone): the
    /// holder must end its response with an error then.
    pub cut: watch::Receiver<Option<String>>,
    /// The worker session this lease counts against.
    session_id: i64,
    worker: Arc<Worker>,
}

/// Longest a suspect worker is probed before the regular health probes ([`Manager::check_health`])
/// are left to decide.
const SUSPECT_PROBE_FOR: Duration = Duration::from_secs(30);

impl Lease {
    /// Reports that a request on this lease failed in transport; see [`WorkerReporter::transport_failed`].
    pub fn transport_failed(&self) {
        self.reporter().transport_failed();
    }

    /// A handle that reports on this lease's worker after the lease has moved on (a stream reader).
    pub fn reporter(&self) -> WorkerReporter {
        WorkerReporter {
            mgr: self.mgr.clone(),
            model: self.model.clone(),
            worker: self.worker.clone(),
        }
    }
}

/// Reports transport failures of requests to one worker ([`Lease::reporter`]).
#[derive(Clone)]
pub struct WorkerReporter {
    mgr: Arc<Manager>,
    model: String,
    worker: Arc<Worker>,
}

impl WorkerReporter {
    /// Reports that a request to this worker failed in transport (the connection was reset or closed
    /// before the answer ended): the worker is probably dying. It gets no new lease until a health
    /// probe answers (then it was something else) or its exit is seen; probes run every 200 ms for up
    /// to [`SUSPECT_PROBE_FOR`]. Requests that want the model meanwhile wait in
    /// [`Manager::acquire`] rather than being sent to it.
    pub fn transport_failed(&self) {
        let w = self.worker.clone();
        if w.gone.load(Ordering::Acquire) || w.suspect.swap(true, Ordering::AcqRel) {
            return;
        }
        let mgr = self.mgr.clone();
        let model = self.model.clone();
        tracing::info!(
            model,
            pid = w.pid,
            "a request failed in transport; the worker is probed"
        );
        tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{}/health", w.port);
            let until = Instant::now() + SUSPECT_PROBE_FOR;
            while !w.gone.load(Ordering::Acquire) && Instant::now() < until {
                let probe = mgr
                    .http
                    .get(&url)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if probe.is_ok() && !w.gone.load(Ordering::Acquire) {
                    tracing::info!(model, pid = w.pid, "the worker answers its health probe");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            w.suspect.store(false, Ordering::Release);
            mgr.bump();
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.mgr.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get_mut(&self.model)
            && s.worker
                .as_ref()
                .is_some_and(|w| w.session_id == self.session_id)
        {
            s.inflight = s.inflight.saturating_sub(1);
            s.last_used = Instant::now();
        }
        drop(slots);
        self.mgr.bump();
    }
}

/// The process manager. Shared as `Arc<Manager>`.
pub struct Manager {
    db: Db,
    settings: Arc<RwLock<Settings>>,
    events: Events,
    metrics: Arc<Metrics>,
    exe: PathBuf,
    slots: Mutex<HashMap<String, Slot>>,
    load_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    logs: Mutex<HashMap<String, Arc<LogBuffer>>>,
    admission: tokio::sync::Mutex<()>,
    changed: watch::Sender<u64>,
    http: reqwest::Client,
    sys: Mutex<sysinfo::System>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// KV layouts read from GGUF metadata (sliding-window layers), per (file path, size); `None` when the
    /// file could not be read.
    kv_layouts: Mutex<HashMap<(String, i64), Option<KvLayout>>>,
    /// Ports picked for loads whose worker is not in its slot yet (see [`PortReservation`]).
    reserved_ports: Mutex<HashSet<u16>>,
}

/// A worker port picked for one load: no other load can pick it while this lives (the load holds it
/// until its worker is in the slot, whose port then counts as used, or until it failed).
pub struct PortReservation {
    mgr: Arc<Manager>,
    /// The port.
    pub port: u16,
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        self.mgr
            .reserved_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.port);
    }
}

impl Manager {
    /// A manager that spawns `exe worker …` (normally the current executable).
    pub fn new(
        db: Db,
        settings: Arc<RwLock<Settings>>,
        events: Events,
        metrics: Arc<Metrics>,
        exe: PathBuf,
    ) -> Arc<Manager> {
        Arc::new(Manager {
            db,
            settings,
            events,
            metrics,
            exe,
            slots: Mutex::new(HashMap::new()),
            load_locks: Mutex::new(HashMap::new()),
            logs: Mutex::new(HashMap::new()),
            admission: tokio::sync::Mutex::new(()),
            changed: watch::channel(0).0,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            sys: Mutex::new(sysinfo::System::new()),
            shutting_down: false.into(),
            kv_layouts: Mutex::new(HashMap::new()),
            reserved_ports: Mutex::new(HashSet::new()),
        })
    }

    fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log ring of a model (created on first use).
    pub fn logs(&self, model: &str) -> Arc<LogBuffer> {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_owned())
            .or_default()
            .clone()
    }

    /// Moves `model` to `to` through the checked transition function, emits the event and mirrors it to
    /// `model_sessions` (in the background). Returns false (and changes nothing) for a forbidden move.
    fn transition(
        &self,
        model: &str,
        slot: &mut Slot,
        to: ModelState,
        reason: Option<String>,
    ) -> bool {
        let from = slot.state;
        if let Err(e) = check_transition(from, to) {
            tracing::error!(model, "{e}");
            return false;
        }
        slot.state = to;
        slot.reason = reason.clone();
        tracing::info!(model, %from, %to, reason = reason.as_deref().unwrap_or(""), "model state");
        self.events.send(Event::ModelState {
            model: model.to_owned(),
            from,
            to,
            reason: reason.clone(),
            at: now_ms(),
        });
        if let Some(w) = &slot.worker {
            let db = self.db.clone();
            let id = w.session_id;
            tokio::spawn(async move {
                if let Err(e) = db
                    .set_session_status(id, to.as_str(), reason.as_deref())
                    .await
                {
                    tracing::warn!("{e}");
                }
            });
        }
        self.bump();
        true
    }

    /// Caches a model's pin and idle timeout (call after its settings change).
    pub fn refresh_model(&self, m: &ModelRow) {
        let mut slots = self.slots();
        let s = slots.entry(m.name.clone()).or_insert_with(Slot::new);
        s.pinned = m.pinned;
        s.idle_timeout = m.idle_timeout.map(|t| t.max(0) as u64);
    }

    /// State of every model the manager has seen (models never loaded are absent: they are stopped).
    pub fn views(&self) -> Vec<WorkerView> {
        let slots = self.slots();
        let mut v: Vec<WorkerView> = slots
            .iter()
            .map(|(name, s)| WorkerView {
                model: name.clone(),
                state: s.state,
                reason: s.reason.clone(),
                pid: s.worker.as_ref().map(|w| w.pid),
                port: s.worker.as_ref().map(|w| w.port),
                session_id: s.worker.as_ref().map(|w| w.session_id),
                instance: s.worker.as_ref().map(|w| w.instance.clone()),
                started_at: s.worker.as_ref().map(|w| w.started_ms),
                uptime_s: s.worker.as_ref().map(|w| w.started.elapsed().as_secs()),
                inflight: s.inflight,
                idle_s: s.last_used.elapsed().as_secs(),
                rss_bytes: s.rss,
                cpu_percent: s.cpu,
                pinned: s.pinned,
            })
            .collect();
        v.sort_by(|a, b| a.model.cmp(&b.model));
        v
    }

    /// The state of one model (stopped when never seen).
    pub fn state_of(&self, model: &str) -> ModelState {
        self.slots()
            .get(model)
            .map_or(ModelState::Stopped, |s| s.state)
    }

    /// Number of models with a worker process (loading, ready or draining).
    pub fn loaded_count(&self) -> usize {
        self.slots()
            .values()
            .filter(|s| s.state.has_process())
            .count()
    }

    /// (model, session id, model id, pid) of every worker process, for the resource monitor.
    pub fn worker_pids(&self) -> Vec<(String, i64, i64, u32)> {
        self.slots()
            .iter()
            .filter_map(|(n, s)| {
                s.worker
                    .as_ref()
                    .map(|w| (n.clone(), w.session_id, w.model_id, w.pid))
            })
            .collect()
    }

    /// Stores the monitor's latest RSS/CPU sample of a model's worker.
    pub fn set_usage(&self, model: &str, rss: u64, cpu: f32) {
        if let Some(s) = self.slots().get_mut(model) {
            s.rss = rss;
            s.cpu = cpu;
        }
    }

    /// Makes `model` ready (loading it when needed, single-flight) and returns an in-flight lease on its
    /// worker. Waits for a draining worker to stop, and (bounded) for other models to drain when it does
    /// not fit.
    ///
    /// Errors: every [`LoadError`] variant.
    pub async fn acquire(self: &Arc<Self>, model: &str) -> Result<Lease, LoadError> {
        let mut cold = false;
        let drain_wait = Duration::from_secs(self.settings().drain_timeout);
        let mut draining_since: Option<Instant> = None;
        loop {
            if self.shutting_down.load(Ordering::Relaxed) {
                return Err(LoadError::ShuttingDown);
            }
            if let Some(l) = self.try_lease(model, cold) {
                return Ok(l);
            }
            cold = true;
            let lock = self
                .load_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(model.to_owned())
                .or_default()
                .clone();
            let guard = lock.lock().await;
            let mut rx = self.changed.subscribe();
            let st = {
                let slots = self.slots();
                slots
                    .get(model)
                    .map(|s| (s.state, s.retry_at, s.reason.clone()))
            };
            match st {
                // Ready but its process is gone (wait for the exit to be processed) or suspect (wait
                // for a probe to clear it).
                Some((ModelState::Ready, _, _)) => {
                    drop(guard);
                    let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
                    continue;
                }
                Some((ModelState::Draining, _, _))
                    if draining_since.get_or_insert_with(Instant::now).elapsed() >= drain_wait =>
                {
                    // The drain deadline cuts its requests, then the worker gets STOP_GRACE to exit.
                    return Err(LoadError::Draining {
                        model: model.to_owned(),
                        waited_s: drain_wait.as_secs(),
                        retry_s: super::STOP_GRACE_SECS,
                    });
                }
                Some((ModelState::Draining | ModelState::Loading, _, _)) => {
                    drop(guard);
                    let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                    continue;
                }
                Some((ModelState::Failed, Some(at), reason)) if at > Instant::now() => {
                    return Err(LoadError::Backoff {
                        model: model.to_owned(),
                        reason: reason.unwrap_or_default(),
                        retry_s: (at - Instant::now()).as_secs().max(1),
                    });
                }
                _ => {}
            }
            self.load(model).await?;
            drop(guard);
        }
    }

    fn try_lease(self: &Arc<Self>, model: &str, cold: bool) -> Option<Lease> {
        let mut slots = self.slots();
        let s = slots.get_mut(model)?;
        if s.state != ModelState::Ready {
            return None;
        }
        let w = s.worker.as_ref()?;
        if w.gone.load(Ordering::Acquire) || w.suspect.load(Ordering::Acquire) {
            return None;
        }
        let worker = w.clone();
        let (port, key, cut, session_id) = (w.port, w.key.clone(), w.cut.subscribe(), w.session_id);
        s.inflight += 1;
        s.last_used = Instant::now();
        Some(Lease {
            mgr: self.clone(),
            model: model.to_owned(),
            port,
            key,
            cold,
            cut,
            session_id,
            worker,
        })
    }

    /// Estimated resident memory of a worker for `m` (bytes): the measured peak RSS (+ 64 MiB) when known,
    /// else the file size + its f16 KV cache ([`kv_cache_bytes`] for the worker's total context, which the
    /// worker splits over its slots as llama-server does; for a model with sliding-window layers
    /// (gemma2/3) [`KvLayout::cache_bytes`] from the file's metadata: those layers keep only a window per
    /// slot) + a margin of 64 MiB and 10 % of the file.
    pub fn estimate(&self, m: &ModelRow) -> u64 {
        let (ctx, _, parallel) = self.worker_params(m);
        let size = m.size_bytes.max(0) as u64;
        let margin = MARGIN_BYTES + size / 10;
        if let Some(peak) = m.peak_rss_bytes.filter(|p| *p > 0) {
            return peak as u64 + MARGIN_BYTES;
        }
        let sliding = if m.embedding {
            None
        } else {
            self.sliding_kv_layout(m)
        };
        let kv = match (m.n_layer, m.n_embd_kv, sliding) {
            _ if m.embedding => 0,
            (_, _, Some(l)) => {
                let slots = u64::from(parallel.max(1));
                l.cache_bytes(u64::from(ctx) / slots, slots, 2)
            }
            (Some(l), Some(e), None) => {
                kv_cache_bytes(l.max(0) as u64, e.max(0) as u64, u64::from(ctx))
            }
            _ => 0,
        };
        size + kv + margin
    }

    /// The KV layout of `m`'s file when some of its layers use a sliding window (read once per file
    /// path and size through `engine::gguf`, then cached); `None` for other models or unreadable files.
    fn sliding_kv_layout(&self, m: &ModelRow) -> Option<KvLayout> {
        let key = (m.file_path.clone(), m.size_bytes);
        let mut cache = self.kv_layouts.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                GgufFile::open(&m.file_path)
                    .ok()
                    .and_then(|f| kv_layout(&f).ok())
            })
            .clone()
            .filter(|l| l.n_swa > 0)
    }

    /// (ctx, threads, parallel) a worker of `m` gets: the model's settings, else the globals; ctx is
    /// capped by MAX_CONTEXT_SIZE and the model's trained context.
    pub fn worker_params(&self, m: &ModelRow) -> (u32, usize, u32) {
        let s = self.settings();
        let mut ctx = m
            .ctx_size
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| *c > 0)
            .unwrap_or(s.default_context_size)
            .min(s.max_context_size);
        if let Some(train) = m
            .context_length
            .and_then(|c| u32::try_from(c).ok())
            .filter(|c| *c > 0)
        {
            ctx = ctx.min(train);
        }
        let threads = m
            .threads
            .and_then(|t| usize::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or_else(|| s.worker_threads());
        let parallel = m
            .parallel
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(DEFAULT_PARALLEL);
        (ctx, threads, parallel)
    }

    /// System memory (total, used = total − available) in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let mut sys = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        sys.refresh_memory();
        let total = sys.total_memory();
        (total, total.saturating_sub(sys.available_memory()))
    }

    /// The least recently used model that may be evicted now (ready, idle, not pinned), except `but`.
    fn lru_idle(&self, but: &str) -> Option<String> {
        let slots = self.slots();
        slots
            .iter()
            .filter(|(n, s)| {
                n.as_str() != but && s.state == ModelState::Ready && s.inflight == 0 && !s.pinned
            })
            .min_by_key(|(_, s)| s.last_used)
            .map(|(n, _)| n.clone())
    }

    /// Waits until `m` fits (count and memory), unloading LRU idle models. Called under the model's load
    /// lock; holds the admission lock. A model that does not fit waits (at most [`ADMISSION_WAIT`]) while
    /// other unpinned workers are busy or draining — they become evictable once their requests end, and
    /// no request is ever cut for it — and is refused at once when even unloading every other unpinned
    /// worker could not make room.
    async fn admit(self: &Arc<Self>, m: &ModelRow) -> Result<(), LoadError> {
        let _adm = self.admission.lock().await;
        let deadline = Instant::now() + ADMISSION_WAIT;
        let need = self.estimate(m);
        loop {
            let mut rx = self.changed.subscribe();
            let s = self.settings();
            let others = self.others(&m.name);
            let (total, used) = self.memory();
            let limit = total / 100 * u64::from(s.max_memory_percent);
            let count_ok = others.loaded < s.max_loaded_models as usize;
            let mem_ok = used.saturating_add(need) <= limit;
            if count_ok && mem_ok {
                return Ok(());
            }
            if let Some(victim) = self.lru_idle(&m.name) {
                let why = if count_ok {
                    format!("evicted to make memory for {}", m.name)
                } else {
                    format!(
                        "evicted for {} (MAX_LOADED_MODELS={})",
                        m.name, s.max_loaded_models
                    )
                };
                self.unload(&victim, &why);
                continue;
            }
            let mib = |b: u64| b / (1024 * 1024);
            let no_memory = || LoadError::InsufficientMemory {
                model: m.name.clone(),
                need_mib: mib(need),
                used_mib: mib(used),
                total_mib: mib(total),
                limit_mib: mib(limit),
                percent: s.max_memory_percent,
            };
            let too_many = |waited_s: u64| LoadError::TooManyLoaded {
                model: m.name.clone(),
                loaded: others.loaded,
                max: s.max_loaded_models,
                waited_s,
            };
            // Nothing idle to unload now. Give up at once when waiting cannot help.
            if !mem_ok && !others.may_free(used, need, limit) {
                return Err(no_memory());
            }
            if !count_ok && others.releasable == 0 && others.loading == 0 {
                // Every other worker is pinned.
                return Err(too_many(0));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(if mem_ok {
                    too_many(ADMISSION_WAIT.as_secs())
                } else {
                    no_memory()
                });
            }
            // Wait for a request to finish or a worker to stop (re-check at least every second: memory
            // is freed by the kernel, not announced).
            let _ =
                tokio::time::timeout((deadline - now).min(Duration::from_secs(1)), rx.changed())
                    .await;
        }
    }

    /// What the other models' workers hold, for [`Manager::admit`].
    fn others(&self, but: &str) -> Others {
        let slots = self.slots();
        let mut o = Others::default();
        for (_, s) in slots.iter().filter(|(n, _)| n.as_str() != but) {
            if !s.state.has_process() {
                continue;
            }
            o.loaded += 1;
            match s.state {
                ModelState::Loading => o.loading += 1,
                ModelState::Draining => o.add_releasable(s.rss),
                ModelState::Ready if !s.pinned => o.add_releasable(s.rss),
                _ => {}
            }
        }
        o
    }

    /// Picks and reserves a free port from WORKER_BASE_PORT up: not used by another worker, not reserved
    /// by another load, and bindable now. Two loads at once never get the same port.
    pub fn reserve_port(self: &Arc<Self>) -> Option<PortReservation> {
        let base = self.settings().worker_base_port;
        let used: Vec<u16> = self
            .slots()
            .values()
            .filter_map(|s| s.worker.as_ref().map(|w| w.port))
            .collect();
        let mut reserved = self
            .reserved_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let port = (base..=u16::MAX).take(1000).find(|p| {
            !used.contains(p)
                && !reserved.contains(p)
                && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
        })?;
        reserved.insert(port);
        Some(PortReservation {
            mgr: self.clone(),
            port,
        })
    }

    /// Starts a worker for `model` and waits until it is ready (or failed).
    async fn load(self: &Arc<Self>, model: &str) -> Result<(), LoadError> {
        let m = self
            .db
            .get_model(model)
            .await
            .map_err(|e| LoadError::Db(e.to_string()))?
            .ok_or_else(|| LoadError::NotFound(model.to_owned()))?;
        if !m.enabled {
            return Err(LoadError::Disabled(model.to_owned()));
        }
        if let Some(reason) = &m.unsupported_reason {
            return Err(LoadError::Unsupported {
                model: model.to_owned(),
                reason: reason.clone(),
            });
        }
        self.refresh_model(&m);
        self.admit(&m).await?;
        let fail = |reason: String| LoadError::Failed {
            model: model.to_owned(),
            reason,
        };
        let reservation = self
            .reserve_port()
            .ok_or_else(|| fail("no free port for a worker".into()))?;
        let port = reservation.port;
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let (ctx, threads, parallel) = self.worker_params(&m);
        let session_id = self
            .db
            .insert_session(m.id, port, &instance, "loading")
            .await
            .map_err(|e| {
                if e.is_busy() {
                    LoadError::DatabaseBusy {
                        model: model.to_owned(),
                        reason: e.to_string(),
                    }
                } else {
                    LoadError::Db(e.to_string())
                }
            })?;

        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("worker")
            .arg("-m")
            .arg(&m.file_path)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "-a",
                &m.name,
            ])
            .args(["-c", &ctx.to_string(), "-t", &threads.to_string()])
            .args(["-np", &parallel.to_string(), "--instance", &instance]);
        if m.embedding {
            cmd.arg("--embedding");
        }
        let key: Arc<str> = worker_key().into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .env_clear();
        for name in WORKER_ENV_ALLOW {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd.env("CYBER_INFERENCE_LOG_LEVEL", self.settings().log_level)
            .env(crate::worker::WORKER_API_KEY_ENV, &*key);
        sys::configure_worker_command(&mut cmd);
        let logs = self.logs(model);
        logs.push("supervisor", format!(
            "starting worker: {} worker -m {} --port {port} -c {ctx} -t {threads} -np {parallel}",
            self.exe.display(),
            m.file_path
        ));
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot start {}: {e}", self.exe.display());
                let _ = self
                    .db
                    .set_session_status(session_id, "failed", Some(&reason))
                    .await;
                let mut slots = self.slots();
                let s = slots.entry(model.to_owned()).or_insert_with(Slot::new);
                if s.state == ModelState::Stopped || s.state == ModelState::Failed {
                    // Through Loading so the checked machine sees a real attempt.
                    self.transition(model, s, ModelState::Loading, None);
                    self.transition(model, s, ModelState::Failed, Some(reason.clone()));
                    s.failures += 1;
                    s.retry_at = Some(Instant::now() + backoff(s.failures));
                }
                self.metrics.load_failures.fetch_add(1, Ordering::Relaxed);
                return Err(fail(reason));
            }
        };
        let pid = child.id().unwrap_or(0);
        let _ = self.db.set_session_pid(session_id, pid).await;
        let (exit_tx, exit_rx) = watch::channel(None);
        let worker = Arc::new(Worker {
            pid,
            port,
            key: key.clone(),
            instance: instance.clone(),
            session_id,
            model_id: m.id,
            started: Instant::now(),
            started_ms: now_ms(),
            stop_reason: Mutex::new(None),
            exited: exit_rx.clone(),
            cut: watch::channel(None).0,
            health_failures: 0.into(),
            gone: false.into(),
            suspect: false.into(),
        });
        {
            let mut slots = self.slots();
            let s = slots.entry(model.to_owned()).or_insert_with(Slot::new);
            s.worker = Some(worker.clone());
            s.rss = 0;
            s.keep_alive = None;
            self.transition(model, s, ModelState::Loading, None);
        }

        // Output capture.
        let log_dir = self.settings().data_dir.join("logs");
        let file = Arc::new(Mutex::new(RotatingFile::open(
            &log_dir.join(format!("{}.log", sanitize(model))),
        )));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for (stream, pipe) in [
            (
                "stdout",
                stdout.map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ),
            (
                "stderr",
                stderr.map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            let logs = logs.clone();
            let file = file.clone();
            let events = self.events.clone();
            let model = model.to_owned();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = crate::supervisor::logs::strip_ansi(&line);
                    file.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write_line(&format!("{stream}: {line}"));
                    let l = logs.push(stream, line);
                    events.send(Event::Log {
                        model: Some(model.clone()),
                        line: l,
                    });
                }
            });
        }
        // Exit watcher: the one place that handles a worker's end.
        {
            let mgr = self.clone();
            let model = model.to_owned();
            let worker = worker.clone();
            tokio::spawn(async move {
                let status = child.wait().await;
                worker.gone.store(true, Ordering::Release);
                // Give the pipe readers a moment to capture the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let text = match status {
                    Ok(st) => describe_exit(st),
                    Err(e) => format!("wait failed: {e}"),
                };
                mgr.on_exit(&model, &worker, text.clone()).await;
                let _ = exit_tx.send(Some(text));
            });
        }

        // Health: /health 200, then /props must carry our nonce.
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let mut exit_rx = exit_rx;
        let base = format!("http://127.0.0.1:{port}");
        let outcome: Result<(), String> = loop {
            if exit_rx.borrow().is_some() {
                break Err(String::new());
            }
            if Instant::now() >= deadline {
                break Err(format!("not ready within {} s", LOAD_TIMEOUT.as_secs()));
            }
            match self.http.get(format!("{base}/health")).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    let props = self.http.get(format!("{base}/props")).bearer_auth(&*key);
                    match props.send().await {
                        Ok(r) => match r.json::<serde_json::Value>().await {
                            Ok(p)
                                if p.get("instance").and_then(|v| v.as_str())
                                    == Some(instance.as_str()) =>
                            {
                                break Ok(());
                            }
                            Ok(p) => {
                                break Err(format!(
                                    "port {port} answered with another instance ({}) — not our worker",
                                    p.get("instance").map_or("none".into(), |v| v.to_string())
                                ));
                            }
                            Err(e) => break Err(format!("bad /props answer: {e}")),
                        },
                        Err(e) => break Err(format!("/props failed: {e}")),
                    }
                }
                _ => {}
            }
            tokio::select! {
                _ = exit_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        };
        match outcome {
            Ok(()) => {
                let mut slots = self.slots();
                if let Some(s) = slots.get_mut(model)
                    && s.state == ModelState::Loading
                    && s.worker
                        .as_ref()
                        .is_some_and(|w| w.session_id == session_id)
                {
                    self.transition(model, s, ModelState::Ready, None);
                    s.last_used = Instant::now();
                    s.retry_at = None;
                    self.metrics.loads.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                let reason = slots
                    .get(model)
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_else(|| "stopped while loading".into());
                Err(fail(reason))
            }
            Err(why) => {
                if !why.is_empty() {
                    *worker.stop_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(why.clone());
                    self.kill_now(&worker).await;
                }
                let _ = tokio::time::timeout(STOP_GRACE, exit_rx.wait_for(|e| e.is_some())).await;
                self.metrics.load_failures.fetch_add(1, Ordering::Relaxed);
                let reason = self
                    .slots()
                    .get(model)
                    .and_then(|s| s.reason.clone())
                    .unwrap_or(why);
                Err(fail(reason))
            }
        }
    }

    /// Marks the end of a worker: stopped when the supervisor asked for it, failed otherwise (with the
    /// exit status and the last stderr lines as the reason, and a backoff before the next try).
    async fn on_exit(&self, model: &str, worker: &Arc<Worker>, exit: String) {
        let asked = worker
            .stop_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stderr = self.logs(model).last_stderr(5);
        let mut slots = self.slots();
        let Some(s) = slots.get_mut(model) else {
            return;
        };
        if !s.worker.as_ref().is_some_and(|w| Arc::ptr_eq(w, worker)) {
            return;
        }
        let from = s.state;
        let (to, reason) = match (&asked, from) {
            (Some(why), ModelState::Draining) => (ModelState::Stopped, format!("{why} ({exit})")),
            (Some(why), ModelState::Loading) if why.starts_with("unload") => {
                (ModelState::Stopped, format!("{why} ({exit})"))
            }
            (Some(why), _) => (ModelState::Failed, format!("{why}; {exit}")),
            (None, _) => {
                let mut r = format!("worker {exit}");
                if !stderr.is_empty() {
                    r.push_str("; last stderr:\n");
                    r.push_str(&stderr);
                }
                (ModelState::Failed, r)
            }
        };
        if to == ModelState::Failed {
            if from == ModelState::Ready {
                self.metrics.crashes.fetch_add(1, Ordering::Relaxed);
            }
            s.failures = if worker.started.elapsed() > Duration::from_secs(60) {
                1
            } else {
                s.failures + 1
            };
            s.retry_at = Some(Instant::now() + backoff(s.failures));
        }
        tracing::info!(model, pid = worker.pid, "worker exited: {exit}");
        self.transition(model, s, to, Some(reason.clone()));
        // Requests still holding a lease on this worker are over (their counts went with it).
        worker
            .cut
            .send_replace(Some(format!("the worker of `{model}` ended: {reason}")));
        s.inflight = 0;
        s.worker = None;
        s.rss = 0;
        s.cpu = 0.0;
    }

    async fn kill_now(&self, w: &Worker) {
        // Gone from now: its listening socket may accept connections until the last thread exits.
        w.gone.store(true, Ordering::Release);
        let _ = sys::signal_group(w.pid, sys::Signal::SIGKILL);
    }

    /// Starts unloading `model`: ready → draining (new requests wait), then, once no request is in
    /// flight, SIGTERM and SIGKILL after [`STOP_GRACE`]. A loading worker is stopped at once. Returns
    /// whether anything was started.
    pub fn unload(self: &Arc<Self>, model: &str, why: &str) -> bool {
        let worker = {
            let mut slots = self.slots();
            let Some(s) = slots.get_mut(model) else {
                return false;
            };
            let Some(w) = s.worker.clone() else {
                return false;
            };
            match s.state {
                ModelState::Ready => {
                    *w.stop_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("unloaded: {why}"));
                    self.transition(model, s, ModelState::Draining, Some(why.to_owned()));
                    self.metrics.evictions.fetch_add(1, Ordering::Relaxed);
                }
                ModelState::Loading => {
                    *w.stop_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("unloaded while loading: {why}"));
                }
                _ => return false,
            }
            w
        };
        let mgr = self.clone();
        let model = model.to_owned();
        let why = why.to_owned();
        let drain = Duration::from_secs(self.settings().drain_timeout);
        tokio::spawn(async move {
            // Drain: wait for in-flight requests, at most DRAIN_TIMEOUT; then cut them.
            let mut rx = mgr.changed.subscribe();
            let deadline = tokio::time::Instant::now() + drain;
            loop {
                let busy = mgr.slots().get(&model).map_or(0, |s| s.inflight);
                if busy == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    let reason = format!(
                        "`{model}` is being unloaded ({why}) and its request(s) did not finish within DRAIN_TIMEOUT={} s",
                        drain.as_secs()
                    );
                    tracing::warn!(
                        model,
                        in_flight = busy,
                        "drain deadline passed: cutting {busy} request(s): {reason}"
                    );
                    mgr.logs(&model)
                        .push("supervisor", format!("cutting {busy} request(s): {reason}"));
                    worker.cut.send_replace(Some(reason));
                    break;
                }
            }
            mgr.terminate(&worker).await;
        });
        true
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; returns when the process has exited.
    async fn terminate(&self, w: &Worker) {
        let _ = sys::signal_group(w.pid, sys::Signal::SIGTERM);
        let mut rx = w.exited.clone();
        if tokio::time::timeout(STOP_GRACE, rx.wait_for(|e| e.is_some()))
            .await
            .is_err()
        {
            tracing::warn!(
                pid = w.pid,
                "worker ignored SIGTERM for {} s; SIGKILL",
                STOP_GRACE.as_secs()
            );
            let _ = sys::signal_group(w.pid, sys::Signal::SIGKILL);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|e| e.is_some())).await;
        }
    }

    /// Probes every ready worker's `/health` once (all at once, each at most [`HEALTH_TIMEOUT`]); a
    /// worker that left [`HEALTH_FAILURES`] probes in a row unanswered is hung (stopped, deadlocked):
    /// it is killed with the reason logged, its streams end with an error, and the next request loads
    /// the model again. Any HTTP answer counts as alive. Returns the models whose worker was killed.
    pub async fn check_health(self: &Arc<Self>) -> Vec<String> {
        let ready: Vec<(String, Arc<Worker>)> = self
            .slots()
            .iter()
            .filter(|(_, s)| s.state == ModelState::Ready)
            .filter_map(|(n, s)| s.worker.clone().map(|w| (n.clone(), w)))
            .collect();
        let probes = ready.into_iter().map(|(name, w)| {
            let rq = self
                .http
                .get(format!("http://127.0.0.1:{}/health", w.port))
                .timeout(HEALTH_TIMEOUT);
            async move { (name, w, rq.send().await.is_ok()) }
        });
        let mut killed = Vec::new();
        for (name, w, ok) in futures_util::future::join_all(probes).await {
            if ok {
                w.health_failures.store(0, Ordering::Relaxed);
                continue;
            }
            let n = w.health_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n < HEALTH_FAILURES || self.state_of(&name) != ModelState::Ready {
                continue;
            }
            let why = format!(
                "hung: {n} health probes in a row got no answer within {} s; killed",
                HEALTH_TIMEOUT.as_secs()
            );
            tracing::warn!(model = %name, pid = w.pid, "{why}");
            self.logs(&name).push("supervisor", why.clone());
            *w.stop_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            self.kill_now(&w).await;
            killed.push(name);
        }
        killed
    }

    /// Unloads models idle longer than their timeout (a request's keep-alive, else the model's, else
    /// MODEL_IDLE_TIMEOUT; 0 = never). Pinned, loading and busy models are never touched. Returns the
    /// models unloaded.
    pub fn evict_idle(self: &Arc<Self>) -> Vec<String> {
        let global = self.settings().model_idle_timeout;
        let victims: Vec<(String, Duration)> = self
            .slots()
            .iter()
            .filter_map(|(n, s)| {
                let t = Self::idle_limit(s, global)?;
                (s.state == ModelState::Ready
                    && s.inflight == 0
                    && !s.pinned
                    && s.last_used.elapsed() >= t)
                    .then(|| (n.clone(), t))
            })
            .collect();
        victims
            .into_iter()
            .filter(|(n, t)| self.unload(n, &format!("idle for {:.1} s", t.as_secs_f64())))
            .map(|(n, _)| n)
            .collect()
    }

    /// How long `s` may stay idle (`None` = forever).
    fn idle_limit(s: &Slot, global: u64) -> Option<Duration> {
        match s.keep_alive {
            Some(k) => k,
            None => {
                let t = s.idle_timeout.unwrap_or(global);
                (t > 0).then(|| Duration::from_secs(t))
            }
        }
    }

    /// Sets a loaded model's keep-alive until its next load (Ollama's per-request `keep_alive`):
    /// `None` = never unloaded for idleness, `Some(d)` = unloaded once idle for `d`.
    pub fn set_keep_alive(&self, model: &str, keep: Option<Duration>) {
        if let Some(s) = self.slots().get_mut(model) {
            s.keep_alive = Some(keep);
        }
    }

    /// Time left before a ready, idle model is unloaded for idleness (zero while a request runs it is
    /// not counted down: the full limit is returned); `None` when it never is (pinned, no timeout) or
    /// has no worker.
    pub fn expires_in(&self, model: &str) -> Option<Duration> {
        let global = self.settings().model_idle_timeout;
        let slots = self.slots();
        let s = slots.get(model)?;
        if !s.state.has_process() || s.pinned {
            return None;
        }
        let t = Self::idle_limit(s, global)?;
        if s.inflight > 0 {
            return Some(t);
        }
        Some(t.saturating_sub(s.last_used.elapsed()))
    }

    /// Waits until `model` has no worker process (or `timeout` passes). Returns whether it stopped.
    pub async fn wait_stopped(&self, model: &str, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if !self.state_of(model).has_process() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(deadline - now, rx.changed()).await;
        }
    }

    /// Stops every worker (SIGTERM, then SIGKILL after the grace period) and refuses new loads.
    pub async fn shutdown(self: &Arc<Self>) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let workers: Vec<(String, Arc<Worker>)> = {
            let mut slots = self.slots();
            let names: Vec<String> = slots.keys().cloned().collect();
            let mut v = Vec::new();
            for n in names {
                let s = slots.get_mut(&n).expect("key from the same map");
                if let Some(w) = s.worker.clone() {
                    *w.stop_reason.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some("unloaded: supervisor shutting down".into());
                    if s.state == ModelState::Ready {
                        self.transition(
                            &n,
                            s,
                            ModelState::Draining,
                            Some("supervisor shutting down".into()),
                        );
                    }
                    v.push((n, w));
                }
            }
            v
        };
        let mut set = tokio::task::JoinSet::new();
        for (_, w) in workers {
            let mgr = self.clone();
            set.spawn(async move { mgr.terminate(&w).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Kills workers recorded as alive in `model_sessions` by an earlier supervisor (a crash or SIGKILL
    /// left them, or PDEATHSIG is unavailable) — only processes whose command line carries the session's
    /// nonce, so a recycled pid is never hit — and marks those sessions stopped. Returns the pids killed.
    pub async fn reap_recorded(&self) -> Vec<u32> {
        let Ok(sessions) = self.db.live_sessions().await else {
            return Vec::new();
        };
        let mut killed = Vec::new();
        for s in sessions {
            let pid = s.pid.and_then(|p| u32::try_from(p).ok());
            let mut reason = "supervisor restarted".to_string();
            if let Some(pid) = pid
                && sys::pid_alive(pid)
                && sys::cmdline(pid).contains(&s.instance)
            {
                let _ = sys::signal_group(pid, sys::Signal::SIGTERM);
                let deadline = Instant::now() + STOP_GRACE;
                while sys::pid_alive(pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if sys::pid_alive(pid) {
                    let _ = sys::signal_group(pid, sys::Signal::SIGKILL);
                }
                reason = format!("reaped orphan worker pid {pid} at supervisor start");
                tracing::warn!("{reason}");
                killed.push(pid);
            }
            let _ = self
                .db
                .set_session_status(s.id, "stopped", Some(&reason))
                .await;
        }
        killed
    }
}

/// The other workers as admission sees them.
#[derive(Debug, Default, PartialEq)]
struct Others {
    /// Workers with a process (loading, ready or draining).
    loaded: usize,
    /// Of those, still loading (they may become evictable).
    loading: usize,
    /// Workers that will or may go away without cutting a request: draining, or ready and unpinned.
    releasable: usize,
    /// Their measured RSS (bytes).
    releasable_rss: u64,
    /// Whether one of them has no RSS sample yet (its size is unknown).
    unmeasured: bool,
}

impl Others {
    fn add_releasable(&mut self, rss: u64) {
        self.releasable += 1;
        self.releasable_rss = self.releasable_rss.saturating_add(rss);
        self.unmeasured |= rss == 0;
    }

    /// Whether unloading every releasable worker may bring `used + need` under `limit` (an unmeasured
    /// worker might be large enough, and a loading one may become releasable).
    fn may_free(&self, used: u64, need: u64, limit: u64) -> bool {
        (self.releasable > 0 && self.unmeasured)
            || self.loading > 0
            || used
                .saturating_sub(self.releasable_rss)
                .saturating_add(need)
                <= limit
    }
}

/// Bytes of an f16 KV cache (keys and values) of `n_layer` layers × `n_ctx_total` positions (all slots
/// together) × `n_embd_kv` elements: `2 · n_layer · n_ctx_total · n_embd_kv · 2`. Saturates instead of
/// overflowing on absurd metadata.
pub fn kv_cache_bytes(n_layer: u64, n_embd_kv: u64, n_ctx_total: u64) -> u64 {
    2u64.saturating_mul(n_layer)
        .saturating_mul(n_ctx_total)
        .saturating_mul(n_embd_kv)
        .saturating_mul(2)
}

/// Delay before retrying a model whose worker failed `n` times in a row: none after the first failure
/// (a crash is retried by the next request), then 2, 4, 8 … s, at most 60 s.
pub fn backoff(n: u32) -> Duration {
    if n <= 1 {
        Duration::ZERO
    } else {
        Duration::from_secs((1u64 << (n - 1).min(6)).min(60))
    }
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited".into(),
    }
}

/// A model id made safe as a file name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(50), Duration::from_secs(60));
        assert_eq!(sanitize("a/b c.gguf"), "a_b_c.gguf");
    }

    #[tokio::test]
    async fn two_loads_at_once_never_get_the_same_port() {
        let (_d, m, _db) = manager().await;
        let a = m.reserve_port().unwrap();
        let b = m.reserve_port().unwrap();
        assert_ne!(a.port, b.port, "a port reserved by a load in progress");
        let pa = a.port;
        drop(a);
        let c = m.reserve_port().unwrap();
        assert_eq!(c.port, pa, "a released port is free again");
    }

    async fn manager() -> (tempfile::TempDir, Arc<Manager>, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db")).await.unwrap();
        let settings = Settings {
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        let m = Manager::new(
            db.clone(),
            Arc::new(RwLock::new(settings)),
            Events::default(),
            Arc::default(),
            PathBuf::from("/bin/false"),
        );
        (dir, m, db)
    }

    fn row(name: &str) -> ModelRow {
        ModelRow {
            id: 1,
            name: name.into(),
            file_path: "/x.gguf".into(),
            size_bytes: 100 << 20,
            sha256: None,
            architecture: Some("llama".into()),
            parameters: None,
            quantization: None,
            context_length: Some(4096),
            n_layer: Some(30),
            n_embd_kv: Some(192),
            embedding: false,
            hf_repo_id: None,
            hf_filename: None,
            ctx_size: Some(8192),
            threads: None,
            parallel: Some(2),
            gpu_layers: None,
            idle_timeout: None,
            pinned: false,
            enabled: true,
            temperature: None,
            top_p: None,
            top_k: None,
            max_tokens: None,
            peak_rss_bytes: None,
            created_at: 0,
            updated_at: 0,
            last_used_at: None,
            unsupported_reason: None,
        }
    }

    #[test]
    fn admission_gives_up_only_when_unloading_cannot_help() {
        let mib = |n: u64| n << 20;
        // Nobody else: 950 MiB used of a 900 MiB limit cannot fit 100 MiB.
        assert!(!Others::default().may_free(mib(950), mib(100), mib(900)));
        assert!(Others::default().may_free(mib(700), mib(100), mib(900)));
        // A busy worker of 300 MiB: unloading it once its stream ends makes room → wait.
        let mut o = Others::default();
        o.add_releasable(mib(300));
        assert!(o.may_free(mib(950), mib(100), mib(900)));
        // … but not when even without it the model is too big.
        assert!(!o.may_free(mib(950), mib(500), mib(900)));
        // A worker not measured yet might be big enough: wait for it.
        o.add_releasable(0);
        assert!(o.may_free(mib(950), mib(500), mib(900)));
        // A loading worker may become releasable.
        let o = Others {
            loading: 1,
            loaded: 1,
            ..Others::default()
        };
        assert!(o.may_free(mib(950), mib(500), mib(900)));
    }

    #[tokio::test]
    async fn estimate_uses_kv_then_measured_peak() {
        let (_d, m, _db) = manager().await;
        let r = row("a");
        // ctx is capped by the trained context (4096); the 2 slots share it (the worker splits `-c`), so
        // the slots do not multiply the cache: 2 (K, V) · 30 layers · 4096 positions · 192 · 2 bytes.
        assert_eq!(
            m.worker_params(&r),
            (4096, Settings::default().worker_threads(), 2)
        );
        let kv = 2 * 30 * 4096 * 192 * 2;
        assert_eq!(kv_cache_bytes(30, 192, 4096), kv);
        assert_eq!(kv, 90 << 20, "SmolLM2-135M at 4096 positions: 90 MiB");
        // More slots: the same total context, the same cache.
        let four = ModelRow {
            parallel: Some(4),
            ..r.clone()
        };
        assert_eq!(m.estimate(&four), m.estimate(&r));
        assert_eq!(
            m.estimate(&r),
            (100 << 20) + kv + MARGIN_BYTES + (100 << 20) / 10
        );
        let r = ModelRow {
            peak_rss_bytes: Some(300 << 20),
            ..r
        };
        assert_eq!(m.estimate(&r), (300 << 20) + MARGIN_BYTES);
    }

    #[tokio::test]
    async fn estimate_counts_a_window_for_sliding_layers() {
        let (_d, m, _db) = manager().await;
        let assets = std::env::var("CYBER_INFERENCE_ASSETS").expect(
            "CYBER_INFERENCE_ASSETS must name the test assets (see ../shared/assets/fetch)",
        );
        let path = format!("{assets}/models/gemma-3-270m.Q4_K_M.gguf");
        assert!(std::path::Path::new(&path).exists(), "{path} is missing");
        let r = ModelRow {
            file_path: path,
            architecture: Some("gemma3".into()),
            context_length: Some(32768),
            n_layer: Some(18),
            n_embd_kv: Some(256),
            ctx_size: Some(32768),
            parallel: Some(2),
            ..row("g")
        };
        // gemma-3-270m: 18 layers, 3 global (5, 11, 17) with 16384 positions per slot, 15 sliding with a
        // window of 512; 2 slots; K and V of 256 f16 elements.
        let kv = 2 * 2 * 256 * 2 * (3 * 16384 + 15 * 512);
        let full = kv_cache_bytes(18, 256, 32768);
        assert_eq!(
            m.estimate(&r),
            (100 << 20) + kv + MARGIN_BYTES + (100 << 20) / 10
        );
        assert!(
            kv * 5 < full,
            "{kv} vs {full}: the window saves most of the cache"
        );
        // A file that cannot be read falls back to the full formula.
        let bad = ModelRow {
            file_path: "/nonexistent.gguf".into(),
            ..r
        };
        assert_eq!(
            m.estimate(&bad),
            (100 << 20) + full + MARGIN_BYTES + (100 << 20) / 10
        );
    }

    #[tokio::test]
    async fn a_worker_that_cannot_start_fails_with_backoff() {
        let (_d, m, db) = manager().await;
        // /bin/false exits at once with status 1: the load fails and the reason says so.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"x").unwrap();
        db.upsert_scanned(&crate::supervisor::db::ScannedModel {
            name: "m".into(),
            file_path: f.display().to_string(),
            size_bytes: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        let e = m.acquire("m").await.err().unwrap();
        assert!(
            matches!(&e, LoadError::Failed { reason, .. } if reason.contains("status 1")),
            "{e}"
        );
        assert_eq!(m.state_of("m"), ModelState::Failed);
        // First failure: no backoff, the next request tries again and fails a second time …
        let e = m.acquire("m").await.err().unwrap();
        assert!(matches!(e, LoadError::Failed { .. }), "{e}");
        // … then the backoff answers at once.
        let e = m.acquire("m").await.err().unwrap();
        assert!(matches!(e, LoadError::Backoff { .. }), "{e}");
        assert!(matches!(
            m.acquire("nope").await,
            Err(LoadError::NotFound(_))
        ));
        let sessions = db.model_sessions(1, 10).await.unwrap();
        assert_eq!(sessions.len(), 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sessions = db.model_sessions(1, 10).await.unwrap();
        assert!(
            sessions.iter().all(|s| s.status == "failed"),
            "{sessions:?}"
        );
    }
}
