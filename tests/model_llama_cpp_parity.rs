//! SmolLM2 (Q4_1 and Q4_K_M) and Gemma 3 270M (Q4_K_M) against llama.cpp's answers in
//! `../shared/vectors`: perplexity on ppl.txt within 0.5%, and greedy continuations identical for at
//! least 3 in 4 prompts with every divergence at a near-tie (llama.cpp's two best log-probabilities within
//! 0.1 in the first 16 steps, ours after).
//!
//! Gemma 3's shared vectors were made by an AVX2 build of llama.cpp running its batched prompt kernels, whose
//! rounding differs from its own decode kernels (the repacked Q4_K GEMM accumulates per 64 elements, the GEMV
//! per 256; flash attention switches to a tiled f32 path from 64 query rows) and from its AVX-512 build. The
//! engine is batch-invariant and reproduces llama.cpp's decode arithmetic; this model is so sensitive to
//! rounding that llama.cpp's own AVX-512 build, on the same file, keeps only 5 of the 8 vector continuations
//! (one divergence at a gap of 0.12) and is 0.16% from the vectors' perplexity. So against the shared vectors
//! the greedy check allows divergences at gaps below 0.35 with half the prompts identical; against llama.cpp
//! run token by token (`tests/vectors/gemma-3-270m.Q4_K_M.token-by-token.json`) everything must be identical.

mod support;

use cyber_inference::engine::model::cli::{generate, perplexity};
use cyber_inference::engine::model::{Context, ContextParams, KvType};
use cyber_inference::engine::sampling::{Sampler, SamplerParams, top_logprobs};
use support::assets::{GEMMA3, SMOL_Q4_1, SMOL_Q4_K_M, repo_path, shared_vectors_dir};
use support::files::read_json;
use support::model::*;

fn context(model: &std::sync::Arc<cyber_inference::engine::model::Model>, n_ctx: usize) -> Context {
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

fn check_perplexity(name: &str) {
    let model = load(name);
    let v = vectors(name);
    let p = &v["perplexity"];
    let n_ctx = p["n_ctx"].as_u64().unwrap() as usize;
    let n_batch = p["n_batch"].as_u64().unwrap() as usize;
    let want = p["ppl"].as_f64().unwrap();
    let text = std::fs::read_to_string(shared_vectors_dir().join(p["text_file"].as_str().unwrap()))
        .unwrap();
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let mut ctx = context(&model, n_ctx);
    let r = perplexity(&mut ctx, &tokens, n_ctx, n_batch, add_bos, |_, _| {}).unwrap();
    assert_eq!(
        r.n_chunks as u64,
        p["n_chunks"].as_u64().unwrap(),
        "chunk count"
    );
    let rel = (r.ppl - want).abs() / want;
    eprintln!(
        "{name}: PPL {:.4} (llama.cpp {want}), relative difference {:.4}%",
        r.ppl,
        rel * 100.0
    );
    assert!(
        rel <= 0.005,
        "{name}: PPL {} vs llama.cpp {want}: {:.3}% apart",
        r.ppl,
        rel * 100.0
    );
}

fn check_greedy(name: &str) {
    check_greedy_within(name, 0.1, 3, 4);
}

/// Greedy continuations against the vectors: at least `num/den` of the prompts identical, every
/// divergence at a gap (top-2 log-probabilities) below `near_tie`.
fn check_greedy_within(name: &str, near_tie: f64, num: usize, den: usize) {
    let model = load(name);
    let v = vectors(name);
    let cases = v["greedy"].as_array().unwrap();
    let tok = model.tokenizer();
    let mut ctx = context(&model, 256);
    let mut identical = 0;
    let mut report = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let add_special = case["add_special"].as_bool().unwrap();
        let n_predict = case["n_predict"].as_u64().unwrap() as usize;
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ref_top = case["top_logprobs_first16"].as_array().unwrap();
        let ids = tok.encode(prompt, add_special, true);
        let mut ours_top: Vec<Vec<(u32, f32)>> = Vec::new();
        let mut sampler = Sampler::new(SamplerParams::greedy());
        let got = generate(&mut ctx, &ids, n_predict, &mut sampler, |_, logits| {
            ours_top.push(top_logprobs(logits, 2));
        })
        .unwrap();
        // llama-server's `ids` include the end-of-generation token that stopped it, as ours do.
        let got_cmp = got;
        match (0..want.len().min(got_cmp.len())).find(|&s| want[s] != got_cmp[s]) {
            None if want.len() == got_cmp.len() => identical += 1,
            first => {
                let s = first.unwrap_or(want.len().min(got_cmp.len()));
                let (gap, whose, a, b) = if s < ref_top.len() {
                    let a = ref_top[s][0]["logprob"].as_f64().unwrap();
                    let b = ref_top[s][1]["logprob"].as_f64().unwrap();
                    (a - b, "llama.cpp", a, b)
                } else {
                    let a = ours_top[s][0].1 as f64;
                    let b = ours_top[s][1].1 as f64;
                    (a - b, "ours", a, b)
                };
                let ours = ours_top
                    .get(s)
                    .map(|t| format!("{:.4}/{:.4}", t[0].1, t[1].1))
                    .unwrap_or_default();
                let line = format!(
                    "{name} {prompt:?}: first divergence at step {s} (llama.cpp {:?}, ours {:?}); {whose} top-2 logprobs {a:.4} / {b:.4}, gap {gap:.4}; our top-2 {ours}",
                    want.get(s),
                    got_cmp.get(s)
                );
                eprintln!("{line}");
                report.push((line, gap));
            }
        }
    }
    eprintln!(
        "{name}: {identical}/{} greedy continuations identical to llama.cpp",
        cases.len()
    );
    assert!(
        identical * den >= cases.len() * num,
        "{name}: only {identical}/{} identical",
        cases.len()
    );
    for (line, gap) in report {
        assert!(gap < near_tie, "divergence not at a near-tie: {line}");
    }
}

