//! Keeping Link apps on the room's beat between their clock measurements.
//!
//! A Link app measures its offset to our ghost clock when it joins and then only every
//! 30 s (Ch. 2 §7.3); in between its ghost clock is its own host clock plus that
//! offset. The room's ghost clock runs at the room clock's rate (the leader's crystal),
//! so an app whose crystal is 100 ppm off drifts 0.1 ms per second against the room:
//! up to 3 ms before its next measurement. Link has no rate model to fix that, and an
//! app cannot be asked to measure more often.
//!
//! So the room measures the apps instead ([`AppClocks`]): every box pings each Link app
//! of the room's session on its measurement endpoint (the same ping/pong apps use on
//! us, Ch. 2 §4, with our *ghost* time in `__ht`, which a responder never interprets)
//! and keeps, per app, `d = app ghost − our ghost` at the midpoint of the fastest round
//! trip of a short chain. Between the app's own measurements `d` is a line (the two
//! crystals' rate difference); each time the app pings us it re-measures and `d` jumps
//! back near 0, so a new *segment* starts. [`AppClocks::estimate`] fits the line
//! through the current segment's last seconds (each sample weighed by how close its
//! round trip was to the fastest: on Wi-Fi the fast ones carry the truth) and
//! extrapolates it to now, with its standard error.
//!
//! The room then **steers its ghost clock onto the apps'**: ghost time is
//! `session time + 2⁵⁰ µs + shift`, and the leader moves `shift` by the estimated `d`
//! whenever it exceeds [`STEP_MIN_US`] and three standard errors ([`step`]: noise is
//! never steered); the shift is replicated to every box
//! (the leader's `Announce`), so every box answers pings and describes the room's lines
//! on the same ghost clock. The room's lines are re-described in the new ghost time, so
//! an app's beats land back on the room's clicks at once, with the room's exact tempo
//! (steering the phase, not the rate, keeps the tempo apps show equal to the room's).
//! An app's next re-measurement then finds nothing to correct.
//!
//! Bounds: at most [`MAX_APPS`] apps probed per gateway, one chain of at most
//! [`CHAIN_PINGS`] pings per app every [`PROBE_EVERY_US`], [`MAX_SAMPLES`] samples per
//! app. A pong from an app is only ever a sample of that app: steps are the *median*
//! app's `d` (the one nearer 0 of the two middle ones), at most [`STEP_MAX_US`], so one
//! lying app among honest ones moves nothing, and an app alone can only move its own
//! phase. Pure: every time is an argument.

use std::collections::{BTreeMap, VecDeque};

use ::core::net::SocketAddrV4;

use crate::core::link::codec::{encode_ping, MeasurementPayload, NodeId};

/// How often each app is probed.
pub const PROBE_EVERY_US: i64 = 250_000;
/// Round trips per probe chain; the fastest one gives the sample.
pub const CHAIN_PINGS: u8 = 4;
/// A pong later than this after its ping ends the chain.
pub const CHAIN_TIMEOUT_US: i64 = 50_000;
/// Round trips slower than this give no sample.
pub const MAX_RTT_US: i64 = 20_000;
/// The line is fitted through the current segment's samples of this long.
pub const WINDOW_US: i64 = 4_000_000;
/// Samples needed for an estimate, and the span they must cover.
pub const MIN_SAMPLES: usize = 4;
pub const MIN_SPAN_US: i64 = 700_000;
/// After an app's ping (it is re-measuring us), chains in flight are dropped and a new
/// segment starts once it has been quiet this long.
pub const QUIET_US: i64 = 300_000;
/// Apps probed per gateway.
pub const MAX_APPS: usize = 16;
/// Samples kept per app.
pub const MAX_SAMPLES: usize = 64;
/// The room's ghost clock is stepped when the apps' offset is at least this…
pub const STEP_MIN_US: i64 = 40;
/// …and never by more than this: a larger offset is an app that has not measured us
/// yet (or lies); its own re-measurement settles it.
pub const STEP_MAX_US: i64 = 2_000;
/// At most one step per this long.
pub const STEP_EVERY_US: i64 = 400_000;
/// The fitted rate is taken as at most this (ppm).
const MAX_SLOPE: f64 = 500e-6;
/// Round-trip excess (over the window's fastest) at which a sample weighs half.
const RTT_SCALE_US: f64 = 200.0;
/// A step is taken only when the offset is this many standard errors from 0.
const STEP_SIGMAS: f64 = 3.0;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    /// Our ghost time at the round trip's midpoint, µs.
    g: i64,
    /// App ghost − our ghost, µs.
    d: f64,
    /// The round trip it came from, µs.
    rtt: i64,
    seg: u32,
}

