//! Process identity: a PID *and* its start time.
//!
//! PIDs are reused, so a registry or lock record that names a process by
//! PID alone could make us signal a stranger. Every record stores the start
//! time from `/proc/PID/stat` (field 22, in clock ticks since boot) too, and
//! a process counts as the recorded one only when both match.

use std::fmt;
use std::str::FromStr;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: i32,
    pub start: u64,
}

/// What `/proc/PID/stat` says of a process: its start time, and whether it
/// is a zombie (dead, waiting to be reaped: it holds nothing any more).
fn stat(pid: i32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after the last ')' are plain.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let start = fields.get(19)?.parse().ok()?;
    Some((start, zombie))
}

impl ProcessId {
    pub fn current() -> ProcessId {
        let pid = std::process::id() as i32;
        ProcessId::of(pid).expect("/proc/self/stat is readable")
    }

    /// The identity of the running process `pid`, if there is one.
    pub fn of(pid: i32) -> Option<ProcessId> {
        let (start, _) = stat(pid)?;
        Some(ProcessId { pid, start })
    }

    /// True while the very process this record names is running.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((start, false)) if start == self.start)
    }

    /// Sends `sig` only if the recorded process is still the one running.
    /// Returns whether it was sent.
    pub fn signal(&self, sig: Signal) -> bool {
        self.is_alive() && signal::kill(Pid::from_raw(self.pid), sig).is_ok()
    }

    /// Signals the process group this process leads (a master's daemon and
    /// its children), if the leader is still the recorded process.
    pub fn signal_group(&self, sig: Signal) -> bool {
        self.is_alive() && signal::killpg(Pid::from_raw(self.pid), sig).is_ok()
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.pid, self.start)
    }
}

impl FromStr for ProcessId {
    type Err = ();

    /// Parses the `PID START` form that Display writes.
    fn from_str(s: &str) -> Result<ProcessId, ()> {
        let mut words = s.split_whitespace();
        let pid = words.next().ok_or(())?.parse().map_err(|_| ())?;
        let start = words.next().ok_or(())?.parse().map_err(|_| ())?;
        if pid <= 0 {
            return Err(());
        }
        Ok(ProcessId { pid, start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_round_trips() {
        let me = ProcessId::current();
        assert!(me.is_alive());
        assert_eq!(me.to_string().parse::<ProcessId>(), Ok(me));
    }

    #[test]
    fn a_reused_pid_is_not_the_recorded_process() {
        let me = ProcessId::current();
        let impostor = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!impostor.is_alive());
        assert!(!impostor.signal(Signal::SIGTERM));
    }

    #[test]
    fn garbage_records_are_refused() {
        for bad in ["", "12", "x 3", "-1 4", "0 5"] {
            assert!(bad.parse::<ProcessId>().is_err(), "{bad:?}");
        }
    }
}
