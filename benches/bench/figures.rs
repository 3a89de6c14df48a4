//! One run of each figure: set up the relay and its endpoints, time the
//! transfer, check every byte, tear everything down, and return the
//! sample (wall time and the CPU time of each process).

use std::fs::File;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::plumbing::*;
use crate::procs;

/// Who carries the bytes between the two endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relay {
    Fifobind,
    /// socat with its defaults (8 KiB transfer buffer).
    Socat,
    /// socat with `-b 131072`, fifobind's own buffer size.
    SocatB,
    /// No relay: the same sender and reader joined by one TCP connection.
    Tcp,
    /// No relay: the same (fast) sender and reader joined by a 1 MiB pipe.
    Pipe,
}

impl Relay {
    pub fn name(self) -> &'static str {
        match self {
            Relay::Fifobind => "fifobind",
            Relay::Socat => "socat",
            Relay::SocatB => "socat -b",
            Relay::Tcp => "TCP alone",
            Relay::Pipe => "pipe alone",
        }
    }
}

/// The processes at either end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ends {
    /// Outbound: `cat FILE > FIFO` and `socat -u TCP-LISTEN STDOUT | head -c`;
    /// inbound: `nc -N HOST PORT < FILE` and `head -c N FIFO`.
    Shell,
    /// Threads of the benchmark with 1 MiB writes and reads.
    Fast,
    /// Outbound only: `cat FILE > FIFO` and a fast reader.
    CatFast,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    /// FIFO → bind-output → TCP.
    Out,
    /// TCP → bind-input → FIFO.
    In,
}

/// One throughput measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub dir: Dir,
    pub ends: Ends,
    /// Line length of the stream: 64 or 4096.
    pub line: usize,
    pub relay: Relay,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub secs: f64,
    pub relay_cpu: Option<f64>,
    pub sender_cpu: f64,
    pub reader_cpu: f64,
}

/// Whose start-up, memory and scale a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Fifobind,
    /// The bindings of `--reference DIR`: another build of fifobind.
    Reference,
    Socat,
}

impl Tool {
    /// Its name in the rounds' keys.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Fifobind => "fifobind",
            Tool::Reference => "reference",
            Tool::Socat => "socat",
        }
    }
}

/// Everything the runs share.
#[derive(Clone)]
pub struct Ctx {
    pub bin: PathBuf,
    pub tmp: PathBuf,
    /// FIFOBIND_DIR of every run.
    pub dir: PathBuf,
    pub logs: PathBuf,
    /// `FIFOBIND_BENCH=<tmp>`: in every child's environment, to find and
    /// kill whatever is left, even daemonized bindings.
    pub mark: String,
    pub data64: Arc<Vec<u8>>,
    pub data4k: Arc<Vec<u8>>,
    pub file64: PathBuf,
    pub file4k: PathBuf,
    pub socat_block: String,
    /// `--reference DIR`: where another build's bind-input and
    /// bind-output are.
    pub reference: Option<PathBuf>,
}

impl Ctx {
    /// The context of `tool`'s runs: the reference's bindings, with a
    /// runtime directory of their own (another build's sweep must not
    /// judge this build's bookkeeping, nor the other way round).
    pub fn of(&self, tool: Tool) -> Ctx {
        let mut c = self.clone();
        if tool == Tool::Reference
            && let Some(bin) = &self.reference
        {
            c.bin = bin.clone();
            c.dir = self.tmp.join("run-reference");
        }
        c
    }

    pub fn exe(&self, name: &str) -> String {
        self.bin.join(name).to_string_lossy().into_owned()
    }

