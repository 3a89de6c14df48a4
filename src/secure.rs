//! The sealed channel of protocol 2: a SPAKE2 handshake over the shared
//! key, then every byte in ChaCha20-Poly1305 frames.
//!
//! Protocol 1 proved knowledge of the key with an HMAC over two nonces and
//! then spoke in the clear: anyone on the path could read, inject or
//! rewrite what followed, and one captured exchange let a key guess be
//! checked offline (the HMAC is a function of the key and the visible
//! nonces). Here both sides run SPAKE2 (RustCrypto's `spake2`, Ed25519
//! group), a password-authenticated key exchange: each greeting is a
//! random group element blinded by the key, so a passive capture holds
//! nothing a guess can be tested against, and an active attacker gets one
//! guess per connection (which the pool rate-limits). The shared secret
//! and a hash of both greetings go through HKDF-SHA256 into one key per
//! direction and an exporter secret; everything after the greetings is
//! sealed frames whose nonces are their sequence numbers, so a dropped,
//! replayed, reordered or altered frame fails to open, and the first
//! frame each side sends is a confirmation that proves it derived the
//! same keys (a wrong key is found there, before anything else is said).
//!
//! ```text
//! listener:  FIFOBIND 2 <PURPOSE> <66 hex digits: the SPAKE2 message>\n
//!            | ERR <reason>\n, then close      (e.g. rate-limited)
//! connector: FIFOBIND 2 <PURPOSE> <66 hex digits>\n
//! both:      frames: LEN (u32, big-endian) || AEAD(key, nonce, LEN, KIND || BODY)
//! ```
//!
//! The same handshake guards a master's control connection (purpose
//! `CONTROL`, secret: KEY) and every data stream (purpose `STREAM`,
//! secret: KEY for a standalone pair, or a per-stream secret both ends of
//! a session derive from its exporter), so one piece of code does both.

use std::fmt;
use std::io::{self, Read, Write};

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use zeroize::Zeroizing;

use crate::protocol::{Failure, MAX_LINE};

/// The protocol version this module speaks.
pub(crate) const VERSION: u32 = 2;
/// The largest body of one frame. Data is cut into frames of at most this.
pub(crate) const MAX_BODY: usize = 64 * 1024;
const TAG: usize = 16;
const HEADER: usize = 4;
/// The largest sealed part of a frame: its kind byte, body and tag.
const MAX_SEALED: usize = 1 + MAX_BODY + TAG;
/// A SPAKE2 message on Ed25519: a side byte and a 32-byte element.
const SPAKE_MSG: usize = 33;

/// What a handshake opens: the control connection of a master's session,
/// or one data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Control,
    Stream,
}

impl Purpose {
    fn word(self) -> &'static str {
        match self {
            Purpose::Control => "CONTROL",
            Purpose::Stream => "STREAM",
        }
    }
}

/// Which end of the TCP connection this is. The listener speaks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Listener,
    Connector,
}

/// One frame's meaning. `Line` carries a control message (the text lines
/// of protocol 1: `DAEMON`, `PORT`, `END`, ...), `Data` a stream's bytes,
/// `Ack` how many of a stream's bytes the receiver has written into its
/// FIFO, `Close` the authenticated end of a stream (without it, a closed
/// connection is a break, not an end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Confirm,
    Line(String),
    Data(Vec<u8>),
    Ack(u64),
    Close,
}

const CONFIRM: u8 = 1;
const LINE: u8 = 2;
const DATA: u8 = 3;
const ACK: u8 = 4;
const CLOSE: u8 = 5;

/// A handshake under way: our greeting is sent, the peer's awaited.
pub struct Hello {
    spake: Spake2<Ed25519Group>,
    side: Side,
    purpose: Purpose,
    line: String,
}

impl Hello {
    /// Starts a handshake over `secret` (the key, or a stream secret).
    pub fn start(side: Side, purpose: Purpose, secret: &[u8]) -> Hello {
        let ids = (
            Identity::new(format!("fifobind-2 {} connector", purpose.word()).as_bytes()),
            Identity::new(format!("fifobind-2 {} listener", purpose.word()).as_bytes()),
        );
        let password = Password::new(secret);
        let (spake, msg) = match side {
            Side::Connector => Spake2::<Ed25519Group>::start_a(&password, &ids.0, &ids.1),
            Side::Listener => Spake2::<Ed25519Group>::start_b(&password, &ids.0, &ids.1),
        };
        let line = format!("FIFOBIND {VERSION} {} {}", purpose.word(), hex::encode(msg));
        Hello {
            spake,
            side,
            purpose,
            line,
        }
    }

