//! mDNS discovery: nodes of one room find each other on the LAN.
//!
//! Every daemon advertises one `_bandsync._udp.local.` service and browses for the others.
//! The service says only what a stranger on the Wi-Fi may know:
//!
//! | TXT key | value |
//! |---|---|
//! | `v` | protocol version ([`PROTOCOL_VERSION`]) |
//! | `id` | node id, 16 lowercase hex characters |
//! | `name` | the node's human name |
//! | `room` | [`room_hash`] of the room name (never the room key) |
//! | `port` | the QUIC port |
//!
//! The instance name is the node id (unique per room, as mDNS wants), the host name
//! `<id>.local.`. Advertisements from the network are validated field by field; a bad
//! one is logged at debug and ignored as if it did not exist.
//!
//! The code is split the usual way: [`Tracker`] is a plain state machine (mDNS
//! resolutions and removals in, [`PeerEvent`]s out, no IO), and [`Discovery`] is the thin
//! driver around an `mdns_sd::ServiceDaemon` (its own thread) plus one forwarding thread.
//!
//! ## mdns-sd behaviour this relies on (0.21)
//!
//! * Interfaces: the daemon starts on every interface, loopback included. With a
//!   non-empty interface list we queue `disable_interface(All)` and then
//!   `enable_interface(name)` for each name before anything else, so no query or
//!   announcement is ever sent elsewhere. The registered service is also restricted to
//!   those interfaces (`set_interfaces`) with `addr_auto`, so only their addresses are
//!   published, and resolved addresses are filtered by the interface they arrived on.
//!   An interface that appears later is picked up by mdns-sd's 5 s IP check.
//!   One thing we cannot prevent: mdns-sd joins the mDNS multicast groups on every
//!   interface when it starts and leaves them a millisecond later when our selection
//!   runs, so the kernel may emit an IGMP/MLD join and leave report there (never mDNS).
//! * Loopback: multicast loop is on by default in mdns-sd, which on Linux means our own
//!   multicast is delivered back to every local socket, so several nodes (or a node and
//!   the CLI) on one host see each other; all of them bind 5353 with `SO_REUSEPORT`.
//!   IPv4 multicast works on `lo` even without its MULTICAST flag (the kernel does not
//!   check it for IPv4); IPv6 does not (`ff02::fb` is unreachable on `lo`), so on
//!   loopback only 127.0.0.1 is published.
//! * No probing: RFC 6762 probing delays the first announcement by ~750 ms, most of
//!   the 1 s join budget. Our names are random 64-bit node ids, so a conflict means a
//!   cloned state dir, which [`Tracker`] logs as a warning. Without it a running node
//!   hears a newcomer's announcement at once, and the newcomer hears the room's answers
//!   to its first query within ~120 ms. Two nodes that start in the same second may wait
//!   for the next query (1 s later): a record just announced is not multicast again
//!   within a second (RFC 6762 §6).
//! * Removal: on shutdown mdns-sd sends goodbye packets (TTL 0); a browser keeps such a
//!   record for 1 s (RFC 6762 §10.1) and then reports the removal, so `Lost` arrives about
//!   1 s after a clean shutdown. A node that dies without goodbye is forgotten only when
//!   its records expire (SRV/address TTL 120 s): liveness is QUIC's job, not mDNS's.
//! * Repeats: mdns-sd re-sends `ServiceResolved` whenever any record of an instance is
//!   refreshed; [`Tracker`] reports `Found` only for what is new or changed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mdns_sd::{
    IfKind, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo, TxtProperties,
};
use tokio::sync::mpsc;

pub use crate::core::advert::{parse_advert, AdvertError, PeerInfo, Txt};
use crate::core::id::is_node_id;

impl Txt for TxtProperties {
    fn get(&self, key: &str) -> Option<&[u8]> {
        self.get_property_val(key).flatten()
    }
}

/// The DNS-SD service type every node advertises.
pub const SERVICE_TYPE: &str = "_bandsync._udp.local.";

/// The peer protocol version, advertised as TXT `v`: the wire's.
pub use crate::core::wire::PROTOCOL_VERSION;

/// What is hashed in front of the room name, so the hash means nothing elsewhere.
const ROOM_HASH_DOMAIN: &str = "bandsync-room:";

