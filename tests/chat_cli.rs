//! `cyber-inference chat-template` end to end: the real binary on the real model files prints the
//! prompt llama.cpp makes (`../shared/vectors/<model>.json`, `chat_template` cases).

mod support;

use std::path::PathBuf;

use support::assets::{SMOL_Q4_K_M, model as asset_model, shared_vector_json};
use support::process::{bin, stdout_of};

fn model() -> PathBuf {
    asset_model(SMOL_Q4_K_M)
}

fn cli(args: &[&str]) -> std::process::Output {
    bin().args(args).output().expect("run cyber-inference")
}

/// `cyber-inference ARGS…`, which must succeed; its stdout.
fn cli_ok(args: &[&str]) -> String {
    stdout_of(bin().args(args))
}

#[test]
fn prints_the_prompt_llama_cpp_makes() {
    let v = shared_vector_json(&format!("{SMOL_Q4_K_M}.json"));
    let cases = v["chat_template"].as_array().unwrap();
    assert!(!cases.is_empty());
    let model = model();
    for case in cases {
        let messages = case["messages"].to_string();
        let out = cli_ok(&[
            "chat-template",
            "-m",
            model.to_str().unwrap(),
            "--messages",
            &messages,
        ]);
        assert_eq!(out, case["prompt"].as_str().unwrap());
    }
}

#[test]
fn no_generation_prompt_leaves_the_assistant_turn_closed() {
    let model = model();
    let out = cli_ok(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        "--messages",
        r#"[{"role":"system","content":"S"},{"role":"user","content":"U"}]"#,
        "--no-generation-prompt",
    ]);
    assert_eq!(
        out,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    );
}

#[test]
fn bad_input_fails_with_a_message() {
    let model = model();
    let out = cli(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        "--messages",
        "{\"role\":1}",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON array"));

    let out = cli(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        "--messages",
        r#"[{"role":"user","content":"x"}]"#,
        "--chat-template",
        "{{ raise_exception('only odd turns please') }}",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only odd turns please"), "{err}");

    let out = cli(&[
        "chat-template",
        "-m",
        "/nonexistent.gguf",
        "--messages",
        "[]",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.gguf"));
}

#[test]
fn builtin_formats_are_selectable_by_name() {
    let model = model();
    let out = cli_ok(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        "--messages",
        r#"[{"role":"user","content":" Hi "}]"#,
        "--chat-template",
        "llama3",
    ]);
    assert_eq!(
        out,
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}
