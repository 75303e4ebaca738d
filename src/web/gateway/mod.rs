//! The phone gateway: the WebSocket (`GET /ws`) that musicians' phones use to follow
//! the beat, with its limits. The page itself (`GET /`) is [`PAGE`].
//!
//! # Protocol
//!
//! One JSON object per WebSocket text message, with a `"type"` field. Every time is
//! **session time in microseconds** (a JSON number; it may carry a fraction down to the
//! nanosecond). Any client message may carry an `"id"` (an integer or a string of at most
//! 64 characters); the node echoes it in its direct answer (`pong`, `sync_response`,
//! `ack`, `error`, and the `snapshot` that answers `join_session`).
//!
//! ## Client → node
//!
//! | type | fields | answer |
//! |---|---|---|
//! | `join_session` | `name`? (≤ 64 printable chars, for logs) | `snapshot`, then `room_stats`; from now on every change is pushed |
//! | `ping` | `t0` (the client's own clock, any unit; echoed) | `pong` |
//! | `sync_request` | `t0`? | `sync_response` |
//! | `set_tempo` | `bpm` (number, 20–400), `pin`?, `quantum`? | `ack` (then a `snapshot` when the change is scheduled) |
//! | `set_meter` | `meter` (integer, 1–16), `pin`?, `quantum`? | `ack` |
//! | `play` | `pin`?, `quantum`? | `ack` |
//! | `pause` | `pin`?, `quantum`? | `ack` (stops the transport) |
//! | `seek` | `beat` (integer), `pin`? | `error` `not_supported` (see below) |
//! | `heartbeat` | — | nothing (keeps the connection from idling out) |
//! | `set_song` | `index` (1-based integer, or `"next"`/`"prev"`), `pin`? | `ack` (the song's tempo and meter land on the next bar; a `snapshot` follows) |
//! | `post_message` | `text` (1–500 chars), `pin`? | `ack` (then a `message` once the leader numbered it) |
//! | `update_message` | `seq`, `text`, `pin`? | `ack` (then the edited `message`) |
//! | `delete_message` | `seq`, `pin`? | `ack` (then the `message` with `deleted: true`) |
//! | `ack_message` | `seq` | nothing (counted in the cue's `seen`); `error` for an unknown seq |
//!
//! `join_session` may carry `last_seq`: after the `snapshot` and `room_stats`, the node
//! sends every cue (`message`) with a greater seq (all of them without it), in order;
//! from then on each new cue, edit or deletion as it happens. `set_song`,
//! `post_message`, `update_message` and `delete_message` need the control PIN like
//! `set_tempo`.
//! | `rtc_join`, `rtc_offer`, `rtc_answer`, `rtc_ice`, `rtc_leave` | see [`talkback`] | talkback signalling, relayed within the room |
//!
//! Who may change the room ([`Control`], the snapshot's `control`): with a control PIN
//! (`--control-pin`, `"pin"`), `pin` (a string) is required on `set_tempo`,
//! `set_meter`, `play`, `pause` and `seek`; with no PIN, no phone may change anything
//! (`"off"`: `error` `pin_required`, "this room has no control PIN set; control from
//! phones is off") unless the room opted out of the PIN (`control_open`, `"open"`: no
//! `pin` needed, one given is ignored). `quantum` is
//! `"beat"` or `"bar"` (default: the room's, usually the next bar). Changes are never
//! applied "now": the leader schedules them on a quantized beat at least 200 ms ahead,
//! and the `snapshot` that follows carries that beat as a new segment, so every phone
//! and every box switches on the same beat.
//!
//! `seek` is answered with `error` `not_supported`: the room's beat index is continuous
//! (it numbers every click in every box's click log), so it cannot jump. To restart
//! from a bar, `pause` then `play`: `play` lands on the next bar (or beat).
//!
//! ## Node → client
//!
//! Joined phones get a `snapshot` every time the room task publishes a new timeline,
//! session map or epoch (the `changes` watch of [`crate::web::state::HttpState`]), queued for
//! every phone at once from one serialization.
//!
//! * `snapshot` — the whole timeline:
//!   `{"type":"snapshot","segments":[{"t0_us","b0","bpm","mbpm","meter","downbeat","playing"}…],
//!   "epoch","gen","node","name","leader","leader_name","role","boxes","server_time_us",
//!   "pin_required","control","now":{"beat","bpm","meter","playing"}}`; `control` is
//!   `"pin"`, `"open"` or `"off"` (see above), `pin_required` is true unless `"open"`.
//!   Segments are in beat order; the first one also governs every time before its own
//!   `t0_us`, each later one starts at its integer beat `b0` at `t0_us`. For session time
//!   `t` the segment is the last with `t0_us ≤ t`, and
//!   `beat(t) = b0 + (t − t0_us)·bpm/60e6`; beat `n` is at `t0_us + (n − b0)·60e6/bpm` in
//!   the last segment with `b0 ≤ n`, and clicks when that segment is `playing`;
//!   beat `n` starts a bar when `(n − downbeat) mod meter = 0`. (This is
//!   `crate::core::timeline`, in floating point.) `gen` changes when this node's session
//!   clock steps (it joined a room): clock samples taken before are void. `boxes` counts
//!   the live boxes of the room, this one included.
//!   The snapshot also carries `song` (`{"index" (1-based),"title","count","tempo",
//!   "meter","count_in_bars"}` or null) and `setlist` (`[{"index","title","tempo",
//!   "meter","count_in_bars"}…]`); it is pushed again when either changes.
//! * `message` — a cue: `{"type":"message","seq","id","text","author","posted_unix_ms",
//!   "edited_unix_ms","deleted"}`. `id` is the cue's identity: after a healed partition
//!   the room may renumber a cue (see `core::cues`), and the page replaces it by `id`.
//! * `pong` — `{"type":"pong","t0","t1","t2","gen"}`: `t0` echoed, `t1` the node's
//!   session time when the ping arrived, `t2` just before the pong left. With `t3` the
//!   client's receive time: `rtt = (t3 − t0) − (t2 − t1)`,
//!   `offset = ((t1 − t0) + (t2 − t3)) / 2` (session − client); trust the lowest-RTT
//!   samples.
//! * `sync_response` — `{"type":"sync_response","t0"?,"t1","t2","gen","snapshot":{…}}`.
//! * `room_stats` — `{"type":"room_stats","node","name","role","leader","leader_name",
//!   "epoch","boxes","phones","synced","peers":[{"id","name","role","alive","rtt_us","offset_us"}]}`;
//!   after `join_session`, when the room changes, and every 10 s.
//! * `ack` — `{"type":"ack","request","message","id"?}`: the change was accepted
//!   (scheduled by the leader, or relayed to it); the `snapshot` carrying it follows
//!   (or came just before).
//! * `error` — `{"type":"error","code","reason","field"?,"request"?,"id"?}`; `code` is one of
//!   `bad_json` (not JSON), `bad_message` (not an object, no `type` (field `type`),
//!   binary, or invalid UTF-8 (then closed `1007`)), `unknown_type` (field `type`), `unknown_field` (field: its name),
//!   `bad_field` (a value of the wrong type or out of range; field: its name),
//!   `too_large` (the connection is then closed), `pin_required`, `bad_pin` (field
//!   `pin`; with `retry_after_s` when this wrong PIN locked the address out),
//!   `locked_out` (field `pin`, `retry_after_s`: too many wrong PINs from this address,
//!   the PIN was not checked; or too many on the whole box), `not_supported`, `busy`
//!   (too many changes in flight, or the room did not answer in time) and `refused`
//!   (the room refused the change; reason says why).
//!   An `error` never changes anything and never closes the connection, except where
//!   said.
//! * `rate_limit_exceeded` — `{"type":"rate_limit_exceeded","reason","retry_after_ms",
//!   "per_second","burst"}`: the message was dropped (at most one notice per second).
//!
//! ## Limits ([`GatewayLimits`])
//!
//! * **Who**: `GET /ws` is refused (403) unless its `Host` is one of the box's names or
//!   addresses and its `Origin`, if any, names one of them (see [`crate::web::http`]).
//! * **Connections**: at most `max_connections` (2000, lowered to fit `RLIMIT_NOFILE`);
//!   beyond it `GET /ws` answers
//!   `503 Service Unavailable` with a `Retry-After` header and a plain-text reason.
//! * **Message size**: `max_message_bytes` (4096) per message: `error` `too_large`,
//!   then close `1009`. The WebSocket layer itself stops reading at 16× that (at least
//!   64 KiB), so no message costs more than that to refuse.
//! * **Rate**: a token bucket per connection, `per_second` (20) messages per second with
//!   a `burst` (40); WebSocket pings count too. A message over the limit is dropped with
//!   `rate_limit_exceeded`. Each dropped message adds one to an abuse score that decays
//!   by one per second; past `abuse_after` (50) the connection is closed (`1008`).
//! * **Bad PINs** (`pins`, see [`PinLimits`]): per source address (IPv6: per /64), 3
//!   wrong PINs are free, then each locks the address out for 1 s, 2 s, 4 s, … up to
//!   5 min, across connections; a locked-out address gets `locked_out` and its PIN is
//!   not compared. Beyond 10 wrong PINs per second on the whole box, every further
//!   wrong PIN locks its address out at once. A right PIN from an address that is not
//!   locked out always works at once (it is compared first, in constant time). The
//!   table holds at most 4096 addresses. A connection is closed (`1008`) after
//!   `max_bad_pins` (5) wrong or refused PINs.
//! * **Slow clients**: every joined client has a queue of `send_queue` (32) messages.
//!   Broadcasts `try_send` into it and never wait: a client whose queue is full is
//!   dropped (closed `1013`), as is one whose socket takes longer than `send_timeout`
//!   (5 s) to take a message. The node never waits for a phone.
//! * **Idle**: a connection with no message for `idle_timeout` (90 s) is closed (`1000`);
//!   the page pings every second.
//! * **Changes**: at most `max_control_in_flight` (8) change requests wait on the room
//!   at once (one per connection); more get `error` `busy`.
//!
//! Everything is counted in [`GatewayStats`] (shown on `/metrics`, with a histogram of
//! the time from a broadcast to its message being written into each phone's socket).
//!
//! # The page
//!
//! [`PAGE`] (`src/phone/index.html`, one file, no external resource) connects to
//! `/ws`, joins, pings 10 times at 150 ms, then every 500 ms for the next 90 pings,
//! then every second. Each pong bounds the offset θ (session − page clock) to
//! `[t2 − t3, t1 − t0]`; the page takes the middle of the intersection of the last 16
//! intervals, carried to a common instant with its rate estimate (the slope of such
//! estimates over blocks of the last 160 samples, once they span 15 s). Beat times
//! come from the snapshot's segments as above, so the page, the boxes and the click log
//! share one grid; the page only has to know the session clock. It keeps following
//! the last timeline if the connection drops. `window.bandsync.predictedBeats(n)`
//! returns the next `n` clicks (`times`, session µs; `beats` with index and accent;
//! `local_ms` on the page's `performance.now()` clock, whose origin is
//! `time_origin_ms`), the current `beat`, `bar`, `beat_in_bar`, `bpm`, `meter`,
//! `playing`, and the sync state (`synced`, `now_us`, `offset_us`, `rtt_us`,
//! `uncertainty_us`, `rate_ppm`, `samples`).

