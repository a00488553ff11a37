//! One worker process: it is spawned here (argv from [`SupervisedArgs`], a cleared environment, the key
//! through the environment), its output is captured, its exit watched, its readiness and health probed
//! and its signals sent. The manager (`manager.rs`) only decides what to load, evict or stop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::sys;
use crate::supervisor::db::now_ms;
use crate::supervisor::events::{Event, Events};
use crate::supervisor::logs::{LogBuffer, RotatingFile};
use crate::worker::SupervisedArgs;

/// Seconds a worker gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(super::STOP_GRACE_SECS);

/// The only variables of the supervisor's environment a worker inherits (when set): locale, paths,
/// Rust's own knobs, the engine's, and those that choose the GPU adapter: the worker's `--device`
/// (`CYBER_INFERENCE_DEVICE`), the Vulkan loader's driver and layer lists (`VK_*`; `XDG_DATA_DIRS` is where
/// it looks for drivers), the NVIDIA and Mesa drivers' device selection, and lavapipe's thread count.
/// Everything else — ADMIN_PASSWORD, JWT_SECRET, HF_TOKEN, cloud credentials — stays in the supervisor. The
/// worker also gets `CYBER_INFERENCE_LOG_LEVEL` and its key ([`crate::worker::WORKER_API_KEY_ENV`]).
pub const WORKER_ENV_ALLOW: [&str; 22] = [
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    crate::engine::kernels::ISA_ENV,
    "CYBER_INFERENCE_DUMP_DIR",
    "CYBER_INFERENCE_DEVICE",
    "XDG_DATA_DIRS",
    "VK_ICD_FILENAMES",
    "VK_DRIVER_FILES",
    "VK_ADD_DRIVER_FILES",
    "VK_INSTANCE_LAYERS",
    "VK_LOADER_DEBUG",
    "CUDA_VISIBLE_DEVICES",
    "MESA_VK_DEVICE_SELECT",
    "LP_NUM_THREADS",
];

/// What a worker's `/props` says runs its model (its `backend` object, the engine's `BackendInfo`), as
/// the supervisor keeps it for the admin API, the dashboard and the memory admission. Fields the worker
/// does not send are their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WorkerBackend {
    /// `"cpu"`, `"vulkan"` or `"metal"`.
    pub name: String,
    /// The adapter's name as its driver reports it (none on the CPU).
    pub adapter: Option<String>,
    /// `"discrete"`, `"integrated"`, `"virtual"`, `"cpu"` (a software rasterizer such as lavapipe) or
    /// `"other"` (none on the CPU).
    pub device_type: Option<String>,
    /// The `-ngl` the worker was given.
    pub n_gpu_layers: i32,
    /// Repeating layers on the GPU.
    pub offloaded_layers: u64,
    /// Repeating layers of the model.
    pub n_layer: u64,
    /// Whether the output layer runs on the GPU.
    pub output_offloaded: bool,
    /// Bytes of weights on the device (the KV cache comes on top).
    pub device_weight_bytes: u64,
    /// Why `-ngl` was not honoured (no adapter, …).
    pub fallback_reason: Option<String>,
}

impl WorkerBackend {
    /// The `backend` object of a `/props` answer; `None` when it has none (a worker of an older build,
    /// or still loading) or it is malformed.
    pub fn from_props(props: &serde_json::Value) -> Option<WorkerBackend> {
        props
            .get("backend")
            .filter(|b| b.is_object())
            .and_then(|b| serde_json::from_value(b.clone()).ok())
    }

    /// Whether layers run on a GPU.
    pub fn is_gpu(&self) -> bool {
        !self.name.is_empty() && self.name != "cpu"
    }

    /// Whether the layers on the GPU live in memory of their own (not a software rasterizer such as
    /// lavapipe, nor the CPU, whose "device" memory is host RAM).
    pub fn has_device_memory(&self) -> bool {
        self.is_gpu() && self.device_type.as_deref() != Some("cpu")
    }

