//! pool: the receiving end of masters.
//!
//! One poll loop does everything: the listener, the handshakes at the
//! door ([`crate::door`]: bounded, per address, penalised), the sessions
//! of the masters it admitted, signals and children.
//!
//! Each admitted master is a session, named `HELLO`'s name (or `-2`,
//! `-3`... while a live session has it). For each daemon it announces,
//! a `bind-input --once` is started on a free port, restricted to the
//! master's address, taking only the stream `SESSION.DAEMON` sealed with
//! that stream's secret (handed over through a pipe), and recorded in
//! the registry. The pool serves sessions one after another and at once
//! until stopped; with `--once`, it stops listening once its first
//! session has ended and exits once that session's bindings have.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, RawFd};
use std::time::{Duration, Instant};

use crate::args::{Id, Key, Port};
use crate::claim;
use crate::cli::{self, ChildBinding, KeyArgs};
use crate::door::{Admitted, Door, Round, flush, read_some};
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::poll::{IN, OUT, PollSet};
use crate::protocol::{self, Message};
use crate::runtime_dir::RuntimeDir;
use crate::secure::{Channel, Frame};
use crate::supervise::{Owner, START_LIMIT, STREAM_KEYS};
/// Tries at finding a free port before answering ERR.
const PORT_TRIES: usize = 64;
/// Wait for a master on PORT; for each daemon it announces, start a
/// bind-input on a free port and print "NAME PORT FIFO" on stdout.
// pool's command line (the `///` comments are its `--help` text),
// then [`PoolOptions::resolve`]d.
#[derive(clap::Parser, Debug)]
#[command(name = "pool", version)]
pub struct PoolOptions {
    #[command(flatten)]
    pub(crate) key_args: KeyArgs,

    /// Seconds allowed for each step of the protocol exchange
    #[arg(long = "timeout", value_name = "SECS", value_parser = cli::seconds, default_value = "10")]
    pub(crate) step_timeout: Duration,

    /// The TCP port to wait for a master on, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// Listen (and bind the daemons' ports) on this local address only
    #[arg(short, long, value_name = "ADDR")]
    pub(crate) bind: Option<IpAddr>,

    /// The ports the daemons' bindings are chosen from (the default stays
    /// below the kernel's ephemeral range, 32768 and up)
    #[arg(long, value_name = "LOW-HIGH", value_parser = cli::port_range, default_value = "20000-32767")]
    pub(crate) ports: (u16, u16),

    /// Seconds a daemon's binding waits for the master's connection
    #[arg(long, value_name = "SECS", value_parser = cli::seconds, default_value = "30")]
    pub(crate) accept_timeout: Duration,

    /// Write a newline to this inherited descriptor once listening, then
    /// close it (s6's notification-fd)
    #[arg(long, value_name = "FD")]
    pub(crate) ready_fd: Option<RawFd>,

    /// Serve one master's session only: then stop listening, and exit once
    /// its bindings have ended (without it, serve masters until stopped)
    #[arg(long)]
    pub(crate) once: bool,

    /// The key, read from `key_args` by [`PoolOptions::resolve`].
    #[arg(skip)]
    key: Option<Key>,
}

impl PoolOptions {
    /// Reads the key and adopts what a service manager passed (readiness
    /// descriptor, socket): call it before any thread starts.
    pub fn resolve(mut self) -> Result<PoolOptions> {
        crate::notify::init(self.ready_fd, true)?;
        crate::activation::adopt()?;
        self.key = Some(self.key_args.resolve()?);
        Ok(self)
    }

    fn key(&self) -> &Key {
        self.key.as_ref().expect("resolved before run")
    }
}

/// An admitted master's control connection.
struct Link {
    stream: TcpStream,
    channel: Channel,
    inbuf: Vec<u8>,
    out: Vec<u8>,
}

