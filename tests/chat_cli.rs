//! `cyber-inference chat-template` end to end: the real binary on the real model files prints the
//! prompt llama.cpp makes (`../shared/vectors/<model>.json`, `chat_template` cases).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value as Json;

fn assets() -> PathBuf {
    PathBuf::from(std::env::var("CYBER_INFERENCE_ASSETS").expect(
        "CYBER_INFERENCE_ASSETS is not set: point it at the folder made by ../shared/assets/fetch",
    ))
}

fn model() -> PathBuf {
    assets()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_K_M.gguf")
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cyber-inference"))
        .args(args)
        .output()
        .expect("run cyber-inference")
}

#[test]
fn prints_the_prompt_llama_cpp_makes() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vectors/SmolLM2-135M-Instruct.Q4_K_M.gguf.json"
    ));
    let v: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = v["chat_template"].as_array().unwrap();
    assert!(!cases.is_empty());
    let model = model();
    for case in cases {
        let messages = case["messages"].to_string();
        let out = cli(&[
            "chat-template",
            "-m",
            model.to_str().unwrap(),
            "--messages",
            &messages,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            case["prompt"].as_str().unwrap()
        );
    }
}

#[test]
fn no_generation_prompt_leaves_the_assistant_turn_closed() {
    let model = model();
    let out = cli(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        "--messages",
        r#"[{"role":"system","content":"S"},{"role":"user","content":"U"}]"#,
        "--no-generation-prompt",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
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
    let out = cli(&[
        "chat-template",
        "-m",
        model.to_str().unwrap(),
        "--messages",
        r#"[{"role":"user","content":" Hi "}]"#,
        "--chat-template",
        "llama3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}
