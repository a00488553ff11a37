//! The KV cache: per layer and per sequence, the keys and values of every position already processed, so
//! that decoding a token attends to its past without recomputing it.
//!
//! Layout: one contiguous slab per (layer, sequence) of `[cells, n_embd_kv]` (ggml order: `n_embd_kv`
//! fastest). A global layer has `cells = n_ctx` and the cell index is the token's position; a
//! sliding-window layer (gemma2/3, llama.cpp's iSWA cache `src/llama-kv-cache-iswa.cpp`) has
//! `cells = min(n_swa, n_ctx)` used as a ring (cell `pos % cells`), so it holds only the last window of
//! each sequence. Stored as f16 (llama.cpp's default `type_k`/`type_v`) or f32. Attention reads positions
//! in position order whatever the cell order, which makes its reduction order independent of how tokens
//! were batched.

use half::f16;

use crate::engine::ggml_type::GgmlType;
pub use crate::engine::kernels::ops::KvRow;
use crate::engine::kernels::ops::{self, RopeMode, f32_to_f16};
use crate::engine::quant;

/// Element type of the cache's keys or values (llama.cpp's `--cache-type-k` / `--cache-type-v`,
/// `common/arg.cpp` `kv_cache_types`, commit 0c1e570).
#[allow(non_camel_case_types)] // ggml's type names
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half precision (2 bytes per element), llama.cpp's default.
    #[default]
    F16,
    /// Single precision (4 bytes per element).
    F32,
    /// bfloat16 (2 bytes per element).
    BF16,
    /// 8-bit blocks of 32 (34 bytes per 32 elements).
    Q8_0,
    /// 4-bit blocks of 32 with a scale (18 bytes per 32 elements).
    Q4_0,
    /// 4-bit blocks of 32 with a scale and a minimum (20 bytes per 32 elements).
    Q4_1,
    /// 5-bit blocks of 32 with a scale (22 bytes per 32 elements).
    Q5_0,
    /// 5-bit blocks of 32 with a scale and a minimum (24 bytes per 32 elements).
    Q5_1,
    /// 4-bit non-linear code book, blocks of 32 (18 bytes per 32 elements).
    IQ4_NL,
}

impl KvType {
    /// Every type, in llama.cpp's order of `kv_cache_types`.
    pub const ALL: [KvType; 9] = [
        KvType::F32,
        KvType::F16,
        KvType::BF16,
        KvType::Q8_0,
        KvType::Q4_0,
        KvType::Q4_1,
        KvType::IQ4_NL,
        KvType::Q5_0,
        KvType::Q5_1,
    ];

    /// The ggml type the cache stores.
    pub fn ggml(self) -> GgmlType {
        match self {
            KvType::F16 => GgmlType::F16,
            KvType::F32 => GgmlType::F32,
            KvType::BF16 => GgmlType::BF16,
            KvType::Q8_0 => GgmlType::Q8_0,
            KvType::Q4_0 => GgmlType::Q4_0,
            KvType::Q4_1 => GgmlType::Q4_1,
            KvType::Q5_0 => GgmlType::Q5_0,
            KvType::Q5_1 => GgmlType::Q5_1,
            KvType::IQ4_NL => GgmlType::IQ4_NL,
        }
    }

