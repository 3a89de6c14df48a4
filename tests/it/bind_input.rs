//! bind-input: the seed's example, arguments, statuses, data and signals.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::Duration;

use crate::util::*;

/// The documented loop (README, bind-input(1)), verbatim but for the port.
#[test]
fn seed_example_loop() {
    let env = Env::new();
    let port = free_port();
    let sender = std::thread::spawn(move || {
        for word in ["hello", "world"] {
            send(port, format!("{word}\n").as_bytes());
        }
        send(port, b"END\n");
    });
    let script = SEED_LOOP.replace("9999", &port.to_string());
    let out = env.bash(&script);
    sender.join().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got: hello\ngot: world\n"
    );
    env.assert_clean();
}

/// Every malformed command line: exit 2, one line naming the culprit,
/// nothing on stdout, and not even the runtime directory created.
#[test]
fn bad_arguments_are_refused_before_anything_is_created() {
    let env = Env::new();
    let port = free_port().to_string();
    let p = port.as_str();
    let long_id = "x".repeat(65);
    let cases: &[(&[&str], &str)] = &[
        (&[], "ID"),
        (&["in1"], "PORT"),
        (&["in1", p, "extra"], "extra"),
        (&["in1", "80"], "80"),
        (&["in1", "1023"], "1023"),
        (&["in1", "49152"], "49152"),
        (&["in1", "9x9"], "9x9"),
        (&["in1", ""], "PORT"),
        (&["../x", p], "../x"),
        (&["a/b", p], "a/b"),
        (&[".x", p], ".x"),
        (&["-x", p], "-x"),
        (&["--", "-x", p], "-x"),
        (&["", p], "ID"),
        (&[&long_id, p], "ID"),
        (&["--bind", "a b", "in1", p], "a b"),
        (&["--allow", "nowhere", "in1", p], "nowhere"),
        (&["--no-such-option", "in1", p], "--no-such-option"),
    ];
    env.assert_usage_errors(BIND_INPUT, cases);
    env.assert_clean();
}

#[test]
fn port_in_use_is_unavailable() {
    let env = Env::new();
    let port = free_port();
    let _holder = std::net::TcpListener::bind(("::", port)).unwrap();
    let out = env.run(BIND_INPUT, &["busy", &port.to_string()]);
    assert_fails(&out, 69, &port.to_string());
    env.assert_clean();
}

