//! Admission: memory estimates of a worker, whether a model fits (count and memory) and whom to evict
//! for it, and worker ports. The decisions of the manager that involve other models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::LoadError;
use super::manager::{DEFAULT_PARALLEL, Manager};
use super::state::ModelState;
use super::worker::WorkerBackend;
use crate::engine::gguf::GgufFile;
use crate::engine::kv_layout::{KvLayout, kv_layout};
use crate::engine::model::KvType;
use crate::supervisor::db::ModelRow;

/// Longest a load waits for other models to drain before answering 503.
pub const ADMISSION_WAIT: Duration = Duration::from_secs(120);
/// Fixed part of the memory margin added to every estimate (bytes).
pub const MARGIN_BYTES: u64 = 64 * 1024 * 1024;

/// A worker port picked for one load: no other load can pick it while this lives (the load holds it
/// until its worker is in the slot, whose port then counts as used, or until it failed).
pub struct PortReservation {
    pub(super) mgr: Arc<Manager>,
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
    /// Estimated resident (host) memory of a worker for `m` (bytes): [`Manager::estimate_need`]'s host
    /// part.
    pub fn estimate(&self, m: &ModelRow) -> u64 {
        self.estimate_need(m).host
    }

    /// Estimated memory of a worker for `m` (bytes), split between host RAM and the memory of the GPU.
    ///
    /// Host, without a GPU: the measured peak RSS (+ 64 MiB) when known, else the file size + its KV
    /// cache in the model's cache types ([`Manager::cache_types`]; [`kv_cache_bytes`] for the worker's
    /// total context, which the worker splits over its slots as llama-server does; for a model with
    /// sliding-window layers (gemma2/3) [`KvLayout::cache_bytes_typed`] from the file's metadata: those
    /// layers keep only a window per slot) + a margin of 64 MiB and 10 % of the file. A peak measured
    /// with other cache types than the next load's is not used (the model's settings clear it when they
    /// change).
    ///
    /// Device: when the model runs with `gpu_layers` ≠ 0 ([`Manager::gpu_layers`]) and NVML sees an
    /// NVIDIA GPU with memory of its own, the offloaded layers' share moves from the host to the device
    /// ([`split_need`]); after a load, the device weight bytes its worker reported replace the file's
    /// share. Everything stays on the host without such a GPU (no NVML, Jetson's unified memory), or
    /// when the last worker of the model with the same `-ngl` ran on the CPU or a software adapter
    /// (lavapipe: its "device" memory is host RAM).
    pub fn estimate_need(&self, m: &ModelRow) -> MemoryNeed {
        let device_gpu = self.gpus.get().is_some_and(|g| g.device_memory().is_some());
        self.estimate_need_on(m, device_gpu)
    }

