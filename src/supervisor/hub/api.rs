//! The Hugging Face API client: the HTTP client (auth token, timeouts, redirect policy), the model-info
//! request that lists a repo's files, and the status-to-error mapping and retry backoff that the
//! transfer shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::HubError;
use super::net::{MAX_REDIRECTS, PublicOnly, redirect_refusal, refused_address};
use super::select::{
    GgufModel, RepoFile, check_revision, group_models, is_gguf, no_gguf, parse_repo_id,
    quantization_of, split_of,
};
use crate::config::{Loaded, Source};

/// Downloads that transfer at once by default (the rest wait, `queued`): a couple saturate a typical
/// link without starving the model workers of disk bandwidth.
pub const DEFAULT_MAX_DOWNLOADS: usize = 2;
/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The largest model-info JSON accepted from the API (bytes); repos with thousands of files stay far below.
const MAX_API_BODY: usize = 32 << 20;

/// Retries of a failed request or dropped transfer: exponential backoff, doubling from `initial_backoff`
/// up to `max_backoff`. The count restarts whenever an attempt made progress, so a long download over a
/// flaky link keeps going as long as bytes keep arriving.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Consecutive attempts without progress before giving up (at least 1).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(16),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// How a [`Hub`] reaches the hub and where it puts models.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Base URL, e.g. `https://huggingface.co` (a path prefix is allowed, for mirrors).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …` (the HTTP client drops it on redirects to another host).
    pub token: Option<String>,
    /// Where finished models go; downloads in progress live in `models_dir/.partial`.
    pub models_dir: PathBuf,
    /// Downloads running at once; later ones wait (cancellable) for a slot.
    pub max_concurrent: usize,
    pub retry: RetryPolicy,
    pub connect_timeout: Duration,
    /// A transfer that receives nothing for this long counts as dropped (and is retried).
    pub read_timeout: Duration,
}

impl HubConfig {
    /// A configuration with the defaults: [`DEFAULT_MAX_DOWNLOADS`] concurrent downloads, 6 attempts, 30 s connect and 60 s
    /// read timeouts.
    pub fn new(endpoint: impl Into<String>, token: Option<String>, models_dir: PathBuf) -> Self {
        HubConfig {
            endpoint: endpoint.into(),
            token,
            models_dir,
            max_concurrent: DEFAULT_MAX_DOWNLOADS,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }

    /// From the settings: `hf_endpoint`, `hf_token` and `models_dir`. When `hf_endpoint` / `hf_token`
    /// were not set (in the file or as `CYBER_INFERENCE_*`), the standard `HF_ENDPOINT` / `HF_TOKEN`
    /// variables of Hugging Face's own tools are honoured.
    pub(crate) fn from_settings(loaded: &Loaded) -> Self {
        Self::from_settings_with_env(loaded, |k| std::env::var(k).ok())
    }

    /// [`HubConfig::from_settings`] with the environment given as a function (for tests).
    fn from_settings_with_env(loaded: &Loaded, env: impl Fn(&str) -> Option<String>) -> Self {
        let s = &loaded.settings;
        let endpoint_is_default = loaded
            .sources()
            .iter()
            .any(|(n, src)| *n == "hf_endpoint" && *src == Source::Default);
        let endpoint = match env("HF_ENDPOINT").filter(|e| !e.is_empty()) {
            Some(e) if endpoint_is_default => e,
            _ => s.hf_endpoint.clone(),
        };
        let token = s
            .hf_token
            .clone()
            .or_else(|| env("HF_TOKEN").filter(|t| !t.is_empty()));
        HubConfig::new(endpoint, token, s.models_dir.clone())
    }
}

/// The downloader. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Hub {
    pub(super) client: reqwest::Client,
    endpoint: Url,
    token: Option<HeaderValue>,
    pub(super) models_dir: PathBuf,
    pub(super) limit: Arc<Semaphore>,
    max_concurrent: usize,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("models_dir", &self.models_dir)
            .finish()
    }
}

/// Why one HTTP attempt failed: worth retrying, or final.
pub(super) enum Attempt {
    Retry(String),
    Fatal(HubError),
}

impl Attempt {
    /// A request to `url` that got no answer: a refused redirect ([`redirect_refusal`]) is final,
    /// anything else (connection, timeout) worth retrying.
    pub(super) fn send_failed(url: &Url, e: &reqwest::Error) -> Attempt {
        if e.is_redirect() || refused_address(e) {
            Attempt::Fatal(HubError::BadResponse {
                url: url.to_string(),
                detail: error_chain(e),
            })
        } else {
            Attempt::Retry(error_chain(e))
        }
    }
}

