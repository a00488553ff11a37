//! Typed launchers of the non-matmul kernels (`shaders.rs`): each records one dispatch with its
//! parameters laid out as the kernel's uniform struct, so the forward pass never writes raw words.

use super::GpuError;
use super::device::{Recorder, grid};

/// Workgroups of 64 threads covering `n` threads, as a 2-D grid `(x, y)`.
fn threads64(n: usize) -> (u32, u32) {
    grid((n as u32).div_ceil(64))
}

/// RMS norm in place of `rows` rows of `len` elements of `x`, times `g` (`[len]`), with `eps`
/// (`ops::rms_norm`).
pub fn rms_norm(
    rec: &mut Recorder<'_>,
    x: &wgpu::Buffer,
    g: &wgpu::Buffer,
    rows: usize,
    len: usize,
    eps: f32,
) -> Result<(), GpuError> {
    let (gx, gy) = grid(rows as u32);
    rec.dispatch(
        "rms_norm",
        &[x, g],
        &[rows as u32, len as u32, eps.to_bits(), gx],
        (gx, gy, 1),
    )
}

/// Rope in place on `x` (`[n, heads · head_dim]`) with the tables `cos`, `sin` (`[n, n_dims / 2]`), NeoX
/// pairing when `neox` (`ops::rope`).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    rec: &mut Recorder<'_>,
    x: &wgpu::Buffer,
    cos: &wgpu::Buffer,
    sin: &wgpu::Buffer,
    n: usize,
    heads: usize,
    head_dim: usize,
    n_dims: usize,
    neox: bool,
) -> Result<(), GpuError> {
    let (gx, gy) = threads64(n * heads * (n_dims / 2));
    rec.dispatch(
        "rope",
        &[x, cos, sin],
        &[
            n as u32,
            heads as u32,
            head_dim as u32,
            n_dims as u32,
            u32::from(neox),
            gx,
        ],
        (gx, gy, 1),
    )
}

/// The element-wise operations of the `eltwise` kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Eltwise {
    /// `x += y` (residual).
    Add,
    /// `x[i] += y[i % m]` (a bias of `m` elements on every row).
    AddBias(usize),
    /// `x = silu(x) · y` (`ops::swiglu`).
    SwiGlu,
    /// `x *= s`.
    Scale(f32),
    /// `x = y`.
    Copy,
}

/// `op` on the first `len` elements of `x` (with `y`, unused by [`Eltwise::Scale`] but bound).
pub fn eltwise(
    rec: &mut Recorder<'_>,
    op: Eltwise,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    len: usize,
) -> Result<(), GpuError> {
    let (code, m, scale) = match op {
        Eltwise::Add => (0, 1, 0.0f32),
        Eltwise::AddBias(m) => (1, m as u32, 0.0),
        Eltwise::SwiGlu => (2, 1, 0.0),
        Eltwise::Scale(s) => (3, 1, s),
        Eltwise::Copy => (4, 1, 0.0),
    };
    let (gx, gy) = threads64(len);
    rec.dispatch(
        "eltwise",
        &[x, y],
        &[len as u32, code, m, scale.to_bits(), gx],
        (gx, gy, 1),
    )
}

/// Stores `n` tokens' keys and values (`k`, `v`: `[*, nkv]` f32) as f16 into one sequence's cache slabs
/// (`kc`, `vc`: `[n_ctx, nkv]`); `pos` holds `n` pairs `(token row, position)` (u32).
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    rec: &mut Recorder<'_>,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    pos: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    n: usize,
    nkv: usize,
) -> Result<(), GpuError> {
    let (gx, gy) = threads64(n * nkv / 2);
    rec.dispatch(
        "kv_store",
        &[k, v, pos, kc, vc],
        &[n as u32, nkv as u32, gx, 0],
        (gx, gy, 1),
    )
}

/// Shape of one attention dispatch.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query heads.
    pub n_head: usize,
    /// Elements per head (≤ 256).
    pub head_dim: usize,
    /// Query heads per KV head.
    pub gqa: usize,
    /// Elements of a cache row (`n_head_kv · head_dim`).
    pub nkv: usize,
    /// Score scale (`1/sqrt(head_dim)` unless the model says otherwise).
    pub scale: f32,
}

/// Attention of `n` tokens of one sequence: `pos` holds `n` pairs `(token row, position)`; the token
/// attends to positions `0 ..= position` of `kc`, `vc`; output rows into `o` (`[*, n_head · head_dim]`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    rec: &mut Recorder<'_>,
    s: &AttnShape,
    q: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    pos: &wgpu::Buffer,
    o: &wgpu::Buffer,
    n: usize,
) -> Result<(), GpuError> {
    if s.head_dim > 256 {
        return Err(GpuError::Unsupported(format!(
            "head_dim {} (the attention kernel holds at most 256)",
            s.head_dim
        )));
    }
    rec.dispatch(
        "attn",
        &[q, kc, vc, pos, o],
        &[
            n as u32,
            s.n_head as u32,
            s.head_dim as u32,
            s.gqa as u32,
            s.nkv as u32,
            s.scale.to_bits(),
            0,
            0,
        ],
        (s.n_head as u32, n as u32, 1),
    )
}

/// Copies rows `idx[r]` (u32) of `x` (`[*, len]`) to row `r` of `y`, for `rows` rows.
pub fn gather(
    rec: &mut Recorder<'_>,
    x: &wgpu::Buffer,
    idx: &wgpu::Buffer,
    y: &wgpu::Buffer,
    rows: usize,
    len: usize,
) -> Result<(), GpuError> {
    let (gx, gy) = threads64(rows * len);
    rec.dispatch(
        "gather",
        &[x, idx, y],
        &[rows as u32, len as u32, gx, 0],
        (gx, gy, 1),
    )
}
