//! The test harness: a temporary runtime directory per test, the real
//! binaries, and a sweep on drop that kills whatever a test started
//! (found by the runtime directory in its environment), so no test leaves
//! a process behind even when it fails.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const BIND_INPUT: &str = env!("CARGO_BIN_EXE_bind-input");
pub const BIND_OUTPUT: &str = env!("CARGO_BIN_EXE_bind-output");
pub const FIFOBIND: &str = env!("CARGO_BIN_EXE_fifobind");

/// The reading loop README.md, bind-input(1) and fifobind(7) show, as
/// they show it (port 9999): it keeps the part a timed-out `read` returns
/// and completes it, so no line is seen split (tests/it/seed.rs runs it).
pub const SEED_LOOP: &str = r#"pid=$(bind-input in1 9999)
fifo=$(fifobind path in1)
line=
while true; do
    IFS= read -r -t 1 part < "$fifo"; status=$?
    line+=$part
    (( status > 128 )) && continue  # this second: nothing, or part of a line
    (( status != 0 )) && break      # the binding is gone
    [ -z "$line" ] && continue      # an empty message: ignored
    [ "$line" = END ] && break
    echo "got: $line"; line=
done
kill "$pid"
"#;

/// A test that cannot run here (a tool, a privilege or IPv6 missing):
/// outside CI it says why and the caller returns; with `CI` set (CI runs
/// with CI=true) it fails, so a green CI means every test really ran.
pub fn skip_or_fail(reason: &str) {
    // libtest names each test's thread after the test.
    let current = std::thread::current();
    let test = current.name().unwrap_or("a test");
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test} cannot run, and CI is set so it may not skip: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Whether `program` can be run (found in PATH); otherwise
/// [`skip_or_fail`] with the Debian package that has it.
pub fn have_tool(program: &str, package: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip_or_fail(&format!(
            "{program} is not installed (apt-get install {package})"
        ));
    }
    found
}

/// Generous limit for anything that should take milliseconds; only a
/// failing test ever waits this long.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Env {
    tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("fifobind-test")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("run");
        Env { tmp, dir }
    }

    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    pub fn fifo(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The claim file of binding `id`.
    pub fn lock(&self, id: &str) -> PathBuf {
        self.dir.join(format!(".{id}.lock"))
    }

    /// Creates the runtime directory beforehand, with exactly `mode`.
    pub fn make_dir(&self, mode: u32) {
        fs::create_dir(&self.dir).unwrap();
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A command with this test's runtime directory.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("FIFOBIND_DIR", &self.dir)
            .env_remove("XDG_RUNTIME_DIR")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a command to its end (at most [`PATIENCE`]).
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        run_with_timeout(self.cmd(program).args(args))
    }

    /// Starts a binding and returns the PID it printed, asserting success.
    pub fn start(&self, program: &str, args: &[&str]) -> i32 {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            describe(&out)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.ends_with('\n') && text.lines().count() == 1,
            "stdout {text:?}"
        );
        text.trim().parse().expect("a PID on stdout")
    }

    /// A bash script run with this test's runtime directory.
    pub fn bash(&self, script: &str) -> Output {
        run_with_timeout(
            self.cmd("bash")
                .arg("-c")
                .arg(script)
                .env("PATH", path_with_bins()),
        )
    }

    /// Every process whose environment names this test's runtime directory.
    pub fn processes(&self) -> Vec<i32> {
        let needle = format!("FIFOBIND_DIR={}", self.dir.display());
        let me = std::process::id() as i32;
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me || !alive(pid) {
                continue;
            }
            if let Ok(env) = fs::read(format!("/proc/{pid}/environ")) {
                let hit = env
                    .split(|&b| b == 0)
                    .any(|var| var.starts_with(needle.as_bytes()));
                if hit {
                    found.push(pid);
                }
            }
        }
        found
    }

    /// Waits until no process of this test runs any more.
    pub fn wait_no_processes(&self, limit: Duration) -> Vec<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Files left in the runtime directory (and below), logs excepted.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        collect(&self.dir, &mut found);
        found
    }

    /// Asserts that nothing of the test is left: no process, no FIFO, no
    /// claim, no registry.
    pub fn assert_clean(&self) {
        let procs = self.wait_no_processes(Duration::from_secs(5));
        assert!(procs.is_empty(), "processes left: {procs:?}");
        let files = self.leftovers();
        assert!(files.is_empty(), "files left: {files:?}");
    }

    /// The bindings' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".log") {
                    text += &format!(
                        "--- {name}\n{}",
                        fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
        }
        text
    }
}

