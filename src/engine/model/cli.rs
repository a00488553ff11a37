//! The `run`, `perplexity` and `embed` subcommands: the engine from the command line, like llama.cpp's
//! `llama-cli`/`llama-simple`, `llama-perplexity` and `llama-embedding`, plus the library functions behind
//! them (generation and perplexity) that the tests call directly.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::chat::RenderOptions;
use crate::engine::sampling::{Sampler, SamplerParams, log_softmax};
use crate::engine::tokenizer::StreamDecoder;

use super::{Batch, Context, ContextParams, KvType, Model, ModelError, ModelParams};

fn default_threads() -> usize {
    ModelParams::default().n_threads
}

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The GGUF model file.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// The prompt.
    #[arg(short = 'p', long = "prompt", allow_hyphen_values = true)]
    pub prompt: String,
    /// Tokens to generate at most (stops earlier at an end-of-generation token or a full context).
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.0)]
    pub temp: f32,
    /// Top-k (0 disables).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: i32,
    /// Top-p (1 disables).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p (0 disables).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1 disables).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// RNG seed (default: random).
    #[arg(long = "seed")]
    pub seed: Option<u64>,
    /// Threads.
    #[arg(short = 't', long = "threads", default_value_t = default_threads())]
    pub threads: usize,
    /// Context size (tokens).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048)]
    pub ctx_size: usize,
    /// Prompt tokens per forward pass.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Keep the KV cache in f32 instead of f16 (the same as `-ctk f32 -ctv f32`).
    #[arg(long)]
    pub kv_f32: bool,
    /// Element type of the cached keys (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1).
    #[arg(long = "cache-type-k", value_name = "TYPE", default_value = "f16", value_parser = parse_kv_type)]
    pub cache_type_k: KvType,
    /// Element type of the cached values (as `--cache-type-k`).
    #[arg(long = "cache-type-v", value_name = "TYPE", default_value = "f16", value_parser = parse_kv_type)]
    pub cache_type_v: KvType,
    /// Keep generating past end-of-generation tokens (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Cut the tokenized prompt to at most this many tokens (for benchmarks).
    #[arg(long, value_name = "N")]
    pub max_prompt_tokens: Option<usize>,
}

/// Arguments of `perplexity`.
#[derive(Debug, clap::Args)]
pub struct PerplexityArgs {
    /// The GGUF model file.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// The text file.
    #[arg(short = 'f', long = "file", value_name = "TEXT")]
    pub file: PathBuf,
    /// Chunk size (tokens).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    pub ctx_size: usize,
    /// Tokens per forward pass (at most the chunk size is used).
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: usize,
    /// Threads.
    #[arg(short = 't', long = "threads", default_value_t = default_threads())]
    pub threads: usize,
    /// Element type of the cached keys (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1).
    #[arg(long = "cache-type-k", value_name = "TYPE", default_value = "f16", value_parser = parse_kv_type)]
    pub cache_type_k: KvType,
    /// Element type of the cached values (as `--cache-type-k`).
    #[arg(long = "cache-type-v", value_name = "TYPE", default_value = "f16", value_parser = parse_kv_type)]
    pub cache_type_v: KvType,
}

/// Parses a KV cache type name as llama.cpp's `-ctk`/`-ctv` take it.
///
/// Errors: the name is not one of [`KvType::ALL`] (the message lists them).
pub fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| {
        let names: Vec<&str> = KvType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown KV cache type {s:?}; one of {}", names.join(", "))
    })
}

/// Arguments of `embed`.
#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// The GGUF model file.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Threads.
    #[arg(short = 't', long = "threads", default_value_t = default_threads())]
    pub threads: usize,
    /// Print each embedding as a JSON array instead of space-separated numbers.
    #[arg(long)]
    pub json: bool,
    /// The texts; one output line each.
    #[arg(value_name = "TEXT", required = true, allow_hyphen_values = true)]
    pub texts: Vec<String>,
}

