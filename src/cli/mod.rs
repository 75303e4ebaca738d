//! The stage tech's CLI: finds a node of the room (mDNS, or `--node HOST:PORT`),
//! authenticates with the room key over QUIC exactly like a node (but never joins the
//! room), asks one [`Query`] and prints the [`Reply`].
//!
//! Finding the room is a race, not a wait: the last node that answered (a small cache
//! file, see [`cache_path`]) is dialled at once while mDNS looks for the others (a
//! one-shot query answered by unicast at once, see [`oneshot`], beside the full mdns-sd
//! browse), every candidate is dialled the moment it resolves, and the first one that
//! proves it holds the room key
//! wins; the others (a stale cache entry, a spoofed advert, a node of the room that
//! holds another key) cost nothing but their own failed attempt. An overall deadline
//! ([`FIND_DEADLINE`]) ends the search with a sentence naming what was tried.

use crate::core::room::Status;
use crate::core::wire::{Frame, Hello, Query, Reply};
use crate::net::auth::{self, RoomKey};
use anyhow::{anyhow, bail, Context};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use crate::net::oneshot;
pub mod venue;

/// How the CLI reaches the room.
pub struct Target {
    pub node: Option<String>,
    pub room: String,
    pub interfaces: Vec<String>,
    pub key: RoomKey,
}

/// How long the CLI looks for a node of the room that answers.
pub const FIND_DEADLINE: Duration = Duration::from_secs(3);
/// How long one answer to a query may take once a node is connected.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Candidates dialled at the same time; more wait for a free slot.
const MAX_DIALS: usize = 32;
/// Pin/unpin: how often the room's status is read while waiting for the confirmation,
/// how often the request is repeated (it can be lost while leadership moves), and how
/// long the command waits at most.
const CONFIRM_POLL: Duration = Duration::from_millis(50);
const CONFIRM_RESEND: Duration = Duration::from_secs(1);
const CONFIRM_WITHIN: Duration = Duration::from_secs(6);

/// Why a request failed, in words a stage tech can act on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no bandsync node of room {0:?} found on the network (is a box running? try --node HOST:PORT)")]
    NoRoom(String),
    #[error("wrong room key: the node at {addr} refused this key ({reason}); check --room-key-file or BANDSYNC_ROOM_KEY")]
    WrongKey { addr: SocketAddr, reason: String },
    #[error("cannot reach the node at {addr}: {why}")]
    Unreachable { addr: SocketAddr, why: String },
    #[error("no bandsync node of room {room:?} answered within {secs} s; tried {tried}")]
    NoAnswer {
        room: String,
        secs: u64,
        tried: String,
    },
}

/// Where a candidate address came from (for the error that lists what was tried).
#[derive(Clone, Debug)]
enum Source {
    Flag,
    Cache,
    Mdns(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => f.write_str("--node"),
            Source::Cache => f.write_str("last good node"),
            Source::Mdns(name) => write!(f, "mDNS {name:?}"),
        }
    }
}

