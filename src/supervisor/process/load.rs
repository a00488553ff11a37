//! The load sequence of one model: from its catalogue row, through admission, a port and a session
//! row, to a spawned [`WorkerProcess`] that answered its readiness check (or a recorded failure).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::error::LoadError;
use super::manager::{LOAD_TIMEOUT, Manager, Slot, backoff};
use super::state::ModelState;
use super::worker::{STOP_GRACE, Spawn, WorkerProcess, sanitize};
use crate::supervisor::db::ModelRow;
use crate::worker::SupervisedArgs;

impl Manager {
    /// Starts a worker for `model` and waits until it is ready (or failed): the model's row, admission
    /// ([`Manager::admit`]), a reserved port, a session row, the process ([`WorkerProcess::spawn`]) and
    /// its readiness ([`WorkerProcess::wait_ready`], at most [`LOAD_TIMEOUT`]).
    pub(super) async fn load(self: &Arc<Self>, model: &str) -> Result<(), LoadError> {
        let m = self.loadable(model).await?;
        self.refresh_model(&m);
        self.admit(&m).await?;
        let fail = |reason: String| LoadError::Failed {
            model: model.to_owned(),
            reason,
        };
        let reservation = self
            .reserve_port()
            .ok_or_else(|| fail("no free port for a worker".into()))?;
        let port = reservation.port;
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let (ctx_size, threads, parallel) = self.worker_params(&m);
        let session_id = self
            .db
            .insert_session(m.id, port, &instance, "loading")
            .await
            .map_err(|e| match e.is_busy() {
                true => LoadError::DatabaseBusy {
                    model: model.to_owned(),
                    reason: e.to_string(),
                },
                false => LoadError::Db(e.to_string()),
            })?;
        let settings = self.settings();
        let spec = Spawn {
            exe: &self.exe,
            args: SupervisedArgs {
                model: PathBuf::from(&m.file_path),
                port,
                alias: m.name.clone(),
                ctx_size,
                threads,
                parallel,
                embedding: m.embedding,
                reranking: m.reranking,
                gpu_layers: self.gpu_layers(&m),
                cache_types: self.cache_types(&m),
                instance,
            },
            log_level: settings.log_level.clone(),
            session_id,
            model_id: m.id,
            logs: self.logs(model),
            log_file: settings
                .data_dir
                .join("logs")
                .join(format!("{}.log", sanitize(model))),
            events: self.events.clone(),
        };
        let (mgr, name) = (self.clone(), model.to_owned());
        let spawned = WorkerProcess::spawn(spec, move |w, exit| async move {
            mgr.on_exit(&name, &w, exit).await
        });
        let worker = match spawned {
            Ok(w) => w,
            Err(e) => return Err(fail(self.spawn_failed(model, session_id, e).await)),
        };
        let _ = self.db.set_session_pid(session_id, worker.pid).await;
        {
            let mut slots = self.slots();
            let s = slots.entry(model.to_owned()).or_insert_with(Slot::new);
            s.worker = Some(worker.clone());
            s.rss = 0;
            s.keep_alive = None;
            self.transition(model, s, ModelState::Loading, None);
        }
        drop(reservation);
        let outcome = worker.wait_ready(&self.http, LOAD_TIMEOUT).await;
        self.finish_load(model, &worker, outcome)
            .await
            .map_err(fail)
    }

    /// The catalogue row of `model` when it may be loaded.
    async fn loadable(&self, model: &str) -> Result<ModelRow, LoadError> {
        let m = self
            .db
            .get_model(model)
            .await
            .map_err(|e| LoadError::Db(e.to_string()))?
            .ok_or_else(|| LoadError::NotFound(model.to_owned()))?;
        if !m.enabled {
            return Err(LoadError::Disabled(model.to_owned()));
        }
        if let Some(reason) = &m.unsupported_reason {
            return Err(LoadError::Unsupported {
                model: model.to_owned(),
                reason: reason.clone(),
            });
        }
        Ok(m)
    }

