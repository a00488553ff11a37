//! `cyber-inference healthcheck` is what the container images and compose files run as their health check:
//! it must exit 0 exactly when `/health` answers 200, and 1 — quickly — for 503, a redirect, a server that
//! never answers, or nothing listening.

mod support;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use support::net::free_port;
use support::process::BIN;

/// A tiny server whose `/health` answers the status held in the returned handle.
async fn health_server(status: u16) -> (SocketAddr, Arc<AtomicU16>) {
    let state = Arc::new(AtomicU16::new(status));
    let app = Router::new()
        .route(
            "/health",
            get(|State(s): State<Arc<AtomicU16>>| async move {
                let code = StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap();
                let body = if code == StatusCode::OK {
                    r#"{"status":"ok"}"#
                } else {
                    r#"{"status":"loading"}"#
                };
                (code, body)
            }),
        )
        .route(
            "/moved",
            get(|| async { Redirect::temporary("/health").into_response() }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, state)
}

/// Runs `cyber-inference healthcheck ARGS` with only `vars` in its environment (and a temp DATA_DIR).
async fn healthcheck(args: &[&str], vars: &[(&str, String)]) -> (Output, Duration) {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("CYBER_INFERENCE_DATA_DIR", data.path())
        .arg("healthcheck")
        .args(args)
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
    let start = Instant::now();
    let out = cmd.output().await.unwrap();
    (out, start.elapsed())
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("killed by a signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_0_for_200_and_1_for_503() {
    let (addr, status) = health_server(200).await;
    let url = format!("http://{addr}/health");
    let (out, _) = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("200"));

    status.store(503, Ordering::SeqCst);
    let (out, _) = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("503"), "{}", stderr(&out));

    status.store(500, Ordering::SeqCst);
    let (out, _) = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(code(&out), 1);

    status.store(200, Ordering::SeqCst);
    let (out, _) = healthcheck(&["--url", &url], &[]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let (addr, _) = health_server(200).await;
    let (out, _) = healthcheck(&["--url", &format!("http://{addr}/moved")], &[]).await;
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("307"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_url_comes_from_host_and_port_with_wildcard_mapped_to_loopback() {
    let (addr, status) = health_server(200).await;
    let vars = [
        ("CYBER_INFERENCE_HOST", "0.0.0.0".to_string()),
        ("CYBER_INFERENCE_PORT", addr.port().to_string()),
    ];
    let (out, _) = healthcheck(&[], &vars).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("http://127.0.0.1:{}/health", addr.port())),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    status.store(503, Ordering::SeqCst);
    let (out, _) = healthcheck(&[], &vars).await;
    assert_eq!(code(&out), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_exits_1_quickly() {
    let port = free_port();
    let (out, took) =
        healthcheck(&["--url", &format!("http://127.0.0.1:{port}/health")], &[]).await;
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("failed"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // Default URL, nothing on the port either.
    let vars = [
        ("CYBER_INFERENCE_HOST", "0.0.0.0".to_string()),
        ("CYBER_INFERENCE_PORT", port.to_string()),
    ];
    let (out, _) = healthcheck(&[], &vars).await;
    assert_eq!(code(&out), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_with_exit_1() {
    // Accepts connections and reads, but never writes a byte.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let (out, took) = healthcheck(
        &["--url", &format!("http://{addr}/health"), "--timeout", "1"],
        &[],
    )
    .await;
    holder.abort();
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("no answer within 1.0 s"),
        "{}",
        stderr(&out)
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_1_with_a_reason() {
    for (args, why) in [
        (vec!["--url", "ftp://127.0.0.1/health"], "scheme"),
        (vec!["--url", "not a url"], "invalid health-check URL"),
        (vec!["--timeout", "0"], "--timeout"),
    ] {
        let (out, _) = healthcheck(&args, &[]).await;
        assert_eq!(code(&out), 1, "{args:?}");
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
    }
}