/// Capacity of the event channel to the caller. mdns-sd drops a browse whose own
/// channel fills up, so the forwarding thread must keep draining it: events are rare
/// (a handful of nodes per room), this is far more than a room ever queues.
const EVENT_QUEUE: usize = 256;

/// How long `shutdown` waits for mdns-sd to confirm it has sent its goodbye packets.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// A TXT string holds at most 255 bytes including `key=`.
const NAME_MAX: usize = 255 - "name=".len();

/// 16 lowercase hex chars: SHA-256("bandsync-room:" + room name), truncated.
/// The room KEY is never advertised; the hash only keeps rooms apart.
pub fn room_hash(room: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(ROOM_HASH_DOMAIN.as_bytes());
    ctx.update(room.as_bytes());
    hex::encode(&ctx.finish().as_ref()[..8])
}

#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Our node id (16 lowercase hex); our own advertisement is never reported.
    pub node_id: String,
    pub name: String,
    /// The room name (only its hash goes on the wire).
    pub room: String,
    pub quic_port: u16,
    /// Interfaces mDNS may use; empty = all.
    pub interfaces: Vec<String>,
    /// false for the CLI: browse only.
    pub advertise: bool,
    /// Also advertise `_http._tcp` (the phone page) on this port, as `<name>.local`.
    pub http_port: Option<u16>,
    /// Also advertise `_https._tcp` (the secure phone page) on this port.
    pub https_port: Option<u16>,
}

/// `name` as a DNS label (phones reach `http://<label>.local`): lowercase letters,
/// digits and `-`, at most 63 characters.
pub fn dns_label(name: &str) -> String {
    let mut l: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    l = l.trim_matches('-').to_string();
    l.truncate(63);
    let l = l.trim_matches('-').to_string();
    if l.is_empty() {
        "bandsync".into()
    } else {
        l
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A new peer, or a known peer whose name, addresses, port or version changed.
    Found(PeerInfo),
    /// The peer's advertisement was withdrawn (goodbye, expiry, or it left the room).
    Lost { node_id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("node id {0:?} is not 16 lowercase hex characters")]
    BadNodeId(String),
    #[error("cannot advertise QUIC port 0")]
    NoPort,
    #[error("node name is empty")]
    EmptyName,
    #[error("mDNS: {what}: {source}")]
    Mdns {
        what: &'static str,
        #[source]
        source: mdns_sd::Error,
    },
}

fn mdns(what: &'static str) -> impl FnOnce(mdns_sd::Error) -> DiscoveryError {
    move |source| DiscoveryError::Mdns { what, source }
}

/// Link-local IPv6 (fe80::/10) needs its interface as scope id to be dialled.
fn is_v6_link_local(ip: &std::net::Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The resolved addresses worth dialling, with their IPv6 scope: unicast only, and
/// when `interfaces` is non-empty, only those learnt on one of them.
fn usable_ips(
    addrs: &std::collections::HashSet<ScopedIp>,
    interfaces: &[String],
) -> Vec<(IpAddr, u32)> {
    let allowed = |name: &str| interfaces.is_empty() || interfaces.iter().any(|i| i == name);
    let mut out = Vec::new();
    for a in addrs {
        match a {
            ScopedIp::V4(v4) => {
                let ip = *v4.addr();
                if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                    continue;
                }
                if v4.interface_ids().iter().any(|i| allowed(&i.name)) {
                    out.push((IpAddr::V4(ip), 0));
                }
            }
            ScopedIp::V6(v6) => {
                let ip = *v6.addr();
                if ip.is_unspecified() || ip.is_multicast() || !allowed(&v6.scope_id().name) {
                    continue;
                }
                let scope = if is_v6_link_local(&ip) {
                    v6.scope_id().index
                } else {
                    0
                };
                out.push((IpAddr::V6(ip), scope));
            }
            _ => {}
        }
    }
    out
}

/// The discovery state machine: which peers have been reported, keyed by the mDNS
/// instance that advertised them. No IO, no clock: mDNS observations in, events out.
#[derive(Debug)]
pub struct Tracker {
    self_id: String,
    room_hash: String,
    /// Our own instance full name (lowercase), if we advertise.
    self_instance: Option<String>,
    reported: HashMap<String, PeerInfo>,
}

impl Tracker {
    pub fn new(self_id: &str, room_hash: &str, self_instance: Option<String>) -> Self {
        Tracker {
            self_id: self_id.to_string(),
            room_hash: room_hash.to_string(),
            self_instance: self_instance.map(|s| s.to_lowercase()),
            reported: HashMap::new(),
        }
    }

    pub fn room_hash(&self) -> &str {
        &self.room_hash
    }

    /// An instance resolved (again) to `advert`: report it if it is new or changed.
    /// An instance that no longer validates (e.g. it moved to another room) is lost.
    pub fn on_resolved(
        &mut self,
        instance: &str,
        advert: Result<PeerInfo, AdvertError>,
        out: &mut Vec<PeerEvent>,
    ) {
        let key = instance.to_lowercase();
        let peer = match advert {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%instance, error = %e, "ignoring mDNS advertisement");
                self.on_removed(instance, out);
                return;
            }
        };
        if peer.node_id == self.self_id {
            if self.self_instance.as_deref() != Some(key.as_str()) {
                tracing::warn!(%instance, id = %peer.node_id, "another node advertises our node id; ignored");
            }
            return;
        }
        if self.reported.get(&key) == Some(&peer) {
            return;
        }
        if let Some(old) = self.reported.insert(key.clone(), peer.clone()) {
            if old.node_id != peer.node_id && !self.holds(&old.node_id) {
                out.push(PeerEvent::Lost {
                    node_id: old.node_id,
                });
            }
        }
        out.push(PeerEvent::Found(peer));
    }

    /// An instance was withdrawn or expired.
    pub fn on_removed(&mut self, instance: &str, out: &mut Vec<PeerEvent>) {
        if let Some(old) = self.reported.remove(&instance.to_lowercase()) {
            // Two instances can claim one id (a cloned state dir renamed by mDNS
            // conflict resolution); the node is lost only when none is left.
            if !self.holds(&old.node_id) {
                out.push(PeerEvent::Lost {
                    node_id: old.node_id,
                });
            }
        }
    }

    fn holds(&self, node_id: &str) -> bool {
        self.reported.values().any(|p| p.node_id == node_id)
    }
}

