//! One error type for every command, carrying the exit status it maps to.
//!
//! fifobind's commands are used from scripts, so the exit status is part of
//! the interface: usage errors are 2 and runtime failures use the
//! `sysexits.h` values (documented in every man page). Errors are built
//! where the cause is known and printed exactly once, by the main, as
//! `command: what failed: why`.

use std::fmt;
use std::io;

/// Exit statuses, as documented in the man pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    /// Everything went well.
    Success,
    /// A master's daemon failed (documented in master(1)).
    Failure,
    /// Bad command line (EX_USAGE is 64, but 2 is the shell convention
    /// that clap and the spec use).
    Usage,
    /// EX_NOINPUT: a master's daemon directory is missing or holds no
    /// daemon.
    NoInput,
    /// EX_NOHOST: the host name does not resolve.
    NoHost,
    /// EX_UNAVAILABLE: connection refused, port in use, peer went away.
    Unavailable,
    /// EX_SOFTWARE: an internal error (a bug, or a daemon that vanished).
    Software,
    /// EX_OSERR: the system refused a resource (fork, pipe, descriptors).
    OsErr,
    /// EX_CANTCREAT: a FIFO or file cannot be created, or the ID is in use.
    CantCreate,
    /// EX_IOERR: reading or writing failed.
    IoErr,
    /// EX_TEMPFAIL: a timeout; trying again later may work.
    TempFail,
    /// EX_PROTOCOL: the peer broke the protocol.
    Protocol,
    /// EX_NOPERM: permission denied, or an unsafe runtime directory.
    NoPerm,
    /// Killed by a signal: 128 + its number.
    Signal(i32),
}

impl ExitStatus {
    pub(crate) fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
            ExitStatus::NoInput => 66,
            ExitStatus::NoHost => 68,
            ExitStatus::Unavailable => 69,
            ExitStatus::Software => 70,
            ExitStatus::OsErr => 71,
            ExitStatus::CantCreate => 73,
            ExitStatus::IoErr => 74,
            ExitStatus::TempFail => 75,
            ExitStatus::Protocol => 76,
            ExitStatus::NoPerm => 77,
            ExitStatus::Signal(n) => 128 + n,
        }
    }

    /// The inverse of [`ExitStatus::code`], for statuses passed between
    /// processes (the readiness pipe, a child's exit).
    pub(crate) fn from_code(code: i32) -> ExitStatus {
        match code {
            0 => ExitStatus::Success,
            2 => ExitStatus::Usage,
            66 => ExitStatus::NoInput,
            68 => ExitStatus::NoHost,
            69 => ExitStatus::Unavailable,
            70 => ExitStatus::Software,
            71 => ExitStatus::OsErr,
            73 => ExitStatus::CantCreate,
            74 => ExitStatus::IoErr,
            75 => ExitStatus::TempFail,
            76 => ExitStatus::Protocol,
            77 => ExitStatus::NoPerm,
            n if n > 128 => ExitStatus::Signal(n - 128),
            _ => ExitStatus::Failure,
        }
    }

    /// The status that best describes an operating-system error.
    pub(crate) fn of_io(err: &io::Error) -> ExitStatus {
        use io::ErrorKind as K;
        match err.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => return ExitStatus::NoPerm,
            Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL) | Some(libc::ECONNREFUSED) => {
                return ExitStatus::Unavailable;
            }
            Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) | Some(libc::ECONNRESET) => {
                return ExitStatus::Unavailable;
            }
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) => {
                return ExitStatus::OsErr;
            }
            // "Try again": a timed-out read, or fork at its process limit.
            Some(libc::EAGAIN) => return ExitStatus::TempFail,
            Some(libc::ENOSPC) | Some(libc::EROFS) | Some(libc::EEXIST) | Some(libc::ENOENT)
            | Some(libc::ENOTDIR) => return ExitStatus::CantCreate,
            _ => {}
        }
        match err.kind() {
            K::TimedOut | K::WouldBlock => ExitStatus::TempFail,
            K::PermissionDenied => ExitStatus::NoPerm,
            _ => ExitStatus::IoErr,
        }
    }
}

/// A failure with the exit status it should end the process with.
#[derive(Debug)]
pub struct Error {
    pub(crate) status: ExitStatus,
    pub(crate) message: String,
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn new(status: ExitStatus, message: impl Into<String>) -> Error {
        Error {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Error {
        Error::new(ExitStatus::Usage, message)
    }

    /// `what` failed because of `err`: "cannot listen on port 9999:
    /// address already in use".
    pub(crate) fn io(what: impl fmt::Display, err: &io::Error) -> Error {
        Error::new(
            ExitStatus::of_io(err),
            format!("{what}: {}", describe_io(err)),
        )
    }
}

impl Error {
    /// [`Error::io`] for a call made through nix.
    pub(crate) fn nix(what: impl fmt::Display, err: nix::Error) -> Error {
        Error::io(what, &io::Error::from(err))
    }
}

/// `std::io::Error`'s Display appends "(os error N)"; users want only the
/// words, in lower case as the rest of the line is.
pub(crate) fn describe_io(err: &io::Error) -> String {
    let text = match err.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_string(),
        None => err.to_string(),
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for status in [
            ExitStatus::Success,
            ExitStatus::Usage,
            ExitStatus::NoInput,
            ExitStatus::NoHost,
            ExitStatus::Unavailable,
            ExitStatus::Software,
            ExitStatus::OsErr,
            ExitStatus::CantCreate,
            ExitStatus::IoErr,
            ExitStatus::TempFail,
            ExitStatus::Protocol,
            ExitStatus::NoPerm,
            ExitStatus::Signal(15),
        ] {
            assert_eq!(ExitStatus::from_code(status.code()), status);
        }
    }

    #[test]
    fn io_errors_map_to_sysexits() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(ExitStatus::of_io(&refused), ExitStatus::Unavailable);
        let again = io::Error::from_raw_os_error(libc::EAGAIN);
        assert_eq!(ExitStatus::of_io(&again), ExitStatus::TempFail);
        assert_eq!(
            ExitStatus::of_io(&io::ErrorKind::WouldBlock.into()),
            ExitStatus::TempFail
        );
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(ExitStatus::of_io(&denied), ExitStatus::NoPerm);
        let in_use = Error::io(
            "cannot listen on port 9999",
            &io::Error::from_raw_os_error(libc::EADDRINUSE),
        );
        assert_eq!(
            in_use.to_string(),
            "cannot listen on port 9999: address already in use"
        );
    }
}
