//! Every architecture without a small real file (llama, Llama 3 rope scaling, Mixtral, qwen2, qwen3,
//! qwen2moe, qwen3moe, phi3) on its synthetic model from `scripts/synth-models`, against llama.cpp's
//! answers recorded in `tests/vectors/synth/` (README there):
//! - logits of every position of fixed token sequences (F32 KV cache): the recorded ids' logits (48 fixed
//!   ids and the top-20) within the tolerance below, and the same best token except at a near-tie;
//! - greedy continuations identical, a divergence allowed only at a near-tie (llama.cpp's two best
//!   log-probabilities less than 0.1 apart at the first differing step, as `model_llama_cpp_parity.rs`);
//! - perplexity on ppl.txt within 0.5% with an F32 KV cache, and within 1% with the default F16 cache and
//!   llama.cpp's flash attention (see [`PPL_TOL_F16`]).

mod support;

use cyber_inference::engine::model::cli::perplexity;
use cyber_inference::engine::model::{Batch, Context, ContextParams, KvType, Model};
use std::sync::Arc;
use support::assets::shared_vector;
use support::model::argmax;
use support::synth::*;

/// Largest allowed |ours − llama.cpp| of any recorded logit: absolute plus relative to the logit.
///
/// The logits cases run with an F32 KV cache and llama.cpp without flash attention (its f32 `mul_mat`,
/// `soft_max`, `mul_mat`; ours the same softmax), so the only differences left are last-bit ones where
/// llama.cpp's float order differs from ours (its AVX-512 F16 and Q4_0 dot products and repacked Q4_0 GEMM,
/// `mul_mat_id`): measured ≤ 2e-6 on logits of magnitude up to ~20 (one f32 ulp at 16). Rarely such a
/// last-bit difference moves an activation across a Q8_0 rounding boundary, which shifts that element by
/// one quantization step (~1% of its block's maximum); measured up to 4e-2 on a logit, at one position of a
/// model. Hence two limits: every logit within [`LOGIT_TOL_ABS`] + [`LOGIT_TOL_REL`]·|logit|, and at most
/// [`MAX_LOOSE_SHARE`] of the positions with any logit further than [`LOGIT_TIGHT`] from llama.cpp's. A
/// wrong graph (a missing norm, bias, scale, rope factor or a wrong expert weight) moves most logits by
/// more than 0.1.
const LOGIT_TOL_ABS: f64 = 0.1;
const LOGIT_TOL_REL: f64 = 0.01;
/// Bound of a position where no activation crossed a rounding boundary (a few f32 ulps of the logits).
const LOGIT_TIGHT: f64 = 1e-4;
/// Share of positions allowed above [`LOGIT_TIGHT`].
const MAX_LOOSE_SHARE: f64 = 0.05;
/// Two best log-probabilities closer than this are a near-tie.
const NEAR_TIE: f64 = 0.1;

