//! Structured output: a request's JSON schema, GBNF/Lark grammar or regex compiled by llguidance into a
//! per-slot [`Constraint`] that says, before each sampling step, which tokens may come next.
//!
//! The grammar engine is llguidance (the one llama.cpp's `common/llguidance.cpp` and mistral.rs use);
//! this module only builds its token environment over our vocabulary and adapts its API:
//! - [`GrammarCompiler`]: once per model. A `TokTrie` over every token's bytes, built as llama.cpp's
//!   `llama_sampler_llg_new_tokenizer` does (commit 0c1e570): the token's piece without special
//!   rendering; a token whose piece is then empty but has text when rendered as special (control tokens
//!   such as `<|im_start|>`) gets llguidance's special-token marker byte 0xFF in front, so no grammar can
//!   produce it from text (a Lark grammar can still name it as `<|im_start|>`); the end-of-generation
//!   tokens are the trie's EOS set, allowed exactly when the grammar accepts.
//! - [`Constraint`]: one request's matcher. [`Constraint::compute_mask`] (the slow part, run beside the
//!   forward pass) → [`TokenMask`], applied to the logits with [`crate::engine::sampling::mask_logits`];
//!   [`Constraint::commit`] advances it by the sampled token.

mod gbnf;
mod json_close;

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

pub use gbnf::{GbnfError, any_to_lark, gbnf_to_lark, is_lark_syntax};
pub use json_close::JsonCloser;

use crate::engine::tokenizer::Tokenizer;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI `response_format: {"type":"json_object"}`): the schema `{"type":"object"}`.
    JsonObject,
    /// A JSON schema (OpenAI `json_schema`, llama.cpp `json_schema`). `strict: false` compiles it
    /// leniently (llguidance's `lenient`: unsupported keywords and formats are ignored); `strict: true`
    /// makes an unsupported keyword a compile error.
    JsonSchema {
        /// The schema.
        schema: Value,
        /// Refuse what cannot be enforced exactly.
        strict: bool,
    },
    /// A llama.cpp GBNF grammar, translated to Lark by [`gbnf_to_lark`] (a grammar that already is
    /// Lark, starting with `%llguidance` or holding a `start:` rule, is used as is).
    Gbnf(String),
    /// An llguidance Lark grammar.
    Lark(String),
    /// A regular expression (Rust `regex` syntax) the whole output must match.
    Regex(String),
    /// A chat reply in a JSON response format ([`GrammarSpec::JsonObject`] or
    /// [`GrammarSpec::JsonSchema`] inside), shaped as llama.cpp's chat parser allows it
    /// (`common/chat-auto-parser-generator.cpp`, the `response-format` rule): optional whitespace, then
    /// the JSON either bare or in a `` ```json `` … `` ``` `` fence, then optional whitespace. The
    /// reply's content is the JSON alone ([`crate::engine::chat::tools::json_reply_content`]). Made by
    /// [`GrammarSpec::for_chat_reply`]; any other spec inside compiles as itself.
    ChatReply(Box<GrammarSpec>),
}

impl GrammarSpec {
    /// A short name of the kind, for messages (`json_object`, `json_schema`, `gbnf`, `lark`, `regex`).
    pub fn kind(&self) -> &'static str {
        match self {
            GrammarSpec::JsonObject => "json_object",
            GrammarSpec::JsonSchema { .. } => "json_schema",
            GrammarSpec::Gbnf(_) => "gbnf",
            GrammarSpec::Lark(_) => "lark",
            GrammarSpec::Regex(_) => "regex",
            GrammarSpec::ChatReply(inner) => inner.kind(),
        }
    }

    /// The spec for a chat reply: a JSON kind becomes [`GrammarSpec::ChatReply`] (llama.cpp's chat
    /// `response-format` shape), any other kind (a user's grammar) stays as it is.
    pub fn for_chat_reply(self) -> GrammarSpec {
        match self {
            GrammarSpec::JsonObject | GrammarSpec::JsonSchema { .. } => {
                GrammarSpec::ChatReply(Box::new(self))
            }
            other => other,
        }
    }

    /// Whether the reply is a JSON value possibly wrapped as [`GrammarSpec::ChatReply`] describes.
    pub fn is_chat_json_reply(&self) -> bool {
        matches!(
            self,
            GrammarSpec::ChatReply(inner)
                if matches!(**inner, GrammarSpec::JsonObject | GrammarSpec::JsonSchema { .. })
        )
    }
}

