//! The stream protocol of protocol 2, between a sender (bind-output) and
//! a receiver (bind-input): what both ends need besides the sealed channel
//! of [`crate::secure`].
//!
//! A stream outlives its connections: after the handshake the sender names
//! its stream and what it knows is delivered, the receiver answers with how
//! much of that stream it has written into its FIFO, and the sender goes on
//! from there. So the receiver keeps one offset per stream (bounded), the
//! sender keeps what is unacknowledged (see [`crate::spool`]) and
//! reconnects with capped, jittered exponential backoff.
//!
//! ```text
//! receiver: FIFOBIND 2 STREAM <66 hex>          (greetings: see secure.rs)
//! sender:   FIFOBIND 2 STREAM <66 hex>
//! both:     Confirm
//! sender:   Line "STREAM <32 hex: stream id> <acked>"
//! receiver: Line "RESUME <offset>"
//! sender:   Data frames from <offset> on, then Close
//! receiver: Ack(<bytes written into the FIFO>), at least every second
//! ```

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::args::Key;
use crate::error::{Error, Result};

/// The most a `--key-fd` pipe may hold: a stream secret in hex is 64.
pub(crate) const MAX_KEY_FD: usize = 128;
/// The first delay before reconnecting; it doubles up to the cap.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(100);
/// A receiver acknowledges at least this often, so a silent sender side
/// can tell a live link from a dead one.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// Acknowledgements come after each FIFO write batch, but at most this
/// often unless [`ACK_BYTES`] have been written since the last one.
pub(crate) const ACK_EVERY: Duration = Duration::from_millis(100);
pub(crate) const ACK_BYTES: u64 = 64 * 1024;
/// How many streams a receiver remembers offsets of; the least recently
/// seen one is forgotten first.
pub(crate) const MAX_STREAMS: usize = 256;
/// The time a connection has to authenticate and name its stream.
pub(crate) const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// A stream's name: 32 hex digits, random for each sender process.
pub(crate) fn new_stream_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the system's random source works");
    hex::encode(bytes)
}

/// The sender's first line: `STREAM <id> <acked>`.
pub(crate) fn stream_line(id: &str, acked: u64) -> String {
    format!("STREAM {id} {acked}")
}

/// Reads a `STREAM <id> <acked>` line.
pub(crate) fn parse_stream_line(line: &str) -> std::result::Result<(String, u64), String> {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["STREAM", id, acked] if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
            let acked = acked
                .parse::<u64>()
                .map_err(|_| format!("bad offset in {line:?}"))?;
            Ok((id.to_ascii_lowercase(), acked))
        }
        _ => Err(format!(
            "expected \"STREAM <32 hex digits> <offset>\", got {:?}",
            line.chars().take(60).collect::<String>()
        )),
    }
}

/// Reads a `RESUME <offset>` line.
pub(crate) fn parse_resume_line(line: &str) -> std::result::Result<u64, String> {
    line.strip_prefix("RESUME ")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| {
            format!(
                "expected \"RESUME <offset>\", got {:?}",
                line.chars().take(60).collect::<String>()
            )
        })
}

/// Reads the secret from an inherited descriptor (a pipe the parent
/// writes it into and closes): to end-of-file, at most [`MAX_KEY_FD`]
/// bytes, a trailing newline dropped; the descriptor is closed after.
pub(crate) fn read_key_fd(fd: RawFd) -> Result<Key> {
    if fd <= 2 {
        return Err(Error::usage(format!(
            "--key-fd {fd}: not a descriptor of its own"
        )));
    }
    // SAFETY: only borrowed for this check; ownership is taken below.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::fcntl::fcntl(
        borrowed,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| {
        Error::usage(format!(
            "--key-fd {fd}: not an open descriptor ({})",
            e.desc()
        ))
    })?;
    // SAFETY: open (fcntl succeeded) and inherited for this use alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned);
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(MAX_KEY_FD + 1));
    (&mut file)
        .take(MAX_KEY_FD as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("cannot read the key from descriptor {fd}"), &e))?;
    drop(file);
    if bytes.len() > MAX_KEY_FD {
        return Err(Error::usage(format!(
            "--key-fd {fd}: more than {MAX_KEY_FD} bytes"
        )));
    }
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        log::warn!("cannot make the process undumpable: {}", e.desc());
    }
    Key::new(bytes[..end].to_vec()).map_err(|e| Error::usage(format!("--key-fd {fd}: {e}")))
}