    /// The name llama.cpp's flags take (`f16`, `q8_0`, `iq4_nl`, …).
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
            KvType::BF16 => "bf16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
            KvType::Q4_1 => "q4_1",
            KvType::Q5_0 => "q5_0",
            KvType::Q5_1 => "q5_1",
            KvType::IQ4_NL => "iq4_nl",
        }
    }

    /// Parses a flag value (case-insensitive), `None` for an unknown name.
    pub fn parse(s: &str) -> Option<KvType> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this is a block-quantized type (attention needs flash attention's arithmetic, and rows
    /// must be whole blocks per head).
    pub fn is_quantized(self) -> bool {
        !matches!(self, KvType::F16 | KvType::F32 | KvType::BF16)
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes of `n` elements (`n` a multiple of [`KvType::block_size`]; rounded up otherwise).
    pub fn row_bytes(self, n: usize) -> usize {
        n.div_ceil(self.block_size()) * self.ggml().type_size()
    }
}

/// One tensor (keys or values) of the cache.
enum Store {
    F16(Vec<f16>),
    F32(Vec<f32>),
    /// BF16 or a block type: `[cells, row]` bytes, `row = ty.row_bytes(n_embd_kv)`.
    Raw {
        ty: KvType,
        data: Vec<u8>,
    },
}

/// Writes a zero into every 4 KiB page of `v`, so that the cache is resident from the start, as
/// llama.cpp's clearing of its KV buffer (`ggml_backend_buffer_clear`) makes it: a memory shortfall shows
/// at load rather than mid-generation, and the process's RSS is what the supervisor's estimate says.
/// (A zeroed allocation is otherwise left to the kernel's lazily mapped zero pages.)
fn commit<T: Copy + Default>(v: &mut [T]) {
    let v = std::hint::black_box(v);
    let step = (4096 / size_of::<T>()).max(1);
    for i in (0..v.len()).step_by(step) {
        v[i] = T::default();
    }
}

impl Store {
    fn new(ty: KvType, n_elems: usize, n_embd_kv: usize) -> Store {
        match ty {
            KvType::F16 => {
                let mut d = vec![f16::ZERO; n_elems];
                commit(&mut d);
                Store::F16(d)
            }
            KvType::F32 => {
                let mut d = vec![0.0; n_elems];
                commit(&mut d);
                Store::F32(d)
            }
            _ => {
                let rows = n_elems / n_embd_kv.max(1);
                let mut data = vec![0; rows * ty.row_bytes(n_embd_kv)];
                commit(&mut data);
                Store::Raw { ty, data }
            }
        }
    }

    fn ty(&self) -> KvType {
        match self {
            Store::F16(_) => KvType::F16,
            Store::F32(_) => KvType::F32,
            Store::Raw { ty, .. } => *ty,
        }
    }

    /// Writes the row `src` (`[n_embd_kv]`) at element offset `o` (a multiple of `n_embd_kv`).
    fn write(&mut self, o: usize, n: usize, src: &[f32]) {
        match self {
            Store::F16(d) => f32_to_f16(src, &mut d[o..o + n]),
            Store::F32(d) => d[o..o + n].copy_from_slice(src),
            Store::Raw { ty, data } => {
                let rb = ty.row_bytes(n);
                let r = o / n.max(1);
                // ggml's `from_float` for the type (`ggml_get_type_traits_cpu(type)->from_float`, what
                // `ggml_set_rows`/`ggml_cpy` use to store K and V): the activation quantizer for Q8_0
                // (ggml-cpu's x86 one), the reference quantizers otherwise. The sizes were checked when
                // the cache was made, so this cannot fail.
                let _ =
                    quant::quantize_row_activation(ty.ggml(), src, &mut data[r * rb..(r + 1) * rb]);
            }
        }
    }

    /// Reads the row at element offset `o` (`[n]`, dequantized) into `out`.
    fn read(&self, o: usize, n: usize, out: &mut [f32]) {
        match self {
            Store::F16(d) => {
                for (x, y) in out.iter_mut().zip(&d[o..o + n]) {
                    *x = y.to_f32();
                }
            }
            Store::F32(d) => out.copy_from_slice(&d[o..o + n]),
            Store::Raw { ty, data } => {
                let rb = ty.row_bytes(n);
                let r = o / n.max(1);
                // Whole rows of a type with a dequantizer (every KvType).
                let _ = quant::dequantize_row(ty.ggml(), &data[r * rb..(r + 1) * rb], out);
            }
        }
    }

    /// Copies the row at element offset `src` to `dst` as it is stored.
    fn copy_row(&mut self, src: usize, dst: usize, n: usize) {
        match self {
            Store::F16(d) => d.copy_within(src..src + n, dst),
            Store::F32(d) => d.copy_within(src..src + n, dst),
            Store::Raw { ty, data } => {
                let rb = ty.row_bytes(n);
                let (s, d) = (src / n.max(1) * rb, dst / n.max(1) * rb);
                data.copy_within(s..s + rb, d);
            }
        }
    }

    /// Appends the row at element offset `o` (`[n]`) as it is stored, little-endian
    /// (`self.ty().row_bytes(n)` bytes).
    fn export_row(&self, o: usize, n: usize, out: &mut Vec<u8>) {
        match self {
            Store::F16(d) => d[o..o + n]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Store::F32(d) => d[o..o + n]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Store::Raw { ty, data } => {
                let rb = ty.row_bytes(n);
                let r = o / n.max(1);
                out.extend_from_slice(&data[r * rb..(r + 1) * rb]);
            }
        }
    }

    /// Overwrites the row at element offset `o` (`[n]`) with `src` as [`Store::export_row`] wrote it
    /// (`src.len() == self.ty().row_bytes(n)`, checked by the caller).
    fn import_row(&mut self, o: usize, n: usize, src: &[u8]) {
        match self {
            Store::F16(d) => {
                for (x, b) in d[o..o + n].iter_mut().zip(src.chunks_exact(2)) {
                    *x = f16::from_le_bytes([b[0], b[1]]);
                }
            }
            Store::F32(d) => {
                for (x, b) in d[o..o + n].iter_mut().zip(src.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Store::Raw { ty, data } => {
                let rb = ty.row_bytes(n);
                let r = o / n.max(1);
                data[r * rb..(r + 1) * rb].copy_from_slice(src);
            }
        }
    }

    /// Rows `row0 .. row0 + n_rows` (each `[n_embd_kv]`).
    fn side(&self, row0: usize, n_rows: usize, n_embd_kv: usize) -> KvSide<'_> {
        match self {
            Store::F16(d) => KvSide::F16(&d[row0 * n_embd_kv..(row0 + n_rows) * n_embd_kv]),
            Store::F32(d) => KvSide::F32(&d[row0 * n_embd_kv..(row0 + n_rows) * n_embd_kv]),
            Store::Raw { ty, data } => {
                let rb = ty.row_bytes(n_embd_kv);
                KvSide::Raw {
                    ty: *ty,
                    data: &data[row0 * rb..(row0 + n_rows) * rb],
                    row_bytes: rb,
                }
            }
        }
    }
}

/// Borrowed keys or values of one (layer, sequence): `[n_pos, n_embd_kv]` in the cache's type.
#[derive(Clone, Copy)]
pub enum KvSide<'a> {
    /// Half precision.
    F16(&'a [f16]),
    /// Single precision.
    F32(&'a [f32]),
    /// BF16 or a block type, `row_bytes` bytes per position (`ty.row_bytes(n_embd_kv)`); a head's
    /// `head_dim` elements are the bytes `g · ty.row_bytes(head_dim) ..` of the row (whole blocks, checked
    /// by [`crate::engine::model::Context::new`]).
    Raw {
        /// Element type.
        ty: KvType,
        /// `[n_pos, row_bytes]`.
        data: &'a [u8],
        /// Bytes per position.
        row_bytes: usize,
    },
}

impl<'a> KvSide<'a> {
    /// The ggml type of the rows.
    pub fn ggml_type(&self) -> GgmlType {
        match self {
            KvSide::F16(_) => GgmlType::F16,
            KvSide::F32(_) => GgmlType::F32,
            KvSide::Raw { ty, .. } => ty.ggml(),
        }
    }

    /// Head `g`'s `[head_dim]` elements of position row `j` (rows of `n_embd_kv` elements).
    pub fn head(&self, j: usize, g: usize, head_dim: usize, n_embd_kv: usize) -> KvRow<'a> {
        match *self {
            KvSide::F16(d) => {
                KvRow::F16(&d[j * n_embd_kv + g * head_dim..j * n_embd_kv + (g + 1) * head_dim])
            }
            KvSide::F32(d) => {
                KvRow::F32(&d[j * n_embd_kv + g * head_dim..j * n_embd_kv + (g + 1) * head_dim])
            }
            KvSide::Raw {
                ty,
                data,
                row_bytes,
            } => {
                let hb = ty.row_bytes(head_dim);
                KvRow::Raw(&data[j * row_bytes + g * hb..j * row_bytes + (g + 1) * hb])
            }
        }
    }

    /// The rows as f32 (`[n_pos, n_embd_kv]`), dequantized.
    #[cfg(test)]
    pub fn to_f32(self) -> Vec<f32> {
        match self {
            KvSide::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
            KvSide::F32(d) => d.to_vec(),
            KvSide::Raw {
                ty,
                data,
                row_bytes,
            } => {
                let n = row_bytes / ty.ggml().type_size() * ty.block_size();
                let mut out = vec![0.0f32; data.len() / row_bytes.max(1) * n];
                for (src, dst) in data.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
                    // The rows are whole blocks of a type with a dequantizer (every KvType).
                    let _ = quant::dequantize_row(ty.ggml(), src, dst);
                }
                out
            }
        }
    }
}

/// Rows encoded in a cache type outside the cache: the keys and values of the batch being evaluated,
/// converted exactly as [`KvCache::write`] would store them, so that attention over them and over the
/// cache uses one arithmetic.
pub struct KvRows(Store);

impl KvRows {
    /// Encodes `rows` (`[n, n_embd_kv]` f32) in `ty`.
    pub fn encode(ty: KvType, rows: &[f32], n_embd_kv: usize) -> KvRows {
        let mut st = Store::new(ty, rows.len(), n_embd_kv);
        for (r, src) in rows.chunks_exact(n_embd_kv.max(1)).enumerate() {
            st.write(r * n_embd_kv, n_embd_kv, src);
        }
        KvRows(st)
    }

    /// Borrows the rows.
    pub fn side(&self, n_embd_kv: usize) -> KvSide<'_> {
        let n = match &self.0 {
            Store::F16(d) => d.len() / n_embd_kv.max(1),
            Store::F32(d) => d.len() / n_embd_kv.max(1),
            Store::Raw { ty, data } => data.len() / ty.row_bytes(n_embd_kv).max(1),
        };
        self.0.side(0, n, n_embd_kv)
    }
}

