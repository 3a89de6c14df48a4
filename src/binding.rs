//! What bind-input and bind-output share: the claimed ID, its FIFO, the
//! daemon's start, and the events that stop it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use crate::args::Id;
use crate::background::{self, Ready};
use crate::claim::{Claim, Refused};
use crate::error::{Error, ExitStatus, Result};
use crate::fifo::Fifo;
use crate::logging;
use crate::poll::{IN, PollSet};
use crate::process::ProcessId;
use crate::runtime_dir::RuntimeDir;
use crate::signals::{self, Signals};
use crate::sweep;

/// A claimed ID with its FIFO. Dropping it removes both, so no failure
/// path of a binding leaves them behind; only the foreground half of a
/// daemonizing start, which hands them to the daemon, forgets it.
pub(crate) struct Binding {
    pub(crate) id: Id,
    pub(crate) dir: RuntimeDir,
    /// `None` only while being dropped.
    claim: Option<Claim>,
    pub(crate) fifo: Fifo,
    watchdog: Option<OwnedFd>,
    /// The process serving it, once known (its claim records it), so that
    /// the status need not read /proc again.
    pub(crate) me: Option<ProcessId>,
}

/// Options every binding command takes (flattened into each one's
/// command line; the `///` comments are their `--help` text).
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct BindingOptions {
    /// Stay in the foreground: print the PID once ready, keep running, log
    /// to stderr (for supervisors such as systemd, a pool or a master)
    #[arg(short = 'f', long)]
    pub(crate) foreground: bool,

    /// Close properly when this inherited descriptor (a pipe's read end)
    /// reaches end-of-file, i.e. when the process holding its write end dies
    #[arg(long, value_name = "FD")]
    pub(crate) watchdog_fd: Option<RawFd>,

    /// With --foreground: write a newline to this inherited descriptor once
    /// ready, then close it (s6's notification-fd)
    #[arg(long, value_name = "FD", requires = "foreground")]
    pub(crate) ready_fd: Option<RawFd>,
}

impl Binding {
    /// Takes over the descriptors given (the watchdog) and lets go of the
    /// others inherited, sweeps the runtime directory, claims `id` and
    /// creates its FIFO.
    pub(crate) fn open(id: &Id, common: &BindingOptions) -> Result<Binding> {
        // Checked first: a bad descriptor is a usage error, refused before
        // anything is created.
        let watchdog = common.watchdog_fd.map(adopt_fd).transpose()?;
        crate::notify::init(common.ready_fd, common.foreground)?;
        crate::activation::adopt()?;
        if !common.foreground {
            // A daemon must not keep its caller's descriptors: a pipe held
            // open here would hang `pid=$(bind-input ... 3> >(cat))`.
            background::close_inherited(watchdog.as_ref().map(|w| w.as_raw_fd()));
        }
        // Only our own name is reclaimed now (the claim does that); the
        // rest of the directory is swept once we are ready, so a start
        // does not pay for everything else the directory holds.
        let dir = RuntimeDir::open()?;
        let claim = match Claim::take(&dir.dotfile(id.as_str(), "lock")) {
            Ok(claim) => claim,
            Err(Refused::Held(owner)) => {
                let by = owner
                    .map(|o| format!(" by process {}", o.pid))
                    .unwrap_or_default();
                return Err(Error::new(
                    ExitStatus::CantCreate,
                    format!(
                        "cannot create the FIFO {}: ID {id} is in use{by}",
                        dir.fifo(id).display()
                    ),
                ));
            }
            Err(Refused::Io(e)) => {
                return Err(Error::io(
                    format!("cannot claim ID {id} in {}", dir.path().display()),
                    &e,
                ));
            }
        };
        let fifo = match Fifo::create(&dir.fifo(id)) {
            Ok(fifo) => fifo,
            Err(e) => {
                claim.release();
                return Err(e);
            }
        };
        Ok(Binding {
            id: id.clone(),
            dir,
            claim: Some(claim),
            fifo,
            watchdog,
            me: None,
        })
    }

    /// Tells the foreground the binding works, then sweeps the runtime
    /// directory of what dead owners left (see [`sweep`]).
    pub(crate) fn ready(&self, ready: &mut Ready) {
        ready.notify();
        sweep::sweep(&self.dir);
    }

