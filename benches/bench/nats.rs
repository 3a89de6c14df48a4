//! The NATS figure: lines per second from a FIFO to a FIFO through NATS
//! (nats-output publishing into JetStream, nats-input consuming through
//! a durable consumer), beside the same lines through the TCP path
//! (bind-output to bind-input). Its own figure, run after the rounds: it
//! needs a `nats-server` (skipped with a message without one), and a
//! JetStream acknowledgement per line makes it much slower than the rest.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::figures::Ctx;
use crate::plumbing::{self, Fail, Proc, R, TIMEOUT};

/// Runs of each path; the median is reported.
const RUNS: usize = 3;

/// What the figure prints: two lines, or why it was skipped.
pub fn figure(ctx: &Ctx, lines: usize) -> R<String> {
    let have = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let title = "lines per second through NATS (publish → JetStream → consume → FIFO)";
    if !have {
        return Ok(format!(
            "{title}: skipped, nats-server is not installed (apt-get install nats-server)"
        ));
    }
    let data = plumbing::numbered(lines * 64, 64);
    let port = plumbing::free_port();
    let store = ctx.tmp.join("js");
    let mut server = ctx.spawn(
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        "nats-server",
    )?;
    plumbing::wait_until("nats-server listening", || {
        Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
    })?;
    let url = format!("nats://127.0.0.1:{port}");
    let (mut tcp, mut nats) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        tcp.push(through_tcp(ctx, run, &data)?);
        nats.push(through_nats(ctx, run, &data, &url)?);
    }
    server.stop(libc::SIGTERM)?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (tcp, nats) = (median(&mut tcp), median(&mut nats));
    Ok(format!(
        "{title}, 64 B lines, FIFO to FIFO, median of {RUNS} runs of {lines} lines:\n\
         {:>10.0}  through NATS: nats-output → JetStream → nats-input --durable\n\
         {:>10.0}  through TCP: bind-output → bind-input (the same lines)",
        nats, tcp
    ))
}

/// Lines per second from `out`'s FIFO to `input`'s, both bindings
/// running; checks every byte.
fn measure(ctx: &Ctx, out: &str, input: &str, data: &[u8]) -> R<f64> {
    let reader = plumbing::open(&ctx.dir.join(input), libc::O_RDONLY | libc::O_NONBLOCK)?;
    let writer = plumbing::open(&ctx.dir.join(out), libc::O_WRONLY | libc::O_NONBLOCK)?;
    let started = Instant::now();
    let sent = std::thread::scope(|s| {
        let w = s.spawn(|| {
            let r = plumbing::write_fd(writer.as_raw_fd(), data, 64 * 1024, started + TIMEOUT);
            drop(writer);
            r
        });
        let got = plumbing::verify(reader.as_raw_fd(), data, false);
        w.join().map_err(|_| "the writer panicked".to_string())??;
        got
    })?;
    let secs = sent.duration_since(started).as_secs_f64();
    Ok((data.len() / 64) as f64 / secs)
}

fn through_tcp(ctx: &Ctx, run: usize, data: &[u8]) -> R<f64> {
    let (input, output) = (format!("tcp-in{run}"), format!("tcp-out{run}"));
    let (mut i, mut o) = plumbing::with_port(|port| {
        let i = ctx.bind_input(false, &input, port)?;
        let o = ctx.bind_output(false, &output, port)?;
        Ok((i, o))
    })?;
    let rate = measure(ctx, &output, &input, data);
    o.stop(libc::SIGTERM)?;
    i.stop(libc::SIGTERM)?;
    rate
}

fn through_nats(ctx: &Ctx, run: usize, data: &[u8], url: &str) -> R<f64> {
    let (input, output) = (format!("nats-in{run}"), format!("nats-out{run}"));
    let (subject, stream) = (format!("bench.run{run}"), format!("BENCH{run}"));
    let start = |program: &str, args: &[&str]| -> R<Proc> {
        let mut c = Command::new(ctx.exe(program));
        c.args(args)
            .args(["-s", url, "--stream", &stream, &subject]);
        ctx.binding(c, program).map_err(|e| match e {
            Fail::Broken(why) | Fail::Collision(why) => why,
        })
    };
    let mut i = start(
        "nats-input",
        &[&input, "--durable", "bench", "--deliver", "all"],
    )?;
    let mut o = start("nats-output", &[&output])?;
    let rate = measure(ctx, &output, &input, data);
    o.stop(libc::SIGTERM)?;
    i.stop(libc::SIGTERM)?;
    rate
}