#[derive(Clone, Debug)]
struct Chain {
    left: u8,
    /// (rtt, our ghost at the midpoint, d) of the fastest round trip so far.
    best: Option<(i64, i64, f64)>,
    deadline_us: i64,
}

#[derive(Clone, Debug)]
struct Track {
    node: NodeId,
    samples: VecDeque<Sample>,
    seg: u32,
    /// Host time of the app's last ping to us.
    their_ping_us: Option<i64>,
    /// A new segment starts with the next sample.
    new_segment: bool,
    next_probe_us: i64,
    chain: Option<Chain>,
}

/// What the probes say about the apps' clocks now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// App ghost − our ghost now, µs (the median app's).
    pub offset_us: f64,
    /// That app's estimate's standard error, µs.
    pub se_us: f64,
    /// Apps with an estimate.
    pub apps: usize,
}

/// The Link apps' ghost clocks, measured against ours (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct AppClocks {
    /// By measurement endpoint.
    apps: BTreeMap<SocketAddrV4, Track>,
    /// Samples taken (for the counters).
    pub samples_taken: u64,
}

impl AppClocks {
    /// The apps to probe: `(node, measurement endpoint)` of each Link app in our
    /// session. Apps that left are forgotten; beyond [`MAX_APPS`] the rest wait.
    pub fn set_apps(&mut self, now_us: i64, apps: impl Iterator<Item = (NodeId, SocketAddrV4)>) {
        let mut keep: BTreeMap<SocketAddrV4, NodeId> = BTreeMap::new();
        for (node, ep) in apps {
            if keep.len() < MAX_APPS {
                keep.insert(ep, node);
            }
        }
        self.apps
            .retain(|ep, t| keep.get(ep).is_some_and(|n| *n == t.node));
        for (ep, node) in keep {
            self.apps.entry(ep).or_insert_with(|| Track {
                node,
                samples: VecDeque::new(),
                seg: 0,
                their_ping_us: None,
                new_segment: false,
                next_probe_us: now_us,
                chain: None,
            });
        }
    }

    /// A ping from `from`: if it is an app we probe, it is re-measuring us.
    pub fn on_their_ping(&mut self, now_us: i64, from: SocketAddrV4) {
        if let Some(t) = self.apps.get_mut(&from) {
            t.their_ping_us = Some(now_us);
            t.new_segment = true;
            t.chain = None;
        }
    }

    /// A pong from `from` (not a foreign-session measurement's); `g_now` is our ghost
    /// time now. Returns the next ping of the chain, if any. Pongs from endpoints we
    /// do not probe, or without our ghost time, are ignored.
    pub fn on_pong(
        &mut self,
        now_us: i64,
        g_now: i64,
        from: SocketAddrV4,
        p: &MeasurementPayload,
        session: NodeId,
    ) -> Option<Vec<u8>> {
        let t = self.apps.get_mut(&from)?;
        let c = t.chain.as_mut()?;
        let (Some(sent), Some(gt)) = (p.host_time, p.ghost_time) else {
            return None;
        };
        if p.session_id != Some(session) {
            t.chain = None;
            return None;
        }
        let rtt = g_now.saturating_sub(sent);
        if (0..=MAX_RTT_US).contains(&rtt) {
            let mid = sent + rtt / 2;
            let d = gt as f64 - (sent as f64 + g_now as f64) / 2.0;
            if c.best.is_none_or(|(r, _, _)| rtt < r) {
                c.best = Some((rtt, mid, d));
            }
        }
        c.left = c.left.saturating_sub(1);
        if c.left > 0 {
            c.deadline_us = now_us.saturating_add(CHAIN_TIMEOUT_US);
            return Some(encode_ping(g_now, None));
        }
        self.finish(from, now_us);
        None
    }

