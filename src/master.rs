//! master: run a directory of daemons, their output flowing to a pool.
//!
//! It opens a session with the pool (protocol 2: SPAKE2 over the key,
//! then sealed lines; `HELLO` its `--name`, the pool answers the session's
//! name). For each daemon (in name order) it asks the pool for a port,
//! starts a `bind-output` of stream `SESSION.DAEMON` to it, sealed with
//! that stream's secret (derived from the session, handed over through a
//! pipe), in a private runtime directory of its own (so its bindings
//! never clash with a pool's on the same machine), and
//! starts the daemon with stdout into that binding's FIFO
//! ([`crate::daemons`], shared with nats-master). Set-up, tear-down and
//! stopping are [`Owner`]'s.

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::args::{Host, Id, Key, Port};
use crate::cli::{self, ChildBinding, KeyArgs};
use crate::daemons::{self, Daemon, Plan};
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::poll::{IN, PollSet};
use crate::protocol::{self, Conn};
use crate::supervise::{Owner, START_LIMIT, STREAM_KEYS};

/// Run every executable of DDIR as a daemon whose standard output flows,
/// through a bind-output, to the pool at HOST:PORT.
// master's command line (the `///` comments are its `--help` text),
// then [`MasterOptions::resolve`]d.
#[derive(clap::Parser, Debug)]
#[command(name = "master", version)]
pub struct MasterOptions {
    #[command(flatten)]
    pub(crate) key_args: KeyArgs,

    /// Seconds allowed for each step of the protocol exchange
    #[arg(long = "timeout", value_name = "SECS", value_parser = cli::seconds, default_value = "10")]
    pub(crate) step_timeout: Duration,

    /// The host the pool runs on: a name, an IPv4 or an IPv6 address
    #[arg(value_name = "HOST")]
    pub(crate) host: Host,

    /// The pool's TCP port, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// The directory of daemons: every executable file in it is run
    #[arg(value_name = "DDIR")]
    pub(crate) ddir: PathBuf,

    /// Give up connecting (to the pool, and to each daemon's port) after
    /// SECS seconds
    #[arg(short = 't', long, value_name = "SECS", value_parser = cli::seconds, default_value = "10")]
    pub(crate) connect_timeout: Duration,

    /// The session name asked of the pool (its daemons' streams are
    /// NAME.DAEMON): up to 24 of A-Z a-z 0-9 _ - (default: the short host
    /// name, other characters made '-')
    #[arg(
        short = 'n',
        long,
        value_name = "NAME",
        value_parser = protocol::parse_name,
        default_value_t = cli::host_name(),
        hide_default_value = true
    )]
    pub(crate) name: Id,

    /// The key, read from `key_args` by [`MasterOptions::resolve`].
    #[arg(skip)]
    key: Option<Key>,
}

impl MasterOptions {
    /// Reads the key and takes NOTIFY_SOCKET for itself (so that its
    /// daemons and bindings never inherit it): call it before any thread.
    pub fn resolve(mut self) -> Result<MasterOptions> {
        crate::notify::init(None, true)?;
        self.key = Some(self.key_args.resolve()?);
        Ok(self)
    }

    fn key(&self) -> &Key {
        self.key.as_ref().expect("resolved before run")
    }
}

pub fn run(opts: MasterOptions) -> Result<()> {
    // Daemons run in DDIR; their paths must not depend on our own cwd.
    let ddir = std::path::absolute(&opts.ddir).unwrap_or(opts.ddir.clone());
    let list = daemons::list(&ddir)?;
    let mut owner = Owner::new("master", true)?;
    owner.publish(opts.port.0, Some(opts.host.as_str()));
    let mut started = Vec::new();
    let outcome = start_all(&opts, &mut owner, &mut started, &list, &ddir)
        .and_then(|()| daemons::wait(&mut owner, &mut started));
    owner.finish(outcome)
}

fn start_all(
    opts: &MasterOptions,
    owner: &mut Owner,
    started: &mut Vec<Daemon>,
    list: &[(Id, PathBuf)],
    ddir: &Path,
) -> Result<()> {
    let pool = format!("pool at {}:{}", opts.host, opts.port);
    let stream = connect(opts, owner)?;
    let mut conn = Conn::new(stream, opts.step_timeout)
        .map_err(|e| Error::io("cannot configure the connection", &e))?;
    owner.stop_on(&mut conn)?;
    let session =
        protocol::authenticate(&mut conn, opts.key(), &opts.name).map_err(|f| f.at(&pool))?;
    log::info!("authenticated with the {pool}: session {session}");
    for (name, path) in list {
        let stream = protocol::stream_name(&session, name).map_err(|e| {
            Error::new(
                ExitStatus::NoInput,
                format!("{e}: rename it or use a shorter --name"),
            )
        })?;
        let port = protocol::request_port(&mut conn, name).map_err(|f| f.at(&pool))?;
        let secret = conn.stream_secret(&stream);
        let daemon = start_daemon(opts, owner, (name, &stream), path, ddir, port, &secret[..])?;
        started.push(daemon);
    }
    protocol::end(&mut conn).map_err(|f| f.at(&pool))?;
    crate::notify::ready(&format!("{} daemons running", started.len()));
    Ok(())
}

/// Connects to the pool on a thread of its own, so that a stop signal
/// need not wait for the connect's timeout (a host that drops our SYNs).
fn connect(opts: &MasterOptions, owner: &Owner) -> Result<TcpStream> {
    let (tx, rx) = mpsc::channel();
    let (host, port, limit) = (opts.host.to_string(), opts.port, opts.connect_timeout);
    std::thread::spawn(move || tx.send(net::connect(&host, port, limit)));
    let mut set = PollSet::default();
    loop {
        match rx.try_recv() {
            Ok(result) => return result,
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(Error::new(
                    ExitStatus::Software,
                    "the connecting thread died",
                ));
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if let Some(sig) = owner.stop_signal() {
            return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
        }
        set.clear();
        set.add(owner.signals.as_fd(), IN);
        // The thread's answer wakes nobody: look again shortly.
        set.wait(Some(Duration::from_millis(20)))
            .map_err(|e| Error::io("cannot wait for events", &e))?;
    }
}

/// Starts daemon `name` with its binding of `stream` to the pool.
fn start_daemon(
    opts: &MasterOptions,
    owner: &mut Owner,
    (name, stream): (&Id, &Id),
    path: &Path,
    ddir: &Path,
    port: Port,
    secret: &[u8],
) -> Result<Daemon> {
    let mut child = ChildBinding::output(stream, &opts.host, port);
    child.connect_timeout = opts.connect_timeout;
    let plan = Plan {
        child: ChildBinding::Output(child),
        stream,
        // It connects before it is ready.
        limit: opts.connect_timeout + START_LIMIT,
        secret: STREAM_KEYS.then_some(secret),
        to: format!("{}:{port}", opts.host),
    };
    daemons::start(owner, name, path, ddir, plan)
}
