//! bind-output: whatever is written into a FIFO, out over one TCP
//! connection.
//!
//! The binding holds its FIFO open at both ends, so writers may open and
//! close it at will and it sees no end-of-file while it runs; it ends on a
//! signal (after sending what is in the FIFO), when its parent dies, or
//! when a send fails because the remote end has gone. A remote that only
//! shuts its sending side (`ncat --recv-only`) still reads: end-of-file
//! from it is noted, not taken for a close, as `socat -u` does. Bytes move
//! from the FIFO to the socket with splice(2), without passing through the
//! process: no buffer of ours, so when the remote stops reading, the FIFO
//! fills and the writers block, and memory stays what it is.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use crate::args::{Host, Id, Key, Port};
use crate::background::Ready;
use crate::binding::{Binding, BindingOptions, Reason, StopEvents};
use crate::cli::{self, StreamKeyArgs};
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::poll::{IN, OUT, PollSet, TROUBLE};

/// The most one splice(2) call moves: the FIFO's whole capacity. With
/// 1 MiB writers a splice moves about 500 KiB (4-6 calls per MiB in
/// all); 64 KiB splices took 16 calls per MiB and 1.6 times the CPU.
const CHUNK: usize = 1 << 20;
/// The most of not yet sent data the connection's send buffer holds (see
/// [`net::limit_unsent`]): 4, 16 and 32 KiB measured the same, 64 KiB
/// gave much of the gain back; 16 KiB is a few splices of slack. With a
/// fast reader 128 KiB (or none) measured no better in CPU per MiB.
const UNSENT_LIMIT: u32 = 16 * 1024;
/// How long a stopping binding may spend sending what is left: the spec
/// asks for an exit within a second of the signal.
const FLUSH_LIMIT: Duration = Duration::from_millis(900);

/// Connect to HOST:PORT; whatever is written into the named pipe
/// <runtime dir>/ID is sent there. Prints the PID of the background binding.
// bind-output's command line (the `///` comments are its `--help` text),
// then [`OutputOptions::resolve`]d.
#[derive(clap::Parser, Debug)]
#[command(name = "bind-output", version)]
pub struct OutputOptions {
    /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_name = "ID")]
    pub(crate) id: Id,

    /// The host to connect to: a name, an IPv4 or an IPv6 address
    #[arg(value_name = "HOST")]
    pub(crate) host: Host,

    /// The remote TCP port, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// Give up connecting after SECS seconds (status 75)
    #[arg(short = 't', long, value_name = "SECS", value_parser = cli::seconds, default_value = "10")]
    pub(crate) connect_timeout: Duration,

    #[command(flatten)]
    pub(crate) key_args: StreamKeyArgs,

    /// The stream protocol's secret (see stream.rs), read from `key_args`
    /// by [`OutputOptions::resolve`].
    #[arg(skip)]
    pub(crate) key: Option<Key>,

    /// Without a key: when the connection breaks, connect again (with
    /// backoff) instead of exiting; what was in flight may be lost
    #[arg(long, conflicts_with_all = ["key", "key_fd"])]
    pub(crate) reconnect: bool,

    /// With a key: hold at most SIZE bytes not yet acknowledged by the
    /// receiver (K, M, G suffixes)
    #[arg(long, value_name = "SIZE", value_parser = crate::stream::parse_size, default_value = "8M")]
    pub(crate) spool: usize,

    /// With a key, when the spool is full: block (stop reading the FIFO, so
    /// writers wait) or drop-oldest (drop the oldest unsent lines, counted
    /// in the log)
    #[arg(long, value_name = "POLICY", value_enum, default_value = "block")]
    pub(crate) spool_full: crate::spool::Full,

    /// The longest wait between two attempts to reconnect (the delay starts
    /// at 0.1 s and doubles, with jitter)
    #[arg(long, value_name = "SECS", value_parser = cli::seconds, default_value = "5")]
    pub(crate) backoff_max: Duration,

    /// Keep trying to reconnect for SECS seconds after a break, then exit
    /// (status 69); 0: exit at the first break (default: forever)
    #[arg(long, value_name = "SECS", value_parser = cli::seconds_or_zero)]
    pub(crate) retry_for: Option<Duration>,

    /// With a key: a receiver silent for SECS seconds (it acknowledges
    /// every second) is taken for gone, and the binding reconnects
    #[arg(long, value_name = "SECS", value_parser = cli::seconds, default_value = "10")]
    pub(crate) peer_timeout: Duration,

    #[command(flatten)]
    pub(crate) common: BindingOptions,
}

