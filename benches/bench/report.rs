//! The printed report: medians of the rounds, and for every comparison the
//! median of same-round ratios with its quartile range (a ratio of two
//! runs of one round shares that round's noise; a ratio of two medians
//! does not), the goals of issue 14 with a verdict, and the noise gauge.

use std::time::Duration;

use crate::figures::{Ctx, Dir, Ends, Relay, Tool};
use crate::{Opts, Round, flow, key};

/// The `q` quantile of sorted values, interpolated linearly.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// Median, first and third quartile.
#[derive(Clone, Copy)]
struct Spread {
    med: f64,
    q1: f64,
    q3: f64,
}

fn spread(mut v: Vec<f64>) -> Option<Spread> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(Spread {
        med: quantile(&v, 0.5),
        q1: quantile(&v, 0.25),
        q3: quantile(&v, 0.75),
    })
}

fn values(rounds: &[Round], k: &str) -> Vec<f64> {
    rounds.iter().filter_map(|r| r.get(k).copied()).collect()
}

fn median(rounds: &[Round], k: &str) -> Option<f64> {
    spread(values(rounds, k)).map(|s| s.med)
}

/// Same-round ratios a/b.
fn ratio(rounds: &[Round], a: &str, b: &str) -> Option<Spread> {
    spread(
        rounds
            .iter()
            .filter_map(|r| Some(r.get(a)? / r.get(b)?))
            .collect(),
    )
}

fn show_ratio(s: Option<Spread>) -> String {
    match s {
        Some(s) => format!("{} ({}-{})", short(s.med), short(s.q1), short(s.q3)),
        None => "-".into(),
    }
}

/// Three significant digits or so, whatever the magnitude.
fn short(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        a if a >= 0.1 || a == 0.0 => format!("{x:.2}"),
        _ => format!("{x:.3}"),
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// A plain-text table, first column left-aligned, the others right.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let n = head.len();
    let mut w = vec![0; n];
    for r in std::iter::once(head.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .chain(rows.iter().cloned())
    {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        r.iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = " ".repeat(w[i] - c.chars().count());
                if i == 0 {
                    format!("{c}{pad}")
                } else {
                    format!("{pad}{c}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(
        &head.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )];
    out.push(line(&w.iter().map(|&k| "-".repeat(k)).collect::<Vec<_>>()));
    out.extend(rows.iter().map(|r| line(r)));
    out.join("\n")
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let t = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            t.lines().find(|l| !l.trim().is_empty()).map(str::to_string)
        })
        .unwrap_or_default()
}

/// Date, machine, versions and settings.
pub fn header(ctx: &Ctx, o: &Opts) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(String::new(), |k| format!("{} GiB", k / (1 << 20)));
    let socat = first_line("socat", &["-V"]);
    let socat = std::process::Command::new("socat")
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.starts_with("socat version"))
                .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_string())
        })
        .unwrap_or(socat);
    let reference = match &o.reference {
        Some(d) => {
            let commit = first_line(
                "git",
                &[
                    "-C",
                    &d.to_string_lossy(),
                    "log",
                    "-1",
                    "--format=commit %h of %cs",
                ],
            );
            let commit = if commit.starts_with("commit ") {
                format!(", {commit}")
            } else {
                String::new()
            };
            format!(
                "\nreference: {} ({}{commit})",
                d.display(),
                first_line(&ctx.of(Tool::Reference).exe("bind-input"), &["--version"])
            )
        }
        None => String::new(),
    };
    format!(
        "fifobind benchmark, {} UTC\nmachine: {} CPUs ({cpu}), {mem}, {}; socat {socat}; {}\n\
         runtime directory on {}; {} rounds of {} MiB per throughput run, {} round trips, {} starts, \
         {} bindings in {} rounds, a burst of {}; seed {}{reference}",
        first_line("date", &["-u", "+%Y-%m-%d %H:%M"]),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        first_line("uname", &["-sr"]),
        first_line(&ctx.exe("bind-input"), &["--version"]),
        fs_type(&ctx.tmp),
        o.rounds,
        o.mib,
        o.lines,
        o.starts,
        o.scale,
        o.scale_rounds.min(o.rounds),
        o.burst,
        o.seed
    )
}

