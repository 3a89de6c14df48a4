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

use std::fs;
use std::os::unix::fs::FileTypeExt;
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
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
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
    for name in names {
        reclaim(dir, &name);
    }
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
