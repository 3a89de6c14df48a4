//! What a running binding, pool or master tells `fifobind list`.
//!
//! Each publishes its figures in `<runtime dir>/.NAME.status`, one JSON
//! object, rewritten atomically (a temporary file renamed over it) at most
//! once a second and only when something changed, by a thread of its own.
//! The data path pays one relaxed atomic add per read or write batch
//! ([`add_in`], [`add_out`]), never a system call. The file goes when the
//! process closes ([`finish`]); the sweep removes it when its owner died.
//!
//! One publisher per process: the figures are the process's, as its
//! claim is.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::process::ProcessId;

/// How often the file is rewritten, at most.
pub(crate) const PERIOD: Duration = Duration::from_secs(1);

static BYTES_IN: AtomicU64 = AtomicU64::new(0);
static BYTES_OUT: AtomicU64 = AtomicU64::new(0);
/// Bumped on every change that is not a counter (peers).
static CHANGES: AtomicU64 = AtomicU64::new(0);
static STOPPED: AtomicBool = AtomicBool::new(false);

struct Publisher {
    path: PathBuf,
    /// The fixed fields: id, kind, pid, port, since, ...
    fixed: serde_json::Map<String, serde_json::Value>,
    peers: Vec<String>,
}

static PUBLISHER: Mutex<Option<Publisher>> = Mutex::new(None);

/// What a process publishes besides its counters.
pub(crate) struct Identity<'a> {
    pub(crate) name: &'a str,
    /// `bind-input`, `bind-output`, `pool` or `master`.
    pub(crate) kind: &'a str,
    pub(crate) port: u16,
    /// The remote host (bind-output, master).
    pub(crate) host: Option<&'a str>,
    /// The FIFO (bindings).
    pub(crate) fifo: Option<&'a Path>,
}

/// Starts publishing the figures of a binding (see [`start`]).
pub(crate) fn start_binding(
    binding: &crate::binding::Binding,
    kind: &str,
    port: u16,
    host: Option<&str>,
) {
    start(
        binding.dir.path(),
        Identity {
            name: binding.id.as_str(),
            kind,
            port,
            host,
            fifo: Some(binding.fifo.path()),
        },
    );
}

/// Starts publishing the figures of a pool or master named `name`.
pub(crate) fn start_owner(
    dir: &crate::runtime_dir::RuntimeDir,
    name: &str,
    kind: &str,
    port: u16,
    host: Option<&str>,
) {
    start(
        dir.path(),
        Identity {
            name,
            kind,
            port,
            host,
            fifo: None,
        },
    );
}

