//! Helpers of the synthetic-model tests: regenerates a model with `scripts/synth-models` (deterministic,
//! checked against the sha256 in its vectors) and reads `tests/vectors/synth/NAME.json`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use cyber_inference::engine::model::{Model, ModelParams};
use sha2::{Digest, Sha256};

/// Every synthetic model (the names of `scripts/synth-models --list`).
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
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/synth"))
}

/// `tests/vectors/synth/NAME.json` parsed.
pub fn vectors(name: &str) -> serde_json::Value {
    let p = vectors_dir().join(format!("{name}.json"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

/// The Python that runs the generator: `$CYBER_INFERENCE_PYTHON` (the venv `.ci/run` makes, with numpy
/// and PyPI `gguf`), else `python3`.
fn python() -> String {
    std::env::var("CYBER_INFERENCE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    hex::encode(Sha256::digest(&bytes))
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
        .unwrap_or_else(|e| panic!("cannot run {py}: {e} (set CYBER_INFERENCE_PYTHON to a Python with numpy and gguf; .ci/run makes one)"));
    assert!(
        check.status.success(),
        "{py} lacks numpy or gguf (pip install numpy gguf==0.19.0; .ci/run installs them into CYBER_INFERENCE_PYTHON's venv): {}",
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

/// Loads synthetic model `name` (regenerating it when needed).
pub fn load(name: &str) -> Arc<Model> {
    let p = model_file(name);
    Model::load(&p, &ModelParams { n_threads: 2 })
        .unwrap_or_else(|e| panic!("loading {}: {e}", p.display()))
}

/// Index of the largest value (the first of equal ones, as numpy's argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Natural-log softmax probabilities of `ids` in `logits` (sum in f64).
pub fn logprobs(logits: &[f32], ids: &[usize]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln();
    ids.iter().map(|&i| logits[i] as f64 - lse).collect()
}
