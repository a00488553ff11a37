//! One wgpu device: adapter choice, compiled pipelines, buffers, and a recorder that turns a list of
//! kernel dispatches into one command submission (wgpu orders the dispatches of a compute pass and
//! inserts the barriers between a write and a later read of the same buffer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::GpuError;
use super::shaders;

/// Bytes of one uniform slot: every dispatch's parameters live in their own 256-byte slot of one buffer
/// (the largest `min_uniform_buffer_offset_alignment` wgpu allows).
const PARAM_SLOT: u64 = 256;

/// Largest workgroup count per dispatch dimension (WebGPU's `maxComputeWorkgroupsPerDimension`
/// default).
pub const MAX_GROUPS: u32 = 65_535;

/// An opened GPU: device, queue, the adapter's facts and the pipelines compiled so far.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    /// Largest storage binding in bytes (tensors larger than this are split by rows).
    pub max_binding: u64,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

/// The adapter kind as [`super::BackendInfo::device_type`] names it.
pub fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Every adapter of the Vulkan and Metal backends, in the order `--device` indexes them.
pub fn adapters() -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL;
    let instance = wgpu::Instance::new(desc);
    pollster::block_on(instance.enumerate_adapters(desc_backends()))
}

fn desc_backends() -> wgpu::Backends {
    wgpu::Backends::VULKAN | wgpu::Backends::METAL
}

/// Picks the adapter `device` names (an index into [`adapters`] or a case-insensitive substring of its
/// name); `None` picks the first discrete, then integrated, then virtual GPU — never a software
/// rasterizer unless named.
///
/// Errors: [`GpuError::NoAdapter`] saying what was found.
pub fn pick_adapter(device: Option<&str>) -> Result<wgpu::Adapter, GpuError> {
    let all = adapters();
    let listing = || {
        if all.is_empty() {
            "no Vulkan or Metal adapter (is a Vulkan driver installed? on Debian: libvulkan1 and \
             mesa-vulkan-drivers or the GPU vendor's driver)"
                .to_string()
        } else {
            all.iter()
                .enumerate()
                .map(|(i, a)| {
                    let info = a.get_info();
                    format!(
                        "{i}: {} ({}, {:?})",
                        info.name,
                        device_type_name(info.device_type),
                        info.backend
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
    };
    if let Some(want) = device {
        let want = want.trim();
        let found = match want.parse::<usize>() {
            Ok(i) => all.get(i).cloned(),
            Err(_) => {
                let w = want.to_lowercase();
                all.iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&w))
                    .cloned()
            }
        };
        return found.ok_or_else(|| {
            GpuError::NoAdapter(format!("--device {want:?} matches none of: {}", listing()))
        });
    }
    for kind in [
        wgpu::DeviceType::DiscreteGpu,
        wgpu::DeviceType::IntegratedGpu,
        wgpu::DeviceType::VirtualGpu,
    ] {
        if let Some(a) = all.iter().find(|a| a.get_info().device_type == kind) {
            return Ok(a.clone());
        }
    }
    Err(GpuError::NoAdapter(format!(
        "no hardware GPU adapter (found: {}); name a software one with --device to use it",
        listing()
    )))
}

impl Gpu {
    /// Opens `adapter` with its own limits (largest bindings and buffers it offers).
    ///
    /// Errors: [`GpuError::Device`] when the driver refuses the device.
    pub fn open(adapter: wgpu::Adapter) -> Result<Arc<Gpu>, GpuError> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("cyber-inference"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(format!("{}: {e}", info.name)))?;
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Ok(Arc::new(Gpu {
            device,
            queue,
            info,
            max_binding,
            pipelines: Mutex::new(HashMap::new()),
        }))
    }

    /// Opens the adapter `device` names (see [`pick_adapter`]).
    pub fn open_named(device: Option<&str>) -> Result<Arc<Gpu>, GpuError> {
        Self::open(pick_adapter(device)?)
    }

    /// The same device with a smaller binding limit (tests of the row split).
    pub fn with_max_binding(&self, max_binding: u64) -> Gpu {
        Gpu {
            device: self.device.clone(),
            queue: self.queue.clone(),
            info: self.info.clone(),
            max_binding,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// The adapter's facts (name, kind, backend, driver).
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// `"vulkan"`, `"metal"` or the backend's own name.
    pub fn backend_name(&self) -> String {
        match self.info.backend {
            wgpu::Backend::Vulkan => "vulkan".into(),
            wgpu::Backend::Metal => "metal".into(),
            b => format!("{b:?}").to_lowercase(),
        }
    }

    /// The compiled pipeline of `kernel` (see [`shaders::source`]), compiling it on first use.
    ///
    /// Errors: [`GpuError::Shader`] when the driver refuses the WGSL (a bug of ours, named by kernel).
    pub fn pipeline(&self, kernel: &str) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(kernel) {
            return Ok(p.clone());
        }
        let src = shaders::source(kernel)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader(format!("{kernel}: {e}")));
        }
        let p = Arc::new(pipeline);
        cache.insert(kernel.to_string(), p.clone());
        Ok(p)
    }

    /// A storage buffer of `bytes` (rounded up to 4, at least 4) holding `data` (zeros after it).
    pub fn upload(&self, label: &str, data: &[u8], bytes: u64) -> wgpu::Buffer {
        let size = bytes.max(data.len() as u64).max(4).div_ceil(4) * 4;
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        if !data.is_empty() {
            let n = data.len() / 4 * 4;
            if n > 0 {
                self.queue.write_buffer(&buf, 0, &data[..n]);
            }
            if n < data.len() {
                let mut tail = [0u8; 4];
                tail[..data.len() - n].copy_from_slice(&data[n..]);
                self.queue.write_buffer(&buf, n as u64, &tail);
            }
        }
        buf
    }

    /// A zeroed storage buffer of `bytes` (rounded up to 4).
    pub fn zeros(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.upload(label, &[], bytes)
    }

    /// Overwrites `buf` at byte `offset` with `data` (length a multiple of 4), ordered before the next
    /// submission.
    pub fn write(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        if !data.is_empty() {
            self.queue.write_buffer(buf, offset, data);
        }
    }

    /// Reads `bytes` bytes of `buf` from `offset` (multiples of 4), waiting for all submitted work.
    ///
    /// Errors: [`GpuError::Device`] when the device is lost or the mapping fails.
    pub fn read(&self, buf: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>, GpuError> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read"),
            });
        enc.copy_buffer_to_buffer(buf, offset, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Device(format!("waiting for the device: {e}")))?;
        rx.recv()
            .map_err(|_| GpuError::Device("the read-back mapping was dropped".into()))?
            .map_err(|e| GpuError::Device(format!("mapping the read-back buffer: {e}")))?;
        let out = slice
            .get_mapped_range()
            .map_err(|e| GpuError::Device(format!("reading the read-back buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(out)
    }

    /// Reads `n` f32 values of `buf` from element `offset`.
    pub fn read_f32(
        &self,
        buf: &wgpu::Buffer,
        offset: usize,
        n: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let bytes = self.read(buf, offset as u64 * 4, n as u64 * 4)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Copies `bytes` from `src` at `src_off` to `dst` at `dst_off` on the device, in submission order.
    pub fn copy(
        &self,
        src: &wgpu::Buffer,
        src_off: u64,
        dst: &wgpu::Buffer,
        dst_off: u64,
        bytes: u64,
    ) {
        if bytes == 0 {
            return;
        }
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("copy"),
            });
        enc.copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
        self.queue.submit([enc.finish()]);
    }
}