/// An authenticated conversation with one node of the room: any number of queries on
/// the one stream (the node serves a CLI connection until it ends).
pub struct Session {
    addr: SocketAddr,
    ep: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Session {
    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ask one query and wait for its reply.
    pub async fn ask(&mut self, q: Query) -> anyhow::Result<Reply> {
        let addr = self.addr;
        self.send
            .write_all(&Frame::Query(q).encode())
            .await
            .map_err(|e| CliError::Unreachable {
                addr,
                why: e.to_string(),
            })?;
        match tokio::time::timeout(
            REPLY_TIMEOUT,
            crate::net::frames::read_frame(&mut self.recv),
        )
        .await
        {
            Ok(Ok(Some(Frame::Reply(r)))) => Ok(r),
            Ok(Ok(Some(_))) => bail!("the node at {addr} sent something other than a reply"),
            Ok(Ok(None)) => Err(refused(&self.conn, addr)
                .unwrap_or_else(|| anyhow!("the node at {addr} closed without replying"))),
            Ok(Err(e)) => bail!("bad reply from {addr}: {e}"),
            Err(_) => bail!("the node at {addr} did not reply in time"),
        }
    }

    /// End the conversation politely: the node frees it at once instead of waiting
    /// for its idle timeout. Waits only for the close to be handed to the socket.
    pub async fn close(mut self) {
        let _ = self.send.finish();
        self.conn.close(0u32.into(), b"done");
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let _ = tokio::time::timeout(Duration::from_millis(5), self.ep.wait_idle()).await;
    }
}

/// The node's reason for closing, when it closed the connection on purpose.
fn refused(conn: &quinn::Connection, addr: SocketAddr) -> Option<anyhow::Error> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            let reason = String::from_utf8_lossy(&c.reason).to_string();
            if reason.contains("room's key") || reason.contains("authentication") {
                Some(CliError::WrongKey { addr, reason }.into())
            } else {
                Some(anyhow!(
                    "the node at {addr} closed the connection: {reason}"
                ))
            }
        }
        _ => None,
    }
}

/// The CLI's QUIC transport: the peers' limits, but a LAN-sized first RTT guess so a
/// lost first packet is sent again after ~300 ms rather than quinn's default ~1 s.
fn cli_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(3)).expect("3 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.initial_rtt(Duration::from_millis(100));
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

/// One client endpoint per address family, shared by every dial of a command.
#[derive(Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_addr(&mut self, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
        let slot = if addr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let mut ep = quinn::Endpoint::client(bind).context("creating a QUIC client endpoint")?;
        let mut cc = auth::client_config()?;
        cc.transport_config(Arc::new(cli_transport()));
        ep.set_default_client_config(cc);
        *slot = Some(ep.clone());
        Ok(ep)
    }
}

/// Dial `addr` and prove we hold the room key; the node must prove it too.
async fn dial(
    ep: quinn::Endpoint,
    key: RoomKey,
    room_hash: String,
    addr: SocketAddr,
) -> anyhow::Result<Session> {
    let unreachable = |why: String| CliError::Unreachable { addr, why };
    let conn = ep
        .connect(addr, "bandsync")
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let me = crate::sys::state::random_id()?;
    let ekm = auth::exporter(&conn)?;
    let hello = Frame::Hello(Hello {
        node: me.clone(),
        name: "cli".into(),
        room: room_hash,
        priority: 0,
        cli: true,
        boot: 0,
        mac: key.mac("c", &ekm, &me),
    });
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    send.write_all(&hello.encode())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let first = match crate::net::frames::read_frame(&mut recv).await {
        Ok(Some(f)) => f,
        Ok(None) | Err(_) => {
            // The node closes with its reason right after ending the stream.
            let _ = tokio::time::timeout(Duration::from_millis(200), conn.closed()).await;
            return Err(refused(&conn, addr)
                .unwrap_or_else(|| anyhow!("the node at {addr} ended the conversation")));
        }
    };
    let Frame::Hello(theirs) = first else {
        bail!("the node at {addr} did not answer with Hello")
    };
    if !key.verify("s", &ekm, &theirs.node, &theirs.mac) {
        conn.close(0x10u32.into(), b"node does not hold this room's key");
        return Err(CliError::WrongKey {
            addr,
            reason: "its proof does not match our key".into(),
        }
        .into());
    }
    Ok(Session {
        addr,
        ep,
        conn,
        send,
        recv,
    })
}

