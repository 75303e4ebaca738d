//! PIN guessing, throttled per source and for the whole box.
//!
//! * Per source (an IPv4 address, or an IPv6 /64: one device's privacy addresses share
//!   it): `free_tries` wrong PINs cost nothing; after that each wrong PIN locks the
//!   source out for 1 s, 2 s, 4 s, … up to `lockout_max`. While locked out, a guess is
//!   answered `locked_out` (with the seconds to wait) and **not even compared**. The
//!   state outlives connections; a source quiet for [`FORGIVE_AFTER`] starts afresh, a
//!   right PIN clears it. The table keeps at most `table_size` sources (the one whose
//!   last wrong PIN is oldest goes first).
//! * For the box: at most `failures_per_second` wrong PINs are answered as such (a
//!   token bucket, that many per second with as many in a burst). Beyond that, every
//!   wrong PIN locks its source out at once, as if its free tries were used up, and is
//!   answered `locked_out`: many sources guessing together get no more tries than a few.
//! * A right PIN from a source that is not locked out always works at once: it is
//!   compared first (in constant time); only wrong PINs are throttled.

use super::protocol::ct_eq;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A source with no wrong PIN for this long starts afresh.
pub const FORGIVE_AFTER: Duration = Duration::from_secs(3600);

/// The limits (part of [`super::GatewayLimits`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PinLimits {
    pub free_tries: u32,
    pub lockout_max: Duration,
    pub failures_per_second: u32,
    pub table_size: usize,
}

impl Default for PinLimits {
    fn default() -> Self {
        PinLimits {
            free_tries: 3,
            lockout_max: Duration::from_secs(300),
            failures_per_second: 10,
            table_size: 4096,
        }
    }
}

/// Counters (on `/metrics`).
#[derive(Debug, Default)]
pub struct PinStats {
    /// Wrong PINs.
    pub failures: AtomicU64,
    /// Lockouts imposed on a source.
    pub lockouts: AtomicU64,
    /// Guesses refused unseen from a locked-out source.
    pub refused_locked: AtomicU64,
    /// Wrong PINs beyond the box's rate (their source locked out at once).
    pub throttled: AtomicU64,
    /// Right PINs.
    pub accepted: AtomicU64,
    /// Sources forgotten to keep the table bounded.
    pub evicted: AtomicU64,
}

/// What a guess gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Wrong; `Some(d)`: the source is now locked out for `d`.
    Wrong(Option<Duration>),
    /// Not compared: the source is locked out for this much longer.
    LockedOut(Duration),
    /// Wrong, beyond the box's rate: the source is now locked out for this long.
    Throttled(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u64),
    Unknown,
}

fn source(ip: Option<IpAddr>) -> Source {
    match ip.map(|i| i.to_canonical()) {
        Some(IpAddr::V4(v4)) => Source::V4(u32::from(v4)),
        Some(IpAddr::V6(v6)) => Source::V6((u128::from(v6) >> 64) as u64),
        None => Source::Unknown,
    }
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    locked_until: Option<Instant>,
    last_failure: Instant,
}

#[derive(Debug)]
struct Table {
    by_source: HashMap<Source, Entry>,
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct PinGuard {
    limits: PinLimits,
    table: Mutex<Table>,
    pub stats: PinStats,
}

impl PinGuard {
    pub fn new(limits: PinLimits) -> PinGuard {
        PinGuard {
            table: Mutex::new(Table {
                by_source: HashMap::new(),
                tokens: limits.failures_per_second.max(1) as f64,
                at: Instant::now(),
            }),
            limits,
            stats: PinStats::default(),
        }
    }

    /// Sources locked out now.
    pub fn locked_sources(&self) -> usize {
        let now = Instant::now();
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.by_source
            .values()
            .filter(|e| e.locked_until.is_some_and(|u| u > now))
            .count()
    }

