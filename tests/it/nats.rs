//! nats-output and nats-input against a real `nats-server -js`, started
//! by each test on a loopback port with a store of its own, stopped on
//! drop (the harness's [`NatsServer`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::{
    Env, PATIENCE, env_with_nats, kill, leftovers_but_positions, read_lines_from, wait_for,
    wait_gone,
};

const NATS_OUTPUT: &str = env!("CARGO_BIN_EXE_nats-output");
const NATS_INPUT: &str = env!("CARGO_BIN_EXE_nats-input");

/// Stops a consumer and a publisher with SIGTERM; both must be gone.
fn stop_both(input: i32, output: i32) {
    kill(input, libc::SIGTERM);
    kill(output, libc::SIGTERM);
    assert!(wait_gone(input, PATIENCE) && wait_gone(output, PATIENCE));
}

/// nats-input's arguments: binding `id` of `subject`, read through the
/// durable consumer `durable` of JetStream stream `stream`, from the
/// stream's first message if `all`.
fn durable<'a>(
    url: &'a str,
    (id, subject): (&'a str, &'a str),
    (stream, durable): (&'a str, &'a str),
    all: bool,
) -> Vec<&'a str> {
    let mut args = vec![
        id,
        subject,
        "-s",
        url,
        "--stream",
        stream,
        "--durable",
        durable,
    ];
    if all {
        args.extend(["--deliver", "all"]);
    }
    args
}

/// Writes `lines` into a FIFO from a thread, opening it once.
fn write_lines(fifo: PathBuf, lines: Vec<String>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open FIFO");
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
        for l in lines {
            w.write_all(l.as_bytes()).unwrap();
            w.write_all(b"\n").unwrap();
        }
        w.flush().unwrap();
    })
}

/// Opens a FIFO for reading without blocking on a missing writer.
fn open_fifo(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("open FIFO")
}

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

fn rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The bindings' logs, but their debug lines.
fn logs(env: &Env) -> String {
    env.logs()
        .lines()
        .filter(|l| !l.contains("DEBUG") && !l.contains("TRACE"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts no line came twice (the logs if one did); the lines seen.
fn assert_none_twice<'a>(got: &'a [String], env: &Env) -> std::collections::HashSet<&'a str> {
    let mut seen = std::collections::HashSet::new();
    let dups: Vec<&String> = got.iter().filter(|l| !seen.insert(l.as_str())).collect();
    assert!(
        dups.is_empty(),
        "{} lines twice, e.g. {:?}\n{}",
        dups.len(),
        &dups[..dups.len().min(3)],
        logs(env)
    );
    seen
}

/// Asserts every line of `want` came once, and nothing else (the
/// bindings' logs if not).
fn assert_once(got: &[String], want: &[String], env: &Env) {
    let seen = assert_none_twice(got, env);
    let missing: Vec<&String> = want.iter().filter(|l| !seen.contains(l.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} lines lost, e.g. {:?}\n{}",
        missing.len(),
        &missing[..missing.len().min(3)],
        logs(env)
    );
    assert_eq!(got.len(), want.len());
}

#[test]
fn nats_whole_lines_out_and_in_jetstream_and_core() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    // JetStream: the stream created by whichever side starts first.
    let input_binding = env.start(
        NATS_INPUT,
        &durable(&url, ("in1", "logs.>"), ("LOGS", "reader"), true),
    );
    let input = input_binding.pid;
    let output_binding = env.start(
        NATS_OUTPUT,
        &["out1", "logs.a", "-s", &url, "--stream", "LOGS"],
    );
    let output = output_binding.pid;
    let mut reader = open_fifo(&env.fifo("in1"));
    fs::write(env.fifo("out1"), "hello\nworld\n").unwrap();
    // Written in two parts: only the whole line is published.
    let mut w = fs::OpenOptions::new()
        .write(true)
        .open(env.fifo("out1"))
        .unwrap();
    w.write_all(b"half of ").unwrap();
    w.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    w.write_all(b"a line\nno newline").unwrap();
    drop(w);
    // Drain: the last line is completed, everything sent, then the exit.
    kill(output, libc::SIGUSR1);
    let got = read_lines_from(&mut reader, 4);
    assert_eq!(
        got,
        ["hello", "world", "half of a line", "no newline"],
        "{}",
        env.logs()
    );
    assert!(
        wait_gone(output, PATIENCE),
        "nats-output did not end after draining"
    );
    kill(input, libc::SIGTERM);
    assert!(wait_gone(input, PATIENCE));

    // Core NATS: the same lines, no stream.
    let input_binding = env.start(NATS_INPUT, &["in2", "plain.*", "-s", &url, "--core"]);
    let input = input_binding.pid;
    let output_binding = env.start(NATS_OUTPUT, &["out2", "plain.x", "-s", &url, "--core"]);
    let output = output_binding.pid;
    let mut reader = open_fifo(&env.fifo("in2"));
    fs::write(env.fifo("out2"), "one\ntwo\n").unwrap();
    assert_eq!(
        read_lines_from(&mut reader, 2),
        ["one", "two"],
        "{}",
        env.logs()
    );
    kill(output, libc::SIGTERM);
    kill(input, libc::SIGTERM);
    assert!(wait_gone(output, PATIENCE) && wait_gone(input, PATIENCE));
    // Nothing of the bindings is left but the consumer's position record.
    let left = leftovers_but_positions(&env);
    assert!(left.is_empty(), "left: {left:?}");
}

