//! The supervisor harness: starts the real `cyber-inference serve` binary on a temporary
//! DATA_DIR/MODELS_DIR (models symlinked from the assets), with free ports, waits for `/health`, talks to
//! its admin API, and stops it (SIGTERM, then SIGKILL) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::assets;
use super::net::{free_base_port, free_port};
use super::process::{BIN, children_of, proc_environ, signal};
use super::python;

/// The admin password every harnessed `serve` starts with.
pub const PASSWORD: &str = "test-password-123";

/// A running supervisor.
pub struct Server {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub base: String,
    pub http: reqwest::Client,
    /// The environment `serve` was started with (for [`Server::restart`]).
    pub env: Vec<(String, String)>,
}

impl Server {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn models_dir(&self) -> PathBuf {
        self.dir.path().join("models")
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Starts `serve` with `models` (file names in the assets) linked into MODELS_DIR and extra `env`
    /// (`CYBER_INFERENCE_` is prefixed to names without it). Waits for `/health` 200.
    pub async fn start(models: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with_raw_env(models, env, &[]).await
    }

    /// [`Server::start`] with `raw` variables besides, set as they are named (the Vulkan loader's
    /// `VK_*`, say).
    pub async fn start_with_raw_env(
        models: &[&str],
        env: &[(&str, &str)],
        raw: &[(String, String)],
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mdir = dir.path().join("models");
        std::fs::create_dir_all(&mdir).unwrap();
        for m in models {
            std::os::unix::fs::symlink(assets::model(m), mdir.join(m)).unwrap();
        }
        let port = free_port();
        let worker_base = free_base_port();
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| {
                let k = if k.starts_with("CYBER_INFERENCE_") {
                    k.to_string()
                } else {
                    format!("CYBER_INFERENCE_{k}")
                };
                (k, v.to_string())
            })
            .collect();
        let defaults = [
            ("CYBER_INFERENCE_HOST", "127.0.0.1".to_string()),
            ("CYBER_INFERENCE_PORT", port.to_string()),
            (
                "CYBER_INFERENCE_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ),
            ("CYBER_INFERENCE_MODELS_DIR", mdir.display().to_string()),
            ("CYBER_INFERENCE_WORKER_BASE_PORT", worker_base.to_string()),
            ("CYBER_INFERENCE_ADMIN_PASSWORD", PASSWORD.to_string()),
            ("CYBER_INFERENCE_THREADS", "1".to_string()),
            ("CYBER_INFERENCE_DEFAULT_CONTEXT_SIZE", "2048".to_string()),
        ];
        for (k, v) in defaults {
            if !env.iter().any(|(e, _)| e == k) {
                env.push((k.to_string(), v));
            }
        }
        env.extend(raw.iter().cloned());
        let port = env
            .iter()
            .find(|(k, _)| k == "CYBER_INFERENCE_PORT")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        let child = spawn_serve(dir.path(), &env);
        let mut s = Server {
            child: Some(child),
            dir,
            port,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            env,
        };
        s.wait_healthy().await;
        s
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("serve exited early ({st}):\n{}", self.log());
            }
            if let Ok(r) = self.http.get(format!("{}/health", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve not healthy in 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Logs in as admin; returns the JWT.
    pub async fn login(&self) -> String {
        let r = self
            .http
            .post(format!("{}/admin/api/login", self.base))
            .json(&serde_json::json!({"username": "admin", "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// GET an admin route with a token; returns (status, JSON).
    pub async fn admin_get(&self, token: &str, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// Sends `body` as JSON with `method` to an admin route with a token; returns (status, JSON).
    async fn admin_send(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// POST `body` to an admin route with a token; returns (status, JSON).
    pub async fn admin_post(
        &self,
        token: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.admin_send(reqwest::Method::POST, token, path, body)
            .await
    }

    /// Download `id` as `/admin/api/downloads` lists it.
    pub async fn download(&self, token: &str, id: u64) -> serde_json::Value {
        let (st, j) = self.admin_get(token, "/admin/api/downloads").await;
        assert_eq!(st, 200, "{j}");
        j["downloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("download {id} not listed: {j}"))
    }

    /// Polls `/admin/api/downloads` until download `id` satisfies `pred`; returns it and every state
    /// seen.
    pub async fn wait_download(
        &self,
        token: &str,
        id: u64,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, Vec<serde_json::Value>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        loop {
            let d = self.download(token, id).await;
            seen.push(d.clone());
            if pred(&d) {
                return (d, seen);
            }
            assert!(
                Instant::now() < deadline,
                "download {id} not there in {secs} s: {d}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a download (`POST /admin/api/models/download`, answered 202) and returns its id.
    pub async fn start_download(&self, token: &str, body: serde_json::Value) -> u64 {
        let (st, j) = self
            .admin_post(token, "/admin/api/models/download", body)
            .await;
        assert_eq!(st, 202, "{j}");
        j["id"].as_u64().unwrap()
    }

    /// Polls download `id` until it has ended (`done`, `failed` or `cancelled`) and returns it.
    pub async fn wait_download_ended(&self, token: &str, id: u64, secs: u64) -> serde_json::Value {
        self.wait_download(token, id, secs, |d| {
            matches!(d["state"].as_str(), Some("done" | "failed" | "cancelled"))
        })
        .await
        .0
    }

    /// Worker processes (children of the supervisor).
    pub fn workers(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// SIGKILLs `serve` (no cleanup of its own) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts `serve` again on the same directories and environment (after [`Server::kill`] or
    /// [`Server::stop`]); waits for `/health` 200. The log goes on in the same file.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart: serve is still running");
        let log = self.dir.path().join("serve.log");
        let before = std::fs::read_to_string(&log).unwrap_or_default();
        let child = spawn_serve(self.dir.path(), &self.env);
        std::fs::write(self.dir.path().join("serve.before-restart.log"), before).unwrap();
        self.child = Some(child);
        self.wait_healthy().await;
    }

    /// The supervisor's peak resident memory so far (`VmHWM`, bytes).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kb * 1024
    }

    /// SIGTERM and wait (SIGKILL after 20 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A response's status and JSON body (`null` when it has none).
pub async fn status_json(r: reqwest::Response) -> (u16, serde_json::Value) {
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Waits up to 30 s for `c` (a `serve` expected to refuse to start, `what` saying with what) to exit;
/// returns its status, or kills it and panics when it keeps running.
pub fn wait_serve_exit(c: &mut Child, what: &str) -> std::process::ExitStatus {
    super::process::wait_exit(c, Duration::from_secs(30), || {
        format!("serve kept running {what}")
    })
}

/// Spawns `serve` in `dir` with exactly `env` (plus PATH/HOME), output to `dir/serve.log`.
pub fn spawn_serve(dir: &Path, env: &[(String, String)]) -> Child {
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

impl Server {
    /// Runs `tests/py/NAME` with `args` (the official client tests); panics unless it exits 0 and prints
    /// `ALL OK`, showing its output and the supervisor's log. Returns its stdout.
    pub fn run_client_script(&self, name: &str, args: &[&str]) -> String {
        python::run_client_script(name, args, || self.log())
    }

    /// Creates an API key named `name` with an admin token; returns the key (shown once).
    pub async fn create_key(&self, token: &str, name: &str) -> String {
        let r = self
            .http
            .post(format!("{}/admin/api/keys", self.base))
            .bearer_auth(token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `PUT /admin/api/settings` with `body`; returns the status.
    pub async fn put_settings(&self, token: &str, body: serde_json::Value) -> u16 {
        self.admin_send(reqwest::Method::PUT, token, "/admin/api/settings", body)
            .await
            .0
    }

    /// `PATCH /admin/api/models/{model}` (per-model settings) with `body`; returns (status, JSON).
    pub async fn patch_model(
        &self,
        token: &str,
        model: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let path = format!("/admin/api/models/{model}");
        self.admin_send(reqwest::Method::PATCH, token, &path, body)
            .await
    }

    /// POST `body` as JSON to `path` (no key: `/v1` is open on loopback); returns (status, JSON).
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        status_json(r).await
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> String {
        self.get_text("/metrics").await
    }

    /// The body of `GET path` (no key) as text, whatever the status.
    pub async fn get_text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The body of `GET path` (no key) as JSON; panics when it is not JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A UI page (HTML) fetched with the admin session cookie.
    pub async fn page(&self, token: &str, path: &str) -> String {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", format!("ci_session={token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.text().await.unwrap()
    }
}

/// The key a worker started by the supervisor requires (`CYBER_INFERENCE_WORKER_API_KEY` in its
/// environment).
pub fn worker_key(pid: u32) -> String {
    proc_environ(pid)
        .into_iter()
        .find(|(k, _)| k == "CYBER_INFERENCE_WORKER_API_KEY")
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("worker {pid} has no CYBER_INFERENCE_WORKER_API_KEY"))
}

/// The admin API's view of `model`'s worker (`/admin/api/workers`), when it has a process.
pub async fn worker_of(s: &Server, token: &str, model: &str) -> Option<serde_json::Value> {
    let (_, w) = s.admin_get(token, "/admin/api/workers").await;
    w["workers"]
        .as_array()?
        .iter()
        .find(|w| w["model"] == model && w["pid"].is_u64())
        .cloned()
}

/// The value of `llamacpp:NAME` in the `/metrics` of `model`'s worker, asked directly on the worker's
/// port with its key; panics when the model has no worker or the metric is absent.
pub async fn worker_metric(s: &Server, token: &str, model: &str, name: &str) -> f64 {
    let w = worker_of(s, token, model)
        .await
        .unwrap_or_else(|| panic!("`{model}` has no worker"));
    let pid = w["pid"].as_u64().unwrap() as u32;
    let port = w["port"].as_u64().unwrap();
    let text = s
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth(worker_key(pid))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    super::worker::metric_value(&text, &format!("llamacpp:{name}"))
}
