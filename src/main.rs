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
    /// One model's OpenAI-compatible inference server (slots, continuous batching).
    Worker(cyber_inference::worker::WorkerArgs),
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let loaded = Settings::load(cli.config.as_deref())?;
    init_tracing(&loaded.settings.log_level);
    match cli.command {
        Command::Inspect(args) => cyber_inference::engine::inspect::run(&args)?,
        Command::Worker(args) => cyber_inference::worker::run(&args)?,
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