#[test]
fn nats_100000_lines_from_three_publishers_once_and_in_order() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    let input_binding = env.start(
        NATS_INPUT,
        &durable(&url, ("all", "fan.>"), ("FAN", "all"), false),
    );
    let mut reader = open_fifo(&env.fifo("all"));
    let per = [33_334, 33_333, 33_333];
    let mut writers = Vec::new();
    let mut want = Vec::new();
    let mut outputs = Vec::new();
    let started = Instant::now();
    for (p, &n) in per.iter().enumerate() {
        let id = format!("p{p}");
        outputs.push(env.start(
            NATS_OUTPUT,
            &[&id, &format!("fan.{id}"), "-s", &url, "--stream", "FAN"],
        ));
        let ls = lines(&id, n);
        want.extend(ls.clone());
        writers.push(write_lines(env.fifo(&id), ls));
    }
    let got = read_count(&mut reader, 100_000, Duration::from_secs(90));
    let secs = started.elapsed().as_secs_f64();
    for w in writers {
        w.join().unwrap();
    }
    eprintln!(
        "100000 lines, 3 publishers -> JetStream -> 1 consumer -> FIFO: {secs:.2} s, {:.0} lines/s",
        got.len() as f64 / secs
    );
    assert_once(&got, &want, &env);
    for p in 0..3 {
        let prefix = format!("p{p} ");
        let order: Vec<usize> = got
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "publisher p{p} out of order"
        );
    }
    for binding in outputs.into_iter().chain([input_binding]) {
        binding.stop(libc::SIGTERM);
    }
}

