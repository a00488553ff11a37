//! WordPiece (`tokenizer.ggml.model = bert`): BERT normalisation (lower-casing, accent stripping, CJK and
//! punctuation split) then greedy longest-match per word, with `▁` marking a word start. Port of
//! `llm_tokenizer_wpm_session` in llama.cpp `src/llama-vocab.cpp` (commit 0c1e570).

use super::Vocab;
use super::unicode::{Flags, nfd_first, to_lower};

/// Tokenize one text fragment, appending ids to `out`.
pub(crate) fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    for word in preprocess(text, vocab.lowercase, vocab.strip_accents) {
        if word.is_empty() {
            continue;
        }
        let mut w = String::with_capacity(word.len() + 3);
        w.push('\u{2581}');
        w.push_str(&word);
        let w = w.as_bytes();
        let n = w.len();
        let before = out.len();
        let mut i = 0;
        while i < n {
            let mut matched = false;
            let mut j = n.min(i + vocab.max_token_len + 1);
            while j > i {
                if let Some(id) = vocab.lookup(&w[i..j]) {
                    out.push(id);
                    matched = true;
                    i = j - 1;
                    break;
                }
                j -= 1;
            }
            if !matched {
                out.truncate(before);
                break;
            }
            i += 1;
        }
        if out.len() == before
            && let Some(unk) = vocab.unk
        {
            out.push(unk);
        }
    }
}

/// `llm_tokenizer_wpm_session::is_chinese_char` (ranges as llama.cpp has them).
fn is_chinese_char(c: u32) -> bool {
    (0x04E00..=0x09FFF).contains(&c)
        || (0x03400..=0x04DBF).contains(&c)
        || (0x20000..=0x2A6DF).contains(&c)
        || (0x2A700..=0x2B73F).contains(&c)
        || (0x2B740..=0x2B81F).contains(&c)
        || (0x2B920..=0x2CEAF).contains(&c)
        || (0x0F900..=0x0FAFF).contains(&c)
        || (0x2F800..=0x2FA1F).contains(&c)
}

/// Normalise and split into words (`llm_tokenizer_wpm_session::preprocess`).
fn preprocess(text: &str, lowercase: bool, strip_accents: bool) -> Vec<String> {
    let mut words = vec![String::new()];
    for c in text.chars() {
        let mut cpt = c as u32;
        if strip_accents {
            cpt = nfd_first(cpt);
        }
        let flags = Flags::of(cpt);
        if flags.is_whitespace() {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            continue;
        }
        if cpt == 0 || cpt == 0xFFFD || flags.is_control() {
            continue;
        }
        if strip_accents && flags.is_accent_mark() {
            continue;
        }
        let out_cpt = if lowercase { to_lower(cpt) } else { cpt };
        let ch = char::from_u32(out_cpt).unwrap_or('\u{FFFD}');
        if flags.is_punctuation() || (cpt < 0x7F && flags.is_symbol()) || is_chinese_char(cpt) {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            if let Some(last) = words.last_mut() {
                last.push(ch);
            }
            words.push(String::new());
        } else if let Some(last) = words.last_mut() {
            last.push(ch);
        }
    }
    if words.last().is_some_and(String::is_empty) {
        words.pop();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::preprocess;

    #[test]
    fn preprocess_splits_like_bert() {
        assert_eq!(
            preprocess("Héllo, World!", true, true),
            ["hello", ",", "world", "!"]
        );
        assert_eq!(preprocess("  a\tb  ", true, true), ["a", "b"]);
        assert_eq!(preprocess("中文", false, false), ["中", "文"]);
    }
}
