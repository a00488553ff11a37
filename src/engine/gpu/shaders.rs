//! The WGSL kernels, one source per kernel name. Matrix × matrix is one generic kernel over "units" of
//! 32 weights, specialised per GGUF block type by a decoder of one unit read from the tensor's bytes in
//! place (the GGUF layout, no repacking); the other kernels mirror `kernels/ops.rs`.
//!
//! Every output element is reduced in one fixed order that depends only on the row length: a thread of
//! the 32 in a workgroup takes the units `lid, lid + 32, …` in order, each unit's 32 products summed in
//! index order, then the 32 partial sums are added in a fixed tree. No atomics, no split that depends on
//! the batch: a token's result does not depend on the other tokens of the dispatch (batch invariance).
//!
//! Block layouts and dequantization formulas are ggml's (`ggml/src/ggml-quants.c`,
//! `dequantize_row_*`, llama.cpp commit 0c1e570).

use crate::engine::ggml_type::GgmlType;

use super::GpuError;

/// Threads per matmul workgroup (one weight row each workgroup).
pub const MM_WG: u32 = 32;
/// Tokens per matmul workgroup (a tile of the batch; the last tile may hold fewer).
pub const MM_TILE: u32 = 8;

/// Types the matmul kernel reads in place.
pub const MATMUL_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::BF16,
];

/// The kernel name of the matmul over `ty` (`None`: not read in place; dequantize to F16 at load).
pub fn matmul_kernel(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "mm_f32",
        GgmlType::F16 => "mm_f16",
        GgmlType::BF16 => "mm_bf16",
        GgmlType::Q8_0 => "mm_q8_0",
        GgmlType::Q4_0 => "mm_q4_0",
        GgmlType::Q4_1 => "mm_q4_1",
        GgmlType::Q5_0 => "mm_q5_0",
        GgmlType::Q5_1 => "mm_q5_1",
        GgmlType::Q4_K => "mm_q4_k",
        GgmlType::Q5_K => "mm_q5_k",
        GgmlType::Q6_K => "mm_q6_k",
        _ => return None,
    })
}

