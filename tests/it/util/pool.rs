//! Pools and masters: starting them, the bash consumer pool(1) shows,
//! directories of daemons, and reading their bookkeeping (registries,
//! `.OWNER@PID.*` files, guardians).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{Env, PATIENCE, Spawned, children, run_with_timeout};

pub const POOL: &str = env!("CARGO_BIN_EXE_pool");
pub const MASTER: &str = env!("CARGO_BIN_EXE_master");

impl Env {
    /// Starts `pool ARGS` and waits until it listens.
    pub fn pool(&self, args: &[&str]) -> Spawned {
        let pool = self.spawn(Command::new(POOL).args(args));
        ready(&pool);
        pool
    }

    /// Starts the bash [`consumer`] of pool(1) and waits until its pool
    /// listens.
    pub fn consumer(&self, port: u16, key: &str) -> Spawned {
        let pool = self.spawn_bash(&consumer(port, key));
        ready(&pool);
        pool
    }

    /// Starts `master KEY 127.0.0.1 PORT DDIR`.
    pub fn spawn_master(&self, key: &str, port: impl std::fmt::Display, ddir: &Path) -> Spawned {
        self.spawn_master_with(&[], key, port, ddir)
    }

    /// Starts `master OPTS KEY 127.0.0.1 PORT DDIR`.
    pub fn spawn_master_with(
        &self,
        opts: &[&str],
        key: &str,
        port: impl std::fmt::Display,
        ddir: &Path,
    ) -> Spawned {
        self.spawn(Command::new(MASTER).args(master_args(opts, key, port, ddir)))
    }

    /// Runs `master KEY 127.0.0.1 PORT DDIR` to its end.
    pub fn run_master(&self, key: &str, port: impl std::fmt::Display, ddir: &Path) -> Output {
        self.run_master_with(&[], key, port, ddir)
    }

    /// Runs `master OPTS KEY 127.0.0.1 PORT DDIR` to its end.
    pub fn run_master_with(
        &self,
        opts: &[&str],
        key: &str,
        port: impl std::fmt::Display,
        ddir: &Path,
    ) -> Output {
        run_with_timeout(self.cmd(MASTER).args(master_args(opts, key, port, ddir)))
    }

    /// Starts a master of `ddir` for `pool` (a pool or a [`consumer`]) on
    /// `port`, and returns it once the pool's stdout shows every one of
    /// `seen` (`"m.d1 "`: a stream announced; `"[m.d1] tick"`: a line
    /// read).
    pub fn master_seen(
        &self,
        pool: &Spawned,
        key: &str,
        port: u16,
        ddir: &Path,
        seen: &[&str],
    ) -> Spawned {
        let master = self.spawn_master(key, port, ddir);
        assert!(
            pool.wait_stdout(PATIENCE, |s| seen.iter().all(|n| s.contains(n))),
            "the pool's stdout never showed all of {seen:?}\npool {}\nmaster {}",
            pool.describe(),
            master.describe()
        );
        master
    }

    /// `pool OPTS KEY PORT` on `port` and a master of `ddir` (see
    /// [`Env::master_seen`]): the pool and the master.
    pub fn pool_and_master(
        &self,
        opts: &[&str],
        key: &str,
        port: u16,
        ddir: &Path,
        seen: &[&str],
    ) -> (Spawned, Spawned) {
        let port_arg = port.to_string();
        let pool = self.pool(&[opts, &[key, &port_arg]].concat());
        let master = self.master_seen(&pool, key, port, ddir, seen);
        (pool, master)
    }

    /// [`Env::pool_and_master`] with the bash [`consumer`] as the pool.
    pub fn consumer_and_master(
        &self,
        key: &str,
        port: u16,
        ddir: &Path,
        seen: &[&str],
    ) -> (Spawned, Spawned) {
        let pool = self.consumer(port, key);
        let master = self.master_seen(&pool, key, port, ddir, seen);
        (pool, master)
    }