use crate::audio::snapshot::{AudioSnapshot, SnapshotCell};
use crate::core::timeline::{ChangeKind, Meter, Quantum, Tempo};
use crate::core::wire::{Query, Reply, SongPick};
use crate::net::RoomHandle;
use crate::sys::clock::{Clock, NodeClock};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::time::Instant;

mod limits;
mod pin;
mod protocol;
pub mod talkback;

use limits::hard_cap;
pub use limits::{GatewayLimits, GatewayStats, Histogram};
use pin::{PinGuard, Verdict};
pub use pin::{PinLimits, PinStats};
pub use protocol::ErrorCode;
use protocol::{bad, bad_field, check_id, check_text, fields_of, integer, number, Bad};

/// The phone page (one self-contained file: no CDN, works offline).
pub const PAGE: &str = include_str!("../phone/index.html");

/// Close codes (RFC 6455).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_BAD_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_TRY_LATER: u16 = 1013;

/// How long a change request may wait for the room.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the room's status is refreshed for `room_stats` (while phones are joined).
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// `room_stats` is pushed at least this often.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// What the room's status says, cached for snapshots and `room_stats`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Meta {
    fetched: bool,
    node: String,
    name: String,
    role: String,
    leader: String,
    leader_name: String,
    epoch: u64,
    boxes: usize,
    synced: bool,
    peers: Vec<PeerOut>,
    /// Link apps following the room through this box (None: Link is off).
    link_apps: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
struct PeerOut {
    id: String,
    name: String,
    role: String,
    alive: bool,
    rtt_us: Option<i64>,
    offset_us: Option<i64>,
}