/// Errors of the model subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing output: {0}")]
    Write(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

/// Feeds `tokens` to sequence `seq` from position `start` in batches of `n_batch`, keeping logits of the last
/// token only. Returns the position after the last token.
///
/// Errors: as [`Context::decode`].
pub fn prefill(
    ctx: &mut Context,
    tokens: &[u32],
    start: u32,
    seq: u32,
    n_batch: usize,
) -> Result<u32, ModelError> {
    let mut pos = start;
    let n_batch = n_batch.max(1);
    for (k, part) in tokens.chunks(n_batch).enumerate() {
        let last_chunk = (k + 1) * n_batch >= tokens.len();
        let mut b = Batch::single(part, pos, seq);
        if !last_chunk {
            b.logits.iter_mut().for_each(|l| *l = false);
        }
        ctx.decode(&b)?;
        pos += part.len() as u32;
    }
    Ok(pos)
}

/// Generates up to `n_predict` tokens after `prompt` in sequence 0 (cleared first), calling `on_token` with
/// each new id and the logits it was drawn from. Stops at an end-of-generation token (which is reported but
/// not fed back) or when the context is full. Returns the generated ids.
///
/// Errors: as [`Context::decode`]; [`ModelError::BadBatch`] for an empty prompt.
pub fn generate(
    ctx: &mut Context,
    prompt: &[u32],
    n_predict: usize,
    sampler: &mut Sampler,
    on_token: impl FnMut(u32, &[f32]),
) -> Result<Vec<u32>, ModelError> {
    generate_opts(ctx, prompt, n_predict, sampler, false, on_token)
}

/// [`generate`], optionally going on past end-of-generation tokens (`ignore_eos`, for benchmarks).
pub fn generate_opts(
    ctx: &mut Context,
    prompt: &[u32],
    n_predict: usize,
    sampler: &mut Sampler,
    ignore_eos: bool,
    mut on_token: impl FnMut(u32, &[f32]),
) -> Result<Vec<u32>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::BadBatch("the prompt has no tokens".into()));
    }
    ctx.seq_clear(0);
    let n_batch = ctx.params().n_batch;
    let n_ctx = ctx.params().n_ctx;
    let mut pos = prefill(ctx, prompt, 0, 0, n_batch)?;
    let mut history = prompt.to_vec();
    let mut out = Vec::new();
    let model = ctx.model().clone();
    while out.len() < n_predict {
        let id = sampler.sample(ctx.logits(0), &history);
        on_token(id, ctx.logits(0));
        out.push(id);
        history.push(id);
        if (!ignore_eos && model.tokenizer().is_eog(id))
            || pos as usize >= n_ctx
            || out.len() >= n_predict
        {
            break;
        }
        ctx.decode(&Batch::single(&[id], pos, 0))?;
        pos += 1;
    }
    Ok(out)
}

/// The result of [`perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood) over all scored tokens.
    pub ppl: f64,
    /// llama-perplexity's uncertainty estimate of `ppl`.
    pub ppl_std: f64,
    /// The running estimate after each chunk.
    pub per_chunk: Vec<f64>,
    /// Chunks evaluated.
    pub n_chunks: usize,
}

