//! The renderer places every click on its exact sample.

mod common;
use bandsync::audio::sound::{ACCENT_PEAK, PLAIN_PEAK};
use bandsync::core::timeline::{Change, ChangeKind, Quantum, Tempo};
use common::*;
use std::sync::atomic::Ordering::Relaxed;

const START: i64 = 10_000_000_000;

fn run(rig: &mut Rig, periods: usize, jitter: impl Fn(u64) -> i64) -> Vec<f32> {
    let mut all = Vec::new();
    let mut buf = vec![0f32; rig.period];
    for _ in 0..periods {
        let j = jitter(rig.k);
        rig.step(&mut buf, j);
        all.extend_from_slice(&buf);
    }
    all
}

#[test]
fn clicks_land_on_their_exact_sample_with_accents() {
    // beat 0 at START + 100 ms, 120 BPM → every 24,000 frames from frame 4,800
    let mut rig = Rig::new(snapshot(START + 100_000_000, 120.0, 4), 256, START);
    let out = run(&mut rig, 48_000 * 5 / 256, |_| 0);
    let on = onsets(&out, 1000);
    assert_eq!(on.len(), 10, "{on:?}");
    for (i, (frame, amp)) in on.iter().enumerate() {
        assert_eq!(*frame, 4_800 + i * 24_000, "click {i}");
        let want = if i % 4 == 0 { ACCENT_PEAK } else { PLAIN_PEAK };
        assert_eq!(*amp, want, "click {i} accent");
    }
    let ev = rig.drain();
    assert_eq!(
        ev.iter().map(|e| e.beat).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    for (i, e) in ev.iter().enumerate() {
        assert!(
            (e.t_local_ns - rig.frame_time(on[i].0 as u64)).abs() <= 1,
            "logged time of click {i}"
        );
        assert_eq!(e.accent, i % 4 == 0);
    }
}

#[test]
fn latency_offset_moves_the_click_earlier_by_exactly_that_much() {
    let mut snap = snapshot(START + 100_000_000, 120.0, 4);
    snap.latency_offset_ns = 10_000_000; // 480 frames
    let mut rig = Rig::new(snap, 256, START);
    let out = run(&mut rig, 48_000 * 2 / 256, |_| 0);
    let on = onsets(&out, 1000);
    assert_eq!(on[0].0, 4_800 - 480);
    assert_eq!(on[1].0, 4_800 - 480 + 24_000);
    // the log reports when it is heard: on the beat
    let ev = rig.drain();
    assert!((ev[0].t_local_ns - (START + 100_000_000)).abs() <= 1);
}

#[test]
fn jittery_callbacks_never_double_or_drop_a_beat() {
    let mut rig = Rig::new(snapshot(START + 50_000_000, 400.0, 3), 256, START);
    // ±150 µs pseudo-random jitter on every measurement
    let out = run(&mut rig, 48_000 * 20 / 256, |k| {
        ((k.wrapping_mul(2654435761) % 300_001) as i64) - 150_000
    });
    let ev = rig.drain();
    let beats: Vec<i64> = ev.iter().map(|e| e.beat).collect();
    assert!(beats.len() > 120, "{}", beats.len());
    for w in beats.windows(2) {
        assert_eq!(w[1], w[0] + 1, "beats must be consecutive: {beats:?}");
    }
    assert_eq!(onsets(&out, 500).len(), beats.len());
    assert_eq!(rig.stats.missed_clicks.load(Relaxed), 0);
}

#[test]
fn a_tempo_change_published_mid_stream_lands_on_its_beat() {
    let mut snap = snapshot(START + 100_000_000, 120.0, 4);
    let mut rig = Rig::new(snap, 256, START);
    let _ = run(&mut rig, 48_000 / 256, |_| 0); // 1 s: beats 0, 1
    let now = rig.frame_time(rig.k * 256);
    let at = snap
        .timeline
        .schedule(
            Change {
                kind: ChangeKind::Tempo(Tempo::from_bpm(60.0).unwrap()),
                quantum: Quantum::Bar,
            },
            now,
            0,
        )
        .unwrap();
    assert_eq!(at.beat, 4);
    rig.cell.write(&snap);
    let out = run(&mut rig, 48_000 * 6 / 256, |_| 0);
    let base = (48_000 / 256) * 256;
    let on: Vec<usize> = onsets(&out, 1000).iter().map(|o| o.0 + base).collect();
    // beats 2, 3 at 500 ms spacing, then beat 4 on its bar, then 1 s spacing
    assert_eq!(
        on[..4],
        [
            4_800 + 2 * 24_000,
            4_800 + 3 * 24_000,
            4_800 + 4 * 24_000,
            4_800 + 4 * 24_000 + 48_000
        ]
    );
}

#[test]
fn stop_silences_and_start_resumes_on_the_bar() {
    let mut snap = snapshot(START + 100_000_000, 120.0, 4);
    let mut rig = Rig::new(snap, 512, START);
    let _ = run(&mut rig, 48_000 / 512, |_| 0);
    let now = rig.frame_time(rig.k * 512);
    snap.timeline
        .schedule(
            Change {
                kind: ChangeKind::Stop,
                quantum: Quantum::Beat,
            },
            now,
            0,
        )
        .unwrap();
    let start = snap
        .timeline
        .schedule(
            Change {
                kind: ChangeKind::Start,
                quantum: Quantum::Bar,
            },
            now,
            0,
        )
        .unwrap();
    rig.cell.write(&snap);
    rig.drain();
    let _ = run(&mut rig, 48_000 * 6 / 512, |_| 0);
    let beats: Vec<i64> = rig.drain().iter().map(|e| e.beat).collect();
    assert_eq!(start.beat, 4);
    assert_eq!(beats[0], 4, "{beats:?}");
    assert!(beats.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn integer_output_formats_get_the_same_onsets() {
    let mut rig = Rig::new(snapshot(START + 100_000_000, 120.0, 4), 256, START);
    let mut all = Vec::new();
    let mut buf = vec![0i16; 512]; // stereo i16
    let mut rig2 = Rig::new(snapshot(START + 100_000_000, 120.0, 4), 256, START);
    let _ = &mut rig2;
    for _ in 0..(48_000 * 2 / 256) {
        let m = rig.frame_time(rig.k * 256);
        rig.k += 1;
        rig.renderer.render(&mut buf[..256], m); // mono view of 256 frames
        all.extend(buf[..256].iter().map(|&x| x as f32));
    }
    let on = onsets(&all, 1000);
    assert_eq!(on[0].0, 4_800);
    assert_eq!(on[1].0, 28_800);
}
