//! The room core: which session this node plays, who leads it, and the session clock.
//!
//! Pure: it takes `now` (the node's local perceived ns) and messages, and returns
//! [`Action`]s; it never reads a clock or touches a socket.
//!
//! # Rules
//!
//! * **Sessions.** Every running timeline belongs to a [`SessionId`] (when and by whom
//!   it was started). When groups meet, the *older* session wins: a box that joins a
//!   running room adopts the room's timeline, never the other way round, whatever its
//!   rank. The adopting node switches at a bar boundary of the room's timeline
//!   ([`SWITCH_LEAD_NS`] ahead), stepping its session clock once onto its estimate of
//!   the leader's; that is the only step a playing node's session clock ever takes.
//! * **Leadership.** Among the nodes that play the session and whose clocks are synced,
//!   the highest rank `(priority, id)` leads. Rank decides who leads, not whose
//!   timeline wins. A node that takes over keeps its session clock where it is (frozen
//!   at its current estimate of the old leader's), so nobody's click moves; it bumps
//!   the epoch.
//! * **Following.** A follower maps its local clock to session time with its estimate
//!   of the leader's clock ([`crate::core::sync::Estimator`]), through a [`Slewer`] that never
//!   steps. It adopts the leader's timeline when the leader's `(epoch, version)` is
//!   newer than its own: an older epoch never overwrites a newer one.
//! * **Changes** are scheduled by the leader at a quantized point at least
//!   [`CHANGE_LEAD_NS`] ahead, so every box has them before they apply.
//! * **Setlist and song** are two last-writer-wins records like the pin (the latest
//!   decision wins, whichever group holds it). Peers fetch a later setlist with
//!   `SetlistGet` (it is too big for every announce). Choosing a song is one decision:
//!   it sets the song record where it is made and goes to the leader, which schedules
//!   the song's tempo and meter as one quantized change at the next bar (one new
//!   segment: tempo and meter from the same beat), stamped with that decision.
//!   Choosing a song never starts the transport; `count_in_bars` is carried for the
//!   page (the click has no special count-in sound: a start lands on a bar, so bar 1
//!   of the count-in is accented like every bar).
//! * **Cues** are a merged log with one order; see `cues.rs` for the rule.

use crate::core::cues::{self, Cue, CueError, CueLog, Song};
use crate::core::decision::{Hlc, Stamp};
use crate::core::sync::{Estimate, Estimator, Sample, SampleVerdict, Slewer, SyncConfig};
use crate::core::time::SessionMap;
use crate::core::timeline::{Change, ChangeKind, Quantum, Scheduled, Timeline, TimelineError};
use crate::core::wire::{
    Announce, ChangeRequest, Frame, PinRequest, SessionId, SetlistRecord, SongPick, SongRequest,
};
use std::collections::BTreeMap;

/// A change lands at least this far ahead (network propagation to every box).
pub const CHANGE_LEAD_NS: i64 = 200_000_000;
/// A joining box switches at the first downbeat (or beat, see [`YOUNG_NS`]) at least
/// this far ahead.
pub const SWITCH_LEAD_NS: i64 = 200_000_000;
/// …and publishes the switch this long before that beat (more than any audio buffer's
/// latency).
pub const PUBLISH_AHEAD_NS: i64 = 120_000_000;

/// How far ahead of "now" a box alone starts its transport (`--play`, a restored
/// playing session): enough for the audio stream to open and its frame clock to lock
/// (see `audio::frameclock`) and for a running room to be found first (then the start
/// is held, see `Room::hold_first_click`), well inside the 1 s start-to-first-click
/// target.
pub const START_LEAD_NS: i64 = 750_000_000;

/// How far ahead a held start is played after all when the join it waited for is
/// called off (see `Room::hold_first_click`).
pub const HELD_START_LEAD_NS: i64 = 500_000_000;
/// A box that started less than this ago joins at the next *beat* rather than the next
/// bar: it has only just begun clicking on its own, and the room should hear it within
/// a second. Established groups (a healed partition) always change at a bar.
pub const YOUNG_NS: i64 = 5_000_000_000;
/// Heartbeat: every node announces itself this often.
pub const ANNOUNCE_EVERY_NS: i64 = 100_000_000;
/// A peer not heard from for this long is presumed gone (for leadership).
pub const LOSS_NS: i64 = 350_000_000;
/// A follower whose clock is this far from its leader's (a healed partition) realigns
/// with one step at a bar boundary instead of slewing for seconds.
pub const REALIGN_NS: i64 = 5_000_000;

#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub me: String,
    pub name: String,
    pub priority: i32,
    pub quantum: Quantum,
    /// Wall clock minus the local clock, ns, read once by the driver at start: the
    /// physical part of decision stamps (see `decision.rs`; it may be hours off).
    pub wall_offset_ns: i64,
}

/// The estimator the room uses (pings arrive at 40 Hz; see `sync.rs` for the window).
pub fn sync_config() -> SyncConfig {
    // 2048 samples: 51 s of 40 Hz pings. Over a jittery path the corridor's accuracy
    // grows with the samples it holds (impaired lab: followers within ±200 µs of the
    // leader once the window fills, against ±400 µs with 512).
    SyncConfig {
        window: 2048,
        ..SyncConfig::default()
    }
}

/// The slewer the room uses: corrections of at most 200 ppm, so that a click interval
/// never moves by more than 100 µs at 120 BPM while the clock is pulled in.
pub fn slew_config() -> crate::core::sync::SlewConfig {
    crate::core::sync::SlewConfig {
        max_slew_ppm: 200.0,
        ..Default::default()
    }
}

/// Something the driver should log.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    BecameLeader {
        epoch: u64,
    },
    Following {
        leader: String,
        epoch: u64,
    },
    /// This node adopted the room's session at `beat`, stepping its clock once.
    Joined {
        leader: String,
        beat: i64,
        step_ns: i64,
    },
    WaitingForClock {
        leader: String,
    },
    Scheduled {
        change: ChangeKind,
        at: Scheduled,
    },
    ChangeRefused {
        reason: String,
    },
    StaleAnnounce {
        from: String,
    },
    /// The leader applied a pin (or an unpin: `None`).
    Pinned {
        node: Option<String>,
    },
    /// A pin request went to the leader.
    PinRelayed {
        to: String,
    },
    /// Groups met and a record took the latest decision: `record` ("timeline", "pin"),
    /// from the peer `from`, with its stamp; `adopted` false when ours was kept.
    Merged {
        record: &'static str,
        from: String,
        stamp: Stamp,
    },
    /// A peer's stamp was refused (its clock is out of reach of ours).
    StampRefused {
        from: String,
        reason: String,
    },
    /// Same session, but this node's grid or clock was off (a healed partition): it
    /// stepped once at a bar boundary.
    Realigned {
        leader: String,
        beat: i64,
        step_ns: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send to every authenticated peer.
    Broadcast(Frame),
    /// Send to one peer.
    Send {
        to: String,
        frame: Frame,
    },
    /// Hand the audio thread a new timeline / session map.
    Publish {
        timeline: Timeline,
        map: SessionMap,
        epoch: u64,
        clock_gen: u64,
    },
    Note(Note),
    /// Save this (atomically, off the clock loop).
    Persist(Persisted),
    /// The room's control PIN changed (`None`: open): phones now need this one.
    ControlPin(Option<String>),
    /// A cue is new here, or its seq, text or deletion changed: tell the phones.
    Cue(Cue),
    /// The setlist or the current song changed (phones' snapshots).
    Setlist {
        songs: Vec<Song>,
        song: Option<u16>,
    },
    /// Save the cue log (at most once a second, off the clock loop).
    PersistCues {
        cues: Vec<Cue>,
        floor: u64,
    },
}

struct Peer {
    name: String,
    announce: Option<Announce>,
    /// Our estimate of the peer's *local* clock (a straight line: it never slews or
    /// steps), from clock exchanges with it.
    est: Estimator,
    /// The peer's session map (its local → session) from its newest answer, and that
    /// answer's time on the peer's local clock (answers arrive out of order).
    map: Option<(i64, SessionMap)>,
    last_heard: i64,
    /// The peer's process (see [`Room::peer_up`]).
    boot: u64,
    /// When we last sent it our cue inventory, and asked for its setlist.
    cue_sync_at: i64,
    setlist_asked_at: i64,
}

impl Peer {
    fn leads(&self) -> bool {
        self.announce.as_ref().is_some_and(|a| a.leading)
    }

    /// The peer's session clock as we see it: our estimate of its local clock, then
    /// its map. A peer whose map slews (a follower), steps (it joined a session) or is
    /// taken over (it became leader) is read at once through the new map; the
    /// estimate of its local clock, as old as the connection, stays valid.
    fn clock(&self) -> Option<(Estimate, SessionMap)> {
        let est = self.est.estimate()?;
        let (_, map) = self.map?;
        Some((est, est.map.then(&map)))
    }
}