/// A constraint failure.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar or schema does not compile; `message` is the compiler's (llguidance's or the GBNF
    /// converter's) message.
    #[error("invalid {kind}: {message}")]
    Compile {
        /// [`GrammarSpec::kind`].
        kind: &'static str,
        /// The compiler's message.
        message: String,
    },
    /// The token environment cannot be built from the vocabulary.
    #[error("grammar token environment: {0}")]
    Vocab(String),
    /// The matcher failed while decoding (a token the grammar refuses, a grammar too complex for its
    /// limits, no token allowed at all).
    #[error("grammar matcher: {0}")]
    Matcher(String),
}

/// Whitespace the JSON grammars allow between tokens: at most one space, or one or two newlines then
/// up to 20 blanks — llama.cpp's `SPACE_RULE` (common/json-schema-to-grammar.cpp, commit 0c1e570).
/// llguidance's default (any run of whitespace) lets a weak model fill its budget with newlines.
const JSON_WHITESPACE: &str = r"[ ]|\n{1,2}[ \t]{0,20}";

/// Tokenizes text for llguidance (used to force a grammar's literal text as canonical tokens).
pub type TokenizeFn = Arc<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

/// llguidance's view of our vocabulary: the trie, and our tokenizer for text it wants as tokens.
struct TokEnv {
    trie: TokTrie,
    tokenize: TokenizeFn,
}

impl TokenizerEnv for TokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Valid UTF-8 runs through our tokenizer, broken bytes greedily through the trie (what
        // llguidance's FFI does with `tokenize_assumes_string`, as llama.cpp sets it).
        self.trie
            .tokenize_with_greedy_fallback(s, |t| (self.tokenize)(t))
    }
}

/// The bytes of every token as llguidance must see them (see the module comment), index = token id.
/// Unlike llama.cpp (which calls `llama_detokenize` and so loses the leading space of SPM pieces) the
/// piece is taken as is: a trie needs each token's bytes in the middle of a text.
pub fn token_bytes(tok: &Tokenizer) -> Vec<Vec<u8>> {
    (0..tok.n_vocab() as u32)
        .map(|id| {
            let piece = tok.token_to_piece(id, false);
            if !piece.is_empty() {
                return piece;
            }
            let special = tok.token_to_piece(id, true);
            if special.is_empty() {
                return special;
            }
            let mut b = Vec::with_capacity(special.len() + 1);
            b.push(TokTrie::SPECIAL_TOKEN_MARKER);
            b.extend_from_slice(&special);
            b
        })
        .collect()
}

/// Compiles [`GrammarSpec`]s for one vocabulary; cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    n_vocab: usize,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("n_vocab", &self.n_vocab)
            .finish()
    }
}

