//! Which layers of a GGUF decoder keep a full KV cache and which only a sliding window, read from the
//! file's metadata alone: one pure function shared by the model's KV cache (`engine::model`) and the
//! supervisor's memory estimate, which reads GGUF metadata but must not load models.
//!
//! Ported from llama.cpp commit 0c1e570: `src/models/gemma2.cpp` / `gemma3.cpp` (`load_arch_hparams`:
//! window, pattern and their defaults), `src/llama-model.cpp` (`load_swa_pattern`),
//! `src/llama-hparams.cpp` (`set_swa_pattern`) and `src/llama-kv-cache-iswa.cpp` (a full cache for the
//! global layers beside a window-sized one for the sliding layers).

use crate::engine::gguf::{GgufError, GgufFile, Value};

/// `{arch}.attention.sliding_window`: the window of sliding-window layers, in positions.
pub fn key_sliding_window(arch: &str) -> String {
    format!("{arch}.attention.sliding_window")
}

/// `{arch}.attention.sliding_window_pattern`: one number `n` (every `n`-th layer is global, the others
/// sliding) or one bool per layer (true = sliding).
pub fn key_sliding_window_pattern(arch: &str) -> String {
    format!("{arch}.attention.sliding_window_pattern")
}

/// The KV-cache shape of a decoder: per layer, whether it keeps every position or only a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// `{arch}.block_count`.
    pub n_layer: usize,
    /// Elements of one position's key (or value) in one layer: `head_count_kv · key_length`.
    pub n_embd_kv: usize,
    /// Sliding window in positions (`hparams.n_swa`): a token at position `p` of a sliding layer attends to
    /// positions `p - n_swa + 1 ..= p` (`LLAMA_SWA_TYPE_STANDARD`). 0 when no layer slides.
    pub n_swa: usize,
    /// `[n_layer]`: true for a sliding-window layer (`hparams.is_swa(il)`); all false when `n_swa` is 0.
    pub swa_layers: Vec<bool>,
}

impl KvLayout {
    /// Cells one sequence needs in `layer` at `n_ctx_seq` positions: `n_ctx_seq` for a global layer,
    /// `min(n_swa, n_ctx_seq)` for a sliding one (a ring of the window; the tokens of the batch being
    /// evaluated are attended from the batch itself, so the window needs no extra cells).
    pub fn cells(&self, layer: usize, n_ctx_seq: usize) -> usize {
        if self.swa_layers.get(layer).copied().unwrap_or(false) {
            self.n_swa.min(n_ctx_seq)
        } else {
            n_ctx_seq
        }
    }

    /// Bytes of keys and values for `n_seq` sequences of `n_ctx_seq` positions each, `elem_bytes` per
    /// element (2 for f16): `2 · n_seq · n_embd_kv · elem_bytes · Σ_layers cells(layer)`. Saturates.
    pub fn cache_bytes(&self, n_ctx_seq: u64, n_seq: u64, elem_bytes: u64) -> u64 {
        let cells = self.total_cells(n_ctx_seq);
        2u64.saturating_mul(n_seq)
            .saturating_mul(self.n_embd_kv as u64)
            .saturating_mul(elem_bytes)
            .saturating_mul(cells)
    }

    /// [`KvLayout::cache_bytes`] for keys of type `type_k` and values of type `type_v` (`-ctk`/`-ctv`):
    /// `n_seq · (row_k + row_v) · Σ_layers cells(layer)` with `row = type.row_bytes(n_embd_kv)` (a block
    /// type's bytes per row, e.g. 34 per 32 elements for q8_0). Saturates.
    pub fn cache_bytes_typed(
        &self,
        n_ctx_seq: u64,
        n_seq: u64,
        type_k: crate::engine::model::KvType,
        type_v: crate::engine::model::KvType,
    ) -> u64 {
        let cells = self.total_cells(n_ctx_seq);
        let row = (type_k.row_bytes(self.n_embd_kv) + type_v.row_bytes(self.n_embd_kv)) as u64;
        n_seq.saturating_mul(row).saturating_mul(cells)
    }

    /// `Σ_layers cells(layer)` for one sequence of `n_ctx_seq` positions. Saturates.
    fn total_cells(&self, n_ctx_seq: u64) -> u64 {
        let ctx = usize::try_from(n_ctx_seq).unwrap_or(usize::MAX);
        (0..self.n_layer)
            .map(|l| self.cells(l, ctx) as u64)
            .fold(0u64, |a, c| a.saturating_add(c))
    }

    /// Number of sliding-window layers.
    pub fn n_swa_layers(&self) -> usize {
        self.swa_layers.iter().filter(|s| **s).count()
    }
}

