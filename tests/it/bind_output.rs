//! bind-output: arguments, statuses, writers, flushing and signals.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use crate::util::*;

/// Every malformed command line: exit 2, one line naming the culprit,
/// nothing on stdout, and not even the runtime directory created.
#[test]
fn bad_arguments_are_refused_before_anything_is_created() {
    let env = Env::new();
    let port = free_port().to_string();
    let p = port.as_str();
    let h = "127.0.0.1";
    let long_id = "x".repeat(65);
    let cases: &[(&[&str], &str)] = &[
        (&[], "ID"),
        (&["out1"], "HOST"),
        (&["out1", h], "PORT"),
        (&["out1", h, p, "extra"], "extra"),
        (&["out1", h, "80"], "80"),
        (&["out1", h, "1023"], "1023"),
        (&["out1", h, "49152"], "49152"),
        (&["out1", h, "9x9"], "9x9"),
        (&["out1", h, ""], "PORT"),
        (&["../x", h, p], "../x"),
        (&["a/b", h, p], "a/b"),
        (&[".x", h, p], ".x"),
        (&["-x", h, p], "-x"),
        (&["--", "-x", h, p], "-x"),
        (&["", h, p], "ID"),
        (&[&long_id, h, p], "ID"),
        (&["out1", "a b", p], "a b"),
        (&["out1", "-x", p], "-x"),
        (&["--", "out1", "-x", p], "-x"),
        (&["out1", "", p], "HOST"),
        (&["out1", "a/b", p], "a/b"),
        (&["-t", "0", "out1", h, p], "--connect-timeout"),
        (&["-t", "soon", "out1", h, p], "soon"),
    ];
    env.assert_usage_errors(BIND_OUTPUT, cases);
    env.assert_clean();
}

#[test]
fn refused_connection_is_unavailable() {
    let env = Env::new();
    let port = free_port().to_string();
    let out = env.run(BIND_OUTPUT, &["nobody", "127.0.0.1", &port]);
    assert_fails(&out, 69, &port);
    env.assert_clean();
}

/// An unknown host is 68. Resolved only inside a fresh network namespace,
/// so no query can leave the machine.
#[test]
fn unknown_host_is_nohost() {
    if !can_unshare_net() {
        return;
    }
    let env = Env::new();
    let port = free_port().to_string();
    let out = run_with_timeout(env.cmd("unshare").args([
        "-n",
        "--",
        BIND_OUTPUT,
        "lost",
        "no-such-host.invalid",
        &port,
    ]));
    assert_fails(&out, 68, "no-such-host.invalid");
    env.assert_clean();
}

/// A connection attempt nobody answers is 75 after --connect-timeout. A
/// listener with backlog 0 whose queue is full drops new SYNs: on
/// loopback, that is a peer that never answers.
#[test]
fn connect_timeout_is_tempfail() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let env = Env::new();
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&SockAddr::from(addr)).unwrap();
    socket.listen(0).unwrap();
    let mut fillers = Vec::new();
    let full = (0..16).any(|_| {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => {
                fillers.push(s);
                false
            }
            Err(e) => e.kind() == std::io::ErrorKind::TimedOut,
        }
    });
    assert!(full, "could not fill the accept queue");
    let started = Instant::now();
    let out = env.run(
        BIND_OUTPUT,
        &["-t", "0.3", "slow", "127.0.0.1", &port.to_string()],
    );
    assert_fails(&out, 75, &port.to_string());
    assert!(started.elapsed() >= Duration::from_millis(300));
    env.assert_clean();
}

/// SIGINT, SIGHUP and SIGTERM each close the binding within a second,
/// taking its FIFO and claim along.
#[test]
fn stop_signals_close_properly() {
    let env = Env::new();
    let (listener, port) = listener();
    for (sig, id) in [
        (libc::SIGINT, "int"),
        (libc::SIGHUP, "hup"),
        (libc::SIGTERM, "term"),
    ] {
        let pid = env.start(BIND_OUTPUT, &[id, "127.0.0.1", &port.to_string()]);
        let mut conn = accept(&listener);
        assert!(env.fifo(id).exists() && env.lock(id).exists());
        kill(pid, sig);
        assert!(
            wait_gone(pid, Duration::from_secs(1)),
            "signal {sig}: still running\n{}",
            env.logs()
        );
        assert!(!env.fifo(id).exists(), "signal {sig}: FIFO left");
        assert!(!env.lock(id).exists(), "signal {sig}: claim left");
        assert!(wait_closed(&mut conn, PATIENCE), "connection left open");
    }
    env.assert_clean();
}

