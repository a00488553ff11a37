//! llama-server's slot files: `POST /slots/{id_slot}?action=save|restore|erase` with `--slot-save-path
//! DIR` (tools/server/server-context.cpp `post_slots`, `handle_slots_save`, `handle_slots_restore`,
//! `handle_slots_erase`; tools/server/README.md; commit 0c1e570).
//!
//! The engine thread turns a slot into bytes and back ([`SlotAction`], the format of
//! `crate::engine::model::seq_state`); the files are written and read here on a blocking thread, so
//! neither the async runtime nor the batch of other slots waits on the disk. A save writes a temporary
//! file in DIR and renames it over `DIR/{filename}`, so a reader never sees half a file; a restore reads
//! at most [`super::http::Ready::slot_file_max_bytes`]. Filenames are checked as llama.cpp's
//! `fs_validate_filename` (common/common.cpp) does, and must not start with a dot either.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::backend::BackendError;
use super::error::{ApiError, parse_json};
use super::http::{AppState, Ready};
use super::scheduler::{Command, SlotAction, SlotActionDone, SlotActionRequest};

/// Longest filename accepted (bytes), llama.cpp's limit (the common Linux `NAME_MAX`).
pub const MAX_FILENAME_BYTES: usize = 255;

/// Checks a slot file's name as llama.cpp's `fs_validate_filename(filename, allow_subdirs = false)`:
/// not empty, at most [`MAX_FILENAME_BYTES`] bytes, no control characters (C0, DEL, C1), none of
/// `/ \ : * ? " < > |` nor their look-alikes (U+FF0E, U+2215, U+2216), no U+FFFD or BOM, no leading or
/// trailing space, no trailing dot, no `..`; and, stricter than llama.cpp, no leading dot (no hidden
/// files, and the temporary files of a save cannot be named).
///
/// Errors: what is wrong with it, for a 400.
pub fn validate_filename(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the filename is empty".into());
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err(format!(
            "the filename is {} bytes, longer than {MAX_FILENAME_BYTES}",
            name.len()
        ));
    }
    for c in name.chars() {
        let u = c as u32;
        let forbidden = u <= 0x1F
            || u == 0x7F
            || (0x80..=0x9F).contains(&u)
            || matches!(
                c,
                '\u{FF0E}'
                    | '\u{2215}'
                    | '\u{2216}'
                    | '\u{FFFD}'
                    | '\u{FEFF}'
                    | ':'
                    | '*'
                    | '?'
                    | '"'
                    | '<'
                    | '>'
                    | '|'
                    | '/'
                    | '\\'
            );
        if forbidden {
            return Err(format!(
                "the filename contains {c:?} (U+{u:04X}), which a slot file's name may not (no path \
                 separators, control characters or any of : * ? \" < > |)"
            ));
        }
    }
    if name.starts_with(' ') || name.ends_with(' ') {
        return Err("the filename starts or ends with a space".into());
    }
    if name.ends_with('.') {
        return Err("the filename ends with a dot".into());
    }
    if name.contains("..") {
        return Err("the filename contains \"..\"".into());
    }
    if name.starts_with('.') {
        return Err("the filename starts with a dot".into());
    }
    Ok(())
}

