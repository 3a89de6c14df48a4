//! TCP endpoints: a dual-stack listener and a resolving connector, each
//! turning the system's refusals into the documented exit statuses.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::args::Port;
use crate::error::{Error, ExitStatus, Result};

/// The listen backlog asked for: as much as the system allows.
pub(crate) const LISTEN_BACKLOG: i32 = 65535;

/// Listens on `port` of `addr`, or of every interface, IPv4 and IPv6 alike,
/// when `addr` is `None`.
pub(crate) fn listen(addr: Option<IpAddr>, port: Port) -> Result<TcpListener> {
    let what = || match addr {
        Some(a) => format!("cannot listen on {}", SocketAddr::new(a, port.0)),
        None => format!("cannot listen on port {port}"),
    };
    let result = match addr {
        Some(a) => bind(SocketAddr::new(a, port.0), false),
        None => match bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port.0), true) {
            // A kernel without IPv6 still serves IPv4.
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                bind(SocketAddr::new([0, 0, 0, 0].into(), port.0), false)
            }
            other => other,
        },
    };
    result.map_err(|e| Error::io(what(), &e))
}

fn bind(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    // A port left in TIME_WAIT by an earlier binding is free for reuse;
    // a port somebody listens on is still refused.
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    // A burst of connections waits here while the binding serves others;
    // a short backlog overflows and, with SYN cookies, the kernel resets
    // the overflow once it sends. The kernel caps this at
    // net.core.somaxconn (4096 by default).
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Resolves `host` and connects to the first of its addresses that
/// answers within `timeout`.
pub(crate) fn connect(host: &str, port: Port, timeout: Duration) -> Result<TcpStream> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addrs = resolve(host, port).map_err(|(status, why)| {
        Error::new(status, format!("cannot connect to {target}: {why}"))
    })?;
    let mut last = None;
    for addr in &addrs {
        let socket = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| Error::io(format!("cannot create a socket for {target}"), &e))?;
        match socket.connect_timeout(&SockAddr::from(*addr), timeout) {
            Ok(()) => {
                let stream: TcpStream = socket.into();
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    let err = last.expect("at least one address was tried");
    let mut error = Error::io(format!("cannot connect to {target}"), &err);
    if err.kind() == io::ErrorKind::TimedOut {
        error.status = ExitStatus::TempFail;
    }
    Err(error)
}

/// The addresses of `host` (a name or a literal address), in the
/// resolver's order. std's `ToSocketAddrs` keeps only the resolver's
/// message, and a temporary failure (no name server answered: trying
/// later may work) must not be reported as an unknown host.
fn resolve(host: &str, port: Port) -> std::result::Result<Vec<SocketAddr>, (ExitStatus, String)> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port.0)]);
    }
    let name = std::ffi::CString::new(bare)
        .map_err(|_| (ExitStatus::NoHost, "unknown host".to_string()))?;
    // SAFETY: an all-zero addrinfo is the documented empty hints value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C strings and hints; `list` is freed below.
    let rc = unsafe { libc::getaddrinfo(name.as_ptr(), std::ptr::null(), &hints, &mut list) };
    if rc != 0 {
        let errno = io::Error::last_os_error();
        return Err(resolve_failure(rc, &errno));
    }
    let mut addrs = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getaddrinfo returned, alive until
        // freeaddrinfo; its address has the length it says.
        let info = unsafe { &*at };
        if let Some(ip) = ip_of(info) {
            let addr = SocketAddr::new(ip, port.0);
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        at = info.ai_next;
    }
    // SAFETY: the list getaddrinfo returned, freed once.
    unsafe { libc::freeaddrinfo(list) };
    if addrs.is_empty() {
        return Err((ExitStatus::NoHost, "unknown host".to_string()));
    }
    Ok(addrs)
}