/// A peer frame that has no place in the room (see [`Room::handle_frame`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected frame: {0}")]
pub struct FrameRefused(pub &'static str);

struct Switch {
    session: SessionId,
    leader: String,
    /// The beat to switch at; `None` while waiting for a mature clock estimate.
    beat: Option<i64>,
    /// The room's (epoch, version) the beat was computed from.
    basis: (u64, u64),
}

/// A node's role in its room, as `status` and `/health` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
    /// A peer that has not announced itself yet.
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status object of `bandsync status --json`, `/health` and `status.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub node: String,
    pub name: String,
    pub role: Role,
    pub leader: String,
    pub epoch: u64,
    pub pinned: Option<String>,
    pub playing: bool,
    pub tempo: f64,
    pub meter: u8,
    pub synced: bool,
    pub session_ns: i64,
    pub beat: f64,
    pub peers: Vec<PeerStatus>,
    /// The decision that made the current timeline (`ms` its wall time on the box that
    /// made it, `node` that box; all zero/empty for a first boot's defaults).
    #[serde(default)]
    pub decided: Stamp,
    /// Ableton Link on this box (filled in by the node).
    #[serde(default)]
    pub link: LinkInfo,
    /// The control PIN: only in answers to the authenticated CLI (`bandsync status`),
    /// never on `/health`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_pin: Option<String>,
    /// Who may change the room from a phone: "pin" or "open".
    #[serde(default)]
    pub control: String,
    /// The Redis mirror: "connected", "stale" or "off" (filled in by the node).
    #[serde(default = "off")]
    pub redis: String,
    /// Where phones open the page (`http://<name>.local:<port>/`), when HTTP runs.
    #[serde(default)]
    pub phone_url: Option<String>,
    /// The secure phone page (`https://<name>.local:<port>/`), when HTTPS runs.
    #[serde(default)]
    pub https_url: Option<String>,
    /// SHA-256 of the HTTPS certificate (`AB:CD:…`), what a phone shows to accept it.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// The current song of the setlist, if one is chosen.
    #[serde(default)]
    pub song: Option<SongStatus>,
}

/// `song` of the status: 1-based `index`, its `title`, and the setlist's `count`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SongStatus {
    pub index: u16,
    pub title: String,
    pub count: u16,
}

fn off() -> String {
    "off".into()
}

/// `link` of the status: is this box a Link peer, and how many Link apps it sees.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkInfo {
    pub enabled: bool,
    pub peers: u64,
}

/// Per-peer figures for `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub name: String,
    pub rtt_us: Option<i64>,
    pub offset_us: Option<i64>,
    pub uncertainty_us: Option<i64>,
    pub role: Role,
    pub synced: bool,
    pub alive: bool,
}

pub struct Room {
    cfg: RoomConfig,
    session: SessionId,
    epoch: u64,
    version: u64,
    timeline: Timeline,
    leader: String,
    leading: bool,
    synced: bool,
    map: SessionMap,
    clock_gen: u64,
    slewer: Slewer,
    peers: BTreeMap<String, Peer>,
    switch: Option<Switch>,
    last_announce: i64,
    dirty: bool,
    publish: bool,
    next_req: u64,
    /// When this node last adopted a session (it may lead only after [`SETTLE_NS`]).
    joined_at: i64,
    /// First tick (local ns).
    started_at: Option<i64>,
    /// The start this box was about to play alone, held while it joins a running room
    /// it found before its first click (see [`Room::hold_first_click`]).
    held: Option<(crate::core::timeline::Tempo, crate::core::timeline::Meter)>,
    pinned: Option<String>,
    /// Rate of the leader's clock as last estimated (kept when this node takes over).
    followed_rate: Option<i64>,
    /// The leader whose records (timeline, pin) this node last adopted.
    adopted_from: Option<String>,
    /// The leader's grid or clock differs from ours: realign at its next bar.
    realign: bool,
    persist: bool,
    /// The decision that made the timeline, and the one that made the pin.
    decided: Stamp,
    pin_decided: Stamp,
    /// The room's control PIN for phones (`None`: the room opted out, control is open),
    /// a last-writer-wins record like the pin.
    control_pin: Option<String>,
    control_decided: Stamp,
    hlc: Hlc,
    /// A node moving onto a peer's newer decision at a bar of the peer's timeline.
    merge: Option<Merge>,
    /// Clock estimates of peers that disconnected, by id: (boot, estimator, map).
    parked: BTreeMap<String, (u64, Estimator, Option<(i64, SessionMap)>)>,
    setlist: Vec<Song>,
    setlist_decided: Stamp,
    song: Option<u16>,
    song_decided: Stamp,
    cues: CueLog,
    /// The cue log changed since it was last saved (saved at most once a second).
    cues_dirty: bool,
    cues_saved_at: i64,
    /// The room's Link ghost clock shift (ns): steered by the leader from its Link
    /// apps' clocks, taken from the leader by its followers (`core::link::steer`).
    link_shift_ns: i64,
}

/// Disconnected peers whose clock estimates are kept.
const MAX_PARKED: usize = 32;

/// A pending adoption, by the leader, of a same-session peer's newer timeline.
struct Merge {
    from: String,
    beat: i64,
    stamp: Stamp,
}

/// What a node keeps on disk so a box alone (or a whole room after a power cut) comes
/// back with the session it had.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Persisted {
    pub tempo: crate::core::timeline::Tempo,
    pub meter: crate::core::timeline::Meter,
    pub playing: bool,
    pub pinned: Option<String>,
    pub epoch: u64,
    /// The decision that made the timeline (older files: the default).
    #[serde(default)]
    pub decided: Stamp,
    #[serde(default)]
    pub pin_decided: Stamp,
    /// The room's control PIN (`None`: open) and the decision that set it.
    #[serde(default)]
    pub control_pin: Option<String>,
    #[serde(default)]
    pub control_decided: Stamp,
    /// The box's hybrid logical clock, so a decision after a restart is later than
    /// every one it had seen.
    #[serde(default)]
    pub hlc: Hlc,
    /// The setlist and the current song (0-based), with their decisions.
    #[serde(default)]
    pub setlist: Vec<Song>,
    #[serde(default)]
    pub setlist_decided: Stamp,
    #[serde(default)]
    pub song: Option<u16>,
    #[serde(default)]
    pub song_decided: Stamp,
}

/// The cue log on disk (`cues.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PersistedCues {
    #[serde(default)]
    pub cues: Vec<Cue>,
    #[serde(default)]
    pub floor: u64,
}

/// A node that joined a session follows for at least this long, and until its estimate
/// of the leader's clock has [settled](crate::core::sync::Estimate::settled), before it counts
/// as synced (and so may lead): a node that takes over hands its estimate of the old
/// leader's clock to the whole room. On a jittery (Wi-Fi) path that takes ~20 s.
pub const SETTLE_NS: i64 = 10_000_000_000;
/// A pinned node that just joined leads after this much following (its estimate of the
/// old leader's clock becomes the room's).
pub const PIN_SETTLE_NS: i64 = 2_000_000_000;

impl Room {
    /// A node alone: it leads its own new session, whose clock is its local clock.
    pub fn new(cfg: RoomConfig, session: SessionId, timeline: Timeline) -> Room {
        Room {
            leader: cfg.me.clone(),
            cfg,
            session,
            epoch: 1,
            version: 0,
            timeline,
            leading: true,
            synced: true,
            map: SessionMap::IDENTITY,
            clock_gen: 0,
            slewer: {
                let mut s = Slewer::new(slew_config());
                s.adopt(SessionMap::IDENTITY);
                s
            },
            peers: BTreeMap::new(),
            switch: None,
            last_announce: i64::MIN / 2,
            dirty: true,
            publish: true,
            next_req: 1,
            joined_at: i64::MIN / 2,
            started_at: None,
            held: None,
            pinned: None,
            followed_rate: None,
            adopted_from: None,
            realign: false,
            // save the session a box starts with, so a power cut brings it back (playing)
            persist: true,
            decided: Stamp::DEFAULT,
            pin_decided: Stamp::DEFAULT,
            control_pin: None,
            control_decided: Stamp::DEFAULT,
            hlc: Hlc::default(),
            merge: None,
            parked: BTreeMap::new(),
            setlist: Vec::new(),
            setlist_decided: Stamp::DEFAULT,
            song: None,
            song_decided: Stamp::DEFAULT,
            cues: CueLog::default(),
            cues_dirty: false,
            cues_saved_at: i64::MIN / 2,
            link_shift_ns: 0,
        }
    }

    /// Restore the decisions (from disk, or the start flags) before the first tick.
    pub fn set_decided(&mut self, timeline: Stamp, pin: Stamp, hlc: Hlc) {
        self.hlc = hlc;
        let now_ms = hlc.ms;
        for s in [&timeline, &pin] {
            let _ = self.hlc.observe(s, now_ms.max(s.ms));
        }
        self.decided = timeline;
        self.pin_decided = pin;
    }
    /// The stamp of the timeline's decision.
    pub fn decided(&self) -> &Stamp {
        &self.decided
    }
    pub fn pin_decided(&self) -> &Stamp {
        &self.pin_decided
    }

    /// Set the control PIN this box starts with (its own, the flag's, or the saved
    /// room's) and the decision that made it; the room then keeps the latest.
    pub fn set_control_pin(&mut self, pin: Option<String>, stamp: Stamp) {
        self.control_pin = pin;
        self.control_decided = stamp;
    }
    /// The room's control PIN (`None`: control from phones is open).
    pub fn control_pin(&self) -> Option<&str> {
        self.control_pin.as_deref()
    }
    pub fn hlc(&self) -> Hlc {
        self.hlc
    }