/// Borrowed keys and values of one (layer, sequence), each in its own type.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    /// Keys `[n_pos, n_embd_kv]`.
    pub k: KvSide<'a>,
    /// Values `[n_pos, n_embd_kv]`.
    pub v: KvSide<'a>,
}

/// The rotation a context shift applies to the cached keys of one layer: the rope tables of the position
/// delta (`-n_discard`), from [`crate::engine::kernels::ops::rope_cache_at`] with the layer's own rope
/// parameters and frequency factors (llama.cpp `llama_kv_cache::build_rope_shift`,
/// `src/llama-kv-cache.cpp`).
#[derive(Clone, Debug, PartialEq)]
pub struct KeyShift {
    /// Elements per head (the cache row `[n_embd_kv]` is `n_embd_kv / head_dim` heads).
    pub head_dim: usize,
    /// Rotated dimensions per head (`≤ head_dim`).
    pub n_dims: usize,
    /// Pairing of the rotated dimensions.
    pub mode: RopeMode,
    /// Cosines of the delta, `[n_dims / 2]`.
    pub cos: Vec<f32>,
    /// Sines of the delta, `[n_dims / 2]`.
    pub sin: Vec<f32>,
}

/// Keys and values for `n_layer` layers × `n_seq` sequences × `cells(layer)` cells × `n_embd_kv` elements.
pub struct KvCache {
    n_seq: usize,
    n_ctx: usize,
    n_embd_kv: usize,
    /// `[n_layer]`: the window of a sliding layer (its cells form a ring of `min(window, n_ctx)`), `None`
    /// for a global layer (`n_ctx` cells, cell = position).
    window: Vec<Option<usize>>,
    /// `[n_layer]`: cells per sequence.
    cells: Vec<usize>,
    /// `[n_layer]`: element offset of the layer's slab.
    base: Vec<usize>,
    k: Store,
    v: Store,
    /// Number of filled positions per sequence (positions `0..len` were written; a ring layer holds the
    /// last `cells` of them).
    len: Vec<usize>,
    /// Walsh–Hadamard sizes the keys and values are stored rotated by ([`KvCache::with_rotations`]).
    rot: (Option<usize>, Option<usize>),
    /// The layers `first_layer..` whose keys and values live on the GPU ([`KvCache::with_device`]); their
    /// host slabs are allocated zeroed but never touched, so they commit no memory.
    device: Option<std::sync::Arc<crate::engine::gpu::llama::GpuKv>>,
}

impl KvCache {
    /// Allocates a cache of global layers only (zeroed). Memory:
    /// `2 · n_layer · n_seq · n_ctx · n_embd_kv · (2 or 4)` bytes.
    #[cfg(test)]
    pub fn new(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_kv: usize,
        ty: KvType,
    ) -> KvCache {
        Self::with_windows(&vec![None; n_layer], n_seq, n_ctx, n_embd_kv, ty, ty)
    }

    /// Allocates a cache whose layer `il` is global (`window[il] == None`: `n_ctx` cells) or slides over
    /// `window[il]` positions (a ring of `min(window, n_ctx)` cells). Memory:
    /// `n_seq · (type_k.row_bytes(n_embd_kv) + type_v.row_bytes(n_embd_kv)) · Σ cells` bytes, as
    /// [`crate::engine::kv_layout::KvLayout::cache_bytes_typed`].
    pub fn with_windows(
        window: &[Option<usize>],
        n_seq: usize,
        n_ctx: usize,
        n_embd_kv: usize,
        type_k: KvType,
        type_v: KvType,
    ) -> KvCache {
        let cells: Vec<usize> = window
            .iter()
            .map(|w| w.map_or(n_ctx, |w| w.clamp(1, n_ctx.max(1))))
            .collect();
        let mut base = Vec::with_capacity(cells.len());
        let mut n = 0;
        for c in &cells {
            base.push(n);
            n += n_seq * c * n_embd_kv;
        }
        KvCache {
            n_seq,
            n_ctx,
            n_embd_kv,
            window: window.to_vec(),
            cells,
            base,
            k: Store::new(type_k, n, n_embd_kv),
            v: Store::new(type_v, n, n_embd_kv),
            len: vec![0; n_seq],
            rot: (None, None),
            device: None,
        }
    }

    /// Moves layers `kv.first_layer..` to the GPU cache `kv` (an f16 cache only: rows move between host
    /// and device byte for byte). Export, import and shift of those layers go to the device; the forward
    /// pass writes and reads them there.
    pub fn with_device(mut self, kv: std::sync::Arc<crate::engine::gpu::llama::GpuKv>) -> KvCache {
        debug_assert_eq!(self.types(), (KvType::F16, KvType::F16));
        self.device = Some(kv);
        self
    }

    /// The GPU cache of the offloaded layers, when there is one.
    pub fn device(&self) -> Option<&crate::engine::gpu::llama::GpuKv> {
        self.device.as_deref()
    }

