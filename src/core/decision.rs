//! Decisions and their stamps: what a person chose, ordered across the room.
//!
//! Every replicated record (the timeline — tempo, meter, start, stop —, the pin, …)
//! carries the [`Stamp`] of the decision that made it. When groups of boxes meet (boot,
//! join, heal), each record takes the value with the **latest stamp**, whichever side
//! holds it; leadership still follows rank (see `room.rs`).
//!
//! # The stamp: a hybrid logical clock
//!
//! ```text
//! Stamp = (ms, n, node)        ordered lexicographically
//! issue at physical time p:    (ms, n) = p > last.ms ? (p, 0) : (last.ms, last.n + 1)
//! observe a stamp s:           last = max(last, (s.ms, s.n))
//! ```
//!
//! `p` is the box's wall clock in ms (the driver hands the core an offset from its
//! monotonic clock once, at start; the core never reads a clock). `last` is persisted
//! with the session, and every announce carries the records' stamps, which every box
//! observes. So:
//!
//! * **Causality holds whatever the clocks say**: a decision made on a box that has
//!   seen another (directly, or through any chain of announces, or from its own disk)
//!   is issued above it, so it is later — even on a Pi whose clock restarted at 1970.
//! * **Concurrent decisions** (two sides of a partition) are ordered by their
//!   physical parts, i.e. by when they were made as well as the boxes' clocks agree;
//!   equal ones by counter, then node id. A default (first boot) is [`Stamp::DEFAULT`],
//!   older than any decision; a box's start flags are [`Stamp::FLAGS`], newer than a
//!   default and older than anything decided while the room runs (the same for every
//!   box, so a box started with flags that joins a running room adopts the room's).
//!
//! **A box whose clock is hours off.** If its clock is *ahead*, every box that hears
//! from it takes its physical part (the HLC never goes back): the room's later stamps
//! carry that time plus a counter. Causal order is unaffected. During a partition, the
//! side that contains the fast box issues stamps from its fast clock, the other side
//! from the highest stamp it had seen plus a counter — so for concurrent decisions the
//! fast side wins even when its decision was made first. If its clock is *behind*, it
//! issues stamps from the highest it has seen (counter only) and its concurrent
//! decisions lose to the others'. Stamps more than [`MAX_AHEAD_MS`] ahead of the
//! receiver's own clock are refused (a broken or hostile clock must not push the room's
//! clock out of reach), with the named error [`StampError::TooFarAhead`].

use serde::{Deserialize, Serialize};

/// Stamps from more than this far ahead of our clock are refused: 7 days.
pub const MAX_AHEAD_MS: u64 = 7 * 24 * 3600 * 1000;
/// Largest physical part on the wire (2⁵³: safe in JSON too).
pub const MAX_MS: u64 = 1 << 53;

/// The stamp of a decision. Ordered by `(ms, n, node)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Physical part: wall-clock ms, never below any stamp the issuer had seen.
    pub ms: u64,
    /// Logical counter within one `ms`.
    pub n: u32,
    /// The node where the decision was made (empty for the default).
    pub node: String,
}

impl Stamp {
    /// Older than any decision: what a first boot's defaults carry.
    pub const DEFAULT: Stamp = Stamp {
        ms: 0,
        n: 0,
        node: String::new(),
    };

    /// A box's start flags (`--play`, `--tempo`, `--meter` on a first boot, `--play` on
    /// a stopped saved session): newer than a default, older than any decision made
    /// while the room runs. Every box's flags carry this same stamp, so when two boxes'
    /// flags meet the running room (the older session) wins: joining never disturbs
    /// the room.
    pub const FLAGS: Stamp = Stamp {
        ms: 0,
        n: 1,
        node: String::new(),
    };

    pub fn is_default(&self) -> bool {
        *self == Stamp::DEFAULT
    }
}

