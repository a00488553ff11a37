//! Admission: memory estimates of a worker, whether a model fits (count and memory) and whom to evict
//! for it, and worker ports. The decisions of the manager that involve other models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::LoadError;
use super::manager::{DEFAULT_PARALLEL, Manager};
use super::state::ModelState;
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
    /// Estimated resident memory of a worker for `m` (bytes): the measured peak RSS (+ 64 MiB) when known,
    /// else the file size + its KV cache in the model's cache types ([`Manager::cache_types`];
    /// [`kv_cache_bytes`] for the worker's total context, which the worker splits over its slots as
    /// llama-server does; for a model with sliding-window layers (gemma2/3)
    /// [`KvLayout::cache_bytes_typed`] from the file's metadata: those layers keep only a window per
    /// slot) + a margin of 64 MiB and 10 % of the file. A peak measured with other cache types than
    /// the next load's is not used (the model's settings clear it when they change).
    pub fn estimate(&self, m: &ModelRow) -> u64 {
        let (ctx, _, parallel) = self.worker_params(m);
        let (tk, tv) = self.cache_types(m);
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
                l.cache_bytes_typed(u64::from(ctx) / slots, slots, tk, tv)
            }
            (Some(l), Some(e), None) => {
                kv_cache_bytes(l.max(0) as u64, e.max(0) as u64, u64::from(ctx), tk, tv)
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
    pub(super) async fn admit(self: &Arc<Self>, m: &ModelRow) -> Result<(), LoadError> {
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
