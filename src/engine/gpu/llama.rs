//! The offloaded layers of the llama family (llama, qwen2, qwen3, phi3 — dense FFN) on the GPU, and the KV
//! cache of those layers on the device (f16). Mirrors `model/forward.rs::run_decoder` op by op: the hidden
//! state enters at the first offloaded layer and stays on the device up to the logits (or, when the
//! output layer stays on the CPU, back to the host after the last layer).
//!
//! Graphs ported from llama.cpp commit 0c1e570: `src/models/llama.cpp`, `qwen2.cpp`, `qwen3.cpp`,
//! `phi3.cpp`, `src/llama-graph.cpp` (`build_attn_mha`, `build_ffn`).

use std::sync::{Arc, Mutex};

use crate::engine::gguf::GgufFile;
use crate::engine::kernels::ops::RopeMode;
use crate::engine::model::hparams::{Arch, HParams};
use crate::engine::model::weights::{Linear, Weights};

use super::device::{Gpu, Recorder};
use super::ops::{self, AttnShape, Eltwise};
use super::tensor::GpuMatrix;
use super::{BackendInfo, GpuError, GpuOptions};

/// One offloaded layer's weights on the device.
struct GpuLayer {
    attn_norm: wgpu::Buffer,
    wq: GpuMatrix,
    wk: GpuMatrix,
    wv: GpuMatrix,
    wo: GpuMatrix,
    bq: Option<wgpu::Buffer>,
    bk: Option<wgpu::Buffer>,
    bv: Option<wgpu::Buffer>,
    bo: Option<wgpu::Buffer>,
    q_norm: Option<wgpu::Buffer>,
    k_norm: Option<wgpu::Buffer>,
    ffn_norm: wgpu::Buffer,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

/// The model's share on the GPU: the last `n_layer - first_layer` layers and, optionally, the output
/// norm and projection.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    /// Index of the first offloaded layer (layers `first_layer..n_layer` run here).
    pub first_layer: usize,
    layers: Vec<GpuLayer>,
    output: Option<(wgpu::Buffer, GpuMatrix)>,
    info: BackendInfo,
    hp: HParams,
    scratch: Mutex<Option<Scratch>>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("info", &self.info)
            .finish()
    }
}

/// What a forward pass of the offloaded part returns.
pub enum GpuOut {
    /// The output layer ran on the GPU: logits `[n_out, n_vocab]` and, when asked, the normed hidden
    /// rows `[n_out, n_embd]` (decoder embeddings).
    Logits {
        /// `[n_out, n_vocab]`.
        logits: Vec<f32>,
        /// `[n_out, n_embd]` when asked.
        hidden: Option<Vec<f32>>,
    },
    /// The output layer stays on the CPU: the hidden state `[n, n_embd]` after the last layer.
    Hidden(Vec<f32>),
}

/// f32 vector → a device buffer.
fn vec_buf(gpu: &Gpu, name: &str, v: &[f32]) -> wgpu::Buffer {
    gpu.upload(name, bytemuck::cast_slice(v), 0)
}

fn matrix(gpu: &Gpu, file: &GgufFile, w: &Linear) -> Result<GpuMatrix, GpuError> {
    GpuMatrix::upload(
        gpu,
        &w.name,
        w.ty,
        file.tensor_data(&w.info),
        w.n_rows,
        w.n_cols,
    )
}

/// Whether the GPU forward covers `arch` with these weights; `Err` says why not.
fn check_supported(hp: &HParams, w: &Weights) -> Result<(), GpuError> {
    if !matches!(
        hp.arch,
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3
    ) {
        return Err(GpuError::Unsupported(format!(
            "the GPU backend runs the llama family (llama, qwen2, qwen3, phi3); {} runs on the CPU",
            hp.arch.name()
        )));
    }
    if w.layers.iter().any(|l| l.moe.is_some()) {
        return Err(GpuError::Unsupported(
            "mixture-of-experts layers run on the CPU".into(),
        ));
    }
    if w.layers
        .iter()
        .any(|l| l.ffn_up_b.is_some() || l.ffn_down_b.is_some())
    {
        return Err(GpuError::Unsupported("FFN biases run on the CPU".into()));
    }
    if hp.head_dim > 256 || !hp.n_embd_kv().is_multiple_of(2) {
        return Err(GpuError::Unsupported(format!(
            "head_dim {} / n_embd_kv {} (the GPU attention needs head_dim ≤ 256 and an even row)",
            hp.head_dim,
            hp.n_embd_kv()
        )));
    }
    Ok(())
}

