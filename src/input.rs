//! bind-input: TCP connections in, whole lines out into a FIFO.
//!
//! One thread, one poll loop. Each connection has a fixed buffer; a
//! connection's bytes are written into the FIFO only up to its last
//! newline, so a reader never meets half a line, and only one connection
//! at a time may be in the middle of a line in the FIFO, so lines of
//! concurrent connections never interleave. When the FIFO is full, the
//! binding stops reading the sockets whose buffers are full and TCP flow
//! control holds the senders back: memory stays bounded by
//! `--max-conns × LINE_BUFFER + MAX_GROWN × BULK_BUFFER` (with `--key`,
//! plus [`RAW_LIMIT`] of sealed bytes per connection).
//!
//! With `--key` a connection speaks the stream protocol (see stream.rs):
//! its handshake runs in this same loop, step by step as its bytes come,
//! so a slow or hostile client never holds the others up, and nothing
//! reaches its line buffer before it has authenticated and named its
//! stream.
//!
//! Whole lines go into the FIFO only as far as the kernel takes them whole
//! ([`PipeRoom`]), and no connection can hold the binding: mid-line
//! ownership, silence and the number of connections all have limits, and
//! running out of descriptors pauses accepting instead of spinning.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::args::{Id, Key, Port};
use crate::binding::{Binding, BindingOptions, Reason, StopEvents};
use crate::cli::{self, StreamKeyArgs};
use crate::error::{Error, ExitStatus, Result};
use crate::fifo::Fifo;
use crate::framer::{LineBuffer, PipeRoom};
use crate::net::{self, Allow};
use crate::poll::{IN, OUT, PollSet, TROUBLE};
use crate::secure::{self, Channel, Frame, Hello, Purpose, Side};
use crate::stream::{self, Streams};

/// A connection's buffer, and so the longest line delivered with a single
/// write(2). A longer line is passed on in pieces as it arrives, still
/// intact and never interleaved with other lines.
pub(crate) const LINE_BUFFER: usize = 128 * 1024;
/// A connection whose reads keep filling its buffer (a bulk sender) gets
/// a buffer this large, for fewer calls per byte; at most
/// [`MAX_GROWN`] connections at once, so memory stays bounded.
const BULK_BUFFER: usize = 1024 * 1024;
const MAX_GROWN: usize = 8;
/// How many of one relay's connections hold a bulk buffer now: shared by
/// the relay and its connections (one thread), so a connection that ends
/// gives its place back when it is dropped.
#[derive(Clone, Default)]
struct BulkBudget(std::rc::Rc<std::cell::Cell<usize>>);

impl BulkBudget {
    /// Takes a place if one of the [`MAX_GROWN`] is free.
    fn take(&self) -> bool {
        let n = self.0.get();
        let free = n < MAX_GROWN;
        if free {
            self.0.set(n + 1);
        }
        free
    }

    fn give_back(&self) {
        self.0.set(self.0.get() - 1);
    }
}
/// How often a finished `--once` binding looks whether its FIFO is empty.
const DRAIN_CHECK: Duration = Duration::from_millis(20);
/// After running out of descriptors, accepting is retried when a
/// connection ends, or after this long if none does.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between looks at the FIFO's room while a line waits for
/// enough of it (the kernel wakes a writer for one free page only).
const ROOM_CHECK_MAX: Duration = Duration::from_millis(50);
/// How long a write into a FIFO that woke us with little room waits for
/// the reader to take more (see [`Inbound::room_freed`]): short enough
/// that a fast reader still has most of the FIFO to read meanwhile (a
/// reader at 250 MB/s takes a quarter of 1 MiB in 1 ms).
const REFILL_DELAY: Duration = Duration::from_millis(1);
/// Keepalive on accepted connections: a peer whose host vanished (no FIN,
/// no reset) is found dead after about IDLE + COUNT × INTERVAL.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_COUNT: u32 = 5;