    /// One line for the dashboard: `vulkan · NVIDIA H100 80GB HBM3 · 30/30 layers + output`, or `cpu`
    /// (with why, when `-ngl` asked for a GPU).
    pub fn summary(&self) -> String {
        if !self.is_gpu() {
            let name = if self.name.is_empty() {
                "cpu"
            } else {
                &self.name
            };
            return match &self.fallback_reason {
                Some(why) => format!("{name} ({why})"),
                None => name.to_owned(),
            };
        }
        format!(
            "{} · {} · {}/{} layers{}",
            self.name,
            self.adapter.as_deref().unwrap_or("unnamed adapter"),
            self.offloaded_layers,
            self.n_layer,
            if self.output_offloaded {
                " + output"
            } else {
                ""
            }
        )
    }
}

/// A fresh random key for one worker process (256 bits, URL-safe base64).
fn worker_key() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// How a worker process ended (exit status or signal, as text).
pub(super) type ExitInfo = String;

/// One running (or starting) worker process, shared (`Arc`) by its slot, its leases and its tasks.
pub(super) struct WorkerProcess {
    pub(super) pid: u32,
    pub(super) port: u16,
    /// The Bearer key this process requires (given through its environment, never argv).
    pub(super) key: Arc<str>,
    pub(super) instance: String,
    pub(super) session_id: i64,
    pub(super) model_id: i64,
    pub(super) started: Instant,
    pub(super) started_ms: i64,
    /// Set when the supervisor asked it to stop (so its exit is not a crash), with the reason.
    pub(super) stop_reason: Mutex<Option<String>>,
    pub(super) exited: watch::Receiver<Option<ExitInfo>>,
    /// Set (with the reason) when the supervisor cuts this worker's in-flight requests: every
    /// [`super::Lease`] holder ends its stream with an error.
    pub(super) cut: watch::Sender<Option<String>>,
    /// Health probes in a row that got no answer.
    pub(super) health_failures: AtomicU32,
    /// Set the moment the supervisor kills the process or it is reaped, before its exit is processed
    /// (`Manager::on_exit` runs after the last output lines are read): no new lease goes to a worker
    /// that is gone.
    pub(super) gone: AtomicBool,
    /// Set while a request to this worker failed in transport (reset, closed mid-body) and no health
    /// probe has answered since: no new lease goes to it until one does or it is found gone. A process
    /// dying from a signal resets the connections the kernel accepted for it before its listening
    /// socket closes, so a request leased in that window would fail too ([`super::Lease::transport_failed`]).
    pub(super) suspect: AtomicBool,
    /// What runs its model, from its `/props` once ready (unset while loading, or when the worker sent
    /// none).
    pub(super) backend: OnceLock<WorkerBackend>,
}

/// What [`WorkerProcess::spawn`] starts.
pub(super) struct Spawn<'a> {
    /// The executable (`exe worker …`).
    pub exe: &'a Path,
    pub args: SupervisedArgs,
    /// `CYBER_INFERENCE_LOG_LEVEL` of the worker.
    pub log_level: String,
    pub session_id: i64,
    pub model_id: i64,
    /// The model's log ring: the command line, then every output line.
    pub logs: Arc<LogBuffer>,
    /// The model's rotating log file.
    pub log_file: PathBuf,
    pub events: Events,
}