/// One kernel launch: pipeline, storage buffers in binding order (bindings `0..n`), its parameters
/// (binding `n`, a uniform of up to 256 bytes of u32/f32 words) and the workgroup grid.
struct Dispatch {
    pipeline: Arc<wgpu::ComputePipeline>,
    buffers: Vec<wgpu::Buffer>,
    params: Vec<u32>,
    groups: (u32, u32, u32),
}

/// Records dispatches and submits them together: the layers of one forward pass are one submission.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    list: Vec<Dispatch>,
}

impl<'g> Recorder<'g> {
    /// An empty recording on `gpu`.
    pub fn new(gpu: &'g Gpu) -> Recorder<'g> {
        Recorder {
            gpu,
            list: Vec::new(),
        }
    }

    /// Adds a launch of `kernel` over `groups` workgroups; `buffers` bind to `0..`, `params` (u32 words,
    /// f32 as bits, at most 64) to the binding after them.
    ///
    /// Errors: the pipeline's compile error.
    pub fn dispatch(
        &mut self,
        kernel: &str,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        groups: (u32, u32, u32),
    ) -> Result<(), GpuError> {
        debug_assert!(params.len() <= (PARAM_SLOT / 4) as usize);
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return Ok(());
        }
        let pipeline = self.gpu.pipeline(kernel)?;
        self.list.push(Dispatch {
            pipeline,
            buffers: buffers.iter().map(|b| (*b).clone()).collect(),
            params: params.to_vec(),
            groups,
        });
        Ok(())
    }

    /// Submits every recorded dispatch in order as one compute pass (nothing waits for it; a later
    /// [`Gpu::read`] does).
    pub fn submit(self) {
        if self.list.is_empty() {
            return;
        }
        let g = self.gpu;
        let mut words = vec![0u32; self.list.len() * (PARAM_SLOT / 4) as usize];
        for (i, d) in self.list.iter().enumerate() {
            let o = i * (PARAM_SLOT / 4) as usize;
            words[o..o + d.params.len()].copy_from_slice(&d.params);
        }
        let params = g.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: words.len() as u64 * 4,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        g.queue
            .write_buffer(&params, 0, bytemuck::cast_slice(&words));
        let groups: Vec<wgpu::BindGroup> = self
            .list
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let layout = d.pipeline.get_bind_group_layout(0);
                let mut entries: Vec<wgpu::BindGroupEntry> = d
                    .buffers
                    .iter()
                    .enumerate()
                    .map(|(b, buf)| wgpu::BindGroupEntry {
                        binding: b as u32,
                        resource: buf.as_entire_binding(),
                    })
                    .collect();
                entries.push(wgpu::BindGroupEntry {
                    binding: d.buffers.len() as u32,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &params,
                        offset: i as u64 * PARAM_SLOT,
                        size: std::num::NonZeroU64::new(PARAM_SLOT),
                    }),
                });
                g.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &layout,
                    entries: &entries,
                })
            })
            .collect();
        let mut enc = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("forward"),
                timestamp_writes: None,
            });
            for (d, bg) in self.list.iter().zip(&groups) {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, bg, &[]);
                pass.dispatch_workgroups(d.groups.0, d.groups.1, d.groups.2);
            }
        }
        g.queue.submit([enc.finish()]);
    }
}

/// Splits `n` workgroups into a 2-D grid `(x ≤ MAX_GROUPS, y)`; kernels recover the index as
/// `x + y · MAX_GROUPS` and skip the tail.
pub fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n.max(1), 1)
    } else {
        (MAX_GROUPS, n.div_ceil(MAX_GROUPS))
    }
}
