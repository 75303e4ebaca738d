//! The thin layer over the operating system that every driver shares: the node's
//! monotonic clock (with the SPEC §5 test distortion), the state directory, and
//! systemd's notify socket.

pub mod clock;
pub mod notify;
pub mod ratelog;
pub mod state;
