//! The worker: an OpenAI-compatible HTTP server around one engine, with slots and continuous batching.
//!
//! `cyber-inference worker -m FILE --port P …` binds its port first (so `/health` answers 503 while the
//! model loads), loads the model on a blocking thread, starts the scheduler thread and then answers 200.
//! A model that cannot load ends the process with the reason on stderr and a non-zero exit. SIGTERM/SIGINT:
//! stop accepting, let in-flight requests finish within `--grace-period`, exit 0.
//!
//! Context sizing follows llama-server: `-c` is the total context, split evenly over the `-np` slots
//! (`n_ctx_seq = n_ctx / n_slots`); a prompt must leave room for at least one generated token.

pub mod backend;
pub mod chat;
mod error;
#[cfg(test)]
pub(crate) mod fake;
pub mod http;
pub mod metrics;
pub mod scheduler;
#[cfg(test)]
mod serve_tests;
pub mod slot;
pub mod structured;
pub mod text;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use error::ApiError;

use backend::{Codec, Compute};
use http::{AppState, Ready, ServerInfo};
use metrics::Metrics;
use scheduler::{Command, SchedulerConfig};

/// The environment variable that carries a worker's key (`--api-key`).
pub const WORKER_API_KEY_ENV: &str = "CYBER_INFERENCE_WORKER_API_KEY";

/// Command-line flags of `cyber-inference worker` (llama-server's names; `-np` and `-ngl` are accepted
/// through [`llama_style_args`]).
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    /// GGUF model file.
    #[arg(short = 'm', long = "model", value_name = "FILE")]
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Model id the worker answers to (default: the file stem).
    #[arg(short = 'a', long)]
    pub alias: Option<String>,
    /// Total context in tokens, split over the slots (default 4096, or the model's training context if
    /// smaller; 0 = the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Compute threads (default: available cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Parallel slots (`-np`).
    #[arg(long = "parallel", default_value_t = 1)]
    pub parallel: usize,
    /// Generation and embedding requests that may wait for a free slot; past the slots and these, a
    /// request is refused with 503 and `Retry-After` instead of queueing without bound.
    #[arg(long = "max-queue", default_value_t = 64)]
    pub max_queue: usize,
    /// Most tokens per forward pass (prompt chunk size).
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Layers to offload to a GPU (`-ngl`); accepted, but this build runs on the CPU only.
    #[arg(long = "gpu-layers", allow_hyphen_values = true)]
    pub gpu_layers: Option<i32>,
    /// Serve `/v1/embeddings` with a generation model.
    #[arg(long)]
    pub embedding: bool,
    /// Require `Authorization: Bearer KEY` on every route but `/health`. Also read from
    /// `CYBER_INFERENCE_WORKER_API_KEY` (how the supervisor passes each worker its key: the environment
    /// is private to the process's user, argv is readable by everyone). Without either the worker is
    /// open, as llama-server is.
    #[arg(long = "api-key", env = WORKER_API_KEY_ENV, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Nonce echoed by `/props` (the supervisor's check that it talks to its own worker).
    #[arg(long)]
    pub instance: Option<String>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long = "grace-period", default_value_t = 30)]
    pub grace_period: u64,
    /// A Jinja chat template file that replaces the model's (llama-server's flag).
    #[arg(long = "chat-template-file", value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// A chat template given inline: a built-in name (`chatml`, `llama3`, …) or Jinja source.
    #[arg(
        long = "chat-template",
        value_name = "NAME|JINJA",
        conflicts_with = "chat_template_file"
    )]
    pub chat_template: Option<String>,
    /// Where the model's thinking goes: `none` (left in content), `deepseek` (always extracted to
    /// `reasoning_content`), `auto` (extracted when the template has thinking markers); a request's
    /// `reasoning_format` overrides it.
    #[arg(long = "reasoning-format", default_value = "auto", value_parser = parse_reasoning_format)]
    pub reasoning_format: crate::engine::chat::reasoning::ReasoningFormat,
}

fn parse_reasoning_format(
    s: &str,
) -> Result<crate::engine::chat::reasoning::ReasoningFormat, String> {
    s.parse()
}