    /// This box's wall clock in ms (the physical part of its stamps).
    fn phys_ms(&self, now: i64) -> u64 {
        (now.saturating_add(self.cfg.wall_offset_ns) / 1_000_000).max(0) as u64
    }

    /// Stamp a decision made at this box now.
    pub fn decide(&mut self, now: i64) -> Stamp {
        let p = self.phys_ms(now);
        self.hlc.issue(p, &self.cfg.me)
    }

    /// Take in a peer's stamp; false (with a note) when its clock is out of reach.
    fn observe(&mut self, from: &str, s: &Stamp, now: i64, out: &mut Vec<Action>) -> bool {
        let p = self.phys_ms(now);
        match self.hlc.observe(s, p) {
            Ok(()) => true,
            Err(e) => {
                out.push(Action::Note(Note::StampRefused {
                    from: from.to_string(),
                    reason: e.to_string(),
                }));
                false
            }
        }
    }

    /// Restore the epoch (from disk) before the first tick, so a restarted leader's
    /// records are never older than the ones it wrote before (Redis fencing). Values
    /// beyond 2⁵³ (a corrupt file) are ignored.
    pub fn restore_epoch(&mut self, epoch: u64) {
        if epoch <= crate::core::wire::MAX_COUNTER {
            self.epoch = self.epoch.max(epoch);
        }
    }

    /// Restore the pin (from disk) before the first tick.
    /// A leader refused by an outside record of a newer epoch (the Redis mirror's
    /// fence, after a restart or a takeover it did not see) takes an epoch of at least
    /// `min`, so its records win again; announced and persisted at the next tick.
    /// Nothing for a follower, nor when the epoch already is `min` or more. Returns
    /// whether the epoch moved.
    pub fn outbid_epoch(&mut self, min: u64) -> bool {
        if !self.leading || min <= self.epoch || min > crate::core::wire::MAX_COUNTER {
            return false;
        }
        self.epoch = min;
        self.dirty = true;
        self.publish = true;
        self.persist = true;
        true
    }

    pub fn set_pinned(&mut self, pinned: Option<String>) {
        self.pinned = pinned;
    }
    pub fn pinned(&self) -> Option<&str> {
        self.pinned.as_deref()
    }

    fn is_alive(&self, p: &Peer, now: i64) -> bool {
        now - p.last_heard <= LOSS_NS
    }

