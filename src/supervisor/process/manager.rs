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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::error::LoadError;
use super::lease::Lease;
use super::state::{ModelState, check_transition};
use super::sys;
use super::worker::{STOP_GRACE, WorkerBackend, WorkerProcess};
use crate::config::Settings;
use crate::engine::kv_layout::KvLayout;
use crate::supervisor::db::{Db, ModelRow, now_ms};
use crate::supervisor::events::{Event, Events};
use crate::supervisor::logs::LogBuffer;
use crate::supervisor::metrics::Metrics;

/// Seconds a worker gets to answer `/health` 200.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval between health probes of ready workers ([`Manager::check_health`]).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Longest a ready worker may take to answer one `/health` probe.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Probes in a row without an answer after which a ready worker counts as hung and is killed (the next
/// request loads the model again).
pub const HEALTH_FAILURES: u32 = 3;
/// Default number of slots (`-np`) per worker.
pub const DEFAULT_PARALLEL: u32 = 4;

pub(super) struct Slot {
    pub(super) state: ModelState,
    pub(super) reason: Option<String>,
    pub(super) worker: Option<Arc<WorkerProcess>>,
    pub(super) inflight: usize,
    pub(super) last_used: Instant,
    pub(super) failures: u32,
    pub(super) retry_at: Option<Instant>,
    pub(super) pinned: bool,
    pub(super) idle_timeout: Option<u64>,
    /// A per-request keep-alive (Ollama's `keep_alive`) overriding the idle timeout until the next
    /// load: `Some(None)` = never unloaded for idleness, `Some(Some(d))` = unloaded `d` after the last
    /// request.
    pub(super) keep_alive: Option<Option<Duration>>,
    pub(super) rss: u64,
    pub(super) cpu: f32,
}

impl Slot {
    pub(super) fn new() -> Slot {
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
    /// What runs the model (the CPU, or a GPU adapter and its offloaded layers), from the worker's
    /// `/props` once it is ready.
    pub backend: Option<WorkerBackend>,
}

/// The process manager. Shared as `Arc<Manager>`.
pub struct Manager {
    pub(super) db: Db,
    pub(super) settings: Arc<RwLock<Settings>>,
    pub(super) events: Events,
    pub(super) metrics: Arc<Metrics>,
    pub(super) exe: PathBuf,
    pub(super) slots: Mutex<HashMap<String, Slot>>,
    pub(super) load_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(super) logs: Mutex<HashMap<String, Arc<LogBuffer>>>,
    pub(super) admission: tokio::sync::Mutex<()>,
    pub(super) changed: watch::Sender<u64>,
    pub(super) http: reqwest::Client,
    pub(super) sys: Mutex<sysinfo::System>,
    pub(super) shutting_down: std::sync::atomic::AtomicBool,
    /// KV layouts read from GGUF metadata (sliding-window layers), per (file path, size); `None` when the
    /// file could not be read.
    pub(super) kv_layouts: Mutex<HashMap<(String, i64), Option<KvLayout>>>,
    /// Ports picked for loads whose worker is not in its slot yet (see [`PortReservation`]).
    pub(super) reserved_ports: Mutex<HashSet<u16>>,
    /// The GPUs NVML sees, probed once on first use ([`Manager::gpus`]).
    pub(super) gpus: tokio::sync::OnceCell<Arc<crate::supervisor::gpu::Gpus>>,
    /// Per model, the `-ngl` of its last worker and what that worker reported running on: the next
    /// load's estimate uses its device bytes ([`Manager::estimate_need`]).
    pub(super) backends: Mutex<HashMap<String, (i32, WorkerBackend)>>,
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
            gpus: tokio::sync::OnceCell::new(),
            backends: Mutex::new(HashMap::new()),
        })
    }

    /// The GPUs NVML sees (none without the driver), probed on first use off the async threads and
    /// shared by the resource monitor and the memory admission.
    pub async fn gpus(&self) -> Arc<crate::supervisor::gpu::Gpus> {
        self.gpus
            .get_or_init(|| async {
                match tokio::task::spawn_blocking(crate::supervisor::gpu::Gpus::probe).await {
                    Ok(g) => Arc::new(g),
                    Err(e) => {
                        tracing::warn!("GPU probe failed: {e}; no GPU");
                        Arc::new(crate::supervisor::gpu::Gpus::none())
                    }
                }
            })
            .await
            .clone()
    }

    pub(super) fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub(super) fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
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
    pub(super) fn transition(
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
                backend: s.worker.as_ref().and_then(|w| w.backend.get().cloned()),
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

    /// Marks the end of a worker: stopped when the supervisor asked for it, failed otherwise (with the
    /// exit status and the last stderr lines as the reason, and a backoff before the next try).
    pub(super) async fn on_exit(&self, model: &str, worker: &Arc<WorkerProcess>, exit: String) {
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
            worker.terminate().await;
        });
        true
    }

    /// Probes every ready worker's `/health` once (all at once, each at most [`HEALTH_TIMEOUT`]); a
    /// worker that left [`HEALTH_FAILURES`] probes in a row unanswered is hung (stopped, deadlocked):
    /// it is killed with the reason logged, its streams end with an error, and the next request loads
    /// the model again. Any HTTP answer counts as alive. Returns the models whose worker was killed.
    pub async fn check_health(self: &Arc<Self>) -> Vec<String> {
        let ready: Vec<(String, Arc<WorkerProcess>)> = self
            .slots()
            .iter()
            .filter(|(_, s)| s.state == ModelState::Ready)
            .filter_map(|(n, s)| s.worker.clone().map(|w| (n.clone(), w)))
            .collect();
        let probes = ready.into_iter().map(|(name, w)| async move {
            let ok = w.probe(&self.http, HEALTH_TIMEOUT).await;
            (name, w, ok)
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
            w.kill_now();
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
        let workers: Vec<(String, Arc<WorkerProcess>)> = {
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
            set.spawn(async move { w.terminate().await });
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

/// Delay before retrying a model whose worker failed `n` times in a row: none after the first failure
/// (a crash is retried by the next request), then 2, 4, 8 … s, at most 60 s.
pub fn backoff(n: u32) -> Duration {
    if n <= 1 {
        Duration::ZERO
    } else {
        Duration::from_secs((1u64 << (n - 1).min(6)).min(60))
    }
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
    }
}
