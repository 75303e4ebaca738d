//! The node's HTTP listener: the phone page (`/`), its WebSocket (`/ws`, see
//! [`crate::web::gateway`]), `/health` and `/metrics`.
//!
//! # Strangers
//!
//! The accept loop is ours (hyper's HTTP/1 connection builder, not `axum::serve`), so
//! that every connection costs bounded time, memory and descriptors
//! ([`HttpLimits`]):
//!
//! * a request's headers must arrive within `header_timeout` (5 s), which also closes
//!   idle keep-alive connections; a connection (before any WebSocket upgrade) lives at
//!   most `max_lifetime`;
//! * at most `max_per_ip` (64) connections per source address and `max_connections`
//!   (1024) in all; at the global cap the connection idle the longest is closed to
//!   make room, so a slow-header flood cannot keep a phone or `/health` out;
//! * request heads over `max_head_bytes` (16 KiB) get 431, bodies over
//!   `max_body_bytes` (16 KiB) 413;
//! * both caps are lowered to leave `fd_reserve` descriptors under `RLIMIT_NOFILE`
//!   (whose soft limit is raised to the hard one first) for the rest of the box;
//! * `/ws` and every state-changing request (any method but GET, HEAD, OPTIONS) need a
//!   `Host` that is one of the box's own names or addresses and, if there is an
//!   `Origin`, an origin naming one of them ([`crate::web::hosts`]); else `403` with a
//!   plain-text reason. No other web page and no DNS-rebound name can drive the box;
//!   native apps and `curl` (no `Origin`) can.
//!
//! Everything refused is counted on `/metrics` (`bandsync_http_refused_total{reason}`);
//! log lines about it are rate-limited (one per kind per 10 s).
//!
//! `/health` and `/metrics` read the room's published status
//! ([`HttpState::status`]), never waiting on the room task per request.

use crate::sys::clock::Clock;
use crate::web::gateway::{Gateway, Peer};
pub use crate::web::guard::HttpLimits;
use crate::web::guard::{Admitted, ConnState, ConnTable, HttpStats, RateLog, Refused};
pub use crate::web::state::HttpState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// What the routes share.
#[derive(Clone)]
struct Web {
    st: HttpState,
    gw: Gateway,
    http: Arc<HttpStats>,
    feed: StatusFeed,
    log: Arc<RateLog>,
    max_body: usize,
    /// The HTTPS listener's port and certificate fingerprint, when it runs.
    https: Option<HttpsInfo>,
}

/// What the HTTP page tells phones about the HTTPS one (`GET /https.json`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct HttpsInfo {
    pub port: u16,
    /// SHA-256 of the certificate, `AB:CD:…`.
    pub sha256: String,
    /// The names and addresses the certificate names.
    pub names: Vec<String>,
}

/// The router over `state`, with default limits (its counters are its own).
pub fn router(state: HttpState) -> Router {
    let limits = HttpLimits::default();
    let http = Arc::new(HttpStats::default());
    let feed = StatusFeed::start(state.status.clone(), state.room.clone());
    let log = Arc::new(RateLog::new(Duration::from_secs(10)));
    app(state, &limits, http, feed, log, None)
}

fn app(
    state: HttpState,
    limits: &HttpLimits,
    http: Arc<HttpStats>,
    feed: StatusFeed,
    log: Arc<RateLog>,
    https: Option<HttpsInfo>,
) -> Router {
    let gw = Gateway::new(&state);
    let venue = crate::web::venue::routes(state.venue.clone());
    if let Some(u) = state.control_updates.clone() {
        gw.follow_control(u);
    }
    let web = Web {
        st: state,
        gw: gw.clone(),
        http,
        feed,
        log,
        max_body: limits.max_body_bytes,
        https,
    };
    Router::new()
        .route("/", get(crate::web::gateway::page))
        .route("/index.html", get(crate::web::gateway::page))
        .route("/phone.js", get(crate::web::gateway::talkback::script))
        .route("/https.json", get(https_info))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(web.clone())
        .merge(
            Router::new()
                .route("/ws", get(crate::web::gateway::ws_handler))
                .with_state(gw),
        )
        .merge(venue)
        // every request, unknown paths included, goes through the guard
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(web, guard))
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found: this box serves /, /ws, /health, /metrics, /venue and /venue.json\n",
    )
}

