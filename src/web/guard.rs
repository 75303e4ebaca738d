//! What keeps strangers from costing the box more than a bounded share: HTTP
//! connection caps (global and per source address) with eviction of idle connections
//! at the global cap, the counters of everything refused, and rate-limited logging of
//! untrusted input (a count per refusal, a log line at most every few seconds).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The HTTP server's limits. `Default` gives the documented values.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpLimits {
    /// HTTP connections (not yet upgraded to a WebSocket) at most. At the cap the
    /// connection idle the longest (waiting for a request's headers) is closed to make
    /// room; when none is idle, the new one is closed at once.
    pub max_connections: usize,
    /// HTTP connections from one address at most; more are closed at once.
    pub max_per_ip: usize,
    /// A request's headers must arrive within this time (and an idle keep-alive
    /// connection is closed after it).
    pub header_timeout: Duration,
    /// A connection (before any upgrade) lives at most this long.
    pub max_lifetime: Duration,
    /// Largest request head (request line and headers), bytes (at least 8192).
    pub max_head_bytes: usize,
    /// Largest request body, bytes (no route takes one today).
    pub max_body_bytes: usize,
    /// Descriptors kept for the rest of the box: the HTTP and WebSocket caps are
    /// lowered so that both together leave at least this many under `RLIMIT_NOFILE`.
    pub fd_reserve: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            max_per_ip: 64,
            header_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(120),
            max_head_bytes: 16 * 1024,
            max_body_bytes: 16 * 1024,
            fd_reserve: 256,
        }
    }
}

/// Why an HTTP request or connection was refused (`bandsync_http_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `Origin` not the box's own.
    Origin,
    /// `Host` not one of the box's names or addresses.
    Host,
    /// At the global connection cap with no idle connection to close.
    ConnCap,
    /// At the per-address connection cap.
    PerIp,
    /// Headers not complete within the header timeout.
    HeaderTimeout,
    /// Unparsable request.
    BadRequest,
    /// Request head or body over its cap.
    TooLarge,
    /// Connection older than `max_lifetime`.
    Lifetime,
    /// HTTPS: the TLS handshake failed (not TLS, no common cipher, a closed socket).
    TlsHandshake,
}

impl Refused {
    pub const ALL: [Refused; 9] = [
        Refused::Origin,
        Refused::Host,
        Refused::ConnCap,
        Refused::PerIp,
        Refused::HeaderTimeout,
        Refused::BadRequest,
        Refused::TooLarge,
        Refused::Lifetime,
        Refused::TlsHandshake,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Origin => "origin",
            Refused::Host => "host",
            Refused::ConnCap => "conn_cap",
            Refused::PerIp => "per_ip",
            Refused::HeaderTimeout => "header_timeout",
            Refused::BadRequest => "bad_request",
            Refused::TooLarge => "too_large",
            Refused::Lifetime => "lifetime",
            Refused::TlsHandshake => "tls_handshake",
        }
    }
}

/// The HTTP server's counters (on `/metrics`).
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections accepted (and kept) since start.
    pub connections_total: AtomicU64,
    /// HTTP connections open now (WebSockets are counted by the gateway).
    pub connections_open: AtomicU64,
    /// Refusals, indexed like [`Refused::ALL`].
    pub refused: [AtomicU64; 9],
    /// Idle connections closed to make room at the global cap.
    pub evicted: AtomicU64,
    /// Keep-alive connections closed after a request for idling past the header timeout.
    pub idle_closed: AtomicU64,
    /// `accept` failures (descriptors exhausted, …).
    pub accept_errors: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
}

impl HttpStats {
    pub fn refused(&self, why: Refused) {
        let i = Refused::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refused[i].fetch_add(1, Relaxed);
    }
    pub fn refused_by_reason(&self) -> Vec<(&'static str, u64)> {
        Refused::ALL
            .iter()
            .zip(self.refused.iter())
            .map(|(r, n)| (r.as_str(), n.load(Relaxed)))
            .collect()
    }
}

/// One open HTTP connection, as the table sees it.
#[derive(Debug)]
pub struct ConnState {
    ip: IpAddr,
    /// Inside a request (between its head and its response).
    busy: AtomicBool,
    /// When it last became idle (ms since the table's origin).
    idle_since_ms: AtomicU64,
    /// Closed to make room (or at shutdown).
    pub kill: Notify,
    killed: AtomicBool,
}