/// Reads the KV layout of `f`: `block_count`, the KV width, and for the architectures with interleaved
/// sliding-window attention (gemma2: window 4096 unless the file says otherwise, every 2nd layer global;
/// gemma3: the file's window, every 6th layer global, none when the file has no window) which layers
/// slide. `sliding_window_pattern` overrides the pattern when present. Other architectures: all global.
///
/// Errors: [`GgufError::MissingKey`] for a missing `block_count`, `embedding_length` or
/// `attention.head_count`; [`GgufError::WrongType`] for a mistyped key or a per-layer pattern whose length
/// is not `block_count`.
pub fn kv_layout(f: &GgufFile) -> Result<KvLayout, GgufError> {
    let a = f.architecture()?.to_string();
    let n_layer = f.get_u32(&format!("{a}.block_count"))? as usize;
    let n_embd = f.get_u32(&format!("{a}.embedding_length"))? as usize;
    let n_head = f.get_u32(&format!("{a}.attention.head_count"))? as usize;
    let kv_key = format!("{a}.attention.head_count_kv");
    let n_head_kv = match f.get(&kv_key) {
        None => n_head,
        Some(Value::Array(arr)) => arr
            .iter()
            .filter_map(|x| x.as_int())
            .max()
            .and_then(|x| usize::try_from(x).ok())
            .unwrap_or(n_head),
        Some(_) => f.get_u32(&kv_key)? as usize,
    };
    let kl_key = format!("{a}.attention.key_length");
    let head_dim = match f.get(&kl_key) {
        None => n_embd.checked_div(n_head).unwrap_or(0),
        Some(_) => f.get_u32(&kl_key)? as usize,
    };
    let (default_window, default_pattern) = match a.as_str() {
        "gemma2" => (4096, 2),
        "gemma3" => (0, 6),
        _ => (0, 0),
    };
    let mut layout = KvLayout {
        n_layer,
        n_embd_kv: n_head_kv.saturating_mul(head_dim),
        n_swa: 0,
        swa_layers: vec![false; n_layer],
    };
    if default_pattern == 0 {
        return Ok(layout);
    }
    let wkey = key_sliding_window(&a);
    let n_swa = match f.get(&wkey) {
        None => default_window,
        Some(_) => f.get_u32(&wkey)? as usize,
    };
    if n_swa == 0 {
        return Ok(layout);
    }
    layout.n_swa = n_swa;
    let pkey = key_sliding_window_pattern(&a);
    layout.swa_layers = match f.get(&pkey) {
        Some(Value::Array(arr)) => {
            let v: Vec<bool> = arr
                .iter()
                .map(|x| match x {
                    Value::Bool(b) => Some(b),
                    _ => None,
                })
                .collect::<Option<Vec<bool>>>()
                .filter(|v| v.len() == n_layer)
                .ok_or_else(|| GgufError::WrongType {
                    key: pkey.clone(),
                    expected: "one BOOL per layer",
                    found: format!("ARRAY of {} × {}", arr.len(), arr.elem_type().name()),
                })?;
            v
        }
        Some(_) => swa_pattern(n_layer, f.get_u32(&pkey)? as usize),
        None => swa_pattern(n_layer, default_pattern),
    };
    Ok(layout)
}

/// `llama_hparams::set_swa_pattern(n_pattern, dense_first = false)`: layer `il` slides unless
/// `il % n_pattern == n_pattern - 1`; a pattern of 0 makes every layer slide.
pub fn swa_pattern(n_layer: usize, n_pattern: usize) -> Vec<bool> {
    (0..n_layer)
        .map(|il| n_pattern == 0 || il % n_pattern < n_pattern - 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_patterns_match_llama_cpp() {
        // gemma3 (pattern 6): layers 5, 11, 17 are global.
        let p = swa_pattern(18, 6);
        let global: Vec<usize> = (0..18).filter(|&i| !p[i]).collect();
        assert_eq!(global, vec![5, 11, 17]);
        // gemma2 (pattern 2): odd layers are global.
        assert_eq!(swa_pattern(4, 2), vec![true, false, true, false]);
        assert_eq!(swa_pattern(3, 0), vec![true; 3]);
    }

    #[test]
    fn cache_bytes_counts_a_window_for_sliding_layers() {
        let l = KvLayout {
            n_layer: 6,
            n_embd_kv: 256,
            n_swa: 512,
            swa_layers: swa_pattern(6, 6),
        };
        assert_eq!(l.n_swa_layers(), 5);
        // 32k context: one global layer of 32768 cells, five of 512.
        assert_eq!(l.cache_bytes(32768, 1, 2), 2 * 256 * 2 * (32768 + 5 * 512));
        // A context inside the window: every layer keeps the whole context.
        assert_eq!(l.cache_bytes(100, 2, 2), 2 * 2 * 256 * 2 * 600);
        assert_eq!(l.cells(0, 100), 100);
        assert_eq!(l.cells(5, 4096), 4096);
        assert_eq!(l.cells(0, 4096), 512);
    }
}
