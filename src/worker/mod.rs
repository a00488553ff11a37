//! The worker: an OpenAI-compatible HTTP server around one engine, with slots and continuous batching.
//!
//! `cyber-inference worker -m FILE --port P …` binds its port first (so `/health` answers 503 while the
//! model loads), loads the model on a blocking thread, starts the scheduler thread and then answers 200.
//! A model that cannot load ends the process with the reason on stderr and a non-zero exit. SIGTERM/SIGINT:
//! stop accepting, let in-flight requests finish within `--grace-period`, exit 0.
//!
//! Context sizing follows llama-server: `-c` is the total context, split evenly over the `-np` slots
//! (`n_ctx_seq = n_ctx / n_slots`); a prompt must leave room for at least one generated token.

pub(crate) mod backend;
pub(crate) mod chat;
mod error;
#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod http;
pub(crate) mod metrics;
mod native;
mod rerank;
pub(crate) mod scheduler;
#[cfg(test)]
mod serve_tests;
pub(crate) mod slot;
mod slot_files;
pub(crate) mod structured;
pub(crate) mod text;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use backend::{Codec, Compute};
use http::{AppState, Ready, ServerInfo};
use metrics::Metrics;
use scheduler::{Command, SchedulerConfig};

/// The environment variable that carries a worker's key (`--api-key`).
pub(crate) const WORKER_API_KEY_ENV: &str = "CYBER_INFERENCE_WORKER_API_KEY";