    fn rank_of<'a>(&self, id: &'a str, priority: i32) -> (bool, i32, &'a str) {
        (self.pinned.as_deref() == Some(id), priority, id)
    }

    /// Resolve a node given by id or name.
    pub fn resolve(&self, who: &str) -> Option<String> {
        if who == self.cfg.me || who == self.cfg.name {
            return Some(self.cfg.me.clone());
        }
        if self.peers.contains_key(who) {
            return Some(who.to_string());
        }
        let by_name: Vec<&String> = self
            .peers
            .iter()
            .filter(|(_, p)| p.name == who)
            .map(|(id, _)| id)
            .collect();
        match by_name.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    }

    /// Pin (or unpin with `None`) a node by id: a decision, stamped here. Applied by the
    /// leader, relayed otherwise.
    pub fn request_pin(&mut self, id: Option<String>, now: i64, out: &mut Vec<Action>) {
        let stamp = self.decide(now);
        self.pin_with(PinRequest { node: id, stamp }, out);
    }

    fn pin_with(&mut self, req: PinRequest, out: &mut Vec<Action>) {
        if self.leading {
            if req.stamp > self.pin_decided {
                self.pin_decided = req.stamp;
                self.persist = true;
                if self.pinned != req.node {
                    self.pinned = req.node.clone();
                    self.version += 1;
                    self.dirty = true;
                    out.push(Action::Note(Note::Pinned { node: req.node }));
                }
            }
        } else {
            out.push(Action::Note(Note::PinRelayed {
                to: self.leader.clone(),
            }));
            out.push(Action::Send {
                to: self.leader.clone(),
                frame: Frame::Pin(req),
            });
        }
    }

    pub fn session_now(&self, now: i64) -> i64 {
        self.map.to_session(now)
    }
    pub fn map(&self) -> SessionMap {
        self.map
    }
    pub fn clock_gen(&self) -> u64 {
        self.clock_gen
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn leader(&self) -> &str {
        &self.leader
    }
    /// Switching to another session (a better one met: a join or a heal) — about to
    /// follow its leader, so not the room's voice meanwhile (e.g. to Redis).
    pub fn joining(&self) -> bool {
        self.switch
            .as_ref()
            .is_some_and(|sw| sw.session != self.session)
    }
    pub fn leading(&self) -> bool {
        self.leading
    }
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }
    pub fn session(&self) -> SessionId {
        self.session
    }
    pub fn version(&self) -> u64 {
        self.version
    }

    /// A peer connected. `boot` identifies the peer's process: when the same process
    /// comes back (a healed partition, a dropped connection), its clock estimate is
    /// still valid (local clocks are straight lines) and is kept, so a healed room
    /// realigns at once instead of waiting for a new estimate to mature.
    pub fn peer_up(&mut self, id: &str, name: &str, boot: u64) {
        if !self.peers.contains_key(id) {
            let (est, map) = match self.parked.remove(id).filter(|p| p.0 == boot) {
                Some((_, est, map)) => (est, map),
                None => (Estimator::new(sync_config()), None),
            };
            self.peers.insert(
                id.to_string(),
                Peer {
                    name: name.to_string(),
                    announce: None,
                    est,
                    map,
                    last_heard: i64::MIN / 2,
                    boot,
                    cue_sync_at: i64::MIN / 2,
                    setlist_asked_at: i64::MIN / 2,
                },
            );
        }
        self.dirty = true;
    }

    pub fn peer_down(&mut self, id: &str) {
        if let Some(p) = self.peers.remove(id) {
            if self.parked.len() >= MAX_PARKED {
                // bounded: forget the smallest id (any will do; peers come back fast)
                let first = self.parked.keys().next().cloned();
                if let Some(k) = first {
                    self.parked.remove(&k);
                }
            }
            self.parked.insert(id.to_string(), (p.boot, p.est, p.map));
        }
        if self.switch.as_ref().is_some_and(|s| s.leader == id) {
            self.switch = None;
        }
    }

    pub fn peer_ids(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    /// A clock exchange with `id` completed: `s` in our and the peer's local clocks,
    /// `map` the peer's session map when it answered (at its local time `s.t3`).
    pub fn on_pong(&mut self, id: &str, s: Sample, map: SessionMap) -> Option<SampleVerdict> {
        let p = self.peers.get_mut(id)?;
        p.last_heard = p.last_heard.max(s.t4);
        if p.map.is_none_or(|(at, _)| s.t3 >= at) {
            p.map = Some((s.t3, map));
        }
        Some(p.est.handle_sample(s))
    }

    pub fn on_announce(&mut self, from: &str, a: Announce, now: i64, out: &mut Vec<Action>) {
        if !self.peers.contains_key(from) {
            return;
        }
        // Stamps from a clock out of reach are refused: the peer still counts as alive
        // (it clicks with the room), but none of its records can win here.
        let stamps_ok = self.observe(from, &a.decided, now, out)
            && self.observe(from, &a.pin_decided, now, out)
            && self.observe(from, &a.control_decided, now, out)
            && self.observe(from, &a.setlist_decided, now, out)
            && self.observe(from, &a.song_decided, now, out);
        let p = self.peers.get_mut(from).expect("checked above");
        p.last_heard = now;
        // The Link ghost clock is the leader's (it steers it; not a decision).
        if !self.leading && from == self.leader && a.leading && a.session == self.session {
            self.link_shift_ns = a.link_shift_ns;
        }
        // A follower takes its leader's records when they are newer — also from an
        // announce in which the leader just stepped down for a pin it set. From a
        // leader we had not followed before (a healed partition), its records win at an
        // equal epoch too — unless we hold a later decision: then the leader adopts
        // ours (see `merge_target`) and we wait for it.
        let adopt = !self.leading
            && from == self.leader
            && a.session == self.session
            && stamps_ok
            && a.decided >= self.decided
            && ((a.epoch, a.version) > (self.epoch, self.version)
                || (a.epoch == self.epoch && self.adopted_from.as_deref() != Some(from)));
        let stale =
            a.leading && a.session == self.session && a.epoch < self.epoch && from == self.leader;
        // The pin is a last-writer-wins register: the latest decision wins on every box
        // of the session, whoever holds it (so two leaders after a heal rank alike).
        let pin_wins =
            a.pin_decided > self.pin_decided || (adopt && a.pin_decided == self.pin_decided);
        if a.session == self.session && stamps_ok && pin_wins {
            if a.pin_decided > self.pin_decided {
                out.push(Action::Note(Note::Merged {
                    record: "pin",
                    from: from.to_string(),
                    stamp: a.pin_decided.clone(),
                }));
            }
            self.pin_decided = a.pin_decided.clone();
            if self.pinned != a.pinned {
                self.pinned = a.pinned.clone();
                self.dirty = true;
            }
            self.persist = true;
        }
        // The control PIN: last writer wins, like the pin.
        let control_wins = a.control_decided > self.control_decided
            || (adopt && a.control_decided == self.control_decided);
        if a.session == self.session
            && stamps_ok
            && control_wins
            && a.control_pin != self.control_pin
        {
            self.control_pin = a.control_pin.clone();
            self.control_decided = a.control_decided.clone();
            self.persist = true;
            self.dirty = true;
            out.push(Action::ControlPin(self.control_pin.clone()));
        } else if a.session == self.session && stamps_ok && control_wins {
            self.control_decided = a.control_decided.clone();
        }
        let mut kept = a.clone();
        if !stamps_ok {
            (kept.decided, kept.pin_decided, kept.control_decided) =
                (Stamp::DEFAULT, Stamp::DEFAULT, Stamp::DEFAULT);
        }
        p.announce = Some(kept);
        if stamps_ok {
            self.sync_records(from, &a, now, out);
        }
        if adopt {
            if let Some(tl) = Timeline::from_segments(&a.timeline) {
                let s_now = self.map.to_session(now);
                // A leader's update only changes the future; a grid that differs now or
                // two seconds ago is another grid (a healed partition).
                let same = same_grid(&self.timeline, &tl, s_now);
                // The leader moving onto another grid at a bar still ahead (it merged a
                // later decision): move with it, at the same bar.
                let with_leader = !same
                    && begins_ahead(&tl, s_now)
                    && self.peers[from]
                        .clock()
                        .is_some_and(|(_, t)| (t.to_session(now) - s_now).abs() <= REALIGN_NS);
                if same || with_leader {
                    if with_leader {
                        self.clock_gen += 1;
                        out.push(Action::Note(Note::Realigned {
                            leader: from.to_string(),
                            beat: tl.segments()[0].b0,
                            step_ns: 0,
                        }));
                    }
                    self.timeline = tl;
                    self.epoch = a.epoch;
                    self.version = a.version;
                    self.decided = a.decided.clone();
                    self.adopted_from = Some(from.to_string());
                    self.publish = true;
                    self.persist = true;
                } else {
                    // The leader's grid is not ours (a healed partition, or the leader
                    // moved onto a later decision): realign at a bar boundary rather
                    // than jump now; the timeline comes with the realign. The leadership
                    // term is the leader's at once (status shows one leader, one epoch).
                    self.realign = true;
                    if a.epoch > self.epoch {
                        self.epoch = a.epoch;
                        self.dirty = true;
                    }
                }
            }
        } else if stale {
            out.push(Action::Note(Note::StaleAnnounce {
                from: from.to_string(),
            }));
        }
    }

    /// A change asked of this node (CLI, phone): a decision, stamped here.
    pub fn request_change(
        &mut self,
        kind: ChangeKind,
        quantum: Option<Quantum>,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<Option<Scheduled>, TimelineError> {
        let stamp = self.decide(now);
        self.change_with(kind, quantum, stamp, now, out)
    }

    fn change_with(
        &mut self,
        kind: ChangeKind,
        quantum: Option<Quantum>,
        stamp: Stamp,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<Option<Scheduled>, TimelineError> {
        if self.leading {
            let at = self.timeline.schedule(
                Change {
                    kind,
                    quantum: quantum.unwrap_or(self.cfg.quantum),
                },
                self.session_now(now),
                CHANGE_LEAD_NS,
            )?;
            self.decided = self.decided.clone().max(stamp);
            self.version += 1;
            self.dirty = true;
            self.publish = true;
            self.persist = true;
            out.push(Action::Note(Note::Scheduled { change: kind, at }));
            Ok(Some(at))
        } else {
            let id = self.next_req;
            self.next_req += 1;
            out.push(Action::Send {
                to: self.leader.clone(),
                frame: Frame::Change(ChangeRequest {
                    id,
                    kind,
                    quantum,
                    stamp,
                }),
            });
            Ok(None)
        }
    }

    /// A follower relayed a pin to us.
    pub fn on_pin(&mut self, from: &str, req: PinRequest, now: i64, out: &mut Vec<Action>) {
        if !self.observe(from, &req.stamp, now, out) {
            return;
        }
        if self.leading {
            self.pin_with(req, out);
        } else if from != self.leader {
            out.push(Action::Send {
                to: self.leader.clone(),
                frame: Frame::Pin(req),
            });
        }
    }

    /// The SPEC §5 status object.
    pub fn status(&self, now: i64) -> Status {
        let seg = *self.timeline.current(self.session_now(now));
        Status {
            node: self.cfg.me.clone(),
            name: self.cfg.name.clone(),
            role: if self.leading {
                Role::Leader
            } else {
                Role::Follower
            },
            leader: self.leader.clone(),
            epoch: self.epoch,
            pinned: self.pinned.clone(),
            playing: seg.playing,
            tempo: seg.tempo.bpm(),
            meter: seg.meter.get(),
            synced: self.synced,
            session_ns: self.session_now(now),
            beat: self.timeline.beat_at(self.session_now(now)).as_f64(),
            peers: self.peer_status(now),
            decided: self.decided.clone(),
            link: LinkInfo::default(),
            control_pin: None,
            control: if self.control_pin.is_some() {
                "pin"
            } else {
                "open"
            }
            .into(),
            redis: off(),
            phone_url: None,
            song: self.song_status(),
            https_url: None,
            cert_sha256: None,
        }
    }

    /// An authenticated peer's frame: the one dispatch the mesh driver and the
    /// simulation share. Frames that have no place between peers (a second `Hello`, a
    /// CLI's `Query` or `Reply`) are refused with [`FrameRefused`] and change nothing;
    /// `Bye` only ends the peer's liveness early.
    pub fn handle_frame(
        &mut self,
        from: &str,
        frame: Frame,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), FrameRefused> {
        match frame {
            Frame::Announce(a) => self.on_announce(from, a, now, out),
            Frame::Pin(req) => self.on_pin(from, req, now, out),
            Frame::Change(req) => self.on_change(from, req, now, out),
            Frame::SetlistGet => out.push(Action::Send {
                to: from.to_string(),
                frame: Frame::Setlist(SetlistRecord {
                    songs: self.setlist.clone(),
                    decided: self.setlist_decided.clone(),
                }),
            }),
            Frame::Setlist(r) => self.on_setlist(from, r, now, out),
            Frame::Song(r) => self.on_song(from, r, now, out),
            Frame::Cues(v) => self.on_cues(from, v, now, out),
            Frame::CueHave(inv) => {
                let v = self.cues.missing_from(&inv);
                if !v.is_empty() {
                    out.push(Action::Send {
                        to: from.to_string(),
                        frame: Frame::Cues(v),
                    });
                }
            }
            Frame::Bye(_) => {
                // gone for leadership at once; the connection's end removes it
                if let Some(p) = self.peers.get_mut(from) {
                    p.last_heard = i64::MIN / 2;
                    self.dirty = true;
                }
            }
            Frame::Hello(_) => return Err(FrameRefused("a second Hello")),
            Frame::Query(_) => return Err(FrameRefused("a CLI Query from a peer")),
            Frame::Reply(_) => return Err(FrameRefused("a CLI Reply from a peer")),
            Frame::Rtc(_) => return Err(FrameRefused("talkback signalling (the node routes it)")),
        }
        Ok(())
    }

    /// A follower relayed a change to us.
    pub fn on_change(&mut self, from: &str, req: ChangeRequest, now: i64, out: &mut Vec<Action>) {
        if !self.observe(from, &req.stamp, now, out) {
            return;
        }
        if !self.leading {
            // not (or no longer) the leader: pass it on, once
            if from != self.leader {
                out.push(Action::Send {
                    to: self.leader.clone(),
                    frame: Frame::Change(req),
                });
            }
            return;
        }
        if let Err(e) = self.change_with(req.kind, req.quantum, req.stamp, now, out) {
            out.push(Action::Note(Note::ChangeRefused {
                reason: e.to_string(),
            }));
        }
    }

    fn announce(&self) -> Announce {
        Announce {
            session: self.session,
            epoch: self.epoch,
            leader: self.leader.clone(),
            leading: self.leading,
            synced: self.synced,
            priority: self.cfg.priority,
            timeline: self.timeline.segments().to_vec(),
            version: self.version,
            pinned: self.pinned.clone(),
            decided: self.decided.clone(),
            pin_decided: self.pin_decided.clone(),
            control_pin: self.control_pin.clone(),
            control_decided: self.control_decided.clone(),
            setlist_decided: self.setlist_decided.clone(),
            song: self.song,
            song_decided: self.song_decided.clone(),
            cues: self.cues.summary(),
            link_shift_ns: self.link_shift_ns,
        }
    }

    /// The room's Link ghost clock shift, ns.
    pub fn link_shift_ns(&self) -> i64 {
        self.link_shift_ns
    }

    /// Step the room's Link ghost clock: from `base` (the shift the step was measured
    /// against) to `new`. Only the leader steers, and only from the shift it holds
    /// (a step measured against an older shift is dropped); returns whether it took.
    pub fn steer_link(&mut self, base: i64, new: i64) -> bool {
        if !self.leading
            || base != self.link_shift_ns
            || new.unsigned_abs() > crate::core::wire::MAX_LINK_SHIFT_NS as u64
        {
            return false;
        }
        self.link_shift_ns = new;
        self.dirty = true;
        true
    }

    /// The best session any live peer leads, with its leader, if older than ours.
    fn better_session(&self, now: i64) -> Option<(SessionId, String)> {
        use std::cmp::Reverse;
        // Groups meet: the session holding the latest decision wins (a default is
        // older than any decision); between equal decisions, the older session
        // ("joining never disturbs the room").
        let mine = (&self.decided, Reverse(self.session));
        let mut best: Option<((&Stamp, Reverse<SessionId>), (u64, (bool, i32, &str)))> = None;
        for (id, p) in &self.peers {
            let Some(a) = &p.announce else { continue };
            if !a.leading || a.session == self.session || !self.is_alive(p, now) {
                continue;
            }
            let theirs = (&a.decided, Reverse(a.session));
            if theirs <= mine {
                continue;
            }
            let key = (a.epoch, self.rank_of(id, a.priority));
            if best
                .as_ref()
                .is_none_or(|(s, k)| theirs > *s || (theirs == *s && key > *k))
            {
                best = Some((theirs, key));
            }
        }
        best.map(|((_, Reverse(s)), (_, (_, _, id)))| (s, id.to_string()))
    }

    /// Whom to switch to at a bar boundary, if anyone: the leader of an older session
    /// (joining a room), or our own leader when its grid or clock is far from ours
    /// (a healed partition).
    fn switch_target(&mut self, now: i64) -> Option<(SessionId, String)> {
        if let Some(t) = self.better_session(now) {
            return Some(t);
        }
        if self.leading || !self.peers.contains_key(&self.leader) {
            self.realign = false;
            return None;
        }
        let p = &self.peers[&self.leader];
        let Some(a) = p
            .announce
            .as_ref()
            .filter(|a| a.leading && a.session == self.session && a.decided >= self.decided)
        else {
            return None;
        };
        if let Some((_, target)) = p.clock() {
            let err = target.to_session(now) - self.map.to_session(now);
            if err.abs() > REALIGN_NS {
                self.realign = true;
            }
        }
        if self.realign {
            let _ = a;
            return Some((self.session, self.leader.clone()));
        }
        None
    }

    /// A box that starts playing (its flags, a restored session) and finds a running
    /// room to join before its own first click does not click its own session first:
    /// its start is held (published stopped) while the join is pending, and played
    /// after all (at [`HELD_START_LEAD_NS`]) if the join is called off.
    fn hold_first_click(&mut self, now: i64) {
        let s_now = self.map.to_session(now);
        let joining = self.joining();
        if joining && self.held.is_none() {
            let segs = self.timeline.segments();
            let first = segs[0];
            // only the box's own first start (no join or realign yet: clock_gen 0)
            if self.clock_gen == 0
                && segs.len() == 1
                && first.b0 == 0
                && first.playing
                && first.t0 - s_now > PUBLISH_AHEAD_NS / 3
            {
                self.held = Some((first.tempo, first.meter));
                self.timeline = Timeline::start_at(first.t0, first.tempo, first.meter, false);
                self.publish = true;
            }
        } else if !joining {
            if let Some((tempo, meter)) = self.held.take() {
                self.timeline = Timeline::start_at(s_now + HELD_START_LEAD_NS, tempo, meter, true);
                self.publish = true;
                self.dirty = true;
            }
        }
    }

    fn try_switch(&mut self, now: i64, out: &mut Vec<Action>) {
        let Some((session, leader)) = self.switch_target(now) else {
            self.switch = None;
            return;
        };
        let p = &self.peers[&leader];
        let a = p
            .announce
            .as_ref()
            .expect("switch targets are announced peers");
        // Stepping onto a young estimate over a jittery path would leave the clock
        // milliseconds off, then seconds of slewing: wait until it is mature.
        let Some((_, target)) = p.clock().filter(|(e, _)| e.mature()) else {
            if self.switch.is_none() {
                out.push(Action::Note(Note::WaitingForClock {
                    leader: leader.clone(),
                }));
                self.switch = Some(Switch {
                    session,
                    leader,
                    beat: None,
                    basis: (0, 0),
                });
            }
            return;
        };
        let Some(room_tl) = Timeline::from_segments(&a.timeline) else {
            return;
        };
        let s_now = target.to_session(now);
        let stale = match &self.switch {
            Some(sw) => match sw.beat {
                None => true,
                Some(b) => {
                    sw.session != session
                        || sw.leader != leader
                        || sw.basis != (a.epoch, a.version)
                        || target.to_local(room_tl.beat_time(b)) - now < PUBLISH_AHEAD_NS / 3
                }
            },
            None => true,
        };
        if stale {
            let young =
                session != self.session && self.started_at.is_some_and(|t| now - t < YOUNG_NS);
            let q = if young { Quantum::Beat } else { Quantum::Bar };
            let at = room_tl.quantize(q, s_now, SWITCH_LEAD_NS);
            self.switch = Some(Switch {
                session,
                leader: leader.clone(),
                beat: Some(at.beat),
                basis: (a.epoch, a.version),
            });
        }
        let beat = self
            .switch
            .as_ref()
            .and_then(|sw| sw.beat)
            .expect("set above");
        let d_local = target.to_local(room_tl.beat_time(beat));
        if now < d_local - PUBLISH_AHEAD_NS {
            return;
        }
        // Switch now: step once onto the leader's clock, begin its timeline at the bar.
        let step = target.to_session(now) - self.map.to_session(now);
        let joining = session != self.session;
        self.session = session;
        self.epoch = a.epoch;
        self.version = a.version;
        if a.pin_decided >= self.pin_decided {
            self.pinned = a.pinned.clone();
            self.pin_decided = a.pin_decided.clone();
        }
        if a.control_decided >= self.control_decided {
            if a.control_pin != self.control_pin {
                out.push(Action::ControlPin(a.control_pin.clone()));
            }
            self.control_pin = a.control_pin.clone();
            self.control_decided = a.control_decided.clone();
        }
        if a.decided > self.decided {
            out.push(Action::Note(Note::Merged {
                record: "timeline",
                from: leader.clone(),
                stamp: a.decided.clone(),
            }));
        }
        self.decided = a.decided.clone();
        self.timeline = room_tl.begun_at(beat);
        self.held = None;
        self.adopted_from = Some(leader.clone());
        self.leader = leader.clone();
        self.leading = false;
        if joining {
            self.synced = false;
            self.joined_at = now;
        }
        self.map = self.slewer.step(now, &target, true);
        self.clock_gen += 1;
        self.switch = None;
        self.realign = false;
        self.dirty = true;
        self.publish = true;
        self.persist = true;
        out.push(Action::Note(if joining {
            Note::Joined {
                leader,
                beat,
                step_ns: step,
            }
        } else {
            Note::Realigned {
                leader,
                beat,
                step_ns: step,
            }
        }));
    }

    fn elect(&mut self, now: i64, out: &mut Vec<Action>) {
        // Candidates: live, synced nodes of this session; the highest rank wins. When
        // there are none (everyone synced left while the rest were still settling),
        // the current leader stays if it is alive, else the highest-ranked live node
        // of the session leads — every node computes the same — and the show goes on.
        let me = self.cfg.me.clone();
        let my_rank = {
            let (p, r, id) = self.rank_of(&me, self.cfg.priority);
            (p, r, id.to_string())
        };
        // A pinned node waits only PIN_SETTLE_NS, not SETTLE_NS: the stage tech asked.
        let pinned_me =
            self.pinned.as_deref() == Some(me.as_str()) && now - self.joined_at >= PIN_SETTLE_NS;
        let mut best: Option<(bool, i32, String)> =
            (self.synced || pinned_me).then(|| my_rank.clone());
        let mut best_leading: Option<(bool, i32, String)> = self.leading.then(|| my_rank.clone());
        let mut best_any: (bool, i32, String) = my_rank;
        let mut max_epoch = self.epoch;
        let mut competing = false;
        let mut leader_alive = self.leading;
        for (id, p) in &self.peers {
            let Some(a) = &p.announce else { continue };
            if a.session != self.session || !self.is_alive(p, now) {
                continue;
            }
            max_epoch = max_epoch.max(a.epoch);
            if a.leading && a.epoch >= self.epoch {
                competing = true;
            }
            if a.leading {
                let (pn, pr, _) = self.rank_of(id, a.priority);
                let r = (pn, pr, id.clone());
                if best_leading.as_ref().is_none_or(|b| r > *b) {
                    best_leading = Some(r);
                }
            }
            if *id == self.leader {
                leader_alive = true;
            }
            let (pn, pr, _) = self.rank_of(id, a.priority);
            let r = (pn, pr, id.clone());
            if r > best_any {
                best_any = r.clone();
            }
            // An unsynced pinned peer counts once it leads (it takes over after
            // PIN_SETTLE_NS of following): until then the current leader stays,
            // so the room is never without one.
            if !a.synced && !(pn && a.leading) {
                continue;
            }
            if best.as_ref().is_none_or(|b| r > *b) {
                best = Some(r);
            }
        }
        let winner = match best {
            Some(b) => b.2,
            // nobody synced: among those already leading (two, after a heal) the
            // highest rank; else our leader if alive; else the highest rank
            None => match best_leading {
                Some(b) => b.2,
                None if leader_alive => self.leader.clone(),
                None => best_any.2,
            },
        };
        if winner == me {
            // A leader holds the highest epoch it can see, and outbids a competing
            // leader (a healed partition) so that its records win everywhere.
            if !self.leading || max_epoch > self.epoch || competing {
                if !self.leading {
                    out.push(Action::Note(Note::BecameLeader {
                        epoch: max_epoch + 1,
                    }));
                    // Keep the session clock where it is, at the rate of the clock we
                    // followed (not the slewer's momentary correction).
                    let s_now = self.map.to_session(now);
                    let rate = self.followed_rate.unwrap_or(self.map.rate_ppt);
                    self.map = SessionMap {
                        local_ref: now,
                        session_ref: s_now,
                        rate_ppt: rate,
                    };
                    self.publish = true;
                }
                self.leading = true;
                self.leader = me;
                self.epoch = max_epoch + 1;
                self.dirty = true;
                self.publish = true;
                self.persist = true;
            }
        } else if self.leading || self.leader != winner {
            if self.leading {
                // from here on the clock slews toward the new leader's, starting from
                // exactly where ours is: no step
                self.slewer.adopt(self.map);
            }
            self.leading = false;
            self.leader = winner.clone();
            self.dirty = true;
            out.push(Action::Note(Note::Following {
                leader: winner,
                epoch: self.epoch,
            }));
        }
    }

    /// A node moves onto a later decision held by a peer of its session (groups met: a
    /// healed partition). Leadership stays with rank; the timeline becomes the peer's
    /// from one of the peer's bar boundaries on, on this node's own (unchanged) session
    /// clock: one quantized change, published [`PUBLISH_AHEAD_NS`] before that bar.
    /// The leader and its followers each do so as soon as they see the peer's announce
    /// (a follower does not wait to hear it from the leader a bar later); they all land
    /// on the same grid, the peer's. The beat numbering becomes the peer's, so the click log's `beat` jumps once
    /// there (`clock_gen` tells the audio thread); no click is doubled.
    fn try_merge(&mut self, now: i64, out: &mut Vec<Action>) {
        let best = self
            .peers
            .iter()
            .filter(|(_, p)| self.is_alive(p, now))
            .filter_map(|(id, p)| {
                p.announce
                    .as_ref()
                    .filter(|a| a.session == self.session && a.decided > self.decided)
                    .map(|a| (id, a))
            })
            // equal decisions: the peer already moving onto it (its timeline begins
            // ahead) goes first, so every box switches at the same bar
            .max_by_key(|(_, a)| (&a.decided, a.timeline.first().map(|s| s.t0)));
        let Some((from, a)) = best else {
            self.merge = None;
            return;
        };
        let Some(tl) = Timeline::from_segments(&a.timeline) else {
            return;
        };
        let s_now = self.session_now(now);
        // The same grid up to now (a change the peer scheduled ahead, e.g. while
        // leadership moved): take its timeline as it is, at once — its change lands where
        // it was scheduled, on every box.
        if tl.segments()[0].t0 <= s_now && same_grid(&self.timeline, &tl, s_now) {
            let from = from.clone();
            let stamp = a.decided.clone();
            self.timeline = tl;
            self.decided = stamp.clone();
            if self.leading {
                self.version += 1;
            }
            self.merge = None;
            self.dirty = true;
            self.publish = true;
            self.persist = true;
            out.push(Action::Note(Note::Merged {
                record: "timeline",
                from,
                stamp,
            }));
            return;
        }
        let replan = self.merge.as_ref().is_none_or(|m| {
            m.from != *from
                || m.stamp != a.decided
                || tl.beat_time(m.beat) - s_now < PUBLISH_AHEAD_NS / 3
        });
        if replan {
            // a peer already moving onto it at a bar still ahead: that bar, the same on
            // every box; otherwise the next bar far enough ahead
            let beat = if begins_ahead(&tl, s_now) {
                tl.segments()[0].b0
            } else {
                tl.quantize(Quantum::Bar, s_now, SWITCH_LEAD_NS).beat
            };
            self.merge = Some(Merge {
                from: from.clone(),
                beat,
                stamp: a.decided.clone(),
            });
        }
        let m = self.merge.as_ref().expect("set above");
        if s_now < tl.beat_time(m.beat) - PUBLISH_AHEAD_NS {
            return;
        }
        let m = self.merge.take().expect("set above");
        self.timeline = tl.begun_at(m.beat);
        self.decided = m.stamp.clone();
        if self.leading {
            // the leader's records changed; a follower keeps its leader's version and
            // adopts the leader's (same) timeline when the leader has merged too
            self.version += 1;
        }
        self.clock_gen += 1;
        self.dirty = true;
        self.publish = true;
        self.persist = true;
        out.push(Action::Note(Note::Merged {
            record: "timeline",
            from: m.from.clone(),
            stamp: m.stamp,
        }));
        out.push(Action::Note(Note::Realigned {
            leader: self.cfg.me.clone(),
            beat: m.beat,
            step_ns: 0,
        }));
    }

    /// Advance: switch sessions, elect, slew the clock, heartbeat, publish.
    pub fn tick(&mut self, now: i64, out: &mut Vec<Action>) {
        self.started_at.get_or_insert(now);
        self.try_switch(now, out);
        self.hold_first_click(now);
        if !self.synced && now - self.joined_at >= SETTLE_NS {
            let settled = self
                .peers
                .get(&self.leader)
                .and_then(|p| p.est.estimate())
                .is_none_or(|e| e.settled());
            if settled {
                self.synced = true;
                self.dirty = true;
            }
        }
        if self.switch.is_none() {
            self.elect(now, out);
            self.try_merge(now, out);
        }
        self.number_cues(now, out);
        if !self.leading && self.switch.is_none() {
            // A leading peer's map is its own. One that does not lead yet (a pinned or
            // higher-ranked box about to take over) may still be following us, and two
            // boxes reading each other's maps would chase each other: the higher-ranked
            // one follows, the other lets its clock run on as it is until the new
            // leader takes over (a cycle of three always has one that holds, too).
            let me = self.rank_of(&self.cfg.me, self.cfg.priority);
            let leader = self.peers.get(&self.leader).filter(|p| {
                p.leads()
                    || p.announce
                        .as_ref()
                        .is_some_and(|a| self.rank_of(&self.leader, a.priority) < me)
            });
            if let Some((_, target)) = leader.and_then(Peer::clock) {
                self.followed_rate = Some(target.rate_ppt);
                let m = self.slewer.step(now, &target, false);
                if m != self.map {
                    self.map = m;
                    self.publish = true;
                }
            }
        }
        let before = self.timeline;
        self.timeline.advance(self.map.to_session(now));
        if self.timeline != before {
            self.publish = true;
        }
        if self.dirty || now - self.last_announce >= ANNOUNCE_EVERY_NS {
            out.push(Action::Broadcast(Frame::Announce(self.announce())));
            self.last_announce = now;
            self.dirty = false;
        }
        if self.publish {
            out.push(Action::Publish {
                timeline: self.timeline,
                map: self.map,
                epoch: self.epoch,
                clock_gen: self.clock_gen,
            });
            self.publish = false;
        }
        if self.persist {
            let seg = *self.timeline.last();
            out.push(Action::Persist(Persisted {
                tempo: seg.tempo,
                meter: seg.meter,
                playing: seg.playing || self.held.is_some(),
                pinned: self.pinned.clone(),
                epoch: self.epoch,
                decided: self.decided.clone(),
                pin_decided: self.pin_decided.clone(),
                control_pin: self.control_pin.clone(),
                control_decided: self.control_decided.clone(),
                hlc: self.hlc,
                setlist: self.setlist.clone(),
                setlist_decided: self.setlist_decided.clone(),
                song: self.song,
                song_decided: self.song_decided.clone(),
            }));
            self.persist = false;
        }
        if self.cues_dirty && now - self.cues_saved_at >= 1_000_000_000 {
            out.push(Action::PersistCues {
                cues: self.cues.all().cloned().collect(),
                floor: self.cues.floor(),
            });
            self.cues_dirty = false;
            self.cues_saved_at = now;
        }
    }

    /// Per-peer clock figures. `offset_us`: the peer's session time minus ours.
    pub fn peer_status(&self, now: i64) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|(id, p)| {
                let clock = p.clock();
                let est = clock.map(|(e, _)| e);
                PeerStatus {
                    id: id.clone(),
                    name: p.name.clone(),
                    rtt_us: est.map(|e| e.rtt_ns / 1000),
                    offset_us: clock
                        .map(|(_, m)| (m.to_session(now) - self.map.to_session(now)) / 1000),
                    uncertainty_us: est.map(|e| e.uncertainty_ns / 1000),
                    role: match &p.announce {
                        Some(a) if a.leading => Role::Leader,
                        Some(_) => Role::Follower,
                        None => Role::Unknown,
                    },
                    synced: p
                        .announce
                        .as_ref()
                        .is_some_and(|a| a.synced && a.session == self.session),
                    alive: self.is_alive(p, now),
                }
            })
            .collect()
    }
}

