//! Talkback: phones of one room talk to each other over WebRTC, peer to peer on the
//! LAN; the boxes only relay the signalling, within the room (across its boxes too).
//!
//! # Protocol (on `/ws`, besides the messages of [`super`])
//!
//! | client → node | fields | |
//! |---|---|---|
//! | `rtc_join` | `name` (≤ 64 printable chars), `pin`? | join (or rename); needs the control PIN unless the room is open |
//! | `rtc_offer`, `rtc_answer` | `to` (a member id), `sdp` (≤ 16 KiB) | relayed to `to` |
//! | `rtc_ice` | `to`, `candidate` (an object or a string, ≤ 1 KiB as JSON) | relayed to `to` |
//! | `rtc_leave` | `to`? | with `to`: hang up on that member; without: leave talkback |
//!
//! Node → client: `rtc_peers` `{"peers":[{"id","name"}…],"you"}` (every member of the
//! room, this phone included, sent on join and whenever the members change: `you` is
//! the recipient's own id), and the relayed `rtc_offer` (`from`, `sdp`), `rtc_answer`
//! (`from`, `sdp`), `rtc_ice` (`from`, `candidate`), `rtc_leave` (`from`: that member
//! hung up on you or left; also sent for every member of a box that went away).
//! Errors: `error` with `code` `pin_required`/`bad_pin`/`locked_out` (as for changes),
//! `bad_field`, `talkback_full` (at most [`MAX_TALKERS`] members in the room),
//! `not_joined` (`rtc_join` first), `unknown_peer` (no such member now),
//! `rate_limit_exceeded` (over [`RTC_PER_SECOND`] signalling messages a second).
//!
//! # Between boxes
//!
//! A member id is `<first 8 hex digits of the box's node id>-<n>`: unique room-wide,
//! and it names the box the member is on. Each box sends its members
//! ([`RtcRelay::Members`]) to the room's other boxes on every change and every
//! [`ANNOUNCE_EVERY`]; a box whose list is older than [`FORGET_AFTER`], or whose
//! connection ended, has no members (its members are told `rtc_leave`). Signalling
//! for a member of another box travels as [`RtcRelay::Signal`] over the room's
//! authenticated QUIC mesh: a stranger, or a phone of another room, never sees a
//! member or a message. A box only believes member ids with its sender's own prefix.
//!
//! Media never touches the box: the page makes host candidates only (no STUN, no TURN).

use super::{bad, bad_field, check_text, Bad, Client, Conn, Kick, Next, Out};
use crate::core::wire::{rtc_id_ok, RtcKind, RtcMember, RtcRelay, MAX_ICE, MAX_SDP, MAX_TALKERS};
use crate::net::RoomHandle;
use axum::extract::ws::Message;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The page's talkback, wake lock, audio and calibration code (`GET /phone.js`).
pub const SCRIPT: &str = include_str!("../phone/realphone.js");

/// Members are announced to the other boxes this often (and on every change).
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// A box not heard from for this long has no members.
pub const FORGET_AFTER: Duration = Duration::from_secs(4);
/// Signalling messages a phone may send per second…
pub const RTC_PER_SECOND: f64 = 20.0;
/// …with this burst (below the connection's own, so a signalling flood is refused
/// here, by name; the page paces itself at 10 a second after a burst of 20).
pub const RTC_BURST: f64 = 30.0;
/// Largest `/ws` message that carries talkback signalling (an SDP and its envelope).
pub const MAX_RTC_MESSAGE: usize = MAX_SDP + 2048;

/// `GET /phone.js`.
pub async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        SCRIPT,
    )
}

/// The message cap for `text`: talkback signalling may be larger than the others.
pub(super) fn message_cap(normal: usize, text: &str) -> usize {
    if text.len() <= normal || text.len() > MAX_RTC_MESSAGE {
        return normal;
    }
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v["type"].as_str().is_some_and(|t| t.starts_with("rtc_")) => MAX_RTC_MESSAGE,
        _ => normal,
    }
}

