//! Progress of one download: the report its callback receives and the throttle that calls it (at most
//! every 100 ms while bytes flow, with an exponentially smoothed transfer rate).

use std::time::{Duration, Instant};

use serde::Serialize;

/// How often the progress callback is called at most while bytes flow.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

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

/// Calls the progress callback, throttled, and keeps the smoothed rate.
pub(super) struct Reporter<'a, F> {
    callback: &'a F,
    total: u64,
    file_count: usize,
    pub(super) downloaded: u64,
    pub(super) transferred: u64,
    last_emit: Option<Instant>,
    rate_mark: (Instant, u64),
    rate: f64,
}

impl<'a, F: Fn(&Progress)> Reporter<'a, F> {
    pub(super) fn new(callback: &'a F, total: u64, file_count: usize) -> Self {
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

    pub(super) fn emit(&mut self, phase: Phase, file: &str, file_index: usize, force: bool) {
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
