//! A real `nats-server -js` for the NATS tests: on a loopback port of
//! its own with a store of its own, stopped on drop; and what its
//! connection-setting tests need (a CA and a server certificate, made
//! with the openssl command).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Env, PATIENCE, free_port, have_tool, kill, wait_for};

/// A test's runtime directory and a nats-server started in it with
/// `extra` arguments, and the server's URL; None (the test skipped) when
/// nats-server is missing. The server stops when dropped: a test binds
/// it (`_server`) for as long as it needs it.
pub fn env_with_nats(extra: &[&str]) -> Option<(Env, NatsServer, String)> {
    let env = Env::new();
    let server = NatsServer::start(&env, extra)?;
    let url = server.url();
    Some((env, server, url))
}

/// What is left in the runtime directory but the consumers' position
/// records (`*.nats`), which outlive their bindings on purpose.
pub fn leftovers_but_positions(env: &Env) -> Vec<String> {
    env.leftovers()
        .into_iter()
        .filter(|f| !f.ends_with(".nats"))
        .collect()
}

/// A nats-server with JetStream, on 127.0.0.1 only.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
    extra: Vec<String>,
}

impl NatsServer {
    /// None (the test skipped) when nats-server is missing.
    pub fn start(env: &Env, extra: &[&str]) -> Option<NatsServer> {
        if !have_tool("nats-server", "nats-server") {
            return None;
        }
        let store = env.tmp().join("js");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, after [`NatsServer::stop`]), with the same port
    /// and store.
    pub fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_for(PATIENCE, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "nats-server did not listen on {port}"
        );
    }

    /// Stops the server with `sig` (SIGTERM keeps what it stored; SIGKILL
    /// may lose what it acknowledged last).
    pub fn stop(&mut self, sig: i32) {
        if let Some(mut child) = self.child.take() {
            kill(child.id() as i32, sig);
            let deadline = Instant::now() + PATIENCE;
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A certificate authority and a server certificate for 127.0.0.1 it
/// signed, made in `dir` by the openssl command: (CA, cert, key) PEM
/// files. None (the test skipped) when openssl is missing.
pub fn test_certificates(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    if !have_tool("openssl", "openssl") {
        return None;
    }
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("server.csr"),
    );
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let (ca_s, ca_key_s, cert_s, key_s, csr_s) = (p(&ca), p(&ca_key), p(&cert), p(&key), p(&csr));
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-subj",
                "/CN=fifobind test CA",
                "-days",
                "2",
            ][..],
            &ec,
            &["-keyout", &ca_key_s, "-out", &ca_s],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-subj", "/CN=127.0.0.1"][..],
            &ec,
            &["-keyout", &key_s, "-out", &csr_s],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-CAcreateserial",
        "-in",
        &csr_s,
        "-CA",
        &ca_s,
        "-CAkey",
        &ca_key_s,
        "-out",
        &cert_s,
        "-extfile",
        &p(&ext),
    ]);
    Some((ca, cert, key))
}