/// Why talkback refused something (counted on `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Full,
    NotJoined,
    UnknownPeer,
    TooLarge,
    BadField,
    Rate,
    Pin,
    /// From another box: a member id without that box's prefix, or a message for no
    /// member here.
    Mesh,
    /// A queue (a phone's, or the mesh's) was full.
    Dropped,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::Full,
        Refusal::NotJoined,
        Refusal::UnknownPeer,
        Refusal::TooLarge,
        Refusal::BadField,
        Refusal::Rate,
        Refusal::Pin,
        Refusal::Mesh,
        Refusal::Dropped,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "full",
            Refusal::NotJoined => "not_joined",
            Refusal::UnknownPeer => "unknown_peer",
            Refusal::TooLarge => "too_large",
            Refusal::BadField => "bad_field",
            Refusal::Rate => "rate",
            Refusal::Pin => "pin",
            Refusal::Mesh => "mesh",
            Refusal::Dropped => "dropped",
        }
    }
}

/// Talkback counters.
#[derive(Debug, Default)]
pub struct TalkStats {
    pub joined_total: AtomicU64,
    /// Relayed by kind (offer, answer, ice, leave), to a phone here or another box.
    pub relayed: [AtomicU64; 4],
    pub refused: [AtomicU64; 9],
}

impl TalkStats {
    fn refuse(&self, r: Refusal) {
        let i = Refusal::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.refused[i].fetch_add(1, Relaxed);
    }
}

fn kind_index(k: RtcKind) -> usize {
    match k {
        RtcKind::Offer => 0,
        RtcKind::Answer => 1,
        RtcKind::Ice => 2,
        RtcKind::Leave => 3,
    }
}

struct Local {
    name: String,
    tx: mpsc::Sender<Out>,
    kick: Arc<Kick>,
}

#[derive(Default)]
struct State {
    next_n: u64,
    /// This box's members, by id.
    local: BTreeMap<String, Local>,
    /// The other boxes' members, by node id, with when they were last announced.
    remote: HashMap<String, (Vec<RtcMember>, Instant)>,
}

/// The box's talkback hub (one per gateway).
pub struct Hub {
    state: Mutex<State>,
    room: RoomHandle,
    pub stats: TalkStats,
}

/// One connection's talkback state.
pub(super) struct ConnTalk {
    member: Option<String>,
    tokens: f64,
    at: Instant,
}

impl Default for ConnTalk {
    fn default() -> Self {
        ConnTalk {
            member: None,
            tokens: RTC_BURST,
            at: Instant::now(),
        }
    }
}