impl Hub {
    /// Builds the HTTP client. Errors: an endpoint that is not an http(s) URL, a token that cannot be a
    /// header value ([`HubError::InvalidArgument`]), a client that cannot start (TLS set-up).
    pub fn new(config: HubConfig) -> Result<Self, HubError> {
        let endpoint = Url::parse(config.endpoint.trim_end_matches('/'))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| HubError::InvalidArgument {
                what: "HF endpoint",
                value: config.endpoint.clone(),
                reason: "must be an http:// or https:// URL",
            })?;
        let token = match config.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    HubError::InvalidArgument {
                        what: "HF token",
                        value: "<hidden>".into(),
                        reason: "contains characters not allowed in an HTTP header",
                    }
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("cyber-inference/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .dns_resolver(Arc::new(PublicOnly {
                endpoint_host: endpoint
                    .host_str()
                    .map(|h| h.trim_end_matches('.').to_ascii_lowercase()),
            }))
            .redirect({
                let endpoint = endpoint.clone();
                reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= MAX_REDIRECTS {
                        return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                    }
                    match redirect_refusal(&endpoint, attempt.url()) {
                        Some(why) => attempt.error(why),
                        None => attempt.follow(),
                    }
                })
            })
            .build()
            .map_err(|e| HubError::Network {
                url: endpoint.to_string(),
                attempts: 0,
                detail: format!("cannot create the HTTP client: {e}"),
            })?;
        Ok(Hub {
            client,
            endpoint,
            token,
            models_dir: config.models_dir,
            limit: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            max_concurrent: config.max_concurrent.max(1),
            retry: RetryPolicy {
                max_attempts: config.retry.max_attempts.max(1),
                ..config.retry
            },
        })
    }

    /// MODELS_DIR.
    pub(crate) fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// Downloads that transfer at once (the others wait for a slot).
    pub(crate) fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    pub(super) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .expect("checked in Hub::new: the endpoint can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    pub(super) fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = &self.token {
            h.insert(header::AUTHORIZATION, t.clone());
        }
        h
    }

    /// Maps an error answer of the API (`file` `None`) or of a file request from `url` to an error that
    /// says what to do; an unexpected status carries the URL and the first 200 characters of the body.
    pub(super) async fn refusal(
        &self,
        resp: reqwest::Response,
        url: &Url,
        repo: &str,
        revision: &str,
        file: Option<&str>,
    ) -> Attempt {
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let has_token = self.token.is_some();
        let auth = |status: u16| {
            if has_token {
                HubError::AuthRejected {
                    repo: repo.into(),
                    status,
                }
            } else {
                HubError::AuthRequired {
                    repo: repo.into(),
                    status,
                }
            }
        };
        let not_found = || HubError::RepoNotFound {
            repo: repo.into(),
            endpoint: self.endpoint.to_string(),
            hint: if has_token {
                ""
            } else {
                " (a private repo also needs HF_TOKEN)"
            },
        };
        let file_not_found = |file: &str| HubError::FileNotFound {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
        };
        match (status.as_u16(), code.as_str()) {
            (_, "RevisionNotFound") => Attempt::Fatal(HubError::RevisionNotFound {
                repo: repo.into(),
                revision: revision.into(),
            }),
            (_, "EntryNotFound") => Attempt::Fatal(file_not_found(file.unwrap_or(""))),
            (_, "RepoNotFound") => Attempt::Fatal(not_found()),
            (s @ (401 | 403), _) => Attempt::Fatal(auth(s)),
            (404, _) => Attempt::Fatal(file.map_or_else(not_found, file_not_found)),
            (s, _) if s == 408 || s == 429 || status.is_server_error() => {
                Attempt::Retry(format!("HTTP {status}"))
            }
            (s, _) => Attempt::Fatal(HubError::Http {
                status: s,
                url: url.to_string(),
                body: read_snippet(resp).await,
            }),
        }
    }

    /// [`HubError::Network`] (with `detail`, why the last attempt failed) once `attempt` consecutive
    /// attempts on `url` without progress are all the retry policy allows.
    pub(super) fn check_attempts(
        &self,
        url: &Url,
        attempt: u32,
        detail: &str,
    ) -> Result<(), HubError> {
        if attempt >= self.retry.max_attempts {
            return Err(HubError::Network {
                url: url.to_string(),
                attempts: attempt,
                detail: detail.to_string(),
            });
        }
        Ok(())
    }

    /// Sleeps the backoff for `attempt`, or returns `Cancelled`.
    pub(super) async fn backoff(
        &self,
        attempt: u32,
        cancel: &CancellationToken,
    ) -> Result<(), HubError> {
        tokio::select! {
            _ = cancel.cancelled() => Err(HubError::Cancelled),
            _ = tokio::time::sleep(self.retry.backoff(attempt)) => Ok(()),
        }
    }

    /// Every file of `repo_id` at `revision` (default `main`) with size and LFS SHA-256, GGUF or not.
    ///
    /// Errors: [`HubError::InvalidRepoId`], [`HubError::RepoNotFound`], [`HubError::RevisionNotFound`],
    /// [`HubError::AuthRequired`] / [`HubError::AuthRejected`] (gated or private), [`HubError::Network`]
    /// after retries, [`HubError::BadResponse`] for JSON that is not model info.
    pub(crate) async fn list_files(
        &self,
        repo_id: &str,
        revision: Option<&str>,
    ) -> Result<Vec<RepoFile>, HubError> {
        let (owner, name) = parse_repo_id(repo_id)?;
        let revision = revision.unwrap_or("main");
        check_revision(revision)?;
        let mut url = self.url(&["api", "models", owner, name, "revision", revision]);
        url.query_pairs_mut().append_pair("blobs", "true");
        let cancel = CancellationToken::new();
        let mut attempt = 0;
        let body = loop {
            attempt += 1;
            let result = async {
                let resp = self
                    .client
                    .get(url.clone())
                    .headers(self.headers())
                    .send()
                    .await
                    .map_err(|e| Attempt::send_failed(&url, &e))?;
                if !resp.status().is_success() {
                    return Err(self.refusal(resp, &url, repo_id, revision, None).await);
                }
                read_limited(resp, MAX_API_BODY).await.map_err(|e| match e {
                    LimitedError::TooLarge => Attempt::Fatal(HubError::BadResponse {
                        url: url.to_string(),
                        detail: format!("model info larger than {MAX_API_BODY} bytes"),
                    }),
                    LimitedError::Net(d) => Attempt::Retry(d),
                })
            }
            .await;
            match result {
                Ok(body) => break body,
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(detail)) => {
                    self.check_attempts(&url, attempt, &detail)?;
                    tracing::warn!(%url, attempt, %detail, "model info request failed; retrying");
                    self.backoff(attempt, &cancel).await?;
                }
            }
        };
        parse_model_info(&body).map_err(|detail| HubError::BadResponse {
            url: url.to_string(),
            detail,
        })
    }

    /// The repo's GGUF files (splits kept as separate entries), each with size, quantization and SHA-256.
    /// Errors: as [`Hub::list_files`].
    pub async fn list_gguf_files(
        &self,
        repo_id: &str,
        revision: Option<&str>,
    ) -> Result<Vec<RepoFile>, HubError> {
        Ok(self
            .list_files(repo_id, revision)
            .await?
            .into_iter()
            .filter(|f| is_gguf(&f.filename))
            .collect())
    }

    /// The repo's downloadable models ([`group_models`] of its GGUF files), smallest first: what the
    /// admin API's `repo-files` listing shows. Errors: as [`Hub::list_files`], and [`HubError::NoGguf`].
    pub async fn list_models(
        &self,
        repo_id: &str,
        revision: Option<&str>,
    ) -> Result<Vec<GgufModel>, HubError> {
        let files = self.list_files(repo_id, revision).await?;
        let models = group_models(&files);
        if models.is_empty() {
            return Err(no_gguf(repo_id, revision.unwrap_or("main"), &files));
        }
        Ok(models)
    }
}

