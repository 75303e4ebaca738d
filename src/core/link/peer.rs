//! Sans-IO state machine for a bandsync box acting as the **authority** of a
//! Link session.
//!
//! # Role
//!
//! [`LinkPeer`] speaks Link discovery (spec Ch. 1) on one IPv4 gateway and
//! answers clock measurements (Ch. 2 §4.3). It founds a session whose id is
//! its own NodeId (Ch. 0 §2), or the one the product gives
//! ([`Config::session_id`]: every box of a bandsync room presents the same
//! session, see [`crate::core::link::present`]), and never leaves it. Its job is to make every
//! Link application on the network (a) join that session and (b) follow the
//! room's timeline and transport, and to report — and by default overrule —
//! any attempt by a Link app to change them.
//!
//! # How the Link apps end up in *our* session (Ch. 2 §7)
//!
//! When a Link peer sees gossip from a foreign session it measures that
//! session's ghost time (ping/pong against the founder's `mep4`, Ch. 2 §7.1,
//! answered here by the stateless responder) and joins iff
//! `g_foreign − g_own > ε` (ε = 500 ms), or, within ε, iff the foreign
//! session id is byte-wise smaller (Ch. 2 §7.2). The session whose ghost
//! clock reads *later* — nominally the older session — wins. Session ids only
//! break ties.
//!
//! The authority's ghost time is `host + intercept` with an intercept chosen
//! by the product ([`GhostXform`]); the recommended [`DEFAULT_GHOST_EPOCH_US`]
//! (2⁵⁰ µs ≈ 35.7 years) makes our ghost clock read later than any session
//! founded by a real Link app (whose ghost time starts at 0 when it founds its
//! session, Ch. 2 §2), so every Link app evaluates the rule in our favour and
//! joins, adopting our session id, our timeline and a ghost transform
//! measured against us. Conversely the authority never runs the join rule: it
//! stays in its own session whatever it sees (it only *measures* foreign
//! sessions, optionally, to report [`Event::ForeignSession`] — e.g. another
//! authority with a still larger ghost time, which would win).
//!
//! # How a Link app's tempo/transport change is overruled (Ch. 2 §6, §8)
//!
//! Within a session, priority is *not* decided by session ids or by who
//! sent last, but by the timeline's **beat origin**: a peer replaces its
//! timeline with a received one iff the received `beatOrigin` is strictly
//! greater (Ch. 2 §6 rule 2), and a peer changing tempo must emit a larger
//! origin (rule 3). So when a member of our session gossips a timeline that
//! differs from ours with `beatOrigin ≥` ours, the authority re-describes its
//! *unchanged* room line from a new origin beat that is strictly greater
//! (the next multiple of [`Config::anchor_beats`] above it; `time_origin`
//! moves along the same line, so beat/phase are unchanged) and gossips it at
//! once. Every Link peer then adopts it by its own priority rule. Start/stop
//! uses the `stst` timestamp instead (later ghost timestamp wins, Ch. 2 §8
//! rule 2): the authority re-announces its own state with a timestamp later
//! than the intruder's.
//!
//! # Time
//!
//! Every `now_us` argument is **host** time in µs (the product's monotonic
//! clock). Timeline and start/stop values are in **ghost** time; the
//! [`GhostXform`] given in [`Config::ghost`] / [`LinkPeer::set_ghost_xform`]
//! converts (`ghost = host + intercept`). Pongs carry `ghost(now)`. Link peers
//! measure the intercept only at join and every 30 s (Ch. 2 §7.3), so a jump
//! alone shifts their phase until their next re-measurement; a product that
//! moves it on purpose (bandsync steers it onto the apps' clocks,
//! [`crate::core::link::steer`]) re-describes its line in the new ghost time
//! ([`LinkPeer::set_room`]) so their beats move with it.

use ::core::net::SocketAddrV4;

use crate::core::link::codec::{
    decode_discovery_header, decode_measurement_header, decode_measurement_payload,
    decode_peer_state, encode_discovery, encode_pong_echo, DiscoveryHeader, DiscoveryKind,
    DiscoveryMessage, MeasurementKind, NodeId, PeerState, StartStopState, Timeline,
    DISCOVERY_MAGIC, MAX_MESSAGE_SIZE, MAX_PING_PAYLOAD, MEASUREMENT_MAGIC,
};
use crate::core::link::measurement::{FailReason, Measurement, Step};
use crate::core::link::steer::{AppClocks, Estimate, STEP_MAX_US};
use crate::core::link::timeline::{div_floor, ExactLine, GhostXform, MICROBEATS_PER_BEAT};

/// Recommended ghost-time intercept: 2⁵⁰ µs (≈ 35.7 years) ahead of the host
/// clock, so the authority's session out-ranks any Link-founded session.
pub const DEFAULT_GHOST_EPOCH_US: i64 = 1 << 50;
/// Join threshold ε of Ch. 2 §7.2.
pub const JOIN_EPSILON_US: i64 = 500_000;
/// IPv4 discovery multicast group (Ch. 1 §2).
pub const MULTICAST_V4: SocketAddrV4 =
    SocketAddrV4::new(::core::net::Ipv4Addr::new(224, 76, 78, 75), 20808);