/// The address of one of getaddrinfo's answers, if IPv4 or IPv6.
fn ip_of(info: &libc::addrinfo) -> Option<IpAddr> {
    if info.ai_addr.is_null() {
        return None;
    }
    let len = info.ai_addrlen as usize;
    match info.ai_family {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: an AF_INET answer points at a sockaddr_in this long.
            let sin = unsafe { &*(info.ai_addr as *const libc::sockaddr_in) };
            Some(IpAddr::from(
                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
            ))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: an AF_INET6 answer points at a sockaddr_in6 this long.
            let sin6 = unsafe { &*(info.ai_addr as *const libc::sockaddr_in6) };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// The exit status and words for a getaddrinfo(3) failure `rc` (`errno`
/// as it was right after, for EAI_SYSTEM).
fn resolve_failure(rc: i32, errno: &io::Error) -> (ExitStatus, String) {
    match rc {
        // No name server answered, or it answered "try again" (SERVFAIL).
        libc::EAI_AGAIN => (
            ExitStatus::TempFail,
            "temporary failure in name resolution".to_string(),
        ),
        libc::EAI_MEMORY => (
            ExitStatus::OsErr,
            "out of memory resolving the host".to_string(),
        ),
        libc::EAI_SYSTEM => (
            ExitStatus::of_io(errno),
            format!(
                "cannot resolve the host: {}",
                crate::error::describe_io(errno)
            ),
        ),
        // EAI_NONAME, EAI_NODATA, EAI_FAIL, EAI_ADDRFAMILY and the rest:
        // the name has no address we can use.
        _ => (ExitStatus::NoHost, "unknown host".to_string()),
    }
}

/// Keeps at most `bytes` of not yet sent data in the socket's send
/// buffer (TCP_NOTSENT_LOWAT). Without it the buffer autotunes to
/// megabytes, splice fills it far ahead of a slow reader, and on loopback
/// each window update then sends from that backlog inside the *reader's*
/// `recv()`: the reader does the TCP work of both ends. Bytes in flight
/// (sent, not yet acknowledged) are not counted, so a long path keeps its
/// full window.
pub(crate) fn limit_unsent(stream: &TcpStream, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    // SAFETY: setsockopt with a pointer to an int and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An address as the user wrote it, whichever way the socket reports it:
/// a dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`.
pub(crate) fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// A peer's address as logs and messages show it: `127.0.0.1:57414`,
/// not the `[::ffff:127.0.0.1]:57414` a dual-stack listener reports.
pub(crate) fn unmapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// An address or a CIDR prefix a client may connect from (`--allow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allow {
    addr: IpAddr,
    prefix: u8,
}

impl Allow {
    pub(crate) fn contains(&self, peer: IpAddr) -> bool {
        match (self.addr, canonical(peer)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn masked(net: u128, ip: u128, prefix: u8, bits: u8) -> bool {
    let shift = u32::from(bits - prefix);
    prefix == 0 || (net >> shift) == (ip >> shift)
}

impl From<IpAddr> for Allow {
    /// Exactly this address (an IPv4-mapped one as its IPv4 address).
    fn from(addr: IpAddr) -> Allow {
        let addr = canonical(addr);
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Allow { addr, prefix }
    }
}

impl std::str::FromStr for Allow {
    type Err = String;

    /// `ADDR` or `ADDR/PREFIX`; an IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`, `::ffff:a.b.0.0/112`) is the IPv4 one it stands for,
    /// as a dual-stack socket reports IPv4 peers that way.
    fn from_str(s: &str) -> std::result::Result<Allow, String> {
        let bad = || format!("'{s}' is not an address or ADDR/PREFIX");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let (addr, prefix) = match (addr, canonical(addr)) {
            (IpAddr::V6(_), v4 @ IpAddr::V4(_)) => match prefix {
                None => (v4, 32),
                Some(p) if (96..=128).contains(&p) => (v4, p - 96),
                Some(_) => return Err(format!("'{s}': an IPv4-mapped prefix is /96 to /128")),
            },
            (a, _) => {
                let bits = if a.is_ipv4() { 32 } else { 128 };
                match prefix {
                    None => (a, bits),
                    Some(p) if p <= bits => (a, p),
                    Some(_) => return Err(format!("'{s}': the prefix is at most /{bits}")),
                }
            }
        };
        Ok(Allow { addr, prefix })
    }
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == bits {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_peer_shows_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:57414".parse().unwrap();
        assert_eq!(unmapped(mapped).to_string(), "127.0.0.1:57414");
        let six: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(unmapped(six).to_string(), "[::1]:9");
    }

    #[test]
    fn allow_takes_addresses_and_prefixes() {
        let a = |s: &str| s.parse::<Allow>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(a("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(a("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        assert!(!a("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(a("10.1.0.0/16").contains(ip("10.1.200.3")));
        assert!(!a("10.1.0.0/16").contains(ip("10.2.0.1")));
        assert!(a("::ffff:192.0.2.7").contains(ip("192.0.2.7")));
        assert!(a("::ffff:192.0.2.0/120").contains(ip("::ffff:192.0.2.99")));
        assert_eq!(a("::ffff:192.0.2.0/120").to_string(), "192.0.2.0/24");
        assert!(a("fd00::/8").contains(ip("fd12::1")));
        assert!(!a("fd00::/8").contains(ip("127.0.0.1")));
        assert!(a("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(a("::1").contains(ip("::1")));
        for bad in [
            "nowhere",
            "10.0.0.0/33",
            "::1/129",
            "1.2.3.4/x",
            "::ffff:1.2.3.4/64",
        ] {
            assert!(bad.parse::<Allow>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(canonical(mapped), "127.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn resolver_failures_map_to_sysexits() {
        let none = io::Error::from_raw_os_error(0);
        assert_eq!(
            resolve_failure(libc::EAI_AGAIN, &none).0,
            ExitStatus::TempFail
        );
        assert_eq!(
            resolve_failure(libc::EAI_NONAME, &none).0,
            ExitStatus::NoHost
        );
        assert_eq!(resolve_failure(libc::EAI_FAIL, &none).0, ExitStatus::NoHost);
        assert_eq!(
            resolve_failure(libc::EAI_NODATA, &none).0,
            ExitStatus::NoHost
        );
        assert_eq!(
            resolve_failure(libc::EAI_MEMORY, &none).0,
            ExitStatus::OsErr
        );
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let (status, why) = resolve_failure(libc::EAI_SYSTEM, &emfile);
        assert_eq!(status, ExitStatus::OsErr);
        assert_eq!(why, "cannot resolve the host: too many open files");
    }

    #[test]
    fn literal_addresses_need_no_resolver() {
        let want: SocketAddr = "[::1]:2000".parse().unwrap();
        assert_eq!(resolve("[::1]", Port(2000)).unwrap(), [want]);
        assert_eq!(resolve("::1", Port(2000)).unwrap(), [want]);
        let want: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        assert_eq!(resolve("127.0.0.1", Port(2000)).unwrap(), [want]);
    }

    #[test]
    fn refused_connection_is_unavailable() {
        // Find a port nobody listens on by binding and dropping it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = connect("127.0.0.1", Port(port), Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.status, ExitStatus::Unavailable, "{err}");
    }
}
