//! Logging through `log` + `env_logger`, to stderr or to a file.
//!
//! A daemon has no terminal, so a daemonized binding logs to
//! `<runtime dir>/.ID.log` (appended, mode 0600); foreground commands log to
//! stderr. `RUST_LOG` sets the level; the default is `info`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

fn builder(program: &'static str) -> env_logger::Builder {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format(move |buf, record| {
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

/// Logs to stderr.
pub fn to_stderr(program: &'static str) {
    let _ = builder(program).try_init();
}

/// Logs to `path`, appending.
pub fn to_file(program: &'static str, path: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open log {}", path.display()), &e))?;
    let _ = builder(program)
        .target(env_logger::Target::Pipe(Box::new(file)))
        .try_init();
    Ok(())
}
