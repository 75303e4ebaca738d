//! The peer wire protocol: length-prefixed, versioned postcard frames on a QUIC
//! stream, and postcard datagrams for clock pings.
//!
//! ```text
//! frame    = len:u32be  version:u16be  postcard(Frame)       len = 2 + body, ≤ MAX_FRAME
//! datagram = version:u16be  postcard(Datagram)               ≤ MAX_DATAGRAM
//! ```
//!
//! Decoding is total: any byte string yields a value or a [`WireError`], never a
//! panic, and every field is validated here (ids, names, timelines) so the room core
//! only ever sees well-formed messages.

use crate::core::cues::{self, Cue, CueSummary, Song};
use crate::core::decision::{Stamp, MAX_MS};
use crate::core::time::SessionMap;
use crate::core::timeline::{ChangeKind, Quantum, Segment, Timeline};
use serde::{Deserialize, Serialize};

/// 2: pongs carry the responder's local times and its session map.
/// 3: records carry decision stamps (announce, change and pin requests).
/// 4: setlists, songs and cues (announce fields; setlist, song and cue frames).
pub const PROTOCOL_VERSION: u16 = 5;
/// Largest epoch or version accepted from a peer (2⁵³): a stranger's `u64::MAX` must
/// never make `epoch + 1` wrap.
pub const MAX_COUNTER: u64 = 1 << 53;
/// Largest frame body accepted (bytes after the length prefix): a talkback SDP of up
/// to [`MAX_SDP`] and its envelope fit.
pub const MAX_FRAME: usize = 24 * 1024;
pub const MAX_DATAGRAM: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("frame shorter than its header")]
    Truncated,
    #[error("protocol version {0} is not supported (this node speaks {PROTOCOL_VERSION})")]
    Version(u16),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("invalid field {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

impl WireError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::TooLarge(_) => "too_large",
            WireError::Truncated => "truncated",
            WireError::Version(_) => "version",
            WireError::Decode(_) => "decode",
            WireError::Invalid { .. } => "invalid",
        }
    }
}

/// Who a node is, sent first on every connection together with its proof of the room
/// key (bound to this TLS session).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub node: String,
    pub name: String,
    pub room: String,
    pub priority: i32,
    /// true for the stage tech's CLI (never leads, never syncs).
    pub cli: bool,
    /// Random per process start: the same value on a new connection means the same
    /// process (its clock estimate is still good).
    pub boot: u64,
    pub mac: [u8; 32],
}

/// A session's identity: when and by whom it was started. Older sessions win when two
/// groups meet ("joining never disturbs the room").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId {
    /// Wall-clock ms since the Unix epoch at creation (only compared, never used as time).
    pub born_ms: u64,
    /// 64-bit node id of the creator (tiebreak).
    pub by: u64,
}

/// What every node tells its peers, on change and as a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub session: SessionId,
    pub epoch: u64,
    /// Who this node follows (itself when leading).
    pub leader: String,
    pub leading: bool,
    /// The node has adopted `session` and its clock estimate is usable.
    pub synced: bool,
    pub priority: i32,
    /// The timeline this node plays (authoritative when `leading`).
    pub timeline: Vec<Segment>,
    /// Increases with every timeline or pin change the leader makes.
    pub version: u64,
    /// The pinned node (leads while alive), replicated by the leader.
    pub pinned: Option<String>,
    /// The decision that made `timeline` (tempo, meter, transport).
    pub decided: Stamp,
    /// The decision that made `pinned`.
    pub pin_decided: Stamp,
    /// The room's control PIN for phones (`None`: open) — only ever sent to peers that
    /// proved the room key, over the room's TLS connections.
    pub control_pin: Option<String>,
    pub control_decided: Stamp,
    /// The decision that loaded the setlist (peers with an older one ask for it).
    pub setlist_decided: Stamp,
    /// The current song (0-based index into the setlist) and the decision that chose it.
    pub song: Option<u16>,
    pub song_decided: Stamp,
    /// The cue log's max seq, size and digest (peers whose digest differs sync).
    pub cues: CueSummary,
    /// The room's Link ghost clock steering shift, ns (`core::link::steer`; the
    /// leader's is the room's).
    pub link_shift_ns: i64,
}