/// Find a node of the room that holds our key, and open a conversation with it.
///
/// With `--node`, its addresses are dialled together. Otherwise the cached last good
/// node is dialled at once while mDNS browses, and each node of the room is dialled the
/// moment it resolves; the first to authenticate wins, browsing stops, and the winner
/// becomes the cached node. A candidate that fails (closed port, another key, a
/// spoofed advert) never ends the search early; [`FIND_DEADLINE`] does.
pub async fn connect(target: &Target) -> anyhow::Result<Session> {
    auth::install_crypto();
    let deadline = Instant::now() + FIND_DEADLINE;
    let hash = crate::net::discovery::room_hash(&target.room);
    let mut eps = Endpoints::default();
    let mut dials = tokio::task::JoinSet::new();
    let mut queue: VecDeque<(SocketAddr, Source)> = VecDeque::new();
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    let mut failed: Vec<(SocketAddr, Source, anyhow::Error)> = Vec::new();
    let mut cached = None;

    let mut browse = None;
    let mut fast = None;
    if let Some(n) = &target.node {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(n.as_str())
            .await
            .with_context(|| format!("--node {n:?} is not a reachable HOST:PORT"))?
            .collect();
        if addrs.is_empty() {
            bail!("--node {n:?} resolves to no address");
        }
        queue.extend(addrs.into_iter().map(|a| (a, Source::Flag)));
    } else {
        cached = read_cache(&target.room);
        if let Some(a) = cached {
            queue.push_back((a, Source::Cache));
        }
        fast = Some(oneshot::spawn(hash.clone(), target.interfaces.clone()));
        match crate::net::discovery::browse(&target.room, &target.interfaces) {
            Ok(b) => browse = Some(b),
            // The cached node may still answer; without one there is nothing to try.
            Err(e) if cached.is_some() => {
                tracing::warn!(error = %format!("{e:#}"), "mDNS browse failed; trying the last good node only")
            }
            Err(e) => return Err(e.context("cannot browse for the room's nodes (mDNS)")),
        }
    }

    let winner = loop {
        while dials.len() < MAX_DIALS {
            let Some((addr, src)) = queue.pop_front() else {
                break;
            };
            if !seen.insert(addr) {
                continue;
            }
            tracing::debug!(%addr, source = %src, "dialling");
            match eps.for_addr(addr) {
                Ok(ep) => {
                    let (key, hash) = (target.key.clone(), hash.clone());
                    dials.spawn(async move { (addr, src, dial(ep, key, hash, addr).await) });
                }
                Err(e) => failed.push((addr, src, e)),
            }
        }
        if browse.is_none() && fast.is_none() && dials.is_empty() && queue.is_empty() {
            break None;
        }
        tokio::select! {
            ev = async { browse.as_mut().expect("guarded").1.recv().await }, if browse.is_some() => match ev {
                Some(crate::net::discovery::PeerEvent::Found(p)) => {
                    tracing::debug!(node = %p.node_id, name = %p.name, addrs = ?p.addrs, "mDNS found");
                    queue.extend(p.addrs.iter().map(|a| (*a, Source::Mdns(p.name.clone()))));
                }
                Some(_) => {}
                None => browse = None,
            },
            p = async { fast.as_mut().expect("guarded").recv().await }, if fast.is_some() => match p {
                Some(p) => {
                    tracing::debug!(node = %p.node_id, name = %p.name, addrs = ?p.addrs, "one-shot mDNS answer");
                    queue.extend(p.addrs.iter().map(|a| (*a, Source::Mdns(p.name.clone()))));
                }
                None => fast = None,
            },
            Some(done) = dials.join_next() => match done {
                Ok((addr, _, Ok(s))) => break Some((addr, s)),
                Ok((addr, src, Err(e))) => {
                    tracing::debug!(%addr, source = %src, error = %format!("{e:#}"), "candidate failed");
                    failed.push((addr, src, e));
                }
                Err(e) => tracing::debug!(error = %e, "dial task ended"),
            },
            _ = tokio::time::sleep_until(deadline) => break None,
        }
    };
    // Stop browsing now (a browser sends no goodbyes: this does not wait).
    if let Some((d, _)) = browse.take() {
        d.shutdown();
    }
    drop(fast);
    dials.abort_all();
    if let Some((addr, s)) = winner {
        if target.node.is_none() && cached != Some(addr) {
            write_cache(&target.room, addr);
        }
        return Ok(s);
    }
    for (addr, src) in &queue {
        if seen.insert(*addr) {
            failed.push((*addr, src.clone(), anyhow!("not dialled in time")));
        }
    }
    // Still dialling at the deadline: those timed out.
    let answered: HashSet<SocketAddr> = failed.iter().map(|f| f.0).collect();
    let mut timed_out: Vec<SocketAddr> = seen.difference(&answered).copied().collect();
    timed_out.sort();
    // A single --node address keeps its own precise error; so does a refused key
    // (the likeliest mistake), wherever it came from.
    if target.node.is_some() && failed.len() == 1 && timed_out.is_empty() {
        return Err(failed.pop().expect("one").2);
    }
    if let Some(i) = failed.iter().position(|f| {
        f.2.downcast_ref::<CliError>()
            .is_some_and(|c| matches!(c, CliError::WrongKey { .. }))
    }) {
        let (_, src, e) = failed.swap_remove(i);
        let others = describe(&failed, &timed_out);
        return Err(if others.is_empty() {
            e.context(format!("from {src}"))
        } else {
            e.context(format!("from {src}; also tried {others}"))
        });
    }
    if failed.is_empty() && timed_out.is_empty() {
        return Err(CliError::NoRoom(target.room.clone()).into());
    }
    Err(CliError::NoAnswer {
        room: target.room.clone(),
        secs: FIND_DEADLINE.as_secs(),
        tried: describe(&failed, &timed_out),
    }
    .into())
}

