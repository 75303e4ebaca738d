//! bandsync: every box in the rehearsal room plays the same click on the same sample.
//!
//! The folders are the architecture (see ARCHITECTURE.md):
//!
//! * [`core`] — *pure*: timeline, clock sync, the room (election, epochs, merge), wire
//!   encoding, mDNS adverts. Takes `now` and messages, returns actions; no IO.
//! * [`sys`] — the OS layer every driver shares: the node's clock, the state dir,
//!   systemd notify.
//! * [`audio`] — the click: lock-free snapshot, frame clock, renderer, sinks, click log.
//! * [`net`] — QUIC endpoint, handshake, peer tasks, the CLI's server side, mDNS,
//!   impairment; the room task's inbox and [`net::RoomHandle`].
//! * [`web`] — HTTP: the phone page and its WebSocket gateway, `/health`, `/metrics`.
//! * [`mirror`] — the optional Redis mirror.
//! * [`node`] — `bandsync run`: configuration, hw profiles, the room task, wiring and
//!   shutdown.
//! * [`cli`] — the stage tech's client.

pub mod audio;
pub mod cli;
pub mod core;
pub mod mirror;
pub mod net;
pub mod node;
pub mod sys;
pub mod web;
