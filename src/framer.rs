//! Line framing for bind-input: which of a connection's bytes may go into
//! the FIFO now.
//!
//! Only whole lines go out, so a reader never meets half a line; a line
//! longer than the buffer goes out in pieces as it arrives (the relay
//! then lets no other connection write until its newline); and a last
//! line without a newline is completed when its stream ends. Kept apart
//! from the sockets so it can be tested, and fuzzed, on its own.
//!
//! [`PipeRoom`] says how much of that the FIFO will take whole: the kernel
//! counts a pipe's room in page slots, not bytes, so "capacity minus
//! unread" overstates it and a write sized by it is cut mid-line.

use std::collections::VecDeque;

pub(crate) struct LineBuffer {
    /// Its size; `buf` has one byte more, for the newline that completes
    /// a last line at end of stream.
    cap: usize,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    /// The last byte given out was not a newline: a line is half out.
    mid_line: bool,
    /// Newlines in `buf[start..end]`, counted as they come in.
    held: usize,
    /// The length of what [`LineBuffer::writable`] offered last: always
    /// up to the last newline held, so all `held` go out with it.
    offered: usize,
    /// Newlines added to complete a last line, not yet reported.
    completed: usize,
}

/// The newlines in `bytes` (vectorised: a fraction of a copy's cost).
pub(crate) fn count_lines(bytes: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', bytes).count()
}

impl LineBuffer {
    pub(crate) fn new(cap: usize) -> LineBuffer {
        LineBuffer {
            cap,
            buf: vec![0; cap + 1],
            start: 0,
            end: 0,
            eof: false,
            mid_line: false,
            held: 0,
            offered: 0,
            completed: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Grows the buffer (never shrinks it).
    pub(crate) fn grow(&mut self, cap: usize) {
        if cap > self.cap {
            self.cap = cap;
            self.buf.resize(cap + 1, 0);
        }
    }

    /// Whether more input can be taken now.
    pub(crate) fn wants_input(&self) -> bool {
        !self.eof && (self.end < self.cap || self.may_compact())
    }

    /// Whether moving what is held to the buffer's start is worth it: it
    /// frees at least three times what it moves, or nothing else can
    /// progress (no whole line is held, so nothing goes out until more
    /// comes in). Moving whenever a little had gone out cost a slow
    /// reader's binding a memmove of nearly the whole buffer per write
    /// (a quarter of its time behind `head`, which takes 8 KiB a read);
    /// this way a byte is moved a third of a time at most, on average.
    fn may_compact(&self) -> bool {
        if self.start == 0 {
            return false;
        }
        let pending = self.end - self.start;
        self.start >= 3 * pending || self.held == 0
    }

    pub(crate) fn is_full(&self) -> bool {
        self.end == self.cap
    }

    /// Where the next input goes; call [`LineBuffer::filled`] with how
    /// much was put there.
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.end == self.cap && self.may_compact() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..self.cap]
    }

    /// Makes `n` bytes of room at the end if the buffer can (moving what
    /// it holds to its start); says whether [`LineBuffer::space`] now has
    /// them. A stream's frames go in whole or wait.
    pub(crate) fn make_room(&mut self, n: usize) -> bool {
        if self.cap - self.end < n && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        !self.eof && self.cap - self.end >= n
    }

    /// Returns the newlines among them (lines come in).
    pub(crate) fn filled(&mut self, n: usize) -> usize {
        let lines = count_lines(&self.buf[self.end..self.end + n]);
        self.held += lines;
        self.end += n;
        // An offer made before holds fewer newlines than there are now.
        self.offered = 0;
        lines
    }

    /// How many last lines were completed with a newline since the last
    /// call: lines that came in without one.
    pub(crate) fn take_completed(&mut self) -> usize {
        std::mem::take(&mut self.completed)
    }

    /// No more input: what is left is passed on, with a newline.
    pub(crate) fn end_of_stream(&mut self) {
        self.eof = true;
    }