fn describe(failed: &[(SocketAddr, Source, anyhow::Error)], timed_out: &[SocketAddr]) -> String {
    let mut parts: Vec<String> = failed
        .iter()
        .map(|(a, s, e)| format!("{a} ({s}): {e:#}"))
        .collect();
    parts.extend(timed_out.iter().map(|a| format!("{a}: no answer")));
    parts.join("; ")
}

/// Send one query to the first node of the room that answers.
pub async fn request(target: &Target, q: Query) -> anyhow::Result<Reply> {
    let mut s = connect(target).await?;
    let r = s.ask(q).await;
    s.close().await;
    r
}

/// Pin (`Some`) or unpin (`None`) and wait until the room's status shows it, on one
/// connection: the request, then the status every [`CONFIRM_POLL`]. The request can be
/// lost while leadership moves (the node relays it to the leader), so it is repeated
/// every [`CONFIRM_RESEND`]; a connection lost on the way is found again. Returns the
/// node's message, or fails with a plain sentence after [`CONFIRM_WITHIN`].
pub async fn pin_confirmed(target: &Target, who: Option<String>) -> anyhow::Result<String> {
    let start = Instant::now();
    let q = match &who {
        Some(w) => Query::Pin(w.clone()),
        None => Query::Unpin,
    };
    let mut s = connect(target).await?;
    let mut msg = String::new();
    let mut last_sent: Option<Instant> = None;
    let mut leader = String::from("?");
    while start.elapsed() < CONFIRM_WITHIN {
        let round = async {
            if last_sent.is_none_or(|l| l.elapsed() >= CONFIRM_RESEND) {
                match s.ask(q.clone()).await? {
                    Reply::Done(m) => msg = m,
                    Reply::Error(m) => return Ok(Err(anyhow!("{m}"))),
                    Reply::Status(_) => return Ok(Err(anyhow!("unexpected status reply"))),
                }
                last_sent = Some(Instant::now());
            }
            anyhow::Ok(Ok(s.ask(Query::Status).await?))
        };
        match round.await {
            Ok(Err(refusal)) => {
                s.close().await;
                return Err(refusal);
            }
            Ok(Ok(Reply::Status(j))) => {
                let st: Status =
                    serde_json::from_str(&j).context("the node sent an unreadable status")?;
                leader = st.leader.clone();
                let want = who.as_deref().map(|w| resolve_in_status(&st, w));
                if st.pinned.as_deref() == want.as_deref() {
                    s.close().await;
                    return Ok(msg);
                }
            }
            Ok(Ok(other)) => tracing::debug!(reply = ?other, "unexpected reply to a status query"),
            Err(e) => {
                // The node went away mid-way (leadership moving): find the room again.
                tracing::debug!(error = %format!("{e:#}"), "lost the node; reconnecting");
                s = connect(target).await?;
                last_sent = None;
                continue;
            }
        }
        tokio::time::sleep(CONFIRM_POLL).await;
    }
    s.close().await;
    bail!(
        "the room did not confirm the {} within {} s (leader: {leader}); leadership may be moving: check `bandsync status` and try again",
        if who.is_some() { "pin" } else { "unpin" },
        CONFIRM_WITHIN.as_secs()
    )
}

