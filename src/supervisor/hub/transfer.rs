//! The transfer: streams a model's files into `MODELS_DIR/.partial`, resuming with HTTP Range after a
//! dropped connection or a restart, hashes them as they arrive, checks size, SHA-256 and free disk
//! space, and moves them into MODELS_DIR only once every part is verified.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header;
use reqwest::{StatusCode, Url};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::api::{Attempt, Hub, error_chain};
use super::progress::{Phase, Progress, Reporter};
use super::select::{
    DownloadRequest, GgufModel, RepoFile, base_name, check_revision, local_name, parse_repo_id,
    select_model,
};
use super::{HubError, io_err};

/// Sub-folder of MODELS_DIR holding downloads in progress (`*.part`); never scanned for models.
pub const PARTIAL_DIR: &str = ".partial";
/// Age after which a partial download that no download is writing is removed when the supervisor
/// starts (a fresher one is kept: the same download started again resumes from it).
pub(crate) const STALE_PARTIAL_AGE: Duration = Duration::from_secs(24 * 3600);

/// Removes the partial downloads (`MODELS_DIR/.partial/*.part`) not written for `max_age` that no
/// running download holds locked; returns the files removed. Unreadable entries are skipped (logged).
pub(crate) fn remove_stale_partials(models_dir: &Path, max_age: Duration) -> Vec<PathBuf> {
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

impl Hub {
    /// Whether every file of `model` is already in MODELS_DIR with its size (not hashed).
    pub(crate) fn is_present(&self, model: &GgufModel) -> bool {
        model.files.iter().all(|f| {
            local_name(&f.filename).is_ok_and(|n| {
                std::fs::metadata(self.models_dir.join(n))
                    .is_ok_and(|m| m.is_file() && m.len() == f.size)
            })
        })
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
    pub(crate) async fn missing_bytes(
        &self,
        repo_id: &str,
        revision: &str,
        model: &GgufModel,
    ) -> u64 {
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
            let partial = partial_dir.join(partial_name(repo_id, revision, f));
            needed += f.size - partial_len(&partial, f.size).await;
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
    pub(crate) async fn download_model<F>(
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
                // Hashed only when it is a file of the right size.
                Ok(m) if m.is_file() && m.len() == f.size && hash_matches(&dest, f).await? => true,
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
                needed += f.size - partial_len(&partial, f.size).await;
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
                        remove_all(&partials_in_flight).await;
                    }
                    return Err(e);
                }
            }
            done_before += f.size;
        }
        if cancel.is_cancelled() {
            remove_all(&partials_in_flight).await;
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
            hash_prefix(partial, have).await?
        } else {
            Sha256::new()
        };
        let mut file = tokio::fs::File::from_std(std_file);
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
                    self.check_attempts(&url, attempt, &detail)?;
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
            r = request.send() => r.map_err(|e| Attempt::send_failed(url, &e))?,
        };
        match resp.status() {
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
                    start_over(file, hasher, have, partial).await?;
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The partial file does not fit the remote one: start over.
                start_over(file, hasher, have, partial).await?;
                return Err(Attempt::Retry("HTTP 416 for the resumed range".into()));
            }
            _ => {
                return Err(self
                    .refusal(resp, url, repo, revision, Some(&f.filename))
                    .await);
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

/// `bytes START-END/TOTAL` → START.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
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
    let base = base_name(&f.filename);
    format!(
        "{}--{}--{}.part",
        clean(&repo.replace('/', "--")),
        key,
        clean(base)
    )
}

/// SHA-256 state after the first `len` bytes of `path` (read on a blocking thread).
async fn hash_prefix(path: &Path, len: u64) -> Result<Sha256, HubError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<Sha256> {
        let mut hasher = Sha256::new();
        let mut r = std::fs::File::open(&p)?.take(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher)
    })
    .await
    .expect("hashing does not panic")
    .map_err(io_err("cannot read", path))
}

/// Whether an existing file has `f`'s SHA-256 (true when the API gave none: the size already matched).
async fn hash_matches(path: &Path, f: &RepoFile) -> Result<bool, HubError> {
    let Some(expected) = &f.sha256 else {
        return Ok(true);
    };
    let h = hash_prefix(path, f.size).await?;
    Ok(hex::encode(h.finalize()) == *expected)
}

/// Bytes of a partial download already on disk, at most `size` (0 when there is none).
async fn partial_len(partial: &Path, size: u64) -> u64 {
    tokio::fs::metadata(partial)
        .await
        .map(|m| m.len().min(size))
        .unwrap_or(0)
}

/// Deletes the partial files of a cancelled download (those already gone are no error).
async fn remove_all(partials: &[PathBuf]) {
    for p in partials {
        let _ = tokio::fs::remove_file(p).await;
    }
}

/// Empties the partial file and the hash so that the transfer starts again from byte 0.
async fn start_over(
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    have: &mut u64,
    partial: &Path,
) -> Result<(), Attempt> {
    *have = 0;
    *hasher = Sha256::new();
    file.set_len(0)
        .await
        .map_err(|e| Attempt::Fatal(io_err("cannot truncate", partial)(e)))?;
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| Attempt::Fatal(io_err("cannot seek", partial)(e)))?;
    Ok(())
}

/// Bytes free for an unprivileged user on the file system holding `dir` (the mount point that is the
/// longest prefix of its canonical path), or `None` when no mount matches.
pub(super) fn free_space(dir: &Path) -> Option<u64> {
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
pub(super) fn check_free_space(dir: &Path, needed: u64) -> Result<(), HubError> {
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
pub(super) fn human_bytes(n: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_start_is_read() {
        assert_eq!(content_range_start("bytes 400-999/1000"), Some(400));
        assert_eq!(content_range_start("bytes */1000"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
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
}