/// Configuration. [`Config::new`] gives the spec's constants.
#[derive(Clone, Debug)]
pub struct Config {
    /// Our unicast measurement endpoint, advertised as `mep4`. The host may
    /// use one unicast socket for discovery and measurement.
    pub measurement_endpoint: SocketAddrV4,
    /// Host→ghost transform (see module docs).
    pub ghost: GhostXform,
    /// The room's timeline (ghost time), before [`LinkPeer::set_timeline`].
    pub timeline: Timeline,
    /// Initial transport state, stamped with the ghost time of
    /// [`LinkPeer::start`]; `None` publishes the all-zero default `stst`
    /// (which Link apps treat as "stopped, no state") until
    /// [`LinkPeer::set_timeline`].
    pub playing: Option<bool>,
    /// Header ttl of Alive/Response, seconds (Ch. 1 §4: 5).
    pub ttl_s: u8,
    /// Alive period (Ch. 1 §4.1: 250 ms).
    pub alive_period_us: i64,
    /// Minimum spacing between Alives (Ch. 1 §4.1: 50 ms).
    pub min_broadcast_spacing_us: i64,
    /// Prune timer padding (Ch. 1 §7: 1 s).
    pub prune_padding_us: i64,
    /// Peer table bound; the entry closest to expiry is evicted beyond it.
    pub max_peers: usize,
    /// Published beat origins are whole multiples of this many beats (whole
    /// beats keep `time_origin` exact). The real Link library anchors app
    /// phase at session beat 0 whatever the origin (verified with origins 5
    /// and 6 beats at quantum 4), so this is only a hedge against a peer
    /// that applies the Ch. 2 §9 `b_app` formula literally: 48 is a multiple
    /// of quanta 1,2,3,4,6,8,12,16,24,48. Cost: the origin may lie up to 48
    /// beats in the future (accepted by Link).
    pub anchor_beats: i64,
    /// Re-announce a winning timeline / start-stop state automatically when a
    /// Link peer changes them (the event is emitted either way).
    pub auto_overrule: bool,
    /// Measure foreign sessions to report [`Event::ForeignSession`].
    pub measure_foreign_sessions: bool,
    /// Concurrent foreign measurements.
    pub max_measurements: usize,
    /// Delay before re-measuring a session whose measurement failed.
    pub remeasure_backoff_us: i64,
    /// The session we found and publish; `None`: our NodeId (Ch. 0 §2). Every
    /// box of a bandsync room publishes the same one, so Link apps see one
    /// session whichever box they hear.
    pub session_id: Option<NodeId>,
    /// NodeIds that begin with these bytes are *siblings*: other authorities
    /// presenting the same room (the other boxes). Their timelines and
    /// start/stop states, and Link apps relaying them, are never taken for a
    /// Link app's change.
    pub sibling_tag: Option<[u8; 4]>,
    /// How long before the room's next transport change (ghost µs) a member
    /// may already announce it without being overruled: a sibling box whose
    /// clock switched a little earlier than ours.
    pub transition_window_us: i64,
    /// Probe the Link apps' ghost clocks ([`crate::core::link::steer`]): the product
    /// reads [`LinkPeer::app_offset`] and steers its ghost clock onto theirs.
    pub steer_apps: bool,
}

impl Config {
    /// Spec defaults with the given measurement endpoint, a 120 bpm room
    /// timeline at ghost 0, and the [`DEFAULT_GHOST_EPOCH_US`] intercept.
    pub fn new(measurement_endpoint: SocketAddrV4) -> Config {
        Config {
            measurement_endpoint,
            ghost: GhostXform {
                intercept_us: DEFAULT_GHOST_EPOCH_US,
            },
            timeline: Timeline {
                micros_per_beat: 500_000,
                beat_origin: 0,
                time_origin: 0,
            },
            playing: None,
            ttl_s: 5,
            alive_period_us: 250_000,
            min_broadcast_spacing_us: 50_000,
            prune_padding_us: 1_000_000,
            max_peers: 64,
            anchor_beats: 48,
            auto_overrule: true,
            measure_foreign_sessions: true,
            max_measurements: 2,
            remeasure_backoff_us: 1_000_000,
            session_id: None,
            sibling_tag: None,
            transition_window_us: 250_000,
            steer_apps: false,
        }
    }
}

/// Why a peer left the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaveReason {
    /// It sent ByeBye.
    ByeBye,
    /// Its ttl ran out.
    Expired,
    /// Evicted to keep the table within [`Config::max_peers`].
    Evicted,
}

/// Something the product may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A NodeId appeared in the peer table.
    PeerJoined {
        /// Peer.
        node_id: NodeId,
        /// Its discovery (unicast) endpoint.
        addr: SocketAddrV4,
        /// Its session, if it gossiped one.
        session_id: Option<NodeId>,
    },
    /// A NodeId left the peer table.
    PeerLeft {
        /// Peer.
        node_id: NodeId,
        /// Why.
        reason: LeaveReason,
    },
    /// A peer's session changed (also emitted once when it is first seen).
    PeerSessionChanged {
        /// Peer.
        node_id: NodeId,
        /// New session.
        session_id: Option<NodeId>,
        /// Whether that is our session.
        in_our_session: bool,
    },
    /// A member of our session gossiped a timeline that competes with ours.
    RemoteTimelineChange {
        /// Who.
        node_id: NodeId,
        /// Their proposal (raw wire values).
        timeline: Timeline,
        /// What we re-announced to win, if we overruled.
        overruled_with: Option<Timeline>,
    },
    /// A member of our session gossiped a newer start/stop state.
    RemoteStartStopChange {
        /// Who.
        node_id: NodeId,
        /// Their state.
        state: StartStopState,
        /// What we re-announced to win, if we overruled.
        overruled_with: Option<StartStopState>,
    },
    /// A foreign session was measured.
    ForeignSession {
        /// The session.
        session_id: NodeId,
        /// `g_foreign − g_ours` at the same instant, µs.
        ghost_delta_us: i64,
        /// Whether its members will join us by the Ch. 2 §7.2 rule.
        joins_us: bool,
    },
    /// Measuring a foreign session failed.
    ForeignSessionMeasurementFailed {
        /// The session.
        session_id: NodeId,
        /// Why.
        reason: FailReason,
    },
}