impl ConnState {
    pub fn begin_request(&self) {
        self.busy.store(true, Relaxed);
    }
    pub fn is_busy(&self) -> bool {
        self.busy.load(Relaxed)
    }
}

/// The open HTTP connections: counts per address, eviction at the global cap.
#[derive(Debug)]
pub struct ConnTable {
    limits: HttpLimits,
    origin: Instant,
    stats: Arc<HttpStats>,
    inner: Mutex<TableInner>,
    /// Signalled each time a connection leaves the table.
    released: Notify,
}

#[derive(Debug, Default)]
struct TableInner {
    next: u64,
    per_ip: HashMap<IpAddr, usize>,
    conns: BTreeMap<u64, Arc<ConnState>>,
}

/// A connection's place in the table; freed on drop.
#[derive(Debug)]
pub struct Admitted {
    table: Arc<ConnTable>,
    id: u64,
    pub conn: Arc<ConnState>,
}

impl Admitted {
    /// The request is answered: the connection is idle again (evictable).
    pub fn end_request(conn: &ConnState, table: &ConnTable) {
        conn.idle_since_ms.store(table.ms(), Relaxed);
        conn.busy.store(false, Relaxed);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut t = self.table.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.conns.remove(&self.id).is_some() {
            if let Some(n) = t.per_ip.get_mut(&self.conn.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.per_ip.remove(&self.conn.ip);
                }
            }
            self.table.stats.connections_open.fetch_sub(1, Relaxed);
        }
        drop(t);
        self.table.released.notify_one();
    }
}

impl ConnTable {
    pub fn new(limits: HttpLimits, stats: Arc<HttpStats>) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            limits,
            origin: Instant::now(),
            stats,
            inner: Mutex::new(TableInner::default()),
            released: Notify::new(),
        })
    }

    /// Connections told to close are still in the table until their tasks run; at most
    /// this many beyond the cap.
    const DRAINING: usize = 64;

    /// Evicted connections that have not gone yet fill the table beyond the cap.
    fn overfull_locked(&self, t: &TableInner) -> bool {
        t.conns.len() >= self.limits.max_connections.max(1) + Self::DRAINING
    }

    fn overfull(&self) -> bool {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.overfull_locked(&t)
    }

    /// Back-pressure for the accept loop: while evicted connections have not gone yet,
    /// wait for them (at most `max`) instead of accepting and refusing a newcomer. The
    /// kernel's backlog holds the next connections meanwhile.
    pub async fn wait_for_room(&self, max: Duration) {
        let until = tokio::time::Instant::now() + max;
        while self.overfull() {
            if tokio::time::timeout_at(until, self.released.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    pub fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    fn ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Take a place for a new connection from `ip`, closing the longest-idle
    /// connection at the global cap; `Err` says why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refused> {
        let ip = ip.to_canonical();
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_ip.max(1) {
            return Err(Refused::PerIp);
        }
        // Connections already told to close still count until they are gone; at most
        // a handful are in that state, so the cap holds within a few.
        let live = t.conns.values().filter(|c| !c.killed.load(Relaxed)).count();
        if live >= self.limits.max_connections.max(1) {
            let victim = t
                .conns
                .values()
                .filter(|c| !c.killed.load(Relaxed) && !c.busy.load(Relaxed))
                .min_by_key(|c| c.idle_since_ms.load(Relaxed))
                .cloned();
            let Some(v) = victim else {
                return Err(Refused::ConnCap);
            };
            v.killed.store(true, Relaxed);
            v.kill.notify_one();
            self.stats.evicted.fetch_add(1, Relaxed);
        }
        if self.overfull_locked(&t) {
            // Evicted connections are slow to go: do not pile up more.
            return Err(Refused::ConnCap);
        }
        t.next += 1;
        let id = t.next;
        let conn = Arc::new(ConnState {
            ip,
            busy: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.ms()),
            kill: Notify::new(),
            killed: AtomicBool::new(false),
        });
        t.conns.insert(id, conn.clone());
        *t.per_ip.entry(ip).or_insert(0) += 1;
        self.stats.connections_open.fetch_add(1, Relaxed);
        self.stats.connections_total.fetch_add(1, Relaxed);
        Ok(Admitted {
            table: self.clone(),
            id,
            conn,
        })
    }

    /// Tell every connection to close (shutdown).
    pub fn close_all(&self) {
        let t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for c in t.conns.values() {
            c.killed.store(true, Relaxed);
            c.kill.notify_one();
        }
    }
}

