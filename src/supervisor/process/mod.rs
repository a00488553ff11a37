//! The process manager: one worker process per loaded model, its state machine, spawning and health
//! checks, log capture, crash detection, draining stops, single-flight loads, in-flight guards, admission
//! by memory estimate and LRU eviction.

pub mod manager;
pub mod state;
pub mod sys;

pub use manager::{Lease, LoadError, Manager, WorkerReporter, WorkerView};
pub use state::ModelState;

/// Seconds a worker gets between SIGTERM and SIGKILL (also the supervisor's shutdown grace).
pub const STOP_GRACE_SECS: u64 = 10;
