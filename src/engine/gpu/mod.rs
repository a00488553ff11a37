//! The GPU backend (wgpu: Vulkan on Linux and Jetson, Metal on macOS): adapter choice, weights uploaded once
//! in their GGUF block formats, WGSL kernels mirroring `kernels/`, a KV cache on the device, and the
//! offloaded layers of the llama family (llama.cpp's `-ngl`: the last N layers, and the output layer when
//! N ≥ the layer count). Tested on Mesa's software Vulkan (lavapipe) where no GPU exists.

/// How the model should use a GPU (`-ngl`, `--device`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Layers to offload (llama.cpp's `-ngl`): 0 = none (the CPU only), `N > 0` = the last `N` repeating
    /// layers (and the output layer when `N ≥ n_layer`), negative = all of them and the output layer.
    pub n_gpu_layers: i32,
    /// Which adapter: a decimal index into the adapters listed at start-up, or a case-insensitive
    /// substring of an adapter's name (`"llvmpipe"`, `"RTX"`). `None`: the first discrete, then
    /// integrated, then virtual GPU; software rasterizers (lavapipe) are only taken when named.
    pub device: Option<String>,
}

/// What runs the model, for `/props`, `/health`, the log and the dashboard.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendInfo {
    /// `"cpu"`, `"vulkan"` or `"metal"`.
    pub name: String,
    /// The adapter's name as the driver reports it (`None` on the CPU backend).
    pub adapter: Option<String>,
    /// The adapter's kind: `"discrete"`, `"integrated"`, `"virtual"`, `"cpu"` (a software rasterizer) or
    /// `"other"` (`None` on the CPU backend).
    pub device_type: Option<String>,
    /// The `-ngl` asked for.
    pub n_gpu_layers: i32,
    /// Repeating layers that run on the GPU (the last ones).
    pub offloaded_layers: usize,
    /// Repeating layers of the model.
    pub n_layer: usize,
    /// Whether the output norm and output projection run on the GPU.
    pub output_offloaded: bool,
    /// Bytes of weights uploaded to the device (the KV cache of a context comes on top).
    pub device_weight_bytes: u64,
    /// Why the GPU was not used although `-ngl` asked for it (no adapter, unsupported architecture, …).
    pub fallback_reason: Option<String>,
}

impl BackendInfo {
    /// The CPU backend for a model of `n_layer` layers, with the `-ngl` asked for and, when that was not
    /// 0, the reason it is not honoured.
    pub fn cpu(n_layer: usize, n_gpu_layers: i32, fallback_reason: Option<String>) -> BackendInfo {
        BackendInfo {
            name: "cpu".into(),
            adapter: None,
            device_type: None,
            n_gpu_layers,
            offloaded_layers: 0,
            n_layer,
            output_offloaded: false,
            device_weight_bytes: 0,
            fallback_reason,
        }
    }

    /// Whether any work runs on a GPU.
    pub fn is_gpu(&self) -> bool {
        self.name != "cpu"
    }
}

pub mod device;
pub mod llama;
pub mod ops;
#[cfg(test)]
mod ops_tests;
pub mod shaders;
pub mod tensor;

/// Errors of the GPU backend; each says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No adapter matches (or none exists); the message lists what was found.
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),
    /// The driver refused the device, a buffer, or a wait.
    #[error("GPU device: {0}")]
    Device(String),
    /// A kernel failed to compile (a bug of ours, named by kernel).
    #[error("GPU kernel: {0}")]
    Shader(String),
    /// The model or context cannot run on the GPU backend (why, named).
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
}

/// The GPU the tests run on: `CYBER_INFERENCE_DEVICE` if set, else a hardware GPU, else any adapter (Mesa's
/// lavapipe in CI). `None` only when `CYBER_INFERENCE_NO_GPU_TESTS=1` says no GPU tests are wanted; no
/// adapter otherwise is a failure (a GPU test never passes by finding nothing to test).
///
/// # Panics
/// When no adapter can be opened and GPU tests were not turned off.
pub fn test_gpu() -> Option<std::sync::Arc<device::Gpu>> {
    if std::env::var("CYBER_INFERENCE_NO_GPU_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("CYBER_INFERENCE_NO_GPU_TESTS=1: GPU test skipped");
        return None;
    }
    static GPU: std::sync::OnceLock<Result<std::sync::Arc<device::Gpu>, String>> =
        std::sync::OnceLock::new();
    let g = GPU.get_or_init(|| {
        let named = std::env::var("CYBER_INFERENCE_DEVICE").ok();
        let adapter = match device::pick_adapter(named.as_deref()) {
            Ok(a) => Ok(a),
            Err(e) if named.is_none() => device::adapters().into_iter().next().ok_or(e),
            Err(e) => Err(e),
        };
        adapter
            .map_err(|e| e.to_string())
            .and_then(|a| device::Gpu::open(a).map_err(|e| e.to_string()))
    });
    match g {
        Ok(g) => Some(g.clone()),
        Err(e) => panic!(
            "GPU test: {e} (install mesa-vulkan-drivers for the software adapter, or set \
             CYBER_INFERENCE_NO_GPU_TESTS=1 to skip GPU tests)"
        ),
    }
}
