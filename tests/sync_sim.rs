//! Seeded simulation of clock sync (`src/sync.rs`): a leader and a follower with
//! distorted clocks exchange pings over a simulated network; the follower feeds an
//! [`Estimator`] and a [`Slewer`] and its published session clock is compared with the
//! leader's, in virtual time only (no sleeping, no wall clock, no unseeded randomness).
//!
//! # World
//!
//! * True time `t` (ns) starts at a random `T0` in 10⁴–10⁶ s (large absolute values).
//! * Leader session clock `L(t) = t + offL + skewL·(t − T0)`, follower local clock
//!   `F(t) = t + offF + skewF·(t − T0)`; offsets uniform in ±1 s, skews in ±200 ppm
//!   (so up to 400 ppm between them).
//! * The follower pings every 200 ms (random phase; 50 ms in scenario 2b). Each packet
//!   is lost with probability `loss`; its one-way delay is `base + U(0, jitter)`, plus
//!   with probability `spike_p` a spike of `U(spike_lo, spike_hi)`. The leader holds a
//!   ping 20–100 µs before answering, and reads one snapshot of its map for `t2` and
//!   `t3`. Pongs may arrive out of order.
//! * The control loop ticks every 50 ms: it feeds the pongs that have arrived, then
//!   calls `Slewer::step` with the latest estimate, allowing a step only at the first
//!   [mature](bandsync::core::sync::Estimate::mature) one, which it waits for, as the room
//!   does. The error is `published.to_session(F(t)) − L(t)` at every tick (the
//!   published map is linear between ticks and continuous at them, so the extremes are
//!   at ticks).
//!
//! # Scenarios and the bounds asserted (every seed, every tick in the stated time)
//!
//! | # | scenario | network | bound on the error |
//! |---|---|---|---|
//! | 1 | clean LAN | 100 µs each way + U(0, 50 µs), no loss, 0.5 % spikes of 1–20 ms | ≤ 20 µs from 10 s |
//! | 2 | Wi-Fi-like (SPEC §6), 5 Hz pings | 3 ms each way + U(0, 20 ms), 2 % loss, 1 % spikes of 50–300 ms | ≤ 3.5 ms from 10 s, ≤ 1 ms from 40 s |
//! | 2b | the same, 20 Hz pings | as 2 | ≤ 1 ms from 10 s |
//! | 2c | the same, the room's settings (40 Hz pings, 2048-sample window, 200 ppm slew) | as 2 | ≤ 600 µs from 10 s, ≤ 250 µs from 30 s |
//! | 3 | asymmetric path | as 1, but one direction slower by `a`, uniform in ±400 µs | `|err − a/2| ≤ 20 µs` from 10 s (so `|err| ≤ |a|/2 + 20 µs`: the `a/2` bias is inherent to two-way sync) |
//! | 4 | leader clock jumps | as 1, and at 15 s the leader's session clock jumps by `J`, `|J|` in 0.2–3 ms (a new leader; new map generation ⇒ `Estimator::reset`) | ≤ 20 µs in 10–15 s; `|err| ≤ |J| + 20 µs` after the jump (it slews, never overshoots); ≤ 20 µs again from 15 s + `|J|`/500 ppm + 8 s |
//!
//! Why Wi-Fi at 5 Hz gets 3.5 ms at 10 s and not 1 ms: with `U(0, 20 ms)` per direction
//! the information is in the few luckiest samples, and after 48 of them even an oracle
//! that knew the rate exactly would be off by ~0.85 ms at p99 (see `src/sync.rs`); the
//! rate itself is then known to only ~±100 ppm. Accuracy grows with the number of
//! samples: scenario 2b meets 1 ms at 10 s by pinging at 20 Hz.
//!
//! In every scenario, after the first (allowed) step:
//!
//! * continuity: `|P_k.to_session(now_k) − P_{k−1}.to_session(now_k)| ≤ 1 ns`;
//! * bounded slew: the session time the published map advanced over a tick differs
//!   from `Δlocal · (1 + target rate)` by at most `Δlocal · 500 ppm` (+ 2 ns rounding);
//! * honesty: from 10 s on, the estimate's error is within its `uncertainty_ns`;
//! * the estimator never restarts its window on its own (`resyncs == 0`: the clock-step
//!   detector has no false alarms) and never panics.
//!
//! 200 seeds per scenario. A failure names its scenario and seed; replay one seed with
//! `SYNC_SIM_SEED=<seed> cargo test --test sync_sim <scenario>` (add `SYNC_SIM_TRACE=1`
//! and `-- --nocapture` to print every tick). `-- --nocapture` alone prints the worst
//! errors of each scenario.

