//! Maps output frames to the node's monotonic clock and tracks the card's real rate.
//!
//! Each callback gives a noisy measurement `m_k` of when frame `F_k` (the first frame
//! of the buffer) reaches the DAC. A second-order delay-locked loop (F. Adriaensen,
//! "Using a DLL to filter time", the filter JACK uses) keeps a smooth line
//! `time(F) = base + (F − F_base) · ns_per_frame`:
//!
//! ```text
//! e        = m_k − time(F_k)
//! base    ← time(F_k) + b·e            b = √2·ω,  ω = 2π·B·Δt
//! ns/frame ← ns/frame + c·e / ΔF       c = ω²
//! ```
//!
//! Callback timestamps are noisy and skewed late (a callback that wakes late reads a
//! late clock), with occasional outliers of a millisecond or more. The error fed to
//! the loop is therefore clipped to `max(3·mean|e|, 30 µs)`; only
//! [`RESET_AFTER`] errors in a row beyond [`RESET_NS`] restart the loop.
//!
//! Acquisition: for the first [`ACQUIRE_S`] seconds after a (re)start the card is
//! assumed to run at its nominal rate and only the offset is estimated (a clipped
//! running mean), which locks fast without following single outliers; then the DLL
//! takes over with a narrow bandwidth and learns the real rate.
//!
//! `ns_per_frame` converges to the card's rate *as seen by this node's clock* (a card
//! that runs 30 ppm slow, or a node clock that runs fast, both show up here). The
//! bandwidth `B` is narrow ([`DLL_BW_HZ`]) to reject callback jitter and wander, and
//! wide ([`DLL_WIDE_BW_HZ`]) only while the loop visibly lags.
//! An error beyond [`RESET_NS`] (an xrun, a stalled device) restarts the loop.
//!
//! Pure: no clock reads, no allocation.

/// Error beyond which the loop restarts from the measurement, when [`RESET_AFTER`]
/// errors in a row all lie beyond it on the same side: a step in the card's timing
/// (an xrun or a server that lost time), which a restart follows at once where the
/// loop would take seconds to slew and misplace every click meanwhile. Single late
/// callbacks (a millisecond or more on a loaded box) lie on the late side only and
/// are rarely that many in a row.
pub const RESET_NS: f64 = 1_000_000.0;
/// Seconds of least-squares acquisition before the DLL takes over.
pub const ACQUIRE_S: f64 = 0.5;
/// Measurements ignored at the start of acquisition (buffer prefill).
pub const ACQUIRE_SKIP_S: f64 = 0.1;
/// Loop bandwidth once acquired. Callback timestamps do not only jitter: on a busy or
/// virtualised box they wander by ±100 µs over about a second, and a wider loop follows
/// that wander into the click grid (0.1 Hz moved clicks by up to 2.5 samples between
/// beats on the JACK harness; 0.02 Hz by at most 0.55, replayed from recorded callback
/// timings). The price: a card's real rate offset (tens of ppm) is learned over tens
/// of seconds rather than a few.
pub const DLL_BW_HZ: f64 = 0.02;
/// Bandwidth while the loop lags: the mean error over [`BIAS_TAU_S`] beyond
/// [`BIAS_NS`] is a tracking error (a card hundreds of ppm off), which the narrow loop
/// would take minutes to learn.
pub const DLL_WIDE_BW_HZ: f64 = 0.1;
const BIAS_NS: f64 = 80_000.0;
const BIAS_TAU_S: f64 = 1.0;
/// Consecutive same-side errors beyond [`RESET_NS`] that restart the loop.
pub const RESET_AFTER: u32 = 8;
/// The card's rate is trusted within ±2000 ppm of nominal.
const MAX_PPM: f64 = 2000.0;

#[derive(Clone, Copy, Debug)]
pub struct FrameClock {
    nominal_npf: f64,
    origin: i64,
    base: f64,
    base_frame: u64,
    npf: f64,
    locked_frames: u64,
    init: bool,
    resets: u64,
    mean_abs_e: f64,
    /// Mean (signed) error over about [`BIAS_TAU_S`].
    mean_e: f64,
    big_errors: u32,
    /// Side of the errors counted in `big_errors` (true: measurements later than the line).
    big_late: bool,
    /// Acquisition state: [count, mean offset from the nominal line].
    ls: [f64; 2],
    acq_start: u64,
}

impl FrameClock {
    pub fn new(sample_rate: u32) -> FrameClock {
        let nominal = 1e9 / sample_rate as f64;
        FrameClock {
            nominal_npf: nominal,
            origin: 0,
            base: 0.0,
            base_frame: 0,
            npf: nominal,
            locked_frames: 0,
            init: false,
            resets: 0,
            mean_abs_e: 0.0,
            mean_e: 0.0,
            big_errors: 0,
            big_late: false,
            ls: [0.0; 2],
            acq_start: 0,
        }
    }