/// Command-line flags of `cyber-inference worker`: llama-server's names and meanings, grouped under
/// its help headings (`-np`, `-ngl`, `-fa`, `-ub`, `-to` are accepted through [`llama_style_args`]). A flag
/// that is not here is refused by clap.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    /// GGUF model file.
    #[arg(short = 'm', long = "model", value_name = "FILE", help_heading = COMMON)]
    pub model: PathBuf,
    /// Compute threads (default: available cores).
    #[arg(short = 't', long, help_heading = COMMON)]
    pub threads: Option<usize>,
    /// Total context in tokens, split over the slots (default 4096, or the model's training context if
    /// smaller; 0 = the model's training context).
    #[arg(short = 'c', long = "ctx-size", help_heading = COMMON)]
    pub ctx_size: Option<usize>,
    /// Default most tokens to generate when a request does not say (-1 = until a stop or the end
    /// of the slot's context).
    #[arg(short = 'n', long = "n-predict", visible_alias = "predict", default_value_t = -1,
          allow_hyphen_values = true, help_heading = COMMON)]
    pub n_predict: i64,
    /// Tokens of the prompt a context shift keeps (-1 = the whole prompt); a request's `n_keep`
    /// overrides it.
    #[arg(long = "keep", default_value_t = 0, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i64).range(-1..=i64::from(i32::MAX)), help_heading = COMMON)]
    pub keep: i64,
    /// Context shift on infinite text generation: a generation that reaches the end of its slot's
    /// context drops tokens after `--keep` (half of the rest, or the request's `n_discard`), shifts the
    /// KV cache back and goes on (`truncated: true`). Default disabled, as llama-server's; a model
    /// whose sliding-window cache cannot shift turns it off with a warning.
    #[arg(long = "context-shift", overrides_with = "no_context_shift", help_heading = COMMON)]
    pub context_shift: bool,
    /// Stop a generation at the end of its slot's context (`finish_reason: length`; the default).
    #[arg(long = "no-context-shift", overrides_with = "context_shift", help_heading = COMMON)]
    pub no_context_shift: bool,
    /// Logical batch: most prompt tokens scheduled per step.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048, help_heading = COMMON)]
    pub batch_size: usize,
    /// Physical batch (`-ub`): most tokens in one forward pass.
    #[arg(long = "ubatch-size", default_value_t = 512, help_heading = COMMON)]
    pub ubatch_size: usize,
    /// Flash attention `on|off|auto` (`-fa`): this engine's attention kernel is one fused pass
    /// already, so every value gives the same results.
    #[arg(long = "flash-attn", value_name = "on|off|auto", default_value = "auto",
          value_parser = ["on", "off", "auto"], help_heading = COMMON)]
    pub flash_attn: String,
    /// Element type of the KV cache's keys (`-ctk`): f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0,
    /// q5_1. Attention reads a quantized cache in place.
    #[arg(long = "cache-type-k", value_name = "TYPE", default_value = "f16",
          value_parser = crate::engine::model::cli::parse_kv_type, help_heading = COMMON)]
    pub cache_type_k: crate::engine::model::KvType,
    /// Element type of the KV cache's values (`-ctv`), as `-ctk`; a quantized V needs flash attention
    /// (not `-fa off`), as in llama.cpp.
    #[arg(long = "cache-type-v", value_name = "TYPE", default_value = "f16",
          value_parser = crate::engine::model::cli::parse_kv_type, help_heading = COMMON)]
    pub cache_type_v: crate::engine::model::KvType,
    /// Layers to offload to a GPU (`-ngl`): the last N repeating layers, and the output layer when N is at
    /// least the layer count; -1 (the default) = all of them; 0 = the CPU only. Without a usable adapter
    /// the worker logs why and runs on the CPU.
    #[arg(long = "gpu-layers", alias = "n-gpu-layers", allow_hyphen_values = true, help_heading = COMMON)]
    pub gpu_layers: Option<i32>,
    /// The GPU adapter: its index in the list logged at start-up or part of its name (`RTX`, `llvmpipe`).
    /// Default: the first discrete, integrated or virtual GPU; a software rasterizer only when named.
    #[arg(long = "device", env = "CYBER_INFERENCE_DEVICE", help_heading = COMMON)]
    pub device: Option<String>,
    /// Read the model file into memory instead of mapping it (slower to load; pages are then the
    /// process's own rather than the page cache's).
    #[arg(long = "no-mmap", help_heading = COMMON)]
    pub no_mmap: bool,
    /// Lock the model's bytes in RAM (`mlock`) so they are never swapped out; when `RLIMIT_MEMLOCK`
    /// refuses, a warning is logged and the worker starts anyway.
    #[arg(long = "mlock", help_heading = COMMON)]
    pub mlock: bool,
    /// Log at debug level (llama-server's `-v`); `CYBER_INFERENCE_LOG_LEVEL` / `RUST_LOG` are finer.
    #[arg(short = 'v', long = "verbose", visible_alias = "log-verbose", help_heading = COMMON)]
    pub verbose: bool,

    /// Default temperature (0 = greedy).
    #[arg(long = "temp", visible_alias = "temperature", default_value_t = 0.8, help_heading = SAMPLING)]
    pub temp: f32,
    /// Default top-k (0 = off).
    #[arg(long = "top-k", default_value_t = 40, help_heading = SAMPLING)]
    pub top_k: i32,
    /// Default top-p (1 = off).
    #[arg(long = "top-p", default_value_t = 0.95, help_heading = SAMPLING)]
    pub top_p: f32,
    /// Default min-p (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05, help_heading = SAMPLING)]
    pub min_p: f32,
    /// Default seed (-1 = random).
    #[arg(short = 's', long = "seed", default_value_t = -1, allow_hyphen_values = true,
          help_heading = SAMPLING)]
    pub seed: i64,
    /// Default repetition penalty (1 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0, help_heading = SAMPLING)]
    pub repeat_penalty: f32,
    /// Default window of the penalties (tokens; -1 = the whole context).
    #[arg(long = "repeat-last-n", default_value_t = 64, allow_hyphen_values = true,
          help_heading = SAMPLING)]
    pub repeat_last_n: i32,
    /// Default presence penalty.
    #[arg(long = "presence-penalty", default_value_t = 0.0, allow_hyphen_values = true,
          help_heading = SAMPLING)]
    pub presence_penalty: f32,
    /// Default frequency penalty.
    #[arg(long = "frequency-penalty", default_value_t = 0.0, allow_hyphen_values = true,
          help_heading = SAMPLING)]
    pub frequency_penalty: f32,
    /// Default sampler order, names separated by `;` (llama-server's `--samplers`).
    #[arg(long = "samplers", value_name = "SAMPLERS", help_heading = SAMPLING)]
    pub samplers: Option<String>,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", help_heading = SERVER)]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080, help_heading = SERVER)]
    pub port: u16,
    /// Model names the worker answers to, comma-separated; the first is the id it reports (default:
    /// the file stem).
    #[arg(short = 'a', long, value_name = "NAME[,NAME...]", help_heading = SERVER)]
    pub alias: Option<String>,
    /// Parallel slots (`-np`).
    #[arg(long = "parallel", default_value_t = 1, help_heading = SERVER)]
    pub parallel: usize,
    /// Generation and embedding requests that may wait for a free slot; past the slots and these, a
    /// request is refused with 503 and `Retry-After` instead of queueing without bound.
    #[arg(long = "max-queue", default_value_t = 64, help_heading = SERVER)]
    pub max_queue: usize,
    /// Serve embeddings with a generation model.
    #[arg(long, visible_alias = "embeddings", help_heading = SERVER)]
    pub embedding: bool,
    /// Pooling of embeddings: `none` (one vector per token, native `/embedding` only), `mean`, `cls`,
    /// `last`, `rank` (a reranker's classification head, for `/rerank`) (default: the model's).
    #[arg(long = "pooling", value_parser = ["none", "mean", "cls", "last", "rank"], help_heading = SERVER)]
    pub pooling: Option<String>,
    /// Serve `/rerank` with a reranking model (llama-server's `--reranking`): turns embeddings on with
    /// pooling rank.
    #[arg(long = "reranking", visible_alias = "rerank", help_heading = SERVER)]
    pub reranking: bool,
    /// Require `Authorization: Bearer KEY` on every route but `/health`. Also read from
    /// `CYBER_INFERENCE_WORKER_API_KEY` (how the supervisor passes each worker its key: the environment
    /// is private to the process's user, argv is readable by everyone). Without either the worker is
    /// open, as llama-server is.
    #[arg(long = "api-key", env = WORKER_API_KEY_ENV, hide_env_values = true, help_heading = SERVER)]
    pub api_key: Option<String>,
    /// Origins allowed by CORS, comma-separated: `*` (any), `localhost` (any localhost origin) or
    /// exact origins. Default none (llama-server's default is `*`).
    #[arg(long = "cors-origins", value_name = "ORIGINS", help_heading = SERVER)]
    pub cors_origins: Option<String>,
    /// Serve Prometheus `/metrics` (always on: the supervisor reads it; accepted for llama-server's
    /// command lines).
    #[arg(long = "metrics", help_heading = SERVER)]
    pub metrics: bool,
    /// Serve `GET /slots` (the default).
    #[arg(long = "slots", overrides_with = "no_slots", help_heading = SERVER)]
    pub slots: bool,
    /// Turn `GET /slots` off (501).
    #[arg(long = "no-slots", overrides_with = "slots", help_heading = SERVER)]
    pub no_slots: bool,
    /// Directory of slot save files (llama-server's `--slot-save-path`, an existing directory):
    /// turns on `POST /slots/{id}?action=save|restore|erase`, which write and read
    /// `DIR/{filename}` (default: off, 501).
    #[arg(long = "slot-save-path", value_name = "DIR", help_heading = SERVER)]
    pub slot_save_path: Option<PathBuf>,
    /// Use the Jinja template engine for chat (the default; every template here is Jinja).
    #[arg(long = "jinja", overrides_with = "no_jinja", help_heading = SERVER)]
    pub jinja: bool,
    /// llama-server's legacy (non-Jinja) templates: accepted, but every template here is rendered by
    /// the Jinja engine (the built-in names of `--chat-template` are Jinja sources of those formats).
    #[arg(long = "no-jinja", overrides_with = "jinja", help_heading = SERVER)]
    pub no_jinja: bool,
    /// A Jinja chat template file that replaces the model's.
    #[arg(long = "chat-template-file", value_name = "FILE", help_heading = SERVER)]
    pub chat_template_file: Option<PathBuf>,
    /// A chat template given inline: a built-in name (`chatml`, `llama3`, …) or Jinja source.
    #[arg(
        long = "chat-template",
        value_name = "NAME|JINJA",
        conflicts_with = "chat_template_file",
        help_heading = SERVER
    )]
    pub chat_template: Option<String>,
    /// Where the model's thinking goes: `none` (left in content), `deepseek` (always extracted to
    /// `reasoning_content`), `auto` (extracted when the template has thinking markers); a request's
    /// `reasoning_format` overrides it.
    #[arg(long = "reasoning-format", default_value = "auto", value_parser = parse_reasoning_format,
          help_heading = SERVER)]
    pub reasoning_format: crate::engine::chat::reasoning::ReasoningFormat,
    /// Nonce echoed by `/props` (the supervisor's check that it talks to its own worker).
    #[arg(long, help_heading = SERVER)]
    pub instance: Option<String>,
    /// Server read/write timeout in seconds (`-to`, llama-server's): a request body that stalls this
    /// long, or a response write blocked this long (the client stopped reading), ends the
    /// connection; request headers must arrive within `min(N, 10)` seconds.
    #[arg(long = "timeout", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..), help_heading = SERVER)]
    pub timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long = "grace-period", default_value_t = 30, help_heading = SERVER)]
    pub grace_period: u64,
}

