//! Authentication: admin login (argon2id) issuing JWTs (HS256) as an HttpOnly SameSite=Strict cookie or
//! a Bearer token, the Origin check on state-changing admin requests, a per-address login rate limit, and
//! API keys (SHA-256 hashed, shown once) for `/v1/*` when required. Exposed as axum extractors.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::post};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;

/// Name of the session cookie.
pub const COOKIE: &str = "ci_session";
/// Failed logins allowed per client address within [`LOGIN_WINDOW`] before 429.
pub const MAX_FAILED_LOGINS: u32 = 5;
/// Window of the login rate limit.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Name of the admin user created by `init`.
pub const ADMIN_USER: &str = "admin";
/// Most argon2 verifications (or hashes) running at once: each takes 19 MiB and a core for ~50 ms.
pub const MAX_CONCURRENT_ARGON2: usize = 2;
/// Longest a login waits for an argon2 slot before 503.
pub const ARGON2_WAIT: Duration = Duration::from_secs(10);
/// Most client addresses the login limiter tracks; past it, an address it does not know yet is refused
/// (429) until entries age out of [`LOGIN_WINDOW`].
pub const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// An auth helper that failed (hashing; never a wrong password, which is `Ok(false)`).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot hash password: {0}")]
    Hash(String),
    #[error("cannot sign token: {0}")]
    Sign(String),
}

/// Hashes a password with argon2id (the crate's default parameters: 19 MiB, 2 passes, 1 lane), as a PHC
/// string.
///
/// Errors: [`AuthError::Hash`].
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Whether `password` matches a PHC hash (a malformed hash never matches).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A random password of 24 URL-safe characters (~143 bits).
pub fn generate_password() -> String {
    use base64::Engine;
    let mut b = [0u8; 18];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The claims of an admin JWT.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user name.
    pub sub: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// The user's token version when issued (`users.token_version`): logout and a password change bump
    /// it, which rejects every token issued before.
    #[serde(default)]
    pub ver: i64,
}

/// Signing keys, the login limiter, the argon2 slots and the users' token versions, shared by the
/// handlers.
pub struct AuthState {
    enc: EncodingKey,
    dec: DecodingKey,
    /// Login attempts without a success per address, since the first one of the window.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    argon2: tokio::sync::Semaphore,
    /// Current token version per user (a copy of `users.token_version`).
    versions: Mutex<HashMap<String, i64>>,
    /// Whether `/v1/*` needs an API key (the `require_api_key` override in `configurations`).
    pub require_api_key: AtomicBool,
    /// ALLOWED_HOSTS (lower case; empty = any), see [`host_allowed`].
    pub allowed_hosts: Vec<String>,
}

impl AuthState {
    /// Keys from the JWT secret bytes.
    pub fn new(secret: &[u8], require_api_key: bool) -> AuthState {
        AuthState {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            failures: Mutex::new(HashMap::new()),
            argon2: tokio::sync::Semaphore::new(MAX_CONCURRENT_ARGON2),
            versions: Mutex::new(HashMap::new()),
            require_api_key: AtomicBool::new(require_api_key),
            allowed_hosts: Vec::new(),
        }
    }

