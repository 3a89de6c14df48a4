//! The pool protocol: line-based text over TCP, spoken between a master
//! and a pool, simple enough to speak by hand with `nc` (see pool(1)).
//!
//! ```text
//! pool:   FIFOBIND 1 CHALLENGE <nonce>
//! master: FIFOBIND 1 AUTH <cnonce> <mac>
//! pool:   OK <proof>                     | ERR <reason>, then close
//! master: DAEMON <name>
//! pool:   PORT <port>                    | ERR <reason>
//! ...
//! master: END
//! pool:   BYE
//! ```
//!
//! Nonces are 32 fresh random bytes in lower-case hex. `mac` is
//! HMAC-SHA256 under the shared key of `fifobind-1 master NONCE CNONCE`,
//! `proof` the same of `fifobind-1 pool NONCE CNONCE`: each side proves it
//! knows the key without sending it, and a captured exchange is worth
//! nothing against the next nonce. Every line is at most [`MAX_LINE`]
//! bytes, ends in `\n` (a `\r` before it is tolerated), holds printable
//! ASCII only, and every step has a timeout; anything else is answered
//! with an `ERR` line and a closed connection.
//!
//! The handshake is one function per side, [`authenticate`] (master) and
//! [`challenge`] (pool), so that another version can replace it whole.
//! Every wait for the peer also ends on a stop signal ([`Conn::stop_on`]),
//! and a failure becomes the command's error, with its exit status,
//! through one `From<Failure> for Error`.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use nix::sys::signal::Signal;

use crate::args::{Id, Key, Port};
use crate::error::{Error, ExitStatus};
use crate::poll::{IN, PollSet};
use crate::signals::Signals;

pub(crate) const VERSION: u32 = 1;
/// The longest line either side accepts, newline included.
pub(crate) const MAX_LINE: usize = 512;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    Challenge {
        version: u32,
        nonce: String,
    },
    Auth {
        version: u32,
        cnonce: String,
        mac: String,
    },
    Ok {
        proof: String,
    },
    Daemon {
        name: Id,
    },
    Port {
        port: Port,
    },
    End,
    Bye,
    Err {
        reason: String,
    },
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Challenge { version, nonce } => {
                write!(f, "FIFOBIND {version} CHALLENGE {nonce}")
            }
            Message::Auth {
                version,
                cnonce,
                mac,
            } => write!(f, "FIFOBIND {version} AUTH {cnonce} {mac}"),
            Message::Ok { proof } => write!(f, "OK {proof}"),
            Message::Daemon { name } => write!(f, "DAEMON {name}"),
            Message::Port { port } => write!(f, "PORT {port}"),
            Message::End => f.write_str("END"),
            Message::Bye => f.write_str("BYE"),
            Message::Err { reason } => write!(f, "ERR {reason}"),
        }
    }
}

/// 64 lower-case hex digits: a nonce or a MAC.
fn hex32(word: &str) -> Result<String, String> {
    if word.len() == 64 && word.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(word.to_string())
    } else {
        Err(format!(
            "expected 64 lower-case hex digits, got {:?}",
            clip(word)
        ))
    }
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

impl Message {
    /// Parses one line (without its newline).
    pub(crate) fn parse(line: &str) -> Result<Message, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let version = |w: &str| -> Result<u32, String> {
            match w.parse::<u32>() {
                Ok(VERSION) => Ok(VERSION),
                _ => Err(format!(
                    "protocol version {:?} not supported (this side speaks {VERSION})",
                    clip(w)
                )),
            }
        };
        match words.as_slice() {
            ["FIFOBIND", v, "CHALLENGE", nonce] => Ok(Message::Challenge {
                version: version(v)?,
                nonce: hex32(nonce)?,
            }),
            ["FIFOBIND", v, "AUTH", cnonce, mac] => Ok(Message::Auth {
                version: version(v)?,
                cnonce: hex32(cnonce)?,
                mac: hex32(mac)?,
            }),
            ["FIFOBIND", v, ..] => {
                version(v)?;
                Err(format!("malformed line {:?}", clip(line)))
            }
            ["OK", proof] => Ok(Message::Ok {
                proof: hex32(proof)?,
            }),
            ["DAEMON", name] => Ok(Message::Daemon {
                name: name.parse().map_err(|e| format!("bad daemon name: {e}"))?,
            }),
            ["PORT", port] => Ok(Message::Port {
                port: port.parse()?,
            }),
            ["END"] => Ok(Message::End),
            ["BYE"] => Ok(Message::Bye),
            ["ERR", ..] if line.len() > 4 => Ok(Message::Err {
                reason: line[4..].to_string(),
            }),
            _ => Err(format!("unexpected line {:?}", clip(line))),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failure {
    /// The connection failed, closed or timed out.
    Io(io::Error),
    /// The peer said something that breaks the protocol.
    Protocol(String),
    /// The peer answered `ERR`.
    Refused(String),
    /// Authentication failed: a wrong key on either side.
    Denied(String),
    /// A stop signal came while waiting for the peer.
    Stopped(Signal),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("the connection was closed")
            }
            Failure::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                f.write_str("timed out")
            }
            Failure::Io(e) => f.write_str(&crate::error::describe_io(e)),
            Failure::Protocol(s) | Failure::Denied(s) => f.write_str(s),
            Failure::Refused(s) => write!(f, "refused: {s}"),
            Failure::Stopped(sig) => write!(f, "stopped by {sig}"),
        }
    }
}

