//! Time in the core: the [`Clock`] trait (implemented by the node's monotonic clock in
//! `sys::clock`, and by fakes in tests) and the [`SessionMap`] from a node's local
//! clock to session time. Pure: nothing here reads a clock.

use serde::{Deserialize, Serialize};

/// A monotonic clock in nanoseconds. The daemon's implementation reads
/// CLOCK_MONOTONIC (a vDSO call: no syscall, safe on the audio thread); tests use
/// fakes.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> i64;
}

/// Maps the node's local (perceived) clock to session time:
///
/// ```text
/// session(l) = session_ref + (l − local_ref) · (1 + rate_ppt·1e-12)
/// ```
///
/// A node alone uses the identity. Followers get offset and rate from clock sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMap {
    pub local_ref: i64,
    pub session_ref: i64,
    /// Rate of session time relative to local time, parts per trillion.
    pub rate_ppt: i64,
}

const PPT: i128 = 1_000_000_000_000;

impl SessionMap {
    pub const IDENTITY: SessionMap = SessionMap {
        local_ref: 0,
        session_ref: 0,
        rate_ppt: 0,
    };

    pub fn to_session(&self, local: i64) -> i64 {
        let d = local as i128 - self.local_ref as i128;
        (self.session_ref as i128 + d + d * self.rate_ppt as i128 / PPT) as i64
    }
    pub fn to_local(&self, session: i64) -> i64 {
        let d = session as i128 - self.session_ref as i128;
        (self.local_ref as i128 + d * PPT / (PPT + self.rate_ppt as i128)) as i64
    }
    /// `self`, then `outer`: local → (self) → intermediate → (outer) → session. A
    /// follower reads a peer's session clock as its estimate of the peer's local clock
    /// followed by the peer's own map.
    pub fn then(&self, outer: &SessionMap) -> SessionMap {
        let (a, b) = (self.rate_ppt as i128, outer.rate_ppt as i128);
        let rate = a + b + a * b / PPT;
        SessionMap {
            local_ref: self.local_ref,
            session_ref: outer.to_session(self.session_ref),
            rate_ppt: rate.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_compose() {
        let inner = SessionMap {
            local_ref: 1_000_000_000,
            session_ref: 7_000_000_000,
            rate_ppt: 150_000_000, // +150 ppm
        };
        let outer = SessionMap {
            local_ref: 6_000_000_000,
            session_ref: -2_000_000_000,
            rate_ppt: -80_000_000, // −80 ppm
        };
        let both = inner.then(&outer);
        for l in [0, 1_000_000_000, 60_000_000_000, 3_600_000_000_000] {
            let direct = outer.to_session(inner.to_session(l));
            assert!(
                (both.to_session(l) - direct).abs() <= 2,
                "at {l}: {} vs {direct}",
                both.to_session(l)
            );
        }
    }

    #[test]
    fn session_map_inverts() {
        let m = SessionMap {
            local_ref: 1_000,
            session_ref: 5_000_000_000,
            rate_ppt: 123_456_789,
        };
        for l in [0i64, 1_000_000_000, 987_654_321_000] {
            assert!((m.to_local(m.to_session(l)) - l).abs() <= 1);
        }
    }
}