/// A live ID is refused to either command; the binding that holds it is
/// not disturbed.
#[test]
fn live_id_is_refused_and_keeps_working() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["live", &port.to_string()]);
    let other = free_port().to_string();
    let out = env.run(BIND_INPUT, &["live", &other]);
    assert_fails(&out, 73, "live");
    let (_listener, lport) = listener();
    let out = env.run(BIND_OUTPUT, &["live", "127.0.0.1", &lport.to_string()]);
    assert_fails(&out, 73, "live");
    assert!(alive(binding.pid));
    send(port, b"still here\n");
    assert_eq!(read_lines(&env.fifo("live"), 1), ["still here"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// A regular file or a symbolic link where the FIFO would go is refused
/// (73) and left exactly as it was, whichever command meets it.
#[test]
fn file_or_symlink_in_the_way_is_refused_untouched() {
    let env = Env::new();
    env.make_dir(0o700);
    let target = env.tmp().join("precious");
    fs::write(&target, b"precious\n").unwrap();
    fs::write(env.fifo("file"), b"mine\n").unwrap();
    std::os::unix::fs::symlink(&target, env.fifo("link")).unwrap();
    let port = free_port().to_string();
    let (_listener, lport) = listener();
    let lport = lport.to_string();
    for id in ["file", "link"] {
        let out = env.run(BIND_INPUT, &[id, &port]);
        assert_fails(&out, 73, id);
        let out = env.run(BIND_OUTPUT, &[id, "127.0.0.1", &lport]);
        assert_fails(&out, 73, id);
        assert!(!env.lock(id).exists(), "claim of {id} left behind");
    }
    assert_eq!(fs::read(env.fifo("file")).unwrap(), b"mine\n");
    assert_eq!(fs::read_link(env.fifo("link")).unwrap(), target);
    assert_eq!(fs::read(&target).unwrap(), b"precious\n");
    let mut left = env.leftovers();
    left.sort();
    assert_eq!(left, ["file", "link"]);
    fs::remove_file(env.fifo("file")).unwrap();
    fs::remove_file(env.fifo("link")).unwrap();
    env.assert_clean();
}

/// A runtime directory others may write into, or another user's, is
/// refused (77) by both commands, and nothing is created in it.
#[test]
fn unsafe_runtime_directory_is_refused() {
    let port = free_port().to_string();
    let (_listener, lport) = listener();
    let lport = lport.to_string();
    let check = |env: &Env, why: &str| {
        let out = env.run(BIND_INPUT, &["x", &port]);
        assert_fails(&out, 77, &env.dir.display().to_string());
        let out = env.run(BIND_OUTPUT, &["x", "127.0.0.1", &lport]);
        assert_fails(&out, 77, &env.dir.display().to_string());
        let inside: Vec<_> = fs::read_dir(&env.dir).unwrap().collect();
        assert!(inside.is_empty(), "{why}: created {inside:?}");
    };

    let env = Env::new();
    env.make_dir(0o777);
    check(&env, "mode 0777");
    assert_eq!(fs::metadata(&env.dir).unwrap().mode() & 0o7777, 0o777);

    if is_root() {
        let env = Env::new();
        env.make_dir(0o700);
        std::os::unix::fs::chown(&env.dir, Some(65534), Some(65534)).unwrap();
        check(&env, "owned by uid 65534");
    } else {
        skip_or_fail("the other-owner case needs root, to chown");
    }
}

/// SIGINT, SIGHUP and SIGTERM each close the binding within a second,
/// taking its FIFO and claim along.
#[test]
fn stop_signals_close_properly() {
    let env = Env::new();
    for (sig, id) in [
        (libc::SIGINT, "int"),
        (libc::SIGHUP, "hup"),
        (libc::SIGTERM, "term"),
    ] {
        let port = free_port();
        let binding = env.start(BIND_INPUT, &[id, &port.to_string()]);
        // A live connection must not hold it open.
        let _conn = connect(port);
        assert!(env.fifo(id).exists() && env.lock(id).exists());
        binding.stop_within(sig, Duration::from_secs(1));
    }
    env.assert_clean();
}

/// What SIGKILL leaves (FIFO, claim) is stale, never "in use": the next
/// binding of the same ID and port starts at once.
#[test]
fn sigkill_leftovers_are_reclaimed_at_once() {
    let env = Env::new();
    let port = free_port();
    let p = port.to_string();
    let binding = env.start(BIND_INPUT, &["k", &p]);
    // A connection still open when it dies must not keep the port taken.
    let mut held = connect(port);
    held.write_all(b"lost with it\n").unwrap();
    binding.kill();
    assert!(env.fifo("k").exists() && env.lock("k").exists());

    let binding = env.start(BIND_INPUT, &["k", &p]);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"fresh\n").unwrap();
    drop(conn);
    assert_eq!(read_lines(&env.fifo("k"), 1), ["fresh"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Line `i` of connection `c`: varied lengths, every 97th longer than
/// PIPE_BUF, two longer than bind-input's 128 KiB buffer, content that
/// shows any mix-up.
fn varied_line(c: usize, i: usize) -> String {
    let len = if i % 997 == 500 {
        // Longer than the binding's buffer: passed on in pieces, still
        // never mixed with another connection's lines.
        200_000 + c
    } else if i % 97 == 5 {
        4097 + (i * 13 + c * 101) % 6000
    } else {
        (i * 31 + c * 7) % 200
    };
    let fill = (b'a' + ((i + c) % 26) as u8) as char;
    format!("c{c} {i} {}", fill.to_string().repeat(len))
}

/// Concurrent connections: every line whole, exactly once, in order per
/// connection.
#[test]
fn concurrent_senders_never_interleave() {
    const CONNS: usize = 8;
    const LINES: usize = 2000;
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["many", &port.to_string()]);
    let senders: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut text = String::new();
                for i in 0..LINES {
                    text += &varied_line(c, i);
                    text.push('\n');
                }
                send(port, text.as_bytes());
            })
        })
        .collect();
    let lines = read_lines(&env.fifo("many"), CONNS * LINES);
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(lines.len(), CONNS * LINES, "{}", env.logs());
    let mut per_conn = vec![Vec::new(); CONNS];
    for line in lines {
        let c: usize = line
            .strip_prefix('c')
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("mangled line {:.80}", line));
        per_conn[c].push(line);
    }
    for (c, got) in per_conn.iter().enumerate() {
        let want: Vec<String> = (0..LINES).map(|i| varied_line(c, i)).collect();
        if *got != want {
            let at = got.iter().zip(&want).position(|(g, w)| g != w);
            panic!(
                "connection {c}: {} lines, first difference at {at:?}",
                got.len()
            );
        }
    }
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// A bash reader that reopens the FIFO for every line gets a burst of
/// lines whole, in order, none lost; the last line, sent without a
/// newline, is completed when its connection ends.
#[test]
fn reopening_bash_reader_loses_nothing() {
    let env = Env::new();
    let port = free_port();
    let want: Vec<String> = (0..300)
        .map(|i| format!("line-{i}-{}", "x".repeat(i * 7 % 500)))
        .collect();
    let mut text = want.join("\n");
    text += "\nEND"; // no newline: the end of the connection completes it
    let sender = std::thread::spawn(move || send(port, text.as_bytes()));
    let script = format!(
        r#"
        pid=$(bind-input burst {port}) || exit
        fifo=$(fifobind path burst)
        line=
        while true; do
            IFS= read -r -t 1 part < "$fifo"; status=$?
            line+=$part
            (( status > 128 )) && continue
            (( status != 0 )) && break
            [ -z "$line" ] && continue
            [ "$line" = END ] && break
            echo "$line"; line=
        done
        kill "$pid"
        "#
    );
    let out = env.bash(&script);
    sender.join().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let got: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(got, want);
    env.assert_clean();
}

