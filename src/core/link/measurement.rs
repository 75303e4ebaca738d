//! Measurement *initiator* (spec Ch. 2 §4.2 and §5): a pure ping/pong chain
//! that estimates another session's ghost transform `ghost = host + intercept`.
//!
//! The authority never needs it to keep its own session (it never joins
//! another one, see [`crate::core::link::peer`]); [`crate::core::link::peer::LinkPeer`] uses it only to
//! *diagnose* foreign sessions — to tell the product whether a foreign Link
//! session will join ours (Ch. 2 §7.2) or is older than ours and will not.
//!
//! The responder side is stateless and lives in the peer
//! (`LinkPeer::handle_datagram`).

use ::core::net::SocketAddrV4;

use crate::core::link::codec::{encode_ping, MeasurementPayload, NodeId};

/// Retry timer (Ch. 2 §4.2).
pub const RETRY_PERIOD_US: i64 = 50_000;
/// Timer-driven retries before the measurement fails (Ch. 2 §4.2).
pub const MAX_RETRIES: u8 = 5;
/// The measurement completes when more than this many samples exist (Ch. 2 §5).
pub const SAMPLES_REQUIRED: usize = 100;

/// Result of feeding an input to a [`Measurement`].
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Keep going; send this ping (if any) to the target.
    Continue(Option<Vec<u8>>),
    /// Finished: `intercept_us` maps *our* host clock to the target
    /// session's ghost time (`ghost = host + intercept`).
    Done {
        /// Median offset, rounded.
        intercept_us: i64,
    },
    /// Failed: session mismatch or retry budget exhausted.
    Failed(FailReason),
}

/// Why a measurement failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// A pong named another session than expected (Ch. 2 §4.2 session check).
    SessionMismatch,
    /// Five timer-driven retries were used up (budget is cumulative).
    Timeout,
}

/// One ping/pong measurement against one endpoint.
#[derive(Clone, Debug)]
pub struct Measurement {
    target: SocketAddrV4,
    expected_session: NodeId,
    samples: Vec<f64>,
    retries_used: u8,
    deadline_us: i64,
    finished: bool,
}

impl Measurement {
    /// Start measuring `target` (a `mep4` endpoint) which is expected to be
    /// in `expected_session`. Returns the measurement and the first ping
    /// `{__ht = now}` to send to `target`.
    pub fn start(
        now_host_us: i64,
        target: SocketAddrV4,
        expected_session: NodeId,
    ) -> (Self, Vec<u8>) {
        let m = Measurement {
            target,
            expected_session,
            samples: Vec::with_capacity(SAMPLES_REQUIRED + 2),
            retries_used: 0,
            deadline_us: now_host_us.saturating_add(RETRY_PERIOD_US),
            finished: false,
        };
        (m, encode_ping(now_host_us, None))
    }

    /// The endpoint being measured.
    pub fn target(&self) -> SocketAddrV4 {
        self.target
    }

    /// The session the target is expected to be in.
    pub fn expected_session(&self) -> NodeId {
        self.expected_session
    }

    /// When [`Measurement::handle_timeout`] must be called next (host µs).
    pub fn deadline(&self) -> i64 {
        self.deadline_us
    }

    /// Samples collected so far.
    pub fn sample_count(&self) -> usize {
        self.samples.len()
    }

    /// Feed a pong received from the target at host time `now`.
    pub fn handle_pong(&mut self, now_host_us: i64, pong: &MeasurementPayload) -> Step {
        if self.finished {
            return Step::Continue(None);
        }
        if pong.session_id != Some(self.expected_session) {
            self.finished = true;
            return Step::Failed(FailReason::SessionMismatch);
        }
        let gt = pong.ghost_time.unwrap_or(0);
        let pht = pong.host_time.unwrap_or(0);
        let pgt = pong.prev_ghost_time.unwrap_or(0);
        let ht = now_host_us;
        if gt != 0 && pht != 0 {
            // sample₁ = GT − (HT + PHT)/2
            self.samples
                .push(gt as f64 - (ht as f64 + pht as f64) / 2.0);
            if pgt != 0 {
                // sample₂ = (GT + PGT)/2 − PHT
                self.samples
                    .push((gt as f64 + pgt as f64) / 2.0 - pht as f64);
            }
        }
        if self.samples.len() > SAMPLES_REQUIRED {
            self.finished = true;
            return Step::Done {
                intercept_us: median(&mut self.samples).round() as i64,
            };
        }
        // Chain the next ping immediately; re-arm the timer (budget not restored).
        self.deadline_us = now_host_us.saturating_add(RETRY_PERIOD_US);
        Step::Continue(Some(encode_ping(
            now_host_us,
            pong.ghost_time.filter(|&g| g != 0),
        )))
    }

