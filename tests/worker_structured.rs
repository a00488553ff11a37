//! Structured output end to end (issue 16 acceptance): the real worker binary on SmolLM2 Q4_1, driven by
//! the official `openai` Python package (`tests/py/test_worker_structured.py`): pydantic `parse()` on 20
//! schemas streamed and not, 20/20 `json_object` replies, llama-server's `json_schema` / `grammar`
//! fields, and 400s quoting the grammar compiler.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cyber-inference");
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A running worker; killed on drop.
struct Worker {
    child: Child,
    base: String,
    log: tempfile::NamedTempFile,
}

impl Worker {
    fn start(model: &Path) -> Worker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(BIN)
            .arg("worker")
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "2", "-np", "2", "-c", "4096", "-a", "smol"])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut w = Worker {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = w.child.try_wait().unwrap() {
                panic!("worker exited with {st} before ready:\n{}", w.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready in 120 s:\n{}",
                w.stderr()
            );
            if let Ok(mut s) = std::net::TcpStream::connect(w.base.trim_start_matches("http://")) {
                use std::io::Write;
                let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") {
                    return w;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        let mut s = String::new();
        let _ = self.log.reopen().unwrap().read_to_string(&mut s);
        s
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn openai_client_gets_schema_valid_replies_and_compiler_errors() {
    let python = std::env::var("CYBER_INFERENCE_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/cyber-inference-venv/bin/python")
    });
    assert!(
        Path::new(&python).exists(),
        "no Python with the openai package at {python}: set CYBER_INFERENCE_PYTHON (.ci/run does)"
    );
    let w = Worker::start(&common::model(MODEL));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/test_worker_structured.py"
    );
    let t = Instant::now();
    let out = Command::new(&python)
        .arg(script)
        .arg(&w.base)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && so.contains("ALL OK"),
        "python failed after {:.0?}\nstdout:\n{so}\nstderr:\n{se}\nworker log:\n{}",
        t.elapsed(),
        w.stderr()
    );
    eprintln!("{so}");
}
