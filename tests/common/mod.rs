//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bandsync::audio::render::Renderer;
use bandsync::audio::snapshot::{AudioSnapshot, SnapshotCell};
use bandsync::audio::{AudioStats, ClickEvent};
use bandsync::core::time::SessionMap;
use bandsync::core::timeline::{Meter, Tempo, Timeline};
use std::sync::Arc;

mod daemon;
mod redis;
#[allow(unused_imports)] // each test binary uses its own share of these
pub use daemon::{http_get, json_body, wait_health, NodeCmd, BIN, TEST_ENV};
#[allow(unused_imports)]
pub use redis::{redis_server, Kill};

pub const RATE: u32 = 48_000;

pub fn snapshot(t0: i64, bpm: f64, meter: i64) -> AudioSnapshot {
    AudioSnapshot {
        timeline: Timeline::start_at(
            t0,
            Tempo::from_bpm(bpm).unwrap(),
            Meter::new(meter).unwrap(),
            true,
        ),
        map: SessionMap::IDENTITY,
        epoch: 0,
        latency_offset_ns: 0,
        gain: 1.0,
        clock_gen: 0,
    }
}

pub struct Rig {
    pub cell: Arc<SnapshotCell>,
    pub stats: Arc<AudioStats>,
    pub renderer: Renderer,
    pub events: rtrb::Consumer<ClickEvent>,
    pub period: usize,
    pub start_ns: i64,
    pub k: u64,
}

impl Rig {
    pub fn new(snap: AudioSnapshot, period: usize, start_ns: i64) -> Rig {
        let cell = Arc::new(SnapshotCell::new(snap));
        let stats = Arc::new(AudioStats::default());
        let (p, c) = rtrb::RingBuffer::new(4096);
        let renderer = Renderer::new(RATE, 1, cell.clone(), stats.clone(), Some(p));
        Rig {
            cell,
            stats,
            renderer,
            events: c,
            period,
            start_ns,
            k: 0,
        }
    }

    /// Exact DAC time of frame `f` on an ideal 48 kHz card.
    pub fn frame_time(&self, f: u64) -> i64 {
        self.start_ns + (f as i128 * 1_000_000_000 / RATE as i128) as i64
    }

    /// Render one period with the measured time `frame_time + jitter_ns`.
    pub fn step(&mut self, out: &mut [f32], jitter_ns: i64) {
        let f = self.k * self.period as u64;
        let m = self.frame_time(f) + jitter_ns;
        self.renderer.render(out, m);
        self.k += 1;
    }

    pub fn drain(&mut self) -> Vec<ClickEvent> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.pop() {
            v.push(e);
        }
        v
    }
}

/// Indices where a click starts: a non-zero sample after at least `gap` zeros.
pub fn onsets(samples: &[f32], gap: usize) -> Vec<(usize, f32)> {
    let mut out = Vec::new();
    let mut zeros = gap;
    for (i, &x) in samples.iter().enumerate() {
        if x.abs() > 1e-6 {
            if zeros >= gap {
                out.push((i, x));
            }
            zeros = 0;
        } else {
            zeros += 1;
        }
    }
    out
}

/// A free loopback port (UDP for QUIC, TCP for HTTP) for a daemon under test.
pub fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
