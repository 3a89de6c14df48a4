//! The temporary runtime directory of one test, and running the real
//! commands in it: a sweep on drop kills whatever the test started (found
//! by the runtime directory in its environment), so no test leaves a
//! process behind even when it fails.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{kill_with_env, with_env};

pub const BIND_INPUT: &str = env!("CARGO_BIN_EXE_bind-input");
pub const BIND_OUTPUT: &str = env!("CARGO_BIN_EXE_bind-output");
pub const FIFOBIND: &str = env!("CARGO_BIN_EXE_fifobind");

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
        with_env(&self.marker())
    }

    /// What the environment of every process of this test holds.
    pub(super) fn marker(&self) -> String {
        format!("FIFOBIND_DIR={}", self.dir.display())
    }

    /// Waits until no process of this test runs any more.
    pub fn wait_no_processes(&self, limit: Duration) -> Vec<i32> {
        let mut left = Vec::new();
        wait_for(limit, || {
            left = self.processes();
            left.is_empty()
        });
        left
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
        logs_in(&self.dir)
    }
}

/// The logs in runtime directory `dir`, for failure messages.
pub(super) fn logs_in(dir: &Path) -> String {
    let mut text = String::new();
    if let Ok(entries) = fs::read_dir(dir) {
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
        kill_with_env(&self.marker());
    }
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
    let mut status = None;
    wait_for(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status
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