impl Failure {
    /// The error of a command whose exchange with `peer` failed so.
    pub(crate) fn at(self, peer: impl fmt::Display) -> Error {
        let mut err = Error::from(self);
        if !err.message.is_empty() {
            err.message = format!("{peer}: {}", err.message);
        }
        err
    }
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        let status = match &failure {
            // A stop is no failure to report: only its status counts.
            Failure::Stopped(sig) => return Error::new(ExitStatus::Signal(*sig as i32), ""),
            Failure::Io(e) => match ExitStatus::of_io(e) {
                // A peer that vanished, not a file we failed to create.
                ExitStatus::CantCreate => ExitStatus::Unavailable,
                status => status,
            },
            Failure::Protocol(_) => ExitStatus::Protocol,
            // Busy serving another master, or too many at once: worth
            // trying again later.
            Failure::Refused(reason) if reason.starts_with("busy") => ExitStatus::TempFail,
            Failure::Refused(_) => ExitStatus::Unavailable,
            Failure::Denied(_) => ExitStatus::NoPerm,
        };
        Error::new(status, failure.to_string())
    }
}

/// One side of a protocol connection: framed lines with limits.
pub(crate) struct Conn {
    reader: BufReader<Deadlined>,
    writer: TcpStream,
    step: Duration,
}

/// The reading side of a connection, whose reads all end by one deadline,
/// or at once when a stop signal comes. A socket timeout bounds each
/// read(2) alone: a peer trickling a byte now and then would hold a line,
/// and the pool's handshake slot, open for as long as it liked. So each
/// read waits only for what is left of the time the whole line has.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
    stop: Option<Signals>,
    /// The stop signal that ended the last read.
    stopped: Option<Signal>,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut set = PollSet::default();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            set.clear();
            let data = set.add(self.stream.as_fd(), IN);
            let stop = self.stop.as_ref().map(|s| set.add(s.as_fd(), IN));
            set.wait(Some(left))?;
            if let (Some(slot), Some(signals)) = (stop, &self.stop)
                && set.revents(slot) != 0
                && let Some(sig) = signals.next()
            {
                self.stopped = Some(sig);
                // Not `Interrupted`: readers retry that.
                return Err(io::Error::other("stopped by a signal"));
            }
            if set.revents(data) != 0 {
                // Readable (or closed): this read does not block.
                return self.stream.read(buf);
            }
        }
    }
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, step: Duration) -> io::Result<Conn> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(step))?;
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone()?;
        let reader = Deadlined {
            stream,
            deadline: Instant::now() + step,
            stop: None,
            stopped: None,
        };
        Ok(Conn {
            reader: BufReader::with_capacity(MAX_LINE, reader),
            writer,
            step,
        })
    }

    /// Makes every wait for the peer end as soon as one of `signals`
    /// comes, with [`Failure::Stopped`].
    pub(crate) fn stop_on(&mut self, signals: Signals) {
        self.reader.get_mut().stop = Some(signals);
    }

    /// True when a line (or part of one) is already read in: the socket
    /// may say nothing more, yet [`Conn::recv`] has something to return.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    pub(crate) fn send(&mut self, msg: &Message) -> Result<(), Failure> {
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(Failure::Io)
    }

    /// Sends an error line, ignoring failure: the connection closes next.
    pub(crate) fn refuse(&mut self, reason: &str) {
        let _ = self.send(&Message::Err {
            reason: reason.to_string(),
        });
    }

    /// Reads the next message, which must arrive whole within the step
    /// timeout; an `ERR` line becomes [`Failure::Refused`].
    pub(crate) fn recv(&mut self) -> Result<Message, Failure> {
        self.reader.get_mut().deadline = Instant::now() + self.step;
        let line = read_line(&mut self.reader);
        if let Some(sig) = self.reader.get_mut().stopped.take() {
            return Err(Failure::Stopped(sig));
        }
        match Message::parse(&line?).map_err(Failure::Protocol)? {
            Message::Err { reason } => Err(Failure::Refused(reason)),
            msg => Ok(msg),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.writer.as_fd()
    }
}

