//! bind-output: whatever is written into a FIFO, out over one TCP
//! connection.
//!
//! The binding holds its FIFO open read-write, so writers may open and
//! close it at will and it never sees end-of-file; it ends on a signal
//! (after sending everything already in the FIFO), when its parent dies,
//! or when the remote end closes. When the remote stops reading, the
//! binding stops reading the FIFO and the writers block: memory stays at
//! one buffer.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::args::{Host, Id, Port};
use crate::binding::{Binding, Common, IN, OUT, PollSet, Stop, TROUBLE};
use crate::error::{Error, ExitStatus, Result, describe_io};
use crate::net;

const BUFFER: usize = 128 * 1024;
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
        ready.notify();
        let mut relay = Relay {
            binding,
            stream,
            buf: vec![0; BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            peer,
        };
        relay.serve(stop)
    })
}

struct Relay<'a> {
    binding: &'a mut Binding,
    stream: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    peer: String,
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
            let fifo_slot = (self.end < BUFFER).then(|| set.add(self.binding.fifo.as_fd(), IN));
            let sock_events = if self.start < self.end { IN | OUT } else { IN };
            let sock_slot = set.add(self.stream.as_fd(), sock_events);
            set.wait(None)
                .map_err(|e| Error::io("cannot wait for events", &e))?;

            if let Some(reason) = stop.check(&set, stop_slots) {
                log::info!("stopping: {reason}");
                return self.flush_and_close();
            }
            let sock = set.revents(sock_slot);
            if sock & (IN | TROUBLE) != 0
                && let Step::RemoteClosed = self.discard_input()
            {
                return self.remote_closed();
            }
            if let Some(slot) = fifo_slot
                && set.revents(slot) & IN != 0
            {
                self.read_fifo()?;
            }
            if sock & OUT != 0
                && let Step::RemoteClosed = self.send()
            {
                return self.remote_closed();
            }
        }
    }

    fn read_fifo(&mut self) -> Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == BUFFER {
            return Ok(0);
        }
        match self.binding.fifo.file().read(&mut self.buf[self.end..]) {
            Ok(n) => {
                self.end += n;
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(Error::io(
                format!("cannot read FIFO {}", self.binding.fifo.path().display()),
                &e,
            )),
        }
    }

    fn send(&mut self) -> Step {
        while self.start < self.end {
            match self.stream.write(&self.buf[self.start..self.end]) {
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("sending to {}: {}", self.peer, describe_io(&e));
                    return Step::RemoteClosed;
                }
            }
        }
        // All sent: the whole buffer is free again. (Left full, the FIFO
        // would never be polled again and the writers would hang.)
        self.start = 0;
        self.end = 0;
        Step::Continue
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
        let lost = self.end - self.start + self.binding.fifo.unread();
        let mut message = format!("{} closed the connection", self.peer);
        if lost > 0 {
            message.push_str(&format!(" ({lost} bytes not sent)"));
        }
        // Reported once, as this binding's error (logged or printed).
        Err(Error::new(ExitStatus::Unavailable, message))
    }

    /// Sends what the FIFO holds, then closes the connection.
    fn flush_and_close(&mut self) -> Result<()> {
        // No new writer can open the FIFO now; the ones that have it open
        // have written what they were going to write before the signal.
        self.binding.fifo.remove();
        let deadline = Instant::now() + FLUSH_LIMIT;
        let mut set = PollSet::default();
        loop {
            while self.end < BUFFER && self.read_fifo()? > 0 {}
            if let Step::RemoteClosed = self.send() {
                return self.remote_closed();
            }
            if self.start == self.end && self.binding.fifo.unread() == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let lost = self.end - self.start + self.binding.fifo.unread();
                log::warn!("{} stopped reading: {lost} bytes not sent", self.peer);
                break;
            }
            set.clear();
            set.add(self.stream.as_fd(), OUT);
            set.wait(Some(left))
                .map_err(|e| Error::io("cannot wait for events", &e))?;
        }
        // FIN after the data; the kernel still delivers what is queued.
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }
}