/// Listen on a TCP port; what arrives is readable, line by line, from the
/// named pipe <runtime dir>/ID. Prints the PID of the background binding.
// bind-input's command line (the `///` comments are its `--help` text),
// then [`InputOptions::resolve`]d.
#[derive(clap::Parser, Debug)]
#[command(name = "bind-input", version)]
pub struct InputOptions {
    /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_name = "ID")]
    pub(crate) id: Id,

    /// The TCP port to listen on, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// Listen on this local address only (default: every address, IPv4 and
    /// IPv6)
    #[arg(short, long, value_name = "ADDR")]
    pub(crate) bind: Option<IpAddr>,

    /// Serve a single connection; once it has ended and the FIFO has been
    /// read empty, remove the FIFO and exit
    #[arg(long)]
    pub(crate) once: bool,

    /// Accept connections from these addresses only (ADDR or ADDR/PREFIX;
    /// repeat the option or separate with commas); others are closed at once
    #[arg(long, value_name = "ADDR[/PREFIX]", value_delimiter = ',')]
    pub(crate) allow: Vec<Allow>,

    /// Serve at most N connections at once; further ones wait in the
    /// listen backlog (0: no limit)
    #[arg(long, value_name = "N", default_value = "128")]
    pub(crate) max_conns: usize,

    /// Serve at most N connections from one address at once; further ones
    /// from it are closed at once (0: no limit)
    #[arg(long, value_name = "N", default_value = "0")]
    pub(crate) max_conns_per_addr: usize,

    /// Close a connection that has sent nothing within SECS seconds of
    /// connecting (0: never; default 60, never with --once)
    // `::std::option::Option`: clap then takes the parser's `None` (for
    // 0) as the value, instead of making the option optional.
    #[arg(long, value_name = "SECS", value_parser = cli::seconds_or_none)]
    #[arg(default_value = "60", hide_default_value = true)]
    #[arg(default_value_if("once", "true", "0"))]
    pub(crate) idle_timeout: ::std::option::Option<Duration>,

    /// Let a connection hold the FIFO in the middle of a line for SECS
    /// seconds of waiting for its rest; then complete the line and close
    /// the connection (0: no limit; default 10, none with --once)
    #[arg(long, value_name = "SECS", value_parser = cli::seconds_or_none)]
    #[arg(default_value = "10", hide_default_value = true)]
    #[arg(default_value_if("once", "true", "0"))]
    pub(crate) line_timeout: ::std::option::Option<Duration>,

    /// With --once: exit (status 75) if nobody connected within SECS seconds
    #[arg(long, value_name = "SECS", value_parser = cli::seconds, requires = "once")]
    pub(crate) accept_timeout: Option<Duration>,

    #[command(flatten)]
    pub(crate) key_args: StreamKeyArgs,

    /// The stream protocol's secret (see stream.rs), read from `key_args`
    /// by [`InputOptions::resolve`].
    #[arg(skip)]
    pub(crate) key: Option<Key>,

    #[command(flatten)]
    pub(crate) common: BindingOptions,
}

impl InputOptions {
    /// Reads the key the options name: call it before any thread starts.
    pub fn resolve(mut self) -> Result<InputOptions> {
        self.key = self.key_args.resolve()?;
        Ok(self)
    }
}

/// The most sealed bytes a keyed connection holds before they are opened:
/// two whole frames, so reading stops (and TCP holds the sender back)
/// while the FIFO is full.
const RAW_LIMIT: usize = 2 * (secure::MAX_BODY + 64);
/// Wrong keys: the first holds its address back this long, each next one
/// twice as long, up to [`PENALTY_MAX`]; a summary goes to the log at
/// most every [`PENALTY_LOG`], not a line per attempt.
const PENALTY_BASE: Duration = Duration::from_secs(1);
const PENALTY_MAX: Duration = Duration::from_secs(60);
const PENALTY_LOG: Duration = Duration::from_secs(10);

pub fn run(opts: InputOptions) -> Result<()> {
    let binding = Binding::open(&opts.id, &opts.common)?;
    let listener = match crate::activation::listen(opts.bind, opts.port) {
        Ok(l) => l,
        Err(e) => {
            binding.close();
            return Err(e);
        }
    };
    let common = opts.common.clone();
    binding.run("bind-input", &common, move |binding, stop, ready| {
        let capacity = binding.fifo.capacity();
        log::info!(
            "{} listening on port {}, FIFO {} (capacity {capacity} bytes: lines up to {} bytes go in whole)",
            binding.id,
            opts.port,
            binding.fifo.path().display(),
            atomic_size(capacity),
        );
        // Every byte passes through the line buffers: lines are counted.
        crate::status::count_lines();
        crate::status::start_binding(binding, "bind-input", opts.port.0, None);
        binding.ready(ready);
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize);
        let mut relay = Inbound {
            binding,
            listener: Some(listener),
            conns: Vec::new(),
            per_addr: std::collections::HashMap::new(),
            owner: None,
            owner_waited: Duration::ZERO,
            owner_waiting: None,
            turn: 0,
            next_token: 0,
            fifo_blocked: false,
            room: PipeRoom::new(capacity, page),
            room_check: None,
            refill_at: None,
            accept_paused: None,
            accept_warned: false,
            cut_logged: false,
            served: false,
            arrived: false,
            streams: Streams::default(),
            once_stream: None,
            bulk: BulkBudget::default(),
            penalties: crate::penalty::Penalties::new(PENALTY_BASE, PENALTY_MAX, 4096),
            opts: &opts,
        };
        relay.serve(stop)
    })
}

/// What of `chunk` (whole lines, or the rest of a split line when
/// `mid_line`) to write now.
fn plan(room_model: &mut PipeRoom, fifo: &Fifo, chunk: &[u8], mid_line: bool) -> Plan {
    let line_end = |c: &[u8]| memchr::memchr(b'\n', c).map_or(c.len(), |i| i + 1);
    if mid_line {
        // Already in pieces: the rest of it as the kernel takes it,
        // but no further than its end, so the lines after it go whole.
        return Plan::Any(line_end(chunk));
    }
    let len = chunk.len();
    // A write of at most PIPE_BUF bytes is all or nothing.
    if len <= libc::PIPE_BUF {
        return Plan::Whole(len);
    }
    let mut room = room_model.room();
    if room < len {
        room_model.unread(fifo.unread());
        room = room_model.room();
    }
    if len <= room {
        return Plan::Whole(len);
    }
    let within = room.max(libc::PIPE_BUF);
    if let Some(i) = memchr::memrchr(b'\n', &chunk[..within]) {
        return Plan::Whole(i + 1);
    }
    let first = line_end(chunk);
    if chunk[first - 1] != b'\n' || first > fifo.capacity() {
        // Longer than the buffer or the FIFO: it goes in pieces.
        return Plan::Any(first);
    }
    Plan::Wait
}

