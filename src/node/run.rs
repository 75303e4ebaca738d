//! `bandsync run`: wires the core to its drivers and owns shutdown.
//!
//! Threads: the audio thread (cpal or the null sink) renders clicks from the
//! lock-free snapshot; the click-log thread writes the log; the tokio runtime runs the
//! control loop, which owns the timeline and republishes the snapshot.

use crate::audio::clicklog;
use crate::audio::device::{self, AudioCtx};
use crate::audio::snapshot::{AudioSnapshot, SnapshotCell};
use crate::audio::{AudioConfig, AudioStats};
use crate::core::decision::{Hlc, Stamp};
use crate::core::room::{Persisted, Room, RoomConfig};
use crate::core::time::SessionMap;
use crate::core::timeline::{Meter, Tempo, Timeline};
use crate::core::wire::SessionId;
use crate::net::auth::RoomKey;
use crate::net::impair::Impairment;
use crate::net::{self, MeshStats};
use crate::node::config::RunConfig;
use crate::node::room_task::{self, MeshConfig};
use crate::sys::clock::{Clock, NodeClock};
use crate::sys::state;
use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub use crate::core::room::START_LEAD_NS;

/// Run the daemon until ctrl-c / SIGTERM.
pub fn run(cfg: RunConfig, clock: NodeClock) -> anyhow::Result<()> {
    state::ensure_dir(&cfg.state_dir)?;
    let node_id = state::node_id(&cfg.state_dir)?;
    let key = RoomKey::load(cfg.room_key_file.as_deref(), &cfg.state_dir)?;
    let impair = Impairment::from_env()?;
    if let Some(d) = clock.distortion() {
        tracing::warn!(
            offset_ns = d.offset_ns,
            skew_ppm = d.skew_ppm,
            "BANDSYNC_TEST_CLOCK is set: this node's clock is distorted"
        );
    }
    tracing::info!(node = %node_id, name = %cfg.name, room = %cfg.room, state_dir = %cfg.state_dir.display(), "bandsync starting");
    match &cfg.hw {
        Some(h) => {
            tracing::info!(profile = %h.name, buffer_frames = cfg.buffer_frames, sample_rate = cfg.sample_rate, latency_offset_ns = cfg.latency_offset_ns, "board profile")
        }
        None => tracing::info!(
            "no board profile (defaults, or --buffer-frames/--sample-rate/--latency-offset-ms)"
        ),
    }

    // A box alone: its own clock is session time. It restores its last session from
    // disk; --tempo/--meter only set the first one.
    let redis = match &cfg.redis {
        Some(u) => {
            Some(crate::mirror::RedisUrl::parse(u).map_err(|e| anyhow::anyhow!("--redis: {e}"))?)
        }
        None => None,
    };
    let mut saved = load_session(&cfg.state_dir);
    if saved.is_none() {
        if let Some(url) = &redis {
            saved = restore_from_redis(url, &cfg.room);
        }
    }
    let tempo = saved
        .as_ref()
        .map(|s| s.tempo)
        .or(cfg.tempo)
        .unwrap_or(Tempo::from_mbpm(120_000).expect("120 BPM is valid"));
    let meter = saved
        .as_ref()
        .map(|s| s.meter)
        .or(cfg.meter)
        .unwrap_or(Meter::new(4).expect("4 is a valid meter"));
    let play = cfg.play || saved.as_ref().is_some_and(|s| s.playing);
    if let Some(s) = &saved {
        tracing::info!(tempo = %s.tempo, meter = s.meter.get(), playing = s.playing, pinned = ?s.pinned, "restored the saved session");
    }
    let now = clock.now_ns();
    let timeline = if play {
        Timeline::start_at(now + START_LEAD_NS, tempo, meter, true)
    } else {
        Timeline::start_at(now, tempo, meter, false)
    };
    let snap = AudioSnapshot {
        timeline,
        map: SessionMap::IDENTITY,
        epoch: 1,
        latency_offset_ns: cfg.latency_offset_ns,
        gain: cfg.volume,
        clock_gen: 0,
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

    let audio_cfg = AudioConfig {
        backend: cfg.audio.clone(),
        sample_rate: cfg.sample_rate,
        buffer_frames: cfg.buffer_frames,
    };
    let ctx = AudioCtx {
        cell: cell.clone(),
        stats: stats.clone(),
        clock,
        log_queues,
        stop: stop.clone(),
    };
    let audio_thread = std::thread::Builder::new()
        .name("audio".into())
        .spawn(move || device::run(audio_cfg, ctx))
        .context("spawning the audio thread")?;

    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    ctrlc::set_handler(move || {
        let _ = shutdown_tx.send(true);
    })
    .context("installing the ctrl-c/SIGTERM handler")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bandsync-rt")
        .build()
        .context("starting the tokio runtime")?;
    let mesh_cfg = MeshConfig {
        node_id: node_id.clone(),
        name: cfg.name.clone(),
        room: cfg.room.clone(),
        priority: cfg.priority,
        quic: cfg.quic,
        interfaces: cfg.interfaces.clone(),
        key,
        state_dir: cfg.state_dir.clone(),
        impair,
        http_port: None,
        https: None,
        mirror: None,
        mirror_refusals: None,
        usage: None,
        link: None,
        mirror_stats: None,
        status_tx: None,
        control_tx: None,
        board: None,
        notify: crate::sys::notify::Notifier::from_env(),
        audio: stats.clone(),
    };
    let session = SessionId {
        born_ms: wall_ms(),
        by: u64::from_str_radix(&node_id, 16).unwrap_or(0),
    };
    let mut room = Room::new(
        RoomConfig {
            me: node_id.clone(),
            name: cfg.name.clone(),
            priority: cfg.priority,
            quantum: cfg.quantum,
            wall_offset_ns: wall_ms() as i64 * 1_000_000 - clock.now_ns(),
        },
        session,
        timeline,
    );
    // Decisions: a restored session keeps its stamps; start flags that change what it
    // would play (or set a first boot's timeline) are a decision made now; a first boot
    // without flags carries the default, older than any decision.
    let restored = saved.clone().unwrap_or_else(|| Persisted {
        tempo,
        meter,
        playing: false,
        pinned: None,
        epoch: 1,
        decided: Stamp::DEFAULT,
        pin_decided: Stamp::DEFAULT,
        control_pin: None,
        control_decided: Stamp::DEFAULT,
        hlc: Hlc::default(),
        setlist: Vec::new(),
        setlist_decided: Stamp::DEFAULT,
        song: None,
        song_decided: Stamp::DEFAULT,
    });
    let hlc = restored.hlc;
    let flags_decide = match &saved {
        Some(s) => cfg.play && !s.playing,
        None => cfg.play || cfg.tempo.is_some() || cfg.meter.is_some(),
    };
    let decided = if flags_decide {
        tracing::info!("the start flags are a decision (newer than defaults, older than any made while the room runs)");
        restored.decided.clone().max(Stamp::FLAGS)
    } else {
        restored.decided.clone()
    };
    room.set_pinned(restored.pinned.clone());
    room.restore_epoch(restored.epoch);
    room.set_decided(decided, restored.pin_decided.clone(), hlc);
    // The control PIN: `control = "open"` and `--control-pin` are start-flag decisions;
    // else the room's PIN as saved, else this box's own (made on first start). The room
    // keeps the latest decision (`bandsync control-pin` prints the one in force).
    let (control_pin, control_stamp) = if cfg.control_open {
        tracing::warn!(
            "control = \"open\": any phone on the network may change tempo and transport"
        );
        (None, Stamp::FLAGS)
    } else if let Some(p) = &cfg.control_pin {
        state::write_secret(
            &cfg.state_dir.join("control-pin"),
            format!("{p}\n").as_bytes(),
        )?;
        (Some(p.clone()), Stamp::FLAGS)
    } else if restored.control_decided != Stamp::DEFAULT || restored.control_pin.is_some() {
        (
            restored.control_pin.clone(),
            restored.control_decided.clone(),
        )
    } else {
        (Some(state::control_pin(&cfg.state_dir)?), Stamp::DEFAULT)
    };
    room.set_control_pin(control_pin.clone(), control_stamp);
    room.restore_setlist(
        restored.setlist.clone(),
        restored.setlist_decided.clone(),
        restored.song,
        restored.song_decided.clone(),
    );
    let saved_cues = load_cues(&cfg.state_dir);
    room.restore_cues(saved_cues.cues, saved_cues.floor);
    let board = Arc::new(crate::net::handle::Board::default());
    board.setlist.send_replace(crate::net::handle::SetlistView {
        songs: Arc::new(room.setlist().to_vec()),
        song: room.song(),
    });
    crate::node::room_task::publish_cues(&board, &room);
    let mesh_stats = Arc::new(MeshStats::default());
    let mirror_stats = Arc::new(crate::mirror::MirrorStats::default());
    let http_addr = cfg.http;
    let https_addr = cfg.https;
    let link_stats = Arc::new(crate::net::LinkStats::default());
    let link_cfg = cfg.link.then(|| crate::net::link::LinkConfig {
        room: cfg.room.clone(),
        node_id: node_id.clone(),
        interfaces: cfg.interfaces.clone(),
        control: cfg.link_control,
    });
    let result = rt.block_on(async {
        let (handle, inbox) = net::channel();
        let link = link_cfg.map(|c| crate::net::link::start(c, clock, cell.clone(), handle.clone(), link_stats.clone()));
        let (published_tx, published_rx) = tokio::sync::watch::channel(0u64);
        // The room task publishes its status here (every tick it changes, and every
        // 250 ms): /health and /metrics never wait on the clock loop.
        let (status_tx, status_rx) = tokio::sync::watch::channel(None);
        let (control_tx, control_rx) = tokio::sync::watch::channel(control_pin.clone());
        let http_state = crate::web::http::HttpState {
            room: handle,
            audio: stats.clone(),
            mesh: mesh_stats.clone(),
            cell: cell.clone(),
            clock,
            changes: published_rx,
            status: status_rx,
            control_pin: control_pin.clone(),
            control_open: control_pin.is_none(),
            control_updates: Some(control_rx),
            link: link.is_some().then(|| link_stats.clone()),
            board: board.clone(),
            allowed_hosts: crate::web::hosts::AllowedHosts::for_box(&[&cfg.name, &node_id]),
            limits: crate::web::gateway::GatewayLimits::default(),
            stats: Arc::new(crate::web::gateway::GatewayStats::default()),
            mirror: redis.is_some().then(|| mirror_stats.clone()),
            venue: redis.clone(),
        };
        // HTTPS: the box's own certificate (made off the runtime's workers: key
        // generation and file IO). A failure costs the secure page, never the click.
        let https = match https_addr {
            None => None,
            Some(addr) => {
                let dir = cfg.state_dir.clone();
                let name = cfg.name.clone();
                let made = tokio::task::spawn_blocking(move || {
                    let names = crate::web::tls::wanted_names(&name);
                    let id = crate::web::tls::load_or_make(&dir, &names)?;
                    let config = crate::web::tls::server_config(&id)?;
                    anyhow::Ok(crate::web::http::HttpsListen { addr, identity: id, config })
                })
                .await;
                match made {
                    Ok(Ok(h)) => Some(h),
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "no HTTPS: the secure phone page (wake lock, talkback) is unavailable");
                        None
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "no HTTPS: making the certificate failed");
                        None
                    }
                }
            }
        };
        let sha = https.as_ref().map(|h| h.identity.sha256.clone());
        let limits = crate::web::http::HttpLimits::default();
        let (http_port, https_port) = match crate::web::http::serve_both(http_addr, https, http_state, limits, shutdown.clone()).await {
            Ok((a, tls)) => {
                let tls = match tls {
                    Some(Ok(t)) => Some(t.port()),
                    Some(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "no HTTPS: the secure phone page (wake lock, talkback) is unavailable");
                        None
                    }
                    None => None,
                };
                (Some(a.port()), tls)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "no HTTP: phones, /health and /metrics are unavailable (the click goes on)");
                (None, None)
            }
        };
        let reporter = tokio::spawn(report(cell.clone(), stats.clone(), clock));
        let mut mesh_cfg = mesh_cfg;
        mesh_cfg.http_port = http_port;
        mesh_cfg.https = https_port.zip(sha);
        mesh_cfg.status_tx = Some(status_tx);
        mesh_cfg.control_tx = Some(control_tx);
        mesh_cfg.board = Some(board.clone());
        mesh_cfg.link = link.is_some().then(|| link_stats.clone());
        let mut upstream = None;
        if let Some(url) = redis {
            let (tx, rx) = tokio::sync::watch::channel(None);
            let (refused_tx, refused_rx) = tokio::sync::mpsc::channel(4);
            mesh_cfg.mirror = Some(tx);
            mesh_cfg.mirror_refusals = Some(refused_rx);
            mesh_cfg.mirror_stats = Some(mirror_stats.clone());
            tracing::info!(url = %url, "mirroring the session to Redis");
            let opts = crate::mirror::MirrorOptions { refusals: Some(refused_tx), ..Default::default() };
            upstream = Some(crate::node::usage::Upstream::start(url.clone(), cfg.room.clone(), shutdown.clone()));
            tokio::spawn(crate::mirror::run_with(url, cfg.room.clone(), rx, mirror_stats.clone(), shutdown.clone(), opts));
        }
        mesh_cfg.usage = match crate::node::usage::UsageLog::open(&cfg.state_dir, upstream) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no usage log (the click goes on)");
                None
            }
        };
        let r = room_task::run(mesh_cfg, inbox, room, clock, cell.clone(), mesh_stats, published_tx, shutdown).await;
        if let Some(l) = link {
            tokio::task::block_in_place(|| l.stop());
        }
        reporter.abort();
        r
    });

    stop.store(true, Ordering::Relaxed);
    let _ = audio_thread.join();
    if let Some(h) = log_thread {
        let _ = h.join();
    }
    tracing::info!(
        clicks = stats.clicks.load(Relaxed),
        late = stats.late_clicks.load(Relaxed),
        missed = stats.missed_clicks.load(Relaxed),
        audio_clock_resets = stats.clock_resets.load(Relaxed),
        card_rate_ppm = stats.rate_ppb.load(Relaxed) as f64 / 1000.0,
        "bandsync stopped"
    );
    result
}

