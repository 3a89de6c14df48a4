//! Reading what a binding passes on, from its FIFO, a socket or a pipe,
//! with a deadline, as a test must (a missing line fails the test instead
//! of hanging it); and the documented bash reading loop itself.

use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// The reading loop README.md, bind-input(1) and fifobind(7) show, as
/// they show it (port 9999): it keeps the part a timed-out `read` returns
/// and completes it, so no line is seen split (tests/it/seed.rs runs it).
pub const SEED_LOOP: &str = r#"pid=$(bind-input in1 9999)
fifo=$(fifobind path in1)
line=
while true; do
    IFS= read -r -t 1 part < "$fifo"; status=$?
    line+=$part
    (( status > 128 )) && continue  # this second: nothing, or part of a line
    (( status != 0 )) && break      # the binding is gone
    [ -z "$line" ] && continue      # an empty message: ignored
    [ "$line" = END ] && break
    echo "got: $line"; line=
done
kill "$pid"
"#;

/// Reads lines from a FIFO until `count` lines arrived or the patience ran
/// out; opens it once and keeps it open.
pub fn read_lines(fifo: &Path, count: usize) -> Vec<String> {
    let mut file = fs::File::open(fifo).expect("open FIFO");
    read_lines_from(&mut file, count)
}

/// A marker [`read_lines_from`] puts after a last line that had no
/// newline, so that no comparison with whole lines can pass by mistake.
pub const NO_NEWLINE: &str = "<no newline>";

/// Reads lines from a FIFO, socket or pipe until `count` lines arrived,
/// end-of-file, or the patience ran out. A last line without a newline
/// is returned with [`NO_NEWLINE`] after it.
pub fn read_lines_from<R: Read + AsRawFd>(src: &mut R, count: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut lines = 0;
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + PATIENCE;
    let fd = src.as_raw_fd();
    while lines < count && Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            let n = match src.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read: {e}"),
            };
            // Count only the new bytes: the buffer may grow to megabytes.
            lines += chunk[..n].iter().filter(|&&b| b == b'\n').count();
            buf.extend_from_slice(&chunk[..n]);
        }
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

/// Everything `s` still sends, as lines, until the peer closes it
/// (end-of-file or reset: true) or `limit` has passed (false).
pub fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<String>, bool) {
    let deadline = Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break true,
        }
    };
    let text = String::from_utf8_lossy(&bytes).to_string();
    (text.lines().map(String::from).collect(), closed)
}

/// Waits until the peer closed `stream`, discarding whatever it sends;
/// false if it is still open after `limit`.
pub fn wait_closed(stream: &mut TcpStream, limit: Duration) -> bool {
    read_until_closed(stream, limit).1
}

/// Reads a FIFO with big buffers, handing every chunk to `f`, until `f`
/// returns false, end-of-file, or `limit` has passed. Returns the number
/// of bytes read.
pub fn read_chunks(fifo: &Path, limit: Duration, mut f: impl FnMut(&[u8]) -> bool) -> u64 {
    let mut file = fs::File::open(fifo).expect("open FIFO");
    let mut chunk = vec![0u8; 1 << 20];
    let deadline = Instant::now() + limit;
    let mut total = 0u64;
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        if pfd.revents == 0 {
            continue;
        }
        let n = match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read FIFO: {e}"),
        };
        total += n as u64;
        if !f(&chunk[..n]) {
            break;
        }
    }
    total
}
