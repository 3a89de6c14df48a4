//! The control protocol, version 2: what a master and a pool say to each
//! other, sealed by [`crate::secure`] (see pool(1), PROTOCOL).
//!
//! ```text
//! pool:    FIFOBIND 2 CONTROL <66 hex: SPAKE2 message>   | ERR <reason>, close
//! master:  FIFOBIND 2 CONTROL <66 hex>
//! both:    Confirm frame (a wrong key fails here, on both sides)
//! master:  Line "HELLO <name>"
//! pool:    Line "SESSION <name>"       | Line "ERR <reason>", close
//! master:  Line "DAEMON <daemon>"
//! pool:    Line "PORT <port>"          | Line "ERR <reason>"
//! ...
//! master:  Line "END"
//! pool:    Line "BYE"
//! ```
//!
//! Only the two greetings (and an `ERR` in place of the pool's) travel in
//! clear text; every line after them is a sealed frame. Each line is at
//! most [`MAX_LINE`] bytes of printable ASCII, and every step has a
//! timeout; anything else ends the connection with an error.
//!
//! The handshake is one function per side: [`authenticate`] for the
//! master (blocking, over a [`Conn`]) and [`Challenge`] for the pool (a
//! state machine fed bytes, so that the pool's single poll loop runs any
//! number of handshakes at once and none can hold up another). Every
//! wait of the master's also ends on a stop signal ([`Conn::stop_on`]),
//! and a failure becomes the command's error, with its exit status,
//! through one `From<Failure> for Error`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use zeroize::Zeroizing;

use crate::args::{Id, Key, Port};
use crate::error::{Error, ExitStatus};
use crate::poll::{IN, PollSet};
use crate::secure::{self, Channel, Frame, Hello, Purpose, Side};
use crate::signals::Signals;

pub(crate) const VERSION: u32 = secure::VERSION;
/// The longest line either side accepts, newline included.
pub(crate) const MAX_LINE: usize = 512;
/// The longest session name: what `HELLO` may ask for, and a master's
/// `--name`.
pub(crate) const MAX_NAME: usize = 24;
/// What the pool answers a protocol-1 master, in clear text.
pub(crate) const OLD_PEER: &str = "ERR this pool speaks protocol version 2, not version 1";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Message {
    Hello { name: Id },
    Session { name: Id },
    Daemon { name: Id },
    Port { port: Port },
    End,
    Bye,
    Err { reason: String },
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Hello { name } => write!(f, "HELLO {name}"),
            Message::Session { name } => write!(f, "SESSION {name}"),
            Message::Daemon { name } => write!(f, "DAEMON {name}"),
            Message::Port { port } => write!(f, "PORT {port}"),
            Message::End => f.write_str("END"),
            Message::Bye => f.write_str("BYE"),
            Message::Err { reason } => write!(f, "ERR {reason}"),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// A session name: an ID of at most [`MAX_NAME`] characters without a
/// dot (the dot joins it to a daemon's name).
pub(crate) fn parse_name(s: &str) -> Result<Id, String> {
    if s.len() > MAX_NAME {
        return Err(format!("a session name has at most {MAX_NAME} characters"));
    }
    if s.contains('.') {
        return Err("a session name has no '.'".into());
    }
    s.parse()
}

/// Makes any text a session name: characters other than `A-Z a-z 0-9 _ -`
/// become `-`, at most [`MAX_NAME`] are kept, and one that would start
/// with `-` starts with `_` instead (for a host name, say).
pub(crate) fn name_of(raw: &str) -> Id {
    let mut name: String = raw
        .chars()
        .take(MAX_NAME)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        name = "master".into();
    }
    if name.starts_with('-') {
        name.replace_range(..1, "_");
    }
    parse_name(&name).expect("made a valid name")
}

