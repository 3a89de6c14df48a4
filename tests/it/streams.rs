//! Streams that survive (issue 10): `--key` pairs speak the stream
//! protocol; a relay the test controls breaks their connection.

use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

/// A keyed pair with `FIFOBIND_KEY=k12`: `bind-input --key - IN_OPTS in1
/// PORT` and `bind-output --key - OUT_OPTS out1 127.0.0.1 TO`.
fn keyed_pair(
    env: &Env,
    port: u16,
    in_opts: &[&str],
    out_opts: &[&str],
    to: u16,
) -> (Binding, Binding) {
    let (port, to) = (port.to_string(), to.to_string());
    let key: &[&str] = &["--key", "-"];
    let pin = [key, in_opts, &["in1", &port]].concat();
    let pout = [key, out_opts, &["out1", "127.0.0.1", &to]].concat();
    (
        env.start_keyed(BIND_INPUT, "k12", &pin),
        env.start_keyed(BIND_OUTPUT, "k12", &pout),
    )
}

/// A keyed pair whose bind-output reaches its bind-input through a
/// [`FaultRelay`] the test controls.
fn relayed_pair(env: &Env, out_opts: &[&str]) -> (FaultRelay, Binding, Binding) {
    let port = free_port();
    let relay = FaultRelay::start(port);
    let (pin, pout) = keyed_pair(env, port, &[], out_opts, relay.port);
    (relay, pin, pout)
}

fn line(i: u64) -> String {
    format!("line {i:07} {}\n", "x".repeat((i % 97) as usize))
}

/// Writes lines `from..to` into the FIFO at `path`, `per` at a time with
/// `pause` between, counting bytes in `written`.
fn writer(
    path: std::path::PathBuf,
    lines: std::ops::Range<u64>,
    per: u64,
    pause: Duration,
    written: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut i = lines.start;
        while i < lines.end {
            let block: String = (i..(i + per).min(lines.end)).map(line).collect();
            f.write_all(block.as_bytes()).unwrap();
            written.fetch_add(block.len() as u64, Ordering::SeqCst);
            i += per;
            std::thread::sleep(pause);
        }
    })
}

