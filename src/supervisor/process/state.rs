//! The per-model state machine of the process manager: one enum and one checked transition function, so
//! that no code path can move a model into a state it must not reach.
//!
//! ```text
//!            load                health 200 + nonce            evict/unload
//!  stopped ────────▶ loading ─────────────────────▶ ready ─────────────────▶ draining
//!     ▲  ▲              │  │                          │                        │
//!     │  │ unload       │  │ exit / timeout           │ exit                   │ in-flight = 0,
//!     │  └──────────────┘  ▼                          ▼                        │ worker exited
//!     │               failed ◀───────────────────────────────────── (exit) ◀───┤
//!     │                  │ load (after backoff)                                │
//!     │                  └──────────▶ loading                                  │
//!     └────────────────────────────────────────────────────────────────────────┘
//! ```

use serde::Serialize;

/// The state of one model's worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// No worker process.
    Stopped,
    /// A worker was spawned and `/health` is not 200 yet.
    Loading,
    /// The worker answers; requests are proxied to it.
    Ready,
    /// No new requests; waiting for in-flight ones, then SIGTERM.
    Draining,
    /// The worker exited unexpectedly or could not load; the reason is kept. The next request retries
    /// (after a backoff).
    Failed,
}

impl ModelState {
    /// The lower-case name used in `model_sessions.status` and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Stopped => "stopped",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Draining => "draining",
            ModelState::Failed => "failed",
        }
    }

    /// Whether a worker process may exist in this state (it counts against MAX_LOADED_MODELS).
    pub fn has_process(self) -> bool {
        matches!(
            self,
            ModelState::Loading | ModelState::Ready | ModelState::Draining
        )
    }
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid model state transition {from} → {to}")]
pub struct InvalidTransition {
    pub from: ModelState,
    pub to: ModelState,
}

/// The one place that decides whether `from → to` is allowed (see the diagram in this module's doc).
///
/// Errors: [`InvalidTransition`] for every pair not drawn in the diagram (self-loops included).
pub fn check_transition(from: ModelState, to: ModelState) -> Result<(), InvalidTransition> {
    use ModelState::*;
    let ok = matches!(
        (from, to),
        (Stopped, Loading)
            | (Failed, Loading)
            | (Loading, Ready)
            | (Loading, Stopped)
            | (Ready, Draining)
            | (Draining, Stopped)
            | (Loading, Failed)
            | (Ready, Failed)
            | (Draining, Failed)
    );
    if ok {
        Ok(())
    } else {
        Err(InvalidTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ModelState::*;

    #[test]
    fn transition_table() {
        let all = [Stopped, Loading, Ready, Draining, Failed];
        // rows: from; columns: to (Stopped, Loading, Ready, Draining, Failed)
        let table: [[bool; 5]; 5] = [
            /* Stopped  */ [false, true, false, false, false],
            /* Loading  */ [true, false, true, false, true],
            /* Ready    */ [false, false, false, true, true],
            /* Draining */ [true, false, false, false, true],
            /* Failed   */ [false, true, false, false, false],
        ];
        for (i, &from) in all.iter().enumerate() {
            for (j, &to) in all.iter().enumerate() {
                assert_eq!(
                    check_transition(from, to).is_ok(),
                    table[i][j],
                    "{from} → {to}"
                );
            }
        }
        let e = check_transition(Ready, Loading).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid model state transition ready → loading"
        );
    }

    #[test]
    fn process_states() {
        assert!(Loading.has_process() && Ready.has_process() && Draining.has_process());
        assert!(!Stopped.has_process() && !Failed.has_process());
        assert_eq!(serde_json::to_string(&Draining).unwrap(), "\"draining\"");
    }
}