impl OutputOptions {
    /// Reads the key the options name: call it before any thread starts.
    pub fn resolve(mut self) -> Result<OutputOptions> {
        self.key = self.key_args.resolve()?;
        Ok(self)
    }
}

pub fn run(opts: OutputOptions) -> Result<()> {
    if opts.key.is_some() {
        return run_keyed(opts);
    }
    let (binding, stream) = open_connected(&opts, || {
        net::connect(opts.host.as_str(), opts.port, opts.connect_timeout)
    })?;
    let common = opts.common.clone();
    binding.run("bind-output", &common, move |binding, stop, ready| {
        let mut stream = stream;
        let mut first = true;
        loop {
            prepare(&stream)?;
            let peer = peer_name(&stream, &opts);
            if first {
                log::info!(
                    "{} connected to {peer}, FIFO {}",
                    binding.id,
                    binding.fifo.path().display()
                );
                announce(binding, &opts, &peer, ready);
                first = false;
            } else {
                crate::status::peer_added(&peer);
            }
            let mut relay = Outbound {
                binding: &mut *binding,
                stream,
                peer: peer.clone(),
                socket_full: false,
                remote_eof: false,
            };
            let result = relay.serve(stop);
            crate::status::peer_gone(&peer);
            match result {
                Err(e) if opts.reconnect && e.status == ExitStatus::Unavailable => {
                    log::warn!(
                        "{}; reconnecting (what was in flight may be lost)",
                        e.message
                    );
                    match reconnect_plain(&opts, binding, stop)? {
                        Some(s) => stream = s,
                        None => return Ok(()),
                    }
                }
                other => return other,
            }
        }
    })
}

/// Opens the binding and makes its first connection with `connect`; if
/// that fails, nothing of the binding is left.
fn open_connected<T>(
    opts: &OutputOptions,
    connect: impl FnOnce() -> Result<T>,
) -> Result<(Binding, T)> {
    let binding = Binding::open(&opts.id, &opts.common)?;
    match connect() {
        Ok(link) => Ok((binding, link)),
        Err(e) => {
            binding.close();
            Err(e)
        }
    }
}

/// The remote end, as the log and the status name it.
fn peer_name(stream: &TcpStream, opts: &OutputOptions) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| format!("{}:{}", opts.host, opts.port))
}

/// Readies a new connection for the sending loops: non-blocking, and
/// with little unsent data in the kernel ([`UNSENT_LIMIT`]).
fn prepare(stream: &TcpStream) -> Result<()> {
    stream
        .set_nonblocking(true)
        .map_err(|e| Error::io("cannot configure the socket", &e))?;
    if let Err(e) = net::limit_unsent(stream, UNSENT_LIMIT) {
        // Only slower on a kernel without it (before Linux 3.12).
        log::warn!(
            "cannot limit the unsent data: {}",
            crate::error::describe_io(&e)
        );
    }
    Ok(())
}

/// The first connection works: the status is published, naming `peer`
/// from its first write, and the foreground told.
fn announce(binding: &mut Binding, opts: &OutputOptions, peer: &str, ready: &mut Ready) {
    crate::status::peer_added(peer);
    crate::status::start_binding(
        binding,
        "bind-output",
        opts.port.0,
        Some(opts.host.as_str()),
    );
    binding.ready(ready);
}

