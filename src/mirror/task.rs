//! The mirror task ([`run`]) and its counters ([`MirrorStats`]).
//!
//! The task keeps the latest record from a `watch` channel mirrored into Redis through
//! a `redis` crate `ConnectionManager`. What it does, step by step:
//!
//! 1. `None` in the channel (not the leader): drop the connection, write nothing.
//! 2. A record it has not written on this connection: the fenced write
//!    ([`super::write_fenced_outcome`]). Otherwise, every `refresh` (1 s): the same
//!    write again, which answers "unchanged" without publishing, stamps the leader's
//!    heartbeat, and heals a Redis that restarted empty or lost the key. A record the
//!    fence refused is not written again; the link is only PINGed.
//! 3. A failure is counted, logged at a bounded rate, and followed by capped
//!    exponential backoff (`backoff_min` .. `backoff_max`). The manager replaces a
//!    dropped connection by itself (its own jittered backoff, `reconnect_retries`
//!    tries per round); after a failure it cannot heal (a timeout — the link may be
//!    dead without a reset —, refused credentials, TLS, a garbage reply) the task
//!    drops the manager and starts a new one.
//!
//! Every operation has a deadline and the task races each one with shutdown, so a
//! slow or hung Redis costs only this task's time; the caller's `send_replace` never
//! waits on it (`watch` keeps one value: memory is bounded).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

use super::conn::Conn;
use super::error::MirrorError;
use super::fence::{write_fenced_outcome, WriteOutcome};
use super::record::MirrorRecord;
use super::url::RedisUrl;

/// Default per-command (and per-connection-attempt) timeout.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Redis counts as stale once it has been behind this node's record this long.
pub const STALE_AFTER: Duration = Duration::from_secs(1);

/// Counters and state of the mirror task, for /metrics and /health.
///
/// `errors` counts every failed attempt (connect, command, timeout, bad reply, server
/// error); `timeouts` and `bad_replies` are the subsets of `errors` of those kinds.
/// `reconnects` counts the times the mirror worked again after losing its connection.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Records written (the script returned "written"). Refreshes are not counted.
    pub writes: AtomicU64,
    /// Writes refused by the fence: Redis holds a newer `(epoch, version)`.
    pub fenced: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub bad_replies: AtomicU64,
    pub timeouts: AtomicU64,
    /// The last command went through.
    pub connected: AtomicBool,
    /// The task holds a record to mirror (this node leads).
    pub active: AtomicBool,
    /// CLOCK_MONOTONIC ns since which Redis has been behind the latest record; 0: it
    /// is not.
    behind_since_ns: AtomicI64,
    /// The newer epoch Redis held at the last refusal, if `refused_newer_epoch`.
    held_epoch: AtomicU64,
    refused_newer_epoch: AtomicBool,
}

/// What /health shows of the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorState {
    /// The mirror has nothing to write: not the leader, or not running.
    #[default]
    Off,
    /// Redis holds this node's record (or will within [`STALE_AFTER`]).
    Connected,
    /// Redis is behind: it is down, slow or talking garbage, or the write is late.
    Stale,
}

/// A plain copy of [`MirrorStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MirrorStatsSnapshot {
    pub writes: u64,
    pub fenced: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub bad_replies: u64,
    pub timeouts: u64,
    pub connected: bool,
    pub state: MirrorState,
    /// How long Redis has been behind this node's state, in ms (0: it is current):
    /// since the first record handed to the mirror that Redis does not hold yet.
    pub lag_ms: u64,
    /// The epoch Redis held when it last refused a write for a newer epoch: a node that
    /// leads again must take an epoch above it.
    pub held_epoch: Option<u64>,
}

impl MirrorStats {
    pub fn snapshot(&self) -> MirrorStatsSnapshot {
        let since = self.behind_since_ns.load(Ordering::Relaxed);
        let lag_ms = if since == 0 {
            0
        } else {
            (crate::sys::clock::mono_now_ns() - since).max(0) as u64 / 1_000_000
        };
        let active = self.active.load(Ordering::Relaxed);
        let connected = self.connected.load(Ordering::Relaxed);
        let state = if !active {
            MirrorState::Off
        } else if connected && lag_ms < STALE_AFTER.as_millis() as u64 {
            MirrorState::Connected
        } else {
            MirrorState::Stale
        };
        MirrorStatsSnapshot {
            writes: self.writes.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            bad_replies: self.bad_replies.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            connected,
            state,
            lag_ms,
            held_epoch: self
                .refused_newer_epoch
                .load(Ordering::Relaxed)
                .then(|| self.held_epoch.load(Ordering::Relaxed)),
        }
    }