/// SIGKILL leaves a FIFO and a claim; the next binding of the same ID
/// reclaims them at once.
#[test]
fn sigkill_leftovers_are_reclaimed_at_once() {
    let env = Env::new();
    let (listener, port) = listener();
    let port = port.to_string();
    let pid = env.start(BIND_OUTPUT, &["k", "127.0.0.1", &port]);
    kill(pid, libc::SIGKILL);
    assert!(wait_gone(pid, PATIENCE));
    drop(accept(&listener));
    assert!(env.fifo("k").exists() && env.lock("k").exists());
    let pid = env.start(BIND_OUTPUT, &["k", "127.0.0.1", &port]);
    let mut conn = accept(&listener);
    let out = env.bash(r#"echo again > "$FIFOBIND_DIR/k""#);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(read_lines_from(&mut conn, 1), ["again"]);
    kill(pid, libc::SIGTERM);
    assert!(wait_gone(pid, PATIENCE));
    env.assert_clean();
}

/// Writers that open and close the FIFO for every line lose nothing and
/// keep their order.
#[test]
fn writers_reopening_per_line_arrive_in_order() {
    let env = Env::new();
    let (listener, port) = listener();
    let pid = env.start(BIND_OUTPUT, &["w", "127.0.0.1", &port.to_string()]);
    let mut conn = accept(&listener);
    let out = env.bash(r#"for i in $(seq 1 500); do echo "line $i" > "$FIFOBIND_DIR/w"; done"#);
    assert!(out.status.success(), "{}", describe(&out));
    let want: Vec<String> = (1..=500).map(|i| format!("line {i}")).collect();
    assert_eq!(read_lines_from(&mut conn, 500), want);
    kill(pid, libc::SIGTERM);
    assert!(wait_gone(pid, PATIENCE));
    env.assert_clean();
}

/// Regression: once the relay's buffer had been filled and fully sent,
/// the FIFO was never polled again and writers hung after ~128 KiB.
#[test]
fn more_than_a_buffer_full_keeps_flowing() {
    let env = Env::new();
    let (listener, port) = listener();
    let pid = env.start(BIND_OUTPUT, &["big", "127.0.0.1", &port.to_string()]);
    let mut conn = accept(&listener);
    let writer = env.spawn_bash(r#"seq 1 400000 > "$FIFOBIND_DIR/big""#);
    let got = read_lines_from(&mut conn, 400_000);
    assert_eq!(got.len(), 400_000, "{}", env.logs());
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, l)| *l == (i + 1).to_string())
    );
    drop(writer);
    kill(pid, libc::SIGTERM);
    assert!(wait_gone(pid, PATIENCE));
    env.assert_clean();
}

/// SIGTERM right after the last write still sends everything, then
/// closes the connection.
#[test]
fn sigterm_flushes_what_was_written() {
    let env = Env::new();
    let (listener, port) = listener();
    let receiver = std::thread::spawn(move || {
        let mut conn = accept(&listener);
        read_lines_from(&mut conn, usize::MAX)
    });
    let script = format!(
        r#"
        pid=$(bind-output flush 127.0.0.1 {port}) || exit
        echo "$pid"
        fifo=$FIFOBIND_DIR/flush
        for i in $(seq 1 2000); do echo "line $i" > "$fifo"; done
        kill -TERM "$pid"
        "#
    );
    let out = env.bash(&script);
    assert!(out.status.success(), "{}", describe(&out));
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(wait_gone(pid, Duration::from_secs(1)), "{}", env.logs());
    // End-of-file after the last line: the receiver stops there.
    let got = receiver.join().unwrap();
    let want: Vec<String> = (1..=2000).map(|i| format!("line {i}")).collect();
    assert_eq!(got.len(), want.len(), "{}", env.logs());
    assert_eq!(got, want);
    env.assert_clean();
}

