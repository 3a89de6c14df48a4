//! Protocol 2 between master and pool, tried as an attacker would: a man
//! in the middle, a capture, a flood, a key guesser, two masters at once,
//! and version-1 peers.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fifobind::secure::{Hello, Purpose, Side, read_greeting};

use crate::util::*;

/// The bytes a master named `m` sends before its first DAEMON: its
/// greeting (86), its confirmation (39) and `HELLO m` (28).
const UP_HANDSHAKE: usize = 86 + 39 + 28;
/// The bytes a pool sends before its first PORT: its greeting, its
/// confirmation and `SESSION m` (30).
const DOWN_HANDSHAKE: usize = 86 + 39 + 30;

/// A directory of daemons of its own under the test's temporary one.
fn daemons_in(env: &Env, dir: &str, scripts: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let ddir = env.tmp().join(dir);
    std::fs::create_dir_all(&ddir).unwrap();
    for (name, body) in scripts {
        let path = ddir.join(name);
        std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    ddir
}

fn master_via(env: &Env, port: u16, ddir: &std::path::Path) -> std::process::Output {
    env.run(
        MASTER,
        &[
            "--name",
            "m",
            "k12",
            "127.0.0.1",
            &port.to_string(),
            ddir.to_str().unwrap(),
        ],
    )
}

/// A relay injects `DAEMON evil` in clear text after the handshake: the
/// pool cannot open it as a frame, closes the session and says so; the
/// master fails with a clear status; no binding is started for anybody.
#[test]
fn an_injected_daemon_line_starts_nothing_and_both_ends_say_so() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("dem1", "echo secret payroll data from dem1")]);
    let mut pool = env.pool(&["--once", "k12", &port.to_string()]);
    let relay = TamperRelay::start(
        port,
        Tamper {
            inject_up: Some((UP_HANDSHAKE, b"DAEMON evil\n".to_vec())),
            ..Tamper::default()
        },
    );
    let out = master_via(&env, relay.port, &ddir);
    println!("injection: master: {}", describe(&out));
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pool at 127.0.0.1:") && (err.contains("closed") || err.contains("reset")),
        "{err}"
    );
    pool.assert_ends_ok();
    let log = pool.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("session m") && l.contains("session closed"))
        .unwrap_or_else(|| panic!("no log line of the broken session:\n{log}"));
    println!("injection: pool: {line}");
    assert!(pool.stdout().is_empty(), "{}", pool.describe());
    assert!(!pool.stderr().contains("evil"), "{}", pool.describe());
    env.assert_clean();
}

/// A relay flips one bit of the pool's PORT answer: the master's frame
/// fails to open, it exits 76 saying so, and the pool logs the master's
/// end; the binding started for it gets nothing and gives up.
#[test]
fn a_rewritten_answer_fails_the_master_and_reaches_no_fifo() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("dem1", "echo secret payroll data from dem1")]);
    let mut pool = env.pool(&["--once", "--accept-timeout", "2", "k12", &port.to_string()]);
    let relay = TamperRelay::start(
        port,
        Tamper {
            flip_down: Some(DOWN_HANDSHAKE + 5),
            ..Tamper::default()
        },
    );
    let out = master_via(&env, relay.port, &ddir);
    println!("rewrite: master: {}", describe(&out));
    assert_eq!(out.status.code(), Some(76), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failed authentication"),
        "{}",
        describe(&out)
    );
    pool.assert_ends_ok();
    let log = pool.stderr();
    assert!(
        log.contains("session m") && log.contains("without END"),
        "{log}"
    );
    // Its binding was announced, then gave up unconnected, FIFO empty.
    assert!(pool.stdout().starts_with("m.dem1 "), "{}", pool.describe());
    assert!(
        log.contains("nobody connected") || log.contains("exit status 75"),
        "{log}"
    );
    env.assert_clean();
}