/// Perplexity the way `llama-perplexity` computes it (`tools/perplexity/perplexity.cpp`, commit 0c1e570):
/// `tokens` (already tokenized with BOS when the model adds one) are cut into `n_ctx`-token chunks; each is
/// evaluated from an empty cache with its first token replaced by BOS when `add_bos`, and only the second
/// half of each chunk is scored: the log-probability at position `j` of token `j+1` for
/// `j ∈ [n_ctx/2, n_ctx-1)`.
///
/// Errors: [`ModelError::BadBatch`] when fewer than `2·n_ctx` tokens are given (as llama-perplexity), or
/// the model is an encoder; decode errors.
pub fn perplexity(
    ctx: &mut Context,
    tokens: &[u32],
    n_ctx: usize,
    n_batch: usize,
    add_bos: Option<u32>,
    mut progress: impl FnMut(usize, f64),
) -> Result<Perplexity, ModelError> {
    if ctx.model().is_encoder() {
        return Err(ModelError::BadBatch(
            "perplexity needs a model with logits, not an encoder".into(),
        ));
    }
    if n_ctx < 4 || tokens.len() < 2 * n_ctx {
        return Err(ModelError::BadBatch(format!(
            "need at least 2·n_ctx = {} tokens (and n_ctx ≥ 4), got {} tokens for n_ctx {n_ctx}",
            2 * n_ctx,
            tokens.len()
        )));
    }
    let n_chunks = tokens.len() / n_ctx;
    let first = n_ctx / 2;
    let n_batch = n_batch.clamp(1, n_ctx);
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(n_chunks);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(bos) = add_bos {
            chunk[0] = bos;
        }
        ctx.seq_clear(0);
        let mut logits: Vec<Vec<f32>> = Vec::with_capacity(n_ctx);
        for (k, part) in chunk.chunks(n_batch).enumerate() {
            let start = k * n_batch;
            let mut b = Batch::single(part, start as u32, 0);
            for (i, l) in b.logits.iter_mut().enumerate() {
                *l = start + i >= first && start + i < n_ctx - 1;
            }
            ctx.decode(&b)?;
            for o in 0..ctx.n_outputs() {
                logits.push(ctx.logits(o).to_vec());
            }
        }
        for (j, row) in (first..n_ctx - 1).zip(&logits) {
            let lp = log_softmax(row)[chunk[j + 1] as usize] as f64;
            nll -= lp;
            nll2 += lp * lp;
            count += 1;
        }
        let est = (nll / count as f64).exp();
        per_chunk.push(est);
        progress(c, est);
    }
    ctx.seq_clear(0);
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let ppl_std = if count > 1 && var > 0.0 {
        ppl * (var / (count - 1) as f64).sqrt()
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_std,
        per_chunk,
        n_chunks,
    })
}

fn load(path: &std::path::Path, threads: usize) -> Result<(Arc<Model>, f64), CliError> {
    let t0 = Instant::now();
    let model = Model::load(
        path,
        &ModelParams {
            n_threads: threads,
            ..Default::default()
        },
    )?;
    Ok((model, t0.elapsed().as_secs_f64()))
}

/// `cyber-inference run`: streams the continuation of the prompt to stdout; timings on stderr.
///
/// Errors: load and decode errors, `--chat` on a model without a chat template, an empty prompt.
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let (model, load_s) = load(&args.model, args.threads)?;
    if model.is_encoder() {
        return Err(CliError::Usage(format!(
            "{} is an encoder ({}): it has no logits to generate from; use `embed`",
            args.model.display(),
            model.arch()
        )));
    }
    let tok = model.tokenizer();
    let prompt_text = if args.chat {
        render_chat(&model, &args.prompt)?
    } else {
        args.prompt.clone()
    };
    let mut prompt = tok.encode(&prompt_text, !args.chat, true);
    if let Some(n) = args.max_prompt_tokens {
        prompt.truncate(n);
    }
    if prompt.is_empty() {
        return Err(CliError::Usage("the prompt has no tokens".into()));
    }
    let mut ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx: args.ctx_size,
            n_seq_max: 1,
            n_batch: args.batch_size,
            n_threads: args.threads,
            embeddings: false,
            type_k: if args.kv_f32 {
                KvType::F32
            } else {
                args.cache_type_k
            },
            type_v: if args.kv_f32 {
                KvType::F32
            } else {
                args.cache_type_v
            },
        },
    )?;
    let mut sampler = Sampler::new(SamplerParams {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..Default::default()
    });
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }
    let mut dec = StreamDecoder::new(tok);
    let t0 = Instant::now();
    let mut t_first: Option<Instant> = None;
    let mut write_err = None;
    let generated = generate_opts(
        &mut ctx,
        &prompt,
        args.n_predict,
        &mut sampler,
        args.ignore_eos,
        |id, _| {
            if t_first.is_none() {
                t_first = Some(Instant::now());
            }
            if tok.is_eog(id) {
                return;
            }
            let piece = dec.push(id);
            if let Err(e) = write!(out, "{piece}").and_then(|_| out.flush()) {
                write_err.get_or_insert(e);
            }
        },
    )?;
    let t_end = Instant::now();
    writeln!(out, "{}", dec.finish())?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let t_first = t_first.unwrap_or(t_end);
    let pp_s = (t_first - t0).as_secs_f64();
    let n_gen_decoded = generated.len().saturating_sub(1);
    let tg_s = (t_end - t_first).as_secs_f64();
    eprintln!("load time: {:.1} ms", load_s * 1e3);
    eprintln!(
        "prompt: {} tokens in {:.1} ms ({:.1} tokens/s)",
        prompt.len(),
        pp_s * 1e3,
        prompt.len() as f64 / pp_s.max(1e-9)
    );
    eprintln!(
        "generation: {} tokens in {:.1} ms ({:.1} tokens/s)",
        generated.len(),
        tg_s * 1e3,
        n_gen_decoded as f64 / tg_s.max(1e-9)
    );
    Ok(())
}

