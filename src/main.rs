//! The `cyber-inference` binary: parses the command line, starts logging and dispatches to a subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cyber_inference::config::Settings;

#[derive(Parser)]
#[command(
    name = "cyber-inference",
    version,
    about = "A local LLM server for one machine"
)]
struct Cli {
    /// TOML settings file (default: $CYBER_INFERENCE_DATA_DIR/config.toml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a GGUF file's metadata, tensors and quantization mix.
    Inspect(cyber_inference::engine::inspect::InspectArgs),
    /// Split a GGUF model into parts as llama.cpp's `gguf-split --split` does (`PREFIX-00001-of-0000N.gguf`).
    GgufSplit(cyber_inference::engine::gguf_split::SplitArgs),
    /// Tokenize text with a GGUF file's tokenizer (works on vocab-only files).
    Tokenize(cyber_inference::engine::tokenizer::cli::TokenizeArgs),
    /// Generate a continuation of a prompt (greedy with --temp 0).
    Run(cyber_inference::engine::model::cli::RunArgs),
    /// Perplexity of a model on a text file, computed as llama-perplexity does.
    Perplexity(cyber_inference::engine::model::cli::PerplexityArgs),
    /// Print pooled, L2-normalised embeddings of texts, one line each.
    Embed(cyber_inference::engine::model::cli::EmbedArgs),
    /// Render a chat with a model's chat template and print the prompt.
    ChatTemplate(cyber_inference::engine::chat::ChatTemplateArgs),
    /// Run the supervisor: catalogue, workers on demand, OpenAI proxy, admin API (runs `init` first).
    Serve,
    /// Create DATA_DIR, MODELS_DIR, the database, the JWT secret and the `admin` user.
    Init,
    /// Scan MODELS_DIR and print the model catalogue.
    ListModels,
    /// Remove a model from the catalogue and delete its file (every part of a split GGUF).
    RemoveModel {
        /// The model id (see list-models).
        name: String,
        /// Keep the .gguf file (it is registered again by the next scan while it stays in MODELS_DIR).
        #[arg(long)]
        keep_file: bool,
    },
    /// Ask a running supervisor's /health; exit 0 when it answers 200 OK, 1 otherwise (for container health checks).
    Healthcheck(cyber_inference::supervisor::healthcheck::HealthcheckArgs),
    /// Download a GGUF model from Hugging Face (HF_ENDPOINT, HF_TOKEN) into MODELS_DIR.
    DownloadModel(cyber_inference::supervisor::hub::DownloadArgs),
    /// One model's OpenAI-compatible inference server (slots, continuous batching).
    Worker(Box<cyber_inference::worker::WorkerArgs>),
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Runtime::new()?.block_on(f))
}

fn init_tracing(level: &str, serve: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if serve {
        // The supervisor also keeps its log lines for the admin API.
        fmt.with_writer(cyber_inference::supervisor::logs::SupervisorLogWriter)
            .try_init()
    } else {
        fmt.with_writer(std::io::stderr).try_init()
    };
}

/// `worker`: reads no settings file (the supervisor's may hold secrets) and no CYBER_INFERENCE_* setting
/// but its log level; it is configured by its flags.
fn run_worker(args: &cyber_inference::worker::WorkerArgs) -> anyhow::Result<()> {
    let level = std::env::var("CYBER_INFERENCE_LOG_LEVEL")
        .unwrap_or_else(|_| if args.verbose { "debug" } else { "info" }.into());
    init_tracing(&level, false);
    cyber_inference::worker::run(args)?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Worker(args) => return run_worker(&args),
        c => c,
    };
    let loaded = Settings::load(cli.config.as_deref())?;
    init_tracing(
        &loaded.settings.log_level,
        matches!(command, Command::Serve),
    );
    use cyber_inference::supervisor;
    match command {
        Command::Inspect(args) => cyber_inference::engine::inspect::run(&args)?,
        Command::GgufSplit(args) => cyber_inference::engine::gguf_split::run(&args)?,
        Command::Tokenize(args) => cyber_inference::engine::tokenizer::cli::run(&args)?,
        Command::Run(args) => cyber_inference::engine::model::cli::run(&args)?,
        Command::Perplexity(args) => cyber_inference::engine::model::cli::perplexity_cmd(&args)?,
        Command::Embed(args) => cyber_inference::engine::model::cli::embed_cmd(&args)?,
        Command::ChatTemplate(args) => cyber_inference::engine::chat::run(&args)?,
        Command::Serve => block_on(supervisor::serve(loaded))??,
        Command::Init => block_on(supervisor::init_command(&loaded.settings))??,
        Command::ListModels => block_on(supervisor::list_models_command(&loaded.settings))??,
        Command::RemoveModel { name, keep_file } => block_on(supervisor::remove_model_command(
            &loaded.settings,
            &name,
            keep_file,
        ))??,
        Command::Healthcheck(args) => {
            cyber_inference::supervisor::healthcheck::run(&args, &loaded.settings)?
        }
        Command::DownloadModel(args) => cyber_inference::supervisor::hub::run_cli(&loaded, &args)?,
        Command::Worker(args) => run_worker(&args)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(cyber_inference::worker::llama_style_args(
        std::env::args_os(),
    ));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
