//! The test harness: a temporary runtime directory per test, the real
//! binaries, and a sweep on drop that kills whatever a test started
//! (found by the runtime directory in its environment), so no test leaves
//! a process behind even when it fails.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub const BIND_INPUT: &str = env!("CARGO_BIN_EXE_bind-input");
pub const BIND_OUTPUT: &str = env!("CARGO_BIN_EXE_bind-output");

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
        } else if !name.ends_with(".log") {
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
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let deadline = Instant::now() + PATIENCE;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    while buf.iter().filter(|&&b| b == b'\n').count() < count && Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        if pfd.revents & libc::POLLIN != 0 {
            let n = file.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
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
