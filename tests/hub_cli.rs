//! `cyber-inference download-model` as a user runs it, against a local Hugging Face–compatible server
//! named by the standard HF_ENDPOINT variable.

mod support;

use std::process::Output;
use support::assets::SMOL_Q4_1 as Q41;
use support::assets::SMOL_Q4_K_M as Q4KM;
use support::files::{files_in, sha256, sha256_file};
use support::hub::{HfServer, Served, asset, split_asset};
use support::process::BIN;

async fn cli(server: &HfServer, dir: &std::path::Path, args: &[&str]) -> Output {
    run(server, dir, "download-model", args).await
}

/// The catalogue as `list-models` prints it.
async fn list_models(server: &HfServer, dir: &std::path::Path) -> String {
    let out = run(server, dir, "list-models", &[]).await;
    succeeded(&out)
}

/// Asserts that a command succeeded (its stderr as the message otherwise); returns its stdout.
fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn run(server: &HfServer, dir: &std::path::Path, command: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg(command)
        .args(args)
        .env("HF_ENDPOINT", &server.url)
        .env_remove("HF_TOKEN")
        .env_remove("CYBER_INFERENCE_HF_ENDPOINT")
        .env_remove("CYBER_INFERENCE_HF_TOKEN")
        .env("CYBER_INFERENCE_DATA_DIR", dir.join("data"))
        .env("CYBER_INFERENCE_MODELS_DIR", dir.join("models"));
    cmd.output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_model_lists_downloads_and_explains_failures() {
    let server = HfServer::start().await;
    server.state.add_repo(
        "test/SmolLM2-135M-Instruct-GGUF",
        vec![Served::asset(Q41, Q41), Served::asset(Q4KM, Q4KM)],
    );
    let dir = tempfile::tempdir().unwrap();

    let out = cli(
        &server,
        dir.path(),
        &["test/SmolLM2-135M-Instruct-GGUF", "--list"],
    )
    .await;
    let stdout = succeeded(&out);
    let chosen: Vec<_> = stdout.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(chosen.len(), 1, "{stdout}");
    assert!(
        chosen[0].contains(Q4KM) && chosen[0].contains("Q4_K_M"),
        "{stdout}"
    );
    assert!(stdout.contains(Q41) && stdout.contains("MiB"), "{stdout}");

    // Interrupted once at 40%: the command still finishes, by resuming.
    let (data, expected) = asset(Q4KM);
    *server.state.faults.drop_at.lock().unwrap() = Some(data.len() as u64 * 4 / 10);
    let out = cli(&server, dir.path(), &["test/SmolLM2-135M-Instruct-GGUF"]).await;
    let path = dir.path().join("models").join(Q4KM);
    assert_eq!(succeeded(&out).trim(), path.display().to_string());
    assert_eq!(sha256_file(&path), expected);
    assert!(
        server
            .state
            .file_requests()
            .iter()
            .any(|s| s.range.is_some())
    );
    assert_eq!(files_in(&dir.path().join("models")), [Q4KM]);
    let stem = Q4KM.trim_end_matches(".gguf");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("registered as model `{stem}`"))
    );
    let catalogue = list_models(&server, dir.path()).await;
    assert!(
        catalogue
            .lines()
            .any(|l| l.starts_with(stem) && l.contains("Q4_K_M")),
        "{catalogue}"
    );

    // A corrupted transfer: checksum error, no file, no catalogue row.
    server
        .state
        .faults
        .corrupt
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let out = cli(
        &server,
        dir.path(),
        &["test/SmolLM2-135M-Instruct-GGUF", "--filename", Q41],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch") && err.contains(Q41),
        "{err}"
    );
    assert_eq!(files_in(&dir.path().join("models")), [Q4KM]);
    let catalogue = list_models(&server, dir.path()).await;
    assert!(!catalogue.contains("Q4_1"), "{catalogue}");
    server
        .state
        .faults
        .corrupt
        .store(false, std::sync::atomic::Ordering::SeqCst);

    let out = cli(&server, dir.path(), &["test/missing-GGUF"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("test/missing-GGUF") && err.contains("not found"),
        "{err}"
    );

    let out = cli(
        &server,
        dir.path(),
        &["test/SmolLM2-135M-Instruct-GGUF", "--filename", "nope.gguf"],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.gguf") && err.contains(Q41), "{err}");

    *server.state.faults.require_token.lock().unwrap() = Some("hf_x".into());
    let out = cli(&server, dir.path(), &["test/SmolLM2-135M-Instruct-GGUF"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HF_TOKEN"));

    // `remove-model` deletes the downloaded file and its catalogue row.
    let out = run(&server, dir.path(), "remove-model", &[stem]).await;
    succeeded(&out);
    assert!(files_in(&dir.path().join("models")).is_empty());
    let catalogue = list_models(&server, dir.path()).await;
    assert!(!catalogue.contains(stem), "{catalogue}");
    let out = run(&server, dir.path(), "remove-model", &[stem]).await;
    assert!(!out.status.success(), "a second remove finds no model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_model_downloads_lists_runs_and_removes_as_one() {
    let parts = split_asset(Q41, "SmolLM2-135M-Instruct-Q4_1", 120);
    assert_eq!(parts.len(), 3);
    let server = HfServer::start().await;
    server.state.add_repo(
        "test/split",
        parts
            .iter()
            .map(|(n, b)| Served::new(n, b.clone()))
            .collect(),
    );
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");

    let out = cli(&server, dir.path(), &["test/split"]).await;
    succeeded(&out);
    let mut names: Vec<String> = parts.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(files_in(&models), names);
    for (n, b) in &parts {
        assert_eq!(sha256_file(&models.join(n)), sha256(b));
    }
    let catalogue = list_models(&server, dir.path()).await;
    let rows: Vec<&str> = catalogue
        .lines()
        .filter(|l| l.starts_with("SmolLM2"))
        .collect();
    assert_eq!(rows.len(), 1, "one model for three parts:\n{catalogue}");
    assert!(
        rows[0].starts_with("SmolLM2-135M-Instruct-Q4_1 "),
        "{catalogue}"
    );

    // The engine runs it from its first part.
    let out = tokio::process::Command::new(BIN)
        .args(["run", "-n", "8", "-p", "The capital of France is", "-m"])
        .arg(models.join(&parts[0].0))
        .output()
        .await
        .unwrap();
    assert!(succeeded(&out).len() > "The capital of France is".len());

    let out = run(
        &server,
        dir.path(),
        "remove-model",
        &["SmolLM2-135M-Instruct-Q4_1"],
    )
    .await;
    let stdout = succeeded(&out);
    assert_eq!(stdout.matches("deleted ").count(), 3, "{stdout}");
    assert!(files_in(&models).is_empty(), "{:?}", files_in(&models));
}