/// Capped exponential backoff with jitter: each delay is drawn from the
/// upper half of the current step, so many senders cut at once do not
/// come back in step, and none waits longer than the cap.
pub(crate) struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Backoff {
        Backoff {
            step: BACKOFF_START.min(max),
            max,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).expect("the system's random source works");
        let frac = 0.5 + 0.5 * (u32::from_le_bytes(r) as f64 / u32::MAX as f64);
        let delay = self.step.mul_f64(frac);
        self.step = (self.step * 2).min(self.max);
        delay
    }

    /// A connection worked: start again from the first step.
    pub(crate) fn reset(&mut self) {
        self.step = BACKOFF_START.min(self.max);
    }
}

/// What a receiver knows of one stream.
pub(crate) struct StreamState {
    /// Bytes of this stream written into the FIFO.
    pub(crate) written: u64,
    /// The token of the connection carrying it now, if any.
    pub(crate) conn: Option<u64>,
    /// The sender said Close and everything was written.
    pub(crate) ended: bool,
    seen: Instant,
}

/// The receiver's streams, bounded: the least recently seen stream with
/// no connection is forgotten when the table is full (a sender that comes
/// back after that is taken for a new stream at its own acknowledged
/// offset, which is all it can be told).
#[derive(Default)]
pub(crate) struct Streams {
    map: HashMap<String, StreamState>,
}

impl Streams {
    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut StreamState> {
        self.map.get_mut(id)
    }

    /// The stream `id` as a connection names it, created at `acked` when
    /// unknown.
    pub(crate) fn adopt(&mut self, id: &str, acked: u64) -> &mut StreamState {
        if !self.map.contains_key(id) && self.map.len() >= MAX_STREAMS {
            let oldest = self
                .map
                .iter()
                .filter(|(_, s)| s.conn.is_none())
                .min_by_key(|(_, s)| s.seen)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        let state = self.map.entry(id.to_string()).or_insert(StreamState {
            written: acked,
            conn: None,
            ended: false,
            seen: Instant::now(),
        });
        state.seen = Instant::now();
        state
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Parses a size: bytes, or with a suffix K, M or G (powers of 1024).
pub(crate) fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let bad = || "a size is a number of bytes, optionally with K, M or G (e.g. 8M)".to_string();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num.parse().map_err(|_| bad())?;
    match n.checked_mul(mult) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_refuse() {
        let id = new_stream_id();
        assert_eq!(id.len(), 32);
        assert_eq!(
            parse_stream_line(&stream_line(&id, 42)).unwrap(),
            (id.clone(), 42)
        );
        assert!(parse_stream_line("STREAM abc 1").is_err());
        assert!(parse_stream_line(&format!("STREAM {id} -1")).is_err());
        assert_eq!(parse_resume_line("RESUME 7").unwrap(), 7);
        assert!(parse_resume_line("RESUME x").is_err());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= BACKOFF_START);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[9] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }

    #[test]
    fn streams_table_is_bounded() {
        let mut s = Streams::default();
        for i in 0..MAX_STREAMS + 10 {
            s.adopt(&format!("{i:032x}"), 0);
        }
        assert_eq!(s.len(), MAX_STREAMS);
        assert_eq!(s.adopt("ab", 5).written, 5);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert!(parse_size("0").is_err() && parse_size("M").is_err());
    }
}