impl WorkerProcess {
    /// Starts `exe worker ARGS` with a cleared environment ([`WORKER_ENV_ALLOW`], the log level and a
    /// fresh key), captures its stdout and stderr line by line into the model's log ring, file and
    /// events, and watches its exit: the moment it is reaped it is marked gone, 50 ms later (for its
    /// last lines) `on_exit` gets how it ended, then `exited` is set.
    ///
    /// Errors: the spawn's (no such executable, no resources).
    pub(super) fn spawn<F, Fut>(spec: Spawn<'_>, on_exit: F) -> std::io::Result<Arc<WorkerProcess>>
    where
        F: FnOnce(Arc<WorkerProcess>, ExitInfo) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let argv = spec.args.argv();
        let mut cmd = tokio::process::Command::new(spec.exe);
        cmd.arg("worker").args(&argv);
        let key: Arc<str> = worker_key().into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .env_clear();
        for name in WORKER_ENV_ALLOW {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd.env("CYBER_INFERENCE_LOG_LEVEL", &spec.log_level)
            .env(crate::worker::WORKER_API_KEY_ENV, &*key);
        sys::configure_worker_command(&mut cmd);
        let shown: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        spec.logs.push(
            "supervisor",
            format!(
                "starting worker: {} worker {}",
                spec.exe.display(),
                shown.join(" ")
            ),
        );
        let mut child = cmd.spawn()?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let worker = Arc::new(WorkerProcess {
            pid: child.id().unwrap_or(0),
            port: spec.args.port,
            key,
            instance: spec.args.instance.clone(),
            session_id: spec.session_id,
            model_id: spec.model_id,
            started: Instant::now(),
            started_ms: now_ms(),
            stop_reason: Mutex::new(None),
            exited: exit_rx,
            cut: watch::channel(None).0,
            health_failures: 0.into(),
            gone: false.into(),
            suspect: false.into(),
            backend: OnceLock::new(),
        });
        let file = Arc::new(Mutex::new(RotatingFile::open(&spec.log_file)));
        let pipes: [(
            &'static str,
            Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
        ); 2] = [
            ("stdout", child.stdout.take().map(|p| Box::new(p) as _)),
            ("stderr", child.stderr.take().map(|p| Box::new(p) as _)),
        ];
        for (stream, pipe) in pipes {
            let Some(pipe) = pipe else { continue };
            let (logs, file, events) = (spec.logs.clone(), file.clone(), spec.events.clone());
            let model = spec.args.alias.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = crate::supervisor::logs::strip_ansi(&line);
                    file.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .write_line(&format!("{stream}: {line}"));
                    let line = logs.push(stream, line);
                    events.send(Event::Log {
                        model: Some(model.clone()),
                        line,
                    });
                }
            });
        }
        // Exit watcher: the one place that sees a worker's end.
        let w = worker.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            w.gone.store(true, Ordering::Release);
            // Give the pipe readers a moment to capture the last lines.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let text = match status {
                Ok(st) => describe_exit(st),
                Err(e) => format!("wait failed: {e}"),
            };
            on_exit(w, text.clone()).await;
            let _ = exit_tx.send(Some(text));
        });
        Ok(worker)
    }

    /// Waits (at most `timeout`) for `/health` 200 and then `/props` carrying this process's nonce, so
    /// that a stranger on the port is never taken for it; keeps the `backend` of that `/props`
    /// ([`WorkerProcess::backend`]). `Err("")`: the process ended first (its exit says why); `Err(why)`
    /// otherwise.
    pub(super) async fn wait_ready(
        &self,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut exit_rx = self.exited.clone();
        let base = format!("http://127.0.0.1:{}", self.port);
        loop {
            if exit_rx.borrow().is_some() {
                return Err(String::new());
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready within {} s", timeout.as_secs()));
            }
            if let Ok(r) = http.get(format!("{base}/health")).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                let props = http.get(format!("{base}/props")).bearer_auth(&*self.key);
                let p: serde_json::Value = props
                    .send()
                    .await
                    .map_err(|e| format!("/props failed: {e}"))?
                    .json()
                    .await
                    .map_err(|e| format!("bad /props answer: {e}"))?;
                return match p.get("instance").and_then(|v| v.as_str()) {
                    Some(i) if i == self.instance => {
                        if let Some(b) = WorkerBackend::from_props(&p) {
                            let _ = self.backend.set(b);
                        }
                        Ok(())
                    }
                    _ => Err(format!(
                        "port {} answered with another instance ({}) — not our worker",
                        self.port,
                        p.get("instance").map_or("none".into(), |v| v.to_string())
                    )),
                };
            }
            tokio::select! {
                _ = exit_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        }
    }

    /// One `/health` probe within `timeout`: whether any HTTP answer came (a busy worker's 503 is
    /// alive too).
    pub(super) async fn probe(&self, http: &reqwest::Client, timeout: Duration) -> bool {
        http.get(format!("http://127.0.0.1:{}/health", self.port))
            .timeout(timeout)
            .send()
            .await
            .is_ok()
    }

    /// SIGKILL now. The process is gone from this moment for leases: its listening socket may accept
    /// connections until its last thread exits, and those would be reset.
    pub(super) fn kill_now(&self) {
        self.gone.store(true, Ordering::Release);
        let _ = sys::signal_group(self.pid, sys::Signal::SIGKILL);
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; returns when the exit has been processed (or
    /// 5 s after the SIGKILL).
    pub(super) async fn terminate(&self) {
        let _ = sys::signal_group(self.pid, sys::Signal::SIGTERM);
        let mut rx = self.exited.clone();
        if tokio::time::timeout(STOP_GRACE, rx.wait_for(|e| e.is_some()))
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid,
                "worker ignored SIGTERM for {} s; SIGKILL",
                STOP_GRACE.as_secs()
            );
            self.kill_now();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|e| e.is_some())).await;
        }
    }

    /// Waits up to `timeout` for the exit to be processed.
    pub(super) async fn wait_exit(&self, timeout: Duration) {
        let mut rx = self.exited.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|e| e.is_some())).await;
    }
}

fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited".into(),
    }
}

/// A model id made safe as a file name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_sanitized() {
        assert_eq!(sanitize("a/b c.gguf"), "a_b_c.gguf");
    }

    #[test]
    fn the_backend_is_read_from_props() {
        let props = serde_json::json!({"instance": "x", "backend": {
            "name": "vulkan", "adapter": "NVIDIA H100 80GB HBM3", "device_type": "discrete",
            "n_gpu_layers": -1, "offloaded_layers": 30, "n_layer": 30, "output_offloaded": true,
            "device_weight_bytes": 100, "fallback_reason": null, "kv_device_bytes": 7,
        }});
        let b = WorkerBackend::from_props(&props).unwrap();
        assert!(b.is_gpu() && b.has_device_memory());
        assert_eq!(b.device_weight_bytes, 100);
        assert_eq!(
            b.summary(),
            "vulkan · NVIDIA H100 80GB HBM3 · 30/30 layers + output"
        );
        // lavapipe: a GPU backend whose memory is the host's.
        let lvp = WorkerBackend {
            device_type: Some("cpu".into()),
            output_offloaded: false,
            offloaded_layers: 10,
            adapter: Some("llvmpipe (LLVM 15.0.6, 256 bits)".into()),
            ..b.clone()
        };
        assert!(lvp.is_gpu() && !lvp.has_device_memory());
        assert_eq!(
            lvp.summary(),
            "vulkan · llvmpipe (LLVM 15.0.6, 256 bits) · 10/30 layers"
        );
        let cpu = WorkerBackend::from_props(&serde_json::json!({"backend": {
            "name": "cpu", "n_gpu_layers": -1, "n_layer": 30,
            "fallback_reason": "no Vulkan adapter",
        }}))
        .unwrap();
        assert!(!cpu.is_gpu() && !cpu.has_device_memory());
        assert_eq!(cpu.summary(), "cpu (no Vulkan adapter)");
        // No backend (a loading worker's null, an older worker), or a malformed one.
        assert_eq!(
            WorkerBackend::from_props(&serde_json::json!({"backend": null})),
            None
        );
        assert_eq!(WorkerBackend::from_props(&serde_json::json!({})), None);
        assert_eq!(
            WorkerBackend::from_props(&serde_json::json!({"backend": {"n_layer": "many"}})),
            None
        );
    }

    #[test]
    fn the_worker_environment_carries_the_adapter_choice_and_no_secret() {
        for name in [
            "CYBER_INFERENCE_DEVICE",
            "VK_ICD_FILENAMES",
            "VK_DRIVER_FILES",
        ] {
            assert!(WORKER_ENV_ALLOW.contains(&name), "{name}");
        }
        for name in [
            "CYBER_INFERENCE_ADMIN_PASSWORD",
            "CYBER_INFERENCE_JWT_SECRET",
            "CYBER_INFERENCE_HF_TOKEN",
        ] {
            assert!(!WORKER_ENV_ALLOW.contains(&name), "{name}");
        }
    }
}