impl GpuModel {
    /// Opens the adapter `opts` names and uploads the offloaded layers (the last
    /// `opts.n_gpu_layers`, all when negative or ≥ `n_layer`, with the output layer then too).
    ///
    /// Errors: no adapter, an unsupported architecture or tensor (named), a device error.
    pub fn build(
        file: &GgufFile,
        hp: &HParams,
        w: &Weights,
        opts: &GpuOptions,
    ) -> Result<GpuModel, GpuError> {
        check_supported(hp, w)?;
        let gpu = Gpu::open_named(opts.device.as_deref())?;
        let n_layer = w.layers.len();
        let all = opts.n_gpu_layers < 0 || opts.n_gpu_layers as usize >= n_layer;
        let n_off = if all {
            n_layer
        } else {
            opts.n_gpu_layers as usize
        };
        let first_layer = n_layer - n_off;
        let mut layers = Vec::with_capacity(n_off);
        for (il, l) in w.layers.iter().enumerate().skip(first_layer) {
            let gate = l
                .ffn_gate
                .as_ref()
                .ok_or_else(|| GpuError::Unsupported(format!("blk.{il}: no ffn_gate")))?;
            let opt = |v: &Option<Vec<f32>>, name: &str| v.as_ref().map(|v| vec_buf(&gpu, name, v));
            layers.push(GpuLayer {
                attn_norm: vec_buf(&gpu, "attn_norm", &l.attn_norm),
                wq: matrix(&gpu, file, &l.wq)?,
                wk: matrix(&gpu, file, &l.wk)?,
                wv: matrix(&gpu, file, &l.wv)?,
                wo: matrix(&gpu, file, &l.wo)?,
                bq: opt(&l.bq, "bq"),
                bk: opt(&l.bk, "bk"),
                bv: opt(&l.bv, "bv"),
                bo: opt(&l.bo, "bo"),
                q_norm: opt(&l.q_norm, "q_norm"),
                k_norm: opt(&l.k_norm, "k_norm"),
                ffn_norm: vec_buf(&gpu, "ffn_norm", &l.ffn_norm),
                gate: matrix(&gpu, file, gate)?,
                up: matrix(&gpu, file, &l.ffn_up)?,
                down: matrix(&gpu, file, &l.ffn_down)?,
            });
        }
        let output = if all {
            let norm = w
                .output_norm
                .as_ref()
                .ok_or_else(|| GpuError::Unsupported("no output_norm.weight".into()))?;
            let out = w
                .output
                .as_ref()
                .ok_or_else(|| GpuError::Unsupported("no output.weight".into()))?;
            Some((vec_buf(&gpu, "output_norm", norm), matrix(&gpu, file, out)?))
        } else {
            None
        };
        let mut bytes = 0u64;
        for l in &layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down] {
                bytes += m.device_bytes();
            }
        }
        if let Some((_, m)) = &output {
            bytes += m.device_bytes();
        }
        let ai = gpu.info();
        let info = BackendInfo {
            name: gpu.backend_name(),
            adapter: Some(ai.name.clone()),
            device_type: Some(super::device::device_type_name(ai.device_type).to_string()),
            n_gpu_layers: opts.n_gpu_layers,
            offloaded_layers: n_off,
            n_layer,
            output_offloaded: output.is_some(),
            device_weight_bytes: bytes,
            fallback_reason: None,
        };
        Ok(GpuModel {
            gpu,
            first_layer,
            layers,
            output,
            info,
            hp: hp.clone(),
            scratch: Mutex::new(None),
        })
    }

    /// What runs where.
    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// A KV cache for the offloaded layers: `n_seq` sequences of `n_ctx` positions, f16.
    ///
    /// Errors: [`GpuError::Unsupported`] when one (layer, sequence) slab exceeds the adapter's binding.
    pub fn new_kv(&self, n_seq: usize, n_ctx: usize) -> Result<GpuKv, GpuError> {
        let nkv = self.hp.n_embd_kv();
        let slab = (n_ctx * nkv * 2) as u64;
        if slab > self.gpu.max_binding {
            return Err(GpuError::Unsupported(format!(
                "a context of {n_ctx} positions needs {slab} bytes per layer and sequence, over the \
                 adapter's largest binding ({} bytes)",
                self.gpu.max_binding
            )));
        }
        let n = self.layers.len() * n_seq;
        Ok(GpuKv {
            gpu: self.gpu.clone(),
            first_layer: self.first_layer,
            n_seq,
            n_ctx,
            nkv,
            k: (0..n).map(|_| self.gpu.zeros("kv_k", slab)).collect(),
            v: (0..n).map(|_| self.gpu.zeros("kv_v", slab)).collect(),
        })
    }

    /// Runs the offloaded layers for a batch whose hidden state entering layer `first_layer` is `x`
    /// (`[n, n_embd]`), token `i` of sequence `seq_id[i]` at position `pos[i]`, with per-token rope tables
    /// `rope[i] = (cos, sin)` (`[n_dims / 2]` each, as the CPU computes them); `out_rows` are the tokens
    /// that want logits. Writes the new keys and values into `kv`.
    ///
    /// Errors: a device error or a sequence/position outside `kv`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        kv: &GpuKv,
        x: &[f32],
        seq_id: &[u32],
        pos: &[u32],
        rope: &[(Vec<f32>, Vec<f32>)],
        out_rows: &[usize],
        want_hidden: bool,
    ) -> Result<GpuOut, GpuError> {
        let hp = &self.hp;
        let g = &*self.gpu;
        // Shapes: x [n, e]; q/attn [n, nq]; k, v [n, nkv]; gate/up [n, ff]; logits [n_out, n_vocab].
        let n = seq_id.len();
        let e = hp.n_embd;
        let (hd, nq, nkv) = (hp.head_dim, hp.n_embd_q(), hp.n_embd_kv());
        let ff = self.layers.first().map_or(0, |l| l.gate.n_rows);
        let half = hp.rope_n_dims / 2;
        let neox = hp.arch.rope_mode() == RopeMode::Neox;
        for (&s, &p) in seq_id.iter().zip(pos) {
            if s as usize >= kv.n_seq || p as usize >= kv.n_ctx {
                return Err(GpuError::Unsupported(format!(
                    "sequence {s} position {p} outside the GPU cache ({} × {})",
                    kv.n_seq, kv.n_ctx
                )));
            }
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|s| s.n < n) {
            *guard = Some(Scratch::new(g, n, e, nq, nkv, ff));
        }
        let sc = guard.as_ref().expect("just made");
        g.write(&sc.x, 0, bytemuck::cast_slice(x));
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for (c, s) in rope {
            cos.extend_from_slice(&c[..half]);
            sin.extend_from_slice(&s[..half]);
        }
        let cos_b = vec_buf(g, "rope_cos", &cos);
        let sin_b = vec_buf(g, "rope_sin", &sin);
        // Tokens grouped by sequence, each group's (token row, position) pairs in one buffer.
        let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
        for (i, (&s, &p)) in seq_id.iter().zip(pos).enumerate() {
            match groups.iter_mut().find(|(gs, _)| *gs == s) {
                Some((_, v)) => v.extend([i as u32, p]),
                None => groups.push((s, vec![i as u32, p])),
            }
        }
        let group_bufs: Vec<(usize, usize, wgpu::Buffer)> = groups
            .iter()
            .map(|(s, v)| {
                (
                    *s as usize,
                    v.len() / 2,
                    g.upload("pos", bytemuck::cast_slice(v), 0),
                )
            })
            .collect();
        let q_prescale = hp.arch == Arch::Phi3;
        let shape = AttnShape {
            n_head: hp.n_head,
            head_dim: hd,
            gqa: hp.n_head / hp.n_head_kv,
            nkv,
            scale: if q_prescale {
                1.0
            } else {
                1.0 / (hd as f32).sqrt()
            },
        };
        let mut rec = Recorder::new(g);
        for (li, l) in self.layers.iter().enumerate() {
            ops::eltwise(&mut rec, Eltwise::Copy, &sc.h, &sc.x, n * e)?;
            ops::rms_norm(&mut rec, &sc.h, &l.attn_norm, n, e, hp.norm_eps)?;
            l.wq.record(&mut rec, &sc.h, n, &sc.q, nq, 0)?;
            l.wk.record(&mut rec, &sc.h, n, &sc.k, nkv, 0)?;
            l.wv.record(&mut rec, &sc.h, n, &sc.v, nkv, 0)?;
            for (b, y, len) in [(&l.bq, &sc.q, nq), (&l.bk, &sc.k, nkv), (&l.bv, &sc.v, nkv)] {
                if let Some(b) = b {
                    ops::eltwise(&mut rec, Eltwise::AddBias(len), y, b, n * len)?;
                }
            }
            if let Some(qn) = &l.q_norm {
                ops::rms_norm(&mut rec, &sc.q, qn, n * hp.n_head, hd, hp.norm_eps)?;
            }
            if let Some(kn) = &l.k_norm {
                ops::rms_norm(&mut rec, &sc.k, kn, n * hp.n_head_kv, hd, hp.norm_eps)?;
            }
            let nd = hp.rope_n_dims;
            ops::rope(&mut rec, &sc.q, &cos_b, &sin_b, n, hp.n_head, hd, nd, neox)?;
            ops::rope(
                &mut rec,
                &sc.k,
                &cos_b,
                &sin_b,
                n,
                hp.n_head_kv,
                hd,
                nd,
                neox,
            )?;
            if q_prescale {
                let s = 1.0 / (hd as f32).sqrt();
                ops::eltwise(&mut rec, Eltwise::Scale(s), &sc.q, &sc.q, n * nq)?;
            }
            for (seq, cnt, pb) in &group_bufs {
                let (kc, vc) = kv.slabs(li, *seq);
                ops::kv_store(&mut rec, &sc.k, &sc.v, pb, kc, vc, *cnt, nkv)?;
                ops::attention(&mut rec, &shape, &sc.q, kc, vc, pb, &sc.a, *cnt)?;
            }
            l.wo.record(&mut rec, &sc.a, n, &sc.o, e, 0)?;
            if let Some(bo) = &l.bo {
                ops::eltwise(&mut rec, Eltwise::AddBias(e), &sc.o, bo, n * e)?;
            }
            ops::eltwise(&mut rec, Eltwise::Add, &sc.x, &sc.o, n * e)?;
            ops::eltwise(&mut rec, Eltwise::Copy, &sc.h, &sc.x, n * e)?;
            ops::rms_norm(&mut rec, &sc.h, &l.ffn_norm, n, e, hp.norm_eps)?;
            l.gate.record(&mut rec, &sc.h, n, &sc.gate, ff, 0)?;
            l.up.record(&mut rec, &sc.h, n, &sc.up, ff, 0)?;
            ops::eltwise(&mut rec, Eltwise::SwiGlu, &sc.gate, &sc.up, n * ff)?;
            l.down.record(&mut rec, &sc.gate, n, &sc.o, e, 0)?;
            ops::eltwise(&mut rec, Eltwise::Add, &sc.x, &sc.o, n * e)?;
        }
        let Some((norm, out)) = &self.output else {
            rec.submit();
            return Ok(GpuOut::Hidden(g.read_f32(&sc.x, 0, n * e)?));
        };
        let n_out = out_rows.len();
        if n_out == 0 {
            rec.submit();
            return Ok(GpuOut::Logits {
                logits: Vec::new(),
                hidden: want_hidden.then(Vec::new),
            });
        }
        let idx: Vec<u32> = out_rows.iter().map(|&i| i as u32).collect();
        let idx_b = g.upload("out_rows", bytemuck::cast_slice(&idx), 0);
        ops::gather(&mut rec, &sc.x, &idx_b, &sc.h, n_out, e)?;
        ops::rms_norm(&mut rec, &sc.h, norm, n_out, e, hp.norm_eps)?;
        let logits_b = g.zeros("logits", (n_out * out.n_rows * 4) as u64);
        out.record(&mut rec, &sc.h, n_out, &logits_b, out.n_rows, 0)?;
        rec.submit();
        let logits = g.read_f32(&logits_b, 0, n_out * out.n_rows)?;
        let hidden = if want_hidden {
            Some(g.read_f32(&sc.h, 0, n_out * e)?)
        } else {
            None
        };
        Ok(GpuOut::Logits { logits, hidden })
    }
}

