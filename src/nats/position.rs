//! What a JetStream consumer binding has written into its FIFO lately,
//! kept across its restarts, and the one way of writing a line that
//! cannot be half recorded.
//!
//! A message is acknowledged only once its line is in the FIFO; but the
//! acknowledgement is a message of its own, and a binding killed after
//! the write and before the acknowledgement reached the server gets the
//! line again when it restarts; so does a server restarted before it
//! stored the acknowledgements. So each line's message (its stream
//! sequence and the time the stream stored it) is also recorded in
//! `<runtime dir>/.ID.nats`, a ring indexed by sequence: a message found
//! there was written already, and is only acknowledged. A header names
//! the stream and consumer (and when each was made), so another one, or
//! the same name made again, starts afresh.
//!
//! Recording after a `write(2)` leaves a window: a SIGKILL that comes
//! while the write runs takes effect as it returns, before the record —
//! and the line comes twice. So the line is not written, it is spliced:
//! its bytes are put into a data area of the same file (mapped shared,
//! so plain stores reach the page cache, which a SIGKILL does not undo)
//! and moved into the FIFO by `splice(2)` from there, with the file
//! offset given by pointer into the mapping. The kernel stores the
//! advanced offset back through that pointer before the system call
//! returns, so how many bytes of the line are in the FIFO and what the
//! file says are one event: a restarted binding reads, from the
//! offset, exactly how much of the last line went in.
//!
//! A spliced buffer is a reference to the page, not a copy: the data
//! area is a ring that is written over only where the FIFO has been read
//! past (see [`crate::nats::input`]), and each start of a binding makes
//! the file anew (a new inode), so the pages that the FIFO of a killed
//! binding still holds stay as they were for its reader.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Slots of the ring: far more than a consumer's unacknowledged messages
/// ([`crate::nats::input::MAX_ACK_PENDING`]), so a sequence that can come
/// again is still in it — and, as a server restarted may have forgotten
/// the acknowledgements of the last seconds before it stopped and deliver
/// those messages again as new, far more than a consumer takes in those.
const RING: u64 = 65536;
const HEADER: usize = 256;
/// Where the ring and the intents end and the data area begins: a
/// multiple of any page size, so no data page holds bookkeeping.
const META: u64 = 17 * 64 * 1024;
/// The data area: twice the largest pipe, so that a whole pipe's worth
/// can be unread while the next line is put in.
pub(crate) const DATA: u64 = 2 * crate::fifo::PIPE_CAPACITY as u64;
/// Lines spliced at once, at most (one intent's entries).
pub(crate) const MAX_LINES: usize = 256;
/// Offsets of the intents: which one is current, then two of them,
/// written in turn so that switching from one to the next is a single
/// store. An intent is `start` (the file offset of its first byte),
/// `cursor` (the offset the kernel advances), a count, and that many
/// entries (a [`Stored`], the file offset at which its line ends).
const CURRENT: u64 = HEADER as u64 + 16 * RING;
const INTENT: u64 = 24 + 24 * MAX_LINES as u64;
const INTENTS: u64 = CURRENT + 8;
const START: u64 = 0;
const CURSOR: u64 = 8;
const COUNT: u64 = 16;
const ENTRIES: u64 = 24;
const LEN: u64 = META + DATA;

/// A message as its stream stores it: its sequence, and when it was
/// stored (nanoseconds). The two tell it from another that took the same
/// sequence after a server lost the first one, or in a stream made
/// again.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) stamp: u64,
}

pub(crate) struct Position {
    file: File,
    map: *mut u8,
    /// The line the previous binding was splicing when it died, and how
    /// many of its bytes it had not put into the FIFO yet.
    resumed: Option<(Stored, u64)>,
}

fn header(names: &str, made: &str) -> Vec<u8> {
    let mut header = format!("fifobind-nats 3 {names} {made}\n").into_bytes();
    header.resize(HEADER, b' ');
    header
}