    /// Our greeting, without its newline.
    pub fn line(&self) -> &str {
        &self.line
    }

    /// Takes the peer's greeting (without its newline) and derives the
    /// channel. A wrong key is not found here, but by [`Channel::confirm`].
    pub fn finish(self, peer: &str) -> Result<Channel, Failure> {
        let msg = parse_greeting(peer, self.purpose)?;
        let shared = Zeroizing::new(
            self.spake
                .finish(&msg)
                .map_err(|e| Failure::Protocol(format!("bad handshake message: {e:?}")))?,
        );
        let (listener, connector) = match self.side {
            Side::Listener => (self.line.as_str(), peer),
            Side::Connector => (peer, self.line.as_str()),
        };
        let transcript = Sha256::new()
            .chain_update(b"fifobind-2 transcript\n")
            .chain_update(listener.as_bytes())
            .chain_update(b"\n")
            .chain_update(connector.as_bytes())
            .finalize();
        let hkdf = Hkdf::<Sha256>::new(Some(&transcript), &shared);
        let expand = |info: &str| {
            let mut out = Zeroizing::new([0u8; 32]);
            hkdf.expand(info.as_bytes(), out.as_mut())
                .expect("32 bytes is a valid HKDF-SHA256 length");
            out
        };
        let to_listener = expand("fifobind-2 connector to listener");
        let to_connector = expand("fifobind-2 listener to connector");
        let (send, recv) = match self.side {
            Side::Listener => (to_connector, to_listener),
            Side::Connector => (to_listener, to_connector),
        };
        Ok(Channel {
            sealer: Sealer::new(&send),
            opener: Opener::new(&recv),
            exporter: expand("fifobind-2 exporter"),
        })
    }
}

/// Reads a greeting: `FIFOBIND 2 PURPOSE HEX`. A peer of another version
/// is told apart from garbage, so that the error can name both versions.
fn parse_greeting(line: &str, purpose: Purpose) -> Result<Vec<u8>, Failure> {
    let words: Vec<&str> = line.split(' ').collect();
    match words.as_slice() {
        ["FIFOBIND", v, ..] if *v != VERSION.to_string() => {
            let v: String = v.chars().take(10).collect();
            Err(Failure::Protocol(format!(
                "the peer speaks protocol version {v:?}, this side speaks version {VERSION}"
            )))
        }
        ["FIFOBIND", _, word, msg] if *word == purpose.word() => match hex::decode(msg) {
            Ok(bytes) if bytes.len() == SPAKE_MSG => Ok(bytes),
            _ => Err(Failure::Protocol("bad handshake message".into())),
        },
        ["FIFOBIND", _, word, ..] => {
            let word: String = word.chars().take(10).collect();
            Err(Failure::Protocol(format!(
                "expected a {} handshake, got {word:?}",
                purpose.word()
            )))
        }
        ["ERR", ..] if line.len() > 4 => Err(Failure::Refused(line[4..].to_string())),
        _ => Err(Failure::Protocol(format!(
            "expected a protocol {VERSION} greeting, got {:?}",
            line.chars().take(40).collect::<String>()
        ))),
    }
}

/// An established channel: one sealer, one opener, and the exporter
/// secret from which a session derives its streams' secrets.
pub struct Channel {
    pub(crate) sealer: Sealer,
    pub(crate) opener: Opener,
    exporter: Zeroizing<[u8; 32]>,
}

