//! Ollama's API end to end (issue 19): the real `cyber-inference serve` with real workers on the shared
//! SmolLM2-135M and MiniLM files, its hub endpoint on the local Hugging Face–compatible server of the hub
//! tests (serving MiniLM split in two parts), driven by the official `ollama` Python client
//! (`tests/py/test_ollama_client.py`: list, show, chat streamed and not, ps, generate with context,
//! embed, format=<schema>, keep_alive as a duration and 0, load/unload by an empty prompt, pull of the
//! split GGUF, copy, delete, error envelopes). Then the request log, and API keys: with keys required,
//! `/api/*` answers 401 in Ollama's envelope without one and works with one.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::assets::MINILM;
use support::assets::SMOL_Q4_1 as SMOL;
use support::hub::{HfServer, Served, split_asset};
use support::python::python;
use support::server::*;

async fn logged_endpoints(s: &Server) -> Vec<(String, String, i64)> {
    let url = format!(
        "sqlite://{}?mode=ro",
        s.data_dir().join("cyber-inference.db").display()
    );
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows = sqlx::query_as("SELECT model, endpoint, status FROM requests ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_python_client_against_the_supervisor() {
    let hf = HfServer::start().await;
    let parts = split_asset(MINILM, "minilm-F16", 60);
    assert_eq!(parts.len(), 2);
    hf.state.add_repo(
        "test/minilm-split",
        parts.into_iter().map(|(n, d)| Served::new(&n, d)).collect(),
    );
    let s = Server::start(&[SMOL, MINILM], &[("HF_ENDPOINT", &hf.url)]).await;
    let (pid, models) = (s.pid().to_string(), s.models_dir());
    s.run_client_script(
        "test_ollama_client.py",
        &[&s.base, &pid, models.to_str().unwrap()],
    );

    // Every Ollama request is in the request log under its own endpoint.
    let deadline = Instant::now() + Duration::from_secs(5);
    let rows = loop {
        let rows = logged_endpoints(&s).await;
        if rows.iter().any(|r| r.1 == "/api/embeddings") || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for ep in [
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
    ] {
        assert!(
            rows.iter().any(|r| r.1 == ep && r.2 == 200),
            "{ep} logged: {rows:?}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r.0 == "nope" && r.1 == "/api/chat" && r.2 == 404),
        "the unknown model's 404 is logged: {rows:?}"
    );

    // A name made by /api/copy is a name on /v1 too.
    let r = s
        .http
        .post(format!("{}/api/copy", s.base))
        .json(&json!({"source": "SmolLM2-135M-Instruct.Q4_1", "destination": "smol-alias"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"model": "smol-alias", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // The dashboard's request log names the API each request came through.
    let token = s.login().await;
    let page = s.page(&token, "/").await;
    assert!(
        page.contains(
            "<td data-label=\"API\">Ollama</td><td data-label=\"Endpoint\">/api/chat</td>"
        ),
        "dashboard rows show the API"
    );

    // Keys required: /api/* says 401 in Ollama's envelope without one, and works with one.
    let key = s.create_key(&token, "ollama").await;
    assert_eq!(
        s.put_settings(&token, json!({"require_api_key": true}))
            .await,
        200
    );
    for (method, path, body) in [
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        (
            "POST",
            "/api/chat",
            Some(json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": []})),
        ),
        ("POST", "/api/show", Some(json!({"model": "x"}))),
    ] {
        let mut req = s
            .http
            .request(method.parse().unwrap(), format!("{}{path}", s.base));
        if let Some(b) = &body {
            req = req.json(b);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a key");
        let b: Value = r.json().await.unwrap();
        assert!(
            b["error"].as_str().is_some_and(|m| m.contains("API key")),
            "{path}: Ollama's envelope {b}"
        );
    }
    let r = s
        .http
        .get(format!("{}/api/tags", s.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert!(
        b["models"].as_array().is_some_and(|m| m.len() == 3),
        "two models and the alias: {b}"
    );
    // The Python client with the key in OLLAMA_API_KEY.
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import os, ollama; c = ollama.Client(host=os.environ['BASE']); \
             r = c.chat(model='SmolLM2-135M-Instruct.Q4_1', messages=[{'role': 'user', 'content': 'Hi'}], \
             options={'num_predict': 4}); print('OK', r.done)",
        )
        .env("BASE", &s.base)
        .env("OLLAMA_API_KEY", &key)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK True"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
