//! The room timeline: a pure, piecewise-linear map between session time and beats.
//!
//! No IO, no clock reads: every function takes the session time it needs.
//!
//! # The math
//!
//! A [`Segment`] says "integer beat `b0` happens at session time `t0` (ns), and from
//! there the tempo is `bpm`":
//!
//! ```text
//! beat(t) = b0 + (t - t0) * bpm / 60e9          (t in ns)
//! ```
//!
//! Beat positions are fixed point ([`BeatPos`], 2⁻³² beat per unit) and tempos are
//! integer milli-BPM ([`Tempo`]), so all arithmetic is exact integer math in `i128`:
//!
//! ```text
//! units(dt)  = floor(dt * mbpm * 2^32 / 6e13)       beat_at
//! dt(units)  = ceil(units * 6e13 / (mbpm * 2^32))   time_at
//! ```
//!
//! At the slowest tempo (20 BPM) one nanosecond is 1.43 units, so every nanosecond has
//! its own beat position and `time_at(beat_at(t)) == t` exactly.
//!
//! A [`Timeline`] is the current segment plus up to [`MAX_PENDING`] scheduled ones.
//! Every change (tempo, meter, start, stop) starts a new segment at an *integer* beat
//! chosen by quantizing a future time to the next beat or bar ([`Quantum`]); the new
//! segment's `t0` is the time the old segment gives that beat. Beats are therefore
//! continuous across a change, and no beat index is skipped or repeated.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Fixed-point fractional bits of a [`BeatPos`].
pub const FRAC_BITS: u32 = 32;
const ONE_BEAT: i128 = 1 << FRAC_BITS;
/// ns per minute × 1000 (tempo is in milli-BPM).
const NS_MILLI_MIN: i128 = 60_000_000_000 * 1000;

/// How many scheduled changes may wait at once (besides the current segment).
pub const MAX_PENDING: usize = 3;
const MAX_SEGS: usize = MAX_PENDING + 1;

/// Errors of the timeline core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimelineError {
    #[error("tempo {0} BPM is out of range: it must be between 20 and 400 BPM")]
    TempoOutOfRange(String),
    #[error("meter {0} is out of range: it must be between 1 and 16 beats per bar")]
    MeterOutOfRange(i64),
    #[error("too many changes are already scheduled ({MAX_PENDING}); wait for one to take effect")]
    TooManyPending,
}

/// A tempo in milli-BPM, always within 20–400 BPM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Tempo(u32);

impl Tempo {
    pub const MIN_MBPM: u32 = 20_000;
    pub const MAX_MBPM: u32 = 400_000;

    /// A tempo from BPM, rounded to 0.001 BPM.
    pub fn from_bpm(bpm: f64) -> Result<Tempo, TimelineError> {
        if !bpm.is_finite() {
            return Err(TimelineError::TempoOutOfRange(format!("{bpm}")));
        }
        let m = (bpm * 1000.0).round();
        if m < Self::MIN_MBPM as f64 || m > Self::MAX_MBPM as f64 {
            return Err(TimelineError::TempoOutOfRange(format!("{bpm}")));
        }
        Ok(Tempo(m as u32))
    }
    pub fn from_mbpm(mbpm: u32) -> Result<Tempo, TimelineError> {
        if !(Self::MIN_MBPM..=Self::MAX_MBPM).contains(&mbpm) {
            return Err(TimelineError::TempoOutOfRange(format!(
                "{}",
                mbpm as f64 / 1000.0
            )));
        }
        Ok(Tempo(mbpm))
    }
    pub fn mbpm(self) -> u32 {
        self.0
    }
    pub fn bpm(self) -> f64 {
        self.0 as f64 / 1000.0
    }
    /// Length of one beat in ns (rounded; for display and rough planning only).
    pub fn beat_ns(self) -> i64 {
        (NS_MILLI_MIN / self.0 as i128) as i64
    }
}

impl TryFrom<u32> for Tempo {
    type Error = TimelineError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Tempo::from_mbpm(v)
    }
}
impl From<Tempo> for u32 {
    fn from(t: Tempo) -> u32 {
        t.0
    }
}
impl fmt::Display for Tempo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bpm())
    }
}

