//! Helpers of the engine tests on the shared real models: loading one, its llama.cpp vectors, the
//! batch-invariance check (a token's logits must not depend on batch size, thread count or other
//! sequences in the batch), and the argmax the comparisons use.

use std::path::Path;
use std::sync::Arc;

use cyber_inference::engine::model::{Batch, Context, ContextParams, KvType, Model, ModelParams};

use super::assets::{model, shared_vector_json};

/// Loads the shared model `name` with one thread.
pub fn load(name: &str) -> Arc<Model> {
    load_path(&model(name), 1)
}

/// Loads the GGUF at `path` with `n_threads`; panics naming the file when it cannot.
pub fn load_path(path: &Path, n_threads: usize) -> Arc<Model> {
    Model::load(
        path,
        &ModelParams {
            n_threads,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// `../shared/vectors/NAME.json` (llama.cpp's answers on model file `name`) parsed.
pub fn vectors(name: &str) -> serde_json::Value {
    shared_vector_json(&format!("{name}.json"))
}

/// Index of the largest value (the first of equal ones, as numpy's argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `n` deterministic ordinary token ids spread over the vocabulary.
pub fn prompt(model: &Model, n: usize, salt: usize) -> Vec<u32> {
    (0..n)
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
            type_k: KvType::F16,
            type_v: KvType::F16,
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
    for i in 0..tokens.len() {
        b.push(other[i], i as u32, 2, i % 3 == 0);
        b.push(tokens[i], i as u32, 1, true);
    }
    c.decode(&b).expect("decode");
    // Outputs come in batch order: the other sequence's every third, ours every one.
    let mut out = Vec::new();
    let mut k = 0;
    for i in 0..tokens.len() {
        if i % 3 == 0 {
            k += 1;
        }
        out.push(c.logits(k).to_vec());
        k += 1;
    }
    out
}

/// Panics naming the first position and logit whose bits differ.
pub fn assert_bits_equal(what: &str, a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len(), "{what}: output count");
    for (pos, (x, y)) in a.iter().zip(b).enumerate() {
        if let Some(j) = (0..x.len()).find(|&j| x[j].to_bits() != y[j].to_bits()) {
            panic!("{what}: position {pos}, logit {j}: {} vs {}", x[j], y[j]);
        }
    }
}

/// A decoder's logits of every position of an `n`-token prompt are bit-identical in one batch, in batches
/// of 7, token by token and interleaved with another sequence, at 1 and 2 threads (`name` for messages).
pub fn check_decoder(model: &Arc<Model>, name: &str, n: usize) {
    let tokens = prompt(model, n, 0);
    let other = prompt(model, n, 1);
    let reference = logits_chunked(model, 1, &tokens, n);
    assert!(reference.iter().flatten().all(|v| v.is_finite()));
    for threads in [1, 2] {
        if threads != 1 {
            assert_bits_equal(
                &format!("{name} one batch, {threads} threads"),
                &reference,
                &logits_chunked(model, threads, &tokens, n),
            );
        }
        assert_bits_equal(
            &format!("{name} batches of 7, {threads} threads"),
            &reference,
            &logits_chunked(model, threads, &tokens, 7),
        );
        assert_bits_equal(
            &format!("{name} token by token, {threads} threads"),
            &reference,
            &logits_chunked(model, threads, &tokens, 1),
        );
        assert_bits_equal(
            &format!("{name} beside another sequence, {threads} threads"),
            &reference,
            &logits_interleaved(model, threads, &tokens, &other),
        );
    }
}
