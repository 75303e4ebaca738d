//! HTTP for phones and monitoring: the phone page and its WebSocket gateway, `/health`
//! and `/metrics`. It reaches the room only through [`crate::net::RoomHandle`] and the
//! published audio snapshot.

pub mod gateway;
pub mod http;
pub mod state;
