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
//! * The follower pings every 200 ms (random phase). Each packet is lost with
//!   probability `loss`; its one-way delay is `base (per direction) + U(0, jitter)`,
//!   plus with probability `spike_p` a spike of `U(spike_lo, spike_hi)`. The leader
//!   holds a ping 20–100 µs before answering. Pongs may arrive out of order.
//! * The control loop ticks every 50 ms: it feeds the pongs that have arrived, then
//!   calls `Slewer::step` with the latest estimate, allowing a step only at the first
//!   estimate. The error is `published.to_session(F(t)) − L(t)` at every tick (the
//!   published map is linear between ticks and continuous at them, so the extremes are
//!   at ticks).
//!
//! # Scenarios and the bounds asserted (every seed, every tick after warm-up)
//!
//! | # | scenario | network | bound |
//! |---|---|---|---|
//! | 1 | clean LAN | 100 µs each way + U(0, 50 µs), no loss, 0.5 % spikes of 1–20 ms | ≤ 20 µs after 10 s |
//! | 2 | Wi-Fi-like (SPEC §6) | 3 ms each way + U(0, 20 ms), 2 % loss, 1 % spikes of 50–300 ms | ≤ 1 ms after 10 s |
//! | 3 | asymmetric | as 1, but one direction `a` slower, `a` uniform in ±400 µs | `|err − a/2| ≤ 20 µs` after 10 s (so `|err| ≤ |a|/2 + 20 µs`; the `a/2` bias is inherent to two-way sync) |
//! | 4 | leader clock jumps | as 1, and at 15 s the leader's session clock jumps by `J`, `|J|` in 0.2–3 ms (a new leader; new map generation ⇒ `Estimator::reset`) | ≤ 20 µs in 10–15 s; `|err| ≤ |J| + 20 µs` after the jump (no overshoot); ≤ 20 µs again from 15 s + `|J|`/500 ppm + 8 s |
//!
//! In every scenario, after the first (allowed) step:
//!
//! * continuity: `|P_k.to_session(now_k) − P_{k−1}.to_session(now_k)| ≤ 1 ns`;
//! * bounded slew: the session time the published map advanced over a tick differs
//!   from `Δlocal · (1 + target rate)` by at most `Δlocal · 500 ppm` (+ 2 ns rounding);
//! * the estimator never restarts its window on its own (`resyncs == 0`: the clock-step
//!   detector has no false alarms) and never panics.
//!
//! 256 seeds per scenario. A failure names its scenario and seed; replay one seed with
//! `SYNC_SIM_SEED=<seed> cargo test --test sync_sim <scenario>` (add `SYNC_SIM_TRACE=1` and
//! `-- --nocapture` to print every tick). Run with
//! `-- --nocapture` to see the worst errors per scenario.

use bandsync::clock::SessionMap;
use bandsync::sync::{Estimator, SampleVerdict, Sample, SlewConfig, Slewer, SyncConfig};

const US: i64 = 1_000;
const MS: i64 = 1_000_000;
const SEC: i64 = 1_000_000_000;
const SEEDS: u64 = 256;
const PING_EVERY: i64 = 200 * MS;
const TICK: i64 = 50 * MS;
const MAX_SLEW_PPM: i64 = 500;

/// SplitMix64: tiny, seeded, good enough for a simulation.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi);
        let span = (hi as i128 - lo as i128 + 1) as u128;
        (lo as i128 + (self.next_u64() as u128 % span) as i128) as i64
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// A clock distorted as the module docs say: `c(t) = t + off + skew·(t − t0)`.
#[derive(Clone, Copy, Debug)]
struct SimClock {
    off: i64,
    skew_ppb: i64,
    t0: i64,
}

