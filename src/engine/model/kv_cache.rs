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

use crate::engine::kernels::ops::f32_to_f16;

/// Element type of the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half precision (2 bytes per element), llama.cpp's default.
    #[default]
    F16,
    /// Single precision (4 bytes per element).
    F32,
}

enum Store {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

/// Borrowed keys and values of one (layer, sequence): `[n_pos, n_embd_kv]` each, in the cache's type.
pub enum KvView<'a> {
    /// Half-precision cache.
    F16 { k: &'a [f16], v: &'a [f16] },
    /// Single-precision cache.
    F32 { k: &'a [f32], v: &'a [f32] },
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
        Self::with_windows(&vec![None; n_layer], n_seq, n_ctx, n_embd_kv, ty)
    }

    /// Allocates a cache whose layer `il` is global (`window[il] == None`: `n_ctx` cells) or slides over
    /// `window[il]` positions (a ring of `min(window, n_ctx)` cells). Memory:
    /// `2 · n_seq · n_embd_kv · (2 or 4) · Σ cells` bytes, as [`crate::engine::kv_layout::KvLayout::cache_bytes`].
    pub fn with_windows(
        window: &[Option<usize>],
        n_seq: usize,
        n_ctx: usize,
        n_embd_kv: usize,
        ty: KvType,
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
        let mk = || match ty {
            KvType::F16 => Store::F16(vec![f16::ZERO; n]),
            KvType::F32 => Store::F32(vec![0.0; n]),
        };
        KvCache {
            n_seq,
            n_ctx,
            n_embd_kv,
            window: window.to_vec(),
            cells,
            base,
            k: mk(),
            v: mk(),
            len: vec![0; n_seq],
        }
    }

    /// Bytes held by keys and values together.
    pub fn size_bytes(&self) -> usize {
        let per = match self.k {
            Store::F16(_) => 2,
            Store::F32(_) => 4,
        };
        2 * self.n_seq * self.n_embd_kv * per * self.cells.iter().sum::<usize>()
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
        for (store, src) in [(&mut self.k, k), (&mut self.v, v)] {
            match store {
                Store::F16(d) => f32_to_f16(src, &mut d[o..o + n]),
                Store::F32(d) => d[o..o + n].copy_from_slice(src),
            }
        }
    }

    /// Borrows positions `0..n` of `seq` in a global `layer` in the cache's own element type: keys and
    /// values `[n, n_embd_kv]` each (row `j` = position `j`). `n ≤ n_ctx`. For a sliding layer, the rows
    /// are its cells (see [`KvCache::ring`]).
    pub fn view(&self, layer: usize, seq: usize, n: usize) -> KvView<'_> {
        let o = self.offset(layer, seq, 0);
        let len = n.min(self.cells[layer]) * self.n_embd_kv;
        match (&self.k, &self.v) {
            (Store::F16(k), Store::F16(v)) => KvView::F16 {
                k: &k[o..o + len],
                v: &v[o..o + len],
            },
            (Store::F32(k), Store::F32(v)) => KvView::F32 {
                k: &k[o..o + len],
                v: &v[o..o + len],
            },
            _ => unreachable!("keys and values share one element type (KvCache::new)"),
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
        match c.view(layer, seq, n) {
            KvView::F16 { k, v } => (
                k.iter().map(|x| x.to_f32()).collect(),
                v.iter().map(|x| x.to_f32()).collect(),
            ),
            KvView::F32 { k, v } => (k.to_vec(), v.to_vec()),
        }
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
        let mut c = KvCache::with_windows(&[None, Some(3)], 2, 8, 1, KvType::F32);
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
        let (k1, v1) = match c.ring(1, 1) {
            KvView::F32 { k, v } => (k.to_vec(), v.to_vec()),
            KvView::F16 { .. } => unreachable!(),
        };
        assert_eq!(k1, vec![3.0, 4.0, 2.0]);
        assert_eq!(v1, vec![13.0, 14.0, 12.0]);
        let (k_other, _) = read(&c, 1, 0, 3);
        assert_eq!(k_other, vec![0.0; 3], "other sequence untouched");
        // A token at 4 needs 2..4 (held), at 3 needs 1..3 (1 overwritten by 4).
        assert!(c.can_truncate(1, 4));
        assert!(!c.can_truncate(1, 3));
        assert!(c.can_truncate(1, 0) && c.can_truncate(1, 5) && c.can_truncate(1, 7));
        // Inside the window everything is still held.
        let mut d = KvCache::with_windows(&[Some(3)], 1, 8, 1, KvType::F16);
        d.set_len(0, 3);
        assert!(d.can_truncate(0, 1));
        // A window larger than the context is the whole context.
        let e = KvCache::with_windows(&[Some(100)], 1, 8, 1, KvType::F16);
        assert_eq!(e.cells(0), 8);
    }

    #[test]
    fn f16_cache_rounds_like_f16() {
        let mut c = KvCache::new(1, 1, 1, 1, KvType::F16);
        c.write(0, 0, 0, &[0.1], &[1e-8]);
        let (k, v) = read(&c, 0, 0, 1);
        assert_eq!(k[0], f16::from_f32(0.1).to_f32());
        assert_eq!(v[0], f16::from_f32(1e-8).to_f32());
    }
}