impl Meta {
    fn from_status(s: crate::core::room::Status) -> Meta {
        let leader_name = if s.leader == s.node {
            s.name.clone()
        } else {
            s.peers
                .iter()
                .find(|p| p.id == s.leader)
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        Meta {
            fetched: true,
            link_apps: s.link.enabled.then_some(s.link.peers),
            boxes: 1 + s.peers.iter().filter(|p| p.alive).count(),
            peers: s
                .peers
                .iter()
                .map(|p| PeerOut {
                    id: p.id.clone(),
                    name: p.name.clone(),
                    role: p.role.to_string(),
                    alive: p.alive,
                    rtt_us: p.rtt_us,
                    offset_us: p.offset_us,
                })
                .collect(),
            node: s.node,
            name: s.name,
            role: s.role.to_string(),
            leader: s.leader,
            leader_name,
            epoch: s.epoch,
            synced: s.synced,
        }
    }
    /// The parts whose change is worth telling phones about at once.
    fn headline(&self) -> (String, String, u64, usize) {
        (
            self.role.clone(),
            self.leader.clone(),
            self.epoch,
            self.boxes,
        )
    }
}

/// Why a client is being closed from outside its task.
const KICK_SLOW: u8 = 1;
const KICK_SHUTDOWN: u8 = 2;

/// A message queued for one phone; broadcasts carry when they were sent, for the
/// delivery histogram.
struct Out(Message, Option<std::time::Instant>);

struct Client {
    tx: mpsc::Sender<Out>,
    kick: Arc<Kick>,
}

#[derive(Default)]
struct Kick {
    why: AtomicU8,
    notify: Notify,
}

impl Kick {
    fn kick(&self, why: u8) {
        self.why.store(why, Relaxed);
        self.notify.notify_one();
    }
}

/// Who may change the room from a phone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Whoever has the PIN.
    Pin(String),
    /// Anyone (the room opted out of the PIN: `control_open`).
    Open,
    /// No one: the room has no PIN and did not opt out.
    Off,
}

impl Control {
    /// From the PIN (empty: none) and the `control_open` opt-out.
    pub fn from(pin: Option<&str>, open: bool) -> Control {
        match pin.filter(|p| !p.is_empty()) {
            Some(p) => Control::Pin(p.to_string()),
            None if open => Control::Open,
            None => Control::Off,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Control::Pin(_) => "pin",
            Control::Open => "open",
            Control::Off => "off",
        }
    }
}

impl Inner {
    fn control(&self) -> Control {
        self.control
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why control is off, as phones are told.
const CONTROL_OFF: &str = "this room has no control PIN set; control from phones is off";

struct Inner {
    cell: Arc<SnapshotCell>,
    clock: NodeClock,
    changes: tokio::sync::watch::Receiver<u64>,
    room: RoomHandle,
    board: Arc<crate::net::handle::Board>,
    control: std::sync::RwLock<Control>,
    pins: PinGuard,
    log: crate::web::guard::RateLog,
    limits: GatewayLimits,
    stats: Arc<GatewayStats>,
    clients: Mutex<HashMap<u64, Client>>,
    next_id: AtomicU64,
    open: AtomicUsize,
    meta: Mutex<Meta>,
    in_flight: Arc<Semaphore>,
    publisher: Once,
    /// Talkback signalling ([`talkback`]).
    talk: Arc<talkback::Hub>,
}

/// The gateway shared by every connection (cheap to clone).
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

impl Gateway {
    /// Build from the HTTP state (see [`crate::web::state::HttpState`]).
    pub fn new(st: &crate::web::state::HttpState) -> Gateway {
        let limits = st.limits.clone();
        let talk = talkback::Hub::new(st.room.clone());
        if tokio::runtime::Handle::try_current().is_ok() {
            talkback::Hub::start(&talk);
        }
        Gateway(Arc::new(Inner {
            talk,
            cell: st.cell.clone(),
            clock: st.clock,
            changes: st.changes.clone(),
            room: st.room.clone(),
            board: st.board.clone(),
            control: std::sync::RwLock::new(Control::from(
                st.control_pin.as_deref(),
                st.control_open,
            )),
            pins: PinGuard::new(limits.pins.clone()),
            log: crate::web::guard::RateLog::new(Duration::from_secs(10)),
            in_flight: Arc::new(Semaphore::new(limits.max_control_in_flight.max(1))),
            limits,
            stats: st.stats.clone(),
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            meta: Mutex::new(Meta::default()),
            publisher: Once::new(),
        }))
    }

    /// Open WebSockets.
    pub fn open(&self) -> usize {
        self.0.open.load(Relaxed)
    }

    /// Who may change the room (now).
    pub fn control(&self) -> Control {
        self.0.control()
    }

    /// Follow the room's control PIN as it changes (a std lock: no await while held).
    pub fn follow_control(&self, mut updates: tokio::sync::watch::Receiver<Option<String>>) {
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let Some(inner) = weak.upgrade() else { return };
                let pin = updates.borrow_and_update().clone();
                let c = match pin {
                    Some(p) => Control::Pin(p),
                    None => Control::Open,
                };
                *inner.control.write().unwrap_or_else(|e| e.into_inner()) = c;
            }
        });
    }

    /// PIN guessing counters.
    pub fn pin_stats(&self) -> &PinStats {
        &self.0.pins.stats
    }

    /// Sources locked out from PIN guessing now.
    pub fn locked_sources(&self) -> usize {
        self.0.pins.locked_sources()
    }

    /// Talkback's lines for `/metrics`.
    pub fn talkback_metrics(&self) -> String {
        talkback::metrics(&self.0.talk)
    }

    /// Log lines about phones left out by the log rate limit.
    pub fn logs_suppressed(&self) -> u64 {
        self.0.log.suppressed.load(Relaxed)
    }

    fn ensure_publisher(&self) {
        let inner = &self.0;
        inner.publisher.call_once(|| {
            let weak = Arc::downgrade(inner);
            let changes = inner.changes.clone();
            tokio::spawn(publisher(weak, changes));
        });
    }

    /// Take a connection slot, or `None` at the cap.
    fn admit(&self) -> Option<Slot> {
        let max = self.0.limits.max_connections;
        self.0
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        self.0.stats.connections_open.fetch_add(1, Relaxed);
        Some(Slot(self.0.clone()))
    }
}

/// A taken connection slot; freed on drop.
struct Slot(Arc<Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.stats.connections_open.fetch_sub(1, Relaxed);
    }
}

impl Inner {
    fn now(&self) -> (AudioSnapshot, i64) {
        let snap = self.cell.read();
        let t = snap.map.to_session(self.clock.now_ns());
        (snap, t)
    }

    fn session_ns(&self) -> i64 {
        self.cell.read().map.to_session(self.clock.now_ns())
    }

