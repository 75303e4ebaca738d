//! The audio engine: puts every click on its exact sample.
//!
//! * [`snapshot`] — the lock-free cell through which the control loop hands the audio
//!   thread the timeline, the session map, the epoch and the output settings.
//! * [`frameclock`] — the DLL that maps output frames to the monotonic clock and
//!   tracks the card's real rate.
//! * [`sound`] — the synthesized accent and plain clicks.
//! * [`render`] — the callback body shared by every sink: which frames of this buffer
//!   are click onsets, and the samples to put there.
//! * [`null`] — the silent sink paced by CLOCK_MONOTONIC (`--audio null`).
//! * [`device`] — the cpal (ALSA) sink, reopened with backoff when the device goes.
//!
//! Invariant: inside [`render::Renderer::render`] there is no allocation, no lock,
//! no syscall and no logging (`tests/no_alloc.rs` proves the first).

pub mod clicklog;
pub mod device;
pub mod frameclock;
pub mod null;
pub mod render;
pub mod snapshot;
pub mod sound;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// One click as it left the output: the click log's raw material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClickEvent {
    pub beat: i64,
    /// Node-perceived monotonic ns at which the click's first sample is heard
    /// (DAC time of its sample plus the output-latency offset).
    pub t_local_ns: i64,
    pub epoch: u64,
    pub accent: bool,
}

/// Counters the audio thread bumps (relaxed atomics: no locks, no syscalls).
#[derive(Debug, Default)]
pub struct AudioStats {
    pub callbacks: AtomicU64,
    pub frames: AtomicU64,
    pub clicks: AtomicU64,
    /// Clicks played at the start of a buffer because their sample had already passed.
    pub late_clicks: AtomicU64,
    /// Clicks dropped because they were too late to play.
    pub missed_clicks: AtomicU64,
    /// Click-log events dropped because the log queue was full.
    pub log_dropped: AtomicU64,
    /// Snapshot reads that gave up (writer busy) and reused the previous snapshot.
    pub snapshot_busy: AtomicU64,
    /// Frame-clock restarts (xruns, stalls).
    pub clock_resets: AtomicU64,
    /// Stream errors and reopen attempts.
    pub device_errors: AtomicU64,
    pub reopens: AtomicU64,
    /// Measured card rate vs nominal, parts per billion.
    pub rate_ppb: AtomicI64,
    /// Node-perceived mono ns of the last callback's first frame (0: none yet).
    pub last_callback_ns: AtomicI64,
    /// 0 = not running, 1 = device, 2 = null sink.
    pub sink: AtomicU64,
    /// The audio thread's SCHED_FIFO priority once promoted; 0 = not (yet) tried,
    /// negative = refused (minus the errno).
    pub rt_priority: AtomicI64,
}

impl AudioStats {
    pub fn sink_name(&self) -> &'static str {
        match self.sink.load(Relaxed) {
            1 => "device",
            2 => "null",
            _ => "down",
        }
    }
}

/// Which sink to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudioBackend {
    /// The default output device; the null sink (with a warning) when there is none.
    Auto,
    /// The silent real-time sink.
    Null,
    /// A named cpal/ALSA device (as `bandsync devices` lists it).
    Device(String),
}

impl std::str::FromStr for AudioBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Err("audio backend is empty: use auto, null, default or a device name from `bandsync devices`".into()),
            "auto" => Ok(AudioBackend::Auto),
            "null" => Ok(AudioBackend::Null),
            other => Ok(AudioBackend::Device(other.to_string())),
        }
    }
}

/// Output settings.
#[derive(Clone, Debug)]
pub struct AudioConfig {
    pub backend: AudioBackend,
    pub sample_rate: u32,
    pub buffer_frames: u32,
}