/// The largest Link ghost clock shift a box accepts (1 hour), ns.
pub const MAX_LINK_SHIFT_NS: i64 = 3_600_000_000_000;

/// A song chosen at some box, relayed to the leader (it schedules the tempo and meter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SongRequest {
    /// 0-based index into the setlist.
    pub index: u16,
    /// The song as the asking box knows it (the leader schedules exactly this).
    pub song: Song,
    pub stamp: Stamp,
}

/// The room's setlist, as a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetlistRecord {
    pub songs: Vec<Song>,
    pub decided: Stamp,
}

/// Which song the CLI or a phone asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SongPick {
    Next,
    Prev,
    /// 1-based.
    Number(u16),
}

/// A change asked of the leader (by a follower relaying the CLI or a phone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRequest {
    pub id: u64,
    pub kind: ChangeKind,
    pub quantum: Option<Quantum>,
    /// Stamped where the person asked (the box the CLI or phone spoke to).
    pub stamp: Stamp,
}

/// A pin or unpin (`node: None`) relayed to the leader, stamped where it was asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinRequest {
    pub node: Option<String>,
    pub stamp: Stamp,
}

/// What the stage tech's CLI asks a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    Status,
    Change {
        kind: ChangeKind,
        quantum: Option<Quantum>,
    },
    /// Pin a node (by id or name) so it leads while alive.
    Pin(String),
    Unpin,
    /// Replace the room's setlist.
    SetlistLoad(Vec<Song>),
    /// The setlist as JSON, songs from 0-based `from` on (paged: a reply is one frame).
    Setlist {
        from: u16,
    },
    Song(SongPick),
    CuePost {
        text: String,
        author: String,
    },
    CueEdit {
        seq: u64,
        text: String,
    },
    CueDelete {
        seq: u64,
    },
    /// Cues with seq > `after` as JSON, in order (paged).
    Cues {
        after: u64,
    },
    /// A phone acked the cue `seq` (from the gateway).
    CueAck {
        seq: u64,
    },
}

/// A node's answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The SPEC §5 status object, as JSON.
    Status(String),
    Done(String),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    Announce(Announce),
    Change(ChangeRequest),
    /// A human-readable reason before an orderly close.
    Bye(String),
    Query(Query),
    Reply(Reply),
    /// A pin/unpin relayed to the leader.
    Pin(PinRequest),
    /// Ask a peer for its setlist (its announce showed a later one).
    SetlistGet,
    Setlist(SetlistRecord),
    /// A song choice relayed to the leader.
    Song(SongRequest),
    /// Cues, new or changed (pushed, or answering an inventory).
    Cues(Vec<Cue>),
    /// This box's cue inventory: (id hash, version hash) per cue.
    CueHave(Vec<(u64, u64)>),
    /// Talkback signalling between the boxes of a room (routed by the node, never
    /// seen by the room core).
    Rtc(RtcRelay),
}

/// Largest talkback SDP (offer or answer), bytes.
pub const MAX_SDP: usize = 16 * 1024;
/// Largest talkback ICE candidate, bytes.
pub const MAX_ICE: usize = 1024;
/// Most talkback members in a room (and so on one box).
pub const MAX_TALKERS: usize = 16;