impl SimClock {
    fn at(&self, t: i64) -> i64 {
        (t as i128 + self.off as i128 + (t as i128 - self.t0 as i128) * self.skew_ppb as i128 / 1_000_000_000) as i64
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    base_ns: i64,
    /// Extra base delay of one direction, drawn per seed in `±asym_max` (fwd − back).
    asym_max_ns: i64,
    jitter_ns: i64,
    loss: f64,
    spike_p: f64,
    spike_ns: (i64, i64),
    /// Leader clock jump at 15 s, `|J|` drawn in this range (ns), random sign.
    jump_ns: Option<(i64, i64)>,
    duration_ns: i64,
    warmup_ns: i64,
    bound_ns: i64,
}

const JUMP_AT: i64 = 15 * SEC;

const LAN: Scenario = Scenario {
    name: "clean LAN",
    base_ns: 100 * US,
    asym_max_ns: 0,
    jitter_ns: 50 * US,
    loss: 0.0,
    spike_p: 0.005,
    spike_ns: (MS, 20 * MS),
    jump_ns: None,
    duration_ns: 30 * SEC,
    warmup_ns: 10 * SEC,
    bound_ns: 20 * US,
};

const WIFI: Scenario = Scenario {
    name: "Wi-Fi-like",
    base_ns: 3 * MS,
    asym_max_ns: 0,
    jitter_ns: 20 * MS,
    loss: 0.02,
    spike_p: 0.01,
    spike_ns: (50 * MS, 300 * MS),
    jump_ns: None,
    duration_ns: 60 * SEC,
    warmup_ns: 10 * SEC,
    bound_ns: 100 * MS,
};

const ASYM: Scenario = Scenario { name: "asymmetric", asym_max_ns: 400 * US, ..LAN };

const JUMP: Scenario = Scenario { name: "leader jump", jump_ns: Some((200 * US, 3 * MS)), duration_ns: 40 * SEC, ..LAN };

/// What one seed saw.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// Worst |error − expected bias| after warm-up (before the jump, if any).
    worst_err_ns: i64,
    /// Worst |error| after the jump, and after re-convergence.
    worst_after_jump_ns: i64,
    worst_reconverged_ns: i64,
    jump_ns: i64,
    /// Worst |continuity| defect and worst slew (ppm of the tick) after the first step.
    worst_cont_ns: i64,
    worst_slew_ppm: f64,
    first_estimate_s: f64,
    first_step_err_ns: i64,
    resyncs: u64,
    rejected: u64,
    accepted: u64,
    /// Expected bias (a/2 for asymmetric paths).
    bias_ns: i64,
    /// Worst |error − bias| in each 10 s of the run (before a jump), for the summary.
    worst_by_10s: Vec<i64>,
}

struct Pong {
    arrive: i64,
    sample: Sample,
    gen: u32,
}

