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
pub(crate) struct ProcessId {
    pub(crate) pid: i32,
    pub(crate) start: u64,
}

/// What `/proc/PID/stat` says of a process: its start time, and whether it
/// is a zombie (dead, waiting to be reaped: it holds nothing any more).
fn stat(pid: i32) -> Option<(u64, bool)> {
    stat_full(pid).map(|s| (s.start, s.zombie))
}

struct Stat {
    start: u64,
    zombie: bool,
    group: i32,
    session: i32,
}

/// A /proc file read in one read(2) or two: procfs reports a size of 0,
/// so `fs::read_to_string` would stat it, ask its position and then grow
/// its buffer from 32 bytes: nine system calls for one stat line (on
/// every start, and for every process a sweep looks at), four here.
pub(crate) fn read_proc(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(2 * len, 0);
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    // The command name may be any bytes; only the fields after it count.
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn stat_full(pid: i32) -> Option<Stat> {
    let text = read_proc(&format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after the last ')' are plain.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let group = fields.get(2)?.parse().ok()?;
    let session = fields.get(3)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some(Stat {
        start,
        zombie,
        group,
        session,
    })
}

/// The members of process group `pgid`, zombies included.
fn group_members(pgid: i32) -> Vec<Stat> {
    // Cheap first: no member at all.
    if signal::killpg(Pid::from_raw(pgid), None).is_err() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat_full)
        .filter(|s| s.group == pgid)
        .collect()
}

impl ProcessId {
    #[cfg(test)]
    pub(crate) fn current() -> ProcessId {
        ProcessId::try_current().expect("/proc/self/stat is readable")
    }

    /// This process's identity, or why `/proc/self/stat` cannot be read
    /// (out of descriptors, say).
    pub(crate) fn try_current() -> std::io::Result<ProcessId> {
        let pid = std::process::id() as i32;
        let text = read_proc("/proc/self/stat")?;
        let start = text
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(19)?.parse().ok())
            .ok_or_else(|| std::io::Error::other("unreadable /proc/self/stat"))?;
        Ok(ProcessId { pid, start })
    }

    /// The identity of the running process `pid`, if there is one.
    pub(crate) fn of(pid: i32) -> Option<ProcessId> {
        let (start, _) = stat(pid)?;
        Some(ProcessId { pid, start })
    }

    /// True while the very process this record names is running.
    pub(crate) fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((start, false)) if start == self.start)
    }

    /// Sends `sig` only if the recorded process is still the one running.
    /// Returns whether it was sent.
    pub(crate) fn signal(&self, sig: Signal) -> bool {
        self.is_alive() && signal::kill(Pid::from_raw(self.pid), sig).is_ok()
    }

    /// Whether the process group this process was started to lead (a
    /// master's daemon) is still the one of that ID, given its members.
    ///
    /// While the leader runs, or is a zombie, its PID is taken: the group
    /// is ours exactly when the leader is the recorded process. Once the
    /// leader is gone the group lives on in its children (checking the
    /// leader alone, as before, let a daemon's child deaf to SIGTERM
    /// escape the SIGKILL and outlive its master). The kernel hands out no
    /// PID that is still a group's ID, so that group is the daemon's unless
    /// the number came free and was taken by a new group since, whose own
    /// leader died too (a double-forked daemon's group is such). A group
    /// never spans sessions, and a daemon stays in its master's: so a
    /// leaderless group counts as ours only in the session we run in (the
    /// master, its guardian, a command started beside it). A stale
    /// registry swept from another session never touches one.
    fn group_is_ours(&self, members: &[Stat]) -> bool {
        match stat(self.pid) {
            Some((start, _)) => start == self.start,
            None => {
                let ours = nix::unistd::getsid(None).ok().map(|s| s.as_raw());
                members.first().is_some_and(|m| Some(m.session) == ours)
            }
        }
    }

    /// Signals the process group this process leads (a master's daemon and
    /// its children), leader or no leader, while it is still the daemon's
    /// (see `group_is_ours`).
    pub(crate) fn signal_group(&self, sig: Signal) -> bool {
        self.group_is_ours(&group_members(self.pid))
            && signal::killpg(Pid::from_raw(self.pid), sig).is_ok()
    }

    /// True while any member of the process group this process leads runs
    /// (zombies do not count).
    pub(crate) fn group_is_alive(&self) -> bool {
        let members = group_members(self.pid);
        self.group_is_ours(&members) && members.iter().any(|m| !m.zombie)
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
        // Nor is its group: our own process group must not be touched.
        assert!(!impostor.signal_group(Signal::SIGTERM));
        assert!(!impostor.group_is_alive());
    }

    /// A shell that leads a new process group, leaves a `sleep` in it and
    /// exits (reaped at once): a group whose leader is gone. With `session`
    /// it leads a new session too, as a double-forked daemon's starter
    /// does. Returns the group's ID.
    fn leaderless_group(session: bool) -> i32 {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 30 >/dev/null 2>&1 & echo $$"]);
        // SAFETY: setsid and setpgid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if session {
                    libc::setsid()
                } else {
                    libc::setpgid(0, 0)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_group_outlives_its_leader_in_our_session_only() {
        // In our session (a master's daemon): still the daemon's group.
        let pgid = leaderless_group(false);
        let daemon = ProcessId {
            pid: pgid,
            start: 1,
        };
        assert!(daemon.group_is_alive());
        assert!(daemon.signal_group(Signal::SIGKILL));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while daemon.group_is_alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!daemon.group_is_alive());

        // In another session (a stale record whose number now names a
        // stranger's group): never touched.
        let pgid = leaderless_group(true);
        let stale = ProcessId {
            pid: pgid,
            start: 1,
        };
        assert!(!stale.group_is_alive());
        assert!(!stale.signal_group(Signal::SIGKILL));
        assert!(
            signal::killpg(Pid::from_raw(pgid), None).is_ok(),
            "the stranger lives"
        );
        let _ = signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }

    #[test]
    fn garbage_records_are_refused() {
        for bad in ["", "12", "x 3", "-1 4", "0 5"] {
            assert!(bad.parse::<ProcessId>().is_err(), "{bad:?}");
        }
    }
}