/// Talkback (phones talking over WebRTC, peer to peer): the boxes only relay the
/// signalling, within the room. A member id is `<first 8 hex digits of its box's node
/// id>-<n>`, so ids are unique room-wide and name the box a member is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RtcRelay {
    /// The sending box's members, all of them (on every change and every 2 s; a box
    /// not heard from for a while, or gone, has none).
    Members(Vec<RtcMember>),
    /// One phone's message to another: `from` on the sending box, `to` anywhere.
    Signal {
        from: String,
        to: String,
        kind: RtcKind,
        /// The SDP (offer, answer), the candidate as JSON (ice), empty (leave).
        body: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcMember {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RtcKind {
    Offer,
    Answer,
    Ice,
    Leave,
}

impl RtcKind {
    /// The WebSocket message type.
    pub fn as_str(self) -> &'static str {
        match self {
            RtcKind::Offer => "rtc_offer",
            RtcKind::Answer => "rtc_answer",
            RtcKind::Ice => "rtc_ice",
            RtcKind::Leave => "rtc_leave",
        }
    }
    /// Largest body of this kind.
    pub fn max_body(self) -> usize {
        match self {
            RtcKind::Offer | RtcKind::Answer => MAX_SDP,
            RtcKind::Ice => MAX_ICE,
            RtcKind::Leave => 0,
        }
    }
}

/// Is `id` a talkback member id (`xxxxxxxx-n`, n ≤ 2⁵³)?
pub fn rtc_id_ok(id: &str) -> bool {
    let Some((node, n)) = id.split_once('-') else {
        return false;
    };
    node.len() == 8
        && node
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        && !n.is_empty()
        && n.len() <= 16
        && n.bytes().all(|c| c.is_ascii_digit())
}

fn check_rtc_id(field: &'static str, id: &str) -> Result<(), WireError> {
    if rtc_id_ok(id) {
        Ok(())
    } else {
        Err(WireError::Invalid {
            field,
            why: format!(
                "{:?} is not a talkback member id",
                id.chars().take(40).collect::<String>()
            ),
        })
    }
}

/// Clock pings. Times: `t1` the pinger's local ns; `t2`/`t3` the responder's *local*
/// ns (its monotonic clock, which never steps or slews); `map` the responder's session
/// map (local → session) when it answered. The pinger estimates the responder's local
/// clock, a straight line, and reads the responder's session clock through `map`: a
/// map that slews, steps or is taken over by a new leader never invalidates the
/// estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Datagram {
    Ping {
        seq: u32,
        t1: i64,
    },
    Pong {
        seq: u32,
        t1: i64,
        t2: i64,
        t3: i64,
        map: SessionMap,
    },
}

/// Largest session-map rate a peer may announce: 1 % (a clock off by more is broken).
pub const MAX_MAP_RATE_PPT: i64 = 10_000_000_000;

fn check_id(field: &'static str, s: &str) -> Result<(), WireError> {
    if crate::core::id::is_node_id(s) {
        Ok(())
    } else {
        Err(WireError::Invalid {
            field,
            why: format!("{s:?} is not a 16-hex-digit node id"),
        })
    }
}

fn check_counter(field: &'static str, v: u64) -> Result<(), WireError> {
    if v > MAX_COUNTER {
        return Err(WireError::Invalid {
            field,
            why: format!("{v} is beyond 2^53"),
        });
    }
    Ok(())
}

fn check_stamp(field: &'static str, s: &Stamp) -> Result<(), WireError> {
    if s.ms > MAX_MS {
        return Err(WireError::Invalid {
            field,
            why: format!("{} ms is beyond 2^53", s.ms),
        });
    }
    if s.node.is_empty() && s.ms == 0 {
        return Ok(()); // the default and the start flags
    }
    check_id(field, &s.node)
}

fn check_song_list(field: &'static str, songs: &[Song]) -> Result<(), WireError> {
    cues::check_setlist(songs).map_err(|e| WireError::Invalid {
        field,
        why: e.to_string(),
    })
}

fn check_cue(c: &Cue) -> Result<(), WireError> {
    let inv = |field, why: String| WireError::Invalid { field, why };
    check_stamp("cue.id", &c.id)?;
    if c.id.node.is_empty() {
        return Err(inv("cue.id", "a cue's id names its box".into()));
    }
    check_counter("cue.seq", c.seq)?;
    check_stamp("cue.numbered", &c.numbered)?;
    check_stamp("cue.edited", &c.edited)?;
    cues::check_text(&c.text).map_err(|e| inv("cue.text", e.to_string()))?;
    cues::check_author(&c.author).map_err(|e| inv("cue.author", e.to_string()))?;
    check_counter("cue.posted_unix_ms", c.posted_unix_ms)?;
    if let Some(t) = c.edited_unix_ms {
        check_counter("cue.edited_unix_ms", t)?;
    }
    if c.seen.len() > cues::MAX_SEEN_BOXES {
        return Err(inv(
            "cue.seen",
            format!("more than {} boxes", cues::MAX_SEEN_BOXES),
        ));
    }
    for k in c.seen.keys() {
        check_id("cue.seen", k)?;
    }
    Ok(())
}