/// A plain binding's link broke: connect again with backoff until it
/// works (`Some`), a stop comes (`None`), or `--retry-for` runs out.
fn reconnect_plain(
    opts: &OutputOptions,
    binding: &Binding,
    stop: &StopEvents,
) -> Result<Option<TcpStream>> {
    let broken = Instant::now();
    let mut backoff = crate::stream::Backoff::new(opts.backoff_max);
    let attempt_limit = opts.connect_timeout.min(Duration::from_secs(5));
    loop {
        if let Some(reason) = pause(stop, backoff.next_delay()) {
            log::info!(
                "stopping while disconnected: {reason} ({} bytes in the FIFO not sent)",
                binding.fifo.unread()
            );
            return Ok(None);
        }
        match net::connect(opts.host.as_str(), opts.port, attempt_limit) {
            Ok(s) => {
                log::info!(
                    "reconnected to {}:{} after {:.1} s disconnected",
                    opts.host,
                    opts.port,
                    broken.elapsed().as_secs_f64()
                );
                return Ok(Some(s));
            }
            Err(e) => {
                log::debug!("reconnecting: {e}");
                if let Some(limit) = opts.retry_for
                    && broken.elapsed() >= limit
                {
                    return Err(Error::new(
                        ExitStatus::Unavailable,
                        format!(
                            "cannot reconnect within {} s ({e}); {} bytes in the FIFO not sent",
                            limit.as_secs_f64(),
                            binding.fifo.unread()
                        ),
                    ));
                }
            }
        }
    }
}

/// Waits `delay`, or until a stop event comes (which is returned).
pub(crate) fn pause(stop: &StopEvents, delay: Duration) -> Option<Reason> {
    let until = Instant::now() + delay;
    let mut set = PollSet::default();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        set.clear();
        let slots = stop.register(&mut set);
        if set.wait(Some(left)).is_err() {
            return None;
        }
        if let Some(reason) = stop.check(&set, slots) {
            return Some(reason);
        }
    }
}

struct Outbound<'a> {
    binding: &'a mut Binding,
    stream: TcpStream,
    peer: String,
    /// The last splice stopped because the socket could take no more.
    socket_full: bool,
    /// The remote shut its sending side: nothing more comes from it, but
    /// it may still read.
    remote_eof: bool,
}

enum Step {
    Continue,
    /// Every writer, ours included, has closed the FIFO and it is empty.
    FifoEnd,
    RemoteClosed,
}

/// Where the binding is in its life.
#[derive(Clone, Copy)]
enum Phase {
    Running,
    /// The writer is done (SIGUSR1): our write end is closed, and the
    /// binding sends on, however slowly, until the FIFO reads end-of-file.
    Draining,
    /// Stopping (a stop signal, or the parent's death): what the FIFO holds
    /// is sent until it is empty or until the deadline.
    Flushing(Instant),
}

impl Phase {
    /// The phase after a stop event (if any), for both sending loops:
    /// SIGUSR1 drains to end-of-file, any other stop flushes what the FIFO
    /// holds for at most [`FLUSH_LIMIT`]. Either way the FIFO goes, so no
    /// new writer can open it.
    fn after(reason: Option<Reason>, phase: Phase, binding: &mut Binding) -> Phase {
        match (reason, phase) {
            (None, _) | (Some(Reason::Drain), Phase::Draining) => phase,
            (Some(Reason::Drain), _) => {
                log::info!("draining: {}", Reason::Drain);
                // Without our write end, end-of-file comes once the writers
                // that have it open (a daemon's children too) are all done.
                binding.fifo.remove();
                binding.fifo.close_writer();
                Phase::Draining
            }
            (Some(reason), _) => {
                log::info!("stopping: {reason}");
                binding.fifo.remove();
                Phase::Flushing(Instant::now() + FLUSH_LIMIT)
            }
        }
    }
}

