//! Reclaiming what dead owners left in the runtime directory.
//!
//! SIGKILL leaves a FIFO, a claim file, perhaps a registry and live
//! children behind. Every command sweeps the runtime directory when it
//! starts: a name whose claim lock is free has no live owner, so its FIFO,
//! claim and registry go, and the processes its registry still names are
//! stopped. Stale is never "in use".
//!
//! Pools and masters sweep before anything else. A binding reclaims its
//! own name at once (through its claim) and sweeps the rest right after
//! it has reported ready: `pid=$(bind-input ...)` does not wait for a
//! sweep of a directory that may hold hundreds of other bindings.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirEntryExt, FileTypeExt};
use std::path::Path;
use std::time::Duration;

use crate::args::Id;
use crate::claim::Claim;
use crate::registry;
use crate::runtime_dir::RuntimeDir;

/// How long the processes of a dead owner get to close properly.
const GRACE: Duration = Duration::from_secs(1);
pub(crate) fn sweep(dir: &RuntimeDir) {
    let Ok(entries) = fs::read_dir(dir.path()) else {
        return;
    };
    let locked = locked_inodes(dir.dev());
    let mut names = Vec::new();
    // Owners whose claim is locked this instant: alive, nothing to do.
    let mut held = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        if let Some(owner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".lock"))
            && locked.as_ref().is_some_and(|l| l.contains(&entry.ino()))
        {
            held.push(owner.to_string());
            continue;
        }
        if let Some(owner) = name.strip_prefix('.').and_then(|n| {
            n.strip_suffix(".lock")
                .or_else(|| n.strip_suffix(".status"))
        }) {
            names.push(owner.to_string());
        } else if name.parse::<Id>().is_ok() && entry.file_type().is_ok_and(|t| t.is_fifo()) {
            names.push(name.to_string());
        }
    }
    names.sort();
    names.dedup();
    held.sort();
    names.retain(|n| held.binary_search(n).is_err());
    for name in names {
        reclaim(dir, &name);
    }
}

/// The inodes of the files on device `dev` that someone holds a
/// flock(2) lock on right now, from /proc/locks; None if it cannot be
/// read. Only a hint that saves the sweep an open, a flock and a close
/// per live name (a directory of 500 bindings swept by each of 500
/// starts): a claim locked at this instant has a live owner, which is
/// what taking it would have said. Names not in it are checked by taking
/// their claim, as ever; an inode of another device with the same number
/// (a file system whose locks show another device number than stat, or a
/// collision) only means no shortcut.
fn locked_inodes(dev: u64) -> Option<HashSet<u64>> {
    let (major, minor) = (
        nix::sys::stat::major(dev as libc::dev_t),
        nix::sys::stat::minor(dev as libc::dev_t),
    );
    // As fs/locks.c prints it: "%02x:%02x:%lu".
    let prefix = format!("{major:02x}:{minor:02x}:");
    let text = crate::process::read_proc("/proc/locks").ok()?;
    let mut inodes = HashSet::new();
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1364 fe:00:10068289 0 EOF"; a
        // waiter's line is "1: -> FLOCK ..." and holds nothing.
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&"FLOCK") {
            continue;
        }
        if let Some(ino) = f.get(5).and_then(|d| d.strip_prefix(&prefix))
            && let Ok(ino) = ino.parse()
        {
            inodes.insert(ino);
        }
    }
    Some(inodes)
}

/// Reclaims `name` if its owner is dead; leaves it alone otherwise.
fn reclaim(dir: &RuntimeDir, name: &str) {
    let claim_path = dir.dotfile(name, "lock");
    // A claim file we would have to create for a FIFO with none is fine:
    // the FIFO's owner always claims before creating it.
    let Ok(claim) = Claim::take_now(&claim_path) else {
        return;
    };
    log::info!("reclaiming {name}: its owner is gone");
    let registry_path = dir.dotfile(name, "registry");
    let leftovers = registry::load(&registry_path);
    if !leftovers.is_empty() {
        registry::stop_all(&leftovers, GRACE);
    }
    registry::remove(&registry_path);
    crate::status::remove(dir.path(), name);
    let session = dir.dotfile(name, "d");
    if session.is_dir() {
        if let Ok(inner) = RuntimeDir::at(&session) {
            sweep(&inner);
        }
        let _ = fs::remove_dir_all(&session);
    }
    if name.parse::<Id>().is_ok() {
        remove_fifo(&dir.path().join(name));
    }
    claim.release();
}

fn remove_fifo(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The hint names a held claim (where the file system's locks carry
    /// the device number stat gives) and never a released one.
    #[test]
    fn locked_inodes_hold_a_held_claim_and_not_a_released_one() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(".x.lock");
        let claim = Claim::take(&path).ok().unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        let dev = fs::metadata(tmp.path()).unwrap().dev();
        let held = locked_inodes(dev).expect("/proc/locks is readable");
        // Any lock of ours at all under this device: then ours must be there.
        let prefix = format!(
            "{:02x}:{:02x}:",
            nix::sys::stat::major(dev as libc::dev_t),
            nix::sys::stat::minor(dev as libc::dev_t)
        );
        let me = std::process::id().to_string();
        let ours_listed = crate::process::read_proc("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains(&format!(" {me} {prefix}")));
        if ours_listed {
            assert!(held.contains(&ino), "held claim {ino} not in {held:?}");
        }
        drop(claim);
        let after = locked_inodes(dev).unwrap();
        assert!(!after.contains(&ino), "a released claim is still locked");
    }
}
