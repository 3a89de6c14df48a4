//! The benchmark's plumbing: child processes reaped with their CPU time,
//! file descriptors read and written against a deadline, free ports with a
//! retry when another program takes one, and the deterministic streams
//! every run is checked against.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs;

/// Any single step (a transfer, a start, a stop) that takes longer than
/// this is broken, not slow.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub const MIB: usize = 1 << 20;

/// What broke; the benchmark stops with it (exit 1).
pub type R<T> = Result<T, String>;

/// A step failed because another program took our port: try another.
pub enum Fail {
    Collision(String),
    Broken(String),
}

impl From<String> for Fail {
    fn from(s: String) -> Fail {
        Fail::Broken(s)
    }
}

/// Runs `f` on free ports until it does not collide (at most 5 tries).
pub fn with_port<T>(mut f: impl FnMut(u16) -> Result<T, Fail>) -> R<T> {
    let mut last = String::new();
    for _ in 0..5 {
        match f(free_port()) {
            Ok(v) => return Ok(v),
            Err(Fail::Collision(why)) => last = why,
            Err(Fail::Broken(why)) => return Err(why),
        }
    }
    Err(format!("five port collisions in a row, the last: {last}"))
}

/// A port in 20000-45000 that nothing uses on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    loop {
        let port = 20000 + (crate::rng() % 25000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A listener on a free port of 127.0.0.1.
pub fn listener() -> (TcpListener, u16) {
    loop {
        let port = free_port();
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return (l, port);
        }
    }
}