impl Hub {
    pub fn new(room: RoomHandle) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(State::default()),
            room,
            stats: TalkStats::default(),
        })
    }

    /// Subscribe to the mesh and start the announcer (needs a tokio runtime).
    pub fn start(hub: &Arc<Hub>) {
        let (tx, rx) = mpsc::channel(256);
        hub.room.rtc_subscribe(tx);
        tokio::spawn(run(Arc::downgrade(hub), rx));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Members of the room now: this box's, then the others' (ids unique).
    fn members(st: &State) -> Vec<RtcMember> {
        let mut v: Vec<RtcMember> = st
            .local
            .iter()
            .map(|(id, l)| RtcMember {
                id: id.clone(),
                name: l.name.clone(),
            })
            .collect();
        for (list, _) in st.remote.values() {
            for m in list {
                if !v.iter().any(|x| x.id == m.id) {
                    v.push(m.clone());
                }
            }
        }
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn local_count(&self) -> usize {
        self.lock().local.len()
    }

    pub fn room_count(&self) -> usize {
        Self::members(&self.lock()).len()
    }

    /// Tell every local member the room's members (each with its own `you`).
    fn push_peers(&self, st: &State) {
        let peers: Vec<Value> = Self::members(st)
            .into_iter()
            .map(|m| serde_json::json!({"id": m.id, "name": m.name}))
            .collect();
        for (id, l) in &st.local {
            let v = serde_json::json!({"type": "rtc_peers", "peers": peers, "you": id});
            self.deliver(l, v);
        }
    }

    fn deliver(&self, l: &Local, v: Value) {
        if let Err(mpsc::error::TrySendError::Full(_)) =
            l.tx.try_send(Out(Message::Text(v.to_string().into()), None))
        {
            // the phone is not reading: the gateway's slow-client rule drops it
            self.stats.refuse(Refusal::Dropped);
            l.kick.kick(super::KICK_SLOW);
        }
    }

    fn announce(&self, st: &State) {
        let v = st
            .local
            .iter()
            .map(|(id, l)| RtcMember {
                id: id.clone(),
                name: l.name.clone(),
            })
            .collect();
        if !self.room.rtc_send(RtcRelay::Members(v)) {
            self.stats.refuse(Refusal::Dropped);
        }
    }

    /// A member leaves (its phone said so, or closed): the others are told.
    fn leave(&self, id: &str) {
        let mut st = self.lock();
        if st.local.remove(id).is_none() {
            return;
        }
        let v = serde_json::json!({"type": "rtc_leave", "from": id});
        for l in st.local.values() {
            self.deliver(l, v.clone());
        }
        self.push_peers(&st);
        self.announce(&st);
        drop(st);
        tracing::debug!(member = id, "talkback: left");
    }

    /// From another box of the room (`from`: its node id, proven by the mesh).
    fn on_mesh(&self, from: &str, r: RtcRelay) {
        let prefix = from.get(..8).unwrap_or(from);
        let mine = |id: &str| id.split_once('-').is_some_and(|(p, _)| p == prefix);
        match r {
            RtcRelay::Members(v) => {
                if !v.iter().all(|m| mine(&m.id)) {
                    self.stats.refuse(Refusal::Mesh);
                    return;
                }
                let mut st = self.lock();
                let old = st
                    .remote
                    .insert(from.to_string(), (v.clone(), Instant::now()))
                    .map(|(o, _)| o)
                    .unwrap_or_default();
                if v.is_empty() {
                    st.remote.remove(from);
                }
                if old != v {
                    self.gone(&st, &old, &v);
                    self.push_peers(&st);
                }
            }
            RtcRelay::Signal {
                from: who,
                to,
                kind,
                body,
            } => {
                if !mine(&who) {
                    self.stats.refuse(Refusal::Mesh);
                    return;
                }
                let st = self.lock();
                let Some(l) = st.local.get(&to) else {
                    self.stats.refuse(Refusal::Mesh);
                    return;
                };
                let Some(v) = signal_json(kind, &who, &body) else {
                    self.stats.refuse(Refusal::Mesh);
                    return;
                };
                self.stats.relayed[kind_index(kind)].fetch_add(1, Relaxed);
                self.deliver(l, v);
            }
        }
    }

    /// Members in `old` and not in `new` left: tell the local members.
    fn gone(&self, st: &State, old: &[RtcMember], new: &[RtcMember]) {
        for m in old.iter().filter(|m| !new.iter().any(|n| n.id == m.id)) {
            let v = serde_json::json!({"type": "rtc_leave", "from": m.id});
            for l in st.local.values() {
                self.deliver(l, v.clone());
            }
        }
    }

    /// Forget boxes not heard from for [`FORGET_AFTER`]; announce ours.
    fn tick(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        let stale: Vec<String> = st
            .remote
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > FORGET_AFTER)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &stale {
            if let Some((old, _)) = st.remote.remove(k) {
                self.gone(&st, &old, &[]);
            }
        }
        if !stale.is_empty() {
            self.push_peers(&st);
        }
        if !st.local.is_empty() {
            self.announce(&st);
        }
    }
}

/// The JSON a phone gets for a relayed message (`None`: an ICE body that is not JSON).
fn signal_json(kind: RtcKind, from: &str, body: &str) -> Option<Value> {
    let mut v = serde_json::json!({"type": kind.as_str(), "from": from});
    match kind {
        RtcKind::Offer | RtcKind::Answer => v["sdp"] = Value::String(body.to_string()),
        RtcKind::Ice => v["candidate"] = serde_json::from_str(body).ok()?,
        RtcKind::Leave => {}
    }
    Some(v)
}