/// `GET /https.json`: where the secure page is and the fingerprint of its certificate
/// (`{"port":null}` when HTTPS is off).
async fn https_info(State(web): State<Web>) -> impl IntoResponse {
    let v = match &web.https {
        Some(h) => serde_json::json!({"port": h.port, "sha256": h.sha256, "names": h.names}),
        None => serde_json::json!({"port": null}),
    };
    ([(header::CACHE_CONTROL, "no-cache")], Json(v))
}

/// Host and Origin checks, the body cap.
async fn guard(State(web): State<Web>, req: Request, next: Next) -> Response {
    web.http.requests.fetch_add(1, Relaxed);
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if len.is_some_and(|n| n > web.max_body as u64) {
        return web.refuse(
            Refused::TooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over the {}-byte limit\n", web.max_body),
        );
    }
    let changes = req.uri().path() == "/ws"
        || !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes {
        let hosts = req.headers().get_all(header::HOST).iter().count();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let origins = req.headers().get_all(header::ORIGIN).iter().count();
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .map(|v| v.to_str().unwrap_or("\u{fffd}"));
        let verdict = if hosts > 1 {
            Err(crate::web::hosts::Refusal::Host)
        } else if origins > 1 {
            Err(crate::web::hosts::Refusal::Origin)
        } else {
            web.st.allowed_hosts.check(host.as_deref(), origin)
        };
        match verdict {
            Ok(()) => {}
            Err(crate::web::hosts::Refusal::Host) => {
                return web.refuse(
                    Refused::Host,
                    StatusCode::FORBIDDEN,
                    "refused: the Host header must name this box (its hostname, <name>.local, localhost or one of its addresses)\n".into(),
                )
            }
            Err(crate::web::hosts::Refusal::Origin) => {
                return web.refuse(
                    Refused::Origin,
                    StatusCode::FORBIDDEN,
                    "refused: only this box's own page may drive it (the Origin names another site)\n".into(),
                )
            }
        }
    }
    let max = web.max_body;
    next.run(req.map(|b| Body::new(http_body_util::Limited::new(b, max))))
        .await
}

impl Web {
    fn refuse(&self, why: Refused, code: StatusCode, text: String) -> Response {
        self.http.refused(why);
        if let Some(left_out) = self.log.allow(why.as_str()) {
            tracing::info!(
                reason = why.as_str(),
                left_out,
                "HTTP request refused (one line per 10 s; all are counted in /metrics)"
            );
        }
        (
            code,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::CONNECTION, "close"),
            ],
            text,
        )
            .into_response()
    }
}

/// Bind and serve until `shutdown`, with the default [`HttpLimits`]. A port that cannot
/// be bound is an error for the caller to report; the click goes on without HTTP.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    serve_with(addr, state, HttpLimits::default(), shutdown).await
}

/// [`serve`] with other limits.
pub async fn serve_with(
    addr: SocketAddr,
    state: HttpState,
    limits: HttpLimits,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    serve_both(addr, None, state, limits, shutdown)
        .await
        .map(|(a, _)| a)
}

/// The HTTPS listener: its address, certificate and TLS config.
pub struct HttpsListen {
    pub addr: SocketAddr,
    pub identity: crate::web::tls::HttpsIdentity,
    pub config: Arc<rustls::ServerConfig>,
}