/// A running advertiser/browser. Dropping it shuts it down like [`Discovery::shutdown`].
pub struct Discovery {
    daemon: ServiceDaemon,
    advertise: bool,
    stopping: Arc<AtomicBool>,
    stopped: bool,
}

impl Discovery {
    /// Advertise (if cfg.advertise) and browse. Events for peers of the same room hash
    /// (excluding ourselves) arrive on the receiver. Services that resolve twice produce
    /// no duplicate `Found` unless something changed; removal → `Lost`.
    pub fn start(cfg: DiscoveryConfig) -> anyhow::Result<(Discovery, mpsc::Receiver<PeerEvent>)> {
        if cfg.advertise {
            if !is_node_id(&cfg.node_id) {
                return Err(DiscoveryError::BadNodeId(cfg.node_id).into());
            }
            if cfg.quic_port == 0 {
                return Err(DiscoveryError::NoPort.into());
            }
            if cfg.name.trim().is_empty() {
                return Err(DiscoveryError::EmptyName.into());
            }
        }
        #[cfg(target_os = "linux")]
        for i in &cfg.interfaces {
            if !std::path::Path::new("/sys/class/net").join(i).exists() {
                tracing::warn!(interface = %i, "no such network interface (yet); mDNS will use it if it appears");
            }
        }

        let daemon = ServiceDaemon::new().map_err(mdns("starting the daemon"))?;
        let me = Discovery {
            daemon,
            advertise: cfg.advertise,
            stopping: Arc::new(AtomicBool::new(false)),
            stopped: false,
        };
        // Commands run in order on the daemon thread: the interface selection is in
        // place before the first query or announcement goes out.
        if !cfg.interfaces.is_empty() {
            me.daemon
                .disable_interface(IfKind::All)
                .map_err(mdns("disabling all interfaces"))?;
            let names: Vec<IfKind> = cfg
                .interfaces
                .iter()
                .map(|n| IfKind::Name(n.clone()))
                .collect();
            me.daemon
                .enable_interface(names)
                .map_err(mdns("enabling the configured interfaces"))?;
        }

        // Browse first: a peer answering our announcement at once is then already
        // wanted, not dropped as unsolicited.
        let hash = room_hash(&cfg.room);
        let events = me.daemon.browse(SERVICE_TYPE).map_err(mdns("browsing"))?;
        let mut self_instance = None;
        if cfg.advertise {
            let info = service_info(&cfg, &hash)?;
            self_instance = Some(info.get_fullname().to_string());
            me.daemon
                .register(info)
                .map_err(mdns("registering our service"))?;
            let pages = [
                ("_http._tcp.local.", cfg.http_port),
                ("_https._tcp.local.", cfg.https_port),
            ];
            for (service, port) in pages {
                let Some(port) = port else { continue };
                // The phone page: a failure here costs the phones' nice name, not the room.
                let label = dns_label(&cfg.name);
                match ServiceInfo::new(
                    service,
                    &label,
                    &format!("{label}.local."),
                    (),
                    port,
                    &[("path", "/")][..],
                ) {
                    Ok(info) => {
                        let mut info = info.enable_addr_auto();
                        info.set_requires_probe(false);
                        if !cfg.interfaces.is_empty() {
                            info.set_interfaces(
                                cfg.interfaces
                                    .iter()
                                    .map(|n| IfKind::Name(n.clone()))
                                    .collect(),
                            );
                        }
                        if let Err(e) = me.daemon.register(info) {
                            tracing::warn!(error = %e, "cannot advertise the phone page over mDNS");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot advertise the phone page over mDNS")
                    }
                }
            }
        }
        tracing::info!(room = %hash, advertise = cfg.advertise, interfaces = ?cfg.interfaces, "mDNS discovery started");

        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let fwd = Forwarder {
            daemon: me.daemon.clone(),
            stopping: me.stopping.clone(),
            tracker: Tracker::new(&cfg.node_id, &hash, self_instance),
            interfaces: cfg.interfaces,
            tx,
        };
        std::thread::Builder::new()
            .name("bandsync-mdns".into())
            .spawn(move || fwd.run(events))?;
        Ok((me, rx))
    }

    /// Withdraw our advertisement (goodbye packets) and stop browsing. Blocks at most
    /// about a second, waiting for mdns-sd to confirm the goodbyes went out.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.stopping.store(true, Ordering::SeqCst);
        match self.daemon.shutdown() {
            // Only an advertiser has goodbyes worth waiting for.
            Ok(done) if self.advertise => {
                if done.recv_timeout(GOODBYE_WAIT).is_err() {
                    tracing::debug!("mDNS daemon did not confirm shutdown in time");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "mDNS daemon shutdown"),
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop();
    }
}

fn service_info(cfg: &DiscoveryConfig, hash: &str) -> Result<ServiceInfo, DiscoveryError> {
    let mut name = cfg.name.as_str();
    if name.len() > NAME_MAX {
        let mut end = NAME_MAX;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name = &name[..end];
    }
    let props = [
        ("v", PROTOCOL_VERSION.to_string()),
        ("id", cfg.node_id.clone()),
        ("name", name.to_string()),
        ("room", hash.to_string()),
        ("port", cfg.quic_port.to_string()),
    ];
    let host = format!("{}.local.", cfg.node_id);
    let mut info = ServiceInfo::new(
        SERVICE_TYPE,
        &cfg.node_id,
        &host,
        (),
        cfg.quic_port,
        &props[..],
    )
    .map_err(mdns("building our service record"))?
    .enable_addr_auto();
    // Random 64-bit names do not collide; probing would cost ~750 ms (module docs).
    info.set_requires_probe(false);
    if !cfg.interfaces.is_empty() {
        info.set_interfaces(
            cfg.interfaces
                .iter()
                .map(|n| IfKind::Name(n.clone()))
                .collect(),
        );
    }
    Ok(info)
}

/// The forwarding thread: mdns-sd events → [`Tracker`] → the caller's channel.
struct Forwarder {
    daemon: ServiceDaemon,
    stopping: Arc<AtomicBool>,
    tracker: Tracker,
    interfaces: Vec<String>,
    tx: mpsc::Sender<PeerEvent>,
}

impl Forwarder {
    fn run(mut self, mut events: mdns_sd::Receiver<ServiceEvent>) {
        let mut out = Vec::new();
        loop {
            let ev = match events.recv() {
                Ok(ev) => ev,
                Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                Err(_) => {
                    // mdns-sd ends a browse whose channel overflowed; start it again
                    // (the cache replays what is known, the tracker suppresses repeats).
                    tracing::warn!("mDNS browse ended unexpectedly; restarting it");
                    std::thread::sleep(Duration::from_secs(1));
                    match self.daemon.browse(SERVICE_TYPE) {
                        Ok(ev) => {
                            events = ev;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "mDNS browse cannot restart; discovery stopped");
                            return;
                        }
                    }
                }
            };
            self.handle(ev, &mut out);
            for e in out.drain(..) {
                // Blocking is fine on this thread; an error means the receiver is gone.
                if self.tx.blocking_send(e).is_err() {
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ev: ServiceEvent, out: &mut Vec<PeerEvent>) {
        match ev {
            ServiceEvent::ServiceResolved(svc) => {
                let advert = self.advert(&svc);
                self.tracker.on_resolved(&svc.fullname, advert, out);
            }
            ServiceEvent::ServiceRemoved(_, instance) => self.tracker.on_removed(&instance, out),
            other => tracing::trace!(event = ?other, "mDNS"),
        }
    }

    fn advert(&self, svc: &ResolvedService) -> Result<PeerInfo, AdvertError> {
        let ips = usable_ips(&svc.addresses, &self.interfaces);
        parse_advert(&svc.txt_properties, self.tracker.room_hash(), &ips)
    }
}

/// For the CLI: browse (never advertise) and report each node of the room the moment
/// it resolves, so the caller can dial it at once instead of waiting for a browse
/// window to end. Dropping (or shutting down) the handle stops browsing immediately
/// (a browser has no goodbyes to wait for).
pub fn browse(
    room: &str,
    interfaces: &[String],
) -> anyhow::Result<(Discovery, mpsc::Receiver<PeerEvent>)> {
    Discovery::start(DiscoveryConfig {
        node_id: String::new(),
        name: String::new(),
        room: room.to_string(),
        quic_port: 0,
        interfaces: interfaces.to_vec(),
        advertise: false,
        http_port: None,
        https_port: None,
    })
}

/// Browse for `timeout` and return the room's nodes found (a census; the CLI uses
/// [`browse`] and stops at the first node that answers).
pub async fn browse_once(
    room: &str,
    interfaces: &[String],
    timeout: Duration,
) -> anyhow::Result<Vec<PeerInfo>> {
    let (disc, mut rx) = browse(room, interfaces)?;
    let mut found: HashMap<String, PeerInfo> = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(PeerEvent::Found(p))) => {
                found.insert(p.node_id.clone(), p);
            }
            Ok(Some(PeerEvent::Lost { node_id })) => {
                found.remove(&node_id);
            }
            Ok(None) | Err(_) => break,
        }
    }
    disc.shutdown();
    let mut v: Vec<PeerInfo> = found.into_values().collect();
    v.sort_by(|a, b| (&a.name, &a.node_id).cmp(&(&b.name, &b.node_id)));
    Ok(v)
}

#[cfg(test)]
mod tests {
    //! The network tests run real mDNS, restricted to the loopback interface `lo`, in a
    //! private network namespace when they may (see [`isolate_on_loopback`]): no test
    //! packet ever leaves the machine.

