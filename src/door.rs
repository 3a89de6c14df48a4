//! door: admission of keyed connections — bounded, per address,
//! penalised.
//!
//! The pool's listener hands every connection to the door, which runs its
//! handshake as a [`Challenge`] fed bytes as they come, so none can hold
//! up another. It is bounded per address ([`MAX_PENDING_PER_ADDR`]: a
//! newcomer beyond that is turned away) and in total ([`MAX_PENDING`]: the
//! oldest makes room), and each handshake has the step timeout to finish;
//! so a flood of idle connections from one address cannot keep a master
//! at another out. A wrong key holds its address back ([`Penalties`]:
//! exponential delay): while it waits, its connections get a clear `ERR`
//! instead of a greeting, no SPAKE2 work, and the log gets one summary
//! line per interval. What passes is an [`Admitted`] master, for the pool
//! to open a session with.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::args::{Id, Key};
use crate::net;
use crate::penalty::Penalties;
use crate::poll::{IN, OUT, PollSet};
use crate::protocol::{Challenge, Failure, Progress};
use crate::secure::Channel;

/// Handshakes in progress at once; a newcomer beyond them pushes the
/// oldest out.
pub(crate) const MAX_PENDING: usize = 256;
/// Handshakes in progress at once from one address; a newcomer beyond
/// them is turned away.
pub(crate) const MAX_PENDING_PER_ADDR: usize = 8;
/// The first wrong key holds an address back this long; each further one
/// doubles it, up to [`PENALTY_MAX`].
pub(crate) const PENALTY_BASE: Duration = Duration::from_secs(1);
pub(crate) const PENALTY_MAX: Duration = Duration::from_secs(60);
/// Addresses remembered for their wrong keys.
const PENALTY_TABLE: usize = 4096;
/// At most one summary line of wrong keys per interval.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// The answer to a handshake turned away or pushed out.
const BUSY: &str = "busy: too many connections";

/// A connection at the door: its handshake under way.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    challenge: Challenge,
    deadline: Instant,
    /// What it sent while another handshake from its address was testing
    /// its key: one key test per address at a time, so that parallel
    /// connections do not multiply an attacker's guesses.
    waiting: Vec<u8>,
}

/// A master through the door: it proved the key and asked for a session.
pub(crate) struct Admitted {
    pub(crate) stream: TcpStream,
    pub(crate) ip: IpAddr,
    pub(crate) channel: Channel,
    /// The session name it asked for.
    pub(crate) name: Id,
    /// What it sent after `HELLO`.
    pub(crate) rest: Vec<u8>,
    /// What is still to be sent to it.
    pub(crate) out: Vec<u8>,
}

/// The handshakes under way and the wrong keys remembered.
pub(crate) struct Door {
    key: Key,
    step_timeout: Duration,
    pending: Vec<Pending>,
    penalties: Penalties,
}

/// One pass over the handshakes, with what the last poll found ready:
/// see [`Door::next`].
pub(crate) struct Round {
    ready: Vec<bool>,
    /// The handshake to look at next, and its slot in `ready`.
    i: usize,
    index: usize,
}

