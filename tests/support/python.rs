//! The Python the tests drive the servers with (the official `openai`, `ollama` and `anthropic` clients,
//! `jsonschema`, and numpy with PyPI `gguf` for `scripts/synth-models`): the venv `.ci/run` makes.

use std::path::PathBuf;
use std::process::Command;

/// `$CYBER_INFERENCE_PYTHON`, else `~/.cache/cyber-inference-venv/bin/python`; panics with a clear message
/// when that file does not exist.
pub fn python() -> PathBuf {
    let p = match std::env::var_os("CYBER_INFERENCE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
            .join(".cache/cyber-inference-venv/bin/python"),
    };
    assert!(
        p.is_file(),
        "no Python at {}: set CYBER_INFERENCE_PYTHON to a venv with openai, jsonschema, ollama, anthropic, \
         numpy and gguf (.ci/run makes ~/.cache/cyber-inference-venv)",
        p.display()
    );
    p
}

/// Runs a Python snippet with `BASE_URL` (…/v1) in its environment; returns stdout, panics on failure.
pub fn run_python(base_url: &str, code: &str) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .env("BASE_URL", base_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `tests/py/NAME` with `args` (the official client tests); panics unless it exits 0 and prints
/// `ALL OK`, showing its output and `server_log()` (the log of the server it drove). Prints and returns
/// its stdout.
pub fn run_client_script(name: &str, args: &[&str], server_log: impl FnOnce() -> String) -> String {
    let t = std::time::Instant::now();
    let out = Command::new(python())
        .arg(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/py")
                .join(name),
        )
        .args(args)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout).into_owned();
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && so.contains("ALL OK"),
        "{name} failed after {:.0?}\nstdout:\n{so}\nstderr:\n{se}\nserver log:\n{}",
        t.elapsed(),
        server_log()
    );
    println!("{so}");
    so
}

/// Runs one SQL statement on the SQLite database at `db` (Python's `sqlite3`, committed); returns its
/// rows, one a line, columns separated by `|`. Panics when the statement fails.
pub fn sqlite(db: &std::path::Path, sql: &str) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             for r in c.execute(sys.argv[2]).fetchall():\n    print('|'.join(str(x) for x in r))\n\
             c.commit()\n",
        )
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sqlite {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