/// Beats per bar, 1–16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Meter(u8);

impl Meter {
    pub fn new(n: i64) -> Result<Meter, TimelineError> {
        if !(1..=16).contains(&n) {
            return Err(TimelineError::MeterOutOfRange(n));
        }
        Ok(Meter(n as u8))
    }
    pub fn get(self) -> u8 {
        self.0
    }
}
impl TryFrom<u8> for Meter {
    type Error = TimelineError;
    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Meter::new(v as i64)
    }
}
impl From<Meter> for u8 {
    fn from(m: Meter) -> u8 {
        m.0
    }
}

/// A position on the beat axis in 2⁻³² beat units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BeatPos(pub i64);

impl BeatPos {
    pub fn from_beat(beat: i64) -> BeatPos {
        BeatPos(beat << FRAC_BITS)
    }
    /// The integer beat at or before this position.
    pub fn floor_beat(self) -> i64 {
        self.0 >> FRAC_BITS
    }
    /// The integer beat at or after this position.
    pub fn ceil_beat(self) -> i64 {
        (self.0 + (ONE_BEAT as i64 - 1)) >> FRAC_BITS
    }
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / ONE_BEAT as f64
    }
}

/// Where a change lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quantum {
    Beat,
    #[default]
    Bar,
}

/// One piece of the timeline: from integer beat `b0` at session time `t0` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Session time (ns) of beat `b0`.
    pub t0: i64,
    /// Integer beat index where this segment starts.
    pub b0: i64,
    pub tempo: Tempo,
    pub meter: Meter,
    /// A beat index that starts a bar (bars are counted from here).
    pub downbeat: i64,
    /// Transport: whether beats in this segment click.
    pub playing: bool,
}

impl Segment {
    fn units_per(&self) -> i128 {
        self.tempo.0 as i128 * ONE_BEAT
    }
    /// Beat position at session time `t`, extrapolating this segment's tempo.
    pub fn pos_at(&self, t: i64) -> BeatPos {
        let dt = t as i128 - self.t0 as i128;
        let du = (dt * self.units_per()).div_euclid(NS_MILLI_MIN);
        BeatPos(
            ((self.b0 as i128) << FRAC_BITS)
                .saturating_add(du)
                .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        )
    }
    /// Session time of beat position `pos`, extrapolating this segment's tempo.
    pub fn time_at(&self, pos: BeatPos) -> i64 {
        let du = pos.0 as i128 - ((self.b0 as i128) << FRAC_BITS);
        let num = du * NS_MILLI_MIN;
        let den = self.units_per();
        // ceil division for any sign
        let q = num.div_euclid(den) + if num.rem_euclid(den) != 0 { 1 } else { 0 };
        (self.t0 as i128 + q).clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }
    /// True when `beat` is the first beat of a bar.
    pub fn is_downbeat(&self, beat: i64) -> bool {
        (beat - self.downbeat).rem_euclid(self.meter.0 as i64) == 0
    }
    /// The first downbeat at or after `beat`.
    pub fn downbeat_at_or_after(&self, beat: i64) -> i64 {
        let m = self.meter.0 as i64;
        let r = (beat - self.downbeat).rem_euclid(m);
        if r == 0 {
            beat
        } else {
            beat + (m - r)
        }
    }
    /// 0-based beat within the bar.
    pub fn beat_in_bar(&self, beat: i64) -> u8 {
        (beat - self.downbeat).rem_euclid(self.meter.0 as i64) as u8
    }
}

/// What a change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    Tempo(Tempo),
    Meter(Meter),
    Start,
    Stop,
}

/// A change and where it is quantized to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub quantum: Quantum,
}

/// Where a scheduled change takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduled {
    pub beat: i64,
    pub time: i64,
}

/// A click the timeline asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Click {
    pub beat: i64,
    /// Session time (ns) of the click.
    pub time: i64,
    /// First beat of a bar.
    pub accent: bool,
}

/// The current segment plus scheduled ones, in beat order. `Copy`, fixed size: the
/// audio callback reads it from a lock-free snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    segs: [Segment; MAX_SEGS],
    len: u8,
}

