//! Clock sync core: estimate the leader's session clock from ping/pong exchanges
//! ([`Estimator`]), and publish a session map that follows the estimate without ever
//! stepping ([`Slewer`]).
//!
//! Pure: no clock reads, no IO, no threads, no randomness. Time is always an argument
//! (`i64` ns of the node's *perceived* local clock, or of the leader's session clock).
//! Bad input is rejected with a [`RejectReason`], never a panic: all arithmetic on
//! sample timestamps is done in `i128` and checked before it is narrowed.
//!
//! # One exchange
//!
//! ```text
//!   follower (local clock)            leader (session clock)
//!   t1 ── ping ─────────────────────▶ t2
//!   t4 ◀───────────────────── pong ── t3
//! ```
//!
//! Write `θ(l)` for "session − local" at local time `l`, and `d→`, `d←` for the
//! one-way delays (in local ns, both `≥ 0` by causality). Then
//!
//! ```text
//! f = t2 − t1 = θ(t1) + d→          forward point  (local x = t1)
//! g = t3 − t4 = θ(t4) − d←          backward point (local x = t4)
//! offset_i = (f + g)/2 = θ(m_i) + (d→ − d←)/2        m_i = (t1 + t4)/2
//! rtt_i    = f − g     = (t4 − t1) − (t3 − t2) = d→ + d←
//! ```
//!
//! so `|offset_i − θ(m_i)| ≤ rtt_i/2` always, and the error of a sample is *half the
//! difference of its one-way delays*. A constant path asymmetry `a = d→ − d←` is
//! indistinguishable from a clock offset: every estimator (NTP's included) is biased by
//! `a/2`. Everything below fights the *variable* part of the delays (queueing, Wi-Fi
//! retries, scheduler latency), which is always positive.
//!
//! # Model
//!
//! Over the window (≤ [`SyncConfig::max_age_ns`], 60 s) both clocks are linear, so
//!
//! ```text
//! θ(l) = θ0 + r·(l − l0)          r: rate of session vs local time (skew), |r| ≤ max_rate
//! ```
//!
//! # Filter: the widest corridor
//!
//! Since delays are `≥ 0`, every sample bounds the line from both sides:
//!
//! ```text
//! θ(t1_i) ≤ f_i          the line passes below every forward point
//! θ(t4_i) ≥ g_i          and above every backward point
//! ```
//!
//! With `x = l − l0`, let `A(r) = min_i (f_i − r·x_i)` and `B(r) = max_i (g_i − r·x_i)`.
//! For a rate `r` the admissible offsets are `θ0 ∈ [B(r), A(r)]`, a corridor of width
//! `W(r) = A(r) − B(r)`. `A` is concave and `B` convex, so `W` is concave; the filter
//! takes the widest corridor and its centre line:
//!
//! ```text
//! r̂  = argmax_{|r| ≤ max_rate} W(r)
//! θ̂0 = (A(r̂) + B(r̂)) / 2                 uncertainty = W(r̂)/2     (refined below)
//! ```
//!
//! This is the linear-programming clock filter (Moon–Skelly–Towsley for one-way
//! delays, here two-sided). Why it beats averaging: with delays `d = b + j` (base `b`,
//! jitter `j ≥ 0`) and the right rate, `A = θ0 + b + min j→` and `B = θ0 − b − min j←`,
//! so the centre is off by `(min j→ − min j←)/2`. It combines the *best forward* delay
//! of one sample with the *best backward* delay of another, where a low-RTT filter
//! needs one sample lucky in both directions at once. With jitter uniform in `0..J`
//! per direction and `n` samples the error is ~`J/n` instead of ~`J/√n`, and the rate
//! error is ~`J/(n·span)`. Large delays (spikes, retries) never bind, so they do no
//! harm; only a negative delay could, and causality forbids it.
//!
//! `W/2` is a hard bound on the offset error if delays are `≥ 0` and the path is at
//! worst completely asymmetric: it is the NTP-style error bound (≈ RTT/2), not the
//! typical error, which is usually far smaller.
//!
//! Computation: `A` is attained on the lower convex hull of the forward points and `B`
//! on the upper hull of the backward points. `W` is piecewise linear with breakpoints
//! at the hulls' edge slopes, so its maximum is at one of those slopes or at the
//! `±max_rate` clamp (a binary search over the sorted slopes). The hulls are exact
//! (integer points, `i128` cross products) and kept incrementally: a sample newer than
//! all others extends them in amortized O(1) (Andrew's monotone chain); they are rebuilt
//! only when a batch of old samples leaves or a sample arrives out of order. `W` is
//! evaluated in `f64`, relative to the newest sample, on the hull vertices only (a
//! dozen or so). Cost per accepted sample: O(window) for bookkeeping, O(hull) for the
//! filter.
//!
//! # How sure is the rate? Widen, centre, shrink
//!
//! `r̂` alone is brittle: it is fixed by three points, and a few samples over Wi-Fi can
//! put it at the ±max_rate clamp (extrapolating that runs away by milliseconds per
//! second). The shape of `W` says how well the rate is determined. Every rate whose
//! corridor is within `δ` of the widest fits the data about as well as its noise
//! allows, where `δ = s/n` is the expected gap between an envelope of `n` samples and the
//! true line (`s = median(rtt) − min(rtt)` over the recent valid samples, the jitter
//! scale):
//!
//! ```text
//! [r_lo, r_hi] = { r : W(r) ≥ W(r̂) − δ }      (an interval: W is concave; found by
//!                                               walking out from r̂, W being linear
//!                                               between breakpoints)
//! σ_r = (r_hi − r_lo)/2
//! r   = (r_lo + r_hi)/2 · σ_p² / (σ_p² + σ_r²)
//! θ̂0 = (A(r) + B(r))/2,   uncertainty = W(r)/2
//! ```
//!
//! The centre of the interval is steadier than its argmax, and the last factor is a
//! Bayesian mean with a prior of `σ_p` ([`SyncConfig::rate_prior_ppm`], 200 ppm: two
//! crystal oscillators) around 0. On a LAN `σ_r` is a few ppm after 8 samples and the
//! rate is used as measured; over Wi-Fi it fades in over ~10–20 s. With `s = 0` (perfect
//! samples) `δ = 0` and the estimate is exact.
//!
//! # What accuracy to expect
//!
//! The centre's error is `(min j→ − min j←)/2` plus the rate error times the distance
//! from the binding points to now, both ~`s/n`. Measured on synthetic exchanges (400
//! trials, offset error at the newest sample):
//!
//! | jitter per direction | samples | rate known exactly: p99 | this filter: p99 |
//! |---|---|---|---|
//! | U(0, 50 µs) (LAN) | 48 | 2 µs | 6 µs |
//! | U(0, 20 ms) (Wi-Fi, SPEC §6) | 48 | 0.85 ms | 2.1 ms |
//! | U(0, 20 ms) | 128 | 0.37 ms | 0.94 ms |
//!
//! Even an oracle for the rate cannot do much better: over Wi-Fi the information is in
//! the few luckiest samples. More samples is the only lever: ping faster (20 Hz over
//! Wi-Fi meets 1 ms within 10 s in `tests/sync_sim.rs`, 5 Hz needs ~40 s) and keep a
//! long window.
//!
//! # Gates, in order ([`RejectReason`])
//!
//! 1. `NonCausal`: `t4 < t1`, `t3 < t2`, or a negative RTT.
//! 2. `RttAbsurd`: the exchange took longer than [`SyncConfig::max_rtt_ns`] (1 s) of
//!    local time.
//! 3. `OutOfRange`: the offset does not fit an `i64`.
//! 4. `Duplicate`: a recent sample had the same `t1` (a replayed pong). `TooOld`: its
//!    midpoint is more than `max_age` before the newest one.
//! 5. `RttInflated`: `rtt > min_rtt + max(rtt_margin, k·(median_rtt − min_rtt))` over the
//!    recent RTTs of *all* valid samples (so the gate follows a path that got slower).
//!    The filter itself ignores high delays, so the gate is deliberately loose: it
//!    keeps spikes (a route change, a Wi-Fi retry storm) out of the window.
//! 6. `Inconsistent`: causality says `|offset_i − θ(m_i)| ≤ rtt_i/2`; a sample whose
//!    offset is off the current estimate by more than
//!    `rtt_i/2 + uncertainty + step_threshold (+ 1000 ppm of extrapolation)` means
//!    the leader's clock stepped under us. After `step_after` such samples in a row the
//!    window restarts from them (counted in [`SyncStats::resyncs`]). Callers that *know*
//!    the leader stepped (a new map generation) call [`Estimator::reset`] instead.
//!
//! The window holds the last [`SyncConfig::window`] accepted samples no older than
//! `max_age` (512 and 60 s: 51 s of 10 Hz pings), pruned in batches of an eighth so
//! that the hulls are rebuilt once per batch, not per sample. [`Estimator::estimate`]
//! is `None` until it holds `min_samples` (8). Over Wi-Fi at 10 Hz, 512 samples halve
//! the steady-state worst error of 256 (0.7 → 0.4 ms in simulation).
//!
//! # Slewing
//!
//! The published map `P` must never step, so [`Slewer::step`] rebases it at every
//! control tick `now` (continuity is exact: `P'.to_session(now) = P.to_session(now)`)
//! and steers its *rate*:
//!
//! ```text
//! e    = target(now) − P(now)                                 phase error
//! rate = target.rate + clamp(e / max(τ, Δt), ±max_slew)       Δt: last tick interval
//! ```
//!
//! The phase error decays as `e^(−t/τ)` (τ = 1.5 s) while it is small and at most
//! `max_slew` (500 ppm, inaudible: 0.06 BPM at 120) when it is large; dividing by
//! `max(τ, Δt)` keeps a late tick from overshooting. Only the first map after joining
//! may step (`allow_step`).
//!
//! # Driving it
//!
//! The room estimates each peer's *local* clock (pongs carry the peer's local `t2`/`t3`
//! and its session map): a straight line that never slews or steps, so one estimator
//! lasts as long as the connection, and the peer's session clock is the estimate
//! followed by the peer's newest map (`SessionMap::then`). A leader's map that steps,
//! or a follower's that becomes the room's when it takes over, is read at once.
//!
//! ```text
//! on pong (s, map):  est.handle_sample(s)                     (count rejections by reason)
//!                    keep map if it is the newest (by s.t3)
//! every tick (now):  if let Some(e) = est.estimate() {
//!                        target = e.map.then(&map)
//!                        publish(slewer.step(now, &target, first && e.mature()))
//!                    }
//! ```
//!
//! The first map (the join, the only step) waits for a [mature](Estimate::mature)
//! estimate: over Wi-Fi the first few samples can be milliseconds off, and a clock
//! stepped onto them then slews for seconds. A follower counts as synced (may lead)
//! once its estimate has [settled](Estimate::settled).

