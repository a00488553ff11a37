//! Tokenizers built from GGUF metadata (SPM, BPE, WPM), identical to llama.cpp: the worker's text front door.
//!
//! Ported from llama.cpp `src/llama-vocab.cpp` and `src/unicode.cpp` (commit 0c1e570): vocabulary loading
//! and special-token detection, the special-token partition of the input, the three tokenizer sessions,
//! `token_to_piece` and `detokenize` (with its space clean-up).

mod bpe;
pub mod cli;
mod spm;
mod unicode;
#[rustfmt::skip]
#[allow(clippy::all)]
mod unicode_tables;
mod wpm;

use std::collections::HashSet;

use rustc_hash::FxHashMap as HashMap;

use crate::engine::gguf::{GgufError, GgufFile, Value, ValueType};

use bpe::PreTokenizer;
use unicode::{Splitter, char_to_byte};

pub use unicode::RegexError;

/// Errors while building a tokenizer from a GGUF file. Each names the metadata key or token at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer model {0:?} (supported: llama, gpt2, gemma4, bert)")]
    UnsupportedModel(String),
    #[error("unknown pre-tokenizer type {0:?} (tokenizer.ggml.pre)")]
    UnknownPre(String),
    #[error("{key} has {found} entries but the vocabulary has {n_vocab} tokens")]
    LengthMismatch {
        key: &'static str,
        found: usize,
        n_vocab: usize,
    },
    #[error("duplicate token in vocabulary: {text:?} has ids {first} and {second}")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    #[error("{key} = {id} is out of range: the vocabulary has {n_vocab} tokens")]
    BadTokenId {
        key: String,
        id: i64,
        n_vocab: usize,
    },
    #[error("{flag} is true, but {key} is not set")]
    MissingSpecial {
        flag: &'static str,
        key: &'static str,
    },
    #[error("the vocabulary is empty (tokenizer.ggml.tokens)")]
    EmptyVocab,
    #[error(transparent)]
    Regex(#[from] RegexError),
}

/// Token attributes (`llama_token_attr`, llama.cpp `include/llama.h`).
pub(crate) mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    pub const LSTRIP: u32 = 1 << 7;
    pub const RSTRIP: u32 = 1 << 8;
}

/// Which algorithm a vocabulary uses (`llama_vocab_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// SentencePiece BPE (`llama`).
    Spm,
    /// Byte-level BPE (`gpt2`, `gemma4`).
    Bpe,
    /// WordPiece (`bert`).
    Wpm,
}

/// The pre-tokenizer regex family (`llama_vocab_pre_type`, grouped by identical regex lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreType {
    /// `default` (and a missing `tokenizer.ggml.pre`): punctuation runs, GPT-2 words, digit runs, 3-digit groups.
    Default,
    /// `llama3`/`llama-bpe` (also dbrx, smaug, chatglm4): LLaMA-3's regex, digits in groups of up to 3.
    Llama3,
    /// `deepseek-llm`: newline, Latin/Greek/Cyrillic letter runs, punctuation, CJK runs, digit runs.
    DeepseekLlm,
    /// `deepseek-coder`: newline, letter runs, punctuation runs, CJK runs, single digits.
    DeepseekCoder,
    /// `deepseek-v3` (and hunyuan-dense, hy_v4, joyai-llm).
    Deepseek3,
    /// `falcon`: punctuation runs, GPT-2 words, 3-digit groups.
    Falcon,
    /// `starcoder` (and codeshell, exaone, minerva-7b, mellum2): single digits, then GPT-2 words.
    Starcoder,
    /// `refact`: as starcoder.
    Refact,
    /// `command-r`: as starcoder, without the space clean-up on decode.
    CommandR,
    /// `smollm`: as starcoder, without the space clean-up on decode.
    Smollm,
    /// `gpt-2` (and phi-2, olmo, jais, roberta-bpe, …): GPT-2's regex.
    Gpt2,
    /// `mpt`: GPT-2's regex.
    Mpt,
    /// `qwen2` (and stablelm2, hunyuan, grok-2, …): LLaMA-3's regex with single digits.
    Qwen2,
    /// `qwen35`: Qwen2's regex with combining marks (`\p{M}`) kept in words.
    Qwen35,
    /// `poro-chat`, `bloom`, `gpt3-finnish`: split at spaces and sentence punctuation.
    Poro,
    /// `viking`: Poro's regex, then single digits.
    Viking,
    /// `tekken` (Mistral Nemo): case-aware words, single digits.
    Tekken,
    /// `gpt-4o` (and llama4, kanana2, minimax-m2): case-aware words with contractions, 3-digit groups.
    Gpt4o,
    /// `seed-coder`.
    SeedCoder,
    /// `bailingmoe` (and llada-moe).
    Bailingmoe,
    /// `minicpm5`: 3-digit groups, then LLaMA-3-like words.
    Minicpm5,
    /// `gemma4`: SentencePiece-style BPE on raw UTF-8 with `▁` for spaces, split only at newlines.
    Gemma4,
}

/// One vocabulary entry (`llama_vocab::token_data`).
#[derive(Clone, Debug)]
pub(crate) struct TokenData {
    pub text: String,
    pub score: f32,
    pub attr: u32,
}

/// The vocabulary and the options the tokenizer sessions read.
#[derive(Debug)]
pub(crate) struct Vocab {
    pub tokens: Vec<TokenData>,
    token_to_id: HashMap<Vec<u8>, u32>,
    /// `"left right"` → merge rank.
    merges: HashMap<Vec<u8>, u32>,
    pub kind: VocabKind,
    pub pre: PreType,
    pub ignore_merges: bool,
    pub lowercase: bool,
    pub strip_accents: bool,
    /// Longest token text in bytes.
    pub max_token_len: usize,
    pub unk: Option<u32>,
}

impl Vocab {
    /// `text_to_token` over raw bytes.
    pub fn lookup(&self, text: &[u8]) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// `find_bpe_rank`.
    pub fn merge_rank(&self, left: &[u8], right: &[u8]) -> Option<u32> {
        let mut key = Vec::with_capacity(left.len() + right.len() + 1);
        key.extend_from_slice(left);
        key.push(b' ');
        key.extend_from_slice(right);
        self.merges.get(&key).copied()
    }