    /// A line has been given out in part and not finished yet.
    pub(crate) fn mid_line(&self) -> bool {
        self.mid_line
    }

    /// What may be given out now (then say how much was, with
    /// [`LineBuffer::consumed`]).
    pub(crate) fn writable(&mut self) -> &[u8] {
        let pending = self.end - self.start;
        if pending == 0 {
            // A line longer than the buffer went out in pieces, so its end
            // of stream usually comes with nothing left: it still needs
            // its newline, or the next connection's line would be glued
            // onto it.
            if self.eof && self.mid_line {
                self.buf[0] = b'\n';
                self.start = 0;
                self.end = 1;
                self.held += 1;
                self.completed += 1;
                self.offered = 1;
                return &self.buf[..1];
            }
            self.offered = 0;
            return &[];
        }
        let len = match memchr::memrchr(b'\n', &self.buf[self.start..self.end]) {
            Some(i) => i + 1,
            None if self.eof => {
                self.buf[self.end] = b'\n';
                self.end += 1;
                self.held += 1;
                self.completed += 1;
                pending + 1
            }
            None if self.mid_line || pending == self.cap => pending,
            None => 0,
        };
        self.offered = len;
        &self.buf[self.start..self.start + len]
    }

    /// `n` bytes of what [`LineBuffer::writable`] offered were given out.
    /// Returns the newlines among them (lines go out): all those held when
    /// the whole offer went, else counted (the FIFO took less).
    pub(crate) fn consumed(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let lines = if n == self.offered {
            self.held
        } else {
            count_lines(&self.buf[self.start..self.start + n])
        };
        self.held -= lines;
        self.offered = 0;
        self.mid_line = self.buf[self.start + n - 1] != b'\n';
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        lines
    }

    /// Gives up on the rest of the stream: what is buffered is dropped,
    /// and a line half given out is completed by its newline. Returns the
    /// number of bytes dropped.
    pub(crate) fn abandon(&mut self) -> usize {
        let dropped = self.end - self.start;
        self.start = 0;
        self.end = 0;
        self.held = 0;
        self.offered = 0;
        self.eof = true;
        dropped
    }

    /// Ended, and everything given out, the closing newline included.
    pub(crate) fn finished(&self) -> bool {
        self.eof && self.start == self.end && !self.mid_line
    }
}

/// A bound on the page slots a pipe has free, from what we wrote into it
/// and how much of it is still unread.
///
/// Each write is counted as if it had taken fresh pages of its own (one
/// per page size, started at its first byte), and a page as free once the
/// reader has passed its end. The kernel may merge the start of a write
/// into the last page, which only ever takes fewer slots, so the count
/// never falls short, whatever the reader does meanwhile: a write no
/// larger than [`PipeRoom::room`] is taken whole.
pub(crate) struct PipeRoom {
    page: u64,
    slots: u64,
    written: u64,
    consumed: u64,
    /// Writes not read to their end yet, oldest first: (start, end, pages,
    /// merged). A merged entry stands for several writes; its pages count
    /// until the reader has passed its end.
    writes: VecDeque<(u64, u64, u64, bool)>,
    pages: u64,
}

/// Entries kept before small writes are merged into one (memory stays
/// bounded however many tiny writes the FIFO holds).
const TRACKED: usize = 1024;

impl PipeRoom {
    /// A model of an empty pipe of `capacity` bytes with pages of `page`.
    pub(crate) fn new(capacity: usize, page: usize) -> PipeRoom {
        PipeRoom {
            page: page as u64,
            slots: (capacity / page) as u64,
            written: 0,
            consumed: 0,
            writes: VecDeque::new(),
            pages: 0,
        }
    }

    /// The pipe holds `unread` bytes now (FIONREAD): the reader has passed
    /// the rest.
    pub(crate) fn unread(&mut self, unread: usize) {
        let consumed = self.written.saturating_sub(unread as u64);
        self.consumed = self.consumed.max(consumed);
        while let Some(&(_, end, pages, _)) = self.writes.front() {
            if end > self.consumed {
                break;
            }
            self.writes.pop_front();
            self.pages -= pages;
        }
    }

