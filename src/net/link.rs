//! The Ableton Link driver: one Link gateway per IPv4 address of the node's
//! interfaces, each a thread that owns a [`LinkPeer`] and two UDP sockets, and feeds
//! it datagrams and timeouts (the rules are in [`crate::core::link`]).
//!
//! * **Sockets** (Link Ch. 1 §2): a multicast socket bound to `0.0.0.0:20808`
//!   (`SO_REUSEADDR`, shared with Link apps on the same host) joined to
//!   `224.76.78.75` on the interface, and a unicast socket bound to the interface's
//!   address that sends everything and is the measurement endpoint (`mep4`).
//! * **Time.** The peer's host clock is the node's [`NodeClock`] in µs; before every
//!   input the ghost transform is set so that ghost time is the room's *session* time
//!   plus the room's steering shift plus 2⁵⁰ µs (both read lock-free: the published
//!   snapshot and [`LinkStats::shift_ns`]). The clock is read right
//!   after `recv` returns, and a ping's pong is sent before anything else: pings are
//!   answered from this thread, never waiting on the room task.
//! * **Steering** ([`crate::core::link::steer`]): the peer probes the Link apps' clocks;
//!   on every wake-up the gateway proposes a step of the shift to the room task
//!   ([`RoomHandle::link_steer`]), which takes it when this box leads; a new shift
//!   (the leader's, through the room task) moves the probes' history with it.
//! * **The room** is read from the snapshot on every wake-up; the thread also wakes
//!   at the start of the room's next segment, so a tempo change or a start/stop
//!   reaches Link apps as it takes effect on the boxes.
//! * **Link apps' changes** are overruled by the peer; with `link_control` they are
//!   also handed to the room as a quantized change ([`Query::Change`]), which then
//!   reaches the apps like any other. Both are counted and logged (rate-limited).
//! * **Interfaces**: `--interface` names, or every interface that is up with an IPv4
//!   address; rescanned every 5 s (a Wi-Fi link that comes up later gets a gateway).
//! * **Bad input**: malformed datagrams are counted ([`LinkStats::bad_datagrams`]),
//!   never fatal; at most [`BATCH`] datagrams per socket per wake-up.

use crate::audio::snapshot::SnapshotCell;
use crate::core::link::codec::NodeId;
use crate::core::link::peer::{Action, Config, Event, LinkPeer, MULTICAST_V4};
use crate::core::link::present::{self, LinkIds};
use crate::core::link::steer;
use crate::core::link::timeline::{ExactLine, GhostXform};
use crate::core::link::RoomState;
use crate::core::timeline::{ChangeKind, Tempo};
use crate::core::wire::{Query, Reply};
use crate::net::RoomHandle;
use crate::sys::clock::{Clock, NodeClock};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// At most this many datagrams per socket per wake-up (then timers run).
pub const BATCH: usize = 64;
/// How often the interfaces are rescanned.
const RESCAN: Duration = Duration::from_secs(5);
/// Longest sleep of a gateway thread (it checks for shutdown in between).
const MAX_SLEEP_NS: i64 = 100_000_000;
/// How long the line that just ended still counts as the room's (a box whose clock
/// switches a little later than ours, and apps relaying it).
const PREVIOUS_LINE_NS: i64 = 1_000_000_000;
/// Rate limit of the warnings about Link apps.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Link counters, for `/health`, `status --json` and `/metrics`.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Link is on (`link = true`, no `--no-link`) and at least one gateway runs.
    pub enabled: AtomicBool,
    /// Link apps in the room's Link session (other boxes not counted), over all
    /// gateways.
    pub peers: AtomicU64,
    /// Other boxes of the room heard over Link.
    pub boxes: AtomicU64,
    /// Gateways (interface addresses) running.
    pub gateways: AtomicU64,
    /// Datagrams received.
    pub messages: AtomicU64,
    /// Clock pings answered.
    pub pongs: AtomicU64,
    /// Tempo or start/stop changes by Link apps, overruled.
    pub overruled: AtomicU64,
    /// Of those, handed to the room as a change (`link_control = true`).
    pub forwarded: AtomicU64,
    /// Malformed datagrams (dropped).
    pub bad_datagrams: AtomicU64,
    /// Datagrams that could not be sent.
    pub send_errors: AtomicU64,
    /// The room's Link ghost clock shift, ns (published by the room task).
    pub shift_ns: AtomicI64,
    /// Steps of the room's ghost clock this box proposed (the leader's take).
    pub steps: AtomicU64,
    /// Samples of Link apps' clocks taken (our pings to them).
    pub app_samples: AtomicU64,
}

