//! The node's clock: CLOCK_MONOTONIC (a vDSO read) and the test distortion of SPEC §5.
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

pub use crate::core::time::Clock;

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
}
