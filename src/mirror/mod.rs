//! The optional upstream Redis mirror (SPEC §4 "Redis" and "Venue"; issues 6 and 13).
//!
//! The current leader mirrors its room's session into Redis: a hash per room at
//! `bandsync:room:<room>` whose fields are the [`MirrorRecord`]'s fields as strings,
//! the JSON record published on `bandsync:room:<room>:changes` whenever it changes,
//! and the room's name in the set `bandsync:rooms`. A venue reads every room back with
//! [`venue`]; usage events go to the stream `bandsync:room:<room>:usage`
//! ([`append_usage`]).
//!
//! The Redis protocol, TLS and reconnection are the maintained `redis` crate's (RESP,
//! `ConnectionManager`, `Script`, rustls with the ring provider); this module keeps
//! what is bandsync's:
//!
//! * **Fencing.** Every record write is [`FENCE_SCRIPT`], a server-side Lua script that
//!   refuses a record whose `(epoch, version)` is lower than the stored one, so a
//!   deposed leader never overwrites a newer state; it reports what Redis holds
//!   ([`WriteOutcome::RefusedNewerEpoch`]`{ held_epoch }`), so a node can lead again
//!   above it. The fence, the write, the set of rooms, the leader's heartbeat and the
//!   publish are one atomic script call. Usage appends are fenced the same way.
//!   Only the leader writes: the caller decides, by what it puts in the channel.
//! * **Never in the way.** [`run`] is a task of its own. The caller only does
//!   `tx.send_replace(..)` on a `watch` channel: only the latest record is kept (no
//!   queue, bounded memory), and nothing the task does (Redis down, slow, or talking
//!   garbage) reaches the caller. Every operation has a deadline; failures are counted
//!   in [`MirrorStats`] and logged at a bounded rate; a dropped connection is replaced
//!   by the connection manager with backoff and the current record written again
//!   (resync). [`MirrorStats::snapshot`] has the `lag` (how long Redis has been
//!   behind) and a [`MirrorState`] (`connected`, `stale`, `off`) for /health.
//! * **Bad input** (SPEC §7). Replies are checked for their shape and records field
//!   by field ([`record_from_hash`]): a garbage reply is a named [`MirrorError`],
//!   never a panic. (The `redis` crate's parser is total; it bounds nesting and
//!   preallocation, and a reply that never ends is cut by the deadline.)
//! * **URL** ([`RedisUrl`]): `redis://[user:pass@]host[:port][/db]`, or `rediss://…`
//!   with `?cacert=PATH` (else `SSL_CERT_FILE`, else the system's roots) and an optional
//!   client certificate `&cert=PATH&key=PATH`. Password or ACL user + password. The
//!   password is never logged nor shown.
//!
//! Files: `url` (the URL, the client), `conn` (a connection with a deadline, `fetch`),
//! `record` (the record and its validation), `fence` (the scripts), `task` (the
//! mirror task and its stats), `venue` (every room), `error`.

mod conn;
mod error;
mod fence;
mod record;
mod task;
mod url;
mod venue;

pub use conn::{fetch, Conn};
pub use error::{describe, MirrorError};
pub use fence::{
    append_usage, write_fenced, write_fenced_outcome, UsageOutcome, WriteOutcome, FENCE_SCRIPT,
    USAGE_MAXLEN, USAGE_MAX_FIELDS, USAGE_MAX_VALUE, USAGE_SCRIPT,
};
pub use record::{
    check_room, now_unix_ms, record_from_hash, room_channel, room_key, usage_key, MirrorRecord,
    FIELDS, MAX_BOXES, ROOMS_KEY, SEEN_FIELD,
};
pub use task::{
    run, run_with, MirrorOptions, MirrorState, MirrorStats, MirrorStatsSnapshot, Refusal,
    DEFAULT_COMMAND_TIMEOUT, LIVE_HOLDER, STALE_AFTER,
};
pub use url::RedisUrl;
pub use venue::{
    local_midnight_ms, venue, venue_on, InvalidRoom, Venue, VenueRoom, GONE_AFTER, MAX_VENUE_ROOMS,
    USAGE_READ_MAX,
};