/// What the driver needs from the node's configuration.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub room: String,
    pub node_id: String,
    /// `--interface` names; empty: every interface that is up with an IPv4 address.
    pub interfaces: Vec<String>,
    /// `link_control`: Link apps may change the room's tempo and transport.
    pub control: bool,
}

/// The running driver; [`LinkDriver::stop`] says goodbye (ByeBye) on every gateway.
pub struct LinkDriver {
    stop: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl LinkDriver {
    /// Stop every gateway (each multicasts a ByeBye) and wait for them.
    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for LinkDriver {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// Per gateway (`iface/addr`): the Link apps and the boxes it knows.
type Seen = BTreeMap<String, (BTreeSet<NodeId>, BTreeSet<NodeId>)>;

struct Ctx {
    cfg: LinkConfig,
    ids: LinkIds,
    clock: NodeClock,
    cell: Arc<SnapshotCell>,
    stats: Arc<LinkStats>,
    /// Changes for the room (link_control).
    changes: Option<tokio::sync::mpsc::Sender<ChangeKind>>,
    /// The room (steps of its Link ghost clock).
    room: RoomHandle,
    /// Per gateway: the Link apps and the boxes it knows (for the union counts).
    seen: Mutex<Seen>,
    stop: Arc<AtomicBool>,
}

/// Start the driver. Call from inside the tokio runtime (the `link_control` task
/// runs on it).
pub fn start(
    cfg: LinkConfig,
    clock: NodeClock,
    cell: Arc<SnapshotCell>,
    room: RoomHandle,
    stats: Arc<LinkStats>,
) -> LinkDriver {
    let ids = present::ids(&cfg.room, &cfg.node_id);
    let stop = Arc::new(AtomicBool::new(false));
    let changes = if cfg.control {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(forward_changes(rx, room.clone(), stats.clone()));
        Some(tx)
    } else {
        None
    };
    tracing::info!(session = %ids.session, node = %ids.node, interfaces = ?cfg.interfaces, control = cfg.control, "Ableton Link: the room is a Link session");
    let ctx = Arc::new(Ctx {
        cfg,
        ids,
        clock,
        cell,
        stats,
        changes,
        room,
        seen: Mutex::new(BTreeMap::new()),
        stop: stop.clone(),
    });
    let supervisor = std::thread::Builder::new()
        .name("link".into())
        .spawn(move || supervise(ctx))
        .map_err(
            |e| tracing::error!(error = %e, "Ableton Link: cannot start its thread; Link is off"),
        )
        .ok();
    LinkDriver { stop, supervisor }
}

/// Hand Link apps' changes to the room, the latest of each kind, one at a time.
async fn forward_changes(
    mut rx: tokio::sync::mpsc::Receiver<ChangeKind>,
    room: RoomHandle,
    stats: Arc<LinkStats>,
) {
    while let Some(first) = rx.recv().await {
        // Coalesce what queued meanwhile: the latest tempo, the latest transport.
        let (mut tempo, mut transport) = (None, None);
        let mut take = |k: ChangeKind| match k {
            ChangeKind::Tempo(_) | ChangeKind::Meter(_) => tempo = Some(k),
            ChangeKind::Start | ChangeKind::Stop => transport = Some(k),
        };
        take(first);
        while let Ok(k) = rx.try_recv() {
            take(k);
        }
        for kind in [tempo, transport].into_iter().flatten() {
            let reply = room
                .query(Query::Change {
                    kind,
                    quantum: None,
                })
                .await;
            match reply {
                Reply::Done(s) => {
                    stats.forwarded.fetch_add(1, Relaxed);
                    tracing::info!(change = ?kind, room = %s, "Ableton Link: a Link app's change handed to the room (link_control)");
                }
                Reply::Error(e) | Reply::Status(e) => {
                    tracing::warn!(change = ?kind, error = %e, "Ableton Link: the room refused a Link app's change")
                }
            }
        }
    }
}

/// The gateways' supervisor: (re)scans interfaces, runs one thread per address.
fn supervise(ctx: Arc<Ctx>) {
    type Running = (Arc<AtomicBool>, std::thread::JoinHandle<()>);
    let mut gateways: BTreeMap<(String, Ipv4Addr), Running> = BTreeMap::new();
    let mut failed: BTreeSet<(String, Ipv4Addr)> = BTreeSet::new();
    let mut warned_missing: BTreeSet<String> = BTreeSet::new();
    let mut next_scan = Instant::now();
    while !ctx.stop.load(Relaxed) {
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + RESCAN;
            let found = match interfaces(&ctx.cfg.interfaces) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "Ableton Link: cannot list the network interfaces");
                    Vec::new()
                }
            };
            for name in &ctx.cfg.interfaces {
                if !found.iter().any(|(n, _)| n == name) && warned_missing.insert(name.clone()) {
                    tracing::warn!(interface = %name, "Ableton Link: interface has no IPv4 address (yet); Link waits for one");
                }
            }
            // Gateways whose address went away, or whose thread ended, stop.
            let gone: Vec<_> = gateways
                .iter()
                .filter(|(k, (_, h))| !found.contains(k) || h.is_finished())
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                if let Some((stop, h)) = gateways.remove(&k) {
                    stop.store(true, Relaxed);
                    let _ = h.join();
                    ctx.seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&gateway_key(&k));
                    tracing::info!(interface = %k.0, addr = %k.1, "Ableton Link: gateway closed");
                }
            }
            for k in found {
                if gateways.contains_key(&k) {
                    continue;
                }
                match Sockets::open(k.1) {
                    Ok(s) => {
                        failed.remove(&k);
                        let stop = Arc::new(AtomicBool::new(false));
                        let (c, st, key) = (ctx.clone(), stop.clone(), k.clone());
                        match std::thread::Builder::new()
                            .name(format!("link-{}", k.0))
                            .spawn(move || gateway(c, key, s, st))
                        {
                            Ok(h) => {
                                gateways.insert(k, (stop, h));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "Ableton Link: cannot start a gateway thread")
                            }
                        }
                    }
                    Err(e) => {
                        if failed.insert(k.clone()) {
                            tracing::warn!(interface = %k.0, addr = %k.1, error = %e, "Ableton Link: cannot open the sockets of this interface (retried every 5 s)");
                        }
                    }
                }
            }
            ctx.stats.gateways.store(gateways.len() as u64, Relaxed);
            ctx.stats.enabled.store(!gateways.is_empty(), Relaxed);
            update_counts(&ctx);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, (stop, h)) in gateways {
        stop.store(true, Relaxed);
        let _ = h.join();
    }
    ctx.stats.gateways.store(0, Relaxed);
    ctx.stats.enabled.store(false, Relaxed);
}

