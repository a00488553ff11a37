//! Byte-level BPE (`tokenizer.ggml.model = gpt2`, and Gemma 4's `gemma4`): pre-tokenizer regexes chosen by
//! `tokenizer.ggml.pre`, then rank-ordered merges inside each word. Port of `llm_tokenizer_bpe` and
//! `llm_tokenizer_bpe_session` in llama.cpp `src/llama-vocab.cpp` (commit 0c1e570).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::unicode::{Splitter, byte_to_char, regex_split};
use super::{PreType, Vocab};

/// The regex list of a pre-tokenizer (`llm_tokenizer_bpe::llm_tokenizer_bpe`), and whether words are
/// byte-encoded GPT-2 style (false: raw UTF-8 with `<0xNN>` byte tokens, as Gemma 4).
pub(crate) fn regexes(pre: PreType) -> (&'static [&'static str], bool) {
    const GPT2: &str =
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
    const LLAMA3: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    match pre {
        PreType::Llama3 => (&[LLAMA3], true),
        PreType::DeepseekLlm => (
            &[
                "[\r\n]",
                "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
                "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
                "\\s+$",
                "[一-龥ࠀ-一가-퟿]+",
                "\\p{N}+",
            ],
            true,
        ),
        PreType::DeepseekCoder => (
            &[
                "[\r\n]",
                "\\s?\\p{L}+",
                "\\s?\\p{P}+",
                "[一-龥ࠀ-一가-퟿]+",
                "\\p{N}",
            ],
            true,
        ),
        PreType::Falcon => (
            &["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2, "[0-9][0-9][0-9]"],
            true,
        ),
        PreType::Starcoder | PreType::Refact | PreType::CommandR | PreType::Smollm => {
            (&["\\p{N}", GPT2], true)
        }
        PreType::Gpt2 | PreType::Mpt => (&[GPT2], true),
        PreType::Qwen2 => (
            &[
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Qwen35 => (
            &[
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Gemma4 => (&["[^\\n]+|[\\n]+"], false),
        PreType::Deepseek3 => (
            &[
                "\\p{N}{1,3}",
                "[一-龥぀-ゟ゠-ヿ]+",
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Poro => (&[" ?[^(\\s|.,!?…。，、।۔،)]+"], true),
        PreType::Viking => (&[" ?[^(\\s|.,!?…。，、।۔،)]+", "\\p{N}"], true),
        PreType::Tekken => (
            &[
                "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Gpt4o => (
            &[
                "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::SeedCoder => (
            &[
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Bailingmoe => (
            &[
                "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Minicpm5 => (
            &[
                "\\p{N}{1,3}",
                "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            true,
        ),
        PreType::Default => (
            &[
                "[\\p{P}\\$\\+<=>\\^~\\|]+",
                GPT2,
                "\\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            true,
        ),
    }
}

/// A compiled pre-tokenizer.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    pub splitters: Vec<Splitter>,
    pub byte_encode: bool,
}

/// Tokenize one text fragment, appending ids to `out` (`llm_tokenizer_bpe_session::tokenize`).
pub(crate) fn tokenize(vocab: &Vocab, pre: &PreTokenizer, text: &str, out: &mut Vec<u32>) {
    let words = regex_split(text, &pre.splitters);
    for word in words {
        let word = if pre.byte_encode {
            word.bytes().map(byte_to_char).collect::<String>()
        } else {
            word
        };
        tokenize_word(vocab, pre, &word, out);
    }
}

/// Symbols are byte ranges of the word, linked to their neighbours (`llm_symbol`).
#[derive(Clone, Copy, Debug)]
struct Symbol {
    prev: i64,
    next: i64,
    start: usize,
    n: usize,
}

fn tokenize_word(vocab: &Vocab, pre: &PreTokenizer, word: &str, out: &mut Vec<u32>) {
    let w = word.as_bytes();
    let mut symbols: Vec<Symbol> = Vec::new();
    let mut offset = 0;
    if vocab.ignore_merges && vocab.lookup(w).is_some() {
        symbols.push(Symbol {
            prev: -1,
            next: -1,
            start: 0,
            n: w.len(),
        });
        offset = w.len();
    } else if vocab.pre == PreType::Gemma4
        && !w.is_empty()
        && w.iter().all(|&b| b == b'\n')
        && vocab.lookup(w).is_some()
    {
        symbols.push(Symbol {
            prev: -1,
            next: -1,
            start: 0,
            n: w.len(),
        });
        offset = w.len();
    }
    while offset < w.len() {
        let n = super::unicode::utf8_len(w[offset]).min(w.len() - offset);
        let idx = symbols.len() as i64;
        symbols.push(Symbol {
            prev: idx - 1,
            next: if offset + n == w.len() { -1 } else { idx + 1 },
            start: offset,
            n,
        });
        offset += n;
    }
    // (rank, left, right, merged text): the lowest rank first, then the leftmost
    let mut queue: BinaryHeap<Reverse<(u32, usize, usize, Vec<u8>)>> = BinaryHeap::new();
    let add = |l: i64,
               r: i64,
               symbols: &[Symbol],
               queue: &mut BinaryHeap<Reverse<(u32, usize, usize, Vec<u8>)>>| {
        if l < 0 || r < 0 {
            return;
        }
        let (ls, rs) = (symbols[l as usize], symbols[r as usize]);
        let left = &w[ls.start..ls.start + ls.n];
        let right = &w[rs.start..rs.start + rs.n];
        if let Some(rank) = vocab.merge_rank(left, right) {
            let mut text = Vec::with_capacity(left.len() + right.len());
            text.extend_from_slice(left);
            text.extend_from_slice(right);
            queue.push(Reverse((rank, l as usize, r as usize, text)));
        }
    };
    for i in 1..symbols.len() {
        add(i as i64 - 1, i as i64, &symbols, &mut queue);
    }
    while let Some(Reverse((_, l, r, text))) = queue.pop() {
        let (ls, rs) = (symbols[l], symbols[r]);
        if ls.n == 0 || rs.n == 0 {
            continue;
        }
        // outdated: the symbols changed since this pair was queued
        if ls.n + rs.n != text.len()
            || w[ls.start..ls.start + ls.n] != text[..ls.n]
            || w[rs.start..rs.start + rs.n] != text[ls.n..]
        {
            continue;
        }
        // symbols that are neighbours in the chain are contiguous in the word
        symbols[l].n += rs.n;
        symbols[r].n = 0;
        symbols[l].next = rs.next;
        if rs.next >= 0 {
            symbols[rs.next as usize].prev = l as i64;
        }
        let prev = symbols[l].prev;
        let next = symbols[l].next;
        add(prev, l as i64, &symbols, &mut queue);
        add(l as i64, next, &symbols, &mut queue);
    }
    for s in symbols.iter().filter(|s| s.n > 0) {
        let piece = &w[s.start..s.start + s.n];
        match vocab.lookup(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece {
                    // llama.cpp looks the bytes of the (already byte-encoded) symbol up one by one
                    let id = if pre.byte_encode {
                        vocab.lookup(&[b])
                    } else {
                        vocab.lookup(format!("<0x{b:02X}>").as_bytes())
                    };
                    if let Some(id) = id {
                        out.push(id);
                    }
                }
            }
        }
    }
}
