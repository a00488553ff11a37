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