async fn run(hub: Weak<Hub>, mut rx: mpsc::Receiver<(String, RtcRelay)>) {
    let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some((from, r)) = m else { return };
                let Some(h) = hub.upgrade() else { return };
                h.on_mesh(&from, r);
            }
            _ = tick.tick() => {
                let Some(h) = hub.upgrade() else { return };
                h.tick();
            }
        }
    }
}

/// Prometheus lines for `/metrics`.
pub fn metrics(hub: &Hub) -> String {
    let mut m = String::new();
    m.push_str("# HELP bandsync_talkback_members Talkback members: on this box (local) and in the room.\n# TYPE bandsync_talkback_members gauge\n");
    m.push_str(&format!(
        "bandsync_talkback_members{{where=\"local\"}} {}\nbandsync_talkback_members{{where=\"room\"}} {}\n",
        hub.local_count(),
        hub.room_count()
    ));
    m.push_str("# HELP bandsync_talkback_joined_total Phones that joined talkback here.\n# TYPE bandsync_talkback_joined_total counter\n");
    m.push_str(&format!(
        "bandsync_talkback_joined_total {}\n",
        hub.stats.joined_total.load(Relaxed)
    ));
    m.push_str("# HELP bandsync_talkback_relayed_total Talkback signalling relayed, by kind.\n# TYPE bandsync_talkback_relayed_total counter\n");
    for (k, n) in ["offer", "answer", "ice", "leave"]
        .iter()
        .zip(hub.stats.relayed.iter())
    {
        m.push_str(&format!(
            "bandsync_talkback_relayed_total{{kind=\"{k}\"}} {}\n",
            n.load(Relaxed)
        ));
    }
    m.push_str("# HELP bandsync_talkback_refused_total Talkback messages refused, by reason.\n# TYPE bandsync_talkback_refused_total counter\n");
    for (r, n) in Refusal::ALL.iter().zip(hub.stats.refused.iter()) {
        m.push_str(&format!(
            "bandsync_talkback_refused_total{{reason=\"{}\"}} {}\n",
            r.as_str(),
            n.load(Relaxed)
        ));
    }
    m
}

