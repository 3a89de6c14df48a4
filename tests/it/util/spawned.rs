//! Long-running commands of a test (a pool, a master, a bash pipeline):
//! their output is collected as it comes, for waiting on it, and they are
//! killed on drop.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Env, PATIENCE, path_with_bins, wait_child, wait_for};

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

    /// Starts `bash -c script`.
    pub fn spawn_bash(&self, script: &str) -> Spawned {
        self.spawn(Command::new("bash").arg("-c").arg(script))
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

    /// Sends `sig` and asserts what [`Spawned::assert_stopped_by`] does.
    pub fn stop(&mut self, sig: i32) {
        super::kill(self.pid(), sig);
        self.assert_stopped_by(sig);
    }

    /// Asserts that it ends within [`PATIENCE`] with status 128 + `sig`,
    /// as pool and master do when a signal stops them.
    pub fn assert_stopped_by(&mut self, sig: i32) {
        let Some(status) = self.wait(PATIENCE) else {
            panic!(
                "still running {PATIENCE:?} after the signal\n{}",
                self.describe()
            );
        };
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

/// Asserts that a command run to its end beside `other` (a master beside
/// its pool) exited 0, showing both outputs if not.
pub fn assert_ran_ok(out: &std::process::Output, other: &Spawned) {
    assert!(
        out.status.success(),
        "{}\n{}",
        super::describe(out),
        other.describe()
    );
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
