//! The process manager: one worker process per loaded model, its state machine, spawning and health
//! checks, log capture, crash detection, draining stops, single-flight loads, in-flight guards, admission
//! by memory estimate and LRU eviction.
//!
//! ```text
//!   manager.rs    decides: acquire, unload, evict, health verdicts, shutdown (the slots)
//!   load.rs       the load sequence: row, admission, port, session, spawn, readiness
//!   admission.rs  decides for loads that involve other models: fits? whom to evict? which port?
//!   worker.rs     does: spawn, output capture, exit watch, readiness and health probes, signals
//!   lease.rs      an in-flight request's guard on a worker
//!   state.rs      the checked state machine
//! ```

pub(crate) mod admission;
mod error;
pub(crate) mod lease;
mod load;
pub(crate) mod manager;
pub(crate) mod state;
pub mod sys;
mod worker;

pub(crate) use error::LoadError;
pub(crate) use lease::{Lease, WorkerReporter};
pub(crate) use manager::Manager;
pub(crate) use state::ModelState;

/// Seconds a worker gets between SIGTERM and SIGKILL (also the supervisor's shutdown grace).
pub(crate) const STOP_GRACE_SECS: u64 = 10;

#[cfg(test)]
mod test_support;