/// Byte readers over the raw tensor `W` (little-endian, any alignment; the buffer is padded by a word).
const READERS: &str = r#"
fn wb(o: u32) -> u32 { return (W[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu; }
fn w16(o: u32) -> u32 { return wb(o) | (wb(o + 1u) << 8u); }
fn w32(o: u32) -> u32 {
    let s = (o & 3u) * 8u;
    if (s == 0u) { return W[o >> 2u]; }
    return (W[o >> 2u] >> s) | (W[(o >> 2u) + 1u] << (32u - s));
}
fn wf16(o: u32) -> f32 { return unpack2x16float(w16(o)).x; }
fn ws8(o: u32) -> f32 { return f32(i32(wb(o) << 24u) >> 24u); }
"#;

/// Per type: bytes per block, units (of 32 weights) per block, and `unit(b, s)` filling `v` with the
/// 32 weights of unit `s` of the block starting at byte `b`.
fn unit_decoder(ty: GgmlType) -> Option<(u32, u32, &'static str)> {
    Some(match ty {
        GgmlType::F32 => (
            128,
            1,
            r#"fn unit(b: u32, s: u32) { for (var i = 0u; i < 32u; i++) { v[i] = bitcast<f32>(w32(b + 4u * i)); } }"#,
        ),
        GgmlType::F16 => (
            64,
            1,
            r#"fn unit(b: u32, s: u32) { for (var i = 0u; i < 32u; i++) { v[i] = wf16(b + 2u * i); } }"#,
        ),
        GgmlType::BF16 => (
            64,
            1,
            r#"fn unit(b: u32, s: u32) { for (var i = 0u; i < 32u; i++) { v[i] = bitcast<f32>(w16(b + 2u * i) << 16u); } }"#,
        ),
        GgmlType::Q8_0 => (
            34,
            1,
            r#"fn unit(b: u32, s: u32) {
    let d = wf16(b);
    for (var i = 0u; i < 32u; i++) { v[i] = ws8(b + 2u + i) * d; }
}"#,
        ),
        GgmlType::Q4_0 => (
            18,
            1,
            r#"fn unit(b: u32, s: u32) {
    let d = wf16(b);
    for (var j = 0u; j < 16u; j++) {
        let q = wb(b + 2u + j);
        v[j] = (f32(q & 15u) - 8.0) * d;
        v[j + 16u] = (f32(q >> 4u) - 8.0) * d;
    }
}"#,
        ),
        GgmlType::Q4_1 => (
            20,
            1,
            r#"fn unit(b: u32, s: u32) {
    let d = wf16(b);
    let m = wf16(b + 2u);
    for (var j = 0u; j < 16u; j++) {
        let q = wb(b + 4u + j);
        v[j] = f32(q & 15u) * d + m;
        v[j + 16u] = f32(q >> 4u) * d + m;
    }
}"#,
        ),
        GgmlType::Q5_0 => (
            22,
            1,
            r#"fn unit(b: u32, s: u32) {
    let d = wf16(b);
    let qh = w32(b + 2u);
    for (var j = 0u; j < 16u; j++) {
        let q = wb(b + 6u + j);
        let h0 = ((qh >> j) & 1u) << 4u;
        let h1 = ((qh >> (j + 16u)) & 1u) << 4u;
        v[j] = (f32((q & 15u) | h0) - 16.0) * d;
        v[j + 16u] = (f32((q >> 4u) | h1) - 16.0) * d;
    }
}"#,
        ),
        GgmlType::Q5_1 => (
            24,
            1,
            r#"fn unit(b: u32, s: u32) {
    let d = wf16(b);
    let m = wf16(b + 2u);
    let qh = w32(b + 4u);
    for (var j = 0u; j < 16u; j++) {
        let q = wb(b + 8u + j);
        let h0 = ((qh >> j) & 1u) << 4u;
        let h1 = ((qh >> (j + 16u)) & 1u) << 4u;
        v[j] = f32((q & 15u) | h0) * d + m;
        v[j + 16u] = f32((q >> 4u) | h1) * d + m;
    }
}"#,
        ),
        GgmlType::Q4_K => (
            144,
            8,
            r#"fn scale_min_k4(b: u32, j: u32) -> vec2<f32> {
    if (j < 4u) { return vec2<f32>(f32(wb(b + 4u + j) & 63u), f32(wb(b + 8u + j) & 63u)); }
    let sc = (wb(b + 8u + j) & 15u) | ((wb(b + j) >> 6u) << 4u);
    let m = (wb(b + 8u + j) >> 4u) | ((wb(b + 4u + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
fn unit(b: u32, s: u32) {
    let sm = scale_min_k4(b, s);
    let d = wf16(b) * sm.x;
    let m = wf16(b + 2u) * sm.y;
    let q0 = b + 16u + 32u * (s >> 1u);
    let sh = (s & 1u) * 4u;
    for (var l = 0u; l < 32u; l++) { v[l] = d * f32((wb(q0 + l) >> sh) & 15u) - m; }
}"#,
        ),
        GgmlType::Q5_K => (
            176,
            8,
            r#"fn scale_min_k4(b: u32, j: u32) -> vec2<f32> {
    if (j < 4u) { return vec2<f32>(f32(wb(b + 4u + j) & 63u), f32(wb(b + 8u + j) & 63u)); }
    let sc = (wb(b + 8u + j) & 15u) | ((wb(b + j) >> 6u) << 4u);
    let m = (wb(b + 8u + j) >> 4u) | ((wb(b + 4u + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}
fn unit(b: u32, s: u32) {
    let sm = scale_min_k4(b, s);
    let d = wf16(b) * sm.x;
    let m = wf16(b + 2u) * sm.y;
    let q0 = b + 48u + 32u * (s >> 1u);
    let sh = (s & 1u) * 4u;
    for (var l = 0u; l < 32u; l++) {
        let h = ((wb(b + 16u + l) >> s) & 1u) << 4u;
        v[l] = d * f32(((wb(q0 + l) >> sh) & 15u) + h) - m;
    }
}"#,
        ),
        GgmlType::Q6_K => (
            210,
            8,
            r#"fn unit(b: u32, s: u32) {
    let n = s >> 2u;
    let qd = s & 3u;
    let d = wf16(b + 208u);
    let ql0 = b + 64u * n + (qd & 1u) * 32u;
    let sh = (qd >> 1u) * 4u;
    let qh0 = b + 128u + 32u * n;
    for (var l = 0u; l < 32u; l++) {
        let lo = (wb(ql0 + l) >> sh) & 15u;
        let hi = (wb(qh0 + l) >> (2u * qd)) & 3u;
        let sc = ws8(b + 192u + 8u * n + (l >> 4u) + 2u * qd);
        v[l] = d * sc * (f32(lo | (hi << 4u)) - 32.0);
    }
}"#,
        ),
        _ => return None,
    })
}

/// `Y[t, y_off + r] = Σ_k W[r, k] · X[t, k]` for the `rows` rows of one weight chunk and the `n` tokens of
/// `X` (`[n, k]`, row stride `k`), `Y` row stride `y_stride`. Grid: (row groups x, y; token tiles z).
const MATMUL: &str = r#"
@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> X: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
struct P { rows: u32, k: u32, n: u32, row_bytes: u32, y_stride: u32, y_off: u32, gx: u32, pad: u32 }
@group(0) @binding(3) var<uniform> p: P;
var<private> v: array<f32, 32>;
var<workgroup> part: array<f32, 256>;
READERS
UNIT
@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * p.gx;
    if (row >= p.rows) { return; }
    let t0 = wid.z * 8u;
    let nt = min(8u, p.n - t0);
    var acc: array<f32, 8>;
    for (var t = 0u; t < 8u; t++) { acc[t] = 0.0; }
    let n_units = p.k / 32u;
    let base = row * p.row_bytes;
    for (var u = lid; u < n_units; u += 32u) {
        unit(base + (u / UPB) * BLOCK_BYTES, u % UPB);
        for (var t = 0u; t < nt; t++) {
            let xo = (t0 + t) * p.k + u * 32u;
            var d = 0.0;
            for (var i = 0u; i < 32u; i++) { d = d + v[i] * X[xo + i]; }
            acc[t] = acc[t] + d;
        }
    }
    for (var t = 0u; t < 8u; t++) { part[t * 32u + lid] = acc[t]; }
    workgroupBarrier();
    for (var s = 16u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            for (var t = 0u; t < 8u; t++) { part[t * 32u + lid] = part[t * 32u + lid] + part[t * 32u + lid + s]; }
        }
        workgroupBarrier();
    }
    if (lid < 8u && t0 + lid < p.n) {
        Y[(t0 + lid) * p.y_stride + p.y_off + row] = part[lid * 32u];
    }
}
"#;