fn collect(dir: &Path, found: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            found.push(format!("{name}/"));
            collect(&e.path(), found);
        } else if !name.ends_with(".log") && !name.ends_with(".log.1") {
            let kind = if ty.is_fifo() { " (fifo)" } else { "" };
            found.push(format!("{name}{kind}"));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for _ in 0..3 {
            let procs = self.processes();
            if procs.is_empty() {
                break;
            }
            for pid in procs {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True unless the process is gone or a zombie.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, sig) };
}

/// Runs a prepared command with a deadline, killing it if it overstays.
pub fn run_with_timeout(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_child(&mut child, PATIENCE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {PATIENCE:?}");
    });
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?} (signal {:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// PATH with the directory of the built binaries first, so scripts call
/// `bind-input` by name as a user would.
pub fn path_with_bins() -> String {
    let bins = Path::new(BIND_INPUT).parent().unwrap();
    format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A port in the range the commands accept, free right now. Ports are
/// spread by test process and counter so parallel tests rarely collide.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (std::process::id() % 1000) as u16 * 20;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (base - 20000 + n.wrapping_mul(7)) % 25000;
        if TcpListener::bind(("::", port)).is_ok() && TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// Connects to a local port, retrying briefly.
pub fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect to {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reads lines from a FIFO until `count` lines arrived or the patience ran
/// out; opens it once and keeps it open.
pub fn read_lines(fifo: &Path, count: usize) -> Vec<String> {
    let mut file = fs::File::open(fifo).expect("open FIFO");
    read_lines_from(&mut file, count)
}

/// A marker [`read_lines_from`] puts after a last line that had no
/// newline, so that no comparison with whole lines can pass by mistake.
pub const NO_NEWLINE: &str = "<no newline>";

/// Reads lines from a FIFO, socket or pipe until `count` lines arrived,
/// end-of-file, or the patience ran out. A last line without a newline
/// is returned with [`NO_NEWLINE`] after it.
pub fn read_lines_from<R: Read + AsRawFd>(src: &mut R, count: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut lines = 0;
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + PATIENCE;
    let fd = src.as_raw_fd();
    while lines < count && Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            let n = match src.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read: {e}"),
            };
            // Count only the new bytes: the buffer may grow to megabytes.
            lines += chunk[..n].iter().filter(|&&b| b == b'\n').count();
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    let text = String::from_utf8(buf).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if !text.is_empty()
        && !text.ends_with('\n')
        && let Some(last) = lines.last_mut()
    {
        last.push_str(NO_NEWLINE);
    }
    lines
}

/// Sends `text` on a new connection to a local port and closes it.
pub fn send(port: u16, text: &[u8]) {
    let mut s = connect(port);
    s.write_all(text).unwrap();
}

pub fn unique_set<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> HashSet<T> {
    items.into_iter().collect()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Env {
    /// Runs `program` with each bad command line of `cases`: each must be
    /// refused with status 2 and one line naming its needle, creating
    /// nothing; `--help` and `--version` must print and exit 0.
    pub fn assert_usage_errors(&self, program: &str, cases: &[(&[&str], &str)]) {
        for (args, needle) in cases {
            let out = self.run(program, args);
            assert_fails(&out, 2, needle);
            assert!(
                !self.dir.exists(),
                "{args:?} created {}",
                self.dir.display()
            );
        }
        for flag in ["--help", "--version"] {
            let out = self.run(program, &[flag]);
            assert_eq!(out.status.code(), Some(0), "{flag}: {}", describe(&out));
            assert!(!out.stdout.is_empty(), "{flag} printed nothing");
            assert!(!self.dir.exists(), "{flag} created the runtime directory");
        }
    }
}

/// Asserts a command failed the documented way: exit `code`, nothing on
/// stdout, exactly one line on stderr, and that line mentions `needle`.
pub fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{}", describe(out));
    assert!(out.stdout.is_empty(), "{}", describe(out));
    assert!(
        err.ends_with('\n') && err.lines().count() == 1,
        "not one line on stderr: {}",
        describe(out)
    );
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}: {}",
        describe(out)
    );
}

/// A listener on 127.0.0.1, on a free port in the commands' range.
pub fn listener() -> (TcpListener, u16) {
    loop {
        // Another process may take the port between the check and here.
        let port = free_port();
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return (l, port);
        }
    }
}

