//! Network drivers: the QUIC endpoint and room-key handshake, one task per peer
//! connection (frames, clock pings), the CLI's server side, mDNS, Ableton Link, and
//! the test impairment. They carry bytes to and from the room task; the rules are in
//! [`crate::core`].

pub mod auth;
pub mod cli_server;
pub mod discovery;
pub mod frames;
pub mod handle;
pub mod impair;
pub mod link;
pub mod oneshot;
pub mod peer;

pub use handle::{channel, Event, Inbox, RoomHandle};
pub use link::LinkStats;
pub use peer::MeshStats;
