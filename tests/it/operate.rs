//! Operating the commands: service managers (readiness on NOTIFY_SOCKET
//! and --ready-fd, socket activation, journal logging) and the `fifobind`
//! command (list, stop, completions).

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// A test's NOTIFY_SOCKET: a datagram socket bound in its temp dir.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new(env: &Env) -> NotifySocket {
        let path = env.tmp().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next message, waiting at most `limit`.
    fn recv(&self, limit: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).to_string()),
            Err(_) => None,
        }
    }

    /// Messages until one has a line `wanted`, at most [`PATIENCE`].
    fn wait_for(&self, wanted: &str) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(m) = self.recv(left) else { break };
            let done = m.lines().any(|l| l == wanted);
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!("no {wanted:?} on NOTIFY_SOCKET; got {seen:?}");
    }
}

/// Gives the child `fd` as descriptor `target`.
fn pass_fd(cmd: &mut Command, fd: &OwnedFd, target: i32) {
    let raw = fd.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it also clears close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if raw == target {
                libc::fcntl(raw, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, target)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The `MAINPID=` of a notification.
fn main_pid(message: &str) -> Option<i32> {
    message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
}

#[test]
fn foreground_bind_input_says_ready_on_notify_socket_once_it_listens_and_stopping_on_sigterm() {
    let env = Env::new();
    let notify = NotifySocket::new(&env);
    let port = free_port();
    let mut binding = env.spawn(
        Command::new(BIND_INPUT)
            .args(["--foreground", "in1", &port.to_string()])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    let seen = notify.wait_for("READY=1");
    // No retry: READY=1 means the port listens now.
    TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| {
        panic!(
            "READY=1 ({seen:?}) but connect failed: {e}\n{}",
            binding.describe()
        )
    });
    assert_eq!(
        main_pid(seen.last().unwrap()),
        Some(binding.pid()),
        "{seen:?}"
    );
    assert!(env.fifo("in1").exists(), "READY=1 before the FIFO exists");
    kill(binding.pid(), libc::SIGTERM);
    notify.wait_for("STOPPING=1");
    binding.assert_ends_ok();
    env.assert_clean();
}

#[test]
fn pool_says_ready_once_listening_and_its_bindings_never_speak_for_it() {
    let env = Env::new();
    let notify = NotifySocket::new(&env);
    let port = free_port();
    let mut pool = env.spawn(
        Command::new(POOL)
            .args(["--once", "k3y", &port.to_string()])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    let seen = notify.wait_for("READY=1");
    TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("READY=1 but connect failed: {e}\n{}", pool.describe()));
    assert!(
        seen.iter()
            .all(|m| main_pid(m).is_none_or(|p| p == pool.pid())),
        "{seen:?}"
    );
    let ddir = env.daemons(&[("d1", "echo one"), ("d2", "echo two")]);
    let out = env.run_master("k3y", port, &ddir);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(read_lines(&env.fifo("m.d1"), 1), ["one"]);
    assert_eq!(read_lines(&env.fifo("m.d2"), 1), ["two"]);
    pool.assert_ends_ok();
    // Whatever else arrived came from the pool itself, never from one of
    // the bindings it started (they must not inherit NOTIFY_SOCKET).
    while let Some(m) = notify.recv(Duration::from_millis(100)) {
        assert!(
            !m.contains("READY=1") || main_pid(&m) == Some(pool.pid()),
            "a binding of the pool spoke for it: {m:?}"
        );
    }
    env.assert_clean();
}

/// Runs `program ARGS` with the write end of a pipe as descriptor 3 and
/// `--ready-fd 3`; returns the process and the read end.
fn with_ready_fd(env: &Env, program: &str, args: &[&str]) -> (Spawned, std::fs::File) {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut cmd = Command::new(program);
    cmd.arg("--ready-fd").arg("3").args(args);
    pass_fd(&mut cmd, &write, 3);
    let spawned = env.spawn(&mut cmd);
    drop(write);
    (spawned, std::fs::File::from(read))
}

/// Reads the ready pipe to its end (the process closes its end once
/// ready): exactly one newline.
fn read_ready(pipe: &mut std::fs::File) -> String {
    let mut text = String::new();
    pipe.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn ready_fd_gets_one_newline_and_is_closed_once_bind_input_and_pool_listen() {
    let env = Env::new();
    let port = free_port();
    let (mut binding, mut pipe) = with_ready_fd(
        &env,
        BIND_INPUT,
        &["--foreground", "in1", &port.to_string()],
    );
    // End-of-file here while the binding runs: it closed its end.
    assert_eq!(read_ready(&mut pipe), "\n", "{}", binding.describe());
    assert!(alive(binding.pid()));
    TcpStream::connect(("127.0.0.1", port)).expect("ready means listening");
    kill(binding.pid(), libc::SIGTERM);
    binding.assert_ends_ok();

    let port = free_port();
    let (mut pool, mut pipe) = with_ready_fd(&env, POOL, &["k3y", &port.to_string()]);
    assert_eq!(read_ready(&mut pipe), "\n", "{}", pool.describe());
    TcpStream::connect(("127.0.0.1", port)).expect("ready means listening");
    pool.stop(libc::SIGTERM);
    env.assert_clean();
}

#[test]
fn ready_fd_that_is_not_open_or_without_foreground_is_a_usage_error() {
    let env = Env::new();
    let port = free_port().to_string();
    let out = env.run(BIND_INPUT, &["--ready-fd", "3", "in1", &port]);
    assert_fails(&out, 2, "--foreground");
    let out = env.run(BIND_INPUT, &["-f", "--ready-fd", "9", "in1", &port]);
    assert_fails(&out, 2, "--ready-fd 9");
    let out = env.run(POOL, &["--ready-fd", "1", "k", &port]);
    assert_fails(&out, 2, "--ready-fd 1");
    assert!(!env.dir.join("in1").exists());
}

// ---------------------------------------------------------------------
// Socket activation.

/// Whether `systemd-socket-activate` can run here; prints why a test
/// skips when not.
fn has_socket_activate() -> bool {
    let ok = Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("skipped: systemd-socket-activate is missing (Debian package systemd)");
    }
    ok
}

/// `systemd-socket-activate -l 127.0.0.1:PORT COMMAND…`, passing this
/// test's runtime directory; waits until it listens. The command starts
/// on the first connection, as under a `.socket` unit.
fn socket_activate(env: &Env, port: u16, command: &[&str]) -> Spawned {
    let spawned = env.spawn(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-E")
            .arg(format!("FIFOBIND_DIR={}", env.dir.display()))
            .args(["-E", "RUST_LOG=debug", "-E"])
            .arg(format!("PATH={}", path_with_bins()))
            .args(command),
    );
    assert!(
        spawned.wait_stderr(PATIENCE, |s| s.contains("Listening on")),
        "{}",
        spawned.describe()
    );
    spawned
}

#[test]
fn bind_input_serves_the_socket_of_systemd_socket_activate_and_the_first_connection() {
    if !has_socket_activate() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let p = port.to_string();
    let mut binding = socket_activate(&env, port, &[BIND_INPUT, "-f", "in1", &p]);
    // This connection starts the binding; it waits in the backlog of the
    // socket the binding inherits, and is served by it.
    send(port, b"before the binding ran\n");
    assert!(
        wait_for(PATIENCE, || env.fifo("in1").exists()),
        "{}",
        binding.describe()
    );
    let mut fifo = std::fs::File::open(env.fifo("in1")).unwrap();
    send(port, b"after\n");
    assert_eq!(
        read_lines_from(&mut fifo, 2),
        ["before the binding ran", "after"],
        "{}",
        binding.describe()
    );
    kill(binding.pid(), libc::SIGTERM);
    binding.assert_ends_ok();
    env.assert_clean();
}

#[test]
fn pool_serves_the_socket_of_systemd_socket_activate() {
    if !has_socket_activate() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let p = port.to_string();
    let mut pool = socket_activate(&env, port, &[POOL, "--once", "k3y", &p]);
    let ddir = env.daemons(&[("d1", "echo one")]);
    let out = env.run_master("k3y", port, &ddir);
    assert_ran_ok(&out, &pool);
    assert_eq!(read_lines(&env.fifo("m.d1"), 1), ["one"]);
    pool.assert_ends_ok();
    assert!(pool.stdout().starts_with("m.d1 "), "{}", pool.describe());
    env.assert_clean();
}

/// The sockets `pid` holds, as /proc names them (`socket:[INODE]`).
fn sockets_of(pid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().to_string())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

#[test]
fn a_socket_activated_pools_guardian_does_not_hold_the_socket() {
    if !has_socket_activate() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let p = port.to_string();
    let mut pool = socket_activate(&env, port, &[POOL, "k3y", &p]);
    // The first connection starts it (and is then turned away).
    let _first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        pool.wait_stderr(PATIENCE, |s| s.contains("waiting for a master")),
        "{}",
        pool.describe()
    );
    let listening = std::fs::read_link(format!("/proc/{}/fd/3", pool.pid()))
        .map(|l| l.to_string_lossy().to_string())
        .unwrap();
    assert!(listening.starts_with("socket:"), "{listening}");
    // The guardian is forked before the pool listens: its only child now.
    let mut guardian = Vec::new();
    assert!(
        wait_for(PATIENCE, || {
            guardian = children(pool.pid());
            guardian.len() == 1
        }),
        "{guardian:?}"
    );
    let held = sockets_of(guardian[0]);
    assert!(
        !held.contains(&listening),
        "the guardian {} holds the pool's socket {listening}: {held:?}",
        guardian[0]
    );
    kill(pool.pid(), libc::SIGTERM);
    let status = pool.wait(PATIENCE).expect("the pool ends");
    assert_eq!(status.code(), Some(143), "{}", pool.describe());
    env.assert_clean();
}

#[test]
fn a_socket_activated_binding_on_another_port_than_its_port_argument_is_refused() {
    if !has_socket_activate() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let other = free_port().to_string();
    let mut binding = socket_activate(&env, port, &[BIND_INPUT, "-f", "in1", &other]);
    let _ = TcpStream::connect(("127.0.0.1", port));
    let status = binding.wait(PATIENCE).expect("it ends");
    assert_eq!(status.code(), Some(2), "{}", binding.describe());
    assert!(
        binding.stderr().contains(&format!("not on PORT {other}")),
        "{}",
        binding.describe()
    );
    env.assert_clean();
}

// ---------------------------------------------------------------------
// Logging.

/// Lines of `text` that do not begin with a `<N>` priority.
fn unprefixed(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            let b = l.as_bytes();
            !(b.len() > 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>')
        })
        .collect()
}