impl Outbound<'_> {
    fn serve(&mut self, stop: &StopEvents) -> Result<()> {
        let mut phase = Phase::Running;
        let mut set = PollSet::default();
        loop {
            let deadline = match phase {
                Phase::Flushing(deadline) => Some(deadline),
                _ => None,
            };
            if let Some(deadline) = deadline {
                let lost = self.binding.fifo.unread();
                if lost == 0 {
                    break;
                }
                if Instant::now() >= deadline {
                    log::warn!("{} stopped reading: {lost} bytes not sent", self.peer);
                    break;
                }
            }
            set.clear();
            // Flushing, the stop events have had their say: the watchdog's
            // end-of-file would wake every round.
            let stop_slots = deadline.is_none().then(|| stop.register(&mut set));
            // Wait for data only when there is room to send it, for room
            // only when there is data: never a busy loop.
            let fifo_slot =
                (!self.socket_full).then(|| set.add(self.binding.fifo.reader().as_fd(), IN));
            let mut sock_events = if self.remote_eof { 0 } else { IN };
            if self.socket_full {
                sock_events |= OUT;
            }
            let sock_slot = set.add(self.stream.as_fd(), sock_events);
            set.wait(deadline.map(|d| d.saturating_duration_since(Instant::now())))
                .map_err(|e| Error::io("cannot wait for events", &e))?;

            if let Some(slots) = stop_slots {
                phase = Phase::after(stop.check(&set, slots), phase, self.binding);
            }
            let sock = set.revents(sock_slot);
            if sock & (IN | TROUBLE) != 0
                && let Step::RemoteClosed = self.read_remote(sock)
            {
                return self.remote_closed();
            }
            if sock & OUT != 0 {
                self.socket_full = false;
            }
            // A hang-up on the FIFO is end-of-file: every writer is gone.
            let fifo_ready = fifo_slot.is_some_and(|slot| set.revents(slot) != 0);
            if fifo_ready || sock & OUT != 0 {
                match self.pump()? {
                    Step::Continue => {}
                    Step::FifoEnd => break,
                    Step::RemoteClosed => return self.remote_closed(),
                }
            }
        }
        // A FIN after the data; the kernel still delivers what it has
        // queued.
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }

    /// Moves what the FIFO holds into the socket until one side stops.
    fn pump(&mut self) -> Result<Step> {
        let fifo = self.binding.fifo.reader().as_raw_fd();
        let sock = self.stream.as_raw_fd();
        loop {
            // SAFETY: splice between two descriptors we own; no memory of
            // ours is involved.
            let n = unsafe {
                libc::splice(
                    fifo,
                    std::ptr::null_mut(),
                    sock,
                    std::ptr::null_mut(),
                    CHUNK,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n > 0 {
                crate::status::add_in(n as usize);
                crate::status::add_out(n as usize);
            }
            if n as usize == CHUNK {
                continue;
            }
            // Less than asked: the FIFO ran dry or the socket filled up.
            // Asking the FIFO which costs one call, another splice two.
            if n > 0 {
                self.socket_full = self.binding.fifo.unread() > 0;
                return Ok(Step::Continue);
            }
            // Only once our own write end is closed (draining).
            if n == 0 {
                return Ok(Step::FifoEnd);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // Either the FIFO is empty or the socket is full; what is
                // left in the FIFO says which.
                Some(libc::EAGAIN) => {
                    self.socket_full = self.binding.fifo.unread() > 0;
                    return Ok(Step::Continue);
                }
                Some(libc::EINTR) => {}
                Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => {
                    return Ok(Step::RemoteClosed);
                }
                _ => {
                    return Err(Error::io(format!("cannot send to {}", self.peer), &err));
                }
            }
        }
    }

    /// Nothing is expected from the remote: what it sends is discarded.
    /// Its end-of-file is a half-close (it may still read); only an error,
    /// or trouble after end-of-file (a reset: the remote answered our data
    /// from a closed socket), means it is gone.
    fn read_remote(&mut self, revents: i16) -> Step {
        if self.remote_eof {
            return if revents & TROUBLE != 0 {
                Step::RemoteClosed
            } else {
                Step::Continue
            };
        }
        let mut sink = [0u8; 4096];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => {
                    log::info!(
                        "{} shut its sending side; sending on until a send fails",
                        self.peer
                    );
                    self.remote_eof = true;
                    return Step::Continue;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::RemoteClosed,
            }
        }
    }

    fn remote_closed(&mut self) -> Result<()> {
        let lost = self.binding.fifo.unread();
        let mut message = format!("{} closed the connection", self.peer);
        if lost > 0 {
            message.push_str(&format!(" ({lost} bytes not sent)"));
        }
        // Reported once, as this binding's error (logged or printed).
        Err(Error::new(ExitStatus::Unavailable, message))
    }
}