/// The flags the supervisor chooses for a worker it spawns, written once: [`SupervisedArgs::argv`]
/// spells them as [`WorkerArgs`]' flags (a unit test parses the argv back through clap), so the two
/// sides of the contract cannot drift apart. The worker's key is not here: it goes through the
/// environment ([`WORKER_API_KEY_ENV`]), never argv, which every local user can read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SupervisedArgs {
    /// The GGUF file (`-m`).
    pub model: PathBuf,
    /// Port on 127.0.0.1 (`--port`).
    pub port: u16,
    /// The model id the worker reports (`-a`).
    pub alias: String,
    /// Total context in tokens over all slots (`-c`).
    pub ctx_size: u32,
    /// Compute threads (`-t`).
    pub threads: usize,
    /// Slots (`-np`).
    pub parallel: u32,
    /// Serve embeddings (`--embedding`).
    pub embedding: bool,
    /// Serve reranking (`--reranking`: rank pooling; instead of `--embedding`).
    pub reranking: bool,
    /// Layers to offload to a GPU (`-ngl`; -1 = all).
    pub gpu_layers: i32,
    /// The KV cache's key and value types (`-ctk`, `-ctv`).
    pub cache_types: (crate::engine::model::KvType, crate::engine::model::KvType),
    /// The nonce `/props` echoes (`--instance`), also how a restarted supervisor recognises its orphans.
    pub instance: String,
}

