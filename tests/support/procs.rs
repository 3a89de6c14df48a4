//! Process tracking shared by the tests and the benchmark (one copy,
//! pulled in with `#[path]` by `tests/it/util.rs` and `benches/bench.rs`):
//! whether a process lives, its children, the processes a run started
//! (found by a variable in their environment, since daemonized bindings
//! are nobody's children), killing them, and their memory and CPU, all
//! read from /proc.

use std::fs;
use std::time::{Duration, Instant};

/// Fields of `/proc/PID/stat` after the command name: index 0 is the
/// state, 1 the parent PID, 2 the process group, 11 utime, 12 stime, 19
/// the start time.
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// True unless the process is gone or a zombie.
pub fn alive(pid: i32) -> bool {
    stat_fields(pid)
        .is_some_and(|f| !matches!(f.first().map(String::as_str), Some("Z" | "X") | None))
}

/// Waits until `pid` is gone (or a zombie); false if it still runs after
/// `limit`.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, sig) };
}

pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The live (not zombie) children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    live_where(1, pid)
}

/// The live members of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    live_where(2, pgid)
}

/// The live processes whose stat field `index` (see [`stat_fields`]) is
/// `value`.
fn live_where(index: usize, value: i32) -> Vec<i32> {
    let value = value.to_string();
    all_pids()
        .into_iter()
        .filter(|&p| alive(p) && stat_fields(p).is_some_and(|f| f.get(index) == Some(&value)))
        .collect()
}

/// Every live process but this one whose environment holds `var` (a
/// whole `NAME=value` entry, or its start).
pub fn with_env(var: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me && alive(pid))
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|v| v.starts_with(var.as_bytes()))
            })
        })
        .collect()
}

/// Kills (SIGKILL) every process whose environment holds `var`, a few
/// times over, since a dying parent may still fork; returns what is left.
pub fn kill_with_env(var: &str) -> Vec<i32> {
    for _ in 0..3 {
        let procs = with_env(var);
        if procs.is_empty() {
            break;
        }
        for pid in procs {
            kill(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    with_env(var)
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time a live process has used so far, all its threads (utime +
/// stime of `/proc/PID/stat`, in clock ticks turned into seconds).
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf cannot fail for _SC_CLK_TCK.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}
