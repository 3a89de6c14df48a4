//! daemons: a DDIR's programs, from start to the last reaped process.
//!
//! master and nats-master run a directory of daemons the same way and
//! differ only in each daemon's binding (a [`Plan`]): which executables
//! run ([`list`]), how each starts in its own process group with stdout
//! into its binding's FIFO, both registered ([`start`]), and how they are
//! followed to the end ([`wait`]). The binding holds its FIFO open and
//! cannot see the daemon end, so when a daemon is reaped its binding gets
//! SIGUSR1, which sends what is left and closes; what the daemon left in
//! its group gets SIGTERM, then SIGKILL after [`GRACE`]; a binding that
//! ends first stops its daemon. [`wait`] fails if a daemon did, or if
//! its output was not all delivered.

use std::fs::{self, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus as Status, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use crate::args::Id;
use crate::cli::ChildBinding;
use crate::error::{Error, ExitStatus, Result};
use crate::poll::{IN, PollSet};
use crate::process::ProcessId;
use crate::registry::Kind;
use crate::signals;
use crate::supervise::{GRACE, Owner};

/// The executables of `ddir`, in name order. Entries that cannot be run or
/// whose names are not valid IDs are skipped with a warning.
pub(crate) fn list(ddir: &Path) -> Result<Vec<(Id, PathBuf)>> {
    let what = || format!("cannot read daemon directory {}", ddir.display());
    let entries = fs::read_dir(ddir).map_err(|e| {
        let mut err = Error::io(what(), &e);
        if err.status == ExitStatus::CantCreate {
            err.status = ExitStatus::NoInput;
        }
        err
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(what(), &e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "skipping {}: {}",
                    path.display(),
                    crate::error::describe_io(&e)
                );
                continue;
            }
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            log::warn!("skipping {}: not an executable file", path.display());
            continue;
        }
        if nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err() {
            log::warn!("skipping {}: not executable by this user", path.display());
            continue;
        }
        match name.parse::<Id>() {
            Ok(id) => found.push((id, path)),
            Err(why) => log::warn!(
                "skipping {}: its name is not a valid ID ({why})",
                path.display()
            ),
        }
    }
    if found.is_empty() {
        return Err(Error::new(
            ExitStatus::NoInput,
            format!("no executable daemon in {}", ddir.display()),
        ));
    }
    found.sort();
    Ok(found)
}

/// Where a daemon is in its life.
enum Life {
    Running,
    /// The daemon has ended; what it left in its process group is being
    /// stopped: SIGKILL at `kill_at` (`None` once sent).
    Ending {
        status: Status,
        kill_at: Option<Instant>,
    },
    /// The daemon and its whole group are gone.
    Gone(Status),
}

pub(crate) struct Daemon {
    name: Id,
    process: ProcessId,
    life: Life,
    binding: ProcessId,
    /// How its binding ended, once reaped.
    binding_end: Option<Status>,
}

impl Daemon {
    fn done(&self) -> bool {
        matches!(self.life, Life::Gone(_)) && self.binding_end.is_some()
    }

    /// Why it counts as failed, if it does.
    fn failure(&self) -> Option<String> {
        match (&self.life, self.binding_end) {
            (Life::Gone(s), _) if !s.success() => Some(format!("{} ({s})", self.name)),
            (_, Some(b)) if !b.success() => Some(format!(
                "{} (its output was not all delivered: binding {b})",
                self.name
            )),
            _ => None,
        }
    }

    /// Moves it on with what has happened since last time.
    fn step(&mut self, owner: &mut Owner) {
        match self.life {
            Life::Running => {
                if let Some(status) = reap_one(self.process.pid) {
                    log::info!("daemon {} ended ({status})", self.name);
                    // What it left running in its group goes with it (the
                    // group outlives its leader while members remain, so
                    // its number cannot have been reused); it stays in the
                    // registry until the group is empty.
                    self.process.signal_group(Signal::SIGTERM);
                    // Its output is complete: the binding sends all of it,
                    // however slowly the pool reads, and closes.
                    if self.binding_end.is_none() {
                        self.binding.signal(signals::DRAIN);
                    }
                    self.life = Life::Ending {
                        status,
                        kill_at: Some(Instant::now() + GRACE),
                    };
                }
            }
            Life::Ending { status, kill_at } => {
                if !self.process.group_is_alive() {
                    owner.forget(self.process.pid);
                    self.life = Life::Gone(status);
                } else if kill_at.is_some_and(|t| Instant::now() > t) {
                    log::warn!(
                        "what daemon {} left running ignored SIGTERM: killed",
                        self.name
                    );
                    self.process.signal_group(Signal::SIGKILL);
                    self.life = Life::Ending {
                        status,
                        kill_at: None,
                    };
                }
            }
            Life::Gone(_) => {}
        }
        if self.binding_end.is_none()
            && let Some(status) = reap_one(self.binding.pid)
        {
            self.binding_end = Some(status);
            owner.forget(self.binding.pid);
            if matches!(self.life, Life::Running) {
                log::warn!(
                    "the binding of daemon {} ended first: stopping the daemon",
                    self.name
                );
                self.process.signal_group(Signal::SIGTERM);
            }
        }
    }
}