impl Timeline {
    /// A timeline that is just `seg`.
    pub fn new(seg: Segment) -> Timeline {
        Timeline {
            segs: [seg; MAX_SEGS],
            len: 1,
        }
    }

    /// A stopped timeline with `tempo`/`meter` whose beat 0 is at session time `t0`.
    pub fn start_at(t0: i64, tempo: Tempo, meter: Meter, playing: bool) -> Timeline {
        Timeline::new(Segment {
            t0,
            b0: 0,
            tempo,
            meter,
            downbeat: 0,
            playing,
        })
    }

    /// The segments, current first.
    pub fn segments(&self) -> &[Segment] {
        &self.segs[..self.len as usize]
    }

    /// Rebuild from segments (e.g. received from a peer). Segments must be in
    /// strictly increasing beat and time order; at most `MAX_SEGS`.
    pub fn from_segments(segs: &[Segment]) -> Option<Timeline> {
        if segs.is_empty() || segs.len() > MAX_SEGS {
            return None;
        }
        for w in segs.windows(2) {
            if w[1].b0 <= w[0].b0 || w[1].t0 <= w[0].t0 {
                return None;
            }
            // continuity: the next segment starts where the previous puts its beat
            // (within 2 ns: a timeline re-begun with `begun_at` re-rounds its anchor)
            if (w[0].time_at(BeatPos::from_beat(w[1].b0)) - w[1].t0).abs() > 2 {
                return None;
            }
        }
        let mut t = Timeline::new(segs[0]);
        for (i, s) in segs.iter().enumerate() {
            t.segs[i] = *s;
        }
        t.len = segs.len() as u8;
        Some(t)
    }

    /// The same timeline begun at integer beat `beat`: nothing clicks before it.
    /// Used when a box joins a running room at a bar boundary. The new anchor's time
    /// is `beat_time(beat)` (rounded up to the ns, like every beat time).
    pub fn begun_at(&self, beat: i64) -> Timeline {
        let seg = *self.segment_at_beat(beat);
        let mut t = Timeline::new(Segment {
            t0: self.beat_time(beat),
            b0: beat,
            ..seg
        });
        for s in self.segments().iter().filter(|s| s.b0 > beat) {
            t.segs[t.len as usize] = *s;
            t.len += 1;
        }
        t
    }

    /// The segment that governs session time `t`.
    pub fn segment_at_time(&self, t: i64) -> &Segment {
        let segs = self.segments();
        let mut cur = &segs[0];
        for s in &segs[1..] {
            if s.t0 <= t {
                cur = s;
            }
        }
        cur
    }

    /// The segment that governs integer beat `beat`.
    pub fn segment_at_beat(&self, beat: i64) -> &Segment {
        let segs = self.segments();
        let mut cur = &segs[0];
        for s in &segs[1..] {
            if s.b0 <= beat {
                cur = s;
            }
        }
        cur
    }

    /// The segment in effect at session time `now` (for display: tempo, meter, transport).
    pub fn current(&self, now: i64) -> &Segment {
        self.segment_at_time(now)
    }

    /// The last segment (the one every later beat follows).
    pub fn last(&self) -> &Segment {
        &self.segs[self.len as usize - 1]
    }

    pub fn beat_at(&self, t: i64) -> BeatPos {
        self.segment_at_time(t).pos_at(t)
    }

    pub fn time_at(&self, pos: BeatPos) -> i64 {
        let seg = self.segment_for_pos(pos);
        seg.time_at(pos)
    }

    fn segment_for_pos(&self, pos: BeatPos) -> &Segment {
        let segs = self.segments();
        let mut cur = &segs[0];
        for s in &segs[1..] {
            if BeatPos::from_beat(s.b0) <= pos {
                cur = s;
            }
        }
        cur
    }

    /// The first integer beat whose time is at or after `t`.
    ///
    /// `time_at` rounds up to the next nanosecond, so beat `b` has time ≥ `t` exactly
    /// when its position is past `beat_at(t − 1)`.
    pub fn first_beat_at_or_after(&self, t: i64) -> i64 {
        BeatPos(self.beat_at(t.saturating_sub(1)).0.saturating_add(1)).ceil_beat()
    }

    /// Session time of integer beat `beat`.
    pub fn beat_time(&self, beat: i64) -> i64 {
        self.time_at(BeatPos::from_beat(beat))
    }

