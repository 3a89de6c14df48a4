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

/// A host the resolver does not know is 68: inside fresh network and
/// mount namespaces, with the host database limited to /etc/hosts, so no
/// query can leave the machine.
#[test]
fn unknown_host_is_nohost() {
    if !can_unshare_net() {
        return;
    }
    let env = Env::new();
    let nsswitch = env.tmp().join("nsswitch.conf");
    std::fs::write(&nsswitch, "hosts: files\n").unwrap();
    let port = free_port().to_string();
    let out = run_with_timeout(env.cmd("unshare").args([
        "-n",
        "-m",
        "--",
        "sh",
        "-c",
        r#"mount --bind "$1" /etc/nsswitch.conf && exec "$2" lost no-such-host.invalid "$3""#,
        "sh",
        nsswitch.to_str().unwrap(),
        BIND_OUTPUT,
        &port,
    ]));
    assert_fails(&out, 68, "no-such-host.invalid");
    assert!(
        describe(&out).contains("unknown host"),
        "{}",
        describe(&out)
    );
    env.assert_clean();
}

/// Regression: a resolver that cannot be reached (EAI_AGAIN) was an
/// unknown host, 68; it is a temporary failure, 75. In a fresh network
/// namespace no name server answers, and no query leaves the machine.
#[test]
fn unreachable_resolver_is_tempfail() {
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
    assert_fails(&out, 75, "no-such-host.invalid");
    assert!(
        describe(&out).contains("temporary failure in name resolution"),
        "{}",
        describe(&out)
    );
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
        let binding = env.start(BIND_OUTPUT, &[id, "127.0.0.1", &port.to_string()]);
        let mut conn = accept(&listener);
        assert!(env.fifo(id).exists() && env.lock(id).exists());
        binding.stop_within(sig, Duration::from_secs(1));
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
    let binding = env.start(BIND_OUTPUT, &["k", "127.0.0.1", &port]);
    binding.kill();
    drop(accept(&listener));
    assert!(env.fifo("k").exists() && env.lock("k").exists());
    let binding = env.start(BIND_OUTPUT, &["k", "127.0.0.1", &port]);
    let mut conn = accept(&listener);
    let out = env.bash(r#"echo again > "$FIFOBIND_DIR/k""#);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(read_lines_from(&mut conn, 1), ["again"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Writers that open and close the FIFO for every line lose nothing and
/// keep their order.
#[test]
fn writers_reopening_per_line_arrive_in_order() {
    let env = Env::new();
    let (listener, port) = listener();
    let binding = env.start(BIND_OUTPUT, &["w", "127.0.0.1", &port.to_string()]);
    let mut conn = accept(&listener);
    let out = env.bash(r#"for i in $(seq 1 500); do echo "line $i" > "$FIFOBIND_DIR/w"; done"#);
    assert!(out.status.success(), "{}", describe(&out));
    let want: Vec<String> = (1..=500).map(|i| format!("line {i}")).collect();
    assert_eq!(read_lines_from(&mut conn, 500), want);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Regression: once the relay's buffer had been filled and fully sent,
/// the FIFO was never polled again and writers hung after ~128 KiB.
#[test]
fn more_than_a_buffer_full_keeps_flowing() {
    let env = Env::new();
    let (listener, port) = listener();
    let binding = env.start(BIND_OUTPUT, &["big", "127.0.0.1", &port.to_string()]);
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
    binding.stop(libc::SIGTERM);
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
    let pid = printed_pid(&out);
    assert!(wait_gone(pid, Duration::from_secs(1)), "{}", env.logs());
    // End-of-file after the last line: the receiver stops there.
    let got = receiver.join().unwrap();
    let want: Vec<String> = (1..=2000).map(|i| format!("line {i}")).collect();
    assert_eq!(got.len(), want.len(), "{}", env.logs());
    assert_eq!(got, want);
    env.assert_clean();
}

/// When the remote end closes, the binding cleans up and exits by
/// itself, at the first send that fails: its end-of-file alone may be a
/// half-close (see `half_closing_remote_still_receives`).
#[test]
fn remote_close_ends_the_binding() {
    let env = Env::new();
    let (listener, port) = listener();
    let binding = env.start(BIND_OUTPUT, &["gone", "127.0.0.1", &port.to_string()]);
    drop(accept(&listener));
    // One writer, holding the FIFO open: a shell redirection after the
    // binding is gone would create a regular file in its place.
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(env.fifo("gone"))
        .unwrap();
    let ended = wait_for(PATIENCE, || {
        // EPIPE once the binding is gone: it may end any moment.
        let _ = fifo.write(b"anyone there?\n");
        std::thread::sleep(Duration::from_millis(20));
        !alive(binding.pid)
    });
    assert!(
        ended,
        "still running after the remote closed\n{}",
        env.logs()
    );
    assert!(
        env.logs().contains("closed the connection"),
        "{}",
        env.logs()
    );
    env.assert_clean();
}

/// Regression: a remote that shuts its sending side at once (`ncat -l
/// --recv-only`) was taken for a closed one, and got none of the lines.
#[test]
fn half_closing_remote_still_receives() {
    let env = Env::new();
    let (listener, port) = listener();
    let binding = env.start(BIND_OUTPUT, &["half", "127.0.0.1", &port.to_string()]);
    let mut conn = accept(&listener);
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    // The binding has read the end-of-file before the lines come.
    assert!(
        wait_for(PATIENCE, || env.logs().contains("shut its sending side")),
        "{}",
        env.logs()
    );
    let out = env.bash(r#"for i in $(seq 1 100); do echo "line $i" > "$FIFOBIND_DIR/half"; done"#);
    assert!(out.status.success(), "{}", describe(&out));
    let want: Vec<String> = (1..=100).map(|i| format!("line {i}")).collect();
    assert_eq!(read_lines_from(&mut conn, 100), want, "{}", env.logs());
    assert!(alive(binding.pid), "{}", env.logs());
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// The same with the real `ncat -l --recv-only`.
#[test]
fn ncat_recv_only_gets_every_line() {
    if !have_tool("ncat", "ncat") {
        return;
    }
    let env = Env::new();
    let port = free_port().to_string();
    let got = env.tmp().join("got");
    let script = format!(
        r#"
        ncat -l --recv-only 127.0.0.1 {port} > "{}" & ncat=$!
        for i in $(seq 1 200); do
            pid=$(bind-output half 127.0.0.1 {port} 2>/dev/null) && break
            sleep 0.05
        done
        [ -n "$pid" ] || exit 9
        for i in $(seq 1 100); do echo "line $i" > "$FIFOBIND_DIR/half"; done
        kill -USR1 "$pid"
        wait "$ncat"
        "#,
        got.display()
    );
    let out = env.bash(&script);
    assert!(out.status.success(), "{}\n{}", describe(&out), env.logs());
    let got = std::fs::read_to_string(got).unwrap();
    let want: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    assert_eq!(got, want, "{}", env.logs());
    env.assert_clean();
}

/// Regression: after SIGUSR1 the binding ended as soon as the FIFO was
/// empty for an instant, while a writer (a finished daemon's child) was
/// still writing. It now sends until every writer has closed the FIFO.
#[test]
fn drain_waits_for_every_writer() {
    let env = Env::new();
    let (listener, port) = listener();
    let binding = env.start(BIND_OUTPUT, &["late", "127.0.0.1", &port.to_string()]);
    let mut conn = accept(&listener);
    // A writer that goes on writing, slowly, after the signal: the FIFO
    // is empty between its lines.
    let _writer = env.spawn_bash(
        r#"exec 3> "$FIFOBIND_DIR/late"
        for i in $(seq 1 100); do echo "line $i" >&3; sleep 0.01; done"#,
    );
    // At least the first line (one read may bring more).
    let mut got = read_lines_from(&mut conn, 1);
    kill(binding.pid, libc::SIGUSR1);
    assert!(got.len() < 100, "the writer was done before the signal");
    let (rest, closed) = read_until_closed(&mut conn, PATIENCE);
    assert!(closed, "the binding did not close after draining");
    got.extend(rest);
    let want: Vec<String> = (1..=100).map(|i| format!("line {i}")).collect();
    assert_eq!(got, want, "{}", env.logs());
    binding.assert_exits(PATIENCE, "SIGUSR1");
    env.assert_clean();
}

/// An error is one line written with one write(2), so that a shell (or
/// anything else) writing to the same stderr cannot cut it: stderr is a
/// datagram socket here, where each write is a message of its own.
/// Regression: `eprintln!` wrote "bind-input", then ": cannot ...", and
/// under `ulimit -n` a coproc's errors landed between the two.
#[test]
fn an_error_line_is_one_write() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let env = Env::new();
    // Nothing accepts there once the listener is gone: refused, 69.
    let refused = {
        let (l, p) = listener();
        drop(l);
        p.to_string()
    };
    for (program, args) in [
        (BIND_INPUT, vec!["../x", "4000"]),
        (BIND_OUTPUT, vec!["out1", "127.0.0.1", refused.as_str()]),
    ] {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors, owned from here on.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair");
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let status = env
            .cmd(program)
            .env_remove("RUST_LOG")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(theirs)
            .status()
            .unwrap();
        assert!(!status.success(), "{program} {args:?} succeeded");
        // Until every holder of the other end has closed it (end of
        // file), at most PATIENCE.
        socket2::SockRef::from(&ours)
            .set_read_timeout(Some(PATIENCE))
            .unwrap();
        let mut writes = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: recv into our buffer; one message per call.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&ours),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            writes.push(String::from_utf8_lossy(&buf[..n as usize]).to_string());
        }
        assert_eq!(writes.len(), 1, "{program} {args:?} wrote {writes:?}");
        let prefix = format!(
            "{}: ",
            std::path::Path::new(program)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        );
        assert!(
            writes[0].starts_with(&prefix)
                && writes[0].ends_with('\n')
                && writes[0].lines().count() == 1,
            "{writes:?}"
        );
    }
    env.assert_clean();
}

/// Out of descriptors at every step of the start (`ulimit -n`): each
/// failure is status 71 with a message saying what failed, and leaves
/// nothing behind; regression: the FIFO and the claim were left, and the
/// message was a bare "too many open files".
#[test]
fn out_of_descriptors_leaves_nothing() {
    let env = Env::new();
    let (listener, port) = listener();
    listener.set_nonblocking(true).unwrap();
    let in_port = free_port();
    let (mut failed, mut started) = (0, 0);
    for limit in 4..=14 {
        for fg in ["", "--foreground"] {
            for (program, args) in [
                ("bind-input", format!("{fg} fdin {in_port}")),
                ("bind-output", format!("{fg} fdout 127.0.0.1 {port}")),
            ] {
                // In the foreground a started binding is stopped at once
                // by its own shell, once it has printed its PID.
                let script = format!(
                    r#"ulimit -n {limit}
                    if [ -n "{fg}" ]; then
                        coproc {program} {args}
                        read -r pid <&"${{COPROC[0]}}" && kill "$pid"
                        wait "$COPROC_PID"
                    else
                        {program} {args}
                    fi"#
                );
                let out = env.bash(&script);
                let what = format!(
                    "{program} {args} with ulimit -n {limit}: {}",
                    describe(&out)
                );
                if out.status.success() {
                    started += 1;
                    if fg.is_empty() {
                        env.binding(printed_pid(&out)).stop(libc::SIGTERM);
                    }
                } else {
                    failed += 1;
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    // In the foreground, log lines come before it, and
                    // the shell's own errors (its coproc short of
                    // descriptors) share this stderr: the binding's line,
                    // one write, may land inside one of theirs, whole.
                    let prefix = format!("{program}: ");
                    let errors: Vec<&str> = stderr
                        .lines()
                        .filter_map(|l| l.find(&prefix).map(|i| &l[i..]))
                        .collect();
                    assert_eq!(errors.len(), 1, "{what}");
                    let err = errors[0];
                    assert_eq!(out.status.code(), Some(71), "{what}");
                    assert!(
                        err.starts_with(&format!("{prefix}cannot ")),
                        "no context: {what}"
                    );
                    assert!(
                        err.contains("too many open files") || err.contains("errno 24"),
                        "{what}"
                    );
                }
                while let Ok((conn, _)) = listener.accept() {
                    drop(conn);
                }
                let procs = env.wait_no_processes(PATIENCE);
                assert!(procs.is_empty(), "{what}: left running {procs:?}");
                let files = env.leftovers();
                assert!(files.is_empty(), "{what}: left {files:?}");
            }
        }
    }
    assert!(
        failed > 0 && started > 0,
        "failed {failed}, started {started}"
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
        let binding = env.start(BIND_OUTPUT, &["six", host, &port.to_string()]);
        let mut conn = accept(&listener);
        assert!(conn.peer_addr().unwrap().is_ipv6());
        let out = env.bash(r#"echo "via v6" > "$FIFOBIND_DIR/six""#);
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(read_lines_from(&mut conn, 1), ["via v6"]);
        binding.stop(libc::SIGTERM);
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
        let binding = env.start(BIND_OUTPUT, &["ready", "127.0.0.1", &port.to_string()]);
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
        binding.stop(libc::SIGTERM);
    }
    env.assert_clean();
}

/// A remote that stops reading cannot hold a stopping binding: it gives
/// up flushing and exits within the second the spec allows.
#[test]
fn sigterm_with_stalled_remote_still_exits() {
    let env = Env::new();
    let (listener, port) = listener();
    let binding = env.start(BIND_OUTPUT, &["stall", "127.0.0.1", &port.to_string()]);
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
    binding.stop(libc::SIGTERM);
    let took = signalled.elapsed();
    // The binding gives up flushing after 0.9 s to meet the spec's one
    // second. A loaded machine adds its own delays (1.5 s seen under two
    // CPU hogs): the bound is what tells "gave up" from "waited for the
    // remote", which without the limit is forever.
    println!("stalled remote: SIGTERM to exit {took:?}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    // Whether it gave up ("N bytes not sent") or the kernel's buffers,
    // grown meanwhile, took the rest depends on the kernel's autotuning;
    // the time limit holds either way.
    assert!(env.logs().contains("stopping: SIGTERM"), "{}", env.logs());
    env.assert_clean();
}