/// Accepts one connection, waiting at most [`PATIENCE`].
pub fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects to `to` from the local address `from` (another loopback
/// address, to test address restrictions). No retry.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
    socket.connect(&SockAddr::from(to))?;
    Ok(socket.into())
}

/// Everything `s` still sends, as lines, until the peer closes it
/// (end-of-file or reset: true) or `limit` has passed (false).
pub fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<String>, bool) {
    let deadline = Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break true,
        }
    };
    let text = String::from_utf8_lossy(&bytes).to_string();
    (text.lines().map(String::from).collect(), closed)
}

/// Gives the connections `listener` accepts a small, fixed receive
/// buffer (no autotuning), so a remote that never reads stalls its sender
/// after little data instead of swallowing megabytes.
pub fn small_receive_window(listener: &TcpListener) {
    let size: libc::c_int = 8192;
    // SAFETY: setsockopt with a pointer to a local int.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

/// Waits until the peer closed `stream`, discarding whatever it sends;
/// false if it is still open after `limit`.
pub fn wait_closed(stream: &mut TcpStream, limit: Duration) -> bool {
    read_until_closed(stream, limit).1
}

/// Whether a command can run in a fresh, empty network namespace
/// (`unshare -n`), where no packet can leave the machine. Prints why not.
pub fn can_unshare_net() -> bool {
    if !is_root() {
        skip_or_fail("not root, cannot unshare the network namespace");
        return false;
    }
    let ok = Command::new("unshare")
        .args(["-n", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail("unshare -n is missing (apt-get install util-linux) or not permitted");
    }
    ok
}

/// Whether IPv6 loopback works here; prints why a test skips when not.
pub fn has_ipv6() -> bool {
    let ok = TcpListener::bind(("::1", 0)).is_ok();
    if !ok {
        skip_or_fail("::1 is not available (IPv6 loopback)");
    }
    ok
}

pub const POOL: &str = env!("CARGO_BIN_EXE_pool");
pub const MASTER: &str = env!("CARGO_BIN_EXE_master");

/// A long-running command of a test (a pool, a master, a bash pipeline):
/// its output is collected as it comes, and it is killed on drop.
pub struct Spawned {
    pub child: Child,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect_into(
    mut from: impl Read + Send + 'static,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<()>,
) {
    let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let to = sink.clone();
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            to.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (sink, handle)
}

impl Env {
    /// Starts a long-running command with this test's runtime directory.
    pub fn spawn(&self, cmd: &mut Command) -> Spawned {
        let mut child = cmd
            .env("FIFOBIND_DIR", &self.dir)
            .env_remove("XDG_RUNTIME_DIR")
            .env("PATH", path_with_bins())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let (stdout, a) = collect_into(child.stdout.take().unwrap());
        let (stderr, b) = collect_into(child.stderr.take().unwrap());
        Spawned {
            child,
            stdout,
            stderr,
            readers: vec![a, b],
        }
    }

    /// Starts `pool ARGS` and waits until it listens.
    pub fn pool(&self, args: &[&str]) -> Spawned {
        let pool = self.spawn(Command::new(POOL).args(args));
        ready(&pool);
        pool
    }

    /// Starts `master KEY 127.0.0.1 PORT DDIR`.
    pub fn spawn_master(&self, key: &str, port: impl std::fmt::Display, ddir: &Path) -> Spawned {
        self.spawn(Command::new(MASTER).args(master_args(key, port, ddir)))
    }

    /// Runs `master KEY 127.0.0.1 PORT DDIR` to its end.
    pub fn run_master(&self, key: &str, port: impl std::fmt::Display, ddir: &Path) -> Output {
        run_with_timeout(self.cmd(MASTER).args(master_args(key, port, ddir)))
    }

    /// Starts `bash -c script`.
    pub fn spawn_bash(&self, script: &str) -> Spawned {
        self.spawn(Command::new("bash").arg("-c").arg(script))
    }

    /// A directory of daemons: (name, bash body) pairs, made executable.
    pub fn daemons(&self, scripts: &[(&str, &str)]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let ddir = self.tmp().join("daemons");
        fs::create_dir_all(&ddir).unwrap();
        for (name, body) in scripts {
            let path = ddir.join(name);
            fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        ddir
    }
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).to_string()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).to_string()
    }

    /// Waits for the command to end; None if it is still running after
    /// `limit`. Its output is then complete.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = wait_child(&mut self.child, limit)?;
        // Its output ends when the last holder of the pipes exits; a
        // leftover process (a bug the test will report) must not hang it.
        wait_for(Duration::from_secs(2), || {
            self.readers.iter().all(|r| r.is_finished())
        });
        Some(status)
    }

    /// Asserts that it ends within [`PATIENCE`] with status 128 + `sig`,
    /// as pool and master do when a signal stops them.
    pub fn assert_stopped_by(&mut self, sig: i32) {
        let status = self.wait(PATIENCE).expect("it ends");
        assert_eq!(status.code(), Some(128 + sig), "{}", self.describe());
    }

    /// Asserts that it ends, with status 0, within [`PATIENCE`].
    pub fn assert_ends_ok(&mut self) {
        let status = self.wait(PATIENCE);
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            self.describe()
        );
    }

    /// Waits until its stdout satisfies `cond`.
    pub fn wait_stdout(&self, limit: Duration, cond: impl Fn(&str) -> bool) -> bool {
        wait_for(limit, || cond(&self.stdout()))
    }

    pub fn wait_stderr(&self, limit: Duration, cond: impl Fn(&str) -> bool) -> bool {
        wait_for(limit, || cond(&self.stderr()))
    }

    pub fn describe(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------
// Pools and masters.

/// A bash consumer as in pool(1): one reader per daemon, tagging lines;
/// its pool serves one session (`--once`), so that it ends.
pub fn consumer(port: u16, key: &str) -> String {
    format!(
        r#"pool --once {key} {port} | while read -r name port fifo; do
            echo "pool: $name $port $fifo"
            while IFS= read -r line; do echo "[$name] $line"; done < "$fifo" &
        done
        wait"#
    )
}

/// Waits for the pool's log line saying it listens.
pub fn ready(pool: &Spawned) {
    assert!(
        pool.wait_stderr(PATIENCE, |s| s.contains("waiting for a master")),
        "the pool did not start: {}",
        pool.describe()
    );
}

/// One line of a pool's or master's registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegEntry {
    /// `binding` or `daemon`.
    pub kind: String,
    pub pid: i32,
    pub name: String,
}

