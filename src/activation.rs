//! Listening sockets handed over by a service manager (socket activation).
//!
//! Started by systemd (`.socket` units, `systemd-socket-activate`) or any
//! manager speaking sd_listen_fds(3), a command finds its listening socket
//! already open at descriptor 3, with `LISTEN_PID` naming this process and
//! `LISTEN_FDS` counting the sockets. bind-input and pool then serve that
//! socket instead of opening their own, so the manager holds the port
//! across restarts and connections made before we were ready wait in its
//! backlog instead of being refused.
//!
//! The variables are taken out of the environment at once, so no child
//! mistakes them for its own; the descriptor is adopted before the
//! inherited ones are closed (see `background::close_inherited`).

use std::net::{IpAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::args::Port;
use crate::error::{Error, Result};
use crate::net;

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST: RawFd = 3;
const ENV_PID: &str = "LISTEN_PID";
const ENV_FDS: &str = "LISTEN_FDS";
const ENV_NAMES: &str = "LISTEN_FDNAMES";

static INHERITED: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Adopts the socket a manager passed to this process, if it passed one.
/// Call it while the process is single-threaded (it changes the
/// environment) and before inherited descriptors are closed.
pub(crate) fn adopt() -> Result<()> {
    let pid = std::env::var(ENV_PID).ok();
    let fds = std::env::var(ENV_FDS).ok();
    // SAFETY: the caller guarantees no other thread runs.
    unsafe {
        std::env::remove_var(ENV_PID);
        std::env::remove_var(ENV_FDS);
        std::env::remove_var(ENV_NAMES);
    }
    // Meant for another process (we were started by one that got them).
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(());
    }
    let count: RawFd = match fds.as_deref().map(str::parse) {
        Some(Ok(n)) if n >= 1 => n,
        _ => return Ok(()),
    };
    if count > 1 {
        return Err(Error::usage(format!(
            "{ENV_FDS}={count}: the service manager passed {count} sockets, and one is served"
        )));
    }
    // SAFETY: sd_listen_fds(3): descriptor 3 is ours, passed for us alone.
    let owned = unsafe { OwnedFd::from_raw_fd(FIRST) };
    // Not for the processes we start.
    let _ = nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let taken = Some(owned);
    *INHERITED.lock().unwrap_or_else(|e| e.into_inner()) = taken;
    Ok(())
}

/// Closes the adopted socket unused: for a forked child that must not
/// hold the port.
pub(crate) fn forget() {
    drop(INHERITED.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// Whether `fd` is the adopted socket (which must stay open).
pub(crate) fn holds(fd: RawFd) -> bool {
    INHERITED
        .lock()
        .map(|s| s.as_ref().is_some_and(|o| o.as_raw_fd() == fd))
        .unwrap_or(false)
}

/// The listening socket to serve PORT on: the adopted one if a manager
/// passed one (it must listen on PORT: the command line stays the truth),
/// else our own, as [`net::listen`] opens it.
pub(crate) fn listen(bind: Option<IpAddr>, port: Port) -> Result<TcpListener> {
    let inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(fd) = inherited else {
        return net::listen(bind, port);
    };
    let raw = fd.as_raw_fd();
    let not_ours = |why: String| {
        Error::usage(format!(
            "the socket passed by the service manager ({ENV_FDS}, descriptor {raw}) {why}"
        ))
    };
    use nix::sys::socket::{getsockopt, sockopt};
    match getsockopt(&fd, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(not_ours("does not listen".into())),
        Err(e) => return Err(not_ours(format!("is no socket ({})", e.desc()))),
    }
    if getsockopt(&fd, sockopt::SockType) != Ok(nix::sys::socket::SockType::Stream) {
        return Err(not_ours("is no stream socket".into()));
    }
    let listener = TcpListener::from(fd);
    let local = listener.local_addr().map_err(|e| {
        not_ours(format!(
            "has no address ({})",
            crate::error::describe_io(&e)
        ))
    })?;
    if local.port() != port.0 {
        return Err(not_ours(format!(
            "listens on port {}, not on PORT {port}",
            local.port()
        )));
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("cannot configure the socket passed in", &e))?;
    Ok(listener)
}
