//! bind-input: TCP connections in, whole lines out into a FIFO.
//!
//! One thread, one poll loop. Each connection has a fixed buffer; a
//! connection's bytes are written into the FIFO only up to its last
//! newline, so a reader never meets half a line, and only one connection
//! at a time may be in the middle of a line in the FIFO, so lines of
//! concurrent connections never interleave. When the FIFO is full, the
//! binding stops reading the sockets whose buffers are full and TCP flow
//! control holds the senders back: memory stays bounded by
//! `MAX_CONNECTIONS × LINE_BUFFER + MAX_GROWN × BULK_BUFFER`.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::args::{Id, Port};
use crate::binding::{Binding, Common, IN, OUT, PollSet, Reason, Stop, TROUBLE};
use crate::error::{Error, ExitStatus, Result};
use crate::framer::LineBuffer;
use crate::net;

/// A connection's buffer, and so the longest line delivered with a single
/// write(2). A longer line is passed on in pieces as it arrives, still
/// intact and never interleaved with other lines.
pub const LINE_BUFFER: usize = 128 * 1024;
/// A connection whose reads keep filling its buffer (a bulk sender) gets
/// a buffer this large, for fewer calls per byte; at most
/// [`MAX_GROWN`] connections at once, so memory stays bounded.
const BULK_BUFFER: usize = 1024 * 1024;
const MAX_GROWN: usize = 8;
/// Connections holding a bulk buffer now. The relay is one thread.
static GROWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 128;
/// How often a finished `--once` binding looks whether its FIFO is empty.
const DRAIN_CHECK: Duration = Duration::from_millis(20);

pub struct InputOptions {
    pub id: Id,
    pub port: Port,
    /// Listen on this address only.
    pub bind: Option<IpAddr>,
    /// Serve one connection; end once it ended and the FIFO was read empty.
    pub once: bool,
    /// Accept connections from this address only.
    pub allow: Option<IpAddr>,
    /// With `once`: give up if nobody connected within this time.
    pub accept_timeout: Option<Duration>,
    pub common: Common,
}

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
        log::info!(
            "{} listening on port {}, FIFO {}",
            binding.id,
            opts.port,
            binding.fifo.path().display()
        );
        crate::status::start_binding(binding, "bind-input", opts.port.0, None);
        binding.ready(ready);
        let mut relay = Relay {
            binding,
            listener: Some(listener),
            conns: Vec::new(),
            owner: None,
            turn: 0,
            next_token: 0,
            fifo_blocked: false,
            served: false,
            opts: &opts,
        };
        relay.serve(stop)
    })
}

struct Conn {
    token: u64,
    stream: TcpStream,
    peer: SocketAddr,
    lines: LineBuffer,
}

