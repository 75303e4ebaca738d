//! HTTP for phones and monitoring: the phone page and its WebSocket gateway, `/health`
//! and `/metrics`. It reaches the room only through [`crate::net::RoomHandle`], the
//! published audio snapshot and the published room status. Strangers are kept to a
//! bounded cost by [`guard`] (connection caps, timeouts) and [`hosts`] (only the box's
//! own names and addresses may drive it).

pub mod gateway;
pub mod guard;
pub mod hosts;
pub mod http;
pub mod state;
pub mod tls;
pub mod venue;