/// The node id a pin target names in a status (an id, or a node's name).
pub fn resolve_in_status(s: &Status, who: &str) -> String {
    if s.node == who || s.name == who {
        return s.node.clone();
    }
    s.peers
        .iter()
        .find(|p| p.id == who || p.name == who)
        .map(|p| p.id.clone())
        .unwrap_or_else(|| who.to_string())
}

/// The file remembering the last node of `room` that answered:
/// `$XDG_CACHE_HOME/bandsync/last-node-<room hash>` (else `~/.cache/bandsync/…`).
pub fn cache_path(room: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })?;
    Some(base.join("bandsync").join(format!(
        "last-node-{}",
        crate::net::discovery::room_hash(room)
    )))
}

/// The cached address, if the file is ours, private, small and holds one usable
/// unicast `IP:PORT`. It is only a guess to dial first: the node must still prove it
/// holds the room key.
fn read_cache(room: &str) -> Option<SocketAddr> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = cache_path(room)?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .ok()?;
    let md = f.metadata().ok()?;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if !md.is_file() || md.uid() != uid || md.mode() & 0o077 != 0 || md.len() > 128 {
        tracing::debug!(path = %path.display(), "ignoring a cache file that is not ours, private and small");
        return None;
    }
    let mut text = String::new();
    f.by_ref().take(128).read_to_string(&mut text).ok()?;
    let addr: SocketAddr = text.trim().parse().ok()?;
    let ip = addr.ip();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return None;
    }
    if let std::net::IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return None;
        }
    }
    Some(addr)
}

