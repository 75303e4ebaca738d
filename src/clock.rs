//! Clocks: the monotonic clock trait, the test distortion of SPEC §5, and the map
//! from a node's local clock to session time.
//!
//! Everything in a node sees only its *perceived* clock. With
//! `BANDSYNC_TEST_CLOCK="offset_ms=X,skew_ppm=Y"` that is
//!
//! ```text
//! perceived = true + X·1e6 + (true − start) · Y·1e-6        (ns)
//! true      = start + (perceived − X·1e6 − start) / (1 + Y·1e-6)
//! ```
//!
//! where `start` is the true time at which the process built its clock. Only the
//! click log converts back to true CLOCK_MONOTONIC.

use serde::{Deserialize, Serialize};

/// A monotonic clock in nanoseconds. The daemon's implementation reads
/// CLOCK_MONOTONIC (a vDSO call: no syscall, safe on the audio thread); tests use
/// fakes.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> i64;
}

/// True CLOCK_MONOTONIC in ns.
pub fn mono_now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
}

/// The test distortion of SPEC §5.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distortion {
    pub offset_ns: i64,
    pub skew_ppm: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClockError {
    #[error("BANDSYNC_TEST_CLOCK: {0}")]
    BadTestClock(String),
}

impl Distortion {
    /// Parse `offset_ms=X,skew_ppm=Y` (either part may be left out).
    pub fn parse(s: &str) -> Result<Distortion, ClockError> {
        let mut d = Distortion {
            offset_ns: 0,
            skew_ppm: 0.0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                ClockError::BadTestClock(format!("expected key=value, got {part:?}"))
            })?;
            let x: f64 = v.trim().parse().map_err(|_| {
                ClockError::BadTestClock(format!("{k} must be a number, got {v:?}"))
            })?;
            if !x.is_finite() {
                return Err(ClockError::BadTestClock(format!(
                    "{k} must be finite, got {v:?}"
                )));
            }
            match k.trim() {
                "offset_ms" if x.abs() <= 1e9 => d.offset_ns = (x * 1e6).round() as i64,
                "skew_ppm" if x.abs() <= 100_000.0 => d.skew_ppm = x,
                "offset_ms" | "skew_ppm" => {
                    return Err(ClockError::BadTestClock(format!("{k}={v} is out of range")))
                }
                other => {
                    return Err(ClockError::BadTestClock(format!(
                        "unknown key {other:?} (expected offset_ms, skew_ppm)"
                    )))
                }
            }
        }
        Ok(d)
    }
}

/// The node's clock: CLOCK_MONOTONIC, perhaps distorted for tests.
#[derive(Clone, Copy, Debug)]
pub struct NodeClock {
    distortion: Option<Distortion>,
    start_true: i64,
}

impl NodeClock {
    /// The undistorted clock.
    pub fn real() -> NodeClock {
        NodeClock {
            distortion: None,
            start_true: mono_now_ns(),
        }
    }
    /// A clock distorted as SPEC §5 says, anchored at `start_true`.
    pub fn distorted(d: Distortion, start_true: i64) -> NodeClock {
        NodeClock {
            distortion: Some(d),
            start_true,
        }
    }
    /// From the environment (`BANDSYNC_TEST_CLOCK`), anchored now.
    pub fn from_env() -> Result<NodeClock, ClockError> {
        let start = mono_now_ns();
        match std::env::var("BANDSYNC_TEST_CLOCK") {
            Ok(s) if !s.trim().is_empty() => {
                Ok(NodeClock::distorted(Distortion::parse(&s)?, start))
            }
            _ => Ok(NodeClock {
                distortion: None,
                start_true: start,
            }),
        }
    }
    pub fn distortion(&self) -> Option<Distortion> {
        self.distortion
    }
    /// Perceived time of true time `t`.
    pub fn perceive(&self, t: i64) -> i64 {
        match self.distortion {
            None => t,
            Some(d) => {
                let el = (t - self.start_true) as f64;
                t + d.offset_ns + (el * d.skew_ppm * 1e-6).round() as i64
            }
        }
    }
    /// True time of perceived time `p`.
    pub fn to_true(&self, p: i64) -> i64 {
        match self.distortion {
            None => p,
            Some(d) => {
                let x = (p - d.offset_ns - self.start_true) as f64;
                self.start_true + (x / (1.0 + d.skew_ppm * 1e-6)).round() as i64
            }
        }
    }
}

impl Clock for NodeClock {
    fn now_ns(&self) -> i64 {
        self.perceive(mono_now_ns())
    }
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
    fn parse_test_clock() {
        let d = Distortion::parse("offset_ms=250,skew_ppm=-100").unwrap();
        assert_eq!(d.offset_ns, 250_000_000);
        assert_eq!(d.skew_ppm, -100.0);
        assert!(Distortion::parse("offset_ms=abc").is_err());
        assert!(Distortion::parse("offsetms=1").is_err());
        assert!(Distortion::parse("skew_ppm=inf").is_err());
    }

    #[test]
    fn distortion_round_trips_and_runs_fast() {
        let c = NodeClock::distorted(
            Distortion {
                offset_ns: 5_000_000,
                skew_ppm: 1000.0,
            },
            1_000_000_000,
        );
        let t = 11_000_000_000; // 10 s after start
        let p = c.perceive(t);
        assert_eq!(p, t + 5_000_000 + 10_000_000);
        assert!((c.to_true(p) - t).abs() <= 1);
    }

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