/// RMS norm of `rows` rows of length `len` of `X` in place, times `G[len]` (`ops::rms_norm`: mean of
/// squares, `x · (1/sqrt(mean + eps)) · g`). One workgroup of 64 per row (grid x, y).
const RMS_NORM: &str = r#"
@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<storage, read> G: array<f32>;
struct P { rows: u32, len: u32, eps: f32, gx: u32 }
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> part: array<f32, 64>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * p.gx;
    if (row >= p.rows) { return; }
    let o = row * p.len;
    var s = 0.0;
    for (var i = lid; i < p.len; i += 64u) { let x = X[o + i]; s = s + x * x; }
    part[lid] = s;
    workgroupBarrier();
    for (var k = 32u; k > 0u; k = k >> 1u) {
        if (lid < k) { part[lid] = part[lid] + part[lid + k]; }
        workgroupBarrier();
    }
    let scale = 1.0 / sqrt(part[0] / f32(p.len) + p.eps);
    for (var i = lid; i < p.len; i += 64u) { X[o + i] = (X[o + i] * scale) * G[i]; }
}
"#;

/// Rope in place on `X` (`[n, heads · head_dim]`) with per-token tables `C`, `S` (`[n, n_dims / 2]`):
/// pairs `(2i, 2i+1)` (normal) or `(i, i + n_dims/2)` (NeoX), `ops::rope`. One thread per pair.
const ROPE: &str = r#"
@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<storage, read> C: array<f32>;
@group(0) @binding(2) var<storage, read> S: array<f32>;
struct P { n: u32, heads: u32, head_dim: u32, n_dims: u32, neox: u32, gx: u32 }
@group(0) @binding(3) var<uniform> p: P;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half = p.n_dims / 2u;
    let idx = (wid.x + wid.y * p.gx) * 64u + lid;
    if (idx >= p.n * p.heads * half) { return; }
    let i = idx % half;
    let h = (idx / half) % p.heads;
    let t = idx / (half * p.heads);
    let base = (t * p.heads + h) * p.head_dim;
    var a = base + 2u * i;
    var b = a + 1u;
    if (p.neox != 0u) { a = base + i; b = base + i + half; }
    let x0 = X[a];
    let x1 = X[b];
    let c = C[t * half + i];
    let s = S[t * half + i];
    X[a] = fma(x0, c, -(x1 * s));
    X[b] = fma(x0, s, x1 * c);
}
"#;

