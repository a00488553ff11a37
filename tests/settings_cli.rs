//! Settings as a user meets them: invalid values stop the binary with an error naming the variable and
//! value, and README's settings table lists exactly the settings and defaults of the code.

mod support;

use cyber_inference::config::{SETTING_NAMES, Settings};
use support::assets::repo_path;
use support::process::bin;

fn run_with_env(vars: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = bin();
    cmd.args(["inspect", "/nonexistent.gguf"]);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_settings_name_the_variable_and_the_value() {
    for (var, value) in [
        ("CYBER_INFERENCE_PORT", "70000"),
        ("CYBER_INFERENCE_MAX_MEMORY_PERCENT", "150"),
        ("CYBER_INFERENCE_MAX_LOADED_MODELS", "many"),
        ("CYBER_INFERENCE_HOST", "not an address"),
    ] {
        let (ok, err) = run_with_env(&[(var, value)]);
        assert!(!ok, "{var}={value} was accepted");
        assert!(
            err.contains(var) && err.contains(value),
            "{var}={value}: {err}"
        );
    }
    // A valid setting lets the command run (and fail only on the missing file).
    let (_, err) = run_with_env(&[("CYBER_INFERENCE_PORT", "9000")]);
    assert!(err.contains("/nonexistent.gguf"), "{err}");
}

#[test]
fn readme_settings_table_matches_the_code() {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let start = readme
        .find("| name | default | meaning |")
        .expect("README has a settings table");
    let rows: Vec<Vec<String>> = readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect();
    let names: Vec<String> = rows.iter().map(|r| r[0].to_ascii_lowercase()).collect();
    assert_eq!(
        names,
        SETTING_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );
    let defaults = serde_json::to_value(Settings::default()).unwrap();
    for row in &rows {
        let key = row[0].to_ascii_lowercase();
        let want = match &defaults[&key] {
            serde_json::Value::Null if key == "threads" => "auto".to_string(),
            serde_json::Value::Null => "unset".to_string(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        assert_eq!(row[1], want, "README default of {}", row[0]);
    }
}