    use super::*;
    use mdns_sd::{IntoTxtProperties, TxtProperty};
    use std::hash::{BuildHasher, Hasher};
    use std::net::{Ipv4Addr, SocketAddr};
    use tokio::time::Instant;

    const ROOM: &str = "test-room";

    fn props(kv: &[(&str, &str)]) -> TxtProperties {
        kv.into_txt_properties()
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("v", "1"),
            ("id", "0123456789abcdef"),
            ("name", "drums"),
            ("room", ""),
            ("port", "47810"),
        ]
    }

    /// `good()` with the room filled in and `key` replaced by `val` (or removed if None).
    fn advert(key: &str, val: Option<&str>) -> Result<PeerInfo, AdvertError> {
        let hash = room_hash(ROOM);
        let mut kv: Vec<(&str, &str)> = good()
            .into_iter()
            .map(|(k, v)| {
                if k == "room" {
                    (k, hash.as_str())
                } else {
                    (k, v)
                }
            })
            .collect();
        kv.retain(|(k, _)| *k != key);
        if let Some(v) = val {
            kv.push((key, v));
        }
        parse_advert(&props(&kv), &hash, &[(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)])
    }

    #[test]
    fn room_hash_is_16_hex_of_sha256() {
        // python3 -c "import hashlib; print(hashlib.sha256(b'bandsync-room:default').hexdigest()[:16])"
        assert_eq!(room_hash("default"), "c54064fed7d18016");
        assert_eq!(room_hash(""), "38bb716b8da79ec1");
        assert_ne!(room_hash("a"), room_hash("b"));
    }

