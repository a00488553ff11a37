//! End-to-end tests of `serve` with real worker processes on the real SmolLM2-135M models: the official
//! `openai` Python client through the proxy, single-flight loads, idle unload without cutting a stream,
//! MAX_LOADED_MODELS waiting for a stream, a worker killed mid-request, and the supervisor killed.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::assets::SMOL_Q4_1 as SMOL;
use support::assets::SMOL_Q4_K_M as SMOL_K;
use support::process::{children_of, pid_alive, signal};
use support::python::run_python;
use support::server::*;

const SMOL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";
const SMOL_K_ID: &str = "SmolLM2-135M-Instruct.Q4_K_M";

/// (model, endpoint, status, prompt_tokens, completion_tokens) of a `requests` row.
type LoggedRequest = (String, String, i64, Option<i64>, Option<i64>);

async fn state(s: &Server, token: &str, model: &str) -> (String, usize) {
    let (_, m) = s
        .admin_get(token, &format!("/admin/api/models/{model}"))
        .await;
    (
        m["state"].as_str().unwrap_or("?").to_string(),
        m["sessions"].as_array().map_or(0, |a| a.len()),
    )
}

fn chat(model: &str, stream: bool, max_tokens: u32) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "user", "content": "Write a short poem about the sea."}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_client_streaming_and_non_streaming_through_the_proxy() {
    let s = Server::start(&[SMOL], &[]).await;
    let out = run_python(
        &format!("{}/v1", s.base),
        r#"
import os, openai
c = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key="unused")
m = "SmolLM2-135M-Instruct.Q4_1"
msgs = [{"role": "user", "content": "What is the capital of France?"}]
r = c.chat.completions.create(model=m, messages=msgs, max_tokens=24, temperature=0)
print("NS:" + repr(r.choices[0].message.content))
text = ""
for ch in c.chat.completions.create(model=m, messages=msgs, max_tokens=24, temperature=0, stream=True):
    if ch.choices and ch.choices[0].delta.content:
        text += ch.choices[0].delta.content
print("S:" + repr(text))
"#,
    );
    let ns = out.lines().find_map(|l| l.strip_prefix("NS:")).expect(&out);
    let st = out.lines().find_map(|l| l.strip_prefix("S:")).expect(&out);
    assert!(
        ns.chars().any(|c| c.is_alphabetic()),
        "non-streaming text: {out}"
    );
    assert!(
        st.chars().any(|c| c.is_alphabetic()),
        "streamed text: {out}"
    );
    assert_eq!(ns, st, "greedy: streamed and non-streamed answers agree");
    // A worker process is listening on its port, and it is ours.
    let token = s.login().await;
    let w = worker_of(&s, &token, SMOL_ID).await.expect("a worker");
    let pid = w["pid"].as_u64().unwrap() as u32;
    assert!(
        s.workers().contains(&pid),
        "the worker is the supervisor's child"
    );
    let port = w["port"].as_u64().unwrap();
    let h: Value = s
        .http
        .get(format!("http://127.0.0.1:{port}/props"))
        .bearer_auth(worker_key(pid))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["instance"], w["instance"]);
    // `requests` (the real SQLite file) has both rows with usage for the non-streamed one.
    let db_path = s.data_dir().join("cyber-inference.db");
    let url = format!("sqlite://{}?mode=ro", db_path.display());
    let deadline = Instant::now() + Duration::from_secs(5);
    let rows = loop {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let rows: Vec<LoggedRequest> = sqlx::query_as(
            "SELECT model, endpoint, status, prompt_tokens, completion_tokens FROM requests ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        if rows.len() >= 2 || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(
            (r.0.as_str(), r.1.as_str(), r.2),
            (SMOL_ID, "/v1/chat/completions", 200)
        );
    }
    assert!(
        rows[0].3.unwrap_or(0) > 0 && rows[0].4.unwrap_or(0) > 0,
        "usage logged: {rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_concurrent_first_requests_start_exactly_one_worker() {
    let s = Server::start(&[SMOL], &[]).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let http = s.http.clone();
        let url = format!("{}/v1/completions", s.base);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"model": SMOL_ID, "prompt": format!("{i} + {i} ="), "max_tokens": 4, "temperature": 0}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for t in tasks {
        let (st, body) = t.await.unwrap();
        assert_eq!(st, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["choices"][0]["text"].is_string(), "{body}");
    }
    let token = s.login().await;
    let (st, sessions) = state(&s, &token, SMOL_ID).await;
    assert_eq!((st.as_str(), sessions), ("ready", 1), "one worker session");
    assert_eq!(s.workers().len(), 1, "one worker process");
}

