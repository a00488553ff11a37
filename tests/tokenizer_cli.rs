//! `cyber-inference tokenize` end to end: the real binary on real (model and vocab-only) GGUF files, checked
//! against llama.cpp's answers in `../shared/vectors` and the vocab suites.

mod support;

use support::assets::{SMOL_Q4_K_M, model, vocab_dir};
use support::process::bin;

fn tokenize(args: &[&str]) -> (bool, String, String) {
    let data = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .env("CYBER_INFERENCE_DATA_DIR", data.path())
        .arg("tokenize")
        .args(args)
        .output()
        .expect("run cyber-inference");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ids_of_a_model_file_with_and_without_special_parsing() {
    let model = model(SMOL_Q4_K_M);
    let m = model.to_str().expect("utf-8 path");
    // ../shared/vectors/SmolLM2-135M-Instruct.Q4_K_M.gguf.json, parse_special = true
    let (ok, out, err) = tokenize(&[
        "-m",
        m,
        "--ids",
        "--parse-special",
        "<|im_start|>user\nHi<|im_end|>",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "[1, 4093, 198, 26843, 2]\n");
    // parse_special = false: the special text is spelled out in 17 ordinary tokens
    let (ok, out, _) = tokenize(&["-m", m, "--ids", "<|im_start|>user\nHi<|im_end|>"]);
    assert!(ok);
    assert!(
        out.starts_with("[44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 44, 108"),
        "{out}"
    );
    assert_eq!(out.matches(',').count(), 16);
}

#[test]
fn pairs_and_bos_on_a_vocab_only_file() {
    let vocab = vocab_dir().join("ggml-vocab-llama-bpe.gguf");
    let v = vocab.to_str().expect("utf-8 path");
    // llama-bpe adds BOS 128000; "Hello world" is `9906 1917` in ggml-vocab-llama-bpe.gguf.out
    let (ok, out, err) = tokenize(&["-m", v, "Hello world"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "128000 -> '<|begin_of_text|>'\n  9906 -> 'Hello'\n  1917 -> ' world'\n"
    );
    let (ok, out, _) = tokenize(&["-m", v, "--no-bos", "--ids", "--", "-Hello world"]);
    assert!(ok);
    assert!(out.starts_with('[') && !out.contains("128000"), "{out}");
}

#[test]
fn a_missing_or_bad_file_is_an_error() {
    let (ok, _, err) = tokenize(&["-m", "/nonexistent.gguf", "x"]);
    assert!(!ok);
    assert!(err.contains("nonexistent.gguf"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"not a gguf file at all").expect("write");
    let (ok, _, err) = tokenize(&["-m", bad.to_str().expect("path"), "x"]);
    assert!(!ok);
    assert!(err.contains("GGUF"), "{err}");
}
