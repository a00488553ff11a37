//! Fault tests of the supervisor (issue 17): clients and workers that misbehave must not hold up
//! unloads or requests without bound.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::assets::{self, SMOL_Q4_1 as SMOL};
use support::files::files_in;
use support::hub::{HfServer, Served};
use support::net::connect_with_small_buffers;
use support::process::{pid_alive, signal};
use support::python::{python, sqlite};
use support::server::{Server, worker_metric, worker_of};

const SMOL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";
/// DRAIN_TIMEOUT the tests run with (seconds).
const DRAIN: u64 = 2;
/// IDLE_WRITE_TIMEOUT the idle-write test runs with (seconds; the default is 60).
const IDLE_WRITE: u64 = 2;

/// A streamed chat that cannot end on its own soon: end-of-text tokens are banned and the budget is
/// thousands of tokens.
fn endless_stream() -> Value {
    json!({"model": SMOL_ID, "max_tokens": 7000, "temperature": 0, "stream": true,
           "logit_bias": {"0": -100, "1": -100, "2": -100},
           "messages": [{"role": "user", "content": "Count from 1 to 10000."}]})
}

async fn chat_status(s: &Server) -> (u16, Option<String>, String) {
    chat_status_of(s, SMOL_ID).await
}

/// A short greedy chat with `model`: (status, Retry-After, body).
async fn chat_status_of(s: &Server, model: &str) -> (u16, Option<String>, String) {
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .timeout(Duration::from_secs(30))
        .json(&json!({"model": model, "max_tokens": 2, "temperature": 0,
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
    assert_bounded_rss(&s);
}

/// A client that stops reading a big stream (the kernel's socket buffers and the proxy's fill up) is
/// cut after IDLE_WRITE_TIMEOUT, with no unload or drain involved: the reason is logged, the request is
/// counted as 499, the worker's slot is freed, and the same worker serves the next request.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_after_the_idle_write_timeout() {
    let s = Server::start(
        &[SMOL],
        &[
            ("IDLE_WRITE_TIMEOUT", &IDLE_WRITE.to_string()),
            ("DEFAULT_CONTEXT_SIZE", "8192"),
        ],
    )
    .await;
    let token = s.login().await;
    // Four choices with 20 alternatives per token make each step several KiB: the buffers fill
    // within a few dozen steps.
    let mut body = endless_stream();
    body["n"] = json!(4);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(20);
    let body = body.to_string();
    let t0 = Instant::now();
    // Small socket buffers: the proxy's writes stall after tens of KiB, not MiBs.
    let mut sock = connect_with_small_buffers(s.port).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut sock, format!("{head}{body}").as_bytes())
        .await
        .unwrap();
    let pid = wait_inflight(&s, &token, 1).await;
    assert_eq!(
        worker_metric(&s, &token, SMOL_ID, "requests_processing").await,
        4.0,
        "the worker generates the client's four choices"
    );
    // Nothing is read: once the buffers are full the proxy waits IDLE_WRITE_TIMEOUT, then drops the
    // request (its lease ends). The old fixed 60 s timeout would not cut it within this deadline.
    let within = Duration::from_secs(55);
    loop {
        let w = worker_of(&s, &token, SMOL_ID)
            .await
            .expect("the worker stays");
        if w["inflight"].as_u64() == Some(0) {
            break;
        }
        assert!(
            t0.elapsed() < within,
            "the request was not cut within {within:?} (IDLE_WRITE_TIMEOUT={IDLE_WRITE}):\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("cut {:.1} s after the request", t0.elapsed().as_secs_f64());
    let log = s.log();
    assert!(
        log.contains(&format!(
            "the client took no data for {IDLE_WRITE} s (IDLE_WRITE_TIMEOUT)"
        )),
        "the reason is logged:\n{log}"
    );
    assert!(
        !log.contains("drain deadline passed"),
        "no drain was involved:\n{log}"
    );
    // The worker noticed the closed connection: its slot is free again.
    let t1 = Instant::now();
    while worker_metric(&s, &token, SMOL_ID, "requests_processing").await != 0.0 {
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "the worker's slot is still busy after the cut"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _, b) = chat_status(&s).await;
    assert_eq!(st, 200, "{b}");
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    assert_eq!(w["pid"].as_u64(), Some(u64::from(pid)), "the same worker");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!(
            "cyber_inference_requests_total{{model=\"{SMOL_ID}\",status=\"499\"}} 1"
        )),
        "the dropped request is counted as 499:\n{metrics}"
    );
    drop(sock);
    assert_bounded_rss(&s);
}

/// The Ollama, Anthropic and OpenAI Responses streams follow the same idle-write rule as the OpenAI
/// proxy: a client that stops reading one of them is cut after IDLE_WRITE_TIMEOUT (the reason logged
/// with its endpoint, counted as 499), the worker's slot is freed and the same worker serves the next
/// request. (Before, their writers waited for the client without bound, holding the slot and lease.)
///
/// Ignored in CI: on a loaded 2-core machine the weak model may end its reply (EOS) before its small
/// events fill the kernel's buffers (50-170 KB), and then nothing stalls; run it with `--ignored` on a
/// quiet machine. The rule itself is unit-tested (`foreign::a_stream_send_gives_up_after_…`).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "timing-dependent on a loaded machine; run with --ignored"]
async fn foreign_api_streams_are_cut_after_the_idle_write_timeout() {
    let s = Server::start(
        &[SMOL],
        &[
            ("IDLE_WRITE_TIMEOUT", &IDLE_WRITE.to_string()),
            ("DEFAULT_CONTEXT_SIZE", "8192"),
        ],
    )
    .await;
    let token = s.login().await;
    // Greedy SmolLM2 repeats this for thousands of tokens; each token is one line or event of
    // ~150 bytes, so the small buffers fill within a few hundred tokens.
    let ask = "Repeat the word hello forever: hello hello hello hello";
    let cases = [
        (
            "/api/chat",
            json!({"model": SMOL_ID, "stream": true,
                   "options": {"temperature": 0, "num_predict": 7000},
                   "messages": [{"role": "user", "content": ask}]}),
        ),
        (
            "/v1/messages",
            json!({"model": SMOL_ID, "stream": true, "max_tokens": 7000, "temperature": 0,
                   "messages": [{"role": "user", "content": ask}]}),
        ),
        (
            "/v1/responses",
            json!({"model": SMOL_ID, "stream": true, "max_output_tokens": 7000,
                   "temperature": 0, "store": false, "input": ask}),
        ),
    ];
    for (n, (path, body)) in cases.iter().enumerate() {
        let body = body.to_string();
        let t0 = Instant::now();
        let mut sock = connect_with_small_buffers(s.port).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut sock, format!("{head}{body}").as_bytes())
            .await
            .unwrap();
        let pid = wait_inflight(&s, &token, 1).await;
        // The kernel's and the proxy's buffers take some 50-150 KB (a few hundred to a thousand
        // tokens of these small events), which a loaded machine may take a minute to generate; the
        // budget of 7000 tokens is far more than fits.
        let within = Duration::from_secs(150);
        loop {
            let w = worker_of(&s, &token, SMOL_ID)
                .await
                .expect("the worker stays");
            if w["inflight"].as_u64() == Some(0) {
                break;
            }
            assert!(
                t0.elapsed() < within,
                "{path}: the request was not cut within {within:?} (IDLE_WRITE_TIMEOUT={IDLE_WRITE}):\n{}",
                s.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{path}: cut {:.1} s after the request",
            t0.elapsed().as_secs_f64()
        );
        let log = s.log();
        let cuts = log
            .lines()
            .filter(|l| {
                l.contains(&format!(
                    "the client took no data for {IDLE_WRITE} s (IDLE_WRITE_TIMEOUT)"
                )) && l.contains(path)
            })
            .count();
        assert_eq!(
            cuts, 1,
            "{path}: the reason is logged with the endpoint:\n{log}"
        );
        let t1 = Instant::now();
        while worker_metric(&s, &token, SMOL_ID, "requests_processing").await != 0.0 {
            assert!(
                t1.elapsed() < Duration::from_secs(10),
                "{path}: the worker's slot is still busy after the cut"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (st, _, b) = chat_status(&s).await;
        assert_eq!(st, 200, "{b}");
        let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
        assert_eq!(w["pid"].as_u64(), Some(u64::from(pid)), "the same worker");
        let metrics = s.metrics().await;
        assert!(
            metrics.contains(&format!(
                "cyber_inference_requests_total{{model=\"{SMOL_ID}\",status=\"499\"}} {}",
                n + 1
            )),
            "{path}: the dropped request is counted as 499:\n{metrics}"
        );
        drop(sock);
    }
    assert!(
        !s.log().contains("drain deadline passed"),
        "no drain was involved"
    );
    assert_bounded_rss(&s);
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
    assert!(signal(pid, "STOP"));
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
    assert_bounded_rss(&s);
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
    assert!(signal(pid, "STOP"));
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
    assert_eq!(st, 200, "{body}\n{}", s.log());
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    assert_ne!(w["pid"].as_u64(), Some(u64::from(pid)));
    assert_eq!(s.workers().len(), 1, "no orphan: one worker");
    assert_bounded_rss(&s);
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
    assert!(signal(pid, "KILL"));
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
    assert_eq!(st, 200, "{body}\n{}", s.log());
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    assert_ne!(w["pid"].as_u64(), Some(u64::from(pid)));
}

/// Peak resident memory the supervisor may reach in any fault test (issue 17: under 100 MB).
const SUPERVISOR_RSS_LIMIT: u64 = 100 << 20;

fn assert_bounded_rss(s: &Server) {
    let peak = s.peak_rss();
    assert!(
        peak < SUPERVISOR_RSS_LIMIT,
        "supervisor peak RSS {} MiB (limit {} MiB)",
        peak >> 20,
        SUPERVISOR_RSS_LIMIT >> 20
    );
}

/// 500 clients at once on the supervisor: each gets an answer (200, or 503 with Retry-After when the
/// worker's queue is full), none is dropped or left hanging, the supervisor's memory stays bounded and
/// it serves normally afterwards with one worker.
#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_concurrent_connections_are_answered_with_bounded_memory() {
    let s = Server::start(&[SMOL], &[]).await;
    assert_eq!(chat_status(&s).await.0, 200, "warm-up");
    let url = format!("{}/v1/chat/completions", s.base);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..500)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                // One client each: 500 connections, not a pool of a few.
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(240))
                    .build()
                    .unwrap();
                let r = http
                    .post(url)
                    .json(&json!({
                        "model": SMOL_ID,
                        "messages": [{"role": "user", "content": format!("Say the number {i}.")}],
                        "max_tokens": 2,
                    }))
                    .send()
                    .await
                    .map_err(|e| format!("client {i}: {e}"))?;
                let st = r.status().as_u16();
                let retry = r.headers().contains_key("retry-after");
                let body = r.text().await.map_err(|e| format!("client {i}: {e}"))?;
                Ok::<_, String>((st, retry, body))
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for c in clients {
        let (st, retry, body) = c.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        match st {
            200 => {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert!(v["choices"][0]["message"].is_object(), "{body}");
                ok += 1;
            }
            503 => {
                assert!(retry, "a 503 says when to retry: {body}");
                busy += 1;
            }
            _ => panic!("status {st}: {body}"),
        }
    }
    eprintln!(
        "500 clients: {ok} served, {busy} told to retry, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(ok > 0, "some requests are served");
    assert_eq!(chat_status(&s).await.0, 200, "served normally afterwards");
    assert_eq!(s.workers().len(), 1, "one worker");
    assert_bounded_rss(&s);
}

/// The supervisor SIGKILLed while a model loads: its worker does not outlive it (no orphan holding the
/// model's memory and port), and the next start recovers: the model loads again and is served.
#[tokio::test(flavor = "multi_thread")]
async fn the_supervisor_killed_during_a_load_leaves_no_orphan_and_the_next_start_recovers() {
    let mut s = Server::start(&[SMOL], &[]).await;
    let http = s.http.clone();
    let url = format!("{}/v1/chat/completions", s.base);
    let cold = tokio::spawn(async move {
        http.post(url)
            .json(&json!({"model": SMOL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}))
            .send()
            .await
    });
    // Kill as soon as the worker process exists: it is still loading the model then.
    let t0 = Instant::now();
    let workers = loop {
        let w = s.workers();
        if !w.is_empty() {
            break w;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no worker spawned:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let token_before = s.login().await;
    let state = worker_of(&s, &token_before, SMOL_ID).await;
    eprintln!("killing the supervisor with worker {workers:?} in state {state:?}");
    s.kill();
    let _ = cold.await;
    let t0 = Instant::now();
    while workers.iter().any(|&p| pid_alive(p)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "worker {workers:?} outlived its supervisor"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.restart().await;
    let (st, _, body) = chat_status(&s).await;
    assert_eq!(st, 200, "{body}\n{}", s.log());
    assert_eq!(s.workers().len(), 1, "one worker after the restart");
    let token = s.login().await;
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    assert!(!workers.contains(&(w["pid"].as_u64().unwrap() as u32)));
    assert_bounded_rss(&s);
}

/// A worker an earlier supervisor left alive (its parent-death signal did not fire: PDEATHSIG is
/// Linux-only, and it follows the spawning thread) is found through `model_sessions` and killed at the
/// next start — only a process whose command line carries its session's nonce: a recorded pid that now
/// belongs to another program is left alone. Both sessions end up stopped, and the model loads again.
#[tokio::test(flavor = "multi_thread")]
async fn the_next_start_reaps_a_recorded_worker_that_outlived_its_supervisor() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut s = Server::start(&[SMOL], &[]).await;
    assert_eq!(chat_status(&s).await.0, 200);
    let token = s.login().await;
    let w = worker_of(&s, &token, SMOL_ID).await.unwrap();
    let instance = w["instance"].as_str().unwrap().to_owned();
    let session = w["session_id"].as_i64().unwrap();
    // The real worker dies with its supervisor (PDEATHSIG); its session stays recorded as alive.
    s.kill();
    // Stand-ins in their own process groups, as workers are: an orphan with the nonce in its command
    // line, and an unrelated program whose pid a second session records.
    let spawn = |tag: &str| {
        std::process::Command::new("sh")
            .args(["-c", "sleep 120; :", tag])
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut orphan = spawn(&instance);
    let mut other = spawn("not-a-worker");
    let db = s.data_dir().join("cyber-inference.db");
    sqlite(
        &db,
        &format!(
            "UPDATE model_sessions SET pid = {}, status = 'ready' WHERE id = {session}",
            orphan.id()
        ),
    );
    sqlite(
        &db,
        &format!(
            "INSERT INTO model_sessions (model_id, pid, port, instance, status, started_at) \
             SELECT model_id, {}, port, 'another-nonce', 'ready', started_at FROM model_sessions WHERE id = {session}",
            other.id()
        ),
    );
    s.restart().await;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = orphan.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the recorded orphan {} was not reaped:\n{}",
            orphan.id(),
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    assert!(
        s.log()
            .contains(&format!("reaped orphan worker pid {}", orphan.id())),
        "the reaping is logged:\n{}",
        s.log()
    );
    assert!(
        other.try_wait().unwrap().is_none(),
        "a process without the session's nonce is left alone"
    );
    let _ = other.kill();
    let _ = other.wait();
    let live = sqlite(
        &db,
        "SELECT id FROM model_sessions WHERE status IN ('loading', 'ready', 'draining')",
    );
    assert_eq!(live.trim(), "", "no session is left recorded as alive");
    let reason = sqlite(
        &db,
        &format!("SELECT stop_reason FROM model_sessions WHERE id = {session}"),
    );
    assert!(reason.contains("reaped orphan worker"), "{reason}");
    let (st, _, body) = chat_status(&s).await;
    assert_eq!(st, 200, "{body}\n{}", s.log());
    assert_eq!(s.workers().len(), 1, "one worker after the restart");
    assert_bounded_rss(&s);
}

/// The database locked by another process (a backup tool, an sqlite3 shell in a transaction): a
/// change the admin makes is refused with a clear 503 naming the lock, within the busy timeout, not a
/// hang or a crash; inference goes on; once the lock is gone the change goes through and nothing stored
/// before is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_locked_by_another_process_is_a_clear_error_and_loses_nothing() {
    use support::assets::SMOL_Q4_K_M as OTHER;
    const OTHER_ID: &str = "SmolLM2-135M-Instruct.Q4_K_M";
    let s = Server::start(&[SMOL, OTHER], &[]).await;
    let token = s.login().await;
    s.create_key(&token, "before-the-lock").await;
    assert_eq!(chat_status(&s).await.0, 200, "loaded before the lock");
    let db = s.data_dir().join("cyber-inference.db");
    assert!(db.exists(), "no database at {}", db.display());
    let mut locker = std::process::Command::new(python())
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN EXCLUSIVE')\n\
             print('locked', flush=True)\n\
             sys.stdin.read()\n\
             c.execute('ROLLBACK')\n",
        )
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(locker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");

    let t0 = Instant::now();
    let r = s
        .http
        .post(format!("{}/admin/api/keys", s.base))
        .bearer_auth(&token)
        .json(&json!({"name": "during-the-lock"}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let (st, retry) = (r.status().as_u16(), r.headers().contains_key("retry-after"));
    let body = r.text().await.unwrap();
    assert_eq!(st, 503, "{body}");
    assert!(retry, "a 503 says when to retry");
    assert!(
        body.contains("database") && body.contains("locked"),
        "the error names the lock: {body}"
    );
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let (st, _, body) = chat_status(&s).await;
    assert_eq!(st, 200, "inference on a loaded model goes on: {body}");
    // A load cannot record its worker (for reaping after a crash): refused clearly, until the lock goes.
    let (st, retry, body) = chat_status_of(&s, OTHER_ID).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        retry.is_some() && body.contains("database_busy") && body.contains("locked"),
        "{body}"
    );

    drop(locker.stdin.take());
    assert!(locker.wait().unwrap().success());
    let (st, _, body) = chat_status_of(&s, OTHER_ID).await;
    assert_eq!(
        st, 200,
        "the load goes through once the lock is gone: {body}"
    );
    s.create_key(&token, "after-the-lock").await;
    let (st, j) = s.admin_get(&token, "/admin/api/keys").await;
    assert_eq!(st, 200, "{j}");
    let names: Vec<&str> = j["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("{j}"))
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert!(names.contains(&"before-the-lock"), "{names:?}");
    assert!(names.contains(&"after-the-lock"), "{names:?}");
    assert!(!names.contains(&"during-the-lock"), "{names:?}");
    assert_bounded_rss(&s);
}

/// A tmpfs of `bytes` mounted on `dir` for one test (needs root, as CI has), unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, bytes: u64) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "cannot mount a {bytes}-byte tmpfs on {} (this test needs root)",
            dir.display()
        );
        SmallDisk(dir.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A download whose disk fills up while it transfers: it fails with an error that says the disk is
/// full, leaves no partial file and no catalogue row, and the supervisor carries on.
#[tokio::test(flavor = "multi_thread")]
async fn a_download_whose_disk_fills_fails_clearly_and_leaves_nothing() {
    use support::assets::MINILM;
    let hf = HfServer::start().await;
    hf.state
        .add_repo("test/minilm", vec![Served::asset(MINILM, MINILM)]);
    // About 6 MiB/s, so the disk can be filled while the transfer runs.
    *hf.state.faults.chunk_delay.lock().unwrap() = Some(Duration::from_millis(10));
    let outer = tempfile::tempdir().unwrap();
    let mdir = outer.path().join("models");
    let size = std::fs::metadata(assets::model(MINILM)).unwrap().len();
    let _disk = SmallDisk::mount(&mdir, size + (16 << 20));
    let mdir_s = mdir.display().to_string();
    let s = Server::start(&[], &[("HF_ENDPOINT", &hf.url), ("MODELS_DIR", &mdir_s)]).await;
    let token = s.login().await;
    let id = s
        .start_download(
            &token,
            json!({"repo_id": "test/minilm", "filename": MINILM}),
        )
        .await;
    s.wait_download(&token, id, 60, |d| {
        d["state"] == "downloading" && d["downloaded"].as_u64().unwrap_or(0) > 1 << 20
    })
    .await;
    // Another program takes the rest of the disk.
    let filler = mdir.join("filler.bin");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
    }
    let d = s.wait_download_ended(&token, id, 120).await;
    assert_eq!(d["state"], "failed", "{d}");
    let msg = d["error"].to_string();
    assert!(
        msg.contains("No space left") || msg.contains("disk is full"),
        "the error says the disk is full: {d}"
    );
    let left: Vec<String> = files_in(&mdir)
        .into_iter()
        .filter(|f| f != "filler.bin")
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    let (st, j) = s.admin_get(&token, "/admin/api/models").await;
    assert_eq!(st, 200, "{j}");
    assert!(
        !j.to_string().contains("all-MiniLM"),
        "no catalogue row: {j}"
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        s.http
            .get(format!("{}/health", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_bounded_rss(&s);
}