/// A completion prompt the model continues without end (it counts), so a stream lasts `max_tokens`.
const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,";

/// Decode speed of `model` on this machine now (tokens/s): one tiny request loads it, then a greedy
/// 48-token completion is timed.
async fn decode_rate(s: &Server, model: &str) -> f64 {
    let mut secs = 0.0;
    let mut tokens = 0.0;
    for max in [1, 48] {
        let t = Instant::now();
        let r = s
            .http
            .post(format!("{}/v1/completions", s.base))
            .json(&json!({"model": model, "prompt": COUNTING, "max_tokens": max, "temperature": 0}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        secs = t.elapsed().as_secs_f64();
        tokens = v["usage"]["completion_tokens"].as_f64().unwrap();
    }
    tokens / secs
}

/// Starts a streaming completion of `model` long enough to last about `secs` at `rate` tokens/s (the
/// context of the tests' servers leaves 2048 positions per slot); returns it after its first chunk.
async fn long_stream(
    s: &Server,
    model: &str,
    rate: f64,
    secs: f64,
) -> (reqwest::Response, String, Instant) {
    let max_tokens = ((rate * secs).ceil() as u32).clamp(64, 1900);
    let t0 = Instant::now();
    let mut r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(
            &json!({"model": model, "prompt": COUNTING, "max_tokens": max_tokens,
                       "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    (r, first, t0)
}

/// Reads the rest of a stream; returns the whole body.
async fn drain(mut r: reqwest::Response, mut body: String) -> String {
    while let Some(c) = r.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&c));
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_models_are_unloaded_but_a_long_stream_is_not_cut() {
    const TIMEOUT: u64 = 2;
    let s = Server::start(
        &[SMOL],
        &[
            ("MODEL_IDLE_TIMEOUT", "2"),
            ("DEFAULT_CONTEXT_SIZE", "8192"),
        ],
    )
    .await;
    let token = s.login().await;
    let rate = decode_rate(&s, SMOL_ID).await;
    // A stream of about 3 timeouts, read as it comes.
    let (r, first, t0) = long_stream(&s, SMOL_ID, rate, 3.0 * TIMEOUT as f64).await;
    let pid = worker_of(&s, &token, SMOL_ID).await.expect("worker")["pid"]
        .as_u64()
        .unwrap();
    let reader = tokio::spawn(drain(r, first));
    // While it runs, past the timeout, the model stays ready with its request in flight.
    let mut checked_past_timeout = false;
    while !reader.is_finished() {
        let w = worker_of(&s, &token, SMOL_ID).await;
        if reader.is_finished() {
            break;
        }
        let w = w.expect("the worker is gone while its stream runs");
        assert_eq!(w["state"], "ready", "{w}");
        assert_eq!(w["pid"].as_u64(), Some(pid), "never restarted");
        if t0.elapsed() > Duration::from_millis(TIMEOUT * 1000 + 1000) {
            checked_past_timeout = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = reader.await.unwrap();
    let streamed = t0.elapsed();
    assert!(
        checked_past_timeout,
        "the stream ({streamed:?} at {rate:.0} tokens/s) must outlive the {TIMEOUT} s timeout by a second"
    );
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "complete stream: {body}"
    );
    assert!(!body.contains("\"error\""), "{body}");
    assert_eq!(state(&s, &token, SMOL_ID).await.1, 1, "never restarted");
    // Then, idle: the worker goes away within a few seconds and the model shows stopped.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (st, _) = state(&s, &token, SMOL_ID).await;
        if st == "stopped" && !pid_alive(pid as u32) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {st} after the idle timeout:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s.workers().is_empty());
    let (_, m) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    let reason = m["sessions"][0]["stop_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("idle"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_one_model_slot_b_waits_for_the_stream_of_a() {
    let s = Server::start(
        &[SMOL, SMOL_K],
        &[("MAX_LOADED_MODELS", "1"), ("DEFAULT_CONTEXT_SIZE", "8192")],
    )
    .await;
    let token = s.login().await;
    let rate = decode_rate(&s, SMOL_ID).await;
    // Never two worker processes at once, watched throughout.
    let sup = s.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(children_of(sup).len());
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    let (a, a_first, _) = long_stream(&s, SMOL_ID, rate, 6.0).await;
    let a_reader = tokio::spawn(async move {
        let body = drain(a, a_first).await;
        (body, Instant::now())
    });
    let b = {
        let http = s.http.clone();
        let url = format!("{}/v1/chat/completions", s.base);
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&chat(SMOL_K_ID, false, 8))
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.text().await.unwrap(), Instant::now())
        })
    };
    // B has been asked for while A streams: it waits, and is not started.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a_busy = worker_of(&s, &token, SMOL_ID)
        .await
        .is_some_and(|w| w["inflight"] == 1);
    assert!(
        a_busy && !a_reader.is_finished(),
        "A's stream (at {rate:.0} tokens/s) must still run"
    );
    assert!(!b.is_finished(), "B must wait while A streams");
    assert_eq!(state(&s, &token, SMOL_K_ID).await.1, 0, "B not started yet");
    let (a_body, a_done) = a_reader.await.unwrap();
    assert!(
        a_body.trim_end().ends_with("data: [DONE]"),
        "A is never cut: {a_body}"
    );
    assert!(!a_body.contains("\"error\""), "{a_body}");
    let (st, body, b_done) = b.await.unwrap();
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{body}");
    assert!(b_done > a_done);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(watcher.join().unwrap(), 1, "never two workers at once");
    let (st, sessions) = state(&s, &token, SMOL_ID).await;
    assert_eq!((st.as_str(), sessions), ("stopped", 1));
    let (_, m) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    let reason = m["sessions"][0]["stop_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("MAX_LOADED_MODELS=1"), "{reason}");
    assert_eq!(state(&s, &token, SMOL_K_ID).await, ("ready".into(), 1));
    assert_eq!(s.workers().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_request_gives_502_and_the_next_request_reloads() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": SMOL_ID, "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pid = worker_of(&s, &token, SMOL_ID).await.unwrap()["pid"]
        .as_u64()
        .unwrap();
    let long = {
        let http = s.http.clone();
        let url = format!("{}/v1/completions", s.base);
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"model": SMOL_ID, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 400, "temperature": 0}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    // Wait until the request is in flight, then kill the worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker_of(&s, &token, SMOL_ID)
        .await
        .is_none_or(|w| w["inflight"] == 0)
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(signal(pid, "KILL"), "kill -KILL {pid}");
    let (st, body) = long.await.unwrap();
    assert_eq!(
        st, 502,
        "the request in flight fails with 502 (not 200: it must not have finished first): {body}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert!(v["error"]["message"].is_string());
    // The exit is noticed by the supervisor's wait on the process, a moment after the socket closed.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (st, _) = state(&s, &token, SMOL_ID).await;
        if st == "failed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {st} after the worker was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next request loads it again.
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": SMOL_ID, "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let new = worker_of(&s, &token, SMOL_ID).await.unwrap()["pid"]
        .as_u64()
        .unwrap();
    assert_ne!(new, pid);
    let (_, m) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    let reason = m["sessions"][1]["stop_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("signal 9"), "{reason}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("cyber_inference_worker_crashes_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_stream_ends_the_stream_with_an_error_in_openai_shape() {
    let s = Server::start(&[SMOL], &[("DEFAULT_CONTEXT_SIZE", "8192")]).await;
    let token = s.login().await;
    let rate = decode_rate(&s, SMOL_ID).await;
    let pid = worker_of(&s, &token, SMOL_ID).await.unwrap()["pid"]
        .as_u64()
        .unwrap();
    let (mut r, mut body, _) = long_stream(&s, SMOL_ID, rate, 20.0).await;
    // Some tokens have come through, then the worker dies.
    while body.matches("\"text\"").count() < 3 {
        let c = r.chunk().await.unwrap().expect("the stream ended early");
        body.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(signal(pid, "KILL"), "kill -KILL {pid}");
    let body = drain(r, body).await;
    assert!(
        !body.contains("[DONE]"),
        "a cut stream must not look complete: {body}"
    );
    let last = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .unwrap();
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(v["error"]["type"], "server_error", "{last}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("worker"),
        "{last}"
    );
    // The request is logged as a 502.
    let db_path = s.data_dir().join("cyber-inference.db");
    let url = format!("sqlite://{}?mode=ro", db_path.display());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM requests WHERE status = 502")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no 502 row in `requests`");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_resource_monitor_samples_the_machine_the_worker_and_no_gpu_without_nvml() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": SMOL_ID, "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pid = worker_of(&s, &token, SMOL_ID).await.unwrap()["pid"]
        .as_u64()
        .unwrap();
    // A sample (every 2 s) that has seen the worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sample = loop {
        let (st, v) = s.admin_get(&token, "/admin/api/resources").await;
        assert_eq!(st, 200);
        let w = v["sample"]["workers"].as_array().and_then(|w| {
            w.iter()
                .find(|w| w["pid"].as_u64() == Some(pid) && w["rss_bytes"].as_u64() > Some(0))
                .cloned()
        });
        if let Some(w) = w {
            break (v["sample"].clone(), w);
        }
        assert!(Instant::now() < deadline, "no worker in {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (m, w) = sample;
    assert_eq!(w["model"], SMOL_ID);
    // The worker maps a 90 MB file and holds its KV cache: tens of MiB at least.
    assert!(w["rss_bytes"].as_u64().unwrap() > 20 << 20, "{w}");
    let total = m["memory_total_bytes"].as_u64().unwrap();
    let used = m["memory_used_bytes"].as_u64().unwrap();
    let avail = m["memory_available_bytes"].as_u64().unwrap();
    assert!(total > 0 && used + avail == total, "{m}");
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        m["per_core_percent"].as_array().unwrap().len() >= cores,
        "{m}"
    );
    let labels: Vec<&str> = m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["total_bytes"].as_u64() > Some(0))
        .filter_map(|d| d["label"].as_str())
        .collect();
    assert_eq!(labels, ["models_dir", "data_dir"], "{m}");
    assert!(m["supervisor_rss_bytes"].as_u64() > Some(0), "{m}");
    // No NVML library on the machine: no GPU, and no error.
    let nvml = [
        "/usr/lib",
        "/usr/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ]
    .iter()
    .any(|d| std::path::Path::new(d).join("libnvidia-ml.so.1").exists());
    if !nvml {
        assert_eq!(m["gpus"], json!([]), "{m}");
        assert!(!s.log().contains("NVML"), "no NVML warning: {}", s.log());
    }
    // History keeps the samples for the UI.
    let (_, h) = s.admin_get(&token, "/admin/api/resources/history").await;
    assert!(!h["samples"].as_array().unwrap().is_empty());
    // The measured peak RSS is recorded for the admission estimate.
    let (_, model) = s
        .admin_get(&token, &format!("/admin/api/models/{SMOL_ID}"))
        .await;
    assert!(
        model["sessions"][0]["peak_rss_bytes"].as_i64() > Some(20 << 20),
        "{model}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_supervisor_leaves_no_worker() {
    let mut s = Server::start(&[SMOL], &[]).await;
    let r = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"model": SMOL_ID, "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let workers = s.workers();
    assert_eq!(workers.len(), 1);
    let mut child = s.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|&p| pid_alive(p)) {
        assert!(
            Instant::now() < deadline,
            "worker {workers:?} outlived the supervisor"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
