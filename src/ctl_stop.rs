//! `fifobind stop NAME…`: stop bindings, pools and masters by name.
//!
//! The process is found through its claim (`.NAME.lock`, PID and start
//! time), so a reused PID is never signalled. Without `--drain` each gets
//! SIGTERM, which closes it properly (a bind-output first sends what its
//! FIFO holds, for up to a second). With `--drain` nothing is lost: a
//! bind-output gets SIGUSR1 (send everything, however long the remote
//! takes, then close); a bind-input is stopped only once its FIFO has been
//! read empty. Then it waits until all are gone, at most `--timeout`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::{Error, ExitStatus, Result};
use crate::process::ProcessId;
use crate::runtime_dir::{self, RuntimeDir};

fn seconds(s: &str) -> std::result::Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n <= 86400.0 => Ok(Duration::from_secs_f64(n)),
        _ => Err("a duration is a number of seconds, more than 0 and at most 86400".into()),
    }
}

#[derive(clap::Args, Debug)]
pub(crate) struct StopArgs {
    /// The bindings (their IDs), pools and masters (pool@PID, master@PID)
    /// to stop, as `fifobind list` names them
    #[arg(value_name = "NAME", required = true)]
    pub(crate) names: Vec<String>,

    /// Lose nothing: a bind-output sends all its FIFO holds first, a
    /// bind-input waits until its FIFO has been read empty
    #[arg(short, long)]
    pub(crate) drain: bool,

    /// Give up waiting after SECS seconds (status 75); they keep running
    #[arg(short, long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub(crate) timeout: Duration,
}

struct Target {
    name: String,
    process: ProcessId,
    kind: String,
    fifo: Option<PathBuf>,
    /// Signalled already (a draining bind-input waits for its reader).
    signalled: bool,
}

pub(crate) fn run(args: StopArgs) -> Result<()> {
    let deadline = Instant::now() + args.timeout;
    let mut unknown = Vec::new();
    let mut targets = Vec::new();
    let exists = runtime_dir::locate().exists();
    let dir = if exists {
        Some(RuntimeDir::open()?)
    } else {
        None
    };
    for name in &args.names {
        if name.starts_with('.') || name.contains('/') {
            return Err(Error::usage(format!("invalid NAME {name:?}")));
        }
        let found = dir.as_ref().and_then(|d| {
            let process = crate::claim::owner(&d.dotfile(name, "lock"))?;
            process.is_alive().then_some(process)
        });
        let Some(process) = found else {
            unknown.push(name.clone());
            continue;
        };
        let status = dir.as_ref().and_then(|d| {
            let text = std::fs::read_to_string(d.dotfile(name, "status")).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        });
        let get = |k: &str| {
            status
                .as_ref()
                .and_then(|s| s.get(k))
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        targets.push(Target {
            name: name.clone(),
            process,
            kind: get("kind").unwrap_or_default(),
            fifo: get("fifo").map(PathBuf::from),
            signalled: false,
        });
    }
    loop {
        for t in targets.iter_mut().filter(|t| !t.signalled) {
            let sig = match (args.drain, t.kind.as_str()) {
                (true, "bind-output") => Some(crate::signals::DRAIN),
                (true, "bind-input") => {
                    let empty = t.fifo.as_ref().is_none_or(|f| unread(f) == Some(0));
                    empty.then_some(Signal::SIGTERM)
                }
                _ => Some(Signal::SIGTERM),
            };
            if let Some(sig) = sig {
                t.process.signal(sig);
                t.signalled = true;
            }
        }
        if targets.iter().all(|t| !t.process.is_alive()) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<String> = targets
        .iter()
        .filter(|t| t.process.is_alive())
        .map(|t| format!("{} (PID {})", t.name, t.process.pid))
        .collect();
    let mut problems = Vec::new();
    if !unknown.is_empty() {
        problems.push(format!("not running: {}", unknown.join(", ")));
    }
    if !left.is_empty() {
        problems.push(format!(
            "still running after {} s: {}",
            args.timeout.as_secs_f64(),
            left.join(", ")
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    // Something did not stop: a timeout (75) says trying again may help.
    let status = if left.is_empty() {
        ExitStatus::Unavailable
    } else {
        ExitStatus::TempFail
    };
    Err(Error::new(status, problems.join("; ")))
}

/// How many bytes wait in FIFO `path` unread, asked without taking any.
fn unread(path: &std::path::Path) -> Option<usize> {
    // Opening for reading does not block: the binding holds it open for
    // writing too. Non-blocking all the same, and no read is ever made.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n as usize)
}
