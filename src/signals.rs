//! Signals as events: SIGINT, SIGHUP and SIGTERM read from a signalfd.
//!
//! Shutdown work (flushing, unlinking, stopping children) must not run in
//! a signal handler, so the signals are blocked and read from a descriptor
//! that sits in each command's poll loop beside its sockets. The same
//! descriptor reports SIGCHLD for the commands that supervise children,
//! and it says *which* signal arrived, which the pool and master need for
//! their `128 + N` exit status. (The `ctrlc` crate runs a handler on a
//! thread of its own and cannot tell the signals apart.)
//!
//! Blocking must happen before any thread is spawned, so that every thread
//! inherits the mask. Children inherit it too, through fork and exec:
//! every child we start resets it with [`unblock_in_child`].

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::error::Result;

/// The signals that close a command properly.
pub const STOP: [Signal; 3] = [Signal::SIGINT, Signal::SIGHUP, Signal::SIGTERM];
/// Tells a binding its writer is done: send everything, however long it
/// takes, then close (how a master ends a daemon's bind-output).
pub const DRAIN: Signal = Signal::SIGUSR1;

/// For `pre_exec`: gives a child the empty signal mask. `Command` leaves
/// the parent's mask in place, and a daemon with SIGTERM blocked could
/// never be stopped. Only async-signal-safe calls.
pub fn unblock_in_child() -> std::io::Result<()> {
    // SAFETY: sigemptyset and sigprocmask on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks the stop signals and `extra` (SIGCHLD for a supervisor,
    /// [`DRAIN`] for a binding) and returns the descriptor they are read
    /// from.
    pub fn block(extra: &[Signal]) -> Result<Signals> {
        let mut set = SigSet::empty();
        for &sig in STOP.iter().chain(extra) {
            set.add(sig);
        }
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// The next pending signal, if any.
    pub fn next(&self) -> Option<Signal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
            _ => None,
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