/// When the remote end closes, the binding cleans up and exits by itself.
#[test]
fn remote_close_ends_the_binding() {
    let env = Env::new();
    let (listener, port) = listener();
    let pid = env.start(BIND_OUTPUT, &["gone", "127.0.0.1", &port.to_string()]);
    drop(accept(&listener));
    assert!(
        wait_gone(pid, Duration::from_secs(3)),
        "still running after the remote closed\n{}",
        env.logs()
    );
    env.assert_clean();
}

/// HOST may be an IPv6 address, bare or in brackets.
#[test]
fn connects_over_ipv6() {
    if !has_ipv6() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let listener = std::net::TcpListener::bind(("::1", port)).unwrap();
    for host in ["::1", "[::1]"] {
        let pid = env.start(BIND_OUTPUT, &["six", host, &port.to_string()]);
        let mut conn = accept(&listener);
        assert!(conn.peer_addr().unwrap().is_ipv6());
        let out = env.bash(r#"echo "via v6" > "$FIFOBIND_DIR/six""#);
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(read_lines_from(&mut conn, 1), ["via v6"]);
        kill(pid, libc::SIGTERM);
        assert!(wait_gone(pid, PATIENCE));
    }
    env.assert_clean();
}

/// When bind-output returns, it is connected and its FIFO exists.
#[test]
fn ready_when_it_returns() {
    let env = Env::new();
    let (listener, port) = listener();
    listener.set_nonblocking(true).unwrap();
    for round in 0..10 {
        let pid = env.start(BIND_OUTPUT, &["ready", "127.0.0.1", &port.to_string()]);
        let fifo_there =
            std::fs::symlink_metadata(env.fifo("ready")).is_ok_and(|m| m.file_type().is_fifo());
        assert!(fifo_there, "round {round}: no FIFO yet");
        let mut conn = accept(&listener);
        // Writable at once: open(2) for writing does not block.
        let mut fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(env.fifo("ready"))
            .unwrap();
        fifo.write_all(b"now\n").unwrap();
        drop(fifo);
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"now\n");
        kill(pid, libc::SIGTERM);
        assert!(wait_gone(pid, PATIENCE));
    }
    env.assert_clean();
}

/// A remote that stops reading cannot hold a stopping binding: it gives
/// up flushing and exits within the second the spec allows.
#[test]
fn sigterm_with_stalled_remote_still_exits() {
    let env = Env::new();
    let (listener, port) = listener();
    let pid = env.start(BIND_OUTPUT, &["stall", "127.0.0.1", &port.to_string()]);
    let _conn = accept(&listener); // never read
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(env.fifo("stall"))
        .unwrap();
    // Fill the binding, the socket buffers and the FIFO, until nothing
    // moves any more.
    let chunk = "z".repeat(1023) + "\n";
    let mut moved = Instant::now();
    let filled = wait_for(PATIENCE, || {
        loop {
            match fifo.write(chunk.as_bytes()) {
                Ok(_) => moved = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write into FIFO: {e}"),
            }
        }
        moved.elapsed() > Duration::from_millis(200)
    });
    assert!(filled, "the FIFO never filled up");
    drop(fifo);
    let signalled = Instant::now();
    kill(pid, libc::SIGTERM);
    assert!(wait_gone(pid, PATIENCE));
    let took = signalled.elapsed();
    // The binding gives up flushing after 0.9 s to meet the spec's one
    // second; the rest is slack for a loaded test machine.
    assert!(took < Duration::from_millis(1250), "exit took {took:?}");
    // Whether it gave up ("N bytes not sent") or the kernel's buffers,
    // grown meanwhile, took the rest depends on the kernel's autotuning;
    // the time limit holds either way.
    assert!(env.logs().contains("stopping: SIGTERM"), "{}", env.logs());
    env.assert_clean();
}
