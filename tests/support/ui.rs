//! Helpers of the admin UI tests (pages over HTTP and the headless-browser run), on top of the
//! supervisor harness in [`super::server`]: a client that does not follow redirects, the cookie login, and
//! admin API reads with the session cookie as the UI sends them.

use serde_json::Value;

/// The chat model the UI tests put in MODELS_DIR.
pub const MODEL_FILE: &str = super::assets::SMOL_Q4_K_M;

/// An HTTP client that does not follow redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in as admin with [`super::server::PASSWORD`]; returns the raw Set-Cookie header and the session
/// token (the `ci_session` cookie's value).
pub async fn login(base: &str) -> (String, String) {
    let r = client()
        .post(format!("{base}/admin/api/login"))
        .json(&serde_json::json!({"username": "admin", "password": super::server::PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login failed");
    let set_cookie = r
        .headers()
        .get("set-cookie")
        .expect("login sets a cookie")
        .to_str()
        .unwrap()
        .to_owned();
    let token = set_cookie
        .split(';')
        .next()
        .and_then(|kv| kv.strip_prefix("ci_session="))
        .expect("cookie ci_session")
        .to_owned();
    (set_cookie, token)
}

/// `GET base+path` with the session cookie `token`.
pub async fn get(base: &str, token: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{base}{path}"))
        .header("cookie", format!("ci_session={token}"))
        .send()
        .await
        .unwrap()
}

/// The JSON body of [`get`]; panics when it is not JSON.
pub async fn get_json(base: &str, token: &str, path: &str) -> Value {
    get(base, token, path).await.json().await.unwrap()
}

/// The catalogue name of the first model `/admin/api/models` lists.
pub async fn first_model(base: &str, token: &str) -> String {
    let models = get_json(base, token, "/admin/api/models").await;
    models["models"][0]["model"]["name"]
        .as_str()
        .expect("the model is in the catalogue")
        .to_owned()
}
