//! End-to-end check of chat templates against llama.cpp's own renderings
//! (`../shared/vectors/templates.json` and the `chat_template` cases of each model's vector file).

mod support;

use std::collections::BTreeMap;

use cyber_inference::engine::chat::{ChatTemplate, RenderOptions};
use cyber_inference::engine::gguf::GgufFile;
use serde_json::Value as Json;
use support::assets::{MODELS, model, shared_vector_json, template};
use time::OffsetDateTime;

/// The vectors were rendered on 2026-11-23 (UTC).
fn vector_options() -> RenderOptions {
    RenderOptions {
        now: Some(OffsetDateTime::from_unix_timestamp(1_795_437_296).unwrap()),
        ..RenderOptions::default()
    }
}

/// Renders every case and returns `name#index → (expected, got or error)` for the mismatches.
fn mismatches(
    template: &ChatTemplate,
    name: &str,
    cases: &[Json],
) -> BTreeMap<String, (String, String)> {
    let mut bad = BTreeMap::new();
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().expect("messages array");
        let mut opts = vector_options();
        opts.add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap_or(true);
        let expected = case["prompt"].as_str().expect("prompt string").to_string();
        let got = match template.render(messages, &opts) {
            Ok(s) => s,
            Err(e) => format!("ERROR: {e}"),
        };
        if got != expected {
            bad.insert(format!("{name}#{i}"), (expected, got));
        }
    }
    bad
}

#[test]
fn real_templates_render_like_llama_cpp() {
    let v = shared_vector_json("templates.json");
    let bos = v["bos_token"].as_str().unwrap();
    let eos = v["eos_token"].as_str().unwrap();
    let templates = v["templates"].as_object().unwrap();
    let mut total = 0;
    let mut failed = BTreeMap::new();
    for (name, cases) in templates {
        let cases = cases.as_array().unwrap();
        total += cases.len();
        let path = template(name);
        let source =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match ChatTemplate::new(&source, bos, eos) {
            Ok(t) => failed.extend(mismatches(&t, name, cases)),
            Err(e) => {
                for i in 0..cases.len() {
                    failed.insert(
                        format!("{name}#{i}"),
                        (String::new(), format!("COMPILE ERROR: {e}")),
                    );
                }
            }
        }
    }
    for (case, (expected, got)) in &failed {
        eprintln!("--- {case}\nexpected: {expected:?}\n     got: {got:?}");
    }
    eprintln!("{} of {total} renderings identical", total - failed.len());
    assert_eq!(total, 235, "the vector file changed");
    assert!(
        failed.is_empty(),
        "{} renderings differ: {:?}",
        failed.len(),
        failed.keys().collect::<Vec<_>>()
    );
}

#[test]
fn model_templates_render_like_llama_cpp() {
    for name in MODELS {
        let v = shared_vector_json(&format!("{name}.json"));
        let Some(cases) = v["chat_template"].as_array() else {
            continue; // the embedding model has no chat cases
        };
        let file = GgufFile::open(model(name)).unwrap();
        let template = ChatTemplate::from_gguf(&file).unwrap();
        assert_eq!(template.bos_token(), "<|im_start|>");
        assert_eq!(template.eos_token(), "<|im_end|>");
        let bad = mismatches(&template, name, cases);
        assert!(bad.is_empty(), "{name}: {bad:#?}");
        assert!(!cases.is_empty());
    }
}