/// Reads the FIFO until `count` lines came (or `limit`), returns them.
fn read_n(path: &std::path::Path, count: usize, limit: Duration) -> Vec<String> {
    let mut text = Vec::new();
    let mut lines = 0;
    read_until(open_fifo(path), limit, |c| {
        lines += c.iter().filter(|&&b| b == b'\n').count();
        text.extend_from_slice(c);
        lines < count
    });
    String::from_utf8(text)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// Every line of `from..to` exactly once, in order, whole.
fn assert_exactly(got: &[String], from: u64, to: u64, logs: &str) {
    let mut dups = 0;
    let mut missing = 0;
    let mut expect = from;
    for l in got {
        let i: u64 = l[5..12]
            .parse()
            .unwrap_or_else(|_| panic!("not a line: {l:?}\n{logs}"));
        assert_eq!(format!("{l}\n"), line(i), "a line arrived altered or split");
        if i < expect {
            dups += 1;
        } else if i > expect {
            missing += i - expect;
        }
        expect = expect.max(i + 1);
    }
    missing += to - expect.min(to);
    eprintln!(
        "lines sent {}, received {}, duplicates {dups}, losses {missing}",
        to - from,
        got.len()
    );
    assert!(
        dups == 0 && missing == 0,
        "{dups} duplicated, {missing} lost\n{logs}"
    );
    assert_eq!(got.len() as u64, to - from);
}

fn count(logs: &str, needle: &str) -> usize {
    logs.matches(needle).count()
}

#[test]
fn keyed_pair_delivers_whole_lines() {
    let env = Env::new();
    let port = free_port();
    let (pin, pout) = keyed_pair(&env, port, &[], &[], port);
    let w = Arc::new(AtomicU64::new(0));
    let t = writer(env.fifo("out1"), 0..5000, 500, Duration::ZERO, w);
    let got = read_n(&env.fifo("in1"), 5000, PATIENCE);
    t.join().unwrap();
    assert_exactly(&got, 0, 5000, &env.logs());
    pout.stop(libc::SIGTERM);
    pin.stop(libc::SIGTERM);
    env.assert_clean();
}

#[test]
fn wrong_keys_and_plain_clients_get_nothing_in() {
    let env = Env::new();
    let port = free_port();
    let ports = port.to_string();
    // --once: it must keep listening until its stream has come.
    let pin = env.start_keyed(BIND_INPUT, "k12", &["--key", "-", "--once", "in1", &ports]);
    // A plain client's lines, and a plain client that greets like a
    // stream, but with garbage.
    send(port, b"forged line 1\nforged line 2\n");
    send(port, b"FIFOBIND 2 STREAM 00\nforged line 3\n");
    let log = env.dir.join(".in1.log");
    let refused = |n| {
        wait_for(PATIENCE, || {
            count(
                &fs::read_to_string(&log).unwrap_or_default(),
                "nothing of it reaches the FIFO",
            ) >= n
        })
    };
    assert!(refused(2), "{}", env.logs());
    let keyed = |key: &str, id: &str| {
        run_with_timeout(env.cmd(BIND_OUTPUT).env("FIFOBIND_KEY", key).args([
            "--key",
            "-",
            id,
            "127.0.0.1",
            &ports,
        ]))
    };
    assert_fails(&keyed("k13", "bad"), 69, "keys differ");
    assert!(refused(3), "{}", env.logs());
    // A wrong key holds its address back (1 s, doubling): a next try at
    // once is refused without a key exchange.
    let mut held = false;
    for _ in 0..5 {
        let out = keyed("k13", "bad");
        assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
        if String::from_utf8_lossy(&out.stderr).contains("too many wrong keys") {
            held = true;
            break;
        }
    }
    assert!(held, "wrong keys are not held back\n{}", env.logs());
    // The right key gets in once the hold-back is over.
    let mut pout = None;
    assert!(
        wait_for(PATIENCE, || {
            let out = keyed("k12", "good");
            if out.status.success() {
                pout = Some(env.binding(printed_pid(&out)));
                return true;
            }
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("too many wrong keys"),
                "{}",
                describe(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
            false
        }),
        "{}",
        env.logs()
    );
    fs::write(env.fifo("good"), "the only line\n").unwrap();
    let got = read_lines(&env.fifo("in1"), 1);
    assert_eq!(got, ["the only line"], "{}", env.logs());
    // The writer is done: the stream closes, the --once binding ends.
    pout.expect("started").stop(libc::SIGUSR1);
    pin.assert_exits(PATIENCE, "its stream ended");
    env.assert_clean();
}

#[test]
fn twenty_cuts_during_a_long_stream_lose_and_duplicate_nothing() {
    const LINES: u64 = 100_000;
    let env = Env::new();
    let (relay, pin, pout) = relayed_pair(&env, &["--backoff-max", "1", "--peer-timeout", "2"]);
    let (rss_in, rss_out) = (RssSampler::start(pin.pid), RssSampler::start(pout.pid));
    let w = Arc::new(AtomicU64::new(0));
    let t = writer(
        env.fifo("out1"),
        0..LINES,
        1000,
        Duration::from_millis(60),
        w.clone(),
    );
    let fifo = env.fifo("in1");
    let reader = std::thread::spawn(move || read_n(&fifo, LINES as usize, 3 * PATIENCE));
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut worst_reset, mut worst_hold) = (Duration::ZERO, Duration::ZERO);
    let out_log = env.dir.join(".out1.log");
    for i in 0..20 {
        std::thread::sleep(Duration::from_millis(50 + next() % 250));
        let kind = if i % 5 == 2 { Cut::Hold } else { Cut::Reset };
        let before = count(&fs::read_to_string(&out_log).unwrap(), "reconnected to");
        let cut = Instant::now();
        relay.cut(kind);
        // The relay is back at once: how long until the stream is too.
        assert!(
            wait_for(PATIENCE, || count(
                &fs::read_to_string(&out_log).unwrap(),
                "reconnected to"
            ) > before),
            "no reconnect after cut {i}\n{}",
            env.logs()
        );
        let stall = cut.elapsed();
        match kind {
            Cut::Reset => worst_reset = worst_reset.max(stall),
            Cut::Hold => worst_hold = worst_hold.max(stall),
        }
    }
    t.join().unwrap();
    let got = reader.join().unwrap();
    let logs = env.logs();
    assert_exactly(&got, 0, LINES, &logs);
    let reconnects = count(&logs, "reconnected to");
    let (kin, kout) = (rss_in.finish(), rss_out.finish());
    eprintln!(
        "reconnects {reconnects}; longest stall after a reset {:.2} s, after a silent drop {:.2} s \
         (backoff cap 1 s, peer timeout 2 s); max RSS bind-input {kin} KiB, bind-output {kout} KiB",
        worst_reset.as_secs_f64(),
        worst_hold.as_secs_f64()
    );
    assert_eq!(reconnects, 20, "{logs}");
    // Generous for a loaded machine: the cap plus slack (a silent drop is
    // first noticed after the peer timeout).
    assert!(worst_reset < Duration::from_secs(6), "{worst_reset:?}");
    assert!(worst_hold < Duration::from_secs(8), "{worst_hold:?}");
    assert!(kin < 64 * 1024 && kout < 64 * 1024);
    pout.stop(libc::SIGTERM);
    pin.stop(libc::SIGTERM);
    drop(relay);
    env.assert_clean();
}

/// The receiver's side unreachable for 10 s (the relay resets every
/// connection): writers are held (block policy), the FIFO stays, then
/// everything flows.
#[test]
fn unreachable_receiver_holds_writers_then_everything_flows() {
    const LINES: u64 = 60_000;
    let env = Env::new();
    let (relay, pin, pout) = relayed_pair(&env, &["--spool", "256K", "--backoff-max", "1"]);
    let rss = RssSampler::start(pout.pid);
    let down = Instant::now();
    relay.refuse(true);
    relay.cut(Cut::Reset);
    let w = Arc::new(AtomicU64::new(0));
    let t = writer(env.fifo("out1"), 0..LINES, 1000, Duration::ZERO, w.clone());
    let held = wait_stalled(&w, Duration::from_secs(1), PATIENCE).expect("writer never held");
    let total: u64 = (0..LINES).map(|i| line(i).len() as u64).sum();
    assert!(held < total, "the writer was not held");
    // The FIFO stays in place: no writer creates a regular file instead.
    assert!(
        fs::symlink_metadata(env.fifo("out1"))
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    assert_eq!(
        w.load(Ordering::SeqCst),
        held,
        "the writer went on while held"
    );
    relay.refuse(false);
    let got = read_n(&env.fifo("in1"), LINES as usize, 2 * PATIENCE);
    t.join().unwrap();
    assert_exactly(&got, 0, LINES, &env.logs());
    let kout = rss.finish();
    eprintln!("held writer at {held} of {total} bytes; bind-output max RSS {kout} KiB");
    assert!(kout < 32 * 1024);
    assert!(env.logs().contains("s disconnected: resuming at offset"));
    pout.stop(libc::SIGTERM);
    pin.stop(libc::SIGTERM);
    drop(relay);
    env.assert_clean();
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

/// `--spool-full drop-oldest`: the writer is never held; the oldest
/// unsent lines go, counted in the log; what arrives is whole and in
/// order, and the newest lines are there.
#[test]
fn drop_oldest_drops_and_counts() {
    const LINES: u64 = 40_000;
    let env = Env::new();
    let (relay, pin, pout) = relayed_pair(
        &env,
        &[
            "--spool",
            "256K",
            "--spool-full",
            "drop-oldest",
            "--backoff-max",
            "0.5",
        ],
    );
    let rss = RssSampler::start(pout.pid);
    relay.refuse(true);
    relay.cut(Cut::Reset);
    let w = Arc::new(AtomicU64::new(0));
    // Far more than the FIFO and the spool hold: it ends only if the
    // binding drops.
    writer(env.fifo("out1"), 0..LINES, 1000, Duration::ZERO, w)
        .join()
        .unwrap();
    let log = env.dir.join(".out1.log");
    assert!(
        wait_for(PATIENCE, || fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("lines (")),
        "{}",
        env.logs()
    );
    relay.refuse(false);
    let mut got = Vec::new();
    read_until(open_fifo(&env.fifo("in1")), PATIENCE, |c| {
        got.extend_from_slice(c);
        !String::from_utf8_lossy(&got).contains(line(LINES - 1).as_str())
    });
    let got: Vec<String> = String::from_utf8(got)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut last = None;
    for l in &got {
        let i: u64 = l[5..12].parse().unwrap();
        assert_eq!(format!("{l}\n"), line(i), "a line arrived altered or split");
        assert!(last < Some(i), "out of order or duplicated");
        last = Some(i);
    }
    assert_eq!(last, Some(LINES - 1), "the newest line is missing");
    assert!((got.len() as u64) < LINES, "nothing was dropped");
    let kout = rss.finish();
    eprintln!(
        "drop-oldest: {} of {LINES} lines arrived; bind-output max RSS {kout} KiB",
        got.len()
    );
    assert!(kout < 32 * 1024);
    pout.stop(libc::SIGTERM);
    assert!(env.logs().contains("dropped"), "{}", env.logs());
    pin.stop(libc::SIGTERM);
    drop(relay);
    env.assert_clean();
}

/// A plain bind-output with --reconnect outlives `nc -l` run again and
/// again: each new nc gets lines.
#[test]
fn plain_reconnect_outlives_nc_restarts() {
    if !have_tool("nc", "netcat-openbsd") {
        return;
    }
    let env = Env::new();
    let port = free_port().to_string();
    let nc = || {
        let n = env.spawn(std::process::Command::new("nc").args(["-l", "127.0.0.1", &port]));
        // nc has no readiness signal: wait until it listens.
        assert!(wait_for(PATIENCE, || listening(port.parse().unwrap())));
        n
    };
    let mut listener = nc();
    let guard = env.start(
        BIND_OUTPUT,
        &[
            "--reconnect",
            "--backoff-max",
            "0.5",
            "out1",
            "127.0.0.1",
            &port,
        ],
    );
    let rss = RssSampler::start(guard.pid);
    for round in 0..4 {
        let mut k = 0;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(env.fifo("out1"))
            .unwrap();
        // Lines written before the binding noticed the break can be lost
        // (the man page says so): write until this nc has one.
        assert!(
            wait_for(PATIENCE, || {
                writeln!(f, "round {round} line {k}").unwrap();
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
                listener.stdout().contains(&format!("round {round} line"))
            }),
            "round {round}: nothing arrived\n{}",
            env.logs()
        );
        assert!(alive(guard.pid), "{}", env.logs());
        kill(listener.pid(), libc::SIGTERM);
        listener.wait(PATIENCE);
        listener = nc();
    }
    let kout = rss.finish();
    eprintln!("plain --reconnect: 4 restarts of nc; bind-output max RSS {kout} KiB");
    assert!(count(&env.logs(), "reconnected to") >= 3, "{}", env.logs());
    guard.stop(libc::SIGTERM);
    kill(listener.pid(), libc::SIGTERM);
    env.assert_clean();
}

/// `--key-fd`: the secret comes through a pipe, read once and closed;
/// both ends that read the same secret make a pair.
#[test]
fn key_fd_gives_the_secret_through_a_pipe() {
    let env = Env::new();
    let port = free_port();
    let script = format!(
        r#"set -e
in=$(bind-input --key-fd 3 in1 {port} 3< <(printf 'f00d%.0s' 1 2 3 4; echo))
out=$(bind-output --key-fd 3 out1 127.0.0.1 {port} 3< <(printf 'f00d%.0s' 1 2 3 4))
dir=${{FIFOBIND_DIR}}
echo "through a pipe" > "$dir/out1"
IFS= read -r line < "$dir/in1"
echo "got: $line"
kill "$out" "$in"
"#
    );
    let out = env.bash(&script);
    assert!(out.status.success(), "{}\n{}", describe(&out), env.logs());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "got: through a pipe\n"
    );
    // Not an open descriptor: a usage error, nothing created.
    let bad = env.run(BIND_INPUT, &["--key-fd", "9", "in2", &port.to_string()]);
    assert_fails(&bad, 2, "--key-fd 9");
    // Another secret is a wrong key.
    let port = free_port();
    let pin = env.start_keyed(BIND_INPUT, "k12", &["--key", "-", "in3", &port.to_string()]);
    let wrong = env.bash(&format!(
        "bind-output --key-fd 3 out3 127.0.0.1 {port} 3< <(printf other)"
    ));
    assert_fails(&wrong, 69, "keys differ");
    pin.stop(libc::SIGTERM);
    env.assert_clean();
}

/// A reader that does not read: flow control holds everything back
/// (receiver's buffers bounded, the sender's spool full, the writer
/// held), then everything arrives once the reader reads.
#[test]
fn a_slow_reader_holds_the_keyed_stream_back_with_memory_bounded() {
    const LINES: u64 = 80_000;
    let env = Env::new();
    let port = free_port();
    let (pin, pout) = keyed_pair(&env, port, &[], &["--spool", "1M"], port);
    let (rss_in, rss_out) = (RssSampler::start(pin.pid), RssSampler::start(pout.pid));
    let w = Arc::new(AtomicU64::new(0));
    let t = writer(env.fifo("out1"), 0..LINES, 2000, Duration::ZERO, w.clone());
    let held = wait_stalled(&w, Duration::from_secs(1), PATIENCE).expect("writer never held");
    let total: u64 = (0..LINES).map(|i| line(i).len() as u64).sum();
    assert!(held < total, "the writer was not held");
    let got = read_n(&env.fifo("in1"), LINES as usize, 2 * PATIENCE);
    t.join().unwrap();
    assert_exactly(&got, 0, LINES, &env.logs());
    let (kin, kout) = (rss_in.finish(), rss_out.finish());
    eprintln!(
        "slow reader: writer held at {held} of {total} bytes; max RSS bind-input {kin} KiB, \
         bind-output {kout} KiB (spool 1 MiB)"
    );
    assert!(kin < 32 * 1024, "bind-input {kin} KiB");
    assert!(kout < 32 * 1024, "bind-output {kout} KiB");
    pout.stop(libc::SIGTERM);
    pin.stop(libc::SIGTERM);
    env.assert_clean();
}
