//! The supervisor's download jobs: the table the admin API starts, lists and cancels, each job a
//! background task on the shared [`Hub`] that reports `download` events and registers its model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::progress::{Phase, Progress};
use super::select::{
    DownloadRequest, GgufModel, check_revision, local_name, parse_repo_id, select_model,
};
use super::transfer::check_free_space;
use super::{Hub, HubError, register};
use crate::supervisor::{db, events};

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
    pub(crate) fn is_finished(self) -> bool {
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
pub(crate) type OnRegistered = Box<dyn Fn(&db::ModelRow) + Send + Sync>;

/// The supervisor's downloads: the admin API starts, lists and cancels them; each runs as a tokio task
/// on the shared [`Hub`] (so at most `max_concurrent` transfer at once, the rest wait as `queued`),
/// reports progress as [`events::Event::Download`] events and, once verified, registers the
/// model in the catalogue with [`register`] — the same steps as `download-model`.
pub struct Downloads {
    hub: Hub,
    db: db::Db,
    events: events::Events,
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
    pub(crate) fn new(
        hub: Hub,
        db: db::Db,
        events: events::Events,
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
    pub(crate) fn hub(&self) -> &Hub {
        &self.hub
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every download of this run, oldest first (finished ones too, the last [`KEEP_FINISHED`]).
    pub(crate) fn list(&self) -> Vec<DownloadInfo> {
        self.jobs().values().map(|j| j.info.clone()).collect()
    }

    /// One download.
    pub(crate) fn get(&self, id: u64) -> Option<DownloadInfo> {
        self.jobs().get(&id).map(|j| j.info.clone())
    }

    /// Checks the request against the hub and starts the download in the background. Returns at once
    /// (state `queued`) once the repo was listed, the file chosen and the disk space checked, so a
    /// wrong repo, a gated repo, a repo without GGUF or a full disk are answered right away.
    ///
    /// Errors: as [`Hub::list_files`] and [`select_model`]; [`HubError::DownloadInProgress`] when the
    /// same model (or a file of the same name) is already being downloaded; [`HubError::InsufficientDisk`]
    /// when the bytes still missing, plus those of the downloads already running, do not fit.
    pub(crate) async fn start(
        self: &Arc<Self>,
        req: DownloadRequest,
    ) -> Result<DownloadInfo, HubError> {
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
        let now = db::now_ms();
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
            .send(events::Event::Download(Box::new(info.clone())));
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
        let now = db::now_ms();
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
        self.events.send(events::Event::Download(Box::new(info)));
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
            i.updated_at = db::now_ms();
            let now = Instant::now();
            if !changed && job.last_event.is_some_and(|t| now - t < EVENT_INTERVAL) {
                return;
            }
            job.last_event = Some(now);
            i.clone()
        };
        self.events.send(events::Event::Download(Box::new(info)));
    }

    /// Cancels download `id` if it is still running and waits (up to 30 s) until its partial files are
    /// deleted; a finished download is removed from the list instead. Returns its final info (state
    /// `cancelled`, or `done` / `failed` when it ended first) and whether it was still running, or
    /// `None` for an unknown id.
    pub(crate) async fn cancel(&self, id: u64) -> Option<(DownloadInfo, bool)> {
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