    fn finish(&mut self, ep: SocketAddrV4, now_us: i64) {
        let Some(t) = self.apps.get_mut(&ep) else {
            return;
        };
        let Some(c) = t.chain.take() else { return };
        let quiet = t
            .their_ping_us
            .is_none_or(|p| now_us.saturating_sub(p) >= QUIET_US);
        let Some((rtt, g, d)) = c.best else { return };
        if !quiet {
            return;
        }
        if t.new_segment {
            t.seg = t.seg.wrapping_add(1);
            t.new_segment = false;
        }
        t.samples.push_back(Sample {
            g,
            d,
            rtt,
            seg: t.seg,
        });
        while t.samples.len() > MAX_SAMPLES {
            t.samples.pop_front();
        }
        self.samples_taken += 1;
    }

    /// Timers: chains that timed out end, due probes start. Returns the pings to send;
    /// `g_now` is our ghost time now.
    pub fn on_timeout(&mut self, now_us: i64, g_now: i64) -> Vec<(SocketAddrV4, Vec<u8>)> {
        let eps: Vec<SocketAddrV4> = self.apps.keys().copied().collect();
        let mut out = Vec::new();
        for ep in eps {
            if self.apps[&ep]
                .chain
                .as_ref()
                .is_some_and(|c| now_us >= c.deadline_us)
            {
                self.finish(ep, now_us);
            }
            let t = self.apps.get_mut(&ep).expect("listed above");
            if t.chain.is_none() && now_us >= t.next_probe_us {
                t.next_probe_us = now_us.saturating_add(PROBE_EVERY_US);
                t.chain = Some(Chain {
                    left: CHAIN_PINGS,
                    best: None,
                    deadline_us: now_us.saturating_add(CHAIN_TIMEOUT_US),
                });
                out.push((ep, encode_ping(g_now, None)));
            }
        }
        out
    }

    /// When [`AppClocks::on_timeout`] must next run (host µs).
    pub fn next_timeout(&self) -> Option<i64> {
        self.apps
            .values()
            .map(|t| match &t.chain {
                Some(c) => c.deadline_us,
                None => t.next_probe_us,
            })
            .min()
    }

    /// Our ghost clock moved by `delta_us` (the room stepped it): the samples are
    /// re-expressed in the new ghost time, so the lines go on across the step.
    pub fn rebase(&mut self, delta_us: i64) {
        for t in self.apps.values_mut() {
            for s in &mut t.samples {
                s.g = s.g.saturating_add(delta_us);
                s.d -= delta_us as f64;
            }
            if let Some(c) = &mut t.chain {
                // a chain straddling the step would mix both clocks
                c.best = None;
            }
        }
    }

    /// The apps' offset now (`g_now`: our ghost time), from each app's current segment.
    pub fn estimate(&self, g_now: i64) -> Option<Estimate> {
        let mut ds: Vec<(f64, f64)> = self
            .apps
            .values()
            .filter(|t| !t.new_segment)
            .filter_map(|t| app_offset(&t.samples, t.seg, g_now))
            .collect();
        if ds.is_empty() {
            return None;
        }
        ds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = ds.len();
        let (offset_us, se_us) = if n % 2 == 1 {
            ds[n / 2]
        } else {
            let (a, b) = (ds[n / 2 - 1], ds[n / 2]);
            if a.0.abs() <= b.0.abs() {
                a
            } else {
                b
            }
        };
        Some(Estimate {
            offset_us,
            se_us,
            apps: n,
        })
    }

    /// No app is probed.
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }
}