    #[test]
    fn a_good_advert_parses() {
        let p = advert("", None).unwrap();
        assert_eq!(
            p,
            PeerInfo {
                node_id: "0123456789abcdef".into(),
                name: "drums".into(),
                addrs: vec!["127.0.0.1:47810".parse().unwrap()],
                proto: 1
            }
        );
    }

    #[test]
    fn bad_or_missing_txt_fields_are_refused() {
        for key in ["v", "id", "name", "room", "port"] {
            assert_eq!(advert(key, None), Err(AdvertError::Missing(key)));
        }
        for (key, val) in [
            ("v", "0"),
            ("v", "x"),
            ("v", "+1"),
            ("v", "70000"),
            ("id", "0123456789ABCDEF"),
            ("id", "0123456789abcde"),
            ("id", "0123456789abcdeg"),
            ("name", ""),
            ("name", " "),
            ("name", "a\nb"),
            ("port", "0"),
            ("port", "65536"),
            ("port", "-1"),
            ("port", " 1"),
            ("port", ""),
        ] {
            assert!(
                matches!(advert(key, Some(val)), Err(AdvertError::Invalid { .. })),
                "{key}={val:?} accepted"
            );
        }
        assert_eq!(
            advert("room", Some("0000000000000000")),
            Err(AdvertError::OtherRoom("0000000000000000".into()))
        );
        // A key without a value, and a value that is not UTF-8.
        let hash = room_hash(ROOM);
        let mut p: Vec<TxtProperty> = vec![
            ("v", "1").into(),
            "id".into(),
            ("room", hash.as_str()).into(),
        ];
        assert_eq!(
            parse_advert(&p.clone().into_txt_properties(), &hash, &[]),
            Err(AdvertError::Missing("id"))
        );
        p[1] = ("id", &[0xffu8, 0xfe][..]).into();
        assert!(matches!(
            parse_advert(&p.into_txt_properties(), &hash, &[]),
            Err(AdvertError::Invalid { key: "id", .. })
        ));
    }

