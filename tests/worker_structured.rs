//! Structured output end to end (issue 16 acceptance): the real worker binary on SmolLM2 Q4_1, driven by
//! the official `openai` Python package (`tests/py/test_worker_structured.py`): pydantic `parse()` on 20
//! schemas streamed and not, 20/20 `json_object` replies, llama-server's `json_schema` / `grammar`
//! fields, and 400s quoting the grammar compiler.

mod common;
mod worker_common;

use worker_common::*;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

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
    let w = Worker::start(
        &common::model(MODEL),
        &["-np", "4", "-c", "4096", "-a", "smol"],
    );
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
