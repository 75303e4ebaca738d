//! A single-writer, many-reader seqlock over plain `u64` words.
//!
//! The control loop writes; the audio callback reads without locking or allocating.
//! A read retries a bounded number of times while a write is in progress and then
//! reports "busy", so the callback keeps its previous snapshot rather than spin.
//! Every field is an atomic, so there is no data race even on a torn read (which the
//! sequence check then discards).

use crate::core::time::SessionMap;
use crate::core::timeline::{Timeline, TIMELINE_WORDS};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;

/// What the audio thread needs to place clicks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AudioSnapshot {
    pub timeline: Timeline,
    pub map: SessionMap,
    pub epoch: u64,
    /// Speaker delay after the DAC, ns (the box's output-latency offset).
    pub latency_offset_ns: i64,
    /// Linear gain, 0.0–1.0.
    pub gain: f32,
    /// Session-map generation: changes when the session clock steps (a box joining a
    /// room). The renderer forgets which beats it played when it changes.
    pub clock_gen: u64,
}

const WORDS: usize = TIMELINE_WORDS + 7;

impl AudioSnapshot {
    fn encode(&self) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        let mut tw = [0u64; TIMELINE_WORDS];
        self.timeline.encode(&mut tw);
        w[..TIMELINE_WORDS].copy_from_slice(&tw);
        let o = TIMELINE_WORDS;
        w[o] = self.map.local_ref as u64;
        w[o + 1] = self.map.session_ref as u64;
        w[o + 2] = self.map.rate_ppt as u64;
        w[o + 3] = self.epoch;
        w[o + 4] = self.latency_offset_ns as u64;
        w[o + 5] = self.gain.to_bits() as u64;
        w[o + 6] = self.clock_gen;
        w
    }
    fn decode(w: &[u64; WORDS]) -> AudioSnapshot {
        let mut tw = [0u64; TIMELINE_WORDS];
        tw.copy_from_slice(&w[..TIMELINE_WORDS]);
        let o = TIMELINE_WORDS;
        let gain = f32::from_bits(w[o + 5] as u32);
        AudioSnapshot {
            timeline: Timeline::decode(&tw),
            map: SessionMap {
                local_ref: w[o] as i64,
                session_ref: w[o + 1] as i64,
                rate_ppt: w[o + 2] as i64,
            },
            epoch: w[o + 3],
            latency_offset_ns: w[o + 4] as i64,
            gain: if gain.is_finite() {
                gain.clamp(0.0, 1.0)
            } else {
                0.0
            },
            clock_gen: w[o + 6],
        }
    }
}

/// The seqlock cell.
pub struct SnapshotCell {
    seq: AtomicU64,
    words: [AtomicU64; WORDS],
    /// Serializes writers (never taken by the audio thread).
    writer: Mutex<()>,
}

impl SnapshotCell {
    pub fn new(init: AudioSnapshot) -> SnapshotCell {
        let cell = SnapshotCell {
            seq: AtomicU64::new(0),
            words: std::array::from_fn(|_| AtomicU64::new(0)),
            writer: Mutex::new(()),
        };
        cell.write(&init);
        cell
    }

    /// Publish a new snapshot. Not for the audio thread.
    pub fn write(&self, s: &AudioSnapshot) {
        let _g = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let w = s.encode();
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (a, v) in self.words.iter().zip(w.iter()) {
            a.store(*v, Ordering::Relaxed);
        }
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Read a consistent snapshot, or `None` if a writer kept the cell busy.
    /// Wait-free in the number of retries; never blocks.
    pub fn try_read(&self) -> Option<AudioSnapshot> {
        for _ in 0..8 {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let mut w = [0u64; WORDS];
            for (v, a) in w.iter_mut().zip(self.words.iter()) {
                *v = a.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return Some(AudioSnapshot::decode(&w));
            }
        }
        None
    }

    /// Read, waiting for a writer if needed (not for the audio thread).
    pub fn read(&self) -> AudioSnapshot {
        loop {
            if let Some(s) = self.try_read() {
                return s;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::{Meter, Tempo};
    use std::sync::Arc;

    fn snap(i: i64) -> AudioSnapshot {
        AudioSnapshot {
            timeline: Timeline::start_at(
                i,
                Tempo::from_mbpm(20_000 + (i as u32 % 1000)).unwrap(),
                Meter::new(1 + i % 16).unwrap(),
                i % 2 == 0,
            ),
            map: SessionMap {
                local_ref: i,
                session_ref: -i,
                rate_ppt: i * 3,
            },
            epoch: i as u64,
            latency_offset_ns: i * 7,
            gain: 0.5,
            clock_gen: i as u64 * 11,
        }
    }

    #[test]
    fn round_trips() {
        let c = SnapshotCell::new(snap(42));
        assert_eq!(c.read(), snap(42));
    }

    #[test]
    fn concurrent_reads_are_never_torn() {
        // The writer writes until the reader has seen 1000 different snapshots, so the
        // reads really interleave with writes (on a loaded machine a fixed number of
        // writes can finish before the reader runs, or the other way round).
        let c = Arc::new(SnapshotCell::new(snap(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.write(&snap(i));
                    i += 1;
                }
            })
        };
        let (mut distinct, mut last) = (0, 0);
        while distinct < 1000 {
            if let Some(s) = c.try_read() {
                let i = s.epoch as i64;
                assert_eq!(s, snap(i), "torn read at {i}");
                if i != last {
                    (distinct, last) = (distinct + 1, i);
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        w.join().unwrap();
    }
}
