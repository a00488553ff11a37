//! In-process tests of the whole worker (router, scheduler, shutdown) over the fake engine: every endpoint's
//! shape, the SSE order, stop strings, errors and cancellation, without a GGUF model.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::fake::{FakeCodec, FakeCompute, FakeLog};
use super::{Loaded, Loader, WorkerArgs, plan_context, serve};

struct Server {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), super::WorkerError>>,
    codec: Arc<FakeCodec>,
}

fn args(np: usize, ctx: usize, api_key: Option<&str>) -> WorkerArgs {
    WorkerArgs {
        model: "/models/fake-model.gguf".into(),
        host: "127.0.0.1".into(),
        port: 0,
        alias: None,
        ctx_size: Some(ctx),
        threads: Some(1),
        parallel: np,
        max_queue: 64,
        batch_size: 8,
        gpu_layers: None,
        device: None,
        embedding: true,
        api_key: api_key.map(str::to_string),
        instance: Some("nonce-1".into()),
        grace_period: 5,
        chat_template_file: None,
        chat_template: None,
        reasoning_format: Default::default(),
        n_predict: -1,
        ubatch_size: 512,
        flash_attn: "auto".into(),
        cache_type_k: crate::engine::model::KvType::F16,
        cache_type_v: crate::engine::model::KvType::F16,
        verbose: false,
        temp: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        seed: -1,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        samplers: None,
        pooling: None,
        reranking: false,
        cors_origins: None,
        metrics: false,
        slots: false,
        no_slots: false,
        slot_save_path: None,
        jinja: false,
        no_jinja: false,
        keep: 0,
        context_shift: false,
        no_context_shift: false,
        no_mmap: false,
        mlock: false,
        timeout: 3600,
    }
}

fn fake_loader(codec: Arc<FakeCodec>, delay: Duration) -> Loader {
    Box::new(move |p| {
        std::thread::sleep(delay);
        let (n_ctx, n_ctx_seq) = plan_context(p.ctx_size, 4096, p.n_slots)?;
        Ok(Loaded {
            codec,
            compute: Box::new(
                FakeCompute::new(p.n_slots, n_ctx_seq, FakeLog::default())
                    .with_step_delay(Duration::from_millis(1)),
            ),
            n_ctx,
            n_ctx_seq,
            backend: fake_backend(&p.gpu),
        })
    })
}

/// What the fake loader reports for `-ngl`/`--device`: a 30-layer model on a made-up Vulkan adapter
/// holding the last `-ngl` layers (all of them and the output for a negative value), or the CPU for 0.
fn fake_backend(gpu: &crate::engine::gpu::GpuOptions) -> crate::engine::gpu::BackendInfo {
    let n_layer = 30;
    if gpu.n_gpu_layers == 0 {
        return crate::engine::gpu::BackendInfo::cpu(n_layer, 0, None);
    }
    let offloaded = usize::try_from(gpu.n_gpu_layers).map_or(n_layer, |n| n.min(n_layer));
    crate::engine::gpu::BackendInfo {
        name: "vulkan".into(),
        adapter: Some(gpu.device.clone().unwrap_or_else(|| "Fake GPU".into())),
        device_type: Some("discrete".into()),
        n_gpu_layers: gpu.n_gpu_layers,
        offloaded_layers: offloaded,
        n_layer,
        output_offloaded: offloaded == n_layer,
        device_weight_bytes: 1000 * offloaded as u64,
        fallback_reason: None,
    }
}

async fn start_with(a: WorkerArgs, delay: Duration) -> Server {
    start_with_codec(a, delay, Arc::new(FakeCodec::default())).await
}