fn context(model: &Arc<Model>, n_ctx: usize, kv: &serde_json::Value) -> Context {
    let kv_type = match kv.as_str() {
        Some("f32") => KvType::F32,
        Some("f16") => KvType::F16,
        other => panic!("kv_type {other:?} in the vectors"),
    };
    Context::new(
        model.clone(),
        ContextParams {
            n_ctx,
            n_seq_max: 1,
            n_batch: n_ctx,
            n_threads: 2,
            embeddings: false,
            type_k: kv_type,
            type_v: kv_type,
        },
    )
    .expect("context")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn check_logits(name: &str) {
    let model = load(name);
    let v = vectors(name);
    assert_eq!(
        model.n_vocab() as u64,
        v["n_vocab"].as_u64().unwrap(),
        "{name}: n_vocab"
    );
    let fixed = ids(&v["fixed_ids"]);
    let mut worst = (0.0f64, String::new());
    let (mut n_pos, mut n_loose) = (0usize, 0usize);
    for case in v["logits"].as_array().unwrap() {
        let label = case["label"].as_str().unwrap();
        let n_ctx = case["n_ctx"].as_u64().unwrap() as usize;
        let tokens = ids(&case["tokens"]);
        let mut ctx = context(&model, n_ctx, &case["kv_type"]);
        let mut b = Batch::single(&tokens, 0, 0);
        b.logits.iter_mut().for_each(|l| *l = true);
        ctx.decode(&b).expect("decode");
        for (p, want) in case["positions"].as_array().unwrap().iter().enumerate() {
            let got = ctx.logits(p);
            let mut pairs: Vec<(usize, f64)> = fixed
                .iter()
                .zip(want["fixed"].as_array().unwrap())
                .map(|(&id, x)| (id as usize, x.as_f64().unwrap()))
                .collect();
            let top = want["top"].as_array().unwrap();
            pairs.extend(
                top.iter()
                    .map(|t| (t[0].as_u64().unwrap() as usize, t[1].as_f64().unwrap())),
            );
            let mut pos_max = 0.0f64;
            for (id, w) in pairs {
                let d = (got[id] as f64 - w).abs();
                pos_max = pos_max.max(d);
                let tol = LOGIT_TOL_ABS + LOGIT_TOL_REL * w.abs();
                if d / tol > worst.0 {
                    worst = (
                        d / tol,
                        format!(
                            "{label:?} position {p} id {id}: ours {} llama.cpp {w}",
                            got[id]
                        ),
                    );
                }
                assert!(
                    d <= tol,
                    "{name} {label:?} position {p}, token {id}: logit {} vs llama.cpp {w} (|Δ| {d:.2e} > {tol:.2e})",
                    got[id]
                );
            }
            n_pos += 1;
            if pos_max > LOGIT_TIGHT {
                n_loose += 1;
                eprintln!("{name} {label:?} position {p}: largest |Δ| {pos_max:.2e}");
            }
            let best = top[0][0].as_u64().unwrap() as usize;
            let ours = argmax(got);
            if ours != best {
                let gap = top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap();
                assert!(
                    gap < NEAR_TIE,
                    "{name} {label:?} position {p}: best token {ours}, llama.cpp {best} (gap {gap:.4})"
                );
            }
        }
    }
    eprintln!(
        "{name}: every recorded logit within tolerance; largest |Δ|/tol {:.3} at {}; {n_loose}/{n_pos} positions above {LOGIT_TIGHT:e}",
        worst.0, worst.1
    );
    assert!(
        n_loose as f64 <= MAX_LOOSE_SHARE * n_pos as f64,
        "{name}: {n_loose} of {n_pos} positions have a logit more than {LOGIT_TIGHT:e} from llama.cpp's"
    );
}

fn check_greedy(name: &str) {
    let model = load(name);
    let v = vectors(name);
    let mut identical = 0;
    let cases = v["greedy"].as_array().unwrap();
    for case in cases {
        let n_ctx = case["n_ctx"].as_u64().unwrap() as usize;
        let mut ctx = context(&model, n_ctx, &case["kv_type"]);
        let prompt = case["prompt"].as_str().unwrap();
        let tokens = ids(&case["tokens"]);
        let ours_tok = model.tokenizer().encode(prompt, true, false);
        if ours_tok != tokens {
            eprintln!(
                "{name} {prompt:?}: our tokens {ours_tok:?} differ from llama.cpp's {tokens:?}"
            );
        }
        let want = ids(&case["ids"]);
        let top2 = case["top2_logprobs"].as_array().unwrap();
        ctx.decode(&Batch::single(&tokens, 0, 0)).expect("prompt");
        let mut got = Vec::new();
        for step in 0..want.len() {
            let t = argmax(ctx.logits(0)) as u32;
            got.push(t);
            let pos = (tokens.len() + step) as u32;
            ctx.decode(&Batch::single(&[t], pos, 0)).expect("step");
        }
        match (0..want.len()).find(|&s| want[s] != got[s]) {
            None => identical += 1,
            Some(s) => {
                let a = top2[s][0][1].as_f64().unwrap();
                let b = top2[s][1][1].as_f64().unwrap();
                eprintln!(
                    "{name} {prompt:?}: first divergence at step {s} (llama.cpp {}, ours {}); llama.cpp top-2 logprobs {a:.4} / {b:.4}",
                    want[s], got[s]
                );
                assert!(
                    a - b < NEAR_TIE,
                    "{name} {prompt:?}: greedy diverges at step {s} (llama.cpp {}, ours {}) where llama.cpp's top-2 log-probabilities are {a:.4} / {b:.4}, not a near-tie",
                    want[s],
                    got[s]
                );
            }
        }
    }
    eprintln!(
        "{name}: {identical}/{} greedy continuations identical to llama.cpp",
        cases.len()
    );
}

/// Largest relative perplexity difference with an F32 KV cache (llama.cpp without flash attention): the
/// issue's 0.5%.
const PPL_TOL_F32: f64 = 0.005;
/// With the default F16 KV cache and llama.cpp's flash attention, which accumulates V in f16: its
/// roundings amplify last-bit differences (see [`LOGIT_TOL_ABS`]) into logit differences of up to ~0.1,
/// and the synthetic models are extremely confident (PPL ~1e8, mean NLL ~19 nats), so the mean NLL — the
/// relative PPL difference — moves by up to 0.6% (measured on synth-llama3).
const PPL_TOL_F16: f64 = 0.01;

fn check_perplexity(name: &str) {
    let model = load(name);
    let v = vectors(name);
    let text_path = shared_vector("ppl.txt");
    let text = std::fs::read_to_string(&text_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", text_path.display()));
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let runs = v["perplexity"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{name}: one F32 and one F16 perplexity run");
    for p in runs {
        let kv = p["kv_type"].as_str().unwrap();
        let n_ctx = p["n_ctx"].as_u64().unwrap() as usize;
        let n_batch = p["n_batch"].as_u64().unwrap() as usize;
        let want = p["ppl"].as_f64().unwrap();
        assert_eq!(
            tokens.len() as u64,
            p["n_tokens"].as_u64().unwrap(),
            "{name}: ppl.txt token count differs from llama.cpp's"
        );
        assert_eq!(
            add_bos.is_some(),
            p["add_bos"].as_bool().unwrap(),
            "{name}: add_bos"
        );
        let mut ctx = context(&model, n_ctx, &p["kv_type"]);
        let r = perplexity(&mut ctx, &tokens, n_ctx, n_batch, add_bos, |_, _| {}).unwrap();
        assert_eq!(
            r.n_chunks as u64,
            p["n_chunks"].as_u64().unwrap(),
            "{name}: chunk count"
        );
        let rel = (r.ppl - want).abs() / want;
        eprintln!(
            "{name} ({kv} KV): PPL {:.4} (llama.cpp {want:.4}), relative difference {:.4}%",
            r.ppl,
            rel * 100.0
        );
        let tol = if kv == "f32" {
            PPL_TOL_F32
        } else {
            PPL_TOL_F16
        };
        assert!(
            rel <= tol,
            "{name} ({kv} KV): PPL {} vs llama.cpp {want}: {:.3}% apart (limit {:.1}%)",
            r.ppl,
            rel * 100.0,
            tol * 100.0
        );
    }
}

macro_rules! synth_tests {
    ($($m:ident => $name:literal),* $(,)?) => {
        $(
            mod $m {
                use super::*;
                #[test]
                fn logits_match_llama_cpp() {
                    check_logits($name);
                }
                #[test]
                fn greedy_matches_llama_cpp() {
                    check_greedy($name);
                }
                #[test]
                fn perplexity_matches_llama_cpp() {
                    check_perplexity($name);
                }
            }
        )*
        #[test]
        fn every_synthetic_model_is_tested() {
            let tested = [$($name),*];
            assert_eq!(&tested[..], &MODELS[..]);
        }
    };
}

synth_tests! {
    llama => "synth-llama",
    llama3 => "synth-llama3",
    mixtral => "synth-mixtral",
    qwen2 => "synth-qwen2",
    qwen3 => "synth-qwen3",
    qwen2moe => "synth-qwen2moe",
    qwen3moe => "synth-qwen3moe",
    phi3 => "synth-phi3",
}
