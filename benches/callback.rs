//! Cost of the audio callback per 256-frame buffer (stereo f32), with and without a
//! click starting in the buffer. `cargo bench --bench callback`.

use bandsync::audio::render::Renderer;
use bandsync::audio::snapshot::{AudioSnapshot, SnapshotCell};
use bandsync::audio::AudioStats;
use bandsync::core::time::SessionMap;
use bandsync::core::timeline::{Meter, Tempo, Timeline};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Arc;

fn rig(bpm: f64) -> (Renderer, rtrb::Consumer<bandsync::audio::ClickEvent>) {
    let snap = AudioSnapshot {
        timeline: Timeline::start_at(
            0,
            Tempo::from_bpm(bpm).unwrap(),
            Meter::new(4).unwrap(),
            true,
        ),
        map: SessionMap::IDENTITY,
        epoch: 1,
        latency_offset_ns: 0,
        gain: 0.8,
        clock_gen: 0,
    };
    let cell = Arc::new(SnapshotCell::new(snap));
    let (p, c) = rtrb::RingBuffer::new(1 << 16);
    (
        Renderer::new(48_000, 2, cell, Arc::new(AudioStats::default()), Some(p)),
        c,
    )
}

fn bench(c: &mut Criterion) {
    let period_ns = |k: u64| (k as i128 * 256 * 1_000_000_000 / 48_000) as i64;
    let mut g = c.benchmark_group("callback_256_frames_stereo");
    for (name, bpm) in [
        ("120bpm_steady_state", 120.0),
        ("400bpm_click_heavy", 400.0),
    ] {
        let (mut r, mut log) = rig(bpm);
        let mut buf = vec![0f32; 512];
        let mut k = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                r.render(black_box(&mut buf[..]), period_ns(k));
                k += 1;
                while log.pop().is_ok() {}
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