/// Output of the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send to the discovery multicast group ([`MULTICAST_V4`]) from the
    /// unicast socket of the gateway.
    SendMulticast(Vec<u8>),
    /// Send unicast (discovery Response, Pong or Ping) to this endpoint.
    SendTo(SocketAddrV4, Vec<u8>),
    /// Report.
    Event(Event),
}

/// One row of the peer table (Ch. 1 §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// Peer's NodeId.
    pub node_id: NodeId,
    /// Source endpoint of its last state message.
    pub addr: SocketAddrV4,
    /// Its last gossiped state.
    pub state: PeerState,
    /// Host time at which its ttl runs out.
    pub expires_at_us: i64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ForeignStatus {
    Measuring,
    Measured,
    FailedAt(i64),
}

#[derive(Clone, Debug)]
struct Foreign {
    id: NodeId,
    status: ForeignStatus,
}

/// SplitMix64: the only randomness, seeded by the caller.
#[derive(Clone, Debug)]
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The authority peer. See the module docs.
#[derive(Clone, Debug)]
pub struct LinkPeer {
    node_id: NodeId,
    cfg: Config,
    rng: Rng,
    ghost: GhostXform,
    room: Timeline,
    published: Timeline,
    bo_floor: i64,
    start_stop: StartStopState,
    started: bool,
    stopped: bool,
    last_alive_us: Option<i64>,
    next_alive_us: i64,
    peers: Vec<PeerEntry>,
    foreign: Vec<Foreign>,
    measurements: Vec<Measurement>,
    last_remote_timeline: Option<Timeline>,
    last_remote_start_stop: Option<StartStopState>,
    /// The room's line, exact (set by [`LinkPeer::set_room`]); `room` is then
    /// this line described from an origin near the present.
    exact: Option<ExactLine>,
    /// Other lines of the room (scheduled segments, the one just ended).
    accepted: Vec<ExactLine>,
    /// The room's next transport state and when it begins (ghost µs).
    next_transport: Option<(bool, i64)>,
    /// The highest-origin timeline seen in our session (ours included).
    top_seen: Option<Timeline>,
    counters: Counters,
    /// The Link apps' clocks ([`Config::steer_apps`]).
    clocks: AppClocks,
}

/// Counters of what a [`LinkPeer`] received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams handled.
    pub datagrams: u64,
    /// Datagrams dropped as malformed: unknown magic, undecodable header or
    /// payload, oversized ping.
    pub bad: u64,
    /// Pings answered.
    pub pongs: u64,
    /// Samples of Link apps' clocks taken ([`Config::steer_apps`]).
    pub app_samples: u64,
}

/// The room as the product presents it ([`LinkPeer::set_room`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomState {
    /// The line in force now.
    pub line: ExactLine,
    /// Its transport state.
    pub playing: bool,
    /// Ghost time (µs) at which that line / transport state began.
    pub since_us: i64,
    /// The room's other lines that are no Link app's proposal: its scheduled
    /// segments and the one that just ended.
    pub accepted: Vec<ExactLine>,
    /// The transport state of the next segment and when it begins (ghost µs).
    pub next_transport: Option<(bool, i64)>,
}

impl LinkPeer {
    /// Create an authority with our NodeId (= our session id), a seed for the
    /// (only) random choice it makes — which member of a foreign session to
    /// measure — and the configuration. Nothing is sent before [`LinkPeer::start`].
    pub fn new(node_id: NodeId, seed: u64, config: Config) -> LinkPeer {
        let room = config.timeline.clamped();
        // A configured transport state gets its timestamp at start().
        let start_stop = StartStopState::default();
        let mut cfg = config;
        cfg.anchor_beats = cfg.anchor_beats.max(1);
        cfg.max_peers = cfg.max_peers.max(1);
        LinkPeer {
            node_id,
            ghost: cfg.ghost,
            rng: Rng(seed),
            room,
            published: room,
            bo_floor: i64::MIN / 4,
            start_stop,
            started: false,
            stopped: false,
            last_alive_us: None,
            next_alive_us: 0,
            peers: Vec::new(),
            foreign: Vec::new(),
            measurements: Vec::new(),
            last_remote_timeline: None,
            last_remote_start_stop: None,
            exact: None,
            accepted: Vec::new(),
            next_transport: None,
            top_seen: None,
            counters: Counters::default(),
            clocks: AppClocks::default(),
            cfg,
        }
    }

    // ----- accessors -------------------------------------------------------