impl Channel {
    /// The secret of one stream of this session, named by `name` (for a
    /// pool session: the stream's name). Both ends derive the same one.
    pub fn stream_secret(&self, name: &str) -> Zeroizing<[u8; 32]> {
        let hkdf = Hkdf::<Sha256>::from_prk(self.exporter.as_ref()).expect("32-byte PRK");
        let mut out = Zeroizing::new([0u8; 32]);
        hkdf.expand(format!("fifobind-2 stream {name}").as_bytes(), out.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        out
    }

    /// Sends our confirmation and checks the peer's, over a blocking
    /// stream. A frame that does not open means the two keys differ (or
    /// someone altered the greetings).
    pub fn confirm<S: Read + Write>(&mut self, stream: &mut S) -> Result<(), Failure> {
        let mut out = Vec::new();
        self.sealer.seal(&Frame::Confirm, &mut out);
        stream.write_all(&out).map_err(Failure::Io)?;
        match self.recv(stream) {
            Ok(Frame::Confirm) => Ok(()),
            Ok(other) => Err(Failure::Protocol(format!(
                "expected a confirmation, got {}",
                other.kind_name()
            ))),
            Err(Failure::Protocol(_)) => Err(Failure::Refused(
                "authentication failed: the keys differ (or the connection was tampered with)"
                    .into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// Seals and writes one frame to a blocking stream.
    pub fn send<S: Write>(&mut self, stream: &mut S, frame: &Frame) -> Result<(), Failure> {
        let mut out = Vec::new();
        self.sealer.seal(frame, &mut out);
        stream.write_all(&out).map_err(Failure::Io)
    }

    /// Reads and opens one frame from a blocking stream.
    pub fn recv<S: Read>(&mut self, stream: &mut S) -> Result<Frame, Failure> {
        let mut header = [0u8; HEADER];
        stream.read_exact(&mut header).map_err(Failure::Io)?;
        let len = sealed_len(header)?;
        let mut sealed = vec![0u8; HEADER + len];
        sealed[..HEADER].copy_from_slice(&header);
        stream
            .read_exact(&mut sealed[HEADER..])
            .map_err(Failure::Io)?;
        match self.opener.open(&sealed)? {
            Some((frame, n)) if n == sealed.len() => Ok(frame),
            _ => unreachable!("a whole frame was read"),
        }
    }
}

fn sealed_len(header: [u8; HEADER]) -> Result<usize, Failure> {
    let len = u32::from_be_bytes(header) as usize;
    if !(1 + TAG..=MAX_SEALED).contains(&len) {
        return Err(Failure::Protocol(format!(
            "frame of {len} bytes (limit {MAX_SEALED})"
        )));
    }
    Ok(len)
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n.into()
}

/// Seals frames of one direction, numbering them.
pub(crate) struct Sealer {
    cipher: ChaCha20Poly1305,
    seq: u64,
}

impl Sealer {
    fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
            seq: 0,
        }
    }

    /// Appends `frame`, sealed, to `out`. A `Data` body longer than
    /// [`MAX_BODY`] is a bug of the caller's.
    pub(crate) fn seal(&mut self, frame: &Frame, out: &mut Vec<u8>) {
        let (kind, body): (u8, &[u8]) = match frame {
            Frame::Confirm => (CONFIRM, b"fifobind-2 confirm"),
            Frame::Line(l) => (LINE, l.as_bytes()),
            Frame::Data(d) => (DATA, d),
            Frame::Ack(n) => (ACK, &n.to_be_bytes()),
            Frame::Close => (CLOSE, b""),
        };
        self.seal_raw(kind, body, out);
    }

    /// Appends one `Data` frame holding `body` (at most [`MAX_BODY`]).
    pub(crate) fn seal_data(&mut self, body: &[u8], out: &mut Vec<u8>) {
        self.seal_raw(DATA, body, out);
    }

    fn seal_raw(&mut self, kind: u8, body: &[u8], out: &mut Vec<u8>) {
        assert!(body.len() <= MAX_BODY, "frame body over the limit");
        let len = (1 + body.len() + TAG) as u32;
        let header = len.to_be_bytes();
        let start = out.len();
        out.extend_from_slice(&header);
        out.push(kind);
        out.extend_from_slice(body);
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce(self.seq),
                &header,
                (&mut out[start + HEADER..]).into(),
            )
            .expect("a frame under the limit seals");
        out.extend_from_slice(&tag);
        // 2^64 frames of one direction is more than any connection lives.
        self.seq += 1;
    }
}

/// Opens frames of one direction, in order.
pub(crate) struct Opener {
    cipher: ChaCha20Poly1305,
    seq: u64,
}

impl Opener {
    fn new(key: &[u8; 32]) -> Opener {
        Opener {
            cipher: ChaCha20Poly1305::new(&Key::from(*key)),
            seq: 0,
        }
    }

    /// Opens the frame at the start of `buf`, if it has arrived whole:
    /// `Ok(None)` asks for more bytes, `Ok(Some((frame, used)))` says how
    /// many bytes it took. A frame that fails to open, or breaks a limit,
    /// is an error after which the connection is worthless.
    pub(crate) fn open(&mut self, buf: &[u8]) -> Result<Option<(Frame, usize)>, Failure> {
        let Some(header) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let header: [u8; HEADER] = header.try_into().expect("4 bytes");
        let len = sealed_len(header)?;
        let Some(sealed) = buf.get(HEADER..HEADER + len) else {
            return Ok(None);
        };
        let (plain, tag) = sealed.split_at(len - TAG);
        let mut plain = plain.to_vec();
        self.cipher
            .decrypt_inout_detached(
                &nonce(self.seq),
                &header,
                plain.as_mut_slice().into(),
                tag.try_into().expect("16-byte tag"),
            )
            .map_err(|_| {
                Failure::Protocol(
                    "a frame failed authentication (altered, replayed or out of order)".into(),
                )
            })?;
        self.seq += 1;
        let body = &plain[1..];
        let frame = match plain[0] {
            CONFIRM if body == b"fifobind-2 confirm" => Frame::Confirm,
            LINE if body.len() < MAX_LINE && crate::protocol::check_line(body).is_ok() => {
                Frame::Line(String::from_utf8(body.to_vec()).expect("checked ASCII"))
            }
            DATA => {
                plain.remove(0);
                Frame::Data(plain)
            }
            ACK if body.len() == 8 => Frame::Ack(u64::from_be_bytes(body.try_into().expect("8"))),
            CLOSE if body.is_empty() => Frame::Close,
            kind => {
                return Err(Failure::Protocol(format!("malformed frame of kind {kind}")));
            }
        };
        Ok(Some((frame, HEADER + len)))
    }
}

impl Frame {
    fn kind_name(&self) -> &'static str {
        match self {
            Frame::Confirm => "a confirmation",
            Frame::Line(_) => "a control line",
            Frame::Data(_) => "data",
            Frame::Ack(_) => "an acknowledgement",
            Frame::Close => "a close",
        }
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Line(l) => write!(f, "{l:?}"),
            Frame::Data(d) => write!(f, "{} bytes of data", d.len()),
            Frame::Ack(n) => write!(f, "ACK {n}"),
            other => f.write_str(other.kind_name()),
        }
    }
}

