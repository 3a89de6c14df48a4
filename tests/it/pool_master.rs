//! pool and master: the seed's example, the key, daemons' fates, signals,
//! and two hosts in network namespaces.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn counted(name: &str, n: usize, pause: &str) -> String {
    format!("for i in $(seq 1 {n}); do echo \"{name} line $i\"; sleep {pause}; done")
}

/// The seed's example on localhost: master and pool in one runtime
/// directory (so their bindings must not clash), dem1 and dem2, key k12.
#[test]
fn seed_example_master_to_pool() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[
        ("dem1", &counted("dem1", 5, "0.05")),
        ("dem2", &counted("dem2", 5, "0.07")),
    ]);
    std::fs::write(ddir.join("README"), "not a daemon\n").unwrap();
    let mut pool = env.consumer(port, "k12");
    let master_out = env.run(
        MASTER,
        &[
            "--name",
            "m",
            "k12",
            "localhost",
            &port.to_string(),
            ddir.to_str().unwrap(),
        ],
    );
    assert_ran_ok(&master_out, &pool);
    let stderr = String::from_utf8_lossy(&master_out.stderr);
    assert!(
        stderr.contains("skipping") && stderr.contains("README"),
        "{stderr}"
    );
    let status = pool
        .wait(PATIENCE)
        .expect("pool ends after END and drained bindings");
    assert!(status.success(), "{}", pool.describe());
    let out = pool.stdout();
    for name in ["dem1", "dem2"] {
        // The stream of daemon NAME of session m.
        let stream = format!("m.{name}");
        let fifo = env.fifo(&stream);
        assert!(
            out.contains(&format!("pool: {stream} ")) && out.contains(fifo.to_str().unwrap()),
            "{out}"
        );
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with(&format!("[{stream}]")))
            .collect();
        let want: Vec<String> = (1..=5)
            .map(|i| format!("[{stream}] {name} line {i}"))
            .collect();
        assert_eq!(lines, want, "{out}");
    }
    env.assert_clean();
}

/// The pool prints `NAME PORT FIFO` for each daemon, the port in its range.
#[test]
fn pool_announces_bindings_in_its_port_range() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("a", "echo one"), ("b", "echo two")]);
    let mut pool = env.pool(&["--once", "--ports", "41000-41999", "k", &port.to_string()]);
    let out = env.run_master("k", port, &ddir);
    assert!(out.status.success(), "{}", describe(&out));
    // Nobody reads the FIFOs here: read them so the bindings can finish.
    for name in ["m.a", "m.b"] {
        assert!(
            pool.wait_stdout(PATIENCE, |s| s.contains(&format!("{name} "))),
            "{}",
            pool.describe()
        );
        let got = read_lines(&env.fifo(name), 1);
        assert_eq!(got.len(), 1);
    }
    pool.assert_ends_ok();
    for line in pool.stdout().lines() {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words.len(), 3, "{line}");
        let p: u16 = words[1].parse().unwrap();
        assert!((41000..=41999).contains(&p), "{line}");
        assert_eq!(words[2], env.fifo(words[0]).to_str().unwrap());
    }
    env.assert_clean();
}

#[test]
fn wrong_key_is_refused_then_right_key_served() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("dem1", "echo hi")]);
    let mut pool = env.consumer(port, "k12");
    let bad = env.run_master("nope", port, &ddir);
    assert_eq!(bad.status.code(), Some(77), "{}", describe(&bad));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("refused") && err.contains("key"), "{err}");
    assert!(
        pool.wait(Duration::from_millis(200)).is_none(),
        "the pool must keep waiting"
    );
    // The wrong key holds the address back a second (75 meanwhile).
    let mut good = env.run_master("k12", port, &ddir);
    let deadline = std::time::Instant::now() + PATIENCE;
    while good.status.code() == Some(75) && std::time::Instant::now() < deadline {
        assert!(
            String::from_utf8_lossy(&good.stderr).contains("too many wrong keys from 127.0.0.1"),
            "{}",
            describe(&good)
        );
        good = env.run_master("k12", port, &ddir);
    }
    assert!(good.status.success(), "{}", describe(&good));
    pool.assert_ends_ok();
    assert!(pool.stdout().contains("[m.dem1] hi"), "{}", pool.describe());
    assert!(pool.stderr().contains("wrong key"), "{}", pool.describe());
    env.assert_clean();
}

#[test]
fn key_from_file_and_environment() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("dem1", "echo hi")]);
    let keyfile = env.tmp().join("key");
    std::fs::write(&keyfile, "s3cret\n").unwrap();
    let mut pool = env.spawn(
        Command::new("bash")
            .arg("-c")
            .arg(consumer(port, "-"))
            .env("FIFOBIND_KEY", "s3cret"),
    );
    ready(&pool);
    let out = env.run_master_with(&["--key-file", keyfile.to_str().unwrap()], "-", port, &ddir);
    assert!(out.status.success(), "{}", describe(&out));
    pool.assert_ends_ok();
    assert!(pool.stdout().contains("[m.dem1] hi"));
    // `-` with no source of a key is a usage error.
    let none = env.run_master("-", port, &ddir);
    assert_eq!(none.status.code(), Some(2), "{}", describe(&none));
    env.assert_clean();
}

#[test]
fn failing_daemon_makes_master_exit_1() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("good", "echo fine"), ("bad", "echo oops; exit 3")]);
    let mut pool = env.consumer(port, "k");
    let out = env.run_master("k", port, &ddir);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad"),
        "{}",
        describe(&out)
    );
    pool.assert_ends_ok();
    // The failing daemon's output still arrived.
    assert!(pool.stdout().contains("[m.bad] oops") && pool.stdout().contains("[m.good] fine"));
    env.assert_clean();
}