// The keyed path: the stream protocol (see stream.rs). Bytes pass through
// the process here (they are sealed), held in the spool until the
// receiver acknowledges them, so that a broken link loses nothing.

/// How much sealed data may wait for the socket before more is sealed.
const OUT_HIGH: usize = 2 * crate::secure::MAX_BODY;
/// Failures to reconnect this soon after a break are logged as warnings.
const BACKOFF_FIRST_LOG: Duration = Duration::from_millis(150);
/// Drops under `--spool-full drop-oldest` are logged at most this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(5);

/// One authenticated connection of the stream.
struct Link {
    stream: TcpStream,
    channel: crate::secure::Channel,
    /// Sealed bytes read and not yet opened.
    inbuf: Vec<u8>,
    /// Sealed bytes not yet taken by the socket.
    out: Vec<u8>,
    heard: Instant,
    peer: String,
    close_sent: bool,
}

/// Connects, authenticates and names the stream; returns the link and
/// the receiver's offset.
fn establish(opts: &OutputOptions, id: &str, acked: u64, limit: Duration) -> Result<(Link, u64)> {
    use crate::protocol::Failure;
    use crate::secure::{Frame, Purpose, Side};
    let key = opts.key.as_ref().expect("a keyed binding");
    let mut stream = net::connect(opts.host.as_str(), opts.port, limit)?;
    let peer = peer_name(&stream, opts);
    let fail = |f: Failure| match f {
        Failure::Io(e) => Error::io(format!("stream handshake with {peer}"), &e),
        Failure::Refused(why) | Failure::Denied(why) => Error::new(
            ExitStatus::Unavailable,
            format!("stream handshake with {peer}: {why}"),
        ),
        other => Error::new(
            ExitStatus::Unavailable,
            format!("stream handshake with {peer}: {other}"),
        ),
    };
    let io_err = |e: io::Error| Error::io("cannot configure the socket", &e);
    stream.set_read_timeout(Some(limit)).map_err(io_err)?;
    stream.set_write_timeout(Some(limit)).map_err(io_err)?;
    let mut channel = crate::secure::handshake(
        &mut stream,
        Side::Connector,
        Purpose::Stream,
        key.as_bytes(),
    )
    .map_err(fail)?;
    channel
        .send(
            &mut stream,
            &Frame::Line(crate::stream::stream_line(id, acked)),
        )
        .map_err(fail)?;
    let offset = match channel.recv(&mut stream).map_err(fail)? {
        Frame::Line(line) => {
            crate::stream::parse_resume_line(&line).map_err(|why| fail(Failure::Protocol(why)))?
        }
        other => {
            return Err(fail(Failure::Protocol(format!(
                "expected RESUME, got {other}"
            ))));
        }
    };
    // Little in flight: what the spool holds as sent stays small, so the
    // spool's room is for what the FIFO brings.
    prepare(&stream)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok((
        Link {
            stream,
            channel,
            inbuf: Vec::new(),
            out: Vec::new(),
            heard: Instant::now(),
            peer,
            close_sent: false,
        },
        offset,
    ))
}