/// Starts publishing into `dir`/.NAME.status. Call it once signals are
/// blocked (the thread must inherit the mask).
pub(crate) fn start(dir: &Path, who: Identity<'_>) {
    // Out of descriptors, there is no status to publish; the command's
    // own work reports the shortage with its context.
    let Ok(me) = ProcessId::try_current() else {
        return;
    };
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut fixed = serde_json::Map::new();
    fixed.insert("id".into(), who.name.into());
    fixed.insert("kind".into(), who.kind.into());
    fixed.insert("pid".into(), me.pid.into());
    fixed.insert("start".into(), me.start.into());
    fixed.insert("port".into(), who.port.into());
    fixed.insert("host".into(), who.host.into());
    fixed.insert(
        "fifo".into(),
        who.fifo.map(|p| p.display().to_string()).into(),
    );
    fixed.insert("since".into(), since.into());
    let publisher = Publisher {
        path: dir.join(format!(".{}.status", who.name)),
        fixed,
        peers: Vec::new(),
    };
    // What the file shows is what the thread compares against: a change
    // made before the thread first looks (a daemon's first line, sent the
    // moment its binding is ready) is still a change.
    let first = figures();
    publisher.write(first);
    *lock() = Some(publisher);
    let spawned = std::thread::Builder::new()
        .name("status".into())
        .spawn(move || run(first));
    if let Err(e) = spawned {
        log::warn!(
            "cannot start publishing the status: {}",
            crate::error::describe_io(&e)
        );
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<Publisher>> {
    PUBLISHER.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(mut last: [u64; 3]) {
    while !STOPPED.load(Ordering::Relaxed) {
        std::thread::sleep(PERIOD);
        let now = figures();
        if now != last {
            // Under the lock: `finish` cannot remove the file meanwhile.
            // A write that failed (a sweep took the temporary file, say)
            // is tried again next period, not only at the next change.
            if let Some(p) = lock().as_ref()
                && !STOPPED.load(Ordering::Relaxed)
                && p.write(now)
            {
                last = now;
            }
        }
    }
}

fn figures() -> [u64; 3] {
    [
        BYTES_IN.load(Ordering::Relaxed),
        BYTES_OUT.load(Ordering::Relaxed),
        CHANGES.load(Ordering::Relaxed),
    ]
}

impl Publisher {
    /// Publishes `figures` (see [`figures`]); false if the file could not
    /// be replaced.
    fn write(&self, [bytes_in, bytes_out, _]: [u64; 3]) -> bool {
        let mut object = self.fixed.clone();
        object.insert("peers".into(), self.peers.clone().into());
        object.insert("bytes_in".into(), bytes_in.into());
        object.insert("bytes_out".into(), bytes_out.into());
        // Counting lines would take a pass over every byte on the data
        // path: not counted (yet), and said so.
        object.insert("lines_in".into(), serde_json::Value::Null);
        object.insert("lines_out".into(), serde_json::Value::Null);
        let text = serde_json::Value::Object(object).to_string() + "\n";
        let tmp = self.path.with_extension("status-new");
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| fs::rename(&tmp, &self.path));
        if let Err(e) = &written {
            let _ = fs::remove_file(&tmp);
            log::debug!(
                "cannot write {}: {}",
                self.path.display(),
                crate::error::describe_io(e)
            );
        }
        written.is_ok()
    }
}

/// Bytes read in (from sockets, or from the FIFO), per batch.
pub(crate) fn add_in(bytes: usize) {
    BYTES_IN.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Bytes passed on (into the FIFO, or to the socket), per batch.
pub(crate) fn add_out(bytes: usize) {
    BYTES_OUT.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// A peer connected (or, for a pool, a master authenticated).
pub(crate) fn peer_added(peer: impl std::fmt::Display) {
    if let Some(p) = lock().as_mut() {
        p.peers.push(peer.to_string());
        CHANGES.fetch_add(1, Ordering::Relaxed);
    }
}

/// That peer is gone.
pub(crate) fn peer_gone(peer: impl std::fmt::Display) {
    if let Some(p) = lock().as_mut() {
        let text = peer.to_string();
        if let Some(i) = p.peers.iter().position(|q| *q == text) {
            p.peers.remove(i);
            CHANGES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Stops publishing and removes the file.
pub(crate) fn finish() {
    STOPPED.store(true, Ordering::Relaxed);
    if let Some(p) = lock().take() {
        let _ = fs::remove_file(&p.path);
        let _ = fs::remove_file(p.path.with_extension("status-new"));
    }
}

/// Removes the status file of `name` in `dir` (its owner is dead).
pub(crate) fn remove(dir: &Path, name: &str) {
    let path = dir.join(format!(".{name}.status"));
    let _ = fs::remove_file(&path);
    let _ = fs::remove_file(path.with_extension("status-new"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes passed on right after the start, before the publishing
    /// thread first looks, reach the file all the same.
    #[test]
    fn figures_that_change_at_once_are_published() {
        let tmp = tempfile::tempdir().unwrap();
        let who = Identity {
            name: "t",
            kind: "bind-input",
            port: 1024,
            host: None,
            fifo: None,
        };
        start(tmp.path(), who);
        add_out(5);
        let path = tmp.path().join(".t.status");
        let shown = || -> Option<u64> {
            let text = fs::read_to_string(&path).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v["bytes_out"].as_u64()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shown() != Some(BYTES_OUT.load(Ordering::Relaxed))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let want = BYTES_OUT.load(Ordering::Relaxed);
        let got = shown();
        finish();
        assert_eq!(got, Some(want), "the file never showed the bytes passed on");
    }
}
