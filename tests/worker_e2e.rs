//! End-to-end tests of `cyber-inference worker` (issue 5 acceptance): the real binary on the real models of
//! `$CYBER_INFERENCE_ASSETS/models`, driven over HTTP (and by the official `openai` Python package in
//! `worker_python.rs`).

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::assets::{GEMMA3, MINILM, SMOL_Q4_K_M as SMOL, model, shared_vectors_dir};
use support::model::vectors as model_vectors;
use support::net::free_port;
use support::process::{bin, stdout_of};
use support::python::run_client_script;
use support::worker::Worker;

fn assert_envelope(status: u16, body: &Value, want: u16, kind: &str) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[test]
fn worker_exits_nonzero_when_model_cannot_load() {
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), b"this is not a GGUF file").unwrap();
    let out = bin()
        .args(["worker", "-m"])
        .arg(bad.path())
        .args(["--port", &free_port().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot load model"), "{err}");
    assert!(out.stdout.is_empty(), "a worker prints nothing on stdout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bert_embeddings_match_llama_cpp_and_sigterm_exits_zero() {
    let mut w = Worker::start(&model(MINILM), &[]);
    let vectors = model_vectors(MINILM);
    let cases = vectors["embeddings"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let (st, v) = w.post("/v1/embeddings", &json!({"input": texts})).await;
    assert_eq!(st, 200, "{v}");
    for (i, case) in cases.iter().enumerate() {
        let want: Vec<f64> = serde_json::from_value(case["embedding"].clone()).unwrap();
        let got: Vec<f64> = serde_json::from_value(v["data"][i]["embedding"].clone()).unwrap();
        assert_eq!(v["data"][i]["index"], i);
        let dot: f64 = want.iter().zip(&got).map(|(a, b)| a * b).sum();
        let na: f64 = want.iter().map(|a| a * a).sum::<f64>().sqrt();
        let nb: f64 = got.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!((nb - 1.0).abs() < 1e-5, "not L2-normalised: {nb}");
        assert!(
            dot / (na * nb) >= 0.9999,
            "cosine {} for {:?}",
            dot / (na * nb),
            texts[i]
        );
    }
    let tokens = w
        .post(
            "/tokenize",
            &json!({"content": texts[0], "add_special": true}),
        )
        .await
        .1["tokens"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        w.post("/v1/embeddings", &json!({"input": texts[0]}))
            .await
            .1["usage"]["prompt_tokens"],
        tokens
    );
    // An encoder cannot generate: a 400 envelope, not a crash.
    let (st, v) = w
        .post(
            "/v1/completions",
            &json!({"prompt": "hello", "max_tokens": 4}),
        )
        .await;
    assert_envelope(st, &v, 400, "invalid_request_error");
    w.sigterm();
    let status = w.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}\n{}", w.stderr());
}

#[test]
fn greedy_output_equals_cyber_inference_run() {
    let m = model(SMOL);
    let prompt = "The capital of France is";
    let run_text = stdout_of(
        bin()
            .args(["run", "-m"])
            .arg(&m)
            .args(["-p", prompt, "-n", "24", "--temp", "0", "-t", "2"]),
    );
    let w = Worker::start(&m, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v = rt.block_on(w.complete(prompt, 24));
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(format!("{prompt}{text}\n"), run_text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_requests_at_np4_match_solo_answers() {
    let w = Worker::start(&model(SMOL), &["-np", "4", "-c", "2048"]);
    let prompts: Vec<String> = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
        "In 1969, astronauts",
        "A recipe for pancakes:",
        "The largest planet in the solar system",
        "Water boils at",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(w.complete(p, 16).await["choices"][0]["text"].clone());
    }
    let steps_before = w.metric("decode_steps_total").await;
    let futs = prompts.iter().map(|p| w.complete(p, 16));
    let together = futures_util::future::join_all(futs).await;
    for (i, v) in together.iter().enumerate() {
        assert_eq!(v["choices"][0]["text"], solo[i], "prompt {:?}", prompts[i]);
    }
    // Batched: 8 requests × ≤16 tokens took far fewer forward passes than 8 × 16 separate ones.
    let steps = w.metric("decode_steps_total").await - steps_before;
    assert!(
        steps < 8.0 * 16.0 * 0.75,
        "{steps} forward passes for 8 requests"
    );
    assert_eq!(w.metric("queue_stall_steps_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_slot_for_queued_request() {
    let w = Worker::start(&model(SMOL), &["-np", "1"]);
    let client = reqwest::Client::new();
    let bias = w.ban_eog().await;
    let r = client
        .post(format!("{}/v1/chat/completions", w.base))
        .json(
            &json!({"messages":[{"role":"user","content":"Tell me a very long story."}],
                      "max_tokens": 2000, "temperature": 0, "stream": true,
                      "logit_bias": bias}),
        )
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    let base = w.base.clone();
    let queued = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt":"Hello","max_tokens":4,"temperature":0}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    // The second request waits for the only slot.
    let t = Instant::now();
    while w.metric("queue_length").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "second request never queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(body);
    let v = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .expect("queued request did not start after the disconnect")
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(w.metric("requests_cancelled_total").await, 1.0);
    // Never a step with a request queued while a slot was free: it started within one step.
    assert_eq!(w.metric("queue_stall_steps_total").await, 0.0);
    assert_eq!(w.metric("slots_busy").await, 0.0);
    // A client of a non-streamed request that goes away frees its slot too.
    let base = w.base.clone();
    let long = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(
                &json!({"prompt":"Once upon a time","max_tokens":2000,"temperature":0,
                          "logit_bias": bias}),
            )
            .send()
            .await
    });
    let t = Instant::now();
    while w.metric("slots_busy").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "request never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    long.abort();
    let t = Instant::now();
    while w.metric("slots_busy").await > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "slot still busy after the client went away"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(w.metric("requests_cancelled_total").await, 2.0);
}

/// A long shared prefix: a few hundred tokens of ordinary text.
fn long_prefix() -> String {
    let mut s = String::from("You are a careful assistant. Here are the notes of the meeting:\n");
    for i in 1..=24 {
        s.push_str(&format!(
            "{i}. The team reviewed item number {i}, agreed on the next steps and wrote them down.\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_is_reused_and_greedy_output_equals_a_fresh_worker() {
    let m = model(SMOL);
    let prefix = long_prefix();
    let chat = |question: &str| {
        json!({"messages": [{"role": "system", "content": prefix},
                            {"role": "user", "content": question}],
               "max_tokens": 24, "temperature": 0})
    };
    let first = chat("Which item came first?");
    let second = chat("Summarise the notes in one sentence.");
    let w = Worker::start(&m, &["-np", "2", "-c", "2048"]);
    // An unrelated request first, so that the two slots hold different caches.
    let (st, v) = w
        .post(
            "/v1/completions",
            &json!({"prompt": "Water boils at",
        "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, a) = w.post("/v1/chat/completions", &first).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(
        a["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{a}"
    );
    let n_prefix = {
        let (_, t) = w
            .post(
                "/apply-template",
                &json!({"messages": [{"role": "system", "content": prefix}]}),
            )
            .await;
        let text = t["prompt"].as_str().unwrap().to_string();
        let (_, t) = w
            .post(
                "/tokenize",
                &json!({"content": text, "add_special": true, "parse_special": true}),
            )
            .await;
        t["tokens"].as_array().unwrap().len() as u64
    };
    assert!(n_prefix > 300, "prefix of {n_prefix} tokens");
    let cached_before = w.metric("prompt_tokens_cached_total").await;
    let evaluated_before = w.metric("prompt_tokens_total").await;
    let (st, b) = w.post("/v1/chat/completions", &second).await;
    assert_eq!(st, 200, "{b}");
    let n_prompt = b["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // The system message's tokens are shared (the template may render its end a little differently
    // before another message, hence the small margin); the rest is the question.
    assert!(
        cached + 8 >= n_prefix && cached < n_prompt,
        "cached {cached} of {n_prompt} prompt tokens; the prefix has {n_prefix}"
    );
    assert_eq!(
        w.metric("prompt_tokens_cached_total").await - cached_before,
        cached as f64
    );
    assert_eq!(
        w.metric("prompt_tokens_total").await - evaluated_before,
        (n_prompt - cached) as f64,
        "only the tokens after the shared prefix were evaluated"
    );
    // The very same request again reuses all but its last prompt token.
    let (_, b_again) = w.post("/v1/chat/completions", &second).await;
    assert_eq!(
        b_again["usage"]["prompt_tokens_details"]["cached_tokens"],
        n_prompt - 1,
        "{b_again}"
    );
    drop(w);
    // A fresh worker computes the second request cold: the same greedy answer, bit for bit.
    let fresh = Worker::start(&m, &["-np", "2", "-c", "2048"]);
    let (st, cold) = fresh.post("/v1/chat/completions", &second).await;
    assert_eq!(st, 200, "{cold}");
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let text = |v: &Value| v["choices"][0]["message"]["content"].clone();
    assert!(
        text(&cold).as_str().is_some_and(|t| !t.is_empty()),
        "{cold}"
    );
    assert_eq!(text(&b), text(&cold), "reused prefix changed the answer");
    assert_eq!(text(&b_again), text(&cold));
    assert_eq!(
        b["choices"][0]["finish_reason"],
        cold["choices"][0]["finish_reason"]
    );
}

#[test]
fn sigterm_during_request_finishes_it_and_exits_zero() {
    let mut w = Worker::start(&model(SMOL), &["-np", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = w.base.clone();
    let bias = rt.block_on(w.ban_eog());
    let req = rt.spawn(async move {
        let r = reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(
                &json!({"prompt":"Once upon a time","max_tokens":48,"temperature":0,
                          "logit_bias": bias}),
            )
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    let t = Instant::now();
    while rt.block_on(w.metric("slots_busy")) < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    w.sigterm();
    let (st, v) = rt.block_on(req).unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 48, "{v}");
    let status = w.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}\n{}", w.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_cases_return_status_and_openai_envelope() {
    let w = Worker::start(
        &model(SMOL),
        &["-c", "128", "--api-key", "k1", "-ngl", "99"],
    );
    let c = reqwest::Client::new();
    let send = |body: &'static str| {
        c.post(format!("{}/v1/chat/completions", w.base))
            .bearer_auth("k1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    async fn parts(r: reqwest::Response) -> (u16, Value) {
        let s = r.status().as_u16();
        (s, r.json().await.unwrap())
    }
    let (s, v) = parts(send("{\"messages\": [").await.unwrap()).await;
    assert_envelope(s, &v, 400, "invalid_request_error");
    let (s, v) = parts(
        send(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#)
            .await
            .unwrap(),
    )
    .await;
    assert_envelope(s, &v, 400, "invalid_request_error");
    let (s, v) = parts(send(r#"{"messages":[]}"#).await.unwrap()).await;
    assert_envelope(s, &v, 400, "invalid_request_error");
    assert_eq!(v["error"]["param"], "messages");
    let long = "word ".repeat(300);
    let r = c
        .post(format!("{}/v1/chat/completions", w.base))
        .bearer_auth("k1")
        .json(&json!({"messages":[{"role":"user","content": long}]}))
        .send()
        .await
        .unwrap();
    let (s, v) = parts(r).await;
    assert_envelope(s, &v, 400, "exceed_context_size_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("n_ctx = 128") && msg.contains(" tokens"),
        "{msg}"
    );
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["n_ctx"], 128);
    let r = c
        .post(format!("{}/v1/chat/completions", w.base))
        .bearer_auth("wrong")
        .json(&json!({"messages":[{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    let (s, v) = parts(r).await;
    assert_envelope(s, &v, 401, "authentication_error");
    // /health stays open.
    let r = reqwest::get(format!("{}/health", w.base)).await.unwrap();
    assert_eq!(r.status(), 200);
    // `-ngl 99` without a hardware adapter: the worker says once, at load, that it runs on the CPU and
    // why — not per request.
    let log = w.stderr();
    assert_eq!(log.matches("the model runs on the CPU").count(), 1, "{log}");
}

#[test]
fn python_openai_client_drives_the_worker() {
    let w = Worker::start(&model(SMOL), &["-np", "2", "--embedding", "-a", "smol"]);
    let e = Worker::start(&model(MINILM), &[]);
    let vectors = shared_vectors_dir();
    run_client_script(
        "test_worker_openai.py",
        &[&w.base, &e.base, vectors.to_str().unwrap()],
        || format!("{}\n--- embedding worker ---\n{}", w.stderr(), e.stderr()),
    );
}

/// Gemma 3 (no chat template of its own): `/v1/chat/completions` renders llama.cpp's ChatML fallback and
/// answers exactly as `/v1/completions` on that rendered prompt; a second prompt that shares a long prefix
/// with the first but leaves it more than a sliding window (512) before its end cannot reuse the cached
/// prefix (the window's ring has moved on), is re-evaluated, and answers as a fresh worker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_chat_fallback_and_prefix_past_the_sliding_window() {
    let m = model(GEMMA3);
    let vectors = model_vectors(GEMMA3);
    let case = &vectors["chat_template"][0];
    let w = Worker::start(&m, &["-c", "2048", "-np", "1"]);
    let (st, chat) = w
        .post(
            "/v1/chat/completions",
            &json!({"messages": case["messages"], "max_tokens": 8, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{chat}");
    let content = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let plain = w.complete(case["prompt"].as_str().unwrap(), 8).await;
    assert_eq!(content, plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(
        chat["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"],
        "{chat} {plain}"
    );
    // Prefix reuse past the window.
    let long: String = (0..700).map(|i| format!("w{} ", i % 97)).collect();
    let a = format!("{long} and so the story ends.");
    let b = format!(
        "{} but then something else happened.",
        &long[..long.len() / 4]
    );
    let _ = w.complete(&a, 4).await;
    let warm = w.complete(&b, 8).await;
    let fresh_worker = Worker::start(&m, &["-c", "2048", "-np", "1"]);
    let fresh = fresh_worker.complete(&b, 8).await;
    assert_eq!(warm["choices"][0]["text"], fresh["choices"][0]["text"]);
    assert_eq!(
        warm["usage"]["prompt_tokens"],
        fresh["usage"]["prompt_tokens"]
    );
}