/// HTTP on `addr` and, with `https`, HTTPS too: one router (one phone gateway: phones
/// on either see each other) and one connection table (the same caps for both).
/// An HTTPS port that cannot be bound is reported in the second result; HTTP goes on.
pub async fn serve_both(
    addr: SocketAddr,
    https: Option<HttpsListen>,
    mut state: HttpState,
    mut limits: HttpLimits,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, Option<anyhow::Result<SocketAddr>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind HTTP to {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let tls = match https {
        None => None,
        Some(h) => match tokio::net::TcpListener::bind(h.addr).await {
            Ok(l) => match l.local_addr() {
                Ok(a) => Some(Ok((l, a, h))),
                Err(e) => Some(Err(anyhow::anyhow!("HTTPS listener: {e}"))),
            },
            Err(e) => Some(Err(anyhow::anyhow!("cannot bind HTTPS to {}: {e}", h.addr))),
        },
    };
    let nofile = crate::web::guard::raise_nofile();
    let (http_cap, ws_cap) =
        crate::web::guard::fd_budget(nofile, &limits, state.limits.max_connections);
    if http_cap < limits.max_connections || ws_cap < state.limits.max_connections {
        tracing::warn!(
            nofile,
            http = http_cap,
            phones = ws_cap,
            "few descriptors (RLIMIT_NOFILE): HTTP connections and phones capped lower"
        );
    }
    limits.max_connections = http_cap;
    state.limits.max_connections = ws_cap;
    tracing::info!(addr = %local, "HTTP listening (phone page /, /ws, /health, /metrics)");
    let stats = Arc::new(HttpStats::default());
    let feed = StatusFeed::start(state.status.clone(), state.room.clone());
    let log = Arc::new(RateLog::new(Duration::from_secs(10)));
    let info = match &tls {
        Some(Ok((_, a, h))) => Some(HttpsInfo {
            port: a.port(),
            sha256: h.identity.sha256.clone(),
            names: h.identity.names.clone(),
        }),
        _ => None,
    };
    let router = app(state, &limits, stats.clone(), feed, log.clone(), info);
    let table = ConnTable::new(limits, stats.clone());
    tokio::spawn(accept_loop(
        listener,
        None,
        router.clone(),
        table.clone(),
        stats.clone(),
        log.clone(),
        shutdown.clone(),
    ));
    let tls = tls.map(|r| {
        r.map(|(l, a, h)| {
            tracing::info!(addr = %a, sha256 = %h.identity.sha256, "HTTPS listening (the same page and limits)");
            tokio::spawn(accept_loop(
                l,
                Some(tokio_rustls::TlsAcceptor::from(h.config)),
                router,
                table,
                stats,
                log,
                shutdown,
            ));
            a
        })
    });
    Ok((local, tls))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    table: Arc<ConnTable>,
    stats: Arc<HttpStats>,
    log: Arc<RateLog>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        table.wait_for_room(Duration::from_millis(500)).await;
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => None,
            r = listener.accept() => Some(r),
        };
        let (tcp, peer) = match accepted {
            None => break,
            Some(r) => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors (or a connection gone before we took it):
                    // back off instead of spinning.
                    stats.accept_errors.fetch_add(1, Relaxed);
                    if let Some(left_out) = log.allow("accept") {
                        tracing::warn!(error = %e, left_out, "HTTP accept failed (one line per 10 s)");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let admitted = match table.admit(peer.ip()) {
            Ok(a) => a,
            Err(why) => {
                stats.refused(why);
                if let Some(left_out) = log.allow(why.as_str()) {
                    tracing::info!(
                        reason = why.as_str(),
                        left_out,
                        "HTTP connection refused (one line per 10 s; all are counted in /metrics)"
                    );
                }
                drop(tcp);
                continue;
            }
        };
        // No Nagle: a phone must get a snapshot the moment it is sent, not after the
        // previous message's (delayed) ACK.
        let _ = tcp.set_nodelay(true);
        let (router, table, stats, shutdown) = (
            router.clone(),
            table.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        match &tls {
            None => {
                tokio::spawn(serve_conn(
                    tcp, peer, admitted, router, table, stats, shutdown,
                ));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The handshake has the header deadline too: a stranger that opens
                    // TLS and stalls costs a slot for at most that long.
                    let deadline = table.limits().header_timeout;
                    let kill = admitted.conn.clone();
                    let hs = tokio::select! {
                        r = tokio::time::timeout(deadline, acceptor.accept(tcp)) => r,
                        _ = kill.kill.notified() => return,
                    };
                    match hs {
                        Ok(Ok(s)) => {
                            serve_conn(s, peer, admitted, router, table, stats, shutdown).await
                        }
                        Ok(Err(_)) => stats.refused(Refused::TlsHandshake),
                        Err(_) => stats.refused(Refused::HeaderTimeout),
                    }
                });
            }
        }
    }
    table.close_all();
}

