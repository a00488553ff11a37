//! Turns a stream of token pieces into text that is safe to send: UTF-8 characters split across tokens are
//! held until complete, and any tail that could be the start of a stop string is held until it is known not
//! to be one — so a stop string never reaches the client, even when it spans several tokens.
//! (The same idea as llama-server's partial stop matching, tools/server/server-context.cpp, commit 0c1e570.)

use std::collections::VecDeque;

/// Text and the tokens released by one [`TextAssembler::push`] or [`TextAssembler::finish`].
#[derive(Debug, PartialEq)]
pub struct Released<T> {
    /// New text, possibly empty.
    pub text: String,
    /// The tokens whose text (or part of it) is in `text`, in order.
    pub tokens: Vec<T>,
    /// A stop string was found: `text` ends just before it, and nothing more will be released.
    pub stopped: bool,
}

/// Accumulates token bytes and releases text, holding back incomplete UTF-8 and possible stop prefixes.
/// `T` is whatever the caller attaches to each token (its id and log-probabilities).
#[derive(Debug)]
pub struct TextAssembler<T> {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character at the end.
    partial: Vec<u8>,
    /// All complete text so far.
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
    /// Tokens not yet released, with the byte range of `text` their piece covers.
    pending: VecDeque<(usize, usize, T)>,
    stopped: bool,
    /// The stop string that ended the text, once one did.
    stop_word: Option<String>,
}

impl<T> TextAssembler<T> {
    /// A new assembler with these stop strings (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        TextAssembler {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            partial: Vec::new(),
            text: String::new(),
            sent: 0,
            pending: VecDeque::new(),
            stopped: false,
            stop_word: None,
        }
    }

    /// The stop string that ended the text (llama-server's `stopping_word`), once one did.
    pub fn stop_word(&self) -> Option<&str> {
        self.stop_word.as_deref()
    }

    /// Adds one token's bytes and returns what can be sent now.
    pub fn push(&mut self, piece: &[u8], token: T) -> Released<T> {
        if self.stopped {
            return Released {
                text: String::new(),
                tokens: Vec::new(),
                stopped: true,
            };
        }
        let start = self.text.len();
        self.partial.extend_from_slice(piece);
        self.take_complete_utf8();
        self.pending.push_back((start, self.text.len(), token));

        // The earliest complete stop string in the unreleased text.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[self.sent..]
                    .find(s.as_str())
                    .map(|p| (self.sent + p, s))
            })
            .min_by_key(|&(p, _)| p);
        if let Some((p, word)) = hit {
            self.stop_word = Some(word.clone());
            self.stopped = true;
            return self.release_to(p, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.text[self.sent..], s))
            .max()
            .unwrap_or(0);
        let upto = self.text.len() - hold;
        self.release_to(upto, false)
    }

    /// Releases everything still held (end of generation without a stop string). Incomplete UTF-8 at the
    /// very end is replaced by U+FFFD.
    pub fn finish(&mut self) -> Released<T> {
        if self.stopped {
            return Released {
                text: String::new(),
                tokens: Vec::new(),
                stopped: true,
            };
        }
        if !self.partial.is_empty() {
            let tail = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            self.text.push_str(&tail);
            if let Some(last) = self.pending.back_mut() {
                last.1 = self.text.len();
            }
        }
        let end = self.text.len();
        let mut r = self.release_to(end, false);
        r.tokens.extend(self.pending.drain(..).map(|p| p.2));
        r
    }

    fn take_complete_utf8(&mut self) {
        loop {
            match std::str::from_utf8(&self.partial) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.partial.clear();
                    return;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // The first `good` bytes were just validated.
                    self.text
                        .push_str(std::str::from_utf8(&self.partial[..good]).unwrap_or_default());
                    match e.error_len() {
                        // Invalid bytes: replace and continue after them.
                        Some(bad) => {
                            self.text.push('\u{FFFD}');
                            self.partial.drain(..good + bad);
                        }
                        // Incomplete character at the end: keep it for the next piece.
                        None => {
                            self.partial.drain(..good);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn release_to(&mut self, upto: usize, stopped: bool) -> Released<T> {
        let upto = upto.max(self.sent);
        let text = self.text[self.sent..upto].to_string();
        self.sent = upto;
        let mut tokens = Vec::new();
        // The last token is still open while its UTF-8 character is incomplete.
        let open_last = !self.partial.is_empty();
        while let Some((s, e, _)) = self.pending.front() {
            if open_last && self.pending.len() == 1 && !stopped {
                break;
            }
            if *s < upto || (*e <= upto && !stopped) {
                tokens.push(self.pending.pop_front().map(|p| p.2).expect("front exists"));
            } else {
                break;
            }
        }
        if stopped {
            self.pending.clear();
        }
        Released {
            text,
            tokens,
            stopped,
        }
    }
}

/// Length in bytes of the longest proper prefix of `stop` that `text` ends with (on char boundaries).
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            stop.is_char_boundary(k)
                && text.is_char_boundary(text.len() - k)
                && text.ends_with(&stop[..k])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool, Vec<Vec<usize>>) {
        let mut a = TextAssembler::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        let mut toks = Vec::new();
        let mut stopped = false;
        for (i, p) in pieces.iter().enumerate() {
            let r = a.push(p, i);
            out.push(r.text);
            toks.push(r.tokens);
            if r.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            let r = a.finish();
            out.push(r.text);
            toks.push(r.tokens);
        }
        (out, stopped, toks)
    }

    #[test]
    fn stop_across_tokens_is_never_emitted() {
        let (out, stopped, _) = run(&["END"], &[b"Hello E", b"N", b"D more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello ");
        assert_eq!(out[0], "Hello ");
        assert_eq!(out[1], "");
    }

    #[test]
    fn false_start_is_released_later() {
        let (out, stopped, toks) = run(&["END"], &[b"a E", b"x", b"y"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "Ex", "y", ""]);
        assert_eq!(toks, vec![vec![0], vec![1], vec![2], vec![]]);
        let (out, _, _) = run(&["END"], &[b"a E"]);
        assert_eq!(out.concat(), "a E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["cd", "b"], &[b"abcd"]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
    }

    #[test]
    fn utf8_split_across_tokens_is_held() {
        let e = "é".as_bytes();
        let (out, _, toks) = run(&[], &[&e[..1], &e[1..], b"!"]);
        assert_eq!(out, vec!["", "é", "!", ""]);
        // The first token's text only completes with the second: both are released together.
        assert_eq!(toks[1], vec![0, 1]);
    }

    #[test]
    fn invalid_utf8_never_panics() {
        let (out, _, _) = run(&["x"], &[&[0xff, b'a'], &[0xe2, 0x82], &[]]);
        assert_eq!(out.concat(), "\u{FFFD}a\u{FFFD}");
    }

    #[test]
    fn stop_at_start_releases_nothing() {
        let (out, stopped, toks) = run(&["<|"], &[b"<", b"|im_end"]);
        assert!(stopped);
        assert_eq!(out.concat(), "");
        assert!(toks.iter().all(|t| t.is_empty()));
    }

    #[test]
    fn multibyte_stop_prefix() {
        let (out, stopped, _) = run(&["éé"], &["aé".as_bytes(), "é".as_bytes()]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
    }
}
