//! Going to the background, and telling the foreground when we are ready.
//!
//! `pid=$(bind-input in1 9999)` must be race-free: the command may return
//! only once the binding works. The `daemonix` crate's parent learns
//! nothing of the daemon, so a pipe is passed through the double fork,
//! s6-style: the daemon writes `OK PID` once ready, or `ERR STATUS
//! MESSAGE` if it failed, and the foreground prints the PID or the error
//! and exits with the matching status. If the daemon dies without a word,
//! end-of-file on the pipe says so.
//!
//! The double fork is `daemonix`'s: the maintained fork of `daemonize`
//! 0.5 (unmaintained, RUSTSEC-2025-0069), with the same API and its
//! undefined behaviour fixed.
//!
//! In `--foreground` mode (how a pool or master runs its bindings) the same
//! readiness line, the PID, is printed on stdout and stdout is then closed,
//! so a parent reading it learns both readiness and PID.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, ExitStatus, Result};

/// The daemon's side of the readiness pipe.
pub(crate) struct Ready {
    pipe: Option<File>,
    foreground: bool,
}

impl Ready {
    /// Tells the foreground the binding is ready, and gives it our PID.
    pub(crate) fn notify(&mut self) {
        let pid = std::process::id();
        if self.foreground {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{pid}");
            let _ = out.flush();
            drop(out);
            redirect_to_null(libc::STDOUT_FILENO);
            self.foreground = false;
            crate::notify::ready(&format!("ready, PID {pid}"));
        } else if let Some(mut pipe) = self.pipe.take() {
            // One write(2), so one wake-up of the foreground: `writeln!`
            // on a File writes each piece apart.
            let _ = pipe.write_all(format!("OK {pid}\n").as_bytes());
        }
    }

    /// Reports a failure that came before readiness to the foreground.
    /// Returns false when nobody listens for it any more (log it instead).
    fn fail(&mut self, err: &Error) -> bool {
        match self.pipe.take() {
            Some(mut pipe) => {
                let message = err.message.replace('\n', " ");
                let line = format!("ERR {} {message}\n", err.status.code());
                let _ = pipe.write_all(line.as_bytes());
                true
            }
            None => false,
        }
    }
}

/// Closes every descriptor above stderr but `keep`. Called first thing,
/// before this process opens anything of its own.
pub(crate) fn close_inherited(keep: Option<i32>) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collect first: the directory listing holds a descriptor itself.
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && Some(fd) != keep && !crate::activation::holds(fd) {
            // SAFETY: nothing in this process owns these yet; an already
            // closed one (the listing's own) gives EBADF, which is fine.
            unsafe { libc::close(fd) };
        }
    }
}

fn redirect_to_null(fd: i32) {
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        // SAFETY: dup2 onto a standard descriptor number, which stays open.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

/// Runs `work` in the background (or in this process when `foreground`),
/// handing it a [`Ready`] to notify. Everything `work` needs that can fail
/// in an expected way (claims, sockets, FIFOs) should be set up before, so
/// the error reaches the user through the normal path with nothing to undo
/// in another process.
///
/// Returns in the foreground process only: `Ok` once the daemon is ready
/// (its PID printed), or the daemon's error. The daemon itself never
/// returns from here: it exits with `work`'s status.
pub(crate) fn detach<F>(foreground: bool, work: F) -> Result<()>
where
    F: FnOnce(&mut Ready) -> Result<()>,
{
    if foreground {
        let mut ready = Ready {
            pipe: None,
            foreground: true,
        };
        let result = work(&mut ready);
        crate::notify::stopping();
        return result;
    }
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("cannot create the readiness pipe", &e.into()))?;
    let outcome = daemonix::Daemonize::new()
        .working_directory("/")
        .umask(0o077)
        .execute();
    match outcome {
        daemonix::Outcome::Parent(Ok(_)) => {
            // What `work` owns now belongs to the daemon; dropping it here
            // would undo shared state (an flock is per open file, and its
            // Drop unlocks it for the daemon too).
            std::mem::forget(work);
            drop(write_end);
            wait_ready(read_end)
        }
        daemonix::Outcome::Parent(Err(e)) => Err(Error::new(
            ExitStatus::OsErr,
            format!("cannot go to the background: {e}"),
        )),
        daemonix::Outcome::Child(result) => {
            drop(read_end);
            let mut ready = Ready {
                pipe: Some(File::from(write_end)),
                foreground: false,
            };
            let status = match result {
                Err(e) => {
                    let err = Error::new(ExitStatus::OsErr, format!("cannot daemonize: {e}"));
                    ready.fail(&err);
                    // `exit` runs no destructors: what `work` owns (a
                    // binding's FIFO and claim) is undone here.
                    drop(work);
                    err.status
                }
                Ok(_) => match work(&mut ready) {
                    Ok(()) => ExitStatus::Success,
                    Err(err) => {
                        if !ready.fail(&err) {
                            log::error!("{err}");
                        }
                        err.status
                    }
                },
            };
            log::logger().flush();
            std::process::exit(status.code());
        }
    }
}

fn wait_ready(read_end: OwnedFd) -> Result<()> {
    let mut text = String::new();
    let _ = File::from(read_end).read_to_string(&mut text);
    let line = text.lines().next().unwrap_or("");
    if let Some(pid) = line.strip_prefix("OK ") {
        let mut out = io::stdout().lock();
        // A closed stdout is the caller's business; the binding runs.
        let _ = writeln!(out, "{pid}");
        let _ = out.flush();
        return Ok(());
    }
    if let Some(rest) = line.strip_prefix("ERR ") {
        let (code, message) = rest.split_once(' ').unwrap_or((rest, "failed"));
        let status = ExitStatus::from_code(code.parse().unwrap_or(70));
        return Err(Error::new(status, message.to_string()));
    }
    Err(Error::new(
        ExitStatus::Software,
        "the background process died before it was ready (see its log)",
    ))
}