impl SupervisedArgs {
    /// The arguments after `worker`, in [`WorkerArgs`]' long flag names.
    pub fn argv(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["--model".into(), self.model.clone().into_os_string()];
        let mut flag = |name: &str, value: String| {
            v.push(name.into());
            v.push(value.into());
        };
        flag("--host", "127.0.0.1".into());
        flag("--port", self.port.to_string());
        flag("--alias", self.alias.clone());
        flag("--ctx-size", self.ctx_size.to_string());
        flag("--threads", self.threads.to_string());
        flag("--parallel", self.parallel.to_string());
        flag("--gpu-layers", self.gpu_layers.to_string());
        flag("--cache-type-k", self.cache_types.0.name().to_owned());
        flag("--cache-type-v", self.cache_types.1.name().to_owned());
        flag("--instance", self.instance.clone());
        if self.reranking {
            v.push("--reranking".into());
        } else if self.embedding {
            v.push("--embedding".into());
        }
        v
    }
}

/// `--help` headings, as llama-server groups its flags.
const COMMON: &str = "common params";
const SAMPLING: &str = "sampling params";
const SERVER: &str = "example-specific params";

fn parse_reasoning_format(
    s: &str,
) -> Result<crate::engine::chat::reasoning::ReasoningFormat, String> {
    s.parse()
}