impl GrammarCompiler {
    /// A compiler over `tokens` (bytes per token id, special ones behind 0xFF, see [`token_bytes`]),
    /// whose end-of-generation tokens are `eog` (the first is the EOS llguidance reports), tokenizing
    /// forced text with `tokenize` (`llama_tokenize(text, add_special = false, parse_special = true)`).
    ///
    /// Errors: [`ConstraintError::Vocab`] for an empty vocabulary, no or out-of-range EOG tokens, or
    /// llguidance refusing the vocabulary.
    pub fn new(
        tokens: Vec<Vec<u8>>,
        eog: &[u32],
        tokenize: TokenizeFn,
    ) -> Result<Self, ConstraintError> {
        let n_vocab = tokens.len();
        if n_vocab == 0 {
            return Err(ConstraintError::Vocab("the vocabulary is empty".into()));
        }
        let Some(&eos) = eog.first() else {
            return Err(ConstraintError::Vocab(
                "the vocabulary has no end-of-generation token".into(),
            ));
        };
        if let Some(bad) = eog.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ConstraintError::Vocab(format!(
                "end-of-generation token {bad} is outside the vocabulary of {n_vocab}"
            )));
        }
        if tokens.iter().any(|t| t.len() > u16::MAX as usize) {
            return Err(ConstraintError::Vocab(
                "a token is longer than 65535 bytes".into(),
            ));
        }
        let n = u32::try_from(n_vocab)
            .map_err(|_| ConstraintError::Vocab(format!("vocabulary of {n_vocab} tokens")))?;
        let info = TokRxInfo::new(n, eos);
        let trie = llguidance::panic_utils::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Ok(TokTrie::from(&info, &tokens).with_eos_tokens(eog))
        }))
        .map_err(|e| ConstraintError::Vocab(e.to_string()))?;
        let env: llguidance::toktrie::TokEnv = Arc::new(TokEnv { trie, tokenize });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Vocab(e.to_string()))?;
        // Errors come back as values; nothing is printed to stderr.
        factory.quiet();
        Ok(GrammarCompiler {
            factory: Arc::new(factory),
            n_vocab,
        })
    }

    /// A compiler for `tok`'s vocabulary ([`token_bytes`], its end-of-generation tokens), tokenizing
    /// with `tokenize` (normally `tok.encode(text, false, true)` of the same tokenizer, kept alive by
    /// the caller's closure).
    ///
    /// Errors: as [`GrammarCompiler::new`].
    pub fn for_tokenizer(tok: &Tokenizer, tokenize: TokenizeFn) -> Result<Self, ConstraintError> {
        let eog: Vec<u32> = (0..tok.n_vocab() as u32)
            .filter(|&t| tok.is_eog(t))
            .collect();
        Self::new(token_bytes(tok), &eog, tokenize)
    }

    /// Vocabulary size (tokens) the masks cover.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Compiles `spec` into a fresh constraint (may take milliseconds: call it off async threads).
    ///
    /// Errors: [`ConstraintError::Compile`] with the compiler's message.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, ConstraintError> {
        let kind = spec.kind();
        let compile_err = |message: String| ConstraintError::Compile { kind, message };
        let grammar = match spec {
            GrammarSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(json_options(any_object_schema(), true))
            }
            GrammarSpec::JsonSchema { schema, strict } => {
                TopLevelGrammar::from_json_schema(json_options(schema.clone(), *strict))
            }
            GrammarSpec::ChatReply(inner) => match &**inner {
                GrammarSpec::JsonObject => TopLevelGrammar::from_lark(chat_reply_lark(
                    &json_options(any_object_schema(), true),
                )),
                GrammarSpec::JsonSchema { schema, strict } => TopLevelGrammar::from_lark(
                    chat_reply_lark(&json_options(schema.clone(), *strict)),
                ),
                other => return self.compile(other),
            },
            GrammarSpec::Gbnf(text) => {
                TopLevelGrammar::from_lark(any_to_lark(text).map_err(|e| compile_err(e.0))?)
            }
            GrammarSpec::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
        };
        let parser = match self.factory.create_parser(grammar) {
            Ok(p) => p,
            // The schema inside a chat reply's grammar: its own message, without the position in
            // the wrapping Lark text.
            Err(e) => match spec {
                GrammarSpec::ChatReply(inner) => {
                    self.compile(inner)?;
                    return Err(compile_err(e.to_string()));
                }
                _ => return Err(compile_err(e.to_string())),
            },
        };
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(compile_err(e));
        }
        let closer = match spec {
            GrammarSpec::JsonObject | GrammarSpec::JsonSchema { .. } => {
                Some(JsonCloser::new(false))
            }
            GrammarSpec::ChatReply(inner)
                if matches!(
                    **inner,
                    GrammarSpec::JsonObject | GrammarSpec::JsonSchema { .. }
                ) =>
            {
                Some(JsonCloser::new(true))
            }
            _ => None,
        };
        Ok(Constraint {
            matcher: Box::new(matcher),
            n_vocab: self.n_vocab,
            env: self.factory.tok_env().clone(),
            closer,
        })
    }
}