/// Reads one greeting line byte by byte (so nothing after it is taken
/// from the stream), at most [`MAX_LINE`] bytes; the caller bounds the
/// time with the socket's timeouts.
pub fn read_greeting<S: Read>(stream: &mut S) -> Result<String, Failure> {
    let mut line = Vec::with_capacity(96);
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).map_err(Failure::Io)? == 0 {
            return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_LINE {
            return Err(Failure::Protocol(format!(
                "line longer than {MAX_LINE} bytes"
            )));
        }
        line.push(byte[0]);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    crate::protocol::check_line(&line)?;
    Ok(String::from_utf8(line).expect("checked to be ASCII"))
}

/// The whole handshake over a blocking stream: greetings (the listener's
/// first), keys, confirmations.
pub fn handshake<S: Read + Write>(
    stream: &mut S,
    side: Side,
    purpose: Purpose,
    secret: &[u8],
) -> Result<Channel, Failure> {
    let hello = Hello::start(side, purpose, secret);
    let ours = format!("{}\n", hello.line());
    let peer = match side {
        Side::Listener => {
            stream.write_all(ours.as_bytes()).map_err(Failure::Io)?;
            read_greeting(stream)?
        }
        Side::Connector => {
            let peer = read_greeting(stream)?;
            stream.write_all(ours.as_bytes()).map_err(Failure::Io)?;
            peer
        }
    };
    let mut channel = hello.finish(&peer)?;
    channel.confirm(stream)?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn pair(
        purpose: (Purpose, Purpose),
        keys: (&'static [u8], &'static [u8]),
    ) -> (Result<Channel, Failure>, Result<Channel, Failure>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let listener = thread::spawn(move || {
            let r = handshake(&mut a, Side::Listener, purpose.0, keys.0);
            (r, a)
        });
        let connector = handshake(&mut b, Side::Connector, purpose.1, keys.1);
        let (listener, _a) = listener.join().unwrap();
        (listener, connector)
    }

    #[test]
    fn same_key_opens_a_channel_both_ways() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            let mut ch = handshake(&mut a, Side::Listener, Purpose::Control, b"k12").unwrap();
            assert_eq!(ch.recv(&mut a).unwrap(), Frame::Line("DAEMON dem1".into()));
            ch.send(&mut a, &Frame::Line("PORT 30001".into())).unwrap();
            assert_eq!(ch.recv(&mut a).unwrap(), Frame::Data(b"x\n".to_vec()));
            assert_eq!(ch.recv(&mut a).unwrap(), Frame::Close);
            ch.stream_secret("m.dem1")
        });
        let mut ch = handshake(&mut b, Side::Connector, Purpose::Control, b"k12").unwrap();
        ch.send(&mut b, &Frame::Line("DAEMON dem1".into())).unwrap();
        assert_eq!(ch.recv(&mut b).unwrap(), Frame::Line("PORT 30001".into()));
        ch.send(&mut b, &Frame::Data(b"x\n".to_vec())).unwrap();
        ch.send(&mut b, &Frame::Close).unwrap();
        let theirs = t.join().unwrap();
        assert_eq!(*theirs, *ch.stream_secret("m.dem1"));
        assert_ne!(*theirs, *ch.stream_secret("m.dem2"));
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (l, c) = pair((Purpose::Control, Purpose::Control), (b"k12", b"k13"));
        for r in [l, c] {
            match r {
                Err(Failure::Refused(why)) => assert!(why.contains("keys differ"), "{why}"),
                Err(other) => panic!("unexpected failure {other}"),
                Ok(_) => panic!("a wrong key opened a channel"),
            }
        }
    }

    #[test]
    fn a_stream_handshake_is_not_a_control_handshake() {
        let (l, c) = pair((Purpose::Control, Purpose::Stream), (b"k12", b"k12"));
        assert!(l.is_err() && c.is_err());
    }

    #[test]
    fn version_one_peer_is_named() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"FIFOBIND 1 CHALLENGE 00\n").unwrap();
        match handshake(&mut b, Side::Connector, Purpose::Control, b"k") {
            Err(Failure::Protocol(why)) => {
                assert!(
                    why.contains("version \"1\"") && why.contains("version 2"),
                    "{why}"
                )
            }
            _ => panic!("a version-1 greeting was accepted"),
        }
    }

    #[test]
    fn refusal_instead_of_greeting_is_a_refusal() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"ERR too many failed attempts\n").unwrap();
        assert!(matches!(
            handshake(&mut b, Side::Connector, Purpose::Control, b"k"),
            Err(Failure::Refused(_))
        ));
    }

    /// Sets up two matching directions without sockets.
    fn sealer_opener() -> (Sealer, Opener) {
        let key = [7u8; 32];
        (Sealer::new(&key), Opener::new(&key))
    }

    #[test]
    fn altered_replayed_dropped_or_reordered_frames_fail() {
        let (mut s, _) = sealer_opener();
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                let mut out = Vec::new();
                s.seal(&Frame::Data(vec![i; 10]), &mut out);
                out
            })
            .collect();
        // In order: fine, and partial input asks for more.
        let (_, mut o) = sealer_opener();
        assert!(o.open(&frames[0][..5]).unwrap().is_none());
        assert_eq!(
            o.open(&frames[0]).unwrap(),
            Some((Frame::Data(vec![0; 10]), frames[0].len()))
        );
        // Replayed.
        assert!(o.open(&frames[0]).is_err());
        // Dropped (frame 1 skipped) or reordered.
        let (_, mut o) = sealer_opener();
        o.open(&frames[0]).unwrap();
        assert!(o.open(&frames[2]).is_err());
        // Altered: every single byte flipped in turn.
        for i in 0..frames[0].len() {
            let mut bad = frames[0].clone();
            bad[i] ^= 0x20;
            let (_, mut o) = sealer_opener();
            assert!(
                !matches!(o.open(&bad), Ok(Some(_))),
                "byte {i} flipped went through"
            );
        }
    }

    #[test]
    fn limits_are_checked_before_decrypting() {
        let (_, mut o) = sealer_opener();
        let huge = ((MAX_SEALED + 1) as u32).to_be_bytes();
        assert!(o.open(&huge).is_err());
        assert!(o.open(&[0, 0, 0, 3]).is_err());
    }

    #[test]
    fn nothing_of_the_key_or_the_data_is_in_the_clear() {
        // A capture of a whole exchange: greetings and a sealed line.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let secret_line = "secret payroll data from dem1";
        let t = thread::spawn(move || {
            let mut ch = handshake(&mut a, Side::Listener, Purpose::Stream, b"k12").unwrap();
            let mut all = Vec::new();
            a.read_to_end(&mut all).unwrap();
            let mut o = 0;
            while let Some((f, n)) = ch.opener.open(&all[o..]).unwrap() {
                o += n;
                if f == Frame::Close {
                    break;
                }
            }
            all
        });
        let mut wire = Vec::new();
        let mut ch = handshake(&mut b, Side::Connector, Purpose::Stream, b"k12").unwrap();
        ch.sealer.seal(&Frame::Data(secret_line.into()), &mut wire);
        ch.sealer.seal(&Frame::Close, &mut wire);
        b.write_all(&wire).unwrap();
        drop(b);
        let captured = t.join().unwrap();
        let hay = String::from_utf8_lossy(&captured);
        assert!(!hay.contains("payroll"));
        assert!(!hay.contains("k12"));
    }
}
