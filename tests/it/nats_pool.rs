//! nats-master and nats-pool against a real `nats-server -js` on
//! loopback: masters on three "hosts" fanning their daemons' lines into
//! one receiver, which is restarted mid-stream; and every connection
//! setting (TLS, user and password, token, nkey), good and wrong,
//! through both commands and the children they start.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{
    Env, NatsServer, PATIENCE, Spawned, assert_fails, env_with_nats, kill, leftovers_but_positions,
    open_fifo, read_until, test_certificates,
};

const NATS_MASTER: &str = env!("CARGO_BIN_EXE_nats-master");
const NATS_POOL: &str = env!("CARGO_BIN_EXE_nats-pool");

/// Starts `nats-pool PREFIX ARGS`.
fn spawn_pool(env: &Env, prefix: &str, args: &[&str]) -> Spawned {
    env.spawn(Command::new(NATS_POOL).arg(prefix).args(args))
}

/// Starts `nats-master PREFIX DDIR -n HOST ARGS`.
fn spawn_master(env: &Env, prefix: &str, ddir: &Path, host: &str, args: &[&str]) -> Spawned {
    env.spawn(
        Command::new(NATS_MASTER)
            .arg(prefix)
            .arg(ddir)
            .args(["-n", host])
            .args(args),
    )
}

/// Waits until the receiver has printed `count` `NAME FIFO` lines, and
/// returns them by name.
fn printed(pool: &Spawned, count: usize) -> HashMap<String, PathBuf> {
    assert!(
        pool.wait_stdout(PATIENCE * 3, |s| s.lines().count() >= count),
        "nats-pool did not print {count} lines\n{}",
        pool.describe()
    );
    pool.stdout()
        .lines()
        .map(|l| {
            let (name, fifo) = l.split_once(' ').expect("NAME FIFO");
            (name.to_string(), PathBuf::from(fifo))
        })
        .collect()
}

