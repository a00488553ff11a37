//! The forward passes: the llama family (llama, qwen2, qwen3, phi3, and the MoE models through `moe`) over the KV cache, and BERT encoders over
//! whole sequences. Every step works per token row (matmul rows, norms, rope) or per token over its own
//! sequence in position order (attention), so outputs do not depend on batch composition.
//!
//! Graphs ported from llama.cpp commit 0c1e570: `src/models/llama.cpp`, `src/models/qwen2.cpp`,
//! `src/models/qwen3.cpp`, `src/models/phi3.cpp`, `src/models/bert.cpp`, and `src/llama-graph.cpp`
//! (`build_attn_mha`, `build_ffn`, `build_moe_ffn`, `build_pooling`).

use crate::engine::kernels::ops::{self, RopeParams};

use super::hparams::{Arch, Pooling};
use super::kv_cache::KvSide;
use super::linalg::{self, Pool};
use super::weights::Linear;
use super::{Batch, Context, ModelError};
use super::{moe, phi3};

/// Runs the forward pass of `b` (already validated) and stores the outputs in `ctx`.
pub(super) fn run(ctx: &mut Context, b: &Batch) -> Result<(), ModelError> {
    // gemma
    if matches!(ctx.model.hp.arch, Arch::Gemma2 | Arch::Gemma3) {
        return super::gemma::run(ctx, b);
    }
    if ctx.model.is_encoder() {
        run_encoder(ctx, b)
    } else {
        run_decoder(ctx, b)
    }
}

/// Debugging aid: with `CYBER_INFERENCE_DUMP_DIR` set, writes `data` as raw little-endian f32 to
/// `DIR/NAME.f32` (names as llama.cpp's graph callback sees them), to compare against llama.cpp op by op.
/// The name is formatted only when dumping is on, so the forward pass allocates nothing for it otherwise.
pub(super) fn dump(name: std::fmt::Arguments<'_>, data: &[f32]) {
    static DIR: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(dir) = DIR.get_or_init(|| std::env::var("CYBER_INFERENCE_DUMP_DIR").ok()) {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let _ = std::fs::write(format!("{dir}/{name}.f32"), bytes);
    }
}

/// `x · wᵀ` into a new `[n, w.n_rows]` buffer (see [`linalg::matmul`]).
pub(super) fn mm(
    pool: &Pool,
    ctx_file: &crate::engine::gguf::GgufFile,
    w: &Linear,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>, ModelError> {
    let mut y = vec![0.0f32; n * w.n_rows];
    linalg::matmul(pool, ctx_file, w, x, n, &mut y)?;
    Ok(y)
}

/// Groups batch indices by sequence, in order of first appearance: `(seq, [token indices])`.
pub(super) fn group_by_seq(b: &Batch) -> Vec<(u32, Vec<usize>)> {
    let mut groups: Vec<(u32, Vec<usize>)> = Vec::new();
    for (i, &s) in b.seq_id.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == s) {
            Some((_, v)) => v.push(i),
            None => groups.push((s, vec![i])),
        }
    }
    groups
}