fn run_keyed(opts: OutputOptions) -> Result<()> {
    let id = crate::stream::new_stream_id();
    let (binding, first) =
        open_connected(&opts, || establish(&opts, &id, 0, opts.connect_timeout))?;
    let common = opts.common.clone();
    binding.run("bind-output", &common, move |binding, stop, ready| {
        let (link, offset) = first;
        let mut spool = crate::spool::Spool::new(opts.spool, opts.spool_full);
        spool.resume(offset).map_err(|why| {
            Error::new(
                ExitStatus::Unavailable,
                format!("{}: a new stream cannot resume: {why}", link.peer),
            )
        })?;
        log::info!(
            "{} connected to {} (stream {id}, authenticated), FIFO {}",
            binding.id,
            link.peer,
            binding.fifo.path().display()
        );
        // The bytes pass through the process here (they are sealed), so
        // lines are counted.
        crate::status::count_lines();
        announce(binding, &opts, &link.peer, ready);
        let mut sender = Sender {
            binding,
            opts: &opts,
            id,
            spool,
            link: Some(link),
            backoff: crate::stream::Backoff::new(opts.backoff_max),
            broken: None,
            next_try: Instant::now(),
            sent_at_break: 0,
            reconnects: 0,
            drops_logged: (0, Instant::now()),
        };
        sender.serve(stop)
    })
}

struct Sender<'a> {
    binding: &'a mut Binding,
    opts: &'a OutputOptions,
    id: String,
    spool: crate::spool::Spool,
    link: Option<Link>,
    backoff: crate::stream::Backoff,
    /// Disconnected since then.
    broken: Option<Instant>,
    next_try: Instant,
    /// What had been sent when the link broke, to tell what is resent.
    sent_at_break: u64,
    reconnects: u64,
    /// Lines dropped as last logged, and when.
    drops_logged: (u64, Instant),
}

