//! The Gemma family (gemma2, gemma3): its hyper-parameters and its forward pass, with interleaved
//! sliding-window and global attention layers over the engine's KV cache (sliding layers keep a ring of
//! the window, see `kv_cache.rs`).
//!
//! Ported from llama.cpp commit 0c1e570: `src/models/gemma3.cpp` and `src/models/gemma2.cpp`
//! (`load_arch_hparams`, `load_arch_tensors`, the graphs), `src/llama-model.cpp` (`get_rope_freq_base`,
//! `get_rope_freq_scale`, `load_swa_pattern`), `src/llama-hparams.h` (defaults) and `src/llama-graph.cpp`
//! (`build_attn_mha` with `ggml_flash_attn_ext`, `build_ffn` with `LLM_FFN_GELU` + `LLM_FFN_PAR` =
//! `ggml_geglu_split`). Per layer:
//!
//! ```text
//! x = tok_embd[token] · √n_embd
//! h = rms_norm(x)·attn_norm → q, k, v → (gemma3: per-head rms_norm of q and k) → rope (NeoX; the sliding
//!     layers' own base) → q · f_attention_scale → attention (window for sliding layers; gemma2: logit
//!     soft-cap) → wo → rms_norm·post_attention_norm;  x = x + that
//! h = rms_norm(x)·ffn_norm → gelu(gate)·up → down → rms_norm·post_ffw_norm;  x = x + that
//! logits = output(rms_norm(x)·output_norm) → (final soft-cap)
//! ```
//! The `+1` of Gemma's `(1 + w)` norms is folded into the weights by llama.cpp's converter, so the norms
//! multiply by the stored weights exactly as llama.cpp does.

use half::f16;

use crate::engine::gguf::GgufFile;
use crate::engine::kernels::ops::{self, RopeMode, RopeParams};
use crate::engine::kv_layout;

use super::forward::{dump, for_each_head_group, group_by_seq, mm};
use super::hparams::{Arch, HParams};
use super::kv_cache::{KvCache, KvRow, KvRows, KvSide};
use super::linalg::{self, Pool};
use super::{Batch, Context, ModelError};

/// `{arch}.rope.freq_base_swa`: rope base of the sliding-window layers.
fn key_rope_freq_base_swa(arch: &str) -> String {
    format!("{arch}.rope.freq_base_swa")
}

/// `{arch}.attn_logit_softcapping`.
fn key_attn_softcap(arch: &str) -> String {
    format!("{arch}.attn_logit_softcapping")
}

/// `{arch}.final_logit_softcapping`.
fn key_final_softcap(arch: &str) -> String {
    format!("{arch}.final_logit_softcapping")
}

/// The Gemma-specific hyper-parameters (llama.cpp's `llama_hparams` fields of the same meaning).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaHParams {
    /// `n_swa`: window of the sliding layers in positions (a token at `p` sees `p - n_swa + 1 ..= p`);
    /// 0 when no layer slides (a gemma3 file without `attention.sliding_window`).
    pub n_swa: usize,
    /// `[n_layer]`: true for a sliding-window layer (`hparams.is_swa(il)`).
    pub swa_layers: Vec<bool>,
    /// `rope_freq_base_train_swa`: rope base of the sliding layers (`{arch}.rope.freq_base_swa`; gemma3
    /// default 10000, gemma2 default the global base).
    pub rope_freq_base_swa: f32,
    /// `rope_freq_scale_train_swa`: rope scale of the sliding layers (gemma3: 1, no scaling; gemma2: the
    /// global scale).
    pub rope_freq_scale_swa: f32,
    /// `f_attention_scale`: multiplies Q before attention (which then uses a scale of 1):
    /// `1/√n_embd_head_k`, or `1/√(n_embd/n_head)` for the 27B models (gemma_pytorch's
    /// `query_pre_attn_scalar`).
    pub attn_scale: f32,
    /// `f_attn_logit_softcapping` (gemma2, default 50); 0 for gemma3 (no attention soft-cap).
    pub attn_softcap: f32,
    /// `f_final_logit_softcapping`: gemma2 default 30, gemma3 0 unless the file has the key; 0 = none.
    pub final_softcap: f32,
}

