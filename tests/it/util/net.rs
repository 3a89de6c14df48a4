//! The TCP side of a test: free ports, connecting and sending, bursts of
//! simultaneous connections, and a recording relay between a binding and
//! its remote end.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A port in the range the commands accept, free right now. Ports are
/// spread by test process and counter so parallel tests rarely collide.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20000 + (std::process::id() % 1000) as u16 * 20;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (base - 20000 + n.wrapping_mul(7)) % 25000;
        if TcpListener::bind(("::", port)).is_ok() && TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// Connects to a local port, retrying briefly.
pub fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("connect to {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Sends `text` on a new connection to a local port and closes it.
pub fn send(port: u16, text: &[u8]) {
    let mut s = connect(port);
    s.write_all(text).unwrap();
}

/// A listener on 127.0.0.1, on a free port in the commands' range.
pub fn listener() -> (TcpListener, u16) {
    loop {
        // Another process may take the port between the check and here.
        let port = free_port();
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            return (l, port);
        }
    }
}

/// Accepts one connection, waiting at most [`PATIENCE`].
pub fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects to `to` from the local address `from` (another loopback
/// address, to test address restrictions). No retry.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
    socket.connect(&SockAddr::from(to))?;
    Ok(socket.into())
}

/// Gives the connections `listener` accepts a small, fixed receive
/// buffer (no autotuning), so a remote that never reads stalls its sender
/// after little data instead of swallowing megabytes.
pub fn small_receive_window(listener: &TcpListener) {
    let size: libc::c_int = 8192;
    // SAFETY: setsockopt with a pointer to a local int.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_RCVBUF");
}

/// Opens `n` connections to a local port at once (non-blocking connects,
/// so they all reach the listen backlog together), writes `text(i)` on
/// connection `i` and closes them all. Panics if any fails.
pub fn burst(port: u16, n: usize, text: impl Fn(usize) -> String) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let to = SockAddr::from(SocketAddr::from(([127, 0, 0, 1], port)));
    let socks: Vec<Socket> = (0..n)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&to) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("connect: {e}"),
            }
            s
        })
        .collect();
    for (i, s) in socks.iter().enumerate() {
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut pfd, 1, PATIENCE.as_millis() as i32) };
        if let Some(e) = s.take_error().unwrap() {
            panic!("connection {i}: {e}");
        }
        s.set_nonblocking(false).unwrap();
        let mut w: &Socket = s;
        w.write_all(text(i).as_bytes())
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    for s in &socks {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

/// A TCP relay on 127.0.0.1 that forwards every connection to
/// 127.0.0.1:`to` and records what passes each way.
pub struct Relay {
    pub port: u16,
    up: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    down: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(to: u16) -> Relay {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let (listener, port) = listener();
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (u, d, s) = (up.clone(), down.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(("127.0.0.1", to)).expect("relay: connect");
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (u, d) = (u.clone(), d.clone());
                std::thread::spawn(move || pump(client, server, u));
                std::thread::spawn(move || pump(s2, c2, d));
            }
        });
        Relay {
            port,
            up,
            down,
            stop,
            thread: Some(thread),
        }
    }

    /// Everything the clients sent.
    pub fn upstream(&self) -> Vec<u8> {
        self.up.lock().unwrap().clone()
    }

    /// Everything the server sent back.
    pub fn downstream(&self) -> Vec<u8> {
        self.down.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to`, recording, until end-of-file; then passes the
/// end on.
fn pump(mut from: TcpStream, mut to: TcpStream, log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().extend_from_slice(&chunk[..n]);
                if to.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