/// True when `b` is `a`'s grid, now and over the last two seconds, so that taking `b`
/// only changes the future (a leader's update); a grid that differs now or two seconds
/// ago is another grid (a healed partition, a later decision on another grid).
/// A timeline that begins at a bar still far enough ahead to be published before it
/// (a peer's switch onto another grid, taken at its bar): a box can begin with it there.
fn begins_ahead(tl: &Timeline, s_now: i64) -> bool {
    let first = &tl.segments()[0];
    first.t0 - s_now > PUBLISH_AHEAD_NS / 3 && first.is_downbeat(first.b0)
}

fn same_grid(a: &Timeline, b: &Timeline, s_now: i64) -> bool {
    let back = (s_now - 2_000_000_000)
        .max(b.segments()[0].t0)
        .max(a.segments()[0].t0)
        .min(s_now);
    // now, `back`, and every change point of either in between (two grids can agree at
    // two instants by chance; not at every point where one of them changes tempo)
    !phase_differs(a, b, s_now)
        && !phase_differs(a, b, back)
        && a.segments()
            .iter()
            .chain(b.segments())
            .filter(|g| back < g.t0 && g.t0 < s_now)
            .all(|g| !phase_differs(a, b, g.t0))
}

/// True when two timelines put the beat grid in different places at session time `t`
/// (more than 1/1000 of a beat apart).
fn phase_differs(a: &Timeline, b: &Timeline, t: i64) -> bool {
    let pa = a.beat_at(t).0 as i128;
    let pb = b.beat_at(t).0 as i128;
    (pa - pb).abs() > (1i128 << crate::core::timeline::FRAC_BITS) / 1000
}

