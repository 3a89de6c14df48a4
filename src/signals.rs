//! Signals as events: SIGINT, SIGHUP and SIGTERM read from a signalfd.
//!
//! Shutdown work (flushing, unlinking, stopping children) must not run in
//! a signal handler, so the signals are blocked and read from a descriptor
//! that sits in each command's poll loop beside its sockets. The same
//! mechanism reports SIGCHLD (on a descriptor of its own) for the
//! commands that supervise children, and it says *which* signal arrived, which the pool and master need for
//! their `128 + N` exit status. (The `ctrlc` crate runs a handler on a
//! thread of its own and cannot tell the signals apart.)
//!
//! Blocking must happen before any thread is spawned, so that every thread
//! inherits the mask. Children inherit it too, through fork and exec:
//! every child we start resets it with [`unblock_in_child`].

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

use crate::error::{Error, Result};

/// The signals that close a command properly.
pub(crate) const STOP: [Signal; 3] = [Signal::SIGINT, Signal::SIGHUP, Signal::SIGTERM];
/// Tells a binding its writer is done: send everything, however long it
/// takes, then close (how a master ends a daemon's bind-output).
pub(crate) const DRAIN: Signal = Signal::SIGUSR1;

/// For `pre_exec`: gives a child the empty signal mask. `Command` leaves
/// the parent's mask in place, and a daemon with SIGTERM blocked could
/// never be stopped. Only async-signal-safe calls.
pub(crate) fn unblock_in_child() -> std::io::Result<()> {
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

/// Signals read from a signalfd (non-blocking, close-on-exec).
pub(crate) struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks the stop signals and `extra` ([`DRAIN`] for a binding) and
    /// returns the descriptor they are read from.
    pub(crate) fn block(extra: &[Signal]) -> Result<Signals> {
        Signals::of(STOP.iter().chain(extra))
    }

    /// Blocks SIGCHLD alone, for a supervisor. Kept apart from the stop
    /// signals so that the stop descriptor is readable only when a stop
    /// signal is pending: a blocking step can wait on it and act on it
    /// without reaping children.
    pub(crate) fn children() -> Result<Signals> {
        Signals::of(&[Signal::SIGCHLD])
    }

    fn of<'a>(signals: impl IntoIterator<Item = &'a Signal>) -> Result<Signals> {
        let mut set = SigSet::empty();
        for &sig in signals {
            set.add(sig);
        }
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
            .map_err(|e| Error::nix("cannot block signals", e))?;
        // SAFETY: a valid signal set; the new descriptor is ours alone.
        let fd =
            unsafe { libc::signalfd(-1, set.as_ref(), libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io("cannot create a signal descriptor", &e));
        }
        // SAFETY: signalfd returned a fresh descriptor.
        Ok(Signals {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    #[cfg(test)]
    pub(crate) fn of_for_tests(sig: Signal) -> Signals {
        Signals::of(&[sig]).expect("a signalfd")
    }

    /// A second handle on the same pending signals, for a step (a
    /// protocol read) that must end when one comes.
    pub(crate) fn try_clone(&self) -> std::io::Result<Signals> {
        Ok(Signals {
            fd: self.fd.try_clone()?,
        })
    }

    /// The next pending signal, if any.
    pub(crate) fn next(&self) -> Option<Signal> {
        // SAFETY: a zeroed siginfo is valid; read writes at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize != size {
            return None;
        }
        Signal::try_from(info.ssi_signo as i32).ok()
    }

    /// Reads every pending signal; for wake-ups whose kind is all they say.
    pub(crate) fn drain(&self) {
        while self.next().is_some() {}
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_reads_the_same_signals() {
        // SIGUSR2 is used by no command: blocking it here harms no test.
        let signals = Signals::of_for_tests(Signal::SIGUSR2);
        let clone = signals.try_clone().unwrap();
        assert_eq!(clone.next(), None);
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        assert_eq!(clone.next(), Some(Signal::SIGUSR2));
        assert_eq!(signals.next(), None);
    }
}
