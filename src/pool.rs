//! pool: the receiving end of a master.
//!
//! The main thread polls the listener, the signals and a pipe of events
//! from the connection threads. Each connection gets a thread for its
//! handshake, so a silent or garbage connection never holds up a good
//! master; at most [`MAX_PENDING`] handshakes wait at once, and a newcomer
//! beyond that pushes the oldest out, so a crowd of idle connections
//! cannot lock a master out either. The first master to authenticate is
//! served (others are told the pool is busy). For each daemon it
//! announces, a `bind-input --once` is started on a free port, restricted
//! to the master's address, and recorded in the registry; the main thread
//! reaps those children. After END the pool stops listening and exits once
//! its bindings have ended.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::args::{Id, Key, Port};
use crate::binding::{IN, PollSet};
use crate::claim::Claim;
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::protocol::{self, Conn, Failure, Message};
use crate::registry::{self, Entry, Kind, Registry};
use crate::runtime_dir::RuntimeDir;
use crate::signals::Signals;
use crate::supervise::{self, Watchdog};
use crate::sweep;

/// Handshakes in progress at once; a newcomer beyond them pushes the
/// oldest out.
const MAX_PENDING: usize = 16;
/// The answer to a handshake pushed out (or one that cannot be served).
const BUSY: &[u8] = b"ERR busy: too many connections\n";
/// Tries at finding a free port before answering ERR.
const PORT_TRIES: usize = 64;

pub struct PoolOptions {
    pub key: Key,
    pub port: Port,
    pub bind: Option<IpAddr>,
    pub ports: (u16, u16),
    pub accept_timeout: Duration,
    pub step_timeout: Duration,
}

/// State the connection threads share with the main thread.
struct Shared {
    opts: PoolOptions,
    dir: RuntimeDir,
    registry: Mutex<Registry>,
    watchdog: Watchdog,
    session_taken: AtomicBool,
    pending: Mutex<Pending>,
    /// Connection threads write one byte here: `R` a binding was
    /// registered, `E` the master is done.
    events: Mutex<UnixStream>,
}

/// The handshakes in progress: connections that have not sent their first
/// line yet, oldest first, each with a handle to push it out.
#[derive(Default)]
struct Pending {
    next: u64,
    conns: VecDeque<(u64, TcpStream)>,
}

impl Shared {
    fn notify(&self, event: u8) {
        let _ = self.events.lock().unwrap().write_all(&[event]);
    }

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
}

pub fn run(opts: PoolOptions) -> Result<()> {
    let dir = RuntimeDir::open()?;
    sweep::sweep(&dir);
    let (name, claim) = supervise::claim_owner(&dir, "pool")?;
    let claim_path = claim.path().to_path_buf();
    let registry_path = dir.dotfile(&name, "registry");
    let registry = match Registry::create(&registry_path) {
        Ok(r) => r,
        Err(e) => {
            claim.release();
            return Err(Error::io(
                format!("cannot create {}", registry_path.display()),
                &e,
            ));
        }
    };
    let cleanup = |registry: Registry, claim: Claim| {
        crate::status::finish();
        registry.delete();
        claim.release();
    };
    let signals = Signals::block(&[Signal::SIGCHLD])?;
    let status_path = dir.dotfile(&name, "status");
    let _guardian: OwnedFd =
        supervise::guardian(&registry_path, vec![claim_path.clone(), status_path])?;
    let listener = match crate::activation::listen(opts.bind, opts.port) {
        Ok(l) => l,
        Err(e) => {
            cleanup(registry, claim);
            return Err(e);
        }
    };
    let (events_rx, events_tx) =
        UnixStream::pair().map_err(|e| Error::io("cannot create a socket pair", &e))?;
    events_rx
        .set_nonblocking(true)
        .map_err(|e| Error::io("cannot configure a socket pair", &e))?;
    log::info!("waiting for a master on port {}", opts.port);
    crate::status::start_owner(&dir, &name, "pool", opts.port.0, None);
    crate::notify::ready(&format!("waiting for a master on port {}", opts.port));
    let shared = Arc::new(Shared {
        opts,
        dir,
        registry: Mutex::new(registry),
        watchdog: Watchdog::new()?,
        session_taken: AtomicBool::new(false),
        pending: Mutex::new(Pending::default()),
        events: Mutex::new(events_tx),
    });
    let outcome = main_loop(&shared, &signals, listener, &events_rx);
    // Connection threads may still hold references; take the registry out.
    let registry = std::mem::replace(&mut *shared.registry.lock().unwrap(), Registry::detached());
    cleanup(registry, claim);
    outcome
}