    /// Feed the measured DAC time of `frame`; returns the filtered time of `frame`.
    pub fn update(&mut self, frame: u64, measured: i64) -> i64 {
        if !self.init || frame <= self.base_frame {
            self.restart(frame, measured);
            return measured;
        }
        let seconds_locked = self.locked_frames as f64 * self.nominal_npf * 1e-9;
        if seconds_locked < ACQUIRE_S {
            return self.acquire(frame, measured);
        }
        let df = (frame - self.base_frame) as f64;
        let pred = self.base + df * self.npf;
        let e = (measured - self.origin) as f64 - pred;
        if e.abs() > RESET_NS {
            if self.big_error(e > 0.0) {
                self.resets += 1;
                self.restart(frame, measured);
                return measured;
            }
        } else {
            self.big_errors = 0;
        }
        let clip = (3.0 * self.mean_abs_e).max(30_000.0);
        let e_used = e.clamp(-clip, clip);
        self.mean_abs_e += 0.05 * (e.abs().min(clip) - self.mean_abs_e);
        let e = e_used;
        // a loop that lags (a card far off its nominal rate) shows a bias, not noise:
        // widen until it has caught up
        let a = (df * self.npf * 1e-9 / BIAS_TAU_S).min(1.0);
        self.mean_e += a * (e - self.mean_e);
        let bw = if self.mean_e.abs() > BIAS_NS {
            DLL_WIDE_BW_HZ
        } else {
            DLL_BW_HZ
        };
        let omega = 2.0 * std::f64::consts::PI * bw * df * self.npf * 1e-9;
        let b = std::f64::consts::SQRT_2 * omega;
        let c = omega * omega;
        self.base = pred + b * e;
        self.base_frame = frame;
        self.npf += c * e / df;
        let lo = self.nominal_npf * (1.0 - MAX_PPM * 1e-6);
        let hi = self.nominal_npf * (1.0 + MAX_PPM * 1e-6);
        self.npf = self.npf.clamp(lo, hi);
        self.locked_frames += df as u64;
        // keep the f64 small: move the origin every ~100 s
        if self.base > 1e11 {
            let shift = self.base.floor();
            self.origin += shift as i64;
            self.base -= shift;
        }
        self.origin + self.base.round() as i64
    }

    /// Acquisition: the card runs at its nominal rate until the DLL learns better, so
    /// only the offset is estimated, as the clipped mean of `measured − x·nominal`.
    fn acquire(&mut self, frame: u64, measured: i64) -> i64 {
        let x = (frame - self.acq_frame()) as f64;
        let y = (measured - self.origin) as f64 - x * self.npf;
        let [n, mean, ..] = &mut self.ls;
        if x * self.nominal_npf * 1e-9 < ACQUIRE_SKIP_S {
            // stream start: the first callbacks come back to back to prefill the
            // buffer and their timestamps say little; follow the latest only
            *n = 1.0;
            *mean = y;
        } else if (y - *mean).abs() > RESET_NS {
            let late = y > *mean;
            if self.big_error(late) {
                self.resets += 1;
                self.restart(frame, measured);
                return measured;
            }
        } else {
            self.big_errors = 0;
            // clip single outliers once a few points are in
            let y = if *n >= 4.0 {
                y.clamp(*mean - 150_000.0, *mean + 150_000.0)
            } else {
                y
            };
            *n += 1.0;
            *mean += (y - *mean) / *n;
        }
        let est = self.ls[1] + x * self.npf;
        self.locked_frames = frame - self.acq_frame();
        if self.locked_frames as f64 * self.nominal_npf * 1e-9 >= ACQUIRE_S {
            self.base = est;
            self.base_frame = frame;
            self.mean_abs_e = 0.0;
        }
        self.origin + est.round() as i64
    }

    /// Count an error beyond [`RESET_NS`] on the `late` side; true once [`RESET_AFTER`]
    /// in a row lie on one side (a step: restart the loop).
    fn big_error(&mut self, late: bool) -> bool {
        if self.big_errors > 0 && late != self.big_late {
            self.big_errors = 0;
        }
        self.big_late = late;
        self.big_errors += 1;
        self.big_errors >= RESET_AFTER
    }

    fn acq_frame(&self) -> u64 {
        self.acq_start
    }

    fn restart(&mut self, frame: u64, measured: i64) {
        self.origin = measured;
        self.base = 0.0;
        self.base_frame = frame;
        if !self.init {
            self.npf = self.nominal_npf;
        }
        self.locked_frames = 0;
        self.init = true;
        self.mean_abs_e = 0.0;
        self.mean_e = 0.0;
        self.big_errors = 0;
        self.ls = [0.0; 2];
        self.acq_start = frame;
        // the restart measurement is the first point of the offset mean
        self.ls[0] = 1.0;
    }

