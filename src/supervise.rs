//! What a pool and a master need to keep their children on a leash.
//!
//! - Bindings are started in `--foreground` mode as our children, so we
//!   read their readiness line (the PID) and reap them ourselves.
//! - A watchdog pipe ties them to us: we hold the only write end
//!   (close-on-exec, so no other child inherits it), each binding polls
//!   the read end, and end-of-file there means we died, even by SIGKILL.
//!   (A parent-death signal cannot do this: it fires on the death of the
//!   forking *thread*.)
//! - A guardian process, forked before anything else, waits for our death
//!   the same way and then stops whatever our registry still names,
//!   daemons' process groups included, and removes our bookkeeping. After
//!   a clean exit it finds no registry and does nothing.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::unistd::{ForkResult, fork, pipe2};

use crate::claim::Claim;
use crate::error::{Error, ExitStatus, Result};
use crate::process::ProcessId;
use crate::registry;
use crate::runtime_dir::{ENV_DIR, RuntimeDir};

/// Claims `ROLE@PID` in `dir` for this process (a pool or a master) and
/// returns that name, under which its registry and other bookkeeping go.
/// The `@` keeps it apart from every binding's ID.
pub fn claim_owner(dir: &RuntimeDir, role: &str) -> Result<(String, Claim)> {
    let name = format!("{role}@{}", std::process::id());
    let path = dir.dotfile(&name, "lock");
    let mut claim = Claim::take(&path).map_err(|_| {
        Error::new(
            ExitStatus::CantCreate,
            format!("cannot claim {}", path.display()),
        )
    })?;
    if let Err(e) = claim.record(ProcessId::current()) {
        claim.release();
        return Err(Error::io(format!("cannot write {}", path.display()), &e));
    }
    Ok((name, claim))
}

/// The read end is handed to every binding; the write end never leaves
/// this process.
pub struct Watchdog {
    read: OwnedFd,
    _write: OwnedFd,
}

impl Watchdog {
    pub fn new() -> Result<Watchdog> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
        Ok(Watchdog {
            read,
            _write: write,
        })
    }
}

/// Where the other fifobind commands are: beside this executable, as
/// installed and as built; else on PATH.
pub fn sibling(program: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(program)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Starts `program` (bind-input or bind-output) in the foreground with
/// runtime directory `dir`, and returns once it is ready.
pub fn start_binding(
    program: &str,
    args: &[String],
    dir: &Path,
    watchdog: &Watchdog,
) -> Result<ProcessId> {
    let fd = watchdog.read.as_raw_fd();
    let mut cmd = Command::new(sibling(program));
    cmd.arg("--foreground")
        .arg("--watchdog-fd")
        .arg(fd.to_string())
        .args(args)
        .env(ENV_DIR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: fcntl and sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::signals::unblock_in_child()
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("cannot start {program}"), &e))?;
    let mut line = String::new();
    let _ = child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut line);
    if let Ok(pid) = line.trim().parse::<i32>()
        && pid == child.id() as i32
        && let Some(id) = ProcessId::of(pid)
    {
        // Running: the caller registers and reaps it.
        return Ok(id);
    }
    let status = child
        .wait()
        .map_err(|e| Error::io(format!("cannot wait for {program}"), &e))?;
    let status = status
        .code()
        .map(ExitStatus::from_code)
        .unwrap_or(ExitStatus::Software);
    Err(Error::new(
        status,
        format!("{program} {} failed", args.join(" ")),
    ))
}

/// Forks the guardian. Call it while this process has one thread and
/// before it opens anything the guardian must not keep open (a listening
/// socket). `cleanup` are paths the guardian removes after stopping the
/// registry's processes, if it finds the registry still there.
pub fn guardian(registry_path: &Path, cleanup: Vec<PathBuf>) -> Result<OwnedFd> {
    let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the caller guarantees this process is single-threaded, so
    // the child may run ordinary code.
    match unsafe { fork() }
        .map_err(|e| Error::new(ExitStatus::OsErr, format!("cannot fork: {}", e.desc())))?
    {
        ForkResult::Parent { .. } => Ok(write),
        ForkResult::Child => {
            drop(write);
            // What a service manager passed is the owner's, not ours: a
            // ready pipe we held would never see end-of-file.
            crate::notify::forget();
            crate::activation::forget();
            // Keep no terminal or pipe of the user's open: a `pool | while
            // read` loop must see end-of-file when the pool exits.
            if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                for fd in 0..=2 {
                    // SAFETY: dup2 onto standard descriptors.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let mut pipe = File::from(read);
            let mut byte = [0u8; 1];
            // Returns at end-of-file: the owner is gone.
            while matches!(pipe.read(&mut byte), Ok(n) if n > 0) {}
            if registry_path.exists() {
                registry::stop_all(&registry::load(registry_path), Duration::from_secs(1));
                registry::remove(registry_path);
                for path in cleanup {
                    if path.is_dir() {
                        let _ = std::fs::remove_dir_all(&path);
                    } else {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            // SAFETY: leave without running the owner's destructors.
            unsafe { libc::_exit(0) }
        }
    }
}