use crate::core::time::SessionMap;
use std::collections::VecDeque;

const PPT: i128 = 1_000_000_000_000;
const SEC: i64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------
// Samples and verdicts
// ---------------------------------------------------------------------------------------

/// One NTP-style exchange. t1: local (follower) perceived mono ns when the ping left;
/// t2: leader session-time ns when it arrived; t3: leader session-time ns when the pong
/// left; t4: local ns when the pong arrived.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t1: i64,
    pub t2: i64,
    pub t3: i64,
    pub t4: i64,
}

impl Sample {
    /// `(t4 − t1) − (t3 − t2)`, if it fits an `i64`.
    pub fn rtt_ns(&self) -> Option<i64> {
        let rtt = (self.t4 as i128 - self.t1 as i128) - (self.t3 as i128 - self.t2 as i128);
        i64::try_from(rtt).ok()
    }
    /// `((t2 − t1) + (t3 − t4)) / 2` (session − local at the midpoint), if it fits.
    pub fn offset_ns(&self) -> Option<i64> {
        let o = ((self.t2 as i128 - self.t1 as i128) + (self.t3 as i128 - self.t4 as i128))
            .div_euclid(2);
        i64::try_from(o).ok()
    }
}

/// Why a sample was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RejectReason {
    #[error("non-causal timestamps (t4 < t1, t3 < t2 or a negative round trip)")]
    NonCausal,
    #[error("round trip longer than the configured maximum")]
    RttAbsurd,
    #[error("clock offset does not fit in 64 bits")]
    OutOfRange,
    #[error("duplicate sample (this ping was already answered)")]
    Duplicate,
    #[error("sample older than the estimation window")]
    TooOld,
    #[error("round trip inflated (queueing) compared with recent samples")]
    RttInflated,
    #[error("offset inconsistent with the current estimate (did the leader's clock step?)")]
    Inconsistent,
}

impl RejectReason {
    /// A short stable name, for metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NonCausal => "non_causal",
            RejectReason::RttAbsurd => "rtt_absurd",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::Duplicate => "duplicate",
            RejectReason::TooOld => "too_old",
            RejectReason::RttInflated => "rtt_inflated",
            RejectReason::Inconsistent => "inconsistent",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleVerdict {
    Accepted,
    Rejected(RejectReason),
}

/// Counters since the estimator was built (not cleared by [`Estimator::reset`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub accepted: u64,
    pub non_causal: u64,
    pub rtt_absurd: u64,
    pub out_of_range: u64,
    pub duplicate: u64,
    pub too_old: u64,
    pub rtt_inflated: u64,
    pub inconsistent: u64,
    /// Window restarts after `step_after` inconsistent samples in a row.
    pub resyncs: u64,
}