    /// The first click at or after session time `t`, skipping stopped stretches.
    /// The timeline begins at its first segment's anchor: there is no click before
    /// `b0`. `None` when the transport stays stopped from `t` on.
    pub fn next_click_at_or_after(&self, t: i64) -> Option<Click> {
        // The timeline starts at its first segment's anchor: no click before it.
        let mut beat = self.first_beat_at_or_after(t).max(self.segs[0].b0);
        for _ in 0..=MAX_SEGS {
            let seg = self.segment_at_beat(beat);
            if seg.playing {
                return Some(Click {
                    beat,
                    time: self.beat_time(beat),
                    accent: seg.is_downbeat(beat),
                });
            }
            // jump to the next segment that starts after `beat`
            let next = self.segments().iter().find(|s| s.b0 > beat)?;
            beat = next.b0;
        }
        None
    }

    /// Drop segments that no longer matter: everything before the one in effect at `now`.
    pub fn advance(&mut self, now: i64) {
        let mut first = 0;
        for (i, s) in self.segments().iter().enumerate() {
            if s.t0 <= now {
                first = i;
            }
        }
        if first > 0 {
            let n = self.len as usize;
            self.segs.copy_within(first..n, 0);
            self.len = (n - first) as u8;
        }
    }

    /// Where a change requested at `now` would land: the first integer beat at least
    /// `min_lead_ns` in the future (and not before any already scheduled change, nor
    /// before the timeline's anchor `b0`), moved to the next downbeat when `quantum`
    /// is `Bar`.
    pub fn quantize(&self, quantum: Quantum, now: i64, min_lead_ns: i64) -> Scheduled {
        let earliest = now.saturating_add(min_lead_ns.max(0));
        let mut beat = self.first_beat_at_or_after(earliest);
        // Changes apply in order, and never before the timeline's anchor.
        let last = *self.last();
        if beat < last.b0 {
            beat = last.b0;
        }
        if quantum == Quantum::Bar {
            beat = self.segment_at_beat(beat).downbeat_at_or_after(beat);
        }
        Scheduled {
            beat,
            time: self.beat_time(beat),
        }
    }

    /// Schedule `change`, requested at session time `now`. Returns where it lands.
    pub fn schedule(
        &mut self,
        change: Change,
        now: i64,
        min_lead_ns: i64,
    ) -> Result<Scheduled, TimelineError> {
        let at = self.quantize(change.quantum, now, min_lead_ns);
        self.apply_at(change.kind, at.beat)?;
        Ok(Scheduled {
            beat: at.beat,
            time: self.beat_time(at.beat),
        })
    }

    /// Apply `kind` from integer beat `beat` on. `beat` must be at or after the last
    /// segment's start (changes apply in order).
    pub fn apply_at(&mut self, kind: ChangeKind, beat: i64) -> Result<(), TimelineError> {
        let n = self.len as usize;
        let last = self.segs[n - 1];
        let beat = beat.max(last.b0);
        let idx = if beat == last.b0 {
            n - 1
        } else {
            if n >= MAX_SEGS {
                return Err(TimelineError::TooManyPending);
            }
            let t0 = last.time_at(BeatPos::from_beat(beat));
            self.segs[n] = Segment {
                t0,
                b0: beat,
                ..last
            };
            self.len += 1;
            n
        };
        let seg = &mut self.segs[idx];
        match kind {
            ChangeKind::Tempo(t) => seg.tempo = t,
            ChangeKind::Meter(m) => {
                seg.meter = m;
                seg.downbeat = beat;
            }
            ChangeKind::Start => seg.playing = true,
            ChangeKind::Stop => seg.playing = false,
        }
        Ok(())
    }
}

/// Number of `u64` words [`Timeline::encode`] writes.
pub const TIMELINE_WORDS: usize = 1 + MAX_SEGS * 4;