fn main_loop(
    shared: &Arc<Shared>,
    signals: &Signals,
    listener: TcpListener,
    events: &UnixStream,
) -> Result<()> {
    let mut listener = Some(listener);
    let mut ended = false;
    let mut set = PollSet::default();
    loop {
        reap(shared);
        if ended && shared.registry.lock().unwrap().entries().is_empty() {
            log::info!("all bindings have ended");
            return Ok(());
        }
        set.clear();
        let sig_slot = set.add(signals.as_fd(), IN);
        let ev_slot = set.add(events.as_fd(), IN);
        let listen_slot = listener.as_ref().map(|l| set.add(l.as_fd(), IN));
        set.wait(None)
            .map_err(|e| Error::io("cannot wait for events", &e))?;

        if set.revents(sig_slot) != 0 {
            while let Some(sig) = signals.next() {
                if sig != Signal::SIGCHLD {
                    log::info!("stopping on {sig}");
                    crate::notify::stopping();
                    let entries = shared.registry.lock().unwrap().entries().to_vec();
                    registry::stop_all(&entries, Duration::from_secs(1));
                    reap(shared);
                    return Err(Error::new(ExitStatus::Signal(sig as i32), String::new()));
                }
            }
        }
        if set.revents(ev_slot) != 0 {
            let mut buf = [0u8; 64];
            while let Ok(n) = io::Read::read(&mut &*events, &mut buf) {
                if n == 0 {
                    break;
                }
                if buf[..n].contains(&b'E') && !ended {
                    ended = true;
                    // Stop listening: the port is free again at once.
                    listener = None;
                    log::info!("master done: waiting for the bindings to end");
                }
            }
        }
        if let (Some(slot), Some(l)) = (listen_slot, &listener)
            && set.revents(slot) != 0
        {
            accept(shared, l);
        }
    }
}

/// Reaps the bindings that have exited and drops them from the registry.
fn reap(shared: &Shared) {
    let mut registry = shared.registry.lock().unwrap();
    let pids: Vec<i32> = registry.entries().iter().map(|e| e.process.pid).collect();
    for pid in pids {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => {
                log::info!("binding {pid} ended: {status:?}");
                let _ = registry.remove(pid);
            }
            Err(_) => {
                let _ = registry.remove(pid);
            }
        }
    }
}

fn accept(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("cannot accept: {}", crate::error::describe_io(&e));
                return;
            }
        };
        let token = {
            let mut pending = shared.pending.lock().unwrap();
            // Refusing newcomers while the table is full would let 16 idle
            // connections lock every master out for the step timeout, again
            // and again. Instead the oldest handshake, the likeliest to be
            // idle (a master answers its challenge within a round trip),
            // makes room: it is told it is busy and closed, and its thread,
            // waiting for its line, sees the end at once.
            if pending.conns.len() >= MAX_PENDING
                && let Some((_, oldest)) = pending.conns.pop_front()
            {
                let who = oldest
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "?".into());
                log::warn!(
                    "too many connections at once: dropped the oldest handshake, from {who}"
                );
                let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT
                    | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
                let _ = nix::sys::socket::send(oldest.as_raw_fd(), BUSY, flags);
                let _ = oldest.shutdown(Shutdown::Both);
            }
            let handle = match stream.try_clone() {
                Ok(handle) => handle,
                Err(e) => {
                    log::warn!("refused {peer}: {}", crate::error::describe_io(&e));
                    let _ = (&stream).write_all(BUSY);
                    continue;
                }
            };
            let token = pending.next;
            pending.next += 1;
            pending.conns.push_back((token, handle));
            token
        };
        let shared = Arc::clone(shared);
        std::thread::spawn(move || {
            let ip = net::canonical(peer.ip());
            if let Err(reason) = serve(&shared, stream, ip, token) {
                log::warn!("connection from {peer}: {reason}");
            }
            shared.leave(token);
        });
    }
}

