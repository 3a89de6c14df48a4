//! bind-input's limits: no client can stall or lock out a binding, a
//! burst waits in the backlog, and running out of descriptors backs off.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A connection that sends more than its buffer without a newline and then
/// stalls holds the FIFO only for --line-timeout: then its line is
/// completed, it is closed, and a short line from another client passes.
#[test]
fn stalled_long_line_holds_the_fifo_only_for_the_line_timeout() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(
        BIND_INPUT,
        &["--line-timeout", "1", "stall", &port.to_string()],
    );
    let fifo = env.fifo("stall");
    // Past the largest buffer (1 MiB), so part of it is in the FIFO.
    let long = vec![b'z'; 1_500_000];
    let mut staller = connect(port);
    staller.write_all(&long).unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let progress = read.clone();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        read_until(open_fifo(&fifo), PATIENCE * 2, |c| {
            got.extend_from_slice(c);
            progress.store(got.len(), Ordering::SeqCst);
            !got.ends_with(b"short\n")
        });
        got
    });
    // Part of the long line is in the FIFO: its sender owns it now.
    assert!(
        wait_for(PATIENCE, || read.load(Ordering::SeqCst) > 0),
        "{}",
        env.logs()
    );
    let sent = Instant::now();
    send(port, b"short\n");
    let got = reader.join().unwrap();
    let waited = sent.elapsed();
    println!("a short line waited {waited:?} behind a stalled long one (limit 1 s)");
    assert!(
        got.ends_with(b"short\n"),
        "the short line did not pass ({} bytes read)\n{}",
        got.len(),
        env.logs()
    );
    // The long line's part, completed by a newline, came first.
    let first_nl = got.iter().position(|&b| b == b'\n').unwrap();
    assert!(got[..first_nl].iter().all(|&b| b == b'z'), "mixed bytes");
    assert_eq!(&got[first_nl..], b"\nshort\n");
    assert!(
        wait_closed(&mut staller, PATIENCE),
        "the staller was not closed"
    );
    assert!(env.logs().contains("middle of a line"), "{}", env.logs());
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// --max-conns N: the N+1st connection waits in the backlog (not
/// accepted, nothing lost) until a served one ends.
#[test]
fn max_conns_keeps_the_rest_in_the_backlog() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["--max-conns", "2", "cap", &port.to_string()]);
    let fifo = env.fifo("cap");
    let mut a = connect(port);
    let b = connect(port);
    let accepted = || env.logs().matches("connection from").count();
    assert!(wait_for(PATIENCE, || accepted() == 2), "{}", env.logs());
    send(port, b"third\n");
    // A line through a served connection proves the binding went round
    // its loop after the third connected.
    a.write_all(b"first\n").unwrap();
    assert_eq!(read_lines(&fifo, 1), ["first"]);
    assert_eq!(accepted(), 2, "a third was accepted\n{}", env.logs());
    drop(b);
    assert_eq!(read_lines(&fifo, 1), ["third"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// --max-conns-per-addr N: one more from the same address is closed at
/// once; another address is still served.
#[test]
fn per_address_limit_refuses_the_excess_only() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(
        BIND_INPUT,
        &["--max-conns-per-addr", "1", "peraddr", &port.to_string()],
    );
    let fifo = env.fifo("peraddr");
    let to = SocketAddr::new(ip("127.0.0.1"), port);
    let mut held = connect_from(ip("127.0.0.1"), to).unwrap();
    held.write_all(b"held\n").unwrap();
    assert_eq!(read_lines(&fifo, 1), ["held"]);
    let mut excess = connect_from(ip("127.0.0.1"), to).unwrap();
    let _ = excess.write_all(b"excess\n");
    assert!(wait_closed(&mut excess, PATIENCE), "the excess was served");
    let mut other = connect_from(ip("127.0.0.2"), to).unwrap();
    other.write_all(b"other\n").unwrap();
    drop(other);
    assert_eq!(read_lines(&fifo, 1), ["other"]);
    assert!(
        env.logs().contains("1 connections from 127.0.0.1"),
        "{}",
        env.logs()
    );
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// --idle-timeout: a connection that sends nothing is closed; one that
/// has sent something is not.
#[test]
fn idle_timeout_closes_silent_connections_only() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(
        BIND_INPUT,
        &["--idle-timeout", "0.5", "idle", &port.to_string()],
    );
    let fifo = env.fifo("idle");
    let mut talker = connect(port);
    talker.write_all(b"hello\n").unwrap();
    assert_eq!(read_lines(&fifo, 1), ["hello"]);
    let mut silent = connect(port);
    assert!(wait_closed(&mut silent, PATIENCE), "the silent one stays");
    assert!(env.logs().contains("sent nothing"), "{}", env.logs());
    // Well past the limit, the talker is still served.
    talker.write_all(b"still here\n").unwrap();
    assert_eq!(read_lines(&fifo, 1), ["still here"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// --allow takes several addresses and prefixes, repeated or with commas,
/// IPv4-mapped IPv6 forms included.
#[test]
fn allow_takes_several_addresses_and_prefixes() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(
        BIND_INPUT,
        &[
            "--allow",
            "127.0.0.2,127.0.1.0/24",
            "--allow",
            "::ffff:127.0.0.3",
            "list",
            &port.to_string(),
        ],
    );
    let fifo = env.fifo("list");
    let to = SocketAddr::new(ip("127.0.0.1"), port);
    for bad in ["127.0.0.1", "127.0.2.1"] {
        let mut s = connect_from(ip(bad), to).unwrap();
        let _ = s.write_all(b"intruder\n");
        assert!(wait_closed(&mut s, PATIENCE), "{bad} was let in");
    }
    for good in ["127.0.0.2", "127.0.1.77", "127.0.0.3"] {
        let mut s = connect_from(ip(good), to).unwrap();
        s.write_all(format!("from {good}\n").as_bytes()).unwrap();
        drop(s);
        assert_eq!(read_lines(&fifo, 1), [format!("from {good}")]);
    }
    if has_ipv6() {
        let to6 = SocketAddr::new(ip("::1"), port);
        let mut s = connect_from(ip("::1"), to6).unwrap();
        let _ = s.write_all(b"intruder\n");
        assert!(wait_closed(&mut s, PATIENCE), "::1 was let in");
    }
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// 1000 senders at once: the backlog holds those not served yet, and
/// every line of every sender arrives whole.
#[test]
fn thousand_concurrent_senders_all_arrive() {
    const SENDERS: usize = 1000;
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["burst", &port.to_string()]);
    let fifo = env.fifo("burst");
    let reader = std::thread::spawn(move || read_lines(&fifo, SENDERS * 2));
    let line = |i: usize| format!("sender {i} a {}\nsender {i} b\n", "y".repeat(i % 300));
    burst(port, SENDERS, line);
    let got = reader.join().unwrap();
    let mut want: Vec<String> = (0..SENDERS)
        .flat_map(|i| line(i).lines().map(String::from).collect::<Vec<_>>())
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    println!(
        "1000 senders: {} of {} lines arrived",
        got.len(),
        want.len()
    );
    assert!(
        sorted == want,
        "{} of {} lines\n{}",
        got.len(),
        want.len(),
        env.logs()
    );
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Out of descriptors (ulimit -n 64, 100 connections held open), the
/// binding stops accepting until one is free: it neither spins nor floods
/// its log, and once connections end the waiting ones are served.
#[test]
fn out_of_descriptors_backs_off() {
    const CONNS: usize = 100;
    let env = Env::new();
    let port = free_port();
    let out = env.bash(&format!("ulimit -n 64 && exec bind-input fds {port}"));
    assert!(out.status.success(), "{}", describe(&out));
    let binding = env.binding(printed_pid(&out));
    let fifo = env.fifo("fds");
    let mut held: Vec<_> = (0..CONNS)
        .map(|i| {
            let mut s = connect(port);
            s.write_all(format!("conn {i}\n").as_bytes()).unwrap();
            s
        })
        .collect();
    assert!(
        wait_for(PATIENCE, || env.logs().contains("cannot accept")),
        "{}",
        env.logs()
    );
    let cpu0 = cpu_time(binding.pid).unwrap();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_time(binding.pid).unwrap() - cpu0;
    let wall = t0.elapsed();
    let log_size = fs::metadata(env.dir.join(".fds.log")).unwrap().len();
    println!("out of descriptors: {cpu:?} CPU in {wall:?}, log {log_size} bytes");
    assert!(cpu < wall / 4, "spinning: {cpu:?} CPU in {wall:?}");
    assert!(log_size < 64 * 1024, "log grew to {log_size} bytes");
    held.clear();
    let mut got = read_lines(&fifo, CONNS);
    got.sort();
    let mut want: Vec<String> = (0..CONNS).map(|i| format!("conn {i}")).collect();
    want.sort();
    assert_eq!(got, want, "{}", env.logs());
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Accepted connections have TCP keepalive on, so a client whose host
/// vanished (no FIN, no reset) is found dead: `ss` shows the timer.
#[test]
fn accepted_connections_have_keepalive() {
    let probe = std::process::Command::new("ss").arg("-V").output();
    if probe.is_err() {
        assert!(std::env::var_os("CI").is_none(), "ss (iproute2) is missing");
        println!("skipped: ss (iproute2) is missing");
        return;
    }
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["alive", &port.to_string()]);
    let mut s = connect(port);
    s.write_all(b"hello\n").unwrap();
    assert_eq!(read_lines(&env.fifo("alive"), 1), ["hello"]);
    let filter = format!("( sport = :{port} )");
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("keepalive"), "no keepalive timer: {text:?}");
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}