/// A directory of daemons in `dir`: (name, bash body) pairs.
fn daemons_in(dir: &Path, scripts: &[(String, String)]) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    for (name, body) in scripts {
        let path = dir.join(name);
        fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Reads `fifo` into `buf` until it holds `lines` lines, the writer
/// closes (true), or nothing came for `quiet`: a slow machine only makes
/// it take longer, a stalled stream ends it.
fn read_into(fifo: &File, buf: &mut Vec<u8>, lines: usize, quiet: Duration) -> bool {
    let mut have = buf.iter().filter(|&&b| b == b'\n').count();
    while have < lines {
        let reading = read_until(fifo, quiet, |chunk| {
            have += chunk.iter().filter(|&&b| b == b'\n').count();
            buf.extend_from_slice(chunk);
            have < lines
        });
        if reading.closed {
            return true;
        }
        if reading.bytes == 0 {
            break;
        }
    }
    false
}

/// [`read_into`] for every FIFO at once, one thread each, up to
/// `lines(name)` lines; whether each was closed, in name order.
fn read_all(
    got: &mut HashMap<String, Vec<u8>>,
    readers: &HashMap<String, File>,
    lines: impl Fn(&str) -> usize + Sync,
    limit: Duration,
) -> Vec<bool> {
    let mut bufs: Vec<(&String, &mut Vec<u8>)> = got.iter_mut().collect();
    bufs.sort_by(|a, b| a.0.cmp(b.0));
    std::thread::scope(|s| {
        let handles: Vec<_> = bufs
            .into_iter()
            .map(|(name, buf)| {
                let (reader, lines) = (&readers[name], &lines);
                s.spawn(move || read_into(reader, buf, lines(name), limit))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn nats_pool_three_masters_fan_100000_lines_in_once_in_order_across_its_restart() {
    let Some((env, _server, url)) = env_with_nats(&[]) else {
        return;
    };
    let connect = ["-s", url.as_str()];
    let mut pool = spawn_pool(&env, "fan", &connect);
    // Three hosts, two daemons each: 100,000 lines in all.
    let per = [16_667, 16_667, 16_667, 16_667, 16_666, 16_666];
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    let mut masters = Vec::new();
    for h in 0..3 {
        let scripts: Vec<(String, String)> = (0..2)
            .map(|d| {
                let n = per[h * 2 + d];
                let name = format!("h{h}.d{d}");
                want.insert(
                    name.clone(),
                    (1..=n).map(|i| format!("{name} {i}")).collect(),
                );
                (format!("d{d}"), format!("seq -f '{name} %.0f' 1 {n}"))
            })
            .collect();
        let ddir = env.tmp().join(format!("host{h}"));
        daemons_in(&ddir, &scripts);
        masters.push(spawn_master(&env, "fan", &ddir, &format!("h{h}"), &connect));
    }
    let fifos = printed(&pool, 6);
    let mut names: Vec<String> = want.keys().cloned().collect();
    names.sort();
    let mut found: Vec<String> = fifos.keys().cloned().collect();
    found.sort();
    assert_eq!(found, names, "{}", pool.describe());
    // A part of each stream, then the receiver is stopped.
    let mut got: HashMap<String, Vec<u8>> = HashMap::new();
    let readers: HashMap<String, File> = names
        .iter()
        .map(|n| (n.clone(), open_fifo(&fifos[n])))
        .collect();
    for name in &names {
        got.insert(name.clone(), Vec::new());
    }
    read_all(&mut got, &readers, |_| 4000, PATIENCE);
    kill(pool.pid(), libc::SIGTERM);
    pool.assert_stopped_by(libc::SIGTERM);
    // What its bindings had put into their FIFOs is still there to read.
    let closed = read_all(&mut got, &readers, |_| usize::MAX, PATIENCE);
    assert!(
        closed.iter().all(|&c| c),
        "a FIFO was not closed: {closed:?}"
    );
    let before: usize = got
        .values()
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .sum();
    drop(readers);
    // Started again: every daemon resumes where its consumer stopped.
    let pool = spawn_pool(&env, "fan", &connect);
    let fifos = printed(&pool, 6);
    let readers: HashMap<String, File> = names
        .iter()
        .map(|n| (n.clone(), open_fifo(&fifos[n])))
        .collect();
    read_all(&mut got, &readers, |n| want[n].len(), PATIENCE);
    eprintln!("nats-pool stopped after {before} of 100000 lines; started again, the rest came");
    for name in &names {
        let text = String::from_utf8(got[name].clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let expected = &want[name];
        if lines != *expected {
            let dup = lines.windows(2).find(|w| w[0] == w[1]);
            panic!(
                "{name}: {} lines, {} wanted; first difference at {:?}; a line twice: {dup:?}\n{}",
                lines.len(),
                expected.len(),
                lines.iter().zip(expected).position(|(a, b)| a != b),
                env.logs()
            );
        }
    }
    for mut master in masters {
        master.assert_ends_ok();
    }
    let mut pool = pool;
    kill(pool.pid(), libc::SIGTERM);
    pool.assert_stopped_by(libc::SIGTERM);
    // Nothing is left but the consumers' position records.
    let procs = env.wait_no_processes(PATIENCE);
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let left = leftovers_but_positions(&env);
    assert!(left.is_empty(), "left: {left:?}");
}

/// One daemon's three lines from nats-master to nats-pool, both started
/// with `connect` (the children get the same settings).
fn three_lines_through(env: &Env, connect: &[&str]) {
    let ddir = env.tmp().join("ddir");
    daemons_in(
        &ddir,
        &[("d".into(), "printf 'one\\ntwo\\nthree\\n'".into())],
    );
    let mut pool = spawn_pool(env, "cfg", connect);
    let mut master = spawn_master(env, "cfg", &ddir, "h", connect);
    let fifos = printed(&pool, 1);
    let reader = open_fifo(&fifos["h.d"]);
    let mut buf = Vec::new();
    read_into(&reader, &mut buf, 3, PATIENCE);
    assert_eq!(
        String::from_utf8_lossy(&buf),
        "one\ntwo\nthree\n",
        "{}\n{}",
        pool.describe(),
        master.describe()
    );
    master.assert_ends_ok();
    kill(pool.pid(), libc::SIGTERM);
    pool.assert_stopped_by(libc::SIGTERM);
}

/// A wrong credential: both commands refuse with `status` and say why,
/// leaving nothing behind.
fn refused(env: &Env, connect: &[&str], status: i32, needle: &str) {
    let ddir = env.tmp().join("ddir");
    let mut args = vec!["cfg"];
    args.extend_from_slice(connect);
    assert_fails(&env.run(NATS_POOL, &args), status, needle);
    let mut args = vec!["cfg", ddir.to_str().unwrap()];
    args.extend_from_slice(connect);
    assert_fails(&env.run(NATS_MASTER, &args), status, needle);
    let left = leftovers_but_positions(env);
    assert!(left.is_empty(), "a refused command left: {left:?}");
}

fn secret_file(env: &Env, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = env.tmp().join(name);
    fs::write(&path, format!("{text}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn nats_pool_and_master_over_tls_trusting_a_given_ca() {
    let env = Env::new();
    let Some((ca, cert, key)) = test_certificates(env.tmp()) else {
        return;
    };
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let Some(server) = NatsServer::start(&env, &["--tls", "--tlscert", cert, "--tlskey", key])
    else {
        return;
    };
    let url = format!("tls://127.0.0.1:{}", server.port);
    three_lines_through(&env, &["-s", &url, "--tls-ca", ca.to_str().unwrap()]);
    // Without the CA the server's certificate is not trusted.
    refused(&env, &["-s", &url, "-t", "3"], 69, "cannot connect to NATS");
}

#[test]
fn nats_pool_and_master_with_a_user_and_password_file() {
    let Some((env, _server, url)) = env_with_nats(&["--user", "app", "--pass", "pw-4711"]) else {
        return;
    };
    let good = secret_file(&env, "good", "pw-4711");
    let wrong = secret_file(&env, "wrong", "pw-0000");
    three_lines_through(
        &env,
        &["-s", &url, "--user", "app", "--password-file", &good],
    );
    refused(
        &env,
        &["-s", &url, "--user", "app", "--password-file", &wrong],
        77,
        "authorization",
    );
}

#[test]
fn nats_pool_and_master_with_a_token_file() {
    let Some((env, _server, url)) = env_with_nats(&["--auth", "tok-4711"]) else {
        return;
    };
    let good = secret_file(&env, "good", "tok-4711");
    let wrong = secret_file(&env, "wrong", "tok-0000");
    three_lines_through(&env, &["-s", &url, "--token-file", &good]);
    refused(
        &env,
        &["-s", &url, "--token-file", &wrong],
        77,
        "authorization",
    );
}

#[test]
fn nats_pool_and_master_with_an_nkey_seed_file() {
    let env = Env::new();
    let user = nkeys::KeyPair::new_user();
    let conf = env.tmp().join("server.conf");
    fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let Some(server) = NatsServer::start(&env, &["-c", conf.to_str().unwrap()]) else {
        return;
    };
    let url = server.url();
    let good = secret_file(&env, "good", &user.seed().unwrap());
    let stranger = nkeys::KeyPair::new_user();
    let wrong = secret_file(&env, "wrong", &stranger.seed().unwrap());
    three_lines_through(&env, &["-s", &url, "--nkey", &good]);
    refused(&env, &["-s", &url, "--nkey", &wrong], 77, "authorization");
}

#[test]
fn nats_pool_and_master_refuse_bad_command_lines_creating_nothing() {
    let env = Env::new();
    env.assert_usage_errors(
        NATS_POOL,
        &[
            (&["logs.*"], "wildcards"),
            (&["lo gs"], "not a NATS subject"),
            (&["logs", "--durable", "a.b"], "--durable"),
            (&["logs", "--stream", "a.b"], "--stream"),
            (
                &["logs", "-s", "nats://u:pw@127.0.0.1:4222"],
                "--password-file",
            ),
        ],
    );
    env.assert_usage_errors(
        NATS_MASTER,
        &[
            (&["logs"], "DDIR"),
            (&["logs.>", "/tmp"], "wildcards"),
            (&["logs", "/tmp", "-n", "bad name"], "NAME"),
            (&["logs", "/tmp", "--token-file"], "--token-file"),
        ],
    );
}