fn run_decoder(ctx: &mut Context, b: &Batch) -> Result<(), ModelError> {
    let model = ctx.model.clone();
    let hp = &model.hp;
    let w = &model.weights;
    let file = &*model.file;
    let n = b.tokens.len();
    let e = hp.n_embd;
    let hd = hp.head_dim;
    let nq = hp.n_embd_q();
    let nkv = hp.n_embd_kv();
    let gqa = hp.n_head / hp.n_head_kv;
    // phi3 scales Q before attention and attends with scale 1.
    let q_prescale = phi3::prescales_q(hp.arch).then(|| 1.0 / (hd as f32).sqrt());
    let kq_scale = if q_prescale.is_some() {
        1.0
    } else {
        1.0 / (hd as f32).sqrt()
    };
    let rope = RopeParams {
        n_dims: hp.rope_n_dims,
        freq_base: hp.rope_freq_base,
        freq_scale: hp.rope_freq_scale,
        mode: hp.arch.rope_mode(),
    };
    // Rope tables per token (each depends only on its position); frequency factors: rope_freqs
    // (Llama 3.x) or phi3's long/short LongRoPE factors for this context size.
    let rope_factors = phi3::rope_factors(w, hp, ctx.params.n_ctx);
    let rope_tables: Vec<(Vec<f32>, Vec<f32>)> = b
        .pos
        .iter()
        .map(|&p| ops::rope_cache_scaled(&rope, p, rope_factors, hp.rope_attn_factor))
        .collect();
    let groups = group_by_seq(b);
    let shape = AttnShape {
        n_head: hp.n_head,
        head_dim: hd,
        gqa,
        nq,
        nkv,
        kq_scale,
    };

    // Token embeddings: inpL = get_rows(tok_embd, tokens).
    let mut x = vec![0.0f32; n * e];
    for (i, &t) in b.tokens.iter().enumerate() {
        linalg::get_row(file, &w.tok_embd, t as usize, &mut x[i * e..(i + 1) * e])?;
    }

    let kv = ctx
        .kv
        .as_mut()
        .ok_or_else(|| ModelError::Unsupported("decoder context without a KV cache".into()))?;
    let mut h = vec![0.0f32; n * e];
    // Layers `gpu_from..` (and maybe the output) run on the GPU (`-ngl`).
    let gpu_from = model.gpu.as_ref().map_or(w.layers.len(), |g| g.first_layer);
    for (il, layer) in w.layers.iter().enumerate().take(gpu_from) {
        // Attention block: norm → q, k, v → (bias) → (q/k norm) → rope → cache → attention → wo.
        h.copy_from_slice(&x);
        for row in h.chunks_exact_mut(e) {
            ops::rms_norm(row, &layer.attn_norm, hp.norm_eps);
        }
        dump(format_args!("attn_norm-{il}"), &h);
        let mut q = mm(&ctx.pool, file, &layer.wq, &h, n)?;
        let mut k = mm(&ctx.pool, file, &layer.wk, &h, n)?;
        let mut v = mm(&ctx.pool, file, &layer.wv, &h, n)?;
        dump(format_args!("Qcur-{il}.0"), &q);
        dump(format_args!("Kcur-{il}.0"), &k);
        dump(format_args!("Vcur-{il}.0"), &v);
        if let Some(bq) = &layer.bq {
            ops::add_bias(&mut q, bq);
        }
        if let Some(bk) = &layer.bk {
            ops::add_bias(&mut k, bk);
        }
        if let Some(bv) = &layer.bv {
            ops::add_bias(&mut v, bv);
        }
        if let Some(qn) = &layer.q_norm {
            for head in q.chunks_exact_mut(hd) {
                ops::rms_norm(head, qn, hp.norm_eps);
            }
        }
        if let Some(kn) = &layer.k_norm {
            for head in k.chunks_exact_mut(hd) {
                ops::rms_norm(head, kn, hp.norm_eps);
            }
        }
        for i in 0..n {
            let (c, s) = &rope_tables[i];
            ops::rope(
                &mut q[i * nq..(i + 1) * nq],
                hd,
                rope.n_dims,
                rope.mode,
                c,
                s,
            );
            ops::rope(
                &mut k[i * nkv..(i + 1) * nkv],
                hd,
                rope.n_dims,
                rope.mode,
                c,
                s,
            );
        }
        if let Some(scale) = q_prescale {
            q.iter_mut().for_each(|v| *v *= scale);
        }
        // A quantized cache stores keys and values rotated by a Walsh–Hadamard matrix (the query
        // with the keys' one, so scores are unchanged; the output rotated back after attention).
        kv.rotate_qkv(&mut q, &mut k, &mut v);
        for i in 0..n {
            kv.write(
                il,
                b.seq_id[i] as usize,
                b.pos[i] as usize,
                &k[i * nkv..(i + 1) * nkv],
                &v[i * nkv..(i + 1) * nkv],
            );
        }
        dump(format_args!("Qcur-{il}.2"), &q);
        dump(format_args!("Kcur-{il}.2"), &k);
        let mut attn = vec![0.0f32; n * nq];
        for (seq, idx) in &groups {
            let last = idx.iter().map(|&i| b.pos[i] as usize).max().unwrap_or(0);
            let items: Vec<(usize, usize)> =
                idx.iter().map(|&i| (i, b.pos[i] as usize + 1)).collect();
            let view = kv.view(il, *seq as usize, last + 1);
            let rows = match (view.k, view.v) {
                (KvSide::F16(k), KvSide::F16(v)) => Kv::F16(k, v),
                (KvSide::F32(k), KvSide::F32(v)) => Kv::F32(k, v),
                (k, v) => Kv::Mixed(k, v),
            };
            attention(&ctx.pool, &shape, &q, rows, &items, &mut attn);
        }
        kv.rotate_back(&mut attn);
        dump(format_args!("kqv_out-{il}"), &attn);
        let mut o = mm(&ctx.pool, file, &layer.wo, &attn, n)?;
        if let Some(bo) = &layer.bo {
            ops::add_bias(&mut o, bo);
        }
        dump(format_args!("attn_out-{il}"), &o);
        ops::add_in_place(&mut x, &o);
        dump(format_args!("ffn_inp-{il}"), &x);

        // FFN block: norm → silu(gate)·up → down (or the routed experts), residual.
        h.copy_from_slice(&x);
        for row in h.chunks_exact_mut(e) {
            ops::rms_norm(row, &layer.ffn_norm, hp.norm_eps);
        }
        if let Some(m) = &layer.moe {
            dump(format_args!("ffn_norm-{il}"), &h);
            let d = moe::ffn(&ctx.pool, file, layer, m, &h, n, e)?;
            dump(format_args!("ffn_moe_out-{il}"), &d);
            ops::add_in_place(&mut x, &d);
            dump(format_args!("l_out-{il}"), &x);
            continue;
        }
        let gate_w = layer
            .ffn_gate
            .as_ref()
            .ok_or_else(|| ModelError::MissingTensor(format!("blk.{il}.ffn_gate.weight")))?;
        dump(format_args!("ffn_norm-{il}"), &h);
        let mut g = mm(&ctx.pool, file, gate_w, &h, n)?;
        let u = mm(&ctx.pool, file, &layer.ffn_up, &h, n)?;
        dump(format_args!("ffn_gate-{il}"), &g);
        dump(format_args!("ffn_up-{il}"), &u);
        ops::swiglu(&mut g, &u);
        dump(format_args!("ffn_swiglu-{il}"), &g);
        let d = mm(&ctx.pool, file, &layer.ffn_down, &g, n)?;
        dump(format_args!("ffn_out-{il}"), &d);
        ops::add_in_place(&mut x, &d);
        dump(format_args!("l_out-{il}"), &x);
    }

    // Outputs: final norm of the rows that want logits, then the output projection.
    let out_idx: Vec<usize> = (0..n).filter(|&i| b.logits[i]).collect();
    let n_out = out_idx.len();
    if let Some(g) = &model.gpu {
        let dev = kv.device().ok_or_else(|| {
            ModelError::Unsupported("an offloaded model's context without a GPU cache".into())
        })?;
        let out = g
            .forward(
                dev,
                &x,
                &b.seq_id,
                &b.pos,
                &rope_tables,
                &out_idx,
                ctx.params.embeddings,
            )
            .map_err(|e| ModelError::Unsupported(e.to_string()))?;
        match out {
            crate::engine::gpu::llama::GpuOut::Logits { logits, hidden } => {
                ctx.logits = logits;
                ctx.n_outputs = n_out;
                match hidden {
                    Some(hout) => {
                        ctx.embeddings = hout;
                        ctx.n_embeddings = n_out;
                    }
                    None => {
                        ctx.embeddings.clear();
                        ctx.n_embeddings = 0;
                    }
                }
                return Ok(());
            }
            crate::engine::gpu::llama::GpuOut::Hidden(hx) => x = hx,
        }
    }
    let mut hout = vec![0.0f32; n_out * e];
    let out_norm = w
        .output_norm
        .as_ref()
        .ok_or_else(|| ModelError::MissingTensor("output_norm.weight".into()))?;
    for (r, &i) in out_idx.iter().enumerate() {
        let row = &mut hout[r * e..(r + 1) * e];
        row.copy_from_slice(&x[i * e..(i + 1) * e]);
        ops::rms_norm(row, out_norm, hp.norm_eps);
    }
    let output = w
        .output
        .as_ref()
        .ok_or_else(|| ModelError::MissingTensor("output.weight".into()))?;
    ctx.logits = if n_out > 0 {
        mm(&ctx.pool, file, output, &hout, n_out)?
    } else {
        Vec::new()
    };
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

fn run_encoder(ctx: &mut Context, b: &Batch) -> Result<(), ModelError> {
    let model = ctx.model.clone();
    let hp = &model.hp;
    debug_assert_eq!(hp.arch, Arch::Bert);
    let w = &model.weights;
    let file = &*model.file;
    let n = b.tokens.len();
    let e = hp.n_embd;
    let hd = hp.head_dim;
    let nq = hp.n_embd_q();
    let nkv = hp.n_embd_kv();
    let gqa = hp.n_head / hp.n_head_kv;
    let kq_scale = 1.0 / (hd as f32).sqrt();
    let missing = |s: &str| ModelError::MissingTensor(s.to_string());
    let pos_embd = w
        .pos_embd
        .as_ref()
        .ok_or_else(|| missing("position_embd.weight"))?;
    let type0 = w
        .type_embd0
        .as_ref()
        .ok_or_else(|| missing("token_types.weight"))?;
    let (tn_w, tn_b) = w
        .tok_norm
        .as_ref()
        .ok_or_else(|| missing("token_embd_norm.weight"))?;
    let groups = group_by_seq(b);
    let shape = AttnShape {
        n_head: hp.n_head,
        head_dim: hd,
        gqa,
        nq,
        nkv,
        kq_scale,
    };

    // inpL = norm(tok_embd[token] + type_embd[0] + pos_embd[pos]).
    let mut x = vec![0.0f32; n * e];
    for (i, &t) in b.tokens.iter().enumerate() {
        let row = &mut x[i * e..(i + 1) * e];
        linalg::get_row(file, &w.tok_embd, t as usize, row)?;
        let p = b.pos[i] as usize;
        let pe = pos_embd
            .get(p * e..(p + 1) * e)
            .ok_or_else(|| ModelError::ContextFull {
                seq: b.seq_id[i],
                pos: b.pos[i],
                n_ctx: pos_embd.len() / e,
            })?;
        ops::add_in_place(row, type0);
        ops::add_in_place(row, pe);
        ops::layer_norm(row, tn_w, tn_b, hp.norm_eps);
    }

    for (il, layer) in w.layers.iter().enumerate() {
        let mut q = mm(&ctx.pool, file, &layer.wq, &x, n)?;
        let mut k = mm(&ctx.pool, file, &layer.wk, &x, n)?;
        let mut v = mm(&ctx.pool, file, &layer.wv, &x, n)?;
        for (m, bias) in [
            (&mut q, &layer.bq),
            (&mut k, &layer.bk),
            (&mut v, &layer.bv),
        ] {
            if let Some(bias) = bias {
                ops::add_bias(m, bias);
            }
        }
        // Non-causal attention over each sequence's own tokens, in position order.
        let mut attn = vec![0.0f32; n * nq];
        for (_, idx) in &groups {
            let m = idx.len();
            let mut kbuf = vec![0.0f32; m * nkv];
            let mut vbuf = vec![0.0f32; m * nkv];
            for (j, &i) in idx.iter().enumerate() {
                let p = b.pos[i] as usize;
                debug_assert_eq!(p, j, "validated: positions 0.. in order");
                kbuf[j * nkv..(j + 1) * nkv].copy_from_slice(&k[i * nkv..(i + 1) * nkv]);
                vbuf[j * nkv..(j + 1) * nkv].copy_from_slice(&v[i * nkv..(i + 1) * nkv]);
            }
            let items: Vec<(usize, usize)> = idx
                .iter()
                .map(|&i| (i, if hp.causal { b.pos[i] as usize + 1 } else { m }))
                .collect();
            attention(
                &ctx.pool,
                &shape,
                &q,
                Kv::F32(&kbuf, &vbuf),
                &items,
                &mut attn,
            );
        }
        let mut o = mm(&ctx.pool, file, &layer.wo, &attn, n)?;
        if let Some(bo) = &layer.bo {
            ops::add_bias(&mut o, bo);
        }
        ops::add_in_place(&mut x, &o);
        let ab = layer
            .attn_norm_b
            .as_ref()
            .ok_or_else(|| missing(&format!("blk.{il}.attn_output_norm.bias")))?;
        for row in x.chunks_exact_mut(e) {
            ops::layer_norm(row, &layer.attn_norm, ab, hp.norm_eps);
        }
        // FFN: up (+b) → GELU → down (+b), residual, layer norm.
        let mut u = mm(&ctx.pool, file, &layer.ffn_up, &x, n)?;
        if let Some(ub) = &layer.ffn_up_b {
            ops::add_bias(&mut u, ub);
        }
        ops::gelu(&mut u);
        let mut d = mm(&ctx.pool, file, &layer.ffn_down, &u, n)?;
        if let Some(db) = &layer.ffn_down_b {
            ops::add_bias(&mut d, db);
        }
        ops::add_in_place(&mut x, &d);
        let fb = layer
            .ffn_norm_b
            .as_ref()
            .ok_or_else(|| missing(&format!("blk.{il}.layer_output_norm.bias")))?;
        for row in x.chunks_exact_mut(e) {
            ops::layer_norm(row, &layer.ffn_norm, fb, hp.norm_eps);
        }
    }

    ctx.logits.clear();
    ctx.n_outputs = 0;
    ctx.embeddings.clear();
    match ctx.pooling_override.unwrap_or(hp.pooling) {
        Pooling::None => {
            let mut k = 0;
            for i in (0..n).filter(|&i| b.logits[i]) {
                ctx.embeddings.extend_from_slice(&x[i * e..(i + 1) * e]);
                k += 1;
            }
            ctx.n_embeddings = k;
        }
        pooling => {
            for (_, idx) in &groups {
                let rows: Vec<&[f32]> = idx.iter().map(|&i| &x[i * e..(i + 1) * e]).collect();
                // Rank keeps the row its head starts from (see `Context::embeddings`).
                let pooled = match pooling {
                    Pooling::Cls => rows[0].to_vec(),
                    Pooling::Rank if !hp.rank_mean => rows[0].to_vec(),
                    Pooling::Last => rows[rows.len() - 1].to_vec(),
                    _ => mean_rows(&rows, e),
                };
                ctx.embeddings.extend_from_slice(&pooled);
            }
            ctx.n_embeddings = groups.len();
        }
    }
    Ok(())
}

/// Rank pooling (rerankers): the `n_cls_out` scores of one sequence from its final hidden rows
/// `rows` (each `[n_embd]`, in position order), as llama.cpp's `llm_graph_context::build_pooling`
/// (`src/llama-graph.cpp`, case `LLAMA_POOLING_TYPE_RANK`) computes them for BERT: the first row (the
/// mean of the rows when `{arch}.classifier.pooling_type` is mean), then, when the model has
/// `cls.weight`, `tanh(cls · x + cls.bias)`, then, when it has `cls.output.weight`,
/// `cls.output · x + cls.output.bias`; the scores are the first `n_cls_out` values of the result
/// (`llama_context::encode` copies `n_cls_out` floats per sequence).
///
/// Errors: [`ModelError::Unsupported`] when there are no rows or the result is shorter than
/// `n_cls_out` (no `cls.output` and more labels than `n_embd`); matmul errors.
pub(super) fn rank_head(ctx: &Context, rows: &[&[f32]]) -> Result<Vec<f32>, ModelError> {
    let model = &ctx.model;
    let hp = &model.hp;
    let w = &model.weights;
    let file = &*model.file;
    let Some(first) = rows.first() else {
        return Err(ModelError::Unsupported("rank pooling of no tokens".into()));
    };
    let mut cur = if hp.rank_mean {
        mean_rows(rows, hp.n_embd)
    } else {
        first.to_vec()
    };
    if let Some(cls) = &w.cls {
        cur = mm(&ctx.pool, file, cls, &cur, 1)?;
        if let Some(b) = &w.cls_b {
            ops::add_bias(&mut cur, b);
        }
        cur.iter_mut().for_each(|v| *v = v.tanh());
    }
    if let Some(out) = &w.cls_out {
        cur = mm(&ctx.pool, file, out, &cur, 1)?;
        if let Some(b) = &w.cls_out_b {
            ops::add_bias(&mut cur, b);
        }
    }
    if cur.len() < hp.n_cls_out {
        return Err(ModelError::Unsupported(format!(
            "rank pooling gives {} values but the model has {} classifier labels (no cls.output.weight)",
            cur.len(),
            hp.n_cls_out
        )));
    }
    cur.truncate(hp.n_cls_out);
    Ok(cur)
}

/// Dimensions of multi-head attention with grouped KV heads.
struct AttnShape {
    n_head: usize,
    head_dim: usize,
    /// Query heads per KV head.
    gqa: usize,
    /// Width of a token's Q (`n_head · head_dim`).
    nq: usize,
    /// Width of a token's K or V (`n_head_kv · head_dim`).
    nkv: usize,
    kq_scale: f32,
}

/// Keys and values of one sequence, `[n_pos, nkv]` each: f16 from the default KV cache, f32 (an f32
/// cache, or an encoder's own activations), or any other pair of cache types (`-ctk`/`-ctv`).
#[derive(Clone, Copy)]
enum Kv<'a> {
    F16(&'a [half::f16], &'a [half::f16]),
    F32(&'a [f32], &'a [f32]),
    Mixed(KvSide<'a>, KvSide<'a>),
}