/// The server-wide generation defaults of the sampling flags (what a request that leaves a field out
/// gets, as llama-server's `params_base`).
///
/// Errors: an unknown sampler name in `--samplers`.
fn server_defaults(args: &WorkerArgs) -> Result<http::Defaults, WorkerError> {
    let chain = match &args.samplers {
        Some(s) => {
            let names: Vec<&str> = s.split(';').filter(|n| !n.is_empty()).collect();
            crate::engine::sampling::Stage::chain_from_names(&names)
                .map_err(|e| WorkerError::Args(format!("--samplers: {e}")))?
        }
        None => crate::engine::sampling::DEFAULT_CHAIN.to_vec(),
    };
    Ok(http::Defaults {
        sampling: backend::SamplingParams {
            temperature: args.temp,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: u64::try_from(args.seed).ok(),
            logit_bias: Vec::new(),
            chain,
        },
        n_predict: args.n_predict,
        n_keep: args.keep,
    })
}

/// `--pooling`'s value.
///
/// Errors: a value clap's list would not let through.
fn parse_pooling(s: &str) -> Result<backend::Pooling, WorkerError> {
    use backend::Pooling;
    match s {
        "none" => Ok(Pooling::None),
        "mean" => Ok(Pooling::Mean),
        "cls" => Ok(Pooling::Cls),
        "last" => Ok(Pooling::Last),
        "rank" => Ok(Pooling::Rank),
        other => Err(WorkerError::Args(format!(
            "--pooling {other}: unknown pooling"
        ))),
    }
}

/// Rewrites llama.cpp's multi-letter single-dash flags (`-np`, `-ngl`) to their long forms so clap can
/// parse them; everything else is passed through unchanged.
pub fn llama_style_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-np") => OsString::from("--parallel"),
            Some("-ngl") => OsString::from("--gpu-layers"),
            Some("-dev") => OsString::from("--device"),
            Some("-fa") => OsString::from("--flash-attn"),
            Some("-ub") => OsString::from("--ubatch-size"),
            Some("-ctk") => OsString::from("--cache-type-k"),
            Some("-ctv") => OsString::from("--cache-type-v"),
            Some("-to") => OsString::from("--timeout"),
            _ => a,
        })
        .collect()
}

