//! One poll(2) round over a set of descriptors: what every event loop of
//! the bindings, the pool and the master waits in. poll, not epoll: each
//! loop rebuilds a short set each round, and one call does the waiting.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// A set of descriptors to poll, rebuilt each round.
#[derive(Default)]
pub(crate) struct PollSet {
    fds: Vec<libc::pollfd>,
}

pub(crate) const IN: i16 = libc::POLLIN;
pub(crate) const OUT: i16 = libc::POLLOUT;
/// Error, hang-up or invalid: reported whatever was asked.
pub(crate) const TROUBLE: i16 = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;

impl PollSet {
    pub(crate) fn clear(&mut self) {
        self.fds.clear();
    }

    /// Adds `fd`; returns its slot for [`PollSet::revents`].
    pub(crate) fn add(&mut self, fd: BorrowedFd<'_>, events: i16) -> usize {
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Waits for events, at most `timeout` (forever when `None`).
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let ms = match timeout {
            // Round up, so a deadline is not missed by a millisecond spin.
            Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
            None => -1,
        };
        // SAFETY: the pointer and length describe our own vector.
        let rc = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        Ok(())
    }

    pub(crate) fn revents(&self, slot: usize) -> i16 {
        self.fds[slot].revents
    }
}