/// Any JSON object, with numbers kept to the magnitude llama.cpp's JSON grammar allows (an integral
/// part of at most 16 digits: `INTEGRAL_PART` in common/json-schema-to-grammar.cpp, commit 0c1e570),
/// so that a model repeating a digit cannot fill its budget with one number. A bounded number is written
/// without an exponent (llguidance's numeric ranges do not produce one).
fn any_object_schema() -> Value {
    let value = json!({"anyOf": [
        {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
        {"type": "array", "items": {"$ref": "#/$defs/value"}},
        {"type": "string"},
        {"type": "number", "minimum": -1e16, "maximum": 1e16},
        {"type": "boolean"},
        {"type": "null"}
    ]});
    json!({
        "type": "object",
        "additionalProperties": {"$ref": "#/$defs/value"},
        "$defs": {"value": value}
    })
}

/// The schema with llguidance options: our whitespace rule and `lenient` unless strict, unless the
/// schema sets its own `x-guidance`.
fn json_options(mut schema: Value, strict: bool) -> Value {
    if let Some(obj) = schema.as_object_mut()
        && !obj.contains_key("x-guidance")
    {
        obj.insert(
            "x-guidance".into(),
            json!({"whitespace_pattern": JSON_WHITESPACE, "lenient": !strict}),
        );
    }
    schema
}

/// llama.cpp's chat `response-format` grammar (`autoparser::build_parser`, with its `space` rule
/// [`JSON_WHITESPACE`]) around `schema` (llguidance options already in it): the generation prompt's
/// `space`, the parser's, then `` ```json `` space JSON space `` ``` `` or space JSON space.
fn chat_reply_lark(schema: &Value) -> String {
    format!(
        "start: sp sp (\"```json\" sp reply sp \"```\" | sp reply sp)\n\
         sp: (/{JSON_WHITESPACE}/)?\n\
         reply: %json {schema}\n"
    )
}

/// The tokens allowed at one step: a bitset over the vocabulary, bit `t % 32` of word `t / 32` set when
/// token `t` is allowed (the layout of llguidance's and llama.cpp's masks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    /// The bitset words, `[ceil(n_vocab / 32)]`.
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }
    /// Whether token `t` is allowed.
    pub fn is_allowed(&self, t: u32) -> bool {
        (t as usize) < self.0.len() && self.0.is_allowed(t)
    }
    /// Number of allowed tokens.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }
}

/// One request's grammar state; `Send`, so its mask can be computed on another thread.
#[derive(Clone)]
pub struct Constraint {
    /// Boxed: llguidance's parser state is large and requests are moved through channels.
    matcher: Box<Matcher>,
    n_vocab: usize,
    /// The vocabulary's bytes and tokenizer (shared with the compiler).
    env: llguidance::toktrie::TokEnv,
    /// For JSON kinds: where the reply is, to close it before the budget ends.
    closer: Option<JsonCloser>,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl Constraint {
    /// The tokens allowed next (EOG tokens included exactly when the grammar can end here; only them
    /// once it is complete). Takes from microseconds to a few milliseconds.
    ///
    /// Errors: [`ConstraintError::Matcher`] when the matcher failed, or when no token at all is allowed.
    pub fn compute_mask(&mut self) -> Result<TokenMask, ConstraintError> {
        let m = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        if m.is_zero() {
            return Err(ConstraintError::Matcher(
                "the grammar allows no token of the vocabulary here".into(),
            ));
        }
        Ok(TokenMask(m))
    }

    /// Advances the grammar by the sampled `token` (EOG tokens included).
    ///
    /// Errors: [`ConstraintError::Matcher`] when the grammar refuses the token (it was not in the mask).
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        if token as usize >= self.n_vocab {
            return Err(ConstraintError::Matcher(format!(
                "token {token} is outside the vocabulary of {}",
                self.n_vocab
            )));
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        if let Some(c) = self.closer.as_mut() {
            c.push(self.env.tok_trie().token(token));
        }
        Ok(())
    }

    /// For a JSON reply with `budget` tokens left to emit (this step's included): `None` when
    /// `next` (the token just sampled, not an end-of-generation one) may be taken because the reply
    /// could still be closed in the `budget - 1` tokens after it; otherwise the tokens that close the
    /// reply from here ([`JsonCloser::closing`], tokenized), to emit instead of `next` and the steps
    /// after it — empty when the reply is complete already and should end without `next`. Also `None` for grammars that are not JSON, for text the tracker cannot follow, and
    /// when the grammar refuses the closing (a schema's required members, for one): those replies
    /// may still be cut by the budget, as without this.
    pub fn closing_for_budget(&mut self, next: u32, budget: usize) -> Option<Vec<u32>> {
        let closer = self.closer.as_ref()?;
        if budget == 0 || next as usize >= self.n_vocab {
            return None;
        }
        let mut after = closer.clone();
        after.push(self.env.tok_trie().token(next));
        let fits =
            |s: &str| s.len() < budget || self.env.tokenize_bytes(s.as_bytes()).len() < budget;
        if after.closing().is_none_or(|s| fits(&s)) {
            return None;
        }
        let tokens = self.env.tokenize_bytes(closer.closing()?.as_bytes());
        if tokens.is_empty() {
            // Complete already: end here.
            return self.is_accepting().then_some(tokens);
        }
        let valid = self.matcher.validate_tokens(&tokens).ok()?;
        (valid == tokens.len()).then_some(tokens)
    }

    /// The grammar is complete: nothing but an end-of-generation token may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped() && self.matcher.get_error().is_none()
    }