/// Attention for the tokens `items` (`(batch index, number of visible positions)`) of one sequence whose
/// keys and values are `kv` (`[n_pos, nkv]` each): for each token and head, `softmax(q·kᵀ·scale)·v` over the
/// first `n_kv` positions, in position order. f16 keys/values take ggml's CPU flash-attention arithmetic
/// ([`ops::attend_one_f16`], what llama.cpp runs by default); f32 ones the exact softmax of `build_attn_mha`
/// ([`ops::attend_one`]); quantized or mixed types flash attention reading the cache in place
/// ([`ops::attend_one_raw`]). Writes `attn[i]` rows (`[n_tokens, nq]`). Work is split over (token, head) pairs
/// when large enough; each pair is computed by the same code whatever the split, so results do not depend on
/// the thread count or the batch.
fn attention(
    pool: &Pool,
    s: &AttnShape,
    q: &[f32],
    kv: Kv<'_>,
    items: &[(usize, usize)],
    attn: &mut [f32],
) {
    let hd = s.head_dim;
    // One unit of work: the `gqa` query heads of KV group `g` for batch token `i` (their rows are
    // contiguous in `q` and `attn`).
    let width = s.gqa * hd;
    let row = |j: usize, g: usize| j * s.nkv + g * hd..j * s.nkv + (g + 1) * hd;
    let one = |i: usize,
               n_kv: usize,
               g: usize,
               scores: &mut Vec<f32>,
               scratch: &mut ops::AttnScratch,
               out: &mut [f32]| {
        let qg = &q[i * s.nq + g * width..i * s.nq + (g + 1) * width];
        match kv {
            Kv::F16(k, v) => ops::attend_heads_f16(
                qg,
                hd,
                n_kv,
                s.kq_scale,
                |j| &k[row(j, g)],
                |j| &v[row(j, g)],
                scratch,
                out,
            ),
            Kv::Mixed(k, v) => {
                for (qh, oh) in qg.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                    ops::attend_one_raw(
                        qh,
                        n_kv,
                        s.kq_scale,
                        0.0,
                        k.ggml_type(),
                        |j| k.head(j, g, hd, s.nkv),
                        v.ggml_type(),
                        |j| v.head(j, g, hd, s.nkv),
                        &mut scratch.raw,
                        oh,
                    );
                }
            }
            Kv::F32(k, v) => {
                scores.resize(n_kv.max(scores.len()), 0.0);
                for (qh, oh) in qg.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
                    ops::attend_one(
                        qh,
                        n_kv,
                        s.kq_scale,
                        |j| &k[row(j, g)],
                        |j| &v[row(j, g)],
                        scores,
                        oh,
                    );
                }
            }
        }
    };
    let n_groups = s.n_head / s.gqa;
    let work: usize = items.iter().map(|&(_, n_kv)| n_kv).sum::<usize>() * s.n_head * hd;
    for_each_head_group(
        pool,
        items,
        n_groups,
        width,
        s.nq,
        work,
        |&(i, _)| i,
        |&(i, n_kv), g, (scores, scratch), out| one(i, n_kv, g, scores, scratch, out),
        attn,
    );
}

