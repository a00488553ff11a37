//! Fuzz-style properties on the SmolLM2 (BPE, `smollm` pre-tokenizer) vocabulary: arbitrary bytes (valid and
//! invalid UTF-8, converted lossily) never make encode/decode panic, valid text round-trips through
//! encode → decode and through the streaming decoder, and arbitrary ids never panic the decoders.

mod support;

use std::sync::OnceLock;

use cyber_inference::engine::gguf::GgufFile;
use cyber_inference::engine::tokenizer::{StreamDecoder, Tokenizer};
use proptest::prelude::*;
use support::assets::{SMOL_Q4_K_M, model};

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = model(SMOL_Q4_K_M);
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tokenizer::from_gguf(&f).expect("tokenizer")
    })
}

/// Bytes that some token stands for on its own: text made only of these can be encoded without loss
/// (llama.cpp drops the bytes of a byte-level BPE vocabulary that has no token for them, e.g. 0xF1 here).
fn byte_covered() -> &'static [bool; 256] {
    static COVER: OnceLock<[bool; 256]> = OnceLock::new();
    COVER.get_or_init(|| {
        let tok = tokenizer();
        let mut cover = [false; 256];
        for id in 0..tok.n_vocab() as u32 {
            if let [b] = tok.token_to_piece(id, true)[..] {
                cover[b as usize] = true;
            }
        }
        cover
    })
}

fn stream(tok: &Tokenizer, ids: &[u32], special: bool) -> String {
    let mut dec = StreamDecoder::with_special(tok, special);
    let mut out: String = ids.iter().map(|&id| dec.push(id)).collect();
    out.push_str(&dec.finish());
    out
}

/// Byte strings biased towards the interesting: ASCII, multi-byte characters, special-token text, and
/// stray continuation/lead bytes.
fn text_bytes() -> impl Strategy<Value = Vec<u8>> {
    let atom = prop_oneof![
        any::<u8>().prop_map(|b| vec![b]),
        "[ a-zA-Z0-9'.,!?\\n\\t]{1,8}".prop_map(String::into_bytes),
        any::<char>().prop_map(|c| c.to_string().into_bytes()),
        Just(b"<|im_start|>".to_vec()),
        Just(b"<|im_end|>".to_vec()),
        Just("é😀中".as_bytes().to_vec()),
        Just(vec![0xE2, 0x82]),
        Just(vec![0x80]),
    ];
    prop::collection::vec(atom, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_decode_never_panic_and_round_trip(bytes in text_bytes()) {
        let tok = tokenizer();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        for (add, parse) in [(false, false), (false, true), (true, false), (true, true)] {
            let ids = tok.encode(&text, add, parse);
            prop_assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
            let whole = tok.decode(&ids, true);
            prop_assert_eq!(&stream(tok, &ids, true), &whole);
            // SmolLM2 adds no BOS/EOS and does not clean spaces: representable text comes back exactly
            if text.bytes().all(|b| byte_covered()[b as usize]) {
                prop_assert_eq!(&whole, &text);
            }
        }
    }

    #[test]
    fn arbitrary_ids_never_panic(ids in prop::collection::vec(any::<u32>(), 0..32), special in any::<bool>()) {
        let tok = tokenizer();
        let whole = tok.decode(&ids, special);
        let streamed = stream(tok, &ids, special);
        // both are valid UTF-8 by construction; the stream never yields more replacement characters than
        // there are bytes
        let n_bytes: usize = ids.iter().map(|&id| tok.token_to_piece(id, special).len()).sum();
        let replacements = streamed.chars().filter(|&c| c == char::REPLACEMENT_CHARACTER).count();
        prop_assert!(replacements <= n_bytes);
        prop_assert!(whole.len() <= 3 * n_bytes + 3);
    }

    #[test]
    fn stream_matches_decode_on_byte_tokens(text in "\\PC{0,16}") {
        // encode text that splits multi-byte characters across byte tokens, then stream it back
        let tok = tokenizer();
        let ids = tok.encode(&text, false, false);
        prop_assert_eq!(stream(tok, &ids, false), tok.decode(&ids, false));
    }
}