#[test]
fn nats_consumer_sigkilled_and_restarted_resumes_without_loss_or_duplicate() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    let n = 30_000;
    let want = lines("k", n);
    let output_binding = env.start(
        NATS_OUTPUT,
        &["out", "kill.a", "-s", &url, "--stream", "KILL"],
    );
    let output = output_binding.pid;
    let args = durable(&url, ("in", "kill.a"), ("KILL", "k"), true);
    let input_binding = env.start(NATS_INPUT, &args);
    let input = input_binding.pid;
    let mut reader = open_fifo(&env.fifo("in"));
    let writer = write_lines(env.fifo("out"), want.clone());
    let mut got = read_lines_from(&mut reader, n / 3);
    kill(input, libc::SIGKILL);
    assert!(wait_gone(input, PATIENCE));
    // What the dead binding had put into its FIFO is still there to read.
    got.extend(read_lines_from(&mut reader, n));
    let before = got.len();
    let input_binding = env.start(NATS_INPUT, &args);
    let input = input_binding.pid;
    let mut reader = open_fifo(&env.fifo("in"));
    got.extend(read_count(&mut reader, n - before, Duration::from_secs(60)));
    writer.join().unwrap();
    eprintln!(
        "consumer SIGKILLed after {before} of {n} lines; restarted, {} more",
        got.len() - before
    );
    assert_once(&got, &want, &env);
    let order: Vec<usize> = got
        .iter()
        .filter_map(|l| l.strip_prefix("k ")?.parse().ok())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order across the restart"
    );
    stop_both(input, output);
}

/// The kill of the test above, many times in one run and wherever the
/// consumer is at that instant: a line recorded only after its write(2)
/// came twice each time a kill fell into that write. Each restart comes
/// before the dead binding's FIFO is read out, so its lines must still
/// read as they were written.
#[test]
fn nats_consumer_sigkilled_many_times_writes_every_line_once() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    let (n, kills): (usize, usize) = (12_000, 10);
    let pad = "y".repeat(200);
    let want: Vec<String> = (0..n).map(|i| format!("m {i} {pad}")).collect();
    let output = env.start(
        NATS_OUTPUT,
        &["out", "many.a", "-s", &url, "--stream", "MANY"],
    );
    let args = durable(&url, ("in", "many.a"), ("MANY", "m"), true);
    let mut input = env.start(NATS_INPUT, &args);
    let mut reader = open_fifo(&env.fifo("in"));
    let writer = write_lines(env.fifo("out"), want.clone());
    let mut got = Vec::new();
    for k in 1..=kills {
        let more = (k * n / (kills + 1)).saturating_sub(got.len()).max(1);
        got.extend(read_lines_from(&mut reader, more));
        kill(input.pid, libc::SIGKILL);
        assert!(wait_gone(input.pid, PATIENCE));
        input = env.start(NATS_INPUT, &args);
        // The dead binding's FIFO, read out only now: end-of-file at its
        // end (its writer is gone).
        got.extend(read_count(&mut reader, n, PATIENCE));
        reader = open_fifo(&env.fifo("in"));
    }
    got.extend(read_count(
        &mut reader,
        n - got.len(),
        Duration::from_secs(60),
    ));
    writer.join().unwrap();
    eprintln!(
        "consumer SIGKILLed {kills} times; {} lines in all",
        got.len()
    );
    assert_once(&got, &want, &env);
    let order: Vec<usize> = got
        .iter()
        .filter_map(|l| l.strip_prefix("m ")?.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "out of order across the restarts"
    );
    input.stop(libc::SIGTERM);
    output.stop(libc::SIGTERM);
}

#[test]
fn nats_server_restarted_mid_stream_loses_nothing_under_jetstream() {
    server_restarted(20_000, 4, libc::SIGTERM);
}

/// A server stopped soon after the consumer began has not stored its
/// acknowledgements yet: once restarted, it delivers the lines written
/// again, as new ones. They must be known by the binding's own record,
/// not by the server's count of deliveries.
#[test]
fn nats_server_restarted_soon_after_the_consumer_began_writes_no_line_twice() {
    server_restarted(6_000, 12, libc::SIGTERM);
}

/// The same of a server SIGKILLed: what it had not stored of its
/// consumer's acknowledgements is surely lost. (Lines may be lost too:
/// a server acknowledges a publish before its store has it on file.)
#[test]
fn nats_server_sigkilled_and_restarted_writes_no_line_twice() {
    server_restarted(6_000, 4, libc::SIGKILL);
}