/// A full capture of a session with key `k12` (control and streams, off
/// the loopback): nothing in clear text but the two greetings of each
/// connection; no daemon line, no name, no key.
#[test]
fn a_captured_session_shows_nothing_but_greetings() {
    let Some(capture) = LoopbackCapture::start() else {
        return;
    };
    let env = Env::new();
    let port = free_port();
    let secret = "secret payroll data 7731q";
    let ddir = env.daemons(&[(
        "payroll7q",
        &format!("for i in 1 2 3; do echo '{secret}' $i; done"),
    )]);
    let mut pool = env.consumer(port, "k12");
    let out = master_via(&env, port, &ddir);
    assert_ran_ok(&out, &pool);
    pool.assert_ends_ok();
    assert!(
        pool.stdout().contains(&format!("[m.payroll7q] {secret} 3")),
        "{}",
        pool.describe()
    );
    let bport: u16 = pool
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("pool: m.payroll7q "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("the binding's port");
    let payloads = capture.finish(&[port, bport]);
    let wire: Vec<u8> = payloads.concat();
    println!(
        "capture: {} packets, {} bytes of TCP payload on the pool's and the binding's ports",
        payloads.len(),
        wire.len()
    );
    assert!(wire.len() > 300, "the capture missed the session");
    // (The stream greeting is `FIFOBIND 2 STREAM …`: its line `STREAM
    // <id> <acked>` is sealed, like `RESUME`.)
    let clear = [
        "payroll", "7731q", secret, "k12", "DAEMON", "HELLO", "PORT", "RESUME", "SESSION",
    ];
    let mut found = 0;
    for word in clear {
        if contains_bytes(&wire, word.as_bytes()) {
            found += word.len();
            println!("capture: {word:?} is in clear text");
        }
    }
    println!("capture: clear-text bytes of daemon data, names and key: {found}");
    assert_eq!(found, 0);
    // What is readable: greetings only.
    let greetings = wire.windows(11).filter(|w| *w == b"FIFOBIND 2 ").count();
    assert!(greetings >= 4, "{greetings} greetings");
    env.assert_clean();
}

/// 600 idle connections a second from 127.0.0.2 while a master at
/// 127.0.0.1, 40 ms away each way, authenticates: it gets in.
#[test]
fn a_flood_of_idle_connections_does_not_keep_a_distant_master_out() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("dem1", "echo hi")]);
    let mut pool = env.pool(&["k12", &port.to_string()]);
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || {
            let to = SocketAddr::from(([127, 0, 0, 1], port));
            let from: IpAddr = "127.0.0.2".parse().unwrap();
            let start = Instant::now();
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) && held.len() < 12_000 {
                // 600 a second, on schedule.
                let due = start + Duration::from_secs_f64(held.len() as f64 / 600.0);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if let Ok(s) = connect_from(from, to) {
                    held.push(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            held
        })
    };
    assert!(wait_for(PATIENCE, || opened.load(Ordering::Relaxed) >= 600));
    let relay = TamperRelay::start(
        port,
        Tamper {
            delay: Duration::from_millis(40),
            ..Tamper::default()
        },
    );
    let started = Instant::now();
    let out = master_via(&env, relay.port, &ddir);
    let took = started.elapsed();
    let during = opened.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let held = flood.join().unwrap();
    println!(
        "flood: the master 40 ms away got in and was done in {took:?}, \
         with {} idle connections from 127.0.0.2 opened ({during} when it ended)",
        held.len()
    );
    assert_ran_ok(&out, &pool);
    // Logged before the pool answered; read from its pipe soon after.
    assert!(
        pool.wait_stderr(PATIENCE, |s| s
            .contains("master 127.0.0.1 authenticated: session m")),
        "{}",
        pool.describe()
    );
    drop(held);
    assert_eq!(read_lines(&env.fifo("m.dem1"), 1), ["hi"]);
    pool.stop(libc::SIGTERM);
    env.assert_clean();
}

