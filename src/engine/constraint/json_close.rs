//! The shortest text that closes a JSON reply cut anywhere: what a JSON-constrained slot emits when its
//! token budget (`max_tokens`, or the end of its context) would otherwise cut the value open.
//!
//! A grammar only says which tokens may come next; it cannot make a weak model stop adding members to
//! an object before the budget ends (SmolLM2 answers "describe a car" with keys that never end). So the
//! scheduler asks, before accepting each sampled token, whether the reply could still be closed in the
//! tokens that would be left; when it could not, it emits [`JsonCloser::closing`] instead (checked
//! against the grammar first, see `Constraint::closing_for_budget`). The tracker is a byte-level
//! pushdown automaton of RFC 8259 JSON, plus the optional `` ```json `` … `` ``` `` fence of a chat reply
//! ([`super::GrammarSpec::ChatReply`]).

/// Where a value in progress is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// A value must come (top level, after `:`, after `,` in an array).
    Value,
    /// Just after `[`: a value or `]`.
    ValueOrClose,
    /// Just after `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value in a container: `,` or the container's end.
    CommaOrClose,
    /// Inside a string; `esc` 0 = plain, 1 = after `\`, 2..=5 = after `\u` and `esc - 2` hex digits.
    Str { key: bool, esc: u8 },
    /// Inside a number; whether its last byte is a digit (`-`, `1.`, `1e+` are not complete).
    Num { ends_digit: bool },
    /// Inside `true`, `false` or `null`: the word and how many bytes are typed.
    Lit { word: &'static [u8], typed: usize },
    /// The top-level value is complete.
    Done,
}

/// What the reply around the value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before the value: whitespace, or (`fence_ok`) part of the opening `` ```json ``; `typed` bytes of
    /// it so far.
    Before { typed: usize },
    /// In the value; `fenced` when the opening fence was written.
    Value { fenced: bool },
    /// After the value; `typed` bytes of a closing `` ``` `` (only when fenced).
    After { fenced: bool, typed: usize },
}

const FENCE_OPEN: &[u8] = b"```json";
const FENCE_CLOSE: &[u8] = b"```";

/// JSON lexical state of the text generated so far (cheap to clone: the stack is one byte per open
/// container).
#[derive(Clone, Debug)]
pub struct JsonCloser {
    /// Open containers, outermost first: `true` = object, `false` = array.
    stack: Vec<bool>,
    st: St,
    phase: Phase,
    /// The reply may be fenced (a chat reply).
    fence_ok: bool,
    /// A byte outside JSON was seen (a special token, a grammar we do not model): no closing is known.
    lost: bool,
}

impl JsonCloser {
    /// A tracker for a bare JSON value, or (`chat_reply`) for one that may be fenced as llama.cpp's
    /// chat `response-format` allows.
    pub fn new(chat_reply: bool) -> JsonCloser {
        JsonCloser {
            stack: Vec::new(),
            st: St::Value,
            phase: Phase::Before { typed: 0 },
            fence_ok: chat_reply,
            lost: false,
        }
    }