/// Remember `addr` for next time (0600 in a 0700 dir, replaced atomically). A cache
/// that cannot be written costs the next command only its head start.
fn write_cache(room: &str, addr: SocketAddr) {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let Some(path) = cache_path(room) else {
        return;
    };
    let res = (|| -> std::io::Result<()> {
        let dir = path.parent().expect("a file in a dir");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let tmp = dir.join(format!(
            ".{}.{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("last-node"),
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let r = f.write_all(format!("{addr}\n").as_bytes());
        drop(f);
        if let Err(e) = r.and_then(|_| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    })();
    if let Err(e) = res {
        tracing::debug!(path = %path.display(), error = %e, "cannot remember the last good node");
    }
}

/// A human table of a status.
pub fn format_status(s: &Status) -> String {
    let mut out = String::new();
    let pinned = s.pinned.as_deref().unwrap_or("-");
    out.push_str(&format!(
        "node     {} ({})\nrole     {}\nleader   {}\nepoch    {}\npinned   {}\ntempo    {} BPM, meter {}\nplaying  {}\n",
        s.name, s.node, s.role, s.leader, s.epoch, pinned, s.tempo, s.meter, if s.playing { "yes" } else { "no" }
    ));
    if let Some(u) = &s.phone_url {
        out.push_str(&format!("phones   {u}\n"));
    }
    if let Some(u) = &s.https_url {
        out.push_str(&format!("secure   {u} (wake lock, talkback)\n"));
    }
    if let Some(f) = &s.cert_sha256 {
        out.push_str(&format!("cert     SHA-256 {f}\n"));
    }
    match (&s.control_pin, s.control.as_str()) {
        (Some(p), _) => out.push_str(&format!(
            "control  PIN {p} (phones need it to change anything)\n"
        )),
        (None, "open") => out.push_str("control  open: any phone may change tempo and transport\n"),
        _ => {}
    }
    if !s.decided.is_default() {
        out.push_str(&format!("decided  {}\n", s.decided));
    }
    if s.link.enabled {
        out.push_str(&format!("link     {} app(s)\n", s.link.peers));
    }
    out.push_str(&format_peers(s));
    out
}

/// The phone URL as a QR code for a terminal (two modules per character cell, with
/// the quiet zone), so a musician can point a phone's camera at the stage tech's
/// screen. `None` when the URL does not fit a QR code.
pub fn phone_qr(url: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::with_error_correction_level(url, qrcode::EcLevel::M).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build()
            + "\n",
    )
}

/// QR codes for the phone page: the HTTPS one first (screen wake lock, talkback; the
/// phone accepts the box's certificate once, whose fingerprint is printed), then the
/// plain HTTP one (no certificate step).
pub fn phone_qrs(s: &Status) -> String {
    let mut out = String::new();
    if let Some(code) = s.https_url.as_deref().and_then(phone_qr) {
        out.push_str("\nphones, secure page (keeps the screen on, talkback): scan, then accept the box's certificate once\n");
        if let Some(f) = &s.cert_sha256 {
            out.push_str(&format!("(its SHA-256 fingerprint: {f})\n"));
        }
        out.push_str(&code);
    }
    if let Some(code) = s.phone_url.as_deref().and_then(phone_qr) {
        out.push_str("\nphones: scan to follow the beat (plain page, no certificate step)\n");
        out.push_str(&code);
    }
    out
}

pub fn format_peers(s: &Status) -> String {
    let mut out = format!(
        "{:<18} {:<16} {:<9} {:>9} {:>11} {:>9}\n",
        "PEER", "NAME", "ROLE", "RTT µs", "OFFSET µs", "± µs"
    );
    for p in &s.peers {
        let f = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<18} {:<16} {:<9} {:>9} {:>11} {:>9}\n",
            p.id,
            p.name,
            if p.alive { p.role.as_str() } else { "lost" },
            f(p.rtt_us),
            f(p.offset_us),
            f(p.uncertainty_us)
        ));
    }
    if s.peers.is_empty() {
        out.push_str("(no peers: this box is alone)\n");
    }
    out
}

#[cfg(test)]
mod qr_tests {
    use super::phone_qr;

    /// The terminal rendering holds exactly the code's modules: light cells on a dark
    /// terminal read as dark modules, two rows per line, inside a 4-module quiet zone.
    #[test]
    fn qr_rendering_matches_the_code() {
        let url = "http://stage-left.local:8380/";
        let text = phone_qr(url).unwrap();
        let code = qrcode::QrCode::with_error_correction_level(url, qrcode::EcLevel::M).unwrap();
        let w = code.width();
        let colors = code.to_colors();
        // (the half row past the bottom quiet zone, when the height is odd, is left blank)
        let dark = |x: i64, y: i64| {
            y >= w as i64 + 4
                || x >= 0
                    && y >= 0
                    && (x as usize) < w
                    && (y as usize) < w
                    && colors[y as usize * w + x as usize] == qrcode::Color::Dark
        };
        let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
        assert_eq!(lines.len(), (w + 8).div_ceil(2));
        for (row, line) in lines.iter().enumerate() {
            assert_eq!(line.len(), w + 8, "line {row}");
            for (col, ch) in line.iter().enumerate() {
                let x = col as i64 - 4;
                let (top, bottom) = (dark(x, 2 * row as i64 - 4), dark(x, 2 * row as i64 - 3));
                // dark modules are drawn as blanks (light on a dark terminal), light as blocks
                let want = match (top, bottom) {
                    (true, true) => ' ',
                    (true, false) => '▄',
                    (false, true) => '▀',
                    (false, false) => '█',
                };
                assert_eq!(*ch, want, "module at column {x}, row pair {row}");
            }
        }
        assert!(phone_qr(&"x".repeat(5000)).is_none());
    }
}
