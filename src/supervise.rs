//! What a pool and a master share: their bookkeeping, their children on
//! a leash, and one way to stop them.
//!
//! [`Owner`] does the set-up both need (sweep, claim `ROLE@PID`, private
//! runtime directory, registry, signals, guardian, watchdog) and, when
//! dropped, the tear-down: whatever the registry still names is stopped
//! and waited for, the bookkeeping is removed and the guardian is waited
//! for too. So no path out of a pool or master, early return or error,
//! leaves a claim, a registry or a process behind.
//!
//! - Bindings are started in `--foreground` mode as our children, so we
//!   read their readiness line (the PID) and reap them ourselves.
//! - A watchdog pipe ties them to us: we hold the only write end
//!   (close-on-exec, so no other child inherits it), each binding polls
//!   the read end, and end-of-file there means we died, even by SIGKILL.
//!   (A parent-death signal cannot do this: it fires on the death of the
//!   forking *thread*.)
//! - A guardian process, forked before anything else, waits for our death
//!   the same way and then stops whatever our registry still names,
//!   daemons' process groups included, and removes our bookkeeping. After
//!   a clean exit it finds no registry and ends; we wait for it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};

use crate::args::Id;
use crate::claim::{Claim, Refused};
use crate::cli::ChildBinding;
use crate::error::{Error, ExitStatus, Result};
use crate::poll::{IN, PollSet};
use crate::process::ProcessId;
use crate::protocol::Conn;
use crate::registry::{self, Entry, Kind, Registry};
use crate::runtime_dir::{ENV_DIR, RuntimeDir};
use crate::signals::Signals;
use crate::sweep;

/// How long children get to stop after SIGTERM before SIGKILL.
pub(crate) const GRACE: Duration = Duration::from_millis(1500);
/// How long a binding may take to say it is ready, beyond the time it is
/// given to connect (pool(1), master(1)).
pub(crate) const START_LIMIT: Duration = Duration::from_secs(10);
/// The bindings a pool and a master start take their stream's secret on
/// a descriptor (`--key-fd`) and speak the sealed stream protocol.
/// Off, they are started as before protocol 2 and move the stream in
/// clear text: for a bind-input and bind-output without `--key-fd`.
pub(crate) const STREAM_KEYS: bool = true;

/// A running pool or master: its bookkeeping and its children.
pub(crate) struct Owner {
    /// The runtime directory.
    pub(crate) dir: RuntimeDir,
    /// `ROLE@PID`: the name its bookkeeping files go under.
    pub(crate) name: String,
    /// `pool` or `master`: its kind in `fifobind list`.
    role: &'static str,
    /// Where its bindings go: a private directory for a master, so that
    /// its bindings never clash with a pool's; else `dir`.
    pub(crate) session: Option<RuntimeDir>,
    /// SIGINT, SIGHUP and SIGTERM.
    pub(crate) signals: Signals,
    /// SIGCHLD: a child has ended.
    pub(crate) children: Signals,
    /// Dropped in this order: the files, then the guardian.
    books: Books,
    _guardian: Guardian,
    watchdog: Watchdog,
}

/// The files of an owner, removed on drop.
struct Books {
    registry: Registry,
    session: Option<PathBuf>,
    claim: Option<Claim>,
}

impl Drop for Books {
    fn drop(&mut self) {
        std::mem::replace(&mut self.registry, Registry::detached()).delete();
        if let Some(path) = &self.session {
            let _ = std::fs::remove_dir_all(path);
        }
        if let Some(claim) = self.claim.take() {
            claim.release();
        }
    }
}

