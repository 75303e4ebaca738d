//! How a bandsync room presents itself to Link apps: the ids, the ghost clock and
//! the room's lines. Pure: every time is an argument.
//!
//! * **One session per room.** Every box of a room founds the same Link session,
//!   [`LinkIds::session`], derived from the room name: Link apps see one session
//!   whichever box they hear, and keep it when a box goes away. Each box has its
//!   own NodeId ([`LinkIds::node`]), whose first four bytes are the room's
//!   [`LinkIds::sibling_tag`]: a box never takes another box of its room for a Link
//!   app that changes the tempo.
//! * **Ghost time is session time,** plus the room's steering shift:
//!   `ghost_us = (session_ns + shift_ns) / 1000 + 2⁵⁰` ([`ghost_us`]). Every box
//!   answers Link's clock pings with it, so every box presents the same clock, and
//!   the 2⁵⁰ µs intercept makes the room's session older than any session a Link app
//!   founds: apps join it (Ch. 2 §7.2). The shift (replicated by the leader) keeps
//!   the apps' clocks on the room's between their measurements
//!   ([`crate::core::link::steer`]).
//! * **The room's beats are Link beats:** a segment's beat `b` is Link beat
//!   `b + k`, where `k` ([`beat_offset`]) puts the segment's bar starts on multiples
//!   of its meter (`k = 0` unless a meter change moved the downbeat). A Link app
//!   whose quantum is the room's meter plays its bars with the room's.
//! * **Tempo changes** are the room's segments: each is an [`ExactLine`]
//!   (beat `b0 + k` at `ghost(t0)`, the segment's tempo), presented from the
//!   moment it governs the session clock; the room's scheduled segments are
//!   *accepted* lines, so a box that switches a moment before another is never
//!   taken for a Link app's change.

use crate::core::link::codec::NodeId;
use crate::core::link::peer::{RoomState, DEFAULT_GHOST_EPOCH_US};
use crate::core::link::timeline::ExactLine;
use crate::core::timeline::{Segment, Timeline};

/// Ghost time minus session time, µs (see the module docs).
pub const GHOST_INTERCEPT_US: i64 = DEFAULT_GHOST_EPOCH_US;

/// Ghost time (µs) of session time `session_ns` under steering shift `shift_ns`,
/// rounded to the nearest µs.
pub fn ghost_us(session_ns: i64, shift_ns: i64) -> i64 {
    session_ns
        .saturating_add(shift_ns)
        .saturating_add(500)
        .div_euclid(1000)
        .saturating_add(GHOST_INTERCEPT_US)
}

/// Ghost time in ns of session time `session_ns` under shift `shift_ns` (exact).
pub fn ghost_ns(session_ns: i64, shift_ns: i64) -> i64 {
    session_ns
        .saturating_add(shift_ns)
        .saturating_add(GHOST_INTERCEPT_US.saturating_mul(1000))
}

/// A box's Link identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkIds {
    /// This box's NodeId: the room's tag, then four bytes of this node.
    pub node: NodeId,
    /// The room's session id: the same on every box of the room.
    pub session: NodeId,
    /// The first four bytes of every box's NodeId in this room.
    pub sibling_tag: [u8; 4],
}

/// FNV-1a over the parts (each followed by a 0 byte), then the SplitMix64 finalizer.
fn hash64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let mut z = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The Link ids of node `node_id` in room `room`.
pub fn ids(room: &str, node_id: &str) -> LinkIds {
    let session = NodeId(hash64(&["bandsync-link-session", room]).to_be_bytes());
    let tag_word = hash64(&["bandsync-link-box", room]).to_be_bytes();
    let sibling_tag = [tag_word[0], tag_word[1], tag_word[2], tag_word[3]];
    let me = hash64(&["bandsync-link-node", room, node_id]).to_be_bytes();
    let mut node = [0u8; 8];
    node[..4].copy_from_slice(&sibling_tag);
    node[4..].copy_from_slice(&me[..4]);
    LinkIds {
        node: NodeId(node),
        session,
        sibling_tag,
    }
}

/// `k` such that Link beat `b + k` is a multiple of the segment's meter exactly when
/// room beat `b` starts a bar: `−(downbeat mod meter)`.
pub fn beat_offset(seg: &Segment) -> i64 {
    -seg.downbeat.rem_euclid(seg.meter.get() as i64)
}

/// A segment as a Link line (ghost time under shift `shift_ns`).
pub fn line(seg: &Segment, shift_ns: i64) -> ExactLine {
    ExactLine {
        b0: seg.b0.saturating_add(beat_offset(seg)),
        t0_ns: ghost_ns(seg.t0, shift_ns),
        mbpm: seg.tempo.mbpm(),
    }
}

/// The room as Link should see it at session time `now_ns`: the segment governing
/// `now_ns`, its transport state, the room's other lines (scheduled segments, and
/// `previous`: the line that governed until a moment ago), and the next transport
/// state with the ghost time it begins; ghost time under shift `shift_ns`.
pub fn room_state(
    tl: &Timeline,
    now_ns: i64,
    previous: Option<ExactLine>,
    shift_ns: i64,
) -> RoomState {
    let cur = tl.segment_at_time(now_ns);
    let l = line(cur, shift_ns);
    let mut accepted: Vec<ExactLine> = tl
        .segments()
        .iter()
        .map(|s| line(s, shift_ns))
        .chain(previous)
        .filter(|x| *x != l)
        .collect();
    accepted.dedup();
    let next_transport = tl
        .segments()
        .iter()
        .find(|s| s.t0 > now_ns)
        .map(|s| (s.playing, ghost_us(s.t0, shift_ns)));
    RoomState {
        line: l,
        playing: cur.playing,
        since_us: ghost_us(cur.t0, shift_ns),
        accepted,
        next_transport,
    }
}

