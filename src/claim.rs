//! Claims: who owns a name in the runtime directory.
//!
//! An owner (a binding, a pool, a master) holds an exclusive `flock` on a
//! dot-file `.NAME.lock` for as long as it lives, and writes its
//! `PID START` into it. The kernel drops the lock when the owner dies, even
//! by SIGKILL, so "is the lock free?" is an exact staleness test that no
//! reused PID can fool; the recorded identity is only for messages and for
//! signalling the owner.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::process::ProcessId;

/// A held claim. Dropping it releases the lock but leaves the file;
/// [`Claim::release`] removes it first.
pub(crate) struct Claim {
    path: PathBuf,
    lock: Flock<File>,
    /// Whether the file may hold a previous owner's record (it was not
    /// empty when claimed, or has been written since).
    written: bool,
}

/// Why a claim was not granted.
pub(crate) enum Refused {
    /// Somebody holds it: the recorded owner, if one is written yet.
    Held(Option<ProcessId>),
    Io(io::Error),
}

/// A sweeper holds a stale claim for microseconds; a claimant that finds
/// the lock busy retries this long before calling the name "in use".
const BUSY_RETRY: Duration = Duration::from_millis(200);

impl Claim {
    /// Takes the claim at `path` without waiting for a live owner.
    pub(crate) fn take(path: &Path) -> Result<Claim, Refused> {
        let deadline = Instant::now() + BUSY_RETRY;
        loop {
            match Claim::lock(path, true) {
                Err(Refused::Held(owner))
                    if Instant::now() < deadline && !owner.is_some_and(|o| o.is_alive()) =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// Takes the claim at `path` if it is free this instant. A refusal
    /// does not say who holds it (the sweep, which asks this of every
    /// name, has no use for it).
    pub(crate) fn take_now(path: &Path) -> Result<Claim, Refused> {
        Claim::lock(path, false)
    }

    fn lock(path: &Path, want_owner: bool) -> Result<Claim, Refused> {
        loop {
            let file = open_private(path).map_err(Refused::Io)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let owner = if want_owner {
                        read_owner(&mut file)
                    } else {
                        None
                    };
                    return Err(Refused::Held(owner));
                }
                Err((_, errno)) => return Err(Refused::Io(errno.into())),
            };
            // The previous owner may have unlinked the file between our
            // open and our lock: then we locked a ghost. Try again.
            let held = lock.metadata().map_err(Refused::Io)?;
            match fs::symlink_metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Claim {
                        path: path.to_path_buf(),
                        lock,
                        written: held.len() > 0,
                    });
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Refused::Io(e)),
            }
        }
    }

    /// Records `owner` as the holder (after a fork the holder changes).
    pub(crate) fn record(&mut self, owner: ProcessId) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file: &mut File = &mut self.lock;
        // A fresh claim file is empty: no truncation (a system call, and
        // on ext4 a truncation to 0 makes the close flush the file to
        // disk), and a positioned write instead of a seek and a write.
        if self.written {
            file.set_len(0)?;
        }
        file.write_all_at(format!("{owner}\n").as_bytes(), 0)?;
        self.written = true;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the claim file, then lets the lock go.
    pub(crate) fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Opens, creating it if need be, a bookkeeping file of ours: mode 0600,
/// never through a symbolic link, not inherited by children.
pub(crate) fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn read_owner(file: &mut File) -> Option<ProcessId> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The recorded owner of a claim file, if it can be read.
pub(crate) fn owner(path: &Path) -> Option<ProcessId> {
    read_owner(&mut File::open(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_refused_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.lock");
        let mut first = Claim::take(&path).ok().unwrap();
        first.record(ProcessId::current()).unwrap();
        match Claim::take(&path) {
            Err(Refused::Held(Some(owner))) => assert_eq!(owner, ProcessId::current()),
            _ => panic!("a held claim was granted twice"),
        }
        first.release();
        assert!(!path.exists());
        assert!(Claim::take(&path).is_ok());
    }

    /// A claim taken over from a dead owner replaces its longer record
    /// whole (the truncation a fresh, empty claim file goes without).
    #[test]
    fn a_longer_stale_record_is_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.lock");
        fs::write(&path, "2147483647 18446744073709551615\n").unwrap();
        let mut claim = Claim::take(&path).ok().unwrap();
        let me = ProcessId::current();
        claim.record(me).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{me}\n"));
        assert_eq!(owner(&path), Some(me));
    }
}