/// Half a line never reaches the FIFO: it waits for its newline or the
/// end of its connection, while other connections' lines pass.
#[test]
fn partial_line_waits_for_its_connection_to_end() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["part", &port.to_string()]);
    let mut open = connect(port);
    open.write_all(b"first\nsecond half").unwrap();
    assert_eq!(read_lines(&env.fifo("part"), 1), ["first"]);
    send(port, b"other\n");
    // "second half" has no newline yet: only "other" may come out.
    assert_eq!(read_lines(&env.fifo("part"), 1), ["other"]);
    drop(open);
    assert_eq!(read_lines(&env.fifo("part"), 1), ["second half"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Without --bind the binding listens on IPv4 and IPv6 alike.
#[test]
fn dual_stack_accepts_ipv6() {
    if !has_ipv6() {
        return;
    }
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["six", &port.to_string()]);
    let mut s = std::net::TcpStream::connect(("::1", port)).unwrap();
    s.write_all(b"over ipv6\n").unwrap();
    drop(s);
    assert_eq!(read_lines(&env.fifo("six"), 1), ["over ipv6"]);
    send(port, b"over ipv4\n");
    assert_eq!(read_lines(&env.fifo("six"), 1), ["over ipv4"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// --bind 127.0.0.1 listens there only: ::1 is refused.
#[test]
fn bind_option_restricts_the_local_address() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(
        BIND_INPUT,
        &["--bind", "127.0.0.1", "four", &port.to_string()],
    );
    if has_ipv6() {
        let err = std::net::TcpStream::connect(("::1", port)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    send(port, b"via 127.0.0.1\n");
    assert_eq!(read_lines(&env.fifo("four"), 1), ["via 127.0.0.1"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// --allow ADDR closes connections from any other address at once and
/// passes none of their data, whatever the address family.
#[test]
fn allow_option_refuses_other_peers() {
    let env = Env::new();
    let local = |a: &str| a.parse::<IpAddr>().unwrap();
    let mut cases = vec![("127.0.0.1", "127.0.0.1", "127.0.0.2")];
    if has_ipv6() {
        cases.push(("::1", "::1", "127.0.0.1"));
    }
    for (allowed, good, bad) in cases {
        let port = free_port();
        let binding = env.start(
            BIND_INPUT,
            &["--allow", allowed, "guard", &port.to_string()],
        );
        let dest = |a: &str| SocketAddr::new(local(if a.contains(':') { "::1" } else { a }), port);
        let mut intruder = connect_from(local(bad), dest(bad)).unwrap();
        let _ = intruder.write_all(b"intruder\n");
        assert!(
            wait_closed(&mut intruder, PATIENCE),
            "{bad} was not refused by --allow {allowed}"
        );
        let mut friend = connect_from(local(good), dest(good)).unwrap();
        friend.write_all(b"friend\n").unwrap();
        drop(friend);
        assert_eq!(read_lines(&env.fifo("guard"), 1), ["friend"]);
        binding.stop(libc::SIGTERM);
    }
    env.assert_clean();
}

/// `pid=$(bind-input ...)` is race-free: the port accepts and the FIFO
/// exists the moment the command returns, with no retry.
#[test]
fn ready_when_it_returns() {
    let env = Env::new();
    for round in 0..10 {
        let port = free_port();
        let binding = env.start(BIND_INPUT, &["ready", &port.to_string()]);
        let fifo_there =
            fs::symlink_metadata(env.fifo("ready")).is_ok_and(|m| m.file_type().is_fifo());
        let conn = std::net::TcpStream::connect(("127.0.0.1", port));
        assert!(fifo_there, "round {round}: no FIFO yet");
        assert!(conn.is_ok(), "round {round}: {conn:?}");
        let mode = |p: &std::path::Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&env.fifo("ready")), 0o600, "FIFO mode");
        assert_eq!(mode(&env.dir), 0o700, "runtime directory mode");
        drop(conn);
        binding.stop(libc::SIGTERM);
    }
    env.assert_clean();
}

/// Connections made one after the other are written in that order, even
/// when the binding meets several of them in one round (as the seed's
/// `echo hello | nc; echo END | nc` scripts expect).
#[test]
fn sequential_connections_keep_their_order() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["seq", &port.to_string()]);
    let want: Vec<String> = (0..200).map(|i| format!("conn {i}")).collect();
    for line in &want {
        send(port, format!("{line}\n").as_bytes());
    }
    assert_eq!(read_lines(&env.fifo("seq"), want.len()), want);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Bindings starting at the same moment in one runtime directory, while
/// their sweeps reclaim what a SIGKILL left, all start.
#[test]
fn simultaneous_starts_all_succeed() {
    let env = Env::new();
    env.start(BIND_INPUT, &["stale", &free_port().to_string()])
        .kill();
    let env = std::sync::Arc::new(env);
    let starters: Vec<_> = (0..8)
        .map(|i| {
            let env = env.clone();
            std::thread::spawn(move || {
                let port = free_port();
                let id = format!("par{i}");
                let binding = env.start(BIND_INPUT, &[&id, &port.to_string()]);
                (binding, port, id)
            })
        })
        .collect();
    let started: Vec<_> = starters.into_iter().map(|s| s.join().unwrap()).collect();
    for (_, port, id) in &started {
        send(*port, format!("to {id}\n").as_bytes());
        assert_eq!(read_lines(&env.fifo(id), 1), [format!("to {id}")]);
    }
    for (binding, _, _) in started {
        binding.stop(libc::SIGTERM);
    }
    env.assert_clean();
}

/// A last line longer than the binding's buffer, without a newline, is
/// still completed when its connection ends, and the next connection's
/// line is not glued onto it.
#[test]
fn long_last_line_is_completed_at_end_of_connection() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["long", &port.to_string()]);
    // Around and beyond the 128 KiB buffer.
    for len in [131_071, 131_072, 131_073, 262_144, 300_000] {
        let long = "y".repeat(len);
        send(port, long.as_bytes());
        let got = read_lines(&env.fifo("long"), 1);
        let ends: Vec<_> = got
            .iter()
            .map(|l| &l[l.len().saturating_sub(20)..])
            .collect();
        assert!(
            got == [long.as_str()],
            "a {len}-byte line: got lines ending {ends:?}"
        );
    }
    send(port, b"next\n");
    assert_eq!(read_lines(&env.fifo("long"), 1), ["next"]);
    binding.stop(libc::SIGTERM);
    env.assert_clean();
}

/// Line `i` of the back-pressure test: `L<len>:<i>:xxx…`, `len` bytes
/// before its newline; lengths around PIPE_BUF and page multiples, and
/// some well past PIPE_BUF (still within the documented atomic size).
fn pressure_line(i: usize) -> String {
    let lens = [
        17, 300, 1500, 4000, 4095, 4096, 4097, 5000, 8191, 9000, 20000, 100,
    ];
    let len = lens[(i * 7 + i / 13) % lens.len()];
    let head = format!("L{len}:{i}:");
    format!("{head}{}\n", "x".repeat(len - head.len()))
}

/// A slow reader against a fast sender keeps the FIFO full: whatever the
/// fill, the FIFO holds whole lines only. Twenty times the binding is
/// frozen (SIGSTOP) the moment flow control has stalled the sender, the
/// FIFO is read down to its last lines, and a bash `read -t` loop that
/// reopens the FIFO for every read (as the seed's loop does) reads the
/// rest: it must never time out inside a line.
#[test]
fn full_fifo_holds_whole_lines_only() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["full", &port.to_string()]);
    let fifo = env.fifo("full");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let sender = std::thread::spawn(move || {
        let mut s = connect(port);
        for i in 0.. {
            let line = pressure_line(i);
            if s.write_all(line.as_bytes()).is_err() {
                return;
            }
            counter.fetch_add(line.len() as u64, Ordering::SeqCst);
        }
    });
    let script = r#"
        fifo=$1; n=0; bad=0; torn=0; late=0
        while true; do
            IFS= read -r -t 0.3 part < "$fifo"; status=$?
            if (( status > 128 )) && [ -n "$part" ]; then
                # Timed out inside a line: a half line in the FIFO, or a
                # machine too loaded to read 4 KiB a byte at a time in
                # 0.3 s. The binding is stopped, so only in the second
                # case does the rest come.
                IFS= read -r -t 5 rest < "$fifo"; status=$?
                (( status != 0 )) && { torn=$((torn + 1)); break; }
                part+=$rest; late=$((late + 1))
            fi
            (( status != 0 )) && break
            if [[ $part =~ ^L([0-9]+): ]] && (( ${#part} == BASH_REMATCH[1] )); then
                n=$((n + 1))
            else
                bad=$((bad + 1))
            fi
        done
        echo "$n $bad $torn $late"
    "#;
    let (mut torn, mut bad, mut lines, mut late) = (0, 0, 0, 0);
    for trial in 0..20 {
        assert!(
            wait_stalled(&sent, Duration::from_millis(300), PATIENCE).is_some(),
            "trial {trial}: the sender never stalled\n{}",
            env.logs()
        );
        kill(binding.pid, libc::SIGSTOP);
        // Read quickly down to the last few KiB, then to a line's end, as
        // bash would: the rest is for the bash reader.
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut unread) };
        let mut skip = (unread as usize).saturating_sub(12_000);
        let mut buf = vec![0u8; 1 << 16];
        while skip > 0 {
            let n = f.read(&mut buf[..skip.min(1 << 16)]).unwrap();
            assert!(n > 0);
            skip -= n;
        }
        let mut byte = [0u8];
        while f.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {}
        drop(f);
        let out = run_with_timeout(env.cmd("bash").args(["-c", script, "reader"]).arg(&fifo));
        kill(binding.pid, libc::SIGCONT);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: Vec<usize> = text
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        assert_eq!(v.len(), 4, "{}", describe(&out));
        lines += v[0];
        bad += v[1];
        torn += v[2];
        late += v[3];
    }
    println!(
        "back-pressure: {torn} torn lines in 20 trials ({lines} lines read by bash, {bad} bad, {late} completed after a slow read's timeout)"
    );
    assert_eq!(
        (torn, bad),
        (0, 0),
        "{lines} lines read whole\n{}",
        env.logs()
    );
    assert!(lines > 20, "the bash reader read {lines} lines");
    binding.stop(libc::SIGTERM);
    sender.join().unwrap();
    env.assert_clean();
}

/// A --once binding whose connection has ended but whose FIFO was removed
/// with a line still unread cannot be read empty any more: it exits.
#[test]
fn once_binding_exits_when_its_fifo_is_removed_unread() {
    let env = Env::new();
    let port = free_port();
    let binding = env.start(BIND_INPUT, &["--once", "gone", &port.to_string()]);
    send(port, b"never read\n");
    assert!(
        wait_for(PATIENCE, || env.logs().contains("ended")),
        "{}",
        env.logs()
    );
    fs::remove_file(env.fifo("gone")).unwrap();
    binding.assert_exits(PATIENCE, "its FIFO removed");
    assert!(env.logs().contains("removed"), "{}", env.logs());
    env.assert_clean();
}