    /// The device cache when `layer` lives on it.
    fn on_device(&self, layer: usize) -> Option<&crate::engine::gpu::llama::GpuKv> {
        self.device.as_deref().filter(|d| layer >= d.first_layer)
    }

    /// Sets the Walsh–Hadamard rotations of a model whose heads have `head_dim` elements, as llama.cpp's
    /// KV cache decides them (`llama_kv_cache` constructor, `build_input_k_rot`/`build_input_v_rot`,
    /// `src/llama-kv-cache.cpp`, commit 0c1e570; off with `LLAMA_ATTN_ROT_DISABLE` there): keys of a
    /// block-quantized type with `head_dim` a multiple of 64 are rotated by the largest power of two
    /// dividing `head_dim`, values of such a type by 64. Spreading a head's outliers over the block is
    /// what keeps a 4-bit cache close to f16.
    pub fn with_rotations(mut self, head_dim: usize) -> KvCache {
        let (tk, tv) = self.types();
        let ok = |t: KvType| t.is_quantized() && head_dim > 0 && head_dim.is_multiple_of(64);
        let rk = ok(tk).then(|| {
            let mut n = 64;
            while head_dim.is_multiple_of(n * 2) {
                n *= 2;
            }
            n
        });
        self.rot = (rk, ok(tv).then_some(64));
        self
    }

    /// The Walsh–Hadamard sizes (keys, values) of [`KvCache::with_rotations`]: the forward pass rotates
    /// the query and keys by the first, values by the second, and the attention output back by the
    /// second ([`ops::fwht_rows`]); [`KvCache::rotate_qkv`] and [`KvCache::rotate_back`] apply them.
    pub fn rotations(&self) -> (Option<usize>, Option<usize>) {
        self.rot
    }

    /// Layers of the cache.
    pub fn n_layer(&self) -> usize {
        self.cells.len()
    }

    /// Sequences of the cache.
    pub fn n_seq(&self) -> usize {
        self.n_seq
    }

    /// Positions per sequence (tokens).
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Elements of one cached key or value row (every layer has the same).
    pub fn n_embd_kv(&self) -> usize {
        self.n_embd_kv
    }

    /// Bytes of one stored (key row, value row) in the cache's types.
    pub fn row_bytes(&self) -> (usize, usize) {
        (
            self.k.ty().row_bytes(self.n_embd_kv),
            self.v.ty().row_bytes(self.n_embd_kv),
        )
    }

    /// The positions of `seq` that `layer` still holds, `(first, count)`: all of `0..len` for a global
    /// layer, the last `min(len, cells)` for a sliding ring. `(0, 0)` for an unknown sequence.
    pub fn held(&self, layer: usize, seq: usize) -> (usize, usize) {
        let len = self.seq_len(seq);
        let n = len.min(self.cells.get(layer).copied().unwrap_or(0));
        (len - n, n)
    }

    /// Appends positions `p0..p1` of `seq` in `layer` as stored (no conversion): the key rows, then
    /// the value rows, position order, `(p1 - p0) · (row_k + row_v)` bytes ([`KvCache::row_bytes`]).
    /// The positions must be held ([`KvCache::held`]); `seq < n_seq`.
    ///
    /// Errors: the device's message when the layer lives on a GPU that fails to read back.
    pub fn export_rows(
        &self,
        layer: usize,
        seq: usize,
        p0: usize,
        p1: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        if let Some(d) = self.on_device(layer) {
            return d
                .export_rows(layer, seq, p0, p1, out)
                .map_err(|e| format!("layer {layer}: {e}"));
        }
        let n = self.n_embd_kv;
        for p in p0..p1 {
            self.k.export_row(self.offset(layer, seq, p), n, out);
        }
        for p in p0..p1 {
            self.v.export_row(self.offset(layer, seq, p), n, out);
        }
        Ok(())
    }

    /// Writes key rows `k` and value rows `v` (as [`KvCache::export_rows`] stored them, whole rows of
    /// [`KvCache::row_bytes`]) at positions `p0..` of `seq` in `layer` (cell `pos % cells`). Does not
    /// change the sequence length ([`KvCache::set_len`]). `seq < n_seq`, the rows end at or before
    /// `n_ctx`, sizes checked by the caller.
    pub fn import_rows(&mut self, layer: usize, seq: usize, p0: usize, k: &[u8], v: &[u8]) {
        if let Some(d) = self.on_device(layer) {
            d.import_rows(layer, seq, p0, k, v);
            return;
        }
        let n = self.n_embd_kv;
        let (rk, rv) = self.row_bytes();
        for (j, row) in k.chunks_exact(rk.max(1)).enumerate() {
            let o = self.offset(layer, seq, p0 + j);
            self.k.import_row(o, n, row);
        }
        for (j, row) in v.chunks_exact(rv.max(1)).enumerate() {
            let o = self.offset(layer, seq, p0 + j);
            self.v.import_row(o, n, row);
        }
    }

    /// Rotates one layer's query and keys (`[n_tokens, nq]`, `[n_tokens, nkv]`) by the keys'
    /// Walsh–Hadamard matrix and its values by the values' one, as llama.cpp's `build_attn` does before
    /// storing them (nothing for a cache that [`KvCache::with_rotations`] gave none). Scores are unchanged: the query and
    /// keys share one orthonormal rotation.
    pub fn rotate_qkv(&self, q: &mut [f32], k: &mut [f32], v: &mut [f32]) {
        if let Some(n) = self.rot.0 {
            ops::fwht_rows(q, n);
            ops::fwht_rows(k, n);
        }
        if let Some(n) = self.rot.1 {
            ops::fwht_rows(v, n);
        }
    }

    /// Rotates an attention output (`[n_tokens, nq]`) back by the values' matrix (its own inverse), undoing
    /// [`KvCache::rotate_qkv`] on the values.
    pub fn rotate_back(&self, attn: &mut [f32]) {
        if let Some(n) = self.rot.1 {
            ops::fwht_rows(attn, n);
        }
    }

    /// Bytes held by keys and values together.
    pub fn size_bytes(&self) -> usize {
        let row = self.k.ty().row_bytes(self.n_embd_kv) + self.v.ty().row_bytes(self.n_embd_kv);
        self.n_seq * row * self.cells.iter().sum::<usize>()
    }

    /// The element types of keys and values.
    pub fn types(&self) -> (KvType, KvType) {
        (self.k.ty(), self.v.ty())
    }

