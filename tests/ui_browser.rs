//! The admin UI in a real headless Chromium (Debian's `/usr/bin/chromium`, driven by `playwright-core`
//! from `tests/browser`): a real `serve` with SmolLM2-135M in its MODELS_DIR; the script logs in, watches
//! the charts, loads the model, chats, changes a setting, reads the worker's log, unloads and logs out,
//! saving screenshots under a folder it prints.
//!
//! Needs `npm install` in `tests/browser` (`.ci/run` does it) and the worker (`cyber-inference worker`)
//! for the load and chat steps.

mod ui_support;

use std::path::PathBuf;
use std::process::Command;

use ui_support::{MODEL_FILE, PASSWORD, Serve, client, login};

#[ignore = "issue 7 open: browser test not yet passing against the integrated binary"]
#[tokio::test]
async fn admin_ui_in_headless_chromium() {
    let browser_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"));
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "run `npm install` in {} first (.ci/run does)",
        browser_dir.display()
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").is_file(),
        "Debian's chromium is required at /usr/bin/chromium"
    );
    let s = Serve::start(&[MODEL_FILE]);
    let base = s.base();
    let (_, token) = login(&base).await;
    let models: serde_json::Value = client()
        .get(format!("{base}/admin/api/models"))
        .header("cookie", format!("ci_session={token}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let name = models["models"][0]["model"]["name"]
        .as_str()
        .expect("the model is in the catalogue")
        .to_owned();
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
}