    /// Records a worker that could not even be started: its session and the slot fail (with a
    /// backoff, as a crash would). Returns the reason.
    async fn spawn_failed(&self, model: &str, session_id: i64, e: std::io::Error) -> String {
        let reason = format!("cannot start {}: {e}", self.exe.display());
        let _ = self
            .db
            .set_session_status(session_id, "failed", Some(&reason))
            .await;
        let mut slots = self.slots();
        let s = slots.entry(model.to_owned()).or_insert_with(Slot::new);
        if s.state == ModelState::Stopped || s.state == ModelState::Failed {
            // Through Loading so the checked machine sees a real attempt.
            self.transition(model, s, ModelState::Loading, None);
            self.transition(model, s, ModelState::Failed, Some(reason.clone()));
            s.failures += 1;
            s.retry_at = Some(Instant::now() + backoff(s.failures));
        }
        self.metrics.load_failures.fetch_add(1, Ordering::Relaxed);
        reason
    }

    /// Ends a load after [`WorkerProcess::wait_ready`]: ready when its slot still holds this worker in
    /// Loading (an unload may have come first); otherwise the worker is killed and the reason is the
    /// slot's (its exit's) or `outcome`'s.
    async fn finish_load(
        &self,
        model: &str,
        worker: &Arc<WorkerProcess>,
        outcome: Result<(), String>,
    ) -> Result<(), String> {
        if outcome.is_ok() {
            if let Some(b) = worker.backend.get() {
                self.record_backend(model, b);
            }
            let mut slots = self.slots();
            if let Some(s) = slots.get_mut(model)
                && s.state == ModelState::Loading
                && s.worker.as_ref().is_some_and(|w| Arc::ptr_eq(w, worker))
            {
                self.transition(model, s, ModelState::Ready, None);
                s.last_used = Instant::now();
                s.retry_at = None;
                self.metrics.loads.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            return Err(slots
                .get(model)
                .and_then(|s| s.reason.clone())
                .unwrap_or_else(|| "stopped while loading".into()));
        }
        let why = outcome.err().unwrap_or_default();
        if !why.is_empty() {
            *worker.stop_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            worker.kill_now();
        }
        worker.wait_exit(STOP_GRACE).await;
        self.metrics.load_failures.fetch_add(1, Ordering::Relaxed);
        Err(self
            .slots()
            .get(model)
            .and_then(|s| s.reason.clone())
            .unwrap_or(why))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::manager;
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_worker_that_cannot_start_fails_with_backoff() {
        let (_d, m, db) = manager().await;
        // /bin/false exits at once with status 1: the load fails and the reason says so.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"x").unwrap();
        db.upsert_scanned(&crate::supervisor::db::ScannedModel {
            name: "m".into(),
            file_path: f.display().to_string(),
            size_bytes: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        let e = m.acquire("m").await.err().unwrap();
        assert!(
            matches!(&e, LoadError::Failed { reason, .. } if reason.contains("status 1")),
            "{e}"
        );
        assert_eq!(m.state_of("m"), ModelState::Failed);
        // First failure: no backoff, the next request tries again and fails a second time …
        let e = m.acquire("m").await.err().unwrap();
        assert!(matches!(e, LoadError::Failed { .. }), "{e}");
        // … then the backoff answers at once.
        let e = m.acquire("m").await.err().unwrap();
        assert!(matches!(e, LoadError::Backoff { .. }), "{e}");
        assert!(matches!(
            m.acquire("nope").await,
            Err(LoadError::NotFound(_))
        ));
        let sessions = db.model_sessions(1, 10).await.unwrap();
        assert_eq!(sessions.len(), 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sessions = db.model_sessions(1, 10).await.unwrap();
        assert!(
            sessions.iter().all(|s| s.status == "failed"),
            "{sessions:?}"
        );
    }
}