    fn used(&self) -> u64 {
        match self.writes.front() {
            Some(&(start, _, pages, false)) if self.consumed > start => {
                self.pages - ((self.consumed - start) / self.page).min(pages - 1)
            }
            _ => self.pages,
        }
    }

    /// Bytes a single write is sure to go in whole.
    pub(crate) fn room(&self) -> usize {
        (self.slots.saturating_sub(self.used()) * self.page) as usize
    }

    /// `n` bytes were written.
    pub(crate) fn wrote(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let pages = (n as u64).div_ceil(self.page);
        let start = self.written;
        self.written += n as u64;
        self.pages += pages;
        if self.writes.len() >= TRACKED
            && let Some(last) = self.writes.back_mut()
        {
            last.1 = self.written;
            last.2 += pages;
            last.3 = true;
            return;
        }
        self.writes.push_back((start, self.written, pages, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Against a real pipe of 16 pages: writes sized by the model are never
    /// cut, whatever mix of write and read sizes, and the model does not
    /// starve the writer (it finds room again once the reader has read).
    #[test]
    fn pipe_room_never_overstates_a_real_pipe() {
        use std::os::fd::AsRawFd;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        // SAFETY: plain fcntl on descriptors we own.
        let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 65536) };
        assert!(cap >= 65536);
        let page = 4096;
        let mut room = PipeRoom::new(cap as usize, page);
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let buf = vec![b'x'; 70000];
        let mut rbuf = vec![0u8; 70000];
        let (mut big, mut cut) = (0, 0);
        for _ in 0..20000 {
            let mut unread: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut unread) };
            room.unread(unread as usize);
            let sizes = [
                1, 7, 100, 1000, 3000, 4095, 4096, 4097, 5000, 9000, 20000, 65536,
            ];
            let want = sizes[rand(sizes.len() as u64) as usize];
            let n = if want <= libc::PIPE_BUF {
                want
            } else {
                want.min(room.room())
            };
            if n > libc::PIPE_BUF {
                big += 1;
            }
            match nix::unistd::write(&w, &buf[..n]) {
                Ok(k) => {
                    room.wrote(k);
                    if k != n {
                        cut += 1;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => assert!(n <= libc::PIPE_BUF),
                Err(e) => panic!("{e}"),
            }
            if rand(3) == 0 {
                let take = [1, 10, 500, 4096, 5000, 30000][rand(6) as usize];
                let _ = nix::unistd::read(&r, &mut rbuf[..take]);
            }
        }
        assert_eq!(cut, 0, "writes sized by the model were cut");
        assert!(big > 1000, "the model gave room for only {big} big writes");
    }

    /// Feeds `input` in chunks of the given sizes, gives out what is
    /// writable in pieces of the given sizes (a FIFO taking less than
    /// offered), and returns every piece given out, with the lines the
    /// buffer counted in and out.
    fn run(
        cap: usize,
        input: &[u8],
        reads: &[usize],
        writes: &[usize],
    ) -> (Vec<Vec<u8>>, usize, usize) {
        let mut lb = LineBuffer::new(cap);
        let (mut lines_in, mut lines_out) = (0, 0);
        let mut fed = 0;
        let mut out = Vec::new();
        let (mut r, mut w) = (0, 0);
        let mut rounds = 0;
        while !lb.finished() {
            rounds += 1;
            assert!(rounds < 100_000, "no progress");
            if fed < input.len() && lb.wants_input() {
                let want = reads[r % reads.len()].max(1);
                r += 1;
                let space = lb.space();
                let n = want.min(space.len()).min(input.len() - fed);
                space[..n].copy_from_slice(&input[fed..fed + n]);
                lines_in += lb.filled(n);
                fed += n;
            } else if fed == input.len() && !lb.eof {
                lb.end_of_stream();
            }
            let offer = lb.writable();
            if !offer.is_empty() {
                let n = writes[w % writes.len()].clamp(1, offer.len());
                w += 1;
                out.push(offer[..n].to_vec());
                lines_out += lb.consumed(n);
                lines_in += lb.take_completed();
            }
        }
        (out, lines_in, lines_out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the input and however it arrives and leaves: every
        /// byte comes out once, in order, completed by a newline; and
        /// whenever nothing is half out, what came out so far ends at a
        /// line's end, unless a line was longer than the buffer. The lines
        /// counted in and out are the lines of the input.
        #[test]
        fn lines_come_out_whole_and_complete(
            input in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'x'), any::<u8>()], 0..3000),
            cap in 1usize..300,
            reads in proptest::collection::vec(1usize..400, 1..8),
            writes in proptest::collection::vec(1usize..5000, 1..8),
            greedy in any::<bool>(),
        ) {
            let writes = if greedy { vec![usize::MAX] } else { writes };
            let (pieces, lines_in, lines_out) = run(cap, &input, &reads, &writes);
            let got: Vec<u8> = pieces.concat();
            let mut want = input.clone();
            if want.last().is_some_and(|&b| b != b'\n') {
                want.push(b'\n');
            }
            prop_assert_eq!(&got, &want);
            // Lines counted as they come and go are the lines there are,
            // however the FIFO cut the offers (a last line without its
            // newline counts, once completed).
            let lines = count_lines(&want);
            prop_assert_eq!(lines_in, lines);
            prop_assert_eq!(lines_out, lines);
            let longest = input.split(|&b| b == b'\n').map(<[u8]>::len).max().unwrap_or(0);
            // With a FIFO that takes whatever is offered, pieces end at
            // line ends unless some line did not fit the buffer.
            if greedy && longest < cap {
                for piece in &pieces {
                    prop_assert_eq!(piece.last(), Some(&b'\n'));
                }
            }
        }
    }

    /// A full buffer that has given out a little of many lines waits for
    /// more to go out before it takes input (moving what it holds), but
    /// never when nothing else could progress.
    #[test]
    fn a_full_buffer_moves_its_bytes_only_when_worth_it() {
        let mut lb = LineBuffer::new(100);
        let lines = b"123456789\n".repeat(10);
        lb.space()[..100].copy_from_slice(&lines);
        lb.filled(100);
        assert!(!lb.wants_input());
        let offer = lb.writable().len();
        assert_eq!(offer, 100);
        // The FIFO took one line: moving 90 bytes for 10 of room is not.
        lb.consumed(10);
        assert!(!lb.wants_input());
        assert_eq!(lb.writable().len(), 90);
        lb.consumed(60);
        // 70 out, 30 held: moving 30 for 70 of room is not yet either.
        assert!(!lb.wants_input());
        assert_eq!(lb.writable().len(), 30);
        lb.consumed(10);
        // 80 out, 20 held: moving 20 for 80 of room is.
        assert!(lb.wants_input());
        assert_eq!(lb.space().len(), 80);
        assert_eq!(lb.writable(), &lines[80..]);

        // A line that fills the buffer but for what went out: no whole
        // line held, so it must move to take the rest of that line.
        let mut lb = LineBuffer::new(100);
        let mut bytes = b"12345\n".to_vec();
        bytes.extend_from_slice(&[b'x'; 94]);
        lb.space()[..100].copy_from_slice(&bytes);
        lb.filled(100);
        assert_eq!(lb.writable().len(), 6);
        lb.consumed(6);
        assert!(lb.writable().is_empty());
        assert!(lb.wants_input());
        assert_eq!(lb.space().len(), 6);
    }

    #[test]
    fn a_partial_line_waits_for_its_end() {
        let mut lb = LineBuffer::new(16);
        lb.space()[..5].copy_from_slice(b"ab\ncd");
        lb.filled(5);
        assert_eq!(lb.writable(), b"ab\n");
        lb.consumed(3);
        assert!(lb.writable().is_empty());
        lb.end_of_stream();
        assert_eq!(lb.writable(), b"cd\n");
        lb.consumed(3);
        assert!(lb.finished());
    }
}
