//! Wire encoding and decoding of every Ableton Link (v1, non-audio) message.
//!
//! Implemented from `structuresound/link-wire-spec` (CC-BY-4.0):
//!
//! * common serialization — Chapter 0 §4 (big-endian integers, 8-byte ids,
//!   the tagged *payload container* of §4.5);
//! * discovery frames `_asdp_v\x01` — Chapter 1 §3 (header), §4 (message
//!   types Alive / Response / ByeBye), §6 (peer-state payload entries `tmln`,
//!   `sess`, `stst`, `mep4`, `mep6`, `aep4`, `aep6`);
//! * measurement frames `_link_v\x01` — Chapter 2 §3 (Ping / Pong with the
//!   entries `__ht`, `__gt`, `_pgt`, `sess`).
//!
//! Decoding is *total*: every byte slice yields either a message or a
//! [`DecodeError`]; no input panics, and work is linear in the input length
//! (each payload entry consumes at least its 8-byte header).
//!
//! Optional entries are modelled as `Option`: Chapter 0 §4.5 rule 5 says an
//! absent entry means "value absent", and Chapter 1 §6 says a receiver treats
//! a missing peer-state entry as the all-zero default. The codec reports
//! absence; the state machine ([`crate::core::link::peer`]) applies the default.
//!
//! Unknown entry keys are skipped by their declared size (Ch. 0 §4.5 rule 2);
//! duplicate keys are applied last-one-wins (rule 7). A *recognized* entry
//! whose declared size differs from its fixed value size is an error
//! (rule 4), as is an entry whose size runs past the end of the message
//! (rule 3).

use ::core::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::fmt;

/// Discovery frame magic: ASCII `_asdp_v` + version byte 1 (Ch. 1 §3).
pub const DISCOVERY_MAGIC: [u8; 8] = *b"_asdp_v\x01";
/// Measurement frame magic: ASCII `_link_v` + version byte 1 (Ch. 2 §3.1).
pub const MEASUREMENT_MAGIC: [u8; 8] = *b"_link_v\x01";
/// Length of the discovery header: magic, type, ttl, groupId, NodeId (Ch. 1 §3).
pub const DISCOVERY_HEADER_LEN: usize = 20;
/// Length of the measurement header: magic, type (Ch. 2 §3.1).
pub const MEASUREMENT_HEADER_LEN: usize = 9;
/// Receivers accept datagrams up to this size (Ch. 1 §3.1).
pub const MAX_MESSAGE_SIZE: usize = 512;
/// Senders keep every datagram at or below this size (Ch. 1 §3.1: the
/// reference encoder rejects 512 or more).
pub const MAX_ENCODED_SIZE: usize = 511;
/// A responder answers only pings whose payload is at most this long (Ch. 2 §4.3).
pub const MAX_PING_PAYLOAD: usize = 32;
/// Size of a payload-entry header: fourcc key + `u32` size (Ch. 0 §4.5).
pub const ENTRY_HEADER_LEN: usize = 8;

/// Payload entry keys (fourcc codes read as big-endian `u32`), Ch. 0 §4.9,
/// Ch. 1 §6 and Ch. 2 §3.2.
pub mod keys {
    /// Session timeline (24 bytes).
    pub const TMLN: u32 = u32::from_be_bytes(*b"tmln");
    /// Session id (8 bytes).
    pub const SESS: u32 = u32::from_be_bytes(*b"sess");
    /// Start/stop state (17 bytes).
    pub const STST: u32 = u32::from_be_bytes(*b"stst");
    /// Measurement endpoint, IPv4 (6 bytes).
    pub const MEP4: u32 = u32::from_be_bytes(*b"mep4");
    /// Measurement endpoint, IPv6 (18 bytes).
    pub const MEP6: u32 = u32::from_be_bytes(*b"mep6");
    /// LinkAudio endpoint, IPv4 (6 bytes).
    pub const AEP4: u32 = u32::from_be_bytes(*b"aep4");
    /// LinkAudio endpoint, IPv6 (18 bytes).
    pub const AEP6: u32 = u32::from_be_bytes(*b"aep6");
    /// Host time of the measurement initiator (8 bytes).
    pub const HOST_TIME: u32 = u32::from_be_bytes(*b"__ht");
    /// Ghost time of the measurement responder (8 bytes).
    pub const GHOST_TIME: u32 = u32::from_be_bytes(*b"__gt");
    /// Previous ghost time, echoed by the initiator (8 bytes).
    pub const PREV_GHOST_TIME: u32 = u32::from_be_bytes(*b"_pgt");
}

/// Value sizes of the recognized entries.
pub mod sizes {
    /// `tmln`: tempo, beat origin, time origin.
    pub const TMLN: usize = 24;
    /// `sess`: 8-byte id.
    pub const SESS: usize = 8;
    /// `stst`: isPlaying u8, beats i64, timestamp i64.
    pub const STST: usize = 17;
    /// `mep4` / `aep4`: IPv4 address + port.
    pub const EP4: usize = 6;
    /// `mep6` / `aep6`: IPv6 address + port.
    pub const EP6: usize = 18;
    /// `__ht`, `__gt`, `_pgt`: i64 microseconds.
    pub const TIME: usize = 8;
}

