//! The resource monitor: every 2 s samples CPU (total and per core), RAM, swap, the disks of MODELS_DIR
//! and DATA_DIR and each worker's RSS and CPU with sysinfo; keeps 15 minutes of samples for the UI,
//! publishes each sample as an event and records each model's peak RSS (the admission estimate).
//! GPUs come from NVML (see `gpu`): a machine without the driver has none.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sysinfo::{Disks, Pid, ProcessesToUpdate, System};

use super::db::{Db, now_ms};
use super::events::{Event, Events};
use super::gpu::Gpus;
use super::process::Manager;

/// Seconds between samples.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept: 15 minutes at one per [`INTERVAL`].
pub const HISTORY: usize = 450;

/// Space of the disk holding a folder (bytes).
#[derive(Clone, Debug, Serialize)]
pub struct DiskSample {
    /// `models_dir` or `data_dir`.
    pub label: &'static str,
    pub path: String,
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// One worker's usage.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerSample {
    pub model: String,
    pub pid: u32,
    pub rss_bytes: u64,
    /// Percent of one core (may pass 100 with several threads).
    pub cpu_percent: f32,
}

/// One GPU's usage (reported when an NVML driver is present). A value the device does not report is
/// `None` (`null` in JSON).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSample {
    /// NVML's device index.
    pub index: u32,
    pub name: String,
    /// Percent of the last sample period a kernel was running.
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// True on unified-memory devices (Jetson), where the memory figures are the system's
    /// (`/proc/meminfo`) because NVML does not report them.
    pub unified_memory: bool,
    /// Degrees Celsius (the die sensor).
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
}

/// One sample of the machine.
#[derive(Clone, Debug, Serialize)]
pub struct ResourceSample {
    /// Unix milliseconds.
    pub at: i64,
    pub cpu_percent: f32,
    pub per_core_percent: Vec<f32>,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
    pub disks: Vec<DiskSample>,
    pub workers: Vec<WorkerSample>,
    pub gpus: Vec<GpuSample>,
    /// RSS of the supervisor process itself (bytes).
    pub supervisor_rss_bytes: u64,
}

/// The sampler and its history.
pub struct Monitor {
    history: Mutex<VecDeque<ResourceSample>>,
}

impl Monitor {
    /// The latest sample, if any.
    pub fn latest(&self) -> Option<ResourceSample> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .back()
            .cloned()
    }

    /// Samples newer than `since_ms` (all when 0), oldest first.
    pub fn history(&self, since_ms: i64) -> Vec<ResourceSample> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.at > since_ms)
            .cloned()
            .collect()
    }
}

struct Sampler {
    sys: System,
    disks: Disks,
    gpus: Arc<Gpus>,
    dirs: Vec<(&'static str, PathBuf)>,
    peaks: HashMap<i64, u64>,
}

impl Sampler {
    fn sample(&mut self, mgr: &Manager) -> (ResourceSample, Vec<(i64, i64, u64)>) {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let workers = mgr.worker_pids();
        let me = Pid::from_u32(std::process::id());
        let mut pids: Vec<Pid> = workers.iter().map(|w| Pid::from_u32(w.3)).collect();
        pids.push(me);
        self.sys
            .refresh_processes(ProcessesToUpdate::Some(&pids), true);
        let mut new_peaks = Vec::new();
        let ws: Vec<WorkerSample> = workers
            .iter()
            .map(|(model, session, model_id, pid)| {
                let p = self.sys.process(Pid::from_u32(*pid));
                let rss = p.map_or(0, |p| p.memory());
                let cpu = p.map_or(0.0, |p| p.cpu_usage());
                mgr.set_usage(model, rss, cpu);
                let peak = self.peaks.entry(*session).or_default();
                // Record growth of at least 1 MiB (avoids a write per sample).
                if rss > *peak + (1 << 20) {
                    *peak = rss;
                    new_peaks.push((*model_id, *session, rss));
                }
                WorkerSample {
                    model: model.clone(),
                    pid: *pid,
                    rss_bytes: rss,
                    cpu_percent: cpu,
                }
            })
            .collect();
        let live: Vec<i64> = workers.iter().map(|w| w.1).collect();
        self.peaks.retain(|s, _| live.contains(s));
        self.disks.refresh(true);
        let disks = self
            .dirs
            .iter()
            .filter_map(|(label, dir)| {
                let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                self.disks
                    .iter()
                    .filter(|d| canon.starts_with(d.mount_point()))
                    .max_by_key(|d| d.mount_point().as_os_str().len())
                    .map(|d| DiskSample {
                        label,
                        path: dir.display().to_string(),
                        mount_point: d.mount_point().display().to_string(),
                        total_bytes: d.total_space(),
                        available_bytes: d.available_space(),
                    })
            })
            .collect();
        let total = self.sys.total_memory();
        let avail = self.sys.available_memory();
        let s = ResourceSample {
            at: now_ms(),
            cpu_percent: self.sys.global_cpu_usage(),
            per_core_percent: self.sys.cpus().iter().map(|c| c.cpu_usage()).collect(),
            memory_total_bytes: total,
            memory_used_bytes: total.saturating_sub(avail),
            memory_available_bytes: avail,
            swap_total_bytes: self.sys.total_swap(),
            swap_used_bytes: self.sys.used_swap(),
            disks,
            workers: ws,
            gpus: self.gpus.sample(),
            supervisor_rss_bytes: self.sys.process(me).map_or(0, |p| p.memory()),
        };
        (s, new_peaks)
    }
}

/// Starts the sampling task (every [`INTERVAL`]) and returns the shared history.
pub fn spawn(
    mgr: Arc<Manager>,
    db: Db,
    events: Events,
    models_dir: &Path,
    data_dir: &Path,
) -> Arc<Monitor> {
    let mon = Arc::new(Monitor {
        history: Mutex::new(VecDeque::with_capacity(HISTORY)),
    });
    let mut sampler = Sampler {
        sys: System::new(),
        disks: Disks::new_with_refreshed_list(),
        // Probed in the task below, off the start-up path (once, shared with the memory admission).
        gpus: Arc::new(Gpus::none()),
        dirs: vec![
            ("models_dir", models_dir.to_path_buf()),
            ("data_dir", data_dir.to_path_buf()),
        ],
        peaks: HashMap::new(),
    };
    let m = mon.clone();
    tokio::spawn(async move {
        sampler.gpus = mgr.gpus().await;
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (s, peaks) = sampler.sample(&mgr);
            for (model_id, session, rss) in peaks {
                if let Err(e) = db.record_peak_rss(model_id, session, rss as i64).await {
                    tracing::warn!("{e}");
                }
            }
            {
                let mut h = m.history.lock().unwrap_or_else(|p| p.into_inner());
                if h.len() == HISTORY {
                    h.pop_front();
                }
                h.push_back(s.clone());
            }
            events.send(Event::Resources(Box::new(s)));
        }
    });
    mon
}
