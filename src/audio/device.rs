//! The real sink: a cpal output stream (ALSA on Linux), reopened with backoff.
//!
//! The stream asks for a fixed buffer size (ALSA's default can be 16,384 frames).
//! cpal's callback timestamps count from stream creation, not CLOCK_MONOTONIC, so
//! each callback anchors them itself: the buffer's first frame reaches the DAC at
//! `now + (playback − callback)`, with `now` read from the node clock (a vDSO call).

use super::null;
use super::render::Renderer;
use super::snapshot::SnapshotCell;
use super::{AudioBackend, AudioConfig, AudioStats, ClickEvent};
use crate::sys::clock::{Clock, NodeClock};
use anyhow::{anyhow, Context};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use std::sync::atomic::{AtomicBool, Ordering, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Everything the audio thread needs besides its config.
pub struct AudioCtx {
    pub cell: Arc<SnapshotCell>,
    pub stats: Arc<AudioStats>,
    pub clock: NodeClock,
    /// New click-log queues go to the click-log writer through this.
    pub log_queues: Option<mpsc::Sender<rtrb::Consumer<ClickEvent>>>,
    pub stop: Arc<AtomicBool>,
}

impl AudioCtx {
    fn renderer(&self, rate: u32, channels: u16) -> Renderer {
        let producer = self.log_queues.as_ref().and_then(|tx| {
            let (p, c) = rtrb::RingBuffer::new(4096);
            tx.send(c).ok().map(|_| p)
        });
        Renderer::new(
            rate,
            channels,
            self.cell.clone(),
            self.stats.clone(),
            producer,
        )
    }
}

/// One output device as `bandsync devices` shows it.
pub struct DeviceInfo {
    pub id: String,
    pub description: String,
    pub is_default: bool,
}

/// The output devices cpal can see.
pub fn list_devices() -> anyhow::Result<Vec<DeviceInfo>> {
    let host = cpal::default_host();
    let default_id = host
        .default_output_device()
        .and_then(|d| d.id().ok())
        .map(|i| i.to_string());
    let mut out = Vec::new();
    for d in host.output_devices().context("listing output devices")? {
        let id = d.id().map(|i| i.to_string()).unwrap_or_else(|_| "?".into());
        let description = d
            .description()
            .map(|x| x.name().to_string())
            .unwrap_or_default();
        out.push(DeviceInfo {
            is_default: Some(&id) == default_id.as_ref(),
            id,
            description,
        });
    }
    Ok(out)
}

fn find_device(host: &cpal::Host, name: Option<&str>) -> anyhow::Result<cpal::Device> {
    let Some(name) = name.filter(|n| *n != "default") else {
        return host
            .default_output_device()
            .ok_or_else(|| anyhow!("there is no default output device"));
    };
    let devices = host.output_devices().context("listing output devices")?;
    for d in devices {
        let Ok(id) = d.id() else { continue };
        if id.to_string() == name || id.id() == name {
            return Ok(d);
        }
        if d.description().map(|x| x.name() == name).unwrap_or(false) {
            return Ok(d);
        }
    }
    Err(anyhow!(
        "no output device named {name:?} (see `bandsync devices`)"
    ))
}

struct Running {
    _stream: cpal::Stream,
    failed: Arc<AtomicBool>,
    desc: String,
}

fn open_stream(cfg: &AudioConfig, ctx: &AudioCtx, name: Option<&str>) -> anyhow::Result<Running> {
    let host = cpal::default_host();
    let device = find_device(&host, name)?;
    let desc = device
        .id()
        .map(|i| i.to_string())
        .unwrap_or_else(|_| "?".into());
    let def = device
        .default_output_config()
        .with_context(|| format!("reading the output config of {desc}"))?;
    let rate = match device.supported_output_configs() {
        Ok(mut it) => {
            if it.any(|r| {
                r.min_sample_rate() <= cfg.sample_rate && cfg.sample_rate <= r.max_sample_rate()
            }) {
                cfg.sample_rate
            } else {
                def.sample_rate()
            }
        }
        Err(_) => def.sample_rate(),
    };
    let buffer = match def.buffer_size() {
        cpal::SupportedBufferSize::Range { min, max } => cfg.buffer_frames.clamp(*min, *max),
        cpal::SupportedBufferSize::Unknown => cfg.buffer_frames,
    };
    let channels = def.channels();
    let sc = cpal::StreamConfig {
        channels,
        sample_rate: rate,
        buffer_size: cpal::BufferSize::Fixed(buffer),
    };
    let failed = Arc::new(AtomicBool::new(false));
    let stream = match def.sample_format() {
        cpal::SampleFormat::F32 => build::<f32>(&device, &sc, ctx, failed.clone()),
        cpal::SampleFormat::I16 => build::<i16>(&device, &sc, ctx, failed.clone()),
        cpal::SampleFormat::I32 => build::<i32>(&device, &sc, ctx, failed.clone()),
        cpal::SampleFormat::U16 => build::<u16>(&device, &sc, ctx, failed.clone()),
        cpal::SampleFormat::F64 => build::<f64>(&device, &sc, ctx, failed.clone()),
        other => Err(anyhow!("unsupported sample format {other:?}")),
    }
    .with_context(|| format!("opening {desc} at {rate} Hz, {channels} ch, {buffer} frames"))?;
    stream.play().with_context(|| format!("starting {desc}"))?;
    tracing::info!(device = %desc, rate, channels, buffer_frames = buffer, format = ?def.sample_format(), "audio output running");
    Ok(Running {
        _stream: stream,
        failed,
        desc,
    })
}

fn build<T>(
    device: &cpal::Device,
    sc: &cpal::StreamConfig,
    ctx: &AudioCtx,
    failed: Arc<AtomicBool>,
) -> anyhow::Result<cpal::Stream>
where
    T: cpal::SizedSample + cpal::FromSample<f32> + Send + 'static,
{
    let mut renderer = ctx.renderer(sc.sample_rate, sc.channels);
    let clock = ctx.clock;
    let stats = ctx.stats.clone();
    let rt_stats = ctx.stats.clone();
    let mut promoted = false;
    let mut dump = TimingDump::from_env(sc.channels);
    let data = move |out: &mut [T], info: &cpal::OutputCallbackInfo| {
        if !promoted {
            // Once, on the stream's first callback (cpal owns the thread): one syscall
            // before the steady state, which then makes none.
            promoted = true;
            rt_stats.rt_priority.store(promote_to_realtime(), Relaxed);
        }
        let ts = info.timestamp();
        let delay = ts.playback.duration_since(ts.callback).as_nanos() as i64;
        let now = clock.now_ns();
        if let Some(d) = dump.as_mut() {
            d.record(now, delay, out.len());
        }
        renderer.render(out, now + delay);
    };
    let on_error = move |e: cpal::Error| {
        stats.device_errors.fetch_add(1, Relaxed);
        if e.kind() != cpal::ErrorKind::Xrun {
            failed.store(true, Relaxed);
        }
        // The error callback runs outside the data callback: logging is allowed here.
        tracing::warn!(error = %e, "audio stream error");
    };
    Ok(device.build_output_stream::<T, _, _>(*sc, data, on_error, None)?)
}

/// Diagnostics for the frame clock: with `BANDSYNC_DEBUG_TIMING_DUMP=PATH`, every
/// callback's (read time, reported delay, frame) goes into a buffer allocated up front
/// (full: later callbacks are not recorded), written to PATH as text when the stream is
/// dropped, off the audio thread's steady state.
struct TimingDump {
    path: std::path::PathBuf,
    channels: usize,
    frames: u64,
    rows: Vec<(i64, i64, u64)>,
}

impl TimingDump {
    fn from_env(channels: u16) -> Option<TimingDump> {
        let path = std::env::var_os("BANDSYNC_DEBUG_TIMING_DUMP")?;
        Some(TimingDump {
            path: path.into(),
            channels: channels.max(1) as usize,
            frames: 0,
            rows: Vec::with_capacity(1 << 16),
        })
    }

    fn record(&mut self, now: i64, delay: i64, samples: usize) {
        if self.rows.len() < self.rows.capacity() {
            self.rows.push((now, delay, self.frames));
        }
        self.frames += (samples / self.channels) as u64;
    }
}

impl Drop for TimingDump {
    fn drop(&mut self) {
        let text: String = self
            .rows
            .iter()
            .map(|(n, d, f)| format!("{n} {d} {f}\n"))
            .collect();
        let _ = std::fs::write(&self.path, text);
    }
}

/// SCHED_FIFO priority the audio thread asks for: above ordinary threads and the
/// network (which stays SCHED_OTHER), below the kernel's own IRQ threads (50 on
/// PREEMPT_RT) and JACK's default (70 for the server, 60+ for clients).
pub const RT_PRIORITY: i32 = 45;

/// Raise the calling thread to SCHED_FIFO [`RT_PRIORITY`]. Returns the priority, or
/// minus the errno when refused (no CAP_SYS_NICE and no RLIMIT_RTPRIO): the stream
/// then carries on at normal priority.
fn promote_to_realtime() -> i64 {
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: plain syscall on the current thread with a valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if rc == 0 {
        RT_PRIORITY as i64
    } else {
        -(rc as i64)
    }
}

/// The audio thread: open the configured sink and keep it running until `stop`.
pub fn run(cfg: AudioConfig, ctx: AudioCtx) {
    let name = match &cfg.backend {
        AudioBackend::Null => {
            run_null(&cfg, &ctx);
            return;
        }
        AudioBackend::Auto => None,
        AudioBackend::Device(n) => Some(n.clone()),
    };
    let mut backoff = Duration::from_millis(250);
    let mut first = true;
    while !ctx.stop.load(Ordering::Relaxed) {
        match open_stream(&cfg, &ctx, name.as_deref()) {
            Ok(running) => {
                ctx.stats.sink.store(1, Relaxed);
                backoff = Duration::from_millis(250);
                first = false;
                let mut last_cb = ctx.stats.callbacks.load(Relaxed);
                let mut stalled = 0;
                let mut rt_reported = false;
                while !ctx.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if !rt_reported {
                        rt_reported = report_rt(&ctx.stats);
                    }
                    let cb = ctx.stats.callbacks.load(Relaxed);
                    stalled = if cb == last_cb { stalled + 1 } else { 0 };
                    last_cb = cb;
                    if running.failed.load(Relaxed) || stalled >= 20 {
                        tracing::warn!(device = %running.desc, stalled = stalled >= 20, "audio device lost; reopening");
                        break;
                    }
                }
                ctx.stats.sink.store(0, Relaxed);
            }
            Err(e) => {
                if first && cfg.backend == AudioBackend::Auto {
                    tracing::warn!(error = %format!("{e:#}"), "no usable output device: using the silent null sink (clicks are timed but not heard)");
                    run_null(&cfg, &ctx);
                    return;
                }
                first = false;
                ctx.stats.device_errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "cannot open the audio device");
            }
        }
        if ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        ctx.stats.reopens.fetch_add(1, Relaxed);
        sleep_unless_stopped(backoff, &ctx.stop);
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}

/// Log the outcome of the audio thread's real-time promotion once it is known.
fn report_rt(stats: &AudioStats) -> bool {
    match stats.rt_priority.load(Relaxed) {
        0 => false,
        p if p > 0 => {
            tracing::info!(priority = p, "audio thread runs SCHED_FIFO");
            true
        }
        e => {
            let err = std::io::Error::from_raw_os_error(-e as i32);
            tracing::warn!(error = %err, "audio thread stays at normal priority (SCHED_FIFO refused: grant CAP_SYS_NICE or LimitRTPRIO=)");
            true
        }
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_null(cfg: &AudioConfig, ctx: &AudioCtx) {
    ctx.stats.sink.store(2, Relaxed);
    tracing::info!(
        rate = null::NULL_RATE,
        buffer_frames = cfg.buffer_frames,
        "null audio sink running"
    );
    let renderer = ctx.renderer(null::NULL_RATE, 1);
    // The null sink is paced by sleeping: real time keeps its wake-ups punctual.
    ctx.stats.rt_priority.store(promote_to_realtime(), Relaxed);
    report_rt(&ctx.stats);
    null::run(cfg.buffer_frames, ctx.clock, renderer, &ctx.stop);
    ctx.stats.sink.store(0, Relaxed);
}