    /// Records `user`'s current token version (from the database): tokens with another one are refused.
    pub fn set_token_version(&self, user: &str, version: i64) {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_owned(), version);
    }

    fn token_version(&self, user: &str) -> i64 {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    /// Runs `f` (an argon2 hash or verification) on a blocking thread once one of the
    /// [`MAX_CONCURRENT_ARGON2`] slots is free.
    ///
    /// Errors: 503 (`Retry-After`) when no slot frees within [`ARGON2_WAIT`]; 500 when `f` panicked.
    pub async fn argon2<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let busy = || {
            ApiError::unavailable(
                "busy",
                "too many password checks at once; try again in a few seconds",
            )
            .retry_after(2)
        };
        let _permit = tokio::time::timeout(ARGON2_WAIT, self.argon2.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ApiError::internal(format!("password check failed: {e}")))
    }

    /// A token for `user` valid for `hours`; returns it with its expiry (Unix seconds).
    ///
    /// Errors: [`AuthError::Sign`].
    pub fn issue(&self, user: &str, hours: u32) -> Result<(String, u64), AuthError> {
        let now = unix_now();
        let claims = Claims {
            sub: user.to_owned(),
            iat: now,
            exp: now + u64::from(hours) * 3600,
            ver: self.token_version(user),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
            .map(|t| (t, claims.exp))
            .map_err(|e| AuthError::Sign(e.to_string()))
    }

    /// The claims of a valid, unexpired HS256 token signed with our secret, carrying its user's current
    /// token version.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &self.dec, &v)
            .ok()?
            .claims;
        (claims.ver == self.token_version(&claims.sub)).then_some(claims)
    }

    /// Counts a login attempt from `ip` *before* its password is checked, so parallel guesses cannot
    /// all slip under the limit. `Err(seconds)` when `ip` has used its [`MAX_FAILED_LOGINS`] attempts of
    /// the window (or the table is full and `ip` is not in it).
    fn begin_attempt(&self, ip: IpAddr) -> Result<(), u64> {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= MAX_TRACKED_ADDRESSES && !f.contains_key(&ip) {
            f.retain(|_, (_, since)| since.elapsed() < LOGIN_WINDOW);
            if f.len() >= MAX_TRACKED_ADDRESSES {
                return Err(60);
            }
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= LOGIN_WINDOW {
            *e = (0, Instant::now());
        }
        if e.0 >= MAX_FAILED_LOGINS {
            return Err((LOGIN_WINDOW.saturating_sub(e.1.elapsed()))
                .as_secs()
                .max(1));
        }
        e.0 += 1;
        Ok(())
    }

    fn succeed(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip);
    }
}

/// Whether `/v1/*` needs an API key when the admin has not chosen (no `require_api_key` override): yes
/// on a non-loopback HOST (the API is reachable from the network), no on loopback.
pub fn default_require_api_key(s: &crate::config::Settings) -> bool {
    !s.host_is_loopback()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// SHA-256 (hex) of an API key: keys are 256-bit random, so a fast hash is enough.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key `ci-<43 base64url chars>` and its display prefix (the first 10 characters).
pub fn generate_api_key() -> (String, String) {
    use base64::Engine;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    let key = format!(
        "ci-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    );
    let prefix = key[..10].to_owned();
    (key, prefix)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Whether a state-changing request's `Origin` names this server (`http(s)://` + the Host header).
/// A request without Origin passes only when `allow_missing` (a Bearer client, not a browser).
pub fn origin_ok(headers: &HeaderMap, allow_missing: bool) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return allow_missing;
    };
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

/// Whether a request's `Host` header value passes the ALLOWED_HOSTS list: always when the list is empty;
/// otherwise an IP address (a DNS-rebinding page has a name of its own) or `localhost` (ports ignored),
/// or a listed name. A request without Host does not pass a non-empty list.
pub fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        // [v6]:port
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok() || name == "localhost" || allowed.contains(&name)
}

/// Whether a request declares a JSON body (`Content-Type: application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Middleware over the whole application:
/// - a `Host` not in ALLOWED_HOSTS (when set) is refused with 403, except on `/health` (DNS rebinding:
///   a page of another site that resolves its name to this machine);
/// - a POST to `/v1/*` without `Content-Type: application/json` is refused with 415: a cross-site HTML
///   form can only send `text/plain`, form or multipart bodies without a CORS preflight, so this keeps
///   other sites from loading, evicting or using models through the visitor's browser.
pub async fn request_guard(
    State(st): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if req.uri().path() != "/health" && !host_allowed(host, &st.auth.allowed_hosts) {
        return ApiError::forbidden(format!(
            "host `{}` is not in ALLOWED_HOSTS",
            host.unwrap_or("")
        ))
        .into_response();
    }
    if req.method() == Method::POST
        && req.uri().path().starts_with("/v1/")
        && !is_json(req.headers())
    {
        return ApiError {
            code: Some("unsupported_media_type"),
            ..ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "the body must be JSON sent with `Content-Type: application/json`",
            )
        }
        .into_response();
    }
    next.run(req).await
}

