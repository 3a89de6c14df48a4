//! `fifobind list`: what runs in the runtime directory, with its figures.
//!
//! It reads the status files the bindings, pools and masters publish (see
//! [`crate::status`]), after a sweep, so that what it shows is alive: a
//! file whose process is not the one recorded is never shown. Whether a
//! reader or writer holds a binding's FIFO is found here, not published:
//! through `/proc/*/fd` of the processes this user may see, so the
//! bindings pay nothing for it.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::process::ProcessId;
use crate::runtime_dir::{self, RuntimeDir};

#[derive(clap::Args, Debug)]
pub(crate) struct ListArgs {
    /// Print one JSON array of objects, for scripts (fields in fifobind(1))
    #[arg(long)]
    pub(crate) json: bool,

    /// Print the names only, one a line (for shell completion)
    #[arg(long, hide = true, conflicts_with = "json")]
    pub(crate) names: bool,
}

/// Everything live in the runtime directory: one JSON object each, as
/// `--json` prints them, in name order (a master's bindings after it).
pub(crate) fn entries() -> Result<Vec<Map<String, Value>>> {
    let path = runtime_dir::locate();
    if !path.exists() {
        return Ok(Vec::new());
    }
    let dir = RuntimeDir::open()?;
    crate::sweep::sweep(&dir);
    let mut found = Vec::new();
    collect(dir.path(), None, &mut found);
    let holders = fifo_holders(&found);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for entry in &mut found {
        let pid = entry.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32;
        let (reader, writer) = match entry.get("fifo").and_then(Value::as_str) {
            Some(fifo) => {
                let modes = holders.get(fifo).map(Vec::as_slice).unwrap_or(&[]);
                let others = modes.iter().filter(|(p, _)| *p != pid);
                let (mut r, mut w) = (false, false);
                for (_, mode) in others {
                    r |= *mode != libc::O_WRONLY;
                    w |= *mode != libc::O_RDONLY;
                }
                (Value::from(r), Value::from(w))
            }
            None => (Value::Null, Value::Null),
        };
        entry.insert("reader".into(), reader);
        entry.insert("writer".into(), writer);
        let since = entry.get("since").and_then(Value::as_u64).unwrap_or(now);
        entry.insert("age".into(), now.saturating_sub(since).into());
    }
    Ok(found)
}

/// The status files of `dir` whose process is alive; a master's private
/// directory (`.master@PID.d`) is searched too, its bindings marked with
/// their owner.
fn collect(dir: &Path, owner: Option<&str>, found: &mut Vec<Map<String, Value>>) {
    let Ok(list) = fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<String> = list
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    for name in &names {
        let Some(stem) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".status"))
        else {
            continue;
        };
        let Ok(text) = fs::read_to_string(dir.join(name)) else {
            continue;
        };
        let Ok(Value::Object(mut entry)) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let pid = entry.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32;
        let start = entry.get("start").and_then(Value::as_u64).unwrap_or(0);
        if !(ProcessId { pid, start }).is_alive() {
            continue;
        }
        entry.insert("owner".into(), owner.into());
        found.push(entry);
        let private = dir.join(format!(".{stem}.d"));
        if owner.is_none() && stem.starts_with("master@") && private.is_dir() {
            collect(&private, Some(stem), found);
        }
    }
}

/// For each FIFO of `entries`: the processes that hold it open, with the
/// access mode (`O_RDONLY`, `O_WRONLY` or `O_RDWR`) of each descriptor.
fn fifo_holders(entries: &[Map<String, Value>]) -> HashMap<String, Vec<(i32, i32)>> {
    let mut by_inode: HashMap<(u64, u64), String> = HashMap::new();
    for e in entries {
        if let Some(fifo) = e.get("fifo").and_then(Value::as_str)
            && let Ok(meta) = fs::metadata(fifo)
        {
            by_inode.insert((meta.dev(), meta.ino()), fifo.to_string());
        }
    }
    let mut holders: HashMap<String, Vec<(i32, i32)>> = HashMap::new();
    if by_inode.is_empty() {
        return holders;
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return holders;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(meta) = fs::metadata(fd.path()) else {
                continue;
            };
            let Some(fifo) = by_inode.get(&(meta.dev(), meta.ino())) else {
                continue;
            };
            let info = p.path().join("fdinfo").join(fd.file_name());
            let mode = fs::read_to_string(info)
                .ok()
                .and_then(|t| {
                    let flags = t.lines().find_map(|l| l.strip_prefix("flags:"))?;
                    i32::from_str_radix(flags.trim(), 8).ok()
                })
                .map(|f| f & libc::O_ACCMODE)
                .unwrap_or(libc::O_RDWR);
            holders.entry(fifo.clone()).or_default().push((pid, mode));
        }
    }
    holders
}

pub(crate) fn run(args: ListArgs) -> Result<()> {
    let found = entries()?;
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        let array = Value::Array(found.into_iter().map(Value::Object).collect());
        array.to_string() + "\n"
    } else if args.names {
        names_of(&found)
    } else {
        table(&found)
    };
    match out.write_all(text.as_bytes()) {
        // A reader that stopped reading (`| head`) is not our failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("cannot write the list", &e)),
        Ok(()) => Ok(()),
    }
}

fn names_of(found: &[Map<String, Value>]) -> String {
    found
        .iter()
        .filter(|e| e.get("owner").is_none_or(Value::is_null))
        .filter_map(|e| e.get("id").and_then(Value::as_str))
        .map(|n| format!("{n}\n"))
        .collect()
}

fn field(e: &Map<String, Value>, key: &str) -> String {
    match e.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "yes".into(),
        Some(Value::Bool(false)) => "no".into(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    }
}

/// The human form: one line per entry, columns aligned.
fn table(found: &[Map<String, Value>]) -> String {
    const HEAD: [&str; 10] = [
        "ID", "KIND", "PID", "PORT", "PEERS", "IN", "OUT", "READER", "WRITER", "AGE",
    ];
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|e| {
            let id = match e.get("owner").and_then(Value::as_str) {
                Some(owner) => format!("{owner}/{}", field(e, "id")),
                None => field(e, "id"),
            };
            vec![
                id,
                field(e, "kind"),
                field(e, "pid"),
                field(e, "port"),
                field(e, "peers"),
                field(e, "bytes_in"),
                field(e, "bytes_out"),
                field(e, "reader"),
                field(e, "writer"),
                format!("{}s", field(e, "age")),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = HEAD.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut text = String::new();
    let head: Vec<String> = HEAD.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&head).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}
