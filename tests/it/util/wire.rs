//! A man in the middle and a capture of the loopback, for protocol 2's
//! tests: a relay that delays, injects or rewrites, and an AF_PACKET
//! capture of what crosses `lo`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::net::Acceptor;
use super::skip_or_fail;

/// What a [`TamperRelay`] does to the connections it forwards.
#[derive(Clone, Default)]
pub struct Tamper {
    /// Each chunk is passed on this long after it arrived, each way (a
    /// distant peer, in order).
    pub delay: Duration,
    /// Once this many bytes have come from the client, these bytes are
    /// sent on to the server too (once per connection): an injection.
    pub inject_up: Option<(usize, Vec<u8>)>,
    /// The byte at this offset of what the server sends is flipped.
    pub flip_down: Option<usize>,
}

/// A TCP relay on 127.0.0.1 to 127.0.0.1:`to` that delays, injects or
/// rewrites as its [`Tamper`] says.
pub struct TamperRelay {
    pub port: u16,
    _acceptor: Acceptor,
}

impl TamperRelay {
    pub fn start(to: u16, tamper: Tamper) -> TamperRelay {
        let acceptor = Acceptor::start(move |client| {
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let t = tamper.clone();
            let (inject, flip, delay) = (t.inject_up, t.flip_down, t.delay);
            std::thread::spawn(move || {
                tamper_pump(client, server, delay, |seen, chunk, out| {
                    out.extend_from_slice(chunk);
                    if let Some((after, bytes)) = &inject
                        && seen < *after
                        && seen + chunk.len() >= *after
                    {
                        out.extend_from_slice(bytes);
                    }
                })
            });
            std::thread::spawn(move || {
                tamper_pump(s2, c2, delay, |seen, chunk, out| {
                    out.extend_from_slice(chunk);
                    if let Some(at) = flip
                        && (seen..seen + chunk.len()).contains(&at)
                    {
                        out[at - seen] ^= 0x01;
                    }
                })
            });
        });
        TamperRelay {
            port: acceptor.port,
            _acceptor: acceptor,
        }
    }
}

/// Copies `from` to `to` through `edit` (given the bytes seen before this
/// chunk, the chunk, and what to send), each chunk `delay` after it came;
/// then passes the end on.
fn tamper_pump(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    mut edit: impl FnMut(usize, &[u8], &mut Vec<u8>) + Send,
) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (at, bytes) in rx {
            let wait = (at + delay).saturating_duration_since(Instant::now());
            std::thread::sleep(wait);
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut chunk = [0u8; 4096];
    let mut seen = 0;
    loop {
        match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut out = Vec::with_capacity(n);
                edit(seen, &chunk[..n], &mut out);
                seen += n;
                if tx.send((Instant::now(), out)).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// Everything that crosses the loopback interface while it runs, as raw
/// frames (an AF_PACKET socket: needs root), capped at 256 MiB.
pub struct LoopbackCapture {
    packets: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackCapture {
    /// None (after [`skip_or_fail`]) where a packet socket cannot be had.
    pub fn start() -> Option<LoopbackCapture> {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        if fd < 0 {
            skip_or_fail("cannot open a packet socket (needs root)");
            return None;
        }
        // SAFETY: fd is ours, owned from here on.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new("lo").unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: a zeroed sockaddr_ll, filled in below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto as u16;
        addr.sll_ifindex = index as i32;
        // SAFETY: bind with a sockaddr_ll of its size.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind the packet socket to lo");
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (packets.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            let mut total = 0usize;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
            while !s.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd on the stack.
                unsafe { libc::poll(&mut pfd, 1, 50) };
                if pfd.revents == 0 {
                    continue;
                }
                // SAFETY: recv into our buffer.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 && total < 256 << 20 {
                    total += n as usize;
                    b.lock().unwrap().push(buf[..n as usize].to_vec());
                }
            }
        });
        Some(LoopbackCapture {
            packets,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing; the TCP payloads of the IPv4 packets from or to
    /// one of `ports`, in the order seen.
    pub fn finish(mut self, ports: &[u16]) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let packets = std::mem::take(&mut *self.packets.lock().unwrap());
        packets
            .iter()
            .filter_map(|frame| {
                // Ethernet header (zeros on lo), then IPv4.
                let ip = frame.get(14..)?;
                if ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
                    return None;
                }
                let tcp = ip.get(usize::from(ip[0] & 0x0f) * 4..)?;
                let (src, dst) = (
                    u16::from_be_bytes([tcp[0], tcp[1]]),
                    u16::from_be_bytes([tcp[2], tcp[3]]),
                );
                if !ports.contains(&src) && !ports.contains(&dst) {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                let header = usize::from(ip[0] & 0x0f) * 4 + usize::from(tcp.get(12)? >> 4) * 4;
                Some(ip.get(header..total.min(ip.len()))?.to_vec())
            })
            .filter(|p| !p.is_empty())
            .collect()
    }
}

impl Drop for LoopbackCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