use bandsync::core::sync::{Estimator, Sample, SampleVerdict, SlewConfig, Slewer, SyncConfig};
use bandsync::core::time::SessionMap;

const US: i64 = 1_000;
const MS: i64 = 1_000_000;
const SEC: i64 = 1_000_000_000;
const SEEDS: u64 = 200;
const TICK: i64 = 50 * MS;
/// `SlewConfig::default().max_slew_ppm`.
const MAX_SLEW_PPM: i64 = 500;
/// Scenario 4: when the leader's clock jumps.
const JUMP_AT: i64 = 15 * SEC;
/// Honesty is checked from here on.
const HONEST_FROM: i64 = 10 * SEC;

use bandsync::core::rng::SplitMix64 as Rng;

/// A distorted clock: `c(t) = t + off + skew·(t − t0)`.
#[derive(Clone, Copy, Debug)]
struct SimClock {
    off: i64,
    skew_ppb: i64,
    t0: i64,
}

impl SimClock {
    fn at(&self, t: i64) -> i64 {
        (t as i128
            + self.off as i128
            + (t as i128 - self.t0 as i128) * self.skew_ppb as i128 / 1_000_000_000) as i64
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    ping_every_ns: i64,
    base_ns: i64,
    /// One direction is slower by `a`, drawn per seed in `±asym_max` (a = fwd − back).
    asym_max_ns: i64,
    jitter_ns: i64,
    loss: f64,
    spike_p: f64,
    spike_ns: (i64, i64),
    /// Leader clock jump at [`JUMP_AT`], `|J|` drawn in this range, random sign.
    jump_ns: Option<(i64, i64)>,
    duration_ns: i64,
    /// `(from, bound)`: from `from` on (virtual time since the start; before the jump,
    /// if any), `|error − a/2| ≤ bound`.
    bounds: &'static [(i64, i64)],
    /// Use the room's estimator and slewer settings (`room::sync_config`,
    /// `room::slew_config`) instead of the defaults.
    room: bool,
}

const LAN: Scenario = Scenario {
    name: "clean LAN",
    ping_every_ns: 200 * MS,
    base_ns: 100 * US,
    asym_max_ns: 0,
    jitter_ns: 50 * US,
    loss: 0.0,
    spike_p: 0.005,
    spike_ns: (MS, 20 * MS),
    jump_ns: None,
    duration_ns: 30 * SEC,
    bounds: &[(10 * SEC, 20 * US)],
    room: false,
};

const WIFI: Scenario = Scenario {
    name: "Wi-Fi-like",
    ping_every_ns: 200 * MS,
    base_ns: 3 * MS,
    asym_max_ns: 0,
    jitter_ns: 20 * MS,
    loss: 0.02,
    spike_p: 0.01,
    spike_ns: (50 * MS, 300 * MS),
    jump_ns: None,
    duration_ns: 60 * SEC,
    bounds: &[(10 * SEC, 3_500 * US), (40 * SEC, MS)],
    room: false,
};

const WIFI_FAST: Scenario = Scenario {
    name: "Wi-Fi-like, 20 Hz pings",
    ping_every_ns: 50 * MS,
    duration_ns: 20 * SEC,
    bounds: &[(10 * SEC, MS)],
    ..WIFI
};

const WIFI_ROOM: Scenario = Scenario {
    name: "Wi-Fi-like, the room's 40 Hz pings and settings",
    ping_every_ns: 25 * MS,
    duration_ns: 60 * SEC,
    bounds: &[(10 * SEC, 600 * US), (30 * SEC, 250 * US)],
    room: true,
    ..WIFI
};

const ASYM: Scenario = Scenario {
    name: "asymmetric",
    asym_max_ns: 400 * US,
    ..LAN
};

const JUMP: Scenario = Scenario {
    name: "leader jump",
    jump_ns: Some((200 * US, 3 * MS)),
    duration_ns: 40 * SEC,
    ..LAN
};

/// What one seed saw.
#[derive(Debug, Default, Clone, PartialEq)]
struct Outcome {
    /// Worst |error − bias| from each `bounds[k].0` on (before the jump, if any).
    worst_after: Vec<i64>,
    /// Worst |error − bias| in each 10 s of the run (before the jump), for the summary.
    worst_by_10s: Vec<i64>,
    /// Expected bias (a/2 for asymmetric paths).
    bias_ns: i64,
    /// Scenario 4: the jump, the worst |error| after it, and after re-convergence.
    jump_ns: i64,
    worst_after_jump_ns: i64,
    worst_reconverged_ns: i64,
    /// Worst continuity defect, worst slew (ppm of the tick) after the first step.
    worst_cont_ns: i64,
    worst_slew_ppm: f64,
    /// Worst |estimate error| − uncertainty from [`HONEST_FROM`] on (≤ 0: honest).
    worst_dishonesty_ns: i64,
    first_estimate_s: f64,
    first_step_err_ns: i64,
    resyncs: u64,
    rejected: u64,
    accepted: u64,
}

struct Pong {
    arrive: i64,
    sample: Sample,
    clock_gen: u32,
}

fn simulate(sc: &Scenario, seed: u64) -> Outcome {
    let mut rng = Rng(seed ^ 0x005E_ED0F_C10C);
    let t0 = rng.range(10_000 * SEC, 1_000_000 * SEC);
    let leader = SimClock {
        off: rng.range(-SEC, SEC),
        skew_ppb: rng.range(-200_000, 200_000),
        t0,
    };
    let follower = SimClock {
        off: rng.range(-SEC, SEC),
        skew_ppb: rng.range(-200_000, 200_000),
        t0,
    };
    let asym = if sc.asym_max_ns > 0 {
        rng.range(-sc.asym_max_ns, sc.asym_max_ns)
    } else {
        0
    };
    let (base_fwd, base_back) = (sc.base_ns + asym.max(0), sc.base_ns + (-asym).max(0));
    let jump = match sc.jump_ns {
        Some((lo, hi)) => rng.range(lo, hi) * if rng.chance(0.5) { 1 } else { -1 },
        None => 0,
    };
    // The leader's session clock: a new generation of its map after the jump.
    let gen_at = |t: i64| u32::from(jump != 0 && t - t0 >= JUMP_AT);
    let session = |t: i64| leader.at(t) + if gen_at(t) == 1 { jump } else { 0 };

    // The network: every exchange, in order of arrival.
    let delay = |rng: &mut Rng, base: i64| -> Option<i64> {
        if rng.chance(sc.loss) {
            return None;
        }
        let spike = if rng.chance(sc.spike_p) {
            rng.range(sc.spike_ns.0, sc.spike_ns.1)
        } else {
            0
        };
        Some(base + rng.range(0, sc.jitter_ns) + spike)
    };
    let mut pongs = Vec::new();
    let mut ts = t0 + rng.range(0, sc.ping_every_ns);
    while ts < t0 + sc.duration_ns {
        let d1 = delay(&mut rng, base_fwd);
        let hold = rng.range(20 * US, 100 * US);
        let d2 = delay(&mut rng, base_back);
        if let (Some(d1), Some(d2)) = (d1, d2) {
            let (recv, send, arrive) = (ts + d1, ts + d1 + hold, ts + d1 + hold + d2);
            // one snapshot of the leader's map for both timestamps
            let clock_gen = gen_at(recv);
            let s_at = |t: i64| leader.at(t) + if clock_gen == 1 { jump } else { 0 };
            pongs.push(Pong {
                arrive,
                sample: Sample {
                    t1: follower.at(ts),
                    t2: s_at(recv),
                    t3: s_at(send),
                    t4: follower.at(arrive),
                },
                clock_gen,
            });
        }
        ts += sc.ping_every_ns;
    }
    pongs.sort_by_key(|p| p.arrive);

    let trace = std::env::var_os("SYNC_SIM_TRACE").is_some();
    let true_rate_ppm =
        ((1e9 + leader.skew_ppb as f64) / (1e9 + follower.skew_ppb as f64) - 1.0) * 1e6;
    let (sync, slew) = if sc.room {
        (
            bandsync::core::room::sync_config(),
            bandsync::core::room::slew_config(),
        )
    } else {
        (SyncConfig::default(), SlewConfig::default())
    };
    let mut est = Estimator::new(sync);
    let mut slewer = Slewer::new(slew);
    let mut clock_gen = 0u32;
    let mut next = 0;
    let mut prev: Option<(i64, SessionMap, SessionMap)> = None; // (now, published, target)
    let mut out = Outcome {
        bias_ns: asym / 2,
        jump_ns: jump,
        worst_after: vec![0; sc.bounds.len()],
        worst_dishonesty_ns: i64::MIN,
        ..Default::default()
    };
    let mut t = t0 + rng.range(0, TICK);
    while t < t0 + sc.duration_ns {
        while next < pongs.len() && pongs[next].arrive <= t {
            let p = &pongs[next];
            next += 1;
            // A new generation of the leader's map: start over. Late pongs of an older
            // generation are ignored.
            if p.clock_gen < clock_gen {
                continue;
            }
            if p.clock_gen > clock_gen {
                est.reset();
                clock_gen = p.clock_gen;
            }
            match est.handle_sample(p.sample) {
                SampleVerdict::Accepted => out.accepted += 1,
                SampleVerdict::Rejected(_) => out.rejected += 1,
            }
        }
        let now = follower.at(t);
        let elapsed = t - t0;
        let truth = session(t);
        // The first (stepping) map waits for a mature estimate, as the room does.
        if let Some(e) = est.estimate().filter(|e| prev.is_some() || e.mature()) {
            let first = prev.is_none();
            let published = slewer.step(now, &e.map, first);
            let err = published.to_session(now) - truth;
            let est_err = e.map.to_session(now) - truth;
            if first {
                out.first_estimate_s = elapsed as f64 / 1e9;
                out.first_step_err_ns = err;
            }
            if let Some((pnow, pmap, ptarget)) = prev {
                let cont = (published.to_session(now) - pmap.to_session(now)).abs();
                out.worst_cont_ns = out.worst_cont_ns.max(cont);
                let dt = now - pnow;
                let advanced = pmap.to_session(now) - pmap.to_session(pnow);
                let expected =
                    dt as i128 + dt as i128 * ptarget.rate_ppt as i128 / 1_000_000_000_000;
                let slew = advanced as i128 - expected;
                assert!(
                    slew.abs() <= dt as i128 * MAX_SLEW_PPM as i128 / 1_000_000 + 2,
                    "{}: seed {seed}: slew {slew} ns over a {dt} ns tick exceeds {MAX_SLEW_PPM} ppm at t = {:.2} s",
                    sc.name,
                    elapsed as f64 / 1e9
                );
                out.worst_slew_ppm = out.worst_slew_ppm.max(slew.abs() as f64 * 1e6 / dt as f64);
            }
            if trace {
                println!(
                    "t {:6.2} s  est err {:9} ns  published err {:9} ns  rate {:9.3} ppm (true {:9.3})  unc {:7} ns  n {:3}",
                    elapsed as f64 / 1e9,
                    est_err,
                    err,
                    e.rate_ppm,
                    true_rate_ppm,
                    e.uncertainty_ns,
                    e.samples
                );
            }
            prev = Some((now, published, e.map));
            // (an estimate of the leader's previous map generation is not dishonest)
            if elapsed >= HONEST_FROM && clock_gen == gen_at(t) {
                out.worst_dishonesty_ns = out
                    .worst_dishonesty_ns
                    .max(est_err.abs() - e.uncertainty_ns);
            }
            let dev = (err - out.bias_ns).abs();
            if jump == 0 || elapsed < JUMP_AT {
                for (k, &(from, _)) in sc.bounds.iter().enumerate() {
                    if elapsed >= from {
                        out.worst_after[k] = out.worst_after[k].max(dev);
                    }
                }
                let slot = (elapsed / (10 * SEC)) as usize;
                if out.worst_by_10s.len() <= slot {
                    out.worst_by_10s.resize(slot + 1, 0);
                }
                out.worst_by_10s[slot] = out.worst_by_10s[slot].max(dev);
            } else {
                out.worst_after_jump_ns = out.worst_after_jump_ns.max(err.abs());
                if elapsed >= reconverged_at(jump) {
                    out.worst_reconverged_ns = out.worst_reconverged_ns.max(err.abs());
                }
            }
        }
        t += TICK;
    }
    out.resyncs = est.stats().resyncs;
    out
}

/// When scenario 4 must be back within its bound: slew |J| at 500 ppm, plus 8 s for the
/// estimator to refill its window and the τ = 1.5 s tail to die out.
fn reconverged_at(jump: i64) -> i64 {
    JUMP_AT + jump.abs() * 1_000_000 / MAX_SLEW_PPM + 8 * SEC
}

fn check(sc: &Scenario, seed: u64, o: &Outcome) {
    let name = sc.name;
    let replay = format!("replay: SYNC_SIM_SEED={seed} cargo test --test sync_sim");
    assert!(
        o.first_estimate_s > 0.0,
        "{name}: seed {seed}: never got an estimate; {replay}"
    );
    for (k, &(from, bound)) in sc.bounds.iter().enumerate() {
        assert!(
            o.worst_after[k] <= bound,
            "{name}: seed {seed}: error {} ns (beyond the expected bias {} ns) exceeds {bound} ns after {} s; {replay}; {o:?}",
            o.worst_after[k],
            o.bias_ns,
            from / SEC
        );
    }
    assert!(
        o.worst_cont_ns <= 1,
        "{name}: seed {seed}: the published map stepped by {} ns; {replay}",
        o.worst_cont_ns
    );
    assert!(
        o.worst_dishonesty_ns <= 0,
        "{name}: seed {seed}: the estimate's error exceeds its uncertainty by {} ns; {replay}",
        o.worst_dishonesty_ns
    );
    assert_eq!(
        o.resyncs, 0,
        "{name}: seed {seed}: spurious clock-step detection; {replay}"
    );
    if o.jump_ns != 0 {
        let bound = sc.bounds[0].1;
        assert!(
            o.worst_after_jump_ns <= o.jump_ns.abs() + bound,
            "{name}: seed {seed}: error {} ns after a {} ns jump overshoots; {replay}",
            o.worst_after_jump_ns,
            o.jump_ns
        );
        assert!(
            o.worst_reconverged_ns <= bound,
            "{name}: seed {seed}: error {} ns from {:.1} s after a {} ns jump exceeds {bound} ns; {replay}",
            o.worst_reconverged_ns,
            reconverged_at(o.jump_ns) as f64 / 1e9,
            o.jump_ns
        );
    }
}

/// Runs every seed (or the one in `SYNC_SIM_SEED`) on two threads, checks each, and
/// prints a summary.
fn run(sc: &Scenario) {
    let seeds: Vec<u64> = match std::env::var("SYNC_SIM_SEED") {
        Ok(s) => vec![s.trim().parse().expect("SYNC_SIM_SEED must be an integer")],
        Err(_) => (0..SEEDS).collect(),
    };
    let mut all: Vec<(u64, Outcome)> = std::thread::scope(|scope| {
        let seeds = &seeds;
        let halves: Vec<_> = (0..2)
            .map(|k| {
                scope.spawn(move || {
                    seeds
                        .iter()
                        .skip(k)
                        .step_by(2)
                        .map(|&s| (s, simulate(sc, s)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves
            .into_iter()
            .flat_map(|h| h.join().expect("simulation thread panicked"))
            .collect()
    });
    all.sort_by_key(|(s, _)| *s);
    for (seed, o) in &all {
        check(sc, *seed, o);
    }

    let max_by =
        |f: &dyn Fn(&Outcome) -> i64| all.iter().map(|(s, o)| (f(o), *s)).max().unwrap_or((0, 0));
    let stages: Vec<String> = sc
        .bounds
        .iter()
        .enumerate()
        .map(|(k, &(from, bound))| {
            let (w, s) = max_by(&|o| o.worst_after[k]);
            format!(
                "from {} s: {} µs (seed {s}; bound {} µs)",
                from / SEC,
                w / US,
                bound / US
            )
        })
        .collect();
    let slots = all
        .iter()
        .map(|(_, o)| o.worst_by_10s.len())
        .max()
        .unwrap_or(0);
    let by_10s: Vec<String> = (0..slots)
        .map(|k| {
            let (w, s) = max_by(&|o| o.worst_by_10s.get(k).copied().unwrap_or(0));
            format!("{}–{} s: {} µs (seed {s})", k * 10, k * 10 + 10, w / US)
        })
        .collect();
    let first = all
        .iter()
        .map(|(_, o)| o.first_estimate_s)
        .fold(0.0, f64::max);
    let (first_err, _) = max_by(&|o| o.first_step_err_ns.abs());
    let (honest, _) = max_by(&|o| o.worst_dishonesty_ns);
    let slew = all
        .iter()
        .map(|(_, o)| o.worst_slew_ppm)
        .fold(0.0, f64::max);
    let (rejected, accepted) = all
        .iter()
        .fold((0, 0), |(r, a), (_, o)| (r + o.rejected, a + o.accepted));
    println!(
        "{}: {} seeds; worst error {}",
        sc.name,
        all.len(),
        stages.join(", ")
    );
    println!("{}: worst error by time: {}", sc.name, by_10s.join(", "));
    println!(
        "{}: first estimate by {first:.1} s (worst first-step error {} µs); max slew {slew:.0} ppm; \
         worst |est. error| − uncertainty {} µs; {:.1} % of pongs rejected",
        sc.name,
        first_err / US,
        honest / US,
        100.0 * rejected as f64 / (rejected + accepted).max(1) as f64
    );
    if sc.jump_ns.is_some() {
        let (w, s) = max_by(&|o| o.worst_reconverged_ns);
        let (over, s2) = max_by(&|o| o.worst_after_jump_ns - o.jump_ns.abs());
        println!(
            "{}: worst error after re-convergence {} µs (seed {s}); worst |err| − |J| after the jump {} µs (seed {s2})",
            sc.name,
            w / US,
            over / US
        );
    }
}

#[test]
fn scenario_1_clean_lan() {
    run(&LAN);
}

#[test]
fn scenario_2_wifi_like() {
    run(&WIFI);
}

#[test]
fn scenario_2b_wifi_like_fast_pings() {
    run(&WIFI_FAST);
}

#[test]
fn scenario_2c_wifi_like_room_settings() {
    run(&WIFI_ROOM);
}

#[test]
fn scenario_3_asymmetric_path() {
    run(&ASYM);
}

#[test]
fn scenario_4_leader_jump_is_slewed_never_stepped() {
    run(&JUMP);
}

#[test]
fn simulation_is_deterministic() {
    assert_eq!(simulate(&WIFI, 7), simulate(&WIFI, 7));
}
