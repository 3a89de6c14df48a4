//! Logging through `log` + `env_logger`, to stderr or to a file.
//!
//! A daemon has no terminal, so a daemonized binding logs to
//! `<runtime dir>/.ID.log` (mode 0600). The runtime directory is often a
//! tmpfs (memory), so that file is capped: past [`LOG_MAX`] bytes it
//! becomes `.ID.log.1` (replacing the one before) and a new one begins,
//! so a binding never holds more than twice the cap. Foreground commands
//! log to stderr; when stderr is the journal (`$JOURNAL_STREAM` names it,
//! as systemd sets it for services), lines follow daemon(7): a `<N>`
//! syslog priority first and no timestamp of our own, which the journal
//! adds. `RUST_LOG` sets the level; the default is `info`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The size at which a daemon's log file is rotated, in bytes.
pub(crate) const LOG_MAX: u64 = 1 << 20;
/// Overrides [`LOG_MAX`] (in bytes, at least 1024).
pub(crate) const ENV_LOG_MAX: &str = "FIFOBIND_LOG_MAX";
/// Set by systemd to the `DEVICE:INODE` of the journal stream on stderr.
pub(crate) const ENV_JOURNAL: &str = "JOURNAL_STREAM";

fn builder(program: &'static str, journal: bool) -> env_logger::Builder {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format(move |buf, record| {
        if journal {
            return writeln!(buf, "<{}>{}", priority(record.level()), record.args());
        }
        writeln!(
            buf,
            "{} {program}[{}] {}: {}",
            buf.timestamp_millis(),
            std::process::id(),
            record.level(),
            record.args()
        )
    });
    builder
}

/// The syslog priority of a level, as sd-daemon(3) prefixes want it.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether stderr is the journal stream `$JOURNAL_STREAM` names (not
/// merely set: a child whose stderr was redirected inherits it too).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os(ENV_JOURNAL) else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Logs to stderr.
pub fn to_stderr(program: &'static str) {
    let _ = builder(program, stderr_is_journal()).try_init();
}

/// Logs to `path`, appending, rotated at the cap.
pub(crate) fn to_file(program: &'static str, path: &Path) -> Result<()> {
    let max = std::env::var(ENV_LOG_MAX)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|v| v.max(1024))
        .unwrap_or(LOG_MAX);
    let file =
        open(path).map_err(|e| Error::io(format!("cannot open log {}", path.display()), &e))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let capped = CappedFile {
        path: path.to_path_buf(),
        file,
        size,
        max,
    };
    let _ = builder(program, false)
        .target(env_logger::Target::Pipe(Box::new(capped)))
        .try_init();
    Ok(())
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Where a log goes once full: `.ID.log.1`.
pub(crate) fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file that starts afresh, keeping one older file, when a record
/// would take it past `max` bytes. env_logger writes each record with
/// one call, so records are never split between the two.
struct CappedFile {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
}

impl CappedFile {
    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.file = open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max {
            // Cannot rotate (the directory went away): keep appending.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
