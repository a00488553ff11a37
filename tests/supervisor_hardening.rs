//! End-to-end tests of the supervisor's safe defaults (issue 17): API keys on a network HOST, workers
//! reachable only with their per-spawn key and started with a cleared environment, and the bounds on
//! what clients can make the supervisor store or hold.

mod support;

use serde_json::{Value, json};
use support::assets::SMOL_Q4_1 as SMOL;
use support::net::free_port;
use support::process::{proc_cmdline, proc_environ};
use support::server::*;

const SMOL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

fn chat_body() -> Value {
    json!({"model": SMOL_ID, "max_tokens": 4, "temperature": 0,
           "messages": [{"role": "user", "content": "Say hi."}]})
}

/// `POST /v1/chat/completions` with an optional Bearer key; returns (status, body).
async fn chat(s: &Server, key: Option<&str>) -> (u16, String) {
    let mut rq = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&chat_body());
    if let Some(k) = key {
        rq = rq.bearer_auth(k);
    }
    let r = rq.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn setting(b: &Value, name: &str) -> Value {
    b["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// HOST=0.0.0.0: `/v1/*` needs an API key by default (401 without, 200 with, on a real worker). The admin
/// may still open it explicitly — then the dashboard says so — and a reset goes back to requiring keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_network_host_requires_api_keys_on_v1_unless_the_admin_opens_it() {
    let s = Server::start(&[SMOL], &[("HOST", "0.0.0.0")]).await;
    let (st, body) = chat(&s, None).await;
    assert_eq!(st, 401, "{body}");
    let b: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["error"]["code"], "invalid_api_key", "{b}");
    let models = s
        .http
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 401);
    assert!(s.workers().is_empty(), "a refused request started a worker");

    let token = s.login().await;
    let key = s.create_key(&token, "lan-client").await;
    let (st, body) = chat(&s, Some(&key)).await;
    assert_eq!(st, 200, "{body}\n{}", s.log());
    let b: Value = serde_json::from_str(&body).unwrap();
    assert!(b["choices"][0]["message"]["content"].is_string(), "{body}");
    let (_, settings) = s.admin_get(&token, "/admin/api/settings").await;
    let rk = setting(&settings, "require_api_key");
    assert_eq!(
        (rk["value"].clone(), rk["source"].clone()),
        (json!(true), json!("default"))
    );
    let dash = s.page(&token, "/").await;
    assert!(
        !dash.contains("id=\"api-open\""),
        "keys are required: no warning"
    );

    // The admin opens it explicitly: no key needed, and the dashboard warns.
    assert_eq!(
        s.put_settings(&token, json!({"require_api_key": false}))
            .await,
        200
    );
    let (st, body) = chat(&s, None).await;
    assert_eq!(st, 200, "{body}");
    let dash = s.page(&token, "/").await;
    assert!(
        dash.contains("id=\"api-open\"") && dash.contains("0.0.0.0"),
        "the dashboard says /v1 is open on a network address"
    );
    // A reset (null) returns to this HOST's default: keys required.
    assert_eq!(
        s.put_settings(&token, json!({"require_api_key": null}))
            .await,
        200
    );
    assert_eq!(chat(&s, None).await.0, 401);
    assert_eq!(chat(&s, Some(&key)).await.0, 200);
}

/// Loopback keeps today's open default, and its dashboard shows no warning.
#[tokio::test(flavor = "multi_thread")]
async fn loopback_keeps_v1_open_by_default() {
    let s = Server::start(&[], &[]).await;
    let r = s
        .http
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = s.login().await;
    let (_, settings) = s.admin_get(&token, "/admin/api/settings").await;
    assert_eq!(setting(&settings, "require_api_key")["value"], json!(false));
    assert!(!s.page(&token, "/").await.contains("id=\"api-open\""));
}

const JWT_SECRET: &str = "a-jwt-secret-for-this-test-0123456789abcdef";
const HF_TOKEN: &str = "hf_this_token_must_stay_in_the_supervisor";

