//! The few operating-system calls the process manager needs that std does not offer: the parent-death
//! signal, signals to a process group, and liveness checks. Linux-first; other Unixes get process groups
//! only. Signals and prctl(2) go through `nix`'s safe wrappers; the one `unsafe` left in the supervisor is
//! std's `pre_exec` (unsafe by its API: the closure runs between fork and exec), kept here with its SAFETY
//! note.

use std::io;

pub use nix::sys::signal::Signal;

/// Puts the child in its own process group (so signals reach the worker and anything it starts, and a
/// terminal's Ctrl-C does not) and, on Linux, asks the kernel to SIGKILL it when the supervisor dies, even
/// by SIGKILL. Must be called on a thread that lives as long as the supervisor (a runtime worker thread,
/// never a `spawn_blocking` one): the parent-death signal fires when the spawning *thread* exits.
pub fn configure_worker_command(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes the async-signal-safe
        // system calls prctl(2) and getppid(2) (through nix's and std's thin wrappers, which allocate
        // nothing and take no lock); its error path builds an `io::Error` from an errno code, which does
        // not allocate either.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
                // The supervisor may have died between fork and prctl: then nobody would kill us.
                if std::os::unix::process::parent_id() != parent {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe));
                }
                Ok(())
            });
        }
    }
}

/// Sends `signal` (e.g. [`Signal::SIGTERM`]) to the process group led by `pid`. A group that no longer
/// exists is not an error.
///
/// Errors: the OS error of killpg(3) other than ESRCH (e.g. EPERM); a pid that is not a valid group leader
/// id (0, 1, or past `pid_t`) is refused.
pub fn signal_group(pid: u32, signal: Signal) -> io::Result<()> {
    let Ok(pgid) = i32::try_from(pid) else {
        return Err(io::Error::other(format!("pid {pid} out of range")));
    };
    if pgid <= 1 {
        return Err(io::Error::other(format!(
            "refusing to signal process group {pgid}"
        )));
    }
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Whether a process with this pid exists and is not a zombie (from /proc; false where /proc is absent).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The command line of a process, arguments joined by spaces (empty when unreadable).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Pids of the live children of `parent` (from /proc; empty where /proc is absent).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>())
                    .is_some_and(|f| f.len() > 1 && f[0] != "Z" && f[1] == parent.to_string())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_and_cmdline_of_self() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(!cmdline(me).is_empty());
        assert!(!pid_alive(u32::MAX - 1));
        assert!(
            signal_group(1, Signal::SIGTERM).is_err(),
            "never signal init's group"
        );
    }

    #[tokio::test]
    async fn group_signal_kills_the_child() {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        configure_worker_command(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap();
        assert!(children_of(std::process::id()).contains(&pid));
        signal_group(pid, Signal::SIGKILL).unwrap();
        let st = child.wait().await.unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        // Already gone: not an error.
        signal_group(pid, Signal::SIGTERM).unwrap();
    }
}
