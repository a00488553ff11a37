//! GPU statistics for the resource monitor through NVML (`nvml-wrapper`, which loads the driver's
//! `libnvidia-ml` at run time): per GPU its name, utilization, memory, temperature and power. A machine
//! without the library or the driver simply has no GPU — never an error, and never a delay at start-up
//! (the probe is a `dlopen` that fails at once). On unified-memory devices (Jetson) NVML answers "not
//! supported" for memory: there the GPU's memory is the system's, read from `/proc/meminfo`.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::MemoryInfo;

use super::monitor::GpuSample;

/// Library names tried in order: the driver always installs the versioned `.so.1`; the bare `.so` (the
/// crate's default) comes only with development packages.
const LIB_NAMES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// The GPUs of the machine as NVML sees them (none when NVML is absent).
pub struct Gpus {
    nvml: Option<Nvml>,
}

/// What an NVML initialization failure means for the monitor.
#[derive(Debug, PartialEq, Eq)]
pub enum InitFailure {
    /// No library, no driver, or a library too old for the calls we make: the machine has no usable GPU.
    NoGpu,
    /// NVML is there but refused (permissions, an unexpected error): still reported as no GPU, with a
    /// warning in the log.
    Unusable,
}

/// Classifies an error of `Nvml::init`.
pub fn classify_init_error(e: &NvmlError) -> InitFailure {
    match e {
        NvmlError::LibloadingError(_)
        | NvmlError::LibraryNotFound
        | NvmlError::DriverNotLoaded
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::FunctionNotFound
        | NvmlError::NotFound
        | NvmlError::NotSupported => InitFailure::NoGpu,
        _ => InitFailure::Unusable,
    }
}

impl Gpus {
    /// Loads NVML if it is there. Never fails: without it the machine has no GPU.
    pub fn probe() -> Gpus {
        let mut last = None;
        for lib in LIB_NAMES {
            match Nvml::builder().lib_path(std::ffi::OsStr::new(lib)).init() {
                Ok(nvml) => {
                    let n = nvml.device_count().unwrap_or(0);
                    tracing::info!("NVML loaded from {lib}: {n} GPU(s)");
                    return Gpus { nvml: Some(nvml) };
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            match classify_init_error(&e) {
                InitFailure::NoGpu => tracing::debug!("no NVML ({e}): no GPU"),
                InitFailure::Unusable => tracing::warn!("NVML present but unusable ({e}): no GPU"),
            }
        }
        Gpus { nvml: None }
    }

    /// No GPU (what [`Gpus::probe`] gives without NVML).
    pub fn none() -> Gpus {
        Gpus { nvml: None }
    }

    /// One sample per GPU (empty without NVML). A value a device does not report is `None`.
    pub fn sample(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let n = nvml.device_count().unwrap_or(0);
        (0..n)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let (memory_used_bytes, memory_total_bytes, unified_memory) =
                    gpu_memory(d.memory_info(), || {
                        std::fs::read_to_string("/proc/meminfo").ok()
                    });
                Some(GpuSample {
                    index: i,
                    name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
                    utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                    memory_used_bytes,
                    memory_total_bytes,
                    unified_memory,
                    temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                    // NVML reports milliwatts.
                    power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                })
            })
            .collect()
    }
}

/// The dedicated memory of one NVIDIA GPU as NVML reports it, for the memory admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// NVML's device index.
    pub index: u32,
    /// The device's name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Unallocated memory (bytes).
    pub free: u64,
    /// Installed memory (bytes).
    pub total: u64,
}

impl Gpus {
    /// The GPU a model's offloaded layers are counted against: of the GPUs whose own memory NVML
    /// reports, the one with the most free memory (the worker's Vulkan adapter is not mapped to an NVML
    /// index, so admission takes the roomiest: a model that fits nowhere is refused). `None` without
    /// NVML, or when every GPU shares the system's memory (Jetson: there a model's device bytes are host
    /// RAM and the host estimate counts them).
    pub fn device_memory(&self) -> Option<DeviceMemory> {
        let nvml = self.nvml.as_ref()?;
        let n = nvml.device_count().unwrap_or(0);
        let found = (0..n).map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let m = d.memory_info().ok()?;
            Some(DeviceMemory {
                index: i,
                name: d.name().unwrap_or_else(|_| format!("GPU {i}")),
                free: m.free,
                total: m.total,
            })
        });
        roomiest(found.flatten())
    }
}

/// The device with the most free memory (the first of equals); `None` for none.
pub fn roomiest(devices: impl IntoIterator<Item = DeviceMemory>) -> Option<DeviceMemory> {
    devices.into_iter().fold(None, |best, d| match best {
        Some(b) if b.free >= d.free => Some(b),
        _ => Some(d),
    })
}