    /// Filtered time (ns) of `frame`, on the line fitted so far.
    pub fn time_of(&self, frame: u64) -> f64 {
        self.origin as f64 + self.base + (frame as f64 - self.base_frame as f64) * self.npf
    }

    /// Current estimate of ns per frame.
    pub fn ns_per_frame(&self) -> f64 {
        self.npf
    }

    /// The card's rate relative to nominal, in ppm (positive: frames take longer).
    pub fn rate_ppm(&self) -> f64 {
        (self.npf / self.nominal_npf - 1.0) * 1e6
    }

    pub fn resets(&self) -> u64 {
        self.resets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: tests own their randomness.
    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.max(1);
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn locks_onto_skewed_card_with_jitter() {
        for (seed, ppm) in [(1u64, 80.0), (2, -150.0), (3, 0.0), (4, 1000.0)] {
            let mut r = rng(seed);
            let mut fc = FrameClock::new(48_000);
            let true_npf = 1e9 / 48_000.0 * (1.0 + ppm * 1e-6);
            let t0 = 5_000_000_000_000i64;
            let mut worst_late = 0.0f64;
            for k in 0..(48_000 * 30 / 256) as u64 {
                let frame = k * 256;
                let truth = t0 as f64 + frame as f64 * true_npf;
                let jitter = (r() - 0.5) * 200_000.0; // ±100 µs
                let est = fc.update(frame, (truth + jitter) as i64);
                if k > (48_000 * 20 / 256) {
                    worst_late = worst_late.max((est as f64 - truth).abs());
                }
            }
            assert!(
                (fc.rate_ppm() - ppm).abs() < 10.0,
                "seed {seed}: rate {} vs {ppm}",
                fc.rate_ppm()
            );
            eprintln!(
                "seed {seed}: rate {:.2} ppm (true {ppm}), worst error {worst_late:.0} ns",
                fc.rate_ppm()
            );
            assert!(
                worst_late < 20_000.0,
                "seed {seed}: error {worst_late} ns after lock"
            );
        }
    }

    /// A card exactly at 48 kHz: frame `f` is heard at `t(f)`.
    fn t(f: u64) -> i64 {
        1_000_000 + (f as i64 * 1_000_000_000) / 48_000
    }

    /// A frame clock locked onto [`t`] for 400 callbacks of 256 frames, and the next frame.
    fn locked() -> (FrameClock, u64) {
        let mut fc = FrameClock::new(48_000);
        let mut f = 0;
        for _ in 0..400 {
            fc.update(f, t(f));
            f += 256;
        }
        (fc, f)
    }

    #[test]
    fn restarts_after_discontinuity_but_not_after_one_outlier() {
        let (mut fc, mut f) = locked();
        // one late outlier of 3 ms is clipped, not followed
        let est = fc.update(f, t(f) + 3_000_000);
        assert!(
            (est - t(f)).abs() < 1_000,
            "followed an outlier: {}",
            est - t(f)
        );
        f += 256;
        // a real discontinuity (the stream jumped 50 ms) restarts the loop
        let mut last = 0;
        for _ in 0..RESET_AFTER {
            last = fc.update(f, t(f) + 50_000_000);
            f += 256;
        }
        assert_eq!(fc.resets(), 1);
        assert_eq!(last, t(f - 256) + 50_000_000);
    }

    #[test]
    fn follows_a_small_step_at_once_but_not_a_burst_of_late_callbacks() {
        let (mut fc, mut f) = locked();
        // a burst of late callbacks one short of the limit, then on time again
        for _ in 0..RESET_AFTER - 1 {
            fc.update(f, t(f) + 2_000_000);
            f += 256;
        }
        // errors beyond the limit on both sides are noise, not a step
        for k in 0..2 * RESET_AFTER {
            let sign = if k % 2 == 0 { -1 } else { 1 };
            fc.update(f, t(f) + sign * 1_500_000);
            f += 256;
        }
        let est = fc.update(f, t(f));
        assert_eq!(fc.resets(), 0);
        assert!(
            (est - t(f)).abs() < 30_000,
            "pulled off by noise: {}",
            est - t(f)
        );
        f += 256;
        // the card's timing steps 2 ms early (a server that lost time): a restart
        // follows it within RESET_AFTER callbacks instead of slewing for seconds
        for _ in 0..RESET_AFTER {
            fc.update(f, t(f) - 2_000_000);
            f += 256;
        }
        assert_eq!(fc.resets(), 1);
        let est = fc.update(f, t(f) - 2_000_000);
        assert!((est - (t(f) - 2_000_000)).abs() < 5_000, "{}", est - t(f));
    }
}
