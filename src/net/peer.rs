//! The room's network driver: the QUIC endpoint, room-key authentication, one task
//! per connection, clock pings. The room task (`node::room_task`) owns the core.
//!
//! Every node connects to every node of its room (the lower id dials; mDNS tells it
//! where). On a new connection each side sends [`Hello`] with its room-key proof and
//! accepts nothing else until the other's proof checks out; a peer that fails is closed
//! with a reason, logged and counted, after bounded work (one frame of at most
//! [`crate::core::wire::MAX_FRAME`] bytes within [`AUTH_TIMEOUT`]).

use crate::audio::snapshot::SnapshotCell;
use crate::core::sync::Sample;
use crate::core::wire::{Datagram, Frame, Hello};
use crate::net::auth::{self, RoomKey};
use crate::net::frames::{self, FrameReadError};
use crate::net::handle::Event;
use crate::net::impair::Impairment;
use crate::sys::clock::{Clock, NodeClock};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::Instrument;

pub const AUTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Close codes.
pub const CLOSE_AUTH: u32 = 0x10;
pub const CLOSE_ROOM: u32 = 0x11;
pub const CLOSE_DUP: u32 = 0x12;
pub const CLOSE_BYE: u32 = 0x13;
/// How long a goodbye waits for the peer to acknowledge the `Bye` frame.
pub const BYE_WAIT: Duration = Duration::from_millis(200);

/// Counters for `/metrics` and logs.
#[derive(Debug, Default)]
pub struct MeshStats {
    pub auth_failures: AtomicU64,
    pub bad_frames: AtomicU64,
    pub bad_datagrams: AtomicU64,
    pub rejected_samples: AtomicU64,
    pub connections: AtomicU64,
    pub refused_other_room: AtomicU64,
    /// Incoming connections refused or sent a Retry before any work (too many
    /// unauthenticated at once).
    pub preauth_refused: AtomicU64,
    pub preauth_retries: AtomicU64,
    /// Records that took a peer's later decision when groups met.
    pub merges: AtomicU64,
    /// Decision stamps refused (a peer's clock out of reach).
    pub stamps_refused: AtomicU64,
    /// Setlist, song and cue requests refused (bad values, unknown seq).
    pub bad_requests: AtomicU64,
    /// Talkback signalling dropped between the mesh and the gateway (a queue full).
    pub rtc_dropped: AtomicU64,
}

/// What a connection's tasks need: who we are, the room key, the clock and the
/// published snapshot (pongs carry our session map), counters, and the room task's inbox.
pub struct PeerCtx {
    pub node_id: String,
    pub name: String,
    /// [`crate::net::discovery::room_hash`] of the room name.
    pub room_hash: String,
    pub priority: i32,
    pub key: RoomKey,
    pub clock: NodeClock,
    pub cell: Arc<SnapshotCell>,
    pub stats: Arc<MeshStats>,
    pub events: mpsc::Sender<Event>,
    /// Log lines about strangers, rate-limited.
    pub log: crate::sys::ratelog::RateLog,
    /// Connections not yet authenticated.
    pub preauth: PreAuth,
    /// This process's boot id (random per start), sent in `Hello`.
    pub boot: u64,
}

/// Connections from strangers cost bounded work: at most [`PreAuth::MAX`] connections
/// may be in their handshake or room-key proof at once, [`PreAuth::MAX_PER_IP`] from
/// one address; above [`PreAuth::RETRY_ABOVE`] an address must first prove it can
/// receive (QUIC Retry). Each is given [`AUTH_TIMEOUT`] for handshake and proof
/// together, with small flow-control windows (see `auth::transport`).
#[derive(Debug, Default)]
pub struct PreAuth(std::sync::Mutex<std::collections::BTreeMap<std::net::IpAddr, usize>>);

/// One unauthenticated connection's place in [`PreAuth`]; released when dropped.
pub struct PreAuthSlot(Arc<PeerCtx>, std::net::IpAddr);

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        let mut m = self.0.preauth.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What to do with a new incoming connection.
pub enum Admit {
    Go(PreAuthSlot),
    /// Ask the client to prove its address first (QUIC Retry).
    Retry,
    /// Drop it without an answer.
    Refuse,
}

