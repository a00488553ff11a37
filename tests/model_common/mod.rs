//! Helpers shared by the `model_*` end-to-end tests: asset paths and reference vectors.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use cyber_inference::engine::model::{Model, ModelParams};

/// The folder of test assets (`$CYBER_INFERENCE_ASSETS`); panics with a clear message when unset.
pub fn assets() -> PathBuf {
    PathBuf::from(std::env::var("CYBER_INFERENCE_ASSETS").expect(
        "CYBER_INFERENCE_ASSETS must name the folder of test assets (see ../shared/assets/fetch)",
    ))
}

/// `$CYBER_INFERENCE_ASSETS/models/NAME`.
pub fn model_path(name: &str) -> PathBuf {
    assets().join("models").join(name)
}

/// Loads a shared model.
pub fn load(name: &str) -> Arc<Model> {
    let p = model_path(name);
    Model::load(&p, &ModelParams { n_threads: 1 })
        .unwrap_or_else(|e| panic!("loading {}: {e}", p.display()))
}

/// The reference vectors directory (`../shared/vectors`).
pub fn vectors_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors"))
}

/// `../shared/vectors/NAME.json` parsed.
pub fn vectors(name: &str) -> serde_json::Value {
    let p = vectors_dir().join(format!("{name}.json"));
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

pub const SMOL_Q4_1: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOL_Q4_K_M: &str = "SmolLM2-135M-Instruct.Q4_K_M.gguf";
pub const MINILM: &str = "all-MiniLM-L6-v2.F16.gguf";
pub const GEMMA3: &str = "gemma-3-270m.Q4_K_M.gguf";