impl Owner {
    /// Sets up a pool or master (`role`); `private` gives it a runtime
    /// directory of its own for its bindings.
    pub(crate) fn new(role: &'static str, private: bool) -> Result<Owner> {
        let dir = RuntimeDir::open()?;
        sweep::sweep(&dir);
        // Blocked first, so that a stop signal during the set-up waits
        // for the first poll instead of killing us half-way.
        let signals = Signals::block(&[])?;
        let children = Signals::children()?;
        let (name, claim) = claim_owner(&dir, role)?;
        let registry_path = dir.dotfile(&name, "registry");
        let mut books = Books {
            registry: Registry::detached(),
            session: None,
            claim: Some(claim),
        };
        let mut cleanup = vec![
            books.claim.as_ref().expect("set").path().to_path_buf(),
            dir.dotfile(&name, "status"),
        ];
        let session = if private {
            let path = dir.dotfile(&name, "d");
            books.session = Some(path.clone());
            cleanup.push(path.clone());
            Some(RuntimeDir::at(&path)?)
        } else {
            None
        };
        books.registry = Registry::create(&registry_path)
            .map_err(|e| Error::io(format!("cannot create {}", registry_path.display()), &e))?;
        let guardian = Guardian::fork(&registry_path, cleanup)?;
        // After the fork: the guardian must not hold the write end.
        let watchdog = Watchdog::new()?;
        Ok(Owner {
            dir,
            name,
            role,
            session,
            signals,
            children,
            books,
            _guardian: guardian,
            watchdog,
        })
    }

    /// Starts publishing its status (`fifobind list`): the port it
    /// listens on or reaches (0: none), the host or servers it reaches.
    /// Once signals are blocked, as they are from [`Owner::new`] on.
    pub(crate) fn publish(&self, port: u16, host: Option<&str>) {
        crate::status::start_owner(&self.dir, &self.name, self.role, port, host);
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.books.registry
    }

    /// Where bindings are started.
    pub(crate) fn binding_dir(&self) -> &RuntimeDir {
        self.session.as_ref().unwrap_or(&self.dir)
    }

    pub(crate) fn register(&mut self, kind: Kind, process: ProcessId, name: &Id) -> Result<()> {
        self.books
            .registry
            .add(Entry {
                kind,
                process,
                name: name.to_string(),
            })
            .map_err(|e| Error::io("cannot write the registry", &e))
    }

    /// Drops `pid` from the registry: it has ended.
    pub(crate) fn forget(&mut self, pid: i32) {
        let _ = self.books.registry.remove(pid);
    }

    /// A pending stop signal, if any.
    pub(crate) fn stop_signal(&self) -> Option<Signal> {
        self.signals.next()
    }

