//! The room's driver, as seen from the node: the task that owns the [`Room`] core, feeds
//! it frames, pongs, queries and ticks, and carries out its actions (send, publish to
//! the audio thread, persist, log), plus dialing the peers mDNS finds.

use crate::audio::snapshot::{AudioSnapshot, SnapshotCell};
use crate::core::room::{Action, Note, Room};
use crate::core::wire::{Frame, Query, Reply};
use crate::net::auth::RoomKey;
use crate::net::discovery::{self, Discovery, DiscoveryConfig, PeerEvent};
use crate::net::handle::{Event, Inbox};
use crate::net::impair::Impairment;
use crate::net::peer::{self, Admit, PeerCtx, PreAuth, CLOSE_BYE, CLOSE_DUP};
use crate::net::MeshStats;
use crate::node::status::{decorate, write_status};
use crate::sys::clock::{Clock, NodeClock};
use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const TICK: Duration = Duration::from_millis(50);
/// When a starting node sends its one-shot mDNS query, and how long it listens.
const START_QUERY_AFTER: Duration = Duration::from_millis(150);
const START_QUERY_FOR: Duration = Duration::from_secs(3);
/// A missing peer is dialed again this often…
const DIAL_EVERY: Duration = Duration::from_millis(250);
/// …with at most this many attempts in flight…
const DIAL_PARALLEL: usize = 4;
/// A peer of lower id (it should dial us) missing this long is dialed by us too.
const DIAL_BOTH_AFTER: Duration = Duration::from_millis(1_500);
/// …each given this long for the QUIC handshake (the room-key proof has its own).
const DIAL_TIMEOUT: Duration = Duration::from_millis(1_000);

pub struct MeshConfig {
    /// The HTTP port phones use (advertised as `_http._tcp`, shown by `status`).
    pub http_port: Option<u16>,
    /// The HTTPS port (advertised as `_https._tcp`) and the certificate's SHA-256.
    pub https: Option<(u16, String)>,
    /// systemd's notify socket (READY, WATCHDOG, STATUS), when run as a service.
    pub notify: Option<crate::sys::notify::Notifier>,
    /// The audio thread's counters: the watchdog is only fed while the click runs.
    pub audio: Arc<crate::audio::AudioStats>,
    /// Where the room's status is published for `/health` and `/metrics`.
    pub status_tx: Option<tokio::sync::watch::Sender<Option<crate::core::room::Status>>>,
    /// Where the room's control PIN is published for the phone gateway.
    pub control_tx: Option<tokio::sync::watch::Sender<Option<String>>>,
    /// Where the setlist and cue changes are published for the phone gateway.
    pub board: Option<Arc<crate::net::handle::Board>>,
    /// Link's counters (for `status`), when Link runs.
    pub link: Option<Arc<crate::net::LinkStats>>,
    /// The mirror's counters (for `status`), with `--redis`.
    pub mirror_stats: Option<Arc<crate::mirror::MirrorStats>>,
    /// The Redis mirror's input (only the leader writes; followers send `None`).
    pub mirror: Option<tokio::sync::watch::Sender<Option<crate::mirror::MirrorRecord>>>,
    /// The mirror's refused writes, with who holds the room in Redis (see
    /// [`on_refused`]).
    pub mirror_refusals: Option<mpsc::Receiver<crate::mirror::Refusal>>,
    /// The room's usage log (and its Redis upstream), fed every tick.
    pub usage: Option<crate::node::usage::UsageLog>,
    pub node_id: String,
    pub name: String,
    pub room: String,
    pub priority: i32,
    pub quic: SocketAddr,
    pub interfaces: Vec<String>,
    pub key: RoomKey,
    pub state_dir: PathBuf,
    pub impair: Option<Impairment>,
}

pub(crate) struct Shared {
    pub(crate) published: tokio::sync::watch::Sender<u64>,
    pub(crate) cfg: MeshConfig,
    pub(crate) clock: NodeClock,
    pub(crate) cell: Arc<SnapshotCell>,
    /// What the connection tasks share (also the room task's inbox sender).
    pub(crate) peer: Arc<PeerCtx>,
}