// The handshakes of version 1. Each side is one function over a `Conn`,
// so that another version can replace it whole.

/// The master's side: answers the pool's challenge and checks its proof.
pub(crate) fn authenticate(conn: &mut Conn, key: &Key) -> Result<(), Failure> {
    let nonce = match conn.recv()? {
        Message::Challenge { nonce, .. } => nonce,
        other => {
            conn.refuse("expected FIFOBIND 1 CHALLENGE");
            return Err(Failure::Protocol(format!("the pool opened with {other}")));
        }
    };
    let cnonce = self::nonce();
    conn.send(&Message::Auth {
        version: VERSION,
        cnonce: cnonce.clone(),
        mac: mac(key, "master", &nonce, &cnonce),
    })?;
    match conn.recv() {
        Ok(Message::Ok { proof }) if verify(key, "pool", &nonce, &cnonce, &proof) => Ok(()),
        Ok(Message::Ok { .. }) => Err(Failure::Denied(
            "the pool does not know the key: refusing to send it anything".into(),
        )),
        Ok(other) => Err(Failure::Protocol(format!("the pool answered {other}"))),
        Err(Failure::Refused(reason)) if !reason.starts_with("busy") => Err(Failure::Denied(
            format!("the pool refused this master: {reason}"),
        )),
        Err(e) => Err(e),
    }
}

/// The pool's side: challenges the master and checks its answer; then
/// `admit` says whether it can be served now (the reason why not is sent
/// as `ERR`), and the pool proves it knows the key too.
pub(crate) fn challenge(
    conn: &mut Conn,
    key: &Key,
    admit: impl FnOnce() -> Result<(), String>,
) -> Result<(), Failure> {
    let nonce = self::nonce();
    conn.send(&Message::Challenge {
        version: VERSION,
        nonce: nonce.clone(),
    })?;
    let cnonce = match conn.recv() {
        Ok(Message::Auth { cnonce, mac, .. }) => {
            if !verify(key, "master", &nonce, &cnonce, &mac) {
                conn.refuse("authentication failed: wrong key");
                return Err(Failure::Denied("refused: wrong key".into()));
            }
            cnonce
        }
        Ok(other) => {
            conn.refuse("expected FIFOBIND 1 AUTH");
            return Err(Failure::Protocol(format!(
                "refused: sent {other} before authenticating"
            )));
        }
        Err(e) => {
            if !matches!(e, Failure::Io(_)) {
                conn.refuse(&e.to_string());
            }
            return Err(e);
        }
    };
    if let Err(reason) = admit() {
        conn.refuse(&reason);
        return Err(Failure::Denied(format!("refused: {reason}")));
    }
    conn.send(&Message::Ok {
        proof: mac(key, "pool", &nonce, &cnonce),
    })
}

/// The master asks for the port of daemon `name`'s binding.
pub(crate) fn request_port(conn: &mut Conn, name: &Id) -> Result<Port, Failure> {
    conn.send(&Message::Daemon { name: name.clone() })?;
    match conn.recv()? {
        Message::Port { port } => Ok(port),
        other => Err(Failure::Protocol(format!(
            "the pool answered {other} to DAEMON {name}"
        ))),
    }
}

/// The master ends its session. The pool's BYE is only logged if missing:
/// everything it had to do is done.
pub(crate) fn end(conn: &mut Conn) -> Result<(), Failure> {
    conn.send(&Message::End)?;
    match conn.recv() {
        Ok(Message::Bye) => {}
        Ok(other) => log::warn!("the pool answered {other} to END"),
        Err(e) => log::warn!("the pool did not acknowledge END: {e}"),
    }
    Ok(())
}