    /// Starts `program` (bind-input or bind-output) in the foreground in
    /// [`Owner::binding_dir`], waits until it is ready and registers it.
    /// A binding that says nothing within `limit` is stopped; so is one
    /// starting when a stop signal comes (the error then carries the
    /// signal's status). A `secret` (its stream's) is handed over in hex
    /// through a pipe it reads to end-of-file (`--key-fd`): never
    /// in its arguments or environment.
    pub(crate) fn start_binding(
        &mut self,
        mut child: ChildBinding,
        name: &Id,
        limit: Duration,
        secret: Option<&[u8]>,
    ) -> Result<ProcessId> {
        let fd = self.watchdog.read.as_raw_fd();
        let key_pipe = secret.map(secret_pipe).transpose()?;
        let key_fd = key_pipe.as_ref().map(|p| p.as_raw_fd());
        let common = child.common_mut();
        common.foreground = true;
        common.watchdog_fd = Some(fd);
        if let Some(k) = key_fd {
            child.set_key_fd(k);
        }
        let args = child.to_args();
        let program = child.program();
        let mut cmd = Command::new(sibling(program));
        cmd.args(&args).env(ENV_DIR, self.binding_dir().path());
        // SAFETY: fcntl and sigprocmask are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for fd in std::iter::once(fd).chain(key_fd) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                crate::signals::unblock_in_child()
            });
        }
        let what = format!("{program} {}", args.join(" "));
        let started = start_ready(&mut cmd, &what, limit, &self.signals);
        // Ours closed: the child holds the only read end, or none.
        drop(key_pipe);
        let process = started?;
        self.register(Kind::Binding, process, name)?;
        Ok(process)
    }

    /// Reaps the registered processes that have ended (a daemon once its
    /// whole group has), forgets them and returns them with how they
    /// ended, in words.
    pub(crate) fn reap(&mut self) -> Vec<(Entry, String)> {
        let mut ended = Vec::new();
        for entry in self.books.registry.entries().to_vec() {
            let pid = Pid::from_raw(entry.process.pid);
            let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => continue,
                Ok(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
                Ok(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
                // Not our child (any more), or stopped.
                Ok(_) | Err(_) => "gone".to_string(),
            };
            if !entry.alive() {
                self.forget(entry.process.pid);
                ended.push((entry, status));
            }
        }
        ended
    }

    /// The one stop routine: stops everything the registry names (daemons
    /// with their whole process groups) and returns only when all of it
    /// is gone, reaped and forgotten.
    pub(crate) fn stop_all(&mut self) {
        let entries = self.books.registry.entries().to_vec();
        if entries.is_empty() {
            return;
        }
        registry::stop_all(&entries, GRACE);
        for entry in &entries {
            let _ = waitpid(Pid::from_raw(entry.process.pid), Some(WaitPidFlag::WNOHANG));
            self.forget(entry.process.pid);
        }
    }

    /// Makes `conn`'s waits end on a stop signal.
    pub(crate) fn stop_on(&self, conn: &mut Conn) -> Result<()> {
        let signals = self
            .signals
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate the signal descriptor", &e))?;
        conn.stop_on(signals);
        Ok(())
    }

    /// Ends the run with `outcome`: stops what is left and removes
    /// everything (what drop does, said out loud). A stop signal still
    /// pending after a failure is why it failed (a step that cannot wait
    /// for it, connecting, ended first): the status is the signal's.
    pub(crate) fn finish(self, outcome: Result<()>) -> Result<()> {
        let outcome = match (outcome, self.stop_signal()) {
            (Err(_), Some(sig)) => Err(Error::new(ExitStatus::Signal(sig as i32), "")),
            (outcome, _) => outcome,
        };
        if let Err(e) = &outcome
            && let ExitStatus::Signal(n) = e.status
            && let Ok(sig) = Signal::try_from(n)
        {
            log::info!("stopping on {sig}");
            crate::notify::stopping();
        }
        drop(self);
        outcome
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        crate::status::finish();
        self.stop_all();
    }
}

/// Claims `ROLE@PID` in `dir` for this process (a pool or a master) and
/// returns that name, under which its registry and other bookkeeping go.
/// The `@` keeps it apart from every binding's ID.
fn claim_owner(dir: &RuntimeDir, role: &str) -> Result<(String, Claim)> {
    let name = format!("{role}@{}", std::process::id());
    let path = dir.dotfile(&name, "lock");
    let what = || format!("cannot claim {}", path.display());
    let mut claim = match Claim::take(&path) {
        Ok(claim) => claim,
        Err(Refused::Io(e)) => return Err(Error::io(what(), &e)),
        Err(Refused::Held(_)) => {
            return Err(Error::new(
                ExitStatus::CantCreate,
                format!("{}: held by another process", what()),
            ));
        }
    };
    if let Err(e) = ProcessId::try_current().and_then(|me| claim.record(me)) {
        claim.release();
        return Err(Error::io(format!("cannot write {}", path.display()), &e));
    }
    Ok((name, claim))
}

/// A pipe holding `secret` in hex, its write end closed: the read end,
/// for a binding to read once. 64 bytes fit any pipe's buffer.
fn secret_pipe(secret: &[u8]) -> Result<OwnedFd> {
    let (read, write) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::nix("cannot create a pipe for a secret", e))?;
    let text = zeroize::Zeroizing::new(hex::encode(secret));
    File::from(write)
        .write_all(text.as_bytes())
        .map_err(|e| Error::io("cannot write a secret into its pipe", &e))?;
    Ok(read)
}

