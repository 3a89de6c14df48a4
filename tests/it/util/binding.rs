//! A binding a test started in the background (`env.start(…)`), as a
//! guard: stopping it with a signal asserts the exit bind-input(1) and
//! bind-output(1) promise (gone in time, FIFO and claim removed), and
//! dropping it kills what is still running, so a failing test leaves
//! nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use super::env::logs_in;
use super::{Env, PATIENCE, alive, kill, run_with_timeout, wait_gone, with_env};

/// A daemonized binding: its PID, and the FIFO and claim it owns.
#[derive(Debug)]
pub struct Binding {
    pub pid: i32,
    dir: PathBuf,
    /// What its environment holds, to tell it from a stranger that got
    /// its PID after it exited.
    marker: String,
    fifo: PathBuf,
    claim: PathBuf,
}

impl Env {
    /// Starts a binding and returns it, asserting success: exit 0 and its
    /// PID alone on stdout.
    pub fn start(&self, program: &str, args: &[&str]) -> Binding {
        self.started(program, args, self.run(program, args))
    }

    /// [`Env::start`] with `FIFOBIND_KEY=key` in its environment, for
    /// `--key -`.
    pub fn start_keyed(&self, program: &str, key: &str, args: &[&str]) -> Binding {
        let out = run_with_timeout(self.cmd(program).env("FIFOBIND_KEY", key).args(args));
        self.started(program, args, out)
    }

    fn started(&self, program: &str, args: &[&str], out: Output) -> Binding {
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            super::describe(&out)
        );
        self.binding(printed_pid(&out))
    }

    /// The running binding `pid` (started by a script, say), found by the
    /// claim it holds.
    pub fn binding(&self, pid: i32) -> Binding {
        let claim = claim_of(&self.dir, pid)
            .unwrap_or_else(|| panic!("no claim names binding {pid}\n{}", self.logs()));
        let name = claim.file_name().unwrap().to_str().unwrap();
        let id = &name[1..name.len() - ".lock".len()];
        Binding {
            pid,
            dir: self.dir.clone(),
            marker: self.marker(),
            fifo: self.fifo(id),
            claim,
        }
    }
}

/// The PID a command printed, alone on its stdout, as bind-input and
/// bind-output do when they have started.
pub fn printed_pid(out: &Output) -> i32 {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with('\n') && text.lines().count() == 1,
        "stdout {text:?}"
    );
    text.trim().parse().expect("a PID on stdout")
}

/// The claim file `.ID.lock` in `dir` that records `pid` as its owner
/// (claims hold `PID START`).
fn claim_of(dir: &Path, pid: i32) -> Option<PathBuf> {
    fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        // Never open anything else: a FIFO would block, or lose a line.
        if !(name.starts_with('.') && name.ends_with(".lock")) {
            return None;
        }
        let owner = fs::read_to_string(e.path()).ok()?;
        (owner.split_whitespace().next() == Some(&pid.to_string())).then(|| e.path())
    })
}

impl Binding {
    /// Sends `sig` and asserts that the binding exits within [`PATIENCE`],
    /// removing its FIFO and its claim.
    pub fn stop(self, sig: i32) {
        self.stop_within(sig, PATIENCE);
    }

    /// [`Binding::stop`] with a deadline of the test's own.
    pub fn stop_within(self, sig: i32, limit: Duration) {
        kill(self.pid, sig);
        self.assert_exits(limit, &format!("signal {sig}"));
    }

    /// Asserts that the binding exits within `limit` after `what` (a
    /// signal sent, its FIFO removed), removing its FIFO and its claim.
    pub fn assert_exits(self, limit: Duration, what: &str) {
        assert!(
            wait_gone(self.pid, limit),
            "{what}: binding {} still running after {limit:?}\n{}",
            self.pid,
            logs_in(&self.dir)
        );
        assert!(!self.fifo.exists(), "{what}: FIFO left");
        assert!(!self.claim.exists(), "{what}: claim left");
    }

    /// SIGKILL, and waits until it is gone; what it leaves (FIFO, claim)
    /// is for the test to look at.
    pub fn kill(self) {
        kill(self.pid, libc::SIGKILL);
        assert!(wait_gone(self.pid, PATIENCE), "SIGKILL left {}", self.pid);
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        // Only a process of this test: the PID may be another's by now.
        if with_env(&self.marker).contains(&self.pid) {
            kill(self.pid, libc::SIGKILL);
            wait_gone(self.pid, PATIENCE);
        }
    }
}

/// The guard itself: it must be able to fail, and must leave nothing
/// behind when it does.
#[test]
fn binding_guard_fails_a_binding_that_stays_and_kills_it_on_drop() {
    use super::{BIND_INPUT, free_port};
    let env = Env::new();
    let stays = env.start(BIND_INPUT, &["stays", &free_port().to_string()]);
    let pid = stays.pid;
    // Signal 0 stops nothing: the guard must fail, then kill it unwinding.
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stays.stop_within(0, Duration::from_millis(300))
    }));
    assert!(failed.is_err(), "stop passed for a binding still running");
    assert!(!alive(pid), "the failed guard left binding {pid} running");
    // What a SIGKILL leaves is not the guard's to tidy.
    assert!(env.fifo("stays").exists() && env.lock("stays").exists());

    let stopped = env.start(BIND_INPUT, &["stopped", &free_port().to_string()]);
    stopped.stop(libc::SIGTERM);
    assert!(!env.fifo("stopped").exists() && !env.lock("stopped").exists());
}