fn talk_error(code: &str, reason: impl Into<String>, request: &str, id: Option<&Value>) -> Value {
    let mut v = serde_json::json!({"type": "error", "code": code, "reason": reason.into(), "request": request});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

fn only(obj: &Map<String, Value>, ty: &str, allowed: &[&str]) -> Result<(), Bad> {
    if let Some(k) = obj
        .keys()
        .find(|k| !allowed.contains(&k.as_str()) && *k != "type" && *k != "id")
    {
        let k: String = k.chars().take(64).collect();
        return Err(Bad {
            code: super::ErrorCode::UnknownField,
            reason: format!("{ty} has no field {k:?}"),
            field: Some(k),
            retry_after_s: None,
        });
    }
    Ok(())
}

fn member_field(obj: &Map<String, Value>, field: &str) -> Result<String, Bad> {
    match obj.get(field) {
        Some(Value::String(s)) if rtc_id_ok(s) => Ok(s.clone()),
        Some(_) => Err(bad_field(
            field,
            format!("{field} must be a talkback member id (from rtc_peers)"),
        )),
        None => Err(bad(
            super::ErrorCode::BadMessage,
            Some(field),
            format!("missing {field:?}"),
        )),
    }
}

impl Conn {
    /// A message whose type starts with `rtc_`.
    pub(super) async fn on_rtc(
        &mut self,
        ty: &str,
        obj: &Map<String, Value>,
        id: Option<&Value>,
    ) -> Result<Next, Bad> {
        let hub = self.inner().talk.clone();
        // the signalling rate cap (on top of the connection's)
        {
            let t = &mut self.talk;
            let now = Instant::now();
            t.tokens =
                (t.tokens + now.duration_since(t.at).as_secs_f64() * RTC_PER_SECOND).min(RTC_BURST);
            t.at = now;
            if t.tokens < 1.0 {
                hub.stats.refuse(Refusal::Rate);
                let v = serde_json::json!({
                    "type": "rate_limit_exceeded",
                    "reason": format!("more than {RTC_PER_SECOND} talkback messages per second (burst {RTC_BURST}); message dropped"),
                    "retry_after_ms": 100, "per_second": RTC_PER_SECOND, "burst": RTC_BURST,
                });
                return Ok(self.sent(v).await);
            }
            t.tokens -= 1.0;
        }
        let refuse = |r: Refusal, b: Bad| {
            hub.stats.refuse(r);
            b
        };
        match ty {
            "rtc_join" => {
                only(obj, ty, &["name", "pin"]).map_err(|b| refuse(Refusal::BadField, b))?;
                let name = match obj.get("name") {
                    Some(n) => {
                        check_text("name", n, 64).map_err(|b| refuse(Refusal::BadField, b))?;
                        n.as_str().unwrap_or("").trim().to_string()
                    }
                    None => String::new(),
                };
                if self.talk.member.is_none() {
                    if let Some(next) = self
                        .check_pin(obj, ty, id)
                        .await
                        .map_err(|b| refuse(Refusal::Pin, b))?
                    {
                        hub.stats.refuse(Refusal::Pin);
                        return Ok(next);
                    }
                }
                if !self.inner().meta().fetched {
                    self.inner().refresh_meta().await;
                }
                let node = self.inner().meta().node;
                let Some(prefix) = node.get(..8).map(str::to_string) else {
                    let v = talk_error(
                        "busy",
                        "this box does not know its room yet; try again",
                        ty,
                        id,
                    );
                    return Ok(self.sent(v).await);
                };
                let joined = {
                    let mut st = hub.lock();
                    let me = match &self.talk.member {
                        Some(m) => Some(m.clone()),
                        None if Hub::members(&st).len() >= MAX_TALKERS => None,
                        None => {
                            st.next_n += 1;
                            Some(format!("{prefix}-{}", st.next_n))
                        }
                    };
                    if let Some(me) = &me {
                        let name = if name.is_empty() {
                            format!("phone {}", me.rsplit('-').next().unwrap_or(""))
                        } else {
                            name
                        };
                        st.local.insert(
                            me.clone(),
                            Local {
                                name,
                                tx: self.tx.clone(),
                                kick: self.kick.clone(),
                            },
                        );
                        hub.push_peers(&st);
                        hub.announce(&st);
                    }
                    me
                };
                let Some(me) = joined else {
                    hub.stats.refuse(Refusal::Full);
                    let v = talk_error(
                        "talkback_full",
                        format!("talkback already has {MAX_TALKERS} members in this room"),
                        ty,
                        id,
                    );
                    return Ok(self.sent(v).await);
                };
                if self.talk.member.is_none() {
                    hub.stats.joined_total.fetch_add(1, Relaxed);
                }
                self.talk.member = Some(me.clone());
                // a talkback member is a joined client too (broadcasts; kicked like
                // one when slow)
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
                tracing::debug!(member = %me, "talkback: joined");
                Ok(Next::Go)
            }
            "rtc_offer" | "rtc_answer" | "rtc_ice" | "rtc_leave" => {
                let kind = match ty {
                    "rtc_offer" => RtcKind::Offer,
                    "rtc_answer" => RtcKind::Answer,
                    "rtc_ice" => RtcKind::Ice,
                    _ => RtcKind::Leave,
                };
                let (field, allowed): (&str, &[&str]) = match kind {
                    RtcKind::Offer | RtcKind::Answer => ("sdp", &["to", "sdp"]),
                    RtcKind::Ice => ("candidate", &["to", "candidate"]),
                    RtcKind::Leave => ("", &["to"]),
                };
                only(obj, ty, allowed).map_err(|b| refuse(Refusal::BadField, b))?;
                let Some(me) = self.talk.member.clone() else {
                    hub.stats.refuse(Refusal::NotJoined);
                    let v = talk_error("not_joined", "join talkback first (rtc_join)", ty, id);
                    return Ok(self.sent(v).await);
                };
                if kind == RtcKind::Leave && !obj.contains_key("to") {
                    self.talk.member = None;
                    hub.leave(&me);
                    return Ok(Next::Go);
                }
                let to = member_field(obj, "to").map_err(|b| refuse(Refusal::BadField, b))?;
                let body = match kind {
                    RtcKind::Offer | RtcKind::Answer => match obj.get("sdp") {
                        Some(Value::String(s)) if s.len() <= MAX_SDP => s.clone(),
                        Some(Value::String(s)) => {
                            return Err(refuse(
                                Refusal::TooLarge,
                                bad_field(
                                    "sdp",
                                    format!(
                                        "sdp of {} bytes exceeds the {MAX_SDP}-byte limit",
                                        s.len()
                                    ),
                                ),
                            ))
                        }
                        Some(_) => {
                            return Err(refuse(
                                Refusal::BadField,
                                bad_field("sdp", "sdp must be a string"),
                            ))
                        }
                        None => {
                            return Err(refuse(
                                Refusal::BadField,
                                bad(super::ErrorCode::BadMessage, Some("sdp"), "missing \"sdp\""),
                            ))
                        }
                    },
                    RtcKind::Ice => match obj.get(field) {
                        Some(c @ (Value::Object(_) | Value::String(_))) => {
                            let s = c.to_string();
                            if s.len() > MAX_ICE {
                                return Err(refuse(
                                    Refusal::TooLarge,
                                    bad_field("candidate", format!("candidate of {} bytes exceeds the {MAX_ICE}-byte limit", s.len())),
                                ));
                            }
                            s
                        }
                        Some(_) => {
                            return Err(refuse(
                                Refusal::BadField,
                                bad_field("candidate", "candidate must be an object or a string"),
                            ))
                        }
                        None => {
                            return Err(refuse(
                                Refusal::BadField,
                                bad(
                                    super::ErrorCode::BadMessage,
                                    Some("candidate"),
                                    "missing \"candidate\"",
                                ),
                            ))
                        }
                    },
                    RtcKind::Leave => String::new(),
                };
                // here, on another box, or nowhere (no await while the lock is held)
                enum Where {
                    Delivered,
                    BadBody,
                    Remote,
                    Nowhere,
                }
                let found = {
                    let st = hub.lock();
                    match st.local.get(&to) {
                        Some(l) => match signal_json(kind, &me, &body) {
                            Some(v) => {
                                hub.deliver(l, v);
                                Where::Delivered
                            }
                            None => Where::BadBody,
                        },
                        None if st
                            .remote
                            .values()
                            .any(|(v, _)| v.iter().any(|m| m.id == to)) =>
                        {
                            Where::Remote
                        }
                        None => Where::Nowhere,
                    }
                };
                match found {
                    Where::Delivered => {
                        hub.stats.relayed[kind_index(kind)].fetch_add(1, Relaxed);
                        return Ok(Next::Go);
                    }
                    Where::BadBody => {
                        return Err(refuse(
                            Refusal::BadField,
                            bad_field("candidate", "not JSON"),
                        ))
                    }
                    Where::Nowhere => {
                        hub.stats.refuse(Refusal::UnknownPeer);
                        let v = talk_error(
                            "unknown_peer",
                            format!("no talkback member {to:?} in this room now"),
                            ty,
                            id,
                        );
                        return Ok(self.sent(v).await);
                    }
                    Where::Remote => {}
                }
                if hub.room.rtc_send(RtcRelay::Signal {
                    from: me,
                    to,
                    kind,
                    body,
                }) {
                    hub.stats.relayed[kind_index(kind)].fetch_add(1, Relaxed);
                } else {
                    hub.stats.refuse(Refusal::Dropped);
                    let v = talk_error(
                        "busy",
                        "the box is too busy to relay this; try again",
                        ty,
                        id,
                    );
                    return Ok(self.sent(v).await);
                }
                Ok(Next::Go)
            }
            _ => {
                hub.stats.refuse(Refusal::BadField);
                Err(bad(
                    super::ErrorCode::UnknownType,
                    Some("type"),
                    format!("unknown message type {ty:?}; talkback knows rtc_join, rtc_offer, rtc_answer, rtc_ice, rtc_leave"),
                ))
            }
        }
    }

    async fn sent(&mut self, v: Value) -> Next {
        if self.send_json(&v).await {
            Next::Go
        } else {
            Next::Close(super::CLOSE_NORMAL, "")
        }
    }

    /// The connection ends: leave talkback (the others are told).
    pub(super) fn talk_leave(&mut self) {
        if let Some(me) = self.talk.member.take() {
            self.inner().talk.leave(&me);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_json() {
        let v = signal_json(RtcKind::Ice, "0123abcd-1", r#"{"candidate":"c"}"#).unwrap();
        assert_eq!(v["candidate"]["candidate"], "c");
        assert!(signal_json(RtcKind::Ice, "0123abcd-1", "{").is_none());
        let v = signal_json(RtcKind::Offer, "0123abcd-1", "v=0").unwrap();
        assert_eq!(v["sdp"], "v=0");
    }

    #[test]
    fn mesh_frames_round_trip_and_are_validated() {
        use crate::core::wire::{Frame, WireError};
        let ok = Frame::Rtc(RtcRelay::Signal {
            from: "0123abcd-1".into(),
            to: "89abcdef-2".into(),
            kind: RtcKind::Offer,
            body: "v=0\r\n".repeat(2000),
        });
        assert_eq!(
            Frame::decode(&ok.encode()).unwrap(),
            ok,
            "an SDP near 16 KiB fits a frame"
        );
        let big = Frame::Rtc(RtcRelay::Signal {
            from: "0123abcd-1".into(),
            to: "89abcdef-2".into(),
            kind: RtcKind::Ice,
            body: "x".repeat(MAX_ICE + 1),
        });
        assert!(matches!(
            Frame::decode(&big.encode()),
            Err(WireError::Invalid {
                field: "rtc.body",
                ..
            })
        ));
        let forged = Frame::Rtc(RtcRelay::Members(vec![RtcMember {
            id: "not an id".into(),
            name: "x".into(),
        }]));
        assert!(matches!(
            Frame::decode(&forged.encode()),
            Err(WireError::Invalid {
                field: "rtc.members.id",
                ..
            })
        ));
        let many = Frame::Rtc(RtcRelay::Members(
            (0..=MAX_TALKERS)
                .map(|i| RtcMember {
                    id: format!("0123abcd-{i}"),
                    name: "x".into(),
                })
                .collect(),
        ));
        assert!(Frame::decode(&many.encode()).is_err());
    }

    #[test]
    fn another_box_speaks_only_for_its_own_members() {
        let (room, _inbox) = crate::net::handle::channel();
        let hub = Hub::new(room);
        // ids with another box's prefix are refused
        hub.on_mesh(
            "0123abcd00000000",
            RtcRelay::Members(vec![RtcMember {
                id: "89abcdef-1".into(),
                name: "x".into(),
            }]),
        );
        assert_eq!(hub.room_count(), 0);
        hub.on_mesh(
            "0123abcd00000000",
            RtcRelay::Members(vec![RtcMember {
                id: "0123abcd-1".into(),
                name: "x".into(),
            }]),
        );
        assert_eq!(hub.room_count(), 1);
        // a box gone (empty list) has none
        hub.on_mesh("0123abcd00000000", RtcRelay::Members(vec![]));
        assert_eq!(hub.room_count(), 0);
        assert_eq!(
            hub.stats.refused[Refusal::ALL
                .iter()
                .position(|r| *r == Refusal::Mesh)
                .unwrap()]
            .load(Relaxed),
            1
        );
    }

    #[test]
    fn rtc_messages_may_be_larger() {
        let sdp = "a".repeat(8000);
        let t =
            serde_json::json!({"type": "rtc_offer", "to": "0123abcd-1", "sdp": sdp}).to_string();
        assert_eq!(message_cap(4096, &t), MAX_RTC_MESSAGE);
        let t = serde_json::json!({"type": "set_tempo", "x": sdp}).to_string();
        assert_eq!(message_cap(4096, &t), 4096);
        assert!(rtc_id_ok("0123abcd-12"));
        assert!(!rtc_id_ok("0123ABCD-1"));
        assert!(!rtc_id_ok("0123abcd-"));
        assert!(!rtc_id_ok("x"));
    }
}