impl Timeline {
    /// Encode into plain words (for the audio thread's lock-free snapshot).
    pub fn encode(&self, w: &mut [u64; TIMELINE_WORDS]) {
        w[0] = self.len as u64;
        for (i, s) in self.segs.iter().enumerate() {
            let o = 1 + i * 4;
            w[o] = s.t0 as u64;
            w[o + 1] = s.b0 as u64;
            w[o + 2] = s.downbeat as u64;
            w[o + 3] = s.tempo.0 as u64 | (s.meter.0 as u64) << 32 | (s.playing as u64) << 40;
        }
    }
    /// Decode words written by [`Timeline::encode`]; values are re-validated so that
    /// any word pattern yields a usable timeline.
    pub fn decode(w: &[u64; TIMELINE_WORDS]) -> Timeline {
        let mut t = Timeline::new(Segment {
            t0: 0,
            b0: 0,
            tempo: Tempo(120_000),
            meter: Meter(4),
            downbeat: 0,
            playing: false,
        });
        t.len = (w[0] as usize).clamp(1, MAX_SEGS) as u8;
        for i in 0..MAX_SEGS {
            let o = 1 + i * 4;
            let packed = w[o + 3];
            t.segs[i] = Segment {
                t0: w[o] as i64,
                b0: w[o + 1] as i64,
                downbeat: w[o + 2] as i64,
                tempo: Tempo((packed as u32).clamp(Tempo::MIN_MBPM, Tempo::MAX_MBPM)),
                meter: Meter(((packed >> 32) as u8).clamp(1, 16)),
                playing: (packed >> 40) & 1 == 1,
            };
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(bpm: f64) -> Timeline {
        Timeline::start_at(
            1_000_000_000,
            Tempo::from_bpm(bpm).unwrap(),
            Meter::new(4).unwrap(),
            true,
        )
    }

    #[test]
    fn beat_times_at_120() {
        let t = tl(120.0);
        assert_eq!(t.beat_time(0), 1_000_000_000);
        assert_eq!(t.beat_time(1), 1_500_000_000);
        assert_eq!(t.beat_time(-2), 0);
        assert_eq!(t.beat_at(1_250_000_000).as_f64(), 0.5);
    }

    #[test]
    fn tempo_range_is_enforced() {
        assert!(Tempo::from_bpm(19.9).is_err());
        assert!(Tempo::from_bpm(400.1).is_err());
        assert!(Tempo::from_bpm(f64::NAN).is_err());
        assert_eq!(Tempo::from_bpm(137.5).unwrap().mbpm(), 137_500);
        assert!(Meter::new(0).is_err());
        assert!(Meter::new(17).is_err());
    }

    #[test]
    fn next_click_skips_stopped() {
        let mut t = Timeline::start_at(
            0,
            Tempo::from_bpm(120.0).unwrap(),
            Meter::new(4).unwrap(),
            false,
        );
        assert_eq!(t.next_click_at_or_after(0), None);
        let at = t
            .schedule(
                Change {
                    kind: ChangeKind::Start,
                    quantum: Quantum::Bar,
                },
                100,
                0,
            )
            .unwrap();
        assert_eq!(at.beat, 4);
        let c = t.next_click_at_or_after(0).unwrap();
        assert_eq!((c.beat, c.time, c.accent), (4, 2_000_000_000, true));
        let c = t.next_click_at_or_after(2_000_000_001).unwrap();
        assert_eq!((c.beat, c.accent), (5, false));
    }

    #[test]
    fn changes_queue_and_advance() {
        let mut t = tl(120.0);
        let a = t
            .schedule(
                Change {
                    kind: ChangeKind::Tempo(Tempo::from_bpm(60.0).unwrap()),
                    quantum: Quantum::Beat,
                },
                1_100_000_000,
                0,
            )
            .unwrap();
        assert_eq!(a.beat, 1);
        let b = t
            .schedule(
                Change {
                    kind: ChangeKind::Meter(Meter::new(3).unwrap()),
                    quantum: Quantum::Beat,
                },
                1_100_000_000,
                0,
            )
            .unwrap();
        assert_eq!(b.beat, 1, "same beat merges");
        assert_eq!(t.segments().len(), 2);
        assert_eq!(t.beat_time(2), 2_500_000_000);
        t.advance(1_600_000_000);
        assert_eq!(t.segments().len(), 1);
        assert_eq!(t.beat_time(2), 2_500_000_000);
        assert!(t.segment_at_beat(4).is_downbeat(4));
    }
}