async fn serve_conn<IO>(
    tcp: IO,
    peer: SocketAddr,
    admitted: Admitted,
    router: Router,
    table: Arc<ConnTable>,
    stats: Arc<HttpStats>,
    mut shutdown: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = table.limits().clone();
    let conn: Arc<ConnState> = admitted.conn.clone();
    let served = Arc::new(AtomicBool::new(false));
    let svc = {
        let (conn, table, served) = (conn.clone(), table.clone(), served.clone());
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            conn.begin_request();
            served.store(true, Relaxed);
            req.extensions_mut().insert(Peer(peer));
            let fut = tower_service::Service::call(&mut router.clone(), req.map(Body::new));
            let (conn, table) = (conn.clone(), table.clone());
            async move {
                let r = fut.await;
                Admitted::end_request(&conn, &table);
                r
            }
        })
    };
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(true);
    let c = b.serve_connection(TokioIo::new(tcp), svc).with_upgrades();
    tokio::pin!(c);
    let lifetime = tokio::time::sleep(limits.max_lifetime);
    tokio::pin!(lifetime);
    let r = tokio::select! {
        r = c.as_mut() => r,
        _ = conn.kill.notified() => return, // evicted (or shutdown): dropped, closed
        _ = &mut lifetime => {
            stats.refused(Refused::Lifetime);
            return;
        }
        _ = shutdown.wait_for(|stop| *stop) => Ok(()),
    };
    if *shutdown.borrow() {
        c.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(1), c).await;
        return;
    }
    if let Err(e) = r {
        if e.is_timeout() {
            // headers too slow; after a served request it is an idle keep-alive
            if served.load(Relaxed) && !conn.is_busy() {
                stats.idle_closed.fetch_add(1, Relaxed);
            } else {
                stats.refused(Refused::HeaderTimeout);
            }
        } else if e.is_parse_too_large() {
            stats.refused(Refused::TooLarge);
        } else if e.is_parse() {
            stats.refused(Refused::BadRequest);
        }
    }
    drop(admitted);
}

/// The room's status for `/health` and `/metrics`: what the room task publishes, or,
/// until it publishes anything, what one background poller asks the room (at most
/// every [`POLL_EVERY`], only while someone reads it).
#[derive(Clone)]
struct StatusFeed(Arc<FeedInner>);

struct FeedInner {
    published: watch::Receiver<Option<crate::core::room::Status>>,
    polled: watch::Sender<Option<(tokio::time::Instant, crate::core::room::Status)>>,
    demand: Arc<Notify>,
    /// The room task is gone: the node is stopping.
    gone: AtomicBool,
}

/// The poller asks the room at most this often.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// A polled status younger than this is served as is.
const FRESH: Duration = Duration::from_millis(500);

impl StatusFeed {
    fn start(
        published: watch::Receiver<Option<crate::core::room::Status>>,
        room: crate::net::RoomHandle,
    ) -> StatusFeed {
        let feed = StatusFeed(Arc::new(FeedInner {
            published,
            polled: watch::channel(None).0,
            demand: Arc::new(Notify::new()),
            gone: AtomicBool::new(false),
        }));
        tokio::spawn(poller(Arc::downgrade(&feed.0), feed.0.demand.clone(), room));
        feed
    }

    /// The latest status, waiting (at most `wait`) for a fresh one when only the
    /// poller has one and it is old. `None`: nothing known yet, or stopping.
    async fn get(&self, wait: Duration) -> Option<crate::core::room::Status> {
        if let Some(s) = self.0.published.borrow().clone() {
            return Some(s);
        }
        let mut rx = self.0.polled.subscribe();
        let fresh = |v: &Option<(tokio::time::Instant, crate::core::room::Status)>| {
            v.as_ref().is_some_and(|(at, _)| at.elapsed() < FRESH)
        };
        if !fresh(&rx.borrow_and_update()) && !self.stopping() {
            self.0.demand.notify_one();
            let mut published = self.0.published.clone();
            let gone = &self.0.gone;
            let _ = tokio::time::timeout(wait, async {
                tokio::select! {
                    _ = rx.wait_for(|v| fresh(v) || gone.load(Relaxed)) => {}
                    _ = published.wait_for(|v| v.is_some()) => {}
                }
            })
            .await;
        }
        if let Some(s) = self.0.published.borrow().clone() {
            return Some(s);
        }
        let v = self.0.polled.borrow().as_ref().map(|(_, s)| s.clone());
        v
    }

    fn stopping(&self) -> bool {
        self.0.gone.load(Relaxed)
    }
}

