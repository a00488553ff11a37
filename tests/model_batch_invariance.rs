//! Batch invariance on the shared models: a token's logits (or a sequence's embedding) are bit-identical
//! whether computed in one batch, in batches of 7, token by token, or beside another sequence, at 1 and 2
//! threads. (Gemma 3 past its sliding window: `tests/model_gemma.rs`.)

mod support;

use cyber_inference::engine::model::{Batch, Context, ContextParams};
use support::assets::{GEMMA3, MINILM, SMOL_Q4_1, SMOL_Q4_K_M};
use support::model::*;

const N: usize = 64;

#[test]
fn smollm2_q4_1_logits_are_batch_invariant() {
    check_decoder(&load(SMOL_Q4_1), SMOL_Q4_1, N);
}

#[test]
fn smollm2_q4_k_m_logits_are_batch_invariant() {
    check_decoder(&load(SMOL_Q4_K_M), SMOL_Q4_K_M, N);
}

#[test]
fn gemma3_logits_are_batch_invariant() {
    check_decoder(&load(GEMMA3), GEMMA3, N);
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