    /// Drive the retry timer.
    pub fn handle_timeout(&mut self, now_host_us: i64) -> Step {
        if self.finished || now_host_us < self.deadline_us {
            return Step::Continue(None);
        }
        if self.retries_used >= MAX_RETRIES {
            self.finished = true;
            return Step::Failed(FailReason::Timeout);
        }
        self.retries_used += 1;
        self.deadline_us = now_host_us.saturating_add(RETRY_PERIOD_US);
        Step::Continue(Some(encode_ping(now_host_us, None)))
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::link::codec::{
        decode_measurement, decode_measurement_header, encode_pong_echo, MeasurementKind,
    };

    const SESS: NodeId = NodeId([9; 8]);

    /// Simulated responder whose ghost clock is host + `offset`, with
    /// one-way delays `up` (ping) and `down` (pong).
    fn run(offset: i64, up: i64, down: i64) -> (Step, usize) {
        let target: SocketAddrV4 = "10.0.0.2:5000".parse().unwrap();
        let mut now = 1_000_000;
        let (mut m, mut ping) = Measurement::start(now, target, SESS);
        let mut rounds = 0;
        loop {
            rounds += 1;
            let (kind, payload) = decode_measurement_header(&ping).unwrap();
            assert_eq!(kind, MeasurementKind::Ping);
            now += up;
            let pong = encode_pong_echo(SESS, now + offset, payload);
            now += down;
            let p = decode_measurement(&pong).unwrap().payload;
            match m.handle_pong(now, &p) {
                Step::Continue(Some(next)) => ping = next,
                other => return (other, rounds),
            }
        }
    }

    #[test]
    fn symmetric_delay_recovers_offset_exactly() {
        let (step, rounds) = run(123_456_789, 300, 300);
        assert_eq!(
            step,
            Step::Done {
                intercept_us: 123_456_789
            }
        );
        assert_eq!(rounds, 51); // 1 sample, then 2 per round: 101 at round 51
    }

    #[test]
    fn asymmetric_delay_biases_by_half_the_asymmetry() {
        let (step, _) = run(-5_000, 1_000, 200);
        assert_eq!(
            step,
            Step::Done {
                intercept_us: -5_000 + (1_000 - 200) / 2
            }
        );
    }

    #[test]
    fn session_mismatch_fails() {
        let target: SocketAddrV4 = "10.0.0.2:5000".parse().unwrap();
        let (mut m, _) = Measurement::start(0, target, SESS);
        let p = MeasurementPayload {
            session_id: Some(NodeId([1; 8])),
            ghost_time: Some(5),
            host_time: Some(1),
            prev_ghost_time: None,
        };
        assert_eq!(
            m.handle_pong(10, &p),
            Step::Failed(FailReason::SessionMismatch)
        );
    }

    #[test]
    fn retry_budget_is_five_then_fail() {
        let target: SocketAddrV4 = "10.0.0.2:5000".parse().unwrap();
        let (mut m, _) = Measurement::start(0, target, SESS);
        assert_eq!(m.handle_timeout(10), Step::Continue(None)); // not yet due
        let mut t = 0;
        for _ in 0..5 {
            t = m.deadline();
            match m.handle_timeout(t) {
                Step::Continue(Some(p)) => {
                    let d = decode_measurement(&p).unwrap();
                    assert_eq!(d.payload.host_time, Some(t));
                    assert_eq!(d.payload.prev_ghost_time, None);
                }
                s => panic!("{s:?}"),
            }
        }
        assert_eq!(t, 250_000);
        assert_eq!(
            m.handle_timeout(m.deadline()),
            Step::Failed(FailReason::Timeout)
        );
        assert_eq!(m.deadline(), 300_000);
    }
}
