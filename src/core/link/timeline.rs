//! Timeline, ghost-time and beat-grid arithmetic (spec Ch. 2 §2, §6, §9).
//!
//! Phase note (verified against the real Link library with
//! `tests/aalink_check.py --anchor-beats 5` and `6`, quantum 4): a Link app's
//! reported beat at ghost time `g` is the session-timeline beat `beats(g)`
//! itself, whatever the timeline's `beatOrigin` is — the quantum grid is
//! anchored at session beat 0, as the prose of Ch. 2 §9 says. The §9
//! `b_app` formula, read literally, would shift the phase by
//! `beatOrigin mod q`; that is not what the real library shows, so no
//! function here implements it. The phase helpers below are the §9 grid
//! functions, useful e.g. to quantize a transport start to a bar.
//!
//! Everything is integer: µs for times, µbeats (beats × 10⁶) for beats,
//! µs/beat for tempo, with round-to-nearest division (half away from zero)
//! computed in `i128` so no intermediate overflows.

use crate::core::link::codec::Timeline;

/// Micro-beats per beat (Ch. 0 §4.7).
pub const MICROBEATS_PER_BEAT: i64 = 1_000_000;
/// Lowest tempo a Link peer accepts (Ch. 2 §6 rule 1).
pub const MIN_BPM: f64 = 20.0;
/// Highest tempo a Link peer accepts.
pub const MAX_BPM: f64 = 999.0;
/// µs/beat at [`MAX_BPM`]: round(60e6 / 999).
pub const MIN_MICROS_PER_BEAT: i64 = 60_060;
/// µs/beat at [`MIN_BPM`].
pub const MAX_MICROS_PER_BEAT: i64 = 3_000_000;

/// Round-to-nearest division, halves away from zero. `d` must be nonzero.
pub fn div_round(n: i128, d: i128) -> i128 {
    let (n, d) = if d < 0 { (-n, -d) } else { (n, d) };
    if n >= 0 {
        (n + d / 2) / d
    } else {
        -((-n + d / 2) / d)
    }
}

fn sat_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Floor division for i64 (`d > 0`).
pub fn div_floor(n: i64, d: i64) -> i64 {
    let q = n / d;
    if (n % d != 0) && ((n < 0) != (d < 0)) {
        q - 1
    } else {
        q
    }
}

/// Tempo in bpm → wire period in µs/beat: round(60·10⁶ / bpm), clamped to
/// the 20–999 bpm range (Ch. 0 §4.7, Ch. 2 §6 rule 1). Non-finite or
/// non-positive input clamps to 20 bpm.
pub fn bpm_to_micros_per_beat(bpm: f64) -> i64 {
    let bpm = if bpm.is_finite() && bpm > 0.0 {
        bpm
    } else {
        MIN_BPM
    };
    let mpb = (60_000_000.0 / bpm).round();
    (mpb as i64).clamp(MIN_MICROS_PER_BEAT, MAX_MICROS_PER_BEAT)
}

/// Clamp a received/sent tempo period into the accepted range.
pub fn clamp_micros_per_beat(mpb: i64) -> i64 {
    mpb.clamp(MIN_MICROS_PER_BEAT, MAX_MICROS_PER_BEAT)
}

impl Timeline {
    /// Build from bpm, a beat origin in (fractional) beats and a time origin
    /// in ghost µs. The tempo is quantized to whole µs/beat as on the wire.
    pub fn from_bpm(bpm: f64, beat_origin_beats: f64, time_origin_ghost_us: i64) -> Timeline {
        Timeline {
            micros_per_beat: bpm_to_micros_per_beat(bpm),
            beat_origin: (beat_origin_beats * MICROBEATS_PER_BEAT as f64).round() as i64,
            time_origin: time_origin_ghost_us,
        }
    }

    /// Tempo in bpm (`60·10⁶ / µs-per-beat`) of the clamped period.
    pub fn bpm(&self) -> f64 {
        60_000_000.0 / clamp_micros_per_beat(self.micros_per_beat) as f64
    }