/// Writes what `out` holds as far as the socket takes it now.
pub(crate) fn flush(stream: &TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    while !out.is_empty() {
        match (&*stream).write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what has arrived; `Ok(0)` is end-of-file, `WouldBlock` nothing.
pub(crate) fn read_some(stream: &TcpStream, into: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    loop {
        match (&*stream).read(&mut chunk) {
            Ok(n) => {
                into.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends a last line in clear text, as far as the socket takes it at
/// once, and closes.
fn turn_away(stream: &TcpStream, line: &str) {
    let mut out = format!("ERR {line}\n").into_bytes();
    let _ = flush(stream, &mut out);
    let _ = stream.shutdown(Shutdown::Both);
}

impl Door {
    pub(crate) fn new(key: Key, step_timeout: Duration) -> Door {
        Door {
            key,
            step_timeout,
            pending: Vec::new(),
            penalties: Penalties::new(PENALTY_BASE, PENALTY_MAX, PENALTY_TABLE),
        }
    }

    /// The summary of wrong keys, when one is due; the handshakes that ran
    /// out of time are closed.
    pub(crate) fn tick(&mut self, now: Instant) {
        if let Some(line) = self.penalties.summary(now, SUMMARY_EVERY) {
            log::warn!("{line}");
        }
        self.pending.retain(|p| {
            if p.deadline > now {
                return true;
            }
            log::debug!("connection from {}: handshake timed out", p.peer);
            let _ = p.stream.shutdown(Shutdown::Both);
            false
        });
    }

    /// The wrong keys not summarised yet, when the pool stops.
    pub(crate) fn last_summary(&mut self) {
        if let Some(line) = self.penalties.flush(Instant::now()) {
            log::warn!("{line}");
        }
    }

    /// Adds the handshakes' connections to `set`; their slots, for
    /// [`Round::new`].
    pub(crate) fn watch(&self, set: &mut PollSet) -> Vec<usize> {
        self.pending
            .iter()
            .map(|p| {
                let ev = if p.challenge.out.is_empty() {
                    IN
                } else {
                    IN | OUT
                };
                set.add(p.stream.as_fd(), ev)
            })
            .collect()
    }

    /// How long the poll may wait: the deadlines of the handshakes, and
    /// the summary's interval.
    pub(crate) fn timeout(&self, now: Instant) -> Duration {
        let mut timeout = Duration::from_secs(1);
        if self.pending.iter().any(|p| !p.waiting.is_empty()) {
            // Held for a key test of their address, which may be over.
            timeout = Duration::from_millis(10);
        }
        if let Some(first) = self.pending.iter().map(|p| p.deadline).min() {
            timeout = timeout.min(first.saturating_duration_since(now));
        }
        timeout
    }

    /// Closes every handshake under way (the listener is closed too).
    pub(crate) fn close(&mut self) {
        for p in self.pending.drain(..) {
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }

    /// Takes in the connections waiting on `listener`, or turns them away.
    pub(crate) fn accept(&mut self, listener: &TcpListener) {
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("cannot accept: {}", crate::error::describe_io(&e));
                    return;
                }
            };
            // A dual-stack listener's IPv4 peers, logged as IPv4.
            let peer = net::unmapped(peer);
            let ip = net::canonical(peer.ip());
            let now = Instant::now();
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Some(wait) = self.penalties.wait(ip, now) {
                self.penalties.refused();
                turn_away(
                    &stream,
                    &format!(
                        "too many wrong keys from {ip}; retry in {} s",
                        wait.as_secs_f64().ceil()
                    ),
                );
                continue;
            }
            let from_ip = self
                .pending
                .iter()
                .filter(|p| net::canonical(p.peer.ip()) == ip)
                .count();
            if from_ip >= MAX_PENDING_PER_ADDR {
                // Not logged: a flood would flood the log too.
                turn_away(&stream, BUSY);
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                // The oldest, the likeliest to be idle (a master answers
                // within a round trip), makes room.
                let oldest = self.pending.remove(0);
                log::debug!(
                    "too many handshakes at once: dropped the oldest, from {}",
                    oldest.peer
                );
                turn_away(&oldest.stream, BUSY);
            }
            let _ = stream.set_nodelay(true);
            let mut p = Pending {
                challenge: Challenge::new(&self.key),
                deadline: now + self.step_timeout,
                stream,
                peer,
                waiting: Vec::new(),
            };
            if flush(&p.stream, &mut p.challenge.out).is_ok() {
                self.pending.push(p);
            }
        }
    }

    /// Moves on the handshakes whose connections are ready, until one
    /// admits its master (then `Some`: call again for the rest of the
    /// round) or the round is over.
    pub(crate) fn next(&mut self, round: &mut Round) -> Option<Admitted> {
        while round.i < self.pending.len() {
            let i = round.i;
            let is_ready = round.ready.get(round.index).copied().unwrap_or(false)
                || !self.pending[i].waiting.is_empty();
            round.index += 1;
            if !is_ready {
                round.i += 1;
                continue;
            }
            match self.handshake(i) {
                None => round.i += 1,
                Some(outcome) => {
                    let p = self.pending.remove(i);
                    if let Some(admitted) = self.settle(p, outcome) {
                        return Some(admitted);
                    }
                }
            }
        }
        None
    }

    /// One step of handshake `i`; `Some` when it is over.
    fn handshake(&mut self, i: usize) -> Option<Progress> {
        let ip = net::canonical(self.pending[i].peer.ip());
        let testing = self
            .pending
            .iter()
            .enumerate()
            .any(|(j, q)| j != i && q.challenge.greeted() && net::canonical(q.peer.ip()) == ip);
        let p = &mut self.pending[i];
        let greeted = p.challenge.greeted();
        let mut got = std::mem::take(&mut p.waiting);
        match read_some(&p.stream, &mut got) {
            Ok(0) => {
                return Some(Progress::Failed(Failure::Io(
                    io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Some(Progress::Failed(Failure::Io(e))),
        }
        if !greeted && !got.is_empty() && testing {
            p.waiting = got;
            return None;
        }
        // Parallel guesses from one address: held back since this one
        // connected, it is not heard either.
        if !greeted
            && !got.is_empty()
            && let Some(wait) = self.penalties.wait(ip, Instant::now())
        {
            self.penalties.refused();
            turn_away(
                &p.stream,
                &format!(
                    "too many wrong keys from {ip}; retry in {} s",
                    wait.as_secs_f64().ceil()
                ),
            );
            return Some(Progress::Failed(Failure::Refused("held back".into())));
        }
        let progress = if got.is_empty() {
            Progress::More
        } else {
            p.challenge.feed(&got)
        };
        if let Err(e) = flush(&p.stream, &mut p.challenge.out) {
            return Some(Progress::Failed(Failure::Io(e)));
        }
        match progress {
            Progress::More => None,
            done => Some(done),
        }
    }

    /// A handshake is over: the master is admitted, or turned away.
    fn settle(&mut self, mut p: Pending, outcome: Progress) -> Option<Admitted> {
        let ip = net::canonical(p.peer.ip());
        match outcome {
            Progress::More => unreachable!("settled while under way"),
            Progress::Failed(Failure::Denied(_)) => {
                self.penalties.failed(ip, Instant::now());
                let _ = p.stream.shutdown(Shutdown::Both);
            }
            Progress::Failed(Failure::Refused(_)) => {}
            Progress::Failed(e) => {
                match &e {
                    Failure::Version(_) => log::info!("connection from {}: {e}", p.peer),
                    _ => log::debug!("connection from {}: {e}", p.peer),
                }
                let _ = flush(&p.stream, &mut p.challenge.out);
                let _ = p.stream.shutdown(Shutdown::Both);
            }
            Progress::Admitted {
                channel,
                name,
                rest,
            } => {
                self.penalties.succeeded(ip);
                return Some(Admitted {
                    stream: p.stream,
                    ip,
                    channel,
                    name,
                    rest,
                    out: std::mem::take(&mut p.challenge.out),
                });
            }
        }
        None
    }
}

impl Round {
    /// A round over the handshakes, `ready[k]` for the one in slot `k` of
    /// [`Door::watch`].
    pub(crate) fn new(ready: Vec<bool>) -> Round {
        Round {
            ready,
            i: 0,
            index: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// The first line `stream` reads.
    fn first_line(stream: &TcpStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn one_address_gets_its_share_of_the_door_and_the_next_is_turned_away() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let at = listener.local_addr().unwrap();
        let mut door = Door::new(Key::new(b"k".to_vec()).unwrap(), Duration::from_secs(10));
        let clients: Vec<TcpStream> = (0..=MAX_PENDING_PER_ADDR)
            .map(|_| TcpStream::connect(at).unwrap())
            .collect();
        let last = &clients[MAX_PENDING_PER_ADDR];
        // Until the kernel has queued the last one too, and it is answered.
        last.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while last.peek(&mut [0u8; 1]).is_err() && Instant::now() < deadline {
            door.accept(&listener);
            std::thread::sleep(Duration::from_millis(10));
        }
        last.set_nonblocking(false).unwrap();
        assert_eq!(door.pending.len(), MAX_PENDING_PER_ADDR);
        for c in &clients[..MAX_PENDING_PER_ADDR] {
            assert!(first_line(c).starts_with("FIFOBIND "), "a greeting");
        }
        assert_eq!(first_line(last), format!("ERR {BUSY}\n"));
        door.close();
        assert!(door.pending.is_empty());
    }
}
