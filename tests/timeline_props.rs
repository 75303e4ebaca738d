//! Property tests for the pure timeline core (`src/timeline.rs`).
//!
//! Properties:
//!
//! 1. `time_at(beat_at(t)) == t` to the nanosecond (one segment, and with pending changes).
//! 2. Beats are continuous and monotonic across scheduled changes.
//! 3. A change takes effect exactly at its quantized point, the first one possible.
//! 4. `next_click_at_or_after` never skips or repeats a beat across changes; accents are
//!    the downbeats of the governing segment.
//! 5. Stopped stretches give no clicks; a Start resumes exactly on its quantized beat.
//!
//! Properties 2–5 run in three regimes:
//!
//! * `*_normal`: the timeline has already started when changes are requested
//!   (`now >= t0` of the first segment) and request/query times are random;
//! * `*_exact_times`: as normal, but request (`now + lead`) and query times are often
//!   exactly the time of a beat;
//! * `*_early_requests`: the first segment may still be in the future when a change is
//!   requested (what `daemon::run` builds with `--play`: `start_at(now + START_LEAD_NS)`).
//!
//! Semantics of the anchor (what the early regime checks): the timeline BEGINS at its
//! first segment's anchor, beat `b0` at time `t0`. There is no beat or click before it:
//! clicks start at `max(first beat at/after the query time, b0)`, and a change lands on
//! the first qualifying beat (any beat, or a downbeat for `Quantum::Bar`) at or after
//! both `now + lead` and the last segment's `b0`, so a change requested before the anchor
//! lands at `b0` (merged into the first segment) or at the first downbeat at/after it.
//! Beat positions/times that `beat_at`/`beat_time` extrapolate before the anchor are not
//! beats of the timeline: a change merged at `b0` may move them.
//!
//! The `bug_*` tests at the end are regression tests for bugs the last two regimes found
//! in `src/timeline.rs` (now fixed); they assert the correct behaviour.

use bandsync::core::timeline::{
    BeatPos, Change, ChangeKind, Click, Meter, Quantum, Scheduled, Segment, Tempo, Timeline,
    MAX_PENDING,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const SEC: i64 = 1_000_000_000;
const DAY: i64 = 86_400 * SEC;
const CASES: u32 = 512;

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn tempo() -> impl Strategy<Value = Tempo> + Clone {
    prop_oneof![
        1 => Just(Tempo::MIN_MBPM),
        1 => Just(Tempo::MAX_MBPM),
        8 => Tempo::MIN_MBPM..=Tempo::MAX_MBPM,
    ]
    .prop_map(|m| Tempo::from_mbpm(m).unwrap())
}

fn meter() -> impl Strategy<Value = Meter> + Clone {
    (1i64..=16).prop_map(|m| Meter::new(m).unwrap())
}

fn quantum() -> impl Strategy<Value = Quantum> + Clone {
    prop_oneof![Just(Quantum::Beat), Just(Quantum::Bar)]
}

/// Any change.
fn any_kind() -> BoxedStrategy<ChangeKind> {
    prop_oneof![
        tempo().prop_map(ChangeKind::Tempo),
        meter().prop_map(ChangeKind::Meter),
        Just(ChangeKind::Start),
        Just(ChangeKind::Stop),
    ]
    .boxed()
}

/// Changes that keep a playing timeline playing.
fn playing_kind() -> BoxedStrategy<ChangeKind> {
    prop_oneof![
        3 => tempo().prop_map(ChangeKind::Tempo),
        3 => meter().prop_map(ChangeKind::Meter),
        1 => Just(ChangeKind::Start),
    ]
    .boxed()
}

/// Mostly transport changes.
fn transport_kind() -> BoxedStrategy<ChangeKind> {
    prop_oneof![
        3 => Just(ChangeKind::Start),
        3 => Just(ChangeKind::Stop),
        1 => tempo().prop_map(ChangeKind::Tempo),
        1 => meter().prop_map(ChangeKind::Meter),
    ]
    .boxed()
}

fn lead() -> impl Strategy<Value = i64> + Clone {
    prop_oneof![Just(0i64), 0i64..20_000_000, 0i64..2 * SEC]
}

#[derive(Clone, Copy, Debug)]
struct Regime {
    /// Allow requests before the first segment's `t0`.
    future_anchor: bool,
    /// Sometimes snap request/query times onto an exact beat time.
    exact: bool,
}

/// Changes requested after the timeline started, at random times.
const NORMAL: Regime = Regime {
    future_anchor: false,
    exact: false,
};
/// Request/query times sometimes exactly on a beat's time.
const EXACT: Regime = Regime {
    future_anchor: false,
    exact: true,
};
/// Requests sometimes before the first segment's `t0`.
const EARLY: Regime = Regime {
    future_anchor: true,
    exact: false,
};
/// Both.
const EDGE: Regime = Regime {
    future_anchor: true,
    exact: true,
};

/// No failure persistence: this suite is one file, no regression files are written.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn snap(regime: Regime) -> BoxedStrategy<Option<i64>> {
    if regime.exact {
        proptest::option::weighted(0.4, 0i64..3).boxed()
    } else {
        Just(None).boxed()
    }
}