/// The stream (and binding ID) of daemon `daemon` of session `session`:
/// `SESSION.DAEMON`, refused when longer than an ID may be.
pub(crate) fn stream_name(session: &Id, daemon: &Id) -> Result<Id, String> {
    format!("{session}.{daemon}")
        .parse()
        .map_err(|e| format!("daemon {daemon}: its stream {session}.{daemon} is no valid ID ({e})"))
}

impl Message {
    /// Parses one line (without its newline).
    pub(crate) fn parse(line: &str) -> Result<Message, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let id = |what: &str, w: &str| w.parse::<Id>().map_err(|e| format!("bad {what}: {e}"));
        match words.as_slice() {
            ["HELLO", name] => Ok(Message::Hello {
                name: parse_name(name).map_err(|e| format!("bad session name: {e}"))?,
            }),
            ["SESSION", name] => Ok(Message::Session {
                name: id("session name", name)?,
            }),
            ["DAEMON", name] => Ok(Message::Daemon {
                name: id("daemon name", name)?,
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
    /// The peer said something that breaks the protocol, or a frame
    /// failed to open.
    Protocol(String),
    /// The peer answered `ERR`.
    Refused(String),
    /// Authentication failed: a wrong key on either side.
    Denied(String),
    /// The peer speaks another version of the protocol.
    Version(String),
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
            Failure::Protocol(s) | Failure::Denied(s) | Failure::Version(s) => f.write_str(s),
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

/// Refusals worth trying again later: a full door, a held-back address.
fn temporary(reason: &str) -> bool {
    reason.starts_with("busy") || reason.starts_with("too many")
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        let status = match &failure {
            // A stop is no failure to report: only its status counts.
            Failure::Stopped(sig) => return Error::new(ExitStatus::Signal(*sig as i32), ""),
            // A peer that vanished, not a file we failed to create nor a
            // local I/O error.
            Failure::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                ExitStatus::Unavailable
            }
            Failure::Io(e) => match ExitStatus::of_io(e) {
                ExitStatus::CantCreate => ExitStatus::Unavailable,
                status => status,
            },
            Failure::Protocol(_) => ExitStatus::Protocol,
            Failure::Refused(reason) if temporary(reason) => ExitStatus::TempFail,
            Failure::Refused(_) | Failure::Version(_) => ExitStatus::Unavailable,
            Failure::Denied(_) => ExitStatus::NoPerm,
        };
        Error::new(status, failure.to_string())
    }
}

/// The master's end of a control connection: blocking, every wait
/// bounded by the step timeout and ended by a stop signal; sealed once
/// [`authenticate`] has run.
pub(crate) struct Conn {
    reader: Deadlined,
    writer: TcpStream,
    step: Duration,
    channel: Option<Channel>,
    /// Bytes read but not yet opened as a frame.
    inbuf: Vec<u8>,
}

/// The reading side of a connection, whose reads all end by one deadline,
/// or at once when a stop signal comes. A socket timeout bounds each
/// read(2) alone: a peer trickling a byte now and then would hold a step
/// open for as long as it liked. So each read waits only for what is left
/// of the time the whole step has.
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
            reader,
            writer,
            step,
            channel: None,
            inbuf: Vec::new(),
        })
    }

    /// Makes every wait for the peer end as soon as one of `signals`
    /// comes, with [`Failure::Stopped`].
    pub(crate) fn stop_on(&mut self, signals: Signals) {
        self.reader.stop = Some(signals);
    }

    /// The secret of stream `name` of this session (after [`authenticate`]).
    pub(crate) fn stream_secret(&self, name: &Id) -> Zeroizing<[u8; 32]> {
        self.channel
            .as_ref()
            .expect("authenticated")
            .stream_secret(name.as_str())
    }

    fn stopped_or<T>(&mut self, r: Result<T, Failure>) -> Result<T, Failure> {
        match self.reader.stopped.take() {
            Some(sig) => Err(Failure::Stopped(sig)),
            None => r,
        }
    }

    /// Reads the pool's greeting, in clear text, within one step.
    fn read_greeting(&mut self) -> Result<String, Failure> {
        self.reader.deadline = Instant::now() + self.step;
        let r = secure::read_greeting(&mut self.reader);
        self.stopped_or(r)
    }

    fn send_frame(&mut self, frame: &Frame) -> Result<(), Failure> {
        let mut out = Vec::new();
        self.channel
            .as_mut()
            .expect("sealed")
            .sealer
            .seal(frame, &mut out);
        self.writer.write_all(&out).map_err(Failure::Io)
    }

    /// Reads and opens the next frame, which must arrive whole within
    /// one step.
    fn recv_frame(&mut self) -> Result<Frame, Failure> {
        self.reader.deadline = Instant::now() + self.step;
        let mut chunk = [0u8; 4096];
        loop {
            let channel = self.channel.as_mut().expect("sealed");
            if let Some((frame, used)) = channel.opener.open(&self.inbuf)? {
                self.inbuf.drain(..used);
                return Ok(frame);
            }
            let r = self.reader.read(&mut chunk).map_err(Failure::Io);
            match self.stopped_or(r)? {
                0 => return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into())),
                n => self.inbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub(crate) fn send(&mut self, msg: &Message) -> Result<(), Failure> {
        self.send_frame(&Frame::Line(msg.to_string()))
    }

    /// Reads the next message; an `ERR` line becomes [`Failure::Refused`].
    pub(crate) fn recv(&mut self) -> Result<Message, Failure> {
        match self.recv_frame()? {
            Frame::Line(line) => match Message::parse(&line).map_err(Failure::Protocol)? {
                Message::Err { reason } => Err(Failure::Refused(reason)),
                msg => Ok(msg),
            },
            other => Err(Failure::Protocol(format!(
                "expected a control line, got {other}"
            ))),
        }
    }
}