#[test]
fn under_journal_stream_lines_carry_priorities_and_no_timestamp_of_their_own() {
    let env = Env::new();
    let port = free_port();
    // JOURNAL_STREAM names stderr, as systemd sets it.
    let mut binding = env.spawn_bash(&format!(
        "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec bind-input -f in1 {port}"
    ));
    assert!(
        binding.wait_stderr(PATIENCE, |s| s.contains("listening on port")),
        "{}",
        binding.describe()
    );
    send(port, b"x\n");
    assert!(binding.wait_stderr(PATIENCE, |s| s.contains("<6>connection from")));
    kill(binding.pid(), libc::SIGTERM);
    binding.assert_ends_ok();
    let err = binding.stderr();
    assert!(unprefixed(&err).is_empty(), "{err}");
    assert!(err.contains("<6>in1 listening on port"), "{err}");
    assert!(
        !err.contains(" INFO") && !err.contains("T1") && !err.contains("Z "),
        "{err}"
    );

    // A JOURNAL_STREAM that is not stderr (inherited by a process whose
    // stderr went elsewhere) changes nothing.
    let port = free_port();
    let mut binding = env.spawn_bash(&format!("JOURNAL_STREAM=1:1 exec bind-input -f in1 {port}"));
    assert!(binding.wait_stderr(PATIENCE, |s| s.contains("listening on port")));
    kill(binding.pid(), libc::SIGTERM);
    binding.assert_ends_ok();
    assert!(
        binding.stderr().contains(" INFO: in1 listening"),
        "{}",
        binding.describe()
    );
    env.assert_clean();
}