fn segment(playing: BoxedStrategy<bool>) -> impl Strategy<Value = Segment> {
    (
        -1_000_000_000_000_000_000i64..1_000_000_000_000_000_000,
        -1_000_000i64..1_000_000,
        tempo(),
        meter(),
        0i64..16,
        playing,
    )
        .prop_map(|(t0, b0, tempo, meter, dboff, playing)| Segment {
            t0,
            b0,
            tempo,
            meter,
            downbeat: b0 + dboff,
            playing,
        })
}

/// One change request.
#[derive(Clone, Copy, Debug)]
struct Req {
    kind: ChangeKind,
    quantum: Quantum,
    /// How long after the previous request (`now` never goes backwards).
    delta: i64,
    lead: i64,
    /// Move `now` so that `now + lead` is exactly the time of a beat (0–2 beats later).
    snap: Option<i64>,
}

fn req(kind: BoxedStrategy<ChangeKind>, regime: Regime) -> impl Strategy<Value = Req> {
    (
        kind,
        quantum(),
        prop_oneof![Just(0i64), 0i64..5 * SEC],
        lead(),
        snap(regime),
    )
        .prop_map(|(kind, quantum, delta, lead, snap)| Req {
            kind,
            quantum,
            delta,
            lead,
            snap,
        })
}

#[derive(Clone, Debug)]
struct Scenario {
    seg: Segment,
    /// First `now` relative to `seg.t0`.
    start_off: i64,
    /// Snap the first `now` onto an exact beat time.
    start_snap: Option<i64>,
    reqs: Vec<Req>,
}

fn scenario(
    kind: BoxedStrategy<ChangeKind>,
    regime: Regime,
    playing: BoxedStrategy<bool>,
) -> impl Strategy<Value = Scenario> {
    let off = if regime.future_anchor {
        prop_oneof![-2 * SEC..0i64, 0i64..30 * SEC].boxed()
    } else {
        (0i64..30 * SEC).boxed()
    };
    (
        segment(playing),
        off,
        snap(regime),
        vec(req(kind, regime), 1..=MAX_PENDING),
    )
        .prop_map(|(seg, start_off, start_snap, reqs)| Scenario {
            seg,
            start_off,
            start_snap,
            reqs,
        })
}

// ---------------------------------------------------------------------------------------
// Running a scenario
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Step {
    req: Req,
    now: i64,
    pre: Timeline,
    post: Timeline,
    s: Scheduled,
}

impl Step {
    fn earliest(&self) -> i64 {
        self.now + self.req.lead
    }
}

/// Time of the beat `k` beats after the first beat at or after `t` (not using
/// `next_click_at_or_after`/`quantize`, which are under test).
fn exact_beat_time_after(tl: &Timeline, t: i64, k: i64) -> i64 {
    let mut b = tl.beat_at(t).floor_beat() - 1;
    while tl.beat_time(b) < t {
        b += 1;
    }
    tl.beat_time(b + k)
}

/// The first integer beat whose time is at or after `t`, by search (not using
/// `first_beat_at_or_after`, `next_click_at_or_after` or `quantize`, which are under test).
/// Beats before the anchor are included: this is the raw beat grid.
fn first_grid_beat_at_or_after(tl: &Timeline, t: i64) -> i64 {
    let mut b = tl.beat_at(t).floor_beat();
    while tl.beat_time(b - 1) >= t {
        b -= 1;
    }
    while tl.beat_time(b) < t {
        b += 1;
    }
    b
}

/// The first beat that clicks (if playing) for a query at `t`: the timeline begins at
/// its anchor `anchor_b0`, so no beat before it.
fn first_beat_from(tl: &Timeline, t: i64, anchor_b0: i64) -> i64 {
    first_grid_beat_at_or_after(tl, t).max(anchor_b0)
}

/// The first `now` of a scenario (query start for properties 4 and 5).
fn start_time(sc: &Scenario) -> i64 {
    let tl = Timeline::new(sc.seg);
    let t = sc.seg.t0 + sc.start_off;
    match sc.start_snap {
        Some(k) => exact_beat_time_after(&tl, t, k),
        None => t,
    }
}

fn run(sc: &Scenario) -> Result<(Timeline, Vec<Step>), TestCaseError> {
    let mut tl = Timeline::new(sc.seg);
    let mut now = start_time(sc);
    let mut steps = Vec::new();
    for r in &sc.reqs {
        now += r.delta;
        if let Some(k) = r.snap {
            now = exact_beat_time_after(&tl, now + r.lead, k) - r.lead;
        }
        let pre = tl;
        let s = tl
            .schedule(
                Change {
                    kind: r.kind,
                    quantum: r.quantum,
                },
                now,
                r.lead,
            )
            .map_err(|e| TestCaseError::fail(format!("schedule failed: {e}")))?;
        steps.push(Step {
            req: *r,
            now,
            pre,
            post: tl,
            s,
        });
    }
    Ok((tl, steps))
}

fn apply_kind(mut seg: Segment, kind: ChangeKind, beat: i64) -> Segment {
    match kind {
        ChangeKind::Tempo(t) => seg.tempo = t,
        ChangeKind::Meter(m) => {
            seg.meter = m;
            seg.downbeat = beat;
        }
        ChangeKind::Start => seg.playing = true,
        ChangeKind::Stop => seg.playing = false,
    }
    seg
}

