//! The key stays where it is given: out of children, out of core files,
//! and a key file is read as a password, not loaded whole.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::util::*;

#[test]
fn key_never_reaches_a_binding_or_daemon() {
    let env = Env::new();
    let port = free_port();
    let ddir = env.daemons(&[("dem1", "echo \"key=${FIFOBIND_KEY:-none}\"; exec sleep 60")]);
    let mut pool = env.spawn(
        Command::new(POOL)
            .args(["--once", "-", &port.to_string()])
            .env("FIFOBIND_KEY", "k12"),
    );
    ready(&pool);
    let mut master = env.spawn(
        Command::new(MASTER)
            .args([
                "--name",
                "m",
                "-",
                "127.0.0.1",
                &port.to_string(),
                ddir.to_str().unwrap(),
            ])
            .env("FIFOBIND_KEY", "k12"),
    );
    assert!(
        pool.wait_stdout(PATIENCE, |s| s.starts_with("m.dem1 ")),
        "{}",
        pool.describe()
    );
    let fifo = pool.stdout().split_whitespace().nth(2).unwrap().to_string();
    assert_eq!(read_lines(fifo.as_ref(), 1), ["key=none"]);
    // Every process now running: the pool's binding, the master's
    // binding, the daemon, the guardians, and pool and master themselves,
    // which wiped the value from the environment block they started with.
    let running = env.processes();
    assert!(running.len() >= 5, "found only {running:?}");
    for pid in running {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert!(
            !environ.windows(3).any(|w| w == b"k12"),
            "process {pid} ({}) holds the key in its environment",
            comm.trim()
        );
    }
    master.stop(libc::SIGTERM);
    // Its session over and its binding's stream ended, the pool is done.
    pool.assert_ends_ok();
    env.assert_clean();
}

#[test]
fn key_file_is_read_as_one_bounded_line_and_its_mode_checked() {
    let env = Env::new();
    let out = env.run(
        POOL,
        &["--key-file", "/dev/zero", "-", &free_port().to_string()],
    );
    assert_fails(&out, 2, "longer than 4096 bytes");

    let keyfile = env.tmp().join("key");
    std::fs::write(&keyfile, "k12\nnot the key\n").unwrap();
    std::fs::set_permissions(&keyfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Nothing listens there: the master fails to connect, after warning.
    let (listener, port) = listener();
    drop(listener);
    let ddir = env.daemons(&[("dem1", "echo hi")]);
    let out = env.run_master_with(&["--key-file", keyfile.to_str().unwrap()], "-", port, &ddir);
    assert_eq!(out.status.code(), Some(69), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key file") && err.contains("readable by other users"),
        "{err}"
    );
    env.assert_clean();
}