    /// Our NodeId.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }
    /// Our session id ([`Config::session_id`], else our NodeId: we founded it).
    pub fn session_id(&self) -> NodeId {
        self.cfg.session_id.unwrap_or(self.node_id)
    }
    /// Whether `id` is another authority of the same room ([`Config::sibling_tag`]).
    pub fn is_sibling(&self, id: NodeId) -> bool {
        self.cfg.sibling_tag.is_some_and(|t| id.0[..4] == t) && id != self.node_id
    }
    /// What was received so far.
    pub fn counters(&self) -> Counters {
        Counters {
            app_samples: self.clocks.samples_taken,
            ..self.counters
        }
    }
    /// Known peers in our session that are not siblings: the Link apps following us.
    pub fn app_peers(&self) -> impl Iterator<Item = &PeerEntry> {
        let s = self.session_id();
        self.peers
            .iter()
            .filter(move |p| p.state.session_id == Some(s) && !self.is_sibling(p.node_id))
    }
    /// Known siblings (other boxes of the room), any session.
    pub fn sibling_peers(&self) -> impl Iterator<Item = &PeerEntry> {
        self.peers
            .iter()
            .filter(move |p| self.is_sibling(p.node_id))
    }
    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The room's timeline as last set (ghost time, clamped).
    pub fn room_timeline(&self) -> Timeline {
        self.room
    }
    /// The timeline as gossiped: the room line re-described from a beat
    /// origin that wins the priority rule.
    pub fn published_timeline(&self) -> Timeline {
        self.published
    }
    /// The start/stop state as gossiped.
    pub fn start_stop(&self) -> StartStopState {
        self.start_stop
    }
    /// The host→ghost transform.
    pub fn ghost_xform(&self) -> GhostXform {
        self.ghost
    }
    /// Our ghost time at host time `now_us`.
    pub fn ghost_time(&self, now_us: i64) -> i64 {
        self.ghost.host_to_ghost(now_us)
    }
    /// The Link apps' ghost clock minus ours now, from our probes
    /// ([`Config::steer_apps`]).
    pub fn app_offset(&self, now_us: i64) -> Option<Estimate> {
        self.clocks.estimate(self.ghost_time(now_us))
    }
    /// Our ghost clock was stepped by `delta_us` (the product moved its transform):
    /// the probes' history moves with it.
    pub fn rebase_app_clocks(&mut self, delta_us: i64) {
        self.clocks.rebase(delta_us);
    }
    /// Known peers (all sessions).
    pub fn peers(&self) -> &[PeerEntry] {
        &self.peers
    }
    /// Number of known peers currently in our session.
    pub fn session_peer_count(&self) -> usize {
        let s = self.session_id();
        self.peers
            .iter()
            .filter(|p| p.state.session_id == Some(s))
            .count()
    }
    /// Whether [`LinkPeer::start`] ran and [`LinkPeer::shutdown`] did not.
    pub fn is_running(&self) -> bool {
        self.started && !self.stopped
    }

    // ----- inputs -----------------------------------------------------------

    /// Start: publish the room timeline and send the first Alive at once
    /// (Ch. 1 §4.1 "immediately when the gateway opens").
    pub fn start(&mut self, now_us: i64) -> Vec<Action> {
        if self.started {
            return Vec::new();
        }
        self.started = true;
        if let Some(playing) = self.cfg.playing {
            if self.start_stop == StartStopState::default() {
                let g = self.ghost_time(now_us);
                self.start_stop = StartStopState {
                    is_playing: playing,
                    beats: self.room.beats_at(g),
                    timestamp: g,
                };
            }
        }
        self.republish(now_us, false);
        self.next_alive_us = now_us;
        self.handle_timeout(now_us)
    }

    /// Stop: multicast a ByeBye (Ch. 1 §4.3). Later inputs are ignored.
    pub fn shutdown(&mut self, _now_us: i64) -> Vec<Action> {
        if !self.is_running() {
            return Vec::new();
        }
        self.stopped = true;
        self.measurements.clear();
        vec![Action::SendMulticast(encode_discovery(&DiscoveryMessage {
            header: DiscoveryHeader {
                kind: DiscoveryKind::ByeBye,
                ttl: 0,
                group_id: 0,
                node_id: self.node_id,
            },
            state: PeerState::default(),
        }))]
    }

    /// Replace the host→ghost transform. Nothing is sent; see the module
    /// docs on why the intercept should stay constant.
    pub fn set_ghost_xform(&mut self, ghost: GhostXform) {
        self.ghost = ghost;
        self.cfg.ghost = ghost;
    }

    /// The room changed: new timeline (tempo, beat origin in µbeats, time
    /// origin in OUR ghost time) and transport state. The timeline is
    /// gossiped with a beat origin that beats every origin seen so far, and
    /// a transport change gets a timestamp later than any seen, so Link peers
    /// adopt both. Returns the Alive if it may be sent now (50 ms spacing).
    pub fn set_timeline(&mut self, now_us: i64, timeline: Timeline, playing: bool) -> Vec<Action> {
        let tl = timeline.clamped();
        let line_changed = !(tl.same_line(&self.room));
        if line_changed {
            self.room = tl;
            self.exact = None;
        }
        if self.started && (line_changed || self.bo_floor > self.published.beat_origin) {
            self.republish(now_us, false);
        } else if !self.started {
            self.published = self.room;
        }
        if playing != self.start_stop.is_playing || self.start_stop == StartStopState::default() {
            let g = self.ghost_time(now_us);
            self.start_stop = StartStopState {
                is_playing: playing,
                beats: self.room.beats_at(g),
                timestamp: g.max(self.start_stop.timestamp.saturating_add(1)),
            };
            self.schedule_alive_soon(now_us);
        }
        if self.is_running() {
            self.handle_timeout(now_us)
        } else {
            Vec::new()
        }
    }

