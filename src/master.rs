//! master: run a directory of daemons, their output flowing to a pool.
//!
//! It opens a session with the pool (protocol 2: SPAKE2 over the key,
//! then sealed lines; `HELLO` its `--name`, the pool answers the session's
//! name). For each daemon (in name order) it asks the pool for a port,
//! starts a `bind-output` of stream `SESSION.DAEMON` to it, sealed with
//! that stream's secret (derived from the session, handed over through a
//! pipe), in a private runtime directory of its own (so its bindings
//! never clash with a pool's on the same machine), and
//! starts the daemon in its own process group with stdout into that
//! binding's FIFO. The binding holds its FIFO open and cannot see the
//! daemon end, so when the master reaps a daemon it sends the binding
//! SIGUSR1, which sends what is left and closes. Set-up, tear-down and
//! stopping are [`Owner`]'s.

use std::fs::{self, OpenOptions};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus as Status, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

use crate::args::{Host, Id, Key, Port};
use crate::cli::{self, ChildBinding, KeyArgs};
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::poll::{IN, PollSet};
use crate::process::ProcessId;
use crate::protocol::{self, Conn};
use crate::registry::Kind;
use crate::signals;
use crate::supervise::{GRACE, Owner, START_LIMIT, STREAM_KEYS};

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

/// The executables of `ddir`, in name order. Entries that cannot be run or
/// whose names are not valid IDs are skipped with a warning.
pub(crate) fn daemons(ddir: &Path) -> Result<Vec<(Id, PathBuf)>> {
    let what = || format!("cannot read daemon directory {}", ddir.display());
    let entries = fs::read_dir(ddir).map_err(|e| {
        let mut err = Error::io(what(), &e);
        if err.status == ExitStatus::CantCreate {
            err.status = ExitStatus::NoInput;
        }
        err
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(what(), &e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "skipping {}: {}",
                    path.display(),
                    crate::error::describe_io(&e)
                );
                continue;
            }
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            log::warn!("skipping {}: not an executable file", path.display());
            continue;
        }
        if nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_err() {
            log::warn!("skipping {}: not executable by this user", path.display());
            continue;
        }
        match name.parse::<Id>() {
            Ok(id) => found.push((id, path)),
            Err(why) => log::warn!(
                "skipping {}: its name is not a valid ID ({why})",
                path.display()
            ),
        }
    }
    if found.is_empty() {
        return Err(Error::new(
            ExitStatus::NoInput,
            format!("no executable daemon in {}", ddir.display()),
        ));
    }
    found.sort();
    Ok(found)
}

/// Where a daemon is in its life.
enum Life {
    Running,
    /// The daemon has ended; what it left in its process group is being
    /// stopped: SIGKILL at `kill_at` (`None` once sent).
    Ending {
        status: Status,
        kill_at: Option<Instant>,
    },
    /// The daemon and its whole group are gone.
    Gone(Status),
}

pub(crate) struct Daemon {
    name: Id,
    process: ProcessId,
    life: Life,
    binding: ProcessId,
    /// How its binding ended, once reaped.
    binding_end: Option<Status>,
}

impl Daemon {
    fn done(&self) -> bool {
        matches!(self.life, Life::Gone(_)) && self.binding_end.is_some()
    }

    /// Why it counts as failed, if it does.
    fn failure(&self) -> Option<String> {
        match (&self.life, self.binding_end) {
            (Life::Gone(s), _) if !s.success() => Some(format!("{} ({s})", self.name)),
            (_, Some(b)) if !b.success() => Some(format!(
                "{} (its output was not all delivered: binding {b})",
                self.name
            )),
            _ => None,
        }
    }

    /// Moves it on with what has happened since last time.
    fn step(&mut self, owner: &mut Owner) {
        match self.life {
            Life::Running => {
                if let Some(status) = reap_one(self.process.pid) {
                    log::info!("daemon {} ended ({status})", self.name);
                    // What it left running in its group goes with it (the
                    // group outlives its leader while members remain, so
                    // its number cannot have been reused); it stays in the
                    // registry until the group is empty.
                    self.process.signal_group(Signal::SIGTERM);
                    // Its output is complete: the binding sends all of it,
                    // however slowly the pool reads, and closes.
                    if self.binding_end.is_none() {
                        self.binding.signal(signals::DRAIN);
                    }
                    self.life = Life::Ending {
                        status,
                        kill_at: Some(Instant::now() + GRACE),
                    };
                }
            }
            Life::Ending { status, kill_at } => {
                if !self.process.group_is_alive() {
                    owner.forget(self.process.pid);
                    self.life = Life::Gone(status);
                } else if kill_at.is_some_and(|t| Instant::now() > t) {
                    log::warn!(
                        "what daemon {} left running ignored SIGTERM: killed",
                        self.name
                    );
                    self.process.signal_group(Signal::SIGKILL);
                    self.life = Life::Ending {
                        status,
                        kill_at: None,
                    };
                }
            }
            Life::Gone(_) => {}
        }
        if self.binding_end.is_none()
            && let Some(status) = reap_one(self.binding.pid)
        {
            self.binding_end = Some(status);
            owner.forget(self.binding.pid);
            if matches!(self.life, Life::Running) {
                log::warn!(
                    "the binding of daemon {} ended first: stopping the daemon",
                    self.name
                );
                self.process.signal_group(Signal::SIGTERM);
            }
        }
    }
}