/// An 8-byte node / session identifier (Ch. 0 §4.8). Ordering is byte-wise,
/// which is the order the session tie-break of Ch. 2 §7.2 uses.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub [u8; 8]);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A session timeline (Ch. 2 §6): `beats(g) = beatOrigin + (g − timeOrigin) / microsPerBeat`.
///
/// All three fields are the raw wire values; see [`crate::core::link::timeline`] for the
/// arithmetic and the 20–999 bpm clamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Timeline {
    /// Tempo as a period: microseconds per beat (Ch. 0 §4.7).
    pub micros_per_beat: i64,
    /// Beat origin in micro-beats; also the priority stamp (Ch. 2 §6 rule 2).
    pub beat_origin: i64,
    /// Ghost time (µs) at which the timeline is at `beat_origin`.
    pub time_origin: i64,
}

/// Start/stop state (Ch. 2 §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct StartStopState {
    /// Transport running. Decodes any nonzero byte as true (Ch. 0 §4.1).
    pub is_playing: bool,
    /// Session beat (µbeats) at which the transport starts/stopped.
    pub beats: i64,
    /// Ghost time (µs) of the user action; later timestamp wins.
    pub timestamp: i64,
}

/// Peer-state payload of Alive / Response messages (Ch. 1 §6).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerState {
    /// `tmln`
    pub timeline: Option<Timeline>,
    /// `sess`
    pub session_id: Option<NodeId>,
    /// `stst`
    pub start_stop: Option<StartStopState>,
    /// `mep4`
    pub measurement_v4: Option<SocketAddrV4>,
    /// `mep6` (scope id is never on the wire; decodes as 0)
    pub measurement_v6: Option<SocketAddrV6>,
    /// `aep4` (LinkAudio; decoded and re-encoded, otherwise unused here)
    pub audio_v4: Option<SocketAddrV4>,
    /// `aep6`
    pub audio_v6: Option<SocketAddrV6>,
}

/// Discovery message type (Ch. 1 §4). `Invalid` (0) is never sent and is a
/// decode error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiscoveryKind {
    /// 1: periodic / on-change multicast state dump.
    Alive,
    /// 2: unicast reply to an Alive, same payload encoding.
    Response,
    /// 3: departure, empty payload, ttl 0.
    ByeBye,
}

impl DiscoveryKind {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            DiscoveryKind::Alive => 1,
            DiscoveryKind::Response => 2,
            DiscoveryKind::ByeBye => 3,
        }
    }
    /// From wire value; `None` for 0 and unknown values.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(DiscoveryKind::Alive),
            2 => Some(DiscoveryKind::Response),
            3 => Some(DiscoveryKind::ByeBye),
            _ => None,
        }
    }
}

/// Parsed discovery header (Ch. 1 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscoveryHeader {
    /// Message type.
    pub kind: DiscoveryKind,
    /// Seconds the carried state stays valid.
    pub ttl: u8,
    /// Session group; always 0 in v1 (receivers ignore nonzero).
    pub group_id: u16,
    /// Sender's NodeId.
    pub node_id: NodeId,
}

/// A complete discovery message. For `ByeBye` the state is always empty
/// (any payload bytes a ByeBye carries are ignored on decode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryMessage {
    /// Header fields.
    pub header: DiscoveryHeader,
    /// Peer state (Alive / Response); default for ByeBye.
    pub state: PeerState,
}

/// Measurement message type (Ch. 2 §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MeasurementKind {
    /// 1
    Ping,
    /// 2
    Pong,
}

impl MeasurementKind {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            MeasurementKind::Ping => 1,
            MeasurementKind::Pong => 2,
        }
    }
    /// From wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(MeasurementKind::Ping),
            2 => Some(MeasurementKind::Pong),
            _ => None,
        }
    }
}

/// Payload of a Ping or Pong (Ch. 2 §3.2). A Ping carries `host_time` and,
/// after the first round trip, `prev_ghost_time`; a Pong carries
/// `session_id` + `ghost_time` followed by the verbatim echo of the Ping
/// payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MeasurementPayload {
    /// `sess` (Pong only): the responder's current session.
    pub session_id: Option<NodeId>,
    /// `__gt` (Pong only): responder ghost time at pong transmit.
    pub ghost_time: Option<i64>,
    /// `__ht`: initiator host time at ping transmit.
    pub host_time: Option<i64>,
    /// `_pgt`: previous pong's `__gt`, echoed by the initiator.
    pub prev_ghost_time: Option<i64>,
}

/// A complete measurement message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasurementMessage {
    /// Ping or Pong.
    pub kind: MeasurementKind,
    /// Entries.
    pub payload: MeasurementPayload,
}