    /// The same timeline with its tempo clamped into 20–999 bpm (what every
    /// receiver does with a decoded `tmln`).
    pub fn clamped(self) -> Timeline {
        Timeline {
            micros_per_beat: clamp_micros_per_beat(self.micros_per_beat),
            ..self
        }
    }

    /// Beats (µbeats) at ghost time `g` (µs): `beatOrigin + (g − timeOrigin)/tempo`.
    pub fn beats_at(&self, ghost_us: i64) -> i64 {
        let mpb = clamp_micros_per_beat(self.micros_per_beat) as i128;
        let d = (ghost_us as i128 - self.time_origin as i128) * MICROBEATS_PER_BEAT as i128;
        sat_i64(self.beat_origin as i128 + div_round(d, mpb))
    }

    /// Ghost time (µs) of beat `b` (µbeats): `timeOrigin + (b − beatOrigin)·tempo`.
    pub fn ghost_at(&self, beats: i64) -> i64 {
        let mpb = clamp_micros_per_beat(self.micros_per_beat) as i128;
        let d = (beats as i128 - self.beat_origin as i128) * mpb;
        sat_i64(self.time_origin as i128 + div_round(d, MICROBEATS_PER_BEAT as i128))
    }

    /// The same beat↔time line described from another origin beat: the
    /// returned timeline has `beat_origin = new_beat_origin` and
    /// `time_origin = ghost_at(new_beat_origin)`. Exact (no rounding) when
    /// the shift is a whole number of beats.
    pub fn rebased(&self, new_beat_origin: i64) -> Timeline {
        Timeline {
            micros_per_beat: clamp_micros_per_beat(self.micros_per_beat),
            beat_origin: new_beat_origin,
            time_origin: self.ghost_at(new_beat_origin),
        }
    }

    /// Whether two timelines describe the same line (same tempo, and the
    /// other's origin lies on this line to within 1 µs).
    pub fn same_line(&self, other: &Timeline) -> bool {
        clamp_micros_per_beat(self.micros_per_beat) == clamp_micros_per_beat(other.micros_per_beat)
            && (self.ghost_at(other.beat_origin) - other.time_origin).abs() <= 1
    }
}

/// Mapping from a peer's host clock to ghost time (Ch. 2 §2). The slope is
/// always 1 in protocol v1, so only the intercept is stored:
/// `ghost = host + intercept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct GhostXform {
    /// `ghost − host`, µs.
    pub intercept_us: i64,
}

impl GhostXform {
    /// Host µs → ghost µs.
    pub fn host_to_ghost(&self, host_us: i64) -> i64 {
        host_us.saturating_add(self.intercept_us)
    }
    /// Ghost µs → host µs.
    pub fn ghost_to_host(&self, ghost_us: i64) -> i64 {
        ghost_us.saturating_sub(self.intercept_us)
    }
}

/// `phase(b, q)`: `b mod q` in `[0, q)`; 0 when `q <= 0` (Ch. 2 §9). µbeats.
pub fn phase(b: i64, q: i64) -> i64 {
    if q <= 0 {
        0
    } else {
        b.rem_euclid(q)
    }
}

/// `alignUp(x, t, q)`: least value ≥ x with the phase of t (Ch. 2 §9).
pub fn align_up(x: i64, t: i64, q: i64) -> i64 {
    if q <= 0 {
        return x;
    }
    x.saturating_add((phase(t, q) - phase(x, q) + q).rem_euclid(q))
}

/// `alignNear(x, t, q)`: value with t's phase nearest x, ties downward (Ch. 2 §9).
pub fn align_near(x: i64, t: i64, q: i64) -> i64 {
    align_up(x.saturating_sub(q / 2), t, q)
}

/// ns per minute × 1000: a tempo in milli-BPM gives `NS_MILLI_MIN / mbpm` ns per beat.
const NS_MILLI_MIN: i128 = 60_000_000_000 * 1000;

