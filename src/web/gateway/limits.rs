//! The gateway's limits and counters: connection and message caps, rates, queues,
//! timeouts (all bounded, so a phone or a stranger costs bounded work), and what
//! `/metrics` shows of them.

use super::protocol::ErrorCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The gateway's limits. `Default` gives the documented values.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayLimits {
    /// Open WebSockets at most; more are refused with 503.
    pub max_connections: usize,
    /// Largest message accepted, bytes.
    pub max_message_bytes: usize,
    /// Sustained messages per second per connection.
    pub per_second: u32,
    /// Messages a connection may send at once above the sustained rate.
    pub burst: u32,
    /// Rate-limited messages (decaying by one per second) before the connection is closed.
    pub abuse_after: u32,
    /// Messages queued for one client before it counts as too slow and is dropped.
    pub send_queue: usize,
    /// Longest a client's socket may take to accept one message.
    pub send_timeout: Duration,
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Wrong PINs before a connection is closed.
    pub max_bad_pins: u32,
    /// Change requests waiting on the room at once (all connections).
    pub max_control_in_flight: usize,
    /// PIN guessing: per-source lockouts and the box's rate of wrong PINs.
    pub pins: super::pin::PinLimits,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            max_connections: 2000,
            max_message_bytes: 4096,
            per_second: 20,
            burst: 40,
            abuse_after: 50,
            send_queue: 32,
            send_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            max_bad_pins: 5,
            max_control_in_flight: 8,
            pins: super::pin::PinLimits::default(),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// WebSockets accepted since start.
    pub connections_total: AtomicU64,
    /// WebSockets open now.
    pub connections_open: AtomicU64,
    /// Upgrades refused at the connection cap.
    pub refused_full: AtomicU64,
    /// Messages received (all kinds, WebSocket pings included).
    pub messages_in: AtomicU64,
    /// Messages sent.
    pub messages_out: AtomicU64,
    /// Snapshots / room stats pushed to every joined phone.
    pub broadcasts: AtomicU64,
    /// Time the last broadcast took to queue for every client, µs.
    pub broadcast_last_us: AtomicU64,
    /// `error`s sent, by [`ErrorCode`] (indexed like [`ErrorCode::ALL`]).
    pub errors: [AtomicU64; 12],
    /// Messages dropped by the rate limit.
    pub rate_limited: AtomicU64,
    /// Connections closed for flooding or PIN guessing.
    pub closed_abuse: AtomicU64,
    /// Connections closed because they could not keep up.
    pub dropped_slow: AtomicU64,
    /// Connections closed for silence.
    pub closed_idle: AtomicU64,
    /// Change requests passed to the room.
    pub changes_requested: AtomicU64,
    /// From a broadcast to its message written into each phone's socket.
    pub delivery: Histogram,
}

/// A fixed-bucket latency histogram (Prometheus style: cumulative on output).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; Histogram::BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Upper bounds of the buckets, µs (the last bucket is +Inf).
    pub const BOUNDS_US: [u64; 12] = [
        100, 250, 500, 1_000, 2_000, 3_000, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
    ];

    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = Self::BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(Self::BOUNDS_US.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
    /// `(upper bound in seconds or None for +Inf, cumulative count)`, then the sum in
    /// seconds and the total count.
    pub fn cumulative(&self) -> (Vec<(Option<f64>, u64)>, f64, u64) {
        let mut acc = 0;
        let mut out = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Relaxed);
            out.push((Self::BOUNDS_US.get(i).map(|b| *b as f64 / 1e6), acc));
        }
        (out, self.sum_us.load(Relaxed) as f64 / 1e6, acc)
    }
}

impl GatewayStats {
    pub(super) fn error(&self, code: ErrorCode) {
        let i = ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0);
        self.errors[i].fetch_add(1, Relaxed);
    }
    /// `(code, count)` for every error code.
    pub fn errors_by_code(&self) -> Vec<(&'static str, u64)> {
        ErrorCode::ALL
            .iter()
            .zip(self.errors.iter())
            .map(|(c, n)| (c.as_str(), n.load(Relaxed)))
            .collect()
    }
}

/// The WebSocket layer's own cap: messages between `max_message_bytes` and this are
/// read whole (so the socket stays in sync for a clean close) and refused; bigger ones
/// are cut off unread.
pub(super) fn hard_cap(l: &GatewayLimits) -> usize {
    l.max_message_bytes
        .max(64)
        .saturating_mul(16)
        .max(64 * 1024)
}
