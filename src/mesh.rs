//! The room's network driver: the QUIC endpoint, room-key authentication, one task
//! per connection, clock pings, and the task that owns the [`Room`] core.
//!
//! Every node connects to every node of its room (the lower id dials; mDNS tells it
//! where). On a new connection each side sends [`Hello`] with its room-key proof and
//! accepts nothing else until the other's proof checks out; a peer that fails is closed
//! with a reason, logged and counted, after bounded work (one frame of at most
//! [`wire::MAX_FRAME`] bytes within [`AUTH_TIMEOUT`]).

use crate::audio::snapshot::{AudioSnapshot, SnapshotCell};
use crate::auth::{self, RoomKey};
use crate::clock::{Clock, NodeClock};
use crate::discovery::{self, Discovery, DiscoveryConfig, PeerEvent};
use crate::impair::Impairment;
use crate::room::{Action, Note, Room, Status};
use crate::sync::Sample;
use crate::wire::{self, Datagram, Frame, Hello, Query, Reply};
use anyhow::Context;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub const AUTH_TIMEOUT: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(50);
/// Close codes.
const CLOSE_AUTH: u32 = 0x10;
const CLOSE_ROOM: u32 = 0x11;
const CLOSE_DUP: u32 = 0x12;
const CLOSE_BYE: u32 = 0x13;

/// Counters for `/metrics` and logs.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub auth_failures: AtomicU64,
    pub bad_frames: AtomicU64,
    pub bad_datagrams: AtomicU64,
    pub rejected_samples: AtomicU64,
    pub connections: AtomicU64,
    pub refused_other_room: AtomicU64,
}

pub struct MeshConfig {
    /// The HTTP port phones use (advertised as `_http._tcp`, shown by `status`).
    pub http_port: Option<u16>,
    /// systemd's notify socket (READY, WATCHDOG, STATUS), when run as a service.
    pub notify: Option<crate::notify::Notifier>,
    /// The audio thread's counters: the watchdog is only fed while the click runs.
    pub audio: Arc<crate::audio::AudioStats>,
    /// The Redis mirror's input (only the leader writes; followers send `None`).
    pub mirror: Option<tokio::sync::watch::Sender<Option<crate::mirror::MirrorRecord>>>,
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

/// A handle other tasks (HTTP, CLI connections) use to ask the room task.
#[derive(Clone)]
pub struct RoomHandle(mpsc::Sender<Event>);

impl RoomHandle {
    pub async fn query(&self, q: Query) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.0.send(Event::Query { q, reply: tx }).await.is_err() {
            return Reply::Error("the node is shutting down".into());
        }
        rx.await
            .unwrap_or_else(|_| Reply::Error("the node is shutting down".into()))
    }

    pub async fn status(&self) -> Option<crate::room::Status> {
        match self.query(Query::Status).await {
            Reply::Status(j) => serde_json::from_str(&j).ok(),
            _ => None,
        }
    }
}

/// The room task's inbox; create it before `run` so HTTP can hold a handle.
pub struct Inbox(mpsc::Receiver<Event>, mpsc::Sender<Event>);

pub fn channel() -> (RoomHandle, Inbox) {
    let (tx, rx) = mpsc::channel(1024);
    (RoomHandle(tx.clone()), Inbox(rx, tx))
}

pub enum Event {
    Query {
        q: Query,
        reply: tokio::sync::oneshot::Sender<Reply>,
    },
    Up {
        id: String,
        name: String,
        conn: quinn::Connection,
        tx: mpsc::Sender<Frame>,
    },
    Down {
        id: String,
        stable: usize,
    },
    Frame {
        from: String,
        frame: Frame,
    },
    Pong {
        from: String,
        sample: Sample,
        map: crate::clock::SessionMap,
    },
}

struct Shared {
    published: tokio::sync::watch::Sender<u64>,
    cfg: MeshConfig,
    clock: NodeClock,
    cell: Arc<SnapshotCell>,
    stats: Arc<MeshStats>,
    room_hash: String,
    events: mpsc::Sender<Event>,
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
    auth::install_crypto();
    let (cert, key) = auth::load_identity(&cfg.state_dir)?;
    let server = auth::server_config(cert, key)?;
    let socket = std::net::UdpSocket::bind(cfg.quic)
        .with_context(|| format!("cannot bind QUIC to {}", cfg.quic))?;
    let local = socket.local_addr()?;
    let mut endpoint = crate::impair::make_endpoint(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        cfg.impair,
    )
    .context("creating the QUIC endpoint")?;
    endpoint.set_default_client_config(auth::client_config()?);
    tracing::info!(addr = %local, impaired = cfg.impair.is_some(), "QUIC endpoint listening");

