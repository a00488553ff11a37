//! llama-server's slot files on the real worker (issue 18, "slots save/restore"): `POST
//! /slots/{id}?action=save|restore|erase` with `--slot-save-path` on SmolLM2 Q4_1. A slot saved by one
//! worker process is restored by a fresh process after the first was killed, and the next request on it
//! reuses the saved prefix and gives the same greedy text; files of another model file, of another KV
//! cache type, truncated or garbage are refused with a 400 that says what is wrong, and the worker goes
//! on serving with the slot as it was; the same with a `-ctk q8_0 -ctv q8_0` cache; an encoder answers 501.

mod support;

use std::path::Path;

use serde_json::{Value, json};
use support::assets::{MINILM, SMOL_Q4_1, SMOL_Q4_K_M, model};
use support::worker::Worker;

const PROMPT: &str = "The capital of France is Paris. The capital of Germany is Berlin. \
                      The capital of Italy is";

fn start(model_name: &str, dir: &Path, extra: &[&str]) -> Worker {
    let mut args = vec![
        "-c",
        "1024",
        "-np",
        "2",
        "--slot-save-path",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Worker::start(&model(model_name), &args)
}

/// A greedy `/completion` of 12 tokens on `slot` with the prompt cache on.
async fn complete(w: &Worker, slot: u64) -> Value {
    let (st, v) = w
        .post(
            "/completion",
            &json!({
                "prompt": PROMPT, "n_predict": 12, "temperature": 0,
                "id_slot": slot, "cache_prompt": true
            }),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["id_slot"], slot, "{v}");
    v
}

async fn action(w: &Worker, slot: u64, action: &str, filename: &str) -> (u16, Value) {
    w.post(
        &format!("/slots/{slot}?action={action}"),
        &json!({ "filename": filename }),
    )
    .await
}

/// A 400 `invalid_request_error` whose message contains each of `want`.
fn assert_refused(st: u16, v: &Value, want: &[&str]) {
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.starts_with("Unable to restore slot: "), "{m}");
    for w in want {
        assert!(m.contains(w), "want {w:?} in: {m}");
    }
}

fn cache_n(v: &Value) -> u64 {
    v["timings"]["cache_n"].as_u64().expect("timings.cache_n")
}

/// Saves slot 0 after a completion; returns (completion, save answer).
async fn complete_and_save(w: &Worker, filename: &str) -> (Value, Value) {
    let first = complete(w, 0).await;
    assert_eq!(cache_n(&first), 0, "a fresh slot: {first}");
    let (st, saved) = action(w, 0, "save", filename).await;
    assert_eq!(st, 200, "{saved}");
    assert_eq!(saved["id_slot"], 0);
    assert_eq!(saved["filename"], filename);
    assert_eq!(saved["n_saved"], first["tokens_cached"], "{saved} {first}");
    assert!(saved["timings"]["save_ms"].as_f64().is_some(), "{saved}");
    (first, saved)
}

/// The next request on `slot` after a restore of `saved`: the prompt comes from the cache (all of it
/// but the token evaluated again for the logits), `tokens_cached` covers the saved tokens, and the text
/// is `first`'s.
async fn check_reuse(w: &Worker, slot: u64, first: &Value, saved: &Value) {
    let again = complete(w, slot).await;
    let n_prompt = again["tokens_evaluated"].as_u64().unwrap();
    assert_eq!(cache_n(&again), n_prompt - 1, "{again}");
    assert!(
        again["tokens_cached"].as_u64() >= saved["n_saved"].as_u64(),
        "{again} {saved}"
    );
    assert_eq!(again["content"], first["content"], "same greedy text");
}

