//! pool: the receiving end of a master.
//!
//! The main thread polls the listener, the signals, the master's session
//! and a wake-up from the door. The door gives each connection a thread
//! for its handshake (one call of [`protocol::challenge`]), so a silent or
//! garbage connection never holds up a good master; at most
//! [`MAX_PENDING`] handshakes wait at once, and a newcomer beyond that
//! pushes the oldest out, so a crowd of idle connections cannot lock a
//! master out either. The first master to authenticate is handed to the
//! main thread (others are told the pool is busy), which serves its
//! requests: for each daemon it announces, a `bind-input --once` is
//! started on a free port, restricted to the master's address, and
//! recorded in the registry. After END the pool stops listening and exits
//! once its bindings have ended.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::args::{Id, Key, Port};
use crate::claim;
use crate::cli::ChildBinding;
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::poll::{IN, PollSet};
use crate::protocol::{self, Conn, Failure, Message};
use crate::runtime_dir::RuntimeDir;
use crate::supervise::{Owner, START_LIMIT};

/// Handshakes in progress at once; a newcomer beyond them pushes the
/// oldest out.
const MAX_PENDING: usize = 16;
/// The answer to a handshake pushed out (or one that cannot be served).
const BUSY: &[u8] = b"ERR busy: too many connections\n";
/// Tries at finding a free port before answering ERR.
const PORT_TRIES: usize = 64;

pub struct PoolOptions {
    pub(crate) key: Key,
    pub(crate) port: Port,
    pub(crate) bind: Option<IpAddr>,
    pub(crate) ports: (u16, u16),
    pub(crate) accept_timeout: Duration,
    pub(crate) step_timeout: Duration,
}

/// What the handshake threads share with the main thread.
struct Door {
    key: Key,
    step: Duration,
    pending: Mutex<Pending>,
    /// A master has been admitted: the others are told the pool is busy.
    taken: AtomicBool,
    admitted: Sender<(Conn, IpAddr)>,
    /// One byte here wakes the main thread for what `admitted` carries.
    wake: UnixStream,
}

/// The handshakes in progress: connections that have not sent their first
/// line yet, oldest first, each with a handle to push it out.
#[derive(Default)]
struct Pending {
    next: u64,
    conns: VecDeque<(u64, TcpStream)>,
}

impl Door {
    /// Takes connection `token` off the pending handshakes; false if it was
    /// no longer there: pushed out to make room.
    fn leave(&self, token: u64) -> bool {
        let mut pending = self.pending.lock().unwrap();
        match pending.conns.iter().position(|(t, _)| *t == token) {
            Some(i) => {
                pending.conns.remove(i);
                true
            }
            None => false,
        }
    }

    /// Makes room for connection `stream` and records it; its token.
    fn enter(&self, stream: &TcpStream) -> io::Result<u64> {
        let mut pending = self.pending.lock().unwrap();
        // Refusing newcomers while the table is full would let 16 idle
        // connections lock every master out for the step timeout, again
        // and again. Instead the oldest handshake, the likeliest to be
        // idle (a master answers its challenge within a round trip), makes
        // room: it is told it is busy and closed, and its thread, waiting
        // for its line, sees the end at once.
        if pending.conns.len() >= MAX_PENDING
            && let Some((_, oldest)) = pending.conns.pop_front()
        {
            let who = oldest
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            log::warn!("too many connections at once: dropped the oldest handshake, from {who}");
            let flags =
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
            let _ = nix::sys::socket::send(oldest.as_raw_fd(), BUSY, flags);
            let _ = oldest.shutdown(Shutdown::Both);
        }
        let handle = stream.try_clone()?;
        let token = pending.next;
        pending.next += 1;
        pending.conns.push_back((token, handle));
        Ok(token)
    }

    /// One connection's handshake, on a thread of its own; an admitted
    /// master goes to the main thread.
    fn handshake(&self, stream: TcpStream, peer: SocketAddr, token: u64) {
        let peer = net::unmapped(peer);
        let mut admitted = false;
        let result = Conn::new(stream, self.step)
            .map_err(Failure::Io)
            .and_then(|mut conn| {
                protocol::challenge(&mut conn, &self.key, || {
                    // With its first line in, it is no handshake to push
                    // out any more.
                    if !self.leave(token) {
                        return Err("dropped to make room: too many connections at once".into());
                    }
                    if self.taken.swap(true, Ordering::SeqCst) {
                        return Err("busy: another master is being served".into());
                    }
                    admitted = true;
                    Ok(())
                })
                .map(|()| conn)
            });
        self.leave(token);
        match result {
            Ok(conn) => {
                let ip = net::canonical(peer.ip());
                log::info!("master {ip} authenticated");
                let _ = self.admitted.send((conn, ip));
                let _ = (&self.wake).write_all(b"!");
            }
            Err(e) => {
                if admitted {
                    // Nothing was started for it: the pool is free for the
                    // next one.
                    self.taken.store(false, Ordering::SeqCst);
                    log::warn!("connection from {peer}: master went away before the session: {e}");
                } else {
                    log::warn!("connection from {peer}: {e}");
                }
            }
        }
    }
}