/// One master's session: its control connection while it lasts, and the
/// bindings started for it while they run.
struct Session {
    name: Id,
    master: IpAddr,
    link: Option<Link>,
    seen: HashSet<Id>,
    bindings: HashSet<i32>,
}

struct Pool {
    opts: PoolOptions,
    owner: Owner,
    /// `None` once a `--once` pool's session has ended.
    listener: Option<TcpListener>,
    door: Door,
    sessions: Vec<Session>,
    /// A `--once` pool has admitted its session.
    taken: bool,
}

pub fn run(opts: PoolOptions) -> Result<()> {
    let owner = Owner::new("pool", false)?;
    let listener = crate::activation::listen(opts.bind, opts.port)?;
    log::info!("waiting for a master on port {}", opts.port);
    owner.publish(opts.port.0, None);
    crate::notify::ready(&format!("waiting for a master on port {}", opts.port));
    let door = Door::new(opts.key().clone(), opts.step_timeout);
    let mut pool = Pool {
        opts,
        owner,
        listener: Some(listener),
        door,
        sessions: Vec::new(),
        taken: false,
    };
    let outcome = pool.run();
    pool.door.last_summary();
    pool.owner.finish(outcome)
}
impl Pool {
    fn run(&mut self) -> Result<()> {
        let mut set = PollSet::default();
        loop {
            for (entry, status) in self.owner.reap() {
                log::info!(
                    "binding {} ({}) ended: {status}",
                    entry.name,
                    entry.process.pid
                );
                for s in &mut self.sessions {
                    s.bindings.remove(&entry.process.pid);
                }
            }
            self.sessions.retain(|s| {
                let live = s.link.is_some() || !s.bindings.is_empty();
                if !live {
                    log::info!("session {} ({}) is over", s.name, s.master);
                }
                live
            });
            if self.listener.is_none() && self.owner.registry().entries().is_empty() {
                log::info!("all bindings have ended");
                return Ok(());
            }
            let now = Instant::now();
            self.door.tick(now);

            set.clear();
            let sig = set.add(self.owner.signals.as_fd(), IN);
            set.add(self.owner.children.as_fd(), IN);
            let listen = self.listener.as_ref().map(|l| set.add(l.as_fd(), IN));
            let pending = self.door.watch(&mut set);
            let links: Vec<Option<usize>> = self
                .sessions
                .iter()
                .map(|s| {
                    s.link.as_ref().map(|l| {
                        let ev = if l.out.is_empty() { IN } else { IN | OUT };
                        set.add(l.stream.as_fd(), ev)
                    })
                })
                .collect();
            set.wait(Some(self.door.timeout(now)))
                .map_err(|e| Error::io("cannot wait for events", &e))?;
            self.owner.children.drain();
            if set.revents(sig) != 0
                && let Some(sig) = self.owner.stop_signal()
            {
                return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
            }
            // Sessions first: they were admitted before anything new.
            let ready: Vec<usize> = links
                .iter()
                .enumerate()
                .filter(|(_, slot)| slot.is_some_and(|s| set.revents(s) != 0))
                .map(|(i, _)| i)
                .collect();
            for i in ready {
                self.serve(i)?;
            }
            let mut round = Round::new(pending.iter().map(|&s| set.revents(s) != 0).collect());
            while let Some(admitted) = self.door.next(&mut round) {
                self.admit(admitted);
            }
            if let Some(slot) = listen
                && set.revents(slot) != 0
                && let Some(listener) = &self.listener
            {
                self.door.accept(listener);
            }
        }
    }

