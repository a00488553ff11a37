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
                "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+",
                "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
                "\\s+$",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
                "\\p{N}+",
            ],
            true,
        ),
        PreType::DeepseekCoder => (
            &[
                "[\r\n]",
                "\\s?\\p{L}+",
                "\\s?\\p{P}+",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
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

/// Candidate merges: (rank, left, right, merged text), the lowest rank first, then the leftmost.
type MergeQueue = BinaryHeap<Reverse<(u32, usize, usize, Vec<u8>)>>;

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
    // the whole word is one token: with ignore_merges, or a run of newlines for Gemma 4
    let whole = (vocab.ignore_merges
        || (vocab.pre == PreType::Gemma4 && !w.is_empty() && w.iter().all(|&b| b == b'\n')))
        && vocab.lookup(w).is_some();
    if whole {
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
    let mut queue: MergeQueue = BinaryHeap::new();
    let add = |l: i64, r: i64, symbols: &[Symbol], queue: &mut MergeQueue| {
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
