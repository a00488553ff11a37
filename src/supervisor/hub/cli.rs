//! The `download-model` command: lists a repo's models or downloads one with a progress bar, then
//! registers it, through the same [`Hub`] and [`register`] as the admin API.

use tokio_util::sync::CancellationToken;

use super::select::{DownloadRequest, choose_model};
use super::transfer::human_bytes;
use super::{Hub, HubConfig, register};
use crate::config::Loaded;

/// `cyber-inference download-model`: fetch a GGUF model from Hugging Face into MODELS_DIR.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// The repo, as OWNER/NAME (e.g. bartowski/SmolLM2-135M-Instruct-GGUF).
    pub repo_id: String,
    /// The GGUF file to fetch (any part of a split fetches all parts). Default: Q4_K_M, else Q8_0,
    /// else the smallest.
    #[arg(long)]
    pub filename: Option<String>,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Only list the repo's GGUF models (size, quantization, parts) and exit.
    #[arg(long)]
    pub list: bool,
}

/// Runs `download-model` on its own tokio runtime: lists or downloads with an indicatif bar on stderr,
/// prints the downloaded path(s) on stdout, then registers the model in the catalogue ([`register`]).
/// Interrupting it (Ctrl-C) keeps the partial file, so running it again resumes.
pub fn run_cli(loaded: &Loaded, args: &DownloadArgs) -> anyhow::Result<()> {
    let config = HubConfig::from_settings(loaded);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let hub = Hub::new(config)?;
        if !args.list {
            return download_cli(loaded, &hub, args).await;
        }
        {
            let models = hub.list_models(&args.repo_id, Some(&args.revision)).await?;
            let chosen = choose_model(&models).map(|m| m.filename.clone());
            for m in &models {
                let mark = if Some(&m.filename) == chosen.as_ref() {
                    "*"
                } else {
                    " "
                };
                let parts = if m.files.len() > 1 || !m.missing_parts.is_empty() {
                    format!(
                        "  ({} parts{})",
                        m.files.len() + m.missing_parts.len(),
                        if m.missing_parts.is_empty() {
                            ""
                        } else {
                            ", incomplete"
                        }
                    )
                } else {
                    String::new()
                };
                println!(
                    "{mark} {:<10} {:>10}  {}{parts}",
                    m.quantization.as_deref().unwrap_or("?"),
                    human_bytes(m.total_size),
                    m.filename
                );
            }
            Ok(())
        }
    })
}

/// `download-model` without `--list`: init (so a bad DATA_DIR fails before any byte), download with a
/// bar, print the paths, register.
async fn download_cli(loaded: &Loaded, hub: &Hub, args: &DownloadArgs) -> anyhow::Result<()> {
    {
        let ini = crate::supervisor::init::run(&loaded.settings).await?;
        if let Some(pw) = &ini.generated_password {
            eprintln!("cyber-inference: created user `admin` with password: {pw} (shown once)");
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg}\n[{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        let req = DownloadRequest {
            repo_id: args.repo_id.clone(),
            revision: Some(args.revision.clone()),
            filename: args.filename.clone(),
        };
        let b = bar.clone();
        let result = hub
            .download(
                &req,
                move |p| {
                    b.set_length(p.total);
                    b.set_position(p.downloaded);
                    b.set_message(format!(
                        "{:?} {} ({}/{})",
                        p.phase, p.file, p.file_index, p.file_count
                    ));
                },
                CancellationToken::new(),
            )
            .await;
        bar.finish_and_clear();
        let done = result?;
        for p in &done.paths {
            println!("{}", p.display());
        }
        let name = register(&ini.db, &loaded.settings.models_dir, &done).await;
        ini.db.close().await;
        eprintln!("registered as model `{}`", name?);
        Ok(())
    }
}