/// Errors that end the worker process (non-zero exit).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A flag value is unusable.
    #[error("bad arguments: {0}")]
    Args(String),
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// host:port.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The model could not be loaded.
    #[error("cannot load model {path}: {reason}")]
    Load {
        /// The model file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The async runtime or a thread could not start.
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// What a loader needs to build the engine.
#[derive(Clone, Debug)]
pub(crate) struct LoadParams {
    /// Model file.
    pub path: PathBuf,
    /// `-c` (None = default, 0 = the model's).
    pub ctx_size: Option<usize>,
    /// Slots.
    pub n_slots: usize,
    /// Tokens per forward pass.
    pub n_batch: usize,
    /// Compute threads.
    pub n_threads: usize,
    /// Embeddings enabled for a generation model.
    pub embedding: bool,
    /// A chat template (Jinja source or built-in name) replacing the model's.
    pub chat_template: Option<String>,
    /// KV cache element types of keys and values (`-ctk`, `-ctv`).
    pub cache_types: (crate::engine::model::KvType, crate::engine::model::KvType),
    /// `--no-mmap` / `--mlock`.
    pub load_mode: crate::engine::gguf::LoadMode,
    /// `-ngl`, `--device`.
    pub gpu: crate::engine::gpu::GpuOptions,
}

/// A loaded engine, split into its shared and its single-threaded halves.
pub(crate) struct Loaded {
    /// Tokenizer, template, facts.
    pub codec: Arc<dyn Codec>,
    /// The context, for the scheduler thread.
    pub compute: Box<dyn Compute>,
    /// Total context (tokens).
    pub n_ctx: usize,
    /// Context per slot (tokens).
    pub n_ctx_seq: usize,
    /// What runs the model (the CPU, or a GPU adapter and its offloaded layers): `/props`, `/health`,
    /// the start-up log and `/metrics` report it.
    pub backend: crate::engine::gpu::BackendInfo,
}

/// Builds the engine from [`LoadParams`]; runs on a blocking thread. The error string is the reason shown
/// on stderr.
pub(crate) type Loader = Box<dyn FnOnce(&LoadParams) -> Result<Loaded, String> + Send>;

/// The context plan: `(n_ctx total, n_ctx per slot)` from `-c`, the model's training context and the slots.
/// Default total = min(4096, n_ctx_train); `-c 0` = n_ctx_train.
///
/// Errors: a slot context of 0 tokens.
pub(crate) fn plan_context(
    ctx_size: Option<usize>,
    n_ctx_train: usize,
    n_slots: usize,
) -> Result<(usize, usize), String> {
    let total = match ctx_size {
        None => 4096.min(n_ctx_train.max(1)),
        Some(0) => n_ctx_train,
        Some(c) => c,
    };
    let per = total / n_slots.max(1);
    if per < 2 {
        return Err(format!(
            "a context of {total} tokens over {n_slots} slots leaves {per} tokens per slot"
        ));
    }
    Ok((per * n_slots.max(1), per))
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `cyber-inference worker` until SIGTERM/SIGINT (then exit status 0) or a fatal error.
///
/// Errors: [`WorkerError`] — bad flags, the port is taken, the model cannot load.
pub fn run(args: &WorkerArgs) -> Result<(), WorkerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    rt.block_on(async {
        let s = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: draining");
            s.cancel();
        });
        serve(args, engine_loader(), shutdown, None).await
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The loader over our engine (`crate::engine`).
fn engine_loader() -> Loader {
    Box::new(|p: &LoadParams| engine_backend::load(p))
}

mod engine_backend;

/// Serves the worker API until `shutdown` fires, then drains. `bound` (tests) receives the bound address.
///
/// Errors: [`WorkerError`].
pub(crate) async fn serve(
    args: &WorkerArgs,
    loader: Loader,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), WorkerError> {
    if args.parallel == 0 {
        return Err(WorkerError::Args("-np must be at least 1".into()));
    }
    if args.batch_size == 0 || args.ubatch_size == 0 {
        return Err(WorkerError::Args("-b and -ub must be at least 1".into()));
    }
    if args.no_jinja {
        tracing::warn!("--no-jinja: chat templates are rendered by the Jinja engine all the same");
    }
    if args.flash_attn == "on" {
        tracing::info!("-fa on: the CPU attention kernel is a single fused pass already");
    }
    if args.flash_attn == "off" && args.cache_type_v.is_quantized() {
        // llama.cpp: "V cache quantization requires flash_attn" (llama_init_from_model).
        return Err(WorkerError::Args(format!(
            "-ctv {}: a quantized V cache needs flash attention; drop -fa off",
            args.cache_type_v.name()
        )));
    }
    let defaults = server_defaults(args)?;
    let mut pooling = args.pooling.as_deref().map(parse_pooling).transpose()?;
    // --reranking: `params.embedding = true; params.pooling_type = LLAMA_POOLING_TYPE_RANK` (common/arg.cpp).
    let embedding = args.embedding || args.reranking;
    if args.reranking {
        pooling = Some(backend::Pooling::Rank);
    }
    let cors = crate::http_server::cors_layer(args.cors_origins.as_deref().unwrap_or(""))
        .map_err(|e| WorkerError::Args(format!("--cors-origins: {e}")))?;
    let chat_template = match (&args.chat_template_file, &args.chat_template) {
        (Some(f), _) => Some(std::fs::read_to_string(f).map_err(|e| {
            WorkerError::Args(format!("--chat-template-file {}: {e}", f.display()))
        })?),
        (None, t) => t.clone(),
    };
    // llama-server: "not a directory: PATH" (common/arg.cpp).
    if let Some(d) = &args.slot_save_path
        && !d.is_dir()
    {
        return Err(WorkerError::Args(format!(
            "--slot-save-path: not a directory: {}",
            d.display()
        )));
    }
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| WorkerError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    if let Some(b) = bound {
        let _ = b.send(local);
    }
    let mut aliases: Vec<String> = args
        .alias
        .iter()
        .flat_map(|a| a.split(','))
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if aliases.is_empty() {
        aliases.push(
            args.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
        );
    }
    let alias = aliases[0].clone();
    // A forward pass holds at most -ub tokens (llama.cpp's physical batch, within the logical -b);
    // each decode step holds one token per generating slot, so it never holds fewer than the slots.
    let n_batch = args.batch_size.min(args.ubatch_size).max(args.parallel);
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState {
        info: ServerInfo {
            alias,
            aliases,
            defaults,
            slots_endpoint: !args.no_slots,
            slot_save_path: args.slot_save_path.clone(),
            pooling,
            model_path: args.model.display().to_string(),
            instance: args.instance.clone(),
            api_key: args.api_key.clone(),
            n_slots: args.parallel,
            max_queue: args.max_queue,
            n_batch,
            embedding,
            reasoning_format: args.reasoning_format,
            cache_types: (args.cache_type_k, args.cache_type_v),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        },
        metrics: metrics.clone(),
        ready: OnceLock::new(),
        admission: Arc::new(tokio::sync::Semaphore::new(
            args.parallel.saturating_add(args.max_queue),
        )),
    });
    // Header-read timeout, connection limit, body limit, TCP_NODELAY (each streamed token is a small
    // write that must not wait for the client's delayed ACK): the same server loop as the supervisor's.
    let app = crate::http_server::with_body_limit(http::router(state.clone()).layer(cors));
    let server = tokio::spawn(crate::http_server::serve(
        listener,
        app,
        crate::http_server::Limits::worker_with_timeout(Duration::from_secs(args.timeout)),
        shutdown.clone().cancelled_owned(),
    ));
    tracing::info!(%local, model = %args.model.display(), "listening; loading the model");

    let params = LoadParams {
        path: args.model.clone(),
        ctx_size: args.ctx_size,
        n_slots: args.parallel,
        n_batch,
        n_threads: args.threads.unwrap_or_else(default_threads).max(1),
        load_mode: crate::engine::gguf::LoadMode {
            mmap: !args.no_mmap,
            mlock: args.mlock,
        },
        embedding,
        chat_template,
        cache_types: (args.cache_type_k, args.cache_type_v),
        gpu: crate::engine::gpu::GpuOptions {
            n_gpu_layers: args.gpu_layers.unwrap_or(-1),
            device: args.device.clone(),
        },
    };
    let load = tokio::task::spawn_blocking(move || loader(&params));
    let loaded = tokio::select! {
        r = load => r.map_err(|e| WorkerError::Load { path: args.model.clone(), reason: e.to_string() })?,
        _ = shutdown.cancelled() => {
            tracing::info!("shut down while loading");
            return Ok(());
        }
    };
    let loaded = loaded.map_err(|reason| WorkerError::Load {
        path: args.model.clone(),
        reason,
    })?;
    if pooling == Some(backend::Pooling::Rank) && !loaded.codec.info().is_encoder {
        return Err(WorkerError::Load {
            path: args.model.clone(),
            reason: format!(
                "--reranking / --pooling rank needs a bert cross-encoder with a classification head; \
                 this model is {}",
                loaded.codec.info().arch
            ),
        });
    }
    let cfg = SchedulerConfig {
        n_slots: args.parallel,
        n_ctx_seq: loaded.n_ctx_seq,
        n_batch,
        ctx_shift: args.context_shift,
    };
    let slot_file_max_bytes = loaded.compute.seq_state_max_bytes();
    if let Some(why) = &loaded.backend.fallback_reason {
        tracing::warn!(
            gpu_layers = loaded.backend.n_gpu_layers,
            "the model runs on the CPU: {why}"
        );
    }
    metrics.gpu_layers.store(
        loaded.backend.offloaded_layers as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let backend_log = backend_summary(&loaded.backend);
    let (tx, sched) = scheduler::spawn(loaded.codec.clone(), loaded.compute, cfg, metrics)?;
    let stop_tx = tx.clone();
    let _ = state.ready.set(Ready {
        codec: loaded.codec,
        tx,
        n_ctx: loaded.n_ctx,
        n_ctx_seq: loaded.n_ctx_seq,
        slot_file_max_bytes,
        backend: loaded.backend,
    });
    tracing::info!(
        n_ctx = loaded.n_ctx,
        n_ctx_slot = loaded.n_ctx_seq,
        slots = args.parallel,
        "model loaded; ready; {backend_log}"
    );

    shutdown.cancelled().await;
    let grace = Duration::from_secs(args.grace_period);
    match tokio::time::timeout(grace, server).await {
        Ok(_) => tracing::info!("in-flight requests finished"),
        Err(_) => tracing::warn!(
            "grace period of {}s over; cancelling the remaining requests",
            args.grace_period
        ),
    }
    let _ = stop_tx.send(Command::Shutdown);
    let _ = tokio::task::spawn_blocking(move || sched.join()).await;
    tracing::info!("worker stopped");
    Ok(())
}

/// The backend part of the start-up log line: `backend vulkan (NVIDIA GeForce RTX 4090, discrete),
/// 30/30 layers and the output on the GPU, 512.0 MiB of weights on the device`, or `backend cpu`.
fn backend_summary(b: &crate::engine::gpu::BackendInfo) -> String {
    if !b.is_gpu() {
        return format!("backend {}", b.name);
    }
    format!(
        "backend {} ({}, {}), {}/{} layers{} on the GPU, {:.1} MiB of weights on the device",
        b.name,
        b.adapter.as_deref().unwrap_or("unnamed adapter"),
        b.device_type.as_deref().unwrap_or("unknown type"),
        b.offloaded_layers,
        b.n_layer,
        if b.output_offloaded {
            " and the output"
        } else {
            ""
        },
        b.device_weight_bytes as f64 / (1024.0 * 1024.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_plan_follows_llama_server() {
        assert_eq!(plan_context(None, 8192, 1), Ok((4096, 4096)));
        assert_eq!(plan_context(None, 2048, 4), Ok((2048, 512)));
        assert_eq!(plan_context(Some(0), 8192, 2), Ok((8192, 4096)));
        assert_eq!(plan_context(Some(1000), 8192, 3), Ok((999, 333)));
        assert!(plan_context(Some(3), 8192, 4).is_err());
    }

    #[test]
    fn the_supervisors_argv_parses_back_into_the_same_flags() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            worker: WorkerArgs,
        }
        let sup = SupervisedArgs {
            model: PathBuf::from("/models/a b.gguf"),
            port: 41234,
            alias: "Org/Model-Q4_K_M".into(),
            ctx_size: 8192,
            threads: 3,
            parallel: 2,
            embedding: true,
            reranking: false,
            gpu_layers: -1,
            cache_types: (
                crate::engine::model::KvType::Q8_0,
                crate::engine::model::KvType::Q4_0,
            ),
            instance: "0123abcd".into(),
        };
        let argv = std::iter::once(OsString::from("worker")).chain(sup.argv());
        let w = <Cli as clap::Parser>::try_parse_from(argv).unwrap().worker;
        assert_eq!(w.model, sup.model);
        assert_eq!((w.host.as_str(), w.port), ("127.0.0.1", sup.port));
        assert_eq!(w.alias.as_deref(), Some(sup.alias.as_str()));
        assert_eq!(w.ctx_size, Some(8192));
        assert_eq!(w.threads, Some(3));
        assert_eq!(w.parallel, 2);
        assert!(w.embedding);
        assert_eq!(w.gpu_layers, Some(-1));
        assert_eq!((w.cache_type_k, w.cache_type_v), sup.cache_types);
        assert_eq!(w.instance.as_deref(), Some("0123abcd"));
        assert_eq!(w.api_key, None, "the key never travels in argv");
        let plain = SupervisedArgs {
            embedding: false,
            ..sup
        };
        let argv = std::iter::once(OsString::from("worker")).chain(plain.argv());
        assert!(
            !<Cli as clap::Parser>::try_parse_from(argv)
                .unwrap()
                .worker
                .embedding
        );
    }

    #[test]
    fn llama_flags_are_rewritten() {
        let a = llama_style_args(["x", "-np", "4", "-ngl", "-1", "-c", "8"].map(OsString::from));
        assert_eq!(
            a,
            ["x", "--parallel", "4", "--gpu-layers", "-1", "-c", "8"].map(OsString::from)
        );
    }
}