/// The file system type of the mount that holds `p` (statfs(2) cannot
/// tell ext4 from ext2).
fn fs_type(p: &std::path::Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && p.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} ({})", f[2], f[1])))
        })
        .max()
        .map_or_else(|| "?".into(), |(_, t)| t)
}

struct Goal {
    what: String,
    got: Option<Spread>,
    /// The goal: at least (true) or at most (false) this.
    at_least: bool,
    bound: f64,
}

pub fn report(
    o: &Opts,
    rounds: &[Round],
    noise: &[f64],
    load0: &str,
    load1: &str,
    took: Duration,
) -> String {
    use Relay::*;
    let mut out = Vec::new();
    let mut goals: Vec<Goal> = Vec::new();
    let mut goal = |what: String, got: Option<Spread>, at_least: bool, bound: f64| {
        goals.push(Goal {
            what,
            got,
            at_least,
            bound,
        })
    };

    // Throughput.
    let figs = [
        (
            Dir::Out,
            Ends::Shell,
            64,
            "outbound, shell: cat > FIFO; socat TCP-LISTEN | head -c",
        ),
        (
            Dir::Out,
            Ends::Fast,
            64,
            "outbound, fast: 1 MiB writes and reads",
        ),
        (
            Dir::Out,
            Ends::CatFast,
            64,
            "outbound, cat > FIFO; 1 MiB reads",
        ),
        (
            Dir::In,
            Ends::Shell,
            64,
            "inbound, shell, 64 B lines: nc -N; head -c FIFO",
        ),
        (Dir::In, Ends::Shell, 4096, "inbound, shell, 4 KiB lines"),
        (
            Dir::In,
            Ends::Fast,
            64,
            "inbound, fast, 64 B lines: 1 MiB writes and reads",
        ),
        (Dir::In, Ends::Fast, 4096, "inbound, fast, 4 KiB lines"),
    ];
    let mut rows = Vec::new();
    for (dir, ends, line, name) in figs {
        let k = |r: Relay| key(&flow(dir, ends, line, r), "mibs");
        rows.push(vec![
            name.to_string(),
            num(median(rounds, &k(Fifobind)), 0),
            num(median(rounds, &k(Socat)), 0),
            num(median(rounds, &k(SocatB)), 0),
            num(median(rounds, &k(Tcp)), 0),
            show_ratio(ratio(rounds, &k(Fifobind), &k(Socat))),
            show_ratio(ratio(rounds, &k(Fifobind), &k(SocatB))),
            show_ratio(ratio(rounds, &k(Fifobind), &k(Tcp))),
        ]);
        let short = name.split(':').next().unwrap_or(name);
        let fast = key(&flow(Dir::Out, Ends::Fast, 64, Fifobind), "mibs");
        let (socat, socat_b, tcp) = (k(Socat), k(SocatB), k(Tcp));
        // (what, against, at least)
        let targets: &[(&str, &String, f64)] = match (dir, ends) {
            (Dir::Out, Ends::Shell) => &[("x socat", &socat, 1.0), ("of no relay", &tcp, 0.95)],
            (Dir::Out, Ends::Fast) => &[("of TCP alone", &tcp, 0.95), ("x socat", &socat, 2.0)],
            (Dir::Out, Ends::CatFast) => &[("of a 1 MiB writer", &fast, 0.8)],
            _ => &[
                ("x socat -b 131072", &socat_b, 1.0),
                ("x socat", &socat, 1.0),
                ("of TCP alone", &tcp, 0.9),
            ],
        };
        for (what, against, bound) in targets {
            goal(
                format!("{short}: {what}"),
                ratio(rounds, &k(Fifobind), against),
                true,
                *bound,
            );
        }
    }
    out.push(format!(
        "Throughput, MiB/s (medians of {} rounds; ratios: median of same-round ratios, quartiles in brackets)",
        rounds.len()
    ));
    out.push(table(
        &[
            "figure",
            "fifobind",
            "socat",
            "socat -b",
            "no relay",
            "fb/socat",
            "fb/socat -b",
            "fb/no relay",
        ],
        &rows,
    ));
    let pipe = key(&flow(Dir::Out, Ends::Fast, 64, Pipe), "mibs");
    let tcp = key(&flow(Dir::Out, Ends::Fast, 64, Tcp), "mibs");
    out.push(format!(
        "no relay is the same sender and reader joined by one TCP connection; fast endpoints joined by a 1 MiB pipe instead: {} MiB/s ({} of TCP alone)",
        num(median(rounds, &pipe), 0),
        show_ratio(ratio(rounds, &pipe, &tcp))
    ));

    // CPU.
    let mut rows = Vec::new();
    for (dir, ends, line, name) in figs {
        for r in [Fifobind, Socat, SocatB, Tcp, Pipe] {
            let f = flow(dir, ends, line, r);
            if median(rounds, &key(&f, "secs")).is_none() {
                continue;
            }
            rows.push(vec![
                format!("{}, {}", name.split(':').next().unwrap_or(name), r.name()),
                num(median(rounds, &key(&f, "secs")), 3),
                num(median(rounds, &key(&f, "relay")), 3),
                num(median(rounds, &key(&f, "sender")), 3),
                num(median(rounds, &key(&f, "reader")), 3),
            ]);
        }
    }
    out.push(String::new());
    out.push(format!("CPU seconds per run of {} MiB beside wall time (medians; rusage of each process, thread CPU time of the fast endpoints)", o.mib));
    out.push(table(
        &[
            "figure, relay",
            "wall",
            "relay CPU",
            "sender CPU",
            "reader CPU",
        ],
        &rows,
    ));

    // Round trips and the burst.
    let mut rows = Vec::new();
    let pair = |rows: &mut Vec<Vec<String>>, name: &str, k: &str, digits: usize| {
        let (a, b) = (format!("{k}/fifobind"), format!("{k}/socat"));
        rows.push(vec![
            name.to_string(),
            num(median(rounds, &a), digits),
            num(median(rounds, &b), digits),
            show_ratio(ratio(rounds, &a, &b)),
        ]);
    };
    for (pin, how) in [("pinned", "pinned: taskset -c 0"), ("unpinned", "unpinned")] {
        for q in ["p50", "p99"] {
            pair(
                &mut rows,
                &format!("bash round trip, {how}, {q}, us"),
                &format!("rtt/{pin}/{q}"),
                0,
            );
        }
    }
    pair(
        &mut rows,
        &format!("burst of {} connections, s", o.burst),
        "burst/secs",
        3,
    );
    pair(&mut rows, "burst, relay CPU s", "burst/cpu", 3);
    // None when the burst was not measured.
    let whole = |t: &str| {
        values(rounds, &format!("burst/whole/{t}"))
            .into_iter()
            .reduce(f64::min)
    };
    let of_burst = |w: Option<f64>| w.map_or("-".into(), |w| format!("{w}/{}", o.burst));
    rows.push(vec![
        "burst, lines whole (fewest of any round)".into(),
        of_burst(whole("fifobind")),
        of_burst(whole("socat")),
        String::new(),
    ]);
    out.push(String::new());
    out.push("Round trips and burst (socat fork with backlog=1024 in the burst)".into());
    out.push(table(&["figure", "fifobind", "socat", "fb/socat"], &rows));

    // Start, stop, memory and scale, beside the reference build if given.
    let refd = o.reference.is_some();
    let mut rows = Vec::new();
    let trio = |rows: &mut Vec<Vec<String>>, name: &str, k: &str, digits: usize| {
        let (a, r, b) = (
            format!("{k}/fifobind"),
            format!("{k}/reference"),
            format!("{k}/socat"),
        );
        let mut row = vec![name.to_string(), num(median(rounds, &a), digits)];
        if refd {
            row.push(num(median(rounds, &r), digits));
        }
        row.push(num(median(rounds, &b), digits));
        if refd {
            row.push(show_ratio(ratio(rounds, &a, &r)));
        }
        row.push(show_ratio(ratio(rounds, &a, &b)));
        rows.push(row);
    };
    trio(&mut rows, "readiness, ms (median start)", "ready", 2);
    trio(
        &mut rows,
        "  CPU of a start, ms (command and daemon)",
        "readycpu",
        2,
    );
    let mut row = vec![
        "  starting true(1), ms".into(),
        num(median(rounds, "ready/true"), 2),
    ];
    row.resize(if refd { 6 } else { 4 }, String::new());
    rows.push(row);
    trio(&mut rows, "stop, ms (SIGTERM to gone, median)", "stop", 2);
    trio(&mut rows, "idle RSS, listener, KiB", "rss/listener", 0);
    trio(
        &mut rows,
        "idle RSS, connected sender, KiB",
        "rss/sender",
        0,
    );
    trio(
        &mut rows,
        "  of that its own (RssAnon), listener, KiB",
        "anon/listener",
        0,
    );
    trio(
        &mut rows,
        "  of that its own (RssAnon), sender, KiB",
        "anon/sender",
        0,
    );
    trio(
        &mut rows,
        &format!("{} bindings up, s", o.scale),
        "scale/up",
        2,
    );
    trio(
        &mut rows,
        &format!("{} bindings down, all gone, s", o.scale),
        "scale/down",
        3,
    );
    out.push(String::new());
    let head: &[&str] = if refd {
        &[
            "figure",
            "fifobind",
            "reference",
            "socat",
            "fb/reference",
            "fb/socat",
        ]
    } else {
        &["figure", "fifobind", "socat", "fb/socat"]
    };
    out.push(match &o.reference {
        Some(d) => format!(
            "Start, stop, memory, scale (reference: the bindings in {})",
            d.display()
        ),
        None => "Start, stop, memory, scale".into(),
    });
    out.push(table(head, &rows));

    goal(
        "bash round trip, pinned, p99: fb/socat".into(),
        ratio(rounds, "rtt/pinned/p99/fifobind", "rtt/pinned/p99/socat"),
        false,
        1.0,
    );
    let lost = whole("fifobind").and_then(|w| spread(vec![o.burst as f64 - w]));
    goal(
        format!("burst: lines lost in the worst round of {}", o.burst),
        lost,
        false,
        0.0,
    );
    if refd {
        // "No worse than today", today measured on this machine, in the
        // same rounds.
        let vs = |k: &str| ratio(rounds, &format!("{k}/fifobind"), &format!("{k}/reference"));
        for (what, k) in [
            ("idle RSS of a listener: fb/reference", "rss/listener"),
            ("idle RSS of a connected sender: fb/reference", "rss/sender"),
            ("readiness: fb/reference", "ready"),
            (
                &format!("{} bindings up: fb/reference", o.scale),
                "scale/up",
            ),
            (
                &format!("{} bindings down: fb/reference", o.scale),
                "scale/down",
            ),
        ] {
            goal(what.to_string(), vs(k), false, 1.0);
        }
    } else {
        let abs = |k: &str| spread(values(rounds, k));
        goal(
            "idle RSS of a listener, KiB (today 1.9 MiB)".into(),
            abs("rss/listener/fifobind"),
            false,
            1946.0,
        );
        goal(
            "readiness, ms (today 2.1)".into(),
            abs("ready/fifobind"),
            false,
            2.1,
        );
        if o.scale == 500 {
            goal(
                "500 bindings up, s (today 1.4-1.9)".into(),
                abs("scale/up/fifobind"),
                false,
                1.9,
            );
            goal(
                "500 bindings down, s (today 0.043-0.068)".into(),
                abs("scale/down/fifobind"),
                false,
                0.068,
            );
        }
    }
    let rows: Vec<Vec<String>> = goals
        .iter()
        .map(|g| {
            let verdict = match g.got {
                None => "not measured".to_string(),
                Some(s)
                    if (g.at_least && s.med >= g.bound) || (!g.at_least && s.med <= g.bound) =>
                {
                    "met".into()
                }
                Some(s) if g.bound != 0.0 => format!(
                    "MISSED by {:.1}%",
                    100.0 * (s.med - g.bound).abs() / g.bound
                ),
                Some(_) => "MISSED".into(),
            };
            vec![
                g.what.clone(),
                format!("{} {}", if g.at_least { ">=" } else { "<=" }, g.bound),
                show_ratio(g.got),
                verdict,
            ]
        })
        .collect();
    out.push(String::new());
    out.push("Goals (issue 14)".into());
    out.push(table(&["goal", "target", "measured", "verdict"], &rows));

    let gauge: Vec<String> = noise.iter().map(|n| format!("{n}")).collect();
    out.push(String::new());
    out.push(format!(
        "noise: runnable processes at each round's start (this benchmark included; 1 is a quiet machine): {}; load average {load0} at the start, {load1} at the end; run time {:.0} s",
        gauge.join(" "),
        took.as_secs_f64()
    ));
    out.join("\n")
}
