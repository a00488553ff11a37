//! End-to-end tests of `serve` that need no worker process: auth (login, JWT, cookie, Origin, rate limit,
//! API keys), refusing a network HOST without a password (the Docker environment), unknown models,
//! memory admission refusing a load, the catalogue, and the `list-models` / `init` commands.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::assets;
use support::net::free_port;
use support::process::{bin, signal};
use support::server::*;

use support::assets::SMOL_Q4_1 as SMOL;

#[tokio::test(flavor = "multi_thread")]
async fn admin_auth_jwt_cookie_origin_and_rate_limit() {
    let s = Server::start(
        &[SMOL],
        &[("JWT_SECRET", "0123456789abcdef0123456789abcdef")],
    )
    .await;
    let h = &s.http;
    // /health is open.
    let r = h.get(format!("{}/health", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Admin routes need a token.
    for path in [
        "/admin/api/models",
        "/admin/api/workers",
        "/admin/api/settings",
        "/admin/api/me",
    ] {
        let r = h.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let b: Value = r.json().await.unwrap();
        assert!(b["error"]["message"].is_string(), "{b}");
    }
    // Bad password → 401.
    let bad = |pw: &'static str| {
        h.post(format!("{}/admin/api/login", s.base))
            .json(&json!({"username": "admin", "password": pw}))
            .send()
    };
    assert_eq!(bad("nope").await.unwrap().status(), 401);
    // Good login → token + HttpOnly SameSite=Strict cookie.
    let r = h
        .post(format!("{}/admin/api/login", s.base))
        .json(&json!({"username": "admin", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, me) = s.admin_get(&token, "/admin/api/me").await;
    assert_eq!((st, me["username"].as_str()), (200, Some("admin")));
    let (st, models) = s.admin_get(&token, "/admin/api/models").await;
    assert_eq!(st, 200);
    assert_eq!(
        models["models"][0]["model"]["name"],
        "SmolLM2-135M-Instruct.Q4_1"
    );
    // The cookie works for GET; a state-changing request with the cookie needs a matching Origin.
    let session = cookie.split(';').next().unwrap().to_string();
    let r = h
        .get(format!("{}/admin/api/workers", s.base))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pin = format!("{}/admin/api/models/SmolLM2-135M-Instruct.Q4_1/pin", s.base);
    let r = h
        .post(&pin)
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "cookie without Origin");
    let r = h
        .post(&pin)
        .header("cookie", &session)
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "foreign Origin");
    let r = h
        .post(&pin)
        .header("cookie", &session)
        .header("origin", &s.base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "same Origin");
    let r = h
        .post(format!(
            "{}/admin/api/models/SmolLM2-135M-Instruct.Q4_1/unpin",
            s.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "Bearer without Origin is not a browser");
    // A forged token (other secret), an expired one (our secret) and garbage are refused.
    let claims = |exp: u64| json!({"sub": "admin", "iat": 1, "exp": exp});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |secret: &[u8], c: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &c,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let forged = sign(b"not-the-secret", claims(now + 3600));
    let expired = sign(b"0123456789abcdef0123456789abcdef", claims(now - 60));
    let valid = sign(b"0123456789abcdef0123456789abcdef", claims(now + 3600));
    assert_eq!(s.admin_get(&forged, "/admin/api/me").await.0, 401);
    assert_eq!(s.admin_get(&expired, "/admin/api/me").await.0, 401);
    assert_eq!(
        s.admin_get("garbage.token.here", "/admin/api/me").await.0,
        401
    );
    assert_eq!(
        s.admin_get(&valid, "/admin/api/me").await.0,
        200,
        "control: our secret works"
    );
    // Rate limit: 5 failures in the window (the success above reset the count), then 429 even for the
    // right password.
    for _ in 0..5 {
        assert_eq!(bad("nope").await.unwrap().status(), 401);
    }
    let r = h
        .post(format!("{}/admin/api/login", s.base))
        .json(&json!({"username": "admin", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_gate_v1_when_required_and_unknown_models_get_404() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    let h = &s.http;
    // Unknown model: 404 in OpenAI's shape naming the available models.
    let r = h
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "model_not_found");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("nope") && msg.contains("SmolLM2-135M-Instruct.Q4_1"),
        "{msg}"
    );
    // A body without `model` is a 400.
    let r = h
        .post(format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .body("{\"prompt\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // /v1/models: the catalogue with a status.
    let b = s.get_json("/v1/models").await;
    assert_eq!(b["object"], "list");
    assert_eq!(b["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(b["data"][0]["status"], "stopped");
    // Create a key (shown once), require keys, then /v1 needs it.
    let r = h
        .post(format!("{}/admin/api/keys", s.base))
        .bearer_auth(&token)
        .json(&json!({"name": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let k: Value = r.json().await.unwrap();
    let key = k["key"].as_str().unwrap().to_string();
    let id = k["api_key"]["id"].as_i64().unwrap();
    let (_, list) = s.admin_get(&token, "/admin/api/keys").await;
    assert!(
        !list.to_string().contains(&key),
        "the key is never shown again"
    );
    assert!(list.to_string().contains(&key[..10]), "its prefix is");
    let r = h
        .put(format!("{}/admin/api/settings", s.base))
        .bearer_auth(&token)
        .json(&json!({"require_api_key": true, "model_idle_timeout": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    let idle = b["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "model_idle_timeout")
        .unwrap();
    assert_eq!(
        (idle["value"].as_u64(), idle["source"].as_str()),
        (Some(7), Some("db"))
    );
    let models = format!("{}/v1/models", s.base);
    assert_eq!(h.get(&models).send().await.unwrap().status(), 401);
    assert_eq!(
        h.get(&models)
            .bearer_auth("ci-wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        h.get(&models)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Invalid settings are refused with the reason, nothing applied.
    let r = h
        .put(format!("{}/admin/api/settings", s.base))
        .bearer_auth(&token)
        .json(&json!({"max_memory_percent": 150}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Revoked → 401.
    let r = h
        .delete(format!("{}/admin/api/keys/{id}", s.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        h.get(&models)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // /health stays open, /metrics answers Prometheus text.
    assert_eq!(
        h.get(format!("{}/health", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let m = s.metrics().await;
    assert!(
        m.contains("cyber_inference_requests_total{model=\"(unknown)\",status=\"404\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_that_cannot_fit_is_refused_with_the_numbers_and_starts_nothing() {
    let s = Server::start(&[SMOL], &[("MAX_MEMORY_PERCENT", "1")]).await;
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&json!({"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"]["code"], "insufficient_memory");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("MiB") && msg.contains("MAX_MEMORY_PERCENT=1%"),
        "{msg}"
    );
    // The numbers: need, used, total and the limit, consistent with each other and with the model.
    let mib = |w: &str| -> u64 {
        let i = msg.find(w).unwrap_or_else(|| panic!("`{w}` in {msg}"));
        msg[..i]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a number before `{w}` in {msg}"))
    };
    let need = mib(" MiB, ");
    let used = mib(" MiB of ");
    let total = mib(" MiB are in use");
    let limit = mib(" MiB); ");
    let file_mib = std::fs::metadata(assets::model(SMOL)).unwrap().len() >> 20;
    assert!(
        need > file_mib && need < 4 * file_mib,
        "need {need} MiB: {msg}"
    );
    assert!(used > 0 && used < total, "{msg}");
    assert!(
        limit.abs_diff(total / 100) <= 1,
        "limit 1 % of total: {msg}"
    );
    assert!(used + need > limit, "{msg}");
    assert!(s.workers().is_empty(), "no worker may be started");
    let token = s.login().await;
    let (_, m) = s
        .admin_get(&token, "/admin/api/models/SmolLM2-135M-Instruct.Q4_1")
        .await;
    assert_eq!(m["state"], "stopped");
    assert_eq!(
        m["sessions"].as_array().unwrap().len(),
        0,
        "no session recorded"
    );
}

/// The Docker image's environment, outside Docker: HOST=0.0.0.0 without a password refuses to start and
/// says why; with one it serves.
#[tokio::test(flavor = "multi_thread")]
async fn docker_environment_needs_an_admin_password_on_a_network_host() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = |pw: Option<&str>| {
        let mut e = vec![
            ("CYBER_INFERENCE_HOST".to_string(), "0.0.0.0".to_string()),
            ("CYBER_INFERENCE_PORT".to_string(), port.to_string()),
            (
                "CYBER_INFERENCE_DATA_DIR".to_string(),
                dir.path().join("data").display().to_string(),
            ),
            (
                "CYBER_INFERENCE_MODELS_DIR".to_string(),
                dir.path().join("models").display().to_string(),
            ),
        ];
        if let Some(p) = pw {
            e.push(("CYBER_INFERENCE_ADMIN_PASSWORD".to_string(), p.to_string()));
        }
        e
    };
    let mut c = spawn_serve(dir.path(), &env(None));
    let st = wait_serve_exit(&mut c, "without a password");
    assert!(!st.success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.contains("0.0.0.0") && log.contains("CYBER_INFERENCE_ADMIN_PASSWORD"),
        "{log}"
    );
    let mut c = spawn_serve(dir.path(), &env(Some("docker-pass")));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            c.try_wait().unwrap().is_none(),
            "serve exited: {}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap()
        );
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "not healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = http
        .post(format!("http://127.0.0.1:{port}/admin/api/login"))
        .json(&json!({"username": "admin", "password": "docker-pass"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    signal(c.id(), "TERM");
    let st = c.wait().unwrap();
    assert!(st.success(), "SIGTERM → exit 0, got {st}");
}

#[test]
fn init_and_list_models_commands() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(assets::model(SMOL), models.join(SMOL)).unwrap();
    std::fs::write(
        models.join("broken.gguf"),
        b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff",
    )
    .unwrap();
    let run = |args: &[&str]| {
        bin()
            .args(args)
            .env_clear()
            .env("CYBER_INFERENCE_DATA_DIR", dir.path().join("data"))
            .env("CYBER_INFERENCE_MODELS_DIR", &models)
            .output()
            .unwrap()
    };
    let out = run(&["init"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("password:"),
        "a generated password is printed once: {text}"
    );
    let secret = dir.path().join("data/jwt_secret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = run(&["init"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("password:"),
        "only once"
    );
    let out = run(&["list-models"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("SmolLM2-135M-Instruct.Q4_1"))
        .expect(&text);
    assert!(
        line.contains("llama") && line.contains("Q4_1") && line.contains("8192"),
        "{line}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken.gguf"),
        "skipped files are named"
    );
    let out = run(&["remove-model", "SmolLM2-135M-Instruct.Q4_1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !models.join(SMOL).exists(),
        "the link in MODELS_DIR is deleted"
    );
    assert!(assets::model(SMOL).exists(), "the shared asset is not");
    let out = run(&["remove-model", "SmolLM2-135M-Instruct.Q4_1"]);
    assert!(!out.status.success());
}

/// With `require_api_key` on, `/v1/*` also takes the admin's session (so the UI's chat playground needs no
/// key), but the cookie only from this server's own pages: a cross-origin request carrying it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn admin_session_reaches_v1_from_same_origin_only_when_keys_are_required() {
    let s = Server::start(&[SMOL], &[]).await;
    let token = s.login().await;
    let h = &s.http;
    let r = h
        .post(format!("{}/admin/api/keys", s.base))
        .bearer_auth(&token)
        .json(&json!({"name": "client"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key = r.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = h
        .put(format!("{}/admin/api/settings", s.base))
        .bearer_auth(&token)
        .json(&json!({"require_api_key": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let session = format!("ci_session={token}");
    let models = format!("{}/v1/models", s.base);
    let same = s.base.clone();
    let other_port = format!("http://127.0.0.1:{}", s.port + 1);
    /// A case on GET /v1/models: its name, the request headers, the expected status.
    type Case = (&'static str, Vec<(&'static str, String)>, u16);
    let cases: Vec<Case> = vec![
        ("no cookie, no key", vec![], 401),
        (
            "no cookie, same Origin",
            vec![("origin", same.clone())],
            401,
        ),
        (
            "API key",
            vec![("authorization", format!("Bearer {key}"))],
            200,
        ),
        (
            "cookie + same Origin",
            vec![("cookie", session.clone()), ("origin", same.clone())],
            200,
        ),
        (
            "cookie + Sec-Fetch-Site: same-origin, no Origin",
            vec![
                ("cookie", session.clone()),
                ("sec-fetch-site", "same-origin".into()),
            ],
            200,
        ),
        (
            "cookie alone (not a page of ours)",
            vec![("cookie", session.clone())],
            401,
        ),
        (
            "cookie + foreign Origin",
            vec![
                ("cookie", session.clone()),
                ("origin", "http://evil.example".into()),
            ],
            401,
        ),
        (
            "cookie + another port of this host",
            vec![("cookie", session.clone()), ("origin", other_port.clone())],
            401,
        ),
        (
            "cookie + Sec-Fetch-Site: same-site",
            vec![
                ("cookie", session.clone()),
                ("sec-fetch-site", "same-site".into()),
            ],
            401,
        ),
        (
            "forged cookie + same Origin",
            vec![("cookie", format!("{session}x")), ("origin", same.clone())],
            401,
        ),
        (
            "admin JWT as Bearer",
            vec![("authorization", format!("Bearer {token}"))],
            200,
        ),
        (
            "admin JWT as Bearer + foreign Origin",
            vec![
                ("authorization", format!("Bearer {token}")),
                ("origin", "http://evil.example".into()),
            ],
            401,
        ),
    ];
    for (case, headers, want) in &cases {
        let mut rq = h.get(&models);
        for (k, v) in headers {
            rq = rq.header(*k, v);
        }
        let r = rq.send().await.unwrap();
        assert_eq!(r.status().as_u16(), *want, "{case}");
        if *want == 401 {
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error"]["code"], "invalid_api_key", "{case}: {b}");
        }
    }

    // A streamed chat, as the playground sends it: refused cross-origin (and no worker starts for it)…
    let body = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": true,
    });
    let chat = format!("{}/v1/chat/completions", s.base);
    let r = h
        .post(&chat)
        .header("cookie", &session)
        .header("origin", "http://evil.example")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h.post(&chat).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401, "no cookie, no key");
    assert!(s.workers().is_empty(), "a refused request started a worker");
    // …answered from the same origin with the session alone.
    let r = h
        .post(&chat)
        .header("cookie", &session)
        .header("origin", &same)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", s.log());
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"chat.completion.chunk\"") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    // With a key, as any client.
    let r = h
        .post(&chat)
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
}