/// A worker the supervisor started answers only with its per-spawn key (401 without, even for `/props`;
/// `/health` stays open), which it got through its environment: its command line does not carry it, and
/// its environment holds none of the supervisor's secrets (cleared, then an allow-list). The proxy sends
/// the key; a reload gets a new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_answers_only_with_its_key_and_inherits_no_secrets() {
    let s = Server::start(
        &[SMOL],
        &[("JWT_SECRET", JWT_SECRET), ("HF_TOKEN", HF_TOKEN)],
    )
    .await;
    let (st, body) = chat(&s, None).await;
    assert_eq!(st, 200, "through the proxy: {body}\n{}", s.log());
    let token = s.login().await;
    let w = worker_of(&s, &token, SMOL_ID).await.expect("a worker");
    let pid = w["pid"].as_u64().unwrap() as u32;
    let port = w["port"].as_u64().unwrap();
    let direct = format!("http://127.0.0.1:{port}");
    let r = s
        .http
        .post(format!("{direct}/v1/chat/completions"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a direct request without the key");
    let r = s.http.get(format!("{direct}/props")).send().await.unwrap();
    assert_eq!(r.status(), 401, "/props without the key");
    let r = s.http.get(format!("{direct}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200, "/health stays open");

    let env = proc_environ(pid);
    let text: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for secret in [PASSWORD, JWT_SECRET, HF_TOKEN] {
        assert!(
            !text.iter().any(|kv| kv.contains(secret)),
            "a secret reached the worker's environment: {text:?}"
        );
    }
    for name in [
        "CYBER_INFERENCE_ADMIN_PASSWORD",
        "CYBER_INFERENCE_JWT_SECRET",
        "CYBER_INFERENCE_HF_TOKEN",
        "CYBER_INFERENCE_DATA_DIR",
    ] {
        assert!(
            !env.iter().any(|(k, _)| k == name),
            "{name} in the worker's environment: {text:?}"
        );
    }
    let key = worker_key(pid);
    assert!(key.len() >= 40, "a 256-bit key: {key}");
    let cmdline = proc_cmdline(pid);
    assert!(!cmdline.contains(&key), "the key is in argv: {cmdline}");
    assert!(!cmdline.contains(PASSWORD) && !cmdline.contains(JWT_SECRET));
    let r = s
        .http
        .post(format!("{direct}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a direct request with the key");

    // A new process gets a new key.
    let r = s
        .http
        .post(format!("{}/admin/api/models/{SMOL_ID}/unload", s.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while worker_of(&s, &token, SMOL_ID).await.is_some() {
        assert!(std::time::Instant::now() < deadline, "not unloaded");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(chat(&s, None).await.0, 200);
    let w2 = worker_of(&s, &token, SMOL_ID).await.expect("reloaded");
    let pid2 = w2["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid2, pid);
    assert_ne!(worker_key(pid2), key, "each spawn gets its own key");
}

/// Wrong logins sent all at once: each is counted before its argon2 check, so no more than
/// MAX_FAILED_LOGINS (5) reach it and the rest get 429 with Retry-After.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_wrong_logins_are_counted_before_the_password_check() {
    let s = Server::start(&[], &[]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let http = s.http.clone();
        let url = format!("{}/admin/api/login", s.base);
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"username": "admin", "password": format!("guess-{i}")}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.headers().contains_key("retry-after"))
        }));
    }
    let mut checked = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            (401, _) => checked += 1,
            (429, true) => limited += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((checked, limited), (5, 15), "checked vs limited");
}

/// The events WebSocket, opened with a valid session, is refused (403) when its Origin is another site
/// or another port of this host; this server's own Origin (and a client that sends none) connects.
#[tokio::test(flavor = "multi_thread")]
async fn the_events_websocket_checks_origin() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = Server::start(&[], &[]).await;
    let token = s.login().await;
    let url = format!("ws://127.0.0.1:{}/admin/api/events", s.port);
    let open = |origin: Option<String>| {
        let mut req = url.clone().into_client_request().unwrap();
        req.headers_mut()
            .insert("cookie", format!("ci_session={token}").parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    for foreign in [
        "http://evil.example".to_string(),
        format!("http://127.0.0.1:{}", s.port + 1),
    ] {
        match open(Some(foreign.clone())).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 403, "{foreign}")
            }
            Err(e) => panic!("{foreign}: {e}"),
            Ok(_) => panic!("{foreign}: a cross-origin WebSocket was accepted"),
        }
    }
    assert!(open(Some(s.base.clone())).await.is_ok(), "same origin");
    assert!(open(None).await.is_ok(), "no Origin (not a browser)");
}