/// Setlists, songs and cues (see the module doc and `cues.rs`).
impl Room {
    /// Restore the setlist and song records (from disk) before the first tick.
    pub fn restore_setlist(
        &mut self,
        songs: Vec<Song>,
        decided: Stamp,
        song: Option<u16>,
        song_decided: Stamp,
    ) {
        if cues::check_setlist(&songs).is_ok() {
            self.setlist = songs;
            self.setlist_decided = decided;
            self.song = song;
            self.song_decided = song_decided;
        }
    }
    /// Restore the cue log (from disk) before the first tick.
    pub fn restore_cues(&mut self, c: Vec<Cue>, floor: u64) {
        let ok: Vec<Cue> = c
            .into_iter()
            .filter(|c| cues::check_text(&c.text).is_ok() && cues::check_author(&c.author).is_ok())
            .collect();
        self.cues = CueLog::new(ok, floor);
    }
    pub fn setlist(&self) -> &[Song] {
        &self.setlist
    }
    /// The current song, 0-based.
    pub fn song(&self) -> Option<u16> {
        self.song.filter(|&i| (i as usize) < self.setlist.len())
    }
    pub fn cues(&self) -> &CueLog {
        &self.cues
    }

    fn song_status(&self) -> Option<SongStatus> {
        let i = self.song()?;
        Some(SongStatus {
            index: i + 1,
            title: self.setlist[i as usize].title.clone(),
            count: self.setlist.len() as u16,
        })
    }