    #[test]
    fn addresses_are_sorted_deduped_and_scoped() {
        let hash = room_hash(ROOM);
        let mut kv = good();
        kv[3] = ("room", &hash);
        let ll: IpAddr = "fe80::1".parse().unwrap();
        let ips = [
            (ll, 3),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 0),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 0),
            (ll, 3),
        ];
        let p = parse_advert(&props(&kv), &hash, &ips).unwrap();
        assert_eq!(p.addrs.len(), 3);
        assert_eq!(p.addrs[0], "10.0.0.1:47810".parse().unwrap());
        assert_eq!(p.addrs[1], "10.0.0.2:47810".parse().unwrap());
        assert!(matches!(p.addrs[2], SocketAddr::V6(a) if a.scope_id() == 3 && a.port() == 47810));
        assert_eq!(
            parse_advert(&props(&kv), &hash, &[]),
            Err(AdvertError::NoAddress)
        );
    }

    fn peer(id: &str, port: u16) -> PeerInfo {
        PeerInfo {
            node_id: id.into(),
            name: "n".into(),
            addrs: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)],
            proto: 1,
        }
    }

    #[test]
    fn tracker_reports_changes_only() {
        let me = "ffffffffffffffff";
        let mut t = Tracker::new(me, "h", Some(format!("{me}.{SERVICE_TYPE}")));
        let mut out = Vec::new();
        let a = "aaaaaaaaaaaaaaaa";
        let inst = format!("{a}.{SERVICE_TYPE}");

        t.on_resolved(&inst, Ok(peer(a, 1)), &mut out);
        t.on_resolved(&inst.to_uppercase(), Ok(peer(a, 1)), &mut out); // the same, again
        assert_eq!(out, vec![PeerEvent::Found(peer(a, 1))]);
        out.clear();

        t.on_resolved(&inst, Ok(peer(a, 2)), &mut out); // port changed
        assert_eq!(out, vec![PeerEvent::Found(peer(a, 2))]);
        out.clear();

        t.on_resolved(&format!("{me}.{SERVICE_TYPE}"), Ok(peer(me, 9)), &mut out); // ourselves
        t.on_removed("unknown._bandsync._udp.local.", &mut out);
        assert!(out.is_empty());

        t.on_resolved(&inst, Err(AdvertError::OtherRoom("x".into())), &mut out); // moved rooms
        assert_eq!(out, vec![PeerEvent::Lost { node_id: a.into() }]);
        out.clear();
        t.on_removed(&inst, &mut out);
        assert!(out.is_empty());

        // Two instances claiming one id: lost only when the last one goes.
        let inst2 = format!("{a} (2).{SERVICE_TYPE}");
        t.on_resolved(&inst, Ok(peer(a, 1)), &mut out);
        t.on_resolved(&inst2, Ok(peer(a, 1)), &mut out);
        out.clear();
        t.on_removed(&inst, &mut out);
        assert!(out.is_empty());
        t.on_removed(&inst2, &mut out);
        assert_eq!(out, vec![PeerEvent::Lost { node_id: a.into() }]);
    }

    // ---- real mDNS on `lo` ----

    /// Move this test's thread into a private network namespace with only `lo` up, so not
    /// even mdns-sd's start-up multicast joins (see the module docs) touch a real
    /// interface, and strays on the host's port 5353 cannot disturb the test. Network
    /// namespaces are per thread on Linux, and the threads the test spawns (mdns-sd's,
    /// the forwarder) inherit it; `#[tokio::test]` runs the test on this one thread.
    /// Without CAP_SYS_ADMIN the test runs on the host's `lo` instead (still lo only).
    fn isolate_on_loopback() {
        // SAFETY: unshare takes no pointers; it only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "no private network namespace ({}); using the host's lo",
                std::io::Error::last_os_error()
            );
            return;
        }
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(
            up.as_ref().is_ok_and(|s| s.success()),
            "cannot bring lo up in the test's network namespace: {up:?}"
        );
    }

    fn random_u64() -> u64 {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    }

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(super::dns_label("Stage Left #2"), "stage-left--2");
        assert_eq!(super::dns_label("--"), "bandsync");
        assert_eq!(super::dns_label(&"x".repeat(80)).len(), 63);
    }

    fn cfg(name: &str, room: &str, port: u16) -> DiscoveryConfig {
        DiscoveryConfig {
            node_id: format!("{:016x}", random_u64()),
            name: name.into(),
            room: room.into(),
            quic_port: port,
            interfaces: vec!["lo".into()],
            advertise: true,
            http_port: None,
            https_port: None,
        }
    }

    /// A room name no other test (or stray process) uses.
    fn fresh_room() -> String {
        format!("test-{:016x}", random_u64())
    }

    /// Wait for an event matching `want`, collecting every event seen on the way.
    async fn wait_for(
        rx: &mut mpsc::Receiver<PeerEvent>,
        seen: &mut Vec<PeerEvent>,
        within: Duration,
        want: impl Fn(&PeerEvent) -> bool,
    ) -> Option<PeerEvent> {
        let deadline = Instant::now() + within;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            seen.push(ev.clone());
            if want(&ev) {
                return Some(ev);
            }
        }
        None
    }

    fn found(id: &str) -> impl Fn(&PeerEvent) -> bool + '_ {
        move |e| matches!(e, PeerEvent::Found(p) if p.node_id == id)
    }

    #[tokio::test]
    async fn two_nodes_find_each_other_ignore_other_rooms_and_see_goodbyes() {
        isolate_on_loopback();
        let room = fresh_room();
        let (ca, cb, cc) = (
            cfg("alpha", &room, 40001),
            cfg("bravo", &room, 40002),
            cfg("charlie", &fresh_room(), 40003),
        );
        let (a, mut rx_a) = Discovery::start(ca.clone()).unwrap();
        let (b, mut rx_b) = Discovery::start(cb.clone()).unwrap();
        let (c, _rx_c) = Discovery::start(cc.clone()).unwrap();

        let mut seen_a = Vec::new();
        let ev = wait_for(
            &mut rx_a,
            &mut seen_a,
            Duration::from_secs(6),
            found(&cb.node_id),
        )
        .await;
        let Some(PeerEvent::Found(p)) = ev else {
            panic!("alpha never found bravo; saw {seen_a:?}")
        };
        assert_eq!(p.name, "bravo");
        assert_eq!(p.proto, PROTOCOL_VERSION);
        assert!(
            p.addrs.contains(&"127.0.0.1:40002".parse().unwrap()),
            "{p:?}"
        );
        assert!(
            p.addrs
                .iter()
                .all(|a| a.port() == 40002 && a.ip().is_loopback()),
            "only lo addresses: {p:?}"
        );

        let mut seen_b = Vec::new();
        let ev = wait_for(
            &mut rx_b,
            &mut seen_b,
            Duration::from_secs(6),
            found(&ca.node_id),
        )
        .await;
        assert!(
            matches!(ev, Some(PeerEvent::Found(p)) if p.name == "alpha"),
            "bravo never found alpha; saw {seen_b:?}"
        );

        // Charlie (another room) has been announcing all along; give stragglers a moment.
        // Then bravo says goodbye: alpha hears it (mdns-sd keeps a goodbye record 1 s).
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.shutdown();
        let lost = wait_for(
            &mut rx_a,
            &mut seen_a,
            Duration::from_secs(6),
            |e| matches!(e, PeerEvent::Lost { node_id } if *node_id == cb.node_id),
        )
        .await;
        assert!(lost.is_some(), "alpha never lost bravo; saw {seen_a:?}");

        for e in seen_a.iter().chain(&seen_b) {
            let id = match e {
                PeerEvent::Found(p) => &p.node_id,
                PeerEvent::Lost { node_id } => node_id,
            };
            assert_ne!(
                id, &cc.node_id,
                "a node of another room was reported: {e:?}"
            );
            assert!(
                id != &ca.node_id || !seen_a.contains(e),
                "alpha reported itself: {e:?}"
            );
        }
        // Resolving again is not news: two Found in a row for one peer must differ.
        let founds: Vec<&PeerInfo> = seen_a
            .iter()
            .filter_map(|e| {
                if let PeerEvent::Found(p) = e {
                    Some(p)
                } else {
                    None
                }
            })
            .collect();
        for w in founds.windows(2) {
            assert!(w[0] != w[1], "duplicate Found: {:?}", w[0]);
        }
        a.shutdown();
        c.shutdown();
    }

    #[tokio::test]
    async fn browse_once_finds_an_advertiser() {
        isolate_on_loopback();
        let room = fresh_room();
        let cd = cfg("delta", &room, 40004);
        let (d, _rx) = Discovery::start(cd.clone()).unwrap();
        let (e, _rx) = Discovery::start(cfg("echo", &fresh_room(), 40005)).unwrap();
        // Probing and the first announcement take about a second; browse past that.
        let peers = browse_once(&room, &["lo".to_string()], Duration::from_secs(3))
            .await
            .unwrap();
        d.shutdown();
        e.shutdown();
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].node_id, cd.node_id);
        assert_eq!(peers[0].name, "delta");
        assert!(
            peers[0].addrs.contains(&"127.0.0.1:40004".parse().unwrap()),
            "{peers:?}"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut c = cfg("x", "r", 1);
        c.node_id = "nope".into();
        assert!(Discovery::start(c).is_err());
        let mut c = cfg("x", "r", 0);
        c.quic_port = 0;
        assert!(Discovery::start(c).is_err());
    }
}