/// Reads the Gemma hyper-parameters of `f` (its common ones already in `hp`), with llama.cpp's defaults
/// for absent keys: the sliding window and pattern through [`kv_layout::kv_layout`], the rope base of the
/// sliding layers, the soft-caps and the attention scale.
///
/// Errors: [`ModelError::Gguf`] for a mistyped key, [`ModelError::BadHParams`] for a soft-cap or rope base
/// that is negative or not finite.
pub(super) fn load_hparams(f: &GgufFile, hp: &HParams) -> Result<GemmaHParams, ModelError> {
    let a = hp.arch.name();
    let opt_f32 = |key: String| -> Result<Option<f32>, ModelError> {
        match f.get(&key) {
            None => Ok(None),
            Some(_) => Ok(Some(f.get_f32(&key)?)),
        }
    };
    let layout = kv_layout::kv_layout(f)?;
    let gemma2 = hp.arch == Arch::Gemma2;
    let (base_swa_default, scale_swa) = if gemma2 {
        (hp.rope_freq_base, hp.rope_freq_scale)
    } else {
        (10000.0, 1.0)
    };
    let rope_freq_base_swa = opt_f32(key_rope_freq_base_swa(a))?.unwrap_or(base_swa_default);
    let attn_softcap = if gemma2 {
        opt_f32(key_attn_softcap(a))?.unwrap_or(50.0)
    } else {
        0.0
    };
    let final_softcap = opt_f32(key_final_softcap(a))?.unwrap_or(if gemma2 { 30.0 } else { 0.0 });
    for (what, v) in [
        ("rope.freq_base_swa", rope_freq_base_swa),
        ("attn_logit_softcapping", attn_softcap),
        ("final_logit_softcapping", final_softcap),
    ] {
        if !v.is_finite() || v < 0.0 || (what == "rope.freq_base_swa" && v == 0.0) {
            return Err(ModelError::BadHParams(format!(
                "{a}.{what} {v} out of range"
            )));
        }
    }
    // LLM_TYPE_27B: gemma2 with 46 layers, gemma3 with 62.
    let is_27b = hp.n_layer == if gemma2 { 46 } else { 62 };
    let attn_scale = if is_27b {
        1.0 / ((hp.n_embd / hp.n_head) as f32).sqrt()
    } else {
        1.0 / (hp.head_dim as f32).sqrt()
    };
    Ok(GemmaHParams {
        n_swa: layout.n_swa,
        swa_layers: layout.swa_layers,
        rope_freq_base_swa,
        rope_freq_scale_swa: scale_swa,
        attn_scale,
        attn_softcap,
        final_softcap,
    })
}

/// Dimensions of grouped-query attention.
struct Shape {
    head_dim: usize,
    /// Query heads per KV head.
    gqa: usize,
    /// `n_head_kv`.
    n_groups: usize,
    /// Width of a token's Q (`n_head · head_dim`).
    nq: usize,
    /// Width of a token's K or V (`n_head_kv · head_dim`).
    nkv: usize,
    /// Attention-logit soft-cap (0: none).
    softcap: f32,
}

/// The keys and values one sequence's tokens attend to in one layer: the cache's cells for positions
/// before the batch (`cells` of them, position `p` in cell `p % cells`) and the batch's own rows for
/// positions `p0..` (already rounded to the cache's element type), so a ring of the window is enough even
/// when the batch is longer than the window.
struct Rows<'a, T> {
    cache_k: &'a [T],
    cache_v: &'a [T],
    new_k: &'a [T],
    new_v: &'a [T],
    cells: usize,
    p0: usize,
    nkv: usize,
    head_dim: usize,
}

impl<'a, T> Rows<'a, T> {
    fn k(&self, pos: usize, g: usize) -> &'a [T] {
        self.row(self.cache_k, self.new_k, pos, g)
    }
    fn v(&self, pos: usize, g: usize) -> &'a [T] {
        self.row(self.cache_v, self.new_v, pos, g)
    }
    fn row(&self, cache: &'a [T], new: &'a [T], pos: usize, g: usize) -> &'a [T] {
        let o = g * self.head_dim;
        let r = if pos >= self.p0 {
            (pos - self.p0) * self.nkv
        } else {
            (pos % self.cells) * self.nkv
        };
        let src = if pos >= self.p0 { new } else { cache };
        &src[r + o..r + o + self.head_dim]
    }
}