    /// Advances by the bytes of one token.
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.lost {
                return;
            }
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        match self.phase {
            Phase::Before { typed } => {
                if typed > 0 || (self.fence_ok && b == b'`') {
                    if FENCE_OPEN.get(typed) == Some(&b) {
                        self.phase = if typed + 1 == FENCE_OPEN.len() {
                            Phase::Value { fenced: true }
                        } else {
                            Phase::Before { typed: typed + 1 }
                        };
                    } else {
                        self.lost = true;
                    }
                } else if !is_ws(b) {
                    self.phase = Phase::Value { fenced: false };
                    self.value_byte(b);
                }
            }
            Phase::Value { .. } => self.value_byte(b),
            Phase::After { fenced, typed } => {
                if fenced && FENCE_CLOSE.get(typed) == Some(&b) && (typed > 0 || b == b'`') {
                    self.phase = Phase::After {
                        fenced,
                        typed: typed + 1,
                    };
                } else if !(typed == 0 && is_ws(b)) {
                    self.lost = true;
                }
            }
        }
    }

    fn value_byte(&mut self, b: u8) {
        match self.st {
            St::Str { key, esc } => {
                self.st = match (esc, b) {
                    (0, b'"') => {
                        if key {
                            St::Colon
                        } else {
                            return self.value_done();
                        }
                    }
                    (0, b'\\') => St::Str { key, esc: 1 },
                    (0, _) => St::Str { key, esc: 0 },
                    (1, b'u') => St::Str { key, esc: 2 },
                    (1, _) => St::Str { key, esc: 0 },
                    (5, _) => St::Str { key, esc: 0 },
                    (n, _) => St::Str { key, esc: n + 1 },
                };
            }
            St::Num { .. } => {
                if b.is_ascii_digit() {
                    self.st = St::Num { ends_digit: true };
                } else if matches!(b, b'.' | b'e' | b'E' | b'+' | b'-') {
                    self.st = St::Num { ends_digit: false };
                } else {
                    self.value_done();
                    if !self.lost {
                        self.byte(b);
                    }
                }
            }
            St::Lit { word, typed } => {
                if word.get(typed) != Some(&b) {
                    self.lost = true;
                } else if typed + 1 == word.len() {
                    self.value_done();
                } else {
                    self.st = St::Lit {
                        word,
                        typed: typed + 1,
                    };
                }
            }
            _ if is_ws(b) => {}
            St::Value | St::ValueOrClose => match b {
                b'{' => {
                    self.stack.push(true);
                    self.st = St::KeyOrClose;
                }
                b'[' => {
                    self.stack.push(false);
                    self.st = St::ValueOrClose;
                }
                b'"' => self.st = St::Str { key: false, esc: 0 },
                b'-' => self.st = St::Num { ends_digit: false },
                b'0'..=b'9' => self.st = St::Num { ends_digit: true },
                b't' => self.st = lit(b"true"),
                b'f' => self.st = lit(b"false"),
                b'n' => self.st = lit(b"null"),
                b']' if self.st == St::ValueOrClose => self.close(false),
                _ => self.lost = true,
            },
            St::KeyOrClose | St::Key => match b {
                b'"' => self.st = St::Str { key: true, esc: 0 },
                b'}' if self.st == St::KeyOrClose => self.close(true),
                _ => self.lost = true,
            },
            St::Colon => match b {
                b':' => self.st = St::Value,
                _ => self.lost = true,
            },
            St::CommaOrClose => match (b, self.stack.last()) {
                (b',', Some(true)) => self.st = St::Key,
                (b',', Some(false)) => self.st = St::Value,
                (b'}', Some(true)) => self.close(true),
                (b']', Some(false)) => self.close(false),
                _ => self.lost = true,
            },
            St::Done => self.lost = true,
        }
    }

    fn close(&mut self, object: bool) {
        if self.stack.pop() != Some(object) {
            self.lost = true;
            return;
        }
        self.value_done();
    }

    fn value_done(&mut self) {
        if self.stack.is_empty() {
            self.st = St::Done;
            if let Phase::Value { fenced } = self.phase {
                self.phase = Phase::After { fenced, typed: 0 };
            }
        } else {
            self.st = St::CommaOrClose;
        }
    }

    /// The shortest text (in bytes) that makes the reply so far a complete JSON value — closing the
    /// string, number or literal in progress, giving a dangling key the value `0` (an empty key after a
    /// trailing `,`), closing every open container and the fence — or `None` when the text left JSON
    /// (nothing known closes it). With nothing written yet it is `{}`.
    pub fn closing(&self) -> Option<String> {
        if self.lost {
            return None;
        }
        let mut s = String::new();
        match self.phase {
            Phase::Before { typed } => {
                if typed > 0 {
                    s.push_str(std::str::from_utf8(&FENCE_OPEN[typed..]).ok()?);
                }
                s.push_str("{}");
                if typed > 0 {
                    s.push_str("```");
                }
                return Some(s);
            }
            Phase::After { fenced, typed } => {
                if fenced {
                    s.push_str(std::str::from_utf8(&FENCE_CLOSE[typed..]).ok()?);
                }
                return Some(s);
            }
            Phase::Value { .. } => {}
        }
        match self.st {
            St::Str { key, esc } => {
                match esc {
                    1 => s.push('n'),
                    2..=5 => (esc..6).for_each(|_| s.push('0')),
                    _ => {}
                }
                s.push('"');
                if key {
                    s.push_str(":0");
                }
            }
            St::Num { ends_digit } => {
                if !ends_digit {
                    s.push('0');
                }
            }
            St::Lit { word, typed } => s.push_str(std::str::from_utf8(&word[typed..]).ok()?),
            St::Colon => s.push_str(":0"),
            St::Value => s.push('0'),
            St::Key => s.push_str("\"\":0"),
            St::ValueOrClose | St::KeyOrClose | St::CommaOrClose | St::Done => {}
        }
        for &object in self.stack.iter().rev() {
            s.push(if object { '}' } else { ']' });
        }
        if let Phase::Value { fenced: true } = self.phase {
            s.push_str("```");
        }
        Some(s)
    }
}

