//! The door's memory of wrong keys: exponential delay per address, and a
//! log that summarises instead of writing a line per attempt.
//!
//! SPAKE2 gives an attacker one key guess per connection, so what bounds
//! online guessing is how many connections an address may try: after each
//! failure an address waits twice as long as before (capped) before it is
//! heard again. IPv6 addresses are grouped by their /64, which one host
//! usually has whole; IPv4-mapped addresses count as the IPv4 address. The
//! table is bounded: when full, the entry heard from longest ago goes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The part of an address that is penalised.
fn prefix(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

struct Entry {
    failures: u32,
    until: Instant,
    last: Instant,
}

pub(crate) struct Penalties {
    entries: HashMap<IpAddr, Entry>,
    cap: usize,
    base: Duration,
    max: Duration,
    /// Failures since the last summary.
    unreported: u64,
    /// Connections turned away unheard since the last summary.
    refused: u64,
    /// Nothing was reported in the last interval: the next failure is
    /// reported at once rather than an interval later.
    quiet: bool,
    /// When the last summary was written (or, before the first, a whole
    /// interval ago: the first failure is reported at once).
    since: Instant,
}

impl Penalties {
    pub(crate) fn new(base: Duration, max: Duration, cap: usize) -> Penalties {
        Penalties {
            entries: HashMap::new(),
            cap: cap.max(1),
            base,
            max,
            unreported: 0,
            refused: 0,
            since: Instant::now(),
            quiet: true,
        }
    }

    /// How long `addr` must still wait before it is heard, if at all.
    pub(crate) fn wait(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let e = self.entries.get(&prefix(addr))?;
        (e.until > now).then(|| e.until - now)
    }

    /// `addr` gave a wrong key: it waits `base × 2^(failures-1)`, at most
    /// `max`. Returns that delay.
    pub(crate) fn failed(&mut self, addr: IpAddr, now: Instant) -> Duration {
        let key = prefix(addr);
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cap {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(k, _)| *k)
                .expect("a full table has entries");
            self.entries.remove(&oldest);
        }
        let e = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            until: now,
            last: now,
        });
        e.failures = e.failures.saturating_add(1);
        let delay = self
            .base
            .saturating_mul(1u32 << (e.failures - 1).min(20))
            .min(self.max);
        e.until = now + delay;
        e.last = now;
        self.unreported += 1;
        delay
    }

    /// A connection from a held-back address was turned away unheard:
    /// counted for the summary, not logged on its own.
    pub(crate) fn refused(&mut self) {
        self.refused += 1;
    }

    /// `addr` proved it knows the key: its record is cleared.
    pub(crate) fn succeeded(&mut self, addr: IpAddr) {
        self.entries.remove(&prefix(addr));
    }

    /// The last summary, whatever the interval (when the pool stops).
    pub(crate) fn flush(&mut self, now: Instant) -> Option<String> {
        self.quiet = true;
        self.summary(now, Duration::MAX)
    }

    /// At most once per `every`: a line counting the wrong keys since the
    /// last one, for the log.
    pub(crate) fn summary(&mut self, now: Instant, every: Duration) -> Option<String> {
        let due = now.duration_since(self.since) >= every;
        if due && self.unreported == 0 && self.refused == 0 {
            // A whole interval without news: the next is told at once.
            self.quiet = true;
        }
        if self.unreported == 0 && self.refused == 0 || !(due || self.quiet) {
            return None;
        }
        let line = format!(
            "{} wrong key(s) and {} connection(s) turned away unheard in the last {} s; \
             {} address(es) held back",
            self.unreported,
            self.refused,
            now.duration_since(self.since).as_secs(),
            self.entries.values().filter(|e| e.until > now).count()
        );
        self.unreported = 0;
        self.refused = 0;
        self.since = now;
        self.quiet = false;
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delay_doubles_up_to_the_cap_and_clears_on_success() {
        let mut p = Penalties::new(Duration::from_millis(100), Duration::from_secs(1), 16);
        let t = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(p.wait(a, t), None);
        let delays: Vec<u128> = (0..6).map(|_| p.failed(a, t).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert!(p.wait(a, t).is_some());
        assert_eq!(p.wait(a, t + Duration::from_secs(2)), None);
        assert_eq!(p.wait(ip("192.0.2.2"), t), None, "others are not held");
        p.succeeded(a);
        assert_eq!(p.failed(a, t).as_millis(), 100);
    }

    #[test]
    fn mapped_and_same_64_addresses_share_a_record() {
        let mut p = Penalties::new(Duration::from_secs(1), Duration::from_secs(8), 16);
        let t = Instant::now();
        p.failed(ip("::ffff:192.0.2.7"), t);
        assert!(p.wait(ip("192.0.2.7"), t).is_some());
        p.failed(ip("2001:db8:1:2::1"), t);
        assert!(p.wait(ip("2001:db8:1:2:ffff::9"), t).is_some());
        assert!(p.wait(ip("2001:db8:1:3::1"), t).is_none());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_oldest() {
        let mut p = Penalties::new(Duration::from_secs(1), Duration::from_secs(8), 4);
        let t = Instant::now();
        for i in 0..10u8 {
            p.failed(
                IpAddr::from([192, 0, 2, i]),
                t + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(p.entries.len(), 4);
        assert!(p.wait(IpAddr::from([192, 0, 2, 9]), t).is_some());
        assert!(p.wait(IpAddr::from([192, 0, 2, 0]), t).is_none());
    }

    #[test]
    fn summary_counts_and_is_rate_limited() {
        let mut p = Penalties::new(Duration::from_secs(1), Duration::from_secs(8), 16);
        let t = p.since;
        for _ in 0..500 {
            p.failed(ip("192.0.2.1"), t);
        }
        let every = Duration::from_secs(10);
        // The first news after a quiet time is told at once...
        let line = p.summary(t, every).unwrap();
        assert!(line.starts_with("500 wrong key(s)"), "{line}");
        // ...what follows once per interval, summed up.
        for _ in 0..300 {
            p.failed(ip("192.0.2.1"), t);
            p.refused();
        }
        assert_eq!(p.summary(t + Duration::from_secs(1), every), None);
        let line = p.summary(t + Duration::from_secs(10), every).unwrap();
        assert!(
            line.starts_with("300 wrong key(s) and 300 connection(s) turned away"),
            "{line}"
        );
        assert_eq!(p.summary(t + Duration::from_secs(30), every), None);
        // A quiet interval passed: the next news is told at once again.
        p.failed(ip("192.0.2.1"), t + Duration::from_secs(31));
        assert!(p.summary(t + Duration::from_secs(31), every).is_some());
    }
}
