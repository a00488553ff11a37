//! The worker harness: a `cyber-inference worker` process on a free port, started and waited for
//! (`/health`), its stderr, requests, metrics, and the end-of-generation ban of `/props`.

use std::io::Read;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::net::free_port;
use super::process::{bin, signal};

/// A running worker process (`-t 2` plus the caller's flags) on a free port, ready when returned; killed
/// on drop.
pub struct Worker {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: tempfile::NamedTempFile,
}

impl Worker {
    /// Starts `worker -m MODEL --host 127.0.0.1 --port PORT -t 2 EXTRA…` and waits until it is ready.
    pub fn start(model: &Path, extra: &[&str]) -> Worker {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = bin()
            .arg("worker")
            .arg("-m")
            .arg(model)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "-t",
                "2",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut w = Worker {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        w.wait_ready();
        w
    }

    /// What the worker printed on stderr so far.
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        let _ = self.log.reopen().unwrap().read_to_string(&mut s);
        s
    }

    /// Waits up to 120 s for `GET /health` to answer 200; panics with the stderr when the worker exits
    /// first or is not ready in time.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("worker exited with {st} before ready:\n{}", self.stderr());
            }
            if let Ok(mut s) = std::net::TcpStream::connect(self.base.trim_start_matches("http://"))
            {
                use std::io::Write;
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("worker not ready in 120 s:\n{}", self.stderr());
    }

    /// Waits up to `limit` for the worker to exit; panics with its stderr when it keeps running.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let log = self.log.path().to_owned();
        super::process::wait_exit(&mut self.child, limit, || {
            format!(
                "worker did not exit:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
    }

    /// Sends SIGTERM; panics when `kill` fails.
    pub fn sigterm(&self) {
        assert!(signal(self.child.id(), "TERM"), "kill -TERM failed");
    }

    /// POSTs `body` as JSON to `path`; returns (status, JSON or `null`).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    /// The value of `cyber_inference_NAME` in `/metrics`; panics when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, &format!("cyber_inference_{name}"))
    }

    /// `logit_bias` banning every end-of-generation token (so a generation runs to max_tokens).
    pub async fn ban_eog(&self) -> Value {
        let p: Value = reqwest::get(format!("{}/props", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut bias = serde_json::Map::new();
        for id in p["eog_token_ids"]
            .as_array()
            .expect("eog_token_ids in /props")
        {
            bias.insert(id.to_string(), json!(-100));
        }
        Value::Object(bias)
    }

    /// A greedy `/v1/completions` of `max_tokens` tokens; panics unless it answers 200.
    pub async fn complete(&self, prompt: &str, max_tokens: u32) -> Value {
        let (st, v) = self
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        v
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the unlabelled metric `full_name` in a Prometheus text exposition; panics when absent.
pub fn metric_value(text: &str, full_name: &str) -> f64 {
    let key = format!("{full_name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no metric {full_name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}
