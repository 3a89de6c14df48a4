//! The sender's spool of a resumable stream: what it has taken from its
//! FIFO and the receiver has not yet acknowledged.
//!
//! Reconnecting alone does not survive a broken link: whatever sat in the
//! sender's kernel buffer when it broke is gone. So a sender keeps every
//! byte until the receiver acknowledges that it is in its FIFO, and after
//! a reconnect resumes at the receiver's offset. Offsets count the
//! stream's bytes from its start; the spool holds `[acked, end)`, of which
//! `[acked, sent)` is on the wire and `[sent, end)` not yet sent.
//!
//! The spool is bounded. When it is full the policy is the user's: block
//! (the binding stops reading its FIFO, so writers block: nothing lost),
//! or drop the oldest lines not yet sent (for stale real-time data),
//! counted so the log can say how many. Lines already sent are never
//! dropped: the receiver may have them, and offsets must stay true.

use std::collections::VecDeque;

/// What to do when the spool is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Full {
    Block,
    DropOldest,
}

pub(crate) struct Spool {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]`: everything before it is acknowledged.
    acked: u64,
    /// Offset of the first byte not yet sent on this connection.
    sent: u64,
    limit: usize,
    policy: Full,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl Spool {
    pub(crate) fn new(limit: usize, policy: Full) -> Spool {
        Spool {
            buf: VecDeque::new(),
            acked: 0,
            sent: 0,
            limit: limit.max(1),
            policy,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// Offset just past the last byte taken in.
    pub(crate) fn end(&self) -> u64 {
        self.acked + self.buf.len() as u64
    }

    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    /// Offset just past the last byte sent on this connection.
    pub(crate) fn sent_offset(&self) -> u64 {
        self.sent
    }

    pub(crate) fn unacked(&self) -> usize {
        self.buf.len()
    }

    /// Lines and bytes dropped so far under [`Full::DropOldest`].
    pub(crate) fn dropped(&self) -> (u64, u64) {
        (self.dropped_lines, self.dropped_bytes)
    }

    /// How many bytes may be taken in now. Under [`Full::Block`] this is 0
    /// when full, and the caller stops reading its FIFO; under
    /// [`Full::DropOldest`] it is the room that dropping can make too.
    pub(crate) fn room(&self) -> usize {
        let free = self.limit.saturating_sub(self.buf.len());
        match self.policy {
            Full::Block => free,
            Full::DropOldest => match self.droppable() {
                // Only a line longer than the spool is left to cut.
                0 if free == 0 => (self.end() - self.sent) as usize,
                d => free + d,
            },
        }
    }

    /// The unsent bytes that dropping can take: whole lines, from the
    /// first that starts after what is on the wire to the last newline.
    /// (Dropping part of a line would glue its rest onto another line.)
    fn droppable(&self) -> usize {
        let Some(start) = self.first_unsent_line() else {
            return 0;
        };
        self.buf
            .range(start..)
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
    }

    /// Where the first line that starts at or after `sent` begins.
    fn first_unsent_line(&self) -> Option<usize> {
        let start = (self.sent - self.acked) as usize;
        if start > 0 && self.buf[start - 1] != b'\n' {
            let i = self.buf.range(start..).position(|&b| b == b'\n')?;
            return Some(start + i + 1);
        }
        Some(start)
    }

    /// Takes in bytes read from the FIFO: at most [`Spool::room`] of them.
    /// Under [`Full::DropOldest`] it first drops the oldest unsent whole
    /// lines (or, when one unsent line fills the spool, unsent bytes) to
    /// make room.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        assert!(bytes.len() <= self.room(), "pushed past the spool's room");
        // Under DropOldest the spool may go over its limit by the rest of
        // one line half on the wire (see `drop_unsent`).
        let over = (self.buf.len() + bytes.len()).saturating_sub(self.limit);
        if over > 0 {
            self.drop_unsent(over);
        }
        self.buf.extend(bytes);
    }

    /// Drops at least `need` of the oldest unsent bytes, whole lines where
    /// it can. The dropped bytes were never sent, so they leave the
    /// stream: later bytes take their offsets.
    fn drop_unsent(&mut self, need: usize) {
        // Data frames end anywhere: the rest of a line whose start is on
        // the wire is kept, or the receiver would glue two lines together.
        let Some(start) = self.first_unsent_line() else {
            return;
        };
        let unsent = self.buf.len() - start;
        let mut cut = 0;
        let mut lines = 0;
        // Whole lines from the oldest unsent one on, until enough.
        for (i, &b) in self.buf.range(start..).enumerate() {
            if b == b'\n' {
                cut = i + 1;
                lines += 1;
                if cut >= need {
                    break;
                }
            }
        }
        if cut < need {
            // No newline far enough: drop bytes of the line too.
            cut = need.min(unsent);
            lines += 1;
        }
        self.buf.drain(start..start + cut);
        self.dropped_lines += lines;
        self.dropped_bytes += cut as u64;
    }

    /// The next bytes to send, at most `max`, as up to two slices.
    pub(crate) fn unsent(&self, max: usize) -> (&[u8], &[u8]) {
        let start = (self.sent - self.acked) as usize;
        let (a, b) = self.buf.as_slices();
        let (a, b) = if start < a.len() {
            (&a[start..], b)
        } else {
            (&b[..0], &b[start - a.len()..])
        };
        let na = a.len().min(max);
        let nb = b.len().min(max - na);
        (&a[..na], &b[..nb])
    }

    /// Marks `n` more bytes as sent.
    pub(crate) fn sent(&mut self, n: usize) {
        self.sent += n as u64;
        assert!(self.sent <= self.end(), "sent past the end");
    }

    /// The receiver has everything before `offset` in its FIFO: forget it.
    /// An offset outside `[acked, sent]` is a lie or a bug, and refused.
    pub(crate) fn ack(&mut self, offset: u64) -> Result<(), String> {
        if offset < self.acked || offset > self.sent {
            return Err(format!(
                "acknowledgement of offset {offset} outside {}..={}",
                self.acked, self.sent
            ));
        }
        self.buf.drain(..(offset - self.acked) as usize);
        self.acked = offset;
        Ok(())
    }

    /// After a reconnect: the receiver has everything before `offset`, so
    /// sending starts again there.
    /// An offset outside `[acked, sent]` is refused, as for an ack.
    pub(crate) fn resume(&mut self, offset: u64) -> Result<(), String> {
        self.ack(offset)?;
        self.sent = offset;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsent(s: &Spool) -> Vec<u8> {
        let (a, b) = s.unsent(usize::MAX);
        [a, b].concat()
    }

    #[test]
    fn keeps_until_acked_and_resumes_where_the_receiver_is() {
        let mut s = Spool::new(100, Full::Block);
        s.push(b"one\ntwo\nthree\n");
        assert_eq!(unsent(&s), b"one\ntwo\nthree\n");
        s.sent(14);
        assert!(unsent(&s).is_empty());
        s.ack(4).unwrap();
        // The link broke; the receiver says it has 8 bytes.
        s.resume(8).unwrap();
        assert_eq!(unsent(&s), b"three\n");
        assert_eq!(s.acked(), 8);
        assert!(s.ack(3).is_err(), "an ack may not go back");
        assert!(s.ack(20).is_err(), "nor past what was sent");
        assert!(s.resume(30).is_err());
    }

    #[test]
    fn block_policy_stops_taking_when_full() {
        let mut s = Spool::new(10, Full::Block);
        s.push(b"0123456789");
        assert_eq!(s.room(), 0);
        s.sent(10);
        s.ack(4).unwrap();
        assert_eq!(s.room(), 4);
    }

    #[test]
    fn drop_oldest_drops_whole_unsent_lines_and_counts_them() {
        let mut s = Spool::new(12, Full::DropOldest);
        s.push(b"aa\nbb\n");
        s.sent(3); // "aa\n" is on the wire: never dropped
        s.push(b"cc\ndd\n");
        assert_eq!(s.room(), 9);
        s.push(b"ee\nff\n");
        // "bb" and "cc" made room; "aa", on the wire, stays.
        assert_eq!(unsent(&s), b"dd\nee\nff\n");
        assert_eq!(s.dropped(), (2, 6));
        assert_eq!(s.end(), 12);
        s.sent(9);
        s.ack(12).unwrap();
        assert_eq!(s.unacked(), 0);
    }

    #[test]
    fn drop_oldest_keeps_the_rest_of_a_line_half_sent() {
        let mut s = Spool::new(20, Full::DropOldest);
        s.push(b"aaaa\nbbbbbb");
        s.sent(7); // "aaaa\nbb" on the wire
        s.push(b"b\ncc\n");
        s.push(b"dd\nee\n");
        let (a, b) = s.unsent(usize::MAX);
        let rest = [a, b].concat();
        // The rest of "bbbbbbb\n" is kept whole; "cc" went for room.
        assert!(
            rest.starts_with(b"bbbbb\ndd\n"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
        assert!(!rest.windows(2).any(|w| w == b"cc"));
    }

    #[test]
    fn drop_oldest_never_cuts_a_line_read_in_part() {
        let mut s = Spool::new(10, Full::DropOldest);
        s.push(b"aa\nbbbb");
        // Room: the free 3 bytes and the whole line "aa\n", not "bbbb".
        assert_eq!(s.room(), 6);
        s.push(b"b\ncc\n");
        let (a, b) = s.unsent(usize::MAX);
        assert_eq!([a, b].concat(), b"bbbbb\ncc\n");
        assert_eq!(s.dropped(), (1, 3));
    }

    #[test]
    fn offsets_stay_consistent_under_random_use() {
        // A receiver model: it holds the stream's bytes up to `have`.
        let mut rng = 0x2545f4914f6cdd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut s = Spool::new(64, Full::Block);
        let mut produced: Vec<u8> = Vec::new();
        let mut received: Vec<u8> = Vec::new();
        let mut wire: Vec<u8> = Vec::new();
        for step in 0..20_000u64 {
            match next() % 4 {
                0 => {
                    let n = (next() % 20) as usize;
                    let n = n.min(s.room());
                    let bytes: Vec<u8> = (0..n).map(|i| (step as usize + i) as u8).collect();
                    s.push(&bytes);
                    produced.extend(&bytes);
                }
                1 => {
                    let (a, b) = s.unsent((next() % 30) as usize);
                    let chunk = [a, b].concat();
                    s.sent(chunk.len());
                    wire.extend(chunk);
                }
                2 => {
                    // The receiver writes what the wire brought, acks it.
                    received.append(&mut wire);
                    s.ack(received.len() as u64).unwrap();
                }
                _ => {
                    // The link breaks: what was on the wire is lost.
                    wire.clear();
                    s.resume(received.len() as u64).unwrap();
                }
            }
        }
        received.append(&mut wire);
        s.resume(received.len() as u64).unwrap();
        received.extend(unsent(&s));
        assert_eq!(received, produced);
    }
}