    /// Marks a command as ours (environment) and gives it our runtime dir.
    pub fn ours<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        let (k, v) = self.mark.split_once('=').unwrap();
        c.env(k, v)
            .env("FIFOBIND_DIR", &self.dir)
            .env_remove("RUST_LOG")
    }

    pub fn spawn(&self, c: &mut Command, name: &str) -> R<Proc> {
        Proc::spawn(self.ours(c), name, &self.logs)
    }

    fn data(&self, line: usize) -> (Arc<Vec<u8>>, &Path) {
        if line == 64 {
            (self.data64.clone(), &self.file64)
        } else {
            (self.data4k.clone(), &self.file4k)
        }
    }

    /// A fresh FIFO for socat, made as fifobind makes its own.
    fn socat_fifo(&self, name: &str) -> R<PathBuf> {
        let d = self.tmp.join("socat");
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        let p = d.join(name);
        mkfifo(&p)?;
        Ok(p)
    }

    fn socat(&self, pinned: bool, relay: Relay) -> Command {
        let mut c = command(pinned, "socat");
        if relay == Relay::SocatB {
            c.args(["-b", &self.socat_block]);
        }
        c
    }

    /// `socat -u OPEN:FIFO TCP:127.0.0.1:PORT,nodelay`, the socat twin of
    /// bind-output, with a fresh FIFO that the returned descriptor holds
    /// open read-write as bind-output holds its own: socat then sees no
    /// end-of-file when a writer closes, and opening it never blocks.
    fn socat_sender(
        &self,
        pinned: bool,
        relay: Relay,
        id: &str,
        port: u16,
    ) -> R<(Proc, OwnedFd, PathBuf)> {
        let fifo = self.socat_fifo(id)?;
        let held = open(&fifo, libc::O_RDWR | libc::O_NONBLOCK)?;
        let mut c = self.socat(pinned, relay);
        c.args([
            "-u",
            &format!("OPEN:{}", fifo.display()),
            &format!("TCP:127.0.0.1:{port},nodelay"),
        ]);
        Ok((self.spawn(&mut c, "socat")?, held, fifo))
    }

    /// A binding in the foreground (our child, so its CPU time is exact),
    /// returned once it printed its PID, i.e. once it is ready.
    pub fn binding(&self, mut c: Command, name: &str) -> Result<Proc, Fail> {
        c.arg("--foreground").stdout(Stdio::piped());
        let mut p = self.spawn(&mut c, name)?;
        let out = p.stdout().unwrap();
        let line = read_all_line(out);
        match line {
            Some(pid) if pid.trim() == p.pid.to_string() => Ok(p),
            _ => {
                let _ = p.wait(TIMEOUT);
                let err = p.stderr_text();
                if err.contains("in use") {
                    Err(Fail::Collision(err))
                } else {
                    Err(Fail::Broken(format!(
                        "{name} did not start: {}",
                        err.trim()
                    )))
                }
            }
        }
    }

    /// `bind-input ID PORT` in the foreground, listening on 127.0.0.1.
    pub fn bind_input(&self, pinned: bool, id: &str, port: u16) -> Result<Proc, Fail> {
        let mut c = command(pinned, &self.exe("bind-input"));
        c.args(["--bind", "127.0.0.1", id, &port.to_string()]);
        self.binding(c, "bind-input")
    }

    /// `bind-output ID 127.0.0.1 PORT` in the foreground.
    pub fn bind_output(&self, pinned: bool, id: &str, port: u16) -> Result<Proc, Fail> {
        let mut c = command(pinned, &self.exe("bind-output"));
        c.args([id, "127.0.0.1", &port.to_string()]);
        self.binding(c, "bind-output")
    }

    /// `socat -u TCP-LISTEN:PORT,… TO`, returned once it listens.
    pub fn socat_listen(
        &self,
        pinned: bool,
        relay: Relay,
        port: u16,
        opts: &str,
        to: &str,
        stdout: Stdio,
    ) -> Result<Proc, Fail> {
        let mut c = self.socat(pinned, relay);
        c.args([
            "-u",
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr{opts}"),
            to,
        ])
        .stdout(stdout);
        let mut p = self.spawn(&mut c, "socat")?;
        let deadline = Instant::now() + TIMEOUT;
        while !tcp_state(port, "0A") {
            if p.exited() {
                let err = p.stderr_text();
                return Err(if err.contains("in use") {
                    Fail::Collision(err)
                } else {
                    Fail::Broken(format!("socat exited: {}", err.trim()))
                });
            }
            if Instant::now() > deadline {
                return Err(Fail::Broken(format!("socat does not listen on {port}")));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(p)
    }
}

/// The first line a child writes on stdout (its PID), within [`TIMEOUT`].
fn read_all_line(out: std::process::ChildStdout) -> Option<String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64];
    while !buf.contains(&b'\n') {
        match read_fd(out.as_raw_fd(), &mut chunk, deadline) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    // Keep its stdout open for the life of the process: a binding that
    // logs to a closed stdout must not be what the benchmark measures.
    std::mem::forget(out);
    String::from_utf8(buf).ok()
}

/// A thread writing `data` to `fd` in 1 MiB writes: its CPU seconds.
fn fast_writer(fd: OwnedFd, data: Arc<Vec<u8>>) -> std::thread::JoinHandle<R<f64>> {
    std::thread::spawn(move || {
        let t = thread_cpu();
        write_fd(fd.as_raw_fd(), &data, MIB, Instant::now() + TIMEOUT)?;
        drop(fd);
        Ok(thread_cpu() - t)
    })
}

/// A thread checking that `fd` yields exactly `data` (then end-of-file
/// when `eof`): the moment it was all there, and its CPU seconds.
type Checker = std::thread::JoinHandle<R<(Instant, f64)>>;

fn checker(fd: OwnedFd, data: Arc<Vec<u8>>, eof: bool) -> Checker {
    std::thread::spawn(move || {
        let t = thread_cpu();
        let end = verify(fd.as_raw_fd(), &data, eof)?;
        Ok((end, thread_cpu() - t))
    })
}