/// 10,000 wrong keys as fast as four connections at a time allow: after
/// the first, the address is held back (exponentially longer each time),
/// so few are even tried; the log gets summaries, not a line each.
#[test]
fn ten_thousand_wrong_keys_are_rate_limited_and_summarised() {
    let env = Env::new();
    let port = free_port();
    let mut pool = env.pool(&["k12", &port.to_string()]);
    let tried = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (tried, refused) = (tried.clone(), refused.clone());
            std::thread::spawn(move || {
                for _ in 0..2500 {
                    let mut s = connect(port);
                    s.set_read_timeout(Some(PATIENCE)).unwrap();
                    // The greeting first: turned away, a guesser spends
                    // no SPAKE2 work either.
                    let greeting = read_greeting(&mut s).expect("a greeting or ERR");
                    let result = match greeting.strip_prefix("ERR ") {
                        Some(why) => Err(fifobind::protocol::Failure::Refused(why.to_string())),
                        None => {
                            let hello = Hello::start(Side::Connector, Purpose::Control, b"k13");
                            s.write_all(format!("{}\n", hello.line()).as_bytes())
                                .unwrap();
                            hello.finish(&greeting).unwrap().confirm(&mut s)
                        }
                    };
                    match result {
                        Ok(()) => panic!("a wrong key got in"),
                        Err(fifobind::protocol::Failure::Refused(why))
                            if why.contains("keys differ") =>
                        {
                            tried.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(fifobind::protocol::Failure::Refused(why))
                            if why.starts_with("too many wrong keys from 127.0.0.1")
                                || why.starts_with("busy") =>
                        {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(other) => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = started.elapsed();
    let (tried, refused) = (
        tried.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    // The log, once the summary of the last interval is out.
    pool.stop(libc::SIGTERM);
    let log = pool.stderr();
    // What the pool tested (its summaries count them): a guesser that got
    // a greeting may still have been turned away before its key was
    // looked at.
    let tested: usize = log
        .lines()
        .filter_map(|l| l.split("WARN: ").nth(1)?.strip_suffix("").map(String::from))
        .filter_map(|l| l.split_once(" wrong key(s)")?.0.parse::<usize>().ok())
        .sum();
    let rate = tested as f64 / took.as_secs_f64();
    println!(
        "wrong keys: 10000 sent in {took:?}; {tested} tested by the pool ({rate:.2} a second \
         accepted), {tried} got as far as a greeting, {refused} turned away at once; \
         the pool's log: {} bytes, {} lines",
        log.len(),
        log.lines().count()
    );
    assert_eq!(tried + refused, 10_000);
    // Held back 1 s, 2 s, 4 s... up to 60 s after each, one key test per
    // address at a time: one guess per window.
    let secs = took.as_secs() as usize;
    let windows = 2 + secs.max(1).ilog2() as usize + secs / 60;
    assert!(
        tested >= 1 && tested <= windows,
        "{tested} in {took:?}\n{log}"
    );
    // A summary line per 10 s, not a line per attempt.
    let summaries = log.lines().filter(|l| l.contains("wrong key(s)")).count();
    assert!(summaries >= 1 && summaries <= 2 + secs / 10, "{log}");
    assert!(log.len() < 1024 + 300 * summaries, "{log}");
    assert!(log.contains("wrong key(s)"), "{log}");
    env.assert_clean();
}

/// Two masters at once, each with a daemon `dem1`, both asking for the
/// name `m`: one gets `m`, the other `m-2`; both streams arrive, apart.
#[test]
fn two_masters_at_once_with_the_same_daemon_never_clash() {
    let env = Env::new();
    let port = free_port();
    let a = daemons_in(
        &env,
        "a",
        &[(
            "dem1",
            "for i in $(seq 1 30); do echo \"A $i\"; sleep 0.02; done",
        )],
    );
    let b = daemons_in(
        &env,
        "b",
        &[(
            "dem1",
            "for i in $(seq 1 30); do echo \"B $i\"; sleep 0.02; done",
        )],
    );
    let mut pool = env.spawn_bash(&format!(
        r#"pool k12 {port} | while read -r name port fifo; do
            while IFS= read -r line; do echo "[$name] $line"; done < "$fifo" &
        done"#
    ));
    ready(&pool);
    let masters: Vec<Spawned> = [&a, &b]
        .iter()
        .map(|d| {
            env.spawn(Command::new(MASTER).args([
                "--name",
                "m",
                "k12",
                "127.0.0.1",
                &port.to_string(),
                d.to_str().unwrap(),
            ]))
        })
        .collect();
    for mut m in masters {
        let status = m.wait(PATIENCE).expect("each master ends");
        assert!(status.success(), "{}", m.describe());
    }
    assert!(
        pool.wait_stdout(PATIENCE, |s| s.matches(" 30\n").count() == 2),
        "{}",
        pool.describe()
    );
    let out = pool.stdout();
    let of = |tag: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.strip_prefix(&format!("[{tag}] ")))
            .map(String::from)
            .collect()
    };
    let (first, second) = (of("m.dem1"), of("m-2.dem1"));
    let letter = |lines: &[String]| {
        lines
            .first()
            .map(|l| l[..1].to_string())
            .unwrap_or_default()
    };
    let (x, y) = (letter(&first), letter(&second));
    assert!(
        x != y && [&x, &y].iter().all(|l| *l == "A" || *l == "B"),
        "{out}"
    );
    for (lines, l) in [(&first, &x), (&second, &y)] {
        let want: Vec<String> = (1..=30).map(|i| format!("{l} {i}")).collect();
        assert_eq!(*lines, want, "{out}");
    }
    // The pool keeps serving until stopped.
    let pool_pid = env.owner_pid("pool");
    kill(pool_pid, libc::SIGTERM);
    assert!(pool.wait(PATIENCE).is_some(), "{}", pool.describe());
    env.assert_clean();
}

/// A version-1 master (its AUTH line typed by hand) is told in clear text
/// which versions meet; a version-1 pool is named so by the master.
#[test]
fn version_one_peers_get_an_error_naming_both_versions() {
    let env = Env::new();
    let port = free_port();
    let mut pool = env.pool(&["k12", &port.to_string()]);
    let mut s = connect(port);
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        greeting.push(byte[0]);
    }
    assert!(greeting.starts_with(b"FIFOBIND 2 CONTROL "));
    let n = "ab".repeat(32);
    s.write_all(format!("FIFOBIND 1 AUTH {n} {n}\n").as_bytes())
        .unwrap();
    let (lines, closed) = read_until_closed(&mut s, PATIENCE);
    assert!(closed);
    assert_eq!(
        lines,
        ["ERR this pool speaks protocol version 2, not version 1"]
    );
    assert!(
        pool.wait_stderr(PATIENCE, |l| l.contains("a master of protocol version 1")),
        "{}",
        pool.describe()
    );
    pool.stop(libc::SIGTERM);

    // A version-1 pool, played by hand.
    let (old_pool, oport) = listener();
    let ddir = env.daemons(&[("dem1", "echo hi")]);
    let mut master = env.spawn_master("k12", oport, &ddir);
    let mut s = accept(&old_pool);
    s.write_all(format!("FIFOBIND 1 CHALLENGE {n}\n").as_bytes())
        .unwrap();
    let status = master.wait(PATIENCE).expect("the master gives up");
    assert_eq!(status.code(), Some(69), "{}", master.describe());
    assert!(
        master
            .stderr()
            .contains("the pool speaks protocol version 1, this master speaks version 2"),
        "{}",
        master.describe()
    );
    drop(s);
    env.assert_clean();
}
