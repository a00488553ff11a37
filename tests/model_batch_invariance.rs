//! Batch invariance on the shared models: a token's logits (or a sequence's embedding) are bit-identical
//! whether computed in one batch, in batches of 7, token by token, or beside another sequence, at 1 and 2
//! threads. (Gemma 3 past its sliding window: `tests/model_gemma.rs`.)

mod model_common;

use std::sync::Arc;

use cyber_inference::engine::model::{Batch, Context, ContextParams, KvType, Model};
use model_common::*;

const N: usize = 64;

fn prompt(model: &Model, salt: usize) -> Vec<u32> {
    // Deterministic ordinary token ids spread over the vocabulary.
    (0..N)
        .map(|i| ((i * 7919 + salt * 104_729 + 1000) % (model.n_vocab() - 1000)) as u32 + 500)
        .collect()
}

fn ctx(model: &Arc<Model>, threads: usize, n_seq: usize) -> Context {
    Context::new(
        model.clone(),
        ContextParams {
            n_ctx: 128,
            n_seq_max: n_seq,
            n_batch: 128,
            n_threads: threads,
            embeddings: false,
            kv_type: KvType::F16,
        },
    )
    .expect("context")
}

/// Logits of every position, processing `tokens` (sequence 0) in chunks of `chunk`.
fn logits_chunked(
    model: &Arc<Model>,
    threads: usize,
    tokens: &[u32],
    chunk: usize,
) -> Vec<Vec<f32>> {
    let mut c = ctx(model, threads, 1);
    let mut out = Vec::new();
    for (k, part) in tokens.chunks(chunk).enumerate() {
        let mut b = Batch::single(part, (k * chunk) as u32, 0);
        b.logits.iter_mut().for_each(|l| *l = true);
        c.decode(&b).expect("decode");
        for i in 0..part.len() {
            out.push(c.logits(i).to_vec());
        }
    }
    out
}

/// Logits of every position of sequence 1 when its tokens are interleaved with another sequence's.
fn logits_interleaved(
    model: &Arc<Model>,
    threads: usize,
    tokens: &[u32],
    other: &[u32],
) -> Vec<Vec<f32>> {
    let mut c = ctx(model, threads, 3);
    let mut b = Batch::default();
    for i in 0..N {
        b.push(other[i], i as u32, 2, i % 3 == 0);
        b.push(tokens[i], i as u32, 1, true);
    }
    c.decode(&b).expect("decode");
    // Outputs come in batch order: the other sequence's every third, ours every one.
    let mut out = Vec::new();
    let mut k = 0;
    for i in 0..N {
        if i % 3 == 0 {
            k += 1;
        }
        out.push(c.logits(k).to_vec());
        k += 1;
    }
    out
}

fn assert_bits_equal(what: &str, a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len(), "{what}: output count");
    for (pos, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some(j) = (0..x.len()).find(|&j| x[j].to_bits() != y[j].to_bits()) {
            panic!("{what}: position {pos}, logit {j}: {} vs {}", x[j], y[j]);
        }
    }
}

fn check_decoder(name: &str) {
    let model = load(name);
    let tokens = prompt(&model, 0);
    let other = prompt(&model, 1);
    let reference = logits_chunked(&model, 1, &tokens, N);
    assert!(reference.iter().flatten().all(|v| v.is_finite()));
    for threads in [1, 2] {
        if threads != 1 {
            assert_bits_equal(
                &format!("{name} one batch, {threads} threads"),
                &reference,
                &logits_chunked(&model, threads, &tokens, N),
            );
        }
        assert_bits_equal(
            &format!("{name} batches of 7, {threads} threads"),
            &reference,
            &logits_chunked(&model, threads, &tokens, 7),
        );
        assert_bits_equal(
            &format!("{name} token by token, {threads} threads"),
            &reference,
            &logits_chunked(&model, threads, &tokens, 1),
        );
        assert_bits_equal(
            &format!("{name} beside another sequence, {threads} threads"),
            &reference,
            &logits_interleaved(&model, threads, &tokens, &other),
        );
    }
}

#[test]
fn smollm2_q4_1_logits_are_batch_invariant() {
    check_decoder(SMOL_Q4_1);
}

#[test]
fn smollm2_q4_k_m_logits_are_batch_invariant() {
    check_decoder(SMOL_Q4_K_M);
}

#[test]
fn gemma3_logits_are_batch_invariant() {
    check_decoder(GEMMA3);
}

#[test]
fn minilm_embeddings_are_batch_invariant() {
    let model = load(MINILM);
    // [CLS] … [SEP] sequences of different lengths.
    let seq = |n: usize, salt: usize| -> Vec<u32> {
        let mut v = vec![101u32];
        v.extend((0..n).map(|i| ((i * 7919 + salt * 31) % 20000) as u32 + 1000));
        v.push(102);
        v
    };
    let a = seq(N - 2, 0);
    let b = seq(20, 1);
    let embed_alone = |threads: usize| {
        let mut c = Context::new(
            model.clone(),
            ContextParams {
                n_ctx: 512,
                n_batch: 512,
                n_threads: threads,
                embeddings: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut batch = Batch::single(&a, 0, 0);
        batch.logits.iter_mut().for_each(|l| *l = true);
        c.decode(&batch).unwrap();
        c.embeddings(0).to_vec()
    };
    let reference = embed_alone(1);
    for threads in [1, 2] {
        assert_bits_equal(
            &format!("minilm alone, {threads} threads"),
            std::slice::from_ref(&reference),
            &[embed_alone(threads)],
        );
        let mut c = Context::new(
            model.clone(),
            ContextParams {
                n_ctx: 512,
                n_batch: 512,
                n_seq_max: 2,
                n_threads: threads,
                embeddings: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut batch = Batch::default();
        for (i, &t) in b.iter().enumerate() {
            batch.push(t, i as u32, 1, true);
        }
        for (i, &t) in a.iter().enumerate() {
            batch.push(t, i as u32, 0, true);
        }
        c.decode(&batch).unwrap();
        assert_eq!(c.n_embeddings(), 2);
        assert_bits_equal(
            &format!("minilm beside another sequence, {threads} threads"),
            std::slice::from_ref(&reference),
            &[c.embeddings(1).to_vec()],
        );
    }
}