/// Any Link message this crate understands, dispatched on the frame magic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `_asdp_v\x01` frame.
    Discovery(DiscoveryMessage),
    /// `_link_v\x01` frame.
    Measurement(MeasurementMessage),
}

/// Why a byte slice is not a valid message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the fixed frame (magic + header).
    TooShort {
        /// Bytes required.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The first 8 bytes are not the expected frame magic.
    BadMagic,
    /// Discovery message type 0 (Invalid) or an unknown value.
    UnknownDiscoveryType(u8),
    /// Measurement message type other than 1 / 2.
    UnknownMeasurementType(u8),
    /// Fewer than 8 bytes left where an entry header should start.
    TruncatedEntryHeader {
        /// Offset of the partial header within the payload.
        offset: usize,
    },
    /// An entry's declared size runs past the end of the message.
    EntryOverrun {
        /// Entry key.
        key: u32,
        /// Declared value size.
        declared: u32,
        /// Bytes actually left.
        available: usize,
    },
    /// A recognized entry's declared size differs from its value size.
    EntrySizeMismatch {
        /// Entry key.
        key: u32,
        /// Size the entry's encoding requires.
        expected: usize,
        /// Size declared on the wire.
        declared: usize,
    },
}

fn fourcc(key: u32) -> String {
    key.to_be_bytes()
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::TooShort { needed, got } => {
                write!(f, "datagram too short: {got} bytes, need at least {needed}")
            }
            DecodeError::BadMagic => write!(f, "not a Link frame (bad magic)"),
            DecodeError::UnknownDiscoveryType(t) => write!(f, "unknown discovery message type {t}"),
            DecodeError::UnknownMeasurementType(t) => {
                write!(f, "unknown measurement message type {t}")
            }
            DecodeError::TruncatedEntryHeader { offset } => {
                write!(
                    f,
                    "truncated payload entry header at payload offset {offset}"
                )
            }
            DecodeError::EntryOverrun {
                key,
                declared,
                available,
            } => write!(
                f,
                "entry '{}' declares {declared} bytes but only {available} remain",
                fourcc(key)
            ),
            DecodeError::EntrySizeMismatch {
                key,
                expected,
                declared,
            } => write!(
                f,
                "entry '{}' declares {declared} bytes, its value is {expected} bytes",
                fourcc(key)
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

// ---------------------------------------------------------------------------
// Payload container (Ch. 0 §4.5)
// ---------------------------------------------------------------------------

/// Walk a payload container, calling `f(key, value)` for each entry in
/// stream order. Fails on a partial header or an overrunning entry.
pub fn for_each_entry(
    payload: &[u8],
    mut f: impl FnMut(u32, &[u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut off = 0usize;
    while off < payload.len() {
        let rest = &payload[off..];
        if rest.len() < ENTRY_HEADER_LEN {
            return Err(DecodeError::TruncatedEntryHeader { offset: off });
        }
        let key = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let declared = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let body = &rest[ENTRY_HEADER_LEN..];
        let size = declared as usize;
        if size > body.len() {
            return Err(DecodeError::EntryOverrun {
                key,
                declared,
                available: body.len(),
            });
        }
        f(key, &body[..size])?;
        off += ENTRY_HEADER_LEN + size;
    }
    Ok(())
}

fn expect_size(key: u32, value: &[u8], expected: usize) -> Result<(), DecodeError> {
    if value.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::EntrySizeMismatch {
            key,
            expected,
            declared: value.len(),
        })
    }
}

fn be_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    i64::from_be_bytes(a)
}

fn id_from(b: &[u8]) -> NodeId {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    NodeId(a)
}

fn ep4_from(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    )
}

fn ep6_from(b: &[u8]) -> SocketAddrV6 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    SocketAddrV6::new(Ipv6Addr::from(a), u16::from_be_bytes([b[16], b[17]]), 0, 0)
}

fn put_entry(out: &mut Vec<u8>, key: u32, value: &[u8]) {
    // Ch. 0 §4.5 rule 5: a zero-length value is omitted entirely.
    if value.is_empty() {
        return;
    }
    out.extend_from_slice(&key.to_be_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// Encode a timeline value (24 bytes).
pub fn timeline_bytes(t: &Timeline) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[0..8].copy_from_slice(&t.micros_per_beat.to_be_bytes());
    v[8..16].copy_from_slice(&t.beat_origin.to_be_bytes());
    v[16..24].copy_from_slice(&t.time_origin.to_be_bytes());
    v
}

/// Encode a start/stop value (17 bytes).
pub fn start_stop_bytes(s: &StartStopState) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[0] = s.is_playing as u8;
    v[1..9].copy_from_slice(&s.beats.to_be_bytes());
    v[9..17].copy_from_slice(&s.timestamp.to_be_bytes());
    v
}

fn ep4_bytes(e: &SocketAddrV4) -> [u8; 6] {
    let mut v = [0u8; 6];
    v[0..4].copy_from_slice(&e.ip().octets());
    v[4..6].copy_from_slice(&e.port().to_be_bytes());
    v
}