    async fn refresh_meta(&self) -> bool {
        let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(1), self.room.status()).await
        else {
            return false;
        };
        let m = Meta::from_status(s);
        let mut cur = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        let changed = cur.headline() != m.headline();
        *cur = m;
        changed
    }

    fn meta(&self) -> Meta {
        self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn snapshot(&self, id: Option<&Value>) -> Value {
        let (snap, now) = self.now();
        let mut v = snapshot_value(&snap, now, &self.meta(), &self.control(), id);
        let view = self.board.setlist.borrow().clone();
        let song_json = |i: usize, s: &crate::core::cues::Song| {
            serde_json::json!({
                "index": i + 1, "title": s.title, "tempo": s.tempo.bpm(),
                "meter": s.meter.get(), "count_in_bars": s.count_in_bars,
            })
        };
        v["setlist"] = Value::Array(
            view.songs
                .iter()
                .enumerate()
                .map(|(i, s)| song_json(i, s))
                .collect(),
        );
        v["song"] = match view.song.filter(|&i| (i as usize) < view.songs.len()) {
            Some(i) => {
                let mut j = song_json(i as usize, &view.songs[i as usize]);
                j["count"] = Value::from(view.songs.len());
                j
            }
            None => Value::Null,
        };
        v
    }

    fn room_stats(&self) -> Value {
        let m = self.meta();
        serde_json::json!({
            "type": "room_stats",
            "node": m.node, "name": m.name, "role": m.role,
            "leader": m.leader, "leader_name": m.leader_name,
            "epoch": m.epoch, "boxes": m.boxes, "synced": m.synced,
            "phones": self.open.load(Relaxed),
            "peers": m.peers,
            "link": {"enabled": m.link_apps.is_some(), "peers": m.link_apps.unwrap_or(0)},
        })
    }

    /// Queue `msg` for every joined client without waiting; drop those that are full.
    fn broadcast(&self, msg: Message) {
        let t = std::time::Instant::now();
        let mut slow = Vec::new();
        {
            let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            for (id, c) in clients.iter() {
                if let Err(mpsc::error::TrySendError::Full(_)) =
                    c.tx.try_send(Out(msg.clone(), Some(t)))
                {
                    slow.push(*id);
                }
            }
        }
        if !slow.is_empty() {
            let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            for id in slow {
                if let Some(c) = clients.remove(&id) {
                    c.kick.kick(KICK_SLOW);
                }
            }
        }
        self.stats.broadcasts.fetch_add(1, Relaxed);
        self.stats
            .broadcast_last_us
            .store(t.elapsed().as_micros() as u64, Relaxed);
    }

    fn joined(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn to_us(ns: i64) -> f64 {
    ns as f64 / 1000.0
}

#[derive(Serialize)]
struct SegmentOut {
    t0_us: f64,
    b0: i64,
    bpm: f64,
    mbpm: u32,
    meter: u8,
    downbeat: i64,
    playing: bool,
}

fn snapshot_value(
    snap: &AudioSnapshot,
    now: i64,
    m: &Meta,
    control: &Control,
    id: Option<&Value>,
) -> Value {
    let tl = &snap.timeline;
    let segments: Vec<SegmentOut> = tl
        .segments()
        .iter()
        .map(|s| SegmentOut {
            t0_us: to_us(s.t0),
            b0: s.b0,
            bpm: s.tempo.bpm(),
            mbpm: s.tempo.mbpm(),
            meter: s.meter.get(),
            downbeat: s.downbeat,
            playing: s.playing,
        })
        .collect();
    let cur = tl.current(now);
    let mut v = serde_json::json!({
        "type": "snapshot",
        "segments": segments,
        "epoch": snap.epoch,
        "gen": snap.clock_gen,
        "node": m.node, "name": m.name, "role": m.role,
        "leader": m.leader, "leader_name": m.leader_name,
        "boxes": m.boxes.max(1),
        "server_time_us": to_us(now),
        "pin_required": *control != Control::Open,
        "control": control.as_str(),
        "now": {
            "beat": tl.beat_at(now).as_f64(),
            "bpm": cur.tempo.bpm(),
            "meter": cur.meter.get(),
            "playing": cur.playing,
        },
    });
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// Pushes snapshots on every timeline change and `room_stats` when the room changes.
async fn publisher(weak: Weak<Inner>, mut changes: tokio::sync::watch::Receiver<u64>) {
    let (mut setlist, mut cues) = match weak.upgrade() {
        Some(inner) => (
            inner.board.setlist.subscribe(),
            inner.board.cues.subscribe(),
        ),
        None => return,
    };
    setlist.borrow_and_update();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stats = Instant::now();
    changes.borrow_and_update();
    loop {
        tokio::select! {
            r = changes.changed() => {
                let Some(inner) = weak.upgrade() else { return };
                if r.is_err() {
                    // The room task is gone: the node is stopping.
                    let clients: Vec<Client> = inner.clients.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, c)| c).collect();
                    for c in clients {
                        c.kick.kick(KICK_SHUTDOWN);
                    }
                    return;
                }
                changes.borrow_and_update();
                if inner.joined() == 0 {
                    continue;
                }
                // The epoch or leader may have changed with the timeline.
                let headline = inner.refresh_meta().await;
                let msg = Message::Text(inner.snapshot(None).to_string().into());
                inner.broadcast(msg);
                if headline {
                    inner.broadcast(Message::Text(inner.room_stats().to_string().into()));
                    last_stats = Instant::now();
                }
            }
            r = setlist.changed() => {
                if r.is_err() {
                    return;
                }
                setlist.borrow_and_update();
                let Some(inner) = weak.upgrade() else { return };
                if inner.joined() > 0 {
                    inner.broadcast(Message::Text(inner.snapshot(None).to_string().into()));
                }
            }
            r = cues.recv() => {
                let Some(inner) = weak.upgrade() else { return };
                match r {
                    Ok(c) if c.seq != 0 => {
                        inner.broadcast(Message::Text(message_json(&c.view()).to_string().into()));
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "phones: cue broadcasts lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
            _ = tick.tick() => {
                let Some(inner) = weak.upgrade() else { return };
                if inner.joined() == 0 {
                    continue;
                }
                let headline = inner.refresh_meta().await;
                if headline || last_stats.elapsed() >= STATS_EVERY {
                    inner.broadcast(Message::Text(inner.room_stats().to_string().into()));
                    last_stats = Instant::now();
                }
            }
        }
    }
}

/// A cue as phones get it.
fn message_json(c: &crate::core::cues::CueView) -> Value {
    serde_json::json!({
        "type": "message", "seq": c.seq, "id": c.id, "text": c.text, "author": c.author,
        "posted_unix_ms": c.posted_unix_ms, "edited_unix_ms": c.edited_unix_ms,
        "deleted": c.deleted,
    })
}

/// The address a request came from (set by the HTTP server for every connection).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// `GET /ws`.
pub async fn ws_handler(
    State(gw): State<Gateway>,
    peer: Option<axum::Extension<Peer>>,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = peer.map(|p| p.0 .0.ip());
    gw.ensure_publisher();
    let Some(slot) = gw.admit() else {
        gw.0.stats.refused_full.fetch_add(1, Relaxed);
        if let Some(left_out) = gw.0.log.allow("ws_cap") {
            tracing::info!(
                limit = gw.0.limits.max_connections,
                left_out,
                "phone refused: connection cap (one line per 10 s)"
            );
        }
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            format!(
                "this box already serves {} phones; try another box of the room, or later\n",
                gw.0.limits.max_connections
            ),
        )
            .into_response();
    };
    let hard = hard_cap(&gw.0.limits);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .on_upgrade(move |socket| async move {
            gw.0.stats.connections_total.fetch_add(1, Relaxed);
            Conn::new(gw, socket, peer).run().await;
            drop(slot);
        })
}

/// What to do after a message.
enum Next {
    Go,
    Close(u16, &'static str),
}

struct Bucket {
    tokens: f64,
    at: Instant,
    abuse: f64,
    last_notice: Option<Instant>,
}

struct Conn {
    gw: Gateway,
    socket: WebSocket,
    id: u64,
    /// Where it comes from (PIN lockouts are per source).
    peer: Option<IpAddr>,
    tx: mpsc::Sender<Out>,
    rx: mpsc::Receiver<Out>,
    kick: Arc<Kick>,
    joined: bool,
    bucket: Bucket,
    bad_pins: u32,
    control_busy: Arc<AtomicBool>,
    /// The name the phone gave in `join_session` (a cue's author).
    name: Option<String>,
    /// Cues this phone acked (each counts once per connection).
    acked: std::collections::BTreeSet<u64>,
    talk: talkback::ConnTalk,
}

impl Conn {
    fn new(gw: Gateway, socket: WebSocket, peer: Option<IpAddr>) -> Conn {
        let (tx, rx) = mpsc::channel(gw.0.limits.send_queue.max(1));
        let id = gw.0.next_id.fetch_add(1, Relaxed);
        let burst = gw.0.limits.burst.max(1) as f64;
        Conn {
            gw,
            socket,
            id,
            peer,
            tx,
            rx,
            kick: Arc::new(Kick::default()),
            joined: false,
            bucket: Bucket {
                tokens: burst,
                at: Instant::now(),
                abuse: 0.0,
                last_notice: None,
            },
            bad_pins: 0,
            control_busy: Arc::new(AtomicBool::new(false)),
            name: None,
            acked: Default::default(),
            talk: Default::default(),
        }
    }

    fn inner(&self) -> &Inner {
        &self.gw.0
    }

    async fn run(mut self) {
        let idle_for = self.inner().limits.idle_timeout;
        let idle = tokio::time::sleep(idle_for);
        tokio::pin!(idle);
        let kick = self.kick.clone();
        let end = loop {
            tokio::select! {
                biased;
                _ = kick.notify.notified() => {
                    break match kick.why.load(Relaxed) {
                        KICK_SHUTDOWN => Next::Close(CLOSE_GOING_AWAY, "the box is shutting down"),
                        _ => {
                            self.inner().stats.dropped_slow.fetch_add(1, Relaxed);
                            Next::Close(CLOSE_TRY_LATER, "too slow: messages for this phone piled up")
                        }
                    };
                }
                Some(Out(m, at)) = self.rx.recv() => {
                    if !self.send(m).await {
                        break Next::Go;
                    }
                    if let Some(at) = at {
                        self.inner().stats.delivery.observe(at.elapsed());
                    }
                }
                r = self.socket.recv() => {
                    let now = self.inner().session_ns();
                    idle.as_mut().reset(Instant::now() + idle_for);
                    match r {
                        None => break Next::Go,
                        Some(Err(e)) => break self.on_read_error(e).await,
                        Some(Ok(m)) => match self.on_message(m, now).await {
                            Next::Go => {}
                            close => break close,
                        },
                    }
                }
                _ = &mut idle => {
                    self.inner().stats.closed_idle.fetch_add(1, Relaxed);
                    break Next::Close(CLOSE_NORMAL, "idle: no message for too long");
                }
            }
        };
        self.leave();
        if let Next::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            if let Ok(Ok(())) = tokio::time::timeout(
                Duration::from_secs(1),
                self.socket.send(Message::Close(Some(frame))),
            )
            .await
            {
                self.linger().await;
            }
        }
    }

    /// After our close frame: read (and drop) what the phone still sends, for a
    /// bounded time, until it answers the close. Closing a TCP socket with unread data
    /// resets it, and the phone would lose our close frame and its reason.
    async fn linger(&mut self) {
        let until = Instant::now() + Duration::from_secs(1);
        for _ in 0..256 {
            match tokio::time::timeout_at(until, self.socket.recv()).await {
                Ok(Some(Ok(_))) => {}
                _ => return,
            }
        }
    }

    fn leave(&mut self) {
        self.talk_leave();
        if self.joined {
            self.inner()
                .clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id);
            self.joined = false;
        }
    }

    /// Send with the slow-client timeout. `false`: the connection is finished.
    async fn send(&mut self, m: Message) -> bool {
        match tokio::time::timeout(self.inner().limits.send_timeout, self.socket.send(m)).await {
            Ok(Ok(())) => {
                self.inner().stats.messages_out.fetch_add(1, Relaxed);
                true
            }
            Ok(Err(_)) => false,
            Err(_) => {
                self.inner().stats.dropped_slow.fetch_add(1, Relaxed);
                if let Some(left_out) = self.inner().log.allow("slow") {
                    tracing::debug!(
                        conn = self.id,
                        left_out,
                        "phone too slow to take a message; dropped"
                    );
                }
                false
            }
        }
    }

    async fn send_json(&mut self, v: &Value) -> bool {
        self.send(Message::Text(v.to_string().into())).await
    }

    async fn send_error(&mut self, b: Bad, request: Option<&str>, id: Option<&Value>) -> bool {
        self.inner().stats.error(b.code);
        let mut v =
            serde_json::json!({"type": "error", "code": b.code.as_str(), "reason": b.reason});
        if let Some(f) = b.field {
            v["field"] = Value::String(f);
        }
        if let Some(s) = b.retry_after_s {
            v["retry_after_s"] = Value::from(s);
        }
        if let Some(r) = request {
            v["request"] = Value::String(r.to_string());
        }
        if let Some(id) = id {
            v["id"] = id.clone();
        }
        self.send_json(&v).await
    }

    async fn on_read_error(&mut self, e: axum::Error) -> Next {
        let text = format!("{e}");
        let src = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        let all = format!("{text} {src}");
        if all.contains("Space limit exceeded")
            || all.contains("too long")
            || all.contains("too big")
        {
            let max = self.inner().limits.max_message_bytes;
            let b = bad(
                ErrorCode::TooLarge,
                None,
                format!("message larger than the {max}-byte limit; closing"),
            );
            self.send_error(b, None, None).await;
            return Next::Close(CLOSE_TOO_BIG, "message too large");
        }
        if all.contains("UTF-8") {
            self.send_error(
                bad(
                    ErrorCode::BadMessage,
                    None,
                    "text message is not valid UTF-8; closing",
                ),
                None,
                None,
            )
            .await;
            return Next::Close(CLOSE_BAD_DATA, "invalid UTF-8");
        }
        if let Some(left_out) = self.inner().log.allow("ws_read") {
            tracing::debug!(conn = self.id, error = %all, left_out, "WebSocket read error");
        }
        Next::Close(CLOSE_PROTOCOL, "WebSocket protocol error")
    }

    /// The rate limit: `Err(Next::Go)` drops the message, `Err(Next::Close)` the connection.
    async fn rate_ok(&mut self) -> Result<(), Next> {
        let (per_second, burst_n) = (self.gw.0.limits.per_second, self.gw.0.limits.burst);
        let (rate, burst, abuse_after) = (
            per_second.max(1) as f64,
            burst_n.max(1) as f64,
            self.gw.0.limits.abuse_after as f64,
        );
        let now = Instant::now();
        let b = &mut self.bucket;
        let dt = now.duration_since(b.at).as_secs_f64();
        b.at = now;
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.abuse = (b.abuse - dt).max(0.0);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        b.abuse += 1.0;
        self.gw.0.stats.rate_limited.fetch_add(1, Relaxed);
        if b.abuse > abuse_after {
            self.gw.0.stats.closed_abuse.fetch_add(1, Relaxed);
            if let Some(left_out) = self.gw.0.log.allow("flood") {
                tracing::info!(conn = self.id, peer = ?self.peer, left_out, "phone flooding; closed (one line per 10 s)");
            }
            return Err(Next::Close(CLOSE_POLICY, "rate limit: too many messages"));
        }
        if b.last_notice
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            b.last_notice = Some(now);
            let retry = ((1.0 - b.tokens) / rate * 1000.0).ceil().max(1.0) as u64;
            let v = serde_json::json!({
                "type": "rate_limit_exceeded",
                "reason": format!("more than {per_second} messages per second (burst {burst_n}); message dropped"),
                "retry_after_ms": retry,
                "per_second": per_second,
                "burst": burst_n,
            });
            if !self.send_json(&v).await {
                return Err(Next::Go);
            }
        }
        Err(Next::Go)
    }

    async fn on_message(&mut self, m: Message, t1: i64) -> Next {
        self.inner().stats.messages_in.fetch_add(1, Relaxed);
        if let Message::Close(_) = m {
            return Next::Go; // tungstenite answers; recv then ends
        }
        if let Message::Pong(_) = m {
            return Next::Go;
        }
        match self.rate_ok().await {
            Ok(()) => {}
            Err(Next::Close(c, r)) => return Next::Close(c, r),
            Err(Next::Go) => return Next::Go,
        }
        let text = match m {
            Message::Text(t) => t,
            Message::Binary(_) => {
                let b = bad(
                    ErrorCode::BadMessage,
                    None,
                    "binary messages are not supported: send JSON text",
                );
                return self.reply_error(b, None, None).await;
            }
            _ => return Next::Go, // WebSocket pings are answered by the library
        };
        let max = talkback::message_cap(self.inner().limits.max_message_bytes, text.as_str());
        if text.len() > max {
            let b = bad(
                ErrorCode::TooLarge,
                None,
                format!(
                    "message of {} bytes exceeds the {max}-byte limit; closing",
                    text.len()
                ),
            );
            self.send_error(b, None, None).await;
            return Next::Close(CLOSE_TOO_BIG, "message too large");
        }
        let v: Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(e) => {
                return self
                    .reply_error(
                        bad(ErrorCode::BadJson, None, format!("not valid JSON: {e}")),
                        None,
                        None,
                    )
                    .await
            }
        };
        let Value::Object(obj) = v else {
            return self
                .reply_error(
                    bad(
                        ErrorCode::BadMessage,
                        None,
                        "a message must be a JSON object with a \"type\" field",
                    ),
                    None,
                    None,
                )
                .await;
        };
        let id = match check_id(&obj) {
            Ok(id) => id,
            Err(b) => return self.reply_error(b, None, None).await,
        };
        let ty = match obj.get("type") {
            Some(Value::String(t)) => t.clone(),
            Some(_) => {
                return self
                    .reply_error(
                        bad_field("type", "\"type\" must be a string"),
                        None,
                        id.as_ref(),
                    )
                    .await
            }
            None => {
                return self
                    .reply_error(
                        bad(
                            ErrorCode::BadMessage,
                            Some("type"),
                            "missing \"type\" field",
                        ),
                        None,
                        id.as_ref(),
                    )
                    .await
            }
        };
        if ty.starts_with("rtc_") {
            return match self.on_rtc(&ty, &obj, id.as_ref()).await {
                Ok(next) => next,
                Err(b) => self.reply_error(b, Some(&ty), id.as_ref()).await,
            };
        }
        let Some(allowed) = fields_of(&ty) else {
            let shown: String = ty.chars().take(40).collect();
            let b = bad(
                ErrorCode::UnknownType,
                Some("type"),
                format!("unknown message type {shown:?}; known: join_session, ping, sync_request, set_tempo, set_meter, play, pause, seek, heartbeat, set_song, post_message, update_message, delete_message, ack_message"),
            );
            return self.reply_error(b, None, id.as_ref()).await;
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !allowed.contains(&k.as_str()) && *k != "type" && *k != "id")
        {
            let k: String = k.chars().take(64).collect();
            let b = Bad {
                code: ErrorCode::UnknownField,
                reason: format!("{ty} has no field {k:?}"),
                field: Some(k),
                retry_after_s: None,
            };
            return self.reply_error(b, Some(&ty), id.as_ref()).await;
        }
        match self.handle(&ty, &obj, t1, id.as_ref()).await {
            Ok(next) => next,
            Err(b) => self.reply_error(b, Some(&ty), id.as_ref()).await,
        }
    }

    async fn reply_error(&mut self, b: Bad, request: Option<&str>, id: Option<&Value>) -> Next {
        if self.send_error(b, request, id).await {
            Next::Go
        } else {
            Next::Close(CLOSE_NORMAL, "")
        }
    }

    async fn handle(
        &mut self,
        ty: &str,
        obj: &Map<String, Value>,
        t1: i64,
        id: Option<&Value>,
    ) -> Result<Next, Bad> {
        let ok = |sent: bool| {
            if sent {
                Next::Go
            } else {
                Next::Close(CLOSE_NORMAL, "")
            }
        };
        match ty {
            "join_session" => {
                if let Some(n) = obj.get("name") {
                    check_text("name", n, 64)?;
                    self.name = n.as_str().map(str::to_string).filter(|n| !n.is_empty());
                }
                let last_seq = match obj.get("last_seq") {
                    None | Some(Value::Null) => 0,
                    v => {
                        let n = integer("last_seq", v)?;
                        if n < 0 {
                            return Err(bad_field("last_seq", "last_seq must be 0 or more"));
                        }
                        n as u64
                    }
                };
                if !self.inner().meta().fetched {
                    self.inner().refresh_meta().await;
                }
                if !self.joined {
                    self.joined = true;
                    let c = Client {
                        tx: self.tx.clone(),
                        kick: self.kick.clone(),
                    };
                    self.inner()
                        .clients
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(self.id, c);
                }
                let snap = self.inner().snapshot(id);
                if !self.send_json(&snap).await {
                    return Ok(Next::Close(CLOSE_NORMAL, ""));
                }
                let stats = self.inner().room_stats();
                if !self.send_json(&stats).await {
                    return Ok(Next::Close(CLOSE_NORMAL, ""));
                }
                // What the phone missed: every numbered cue after `last_seq`, in order
                // (from the room task's published list: a thousand phones joining never
                // wait on the clock loop).
                let all = self.inner().board.all.borrow().clone();
                let from = all.partition_point(|c| c.seq <= last_seq);
                for c in &all[from..] {
                    if !self.send_json(&message_json(c)).await {
                        return Ok(Next::Close(CLOSE_NORMAL, ""));
                    }
                }
                Ok(Next::Go)
            }
            "ack_message" => {
                let seq = integer("seq", obj.get("seq"))?;
                if seq < 1 {
                    return Err(bad_field("seq", format!("no cue {seq}")));
                }
                let seq = seq as u64;
                if self.acked.contains(&seq) {
                    return Ok(Next::Go);
                }
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    self.inner().room.query(Query::CueAck { seq }),
                )
                .await
                {
                    Ok(Reply::Done(_)) => {
                        if self.acked.len() < 4 * crate::core::cues::MAX_CUES {
                            self.acked.insert(seq);
                        }
                        Ok(Next::Go)
                    }
                    Ok(Reply::Error(e)) => Err(bad_field("seq", e)),
                    _ => Err(bad(
                        ErrorCode::Busy,
                        None,
                        "the room did not answer in time; try again",
                    )),
                }
            }
            "set_song" | "post_message" | "update_message" | "delete_message" => {
                let text = |obj: &Map<String, Value>| -> Result<String, Bad> {
                    match obj.get("text") {
                        Some(Value::String(t)) => {
                            crate::core::cues::check_text(t)
                                .map_err(|e| bad_field("text", e.to_string()))?;
                            Ok(t.clone())
                        }
                        Some(_) => Err(bad_field("text", "text must be a string")),
                        None => Err(bad_field("text", "missing text")),
                    }
                };
                let seq = |obj: &Map<String, Value>| -> Result<u64, Bad> {
                    let n = integer("seq", obj.get("seq"))?;
                    if n < 1 {
                        return Err(bad_field("seq", format!("no cue {n}")));
                    }
                    Ok(n as u64)
                };
                let q = match ty {
                    "set_song" => Query::Song(match obj.get("index") {
                        Some(Value::String(s)) if s == "next" => SongPick::Next,
                        Some(Value::String(s)) if s == "prev" => SongPick::Prev,
                        Some(v @ Value::Number(_)) => {
                            let n = integer("index", Some(v))?;
                            if !(1..=crate::core::cues::MAX_SONGS as i64).contains(&n) {
                                return Err(bad_field(
                                    "index",
                                    format!("index must be a song number from 1 (got {n})"),
                                ));
                            }
                            SongPick::Number(n as u16)
                        }
                        None => return Err(bad_field("index", "missing index")),
                        Some(_) => {
                            return Err(bad_field(
                                "index",
                                "index must be a song number, \"next\" or \"prev\"",
                            ))
                        }
                    }),
                    "post_message" => Query::CuePost {
                        text: text(obj)?,
                        author: self.name.clone().unwrap_or_else(|| "phone".into()),
                    },
                    "update_message" => Query::CueEdit {
                        seq: seq(obj)?,
                        text: text(obj)?,
                    },
                    _ => Query::CueDelete { seq: seq(obj)? },
                };
                if let Some(next) = self.check_pin(obj, ty, id).await? {
                    return Ok(next);
                }
                self.request(ty, q, id)
            }
            "ping" => {
                let t0 = number("t0", obj.get("t0"), true)?.unwrap_or(0.0);
                let clock_gen = self.inner().cell.read().clock_gen;
                let t2 = self.inner().session_ns();
                let mut v = serde_json::json!({"type": "pong", "t0": t0, "t1": to_us(t1), "t2": to_us(t2), "gen": clock_gen});
                if let Some(id) = id {
                    v["id"] = id.clone();
                }
                Ok(ok(self.send_json(&v).await))
            }
            "sync_request" => {
                let t0 = number("t0", obj.get("t0"), false)?;
                let snap = self.inner().snapshot(None);
                let clock_gen = snap["gen"].clone();
                let t2 = self.inner().session_ns();
                let mut v = serde_json::json!({"type": "sync_response", "t1": to_us(t1), "t2": to_us(t2), "gen": clock_gen, "snapshot": snap});
                if let Some(t0) = t0 {
                    v["t0"] = serde_json::json!(t0);
                }
                if let Some(id) = id {
                    v["id"] = id.clone();
                }
                Ok(ok(self.send_json(&v).await))
            }
            "heartbeat" => Ok(Next::Go),
            "set_tempo" | "set_meter" | "play" | "pause" | "seek" => {
                let kind = match ty {
                    "set_tempo" => {
                        let bpm = number("bpm", obj.get("bpm"), true)?.unwrap_or(0.0);
                        let t = Tempo::from_bpm(bpm).map_err(|_| {
                            bad_field(
                                "bpm",
                                format!("bpm must be a number from 20 to 400 (got {bpm})"),
                            )
                        })?;
                        Some(ChangeKind::Tempo(t))
                    }
                    "set_meter" => {
                        let m = integer("meter", obj.get("meter"))?;
                        let m = Meter::new(m).map_err(|_| bad_field("meter", format!("meter must be a whole number of beats per bar from 1 to 16 (got {m})")))?;
                        Some(ChangeKind::Meter(m))
                    }
                    "play" => Some(ChangeKind::Start),
                    "pause" => Some(ChangeKind::Stop),
                    _ => {
                        integer("beat", obj.get("beat"))?;
                        None
                    }
                };
                let quantum = match obj.get("quantum") {
                    None => None,
                    Some(Value::String(s)) if s == "beat" => Some(Quantum::Beat),
                    Some(Value::String(s)) if s == "bar" => Some(Quantum::Bar),
                    Some(_) => {
                        return Err(bad_field("quantum", "quantum must be \"beat\" or \"bar\""))
                    }
                };
                if ty == "seek" && obj.contains_key("quantum") {
                    return Err(bad(
                        ErrorCode::UnknownField,
                        Some("quantum"),
                        "seek has no field \"quantum\"",
                    ));
                }
                if let Some(next) = self.check_pin(obj, ty, id).await? {
                    return Ok(next);
                }
                let Some(kind) = kind else {
                    return Err(bad(
                        ErrorCode::NotSupported,
                        None,
                        "seek is not supported: the room's beat count is continuous; pause, then play (it starts on the next bar)",
                    ));
                };
                self.request(ty, Query::Change { kind, quantum }, id)
            }
            _ => Err(bad(
                ErrorCode::UnknownType,
                Some("type"),
                format!("unknown message type {ty:?}"),
            )),
        }
    }

    /// Check the PIN. `Ok(Some(close))` after too many wrong ones.
    async fn check_pin(
        &mut self,
        obj: &Map<String, Value>,
        ty: &str,
        id: Option<&Value>,
    ) -> Result<Option<Next>, Bad> {
        let given = match obj.get("pin") {
            None => None,
            Some(Value::String(s)) if s.chars().count() <= 32 => Some(s.as_str()),
            Some(Value::String(_)) => {
                return Err(bad_field(
                    "pin",
                    "pin must be a string of at most 32 characters",
                ))
            }
            Some(_) => return Err(bad_field("pin", "pin must be a string")),
        };
        let want = match &self.inner().control() {
            Control::Open => return Ok(None),
            Control::Off => return Err(bad(ErrorCode::PinRequired, Some("pin"), CONTROL_OFF)),
            Control::Pin(p) => p.clone(),
        };
        let Some(given) = given else {
            return Err(bad(
                ErrorCode::PinRequired,
                Some("pin"),
                "this box needs the control PIN to change anything",
            ));
        };
        let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
        let b = match self.inner().pins.check(self.peer, given.as_bytes(), want.as_bytes()) {
            Verdict::Ok => return Ok(None),
            Verdict::Wrong(None) => bad(ErrorCode::BadPin, Some("pin"), "wrong control PIN"),
            Verdict::Wrong(Some(d)) => Bad {
                retry_after_s: Some(secs(d)),
                ..bad(
                    ErrorCode::BadPin,
                    Some("pin"),
                    format!("wrong control PIN; too many from your address: wait {} s before the next try", secs(d)),
                )
            },
            Verdict::LockedOut(d) => Bad {
                retry_after_s: Some(secs(d)),
                ..bad(
                    ErrorCode::LockedOut,
                    Some("pin"),
                    format!("too many wrong PINs from your address: try again in {} s (this PIN was not checked)", secs(d)),
                )
            },
            Verdict::Throttled(d) => Bad {
                retry_after_s: Some(secs(d)),
                ..bad(
                    ErrorCode::LockedOut,
                    Some("pin"),
                    format!("wrong control PIN, and too many wrong PINs on this box right now: try again in {} s", secs(d)),
                )
            },
        };
        self.bad_pins += 1;
        self.send_error(b, Some(ty), id).await;
        if self.bad_pins >= self.inner().limits.max_bad_pins {
            self.inner().stats.closed_abuse.fetch_add(1, Relaxed);
            if let Some(left_out) = self.inner().log.allow("bad_pins") {
                tracing::info!(conn = self.id, peer = ?self.peer, left_out, "too many wrong PINs; phone closed (one line per 10 s)");
            }
            return Ok(Some(Next::Close(CLOSE_POLICY, "too many wrong PINs")));
        }
        Ok(Some(Next::Go))
    }

    fn request(&mut self, ty: &str, q: Query, id: Option<&Value>) -> Result<Next, Bad> {
        let busy = || {
            bad(
                ErrorCode::Busy,
                None,
                "another change from this phone is still on its way; try again",
            )
        };
        if self.control_busy.swap(true, Relaxed) {
            return Err(busy());
        }
        let Ok(permit) = self.inner().in_flight.clone().try_acquire_owned() else {
            self.control_busy.store(false, Relaxed);
            return Err(bad(
                ErrorCode::Busy,
                None,
                "too many changes in flight on this box; try again",
            ));
        };
        self.inner().stats.changes_requested.fetch_add(1, Relaxed);
        let room = self.inner().room.clone();
        let tx = self.tx.clone();
        let flag = self.control_busy.clone();
        let stats = self.inner().stats.clone();
        let request = ty.to_string();
        let id = id.cloned();
        tokio::spawn(async move {
            let r = tokio::time::timeout(CONTROL_TIMEOUT, room.query(q)).await;
            drop(permit);
            flag.store(false, Relaxed);
            let mut v = match r {
                Ok(Reply::Done(m)) => {
                    serde_json::json!({"type": "ack", "request": request, "message": m})
                }
                Ok(Reply::Error(e)) => {
                    stats.error(ErrorCode::Refused);
                    serde_json::json!({"type": "error", "code": "refused", "reason": e, "request": request})
                }
                Ok(Reply::Status(_)) => {
                    stats.error(ErrorCode::Refused);
                    serde_json::json!({"type": "error", "code": "refused", "reason": "unexpected answer from the room", "request": request})
                }
                Err(_) => {
                    stats.error(ErrorCode::Busy);
                    serde_json::json!({"type": "error", "code": "busy", "reason": "the room did not answer in time; try again", "request": request})
                }
            };
            if let Some(id) = id {
                v["id"] = id;
            }
            let _ = tx.try_send(Out(Message::Text(v.to_string().into()), None));
        });
        Ok(Next::Go)
    }
}