fn state_changing(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// An authenticated admin: a valid JWT in `Authorization: Bearer` or the session cookie. For
/// state-changing methods a cookie session also needs a matching `Origin` (CSRF); a Bearer request with
/// an Origin must match too. Rejects with 401 (no or bad token) or 403 (foreign Origin).
pub struct AdminUser(pub String);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (token, via_cookie) = match bearer(&parts.headers) {
            Some(t) => (t, false),
            None => match cookie(&parts.headers, COOKIE) {
                Some(t) => (t, true),
                None => return Err(ApiError::unauthorized("login required")),
            },
        };
        let claims = state
            .auth
            .verify(token)
            .ok_or_else(|| ApiError::unauthorized("invalid or expired token"))?;
        if state_changing(&parts.method) && !origin_ok(&parts.headers, !via_cookie) {
            return Err(ApiError::forbidden(
                "cross-origin request refused: Origin must match the Host of this server",
            ));
        }
        Ok(AdminUser(claims.sub))
    }
}

/// Whether a request comes from one of this server's own pages: an `Origin` naming this server (see
/// [`origin_ok`]), or, when the browser sent no Origin (a same-origin GET), `Sec-Fetch-Site: same-origin`.
/// A request with neither (curl, a script, an old browser) is not taken as same-origin.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::ORIGIN) {
        return origin_ok(headers, false);
    }
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("same-origin"))
}

/// Who a `/v1/*` request is when API keys are required: `Some(id)` for a valid API key; `None` when keys
/// are not required, or for a logged-in admin (a valid admin JWT, so the admin UI's chat playground works
/// without a key).
///
/// The admin JWT counts as a Bearer token (no browser sends one on its own, so no CSRF risk; an `Origin`,
/// when present, must still name this server), or as the session cookie only from this server's own pages
/// ([`same_origin`]): a browser attaches the cookie to requests other sites make (SameSite treats every
/// port of a host as the same site), so without that check any local page could chat on the admin's
/// behalf. Rejects with 401 in OpenAI's error shape when a key is required and missing, unknown, revoked,
/// or only a cross-origin session cookie came.
pub struct ApiKey(pub Option<i64>);

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if !state.auth.require_api_key.load(Ordering::Relaxed) {
            return Ok(ApiKey(None));
        }
        let Some(key) = bearer(&parts.headers) else {
            let session = cookie(&parts.headers, COOKIE).and_then(|t| state.auth.verify(t));
            return match session {
                Some(_) if same_origin(&parts.headers) => Ok(ApiKey(None)),
                Some(_) => Err(ApiError::invalid_api_key(
                    "an API key is required (Authorization: Bearer KEY); the admin session is \
                     accepted only from this server's own pages (cross-origin request refused)",
                )),
                None => Err(ApiError::invalid_api_key(
                    "an API key is required (Authorization: Bearer KEY)",
                )),
            };
        };
        // An admin JWT (three dot-separated parts; API keys have none): checked without the database.
        if key.contains('.') && state.auth.verify(key).is_some() {
            return if origin_ok(&parts.headers, true) {
                Ok(ApiKey(None))
            } else {
                Err(ApiError::invalid_api_key(
                    "cross-origin request refused: Origin must match the Host of this server",
                ))
            };
        }
        match state.db.use_api_key(&hash_api_key(key)).await {
            Ok(Some(k)) => Ok(ApiKey(Some(k.id))),
            Ok(None) => Err(ApiError::invalid_api_key("invalid or revoked API key")),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
    password: String,
}