/// `n` lines through a server stopped by `sig` and restarted once
/// 1/`part` of them are read.
fn server_restarted(n: usize, part: usize, sig: i32) {
    let Some((env, mut server, url)) = env_with_nats(&[]) else {
        return;
    };
    let want = lines("r", n);
    let output_binding = env.start(NATS_OUTPUT, &["out", "rs.a", "-s", &url, "--stream", "RS"]);
    let output = output_binding.pid;
    let input_binding = env.start(
        NATS_INPUT,
        &durable(&url, ("in", "rs.a"), ("RS", "r"), true),
    );
    let input = input_binding.pid;
    let mut reader = open_fifo(&env.fifo("in"));
    let writer = write_lines(env.fifo("out"), want.clone());
    let mut got = read_lines_from(&mut reader, n / part);
    server.stop(sig);
    server.spawn();
    let at = got.len();
    if sig == libc::SIGKILL {
        // Until the lines stop: some may be lost.
        got.extend(read_some(&mut reader, Duration::from_secs(5)));
    } else {
        got.extend(read_count(&mut reader, n - at, Duration::from_secs(60)));
    }
    writer.join().unwrap();
    eprintln!(
        "server stopped by signal {sig} after {at} of {n} lines; {} lines in all",
        got.len()
    );
    if sig == libc::SIGKILL {
        assert_none_twice(&got, &env);
    } else {
        assert_once(&got, &want, &env);
    }
    assert!(
        env.processes().contains(&output) && env.processes().contains(&input),
        "a binding ended in the outage: {}",
        env.logs()
    );
    stop_both(input, output);
}

#[test]
fn nats_queue_group_of_two_splits_a_subject_nothing_lost_or_doubled() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    let n = 10_000;
    let want = lines("q", n);
    let a_binding = env.start(
        NATS_INPUT,
        &[
            "qa", "work", "-s", &url, "--stream", "WORK", "--queue", "workers",
        ],
    );
    let a = a_binding.pid;
    let b_binding = env.start(
        NATS_INPUT,
        &[
            "qb", "work", "-s", &url, "--stream", "WORK", "--queue", "workers",
        ],
    );
    let b = b_binding.pid;
    let output_binding = env.start(
        NATS_OUTPUT,
        &["out", "work", "-s", &url, "--stream", "WORK"],
    );
    let output = output_binding.pid;
    let readers: Vec<_> = ["qa", "qb"]
        .iter()
        .map(|id| {
            let path = env.fifo(id);
            std::thread::spawn(move || {
                let mut f = open_fifo(&path);
                let mut got = Vec::new();
                // Until nothing came for a while: the two share n lines.
                loop {
                    let more = read_some(&mut f, Duration::from_secs(3));
                    if more.is_empty() {
                        return got;
                    }
                    got.extend(more);
                }
            })
        })
        .collect();
    write_lines(env.fifo("out"), want.clone()).join().unwrap();
    let parts: Vec<Vec<String>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    eprintln!("queue group: {} + {} lines", parts[0].len(), parts[1].len());
    assert!(
        !parts[0].is_empty() && !parts[1].is_empty(),
        "one consumer got nothing"
    );
    assert_once(&parts.concat(), &want, &env);
    for pid in [a, b, output] {
        kill(pid, libc::SIGTERM);
        assert!(wait_gone(pid, PATIENCE));
    }
}

