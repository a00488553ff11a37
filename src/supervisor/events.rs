//! The supervisor's event bus: model state changes, resource samples, download progress and log
//! lines, fanned out with a tokio broadcast channel to the admin WebSocket `/admin/api/events` (and
//! any other listener).

use serde::Serialize;
use tokio::sync::broadcast;

use super::hub::DownloadInfo;
use super::logs::LogLine;
use super::monitor::ResourceSample;
use super::process::state::ModelState;

/// One event, serialized as `{"type": "model_state" | "resources" | "download" | "log", ...}`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A model moved from `from` to `to`; `reason` says why (for failed/stopped).
    ModelState {
        model: String,
        from: ModelState,
        to: ModelState,
        reason: Option<String>,
        at: i64,
    },
    /// A sample of the resource monitor (every 2 s).
    Resources(Box<ResourceSample>),
    /// Progress or end of a download of the admin API: a [`DownloadInfo`] (`id`, `state`,
    /// `downloaded`, `total`, `bytes_per_sec`, `error`, `model`, …), at most every 250 ms per download
    /// and at every state change (`queued`, `downloading`, `verifying`, `done`, `failed`, `cancelled`).
    Download(Box<DownloadInfo>),
    /// A line of a worker's output (`model` set) or of the supervisor (`model` null).
    Log {
        model: Option<String>,
        #[serde(flatten)]
        line: LogLine,
    },
}

/// The sending side; clone freely. Events are dropped when nobody listens.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Events {
    /// Sends an event to every current subscriber.
    pub fn send(&self, e: Event) {
        let _ = self.tx.send(e);
    }

    /// A receiver of the events sent from now on (a slow receiver skips, it never blocks senders).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_a_type_tag() {
        let ev = Events::default();
        let mut rx = ev.subscribe();
        ev.send(Event::ModelState {
            model: "m".into(),
            from: ModelState::Stopped,
            to: ModelState::Loading,
            reason: None,
            at: 1,
        });
        let j = serde_json::to_value(rx.try_recv().unwrap()).unwrap();
        assert_eq!(j["type"], "model_state");
        assert_eq!(j["to"], "loading");
        let j = serde_json::to_value(Event::Log {
            model: None,
            line: LogLine {
                at: 2,
                stream: "supervisor",
                line: "x".into(),
            },
        })
        .unwrap();
        assert_eq!(
            (j["type"].as_str(), j["line"].as_str()),
            (Some("log"), Some("x"))
        );
    }
}
