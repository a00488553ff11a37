//! Helpers shared by the integration tests: where the real assets and llama.cpp's vectors are.
#![allow(dead_code)]

use std::path::PathBuf;

/// The folder filled by `../shared/assets/fetch` (env `CYBER_INFERENCE_ASSETS`).
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("CYBER_INFERENCE_ASSETS").expect(
        "CYBER_INFERENCE_ASSETS is not set: run ../shared/assets/fetch and export its output (.ci/run does)",
    );
    PathBuf::from(dir)
}

/// `$CYBER_INFERENCE_ASSETS/models/NAME`.
pub fn model(name: &str) -> PathBuf {
    let p = assets().join("models").join(name);
    assert!(p.is_file(), "missing test model {}", p.display());
    p
}

/// The shared model files.
pub const MODELS: [&str; 3] = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct.Q4_K_M.gguf",
    "all-MiniLM-L6-v2.F16.gguf",
];

/// `../shared/vectors/NAME` (llama.cpp's answers).
pub fn vector(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors")).join(name)
}

/// Parses a vectors JSON file.
pub fn vector_json(name: &str) -> serde_json::Value {
    let p = vector(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
