//! What the web layer is given by the node: the room handle, the published snapshot and
//! its change signal, the room's published status, counters, who may control the room,
//! the box's own names, and the phone gateway's settings. Shared by the HTTP routes and
//! the gateway (neither imports the other's internals).

use crate::audio::AudioStats;
use crate::net::MeshStats;
use crate::net::RoomHandle;
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
    /// The room's status as the room task last published it (every 100–500 ms and on
    /// every change). `/health` and `/metrics` read it and never wait on the room
    /// task. While it is still `None` (nothing published yet), the web layer asks the
    /// room itself, from one background poller, at most every 250 ms; once a value
    /// has been published the poller stops. The sender dropped: the node is stopping.
    pub status: tokio::sync::watch::Receiver<Option<crate::core::room::Status>>,
    /// Control PIN for changes from phones (None or empty: no PIN).
    pub control_pin: Option<String>,
    /// With no PIN: `true` lets any phone change the room (the room opted out of the
    /// PIN), `false` lets none (`error` `pin_required`: control from phones is off).
    /// Ignored when there is a PIN.
    pub control_open: bool,
    /// The room's control PIN as it changes (replicated through the room: the latest
    /// decision wins): `Some(pin)`, or `None` when the room opted out (open). `None`
    /// here (tests): the PIN above never changes.
    /// Ableton Link's counters (None: `--no-link`).
    pub link: Option<Arc<crate::net::LinkStats>>,
    pub control_updates: Option<tokio::sync::watch::Receiver<Option<String>>>,
    /// The box's own names and addresses: `/ws` and every state-changing request need
    /// a `Host` among them and, if present, an `Origin` naming one of them.
    pub allowed_hosts: crate::web::hosts::AllowedHosts,
    /// The phone gateway's limits (connections, message size, rate, send queues, PINs).
    pub limits: crate::web::gateway::GatewayLimits,
    /// The phone gateway's counters (shown on `/metrics`).
    pub stats: Arc<crate::web::gateway::GatewayStats>,
}