/// The read end is handed to every binding; the write end never leaves
/// this process.
struct Watchdog {
    read: OwnedFd,
    _write: OwnedFd,
}

impl Watchdog {
    fn new() -> Result<Watchdog> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Error::nix("cannot create the watchdog pipe", e))?;
        Ok(Watchdog {
            read,
            _write: write,
        })
    }
}

/// Where the other fifobind commands are: beside this executable, as
/// installed and as built; else on PATH.
fn sibling(program: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(program)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}

/// Spawns `cmd`, which prints its PID on stdout once ready, and returns
/// it running. A child that fails says why on stderr and exits: its
/// status is ours. One that says nothing within `limit`, or while a stop
/// signal comes, is stopped and reaped.
fn start_ready(
    cmd: &mut Command,
    what: &str,
    limit: Duration,
    stop: &Signals,
) -> Result<ProcessId> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("cannot start {what}"), &e))?;
    let mut out = File::from(OwnedFd::from(child.stdout.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let mut line = Vec::new();
    let mut set = PollSet::default();
    let mut why = None;
    while why.is_none() && !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            why = Some(Error::new(
                ExitStatus::TempFail,
                format!("{what} did not start within {} s", limit.as_secs_f64()),
            ));
            break;
        }
        set.clear();
        let data = set.add(out.as_fd(), IN);
        let sig = set.add(stop.as_fd(), IN);
        set.wait(Some(left))
            .map_err(|e| Error::io(format!("cannot wait for {what}"), &e))?;
        if set.revents(sig) != 0
            && let Some(sig) = stop.next()
        {
            why = Some(Error::new(ExitStatus::Signal(sig as i32), ""));
        } else if set.revents(data) != 0 {
            let mut buf = [0u8; 64];
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => line.extend_from_slice(&buf[..n]),
            }
        }
    }
    if why.is_none()
        && let Ok(pid) = String::from_utf8_lossy(&line).trim().parse::<i32>()
        && pid == child.id() as i32
        && let Some(id) = ProcessId::of(pid)
    {
        // Running: the caller registers and reaps it.
        return Ok(id);
    }
    if let Some(err) = why {
        stop_child(&mut child);
        return Err(err);
    }
    let status = child
        .wait()
        .map_err(|e| Error::io(format!("cannot wait for {what}"), &e))?;
    let status = status
        .code()
        .map(ExitStatus::from_code)
        .unwrap_or(ExitStatus::Software);
    Err(Error::new(status, format!("{what} failed")))
}

/// Stops a child of ours that is not registered yet, and reaps it.
fn stop_child(child: &mut Child) {
    if let Some(process) = ProcessId::of(child.id() as i32) {
        registry::stop_all(
            &[Entry {
                kind: Kind::Binding,
                process,
                name: String::new(),
            }],
            GRACE,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The guardian's pipe and PID: dropping it closes the pipe and waits
/// for the guardian to end, so it never outlives us.
struct Guardian {
    pid: Pid,
    pipe: Option<OwnedFd>,
}

impl Guardian {
    /// Forks the guardian. Call it while this process has one thread and
    /// before it opens anything the guardian must not keep open (a
    /// listening socket). `cleanup` are paths the guardian removes after
    /// stopping the registry's processes, if it finds the registry still
    /// there.
    fn fork(registry_path: &Path, cleanup: Vec<PathBuf>) -> Result<Guardian> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Error::nix("cannot create a pipe for the guardian", e))?;
        // SAFETY: the caller guarantees this process is single-threaded, so
        // the child may run ordinary code.
        match unsafe { fork() }.map_err(|e| Error::nix("cannot fork the guardian", e))? {
            ForkResult::Parent { child } => Ok(Guardian {
                pid: child,
                pipe: Some(write),
            }),
            ForkResult::Child => {
                // What a service manager passed is the owner's, not ours: a
                // ready pipe we held would never see end-of-file, a socket
                // we held would outlive the pool. A fork copies every
                // descriptor (close-on-exec acts at exec only, and Linux
                // has no close-on-fork): they are closed first thing.
                crate::notify::forget();
                crate::activation::forget();
                drop(write);
                // A panic must not unwind into the owner's half-made
                // state, whose drop would remove its bookkeeping.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    guard(File::from(read), registry_path, &cleanup)
                }));
                // SAFETY: leave without running the owner's destructors.
                unsafe { libc::_exit(0) }
            }
        }
    }
}