impl Env {
    /// The bookkeeping file `.OWNER@PID.SUFFIX` of a pool or master
    /// (`owner` "pool" or "master").
    pub fn owner_file(&self, owner: &str, pid: i32, suffix: &str) -> PathBuf {
        self.dir.join(format!(".{owner}@{pid}.{suffix}"))
    }

    /// The entries of the registry of pool or master `pid` (none if the
    /// file is gone).
    pub fn registry(&self, owner: &str, pid: i32) -> Vec<RegEntry> {
        let text = fs::read_to_string(self.owner_file(owner, pid, "registry")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                assert!(words.len() == 4, "registry line {line:?}");
                RegEntry {
                    kind: words[0].to_string(),
                    pid: words[1].parse().unwrap(),
                    name: words[3].to_string(),
                }
            })
            .collect()
    }

    /// The files (and directories) in the runtime directory that belong
    /// to pool or master `pid`: `.OWNER@PID.*`.
    pub fn owner_files(&self, owner: &str, pid: i32) -> Vec<String> {
        let prefix = format!(".{owner}@{pid}.");
        let mut found: Vec<String> = fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with(&prefix) && !n.ends_with(".log"))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }
}

// ---------------------------------------------------------------------
// Processes.

/// Fields of `/proc/PID/stat` after the command name: index 0 is the
/// state, 1 the parent PID, 2 the process group.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// The live (not zombie) children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let parent = pid.to_string();
    all_pids()
        .into_iter()
        .filter(|&p| alive(p) && stat_fields(p).is_some_and(|f| f.get(1) == Some(&parent)))
        .collect()
}