#[test]
fn smollm2_q4_1_perplexity_matches_llama_cpp() {
    check_perplexity(SMOL_Q4_1);
}

#[test]
fn smollm2_q4_k_m_perplexity_matches_llama_cpp() {
    check_perplexity(SMOL_Q4_K_M);
}

#[test]
fn smollm2_q4_1_greedy_matches_llama_cpp() {
    check_greedy(SMOL_Q4_1);
}

#[test]
fn smollm2_q4_k_m_greedy_matches_llama_cpp() {
    check_greedy(SMOL_Q4_K_M);
}

#[test]
fn gemma3_perplexity_matches_llama_cpp() {
    check_perplexity(GEMMA3);
}

#[test]
fn gemma3_greedy_matches_llama_cpp() {
    check_greedy_within(GEMMA3, 0.35, 1, 2);
}

/// `tests/vectors/gemma-3-270m.Q4_K_M.token-by-token.json` parsed.
fn token_by_token_record() -> serde_json::Value {
    read_json(&repo_path(
        "tests/vectors/gemma-3-270m.Q4_K_M.token-by-token.json",
    ))
}

/// Gemma 3 against llama.cpp run one token per forward pass (`tests/vectors/gemma-3-270m.Q4_K_M.token-by-token.json`,
/// made by `scripts/parity/record_token_by_token.py`: n_ubatch 1, so llama.cpp's prompt goes through its decode
/// kernels too): every greedy continuation of the shared vectors' prompts identical, token for token, with the
/// same two best log-probabilities at every step (within the f32→JSON rounding). This is the comparison a
/// batch-invariant engine can win exactly: llama.cpp's batched prompt kernels (repacked Q4_K GEMM, tiled flash
/// attention) round differently from its own decode, and its AVX2 and AVX-512 builds differently again.
#[test]
fn gemma3_greedy_equals_llama_cpp_token_by_token() {
    let model = load(GEMMA3);
    let v = token_by_token_record();
    let tok = model.tokenizer();
    let mut ctx = context(&model, 256);
    let cases = v["greedy"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = tok.encode(prompt, case["add_special"].as_bool().unwrap(), true);
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let n_predict = case["n_predict"].as_u64().unwrap() as usize;
        let mut tops: Vec<Vec<(u32, f32)>> = Vec::new();
        let mut sampler = Sampler::new(SamplerParams::greedy());
        let got = generate(&mut ctx, &ids, n_predict, &mut sampler, |_, logits| {
            tops.push(top_logprobs(logits, 2));
        })
        .unwrap();
        assert_eq!(got, want, "{prompt:?}: greedy ids differ from llama.cpp's");
        for (s, step) in case["top2_logprobs"].as_array().unwrap().iter().enumerate() {
            for k in 0..2 {
                let w = step[k].as_f64().unwrap();
                let o = tops[s][k].1 as f64;
                assert!(
                    (w - o).abs() < 1e-4,
                    "{prompt:?} step {s}: logprob {k} {o} vs llama.cpp {w}"
                );
            }
        }
    }
}

/// Gemma 3's perplexity equal to llama.cpp's `llama-perplexity -c 128 -b 128 -ub 1` on the same file
/// (`ppl_ub1` of the token-by-token record; the batched perplexity of the vectors is checked above).
#[test]
fn gemma3_perplexity_equals_llama_cpp_token_by_token() {
    let model = load(GEMMA3);
    let v = token_by_token_record();
    let want = v["ppl_ub1"].as_f64().expect("ppl_ub1");
    let text = std::fs::read_to_string(shared_vectors_dir().join("ppl.txt")).unwrap();
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let mut ctx = context(&model, 128);
    let r = perplexity(&mut ctx, &tokens, 128, 128, add_bos, |_, _| {}).unwrap();
    assert!(
        (r.ppl - want).abs() < 6e-5,
        "PPL {:.4}, llama.cpp token by token {want}",
        r.ppl
    );
}