/// A room with no local state may start from the Redis mirror's record (the newest
/// epoch any leader wrote). Redis being down or wrong only costs a warning.
fn restore_from_redis(url: &crate::mirror::RedisUrl, room: &str) -> Option<Persisted> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    match rt.block_on(crate::mirror::fetch(url, room, Duration::from_secs(1))) {
        Ok(Some(r)) => {
            tracing::info!(
                epoch = r.epoch,
                tempo_mbpm = r.tempo_mbpm,
                meter = r.meter,
                "restoring the session from Redis"
            );
            Some(Persisted {
                tempo: Tempo::from_mbpm(r.tempo_mbpm).ok()?,
                meter: Meter::new(r.meter as i64).ok()?,
                playing: r.playing,
                pinned: r.pinned,
                epoch: r.epoch,
                decided: Stamp::DEFAULT,
                pin_decided: Stamp::DEFAULT,
                control_pin: None,
                control_decided: Stamp::DEFAULT,
                hlc: Hlc::default(),
                setlist: Vec::new(),
                setlist_decided: Stamp::DEFAULT,
                song: None,
                song_decided: Stamp::DEFAULT,
            })
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the session from Redis; starting from defaults");
            None
        }
    }
}

/// The saved session, if it is readable. A corrupt, truncated or newer-format file
/// is reported and ignored (the node starts from defaults), never a crash loop.
fn load_session(dir: &std::path::Path) -> Option<Persisted> {
    let p = dir.join("session.json");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "cannot read the saved session; starting from defaults");
            return None;
        }
    };
    match serde_json::from_str::<Persisted>(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "the saved session is unreadable (corrupt or from another version); starting from defaults");
            None
        }
    }
}

/// The saved cue log (`cues.json`), if readable; else none (reported).
fn load_cues(dir: &std::path::Path) -> crate::core::room::PersistedCues {
    let p = dir.join("cues.json");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %p.display(), error = %e, "the saved cues are unreadable; starting without them");
            Default::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "cannot read the saved cues");
            Default::default()
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A status line every 10 s.
async fn report(cell: Arc<SnapshotCell>, stats: Arc<AudioStats>, clock: NodeClock) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let s = cell.read();
        let seg = *s.timeline.current(s.map.to_session(clock.now_ns()));
        tracing::info!(
            tempo = %seg.tempo,
            meter = seg.meter.get(),
            playing = seg.playing,
            epoch = s.epoch,
            sink = stats.sink_name(),
            clicks = stats.clicks.load(Relaxed),
            late = stats.late_clicks.load(Relaxed),
            missed = stats.missed_clicks.load(Relaxed),
            card_rate_ppm = stats.rate_ppb.load(Relaxed) as f64 / 1000.0,
            "status"
        );
    }
}
