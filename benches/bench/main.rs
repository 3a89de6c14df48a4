//! The benchmark: fifobind against socat, and against the same endpoints
//! with no relay at all, on this machine, in one run of shuffled,
//! interleaved rounds. `cargo bench -- --help` says how to run it; README's
//! "Benchmark" section shows its output. Every measured run checks byte
//! for byte what it carried; anything broken stops it with exit status 1,
//! a missed goal is only reported.

// The tests use all of it (and would report what nobody uses); the
// benchmark, part.
#[path = "../../tests/support/procs.rs"]
#[allow(dead_code)]
mod procs;

mod figures;
mod nats;
mod plumbing;
mod report;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::Instant;

use figures::{Ctx, Dir, Ends, Flow, Relay, Tool};
use plumbing::{MIB, R};

const USAGE: &str = "\
usage: cargo bench -- [--quick] [--rounds N] [--mib N] [--lines N]
                      [--starts N] [--scale N] [--scale-rounds N]
                      [--burst N] [--seed N] [--dir DIR] [--only LIST]
                      [--reference DIR] [--verbose]

Measures fifobind against socat (and the same endpoints with no relay) in
N shuffled, interleaved rounds and prints medians of same-round ratios.

  --quick           3 rounds of 64 MiB, 500 timed round trips, 10 starts,
                    1 round of the 500-binding figure (about a minute)
  --rounds N        rounds (default 10)
  --mib N           MiB per throughput run (default 128)
  --lines N         timed round trips per latency run (default 2000);
                    100 times as many lines per NATS run
  --starts N        starts per readiness run (default 20)
  --scale N         bindings in the up/down figure (default 500)
  --scale-rounds N  rounds that include the up/down figure (default 3)
  --burst N         concurrent connections in the burst (default 1000)
  --seed N          the shuffle's seed (default: from the clock; printed)
  --only LIST       only these figures, comma-separated, of: throughput,
                    latency, burst, ready, idle, scale, nats (default: all)
  --verbose         print each run and its time on stderr
  --dir DIR         where the temporary directory goes (default
                    $XDG_RUNTIME_DIR, else $TMPDIR, else /tmp)
  --reference DIR   also measure the readiness, idle RSS and up/down of
                    the bind-input and bind-output in DIR (another build,
                    e.g. an older commit's target/release) in the same
                    rounds, with a column fb/reference; the start-up,
                    memory and scale goals are then judged against it
                    (fb/reference <= 1) instead of the issue's figures

Needs socat, nc (OpenBSD netcat, for -N), taskset, bash, head and cat.";

pub struct Opts {
    pub rounds: usize,
    pub mib: usize,
    pub lines: usize,
    pub starts: usize,
    pub scale: usize,
    pub scale_rounds: usize,
    pub burst: usize,
    pub seed: u64,
    pub dir: Option<PathBuf>,
    pub reference: Option<PathBuf>,
    pub only: Option<Vec<String>>,
    pub verbose: bool,
}

fn parse_args() -> Result<Opts, String> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut o = Opts {
        rounds: 10,
        mib: 128,
        lines: 2000,
        starts: 20,
        scale: 500,
        scale_rounds: 3,
        burst: 1000,
        seed,
        dir: None,
        reference: None,
        only: None,
        verbose: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{name} needs a positive whole number"))
        };
        match a.as_str() {
            // cargo bench passes --bench to every benchmark binary.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "-v" | "--verbose" => o.verbose = true,
            "--quick" => {
                o.rounds = 3;
                o.mib = 64;
                o.lines = 500;
                o.starts = 10;
                o.scale_rounds = 1;
            }
            "--rounds" => o.rounds = num(&a)? as usize,
            "--mib" => o.mib = num(&a)? as usize,
            "--lines" => o.lines = num(&a)? as usize,
            "--starts" => o.starts = num(&a)? as usize,
            "--scale" => o.scale = num(&a)? as usize,
            "--scale-rounds" => o.scale_rounds = num(&a)? as usize,
            "--burst" => o.burst = num(&a)? as usize,
            "--seed" => o.seed = num(&a)?,
            "--dir" => o.dir = Some(args.next().ok_or("--dir needs a directory")?.into()),
            "--reference" => {
                let d = PathBuf::from(args.next().ok_or("--reference needs a directory")?);
                for b in ["bind-input", "bind-output"] {
                    if !d.join(b).is_file() {
                        return Err(format!("--reference: no {b} in {}", d.display()));
                    }
                }
                // Absolute: the bindings are started from elsewhere.
                o.reference = Some(std::path::absolute(&d).map_err(|e| e.to_string())?);
            }
            "--only" => {
                let list: Vec<String> = args
                    .next()
                    .ok_or("--only needs a list")?
                    .split(',')
                    .map(String::from)
                    .collect();
                for f in &list {
                    if !KINDS.contains(&f.as_str()) {
                        return Err(format!(
                            "--only: unknown figure {f:?} (of {})",
                            KINDS.join(", ")
                        ));
                    }
                }
                o.only = Some(list);
            }
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

const KINDS: [&str; 7] = [
    "throughput",
    "latency",
    "burst",
    "ready",
    "idle",
    "scale",
    "nats",
];

static RNG: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);

/// xorshift64*: the shuffle and the port picks (no crate needed).
pub fn rng() -> u64 {
    let mut x = RNG.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    RNG.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// One measurement of a round.
#[derive(Clone, Copy, Debug)]
enum Job {
    Flow(Flow),
    Latency { socat: bool, pinned: bool },
    Burst { socat: bool },
    Ready(&'static str),
    Idle(Tool),
    Scale(Tool),
}

pub fn flow(dir: Dir, ends: Ends, line: usize, relay: Relay) -> Flow {
    Flow {
        dir,
        ends,
        line,
        relay,
    }
}

/// The throughput runs of every round.
pub fn flows() -> Vec<Flow> {
    use Relay::*;
    let mut v = Vec::new();
    for (dir, ends, line, relays) in [
        (
            Dir::Out,
            Ends::Shell,
            64,
            &[Fifobind, Socat, SocatB, Tcp][..],
        ),
        (
            Dir::Out,
            Ends::Fast,
            64,
            &[Fifobind, Socat, SocatB, Tcp, Pipe][..],
        ),
        (Dir::Out, Ends::CatFast, 64, &[Fifobind, Socat, Tcp][..]),
        (
            Dir::In,
            Ends::Shell,
            64,
            &[Fifobind, Socat, SocatB, Tcp][..],
        ),
        (
            Dir::In,
            Ends::Shell,
            4096,
            &[Fifobind, Socat, SocatB, Tcp][..],
        ),
        (Dir::In, Ends::Fast, 64, &[Fifobind, Socat, SocatB, Tcp][..]),
        (
            Dir::In,
            Ends::Fast,
            4096,
            &[Fifobind, Socat, SocatB, Tcp][..],
        ),
    ] {
        for &relay in relays {
            v.push(flow(dir, ends, line, relay));
        }
    }
    v
}

/// What each round measured: named values (MiB/s, seconds, µs, KiB).
pub type Round = HashMap<String, f64>;

pub fn key(f: &Flow, what: &str) -> String {
    format!("{:?}/{:?}/{}/{:?}/{what}", f.dir, f.ends, f.line, f.relay)
}

impl Job {
    fn kind(&self) -> &'static str {
        match self {
            Job::Flow(_) => "throughput",
            Job::Latency { .. } => "latency",
            Job::Burst { .. } => "burst",
            Job::Ready(_) => "ready",
            Job::Idle(_) => "idle",
            Job::Scale(_) => "scale",
        }
    }
}

fn run_job(ctx: &Ctx, o: &Opts, job: Job, round: &mut Round) -> R<()> {
    let tool = |socat: bool| if socat { "socat" } else { "fifobind" };
    match job {
        Job::Flow(f) => {
            let s = match f.dir {
                Dir::Out => figures::outbound(ctx, f),
                Dir::In => figures::inbound(ctx, f),
            }
            .map_err(|e| format!("{f:?}: {e}"))?;
            round.insert(key(&f, "mibs"), o.mib as f64 / s.secs);
            round.insert(key(&f, "secs"), s.secs);
            round.insert(key(&f, "sender"), s.sender_cpu);
            round.insert(key(&f, "reader"), s.reader_cpu);
            if let Some(c) = s.relay_cpu {
                round.insert(key(&f, "relay"), c);
            }
        }
        Job::Latency { socat, pinned } => {
            let mut rtts = figures::latency(ctx, socat, pinned, o.lines)
                .map_err(|e| format!("round trips, {}: {e}", tool(socat)))?;
            rtts.sort_by(f64::total_cmp);
            let pin = if pinned { "pinned" } else { "unpinned" };
            round.insert(
                format!("rtt/{pin}/p50/{}", tool(socat)),
                report::quantile(&rtts, 0.50),
            );
            round.insert(
                format!("rtt/{pin}/p99/{}", tool(socat)),
                report::quantile(&rtts, 0.99),
            );
        }
        Job::Burst { socat } => {
            let b = figures::burst(ctx, socat, o.burst)
                .map_err(|e| format!("burst, {}: {e}", tool(socat)))?;
            round.insert(format!("burst/secs/{}", tool(socat)), b.secs);
            round.insert(format!("burst/cpu/{}", tool(socat)), b.relay_cpu);
            round.insert(format!("burst/whole/{}", tool(socat)), b.whole as f64);
            round.insert(format!("burst/failed/{}", tool(socat)), b.failed as f64);
        }
        Job::Ready(t) => {
            let starts =
                figures::readiness(ctx, t, o.starts).map_err(|e| format!("readiness, {t}: {e}"))?;
            let med = |f: &dyn Fn(&figures::Start) -> Option<f64>| {
                let mut v: Vec<f64> = starts.iter().filter_map(f).collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| report::quantile(&v, 0.5))
            };
            round.insert(format!("ready/{t}"), med(&|s| Some(s.ms)).unwrap());
            if let Some(c) = med(&|s| s.cpu_ms) {
                round.insert(format!("readycpu/{t}"), c);
            }
            if let Some(c) = med(&|s| s.stop_ms) {
                round.insert(format!("stop/{t}"), c);
            }
        }
        Job::Idle(t) => {
            let m =
                figures::idle_rss(ctx, t).map_err(|e| format!("idle RSS, {}: {e}", t.name()))?;
            round.insert(format!("rss/listener/{}", t.name()), m.listener as f64);
            round.insert(format!("rss/sender/{}", t.name()), m.sender as f64);
            round.insert(
                format!("anon/listener/{}", t.name()),
                m.listener_anon as f64,
            );
            round.insert(format!("anon/sender/{}", t.name()), m.sender_anon as f64);
        }
        Job::Scale(t) => {
            let (up, down) = figures::scale(ctx, t, o.scale)
                .map_err(|e| format!("{} up/down, {}: {e}", o.scale, t.name()))?;
            round.insert(format!("scale/up/{}", t.name()), up);
            round.insert(format!("scale/down/{}", t.name()), down);
        }
    }
    Ok(())
}

/// Runnable processes right now (procs_running of /proc/stat), this
/// benchmark included: the noise gauge.
fn runnable() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("procs_running "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn shuffle<T>(v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng() % (i as u64 + 1)) as usize);
    }
}