impl PreAuth {
    pub const MAX: usize = 64;
    pub const MAX_PER_IP: usize = 8;
    pub const RETRY_ABOVE: usize = 16;

    /// A place for a connection from `ip` (`validated`: the address was proven by a
    /// Retry round trip).
    pub fn admit(ctx: &Arc<PeerCtx>, ip: std::net::IpAddr, validated: bool) -> Admit {
        let mut m = ctx.preauth.0.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = m.values().sum();
        let mine = m.get(&ip).copied().unwrap_or(0);
        if total >= Self::MAX || mine >= Self::MAX_PER_IP {
            return Admit::Refuse;
        }
        if total >= Self::RETRY_ABOVE && !validated {
            return Admit::Retry;
        }
        *m.entry(ip).or_insert(0) += 1;
        Admit::Go(PreAuthSlot(ctx.clone(), ip))
    }
}

/// Bind the node's QUIC endpoint (its certificate from the state dir; outgoing packets
/// impaired when `impair` says so) and make it able to dial.
pub fn endpoint(
    bind: SocketAddr,
    state_dir: &Path,
    impair: Option<Impairment>,
) -> anyhow::Result<(quinn::Endpoint, SocketAddr)> {
    auth::install_crypto();
    let (cert, key) = auth::load_identity(state_dir)?;
    let server = match auth::server_config(cert, key) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, dir = %state_dir.display(), "the kept certificate or key is unusable; making a new one");
            let (cert, key) = auth::new_identity(state_dir)?;
            auth::server_config(cert, key)?
        }
    };
    let socket =
        std::net::UdpSocket::bind(bind).with_context(|| format!("cannot bind QUIC to {bind}"))?;
    let local = socket.local_addr()?;
    let mut endpoint = crate::net::impair::make_endpoint(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        impair,
    )
    .context("creating the QUIC endpoint")?;
    endpoint.set_default_client_config(auth::client_config()?);
    Ok((endpoint, local))
}

/// Authenticate a connection, then pump its frames and datagrams until it closes.
pub async fn serve(
    shared: Arc<PeerCtx>,
    conn: quinn::Connection,
    dialer: bool,
    expect: Option<String>,
    preauth: Option<PreAuthSlot>,
) {
    let addr = conn.remote_address();
    let (peer, send, recv) = match tokio::time::timeout(
        AUTH_TIMEOUT,
        handshake(&shared, &conn, dialer),
    )
    .await
    {
        Ok(Ok(x)) => x,
        Ok(Err(HandshakeError::Refused(code, why))) => {
            if code == CLOSE_AUTH {
                shared.stats.auth_failures.fetch_add(1, Relaxed);
                if let Some(left_out) = shared.log.allow("auth_failed") {
                    tracing::warn!(%addr, reason = %why, left_out, "peer failed room-key authentication; connection closed (one line per 10 s)");
                }
            } else if code == CLOSE_ROOM {
                shared.stats.refused_other_room.fetch_add(1, Relaxed);
                tracing::debug!(%addr, reason = %why, "peer of another room; connection closed");
            }
            conn.close(code.into(), why.as_bytes());
            return;
        }
        Ok(Err(HandshakeError::Closed(e))) => {
            match &e {
                quinn::ConnectionError::ApplicationClosed(c) => {
                    if let Some(left_out) = shared.log.allow("refused_us") {
                        tracing::warn!(%addr, reason = %String::from_utf8_lossy(&c.reason), left_out, "peer refused us (one line per 10 s)")
                    }
                }
                other => {
                    tracing::debug!(%addr, error = %other, "connection closed during handshake")
                }
            }
            return;
        }
        Ok(Err(HandshakeError::Other(e))) => {
            shared.stats.bad_frames.fetch_add(1, Relaxed);
            if let Some(left_out) = shared.log.allow("bad_handshake") {
                tracing::warn!(%addr, error = %e, left_out, "bad handshake; connection closed (one line per 10 s)");
            }
            conn.close(CLOSE_AUTH.into(), b"bad handshake");
            return;
        }
        Err(_) => {
            shared.stats.auth_failures.fetch_add(1, Relaxed);
            if let Some(left_out) = shared.log.allow("auth_timeout") {
                tracing::warn!(%addr, left_out, "peer did not authenticate in time; connection closed (one line per 10 s)");
            }
            conn.close(CLOSE_AUTH.into(), b"authentication timeout");
            return;
        }
    };
    // authenticated: no longer counted against the strangers' budget
    drop(preauth);
    if let Some(want) = expect.filter(|w| *w != peer.node) {
        tracing::debug!(%addr, expected = %want, got = %peer.node, "a different node answered at this address");
    }
    if peer.cli {
        crate::net::cli_server::serve_cli(shared, conn, peer, send, recv).await;
        return;
    }
    // The span is attached to the futures (never entered across an .await, which
    // would leak it into other tasks' log lines).
    let span = tracing::info_span!("peer", id = %peer.node, name = %peer.name);
    pump(shared, conn, peer, dialer, send, recv)
        .instrument(span)
        .await
}

