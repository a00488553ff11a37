//! `cyber-inference worker` as a drop-in for llama-server (issue 18): the real binary on SmolLM2 Q4_1,
//! driven with llama-server's documented requests (tools/server/README.md), the shapes checked field by
//! field; CORS preflights on the worker; unknown flags refused; `--help` grouped as llama-server's.

mod supervisor_common;
mod worker_common;

use worker_common::*;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cyber-inference");

fn smol() -> PathBuf {
    let p = PathBuf::from(std::env::var("CYBER_INFERENCE_ASSETS").expect("CYBER_INFERENCE_ASSETS"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "missing {}", p.display());
    p
}

fn minilm() -> PathBuf {
    smol().with_file_name("all-MiniLM-L6-v2.F16.gguf")
}

async fn sse_lines(base: &str, path: &str, body: &Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_infill_slots_props_tokenize_like_llama_server() {
    let w = Worker::start(
        &smol(),
        &[
            "-c",
            "1024",
            "-np",
            "2",
            "--temp",
            "0",
            "-n",
            "8",
            "--alias",
            "smol,smollm2",
            "--embedding",
        ],
    );
    // /completion with the server-wide defaults (--temp 0, -n 8).
    let (st, v) = w
        .post(
            "/completion",
            &json!({"prompt": "The capital of France is"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for k in [
        "index",
        "content",
        "tokens",
        "id_slot",
        "stop",
        "model",
        "tokens_predicted",
        "tokens_evaluated",
        "generation_settings",
        "prompt",
        "has_new_line",
        "truncated",
        "stop_type",
        "stopping_word",
        "tokens_cached",
        "timings",
    ] {
        assert!(v.get(k).is_some(), "no {k} in {v}");
    }
    assert_eq!(v["model"], "smol");
    assert_eq!(v["stop"], true);
    assert_eq!(v["generation_settings"]["temperature"], 0.0);
    assert_eq!(v["generation_settings"]["n_predict"], 8);
    let n_pred = v["tokens_predicted"].as_u64().unwrap();
    assert!((1..=8).contains(&n_pred), "{v}");
    assert_eq!(v["stop_type"], if n_pred == 8 { "limit" } else { "eos" });
    for k in [
        "cache_n",
        "prompt_n",
        "prompt_ms",
        "prompt_per_token_ms",
        "prompt_per_second",
        "predicted_n",
        "predicted_ms",
        "predicted_per_token_ms",
        "predicted_per_second",
    ] {
        assert!(v["timings"][k].is_number(), "timings.{k}: {v}");
    }
    let greedy = v["content"].as_str().unwrap().to_string();
    // The same prompt as token ids, a mix, on a chosen slot, with probabilities and tokens.
    let (_, t) = w
        .post(
            "/tokenize",
            &json!({"content": "The capital of France is", "with_pieces": true}),
        )
        .await;
    let ids: Vec<u64> = t["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(t["tokens"][0]["piece"].is_string());
    let (_, d) = w.post("/detokenize", &json!({"tokens": ids})).await;
    assert_eq!(d["content"], "The capital of France is");
    let (_, v2) = w
        .post(
            "/completion",
            &json!({"prompt": ids, "id_slot": 1, "n_probs": 3,
                                                 "return_tokens": true, "cache_prompt": true}),
        )
        .await;
    assert_eq!(v2["content"], greedy.as_str(), "{v2}");
    assert_eq!(v2["id_slot"], 1);
    assert_eq!(
        v2["tokens"].as_array().unwrap().len() as u64,
        v2["tokens_predicted"].as_u64().unwrap()
    );
    let p0 = &v2["completion_probabilities"][0];
    for k in ["id", "token", "bytes", "logprob", "top_logprobs"] {
        assert!(p0.get(k).is_some(), "{k}: {p0}");
    }
    assert_eq!(p0["top_logprobs"].as_array().unwrap().len(), 3);
    // Same again on slot 1: its cache is reused (tokens_cached, timings.cache_n).
    let (_, v3) = w
        .post("/completions", &json!({"prompt": ids, "id_slot": 1}))
        .await;
    assert_eq!(v3["content"], greedy.as_str());
    assert_eq!(
        v3["timings"]["cache_n"].as_u64().unwrap(),
        ids.len() as u64 - 1,
        "{v3}"
    );
    assert!(v3["tokens_cached"].as_u64().unwrap() >= ids.len() as u64);
    // post_sampling_probs: prob and top_probs; greedy leaves one candidate of probability 1.
    let (_, ps) = w
        .post(
            "/completion",
            &json!({"prompt": ids, "n_probs": 2, "n_predict": 2,
                                                 "post_sampling_probs": true}),
        )
        .await;
    assert_eq!(ps["completion_probabilities"][0]["prob"], 1.0, "{ps}");
    assert!(ps["completion_probabilities"][0]["top_probs"].is_array());
    // samplers given as names (top_k then temperature, sampled with a seed: reproducible).
    let b = json!({"prompt": "Once upon a time", "temperature": 0.9, "seed": 7, "n_predict": 6,
                   "samplers": ["top_k", "temperature"]});
    let (_, s1) = w.post("/completion", &b).await;
    let (_, s2) = w.post("/completion", &b).await;
    assert_eq!(s1["content"], s2["content"]);
    assert_eq!(
        s1["generation_settings"]["samplers"],
        json!(["top_k", "temperature"])
    );
    // Streaming: `data:` chunks with content/stop false, then the final object; no [DONE].
    let lines = sse_lines(
        &w.base,
        "/completion",
        &json!({"prompt": "The capital of France is", "stream": true}),
    )
    .await;
    let chunks: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["stop"], true);
    assert!(last["timings"].is_object() && last["generation_settings"].is_object());
    let mut text = String::new();
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["stop"], false);
        assert!(c["tokens_predicted"].is_number() && c["tokens_evaluated"].is_number());
        text.push_str(c["content"].as_str().unwrap());
    }
    assert_eq!(text, greedy);
    // /infill: SmolLM2's vocabulary has no FIM prefix/suffix/middle tokens (it has <reponame> and
    // <file_sep> only; no asset model has all three), so it is refused as llama-server refuses it:
    // 501 naming what is missing. The prompt layout is unit-tested in src/worker/native.rs.
    let (st, f) = w.post("/infill", &json!({"input_prefix": "def add(a, b):\n    return ",
                                             "input_suffix": "\n\nprint(add(1, 2))\n",
                                             "input_extra": [{"filename": "util.py", "text": "x = 1\n"}],
                                             "n_predict": 4})).await;
    assert_eq!(st, 501, "{f}");
    assert_eq!(f["error"]["type"], "not_supported_error");
    assert_eq!(
        f["error"]["message"],
        "Infill is not supported by this model: prefix token is missing. suffix token is missing. \
         middle token is missing. "
    );
    // /slots
    let slots: Value = reqwest::get(format!("{}/slots", w.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[1]["n_ctx"], 512);
    assert_eq!(slots[1]["is_processing"], false);
    for k in [
        "n_prompt_tokens",
        "params",
        "next_token",
        "prompt",
        "generated",
    ] {
        assert!(slots[1].get(k).is_some(), "{k}: {}", slots[1]);
    }
    // /props
    let p: Value = reqwest::get(format!("{}/props", w.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["total_slots"], 2);
    assert_eq!(p["default_generation_settings"]["n_ctx"], 512);
    assert_eq!(
        p["default_generation_settings"]["params"]["temperature"],
        0.0
    );
    assert_eq!(p["default_generation_settings"]["params"]["n_predict"], 8);
    assert!(p["chat_template"].as_str().unwrap().contains("im_start"));
    assert!(
        p["model_path"]
            .as_str()
            .unwrap()
            .ends_with("SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert_eq!(p["aliases"], json!(["smol", "smollm2"]));
    // Embeddings: token ids and mixed lists.
    let (st, e) = w
        .post("/embedding", &json!({"content": ["Hello", 42]}))
        .await;
    assert_eq!(st, 200, "{e}");
    assert_eq!(e[0]["embedding"].as_array().unwrap().len(), 1);
    let (st, e) = w
        .post("/v1/embeddings", &json!({"input": [[1, 2, 3], "hi"]}))
        .await;
    assert_eq!(st, 200, "{e}");
    assert_eq!(e["data"].as_array().unwrap().len(), 2);
    // The context error as llama-server gives it.
    let long = "hello ".repeat(600);
    let (st, e) = w.post("/completion", &json!({"prompt": long})).await;
    assert_eq!(st, 400);
    assert_eq!(e["error"]["type"], "exceed_context_size_error");
    assert_eq!(e["error"]["n_ctx"], 512);
    assert!(e["error"]["n_prompt_tokens"].as_u64().unwrap() > 512);
    // Chat stream: first delta {role, content: null}; timings on the last chunk.
    let lines = sse_lines(
        &w.base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                                  "stream_options": {"include_usage": true}}),
    )
    .await;
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    assert!(first["system_fingerprint"].is_string());
    let usage: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
    assert!(
        usage["usage"].is_object() && usage["timings"]["predicted_n"].is_number(),
        "{usage}"
    );
    // llama-server's Prometheus names beside ours.
    let m = reqwest::get(format!("{}/metrics", w.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:n_decode_total",
        "llamacpp:requests_processing",
    ] {
        assert!(m.contains(&format!("\n{name} ")), "{name} missing");
    }
    // CORS: no origin allowed by default; the preflight is not a 401 even with a key.
    let pre = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{}/completion", w.base))
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert!(pre.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_preflight_and_api_key_and_no_slots() {
    let w = Worker::start(
        &smol(),
        &[
            "-c",
            "256",
            "--cors-origins",
            "http://localhost:3000",
            "--api-key",
            "k1",
            "--no-slots",
        ],
    );
    let c = reqwest::Client::new();
    let pre = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", w.base),
        )
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 200);
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let methods = pre.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(methods.contains("POST"), "{methods}");
    let hdrs = pre.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(hdrs.contains("authorization"), "{hdrs}");
    // Another origin is not allowed.
    let pre = c
        .request(reqwest::Method::OPTIONS, format!("{}/completion", w.base))
        .header("Origin", "http://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert!(pre.headers().get("access-control-allow-origin").is_none());
    // The real request still needs the key, and carries the CORS header.
    let r = c
        .post(format!("{}/tokenize", w.base))
        .header("Origin", "http://localhost:3000")
        .json(&json!({"content": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{}/tokenize", w.base))
        .header("Origin", "http://localhost:3000")
        .bearer_auth("k1")
        .json(&json!({"content": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    // --no-slots: 501 as llama-server.
    let r = c
        .get(format!("{}/slots", w.base))
        .bearer_auth("k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 501);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_supported_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn infill_is_refused_without_fim_tokens_and_pooling_none_gives_rows() {
    // all-MiniLM (BERT) has no FIM tokens.
    let w = Worker::start(&minilm(), &["--pooling", "none"]);
    let (st, v) = w
        .post(
            "/infill",
            &json!({"input_prefix": "a", "input_suffix": "b"}),
        )
        .await;
    assert_eq!(st, 501, "{v}");
    assert_eq!(v["error"]["type"], "not_supported_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prefix token is missing"),
        "{v}"
    );
    let (_, t) = w
        .post(
            "/tokenize",
            &json!({"content": "hello world", "add_special": true}),
        )
        .await;
    let n = t["tokens"].as_array().unwrap().len();
    let (st, e) = w
        .post("/embedding", &json!({"content": "hello world"}))
        .await;
    assert_eq!(st, 200, "{e}");
    let rows = e[0]["embedding"].as_array().unwrap();
    assert_eq!(rows.len(), n, "one row per token");
    assert_eq!(rows[0].as_array().unwrap().len(), 384);
    let (st, _) = w.post("/v1/embeddings", &json!({"input": "hello"})).await;
    assert_eq!(st, 400);
}

#[test]
fn unknown_flags_are_refused_and_help_is_grouped() {
    for bad in [
        ["--cache-type-k", "q8_0"],
        ["--slot-save-path", "/tmp"],
        ["--reranking", "x"],
        ["--pooling", "rank"],
        ["--no-such-flag", "1"],
    ] {
        let out = Command::new(BIN)
            .args(["worker", "-m", "x.gguf"])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error:"), "{err}");
    }
    let out = Command::new(BIN)
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let at = |s: &str| help.find(s).unwrap_or_else(|| panic!("no {s} in\n{help}"));
    assert!(at("common params:") < at("sampling params:"));
    assert!(at("sampling params:") < at("example-specific params:"));
    for flag in [
        "--temp",
        "--top-k",
        "--top-p",
        "--min-p",
        "--seed",
        "--n-predict",
        "--ubatch-size",
        "--flash-attn",
        "--cors-origins",
        "--metrics",
        "--no-slots",
        "--pooling",
        "--jinja",
        "--no-jinja",
        "--chat-template-file",
        "--alias",
        "--verbose",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn supervisor_answers_cors_preflights_before_auth() {
    let s =
        supervisor_common::Server::start(&[], &[("CORS_ORIGINS", "http://localhost:5173")]).await;
    let token = s.login().await;
    assert_eq!(
        s.put_settings(&token, json!({"require_api_key": true}))
            .await,
        200
    );
    let pre = s
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", s.base),
        )
        .header("Origin", "http://localhost:5173")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 200, "a preflight is never a 401");
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    assert!(
        pre.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    // The real request is checked: no key, 401 (with the CORS header so the page can read it).
    let r = s
        .http
        .get(format!("{}/v1/models", s.base))
        .header("Origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    // Another origin gets no grant.
    let pre = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/models", s.base))
        .header("Origin", "http://evil.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert!(pre.headers().get("access-control-allow-origin").is_none());
}