/// The master being served.
struct Session {
    conn: Conn,
    master: IpAddr,
    seen: HashSet<Id>,
}

struct Pool {
    opts: PoolOptions,
    owner: Owner,
    door: Arc<Door>,
    admitted: Receiver<(Conn, IpAddr)>,
    wake: UnixStream,
    /// `None` once the session has ended: the port is free again at once.
    listener: Option<TcpListener>,
    session: Option<Session>,
}

pub fn run(opts: PoolOptions) -> Result<()> {
    let owner = Owner::new("pool", false)?;
    let listener = crate::activation::listen(opts.bind, opts.port)?;
    let (wake, wake_tx) =
        UnixStream::pair().map_err(|e| Error::io("cannot create a socket pair", &e))?;
    wake.set_nonblocking(true)
        .map_err(|e| Error::io("cannot configure a socket pair", &e))?;
    let (tx, admitted) = channel();
    log::info!("waiting for a master on port {}", opts.port);
    crate::status::start_owner(&owner.dir, &owner.name, "pool", opts.port.0, None);
    crate::notify::ready(&format!("waiting for a master on port {}", opts.port));
    let door = Arc::new(Door {
        key: opts.key.clone(),
        step: opts.step_timeout,
        pending: Mutex::new(Pending::default()),
        taken: AtomicBool::new(false),
        admitted: tx,
        wake: wake_tx,
    });
    let mut pool = Pool {
        opts,
        owner,
        door,
        admitted,
        wake,
        listener: Some(listener),
        session: None,
    };
    let outcome = pool.run();
    pool.owner.finish(outcome)
}

impl Pool {
    fn run(&mut self) -> Result<()> {
        let mut set = PollSet::default();
        loop {
            for (entry, status) in self.owner.reap() {
                log::info!("binding {} ended: {status}", entry.process.pid);
            }
            if self.listener.is_none() && self.owner.registry().entries().is_empty() {
                log::info!("all bindings have ended");
                return Ok(());
            }
            let buffered = self.session.as_ref().is_some_and(|s| s.conn.has_buffered());
            set.clear();
            let sig = set.add(self.owner.signals.as_fd(), IN);
            set.add(self.owner.children.as_fd(), IN);
            let wake = set.add(self.wake.as_fd(), IN);
            let listen = self.listener.as_ref().map(|l| set.add(l.as_fd(), IN));
            let session = self.session.as_ref().map(|s| set.add(s.conn.as_fd(), IN));
            set.wait(buffered.then_some(Duration::ZERO))
                .map_err(|e| Error::io("cannot wait for events", &e))?;
            self.owner.children.drain();
            if set.revents(sig) != 0
                && let Some(sig) = self.owner.stop_signal()
            {
                return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
            }
            if set.revents(wake) != 0 {
                let mut buf = [0u8; 64];
                while matches!(io::Read::read(&mut &self.wake, &mut buf), Ok(n) if n > 0) {}
                while let Ok((mut conn, master)) = self.admitted.try_recv() {
                    self.owner.stop_on(&mut conn)?;
                    crate::status::peer_added(master);
                    self.session = Some(Session {
                        conn,
                        master,
                        seen: HashSet::new(),
                    });
                }
            }
            if let (Some(slot), Some(l)) = (listen, &self.listener)
                && set.revents(slot) != 0
            {
                accept(&self.door, l);
            }
            if buffered || session.is_some_and(|slot| set.revents(slot) != 0) {
                self.serve()?;
            }
        }
    }

