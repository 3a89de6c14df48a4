//! What a running binding, pool or master tells `fifobind list`.
//!
//! Each publishes its figures in `<runtime dir>/.NAME.status`, one JSON
//! object, rewritten atomically (a temporary file renamed over it) at most
//! once a second and only when something changed, by a thread of its own.
//! The data path pays one relaxed atomic add per read or write batch
//! ([`add_in`], [`add_out`], [`add_lines_in`], [`add_lines_out`]), never a
//! system call. The file goes when the process closes ([`finish`]); the
//! sweep removes it when its owner died.
//!
//! The file is written once when publishing starts; the thread is started
//! only at the first change after that. An idle binding (hundreds of them
//! in a directory) so never pays for a thread: its stack, its malloc
//! arena, its wake-ups, nor the start-up and exit time they cost.
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
static LINES_IN: AtomicU64 = AtomicU64::new(0);
static LINES_OUT: AtomicU64 = AtomicU64::new(0);
/// Whether this process counts lines ([`count_lines`]); if not, they are
/// published as null (unknown), not as 0.
static LINES_COUNTED: AtomicBool = AtomicBool::new(false);
/// The publishing thread has been started (or could not be).
static THREAD: AtomicBool = AtomicBool::new(false);
/// Bumped on every change that is not a counter (peers).
static CHANGES: AtomicU64 = AtomicU64::new(0);
static STOPPED: AtomicBool = AtomicBool::new(false);

struct Publisher {
    path: PathBuf,
    /// The fixed fields (id, kind, pid, port, since, ...), as JSON
    /// members each followed by a comma.
    fixed: String,
}

struct State {
    publisher: Option<Publisher>,
    /// Kept apart from the publisher, so that peers known before
    /// publishing starts are in its first write.
    peers: Vec<String>,
}

static STATE: Mutex<State> = Mutex::new(State {
    publisher: None,
    peers: Vec::new(),
});

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
    start_as(
        binding.me,
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
    start_as(None, dir, who);
}