async fn poller(
    feed: std::sync::Weak<FeedInner>,
    demand: Arc<Notify>,
    room: crate::net::RoomHandle,
) {
    let mut published = match feed.upgrade() {
        Some(f) => f.published.clone(),
        None => return,
    };
    let mut open = true;
    loop {
        if published.borrow().is_some() {
            // The room task publishes: nothing to poll; note when it stops.
            let _ = published.wait_for(|_| false).await;
            if let Some(f) = feed.upgrade() {
                f.gone.store(true, Relaxed);
            }
            return;
        }
        // Wait for a reader (and, while the room task publishes nothing, for it).
        {
            tokio::select! {
                _ = demand.notified() => {}
                r = published.changed(), if open => {
                    if r.is_err() {
                        open = false;
                    }
                    continue;
                }
                // the feed may be gone with no reader left to wake us
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    if feed.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
            }
        }
        let r = tokio::time::timeout(Duration::from_secs(1), room.status()).await;
        let Some(f) = feed.upgrade() else { return };
        match r {
            Ok(Some(s)) => {
                f.polled
                    .send_replace(Some((tokio::time::Instant::now(), s)));
            }
            Ok(None) => {
                // the room task is gone: the node is stopping
                f.gone.store(true, Relaxed);
                f.polled.send_replace(None);
                return;
            }
            Err(_) => {} // a slow room: keep the last one
        }
        drop(f);
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `/health`: the published status, with what the audio plays now.
async fn health(State(web): State<Web>) -> impl IntoResponse {
    let st = &web.st;
    let Some(s) = web.feed.get(Duration::from_secs(1)).await else {
        let status = if web.feed.stopping() {
            "stopping"
        } else {
            "starting"
        };
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": status})),
        );
    };
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    // the clock-driven fields, now (the status may be a few hundred ms old)
    let snap = st.cell.read();
    let now = snap.map.to_session(st.clock.now_ns());
    let cur = snap.timeline.current(now);
    v["session_ns"] = serde_json::json!(now);
    v["beat"] = serde_json::json!(snap.timeline.beat_at(now).as_f64());
    v["playing"] = serde_json::json!(cur.playing);
    v["tempo"] = serde_json::json!(cur.tempo.bpm());
    v["meter"] = serde_json::json!(cur.meter.get());
    v["status"] = serde_json::json!("ok");
    v["audio"] = serde_json::json!({
        "sink": st.audio.sink_name(),
        "callbacks": st.audio.callbacks.load(Relaxed),
        "clicks": st.audio.clicks.load(Relaxed),
        "late_clicks": st.audio.late_clicks.load(Relaxed),
        "missed_clicks": st.audio.missed_clicks.load(Relaxed),
        "card_rate_ppm": st.audio.rate_ppb.load(Relaxed) as f64 / 1000.0,
        "rt_priority": st.audio.rt_priority.load(Relaxed).max(0),
    });
    (StatusCode::OK, Json(v))
}

async fn metrics(State(web): State<Web>) -> impl IntoResponse {
    let st = &web.st;
    let mut m = String::new();
    let mut put = |name: &str, help: &str, kind: &str, lines: Vec<(String, f64)>| {
        m.push_str(&format!(
            "# HELP bandsync_{name} {help}\n# TYPE bandsync_{name} {kind}\n"
        ));
        for (labels, v) in lines {
            m.push_str(&format!("bandsync_{name}{labels} {v}\n"));
        }
    };
    let a = &st.audio;
    put(
        "audio_callbacks_total",
        "Audio callbacks run.",
        "counter",
        vec![(String::new(), a.callbacks.load(Relaxed) as f64)],
    );
    put(
        "audio_rt_priority",
        "SCHED_FIFO priority of the audio thread (0: normal priority).",
        "gauge",
        vec![(String::new(), a.rt_priority.load(Relaxed).max(0) as f64)],
    );
    put(
        "clicks_total",
        "Clicks played.",
        "counter",
        vec![(String::new(), a.clicks.load(Relaxed) as f64)],
    );
    put(
        "late_clicks_total",
        "Clicks played late at a buffer start.",
        "counter",
        vec![(String::new(), a.late_clicks.load(Relaxed) as f64)],
    );
    put(
        "missed_clicks_total",
        "Clicks dropped as too late.",
        "counter",
        vec![(String::new(), a.missed_clicks.load(Relaxed) as f64)],
    );
    put(
        "audio_underruns_total",
        "Audio stream errors (xruns included).",
        "counter",
        vec![(String::new(), a.device_errors.load(Relaxed) as f64)],
    );
    put(
        "audio_clock_resets_total",
        "Frame-clock restarts.",
        "counter",
        vec![(String::new(), a.clock_resets.load(Relaxed) as f64)],
    );
    put(
        "card_rate_ppm",
        "Sound card rate vs nominal, as the node's clock sees it.",
        "gauge",
        vec![(String::new(), a.rate_ppb.load(Relaxed) as f64 / 1000.0)],
    );
    let ms = &st.mesh;
    put(
        "refused_total",
        "Inputs refused, by reason.",
        "counter",
        vec![
            (
                "{reason=\"auth\"}".into(),
                ms.auth_failures.load(Relaxed) as f64,
            ),
            (
                "{reason=\"bad_frame\"}".into(),
                ms.bad_frames.load(Relaxed) as f64,
            ),
            (
                "{reason=\"bad_request\"}".into(),
                ms.bad_requests.load(Relaxed) as f64,
            ),
            (
                "{reason=\"bad_datagram\"}".into(),
                ms.bad_datagrams.load(Relaxed) as f64,
            ),
            (
                "{reason=\"other_room\"}".into(),
                ms.refused_other_room.load(Relaxed) as f64,
            ),
            (
                "{reason=\"clock_sample\"}".into(),
                ms.rejected_samples.load(Relaxed) as f64,
            ),
            (
                "{reason=\"preauth_full\"}".into(),
                ms.preauth_refused.load(Relaxed) as f64,
            ),
            (
                "{reason=\"decision_stamp\"}".into(),
                ms.stamps_refused.load(Relaxed) as f64,
            ),
        ],
    );
    put(
        "quic_retries_total",
        "Incoming connections asked to prove their address first (under load).",
        "counter",
        vec![(String::new(), ms.preauth_retries.load(Relaxed) as f64)],
    );
    if let Some(l) = &st.link {
        put(
            "link_enabled",
            "1 when this box is an Ableton Link peer on at least one interface.",
            "gauge",
            vec![(String::new(), l.enabled.load(Relaxed) as u8 as f64)],
        );
        put(
            "link_peers",
            "Link apps in the room's Link session, seen by this box.",
            "gauge",
            vec![(String::new(), l.peers.load(Relaxed) as f64)],
        );
        put(
            "link_messages_total",
            "Link datagrams received, and what became of them.",
            "counter",
            vec![
                (
                    "{kind=\"received\"}".into(),
                    l.messages.load(Relaxed) as f64,
                ),
                ("{kind=\"pong\"}".into(), l.pongs.load(Relaxed) as f64),
                (
                    "{kind=\"overruled\"}".into(),
                    l.overruled.load(Relaxed) as f64,
                ),
                (
                    "{kind=\"forwarded\"}".into(),
                    l.forwarded.load(Relaxed) as f64,
                ),
                (
                    "{kind=\"bad\"}".into(),
                    l.bad_datagrams.load(Relaxed) as f64,
                ),
            ],
        );
        put(
            "link_app_samples_total",
            "Samples of Link apps' clocks taken by this box's pings.",
            "counter",
            vec![(String::new(), l.app_samples.load(Relaxed) as f64)],
        );
        put(
            "link_steps_total",
            "Steps of the room's Link ghost clock onto the apps' clocks proposed by this box.",
            "counter",
            vec![(String::new(), l.steps.load(Relaxed) as f64)],
        );
        put(
            "link_shift_us",
            "The room's Link ghost clock shift (replicated from the leader), µs.",
            "gauge",
            vec![(String::new(), l.shift_ns.load(Relaxed) as f64 / 1e3)],
        );
    }
    put(
        "merges_total",
        "Records that took a peer's later decision when groups of boxes met.",
        "counter",
        vec![(String::new(), ms.merges.load(Relaxed) as f64)],
    );
    put(
        "peer_connections_total",
        "Authenticated peer connections.",
        "counter",
        vec![(String::new(), ms.connections.load(Relaxed) as f64)],
    );
    let g = &st.stats;
    let one = |v: &std::sync::atomic::AtomicU64| vec![(String::new(), v.load(Relaxed) as f64)];
    put(
        "phone_connections",
        "Phone WebSockets open.",
        "gauge",
        one(&g.connections_open),
    );
    put(
        "phone_connections_total",
        "Phone WebSockets accepted.",
        "counter",
        one(&g.connections_total),
    );
    put(
        "phone_refused_total",
        "Phone WebSockets refused at the connection cap.",
        "counter",
        one(&g.refused_full),
    );
    put(
        "phone_messages_received_total",
        "Messages received from phones.",
        "counter",
        one(&g.messages_in),
    );
    put(
        "phone_messages_sent_total",
        "Messages sent to phones.",
        "counter",
        one(&g.messages_out),
    );
    put(
        "phone_broadcasts_total",
        "Snapshots and room stats pushed to every joined phone.",
        "counter",
        one(&g.broadcasts),
    );
    put(
        "phone_broadcast_last_us",
        "Time the last broadcast took to queue for every phone.",
        "gauge",
        one(&g.broadcast_last_us),
    );
    put(
        "phone_errors_total",
        "Errors sent to phones, by code.",
        "counter",
        g.errors_by_code()
            .into_iter()
            .map(|(c, n)| (format!("{{code=\"{c}\"}}"), n as f64))
            .collect(),
    );
    put(
        "phone_rate_limited_total",
        "Phone messages dropped by the rate limit.",
        "counter",
        one(&g.rate_limited),
    );
    put(
        "phone_closed_total",
        "Phone connections closed by the node, by reason.",
        "counter",
        vec![
            (
                "{reason=\"abuse\"}".into(),
                g.closed_abuse.load(Relaxed) as f64,
            ),
            (
                "{reason=\"slow\"}".into(),
                g.dropped_slow.load(Relaxed) as f64,
            ),
            (
                "{reason=\"idle\"}".into(),
                g.closed_idle.load(Relaxed) as f64,
            ),
        ],
    );
    put(
        "phone_changes_total",
        "Changes requested from phones.",
        "counter",
        one(&g.changes_requested),
    );
    put(
        "phone_control",
        "Who may change the room from a phone (1 on the mode in force).",
        "gauge",
        ["pin", "open", "off"]
            .iter()
            .map(|m| {
                (
                    format!("{{mode=\"{m}\"}}"),
                    if web.gw.control().as_str() == *m {
                        1.0
                    } else {
                        0.0
                    },
                )
            })
            .collect(),
    );
    let p = web.gw.pin_stats();
    put(
        "pin_failures_total",
        "Wrong control PINs.",
        "counter",
        one(&p.failures),
    );
    put(
        "pin_lockouts_total",
        "Lockouts imposed on a source address after wrong PINs.",
        "counter",
        one(&p.lockouts),
    );
    put(
        "pin_refused_total",
        "PIN guesses refused, by reason (locked_out: not compared; throttled: wrong, beyond the box's rate of wrong PINs).",
        "counter",
        vec![
            (
                "{reason=\"locked_out\"}".into(),
                p.refused_locked.load(Relaxed) as f64,
            ),
            (
                "{reason=\"throttled\"}".into(),
                p.throttled.load(Relaxed) as f64,
            ),
        ],
    );
    put(
        "pin_accepted_total",
        "Right control PINs.",
        "counter",
        one(&p.accepted),
    );
    put(
        "pin_locked_sources",
        "Source addresses locked out from PIN guessing now.",
        "gauge",
        vec![(String::new(), web.gw.locked_sources() as f64)],
    );
    put(
        "pin_sources_evicted_total",
        "Sources forgotten to keep the PIN lockout table bounded.",
        "counter",
        one(&p.evicted),
    );
    if let Some(m) = &st.mirror {
        let r = m.snapshot();
        let n = |v: u64| vec![(String::new(), v as f64)];
        put(
            "redis_writes_total",
            "Records the Redis mirror wrote.",
            "counter",
            n(r.writes),
        );
        put(
            "redis_refused_total",
            "Mirror writes refused by the epoch fence (Redis holds a newer record).",
            "counter",
            n(r.fenced),
        );
        put(
            "redis_errors_total",
            "Failed Redis attempts (connect, command, timeout, bad reply, server error).",
            "counter",
            n(r.errors),
        );
        put(
            "redis_reconnects_total",
            "Times the mirror worked again after losing its connection.",
            "counter",
            n(r.reconnects),
        );
        put(
            "redis_lag_seconds",
            "How long Redis has been behind this node's record (0: current).",
            "gauge",
            vec![(String::new(), r.lag_ms as f64 / 1000.0)],
        );
        put(
            "redis_state",
            "The mirror's state (1 on the state in force).",
            "gauge",
            [
                ("connected", crate::mirror::MirrorState::Connected),
                ("stale", crate::mirror::MirrorState::Stale),
                ("off", crate::mirror::MirrorState::Off),
            ]
            .iter()
            .map(|(name, s)| {
                (
                    format!("{{state=\"{name}\"}}"),
                    if r.state == *s { 1.0 } else { 0.0 },
                )
            })
            .collect(),
        );
    }
    let h = &web.http;
    put(
        "http_connections",
        "HTTP connections open (before any WebSocket upgrade).",
        "gauge",
        one(&h.connections_open),
    );
    put(
        "http_connections_total",
        "HTTP connections accepted.",
        "counter",
        one(&h.connections_total),
    );
    put(
        "http_requests_total",
        "HTTP requests received.",
        "counter",
        one(&h.requests),
    );
    put(
        "http_refused_total",
        "HTTP requests and connections refused, by reason.",
        "counter",
        h.refused_by_reason()
            .into_iter()
            .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n as f64))
            .collect(),
    );
    put(
        "http_evicted_total",
        "Idle HTTP connections closed to make room at the connection cap.",
        "counter",
        one(&h.evicted),
    );
    put(
        "http_idle_closed_total",
        "Keep-alive HTTP connections closed for idling.",
        "counter",
        one(&h.idle_closed),
    );
    put(
        "http_accept_errors_total",
        "HTTP accept failures (descriptors exhausted, ...).",
        "counter",
        one(&h.accept_errors),
    );
    put(
        "log_suppressed_total",
        "Log lines about untrusted input left out by the log rate limit.",
        "counter",
        vec![(
            String::new(),
            (web.log.suppressed.load(Relaxed) + web.gw.logs_suppressed()) as f64,
        )],
    );
    let (buckets, sum, count) = g.delivery.cumulative();
    let mut lines: Vec<(String, f64)> = buckets
        .into_iter()
        .map(|(le, n)| {
            (
                format!(
                    "_bucket{{le=\"{}\"}}",
                    le.map_or("+Inf".to_string(), |s| s.to_string())
                ),
                n as f64,
            )
        })
        .collect();
    lines.push(("_sum".into(), sum));
    lines.push(("_count".into(), count as f64));
    put(
        "phone_delivery_seconds",
        "From a broadcast to its message written into each phone's socket.",
        "histogram",
        lines,
    );
    if let Some(s) = web.feed.get(Duration::from_millis(500)).await {
        put(
            "leader",
            "1 when this node leads.",
            "gauge",
            vec![(
                String::new(),
                if s.role == crate::core::room::Role::Leader {
                    1.0
                } else {
                    0.0
                },
            )],
        );
        put(
            "epoch",
            "Leadership epoch.",
            "gauge",
            vec![(String::new(), s.epoch as f64)],
        );
        put(
            "tempo_bpm",
            "Current tempo.",
            "gauge",
            vec![(String::new(), s.tempo)],
        );
        put(
            "peers",
            "Connected peers.",
            "gauge",
            vec![(String::new(), s.peers.len() as f64)],
        );
        let lab = |p: &crate::core::room::PeerStatus| {
            format!(
                "{{peer=\"{}\",name=\"{}\"}}",
                p.id,
                p.name.replace(['"', '\\', '\n'], "_")
            )
        };
        put(
            "peer_offset_us",
            "Peer's session clock minus ours.",
            "gauge",
            s.peers
                .iter()
                .filter_map(|p| p.offset_us.map(|o| (lab(p), o as f64)))
                .collect(),
        );
        put(
            "peer_rtt_us",
            "Best recent round trip to the peer.",
            "gauge",
            s.peers
                .iter()
                .filter_map(|p| p.rtt_us.map(|o| (lab(p), o as f64)))
                .collect(),
        );
    }
    m.push_str(&web.gw.talkback_metrics());
    m.push_str(&format!(
        "# HELP bandsync_talkback_mesh_dropped_total Talkback signalling dropped between the mesh and the gateway.\n# TYPE bandsync_talkback_mesh_dropped_total counter\nbandsync_talkback_mesh_dropped_total {}\n",
        web.st.mesh.rtc_dropped.load(Relaxed)
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m)
}