/// [`Rows`] for any pair of cache types: the cache's sides and the batch's own rows encoded in the same
/// types ([`KvRows::encode`]).
struct SideRows<'a> {
    cache_k: KvSide<'a>,
    cache_v: KvSide<'a>,
    new_k: KvSide<'a>,
    new_v: KvSide<'a>,
    cells: usize,
    p0: usize,
    nkv: usize,
    head_dim: usize,
}

impl<'a> SideRows<'a> {
    fn k(&self, pos: usize, g: usize) -> KvRow<'a> {
        self.row(self.cache_k, self.new_k, pos, g)
    }
    fn v(&self, pos: usize, g: usize) -> KvRow<'a> {
        self.row(self.cache_v, self.new_v, pos, g)
    }
    fn row(&self, cache: KvSide<'a>, new: KvSide<'a>, pos: usize, g: usize) -> KvRow<'a> {
        if pos >= self.p0 {
            new.head(pos - self.p0, g, self.head_dim, self.nkv)
        } else {
            cache.head(pos % self.cells, g, self.head_dim, self.nkv)
        }
    }
}

/// Rows of either element type, or of any other pair of cache types.
enum AnyRows<'a> {
    F16(Rows<'a, f16>),
    F32(Rows<'a, f32>),
    Mixed(SideRows<'a>),
}

/// Attention of the tokens `items` (`(batch index, first visible position, own position)`) of one
/// sequence: for each token and head, the softmax-weighted values over positions `lo..=pos` in position
/// order, with ggml's CPU flash-attention arithmetic for f16 rows ([`ops::attend_heads_f16`],
/// [`ops::attend_one_f16_softcap`]) and `build_attn_mha`'s exact softmax for f32 rows
/// ([`ops::attend_one_softcap`]). Q is already scaled (`f_attention_scale`), so the kernels use a scale
/// of 1. Writes `attn[i]` rows (`[n_tokens, nq]`). Split over (token, KV group) pairs; each pair is
/// computed by the same code whatever the split, so the result does not depend on threads or batching.
fn attention(
    pool: &Pool,
    s: &Shape,
    q: &[f32],
    rows: &AnyRows<'_>,
    items: &[(usize, usize, usize)],
    attn: &mut [f32],
) {
    let hd = s.head_dim;
    let width = s.gqa * hd;
    let one = |i: usize,
               lo: usize,
               pos: usize,
               g: usize,
               scores: &mut Vec<f32>,
               scratch: &mut ops::AttnScratch,
               out: &mut [f32]| {
        let qg = &q[i * s.nq + g * width..i * s.nq + (g + 1) * width];
        let n_kv = pos + 1 - lo;
        match rows {
            AnyRows::F16(r) if s.softcap == 0.0 => ops::attend_heads_f16(
                qg,
                hd,
                n_kv,
                1.0,
                |j| r.k(lo + j, g),
                |j| r.v(lo + j, g),
                scratch,
                out,
            ),
            AnyRows::F16(r) => {
                for (qh, oh) in qg.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                    ops::attend_one_f16_softcap(
                        qh,
                        n_kv,
                        1.0,
                        s.softcap,
                        |j| r.k(lo + j, g),
                        |j| r.v(lo + j, g),
                        scratch,
                        oh,
                    );
                }
            }
            AnyRows::Mixed(r) => {
                let (tk, tv) = (r.cache_k.ggml_type(), r.cache_v.ggml_type());
                for (qh, oh) in qg.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                    ops::attend_one_raw(
                        qh,
                        n_kv,
                        1.0,
                        s.softcap,
                        tk,
                        |j| r.k(lo + j, g),
                        tv,
                        |j| r.v(lo + j, g),
                        &mut scratch.raw,
                        oh,
                    );
                }
            }
            AnyRows::F32(r) => {
                scores.resize(n_kv.max(scores.len()), 0.0);
                for (qh, oh) in qg.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                    ops::attend_one_softcap(
                        qh,
                        n_kv,
                        1.0,
                        s.softcap,
                        |j| r.k(lo + j, g),
                        |j| r.v(lo + j, g),
                        scores,
                        oh,
                    );
                }
            }
        }
    };
    let work: usize = items
        .iter()
        .map(|&(_, lo, pos)| pos + 1 - lo)
        .sum::<usize>()
        * s.nq;
    for_each_head_group(
        pool,
        items,
        s.n_groups,
        width,
        s.nq,
        work,
        |&(i, _, _)| i,
        |&(i, lo, pos), g, (scores, scratch), out| one(i, lo, pos, g, scores, scratch, out),
        attn,
    );
}