/// Element-wise kernels over `len` elements, one thread each: `op` 0 `X += Y`, 1 `X[i] += Y[i % m]`
/// (bias), 2 `X = silu(X) · Y` (SwiGLU, `ops::swiglu`), 3 `X *= scale`, 4 `X = Y` (copy).
const ELTWISE: &str = r#"
@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<storage, read> Y: array<f32>;
struct P { len: u32, op: u32, m: u32, scale: f32, gx: u32 }
@group(0) @binding(2) var<uniform> p: P;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * p.gx) * 64u + lid;
    if (i >= p.len) { return; }
    if (p.op == 0u) { X[i] = X[i] + Y[i]; }
    else if (p.op == 1u) { X[i] = X[i] + Y[i % p.m]; }
    else if (p.op == 2u) { let g = X[i]; X[i] = (g / (1.0 + exp(-g))) * Y[i]; }
    else if (p.op == 3u) { X[i] = X[i] * p.scale; }
    else { X[i] = Y[i]; }
}
"#;

/// Stores tokens `t0 .. t0 + n` of `K`, `V` (`[n_tokens, nkv]` f32) as f16 pairs into one sequence's
/// cache slabs `KC`, `VC` (`[n_ctx, nkv]` f16, two per u32) at the positions `POS[t]`. One thread per pair.
const KV_STORE: &str = r#"
@group(0) @binding(0) var<storage, read> K: array<f32>;
@group(0) @binding(1) var<storage, read> V: array<f32>;
@group(0) @binding(2) var<storage, read> POS: array<u32>;
@group(0) @binding(3) var<storage, read_write> KC: array<u32>;
@group(0) @binding(4) var<storage, read_write> VC: array<u32>;
struct P { n: u32, nkv: u32, gx: u32, pad: u32 }
@group(0) @binding(5) var<uniform> p: P;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let pairs = p.nkv / 2u;
    let idx = (wid.x + wid.y * p.gx) * 64u + lid;
    if (idx >= p.n * pairs) { return; }
    let j = idx % pairs;
    let i = idx / pairs;
    let t = POS[2u * i];
    let pos = POS[2u * i + 1u];
    let src = t * p.nkv + 2u * j;
    let dst = pos * pairs + j;
    KC[dst] = pack2x16float(vec2<f32>(K[src], K[src + 1u]));
    VC[dst] = pack2x16float(vec2<f32>(V[src], V[src + 1u]));
}
"#;