/// The master's side of the handshake: the greetings, the confirmations
/// (a wrong key fails here), then `HELLO name`. Returns the name the pool
/// gave the session.
pub(crate) fn authenticate(conn: &mut Conn, key: &Key, name: &Id) -> Result<Id, Failure> {
    let greeting = conn.read_greeting()?;
    let words: Vec<&str> = greeting.split(' ').collect();
    match words.as_slice() {
        ["ERR", ..] => return Err(Failure::Refused(greeting[4..].to_string())),
        ["FIFOBIND", v, ..] if *v != VERSION.to_string() => {
            return Err(Failure::Version(format!(
                "the pool speaks protocol version {}, this master speaks version {VERSION}",
                clip(v)
            )));
        }
        _ => {}
    }
    let hello = Hello::start(Side::Connector, Purpose::Control, key.as_bytes());
    conn.writer
        .write_all(format!("{}\n", hello.line()).as_bytes())
        .map_err(Failure::Io)?;
    conn.channel = Some(hello.finish(&greeting)?);
    conn.send_frame(&Frame::Confirm)?;
    match conn.recv_frame() {
        Ok(Frame::Confirm) => {}
        Ok(other) => {
            return Err(Failure::Protocol(format!(
                "expected the pool's confirmation, got {other}"
            )));
        }
        Err(Failure::Protocol(_)) => {
            return Err(Failure::Denied(
                "refused: authentication failed: the pool's confirmation does not open \
                 under this key (a wrong key, or the connection was tampered with)"
                    .into(),
            ));
        }
        // A pool that found our confirmation wrong closes at once.
        Err(Failure::Io(e)) if e.kind() != io::ErrorKind::TimedOut => {
            return Err(Failure::Denied(format!(
                "refused: the pool closed the connection during authentication \
                 (a wrong key?): {}",
                Failure::Io(e)
            )));
        }
        Err(e) => return Err(e),
    }
    conn.send(&Message::Hello { name: name.clone() })?;
    match conn.recv()? {
        Message::Session { name } => Ok(name),
        other => Err(Failure::Protocol(format!(
            "the pool answered {other} to HELLO"
        ))),
    }
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
/// everything it had to do is done. A stop signal that came while waiting
/// for it is passed on: it was read, and would otherwise be lost.
pub(crate) fn end(conn: &mut Conn) -> Result<(), Failure> {
    conn.send(&Message::End)?;
    match conn.recv() {
        Ok(Message::Bye) => {}
        Ok(other) => log::warn!("the pool answered {other} to END"),
        Err(Failure::Stopped(sig)) => return Err(Failure::Stopped(sig)),
        Err(e) => log::warn!("the pool did not acknowledge END: {e}"),
    }
    Ok(())
}

/// The pool's side of the handshake, fed the bytes that arrive: its
/// greeting is in [`Challenge::out`] from the start; the master's greeting
/// seals the channel and queues the pool's confirmation; the master's
/// confirmation and its `HELLO` admit it. No step blocks, so one poll loop
/// runs many at once.
pub(crate) struct Challenge {
    stage: Stage,
    /// Bytes to send to the master, in order.
    pub(crate) out: Vec<u8>,
    inbuf: Vec<u8>,
}

enum Stage {
    Greeting(Hello),
    Confirm(Channel),
    Hello(Channel),
    Done,
}

enum Step {
    Moved,
    Wait,
    Admitted(Channel, Id),
    Failed(Failure),
}

/// Where a handshake is after the bytes it was fed.
pub(crate) enum Progress {
    /// More bytes are needed.
    More,
    /// The master proved it knows the key and asked for session `name`;
    /// `rest` is what it sent after its `HELLO`.
    Admitted {
        channel: Channel,
        name: Id,
        rest: Vec<u8>,
    },
    /// The handshake failed: send what is in `out` (a clear `ERR` line,
    /// if any) and close.
    Failed(Failure),
}

impl Challenge {
    pub(crate) fn new(key: &Key) -> Challenge {
        let hello = Hello::start(Side::Listener, Purpose::Control, key.as_bytes());
        let out = format!("{}\n", hello.line()).into_bytes();
        Challenge {
            stage: Stage::Greeting(hello),
            out,
            inbuf: Vec::new(),
        }
    }

    /// True once the master's greeting is in: the key's test is under way.
    pub(crate) fn greeted(&self) -> bool {
        !matches!(self.stage, Stage::Greeting(_))
    }

    /// Takes bytes from the master.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Progress {
        self.inbuf.extend_from_slice(bytes);
        loop {
            match self.step() {
                Step::Moved => continue,
                Step::Wait => return Progress::More,
                Step::Admitted(channel, name) => {
                    return Progress::Admitted {
                        channel,
                        name,
                        rest: std::mem::take(&mut self.inbuf),
                    };
                }
                Step::Failed(failure) => {
                    self.stage = Stage::Done;
                    return Progress::Failed(failure);
                }
            }
        }
    }

    /// One step of the handshake.
    fn step(&mut self) -> Step {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Greeting(hello) => {
                let Some(end) = self.inbuf.iter().position(|&b| b == b'\n') else {
                    self.stage = Stage::Greeting(hello);
                    if self.inbuf.len() >= MAX_LINE {
                        return Step::Failed(self.refuse(Failure::Protocol(format!(
                            "line longer than {MAX_LINE} bytes"
                        ))));
                    }
                    return Step::Wait;
                };
                let mut line: Vec<u8> = self.inbuf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if let Err(e) = check_line(&line) {
                    return Step::Failed(self.refuse(e));
                }
                let line = String::from_utf8(line).expect("checked to be ASCII");
                if let ["FIFOBIND", v, ..] = line.split(' ').collect::<Vec<_>>().as_slice()
                    && *v != VERSION.to_string()
                {
                    self.out = format!("{OLD_PEER}\n").into_bytes();
                    if *v != "1" {
                        self.out = format!(
                            "ERR this pool speaks protocol version {VERSION}, not version {}\n",
                            clip(v)
                        )
                        .into_bytes();
                    }
                    return Step::Failed(Failure::Version(format!(
                        "a master of protocol version {}: this pool speaks version {VERSION}",
                        clip(v)
                    )));
                }
                match hello.finish(&line) {
                    Ok(mut channel) => {
                        channel.sealer.seal(&Frame::Confirm, &mut self.out);
                        self.stage = Stage::Confirm(channel);
                        Step::Moved
                    }
                    Err(e) => Step::Failed(self.refuse(e)),
                }
            }
            Stage::Confirm(mut channel) => match channel.opener.open(&self.inbuf) {
                Ok(None) => {
                    self.stage = Stage::Confirm(channel);
                    Step::Wait
                }
                Ok(Some((Frame::Confirm, used))) => {
                    self.inbuf.drain(..used);
                    self.stage = Stage::Hello(channel);
                    Step::Moved
                }
                Ok(Some((other, _))) => Step::Failed(Failure::Protocol(format!(
                    "sent {other} instead of a confirmation"
                ))),
                Err(_) => Step::Failed(Failure::Denied("wrong key".into())),
            },
            Stage::Hello(mut channel) => match channel.opener.open(&self.inbuf) {
                Ok(None) => {
                    self.stage = Stage::Hello(channel);
                    Step::Wait
                }
                Ok(Some((Frame::Line(line), used))) => {
                    self.inbuf.drain(..used);
                    match Message::parse(&line) {
                        Ok(Message::Hello { name }) => Step::Admitted(channel, name),
                        Ok(other) => Step::Failed(Failure::Protocol(format!(
                            "sent {other} instead of HELLO"
                        ))),
                        Err(e) => Step::Failed(Failure::Protocol(e)),
                    }
                }
                Ok(Some((other, _))) => {
                    Step::Failed(Failure::Protocol(format!("sent {other} instead of HELLO")))
                }
                Err(e) => Step::Failed(e),
            },
            Stage::Done => Step::Failed(Failure::Protocol("handshake over".into())),
        }
    }

    /// Answers a failure before the channel exists with a clear `ERR`.
    fn refuse(&mut self, failure: Failure) -> Failure {
        self.out = format!("ERR {failure}\n").into_bytes();
        failure
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::TcpListener;

    fn key(s: &str) -> Key {
        Key::new(s.as_bytes().to_vec()).unwrap()
    }

    fn id(s: &str) -> Id {
        s.parse().unwrap()
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            Message::Hello { name: id("m") },
            Message::Session { name: id("m-2") },
            Message::Daemon { name: id("dem1") },
            Message::Port { port: Port(30001) },
            Message::End,
            Message::Bye,
            Message::Err {
                reason: "busy: too many".into(),
            },
        ];
        for msg in msgs {
            assert_eq!(Message::parse(&msg.to_string()), Ok(msg));
        }
        for bad in [
            "",
            "HELLO",
            "HELLO a.b",
            "HELLO abcdefghijklmnopqrstuvwxyz",
            "DAEMON ../x",
            "PORT 80",
            "DAEMON a b",
            "END now",
            "FIFOBIND 1 AUTH x y",
        ] {
            assert!(Message::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_are_made_ids_and_streams_joined() {
        assert_eq!(
            name_of("build-host.example.org").as_str(),
            "build-host-example-org"
        );
        assert_eq!(name_of("-x").as_str(), "_x");
        assert_eq!(name_of("").as_str(), "master");
        assert_eq!(name_of(&"h".repeat(40)).as_str().len(), MAX_NAME);
        assert_eq!(
            stream_name(&id("m"), &id("dem1")).unwrap().as_str(),
            "m.dem1"
        );
        assert!(stream_name(&id("m"), &id(&"d".repeat(63))).is_err());
    }

    /// The two ends of a loopback connection.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    /// Drives the pool's side over a blocking socket, as the pool's loop
    /// does over a non-blocking one; answers `SESSION name` when admitted.
    fn pool_side(mut s: TcpStream, k: &str) -> Result<(Channel, TcpStream), Failure> {
        let mut c = Challenge::new(&key(k));
        let mut chunk = [0u8; 4096];
        loop {
            s.write_all(&std::mem::take(&mut c.out))
                .map_err(Failure::Io)?;
            let n = s.read(&mut chunk).map_err(Failure::Io)?;
            if n == 0 {
                return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            match c.feed(&chunk[..n]) {
                Progress::More => {}
                Progress::Admitted {
                    mut channel, name, ..
                } => {
                    s.write_all(&c.out).map_err(Failure::Io)?;
                    channel.send(&mut s, &Frame::Line(format!("SESSION {name}")))?;
                    return Ok((channel, s));
                }
                Progress::Failed(f) => {
                    let _ = s.write_all(&c.out);
                    return Err(f);
                }
            }
        }
    }

    fn status(f: Failure) -> ExitStatus {
        Error::from(f).status
    }

    #[test]
    fn same_key_opens_a_session_and_both_derive_the_stream_secret() {
        let (a, b) = pair();
        let pool = std::thread::spawn(move || {
            let (mut ch, mut s) = pool_side(b, "k12").unwrap();
            assert_eq!(ch.recv(&mut s).unwrap(), Frame::Line("DAEMON dem1".into()));
            ch.send(&mut s, &Frame::Line("PORT 30001".into())).unwrap();
            assert_eq!(ch.recv(&mut s).unwrap(), Frame::Line("END".into()));
            ch.send(&mut s, &Frame::Line("BYE".into())).unwrap();
            ch.stream_secret("m.dem1")
        });
        let mut conn = Conn::new(a, Duration::from_secs(5)).unwrap();
        let session = authenticate(&mut conn, &key("k12"), &id("m")).unwrap();
        assert_eq!(session, id("m"));
        assert_eq!(request_port(&mut conn, &id("dem1")).unwrap(), Port(30001));
        end(&mut conn).unwrap();
        let theirs = pool.join().unwrap();
        assert_eq!(*theirs, *conn.stream_secret(&id("m.dem1")));
        assert_ne!(*theirs, *conn.stream_secret(&id("m.dem2")));
    }

    #[test]
    fn a_wrong_key_is_denied_on_both_sides() {
        let (a, b) = pair();
        let pool = std::thread::spawn(move || pool_side(b, "k12").map(|_| ()));
        let mut conn = Conn::new(a, Duration::from_secs(5)).unwrap();
        let master = authenticate(&mut conn, &key("k13"), &id("m")).unwrap_err();
        assert!(master.to_string().contains("wrong key"), "{master}");
        assert_eq!(status(master), ExitStatus::NoPerm);
        let pool = pool.join().unwrap();
        assert!(matches!(pool, Err(Failure::Denied(_))), "{pool:?}");
    }

    #[test]
    fn a_version_1_pool_or_master_is_told_both_versions() {
        // A v1 pool's challenge, to this master.
        let (a, mut b) = pair();
        b.write_all(format!("FIFOBIND 1 CHALLENGE {}\n", "ab".repeat(32)).as_bytes())
            .unwrap();
        let mut conn = Conn::new(a, Duration::from_secs(5)).unwrap();
        let err = authenticate(&mut conn, &key("k"), &id("m")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the pool speaks protocol version 1, this master speaks version 2"
        );
        assert_eq!(status(err), ExitStatus::Unavailable);
        // A v1 master's answer, to this pool.
        let mut c = Challenge::new(&key("k"));
        let line = format!("FIFOBIND 1 AUTH {} {}\n", "ab".repeat(32), "cd".repeat(32));
        assert!(matches!(
            c.feed(line.as_bytes()),
            Progress::Failed(Failure::Version(_))
        ));
        assert_eq!(c.out, format!("{OLD_PEER}\n").as_bytes());
    }

    #[test]
    fn busy_or_held_back_in_place_of_a_greeting_is_a_temporary_failure() {
        for why in [
            "busy: too many connections",
            "too many wrong keys from 127.0.0.1; retry in 2 s",
        ] {
            let (a, mut b) = pair();
            b.write_all(format!("ERR {why}\n").as_bytes()).unwrap();
            let mut conn = Conn::new(a, Duration::from_secs(5)).unwrap();
            let err = authenticate(&mut conn, &key("k"), &id("m")).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
            assert_eq!(status(err), ExitStatus::TempFail);
        }
    }

    #[test]
    fn garbage_at_the_pool_gets_a_clear_err() {
        for bad in [
            &b"HELLO pool\n"[..],
            b"FIFOBIND 2 CONTROL zz\n",
            b"\0\n",
            &[b'x'; 600],
        ] {
            let mut c = Challenge::new(&key("k"));
            assert!(matches!(c.feed(bad), Progress::Failed(_)), "{bad:?}");
            assert!(c.out.starts_with(b"ERR "), "{bad:?}");
        }
    }

    #[test]
    fn a_silent_peer_times_out_and_a_stop_signal_ends_the_wait() {
        let (a, _silent) = pair();
        let mut conn = Conn::new(a, Duration::from_millis(200)).unwrap();
        let err = authenticate(&mut conn, &key("k"), &id("m")).unwrap_err();
        assert_eq!(status(err), ExitStatus::TempFail);

        // SIGUSR2 is no signal of this test binary's.
        conn.step = Duration::from_secs(60);
        conn.stop_on(Signals::of_for_tests(Signal::SIGUSR2));
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        let started = Instant::now();
        let err = authenticate(&mut conn, &key("k"), &id("m")).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Failure::Stopped(Signal::SIGUSR2)), "{err:?}");
        let err = Error::from(err);
        assert_eq!(err.status, ExitStatus::Signal(libc::SIGUSR2));
        assert!(err.message.is_empty());
    }

    /// A stop signal that comes while the master waits for BYE is passed
    /// on, not taken as a missing BYE: it was read, and a master that
    /// went on to wait for its daemons would never see it again.
    #[test]
    fn a_stop_signal_while_waiting_for_bye_is_passed_on() {
        let (a, b) = pair();
        let (held, hold) = std::sync::mpsc::channel();
        let pool = std::thread::spawn(move || {
            let (mut ch, mut s) = pool_side(b, "k12").unwrap();
            assert_eq!(ch.recv(&mut s).unwrap(), Frame::Line("END".into()));
            // No BYE: held until the master is done.
            let _ = hold.recv();
        });
        let mut conn = Conn::new(a, Duration::from_secs(60)).unwrap();
        authenticate(&mut conn, &key("k12"), &id("m")).unwrap();
        // SIGUSR2 is no signal of this test binary's.
        conn.stop_on(Signals::of_for_tests(Signal::SIGUSR2));
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        let started = Instant::now();
        let err = end(&mut conn).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Failure::Stopped(Signal::SIGUSR2)), "{err:?}");
        held.send(()).unwrap();
        pool.join().unwrap();
    }

    proptest! {
        /// Whatever bytes arrive at the pool, its handshake answers with
        /// progress or a failure, never a panic, and admits nobody.
        #[test]
        fn the_pools_handshake_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut c = Challenge::new(&key("k"));
            let admitted = matches!(c.feed(&bytes), Progress::Admitted { .. });
            prop_assert!(!admitted);
        }

        #[test]
        fn parser_survives_near_misses(
            head in prop::sample::select(vec!["HELLO", "SESSION", "DAEMON", "PORT", "END", "BYE", "ERR"]),
            rest in "[ -~]{0,80}",
        ) {
            let line = format!("{head} {rest}");
            if let Ok(msg) = Message::parse(&line) {
                prop_assert_eq!(Message::parse(&msg.to_string()), Ok(msg));
            }
        }
    }
}