impl std::fmt::Display for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_default() {
            f.write_str("default")
        } else if *self == Stamp::FLAGS {
            f.write_str("start flags")
        } else {
            write!(f, "{}.{}@{}", self.ms, self.n, self.node)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    #[error("stamp {ms} ms is {ahead_ms} ms ahead of this box's clock (limit {MAX_AHEAD_MS})")]
    TooFarAhead { ms: u64, ahead_ms: u64 },
    #[error("stamp {0} ms is beyond 2^53")]
    OutOfRange(u64),
}

/// The hybrid logical clock of one box.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hlc {
    pub ms: u64,
    pub n: u32,
}

impl Hlc {
    /// Issue a stamp for a decision made now (`phys_ms`: this box's wall clock) at `node`.
    pub fn issue(&mut self, phys_ms: u64, node: &str) -> Stamp {
        if phys_ms > self.ms {
            self.ms = phys_ms;
            self.n = 0;
        } else if self.n == u32::MAX {
            self.ms += 1;
            self.n = 0;
        } else {
            self.n += 1;
        }
        Stamp {
            ms: self.ms,
            n: self.n,
            node: node.to_string(),
        }
    }

    /// Take in a stamp seen from a peer (or disk); refused when it is out of reach of
    /// our own clock (see the module doc).
    pub fn observe(&mut self, s: &Stamp, phys_ms: u64) -> Result<(), StampError> {
        if s.ms > MAX_MS {
            return Err(StampError::OutOfRange(s.ms));
        }
        if s.ms > phys_ms.saturating_add(MAX_AHEAD_MS) {
            return Err(StampError::TooFarAhead {
                ms: s.ms,
                ahead_ms: s.ms - phys_ms,
            });
        }
        if (s.ms, s.n) > (self.ms, self.n) {
            self.ms = s.ms;
            self.n = s.n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_older_than_any_decision() {
        let mut h = Hlc::default();
        let s = h.issue(0, "a");
        assert!(s > Stamp::DEFAULT);
        assert!(Stamp::DEFAULT.is_default());
    }

    #[test]
    fn a_decision_after_seeing_another_is_later_whatever_the_clock() {
        let mut fast = Hlc::default();
        let seen = fast.issue(10_000_000, "f"); // a box hours ahead
        let mut slow = Hlc::default();
        slow.observe(&seen, 1_000).unwrap();
        let next = slow.issue(1_000, "s"); // its own clock says 1 s
        assert!(next > seen, "{next} vs {seen}");
        // and again on the same ms
        let again = slow.issue(1_000, "s");
        assert!(again > next);
    }

    #[test]
    fn flags_sit_between_defaults_and_live_decisions() {
        let mut h = Hlc::default();
        let live = h.issue(0, "a");
        assert!(Stamp::DEFAULT < Stamp::FLAGS && Stamp::FLAGS < live);
    }

    #[test]
    fn concurrent_decisions_order_by_time() {
        let mut a = Hlc::default();
        let mut b = Hlc::default();
        let early = a.issue(5_000, "b-side");
        let late = b.issue(8_000, "a-side");
        assert!(late > early);
    }

    #[test]
    fn stamps_out_of_reach_are_refused_and_change_nothing() {
        let mut h = Hlc::default();
        h.issue(1_000, "x");
        let before = h;
        let far = Stamp {
            ms: 1_000 + MAX_AHEAD_MS + 1,
            n: 0,
            node: "e".into(),
        };
        assert!(matches!(
            h.observe(&far, 1_000),
            Err(StampError::TooFarAhead { .. })
        ));
        let huge = Stamp {
            ms: u64::MAX,
            n: u32::MAX,
            node: "e".into(),
        };
        assert_eq!(
            h.observe(&huge, 1_000),
            Err(StampError::OutOfRange(u64::MAX))
        );
        assert_eq!(h, before);
    }

    #[test]
    fn counter_overflow_moves_the_physical_part() {
        let mut h = Hlc { ms: 7, n: u32::MAX };
        let s = h.issue(3, "x");
        assert_eq!((s.ms, s.n), (8, 0));
    }
}