impl Conn {
    fn new(token: u64, stream: TcpStream, peer: SocketAddr) -> Conn {
        Conn {
            token,
            stream,
            peer,
            lines: LineBuffer::new(LINE_BUFFER),
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        let n = self.stream.read(self.lines.space())?;
        self.lines.filled(n);
        if self.lines.is_full() && self.lines.capacity() < BULK_BUFFER {
            use std::sync::atomic::Ordering;
            if GROWN.fetch_add(1, Ordering::Relaxed) < MAX_GROWN {
                self.lines.grow(BULK_BUFFER);
            } else {
                GROWN.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(n)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.lines.capacity() == BULK_BUFFER {
            GROWN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

struct Relay<'a> {
    binding: &'a mut Binding,
    listener: Option<TcpListener>,
    conns: Vec<Conn>,
    owner: Option<u64>,
    /// The token whose turn it is to write next: one past the last
    /// writer's. A token, not an index: finished connections leave the
    /// vector, and an index would then skip the one after them.
    turn: u64,
    next_token: u64,
    fifo_blocked: bool,
    served: bool,
    opts: &'a InputOptions,
}

impl Relay<'_> {
    fn serve(&mut self, stop: &Stop) -> Result<()> {
        let started = Instant::now();
        let mut set = PollSet::default();
        loop {
            if !self.fifo_blocked {
                self.write_pending()?;
            }
            self.conns.retain(|c| {
                if c.lines.finished() {
                    log::info!("connection from {} ended", c.peer);
                    crate::status::peer_gone(c.peer);
                }
                !c.lines.finished()
            });
            let mut timeout = None;
            if self.opts.once {
                if self.served && self.conns.is_empty() {
                    if self.binding.fifo.unread() == 0 {
                        log::info!("stream ended and FIFO read empty: closing");
                        return Ok(());
                    }
                    timeout = Some(DRAIN_CHECK);
                } else if !self.served
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
                    timeout = Some(left);
                }
            }

            set.clear();
            let stop_slots = stop.register(&mut set);
            let listen_slot = match &self.listener {
                Some(l) if self.conns.len() < MAX_CONNECTIONS => Some(set.add(l.as_fd(), IN)),
                _ => None,
            };
            let fifo_slot = self
                .fifo_blocked
                .then(|| set.add(self.binding.fifo.as_fd(), OUT));
            let mut conn_slots = Vec::with_capacity(self.conns.len());
            for conn in &self.conns {
                conn_slots.push(
                    conn.lines
                        .wants_input()
                        .then(|| set.add(conn.stream.as_fd(), IN)),
                );
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
            if let Some(slot) = fifo_slot
                && set.revents(slot) != 0
            {
                self.fifo_blocked = false;
            }
            for (conn, slot) in self.conns.iter_mut().zip(conn_slots) {
                if let Some(slot) = slot
                    && set.revents(slot) & (IN | TROUBLE) != 0
                {
                    match conn.fill() {
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
                            conn.lines.end_of_stream();
                        }
                    }
                }
            }
            if let Some(slot) = listen_slot
                && set.revents(slot) != 0
            {
                self.accept();
            }
        }
    }

    fn accept(&mut self) {
        while self.conns.len() < MAX_CONNECTIONS {
            let Some(listener) = &self.listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: drop this round, try again later.
                    log::warn!("cannot accept: {}", crate::error::describe_io(&e));
                    return;
                }
            };
            // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d: log
            // them as the IPv4 addresses they are, as --allow names them.
            let from = net::canonical(peer.ip());
            let peer = SocketAddr::new(from, peer.port());
            if let Some(allowed) = self.opts.allow
                && net::canonical(allowed) != from
            {
                log::warn!("refused connection from {peer}: only {allowed} may connect");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.conns.push(Conn::new(self.next_token, stream, peer));
            crate::status::peer_added(peer);
            self.next_token += 1;
            if self.opts.once {
                // One connection only: the port is free again at once.
                self.served = true;
                self.listener = None;
            }
            // Logged once the listener is closed, so whoever reads the log
            // knows a --once binding takes nobody else.
            log::info!("connection from {peer}");
        }
    }

    /// Writes whatever complete lines the connections hold, one connection
    /// at a time, until the FIFO is full or nothing is left.
    fn write_pending(&mut self) -> Result<()> {
        let capacity = self.binding.fifo.capacity();
        loop {
            let Some(idx) = self.pick() else {
                return Ok(());
            };
            let conn = &mut self.conns[idx];
            let chunk = conn.lines.writable();
            // A write of at most PIPE_BUF bytes is all or nothing: no need
            // to ask how much room the FIFO has.
            let room = if chunk.len() <= libc::PIPE_BUF {
                chunk.len()
            } else {
                capacity.saturating_sub(self.binding.fifo.unread())
            };
            // Where the FIFO cannot take it all, stop at a line's end.
            let chunk = if chunk.len() > room {
                match memchr::memrchr(b'\n', &chunk[..room]) {
                    Some(i) => &chunk[..=i],
                    None => chunk,
                }
            } else {
                chunk
            };
            match nix::unistd::write(self.binding.fifo.file(), chunk) {
                Ok(n) => {
                    crate::status::add_out(n);
                    conn.lines.consumed(n);
                    self.owner = conn.lines.mid_line().then_some(conn.token);
                    self.turn = conn.token + 1;
                }
                Err(nix::errno::Errno::EAGAIN) => {
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