/// Run the room until `shutdown`. Owns `room`; publishes to `cell`.
pub async fn run(
    cfg: MeshConfig,
    inbox: Inbox,
    mut room: Room,
    clock: NodeClock,
    cell: Arc<SnapshotCell>,
    stats: Arc<MeshStats>,
    published: tokio::sync::watch::Sender<u64>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut cfg = cfg;
    let mut refusals = cfg.mirror_refusals.take();
    let mut usage = cfg.usage.take();
    // Redis shows another live leader of this room: do not outbid it (see on_refused).
    let mut deposed: Option<(String, u64)> = None;
    let (endpoint, local) = peer::endpoint(cfg.quic, &cfg.state_dir, cfg.impair)?;
    tracing::info!(addr = %local, impaired = cfg.impair.is_some(), "QUIC endpoint listening");

    let (disc, mut found) = Discovery::start(DiscoveryConfig {
        node_id: cfg.node_id.clone(),
        name: cfg.name.clone(),
        room: cfg.room.clone(),
        quic_port: local.port(),
        interfaces: cfg.interfaces.clone(),
        advertise: true,
        http_port: cfg.http_port,
        https_port: cfg.https.as_ref().map(|h| h.0),
    })
    .context("starting mDNS discovery")?;

    let (mut erx, etx) = inbox.split();
    let ctx = Arc::new(PeerCtx {
        node_id: cfg.node_id.clone(),
        name: cfg.name.clone(),
        room_hash: discovery::room_hash(&cfg.room),
        priority: cfg.priority,
        key: cfg.key.clone(),
        clock,
        cell: cell.clone(),
        stats,
        events: etx,
        log: crate::sys::ratelog::RateLog::new(Duration::from_secs(10)),
        preauth: PreAuth::default(),
        boot: {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        },
    });
    let shared = Arc::new(Shared {
        published,
        cfg,
        clock,
        cell: cell.clone(),
        peer: ctx,
    });

    // Accept loop.
    let acceptor = {
        let ctx = shared.peer.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let shared = ctx.clone();
                let addr = incoming.remote_address();
                let slot = match PreAuth::admit(
                    &shared,
                    addr.ip(),
                    incoming.remote_address_validated(),
                ) {
                    Admit::Go(slot) => slot,
                    Admit::Retry => {
                        shared.stats.preauth_retries.fetch_add(1, Relaxed);
                        let _ = incoming.retry();
                        continue;
                    }
                    Admit::Refuse => {
                        shared.stats.preauth_refused.fetch_add(1, Relaxed);
                        if let Some(left_out) = shared.log.allow("preauth_full") {
                            tracing::warn!(%addr, left_out, "too many unauthenticated connections; refused (one line per 10 s)");
                        }
                        incoming.ignore();
                        continue;
                    }
                };
                tokio::spawn(async move {
                    match tokio::time::timeout(peer::AUTH_TIMEOUT, incoming).await {
                        Ok(Ok(conn)) => peer::serve(shared, conn, false, None, Some(slot)).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "incoming connection failed")
                        }
                        Err(_) => tracing::debug!(%addr, "QUIC handshake timed out"),
                    }
                });
            }
        })
    };

    let mut peers: HashMap<String, (quinn::Connection, mpsc::Sender<Frame>)> = HashMap::new();
    // Dial attempts in flight per peer, by start time: a new one starts every
    // DIAL_EVERY while the peer is missing (at most DIAL_PARALLEL at once), so a healed
    // link is used within DIAL_EVERY + one handshake instead of after a backoff.
    let mut dialing: HashMap<String, Vec<tokio::time::Instant>> = HashMap::new();
    // Candidate peers from mDNS: what an advert claims, never trusted for identity (the
    // authenticated handshake decides who answered). Several addresses per id, so a
    // spoofed advert adds an address to try but never removes the member's own.
    let mut known = Candidates::default();
    // A room started together (after a power cut) may each have queried before the
    // others announced; mDNS answers a record just announced only a second later
    // (RFC 6762 §6). A one-shot unicast query shortly after the start gets the answers
    // at once (net::oneshot; sent at START_QUERY_AFTER and 250 ms later).
    let mut fast_at = Some(tokio::time::Instant::now() + START_QUERY_AFTER);
    let mut fast: Option<tokio::sync::mpsc::Receiver<crate::core::advert::PeerInfo>> = None;
    let fast_until = tokio::time::Instant::now() + START_QUERY_FOR;
    let mut missing_since: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut redial = tokio::time::interval(Duration::from_secs(1));
    let mut last_status = 0i64;
    let mut status_written = None;
    let (dial_done_tx, mut dial_done) = mpsc::channel::<(String, tokio::time::Instant)>(64);
    let mut actions = Vec::new();
    let mut rtc_sub: Option<mpsc::Sender<(String, crate::core::wire::RtcRelay)>> = None;
    let mut ready = false;
    let watchdog_every = crate::sys::notify::Notifier::watchdog_interval();
    let mut last_watchdog = tokio::time::Instant::now();
    let mut last_callbacks = 0u64;
    let mut last_notify_status = tokio::time::Instant::now() - Duration::from_secs(10);
    // Test hook: freeze this loop after N ms (the watchdog must then stop).
    let freeze_at = std::env::var("BANDSYNC_TEST_FREEZE_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    // Diagnostics: `BANDSYNC_DEBUG_SYNC_DUMP=PATH` appends every clock exchange
    // (`peer t1 t2 t3 t4 map.local_ref map.session_ref map.rate_ppt accepted`) to
    // PATH, for replaying through the estimator offline.
    let mut sync_dump = std::env::var_os("BANDSYNC_DEBUG_SYNC_DUMP").and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map(std::io::BufWriter::new)
            .map_err(|e| tracing::warn!(error = %e, "BANDSYNC_DEBUG_SYNC_DUMP: cannot open"))
            .ok()
    });

    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {
                tracing::info!("shutting down");
                break;
            }
            _ = async { tokio::time::sleep_until(fast_at.expect("guarded")).await }, if fast_at.is_some() => {
                fast_at = None;
                fast = Some(crate::net::oneshot::spawn(
                    discovery::room_hash(&shared.cfg.room),
                    shared.cfg.interfaces.clone(),
                ));
            }
            got = async { fast.as_mut().expect("guarded").recv().await }, if fast.is_some() => match got {
                Some(p) if p.node_id != shared.cfg.node_id => {
                    tracing::debug!(peer = %p.node_id, name = %p.name, addrs = ?p.addrs, "discovered (one-shot query)");
                    known.found_dialable(&p, &shared.cfg);
                }
                Some(_) => {}
                None => fast = None,
            },
            Some(ev) = found.recv() => match ev {
                PeerEvent::Found(p) => {
                    tracing::debug!(peer = %p.node_id, name = %p.name, addrs = ?p.addrs, "discovered");
                    known.found_dialable(&p, &shared.cfg);
                }
                PeerEvent::Lost { node_id } => {
                    // liveness is QUIC's job; a goodbye (or a forged one) only ages the entry
                    tracing::debug!(peer = %node_id, "mDNS lost");
                }
            },
            Some((id, started)) = dial_done.recv() => {
                if let Some(v) = dialing.get_mut(&id) {
                    v.retain(|t| *t != started);
                    if v.is_empty() {
                        dialing.remove(&id);
                    }
                }
            }
            _ = redial.tick() => {}
            Some(r) = async {
                match refusals.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => on_refused(&mut room, &shared.cfg.node_id, r, &mut deposed),
            Some(ev) = erx.recv() => {
                let now = shared.clock.now_ns();
                match ev {
                    Event::Up { id, name, conn, tx, dialer, boot } => {
                        if let Some((old, _)) = peers.get(&id) {
                            if old.close_reason().is_none() {
                                // Both sides dialed (the higher id dials too when the
                                // lower one has not reached it): keep the connection the
                                // lower id dialed, as the peer does.
                                let keep_new = dialer == (shared.cfg.node_id < id);
                                if keep_new {
                                    old.close(CLOSE_DUP.into(), b"duplicate connection");
                                    // the same live peer: its clock estimate stays
                                    peers.insert(id.clone(), (conn, tx));
                                } else {
                                    conn.close(CLOSE_DUP.into(), b"duplicate connection");
                                }
                                continue;
                            }
                        }
                        tracing::info!(peer = %id, %name, addr = %conn.remote_address(), "peer joined the mesh");
                        shared.peer.stats.connections.fetch_add(1, Relaxed);
                        if peers.insert(id.clone(), (conn, tx)).is_some() {
                            // a new connection replaces a dead one (the peer may have
                            // rebooted): start its clock estimate afresh
                            room.peer_down(&id);
                        }
                        room.peer_up(&id, &name, boot);
                    }
                    Event::Down { id, stable } => {
                        if peers.get(&id).is_some_and(|(c, _)| c.stable_id() == stable) {
                            peers.remove(&id);
                            room.peer_down(&id);
                            tracing::info!(peer = %id, "peer left the mesh");
                            // its phones leave talkback at once
                            if let Some(tx) = &rtc_sub {
                                let _ = tx.try_send((id.clone(), crate::core::wire::RtcRelay::Members(Vec::new())));
                            }
                        }
                    }
                    // Talkback: relayed between the gateway and the other boxes, never
                    // seen by the room core.
                    Event::Frame { from, frame: Frame::Rtc(r) } => {
                        if let Some(tx) = &rtc_sub {
                            if tx.try_send((from, r)).is_err() {
                                shared.peer.stats.rtc_dropped.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Event::RtcOut(r) => {
                        for (_, tx) in peers.values() {
                            if tx.try_send(Frame::Rtc(r.clone())).is_err() {
                                shared.peer.stats.rtc_dropped.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Event::RtcSubscribe(tx) => rtc_sub = Some(tx),
                    Event::LinkSteer { base, new } => {
                        if room.steer_link(base, new) {
                            tracing::debug!(shift_us = new as f64 / 1e3, step_us = (new - base) as f64 / 1e3, "Link: the room's ghost clock steered onto the apps'");
                        }
                        publish_link_shift(&shared, &room);
                    }
                    Event::Frame { from, frame } => {
                        if let Err(e) = room.handle_frame(&from, frame, now, &mut actions) {
                            shared.peer.stats.bad_frames.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %from, error = %e, "frame ignored");
                        }
                    }
                    Event::Query { q, reply } => {
                        let board_query = !matches!(q, Query::Status | Query::Change { .. } | Query::Pin(_) | Query::Unpin);
                        let r = match answer(&mut room, q, now, &mut actions) {
                            Reply::Error(e) if board_query => {
                                shared.peer.stats.bad_requests.fetch_add(1, Relaxed);
                                tracing::info!(error = %e, "setlist/cue request refused");
                                Reply::Error(e)
                            }
                            Reply::Status(j) => match serde_json::from_str::<crate::core::room::Status>(&j) {
                                Ok(mut st) => {
                                    decorate(&shared, &mut st);
                                    serde_json::to_string(&st).map(Reply::Status).unwrap_or(Reply::Status(j))
                                }
                                Err(_) => Reply::Status(j),
                            },
                            other => other,
                        };
                        let _ = reply.send(r);
                    }
                    Event::Pong { from, sample, map } => {
                        let verdict = room.on_pong(&from, sample, map);
                        if let Some(crate::core::sync::SampleVerdict::Rejected(_)) = verdict {
                            shared.peer.stats.rejected_samples.fetch_add(1, Relaxed);
                        }
                        if let Some(d) = sync_dump.as_mut() {
                            use std::io::Write;
                            let _ = writeln!(
                                d,
                                "{from} {} {} {} {} {} {} {} {}",
                                sample.t1,
                                sample.t2,
                                sample.t3,
                                sample.t4,
                                map.local_ref,
                                map.session_ref,
                                map.rate_ppt,
                                matches!(verdict, Some(crate::core::sync::SampleVerdict::Accepted))
                            );
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if freeze_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    tracing::warn!("BANDSYNC_TEST_FREEZE_AFTER_MS: freezing the room loop (test hook)");
                    std::future::pending::<()>().await;
                }
                let now = shared.clock.now_ns();
                room.tick(now, &mut actions);
                publish_link_shift(&shared, &room);
                service_manager(&shared, &room, now, &mut ready, watchdog_every, &mut last_watchdog, &mut last_callbacks, &mut last_notify_status);
                // dial peers we know and are not connected to (the lower id dials)
                let t_now = tokio::time::Instant::now();
                if t_now >= fast_until {
                    fast = None; // the start's one-shot query is over (dropping the receiver ends its task)
                }
                known.prune(t_now, |id| peers.contains_key(id));
                missing_since.retain(|id, _| !peers.contains_key(id));
                for (id, addrs) in known.iter() {
                    if *id == shared.cfg.node_id || peers.contains_key(id) {
                        continue;
                    }
                    // The lower id dials; the higher one too once the peer has been
                    // missing a while (its view of us may be wrong: a forged advert, a
                    // stale address after our restart).
                    let since = *missing_since.entry(id.clone()).or_insert(t_now);
                    if *id < shared.cfg.node_id && t_now - since < DIAL_BOTH_AFTER {
                        continue;
                    }
                    let inflight = dialing.entry(id.clone()).or_default();
                    if inflight.len() >= DIAL_PARALLEL
                        || inflight.iter().any(|t| t_now - *t < DIAL_EVERY)
                    {
                        continue;
                    }
                    // several addresses per id: try them in turn
                    let Some(addr) = pick_addr(addrs, shared.cfg.quic, inflight.len()) else {
                        continue;
                    };
                    inflight.push(t_now);
                    let shared = shared.peer.clone();
                    let endpoint = endpoint.clone();
                    let id = id.clone();
                    let done = dial_done_tx.clone();
                    tracing::debug!(peer = %id, %addr, in_flight = inflight.len(), "dialing");
                    tokio::spawn(async move {
                        match endpoint.connect(addr, "bandsync") {
                            Ok(connecting) => match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                                Ok(Ok(conn)) => {
                                    tracing::debug!(peer = %id, %addr, "connected");
                                    peer::serve(shared, conn, true, Some(id.clone()), None).await
                                }
                                Ok(Err(e)) => tracing::debug!(peer = %id, %addr, error = %e, "connect failed"),
                                Err(_) => tracing::debug!(peer = %id, %addr, "connect timed out"),
                            },
                            Err(e) => tracing::debug!(peer = %id, %addr, error = %e, "cannot connect"),
                        }
                        let _ = done.send((id, t_now)).await;
                    });
                }
                if !room.leading() {
                    deposed = None;
                }
                holder_joined(&mut room, &mut deposed);
                if let Some(tx) = &shared.cfg.mirror {
                    update_mirror(tx, &shared.cfg.room, &room, now);
                }
                if let Some(u) = usage.as_mut() {
                    u.tick(&room, now, deposed.is_none());
                }
                if now - last_status >= 250_000_000 {
                    last_status = now;
                    write_status(&shared, &room, now, &mut status_written);
                }
            }
        }
        carry_out(&shared, &mut room, &peers, &mut actions);
    }

    if let Some(n) = &shared.cfg.notify {
        n.stopping();
    }
    if let Some(u) = usage.as_mut() {
        u.shutdown(
            room.leading() && deposed.is_none(),
            Duration::from_millis(500),
        )
        .await;
    }
    // Orderly goodbye: each connection's writer sends `Bye`, waits for the peer to
    // have it and closes; give them a moment before the endpoint goes.
    for (conn, tx) in peers.values() {
        if tx.try_send(Frame::Bye("shutting down".into())).is_err() {
            conn.close(CLOSE_BYE.into(), b"shutting down");
        }
    }
    let closing = peers.values().map(|(c, _)| c.clone()).collect::<Vec<_>>();
    let _ = tokio::time::timeout(peer::BYE_WAIT + Duration::from_millis(50), async {
        for c in closing {
            c.closed().await;
        }
    })
    .await;
    disc.shutdown();
    acceptor.abort();
    endpoint.close(CLOSE_BYE.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
    Ok(())
}

/// Candidate peers (id → addresses) learnt from mDNS, bounded.
#[derive(Default)]
struct Candidates(HashMap<String, (Vec<SocketAddr>, tokio::time::Instant)>);

impl Candidates {
    /// Ids kept at most (a room has a handful of boxes; a flood of adverts is cut).
    const MAX_IDS: usize = 64;
    /// Addresses kept per id, newest first.
    const MAX_ADDRS: usize = 8;
    /// An id not announced (and not connected) for this long is forgotten.
    const FORGET: Duration = Duration::from_secs(600);

    fn found(&mut self, id: &str, addrs: &[SocketAddr], now: tokio::time::Instant) {
        if addrs.is_empty() {
            return;
        }
        if !self.0.contains_key(id) && self.0.len() >= Self::MAX_IDS {
            // evict the longest-unannounced
            if let Some(old) = self
                .0
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            {
                self.0.remove(&old);
            }
        }
        let e = self.0.entry(id.to_string()).or_insert((Vec::new(), now));
        let mut merged: Vec<SocketAddr> = addrs.to_vec();
        merged.extend(e.0.iter().filter(|a| !addrs.contains(a)));
        merged.truncate(Self::MAX_ADDRS);
        *e = (merged, now);
    }

    /// An advert (mDNS or the one-shot query): its addresses this node may dial.
    fn found_dialable(&mut self, p: &crate::core::advert::PeerInfo, cfg: &MeshConfig) {
        let usable: Vec<SocketAddr> = p
            .addrs
            .iter()
            .copied()
            .filter(|a| dialable(a, cfg))
            .collect();
        self.found(&p.node_id, &usable, tokio::time::Instant::now());
    }

    fn prune(&mut self, now: tokio::time::Instant, connected: impl Fn(&str) -> bool) {
        self.0
            .retain(|id, (_, t)| connected(id) || now.duration_since(*t) < Self::FORGET);
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Vec<SocketAddr>)> {
        self.0.iter().map(|(k, (a, _))| (k, a))
    }
}

/// Loopback addresses are dialed only by a node that itself lives on loopback (tests,
/// one-host labs): an advert must not make a box dial its own services.
fn dialable(a: &SocketAddr, cfg: &MeshConfig) -> bool {
    !a.ip().is_loopback() || cfg.quic.ip().is_loopback() || cfg.interfaces.iter().any(|i| i == "lo")
}

/// The `turn`-th address to try, those of our bind address's family first.
fn pick_addr(addrs: &[SocketAddr], bind: SocketAddr, turn: usize) -> Option<SocketAddr> {
    let mut v: Vec<SocketAddr> = addrs
        .iter()
        .filter(|a| a.is_ipv4() == bind.is_ipv4())
        .chain(addrs.iter().filter(|a| a.is_ipv4() != bind.is_ipv4()))
        .copied()
        .collect();
    v.dedup();
    (!v.is_empty()).then(|| v[turn % v.len()])
}

fn carry_out(
    shared: &Shared,
    room: &mut Room,
    peers: &HashMap<String, (quinn::Connection, mpsc::Sender<Frame>)>,
    actions: &mut Vec<Action>,
) {
    let mut cues_changed = false;
    for a in actions.drain(..) {
        match a {
            Action::Broadcast(f) => {
                for (id, (_, tx)) in peers {
                    if tx.try_send(f.clone()).is_err() {
                        tracing::debug!(peer = %id, "send queue full; frame dropped");
                    }
                }
            }
            Action::Send { to, frame } => match peers.get(&to) {
                Some((_, tx)) => {
                    let _ = tx.try_send(frame);
                }
                None => tracing::warn!(peer = %to, "no connection to send to"),
            },
            Action::Publish {
                timeline,
                map,
                epoch,
                clock_gen,
            } => {
                let mut s: AudioSnapshot = shared.cell.read();
                s.timeline = timeline;
                s.map = map;
                s.epoch = epoch;
                s.clock_gen = clock_gen;
                shared.cell.write(&s);
                shared.published.send_modify(|v| *v += 1);
            }
            Action::ControlPin(pin) => {
                tracing::info!(
                    open = pin.is_none(),
                    "the room's control PIN changed (a later decision)"
                );
                if let Some(tx) = &shared.cfg.control_tx {
                    tx.send_replace(pin.clone());
                }
                if let Some(p) = pin {
                    let path = shared.cfg.state_dir.join("control-pin");
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) =
                            crate::sys::state::write_secret(&path, format!("{p}\n").as_bytes())
                        {
                            tracing::warn!(error = %format!("{e:#}"), "cannot save the control PIN");
                        }
                    });
                }
            }
            Action::Cue(c) => {
                if let Some(b) = &shared.cfg.board {
                    let _ = b.cues.send(c);
                    cues_changed = true;
                }
            }
            Action::Setlist { songs, song } => {
                if let Some(b) = &shared.cfg.board {
                    b.setlist.send_replace(crate::net::handle::SetlistView {
                        songs: Arc::new(songs),
                        song,
                    });
                }
            }
            Action::PersistCues { cues, floor } => {
                let path = shared.cfg.state_dir.join("cues.json");
                let rec = crate::core::room::PersistedCues { cues, floor };
                tokio::task::spawn_blocking(move || match serde_json::to_vec(&rec) {
                    Ok(json) => {
                        if let Err(e) = crate::sys::state::write_atomic(&path, &json) {
                            tracing::warn!(error = %format!("{e:#}"), "cannot save the cues");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot encode the cues"),
                });
            }
            Action::Persist(p) => {
                let path = shared.cfg.state_dir.join("session.json");
                if let Ok(json) = serde_json::to_vec_pretty(&p) {
                    // Atomic and fsynced, on the blocking pool: never on the clock loop.
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = crate::sys::state::write_atomic(&path, &json) {
                            tracing::warn!(error = %format!("{e:#}"), "cannot save the session");
                        }
                    });
                }
            }
            Action::Note(n) => match n {
                Note::BecameLeader { epoch } => {
                    tracing::info!(epoch, "this node now leads the room")
                }
                Note::Following { leader, epoch } => tracing::info!(%leader, epoch, "following"),
                Note::Joined {
                    leader,
                    beat,
                    step_ns,
                } => {
                    tracing::info!(%leader, beat, step_us = step_ns / 1000, "joined the room's session (one clock step, on a beat boundary)")
                }
                Note::WaitingForClock { leader } => {
                    tracing::info!(%leader, "found a running room; syncing clocks before joining")
                }
                Note::Scheduled { change, at } => tracing::info!(
                    ?change,
                    beat = at.beat,
                    at_session_ns = at.time,
                    "change scheduled"
                ),
                Note::ChangeRefused { reason } => tracing::warn!(%reason, "change refused"),
                Note::StaleAnnounce { from } => {
                    tracing::debug!(peer = %from, "ignored an announce from an older epoch")
                }
                Note::Pinned { node: Some(n) } => {
                    tracing::info!(node = %n, "pinned: that node leads while it is alive")
                }
                Note::Pinned { node: None } => tracing::info!("unpinned: the highest rank leads"),
                Note::Merged {
                    record,
                    from,
                    stamp,
                } => {
                    shared.peer.stats.merges.fetch_add(1, Relaxed);
                    tracing::info!(record, peer = %from, %stamp, "groups met: the latest decision wins (that peer's)")
                }
                Note::StampRefused { from, reason } => {
                    shared.peer.stats.stamps_refused.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %from, %reason, "decision stamp refused")
                }
                Note::PinRelayed { to } => {
                    tracing::info!(leader = %to, "pin request relayed to the leader")
                }
                Note::Realigned {
                    leader,
                    beat,
                    step_ns,
                } => {
                    tracing::info!(%leader, beat, step_us = step_ns / 1000, "realigned to the leader's grid at a bar boundary")
                }
            },
        }
    }
    if cues_changed {
        if let Some(b) = &shared.cfg.board {
            publish_cues(b, room);
        }
    }
}

/// The room's Link ghost clock shift, for the Link driver (read lock-free).
fn publish_link_shift(shared: &Shared, room: &Room) {
    if let Some(l) = &shared.cfg.link {
        l.shift_ns.store(room.link_shift_ns(), Relaxed);
    }
}

/// Hand the phone gateway the room's numbered cues, in order (for joining phones).
pub(crate) fn publish_cues(board: &crate::net::handle::Board, room: &Room) {
    let all: Vec<_> = room
        .cues()
        .ordered()
        .into_iter()
        .filter(|c| c.seq != 0)
        .map(|c| c.view())
        .collect();
    board.all.send_replace(Arc::new(all));
}

#[allow(clippy::too_many_arguments)]
fn service_manager(
    shared: &Shared,
    room: &Room,
    now: i64,
    ready: &mut bool,
    watchdog_every: Option<Duration>,
    last_watchdog: &mut tokio::time::Instant,
    last_callbacks: &mut u64,
    last_status: &mut tokio::time::Instant,
) {
    let Some(n) = &shared.cfg.notify else { return };
    let callbacks = shared.cfg.audio.callbacks.load(Relaxed);
    if !*ready && callbacks > 0 {
        *ready = true;
        n.ready();
        tracing::info!("told systemd we are ready");
    }
    let t = tokio::time::Instant::now();
    if let Some(every) = watchdog_every {
        if t - *last_watchdog >= every {
            if callbacks != *last_callbacks {
                n.watchdog();
            } else {
                tracing::warn!("the audio callback has not run since the last watchdog period: not feeding the watchdog");
            }
            *last_callbacks = callbacks;
            *last_watchdog = t;
        }
    }
    if t - *last_status >= Duration::from_secs(2) {
        *last_status = t;
        let seg = *room.timeline().current(room.session_now(now));
        n.status(&format!(
            "{} · {} BPM · {} · {} peer(s)",
            if room.leading() { "leader" } else { "follower" },
            seg.tempo,
            if seg.playing { "playing" } else { "stopped" },
            room.peer_ids().len()
        ));
    }
}

/// The mirror's write was refused: Redis holds a newer record of the room. A leader
/// takes an epoch above it ([`Room::outbid_epoch`]) — after its own restart, or a
/// takeover whose epoch it never saw — unless another live leader holds the room (its
/// heartbeat is fresh and it is not a box of this mesh): then this box was deposed and
/// stands down from Redis (it keeps trying the fenced write at each refresh, which
/// never overwrites, and leads above the record once that leader's heartbeat stops).
fn on_refused(
    room: &mut Room,
    me: &str,
    r: crate::mirror::Refusal,
    deposed: &mut Option<(String, u64)>,
) {
    if !room.leading() || r.epoch != room.epoch() {
        return; // a report about an epoch this node no longer holds
    }
    let other = r.held_leader.clone().unwrap_or_default();
    if r.held_by_live_other(me) && !room.peer_ids().contains(&other) {
        if deposed.as_ref() != Some(&(other.clone(), r.held_epoch)) {
            tracing::warn!(leader = %other, epoch = r.held_epoch, seen_ms_ago = r.held_seen_age_ms,
                "deposed: Redis shows leader {other} at epoch {}; this box stops writing the room's record", r.held_epoch);
            *deposed = Some((other, r.held_epoch));
        }
        return;
    }
    *deposed = None;
    let to = r.held_epoch.max(r.epoch) + 1;
    if room.outbid_epoch(to) {
        tracing::info!(held_epoch = r.held_epoch, held_leader = %other, epoch = to,
            "Redis held a newer record of the room (no live leader behind it): leading at a higher epoch");
    }
}

/// The leader Redis named when it deposed us has joined this mesh (a whole room came
/// back: each box alone first, then together): it is one of ours, not a leader
/// elsewhere, so lead above its epoch now rather than at the mirror's next refresh.
fn holder_joined(room: &mut Room, deposed: &mut Option<(String, u64)>) {
    let Some((other, held)) = deposed.as_ref() else {
        return;
    };
    if !room.peer_ids().contains(other) || room.joining() {
        return; // (joining: that session's leader speaks for the room)
    }
    let (other, held) = (other.clone(), *held);
    *deposed = None;
    if room.leading() && room.outbid_epoch(held + 1) {
        tracing::info!(held_leader = %other, epoch = held + 1,
            "the leader Redis showed has joined this mesh: leading above its epoch");
    }
}

/// Keep the mirror's latest record current: the leader's session, or nothing.
fn update_mirror(
    tx: &tokio::sync::watch::Sender<Option<crate::mirror::MirrorRecord>>,
    room_name: &str,
    room: &Room,
    _now: i64,
) {
    // The leader of the room's session; a leader about to join another session (two
    // boxes of one room that just met) leaves Redis to that session's leader.
    let want = room.leading().then(|| {
        let seg = *room.timeline().last();
        (
            room.epoch(),
            room.version(),
            seg.tempo.mbpm(),
            seg.meter.get(),
            seg.playing,
            room.pinned().map(str::to_string),
            room.peer_ids().len() as u32 + 1,
            room.song()
                .and_then(|i| room.setlist().get(i as usize))
                .map(|s| s.title.clone()),
        )
    });
    let current = tx.borrow().as_ref().map(|r| {
        (
            r.epoch,
            r.version,
            r.tempo_mbpm,
            r.meter,
            r.playing,
            r.pinned.clone(),
            r.boxes,
            r.song.clone(),
        )
    });
    if want == current {
        return;
    }
    let rec = want.map(
        |(epoch, version, tempo_mbpm, meter, playing, pinned, boxes, song)| {
            crate::mirror::MirrorRecord {
                room: room_name.to_string(),
                epoch,
                version,
                leader: room.leader().to_string(),
                tempo_mbpm,
                meter,
                playing,
                pinned,
                song,
                boxes,
                updated_unix_ms: crate::mirror::now_unix_ms(),
            }
        },
    );
    tx.send_replace(rec);
}

/// Answer the stage tech's CLI.
fn answer(room: &mut Room, q: Query, now: i64, actions: &mut Vec<Action>) -> Reply {
    match q {
        Query::Status => match serde_json::to_string(&crate::core::room::Status {
            // the CLI proved the room key: it may see the PIN
            control_pin: room.control_pin().map(str::to_string),
            ..room.status(now)
        }) {
            Ok(j) => Reply::Status(j),
            Err(e) => Reply::Error(format!("cannot encode status: {e}")),
        },
        Query::Change { kind, quantum } => match room.request_change(kind, quantum, now, actions) {
            Ok(Some(at)) => Reply::Done(format!("{} at beat {}", describe(kind), at.beat)),
            Ok(None) => Reply::Done(format!("{}: sent to the leader ({}); it lands on the next {}", describe(kind), room.leader(), if quantum == Some(crate::core::timeline::Quantum::Beat) { "beat" } else { "bar" })),
            Err(e) => Reply::Error(e.to_string()),
        },
        Query::Pin(who) => match room.resolve(&who) {
            Some(id) => {
                room.request_pin(Some(id.clone()), now, actions);
                Reply::Done(format!("pinned {id}: it leads while it is alive"))
            }
            None => Reply::Error(format!("unknown node {who:?}: no node of this room has that id or name (see `bandsync peers`)")),
        },
        Query::Unpin => {
            room.request_pin(None, now, actions);
            Reply::Done("unpinned: the highest-ranked box leads".into())
        }
        Query::SetlistLoad(songs) => {
            let n = songs.len();
            match room.load_setlist(songs, now, actions) {
                Ok(()) => Reply::Done(format!("setlist loaded: {n} songs (choose one with `bandsync song N`)")),
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Query::Setlist { from } => Reply::Status(setlist_json(room, from as usize)),
        Query::Song(pick) => match room.choose_song(pick, now, actions) {
            Ok((i, at)) => {
                let s = &room.setlist()[i as usize];
                let what = format!(
                    "song {} {:?} ({} BPM, {}/4{})",
                    i + 1,
                    s.title,
                    s.tempo,
                    s.meter.get(),
                    if s.count_in_bars > 0 { format!(", count-in {} bars", s.count_in_bars) } else { String::new() }
                );
                match at {
                    Some(at) => Reply::Done(format!("{what} from beat {} (a bar boundary)", at.beat)),
                    None => Reply::Done(format!("{what}: sent to the leader ({}); it lands on the next bar", room.leader())),
                }
            }
            Err(e) => Reply::Error(e.to_string()),
        },
        Query::CuePost { text, author } => match room.post_cue(text, author, now, actions) {
            Ok(c) if c.seq != 0 => Reply::Done(format!("cue {} posted", c.seq)),
            Ok(_) => Reply::Done(format!("cue posted; the leader ({}) numbers it (see `bandsync cues`)", room.leader())),
            Err(e) => Reply::Error(e.to_string()),
        },
        Query::CueEdit { seq, text } => match room.edit_cue(seq, Some(text), now, actions) {
            Ok(_) => Reply::Done(format!("cue {seq} edited")),
            Err(e) => Reply::Error(e.to_string()),
        },
        Query::CueDelete { seq } => match room.edit_cue(seq, None, now, actions) {
            Ok(_) => Reply::Done(format!("cue {seq} deleted")),
            Err(e) => Reply::Error(e.to_string()),
        },
        Query::Cues { after } => Reply::Status(cues_json(room, after)),
        Query::CueAck { seq } => match room.ack_cue(seq) {
            Ok(()) => Reply::Done(format!("cue {seq} seen")),
            Err(e) => Reply::Error(e.to_string()),
        },
    }
}

/// A reply is one frame: pages of at most this many bytes of JSON.
const PAGE_BYTES: usize = 12 * 1024;

/// `{"count","current"(1-based|null),"songs":[{index,title,tempo,meter,count_in_bars}],"next"}`
/// from 0-based song `from`; `next` is where the next page starts (null: done).
fn setlist_json(room: &Room, from: usize) -> String {
    let list = room.setlist();
    let mut songs = Vec::new();
    let mut bytes = 0;
    let mut next = None;
    for (i, s) in list.iter().enumerate().skip(from) {
        let v = serde_json::json!({
            "index": i + 1, "title": s.title, "tempo": s.tempo.bpm(),
            "meter": s.meter.get(), "count_in_bars": s.count_in_bars,
        });
        bytes += v.to_string().len() + 1;
        if bytes > PAGE_BYTES {
            next = Some(i);
            break;
        }
        songs.push(v);
    }
    serde_json::json!({
        "count": list.len(),
        "current": room.song().map(|i| i + 1),
        "songs": songs,
        "next": next,
    })
    .to_string()
}

/// `{"cues":[{seq,id,text,author,posted_unix_ms,edited_unix_ms,deleted,seen}],"next_after"}`:
/// numbered cues with seq > `after` in order, then (on the last page) those the leader
/// has not numbered yet (seq 0); `next_after` continues (null: done).
fn cues_json(room: &Room, after: u64) -> String {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut next_after = None;
    let mut last = after;
    for c in room.cues().ordered() {
        if c.seq != 0 && c.seq <= after {
            continue;
        }
        let v = c.view();
        bytes += serde_json::to_string(&v).map(|j| j.len()).unwrap_or(0) + 1;
        if bytes > PAGE_BYTES && !out.is_empty() {
            next_after = Some(last);
            break;
        }
        if c.seq != 0 {
            last = c.seq;
        }
        out.push(v);
    }
    serde_json::json!({"cues": out, "next_after": next_after}).to_string()
}

fn describe(k: crate::core::timeline::ChangeKind) -> String {
    use crate::core::timeline::ChangeKind::*;
    match k {
        Tempo(t) => format!("tempo {t} BPM"),
        Meter(m) => format!("meter {}", m.get()),
        Start => "start".into(),
        Stop => "stop".into(),
    }
}
