//! In-flight leases on a worker: while one lives its model is not evicted; its holder learns when the
//! request is cut and reports transport failures that make the worker suspect.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::manager::Manager;
use super::worker::WorkerProcess;

/// An in-flight guard: while it lives the model's worker is not evicted. Dropping it marks the request
/// finished.
pub struct Lease {
    pub(super) mgr: Arc<Manager>,
    pub(super) model: String,
    /// The worker's port on 127.0.0.1.
    pub port: u16,
    /// The worker's key, sent as `Authorization: Bearer` (the worker refuses requests without it).
    pub key: Arc<str>,
    /// Whether this request had to wait for a load (cold start).
    pub cold: bool,
    /// Becomes `Some(reason)` when the supervisor cuts the request (drain deadline, worker gone): the
    /// holder must end its response with an error then.
    pub cut: watch::Receiver<Option<String>>,
    /// The worker session this lease counts against.
    pub(super) session_id: i64,
    pub(super) worker: Arc<WorkerProcess>,
}

/// Longest a suspect worker is probed before the regular health probes ([`Manager::check_health`])
/// are left to decide.
const SUSPECT_PROBE_FOR: Duration = Duration::from_secs(30);

impl Lease {
    /// Reports that a request on this lease failed in transport; see [`WorkerReporter::transport_failed`].
    pub fn transport_failed(&self) {
        self.reporter().transport_failed();
    }

    /// A handle that reports on this lease's worker after the lease has moved on (a stream reader).
    pub fn reporter(&self) -> WorkerReporter {
        WorkerReporter {
            mgr: self.mgr.clone(),
            model: self.model.clone(),
            worker: self.worker.clone(),
        }
    }
}

/// Reports transport failures of requests to one worker ([`Lease::reporter`]).
#[derive(Clone)]
pub struct WorkerReporter {
    mgr: Arc<Manager>,
    model: String,
    worker: Arc<WorkerProcess>,
}

impl WorkerReporter {
    /// Reports that a request to this worker failed in transport (the connection was reset or closed
    /// before the answer ended): the worker is probably dying. It gets no new lease until a health
    /// probe answers (then it was something else) or its exit is seen; probes run every 200 ms for up
    /// to [`SUSPECT_PROBE_FOR`]. Requests that want the model meanwhile wait in
    /// [`Manager::acquire`] rather than being sent to it.
    pub fn transport_failed(&self) {
        let w = self.worker.clone();
        if w.gone.load(Ordering::Acquire) || w.suspect.swap(true, Ordering::AcqRel) {
            return;
        }
        let mgr = self.mgr.clone();
        let model = self.model.clone();
        tracing::info!(
            model,
            pid = w.pid,
            "a request failed in transport; the worker is probed"
        );
        tokio::spawn(async move {
            let until = Instant::now() + SUSPECT_PROBE_FOR;
            while !w.gone.load(Ordering::Acquire) && Instant::now() < until {
                let alive = w.probe(&mgr.http, Duration::from_secs(1)).await;
                if alive && !w.gone.load(Ordering::Acquire) {
                    tracing::info!(model, pid = w.pid, "the worker answers its health probe");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            w.suspect.store(false, Ordering::Release);
            mgr.bump();
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.mgr.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get_mut(&self.model)
            && s.worker
                .as_ref()
                .is_some_and(|w| w.session_id == self.session_id)
        {
            s.inflight = s.inflight.saturating_sub(1);
            s.last_used = Instant::now();
        }
        drop(slots);
        self.mgr.bump();
    }
}