/// `POST /slots/{id_slot}?action=save|restore|erase`: llama-server's answers and errors — 501 without
/// `--slot-save-path`; 400 `Invalid slot ID`, `Invalid action`, `Invalid filename: …`; a restore of a
/// file that is missing, too large, or refused by the engine (another model or cache type, truncated,
/// malformed) is a 400 `Unable to restore slot: …` naming the problem, the slot left as it was. An
/// action on a slot that is processing a request waits for it to finish. Bodies:
/// save `{"id_slot","filename","n_saved","n_written","timings":{"save_ms"}}`, restore
/// `{"id_slot","filename","n_restored","n_read","timings":{"restore_ms"}}`, erase `{"id_slot","n_erased"}`.
pub(super) async fn slot_action(
    State(st): State<Arc<AppState>>,
    UrlPath(id_slot): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(dir) = st.info.slot_save_path.clone() else {
        return Err(ApiError::NotSupported(
            "This server does not support slots action. Start it with `--slot-save-path`".into(),
        ));
    };
    let n_slots = st.info.n_slots;
    let id = id_slot
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&i| i < n_slots)
        .ok_or_else(|| {
            ApiError::bad(
                format!(
                    "Invalid slot ID: '{id_slot}' (this server has slots 0..{})",
                    n_slots.saturating_sub(1)
                ),
                Some("id_slot"),
            )
        })?;
    let action = q.get("action").map_or("", String::as_str);
    if !matches!(action, "save" | "restore" | "erase") {
        return Err(ApiError::bad(
            format!("Invalid action: '{action}' (save, restore or erase)"),
            Some("action"),
        ));
    }
    let ready = st.ready()?;
    if action == "erase" {
        let n = match run(ready, id, SlotAction::Erase).await?.0 {
            SlotActionDone::Erased(n) => n,
            other => return Err(unexpected(&other)),
        };
        return Ok(Json(json!({"id_slot": id, "n_erased": n})).into_response());
    }
    let filename = filename_of(&body)?;
    // save_ms / restore_ms: the engine's time plus the file's, not the wait for a busy slot.
    if action == "save" {
        let (bytes, n_tokens, engine) = match run(ready, id, SlotAction::Save).await? {
            (SlotActionDone::Saved { bytes, n_tokens }, t) => (bytes, n_tokens, t),
            (other, _) => return Err(unexpected(&other)),
        };
        let t0 = Instant::now();
        let n_written = bytes.len();
        let name = filename.clone();
        tokio::task::spawn_blocking(move || write_atomically(&dir, &name, &bytes))
            .await
            .map_err(|e| ApiError::Internal(format!("the slot file writer failed: {e}")))?
            .map_err(|e| ApiError::Internal(format!("Unable to save slot {id}: {e}")))?;
        return Ok(Json(json!({
            "id_slot": id,
            "filename": filename,
            "n_saved": n_tokens,
            "n_written": n_written,
            "timings": {"save_ms": (engine + t0.elapsed()).as_secs_f64() * 1e3},
        }))
        .into_response());
    }
    let max = ready.slot_file_max_bytes;
    if max == 0 {
        return Err(ApiError::NotSupported(
            "this model has no KV cache: its slots cannot be restored".into(),
        ));
    }
    let path = dir.join(&filename);
    let t0 = Instant::now();
    let bytes = tokio::task::spawn_blocking(move || read_bounded(&path, max))
        .await
        .map_err(|e| ApiError::Internal(format!("the slot file reader failed: {e}")))?
        .map_err(|m| restore_error(&filename, &m))?;
    let n_read = bytes.len();
    let t_read = t0.elapsed();
    let (n, engine) = match run(ready, id, SlotAction::Restore(bytes)).await {
        Ok((SlotActionDone::Restored(n), t)) => (n, t),
        Ok((other, _)) => return Err(unexpected(&other)),
        Err(ApiError::BadRequest { message, .. }) => {
            return Err(restore_error(&filename, &message));
        }
        Err(e) => return Err(e),
    };
    Ok(Json(json!({
        "id_slot": id,
        "filename": filename,
        "n_restored": n,
        "n_read": n_read,
        "timings": {"restore_ms": (t_read + engine).as_secs_f64() * 1e3},
    }))
    .into_response())
}

/// llama-server's 400 for a restore that failed (`Unable to restore slot: …`), naming the file.
fn restore_error(filename: &str, why: &str) -> ApiError {
    ApiError::bad(
        format!("Unable to restore slot: {filename}: {why}"),
        Some("filename"),
    )
}

fn unexpected(d: &SlotActionDone) -> ApiError {
    ApiError::Internal(format!("the scheduler answered a slot action with {d:?}"))
}

/// The body's `filename`, validated.
fn filename_of(body: &[u8]) -> Result<String, ApiError> {
    let v: Value = parse_json(body)?;
    let name = match v.get("filename") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ApiError::bad(
                format!("'filename' must be a string, got {other}"),
                Some("filename"),
            ));
        }
        None => return Err(ApiError::bad("'filename' is required", Some("filename"))),
    };
    validate_filename(&name)
        .map_err(|why| ApiError::bad(format!("Invalid filename: {why}"), Some("filename")))?;
    Ok(name)
}