    /// The room changed (or is re-stated: an unchanged state changes nothing).
    /// Like [`LinkPeer::set_timeline`], but with the room's exact line, which
    /// is then re-described from an origin near the present every
    /// [`Config::anchor_beats`] beats (so the wire tempo's rounding never
    /// adds up), and with the room's other lines and next transport change,
    /// which siblings and Link apps may announce without being overruled.
    /// A new line or transport state is gossiped at once, regardless of the
    /// 50 ms spacing: it must reach the apps as it takes effect.
    pub fn set_room(&mut self, now_us: i64, room: &RoomState) -> Vec<Action> {
        self.accepted = room.accepted.clone();
        self.next_transport = room.next_transport;
        let g = self.ghost_time(now_us);
        let mut urgent = false;
        if self.exact != Some(room.line) {
            self.exact = Some(room.line);
            self.room = room.line.at(nearest_whole_beat(room.line.beats_at(g)));
            if self.started {
                self.republish(now_us, false);
            } else {
                self.published = self.room;
            }
            urgent = true;
        }
        if room.playing != self.start_stop.is_playing
            || self.start_stop == StartStopState::default()
        {
            self.start_stop = StartStopState {
                is_playing: room.playing,
                beats: room.line.b0.saturating_mul(MICROBEATS_PER_BEAT),
                timestamp: room
                    .since_us
                    .min(g)
                    .max(self.start_stop.timestamp.saturating_add(1)),
            };
            urgent = true;
        }
        if !self.is_running() {
            return Vec::new();
        }
        if urgent {
            self.next_alive_us = self.next_alive_us.min(now_us);
        }
        self.handle_timeout(now_us)
    }

    /// Handle one received datagram (any socket; dispatched on the frame
    /// magic). `from` is the datagram's source endpoint. Input beyond 512
    /// bytes is truncated, as by the reference's receive buffers.
    pub fn handle_datagram(
        &mut self,
        now_us: i64,
        from: SocketAddrV4,
        bytes: &[u8],
    ) -> Vec<Action> {
        if !self.is_running() {
            return Vec::new();
        }
        let bytes = &bytes[..bytes.len().min(MAX_MESSAGE_SIZE)];
        let mut out = Vec::new();
        self.counters.datagrams += 1;
        let ok = if bytes.starts_with(&MEASUREMENT_MAGIC) {
            self.on_measurement(now_us, from, bytes, &mut out)
        } else if bytes.starts_with(&DISCOVERY_MAGIC) {
            self.on_discovery(now_us, from, bytes, &mut out)
        } else {
            false
        };
        if !ok {
            self.counters.bad += 1;
        }
        // A state change may have made an Alive due right now.
        if now_us >= self.next_alive_us {
            self.send_alive(now_us, &mut out);
        }
        out
    }

