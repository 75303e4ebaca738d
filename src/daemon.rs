//! `bandsync run`: wires the core to its drivers and owns shutdown.
//!
//! Threads: the audio thread (cpal or the null sink) renders clicks from the
//! lock-free snapshot; the click-log thread writes the log; the tokio runtime runs the
//! control loop, which owns the timeline and republishes the snapshot.

use crate::audio::device::{self, AudioCtx};
use crate::audio::snapshot::{AudioSnapshot, SnapshotCell};
use crate::audio::{AudioConfig, AudioStats};
use crate::clicklog;
use crate::clock::{Clock, NodeClock, SessionMap};
use crate::config::RunConfig;
use crate::state;
use crate::timeline::Timeline;
use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// How far ahead of "now" a box alone starts its transport with `--play`: enough for
/// the audio stream to open and its frame clock to lock (see `audio::frameclock`)
/// before the first click, and well inside the 1 s start-to-first-click target.
pub const START_LEAD_NS: i64 = 500_000_000;

/// Run the daemon until ctrl-c / SIGTERM.
pub fn run(cfg: RunConfig, clock: NodeClock) -> anyhow::Result<()> {
    state::ensure_dir(&cfg.state_dir)?;
    let node_id = state::node_id(&cfg.state_dir)?;
    if let Some(d) = clock.distortion() {
        tracing::warn!(offset_ns = d.offset_ns, skew_ppm = d.skew_ppm, "BANDSYNC_TEST_CLOCK is set: this node's clock is distorted");
    }
    tracing::info!(node = %node_id, name = %cfg.name, room = %cfg.room, state_dir = %cfg.state_dir.display(), "bandsync starting");

    // A box alone: its own clock is session time.
    let now = clock.now_ns();
    let timeline = if cfg.play {
        Timeline::start_at(now + START_LEAD_NS, cfg.tempo, cfg.meter, true)
    } else {
        Timeline::start_at(now, cfg.tempo, cfg.meter, false)
    };
    let snap = AudioSnapshot {
        timeline,
        map: SessionMap::IDENTITY,
        epoch: 0,
        latency_offset_ns: cfg.latency_offset_ns,
        gain: cfg.volume,
    };
    let cell = Arc::new(SnapshotCell::new(snap));
    let stats = Arc::new(AudioStats::default());
    let stop = Arc::new(AtomicBool::new(false));

    let (log_queues, log_thread) = match &cfg.click_log {
        Some(path) => {
            let file = clicklog::open(path)?;
            let (tx, rx) = std::sync::mpsc::channel();
            let h = clicklog::spawn(file, node_id.clone(), clock, rx, stop.clone());
            (Some(tx), Some(h))
        }
        None => (None, None),
    };

    let audio_cfg = AudioConfig { backend: cfg.audio.clone(), sample_rate: cfg.sample_rate, buffer_frames: cfg.buffer_frames };
    let ctx = AudioCtx { cell: cell.clone(), stats: stats.clone(), clock, log_queues, stop: stop.clone() };
    let audio_thread = std::thread::Builder::new()
        .name("audio".into())
        .spawn(move || device::run(audio_cfg, ctx))
        .context("spawning the audio thread")?;

    let shutdown = Arc::new(tokio::sync::Notify::new());
    {
        let shutdown = shutdown.clone();
        ctrlc::set_handler(move || shutdown.notify_one()).context("installing the ctrl-c/SIGTERM handler")?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bandsync-rt")
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(control_loop(snap, cell, stats.clone(), clock, shutdown));

    stop.store(true, Ordering::Relaxed);
    let _ = audio_thread.join();
    if let Some(h) = log_thread {
        let _ = h.join();
    }
    tracing::info!(
        clicks = stats.clicks.load(Relaxed),
        late = stats.late_clicks.load(Relaxed),
        missed = stats.missed_clicks.load(Relaxed),
        "bandsync stopped"
    );
    result
}

/// Owns the timeline: drops expired segments and republishes the snapshot.
async fn control_loop(
    mut snap: AudioSnapshot,
    cell: Arc<SnapshotCell>,
    stats: Arc<AudioStats>,
    clock: NodeClock,
    shutdown: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = clock.now_ns();
    loop {
        tokio::select! {
            _ = shutdown.notified() => {
                tracing::info!("shutting down");
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        let now = clock.now_ns();
        let session_now = snap.map.to_session(now);
        let before = snap.timeline;
        snap.timeline.advance(session_now);
        if snap.timeline != before {
            cell.write(&snap);
        }
        if now - last_report >= 10_000_000_000 {
            last_report = now;
            let seg = snap.timeline.current(session_now);
            tracing::info!(
                tempo = %seg.tempo,
                meter = seg.meter.get(),
                playing = seg.playing,
                sink = stats.sink_name(),
                clicks = stats.clicks.load(Relaxed),
                late = stats.late_clicks.load(Relaxed),
                missed = stats.missed_clicks.load(Relaxed),
                card_rate_ppm = stats.rate_ppb.load(Relaxed) as f64 / 1000.0,
                "status"
            );
        }
    }
}