    /// `byte_to_token` for SPM: `<0xNN>`, else the byte itself as a token.
    pub fn byte_to_token(&self, b: u8) -> Option<u32> {
        self.lookup(format!("<0x{b:02X}>").as_bytes())
            .or_else(|| self.lookup(&[b]))
    }
}

/// A tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata. Immutable, `Send + Sync`: share one
/// behind an `Arc` between threads.
pub struct Tokenizer {
    vocab: Vocab,
    pre: Option<PreTokenizer>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    sep: Option<u32>,
    pad: Option<u32>,
    /// Fill-in-the-middle tokens: prefix, suffix, middle, repository, file separator.
    fim: FimTokens,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
    /// `llama_vocab_get_add_sep`: WordPiece (and the jina-v1-en, jina-v2-code, roberta-bpe
    /// pre-tokenizers) by default, `tokenizer.ggml.add_sep_token` otherwise (used by reranking).
    add_sep: bool,
    add_space_prefix: bool,
    escape_whitespaces: bool,
    clean_spaces: bool,
    /// Control, user-defined and unknown tokens, longest text first (`cache_special_tokens`).
    special_cache: Vec<u32>,
    /// `token_to_piece(id, special = true)` of every token.
    pieces: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.vocab.kind)
            .field("pre", &self.vocab.pre)
            .field("n_vocab", &self.vocab.tokens.len())
            .field("n_merges", &self.vocab.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// The fill-in-the-middle tokens of a vocabulary, as llama.cpp finds them: the GGUF keys
/// `tokenizer.ggml.fim_{pre,suf,mid,rep,sep}_token_id` (and the older `prefix/suffix/middle_token_id`,
/// which win when both are present, as in `llama_vocab::impl::load`), else the token texts llama.cpp
/// recognises (`<|fim_prefix|>`, `<fim_prefix>`, `<PRE>`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FimTokens {
    /// Before the prefix (`FIM_PRE`).
    pub pre: Option<u32>,
    /// Before the suffix (`FIM_SUF`).
    pub suf: Option<u32>,
    /// Where the middle is generated (`FIM_MID`).
    pub mid: Option<u32>,
    /// Before the repository name (`FIM_REP`).
    pub rep: Option<u32>,
    /// Before each file name (`FIM_SEP`).
    pub sep: Option<u32>,
}

/// A piece of the input after the special-token partition.
#[derive(Clone, Copy, Debug)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

const K_BOS: &str = "tokenizer.ggml.bos_token_id";
const K_EOS: &str = "tokenizer.ggml.eos_token_id";
const K_SEP: &str = "tokenizer.ggml.seperator_token_id";

/// Options a `tokenizer.ggml.pre` name sets besides its regex family.
struct PreOptions {
    pre: PreType,
    clean_spaces: bool,
    ignore_merges: bool,
    add_bos: Option<bool>,
    escape_whitespaces: bool,
    no_bos: bool,
}

