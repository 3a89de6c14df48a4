//! Telling a service manager that we are ready, and when we stop.
//!
//! Two conventions, both optional and both cheap:
//! - systemd's `$NOTIFY_SOCKET` (sd_notify(3)): datagrams `READY=1`,
//!   `STATUS=…`, `STOPPING=1` to a unix socket, a path or, with a leading
//!   `@`, an abstract name. So `Type=notify` units start their dependants
//!   only once the port listens.
//! - s6's notification-fd (`--ready-fd N`): one newline written to
//!   descriptor N when ready, then N is closed.
//!
//! Only a process that stays in the foreground speaks for itself (a
//! daemonized binding is not the process the manager started), and the
//! variable is taken out of the environment at once, so that no child (a
//! pool's bindings) ever speaks for us. One notifier per process: the
//! socket is the process's, as the variable was.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use crate::error::{Error, Result};

/// The variable systemd passes the notification socket in.
pub(crate) const ENV_NOTIFY: &str = "NOTIFY_SOCKET";

struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    ready_fd: Option<OwnedFd>,
}

static NOTIFIER: Mutex<Notifier> = Mutex::new(Notifier {
    socket: None,
    ready_fd: None,
});

/// Takes `$NOTIFY_SOCKET` out of the environment (used when `speak`, i.e.
/// in the foreground) and adopts descriptor `ready_fd`. Call it while the
/// process is single-threaded (it changes the environment), before the
/// inherited descriptors are closed. A bad `ready_fd` is a usage error.
pub(crate) fn init(ready_fd: Option<RawFd>, speak: bool) -> Result<()> {
    let fd = ready_fd.map(adopt).transpose()?;
    let target = std::env::var_os(ENV_NOTIFY);
    // SAFETY: the caller guarantees no other thread runs, so nothing reads
    // the environment at the same time.
    unsafe { std::env::remove_var(ENV_NOTIFY) };
    let socket = match target {
        Some(t) if speak => match open(&t) {
            Ok(pair) => Some(pair),
            Err(e) => {
                // A manager that cannot be told is no reason not to serve.
                log::warn!(
                    "cannot use {ENV_NOTIFY}={}: {}",
                    t.to_string_lossy(),
                    crate::error::describe_io(&e)
                );
                None
            }
        },
        _ => None,
    };
    let mut n = NOTIFIER.lock().unwrap_or_else(|e| e.into_inner());
    n.socket = socket;
    n.ready_fd = fd;
    Ok(())
}

fn open(target: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(std::path::Path::new(target))?,
    };
    let socket = UnixDatagram::unbound()?;
    Ok((socket, addr))
}

fn adopt(fd: RawFd) -> Result<OwnedFd> {
    if fd <= 2 {
        return Err(Error::usage(format!(
            "--ready-fd {fd}: not a descriptor of its own (stdin, stdout or stderr)"
        )));
    }
    // SAFETY: only borrowed for this check; ownership is taken below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| {
        Error::usage(format!(
            "--ready-fd {fd}: not an open descriptor ({})",
            e.desc()
        ))
    })?;
    // SAFETY: open (fcntl succeeded), and inherited for this purpose only.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(n: &Notifier, message: &str) {
    if let Some((socket, addr)) = &n.socket
        && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
    {
        log::debug!(
            "cannot tell the service manager {message:?}: {}",
            crate::error::describe_io(&e)
        );
    }
}

/// One line, as a `STATUS=` value must be.
fn line(status: &str) -> String {
    status.replace('\n', " ")
}

/// We serve: `READY=1` with `status`, and the newline on the ready fd
/// (which is then closed). Only the first call counts for the fd.
pub(crate) fn ready(status: &str) {
    let mut n = NOTIFIER.lock().unwrap_or_else(|e| e.into_inner());
    send(
        &n,
        &format!(
            "READY=1\nSTATUS={}\nMAINPID={}",
            line(status),
            std::process::id()
        ),
    );
    if let Some(fd) = n.ready_fd.take() {
        let _ = nix::unistd::write(fd.as_fd(), b"\n");
    }
}

/// We have begun to stop.
pub(crate) fn stopping() {
    let n = NOTIFIER.lock().unwrap_or_else(|e| e.into_inner());
    send(&n, "STOPPING=1");
}

/// Drops the notifier unused: for a forked child that must not keep the
/// ready descriptor open (its reader would wait for end-of-file forever).
pub(crate) fn forget() {
    let mut n = NOTIFIER.lock().unwrap_or_else(|e| e.into_inner());
    n.ready_fd = None;
    n.socket = None;
}