/// One app's offset at `g_now` and its standard error (µs): the weighted least-squares
/// line through its current segment's samples of the last [`WINDOW_US`], extrapolated
/// (slope bounded by 500 ppm). A sample's error is at most half its round trip's excess
/// over the fastest one (the asymmetry it can hide), so it weighs
/// `1 / (1 + (excess / RTT_SCALE_US)²)`: on a jittery link the fast round trips decide.
fn app_offset(samples: &VecDeque<Sample>, seg: u32, g_now: i64) -> Option<(f64, f64)> {
    let win: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.seg == seg && g_now.saturating_sub(s.g) <= WINDOW_US)
        .collect();
    if win.len() < MIN_SAMPLES {
        return None;
    }
    let span = win.last()?.g - win.first()?.g;
    if span < MIN_SPAN_US {
        return None;
    }
    let min_rtt = win.iter().map(|s| s.rtt).min()?;
    let pts: Vec<(f64, f64, f64)> = win
        .iter()
        .map(|s| {
            let excess = (s.rtt - min_rtt) as f64 / RTT_SCALE_US;
            ((s.g - g_now) as f64, s.d, 1.0 / (1.0 + excess * excess))
        })
        .collect();
    let sw: f64 = pts.iter().map(|p| p.2).sum();
    let mx = pts.iter().map(|p| p.2 * p.0).sum::<f64>() / sw;
    let my = pts.iter().map(|p| p.2 * p.1).sum::<f64>() / sw;
    let sxx: f64 = pts.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let slope = slope.clamp(-MAX_SLOPE, MAX_SLOPE);
    // at x = 0 (now)
    let at_now = my - slope * mx;
    // residual variance (weighted), then the intercept's standard error at x = 0
    let dof = (pts.len() as f64 - 2.0).max(1.0);
    let var = pts
        .iter()
        .map(|p| p.2 * (p.1 - (my + slope * (p.0 - mx))).powi(2))
        .sum::<f64>()
        / sw
        * pts.len() as f64
        / dof;
    let se = (var * (1.0 / sw + if sxx > 0.0 { mx * mx / sxx } else { 0.0 })).sqrt();
    Some((at_now, se))
}