fn join<T>(h: std::thread::JoinHandle<R<T>>, what: &str) -> R<T> {
    h.join()
        .map_err(|_| format!("{what}: the thread panicked"))?
        .map_err(|e| format!("{what}: {e}"))
}

/// The reader of an outbound run, listening on a TCP port.
enum TcpReader {
    /// `socat -u TCP-LISTEN STDOUT | head -c N`, checked by a thread.
    Shell(Box<Proc>, Box<Proc>, Checker),
    /// A thread accepting one connection and reading it in 1 MiB reads.
    Fast(Checker),
}

fn tcp_reader(ctx: &Ctx, ends: Ends, data: &Arc<Vec<u8>>) -> R<(TcpReader, u16)> {
    if ends == Ends::Shell {
        with_port(|port| {
            let socat =
                ctx.socat_listen(false, Relay::Socat, port, "", "STDOUT", Stdio::piped())?;
            let mut socat = socat;
            // A shell's pipe, at its default size; only head's output, the
            // checker's instrument, gets a bigger one.
            let pipe = socat.stdout().unwrap();
            let mut head = Command::new("head");
            head.args(["-c", &data.len().to_string()])
                .stdin(pipe)
                .stdout(Stdio::piped());
            let mut head = ctx.spawn(&mut head, "head")?;
            let out = head.stdout().unwrap();
            grow_pipe(out.as_raw_fd());
            let check = checker(OwnedFd::from(out), data.clone(), true);
            Ok((
                TcpReader::Shell(Box::new(socat), Box::new(head), check),
                port,
            ))
        })
    } else {
        let (l, port) = listener();
        let data = data.clone();
        let h = std::thread::spawn(move || {
            let s = accept(&l)?;
            drop(l);
            let t = thread_cpu();
            let end = verify(s.as_raw_fd(), &data, false)?;
            Ok((end, thread_cpu() - t))
        });
        Ok((TcpReader::Fast(h), port))
    }
}

/// The sender of an outbound run or of a ceiling.
enum Sender {
    Cat(Proc),
    Fast(std::thread::JoinHandle<R<f64>>),
}

fn sender(ctx: &Ctx, ends: Ends, file: &Path, data: &Arc<Vec<u8>>, to: OwnedFd) -> R<Sender> {
    Ok(if ends == Ends::Fast {
        Sender::Fast(fast_writer(to, data.clone()))
    } else {
        let mut c = Command::new("cat");
        c.arg(file).stdin(Stdio::null()).stdout(Stdio::from(to));
        Sender::Cat(ctx.spawn(&mut c, "cat")?)
    })
}

impl Sender {
    fn finish(self) -> R<f64> {
        match self {
            Sender::Cat(mut p) => p.wait_ok(),
            Sender::Fast(h) => join(h, "the writer"),
        }
    }
}

/// Writer → FIFO → relay → TCP → reader (or the same writer and reader
/// joined by TCP alone, or by a pipe alone).
pub fn outbound(ctx: &Ctx, f: Flow) -> R<Sample> {
    let (data, file) = ctx.data(f.line);
    if f.relay == Relay::Pipe {
        return pipe_alone(&data);
    }
    let (reader, port) = tcp_reader(ctx, f.ends, &data)?;
    let mut relay: Option<Proc> = None;
    let mut held: Option<OwnedFd> = None;
    let fifo = match f.relay {
        Relay::Fifobind => {
            relay = Some(ctx.bind_output(false, "bout", port).map_err(fail_text)?);
            Some(ctx.dir.join("bout"))
        }
        Relay::Socat | Relay::SocatB => {
            let (p, fd, fifo) = ctx.socat_sender(false, f.relay, "bout", port)?;
            relay = Some(p);
            held = Some(fd);
            Some(fifo)
        }
        _ => None,
    };
    if fifo.is_some() {
        wait_until("the relay's connection", || Ok(tcp_state(port, "01")))?;
    }
    let t0 = Instant::now();
    let to: OwnedFd = match &fifo {
        Some(path) => open(path, libc::O_WRONLY)?,
        None => OwnedFd::from(connect(port)?),
    };
    let send = sender(
        ctx,
        if f.ends == Ends::Fast {
            Ends::Fast
        } else {
            Ends::Shell
        },
        file,
        &data,
        to,
    )?;
    let (end, reader_cpu) = match reader {
        TcpReader::Shell(mut socat, mut head, check) => {
            // What the checker saw first: a wrong byte also makes head
            // die of SIGPIPE, and that is not the news.
            let (end, _) = join(check, "the reader")?;
            let head_cpu = head.wait_ok()?;
            if let Some(p) = relay.as_mut() {
                p.stop(libc::SIGTERM)?;
            }
            let socat_cpu = socat.stop(libc::SIGTERM)?;
            (end, head_cpu + socat_cpu)
        }
        TcpReader::Fast(h) => join(h, "the reader")?,
    };
    let sender_cpu = send.finish()?;
    let relay_cpu = match relay.as_mut() {
        Some(p) => Some(p.stop(libc::SIGTERM)?),
        None => None,
    };
    drop(held);
    Ok(Sample {
        secs: (end - t0).as_secs_f64(),
        relay_cpu,
        sender_cpu,
        reader_cpu,
    })
}