pub use crate::sys::ratelog::RateLog;

/// Raise the soft `RLIMIT_NOFILE` towards the hard one (at most 65536) and return the
/// soft limit in force.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        let want = r.rlim_max.min(65536);
        if want > r.rlim_cur {
            let n = libc::rlimit {
                rlim_cur: want,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &n) == 0 {
                r.rlim_cur = want;
            }
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    let n = r.rlim_cur as u64;
    n
}

/// Split the descriptors under `nofile` (less the reserve) between HTTP connections and
/// WebSockets: `(http cap, websocket cap)`, each at most what was asked.
pub fn fd_budget(nofile: u64, limits: &HttpLimits, ws_max: usize) -> (usize, usize) {
    let budget = nofile.saturating_sub(limits.fd_reserve).max(16) as usize;
    let http = limits.max_connections.min((budget / 3).max(8));
    let ws = ws_max.min(budget.saturating_sub(http).max(8));
    (http, ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_address_and_evicts_the_longest_idle() {
        let stats = Arc::new(HttpStats::default());
        let t = ConnTable::new(
            HttpLimits {
                max_connections: 3,
                max_per_ip: 2,
                ..HttpLimits::default()
            },
            stats.clone(),
        );
        let a1 = t.admit(ip("10.0.0.1")).unwrap();
        let _a2 = t.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(t.admit(ip("10.0.0.1")).unwrap_err(), Refused::PerIp);
        let b1 = t.admit(ip("10.0.0.2")).unwrap();
        b1.conn.begin_request();
        // full: the oldest idle (a1) makes room
        let _c1 = t.admit(ip("10.0.0.3")).unwrap();
        assert!(a1.conn.killed.load(Relaxed));
        assert_eq!(stats.evicted.load(Relaxed), 1);
        drop(a1);
        assert_eq!(stats.connections_open.load(Relaxed), 3);
        // a1's place is free again for its address
        assert!(t.admit(ip("10.0.0.1")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_accept_loop_waits_while_evicted_connections_drain() {
        let t = ConnTable::new(
            HttpLimits {
                max_connections: 1,
                ..HttpLimits::default()
            },
            Arc::new(HttpStats::default()),
        );
        // every admission evicts the one before, but none has gone yet
        let mut held: Vec<Admitted> = (0..=ConnTable::DRAINING)
            .map(|i| {
                t.admit(ip(&format!("10.0.{}.{}", i / 200, i % 200 + 1)))
                    .unwrap()
            })
            .collect();
        assert!(t.overfull());
        assert_eq!(t.admit(ip("10.1.0.1")).unwrap_err(), Refused::ConnCap);
        // nothing leaves: the wait is bounded
        let start = tokio::time::Instant::now();
        t.wait_for_room(Duration::from_millis(300)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        // one evicted connection goes: the wait ends at once and a newcomer is admitted
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            t2.wait_for_room(Duration::from_secs(5)).await;
            start.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held.remove(0));
        assert_eq!(waiter.await.unwrap(), Duration::from_millis(20));
        assert!(t.admit(ip("10.1.0.1")).is_ok());
    }

    #[test]
    fn budget_leaves_descriptors_for_the_box() {
        let l = HttpLimits::default();
        assert_eq!(fd_budget(20000, &l, 2000), (1024, 2000));
        let (h, w) = fd_budget(1024, &l, 2000);
        assert!(h + w + 256 <= 1024, "{h} {w}");
    }

    #[test]
    fn log_lines_are_rate_limited() {
        let l = RateLog::new(Duration::from_secs(60));
        assert_eq!(l.allow("x"), Some(0));
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("y"), Some(0));
        assert_eq!(l.suppressed.load(Relaxed), 1);
    }
}