    /// The PID of the one pool or master (`owner`) running in this
    /// runtime directory, found by its claim `.OWNER@PID.lock`.
    pub fn owner_pid(&self, owner: &str) -> i32 {
        let prefix = format!(".{owner}@");
        fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .find_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_prefix(&prefix)?
                    .strip_suffix(".lock")?
                    .parse::<i32>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no claim of a {owner} in {}", self.dir.display()))
    }

    /// A directory of daemons: (name, bash body) pairs, made executable.
    pub fn daemons(&self, scripts: &[(&str, &str)]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let ddir = self.tmp().join("daemons");
        fs::create_dir_all(&ddir).unwrap();
        for (name, body) in scripts {
            let path = ddir.join(name);
            fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        ddir
    }
}

/// A bash consumer as in pool(1): one reader per daemon, tagging lines;
/// its pool serves one session (`--once`), so that it ends.
pub fn consumer(port: u16, key: &str) -> String {
    format!(
        r#"pool --once {key} {port} | while read -r name port fifo; do
            echo "pool: $name $port $fifo"
            while IFS= read -r line; do echo "[$name] $line"; done < "$fifo" &
        done
        wait"#
    )
}

/// Waits for the pool's log line saying it listens.
pub fn ready(pool: &Spawned) {
    assert!(
        pool.wait_stderr(PATIENCE, |s| s.contains("waiting for a master")),
        "the pool did not start: {}",
        pool.describe()
    );
}

/// One line of a pool's or master's registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegEntry {
    /// `binding` or `daemon`.
    pub kind: String,
    pub pid: i32,
    pub name: String,
}

impl Env {
    /// The bookkeeping file `.OWNER@PID.SUFFIX` of a pool or master
    /// (`owner` "pool" or "master").
    pub fn owner_file(&self, owner: &str, pid: i32, suffix: &str) -> PathBuf {
        self.dir.join(format!(".{owner}@{pid}.{suffix}"))
    }

    /// The entries of the registry of pool or master `pid` (none if the
    /// file is gone).
    pub fn registry(&self, owner: &str, pid: i32) -> Vec<RegEntry> {
        let text = fs::read_to_string(self.owner_file(owner, pid, "registry")).unwrap_or_default();
        text.lines()
            .map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                assert!(words.len() == 4, "registry line {line:?}");
                RegEntry {
                    kind: words[0].to_string(),
                    pid: words[1].parse().unwrap(),
                    name: words[3].to_string(),
                }
            })
            .collect()
    }

    /// The files (and directories) in the runtime directory that belong
    /// to pool or master `pid`: `.OWNER@PID.*`.
    pub fn owner_files(&self, owner: &str, pid: i32) -> Vec<String> {
        let prefix = format!(".{owner}@{pid}.");
        let mut found: Vec<String> = fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with(&prefix) && !n.ends_with(".log"))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }
}

/// The one child of a pool or master that it did not register: its
/// guardian (a fork of itself, so it has the same command line).
pub fn guardian_of(owner: i32, registered: &[RegEntry]) -> i32 {
    let theirs: Vec<i32> = children(owner)
        .into_iter()
        .filter(|c| !registered.iter().any(|e| e.pid == *c))
        .collect();
    assert_eq!(
        theirs.len(),
        1,
        "children of {owner} besides {registered:?}"
    );
    let guardian = theirs[0];
    assert_eq!(
        fs::read(format!("/proc/{guardian}/cmdline")).unwrap(),
        fs::read(format!("/proc/{owner}/cmdline")).unwrap(),
        "the guardian is a fork of its owner"
    );
    guardian
}

/// A master's arguments (`OPTS` first) for the pool on this machine's
/// `port`; its session is named `m`, so its daemons' streams are
/// `m.DAEMON`.
fn master_args(opts: &[&str], key: &str, port: impl std::fmt::Display, ddir: &Path) -> Vec<String> {
    let (port, ddir) = (port.to_string(), ddir.to_str().unwrap());
    [&["--name", "m"], opts, &[key, "127.0.0.1", &port, ddir]]
        .concat()
        .into_iter()
        .map(String::from)
        .collect()
}