async fn me(s: &Server, token: &str) -> u16 {
    s.admin_get(token, "/admin/api/me").await.0
}

/// Logout ends every token of the user (this one and any copy or other session), and so does a
/// password change — except the new token it hands back.
#[tokio::test(flavor = "multi_thread")]
async fn logout_and_a_password_change_revoke_earlier_tokens() {
    let s = Server::start(&[], &[]).await;
    let (t1, t2) = (s.login().await, s.login().await);
    assert_eq!((me(&s, &t1).await, me(&s, &t2).await), (200, 200));
    let r = s
        .http
        .post(format!("{}/admin/api/logout", s.base))
        .bearer_auth(&t1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(me(&s, &t1).await, 401, "the logged-out token");
    assert_eq!(me(&s, &t2).await, 401, "another session of the same user");
    let t3 = s.login().await;
    assert_eq!(me(&s, &t3).await, 200, "a new login works");
    let r = s
        .http
        .post(format!("{}/ui/api/password", s.base))
        .bearer_auth(&t3)
        .json(&json!({"current": PASSWORD, "new": "another-password-456"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let t4 = cookie
        .strip_prefix("ci_session=")
        .and_then(|c| c.split(';').next())
        .unwrap()
        .to_string();
    assert_eq!(me(&s, &t3).await, 401, "a token from before the change");
    assert_eq!(me(&s, &t4).await, 200, "the token the change handed back");
}

/// JWT_SECRET shorter than 32 bytes stops `serve` with an error naming the variable and the rule (not
/// the secret).
#[tokio::test(flavor = "multi_thread")]
async fn a_short_jwt_secret_is_a_clear_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = [
        ("CYBER_INFERENCE_PORT", free_port().to_string()),
        (
            "CYBER_INFERENCE_DATA_DIR",
            dir.path().join("data").display().to_string(),
        ),
        ("CYBER_INFERENCE_JWT_SECRET", "too-short-secret".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let st = wait_serve_exit(
        &mut spawn_serve(dir.path(), &env),
        "instead of refusing to start",
    );
    assert!(!st.success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log.contains("CYBER_INFERENCE_JWT_SECRET") && log.contains("at least 32 bytes"),
        "{log}"
    );
    assert!(!log.contains("too-short-secret"), "{log}");
}

/// DATA_DIR (database, JWT secret, logs) is created 0700.
#[tokio::test(flavor = "multi_thread")]
async fn the_data_dir_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start(&[], &[]).await;
    let mode = std::fs::metadata(s.data_dir())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// `/v1` POSTs must declare a JSON body: what a cross-site HTML form can send (`text/plain`, urlencoded,
/// multipart, or nothing) is refused with 415 before anything is loaded.
#[tokio::test(flavor = "multi_thread")]
async fn v1_posts_must_be_declared_json() {
    let s = Server::start(&[SMOL], &[]).await;
    let body = chat_body().to_string();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
            let mut rq = s.http.post(format!("{}{path}", s.base)).body(body.clone());
            if let Some(ct) = ct {
                rq = rq.header("content-type", ct);
            }
            let r = rq.send().await.unwrap();
            assert_eq!(r.status(), 415, "{path} with {ct:?}");
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error"]["code"], "unsupported_media_type", "{b}");
        }
    }
    assert!(s.workers().is_empty(), "a refused request started a worker");
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "declared JSON is served");
}

/// ALLOWED_HOSTS: a request naming another host (a DNS-rebinding page) is refused with 403; listed
/// names, IP addresses and `localhost` pass, and `/health` always answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_outside_allowed_hosts_is_refused() {
    let s = Server::start(&[], &[("ALLOWED_HOSTS", "ci.example, other.example")]).await;
    let get = |host: String, path: &'static str| {
        s.http
            .get(format!("{}{path}", s.base))
            .header("host", host)
            .send()
    };
    let port = s.port;
    for (host, want) in [
        (format!("rebind.attacker.example:{port}"), 403),
        (format!("ci.example.attacker.example:{port}"), 403),
        (format!("ci.example:{port}"), 200),
        (format!("OTHER.example:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("localhost:{port}"), 200),
    ] {
        let r = get(host.clone(), "/v1/models").await.unwrap();
        assert_eq!(r.status(), want, "Host: {host}");
    }
    let r = get("rebind.attacker.example".into(), "/health")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // An invalid list is a start-up error naming the variable.
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = [
        ("CYBER_INFERENCE_PORT", free_port().to_string()),
        (
            "CYBER_INFERENCE_DATA_DIR",
            dir.path().join("data").display().to_string(),
        ),
        (
            "CYBER_INFERENCE_ALLOWED_HOSTS",
            "http://ci.example/".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let st = wait_serve_exit(
        &mut spawn_serve(dir.path(), &env),
        "instead of refusing to start",
    );
    assert!(!st.success());
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("CYBER_INFERENCE_ALLOWED_HOSTS"), "{log}");
}

/// Requests for models that are not in the catalogue — however many names, however long — are counted
/// under one label in `/metrics` and the request log; no client-chosen name is stored.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_model_names_are_counted_under_one_label() {
    let s = Server::start(&[], &[]).await;
    let huge = "m".repeat(1 << 20);
    let names = ["nope-1".to_string(), "nope-2".to_string(), huge.clone()];
    for name in &names {
        let r = s
            .http
            .post(format!("{}/v1/chat/completions", s.base))
            .json(&json!({"model": name, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let text = r.text().await.unwrap();
        assert!(text.len() < 4096, "the error echoes at most a clipped name");
    }
    let m = s.metrics().await;
    assert!(
        m.contains("cyber_inference_requests_total{model=\"(unknown)\",status=\"404\"} 3"),
        "{}",
        &m[..m.len().min(4000)]
    );
    assert!(!m.contains("nope-1") && m.len() < 64 * 1024);
    let db_path = s.data_dir().join("cyber-inference.db");
    let url = format!("sqlite://{}?mode=ro", db_path.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT model, length(model) FROM requests ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        if rows.len() >= 3 || std::time::Instant::now() > deadline {
            assert_eq!(rows.len(), 3, "{rows:?}");
            assert!(rows.iter().all(|(m, _)| m == "(unknown)"), "{rows:?}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A client that opens a connection and never finishes its headers is cut after the header-read
/// timeout (10 s), on the supervisor and on a worker.
#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_on_the_supervisor_and_the_worker() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start(&[SMOL], &[]).await;
    assert_eq!(chat(&s, None).await.0, 200);
    let token = s.login().await;
    let w = worker_of(&s, &token, SMOL_ID).await.expect("a worker");
    let worker_port = w["port"].as_u64().unwrap() as u16;
    let mut tasks = Vec::new();
    for port in [s.port, worker_port] {
        tasks.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            let t0 = std::time::Instant::now();
            let mut buf = Vec::new();
            let r =
                tokio::time::timeout(std::time::Duration::from_secs(20), c.read_to_end(&mut buf))
                    .await;
            (port, r.is_ok(), t0.elapsed())
        }));
    }
    for t in tasks {
        let (port, closed, after) = t.await.unwrap();
        assert!(
            closed,
            "port {port}: a half-sent request held its connection for 20 s"
        );
        assert!(
            after >= std::time::Duration::from_secs(5),
            "port {port}: cut after {after:?}"
        );
    }
}

/// Partial downloads left by an earlier run: a stale one (untouched for over a day) is removed at
/// start-up, a fresh one is kept for the next download to resume.
#[tokio::test(flavor = "multi_thread")]
async fn stale_partial_downloads_are_removed_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("models/.partial");
    std::fs::create_dir_all(&partial).unwrap();
    let stale = partial.join("old.gguf.part");
    let fresh = partial.join("new.gguf.part");
    std::fs::write(&stale, b"stale bytes").unwrap();
    std::fs::write(&fresh, b"fresh bytes").unwrap();
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let port = free_port();
    let env: Vec<(String, String)> = [
        ("CYBER_INFERENCE_PORT", port.to_string()),
        (
            "CYBER_INFERENCE_DATA_DIR",
            dir.path().join("data").display().to_string(),
        ),
        (
            "CYBER_INFERENCE_MODELS_DIR",
            dir.path().join("models").display().to_string(),
        ),
        ("CYBER_INFERENCE_ADMIN_PASSWORD", PASSWORD.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut c = spawn_serve(dir.path(), &env);
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            && r.status() == 200
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not healthy");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = c.kill();
    let _ = c.wait();
    assert!(!stale.exists(), "the stale partial is removed");
    assert!(fresh.exists(), "the fresh partial is kept");
}

/// Per-request caps: prompts × `n` on `/v1/completions` and the number of embedding inputs are bounded
/// (400 naming the limit, before anything is tokenized); requests at the limit still work.
#[tokio::test(flavor = "multi_thread")]
async fn prompts_times_n_and_embedding_inputs_are_capped() {
    use support::assets::MINILM;
    let s = Server::start(&[SMOL, MINILM], &[]).await;
    let post = |path: &'static str, body: Value| {
        let rq = s.http.post(format!("{}{path}", s.base)).json(&body);
        async move {
            let r = rq.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let prompts: Vec<String> = (0..9).map(|i| format!("Number {i}:")).collect();
    let (st, b) = post(
        "/v1/completions",
        json!({"model": SMOL_ID, "prompt": prompts, "n": 8, "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 400, "{b}");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("72 completions") && msg.contains("64"),
        "{msg}"
    );
    let (st, b) = post(
        "/v1/completions",
        json!({"model": SMOL_ID, "prompt": &prompts[..8], "n": 8, "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["choices"].as_array().unwrap().len(), 64);

    let inputs: Vec<&str> = vec!["hi"; 513];
    let (st, b) = post(
        "/v1/embeddings",
        json!({"model": "all-MiniLM-L6-v2.F16", "input": inputs}),
    )
    .await;
    assert_eq!(st, 400, "{b}");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(msg.contains("513 entries") && msg.contains("512"), "{msg}");
    let (st, b) = post(
        "/v1/embeddings",
        json!({"model": "all-MiniLM-L6-v2.F16", "input": &inputs[..4]}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["data"].as_array().unwrap().len(), 4);
}

/// The same body limit on both servers (`MAX_BODY_BYTES`, 64 MiB): a body past axum's 2 MB default but
/// under the limit goes through the supervisor and is accepted by the worker behind it, and directly
/// by the worker; a request declaring one byte over the limit is 413 at the supervisor (no worker is
/// started for it) and at the worker.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_body_limit_holds_on_the_supervisor_and_the_worker() {
    use cyber_inference::http_server::MAX_BODY_BYTES;
    // A short chat padded with whitespace (still valid JSON) to `len` bytes.
    let padded = |len: usize| {
        let mut b = chat_body().to_string().into_bytes();
        assert_eq!(b.pop(), Some(b'}'));
        b.resize(len - 1, b' ');
        b.push(b'}');
        b
    };
    let s = Server::start(&[SMOL], &[]).await;
    let post = |url: String, body: Vec<u8>, key: Option<String>| {
        let mut rq = s
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            rq = rq.bearer_auth(k);
        }
        async move {
            let r = rq.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // Over the limit: the head alone declares it (Content-Length), and the answer comes before any
    // of the body is sent (an upload of 64 MiB the server stops reading races its early answer).
    let over_status = |port: u16, key: Option<String>| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("answered before the body is sent")
            .unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let url = format!("{}/v1/chat/completions", s.base);
    let line = over_status(s.port, None).await;
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    assert!(
        s.workers().is_empty(),
        "the supervisor answered the 413 itself: no worker started"
    );
    let mid = padded(3 << 20);
    let (st, body) = post(url, mid.clone(), None).await;
    assert_eq!(st, 200, "3 MiB through the supervisor: {body}\n{}", s.log());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["message"].is_object(), "{body}");

    let token = s.login().await;
    let w = worker_of(&s, &token, SMOL_ID).await.expect("a worker");
    let key = worker_key(w["pid"].as_u64().unwrap() as u32);
    let port = w["port"].as_u64().unwrap() as u16;
    let direct = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let (st, body) = post(direct, mid, Some(key.clone())).await;
    assert_eq!(st, 200, "3 MiB directly to the worker: {body}");
    let line = over_status(port, Some(key)).await;
    assert!(
        line.starts_with("HTTP/1.1 413"),
        "over the limit directly to the worker: {line}"
    );
}
