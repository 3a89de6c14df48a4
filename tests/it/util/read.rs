//! Reading what a binding passes on, from its FIFO, a socket or a pipe,
//! with a deadline, as a test must (a missing line fails the test instead
//! of hanging it); and the documented bash reading loop itself.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// The reading loop README.md, bind-input(1) and fifobind(7) show, as
/// they show it (port 9999): it waits with a timeout for a line's first
/// byte only and reads the rest with none, so no timeout falls inside a
/// line and no line is seen split or glued (tests/it/seed.rs runs it).
pub const SEED_LOOP: &str = r#"pid=$(bind-input in1 9999)
fifo=$(fifobind path in1)
while true; do
    IFS= read -r -t 1 -N 1 line < "$fifo"; status=$?  # a line's first byte
    if [ -z "$line" ]; then
        (( status > 128 )) && continue  # nothing this second
        break                           # the binding is gone
    fi
    [ "$line" = $'\n' ] && continue     # an empty message: ignored
    IFS= read -r rest < "$fifo"         # the rest: lines come whole
    line+=$rest
    [ "$line" = END ] && break
    echo "got: $line"
done
kill "$pid"
"#;

/// Opens a FIFO for reading (waiting for its writer, the binding).
pub fn open_fifo(fifo: &Path) -> File {
    File::open(fifo).unwrap_or_else(|e| panic!("open the FIFO {}: {e}", fifo.display()))
}

/// What [`read_until`] read.
pub struct Reading {
    pub bytes: u64,
    /// Whether the writer closed (end-of-file or a reset) before `take`
    /// had enough or the time was up.
    pub closed: bool,
}

/// Reads a FIFO, socket or pipe as data comes, handing each chunk to
/// `take`, until `take` returns false, the writer closes, or `limit` has
/// passed: the one reading loop every helper here is made of.
pub fn read_until(
    mut src: impl Read + AsFd,
    limit: Duration,
    mut take: impl FnMut(&[u8]) -> bool,
) -> Reading {
    let deadline = Instant::now() + limit;
    let mut chunk = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Reading {
                bytes,
                closed: false,
            };
        }
        let mut pfd = libc::pollfd {
            fd: src.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = left.min(Duration::from_millis(100)).as_millis() as i32;
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, wait.max(1)) };
        if pfd.revents == 0 {
            continue;
        }
        let n = match src.read(&mut chunk) {
            Ok(0) => 0,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                continue;
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read: {e}"),
        };
        if n == 0 {
            return Reading {
                bytes,
                closed: true,
            };
        }
        bytes += n as u64;
        if !take(&chunk[..n]) {
            return Reading {
                bytes,
                closed: false,
            };
        }
    }
}

/// Reads lines from a FIFO until `count` lines arrived or the patience ran
/// out; opens it once and keeps it open.
pub fn read_lines(fifo: &Path, count: usize) -> Vec<String> {
    read_lines_from(open_fifo(fifo), count)
}

/// A marker [`read_lines_from`] puts after a last line that had no
/// newline, so that no comparison with whole lines can pass by mistake.
pub const NO_NEWLINE: &str = "<no newline>";

/// Reads lines from a FIFO, socket or pipe until `count` lines arrived,
/// end-of-file, or the patience ran out. A last line without a newline
/// is returned with [`NO_NEWLINE`] after it.
pub fn read_lines_from(src: impl Read + AsFd, count: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut lines = 0;
    if count > 0 {
        read_until(src, PATIENCE, |chunk| {
            // Count only the new bytes: the buffer may grow to megabytes.
            lines += chunk.iter().filter(|&&b| b == b'\n').count();
            buf.extend_from_slice(chunk);
            lines < count
        });
    }
    let text = String::from_utf8(buf).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if !text.is_empty()
        && !text.ends_with('\n')
        && let Some(last) = lines.last_mut()
    {
        last.push_str(NO_NEWLINE);
    }
    lines
}

/// Everything `src` still sends, as lines (a last one without its newline
/// as it came), until the writer closes it (true) or `limit` has passed
/// (false).
pub fn read_until_closed(src: impl Read + AsFd, limit: Duration) -> (Vec<String>, bool) {
    let mut bytes = Vec::new();
    let closed = read_until(src, limit, |chunk| {
        bytes.extend_from_slice(chunk);
        true
    })
    .closed;
    let text = String::from_utf8_lossy(&bytes).to_string();
    (text.lines().map(String::from).collect(), closed)
}

/// Waits until the writer closed `src`, discarding whatever it sends;
/// false if it is still open after `limit`.
pub fn wait_closed(src: impl Read + AsFd, limit: Duration) -> bool {
    read_until(src, limit, |_| true).closed
}