/// A room line with an exact tempo, in ghost time: whole Link beat `b0` falls at ghost
/// time `t0_ns` (ns) and the tempo is `mbpm` milli-BPM. A Link [`Timeline`] carries
/// the tempo as whole µs per beat, which is off by up to 0.5 µs per beat; describing
/// the line from an origin near the present ([`ExactLine::at`]) keeps that error to
/// a few µs (bandsync re-anchors every [`crate::core::link::peer::Config::anchor_beats`]
/// beats).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExactLine {
    /// Link beat (whole beats) at `t0_ns`.
    pub b0: i64,
    /// Ghost time of `b0`, ns.
    pub t0_ns: i64,
    /// Tempo, milli-BPM (> 0).
    pub mbpm: u32,
}

impl ExactLine {
    fn mbpm_i(&self) -> i128 {
        self.mbpm.max(1) as i128
    }
    /// The wire tempo: round(60·10⁶ / bpm) µs per beat, clamped like every tempo.
    pub fn micros_per_beat(&self) -> i64 {
        let mpb = div_round(NS_MILLI_MIN / 1000, self.mbpm_i());
        clamp_micros_per_beat(sat_i64(mpb))
    }
    /// Ghost time (ns) of beat position `ub` (µbeats), rounded to the ns.
    pub fn ghost_ns_at(&self, ub: i64) -> i128 {
        let d = ub as i128 - self.b0 as i128 * MICROBEATS_PER_BEAT as i128;
        // ns per µbeat = NS_MILLI_MIN / (mbpm · 10⁶)
        self.t0_ns as i128
            + div_round(
                d * NS_MILLI_MIN,
                self.mbpm_i() * MICROBEATS_PER_BEAT as i128,
            )
    }
    /// Beat position (µbeats) at ghost time `ghost_us`.
    pub fn beats_at(&self, ghost_us: i64) -> i64 {
        let dt = ghost_us as i128 * 1000 - self.t0_ns as i128;
        sat_i64(
            self.b0 as i128 * MICROBEATS_PER_BEAT as i128
                + div_round(
                    dt * self.mbpm_i() * MICROBEATS_PER_BEAT as i128,
                    NS_MILLI_MIN,
                ),
        )
    }
    /// The Link timeline that describes this line from beat origin `ub` (µbeats):
    /// exact at the origin (to the µs), off by the tempo's rounding further away.
    pub fn at(&self, ub: i64) -> Timeline {
        Timeline {
            micros_per_beat: self.micros_per_beat(),
            beat_origin: ub,
            time_origin: sat_i64(div_round(self.ghost_ns_at(ub), 1000)),
        }
    }
    /// Whether `tl` describes this line (the wire tempo, and its origin's time within
    /// 1 µs), as every box of the room computes it.
    pub fn matches(&self, tl: &Timeline) -> bool {
        self.within(tl, 1)
    }
    /// Whether `tl` is this line at most `us` µs earlier or later (same wire tempo).
    pub fn within(&self, tl: &Timeline, us: i64) -> bool {
        clamp_micros_per_beat(tl.micros_per_beat) == self.micros_per_beat()
            && (self.at(tl.beat_origin).time_origin as i128 - tl.time_origin as i128).abs()
                <= us as i128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tempo_quantization_and_clamp() {
        assert_eq!(bpm_to_micros_per_beat(120.0), 500_000);
        assert_eq!(bpm_to_micros_per_beat(123.0), 487_805);
        assert_eq!(bpm_to_micros_per_beat(999.0), 60_060);
        assert_eq!(bpm_to_micros_per_beat(5000.0), 60_060);
        assert_eq!(bpm_to_micros_per_beat(1.0), 3_000_000);
        assert_eq!(bpm_to_micros_per_beat(f64::NAN), 3_000_000);
        assert_eq!(bpm_to_micros_per_beat(-3.0), 3_000_000);
        let t = Timeline {
            micros_per_beat: 0,
            beat_origin: 0,
            time_origin: 0,
        };
        assert_eq!(t.clamped().micros_per_beat, 60_060);
        assert_eq!(t.beats_at(60_060), 1_000_000); // no division by zero
    }

    #[test]
    fn bijection() {
        let t = Timeline {
            micros_per_beat: 500_000,
            beat_origin: 2_000_000,
            time_origin: 10_000_000,
        };
        assert_eq!(t.beats_at(10_000_000), 2_000_000);
        assert_eq!(t.beats_at(10_500_000), 3_000_000);
        assert_eq!(t.beats_at(9_750_000), 1_500_000);
        assert_eq!(t.ghost_at(3_000_000), 10_500_000);
        assert_eq!(t.ghost_at(0), 9_000_000);
        let r = t.rebased(48_000_000);
        assert!(r.same_line(&t));
        assert_eq!(r.beats_at(12_345_678), t.beats_at(12_345_678));
        assert_eq!(t.beats_at(i64::MAX), i64::MAX); // saturates, no panic
    }

    #[test]
    fn rounding() {
        assert_eq!(div_round(5, 2), 3);
        assert_eq!(div_round(-5, 2), -3);
        assert_eq!(div_round(4, 3), 1);
        assert_eq!(div_round(-4, 3), -1);
        assert_eq!(div_round(7, -2), -4);
        assert_eq!(div_floor(-1, 4), -1);
        assert_eq!(div_floor(-4, 4), -1);
        assert_eq!(div_floor(5, 4), 1);
    }

    #[test]
    fn phase_functions() {
        let q = 4_000_000;
        assert_eq!(phase(-1_000_000, q), 3_000_000);
        assert_eq!(phase(5, 0), 0);
        assert_eq!(align_up(1_000_000, 0, q), 4_000_000);
        assert_eq!(align_up(4_000_000, 0, q), 4_000_000);
        assert_eq!(align_near(5_900_000, 0, q), 4_000_000);
        assert_eq!(align_near(6_100_000, 0, q), 8_000_000);
        assert_eq!(align_near(6_000_000, 0, q), 4_000_000); // tie resolves downward
    }

    #[test]
    fn ghost_xform() {
        let x = GhostXform {
            intercept_us: 1 << 50,
        };
        assert_eq!(x.ghost_to_host(x.host_to_ghost(123)), 123);
    }

    #[test]
    fn exact_line_stays_exact_far_from_its_origin() {
        // 123 BPM: the wire period 487 805 µs is 0.122 µs long per beat.
        let l = ExactLine {
            b0: 8,
            t0_ns: 5_000_000_000_123,
            mbpm: 123_000,
        };
        assert_eq!(l.micros_per_beat(), 487_805);
        let far = 8 + 10_000;
        let exact_ns = 5_000_000_000_123i128 + (10_000i128 * 60_000_000_000_000) / 123_000;
        let t = l.at(far * MICROBEATS_PER_BEAT);
        assert_eq!(t.time_origin as i128, (exact_ns + 500) / 1000);
        assert!(l.matches(&t));
        // the plain rebase drifts by 10 000 × 0.122 µs
        let drift = l
            .at(8 * MICROBEATS_PER_BEAT)
            .rebased(far * MICROBEATS_PER_BEAT)
            .time_origin
            - t.time_origin;
        assert!((1_200..=1_240).contains(&drift), "{drift}");
        assert!(!l.matches(&Timeline {
            time_origin: t.time_origin + 3,
            ..t
        }));
        assert!(!l.matches(&Timeline {
            micros_per_beat: 487_804,
            ..t
        }));
        assert_eq!(l.beats_at(l.at(12_345_678).time_origin), 12_345_678);
        assert_eq!(l.beats_at(5_000_000_000), 8 * MICROBEATS_PER_BEAT);
    }
}