/// Sends `action` for slot `id` to the scheduler and waits for it (the wait ends when the client goes
/// away: the dropped receiver discards the action).
///
/// Errors: a refused file as a 400 with the engine's reason, a model that cannot as 501, the
/// scheduler gone as 503, anything else 500.
/// Returns the outcome and the engine thread's time on it.
async fn run(
    ready: &Ready,
    id: usize,
    action: SlotAction,
) -> Result<(SlotActionDone, Duration), ApiError> {
    let (reply, rx) = oneshot::channel();
    ready
        .tx
        .send(Command::SlotAction(SlotActionRequest {
            id_slot: id,
            action,
            reply,
        }))
        .map_err(|_| ApiError::ShuttingDown)?;
    match rx.await.map_err(|_| ApiError::ShuttingDown)? {
        Ok(d) => Ok(d),
        Err(BackendError::SlotFile(m)) => Err(ApiError::bad(m, Some("filename"))),
        Err(BackendError::Unsupported(m)) => Err(ApiError::NotSupported(m)),
        Err(e) => Err(ApiError::Internal(e.to_string())),
    }
}

/// Writes `bytes` to `dir/name` through a temporary file in `dir` (flushed to disk, then renamed), so
/// the name never holds a partial file; the temporary is removed on failure.
///
/// Errors: the OS's, naming the file.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".slot-save.{}.{}.partial",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let dst = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", dst.display())
    })
}

/// Reads a regular file of at most `max` bytes.
///
/// Errors: missing or unreadable, not a regular file, or larger than `max` (what to tell the client).
fn read_bounded(path: &PathBuf, max: usize) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    let too_big = |n: u64| {
        format!(
            "it is {n} bytes, more than the {max} a slot file of this model and context can be \
             (not a slot file of this model)"
        )
    };
    if meta.len() > max as u64 {
        return Err(too_big(meta.len()));
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if out.len() > max {
        return Err(too_big(out.len() as u64));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_are_checked_as_llama_cpp_does() {
        for ok in [
            "slot.bin",
            "a",
            "slot 1.bin",
            "ünïcødé-名前.bin",
            "x.y.z",
            &"a".repeat(255),
        ] {
            assert_eq!(validate_filename(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            (&"a".repeat(256) as &str, "256 bytes"),
            ("../etc/passwd", "'/'"),
            ("a/b", "'/'"),
            ("a\\b", "'\\\\'"),
            ("..", "dot"),
            ("a..b", "\"..\""),
            (".", "ends with a dot"),
            ("slot.", "ends with a dot"),
            (".hidden", "starts with a dot"),
            (" slot", "space"),
            ("slot ", "space"),
            ("a:b", "':'"),
            ("a*b", "'*'"),
            ("a?b", "'?'"),
            ("a\"b", "'\"'"),
            ("a<b", "'<'"),
            ("a>b", "'>'"),
            ("a|b", "'|'"),
            ("a\nb", "U+000A"),
            ("a\u{7f}b", "U+007F"),
            ("a\u{85}b", "U+0085"),
            ("a\u{2215}b", "U+2215"),
            ("a\u{2216}b", "U+2216"),
            ("a\u{ff0e}b", "U+FF0E"),
            ("a\u{fffd}b", "U+FFFD"),
            ("\u{feff}a", "U+FEFF"),
        ] {
            let e = validate_filename(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn files_are_written_whole_and_read_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "s.bin", b"0123456789").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("s.bin")).unwrap(),
            b"0123456789"
        );
        // Overwrites; no temporary left behind.
        write_atomically(dir.path(), "s.bin", b"abc").unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.bin")]);
        let p = dir.path().join("s.bin");
        assert_eq!(read_bounded(&p, 3).unwrap(), b"abc");
        let e = read_bounded(&p, 2).unwrap_err();
        assert!(e.contains("3 bytes, more than the 2"), "{e}");
        let e = read_bounded(&dir.path().join("missing"), 10).unwrap_err();
        assert!(e.contains("cannot open"), "{e}");
        let e = read_bounded(&dir.path().to_path_buf(), 10).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        // A directory that does not exist: the error names the file.
        let e = write_atomically(&dir.path().join("nope"), "s.bin", b"x").unwrap_err();
        assert!(e.contains("nope/s.bin"), "{e}");
    }
}