/// [`start`] for the process `me` if known (read from /proc otherwise).
fn start_as(me: Option<ProcessId>, dir: &Path, who: Identity<'_>) {
    // Out of descriptors, there is no status to publish; the command's
    // own work reports the shortage with its context.
    let Some(me) = me.or_else(|| ProcessId::try_current().ok()) else {
        return;
    };
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Written by hand, not with serde_json: a binding then never runs (nor
    // maps into memory) a JSON library for a dozen fields.
    let mut fixed = String::new();
    field_str(&mut fixed, "id", Some(who.name));
    field_str(&mut fixed, "kind", Some(who.kind));
    field_num(&mut fixed, "pid", Some(me.pid as u64));
    field_num(&mut fixed, "start", Some(me.start));
    field_num(&mut fixed, "port", Some(u64::from(who.port)));
    field_str(&mut fixed, "host", who.host);
    let fifo = who.fifo.map(|p| p.display().to_string());
    field_str(&mut fixed, "fifo", fifo.as_deref());
    field_num(&mut fixed, "since", Some(since));
    let publisher = Publisher {
        path: dir.join(format!(".{}.status", who.name)),
        fixed,
    };
    let mut state = lock();
    // What the first write says needs no thread; a change after it does.
    let first = figures();
    let written = publisher.write(&state.peers);
    state.publisher = Some(publisher);
    drop(state);
    if !written || figures() != first {
        start_thread(first);
    }
}

fn lock() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Something changed: the thread publishes it within [`PERIOD`]. One
/// relaxed load on the data path once the thread runs.
#[inline]
fn changed() {
    if !THREAD.load(Ordering::Relaxed) {
        changed_first();
    }
}

#[cold]
fn changed_first() {
    // Before publishing starts, its first write says it all.
    if lock().publisher.is_some() {
        start_thread([0; 5]);
    }
}

/// Starts the publishing thread (once); `last` is what the file says.
fn start_thread(last: [u64; 5]) {
    if THREAD.swap(true, Ordering::Relaxed) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("status".into())
        // Its deepest call formats a log line or a JSON object of a dozen
        // fields: the default 2 MiB would be address space for nothing.
        .stack_size(256 * 1024)
        .spawn(move || run(last));
    if let Err(e) = spawned {
        log::warn!(
            "cannot start publishing the status: {}",
            crate::error::describe_io(&e)
        );
    }
}

fn run(mut last: [u64; 5]) {
    while !STOPPED.load(Ordering::Relaxed) {
        std::thread::sleep(PERIOD);
        let now = figures();
        if now != last {
            // Under the lock: `finish` cannot remove the file meanwhile.
            // A write that failed (a sweep took the temporary file, say)
            // is tried again next period, not only at the next change.
            let state = lock();
            if let Some(p) = state.publisher.as_ref()
                && !STOPPED.load(Ordering::Relaxed)
                && p.write(&state.peers)
            {
                last = now;
            }
        }
    }
}

fn figures() -> [u64; 5] {
    [
        BYTES_IN.load(Ordering::Relaxed),
        BYTES_OUT.load(Ordering::Relaxed),
        LINES_IN.load(Ordering::Relaxed),
        LINES_OUT.load(Ordering::Relaxed),
        CHANGES.load(Ordering::Relaxed),
    ]
}

impl Publisher {
    /// Publishes the figures; false if the file could not be replaced.
    fn write(&self, peers: &[String]) -> bool {
        let text = self.text(peers);
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

    /// The file's text: one JSON object and a newline.
    fn text(&self, peers: &[String]) -> String {
        let mut text = String::with_capacity(self.fixed.len() + 160);
        text.push('{');
        text.push_str(&self.fixed);
        text.push_str("\"peers\":[");
        for (i, peer) in peers.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            json_string(&mut text, peer);
        }
        text.push_str("],");
        field_num(
            &mut text,
            "bytes_in",
            Some(BYTES_IN.load(Ordering::Relaxed)),
        );
        field_num(
            &mut text,
            "bytes_out",
            Some(BYTES_OUT.load(Ordering::Relaxed)),
        );
        // Where the bytes never pass through the process (bind-output's
        // splice), lines are not counted: null says unknown, not none.
        let counted = LINES_COUNTED.load(Ordering::Relaxed);
        let lines = |n: &AtomicU64| counted.then(|| n.load(Ordering::Relaxed));
        field_num(&mut text, "lines_in", lines(&LINES_IN));
        field_num(&mut text, "lines_out", lines(&LINES_OUT));
        text.pop(); // the last comma
        text.push_str("}\n");
        text
    }
}

/// `"name":value,` with a number or null.
fn field_num(out: &mut String, name: &str, value: Option<u64>) {
    use std::fmt::Write;
    match value {
        Some(v) => {
            let _ = write!(out, "\"{name}\":{v},");
        }
        None => {
            let _ = write!(out, "\"{name}\":null,");
        }
    }
}

/// `"name":"value",` or `"name":null,`.
fn field_str(out: &mut String, name: &str, value: Option<&str>) {
    out.push('"');
    out.push_str(name);
    out.push_str("\":");
    match value {
        Some(v) => json_string(out, v),
        None => out.push_str("null"),
    }
    out.push(',');
}

/// `s` as a JSON string (RFC 8259 escapes; a path may hold anything).
fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Bytes read in (from sockets, or from the FIFO), per batch.
pub(crate) fn add_in(bytes: usize) {
    BYTES_IN.fetch_add(bytes as u64, Ordering::Relaxed);
    changed();
}

/// Bytes passed on (into the FIFO, or to the socket), per batch.
pub(crate) fn add_out(bytes: usize) {
    BYTES_OUT.fetch_add(bytes as u64, Ordering::Relaxed);
    changed();
}

/// This process counts lines: they are published as numbers from now on.
pub(crate) fn count_lines() {
    LINES_COUNTED.store(true, Ordering::Relaxed);
}

/// Lines taken in, per batch (see [`count_lines`]).
pub(crate) fn add_lines_in(lines: usize) {
    if lines > 0 {
        LINES_IN.fetch_add(lines as u64, Ordering::Relaxed);
        changed();
    }
}

/// Lines passed on, per batch.
pub(crate) fn add_lines_out(lines: usize) {
    if lines > 0 {
        LINES_OUT.fetch_add(lines as u64, Ordering::Relaxed);
        changed();
    }
}

/// A peer connected (or, for a pool, a master authenticated).
pub(crate) fn peer_added(peer: impl std::fmt::Display) {
    lock().peers.push(peer.to_string());
    CHANGES.fetch_add(1, Ordering::Relaxed);
    changed();
}

/// That peer is gone.
pub(crate) fn peer_gone(peer: impl std::fmt::Display) {
    let text = peer.to_string();
    let mut state = lock();
    if let Some(i) = state.peers.iter().position(|q| *q == text) {
        state.peers.remove(i);
        drop(state);
        CHANGES.fetch_add(1, Ordering::Relaxed);
        changed();
    }
}

/// Stops publishing and removes the file.
pub(crate) fn finish() {
    STOPPED.store(true, Ordering::Relaxed);
    if let Some(p) = lock().publisher.take() {
        // No temporary file is left: a write is done under the lock, and
        // one that failed removed its own.
        let _ = fs::remove_file(&p.path);
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

    #[test]
    fn the_text_is_json_with_every_field_and_odd_names_escaped() {
        let mut fixed = String::new();
        field_str(&mut fixed, "id", Some("in1"));
        field_str(&mut fixed, "host", None);
        field_str(&mut fixed, "fifo", Some("/tmp/a \"b\"\\c\n\u{1}d/é"));
        field_num(&mut fixed, "port", Some(9999));
        let p = Publisher {
            path: PathBuf::from("/nonexistent/.in1.status"),
            fixed,
        };
        let text = p.text(&["127.0.0.1:5000".into(), "[::1]:6000".into()]);
        assert!(text.ends_with("}\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect(&text);
        assert_eq!(v["id"], "in1");
        assert!(v["host"].is_null());
        assert_eq!(v["fifo"], "/tmp/a \"b\"\\c\n\u{1}d/é");
        assert_eq!(v["port"], 9999);
        assert_eq!(v["peers"][1], "[::1]:6000");
        for field in ["bytes_in", "bytes_out", "lines_in", "lines_out"] {
            assert!(v.get(field).is_some(), "{field} missing: {text}");
        }
    }

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