/// `count` lines read from a FIFO, or what came within `limit` (a FIFO
/// whose binding died reads end-of-file: then what it held).
fn read_count(f: &mut fs::File, count: usize, limit: Duration) -> Vec<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut lines = 0;
    let started = Instant::now();
    while lines < count && started.elapsed() < limit {
        match f.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                lines += chunk[..n].iter().filter(|&&b| b == b'\n').count();
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// Lines read until none came for `quiet` (or the patience ran out).
fn read_some(f: &mut fs::File, quiet: Duration) -> Vec<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut last = Instant::now();
    let started = Instant::now();
    while last.elapsed() < quiet && started.elapsed() < PATIENCE {
        match f.read(&mut chunk) {
            Ok(n) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                last = Instant::now();
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
        // Only whole lines are returned: wait for a started one's end.
        if buf.last().is_some_and(|&b| b != b'\n') {
            last = Instant::now();
        }
    }
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn nats_slow_reader_keeps_the_consumer_memory_bounded() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    let n = 100_000;
    let pad = "x".repeat(390);
    let want: Vec<String> = (0..n).map(|i| format!("{i} {pad}")).collect();
    let output_binding = env.start(
        NATS_OUTPUT,
        &["out", "slow", "-s", &url, "--stream", "SLOW"],
    );
    let output = output_binding.pid;
    let input_binding = env.start(
        NATS_INPUT,
        &durable(&url, ("in", "slow"), ("SLOW", "s"), true),
    );
    let input = input_binding.pid;
    let idle = rss_kib(input);
    // Nobody reads: 40 MB go through, the FIFO takes 1 MiB of them.
    write_lines(env.fifo("out"), want.clone()).join().unwrap();
    let unread = || {
        let mut n: libc::c_int = 0;
        let f = open_fifo(&env.fifo("in"));
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::FIONREAD, &mut n) };
        n
    };
    assert!(
        wait_for(PATIENCE, || unread() > 512 * 1024),
        "the FIFO did not fill"
    );
    std::thread::sleep(Duration::from_secs(1));
    let full = rss_kib(input);
    eprintln!("nats-input RSS: {idle} KiB idle, {full} KiB with 40 MB waiting behind a full FIFO");
    assert!(
        full < idle + 16 * 1024,
        "RSS grew from {idle} to {full} KiB"
    );
    let mut reader = open_fifo(&env.fifo("in"));
    let got = read_count(&mut reader, n, Duration::from_secs(60));
    assert_once(&got, &want, &env);
    stop_both(input, output);
}

#[test]
fn nats_wrong_credential_is_refused_and_secrets_never_show() {
    // nats-output as user app with the password in `file`.
    fn with_password<'a>(url: &'a str, file: &'a str) -> [&'a str; 8] {
        [
            "out",
            "c.a",
            "-s",
            url,
            "--user",
            "app",
            "--password-file",
            file,
        ]
    }
    let secret = "s3cret-pass-4711";
    let Some((env, server, url)) = env_with_nats(&["--user", "app", "--pass", secret]) else {
        return;
    };
    let wrong = env.tmp().join("wrong");
    fs::write(&wrong, "not-the-password\n").unwrap();
    let good = env.tmp().join("good");
    fs::write(&good, format!("{secret}\n")).unwrap();
    let out = env.run(NATS_OUTPUT, &with_password(&url, wrong.to_str().unwrap()));
    crate::util::assert_fails(&out, 77, "authorization");
    assert!(!env.fifo("out").exists(), "a refused binding left its FIFO");
    let out = env.run(NATS_INPUT, &["in", "c.a", "-s", &url, "--core"]);
    crate::util::assert_fails(&out, 77, "authorization");
    // A password in a URL would show in the process list: refused.
    let out = env.run(
        NATS_OUTPUT,
        &[
            "out",
            "c.a",
            "-s",
            &format!("nats://app:{secret}@127.0.0.1:{}", server.port),
        ],
    );
    crate::util::assert_fails(&out, 2, "--password-file");

    let pid_binding = env.start(NATS_OUTPUT, &with_password(&url, good.to_str().unwrap()));
    let pid = pid_binding.pid;
    for what in ["cmdline", "environ"] {
        let text = fs::read(format!("/proc/{pid}/{what}")).unwrap();
        assert!(
            !String::from_utf8_lossy(&text).contains(secret),
            "the password is in /proc/{pid}/{what}"
        );
    }
    kill(pid, libc::SIGTERM);
    assert!(wait_gone(pid, PATIENCE));
}