fn fail_text(f: Fail) -> String {
    match f {
        Fail::Collision(s) | Fail::Broken(s) => s,
    }
}

/// The fast ceiling of both directions: 1 MiB writes into a 1 MiB pipe,
/// 1 MiB reads out of it.
fn pipe_alone(data: &Arc<Vec<u8>>) -> R<Sample> {
    let (r, w) = big_pipe()?;
    let t0 = Instant::now();
    let check = checker(r, data.clone(), true);
    let sender_cpu = join(fast_writer(w, data.clone()), "the writer")?;
    let (end, reader_cpu) = join(check, "the reader")?;
    Ok(Sample {
        secs: (end - t0).as_secs_f64(),
        relay_cpu: None,
        sender_cpu,
        reader_cpu,
    })
}

/// Sender → TCP → relay → FIFO → reader (or the same sender and reader
/// joined by TCP alone).
pub fn inbound(ctx: &Ctx, f: Flow) -> R<Sample> {
    let (data, file) = ctx.data(f.line);
    if f.relay == Relay::Pipe {
        return pipe_alone(&data);
    }
    let mut relay: Option<Proc> = None;
    let mut plain = None;
    let mut held = None;
    let (port, fifo) = match f.relay {
        Relay::Fifobind => with_port(|port| {
            relay = Some(ctx.bind_input(false, "bin", port)?);
            Ok((port, Some(ctx.dir.join("bin"))))
        })?,
        Relay::Socat | Relay::SocatB => {
            let fifo = ctx.socat_fifo("bin")?;
            if f.ends == Ends::Fast {
                // The fast reader holds it read-write, so it never blocks
                // in open(2) and a dead socat shows as a timeout.
                held = Some(open(&fifo, libc::O_RDWR)?);
            }
            let to = format!("OPEN:{}", fifo.display());
            with_port(|port| {
                relay = Some(ctx.socat_listen(false, f.relay, port, "", &to, Stdio::null())?);
                Ok((port, Some(fifo.clone())))
            })?
        }
        _ => {
            let (l, port) = listener();
            plain = Some(l);
            (port, None)
        }
    };
    // The reader waits before anything is sent (with TCP alone it can
    // only start once the sender connected: that start is timed).
    let start_head = |input: Option<TcpStream>| -> R<(Proc, Checker)> {
        let mut c = Command::new("head");
        c.args(["-c", &data.len().to_string()])
            .stdout(Stdio::piped());
        match input {
            Some(s) => c.stdin(Stdio::from(OwnedFd::from(s))),
            None => c.arg(fifo.as_ref().unwrap()).stdin(Stdio::null()),
        };
        let mut p = ctx.spawn(&mut c, "head")?;
        let out = p.stdout().unwrap();
        grow_pipe(out.as_raw_fd());
        let h = checker(OwnedFd::from(out), data.clone(), true);
        Ok((p, h))
    };
    let mut head = None;
    let mut fast = None;
    match (&fifo, f.ends) {
        (Some(_), Ends::Shell) => head = Some(start_head(None)?),
        (Some(path), _) => {
            let fd = match held.take() {
                Some(fd) => fd,
                None => open(path, libc::O_RDONLY)?,
            };
            fast = Some(checker(fd, data.clone(), false));
        }
        _ => {}
    }
    let t0 = Instant::now();
    let send = if f.ends == Ends::Fast {
        Sender::Fast(fast_writer(OwnedFd::from(connect(port)?), data.clone()))
    } else {
        let mut c = Command::new("nc");
        c.args(["-N", "127.0.0.1", &port.to_string()])
            .stdin(File::open(file).map_err(|e| format!("open {}: {e}", file.display()))?)
            .stdout(Stdio::null());
        Sender::Cat(ctx.spawn(&mut c, "nc")?)
    };
    if let Some(l) = plain.take() {
        let s = accept(&l)?;
        if f.ends == Ends::Shell {
            head = Some(start_head(Some(s))?);
        } else {
            fast = Some(checker(OwnedFd::from(s), data.clone(), false));
        }
    }
    let (end, reader_cpu) = match (head, fast) {
        (Some((mut p, h)), _) => {
            let (end, _) = join(h, "the reader")?;
            (end, p.wait_ok()?)
        }
        (None, Some(h)) => join(h, "the reader")?,
        _ => unreachable!(),
    };
    let sender_cpu = send.finish()?;
    let relay_cpu = match relay.as_mut() {
        Some(p) => Some(p.stop(libc::SIGTERM)?),
        None => None,
    };
    Ok(Sample {
        secs: (end - t0).as_secs_f64(),
        relay_cpu,
        sender_cpu,
        reader_cpu,
    })
}