impl Sender<'_> {
    fn serve(&mut self, stop: &StopEvents) -> Result<()> {
        let mut phase = Phase::Running;
        let mut fifo_eof = false;
        let mut set = PollSet::default();
        let mut buf = vec![0u8; crate::secure::MAX_BODY];
        loop {
            if let Phase::Flushing(_) = phase
                && self.binding.fifo.unread() == 0
            {
                // Stopping: what the FIFO holds now is all there is.
                fifo_eof = true;
            }
            if fifo_eof
                && self.spool.unacked() == 0
                && self.link.as_ref().is_some_and(|l| l.close_sent)
            {
                log::info!(
                    "stream {} ended: {} bytes delivered{}",
                    self.id,
                    self.spool.end(),
                    self.drop_note()
                );
                let _ = self
                    .link
                    .as_ref()
                    .map(|l| l.stream.shutdown(Shutdown::Write));
                return Ok(());
            }
            if let Phase::Flushing(deadline) = phase
                && Instant::now() >= deadline
            {
                log::warn!(
                    "stopped before the receiver acknowledged everything: {} bytes not delivered{}",
                    self.spool.unacked() + self.binding.fifo.unread(),
                    self.drop_note()
                );
                return Ok(());
            }
            if self.link.is_none() && Instant::now() >= self.next_try {
                self.try_reconnect()?;
            }
            if let Some(link) = self.link.as_mut() {
                fill_out(link, &mut self.spool, fifo_eof);
                if let Err(why) = flush_out(link) {
                    self.broke(&why)?;
                }
            }

            set.clear();
            let flushing = matches!(phase, Phase::Flushing(_));
            let stop_slots = (!flushing).then(|| stop.register(&mut set));
            let fifo_slot = (!fifo_eof && self.spool.room() > 0)
                .then(|| set.add(self.binding.fifo.reader().as_fd(), IN));
            let sock_slot = self.link.as_ref().map(|l| {
                let events = if l.out.is_empty() { IN } else { IN | OUT };
                set.add(l.stream.as_fd(), events)
            });
            let now = Instant::now();
            let mut timeout: Option<Duration> = None;
            let mut due = |at: Instant| {
                let t = at.saturating_duration_since(now);
                timeout = Some(timeout.map_or(t, |o: Duration| o.min(t)));
            };
            match &self.link {
                None => due(self.next_try),
                Some(l) => due(l.heard + self.opts.peer_timeout),
            }
            if let Phase::Flushing(deadline) = phase {
                due(deadline.min(now + Duration::from_millis(20)));
            }
            set.wait(timeout)
                .map_err(|e| Error::io("cannot wait for events", &e))?;

            if let Some(slots) = stop_slots {
                phase = Phase::after(stop.check(&set, slots), phase, self.binding);
            }
            let fifo_ready = fifo_slot.is_some_and(|slot| set.revents(slot) != 0);
            if (fifo_ready || flushing) && !fifo_eof {
                fifo_eof = self.read_fifo(&mut buf)?;
            }
            if let Some(slot) = sock_slot {
                let revents = set.revents(slot);
                if revents & (IN | TROUBLE) != 0
                    && let Err(why) = self.read_link()
                {
                    self.broke(&why)?;
                }
            }
            if let Some(l) = &self.link
                && l.heard.elapsed() >= self.opts.peer_timeout
            {
                let why = format!(
                    "nothing heard for {:.0} s",
                    self.opts.peer_timeout.as_secs_f64()
                );
                self.broke(&why)?;
            }
        }
    }

    /// Takes what the FIFO holds into the spool, as far as it has room;
    /// returns whether the FIFO has ended (all writers gone, draining).
    fn read_fifo(&mut self, buf: &mut [u8]) -> Result<bool> {
        loop {
            let room = self.spool.room().min(buf.len());
            if room == 0 {
                return Ok(false);
            }
            match self.binding.fifo.reader().read(&mut buf[..room]) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    crate::status::add_in(n);
                    crate::status::add_lines_in(crate::framer::count_lines(&buf[..n]));
                    self.spool.push(&buf[..n]);
                    self.log_drops(false);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "cannot read the FIFO {}",
                            self.binding.fifo.path().display()
                        ),
                        &e,
                    ));
                }
            }
        }
    }

    /// Reads the receiver's acknowledgements.
    fn read_link(&mut self) -> std::result::Result<(), String> {
        use crate::secure::Frame;
        let link = self.link.as_mut().expect("polled only with a link");
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        loop {
            match link.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => link.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(crate::error::describe_io(&e)),
            }
            if link.inbuf.len() > 64 * 1024 {
                break;
            }
        }
        let mut used = 0;
        while let Some((frame, n)) = link
            .channel
            .opener
            .open(&link.inbuf[used..])
            .map_err(|e| e.to_string())?
        {
            used += n;
            match frame {
                Frame::Ack(offset) => {
                    self.spool.ack(offset)?;
                    link.heard = Instant::now();
                }
                other => return Err(format!("unexpected {other} from the receiver")),
            }
        }
        link.inbuf.drain(..used);
        // The receiver closes after acknowledging the end: that is no break.
        if eof && !(link.close_sent && self.spool.unacked() == 0) {
            return Err("the receiver closed the connection".into());
        }
        Ok(())
    }

    /// The link broke: reconnect (after a backoff), unless the user said
    /// not to.
    fn broke(&mut self, why: &str) -> Result<()> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        crate::status::peer_gone(&link.peer);
        self.sent_at_break = self.spool.sent_offset();
        let unacked = self.spool.unacked();
        if self.opts.retry_for == Some(Duration::ZERO) {
            return Err(Error::new(
                ExitStatus::Unavailable,
                format!(
                    "connection to {} broken ({why}): {unacked} bytes not acknowledged",
                    link.peer
                ),
            ));
        }
        log::warn!(
            "connection to {} broken ({why}) at offset {}: {unacked} bytes not acknowledged; reconnecting",
            link.peer,
            self.spool.acked()
        );
        self.broken = Some(Instant::now());
        self.backoff.reset();
        self.next_try = Instant::now() + self.backoff.next_delay();
        Ok(())
    }

    fn try_reconnect(&mut self) -> Result<()> {
        // One attempt must not hold the binding long: a receiver that
        // accepts and then says nothing is as good as gone.
        let limit = self
            .opts
            .connect_timeout
            .min(self.opts.peer_timeout)
            .min(Duration::from_secs(5));
        let broken = self.broken.unwrap_or_else(Instant::now);
        match establish(self.opts, &self.id, self.spool.acked(), limit) {
            Ok((link, offset)) => {
                if let Err(why) = self.spool.resume(offset) {
                    return Err(Error::new(
                        ExitStatus::Unavailable,
                        format!("{}: cannot resume stream {}: {why}", link.peer, self.id),
                    ));
                }
                self.reconnects += 1;
                log::info!(
                    "reconnected to {} after {:.1} s disconnected: resuming at offset {offset}, {} bytes resent (reconnect {}){}",
                    link.peer,
                    broken.elapsed().as_secs_f64(),
                    self.sent_at_break.saturating_sub(offset),
                    self.reconnects,
                    self.drop_note()
                );
                crate::status::peer_added(&link.peer);
                self.link = Some(link);
                self.broken = None;
                self.backoff.reset();
            }
            Err(e) => {
                // The first failure after a break says why; the rest,
                // one per backoff step, only at debug level.
                if self.next_try <= broken + self.opts.backoff_max.min(BACKOFF_FIRST_LOG) {
                    log::warn!("cannot reconnect yet: {e}");
                } else {
                    log::debug!("reconnecting: {e}");
                }
                if let Some(limit) = self.opts.retry_for
                    && broken.elapsed() >= limit
                {
                    return Err(Error::new(
                        ExitStatus::Unavailable,
                        format!(
                            "cannot reconnect within {} s ({e}): {} bytes not delivered{}",
                            limit.as_secs_f64(),
                            self.spool.unacked() + self.binding.fifo.unread(),
                            self.drop_note()
                        ),
                    ));
                }
                self.next_try = Instant::now() + self.backoff.next_delay();
            }
        }
        Ok(())
    }

    fn drop_note(&self) -> String {
        match self.spool.dropped() {
            (0, _) => String::new(),
            (lines, bytes) => format!("; {lines} lines ({bytes} bytes) dropped, spool full"),
        }
    }

    /// Logs the drops of a full spool, at most every [`DROP_LOG_EVERY`].
    fn log_drops(&mut self, force: bool) {
        let (lines, bytes) = self.spool.dropped();
        if lines > self.drops_logged.0
            && (force
                || self.drops_logged.1.elapsed() >= DROP_LOG_EVERY
                || self.drops_logged.0 == 0)
        {
            log::warn!(
                "spool full ({} bytes): {lines} lines ({bytes} bytes) dropped so far",
                self.opts.spool
            );
            self.drops_logged = (lines, Instant::now());
        }
    }
}

