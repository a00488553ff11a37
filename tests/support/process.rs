//! Processes the tests run: the `cyber-inference` binary, signals (through the `kill` utility: tests hold
//! no `unsafe`), bounded waits for an exit, and what `/proc` says of a process.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The `cyber-inference` binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_cyber-inference");

/// A command running [`BIN`].
pub fn bin() -> Command {
    Command::new(BIN)
}

/// Runs `cmd`, panics with its stderr unless it exits 0, and returns its stdout.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Sends signal `sig` (`"TERM"`, `"KILL"`, `"STOP"`…) to process `pid`; true when `kill` ran and
/// succeeded.
pub fn signal(pid: impl std::fmt::Display, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits up to `limit` for `child` to exit and returns its status; when it keeps running, kills it and
/// panics with `what()` (called only then, so it can read a log written meanwhile).
pub fn wait_exit(child: &mut Child, limit: Duration, what: impl FnOnce() -> String) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: {}", what());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live (non-zombie) children of `parent`, from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    cyber_inference::supervisor::process::sys::children_of(parent)
}

/// Whether `pid` is a live (non-zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    cyber_inference::supervisor::process::sys::pid_alive(pid)
}

/// The environment of a process as (name, value) pairs, from `/proc/<pid>/environ`.
pub fn proc_environ(pid: u32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The command line of a process, arguments joined by spaces, from `/proc/<pid>/cmdline`.
pub fn proc_cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}