fn lit(word: &'static [u8]) -> St {
    St::Lit { word, typed: 1 }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(chat: bool, text: &str) -> Option<String> {
        let mut c = JsonCloser::new(chat);
        // Fed in odd pieces, as tokens cut text anywhere.
        for piece in text.as_bytes().chunks(3) {
            c.push(piece);
        }
        c.closing()
    }

    #[test]
    fn every_cut_of_a_json_reply_closes_into_valid_json() {
        let docs = [
            r#"{"a": [1, -2.5e+3, true, null, {"b": "x\"y\\z\u00e9"}], "c": {}, "d": [], "e": false}"#,
            r#"  {"model": "model_name", "nested": {"deep": [[[]], [{"k": 0}]]}}"#,
            "{\n  \"title\": \"Example\",\n  \"size\": \"small\"\n}",
        ];
        for doc in docs {
            for cut in 0..=doc.len() {
                let (head, _) = doc.split_at(cut);
                let tail = close(false, head).unwrap_or_else(|| panic!("no closing for {head:?}"));
                let whole = format!("{head}{tail}");
                let v: serde_json::Value = serde_json::from_str(&whole)
                    .unwrap_or_else(|e| panic!("{whole:?} from the cut {head:?}: {e}"));
                assert!(v.is_object(), "{whole:?}");
            }
            assert_eq!(close(false, doc).as_deref(), Some(""), "a complete value");
        }
    }

    #[test]
    fn fenced_chat_replies_close_their_fence() {
        let doc = "```json\n{\"a\": [1, 2]}\n```";
        for cut in 0..=doc.len() {
            let (head, _) = doc.split_at(cut);
            let tail = close(true, head).unwrap();
            let whole = format!("{head}{tail}");
            // Nothing written yet closes bare; a fence once begun is finished.
            let inner = match whole.trim().strip_prefix("```json") {
                Some(rest) => rest
                    .strip_suffix("```")
                    .unwrap_or_else(|| panic!("{whole:?}")),
                None => whole.trim(),
            };
            assert!(
                serde_json::from_str::<serde_json::Value>(inner).is_ok(),
                "{whole:?}"
            );
        }
        assert_eq!(close(true, " {\"a\":1} ").as_deref(), Some(""), "bare");
        assert_eq!(
            close(false, "`").as_deref(),
            None,
            "no fence outside a chat reply"
        );
    }

    #[test]
    fn closings_are_the_short_ones() {
        assert_eq!(close(false, "").as_deref(), Some("{}"));
        assert_eq!(
            close(false, r#"{"model_model_ye"#).as_deref(),
            Some(r#"":0}"#)
        );
        assert_eq!(close(false, r#"{"a":"long text"#).as_deref(), Some(r#""}"#));
        assert_eq!(close(false, r#"{"a":[1,"#).as_deref(), Some("0]}"));
        assert_eq!(close(false, r#"{"a":1,"#).as_deref(), Some(r#""":0}"#));
        assert_eq!(close(false, r#"{"a":tr"#).as_deref(), Some("ue}"));
        assert_eq!(close(false, r#"{"a":1."#).as_deref(), Some("0}"));
        assert_eq!(close(false, r#"{"a":"\u00"#).as_deref(), Some(r#"00"}"#));
    }

    #[test]
    fn text_outside_json_has_no_closing() {
        for bad in ["{]", "{\"a\" 1", "{}}", "{\"a\":1 2", "nul1", "\u{ff}"] {
            assert_eq!(close(false, bad), None, "{bad:?}");
        }
        let mut c = JsonCloser::new(false);
        c.push(&[0xFF, b'<']);
        assert_eq!(c.closing(), None, "a special token");
    }
}