/// The step the room's ghost clock should take now (µs), if any: the apps' offset when
/// it is at least [`STEP_MIN_US`] (and three standard errors of its estimate: noise is
/// never steered) and at most [`STEP_MAX_US`], at most once per
/// [`STEP_EVERY_US`] (`last_step_us`: host time of the last step).
pub fn step(est: Option<Estimate>, now_us: i64, last_step_us: Option<i64>) -> Option<i64> {
    let e = est?;
    if last_step_us.is_some_and(|t| now_us.saturating_sub(t) < STEP_EVERY_US) {
        return None;
    }
    let d = e.offset_us.round();
    if !d.is_finite()
        || d.abs() < (STEP_MIN_US as f64).max(STEP_SIGMAS * e.se_us)
        || d.abs() > STEP_MAX_US as f64
    {
        return None;
    }
    Some(d as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::link::codec::{decode_measurement, MeasurementKind};

    const SESS: NodeId = NodeId([7; 8]);

    fn ep(n: u8) -> SocketAddrV4 {
        SocketAddrV4::new(::core::net::Ipv4Addr::new(10, 0, 0, n), 20000)
    }

    /// An app whose ghost clock is `host·(1 + ppm·1e-6) + offset` (our ghost is host +
    /// shift), answering after `half` µs each way.
    struct App {
        offset: f64,
        ppm: f64,
        half: i64,
        /// Extra delay each way, uniform in 0..jitter µs, seeded; with `tail`, only
        /// one datagram in ten is delayed that much, the others by 0..300 µs (Wi-Fi).
        jitter: i64,
        tail: bool,
        rng: std::cell::Cell<u64>,
    }

    fn app(offset: f64, ppm: f64, half: i64) -> App {
        App {
            offset,
            ppm,
            half,
            jitter: 0,
            tail: false,
            rng: std::cell::Cell::new(7),
        }
    }

    impl App {
        fn rand(&self) -> u64 {
            let mut z = self.rng.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
            self.rng.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn delay(&self) -> i64 {
            if self.jitter == 0 {
                return self.half;
            }
            let span = if self.tail && self.rand() % 10 != 0 {
                300
            } else {
                self.jitter
            };
            self.half + (self.rand() % span as u64) as i64
        }

        fn ghost(&self, host: i64) -> i64 {
            (host as f64 * (1.0 + self.ppm * 1e-6) + self.offset).round() as i64
        }
    }

    /// Run probes against `apps` from `from` to `to` (host µs = our ghost µs + shift).
    fn run(c: &mut AppClocks, apps: &[(SocketAddrV4, &App)], from: i64, to: i64, shift: i64) {
        let mut now = from;
        while now < to {
            c.set_apps(now, apps.iter().map(|(e, _)| (NodeId([1; 8]), *e)));
            let mut pings: Vec<_> = c
                .on_timeout(now, now + shift)
                .into_iter()
                .map(|(e, p)| (e, p, now))
                .collect();
            while let Some((e, ping, sent_at)) = pings.pop() {
                let app = apps.iter().find(|(x, _)| *x == e).unwrap().1;
                let msg = decode_measurement(&ping).unwrap();
                assert_eq!(msg.kind, MeasurementKind::Ping);
                let at_app = sent_at + app.delay();
                let back = at_app + app.delay();
                let pong = MeasurementPayload {
                    session_id: Some(SESS),
                    ghost_time: Some(app.ghost(at_app)),
                    host_time: msg.payload.host_time,
                    prev_ghost_time: None,
                };
                if let Some(next) = c.on_pong(back, back + shift, e, &pong, SESS) {
                    pings.push((e, next, back));
                }
            }
            now += 10_000;
        }
    }

    #[test]
    fn a_drifting_app_is_estimated_where_it_is_now() {
        let mut c = AppClocks::default();
        let app = app(300.0, 100.0, 150);
        run(&mut c, &[(ep(1), &app)], 0, 3_000_000, 0);
        let now = 3_000_000;
        let e = c.estimate(now).expect("an estimate after 3 s");
        let truth = app.ghost(now) as f64 - now as f64;
        assert!((e.offset_us - truth).abs() < 3.0, "{e:?} vs {truth}");
        assert_eq!(e.apps, 1);
        assert!(c.samples_taken >= 10);
    }

    #[test]
    fn no_estimate_before_enough_samples_nor_during_a_re_measurement() {
        let mut c = AppClocks::default();
        let app = app(0.0, 50.0, 100);
        run(&mut c, &[(ep(1), &app)], 0, 400_000, 0);
        assert_eq!(c.estimate(400_000), None, "span too short");
        run(&mut c, &[(ep(1), &app)], 400_000, 2_000_000, 0);
        assert!(c.estimate(2_000_000).is_some());
        // the app re-measures: nothing until a new segment has its own samples
        c.on_their_ping(2_000_000, ep(1));
        assert_eq!(c.estimate(2_000_000), None);
        let moved = App {
            offset: -2_000_000.0 * 50e-6,
            ..app
        };
        run(&mut c, &[(ep(1), &moved)], 2_000_000, 2_250_000, 0);
        assert_eq!(c.estimate(2_250_000), None, "quiet period, then too few");
        run(&mut c, &[(ep(1), &moved)], 2_250_000, 4_000_000, 0);
        let e = c.estimate(4_000_000).unwrap();
        let truth = moved.ghost(4_000_000) as f64 - 4_000_000.0;
        assert!((e.offset_us - truth).abs() < 3.0, "{e:?} vs {truth}");
    }

    /// Steer onto `app` for `secs`: (steps, |error| µs after the first step).
    fn steer_for(app: &App, secs: i64) -> (usize, Vec<f64>) {
        let mut c = AppClocks::default();
        // our ghost = host + shift; each step moves shift by the estimate
        let (mut shift, mut last, mut errs) = (0i64, None, Vec::new());
        let mut steps = 0;
        let mut now = 0;
        while now < secs * 1_000_000 {
            run(&mut c, &[(ep(1), app)], now, now + 100_000, shift);
            now += 100_000;
            let g = now + shift;
            if let Some(d) = step(c.estimate(g), now, last) {
                shift += d;
                c.rebase(d);
                last = Some(now);
                steps += 1;
            }
            if steps > 0 {
                errs.push((app.ghost(now) - (now + shift)).abs() as f64);
            }
        }
        errs.sort_by(f64::total_cmp);
        (steps, errs)
    }

    #[test]
    fn steps_follow_the_app_and_rebase_keeps_the_line() {
        let (steps, errs) = steer_for(&app(0.0, -100.0, 200), 30);
        assert!(steps >= 10, "{steps} steps");
        // −100 ppm: 40 µs per 0.4 s; never beyond a step and noise
        let worst = errs.last().copied().unwrap_or(f64::MAX);
        assert!(worst < 120.0, "{worst} µs");
    }

    #[test]
    fn over_wi_fi_the_fast_round_trips_decide() {
        // one datagram in ten 0–20 ms late, the others 0–0.3 ms; +100 ppm
        let mut a = app(0.0, 100.0, 500);
        (a.jitter, a.tail) = (20_000, true);
        let (steps, errs) = steer_for(&a, 60);
        let p95 = errs[errs.len() * 95 / 100];
        let worst = errs[errs.len() - 1];
        assert!(steps >= 20, "{steps} steps");
        assert!(p95 < 200.0 && worst < 500.0, "p95 {p95} µs, max {worst} µs");
    }

    #[test]
    fn noise_is_never_steered() {
        // every datagram 0–5 ms late, independently: the estimates scatter by
        // hundreds of µs, and steps are taken only where they are sure — never
        // worse than not steering (the app's drift alone: 100 ppm, here for 60 s)
        let mut a = app(0.0, 100.0, 500);
        a.jitter = 5_000;
        let (_, errs) = steer_for(&a, 60);
        let p95 = errs[errs.len() * 95 / 100];
        let unsteered_p95 = 0.95 * 60e6 * 100e-6;
        assert!(p95 < unsteered_p95 / 3.0, "p95 {p95} µs");
        // and a still app over the same link: no step at all
        let mut still = app(0.0, 0.0, 500);
        still.jitter = 5_000;
        let (steps, _) = steer_for(&still, 60);
        assert!(steps <= 1, "{steps} steps on noise");
    }

    #[test]
    fn one_lying_app_among_honest_ones_moves_nothing() {
        let mut c = AppClocks::default();
        let honest = app(10.0, 0.0, 100);
        let liar = app(1_500.0, 0.0, 100);
        run(
            &mut c,
            &[(ep(1), &honest), (ep(2), &honest), (ep(3), &liar)],
            0,
            2_000_000,
            0,
        );
        let e = c.estimate(2_000_000).unwrap();
        assert_eq!(e.apps, 3);
        assert!((e.offset_us - 10.0).abs() < 2.0, "{e:?}");
        assert_eq!(step(Some(e), 2_000_000, None), None);
        // two apps: the one nearer 0
        let mut c = AppClocks::default();
        run(&mut c, &[(ep(1), &honest), (ep(3), &liar)], 0, 2_000_000, 0);
        assert!((c.estimate(2_000_000).unwrap().offset_us - 10.0).abs() < 2.0);
    }

    #[test]
    fn steps_are_bounded_and_spaced() {
        let e = |d: f64| {
            Some(Estimate {
                offset_us: d,
                se_us: 5.0,
                apps: 1,
            })
        };
        assert_eq!(step(e(39.0), 1_000_000, None), None);
        assert_eq!(step(e(-41.0), 1_000_000, None), Some(-41));
        assert_eq!(step(e(2_500.0), 1_000_000, None), None);
        assert_eq!(step(e(f64::NAN), 1_000_000, None), None);
        assert_eq!(step(e(100.0), 1_000_000, Some(700_000)), None);
        assert_eq!(step(e(100.0), 1_100_000, Some(700_000)), Some(100));
        assert_eq!(step(None, 1_000_000, None), None);
    }

    #[test]
    fn pongs_from_strangers_or_other_sessions_are_no_samples() {
        let mut c = AppClocks::default();
        c.set_apps(0, [(NodeId([1; 8]), ep(1))].into_iter());
        let pings = c.on_timeout(0, 0);
        assert_eq!(pings.len(), 1);
        let pong = MeasurementPayload {
            session_id: Some(SESS),
            ghost_time: Some(5),
            host_time: Some(0),
            prev_ghost_time: None,
        };
        assert_eq!(c.on_pong(100, 100, ep(9), &pong, SESS), None);
        let other = MeasurementPayload {
            session_id: Some(NodeId([8; 8])),
            ..pong
        };
        assert_eq!(c.on_pong(100, 100, ep(1), &other, SESS), None);
        assert_eq!(c.samples_taken, 0);
        // forgotten when it leaves
        c.set_apps(10, std::iter::empty());
        assert!(c.is_empty());
        assert_eq!(c.next_timeout(), None);
    }
}
