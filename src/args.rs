//! The argument types every command shares: binding IDs, ports and keys.
//!
//! An ID becomes a file name in the runtime directory and a port becomes a
//! listening socket, so both are checked here, before anything is created:
//! a bad one is a usage error (exit 2) that names the argument.

use std::fmt;
use std::str::FromStr;

/// Longest ID: short enough to leave room for bookkeeping names around it.
pub(crate) const MAX_ID_LEN: usize = 64;
pub(crate) const MIN_PORT: u16 = 1024;
pub(crate) const MAX_PORT: u16 = 49151;

/// A binding's name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`. So it is never a path, never an option, and
/// never clashes with the dot-names of the bookkeeping files.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Id(String);

impl Id {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Id {
    type Err = String;

    fn from_str(s: &str) -> Result<Id, String> {
        if s.is_empty() {
            return Err("an ID must not be empty".into());
        }
        if s.len() > MAX_ID_LEN {
            return Err(format!("an ID has at most {MAX_ID_LEN} characters"));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "{bad:?} is not allowed in an ID (only A-Z a-z 0-9 . _ -)"
            ));
        }
        if s.starts_with('.') || s.starts_with('-') {
            return Err("an ID must not start with '.' or '-'".into());
        }
        Ok(Id(s.to_string()))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A TCP port in the registered range 1024–49151: not a privileged port,
/// not one the kernel hands out as ephemeral.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Port(pub u16);

impl FromStr for Port {
    type Err = String;

    fn from_str(s: &str) -> Result<Port, String> {
        let range = format!("a port is a decimal number from {MIN_PORT} to {MAX_PORT}");
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(range);
        }
        match s.parse::<u32>() {
            Ok(n) if (MIN_PORT as u32..=MAX_PORT as u32).contains(&n) => Ok(Port(n as u16)),
            _ => Err(range),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A shared secret for the pool handshake. Never printed, never sent,
/// and wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(zeroize::Zeroizing<Vec<u8>>);

impl Key {
    pub fn new(bytes: Vec<u8>) -> Result<Key, String> {
        let bytes = zeroize::Zeroizing::new(bytes);
        if bytes.is_empty() {
            return Err("the key must not be empty".into());
        }
        Ok(Key(bytes))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<hidden>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "in1", "dem1.out", "A_b-9", &"x".repeat(64)] {
            assert!(good.parse::<Id>().is_ok(), "{good}");
        }
        for bad in [
            "",
            ".x",
            "-x",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(65),
            "a\n",
        ] {
            assert!(bad.parse::<Id>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!("1024".parse::<Port>(), Ok(Port(1024)));
        assert_eq!("49151".parse::<Port>(), Ok(Port(49151)));
        for bad in [
            "",
            "80",
            "1023",
            "49152",
            "9x9",
            "+2000",
            "-1",
            " 2000",
            "99999999999",
        ] {
            assert!(bad.parse::<Port>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys() {
        assert!(Key::new(Vec::new()).is_err());
        assert_eq!(
            format!("{:?}", Key::new(b"k12".to_vec()).unwrap()),
            "Key(<hidden>)"
        );
    }
}

/// A host to connect to: an IP address, or a name made of DNS labels.
/// Checking the form first means a typo is a usage error, not a query
/// sent to a name server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Host(String);

impl Host {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Host {
    type Err = String;

    fn from_str(s: &str) -> Result<Host, String> {
        let bare = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(s);
        if bare.parse::<std::net::IpAddr>().is_ok() {
            return Ok(Host(bare.to_string()));
        }
        let name = s.strip_suffix('.').unwrap_or(s);
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err("a host is an IP address or a DNS name (letters, digits, '-', '.')".into());
        }
        Ok(Host(s.to_string()))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn hosts() {
        for good in [
            "localhost",
            "127.0.0.1",
            "::1",
            "[::1]",
            "a-b.example.org",
            "x.",
        ] {
            assert!(good.parse::<Host>().is_ok(), "{good}");
        }
        assert_eq!("[::1]".parse::<Host>().unwrap().as_str(), "::1");
        for bad in [
            "",
            "-x",
            "a..b",
            "a b",
            "a/b",
            "x-",
            &"a".repeat(64),
            "h\u{e9}",
        ] {
            assert!(bad.parse::<Host>().is_err(), "{bad:?}");
        }
    }
}