/// Attention of one layer for every sequence of the batch, then the batch's keys and values stored in
/// the cache (after, so that a sliding layer's ring never loses a cell a token of this batch still
/// needs). `k`/`v` are `[n_tokens, nkv]`, `q` `[n_tokens, nq]`; returns `[n_tokens, nq]`.
#[allow(clippy::too_many_arguments)] // one layer's tensors, the batch and its grouping
fn attention_layer(
    pool: &Pool,
    kv: &mut KvCache,
    il: usize,
    s: &Shape,
    b: &Batch,
    groups: &[(u32, Vec<usize>)],
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let n = b.tokens.len();
    let nkv = s.nkv;
    let window = kv.window(il);
    let cells = kv.cells(il);
    let mut attn = vec![0.0f32; n * s.nq];
    for (seq, idx) in groups {
        let seq = *seq as usize;
        // Validated: a sequence's positions in the batch are p0, p0+1, … in batch order.
        let p0 = b.pos[idx[0]] as usize;
        let items: Vec<(usize, usize, usize)> = idx
            .iter()
            .map(|&i| {
                let pos = b.pos[i] as usize;
                let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                (i, lo, pos)
            })
            .collect();
        let gather = |src: &[f32]| -> Vec<f32> {
            idx.iter()
                .flat_map(|&i| src[i * nkv..(i + 1) * nkv].iter().copied())
                .collect()
        };
        let (nk, nv) = (gather(k), gather(v));
        let ring = kv.ring(il, seq);
        match (ring.k, ring.v) {
            (KvSide::F16(ck), KvSide::F16(cv)) => {
                let mut k16 = vec![f16::ZERO; nk.len()];
                let mut v16 = vec![f16::ZERO; nv.len()];
                ops::f32_to_f16(&nk, &mut k16);
                ops::f32_to_f16(&nv, &mut v16);
                let rows = AnyRows::F16(Rows {
                    cache_k: ck,
                    cache_v: cv,
                    new_k: &k16,
                    new_v: &v16,
                    cells,
                    p0,
                    nkv,
                    head_dim: s.head_dim,
                });
                attention(pool, s, q, &rows, &items, &mut attn);
            }
            (KvSide::F32(ck), KvSide::F32(cv)) => {
                let rows = AnyRows::F32(Rows {
                    cache_k: ck,
                    cache_v: cv,
                    new_k: &nk,
                    new_v: &nv,
                    cells,
                    p0,
                    nkv,
                    head_dim: s.head_dim,
                });
                attention(pool, s, q, &rows, &items, &mut attn);
            }
            (ck, cv) => {
                let (tk, tv) = kv.types();
                let (ek, ev) = (KvRows::encode(tk, &nk, nkv), KvRows::encode(tv, &nv, nkv));
                let rows = AnyRows::Mixed(SideRows {
                    cache_k: ck,
                    cache_v: cv,
                    new_k: ek.side(nkv),
                    new_v: ev.side(nkv),
                    cells,
                    p0,
                    nkv,
                    head_dim: s.head_dim,
                });
                attention(pool, s, q, &rows, &items, &mut attn);
            }
        }
    }
    for i in 0..n {
        kv.write(
            il,
            b.seq_id[i] as usize,
            b.pos[i] as usize,
            &k[i * nkv..(i + 1) * nkv],
            &v[i * nkv..(i + 1) * nkv],
        );
    }
    attn
}

