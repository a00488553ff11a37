//! Helpers of the UI tests: a real `cyber-inference serve` on a free port with a temporary DATA_DIR and
//! MODELS_DIR, stopped (SIGTERM, then SIGKILL) when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The admin password every UI test uses.
pub const PASSWORD: &str = "correct-horse-battery";

/// The chat model of the browser test.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_K_M.gguf";

/// `$CYBER_INFERENCE_ASSETS/models/NAME`, panicking with a clear message when the assets are missing.
pub fn asset_model(name: &str) -> PathBuf {
    let dir = std::env::var_os("CYBER_INFERENCE_ASSETS").expect(
        "CYBER_INFERENCE_ASSETS is not set: run ../shared/assets/fetch and export its output (.ci/run does)",
    );
    let p = PathBuf::from(dir).join("models").join(name);
    assert!(p.is_file(), "missing test model {}", p.display());
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

/// A running supervisor.
pub struct Serve {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Serve {
    /// Starts `serve` with `models` (asset file names) symlinked into its MODELS_DIR and waits until
    /// it listens (up to 60 s).
    pub fn start(models: &[&str]) -> Serve {
        Serve::start_with(models, &[])
    }

    /// [`Serve::start`] with extra environment variables (`CYBER_INFERENCE_HF_ENDPOINT`, ...).
    pub fn start_with(models: &[&str], env: &[(&str, String)]) -> Serve {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mdir = dir.path().join("models");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&mdir).unwrap();
        for m in models {
            std::os::unix::fs::symlink(asset_model(m), mdir.join(m)).unwrap();
        }
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cyber-inference"));
        for (k, _) in std::env::vars() {
            if k.starts_with("CYBER_INFERENCE_") && k != "CYBER_INFERENCE_ASSETS" {
                cmd.env_remove(k);
            }
        }
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        // Run from the temp dir: no `templates/` or `static/` beside it, so every page rendered proves
        // the templates and static files are compiled into the binary.
        let child = cmd
            .current_dir(dir.path())
            .arg("serve")
            .env("CYBER_INFERENCE_HOST", "127.0.0.1")
            .env("CYBER_INFERENCE_PORT", port.to_string())
            .env("CYBER_INFERENCE_WORKER_BASE_PORT", free_port().to_string())
            .env("CYBER_INFERENCE_DATA_DIR", &data)
            .env("CYBER_INFERENCE_MODELS_DIR", &mdir)
            .env("CYBER_INFERENCE_ADMIN_PASSWORD", PASSWORD)
            .env("CYBER_INFERENCE_THREADS", "2")
            .env("CYBER_INFERENCE_DEFAULT_CONTEXT_SIZE", "2048")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start cyber-inference serve");
        let mut s = Serve { child, port, dir };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("serve exited early ({status}):\n{}", s.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "serve did not listen within 60 s:\n{}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the supervisor printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        sigterm(pid);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM through the `kill` command (tests hold no `unsafe`).
fn sigterm(pid: i32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// An HTTP client that does not follow redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in as admin; returns the raw Set-Cookie header and the token.
pub async fn login(base: &str) -> (String, String) {
    let r = client()
        .post(format!("{base}/admin/api/login"))
        .json(&serde_json::json!({"username": "admin", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "login failed");
    let set_cookie = r
        .headers()
        .get("set-cookie")
        .expect("login sets a cookie")
        .to_str()
        .unwrap()
        .to_owned();
    let token = set_cookie
        .split(';')
        .next()
        .and_then(|kv| kv.strip_prefix("ci_session="))
        .expect("cookie ci_session")
        .to_owned();
    (set_cookie, token)
}