/// The activation buffers of a forward pass of up to `n` tokens, kept between passes.
struct Scratch {
    n: usize,
    x: wgpu::Buffer,
    h: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    a: wgpu::Buffer,
    o: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
}

impl Scratch {
    fn new(g: &Gpu, n: usize, e: usize, nq: usize, nkv: usize, ff: usize) -> Scratch {
        let b = |name: &str, len: usize| g.zeros(name, (n * len * 4) as u64);
        Scratch {
            n,
            x: b("x", e),
            h: b("h", e.max(nq)),
            q: b("q", nq),
            k: b("k", nkv),
            v: b("v", nkv),
            a: b("attn", nq),
            o: b("o", e),
            gate: b("gate", ff),
            up: b("up", ff),
        }
    }
}

/// The KV cache of the offloaded layers on the device: per (offloaded layer, sequence) one key and one
/// value slab of `[n_ctx, n_embd_kv]` f16 (cell = position), the layout of the host cache's f16 store,
/// so rows move between them byte for byte.
pub struct GpuKv {
    gpu: Arc<Gpu>,
    /// The first offloaded layer (model layer index of slab 0).
    pub first_layer: usize,
    n_seq: usize,
    n_ctx: usize,
    nkv: usize,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
}

impl GpuKv {
    /// The (keys, values) slabs of offloaded layer `li` (0 = `first_layer`) and `seq`.
    fn slabs(&self, li: usize, seq: usize) -> (&wgpu::Buffer, &wgpu::Buffer) {
        let i = li * self.n_seq + seq;
        (&self.k[i], &self.v[i])
    }

