//! What the web layer is given by the node: the room handle, the published snapshot and
//! its change signal, counters, and the phone gateway's settings. Shared by the HTTP
//! routes and the gateway (neither imports the other's internals).

use crate::audio::AudioStats;
use crate::net::{MeshStats, RoomHandle};
use crate::sys::clock::NodeClock;
use std::sync::Arc;

#[derive(Clone)]
pub struct HttpState {
    pub room: RoomHandle,
    pub audio: Arc<AudioStats>,
    pub mesh: Arc<MeshStats>,
    /// The current timeline, session map and epoch (what the audio thread plays).
    pub cell: Arc<crate::audio::snapshot::SnapshotCell>,
    pub clock: NodeClock,
    /// Bumped by the room task every time it publishes a new snapshot.
    pub changes: tokio::sync::watch::Receiver<u64>,
    /// Control PIN for changes from phones (None: no PIN).
    pub control_pin: Option<String>,
    /// The phone gateway's limits (connections, message size, rate, send queues).
    pub limits: crate::web::gateway::GatewayLimits,
    /// The phone gateway's counters (shown on `/metrics`).
    pub stats: Arc<crate::web::gateway::GatewayStats>,
}

