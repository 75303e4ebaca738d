//! The callback body every sink shares.
//!
//! For one output buffer of `n` frames whose first frame reaches the DAC at (measured)
//! local time `m`:
//!
//! 1. read the latest [`AudioSnapshot`] (lock-free; keep the previous one if busy);
//! 2. smooth `m` through the [`FrameClock`] → `t_first`, `ns_per_frame`;
//! 3. the buffer is *heard* over `[h0, h1)` with `h0 = t_first + latency_offset`;
//!    map that to session time `[s0, s1)` with the [`SessionMap`](crate::core::time::SessionMap);
//! 4. every click the timeline has in that range lands on frame
//!    `round((local(click) − h0) / ns_per_frame)`;
//! 5. synthesize: the click sound starts on exactly that frame.
//!
//! Beats already played are never played twice (overlapping ranges after a clock
//! correction), and a click whose frame has just passed (a gap after a correction) is
//! played at frame 0 and counted late; one more than [`MAX_LATE_NS`] late is dropped
//! and counted missed.
//!
//! No allocation, lock, syscall or logging happens here.

use super::frameclock::FrameClock;
use super::snapshot::{AudioSnapshot, SnapshotCell};
use super::sound::ClickSounds;
use super::{AudioStats, ClickEvent};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// A click later than this is dropped rather than played late.
pub const MAX_LATE_NS: i64 = 5_000_000;
/// Two clicks of the same or an earlier beat closer than this are the same click.
const DUP_WINDOW_NS: i64 = 20_000_000;
const SCRATCH_FRAMES: usize = 4096;
const MAX_ONSETS: usize = 32;

#[derive(Clone, Copy, Default)]
struct Onset {
    frame: usize,
    accent: bool,
}

#[derive(Clone, Copy)]
struct Voice {
    accent: bool,
    pos: usize,
}

pub struct Renderer {
    channels: usize,
    fclock: FrameClock,
    frames_rendered: u64,
    sounds: ClickSounds,
    scratch: Vec<f32>,
    onsets: [Onset; MAX_ONSETS],
    n_onsets: usize,
    voice: Option<Voice>,
    last_beat: Option<(i64, i64)>,
    cursor: Option<i64>,
    clock_gen: u64,
    snap: AudioSnapshot,
    cell: Arc<SnapshotCell>,
    stats: Arc<AudioStats>,
    log: Option<rtrb::Producer<ClickEvent>>,
}

impl Renderer {
    /// Build off the audio thread: allocates the sounds and the scratch buffer.
    pub fn new(
        sample_rate: u32,
        channels: u16,
        cell: Arc<SnapshotCell>,
        stats: Arc<AudioStats>,
        log: Option<rtrb::Producer<ClickEvent>>,
    ) -> Renderer {
        let snap = cell.read();
        Renderer {
            channels: channels.max(1) as usize,
            fclock: FrameClock::new(sample_rate),
            frames_rendered: 0,
            sounds: ClickSounds::synth(sample_rate),
            scratch: vec![0.0; SCRATCH_FRAMES],
            onsets: [Onset::default(); MAX_ONSETS],
            n_onsets: 0,
            voice: None,
            last_beat: None,
            cursor: None,
            clock_gen: snap.clock_gen,
            snap,
            cell,
            stats,
            log,
        }
    }

    pub fn frame_clock(&self) -> &FrameClock {
        &self.fclock
    }

    /// Fill `out` (interleaved, `channels` per frame). `measured_ns`: node-perceived
    /// mono time at which the buffer's first frame reaches the DAC.
    pub fn render<T>(&mut self, out: &mut [T], measured_ns: i64)
    where
        T: cpal::Sample + cpal::FromSample<f32>,
    {
        let frames = out.len() / self.channels;
        self.plan(frames, measured_ns);
        let mut done = 0;
        let mut next_onset = 0;
        while done < frames {
            let m = (frames - done).min(SCRATCH_FRAMES);
            self.synth(done, m, &mut next_onset);
            for i in 0..m {
                let v = T::from_sample(self.scratch[i]);
                let base = (done + i) * self.channels;
                for s in &mut out[base..base + self.channels] {
                    *s = v;
                }
            }
            done += m;
        }
        // frames that do not fill a whole frame (never from cpal) are silenced
        for s in &mut out[frames * self.channels..] {
            *s = T::EQUILIBRIUM;
        }
        self.frames_rendered += frames as u64;
        self.stats.callbacks.fetch_add(1, Relaxed);
        self.stats.frames.fetch_add(frames as u64, Relaxed);
    }

