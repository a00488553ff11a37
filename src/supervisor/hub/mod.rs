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

mod api;
mod cli;
mod jobs;
mod net;
mod progress;
mod select;
mod transfer;

pub use api::{DEFAULT_ENDPOINT, DEFAULT_MAX_DOWNLOADS, Hub, HubConfig, RetryPolicy};
pub use cli::{DownloadArgs, run_cli};
pub use jobs::{DownloadInfo, DownloadState, Downloads};
pub use progress::{Phase, Progress};
pub use select::{DownloadRequest, GgufModel, RepoFile, SplitPart};
pub(crate) use select::{choose_model, group_models};
pub use transfer::{Downloaded, PARTIAL_DIR};
pub(crate) use transfer::{STALE_PARTIAL_AGE, remove_stale_partials};

use std::path::{Path, PathBuf};

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

/// The catalogue hook: every finished download (CLI or admin API) is registered here and nowhere else,
/// and only after verification, so a failed or cancelled download never leaves a row. Rescans
/// MODELS_DIR (`catalog::scan`), then records the model's origin (repo, file, SHA-256) on the row of
/// its first file. Returns the model's catalogue name.
///
/// Errors: [`HubError::Catalogue`] when the scan fails or the downloaded file is not a GGUF the
/// catalogue can read (it stays in MODELS_DIR; the message says why).
pub(crate) async fn register(
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
