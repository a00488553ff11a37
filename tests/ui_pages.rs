//! The admin UI over HTTP with no browser: pages redirect to login without a valid session, the session
//! cookie is HttpOnly + SameSite=Strict, pages never carry the JWT, state-changing routes refuse foreign
//! Origins, the per-model settings form and the password change are validated on the server. Runs the
//! real `serve` (askama templates are compiled into it).

mod support;

use serde_json::{Value, json};
use support::server::{PASSWORD, Server};
use support::ui::{MODEL_FILE, client, first_model, get, get_json, login};

const PAGES: [&str; 6] = [
    "/",
    "/models",
    "/logs",
    "/settings",
    "/chat",
    "/models/nope",
];

#[tokio::test]
async fn pages_redirect_to_login_without_a_valid_session() {
    let s = Server::start(&[], &[]).await;
    let base = s.base.clone();
    let c = client();
    let other_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "admin", "iat": 1, "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"not the server's secret"),
    )
    .unwrap();
    for cookie in [
        None,
        Some("ci_session=garbage".to_owned()),
        Some(format!("ci_session={other_secret}")),
    ] {
        for (path, next) in [
            ("/", "%2F"),
            ("/models", "%2Fmodels"),
            ("/models/some%20model", "%2Fmodels%2Fsome%2520model"),
            ("/logs?model=a", "%2Flogs%3Fmodel%3Da"),
            ("/settings", "%2Fsettings"),
            ("/chat", "%2Fchat"),
        ] {
            let mut rq = c.get(format!("{base}{path}"));
            if let Some(ck) = &cookie {
                rq = rq.header("cookie", ck);
            }
            let r = rq.send().await.unwrap();
            assert_eq!(r.status(), 303, "{path} with {cookie:?}");
            let loc = r.headers()["location"].to_str().unwrap();
            let want = format!("/login?next={}", next.replace("%2F", "/"));
            assert_eq!(loc, want, "{path}");
        }
    }
    // The login page itself is open and keeps `next` only when it is a local path.
    let page = |q: &'static str| {
        let c = c.clone();
        let base = base.clone();
        async move {
            let r = c.get(format!("{base}/login{q}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    assert!(
        page("?next=/models/x")
            .await
            .contains(r#"data-next="/models/x""#)
    );
    assert!(
        page("?next=//evil.example/")
            .await
            .contains(r#"data-next="/""#)
    );
    assert!(
        page("?next=https://evil.example/")
            .await
            .contains(r#"data-next="/""#)
    );
    assert!(page("").await.contains(r#"<form id="login-form""#));
}

#[tokio::test]
async fn session_cookie_flags_and_pages_without_the_jwt() {
    let s = Server::start(&[], &[]).await;
    let base = s.base.clone();
    let (set_cookie, token) = login(&base).await;
    let flags: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    assert!(flags.contains(&"HttpOnly"), "{set_cookie}");
    assert!(flags.contains(&"SameSite=Strict"), "{set_cookie}");
    assert!(flags.contains(&"Path=/"), "{set_cookie}");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let c = client();
    for path in PAGES {
        let r = get(&base, &token, path).await;
        let want = if path == "/models/nope" { 404 } else { 200 };
        assert_eq!(r.status(), want, "{path}");
        let h = r.headers().clone();
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        let body = r.text().await.unwrap();
        assert!(body.contains("<main"), "{path}: {body}");
        assert!(body.contains("Log out"), "{path}");
        assert!(!body.contains(&token), "{path} embeds the JWT");
        assert!(
            !body.contains(parts[1]) && !body.contains(parts[2]),
            "{path} embeds part of the JWT"
        );
        assert!(!body.contains("<script>"), "{path} has an inline script");
        // Empty catalogue: each page says what to do rather than showing an empty table.
        let empty_note = match path {
            "/" => Some("No model is loaded."),
            "/models" | "/chat" => {
                Some("No models yet — download one or put a .gguf in MODELS_DIR")
            }
            "/settings" => Some("No API keys."),
            "/models/nope" => Some("No model named “nope” in the catalogue."),
            _ => None,
        };
        if let Some(note) = empty_note {
            assert!(body.contains(note), "{path} lacks its empty state {note:?}");
        }
    }
    // serve runs from a temporary directory (support::server): no templates/ or static/ beside it, so the
    // pages above came from templates compiled into the binary.
    assert!(!s.dir.path().join("templates").exists() && !s.dir.path().join("static").exists());
    // The JS never reads document.cookie, stores a token or sets an Authorization header: the session
    // cookie is its only credential, the chat playground's too (also when `require_api_key` is on).
    let js = c.get(format!("{base}/static/app.js")).send().await.unwrap();
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let js = js.text().await.unwrap();
    assert!(
        !js.contains("document.cookie")
            && !js.contains("localStorage")
            && !js.contains("sessionStorage")
            && !js.contains("indexedDB")
    );
    assert!(
        !js.contains("Authorization"),
        "the UI sends no Authorization header: the HttpOnly session cookie is its credential"
    );
    for (path, status) in [
        ("/static/app.css", 200),
        ("/static/vendor/uplot/uPlot.iife.min.js", 200),
        ("/static/vendor/uplot/LICENSE", 200),
        ("/static/../Cargo.toml", 404),
        ("/static/nope.js", 404),
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
    }
    // Logout clears the cookie (Max-Age=0) and revokes the token (its version is bumped).
    let r = c
        .post(format!("{base}/admin/api/logout"))
        .header("cookie", format!("ci_session={token}"))
        .header("origin", &base)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cleared = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.contains("Max-Age=0") && cleared.contains("HttpOnly"),
        "{cleared}"
    );
    let r = get(&base, &token, "/admin/api/me").await;
    assert_eq!(r.status(), 401, "the logged-out token is refused");
}

#[tokio::test]
async fn foreign_origins_are_refused_on_state_changing_routes() {
    let s = Server::start(&[MODEL_FILE], &[]).await;
    let base = s.base.clone();
    let (_, token) = login(&base).await;
    let c = client();
    let name = first_model(&base, &token).await;
    let routes: Vec<(reqwest::Method, String, Value)> = vec![
        (
            reqwest::Method::POST,
            "/admin/api/models/scan".into(),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            format!("/admin/api/models/{name}/pin"),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            format!("/admin/api/models/{name}/unload"),
            json!({}),
        ),
        (
            reqwest::Method::DELETE,
            format!("/admin/api/models/{name}"),
            json!({}),
        ),
        (
            reqwest::Method::POST,
            format!("/ui/api/models/{name}/settings"),
            json!({"ctx_size": "1024"}),
        ),
        (
            reqwest::Method::PUT,
            "/admin/api/settings".into(),
            json!({"model_idle_timeout": 7}),
        ),
        (
            reqwest::Method::POST,
            "/admin/api/keys".into(),
            json!({"name": "k"}),
        ),
        (
            reqwest::Method::POST,
            "/ui/api/password".into(),
            json!({"current": PASSWORD, "new": "hijacked-password"}),
        ),
        (reqwest::Method::POST, "/admin/api/logout".into(), json!({})),
    ];
    for origin in [Some("http://evil.example"), Some("null"), None] {
        for (m, path, body) in &routes {
            let mut rq = c
                .request(m.clone(), format!("{base}{path}"))
                .header("cookie", format!("ci_session={token}"))
                .json(body);
            if let Some(o) = origin {
                rq = rq.header("origin", o);
            }
            let r = rq.send().await.unwrap();
            assert_eq!(r.status(), 403, "{m} {path} with Origin {origin:?}");
        }
    }
    // Nothing changed: the model is still there, unpinned, with no ctx_size; no key; old password works.
    let m = get_json(&base, &token, &format!("/admin/api/models/{name}")).await;
    assert_eq!(m["model"]["pinned"], false);
    assert_eq!(m["model"]["ctx_size"], Value::Null);
    let keys = get_json(&base, &token, "/admin/api/keys").await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 0);
    login(&base).await;
    // The same requests with this server's Origin are accepted.
    let r = c
        .post(format!("{base}/ui/api/models/{name}/settings"))
        .header("cookie", format!("ci_session={token}"))
        .header("origin", &base)
        .json(&json!({"ctx_size": "1024"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn model_settings_form_and_password_are_validated_on_the_server() {
    let s = Server::start(&[MODEL_FILE], &[]).await;
    let base = s.base.clone();
    let (_, token) = login(&base).await;
    let c = client();
    let ck = format!("ci_session={token}");
    let name = first_model(&base, &token).await;
    let post = |path: String, body: Value| {
        let (c, ck, base) = (c.clone(), ck.clone(), base.clone());
        async move {
            let r = c
                .post(format!("{base}{path}"))
                .header("cookie", ck)
                .header("origin", &base)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let settings = format!("/ui/api/models/{name}/settings");
    let (st, b) = post(
        settings.clone(),
        json!({"ctx_size": "lots", "temperature": "9", "threads": "2", "top_p": "0.9"}),
    )
    .await;
    assert_eq!(st, 422, "{b}");
    assert!(
        b["errors"]["ctx_size"].as_str().unwrap().contains("lots"),
        "{b}"
    );
    assert!(
        b["errors"]["temperature"]
            .as_str()
            .unwrap()
            .contains("between 0 and 5"),
        "{b}"
    );
    assert!(
        b["errors"].get("threads").is_none() && b["errors"].get("top_p").is_none(),
        "{b}"
    );
    let (st, b) = post(
        settings.clone(),
        json!({"ctx_size": "1536", "temperature": "0.3", "threads": ""}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["model"]["ctx_size"], 1536);
    assert_eq!(b["model"]["temperature"], 0.3);
    let page = get(&base, &token, &format!("/models/{name}"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"name="ctx_size" inputmode="decimal" value="1536""#),
        "saved value shown"
    );
    let (st, _) = post(
        "/ui/api/models/nope/settings".into(),
        json!({"ctx_size": "1024"}),
    )
    .await;
    assert_eq!(st, 404);

    let (st, b) = post(
        "/ui/api/password".into(),
        json!({"current": "wrong", "new": "short"}),
    )
    .await;
    assert_eq!(st, 422, "{b}");
    assert_eq!(b["errors"]["current"], "wrong password");
    assert!(b["errors"]["new"].as_str().unwrap().contains("at least 8"));
    let (st, b) = post(
        "/ui/api/password".into(),
        json!({"current": PASSWORD, "new": "a-new-long-password"}),
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let try_login = |pw: &'static str| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            c.post(format!("{base}/admin/api/login"))
                .json(&json!({"username": "admin", "password": pw}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(try_login("a-new-long-password").await, 200);
    assert_eq!(try_login(PASSWORD).await, 401);
}
