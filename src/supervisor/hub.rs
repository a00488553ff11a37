//! The model hub: finds and downloads GGUF models from Hugging Face (or any server that speaks its API,
//! chosen by HF_ENDPOINT) into MODELS_DIR — with resume, SHA-256 verification, a free-disk check, a
//! limit on concurrent downloads and cancellation. The `download-model` command and the supervisor's admin
//! API (through [`Downloads`], which runs them as background tasks with progress events) both go through
//! [`Hub`] and [`register`], so users and tests exercise the same code.
//!
//! Hugging Face's HTTP API as used here (and by its `huggingface_hub` client):
//! - `GET {endpoint}/api/models/{owner}/{name}/revision/{rev}?blobs=true` → `{"siblings": [{"rfilename",
//!   "size", "lfs": {"sha256", "size"}}]}`; errors carry `X-Error-Code` (`RepoNotFound`, `GatedRepo`,
//!   `RevisionNotFound`, `EntryNotFound`).
//! - `GET {endpoint}/{owner}/{name}/resolve/{rev}/{path}` → the file, usually via a 302 to a CDN that
//!   honours `Range: bytes=N-`.
//!
//! Files are written to `MODELS_DIR/.partial/*.part`, hashed while they stream, and renamed into
//! MODELS_DIR only once their SHA-256 equals the LFS oid the API reported (all parts of a split model
//! together): a model file in MODELS_DIR is always complete and verified.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Loaded, Source};

/// Downloads that transfer at once by default (the rest wait, `queued`): a couple saturate a typical
/// link without starving the model workers of disk bandwidth.
pub const DEFAULT_MAX_DOWNLOADS: usize = 2;
/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Sub-folder of MODELS_DIR holding downloads in progress (`*.part`); never scanned for models.
pub const PARTIAL_DIR: &str = ".partial";
/// Age after which a partial download that no download is writing is removed when the supervisor
/// starts (a fresher one is kept: the same download started again resumes from it).
pub const STALE_PARTIAL_AGE: Duration = Duration::from_secs(24 * 3600);

/// Removes the partial downloads (`MODELS_DIR/.partial/*.part`) not written for `max_age` that no
/// running download holds locked; returns the files removed. Unreadable entries are skipped (logged).
pub fn remove_stale_partials(models_dir: &Path, max_age: Duration) -> Vec<PathBuf> {
    let dir = models_dir.join(PARTIAL_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "part") {
            continue;
        }
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < max_age) {
            continue;
        }
        // A download in progress (another process: `download-model`) holds its file locked.
        let free = std::fs::File::open(&path).is_ok_and(|f| f.try_lock().is_ok());
        if !free {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(err) => {
                tracing::warn!(path = %path.display(), "cannot remove a stale partial download: {err}")
            }
        }
    }
    removed
}

/// The largest model-info JSON accepted from the API (bytes); repos with thousands of files stay far below.
const MAX_API_BODY: usize = 32 << 20;
/// How often the progress callback is called at most while bytes flow.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Everything that can go wrong finding or downloading a model. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "invalid repo id `{0}`: expected OWNER/NAME, e.g. bartowski/SmolLM2-135M-Instruct-GGUF"
    )]
    InvalidRepoId(String),
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "repository `{repo}` was not found at {endpoint}: check the spelling of the repo id{hint}"
    )]
    RepoNotFound {
        repo: String,
        endpoint: String,
        /// Extra advice (a private repo needs a token).
        hint: &'static str,
    },
    #[error(
        "revision `{revision}` of `{repo}` was not found: check the branch, tag or commit name"
    )]
    RevisionNotFound { repo: String, revision: String },
    #[error("`{file}` was not found in `{repo}` at revision `{revision}`")]
    FileNotFound {
        repo: String,
        revision: String,
        file: String,
    },
    #[error(
        "`{repo}` is gated or private (HTTP {status}) and no Hugging Face token is set: accept the repo's \
         terms on its page, create a read token, and set HF_TOKEN (or CYBER_INFERENCE_HF_TOKEN)"
    )]
    AuthRequired { repo: String, status: u16 },
    #[error(
        "the Hugging Face token was refused for `{repo}` (HTTP {status}): check that HF_TOKEN (or \
         CYBER_INFERENCE_HF_TOKEN) is valid and that this account has accepted the repo's terms"
    )]
    AuthRejected { repo: String, status: u16 },
    #[error(
        "`{repo}` (revision `{revision}`) has no GGUF files: pick a repo with GGUF quantizations (their \
         names usually end in -GGUF){others}"
    )]
    NoGguf {
        repo: String,
        revision: String,
        /// A few of the files the repo does have.
        others: String,
    },
    #[error("`{file}` is not a GGUF file of `{repo}`; its GGUF files are: {available}")]
    FileNotInRepo {
        repo: String,
        file: String,
        available: String,
    },
    #[error(
        "split model `{file}` in `{repo}` is incomplete: part(s) {missing:?} of {count} are missing \
         from the repo; choose another file"
    )]
    IncompleteSplit {
        repo: String,
        file: String,
        count: u32,
        missing: Vec<u32>,
    },
    #[error(
        "network failure talking to {url} after {attempts} attempt(s): {detail}. Check the connection \
         and HF_ENDPOINT, then run the download again: it resumes where it stopped"
    )]
    Network {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("unexpected HTTP {status} from {url}: {body}")]
    Http {
        status: u16,
        url: String,
        body: String,
    },
    #[error("invalid answer from {url}: {detail}")]
    BadResponse { url: String, detail: String },
    #[error(
        "checksum mismatch for `{file}`: expected SHA-256 {expected}, got {actual}. The corrupt download \
         was deleted and nothing was registered; run the download again"
    )]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error(
        "not enough free disk space in {dir}: the download needs {needed} bytes ({needed_h}) but only \
         {available} bytes ({available_h}) are free; free some space or set MODELS_DIR elsewhere"
    )]
    InsufficientDisk {
        dir: PathBuf,
        needed: u64,
        needed_h: String,
        available: u64,
        available_h: String,
    },
    #[error(
        "`{path}` already exists and is not `{file}` of `{repo}` (different size or SHA-256): remove it \
         first (cyber-inference remove-model) or pick another file"
    )]
    Conflict {
        path: PathBuf,
        repo: String,
        file: String,
    },
    #[error(
        "`{file}` is already being downloaded (its partial file {partial} is locked by another download)"
    )]
    AlreadyDownloading { file: String, partial: PathBuf },
    #[error(
        "`{file}` is already being downloaded (download {id}); wait for it or cancel it (DELETE \
         /admin/api/downloads/{id})"
    )]
    DownloadInProgress { id: u64, file: String },
    #[error("download cancelled")]
    Cancelled,
    #[error("downloaded {path} but the catalogue cannot register it: {reason}")]
    Catalogue { path: PathBuf, reason: String },
    #[error(
        "the disk is full: cannot write {path}: {source}; the partial download was removed (free some \
         space or set MODELS_DIR elsewhere)"
    )]
    DiskFull {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// The HTTP status the admin API answers with for this error.
    ///
    /// A gated or private repo is 403 with or without a token: a 401 from the admin API means the
    /// admin's own session is invalid (and sends the UI to its login page), which this is not.
    pub fn http_status(&self) -> u16 {
        match self {
            HubError::InvalidRepoId(_) | HubError::InvalidArgument { .. } => 400,
            HubError::AuthRequired { .. } | HubError::AuthRejected { .. } => 403,
            HubError::RepoNotFound { .. }
            | HubError::RevisionNotFound { .. }
            | HubError::FileNotFound { .. }
            | HubError::FileNotInRepo { .. } => 404,
            HubError::Conflict { .. }
            | HubError::AlreadyDownloading { .. }
            | HubError::DownloadInProgress { .. } => 409,
            HubError::NoGguf { .. } | HubError::IncompleteSplit { .. } => 422,
            HubError::Cancelled => 499,
            HubError::Network { .. }
            | HubError::Http { .. }
            | HubError::BadResponse { .. }
            | HubError::ChecksumMismatch { .. } => 502,
            HubError::InsufficientDisk { .. } | HubError::DiskFull { .. } => 507,
            HubError::Io { .. } | HubError::Catalogue { .. } => 500,
        }
    }

    /// A stable machine-readable code for this error (the admin API's `error.code`), e.g.
    /// `repo_not_found`, `hf_token_required`, `no_gguf`, `insufficient_disk`.
    pub fn code(&self) -> &'static str {
        match self {
            HubError::InvalidRepoId(_) => "invalid_repo_id",
            HubError::InvalidArgument { .. } => "invalid_argument",
            HubError::RepoNotFound { .. } => "repo_not_found",
            HubError::RevisionNotFound { .. } => "revision_not_found",
            HubError::FileNotFound { .. } => "file_not_found",
            HubError::AuthRequired { .. } => "hf_token_required",
            HubError::AuthRejected { .. } => "hf_token_rejected",
            HubError::NoGguf { .. } => "no_gguf",
            HubError::FileNotInRepo { .. } => "file_not_in_repo",
            HubError::IncompleteSplit { .. } => "incomplete_split",
            HubError::Network { .. } => "network_error",
            HubError::Http { .. } => "upstream_http_error",
            HubError::BadResponse { .. } => "bad_upstream_response",
            HubError::ChecksumMismatch { .. } => "checksum_mismatch",
            HubError::InsufficientDisk { .. } => "insufficient_disk",
            HubError::DiskFull { .. } => "disk_full",
            HubError::Conflict { .. } => "file_conflict",
            HubError::AlreadyDownloading { .. } | HubError::DownloadInProgress { .. } => {
                "download_in_progress"
            }
            HubError::Cancelled => "cancelled",
            HubError::Catalogue { .. } => "catalogue_error",
            HubError::Io { .. } => "io_error",
        }
    }
}