/// Whether a socket on 127.0.0.1:`port` is in TCP state `state` (hex, as
/// /proc/net/tcp writes it: 0A listening, 01 established).
pub fn tcp_state(port: u16, state: &str) -> bool {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|row| {
            let c: Vec<&str> = row.split_whitespace().collect();
            c.len() > 3 && c[1] == local && c[3] == state
        })
    })
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> R<bool>) -> R<()> {
    let deadline = Instant::now() + TIMEOUT;
    while !cond()? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// A child process of one run, reaped with wait4(2) so that its CPU time
/// (user + system, its own reaped children included) is known; killed and
/// reaped on drop if it still runs.
pub struct Proc {
    pub name: String,
    pub pid: i32,
    child: Option<Child>,
    /// Exit status (as wait4 gives it) and CPU seconds, once reaped.
    pub done: Option<(i32, f64)>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd`; its stderr goes to a log file under `logs`.
    pub fn spawn(cmd: &mut Command, name: &str, logs: &Path) -> R<Proc> {
        let log = logs.join(format!("{name}.{}.log", crate::rng() % 1_000_000));
        let err =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = cmd
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            pid: child.id() as i32,
            child: Some(child),
            done: None,
            log,
        })
    }

    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        self.reap(false).is_some()
    }

    fn reap(&mut self, block: bool) -> Option<(i32, f64)> {
        if self.done.is_none() {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 fills it in.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let flags = if block { 0 } else { libc::WNOHANG };
            // SAFETY: wait4 on our own child, with pointers to locals.
            let rc = unsafe { libc::wait4(self.pid, &mut status, flags, &mut ru) };
            if rc == self.pid {
                let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                self.done = Some((status, secs(ru.ru_utime) + secs(ru.ru_stime)));
                // Reaped: std must not wait for or signal this PID again.
                std::mem::forget(self.child.take());
            }
        }
        self.done
    }

    /// Waits for it to end within `limit`: (exit code, CPU seconds).
    pub fn wait(&mut self, limit: Duration) -> R<(i32, f64)> {
        if self.done.is_none() && !wait_exit(self.pid, limit) {
            return Err(format!("{} did not end within {limit:?}", self.name));
        }
        let (status, cpu) = self
            .reap(true)
            .ok_or_else(|| format!("cannot reap {}", self.name))?;
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        Ok((code, cpu))
    }

    /// Waits for it to end with status 0; its CPU seconds.
    pub fn wait_ok(&mut self) -> R<f64> {
        let (code, cpu) = self.wait(TIMEOUT)?;
        if code != 0 {
            return Err(format!(
                "{} exited {code}: {}",
                self.name,
                self.stderr_text().trim()
            ));
        }
        Ok(cpu)
    }

    /// Signals it and waits for it to end; its CPU seconds. Any way of
    /// ending counts: this is teardown.
    pub fn stop(&mut self, sig: i32) -> R<f64> {
        if self.done.is_none() {
            procs::kill(self.pid, sig);
        }
        let (_, cpu) = self.wait(TIMEOUT)?;
        Ok(cpu)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reap(false).is_none() {
            procs::kill(self.pid, libc::SIGKILL);
            self.reap(true);
        }
    }
}

/// Blocks until process `pid` (a child) has exited, at most `limit`;
/// whether it has. A pidfd wakes us the moment it exits.
pub fn wait_exit(pid: i32, limit: Duration) -> bool {
    match pidfd(pid) {
        Some(fd) => wait_pidfds(&[fd], limit),
        None => procs::wait_gone(pid, limit),
    }
}

/// A pidfd of process `pid` (any process, not only a child): readable
/// once it has exited. None if it is gone already or pidfds are missing.
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    // SAFETY: fd was just returned by pidfd_open.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Blocks until every process of `fds` (pidfds) has exited, at most
/// `limit`; whether all have. epoll, so each exit costs one wake-up and
/// no scan of the others: for the time of 500 stops, not of our polling.
pub fn wait_pidfds(fds: &[OwnedFd], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    // SAFETY: epoll_create1 takes no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return fds
            .iter()
            .all(|fd| poll_one(fd.as_raw_fd(), libc::POLLIN, deadline));
    }
    // SAFETY: ep was just created.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for fd in fds {
        let mut ev = libc::epoll_event {
            // One report per exit: a dead process stays readable.
            events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
            u64: 0,
        };
        // SAFETY: registering a live descriptor with a local event.
        unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
    }
    let mut left = fds.len();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return false;
        }
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: epoll_wait into a live array of that length.
        let n = unsafe {
            libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms)
        };
        if n > 0 {
            left -= n as usize;
        }
    }
    true
}

/// Waits until `fd` is ready for `events` or `deadline` passes.
fn poll_one(fd: RawFd, events: i16, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd on the stack.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return true;
        }
        if rc == 0 || left.is_zero() {
            return false;
        }
    }
}

/// read(2) with a deadline: bytes read, 0 at end-of-file.
pub fn read_fd(fd: RawFd, buf: &mut [u8], deadline: Instant) -> R<usize> {
    loop {
        if !poll_one(fd, libc::POLLIN, deadline) {
            return Err("timed out reading".into());
        }
        // SAFETY: reading into a live buffer of that length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR | libc::EAGAIN) => continue,
            Some(libc::ECONNRESET) => return Ok(0),
            _ => return Err(format!("read: {e}")),
        }
    }
}

/// Writes all of `data` with write(2) calls of at most `chunk` bytes.
pub fn write_fd(fd: RawFd, data: &[u8], chunk: usize, deadline: Instant) -> R<()> {
    let mut off = 0;
    while off < data.len() {
        if !poll_one(fd, libc::POLLOUT, deadline) {
            return Err(format!(
                "timed out writing, {off} of {} bytes written",
                data.len()
            ));
        }
        let end = data.len().min(off + chunk);
        // SAFETY: writing from a live slice.
        let n = unsafe { libc::write(fd, data[off..end].as_ptr().cast(), end - off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                continue;
            }
            return Err(format!("write after {off} bytes: {e}"));
        }
        off += n as usize;
    }
    Ok(())
}

/// Reads exactly `expect.len()` bytes in reads of up to 1 MiB, checking
/// each against `expect`; with `eof`, also the end-of-file after them.
/// Returns the moment the last byte (or the end-of-file) arrived.
pub fn verify(fd: RawFd, expect: &[u8], eof: bool) -> R<Instant> {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = vec![0u8; MIB];
    let mut off = 0;
    while off < expect.len() {
        let n = read_fd(fd, &mut buf, deadline).map_err(|e| format!("{e} after {off} bytes"))?;
        if n == 0 {
            return Err(format!(
                "end of stream after {off} of {} bytes",
                expect.len()
            ));
        }
        if off + n > expect.len() {
            return Err(format!(
                "{} bytes more than the {} sent",
                off + n - expect.len(),
                expect.len()
            ));
        }
        if buf[..n] != expect[off..off + n] {
            let at = off
                + buf[..n]
                    .iter()
                    .zip(&expect[off..])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
            return Err(format!("byte {at} differs from what was sent"));
        }
        off += n;
    }
    if eof {
        let n = read_fd(fd, &mut buf, deadline)?;
        if n != 0 {
            return Err(format!("{n} bytes more than the {} sent", expect.len()));
        }
    }
    Ok(Instant::now())
}

/// CPU seconds the calling thread has used.
pub fn thread_cpu() -> f64 {
    // SAFETY: clock_gettime into a local timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A pipe whose capacity is 1 MiB (the unprivileged maximum, what
/// bind-input gives its FIFO): at the default 64 KiB the pipe itself
/// would be the bottleneck.
pub fn big_pipe() -> R<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both were just created.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    grow_pipe(w.as_raw_fd());
    Ok((r, w))
}

pub fn grow_pipe(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we hold; failure leaves it as it was.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, MIB as libc::c_int) };
}

/// Opens a FIFO (or any path) with raw open(2) flags.
pub fn open(path: &Path, flags: i32) -> R<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: open(2) with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "cannot open {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a FIFO for socat, mode 0600 as fifobind makes its own.
pub fn mkfifo(path: &Path) -> R<()> {
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: mkfifo(3) with a valid C string.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(format!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

pub fn connect(port: u16) -> R<TcpStream> {
    TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to port {port}: {e}"))
}

/// Accepts one connection within [`TIMEOUT`].
pub fn accept(l: &TcpListener) -> R<TcpStream> {
    if !poll_one(l.as_raw_fd(), libc::POLLIN, Instant::now() + TIMEOUT) {
        return Err("nobody connected".into());
    }
    l.accept()
        .map(|(s, _)| s)
        .map_err(|e| format!("accept: {e}"))
}

/// `lines` distinct numbered lines of `len` bytes each, newline included:
/// what every measured run sends and checks it received, byte for byte.
pub fn numbered(total: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(total);
    let filler: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
    for i in 0..total / len {
        let head = format!("{i:020} ");
        v.extend_from_slice(head.as_bytes());
        v.extend_from_slice(&filler[..len - head.len() - 1]);
        v.push(b'\n');
    }
    v
}

/// The same command, through `taskset -c 0` when `pinned`.
pub fn command(pinned: bool, program: &str) -> Command {
    let mut c = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", program]);
        c
    } else {
        Command::new(program)
    };
    c.stdin(Stdio::null()).stdout(Stdio::null());
    c
}

/// Pins the calling thread to CPU 0, or lets it run anywhere again.
pub fn pin_thread(pinned: bool) {
    // SAFETY: a cpu_set_t on the stack, filled by the CPU_* helpers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let n = if pinned {
            1
        } else {
            libc::CPU_SETSIZE as usize
        };
        for cpu in 0..n {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