/// Reads one line of at most [`MAX_LINE`] bytes and checks its bytes.
pub(crate) fn read_line<R: Read>(reader: &mut BufReader<R>) -> Result<String, Failure> {
    let mut line = Vec::with_capacity(64);
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(Failure::Io)?;
    if n == 0 {
        return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    if line.last() != Some(&b'\n') {
        return Err(if n >= MAX_LINE {
            Failure::Protocol(format!("line longer than {MAX_LINE} bytes"))
        } else {
            Failure::Io(io::ErrorKind::UnexpectedEof.into())
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    check_line(&line)?;
    Ok(String::from_utf8(line).expect("checked to be ASCII"))
}

/// Only printable ASCII and spaces: no NUL, no stray CR, no control bytes.
pub(crate) fn check_line(line: &[u8]) -> Result<(), Failure> {
    match line.iter().find(|&&b| !(b' '..=b'~').contains(&b)) {
        None => Ok(()),
        Some(b) => Err(Failure::Protocol(format!(
            "byte 0x{b:02x} not allowed in a line"
        ))),
    }
}

/// A fresh random nonce, hex.
pub fn nonce() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    hex::encode(bytes)
}

/// The MAC one side (`role`: "master" or "pool") sends over the nonces.
pub fn mac(key: &Key, role: &str, nonce: &str, cnonce: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("fifobind-{VERSION} {role} {nonce} {cnonce}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a received MAC in constant time.
pub(crate) fn verify(key: &Key, role: &str, nonce: &str, cnonce: &str, received: &str) -> bool {
    let Ok(tag) = hex::decode(received) else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("fifobind-{VERSION} {role} {nonce} {cnonce}").as_bytes());
    mac.verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> Key {
        Key::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        let n = nonce();
        let msgs = [
            Message::Challenge {
                version: 1,
                nonce: n.clone(),
            },
            Message::Auth {
                version: 1,
                cnonce: n.clone(),
                mac: n.clone(),
            },
            Message::Ok { proof: n },
            Message::Daemon {
                name: "dem1".parse().unwrap(),
            },
            Message::Port { port: Port(30001) },
            Message::End,
            Message::Bye,
            Message::Err {
                reason: "auth: wrong key".into(),
            },
        ];
        for msg in msgs {
            assert_eq!(Message::parse(&msg.to_string()), Ok(msg));
        }
    }

    #[test]
    fn wrong_version_and_garbage_are_refused() {
        let n = nonce();
        assert!(
            Message::parse(&format!("FIFOBIND 2 AUTH {n} {n}"))
                .unwrap_err()
                .contains("version")
        );
        for bad in [
            "",
            "HELLO",
            "DAEMON ../x",
            "PORT 80",
            "DAEMON a b",
            "END now",
            "OK 12",
        ] {
            assert!(Message::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mac_depends_on_key_role_and_nonces() {
        let (n, c) = (nonce(), nonce());
        let m = mac(&key("k12"), "master", &n, &c);
        assert!(verify(&key("k12"), "master", &n, &c, &m));
        assert!(!verify(&key("k13"), "master", &n, &c, &m));
        assert!(!verify(&key("k12"), "pool", &n, &c, &m));
        assert!(!verify(&key("k12"), "master", &nonce(), &c, &m));
        assert!(!verify(&key("k12"), "master", &n, &c, "zz"));
    }

    /// The two ends of a loopback connection, as `Conn`s.
    fn pair() -> (Conn, Conn) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let step = Duration::from_secs(5);
        (Conn::new(a, step).unwrap(), Conn::new(b, step).unwrap())
    }

    /// Runs the pool's side on a thread and the master's here.
    fn handshake(
        pool_key: &str,
        master_key: &str,
        admit: Result<(), String>,
    ) -> (Result<(), Failure>, Result<(), Failure>) {
        let (mut master, mut pool) = pair();
        let pool_key = key(pool_key);
        let pool = std::thread::spawn(move || challenge(&mut pool, &pool_key, || admit));
        let master = authenticate(&mut master, &key(master_key));
        (master, pool.join().unwrap())
    }

    fn status(f: Failure) -> ExitStatus {
        Error::from(f).status
    }

    #[test]
    fn handshake_with_the_same_key_succeeds_and_a_session_follows() {
        let (mut master, mut pool) = pair();
        let k = key("k12");
        let pool = std::thread::spawn(move || {
            challenge(&mut pool, &k, || Ok(())).unwrap();
            assert!(matches!(pool.recv(), Ok(Message::Daemon { .. })));
            pool.send(&Message::Port { port: Port(30001) }).unwrap();
            assert!(matches!(pool.recv(), Ok(Message::End)));
            pool.send(&Message::Bye).unwrap();
        });
        authenticate(&mut master, &key("k12")).unwrap();
        let port = request_port(&mut master, &"dem1".parse().unwrap()).unwrap();
        assert_eq!(port, Port(30001));
        end(&mut master).unwrap();
        pool.join().unwrap();
    }

    #[test]
    fn a_wrong_key_is_denied_on_both_sides() {
        let (master, pool) = handshake("k12", "k13", Ok(()));
        let master = master.unwrap_err();
        assert!(master.to_string().contains("wrong key"), "{master}");
        assert_eq!(status(master), ExitStatus::NoPerm);
        assert!(matches!(pool, Err(Failure::Denied(_))), "{pool:?}");
    }

    #[test]
    fn a_busy_pool_is_a_temporary_failure() {
        let (master, pool) =
            handshake("k", "k", Err("busy: another master is being served".into()));
        assert!(pool.is_err());
        let master = master.unwrap_err();
        assert!(master.to_string().contains("busy"), "{master}");
        assert_eq!(status(master), ExitStatus::TempFail);
    }

    #[test]
    fn busy_in_place_of_a_challenge_is_a_temporary_failure() {
        let (mut master, mut pool) = pair();
        pool.refuse("busy: too many connections");
        let err = authenticate(&mut master, &key("k")).unwrap_err();
        assert_eq!(status(err), ExitStatus::TempFail);
    }

    #[test]
    fn a_pool_without_the_key_gets_nothing() {
        let (mut master, mut pool) = pair();
        let faker = std::thread::spawn(move || {
            pool.send(&Message::Challenge {
                version: VERSION,
                nonce: nonce(),
            })
            .unwrap();
            assert!(matches!(pool.recv(), Ok(Message::Auth { .. })));
            // It cannot make the proof: it sends anything.
            pool.send(&Message::Ok { proof: nonce() }).unwrap();
        });
        let err = authenticate(&mut master, &key("k")).unwrap_err();
        faker.join().unwrap();
        assert!(err.to_string().contains("does not know the key"), "{err}");
        assert_eq!(status(err), ExitStatus::NoPerm);
    }

    #[test]
    fn a_silent_peer_times_out_and_a_stop_signal_ends_the_wait() {
        let (mut master, _silent) = pair();
        master.step = Duration::from_millis(200);
        let err = authenticate(&mut master, &key("k")).unwrap_err();
        assert_eq!(status(err), ExitStatus::TempFail);

        // SIGUSR2 is no signal of this test binary's.
        master.step = Duration::from_secs(60);
        master.stop_on(Signals::of_for_tests(Signal::SIGUSR2));
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        let started = Instant::now();
        let err = authenticate(&mut master, &key("k")).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Failure::Stopped(Signal::SIGUSR2)), "{err:?}");
        let err = Error::from(err);
        assert_eq!(err.status, ExitStatus::Signal(libc::SIGUSR2));
        assert!(err.message.is_empty());
    }

    #[test]
    fn framer_limits_and_bytes() {
        let read = |bytes: &[u8]| read_line(&mut BufReader::new(bytes));
        assert_eq!(read(b"END\r\n").unwrap(), "END");
        assert!(matches!(read(b"E\0ND\n"), Err(Failure::Protocol(_))));
        assert!(matches!(read(b"E\rND\n"), Err(Failure::Protocol(_))));
        assert!(matches!(read(&[b'x'; 1000]), Err(Failure::Protocol(_))));
        assert!(matches!(read(b"END"), Err(Failure::Io(_))));
    }

    proptest! {
        /// Whatever bytes arrive, the framer and the parser answer with a
        /// message or an error, never a panic; and what they accept is
        /// printable, bounded, and parses back to itself once re-encoded.
        #[test]
        fn framer_and_parser_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(line) = read_line(&mut BufReader::new(&bytes[..])) {
                prop_assert!(line.len() < MAX_LINE);
                prop_assert!(check_line(line.as_bytes()).is_ok());
                if let Ok(msg) = Message::parse(&line) {
                    prop_assert_eq!(Message::parse(&msg.to_string()), Ok(msg));
                }
            }
        }

        #[test]
        fn parser_survives_near_misses(
            head in prop::sample::select(vec!["FIFOBIND", "DAEMON", "PORT", "OK", "END", "BYE", "ERR"]),
            rest in "[ -~]{0,80}",
        ) {
            let line = format!("{head} {rest}");
            if let Ok(msg) = Message::parse(&line) {
                prop_assert_eq!(Message::parse(&msg.to_string()), Ok(msg));
            }
        }
    }
}