/// The echo loop of the round-trip figure: one line in, one line out,
/// the output FIFO opened and closed per line as `echo msg > fifo` does.
const LOOP: &str = r#"while IFS= read -r line; do echo "$line" > "$2"; done < "$1""#;

/// Round trips of one 64-byte line: client → TCP → input relay → FIFO →
/// bash loop → FIFO → output relay → TCP → client, one line in flight.
/// Every process (and the client thread) on CPU 0 when `pinned`. Returns
/// the round-trip times in microseconds.
pub fn latency(ctx: &Ctx, socat: bool, pinned: bool, lines: usize) -> R<Vec<f64>> {
    let (l, oport) = listener();
    let mut procs = Vec::new();
    let mut held = None;
    let ofifo = if socat {
        let (p, fd, fifo) = ctx.socat_sender(pinned, Relay::Socat, "lout", oport)?;
        procs.push(p);
        held = Some(fd);
        fifo
    } else {
        procs.push(ctx.bind_output(pinned, "lout", oport).map_err(fail_text)?);
        ctx.dir.join("lout")
    };
    let mut back = accept(&l)?;
    drop(l);
    let (iport, ififo) = if socat {
        let fifo = ctx.socat_fifo("lin")?;
        let to = format!("OPEN:{}", fifo.display());
        let port = with_port(|port| {
            procs.push(ctx.socat_listen(pinned, Relay::Socat, port, "", &to, Stdio::null())?);
            Ok(port)
        })?;
        (port, fifo)
    } else {
        let port = with_port(|port| {
            procs.push(ctx.bind_input(pinned, "lin", port)?);
            Ok(port)
        })?;
        (port, ctx.dir.join("lin"))
    };
    let mut c = command(pinned, "bash");
    c.args(["-c", LOOP, "loop"]).arg(&ififo).arg(&ofifo);
    procs.push(ctx.spawn(&mut c, "bash")?);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            pin_thread(pinned);
            round_trips(iport, &mut back, lines)
        })
        .join()
        .unwrap_or_else(|_| Err("the client panicked".into()))
    });
    for p in procs.iter_mut().rev() {
        p.stop(libc::SIGTERM)?;
    }
    drop(held);
    result
}

