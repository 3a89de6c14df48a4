//! bind-output: whatever is written into a FIFO, out over one TCP
//! connection.
//!
//! The binding holds its FIFO open read-write, so writers may open and
//! close it at will and it never sees end-of-file; it ends on a signal
//! (after sending everything already in the FIFO), when its parent dies,
//! or when the remote end closes. Bytes move from the FIFO to the socket
//! with splice(2), without passing through the process: no buffer of
//! ours, so when the remote stops reading, the FIFO fills and the writers
//! block, and memory stays what it is.

use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use crate::args::{Host, Id, Port};
use crate::binding::{Binding, Common, IN, OUT, PollSet, Reason, Stop, TROUBLE};
use crate::error::{Error, ExitStatus, Result};
use crate::net;

/// The most one splice(2) call moves: the FIFO's whole capacity.
const CHUNK: usize = 1 << 20;
/// How long a stopping binding may spend sending what is left: the spec
/// asks for an exit within a second of the signal.
const FLUSH_LIMIT: Duration = Duration::from_millis(900);

pub struct OutputOptions {
    pub id: Id,
    pub host: Host,
    pub port: Port,
    pub connect_timeout: Duration,
    pub common: Common,
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
        let mut relay = Relay {
            binding,
            stream,
            peer,
            socket_full: false,
        };
        relay.serve(stop)
    })
}

struct Relay<'a> {
    binding: &'a mut Binding,
    stream: TcpStream,
    peer: String,
    /// The last splice stopped because the socket could take no more.
    socket_full: bool,
}

enum Step {
    Continue,
    RemoteClosed,
}

impl Relay<'_> {
    fn serve(&mut self, stop: &Stop) -> Result<()> {
        let mut set = PollSet::default();
        loop {
            set.clear();
            let stop_slots = stop.register(&mut set);
            // Wait for data only when there is room to send it, for room
            // only when there is data: never a busy loop.
            let fifo_slot = (!self.socket_full).then(|| set.add(self.binding.fifo.as_fd(), IN));
            let sock_events = if self.socket_full { IN | OUT } else { IN };
            let sock_slot = set.add(self.stream.as_fd(), sock_events);
            set.wait(None)
                .map_err(|e| Error::io("cannot wait for events", &e))?;

            match stop.check(&set, stop_slots) {
                None => {}
                Some(Reason::Drain) => {
                    log::info!("draining: {}", Reason::Drain);
                    return self.send_rest(Some(stop));
                }
                Some(reason) => {
                    log::info!("stopping: {reason}");
                    return self.send_rest(None);
                }
            }
            let sock = set.revents(sock_slot);
            if sock & (IN | TROUBLE) != 0
                && let Step::RemoteClosed = self.discard_input()
            {
                return self.remote_closed();
            }
            if sock & OUT != 0 {
                self.socket_full = false;
            }
            let fifo_ready = fifo_slot.is_some_and(|slot| set.revents(slot) & IN != 0);
            if (fifo_ready || sock & OUT != 0)
                && let Step::RemoteClosed = self.pump()?
            {
                return self.remote_closed();
            }
        }
    }

    /// Moves what the FIFO holds into the socket until one side stops.
    fn pump(&mut self) -> Result<Step> {
        let fifo = self.binding.fifo.file().as_raw_fd();
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
            // We hold the FIFO open for writing too: never end-of-file.
            if n == 0 {
                return Ok(Step::Continue);
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

    /// Nothing is expected from the remote; reading tells us it closed.
    fn discard_input(&mut self) -> Step {
        let mut sink = [0u8; 4096];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return Step::RemoteClosed,
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

    /// Sends what the FIFO holds, then closes the connection (a FIN after
    /// the data; the kernel still delivers what it has queued). Draining
    /// (`stop` given: the writer is done) there is no deadline, as slowly
    /// as the remote reads, and a stop event meanwhile falls back to the
    /// flush; flushing (after a stop event) it takes at most
    /// [`FLUSH_LIMIT`], and what is left then is lost.
    fn send_rest(&mut self, stop: Option<&Stop>) -> Result<()> {
        // No new writer can open the FIFO now; the ones that have it open
        // have written what they were going to write before the signal.
        self.binding.fifo.remove();
        let deadline = stop.is_none().then(|| Instant::now() + FLUSH_LIMIT);
        let mut set = PollSet::default();
        loop {
            if let Step::RemoteClosed = self.pump()? {
                return self.remote_closed();
            }
            if self.binding.fifo.unread() == 0 {
                break;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                let lost = self.binding.fifo.unread();
                log::warn!("{} stopped reading: {lost} bytes not sent", self.peer);
                break;
            }
            set.clear();
            let stop_slots = stop.map(|s| s.register(&mut set));
            let sock_slot = set.add(self.stream.as_fd(), IN | OUT);
            set.wait(left)
                .map_err(|e| Error::io("cannot wait for events", &e))?;
            if let (Some(stop), Some(slots)) = (stop, stop_slots) {
                match stop.check(&set, slots) {
                    None | Some(Reason::Drain) => {}
                    Some(reason) => {
                        log::info!("stopping: {reason}");
                        return self.send_rest(None);
                    }
                }
            }
            if set.revents(sock_slot) & (IN | TROUBLE) != 0
                && let Step::RemoteClosed = self.discard_input()
            {
                return self.remote_closed();
            }
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }
}