/// Whether a full FIFO that now has `room` bytes free (of `capacity`)
/// should wait [`REFILL_DELAY`] before it is written: while more than
/// three quarters of it are still unread, the reader is in no hurry.
fn refill_waits(room: usize, capacity: usize) -> bool {
    room < capacity / 4
}

/// The longest line the binding writes whole whatever the FIFO's fill: a
/// connection's buffer, or the FIFO's capacity if that is smaller.
pub(crate) fn atomic_size(capacity: usize) -> usize {
    LINE_BUFFER.min(capacity)
}

struct Client {
    /// Its relay's bulk-buffer places.
    bulk: BulkBudget,
    token: u64,
    stream: TcpStream,
    peer: SocketAddr,
    lines: LineBuffer,
    accepted: Instant,
    received: u64,
    /// With --key: the stream protocol's state; nothing reaches `lines`
    /// before the connection has authenticated and named its stream.
    keyed: Option<Box<Keyed>>,
}

/// Where a keyed connection is in the stream protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Our greeting is sent; the peer's is awaited.
    Greeting,
    /// Our confirmation is sent; the peer's is awaited.
    Confirming,
    /// Authenticated; its STREAM line is awaited.
    Naming,
    Streaming,
}

struct Keyed {
    step: Step,
    hello: Option<Hello>,
    channel: Option<Channel>,
    /// Sealed bytes read and not yet opened.
    raw: Vec<u8>,
    /// Sealed bytes to send (greeting, RESUME, Acks).
    out: Vec<u8>,
    /// The stream it carries, once named.
    stream: Option<String>,
    /// Bytes of the stream in `lines` and not yet written.
    buffered: u64,
    /// The offset last acknowledged, and when.
    acked: u64,
    last_ack: Instant,
    /// The sender said Close: what is left is written, then acknowledged.
    closing: bool,
    /// Broken off: nothing more is read.
    gone: bool,
}

impl Keyed {
    fn new(secret: &[u8]) -> Keyed {
        let hello = Hello::start(Side::Listener, Purpose::Stream, secret);
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(hello.line().as_bytes());
        out.push(b'\n');
        Keyed {
            step: Step::Greeting,
            hello: Some(hello),
            channel: None,
            raw: Vec::new(),
            out,
            stream: None,
            buffered: 0,
            acked: 0,
            last_ack: Instant::now(),
            closing: false,
            gone: false,
        }
    }

    fn seal(&mut self, frame: &Frame) {
        if let Some(ch) = self.channel.as_mut() {
            ch.sealer.seal(frame, &mut self.out);
        }
    }
}

impl Client {
    fn new(
        token: u64,
        stream: TcpStream,
        peer: SocketAddr,
        key: Option<&Key>,
        bulk: BulkBudget,
    ) -> Client {
        Client {
            bulk,
            token,
            stream,
            peer,
            lines: LineBuffer::new(LINE_BUFFER),
            accepted: Instant::now(),
            received: 0,
            keyed: key.map(|k| Box::new(Keyed::new(k.as_bytes()))),
        }
    }

    fn wants_input(&self) -> bool {
        match &self.keyed {
            None => self.lines.wants_input(),
            Some(k) => !self.lines.finished() && !k.closing && !k.gone && k.raw.len() < RAW_LIMIT,
        }
    }

    /// Sends what a keyed connection has to send, as far as the socket
    /// takes it now; a failure ends the connection.
    fn flush(&mut self) {
        use std::io::Write;
        let Some(k) = self.keyed.as_mut() else {
            return;
        };
        while !k.out.is_empty() {
            match self.stream.write(&k.out) {
                Ok(n) => {
                    k.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    k.out.clear();
                    self.break_off();
                    return;
                }
            }
        }
    }

    /// A keyed connection ends without its Close: what it brought and is
    /// not yet written is dropped (not acknowledged, so the sender sends
    /// it again).
    fn break_off(&mut self) {
        self.close();
        if let Some(k) = self.keyed.as_mut() {
            k.buffered = 0;
            k.raw.clear();
            k.gone = true;
        }
    }

    /// Reads sealed bytes of a keyed connection.
    fn fill_raw(&mut self) -> io::Result<usize> {
        let k = self.keyed.as_mut().expect("a keyed connection");
        let old = k.raw.len();
        k.raw.resize(RAW_LIMIT.max(old), 0);
        let r = self.stream.read(&mut k.raw[old..]);
        let n = *r.as_ref().unwrap_or(&0);
        k.raw.truncate(old + n);
        self.received += n as u64;
        r
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.keyed.is_some() {
            return self.fill_raw();
        }
        let n = self.stream.read(self.lines.space())?;
        crate::status::add_lines_in(self.lines.filled(n));
        self.received += n as u64;
        if self.lines.is_full() && self.lines.capacity() < BULK_BUFFER && self.bulk.take() {
            self.lines.grow(BULK_BUFFER);
        }
        Ok(n)
    }