/// Session time (ns) at which the next segment after `now_ns` begins, if any.
pub fn next_change(tl: &Timeline, now_ns: i64) -> Option<i64> {
    tl.segments().iter().map(|s| s.t0).find(|&t0| t0 > now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::link::timeline::MICROBEATS_PER_BEAT;
    use crate::core::timeline::{ChangeKind, Meter, Tempo};

    #[test]
    fn one_session_per_room_and_siblings_by_tag() {
        let a = ids("rehearsal", "0123456789abcdef");
        let b = ids("rehearsal", "fedcba9876543210");
        let other = ids("other-room", "0123456789abcdef");
        assert_eq!(a.session, b.session);
        assert_ne!(a.node, b.node);
        assert_eq!(a.node.0[..4], a.sibling_tag);
        assert_eq!(b.node.0[..4], a.sibling_tag);
        assert_ne!(other.session, a.session);
        assert_ne!(other.sibling_tag, a.sibling_tag);
        assert_ne!(a.session, a.node);
        assert_eq!(ids("rehearsal", "0123456789abcdef"), a, "stable");
    }

    #[test]
    fn ghost_time_is_session_time_plus_the_intercept() {
        assert_eq!(ghost_us(0, 0), GHOST_INTERCEPT_US);
        assert_eq!(ghost_us(1_499, 0), GHOST_INTERCEPT_US + 1);
        assert_eq!(ghost_us(1_500, 0), GHOST_INTERCEPT_US + 2);
        assert_eq!(ghost_us(-1_600, 0), GHOST_INTERCEPT_US - 2);
        assert_eq!(ghost_ns(7, 0), GHOST_INTERCEPT_US * 1000 + 7);
        // the steering shift moves ghost time, and the room's lines with it: a beat
        // keeps its beat number at the shifted ghost time
        assert_eq!(ghost_us(0, 40_000), GHOST_INTERCEPT_US + 40);
        assert_eq!(ghost_ns(7, -7), GHOST_INTERCEPT_US * 1000);
        let tl = Timeline::start_at(
            2_000_000_000,
            Tempo::from_bpm(97.0).unwrap(),
            Meter::new(4).unwrap(),
            true,
        );
        let (a, b) = (line(&tl.segments()[0], 0), line(&tl.segments()[0], 55_000));
        assert_eq!(b.t0_ns - a.t0_ns, 55_000);
        let t = tl.beat_time(12);
        assert_eq!(a.beats_at(ghost_us(t, 0)), b.beats_at(ghost_us(t, 55_000)));
    }

    #[test]
    fn room_beats_are_link_beats_and_bars_fall_on_meter_multiples() {
        let t0 = 3_000_000_000;
        let mut tl = Timeline::start_at(
            t0,
            Tempo::from_bpm(123.0).unwrap(),
            Meter::new(4).unwrap(),
            true,
        );
        let l = line(&tl.segments()[0], 0);
        for b in [0i64, 1, 7, 1000] {
            let g_us = ghost_us(tl.beat_time(b), 0);
            assert!(
                (l.beats_at(g_us) - b * MICROBEATS_PER_BEAT).abs() <= 3,
                "beat {b}"
            );
        }
        // A meter change to 3 at beat 10: bars start at 10, 13, ... → Link 9, 12, ...
        tl.apply_at(ChangeKind::Meter(Meter::new(3).unwrap()), 10)
            .unwrap();
        let s = tl.segments()[1];
        assert_eq!(beat_offset(&s), -1);
        for bar in [10i64, 13, 16] {
            assert!(s.is_downbeat(bar));
            assert_eq!((bar + beat_offset(&s)).rem_euclid(3), 0);
        }
        let l2 = line(&s, 0);
        let g = ghost_us(tl.beat_time(13), 0);
        assert!((l2.beats_at(g) - 12 * MICROBEATS_PER_BEAT).abs() <= 3);
    }

    #[test]
    fn room_state_follows_the_segment_governing_now() {
        let t0 = 1_000_000_000;
        let mut tl = Timeline::start_at(
            t0,
            Tempo::from_bpm(120.0).unwrap(),
            Meter::new(4).unwrap(),
            false,
        );
        tl.apply_at(ChangeKind::Start, 8).unwrap();
        tl.apply_at(ChangeKind::Tempo(Tempo::from_bpm(100.0).unwrap()), 16)
            .unwrap();
        let (start, change) = (tl.beat_time(8), tl.beat_time(16));
        let before = room_state(&tl, start - 1, None, 0);
        assert!(!before.playing);
        assert_eq!(before.line.mbpm, 120_000);
        assert_eq!(before.next_transport, Some((true, ghost_us(start, 0))));
        assert_eq!(before.accepted.len(), 2, "{before:?}");
        let playing = room_state(&tl, start, None, 0);
        assert!(playing.playing);
        assert_eq!(playing.since_us, ghost_us(start, 0));
        assert_eq!(playing.line.b0, 8);
        let after = room_state(&tl, change, Some(playing.line), 0);
        assert_eq!(after.line.mbpm, 100_000);
        assert_eq!(after.line.b0, 16);
        assert_eq!(after.next_transport, None);
        assert!(after.accepted.contains(&playing.line));
        assert_eq!(next_change(&tl, start - 1), Some(start));
        assert_eq!(next_change(&tl, change), None);
    }
}