    fn count_error(&self, e: &MirrorError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if e.is_timeout() {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        if e.is_bad_reply() {
            self.bad_replies.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Redis is behind since `t` (CLOCK_MONOTONIC ns), unless it already was.
    fn behind_since(&self, t: i64) {
        let _ = self.behind_since_ns.compare_exchange(
            0,
            t.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn set_behind(&self, t: Option<i64>) {
        self.behind_since_ns
            .store(t.map_or(0, |t| t.max(1)), Ordering::Relaxed);
    }

    fn set_off(&self) {
        self.active.store(false, Ordering::Relaxed);
        self.connected.store(false, Ordering::Relaxed);
        self.set_behind(None);
    }
}

/// Knobs of [`run_with`]; [`run`] uses the defaults.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Per command and per connection attempt.
    pub command_timeout: Duration,
    /// The task's backoff after a failure, doubling from `backoff_min` to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The connection manager's reconnect round: this many retries, jittered
    /// exponential delays from `backoff_min` up to `reconnect_max_delay`.
    pub reconnect_retries: usize,
    pub reconnect_max_delay: Duration,
    /// How often the current record is re-checked while nothing changes (the script
    /// answers "unchanged" without publishing), so a Redis that lost its data, or a
    /// silently dead connection, is noticed and healed; it also is the heartbeat.
    pub refresh: Duration,
    /// At most one warning per this period (the rest are counted, then summarized).
    pub log_every: Duration,
    /// Where a refused write is reported, with who holds the room in Redis (the room
    /// task decides whether to lead above it or to stand down). `try_send`: a full
    /// channel drops the report (the next refresh sends another).
    pub refusals: Option<tokio::sync::mpsc::Sender<Refusal>>,
}

/// A write the fence refused, and who holds the room's record in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The refused record's epoch and version.
    pub epoch: u64,
    pub version: u64,
    /// The epoch Redis holds (the record's own epoch when the refusal was for a newer
    /// version at the same epoch).
    pub held_epoch: u64,
    /// The leader the stored record names (`None`: the hash could not be read as a
    /// record).
    pub held_leader: Option<String>,
    /// How long ago, by Redis's clock, that leader last refreshed the record
    /// (`None`: never stamped, or unreadable).
    pub held_seen_age_ms: Option<u64>,
}

/// How soon a record the fence refused is tried again (the fence answers cheaply).
pub const REFUSED_RETRY: Duration = Duration::from_millis(250);

/// A leader whose heartbeat is at most this old (Redis's clock) is live: a node
/// refused by its record stands down instead of leading above it.
pub const LIVE_HOLDER: Duration = Duration::from_secs(3);

impl Refusal {
    /// Another node than `me` holds the room in Redis and refreshed it within
    /// [`LIVE_HOLDER`].
    pub fn held_by_live_other(&self, me: &str) -> bool {
        self.held_leader.as_deref().is_some_and(|l| l != me)
            && self
                .held_seen_age_ms
                .is_some_and(|a| a <= LIVE_HOLDER.as_millis() as u64)
    }
}

/// Who holds a room's record, as read right after a refusal.
struct Holder {
    leader: Option<String>,
    seen_age_ms: Option<u64>,
}

/// `TIME` and `HGETALL` of the room's hash in one round trip. A hash that is not a
/// valid record is a holder with no leader (the node may lead above it: its write
/// replaces the hash).
async fn holder<C: redis::aio::ConnectionLike>(
    c: &mut Conn<C>,
    room: &str,
) -> Result<Holder, MirrorError> {
    let mut p = redis::pipe();
    p.cmd("TIME")
        .cmd("HGETALL")
        .arg(super::record::room_key(room));
    let mut r = c.query_pipeline("TIME, HGETALL", &p).await?.into_iter();
    let (Some(time), Some(hash)) = (r.next(), r.next()) else {
        return Err(MirrorError::bad_reply(
            c.addr(),
            "TIME, HGETALL",
            "fewer replies than commands".into(),
        ));
    };
    let now = super::venue::server_ms(&time)
        .ok_or_else(|| MirrorError::bad_reply(c.addr(), "TIME", super::error::describe(&time)))?;
    Ok(match super::record::hash_record(room, c.addr(), hash) {
        Ok(Some((rec, seen))) => Holder {
            leader: Some(rec.leader),
            seen_age_ms: seen.map(|s| now.saturating_sub(s)),
        },
        Ok(None) | Err(_) => Holder {
            leader: None,
            seen_age_ms: None,
        },
    })
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            backoff_min: Duration::from_millis(100),
            // Redis back → hash current within 5 s (issue 6): the longest wait, one
            // manager round and one write stay under it.
            backoff_max: Duration::from_secs(2),
            reconnect_retries: 2,
            reconnect_max_delay: Duration::from_secs(1),
            refresh: Duration::from_secs(1),
            log_every: Duration::from_secs(10),
            refusals: None,
        }
    }
}

struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n suppressed since the last one)` when a message may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// A lazy connection manager for `url` (connects on first use).
fn manager(url: &RedisUrl, opts: &MirrorOptions) -> Result<Conn<ConnectionManager>, MirrorError> {
    let client = url.client()?;
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(opts.command_timeout))
        .set_response_timeout(Some(opts.command_timeout))
        .set_min_delay(opts.backoff_min)
        .set_max_delay(opts.reconnect_max_delay)
        .set_exponent_base(2.0)
        .set_number_of_retries(opts.reconnect_retries);
    let m = ConnectionManager::new_lazy_with_config(client, cfg).map_err(|e| {
        MirrorError::from_redis(
            e,
            &url.addr(),
            "the connection manager",
            opts.command_timeout,
        )
    })?;
    // Waiting for a reconnect round is bounded too (the manager itself does not).
    Ok(Conn::new(m, url.addr(), opts.command_timeout * 2))
}

/// After `e`, the manager cannot be trusted to heal itself: start a new one. It
/// replaces a dropped connection (I/O errors) and an error reply leaves the connection
/// fine; anything else (a timeout on a connection that may be dead without a reset,
/// refused credentials, TLS, a garbage reply, an error it caches) needs a new one.
fn needs_new_manager(e: &MirrorError) -> bool {
    !matches!(
        e,
        MirrorError::Connection { .. } | MirrorError::Server { .. } | MirrorError::InvalidRecord(_)
    )
}

/// Runs until `shutdown` becomes true or its sender is dropped, or the record sender
/// is dropped: keeps the latest record from `rx` (`None` = this node is not the
/// leader, write nothing) mirrored into Redis, fenced by epoch. See the module docs.
pub async fn run(
    url: RedisUrl,
    room: String,
    rx: watch::Receiver<Option<MirrorRecord>>,
    stats: Arc<MirrorStats>,
    shutdown: watch::Receiver<bool>,
) {
    run_with(url, room, rx, stats, shutdown, MirrorOptions::default()).await
}

/// [`run`] with explicit options.
pub async fn run_with(
    url: RedisUrl,
    room: String,
    mut rx: watch::Receiver<Option<MirrorRecord>>,
    stats: Arc<MirrorStats>,
    mut shutdown: watch::Receiver<bool>,
    opts: MirrorOptions,
) {
    let mut conn: Option<Conn<ConnectionManager>> = None;
    let mut backoff = opts.backoff_min;
    // The last record this connection wrote or was refused (true), and when to
    // refresh it.
    let mut done: Option<(MirrorRecord, bool)> = None;
    // The last record known to be in Redis (or refused there), across connections:
    // the lag counts from the first record after it.
    let mut confirmed: Option<MirrorRecord> = None;
    let mut next_refresh = Instant::now();
    let mut ever_ok = false;
    let mut lost = false;
    let mut rx_open = true;
    let mut limiter = LogLimiter::new(opts.log_every);
    let mut fence_log = LogLimiter::new(opts.log_every);
    let mut failing_since: Option<Instant> = None;
    tracing::info!(room = %room, redis = %url, "redis mirror started");

    'task: loop {
        if *shutdown.borrow() || !rx_open {
            break;
        }
        let want = rx.borrow_and_update().clone();
        let Some(rec) = want else {
            // Not the leader: write nothing, hold no connection.
            conn = None;
            done = None;
            confirmed = None;
            stats.set_off();
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                r = rx.changed() => if r.is_err() { break },
            }
            continue;
        };
        stats.active.store(true, Ordering::Relaxed);
        if confirmed.as_ref() != Some(&rec) {
            stats.behind_since(crate::sys::clock::mono_now_ns());
        }
        let fresh = done.as_ref().is_none_or(|(d, _)| *d != rec);
        let mut changed_during: Option<i64> = None;
        if fresh || Instant::now() >= next_refresh {
            let ready = match conn {
                Some(_) => None,
                None => match manager(&url, &opts) {
                    Ok(c) => {
                        conn = Some(c);
                        None
                    }
                    Err(e) => Some(Err(e)),
                },
            };
            let result = match ready {
                Some(err) => err,
                None => {
                    let c = conn.as_mut().expect("made above");
                    // A record refused before is tried again only at the refresh
                    // (REFUSED_RETRY): the fence answers cheaply, and who holds the
                    // room is read again, so a deposed node learns when the holder's
                    // heartbeat stops.
                    let step = async {
                        let out = write_fenced_outcome(c, &room, &rec).await?;
                        if out.is_refused() && opts.refusals.is_some() {
                            let h = holder(c, &room).await?;
                            Ok(Some((out, Some(h))))
                        } else {
                            Ok(Some((out, None)))
                        }
                    };
                    tokio::pin!(step);
                    // Race the step with shutdown, and note records handed meanwhile.
                    loop {
                        tokio::select! {
                            r = &mut step => break r,
                            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() {
                                break 'task; // shutdown in the middle of a command
                            },
                            r = rx.changed(), if rx_open => match r {
                                Ok(()) => { changed_during.get_or_insert_with(crate::sys::clock::mono_now_ns); }
                                Err(_) => rx_open = false,
                            },
                        }
                    }
                }
            };
            match result {
                Ok(out) => {
                    if lost && ever_ok {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    lost = false;
                    ever_ok = true;
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.set_behind(changed_during);
                    let (out, held) = match out {
                        Some((o, h)) => (Some(o), h),
                        None => (None, None),
                    };
                    match out {
                        Some(WriteOutcome::Written) => {
                            stats.writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(WriteOutcome::Unchanged) | None => {}
                        Some(refused) => {
                            stats.fenced.fetch_add(1, Ordering::Relaxed);
                            if let Some(e) = refused.held_epoch() {
                                stats.held_epoch.store(e, Ordering::Relaxed);
                                stats.refused_newer_epoch.store(true, Ordering::Relaxed);
                            }
                            if let (Some(tx), Some(h)) = (&opts.refusals, held) {
                                let _ = tx.try_send(Refusal {
                                    epoch: rec.epoch,
                                    version: rec.version,
                                    held_epoch: refused.held_epoch().unwrap_or(rec.epoch),
                                    held_leader: h.leader,
                                    held_seen_age_ms: h.seen_age_ms,
                                });
                            }
                            if let Some(suppressed) = fence_log.allow() {
                                tracing::warn!(room = %room, epoch = rec.epoch, version = rec.version,
                                    outcome = ?refused, suppressed,
                                    "redis mirror: write refused, Redis holds a newer record of the room");
                            }
                        }
                    }
                    if let Some(out) = out {
                        done = Some((rec.clone(), out.is_refused()));
                    }
                    // A refused record is asked again sooner: who holds the room may
                    // change at any moment (two boxes of one room that just met, the
                    // one that wrote last now following the other).
                    let refused = matches!(done, Some((_, true)));
                    confirmed = Some(rec);
                    next_refresh = Instant::now()
                        + if refused {
                            opts.refresh.min(REFUSED_RETRY)
                        } else {
                            opts.refresh
                        };
                    backoff = opts.backoff_min;
                    if let Some(t) = failing_since.take() {
                        tracing::info!(room = %room, redis = %url, after_ms = t.elapsed().as_millis() as u64,
                            "redis mirror: Redis is back, mirror resynced");
                    }
                }
                Err(e) => {
                    stats.count_error(&e);
                    if let Some(t) = changed_during {
                        stats.behind_since(t);
                    }
                    if !e.is_server_reply() && !matches!(e, MirrorError::InvalidRecord(_)) {
                        lost = true;
                        stats.connected.store(false, Ordering::Relaxed);
                    }
                    if needs_new_manager(&e) {
                        conn = None;
                    }
                    done = None;
                    failing_since.get_or_insert_with(Instant::now);
                    if let Some(suppressed) = limiter.allow() {
                        tracing::warn!(room = %room, redis = %url, error = %e, suppressed,
                            retry_ms = backoff.as_millis() as u64,
                            "redis mirror: Redis failed; the session goes on, retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { break },
                    }
                    backoff = (backoff * 2).min(opts.backoff_max);
                    continue;
                }
            }
        }
        if changed_during.is_some() {
            continue; // a newer record is waiting
        }
        let refresh = tokio::time::sleep_until(next_refresh.into());
        tokio::select! {
            r = shutdown.changed() => if r.is_err() { break },
            r = rx.changed(), if rx_open => if r.is_err() { break },
            _ = refresh => {}
        }
    }
    stats.set_off();
    tracing::info!(room = %room, "redis mirror stopped");
}
