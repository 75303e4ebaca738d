//! bandsync: every box in the rehearsal room plays the same click on the same sample.
//!
//! Modules, core first (the core does no IO and reads no clock):
//!
//! * [`timeline`] — *core*: tempo, meter, anchor, transport and quantized changes;
//!   `beat_at`, `time_at`, next click.
//! * [`clock`] — the clock trait, the `BANDSYNC_TEST_CLOCK` distortion, and the map
//!   from local time to session time.
//! * [`audio`] — the engine: lock-free snapshot, frame clock, renderer, null and
//!   cpal sinks.
//! * [`clicklog`] — the SPEC §5 click log, written off the audio thread.
//! * [`config`] — flags over file over defaults, validated.
//! * [`state`] — the state dir: node id, atomic writes.
//! * [`daemon`] — `bandsync run`: wires the pieces together and owns shutdown.

pub mod audio;
pub mod auth;
pub mod cli;
pub mod clicklog;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod gateway;
pub mod http;
pub mod hw;
pub mod impair;
pub mod mesh;
pub mod mirror;
pub mod notify;
pub mod room;
pub mod state;
pub mod sync;
pub mod timeline;
pub mod wire;
