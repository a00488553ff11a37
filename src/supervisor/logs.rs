//! Log capture: a bounded in-memory ring of lines per model (and one for the supervisor itself) plus a
//! size-rotated file under DATA_DIR/logs, so the admin UI can tail and follow any worker's output.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

/// Lines kept in memory per model.
pub(crate) const RING_LINES: usize = 1000;
/// A log file is rotated to `NAME.log.1` when it passes this size (bytes).
pub(crate) const ROTATE_BYTES: u64 = 10 * 1024 * 1024;

/// One captured line.
#[derive(Clone, Debug, Serialize)]
pub struct LogLine {
    /// Unix milliseconds when it was captured.
    pub at: i64,
    /// `stdout`, `stderr` or `supervisor`.
    pub stream: &'static str,
    pub line: String,
}

/// A ring of the last [`RING_LINES`] lines with a broadcast for followers.
pub struct LogBuffer {
    lines: Mutex<VecDeque<LogLine>>,
    tx: broadcast::Sender<LogLine>,
}

impl Default for LogBuffer {
    fn default() -> Self {
        LogBuffer {
            lines: Mutex::new(VecDeque::with_capacity(64)),
            tx: broadcast::channel(256).0,
        }
    }
}

impl LogBuffer {
    /// Appends a line (dropping the oldest past [`RING_LINES`]) and sends it to followers.
    pub fn push(&self, stream: &'static str, line: String) -> LogLine {
        let l = LogLine {
            at: super::db::now_ms(),
            stream,
            line,
        };
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == RING_LINES {
            lines.pop_front();
        }
        lines.push_back(l.clone());
        drop(lines);
        let _ = self.tx.send(l.clone());
        l
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The last `n` lines of stderr joined by newlines (the reason a worker died).
    pub fn last_stderr(&self, n: usize) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let v: Vec<&str> = lines
            .iter()
            .rev()
            .filter(|l| l.stream == "stderr")
            .take(n)
            .map(|l| l.line.as_str())
            .collect();
        v.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// New lines from now on.
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.tx.subscribe()
    }
}

/// An append-only log file rotated at [`ROTATE_BYTES`] (one previous generation kept).
pub(crate) struct RotatingFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl RotatingFile {
    /// Opens (creating) `path` for appending; on error the lines are only kept in memory.
    pub fn open(path: &Path) -> RotatingFile {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        RotatingFile {
            path: path.to_path_buf(),
            file,
            size,
        }
    }

    /// Writes one line (a newline is added), rotating first when the file is full.
    pub fn write_line(&mut self, line: &str) {
        if self.size + line.len() as u64 + 1 > ROTATE_BYTES {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.path, &old);
            *self = RotatingFile::open(&self.path.clone());
        }
        if let Some(f) = &mut self.file
            && writeln!(f, "{line}").is_ok()
        {
            self.size += line.len() as u64 + 1;
        }
    }
}

/// Removes ANSI escape sequences (colours of tracing output) from a line.
pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The supervisor's own log lines (filled by [`SupervisorLogWriter`]).
pub(crate) static SUPERVISOR_LOG: LazyLock<LogBuffer> = LazyLock::new(LogBuffer::default);

/// A tracing writer that copies every formatted line to stderr and to [`SUPERVISOR_LOG`]; `serve`'s
/// tracing subscriber uses it (see `main.rs`).
#[derive(Clone, Copy, Default)]
pub struct SupervisorLogWriter;

impl Write for SupervisorLogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        for line in String::from_utf8_lossy(buf).lines() {
            if !line.trim().is_empty() {
                SUPERVISOR_LOG.push("supervisor", strip_ansi(line));
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SupervisorLogWriter {
    type Writer = SupervisorLogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        SupervisorLogWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines_and_stderr_tail() {
        let b = LogBuffer::default();
        let mut rx = b.follow();
        b.push("stdout", "first".into());
        assert_eq!(rx.try_recv().unwrap().line, "first");
        for i in 0..RING_LINES + 5 {
            b.push(
                if i % 2 == 0 { "stderr" } else { "stdout" },
                format!("l{i}"),
            );
        }
        let t = b.tail(3);
        assert_eq!(t.len(), 3);
        assert_eq!(t[2].line, format!("l{}", RING_LINES + 4));
        assert_eq!(b.tail(usize::MAX).len(), RING_LINES);
        assert_eq!(
            b.last_stderr(2),
            format!("l{}\nl{}", RING_LINES + 2, RING_LINES + 4)
        );
    }

    #[test]
    fn file_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("logs/m.log");
        let mut f = RotatingFile::open(&p);
        f.size = ROTATE_BYTES - 3;
        f.write_line("hello");
        assert!(dir.path().join("logs/m.log.1").exists());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello\n");
        assert_eq!(strip_ansi("\u{1b}[32mINFO\u{1b}[0m x"), "INFO x");
    }
}