#[test]
fn master_argument_errors() {
    let env = Env::new();
    let empty = env.tmp().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases: &[(&[&str], i32)] = &[
        (&["k", "127.0.0.1", "80", "/tmp"], 2),
        (&["", "127.0.0.1", "9000", "/tmp"], 2),
        (&["k", "bad host", "9000", "/tmp"], 2),
        (&["k", "127.0.0.1", "9000"], 2),
        (&["k", "127.0.0.1", "9000", "/nonexistent/ddir"], 66),
        (&["k", "127.0.0.1", "9000", empty.to_str().unwrap()], 66),
    ];
    for (args, code) in cases {
        let out = env.run(MASTER, args);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "{args:?}: {}",
            describe(&out)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{args:?}: {}",
            describe(&out)
        );
        assert!(out.stdout.is_empty());
    }
    // Nobody listens: refused, 69.
    let ddir = env.daemons(&[("d", "echo x")]);
    let out = env.run_master("k", free_port(), &ddir);
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    env.assert_clean();
}

/// SIGTERM to master stops each daemon with its own children, and every
/// binding; the pool then ends too.
#[test]
fn sigterm_to_master_stops_daemons_with_their_children() {
    let env = Env::new();
    let port = free_port();
    let body = "sleep 1000 & sleep 1000 & while true; do echo tick; sleep 0.05; done";
    let ddir = env.daemons(&[("d1", body), ("d2", body)]);
    let (mut pool, mut master) =
        env.consumer_and_master("k", port, &ddir, &["[m.d1] tick", "[m.d2] tick"]);
    kill(master.pid(), libc::SIGTERM);
    // Its keyed bindings first send what they hold (a loaded machine is
    // slow, not wrong: the bound is the harness's patience).
    let status = master.wait(PATIENCE).expect("master stops");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        master.describe()
    );
    // The pool's bindings see their streams end and close.
    pool.assert_ends_ok();
    env.assert_clean();
}

/// SIGTERM to the pool stops every binding it started.
#[test]
fn sigterm_to_pool_stops_its_bindings() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("d1", "while true; do echo tick; sleep 0.05; done")]);
    let (mut pool, mut master) = env.pool_and_master(&[], "k", port, &ddir, &["m.d1 "]);
    let registered = env.registry("pool", pool.pid());
    let binding_pid = registered[0].pid;
    let guardian = guardian_of(pool.pid(), &registered);
    kill(pool.pid(), libc::SIGTERM);
    let status = pool
        .wait(Duration::from_secs(5))
        .expect("pool stops within seconds");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        pool.describe()
    );
    // Gone when the pool has exited, not a moment later.
    assert!(!alive(binding_pid) && !alive(guardian));
    assert!(!env.fifo("m.d1").exists());
    // With its pool gone, the master's binding sees the remote close; the
    // master stops that daemon and exits.
    let status = master
        .wait(PATIENCE)
        .expect("master ends once its binding is gone");
    assert!(!status.success(), "{}", master.describe());
    env.assert_clean();
}

/// Master and pool on two hosts: two network namespaces joined by a veth
/// pair, each with its own address. Needs root.
#[test]
fn two_hosts_in_network_namespaces() {
    if !is_root() || Command::new("ip").arg("-V").output().is_err() {
        skip_or_fail("needs root and iproute2 (ip netns)");
        return;
    }
    let net = NetPair::new();
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[
        ("dem1", &counted("dem1", 3, "0.05")),
        ("dem2", &counted("dem2", 3, "0.05")),
    ]);
    let mut pool = env.spawn(
        Command::new("ip")
            .args(["netns", "exec", &net.b, "bash", "-c"])
            .arg(consumer(port, "k12")),
    );
    ready(&pool);
    let out = run_with_timeout(
        env.cmd("ip")
            .args([
                "netns",
                "exec",
                &net.a,
                MASTER,
                "--name",
                "m",
                "k12",
                &net.addr_b,
                &port.to_string(),
            ])
            .arg(&ddir),
    );
    assert_ran_ok(&out, &pool);
    pool.assert_ends_ok();
    let text = pool.stdout();
    for name in ["dem1", "dem2"] {
        for i in 1..=3 {
            assert!(
                text.contains(&format!("[m.{name}] {name} line {i}")),
                "{text}"
            );
        }
    }
    // The pool restricted each binding to the master's address.
    assert!(
        pool.stderr()
            .contains(&format!("master {} authenticated: session m", net.addr_a)),
        "{}",
        pool.describe()
    );
    env.assert_clean();
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NetPair {
    a: String,
    b: String,
    addr_a: String,
    addr_b: String,
}

impl NetPair {
    fn new() -> NetPair {
        let tag = std::process::id() % 200 + 20;
        let a = format!("fbA{tag}");
        let b = format!("fbB{tag}");
        let net = NetPair {
            addr_a: format!("10.231.{tag}.1"),
            addr_b: format!("10.231.{tag}.2"),
            a,
            b,
        };
        let sh = |args: &str| {
            let ok = Command::new("ip")
                .args(args.split(' '))
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip {args}");
        };
        sh(&format!("netns add {}", net.a));
        sh(&format!("netns add {}", net.b));
        sh(&format!(
            "link add va{tag} netns {} type veth peer name vb{tag} netns {}",
            net.a, net.b
        ));
        for (ns, dev, addr) in [
            (&net.a, format!("va{tag}"), &net.addr_a),
            (&net.b, format!("vb{tag}"), &net.addr_b),
        ] {
            sh(&format!("-n {ns} addr add {addr}/24 dev {dev}"));
            sh(&format!("-n {ns} link set {dev} up"));
            sh(&format!("-n {ns} link set lo up"));
        }
        net
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