async fn start_with_codec(a: WorkerArgs, delay: Duration, codec: Arc<FakeCodec>) -> Server {
    let shutdown = CancellationToken::new();
    let (btx, brx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let loader = fake_loader(codec.clone(), delay);
    let sd = shutdown.clone();
    let task = tokio::spawn(async move { serve(&a, loader, sd, Some(btx)).await });
    let addr = brx.await.unwrap();
    Server {
        base: format!("http://{addr}"),
        shutdown,
        task,
        codec,
    }
}

async fn start(np: usize, ctx: usize) -> Server {
    let s = start_with(args(np, ctx, None), Duration::ZERO).await;
    wait_ready(&s).await;
    s
}

async fn wait_ready(s: &Server) {
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{}/health", s.base)).await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never ready");
}

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn sse(s: &Server, path: &str, body: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

async fn stop(s: Server) {
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

fn assert_error(status: u16, body: &Value, want: u16, kind: &str) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert_eq!(e["type"], kind, "{body}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn health_is_503_while_loading_then_200() {
    let s = start_with(args(1, 256, None), Duration::from_millis(400)).await;
    let r = reqwest::get(format!("{}/health", s.base)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status":"loading"})
    );
    let (st, body) = post(&s, "/v1/completions", json!({"prompt":"a"})).await;
    assert_error(st, &body, 503, "unavailable_error");
    wait_ready(&s).await;
    let r = reqwest::get(format!("{}/health", s.base)).await.unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status":"ok","backend":"vulkan"})
    );
    stop(s).await;
}

#[tokio::test]
async fn failing_loader_is_an_error() {
    let shutdown = CancellationToken::new();
    let loader: Loader = Box::new(|_| Err("bad magic".into()));
    let e = serve(&args(1, 256, None), loader, shutdown, None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("bad magic"), "{e}");
}

#[tokio::test]
async fn models_props_metrics() {
    let s = start(2, 512).await;
    let v: Value = reqwest::get(format!("{}/v1/models", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "fake-model");
    let p: Value = reqwest::get(format!("{}/props", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["instance"], "nonce-1");
    assert_eq!(p["n_ctx"], 512);
    assert_eq!(p["n_ctx_slot"], 256);
    assert_eq!(p["n_slots"], 2);
    assert_eq!(p["architecture"], "fake");
    assert_eq!(p["model_path"], "/models/fake-model.gguf");
    // `-ngl` defaults to -1: every layer and the output on the (fake) GPU.
    assert_eq!(
        p["backend"],
        json!({
            "name": "vulkan", "adapter": "Fake GPU", "device_type": "discrete",
            "n_gpu_layers": -1, "offloaded_layers": 30, "n_layer": 30,
            "output_offloaded": true, "device_weight_bytes": 30000, "fallback_reason": null,
        })
    );
    let m = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(super::metrics::sample(&m, "slots_total"), Some(2.0));
    assert_eq!(super::metrics::sample(&m, "gpu_layers"), Some(30.0));
    stop(s).await;
}

/// `-ngl` and `--device` reach the loader, and what it reports is what `/props`, `/health` and
/// `/metrics` say: a split model, then a CPU-only one.
#[tokio::test]
async fn props_and_health_report_the_backend_the_loader_chose() {
    let mut a = args(1, 256, None);
    a.gpu_layers = Some(10);
    a.device = Some("llvmpipe".into());
    let s = start_with(a, Duration::ZERO).await;
    wait_ready(&s).await;
    let p: Value = reqwest::get(format!("{}/props", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = &p["backend"];
    assert_eq!(b["name"], "vulkan", "{p}");
    assert_eq!(b["adapter"], "llvmpipe");
    assert_eq!(b["n_gpu_layers"], 10);
    assert_eq!(b["offloaded_layers"], 10);
    assert_eq!(b["output_offloaded"], false);
    stop(s).await;

    let mut a = args(1, 256, None);
    a.gpu_layers = Some(0);
    let s = start_with(a, Duration::ZERO).await;
    wait_ready(&s).await;
    let h: Value = reqwest::get(format!("{}/health", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h, json!({"status":"ok","backend":"cpu"}));
    let p: Value = reqwest::get(format!("{}/props", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["backend"]["name"], "cpu");
    assert_eq!(p["backend"]["adapter"], Value::Null);
    assert_eq!(p["backend"]["offloaded_layers"], 0);
    let m = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(super::metrics::sample(&m, "gpu_layers"), Some(0.0));
    stop(s).await;
}

#[tokio::test]
async fn chat_stream_equals_non_stream_and_has_openai_order() {
    let s = start(1, 256).await;
    let body = json!({"model":"anything","messages":[{"role":"user","content":"hello"}],
                      "max_tokens":7,"temperature":0});
    let (st, full) = post(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(st, 200, "{full}");
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["model"], "fake-model");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(full["system_fingerprint"].is_string());
    let text = full["choices"][0]["message"]["content"].as_str().unwrap();
    let prompt = "user: hello\nassistant: ";
    assert_eq!(text, s.codec.expected(prompt, 7));
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    assert_eq!(full["usage"]["prompt_tokens"], prompt.len() + 1);
    assert_eq!(full["usage"]["completion_tokens"], 7);
    assert_eq!(full["usage"]["total_tokens"], prompt.len() + 8);

    let mut b = body.clone();
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let events = sse(&s, "/v1/chat/completions", b).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // llama-server's first delta: the role with content null.
    assert!(chunks[0]["choices"][0]["delta"]["content"].is_null());
    assert!(chunks[0]["choices"][0]["delta"].get("content").is_some());
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 7);
    // timings on the stream's last chunk (the usage one), as llama-server.
    assert_eq!(chunks[n - 1]["timings"]["predicted_n"], 7);
    assert!(chunks[n - 2].get("timings").is_none());
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    stop(s).await;
}

#[tokio::test]
async fn stop_strings_are_never_emitted_streamed_or_not() {
    let s = start(1, 256).await;
    let prompt = "user: hello\nassistant: ";
    let full = s.codec.expected(prompt, 20);
    let stop_str = full[5..8].to_string();
    let cut = full.find(&stop_str).unwrap();
    let body = json!({"messages":[{"role":"user","content":"hello"}],"max_tokens":20,
                      "temperature":0,"stop":[stop_str, "never-seen"]});
    let (_, v) = post(&s, "/v1/chat/completions", body.clone()).await;
    assert_eq!(v["choices"][0]["message"]["content"], full[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let mut b = body;
    b["stream"] = json!(true);
    let events = sse(&s, "/v1/chat/completions", b).await;
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, full[..cut]);
    stop(s).await;
}

#[tokio::test]
async fn n_choices_and_logprobs() {
    let s = start(2, 512).await;
    let body = json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":3,"temperature":0,
                      "n":3,"logprobs":true,"top_logprobs":2});
    let (st, v) = post(&s, "/v1/chat/completions", body).await;
    assert_eq!(st, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let lp = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lp.len(), 3);
        assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
        let best = lp[0]["top_logprobs"][0]["logprob"].as_f64().unwrap();
        assert!((lp[0]["logprob"].as_f64().unwrap() - best).abs() < 1e-6);
        assert!(best < 0.0);
    }
    assert_eq!(v["usage"]["completion_tokens"], 9);
    stop(s).await;
}

#[tokio::test]
async fn completions_echo_logprobs_token_prompts() {
    let s = start(1, 256).await;
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"prompt":["ab","cd"],"max_tokens":4,"temperature":0,"echo":true,"logprobs":1,
               "suffix":"ignored"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let c = v["choices"].as_array().unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0]["text"], format!("ab{}", s.codec.expected("ab", 4)));
    assert_eq!(c[1]["text"], format!("cd{}", s.codec.expected("cd", 4)));
    assert_eq!(c[0]["logprobs"]["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(c[0]["logprobs"]["text_offset"][0], 2);
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    // Token prompt: same answer as the text prompt.
    let ids = super::backend::Codec::encode(&*s.codec, "ab", true, false);
    let (_, w) = post(
        &s,
        "/v1/completions",
        json!({"prompt":ids,"max_tokens":4,"temperature":0}),
    )
    .await;
    assert_eq!(w["choices"][0]["text"], s.codec.expected("ab", 4));
    // Streamed completion.
    let events = sse(
        &s,
        "/v1/completions",
        json!({"prompt":"ab","max_tokens":4,"temperature":0,"stream":true}),
    )
    .await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, s.codec.expected("ab", 4));
    stop(s).await;
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let s = start(1, 256).await;
    let (st, v) = post(&s, "/v1/embeddings", json!({"input":["a","bc"]})).await;
    assert_eq!(st, 200, "{v}");
    let d = v["data"].as_array().unwrap();
    assert_eq!(d.len(), 2);
    let e: Vec<f64> = d[1]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let norm: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-6);
    assert_eq!(v["usage"]["prompt_tokens"], 2 + 3);
    let (_, b) = post(
        &s,
        "/v1/embeddings",
        json!({"input":"bc","encoding_format":"base64"}),
    )
    .await;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let f: Vec<f64> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(f.len(), e.len());
    for (x, y) in f.iter().zip(&e) {
        assert!((x - y).abs() < 1e-6);
    }
    stop(s).await;
}

#[tokio::test]
async fn tokenize_detokenize_apply_template() {
    let s = start(1, 256).await;
    let (_, v) = post(&s, "/tokenize", json!({"content":"hi","add_special":true})).await;
    assert_eq!(v["tokens"], json!([super::fake::BOS, 104, 105]));
    let (_, v) = post(&s, "/tokenize", json!({"content":"hi","with_pieces":true})).await;
    assert_eq!(
        v["tokens"],
        json!([{"id":104,"piece":"h"},{"id":105,"piece":"i"}])
    );
    let (_, v) = post(&s, "/detokenize", json!({"tokens":[104,105]})).await;
    assert_eq!(v["content"], "hi");
    let (st, v) = post(&s, "/detokenize", json!({"tokens":[1_000_000]})).await;
    assert_error(st, &v, 400, "invalid_request_error");
    let (_, v) = post(
        &s,
        "/apply-template",
        json!({"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"u"}]}]}),
    )
    .await;
    assert_eq!(v["prompt"], "system: s\nuser: u\nassistant: ");
    stop(s).await;
}

#[tokio::test]
async fn error_cases_have_status_and_envelope() {
    let s = start(1, 64).await;
    let client = reqwest::Client::new();
    // Malformed JSON.
    let r = client
        .post(format!("{}/v1/chat/completions", s.base))
        .body("{not json")
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_error(st, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );
    // Wrong field type.
    let (st, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"messages":[{"role":"user","content":"a"}],"max_tokens":"ten"}),
    )
    .await;
    assert_error(st, &v, 400, "invalid_request_error");
    // Empty messages.
    let (st, v) = post(&s, "/v1/chat/completions", json!({"messages":[]})).await;
    assert_error(st, &v, 400, "invalid_request_error");
    assert_eq!(v["error"]["param"], "messages");
    // Prompt longer than the slot context (64): states n_ctx and the prompt's token count.
    let long = "x".repeat(100);
    let (st, v) = post(&s, "/v1/completions", json!({"prompt": long})).await;
    assert_error(st, &v, 400, "exceed_context_size_error");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("101 tokens") && m.contains("n_ctx = 64"), "{m}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["n_prompt_tokens"], 101);
    assert_eq!(v["error"]["n_ctx"], 64);
    // Bad sampling values.
    let (st, v) = post(&s, "/v1/completions", json!({"prompt":"a","n":0})).await;
    assert_error(st, &v, 400, "invalid_request_error");
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"prompt":"a","logit_bias":{"5":"high"}}),
    )
    .await;
    assert_error(st, &v, 400, "invalid_request_error");
    // Unknown route.
    let (st, v) = post(&s, "/v2/nothing", json!({})).await;
    assert_error(st, &v, 404, "not_found_error");
    let m = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        super::metrics::sample(&m, "requests_failed_total"),
        Some(7.0)
    );
    stop(s).await;
}