/// Scratch space of one attention task: a score buffer and the flash-attention accumulators.
pub(super) type AttnTaskScratch = (Vec<f32>, ops::AttnScratch);

/// Runs `one(item, g, scratch, out)` for every (item, KV group `g`) pair, writing the group's `width`
/// values of the item's row `row_of(item)` of `attn` (`[n_tokens, nq]`): on this thread when `work`
/// (multiply-adds) is small or there is one thread, else split over the pool in contiguous runs of
/// pairs (`min(4·threads, pairs)` tasks). Each pair is computed by the same code whatever the split, so
/// results do not depend on threads or batching. The one place the attention of every architecture is
/// scheduled.
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_head_group<T: Sync>(
    pool: &Pool,
    items: &[T],
    n_groups: usize,
    width: usize,
    nq: usize,
    work: usize,
    row_of: impl Fn(&T) -> usize + Sync,
    one: impl Fn(&T, usize, &mut AttnTaskScratch, &mut [f32]) + Sync,
    attn: &mut [f32],
) {
    let pairs = items.len() * n_groups;
    let cols = |g: usize| g * width..(g + 1) * width;
    if pool.n_threads() == 1 || pairs < 2 || work < 1 << 16 {
        let mut scratch = AttnTaskScratch::default();
        for item in items {
            let r = row_of(item) * nq;
            for g in 0..n_groups {
                let c = cols(g);
                one(item, g, &mut scratch, &mut attn[r + c.start..r + c.end]);
            }
        }
        return;
    }
    let n_tasks = (pool.n_threads() * 4).min(pairs);
    let per = pairs.div_ceil(n_tasks);
    let results: Vec<std::sync::Mutex<Vec<f32>>> = (0..n_tasks)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    pool.parallel_for(n_tasks, |t| {
        let (p0, p1) = (t * per, ((t + 1) * per).min(pairs));
        let mut local = vec![0.0f32; p1.saturating_sub(p0) * width];
        let mut scratch = AttnTaskScratch::default();
        for p in p0..p1 {
            let out = &mut local[(p - p0) * width..(p - p0 + 1) * width];
            one(&items[p / n_groups], p % n_groups, &mut scratch, out);
        }
        *results[t].lock().unwrap_or_else(|e| e.into_inner()) = local;
    });
    for (t, r) in results.into_iter().enumerate() {
        let local = r.into_inner().unwrap_or_else(|e| e.into_inner());
        for (off, chunk) in local.chunks_exact(width).enumerate() {
            let p = t * per + off;
            let (r, c) = (row_of(&items[p / n_groups]) * nq, cols(p % n_groups));
            attn[r + c.start..r + c.end].copy_from_slice(chunk);
        }
    }
}

/// Mean of `rows` (each `[n]`), summed in row order in f32 then divided by the count
/// (`build_pooling` mean: a matmul with a `1/n` matrix).
pub(super) fn mean_rows(rows: &[&[f32]], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    if rows.is_empty() {
        return out;
    }
    let inv = 1.0 / rows.len() as f32;
    for r in rows {
        ops::axpy(&mut out, inv, r);
    }
    out
}
