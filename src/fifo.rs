//! The named pipe a binding exposes, created and held safely.
//!
//! A binding holds its own FIFO open at both ends, through two
//! descriptors: a read end and a write end. Holding both, opening never
//! blocks, the binding's readers (bind-input) never see end-of-file
//! between lines, and its writers (bind-output) may open and close it at
//! will. Two descriptors rather than one read-write one, so that a
//! bind-output that is told its writers are done can let go of its write
//! end and read on to end-of-file: the moment the last writer, a child of
//! the daemon included, has closed it. The FIFO is mode 0600 whatever the
//! umask, and a symlink or regular file in its place is refused rather
//! than followed or clobbered.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;

use crate::error::{Error, ExitStatus, Result};

/// Largest pipe capacity asked for; 1 MiB is the default
/// `/proc/sys/fs/pipe-max-size`, the most an unprivileged user may set.
/// Smaller is slower: a 256 KiB FIFO took bind-output 4 splices per MiB
/// instead of 2, and 1.3-1.5 times the CPU.
pub(crate) const PIPE_CAPACITY: usize = 1 << 20;

pub(crate) struct Fifo {
    path: PathBuf,
    reader: File,
    /// Ours, so that neither end ever waits or sees end-of-file; `None`
    /// once [`Fifo::close_writer`] let it go.
    writer: Option<File>,
    ino: u64,
    capacity: usize,
}

impl Fifo {
    /// Creates the FIFO at `path` and opens both its ends, non-blocking.
    /// The caller holds the claim on the name, so a FIFO already there is
    /// a stale one and is replaced.
    pub(crate) fn create(path: &Path) -> Result<Fifo> {
        let what = || format!("cannot create the FIFO {}", path.display());
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_fifo() => {
                fs::remove_file(path).map_err(|e| Error::io(what(), &e))?
            }
            Ok(meta) => {
                let kind = if meta.file_type().is_symlink() {
                    "a symbolic link"
                } else if meta.is_dir() {
                    "a directory"
                } else {
                    "a file that is not a FIFO"
                };
                return Err(Error::new(
                    ExitStatus::CantCreate,
                    format!("{}: {kind} is in the way", what()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(what(), &e)),
        }
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600))
            .map_err(|e| Error::io(what(), &e.into()))?;
        let fifo = Fifo::open_created(path).inspect_err(|_| {
            let _ = fs::remove_file(path);
        })?;
        Ok(fifo)
    }

    fn open_created(path: &Path) -> Result<Fifo> {
        let what = || format!("cannot open the FIFO {}", path.display());
        let open = |options: &mut OpenOptions| {
            options
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| Error::io(what(), &e))
        };
        // The read end first: a non-blocking open for writing fails
        // (ENXIO) while the FIFO has no reader.
        let file = open(OpenOptions::new().read(true))?;
        let meta = file.metadata().map_err(|e| Error::io(what(), &e))?;
        if !meta.file_type().is_fifo() || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(Error::new(
                ExitStatus::NoPerm,
                format!("{}: replaced by something else", what()),
            ));
        }
        // mkfifo honours the umask; the mode must be exact.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(what(), &e))?;
        let writer = open(OpenOptions::new().write(true))?;
        let same = writer
            .metadata()
            .is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev());
        if !same {
            return Err(Error::new(
                ExitStatus::NoPerm,
                format!("{}: replaced by something else", what()),
            ));
        }
        let capacity = grow(&file);
        Ok(Fifo {
            path: path.to_path_buf(),
            reader: file,
            writer: Some(writer),
            ino: meta.ino(),
            capacity,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The write end, which bind-input writes into. Gone after
    /// [`Fifo::close_writer`], which only bind-output calls.
    pub(crate) fn file(&self) -> &File {
        self.writer
            .as_ref()
            .expect("the write end is used only while held")
    }

    /// The read end, which bind-output reads from.
    pub(crate) fn reader(&self) -> &File {
        &self.reader
    }

    /// Lets go of our write end: once every other writer has closed the
    /// FIFO too, the read end reads end-of-file.
    pub(crate) fn close_writer(&mut self) {
        self.writer = None;
    }

    /// The pipe's capacity in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes written into the pipe and not read yet.
    pub(crate) fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer.
        let rc = unsafe { libc::ioctl(self.reader.as_raw_fd(), libc::FIONREAD, &mut n) };
        if rc < 0 { 0 } else { n as usize }
    }

    /// Removes the FIFO from the directory, if it is still ours.
    pub(crate) fn remove(&self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && meta.ino() == self.ino
        {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The write end, as [`Fifo::file`]: what bind-input polls for room.
impl AsFd for Fifo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file().as_fd()
    }
}

/// Raises the pipe's capacity as far as allowed, so whole lines fit and a
/// slow reader lags by more before the senders are held back.
fn grow(file: &File) -> usize {
    let fd = file.as_raw_fd();
    let mut size = PIPE_CAPACITY;
    while size >= 65536 {
        // SAFETY: plain fcntl on a descriptor we own.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int) };
        if rc > 0 {
            return rc as usize;
        }
        size /= 2;
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    if rc > 0 { rc as usize } else { 65536 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_is_0600_despite_umask_and_refuses_files_in_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0));
        let fifo = Fifo::create(&path);
        nix::sys::stat::umask(old);
        let fifo = fifo.unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(fifo.capacity() >= 65536);
        fifo.remove();
        assert!(!path.exists());

        fs::write(&path, b"precious").unwrap();
        assert_eq!(
            Fifo::create(&path).err().unwrap().status,
            ExitStatus::CantCreate
        );
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn reader_sees_end_of_file_once_every_writer_closed() {
        use std::io::{Read, Write};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let mut fifo = Fifo::create(&path).unwrap();
        let mut other = OpenOptions::new().write(true).open(&path).unwrap();
        let mut buf = [0u8; 16];
        // Our own write end held: no data is "would block", not the end.
        let err = fifo.reader().read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        fifo.close_writer();
        other.write_all(b"late\n").unwrap();
        assert_eq!(fifo.reader().read(&mut buf).unwrap(), 5);
        let err = fifo.reader().read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "a writer is left");
        drop(other);
        assert_eq!(fifo.reader().read(&mut buf).unwrap(), 0);
        fifo.remove();
    }
}