    fn plan(&mut self, frames: usize, measured_ns: i64) {
        match self.cell.try_read() {
            Some(s) => self.snap = s,
            None => {
                self.stats.snapshot_busy.fetch_add(1, Relaxed);
            }
        }
        let resets_before = self.fclock.resets();
        let t_first = self.fclock.update(self.frames_rendered, measured_ns);
        if self.fclock.resets() != resets_before {
            self.stats.clock_resets.fetch_add(1, Relaxed);
        }
        let npf = self.fclock.ns_per_frame();
        self.stats
            .rate_ppb
            .store((self.fclock.rate_ppm() * 1000.0) as i64, Relaxed);
        self.stats.last_callback_ns.store(t_first, Relaxed);

        let snap = self.snap;
        if snap.clock_gen != self.clock_gen {
            // The session clock stepped (this box joined a room): beats and session
            // times before and after are unrelated. Start afresh from this buffer.
            self.clock_gen = snap.clock_gen;
            self.last_beat = None;
            self.cursor = None;
        }
        let tl = &snap.timeline;
        let h0 = t_first + snap.latency_offset_ns;
        let h1 = h0 + (frames as f64 * npf) as i64;
        let s0 = snap.map.to_session(h0);
        let s1 = snap.map.to_session(h1);
        // Everything before `cursor` was handled (played, or dropped as too late).
        // Search from there (bounded) so a click that fell between two buffers after a
        // clock correction is still played; `last_beat` stops it playing twice.
        let mut from = match self.cursor {
            Some(c) => {
                // clicks between the cursor and the late limit can no longer be played:
                // count them (bounded), never lose them silently
                let limit = s0 - MAX_LATE_NS;
                let mut t = c;
                for _ in 0..MAX_ONSETS {
                    match tl.next_click_at_or_after(t) {
                        Some(k) if k.time < limit => {
                            if self.last_beat.is_none_or(|(lb, lt)| {
                                !(k.beat <= lb && k.time < lt + DUP_WINDOW_NS)
                            }) {
                                self.stats.missed_clicks.fetch_add(1, Relaxed);
                                self.last_beat = Some((k.beat, k.time));
                            }
                            t = k.time + 1;
                        }
                        _ => break,
                    }
                }
                c.min(s0).max(limit)
            }
            None => s0,
        };
        let mut handled_until = s1;
        self.n_onsets = 0;
        for _ in 0..MAX_ONSETS * 2 {
            if self.n_onsets == MAX_ONSETS {
                break;
            }
            let Some(click) = tl.next_click_at_or_after(from) else {
                break;
            };
            if click.time >= s1 {
                break;
            }
            if let Some((lb, lt)) = self.last_beat {
                if click.beat <= lb && click.time < lt + DUP_WINDOW_NS {
                    from = click.time + 1;
                    continue;
                }
            }
            let local = snap.map.to_local(click.time);
            let mut f = ((local - h0) as f64 / npf).round() as i64;
            if f >= frames as i64 {
                // rounds onto the next buffer's first frame: leave it for that buffer
                handled_until = click.time;
                break;
            }
            if f < 0 {
                if click.time >= s0 - MAX_LATE_NS {
                    f = 0;
                    self.stats.late_clicks.fetch_add(1, Relaxed);
                } else {
                    self.stats.missed_clicks.fetch_add(1, Relaxed);
                    self.last_beat = Some((click.beat, click.time));
                    from = click.time + 1;
                    continue;
                }
            }
            self.onsets[self.n_onsets] = Onset {
                frame: f as usize,
                accent: click.accent,
            };
            self.n_onsets += 1;
            self.stats.clicks.fetch_add(1, Relaxed);
            let ev = ClickEvent {
                beat: click.beat,
                t_local_ns: h0 + (f as f64 * npf).round() as i64,
                epoch: snap.epoch,
                accent: click.accent,
            };
            if let Some(log) = self.log.as_mut() {
                if log.push(ev).is_err() {
                    self.stats.log_dropped.fetch_add(1, Relaxed);
                }
            }
            self.last_beat = Some((click.beat, click.time));
            from = click.time + 1;
        }
        self.cursor = Some(handled_until);
    }

    fn synth(&mut self, offset: usize, m: usize, next_onset: &mut usize) {
        let gain = self.snap.gain;
        for i in 0..m {
            let f = offset + i;
            while *next_onset < self.n_onsets && self.onsets[*next_onset].frame <= f {
                self.voice = Some(Voice {
                    accent: self.onsets[*next_onset].accent,
                    pos: 0,
                });
                *next_onset += 1;
            }
            let mut x = 0.0;
            if let Some(v) = self.voice.as_mut() {
                let s = self.sounds.get(v.accent);
                if v.pos < s.len() {
                    x = s[v.pos] * gain;
                    v.pos += 1;
                } else {
                    self.voice = None;
                }
            }
            self.scratch[i] = x;
        }
    }
}