async fn pump(
    shared: Arc<PeerCtx>,
    conn: quinn::Connection,
    peer: Hello,
    dialer: bool,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let id = peer.node.clone();
    let (tx, mut rx) = mpsc::channel::<Frame>(256);
    if shared
        .events
        .send(Event::Up {
            id: id.clone(),
            name: peer.name.clone(),
            conn: conn.clone(),
            tx,
            dialer,
            boot: peer.boot,
        })
        .await
        .is_err()
    {
        return;
    }

    // Writer: frames from the room task to the peer. A `Bye` is the last frame: the
    // writer finishes the stream, waits (briefly) until the peer has it, and closes.
    let writer = {
        let mut send = send;
        let conn = conn.clone();
        tokio::spawn(
            async move {
                while let Some(f) = rx.recv().await {
                    let bye = matches!(f, Frame::Bye(_));
                    if send.write_all(&f.encode()).await.is_err() {
                        break;
                    }
                    if bye {
                        let _ = send.finish();
                        let _ = tokio::time::timeout(BYE_WAIT, send.stopped()).await;
                        conn.close(CLOSE_BYE.into(), b"shutting down");
                        break;
                    }
                }
            }
            .in_current_span(),
        )
    };
    // Pinger.
    let pinger = {
        let conn = conn.clone();
        let clock = shared.clock;
        tokio::spawn(
            async move {
                let mut seq = 0u32;
                loop {
                    let d = Datagram::Ping {
                        seq,
                        t1: clock.now_ns(),
                    };
                    if conn.send_datagram(d.encode().into()).is_err()
                        && conn.close_reason().is_some()
                    {
                        break;
                    }
                    seq = seq.wrapping_add(1);
                    // 40 Hz: on a Wi-Fi-like path the estimate's accuracy grows with the
                    // number of samples (see sync.rs); a ping is ~60 bytes
                    let every = 25;
                    tokio::time::sleep(Duration::from_millis(every)).await;
                }
            }
            .in_current_span(),
        )
    };
    // Datagrams: answer pings, hand pongs to the room.
    let dgrams = {
        let conn = conn.clone();
        let shared = shared.clone();
        let id = id.clone();
        tokio::spawn(
            async move {
                while let Ok(b) = conn.read_datagram().await {
                    let now = shared.clock.now_ns();
                    match Datagram::decode(&b) {
                        Ok(Datagram::Ping { seq, t1 }) => {
                            let s = shared.cell.read();
                            let pong = Datagram::Pong {
                                seq,
                                t1,
                                t2: now,
                                t3: shared.clock.now_ns(),
                                map: s.map,
                            };
                            let _ = conn.send_datagram(pong.encode().into());
                        }
                        Ok(Datagram::Pong {
                            t1, t2, t3, map, ..
                        }) => {
                            let _ = shared
                                .events
                                .send(Event::Pong {
                                    from: id.clone(),
                                    sample: Sample {
                                        t1,
                                        t2,
                                        t3,
                                        t4: now,
                                    },
                                    map,
                                })
                                .await;
                        }
                        Err(e) => {
                            shared.stats.bad_datagrams.fetch_add(1, Relaxed);
                            tracing::debug!(error = %e, "bad datagram dropped");
                        }
                    }
                }
            }
            .in_current_span(),
        )
    };
    // Reader: frames from the peer.
    let mut recv = recv;
    loop {
        match frames::read_frame(&mut recv).await {
            Ok(Some(frame)) => {
                if shared
                    .events
                    .send(Event::Frame {
                        from: id.clone(),
                        frame,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(None) => break,
            Err(FrameReadError::Wire(e)) => {
                // A malformed frame: count it, tell, and drop the peer (the stream is
                // no longer in sync).
                shared.stats.bad_frames.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, kind = e.kind(), "malformed frame from peer; closing");
                conn.close(
                    CLOSE_AUTH.into(),
                    format!("malformed frame: {e}").as_bytes(),
                );
                break;
            }
            Err(FrameReadError::Stream(e)) => {
                tracing::debug!(error = %e, "stream ended");
                break;
            }
        }
    }
    pinger.abort();
    dgrams.abort();
    writer.abort();
    let _ = shared
        .events
        .send(Event::Down {
            id,
            stable: conn.stable_id(),
        })
        .await;
}

enum HandshakeError {
    Refused(u32, String),
    Closed(quinn::ConnectionError),
    Other(String),
}

impl From<quinn::ConnectionError> for HandshakeError {
    fn from(e: quinn::ConnectionError) -> Self {
        HandshakeError::Closed(e)
    }
}

async fn handshake(
    shared: &PeerCtx,
    conn: &quinn::Connection,
    dialer: bool,
) -> Result<(Hello, quinn::SendStream, quinn::RecvStream), HandshakeError> {
    let ekm = auth::exporter(conn).map_err(|e| HandshakeError::Other(e.to_string()))?;
    let (mine, theirs) = if dialer { ("c", "s") } else { ("s", "c") };
    let hello = Frame::Hello(Hello {
        node: shared.node_id.clone(),
        name: shared.name.clone(),
        room: shared.room_hash.clone(),
        priority: shared.priority,
        cli: false,
        boot: shared.boot,
        mac: shared.key.mac(mine, &ekm, &shared.node_id),
    });
    let (mut send, mut recv) = if dialer {
        let (mut s, r) = conn.open_bi().await?;
        s.write_all(&hello.encode())
            .await
            .map_err(|e| HandshakeError::Other(e.to_string()))?;
        (s, r)
    } else {
        conn.accept_bi().await?
    };
    let first = match frames::read_frame(&mut recv).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(HandshakeError::Other("stream closed before Hello".into())),
        Err(FrameReadError::Wire(e)) => {
            return Err(HandshakeError::Refused(
                CLOSE_AUTH,
                format!("bad first frame: {e}"),
            ))
        }
        Err(FrameReadError::Stream(e)) => {
            if let Some(r) = conn.close_reason() {
                return Err(HandshakeError::Closed(r));
            }
            return Err(HandshakeError::Other(e));
        }
    };
    let Frame::Hello(h) = first else {
        return Err(HandshakeError::Refused(
            CLOSE_AUTH,
            "first frame was not Hello".into(),
        ));
    };
    if h.room != shared.room_hash {
        return Err(HandshakeError::Refused(CLOSE_ROOM, "different room".into()));
    }
    if !shared.key.verify(theirs, &ekm, &h.node, &h.mac) {
        return Err(HandshakeError::Refused(
            CLOSE_AUTH,
            format!("node {} ({}) does not hold this room's key", h.node, h.name),
        ));
    }
    if h.node == shared.node_id {
        return Err(HandshakeError::Refused(
            CLOSE_DUP,
            "that is this node".into(),
        ));
    }
    if !dialer {
        send.write_all(&hello.encode())
            .await
            .map_err(|e| HandshakeError::Other(e.to_string()))?;
    }
    Ok((h, send, recv))
}