    /// A master through the door: its session opens, unless a `--once`
    /// pool has had its one.
    fn admit(&mut self, admitted: Admitted) {
        let (ip, name) = (admitted.ip, admitted.name);
        let mut link = Link {
            stream: admitted.stream,
            channel: admitted.channel,
            inbuf: admitted.rest,
            out: admitted.out,
        };
        if self.opts.once && self.taken {
            log::info!("master {ip} ({name}): busy with the one session of --once");
            link.say(&Message::Err {
                reason: "busy: this pool serves one session (--once)".into(),
            });
            link.close();
            return;
        }
        self.taken = true;
        let name = self.free_name(&name);
        link.say(&Message::Session { name: name.clone() });
        log::info!("master {ip} authenticated: session {name}");
        crate::status::peer_added(ip);
        self.sessions.push(Session {
            name,
            master: ip,
            link: Some(link),
            seen: HashSet::new(),
            bindings: HashSet::new(),
        });
        // What it sent after HELLO is served now.
        let i = self.sessions.len() - 1;
        if let Err(e) = self.serve(i) {
            log::warn!("{e}");
        }
    }

    /// `name`, or `name-2`, `name-3`... while a live session has it.
    fn free_name(&self, name: &Id) -> Id {
        let taken = |n: &Id| self.sessions.iter().any(|s| s.name == *n);
        if !taken(name) {
            return name.clone();
        }
        (2..)
            .map(|i| format!("{name}-{i}").parse::<Id>().expect("a valid ID"))
            .find(|n| !taken(n))
            .expect("some suffix is free")
    }

    /// Reads and answers what session `i`'s master sent; an error is a
    /// stop signal.
    fn serve(&mut self, i: usize) -> Result<()> {
        let Some(mut link) = self.sessions[i].link.take() else {
            return Ok(());
        };
        let master = self.sessions[i].master;
        let name = self.sessions[i].name.clone();
        let mut end = match read_some(&link.stream, &mut link.inbuf) {
            Ok(0) => Some(format!(
                "master {master} (session {name}) left without END: counting it as END"
            )),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(format!(
                "master {master} (session {name}): {}: counting it as END",
                crate::error::describe_io(&e)
            )),
        };
        while end.is_none() {
            let frame = match link.channel.opener.open(&link.inbuf) {
                Ok(None) => break,
                Ok(Some((frame, used))) => {
                    link.inbuf.drain(..used);
                    frame
                }
                Err(e) => {
                    // Nothing more from this connection is believed.
                    end = Some(format!(
                        "master {master} (session {name}): {e}: session closed"
                    ));
                    break;
                }
            };
            let msg = match frame {
                Frame::Line(line) => Message::parse(&line),
                other => Err(format!("unexpected {other}")),
            };
            match msg {
                Ok(Message::Daemon { name: daemon }) => {
                    let answer = self.daemon(i, &daemon, master, &link.channel)?;
                    link.say(&answer);
                }
                Ok(Message::End) => {
                    link.say(&Message::Bye);
                    log::info!("master {master} (session {name}) sent END");
                    end = Some(String::new());
                }
                Ok(other) => {
                    link.say(&Message::Err {
                        reason: format!("unexpected {other}"),
                    });
                    end = Some(format!(
                        "master {master} (session {name}) sent {other}: counting it as END"
                    ));
                }
                Err(e) => {
                    link.say(&Message::Err { reason: e.clone() });
                    end = Some(format!(
                        "master {master} (session {name}): {e}: counting it as END"
                    ));
                }
            }
        }
        if end.is_none()
            && let Err(e) = flush(&link.stream, &mut link.out)
        {
            end = Some(format!(
                "master {master} (session {name}): {}: counting it as END",
                crate::error::describe_io(&e)
            ));
        }
        match end {
            None => self.sessions[i].link = Some(link),
            Some(why) => {
                if !why.is_empty() {
                    log::warn!("{why}");
                }
                link.close();
                crate::status::peer_gone(master);
                log::info!(
                    "session {name}: {} binding(s) still running",
                    self.sessions[i].bindings.len()
                );
                if self.opts.once {
                    // Stop listening: the port is free again at once.
                    self.listener = None;
                    self.door.close();
                    log::info!("the session of --once is done: waiting for its bindings to end");
                }
            }
        }
        Ok(())
    }

