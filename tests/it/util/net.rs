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

/// Whether something listens on local TCP port `port` (IPv4 or IPv6), as
/// /proc/net says: for clients that cannot retry a refused connect (`nc`),
/// started beside a binding whose FIFO may exist before it listens.
pub fn listening(port: u16) -> bool {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|row| {
                let fields: Vec<&str> = row.split_whitespace().collect();
                // sl, local address, remote address, state (0A: LISTEN).
                fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
            })
    })
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
    _acceptor: Acceptor,
}

impl Relay {
    pub fn start(to: u16) -> Relay {
        use std::sync::{Arc, Mutex};
        let up = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Mutex::new(Vec::new()));
        let (u, d) = (up.clone(), down.clone());
        let acceptor = Acceptor::start(move |client| {
            let server = TcpStream::connect(("127.0.0.1", to)).expect("relay: connect");
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (u, d) = (u.clone(), d.clone());
            std::thread::spawn(move || pump(client, server, u));
            std::thread::spawn(move || pump(s2, c2, d));
        });
        Relay {
            port: acceptor.port,
            up,
            down,
            _acceptor: acceptor,
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

/// The accepting half of a test's relay: a listener on 127.0.0.1, on a
/// free port, whose thread hands each client (blocking) to `serve` until
/// the acceptor is dropped.
pub(super) struct Acceptor {
    pub(super) port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    pub(super) fn start(mut serve: impl FnMut(TcpStream) + Send + 'static) -> Acceptor {
        let (listener, port) = listener();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        serve(client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Acceptor {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Acceptor {
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

// ---------------------------------------------------------------------
// A relay that breaks connections when the test says so.

/// How [`FaultRelay::cut`] breaks the connections it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Both ends get a reset (SO_LINGER 0, then close).
    Reset,
    /// Nothing more is forwarded either way, and the sockets stay open:
    /// a link that went silent (a NAT that forgot the flow).
    Hold,
}

/// A TCP relay on 127.0.0.1 to 127.0.0.1:`to`, one thread per connection
/// polling both sides. [`FaultRelay::cut`] breaks every connection it
/// carries now; [`FaultRelay::refuse`] makes it reset new connections at
/// once (the receiver's side unreachable).
pub struct FaultRelay {
    pub port: u16,
    shared: std::sync::Arc<FaultShared>,
    acceptor: Option<Acceptor>,
}

#[derive(Default)]
struct FaultShared {
    stop: std::sync::atomic::AtomicBool,
    refuse: std::sync::atomic::AtomicBool,
    /// Bumped by each cut; a connection older than it is cut.
    generation: std::sync::atomic::AtomicU64,
    kind: std::sync::Mutex<Option<Cut>>,
    /// The connections' threads, joined when the relay is dropped.
    conns: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl FaultRelay {
    pub fn start(to: u16) -> FaultRelay {
        let shared = std::sync::Arc::new(FaultShared::default());
        let sh = shared.clone();
        let acceptor = Acceptor::start(move |client| {
            if sh.refuse.load(Ordering::Relaxed) {
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            };
            let born = sh.generation.load(Ordering::SeqCst);
            let sh2 = sh.clone();
            let conn = std::thread::spawn(move || fault_pump(client, server, born, &sh2));
            sh.conns.lock().unwrap().push(conn);
        });
        FaultRelay {
            port: acceptor.port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Breaks every connection carried now, the way `kind` says.
    pub fn cut(&self, kind: Cut) {
        *self.shared.kind.lock().unwrap() = Some(kind);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// While `on`, new connections are reset at once.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // No new connection, then the carried ones end (they see `stop`).
        drop(self.acceptor.take());
        for conn in std::mem::take(&mut *self.shared.conns.lock().unwrap()) {
            let _ = conn.join();
        }
    }
}

fn fault_pump(mut client: TcpStream, mut server: TcpStream, born: u64, sh: &FaultShared) {
    client.set_nonblocking(true).unwrap();
    server.set_nonblocking(true).unwrap();
    let mut chunk = vec![0u8; 64 * 1024];
    // Bytes read from one side and not yet taken by the other.
    let mut to_server: Vec<u8> = Vec::new();
    let mut to_client: Vec<u8> = Vec::new();
    let mut held = false;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        if !held && sh.generation.load(Ordering::SeqCst) > born {
            match sh.kind.lock().unwrap().unwrap_or(Cut::Reset) {
                Cut::Reset => {
                    for s in [&client, &server] {
                        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                    }
                    return;
                }
                Cut::Hold => held = true,
            }
        }
        if held {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // Writable matters only with something to write.
        let pollfd = |s: &TcpStream, pending: &Vec<u8>| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN | if pending.is_empty() { 0 } else { libc::POLLOUT },
            revents: 0,
        };
        let mut fds = [pollfd(&client, &to_client), pollfd(&server, &to_server)];
        // SAFETY: two pollfds on the stack.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
        let up = fds[0].revents != 0;
        let down = fds[1].revents != 0;
        if !carry(&mut client, &mut server, up, &mut to_server, &mut chunk)
            || !carry(&mut server, &mut client, down, &mut to_client, &mut chunk)
        {
            return;
        }
    }
}

/// One direction of a [`fault_pump`] turn: reads `from` (when `readable`)
/// only once the other side has taken what came before, so the relay
/// buffers at most one chunk each way; writes what `pending` holds to
/// `to`. False once this direction is over (its end passed on, or a
/// socket failed).
fn carry(
    from: &mut TcpStream,
    to: &mut TcpStream,
    readable: bool,
    pending: &mut Vec<u8>,
    chunk: &mut [u8],
) -> bool {
    if pending.is_empty() && readable {
        match from.read(chunk) {
            Ok(0) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return false;
            }
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    if !pending.is_empty() {
        match to.write(pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    true
}