#[test]
fn a_pool_and_its_bindings_log_with_priorities_under_journal_stream() {
    let env = Env::new();
    let port = free_port();
    let mut pool = env.spawn_bash(&format!(
        "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec pool --once k3y {port}"
    ));
    ready(&pool);
    let ddir = env.daemons(&[("d1", "echo one")]);
    let out = env.run_master("k3y", port, &ddir);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(read_lines(&env.fifo("m.d1"), 1), ["one"]);
    pool.assert_ends_ok();
    let err = pool.stderr();
    assert!(unprefixed(&err).is_empty(), "{err}");
    // The binding's own line, through the stream it inherited.
    assert!(err.contains("<6>m.d1 listening on port"), "{err}");
    env.assert_clean();
}

#[test]
fn a_daemonized_bindings_log_is_capped_with_one_rotation() {
    let env = Env::new();
    let port = free_port();
    let out = run_with_timeout(
        env.cmd(BIND_INPUT)
            .env("FIFOBIND_LOG_MAX", "2000")
            .args(["in1", &port.to_string()]),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let binding = env.binding(printed_pid(&out));
    let log = env.dir.join(".in1.log");
    let old = env.dir.join(".in1.log.1");
    let mut fifo = std::fs::File::open(env.fifo("in1")).unwrap();
    // Each connection logs two lines of some 80 bytes.
    for i in 0..60 {
        send(port, format!("line {i}\n").as_bytes());
    }
    assert_eq!(read_lines_from(&mut fifo, 60).len(), 60);
    assert!(
        wait_for(PATIENCE, || old.exists()),
        "no rotation: {}",
        env.logs()
    );
    binding.stop(libc::SIGTERM);
    for path in [&log, &old] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            !text.is_empty() && text.len() <= 2000,
            "{}: {} bytes",
            path.display(),
            text.len()
        );
        // Whole records only: each line a timestamped one.
        assert!(text.ends_with('\n'));
        assert!(
            text.lines()
                .all(|l| l.starts_with("20") && l.contains(" bind-input[")),
            "{text}"
        );
    }
    env.assert_clean();
}