fn round_trips(port: u16, back: &mut TcpStream, lines: usize) -> R<Vec<f64>> {
    use std::io::{Read, Write};
    const WARMUP: usize = 50;
    let mut s = connect(port)?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    back.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut rtts = Vec::with_capacity(lines);
    let mut buf = [0u8; 4096];
    for i in 0..WARMUP + lines {
        let msg = format!("{i:020} {}\n", ".".repeat(42));
        let t0 = Instant::now();
        s.write_all(msg.as_bytes())
            .map_err(|e| format!("send line {i}: {e}"))?;
        let mut got = Vec::new();
        while !got.ends_with(b"\n") {
            let n = back
                .read(&mut buf)
                .map_err(|e| format!("line {i} back: {e}"))?;
            if n == 0 {
                return Err(format!("the echo connection closed at line {i}"));
            }
            got.extend_from_slice(&buf[..n]);
        }
        let rtt = t0.elapsed().as_secs_f64() * 1e6;
        if got != msg.as_bytes() {
            return Err(format!(
                "sent line {i}, got {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        if i >= WARMUP {
            rtts.push(rtt);
        }
    }
    Ok(rtts)
}

/// What a burst of connections measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Burst {
    pub secs: f64,
    pub relay_cpu: f64,
    /// Lines that arrived whole, once each.
    pub whole: usize,
    /// Connections whose connect or send failed.
    pub failed: usize,
}

/// `n` concurrent connections, one 64-byte line each, to one listener:
/// bind-input, or `socat TCP-LISTEN:P,fork,backlog=1024 OPEN:FIFO`. Time
/// from the first connect to the last line read from the FIFO; every
/// line checked whole and once.
pub fn burst(ctx: &Ctx, socat: bool, n: usize) -> R<Burst> {
    let (mut relay, fifo, port) = if socat {
        let fifo = ctx.socat_fifo("burst")?;
        let to = format!("OPEN:{}", fifo.display());
        let (p, port) = with_port(|port| {
            let p = ctx.socat_listen(
                false,
                Relay::Socat,
                port,
                ",fork,backlog=1024",
                &to,
                Stdio::null(),
            )?;
            Ok((p, port))
        })?;
        (p, fifo, port)
    } else {
        let (p, port) = with_port(|port| Ok((ctx.bind_input(false, "burst", port)?, port)))?;
        (p, ctx.dir.join("burst"), port)
    };
    // Read-write: socat's children open and close the FIFO one after the
    // other, and the reader must see no end-of-file between them.
    let fd = open(&fifo, libc::O_RDWR)?;
    let line = |i: usize| format!("burst {i:06} {}\n", "x".repeat(50));
    // One thread per connection, all released at once: each connects,
    // sends its line and closes, as `echo line | nc …` run n times with `&`.
    let barrier = Arc::new(Barrier::new(n + 1));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut senders = Vec::new();
    for i in 0..n {
        let b = barrier.clone();
        let h = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                use std::io::Write;
                b.wait();
                match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                    Ok(mut s) => usize::from(s.write_all(line(i).as_bytes()).is_err()),
                    Err(_) => 1,
                }
            })
            .map_err(|e| format!("cannot start sender thread {i}: {e}"))?;
        senders.push(h);
    }
    let t0 = Instant::now();
    barrier.wait();
    let mut seen = vec![false; n];
    let mut whole = 0;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut last = Instant::now();
    // Lost lines never come: give up 3 s after the last one arrived.
    while whole < n {
        let n_read = match read_fd(
            fd.as_raw_fd(),
            &mut buf,
            Instant::now() + Duration::from_secs(3),
        ) {
            Ok(k) => k,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n_read]);
        while let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let got: Vec<u8> = pending.drain(..=at).collect();
            let text = String::from_utf8_lossy(&got);
            let i = text
                .strip_prefix("burst ")
                .and_then(|t| t.get(..6))
                .and_then(|d| d.parse::<usize>().ok());
            match i {
                Some(i) if i < n && text == line(i) && !seen[i] => {
                    seen[i] = true;
                    whole += 1;
                }
                _ => return Err(format!("a broken or repeated line: {text:?}")),
            }
        }
        last = Instant::now();
    }
    let secs = (last - t0).as_secs_f64();
    let mut failed = 0;
    for s in senders {
        failed += s.join().map_err(|_| "a sender panicked".to_string())?;
    }
    if !pending.is_empty() {
        return Err(format!(
            "a partial line: {:?}",
            String::from_utf8_lossy(&pending)
        ));
    }
    let relay_cpu = relay.stop(libc::SIGTERM)?;
    Ok(Burst {
        secs,
        relay_cpu,
        whole,
        failed,
    })
}

/// One start of a listener.
pub struct Start {
    /// Milliseconds from starting it to one that accepts.
    pub ms: f64,
    /// A daemonizing binding: the CPU milliseconds of both its processes
    /// by the time the command returned (the command's rusage, its own
    /// reaped child included, and the daemon's run time so far).
    pub cpu_ms: Option<f64>,
    /// A daemonizing binding: milliseconds from SIGTERM to gone.
    pub stop_ms: Option<f64>,
}

