//! Replays callback timings recorded with `BANDSYNC_DEBUG_TIMING_DUMP=PATH` (one
//! `read_ns delay_ns frame` line per callback) through the frame clock, and reports how
//! far its estimate moves against the true line over any 0.5 s (one beat at 120 BPM):
//! the error a click gap would show. The true line has the nominal rate (right for the
//! JACK dummy driver, which runs on the same clock); `LS_SLOPE=1` fits the slope
//! instead; `TRACE=1` prints the estimate every 24 callbacks.
//!
//! `cargo run --example frameclock_replay -- timing.txt...`
use bandsync::audio::frameclock::FrameClock;
fn main() {
    for p in std::env::args().skip(1) {
        let rows: Vec<(i64, i64, u64)> = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Vec<i64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
                (v[0], v[1], v[2] as u64)
            })
            .collect();
        let sel: Vec<_> = rows.iter().filter(|r| r.2 > 28800).collect();
        let n = sel.len() as f64;
        let mx = sel.iter().map(|r| r.2 as f64).sum::<f64>() / n;
        let t0 = sel[0].0 as f64;
        let my = sel.iter().map(|r| (r.0 + r.1) as f64 - t0).sum::<f64>() / n;
        let sxy: f64 = sel
            .iter()
            .map(|r| (r.2 as f64 - mx) * ((r.0 + r.1) as f64 - t0 - my))
            .sum();
        let k = if std::env::var("LS_SLOPE").is_ok() {
            sxy / sel.iter().map(|r| (r.2 as f64 - mx).powi(2)).sum::<f64>()
        } else {
            1e9 / 48000.0
        };
        let line = |f: u64| t0 + my + (f as f64 - mx) * k;
        let mut fc = FrameClock::new(48000);
        let mut errs = Vec::new();
        let trace = std::env::var("TRACE").is_ok();
        for (i, r) in rows.iter().enumerate() {
            let est = fc.update(r.2, r.0 + r.1);
            errs.push((r.2, est as f64 - line(r.2)));
            if trace && i % 24 == 0 {
                println!(
                    "t={:.2} err={:.1} meas={:.1} ppm={:.1}",
                    r.2 as f64 / 48000.0,
                    (est as f64 - line(r.2)) / 1000.0,
                    ((r.0 + r.1) as f64 - line(r.2)) / 1000.0,
                    fc.rate_ppm()
                );
            }
        }
        // worst change of the error over any 0.5 s (24000 frames) after 0.7 s
        let mut worst: f64 = 0.0;
        for (i, a) in errs.iter().enumerate() {
            if a.0 < 33600 {
                continue;
            }
            if let Some(b) = errs[i..].iter().find(|b| b.0 >= a.0 + 24000) {
                worst = worst.max((b.1 - a.1).abs());
            }
        }
        let maxabs = errs
            .iter()
            .filter(|e| e.0 >= 33600)
            .map(|e| e.1.abs())
            .fold(0.0, f64::max);
        println!(
            "{p}: worst 0.5s change {:.1} us ({:.2} samples), max |err| {:.1} us, ppm {:.2}",
            worst / 1000.0,
            worst / 20833.3,
            maxabs / 1000.0,
            fc.rate_ppm()
        );
    }
}
