//! TCP endpoints: a dual-stack listener and a resolving connector, each
//! turning the system's refusals into the documented exit statuses.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::args::Port;
use crate::error::{Error, ExitStatus, Result};

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
    socket.listen(128)?;
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