    /// Drive timers: periodic Alive, peer pruning, measurement retries.
    pub fn handle_timeout(&mut self, now_us: i64) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.is_running() {
            return out;
        }
        if let Some(p) = self.prune_at() {
            if now_us >= p {
                self.prune(now_us, &mut out);
            }
        }
        let mut i = 0;
        while i < self.measurements.len() {
            if now_us >= self.measurements[i].deadline() {
                let step = self.measurements[i].handle_timeout(now_us);
                if self.apply_step(now_us, i, step, &mut out) {
                    continue;
                }
            }
            i += 1;
        }
        self.maybe_reanchor(now_us);
        if self.cfg.steer_apps {
            let apps: Vec<(NodeId, SocketAddrV4)> = self
                .app_peers()
                .filter_map(|p| p.state.measurement_v4.map(|ep| (p.node_id, ep)))
                .collect();
            self.clocks.set_apps(now_us, apps.into_iter());
            let g = self.ghost_time(now_us);
            for (to, ping) in self.clocks.on_timeout(now_us, g) {
                out.push(Action::SendTo(to, ping));
            }
        }
        if now_us >= self.next_alive_us {
            self.send_alive(now_us, &mut out);
        }
        out
    }

    /// When [`LinkPeer::handle_timeout`] must next be called (host µs), or
    /// `None` when not running.
    pub fn next_timeout(&self) -> Option<i64> {
        if !self.is_running() {
            return None;
        }
        let mut t = self.next_alive_us;
        if let Some(p) = self.prune_at() {
            t = t.min(p);
        }
        for m in &self.measurements {
            t = t.min(m.deadline());
        }
        if let Some(c) = self.clocks.next_timeout() {
            t = t.min(c);
        }
        Some(t)
    }

    // ----- internals --------------------------------------------------------

    fn prune_at(&self) -> Option<i64> {
        self.peers
            .iter()
            .map(|p| p.expires_at_us)
            .min()
            .map(|d| d.saturating_add(self.cfg.prune_padding_us))
    }

    fn prune(&mut self, now_us: i64, out: &mut Vec<Action>) {
        let mut i = 0;
        while i < self.peers.len() {
            if self.peers[i].expires_at_us <= now_us {
                let p = self.peers.remove(i);
                out.push(Action::Event(Event::PeerLeft {
                    node_id: p.node_id,
                    reason: LeaveReason::Expired,
                }));
            } else {
                i += 1;
            }
        }
        self.forget_empty_foreign();
    }

    fn forget_empty_foreign(&mut self) {
        let peers = &self.peers;
        self.foreign.retain(|f| {
            f.status == ForeignStatus::Measuring
                || peers.iter().any(|p| p.state.session_id == Some(f.id))
        });
    }

    fn schedule_alive_soon(&mut self, now_us: i64) {
        let earliest = match self.last_alive_us {
            Some(t) => t.saturating_add(self.cfg.min_broadcast_spacing_us),
            None => now_us,
        };
        self.next_alive_us = self.next_alive_us.min(earliest.max(now_us));
    }

    fn send_alive(&mut self, now_us: i64, out: &mut Vec<Action>) {
        out.push(Action::SendMulticast(
            self.state_message(DiscoveryKind::Alive),
        ));
        self.last_alive_us = Some(now_us);
        self.next_alive_us = now_us.saturating_add(self.cfg.alive_period_us);
    }

    /// Our peer-state message (Ch. 1 §6): tmln, sess, stst, mep4.
    fn state_message(&self, kind: DiscoveryKind) -> Vec<u8> {
        encode_discovery(&DiscoveryMessage {
            header: DiscoveryHeader {
                kind,
                ttl: self.cfg.ttl_s,
                group_id: 0,
                node_id: self.node_id,
            },
            state: PeerState {
                timeline: Some(self.published),
                session_id: Some(self.session_id()),
                start_stop: Some(self.start_stop),
                measurement_v4: Some(self.cfg.measurement_endpoint),
                ..Default::default()
            },
        })
    }

    /// Re-describe the room line from a beat origin that (a) is a multiple
    /// of `anchor_beats`, (b) is strictly greater than every origin seen in
    /// our session, and (c) is not behind the current beat by more than one
    /// anchor (keeps the origin near the present, like Ch. 2 §6 rule 3).
    ///
    /// With an exact line, the origin is the multiple nearest the present
    /// (up to half an anchor ahead), and when a sibling already published
    /// our line from the winning origin we publish exactly that (unless
    /// `reanchor`: moving the origin on is the point).
    fn republish(&mut self, now_us: i64, reanchor: bool) {
        if !reanchor {
            if let (Some(x), Some(top)) = (self.exact, self.top_seen) {
                if top.beat_origin >= self.bo_floor && x.matches(&top) {
                    self.published = top;
                    self.schedule_alive_soon(now_us);
                    return;
                }
            }
        }
        let q = self.cfg.anchor_beats.saturating_mul(MICROBEATS_PER_BEAT);
        let above_floor = div_floor(self.bo_floor, q)
            .saturating_add(1)
            .saturating_mul(q);
        let now_beat = self.room_beats_at(self.ghost_time(now_us));
        let near_now = match self.exact {
            Some(_) => div_floor(now_beat.saturating_add(q / 2), q).saturating_mul(q),
            None => div_floor(now_beat, q).saturating_mul(q),
        };
        // An exact line is re-described from an origin just above the floor when the
        // floor is already past the present's anchor multiple: origins never run ahead
        // of the present (the wire tempo's rounding grows with that distance), however
        // often the room re-describes its line (a steered ghost clock does, every
        // fraction of a second).
        let anchor = match self.exact {
            Some(_) if near_now <= self.bo_floor => self.bo_floor.saturating_add(1),
            _ => above_floor.max(near_now),
        };
        self.published = self.room_at(anchor);
        self.bo_floor = self.bo_floor.max(anchor);
        self.top_seen = Some(self.published);
        self.schedule_alive_soon(now_us);
    }

    /// Move the published origin on once the present is half an anchor past
    /// it, so the wire tempo's rounding never adds up (exact lines only).
    fn maybe_reanchor(&mut self, now_us: i64) {
        let Some(x) = self.exact else { return };
        let q = self.cfg.anchor_beats.saturating_mul(MICROBEATS_PER_BEAT);
        let now_beat = x.beats_at(self.ghost_time(now_us));
        if now_beat.saturating_sub(self.published.beat_origin) >= q / 2 {
            self.room = x.at(nearest_whole_beat(now_beat));
            self.republish(now_us, true);
        }
    }

    fn room_at(&self, origin: i64) -> Timeline {
        match self.exact {
            Some(x) => x.at(origin),
            None => self.room.rebased(origin),
        }
    }

    fn room_beats_at(&self, ghost_us: i64) -> i64 {
        match self.exact {
            Some(x) => x.beats_at(ghost_us),
            None => self.room.beats_at(ghost_us),
        }
    }

    /// Whether `tl` is one of the room's own lines: no Link app's proposal. With
    /// [`Config::steer_apps`], the room's line a step of the steered ghost clock away
    /// is too (a box that has not taken the leader's latest step yet, and apps
    /// relaying either).
    fn is_room_line(&self, tl: &Timeline) -> bool {
        match self.exact {
            Some(x) if self.cfg.steer_apps && x.within(tl, STEP_MAX_US) => true,
            Some(x) => x.matches(tl) || self.accepted.iter().any(|l| l.matches(tl)),
            None => self.room.same_line(tl),
        }
    }

    /// Whether a sibling currently gossips this very timeline (a Link app
    /// relaying it is not proposing anything).
    fn sibling_publishes(&self, tl: &Timeline) -> bool {
        self.sibling_peers()
            .any(|p| p.state.session_id == Some(self.session_id()) && p.state.timeline == Some(*tl))
    }

    /// Whether a start/stop state is the room's own: a sibling gossips it, or
    /// it is the room's next transport state, about to begin.
    fn is_room_transport(&self, now_us: i64, ss: &StartStopState) -> bool {
        let s = self.session_id();
        self.sibling_peers()
            .any(|p| p.state.session_id == Some(s) && p.state.start_stop == Some(*ss))
            || self.next_transport.is_some_and(|(playing, at)| {
                playing == ss.is_playing
                    && self.ghost_time(now_us) >= at.saturating_sub(self.cfg.transition_window_us)
            })
    }

    /// Returns false for a malformed datagram.
    fn on_measurement(
        &mut self,
        now_us: i64,
        from: SocketAddrV4,
        bytes: &[u8],
        out: &mut Vec<Action>,
    ) -> bool {
        let Ok((kind, payload)) = decode_measurement_header(bytes) else {
            return false;
        };
        match kind {
            MeasurementKind::Ping => {
                // Ch. 2 §4.3: stateless; payload ≤ 32 bytes; echo verbatim.
                if payload.len() > MAX_PING_PAYLOAD || decode_measurement_payload(payload).is_err()
                {
                    return false;
                }
                let pong = encode_pong_echo(self.session_id(), self.ghost_time(now_us), payload);
                self.counters.pongs += 1;
                out.push(Action::SendTo(from, pong));
                // an app we probe is re-measuring us
                self.clocks.on_their_ping(now_us, from);
            }
            MeasurementKind::Pong => {
                let Ok(p) = decode_measurement_payload(payload) else {
                    return false;
                };
                // Correlate by source endpoint (allowed by Ch. 2 §4.2 [N]).
                if let Some(i) = self.measurements.iter().position(|m| m.target() == from) {
                    let step = self.measurements[i].handle_pong(now_us, &p);
                    self.apply_step(now_us, i, step, out);
                } else {
                    let g = self.ghost_time(now_us);
                    if let Some(ping) = self.clocks.on_pong(now_us, g, from, &p, self.session_id())
                    {
                        out.push(Action::SendTo(from, ping));
                    }
                }
            }
        }
        true
    }

    /// Returns true when measurement `i` was removed.
    fn apply_step(&mut self, now_us: i64, i: usize, step: Step, out: &mut Vec<Action>) -> bool {
        match step {
            Step::Continue(Some(ping)) => {
                out.push(Action::SendTo(self.measurements[i].target(), ping));
                false
            }
            Step::Continue(None) => false,
            Step::Done { intercept_us } => {
                let m = self.measurements.remove(i);
                let session_id = m.expected_session();
                let delta = intercept_us.saturating_sub(self.ghost.intercept_us);
                // They join us iff (g_ours − g_theirs) > ε, or within ε and
                // our id is the smaller (Ch. 2 §7.2 evaluated from their side).
                let joins_us = delta.saturating_neg() > JOIN_EPSILON_US
                    || (delta.saturating_abs() < JOIN_EPSILON_US && self.session_id() < session_id);
                self.set_foreign(session_id, ForeignStatus::Measured);
                out.push(Action::Event(Event::ForeignSession {
                    session_id,
                    ghost_delta_us: delta,
                    joins_us,
                }));
                true
            }
            Step::Failed(reason) => {
                let m = self.measurements.remove(i);
                let session_id = m.expected_session();
                self.set_foreign(session_id, ForeignStatus::FailedAt(now_us));
                out.push(Action::Event(Event::ForeignSessionMeasurementFailed {
                    session_id,
                    reason,
                }));
                true
            }
        }
    }

    fn set_foreign(&mut self, id: NodeId, status: ForeignStatus) {
        if let Some(f) = self.foreign.iter_mut().find(|f| f.id == id) {
            f.status = status;
        } else {
            self.foreign.push(Foreign { id, status });
        }
    }

    /// Returns false for a malformed datagram.
    fn on_discovery(
        &mut self,
        now_us: i64,
        from: SocketAddrV4,
        bytes: &[u8],
        out: &mut Vec<Action>,
    ) -> bool {
        let Ok((hdr, payload)) = decode_discovery_header(bytes) else {
            return false;
        };
        // Ch. 1 §3 admission: own NodeId and nonzero groupId are dropped.
        if hdr.node_id == self.node_id || hdr.group_id != 0 {
            return true;
        }
        match hdr.kind {
            DiscoveryKind::Alive => {
                // Respond first, whether or not the payload parses (Ch. 1 §4.2).
                out.push(Action::SendTo(
                    from,
                    self.state_message(DiscoveryKind::Response),
                ));
                self.on_peer_state(now_us, from, &hdr, payload, out)
            }
            DiscoveryKind::Response => self.on_peer_state(now_us, from, &hdr, payload, out),
            DiscoveryKind::ByeBye => {
                if let Some(i) = self.peers.iter().position(|p| p.node_id == hdr.node_id) {
                    self.peers.remove(i);
                    out.push(Action::Event(Event::PeerLeft {
                        node_id: hdr.node_id,
                        reason: LeaveReason::ByeBye,
                    }));
                    self.forget_empty_foreign();
                }
                true
            }
        }
    }

    fn on_peer_state(
        &mut self,
        now_us: i64,
        from: SocketAddrV4,
        hdr: &DiscoveryHeader,
        payload: &[u8],
        out: &mut Vec<Action>,
    ) -> bool {
        let Ok(state) = decode_peer_state(payload) else {
            return false;
        };
        let expires = now_us.saturating_add(hdr.ttl as i64 * 1_000_000);
        let session = state.session_id;
        let prev_session = match self.peers.iter_mut().find(|p| p.node_id == hdr.node_id) {
            Some(p) => {
                let prev = p.state.session_id;
                p.addr = from;
                p.state = state.clone();
                p.expires_at_us = expires;
                Some(prev)
            }
            None => {
                if self.peers.len() >= self.cfg.max_peers {
                    // Evict the entry closest to expiry.
                    if let Some((i, _)) = self
                        .peers
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, p)| p.expires_at_us)
                    {
                        let p = self.peers.remove(i);
                        out.push(Action::Event(Event::PeerLeft {
                            node_id: p.node_id,
                            reason: LeaveReason::Evicted,
                        }));
                    }
                }
                self.peers.push(PeerEntry {
                    node_id: hdr.node_id,
                    addr: from,
                    state: state.clone(),
                    expires_at_us: expires,
                });
                out.push(Action::Event(Event::PeerJoined {
                    node_id: hdr.node_id,
                    addr: from,
                    session_id: session,
                }));
                None
            }
        };
        if prev_session != Some(session) {
            self.forget_empty_foreign();
            out.push(Action::Event(Event::PeerSessionChanged {
                node_id: hdr.node_id,
                session_id: session,
                in_our_session: session == Some(self.session_id()),
            }));
        }
        if prev_session != Some(session)
            && session == Some(self.session_id())
            && !self.is_sibling(hdr.node_id)
        {
            // A Link app that joins resets its start/stop state and takes only a
            // later one (Ch. 2 §8 rule 4, and so observed with the real library):
            // re-stamp ours, same state and beat, so it learns the transport.
            let g = self.ghost_time(now_us);
            if self.start_stop.timestamp < g {
                self.start_stop.timestamp = g;
                self.schedule_alive_soon(now_us);
            }
        }
        match session {
            Some(s) if s == self.session_id() => {
                self.check_member_state(now_us, hdr.node_id, &state, out)
            }
            // Another box of the room in a session of its own: it joins ours
            // through the room, never through Link.
            Some(_) if self.is_sibling(hdr.node_id) => {}
            Some(s) => self.consider_foreign(now_us, s, out),
            None => {}
        }
        true
    }

    /// A member of our session gossiped: detect competing timeline / stst.
    /// Siblings, Link apps relaying a sibling, and the room's own scheduled
    /// lines never compete: they only keep our next origin above theirs.
    fn check_member_state(
        &mut self,
        now_us: i64,
        node_id: NodeId,
        state: &PeerState,
        out: &mut Vec<Action>,
    ) {
        let sibling = self.is_sibling(node_id);
        if let Some(tl) = state.timeline {
            // Competes iff it differs and its origin is not lower than ours
            // (a lower origin is stale: that peer will adopt ours).
            if tl != self.published && tl.beat_origin >= self.published.beat_origin {
                if tl.beat_origin > self.bo_floor {
                    self.top_seen = Some(tl);
                }
                self.bo_floor = self.bo_floor.max(tl.beat_origin);
                if sibling || self.is_room_line(&tl) || self.sibling_publishes(&tl) {
                    // Our own line from a higher origin: publish exactly that,
                    // so every box of the room gossips the same timeline.
                    if tl.beat_origin >= self.bo_floor && self.exact.is_some_and(|x| x.matches(&tl))
                    {
                        self.published = tl;
                    }
                } else {
                    let overruled_with = if self.cfg.auto_overrule {
                        self.republish(now_us, false);
                        Some(self.published)
                    } else {
                        None
                    };
                    if overruled_with.is_some() || self.last_remote_timeline != Some(tl) {
                        out.push(Action::Event(Event::RemoteTimelineChange {
                            node_id,
                            timeline: tl,
                            overruled_with,
                        }));
                    }
                    self.last_remote_timeline = Some(tl);
                }
            }
        }
        if let Some(ss) = state.start_stop {
            if ss != self.start_stop
                && ss.timestamp > self.start_stop.timestamp
                && !sibling
                && !self.is_room_transport(now_us, &ss)
            {
                let overruled_with = if self.cfg.auto_overrule {
                    let g = self.ghost_time(now_us);
                    self.start_stop.timestamp = g.max(ss.timestamp).saturating_add(1);
                    self.schedule_alive_soon(now_us);
                    Some(self.start_stop)
                } else {
                    None
                };
                if overruled_with.is_some() || self.last_remote_start_stop != Some(ss) {
                    out.push(Action::Event(Event::RemoteStartStopChange {
                        node_id,
                        state: ss,
                        overruled_with,
                    }));
                }
                self.last_remote_start_stop = Some(ss);
            }
        }
    }

    /// Gossip shows a foreign session: optionally measure it (diagnostic).
    fn consider_foreign(&mut self, now_us: i64, session: NodeId, out: &mut Vec<Action>) {
        if !self.cfg.measure_foreign_sessions {
            return;
        }
        if let Some(f) = self.foreign.iter().find(|f| f.id == session) {
            match f.status {
                ForeignStatus::Measuring | ForeignStatus::Measured => return,
                ForeignStatus::FailedAt(t)
                    if now_us < t.saturating_add(self.cfg.remeasure_backoff_us) =>
                {
                    return
                }
                ForeignStatus::FailedAt(_) => {}
            }
        }
        if self.measurements.len() >= self.cfg.max_measurements {
            return;
        }
        // Target: the founder if visible, else any member (Ch. 2 §7.1).
        let members: Vec<SocketAddrV4> = self
            .peers
            .iter()
            .filter(|p| p.state.session_id == Some(session))
            .filter_map(|p| p.state.measurement_v4.map(|ep| (p.node_id == session, ep)))
            .filter(|(founder, _)| *founder)
            .map(|(_, ep)| ep)
            .collect();
        let target = if let Some(ep) = members.first() {
            *ep
        } else {
            let any: Vec<SocketAddrV4> = self
                .peers
                .iter()
                .filter(|p| p.state.session_id == Some(session))
                .filter_map(|p| p.state.measurement_v4)
                .collect();
            if any.is_empty() {
                return;
            }
            any[(self.rng.next() % any.len() as u64) as usize]
        };
        if self.measurements.iter().any(|m| m.target() == target) {
            return;
        }
        let (m, ping) = Measurement::start(now_us, target, session);
        self.measurements.push(m);
        self.set_foreign(session, ForeignStatus::Measuring);
        out.push(Action::SendTo(target, ping));
    }
}

#[cfg(test)]
mod tests;

/// The whole beat (in µbeats) nearest `ub`.
fn nearest_whole_beat(ub: i64) -> i64 {
    div_floor(
        ub.saturating_add(MICROBEATS_PER_BEAT / 2),
        MICROBEATS_PER_BEAT,
    )
    .saturating_mul(MICROBEATS_PER_BEAT)
}