impl HubError {
    /// An I/O error that says the disk (or the user's quota) is full becomes [`HubError::DiskFull`];
    /// anything else is returned as it is.
    fn disk_full_or_self(self) -> HubError {
        match self {
            HubError::Io { path, source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                HubError::DiskFull { path, source }
            }
            other => other,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HubError + 'a {
    move |source| HubError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

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
    pub fn from_settings(loaded: &Loaded) -> Self {
        Self::from_settings_with_env(loaded, |k| std::env::var(k).ok())
    }

    /// [`HubConfig::from_settings`] with the environment given as a function (for tests).
    pub fn from_settings_with_env(loaded: &Loaded, env: impl Fn(&str) -> Option<String>) -> Self {
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

/// One GGUF file of a repo, as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepoFile {
    /// Path inside the repo (`rfilename`), e.g. `Q4_K_M/model-00001-of-00002.gguf`.
    pub filename: String,
    /// Size in bytes.
    pub size: u64,
    /// The LFS oid: SHA-256 of the content, 64 lower-case hex digits (absent for non-LFS files).
    pub sha256: Option<String>,
    /// Quantization read from the name (`Q4_K_M`, `Q8_0`, `F16`, `IQ4_XS`, …), upper case.
    pub quantization: Option<String>,
    /// For split GGUFs (`…-00001-of-00003.gguf`): this part's number and the number of parts.
    pub split: Option<SplitPart>,
}

/// Position of a file in a split GGUF: `index` of `count`, both from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SplitPart {
    pub index: u32,
    pub count: u32,
}

/// One downloadable model of a repo: a single GGUF or all parts of a split GGUF, in part order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GgufModel {
    /// Name of the (first) file inside the repo; what `--filename` takes.
    pub filename: String,
    pub quantization: Option<String>,
    /// Bytes of all its files.
    pub total_size: u64,
    /// The files, part 1 first.
    pub files: Vec<RepoFile>,
    /// Parts of a split that the repo lacks (then the model cannot be downloaded).
    pub missing_parts: Vec<u32>,
    /// A multimodal projector (`mmproj-*.gguf`), not a language model: never chosen automatically.
    pub is_projector: bool,
}

/// What to download. Deserializable as the admin API's request body.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct DownloadRequest {
    /// `OWNER/NAME`.
    pub repo_id: String,
    /// Branch, tag or commit; default `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// A GGUF file of the repo (any part of a split chooses the whole split); default: [`choose_model`].
    #[serde(default)]
    pub filename: Option<String>,
}

/// Stage of a download, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for one of the `max_concurrent` download slots.
    Queued,
    Downloading,
    /// Hashing a finished file.
    Verifying,
    Done,
}

/// A progress report. Byte counts cover all files of the model and include bytes resumed from disk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// The file being worked on (path inside the repo).
    pub file: String,
    /// 1-based index of that file among `file_count`.
    pub file_index: usize,
    pub file_count: usize,
    /// Bytes on disk so far.
    pub downloaded: u64,
    /// Bytes of the whole model.
    pub total: u64,
    /// Recent transfer rate, bytes per second (exponentially smoothed over ~1 s).
    pub bytes_per_sec: f64,
}

/// A finished, verified download.
#[derive(Clone, Debug, Serialize)]
pub struct Downloaded {
    pub repo_id: String,
    pub revision: String,
    pub model: GgufModel,
    /// Local paths of the files in MODELS_DIR, part 1 first (the one to load).
    pub paths: Vec<PathBuf>,
    /// The paths of `paths` this call wrote (the others were already in MODELS_DIR, verified).
    pub fetched: Vec<PathBuf>,
    /// Bytes fetched over the network by this call (less than the total after a resume or when the
    /// files were already present).
    pub bytes_transferred: u64,
}