    /// Reads no more from this connection and closes it (the client sees
    /// the end); a line half in the FIFO still gets its newline.
    fn close(&mut self) -> usize {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.lines.abandon()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.lines.capacity() == BULK_BUFFER {
            self.bulk.give_back();
        }
    }
}

/// How much of a connection's writable bytes to write now.
enum Plan {
    /// This many, all at once: the FIFO takes them whole.
    Whole(usize),
    /// Up to this many, as far as the kernel takes them: the rest of a
    /// line too long to go whole anyway.
    Any(usize),
    /// Nothing yet: the first line fits the FIFO only once more is read.
    Wait,
}

struct Inbound<'a> {
    binding: &'a mut Binding,
    listener: Option<TcpListener>,
    conns: Vec<Client>,
    /// Connections served now, per (canonical) client address.
    per_addr: std::collections::HashMap<IpAddr, usize>,
    owner: Option<u64>,
    /// How long the owner has waited for the rest of its line, not
    /// counting the time it waits now (since `owner_waiting`).
    owner_waited: Duration,
    owner_waiting: Option<Instant>,
    /// The token whose turn it is to write next: one past the last
    /// writer's. A token, not an index: finished connections leave the
    /// vector, and an index would then skip the one after them.
    turn: u64,
    next_token: u64,
    fifo_blocked: bool,
    room: PipeRoom,
    /// A line waits for room in the FIFO: look again after this long.
    room_check: Option<Duration>,
    /// The FIFO, full, woke us with little room: the next write waits
    /// until then, so that it carries more than a page or two.
    refill_at: Option<Instant>,
    /// Out of descriptors since then: the listener is not polled until a
    /// connection ends or [`ACCEPT_RETRY`] has passed.
    accept_paused: Option<Instant>,
    /// The failure to accept was logged: not again until one succeeds.
    accept_warned: bool,
    cut_logged: bool,
    served: bool,
    /// With --once and a key: a stream has been named (the accept timeout
    /// no longer applies); which one (no other is taken).
    arrived: bool,
    once_stream: Option<String>,
    bulk: BulkBudget,
    /// With a key: the offset of every stream seen.
    streams: Streams,
    /// With a key: addresses held back after wrong keys.
    penalties: crate::penalty::Penalties,
    opts: &'a InputOptions,
}