#[tokio::test(flavor = "multi_thread")]
async fn slots_survive_a_restart_and_hostile_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Save, then kill the worker (SIGKILL: nothing is flushed on the way out).
    let mut w1 = start(SMOL_Q4_1, d, &[]);
    let (first, saved) = complete_and_save(&w1, "smol.bin").await;
    let size = std::fs::metadata(d.join("smol.bin")).unwrap().len();
    assert_eq!(saved["n_written"].as_u64(), Some(size));
    w1.child.kill().unwrap();
    w1.child.wait().unwrap();
    drop(w1);

    // A fresh process restores it; the next request reuses it.
    let w = start(SMOL_Q4_1, d, &[]);
    let (st, restored) = action(&w, 0, "restore", "smol.bin").await;
    assert_eq!(st, 200, "{restored}");
    assert_eq!(restored["id_slot"], 0);
    assert_eq!(restored["filename"], "smol.bin");
    assert_eq!(restored["n_restored"], saved["n_saved"]);
    assert_eq!(restored["n_read"].as_u64(), Some(size));
    let restore_ms = restored["timings"]["restore_ms"].as_f64().unwrap();
    eprintln!(
        "f16 cache: {} tokens, {size} bytes, save {:.2} ms, restore {restore_ms:.2} ms",
        saved["n_saved"], saved["timings"]["save_ms"]
    );
    check_reuse(&w, 0, &first, &saved).await;

    // Hostile files: each refused with what is wrong; slot 0 keeps its cache.
    let bytes = std::fs::read(d.join("smol.bin")).unwrap();
    std::fs::write(
        d.join("garbage.bin"),
        b"\x00\x01garbage, not a slot file at all",
    )
    .unwrap();
    std::fs::write(d.join("half.bin"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(d.join("short.bin"), &bytes[..bytes.len() - 1]).unwrap();
    let mut hostile = bytes.clone();
    // The token count (after the header of a 30-layer cache) made huge.
    let at = 8 + 4 + 32 + 8 + 2 + "llama".len() + 4 + 4 + 16 + 12 * 30;
    hostile[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(d.join("hostile.bin"), &hostile).unwrap();
    std::fs::create_dir(d.join("dir.bin")).unwrap();
    for (name, want) in [
        ("garbage.bin", &["garbage.bin", "not a slot save file"][..]),
        ("half.bin", &["truncated"]),
        ("short.bin", &["truncated", "values"]),
        ("hostile.bin", &["4294967295 tokens", "context of 512"]),
        ("dir.bin", &["not a regular file"]),
        ("missing.bin", &["cannot open"]),
    ] {
        let (st, v) = action(&w, 0, "restore", name).await;
        assert_refused(st, &v, want);
    }
    check_reuse(&w, 0, &first, &saved).await;

    // A -ctk/-ctv q8_0 cache: save, erase, restore into slot 1, reuse there.
    let wq = start(SMOL_Q4_1, d, &["-ctk", "q8_0", "-ctv", "q8_0"]);
    let (first_q, saved_q) = complete_and_save(&wq, "q8.bin").await;
    let size_q = std::fs::metadata(d.join("q8.bin")).unwrap().len();
    assert!(size_q < size, "q8_0 cells are smaller: {size_q} vs {size}");
    let (st, v) = wq.post("/slots/0?action=erase", &json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({"id_slot": 0, "n_erased": saved_q["n_saved"]}));
    let (st, r) = action(&wq, 1, "restore", "q8.bin").await;
    assert_eq!(st, 200, "{r}");
    eprintln!(
        "q8_0 cache: {} tokens, {size_q} bytes, save {:.2} ms, restore {:.2} ms",
        saved_q["n_saved"], saved_q["timings"]["save_ms"], r["timings"]["restore_ms"]
    );
    check_reuse(&wq, 1, &first_q, &saved_q).await;
    // Each cache type refuses the other's file, naming the types.
    let (st, v) = action(&wq, 1, "restore", "smol.bin").await;
    assert_refused(st, &v, &["key type is f16", "q8_0 (-ctk)"]);
    let (st, v) = action(&w, 0, "restore", "q8.bin").await;
    assert_refused(st, &v, &["key type is q8_0", "f16 (-ctk)"]);
    check_reuse(&wq, 1, &first_q, &saved_q).await;
    drop(wq);

    // Another model file of the same architecture and layout: the fingerprint tells them apart.
    let wk = start(SMOL_Q4_K_M, d, &[]);
    let (st, v) = action(&wk, 0, "restore", "smol.bin").await;
    assert_refused(st, &v, &["model (GGUF size and header fingerprint)"]);
    assert_eq!(cache_n(&complete(&wk, 0).await), 0, "wk's slot untouched");
    drop(wk);

    // Erase; the next request evaluates the whole prompt again, with the same text.
    let (st, v) = w.post("/slots/0?action=erase", &json!({})).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["n_erased"].as_u64().unwrap() >= saved["n_saved"].as_u64().unwrap(),
        "{v}"
    );
    let cold = complete(&w, 0).await;
    assert_eq!(cache_n(&cold), 0, "{cold}");
    assert_eq!(cold["content"], first["content"]);
    drop(w);

    // An encoder has no KV cache: 501.
    let wm = Worker::start(
        &model(MINILM),
        &["--embedding", "--slot-save-path", d.to_str().unwrap()],
    );
    for a in ["save", "restore"] {
        let (st, v) = action(&wm, 0, a, "smol.bin").await;
        assert_eq!(st, 501, "{a}: {v}");
        assert_eq!(v["error"]["type"], "not_supported_error", "{v}");
    }
}

#[test]
fn slot_save_path_must_be_a_directory() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let out = support::process::bin()
        .args(["worker", "-m"])
        .arg(model(SMOL_Q4_1))
        .args(["--port", "0", "--slot-save-path"])
        .arg(f.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--slot-save-path: not a directory"), "{err}");
}

/// Gemma 3's sliding-window layers (a ring of 512 cells): a slot holding more positions than the
/// window is saved from a `-c 2048` worker, restored by a fresh `-c 1024` one, and the continuation from
/// the restored cells has the log-probabilities of a cold run, bit for bit (the engine is batch-invariant,
/// so any wrong cell would show).
#[tokio::test(flavor = "multi_thread")]
async fn a_sliding_window_slot_restores_into_another_context_size() {
    use support::assets::GEMMA3;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let prompt: String = (0..45)
        .map(|i| format!("Line {i}: the value of x{i} is {}. ", (i * 7) % 13))
        .collect();
    let req = |n: u32| {
        json!({"prompt": prompt, "n_predict": n, "temperature": 0, "n_probs": 2,
                              "id_slot": 0, "cache_prompt": true})
    };
    let mut a = Worker::start(&model(GEMMA3), &["-c", "2048", "--slot-save-path", d]);
    // One token: the slot then caches exactly the prompt.
    let (st, v) = a.post("/completion", &req(1)).await;
    assert_eq!(st, 200, "{v}");
    let n_prompt = v["tokens_evaluated"].as_u64().unwrap();
    assert!(
        n_prompt > 512 && n_prompt < 1000,
        "{n_prompt} prompt tokens"
    );
    let (st, saved) = action(&a, 0, "save", "g.bin").await;
    assert_eq!(st, 200, "{saved}");
    assert_eq!(saved["n_saved"].as_u64(), Some(n_prompt));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    drop(a);

    let b = Worker::start(&model(GEMMA3), &["-c", "1024", "--slot-save-path", d]);
    let (st, r) = action(&b, 0, "restore", "g.bin").await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["n_restored"].as_u64(), Some(n_prompt));
    let (_, warm) = b.post("/completion", &req(8)).await;
    assert_eq!(cache_n(&warm), n_prompt - 1, "{warm}");
    let (st, _) = b.post("/slots/0?action=erase", &json!({})).await;
    assert_eq!(st, 200);
    let (_, cold) = b.post("/completion", &req(8)).await;
    assert_eq!(cache_n(&cold), 0, "{cold}");
    assert_eq!(warm["content"], cold["content"]);
    assert_eq!(
        warm["completion_probabilities"], cold["completion_probabilities"],
        "restored ring cells continue exactly as a cold run"
    );
}
