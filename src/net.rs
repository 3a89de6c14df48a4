//! TCP endpoints: a dual-stack listener and a resolving connector, each
//! turning the system's refusals into the documented exit statuses.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::args::Port;
use crate::error::{Error, ExitStatus, Result};

/// The listen backlog asked for: as much as the system allows.
pub const LISTEN_BACKLOG: i32 = 65535;

/// Listens on `port` of `addr`, or of every interface, IPv4 and IPv6 alike,
/// when `addr` is `None`.
pub fn listen(addr: Option<IpAddr>, port: Port) -> Result<TcpListener> {
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
pub fn connect(host: &str, port: Port, timeout: Duration) -> Result<TcpStream> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let addrs: Vec<SocketAddr> = match (host, port.0).to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(_) => Vec::new(),
    };
    if addrs.is_empty() {
        return Err(Error::new(
            ExitStatus::NoHost,
            format!("cannot connect to {target}: unknown host"),
        ));
    }
    let mut last = None;
    for addr in &addrs {
        let socket = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| Error::io("cannot create socket", &e))?;
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

/// An address as the user wrote it, whichever way the socket reports it:
/// a dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`.
pub fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// A peer's address as logs and messages show it: `127.0.0.1:57414`,
/// not the `[::ffff:127.0.0.1]:57414` a dual-stack listener reports.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// An address or a CIDR prefix a client may connect from (`--allow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allow {
    addr: IpAddr,
    prefix: u8,
}

impl Allow {
    pub fn contains(&self, peer: IpAddr) -> bool {
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
    fn refused_connection_is_unavailable() {
        // Find a port nobody listens on by binding and dropping it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = connect("127.0.0.1", Port(port), Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.status, ExitStatus::Unavailable, "{err}");
    }
}