    /// The output so far is a complete sentence of the grammar (it may still go on).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: tokens 0..=255 are the bytes, 256 is EOS (special), 257 a control token.
    fn compiler() -> GrammarCompiler {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.push(b"\xff</s>".to_vec());
        tokens.push(b"\xff<|im_start|>".to_vec());
        let tokenize: TokenizeFn = Arc::new(|s: &str| s.bytes().map(u32::from).collect());
        GrammarCompiler::new(tokens, &[256], tokenize).unwrap()
    }

    /// Runs `c` over `text` byte by byte; returns whether every byte was allowed.
    fn feed(c: &mut Constraint, text: &str) -> bool {
        for b in text.bytes() {
            let m = c.compute_mask().unwrap();
            if !m.is_allowed(u32::from(b)) {
                return false;
            }
            c.commit(u32::from(b)).unwrap();
        }
        true
    }

    /// Emits `text`, closing it when the budget would cut it, as the scheduler does: returns the reply
    /// and whether it was closed.
    fn run_with_budget(spec: GrammarSpec, text: &str, max_tokens: usize) -> (String, bool) {
        let mut c = compiler().compile(&spec).unwrap();
        let mut out = Vec::new();
        for (n, b) in text.bytes().enumerate() {
            if n == max_tokens {
                break;
            }
            if let Some(close) = c.closing_for_budget(u32::from(b), max_tokens - n) {
                assert!(close.len() <= max_tokens - n, "the closing fits the budget");
                for t in close {
                    assert!(
                        c.compute_mask().unwrap().is_allowed(t),
                        "the grammar allows the closing"
                    );
                    c.commit(t).unwrap();
                    out.push(t as u8);
                }
                assert!(c.is_accepting());
                return (String::from_utf8(out).unwrap(), true);
            }
            assert!(
                c.compute_mask().unwrap().is_allowed(u32::from(b)),
                "{text:?} at {n}"
            );
            c.commit(u32::from(b)).unwrap();
            out.push(b);
        }
        (String::from_utf8(out).unwrap(), false)
    }

