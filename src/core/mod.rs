//! The pure core: plain state machines and encodings that take `now` and messages and
//! return actions. Nothing under `src/core/` reads a clock, touches a socket or a file,
//! reads the environment, spawns a thread or a task, or draws an unseeded random number
//! (`tests/core_purity.rs` fails the build's tests when one does).
//!
//! * [`time`] — the `Clock` trait and `SessionMap` (local → session time).
//! * [`timeline`] — tempo, meter, anchor, transport and quantized changes.
//! * [`sync`] — the clock-sync estimator and the slewer.
//! * [`room`] — sessions, election, epochs, pin; turns peer frames into actions.
//! * [`cues`] — setlists and the cue log (one order across the room, merged by union).
//! * [`decision`] — decision stamps (a hybrid logical clock): the latest decision wins.
//! * [`wire`] — peer frames and datagrams, total decoding.
//! * [`advert`] — mDNS advertisements, validated.
//! * [`link`] — Ableton Link: the room as a Link session's authority.
//! * [`id`], [`rng`] — node ids; the seeded SplitMix64.

pub mod advert;
pub mod cues;
pub mod decision;
pub mod id;
pub mod link;
pub mod rng;
pub mod room;
pub mod sync;
pub mod time;
pub mod timeline;
pub mod wire;