/// Starts of a listener, `starts` times: bind-input until the command
/// returns (it returns once ready; a connect then must succeed at once);
/// socat until a connect succeeds (probed every 0.1 ms); `true(1)` for
/// the cost of starting anything.
pub fn readiness(ctx: &Ctx, tool: &str, starts: usize) -> R<Vec<Start>> {
    let mut times = Vec::new();
    for _ in 0..starts {
        let start = match tool {
            "fifobind" | "reference" => {
                let ctx = ctx.of(if tool == "reference" {
                    Tool::Reference
                } else {
                    Tool::Fifobind
                });
                with_port(|port| {
                    let d = daemon_input(&ctx, "ready", port)?;
                    let cpu_ms = d.cpu_ms();
                    let ok = connect(port);
                    let stop_ms = stop_daemon(d.pid)?;
                    ok?;
                    Ok(Start {
                        ms: d.ms,
                        cpu_ms,
                        stop_ms: Some(stop_ms),
                    })
                })?
            }
            "socat" => {
                let fifo = ctx.socat_fifo("ready")?;
                with_port(|port| {
                    let t0 = Instant::now();
                    let mut c = ctx.socat(false, Relay::Socat);
                    c.args([
                        "-u",
                        &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
                        &format!("OPEN:{}", fifo.display()),
                    ]);
                    let mut p = ctx.spawn(&mut c, "socat")?;
                    loop {
                        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                            break;
                        }
                        if p.exited() {
                            return Err(Fail::Collision(p.stderr_text()));
                        }
                        if t0.elapsed() > TIMEOUT {
                            return Err(Fail::Broken("socat does not listen".into()));
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    p.stop(libc::SIGKILL)?;
                    Ok(Start {
                        ms,
                        cpu_ms: None,
                        stop_ms: None,
                    })
                })?
            }
            _ => {
                let t0 = Instant::now();
                let mut c = Command::new("true");
                c.stdout(Stdio::piped()).stdin(Stdio::null());
                let mut p = ctx.spawn(&mut c, "true")?;
                p.wait_ok()?;
                Start {
                    ms: t0.elapsed().as_secs_f64() * 1e3,
                    cpu_ms: None,
                    stop_ms: None,
                }
            }
        };
        times.push(start);
    }
    Ok(times)
}

/// A binding started as a user starts it, once its command returned.
struct Daemon {
    /// The PID it printed: the daemon's.
    pid: i32,
    /// Milliseconds until the command returned.
    ms: f64,
    /// CPU seconds of the command (with its reaped children).
    cpu: f64,
}

impl Daemon {
    /// CPU milliseconds of the command and of the daemon so far.
    fn cpu_ms(&self) -> Option<f64> {
        Some((self.cpu + task_cpu(self.pid)?) * 1e3)
    }
}

/// `bind-input --bind 127.0.0.1 ID PORT` as a user runs it (it goes to
/// the background and prints the PID once ready).
fn daemon_input(ctx: &Ctx, id: &str, port: u16) -> Result<Daemon, Fail> {
    let mut c = Command::new(ctx.exe("bind-input"));
    c.args(["--bind", "127.0.0.1", id, &port.to_string()]);
    daemon(ctx, c)
}

fn daemon(ctx: &Ctx, mut c: Command) -> Result<Daemon, Fail> {
    c.stdin(Stdio::null()).stdout(Stdio::piped());
    let t0 = Instant::now();
    let mut p = ctx.spawn(&mut c, "binding")?;
    let out = p.stdout().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match read_fd(out.as_raw_fd(), &mut buf, deadline)? {
            0 => break,
            n => text.extend_from_slice(&buf[..n]),
        }
    }
    let (code, cpu) = p.wait(TIMEOUT)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if code != 0 {
        let err = p.stderr_text();
        return Err(if err.contains("in use") {
            Fail::Collision(err)
        } else {
            Fail::Broken(format!("{c:?} exited {code}: {}", err.trim()))
        });
    }
    let pid = String::from_utf8_lossy(&text)
        .trim()
        .parse()
        .map_err(|_| Fail::Broken(format!("{c:?} printed no PID")))?;
    Ok(Daemon { pid, ms, cpu })
}

/// CPU seconds a (single-threaded) process has run so far, to the
/// nanosecond: the first field of /proc/PID/schedstat.
fn task_cpu(pid: i32) -> Option<f64> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    Some(t.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
}