/// Seals what the spool has unsent into the link's output, and Close once
/// the FIFO has ended and everything is sent.
fn fill_out(link: &mut Link, spool: &mut crate::spool::Spool, fifo_eof: bool) {
    while link.out.len() < OUT_HIGH {
        let (a, b) = spool.unsent(crate::secure::MAX_BODY);
        let n = a.len() + b.len();
        if n == 0 {
            break;
        }
        let lines = crate::framer::count_lines(a) + crate::framer::count_lines(b);
        if b.is_empty() {
            link.channel.sealer.seal_data(a, &mut link.out);
        } else {
            let joined = [a, b].concat();
            link.channel.sealer.seal_data(&joined, &mut link.out);
        }
        crate::status::add_out(n);
        crate::status::add_lines_out(lines);
        spool.sent(n);
    }
    if fifo_eof && !link.close_sent && spool.unsent(1).0.is_empty() && spool.unsent(1).1.is_empty()
    {
        link.channel
            .sealer
            .seal(&crate::secure::Frame::Close, &mut link.out);
        link.close_sent = true;
    }
}

fn flush_out(link: &mut Link) -> std::result::Result<(), String> {
    use std::io::Write;
    while !link.out.is_empty() {
        match link.stream.write(&link.out) {
            Ok(n) => {
                link.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(crate::error::describe_io(&e)),
        }
    }
    Ok(())
}