fn ep6_bytes(e: &SocketAddrV6) -> [u8; 18] {
    let mut v = [0u8; 18];
    v[0..16].copy_from_slice(&e.ip().octets());
    v[16..18].copy_from_slice(&e.port().to_be_bytes());
    v
}

// ---------------------------------------------------------------------------
// Peer state (Ch. 1 §6)
// ---------------------------------------------------------------------------

/// Append the peer-state payload entries, in the reference's order
/// (`tmln`, `sess`, `stst`, `mep4`/`mep6`, then `aep4`/`aep6`).
pub fn encode_peer_state(state: &PeerState, out: &mut Vec<u8>) {
    if let Some(t) = &state.timeline {
        put_entry(out, keys::TMLN, &timeline_bytes(t));
    }
    if let Some(s) = &state.session_id {
        put_entry(out, keys::SESS, &s.0);
    }
    if let Some(s) = &state.start_stop {
        put_entry(out, keys::STST, &start_stop_bytes(s));
    }
    if let Some(e) = &state.measurement_v4 {
        put_entry(out, keys::MEP4, &ep4_bytes(e));
    }
    if let Some(e) = &state.measurement_v6 {
        put_entry(out, keys::MEP6, &ep6_bytes(e));
    }
    if let Some(e) = &state.audio_v4 {
        put_entry(out, keys::AEP4, &ep4_bytes(e));
    }
    if let Some(e) = &state.audio_v6 {
        put_entry(out, keys::AEP6, &ep6_bytes(e));
    }
}

/// Decode a peer-state payload container. Unknown keys are skipped.
pub fn decode_peer_state(payload: &[u8]) -> Result<PeerState, DecodeError> {
    let mut st = PeerState::default();
    for_each_entry(payload, |key, v| {
        match key {
            keys::TMLN => {
                expect_size(key, v, sizes::TMLN)?;
                st.timeline = Some(Timeline {
                    micros_per_beat: be_i64(&v[0..8]),
                    beat_origin: be_i64(&v[8..16]),
                    time_origin: be_i64(&v[16..24]),
                });
            }
            keys::SESS => {
                expect_size(key, v, sizes::SESS)?;
                st.session_id = Some(id_from(v));
            }
            keys::STST => {
                expect_size(key, v, sizes::STST)?;
                st.start_stop = Some(StartStopState {
                    is_playing: v[0] != 0,
                    beats: be_i64(&v[1..9]),
                    timestamp: be_i64(&v[9..17]),
                });
            }
            keys::MEP4 => {
                expect_size(key, v, sizes::EP4)?;
                st.measurement_v4 = Some(ep4_from(v));
            }
            keys::MEP6 => {
                expect_size(key, v, sizes::EP6)?;
                st.measurement_v6 = Some(ep6_from(v));
            }
            keys::AEP4 => {
                expect_size(key, v, sizes::EP4)?;
                st.audio_v4 = Some(ep4_from(v));
            }
            keys::AEP6 => {
                expect_size(key, v, sizes::EP6)?;
                st.audio_v6 = Some(ep6_from(v));
            }
            _ => {} // rule 2: skip unknown entries by their size
        }
        Ok(())
    })?;
    Ok(st)
}

// ---------------------------------------------------------------------------
// Discovery frames (Ch. 1 §3–§4)
// ---------------------------------------------------------------------------

/// Encode the 20-byte discovery header.
pub fn encode_discovery_header(h: &DiscoveryHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(&DISCOVERY_MAGIC);
    out.push(h.kind.to_u8());
    out.push(h.ttl);
    out.extend_from_slice(&h.group_id.to_be_bytes());
    out.extend_from_slice(&h.node_id.0);
}

/// Encode a discovery message. ByeBye is always encoded with an empty payload.
pub fn encode_discovery(msg: &DiscoveryMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_discovery_header(&msg.header, &mut out);
    if msg.header.kind != DiscoveryKind::ByeBye {
        encode_peer_state(&msg.state, &mut out);
    }
    debug_assert!(out.len() <= MAX_ENCODED_SIZE);
    out
}

/// Parse only the discovery header; returns it and the payload slice.
///
/// Used by the receive path because a Response to an Alive is due even when
/// the Alive's payload does not parse (Ch. 1 §4.2).
pub fn decode_discovery_header(bytes: &[u8]) -> Result<(DiscoveryHeader, &[u8]), DecodeError> {
    if bytes.len() < DISCOVERY_HEADER_LEN {
        if bytes.len() >= 8 && bytes[..8] != DISCOVERY_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        return Err(DecodeError::TooShort {
            needed: DISCOVERY_HEADER_LEN,
            got: bytes.len(),
        });
    }
    if bytes[..8] != DISCOVERY_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let kind =
        DiscoveryKind::from_u8(bytes[8]).ok_or(DecodeError::UnknownDiscoveryType(bytes[8]))?;
    let header = DiscoveryHeader {
        kind,
        ttl: bytes[9],
        group_id: u16::from_be_bytes([bytes[10], bytes[11]]),
        node_id: id_from(&bytes[12..20]),
    };
    Ok((header, &bytes[DISCOVERY_HEADER_LEN..]))
}