/// `POST /admin/api/login` `{username, password}` → `{token, expires_at}` and the session cookie.
/// 401 for a bad user or password, 429 (with Retry-After) after [`MAX_FAILED_LOGINS`] failures from one
/// address within [`LOGIN_WINDOW`], 403 for a foreign Origin.
async fn login(
    State(st): State<AppState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<LoginBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let ip = addr.ip();
    if !origin_ok(&headers, true) {
        return Err(ApiError::forbidden("cross-origin login refused"));
    }
    if let Err(wait) = st.auth.begin_attempt(ip) {
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!("too many failed logins from {ip}; try again in {wait} s"),
        )
        .into_response();
        r.headers_mut().insert(header::RETRY_AFTER, wait.into());
        return Ok(r);
    }
    let Json(body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let user = st
        .db
        .get_user(&body.username)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // Verify against a dummy hash for unknown users so timing does not reveal which names exist.
    let hash = user
        .as_ref()
        .map_or_else(|| DUMMY_HASH.to_owned(), |u| u.password_hash.clone());
    let pw = body.password;
    let ok = st.auth.argon2(move || verify_password(&pw, &hash)).await? && user.is_some();
    if !ok {
        tracing::warn!(%ip, user = %body.username, "failed admin login");
        return Err(ApiError::unauthorized("invalid username or password"));
    }
    st.auth.succeed(ip);
    let hours = st.settings().jwt_expiry_hours;
    let (token, exp) = st
        .auth
        .issue(&body.username, hours)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let cookie = session_cookie(&token, hours);
    let mut r =
        Json(serde_json::json!({"token": token, "expires_at": exp, "username": body.username}))
            .into_response();
    if let Ok(v) = cookie.parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// The `Set-Cookie` value of a session holding `token` for `hours`.
pub fn session_cookie(token: &str, hours: u32) -> String {
    format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        u64::from(hours) * 3600
    )
}

/// An argon2id hash of a random password, verified against for unknown users.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password(&generate_password()).unwrap_or_default());

/// Rejects every token issued to `user` so far (logout, password change): bumps `users.token_version`.
///
/// Errors: a database error (500).
pub async fn revoke_tokens(st: &AppState, user: &str) -> Result<(), ApiError> {
    if let Some(v) = st.db.bump_token_version(user).await? {
        st.auth.set_token_version(user, v);
    }
    Ok(())
}