#[tokio::test]
async fn api_key_is_checked_except_on_health() {
    let s = start_with(args(1, 256, Some("sekret")), Duration::ZERO).await;
    wait_ready(&s).await;
    let c = reqwest::Client::new();
    let r = c.get(format!("{}/v1/models", s.base)).send().await.unwrap();
    let st = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_error(st, &v, 401, "authentication_error");
    let r = c
        .get(format!("{}/v1/models", s.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{}/v1/models", s.base))
        .bearer_auth("sekret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stop(s).await;
}

#[tokio::test]
async fn disconnect_frees_slot_for_queued_request() {
    let s = start(1, 4096).await;
    let c = reqwest::Client::new();
    let long = c
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"prompt":"a","max_tokens":3000,"temperature":0,"stream":true}))
        .send()
        .await
        .unwrap();
    let mut body = long.bytes_stream();
    body.next().await.unwrap().unwrap();
    // A second request queues behind the first.
    let base = s.base.clone();
    let queued = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt":"b","max_tokens":2,"temperature":0}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(body);
    let v = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .expect("queued request never ran")
        .unwrap();
    assert_eq!(v["choices"][0]["text"], s.codec.expected("b", 2));
    let m = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        super::metrics::sample(&m, "requests_cancelled_total"),
        Some(1.0)
    );
    assert_eq!(
        super::metrics::sample(&m, "queue_stall_steps_total"),
        Some(0.0)
    );
    stop(s).await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_request_finish() {
    let s = start(1, 4096).await;
    let base = s.base.clone();
    let req = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt":"z","max_tokens":200,"temperature":0}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.shutdown.cancel();
    let v = req.await.unwrap();
    assert_eq!(v["choices"][0]["text"], s.codec.expected("z", 200));
    s.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn past_the_slots_and_the_queue_requests_get_503_with_retry_after() {
    let mut a = args(1, 4096, None);
    a.max_queue = 1;
    let s = start_with(a, Duration::ZERO).await;
    wait_ready(&s).await;
    let c = reqwest::Client::new();
    let long = |p: &str| {
        c.post(format!("{}/v1/completions", s.base))
            .json(&json!({"prompt": p, "max_tokens": 3000, "temperature": 0, "stream": true}))
            .send()
    };
    // One running (its stream open), one waiting: the slot and the queue are full.
    let running = long("a").await.unwrap();
    assert_eq!(running.status(), 200);
    let mut running = running.bytes_stream();
    running.next().await.unwrap().unwrap();
    let waiting = long("b").await.unwrap();
    assert_eq!(waiting.status(), 200);
    let r = c
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"messages": [{"role": "user", "content": "c"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "queue_full", "{b}");
    let (st, _) = post(&s, "/v1/embeddings", json!({"input": "d"})).await;
    assert_eq!(st, 503, "embeddings share the bound");
    // A request that ends (its stream dropped) gives its place back.
    drop(running);
    drop(waiting);
    let mut ok = false;
    for _ in 0..100 {
        let (st, v) = post(
            &s,
            "/v1/completions",
            json!({"prompt": "e", "max_tokens": 2, "temperature": 0}),
        )
        .await;
        if st == 200 {
            assert_eq!(v["choices"][0]["text"], s.codec.expected("e", 2));
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the places were never given back");
    stop(s).await;
}

#[tokio::test]
async fn native_completion_has_llama_server_shape() {
    let s = start(2, 512).await;
    let prompt = "abc";
    let want = s.codec.expected(prompt, 6);
    let body = json!({"prompt": prompt, "n_predict": 6, "temperature": 0, "return_tokens": true,
                      "n_probs": 2, "id_slot": 1});
    let (st, v) = post(&s, "/completion", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"], want);
    assert_eq!(v["stop"], true);
    assert_eq!(v["stop_type"], "limit");
    assert_eq!(v["id_slot"], 1);
    assert_eq!(v["tokens_predicted"], 6);
    assert_eq!(v["tokens_evaluated"], 4);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(v["generation_settings"]["n_predict"], 6);
    assert_eq!(v["generation_settings"]["temperature"], 0.0);
    assert_eq!(v["timings"]["predicted_n"], 6);
    let probs = v["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), 6);
    assert_eq!(probs[0]["top_logprobs"].as_array().unwrap().len(), 2);
    // Again on slot 1: the prompt is reused from its cache.
    let (_, again) = post(&s, "/completions", body.clone()).await;
    assert_eq!(again["content"], want);
    assert_eq!(again["timings"]["cache_n"], 3);
    // cache_prompt false evaluates it all.
    let mut b = body.clone();
    b["cache_prompt"] = json!(false);
    let (_, cold) = post(&s, "/completion", b).await;
    assert_eq!(cold["timings"]["cache_n"], 0);
    assert_eq!(cold["content"], want);
    // Streamed: chunks then the final object, no [DONE].
    let mut b = body.clone();
    b["stream"] = json!(true);
    let events = sse(&s, "/completion", b).await;
    let chunks: Vec<Value> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["stop"], true);
    assert_eq!(last["stop_type"], "limit");
    assert!(last["timings"].is_object());
    let text: String = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| {
            assert_eq!(c["stop"], false);
            c["content"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, want);
    // Token ids and a list of prompts: an array of results.
    let (_, many) = post(
        &s,
        "/completion",
        json!({"prompt": [[super::fake::BOS, 97, 98, 99], "abc"],
                                                    "n_predict": 3, "temperature": 0}),
    )
    .await;
    let many = many.as_array().unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(many[0]["content"], many[1]["content"]);
    // n_predict 0 only evaluates the prompt.
    let (_, zero) = post(&s, "/completion", json!({"prompt": "abc", "n_predict": 0})).await;
    assert_eq!(zero["content"], "");
    assert_eq!(zero["tokens_predicted"], 0);
    // A stop word is reported.
    let word = &want[2..4];
    let (_, w) = post(
        &s,
        "/completion",
        json!({"prompt": prompt, "n_predict": 6, "temperature": 0,
                                                 "stop": [word]}),
    )
    .await;
    assert_eq!(w["stop_type"], "word");
    assert_eq!(w["stopping_word"], word);
    // Bad fields are 400s naming them.
    for (b, param) in [
        (json!({"prompt": "a", "id_slot": 7}), "id_slot"),
        (
            json!({"prompt": "a", "samplers": ["mirostat_v9"]}),
            "samplers",
        ),
        (json!({"prompt": {"x": 1}}), "prompt"),
        (json!({"n_predict": 1}), "prompt"),
    ] {
        let (st, v) = post(&s, "/completion", b).await;
        assert_error(st, &v, 400, "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // The fake has no FIM tokens: /infill is refused as llama-server refuses it.
    let (st, v) = post(
        &s,
        "/infill",
        json!({"input_prefix": "a", "input_suffix": "b"}),
    )
    .await;
    assert_error(st, &v, 501, "not_supported_error");
    // /slots shows both slots, slot 1 with its last request.
    let slots: Value = reqwest::get(format!("{}/slots", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2);
    assert_eq!(slots[1]["id"], 1);
    assert_eq!(slots[1]["is_processing"], false);
    assert_eq!(slots[1]["n_ctx"], 256);
    assert!(slots[1]["params"]["samplers"].is_array());
    stop(s).await;
}

#[tokio::test]
async fn native_embedding_and_pooling_none() {
    let mut a = args(1, 256, None);
    a.pooling = Some("none".into());
    let s = start_with(a, Duration::ZERO).await;
    wait_ready(&s).await;
    let (st, v) = post(
        &s,
        "/embedding",
        json!({"content": [super::fake::BOS, 5, "a"]}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v[0]["index"], 0);
    // One row per token, not normalised.
    assert_eq!(v[0]["embedding"].as_array().unwrap().len(), 3);
    assert_eq!(v[0]["embedding"][1], json!([5.0, 1.0, 0.0, 0.0]));
    let (st, v) = post(&s, "/v1/embeddings", json!({"input": "a"})).await;
    assert_error(st, &v, 400, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not OAI compatible")
    );
    stop(s).await;
}

/// Rendering and tokenizing a huge request runs on the blocking pool: while it works (the fake's
/// encode and render block their thread for a second on a text of 1 MiB or more), the worker's one
/// async thread (this test's current_thread runtime) keeps answering `/health` — for each endpoint
/// that renders or tokenizes a body.
#[tokio::test]
async fn a_huge_prompt_does_not_stall_the_async_thread() {
    let codec = Arc::new(FakeCodec::default().with_slow_work(1 << 20, Duration::from_secs(1)));
    let s = start_with_codec(args(1, 4096, None), Duration::ZERO, codec.clone()).await;
    wait_ready(&s).await;
    let big = "a".repeat(2 << 20);
    let chat = json!({"messages": [{"role": "user", "content": big}], "max_tokens": 1});
    let cases = [
        ("/v1/chat/completions", chat.clone()),
        ("/apply-template", chat),
        ("/v1/completions", json!({"prompt": big, "max_tokens": 1})),
        ("/completion", json!({"prompt": big, "n_predict": 1})),
        ("/tokenize", json!({"content": big})),
        ("/v1/embeddings", json!({"input": big})),
        ("/embedding", json!({"content": big})),
    ];
    for (path, body) in cases {
        let url = format!("{}{path}", s.base);
        let req = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
        // Run inline, the slow work would start and end while this runtime is blocked: it is only
        // seen running when it runs on another thread.
        let t0 = std::time::Instant::now();
        while codec.slow_running() == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{path}: the slow work was never seen running: it blocks the async thread"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t1 = std::time::Instant::now();
        let health = reqwest::get(format!("{}/health", s.base)).await.unwrap();
        assert_eq!(health.status(), 200, "{path}");
        assert!(
            t1.elapsed() < Duration::from_millis(500),
            "{path}: /health took {:?} while a huge prompt was prepared",
            t1.elapsed()
        );
        let status = req.await.unwrap();
        assert!(
            matches!(status, 200 | 400),
            "{path}: the huge request is answered: {status}"
        );
    }
    stop(s).await;
}

/// `POST /slots/{id}?action=…` over the fake engine: llama-server's 501 without `--slot-save-path`,
/// its 400s (slot id, action, filename), and save → restore into another slot → the prefix reused →
/// erase, with a refused file leaving the slot as it was.
#[tokio::test]
async fn slot_files_save_restore_and_erase() {
    let s = start(2, 512).await;
    let (st, body) = post(&s, "/slots/0?action=save", json!({"filename": "a.bin"})).await;
    assert_error(st, &body, 501, "not_supported_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--slot-save-path")
    );
    stop(s).await;

    let dir = tempfile::tempdir().unwrap();
    let mut a = args(2, 512, None);
    a.slot_save_path = Some(dir.path().to_path_buf());
    let s = start_with(a, Duration::ZERO).await;
    wait_ready(&s).await;
    for (path, body, want) in [
        (
            "/slots/2?action=save",
            json!({"filename": "a.bin"}),
            "Invalid slot ID",
        ),
        ("/slots/x?action=erase", json!({}), "Invalid slot ID"),
        (
            "/slots/0?action=load",
            json!({"filename": "a.bin"}),
            "Invalid action",
        ),
        ("/slots/0", json!({"filename": "a.bin"}), "Invalid action"),
        (
            "/slots/0?action=save",
            json!({"filename": "../a.bin"}),
            "Invalid filename",
        ),
        (
            "/slots/0?action=save",
            json!({"filename": ".a"}),
            "Invalid filename",
        ),
        ("/slots/0?action=save", json!({}), "'filename' is required"),
        (
            "/slots/0?action=restore",
            json!({"filename": 3}),
            "must be a string",
        ),
        (
            "/slots/0?action=restore",
            json!({"filename": "none.bin"}),
            "Unable to restore slot: none.bin: cannot open",
        ),
    ] {
        let (st, b) = post(&s, path, body).await;
        assert_error(st, &b, 400, "invalid_request_error");
        let m = b["error"]["message"].as_str().unwrap();
        assert!(m.contains(want), "{path}: {m}");
    }
    let prompt = "a prompt worth keeping";
    let complete = |slot: usize| json!({"prompt": prompt, "n_predict": 4, "temperature": 0, "id_slot": slot, "cache_prompt": true});
    let (st, first) = post(&s, "/completion", complete(0)).await;
    assert_eq!(st, 200, "{first}");
    let (st, saved) = post(&s, "/slots/0?action=save", json!({"filename": "a.bin"})).await;
    assert_eq!(st, 200, "{saved}");
    assert_eq!(saved["id_slot"], 0);
    assert_eq!(saved["filename"], "a.bin");
    let n_saved = saved["n_saved"].as_u64().unwrap();
    assert_eq!(n_saved, first["tokens_cached"].as_u64().unwrap());
    let on_disk = std::fs::metadata(dir.path().join("a.bin")).unwrap().len();
    assert_eq!(saved["n_written"].as_u64(), Some(on_disk));
    assert!(saved["timings"]["save_ms"].as_f64().unwrap() >= 0.0);
    let (st, restored) = post(&s, "/slots/1?action=restore", json!({"filename": "a.bin"})).await;
    assert_eq!(st, 200, "{restored}");
    assert_eq!(restored["n_restored"].as_u64(), Some(n_saved));
    assert_eq!(restored["n_read"].as_u64(), Some(on_disk));
    assert!(restored["timings"]["restore_ms"].as_f64().is_some());
    let (_, again) = post(&s, "/completion", complete(1)).await;
    assert_eq!(again["content"], first["content"]);
    assert_eq!(again["id_slot"], 1);
    assert_eq!(
        again["timings"]["cache_n"].as_u64(),
        Some(prompt.len() as u64)
    );
    // A garbage file is refused and slot 1 keeps its cache.
    std::fs::write(dir.path().join("junk.bin"), b"not a slot").unwrap();
    let (st, b) = post(
        &s,
        "/slots/1?action=restore",
        json!({"filename": "junk.bin"}),
    )
    .await;
    assert_error(st, &b, 400, "invalid_request_error");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unable to restore slot: junk.bin"),
        "{b}"
    );
    let (st, erased) = post(&s, "/slots/1?action=erase", json!({})).await;
    assert_eq!(st, 200, "{erased}");
    assert_eq!(erased, json!({"id_slot": 1, "n_erased": n_saved}));
    let (_, cold) = post(&s, "/completion", complete(1)).await;
    assert_eq!(cold["timings"]["cache_n"].as_u64(), Some(0));
    assert_eq!(cold["content"], first["content"]);
    stop(s).await;
}
