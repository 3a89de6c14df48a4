//! Processes seen through /proc, for asserting that nothing is left
//! behind and for measuring what a binding costs: the tracking itself is
//! tests/support/procs.rs, the one copy the benchmark shares; here is
//! what only the tests use on top of it.

use std::sync::atomic::Ordering;
use std::time::Duration;

#[path = "../../support/procs.rs"]
mod shared;
pub use shared::{alive, children, group_members, kill, wait_gone};
pub(super) use shared::{kill_with_env, with_env};

use shared::rss_kib;

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
    shared::cpu_seconds(pid).map(Duration::from_secs_f64)
}