pub fn run(opts: MasterOptions) -> Result<()> {
    // Daemons run in DDIR; their paths must not depend on our own cwd.
    let ddir = std::path::absolute(&opts.ddir).unwrap_or(opts.ddir.clone());
    let list = daemons(&ddir)?;
    let mut owner = Owner::new("master", true)?;
    crate::status::start_owner(
        &owner.dir,
        &owner.name,
        "master",
        opts.port.0,
        Some(opts.host.as_str()),
    );
    let mut daemons = Vec::new();
    let outcome = start_all(&opts, &mut owner, &mut daemons, &list, &ddir)
        .and_then(|()| wait(&mut owner, &mut daemons));
    owner.finish(outcome)
}

fn start_all(
    opts: &MasterOptions,
    owner: &mut Owner,
    daemons: &mut Vec<Daemon>,
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
        daemons.push(daemon);
    }
    protocol::end(&mut conn).map_err(|f| f.at(&pool))?;
    crate::notify::ready(&format!("{} daemons running", daemons.len()));
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

/// How a daemon's binding is started: a pool's bind-output or a bus's
/// nats-output.
pub(crate) struct Plan<'a> {
    pub(crate) child: ChildBinding,
    /// The binding's ID (its FIFO's name).
    pub(crate) stream: &'a Id,
    /// How long it may take to be ready.
    pub(crate) limit: Duration,
    /// Its stream's secret, handed over through a pipe.
    pub(crate) secret: Option<&'a [u8]>,
    /// Where its lines go, for the log.
    pub(crate) to: String,
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
    start_planned(owner, name, path, ddir, plan)
}

/// Starts daemon `name` (the executable `path`, run in `ddir`) with its
/// binding as `plan` says, both registered.
pub(crate) fn start_planned(
    owner: &mut Owner,
    name: &Id,
    path: &Path,
    ddir: &Path,
    plan: Plan<'_>,
) -> Result<Daemon> {
    let stream = plan.stream;
    let binding = owner.start_binding(plan.child, stream, plan.limit, plan.secret)?;
    let fifo_path = owner.binding_dir().fifo(stream);
    // The binding holds its FIFO open read-write: this open returns at
    // once.
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&fifo_path)
        .map_err(|e| Error::io(format!("cannot open the FIFO {}", fifo_path.display()), &e))?;
    let mut cmd = Command::new(path);
    cmd.stdin(Stdio::null()).stdout(fifo).current_dir(ddir);
    // SAFETY: setpgid and sigprocmask are async-signal-safe. Each daemon
    // leads its own process group, so stopping it stops its children too;
    // and it must not inherit our blocked signals.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            crate::signals::unblock_in_child()
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("cannot start daemon {}", path.display()), &e))?;
    let pid = child.id() as i32;
    drop(child);
    let process = ProcessId::of(pid).unwrap_or(ProcessId { pid, start: 0 });
    owner.register(Kind::Daemon, process, name)?;
    log::info!("daemon {name} (pid {pid}) → {}", plan.to);
    Ok(Daemon {
        name: name.clone(),
        process,
        life: Life::Running,
        binding,
        binding_end: None,
    })
}

/// Waits for every daemon and binding to end.
pub(crate) fn wait(owner: &mut Owner, daemons: &mut [Daemon]) -> Result<()> {
    let mut set = PollSet::default();
    loop {
        for d in daemons.iter_mut() {
            d.step(owner);
        }
        if daemons.iter().all(Daemon::done) {
            let failed: Vec<String> = daemons.iter().filter_map(Daemon::failure).collect();
            if failed.is_empty() {
                log::info!("every daemon exited 0");
                return Ok(());
            }
            return Err(Error::new(
                ExitStatus::Failure,
                format!("daemon(s) failed: {}", failed.join(", ")),
            ));
        }
        set.clear();
        set.add(owner.signals.as_fd(), IN);
        set.add(owner.children.as_fd(), IN);
        // A group left behind by its daemon sends no SIGCHLD when it
        // empties: look again shortly.
        let ending = daemons
            .iter()
            .any(|d| matches!(d.life, Life::Ending { .. }));
        set.wait(ending.then_some(Duration::from_millis(20)))
            .map_err(|e| Error::io("cannot wait for events", &e))?;
        owner.children.drain();
        if let Some(sig) = owner.stop_signal() {
            return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
        }
    }
}

/// The exit status of child `pid` if it has ended (reaping it).
fn reap_one(pid: i32) -> Option<Status> {
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(Status::from_raw(code << 8)),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(Status::from_raw(sig as i32)),
        Ok(_) => None,
        // Not our child (any more): count it as gone.
        Err(_) => Some(Status::from_raw(0xff << 8)),
    }
}
