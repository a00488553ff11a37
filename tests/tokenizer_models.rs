//! The `tokenize` cases of `../shared/vectors/<model>.json` (llama-server `POST /tokenize` with pieces, all four
//! add_special/parse_special combinations) must give identical ids and pieces for every model in the assets.

mod support;

use cyber_inference::engine::gguf::GgufFile;
use cyber_inference::engine::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;
use support::assets::model;
use support::model::vectors;

fn load(file: &str) -> (Tokenizer, Value) {
    let f = GgufFile::open(model(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    let tok = Tokenizer::from_gguf(&f).unwrap_or_else(|e| panic!("{file}: {e}"));
    (tok, vectors(file))
}

/// A piece as the vectors write it: the text, or the byte values where the token alone is not UTF-8.
fn piece_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => Value::Array(bytes.iter().map(|&b| Value::from(b)).collect()),
    }
}

fn check_model(file: &str) {
    let (tok, json) = load(file);
    let cases = json["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let add = c["add_special"].as_bool().expect("add_special");
        let parse = c["parse_special"].as_bool().expect("parse_special");
        let want: Vec<u32> = c["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let got = tok.encode(text, add, parse);
        if got != want {
            failures.push(format!(
                "{text:?} add={add} parse={parse}\n  want {want:?}\n  got  {got:?}"
            ));
            continue;
        }
        let want_pieces = c["pieces"].as_array().expect("pieces");
        let got_pieces: Vec<Value> = got
            .iter()
            .map(|&id| piece_json(&tok.token_to_piece(id, true)))
            .collect();
        if &got_pieces != want_pieces {
            failures.push(format!(
                "{text:?} pieces\n  want {want_pieces:?}\n  got  {got_pieces:?}"
            ));
        }
    }
    eprintln!(
        "{file}: {}/{} tokenize cases match",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{file}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_q4_k_m_tokenize_vectors() {
    check_model("SmolLM2-135M-Instruct.Q4_K_M.gguf");
}

#[test]
fn smollm2_q4_1_tokenize_vectors() {
    check_model("SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn minilm_tokenize_vectors() {
    check_model("all-MiniLM-L6-v2.F16.gguf");
}

#[test]
fn gemma3_tokenize_vectors() {
    check_model("gemma-3-270m.Q4_K_M.gguf");
}

#[test]
fn gemma3_generated_text_and_pieces() {
    check_generation_text("gemma-3-270m.Q4_K_M.gguf");
}

#[test]
fn smollm2_special_tokens() {
    let (tok, _) = load("SmolLM2-135M-Instruct.Q4_K_M.gguf");
    assert_eq!(tok.n_vocab(), 49152);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert!(!tok.add_bos());
    assert!(tok.is_eog(2), "<|im_end|> ends generation");
    assert!(tok.is_eog(0), "<|endoftext|> ends generation");
    assert!(!tok.is_eog(1));
    assert_eq!(tok.token_text(1), Some("<|im_start|>"));
    assert_eq!(tok.token_text(49152), None);
}

#[test]
fn smollm2_decode_round_trips_and_streams() {
    let (tok, json) = load("SmolLM2-135M-Instruct.Q4_K_M.gguf");
    for c in json["tokenize"].as_array().expect("cases") {
        let text = c["text"].as_str().expect("text");
        let ids = tok.encode(text, false, true);
        assert_eq!(tok.decode(&ids, true), text, "decode of {ids:?}");
        let mut dec = StreamDecoder::with_special(&tok, true);
        let mut streamed: String = ids.iter().map(|&id| dec.push(id)).collect();
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, text, "streamed decode of {ids:?}");
    }
}

#[test]
fn minilm_special_tokens() {
    let (tok, _) = load("all-MiniLM-L6-v2.F16.gguf");
    assert_eq!(tok.bos(), Some(101));
    assert_eq!(tok.sep(), Some(102));
    assert_eq!(tok.encode("", true, false), vec![101, 102]);
    // llama.cpp keeps the word-start space of the first WordPiece token (add_space_prefix is false for WPM)
    assert_eq!(
        tok.decode(&tok.encode("Hello world", false, false), false),
        " hello world"
    );
}

/// llama-server's generated text is the concatenation of the generated tokens' pieces: the streaming
/// decoder and `decode` must reproduce it. Every piece in the top-10 lists must match `token_to_piece` as the
/// server renders it there: without special tokens, an incomplete UTF-8 tail cut off (`validate_utf8`).
fn server_prob_piece(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn check_generation_text(file: &str) {
    let (tok, json) = load(file);
    let cases = json["greedy"].as_array().expect("greedy cases");
    assert!(!cases.is_empty());
    let mut n_pieces = 0;
    for c in cases {
        let ids: Vec<u32> = c["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let text = c["text"].as_str().expect("text");
        let mut dec = StreamDecoder::new(&tok);
        let mut streamed: String = ids.iter().map(|&id| dec.push(id)).collect();
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, text, "streamed {ids:?}");
        assert_eq!(tok.decode(&ids, false), text, "decoded {ids:?}");
        for step in c["top_logprobs_first16"].as_array().expect("top lists") {
            for e in step.as_array().expect("top list") {
                let id = e["id"].as_u64().expect("id") as u32;
                let got = server_prob_piece(&tok.token_to_piece(id, false));
                assert_eq!(e["piece"].as_str(), Some(got.as_str()), "piece of {id}");
                n_pieces += 1;
            }
        }
    }
    assert!(n_pieces > 1000, "{n_pieces} pieces checked");
}

#[test]
fn smollm2_q4_k_m_generated_text_and_pieces() {
    check_generation_text("SmolLM2-135M-Instruct.Q4_K_M.gguf");
}

#[test]
fn smollm2_q4_1_generated_text_and_pieces() {
    check_generation_text("SmolLM2-135M-Instruct.Q4_1.gguf");
}