/// Decode a complete discovery message.
pub fn decode_discovery(bytes: &[u8]) -> Result<DiscoveryMessage, DecodeError> {
    let (header, payload) = decode_discovery_header(bytes)?;
    let state = match header.kind {
        DiscoveryKind::ByeBye => PeerState::default(),
        _ => decode_peer_state(payload)?,
    };
    Ok(DiscoveryMessage { header, state })
}

// ---------------------------------------------------------------------------
// Measurement frames (Ch. 2 §3–§4)
// ---------------------------------------------------------------------------

/// Append measurement entries in the order `sess`, `__gt`, `__ht`, `_pgt`
/// — for a Pong this is "own entries, then the ping's entries" (Ch. 2 §4.1).
pub fn encode_measurement_payload(p: &MeasurementPayload, out: &mut Vec<u8>) {
    if let Some(s) = &p.session_id {
        put_entry(out, keys::SESS, &s.0);
    }
    if let Some(g) = p.ghost_time {
        put_entry(out, keys::GHOST_TIME, &g.to_be_bytes());
    }
    if let Some(h) = p.host_time {
        put_entry(out, keys::HOST_TIME, &h.to_be_bytes());
    }
    if let Some(g) = p.prev_ghost_time {
        put_entry(out, keys::PREV_GHOST_TIME, &g.to_be_bytes());
    }
}

/// Encode a measurement message from typed fields.
pub fn encode_measurement(msg: &MeasurementMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.extend_from_slice(&MEASUREMENT_MAGIC);
    out.push(msg.kind.to_u8());
    encode_measurement_payload(&msg.payload, &mut out);
    out
}

/// Encode a Ping: `{__ht = host_time}` plus `{_pgt}` when continuing a chain.
pub fn encode_ping(host_time: i64, prev_ghost_time: Option<i64>) -> Vec<u8> {
    encode_measurement(&MeasurementMessage {
        kind: MeasurementKind::Ping,
        payload: MeasurementPayload {
            host_time: Some(host_time),
            prev_ghost_time,
            ..Default::default()
        },
    })
}

/// Encode a Pong the way a responder must (Ch. 2 §4.3): own `sess` and `__gt`
/// entries followed by the ping's payload bytes, echoed verbatim.
pub fn encode_pong_echo(session_id: NodeId, ghost_time: i64, ping_payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MEASUREMENT_HEADER_LEN + 32 + ping_payload.len());
    out.extend_from_slice(&MEASUREMENT_MAGIC);
    out.push(MeasurementKind::Pong.to_u8());
    put_entry(&mut out, keys::SESS, &session_id.0);
    put_entry(&mut out, keys::GHOST_TIME, &ghost_time.to_be_bytes());
    out.extend_from_slice(ping_payload);
    out
}

/// Parse only the measurement frame; returns the type and raw payload.
pub fn decode_measurement_header(bytes: &[u8]) -> Result<(MeasurementKind, &[u8]), DecodeError> {
    if bytes.len() < MEASUREMENT_HEADER_LEN {
        if bytes.len() >= 8 && bytes[..8] != MEASUREMENT_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        return Err(DecodeError::TooShort {
            needed: MEASUREMENT_HEADER_LEN,
            got: bytes.len(),
        });
    }
    if bytes[..8] != MEASUREMENT_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let kind =
        MeasurementKind::from_u8(bytes[8]).ok_or(DecodeError::UnknownMeasurementType(bytes[8]))?;
    Ok((kind, &bytes[MEASUREMENT_HEADER_LEN..]))
}

