//! The stop events of a binding ([`crate::binding::Stop`]) and its FIFO,
//! as tokio sees them.
//!
//! The signalfd, the watchdog pipe and the FIFO's two ends are plain
//! non-blocking descriptors; `AsyncFd` puts them in tokio's poll loop
//! beside the NATS connection, so one current-thread runtime waits on all
//! of them at once.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::binding::{Reason, StopEvents};
use crate::error::{Error, Result};
use crate::signals;

/// A descriptor owned elsewhere (by the binding), registered with tokio.
pub(crate) struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Registers `fd` (non-blocking already) for `interest`. The caller
/// keeps `fd` open for as long as the result lives: the binding owns the
/// descriptors, and outlives every `AsyncFd` made of them.
pub(crate) fn watch(fd: RawFd, interest: Interest) -> Result<AsyncFd<Fd>> {
    // SAFETY: see above; the descriptor is open and stays open while
    // registered.
    unsafe { AsyncFd::register_with_interest(Fd(fd), interest) }
        .map_err(|e| Error::io("cannot watch a descriptor", &e.into()))
}

/// The stop events, awaitable.
pub(crate) struct AsyncStop<'a> {
    stop: &'a StopEvents,
    signals: AsyncFd<Fd>,
    watchdog: Option<AsyncFd<Fd>>,
}

impl<'a> AsyncStop<'a> {
    pub(crate) fn new(stop: &'a StopEvents) -> Result<AsyncStop<'a>> {
        let signals = watch(stop.signals.as_fd().as_raw_fd(), Interest::READABLE)?;
        let watchdog = match &stop.watchdog {
            Some(w) => {
                let fd = w.as_raw_fd();
                nix::fcntl::fcntl(
                    w,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                )
                .map_err(|e| Error::nix("cannot watch the watchdog descriptor", e))?;
                Some(watch(fd, Interest::READABLE)?)
            }
            None => None,
        };
        Ok(AsyncStop {
            stop,
            signals,
            watchdog,
        })
    }

    /// The next reason to stop.
    pub(crate) async fn next(&self) -> Reason {
        let dog = async {
            match &self.watchdog {
                // Any event on the watchdog is its end-of-file.
                Some(w) => {
                    let _ = w.readable().await;
                }
                None => std::future::pending().await,
            }
        };
        let sig = async {
            loop {
                let Ok(mut guard) = self.signals.readable().await else {
                    return std::future::pending().await;
                };
                match self.stop.signals.next() {
                    Some(sig) if sig == signals::DRAIN => return Reason::Drain,
                    Some(sig) => return Reason::Signal(sig),
                    None => guard.clear_ready(),
                }
            }
        };
        tokio::select! {
            reason = sig => reason,
            () = dog => Reason::ParentGone,
        }
    }
}

/// Reads what the FIFO holds into `buf`, waiting until something comes.
/// Returns 0 at end-of-file (only once its write end was let go).
pub(crate) async fn read(fd: &AsyncFd<Fd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| raw_read(inner.get_ref().0, buf)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Reads what the FIFO holds now, without waiting: `Ok(None)` when empty.
pub(crate) fn read_now(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match raw_read(fd, buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

fn raw_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into our own buffer, at most its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes `buf` to `fd` once (what the kernel takes; may be less).
pub(crate) fn raw_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: write(2) from our own buffer, at most its length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