    /// Judge `given` against `want` from `ip`.
    pub fn check(&self, ip: Option<IpAddr>, given: &[u8], want: &[u8]) -> Verdict {
        let src = source(ip);
        let now = Instant::now();
        {
            let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(u) = t.by_source.get(&src).and_then(|e| e.locked_until) {
                if u > now {
                    self.stats.refused_locked.fetch_add(1, Relaxed);
                    return Verdict::LockedOut(u - now);
                }
            }
        }
        if ct_eq(given, want) {
            self.stats.accepted.fetch_add(1, Relaxed);
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            t.by_source.remove(&src);
            return Verdict::Ok;
        }
        self.stats.failures.fetch_add(1, Relaxed);
        let l = &self.limits;
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        // the box's budget of wrong PINs
        let rate = l.failures_per_second.max(1) as f64;
        let dt = now.duration_since(t.at).as_secs_f64();
        t.at = now;
        t.tokens = (t.tokens + dt * rate).min(rate);
        let over = t.tokens < 1.0;
        if !over {
            t.tokens -= 1.0;
        }
        if !t.by_source.contains_key(&src) && t.by_source.len() >= l.table_size.max(1) {
            let oldest = t
                .by_source
                .iter()
                .min_by_key(|(_, e)| (e.locked_until.is_some_and(|u| u > now), e.last_failure))
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                t.by_source.remove(&k);
                self.stats.evicted.fetch_add(1, Relaxed);
            }
        }
        let e = t.by_source.entry(src).or_insert(Entry {
            failures: 0,
            locked_until: None,
            last_failure: now,
        });
        if now.duration_since(e.last_failure) >= FORGIVE_AFTER {
            e.failures = 0;
        }
        e.last_failure = now;
        e.failures = e.failures.saturating_add(1);
        if over {
            e.failures = e.failures.max(l.free_tries.max(1));
        }
        let lock = if e.failures >= l.free_tries.max(1) {
            let n = (e.failures - l.free_tries.max(1)).min(30);
            let d = Duration::from_secs(1u64 << n).min(l.lockout_max);
            e.locked_until = Some(now + d);
            self.stats.lockouts.fetch_add(1, Relaxed);
            Some(d)
        } else {
            None
        };
        if over {
            self.stats.throttled.fetch_add(1, Relaxed);
            Verdict::Throttled(lock.unwrap_or(Duration::from_secs(1)))
        } else {
            Verdict::Wrong(lock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn lockouts_grow_per_source_and_the_right_pin_still_works_elsewhere() {
        let g = PinGuard::new(PinLimits::default());
        let a = ip("10.0.0.1");
        assert_eq!(g.check(a, b"0000", b"1234"), Verdict::Wrong(None));
        assert_eq!(g.check(a, b"0001", b"1234"), Verdict::Wrong(None));
        assert_eq!(
            g.check(a, b"0002", b"1234"),
            Verdict::Wrong(Some(Duration::from_secs(1)))
        );
        // locked: not even the right PIN is compared
        assert!(matches!(
            g.check(a, b"1234", b"1234"),
            Verdict::LockedOut(_)
        ));
        // another source is not affected
        assert_eq!(g.check(ip("10.0.0.2"), b"1234", b"1234"), Verdict::Ok);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(
            g.check(a, b"0003", b"1234"),
            Verdict::Wrong(Some(Duration::from_secs(2)))
        );
        tokio::time::advance(Duration::from_millis(2001)).await;
        assert_eq!(
            g.check(a, b"0004", b"1234"),
            Verdict::Wrong(Some(Duration::from_secs(4)))
        );
        assert_eq!(g.locked_sources(), 1);
        // capped
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(301)).await;
            g.check(a, b"9", b"1234");
        }
        match g.check(a, b"9", b"1234") {
            Verdict::LockedOut(d) => assert!(d <= Duration::from_secs(300)),
            v => panic!("{v:?}"),
        }
        // one /64 is one source
        let v6a = ip("2001:db8:1:2::1");
        let v6b = ip("2001:db8:1:2::ffff");
        for _ in 0..3 {
            g.check(v6a, b"x", b"1234");
        }
        assert!(matches!(
            g.check(v6b, b"1234", b"1234"),
            Verdict::LockedOut(_)
        ));
        // after its lockout, the right PIN clears the source
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(g.check(v6b, b"1234", b"1234"), Verdict::Ok);
        assert_eq!(g.check(v6a, b"x", b"1234"), Verdict::Wrong(None));
    }

    #[tokio::test(start_paused = true)]
    async fn the_box_wide_rate_locks_out_many_sources() {
        let g = PinGuard::new(PinLimits {
            failures_per_second: 5,
            ..PinLimits::default()
        });
        let mut throttled = 0;
        for i in 0..20 {
            match g.check(ip(&format!("10.0.1.{i}")), b"0", b"1234") {
                Verdict::Wrong(None) => {}
                Verdict::Throttled(_) => throttled += 1,
                v => panic!("{v:?}"),
            }
        }
        assert_eq!(throttled, 15);
        // the right PIN from a fresh source still works at once
        assert_eq!(g.check(ip("10.0.2.1"), b"1234", b"1234"), Verdict::Ok);
        // a throttled source is locked out
        assert!(matches!(
            g.check(ip("10.0.1.19"), b"1234", b"1234"),
            Verdict::LockedOut(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let g = PinGuard::new(PinLimits {
            table_size: 8,
            failures_per_second: 1000,
            ..PinLimits::default()
        });
        for i in 0..100 {
            g.check(ip(&format!("10.1.0.{i}")), b"0", b"1234");
        }
        assert!(g.table.lock().unwrap().by_source.len() <= 8);
        assert_eq!(g.stats.evicted.load(Relaxed), 92);
    }
}