/// `GET /` — the phone page.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src data:; media-src data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::protocol::ct_eq;
    use super::*;

    #[test]
    fn pins_compare() {
        assert!(ct_eq(b"1234", b"1234"));
        assert!(!ct_eq(b"1234", b"1235"));
        assert!(!ct_eq(b"123", b"1234"));
        assert!(!ct_eq(b"", b"1"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn fields_are_checked() {
        assert!(number("t0", Some(&serde_json::json!("x")), true).is_err());
        assert!(number("t0", None, true).is_err());
        assert_eq!(number("t0", None, false).unwrap(), None);
        assert_eq!(integer("meter", Some(&serde_json::json!(4.0))).unwrap(), 4);
        assert!(integer("meter", Some(&serde_json::json!(4.5))).is_err());
        assert!(integer("meter", Some(&serde_json::json!(1e300))).is_err());
        let o: Map<String, Value> = serde_json::from_str(r#"{"id":[1]}"#).unwrap();
        assert!(check_id(&o).is_err());
        for t in [
            "join_session",
            "ping",
            "sync_request",
            "set_tempo",
            "set_meter",
            "play",
            "pause",
            "seek",
            "heartbeat",
            "set_song",
            "post_message",
            "update_message",
            "delete_message",
            "ack_message",
        ] {
            assert!(fields_of(t).is_some(), "{t}");
        }
        assert!(fields_of("join_session").unwrap().contains(&"last_seq"));
        assert!(fields_of("pong").is_none());
    }
}
