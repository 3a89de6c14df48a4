//! Processes seen through /proc: alive or gone, children and process
//! groups, resident memory and CPU time, for asserting that nothing is left
//! behind and for measuring what a binding costs.

use std::fs;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::wait_for;

const PARENT: usize = 1;
const GROUP: usize = 2;

/// True unless the process is gone or a zombie.
pub fn alive(pid: i32) -> bool {
    stat_fields(pid)
        .is_some_and(|f| matches!(f.first().map(String::as_str), Some(s) if s != "Z" && s != "X"))
}

/// Waits until process `pid` is gone (or a zombie); false if it still
/// runs after `limit`.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    wait_for(limit, || !alive(pid))
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, sig) };
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is the
/// state, [`PARENT`] the parent PID, [`GROUP`] the process group.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

pub fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect()
}

/// The live (not zombie) children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    live_with(PARENT, pid)
}

/// The live members of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    live_with(GROUP, pgid)
}

/// The live processes whose stat field `field` is `value`.
fn live_with(field: usize, value: i32) -> Vec<i32> {
    let value = value.to_string();
    all_pids()
        .into_iter()
        .filter(|&p| alive(p) && stat_fields(p).is_some_and(|f| f.get(field) == Some(&value)))
        .collect()
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's resident memory every few milliseconds, in a
/// thread, and keeps the largest value seen.
pub struct RssSampler {
    max: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: i32) -> RssSampler {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let max = std::sync::Arc::new(AtomicU64::new(rss_kib(pid).expect("the process runs")));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    m.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        RssSampler {
            max,
            stop,
            thread: Some(thread),
        }
    }

    /// The largest resident size seen so far, in KiB.
    pub fn max_kib(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// Stops sampling; returns the largest resident size seen, in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.max_kib()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let fields = stat_fields(pid)?;
    // utime and stime: fields 14 and 15 of the stat line, in clock ticks.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}
