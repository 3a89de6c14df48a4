//! master: run a directory of daemons, their output flowing to a pool.
//!
//! For each daemon (in name order) the master asks the pool for a port,
//! starts a `bind-output` to it in a private runtime directory of its own
//! (so its bindings never clash with a pool's on the same machine), and
//! starts the daemon in its own process group with stdout into that
//! binding's FIFO. The binding holds its FIFO open and cannot see the
//! daemon end, so when the master reaps a daemon it sends the binding
//! SIGTERM, which sends what is left and closes.

use std::fs::{self, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::args::{Host, Id, Key, Port};
use crate::binding::{IN, PollSet};
use crate::error::{Error, ExitStatus, Result};
use crate::net;
use crate::process::ProcessId;
use crate::protocol::{self, Conn, Failure, Message};
use crate::registry::{Entry, Kind, Registry};
use crate::runtime_dir::RuntimeDir;
use crate::signals::{self, Signals};
use crate::supervise::{self, Watchdog};
use crate::sweep;

/// How long daemons and bindings get to stop after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_millis(1500);

pub struct MasterOptions {
    pub key: Key,
    pub host: Host,
    pub port: Port,
    pub ddir: PathBuf,
    pub connect_timeout: Duration,
    pub step_timeout: Duration,
}

/// The executables of `ddir`, in name order. Entries that cannot be run or
/// whose names are not valid IDs are skipped with a warning.
pub fn daemons(ddir: &Path) -> Result<Vec<(Id, PathBuf)>> {
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

struct Daemon {
    name: Id,
    binding: ProcessId,
    process: ProcessId,
    /// How it ended, once reaped.
    status: Option<std::process::ExitStatus>,
    /// After the daemon ended: when what it left in its group gets
    /// SIGKILL; `None` once the group is empty.
    group_deadline: Option<Instant>,
    /// How its binding ended, once reaped.
    binding_status: Option<std::process::ExitStatus>,
}

impl Daemon {
    fn done(&self) -> bool {
        self.status.is_some() && self.group_deadline.is_none() && self.binding_status.is_some()
    }

    /// Why it counts as failed, if it does.
    fn failure(&self) -> Option<String> {
        match (self.status, self.binding_status) {
            (Some(s), _) if !s.success() => Some(format!("{} ({s})", self.name)),
            (_, Some(b)) if !b.success() => Some(format!(
                "{} (its output was not all delivered: binding {b})",
                self.name
            )),
            _ => None,
        }
    }
}

struct Master {
    opts: MasterOptions,
    session: RuntimeDir,
    registry: Registry,
    watchdog: Watchdog,
    daemons: Vec<Daemon>,
}

pub fn run(opts: MasterOptions) -> Result<()> {
    // Daemons run in DDIR; their paths must not depend on our own cwd.
    let ddir = std::path::absolute(&opts.ddir).unwrap_or(opts.ddir.clone());
    let list = daemons(&ddir)?;
    let dir = RuntimeDir::open()?;
    sweep::sweep(&dir);
    let (name, claim) = supervise::claim_owner(&dir, "master")?;
    let claim_path = claim.path().to_path_buf();
    let session_path = dir.dotfile(&name, "d");
    let registry_path = dir.dotfile(&name, "registry");
    let setup = (|| {
        let session = RuntimeDir::at(&session_path)?;
        let registry = Registry::create(&registry_path)
            .map_err(|e| Error::io(format!("cannot create {}", registry_path.display()), &e))?;
        Ok((session, registry))
    })();
    let (session, registry) = match setup {
        Ok(pair) => pair,
        Err(e) => {
            let _ = fs::remove_dir_all(&session_path);
            claim.release();
            return Err(e);
        }
    };
    let signals = Signals::block(&[Signal::SIGCHLD])?;
    let _guardian: OwnedFd = supervise::guardian(
        &registry_path,
        vec![
            session_path.clone(),
            claim_path.clone(),
            dir.dotfile(&name, "status"),
        ],
    )?;
    crate::status::start_owner(&dir, &name, "master", opts.port.0, Some(opts.host.as_str()));
    let mut master = Master {
        opts,
        session,
        registry,
        watchdog: Watchdog::new()?,
        daemons: Vec::new(),
    };
    let outcome = master.run(&signals, &list, &ddir);
    crate::status::finish();
    let Master { registry, .. } = master;
    registry.delete();
    let _ = fs::remove_dir_all(&session_path);
    claim.release();
    outcome
}

impl Master {
    fn run(&mut self, signals: &Signals, list: &[(Id, PathBuf)], ddir: &Path) -> Result<()> {
        if let Err(e) = self.start_all(signals, list, ddir) {
            self.stop_all();
            // A signal during a blocking step (connect, a read from the
            // pool) is noticed once the step ends: it, not the step's
            // failure, is why we stop.
            if let Some(sig) = stop_signal(signals) {
                log::info!("stopping on {sig}");
                return Err(Error::new(ExitStatus::Signal(sig as i32), String::new()));
            }
            return Err(e);
        }
        crate::notify::ready(&format!("{} daemons running", self.daemons.len()));
        self.wait(signals)
    }

    fn start_all(&mut self, signals: &Signals, list: &[(Id, PathBuf)], ddir: &Path) -> Result<()> {
        let stream = net::connect(
            self.opts.host.as_str(),
            self.opts.port,
            self.opts.connect_timeout,
        )?;
        let mut conn = Conn::new(stream, self.opts.step_timeout)
            .map_err(|e| Error::io("cannot configure the connection", &e))?;
        self.handshake(&mut conn)?;
        log::info!(
            "authenticated with the pool at {}:{}",
            self.opts.host,
            self.opts.port
        );
        for (name, path) in list {
            if let Some(sig) = stop_signal(signals) {
                return Err(Error::new(ExitStatus::Signal(sig as i32), String::new()));
            }
            conn.send(&Message::Daemon { name: name.clone() })
                .map_err(|e| self.pool_failure(e))?;
            let port = match conn.recv() {
                Ok(Message::Port { port }) => port,
                Ok(other) => {
                    return Err(Error::new(
                        ExitStatus::Protocol,
                        format!("the pool answered {other} to DAEMON {name}"),
                    ));
                }
                Err(Failure::Refused(reason)) => {
                    return Err(Error::new(
                        ExitStatus::Unavailable,
                        format!("the pool cannot take daemon {name}: {reason}"),
                    ));
                }
                Err(e) => return Err(self.pool_failure(e)),
            };
            self.start_daemon(name, path, ddir, port)?;
        }
        conn.send(&Message::End).map_err(|e| self.pool_failure(e))?;
        match conn.recv() {
            Ok(Message::Bye) => {}
            Ok(other) => log::warn!("the pool answered {other} to END"),
            Err(e) => log::warn!("the pool did not acknowledge END: {e}"),
        }
        Ok(())
    }

    fn pool_failure(&self, e: Failure) -> Error {
        let status = match &e {
            // A step's read timeout surfaces as EAGAIN, which of_io
            // would take for a lack of resources.
            Failure::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ExitStatus::TempFail
            }
            Failure::Io(io) => ExitStatus::of_io(io),
            Failure::Protocol(_) => ExitStatus::Protocol,
            Failure::Refused(_) => ExitStatus::Unavailable,
        };
        let status = if status == ExitStatus::CantCreate {
            ExitStatus::Unavailable
        } else {
            status
        };
        Error::new(
            status,
            format!("pool at {}:{}: {e}", self.opts.host, self.opts.port),
        )
    }

    fn handshake(&self, conn: &mut Conn) -> Result<()> {
        let key = &self.opts.key;
        let nonce = match conn.recv() {
            Ok(Message::Challenge { nonce, .. }) => nonce,
            Ok(other) => {
                conn.refuse("expected FIFOBIND 1 CHALLENGE");
                return Err(Error::new(
                    ExitStatus::Protocol,
                    format!("the pool opened with {other}"),
                ));
            }
            Err(e) => return Err(self.pool_failure(e)),
        };
        let cnonce = protocol::nonce();
        conn.send(&Message::Auth {
            version: protocol::VERSION,
            cnonce: cnonce.clone(),
            mac: protocol::mac(key, "master", &nonce, &cnonce),
        })
        .map_err(|e| self.pool_failure(e))?;
        match conn.recv() {
            Ok(Message::Ok { proof }) if protocol::verify(key, "pool", &nonce, &cnonce, &proof) => {
                Ok(())
            }
            Ok(Message::Ok { .. }) => Err(Error::new(
                ExitStatus::NoPerm,
                "the pool does not know the key: refusing to send it anything",
            )),
            Ok(other) => Err(Error::new(
                ExitStatus::Protocol,
                format!("the pool answered {other}"),
            )),
            Err(Failure::Refused(reason)) => Err(Error::new(
                // Busy serving another master: worth trying again later.
                if reason.starts_with("busy") {
                    ExitStatus::TempFail
                } else {
                    ExitStatus::NoPerm
                },
                format!("the pool refused this master: {reason}"),
            )),
            Err(e) => Err(self.pool_failure(e)),
        }
    }

    fn start_daemon(&mut self, name: &Id, path: &Path, ddir: &Path, port: Port) -> Result<()> {
        let args = vec![
            "--connect-timeout".to_string(),
            self.opts.connect_timeout.as_secs_f64().to_string(),
            name.to_string(),
            self.opts.host.to_string(),
            port.to_string(),
        ];
        let binding =
            supervise::start_binding("bind-output", &args, self.session.path(), &self.watchdog)?;
        self.register(Kind::Binding, binding, name)?;
        let fifo_path = self.session.fifo(name);
        // The binding holds its FIFO open read-write: this open returns at
        // once.
        let fifo = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&fifo_path)
            .map_err(|e| Error::io(format!("cannot open FIFO {}", fifo_path.display()), &e))?;
        let mut cmd = Command::new(path);
        cmd.stdin(Stdio::null()).stdout(fifo).current_dir(ddir);
        // SAFETY: setpgid and sigprocmask are async-signal-safe. Each
        // daemon leads its own process group, so stopping it stops its
        // children too; and it must not inherit our blocked signals.
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
        self.register(Kind::Daemon, process, name)?;
        log::info!("daemon {name} (pid {pid}) → {}:{port}", self.opts.host);
        self.daemons.push(Daemon {
            name: name.clone(),
            binding,
            process,
            status: None,
            group_deadline: None,
            binding_status: None,
        });
        Ok(())
    }

    fn register(&mut self, kind: Kind, process: ProcessId, name: &Id) -> Result<()> {
        self.registry
            .add(Entry {
                kind,
                process,
                name: name.to_string(),
            })
            .map_err(|e| Error::io("cannot write the registry", &e))
    }

    /// Waits for every daemon and binding to end.
    fn wait(&mut self, signals: &Signals) -> Result<()> {
        let mut set = PollSet::default();
        loop {
            self.reap();
            if self.daemons.iter().all(Daemon::done) {
                let failed: Vec<String> = self.daemons.iter().filter_map(Daemon::failure).collect();
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
            set.add(signals.as_fd(), IN);
            // A group left behind by its daemon sends no SIGCHLD when it
            // empties: look again shortly.
            let groups_pending = self.daemons.iter().any(|d| d.group_deadline.is_some());
            let timeout = groups_pending.then_some(Duration::from_millis(20));
            set.wait(timeout)
                .map_err(|e| Error::io("cannot wait for events", &e))?;
            if let Some(sig) = stop_signal(signals) {
                log::info!("stopping on {sig}");
                self.stop_all();
                return Err(Error::new(ExitStatus::Signal(sig as i32), String::new()));
            }
        }
    }

    fn reap(&mut self) {
        for i in 0..self.daemons.len() {
            if self.daemons[i].status.is_none()
                && let Some(status) = reap_one(self.daemons[i].process.pid)
            {
                let d = &mut self.daemons[i];
                log::info!("daemon {} ended ({status})", d.name);
                d.status = Some(status);
                // What it left running in its group goes with it (the
                // group outlives its leader while members remain, so its
                // number cannot have been reused); it stays in the
                // registry until the group is empty.
                let _ = nix::sys::signal::killpg(Pid::from_raw(d.process.pid), Signal::SIGTERM);
                d.group_deadline = Some(Instant::now() + GRACE);
                // Its output is complete: the binding sends all of it,
                // however slowly the pool reads, and closes.
                if d.binding_status.is_none() {
                    d.binding.signal(signals::DRAIN);
                }
            }
            if let Some(deadline) = self.daemons[i].group_deadline {
                let d = &mut self.daemons[i];
                if !d.process.group_is_alive() {
                    d.group_deadline = None;
                    let _ = self.registry.remove(d.process.pid);
                } else if Instant::now() > deadline {
                    log::warn!(
                        "what daemon {} left running ignored SIGTERM: killed",
                        d.name
                    );
                    let _ = nix::sys::signal::killpg(Pid::from_raw(d.process.pid), Signal::SIGKILL);
                }
            }
            if self.daemons[i].binding_status.is_none()
                && let Some(status) = reap_one(self.daemons[i].binding.pid)
            {
                let d = &mut self.daemons[i];
                d.binding_status = Some(status);
                let _ = self.registry.remove(d.binding.pid);
                if d.status.is_none() {
                    log::warn!(
                        "the binding of daemon {} ended first: stopping the daemon",
                        d.name
                    );
                    d.process.signal_group(Signal::SIGTERM);
                }
            }
        }
    }

    /// Stops every daemon (with its process group) and every binding, and
    /// reaps them; SIGKILL for whatever outlives the grace period.
    fn stop_all(&mut self) {
        for entry in self.registry.entries() {
            entry.signal(Signal::SIGTERM);
        }
        let deadline = Instant::now() + GRACE;
        loop {
            self.reap_registered();
            if self.registry.entries().is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for entry in self.registry.entries().to_vec() {
            if entry.alive() {
                entry.signal(Signal::SIGKILL);
            }
            let _ = waitpid(Pid::from_raw(entry.process.pid), None);
            let _ = self.registry.remove(entry.process.pid);
        }
    }

    /// Reaps what has ended and forgets it. A daemon is forgotten only
    /// once its whole process group has ended: a child of it deaf to
    /// SIGTERM outlives its daemon, and must still get the SIGKILL.
    fn reap_registered(&mut self) {
        for entry in self.registry.entries().to_vec() {
            if reap_one(entry.process.pid).is_some() && !entry.alive() {
                let _ = self.registry.remove(entry.process.pid);
            }
        }
    }
}

/// The exit status of child `pid` if it has ended (reaping it).
fn reap_one(pid: i32) -> Option<std::process::ExitStatus> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(std::process::ExitStatus::from_raw(code << 8)),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(std::process::ExitStatus::from_raw(sig as i32)),
        Ok(_) => None,
        // Not our child (any more): count it as gone.
        Err(_) => Some(std::process::ExitStatus::from_raw(0xff << 8)),
    }
}

/// A pending SIGINT, SIGHUP or SIGTERM; SIGCHLD is only a wake-up.
fn stop_signal(signals: &Signals) -> Option<Signal> {
    while let Some(sig) = signals.next() {
        if sig != Signal::SIGCHLD {
            return Some(sig);
        }
    }
    None
}