/// One connection: the handshake, then (for the master) its requests.
fn serve(
    shared: &Shared,
    stream: TcpStream,
    master: IpAddr,
    token: u64,
) -> std::result::Result<(), String> {
    let key = &shared.opts.key;
    let mut conn = Conn::new(stream, shared.opts.step_timeout).map_err(|e| e.to_string())?;
    let nonce = protocol::nonce();
    conn.send(&Message::Challenge {
        version: protocol::VERSION,
        nonce: nonce.clone(),
    })
    .map_err(|e| e.to_string())?;
    let first = conn.recv();
    // With its first line in, it is no handshake to push out any more.
    if !shared.leave(token) {
        return Err("dropped to make room: too many connections at once".into());
    }
    let cnonce = match first {
        Ok(Message::Auth { cnonce, mac, .. }) => {
            if !protocol::verify(key, "master", &nonce, &cnonce, &mac) {
                conn.refuse("authentication failed: wrong key");
                return Err("refused: wrong key".into());
            }
            cnonce
        }
        Ok(other) => {
            conn.refuse("expected FIFOBIND 1 AUTH");
            return Err(format!("refused: sent {other} before authenticating"));
        }
        Err(e) => {
            if !matches!(e, Failure::Io(_)) {
                conn.refuse(&e.to_string());
            }
            return Err(format!("handshake failed: {e}"));
        }
    };
    if shared.session_taken.swap(true, Ordering::SeqCst) {
        conn.refuse("busy: another master is being served");
        return Err("refused: another master is being served".into());
    }
    if let Err(e) = conn.send(&Message::Ok {
        proof: protocol::mac(key, "pool", &nonce, &cnonce),
    }) {
        // Nothing was started for it: the pool is free for the next one.
        shared.session_taken.store(false, Ordering::SeqCst);
        return Err(format!("master went away before the session: {e}"));
    }
    log::info!("master {master} authenticated");
    crate::status::peer_added(master);
    let result = session(shared, &mut conn, master);
    crate::status::peer_gone(master);
    shared.notify(b'E');
    result
}

fn session(shared: &Shared, conn: &mut Conn, master: IpAddr) -> std::result::Result<(), String> {
    let mut seen = HashSet::new();
    loop {
        match conn.recv() {
            Ok(Message::Daemon { name }) => {
                if !seen.insert(name.clone()) {
                    conn.refuse(&format!("daemon {name} announced twice"));
                    continue;
                }
                match start(shared, &name, master) {
                    Ok(port) => conn
                        .send(&Message::Port { port })
                        .map_err(|e| format!("master went away: {e}"))?,
                    Err(reason) => {
                        log::warn!("daemon {name}: {reason}");
                        conn.refuse(&reason);
                    }
                }
            }
            Ok(Message::End) => {
                let _ = conn.send(&Message::Bye);
                log::info!("master {master} sent END");
                return Ok(());
            }
            Ok(other) => {
                conn.refuse(&format!("unexpected {other}"));
                return Err(format!("master sent {other}: counting it as END"));
            }
            Err(Failure::Io(e)) => {
                return Err(format!(
                    "master left without END ({}): counting it as END",
                    Failure::Io(e)
                ));
            }
            Err(e) => {
                conn.refuse(&e.to_string());
                return Err(format!("{e}: counting it as END"));
            }
        }
    }
}

/// Starts the bind-input of daemon `name` on a free port; returns it.
fn start(shared: &Shared, name: &Id, master: IpAddr) -> std::result::Result<Port, String> {
    let (low, high) = shared.opts.ports;
    for _ in 0..PORT_TRIES {
        let span = u64::from(high - low) + 1;
        let port = Port(low + (getrandom::u64().unwrap_or(0) % span) as u16);
        // Cheap test first; the binding's own listen settles any race.
        if net::listen(shared.opts.bind, port).is_err() {
            continue;
        }
        let mut args = vec![
            "--once".to_string(),
            "--allow".to_string(),
            master.to_string(),
            "--accept-timeout".to_string(),
            shared.opts.accept_timeout.as_secs_f64().to_string(),
        ];
        if let Some(bind) = shared.opts.bind {
            args.extend(["--bind".to_string(), bind.to_string()]);
        }
        args.extend([name.to_string(), port.to_string()]);
        let mut registry = shared.registry.lock().unwrap();
        match supervise::start_binding("bind-input", &args, shared.dir.path(), &shared.watchdog) {
            Ok(process) => {
                registry
                    .add(Entry {
                        kind: Kind::Binding,
                        process,
                        name: name.to_string(),
                    })
                    .map_err(|e| format!("cannot write the registry: {e}"))?;
                drop(registry);
                shared.notify(b'R');
                let fifo = shared.dir.fifo(name);
                let mut out = io::stdout().lock();
                // A reader that went away must not stop the pool.
                let _ = writeln!(out, "{name} {port} {}", fifo.display());
                let _ = out.flush();
                return Ok(port);
            }
            Err(e) if e.status == ExitStatus::Unavailable => continue,
            Err(e) if e.status == ExitStatus::CantCreate => {
                return Err(format!("cannot bind daemon {name}: its ID is in use here"));
            }
            Err(e) => return Err(format!("cannot bind daemon {name}: {e}")),
        }
    }
    Err(format!("no free port found in {low}-{high}"))
}