/// `POST /admin/api/logout`: ends every session of the user (the token version is bumped, so this token
/// and any copy of it stop working) and clears the cookie.
async fn logout(State(st): State<AppState>, AdminUser(u): AdminUser) -> Result<Response, ApiError> {
    revoke_tokens(&st, &u).await?;
    tracing::info!(user = %u, "logged out; earlier tokens revoked");
    let mut r = Json(serde_json::json!({"ok": true})).into_response();
    if let Ok(v) = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0").parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// `GET /admin/api/me`: the logged-in user.
async fn me(AdminUser(u): AdminUser) -> Json<serde_json::Value> {
    Json(serde_json::json!({"username": u}))
}

/// Login, logout and me.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/api/login", post(login))
        .route("/admin/api/logout", post(logout))
        .route("/admin/api/me", axum::routing::get(me))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_attempts_are_counted_before_the_check() {
        let a = std::sync::Arc::new(AuthState::new(b"k", false));
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        // 32 guesses at once, none finished: only MAX_FAILED_LOGINS get to the password check.
        let passed: u32 = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..32)
                .map(|_| {
                    let a = a.clone();
                    sc.spawn(move || u32::from(a.begin_attempt(ip).is_ok()))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, MAX_FAILED_LOGINS);
        let wait = a.begin_attempt(ip).unwrap_err();
        assert!(wait > 0 && wait <= LOGIN_WINDOW.as_secs());
    }

    #[test]
    fn the_limiter_table_is_bounded() {
        let a = AuthState::new(b"k", false);
        for i in 0..MAX_TRACKED_ADDRESSES as u32 {
            assert!(a.begin_attempt(IpAddr::from(i.to_be_bytes())).is_ok());
        }
        let new: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(
            a.begin_attempt(new).is_err(),
            "a full table refuses a new address"
        );
        assert!(
            a.begin_attempt(IpAddr::from(5u32.to_be_bytes())).is_ok(),
            "a known one keeps its count"
        );
        assert!(a.failures.lock().unwrap().len() <= MAX_TRACKED_ADDRESSES);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn at_most_a_few_argon2_checks_run_at_once() {
        use std::sync::atomic::AtomicUsize;
        let a = std::sync::Arc::new(AuthState::new(b"k", false));
        let now = std::sync::Arc::new(AtomicUsize::new(0));
        let max = std::sync::Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 * MAX_CONCURRENT_ARGON2 {
            let (a, now, max) = (a.clone(), now.clone(), max.clone());
            set.spawn(async move {
                a.argon2(move || {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(40));
                    now.fetch_sub(1, Ordering::SeqCst);
                })
                .await
                .unwrap()
            });
        }
        while set.join_next().await.is_some() {}
        assert_eq!(max.load(Ordering::SeqCst), MAX_CONCURRENT_ARGON2);
    }

    #[test]
    fn a_bumped_token_version_rejects_earlier_tokens() {
        let a = AuthState::new(b"secret-a", false);
        let (old, _) = a.issue("admin", 1).unwrap();
        assert!(a.verify(&old).is_some());
        a.set_token_version("admin", 1);
        assert!(a.verify(&old).is_none(), "issued before the bump");
        let (new, _) = a.issue("admin", 1).unwrap();
        assert_eq!(a.verify(&new).unwrap().ver, 1);
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("s3cret", "not a hash"));
        assert!(!verify_password("x", &DUMMY_HASH));
        assert_ne!(generate_password(), generate_password());
    }

    #[test]
    fn tokens_are_checked_for_signature_and_expiry() {
        let a = AuthState::new(b"secret-a", false);
        let b = AuthState::new(b"secret-b", false);
        let (t, exp) = a.issue("admin", 1).unwrap();
        assert!(exp > unix_now());
        assert_eq!(a.verify(&t).unwrap().sub, "admin");
        assert!(b.verify(&t).is_none(), "signed with another secret");
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "admin".into(),
                iat: 1,
                exp: unix_now() - 10,
                ver: 0,
            },
            &EncodingKey::from_secret(b"secret-a"),
        )
        .unwrap();
        assert!(a.verify(&expired).is_none());
        let none_alg =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(a.verify(none_alg).is_none());
    }

    #[test]
    fn limiter_and_origin() {
        let a = AuthState::new(b"k", false);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..MAX_FAILED_LOGINS {
            assert!(a.begin_attempt(ip).is_ok());
        }
        assert!(a.begin_attempt(ip).is_err());
        a.succeed(ip);
        assert!(a.begin_attempt(ip).is_ok());

        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8337".parse().unwrap());
        assert!(origin_ok(&h, true));
        assert!(!origin_ok(&h, false));
        h.insert(header::ORIGIN, "http://127.0.0.1:8337".parse().unwrap());
        assert!(origin_ok(&h, false));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!origin_ok(&h, true));
        assert!(!same_origin(&h));
        // No Origin: only the browser's own Sec-Fetch-Site says same-origin.
        h.remove(header::ORIGIN);
        assert!(!same_origin(&h), "neither header: not a page of ours");
        h.insert("sec-fetch-site", "same-site".parse().unwrap());
        assert!(!same_origin(&h), "another port of the same host");
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://localhost:9999".parse().unwrap());
        assert!(!same_origin(&h), "an Origin, when sent, decides");
        h.insert(header::COOKIE, "a=b; ci_session=tok; c=d".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE), Some("tok"));
        let allowed = vec!["ci.example".to_string()];
        assert!(host_allowed(Some("anything"), &[]));
        assert!(host_allowed(Some("ci.example:8337"), &allowed));
        assert!(host_allowed(Some("CI.example."), &allowed));
        assert!(host_allowed(Some("127.0.0.1:8337"), &allowed));
        assert!(host_allowed(Some("[::1]:8337"), &allowed));
        assert!(host_allowed(Some("localhost"), &allowed));
        assert!(!host_allowed(
            Some("rebind.attacker.example:8337"),
            &allowed
        ));
        assert!(!host_allowed(Some("ci.example.attacker.example"), &allowed));
        assert!(!host_allowed(None, &allowed));
        let mut j = HeaderMap::new();
        assert!(!is_json(&j));
        j.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(!is_json(&j));
        j.insert(
            header::CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&j));
        let (k, p) = generate_api_key();
        assert!(k.starts_with(&p) && k.len() == 46);
        assert_eq!(hash_api_key(&k).len(), 64);
    }
}