/// Independent model: the state governing `beat`, from the initial segment and the
/// changes at the beats `schedule` reported.
fn model_at(seg0: &Segment, steps: &[Step], beat: i64) -> Segment {
    let mut st = *seg0;
    for step in steps {
        if step.s.beat <= beat {
            st = apply_kind(st, step.req.kind, step.s.beat);
        }
    }
    st
}

/// Whether `beat` clicks in the model: the timeline begins at the initial segment's
/// anchor, so nothing before `seg0.b0` clicks.
fn model_playing(seg0: &Segment, steps: &[Step], beat: i64) -> bool {
    beat >= seg0.b0 && model_at(seg0, steps, beat).playing
}

fn is_downbeat(seg: &Segment, beat: i64) -> bool {
    (beat - seg.downbeat).rem_euclid(seg.meter.get() as i64) == 0
}

/// Same tempo, meter, bar phase and transport at `beat` (the anchor may differ).
fn same_state(a: &Segment, b: &Segment, beat: i64) -> bool {
    a.tempo == b.tempo
        && a.meter == b.meter
        && a.playing == b.playing
        && a.beat_in_bar(beat) == b.beat_in_bar(beat)
}

fn carries(seg: &Segment, kind: ChangeKind, beat: i64) -> bool {
    match kind {
        ChangeKind::Tempo(t) => seg.tempo == t,
        ChangeKind::Meter(m) => seg.meter == m && is_downbeat(seg, beat),
        ChangeKind::Start => seg.playing,
        ChangeKind::Stop => !seg.playing,
    }
}

/// `lo + (hi - lo) * x / 2^32`.
fn lerp(lo: i64, hi: i64, x: u32) -> i64 {
    (lo as i128 + ((hi as i128 - lo as i128) * x as i128 >> 32)) as i64
}