/// RMS norm of every `[w.len()]` row of `x` in place.
fn norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        ops::rms_norm(row, w, eps);
    }
}

/// Runs the gemma2/gemma3 forward pass of `b` (already validated) and stores the outputs in `ctx`.
///
/// Errors: [`ModelError::MissingTensor`] when a gemma weight was not loaded, kernel errors of the
/// matrix products.
pub(super) fn run(ctx: &mut Context, b: &Batch) -> Result<(), ModelError> {
    let model = ctx.model.clone();
    let hp = &model.hp;
    let gh = hp
        .gemma
        .as_ref()
        .ok_or_else(|| ModelError::Unsupported("gemma hyper-parameters not loaded".into()))?;
    let w = &model.weights;
    let file = &*model.file;
    let n = b.tokens.len();
    let e = hp.n_embd;
    let hd = hp.head_dim;
    let nq = hp.n_embd_q();
    let nkv = hp.n_embd_kv();
    let eps = hp.norm_eps;
    let shape = Shape {
        head_dim: hd,
        gqa: hp.n_head / hp.n_head_kv,
        n_groups: hp.n_head_kv,
        nq,
        nkv,
        softcap: gh.attn_softcap,
    };
    let rope_global = RopeParams {
        n_dims: hp.rope_n_dims,
        freq_base: hp.rope_freq_base,
        freq_scale: hp.rope_freq_scale,
        mode: RopeMode::Neox,
    };
    let rope_swa = RopeParams {
        freq_base: gh.rope_freq_base_swa,
        freq_scale: gh.rope_freq_scale_swa,
        ..rope_global.clone()
    };
    let tables = |p: &RopeParams| -> Vec<(Vec<f32>, Vec<f32>)> {
        b.pos
            .iter()
            .map(|&pos| ops::rope_cache(p, pos, w.rope_freqs.as_deref()))
            .collect()
    };
    let tables_global = tables(&rope_global);
    let tables_swa = if gh.swa_layers.iter().any(|s| *s) {
        tables(&rope_swa)
    } else {
        Vec::new()
    };
    let groups = group_by_seq(b);
    let missing = |s: String| ModelError::MissingTensor(s);

    // inpL = get_rows(tok_embd, tokens) · √n_embd (ggml_scale).
    let embd_scale = (e as f32).sqrt();
    let mut x = vec![0.0f32; n * e];
    for (i, &t) in b.tokens.iter().enumerate() {
        let row = &mut x[i * e..(i + 1) * e];
        linalg::get_row(file, &w.tok_embd, t as usize, row)?;
        row.iter_mut().for_each(|v| *v *= embd_scale);
    }
    dump(format_args!("inp_scaled"), &x);

    let kv = ctx
        .kv
        .as_mut()
        .ok_or_else(|| ModelError::Unsupported("decoder context without a KV cache".into()))?;
    let mut h = vec![0.0f32; n * e];
    for (il, layer) in w.layers.iter().enumerate() {
        let sliding = gh.swa_layers.get(il).copied().unwrap_or(false);
        h.copy_from_slice(&x);
        norm_rows(&mut h, &layer.attn_norm, eps);
        dump(format_args!("attn_norm-{il}"), &h);
        let mut q = mm(&ctx.pool, file, &layer.wq, &h, n)?;
        let mut k = mm(&ctx.pool, file, &layer.wk, &h, n)?;
        let mut v = mm(&ctx.pool, file, &layer.wv, &h, n)?;
        if let Some(qn) = &layer.q_norm {
            norm_rows(&mut q, qn, eps);
            dump(format_args!("Qcur_normed-{il}"), &q);
        }
        if let Some(kn) = &layer.k_norm {
            norm_rows(&mut k, kn, eps);
            dump(format_args!("Kcur_normed-{il}"), &k);
        }
        let tabs = if sliding { &tables_swa } else { &tables_global };
        for (i, (c, s)) in tabs.iter().enumerate() {
            let n_dims = rope_global.n_dims;
            ops::rope(
                &mut q[i * nq..(i + 1) * nq],
                hd,
                n_dims,
                RopeMode::Neox,
                c,
                s,
            );
            ops::rope(
                &mut k[i * nkv..(i + 1) * nkv],
                hd,
                n_dims,
                RopeMode::Neox,
                c,
                s,
            );
        }
        dump(format_args!("Qcur-{il}"), &q);
        dump(format_args!("Kcur-{il}"), &k);
        dump(format_args!("Vcur-{il}"), &v);
        // ggml_scale(Qcur, f_attention_scale); build_attn then uses kq_scale = 1.
        q.iter_mut().for_each(|x| *x *= gh.attn_scale);
        // A quantized cache holds Walsh–Hadamard-rotated keys and values (as forward.rs).
        kv.rotate_qkv(&mut q, &mut k, &mut v);
        let mut attn = attention_layer(&ctx.pool, kv, il, &shape, b, &groups, &q, &k, &v);
        kv.rotate_back(&mut attn);
        dump(format_args!("kqv_out-{il}"), &attn);
        let mut o = mm(&ctx.pool, file, &layer.wo, &attn, n)?;
        let post = layer
            .attn_post_norm
            .as_ref()
            .ok_or_else(|| missing(format!("blk.{il}.post_attention_norm.weight")))?;
        norm_rows(&mut o, post, eps);
        dump(format_args!("attn_post_norm-{il}"), &o);
        // sa_out = cur + inpL.
        ops::add_in_place(&mut x, &o);
        dump(format_args!("sa_out-{il}"), &x);

        h.copy_from_slice(&x);
        norm_rows(&mut h, &layer.ffn_norm, eps);
        dump(format_args!("ffn_norm-{il}"), &h);
        let gate_w = layer
            .ffn_gate
            .as_ref()
            .ok_or_else(|| missing(format!("blk.{il}.ffn_gate.weight")))?;
        let mut g = mm(&ctx.pool, file, gate_w, &h, n)?;
        let u = mm(&ctx.pool, file, &layer.ffn_up, &h, n)?;
        ops::geglu(&mut g, &u);
        dump(format_args!("ffn_geglu-{il}"), &g);
        let mut d = mm(&ctx.pool, file, &layer.ffn_down, &g, n)?;
        dump(format_args!("ffn_out-{il}"), &d);
        let post = layer
            .ffn_post_norm
            .as_ref()
            .ok_or_else(|| missing(format!("blk.{il}.post_ffw_norm.weight")))?;
        norm_rows(&mut d, post, eps);
        ops::add_in_place(&mut x, &d);
        dump(format_args!("l_out-{il}"), &x);
    }

    // Outputs: final norm of the rows that want logits, the output projection, the final soft-cap.
    let out_idx: Vec<usize> = (0..n).filter(|&i| b.logits[i]).collect();
    let n_out = out_idx.len();
    let out_norm = w
        .output_norm
        .as_ref()
        .ok_or_else(|| missing("output_norm.weight".into()))?;
    let mut hout = vec![0.0f32; n_out * e];
    for (r, &i) in out_idx.iter().enumerate() {
        let row = &mut hout[r * e..(r + 1) * e];
        row.copy_from_slice(&x[i * e..(i + 1) * e]);
        ops::rms_norm(row, out_norm, eps);
    }
    dump(format_args!("result_norm"), &hout);
    let output = w
        .output
        .as_ref()
        .ok_or_else(|| missing("output.weight".into()))?;
    ctx.logits = if n_out > 0 {
        let mut l = mm(&ctx.pool, file, output, &hout, n_out)?;
        if gh.final_softcap > 0.0 {
            ops::softcap(&mut l, gh.final_softcap);
        }
        l
    } else {
        Vec::new()
    };
    dump(format_args!("result_output"), &ctx.logits);
    ctx.n_outputs = n_out;
    if ctx.params.embeddings {
        ctx.embeddings = hout;
        ctx.n_embeddings = n_out;
    } else {
        ctx.embeddings.clear();
        ctx.n_embeddings = 0;
    }
    Ok(())
}