/// (used, total, unified) GPU memory in bytes from NVML's answer: its numbers when it has them; the
/// system's memory from `meminfo` (the text of `/proc/meminfo`) when the device says memory is not
/// supported (unified memory); nothing otherwise.
pub fn gpu_memory(
    info: Result<MemoryInfo, NvmlError>,
    meminfo: impl FnOnce() -> Option<String>,
) -> (Option<u64>, Option<u64>, bool) {
    match info {
        Ok(m) => (Some(m.used), Some(m.total), false),
        Err(NvmlError::NotSupported) => match meminfo().as_deref().and_then(parse_meminfo) {
            Some((total, available)) => (Some(total.saturating_sub(available)), Some(total), true),
            None => (None, None, true),
        },
        Err(_) => (None, None, false),
    }
}

/// (MemTotal, MemAvailable) in bytes from the text of `/proc/meminfo` (whose numbers are in kB);
/// `None` when either line is missing or malformed.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let mut it = rest.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            match it.next() {
                Some("kB") | None => n.checked_mul(1024),
                Some(_) => None,
            }
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:         1000000 kB\n\
                           MemAvailable:    3000000 kB\nBuffers:          100 kB\n";

    fn info(used: u64, total: u64) -> MemoryInfo {
        MemoryInfo {
            free: total - used,
            reserved: 0,
            total,
            used,
            version: 0,
        }
    }

    #[test]
    fn meminfo_parses_and_rejects_garbage() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            Some((8_000_000 * 1024, 3_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 10 kB\n"), None, "no MemAvailable");
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB"), None);
        assert_eq!(parse_meminfo("MemTotal: 1 MB\nMemAvailable: 1 kB"), None);
        assert_eq!(parse_meminfo(""), None);
        // The real file of this machine parses.
        if let Ok(t) = std::fs::read_to_string("/proc/meminfo") {
            let (total, avail) = parse_meminfo(&t).expect("this machine's /proc/meminfo");
            assert!(total > 0 && avail <= total);
        }
    }

    #[test]
    fn memory_from_nvml_or_from_meminfo_on_unified_devices() {
        let never = || -> Option<String> { panic!("meminfo read although NVML answered") };
        assert_eq!(
            gpu_memory(Ok(info(3 << 30, 80 << 30)), never),
            (Some(3 << 30), Some(80 << 30), false)
        );
        // Jetson: memory "not supported" → the system's memory, flagged unified.
        assert_eq!(
            gpu_memory(Err(NvmlError::NotSupported), || Some(MEMINFO.into())),
            (
                Some((8_000_000 - 3_000_000) * 1024),
                Some(8_000_000 * 1024),
                true
            )
        );
        assert_eq!(
            gpu_memory(Err(NvmlError::NotSupported), || None),
            (None, None, true)
        );
        // Another error: unknown, not the system's memory.
        assert_eq!(
            gpu_memory(Err(NvmlError::GpuLost), || Some(MEMINFO.into())),
            (None, None, false)
        );
    }

    #[test]
    fn admission_counts_against_the_gpu_with_the_most_free_memory() {
        let d = |index, free| DeviceMemory {
            index,
            name: format!("GPU {index}"),
            free,
            total: 80 << 30,
        };
        assert_eq!(roomiest([]), None);
        assert_eq!(roomiest([d(0, 5 << 30)]), Some(d(0, 5 << 30)));
        assert_eq!(
            roomiest([d(0, 5 << 30), d(1, 70 << 30), d(2, 10 << 30)]),
            Some(d(1, 70 << 30))
        );
        assert_eq!(
            roomiest([d(0, 7 << 30), d(1, 7 << 30)]),
            Some(d(0, 7 << 30)),
            "the first of equals"
        );
        assert_eq!(Gpus::none().device_memory(), None);
    }

    #[test]
    fn absent_nvml_means_no_gpu() {
        assert_eq!(
            classify_init_error(&NvmlError::LibraryNotFound),
            InitFailure::NoGpu
        );
        assert_eq!(
            classify_init_error(&NvmlError::DriverNotLoaded),
            InitFailure::NoGpu
        );
        assert_eq!(
            classify_init_error(&NvmlError::NoPermission),
            InitFailure::Unusable
        );
        assert!(Gpus::none().sample().is_empty());
        assert!(Gpus::none().nvml.is_none());
        // The real probe: quick, never an error; without NVML (this machine) no GPU at all.
        let t = std::time::Instant::now();
        let g = Gpus::probe();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "probe took {:?}",
            t.elapsed()
        );
        let has_lib = LIB_NAMES.iter().any(|l| {
            [
                "/usr/lib",
                "/usr/lib64",
                "/usr/lib/x86_64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu",
            ]
            .iter()
            .any(|d| std::path::Path::new(d).join(l).exists())
        });
        if !has_lib {
            assert!(g.nvml.is_none());
            assert!(g.sample().is_empty());
        }
    }
}