    fn setlist_changed(&mut self, out: &mut Vec<Action>) {
        self.dirty = true;
        self.persist = true;
        out.push(Action::Setlist {
            songs: self.setlist.clone(),
            song: self.song(),
        });
    }

    /// Replace the setlist: a decision made here. No song is current afterwards.
    pub fn load_setlist(
        &mut self,
        songs: Vec<Song>,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), CueError> {
        cues::check_setlist(&songs)?;
        let stamp = self.decide(now);
        self.setlist = songs;
        self.setlist_decided = stamp.clone();
        self.song = None;
        self.song_decided = stamp;
        self.setlist_changed(out);
        Ok(())
    }

    /// Choose a song: a decision made here. Its tempo and meter land at the next bar
    /// (scheduled by the leader; `None` when relayed to it).
    pub fn choose_song(
        &mut self,
        pick: SongPick,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<(u16, Option<Scheduled>), CueError> {
        let n = self.setlist.len();
        if n == 0 {
            return Err(CueError::Pick(
                "no setlist loaded (bandsync setlist load FILE.toml)".into(),
            ));
        }
        let index = match pick {
            SongPick::Number(k) if k >= 1 && (k as usize) <= n => k - 1,
            SongPick::Number(k) => {
                return Err(CueError::Pick(format!(
                    "{k} is not a song of this setlist (1–{n})"
                )))
            }
            SongPick::Next => match self.song() {
                None => 0,
                Some(i) if (i as usize) + 1 < n => i + 1,
                Some(_) => return Err(CueError::Pick(format!("already at the last song ({n})"))),
            },
            SongPick::Prev => match self.song() {
                None => return Err(CueError::Pick("no song chosen yet".into())),
                Some(0) => return Err(CueError::Pick("already at the first song".into())),
                Some(i) => i - 1,
            },
        };
        let stamp = self.decide(now);
        let req = SongRequest {
            index,
            song: self.setlist[index as usize].clone(),
            stamp,
        };
        let at = self.song_with(req, now, out)?;
        Ok((index, at))
    }

    fn take_song(&mut self, index: u16, stamp: &Stamp, out: &mut Vec<Action>) {
        if *stamp > self.song_decided {
            self.song = Some(index);
            self.song_decided = stamp.clone();
            self.setlist_changed(out);
        }
    }

    fn song_with(
        &mut self,
        req: SongRequest,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<Option<Scheduled>, CueError> {
        if !self.leading {
            self.take_song(req.index, &req.stamp, out);
            out.push(Action::Send {
                to: self.leader.clone(),
                frame: Frame::Song(req),
            });
            return Ok(None);
        }
        // One quantized change: the tempo at the next bar, and the meter from the same
        // beat (the same new segment).
        let mut tl = self.timeline;
        let at = tl
            .schedule(
                Change {
                    kind: ChangeKind::Tempo(req.song.tempo),
                    quantum: Quantum::Bar,
                },
                self.session_now(now),
                CHANGE_LEAD_NS,
            )
            .map_err(|e| CueError::Pick(e.to_string()))?;
        if tl.segment_at_beat(at.beat).meter != req.song.meter {
            tl.apply_at(ChangeKind::Meter(req.song.meter), at.beat)
                .map_err(|e| CueError::Pick(e.to_string()))?;
        }
        self.timeline = tl;
        self.decided = self.decided.clone().max(req.stamp.clone());
        self.version += 1;
        self.dirty = true;
        self.publish = true;
        self.persist = true;
        out.push(Action::Note(Note::Scheduled {
            change: ChangeKind::Tempo(req.song.tempo),
            at,
        }));
        self.take_song(req.index, &req.stamp, out);
        Ok(Some(at))
    }

    fn on_song(&mut self, from: &str, req: SongRequest, now: i64, out: &mut Vec<Action>) {
        if !self.observe(from, &req.stamp, now, out) {
            return;
        }
        if self.leading {
            if let Err(e) = self.song_with(req, now, out) {
                out.push(Action::Note(Note::ChangeRefused {
                    reason: e.to_string(),
                }));
            }
        } else {
            self.take_song(req.index, &req.stamp, out);
            if from != self.leader {
                out.push(Action::Send {
                    to: self.leader.clone(),
                    frame: Frame::Song(req),
                });
            }
        }
    }

    fn on_setlist(&mut self, from: &str, r: SetlistRecord, now: i64, out: &mut Vec<Action>) {
        if !self.observe(from, &r.decided, now, out) {
            return;
        }
        if r.decided > self.setlist_decided {
            self.setlist = r.songs;
            self.setlist_decided = r.decided.clone();
            out.push(Action::Note(Note::Merged {
                record: "setlist",
                from: from.to_string(),
                stamp: r.decided,
            }));
            self.setlist_changed(out);
        }
    }

    /// Records a peer's announce says we should fetch or take: the song (last writer
    /// wins), a later setlist (ask for it), a cue log that differs (send our inventory).
    fn sync_records(&mut self, from: &str, a: &Announce, now: i64, out: &mut Vec<Action>) {
        if a.song_decided > self.song_decided {
            self.song = a.song;
            self.song_decided = a.song_decided.clone();
            self.setlist_changed(out);
        }
        let want_setlist = a.setlist_decided > self.setlist_decided;
        let want_cues = a.cues.digest != self.cues.summary().digest;
        let Some(p) = self.peers.get_mut(from) else {
            return;
        };
        if want_setlist && now - p.setlist_asked_at >= 500_000_000 {
            p.setlist_asked_at = now;
            out.push(Action::Send {
                to: from.to_string(),
                frame: Frame::SetlistGet,
            });
        }
        if want_cues && now - p.cue_sync_at >= cues::SYNC_EVERY_NS {
            p.cue_sync_at = now;
            out.push(Action::Send {
                to: from.to_string(),
                frame: Frame::CueHave(self.cues.inventory()),
            });
        }
    }

    /// Post a cue here (CLI or phone). Numbered at once when this box leads; else it
    /// goes to every peer and the leader numbers it.
    pub fn post_cue(
        &mut self,
        text: String,
        author: String,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<Cue, CueError> {
        cues::check_text(&text)?;
        cues::check_author(&author)?;
        let id = self.decide(now);
        let unix = self.phys_ms(now);
        let c = self.cues.post(id.clone(), text, author, unix);
        self.cues_dirty = true;
        if self.leading {
            self.number_cues(now, out);
        } else {
            out.push(Action::Cue(c.clone()));
            out.push(Action::Broadcast(Frame::Cues(vec![c])));
        }
        Ok(self.cues.get(&id).cloned().expect("just posted"))
    }

    /// Edit (`Some(text)`) or delete (`None`) the cue `seq`: a decision made here.
    pub fn edit_cue(
        &mut self,
        seq: u64,
        text: Option<String>,
        now: i64,
        out: &mut Vec<Action>,
    ) -> Result<Cue, CueError> {
        if let Some(t) = &text {
            cues::check_text(t)?;
        }
        if self.cues.by_seq(seq).is_none() {
            return Err(CueError::UnknownSeq(seq));
        }
        let stamp = self.decide(now);
        let unix = self.phys_ms(now);
        let c = self.cues.edit(seq, text, stamp, unix)?;
        self.cues_dirty = true;
        out.push(Action::Cue(c.clone()));
        out.push(Action::Broadcast(Frame::Cues(vec![c.clone()])));
        Ok(c)
    }

    /// A phone acked the cue `seq` on this box (replicated with the next sync).
    pub fn ack_cue(&mut self, seq: u64) -> Result<(), CueError> {
        self.cues.ack(seq, &self.cfg.me)?;
        self.cues_dirty = true;
        Ok(())
    }

    fn on_cues(&mut self, from: &str, v: Vec<Cue>, now: i64, out: &mut Vec<Action>) {
        let mut ok = Vec::with_capacity(v.len());
        for c in v {
            if self.observe(from, &c.id, now, out)
                && self.observe(from, &c.edited, now, out)
                && self.observe(from, &c.numbered, now, out)
            {
                ok.push(c);
            }
        }
        let changed = self.cues.merge(ok);
        if changed.any {
            self.cues_dirty = true;
        }
        for c in changed.visible {
            out.push(Action::Cue(c));
        }
        self.number_cues(now, out);
    }

    /// The leader numbers unnumbered cues and resolves collisions — only when no other
    /// live leader of its session competes (after a heal, the election settles first).
    fn number_cues(&mut self, now: i64, out: &mut Vec<Action>) {
        if !self.leading {
            return;
        }
        let competing = self.peers.values().any(|p| {
            self.is_alive(p, now)
                && p.announce
                    .as_ref()
                    .is_some_and(|a| a.leading && a.session == self.session)
        });
        if competing {
            return;
        }
        let p = self.phys_ms(now);
        let me = self.cfg.me.clone();
        let hlc = &mut self.hlc;
        let changed = self.cues.number(|| hlc.issue(p, &me));
        if changed.is_empty() {
            return;
        }
        self.cues_dirty = true;
        for c in &changed {
            out.push(Action::Cue(c.clone()));
        }
        out.push(Action::Broadcast(Frame::Cues(changed)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::{Meter, Tempo};

    fn alone() -> Room {
        let tl = Timeline::start_at(
            0,
            Tempo::from_bpm(120.0).unwrap(),
            Meter::new(4).unwrap(),
            true,
        );
        Room::new(
            RoomConfig {
                me: "00000000000000aa".into(),
                name: "a".into(),
                priority: 0,
                quantum: Quantum::Bar,
                wall_offset_ns: 1_700_000_000_000_000_000,
            },
            SessionId {
                born_ms: 1,
                by: 0xaa,
            },
            tl,
        )
    }

    fn song(title: &str, bpm: f64, meter: i64) -> Song {
        Song {
            title: title.into(),
            tempo: Tempo::from_bpm(bpm).unwrap(),
            meter: Meter::new(meter).unwrap(),
            count_in_bars: 0,
        }
    }

    fn named(me: &str, by: u64) -> Room {
        let mut r = alone();
        r.cfg.me = me.into();
        r.leader = me.into();
        r.session = SessionId { born_ms: 1, by };
        r
    }

    /// `x` ticks; its broadcasts reach `y` at once.
    fn step(x: &mut Room, y: &mut Room, now: i64) {
        let mut out = Vec::new();
        x.tick(now, &mut out);
        let me = x.cfg.me.clone();
        for act in out {
            if let Action::Broadcast(f) = act {
                let _ = y.handle_frame(&me, f, now, &mut Vec::new());
            }
        }
    }

    /// Run both rooms for `ms`, delivering every broadcast frame at once.
    fn exchange(a: &mut Room, b: &mut Room, from_ms: i64, ms: i64) {
        for t in (from_ms..from_ms + ms).step_by(10) {
            let now = t * 1_000_000;
            step(a, b, now);
            step(b, a, now);
        }
    }

    #[test]
    fn the_leader_steers_the_link_clock_and_followers_take_it() {
        let (mut a, mut b) = (named("00000000000000aa", 1), named("00000000000000bb", 1));
        a.peer_up("00000000000000bb", "b", 1);
        b.peer_up("00000000000000aa", "a", 1);
        exchange(&mut a, &mut b, 0, 3_000);
        let (mut lead, mut follow) = if a.leading() { (a, b) } else { (b, a) };
        assert!(lead.leading() && !follow.leading(), "one leader");
        // only the leader steers, only from the shift it holds, within bounds
        assert!(!follow.steer_link(0, 50_000));
        assert!(lead.steer_link(0, 50_000));
        assert!(
            !lead.steer_link(0, 90_000),
            "measured against an older shift"
        );
        assert!(!lead.steer_link(50_000, crate::core::wire::MAX_LINK_SHIFT_NS + 1));
        assert_eq!(lead.link_shift_ns(), 50_000);
        assert_eq!(follow.link_shift_ns(), 0);
        exchange(&mut lead, &mut follow, 3_000, 100);
        assert_eq!(
            follow.link_shift_ns(),
            50_000,
            "the follower takes the leader's"
        );
    }

    #[test]
    fn a_song_changes_tempo_and_meter_at_one_bar() {
        let mut r = alone();
        let mut out = Vec::new();
        r.tick(0, &mut out);
        let now = 1_300_000_000; // beat 2.6 of a 4/4 bar at 120
        assert!(matches!(
            r.choose_song(SongPick::Next, now, &mut out),
            Err(CueError::Pick(_))
        ));
        r.load_setlist(vec![song("A", 120.0, 4), song("B", 90.0, 3)], now, &mut out)
            .unwrap();
        assert!(r.choose_song(SongPick::Number(3), now, &mut out).is_err());
        assert!(r.choose_song(SongPick::Prev, now, &mut out).is_err());
        let before = *r.timeline().last();
        let (i, at) = r.choose_song(SongPick::Number(2), now, &mut out).unwrap();
        let at = at.expect("the leader schedules it");
        assert_eq!(i, 1);
        assert!(before.is_downbeat(at.beat), "on a bar boundary: {at:?}");
        assert!(at.time - now >= CHANGE_LEAD_NS);
        let seg = r.timeline().segment_at_beat(at.beat);
        assert_eq!(
            (seg.b0, seg.tempo.bpm(), seg.meter.get()),
            (at.beat, 90.0, 3),
            "one segment"
        );
        assert_eq!(
            r.status(now).song,
            Some(SongStatus {
                index: 2,
                title: "B".into(),
                count: 2
            })
        );
        out.clear();
        r.tick(now, &mut out);
        let saved = out.iter().find_map(|a| match a {
            Action::Persist(p) => Some(p.clone()),
            _ => None,
        });
        let saved = saved.expect("persisted");
        assert_eq!((saved.setlist.len(), saved.song), (2, Some(1)));
        assert!(saved.song_decided > Stamp::DEFAULT && saved.decided == saved.song_decided);
        assert!(
            matches!(
                r.choose_song(SongPick::Next, now, &mut out),
                Err(CueError::Pick(_))
            ),
            "already last"
        );
    }

    #[test]
    fn a_leader_numbers_cues_and_bad_ones_change_nothing() {
        let mut r = alone();
        let mut out = Vec::new();
        r.tick(0, &mut out);
        let c = r
            .post_cue("chorus twice".into(), "tech".into(), 10, &mut out)
            .unwrap();
        assert_eq!(c.seq, 1);
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Cue(c) if c.seq == 1)));
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::Broadcast(Frame::Cues(v)) if v.len() == 1)));
        let digest = r.cues().summary();
        assert!(matches!(
            r.post_cue("".into(), "t".into(), 20, &mut out),
            Err(CueError::Text(_))
        ));
        assert!(matches!(
            r.post_cue("x".repeat(501), "t".into(), 20, &mut out),
            Err(CueError::Text(_))
        ));
        assert_eq!(
            r.edit_cue(7, None, 20, &mut out).unwrap_err(),
            CueError::UnknownSeq(7)
        );
        assert_eq!(r.ack_cue(7), Err(CueError::UnknownSeq(7)));
        assert_eq!(r.cues().summary(), digest, "refused input changed nothing");
        let e = r
            .edit_cue(1, Some("chorus three times".into()), 30, &mut out)
            .unwrap();
        assert_eq!((e.seq, e.text.as_str()), (1, "chorus three times"));
        assert_eq!(
            r.post_cue("next".into(), "t".into(), 40, &mut out)
                .unwrap()
                .seq,
            2
        );
        r.ack_cue(2).unwrap();
        assert_eq!(r.cues().by_seq(2).unwrap().seen_total(), 1);
        out.clear();
        r.tick(2_000_000_000, &mut out);
        assert!(out
            .iter()
            .any(|a| matches!(a, Action::PersistCues { cues, .. } if cues.len() == 2)));
    }
}