fn check_text(field: &'static str, s: &str, max: usize) -> Result<(), WireError> {
    if s.len() > max || s.chars().any(|c| c.is_control()) {
        return Err(WireError::Invalid {
            field,
            why: format!("must be at most {max} printable characters"),
        });
    }
    Ok(())
}

impl Frame {
    /// Check every field; the room core relies on this.
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Frame::Hello(h) => {
                check_id("hello.node", &h.node)?;
                check_text("hello.name", &h.name, 63)?;
                check_text("hello.room", &h.room, 64)?;
            }
            Frame::Announce(a) => {
                check_id("announce.leader", &a.leader)?;
                check_counter("announce.epoch", a.epoch)?;
                check_counter("announce.version", a.version)?;
                check_stamp("announce.decided", &a.decided)?;
                check_stamp("announce.pin_decided", &a.pin_decided)?;
                check_stamp("announce.control_decided", &a.control_decided)?;
                if let Some(p) = &a.control_pin {
                    if p.is_empty()
                        || p.len() > 32
                        || p.chars().any(|c| c.is_control() || c.is_whitespace())
                    {
                        return Err(WireError::Invalid {
                            field: "announce.control_pin",
                            why: "must be 1–32 characters without spaces".into(),
                        });
                    }
                }
                if let Some(p) = &a.pinned {
                    check_id("announce.pinned", p)?;
                }
                check_stamp("announce.setlist_decided", &a.setlist_decided)?;
                check_stamp("announce.song_decided", &a.song_decided)?;
                check_counter("announce.cues.max_seq", a.cues.max_seq)?;
                if a.song.is_some_and(|i| i as usize >= cues::MAX_SONGS) {
                    return Err(WireError::Invalid {
                        field: "announce.song",
                        why: format!("beyond {} songs", cues::MAX_SONGS),
                    });
                }
                if a.link_shift_ns.unsigned_abs() > MAX_LINK_SHIFT_NS as u64 {
                    return Err(WireError::Invalid {
                        field: "announce.link_shift_ns",
                        why: "beyond one hour".into(),
                    });
                }
                if Timeline::from_segments(&a.timeline).is_none() {
                    return Err(WireError::Invalid {
                        field: "announce.timeline",
                        why: "segments are empty, too many, out of order or discontinuous".into(),
                    });
                }
            }
            Frame::Change(c) => {
                check_counter("change.id", c.id)?;
                check_stamp("change.stamp", &c.stamp)?;
            }
            Frame::Query(Query::Status | Query::Change { .. } | Query::Unpin) => {}
            Frame::Query(Query::Setlist { .. } | Query::Song(_)) => {}
            Frame::Query(Query::SetlistLoad(songs)) => check_song_list("setlist", songs)?,
            Frame::Query(Query::CuePost { text, author }) => {
                cues::check_text(text).map_err(|e| WireError::Invalid {
                    field: "text",
                    why: e.to_string(),
                })?;
                cues::check_author(author).map_err(|e| WireError::Invalid {
                    field: "author",
                    why: e.to_string(),
                })?;
            }
            Frame::Query(Query::CueEdit { seq, text }) => {
                check_counter("seq", *seq)?;
                cues::check_text(text).map_err(|e| WireError::Invalid {
                    field: "text",
                    why: e.to_string(),
                })?;
            }
            Frame::Query(
                Query::CueDelete { seq } | Query::CueAck { seq } | Query::Cues { after: seq },
            ) => check_counter("seq", *seq)?,
            Frame::SetlistGet => {}
            Frame::Setlist(r) => {
                check_stamp("setlist.decided", &r.decided)?;
                check_song_list("setlist.songs", &r.songs)?;
            }
            Frame::Song(r) => {
                check_stamp("song.stamp", &r.stamp)?;
                if r.index as usize >= cues::MAX_SONGS {
                    return Err(WireError::Invalid {
                        field: "song.index",
                        why: format!("beyond {} songs", cues::MAX_SONGS),
                    });
                }
                cues::check_song(r.index as usize + 1, &r.song).map_err(|e| {
                    WireError::Invalid {
                        field: "song.song",
                        why: e.to_string(),
                    }
                })?;
            }
            Frame::Cues(v) => {
                if v.len() > cues::MAX_CUES {
                    return Err(WireError::Invalid {
                        field: "cues",
                        why: format!("more than {} cues", cues::MAX_CUES),
                    });
                }
                for c in v {
                    check_cue(c)?;
                }
            }
            Frame::CueHave(v) => {
                if v.len() > cues::MAX_CUES {
                    return Err(WireError::Invalid {
                        field: "cue_have",
                        why: format!("more than {} cues", cues::MAX_CUES),
                    });
                }
            }
            Frame::Bye(r) => check_text("bye", r, 200)?,
            Frame::Query(Query::Pin(n)) => check_text("pin", n, 63)?,
            Frame::Pin(p) => {
                if let Some(id) = &p.node {
                    check_id("pin.node", id)?;
                }
                check_stamp("pin.stamp", &p.stamp)?;
            }
            Frame::Reply(Reply::Status(j)) => {
                if j.len() > MAX_FRAME {
                    return Err(WireError::TooLarge(j.len()));
                }
            }
            Frame::Reply(Reply::Done(m) | Reply::Error(m)) => check_text("reply", m, 1000)?,
            Frame::Rtc(RtcRelay::Members(v)) => {
                if v.len() > MAX_TALKERS {
                    return Err(WireError::Invalid {
                        field: "rtc.members",
                        why: format!("{} members, at most {MAX_TALKERS}", v.len()),
                    });
                }
                for m in v {
                    check_rtc_id("rtc.members.id", &m.id)?;
                    check_text("rtc.members.name", &m.name, 64)?;
                }
            }
            Frame::Rtc(RtcRelay::Signal {
                from,
                to,
                kind,
                body,
            }) => {
                check_rtc_id("rtc.from", from)?;
                check_rtc_id("rtc.to", to)?;
                if body.len() > kind.max_body() {
                    return Err(WireError::Invalid {
                        field: "rtc.body",
                        why: format!(
                            "{} bytes, at most {} for {}",
                            body.len(),
                            kind.max_body(),
                            kind.as_str()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Encode with the length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let body =
            postcard::to_allocvec(self).expect("postcard encoding of an owned frame cannot fail");
        let len = (body.len() + 2) as u32;
        let mut out = Vec::with_capacity(4 + len as usize);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decode a frame body (the bytes after the length prefix).
    pub fn decode_body(b: &[u8]) -> Result<Frame, WireError> {
        let f: Frame = decode_versioned(b, MAX_FRAME)?;
        f.validate()?;
        Ok(f)
    }

    /// Decode one whole length-prefixed frame from a buffer.
    pub fn decode(b: &[u8]) -> Result<Frame, WireError> {
        if b.len() < 4 {
            return Err(WireError::Truncated);
        }
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if b.len() - 4 != len {
            return Err(WireError::Truncated);
        }
        Frame::decode_body(&b[4..])
    }
}

/// The shared preamble of frames and datagrams: at most `max` bytes, the protocol
/// version, then exactly one postcard value with nothing after it.
fn decode_versioned<T: serde::de::DeserializeOwned>(b: &[u8], max: usize) -> Result<T, WireError> {
    if b.len() > max {
        return Err(WireError::TooLarge(b.len()));
    }
    if b.len() < 2 {
        return Err(WireError::Truncated);
    }
    let v = u16::from_be_bytes([b[0], b[1]]);
    if v != PROTOCOL_VERSION {
        return Err(WireError::Version(v));
    }
    let (x, rest): (T, &[u8]) =
        postcard::take_from_bytes(&b[2..]).map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Decode(format!("{} trailing bytes", rest.len())));
    }
    Ok(x)
}

impl Datagram {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = PROTOCOL_VERSION.to_be_bytes().to_vec();
        out.extend(
            postcard::to_allocvec(self).expect("postcard encoding of a datagram cannot fail"),
        );
        out
    }
    pub fn decode(b: &[u8]) -> Result<Datagram, WireError> {
        let d = decode_versioned(b, MAX_DATAGRAM)?;
        if let Datagram::Pong { map, .. } = d {
            if map.rate_ppt.abs() > MAX_MAP_RATE_PPT {
                return Err(WireError::Invalid {
                    field: "map.rate_ppt",
                    why: format!("{} ppt is beyond ±1 %", map.rate_ppt),
                });
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::{Meter, Tempo};
    use proptest::prelude::*;

    fn announce() -> Frame {
        let tl = Timeline::start_at(
            5,
            Tempo::from_bpm(120.0).unwrap(),
            Meter::new(4).unwrap(),
            true,
        );
        Frame::Announce(Announce {
            session: SessionId { born_ms: 1, by: 2 },
            epoch: 3,
            leader: "0123456789abcdef".into(),
            leading: true,
            synced: true,
            priority: -1,
            timeline: tl.segments().to_vec(),
            version: 9,
            pinned: Some("00000000000000ff".into()),
            decided: Stamp {
                ms: 1_700_000_000_000,
                n: 2,
                node: "0123456789abcdef".into(),
            },
            pin_decided: Stamp::DEFAULT,
            control_pin: Some("123456".into()),
            control_decided: Stamp::DEFAULT,
            setlist_decided: Stamp::DEFAULT,
            song: Some(3),
            song_decided: Stamp::DEFAULT,
            cues: CueSummary {
                max_seq: 7,
                count: 7,
                digest: u64::MAX,
            },
            link_shift_ns: -1_234_567,
        })
    }

    #[test]
    fn numbers_from_strangers_are_refused_by_name() {
        let Frame::Announce(good) = announce() else {
            unreachable!()
        };
        let cases: Vec<(&str, Announce)> = vec![
            (
                "announce.epoch",
                Announce {
                    epoch: u64::MAX,
                    ..good.clone()
                },
            ),
            (
                "announce.version",
                Announce {
                    version: MAX_COUNTER + 1,
                    ..good.clone()
                },
            ),
            (
                "announce.decided",
                Announce {
                    decided: Stamp {
                        ms: u64::MAX,
                        n: 0,
                        node: "0123456789abcdef".into(),
                    },
                    ..good.clone()
                },
            ),
            (
                "announce.pin_decided",
                Announce {
                    pin_decided: Stamp {
                        ms: 5,
                        n: 0,
                        node: "not-a-node".into(),
                    },
                    ..good.clone()
                },
            ),
            (
                "announce.pinned",
                Announce {
                    pinned: Some("me".into()),
                    ..good.clone()
                },
            ),
            (
                "announce.link_shift_ns",
                Announce {
                    link_shift_ns: i64::MIN,
                    ..good.clone()
                },
            ),
        ];
        for (field, a) in cases {
            match Frame::decode(&Frame::Announce(a).encode()) {
                Err(WireError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let req = Frame::Pin(PinRequest {
            node: Some("0123456789abcdef".into()),
            stamp: Stamp {
                ms: 1 << 60,
                n: 0,
                node: "0123456789abcdef".into(),
            },
        });
        assert!(matches!(
            Frame::decode(&req.encode()),
            Err(WireError::Invalid {
                field: "pin.stamp",
                ..
            })
        ));
    }

    #[test]
    fn frames_round_trip() {
        let f = announce();
        assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        let d = Datagram::Pong {
            seq: 1,
            t1: -5,
            t2: i64::MAX,
            t3: 0,
            map: SessionMap {
                local_ref: -3,
                session_ref: i64::MIN,
                rate_ppt: -MAX_MAP_RATE_PPT,
            },
        };
        assert_eq!(Datagram::decode(&d.encode()).unwrap(), d);
        let wild = Datagram::Pong {
            seq: 1,
            t1: 0,
            t2: 0,
            t3: 0,
            map: SessionMap {
                local_ref: 0,
                session_ref: 0,
                rate_ppt: MAX_MAP_RATE_PPT + 1,
            },
        };
        let e = Datagram::decode(&wild.encode()).unwrap_err().to_string();
        assert!(e.contains("map.rate_ppt"), "{e}");
    }

    #[test]
    fn bad_frames_are_named() {
        let mut b = announce().encode();
        b[5] = 99; // version low byte
        assert_eq!(Frame::decode(&b), Err(WireError::Version(99)));
        let mut big = vec![0u8; 4];
        big[..4].copy_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert_eq!(Frame::decode(&big), Err(WireError::TooLarge(MAX_FRAME + 1)));
        let bad_tl = Frame::Announce(Announce {
            session: SessionId { born_ms: 1, by: 2 },
            epoch: 0,
            leader: "0123456789abcdef".into(),
            leading: true,
            synced: true,
            priority: 0,
            timeline: vec![],
            version: 0,
            pinned: None,
            decided: Stamp::DEFAULT,
            pin_decided: Stamp::DEFAULT,
            control_pin: None,
            control_decided: Stamp::DEFAULT,
            setlist_decided: Stamp::DEFAULT,
            song: None,
            song_decided: Stamp::DEFAULT,
            cues: CueSummary::default(),
            link_shift_ns: 0,
        });
        assert!(matches!(
            Frame::decode(&bad_tl.encode()),
            Err(WireError::Invalid {
                field: "announce.timeline",
                ..
            })
        ));
        let bad_id = Frame::Hello(Hello {
            node: "NOTHEX".into(),
            name: "x".into(),
            room: "r".into(),
            priority: 0,
            cli: false,
            boot: 0,
            mac: [0; 32],
        });
        assert!(matches!(
            Frame::decode(&bad_id.encode()),
            Err(WireError::Invalid {
                field: "hello.node",
                ..
            })
        ));
    }

    /// Cue replication stays within a frame at the limits: a full inventory (500 cues),
    /// a sync answer of the longest cues, and a 200-song setlist.
    #[test]
    fn cue_and_setlist_frames_fit_at_the_limits() {
        use crate::core::cues::{CueLog, MAX_CUES, MAX_CUE_CHARS};
        let node = |i: u64| format!("{i:016x}");
        let st = |ms: u64, i: u64| Stamp {
            ms: 1_700_000_000_000 + ms,
            n: u32::MAX,
            node: node(i),
        };
        let mut log = CueLog::default();
        for i in 0..MAX_CUES as u64 {
            log.post(
                st(i, i % 7),
                "ü".repeat(MAX_CUE_CHARS),
                "x".repeat(64),
                u64::MAX >> 12,
            );
            for b in 0..8 {
                log.ack(0, &node(b)).ok();
            }
        }
        let mut t = 0;
        log.number(|| {
            t += 1;
            st(10_000 + t, 1)
        });
        for seq in 1..=MAX_CUES as u64 {
            for b in 0..8 {
                log.ack(seq, &node(b)).unwrap();
            }
        }
        let have = Frame::CueHave(log.inventory()).encode();
        assert!(have.len() <= MAX_FRAME, "inventory: {} bytes", have.len());
        let batch = log.missing_from(&[]);
        assert!(batch.len() >= 2, "a batch carries several long cues");
        let cues = Frame::Cues(batch).encode();
        assert!(cues.len() <= MAX_FRAME, "sync answer: {} bytes", cues.len());
        assert!(Frame::decode(&cues).is_ok());
        let songs: Vec<Song> = (0..200)
            .map(|i| Song {
                title: format!("{i:0>60}"),
                tempo: crate::core::timeline::Tempo::from_bpm(399.999).unwrap(),
                meter: crate::core::timeline::Meter::new(16).unwrap(),
                count_in_bars: 4,
            })
            .collect();
        let list = Frame::Setlist(SetlistRecord {
            songs,
            decided: st(0, 1),
        })
        .encode();
        assert!(list.len() <= MAX_FRAME, "setlist: {} bytes", list.len());
        assert!(Frame::decode(&list).is_ok());
        // (measured: inventory 9511 bytes, sync answer 6543, 200-song setlist 13237)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn decoding_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Frame::decode(&b);
            let _ = Frame::decode_body(&b);
            let _ = Datagram::decode(&b);
        }

        #[test]
        fn decoding_mutated_frames_never_panics(i in 0usize..200, x in any::<u8>()) {
            let mut b = announce().encode();
            let n = b.len();
            b[i % n] ^= x;
            let _ = Frame::decode(&b);
        }
    }
}
