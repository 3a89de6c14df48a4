//! The PID registry of a pool or master: every process it started.
//!
//! A pool or master records each binding and daemon it starts, by PID and
//! start time, in `<runtime dir>/.NAME.registry`, rewritten atomically on
//! every change. It stops them through the registry on a signal; and when
//! it died by SIGKILL, the next command to sweep the runtime directory
//! finds the registry of a dead owner and stops whatever it still names.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::process::ProcessId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A bind-input or bind-output: SIGTERM closes it properly.
    Binding,
    /// A master's daemon, leader of its own process group: the whole group
    /// is signalled.
    Daemon,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) kind: Kind,
    pub(crate) process: ProcessId,
    pub(crate) name: String,
}

impl Entry {
    fn line(&self) -> String {
        let kind = match self.kind {
            Kind::Binding => "binding",
            Kind::Daemon => "daemon",
        };
        format!("{kind} {} {}\n", self.process, self.name)
    }

    fn parse(line: &str) -> Option<Entry> {
        let mut words = line.split_whitespace();
        let kind = match words.next()? {
            "binding" => Kind::Binding,
            "daemon" => Kind::Daemon,
            _ => return None,
        };
        let pid = words.next()?;
        let start = words.next()?;
        let process = format!("{pid} {start}").parse().ok()?;
        let name = words.next().unwrap_or("").to_string();
        Some(Entry {
            kind,
            process,
            name,
        })
    }

    /// Asks the process (or the daemon's whole group) to stop.
    pub(crate) fn signal(&self, sig: Signal) -> bool {
        match self.kind {
            Kind::Binding => self.process.signal(sig),
            Kind::Daemon => self.process.signal_group(sig),
        }
    }

    /// True while the binding runs, or anything of the daemon's group:
    /// its children may outlive it.
    pub(crate) fn alive(&self) -> bool {
        match self.kind {
            Kind::Binding => self.process.is_alive(),
            Kind::Daemon => self.process.group_is_alive(),
        }
    }
}

pub(crate) struct Registry {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Registry {
    /// A new, empty registry at `path` (the caller holds the claim on it).
    pub(crate) fn create(path: &Path) -> io::Result<Registry> {
        let registry = Registry {
            path: path.to_path_buf(),
            entries: Vec::new(),
        };
        registry.save()?;
        Ok(registry)
    }

    /// A registry with no file: what is left behind once the real one has
    /// been taken out to be deleted.
    pub(crate) fn detached() -> Registry {
        Registry {
            path: PathBuf::new(),
            entries: Vec::new(),
        }
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub(crate) fn add(&mut self, entry: Entry) -> io::Result<()> {
        self.entries.push(entry);
        self.save()
    }

    pub(crate) fn remove(&mut self, pid: i32) -> io::Result<()> {
        self.entries.retain(|e| e.process.pid != pid);
        self.save()
    }

    /// Writes a temporary file and renames it, so a reader (a sweeper)
    /// never sees half a registry.
    fn save(&self) -> io::Result<()> {
        if self.path.as_os_str().is_empty() {
            return Ok(());
        }
        let tmp = temporary(&self.path);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let text: String = self.entries.iter().map(Entry::line).collect();
        file.write_all(text.as_bytes())?;
        fs::rename(&tmp, &self.path)
    }

    pub(crate) fn delete(self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Where [`Registry::save`] writes before renaming.
fn temporary(path: &Path) -> PathBuf {
    path.with_extension("registry-new")
}

/// Removes the registry file of a dead owner, and the temporary a save
/// cut short by SIGKILL may have left beside it (nothing else would ever
/// remove that one).
pub(crate) fn remove(path: &Path) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(temporary(path));
}

/// Reads a registry file; unreadable lines are skipped.
pub(crate) fn load(path: &Path) -> Vec<Entry> {
    fs::read_to_string(path)
        .map(|text| text.lines().filter_map(Entry::parse).collect())
        .unwrap_or_default()
}

/// How long what is left after SIGKILL may take to die: it cannot refuse,
/// but a process in uninterruptible sleep dies only when it wakes.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Stops every process in `entries` that still runs: SIGTERM, then
/// SIGKILL for whatever is left after `grace`. Returns only when all are
/// gone: a binding once it has exited, a daemon once every member of its
/// process group has (a child deaf to SIGTERM outlives its daemon, and
/// is killed as a member of its group).
pub(crate) fn stop_all(entries: &[Entry], grace: Duration) {
    for entry in entries {
        entry.signal(Signal::SIGTERM);
    }
    if wait_gone(entries, grace) {
        return;
    }
    for entry in entries {
        if entry.alive() && entry.signal(Signal::SIGKILL) {
            log::warn!(
                "{} {} did not stop in time: killed",
                entry.name,
                entry.process.pid
            );
        }
    }
    if !wait_gone(entries, KILL_WAIT) {
        log::warn!("processes still alive after SIGKILL");
    }
}

/// Waits up to `limit` for every entry to be gone.
fn wait_gone(entries: &[Entry], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !entries.iter().any(Entry::alive) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".pool-1.registry");
        let mut reg = Registry::create(&path).unwrap();
        let me = ProcessId::current();
        reg.add(Entry {
            kind: Kind::Daemon,
            process: me,
            name: "dem1".into(),
        })
        .unwrap();
        reg.add(Entry {
            kind: Kind::Binding,
            process: ProcessId { pid: 1, start: 7 },
            name: "dem1".into(),
        })
        .unwrap();
        assert_eq!(load(&path), reg.entries());
        reg.remove(me.pid).unwrap();
        assert_eq!(load(&path).len(), 1);
        reg.delete();
        assert!(load(&path).is_empty());
    }
}