    let (disc, mut found) = Discovery::start(DiscoveryConfig {
        node_id: cfg.node_id.clone(),
        name: cfg.name.clone(),
        room: cfg.room.clone(),
        quic_port: local.port(),
        interfaces: cfg.interfaces.clone(),
        advertise: true,
        http_port: cfg.http_port,
    })
    .context("starting mDNS discovery")?;

    let Inbox(mut erx, etx) = inbox;
    let room_hash = discovery::room_hash(&cfg.room);
    let shared = Arc::new(Shared {
        published,
        cfg,
        clock,
        cell: cell.clone(),
        stats,
        room_hash,
        events: etx,
    });

    // Accept loop.
    let acceptor = {
        let shared = shared.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let addr = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => serve(shared, conn, false, None).await,
                        Err(e) => tracing::debug!(%addr, error = %e, "incoming connection failed"),
                    }
                });
            }
        })
    };

    let mut peers: HashMap<String, (quinn::Connection, mpsc::Sender<Frame>)> = HashMap::new();
    let mut dialing: HashSet<String> = HashSet::new();
    let mut known: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut redial = tokio::time::interval(Duration::from_secs(1));
    let mut last_status = 0i64;
    let mut status_written = None;
    let (dial_done_tx, mut dial_done) = mpsc::channel::<String>(64);
    let mut actions = Vec::new();
    let mut ready = false;
    let watchdog_every = crate::notify::Notifier::watchdog_interval();
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
            Some(ev) = found.recv() => match ev {
                PeerEvent::Found(p) => {
                    tracing::debug!(peer = %p.node_id, name = %p.name, addrs = ?p.addrs, "discovered");
                    known.insert(p.node_id.clone(), p.addrs.clone());
                }
                PeerEvent::Lost { node_id } => {
                    tracing::debug!(peer = %node_id, "mDNS lost");
                    known.remove(&node_id);
                }
            },
            Some(id) = dial_done.recv() => { dialing.remove(&id); }
            _ = redial.tick() => {}
            Some(ev) = erx.recv() => {
                let now = shared.clock.now_ns();
                match ev {
                    Event::Up { id, name, conn, tx } => {
                        if let Some((old, _)) = peers.get(&id) {
                            if old.close_reason().is_none() {
                                conn.close(CLOSE_DUP.into(), b"duplicate connection");
                                continue;
                            }
                        }
                        tracing::info!(peer = %id, %name, addr = %conn.remote_address(), "peer joined the mesh");
                        shared.stats.connections.fetch_add(1, Relaxed);
                        if peers.insert(id.clone(), (conn, tx)).is_some() {
                            // a new connection replaces a dead one (the peer may have
                            // rebooted): start its clock estimate afresh
                            room.peer_down(&id);
                        }
                        room.peer_up(&id, &name);
                    }
                    Event::Down { id, stable } => {
                        if peers.get(&id).is_some_and(|(c, _)| c.stable_id() == stable) {
                            peers.remove(&id);
                            room.peer_down(&id);
                            tracing::info!(peer = %id, "peer left the mesh");
                        }
                    }
                    Event::Frame { from, frame } => match frame {
                        Frame::Announce(a) => room.on_announce(&from, a, now, &mut actions),
                        Frame::Pin(id) => room.on_pin(&from, id, &mut actions),
                        Frame::Query(_) | Frame::Reply(_) => {
                            shared.stats.bad_frames.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %from, "CLI frame from a peer; ignored");
                        }
                        Frame::Change(req) => room.on_change(&from, req, now, &mut actions),
                        Frame::Hello(_) => {
                            shared.stats.bad_frames.fetch_add(1, Relaxed);
                            tracing::warn!(peer = %from, "unexpected second Hello; ignored");
                        }
                        Frame::Bye(reason) => tracing::info!(peer = %from, %reason, "peer says goodbye"),
                    },
                    Event::Query { q, reply } => {
                        let r = match answer(&mut room, q, now, &mut actions) {
                            Reply::Status(j) => match serde_json::from_str::<crate::room::Status>(&j) {
                                Ok(mut st) => {
                                    st.phone_url = phone_url(&shared);
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
                        if let Some(crate::sync::SampleVerdict::Rejected(_)) = verdict {
                            shared.stats.rejected_samples.fetch_add(1, Relaxed);
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
                                matches!(verdict, Some(crate::sync::SampleVerdict::Accepted))
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
                service_manager(&shared, &room, now, &mut ready, watchdog_every, &mut last_watchdog, &mut last_callbacks, &mut last_notify_status);
                // dial peers we know and are not connected to (the lower id dials)
                for (id, addrs) in &known {
                    if *id > shared.cfg.node_id && !peers.contains_key(id) && !dialing.contains(id) {
                        if let Some(addr) = pick_addr(addrs, shared.cfg.quic) {
                            dialing.insert(id.clone());
                            let shared = shared.clone();
                            let endpoint = endpoint.clone();
                            let id = id.clone();
                            let done = dial_done_tx.clone();
                            tokio::spawn(async move {
                                match endpoint.connect(addr, "bandsync") {
                                    Ok(connecting) => match tokio::time::timeout(AUTH_TIMEOUT, connecting).await {
                                        Ok(Ok(conn)) => serve(shared, conn, true, Some(id.clone())).await,
                                        Ok(Err(e)) => tracing::debug!(peer = %id, %addr, error = %e, "connect failed"),
                                        Err(_) => tracing::debug!(peer = %id, %addr, "connect timed out"),
                                    },
                                    Err(e) => tracing::warn!(peer = %id, %addr, error = %e, "cannot connect"),
                                }
                                // back off before dialing this peer again
                                tokio::time::sleep(Duration::from_millis(1000)).await;
                                let _ = done.send(id).await;
                            });
                        }
                    }
                }
                if let Some(tx) = &shared.cfg.mirror {
                    update_mirror(tx, &shared.cfg.room, &room, now);
                }
                if now - last_status >= 500_000_000 {
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
    // Orderly goodbye.
    for (conn, tx) in peers.values() {
        let _ = tx.try_send(Frame::Bye("shutting down".into()));
        conn.close(CLOSE_BYE.into(), b"shutting down");
    }
    disc.shutdown();
    acceptor.abort();
    endpoint.close(CLOSE_BYE.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_millis(300), endpoint.wait_idle()).await;
    Ok(())
}

/// Prefer an address of the same family as our bind address.
fn pick_addr(addrs: &[SocketAddr], bind: SocketAddr) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4() == bind.is_ipv4())
        .or(addrs.first())
        .copied()
}

fn carry_out(
    shared: &Shared,
    room: &mut Room,
    peers: &HashMap<String, (quinn::Connection, mpsc::Sender<Frame>)>,
    actions: &mut Vec<Action>,
) {
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
                gen,
            } => {
                let mut s: AudioSnapshot = shared.cell.read();
                s.timeline = timeline;
                s.map = map;
                s.epoch = epoch;
                s.gen = gen;
                shared.cell.write(&s);
                shared.published.send_modify(|v| *v += 1);
            }
            Action::Persist(p) => {
                let path = shared.cfg.state_dir.join("session.json");
                if let Ok(json) = serde_json::to_vec_pretty(&p) {
                    // Atomic and fsynced, on the blocking pool: never on the clock loop.
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = crate::state::write_atomic(&path, &json) {
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
    let _ = room;
}

fn phone_url(shared: &Shared) -> Option<String> {
    shared.cfg.http_port.map(|p| {
        format!(
            "http://{}.local:{p}/",
            crate::discovery::dns_label(&shared.cfg.name)
        )
    })
}

/// Rewrite `status.json` when anything but the clock (`session_ns`, `beat`) changed
/// since the last write, and at least every 5 s: an idle box alone mostly writes nothing.
fn write_status(shared: &Shared, room: &Room, now: i64, last: &mut Option<(Status, i64)>) {
    let mut st = room.status(now);
    st.phone_url = phone_url(shared);
    let mut still = st.clone();
    (still.session_ns, still.beat) = (0, 0.0);
    if last
        .as_ref()
        .is_some_and(|(s, at)| *s == still && now - at < 5_000_000_000)
    {
        return;
    }
    let Ok(json) = serde_json::to_vec_pretty(&st) else {
        return;
    };
    let p = shared.cfg.state_dir.join("status.json");
    let tmp = shared.cfg.state_dir.join(".status.json.tmp");
    // Not fsynced: it is a view, rebuilt every half second.
    if std::fs::write(&tmp, &json)
        .and_then(|_| std::fs::rename(&tmp, &p))
        .is_err()
    {
        tracing::debug!(path = %p.display(), "cannot write status file");
        return;
    }
    *last = Some((still, now));
}

/// systemd: READY=1 once the endpoint is bound and the click runs, WATCHDOG=1 from this
/// loop while the audio callbacks advance, STATUS= with role and tempo.
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

/// Keep the mirror's latest record current: the leader's session, or nothing.
fn update_mirror(
    tx: &tokio::sync::watch::Sender<Option<crate::mirror::MirrorRecord>>,
    room_name: &str,
    room: &Room,
    _now: i64,
) {
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
        )
    });
    if want == current {
        return;
    }
    let rec = want.map(
        |(epoch, version, tempo_mbpm, meter, playing, pinned, boxes)| crate::mirror::MirrorRecord {
            room: room_name.to_string(),
            epoch,
            version,
            leader: room.leader().to_string(),
            tempo_mbpm,
            meter,
            playing,
            pinned,
            boxes,
            updated_unix_ms: crate::mirror::now_unix_ms(),
        },
    );
    tx.send_replace(rec);
}

/// Answer the stage tech's CLI.
fn answer(room: &mut Room, q: Query, now: i64, actions: &mut Vec<Action>) -> Reply {
    match q {
        Query::Status => match serde_json::to_string(&room.status(now)) {
            Ok(j) => Reply::Status(j),
            Err(e) => Reply::Error(format!("cannot encode status: {e}")),
        },
        Query::Change { kind, quantum } => match room.request_change(kind, quantum, now, actions) {
            Ok(Some(at)) => Reply::Done(format!("{} at beat {}", describe(kind), at.beat)),
            Ok(None) => Reply::Done(format!("{}: sent to the leader ({}); it lands on the next {}", describe(kind), room.leader(), if quantum == Some(crate::timeline::Quantum::Beat) { "beat" } else { "bar" })),
            Err(e) => Reply::Error(e.to_string()),
        },
        Query::Pin(who) => match room.resolve(&who) {
            Some(id) => {
                room.request_pin(Some(id.clone()), actions);
                Reply::Done(format!("pinned {id}: it leads while it is alive"))
            }
            None => Reply::Error(format!("unknown node {who:?}: no node of this room has that id or name (see `bandsync peers`)")),
        },
        Query::Unpin => {
            room.request_pin(None, actions);
            Reply::Done("unpinned: the highest-ranked box leads".into())
        }
    }
}

fn describe(k: crate::timeline::ChangeKind) -> String {
    use crate::timeline::ChangeKind::*;
    match k {
        Tempo(t) => format!("tempo {t} BPM"),
        Meter(m) => format!("meter {}", m.get()),
        Start => "start".into(),
        Stop => "stop".into(),
    }
}

/// Authenticate a connection, then pump its frames and datagrams until it closes.
async fn serve(shared: Arc<Shared>, conn: quinn::Connection, dialer: bool, expect: Option<String>) {
    let addr = conn.remote_address();
    let (peer, send, recv) = match tokio::time::timeout(
        AUTH_TIMEOUT,
        handshake(&shared, &conn, dialer),
    )
    .await
    {
        Ok(Ok(x)) => x,
        Ok(Err(HandshakeError::Refused(code, why))) => {
            if code == CLOSE_AUTH {
                shared.stats.auth_failures.fetch_add(1, Relaxed);
                tracing::warn!(%addr, reason = %why, "peer failed room-key authentication; connection closed");
            } else if code == CLOSE_ROOM {
                shared.stats.refused_other_room.fetch_add(1, Relaxed);
                tracing::debug!(%addr, reason = %why, "peer of another room; connection closed");
            }
            conn.close(code.into(), why.as_bytes());
            return;
        }
        Ok(Err(HandshakeError::Closed(e))) => {
            match &e {
                quinn::ConnectionError::ApplicationClosed(c) => {
                    tracing::warn!(%addr, reason = %String::from_utf8_lossy(&c.reason), "peer refused us")
                }
                other => {
                    tracing::debug!(%addr, error = %other, "connection closed during handshake")
                }
            }
            return;
        }
        Ok(Err(HandshakeError::Other(e))) => {
            shared.stats.bad_frames.fetch_add(1, Relaxed);
            tracing::warn!(%addr, error = %e, "bad handshake; connection closed");
            conn.close(CLOSE_AUTH.into(), b"bad handshake");
            return;
        }
        Err(_) => {
            shared.stats.auth_failures.fetch_add(1, Relaxed);
            tracing::warn!(%addr, "peer did not authenticate in time; connection closed");
            conn.close(CLOSE_AUTH.into(), b"authentication timeout");
            return;
        }
    };
    if let Some(want) = expect.filter(|w| *w != peer.node) {
        tracing::debug!(%addr, expected = %want, got = %peer.node, "a different node answered at this address");
    }
    if peer.cli {
        serve_cli(shared, conn, peer, send, recv).await;
        return;
    }
    let span = tracing::info_span!("peer", id = %peer.node, name = %peer.name);
    let _e = span.enter();
    let id = peer.node.clone();
    let (tx, mut rx) = mpsc::channel::<Frame>(256);
    if shared
        .events
        .send(Event::Up {
            id: id.clone(),
            name: peer.name.clone(),
            conn: conn.clone(),
            tx,
        })
        .await
        .is_err()
    {
        return;
    }

    // Writer: frames from the room task to the peer.
    let writer = {
        let mut send = send;
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if send.write_all(&f.encode()).await.is_err() {
                    break;
                }
            }
        })
    };
    // Pinger.
    let pinger = {
        let conn = conn.clone();
        let clock = shared.clock;
        tokio::spawn(async move {
            let mut seq = 0u32;
            loop {
                let d = Datagram::Ping {
                    seq,
                    t1: clock.now_ns(),
                };
                if conn.send_datagram(d.encode().into()).is_err() && conn.close_reason().is_some() {
                    break;
                }
                seq = seq.wrapping_add(1);
                // 40 Hz: on a Wi-Fi-like path the estimate's accuracy grows with the
                // number of samples (see sync.rs); a ping is ~60 bytes
                let every = 25;
                tokio::time::sleep(Duration::from_millis(every)).await;
            }
        })
    };
    // Datagrams: answer pings, hand pongs to the room.
    let dgrams = {
        let conn = conn.clone();
        let shared = shared.clone();
        let id = id.clone();
        tokio::spawn(async move {
            while let Ok(b) = conn.read_datagram().await {
                let now = shared.clock.now_ns();
                match Datagram::decode(&b) {
                    Ok(Datagram::Ping { seq, t1 }) => {
                        let s = shared.cell.read();
                        let pong = Datagram::Pong {
                            seq,
                            t1,
                            t2: now,
                            t3: shared.clock.now_ns(),
                            map: s.map,
                        };
                        let _ = conn.send_datagram(pong.encode().into());
                    }
                    Ok(Datagram::Pong {
                        t1, t2, t3, map, ..
                    }) => {
                        let _ = shared
                            .events
                            .send(Event::Pong {
                                from: id.clone(),
                                sample: Sample {
                                    t1,
                                    t2,
                                    t3,
                                    t4: now,
                                },
                                map,
                            })
                            .await;
                    }
                    Err(e) => {
                        shared.stats.bad_datagrams.fetch_add(1, Relaxed);
                        tracing::debug!(error = %e, "bad datagram dropped");
                    }
                }
            }
        })
    };
    // Reader: frames from the peer.
    let mut recv = recv;
    loop {
        match wire::read_frame(&mut recv).await {
            Ok(Some(frame)) => {
                if shared
                    .events
                    .send(Event::Frame {
                        from: id.clone(),
                        frame,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(None) => break,
            Err(wire::FrameReadError::Wire(e)) => {
                // A malformed frame: count it, tell, and drop the peer (the stream is
                // no longer in sync).
                shared.stats.bad_frames.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, kind = e.kind(), "malformed frame from peer; closing");
                conn.close(
                    CLOSE_AUTH.into(),
                    format!("malformed frame: {e}").as_bytes(),
                );
                break;
            }
            Err(wire::FrameReadError::Stream(e)) => {
                tracing::debug!(error = %e, "stream ended");
                break;
            }
        }
    }
    pinger.abort();
    dgrams.abort();
    writer.abort();
    let _ = shared
        .events
        .send(Event::Down {
            id,
            stable: conn.stable_id(),
        })
        .await;
}

enum HandshakeError {
    Refused(u32, String),
    Closed(quinn::ConnectionError),
    Other(String),
}

impl From<quinn::ConnectionError> for HandshakeError {
    fn from(e: quinn::ConnectionError) -> Self {
        HandshakeError::Closed(e)
    }
}

async fn handshake(
    shared: &Shared,
    conn: &quinn::Connection,
    dialer: bool,
) -> Result<(Hello, quinn::SendStream, quinn::RecvStream), HandshakeError> {
    let ekm = auth::exporter(conn).map_err(|e| HandshakeError::Other(e.to_string()))?;
    let (mine, theirs) = if dialer { ("c", "s") } else { ("s", "c") };
    let hello = Frame::Hello(Hello {
        node: shared.cfg.node_id.clone(),
        name: shared.cfg.name.clone(),
        room: shared.room_hash.clone(),
        priority: shared.cfg.priority,
        cli: false,
        mac: shared.cfg.key.mac(mine, &ekm, &shared.cfg.node_id),
    });
    let (mut send, mut recv) = if dialer {
        let (mut s, r) = conn.open_bi().await?;
        s.write_all(&hello.encode())
            .await
            .map_err(|e| HandshakeError::Other(e.to_string()))?;
        (s, r)
    } else {
        conn.accept_bi().await?
    };
    let first = match wire::read_frame(&mut recv).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(HandshakeError::Other("stream closed before Hello".into())),
        Err(wire::FrameReadError::Wire(e)) => {
            return Err(HandshakeError::Refused(
                CLOSE_AUTH,
                format!("bad first frame: {e}"),
            ))
        }
        Err(wire::FrameReadError::Stream(e)) => {
            if let Some(r) = conn.close_reason() {
                return Err(HandshakeError::Closed(r));
            }
            return Err(HandshakeError::Other(e));
        }
    };
    let Frame::Hello(h) = first else {
        return Err(HandshakeError::Refused(
            CLOSE_AUTH,
            "first frame was not Hello".into(),
        ));
    };
    if h.room != shared.room_hash {
        return Err(HandshakeError::Refused(CLOSE_ROOM, "different room".into()));
    }
    if !shared.cfg.key.verify(theirs, &ekm, &h.node, &h.mac) {
        return Err(HandshakeError::Refused(
            CLOSE_AUTH,
            format!("node {} ({}) does not hold this room's key", h.node, h.name),
        ));
    }
    if h.node == shared.cfg.node_id {
        return Err(HandshakeError::Refused(
            CLOSE_DUP,
            "that is this node".into(),
        ));
    }
    if !dialer {
        send.write_all(&hello.encode())
            .await
            .map_err(|e| HandshakeError::Other(e.to_string()))?;
    }
    Ok((h, send, recv))
}

/// A CLI connection: queries in, replies out. Never a peer of the room.
async fn serve_cli(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    hello: Hello,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    tracing::debug!(cli = %hello.node, addr = %conn.remote_address(), "CLI connected");
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut recv))
            .await
        {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => {
                shared.stats.bad_frames.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "bad frame from CLI");
                let _ = send
                    .write_all(&Frame::Reply(Reply::Error(format!("bad request: {e}"))).encode())
                    .await;
                break;
            }
        };
        let reply = match frame {
            Frame::Query(q) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if shared
                    .events
                    .send(Event::Query { q, reply: tx })
                    .await
                    .is_err()
                {
                    break;
                }
                rx.await
                    .unwrap_or_else(|_| Reply::Error("the node is shutting down".into()))
            }
            other => {
                shared.stats.bad_frames.fetch_add(1, Relaxed);
                Reply::Error(format!(
                    "unexpected frame from a CLI: {}",
                    frame_name(&other)
                ))
            }
        };
        if send.write_all(&Frame::Reply(reply).encode()).await.is_err() {
            break;
        }
    }
    let _ = send.finish();
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Announce(_) => "Announce",
        Frame::Change(_) => "Change",
        Frame::Bye(_) => "Bye",
        Frame::Query(_) => "Query",
        Frame::Reply(_) => "Reply",
        Frame::Pin(_) => "Pin",
    }
}
