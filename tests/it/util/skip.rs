//! Tests that cannot run here (a tool, a privilege, IPv6 missing) say so
//! and return outside CI, and fail in CI, so a green CI means every test
//! really ran.

use std::net::TcpListener;
use std::process::{Command, Stdio};

/// A test that cannot run here (a tool, a privilege or IPv6 missing):
/// outside CI it says why and the caller returns; with `CI` set (CI runs
/// with CI=true) it fails, so a green CI means every test really ran.
pub fn skip_or_fail(reason: &str) {
    // libtest names each test's thread after the test.
    let current = std::thread::current();
    let test = current.name().unwrap_or("a test");
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test} cannot run, and CI is set so it may not skip: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Whether `program` can be run (found in PATH); otherwise
/// [`skip_or_fail`] with the Debian package that has it.
pub fn have_tool(program: &str, package: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip_or_fail(&format!(
            "{program} is not installed (apt-get install {package})"
        ));
    }
    found
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a command can run in a fresh, empty network namespace
/// (`unshare -n`), where no packet can leave the machine. Prints why not.
pub fn can_unshare_net() -> bool {
    if !is_root() {
        skip_or_fail("not root, cannot unshare the network namespace");
        return false;
    }
    let ok = Command::new("unshare")
        .args(["-n", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail("unshare -n is missing (apt-get install util-linux) or not permitted");
    }
    ok
}

/// Whether IPv6 loopback works here; prints why a test skips when not.
pub fn has_ipv6() -> bool {
    let ok = TcpListener::bind(("::1", 0)).is_ok();
    if !ok {
        skip_or_fail("::1 is not available (IPv6 loopback)");
    }
    ok
}