// ---------------------------------------------------------------------------------------
// Property 1: time_at(beat_at(t)) == t
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn p1_roundtrip_single_segment(
        tempo in tempo(),
        meter in meter(),
        t0 in -4_000_000_000_000_000_000i64..4_000_000_000_000_000_000,
        b0 in -(1i64 << 30)..(1i64 << 30),
        d in prop_oneof![-10 * DAY..=10 * DAY, -1_000i64..=1_000, Just(-10 * DAY), Just(10 * DAY)],
        playing in any::<bool>(),
    ) {
        let tl = Timeline::new(Segment { t0, b0, tempo, meter, downbeat: b0, playing });
        let t = t0 + d;
        let p = tl.beat_at(t);
        prop_assert_eq!(tl.time_at(p), t, "pos {:?}", p);
        // every nanosecond has its own position
        prop_assert!(tl.beat_at(t + 1) > p);
        prop_assert!(tl.beat_at(t - 1) < p);
        // and the other way round: a position maps to the first ns at or after it
        let q = BeatPos(p.0 + 1);
        let tq = tl.time_at(q);
        prop_assert!(tq > t);
        prop_assert!(tl.beat_at(tq) >= q);
        prop_assert!(tl.beat_at(tq - 1) < q);
    }

    #[test]
    fn p1_roundtrip_with_pending(
        sc in scenario(any_kind(), EDGE, any::<bool>().boxed()),
        picks in vec((0usize..MAX_PENDING + 1, prop_oneof![-10 * DAY..=10 * DAY, -3i64..=3]), 32),
    ) {
        let (tl, steps) = run(&sc)?;
        let segs = tl.segments();
        let mut ts: Vec<i64> = picks.iter().map(|&(i, d)| segs[i % segs.len()].t0 + d).collect();
        for st in &steps {
            ts.extend([st.now, st.earliest(), st.s.time - 1, st.s.time, st.s.time + 1]);
        }
        for t in ts {
            let p = tl.beat_at(t);
            prop_assert_eq!(tl.time_at(p), t, "t {} pos {:?} segs {:?}", t, p, segs);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Property 2: continuity and monotonicity across changes
// ---------------------------------------------------------------------------------------

fn check_p2(sc: &Scenario, samples: &[u32]) -> Result<(), TestCaseError> {
    let (tl, steps) = run(sc)?;
    let segs = tl.segments();

    // change points are where schedule said, and are segment boundaries
    for st in &steps {
        prop_assert_eq!(
            tl.beat_time(st.s.beat),
            st.s.time,
            "change point moved: {:?}",
            st
        );
        prop_assert!(
            segs.iter().any(|g| g.b0 == st.s.beat && g.t0 == st.s.time),
            "change at beat {} (t {}) is not a segment boundary: {:?}",
            st.s.beat,
            st.s.time,
            segs
        );
        prop_assert_eq!(tl.beat_at(st.s.time), BeatPos::from_beat(st.s.beat));
    }

    // continuity: the previous segment puts the new segment's first beat at its t0
    for w in segs.windows(2) {
        prop_assert!(
            w[1].b0 > w[0].b0 && w[1].t0 > w[0].t0,
            "segments out of order: {:?}",
            segs
        );
        prop_assert_eq!(
            w[0].time_at(BeatPos::from_beat(w[1].b0)),
            w[1].t0,
            "discontinuity: {:?}",
            segs
        );
        prop_assert_eq!(w[1].pos_at(w[1].t0), BeatPos::from_beat(w[1].b0));
        prop_assert!(tl.beat_at(w[1].t0 - 1) < BeatPos::from_beat(w[1].b0));
        prop_assert_eq!(
            tl.beat_time(w[1].b0 - 1),
            w[0].time_at(BeatPos::from_beat(w[1].b0 - 1))
        );
    }
    let rebuilt = Timeline::from_segments(segs);
    prop_assert!(
        rebuilt.is_some(),
        "from_segments rejects the scheduled timeline: {:?}",
        segs
    );
    let rebuilt = rebuilt.unwrap();
    prop_assert_eq!(rebuilt.segments(), segs);

    // beat_at strictly increasing over a range spanning all changes
    let lo = segs[0].t0.min(start_time(sc)) - 5 * SEC;
    let hi = tl.last().t0 + 10 * SEC;
    let mut ts: Vec<i64> = samples.iter().map(|&x| lerp(lo, hi, x)).collect();
    for g in segs {
        ts.extend((-2..=2).map(|d| g.t0 + d));
    }
    ts.sort_unstable();
    ts.dedup();
    for w in ts.windows(2) {
        let (a, b) = (tl.beat_at(w[0]), tl.beat_at(w[1]));
        prop_assert!(
            a < b,
            "beat_at not increasing: beat_at({})={:?} beat_at({})={:?}",
            w[0],
            a,
            w[1],
            b
        );
    }

    // integer beats: strictly increasing times, each beat is the floor at its own time
    let b_lo = tl.beat_at(lo).floor_beat();
    let b_hi = tl.beat_at(hi).ceil_beat();
    let mut prev = i64::MIN;
    for b in b_lo..=b_hi.min(b_lo + 4000) {
        let t = tl.beat_time(b);
        prop_assert!(t > prev, "beat {} at {} not after {}", b, t, prev);
        prop_assert_eq!(tl.beat_at(t).floor_beat(), b);
        prev = t;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn p2_continuous_monotonic_normal(
        sc in scenario(any_kind(), NORMAL, any::<bool>().boxed()),
        samples in vec(any::<u32>(), 64),
    ) {
        check_p2(&sc, &samples)?;
    }

    #[test]
    fn p2_continuous_monotonic_exact_times(
        sc in scenario(any_kind(), EXACT, any::<bool>().boxed()),
        samples in vec(any::<u32>(), 64),
    ) {
        check_p2(&sc, &samples)?;
    }

    #[test]
    fn p2_continuous_monotonic_early_requests(
        sc in scenario(any_kind(), EARLY, any::<bool>().boxed()),
        samples in vec(any::<u32>(), 64),
    ) {
        check_p2(&sc, &samples)?;
    }
}

// ---------------------------------------------------------------------------------------
// Property 3: a change lands exactly on its (first possible) quantized beat
// ---------------------------------------------------------------------------------------

fn check_p3(sc: &Scenario) -> Result<(), TestCaseError> {
    let (_, steps) = run(sc)?;
    for st in &steps {
        let Step {
            req,
            now,
            pre,
            post,
            s,
        } = *st;
        let earliest = st.earliest();
        let pre_segs = pre.segments();
        // the timeline begins here; scheduling never moves the anchor
        let anchor = pre_segs[0];
        prop_assert_eq!(
            (post.segments()[0].b0, post.segments()[0].t0),
            (anchor.b0, anchor.t0),
            "anchor moved: {:?}",
            st
        );
        prop_assert_eq!(anchor.b0, sc.seg.b0);

        // what quantize previewed is what schedule did
        prop_assert_eq!(
            pre.quantize(req.quantum, now, req.lead),
            s,
            "quantize preview differs from schedule"
        );

        // an integer beat, late enough, at the time the timeline gives it (before and after)
        prop_assert!(
            s.time >= earliest,
            "lands at {} before now+lead {}: {:?}",
            s.time,
            earliest,
            st
        );
        // never before the timeline's anchor, nor before an already scheduled change
        prop_assert!(
            s.beat >= anchor.b0 && s.time >= anchor.t0,
            "lands before the anchor: {:?}",
            st
        );
        prop_assert!(
            s.beat >= pre.last().b0,
            "lands before a pending change: {:?}",
            st
        );
        prop_assert_eq!(post.beat_time(s.beat), s.time);
        prop_assert_eq!(
            pre.beat_time(s.beat),
            s.time,
            "scheduling moved its own point: {:?}",
            st
        );
        if req.quantum == Quantum::Bar {
            prop_assert!(
                pre.segment_at_beat(s.beat).is_downbeat(s.beat),
                "not a downbeat: {:?}",
                st
            );
            prop_assert!(
                post.segment_at_beat(s.beat).is_downbeat(s.beat),
                "not a downbeat after: {:?}",
                st
            );
        }

        // the segment governing s.beat starts there and carries the change
        let g = post.segment_at_beat(s.beat);
        prop_assert_eq!(
            g.b0,
            s.beat,
            "change does not start at its beat: {:?} -> {:?}",
            st,
            post.segments()
        );
        prop_assert_eq!(g.t0, s.time);
        prop_assert!(
            carries(g, req.kind, s.beat),
            "segment at {} lacks {:?}: {:?}",
            s.beat,
            req.kind,
            g
        );

        let merged = post.segments().len() == pre_segs.len();
        if merged {
            // only onto an already existing change point
            prop_assert_eq!(
                s.beat,
                pre.last().b0,
                "merged into a segment starting elsewhere: {:?}",
                st
            );
            prop_assert_eq!(*post.last(), apply_kind(*pre.last(), req.kind, s.beat));
        } else {
            prop_assert_eq!(post.segments().len(), pre_segs.len() + 1);
            let want = apply_kind(
                Segment {
                    t0: s.time,
                    b0: s.beat,
                    ..*pre.last()
                },
                req.kind,
                s.beat,
            );
            prop_assert_eq!(*post.last(), want);
            // the beat before is governed by an older segment, which does not carry the change
            let before = post.segment_at_beat(s.beat - 1);
            prop_assert!(before.b0 < s.beat);
            prop_assert!(
                same_state(before, pre.segment_at_beat(s.beat - 1), s.beat - 1),
                "segment before the change point changed: {:?}",
                st
            );
            prop_assert_eq!(post.beat_time(s.beat - 1), pre.beat_time(s.beat - 1));
        }

        // nothing between `now` and the change point moves: the beats there keep their
        // times, tempo, meter and transport, and beat_at is unchanged. Only beats of the
        // timeline count: none exists before the anchor (a change merged at `b0` may
        // move what segment 0 extrapolates before it).
        for x in (s.beat - 3).max(anchor.b0)..s.beat {
            if pre.beat_time(x) >= now {
                prop_assert_eq!(
                    post.beat_time(x),
                    pre.beat_time(x),
                    "beat {} moved: {:?}",
                    x,
                    st
                );
                prop_assert!(
                    same_state(post.segment_at_beat(x), pre.segment_at_beat(x), x),
                    "beat {} (before the change point {}) changed tempo/meter/transport: {:?}",
                    x,
                    s.beat,
                    st
                );
            }
        }
        let b0_pos = BeatPos::from_beat(anchor.b0);
        for t in [now, earliest, s.time - 1] {
            if t >= anchor.t0 && t < s.time {
                prop_assert_eq!(
                    post.beat_at(t),
                    pre.beat_at(t),
                    "beat_at({}) moved: {:?}",
                    t,
                    st
                );
            } else if t < anchor.t0 {
                // before the anchor: still before it, whatever was merged into segment 0
                prop_assert!(
                    pre.beat_at(t) < b0_pos && post.beat_at(t) < b0_pos,
                    "beat_at({}) not before the anchor: {:?}",
                    t,
                    st
                );
            }
        }

        // the FIRST qualifying beat at or after max(now + lead, anchor), unless a pending
        // change forces it later: computed by search from the beat grid ...
        let on_grid =
            |x: i64| req.quantum == Quantum::Beat || pre.segment_at_beat(x).is_downbeat(x);
        let mut want = first_grid_beat_at_or_after(&pre, earliest).max(pre.last().b0);
        let mut n = 0;
        while !on_grid(want) {
            n += 1;
            prop_assert!(n <= 16, "no downbeat within 16 beats of {}", want);
            want += 1;
        }
        prop_assert_eq!(
            s.beat,
            want,
            "not the first qualifying beat: {:?}; pre {:?}",
            st,
            pre_segs
        );
        if earliest <= anchor.t0 && pre_segs.len() == 1 {
            // requested before the anchor: at `b0` (merged into segment 0), or at the
            // first downbeat at/after it
            let d = if req.quantum == Quantum::Bar {
                anchor.downbeat_at_or_after(anchor.b0)
            } else {
                anchor.b0
            };
            prop_assert_eq!(
                s,
                Scheduled {
                    beat: d,
                    time: pre.beat_time(d)
                },
                "early request: {:?}",
                st
            );
            prop_assert_eq!(post.segments().len(), if d == anchor.b0 { 1 } else { 2 });
        }
        // ... and no earlier beat of the timeline qualified
        let floor = pre.last().b0;
        for x in (s.beat - 16).max(floor)..s.beat {
            let late_enough = pre.beat_time(x) >= earliest;
            prop_assert!(
                !(late_enough && on_grid(x)),
                "beat {} (t {}) already qualified for now+lead {}, but landed on {:?}; pre {:?}",
                x,
                pre.beat_time(x),
                earliest,
                s,
                pre_segs
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn p3_change_lands_on_first_quantized_beat_normal(sc in scenario(any_kind(), NORMAL, any::<bool>().boxed())) {
        check_p3(&sc)?;
    }

    #[test]
    fn p3_change_lands_on_first_quantized_beat_exact_times(sc in scenario(any_kind(), EXACT, any::<bool>().boxed())) {
        check_p3(&sc)?;
    }

    #[test]
    fn p3_change_lands_on_first_quantized_beat_early_requests(sc in scenario(any_kind(), EARLY, any::<bool>().boxed())) {
        check_p3(&sc)?;
    }
}

// ---------------------------------------------------------------------------------------
// Property 4: no beat skipped or repeated across changes
// ---------------------------------------------------------------------------------------

fn check_p4(sc: &Scenario) -> Result<(), TestCaseError> {
    let (tl, steps) = run(sc)?;
    let t_start = start_time(sc);
    let end_beat = steps.iter().map(|s| s.s.beat).max().unwrap() + 2 * 16;
    let mut t = t_start;
    let mut prev: Option<Click> = None;
    let mut n = 0;
    loop {
        n += 1;
        prop_assert!(n < 100_000, "runaway iteration");
        let c = tl.next_click_at_or_after(t);
        prop_assert!(
            c.is_some(),
            "playing timeline gives no click at or after {}",
            t
        );
        let c = c.unwrap();
        prop_assert!(c.time >= t, "click {:?} before query {}", c, t);
        prop_assert_eq!(c.time, tl.beat_time(c.beat));
        prop_assert!(
            c.beat >= sc.seg.b0 && c.time >= sc.seg.t0,
            "click {:?} before the anchor {:?}",
            c,
            sc.seg
        );
        match prev {
            Some(p) => {
                prop_assert_eq!(c.beat, p.beat + 1, "skipped/repeated: {:?} then {:?}", p, c);
                prop_assert!(c.time > p.time, "time not increasing: {:?} then {:?}", p, c);
            }
            None => {
                // the first click is the first beat at or after t_start, or the anchor
                // beat if t_start is before the anchor
                let want = first_beat_from(&tl, t, sc.seg.b0);
                prop_assert_eq!(
                    c.beat,
                    want,
                    "first click {:?} is not beat {} (query {}, anchor {:?})",
                    c,
                    want,
                    t,
                    sc.seg
                );
                prop_assert!(
                    c.beat <= steps[0].s.beat,
                    "first change {:?} lies before the first click {:?} at/after the first request time {}",
                    steps[0].s,
                    c,
                    t
                );
            }
        }
        let g = tl.segment_at_beat(c.beat);
        prop_assert!(g.playing);
        prop_assert!(
            model_playing(&sc.seg, &steps, c.beat),
            "click {:?} where the model is stopped",
            c
        );
        prop_assert_eq!(
            c.accent,
            is_downbeat(g, c.beat),
            "accent wrong at {:?} in {:?}",
            c,
            g
        );
        let m = model_at(&sc.seg, &steps, c.beat);
        prop_assert_eq!(
            c.accent,
            is_downbeat(&m, c.beat),
            "accent disagrees with the scheduled meters at {:?}",
            c
        );
        for st in &steps {
            if st.s.beat == c.beat {
                prop_assert_eq!(
                    c.time,
                    st.s.time,
                    "click at change beat not at the scheduled time"
                );
            }
        }
        if c.beat >= end_beat {
            break;
        }
        prev = Some(c);
        t = c.time + 1;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn p4_no_beat_skipped_or_repeated_normal(sc in scenario(playing_kind(), NORMAL, Just(true).boxed())) {
        check_p4(&sc)?;
    }

    #[test]
    fn p4_no_beat_skipped_or_repeated_exact_times(sc in scenario(playing_kind(), EXACT, Just(true).boxed())) {
        check_p4(&sc)?;
    }

    #[test]
    fn p4_no_beat_skipped_or_repeated_early_requests(sc in scenario(playing_kind(), EARLY, Just(true).boxed())) {
        check_p4(&sc)?;
    }
}

// ---------------------------------------------------------------------------------------
// Property 5: stopped stretches are silent, Start resumes on its quantized beat
// ---------------------------------------------------------------------------------------

fn check_p5(sc: &Scenario) -> Result<(), TestCaseError> {
    let (tl, steps) = run(sc)?;
    let t_start = start_time(sc);
    let end_beat = steps.iter().map(|s| s.s.beat).max().unwrap() + 2 * 16;

    // clicks from the timeline
    let mut got = Vec::new();
    let mut t = t_start;
    loop {
        prop_assert!(got.len() < 100_000, "runaway iteration");
        match tl.next_click_at_or_after(t) {
            None => break,
            Some(c) => {
                prop_assert!(c.time >= t);
                if c.beat > end_beat {
                    break;
                }
                got.push(c);
                t = c.time + 1;
            }
        }
    }

    // expected clicks, from the model of the changes schedule reported: from the first
    // beat at or after t_start, never before the anchor
    let first = first_beat_from(&tl, t_start, sc.seg.b0);
    let want: Vec<i64> = (first..=end_beat)
        .filter(|&b| model_playing(&sc.seg, &steps, b))
        .collect();
    let got_beats: Vec<i64> = got.iter().map(|c| c.beat).collect();
    prop_assert_eq!(
        &got_beats,
        &want,
        "clicks differ from the transport model; steps {:?}",
        steps
    );

    for c in &got {
        prop_assert!(
            c.beat >= sc.seg.b0 && c.time >= sc.seg.t0,
            "click {:?} before the anchor {:?}",
            c,
            sc.seg
        );
        prop_assert!(
            tl.segment_at_beat(c.beat).playing,
            "click in a stopped stretch: {:?}",
            c
        );
        prop_assert_eq!(c.time, tl.beat_time(c.beat));
    }
    // None exactly when the transport stays stopped
    if !tl.last().playing {
        let after = got.last().map(|c| c.time + 1).unwrap_or(t_start);
        prop_assert_eq!(tl.next_click_at_or_after(after), None);
    }
    // a Start that ends a stopped stretch (or the silence before the anchor) clicks
    // exactly on its beat and time, and the stretch before it is silent
    for (i, st) in steps.iter().enumerate() {
        if st.req.kind == ChangeKind::Start && st.s.time >= t_start {
            let before = model_playing(&sc.seg, &steps[..i], st.s.beat - 1);
            let after = model_playing(&sc.seg, &steps, st.s.beat);
            if !before && after {
                let c = got.iter().find(|c| c.beat >= st.s.beat - 1);
                prop_assert_eq!(
                    c.map(|c| (c.beat, c.time)),
                    Some((st.s.beat, st.s.time)),
                    "Start at {:?} does not resume there",
                    st.s
                );
                // from any time inside the silence, the next click is the Start's beat
                let q = st.s.time - 1;
                let silent_at_q =
                    q < sc.seg.t0 || !tl.segment_at_beat(tl.beat_at(q).floor_beat()).playing;
                if q >= t_start && silent_at_q {
                    let c = tl.next_click_at_or_after(q);
                    prop_assert_eq!(c.map(|c| (c.beat, c.time)), Some((st.s.beat, st.s.time)));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn p5_stopped_silent_start_resumes_normal(sc in scenario(transport_kind(), NORMAL, any::<bool>().boxed())) {
        check_p5(&sc)?;
    }

    #[test]
    fn p5_stopped_silent_start_resumes_exact_times(sc in scenario(transport_kind(), EXACT, any::<bool>().boxed())) {
        check_p5(&sc)?;
    }

    #[test]
    fn p5_stopped_silent_start_resumes_early_requests(sc in scenario(transport_kind(), EARLY, any::<bool>().boxed())) {
        check_p5(&sc)?;
    }
}

// ---------------------------------------------------------------------------------------
// Extra: advance() forgets only the past
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn advance_keeps_the_future(
        sc in scenario(any_kind(), EDGE, any::<bool>().boxed()),
        cut in any::<u32>(),
        samples in vec(any::<u32>(), 16),
    ) {
        let (tl, _) = run(&sc)?;
        let lo = tl.segments()[0].t0 - 2 * SEC;
        let hi = tl.last().t0 + 2 * SEC;
        let now = lerp(lo, hi, cut);
        let mut adv = tl;
        adv.advance(now);
        prop_assert_eq!(adv.segments(), &tl.segments()[tl.segments().len() - adv.segments().len()..]);
        for &x in &samples {
            let t = lerp(now, hi + 10 * SEC, x);
            prop_assert_eq!(adv.beat_at(t), tl.beat_at(t));
            prop_assert_eq!(adv.next_click_at_or_after(t), tl.next_click_at_or_after(t));
            let b = tl.beat_at(t).ceil_beat();
            prop_assert_eq!(adv.beat_time(b), tl.beat_time(b));
            prop_assert_eq!(adv.segment_at_beat(b), tl.segment_at_beat(b));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Minimal reproductions of the bugs the edge regime finds (see the module docs)
// ---------------------------------------------------------------------------------------

/// `next_click_at_or_after(t)` with `t` exactly the time of beat 1 must return beat 1.
#[test]
fn bug_next_click_skips_beat_at_exact_time() {
    let tl = Timeline::start_at(
        0,
        Tempo::from_mbpm(137_500).unwrap(),
        Meter::new(4).unwrap(),
        true,
    );
    let t1 = tl.beat_time(1); // 436_363_637 (6e13 / 137_500 = 436_363_636.36.., rounded up)
    let c = tl.next_click_at_or_after(t1).unwrap();
    assert_eq!(
        (c.beat, c.time),
        (1, t1),
        "beat 1 clicks at {t1} but the click at or after {t1} is {c:?}"
    );
}

/// A Beat-quantized change requested so that `now + lead` is exactly a beat's time must
/// land on that beat.
#[test]
fn bug_quantize_skips_beat_at_exact_time() {
    let tl = Timeline::start_at(
        0,
        Tempo::from_mbpm(137_500).unwrap(),
        Meter::new(4).unwrap(),
        true,
    );
    let t1 = tl.beat_time(1);
    let s = tl.quantize(Quantum::Beat, t1, 0);
    assert_eq!(s, Scheduled { beat: 1, time: t1 });
}

/// A change requested before the (only) segment's start used to land before `b0`, be
/// applied to the whole first segment and report a beat/time where it did not happen.
/// The timeline begins at its anchor: the change lands on `b0` at `t0`, merged into the
/// first segment, and beats from `b0` on follow the new tempo.
#[test]
fn bug_change_before_first_segment_start() {
    // 120 BPM, beat 0 at t = 1 s; tempo 60 requested at now = 0 with no lead.
    let mut tl = Timeline::start_at(
        SEC,
        Tempo::from_bpm(120.0).unwrap(),
        Meter::new(4).unwrap(),
        true,
    );
    let sixty = Tempo::from_bpm(60.0).unwrap();
    let s = tl
        .schedule(
            Change {
                kind: ChangeKind::Tempo(sixty),
                quantum: Quantum::Beat,
            },
            0,
            0,
        )
        .unwrap();
    assert_eq!(s, Scheduled { beat: 0, time: SEC }, "not at the anchor");
    assert_eq!(
        tl.segments().len(),
        1,
        "not merged into the first segment: {:?}",
        tl.segments()
    );
    let g = tl.segment_at_beat(s.beat);
    assert_eq!(
        (g.b0, g.t0, g.tempo),
        (0, SEC, sixty),
        "change does not start at its beat: {:?}",
        tl.segments()
    );
    assert_eq!(
        tl.beat_time(1),
        2 * SEC,
        "beat 1 does not follow the new tempo"
    );
    // nothing clicks before the anchor
    let c = tl.next_click_at_or_after(0).unwrap();
    assert_eq!((c.beat, c.time, c.accent), (0, SEC, true));
    // the same with a lead that still ends before the anchor, and a lead past it
    let tl0 = Timeline::start_at(
        SEC,
        Tempo::from_bpm(120.0).unwrap(),
        Meter::new(4).unwrap(),
        true,
    );
    assert_eq!(
        tl0.quantize(Quantum::Beat, 0, SEC - 1),
        Scheduled { beat: 0, time: SEC }
    );
    assert_eq!(
        tl0.quantize(Quantum::Beat, 0, SEC),
        Scheduled { beat: 0, time: SEC }
    );
    assert_eq!(
        tl0.quantize(Quantum::Beat, 0, SEC + 1),
        Scheduled {
            beat: 1,
            time: 1_500_000_000
        }
    );
    assert_eq!(
        tl0.quantize(Quantum::Bar, 0, SEC + 1),
        Scheduled {
            beat: 4,
            time: 3 * SEC
        }
    );
}

/// A Bar-quantized change requested before the anchor lands on the first downbeat at or
/// after `b0` (here beat 2), not before the anchor and not on the non-downbeat `b0`.
#[test]
fn bug_bar_change_before_first_segment_start_lands_on_first_downbeat() {
    // 120 BPM 4/4, beat 0 at t = 1 s, bars start at beats 2, 6, ...; stopped.
    let seg = Segment {
        t0: SEC,
        b0: 0,
        tempo: Tempo::from_bpm(120.0).unwrap(),
        meter: Meter::new(4).unwrap(),
        downbeat: 2,
        playing: false,
    };
    let mut tl = Timeline::new(seg);
    let s = tl
        .schedule(
            Change {
                kind: ChangeKind::Start,
                quantum: Quantum::Bar,
            },
            0,
            0,
        )
        .unwrap();
    assert_eq!(
        s,
        Scheduled {
            beat: 2,
            time: 2 * SEC
        }
    );
    assert_eq!(tl.segments().len(), 2, "{:?}", tl.segments());
    assert_eq!(tl.segments()[0], seg, "the anchor segment changed");
    let c = tl.next_click_at_or_after(0).unwrap();
    assert_eq!(
        (c.beat, c.time, c.accent),
        (2, 2 * SEC, true),
        "first click {c:?} is not the Start's downbeat"
    );
    // a Meter change merged at the anchor restarts the bars there
    let mut tl = Timeline::new(seg);
    let s = tl
        .schedule(
            Change {
                kind: ChangeKind::Meter(Meter::new(3).unwrap()),
                quantum: Quantum::Beat,
            },
            0,
            0,
        )
        .unwrap();
    assert_eq!(s, Scheduled { beat: 0, time: SEC });
    assert_eq!(tl.segments().len(), 1);
    assert!(tl.segment_at_beat(0).is_downbeat(0) && tl.segment_at_beat(3).is_downbeat(3));
}

/// A Start quantized to the first segment's `b0` (merged into it) used to also start the
/// beats between `now` and `t0` (beat -2 clicked at `now`, before the quantized beat 0).
/// Nothing clicks before the anchor: the first click is the Start's beat.
#[test]
fn bug_start_merged_into_future_first_segment_clicks_early() {
    // stopped, 120 BPM 4/4, beat 0 at t = 1 s; Start (Bar) requested at now = 0.
    let mut tl = Timeline::start_at(
        SEC,
        Tempo::from_bpm(120.0).unwrap(),
        Meter::new(4).unwrap(),
        false,
    );
    let s = tl
        .schedule(
            Change {
                kind: ChangeKind::Start,
                quantum: Quantum::Bar,
            },
            0,
            0,
        )
        .unwrap();
    assert_eq!(s, Scheduled { beat: 0, time: SEC });
    assert_eq!(
        tl.segments().len(),
        1,
        "not merged into the first segment: {:?}",
        tl.segments()
    );
    for q in [i64::MIN, -SEC, 0, SEC / 2, SEC - 1, SEC] {
        let c = tl.next_click_at_or_after(q).unwrap();
        assert_eq!(
            (c.beat, c.time, c.accent),
            (s.beat, s.time, true),
            "first click {c:?} (query {q}) is not the Start's beat"
        );
    }
    let c = tl.next_click_at_or_after(SEC + 1).unwrap();
    assert_eq!((c.beat, c.time, c.accent), (1, 1_500_000_000, false));
}
