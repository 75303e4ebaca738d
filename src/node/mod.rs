//! `bandsync run`: the configuration (flags over file over defaults, validated before
//! anything is written), board profiles, the room task that drives the core, the status
//! file, and the wiring and shutdown of every driver.

pub mod config;
pub mod hw;
pub mod room_task;
pub mod run;
pub mod status;
pub mod usage;