/// The live members of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let group = pgid.to_string();
    all_pids()
        .into_iter()
        .filter(|&p| alive(p) && stat_fields(p).is_some_and(|f| f.get(2) == Some(&group)))
        .collect()
}

/// The one child of a pool or master that it did not register: its
/// guardian (a fork of itself, so it has the same command line).
pub fn guardian_of(owner: i32, registered: &[RegEntry]) -> i32 {
    let theirs: Vec<i32> = children(owner)
        .into_iter()
        .filter(|c| !registered.iter().any(|e| e.pid == *c))
        .collect();
    assert_eq!(
        theirs.len(),
        1,
        "children of {owner} besides {registered:?}"
    );
    let guardian = theirs[0];
    assert_eq!(
        fs::read(format!("/proc/{guardian}/cmdline")).unwrap(),
        fs::read(format!("/proc/{owner}/cmdline")).unwrap(),
        "the guardian is a fork of its owner"
    );
    guardian
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's resident memory every few milliseconds, in a
/// thread, and keeps the largest value seen.
pub struct RssSampler {
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: i32) -> RssSampler {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let max = std::sync::Arc::new(AtomicU64::new(rss_kib(pid).expect("the process runs")));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    m.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        RssSampler {
            max,
            stop,
            thread: Some(thread),
        }
    }

    /// The largest resident size seen so far, in KiB.
    pub fn max_kib(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Stops sampling; returns the largest resident size seen, in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.max_kib()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until `counter` has not moved for `quiet` (flow control holds its
/// producer back), at most `limit`; returns its value then, or None if it
/// kept moving.
pub fn wait_stalled(
    counter: &std::sync::atomic::AtomicU64,
    quiet: Duration,
    limit: Duration,
) -> Option<u64> {
    let deadline = Instant::now() + limit;
    let mut last = counter.load(Ordering::SeqCst);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let now = counter.load(Ordering::SeqCst);
        if now != last {
            last = now;
            since = Instant::now();
        } else if last > 0 && since.elapsed() >= quiet {
            return Some(last);
        }
        if Instant::now() > deadline {
            return None;
        }
    }
}

/// Reads a FIFO with big buffers, handing every chunk to `f`, until `f`
/// returns false, end-of-file, or `limit` has passed. Returns the number
/// of bytes read.
pub fn read_chunks(fifo: &Path, limit: Duration, mut f: impl FnMut(&[u8]) -> bool) -> u64 {
    let mut file = fs::File::open(fifo).expect("open FIFO");
    let mut chunk = vec![0u8; 1 << 20];
    let deadline = Instant::now() + limit;
    let mut total = 0u64;
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        if pfd.revents == 0 {
            continue;
        }
        let n = match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read FIFO: {e}"),
        };
        total += n as u64;
        if !f(&chunk[..n]) {
            break;
        }
    }
    total
}