impl SyncStats {
    pub fn rejected(&self, r: RejectReason) -> u64 {
        match r {
            RejectReason::NonCausal => self.non_causal,
            RejectReason::RttAbsurd => self.rtt_absurd,
            RejectReason::OutOfRange => self.out_of_range,
            RejectReason::Duplicate => self.duplicate,
            RejectReason::TooOld => self.too_old,
            RejectReason::RttInflated => self.rtt_inflated,
            RejectReason::Inconsistent => self.inconsistent,
        }
    }
    fn count(&mut self, r: RejectReason) {
        let c = match r {
            RejectReason::NonCausal => &mut self.non_causal,
            RejectReason::RttAbsurd => &mut self.rtt_absurd,
            RejectReason::OutOfRange => &mut self.out_of_range,
            RejectReason::Duplicate => &mut self.duplicate,
            RejectReason::TooOld => &mut self.too_old,
            RejectReason::RttInflated => &mut self.rtt_inflated,
            RejectReason::Inconsistent => &mut self.inconsistent,
        };
        *c = c.saturating_add(1);
    }
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// Estimator settings. Out-of-range values are clamped by [`Estimator::new`].
#[derive(Clone, Debug, PartialEq)]
pub struct SyncConfig {
    /// Accepted samples kept (4..=4096; pruned in batches, so up to an eighth more).
    /// Accuracy over a jittery path grows with it.
    pub window: usize,
    /// Samples whose midpoint is older than this (vs the newest) leave the window.
    pub max_age_ns: i64,
    /// No estimate until the window holds this many samples.
    pub min_samples: usize,
    /// Prior spread of the rate (ppm): the estimated rate is shrunk towards 0 while its
    /// own uncertainty is larger than this (see the module docs).
    pub rate_prior_ppm: f64,
    /// Exchanges taking longer than this (local `t4 − t1`) are absurd.
    pub max_rtt_ns: i64,
    /// RTT gate: `rtt ≤ min + max(rtt_margin_ns, rtt_spread_k · (median − min))`.
    pub rtt_margin_ns: i64,
    pub rtt_spread_k: f64,
    /// The RTT gate is open until this many valid samples were seen.
    pub gate_after: usize,
    /// Largest believable rate difference between the clocks, ppm.
    pub max_rate_ppm: f64,
    /// Slack beyond causality before a sample counts as inconsistent.
    pub step_threshold_ns: i64,
    /// This many inconsistent samples in a row restart the window.
    pub step_after: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            window: 512,
            max_age_ns: 60 * SEC,
            min_samples: 8,
            rate_prior_ppm: 200.0,
            max_rtt_ns: SEC,
            rtt_margin_ns: 500_000,
            rtt_spread_k: 2.0,
            gate_after: 8,
            max_rate_ppm: 2000.0,
            step_threshold_ns: 1_000_000,
            step_after: 3,
        }
    }
}

impl SyncConfig {
    fn sanitized(mut self) -> SyncConfig {
        self.window = self.window.clamp(4, 4096);
        self.min_samples = self.min_samples.clamp(2, self.window);
        self.max_age_ns = self.max_age_ns.clamp(SEC, 3600 * SEC);
        if !(self.rate_prior_ppm.is_finite() && self.rate_prior_ppm > 0.0) {
            self.rate_prior_ppm = 200.0;
        }
        self.rate_prior_ppm = self.rate_prior_ppm.clamp(1e-3, 100_000.0);
        self.max_rtt_ns = self.max_rtt_ns.clamp(1, 10 * SEC);
        self.rtt_margin_ns = self.rtt_margin_ns.clamp(0, self.max_rtt_ns);
        if !(self.rtt_spread_k.is_finite() && self.rtt_spread_k >= 0.0) {
            self.rtt_spread_k = 2.0;
        }
        self.rtt_spread_k = self.rtt_spread_k.min(1e6);
        self.gate_after = self.gate_after.clamp(2, 1 << 20);
        if !(self.max_rate_ppm.is_finite() && self.max_rate_ppm >= 0.0) {
            self.max_rate_ppm = 2000.0;
        }
        self.max_rate_ppm = self.max_rate_ppm.min(100_000.0);
        self.step_threshold_ns = self.step_threshold_ns.clamp(0, 10 * SEC);
        self.step_after = self.step_after.clamp(1, self.window);
        self
    }
}

// ---------------------------------------------------------------------------------------
// Estimator
// ---------------------------------------------------------------------------------------

/// The estimator's view of the leader's session clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// local → leader session time.
    pub map: SessionMap,
    /// Best (lowest) round trip in the window.
    pub rtt_ns: i64,
    /// session − local at the newest sample's midpoint (`map.local_ref`).
    pub offset_ns: i64,
    /// Rate of session time vs local time, ppm (`map.rate_ppt / 1e6`).
    pub rate_ppm: f64,
    /// Half the corridor width: a bound on the offset error if every delay is ≥ 0,
    /// including an unknown path asymmetry (≈ rtt/2). The typical error is far smaller.
    pub uncertainty_ns: i64,
    /// Samples in the window.
    pub samples: usize,
    /// How far the estimate is typically off (not a bound): the corridor's noise `δ`
    /// plus the rate's uncertainty over half the window's span. Falls as samples
    /// accumulate; callers wait for it before stepping onto the estimate.
    pub precision_ns: i64,
    /// Local time between the oldest and newest sample in the window.
    pub span_ns: i64,
}

/// An estimate is [`mature`](Estimate::mature) — good enough to *step* a clock onto —
/// once its [`precision_ns`](Estimate::precision_ns) is below this…
pub const MATURE_PRECISION_NS: i64 = 150_000;
/// …or once its window spans this long (a path too jittery ever to get there: step on
/// the best estimate there is, and slew from then on).
pub const MATURE_SPAN_NS: i64 = 8 * SEC;

/// An estimate is [`settled`](Estimate::settled) — good enough to hand to the whole room
/// (a follower that takes over leads with its estimate of the old leader's clock) —
/// once its precision is below this…
pub const SETTLED_PRECISION_NS: i64 = 75_000;
/// …or once its window spans this long.
pub const SETTLED_SPAN_NS: i64 = 30 * SEC;

impl Estimate {
    /// Good enough to become the room's clock: on a LAN at once; over Wi-Fi (40 Hz
    /// pings, 3–23 ms each way) after ~20 s, when it is typically within 50–100 µs.
    pub fn settled(&self) -> bool {
        self.precision_ns <= SETTLED_PRECISION_NS || self.span_ns >= SETTLED_SPAN_NS
    }

    /// Good enough to step onto. A clock stepped onto an estimate that is still off by
    /// milliseconds (a few samples over Wi-Fi) then needs seconds of slewing to pull
    /// in: wait instead. On a LAN this holds from the first estimate.
    pub fn mature(&self) -> bool {
        self.precision_ns <= MATURE_PRECISION_NS || self.span_ns >= MATURE_SPAN_NS
    }
}

/// A validated sample.
#[derive(Clone, Copy, Debug)]
struct Point {
    t1: i64,
    t4: i64,
    mid: i64,
    /// t2 − t1
    fwd: i64,
    /// t3 − t4
    back: i64,
    offset: i64,
    rtt: i64,
}