fn simulate(sc: &Scenario, seed: u64) -> Outcome {
    let mut rng = Rng(seed ^ 0x5EED_0F_C10C);
    let t0 = rng.range(10_000 * SEC, 1_000_000 * SEC);
    let leader = SimClock { off: rng.range(-SEC, SEC), skew_ppb: rng.range(-200_000, 200_000), t0 };
    let follower = SimClock { off: rng.range(-SEC, SEC), skew_ppb: rng.range(-200_000, 200_000), t0 };
    let asym = if sc.asym_max_ns > 0 { rng.range(-sc.asym_max_ns, sc.asym_max_ns) } else { 0 };
    let (base_fwd, base_back) = (sc.base_ns + asym.max(0), sc.base_ns + (-asym).max(0));
    let jump = match sc.jump_ns {
        Some((lo, hi)) => rng.range(lo, hi) * if rng.chance(0.5) { 1 } else { -1 },
        None => 0,
    };
    // the leader's session clock (after the jump, a new generation of its map)
    let session = |t: i64| leader.at(t) + if jump != 0 && t - t0 >= JUMP_AT { jump } else { 0 };
    let gen_at = |t: i64| u32::from(jump != 0 && t - t0 >= JUMP_AT);

    // The network: every exchange, in order of arrival.
    let mut delay = |rng: &mut Rng, base: i64| -> Option<i64> {
        if rng.chance(sc.loss) {
            return None;
        }
        let spike = if rng.chance(sc.spike_p) { rng.range(sc.spike_ns.0, sc.spike_ns.1) } else { 0 };
        Some(base + rng.range(0, sc.jitter_ns) + spike)
    };
    let mut pongs = Vec::new();
    let mut ts = t0 + rng.range(0, PING_EVERY);
    while ts < t0 + sc.duration_ns {
        let d1 = delay(&mut rng, base_fwd);
        let hold = rng.range(20 * US, 100 * US);
        let d2 = delay(&mut rng, base_back);
        if let (Some(d1), Some(d2)) = (d1, d2) {
            let (recv, send, arrive) = (ts + d1, ts + d1 + hold, ts + d1 + hold + d2);
            // the leader reads one snapshot of its map for both timestamps
            let gen = gen_at(recv);
            let s_at = |t: i64| leader.at(t) + if gen == 1 { jump } else { 0 };
            pongs.push(Pong {
                arrive,
                sample: Sample { t1: follower.at(ts), t2: s_at(recv), t3: s_at(send), t4: follower.at(arrive) },
                gen,
            });
        }
        ts += PING_EVERY;
    }
    pongs.sort_by_key(|p| p.arrive);

    let mut est = Estimator::new(SyncConfig::default());
    let mut slewer = Slewer::new(SlewConfig::default());
    let mut gen = 0u32;
    let mut next = 0;
    let mut prev: Option<(i64, SessionMap, SessionMap)> = None; // (now, published, target)
    let mut out = Outcome { bias_ns: asym / 2, jump_ns: jump, ..Default::default() };
    let trace = std::env::var_os("SYNC_SIM_TRACE").is_some();
    let true_rate_ppm = ((1e9 + leader.skew_ppb as f64) / (1e9 + follower.skew_ppb as f64) - 1.0) * 1e6;
    let mut t = t0 + rng.range(0, TICK);
    while t < t0 + sc.duration_ns {
        while next < pongs.len() && pongs[next].arrive <= t {
            let p = &pongs[next];
            next += 1;
            // a new generation of the leader's map: start over; ignore late pongs of an
            // older generation
            if p.gen < gen {
                continue;
            }
            if p.gen > gen {
                est.reset();
                gen = p.gen;
            }
            match est.handle_sample(p.sample) {
                SampleVerdict::Accepted => out.accepted += 1,
                SampleVerdict::Rejected(_) => out.rejected += 1,
            }
        }
        let now = follower.at(t);
        let elapsed = t - t0;
        if let Some(e) = est.estimate() {
            let first = prev.is_none();
            let published = slewer.step(now, &e.map, first);
            let err = published.to_session(now) - session(t);
            if first {
                out.first_estimate_s = elapsed as f64 / SEC as f64;
                out.first_step_err_ns = err;
            }
            if let Some((pnow, pmap, ptarget)) = prev {
                let cont = (published.to_session(now) - pmap.to_session(now)).abs();
                out.worst_cont_ns = out.worst_cont_ns.max(cont);
                let dt = now - pnow;
                let advanced = pmap.to_session(now) - pmap.to_session(pnow);
                let expected = dt as i128 + dt as i128 * ptarget.rate_ppt as i128 / 1_000_000_000_000;
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
                    e.map.to_session(now) - session(t),
                    err,
                    e.rate_ppm,
                    true_rate_ppm,
                    e.uncertainty_ns,
                    e.samples
                );
            }
            prev = Some((now, published, e.map));
            if jump == 0 || elapsed < JUMP_AT {
                let slot = (elapsed / (10 * SEC)) as usize;
                if out.worst_by_10s.len() <= slot {
                    out.worst_by_10s.resize(slot + 1, 0);
                }
                out.worst_by_10s[slot] = out.worst_by_10s[slot].max((err - out.bias_ns).abs());
                if elapsed >= sc.warmup_ns {
                    out.worst_err_ns = out.worst_err_ns.max((err - out.bias_ns).abs());
                }
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

/// When scenario 4 must be back within the bound: slew |J| at 500 ppm, plus 8 s for the
/// estimator to refill its window and the τ = 1.5 s tail to die out.
fn reconverged_at(jump: i64) -> i64 {
    JUMP_AT + jump.abs() * 1_000_000 / MAX_SLEW_PPM + 8 * SEC
}

fn check(sc: &Scenario, seed: u64, o: &Outcome) {
    let replay = format!("replay: SYNC_SIM_SEED={seed} cargo test --test sync_sim");
    assert!(o.first_estimate_s > 0.0, "{}: seed {seed}: never got an estimate; {replay}", sc.name);
    assert!(
        o.worst_err_ns <= sc.bound_ns,
        "{}: seed {seed}: error {} ns (vs expected bias {} ns) exceeds the {} ns bound after {} s; {replay}; {o:?}",
        sc.name,
        o.worst_err_ns,
        o.bias_ns,
        sc.bound_ns,
        sc.warmup_ns / SEC
    );
    assert!(o.worst_cont_ns <= 1, "{}: seed {seed}: the published map stepped by {} ns; {replay}", sc.name, o.worst_cont_ns);
    assert_eq!(o.resyncs, 0, "{}: seed {seed}: spurious clock-step detection; {replay}", sc.name);
    if o.jump_ns != 0 {
        assert!(
            o.worst_after_jump_ns <= o.jump_ns.abs() + sc.bound_ns,
            "{}: seed {seed}: error {} ns after a {} ns jump overshoots; {replay}",
            sc.name,
            o.worst_after_jump_ns,
            o.jump_ns
        );
        assert!(
            o.worst_reconverged_ns <= sc.bound_ns,
            "{}: seed {seed}: error {} ns from {:.1} s after a {} ns jump exceeds {} ns; {replay}",
            sc.name,
            o.worst_reconverged_ns,
            reconverged_at(o.jump_ns) as f64 / 1e9,
            o.jump_ns,
            sc.bound_ns
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
    let halves: Vec<Vec<(u64, Outcome)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = [0, 1]
            .into_iter()
            .map(|k| {
                let seeds = &seeds;
                scope.spawn(move || {
                    seeds.iter().skip(k).step_by(2).map(|&seed| (seed, simulate(sc, seed))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("simulation thread panicked")).collect()
    });
    let mut all: Vec<(u64, Outcome)> = halves.into_iter().flatten().collect();
    all.sort_by_key(|(s, _)| *s);
    for (seed, o) in &all {
        check(sc, *seed, o);
    }
    let worst = all.iter().max_by_key(|(_, o)| o.worst_err_ns).expect("at least one seed");
    let first_worst = all.iter().map(|(_, o)| o.first_step_err_ns.abs()).max().unwrap_or(0);
    let first_est = all.iter().map(|(_, o)| o.first_estimate_s).fold(0.0, f64::max);
    let slew = all.iter().map(|(_, o)| o.worst_slew_ppm).fold(0.0, f64::max);
    let rejected: u64 = all.iter().map(|(_, o)| o.rejected).sum();
    let accepted: u64 = all.iter().map(|(_, o)| o.accepted).sum();
    let mut errs: Vec<i64> = all.iter().map(|(_, o)| o.worst_err_ns).collect();
    errs.sort_unstable();
    println!(
        "{}: {} seeds; worst error after warm-up {} ns (seed {}), median per-seed worst {} ns, bound {} ns; \
         first estimate by {:.1} s, worst first-step error {} µs; max slew {:.0} ppm; rejected {:.1} % of pongs",
        sc.name,
        all.len(),
        worst.1.worst_err_ns,
        worst.0,
        errs[errs.len() / 2],
        sc.bound_ns,
        first_est,
        first_worst / US,
        slew,
        100.0 * rejected as f64 / (rejected + accepted).max(1) as f64
    );
    let slots = all.iter().map(|(_, o)| o.worst_by_10s.len()).max().unwrap_or(0);
    let by_10s: Vec<String> = (0..slots)
        .map(|k| {
            let w = all.iter().filter_map(|(_, o)| o.worst_by_10s.get(k)).max().copied().unwrap_or(0);
            format!("{}-{} s: {} µs", k * 10, k * 10 + 10, w / US)
        })
        .collect();
    println!("{}: worst error by time: {}", sc.name, by_10s.join(", "));
    if sc.jump_ns.is_some() {
        let w = all.iter().map(|(_, o)| o.worst_reconverged_ns).max().unwrap_or(0);
        let over = all.iter().map(|(_, o)| o.worst_after_jump_ns - o.jump_ns.abs()).max().unwrap_or(0);
        println!("{}: worst error after re-convergence {w} ns; worst |err| − |J| after the jump {over} ns", sc.name);
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
fn scenario_3_asymmetric_path() {
    run(&ASYM);
}

#[test]
fn scenario_4_leader_jump_is_slewed_never_stepped() {
    run(&JUMP);
}

#[test]
fn simulation_is_deterministic() {
    let a = simulate(&WIFI, 7);
    let b = simulate(&WIFI, 7);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}