    /// Removes the FIFO and the claim: nothing of the binding is left.
    /// (Dropping does the same; this says it where it is meant.)
    pub(crate) fn close(self) {
        drop(self);
    }

    /// Goes to the background (unless `common.foreground`) and runs
    /// `serve` there with the stop events set up, the claim recorded and
    /// logging started. `serve` calls [`Ready::notify`] once it works.
    pub(crate) fn run<F>(
        mut self,
        program: &'static str,
        common: &BindingOptions,
        serve: F,
    ) -> Result<()>
    where
        F: FnOnce(&mut Binding, &StopEvents, &mut Ready) -> Result<()>,
    {
        let watchdog = self.watchdog.take();
        let log_path = self.dir.dotfile(self.id.as_str(), "log");
        background::detach(common.foreground, move |ready| {
            if common.foreground {
                logging::to_stderr(program);
            } else {
                logging::to_file(program, &log_path)?;
            }
            let result = (|| {
                let claim = self.claim.as_mut().expect("held until dropped");
                let path = claim.path().display().to_string();
                let what = || format!("cannot record the claim {path}");
                // Not ProcessId::current(), which panics where the system
                // refuses to open /proc/self/stat (out of descriptors).
                let me = ProcessId::of(std::process::id() as i32).ok_or_else(|| {
                    let why = io::Error::last_os_error();
                    Error::io(format!("{} (reading /proc/self/stat)", what()), &why)
                })?;
                claim.record(me).map_err(|e| Error::io(what(), &e))?;
                self.me = Some(me);
                let stop = StopEvents {
                    signals: Signals::block(&[signals::DRAIN]).map_err(|e| {
                        Error::new(e.status, format!("cannot set up the signals: {e}"))
                    })?,
                    watchdog,
                };
                serve(&mut self, &stop, ready)
            })();
            self.close();
            result
        })
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        crate::status::finish();
        self.fifo.remove();
        if let Some(claim) = self.claim.take() {
            claim.release();
        }
    }
}

/// Takes over a descriptor passed on the command line, so no child of
/// ours inherits it.
fn adopt_fd(fd: RawFd) -> Result<OwnedFd> {
    let bad = |e: nix::Error| {
        Error::usage(format!(
            "--watchdog-fd {fd}: not an open descriptor ({})",
            e.desc()
        ))
    };
    if fd <= 2 {
        return Err(Error::usage(format!(
            "--watchdog-fd {fd}: not a pipe of its own"
        )));
    }
    // SAFETY: only borrowed for this check; ownership is taken below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(bad)?;
    // SAFETY: the descriptor is open (fcntl succeeded) and nobody else in
    // this process owns it: it was inherited for exactly this purpose.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The events that stop a binding: a signal, or its parent's death.
pub(crate) struct StopEvents {
    pub(crate) signals: Signals,
    pub(crate) watchdog: Option<OwnedFd>,
}

/// Why a binding stops.
#[derive(Debug)]
pub(crate) enum Reason {
    Signal(nix::sys::signal::Signal),
    ParentGone,
    /// [`signals::DRAIN`]: the writer is done.
    Drain,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Signal(sig) => write!(f, "{sig}"),
            Reason::ParentGone => f.write_str("its parent (pool or master) is gone"),
            Reason::Drain => f.write_str("its writer is done (SIGUSR1)"),
        }
    }
}

impl StopEvents {
    /// Adds the stop events to `set`; pass the result to [`StopEvents::check`].
    pub(crate) fn register(&self, set: &mut PollSet) -> (usize, Option<usize>) {
        let sig = set.add(self.signals.as_fd(), IN);
        let dog = self.watchdog.as_ref().map(|w| set.add(w.as_fd(), IN));
        (sig, dog)
    }

    pub(crate) fn check(&self, set: &PollSet, slots: (usize, Option<usize>)) -> Option<Reason> {
        if set.revents(slots.0) != 0
            && let Some(sig) = self.signals.next()
        {
            if sig == signals::DRAIN {
                return Some(Reason::Drain);
            }
            return Some(Reason::Signal(sig));
        }
        // The watchdog never carries data: any event is end-of-file.
        if let Some(dog) = slots.1
            && set.revents(dog) != 0
        {
            return Some(Reason::ParentGone);
        }
        None
    }
}