/// SIGTERM to a daemonized binding (not our child, so by the PID it just
/// printed) and waits until it is gone: the milliseconds that took.
fn stop_daemon(pid: i32) -> R<f64> {
    let fd = pidfd(pid);
    let t0 = Instant::now();
    procs::kill(pid, libc::SIGTERM);
    let gone = match &fd {
        Some(fd) => wait_pidfds(std::slice::from_ref(fd), TIMEOUT),
        None => procs::wait_gone(pid, TIMEOUT),
    };
    if !gone {
        return Err(format!(
            "binding {pid} still runs {TIMEOUT:?} after SIGTERM"
        ));
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Resident memory (KiB) of an idle listener and of an idle connected
/// sender, 200 ms after each is ready: bind-input and bind-output as a
/// user runs them, or the socat commands of the throughput figures.
pub fn idle_rss(ctx: &Ctx, tool: Tool) -> R<Idle> {
    let ctx = &ctx.of(tool);
    let (l, oport) = listener();
    let mut procs_ = Vec::new();
    let mut pids = Vec::new();
    let mut held = None;
    if tool == Tool::Socat {
        let fifo = ctx.socat_fifo("idle")?;
        let to = format!("OPEN:{}", fifo.display());
        let p =
            with_port(|port| ctx.socat_listen(false, Relay::Socat, port, "", &to, Stdio::null()))?;
        pids.push(p.pid);
        procs_.push(p);
        let (p, fd, _) = ctx.socat_sender(false, Relay::Socat, "idleout", oport)?;
        held = Some(fd);
        pids.push(p.pid);
        procs_.push(p);
    } else {
        pids.push(with_port(|port| daemon_input(ctx, "idle", port))?.pid);
        let mut c = Command::new(ctx.exe("bind-output"));
        c.args(["idleout", "127.0.0.1", &oport.to_string()]);
        pids.push(daemon(ctx, c).map_err(fail_text)?.pid);
    }
    let conn = accept(&l);
    std::thread::sleep(Duration::from_millis(200));
    let rss: Vec<Option<u64>> = pids.iter().map(|&p| procs::rss_kib(p)).collect();
    let anon: Vec<Option<u64>> = pids.iter().map(|&p| anon_kib(p)).collect();
    drop(conn);
    if tool != Tool::Socat {
        for &p in &pids {
            stop_daemon(p)?;
        }
    }
    for mut p in procs_ {
        p.stop(libc::SIGTERM)?;
    }
    drop(held);
    match (rss[0], rss[1], anon[0], anon[1]) {
        (Some(listener), Some(sender), Some(listener_anon), Some(sender_anon)) => Ok(Idle {
            listener,
            sender,
            listener_anon,
            sender_anon,
        }),
        _ => Err("a listener or sender was gone before its memory was read".into()),
    }
}

/// Idle memory, KiB: resident (VmRSS) and of that what is the process's
/// own (RssAnon: heap, stacks, written data pages), which another
/// binding does not share; the rest is file pages (the program, libc)
/// that every binding maps from the same page cache.
pub struct Idle {
    pub listener: u64,
    pub sender: u64,
    pub listener_anon: u64,
    pub sender_anon: u64,
}

fn anon_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `n` listeners up (bind-input one after the other, each command
/// returning once ready, as `pid=$(bind-input …)` in a loop; socat all
/// launched at once, until every port listens), then SIGTERM to all and
/// the time until every one is gone (pidfds: woken as each exits, no
/// polling interval in the figure). Seconds up, seconds down; what is
/// left behind breaks the benchmark.
pub fn scale(ctx: &Ctx, tool: Tool, n: usize) -> R<(f64, f64)> {
    // A fresh runtime directory for each run, so every run starts alike.
    let dir = ctx.tmp.join(format!("scale.{}", crate::rng() % 1_000_000));
    let mut sub = ctx.of(tool);
    sub.dir = dir.clone();
    let t0 = Instant::now();
    if tool == Tool::Socat {
        let mut ports: Vec<u16> = Vec::new();
        let mut ps: Vec<Proc> = Vec::new();
        let mut fifos = Vec::new();
        for i in 0..n {
            let fifo = sub.socat_fifo(&format!("s{i}"))?;
            let port = free_port();
            ps.push(start_socat_listener(&sub, port, &fifo)?);
            ports.push(port);
            fifos.push(fifo);
        }
        let mut retries = 0;
        wait_until("every socat listening", || {
            for i in 0..n {
                if ps[i].exited() {
                    // Another program took the port meanwhile: another one.
                    retries += 1;
                    if retries > 20 {
                        return Err(format!(
                            "socat listeners keep exiting: {}",
                            ps[i].stderr_text()
                        ));
                    }
                    ports[i] = free_port();
                    ps[i] = start_socat_listener(&sub, ports[i], &fifos[i])?;
                }
            }
            let listening = listening_ports();
            Ok(ports.iter().all(|p| listening.contains(p)))
        })?;
        let up = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for p in &ps {
            procs::kill(p.pid, libc::SIGTERM);
        }
        for p in ps.iter_mut() {
            p.wait(TIMEOUT)?;
        }
        return Ok((up, t1.elapsed().as_secs_f64()));
    }
    let mut pids = Vec::new();
    for i in 0..n {
        pids.push(with_port(|port| daemon_input(&sub, &format!("s{i}"), port))?.pid);
    }
    let up = t0.elapsed().as_secs_f64();
    // Opened before the signals, so that no PID can be reused meanwhile.
    let fds: Vec<OwnedFd> = pids
        .iter()
        .map(|&p| pidfd(p).ok_or_else(|| format!("binding {p} is gone before its SIGTERM")))
        .collect::<R<_>>()?;
    let t1 = Instant::now();
    for &p in &pids {
        procs::kill(p, libc::SIGTERM);
    }
    if !wait_pidfds(&fds, TIMEOUT) {
        return Err(format!("bindings still run {TIMEOUT:?} after SIGTERM"));
    }
    let down = t1.elapsed().as_secs_f64();
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        return Err(format!(
            "{} bindings stopped, {} files left in {}",
            n,
            left.len(),
            dir.display()
        ));
    }
    Ok((up, down))
}

fn start_socat_listener(ctx: &Ctx, port: u16, fifo: &Path) -> R<Proc> {
    let mut c = ctx.socat(false, Relay::Socat);
    c.args([
        "-u",
        &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
        &format!("OPEN:{}", fifo.display()),
    ]);
    ctx.spawn(&mut c, "socat")
}

/// Every port that something listens on, on 127.0.0.1.
fn listening_ports() -> std::collections::HashSet<u16> {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|row| {
            let c: Vec<&str> = row.split_whitespace().collect();
            if c.len() > 3 && c[3] == "0A" {
                u16::from_str_radix(c[1].rsplit(':').next()?, 16).ok()
            } else {
                None
            }
        })
        .collect()
}