// ---------------------------------------------------------------------
// fifobind list, stop, completions.

pub const FIFOBIND: &str = env!("CARGO_BIN_EXE_fifobind");

/// `fifobind list --json`, parsed: the entries by name.
fn list(env: &Env) -> Vec<serde_json::Value> {
    let out = env.run(FIFOBIND, &["list", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    match serde_json::from_slice(&out.stdout) {
        Ok(serde_json::Value::Array(entries)) => entries,
        other => panic!("not a JSON array: {other:?}\n{}", describe(&out)),
    }
}

/// The entry named `id` (with `owner`, a master's binding), once
/// `cond` holds for it; panics with the list after [`PATIENCE`].
fn wait_entry(
    env: &Env,
    id: &str,
    owner: Option<&str>,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = Vec::new();
    let found = wait_for(PATIENCE, || {
        last = list(env);
        last.iter()
            .any(|e| e["id"] == id && e["owner"].as_str() == owner && cond(e))
    });
    assert!(found, "no entry {id} as wanted in {last:#?}");
    last.into_iter()
        .find(|e| e["id"] == id && e["owner"].as_str() == owner && cond(e))
        .unwrap()
}

#[test]
fn list_json_shows_standalone_bindings_with_their_figures_and_readers() {
    let env = Env::new();
    assert_eq!(list(&env), Vec::<serde_json::Value>::new(), "nothing yet");
    let port = free_port();
    let input = env.start(BIND_INPUT, &["in1", &port.to_string()]);
    let (listener, remote) = listener();
    let output = env.start(BIND_OUTPUT, &["out1", "127.0.0.1", &remote.to_string()]);
    let mut peer = accept(&listener);

    let mut reader = std::fs::File::open(env.fifo("in1")).unwrap();
    send(port, b"one\ntwo\nthree\n");
    assert_eq!(read_lines_from(&mut reader, 3), ["one", "two", "three"]);
    // Lines are counted as the line framer sees them; the figures are
    // published apart, so wait for all of them together.
    let e = wait_entry(&env, "in1", None, |e| {
        e["bytes_out"] == 14 && e["lines_in"] == 3 && e["lines_out"] == 3
    });
    assert_eq!(e["kind"], "bind-input");
    assert_eq!(e["pid"], input.pid);
    assert_eq!(e["port"], port);
    assert_eq!(e["bytes_in"], 14);
    assert_eq!(e["bytes_out"], 14);
    assert_eq!(e["reader"], true, "{e:#}");
    assert_eq!(e["writer"], false, "{e:#}");
    assert_eq!(e["fifo"], env.fifo("in1").to_str().unwrap());
    assert!(e["since"].as_u64().unwrap() > 1_700_000_000, "{e:#}");
    assert!(e["age"].as_u64().unwrap() < 3600, "{e:#}");
    // A last line without its newline counts once completed, in and out.
    send(port, b"four");
    assert_eq!(read_lines_from(&mut reader, 1), ["four"]);
    wait_entry(&env, "in1", None, |e| {
        e["bytes_out"] == 19 && e["lines_in"] == 4 && e["lines_out"] == 4
    });
    drop(reader);
    let e = wait_entry(&env, "in1", None, |e| e["reader"] == false);
    assert_eq!(
        e["peers"],
        serde_json::json!([]),
        "the sender is gone: {e:#}"
    );

    // A connection that stays: the peer is listed.
    let mut held = connect(port);
    std::io::Write::write_all(&mut held, b"x\n").unwrap();
    let e = wait_entry(&env, "in1", None, |e| {
        e["peers"].as_array().unwrap().len() == 1
    });
    assert!(
        e["peers"][0].as_str().unwrap().starts_with("127.0.0.1:"),
        "{e:#}"
    );

    std::fs::write(env.fifo("out1"), "alpha\nbeta\n").unwrap();
    let mut got = read_lines_from(&mut peer, 2);
    got.truncate(2);
    assert_eq!(got, ["alpha", "beta"]);
    let e = wait_entry(&env, "out1", None, |e| e["bytes_out"] == 11);
    assert_eq!(e["kind"], "bind-output");
    assert_eq!(e["pid"], output.pid);
    assert_eq!(e["port"], remote);
    assert_eq!(e["host"], "127.0.0.1");
    assert_eq!(e["bytes_in"], 11);
    // A plain bind-output splices: the bytes never pass through it, so
    // its lines are unknown (null), not 0.
    assert_eq!(e["lines_in"], serde_json::Value::Null, "{e:#}");
    assert_eq!(e["lines_out"], serde_json::Value::Null, "{e:#}");
    assert_eq!(
        e["peers"],
        serde_json::json!([format!("127.0.0.1:{remote}")])
    );
    assert_eq!(e["writer"], false);

    // The human form names both.
    let out = env.run(FIFOBIND, &["ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ID "), "{text}");
    assert!(text.contains("in1 ") && text.contains("out1 "), "{text}");
    let out = env.run(FIFOBIND, &["list", "--names"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in1\nout1\n");

    let out = env.run(FIFOBIND, &["stop", "in1", "out1"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !alive(input.pid) && !alive(output.pid),
        "stop returns once they are gone"
    );
    env.assert_clean();
}

#[test]
fn list_shows_a_pool_a_master_and_their_bindings_and_stop_ends_the_master() {
    let env = Env::new();
    let port = free_port();
    let pool = env.pool(&["k3y", &port.to_string()]);
    let ddir = env.daemons(&[("d1", "echo one; exec sleep 60")]);
    let mut master = env.spawn_master("k3y", port, &ddir);
    assert!(wait_for(PATIENCE, || env.fifo("m.d1").exists()));
    assert_eq!(read_lines(&env.fifo("m.d1"), 1), ["one"]);
    let pool_name = format!("pool@{}", pool.pid());
    let master_name = format!("master@{}", master.pid());
    let e = wait_entry(&env, &pool_name, None, |_| true);
    assert_eq!(e["kind"], "pool");
    assert_eq!(e["port"], port);
    assert_eq!(e["pid"], pool.pid());
    let e = wait_entry(&env, &master_name, None, |_| true);
    assert_eq!(e["kind"], "master");
    assert_eq!(e["host"], "127.0.0.1");
    let e = wait_entry(&env, "m.d1", None, |e| e["bytes_out"] == 4);
    assert_eq!(e["kind"], "bind-input");
    // Both ends of a keyed stream see its bytes, so count its lines.
    wait_entry(&env, "m.d1", None, |e| {
        e["lines_in"] == 1 && e["lines_out"] == 1
    });
    let e = wait_entry(&env, "m.d1", Some(&master_name), |e| e["bytes_out"] == 4);
    assert_eq!(e["kind"], "bind-output");
    wait_entry(&env, "m.d1", Some(&master_name), |e| {
        e["lines_in"] == 1 && e["lines_out"] == 1
    });
    // The daemon holds the master's FIFO for writing.
    assert_eq!(e["writer"], true, "{e:#}");

    let out = env.run(FIFOBIND, &["stop", &master_name, &pool_name]);
    assert!(out.status.success(), "{}", describe(&out));
    master.assert_stopped_by(libc::SIGTERM);
    let mut pool = pool;
    assert!(pool.wait(PATIENCE).is_some(), "{}", pool.describe());
    env.assert_clean();
}

#[test]
fn stop_says_which_did_not_stop_or_were_not_running() {
    let env = Env::new();
    let port = free_port();
    let input = env.start(BIND_INPUT, &["in1", &port.to_string()]);
    let out = env.run(FIFOBIND, &["stop", "in1", "ghost"]);
    assert_fails(&out, 69, "not running: ghost");
    assert!(!alive(input.pid), "in1 was stopped all the same");
    // A bind-input drained while nobody reads its FIFO keeps running.
    let input = env.start(BIND_INPUT, &["in2", &port.to_string()]);
    send(port, b"unread\n");
    assert!(wait_for(PATIENCE, || {
        list(&env)
            .iter()
            .any(|e| e["id"] == "in2" && e["bytes_out"] == 7)
    }));
    let out = env.run(FIFOBIND, &["stop", "--drain", "--timeout", "0.3", "in2"]);
    assert_fails(&out, 75, "still running after 0.3 s: in2");
    assert!(alive(input.pid));
    assert_fails(&env.run(FIFOBIND, &["stop"]), 2, "NAME");
    assert_fails(&env.run(FIFOBIND, &["stop", "../x"]), 2, "invalid NAME");
}

#[test]
fn stop_drain_loses_nothing_of_a_slow_remote_or_an_unread_fifo() {
    let env = Env::new();
    // bind-output to a remote that starts reading only after a plain
    // stop's flush limit (0.9 s) has passed: --drain sends it all anyway.
    // (Whether a plain stop would lose some depends on how much the
    // kernel's socket buffers absorb: here they often take it all.)
    let (listener, remote) = listener();
    small_receive_window(&listener);
    let output = env.start(BIND_OUTPUT, &["out1", "127.0.0.1", &remote.to_string()]);
    let mut peer = accept(&listener);
    let lines: Vec<String> = (0..20000)
        .map(|i| format!("line {i:05} of the drain test"))
        .collect();
    std::fs::write(env.fifo("out1"), lines.join("\n") + "\n").unwrap();
    let mut stop = env.spawn(Command::new(FIFOBIND).args(["stop", "--drain", "out1"]));
    std::thread::sleep(Duration::from_millis(1500)); // a slow remote
    let (got, closed) = read_until_closed(&mut peer, PATIENCE);
    assert!(closed);
    assert_eq!(got.len(), lines.len(), "lines lost");
    assert!(got == lines);
    stop.assert_ends_ok();
    assert!(!alive(output.pid), "stop returns once it is gone");

    // bind-input: stopped only once its FIFO has been read empty.
    let port = free_port();
    let input = env.start(BIND_INPUT, &["in1", &port.to_string()]);
    send(port, b"a\nb\n");
    assert!(wait_for(PATIENCE, || {
        list(&env)
            .iter()
            .any(|e| e["id"] == "in1" && e["bytes_out"] == 4)
    }));
    let mut stop = env.spawn(Command::new(FIFOBIND).args(["stop", "-d", "in1"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(input.pid), "stopped with lines unread");
    assert_eq!(read_lines(&env.fifo("in1"), 2), ["a", "b"]);
    stop.assert_ends_ok();
    assert!(!alive(input.pid));
    env.assert_clean();
}

#[test]
fn completions_load_in_bash_and_offer_the_live_names() {
    let env = Env::new();
    let port = free_port();
    let _in1 = env.start(BIND_INPUT, &["in1", &port.to_string()]);
    let out = env.bash(
        r#"source <(fifobind completions bash) || exit 1
        for c in bind-input bind-output pool master fifobind nats-output nats-input nats-master nats-pool; do complete -p "$c" || exit 1; done
        COMP_WORDS=(fifobind stop ""); COMP_CWORD=2; _fifobind_live
        echo "names: ${COMPREPLY[*]}"
        COMP_WORDS=(bind-input --f); COMP_CWORD=1; COMPREPLY=(); _bind__input bind-input --f bind-input
        echo "options: ${COMPREPLY[*]}"
        COMP_WORDS=(nats-input --dur); COMP_CWORD=1; COMPREPLY=(); _nats__input nats-input --dur nats-input
        echo "nats options: ${COMPREPLY[*]}""#,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(text.contains("-F _bind__input bind-input"), "{text}");
    assert!(text.contains("_fifobind_live"), "{text}");
    assert!(text.contains("names: in1\n"), "{text}");
    assert!(text.contains("--foreground"), "{text}");
    assert!(text.contains("nats options: --durable"), "{text}");
    for shell in ["zsh", "fish"] {
        let out = env.run(FIFOBIND, &["completions", shell]);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "{}",
            describe(&out)
        );
    }
    assert_fails(&env.run(FIFOBIND, &["completions", "tcsh"]), 2, "tcsh");
    let out = env.run(FIFOBIND, &["stop", "in1"]);
    assert!(out.status.success(), "{}", describe(&out));
    env.assert_clean();
}

/// The zsh script works both ways it is used: installed as `_fifobind` in
/// `$fpath` (the package's vendor-completions file), where its `#compdef`
/// line claims all nine commands and, loaded once, it registers each
/// one's function; and sourced.
#[test]
fn zsh_completions_load_autoloaded_for_all_nine_commands_and_sourced() {
    if !have_tool("zsh", "zsh") {
        return;
    }
    let env = Env::new();
    let out = env.run(FIFOBIND, &["completions", "zsh"]);
    assert!(out.status.success(), "{}", describe(&out));
    let fpath = env.tmp().join("zfunc");
    std::fs::create_dir(&fpath).unwrap();
    std::fs::write(fpath.join("_fifobind"), &out.stdout).unwrap();
    let script = format!(
        r#"fpath=({dir} $fpath); autoload -Uz compinit; compinit -u -d {dir}/dump
        comps() {{ print -r -- "$1: $_comps[bind-input] $_comps[bind-output] $_comps[pool] $_comps[master] $_comps[nats-output] $_comps[nats-input] $_comps[nats-master] $_comps[nats-pool] $_comps[fifobind]"; }}
        comps autoload
        # What completing `pool ` first does: load the file for it.
        service=pool; _fifobind 2>/dev/null
        comps loaded
        source {dir}/_fifobind
        comps sourced"#,
        dir = fpath.display()
    );
    let out = run_with_timeout(
        env.cmd("zsh")
            .args(["-f", "-c", &script])
            .env("PATH", path_with_bins()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text.contains(&format!("autoload:{}\n", " _fifobind".repeat(9))),
        "{text}"
    );
    let registered = "_bind-input _bind-output _pool _master _nats-output _nats-input \
                      _nats-master _nats-pool _fifobind_live\n";
    assert!(text.contains(&format!("loaded: {registered}")), "{text}");
    assert!(text.contains(&format!("sourced: {registered}")), "{text}");
    env.assert_clean();
}

// ---------------------------------------------------------------------
// The example units of scripts/examples.

/// Example unit `name`, pointed at this build and this test: installed
/// paths, the port, the directories and the key file rewritten.
fn example_unit(env: &Env, name: &str, port: u16) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("scripts/examples").join(name)).unwrap();
    let bins = std::path::Path::new(BIND_INPUT).parent().unwrap();
    text.replace("/usr/bin/", &format!("{}/", bins.display()))
        .replace(
            "/usr/share/doc/fifobind/examples/",
            &format!("{}/scripts/examples/", root.display()),
        )
        .replace("9999", &port.to_string())
        .replace("9000", &port.to_string())
        .replace("/run/fifobind", env.dir.to_str().unwrap())
        .replace("/var/log/fifobind", env.tmp().join("log").to_str().unwrap())
        .replace("/etc/fifobind/key", env.tmp().join("key").to_str().unwrap())
}

/// The value of `key=` in a unit.
fn unit_value(unit: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    unit.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= in {unit}"))
        .to_string()
}

#[test]
fn example_units_pass_systemd_analyze_verify() {
    let env = Env::new();
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("skipped: systemd-analyze is missing (Debian package systemd)");
        return;
    }
    let names = [
        "fifobind-input.socket",
        "fifobind-input.service",
        "fifobind-pool.service",
    ];
    let units = env.tmp().join("units");
    std::fs::create_dir(&units).unwrap();
    for name in names {
        assert!(unit_value(&example_unit(&env, name, 9999), "Description").len() > 10);
        std::fs::write(units.join(name), example_unit(&env, name, free_port())).unwrap();
    }
    let out = run_with_timeout(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(names.map(|n| units.join(n))),
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        describe(&out)
    );
}

#[test]
fn the_socket_activated_input_unit_runs_as_systemd_would_run_it() {
    if !has_socket_activate() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let unit = example_unit(&env, "fifobind-input.service", port);
    assert_eq!(unit_value(&unit, "Type"), "notify");
    let socket = example_unit(&env, "fifobind-input.socket", port);
    assert_eq!(unit_value(&socket, "ListenStream"), port.to_string());
    let notify = NotifySocket::new(&env);
    let exec = unit_value(&unit, "ExecStart");
    let mut service = env.spawn(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-E")
            .arg(unit_value(&unit, "Environment"))
            .arg("-E")
            .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
            .args(exec.split_whitespace()),
    );
    assert!(service.wait_stderr(PATIENCE, |s| s.contains("Listening on")));
    send(port, b"first\n");
    notify.wait_for("READY=1");
    assert_eq!(
        read_lines(&env.fifo("in1"), 1),
        ["first"],
        "{}",
        service.describe()
    );
    kill(service.pid(), libc::SIGTERM);
    notify.wait_for("STOPPING=1");
    service.assert_ends_ok();
    env.assert_clean();
}

#[test]
fn the_pool_unit_runs_as_systemd_would_run_it() {
    let env = Env::new();
    let port = free_port();
    let unit = example_unit(&env, "fifobind-pool.service", port);
    assert_eq!(unit_value(&unit, "Type"), "notify");
    std::fs::write(env.tmp().join("key"), "k3y\n").unwrap();
    let exec = unit_value(&unit, "ExecStart");
    let script = exec
        .strip_prefix("/bin/bash -c '")
        .and_then(|s| s.strip_suffix('\''))
        .expect("ExecStart=/bin/bash -c '...'");
    let notify = NotifySocket::new(&env);
    let mut service = env.spawn(
        Command::new("/bin/bash")
            .args(["-c", script])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    notify.wait_for("READY=1");
    TcpStream::connect(("127.0.0.1", port)).expect("READY=1 means listening");
    let ddir = env.daemons(&[("d1", "echo one"), ("d2", "echo two")]);
    // Two masters one after the other: the pool keeps serving.
    for _ in 0..2 {
        let out = env.run_master("k3y", port, &ddir);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let logs = env.tmp().join("log");
    let logged = |name: &str, line: &str| {
        let text = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
        text.lines()
            .filter(|l| l.ends_with(&format!(" {line}")))
            .count()
            == 2
    };
    assert!(
        wait_for(PATIENCE, || logged("m.d1", "one") && logged("m.d2", "two")),
        "{}",
        service.describe()
    );
    // Stopped, the pool exits 143, which the unit counts as success; the
    // pipeline (pipefail) passes that status on.
    let pool = env.owner_pid("pool");
    kill(pool, libc::SIGTERM);
    let status = service.wait(PATIENCE).expect("the unit's command ends");
    assert_eq!(status.code(), Some(143), "{}", service.describe());
    env.assert_clean();
}

#[test]
fn master_says_ready_once_its_daemons_run_and_they_do_not_inherit_notify_socket() {
    let env = Env::new();
    let notify = NotifySocket::new(&env);
    let port = free_port();
    let consumer = env.consumer(port, "k3y");
    let ddir = env.daemons(&[(
        "d1",
        r#"echo "socket=${NOTIFY_SOCKET:-none}"; exec sleep 30"#,
    )]);
    let mut master = env.spawn(
        Command::new(MASTER)
            .args([
                "--name",
                "m",
                "k3y",
                "127.0.0.1",
                &port.to_string(),
                ddir.to_str().unwrap(),
            ])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    let seen = notify.wait_for("READY=1");
    assert_eq!(
        main_pid(seen.last().unwrap()),
        Some(master.pid()),
        "{seen:?}"
    );
    assert!(
        consumer.wait_stdout(PATIENCE, |s| s.contains("[m.d1] socket=none")),
        "{}",
        consumer.describe()
    );
    master.stop(libc::SIGTERM);
    drop(consumer);
}
