//! Fault tests of the supervisor (issue 17): clients and workers that misbehave must not hold up
//! unloads or requests without bound.

mod supervisor_common;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use supervisor_common::*;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";
/// DRAIN_TIMEOUT the tests run with (seconds).
const DRAIN: u64 = 2;

/// A streamed chat that cannot end on its own soon: end-of-text tokens are banned and the budget is
/// thousands of tokens.
fn endless_stream() -> Value {
    json!({"model": SMOL_ID, "max_tokens": 7000, "temperature": 0, "stream": true,
           "logit_bias": {"0": -100, "1": -100, "2": -100},
           "messages": [{"role": "user", "content": "Count from 1 to 10000."}]})
}

async fn chat_status(s: &Server) -> (u16, Option<String>, String) {
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .timeout(Duration::from_secs(30))
        .json(&json!({"model": SMOL_ID, "max_tokens": 2, "temperature": 0,
                      "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("the request must be answered within 30 s");
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry, r.text().await.unwrap())
}

/// Waits until the model's worker reports `n` requests in flight; returns the worker's pid.
async fn wait_inflight(s: &Server, token: &str, n: u64) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(w) = worker_of(s, token, SMOL_ID).await
            && w["state"] == "ready"
            && w["inflight"].as_u64() == Some(n)
        {
            return w["pid"].as_u64().unwrap() as u32;
        }
        assert!(
            Instant::now() < deadline,
            "no request in flight:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unload(s: &Server, token: &str) -> tokio::task::JoinHandle<u16> {
    let http = s.http.clone();
    let url = format!("{}/admin/api/models/{SMOL_ID}/unload", s.base);
    let token = token.to_string();
    tokio::spawn(async move {
        http.post(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

async fn wait_no_worker(s: &Server, token: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    while worker_of(s, token, SMOL_ID).await.is_some() || !s.workers().is_empty() {
        assert!(
            t0.elapsed() < within,
            "the worker is still there after {within:?}:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// A client that opens an SSE stream and never reads a byte of it does not hold up an unload: after
/// DRAIN_TIMEOUT its request is cut, the reason logged, and the worker stops.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_a_stream_does_not_hold_up_an_unload() {
    let s = Server::start(
        &[SMOL],
        &[
            ("DRAIN_TIMEOUT", &DRAIN.to_string()),
            ("DEFAULT_CONTEXT_SIZE", "8192"),
        ],
    )
    .await;
    let token = s.login().await;
    let body = endless_stream().to_string();
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_inflight(&s, &token, 1).await;
    // Let it stream for a moment (nothing is read).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let h = unload(&s, &token);
    wait_no_worker(&s, &token, Duration::from_secs(DRAIN + 8)).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(DRAIN),
        "the request was cut before DRAIN_TIMEOUT: {took:?}"
    );
    assert_eq!(h.await.unwrap(), 200);
    assert!(
        s.log().contains("drain deadline passed"),
        "the cut is logged:\n{}",
        s.log()
    );
    drop(sock);
    // The model loads again for the next request.
    assert_eq!(chat_status(&s).await.0, 200);
}

/// A request for a model whose unload is stuck (its worker hangs mid-stream: SIGSTOP) waits at most
/// DRAIN_TIMEOUT, then gets 503 with `Retry-After`; the hung stream's client gets an error event; once
/// the worker is killed the next request loads the model again.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_for_a_model_stuck_draining_gets_503_with_retry_after() {
    let s = Server::start(&[SMOL], &[("DRAIN_TIMEOUT", &DRAIN.to_string())]).await;
    let token = s.login().await;
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&endless_stream())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stream = tokio::spawn(async move { r.text().await.unwrap_or_default() });
    let pid = wait_inflight(&s, &token, 1).await;
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let h = unload(&s, &token);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let (status, retry, body) = chat_status(&s).await;
    let waited = t0.elapsed();
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "a Retry-After header: {body}");
    assert!(body.contains("being unloaded"), "{body}");
    assert!(
        waited < Duration::from_secs(DRAIN + 3),
        "waited {waited:?} for a draining model"
    );
    let text = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .expect("the hung stream is ended")
        .unwrap();
    assert!(
        text.contains("DRAIN_TIMEOUT") && text.contains("\"error\""),
        "the cut stream ends with an error event: …{}",
        &text[text.len().saturating_sub(400)..]
    );
    // SIGTERM cannot reach a stopped process: SIGKILL after the grace period.
    wait_no_worker(&s, &token, Duration::from_secs(20)).await;
    let _ = h.await;
    assert_eq!(chat_status(&s).await.0, 200);
}

/// A worker that hangs while ready (SIGSTOP) is found by the health probes and killed; the next request
/// loads the model again and is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_worker_is_detected_and_replaced() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    assert_eq!(chat_status(&s).await.0, 200);
    let pid = worker_of(&s, &token, SMOL_ID).await.unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    let t0 = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // 3 probes 5 s apart, each waiting 5 s: found within about 20 s.
    while pid_alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the hung worker {pid} is still there:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        s.log().contains("hung:"),
        "the reason is logged:\n{}",
        s.log()
    );
    let (st, _, body) = chat_status(&s).await;
    assert_eq!(st, 200, "{body}");
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    assert_ne!(w["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(s.workers().len(), 1, "no orphan: one worker");
}

/// A worker SIGKILLed mid-stream: the client's stream ends with an error event, and the next request
/// loads the model again.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_is_reloaded() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&endless_stream())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let stream = tokio::spawn(async move { r.text().await.unwrap_or_default() });
    let pid = wait_inflight(&s, &token, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let text = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .expect("the stream ends when its worker dies")
        .unwrap();
    let last = text
        .lines()
        .rfind(|l| l.starts_with("data: "))
        .unwrap_or_default();
    assert!(
        last.contains("\"error\""),
        "the last event is an error: {last}"
    );
    let (st, _, body) = chat_status(&s).await;
    assert_eq!(st, 200, "{body}");
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    assert_ne!(w["pid"].as_u64(), Some(u64::from(pid)));
}
