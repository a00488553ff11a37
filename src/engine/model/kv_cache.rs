//! The KV cache: per layer and per sequence, the keys and values of every position already processed, so
//! that decoding a token attends to its past without recomputing it.
//!
//! Layout: one contiguous slab per (layer, sequence) of `[n_ctx, n_embd_kv]` (ggml order: `n_embd_kv`
//! fastest), the cell index being the token's position. Stored as f16 (llama.cpp's default `type_k`/`type_v`)
//! or f32. Positions of a sequence are kept contiguous from 0, which makes attention's reduction order (by
//! position) independent of how tokens were batched.

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

/// Keys and values for `n_layer` layers × `n_seq` sequences × `n_ctx` positions × `n_embd_kv` elements.
pub struct KvCache {
    n_layer: usize,
    n_seq: usize,
    n_ctx: usize,
    n_embd_kv: usize,
    k: Store,
    v: Store,
    /// Number of filled positions per sequence (cells `0..len` are valid).
    len: Vec<usize>,
}

impl KvCache {
    /// Allocates a cache (zeroed). Memory: `2 · n_layer · n_seq · n_ctx · n_embd_kv · (2 or 4)` bytes.
    pub fn new(
        n_layer: usize,
        n_seq: usize,
        n_ctx: usize,
        n_embd_kv: usize,
        ty: KvType,
    ) -> KvCache {
        let n = n_layer * n_seq * n_ctx * n_embd_kv;
        let mk = || match ty {
            KvType::F16 => Store::F16(vec![f16::ZERO; n]),
            KvType::F32 => Store::F32(vec![0.0; n]),
        };
        KvCache {
            n_layer,
            n_seq,
            n_ctx,
            n_embd_kv,
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
        2 * self.n_layer * self.n_seq * self.n_ctx * self.n_embd_kv * per
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
        ((layer * self.n_seq + seq) * self.n_ctx + pos) * self.n_embd_kv
    }

    /// Stores one token's key and value (`[n_embd_kv]` each) at `pos` of `seq` in `layer`.
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

    /// Borrows positions `0..n` of `seq` in `layer` in the cache's own element type: keys and values
    /// `[n, n_embd_kv]` each (row `j` = position `j`). `n ≤ n_ctx`.
    pub fn view(&self, layer: usize, seq: usize, n: usize) -> KvView<'_> {
        let o = self.offset(layer, seq, 0);
        let len = n.min(self.n_ctx) * self.n_embd_kv;
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
    fn f16_cache_rounds_like_f16() {
        let mut c = KvCache::new(1, 1, 1, 1, KvType::F16);
        c.write(0, 0, 0, &[0.1], &[1e-8]);
        let (k, v) = read(&c, 0, 0, 1);
        assert_eq!(k[0], f16::from_f32(0.1).to_f32());
        assert_eq!(v[0], f16::from_f32(1e-8).to_f32());
    }
}