impl Point {
    fn new(s: Sample, cfg: &SyncConfig) -> Result<Point, RejectReason> {
        if s.t4 < s.t1 || s.t3 < s.t2 {
            return Err(RejectReason::NonCausal);
        }
        let local = s.t4 as i128 - s.t1 as i128;
        let remote = s.t3 as i128 - s.t2 as i128;
        let rtt = local - remote;
        if rtt < 0 {
            return Err(RejectReason::NonCausal);
        }
        if local > cfg.max_rtt_ns as i128 {
            return Err(RejectReason::RttAbsurd);
        }
        let fwd = s.t2 as i128 - s.t1 as i128;
        let back = s.t3 as i128 - s.t4 as i128;
        let offset = (fwd + back).div_euclid(2);
        let (Ok(fwd), Ok(back), Ok(offset)) = (
            i64::try_from(fwd),
            i64::try_from(back),
            i64::try_from(offset),
        ) else {
            return Err(RejectReason::OutOfRange);
        };
        Ok(Point {
            t1: s.t1,
            t4: s.t4,
            mid: s.t1 + ((local / 2) as i64), // local ≤ max_rtt: no overflow
            fwd,
            back,
            offset,
            rtt: rtt as i64, // 0 ≤ rtt ≤ local ≤ max_rtt
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct RttSeen {
    t1: i64,
    mid: i64,
    rtt: i64,
}

/// Estimates the leader's session clock from exchanges with it. Feed every completed
/// exchange to [`handle_sample`](Estimator::handle_sample); read
/// [`estimate`](Estimator::estimate) whenever needed (it is computed on accept, reading
/// is free). Call [`reset`](Estimator::reset) when the leader's session clock stepped.
#[derive(Clone, Debug)]
pub struct Estimator {
    cfg: SyncConfig,
    /// Accepted samples, in arrival order. Pruned in batches (see [`Estimator::prune`]),
    /// so it holds between `window` and `window + window/8` samples.
    window: VecDeque<Point>,
    /// Lower hull of the forward points `(t1, t2 − t1)` and upper hull of the backward
    /// points `(t4, t3 − t4)` of `window`, in absolute coordinates, kept incrementally
    /// while samples arrive in order and nothing leaves.
    lower: Vec<(i64, i64)>,
    upper: Vec<(i64, i64)>,
    hulls_valid: bool,
    /// RTTs of all valid samples recently seen, in arrival order (the gate's memory).
    seen: VecDeque<RttSeen>,
    /// Newest midpoint of any valid sample.
    newest_mid: Option<i64>,
    /// Lowest RTT of `seen`, and `median − min` (the jitter scale), refreshed every
    /// [`STATS_EVERY`] samples (the minimum at once).
    rtt_min: i64,
    jitter: i64,
    stats_age: usize,
    /// Inconsistent samples in a row.
    suspects: Vec<Point>,
    current: Option<Estimate>,
    stats: SyncStats,
    // scratch buffers, reused so that steady state does not allocate
    pts: Vec<(i64, i64)>,
    lower_rel: Vec<(f64, f64)>,
    upper_rel: Vec<(f64, f64)>,
    slopes: Vec<f64>,
    rtt_scratch: Vec<i64>,
}

/// The jitter scale (a median) is refreshed this often; the minimum RTT at once.
const STATS_EVERY: usize = 16;

impl Estimator {
    pub fn new(cfg: SyncConfig) -> Self {
        let cfg = cfg.sanitized();
        let n = cfg.window + cfg.window / 8 + 1;
        Estimator {
            window: VecDeque::with_capacity(n),
            lower: Vec::with_capacity(n),
            upper: Vec::with_capacity(n),
            hulls_valid: false,
            seen: VecDeque::with_capacity(cfg.window + 1),
            newest_mid: None,
            rtt_min: 0,
            jitter: 0,
            stats_age: 0,
            suspects: Vec::new(),
            current: None,
            stats: SyncStats::default(),
            pts: Vec::with_capacity(n),
            lower_rel: Vec::new(),
            upper_rel: Vec::new(),
            slopes: Vec::new(),
            rtt_scratch: Vec::with_capacity(cfg.window + 1),
            cfg,
        }
    }

    /// The (clamped) configuration in use.
    pub fn config(&self) -> &SyncConfig {
        &self.cfg
    }

    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// Forget every sample (the leader's clock stepped, or a new leader).
    pub fn reset(&mut self) {
        self.window.clear();
        self.hulls_valid = false;
        self.seen.clear();
        self.newest_mid = None;
        (self.rtt_min, self.jitter, self.stats_age) = (0, 0, 0);
        self.suspects.clear();
        self.current = None;
    }

    /// `None` until the window holds `min_samples` samples.
    pub fn estimate(&self) -> Option<Estimate> {
        self.current
    }

    /// Judge one exchange; if accepted, update the estimate.
    pub fn handle_sample(&mut self, s: Sample) -> SampleVerdict {
        let v = self.judge(s);
        match v {
            SampleVerdict::Accepted => self.stats.accepted = self.stats.accepted.saturating_add(1),
            SampleVerdict::Rejected(r) => self.stats.count(r),
        }
        v
    }

    fn judge(&mut self, s: Sample) -> SampleVerdict {
        use SampleVerdict::*;
        let p = match Point::new(s, &self.cfg) {
            Ok(p) => p,
            Err(r) => return Rejected(r),
        };
        // `seen` holds every valid sample of the last `window` (a replay of an older one
        // is TooOld, or at worst a harmless copy of a point).
        if self.seen.iter().any(|h| h.t1 == p.t1) || self.suspects.iter().any(|w| w.t1 == p.t1) {
            return Rejected(RejectReason::Duplicate);
        }
        let max_age = self.cfg.max_age_ns as i128;
        if self
            .newest_mid
            .is_some_and(|newest| (p.mid as i128) < newest as i128 - max_age)
        {
            return Rejected(RejectReason::TooOld);
        }
        let newest = self.newest_mid.map_or(p.mid, |n| n.max(p.mid));
        self.newest_mid = Some(newest);

        // The RTT gate's memory holds every valid sample, accepted or not.
        self.seen.push_back(RttSeen {
            t1: p.t1,
            mid: p.mid,
            rtt: p.rtt,
        });
        let mut lost_min = false;
        while self.seen.len() > self.cfg.window
            || self
                .seen
                .front()
                .is_some_and(|h| (h.mid as i128) < newest as i128 - max_age)
        {
            lost_min |= self.seen.pop_front().is_some_and(|h| h.rtt <= self.rtt_min);
        }
        self.stats_age += 1;
        if lost_min || self.stats_age >= STATS_EVERY || self.seen.len() <= STATS_EVERY {
            self.rtt_stats();
        } else if p.rtt < self.rtt_min {
            self.jitter += self.rtt_min - p.rtt; // the median did not move
            self.rtt_min = p.rtt;
        }
        if let Some(gate) = self.rtt_gate() {
            if p.rtt > gate {
                return Rejected(RejectReason::RttInflated);
            }
        }

        if let Some(est) = self.current {
            if self.inconsistent(&p, &est) {
                self.suspects.push(p);
                if self.suspects.len() < self.cfg.step_after {
                    return Rejected(RejectReason::Inconsistent);
                }
                // The leader's clock stepped: start over from the samples that saw it.
                self.stats.resyncs = self.stats.resyncs.saturating_add(1);
                self.window.clear();
                self.window.extend(self.suspects.drain(..));
                self.hulls_valid = false;
                self.prune();
                self.recompute();
                return Accepted;
            }
        }
        self.suspects.clear();
        self.window.push_back(p);
        self.add_to_hulls(&p);
        self.prune();
        self.recompute();
        Accepted
    }

    /// Refresh `rtt_min` and `jitter` (median − min) from the RTTs recently seen.
    fn rtt_stats(&mut self) {
        self.stats_age = 0;
        self.rtt_scratch.clear();
        self.rtt_scratch.extend(self.seen.iter().map(|h| h.rtt));
        let n = self.rtt_scratch.len();
        if n == 0 {
            (self.rtt_min, self.jitter) = (0, 0);
            return;
        }
        let (below, &mut median, _) = self.rtt_scratch.select_nth_unstable(n / 2);
        let min = below.iter().copied().fold(median, i64::min);
        (self.rtt_min, self.jitter) = (min, median - min);
    }

    /// `None` while the gate is open (too few samples seen).
    fn rtt_gate(&self) -> Option<i64> {
        if self.seen.len() < self.cfg.gate_after {
            return None;
        }
        let spread =
            (self.jitter as f64 * self.cfg.rtt_spread_k).min(self.cfg.max_rtt_ns as f64) as i64;
        Some(self.rtt_min + spread.max(self.cfg.rtt_margin_ns))
    }

    fn inconsistent(&self, p: &Point, est: &Estimate) -> bool {
        let theta = map_at(&est.map, p.mid) - p.mid as i128;
        let resid = (p.offset as i128 - theta).abs();
        let gap = (p.mid as i128 - est.map.local_ref as i128).abs();
        let allowed = p.rtt as i128 / 2
            + est.uncertainty_ns as i128
            + self.cfg.step_threshold_ns as i128
            + gap / 1000;
        resid > allowed
    }

    /// Extend the hulls by one sample if it is the newest in both coordinates (the usual
    /// case: Andrew's monotone chain, amortized O(1)); otherwise mark them for a rebuild.
    fn add_to_hulls(&mut self, p: &Point) {
        let f = (p.t1, p.fwd);
        let g = (p.t4, p.back);
        let in_order = |h: &Vec<(i64, i64)>, x: i64| h.last().is_none_or(|l| l.0 < x);
        if self.hulls_valid && in_order(&self.lower, f.0) && in_order(&self.upper, g.0) {
            push_lower(&mut self.lower, f);
            push_upper(&mut self.upper, g);
        } else {
            self.hulls_valid = false;
        }
    }

    /// Drop samples beyond `window` or older than `max_age`, in batches of an eighth of
    /// either: the hulls are rebuilt only when a batch leaves, not for every sample.
    fn prune(&mut self) {
        let Some(newest) = self.newest_mid else {
            return;
        };
        let slack_n = (self.cfg.window / 8).max(1);
        let max_age = self.cfg.max_age_ns as i128;
        let slack_age = max_age / 8;
        let too_old = |w: &Point, limit: i128| (w.mid as i128) < newest as i128 - limit;
        // Arrival order is t4 order (our own clock), and mid ≥ t4 − max_rtt/2, so the
        // front is the oldest to within a round trip.
        let due = self.window.len() > self.cfg.window + slack_n
            || self
                .window
                .front()
                .is_some_and(|w| too_old(w, max_age + slack_age));
        if !due {
            return;
        }
        self.window.retain(|w| !too_old(w, max_age));
        while self.window.len() > self.cfg.window {
            self.window.pop_front();
        }
        self.hulls_valid = false;
    }

    fn rebuild_hulls(&mut self) {
        self.pts.clear();
        self.pts.extend(self.window.iter().map(|w| (w.t1, w.fwd)));
        self.pts.sort(); // stable: finds the runs of a nearly sorted window in linear time
        self.lower.clear();
        for &p in &self.pts {
            if self.lower.last().is_some_and(|l| l.0 == p.0) {
                continue; // same x, higher y
            }
            push_lower(&mut self.lower, p);
        }
        self.pts.clear();
        self.pts.extend(self.window.iter().map(|w| (w.t4, w.back)));
        self.pts.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        self.upper.clear();
        for &p in &self.pts {
            if self.upper.last().is_some_and(|l| l.0 == p.0) {
                continue; // same x, lower y
            }
            push_upper(&mut self.upper, p);
        }
        self.hulls_valid = true;
    }

    fn recompute(&mut self) {
        self.current = None;
        let n = self.window.len();
        if n < self.cfg.min_samples {
            return;
        }
        if !self.hulls_valid {
            self.rebuild_hulls();
        }
        let (mut lo, mut hi, mut min_rtt) = (i64::MAX, i64::MIN, i64::MAX);
        let mut newest = self.window[0];
        for w in &self.window {
            (lo, hi, min_rtt) = (lo.min(w.mid), hi.max(w.mid), min_rtt.min(w.rtt));
            if w.mid > newest.mid {
                newest = *w;
            }
        }
        // Coordinates relative to the newest sample: |x| ≤ max_age + max_rtt (pruned);
        // y is small unless the window is absurdly inconsistent (and then the estimate
        // is garbage, not a panic).
        let (x0, y0) = (newest.mid, newest.offset);
        let rel = |(x, y): (i64, i64)| {
            (
                (x as i128 - x0 as i128) as f64,
                (y as i128 - y0 as i128) as f64,
            )
        };
        self.lower_rel.clear();
        self.lower_rel.extend(self.lower.iter().copied().map(rel));
        self.upper_rel.clear();
        self.upper_rel.extend(self.upper.iter().copied().map(rel));
        let (lower, upper) = (&self.lower_rel, &self.upper_rel);
        let width = |r: f64| {
            let (a, b) = corridor(lower, upper, r);
            a - b
        };

        // r̂: the widest corridor. W is concave and piecewise linear with breakpoints at
        // the hulls' edge slopes, so its maximum is at one of them or at the clamp:
        // a binary search over the sorted breakpoints.
        let max_rate = self.cfg.max_rate_ppm * 1e-6;
        self.slopes.clear();
        self.slopes.extend(
            lower
                .windows(2)
                .chain(upper.windows(2))
                .map(slope)
                .filter(|r| r.abs() < max_rate),
        );
        self.slopes.push(-max_rate);
        self.slopes.push(max_rate);
        self.slopes.sort_by(f64::total_cmp);
        let (mut i, mut j) = (0, self.slopes.len() - 1);
        while i < j {
            let m = (i + j) / 2;
            if width(self.slopes[m]) < width(self.slopes[m + 1]) {
                i = m + 1;
            } else {
                j = m;
            }
        }
        let r_hat = self.slopes[i];
        let best = width(r_hat);

        // Every rate whose corridor is within δ of the widest fits the data as well as
        // its noise allows: [r_lo, r_hi]. Take its centre, shrunk towards 0. W is linear
        // between breakpoints: walk out from the peak, interpolate the crossing.
        let delta = self.jitter as f64 / n as f64;
        let floor = best - delta;
        let slopes = &self.slopes;
        let edge = |dir: isize| {
            let (mut k, mut w_prev) = (i, best);
            loop {
                let next = k as isize + dir;
                if next < 0 || next as usize >= slopes.len() {
                    return slopes[k];
                }
                let w = width(slopes[next as usize]);
                if w < floor {
                    let (a, b) = (slopes[k], slopes[next as usize]);
                    return a + (b - a) * ((w_prev - floor) / (w_prev - w));
                }
                (k, w_prev) = (next as usize, w);
            }
        };
        let (r_lo, r_hi) = if hi > lo {
            (edge(-1), edge(1))
        } else {
            (-max_rate, max_rate)
        };
        let sigma_r = (r_hi - r_lo) / 2.0;
        let sigma_p = self.cfg.rate_prior_ppm * 1e-6;
        let r = (r_lo + r_hi) / 2.0 * sigma_p * sigma_p / (sigma_p * sigma_p + sigma_r * sigma_r);
        let (a, b) = corridor(lower, upper, r);
        let theta0 = (a + b) / 2.0;
        let offset = sat64(y0 as i128 + f64_to_i128(theta0.round()));
        let rate_ppt = (r * 1e12).round() as i64;
        let map = SessionMap {
            local_ref: x0,
            session_ref: sat64(x0 as i128 + offset as i128),
            rate_ppt,
        };
        self.current = Some(Estimate {
            map,
            rtt_ns: min_rtt,
            offset_ns: offset,
            rate_ppm: rate_ppt as f64 * 1e-6,
            uncertainty_ns: f64_to_i128(((a - b) / 2.0).max(0.0).round()).clamp(0, i64::MAX as i128)
                as i64,
            samples: n,
            precision_ns: (delta + sigma_r * (hi - lo) as f64 / 2.0).min(1e15) as i64,
            span_ns: hi.saturating_sub(lo),
        });
    }
}

fn slope(e: &[(f64, f64)]) -> f64 {
    (e[1].1 - e[0].1) / (e[1].0 - e[0].0)
}

/// `(A(r), B(r))`: the corridor's top and bottom at x = 0 for rate `r`.
fn corridor(lower: &[(f64, f64)], upper: &[(f64, f64)], r: f64) -> (f64, f64) {
    let (mut a, mut b) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in lower {
        a = a.min(y - r * x);
    }
    for &(x, y) in upper {
        b = b.max(y - r * x);
    }
    (a, b)
}

/// `(b − a) × (c − a)`, exact: within a window |dx| ≤ 2·(max_age + max_rtt) < 2⁴⁴ and
/// |dy| < 2⁶⁵, so each product is below 2¹⁰⁹ and the difference fits an `i128`.
fn cross(a: (i64, i64), b: (i64, i64), c: (i64, i64)) -> i128 {
    let (abx, aby) = (b.0 as i128 - a.0 as i128, b.1 as i128 - a.1 as i128);
    let (acx, acy) = (c.0 as i128 - a.0 as i128, c.1 as i128 - a.1 as i128);
    abx * acy - aby * acx
}

/// One step of Andrew's monotone chain for a lower hull (`p` right of every vertex).
fn push_lower(h: &mut Vec<(i64, i64)>, p: (i64, i64)) {
    while h.len() >= 2 && cross(h[h.len() - 2], h[h.len() - 1], p) <= 0 {
        h.pop();
    }
    h.push(p);
}

/// One step of Andrew's monotone chain for an upper hull.
fn push_upper(h: &mut Vec<(i64, i64)>, p: (i64, i64)) {
    while h.len() >= 2 && cross(h[h.len() - 2], h[h.len() - 1], p) >= 0 {
        h.pop();
    }
    h.push(p);
}

fn sat64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// `as` saturates (and maps NaN to 0); spelled out for the reader.
fn f64_to_i128(v: f64) -> i128 {
    v as i128
}

/// `map.to_session(local)` without wrapping.
fn map_at(map: &SessionMap, local: i64) -> i128 {
    let d = local as i128 - map.local_ref as i128;
    (map.session_ref as i128 + d).saturating_add(d.saturating_mul(map.rate_ppt as i128) / PPT)
}

// ---------------------------------------------------------------------------------------
// Slewer
// ---------------------------------------------------------------------------------------

/// Slewer settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SlewConfig {
    /// Largest rate correction used to remove a phase error, ppm.
    pub max_slew_ppm: f64,
    /// Time constant of the phase error's decay (when below the slew limit).
    pub time_constant_ns: i64,
    /// Largest |rate| taken from a target, ppm (a target beyond is clamped).
    pub max_rate_ppm: f64,
}

impl Default for SlewConfig {
    fn default() -> Self {
        SlewConfig {
            max_slew_ppm: 500.0,
            time_constant_ns: 1_500_000_000,
            max_rate_ppm: 10_000.0,
        }
    }
}

/// Turns a (jumpy) target map into a published map that never steps: it slews.
#[derive(Clone, Debug)]
pub struct Slewer {
    max_slew_ppt: i128,
    max_rate_ppt: i128,
    tau: i128,
    published: Option<SessionMap>,
    last_now: Option<i64>,
    last_dt: i128,
}

impl Slewer {
    pub fn new(cfg: SlewConfig) -> Self {
        let ppm_to_ppt = |ppm: f64, dflt: f64| {
            let ppm = if ppm.is_finite() && ppm >= 0.0 {
                ppm.min(100_000.0)
            } else {
                dflt
            };
            (ppm * 1e6).round() as i128
        };
        Slewer {
            max_slew_ppt: ppm_to_ppt(cfg.max_slew_ppm, 500.0),
            max_rate_ppt: ppm_to_ppt(cfg.max_rate_ppm, 10_000.0),
            tau: cfg.time_constant_ns.clamp(1_000_000, 3600 * SEC) as i128,
            published: None,
            last_now: None,
            last_dt: 0,
        }
    }

    /// Called every control tick (~50 ms) with local now and the latest estimate's map.
    /// Returns the map to publish: continuous at `now` with the previous one (exactly)
    /// unless `allow_step` (the first map after joining) or nothing was published yet.
    pub fn step(&mut self, now_local: i64, target: &SessionMap, allow_step: bool) -> SessionMap {
        let target_rate = (target.rate_ppt as i128).clamp(-self.max_rate_ppt, self.max_rate_ppt);
        if let Some(last) = self.last_now {
            let dt = now_local as i128 - last as i128;
            if dt > 0 {
                self.last_dt = dt.min(3600 * SEC as i128);
            }
        }
        self.last_now = Some(now_local);
        let map = match self.published {
            Some(p) if !allow_step => {
                let s_now = p.to_session(now_local);
                let err = map_at(target, now_local) - s_now as i128;
                let tau = self.tau.max(self.last_dt);
                let corr =
                    (err.saturating_mul(PPT) / tau).clamp(-self.max_slew_ppt, self.max_slew_ppt);
                SessionMap {
                    local_ref: now_local,
                    session_ref: s_now,
                    rate_ppt: (target_rate + corr) as i64,
                }
            }
            _ => SessionMap {
                local_ref: now_local,
                session_ref: sat64(map_at(target, now_local)),
                rate_ppt: target_rate as i64,
            },
        };
        self.published = Some(map);
        map
    }

    /// The last published map.
    pub fn current(&self) -> Option<SessionMap> {
        self.published
    }

    /// Take `map` as the published map (e.g. the clock a node ran before it started
    /// following), so that the next [`step`](Slewer::step) slews away from it.
    pub fn adopt(&mut self, map: SessionMap) {
        // the last tick's interval says nothing about the next one any more
        (self.last_now, self.last_dt) = (None, 0);
        self.published = Some(SessionMap {
            rate_ppt: (map.rate_ppt as i128).clamp(
                -(self.max_rate_ppt + self.max_slew_ppt),
                self.max_rate_ppt + self.max_slew_ppt,
            ) as i64,
            ..map
        });
    }

    /// Forget the published map: the next `step` starts from the target.
    pub fn reset(&mut self) {
        self.published = None;
        self.last_now = None;
        self.last_dt = 0;
    }

    /// Phase error (target − published) at `now_local` in ns, for logs/status (0 before
    /// anything was published).
    pub fn error_ns(&self, now_local: i64, target: &SessionMap) -> i64 {
        match self.published {
            Some(p) => sat64(map_at(target, now_local) - map_at(&p, now_local)),
            None => 0,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: i64 = 1_000_000;
    const US: i64 = 1_000;

    /// A perfect exchange: leader = local + off (+ rate), delays d1/d2, hold 10 µs.
    fn exchange(t1: i64, off: i64, rate_ppm: f64, d1: i64, d2: i64) -> Sample {
        let leader = |l: i64| l + off + (l as f64 * rate_ppm * 1e-6).round() as i64;
        let t2 = leader(t1 + d1);
        let t3 = leader(t1 + d1 + 10 * US);
        Sample {
            t1,
            t2,
            t3,
            t4: t1 + d1 + 10 * US + d2,
        }
    }

    fn feed(e: &mut Estimator, n: usize, start: i64, every: i64, off: i64, rate: f64) {
        for i in 0..n as i64 {
            let v = e.handle_sample(exchange(start + i * every, off, rate, 100 * US, 100 * US));
            assert_eq!(v, SampleVerdict::Accepted, "sample {i}");
        }
    }

    #[test]
    fn rejects_non_causal() {
        let mut e = Estimator::new(SyncConfig::default());
        let r = |e: &mut Estimator, s| e.handle_sample(s);
        let nc = SampleVerdict::Rejected(RejectReason::NonCausal);
        assert_eq!(
            r(
                &mut e,
                Sample {
                    t1: 100,
                    t2: 5,
                    t3: 6,
                    t4: 99
                }
            ),
            nc,
            "t4 < t1"
        );
        assert_eq!(
            r(
                &mut e,
                Sample {
                    t1: 100,
                    t2: 7,
                    t3: 6,
                    t4: 200
                }
            ),
            nc,
            "t3 < t2"
        );
        // leader held it longer than our whole round trip
        assert_eq!(
            r(
                &mut e,
                Sample {
                    t1: 100,
                    t2: 0,
                    t3: 500,
                    t4: 200
                }
            ),
            nc,
            "negative rtt"
        );
        assert_eq!(e.stats().non_causal, 3);
        assert!(e.estimate().is_none());
    }

    #[test]
    fn rejects_absurd_and_out_of_range() {
        let mut e = Estimator::new(SyncConfig::default());
        let s = Sample {
            t1: 0,
            t2: 10,
            t3: 20,
            t4: 2 * SEC,
        };
        assert_eq!(
            e.handle_sample(s),
            SampleVerdict::Rejected(RejectReason::RttAbsurd)
        );
        let s = Sample {
            t1: i64::MIN,
            t2: i64::MAX - 10,
            t3: i64::MAX - 5,
            t4: i64::MIN + 100,
        };
        assert_eq!(
            e.handle_sample(s),
            SampleVerdict::Rejected(RejectReason::OutOfRange)
        );
        let s = Sample {
            t1: 0,
            t2: i64::MIN,
            t3: i64::MAX,
            t4: 10,
        };
        assert_eq!(
            e.handle_sample(s),
            SampleVerdict::Rejected(RejectReason::NonCausal)
        );
    }

    #[test]
    fn rejects_duplicate_and_too_old() {
        let mut e = Estimator::new(SyncConfig::default());
        let s = exchange(100 * SEC, 5 * MS, 0.0, 100 * US, 100 * US);
        assert_eq!(e.handle_sample(s), SampleVerdict::Accepted);
        assert_eq!(
            e.handle_sample(s),
            SampleVerdict::Rejected(RejectReason::Duplicate)
        );
        let later = exchange(300 * SEC, 5 * MS, 0.0, 100 * US, 100 * US);
        assert_eq!(e.handle_sample(later), SampleVerdict::Accepted);
        let stale = exchange(200 * SEC, 5 * MS, 0.0, 100 * US, 100 * US); // max_age is 60 s
        assert_eq!(
            e.handle_sample(stale),
            SampleVerdict::Rejected(RejectReason::TooOld)
        );
        // slightly out of order is fine
        let ooo = exchange(299 * SEC, 5 * MS, 0.0, 100 * US, 100 * US);
        assert_eq!(e.handle_sample(ooo), SampleVerdict::Accepted);
    }

    #[test]
    fn rejects_inflated_rtt_once_the_gate_has_history() {
        let mut e = Estimator::new(SyncConfig::default());
        feed(&mut e, 10, SEC, 200 * MS, 0, 0.0);
        let slow = exchange(5 * SEC, 0, 0.0, 100 * US, 5 * MS);
        assert_eq!(
            e.handle_sample(slow),
            SampleVerdict::Rejected(RejectReason::RttInflated)
        );
        let ok = exchange(5 * SEC + 200 * MS, 0, 0.0, 300 * US, 100 * US);
        assert_eq!(
            e.handle_sample(ok),
            SampleVerdict::Accepted,
            "within the 500 µs margin"
        );
        // the gate opens only after gate_after samples: early samples all count
        let mut e = Estimator::new(SyncConfig::default());
        e.handle_sample(exchange(SEC, 0, 0.0, 100 * US, 100 * US));
        assert_eq!(
            e.handle_sample(exchange(2 * SEC, 0, 0.0, 100 * US, 50 * MS)),
            SampleVerdict::Accepted
        );
    }

    #[test]
    fn estimate_needs_min_samples_then_is_exact_for_perfect_samples() {
        let off = 987_654_321;
        let rate = 150.0;
        let mut e = Estimator::new(SyncConfig::default());
        let start = 1_000_000 * SEC; // ~11.6 days of uptime
        feed(&mut e, 7, start, 200 * MS, off, rate);
        assert!(e.estimate().is_none());
        feed(&mut e, 20, start + 7 * 200 * MS, 200 * MS, off, rate);
        let est = e.estimate().unwrap();
        assert_eq!(est.samples, 27);
        assert!(
            (est.rtt_ns - 200 * US).abs() <= 5,
            "rtt {} (the 10 µs hold is 150 ppm longer in leader time)",
            est.rtt_ns
        );
        assert!((est.rate_ppm - rate).abs() < 0.01, "rate {}", est.rate_ppm);
        // ≈ the one-way delay (100 µs, seen 150 ppm longer by the leader's clock)
        assert!(
            (est.uncertainty_ns - 100 * US).abs() <= 20,
            "{}",
            est.uncertainty_ns
        );
        for l in [est.map.local_ref, est.map.local_ref + 2 * SEC] {
            let truth = l + off + (l as f64 * rate * 1e-6).round() as i64;
            assert!(
                (est.map.to_session(l) - truth).abs() <= 2,
                "at {l}: {} vs {truth}",
                est.map.to_session(l)
            );
        }
    }

    #[test]
    fn asymmetry_biases_by_half_and_stays_within_uncertainty() {
        let mut e = Estimator::new(SyncConfig::default());
        for i in 0..30 {
            let t1 = 10 * SEC + i * 200 * MS;
            e.handle_sample(exchange(t1, 42 * MS, 0.0, 100 * US, 300 * US));
        }
        let est = e.estimate().unwrap();
        assert!(
            (est.offset_ns - (42 * MS - 100 * US)).abs() <= 2,
            "{}",
            est.offset_ns
        );
        assert!(est.uncertainty_ns >= 100 * US);
    }

    #[test]
    fn clock_step_without_reset_resyncs_after_step_after_samples() {
        let mut e = Estimator::new(SyncConfig::default());
        feed(&mut e, 20, SEC, 200 * MS, 0, 0.0);
        let t = SEC + 20 * 200 * MS;
        for i in 0..2 {
            let v = e.handle_sample(exchange(t + i * 200 * MS, 50 * MS, 0.0, 100 * US, 100 * US));
            assert_eq!(v, SampleVerdict::Rejected(RejectReason::Inconsistent));
        }
        let v = e.handle_sample(exchange(t + 2 * 200 * MS, 50 * MS, 0.0, 100 * US, 100 * US));
        assert_eq!(v, SampleVerdict::Accepted);
        assert_eq!(e.stats().resyncs, 1);
        assert!(e.estimate().is_none(), "3 samples < min_samples");
        feed(&mut e, 5, t + 3 * 200 * MS, 200 * MS, 50 * MS, 0.0);
        assert!((e.estimate().unwrap().offset_ns - 50 * MS).abs() <= 2);
        // one stray sample is only rejected, the window survives
        let v = e.handle_sample(exchange(t + 9 * 200 * MS, 0, 0.0, 100 * US, 100 * US));
        assert_eq!(v, SampleVerdict::Rejected(RejectReason::Inconsistent));
        feed(&mut e, 1, t + 10 * 200 * MS, 200 * MS, 50 * MS, 0.0);
        assert_eq!(e.estimate().unwrap().samples, 9);
    }

    #[test]
    fn reset_forgets() {
        let mut e = Estimator::new(SyncConfig::default());
        feed(&mut e, 10, SEC, 200 * MS, 0, 0.0);
        assert!(e.estimate().is_some());
        e.reset();
        assert!(e.estimate().is_none());
        // the same t1 is no longer a duplicate
        feed(&mut e, 1, SEC, 200 * MS, 7, 0.0);
    }

    #[test]
    fn window_is_bounded() {
        // pruned in batches of an eighth: window..=window + window/8 samples
        let mut e = Estimator::new(SyncConfig {
            window: 16,
            ..Default::default()
        });
        feed(&mut e, 100, SEC, 200 * MS, 0, 0.0);
        for n in [100, 101, 102, 103] {
            feed(&mut e, 1, SEC + n * 200 * MS, 200 * MS, 0, 0.0);
            let k = e.estimate().unwrap().samples;
            assert!((16..=18).contains(&k), "{k}");
        }
        let mut e = Estimator::new(SyncConfig::default());
        feed(&mut e, 100, SEC, SEC, 0, 0.0); // 1 s apart: max_age (60 s, + 7.5 s) binds
        let k = e.estimate().unwrap().samples;
        assert!((61..=68).contains(&k), "{k}");
    }

    #[test]
    fn slewer_steps_once_then_slews_continuously() {
        let mut s = Slewer::new(SlewConfig::default());
        assert_eq!(s.current(), None);
        let target = SessionMap {
            local_ref: 0,
            session_ref: 1_000 * MS,
            rate_ppt: 100_000_000,
        };
        let m = s.step(10 * SEC, &target, false); // nothing published yet: adopt the target
        assert_eq!(m.to_session(10 * SEC), target.to_session(10 * SEC));
        let jumped = SessionMap {
            session_ref: target.session_ref + 2 * MS,
            ..target
        };
        let mut prev = m;
        let mut now = 10 * SEC;
        let mut max_corr = 0i64;
        for _ in 0..400 {
            now += 50 * MS;
            let m = s.step(now, &jumped, false);
            assert!(
                (m.to_session(now) - prev.to_session(now)).abs() <= 1,
                "stepped at {now}"
            );
            max_corr = max_corr.max((m.rate_ppt - jumped.rate_ppt).abs());
            prev = m;
        }
        assert!(max_corr <= 500_000_000, "slew {max_corr} ppt");
        assert!(
            max_corr >= 499_000_000,
            "slew limit reached for a 2 ms error"
        );
        assert!(
            s.error_ns(now, &jumped).abs() <= 1_000,
            "converged: {}",
            s.error_ns(now, &jumped)
        );
        // 2 ms at ≤ 500 ppm takes ≥ 4 s: after 2 s at most 1 ms can have been removed
        let mut s2 = Slewer::new(SlewConfig::default());
        s2.step(0, &target, true);
        for i in 1..=40 {
            s2.step(i * 50 * MS, &jumped, false);
        }
        assert!(s2.error_ns(2 * SEC, &jumped) >= MS - 1_000);
        // allow_step jumps
        let m = s.step(now + 50 * MS, &target, true);
        assert_eq!(
            m.to_session(now + 50 * MS),
            target.to_session(now + 50 * MS)
        );
    }

    #[test]
    fn slewer_late_tick_does_not_overshoot() {
        let mut s = Slewer::new(SlewConfig::default());
        let target = SessionMap::IDENTITY;
        s.adopt(SessionMap {
            local_ref: 0,
            session_ref: -100 * US,
            rate_ppt: 0,
        });
        s.step(0, &target, false);
        s.step(10 * SEC, &target, false); // learns that ticks are 10 s apart
        let e1 = s.error_ns(10 * SEC, &target);
        s.step(20 * SEC, &target, false);
        let e2 = s.error_ns(20 * SEC, &target);
        // correction e1/10 s over 10 s removes e1, without overshoot
        assert!(e1.abs() > 10 * US && e2.abs() <= 10, "e1 {e1}, e2 {e2}");
    }

    proptest! {
        #[test]
        fn arbitrary_samples_never_panic(samples in proptest::collection::vec(
            (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>(), any::<bool>(), 0i64..2_000_000_000, -2_000_000i64..2_000_000), 1..80)) {
            let mut e = Estimator::new(SyncConfig { min_samples: 2, gate_after: 2, ..Default::default() });
            let mut sl = Slewer::new(SlewConfig::default());
            for (t1, t2, t3, t4, plausible, rtt, hold) in samples {
                // half the time fully arbitrary, half the time causal-looking near the extremes
                let s = if plausible {
                    let t4 = t1.saturating_add(rtt);
                    Sample { t1, t2, t3: t2.saturating_add(hold.abs()), t4 }
                } else {
                    Sample { t1, t2, t3, t4 }
                };
                let _ = e.handle_sample(s);
                if let Some(est) = e.estimate() {
                    prop_assert!(est.uncertainty_ns >= 0);
                    prop_assert!(est.rate_ppm.abs() <= 2000.0 + 1e-6);
                    let _ = est.map.to_session(t4);
                    let _ = est.map.to_local(t2);
                    let m = sl.step(t4, &est.map, false);
                    let _ = sl.error_ns(t1, &est.map);
                    let _ = m.to_local(t3);
                }
            }
        }

        #[test]
        fn wild_offsets_in_one_window_never_panic(
            base in any::<i64>(),
            steps in proptest::collection::vec((0i64..300_000_000, 0i64..1_500_000_000, any::<i64>(), 0i64..1_000_000), 1..120)) {
            // timestamps that pass the causality gates, close enough in local time to
            // share a window, with offsets anywhere in i64: the hull and corridor math
            // sees |dy| up to 2^64
            let mut e = Estimator::new(SyncConfig { min_samples: 2, gate_after: 1_000, ..Default::default() });
            let mut sl = Slewer::new(SlewConfig::default());
            let mut t1 = base;
            for (dt, rtt, t2, hold) in steps {
                t1 = t1.saturating_add(dt);
                let s = Sample { t1, t2, t3: t2.saturating_add(hold), t4: t1.saturating_add(rtt) };
                let _ = e.handle_sample(s);
                if let Some(est) = e.estimate() {
                    prop_assert!(est.uncertainty_ns >= 0 && est.rate_ppm.abs() <= 2000.0 + 1e-6);
                    let m = sl.step(s.t4, &est.map, false);
                    let _ = (m.to_session(s.t4), est.map.to_local(t2), sl.error_ns(s.t1, &est.map));
                }
            }
        }

        #[test]
        fn slewer_is_continuous(steps in proptest::collection::vec(
            (1i64..2_000_000_000, -10_000_000_000i64..10_000_000_000, -1_000_000_000i64..1_000_000_000), 1..100)) {
            let mut s = Slewer::new(SlewConfig::default());
            let mut now = 123_456_789_000_000i64;
            let mut prev = s.step(now, &SessionMap::IDENTITY, true);
            for (dt, off, rate) in steps {
                now += dt;
                let target = SessionMap { local_ref: now, session_ref: now + off, rate_ppt: rate };
                let m = s.step(now, &target, false);
                prop_assert!((m.to_session(now) - prev.to_session(now)).abs() <= 1);
                prop_assert!((m.rate_ppt as i128 - rate.clamp(-10_000_000_000, 10_000_000_000) as i128).abs() <= 500_000_000);
                prev = m;
            }
        }
    }
}