/// Renders `prompt` as one user message with the model's chat template and the generation prompt.
fn render_chat(model: &Model, prompt: &str) -> Result<String, CliError> {
    let tmpl = model
        .chat_template()
        .ok_or_else(|| CliError::Usage("this model has no usable chat template".into()))?;
    let messages = [serde_json::json!({"role": "user", "content": prompt})];
    tmpl.render(&messages, &RenderOptions::default())
        .map_err(|e| CliError::Usage(format!("rendering the chat template: {e}")))
}

/// `cyber-inference perplexity`: prints the running estimate per chunk, then `PPL = <value>` last.
///
/// Errors: load errors, an unreadable file, too little text (fewer than 2·ctx tokens).
pub fn perplexity_cmd(args: &PerplexityArgs) -> Result<(), CliError> {
    let (model, load_s) = load(&args.model, args.threads)?;
    let text = std::fs::read_to_string(&args.file).map_err(|source| CliError::Read {
        path: args.file.clone(),
        source,
    })?;
    let tok = model.tokenizer();
    let tokens = tok.encode(&text, true, false);
    let add_bos = if tok.add_bos() { tok.bos() } else { None };
    let mut ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx: args.ctx_size,
            n_seq_max: 1,
            n_batch: args.batch_size.clamp(1, args.ctx_size.max(1)),
            n_threads: args.threads,
            embeddings: false,
            type_k: args.cache_type_k,
            type_v: args.cache_type_v,
        },
    )?;
    eprintln!(
        "load time: {:.1} ms; {} tokens, {} chunks of {}",
        load_s * 1e3,
        tokens.len(),
        tokens.len() / args.ctx_size.max(1),
        args.ctx_size
    );
    let t0 = Instant::now();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let r = perplexity(
        &mut ctx,
        &tokens,
        args.ctx_size,
        args.batch_size,
        add_bos,
        |c, est| {
            let _ = write!(out, "[{}]{est:.4},", c + 1);
            let _ = out.flush();
        },
    )?;
    writeln!(out)?;
    eprintln!(
        "{:.2} s for {} chunks ({:.1} tokens/s)",
        t0.elapsed().as_secs_f64(),
        r.n_chunks,
        (r.n_chunks * args.ctx_size) as f64 / t0.elapsed().as_secs_f64()
    );
    writeln!(out, "estimated PPL std: {:.5}", r.ppl_std)?;
    writeln!(out, "PPL = {:.4}", r.ppl)?;
    Ok(())
}

/// `cyber-inference embed`: one line per text with its pooled, L2-normalised embedding.
///
/// Errors: load and decode errors (a text longer than the model's positions).
pub fn embed_cmd(args: &EmbedArgs) -> Result<(), CliError> {
    let (model, _) = load(&args.model, args.threads)?;
    let n_ctx = if model.is_encoder() {
        model.n_ctx_train()
    } else {
        model.n_ctx_train().min(8192)
    };
    let mut ctx = Context::new(
        model.clone(),
        ContextParams {
            n_ctx,
            n_seq_max: 1,
            n_batch: n_ctx,
            n_threads: args.threads,
            embeddings: true,
            type_k: KvType::F16,
            type_v: KvType::F16,
        },
    )?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for text in &args.texts {
        let tokens = model.tokenizer().encode(text, true, true);
        let v = ctx.embed(&tokens)?;
        if args.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string(&v).map_err(std::io::Error::other)?
            )?;
        } else {
            let s: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            writeln!(out, "{}", s.join(" "))?;
        }
    }
    Ok(())
}
