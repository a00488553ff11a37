//! Where the tests' inputs are: the fetched assets (`$CYBER_INFERENCE_ASSETS`: models, vocabularies,
//! templates, quantized files), llama.cpp's answers in `../shared/vectors` and this repository's files.

use std::path::PathBuf;

use super::files::read_json;

/// SmolLM2-135M-Instruct in Q4_1 (the supervisor and worker tests' chat model).
pub const SMOL_Q4_1: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SmolLM2-135M-Instruct in Q4_K_M.
pub const SMOL_Q4_K_M: &str = "SmolLM2-135M-Instruct.Q4_K_M.gguf";
/// The BERT embedding model.
pub const MINILM: &str = "all-MiniLM-L6-v2.F16.gguf";
/// Gemma 3 (sliding-window attention, no chat template of its own).
pub const GEMMA3: &str = "gemma-3-270m.Q4_K_M.gguf";
/// The shared model files every GGUF reader test covers (each with `NAME.inspect.json` in the vectors).
pub const MODELS: [&str; 3] = [SMOL_Q4_1, SMOL_Q4_K_M, MINILM];

/// The folder filled by `../shared/assets/fetch` (env `CYBER_INFERENCE_ASSETS`); panics with a clear
/// message when unset.
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("CYBER_INFERENCE_ASSETS").expect(
        "CYBER_INFERENCE_ASSETS is not set: run ../shared/assets/fetch and export the folder it prints (.ci/run does)",
    );
    PathBuf::from(dir)
}

/// `$CYBER_INFERENCE_ASSETS/models/NAME`; panics when the file is missing.
pub fn model(name: &str) -> PathBuf {
    let p = assets().join("models").join(name);
    assert!(p.is_file(), "missing test model {}", p.display());
    p
}

/// `$CYBER_INFERENCE_ASSETS/templates/NAME` (a chat template file); panics when the file is missing.
pub fn template(name: &str) -> PathBuf {
    let p = assets().join("templates").join(name);
    assert!(p.is_file(), "missing test template {}", p.display());
    p
}

/// `$CYBER_INFERENCE_ASSETS/vocab` (llama.cpp's `ggml-vocab-*.gguf` with their `.inp`/`.out` suites).
pub fn vocab_dir() -> PathBuf {
    assets().join("vocab")
}

/// `../shared/vectors` (llama.cpp's answers).
pub fn shared_vectors_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors"))
}

/// `../shared/vectors/NAME`.
pub fn shared_vector(name: &str) -> PathBuf {
    shared_vectors_dir().join(name)
}

/// `../shared/vectors/NAME` parsed as JSON.
pub fn shared_vector_json(name: &str) -> serde_json::Value {
    read_json(&shared_vector(name))
}

/// `REL` in this repository (`CARGO_MANIFEST_DIR/REL`).
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}