/// Decode the entries of a measurement payload. Unknown keys are skipped.
pub fn decode_measurement_payload(payload: &[u8]) -> Result<MeasurementPayload, DecodeError> {
    let mut p = MeasurementPayload::default();
    for_each_entry(payload, |key, v| {
        match key {
            keys::SESS => {
                expect_size(key, v, sizes::SESS)?;
                p.session_id = Some(id_from(v));
            }
            keys::GHOST_TIME => {
                expect_size(key, v, sizes::TIME)?;
                p.ghost_time = Some(be_i64(v));
            }
            keys::HOST_TIME => {
                expect_size(key, v, sizes::TIME)?;
                p.host_time = Some(be_i64(v));
            }
            keys::PREV_GHOST_TIME => {
                expect_size(key, v, sizes::TIME)?;
                p.prev_ghost_time = Some(be_i64(v));
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(p)
}

/// Decode a complete measurement message.
pub fn decode_measurement(bytes: &[u8]) -> Result<MeasurementMessage, DecodeError> {
    let (kind, payload) = decode_measurement_header(bytes)?;
    Ok(MeasurementMessage {
        kind,
        payload: decode_measurement_payload(payload)?,
    })
}

// ---------------------------------------------------------------------------
// Top level
// ---------------------------------------------------------------------------

/// Decode any Link datagram, dispatching on the 8-byte frame magic.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() >= 8 && bytes[..8] == MEASUREMENT_MAGIC {
        decode_measurement(bytes).map(Message::Measurement)
    } else if bytes.len() >= 8 && bytes[..8] == DISCOVERY_MAGIC {
        decode_discovery(bytes).map(Message::Discovery)
    } else if bytes.len() < 8 {
        Err(DecodeError::TooShort {
            needed: 8,
            got: bytes.len(),
        })
    } else {
        Err(DecodeError::BadMagic)
    }
}

/// Encode any message.
pub fn encode(msg: &Message) -> Vec<u8> {
    match msg {
        Message::Discovery(d) => encode_discovery(d),
        Message::Measurement(m) => encode_measurement(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const ID_A: NodeId = NodeId([0x45, 0x7a, 0x3b, 0x5f, 0x4c, 0x6e, 0x7b, 0x4c]);
    const ID_B: NodeId = NodeId([0x63, 0x3e, 0x26, 0x21, 0x61, 0x54, 0x21, 0x63]);

    #[test]
    fn fourcc_values_match_spec_tables() {
        // Ch. 0 §4.9, Ch. 1 §8, Ch. 2 §11.
        assert_eq!(keys::TMLN, 0x746d6c6e);
        assert_eq!(keys::SESS, 0x73657373);
        assert_eq!(keys::STST, 0x73747374);
        assert_eq!(keys::MEP4, 0x6d657034);
        assert_eq!(keys::MEP6, 0x6d657036);
        assert_eq!(keys::AEP4, 0x61657034);
        assert_eq!(keys::AEP6, 0x61657036);
        assert_eq!(keys::HOST_TIME, 0x5f5f6874);
        assert_eq!(keys::GHOST_TIME, 0x5f5f6774);
        assert_eq!(keys::PREV_GHOST_TIME, 0x5f706774);
        assert_eq!(
            DISCOVERY_MAGIC,
            [0x5F, 0x61, 0x73, 0x64, 0x70, 0x5F, 0x76, 0x01]
        );
        assert_eq!(
            MEASUREMENT_MAGIC,
            [0x5F, 0x6C, 0x69, 0x6E, 0x6B, 0x5F, 0x76, 0x01]
        );
    }

    fn plain_state() -> PeerState {
        PeerState {
            // 120 bpm -> 500000 us/beat (Ch. 0 §4.7 example)
            timeline: Some(Timeline {
                micros_per_beat: 500_000,
                beat_origin: 999_822,
                time_origin: 1_234_567,
            }),
            session_id: Some(ID_B),
            start_stop: Some(StartStopState {
                is_playing: true,
                beats: 4_000_000,
                timestamp: 7_000_000,
            }),
            measurement_v4: Some(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 42802)),
            ..Default::default()
        }
    }

    const ALIVE_107: &str = "
        5f 61 73 64 70 5f 76 01  01 05 00 00  45 7a 3b 5f 4c 6e 7b 4c
        74 6d 6c 6e 00 00 00 18  00 00 00 00 00 07 a1 20  00 00 00 00 00 0f 41 8e  00 00 00 00 00 12 d6 87
        73 65 73 73 00 00 00 08  63 3e 26 21 61 54 21 63
        73 74 73 74 00 00 00 11  01  00 00 00 00 00 3d 09 00  00 00 00 00 00 6a cf c0
        6d 65 70 34 00 00 00 06  7f 00 00 01 a7 32";

    #[test]
    fn alive_plain_link_ipv4_is_107_bytes_byte_exact() {
        // Ch. 1 §3 header + §6 entries; §6.1: plain Link on IPv4 = 107 bytes.
        let msg = DiscoveryMessage {
            header: DiscoveryHeader {
                kind: DiscoveryKind::Alive,
                ttl: 5,
                group_id: 0,
                node_id: ID_A,
            },
            state: plain_state(),
        };
        let bytes = encode_discovery(&msg);
        assert_eq!(bytes.len(), 107);
        assert_eq!(bytes, hex(ALIVE_107));
        assert_eq!(decode_discovery(&bytes).unwrap(), msg);
        assert_eq!(decode(&bytes).unwrap(), Message::Discovery(msg));
    }

    #[test]
    fn response_differs_from_alive_only_in_type_byte() {
        let msg = DiscoveryMessage {
            header: DiscoveryHeader {
                kind: DiscoveryKind::Response,
                ttl: 5,
                group_id: 0,
                node_id: ID_A,
            },
            state: plain_state(),
        };
        let bytes = encode_discovery(&msg);
        let mut expected = hex(ALIVE_107);
        expected[8] = 0x02;
        assert_eq!(bytes, expected);
        assert_eq!(decode_discovery(&bytes).unwrap(), msg);
    }

    #[test]
    fn byebye_is_20_bytes_ttl_0_empty_payload() {
        // Ch. 1 §4.3: 20-byte ByeBye, ttl 0, empty payload.
        let msg = DiscoveryMessage {
            header: DiscoveryHeader {
                kind: DiscoveryKind::ByeBye,
                ttl: 0,
                group_id: 0,
                node_id: ID_A,
            },
            state: PeerState::default(),
        };
        let bytes = encode_discovery(&msg);
        assert_eq!(
            bytes,
            hex("5f 61 73 64 70 5f 76 01 03 00 00 00 45 7a 3b 5f 4c 6e 7b 4c")
        );
        assert_eq!(decode_discovery(&bytes).unwrap(), msg);
        // A ByeBye's (unexpected) payload is ignored.
        let mut with_junk = bytes.clone();
        with_junk.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode_discovery(&with_junk).unwrap(), msg);
    }

    #[test]
    fn linkaudio_peer_state_is_121_bytes_and_ipv6_is_119() {
        // Ch. 1 §6.1.
        let mut st = plain_state();
        st.audio_v4 = Some(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 40000));
        let mut msg = DiscoveryMessage {
            header: DiscoveryHeader {
                kind: DiscoveryKind::Alive,
                ttl: 5,
                group_id: 0,
                node_id: ID_A,
            },
            state: st,
        };
        let b = encode_discovery(&msg);
        assert_eq!(b.len(), 121);
        assert_eq!(
            &b[107..],
            &hex("61 65 70 34 00 00 00 06 7f 00 00 01 9c 40")[..]
        );
        assert_eq!(decode_discovery(&b).unwrap(), msg);

        msg.state.audio_v4 = None;
        msg.state.measurement_v4 = None;
        msg.state.measurement_v6 =
            Some(SocketAddrV6::new("fe80::1".parse().unwrap(), 0x1234, 0, 0));
        let b = encode_discovery(&msg);
        assert_eq!(b.len(), 119);
        assert_eq!(
            &b[93..],
            &hex("6d 65 70 36 00 00 00 12 fe 80 00 00 00 00 00 00 00 00 00 00 00 00 00 01 12 34")[..]
        );
        assert_eq!(decode_discovery(&b).unwrap(), msg);
        msg.state.audio_v6 = Some(SocketAddrV6::new("fe80::2".parse().unwrap(), 7, 0, 0));
        let b = encode_discovery(&msg);
        assert_eq!(decode_discovery(&b).unwrap(), msg);
    }

    #[test]
    fn first_ping_is_25_bytes_byte_exact() {
        // Ch. 2 §4.1: first ping = 9 + 16 bytes, {__ht}.
        let b = encode_ping(0x0102030405060708, None);
        assert_eq!(
            b,
            hex("5f 6c 69 6e 6b 5f 76 01 01  5f 5f 68 74 00 00 00 08 01 02 03 04 05 06 07 08")
        );
        let m = decode_measurement(&b).unwrap();
        assert_eq!(m.kind, MeasurementKind::Ping);
        assert_eq!(m.payload.host_time, Some(0x0102030405060708));
        assert_eq!(m.payload.prev_ghost_time, None);
    }

    #[test]
    fn chained_ping_is_41_bytes_byte_exact() {
        let b = encode_ping(1000, Some(-2));
        assert_eq!(
            b,
            hex("5f 6c 69 6e 6b 5f 76 01 01
                 5f 5f 68 74 00 00 00 08 00 00 00 00 00 00 03 e8
                 5f 70 67 74 00 00 00 08 ff ff ff ff ff ff ff fe")
        );
        let m = decode_measurement(&b).unwrap();
        assert_eq!(
            m.payload,
            MeasurementPayload {
                host_time: Some(1000),
                prev_ghost_time: Some(-2),
                ..Default::default()
            }
        );
    }

    #[test]
    fn pongs_are_57_and_73_bytes_with_verbatim_echo() {
        // Ch. 2 §4.1 / §4.3: pong = sess + __gt + verbatim ping payload.
        let ping = encode_ping(1000, None);
        let pong = encode_pong_echo(ID_B, 5_000_000, &ping[9..]);
        assert_eq!(pong.len(), 57);
        assert_eq!(
            pong,
            hex("5f 6c 69 6e 6b 5f 76 01 02
                 73 65 73 73 00 00 00 08 63 3e 26 21 61 54 21 63
                 5f 5f 67 74 00 00 00 08 00 00 00 00 00 4c 4b 40
                 5f 5f 68 74 00 00 00 08 00 00 00 00 00 00 03 e8")
        );
        let m = decode_measurement(&pong).unwrap();
        assert_eq!(m.kind, MeasurementKind::Pong);
        assert_eq!(
            m.payload,
            MeasurementPayload {
                session_id: Some(ID_B),
                ghost_time: Some(5_000_000),
                host_time: Some(1000),
                prev_ghost_time: None
            }
        );
        // Typed encoding produces the same bytes.
        assert_eq!(encode_measurement(&m), pong);

        let ping2 = encode_ping(2000, Some(5_000_000));
        let pong2 = encode_pong_echo(ID_B, 5_000_500, &ping2[9..]);
        assert_eq!(pong2.len(), 73);
        assert_eq!(&pong2[41..], &ping2[9..]);
        let m2 = decode_measurement(&pong2).unwrap();
        assert_eq!(m2.payload.prev_ghost_time, Some(5_000_000));
        assert_eq!(encode_measurement(&m2), pong2);
    }

    #[test]
    fn admission_errors() {
        assert_eq!(
            decode(&[]),
            Err(DecodeError::TooShort { needed: 8, got: 0 })
        );
        assert_eq!(decode(b"hello world, not link"), Err(DecodeError::BadMagic));
        assert_eq!(
            decode_discovery(&DISCOVERY_MAGIC),
            Err(DecodeError::TooShort { needed: 20, got: 8 })
        );
        let mut b = hex(ALIVE_107);
        b[8] = 0; // Invalid
        assert_eq!(decode(&b), Err(DecodeError::UnknownDiscoveryType(0)));
        b[8] = 9;
        assert_eq!(decode(&b), Err(DecodeError::UnknownDiscoveryType(9)));
        let mut p = encode_ping(1, None);
        p[8] = 3;
        assert_eq!(decode(&p), Err(DecodeError::UnknownMeasurementType(3)));
    }

    #[test]
    fn unknown_entries_are_skipped_by_length() {
        let mut b = hex(ALIVE_107);
        // Insert an unknown entry 'zzzz' with 5 bytes between header and tmln.
        let unknown = hex("7a 7a 7a 7a 00 00 00 05 01 02 03 04 05");
        b.splice(20..20, unknown.iter().copied());
        let m = decode_discovery(&b).unwrap();
        assert_eq!(m.state, plain_state());
        // Unknown entries with size 0 too.
        let mut p = encode_ping(7, None);
        p.extend_from_slice(&hex("71 71 71 71 00 00 00 00"));
        assert_eq!(decode_measurement(&p).unwrap().payload.host_time, Some(7));
        // A peer-state key inside a measurement payload is unknown there.
        let mut p = encode_ping(7, None);
        p.extend_from_slice(&hex("73 74 73 74 00 00 00 01 00"));
        assert_eq!(decode_measurement(&p).unwrap().payload.host_time, Some(7));
    }

    #[test]
    fn payload_errors() {
        let good = hex(ALIVE_107);
        // Overrun: cut the last byte off.
        let cut = &good[..good.len() - 1];
        assert_eq!(
            decode_discovery(cut),
            Err(DecodeError::EntryOverrun {
                key: keys::MEP4,
                declared: 6,
                available: 5
            })
        );
        // Truncated entry header.
        let mut t = good.clone();
        t.extend_from_slice(&[0x61, 0x62, 0x63]);
        assert_eq!(
            decode_discovery(&t),
            Err(DecodeError::TruncatedEntryHeader { offset: 87 })
        );
        // Recognized entry with the wrong size (sess declared as 9 bytes).
        let bad = hex("5f 61 73 64 70 5f 76 01 01 05 00 00 45 7a 3b 5f 4c 6e 7b 4c
                       73 65 73 73 00 00 00 09 63 3e 26 21 61 54 21 63 00");
        assert_eq!(
            decode_discovery(&bad),
            Err(DecodeError::EntrySizeMismatch {
                key: keys::SESS,
                expected: 8,
                declared: 9
            })
        );
        // Header still parses, for the respond-before-process rule.
        assert!(decode_discovery_header(&bad).is_ok());
        // Display is informative.
        let e = decode_discovery(&bad).unwrap_err().to_string();
        assert!(e.contains("sess"), "{e}");
    }

    #[test]
    fn duplicate_keys_last_one_wins() {
        let mut p = encode_ping(1, None);
        p.extend_from_slice(&hex("5f 5f 68 74 00 00 00 08 00 00 00 00 00 00 00 02"));
        assert_eq!(decode_measurement(&p).unwrap().payload.host_time, Some(2));
    }

    #[test]
    fn nonzero_is_playing_decodes_true() {
        let mut b = hex(ALIVE_107);
        let off = 20 + 32 + 16 + 8;
        assert_eq!(b[off], 1);
        b[off] = 0x7f;
        assert!(
            decode_discovery(&b)
                .unwrap()
                .state
                .start_stop
                .unwrap()
                .is_playing
        );
    }

    #[test]
    fn group_id_and_ttl_round_trip() {
        let msg = DiscoveryMessage {
            header: DiscoveryHeader {
                kind: DiscoveryKind::Alive,
                ttl: 200,
                group_id: 0xbeef,
                node_id: ID_A,
            },
            state: PeerState::default(),
        };
        let b = encode_discovery(&msg);
        assert_eq!(b.len(), 20);
        assert_eq!(&b[9..12], &[200, 0xbe, 0xef]);
        assert_eq!(decode_discovery(&b).unwrap(), msg);
    }
}