impl Position {
    /// Opens the record at `path` of the consumer that `names` (stream,
    /// when it was made, consumer) and `made` (when the consumer was made)
    /// tell (made anew, carrying over what an old one of the same consumer
    /// says, or of the one made at `carried` that the binding replaced).
    pub(crate) fn open(
        path: &Path,
        names: &str,
        made: &str,
        carried: Option<&str>,
    ) -> Result<Position> {
        const _: () = assert!(INTENTS + 2 * INTENT <= META);
        let what = |p: &Path| format!("cannot open {}", p.display());
        let header = header(names, made);
        let mut ring = vec![0u8; 16 * RING as usize];
        let mut resumed = None;
        let old = old_record(path, &header).or_else(|e| match carried {
            Some(carried) => old_record(path, &self::header(names, carried)),
            None => Err(e),
        });
        if let Ok(old) = old {
            let word = |at: u64| {
                let at = at as usize;
                u64::from_le_bytes(old[at..at + 8].try_into().expect("8 bytes"))
            };
            let stored = |at: u64| Stored {
                seq: word(at),
                stamp: word(at + 8),
            };
            ring.copy_from_slice(&old[HEADER..CURRENT as usize]);
            let mut record = |m: Stored| {
                let at = 16 * (m.seq % RING) as usize;
                ring[at..at + 8].copy_from_slice(&m.seq.to_le_bytes());
                ring[at + 8..at + 16].copy_from_slice(&m.stamp.to_le_bytes());
            };
            // The lines of the last splice: those it put in whole are
            // written; one it cut is resumed where it stopped.
            let intent = INTENTS + INTENT * (word(CURRENT) & 1);
            let cursor = word(intent + CURSOR);
            let mut from = word(intent + START);
            for i in 0..word(intent + COUNT).min(MAX_LINES as u64) {
                let m = stored(intent + ENTRIES + 24 * i);
                let end = word(intent + ENTRIES + 24 * i + 16);
                if end <= cursor {
                    record(m);
                } else {
                    if from < cursor {
                        resumed = Some((m, end - cursor));
                    }
                    break;
                }
                from = end;
            }
        }
        // A new inode: the old one's data pages may be in a FIFO still.
        let fresh = new_path(path);
        let _ = std::fs::remove_file(&fresh);
        let file = crate::claim::open_private(&fresh).map_err(|e| Error::io(what(&fresh), &e))?;
        let written = file
            .set_len(LEN)
            .and_then(|()| file.write_all_at(&header, 0))
            .and_then(|()| file.write_all_at(&ring, HEADER as u64))
            .and_then(|()| std::fs::rename(&fresh, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&fresh);
            return Err(Error::io(format!("cannot write {}", path.display()), &e));
        }
        // SAFETY: a shared mapping of a file we just sized to LEN; it is
        // unmapped on drop and only reached through `Position`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(Error::io(what(path), &io::Error::last_os_error()));
        }
        Ok(Position {
            file,
            map: map.cast(),
            resumed,
        })
    }

    fn word(&self, offset: u64) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= META);
        // SAFETY: aligned (the mapping is page-aligned, the offset a
        // multiple of 8), inside the mapping, and shared with the kernel
        // only through atomic accesses and the splice below.
        unsafe { AtomicU64::from_ptr(self.map.add(offset as usize).cast()) }
    }

    fn intent(&self, which: u64, word: u64) -> &AtomicU64 {
        self.word(INTENTS + INTENT * (which & 1) + word)
    }

    /// Whether the line of message `m` was written already.
    pub(crate) fn written(&self, m: Stored) -> bool {
        let at = HEADER as u64 + 16 * (m.seq % RING);
        m.seq != 0
            && self.word(at).load(Ordering::Acquire) == m.seq
            && self.word(at + 8).load(Ordering::Acquire) == m.stamp
    }

    /// If `m` is the line a killed binding was splicing: how many of
    /// its bytes it had not put into the FIFO (asked once).
    pub(crate) fn resumed(&mut self, m: Stored) -> Option<u64> {
        match self.resumed {
            Some((r, rest)) if r == m => {
                self.resumed = None;
                Some(rest)
            }
            _ => None,
        }
    }

    /// The whole line of `m` is in the FIFO.
    pub(crate) fn record(&mut self, m: Stored) {
        let at = HEADER as u64 + 16 * (m.seq % RING);
        // The sequence last: a line is written once both are there.
        self.word(at).store(0, Ordering::Relaxed);
        self.word(at + 8).store(m.stamp, Ordering::Relaxed);
        self.word(at).store(m.seq, Ordering::Release);
    }

    /// Puts `bytes` into the data area at `at` (taken modulo [`DATA`];
    /// the caller keeps them from crossing its end), to be spliced from
    /// there. `lines` are the lines they hold: each one's message, and
    /// where in `bytes` it ends (past their end for a line of which they
    /// are a first part). Nothing reaches the FIFO yet.
    pub(crate) fn put(&mut self, at: u64, bytes: &[u8], lines: &[(Stored, u64)]) {
        let offset = at % DATA;
        assert!(offset + bytes.len() as u64 <= DATA && lines.len() <= MAX_LINES);
        // SAFETY: inside the data area of the mapping, which no reference
        // points into; the FIFO's pages of it are never these (the
        // caller's ring keeps them apart).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.add((META + offset) as usize),
                bytes.len(),
            );
        }
        let next = self.word(CURRENT).load(Ordering::Relaxed).wrapping_add(1);
        let start = META + offset;
        for (i, &(m, end)) in lines.iter().enumerate() {
            let entry = ENTRIES + 24 * i as u64;
            self.intent(next, entry).store(m.seq, Ordering::Relaxed);
            self.intent(next, entry + 8)
                .store(m.stamp, Ordering::Relaxed);
            self.intent(next, entry + 16)
                .store(start + end, Ordering::Relaxed);
        }
        self.intent(next, COUNT)
            .store(lines.len() as u64, Ordering::Relaxed);
        self.intent(next, START).store(start, Ordering::Relaxed);
        self.intent(next, CURSOR).store(start, Ordering::Relaxed);
        // The switch, one store: a binding killed before it leaves the
        // previous intent in force, whole.
        self.word(CURRENT).store(next, Ordering::Release);
    }

    /// Moves up to `len` bytes of what [`Position::put`] put last, from
    /// where the previous splice stopped, into `fifo` without waiting.
    pub(crate) fn splice(&mut self, fifo: RawFd, len: usize) -> io::Result<usize> {
        let current = self.word(CURRENT).load(Ordering::Relaxed);
        let cursor = self.intent(current, CURSOR).as_ptr();
        // SAFETY: `cursor` is an aligned 8-byte word of our mapping; the
        // kernel reads the offset from it and stores the advanced offset
        // back, in this call. The range it reads is inside the file.
        let n = unsafe {
            libc::splice(
                self.file.as_raw_fd(),
                cursor.cast::<libc::loff_t>(),
                fifo,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Drop for Position {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, of that length.
        unsafe { libc::munmap(self.map.cast(), LEN as usize) };
    }
}

/// The contents of an old record at `path` if it is one of this header.
fn old_record(path: &Path, header: &[u8]) -> io::Result<Vec<u8>> {
    let mut old = vec![0u8; META as usize];
    crate::claim::open_private(path)?.read_exact(&mut old)?;
    if old[..HEADER] != header[..] {
        return Err(io::ErrorKind::InvalidData.into());
    }
    Ok(old)
}

fn new_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn m(seq: u64) -> Stored {
        Stored {
            seq,
            stamp: 1000 + seq,
        }
    }

    #[test]
    fn a_recorded_message_survives_a_reopen_of_the_same_consumer_only() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.nats");
        let mut p = Position::open(&path, "S 1 c", "1", None).unwrap();
        assert!(!p.written(m(5)));
        p.record(m(5));
        p.record(m(5 + RING * 3));
        drop(p);
        let p = Position::open(&path, "S 1 c", "1", None).unwrap();
        assert!(p.written(m(5 + RING * 3)));
        assert!(!p.written(m(5)), "overwritten by a later sequence");
        let again = Stored {
            seq: 5 + RING * 3,
            stamp: 7,
        };
        assert!(!p.written(again), "the same sequence, another message");
        drop(p);
        let p = Position::open(&path, "S 1 c", "2", Some("1")).unwrap();
        assert!(p.written(m(5 + RING * 3)), "the binding made it again");
        drop(p);
        let p = Position::open(&path, "S 1 c", "3", None).unwrap();
        assert!(!p.written(m(5 + RING * 3)), "the consumer was made again");
        drop(p);
        let p = Position::open(&path, "S 1 other", "3", None).unwrap();
        assert!(!p.written(m(5 + RING * 3)));
    }

    #[test]
    fn the_bytes_of_a_line_spliced_are_known_after_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.nats");
        let fifo = tmp.path().join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .unwrap()
        };
        let mut reader = open(false);
        let writer = open(true);
        let reopen = || Position::open(&path, "S 1 c", "1", None).unwrap();
        let mut p = reopen();
        p.put(DATA - 8, b"a\nhello ", &[(m(6), 2), (m(7), 11)]);
        assert_eq!(p.splice(writer.as_raw_fd(), 8).unwrap(), 8);
        p.put(0, b"wo\nb\n", &[(m(7), 3), (m(8), 5)]);
        assert_eq!(p.splice(writer.as_raw_fd(), 1).unwrap(), 1);
        // As a SIGKILL leaves it: no record, the file as it is.
        std::mem::forget(p);
        let mut p = reopen();
        assert_eq!(p.resumed(m(8)), None, "not begun");
        assert!(!p.written(m(8)));
        assert_eq!(p.resumed(m(7)), Some(2), "6 bytes, then 1 of the next put");
        assert!(!p.written(m(7)));
        // The FIFO still reads what was spliced, though the file is new.
        p.put(0, b"XXXXXXXXXXXX", &[(m(9), 12)]);
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 9);
        assert_eq!(&buf[..9], b"a\nhello w");
        assert_eq!(p.splice(writer.as_raw_fd(), 12).unwrap(), 12);
        std::mem::forget(p);
        let mut p = reopen();
        assert!(p.written(m(9)), "spliced whole, if not recorded");
        assert_eq!(p.resumed(m(9)), None);
    }
}