    /// [`Manager::estimate_need`] with `device_gpu` saying whether a GPU with memory of its own is there.
    pub(super) fn estimate_need_on(&self, m: &ModelRow, device_gpu: bool) -> MemoryNeed {
        let (ctx, _, parallel) = self.worker_params(m);
        let (tk, tv) = self.cache_types(m);
        let size = m.size_bytes.max(0) as u64;
        let margin = MARGIN_BYTES + size / 10;
        let sliding = if m.embedding {
            None
        } else {
            self.sliding_kv_layout(m)
        };
        let kv = match (m.n_layer, m.n_embd_kv, sliding) {
            _ if m.embedding => 0,
            (_, _, Some(l)) => {
                let slots = u64::from(parallel.max(1));
                l.cache_bytes_typed(u64::from(ctx) / slots, slots, tk, tv)
            }
            (Some(l), Some(e), None) => {
                kv_cache_bytes(l.max(0) as u64, e.max(0) as u64, u64::from(ctx), tk, tv)
            }
            _ => 0,
        };
        let ngl = self.gpu_layers(m);
        let n_layer = m.n_layer.unwrap_or(0).max(0) as u64;
        let last = self
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m.name)
            .filter(|(n, _)| *n == ngl)
            .map(|(_, b)| b.clone());
        let on_device = device_gpu
            && ngl != 0
            && n_layer > 0
            && last.as_ref().is_none_or(|b| b.has_device_memory());
        let offloaded = match (&last, on_device) {
            (_, false) => 0,
            (Some(b), true) => b.offloaded_layers.min(n_layer),
            (None, true) => offloaded_layers(ngl, n_layer),
        };
        let reported = last
            .filter(|b| b.has_device_memory())
            .map(|b| b.device_weight_bytes);
        let mut need = split_need(size, kv, margin, offloaded, n_layer, reported);
        if let Some(peak) = m.peak_rss_bytes.filter(|p| *p > 0) {
            need.host = peak as u64 + MARGIN_BYTES;
        }
        need
    }

    /// The `-ngl` a worker of `m` gets: the model's `gpu_layers`, else GPU_LAYERS (-1 = all).
    pub fn gpu_layers(&self, m: &ModelRow) -> i32 {
        m.gpu_layers.map_or(self.settings().gpu_layers, |g| {
            g.clamp(-1, i64::from(i32::MAX)) as i32
        })
    }

    /// Keeps what the worker of `model` reported running on, for the next load's estimate.
    pub(super) fn record_backend(&self, model: &str, b: &WorkerBackend) {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_owned(), (b.n_gpu_layers, b.clone()));
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

    /// The KV cache types (keys, values) a worker of `m` gets: the model's settings `cache_type_k` /
    /// `cache_type_v`, f16 where unset (or, for a value the settings' validation would refuse, with a
    /// warning).
    pub fn cache_types(&self, m: &ModelRow) -> (KvType, KvType) {
        let one = |v: &Option<String>, which: &str| match v.as_deref() {
            None | Some("") => KvType::F16,
            Some(t) => KvType::parse(t).unwrap_or_else(|| {
                tracing::warn!(model = %m.name, "{which} {t:?} is not a KV cache type; using f16");
                KvType::F16
            }),
        };
        (
            one(&m.cache_type_k, "cache_type_k"),
            one(&m.cache_type_v, "cache_type_v"),
        )
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
        self.lru_idle_where(but, |_| true)
    }

    /// [`Manager::lru_idle`] among the models whose worker holds memory on a GPU.
    fn lru_idle_on_gpu(&self, but: &str) -> Option<String> {
        self.lru_idle_where(but, |s| {
            s.worker
                .as_ref()
                .and_then(|w| w.backend.get())
                .is_some_and(|b| b.has_device_memory())
        })
    }

    fn lru_idle_where(
        &self,
        but: &str,
        pred: impl Fn(&super::manager::Slot) -> bool,
    ) -> Option<String> {
        let slots = self.slots();
        slots
            .iter()
            .filter(|(n, s)| {
                n.as_str() != but
                    && s.state == ModelState::Ready
                    && s.inflight == 0
                    && !s.pinned
                    && pred(s)
            })
            .min_by_key(|(_, s)| s.last_used)
            .map(|(n, _)| n.clone())
    }

    /// Waits until `m` fits (count and memory), unloading LRU idle models. Called under the model's load
    /// lock; holds the admission lock. A model that does not fit waits (at most [`ADMISSION_WAIT`]) while
    /// other unpinned workers are busy or draining — they become evictable once their requests end, and
    /// no request is ever cut for it — and is refused at once when even unloading every other unpinned
    /// worker could not make room.
    ///
    /// A model with layers on a GPU of its own memory ([`Manager::estimate_need`]) must also fit in that
    /// GPU's free memory (NVML's, [`crate::supervisor::gpu::Gpus::device_memory`]): idle models on the GPU
    /// are unloaded for it one at a time (the next only once the last one's process is gone and NVML
    /// shows its memory free), and it is refused when no model on the GPU is left to unload or wait for.
    pub(super) async fn admit(self: &Arc<Self>, m: &ModelRow) -> Result<(), LoadError> {
        let _adm = self.admission.lock().await;
        let deadline = Instant::now() + ADMISSION_WAIT;
        let gpus = self.gpus().await;
        let full = self.estimate_need(m);
        let need = full.host;
        loop {
            let mut rx = self.changed.subscribe();
            let s = self.settings();
            let others = self.others(&m.name);
            let (total, used) = self.memory();
            let limit = total / 100 * u64::from(s.max_memory_percent);
            let count_ok = others.loaded < s.max_loaded_models as usize;
            let mem_ok = used.saturating_add(need) <= limit;
            let device = if full.device > 0 {
                gpus.device_memory()
            } else {
                None
            };
            // A GPU gone since the estimate: the worker falls back to the CPU, whose bytes the host
            // estimate does not hold; the next load's estimate (no GPU) does.
            let dev_ok = device.as_ref().is_none_or(|d| full.device <= d.free);
            if count_ok && mem_ok && dev_ok {
                return Ok(());
            }
            let mib = |b: u64| b / (1024 * 1024);
            let no_device_memory =
                |d: &crate::supervisor::gpu::DeviceMemory| LoadError::InsufficientDeviceMemory {
                    model: m.name.clone(),
                    gpu: d.name.clone(),
                    need_mib: mib(full.device),
                    free_mib: mib(d.free),
                    total_mib: mib(d.total),
                };
            // More than the whole GPU: unloading others cannot help.
            if let Some(d) = device.as_ref().filter(|d| full.device > d.total) {
                return Err(no_device_memory(d));
            }
            let victim = match (&device, count_ok && mem_ok) {
                // Only the GPU is short (`dev_ok` is false, so `device` is there).
                (Some(d), true) => {
                    let idle = self.lru_idle_on_gpu(&m.name);
                    match gpu_short(full.device, d, &others, idle.is_some()) {
                        GpuShort::Refuse => return Err(no_device_memory(d)),
                        GpuShort::Evict => idle,
                        GpuShort::Wait => None,
                    }
                }
                _ => self.lru_idle(&m.name),
            };
            if let Some(victim) = victim {
                let why = if !count_ok {
                    format!(
                        "evicted for {} (MAX_LOADED_MODELS={})",
                        m.name, s.max_loaded_models
                    )
                } else if mem_ok {
                    format!("evicted to make GPU memory for {}", m.name)
                } else {
                    format!("evicted to make memory for {}", m.name)
                };
                self.unload(&victim, &why);
                continue;
            }
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
                return Err(match &device {
                    _ if !mem_ok => no_memory(),
                    Some(d) if count_ok => no_device_memory(d),
                    _ => too_many(ADMISSION_WAIT.as_secs()),
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
            let on_gpu = s
                .worker
                .as_ref()
                .and_then(|w| w.backend.get())
                .is_some_and(|b| b.has_device_memory());
            match s.state {
                ModelState::Loading => o.loading += 1,
                ModelState::Draining => {
                    o.add_releasable(s.rss);
                    o.gpu_draining += usize::from(on_gpu);
                    o.gpu_releasable += usize::from(on_gpu);
                }
                ModelState::Ready if !s.pinned => {
                    o.add_releasable(s.rss);
                    o.gpu_releasable += usize::from(on_gpu);
                }
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
    /// Of the releasable, those holding memory on a GPU.
    gpu_releasable: usize,
    /// Of those, the ones draining (their GPU memory is freed when their process ends).
    gpu_draining: usize,
}

impl Others {
    pub(super) fn add_releasable(&mut self, rss: u64) {
        self.releasable += 1;
        self.releasable_rss = self.releasable_rss.saturating_add(rss);
        self.unmeasured |= rss == 0;
    }

    /// Whether unloading every releasable worker may bring `used + need` under `limit` (an unmeasured
    /// worker might be large enough, and a loading one may become releasable).
    pub(super) fn may_free(&self, used: u64, need: u64, limit: u64) -> bool {
        (self.releasable > 0 && self.unmeasured)
            || self.loading > 0
            || used
                .saturating_sub(self.releasable_rss)
                .saturating_add(need)
                <= limit
    }
}

impl Others {
    /// Whether waiting may free GPU memory: a model on the GPU may be unloaded (now or once its
    /// requests end), or a loading one may turn out to be on it and become releasable.
    pub(super) fn may_free_device(&self) -> bool {
        self.gpu_releasable > 0 || self.loading > 0
    }
}

/// What admission does for a model whose host side fits but whose GPU share does not fit in the GPU's
/// free memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GpuShort {
    /// Unload the least recently used idle model on the GPU.
    Evict,
    /// Wait (bounded) for a model on the GPU to finish its requests, stop or load.
    Wait,
    /// Refuse now: waiting cannot make room.
    Refuse,
}

/// [`GpuShort`] for `need` bytes on GPU `d` (`need` > `d.free`): refused when it is more than the whole
/// GPU or no other model on the GPU may go ([`Others::may_free_device`]); an idle model on the GPU
/// (`idle_on_gpu`) is unloaded when none is draining already — one at a time, since NVML shows the
/// memory free only once its process is gone; else wait.
fn gpu_short(
    need: u64,
    d: &crate::supervisor::gpu::DeviceMemory,
    others: &Others,
    idle_on_gpu: bool,
) -> GpuShort {
    if need > d.total || !others.may_free_device() {
        GpuShort::Refuse
    } else if idle_on_gpu && others.gpu_draining == 0 {
        GpuShort::Evict
    } else {
        GpuShort::Wait
    }
}

/// Where a worker's memory goes (bytes): host RAM and the GPU's own memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemoryNeed {
    /// Resident memory of the worker process.
    pub host: u64,
    /// Memory on the GPU (0 when nothing runs on a GPU with memory of its own).
    pub device: u64,
}

/// Fixed part of the device estimate of a model with layers on a GPU (bytes): activations, scratch
/// buffers and the logits, beside its weights and KV cache.
pub const DEVICE_MARGIN_BYTES: u64 = 64 * 1024 * 1024;

/// The repeating layers `-ngl ngl` puts on the GPU of an `n_layer` model (llama.cpp's rule: the last
/// `ngl`; negative = all of them).
pub fn offloaded_layers(ngl: i32, n_layer: u64) -> u64 {
    u64::try_from(ngl).map_or(n_layer, |n| n.min(n_layer))
}

/// `bytes × num / den` without overflow (`den` = 0 gives 0).
fn share(bytes: u64, num: u64, den: u64) -> u64 {
    if den == 0 {
        return 0;
    }
    u64::try_from(u128::from(bytes) * u128::from(num.min(den)) / u128::from(den))
        .unwrap_or(u64::MAX)
}

/// Splits a worker's memory for `offloaded` of `n_layer` repeating layers on a GPU with memory of its
/// own — a proportional estimate, as every repeating layer of a llama-family model has the same shape:
///
/// - device = `reported_weights` (what a worker of this model put on the device at its last load) or
///   else the layers' share of the file, `size × offloaded / n_layer`; + their share of the KV cache,
///   `kv × offloaded / n_layer`; + [`DEVICE_MARGIN_BYTES`];
/// - host = the rest of the file and of the KV cache + `margin`.
///
/// With `offloaded` = 0 (or `n_layer` = 0) everything is on the host: `size + kv + margin`.
pub fn split_need(
    size: u64,
    kv: u64,
    margin: u64,
    offloaded: u64,
    n_layer: u64,
    reported_weights: Option<u64>,
) -> MemoryNeed {
    if offloaded == 0 || n_layer == 0 {
        return MemoryNeed {
            host: size.saturating_add(kv).saturating_add(margin),
            device: 0,
        };
    }
    let weights = share(size, offloaded, n_layer);
    let kv_dev = share(kv, offloaded, n_layer);
    let device_weights = reported_weights.unwrap_or(weights);
    MemoryNeed {
        host: (size - weights)
            .saturating_add(kv - kv_dev)
            .saturating_add(margin),
        device: device_weights
            .saturating_add(kv_dev)
            .saturating_add(DEVICE_MARGIN_BYTES),
    }
}

/// Bytes of a KV cache of `n_layer` layers × `n_ctx_total` positions (all slots together), keys of
/// type `tk` and values of type `tv`, rows of `n_embd_kv` elements:
/// `n_layer · n_ctx_total · (tk.row_bytes(n_embd_kv) + tv.row_bytes(n_embd_kv))` (f16: 2 bytes per
/// element; q8_0: 34 per 32). Saturates instead of overflowing on absurd metadata.
pub fn kv_cache_bytes(
    n_layer: u64,
    n_embd_kv: u64,
    n_ctx_total: u64,
    tk: KvType,
    tv: KvType,
) -> u64 {
    let e = usize::try_from(n_embd_kv).unwrap_or(usize::MAX / 64);
    let row = (tk.row_bytes(e) as u64).saturating_add(tv.row_bytes(e) as u64);
    n_layer.saturating_mul(n_ctx_total).saturating_mul(row)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{manager, row};
    use super::*;
    use crate::config::Settings;

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
        assert_eq!(kv_cache_bytes(30, 192, 4096, KvType::F16, KvType::F16), kv);
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

    #[test]
    fn layers_on_the_gpu_follow_llama_cpp_ngl() {
        assert_eq!(offloaded_layers(-1, 30), 30);
        assert_eq!(offloaded_layers(0, 30), 0);
        assert_eq!(offloaded_layers(10, 30), 10);
        assert_eq!(offloaded_layers(99, 30), 30);
        assert_eq!(offloaded_layers(i32::MAX, 0), 0);
    }

    #[test]
    fn the_offloaded_share_moves_from_the_host_to_the_device() {
        let mib = |n: u64| n << 20;
        let (size, kv, margin) = (mib(300), mib(90), mib(94));
        // Nothing offloaded: today's host estimate.
        let cpu = split_need(size, kv, margin, 0, 30, None);
        assert_eq!(
            cpu,
            MemoryNeed {
                host: size + kv + margin,
                device: 0
            }
        );
        assert_eq!(
            split_need(size, kv, margin, 30, 0, None),
            cpu,
            "no layer count"
        );
        // All 30 layers: the file and the cache on the device, the margin on the host.
        assert_eq!(
            split_need(size, kv, margin, 30, 30, None),
            MemoryNeed {
                host: margin,
                device: size + kv + DEVICE_MARGIN_BYTES
            }
        );
        // 10 of 30: a third of each on the device, the rest on the host; nothing is lost.
        let split = split_need(size, kv, margin, 10, 30, None);
        assert_eq!(
            split,
            MemoryNeed {
                host: mib(200) + mib(60) + margin,
                device: mib(100) + mib(30) + DEVICE_MARGIN_BYTES
            }
        );
        assert_eq!(split.host + split.device, cpu.host + DEVICE_MARGIN_BYTES);
        // The worker's reported weight bytes (types dequantized at upload are larger) replace the share.
        let reported = split_need(size, kv, margin, 10, 30, Some(mib(150)));
        assert_eq!(reported.device, mib(150) + mib(30) + DEVICE_MARGIN_BYTES);
        assert_eq!(reported.host, split.host);
        // Absurd metadata saturates instead of overflowing.
        let huge = split_need(u64::MAX, u64::MAX, u64::MAX, 7, 9, None);
        assert_eq!(huge.host, u64::MAX);
        assert_eq!(huge.device, u64::MAX);
    }

    #[tokio::test]
    async fn the_device_estimate_needs_a_gpu_of_its_own_memory_and_honours_what_the_worker_said() {
        let (_d, m, _db) = manager().await;
        let r = row("a");
        let kv = kv_cache_bytes(30, 192, 4096, KvType::F16, KvType::F16);
        let size = 100u64 << 20;
        let margin = MARGIN_BYTES + size / 10;
        let host_only = MemoryNeed {
            host: size + kv + margin,
            device: 0,
        };
        // No NVML GPU (or unified memory): everything on the host, as before.
        assert_eq!(m.estimate_need_on(&r, false), host_only);
        assert_eq!(
            m.estimate(&r),
            host_only.host,
            "this machine has no NVML GPU"
        );
        // A GPU and GPU_LAYERS=-1: every layer's share on the device.
        assert_eq!(m.gpu_layers(&r), -1);
        let all = m.estimate_need_on(&r, true);
        assert_eq!(
            all,
            MemoryNeed {
                host: margin,
                device: size + kv + DEVICE_MARGIN_BYTES
            }
        );
        // The model's own gpu_layers: 0 keeps it on the CPU, 10 puts a third on the GPU.
        let none = ModelRow {
            gpu_layers: Some(0),
            ..r.clone()
        };
        assert_eq!(m.estimate_need_on(&none, true), host_only);
        let ten = ModelRow {
            gpu_layers: Some(10),
            ..r.clone()
        };
        assert_eq!(
            m.estimate_need_on(&ten, true),
            split_need(size, kv, margin, 10, 30, None)
        );
        // After a load on the GPU, the reported weight bytes replace the file's share.
        let gpu = WorkerBackend {
            name: "vulkan".into(),
            adapter: Some("NVIDIA H100 80GB HBM3".into()),
            device_type: Some("discrete".into()),
            n_gpu_layers: -1,
            offloaded_layers: 30,
            n_layer: 30,
            output_offloaded: true,
            device_weight_bytes: 120 << 20,
            fallback_reason: None,
        };
        m.record_backend("a", &gpu);
        assert_eq!(
            m.estimate_need_on(&r, true),
            MemoryNeed {
                host: margin,
                device: (120 << 20) + kv + DEVICE_MARGIN_BYTES
            }
        );
        // … but not for another -ngl.
        assert_eq!(
            m.estimate_need_on(&ten, true),
            split_need(size, kv, margin, 10, 30, None)
        );
        // A worker that fell back to the CPU, or ran on lavapipe: its memory was host memory.
        for b in [
            WorkerBackend {
                name: "cpu".into(),
                n_gpu_layers: -1,
                n_layer: 30,
                fallback_reason: Some("no adapter".into()),
                ..WorkerBackend::default()
            },
            WorkerBackend {
                device_type: Some("cpu".into()),
                adapter: Some("llvmpipe".into()),
                ..gpu.clone()
            },
        ] {
            m.record_backend("a", &b);
            assert_eq!(m.estimate_need_on(&r, true), host_only, "{b:?}");
        }
        // A measured peak replaces the host part only.
        m.record_backend("a", &gpu);
        let peaked = ModelRow {
            peak_rss_bytes: Some(50 << 20),
            ..r.clone()
        };
        assert_eq!(
            m.estimate_need_on(&peaked, true),
            MemoryNeed {
                host: (50 << 20) + MARGIN_BYTES,
                device: (120 << 20) + kv + DEVICE_MARGIN_BYTES
            }
        );
    }

    #[test]
    fn a_model_short_of_gpu_memory_evicts_one_at_a_time_waits_or_is_refused() {
        let gib = |n: u64| n << 30;
        let d = crate::supervisor::gpu::DeviceMemory {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            free: gib(10),
            total: gib(80),
        };
        let idle_on_gpu = Others {
            loaded: 1,
            releasable: 1,
            gpu_releasable: 1,
            ..Others::default()
        };
        // An idle model on the GPU: unload it.
        assert_eq!(gpu_short(gib(20), &d, &idle_on_gpu, true), GpuShort::Evict);
        // One is draining already: wait for its process to go before unloading another.
        let draining = Others {
            gpu_draining: 1,
            gpu_releasable: 2,
            ..idle_on_gpu
        };
        assert_eq!(gpu_short(gib(20), &d, &draining, true), GpuShort::Wait);
        // The model on the GPU is busy (not idle): wait for its requests to end.
        assert_eq!(gpu_short(gib(20), &d, &idle_on_gpu, false), GpuShort::Wait);
        // A model still loading may turn out to be on the GPU and become releasable: wait.
        let loading = Others {
            loaded: 1,
            loading: 1,
            ..Others::default()
        };
        assert_eq!(gpu_short(gib(20), &d, &loading, false), GpuShort::Wait);
        // Nothing on the GPU may go (models on the CPU only, or none): refuse now.
        let mut cpu_only = Others::default();
        cpu_only.add_releasable(gib(1));
        assert_eq!(gpu_short(gib(20), &d, &cpu_only, false), GpuShort::Refuse);
        assert_eq!(
            gpu_short(gib(20), &d, &Others::default(), false),
            GpuShort::Refuse
        );
        // More than the whole GPU: refuse however much may go.
        assert_eq!(gpu_short(gib(81), &d, &idle_on_gpu, true), GpuShort::Refuse);
    }

    #[test]
    fn waiting_for_gpu_memory_helps_only_when_a_model_on_it_may_go() {
        assert!(!Others::default().may_free_device());
        let o = Others {
            gpu_releasable: 1,
            ..Others::default()
        };
        assert!(o.may_free_device());
        let o = Others {
            loading: 1,
            ..Others::default()
        };
        assert!(o.may_free_device());
        // Models on the CPU only: unloading them frees no GPU memory.
        let mut o = Others::default();
        o.add_releasable(100 << 20);
        assert!(!o.may_free_device());
    }

    #[tokio::test]
    async fn estimate_follows_the_kv_cache_types() {
        let (_d, m, _db) = manager().await;
        let f16 = row("a");
        let q8 = ModelRow {
            cache_type_k: Some("q8_0".into()),
            cache_type_v: Some("q8_0".into()),
            ..f16.clone()
        };
        let mixed = ModelRow {
            cache_type_k: Some("q8_0".into()),
            cache_type_v: Some("q4_0".into()),
            ..f16.clone()
        };
        assert_eq!(m.cache_types(&q8), (KvType::Q8_0, KvType::Q8_0));
        assert_eq!(m.cache_types(&f16), (KvType::F16, KvType::F16));
        let base = (100 << 20) + MARGIN_BYTES + (100 << 20) / 10;
        // 30 layers · 4096 positions · rows of 192: q8_0 = 6 blocks of 34 bytes, q4_0 6 of 18.
        assert_eq!(m.estimate(&q8), base + 30 * 4096 * (204 + 204));
        assert_eq!(m.estimate(&mixed), base + 30 * 4096 * (204 + 108));
        assert_eq!(m.estimate(&f16), base + 30 * 4096 * (384 + 384));
        // A value the settings could not have stored falls back to f16.
        let bad = ModelRow {
            cache_type_k: Some("q9_9".into()),
            ..f16.clone()
        };
        assert_eq!(m.cache_types(&bad), (KvType::F16, KvType::F16));
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
        let full = kv_cache_bytes(18, 256, 32768, KvType::F16, KvType::F16);
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
}