/// Kills whatever the benchmark started (found by the mark in its
/// environment) and removes its temporary directory.
struct Cleanup {
    mark: String,
    tmp: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let left = procs::kill_with_env(&self.mark);
        if !left.is_empty() {
            eprintln!("bench: processes left behind: {left:?}");
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Where the stop signals' handler writes: one thread reads it, cleans up
/// and exits with 128 + the signal. (Blocking the signals and sigwait(2)
/// would not do: the children inherit the mask, and socat would then
/// ignore the SIGTERM that ends it.)
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// Set by a stop signal: the runs then fail as their processes die, and
/// only the cleanup thread may report and exit.
static STOPPING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    STOPPING.store(true, Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; one byte from the stack.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&b as *const u8).cast(),
            1,
        )
    };
}

fn catch_signals(mark: String, tmp: PathBuf) -> R<()> {
    let (r, w) = plumbing::big_pipe()?;
    SIGNAL_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w);
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(s, &sa, std::ptr::null_mut());
        }
    }
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let far = Instant::now() + std::time::Duration::from_secs(1 << 30);
        if plumbing::read_fd(r.as_raw_fd(), &mut b, far).is_ok() {
            eprintln!("bench: stopped by signal {}; cleaning up", b[0]);
            drop(Cleanup { mark, tmp });
            std::process::exit(128 + b[0] as i32);
        }
    });
    Ok(())
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(o) {
        if STOPPING.load(Ordering::Relaxed) {
            // The cleanup thread exits with 128 + the signal.
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn missing_tools() -> Vec<&'static str> {
    ["socat", "nc", "taskset", "bash", "head", "cat"]
        .into_iter()
        .filter(|t| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

fn run(o: Opts) -> R<()> {
    let missing = missing_tools();
    if !missing.is_empty() {
        return Err(format!(
            "missing: {} (see README, \"Benchmark\")",
            missing.join(", ")
        ));
    }
    RNG.store(o.seed | 1, Ordering::Relaxed);
    // SAFETY: getrlimit/setrlimit with a local struct: the burst holds
    // a thousand sockets at once.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let base = o
        .dir
        .clone()
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("TMPDIR").map(PathBuf::from))
        .unwrap_or_else(|| "/tmp".into());
    let tmp = tempfile::Builder::new()
        .prefix("fifobind-bench")
        .tempdir_in(&base)
        .map_err(|e| {
            format!(
                "cannot make a temporary directory in {}: {e}",
                base.display()
            )
        })?
        .keep();
    let mark = format!("FIFOBIND_BENCH={}", tmp.display());
    catch_signals(mark.clone(), tmp.clone())?;
    let _cleanup = Cleanup {
        mark: mark.clone(),
        tmp: tmp.clone(),
    };
    let logs = tmp.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let bytes = o.mib * MIB;
    let data64 = Arc::new(plumbing::numbered(bytes, 64));
    let data4k = Arc::new(plumbing::numbered(bytes, 4096));
    let (file64, file4k) = (tmp.join("data64"), tmp.join("data4k"));
    std::fs::write(&file64, &*data64).map_err(|e| e.to_string())?;
    std::fs::write(&file4k, &*data4k).map_err(|e| e.to_string())?;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_bind-input"))
        .parent()
        .unwrap()
        .to_path_buf();
    let ctx = Ctx {
        dir: tmp.join("run"),
        bin,
        tmp: tmp.clone(),
        logs,
        mark,
        data64,
        data4k,
        file64,
        file4k,
        socat_block: "131072".into(),
        reference: o.reference.clone(),
    };
    let header = report::header(&ctx, &o);
    eprintln!("{header}");
    let load_start = loadavg();
    let mut rounds: Vec<Round> = Vec::new();
    let mut noise = Vec::new();
    for r in 0..o.rounds {
        let mut jobs: Vec<Job> = flows().into_iter().map(Job::Flow).collect();
        for socat in [false, true] {
            for pinned in [false, true] {
                jobs.push(Job::Latency { socat, pinned });
            }
            jobs.push(Job::Burst { socat });
        }
        let mut tools = vec![Tool::Fifobind, Tool::Socat];
        if o.reference.is_some() {
            tools.push(Tool::Reference);
        }
        for &t in &tools {
            jobs.push(Job::Idle(t));
            if r < o.scale_rounds {
                jobs.push(Job::Scale(t));
            }
            jobs.push(Job::Ready(t.name()));
        }
        jobs.push(Job::Ready("true"));
        jobs.retain(|j| {
            o.only
                .as_ref()
                .is_none_or(|l| l.iter().any(|k| k == j.kind()))
        });
        shuffle(&mut jobs);
        let gauge = runnable();
        noise.push(gauge);
        let t = Instant::now();
        let mut round = Round::new();
        for job in jobs.iter().copied() {
            let t = Instant::now();
            run_job(&ctx, &o, job, &mut round)?;
            if o.verbose {
                eprintln!("bench: {job:?}: {:.3} s", t.elapsed().as_secs_f64());
            }
        }
        eprintln!(
            "bench: round {}/{}: {} runs in {:.1} s, {} runnable at its start",
            r + 1,
            o.rounds,
            jobs.len(),
            t.elapsed().as_secs_f64(),
            gauge
        );
        rounds.push(round);
    }
    // After the rounds, on its own (benches/bench/nats.rs).
    let nats = if o
        .only
        .as_ref()
        .is_none_or(|l| l.iter().any(|k| k == "nats"))
    {
        let figure = nats::figure(&ctx, o.lines * 100)?;
        eprintln!("bench: {figure}");
        format!("\n\n{figure}")
    } else {
        String::new()
    };
    let text = report::report(
        &o,
        &rounds,
        &noise,
        &load_start,
        &loadavg(),
        started.elapsed(),
    );
    println!("{header}\n\n{text}{nats}");
    Ok(())
}
