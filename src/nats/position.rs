//! What a JetStream consumer binding has written into its FIFO lately,
//! kept across its restarts.
//!
//! A message is acknowledged only once its line is in the FIFO; but the
//! acknowledgement is a message of its own, and a binding killed after
//! the write and before the acknowledgement reached the server gets the
//! line again when it restarts. So each line's stream sequence is also
//! written, right after the line, into `<runtime dir>/.ID.nats`: a
//! redelivered message found there was written already, and is only
//! acknowledged. The file is a ring indexed by sequence (one `pwrite` of
//! 8 bytes per line: the page cache keeps it through a SIGKILL); a
//! header names the stream and consumer, so another one starts afresh.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Slots of the ring: far more than a consumer's unacknowledged messages
/// ([`crate::nats::input::MAX_ACK_PENDING`]), so a sequence that can come
/// again is still in it.
const RING: u64 = 8192;
const HEADER: usize = 256;

pub(crate) struct Position {
    file: File,
    ring: Vec<u64>,
}

impl Position {
    /// Opens (or starts) the record of `stream`/`consumer` at `path`.
    pub(crate) fn open(path: &Path, stream: &str, consumer: &str) -> Result<Position> {
        let what = || format!("cannot open {}", path.display());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(what(), &e))?;
        let mut header = format!("fifobind-nats 1 {stream} {consumer}\n").into_bytes();
        header.resize(HEADER, b' ');
        let mut old = Vec::new();
        (&file)
            .read_to_end(&mut old)
            .map_err(|e| Error::io(what(), &e))?;
        let mut ring = vec![0u64; RING as usize];
        if old.len() == HEADER + 8 * RING as usize && old[..HEADER] == header[..] {
            for (slot, bytes) in ring.iter_mut().zip(old[HEADER..].chunks_exact(8)) {
                *slot = u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
            }
        } else {
            let mut fresh = header;
            fresh.resize(HEADER + 8 * RING as usize, 0);
            file.set_len(0).map_err(|e| Error::io(what(), &e))?;
            file.write_all_at(&fresh, 0)
                .map_err(|e| Error::io(what(), &e))?;
        }
        Ok(Position { file, ring })
    }

    /// Whether the line of stream sequence `seq` was written already.
    pub(crate) fn written(&self, seq: u64) -> bool {
        seq != 0 && self.ring[(seq % RING) as usize] == seq
    }

    /// The line of `seq` is in the FIFO.
    pub(crate) fn record(&mut self, seq: u64) {
        let slot = seq % RING;
        self.ring[slot as usize] = seq;
        // A failure costs only the protection against a duplicate.
        if let Err(e) = self
            .file
            .write_all_at(&seq.to_le_bytes(), HEADER as u64 + 8 * slot)
        {
            log::warn!("cannot record the position: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_sequence_survives_a_reopen_of_the_same_consumer_only() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.nats");
        let mut p = Position::open(&path, "S", "c").unwrap();
        assert!(!p.written(5));
        p.record(5);
        p.record(5 + RING * 3);
        drop(p);
        let p = Position::open(&path, "S", "c").unwrap();
        assert!(p.written(5 + RING * 3));
        assert!(!p.written(5), "overwritten by a later sequence");
        drop(p);
        let p = Position::open(&path, "S", "other").unwrap();
        assert!(!p.written(5 + RING * 3));
    }
}