    /// Answers the master's next request; an error is a stop signal.
    fn serve(&mut self) -> Result<()> {
        let Some(mut s) = self.session.take() else {
            return Ok(());
        };
        let master = s.master;
        let end = match s.conn.recv() {
            Ok(Message::Daemon { name }) => {
                if !s.seen.insert(name.clone()) {
                    s.conn.refuse(&format!("daemon {name} announced twice"));
                    None
                } else {
                    match self.start(&name, master) {
                        Ok(port) => s
                            .conn
                            .send(&Message::Port { port })
                            .err()
                            .map(|e| format!("master went away: {e}")),
                        Err(e) if matches!(e.status, ExitStatus::Signal(_)) => return Err(e),
                        Err(e) => {
                            log::warn!("daemon {name}: {e}");
                            s.conn.refuse(&e.message);
                            None
                        }
                    }
                }
            }
            Ok(Message::End) => {
                let _ = s.conn.send(&Message::Bye);
                log::info!("master {master} sent END");
                Some(String::new())
            }
            Ok(other) => {
                s.conn.refuse(&format!("unexpected {other}"));
                Some(format!("master sent {other}: counting it as END"))
            }
            Err(Failure::Stopped(sig)) => {
                return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
            }
            Err(e @ Failure::Io(_)) => {
                Some(format!("master left without END ({e}): counting it as END"))
            }
            Err(e) => {
                s.conn.refuse(&e.to_string());
                Some(format!("{e}: counting it as END"))
            }
        };
        match end {
            None => self.session = Some(s),
            Some(why) => {
                crate::status::peer_gone(master);
                if !why.is_empty() {
                    log::warn!("connection from {master}: {why}");
                }
                // Stop listening: the port is free again at once.
                self.listener = None;
                log::info!("master done: waiting for the bindings to end");
            }
        }
        Ok(())
    }

    /// Starts the bind-input of daemon `name` on a free port; returns it.
    fn start(&mut self, name: &Id, master: IpAddr) -> Result<Port> {
        let (low, high) = self.opts.ports;
        for _ in 0..PORT_TRIES {
            let span = u64::from(high - low) + 1;
            let port = Port(low + (getrandom::u64().unwrap_or(0) % span) as u16);
            // Cheap test first; the binding's own listen settles any race.
            if net::listen(self.opts.bind, port).is_err() {
                continue;
            }
            let mut child = ChildBinding::input(name, port);
            child.once = true;
            child.allow = vec![net::Allow::from(master)];
            child.accept_timeout = Some(self.opts.accept_timeout);
            child.bind = self.opts.bind;
            match self
                .owner
                .start_binding(ChildBinding::Input(child), name, START_LIMIT)
            {
                Ok(_) => {
                    let fifo = self.owner.dir.fifo(name);
                    let mut out = io::stdout().lock();
                    // A reader that went away must not stop the pool.
                    let _ = writeln!(out, "{name} {port} {}", fifo.display());
                    let _ = out.flush();
                    return Ok(port);
                }
                Err(e) if e.status == ExitStatus::Unavailable => continue,
                Err(e) if matches!(e.status, ExitStatus::Signal(_)) => return Err(e),
                Err(e) => return Err(refusal(&self.owner.dir, name, e)),
            }
        }
        Err(Error::new(
            ExitStatus::Unavailable,
            format!("no free port found in {low}-{high}"),
        ))
    }
}

/// Why the binding of daemon `name` could not start, as the master is
/// told. "In use" only when a live binding holds the ID: a full disk, say,
/// makes bind-input exit with the same status.
fn refusal(dir: &RuntimeDir, name: &Id, err: Error) -> Error {
    let holder = claim::owner(&dir.dotfile(name.as_str(), "lock"));
    let message = if holder.is_some_and(|p| p.is_alive()) {
        format!("cannot bind daemon {name}: its ID is in use here")
    } else {
        format!("cannot bind daemon {name}: {err} (see the log)")
    };
    Error::new(err.status, message)
}

fn accept(door: &Arc<Door>, listener: &TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().map(|(s, p)| (s, net::unmapped(p))) {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("cannot accept: {}", crate::error::describe_io(&e));
                return;
            }
        };
        let token = match door.enter(&stream) {
            Ok(token) => token,
            Err(e) => {
                log::warn!("refused {peer}: {}", crate::error::describe_io(&e));
                let _ = (&stream).write_all(BUSY);
                continue;
            }
        };
        let door = Arc::clone(door);
        std::thread::spawn(move || door.handshake(stream, peer, token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::Claim;
    use crate::process::ProcessId;

    #[test]
    fn only_a_live_holder_makes_an_id_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::at(&tmp.path().join("rt")).unwrap();
        let name: Id = "d1".parse().unwrap();
        // What a bind-input that found the disk full exits with.
        let full = || Error::new(ExitStatus::CantCreate, "bind-input d1 30000 failed");
        let err = refusal(&dir, &name, full());
        assert_eq!(err.status, ExitStatus::CantCreate);
        assert!(!err.message.contains("in use"), "{err}");
        assert!(err.message.contains("bind-input d1 30000 failed"), "{err}");
        let mut held = Claim::take(&dir.dotfile("d1", "lock")).ok().unwrap();
        held.record(ProcessId::current()).unwrap();
        let err = refusal(&dir, &name, full());
        assert!(err.message.ends_with("its ID is in use here"), "{err}");
        held.release();
    }
}