fn pre_options(name: &str) -> Option<PreOptions> {
    use PreType::*;
    let o = |pre, clean_spaces| PreOptions {
        pre,
        clean_spaces,
        ignore_merges: false,
        add_bos: None,
        escape_whitespaces: false,
        no_bos: false,
    };
    Some(match name {
        "default" => o(Default, true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreOptions {
            ignore_merges: true,
            add_bos: Some(true),
            ..o(Llama3, true)
        },
        "dbrx" | "smaug-bpe" => o(Llama3, true),
        "glm4" | "chatglm-bpe" => PreOptions {
            no_bos: true,
            ..o(Llama3, true)
        },
        "deepseek-llm" => o(DeepseekLlm, false),
        "deepseek-coder" => o(DeepseekCoder, false),
        "deepseek-v3" | "hunyuan-dense" | "hy_v4" | "joyai-llm" => o(Deepseek3, false),
        "falcon" => o(Falcon, true),
        "mpt" => o(Mpt, true),
        "starcoder" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => o(Starcoder, true),
        "refact" => o(Refact, true),
        "command-r" => o(CommandR, false),
        "smollm" => o(Smollm, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "olmo" | "jais" | "exaone4" => o(Gpt2, true),
        "trillion" | "granite-docling" => o(Gpt2, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open"
        | "grok-2" => o(Qwen2, false),
        "stablelm2" | "megrez" => o(Qwen2, true),
        "qwen35" => o(Qwen35, false),
        "poro-chat" => o(Poro, false),
        "bloom" | "gpt3-finnish" => o(Poro, true),
        "viking" => o(Viking, false),
        "tekken" => PreOptions {
            ignore_merges: true,
            add_bos: Some(true),
            ..o(Tekken, false)
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => o(Gpt4o, false),
        "seed-coder" => o(SeedCoder, false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => o(Bailingmoe, false),
        "minicpm5" => PreOptions {
            ignore_merges: true,
            ..o(Minicpm5, true)
        },
        "gemma4" | "granite-embed-multi-311m" => PreOptions {
            escape_whitespaces: true,
            ..o(Gemma4, true)
        },
        _ => return None,
    })
}

/// An optional token id from metadata, bounds-checked against the vocabulary.
fn opt_id(f: &GgufFile, key: &str, n_vocab: usize) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = f.get(key) else {
        return Ok(None);
    };
    let id = v.as_int().ok_or_else(|| GgufError::WrongType {
        key: key.to_string(),
        expected: "an integer",
        found: v.describe(),
    })?;
    if id < 0 || id >= n_vocab as i128 {
        return Err(TokenizerError::BadTokenId {
            key: key.to_string(),
            id: id.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            n_vocab,
        });
    }
    Ok(Some(id as u32))
}

fn opt_bool(f: &GgufFile, key: &str) -> Result<Option<bool>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(_) => Ok(Some(f.get_bool(key)?)),
    }
}

impl Tokenizer {
    /// Build the tokenizer from `tokenizer.ggml.*` metadata (`llama_vocab::impl::load`). Works on vocab-only
    /// GGUF files. Errors: missing or mistyped keys, an unsupported `tokenizer.ggml.model`, an unknown
    /// `tokenizer.ggml.pre`, array lengths that disagree with the vocabulary, duplicate tokens, and any token
    /// id outside the vocabulary.
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model = f.get_str("tokenizer.ggml.model")?.to_string();
        let mut pre_name = match f.get("tokenizer.ggml.pre") {
            Some(_) => Some(f.get_str("tokenizer.ggml.pre")?.to_string()),
            None => None,
        };
        let kind = match model.as_str() {
            "llama" => VocabKind::Spm,
            "bert" => VocabKind::Wpm,
            "gpt2" => VocabKind::Bpe,
            "gemma4" => {
                pre_name = Some("gemma4".into());
                VocabKind::Bpe
            }
            _ => return Err(TokenizerError::UnsupportedModel(model)),
        };

        let texts = f.get_str_array("tokenizer.ggml.tokens")?;
        let n_vocab = texts.len();
        if n_vocab == 0 {
            return Err(TokenizerError::EmptyVocab);
        }

        // defaults of each model type
        let (mut bos, mut eos, mut unk, mut sep, mut pad): (Option<u32>, Option<u32>, _, _, _) =
            match kind {
                VocabKind::Spm => (Some(1), Some(2), Some(0), None, None),
                VocabKind::Wpm => (Some(101), None, Some(100), Some(102), Some(0)),
                VocabKind::Bpe if model == "gemma4" => (None, None, None, None, None),
                VocabKind::Bpe => (Some(11), Some(11), None, None, None),
            };
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n_vocab);
        bos = in_range(bos);
        eos = in_range(eos);
        unk = in_range(unk);
        sep = in_range(sep);
        pad = in_range(pad);

        let mut add_space_prefix;
        let clean_spaces;
        let mut escape_whitespaces = false;
        let mut ignore_merges = false;
        let mut add_bos = false;
        let mut add_eos = false;
        let mut add_sep = false;
        let mut pre = PreType::Default;
        let mut lowercase = true;
        match kind {
            VocabKind::Bpe => {
                add_space_prefix = false;
                let name = pre_name.as_deref().unwrap_or("default");
                if pre_name.is_none() {
                    tracing::warn!(
                        "missing tokenizer.ggml.pre, using 'default': generation quality will be degraded"
                    );
                }
                let o = pre_options(name)
                    .ok_or_else(|| TokenizerError::UnknownPre(name.to_string()))?;
                pre = o.pre;
                clean_spaces = o.clean_spaces;
                ignore_merges = o.ignore_merges;
                escape_whitespaces = o.escape_whitespaces;
                if let Some(b) = o.add_bos {
                    add_bos = b;
                }
                if o.no_bos {
                    bos = None;
                }
                if name == "whitespace" {
                    lowercase = false;
                }
                if matches!(name, "jina-v1-en" | "jina-v2-code" | "roberta-bpe") {
                    add_sep = true;
                }
            }
            VocabKind::Spm => {
                add_space_prefix = true;
                clean_spaces = false;
                add_bos = true;
            }
            VocabKind::Wpm => {
                add_space_prefix = false;
                clean_spaces = true;
                add_bos = true;
                add_sep = true;
            }
        }
        if let Some(b) = opt_bool(f, "tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = b;
        }

        // llama.cpp accepts FLOAT32 or INT32 scores
        let scores: Option<Vec<f32>> = match f.get("tokenizer.ggml.scores") {
            None => None,
            Some(Value::Array(a)) if a.elem_type() == ValueType::I32 => Some(
                f.get_i32_array("tokenizer.ggml.scores")?
                    .into_iter()
                    .map(|i| i as f32)
                    .collect(),
            ),
            Some(Value::Array(a)) if a.elem_type() == ValueType::F32 => {
                Some(f.get_f32_array("tokenizer.ggml.scores")?)
            }
            Some(v) => {
                return Err(GgufError::WrongType {
                    key: "tokenizer.ggml.scores".into(),
                    expected: "ARRAY of FLOAT32 or INT32",
                    found: v.describe(),
                }
                .into());
            }
        };
        if let Some(s) = &scores
            && s.len() < n_vocab
        {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.scores",
                found: s.len(),
                n_vocab,
            });
        }
        let types: Option<Vec<i32>> = match f.get("tokenizer.ggml.token_type") {
            None => None,
            Some(_) => Some(f.get_i32_array("tokenizer.ggml.token_type")?),
        };
        if let Some(t) = &types
            && t.len() < n_vocab
        {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.token_type",
                found: t.len(),
                n_vocab,
            });
        }

        let mut tokens = Vec::with_capacity(n_vocab);
        let mut token_to_id: HashMap<Vec<u8>, u32> =
            HashMap::with_capacity_and_hasher(n_vocab, Default::default());
        let mut max_token_len = 0;
        for (i, &t) in texts.iter().enumerate() {
            let text = if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.to_string()
            };
            if let Some(&first) = token_to_id.get(text.as_bytes()) {
                return Err(TokenizerError::DuplicateToken {
                    text,
                    first,
                    second: i as u32,
                });
            }
            token_to_id.insert(text.as_bytes().to_vec(), i as u32);
            max_token_len = max_token_len.max(text.len());
            let attr = match types.as_ref().map(|t| t[i]) {
                None | Some(1) => attr::NORMAL,
                Some(2) => attr::UNKNOWN,
                Some(3) => attr::CONTROL,
                Some(4) => attr::USER_DEFINED,
                Some(5) => attr::UNUSED,
                Some(6) => attr::BYTE,
                Some(_) => 0,
            };
            tokens.push(TokenData {
                text,
                score: scores.as_ref().map_or(0.0, |s| s[i]),
                attr,
            });
        }

        let mut merges = HashMap::default();
        if kind == VocabKind::Bpe {
            let list = f.get_str_array("tokenizer.ggml.merges")?;
            merges.reserve(list.len());
            for (rank, m) in list.iter().enumerate() {
                // llama.cpp splits at the first space after the first byte
                if m.len() > 1 && m.as_bytes()[1..].contains(&b' ') {
                    merges.entry(m.as_bytes().to_vec()).or_insert(rank as u32);
                }
            }
        }

        let mut vocab = Vocab {
            tokens,
            token_to_id,
            merges,
            kind,
            pre,
            ignore_merges,
            lowercase,
            strip_accents: lowercase,
            max_token_len,
            unk,
        };

        // special token ids from metadata (bounds-checked)
        let mut eot = None;
        let mut eom = None;
        let mut fim_pad = None;
        let mut fim_pre = None;
        let mut fim_suf = None;
        let mut fim_mid = None;
        let mut fim_rep = None;
        let mut fim_sep = None;
        {
            let set = |key: &str, slot: &mut Option<u32>| -> Result<(), TokenizerError> {
                if let Some(id) = opt_id(f, key, n_vocab)? {
                    *slot = Some(id);
                }
                Ok(())
            };
            set(K_BOS, &mut bos)?;
            set(K_EOS, &mut eos)?;
            set("tokenizer.ggml.eot_token_id", &mut eot)?;
            set("tokenizer.ggml.eom_token_id", &mut eom)?;
            set("tokenizer.ggml.unknown_token_id", &mut vocab.unk)?;
            set(K_SEP, &mut sep)?;
            set("tokenizer.ggml.padding_token_id", &mut pad)?;
            let mut mask = None;
            set("tokenizer.ggml.mask_token_id", &mut mask)?;
            set("tokenizer.ggml.fim_pre_token_id", &mut fim_pre)?;
            set("tokenizer.ggml.fim_suf_token_id", &mut fim_suf)?;
            set("tokenizer.ggml.fim_mid_token_id", &mut fim_mid)?;
            set("tokenizer.ggml.prefix_token_id", &mut fim_pre)?;
            set("tokenizer.ggml.suffix_token_id", &mut fim_suf)?;
            set("tokenizer.ggml.middle_token_id", &mut fim_mid)?;
            set("tokenizer.ggml.fim_pad_token_id", &mut fim_pad)?;
            set("tokenizer.ggml.fim_rep_token_id", &mut fim_rep)?;
            set("tokenizer.ggml.fim_sep_token_id", &mut fim_sep)?;
        }
        if let Some(b) = opt_bool(f, "tokenizer.ggml.add_bos_token")? {
            add_bos = b;
        }
        if let Some(b) = opt_bool(f, "tokenizer.ggml.add_eos_token")? {
            add_eos = b;
        }
        if let Some(b) = opt_bool(f, "tokenizer.ggml.add_sep_token")? {
            add_sep = b;
        }
        if pre == PreType::Gemma4 && !add_bos {
            add_bos = true;
        }
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingSpecial {
                flag: "tokenizer.ggml.add_bos_token",
                key: K_BOS,
            });
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecial {
                flag: "tokenizer.ggml.add_eos_token",
                key: K_EOS,
            });
        }
        if kind == VocabKind::Wpm && (bos.is_none() || sep.is_none()) {
            return Err(TokenizerError::MissingSpecial {
                flag: "a WordPiece vocabulary",
                key: if bos.is_none() { K_BOS } else { K_SEP },
            });
        }
        if let Some(b) = opt_bool(f, "tokenizer.ggml.normalizer.lowercase")? {
            vocab.lowercase = b;
        }
        vocab.strip_accents = vocab.lowercase;
        if let Some(b) = opt_bool(f, "tokenizer.ggml.normalizer.strip_accents")? {
            vocab.strip_accents = b;
        }

        // auto-detect special tokens by their text, in id order
        let mut mark_control = |tokens: &mut [TokenData], id: u32| {
            tokens[id as usize].attr |= attr::CONTROL;
        };
        let ids_of = |vocab: &Vocab, names: &[&str]| -> Vec<u32> {
            let mut v: Vec<u32> = names
                .iter()
                .filter_map(|n| vocab.lookup(n.as_bytes()))
                .collect();
            v.sort_unstable();
            v
        };
        let detect = |vocab: &mut Vocab,
                      slot: &mut Option<u32>,
                      names: &[&str],
                      mark: &mut dyn FnMut(&mut [TokenData], u32)| {
            if slot.is_none()
                && let Some(&id) = ids_of(vocab, names).first()
            {
                *slot = Some(id);
                mark(&mut vocab.tokens, id);
            }
        };
        detect(
            &mut vocab,
            &mut eot,
            &[
                "<|eot_id|>",
                "<|im_end|>",
                "<|end|>",
                "<end_of_turn>",
                "<|endoftext|>",
                "<|end_of_text|>",
                "<EOT>",
                "_<EOT>",
                "[EOT]",
                "<｜end▁of▁sentence｜>",
                "<end_of_utterance>",
            ],
            &mut mark_control,
        );
        detect(&mut vocab, &mut eom, &["<|eom_id|>"], &mut mark_control);
        for (slot, names) in [
            (
                &mut fim_pre,
                &[
                    "<|fim_prefix|>",
                    "<fim-prefix>",
                    "<fim_prefix>",
                    "<｜fim▁begin｜>",
                    "<PRE>",
                    "▁<PRE>",
                    "<|code_prefix|>",
                    "<|prefix|>",
                ][..],
            ),
            (
                &mut fim_suf,
                &[
                    "<|fim_suffix|>",
                    "<fim-suffix>",
                    "<fim_suffix>",
                    "<｜fim▁hole｜>",
                    "<SUF>",
                    "▁<SUF>",
                    "<|code_suffix|>",
                    "<|suffix|>",
                ][..],
            ),
            (
                &mut fim_mid,
                &[
                    "<|fim_middle|>",
                    "<fim-middle>",
                    "<fim_middle>",
                    "<｜fim▁end｜>",
                    "<MID>",
                    "▁<MID>",
                    "<|code_middle|>",
                    "<|middle|>",
                ][..],
            ),
        ] {
            detect(&mut vocab, slot, names, &mut mark_control);
        }
        detect(
            &mut vocab,
            &mut fim_pad,
            &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
            &mut mark_control,
        );
        detect(
            &mut vocab,
            &mut fim_rep,
            &[
                "<|fim_repo|>",
                "<|repo_name|>",
                "<fim-repo>",
                "<REPO>",
                "<reponame>",
            ],
            &mut mark_control,
        );
        detect(
            &mut vocab,
            &mut fim_sep,
            &["<|file_sep|>"],
            &mut mark_control,
        );

        // control tokens named "unused"
        for t in vocab.tokens.iter_mut() {
            if t.attr & attr::CONTROL != 0 && t.text.contains("unused") {
                t.attr |= attr::UNUSED;
            }
        }

        // end-of-generation tokens
        let mut eog: HashSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for id in ids_of(
            &vocab,
            &[
                "<|eot_id|>",
                "<|im_end|>",
                "<|end|>",
                "<|return|>",
                "<|call|>",
                "<|flush|>",
                "<|calls|>",
                "<end_of_turn>",
                "<|endoftext|>",
                "</s>",
                "<|eom_id|>",
                "<EOT>",
                "_<EOT>",
                "[EOT]",
                "[EOS]",
                "<|end_of_text|>",
                "<end_of_utterance>",
                "<eos>",
                "<turn|>",
                "<|tool_response>",
                "<｜end▁of▁sentence｜>",
                "[e~[",
            ],
        ) {
            eog.insert(id);
            vocab.tokens[id as usize].attr |= attr::CONTROL;
        }
        for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = vocab.lookup(name.as_bytes()) {
                vocab.tokens[id as usize].attr = attr::USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        let find_eog = |eog: &HashSet<u32>, vocab: &Vocab, s: &str| {
            eog.iter()
                .copied()
                .find(|&id| vocab.tokens[id as usize].text == s)
        };
        let has = |eog: &HashSet<u32>, vocab: &Vocab, s: &str| find_eog(eog, vocab, s).is_some();
        let (ret, call, calls, flush, end) = (
            has(&eog, &vocab, "<|return|>"),
            has(&eog, &vocab, "<|call|>") || has(&eog, &vocab, "<|calls|>"),
            has(&eog, &vocab, "<|calls|>"),
            has(&eog, &vocab, "<|flush|>"),
            find_eog(&eog, &vocab, "<|end|>"),
        );
        let _ = calls;
        if let Some(end) = end
            && call
            && (ret || flush)
        {
            eog.remove(&end);
            vocab.tokens[end as usize].attr = attr::USER_DEFINED;
        }
        if has(&eog, &vocab, "<|tool_response>")
            && let Some(s) = find_eog(&eog, &vocab, "</s>")
        {
            eog.remove(&s);
            vocab.tokens[s as usize].attr = attr::NORMAL;
        }

        // special tokens cache: control, user-defined and unknown tokens, longest text first
        let mut special_cache: Vec<u32> = (0..n_vocab as u32)
            .filter(|&id| {
                vocab.tokens[id as usize].attr
                    & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN)
                    != 0
            })
            .collect();
        special_cache.sort_by(|&a, &b| {
            vocab.tokens[b as usize]
                .text
                .len()
                .cmp(&vocab.tokens[a as usize].text.len())
                .then(a.cmp(&b))
        });

        // per-model token attributes (llama.cpp sets them from the model name)
        let name = f
            .get("general.name")
            .and_then(|_| f.get_str("general.name").ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let arch = f.architecture().unwrap_or("");
        let pre_raw = pre_name.as_deref().unwrap_or("");
        let set_attr = |vocab: &mut Vocab, text: &str, bit: u32, on: bool| {
            if let Some(id) = vocab.lookup(text.as_bytes()) {
                let a = &mut vocab.tokens[id as usize].attr;
                *a = if on { *a | bit } else { *a & !bit };
            }
        };
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre_raw.contains(p))
            || ["nomic-bert-moe", "jina-bert-v3"]
                .iter()
                .any(|p| arch.contains(p))
        {
            set_attr(&mut vocab, "<mask>", attr::LSTRIP, true);
        } else if name.contains("phi-3") || name.contains("phi3") {
            for &id in &special_cache {
                vocab.tokens[id as usize].attr |= attr::RSTRIP;
            }
            set_attr(&mut vocab, "</s>", attr::RSTRIP, true);
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                set_attr(&mut vocab, t, attr::RSTRIP, false);
            }
        } else if name.contains("modern-bert") {
            set_attr(&mut vocab, "[MASK]", attr::LSTRIP, true);
        }

        let pre_tok = if kind == VocabKind::Bpe {
            let (exprs, byte_encode) = bpe::regexes(pre);
            let splitters = exprs
                .iter()
                .map(|e| Splitter::new(e))
                .collect::<Result<Vec<_>, _>>()?;
            Some(PreTokenizer {
                splitters,
                byte_encode,
            })
        } else {
            None
        };

        let mut tok = Tokenizer {
            vocab,
            pre: pre_tok,
            bos,
            eos,
            eot,
            eom,
            sep,
            pad,
            fim: FimTokens {
                pre: fim_pre,
                suf: fim_suf,
                mid: fim_mid,
                rep: fim_rep,
                sep: fim_sep,
            },
            eog,
            add_bos,
            add_eos,
            add_sep,
            add_space_prefix,
            escape_whitespaces,
            clean_spaces,
            special_cache,
            pieces: Vec::new(),
        };
        tok.pieces = (0..n_vocab as u32).map(|id| tok.make_piece(id)).collect();
        Ok(tok)
    }

    /// `token_to_piece(id, special = true, lstrip = 0)` computed from the vocabulary (the cache's source).
    fn make_piece(&self, id: u32) -> Vec<u8> {
        let t = &self.vocab.tokens[id as usize];
        let a = t.attr;
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            return t.text.as_bytes().to_vec();
        }
        let unescape = || t.text.replace('\u{2581}', " ").into_bytes();
        if a & attr::NORMAL != 0 {
            return match self.vocab.kind {
                VocabKind::Spm | VocabKind::Wpm => unescape(),
                VocabKind::Bpe if self.escape_whitespaces => unescape(),
                VocabKind::Bpe => decode_byte_level(&t.text),
            };
        }
        if a & attr::BYTE != 0 {
            // `<0xNN>`: the two hex digits at [3, 5)
            let hex = t.text.get(3..5).unwrap_or("");
            return u8::from_str_radix(hex, 16)
                .map(|b| vec![b])
                .unwrap_or_default();
        }
        Vec::new()
    }

    /// `llama_tokenize(text, add_special, parse_special)`: ids of `text`. `add_special` adds BOS/EOS (CLS/SEP
    /// for WordPiece) as the metadata asks; `parse_special` lets control-token text in the input become
    /// those tokens (user-defined tokens are always recognised).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = if text.is_empty() {
            Vec::new()
        } else {
            self.partition(text, parse_special)
        };
        let mut out = Vec::new();
        let v = &self.vocab;
        match v.kind {
            VocabKind::Spm => {
                let mut prev_special = true;
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                for fr in fragments {
                    match fr {
                        Fragment::Text(s, e) => {
                            let mut t = String::with_capacity(e - s + 1);
                            if self.add_space_prefix && prev_special {
                                t.push(' ');
                            }
                            t.push_str(&text[s..e]);
                            let t = t.replace(' ', "\u{2581}");
                            spm::tokenize(v, t.as_bytes(), &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            VocabKind::Bpe => {
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                if let Some(pre) = &self.pre {
                    for fr in fragments {
                        match fr {
                            Fragment::Text(s, e) => {
                                if self.escape_whitespaces {
                                    let t = text[s..e].replace(' ', "\u{2581}");
                                    bpe::tokenize(v, pre, &t, &mut out);
                                } else {
                                    bpe::tokenize(v, pre, &text[s..e], &mut out);
                                }
                            }
                            Fragment::Token(id) => out.push(id),
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            VocabKind::Wpm => {
                if add_special {
                    out.extend(self.bos);
                }
                for fr in fragments {
                    match fr {
                        Fragment::Text(s, e) => wpm::tokenize(v, &text[s..e], &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
                if add_special {
                    out.extend(self.sep);
                }
            }
        }
        out
    }

    /// `tokenizer_st_partition`: cut the input at special-token texts, longest tokens first.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text(0, text.len())];
        let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r');
        for &id in &self.special_cache {
            let data = &self.vocab.tokens[id as usize];
            if !parse_special && data.attr & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let needle = data.text.as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(s, e) if text[*s..*e].contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for fr in frags {
                let Fragment::Text(mut s, e) = fr else {
                    next.push(fr);
                    continue;
                };
                loop {
                    let Some(m) = text[s..e].find(needle).map(|p| s + p) else {
                        next.push(Fragment::Text(s, e));
                        break;
                    };
                    if m > s {
                        let mut le = m;
                        if data.attr & attr::LSTRIP != 0 {
                            while le > s && is_space(text.as_bytes()[le - 1]) {
                                le -= 1;
                            }
                        }
                        if le > s {
                            next.push(Fragment::Text(s, le));
                        }
                    }
                    next.push(Fragment::Token(id));
                    let mut rs = m + needle.len();
                    if rs < e {
                        if data.attr & attr::RSTRIP != 0 {
                            while rs < e && is_space(text.as_bytes()[rs]) {
                                rs += 1;
                            }
                        }
                        if rs < e {
                            s = rs;
                            continue;
                        }
                    }
                    break;
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes of one token as `llama_token_to_piece(id, lstrip = 0, special)` gives them: `▁` turned back
    /// into spaces (SPM/WPM), byte-level BPE characters mapped back to bytes, `<0xNN>` tokens as their byte.
    /// Control and unknown tokens give their text only when `special`; an id outside the vocabulary gives
    /// no bytes.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(t) = self.vocab.tokens.get(id as usize) else {
            return Vec::new();
        };
        if !special && t.attr & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return Vec::new();
        }
        self.pieces[id as usize].clone()
    }

    /// ids → text like `llama_detokenize(remove_special = false, unparse_special = special)`: the pieces
    /// joined, the first token's leading space dropped where the vocabulary adds one, llama.cpp's space
    /// clean-up for BPE/WPM; invalid UTF-8 replaced by U+FFFD at the very end only.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let piece = self.token_to_piece(id, special);
            let p = if remove_space && piece.first() == Some(&b' ') {
                &piece[1..]
            } else {
                &piece[..]
            };
            bytes.extend_from_slice(p);
            remove_space = false;
        }
        if self.clean_spaces {
            bytes = clean_up_spaces(&bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.vocab.tokens.len()
    }
    /// Beginning-of-sequence token (`[CLS]` for WordPiece).
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    /// End-of-turn token (from metadata, else detected by its text as llama.cpp does).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }
    /// Separator token (`[SEP]` for WordPiece).
    pub fn sep(&self) -> Option<u32> {
        self.sep
    }
    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }
    /// The fill-in-the-middle tokens ([`FimTokens`]).
    pub fn fim(&self) -> FimTokens {
        self.fim
    }

    /// End-of-message token (`<|eom_id|>`).
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }
    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.vocab.unk
    }
    /// Whether generation stops at `id`: EOS, EOT, EOM and the other end-of-generation tokens llama.cpp marks.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
    /// `llama_vocab_get_add_sep`: whether a pair of texts (a reranker's query and document) takes the
    /// separator token between them (llama-server's `format_prompt_rerank`).
    pub fn add_sep(&self) -> bool {
        self.add_sep
    }
    /// The raw vocabulary string of a token (e.g. for `bos_token` in chat templates).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.tokens.get(id as usize).map(|t| t.text.as_str())
    }
    /// Whether `id` is a control token (rendered only with `special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab
            .tokens
            .get(id as usize)
            .is_some_and(|t| t.attr & attr::CONTROL != 0)
    }
    /// Whether [`Tokenizer::decode`] applies llama.cpp's space clean-up (" ," → ",", " 's" → "'s", …).
    pub fn cleans_spaces(&self) -> bool {
        self.clean_spaces
    }
    /// llama.cpp's detokenizer space clean-up, as [`Tokenizer::decode`] applies it when
    /// [`Tokenizer::cleans_spaces`]: " ?", " !", " .", " ," lose the space; a lone `'` between spaces loses
    /// both; " 's", " 'm", " 're", " 've" lose the space.
    pub fn clean_up(text: &str) -> String {
        String::from_utf8_lossy(&clean_up_spaces(text.as_bytes())).into_owned()
    }
    /// The vocabulary's algorithm.
    pub fn kind(&self) -> VocabKind {
        self.vocab.kind
    }
    /// The BPE pre-tokenizer family (`Default` for SPM and WPM).
    pub fn pre_type(&self) -> PreType {
        self.vocab.pre
    }
}

/// `llama_decode_text`: byte-level BPE characters back to bytes; a character outside the 256 becomes
/// `[UNK_BYTE_0x..]` as in llama.cpp.
fn decode_byte_level(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// The three clean-up passes of `llama_vocab::impl::detokenize` when `clean_spaces` is set, on bytes.
fn clean_up_spaces(text: &[u8]) -> Vec<u8> {
    // pass 1: " ?", " !", " .", " ," lose the space
    let mut a: Vec<u8> = Vec::with_capacity(text.len());
    for (i, &x) in text.iter().enumerate() {
        if i > 0 && text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            a.pop();
        }
        a.push(x);
    }
    // pass 2: a single apostrophe between spaces loses both spaces
    let mut src = a;
    let mut b: Vec<u8> = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let x = src[i];
        if i > 0 && x == b'\'' && i + 1 < src.len() && src[i - 1] == b' ' && src[i + 1] == b' ' {
            b.pop();
            i += 1;
            src[i] = 0;
        }
        b.push(x);
        i += 1;
    }
    // pass 3: " 's", " 'm", " 're", " 've" lose the space
    let mut c: Vec<u8> = Vec::with_capacity(b.len());
    for i in 0..b.len() {
        let x = b[i];
        if i > 0 && b[i - 1] == b' ' && x == b'\'' && i + 1 < b.len() {
            let x1 = b[i + 1];
            if x1 == b's' || x1 == b'm' {
                c.pop();
            } else if x1 != b't' && x1 != b'd' && i + 2 < b.len() {
                let x2 = b[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    c.pop();
                }
            }
        }
        c.push(x);
    }
    c
}

/// Streaming-safe detokenizer: push ids, get the text that is complete so far. A UTF-8 character split across
/// tokens is held back until complete; invalid UTF-8 becomes U+FFFD and never panics. Pieces are rendered
/// as `token_to_piece(id, special)` without the whole-text clean-ups of [`Tokenizer::decode`].
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    special: bool,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder that leaves control tokens out (llama-server's default for generated text).
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self::with_special(tok, false)
    }
    /// A decoder that renders control tokens' text when `special`.
    pub fn with_special(tok: &'a Tokenizer, special: bool) -> Self {
        StreamDecoder {
            tok,
            special,
            pending: Vec::new(),
        }
    }
    /// Add one token; returns the text completed by it (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let piece = self.tok.token_to_piece(id, self.special);
        self.pending.extend_from_slice(&piece);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix was just validated
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        None => {
                            // an incomplete character at the end: keep it for the next token
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
        out
    }
    /// Flush what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF writer for hand-made vocabularies (metadata only, no tensors).
    #[derive(Default)]
    struct Gguf {
        kv: Vec<u8>,
        n: u64,
    }

    enum V<'a> {
        U32(u32),
        Bool(bool),
        Str(&'a str),
        Strs(&'a [&'a str]),
        I32s(&'a [i32]),
        F32s(&'a [f32]),
    }

    impl Gguf {
        fn s(buf: &mut Vec<u8>, s: &str) {
            buf.extend((s.len() as u64).to_le_bytes());
            buf.extend(s.as_bytes());
        }
        fn kv(mut self, k: &str, v: V) -> Self {
            Self::s(&mut self.kv, k);
            let b = &mut self.kv;
            match v {
                V::U32(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                V::Bool(x) => {
                    b.extend(7u32.to_le_bytes());
                    b.push(x as u8);
                }
                V::Str(x) => {
                    b.extend(8u32.to_le_bytes());
                    Self::s(b, x);
                }
                V::Strs(xs) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(8u32.to_le_bytes());
                    b.extend((xs.len() as u64).to_le_bytes());
                    for x in xs {
                        Self::s(b, x);
                    }
                }
                V::I32s(xs) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(5u32.to_le_bytes());
                    b.extend((xs.len() as u64).to_le_bytes());
                    xs.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
                V::F32s(xs) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(6u32.to_le_bytes());
                    b.extend((xs.len() as u64).to_le_bytes());
                    xs.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
            }
            self.n += 1;
            self
        }
        fn open(self) -> GgufFile {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
            b.extend(self.n.to_le_bytes());
            b.extend(self.kv);
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
            GgufFile::from_bytes(b).expect("valid GGUF image")
        }
    }

    const BPE_TOKENS: &[&str] = &["a", "b", "ab", "\u{120}", "\u{120}ab", "<|end|>", "c"];

    fn bpe(extra: impl FnOnce(Gguf) -> Gguf) -> Result<Tokenizer, TokenizerError> {
        let g = Gguf::default()
            .kv("tokenizer.ggml.model", V::Str("gpt2"))
            .kv("tokenizer.ggml.pre", V::Str("gpt-2"))
            .kv("tokenizer.ggml.tokens", V::Strs(BPE_TOKENS))
            .kv("tokenizer.ggml.token_type", V::I32s(&[1, 1, 1, 1, 1, 3, 1]))
            .kv("tokenizer.ggml.merges", V::Strs(&["a b", "\u{120} ab"]))
            .kv("tokenizer.ggml.eos_token_id", V::U32(5));
        Tokenizer::from_gguf(&extra(g).open())
    }

    #[test]
    fn tiny_bpe_merges_and_specials() {
        let t = bpe(|g| g).unwrap();
        assert_eq!(t.encode("ab ab", false, false), [2, 4]);
        assert_eq!(t.encode("ab<|end|>", false, true), [2, 5]);
        assert_eq!(t.decode(&[2, 4, 5], true), "ab ab<|end|>");
        assert_eq!(t.decode(&[2, 4, 5], false), "ab ab");
        assert!(t.is_eog(5), "eos and <|end|> end generation");
        assert_eq!(t.eot(), Some(5));
        // "c" has a token but "d" has none and no byte token: llama.cpp drops it
        assert_eq!(t.encode("cd", false, false), [6]);
    }

    #[test]
    fn hostile_metadata_is_a_typed_error() {
        let e = bpe(|g| g.kv("tokenizer.ggml.bos_token_id", V::U32(7))).unwrap_err();
        assert!(
            matches!(
                e,
                TokenizerError::BadTokenId {
                    id: 7,
                    n_vocab: 7,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("tokenizer.ggml.bos_token_id"));

        let e = Tokenizer::from_gguf(
            &Gguf::default()
                .kv("tokenizer.ggml.model", V::Str("gpt2"))
                .kv("tokenizer.ggml.pre", V::Str("klingon"))
                .kv("tokenizer.ggml.tokens", V::Strs(BPE_TOKENS))
                .kv("tokenizer.ggml.merges", V::Strs(&[]))
                .open(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"klingon\""), "{e}");

        let e = Tokenizer::from_gguf(
            &Gguf::default()
                .kv("tokenizer.ggml.model", V::Str("t5"))
                .kv("tokenizer.ggml.tokens", V::Strs(BPE_TOKENS))
                .open(),
        )
        .unwrap_err();
        assert!(
            matches!(e, TokenizerError::UnsupportedModel(ref m) if m == "t5"),
            "{e}"
        );

        let e = Tokenizer::from_gguf(
            &Gguf::default()
                .kv("tokenizer.ggml.model", V::Str("llama"))
                .kv("tokenizer.ggml.tokens", V::Strs(&["<unk>", "<s>", "</s>"]))
                .kv("tokenizer.ggml.scores", V::F32s(&[0.0]))
                .open(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                TokenizerError::LengthMismatch {
                    found: 1,
                    n_vocab: 3,
                    ..
                }
            ),
            "{e}"
        );

        let e = Tokenizer::from_gguf(
            &Gguf::default()
                .kv("tokenizer.ggml.model", V::Str("llama"))
                .kv("tokenizer.ggml.tokens", V::Strs(&["<unk>", "<s>", "<s>"]))
                .open(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                TokenizerError::DuplicateToken {
                    first: 1,
                    second: 2,
                    ..
                }
            ),
            "{e}"
        );

        let e = Tokenizer::from_gguf(
            &Gguf::default()
                .kv("tokenizer.ggml.model", V::Str("gpt2"))
                .open(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");

        let e = bpe(|g| g.kv("tokenizer.ggml.add_bos_token", V::Bool(true))).unwrap_err();
        assert!(matches!(e, TokenizerError::MissingSpecial { .. }), "{e}");
    }

    fn spm() -> Tokenizer {
        let tokens = [
            "<unk>",
            "<s>",
            "</s>",
            "<0xC3>",
            "<0xA9>",
            "<0xFF>",
            "\u{2581}",
            "a",
            "\u{2581}a",
            "b",
            "ab",
        ];
        let scores = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -0.5, -2.0, -0.1];
        let types = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1];
        Tokenizer::from_gguf(
            &Gguf::default()
                .kv("tokenizer.ggml.model", V::Str("llama"))
                .kv("tokenizer.ggml.tokens", V::Strs(&tokens))
                .kv("tokenizer.ggml.scores", V::F32s(&scores))
                .kv("tokenizer.ggml.token_type", V::I32s(&types))
                .open(),
        )
        .unwrap()
    }

    #[test]
    fn tiny_spm_scores_prefix_and_byte_fallback() {
        let t = spm();
        // "▁ab": of the pairs "▁a" (score -0.5) and "ab" (-0.1) the higher score merges first
        assert_eq!(t.encode("ab", false, false), [6, 10]);
        assert_eq!(t.encode("a", true, false), [1, 8]);
        assert_eq!(t.encode("é", false, false), [6, 3, 4]);
        // llama_detokenize strips the leading space of the first token only, here the (unrendered) BOS
        assert_eq!(t.decode(&[1, 8], false), " a");
        assert_eq!(
            t.decode(&[8], false),
            "a",
            "the leading space of the first piece goes"
        );
        assert_eq!(t.decode(&[6, 3, 4], false), "é");
    }

    #[test]
    fn stream_decoder_holds_split_characters() {
        let t = spm();
        let mut d = StreamDecoder::new(&t);
        assert_eq!(d.push(8), " a");
        assert_eq!(d.push(3), "", "0xC3 alone is an incomplete character");
        assert_eq!(d.push(4), "é");
        assert_eq!(d.push(5), "\u{FFFD}", "0xFF can never start a character");
        assert_eq!(d.push(1), "", "control tokens are not rendered");
        assert_eq!(d.push(3), "");
        assert_eq!(d.push(99), "", "an unknown id renders nothing");
        assert_eq!(
            d.finish(),
            "\u{FFFD}",
            "a dangling lead byte is flushed as U+FFFD"
        );
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder<'static>>();
    }

    #[test]
    fn clean_up_matches_llama() {
        assert_eq!(clean_up_spaces(b"Hello , world !"), b"Hello, world!");
        assert_eq!(clean_up_spaces(b"he ' s"), b"he's");
        assert_eq!(
            clean_up_spaces(b"it 's I 'm we 're don 't"),
            b"it's I'm we're don 't"
        );
    }

    #[test]
    fn byte_level_decode() {
        assert_eq!(decode_byte_level("Ġhello"), b" hello");
        assert_eq!(decode_byte_level("Ċ"), b"\n");
    }

    #[test]
    fn pre_names_cover_the_required_set() {
        for n in [
            "default",
            "llama3",
            "llama-bpe",
            "qwen2",
            "gpt-2",
            "smollm",
            "phi-2",
            "starcoder",
            "falcon",
            "deepseek-llm",
            "deepseek-coder",
            "mpt",
            "refact",
            "command-r",
            "qwen35",
        ] {
            assert!(pre_options(n).is_some(), "{n}");
        }
        assert!(pre_options("no-such-pre").is_none());
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        use PreType::*;
        for p in [
            Default,
            Llama3,
            DeepseekLlm,
            DeepseekCoder,
            Deepseek3,
            Falcon,
            Starcoder,
            Refact,
            CommandR,
            Smollm,
            Gpt2,
            Mpt,
            Qwen2,
            Qwen35,
            Poro,
            Viking,
            Tekken,
            Gpt4o,
            SeedCoder,
            Bailingmoe,
            Minicpm5,
            Gemma4,
        ] {
            for e in bpe::regexes(p).0 {
                Splitter::new(e).unwrap_or_else(|err| panic!("{p:?}: {err}"));
            }
        }
    }
}