/// Rewrites llama.cpp's multi-letter single-dash flags (`-np`, `-ngl`) to their long forms so clap can
/// parse them; everything else is passed through unchanged.
pub fn llama_style_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-np") => OsString::from("--parallel"),
            Some("-ngl") => OsString::from("--gpu-layers"),
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
pub struct LoadParams {
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
}

/// A loaded engine, split into its shared and its single-threaded halves.
pub struct Loaded {
    /// Tokenizer, template, facts.
    pub codec: Arc<dyn Codec>,
    /// The context, for the scheduler thread.
    pub compute: Box<dyn Compute>,
    /// Total context (tokens).
    pub n_ctx: usize,
    /// Context per slot (tokens).
    pub n_ctx_seq: usize,
}

/// Builds the engine from [`LoadParams`]; runs on a blocking thread. The error string is the reason shown
/// on stderr.
pub type Loader = Box<dyn FnOnce(&LoadParams) -> Result<Loaded, String> + Send>;

/// The context plan: `(n_ctx total, n_ctx per slot)` from `-c`, the model's training context and the slots.
/// Default total = min(4096, n_ctx_train); `-c 0` = n_ctx_train.
///
/// Errors: a slot context of 0 tokens.
pub fn plan_context(
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
pub async fn serve(
    args: &WorkerArgs,
    loader: Loader,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), WorkerError> {
    if args.parallel == 0 {
        return Err(WorkerError::Args("-np must be at least 1".into()));
    }
    if args.batch_size == 0 {
        return Err(WorkerError::Args("-b must be at least 1".into()));
    }
    if let Some(ngl) = args.gpu_layers
        && ngl != 0
    {
        tracing::warn!("-ngl {ngl}: this build has no GPU backend; all layers run on the CPU");
    }
    let chat_template = match (&args.chat_template_file, &args.chat_template) {
        (Some(f), _) => Some(std::fs::read_to_string(f).map_err(|e| {
            WorkerError::Args(format!("--chat-template-file {}: {e}", f.display()))
        })?),
        (None, t) => t.clone(),
    };
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
    let alias = args.alias.clone().unwrap_or_else(|| {
        args.model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    // Each decode step holds one token per generating slot, so a batch never holds fewer than the slots.
    let n_batch = args.batch_size.max(args.parallel);
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(AppState {
        info: ServerInfo {
            alias,
            model_path: args.model.display().to_string(),
            instance: args.instance.clone(),
            api_key: args.api_key.clone(),
            n_slots: args.parallel,
            max_queue: args.max_queue,
            n_batch,
            embedding: args.embedding,
            reasoning_format: args.reasoning_format,
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
    let app = crate::http_server::with_body_limit(http::router(state.clone()));
    let server = tokio::spawn(crate::http_server::serve(
        listener,
        app,
        crate::http_server::Limits::WORKER,
        shutdown.clone().cancelled_owned(),
    ));
    tracing::info!(%local, model = %args.model.display(), "listening; loading the model");

    let params = LoadParams {
        path: args.model.clone(),
        ctx_size: args.ctx_size,
        n_slots: args.parallel,
        n_batch,
        n_threads: args.threads.unwrap_or_else(default_threads).max(1),
        embedding: args.embedding,
        chat_template,
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
    let cfg = SchedulerConfig {
        n_slots: args.parallel,
        n_ctx_seq: loaded.n_ctx_seq,
        n_batch,
    };
    let (tx, sched) = scheduler::spawn(loaded.codec.clone(), loaded.compute, cfg, metrics)?;
    let stop_tx = tx.clone();
    let _ = state.ready.set(Ready {
        codec: loaded.codec,
        tx,
        n_ctx: loaded.n_ctx,
        n_ctx_seq: loaded.n_ctx_seq,
    });
    tracing::info!(
        n_ctx = loaded.n_ctx,
        n_ctx_slot = loaded.n_ctx_seq,
        slots = args.parallel,
        "model loaded; ready"
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
    fn llama_flags_are_rewritten() {
        let a = llama_style_args(["x", "-np", "4", "-ngl", "-1", "-c", "8"].map(OsString::from));
        assert_eq!(
            a,
            ["x", "--parallel", "4", "--gpu-layers", "-1", "-c", "8"].map(OsString::from)
        );
    }
}