    /// The answer to `DAEMON daemon` from session `i`: its port, or why
    /// not. An error is a stop signal.
    fn daemon(
        &mut self,
        i: usize,
        daemon: &Id,
        master: IpAddr,
        channel: &Channel,
    ) -> Result<Message> {
        let session = &mut self.sessions[i];
        if !session.seen.insert(daemon.clone()) {
            return Ok(Message::Err {
                reason: format!("daemon {daemon} announced twice"),
            });
        }
        let stream = match protocol::stream_name(&session.name, daemon) {
            Ok(id) => id,
            Err(reason) => return Ok(Message::Err { reason }),
        };
        let secret = channel.stream_secret(stream.as_str());
        match self.start(&stream, master, &secret[..]) {
            Ok((port, pid)) => {
                self.sessions[i].bindings.insert(pid);
                Ok(Message::Port { port })
            }
            Err(e) if matches!(e.status, ExitStatus::Signal(_)) => Err(e),
            Err(e) => {
                log::warn!("stream {stream}: {e}");
                Ok(Message::Err { reason: e.message })
            }
        }
    }

    /// Starts the bind-input of `stream` on a free port; returns the port
    /// and the binding's PID.
    fn start(&mut self, stream: &Id, master: IpAddr, secret: &[u8]) -> Result<(Port, i32)> {
        let (low, high) = self.opts.ports;
        for _ in 0..PORT_TRIES {
            let span = u64::from(high - low) + 1;
            let port = Port(low + (getrandom::u64().unwrap_or(0) % span) as u16);
            // Cheap test first; the binding's own listen settles any race.
            if net::listen(self.opts.bind, port).is_err() {
                continue;
            }
            let mut child = ChildBinding::input(&["--once"], stream, port);
            child.allow = vec![net::Allow::from(master)];
            child.accept_timeout = Some(self.opts.accept_timeout);
            child.bind = self.opts.bind;
            let secret = STREAM_KEYS.then_some(secret);
            match self
                .owner
                .start_binding(ChildBinding::Input(child), stream, START_LIMIT, secret)
            {
                Ok(process) => {
                    let fifo = self.owner.dir.fifo(stream);
                    let mut out = io::stdout().lock();
                    // A reader that went away must not stop the pool.
                    let _ = writeln!(out, "{stream} {port} {}", fifo.display());
                    let _ = out.flush();
                    return Ok((port, process.pid));
                }
                Err(e) if e.status == ExitStatus::Unavailable => continue,
                Err(e) if matches!(e.status, ExitStatus::Signal(_)) => return Err(e),
                Err(e) => return Err(refusal(&self.owner.dir, stream, e)),
            }
        }
        Err(Error::new(
            ExitStatus::Unavailable,
            format!("no free port found in {low}-{high}"),
        ))
    }
}

impl Link {
    /// Seals `msg` for sending.
    fn say(&mut self, msg: &Message) {
        self.channel
            .sealer
            .seal(&Frame::Line(msg.to_string()), &mut self.out);
    }

    /// Sends what is left (briefly blocking: a few small lines) and
    /// closes.
    fn close(mut self) {
        let _ = self.stream.set_nonblocking(false);
        let _ = self.stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = (&self.stream).write_all(&self.out);
        self.out.clear();
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Why the binding of stream `name` could not start, as the master is
/// told. "In use" only when a live binding holds the ID: a full disk, say,
/// makes bind-input exit with the same status.
fn refusal(dir: &RuntimeDir, name: &Id, err: Error) -> Error {
    let holder = claim::owner(&dir.dotfile(name.as_str(), "lock"));
    let message = if holder.is_some_and(|p| p.is_alive()) {
        format!("cannot bind {name}: its ID is in use here")
    } else {
        format!("cannot bind {name}: {err} (see the log)")
    };
    Error::new(err.status, message)
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