    /// The sliding window of `layer` (`None`: a global layer).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.window.get(layer).copied().flatten()
    }

    /// Cells per sequence of `layer` (`n_ctx`, or the ring of a sliding layer).
    pub fn cells(&self, layer: usize) -> usize {
        self.cells[layer]
    }

    /// Whether `seq` can be cut back to `len` positions and continued: every sliding layer must still hold
    /// the positions a token at `len` attends to (`len - window + 1 .. len`); a ring that has already
    /// overwritten them cannot (llama-server then re-evaluates the prompt, as here the caller does).
    pub fn can_truncate(&self, seq: usize, len: usize) -> bool {
        let cur = self.seq_len(seq);
        if len >= cur || len == 0 {
            return true;
        }
        self.window
            .iter()
            .zip(&self.cells)
            .all(|(w, &cells)| match w {
                None => true,
                Some(w) => (len + 1).saturating_sub(*w) >= cur.saturating_sub(cells),
            })
    }

    /// Filled positions of `seq` (0 for an unknown sequence).
    pub fn seq_len(&self, seq: usize) -> usize {
        self.len.get(seq).copied().unwrap_or(0)
    }

    /// Sets the filled length of `seq` (dropping cells at and after `len`). `seq < n_seq`, `len ≤ n_ctx`.
    pub fn set_len(&mut self, seq: usize, len: usize) {
        if seq < self.n_seq {
            self.len[seq] = len.min(self.n_ctx);
        }
    }

    /// Whether [`KvCache::shift`] can move positions: every layer holds the whole context with cell =
    /// position (a sliding layer whose window covers `n_ctx` does). A ring smaller than the context has
    /// already dropped positions a shifted sequence still attends to — llama.cpp's iSWA cache answers
    /// `get_can_shift` false in the same case (`src/llama-kv-cache-iswa.cpp`).
    pub fn can_shift(&self) -> bool {
        self.cells.iter().all(|&c| c == self.n_ctx)
    }

    /// Context shift of `seq`: drops positions `n_keep .. n_keep + n_discard` and moves the later ones
    /// `n_discard` positions back, rotating each moved key by the delta with `rot[layer]` (values are
    /// copied as they are); the sequence then holds `len - n_discard` positions. llama.cpp's
    /// `llama_memory_seq_rm(seq, n_keep, n_keep + n_discard)` then
    /// `llama_memory_seq_add(seq, n_keep + n_discard, len, -n_discard)`, whose K-shift graph
    /// (`llama_kv_cache::build_rope_shift`, `src/llama-kv-cache.cpp`) ropes the keys in place by the
    /// position delta; an f16 cache rounds the rotated keys back to f16, as the in-place rope does.
    ///
    /// Returns false, changing nothing, when the cache cannot shift ([`KvCache::can_shift`]), `seq` is
    /// unknown, `rot` does not have one entry per layer whose `head_dim` divides `n_embd_kv` with
    /// `n_dims ≤ head_dim` and `n_dims / 2` table entries, or `n_keep + n_discard` exceeds the sequence.
    pub fn shift(&mut self, seq: usize, n_keep: usize, n_discard: usize, rot: &[KeyShift]) -> bool {
        let n = self.n_embd_kv;
        let ok_rot = rot.len() == self.cells.len()
            && rot.iter().all(|r| {
                r.head_dim > 0
                    && n.is_multiple_of(r.head_dim)
                    && r.n_dims <= r.head_dim
                    && r.cos.len() >= r.n_dims / 2
                    && r.sin.len() >= r.n_dims / 2
            });
        let Some(&len) = self.len.get(seq) else {
            return false;
        };
        if !self.can_shift() || !ok_rot || n_keep.saturating_add(n_discard) > len {
            return false;
        }
        if n_discard == 0 {
            return true;
        }
        // Device layers: their moved rows come back first, so a failed read changes nothing.
        let first_dev = self.device.as_ref().map_or(rot.len(), |d| d.first_layer);
        let mut moved = Vec::new();
        for (layer, r) in rot.iter().enumerate().skip(first_dev) {
            let mut bytes = Vec::new();
            if let Err(e) = self.export_rows(layer, seq, n_keep + n_discard, len, &mut bytes) {
                tracing::error!("context shift of sequence {seq}: {e}");
                return false;
            }
            let (kb, vb) = bytes.split_at(bytes.len() / 2);
            let mut k = Vec::with_capacity(kb.len());
            let mut row = vec![0.0f32; n];
            for src in kb.chunks_exact(2 * n) {
                for (x, b) in row.iter_mut().zip(src.chunks_exact(2)) {
                    *x = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
                ops::rope(&mut row, r.head_dim, r.n_dims, r.mode, &r.cos, &r.sin);
                row.iter()
                    .for_each(|x| k.extend_from_slice(&f16::from_f32(*x).to_le_bytes()));
            }
            moved.push((layer, k, vb.to_vec()));
        }
        for (layer, k, v) in moved {
            self.import_rows(layer, seq, n_keep, &k, &v);
        }
        let mut row = vec![0.0f32; n];
        let rot_k = self.rot.0;
        for (layer, r) in rot.iter().enumerate().take(first_dev) {
            for pos in n_keep + n_discard..len {
                let src = self.offset(layer, seq, pos);
                let dst = self.offset(layer, seq, pos - n_discard);
                // Dequantize → rotate back → rope → rotate forward → store (build_rope_shift).
                self.k.read(src, n, &mut row);
                if let Some(h) = rot_k {
                    ops::fwht_rows(&mut row, h);
                }
                ops::rope(&mut row, r.head_dim, r.n_dims, r.mode, &r.cos, &r.sin);
                if let Some(h) = rot_k {
                    ops::fwht_rows(&mut row, h);
                }
                self.k.write(dst, n, &row);
                self.v.copy_row(src, dst, n);
            }
        }
        self.len[seq] = len - n_discard;
        true
    }

    fn offset(&self, layer: usize, seq: usize, pos: usize) -> usize {
        let cells = self.cells[layer];
        self.base[layer] + (seq * cells + pos % cells) * self.n_embd_kv
    }

    /// Stores one token's key and value (`[n_embd_kv]` each) at `pos` of `seq` in `layer` (cell
    /// `pos % cells`: in a sliding layer it overwrites position `pos - cells`).
    /// Does not change the sequence length (see [`KvCache::set_len`]).
    pub fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(layer, seq, pos);
        let n = self.n_embd_kv;
        self.k.write(o, n, k);
        self.v.write(o, n, v);
    }

    /// Borrows positions `0..n` of `seq` in a global `layer` in the cache's own element type: keys and
    /// values `[n, n_embd_kv]` each (row `j` = position `j`). `n ≤ n_ctx`. For a sliding layer, the rows
    /// are its cells (see [`KvCache::ring`]).
    pub fn view(&self, layer: usize, seq: usize, n: usize) -> KvView<'_> {
        let row0 = self.offset(layer, seq, 0) / self.n_embd_kv.max(1);
        let rows = n.min(self.cells[layer]);
        KvView {
            k: self.k.side(row0, rows, self.n_embd_kv),
            v: self.v.side(row0, rows, self.n_embd_kv),
        }
    }

    /// Borrows every cell of `seq` in `layer`: keys and values `[cells, n_embd_kv]` each; position `p`
    /// (among those still held) is row `p % cells`.
    pub fn ring(&self, layer: usize, seq: usize) -> KvView<'_> {
        self.view(layer, seq, self.cells[layer])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions `0..n` of `seq` in `layer` as f32, through [`KvCache::view`].
    fn read(c: &KvCache, layer: usize, seq: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let view = c.view(layer, seq, n);
        (view.k.to_f32(), view.v.to_f32())
    }

    #[test]
    fn write_read_roundtrip_and_isolation() {
        for ty in [KvType::F16, KvType::F32] {
            let mut c = KvCache::new(2, 3, 4, 2, ty);
            c.write(1, 2, 0, &[1.0, 2.0], &[3.0, 4.0]);
            c.write(1, 2, 1, &[5.0, 6.0], &[7.0, 8.0]);
            c.write(1, 1, 0, &[9.0, 9.0], &[9.0, 9.0]);
            c.set_len(2, 2);
            let (k, v) = read(&c, 1, 2, 2);
            assert_eq!(k, vec![1.0, 2.0, 5.0, 6.0]);
            assert_eq!(v, vec![3.0, 4.0, 7.0, 8.0]);
            let (k, _) = read(&c, 0, 2, 2);
            assert_eq!(k, vec![0.0; 4], "other layer untouched");
            assert_eq!(c.seq_len(2), 2);
            assert_eq!(c.seq_len(1), 0);
            assert_eq!(c.seq_len(99), 0);
        }
        assert_eq!(
            KvCache::new(2, 3, 4, 2, KvType::F16).size_bytes(),
            2 * 2 * 3 * 4 * 2 * 2
        );
    }

    #[test]
    fn sliding_layers_keep_a_ring_of_the_window() {
        // Layer 0 global, layer 1 slides over 3 positions; n_ctx 8.
        let mut c = KvCache::with_windows(&[None, Some(3)], 2, 8, 1, KvType::F32, KvType::F32);
        assert_eq!((c.cells(0), c.cells(1)), (8, 3));
        assert_eq!(c.size_bytes(), 2 * 2 * 4 * (8 + 3));
        for p in 0..5 {
            c.write(0, 1, p, &[p as f32], &[10.0 + p as f32]);
            c.write(1, 1, p, &[p as f32], &[10.0 + p as f32]);
        }
        c.set_len(1, 5);
        let (k0, _) = read(&c, 0, 1, 5);
        assert_eq!(k0, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        // Positions 2, 3, 4 in cells 2, 0, 1.
        let ring = c.ring(1, 1);
        let (k1, v1) = (ring.k.to_f32(), ring.v.to_f32());
        assert_eq!(k1, vec![3.0, 4.0, 2.0]);
        assert_eq!(v1, vec![13.0, 14.0, 12.0]);
        let (k_other, _) = read(&c, 1, 0, 3);
        assert_eq!(k_other, vec![0.0; 3], "other sequence untouched");
        // A token at 4 needs 2..4 (held), at 3 needs 1..3 (1 overwritten by 4).
        assert!(c.can_truncate(1, 4));
        assert!(!c.can_truncate(1, 3));
        assert!(c.can_truncate(1, 0) && c.can_truncate(1, 5) && c.can_truncate(1, 7));
        // Inside the window everything is still held.
        let mut d = KvCache::with_windows(&[Some(3)], 1, 8, 1, KvType::F16, KvType::F16);
        d.set_len(0, 3);
        assert!(d.can_truncate(0, 1));
        // A window larger than the context is the whole context.
        let e = KvCache::with_windows(&[Some(100)], 1, 8, 1, KvType::F16, KvType::F16);
        assert_eq!(e.cells(0), 8);
    }

    /// A shifted cache equals one written with the new positions: keys roped at `p` and shifted by
    /// `-d` match keys roped at `p - d` (within f32 / f16 rounding), values move unchanged, the kept
    /// prefix is untouched and the length drops by `d`.
    #[test]
    fn shift_reropes_keys_as_if_written_at_the_new_positions() {
        use crate::engine::kernels::ops::RopeParams;
        let (n_head, head_dim) = (2usize, 8usize);
        let n = n_head * head_dim;
        for (ty, tol) in [(KvType::F32, 5e-5f32), (KvType::F16, 4e-3)] {
            for mode in [RopeMode::Normal, RopeMode::Neox] {
                // n_dims 6 < head_dim: the last two dimensions of each head pass through.
                let rp = RopeParams {
                    n_dims: 6,
                    freq_base: 10000.0,
                    freq_scale: 0.5,
                    mode,
                };
                let ff = [1.0f32, 2.0, 4.0];
                let raw = |p: usize| -> Vec<f32> {
                    (0..n)
                        .map(|i| ((p * 31 + i * 7) % 17) as f32 / 8.0 - 1.0)
                        .collect()
                };
                let roped = |x: &[f32], p: usize| -> Vec<f32> {
                    let mut x = x.to_vec();
                    let (c, s) = ops::rope_cache(&rp, p as u32, Some(&ff));
                    ops::rope(&mut x, head_dim, rp.n_dims, mode, &c, &s);
                    x
                };
                let (n_layer, n_ctx, len, n_keep, n_discard) = (2, 32, 30, 4, 11);
                let mut c = KvCache::new(n_layer, 2, n_ctx, n, ty);
                for l in 0..n_layer {
                    for p in 0..len {
                        let v: Vec<f32> = raw(p).iter().map(|x| x * 2.0 + l as f32).collect();
                        c.write(l, 1, p, &roped(&raw(p), p), &v);
                    }
                }
                c.set_len(1, len);
                let (cs, sn) = ops::rope_cache_at(&rp, -(n_discard as f32), Some(&ff));
                let rot = vec![
                    KeyShift {
                        head_dim,
                        n_dims: rp.n_dims,
                        mode,
                        cos: cs,
                        sin: sn,
                    };
                    n_layer
                ];
                assert!(c.can_shift());
                assert!(!c.shift(1, 20, 11, &rot), "past the sequence: refused");
                assert!(
                    !c.shift(1, n_keep, n_discard, &rot[..1]),
                    "one table per layer"
                );
                assert!(c.shift(1, n_keep, n_discard, &rot));
                assert_eq!(c.seq_len(1), len - n_discard);
                for l in 0..n_layer {
                    let (k, v) = read(&c, l, 1, len - n_discard);
                    for q in 0..len - n_discard {
                        // The token now at q was written at p.
                        let p = if q < n_keep { q } else { q + n_discard };
                        let want_k = roped(&raw(p), q);
                        let want_v: Vec<f32> = raw(p).iter().map(|x| x * 2.0 + l as f32).collect();
                        for i in 0..n {
                            let got = k[q * n + i];
                            assert!(
                                (got - want_k[i]).abs() <= tol,
                                "{ty:?} {mode:?} layer {l} pos {q} dim {i}: {got} vs {}",
                                want_k[i]
                            );
                            let want_v = match ty {
                                KvType::F16 => f16::from_f32(want_v[i]).to_f32(),
                                _ => want_v[i],
                            };
                            assert_eq!(v[q * n + i], want_v, "values are moved unchanged");
                        }
                    }
                }
                let (k0, _) = read(&c, 0, 0, 4);
                assert_eq!(k0, vec![0.0; 4 * n], "other sequence untouched");
            }
        }
        // A sliding ring smaller than the context cannot shift; one covering it can.
        assert!(
            !KvCache::with_windows(&[None, Some(3)], 1, 8, 1, KvType::F32, KvType::F32).can_shift()
        );
        assert!(
            KvCache::with_windows(&[None, Some(8)], 1, 8, 1, KvType::F32, KvType::F32).can_shift()
        );
    }

    /// A quantized cache shifts as llama.cpp's `build_rope_shift` does: dequantize, rotate back, rope by
    /// the delta, rotate forward, quantize; the values' blocks move as they are.
    #[test]
    fn a_quantized_rotated_cache_shifts_keys_to_their_new_positions() {
        use crate::engine::kernels::ops::RopeParams;
        let (head_dim, n) = (64usize, 128usize);
        let rp = RopeParams {
            n_dims: 64,
            freq_base: 10000.0,
            freq_scale: 1.0,
            mode: RopeMode::Neox,
        };
        let raw = |p: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((p * 31 + i * 7) % 17) as f32 / 8.0 - 1.0)
                .collect()
        };
        let stored = |p: usize, at: usize| -> Vec<f32> {
            let mut x = raw(p);
            let (c, s) = ops::rope_cache(&rp, at as u32, None);
            ops::rope(&mut x, head_dim, rp.n_dims, rp.mode, &c, &s);
            ops::fwht_rows(&mut x, 64);
            x
        };
        let (len, n_keep, n_discard) = (20, 3, 7);
        let mut c = KvCache::with_windows(&[None], 1, 32, n, KvType::Q8_0, KvType::Q8_0)
            .with_rotations(head_dim);
        assert_eq!(c.rotations(), (Some(64), Some(64)));
        for p in 0..len {
            c.write(0, 0, p, &stored(p, p), &raw(p));
        }
        c.set_len(0, len);
        let (v_before, _) = {
            let view = c.view(0, 0, len);
            (view.v.to_f32(), ())
        };
        let (cs, sn) = ops::rope_cache_at(&rp, -(n_discard as f32), None);
        let rot = vec![KeyShift {
            head_dim,
            n_dims: rp.n_dims,
            mode: rp.mode,
            cos: cs,
            sin: sn,
        }];
        assert!(c.shift(0, n_keep, n_discard, &rot));
        let (k, v) = read(&c, 0, 0, len - n_discard);
        for q in 0..len - n_discard {
            let p = if q < n_keep { q } else { q + n_discard };
            let want = stored(p, q);
            for i in 0..n {
                assert!(
                    (k[q * n + i] - want[i]).abs() < 0.05,
                    "pos {q} dim {i}: {} vs {}",
                    k[q * n + i],
                    want[i]
                );
            }
            assert_eq!(
                &v[q * n..(q + 1) * n],
                &v_before[p * n..(p + 1) * n],
                "V blocks moved"
            );
        }
        // No rotation for float types or a head size that is not a multiple of 64.
        let f =
            KvCache::with_windows(&[None], 1, 4, 64, KvType::F16, KvType::Q4_0).with_rotations(64);
        assert_eq!(f.rotations(), (None, Some(64)));
        let g =
            KvCache::with_windows(&[None], 1, 4, 96, KvType::Q4_0, KvType::Q4_0).with_rotations(96);
        assert_eq!(g.rotations(), (None, None));
        let h = KvCache::with_windows(&[None], 1, 4, 256, KvType::Q4_0, KvType::Q4_0)
            .with_rotations(256);
        assert_eq!(h.rotations(), (Some(256), Some(64)));
    }

    #[test]
    fn fwht_is_the_orthonormal_hadamard_and_its_own_inverse() {
        let x: Vec<f32> = (0..128).map(|i| ((i * 13) % 29) as f32 - 14.0).collect();
        let mut y = x.clone();
        ops::fwht_rows(&mut y, 64);
        // H[i][j] = (-1)^popcount(i & j) / 8 for n = 64 (Sylvester order, ggml_gen_hadamard).
        for r in 0..2 {
            for i in 0..64 {
                let want: f32 = (0..64usize)
                    .map(|j| {
                        let sgn = if (i & j).count_ones().is_multiple_of(2) {
                            1.0
                        } else {
                            -1.0
                        };
                        sgn * x[r * 64 + j] / 8.0
                    })
                    .sum();
                assert!(
                    (y[r * 64 + i] - want).abs() < 1e-4,
                    "{i}: {} vs {want}",
                    y[r * 64 + i]
                );
            }
        }
        ops::fwht_rows(&mut y, 64);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn f16_cache_rounds_like_f16() {
        let mut c = KvCache::new(1, 1, 1, 1, KvType::F16);
        c.write(0, 0, 0, &[0.1], &[1e-8]);
        let (k, v) = read(&c, 0, 0, 1);
        assert_eq!(k[0], f16::from_f32(0.1).to_f32());
        assert_eq!(v[0], f16::from_f32(1e-8).to_f32());
    }

    #[test]
    fn every_type_round_trips_within_its_precision_and_sizes_follow_the_type() {
        // 2 layers, 2 sequences, 4 positions, n_embd_kv 64 (two heads of 32).
        let n = 64;
        let row = |p: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + p * 3) % 23) as f32 * s - 1.1)
                .collect()
        };
        for ty in KvType::ALL {
            for tv in [KvType::F16, ty] {
                let mut c = KvCache::with_windows(&[None, None], 2, 4, n, ty, tv);
                assert_eq!(c.types(), (ty, tv));
                assert_eq!(
                    c.size_bytes(),
                    2 * 2 * 4 * (ty.row_bytes(n) + tv.row_bytes(n)),
                    "{ty:?}/{tv:?}"
                );
                for p in 0..4 {
                    c.write(1, 1, p, &row(p, 0.1), &row(p, -0.05));
                }
                c.set_len(1, 4);
                let (k, v) = read(&c, 1, 1, 4);
                let tol = |t: KvType| match t {
                    KvType::F32 => 0.0,
                    KvType::F16 => 2e-3,
                    KvType::BF16 => 1e-2,
                    KvType::Q8_0 => 2e-2,
                    KvType::Q5_0 | KvType::Q5_1 => 0.1,
                    _ => 0.25,
                };
                for p in 0..4 {
                    for (i, (a, b)) in k[p * n..(p + 1) * n].iter().zip(row(p, 0.1)).enumerate() {
                        assert!((a - b).abs() <= tol(ty), "{ty:?} k[{p},{i}] {a} vs {b}");
                    }
                    for (a, b) in v[p * n..(p + 1) * n].iter().zip(row(p, -0.05)) {
                        assert!((a - b).abs() <= tol(tv), "{tv:?} v {a} vs {b}");
                    }
                }
                let (k0, _) = read(&c, 0, 1, 4);
                assert!(
                    k0.iter().all(|&x| x == 0.0),
                    "{ty:?}: other layer untouched"
                );
            }
        }
        assert_eq!(KvType::Q8_0.row_bytes(64), 68);
        assert_eq!(KvType::Q4_0.row_bytes(64), 36);
        assert_eq!(KvType::parse("Q8_0"), Some(KvType::Q8_0));
        assert_eq!(KvType::parse("iq4_nl"), Some(KvType::IQ4_NL));
        assert_eq!(KvType::parse("q2_k"), None);
        for t in KvType::ALL {
            assert_eq!(KvType::parse(t.name()), Some(t));
        }
    }

    /// Attention over a quantized or mixed-type cache, read in place: equal (within the types' rounding)
    /// to the exact softmax over the dequantized rows, and the dispatched kernel equal to its scalar twin.
    #[test]
    fn attention_reads_every_cache_type_in_place() {
        use crate::engine::kernels::ops;
        let (hd, n_heads_kv, n_pos) = (64, 2, 37);
        let nkv = hd * n_heads_kv;
        let val = |i: usize, s: u64| -> f32 {
            let x = (i as u64).wrapping_mul(2_654_435_761).wrapping_add(s * 97) % 1000;
            x as f32 / 500.0 - 1.0
        };
        let q: Vec<f32> = (0..hd).map(|i| val(i, 7) * 2.0).collect();
        for tk in KvType::ALL {
            for tv in [KvType::F16, KvType::F32, tk] {
                let mut c = KvCache::with_windows(&[None], 1, n_pos, nkv, tk, tv);
                for p in 0..n_pos {
                    let k: Vec<f32> = (0..nkv).map(|i| val(p * nkv + i, 1)).collect();
                    let v: Vec<f32> = (0..nkv).map(|i| val(p * nkv + i, 2)).collect();
                    c.write(0, 0, p, &k, &v);
                }
                c.set_len(0, n_pos);
                let view = c.view(0, 0, n_pos);
                let (kf, vf) = (view.k.to_f32(), view.v.to_f32());
                for g in 0..n_heads_kv {
                    let mut got = vec![0.0f32; hd];
                    let mut twin = vec![0.0f32; hd];
                    let mut scratch = ops::RawAttnScratch::default();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let (kt, vt) = (view.k.ggml_type(), view.v.ggml_type());
                    ops::attend_one_raw(
                        &q,
                        n_pos,
                        scale,
                        0.0,
                        kt,
                        |j| view.k.head(j, g, hd, nkv),
                        vt,
                        |j| view.v.head(j, g, hd, nkv),
                        &mut scratch,
                        &mut got,
                    );
                    ops::attend_one_raw_scalar(
                        &q,
                        n_pos,
                        scale,
                        0.0,
                        kt,
                        |j| view.k.head(j, g, hd, nkv),
                        vt,
                        |j| view.v.head(j, g, hd, nkv),
                        &mut scratch,
                        &mut twin,
                    );
                    // The reference: exact softmax over the dequantized rows (f32 query).
                    let mut scores = vec![0.0f32; n_pos];
                    let mut want = vec![0.0f32; hd];
                    ops::attend_one(
                        &q,
                        n_pos,
                        scale,
                        |j| &kf[j * nkv + g * hd..j * nkv + (g + 1) * hd],
                        |j| &vf[j * nkv + g * hd..j * nkv + (g + 1) * hd],
                        &mut scores,
                        &mut want,
                    );
                    // The query is rounded to the keys' vec-dot type (Q8_0/Q8_1 for block types) and
                    // f16 values are accumulated in f16.
                    let tol = if tk.is_quantized() { 2e-2 } else { 5e-3 };
                    for i in 0..hd {
                        assert!(
                            (got[i] - want[i]).abs() <= tol,
                            "{tk:?}/{tv:?} head {g} [{i}]: {} vs exact {}",
                            got[i],
                            want[i]
                        );
                        assert!(
                            (got[i] - twin[i]).abs() <= 1e-5 * (1.0 + twin[i].abs()),
                            "{tk:?}/{tv:?}: SIMD {} vs scalar {}",
                            got[i],
                            twin[i]
                        );
                    }
                }
            }
        }
    }
}