/// Attention of the listed tokens of one sequence: token `POS[2i]` of `Q` (`[n_tokens, n_head · hd]`)
/// attends to positions `0 ..= POS[2i+1]` of the sequence's f16 cache (`KC`, `VC`: `[n_ctx, nkv]`), head
/// `h` to KV head `h / gqa`; output into `O` (same shape as `Q`). One workgroup of 64 per (token, head):
/// positions in chunks of 64 (one score per thread), an online softmax whose running maximum, sum and
/// output are updated chunk by chunk in position order — the order depends only on the position count.
const ATTN: &str = r#"
@group(0) @binding(0) var<storage, read> Q: array<f32>;
@group(0) @binding(1) var<storage, read> KC: array<u32>;
@group(0) @binding(2) var<storage, read> VC: array<u32>;
@group(0) @binding(3) var<storage, read> POS: array<u32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
struct P { n: u32, n_head: u32, hd: u32, gqa: u32, nkv: u32, scale: f32, pad0: u32, pad1: u32 }
@group(0) @binding(5) var<uniform> p: P;
var<workgroup> sc: array<f32, 64>;
var<workgroup> red: array<f32, 64>;
var<workgroup> wn: u32;
fn kf(o: u32) -> f32 { let w = KC[o >> 1u]; return unpack2x16float(w)[o & 1u]; }
fn vf(o: u32) -> f32 { let w = VC[o >> 1u]; return unpack2x16float(w)[o & 1u]; }
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let i = wid.y;
    let t = POS[2u * i];
    if (lid == 0u) { wn = POS[2u * i + 1u] + 1u; }
    let n_pos = workgroupUniformLoad(&wn);
    let qo = (t * p.n_head + h) * p.hd;
    let ko = (h / p.gqa) * p.hd;
    var m = -3.4028235e38;
    var l = 0.0;
    var acc: array<f32, 4>;
    for (var c = 0u; c < 4u; c++) { acc[c] = 0.0; }
    for (var j0 = 0u; j0 < n_pos; j0 += 64u) {
        let j = j0 + lid;
        var s = -3.4028235e38;
        if (j < n_pos) {
            var d = 0.0;
            for (var e = 0u; e < p.hd; e++) { d = d + Q[qo + e] * kf(j * p.nkv + ko + e); }
            s = d * p.scale;
        }
        sc[lid] = s;
        red[lid] = s;
        workgroupBarrier();
        for (var k = 32u; k > 0u; k = k >> 1u) {
            if (lid < k) { red[lid] = max(red[lid], red[lid + k]); }
            workgroupBarrier();
        }
        let m_new = max(m, red[0]);
        workgroupBarrier();
        let cnt = min(64u, n_pos - j0);
        var pr = 0.0;
        if (lid < cnt) { pr = exp(sc[lid] - m_new); }
        workgroupBarrier();
        sc[lid] = pr;
        red[lid] = pr;
        workgroupBarrier();
        for (var k = 32u; k > 0u; k = k >> 1u) {
            if (lid < k) { red[lid] = red[lid] + red[lid + k]; }
            workgroupBarrier();
        }
        let corr = exp(m - m_new);
        l = l * corr + red[0];
        for (var c = 0u; c < 4u; c++) {
            let e = lid + 64u * c;
            if (e < p.hd) {
                var a = acc[c] * corr;
                for (var jj = 0u; jj < cnt; jj++) { a = a + sc[jj] * vf((j0 + jj) * p.nkv + ko + e); }
                acc[c] = a;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    for (var c = 0u; c < 4u; c++) {
        let e = lid + 64u * c;
        if (e < p.hd) { O[qo + e] = acc[c] / l; }
    }
}
"#;

/// Copies rows `IDX[r]` of `X` (`[*, len]`) to row `r` of `Y` (`[rows, len]`). One thread per element.
const GATHER: &str = r#"
@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read> IDX: array<u32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
struct P { rows: u32, len: u32, gx: u32, pad: u32 }
@group(0) @binding(3) var<uniform> p: P;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * p.gx) * 64u + lid;
    if (i >= p.rows * p.len) { return; }
    let r = i / p.len;
    Y[i] = X[IDX[r] * p.len + i % p.len];
}
"#;

/// The WGSL source of `kernel`.
///
/// Errors: [`GpuError::Shader`] for an unknown kernel name.
pub fn source(kernel: &str) -> Result<String, GpuError> {
    if let Some(ty) = MATMUL_TYPES
        .iter()
        .copied()
        .find(|&t| matmul_kernel(t) == Some(kernel))
    {
        let (bytes, upb, unit) = unit_decoder(ty).expect("every MATMUL_TYPES entry has a decoder");
        return Ok(MATMUL
            .replace("READERS", READERS)
            .replace("UNIT", unit)
            .replace("UPB", &format!("{upb}u"))
            .replace("BLOCK_BYTES", &format!("{bytes}u")));
    }
    Ok(match kernel {
        "rms_norm" => RMS_NORM,
        "rope" => ROPE,
        "eltwise" => ELTWISE,
        "kv_store" => KV_STORE,
        "attn" => ATTN,
        "gather" => GATHER,
        _ => return Err(GpuError::Shader(format!("unknown kernel {kernel:?}"))),
    }
    .to_string())
}