fn gateway_key(k: &(String, Ipv4Addr)) -> String {
    format!("{}/{}", k.0, k.1)
}

fn update_counts(ctx: &Ctx) {
    let seen = ctx.seen.lock().unwrap_or_else(|e| e.into_inner());
    let apps: BTreeSet<&NodeId> = seen.values().flat_map(|(a, _)| a.iter()).collect();
    let boxes: BTreeSet<&NodeId> = seen.values().flat_map(|(_, b)| b.iter()).collect();
    ctx.stats.peers.store(apps.len() as u64, Relaxed);
    ctx.stats.boxes.store(boxes.len() as u64, Relaxed);
}

/// A gateway's two sockets.
struct Sockets {
    mcast: UdpSocket,
    ucast: UdpSocket,
    mep: SocketAddrV4,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn udp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: v points to a live T of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from_ne_bytes(a.octets()),
    }
}

fn bind(fd: &OwnedFd, a: SocketAddrV4) -> io::Result<()> {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: in_addr(*a.ip()),
        sin_zero: [0; 8],
    };
    // SAFETY: sa is a valid sockaddr_in of the size passed.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

impl Sockets {
    fn open(iface: Ipv4Addr) -> io::Result<Sockets> {
        let one: libc::c_int = 1;
        let zero: libc::c_int = 0;
        let m = udp_socket()?;
        setopt(&m, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
        bind(
            &m,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, MULTICAST_V4.port()),
        )?;
        let mreq = libc::ip_mreq {
            imr_multiaddr: in_addr(*MULTICAST_V4.ip()),
            imr_interface: in_addr(iface),
        };
        setopt(&m, libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP, &mreq)?;
        // Only the group joined here, on this interface (Ch. 1 §2).
        setopt(&m, libc::IPPROTO_IP, libc::IP_MULTICAST_ALL, &zero)?;

        let u = udp_socket()?;
        bind(&u, SocketAddrV4::new(iface, 0))?;
        setopt(&u, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &in_addr(iface))?;
        // Loop our multicasts back only on a loopback gateway, like Link (Ch. 1 §2).
        let lp: libc::c_int = iface.is_loopback() as libc::c_int;
        setopt(&u, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, &lp)?;
        let ucast = UdpSocket::from(u);
        let mep = match ucast.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err(io::Error::other("IPv6 address on an IPv4 socket")),
        };
        Ok(Sockets {
            mcast: UdpSocket::from(m),
            ucast,
            mep,
        })
    }
}