impl Inbound<'_> {
    fn serve(&mut self, stop: &StopEvents) -> Result<()> {
        let started = Instant::now();
        let mut set = PollSet::default();
        loop {
            if !self.fifo_blocked {
                self.write_pending()?;
            }
            if self.opts.key.is_some() {
                // Frames that waited for room in a line buffer: the writes
                // just made may have made it.
                self.open_frames();
                if !self.fifo_blocked {
                    self.write_pending()?;
                }
            }
            let before = self.conns.len();
            let per_addr = &mut self.per_addr;
            let streams = &mut self.streams;
            let mut once_done = false;
            for c in self.conns.iter_mut() {
                if c.lines.finished()
                    && let Some(k) = c.keyed.as_mut()
                    && let Some(id) = k.stream.take()
                    && let Some(st) = streams.get_mut(&id)
                {
                    st.conn = None;
                    if k.closing && k.buffered == 0 {
                        // Everything is in the FIFO: the last Ack says so.
                        st.ended = true;
                        let end = st.written;
                        k.seal(&Frame::Ack(end));
                        log::info!("stream {id} from {} ended at offset {end}", c.peer);
                        if self.opts.once {
                            once_done = true;
                        }
                        c.flush();
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            if once_done {
                // The --once stream is done: nobody else gets in now.
                self.served = true;
                self.listener = None;
                for c in self.conns.iter_mut() {
                    if c.keyed.as_ref().is_some_and(|k| k.stream.is_none()) && !c.lines.finished() {
                        c.break_off();
                    }
                }
            }
            self.conns.retain(|c| {
                if !c.lines.finished() {
                    return true;
                }
                log::info!("connection from {} ended", c.peer);
                crate::status::peer_gone(c.peer);
                let ip = c.peer.ip();
                if let Some(n) = per_addr.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        per_addr.remove(&ip);
                    }
                }
                false
            });
            if self.conns.len() < before {
                self.accept_paused = None;
            }
            let mut timeout = self.limits();
            if let Some(t) = self.acknowledge() {
                timeout = Some(timeout.map_or(t, |old| old.min(t)));
            }
            let mut deadline = |t: Duration| {
                timeout = Some(timeout.map_or(t, |old: Duration| old.min(t)));
            };
            if let Some(t) = self.room_check {
                deadline(t);
            }
            if let Some(at) = self.refill_at {
                deadline(at.saturating_duration_since(Instant::now()));
            }
            if let Some(since) = self.accept_paused {
                deadline(ACCEPT_RETRY.saturating_sub(since.elapsed()));
            }
            if self.opts.once {
                if self.served && self.conns.is_empty() {
                    if self.binding.fifo.unread() == 0 {
                        log::info!("stream ended and FIFO read empty: closing");
                        return Ok(());
                    }
                    if self.fifo_gone() {
                        log::warn!(
                            "stream ended and FIFO {} removed with {} bytes unread: closing",
                            self.binding.fifo.path().display(),
                            self.binding.fifo.unread()
                        );
                        return Ok(());
                    }
                    deadline(DRAIN_CHECK);
                } else if !self.served
                    && !self.arrived
                    && let Some(limit) = self.opts.accept_timeout
                {
                    let left = limit.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(Error::new(
                            ExitStatus::TempFail,
                            format!(
                                "nobody connected within {} s: giving up",
                                limit.as_secs_f64()
                            ),
                        ));
                    }
                    deadline(left);
                }
            }

            set.clear();
            let stop_slots = stop.register(&mut set);
            let room_for_more = self.opts.max_conns == 0 || self.conns.len() < self.opts.max_conns;
            let listen_slot = match &self.listener {
                Some(l) if room_for_more && self.accept_paused.is_none() => {
                    Some(set.add(l.as_fd(), IN))
                }
                _ => None,
            };
            let fifo_slot =
                (self.fifo_blocked && self.room_check.is_none() && self.refill_at.is_none())
                    .then(|| set.add(self.binding.fifo.as_fd(), OUT));
            let mut conn_slots = Vec::with_capacity(self.conns.len());
            for conn in &self.conns {
                let mut events = if conn.wants_input() { IN } else { 0 };
                if conn.keyed.as_ref().is_some_and(|k| !k.out.is_empty()) {
                    events |= OUT;
                }
                conn_slots.push((events != 0).then(|| set.add(conn.stream.as_fd(), events)));
            }
            set.wait(timeout)
                .map_err(|e| Error::io("cannot wait for events", &e))?;

            match stop.check(&set, stop_slots) {
                // Writers are bind-output's business; nothing to do here.
                Some(Reason::Drain) | None => {}
                Some(reason) => {
                    log::info!("stopping: {reason}");
                    return Ok(());
                }
            }
            if self.room_check.is_some() {
                // Time to look at the room again.
                self.fifo_blocked = false;
            }
            if let Some(slot) = fifo_slot
                && set.revents(slot) != 0
            {
                self.room_freed();
            }
            if self.refill_at.is_some_and(|at| Instant::now() >= at) {
                self.refill_at = None;
                self.fifo_blocked = false;
            }
            if self
                .accept_paused
                .is_some_and(|since| since.elapsed() >= ACCEPT_RETRY)
            {
                self.accept_paused = None;
            }
            for (conn, slot) in self.conns.iter_mut().zip(conn_slots) {
                if let Some(slot) = slot
                    && set.revents(slot) & OUT != 0
                {
                    conn.flush();
                }
                if let Some(slot) = slot
                    && set.revents(slot) & (IN | TROUBLE) != 0
                    && conn.wants_input()
                {
                    match conn.fill() {
                        Ok(0) if conn.keyed.is_some() => {
                            // Without its Close, an end is a break.
                            if conn
                                .keyed
                                .as_ref()
                                .is_some_and(|k| k.step == Step::Streaming)
                            {
                                log::info!(
                                    "connection from {} broke off (no Close): waiting for its sender to resume",
                                    conn.peer
                                );
                            }
                            conn.break_off();
                        }
                        Ok(0) => conn.lines.end_of_stream(),
                        Ok(n) => crate::status::add_in(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            log::warn!(
                                "connection from {}: {}",
                                conn.peer,
                                crate::error::describe_io(&e)
                            );
                            if conn.keyed.is_some() {
                                conn.break_off();
                            } else {
                                conn.lines.end_of_stream();
                            }
                        }
                    }
                }
            }
            if self.opts.key.is_some() {
                self.open_frames();
            }
            if let Some(slot) = listen_slot
                && set.revents(slot) != 0
            {
                self.accept();
            }
        }
    }

    /// The full FIFO has room again. A pipe wakes its writer for each
    /// page its reader frees, so a reader that reads 8 KiB at a time
    /// (`head`, `cat`) would get the FIFO refilled 8 KiB at a time, two
    /// wakeups and three calls each; while the FIFO still holds most of
    /// its capacity the reader has plenty, so the write waits a little
    /// ([`REFILL_DELAY`]) and then carries what the reader took meanwhile.
    fn room_freed(&mut self) {
        self.room.unread(self.binding.fifo.unread());
        if refill_waits(self.room.room(), self.binding.fifo.capacity()) {
            self.refill_at = Some(Instant::now() + REFILL_DELAY);
        } else {
            self.fifo_blocked = false;
        }
    }

    /// Applies the idle and mid-line limits; returns when the next one
    /// falls due, if any.
    fn limits(&mut self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        let mut due = |t: Duration| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(idle) = self.opts.idle_timeout {
            for conn in &mut self.conns {
                if conn.received > 0 || conn.lines.finished() {
                    continue;
                }
                let left = idle.saturating_sub(conn.accepted.elapsed());
                if left.is_zero() {
                    log::warn!(
                        "connection from {}: sent nothing within {} s: closed",
                        conn.peer,
                        idle.as_secs_f64()
                    );
                    conn.close();
                    due(Duration::ZERO);
                } else {
                    due(left);
                }
            }
        }
        for conn in &mut self.conns {
            let Some(k) = &conn.keyed else { continue };
            if k.step == Step::Streaming || conn.lines.finished() {
                continue;
            }
            let left = stream::HANDSHAKE_LIMIT.saturating_sub(conn.accepted.elapsed());
            if left.is_zero() {
                log::warn!(
                    "connection from {}: no stream named within {} s: closed",
                    conn.peer,
                    stream::HANDSHAKE_LIMIT.as_secs()
                );
                conn.break_off();
                due(Duration::ZERO);
            } else {
                due(left);
            }
        }
        let Some(limit) = self.opts.line_timeout else {
            return next;
        };
        let Some(idx) = self
            .owner
            .and_then(|t| self.conns.iter().position(|c| c.token == t))
        else {
            return next;
        };
        let conn = &mut self.conns[idx];
        // Only the time spent waiting for the owner's own bytes counts,
        // not the time its bytes wait for the reader.
        let starved = conn.lines.writable().is_empty() && conn.lines.wants_input();
        if !starved {
            if let Some(since) = self.owner_waiting.take() {
                self.owner_waited += since.elapsed();
            }
            return next;
        }
        let since = *self.owner_waiting.get_or_insert_with(Instant::now);
        let waited = self.owner_waited + since.elapsed();
        if waited >= limit {
            let dropped = conn.close();
            log::warn!(
                "connection from {}: held the FIFO in the middle of a line for {:.1} s: \
                 line completed with a newline, connection closed ({dropped} bytes dropped)",
                conn.peer,
                waited.as_secs_f64()
            );
            // Round again at once: its newline, then the others.
            due(Duration::ZERO);
            return next;
        }
        due(limit - waited);
        next
    }

    /// Whether the FIFO is no longer in its place (removed or replaced),
    /// so that no reader can ever empty it.
    fn fifo_gone(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ours = match self.binding.fifo.file().metadata() {
            Ok(m) => m.ino(),
            Err(_) => return false,
        };
        match std::fs::symlink_metadata(self.binding.fifo.path()) {
            Ok(m) => m.ino() != ours,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }

    fn accept(&mut self) {
        while self.opts.max_conns == 0 || self.conns.len() < self.opts.max_conns {
            let Some(listener) = &self.listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The client gave up before we took it: take the next.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the
                    // backlog keeps the rest. Polling the listener now
                    // would only wake us again at once.
                    if !self.accept_warned {
                        self.accept_warned = true;
                        log::warn!(
                            "cannot accept: {}; not accepting until a connection ends",
                            crate::error::describe_io(&e)
                        );
                    }
                    self.accept_paused = Some(Instant::now());
                    return;
                }
            };
            // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: log
            // them as the IPv4 addresses they are, as --allow names them.
            let from = net::canonical(peer.ip());
            let peer = SocketAddr::new(from, peer.port());
            if !self.opts.allow.is_empty() && !self.opts.allow.iter().any(|a| a.contains(from)) {
                log::warn!("refused connection from {peer}: not in --allow");
                continue;
            }
            let limit = self.opts.max_conns_per_addr;
            if limit > 0 && self.per_addr.get(&from).copied().unwrap_or(0) >= limit {
                log::warn!(
                    "refused connection from {peer}: {limit} connections from {from} already"
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.opts.key.is_some()
                && let Some(wait) = self.penalties.wait(from, Instant::now())
            {
                // Held back after a wrong key: told so, in clear text,
                // instead of a greeting (and no key exchange is spent).
                use std::io::Write;
                let refusal = format!(
                    "ERR too many wrong keys from {from}; retry in {} s\n",
                    wait.as_secs_f64().ceil()
                );
                let _ = (&stream).write(refusal.as_bytes());
                log::debug!("refused connection from {peer}: held back after wrong keys");
                continue;
            }
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(KEEPALIVE_COUNT);
            if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                log::debug!("connection from {peer}: no keepalive: {e}");
            }
            self.accept_warned = false;
            *self.per_addr.entry(from).or_default() += 1;
            let mut conn = Client::new(
                self.next_token,
                stream,
                peer,
                self.opts.key.as_ref(),
                self.bulk.clone(),
            );
            // Our greeting: a fresh socket takes it whole.
            conn.flush();
            self.conns.push(conn);
            crate::status::peer_added(peer);
            self.next_token += 1;
            if self.opts.once && self.opts.key.is_none() {
                // One connection only: the port is free again at once.
                self.served = true;
                self.listener = None;
            }
            // Logged once the listener is closed, so whoever reads the log
            // knows a --once binding takes nobody else.
            log::info!("connection from {peer}");
        }
    }

    /// Opens what the keyed connections have brought, as far as their
    /// line buffers take it; a connection that breaks the protocol or
    /// fails to authenticate is closed.
    fn open_frames(&mut self) {
        for idx in 0..self.conns.len() {
            let was = self.conns[idx].keyed.as_ref().map(|k| k.step);
            let result = self.open_conn(idx);
            let c = &mut self.conns[idx];
            let now_step = c.keyed.as_ref().map(|k| k.step);
            if was == Some(Step::Confirming) && now_step != was && result.is_ok() {
                self.penalties.succeeded(c.peer.ip());
            }
            if let Err(why) = result {
                let streaming = now_step == Some(Step::Streaming);
                if now_step == Some(Step::Confirming) {
                    // A key guess: the address waits before its next one,
                    // and the log gets a summary, not a line each.
                    let delay = self.penalties.failed(c.peer.ip(), Instant::now());
                    log::debug!(
                        "connection from {}: {why}: closed, nothing of it reaches the FIFO; \
                         {} held back for {} s",
                        c.peer,
                        c.peer.ip(),
                        delay.as_secs()
                    );
                } else if streaming {
                    log::warn!(
                        "connection from {}: {why}: closed (its unwritten data is dropped; its sender resends it)",
                        c.peer
                    );
                } else {
                    log::warn!(
                        "connection from {}: {why}: closed, nothing of it reaches the FIFO",
                        c.peer
                    );
                }
                c.break_off();
            }
        }
        if let Some(line) = self.penalties.summary(Instant::now(), PENALTY_LOG) {
            log::warn!("{line}");
        }
    }

    fn open_conn(&mut self, idx: usize) -> std::result::Result<(), String> {
        loop {
            let conn = &mut self.conns[idx];
            if conn.lines.finished() {
                return Ok(());
            }
            let Some(k) = conn.keyed.as_mut() else {
                return Ok(());
            };
            if k.step == Step::Greeting {
                let Some(nl) = memchr::memchr(b'\n', &k.raw) else {
                    if k.raw.len() > crate::protocol::MAX_LINE {
                        return Err("greeting longer than a line".into());
                    }
                    return Ok(());
                };
                let mut line: Vec<u8> = k.raw.drain(..=nl).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                crate::protocol::check_line(&line).map_err(|e| e.to_string())?;
                let line = String::from_utf8(line).map_err(|_| "greeting not ASCII")?;
                let hello = k.hello.take().expect("a greeting is awaited once");
                k.channel = Some(hello.finish(&line).map_err(|e| e.to_string())?);
                k.seal(&Frame::Confirm);
                k.step = Step::Confirming;
                conn.flush();
                continue;
            }
            if k.step == Step::Streaming && k.raw.len() >= 4 {
                // A data frame goes into the line buffer whole, or waits.
                let len = u32::from_be_bytes(k.raw[..4].try_into().expect("4 bytes")) as usize;
                if !conn.lines.make_room(len.saturating_sub(17)) {
                    return Ok(());
                }
            }
            let step = k.step;
            let ch = k.channel.as_mut().expect("a channel after the greeting");
            let (frame, used) = match ch.opener.open(&k.raw) {
                Ok(Some(x)) => x,
                Ok(None) => return Ok(()),
                Err(_) if step == Step::Confirming => {
                    return Err(
                        "authentication failed: the keys differ (or the connection was tampered with)"
                            .into(),
                    );
                }
                Err(e) => return Err(e.to_string()),
            };
            k.raw.drain(..used);
            match (step, frame) {
                (Step::Confirming, Frame::Confirm) => k.step = Step::Naming,
                (Step::Naming, Frame::Line(line)) => self.name_stream(idx, &line)?,
                (Step::Streaming, Frame::Data(d)) => {
                    conn.lines.space()[..d.len()].copy_from_slice(&d);
                    crate::status::add_lines_in(conn.lines.filled(d.len()));
                    k.buffered += d.len() as u64;
                }
                (Step::Streaming, Frame::Close) => {
                    k.closing = true;
                    conn.lines.end_of_stream();
                    return Ok(());
                }
                (_, frame) => return Err(format!("unexpected {frame}")),
            }
        }
    }

    /// A keyed connection names its stream: it resumes where the FIFO is.
    fn name_stream(&mut self, idx: usize, line: &str) -> std::result::Result<(), String> {
        let (id, acked) = stream::parse_stream_line(line)?;
        if let Some(only) = &self.once_stream
            && *only != id
        {
            return Err(format!(
                "stream {id} is not the stream this --once binding serves"
            ));
        }
        let token = self.conns[idx].token;
        let st = self.streams.adopt(&id, acked);
        if acked > st.written {
            return Err(format!(
                "stream {id} says {acked} bytes were delivered, but only {} were written here",
                st.written
            ));
        }
        let offset = st.written;
        let old = st.conn.replace(token);
        if let Some(old) = old
            && old != token
            && let Some(c) = self.conns.iter_mut().find(|c| c.token == old)
        {
            log::info!(
                "stream {id}: a new connection takes over from the one from {}",
                c.peer
            );
            if let Some(k) = c.keyed.as_mut() {
                k.stream = None;
            }
            c.break_off();
        }
        if self.opts.once {
            self.once_stream = Some(id.clone());
            self.arrived = true;
        }
        let c = &mut self.conns[idx];
        let k = c.keyed.as_mut().expect("keyed");
        k.stream = Some(id.clone());
        k.step = Step::Streaming;
        k.acked = offset;
        k.last_ack = Instant::now();
        k.seal(&Frame::Line(format!("RESUME {offset}")));
        c.flush();
        log::info!("stream {id} from {}: resuming at offset {offset}", c.peer);
        Ok(())
    }

    /// Acknowledges what the keyed connections' streams have in the FIFO:
    /// after a write batch, at most every [`stream::ACK_EVERY`] (or
    /// [`stream::ACK_BYTES`]), and every [`stream::HEARTBEAT`] anyway.
    /// Returns when the next one falls due.
    fn acknowledge(&mut self) -> Option<Duration> {
        let mut next: Option<Duration> = None;
        for c in self.conns.iter_mut() {
            let Some(k) = c.keyed.as_mut() else { continue };
            if k.step != Step::Streaming || c.lines.finished() {
                continue;
            }
            let Some(st) = k.stream.as_deref().and_then(|id| self.streams.get_mut(id)) else {
                continue;
            };
            let written = st.written;
            let since = k.last_ack.elapsed();
            let due = if written > k.acked {
                if written - k.acked >= stream::ACK_BYTES {
                    Duration::ZERO
                } else {
                    stream::ACK_EVERY.saturating_sub(since)
                }
            } else {
                stream::HEARTBEAT.saturating_sub(since)
            };
            let wait = if due.is_zero() && k.out.is_empty() {
                k.seal(&Frame::Ack(written));
                k.acked = written;
                k.last_ack = Instant::now();
                c.flush();
                stream::HEARTBEAT
            } else {
                // Still sending: the socket's room wakes us first.
                due.max(Duration::from_millis(10))
            };
            next = Some(next.map_or(wait, |n| n.min(wait)));
        }
        next
    }

    /// Writes whatever complete lines the connections hold, one connection
    /// at a time, until the FIFO is full or nothing is left.
    fn write_pending(&mut self) -> Result<()> {
        loop {
            let Some(idx) = self.pick() else {
                return Ok(());
            };
            let plan = {
                let lines = &mut self.conns[idx].lines;
                let mid_line = lines.mid_line();
                plan(
                    &mut self.room,
                    &self.binding.fifo,
                    lines.writable(),
                    mid_line,
                )
            };
            let (len, whole) = match plan {
                Plan::Whole(n) => (n, true),
                Plan::Any(n) => (n, false),
                Plan::Wait => {
                    let next = self
                        .room_check
                        .map_or(Duration::from_millis(1), |t| (t * 2).min(ROOM_CHECK_MAX));
                    self.room_check = Some(next);
                    self.fifo_blocked = true;
                    return Ok(());
                }
            };
            let conn = &mut self.conns[idx];
            let chunk = &conn.lines.writable()[..len];
            match nix::unistd::write(self.binding.fifo.file(), chunk) {
                Ok(n) => {
                    self.room_check = None;
                    self.room.wrote(n);
                    if whole && n < len && !self.cut_logged {
                        self.cut_logged = true;
                        log::warn!("the FIFO took {n} of {len} bytes: a line was split");
                    }
                    crate::status::add_out(n);
                    crate::status::add_lines_out(conn.lines.consumed(n));
                    crate::status::add_lines_in(conn.lines.take_completed());
                    if let Some(k) = conn.keyed.as_mut() {
                        let credit = (n as u64).min(k.buffered);
                        k.buffered -= credit;
                        if let Some(st) =
                            k.stream.as_deref().and_then(|id| self.streams.get_mut(id))
                        {
                            st.written += credit;
                        }
                    }
                    let owner = conn.lines.mid_line().then_some(conn.token);
                    if owner != self.owner {
                        self.owner_waited = Duration::ZERO;
                        self.owner_waiting = None;
                    }
                    self.owner = owner;
                    self.turn = conn.token + 1;
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    self.room_check = None;
                    self.fifo_blocked = true;
                    return Ok(());
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "cannot write into FIFO {}",
                            self.binding.fifo.path().display()
                        ),
                        &e.into(),
                    ));
                }
            }
        }
    }
    /// The connection whose turn it is to write, if any has something.
    fn pick(&mut self) -> Option<usize> {
        if let Some(token) = self.owner {
            match self.conns.iter().position(|c| c.token == token) {
                Some(idx) => return (!self.conns[idx].lines.writable().is_empty()).then_some(idx),
                None => self.owner = None,
            }
        }
        // Round robin in the order the connections were accepted, starting
        // after the last writer. So connections made one after the other
        // (`echo a | nc; echo b | nc`) are written in that order even when
        // their data arrives in the same poll round.
        let n = self.conns.len();
        let first = self
            .conns
            .iter()
            .position(|c| c.token >= self.turn)
            .unwrap_or(0);
        (0..n)
            .map(|k| (first + k) % n)
            .find(|&i| !self.conns[i].lines.writable().is_empty())
    }
}