/// How a daemon's binding is started: a pool's bind-output or a bus's
/// nats-output.
pub(crate) struct Plan<'a> {
    pub(crate) child: ChildBinding,
    /// The binding's ID (its FIFO's name).
    pub(crate) stream: &'a Id,
    /// How long it may take to be ready.
    pub(crate) limit: Duration,
    /// Its stream's secret, handed over through a pipe.
    pub(crate) secret: Option<&'a [u8]>,
    /// Where its lines go, for the log.
    pub(crate) to: String,
}

/// Starts daemon `name` (the executable `path`, run in `ddir`) with its
/// binding as `plan` says, both registered.
pub(crate) fn start(
    owner: &mut Owner,
    name: &Id,
    path: &Path,
    ddir: &Path,
    plan: Plan<'_>,
) -> Result<Daemon> {
    let stream = plan.stream;
    let binding = owner.start_binding(plan.child, stream, plan.limit, plan.secret)?;
    let fifo_path = owner.binding_dir().fifo(stream);
    // The binding holds its FIFO open read-write: this open returns at
    // once.
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&fifo_path)
        .map_err(|e| Error::io(format!("cannot open the FIFO {}", fifo_path.display()), &e))?;
    let mut cmd = Command::new(path);
    cmd.stdin(Stdio::null()).stdout(fifo).current_dir(ddir);
    // SAFETY: setpgid and sigprocmask are async-signal-safe. Each daemon
    // leads its own process group, so stopping it stops its children too;
    // and it must not inherit our blocked signals.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::signals::unblock_in_child()
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("cannot start daemon {}", path.display()), &e))?;
    let pid = child.id() as i32;
    drop(child);
    let process = ProcessId::of(pid).unwrap_or(ProcessId { pid, start: 0 });
    owner.register(Kind::Daemon, process, name)?;
    log::info!("daemon {name} (pid {pid}) → {}", plan.to);
    Ok(Daemon {
        name: name.clone(),
        process,
        life: Life::Running,
        binding,
        binding_end: None,
    })
}

/// Waits for every daemon and binding to end.
pub(crate) fn wait(owner: &mut Owner, daemons: &mut [Daemon]) -> Result<()> {
    let mut set = PollSet::default();
    loop {
        for d in daemons.iter_mut() {
            d.step(owner);
        }
        if daemons.iter().all(Daemon::done) {
            let failed: Vec<String> = daemons.iter().filter_map(Daemon::failure).collect();
            if failed.is_empty() {
                log::info!("every daemon exited 0");
                return Ok(());
            }
            return Err(Error::new(
                ExitStatus::Failure,
                format!("daemon(s) failed: {}", failed.join(", ")),
            ));
        }
        set.clear();
        set.add(owner.signals.as_fd(), IN);
        set.add(owner.children.as_fd(), IN);
        // A group left behind by its daemon sends no SIGCHLD when it
        // empties: look again shortly.
        let ending = daemons
            .iter()
            .any(|d| matches!(d.life, Life::Ending { .. }));
        set.wait(ending.then_some(Duration::from_millis(20)))
            .map_err(|e| Error::io("cannot wait for events", &e))?;
        owner.children.drain();
        if let Some(sig) = owner.stop_signal() {
            return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
        }
    }
}

/// The exit status of child `pid` if it has ended (reaping it).
fn reap_one(pid: i32) -> Option<Status> {
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(Status::from_raw(code << 8)),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(Status::from_raw(sig as i32)),
        Ok(_) => None,
        // Not our child (any more): count it as gone.
        Err(_) => Some(Status::from_raw(0xff << 8)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keeps_executable_files_with_valid_names_in_name_order() {
        let tmp = tempfile::tempdir().unwrap();
        let ddir = tmp.path();
        let file = |name: &str, mode: u32| {
            let path = ddir.join(name);
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        file("b", 0o755);
        file("a", 0o700);
        file("plain", 0o644);
        file("bad name", 0o755);
        fs::create_dir(ddir.join("sub")).unwrap();
        let found = list(ddir).unwrap();
        let names: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(found[0].1, ddir.join("a"));
    }

    #[test]
    fn list_of_nothing_to_run_is_no_input() {
        let tmp = tempfile::tempdir().unwrap();
        let err = list(tmp.path()).unwrap_err();
        assert_eq!(err.status, ExitStatus::NoInput);
        assert!(err.message.contains("no executable daemon in"), "{err}");
        let err = list(&tmp.path().join("missing")).unwrap_err();
        assert_eq!(err.status, ExitStatus::NoInput);
        assert!(
            err.message.contains("cannot read daemon directory"),
            "{err}"
        );
    }
}
