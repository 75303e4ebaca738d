//! Ableton Link, as the room's authority: Link apps on the LAN follow the room's
//! tempo, beat phase and start/stop, and a Link app that changes them is overruled
//! (SPEC §4 "Ableton Link"). Pure: the UDP driver is `net::link`.
//!
//! Adapted from the `linkproto` crate written for bandsync from the CC-BY-4.0
//! protocol description `structuresound/link-wire-spec` (chapters 00–02, cited as
//! *Ch. N §x*) and F. Goltz, "Ableton Link — A technology to synchronize music
//! software", LAC 2018; no GPL Link source was consulted. linkproto was verified
//! black-box against the real Link library (the `aalink` wheel); bandsync's
//! `tests/link_aalink.rs` repeats that against the daemon.
//!
//! * [`codec`] — every Link v1 message (total decoding, typed errors).
//! * [`timeline`] — the timeline bijection, tempo clamp, ghost transform, phase
//!   functions, and [`timeline::ExactLine`] (a room line with its exact tempo).
//! * [`measurement`] — the ping/pong initiator (diagnosing foreign sessions only).
//! * [`peer`] — [`peer::LinkPeer`], the authority state machine of one gateway.
//! * [`present`] — how a room presents itself: one session per room, ghost time =
//!   session time + the room's shift + 2⁵⁰ µs, room beat = Link beat, the room's
//!   segments as lines.
//! * [`steer`] — the Link apps' clocks measured by our own pings, and the step of the
//!   room's shift that keeps its ghost clock on theirs between their measurements.
//!
//! Changes from linkproto: the session id is the room's, not the NodeId
//! ([`peer::Config::session_id`]); other boxes of the room (*siblings*, by NodeId
//! tag), Link apps relaying them, and the room's own scheduled lines never count as a
//! Link app's change; the room line is exact and re-anchored near the present every
//! 48 beats; a room change is gossiped at once; malformed datagrams are counted.
//! See linkproto's crate docs for the protocol as implemented and its limits (IPv4
//! only, no LinkAudio, the authority never joins another session).

pub mod codec;
pub mod measurement;
pub mod peer;
pub mod present;
pub mod steer;
pub mod timeline;

pub use codec::{NodeId, StartStopState, Timeline};
pub use peer::{Action, Config, Event, LinkPeer, RoomState};
pub use timeline::{ExactLine, GhostXform};