/// `(interface, IPv4 address)` of every interface that is up, restricted to `names`
/// when it is not empty.
fn interfaces(names: &[String]) -> io::Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr.
        if unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int != libc::AF_INET {
            continue;
        }
        if ifa.ifa_flags & libc::IFF_UP as libc::c_uint == 0 {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in; ifa_name is a C string.
        let (addr, name) = unsafe {
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            (
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        if names.is_empty() || names.contains(&name) {
            out.push((name, addr));
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// A warning at most every [`LOG_EVERY`], saying how many were left out.
#[derive(Default)]
struct RateLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLog {
    /// `Some(suppressed)` when a line may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct Gateway {
    ctx: Arc<Ctx>,
    key: String,
    iface: String,
    sockets: Sockets,
    peer: LinkPeer,
    /// The room as last given to the peer.
    room: Option<RoomState>,
    /// The line that governed before the current one, and until when it counts.
    previous: Option<(ExactLine, i64)>,
    tempo_log: RateLog,
    transport_log: RateLog,
    last_counters: crate::core::link::peer::Counters,
    /// The room's ghost clock shift in force here, ns.
    shift_ns: i64,
    /// Host time (µs) of this gateway's last proposed step.
    last_step_us: Option<i64>,
}

fn gateway(ctx: Arc<Ctx>, k: (String, Ipv4Addr), sockets: Sockets, stop: Arc<AtomicBool>) {
    let mut cfg = Config::new(sockets.mep);
    cfg.session_id = Some(ctx.ids.session);
    cfg.sibling_tag = Some(ctx.ids.sibling_tag);
    cfg.steer_apps = true;
    let seed = u64::from_be_bytes(ctx.ids.node.0) ^ ctx.clock.now_ns() as u64;
    let peer = LinkPeer::new(ctx.ids.node, seed, cfg);
    tracing::info!(interface = %k.0, addr = %k.1, mep = %sockets.mep, "Ableton Link: gateway open");
    let mut g = Gateway {
        key: gateway_key(&k),
        iface: k.0.clone(),
        ctx,
        sockets,
        peer,
        room: None,
        previous: None,
        tempo_log: RateLog::default(),
        transport_log: RateLog::default(),
        last_counters: Default::default(),
        shift_ns: 0,
        last_step_us: None,
    };
    g.run(&stop);
}

impl Gateway {
    /// Set the ghost transform for `now_ns` (local): ghost = session + shift + 2⁵⁰
    /// µs, with the room's current shift (the probes' history moves with a step).
    /// Returns the peer's host time (µs) and the room's next change (local ns).
    fn sync_room(&mut self, now_ns: i64) -> (i64, Option<i64>) {
        let snap = self.ctx.cell.read();
        let now_us = now_ns.div_euclid(1000);
        let session = snap.map.to_session(now_ns);
        let shift = self.ctx.stats.shift_ns.load(Relaxed);
        if shift != self.shift_ns {
            self.peer
                .rebase_app_clocks((shift - self.shift_ns).div_euclid(1000));
            self.shift_ns = shift;
        }
        self.peer.set_ghost_xform(GhostXform {
            intercept_us: present::ghost_us(session, shift) - now_us,
        });
        let prev = self
            .previous
            .filter(|(_, until)| session < *until)
            .map(|(l, _)| l);
        let state = present::room_state(&snap.timeline, session, prev, shift);
        if self.room.as_ref() != Some(&state) {
            if let Some(old) = &self.room {
                if old.line != state.line {
                    self.previous = Some((old.line, session + PREVIOUS_LINE_NS));
                }
            }
            let actions = self.peer.set_room(now_us, &state);
            self.room = Some(state);
            self.perform(actions);
        }
        let next = present::next_change(&snap.timeline, session).map(|t| snap.map.to_local(t));
        (now_us, next)
    }

    fn run(&mut self, stop: &AtomicBool) {
        let now = self.ctx.clock.now_ns();
        self.sync_room(now);
        let actions = self.peer.start(now.div_euclid(1000));
        self.perform(actions);
        let mut buf = [0u8; 2048];
        while !stop.load(Relaxed) {
            let now = self.ctx.clock.now_ns();
            let (now_us, next_change) = self.sync_room(now);
            let actions = self.peer.handle_timeout(now_us);
            self.perform(actions);
            self.steer(now_us);
            let mut wake = now + MAX_SLEEP_NS;
            if let Some(t) = self.peer.next_timeout() {
                wake = wake.min(t.saturating_mul(1000));
            }
            if let Some(t) = next_change {
                wake = wake.min(t);
            }
            let (m, u) = wait(&self.sockets, (wake - self.ctx.clock.now_ns()).max(0));
            if m {
                self.drain(&mut buf, true);
            }
            if u {
                self.drain(&mut buf, false);
            }
        }
        let actions = self.peer.shutdown(self.ctx.clock.now_ns().div_euclid(1000));
        self.perform(actions);
        self.ctx
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        update_counts(&self.ctx);
        tracing::info!(interface = %self.iface, "Ableton Link: gateway closed (ByeBye sent)");
    }

    /// Up to [`BATCH`] datagrams from one socket, each handled as it arrives.
    fn drain(&mut self, buf: &mut [u8], multicast: bool) {
        for _ in 0..BATCH {
            let sock = if multicast {
                &self.sockets.mcast
            } else {
                &self.sockets.ucast
            };
            let (n, from) = match sock.recv_from(buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "Ableton Link: recv failed");
                    return;
                }
            };
            // The clock first: a pong must carry the ghost time of its ping's arrival.
            let now = self.ctx.clock.now_ns();
            self.ctx.stats.messages.fetch_add(1, Relaxed);
            let SocketAddr::V4(from) = from else {
                self.ctx.stats.bad_datagrams.fetch_add(1, Relaxed);
                continue;
            };
            let snap_map = self.ctx.cell.read().map;
            let now_us = now.div_euclid(1000);
            self.peer.set_ghost_xform(GhostXform {
                intercept_us: present::ghost_us(snap_map.to_session(now), self.shift_ns) - now_us,
            });
            let actions = self.peer.handle_datagram(now_us, from, &buf[..n]);
            self.perform(actions);
        }
    }

    /// Propose a step of the room's ghost clock onto the Link apps' clocks
    /// ([`crate::core::link::steer`]); the room takes it when this box leads.
    fn steer(&mut self, now_us: i64) {
        let est = self.peer.app_offset(now_us);
        let Some(d_us) = steer::step(est, now_us, self.last_step_us) else {
            return;
        };
        let base = self.shift_ns;
        let new = base.saturating_add(d_us.saturating_mul(1000));
        if self.ctx.room.link_steer(base, new) {
            self.last_step_us = Some(now_us);
            self.ctx.stats.steps.fetch_add(1, Relaxed);
            tracing::trace!(interface = %self.iface, step_us = d_us, apps = est.map(|e| e.apps), "Ableton Link: steering the room's ghost clock onto the apps'");
        }
    }

    fn send(&self, to: SocketAddrV4, b: &[u8]) {
        if let Err(e) = self.sockets.ucast.send_to(b, to) {
            let n = self.ctx.stats.send_errors.fetch_add(1, Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(interface = %self.iface, %to, error = %e, errors = n + 1, "Ableton Link: send failed");
            }
        }
    }

    fn perform(&mut self, actions: Vec<Action>) {
        let mut peers_changed = false;
        for a in actions {
            match a {
                Action::SendTo(to, b) => self.send(to, &b),
                Action::SendMulticast(b) => self.send(MULTICAST_V4, &b),
                Action::Event(e) => peers_changed |= self.event(e),
            }
        }
        let c = self.peer.counters();
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.ctx
            .stats
            .bad_datagrams
            .fetch_add(d(c.bad, self.last_counters.bad), Relaxed);
        self.ctx
            .stats
            .pongs
            .fetch_add(d(c.pongs, self.last_counters.pongs), Relaxed);
        self.ctx
            .stats
            .app_samples
            .fetch_add(d(c.app_samples, self.last_counters.app_samples), Relaxed);
        self.last_counters = c;
        if peers_changed {
            let apps: BTreeSet<NodeId> = self.peer.app_peers().map(|p| p.node_id).collect();
            let boxes: BTreeSet<NodeId> = self.peer.sibling_peers().map(|p| p.node_id).collect();
            self.ctx
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.key.clone(), (apps, boxes));
            update_counts(&self.ctx);
        }
    }

    /// Log/count an event; true when the peer table changed.
    fn event(&mut self, e: Event) -> bool {
        match e {
            Event::PeerJoined { .. } | Event::PeerLeft { .. } => true,
            Event::PeerSessionChanged {
                node_id,
                in_our_session,
                ..
            } => {
                if in_our_session && !self.peer.is_sibling(node_id) {
                    tracing::info!(interface = %self.iface, peer = %node_id, "Ableton Link: a Link app joined the room's session");
                }
                true
            }
            Event::RemoteTimelineChange {
                node_id, timeline, ..
            } => {
                self.ctx.stats.overruled.fetch_add(1, Relaxed);
                let bpm = timeline.bpm();
                let room = self.room.as_ref().map(|r| r.line.mbpm as f64 / 1000.0);
                let forward = self.control_change(Tempo::from_bpm(bpm).ok().map(ChangeKind::Tempo));
                if let Some(suppressed) = self.tempo_log.allow() {
                    tracing::warn!(interface = %self.iface, peer = %node_id, link_bpm = bpm, room_bpm = ?room, handed_to_room = forward, suppressed, "Ableton Link: a Link app changed the tempo or beat; overruled (the room's timeline is authoritative{})", if self.ctx.changes.is_some() { "; link_control: the change goes to the room" } else { "" });
                }
                false
            }
            Event::RemoteStartStopChange { node_id, state, .. } => {
                self.ctx.stats.overruled.fetch_add(1, Relaxed);
                let kind = if state.is_playing {
                    ChangeKind::Start
                } else {
                    ChangeKind::Stop
                };
                let forward = self.control_change(Some(kind));
                if let Some(suppressed) = self.transport_log.allow() {
                    tracing::warn!(interface = %self.iface, peer = %node_id, playing = state.is_playing, handed_to_room = forward, suppressed, "Ableton Link: a Link app started or stopped the transport; overruled (the room's transport is authoritative)");
                }
                false
            }
            Event::ForeignSession {
                session_id,
                ghost_delta_us,
                joins_us,
            } => {
                tracing::info!(interface = %self.iface, session = %session_id, ghost_delta_us, joins_us, "Ableton Link: another Link session on this network");
                false
            }
            Event::ForeignSessionMeasurementFailed { session_id, reason } => {
                tracing::debug!(interface = %self.iface, session = %session_id, ?reason, "Ableton Link: could not measure another Link session");
                false
            }
        }
    }

    /// With `link_control`, queue a Link app's change for the room unless the room
    /// already has it; returns whether it was queued.
    fn control_change(&self, kind: Option<ChangeKind>) -> bool {
        let (Some(tx), Some(kind)) = (&self.ctx.changes, kind) else {
            return false;
        };
        let last = *self.ctx.cell.read().timeline.last();
        let already = match kind {
            ChangeKind::Tempo(t) => last.tempo == t,
            ChangeKind::Meter(m) => last.meter == m,
            ChangeKind::Start => last.playing,
            ChangeKind::Stop => !last.playing,
        };
        !already && tx.try_send(kind).is_ok()
    }
}

/// Wait until either socket is readable or `timeout_ns` passed: (mcast, ucast).
fn wait(s: &Sockets, timeout_ns: i64) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: s.mcast.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: s.ucast.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: fds and ts are valid for the call; no signal mask is changed.
    let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if r <= 0 {
        return (false, false);
    }
    let ready = |f: &libc::pollfd| f.revents & (libc::POLLIN | libc::POLLERR) != 0;
    (ready(&fds[0]), ready(&fds[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_and_names_filter() {
        let all = interfaces(&[]).unwrap();
        assert!(
            all.iter().any(|(n, a)| n == "lo" && a.is_loopback()),
            "{all:?}"
        );
        let lo = interfaces(&["lo".into()]).unwrap();
        assert!(lo.iter().all(|(n, _)| n == "lo") && !lo.is_empty());
        assert!(interfaces(&["no-such-if0".into()]).unwrap().is_empty());
    }

    #[test]
    fn rate_log_suppresses_and_counts() {
        let mut r = RateLog::default();
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(r.allow(), Some(2));
    }
}
