//! The worker process the end-to-end tests drive (`cyber-inference worker` on a free port): start and wait
//! for `/health`, its stderr, requests, metrics, and the end-of-generation ban of `/props`.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cyber-inference");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running worker process (`-t 2` plus the caller's flags) on a free port, ready when returned; killed
/// on drop.
pub struct Worker {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: tempfile::NamedTempFile,
}

impl Worker {
    pub fn start(model: &Path, extra: &[&str]) -> Worker {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(BIN)
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

    pub fn stderr(&self) -> String {
        let mut s = String::new();
        let _ = self.log.reopen().unwrap().read_to_string(&mut s);
        s
    }

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

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

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

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let key = format!("cyber_inference_{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
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
