//! Helpers of the synthetic-model tests: regenerates a model with `scripts/synth-models` (deterministic,
//! checked against the sha256 in its vectors) and reads `tests/vectors/synth/NAME.json`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use cyber_inference::engine::model::Model;

use super::assets::repo_path;
use super::files::{read_json, sha256_file};
use super::model::load_path;
use super::python::python;

/// Every synthetic decoder (the names of `scripts/synth-models --list` but the reranker
/// `synth-bert-rerank`, which `tests/worker_rerank.rs` tests).
pub const MODELS: [&str; 8] = [
    "synth-llama",
    "synth-llama3",
    "synth-mixtral",
    "synth-qwen2",
    "synth-qwen3",
    "synth-qwen2moe",
    "synth-qwen3moe",
    "synth-phi3",
];

/// `tests/vectors/synth`.
pub fn vectors_dir() -> PathBuf {
    repo_path("tests/vectors/synth")
}

/// `tests/vectors/synth/NAME.json` parsed.
pub fn vectors(name: &str) -> serde_json::Value {
    read_json(&vectors_dir().join(format!("{name}.json")))
}

static GENERATE: Mutex<()> = Mutex::new(());

/// The path of synthetic model `name`, written by `scripts/synth-models` into
/// `$CARGO_TARGET_TMPDIR/synth` when not already there with the sha256 its vectors record. Panics with a
/// clear message when the generator cannot run (no Python with numpy and gguf, no
/// `CYBER_INFERENCE_ASSETS`) or writes different bytes.
pub fn model_file(name: &str) -> PathBuf {
    let want = vectors(name)["sha256"]
        .as_str()
        .expect("vectors without sha256")
        .to_string();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("synth");
    let path = dir.join(format!("{name}.gguf"));
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if path.is_file() && sha256_file(&path) == want {
        return path;
    }
    let py = python();
    let check = Command::new(&py)
        .args(["-c", "import numpy, gguf"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (set CYBER_INFERENCE_PYTHON to a Python with numpy and gguf; .ci/run makes one)", py.display()));
    assert!(
        check.status.success(),
        "{} lacks numpy or gguf (pip install numpy gguf==0.19.0; .ci/run installs them into CYBER_INFERENCE_PYTHON's venv): {}",
        py.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::create_dir_all(&dir).expect("create the synth folder");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/synth-models");
    let out = Command::new(&py)
        .arg(script)
        .arg(&dir)
        .arg(name)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sha256_file(&path);
    assert_eq!(
        got, want,
        "{name}: scripts/synth-models wrote different bytes than the recorded file (a different gguf/numpy \
         version?); regenerate the vectors with `scripts/synth-models --record tests/vectors/synth DIR`"
    );
    path
}

/// Loads synthetic model `name` (regenerating it when needed) with two threads.
pub fn load(name: &str) -> Arc<Model> {
    load_path(&model_file(name), 2)
}