/// A reqwest error with its causes (the useful part — "connection refused" — is usually a cause).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

enum LimitedError {
    TooLarge,
    Net(String),
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, LimitedError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| LimitedError::Net(error_chain(&e)))?
    {
        if out.len() + chunk.len() > limit {
            return Err(LimitedError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The first 200 characters of an error body, for messages.
async fn read_snippet(resp: reqwest::Response) -> String {
    match read_limited(resp, 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).chars().take(200).collect(),
        Err(_) => String::new(),
    }
}

/// Parses the API's model info into files. Siblings without a usable size or with a malformed oid are
/// rejected (the answer is untrusted).
fn parse_model_info(body: &[u8]) -> Result<Vec<RepoFile>, String> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        siblings: Option<Vec<Sibling>>,
    }
    #[derive(Deserialize)]
    struct Sibling {
        rfilename: String,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        lfs: Option<Lfs>,
    }
    #[derive(Deserialize)]
    struct Lfs {
        #[serde(default)]
        sha256: Option<String>,
        #[serde(default)]
        size: Option<u64>,
    }
    let info: Info =
        serde_json::from_slice(body).map_err(|e| format!("model info is not valid JSON: {e}"))?;
    let siblings = info
        .siblings
        .ok_or("model info has no `siblings` list (is HF_ENDPOINT a Hugging Face hub?)")?;
    let mut out = Vec::with_capacity(siblings.len());
    for s in siblings {
        let size = s.lfs.as_ref().and_then(|l| l.size).or(s.size);
        let sha256 = match s.lfs.and_then(|l| l.sha256) {
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "`{}` has a malformed LFS sha256 `{}`",
                        s.rfilename,
                        h.chars().take(80).collect::<String>()
                    ));
                }
                Some(h)
            }
            None => None,
        };
        let Some(size) = size else {
            if is_gguf(&s.rfilename) {
                return Err(format!(
                    "`{}` has no size (the request asks for ?blobs=true)",
                    s.rfilename
                ));
            }
            continue;
        };
        out.push(RepoFile {
            quantization: quantization_of(&s.rfilename),
            split: split_of(&s.rfilename),
            filename: s.rfilename,
            size,
            sha256,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn model_info_is_parsed_and_hostile_answers_rejected() {
        let oid = "AB".repeat(32);
        let body = format!(
            r#"{{"id":"o/r","siblings":[{{"rfilename":"README.md","size":12}},
            {{"rfilename":"m.Q4_K_M.gguf","size":100,"lfs":{{"sha256":"{oid}","size":100,"pointerSize":134}}}},
            {{"rfilename":"notes.txt"}}]}}"#
        );
        let files = parse_model_info(body.as_bytes()).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[1].sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(files[1].quantization.as_deref(), Some("Q4_K_M"));
        for bad in [
            r#"{"siblings":[{"rfilename":"m.gguf","size":1,"lfs":{"sha256":"xyz"}}]}"#,
            r#"{"siblings":[{"rfilename":"m.gguf"}]}"#,
            r#"{"siblings":[{"rfilename":"m.gguf","size":-1}]}"#,
            r#"{"error":"nope"}"#,
            r#"[1,2,3]"#,
            "\u{0}\u{1}garbage",
        ] {
            assert!(parse_model_info(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_urls_encode_each_segment() {
        let hub = Hub::new(HubConfig::new(
            "http://h:1/mirror/",
            None,
            PathBuf::from("/m"),
        ))
        .unwrap();
        let url = hub.url(&["o", "r", "resolve", "refs/pr/1", "dir", "a b#.gguf"]);
        assert_eq!(
            url.as_str(),
            "http://h:1/mirror/o/r/resolve/refs%2Fpr%2F1/dir/a%20b%23.gguf"
        );
        assert!(Hub::new(HubConfig::new("ftp://x", None, PathBuf::new())).is_err());
        assert!(
            Hub::new(HubConfig::new(
                "http://x",
                Some("a\nb".into()),
                PathBuf::new()
            ))
            .is_err()
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        let b: Vec<_> = (1..=4).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(b, [100, 200, 350, 350]);
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn settings_and_standard_hf_variables() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let loaded = Settings::load(None).unwrap();
            let env = |k: &str| match k {
                "HF_ENDPOINT" => Some("http://mirror:9".to_string()),
                "HF_TOKEN" => Some("tok".to_string()),
                _ => None,
            };
            let c = HubConfig::from_settings_with_env(&loaded, env);
            assert_eq!(c.endpoint, "http://mirror:9");
            assert_eq!(c.token.as_deref(), Some("tok"));
            jail.set_env("CYBER_INFERENCE_HF_ENDPOINT", "http://ours:1");
            jail.set_env("CYBER_INFERENCE_HF_TOKEN", "mine");
            let loaded = Settings::load(None).unwrap();
            let c = HubConfig::from_settings_with_env(&loaded, env);
            assert_eq!(c.endpoint, "http://ours:1");
            assert_eq!(c.token.as_deref(), Some("mine"));
            Ok(())
        });
    }
}