    /// Bytes on the device.
    pub fn size_bytes(&self) -> u64 {
        (self.k.len() + self.v.len()) as u64 * (self.n_ctx * self.nkv * 2) as u64
    }

    /// Appends positions `p0..p1` of `seq` in model layer `layer` as f16 little-endian bytes: the key
    /// rows, then the value rows (the host cache's `export_rows` format for an f16 cache).
    ///
    /// Errors: a device error.
    pub fn export_rows(
        &self,
        layer: usize,
        seq: usize,
        p0: usize,
        p1: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), GpuError> {
        let (kc, vc) = self.slabs(layer - self.first_layer, seq);
        let rb = (self.nkv * 2) as u64;
        let (o, len) = (p0 as u64 * rb, (p1 - p0) as u64 * rb);
        out.extend(self.gpu.read(kc, o, len)?);
        out.extend(self.gpu.read(vc, o, len)?);
        Ok(())
    }

    /// Writes key rows `k` and value rows `v` (f16 bytes, whole rows) at positions `p0..` of `seq` in
    /// model layer `layer`.
    pub fn import_rows(&self, layer: usize, seq: usize, p0: usize, k: &[u8], v: &[u8]) {
        let (kc, vc) = self.slabs(layer - self.first_layer, seq);
        let o = (p0 * self.nkv * 2) as u64;
        self.gpu.write(kc, o, k);
        self.gpu.write(vc, o, v);
    }
}
