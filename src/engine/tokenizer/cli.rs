//! `cyber-inference tokenize`: the tokenizer of a GGUF file from the command line, like llama-tokenize.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;

use crate::engine::gguf::GgufFile;

use super::Tokenizer;

/// Arguments of `tokenize`.
#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// The GGUF file (a vocab-only file is enough).
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Print only the ids, as a list: `[1, 2, 3]`.
    #[arg(long)]
    pub ids: bool,
    /// Add no BOS/EOS (CLS/SEP) tokens.
    #[arg(long)]
    pub no_bos: bool,
    /// Turn special-token text (e.g. `<|im_start|>`) into those tokens.
    #[arg(long)]
    pub parse_special: bool,
    /// Read the text from this file instead of the command line.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        conflicts_with = "text"
    )]
    pub file: Option<PathBuf>,
    /// The text to tokenize.
    #[arg(
        value_name = "TEXT",
        allow_hyphen_values = true,
        required_unless_present = "file"
    )]
    pub text: Option<String>,
}

/// The lines `tokenize` prints: `[1, 2, 3]` with `ids_only`, else one `id -> 'piece'` line per token.
pub fn render(tok: &Tokenizer, ids: &[u32], ids_only: bool) -> String {
    if ids_only {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        return format!("[{}]\n", list.join(", "));
    }
    let mut out = String::new();
    for &id in ids {
        let piece = String::from_utf8_lossy(&tok.token_to_piece(id, true)).into_owned();
        out.push_str(&format!("{id:6} -> '{piece}'\n"));
    }
    out
}

/// Run `tokenize`. Errors: a file cannot be read, the text file is not UTF-8, or the model holds no usable
/// tokenizer.
pub fn run(args: &TokenizeArgs) -> anyhow::Result<()> {
    let text = match (&args.file, &args.text) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read text file {}", path.display()))?,
        (None, Some(t)) => t.clone(),
        (None, None) => anyhow::bail!("no text given (TEXT or --file)"),
    };
    let f = GgufFile::open(&args.model)?;
    let tok = Tokenizer::from_gguf(&f)?;
    let ids = tok.encode(&text, !args.no_bos, args.parse_special);
    std::io::stdout().write_all(render(&tok, &ids, args.ids).as_bytes())?;
    Ok(())
}
