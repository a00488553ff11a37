//! Anthropic's Messages API end to end (issue 19): the real `cyber-inference serve` with a real worker
//! on the shared SmolLM2-135M, driven by the official `anthropic` Python client
//! (`tests/py/test_anthropic_client.py`): `messages.create` streamed and not, Anthropic's event
//! sequence, `stop_sequences`, `count_tokens` equal to the worker's prompt tokens (with and without
//! tools), a tool-use round trip (streamed tool input too), errors in Anthropic's envelope; then with
//! API keys required, the key as `x-api-key` and 401 `authentication_error` without one.

mod supervisor_common;

use std::process::Command;

use serde_json::{Value, json};
use supervisor_common::*;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn script(args: &[&str]) {
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/test_anthropic_client.py"
        ))
        .args(args)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && so.contains("ALL OK"),
        "python failed\nstdout:\n{so}\nstderr:\n{se}"
    );
    println!("{so}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_client_against_the_supervisor() {
    let s = Server::start(&[SMOL], &[]).await;
    script(&[&s.base]);

    let token = s.login().await;
    let k: Value = s
        .http
        .post(format!("{}/admin/api/keys", s.base))
        .bearer_auth(&token)
        .json(&json!({"name": "anthropic"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = k["key"].as_str().unwrap().to_string();
    let r = s
        .http
        .put(format!("{}/admin/api/settings", s.base))
        .bearer_auth(&token)
        .json(&json!({"require_api_key": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    script(&[&s.base, &key]);
}
