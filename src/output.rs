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

use crate::args::{Host, Id, Port};
use crate::binding::{Binding, BindingOptions, Reason, StopEvents};
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::poll::{IN, OUT, PollSet, TROUBLE};

/// The most one splice(2) call moves: the FIFO's whole capacity.
const CHUNK: usize = 1 << 20;
/// The most of not yet sent data the connection's send buffer holds (see
/// [`net::limit_unsent`]): 4, 16 and 32 KiB measured the same, 64 KiB
/// gave much of the gain back; 16 KiB is a few splices of slack.
const UNSENT_LIMIT: u32 = 16 * 1024;
/// How long a stopping binding may spend sending what is left: the spec
/// asks for an exit within a second of the signal.
const FLUSH_LIMIT: Duration = Duration::from_millis(900);

pub struct OutputOptions {
    pub(crate) id: Id,
    pub(crate) host: Host,
    pub(crate) port: Port,
    pub(crate) connect_timeout: Duration,
    pub(crate) common: BindingOptions,
}

pub fn run(opts: OutputOptions) -> Result<()> {
    let binding = Binding::open(&opts.id, &opts.common)?;
    let stream = match net::connect(opts.host.as_str(), opts.port, opts.connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            binding.close();
            return Err(e);
        }
    };
    let common = opts.common.clone();
    binding.run("bind-output", &common, move |binding, stop, ready| {
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("cannot configure the socket", &e))?;
        if let Err(e) = net::limit_unsent(&stream, UNSENT_LIMIT) {
            // Only slower on a kernel without it (before Linux 3.12).
            log::warn!(
                "cannot limit the unsent data: {}",
                crate::error::describe_io(&e)
            );
        }
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| format!("{}:{}", opts.host, opts.port));
        log::info!(
            "{} connected to {peer}, FIFO {}",
            binding.id,
            binding.fifo.path().display()
        );
        crate::status::start_binding(
            binding,
            "bind-output",
            opts.port.0,
            Some(opts.host.as_str()),
        );
        crate::status::peer_added(&peer);
        binding.ready(ready);
        let mut relay = Outbound {
            binding,
            stream,
            peer,
            socket_full: false,
            remote_eof: false,
        };
        relay.serve(stop)
    })
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
                match (stop.check(&set, slots), phase) {
                    (None, _) | (Some(Reason::Drain), Phase::Draining) => {}
                    (Some(Reason::Drain), _) => {
                        log::info!("draining: {}", Reason::Drain);
                        // No new writer can open the FIFO now; without our
                        // write end, end-of-file comes once the writers
                        // that have it open (a daemon's children too) are
                        // all done.
                        self.binding.fifo.remove();
                        self.binding.fifo.close_writer();
                        phase = Phase::Draining;
                    }
                    (Some(reason), _) => {
                        log::info!("stopping: {reason}");
                        self.binding.fifo.remove();
                        phase = Phase::Flushing(Instant::now() + FLUSH_LIMIT);
                    }
                }
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