/// The downloader. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Hub {
    client: reqwest::Client,
    endpoint: Url,
    token: Option<HeaderValue>,
    models_dir: PathBuf,
    limit: Arc<Semaphore>,
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
enum Attempt {
    Retry(String),
    Fatal(HubError),
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
            .redirect(reqwest::redirect::Policy::limited(10))
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
    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// Downloads that transfer at once (the others wait for a slot).
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// Whether every file of `model` is already in MODELS_DIR with its size (not hashed).
    pub fn is_present(&self, model: &GgufModel) -> bool {
        model.files.iter().all(|f| {
            local_name(&f.filename).is_ok_and(|n| {
                std::fs::metadata(self.models_dir.join(n))
                    .is_ok_and(|m| m.is_file() && m.len() == f.size)
            })
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        url.path_segments_mut()
            .expect("checked in Hub::new: the endpoint can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = &self.token {
            h.insert(header::AUTHORIZATION, t.clone());
        }
        h
    }

    /// Maps an error status of the API or a file request to an error that says what to do.
    fn status_error(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        repo: &str,
        revision: &str,
        file: Option<&str>,
    ) -> Attempt {
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
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
        match (status.as_u16(), code) {
            (_, "RevisionNotFound") => Attempt::Fatal(HubError::RevisionNotFound {
                repo: repo.into(),
                revision: revision.into(),
            }),
            (_, "EntryNotFound") => Attempt::Fatal(HubError::FileNotFound {
                repo: repo.into(),
                revision: revision.into(),
                file: file.unwrap_or("").into(),
            }),
            (_, "RepoNotFound") => Attempt::Fatal(not_found()),
            (s @ (401 | 403), _) => Attempt::Fatal(auth(s)),
            (404, _) => Attempt::Fatal(match file {
                Some(f) => HubError::FileNotFound {
                    repo: repo.into(),
                    revision: revision.into(),
                    file: f.into(),
                },
                None => not_found(),
            }),
            (s, _) if s == 408 || s == 429 || status.is_server_error() => {
                Attempt::Retry(format!("HTTP {status}"))
            }
            (s, _) => Attempt::Fatal(HubError::Http {
                status: s,
                url: String::new(),
                body: String::new(),
            }),
        }
    }

    /// Sleeps the backoff for `attempt`, or returns `Cancelled`.
    async fn backoff(&self, attempt: u32, cancel: &CancellationToken) -> Result<(), HubError> {
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
    pub async fn list_files(
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
                    .map_err(|e| Attempt::Retry(error_chain(&e)))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(
                        match self.status_error(status, resp.headers(), repo_id, revision, None) {
                            Attempt::Fatal(HubError::Http { status, .. }) => {
                                Attempt::Fatal(HubError::Http {
                                    status,
                                    url: url.to_string(),
                                    body: read_snippet(resp).await,
                                })
                            }
                            other => other,
                        },
                    );
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
                    if attempt >= self.retry.max_attempts {
                        return Err(HubError::Network {
                            url: url.to_string(),
                            attempts: attempt,
                            detail,
                        });
                    }
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

    /// Downloads one model (every part of a split) into MODELS_DIR and returns its verified paths.
    ///
    /// Steps: list the repo; pick the file ([`select_model`]); then [`Hub::download_model`].
    ///
    /// Errors: as [`Hub::list_files`], [`select_model`] and [`Hub::download_model`].
    pub async fn download<F>(
        &self,
        req: &DownloadRequest,
        progress: F,
        cancel: CancellationToken,
    ) -> Result<Downloaded, HubError>
    where
        F: Fn(&Progress) + Send + Sync,
    {
        let revision = req.revision.as_deref().unwrap_or("main").to_string();
        let files = tokio::select! {
            _ = cancel.cancelled() => return Err(HubError::Cancelled),
            r = self.list_files(&req.repo_id, Some(&revision)) => r?,
        };
        let model = select_model(&req.repo_id, &revision, &files, req.filename.as_deref())?;
        self.download_model(&req.repo_id, &revision, model, progress, cancel)
            .await
    }

    /// Bytes still to fetch for `model` of `repo_id` at `revision`: its files' sizes less what is
    /// already in MODELS_DIR (a file of the right size) or in a partial download. For a free-disk check
    /// before a download is queued.
    pub async fn missing_bytes(&self, repo_id: &str, revision: &str, model: &GgufModel) -> u64 {
        let partial_dir = self.models_dir.join(PARTIAL_DIR);
        let mut needed = 0;
        for f in &model.files {
            if let Ok(name) = local_name(&f.filename)
                && let Ok(m) = tokio::fs::metadata(self.models_dir.join(name)).await
                && m.is_file()
                && m.len() == f.size
            {
                continue;
            }
            let have = tokio::fs::metadata(partial_dir.join(partial_name(repo_id, revision, f)))
                .await
                .map(|m| m.len().min(f.size))
                .unwrap_or(0);
            needed += f.size - have;
        }
        needed
    }

    /// Downloads `model` (from [`select_model`] or [`Hub::list_models`]) of `repo_id` at `revision`.
    ///
    /// Steps: wait for a download slot; check free disk space for the bytes still missing; for each
    /// file stream `resolve/{rev}/{file}` into `MODELS_DIR/.partial/…part`, resuming with `Range` after a
    /// dropped connection (retries with backoff) or from a partial file left by an earlier run; check
    /// SHA-256 against the LFS oid; once every file is verified, rename them all into MODELS_DIR (so a
    /// split model never appears there half-done). A file already in MODELS_DIR with the right size and
    /// hash is kept as is.
    ///
    /// `progress` is called at most every 100 ms while bytes flow and at each phase change.
    /// `cancel` stops the download at any point and deletes the partial files of this call
    /// ([`HubError::Cancelled`]); other failures keep them, so the next attempt resumes. A checksum
    /// mismatch deletes the bad file.
    ///
    /// Errors: [`HubError::InvalidArgument`] for a file name that cannot be stored,
    /// [`HubError::Conflict`], [`HubError::InsufficientDisk`], [`HubError::AlreadyDownloading`],
    /// [`HubError::Network`] after retries, HTTP errors as in [`Hub::list_files`],
    /// [`HubError::ChecksumMismatch`], [`HubError::Cancelled`], [`HubError::Io`].
    pub async fn download_model<F>(
        &self,
        repo_id: &str,
        revision: &str,
        model: GgufModel,
        progress: F,
        cancel: CancellationToken,
    ) -> Result<Downloaded, HubError>
    where
        F: Fn(&Progress) + Send + Sync,
    {
        parse_repo_id(repo_id)?;
        check_revision(revision)?;
        let total = model.total_size;
        let file_count = model.files.len();
        let mut report = Reporter::new(&progress, total, file_count);
        report.emit(Phase::Queued, &model.files[0].filename, 1, true);
        let _permit = tokio::select! {
            _ = cancel.cancelled() => return Err(HubError::Cancelled),
            p = self.limit.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };

        let partial_dir = self.models_dir.join(PARTIAL_DIR);
        tokio::fs::create_dir_all(&partial_dir)
            .await
            .map_err(io_err("cannot create", &partial_dir))?;

        // Plan: where each file goes, what is already there, how many bytes are still missing.
        let mut plan = Vec::with_capacity(file_count);
        let mut needed = 0u64;
        for f in &model.files {
            let dest = self.models_dir.join(local_name(&f.filename)?);
            let partial = partial_dir.join(partial_name(repo_id, revision, f));
            let present = match tokio::fs::metadata(&dest).await {
                Ok(m) if m.is_file() => {
                    if m.len() == f.size && hash_matches(&dest, f).await? {
                        true
                    } else {
                        return Err(HubError::Conflict {
                            path: dest,
                            repo: repo_id.into(),
                            file: f.filename.clone(),
                        });
                    }
                }
                Ok(_) => {
                    return Err(HubError::Conflict {
                        path: dest,
                        repo: repo_id.into(),
                        file: f.filename.clone(),
                    });
                }
                Err(_) => false,
            };
            if !present {
                let have = tokio::fs::metadata(&partial)
                    .await
                    .map(|m| m.len().min(f.size))
                    .unwrap_or(0);
                needed += f.size - have;
            }
            plan.push((f, dest, partial, present));
        }
        check_free_space(&self.models_dir, needed)?;

        let mut done_before = 0u64;
        let mut partials_in_flight: Vec<PathBuf> = Vec::new();
        for (i, (f, _, partial, present)) in plan.iter().enumerate() {
            if !present {
                partials_in_flight.push(partial.clone());
                let r = self
                    .fetch_file(
                        repo_id,
                        revision,
                        f,
                        partial,
                        (i + 1, done_before),
                        &mut report,
                        &cancel,
                    )
                    .await;
                if let Err(e) = r {
                    if matches!(e, HubError::Cancelled) {
                        for p in &partials_in_flight {
                            let _ = tokio::fs::remove_file(p).await;
                        }
                    }
                    return Err(e);
                }
            }
            done_before += f.size;
        }
        if cancel.is_cancelled() {
            for p in &partials_in_flight {
                let _ = tokio::fs::remove_file(p).await;
            }
            return Err(HubError::Cancelled);
        }
        // Every file is verified: move them all into MODELS_DIR.
        let mut paths = Vec::with_capacity(file_count);
        let mut fetched = Vec::new();
        for (_, dest, partial, present) in plan {
            if !present {
                tokio::fs::rename(&partial, &dest)
                    .await
                    .map_err(io_err("cannot move the finished download to", &dest))?;
                fetched.push(dest.clone());
            }
            paths.push(dest);
        }
        report.downloaded = total;
        report.emit(
            Phase::Done,
            &model.files[file_count - 1].filename,
            file_count,
            true,
        );
        // Catalogue hook: registration happens in the caller, from the returned `Downloaded`, so a
        // failed or cancelled download can never leave a catalogue row. See `register`.
        Ok(Downloaded {
            repo_id: repo_id.into(),
            revision: revision.into(),
            model,
            paths,
            fetched,
            bytes_transferred: report.transferred,
        })
    }

    /// Downloads one file into `partial` (resuming it) and verifies it; the caller moves it.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_file<F: Fn(&Progress) + Send + Sync>(
        &self,
        repo: &str,
        revision: &str,
        f: &RepoFile,
        partial: &Path,
        (index, done_before): (usize, u64),
        report: &mut Reporter<'_, F>,
        cancel: &CancellationToken,
    ) -> Result<(), HubError> {
        let std_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)
            .map_err(io_err("cannot open", partial))?;
        match std_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(HubError::AlreadyDownloading {
                    file: f.filename.clone(),
                    partial: partial.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", partial)(e)),
        }
        let mut have = std_file
            .metadata()
            .map_err(io_err("cannot read", partial))?
            .len();
        if have > f.size {
            std_file
                .set_len(0)
                .map_err(io_err("cannot truncate", partial))?;
            have = 0;
        }
        // Resume: the hash covers the bytes already on disk.
        let mut hasher = if have > 0 {
            tracing::info!(file = %f.filename, have, size = f.size, "resuming a partial download");
            let p = partial.to_path_buf();
            tokio::task::spawn_blocking(move || hash_prefix(&p, have))
                .await
                .expect("hashing does not panic")
                .map_err(io_err("cannot read", partial))?
        } else {
            Sha256::new()
        };
        let mut file = tokio::fs::File::from_std(std_file);
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(have))
            .await
            .map_err(io_err("cannot seek", partial))?;

        let (owner, name) = parse_repo_id(repo)?;
        let mut segments = vec![owner, name, "resolve", revision];
        segments.extend(f.filename.split('/'));
        let url = self.url(&segments);
        report.downloaded = done_before + have;
        report.emit(Phase::Downloading, &f.filename, index, true);

        let mut attempt = 0u32;
        while have < f.size {
            attempt += 1;
            let before = have;
            let outcome = self
                .transfer(
                    &url,
                    repo,
                    revision,
                    f,
                    &mut file,
                    &mut hasher,
                    &mut have,
                    (index, done_before),
                    report,
                    cancel,
                    partial,
                )
                .await;
            match outcome {
                Ok(()) => {}
                Err(Attempt::Fatal(e)) => {
                    // A bad body cannot be resumed, and a partial file on a full disk only keeps it
                    // full: both go.
                    let e = e.disk_full_or_self();
                    if matches!(e, HubError::BadResponse { .. } | HubError::DiskFull { .. }) {
                        drop(file);
                        let _ = tokio::fs::remove_file(partial).await;
                    }
                    return Err(e);
                }
                Err(Attempt::Retry(detail)) => {
                    if have > before {
                        attempt = 1;
                    }
                    if attempt >= self.retry.max_attempts {
                        return Err(HubError::Network {
                            url: url.to_string(),
                            attempts: attempt,
                            detail,
                        });
                    }
                    tracing::warn!(file = %f.filename, have, size = f.size, attempt, %detail,
                        "download interrupted; retrying");
                    self.backoff(attempt, cancel).await?;
                }
            }
        }
        let synced = match file.flush().await {
            Ok(()) => file
                .sync_all()
                .await
                .map_err(io_err("cannot sync", partial)),
            Err(e) => Err(io_err("cannot write", partial)(e)),
        };
        drop(file);
        if let Err(e) = synced {
            let e = e.disk_full_or_self();
            if matches!(e, HubError::DiskFull { .. }) {
                let _ = tokio::fs::remove_file(partial).await;
            }
            return Err(e);
        }

        report.downloaded = done_before + f.size;
        report.emit(Phase::Verifying, &f.filename, index, true);
        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = &f.sha256
            && *expected != actual
        {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(HubError::ChecksumMismatch {
                file: f.filename.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        if f.sha256.is_none() {
            tracing::warn!(file = %f.filename, "the API gave no SHA-256 for this file: only its size was checked");
        }
        Ok(())
    }

    /// One HTTP request for the bytes from `*have` on, appended to `file` as they arrive.
    #[allow(clippy::too_many_arguments)]
    async fn transfer<F: Fn(&Progress) + Send + Sync>(
        &self,
        url: &Url,
        repo: &str,
        revision: &str,
        f: &RepoFile,
        file: &mut tokio::fs::File,
        hasher: &mut Sha256,
        have: &mut u64,
        (index, done_before): (usize, u64),
        report: &mut Reporter<'_, F>,
        cancel: &CancellationToken,
        partial: &Path,
    ) -> Result<(), Attempt> {
        let mut request = self.client.get(url.clone()).headers(self.headers());
        if *have > 0 {
            request = request.header(header::RANGE, format!("bytes={}-", *have));
        }
        let mut resp = tokio::select! {
            _ = cancel.cancelled() => return Err(Attempt::Fatal(HubError::Cancelled)),
            r = request.send() => r.map_err(|e| Attempt::Retry(error_chain(&e)))?,
        };
        let status = resp.status();
        let restart = |file_have: &mut u64, hasher: &mut Sha256| {
            *file_have = 0;
            *hasher = Sha256::new();
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let start = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(*have) {
                    return Err(Attempt::Fatal(HubError::BadResponse {
                        url: url.to_string(),
                        detail: format!(
                            "asked for bytes from {} but the answer's Content-Range is {:?}",
                            *have,
                            resp.headers().get(header::CONTENT_RANGE)
                        ),
                    }));
                }
            }
            StatusCode::OK => {
                if *have > 0 {
                    tracing::warn!(file = %f.filename, "the server ignored the Range request; starting over");
                    restart(have, hasher);
                    file.set_len(0)
                        .await
                        .map_err(|e| Attempt::Fatal(io_err("cannot truncate", partial)(e)))?;
                    use tokio::io::AsyncSeekExt;
                    file.seek(std::io::SeekFrom::Start(0))
                        .await
                        .map_err(|e| Attempt::Fatal(io_err("cannot seek", partial)(e)))?;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The partial file does not fit the remote one: start over.
                restart(have, hasher);
                file.set_len(0)
                    .await
                    .map_err(|e| Attempt::Fatal(io_err("cannot truncate", partial)(e)))?;
                use tokio::io::AsyncSeekExt;
                file.seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(|e| Attempt::Fatal(io_err("cannot seek", partial)(e)))?;
                return Err(Attempt::Retry("HTTP 416 for the resumed range".into()));
            }
            _ => {
                return Err(
                    match self.status_error(
                        status,
                        resp.headers(),
                        repo,
                        revision,
                        Some(&f.filename),
                    ) {
                        Attempt::Fatal(HubError::Http { status, .. }) => {
                            Attempt::Fatal(HubError::Http {
                                status,
                                url: url.to_string(),
                                body: read_snippet(resp).await,
                            })
                        }
                        other => other,
                    },
                );
            }
        }
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => return Err(Attempt::Fatal(HubError::Cancelled)),
                c = resp.chunk() => c,
            };
            match chunk {
                Ok(Some(bytes)) => {
                    if *have + bytes.len() as u64 > f.size {
                        return Err(Attempt::Fatal(HubError::BadResponse {
                            url: url.to_string(),
                            detail: format!(
                                "the server sent more than the {} bytes the API reported for `{}`",
                                f.size, f.filename
                            ),
                        }));
                    }
                    file.write_all(&bytes)
                        .await
                        .map_err(|e| Attempt::Fatal(io_err("cannot write", partial)(e)))?;
                    hasher.update(&bytes);
                    *have += bytes.len() as u64;
                    report.transferred += bytes.len() as u64;
                    report.downloaded = done_before + *have;
                    report.emit(Phase::Downloading, &f.filename, index, false);
                }
                Ok(None) if *have < f.size => {
                    return Err(Attempt::Retry(format!(
                        "connection closed after {} of {} bytes",
                        *have, f.size
                    )));
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    // Keep what arrived: the next attempt resumes from it.
                    file.flush()
                        .await
                        .map_err(|e| Attempt::Fatal(io_err("cannot write", partial)(e)))?;
                    return Err(Attempt::Retry(format!(
                        "transfer broke after {} of {} bytes: {}",
                        *have,
                        f.size,
                        error_chain(&e)
                    )));
                }
            }
        }
    }
}

/// Calls the progress callback, throttled, and keeps the smoothed rate.
struct Reporter<'a, F> {
    callback: &'a F,
    total: u64,
    file_count: usize,
    downloaded: u64,
    transferred: u64,
    last_emit: Option<Instant>,
    rate_mark: (Instant, u64),
    rate: f64,
}

impl<'a, F: Fn(&Progress)> Reporter<'a, F> {
    fn new(callback: &'a F, total: u64, file_count: usize) -> Self {
        Reporter {
            callback,
            total,
            file_count,
            downloaded: 0,
            transferred: 0,
            last_emit: None,
            rate_mark: (Instant::now(), 0),
            rate: 0.0,
        }
    }

    fn emit(&mut self, phase: Phase, file: &str, file_index: usize, force: bool) {
        let now = Instant::now();
        if !force && self.last_emit.is_some_and(|t| now - t < PROGRESS_INTERVAL) {
            return;
        }
        let dt = (now - self.rate_mark.0).as_secs_f64();
        if dt >= 0.05 {
            let inst = (self.transferred - self.rate_mark.1) as f64 / dt;
            // Time-constant of about one second.
            let alpha = (dt / 1.0).min(1.0);
            self.rate = if self.rate == 0.0 {
                inst
            } else {
                self.rate + alpha * (inst - self.rate)
            };
            self.rate_mark = (now, self.transferred);
        }
        self.last_emit = Some(now);
        (self.callback)(&Progress {
            phase,
            file: file.to_string(),
            file_index,
            file_count: self.file_count,
            downloaded: self.downloaded,
            total: self.total,
            bytes_per_sec: self.rate,
        });
    }
}

/// A reqwest error with its causes (the useful part — "connection refused" — is usually a cause).
fn error_chain(e: &dyn std::error::Error) -> String {
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

/// `bytes START-END/TOTAL` → START.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

/// Splits and checks `OWNER/NAME` (letters, digits, `-`, `_`, `.`; no `..`; at most 96 characters each).
pub fn parse_repo_id(repo_id: &str) -> Result<(&str, &str), HubError> {
    let bad = || HubError::InvalidRepoId(repo_id.to_string());
    let (owner, name) = repo_id.split_once('/').ok_or_else(bad)?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.contains("..")
            && !s.starts_with(['.', '-'])
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if ok(owner) && ok(name) {
        Ok((owner, name))
    } else {
        Err(bad())
    }
}

fn check_revision(revision: &str) -> Result<(), HubError> {
    if revision.is_empty()
        || revision.len() > 200
        || revision.contains("..")
        || revision.chars().any(|c| c.is_control() || c == '\\')
    {
        return Err(HubError::InvalidArgument {
            what: "revision",
            value: revision.chars().take(200).collect(),
            reason: "expected a branch, tag or commit name",
        });
    }
    Ok(())
}

/// Whether a repo path names a GGUF file.
pub fn is_gguf(filename: &str) -> bool {
    filename.to_ascii_lowercase().ends_with(".gguf")
}

/// The file name a repo file gets in MODELS_DIR: its last path component, which must be a plain `.gguf`
/// name (the API's answer is untrusted: no `..`, separators or control characters).
pub fn local_name(filename: &str) -> Result<&str, HubError> {
    let base = filename.rsplit('/').next().unwrap_or(filename);
    let bad = |reason| HubError::InvalidArgument {
        what: "file name",
        value: filename.chars().take(200).collect(),
        reason,
    };
    if base.is_empty() || base.starts_with('.') || base.len() > 255 {
        return Err(bad("not a usable file name"));
    }
    if base.chars().any(|c| c.is_control() || c == '\\') {
        return Err(bad("contains control characters or backslashes"));
    }
    if !is_gguf(base) {
        return Err(bad("not a .gguf file"));
    }
    Ok(base)
}

/// Name of a file's partial download: stable across runs (so a restart resumes it) and tied to the
/// content's oid when known (so a changed remote file never resumes onto old bytes).
fn partial_name(repo: &str, revision: &str, f: &RepoFile) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let key = match &f.sha256 {
        Some(h) => h[..16].to_string(),
        None => clean(revision),
    };
    let base = f.filename.rsplit('/').next().unwrap_or(&f.filename);
    format!(
        "{}--{}--{}.part",
        clean(&repo.replace('/', "--")),
        key,
        clean(base)
    )
}

/// SHA-256 state after the first `len` bytes of `path`.
fn hash_prefix(path: &Path, len: u64) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut r = std::fs::File::open(path)?.take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher)
}