    #[test]
    fn a_json_reply_the_budget_would_cut_is_closed_within_it() {
        let looping = r#"{"model": "x", "model_name": "y", "model_model_year": "z", "model_model_model_year_year": 1"#;
        for max_tokens in 2..looping.len() {
            let (reply, closed) = run_with_budget(GrammarSpec::JsonObject, looping, max_tokens);
            assert!(closed, "budget {max_tokens}");
            assert!(reply.len() <= max_tokens, "{reply:?} within {max_tokens}");
            let v: Value =
                serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
            assert!(v.is_object());
        }
        // A reply that ends by itself in its budget is left alone.
        let (reply, closed) = run_with_budget(GrammarSpec::JsonObject, r#"{"a": 1}"#, 8);
        assert_eq!((reply.as_str(), closed), (r#"{"a": 1}"#, false));
        // A fenced chat reply gets its fence closed too.
        let spec = GrammarSpec::JsonObject.for_chat_reply();
        let (reply, closed) =
            run_with_budget(spec, "```json\n{\"a\": [1, 2, 3, 4, 5, 6]}\n```", 20);
        assert!(closed);
        assert!(
            reply.starts_with("```json") && reply.ends_with("```"),
            "{reply:?}"
        );
        // A schema whose required member the closing would leave out: no closing (cut as before).
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": false});
        let spec = GrammarSpec::JsonSchema {
            schema,
            strict: true,
        };
        let (_, closed) = run_with_budget(spec.clone(), r#"{"a": "some long text", "b": 1}"#, 10);
        assert!(!closed, "the grammar refuses {{\"a\": \"some\"}}");
        // One whose closing it accepts is closed.
        let (reply, closed) =
            run_with_budget(spec, r#"{"a": "some long text", "b": 12345678}"#, 30);
        assert!(closed);
        assert_eq!(
            serde_json::from_str::<Value>(&reply).unwrap()["a"],
            "some long text"
        );
        // Grammars that are not JSON are never closed.
        let (_, closed) = run_with_budget(GrammarSpec::Regex("[a-z]+".into()), "abcdefgh", 3);
        assert!(!closed);
    }

    #[test]
    fn json_schema_allows_valid_and_ends_with_eos_only() {
        let g = compiler();
        let schema = json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["n"],
            "additionalProperties": false
        });
        let mut c = g
            .compile(&GrammarSpec::JsonSchema {
                schema,
                strict: true,
            })
            .unwrap();
        let m = c.compute_mask().unwrap();
        assert!(m.is_allowed(u32::from(b'{')));
        assert!(!m.is_allowed(u32::from(b'x')));
        assert!(!m.is_allowed(256), "EOS before the object is complete");
        assert!(!m.is_allowed(257), "a control token is never allowed");
        assert!(feed(&mut c, "{\"n\": 7"));
        let m = c.compute_mask().unwrap();
        assert!(!m.is_allowed(u32::from(b'8')), "maximum 9: one digit only");
        assert!(feed(&mut c, "}"));
        assert!(c.is_accepting());
        let m = c.compute_mask().unwrap();
        assert_eq!(m.count(), 1);
        assert!(m.is_allowed(256));
        assert!(c.is_stopped());
    }

    #[test]
    fn json_object_refuses_other_values() {
        let mut c = compiler().compile(&GrammarSpec::JsonObject).unwrap();
        let m = c.compute_mask().unwrap();
        assert!(m.is_allowed(u32::from(b'{')));
        assert!(!m.is_allowed(u32::from(b'[')));
        assert!(
            !m.is_allowed(u32::from(b' ')),
            "no whitespace before the object"
        );
        assert!(feed(&mut c, "{\"a\": [1, \"x\"]}"));
        assert!(c.compute_mask().unwrap().is_allowed(256));
    }

    #[test]
    fn json_object_numbers_are_bounded() {
        let g = compiler();
        let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
        assert!(feed(&mut c, "{\"a\": {\"b\": [null, true, \"s\", -2.5]}}"));
        let mut c = g.compile(&GrammarSpec::JsonObject).unwrap();
        assert!(feed(&mut c, "{\"n\": 1234567890123456"));
        assert!(
            !c.compute_mask().unwrap().is_allowed(u32::from(b'7')),
            "a 17th digit"
        );
        assert!(feed(&mut c, "}"));
    }

    #[test]
    fn whitespace_between_tokens_is_bounded() {
        let mut c = compiler().compile(&GrammarSpec::JsonObject).unwrap();
        assert!(feed(&mut c, "{\n\n"));
        assert!(!c.compute_mask().unwrap().is_allowed(u32::from(b'\n')));
        assert!(feed(&mut c, "  \"a\": 1}"));
    }

    #[test]
    fn chat_reply_is_json_bare_or_fenced_as_llama_cpp_allows() {
        let g = compiler();
        let spec = GrammarSpec::JsonObject.for_chat_reply();
        assert!(spec.is_chat_json_reply());
        assert_eq!(spec.kind(), "json_object");
        let mut c = g.compile(&spec).unwrap();
        assert!(feed(&mut c, "{\"a\": [1, \"x\"]}"));
        assert!(
            c.compute_mask().unwrap().is_allowed(256),
            "bare JSON may end"
        );
        let mut c = g.compile(&spec).unwrap();
        assert!(feed(&mut c, "\n```json\n{\n    \"a\": 1\n}\n"));
        assert!(
            !c.compute_mask().unwrap().is_allowed(256),
            "an open fence must close"
        );
        assert!(feed(&mut c, "```"));
        let m = c.compute_mask().unwrap();
        assert_eq!(m.count(), 1, "only EOS after the closing fence");
        assert!(m.is_allowed(256));
        let mut c = g.compile(&spec).unwrap();
        assert!(!feed(&mut c.clone(), "Here"), "no prose before the JSON");
        assert!(!feed(&mut c.clone(), "[1]"), "json_object is an object");
        assert!(!feed(&mut c.clone(), "```python"), "only a json fence");
        assert!(feed(&mut c, "{\n\n"));
        assert!(
            !c.compute_mask().unwrap().is_allowed(u32::from(b'\n')),
            "the JSON's whitespace stays bounded"
        );
        // A schema keeps its constraints inside the fence; other kinds are not wrapped.
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
                            "required": ["n"], "additionalProperties": false});
        let spec = GrammarSpec::JsonSchema {
            schema,
            strict: true,
        }
        .for_chat_reply();
        let mut c = g.compile(&spec).unwrap();
        assert!(!feed(&mut c.clone(), "```json {\"m\""));
        assert!(feed(&mut c, "```json {\"n\": 5} ```"));
        let gbnf = GrammarSpec::Gbnf("root ::= \"x\"".into()).for_chat_reply();
        assert!(!gbnf.is_chat_json_reply());
        let mut c = g.compile(&gbnf).unwrap();
        assert!(!feed(&mut c.clone(), " x"));
        assert!(feed(&mut c, "x"));
        let e = g
            .compile(
                &GrammarSpec::JsonSchema {
                    schema: json!({"type": "strnig"}),
                    strict: true,
                }
                .for_chat_reply(),
            )
            .unwrap_err();
        let alone = g
            .compile(&GrammarSpec::JsonSchema {
                schema: json!({"type": "strnig"}),
                strict: true,
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            alone.to_string(),
            "the schema compiler's message"
        );
    }

    #[test]
    fn gbnf_lark_and_regex_compile_and_constrain() {
        let g = compiler();
        let mut c = g
            .compile(&GrammarSpec::Gbnf(
                "root ::= (\"yes\" | \"no\") \"!\"\n".into(),
            ))
            .unwrap();
        assert!(!feed(&mut c.clone(), "maybe"));
        assert!(feed(&mut c, "no!"));
        assert!(c.compute_mask().unwrap().is_allowed(256));
        let mut c = g
            .compile(&GrammarSpec::Lark("start: /[0-9]{3}/".into()))
            .unwrap();
        assert!(feed(&mut c, "123"));
        assert!(c.is_stopped());
        let mut c = g.compile(&GrammarSpec::Regex("a+b".into())).unwrap();
        assert!(feed(&mut c, "aaab"));
        assert!(!feed(&mut c.clone(), "a"));
    }

    #[test]
    fn llama_cpp_json_gbnf_compiles_and_accepts_json() {
        let json_gbnf = r#"root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;
        let mut c = compiler()
            .compile(&GrammarSpec::Gbnf(json_gbnf.into()))
            .unwrap();
        assert!(!feed(&mut c.clone(), "[1]"), "root is an object");
        assert!(feed(&mut c, "{\"a\": [1.5, true, \"x\\u00e9\"]}"));
        assert!(c.compute_mask().unwrap().is_allowed(256));
    }

    #[test]
    fn bad_grammars_and_schemas_carry_the_compiler_message() {
        let g = compiler();
        let e = g
            .compile(&GrammarSpec::Gbnf("root ::= \"a\" undefined-rule\n".into()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid gbnf: Rule 'undefined-rule' not found"
        );
        let e = g
            .compile(&GrammarSpec::Lark("start: foo\n".into()))
            .unwrap_err();
        assert!(
            matches!(&e, ConstraintError::Compile { kind: "lark", message } if message.contains("foo")),
            "{e}"
        );
        let e = g
            .compile(&GrammarSpec::JsonSchema {
                schema: json!({"type": "strnig"}),
                strict: true,
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("invalid json_schema: "), "{e}");
        assert!(e.to_string().contains("strnig"), "{e}");
        let e = g.compile(&GrammarSpec::Regex("(a".into())).unwrap_err();
        assert!(e.to_string().starts_with("invalid regex: "), "{e}");
    }

    #[test]
    fn refused_token_is_an_error_not_a_panic() {
        let mut c = compiler().compile(&GrammarSpec::JsonObject).unwrap();
        let _ = c.compute_mask().unwrap();
        assert!(matches!(
            c.commit(u32::from(b'x')),
            Err(ConstraintError::Matcher(_))
        ));
        assert!(c.compute_mask().is_err());
        assert!(matches!(c.commit(9999), Err(ConstraintError::Matcher(_))));
    }

    #[test]
    fn vocabulary_errors_are_typed() {
        let tokenize: TokenizeFn = Arc::new(|_: &str| Vec::new());
        assert!(matches!(
            GrammarCompiler::new(Vec::new(), &[0], tokenize.clone()),
            Err(ConstraintError::Vocab(_))
        ));
        assert!(matches!(
            GrammarCompiler::new(vec![b"a".to_vec()], &[], tokenize.clone()),
            Err(ConstraintError::Vocab(_))
        ));
        assert!(matches!(
            GrammarCompiler::new(vec![b"a".to_vec()], &[3], tokenize),
            Err(ConstraintError::Vocab(_))
        ));
    }
}
