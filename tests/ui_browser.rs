//! The admin UI in a real headless Chromium (Debian's `/usr/bin/chromium`, driven by `playwright-core`
//! from `tests/browser`): a real `serve` with SmolLM2-135M in its MODELS_DIR; the script logs in, watches
//! the charts, loads the model, chats, changes a setting, reads the worker's log, unloads and logs out,
//! saving screenshots under a folder it prints. A local Hugging Face–compatible server
//! (`tests/support/hub.rs`) serves a repo for the "download from Hugging Face" form: the script lists the
//! repo, downloads a file with live progress and sees it in the catalogue (the hub's admin API must be in
//! the binary: a 404 on `/admin/api/downloads` fails the test).
//!
//! Needs `npm install` in `tests/browser` (`.ci/run` does it) and the worker (`cyber-inference worker`)
//! for the load and chat steps.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::assets::{self, MINILM as HF_CANCEL_FILE, SMOL_Q4_1 as HF_FILE};
use support::hub::{HfServer, Served};
use support::server::{PASSWORD, Server};
use support::ui::{MODEL_FILE, first_model, get, login};

/// The repo the fake hub serves; the browser downloads `HF_FILE` from it (not the one in MODELS_DIR).
const HF_REPO: &str = "test/SmolLM2-135M-Instruct-GGUF";
/// A repo whose one file (`HF_CANCEL_FILE`) the browser starts downloading and cancels.
const HF_CANCEL_REPO: &str = "test/all-MiniLM-L6-v2-GGUF";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ui_in_headless_chromium() {
    let browser_dir = assets::repo_path("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "run `npm install` in {} first (.ci/run does)",
        browser_dir.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file(),
        "Debian's chromium is required at /usr/bin/chromium"
    );
    let hf = HfServer::start().await;
    hf.state.add_repo(
        HF_REPO,
        vec![
            Served::asset(HF_FILE, HF_FILE),
            Served::asset(MODEL_FILE, MODEL_FILE),
        ],
    );
    hf.state.add_repo(
        HF_CANCEL_REPO,
        vec![Served::asset(HF_CANCEL_FILE, HF_CANCEL_FILE)],
    );
    // Slow enough (64 KiB per 5 ms, ~8 s for 100 MB) for the page to show progress before it is done.
    *hf.state.faults.chunk_delay.lock().unwrap() = Some(std::time::Duration::from_millis(5));
    let s = Server::start(&[MODEL_FILE], &[("HF_ENDPOINT", &hf.url), ("THREADS", "2")]).await;
    let base = s.base.clone();
    let (_, token) = login(&base).await;
    let downloads = get(&base, &token, "/admin/api/downloads").await.status();
    assert_eq!(
        downloads, 200,
        "GET /admin/api/downloads: the hub's admin API, which the download form needs, must be in the binary"
    );
    let name = first_model(&base, &token).await;
    let shots = std::env::var_os("CYBER_INFERENCE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("cyber-inference-ui-{}", s.port)));
    println!("screenshots: {}", shots.display());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("ui.mjs")
            .current_dir(&browser_dir)
            .env("BASE_URL", &base)
            .env("PASSWORD", PASSWORD)
            .env("MODEL", &name)
            .env("SHOT_DIR", &shots)
            .env("HF_REPO", HF_REPO)
            .env("HF_FILE", HF_FILE)
            .env("HF_CANCEL_REPO", HF_CANCEL_REPO)
            .output()
            .expect("cannot run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser script failed ({}):\n{stdout}\n{stderr}\n--- serve log ---\n{}",
        out.status,
        s.log()
    );
    assert!(stdout.contains("all browser steps passed"));
    // Deleting the model removed the link in MODELS_DIR, never the shared asset it points to.
    assert!(assets::model(MODEL_FILE).is_file());
    assert!(
        s.models_dir().join(MODEL_FILE).symlink_metadata().is_err(),
        "the deleted model's link is still in MODELS_DIR"
    );
}