/// Whether an existing file has `f`'s SHA-256 (true when the API gave none: the size already matched).
async fn hash_matches(path: &Path, f: &RepoFile) -> Result<bool, HubError> {
    let Some(expected) = f.sha256.clone() else {
        return Ok(true);
    };
    let p = path.to_path_buf();
    let size = f.size;
    let h = tokio::task::spawn_blocking(move || hash_prefix(&p, size))
        .await
        .expect("hashing does not panic")
        .map_err(io_err("cannot read", path))?;
    Ok(hex::encode(h.finalize()) == expected)
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

/// `…-00001-of-00003.gguf` → part 1 of 3 (and the name without the suffix); the folder is kept in the
/// prefix.
fn split_parts(filename: &str) -> Option<(&str, SplitPart)> {
    let base_at = filename.rfind('/').map_or(0, |i| i + 1);
    let (prefix, index, count) = crate::engine::gguf::split_name(&filename[base_at..])?;
    Some((
        &filename[..base_at + prefix.len()],
        SplitPart { index, count },
    ))
}

/// The part number of a split GGUF file, if it is one.
pub fn split_of(filename: &str) -> Option<SplitPart> {
    split_parts(filename).map(|(_, p)| p)
}

/// The quantization named in a file name: the last `-`/`.`-separated token that looks like one
/// (`Q4_K_M`, `q8_0`, `IQ4_XS`, `F16`, `BF16`, `F32`, `Q4_0_4_4`, `UD-Q4_K_XL`…), upper-cased.
pub fn quantization_of(filename: &str) -> Option<String> {
    let base = filename.rsplit('/').next().unwrap_or(filename);
    let stem = match split_parts(base) {
        Some((prefix, _)) => prefix,
        None => base.get(..base.len().saturating_sub(5)).unwrap_or(base),
    };
    stem.split(['-', '.'])
        .rev()
        .map(str::to_ascii_uppercase)
        .find(|t| {
            let q = t.strip_prefix('I').unwrap_or(t);
            let is_q = q.len() >= 2
                && q.starts_with('Q')
                && q.as_bytes()[1].is_ascii_digit()
                && q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            is_q || matches!(t.as_str(), "F16" | "BF16" | "F32" | "FP16" | "FP32")
        })
}

/// Groups GGUF files into models: each plain file alone, each split's parts together (part order).
/// Result: smallest first (by total size, then name).
pub fn group_models(files: &[RepoFile]) -> Vec<GgufModel> {
    let mut splits: BTreeMap<(String, u32), Vec<RepoFile>> = BTreeMap::new();
    let mut models = Vec::new();
    for f in files.iter().filter(|f| is_gguf(&f.filename)) {
        match split_parts(&f.filename) {
            Some((prefix, part)) => splits
                .entry((prefix.to_string(), part.count))
                .or_default()
                .push(f.clone()),
            None => models.push(model_of(vec![f.clone()], Vec::new())),
        }
    }
    for ((_, count), mut parts) in splits {
        parts.sort_by_key(|p| p.split.map(|s| s.index));
        parts.dedup_by_key(|p| p.split.map(|s| s.index));
        let missing = (1..=count)
            .filter(|i| !parts.iter().any(|p| p.split.is_some_and(|s| s.index == *i)))
            .collect();
        models.push(model_of(parts, missing));
    }
    models.sort_by(|a, b| {
        a.total_size
            .cmp(&b.total_size)
            .then_with(|| a.filename.cmp(&b.filename))
    });
    models
}

fn model_of(files: Vec<RepoFile>, missing_parts: Vec<u32>) -> GgufModel {
    let first = &files[0];
    let base = first.filename.rsplit('/').next().unwrap_or(&first.filename);
    GgufModel {
        filename: first.filename.clone(),
        quantization: first.quantization.clone(),
        total_size: files.iter().map(|f| f.size).sum(),
        is_projector: base.to_ascii_lowercase().starts_with("mmproj"),
        missing_parts,
        files,
    }
}

/// The model to download when no file is named: Q4_K_M if present, else Q8_0, else the smallest
/// (complete, non-projector models only; `models` as from [`group_models`], smallest first).
pub fn choose_model(models: &[GgufModel]) -> Option<&GgufModel> {
    let candidates = || {
        models
            .iter()
            .filter(|m| m.missing_parts.is_empty() && !m.is_projector)
    };
    let with = |q: &str| candidates().find(|m| m.quantization.as_deref() == Some(q));
    with("Q4_K_M")
        .or_else(|| with("Q8_0"))
        .or_else(|| candidates().next())
}

/// The model a download request means: the named file (any part of a split picks the whole split) or
/// [`choose_model`]. Errors: [`HubError::NoGguf`], [`HubError::FileNotInRepo`],
/// [`HubError::IncompleteSplit`].
pub fn select_model(
    repo: &str,
    revision: &str,
    files: &[RepoFile],
    filename: Option<&str>,
) -> Result<GgufModel, HubError> {
    let models = group_models(files);
    if models.is_empty() {
        return Err(no_gguf(repo, revision, files));
    }
    let model = match filename {
        Some(name) => models
            .iter()
            .find(|m| m.files.iter().any(|f| f.filename == name))
            .ok_or_else(|| HubError::FileNotInRepo {
                repo: repo.into(),
                file: name.into(),
                available: models
                    .iter()
                    .map(|m| m.filename.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
        None => choose_model(&models).ok_or_else(|| no_gguf(repo, revision, files))?,
    };
    if !model.missing_parts.is_empty() {
        return Err(HubError::IncompleteSplit {
            repo: repo.into(),
            file: model.filename.clone(),
            count: model.files[0].split.map_or(0, |s| s.count),
            missing: model.missing_parts.clone(),
        });
    }
    Ok(model.clone())
}

fn no_gguf(repo: &str, revision: &str, files: &[RepoFile]) -> HubError {
    let others = if files.is_empty() {
        " (the repo lists no files)".to_string()
    } else {
        let names: Vec<_> = files.iter().take(5).map(|f| f.filename.as_str()).collect();
        format!(
            " (it has {} file(s): {}{})",
            files.len(),
            names.join(", "),
            if files.len() > 5 { ", …" } else { "" }
        )
    };
    HubError::NoGguf {
        repo: repo.into(),
        revision: revision.into(),
        others,
    }
}

/// Bytes free for an unprivileged user on the file system holding `dir` (the mount point that is the
/// longest prefix of its canonical path), or `None` when no mount matches.
pub fn free_space(dir: &Path) -> Option<u64> {
    let dir = dir.canonicalize().ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// Fails with [`HubError::InsufficientDisk`] (with the numbers) when `needed` bytes do not fit in
/// `dir`'s file system. When free space cannot be determined, logs a warning and lets the download go.
pub fn check_free_space(dir: &Path, needed: u64) -> Result<(), HubError> {
    match free_space(dir) {
        Some(available) if available < needed => Err(HubError::InsufficientDisk {
            dir: dir.to_path_buf(),
            needed,
            needed_h: human_bytes(needed),
            available,
            available_h: human_bytes(available),
        }),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(dir = %dir.display(), "cannot tell the free disk space; downloading anyway");
            Ok(())
        }
    }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Finished downloads kept in [`Downloads::list`] (the oldest finished ones are forgotten first).
const KEEP_FINISHED: usize = 50;
/// Least time between two `download` progress events of one download (state changes always go out).
const EVENT_INTERVAL: Duration = Duration::from_millis(250);

/// State of a download of the admin API: `queued → downloading → verifying → done`, or `failed` /
/// `cancelled` from any of the first three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DownloadState {
    /// Waiting for one of the `max_concurrent` download slots.
    Queued,
    Downloading,
    /// Hashing a finished file, moving it into MODELS_DIR, registering it.
    Verifying,
    /// Verified, in MODELS_DIR and in the catalogue (`model` names the row).
    Done,
    /// Stopped by an error (`error` says why; a later download resumes the partial file).
    Failed,
    /// Cancelled by `DELETE /admin/api/downloads/{id}`: its partial files are deleted, nothing registered.
    Cancelled,
}

impl DownloadState {
    /// Whether the download has ended (done, failed or cancelled).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            DownloadState::Done | DownloadState::Failed | DownloadState::Cancelled
        )
    }
}

/// One download as the admin API lists it and as the `download` event carries it.
///
/// JSON: `{"id": 3, "repo_id": "owner/name", "revision": "main", "filename": "m.Q4_K_M.gguf",
/// "quantization": "Q4_K_M", "files": ["m.Q4_K_M.gguf"], "state": "downloading", "downloaded": 1048576,
/// "total": 105000000, "bytes_per_sec": 52000000.0, "file": "m.Q4_K_M.gguf", "file_index": 1,
/// "file_count": 1, "error": null, "error_code": null, "model": null, "created_at": 1764550000000,
/// "updated_at": 1764550001000, "finished_at": null}`.
#[derive(Clone, Debug, Serialize)]
pub struct DownloadInfo {
    /// Id for `DELETE /admin/api/downloads/{id}` (counts from 1 per supervisor run).
    pub id: u64,
    pub repo_id: String,
    pub revision: String,
    /// The model's (first) file in the repo.
    pub filename: String,
    pub quantization: Option<String>,
    /// Every file of the model in the repo (several for a split GGUF), part 1 first.
    pub files: Vec<String>,
    pub state: DownloadState,
    /// Bytes of the model on disk so far (including bytes resumed from an earlier partial file).
    pub downloaded: u64,
    /// Bytes of the whole model.
    pub total: u64,
    /// Current transfer rate in bytes per second (0 when not transferring).
    pub bytes_per_sec: f64,
    /// The file being worked on, `file_index` of `file_count` (from 1).
    pub file: String,
    pub file_index: usize,
    pub file_count: usize,
    /// Why it failed (state `failed`): the same message the CLI prints.
    pub error: Option<String>,
    /// A stable code for the failure ([`HubError::code`]).
    pub error_code: Option<&'static str>,
    /// The catalogue name once registered (state `done`): use it as `model` in `/v1/*` requests.
    pub model: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

struct Job {
    info: DownloadInfo,
    cancel: CancellationToken,
    /// Becomes `true` when the download's task has ended (after cleanup and registration).
    ended: tokio::sync::watch::Receiver<bool>,
    last_event: Option<Instant>,
}

/// Called with the catalogue row of every model a download registered (the supervisor refreshes its
/// process manager with it).
pub type OnRegistered = Box<dyn Fn(&super::db::ModelRow) + Send + Sync>;

/// The supervisor's downloads: the admin API starts, lists and cancels them; each runs as a tokio task
/// on the shared [`Hub`] (so at most `max_concurrent` transfer at once, the rest wait as `queued`),
/// reports progress as [`super::events::Event::Download`] events and, once verified, registers the
/// model in the catalogue with [`register`] — the same steps as `download-model`.
pub struct Downloads {
    hub: Hub,
    db: super::db::Db,
    events: super::events::Events,
    on_registered: OnRegistered,
    jobs: std::sync::Mutex<BTreeMap<u64, Job>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Registration rescans MODELS_DIR: one at a time.
    register_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads").field("hub", &self.hub).finish()
    }
}

impl Downloads {
    /// A download manager over `hub`, registering into `db` and reporting on `events`.
    pub fn new(
        hub: Hub,
        db: super::db::Db,
        events: super::events::Events,
        on_registered: OnRegistered,
    ) -> Arc<Self> {
        Arc::new(Downloads {
            hub,
            db,
            events,
            on_registered,
            jobs: Default::default(),
            next_id: std::sync::atomic::AtomicU64::new(1),
            register_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The hub the downloads use (for listing a repo's files).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every download of this run, oldest first (finished ones too, the last [`KEEP_FINISHED`]).
    pub fn list(&self) -> Vec<DownloadInfo> {
        self.jobs().values().map(|j| j.info.clone()).collect()
    }

    /// One download.
    pub fn get(&self, id: u64) -> Option<DownloadInfo> {
        self.jobs().get(&id).map(|j| j.info.clone())
    }

    /// Checks the request against the hub and starts the download in the background. Returns at once
    /// (state `queued`) once the repo was listed, the file chosen and the disk space checked, so a
    /// wrong repo, a gated repo, a repo without GGUF or a full disk are answered right away.
    ///
    /// Errors: as [`Hub::list_files`] and [`select_model`]; [`HubError::DownloadInProgress`] when the
    /// same model (or a file of the same name) is already being downloaded; [`HubError::InsufficientDisk`]
    /// when the bytes still missing, plus those of the downloads already running, do not fit.
    pub async fn start(self: &Arc<Self>, req: DownloadRequest) -> Result<DownloadInfo, HubError> {
        let revision = req.revision.clone().unwrap_or_else(|| "main".into());
        parse_repo_id(&req.repo_id)?;
        check_revision(&revision)?;
        if let Some(f) = &req.filename
            && (f.is_empty() || f.len() > 1000 || f.chars().any(char::is_control))
        {
            return Err(HubError::InvalidArgument {
                what: "filename",
                value: f.chars().take(200).collect(),
                reason: "expected a file path of the repo",
            });
        }
        let files = self.hub.list_files(&req.repo_id, Some(&revision)).await?;
        let model = select_model(&req.repo_id, &revision, &files, req.filename.as_deref())?;
        let locals = model
            .files
            .iter()
            .map(|f| local_name(&f.filename).map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self
            .hub
            .missing_bytes(&req.repo_id, &revision, &model)
            .await;

        let mut jobs = self.jobs();
        let mut others_need = 0u64;
        for j in jobs.values().filter(|j| !j.info.state.is_finished()) {
            let same_file = j.info.files.iter().any(|f| {
                local_name(f).is_ok_and(|n| locals.iter().any(|l| l.eq_ignore_ascii_case(n)))
            });
            if same_file {
                return Err(HubError::DownloadInProgress {
                    id: j.info.id,
                    file: j.info.filename.clone(),
                });
            }
            others_need += j.info.total.saturating_sub(j.info.downloaded);
        }
        if missing > 0 {
            check_free_space(self.hub.models_dir(), missing + others_need)?;
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = super::db::now_ms();
        let info = DownloadInfo {
            id,
            repo_id: req.repo_id.clone(),
            revision: revision.clone(),
            filename: model.filename.clone(),
            quantization: model.quantization.clone(),
            files: model.files.iter().map(|f| f.filename.clone()).collect(),
            state: DownloadState::Queued,
            downloaded: 0,
            total: model.total_size,
            bytes_per_sec: 0.0,
            file: model.filename.clone(),
            file_index: 1,
            file_count: model.files.len(),
            error: None,
            error_code: None,
            model: None,
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        let cancel = CancellationToken::new();
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        jobs.insert(
            id,
            Job {
                info: info.clone(),
                cancel: cancel.clone(),
                ended,
                last_event: Some(Instant::now()),
            },
        );
        // Forget the oldest finished downloads beyond the limit.
        let finished: Vec<u64> = jobs
            .values()
            .filter(|j| j.info.state.is_finished())
            .map(|j| j.info.id)
            .collect();
        for old in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            jobs.remove(old);
        }
        drop(jobs);
        self.events
            .send(super::events::Event::Download(Box::new(info.clone())));
        tracing::info!(id, repo = %req.repo_id, file = %model.filename, bytes = model.total_size, "download queued");

        let this = self.clone();
        tokio::spawn(async move {
            this.run(id, req.repo_id, revision, model, cancel).await;
            let _ = ended_tx.send(true);
        });
        Ok(info)
    }

    /// The download task: transfer, then register, then the final state.
    async fn run(
        self: Arc<Self>,
        id: u64,
        repo_id: String,
        revision: String,
        model: GgufModel,
        cancel: CancellationToken,
    ) {
        let this = self.clone();
        let progress = move |p: &Progress| this.on_progress(id, p);
        let result = self
            .hub
            .download_model(&repo_id, &revision, model, progress, cancel.clone())
            .await;
        let outcome = match result {
            Ok(done) => {
                let _guard = self.register_lock.lock().await;
                if cancel.is_cancelled() {
                    // Cancelled after the last byte: undo what this download put in MODELS_DIR.
                    for p in &done.fetched {
                        let _ = tokio::fs::remove_file(p).await;
                    }
                    Err(HubError::Cancelled)
                } else {
                    match register(&self.db, self.hub.models_dir(), &done).await {
                        Ok(name) => {
                            if let Ok(Some(row)) = self.db.get_model(&name).await {
                                (self.on_registered)(&row);
                            }
                            Ok(name)
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            Err(e) => Err(e),
        };
        let now = super::db::now_ms();
        let info = {
            let mut jobs = self.jobs();
            let Some(job) = jobs.get_mut(&id) else {
                return;
            };
            let i = &mut job.info;
            i.bytes_per_sec = 0.0;
            i.updated_at = now;
            i.finished_at = Some(now);
            match &outcome {
                Ok(name) => {
                    i.state = DownloadState::Done;
                    i.downloaded = i.total;
                    i.model = Some(name.clone());
                }
                Err(HubError::Cancelled) => i.state = DownloadState::Cancelled,
                Err(e) => {
                    i.state = DownloadState::Failed;
                    i.error = Some(e.to_string());
                    i.error_code = Some(e.code());
                }
            }
            i.clone()
        };
        match &outcome {
            Ok(name) => {
                tracing::info!(id, repo = %repo_id, model = %name, "download finished and registered")
            }
            Err(HubError::Cancelled) => tracing::info!(id, repo = %repo_id, "download cancelled"),
            Err(e) => tracing::warn!(id, repo = %repo_id, "download failed: {e}"),
        }
        self.events
            .send(super::events::Event::Download(Box::new(info)));
    }

    fn on_progress(&self, id: u64, p: &Progress) {
        let info = {
            let mut jobs = self.jobs();
            let Some(job) = jobs.get_mut(&id) else {
                return;
            };
            if job.cancel.is_cancelled() {
                return;
            }
            let state = match p.phase {
                Phase::Queued => DownloadState::Queued,
                Phase::Downloading => DownloadState::Downloading,
                // `Done` of the transfer: registration follows, still "verifying" to the user.
                Phase::Verifying | Phase::Done => DownloadState::Verifying,
            };
            let i = &mut job.info;
            let changed = state != i.state || p.file_index != i.file_index;
            i.state = state;
            i.downloaded = p.downloaded;
            i.total = p.total;
            i.bytes_per_sec = if state == DownloadState::Downloading {
                p.bytes_per_sec
            } else {
                0.0
            };
            i.file = p.file.clone();
            i.file_index = p.file_index;
            i.file_count = p.file_count;
            i.updated_at = super::db::now_ms();
            let now = Instant::now();
            if !changed && job.last_event.is_some_and(|t| now - t < EVENT_INTERVAL) {
                return;
            }
            job.last_event = Some(now);
            i.clone()
        };
        self.events
            .send(super::events::Event::Download(Box::new(info)));
    }

    /// Cancels download `id` if it is still running and waits (up to 30 s) until its partial files are
    /// deleted; a finished download is removed from the list instead. Returns its final info (state
    /// `cancelled`, or `done` / `failed` when it ended first) and whether it was still running, or
    /// `None` for an unknown id.
    pub async fn cancel(&self, id: u64) -> Option<(DownloadInfo, bool)> {
        let (token, mut ended) = {
            let mut jobs = self.jobs();
            let job = jobs.get(&id)?;
            if job.info.state.is_finished() {
                return jobs.remove(&id).map(|j| (j.info, false));
            }
            (job.cancel.clone(), job.ended.clone())
        };
        token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), ended.wait_for(|e| *e)).await;
        self.get(id).map(|i| (i, true))
    }
}

/// `cyber-inference download-model`: fetch a GGUF model from Hugging Face into MODELS_DIR.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// The repo, as OWNER/NAME (e.g. bartowski/SmolLM2-135M-Instruct-GGUF).
    pub repo_id: String,
    /// The GGUF file to fetch (any part of a split fetches all parts). Default: Q4_K_M, else Q8_0,
    /// else the smallest.
    #[arg(long)]
    pub filename: Option<String>,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Only list the repo's GGUF models (size, quantization, parts) and exit.
    #[arg(long)]
    pub list: bool,
}

/// Runs `download-model` on its own tokio runtime: lists or downloads with an indicatif bar on stderr,
/// prints the downloaded path(s) on stdout, then registers the model in the catalogue ([`register`]).
/// Interrupting it (Ctrl-C) keeps the partial file, so running it again resumes.
pub fn run_cli(loaded: &Loaded, args: &DownloadArgs) -> anyhow::Result<()> {
    let config = HubConfig::from_settings(loaded);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let hub = Hub::new(config)?;
        if !args.list {
            return download_cli(loaded, &hub, args).await;
        }
        {
            let models = hub.list_models(&args.repo_id, Some(&args.revision)).await?;
            let chosen = choose_model(&models).map(|m| m.filename.clone());
            for m in &models {
                let mark = if Some(&m.filename) == chosen.as_ref() {
                    "*"
                } else {
                    " "
                };
                let parts = if m.files.len() > 1 || !m.missing_parts.is_empty() {
                    format!(
                        "  ({} parts{})",
                        m.files.len() + m.missing_parts.len(),
                        if m.missing_parts.is_empty() {
                            ""
                        } else {
                            ", incomplete"
                        }
                    )
                } else {
                    String::new()
                };
                println!(
                    "{mark} {:<10} {:>10}  {}{parts}",
                    m.quantization.as_deref().unwrap_or("?"),
                    human_bytes(m.total_size),
                    m.filename
                );
            }
            Ok(())
        }
    })
}

/// `download-model` without `--list`: init (so a bad DATA_DIR fails before any byte), download with a
/// bar, print the paths, register.
async fn download_cli(loaded: &Loaded, hub: &Hub, args: &DownloadArgs) -> anyhow::Result<()> {
    {
        let ini = super::init::run(&loaded.settings).await?;
        if let Some(pw) = &ini.generated_password {
            eprintln!("cyber-inference: created user `admin` with password: {pw} (shown once)");
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg}\n[{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        let req = DownloadRequest {
            repo_id: args.repo_id.clone(),
            revision: Some(args.revision.clone()),
            filename: args.filename.clone(),
        };
        let b = bar.clone();
        let result = hub
            .download(
                &req,
                move |p| {
                    b.set_length(p.total);
                    b.set_position(p.downloaded);
                    b.set_message(format!(
                        "{:?} {} ({}/{})",
                        p.phase, p.file, p.file_index, p.file_count
                    ));
                },
                CancellationToken::new(),
            )
            .await;
        bar.finish_and_clear();
        let done = result?;
        for p in &done.paths {
            println!("{}", p.display());
        }
        let name = register(&ini.db, &loaded.settings.models_dir, &done).await;
        ini.db.close().await;
        eprintln!("registered as model `{}`", name?);
        Ok(())
    }
}

/// The catalogue hook: every finished download (CLI or admin API) is registered here and nowhere else,
/// and only after verification, so a failed or cancelled download never leaves a row. Rescans
/// MODELS_DIR (`catalog::scan`), then records the model's origin (repo, file, SHA-256) on the row of
/// its first file. Returns the model's catalogue name.
///
/// Errors: [`HubError::Catalogue`] when the scan fails or the downloaded file is not a GGUF the
/// catalogue can read (it stays in MODELS_DIR; the message says why).
pub async fn register(
    db: &super::db::Db,
    models_dir: &Path,
    done: &Downloaded,
) -> Result<String, HubError> {
    let primary = &done.paths[0];
    let fail = |reason: String| HubError::Catalogue {
        path: primary.clone(),
        reason,
    };
    let report = super::catalog::scan(db, models_dir)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let want = primary.canonicalize().map_err(|e| fail(e.to_string()))?;
    let rows = db.list_models().await.map_err(|e| fail(e.to_string()))?;
    let Some(row) = rows
        .iter()
        .find(|m| Path::new(&m.file_path).canonicalize().ok().as_ref() == Some(&want))
    else {
        let why = report
            .skipped
            .iter()
            .find(|(p, _)| Path::new(p).canonicalize().ok().as_ref() == Some(&want))
            .map_or("the scan did not find it".to_string(), |(_, why)| {
                why.clone()
            });
        return Err(fail(why));
    };
    let first = &done.model.files[0];
    db.set_model_source(
        &row.name,
        first.sha256.as_deref(),
        Some(&done.repo_id),
        Some(&first.filename),
    )
    .await
    .map_err(|e| fail(e.to_string()))?;
    Ok(row.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn file(name: &str, size: u64) -> RepoFile {
        RepoFile {
            filename: name.into(),
            size,
            sha256: Some(format!("{:064x}", size)),
            quantization: quantization_of(name),
            split: split_of(name),
        }
    }

    #[test]
    fn quantization_is_read_from_names() {
        let q = |n| quantization_of(n);
        assert_eq!(
            q("SmolLM2-135M-Instruct.Q4_K_M.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(
            q("qwen2.5-0.5b-instruct-q8_0.gguf").as_deref(),
            Some("Q8_0")
        );
        assert_eq!(
            q("Llama-3.2-1B-Instruct-IQ4_XS.gguf").as_deref(),
            Some("IQ4_XS")
        );
        assert_eq!(q("all-MiniLM-L6-v2.F16.gguf").as_deref(), Some("F16"));
        assert_eq!(q("model-BF16-00002-of-00003.gguf").as_deref(), Some("BF16"));
        assert_eq!(
            q("Q4_K_M/Big-UD-Q4_K_XL-00001-of-00002.gguf").as_deref(),
            Some("Q4_K_XL")
        );
        assert_eq!(q("model.gguf"), None);
        // A size like 135M or a version like v2 is no quantization.
        assert_eq!(q("SmolLM2-135M-v2.gguf"), None);
    }

    #[test]
    fn split_suffixes_are_recognised_exactly() {
        assert_eq!(
            split_of("a/m-00002-of-00003.gguf"),
            Some(SplitPart { index: 2, count: 3 })
        );
        assert_eq!(split_of("m-00004-of-00003.gguf"), None);
        assert_eq!(split_of("m-00000-of-00003.gguf"), None);
        assert_eq!(split_of("m-0002-of-00003.gguf"), None);
        assert_eq!(split_of("m-00002-of-00003.bin"), None);
        assert_eq!(split_of("00002-of-00003.gguf"), None);
        assert_eq!(split_of("é.gguf"), None);
    }

    #[test]
    fn choice_prefers_q4_k_m_then_q8_0_then_smallest() {
        let all = vec![
            file("m.Q8_0.gguf", 800),
            file("m.Q4_K_M.gguf", 500),
            file("m.Q2_K.gguf", 300),
            file("mmproj-m-f16.gguf", 10),
            file("README.md", 1),
        ];
        let pick =
            |files: &[RepoFile]| choose_model(&group_models(files)).map(|m| m.filename.clone());
        assert_eq!(pick(&all).as_deref(), Some("m.Q4_K_M.gguf"));
        assert_eq!(pick(&all[..1]).as_deref(), Some("m.Q8_0.gguf"));
        let no_preferred = [all[2].clone(), all[3].clone(), file("m.F16.gguf", 2000)];
        // The projector is smaller but is never chosen.
        assert_eq!(pick(&no_preferred).as_deref(), Some("m.Q2_K.gguf"));
    }

    #[test]
    fn splits_are_one_model_and_any_part_selects_all() {
        let files = vec![
            file("big/m-Q4_K_M-00002-of-00002.gguf", 600),
            file("big/m-Q4_K_M-00001-of-00002.gguf", 700),
            file("m.Q8_0.gguf", 900),
        ];
        let models = group_models(&files);
        assert_eq!(models.len(), 2);
        let split = models.iter().find(|m| m.files.len() == 2).unwrap();
        assert_eq!(split.total_size, 1300);
        assert_eq!(split.filename, "big/m-Q4_K_M-00001-of-00002.gguf");
        assert_eq!(split.quantization.as_deref(), Some("Q4_K_M"));
        let chosen = select_model("o/r", "main", &files, None).unwrap();
        assert_eq!(chosen, *split);
        let by_part = select_model(
            "o/r",
            "main",
            &files,
            Some("big/m-Q4_K_M-00002-of-00002.gguf"),
        )
        .unwrap();
        assert_eq!(
            by_part.files[0].split,
            Some(SplitPart { index: 1, count: 2 })
        );
        assert_eq!(
            by_part.files[1].split,
            Some(SplitPart { index: 2, count: 2 })
        );
    }

    #[test]
    fn incomplete_splits_missing_files_and_empty_repos_are_errors() {
        let files = vec![
            file("m-Q4_K_M-00001-of-00003.gguf", 10),
            file("m-Q4_K_M-00003-of-00003.gguf", 10),
            file("m.Q8_0.gguf", 50),
        ];
        // Automatic choice skips the broken split.
        assert_eq!(
            select_model("o/r", "main", &files, None).unwrap().filename,
            "m.Q8_0.gguf"
        );
        match select_model("o/r", "main", &files, Some("m-Q4_K_M-00003-of-00003.gguf")) {
            Err(HubError::IncompleteSplit { missing, count, .. }) => {
                assert_eq!((missing, count), (vec![2], 3))
            }
            other => panic!("{other:?}"),
        }
        let e = select_model("o/r", "main", &files, Some("nope.gguf")).unwrap_err();
        assert!(matches!(e, HubError::FileNotInRepo { .. }), "{e}");
        assert!(e.to_string().contains("m.Q8_0.gguf"), "{e}");
        let e = select_model("o/r", "main", &[file("config.json", 5)], None).unwrap_err();
        assert!(matches!(e, HubError::NoGguf { .. }), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        assert_eq!(e.http_status(), 422);
    }

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
    fn local_names_never_leave_models_dir() {
        assert_eq!(
            local_name("sub/dir/m.Q4_K_M.gguf").unwrap(),
            "m.Q4_K_M.gguf"
        );
        for bad in [
            "../",
            "a/..",
            "a/.hidden.gguf",
            "a\\..\\b.gguf",
            "m.bin",
            "",
            "a/",
            "x\n.gguf",
        ] {
            assert!(local_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repo_ids_and_revisions_are_checked() {
        assert_eq!(
            parse_repo_id("bartowski/SmolLM2-135M-Instruct-GGUF").unwrap(),
            ("bartowski", "SmolLM2-135M-Instruct-GGUF")
        );
        for bad in [
            "noslash", "a/b/c", "../x", "a/..", "/x", "a/", "a b/c", "a/b?c", "a/.x",
        ] {
            assert!(parse_repo_id(bad).is_err(), "{bad}");
        }
        assert!(check_revision("refs/pr/1").is_ok());
        assert!(check_revision("").is_err());
        assert!(check_revision("../../x").is_err());
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
    fn content_range_and_backoff() {
        assert_eq!(content_range_start("bytes 400-999/1000"), Some(400));
        assert_eq!(content_range_start("bytes */1000"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
        let r = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        let b: Vec<_> = (1..=4).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(b, [100, 200, 350, 350]);
    }

    #[test]
    fn free_disk_check_reports_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_space(dir.path()).expect("the temp dir's file system is mounted");
        assert!(free > 0);
        check_free_space(dir.path(), 1).unwrap();
        let e = check_free_space(dir.path(), free + (1 << 40)).unwrap_err();
        match &e {
            HubError::InsufficientDisk {
                needed, available, ..
            } => {
                assert_eq!(*needed, free + (1 << 40));
                assert!(*available < *needed);
            }
            other => panic!("{other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&(free + (1 << 40)).to_string()) && msg.contains("free"),
            "{msg}"
        );
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
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