/// The guardian's life: wait for the owner's end, then clean up after it.
fn guard(mut pipe: File, registry_path: &Path, cleanup: &[PathBuf]) {
    // Keep no terminal or pipe of the user's open: a `pool | while read`
    // loop must see end-of-file when the pool exits.
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..=2 {
            // SAFETY: dup2 onto standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let mut byte = [0u8; 1];
    // Returns at end-of-file: the owner is gone.
    while matches!(pipe.read(&mut byte), Ok(n) if n > 0) {}
    if registry_path.exists() {
        registry::stop_all(&registry::load(registry_path), Duration::from_secs(1));
        registry::remove(registry_path);
        for path in cleanup {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(path);
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        self.pipe = None;
        let _ = waitpid(self.pid, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fake-binding");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Starts the script at `path` as a binding that must be ready within
    /// `limit`; SIGUSR2 (no signal of this test binary's) stops it.
    fn start(path: &Path, limit: Duration, stop: &Signals) -> Result<ProcessId> {
        start_ready(&mut Command::new(path), "fake-binding", limit, stop)
    }

    /// Writes its PID down (atomically, by rename), then hangs.
    const HANGS: &str = "echo $$ > \"$0.new\" && mv \"$0.new\" \"$0.pid\"; exec sleep 1000";

    /// Asserts that the script at `path` is gone, reaped, if it got as far
    /// as writing its PID down (a loaded machine may stop it before).
    fn assert_gone(path: &Path) {
        if let Ok(text) = std::fs::read_to_string(path.with_extension("pid")) {
            let pid: i32 = text.trim().parse().unwrap();
            // Stopped and reaped: not even a zombie is left.
            assert!(ProcessId::of(pid).is_none(), "{pid} still there");
        }
    }

    #[test]
    fn a_binding_that_never_gets_ready_is_stopped_in_time() {
        let tmp = tempfile::tempdir().unwrap();
        let path = script(tmp.path(), HANGS);
        let stop = Signals::of_for_tests(Signal::SIGUSR2);
        let started = Instant::now();
        let err = start(&path, Duration::from_millis(500), &stop).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.status, ExitStatus::TempFail, "{err}");
        assert!(err.message.contains("did not start within 0.5 s"), "{err}");
        assert_gone(&path);
    }

    #[test]
    fn a_stop_signal_stops_a_binding_still_starting() {
        let tmp = tempfile::tempdir().unwrap();
        let path = script(tmp.path(), HANGS);
        let stop = Signals::of_for_tests(Signal::SIGUSR2);
        nix::sys::signal::raise(Signal::SIGUSR2).unwrap();
        let err = start(&path, Duration::from_secs(60), &stop).unwrap_err();
        assert_eq!(err.status, ExitStatus::Signal(libc::SIGUSR2), "{err}");
        assert_gone(&path);
    }

    #[test]
    fn a_ready_binding_runs_and_a_failed_one_passes_on_its_status() {
        let tmp = tempfile::tempdir().unwrap();
        let stop = Signals::of_for_tests(Signal::SIGUSR2);
        let ok = script(tmp.path(), "echo $$; exec sleep 1000");
        let id = start(&ok, Duration::from_secs(10), &stop).unwrap();
        assert!(id.is_alive());
        id.signal(Signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(id.pid), None);
        let bad = script(tmp.path(), "exit 73");
        let err = start(&bad, Duration::from_secs(10), &stop).unwrap_err();
        assert_eq!(err.status, ExitStatus::CantCreate);
    }
}