// ---------------------------------------------------------------------
// The wire.

/// A TCP relay on 127.0.0.1 that forwards every connection to
/// 127.0.0.1:`to` and records what passes each way.
pub struct Relay {
    pub port: u16,
    up: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    down: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(to: u16) -> Relay {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let (listener, port) = listener();
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (u, d, s) = (up.clone(), down.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(("127.0.0.1", to)).expect("relay: connect");
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (u, d) = (u.clone(), d.clone());
                std::thread::spawn(move || pump(client, server, u));
                std::thread::spawn(move || pump(s2, c2, d));
            }
        });
        Relay {
            port,
            up,
            down,
            stop,
            thread: Some(thread),
        }
    }

    /// Everything the clients sent.
    pub fn upstream(&self) -> Vec<u8> {
        self.up.lock().unwrap().clone()
    }

    /// Everything the server sent back.
    pub fn downstream(&self) -> Vec<u8> {
        self.down.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to`, recording, until end-of-file; then passes the
/// end on.
fn pump(mut from: TcpStream, mut to: TcpStream, log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().extend_from_slice(&chunk[..n]);
                if to.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A master's arguments for the pool on this machine's `port`; its
/// session is named `m`, so its daemons' streams are `m.DAEMON`.
fn master_args(key: &str, port: impl std::fmt::Display, ddir: &Path) -> Vec<String> {
    vec![
        "--name".to_string(),
        "m".to_string(),
        key.to_string(),
        "127.0.0.1".to_string(),
        port.to_string(),
        ddir.to_str().unwrap().to_string(),
    ]
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let fields = stat_fields(pid)?;
    // utime and stime: fields 14 and 15 of the stat line, in clock ticks.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Opens `n` connections to a local port at once (non-blocking connects,
/// so they all reach the listen backlog together), writes `text(i)` on
/// connection `i` and closes them all. Panics if any fails.
pub fn burst(port: u16, n: usize, text: impl Fn(usize) -> String) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let to = SockAddr::from(SocketAddr::from(([127, 0, 0, 1], port)));
    let socks: Vec<Socket> = (0..n)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&to) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("connect: {e}"),
            }
            s
        })
        .collect();
    for (i, s) in socks.iter().enumerate() {
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, PATIENCE.as_millis() as i32) };
        if let Some(e) = s.take_error().unwrap() {
            panic!("connection {i}: {e}");
        }
        s.set_nonblocking(false).unwrap();
        let mut w: &Socket = s;
        w.write_all(text(i).as_bytes())
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    for s in &socks {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

// ---------------------------------------------------------------------
// A relay that breaks connections when the test says so.

/// How [`FaultRelay::cut`] breaks the connections it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Both ends get a reset (SO_LINGER 0, then close).
    Reset,
    /// Nothing more is forwarded either way, and the sockets stay open:
    /// a link that went silent (a NAT that forgot the flow).
    Hold,
}

/// A TCP relay on 127.0.0.1 to 127.0.0.1:`to`, one thread per connection
/// polling both sides. [`FaultRelay::cut`] breaks every connection it
/// carries now; [`FaultRelay::refuse`] makes it reset new connections at
/// once (the receiver's side unreachable). It counts the bytes it has
/// forwarded towards `to`, and when it last forwarded any.
pub struct FaultRelay {
    pub port: u16,
    shared: std::sync::Arc<FaultShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct FaultShared {
    stop: std::sync::atomic::AtomicBool,
    refuse: std::sync::atomic::AtomicBool,
    /// Bumped by each cut; a connection older than it is cut.
    generation: std::sync::atomic::AtomicU64,
    kind: std::sync::Mutex<Option<Cut>>,
    upstream: std::sync::atomic::AtomicU64,
    /// When bytes last went upstream, and connections accepted.
    last_up: std::sync::Mutex<Option<Instant>>,
    accepted: std::sync::atomic::AtomicU64,
}

impl FaultRelay {
    pub fn start(to: u16) -> FaultRelay {
        let (listener, port) = listener();
        listener.set_nonblocking(true).unwrap();
        let shared = std::sync::Arc::new(FaultShared::default());
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !sh.stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                if sh.refuse.load(Ordering::Relaxed) {
                    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    continue;
                };
                sh.accepted.fetch_add(1, Ordering::Relaxed);
                let born = sh.generation.load(Ordering::SeqCst);
                let sh2 = sh.clone();
                conns.push(std::thread::spawn(move || {
                    fault_pump(client, server, born, &sh2)
                }));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        FaultRelay {
            port,
            shared,
            thread: Some(thread),
        }
    }

    /// Breaks every connection carried now, the way `kind` says.
    pub fn cut(&self, kind: Cut) {
        *self.shared.kind.lock().unwrap() = Some(kind);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// While `on`, new connections are reset at once.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Bytes forwarded towards `to` so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.shared.upstream.load(Ordering::SeqCst)
    }

    /// When bytes last went towards `to`.
    pub fn last_upstream(&self) -> Option<Instant> {
        *self.shared.last_up.lock().unwrap()
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fault_pump(mut client: TcpStream, mut server: TcpStream, born: u64, sh: &FaultShared) {
    client.set_nonblocking(true).unwrap();
    server.set_nonblocking(true).unwrap();
    let mut chunk = vec![0u8; 64 * 1024];
    // Bytes read from one side and not yet taken by the other.
    let mut to_server: Vec<u8> = Vec::new();
    let mut to_client: Vec<u8> = Vec::new();
    let mut held = false;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        if !held && sh.generation.load(Ordering::SeqCst) > born {
            match sh.kind.lock().unwrap().unwrap_or(Cut::Reset) {
                Cut::Reset => {
                    for s in [&client, &server] {
                        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                    }
                    return;
                }
                Cut::Hold => held = true,
            }
        }
        if held {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: client.as_raw_fd(),
                events: libc::POLLIN
                    | if to_client.is_empty() {
                        0
                    } else {
                        libc::POLLOUT
                    },
                revents: 0,
            },
            libc::pollfd {
                fd: server.as_raw_fd(),
                events: libc::POLLIN
                    | if to_server.is_empty() {
                        0
                    } else {
                        libc::POLLOUT
                    },
                revents: 0,
            },
        ];
        // SAFETY: two pollfds on the stack.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
        // Reads only while the other side has taken what came before, so
        // the relay buffers at most one chunk each way.
        if to_server.is_empty() && fds[0].revents != 0 {
            match client.read(&mut chunk) {
                Ok(0) => {
                    let _ = server.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(n) => to_server.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if to_client.is_empty() && fds[1].revents != 0 {
            match server.read(&mut chunk) {
                Ok(0) => {
                    let _ = client.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(n) => to_client.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if !to_server.is_empty() {
            match server.write(&to_server) {
                Ok(n) => {
                    to_server.drain(..n);
                    sh.upstream.fetch_add(n as u64, Ordering::SeqCst);
                    *sh.last_up.lock().unwrap() = Some(Instant::now());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        if !to_client.is_empty() {
            match client.write(&to_client) {
                Ok(n) => {
                    to_client.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

// ---------------------------------------------------------------------
// A man in the middle, and a capture of the loopback.

/// What a [`TamperRelay`] does to the connections it forwards.
#[derive(Clone, Default)]
pub struct Tamper {
    /// Each chunk is passed on this long after it arrived, each way (a
    /// distant peer, in order).
    pub delay: Duration,
    /// Once this many bytes have come from the client, these bytes are
    /// sent on to the server too (once per connection): an injection.
    pub inject_up: Option<(usize, Vec<u8>)>,
    /// The byte at this offset of what the server sends is flipped.
    pub flip_down: Option<usize>,
}

/// A TCP relay on 127.0.0.1 to 127.0.0.1:`to` that delays, injects or
/// rewrites as its [`Tamper`] says.
pub struct TamperRelay {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TamperRelay {
    pub fn start(to: u16, tamper: Tamper) -> TamperRelay {
        use std::sync::{Arc, atomic::AtomicBool};
        let (listener, port) = listener();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let t = tamper.clone();
                let (inject, flip, delay) = (t.inject_up, t.flip_down, t.delay);
                std::thread::spawn(move || {
                    tamper_pump(client, server, delay, |seen, chunk, out| {
                        out.extend_from_slice(chunk);
                        if let Some((after, bytes)) = &inject
                            && seen < *after
                            && seen + chunk.len() >= *after
                        {
                            out.extend_from_slice(bytes);
                        }
                    })
                });
                std::thread::spawn(move || {
                    tamper_pump(s2, c2, delay, |seen, chunk, out| {
                        out.extend_from_slice(chunk);
                        if let Some(at) = flip
                            && (seen..seen + chunk.len()).contains(&at)
                        {
                            out[at - seen] ^= 0x01;
                        }
                    })
                });
            }
        });
        TamperRelay {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TamperRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to` through `edit` (given the bytes seen before this
/// chunk, the chunk, and what to send), each chunk `delay` after it came;
/// then passes the end on.
fn tamper_pump(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    mut edit: impl FnMut(usize, &[u8], &mut Vec<u8>) + Send,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (at, bytes) in rx {
            let wait = (at + delay).saturating_duration_since(Instant::now());
            std::thread::sleep(wait);
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut chunk = [0u8; 4096];
    let mut seen = 0;
    loop {
        match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut out = Vec::with_capacity(n);
                edit(seen, &chunk[..n], &mut out);
                seen += n;
                if tx.send((Instant::now(), out)).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Everything that crosses the loopback interface while it runs, as raw
/// frames (an AF_PACKET socket: needs root), capped at 256 MiB.
pub struct LoopbackCapture {
    packets: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackCapture {
    /// None (after [`skip_or_fail`]) where a packet socket cannot be had.
    pub fn start() -> Option<LoopbackCapture> {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            skip_or_fail("cannot open a packet socket (needs root)");
            return None;
        }
        // SAFETY: fd is ours, owned from here on.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new("lo").unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: a zeroed sockaddr_ll, filled in below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto as u16;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind with a sockaddr_ll of its size.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind the packet socket to lo");
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (packets.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            let mut total = 0usize;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
            while !s.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd on the stack.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                if pfd.revents == 0 {
                    continue;
                }
                // SAFETY: recv into our buffer.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && total < 256 << 20 {
                    total += n as usize;
                    b.lock().unwrap().push(buf[..n as usize].to_vec());
                }
            }
        });
        Some(LoopbackCapture {
            packets,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing; the TCP payloads of the IPv4 packets from or to
    /// one of `ports`, in the order seen.
    pub fn finish(mut self, ports: &[u16]) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let packets = std::mem::take(&mut *self.packets.lock().unwrap());
        packets
            .iter()
            .filter_map(|frame| {
                // Ethernet header (zeros on lo), then IPv4.
                let ip = frame.get(14..)?;
                if ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
                    return None;
                }
                let tcp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
                let (src, dst) = (
                    u16::from_be_bytes([tcp[0], tcp[1]]),
                    u16::from_be_bytes([tcp[2], tcp[3]]),
                );
                if !ports.contains(&src) && !ports.contains(&dst) {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                let header = usize::from(ip[0] & 0x0f) * 4 + usize::from(tcp.get(12)? >> 4) * 4;
                Some(ip.get(header..total.min(ip.len()))?.to_vec())
            })
            .filter(|p| !p.is_empty())
            .collect()
    }
}

impl Drop for LoopbackCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
