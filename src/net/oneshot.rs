//! One-shot mDNS queries (RFC 6762 §5.1): the CLI's fast path, and a starting node's.
//!
//! A querier that sends from a port other than 5353 gets its answers by unicast, at
//! once: no shared-record delay (10–50 ms in mdns-sd) and no once-per-second multicast
//! rate limit (RFC 6762 §6). The rate limit matters: a stage tech's second command
//! within a second of the first would otherwise get no answer until the browser's next
//! query, a second later. The full mdns-sd browse still runs beside this (every
//! interface, IPv6, late joiners); this is only the fast path.
//!
//! Everything in an answer is untrusted: the parser is bounded (names ≤ 255 bytes,
//! ≤ 32 compression jumps, records within the packet), only answers from port 5353
//! count, and an advert must pass [`parse_advert`] for this room; a candidate found
//! this way is then dialled and must still prove it holds the room key.

use crate::core::advert::{parse_advert, PeerInfo, Txt};
use crate::net::discovery::SERVICE_TYPE;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::sync::mpsc;

const MDNS_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const MDNS_PORT: u16 = 5353;
const T_A: u16 = 1;
const T_PTR: u16 = 12;
const T_TXT: u16 = 16;
const T_AAAA: u16 = 28;
const T_SRV: u16 = 33;

/// The query: one PTR question for the service type, id 0, QU bit clear.
fn query() -> Vec<u8> {
    let mut q = vec![0u8; 12];
    q[5] = 1; // QDCOUNT = 1
    for label in SERVICE_TYPE.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&T_PTR.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    q
}

/// A domain name at `pos`: (lowercase dotted name with the final dot, position after it).
fn name(pkt: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *pkt.get(pos)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => {
                if out.is_empty() {
                    out.push('.');
                }
                return Some((out, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let label = pkt.get(pos + 1..pos + 1 + len)?;
                out.push_str(&String::from_utf8_lossy(label).to_lowercase());
                out.push('.');
                if out.len() > 255 {
                    return None;
                }
                pos += 1 + len;
            }
            0xc0 => {
                jumps += 1;
                if jumps > 32 {
                    return None;
                }
                let ptr = ((len & 0x3f) << 8) | *pkt.get(pos + 1)? as usize;
                end.get_or_insert(pos + 2);
                pos = ptr;
            }
            _ => return None,
        }
    }
}

fn u16_at(pkt: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes(pkt.get(pos..pos + 2)?.try_into().ok()?))
}

/// The TXT strings of one record as `key[=value]` pairs.
struct TxtRecord(Vec<(String, Option<Vec<u8>>)>);

impl Txt for TxtRecord {
    fn get(&self, key: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| v.as_deref())
    }
}

fn txt_record(rdata: &[u8]) -> TxtRecord {
    let mut out = Vec::new();
    let mut i = 0;
    while i < rdata.len() && out.len() < 32 {
        let len = rdata[i] as usize;
        let Some(s) = rdata.get(i + 1..i + 1 + len) else {
            break;
        };
        i += 1 + len;
        if s.is_empty() {
            continue;
        }
        let (k, v) = match s.iter().position(|&b| b == b'=') {
            Some(eq) => (&s[..eq], Some(s[eq + 1..].to_vec())),
            None => (s, None),
        };
        // The first occurrence of a key wins (RFC 6763 §6.4).
        let k = String::from_utf8_lossy(k).to_string();
        if !out
            .iter()
            .any(|(x, _): &(String, _)| x.eq_ignore_ascii_case(&k))
        {
            out.push((k, v));
        }
    }
    TxtRecord(out)
}

/// The adverts of `room_hash` in one response packet (all its sections).
pub fn parse_response(pkt: &[u8], room_hash: &str) -> Vec<PeerInfo> {
    let (Some(flags), Some(qd)) = (u16_at(pkt, 2), u16_at(pkt, 4)) else {
        return Vec::new();
    };
    if flags & 0x8000 == 0 {
        return Vec::new(); // a query, not a response
    }
    let records: usize = [6, 8, 10]
        .iter()
        .map(|&o| u16_at(pkt, o).unwrap_or(0) as usize)
        .sum();
    let mut pos = 12;
    for _ in 0..qd {
        let Some((_, p)) = name(pkt, pos) else {
            return Vec::new();
        };
        pos = p + 4;
    }
    let service = SERVICE_TYPE.to_lowercase();
    let mut instances: Vec<String> = Vec::new();
    let mut srv: HashMap<String, String> = HashMap::new();
    let mut txt: HashMap<String, TxtRecord> = HashMap::new();
    let mut ips: HashMap<String, Vec<(IpAddr, u32)>> = HashMap::new();
    for _ in 0..records.min(64) {
        let Some((owner, p)) = name(pkt, pos) else {
            break;
        };
        let (Some(ty), Some(rdlen)) = (u16_at(pkt, p), u16_at(pkt, p + 8)) else {
            break;
        };
        let start = p + 10;
        let Some(rdata) = pkt.get(start..start + rdlen as usize) else {
            break;
        };
        pos = start + rdlen as usize;
        match ty {
            T_PTR if owner == service => {
                if let Some((inst, _)) = name(pkt, start) {
                    if inst.ends_with(&service) && !instances.contains(&inst) {
                        instances.push(inst);
                    }
                }
            }
            T_SRV if rdata.len() > 6 => {
                if let Some((host, _)) = name(pkt, start + 6) {
                    srv.insert(owner, host);
                }
            }
            T_TXT => {
                txt.entry(owner).or_insert_with(|| txt_record(rdata));
            }
            T_A if rdata.len() == 4 => {
                let ip = Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]);
                if !ip.is_unspecified() && !ip.is_multicast() && !ip.is_broadcast() {
                    ips.entry(owner).or_default().push((IpAddr::V4(ip), 0));
                }
            }
            T_AAAA if rdata.len() == 16 => {
                let b: [u8; 16] = rdata.try_into().expect("16 bytes");
                let ip = std::net::Ipv6Addr::from(b);
                // Link-local needs the interface as scope: leave those to the browse.
                if !ip.is_unspecified() && !ip.is_multicast() && ip.segments()[0] & 0xffc0 != 0xfe80
                {
                    ips.entry(owner).or_default().push((IpAddr::V6(ip), 0));
                }
            }
            _ => {}
        }
    }
    instances
        .iter()
        .filter_map(|inst| {
            let host = srv.get(inst)?;
            let props = txt.get(inst)?;
            let addrs = ips.get(host).map(Vec::as_slice).unwrap_or(&[]);
            parse_advert(props, room_hash, addrs).ok()
        })
        .collect()
}

/// Send the one-shot query (on each of `interfaces`, or by the default route) now and
/// once more after 250 ms, and report every advert of the room that comes back until
/// the receiver is dropped. Errors end the fast path quietly: the browse goes on.
pub fn spawn(room_hash: String, interfaces: Vec<String>) -> mpsc::Receiver<PeerInfo> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if let Err(e) = run(&room_hash, &interfaces, &tx).await {
            tracing::debug!(error = %e, "one-shot mDNS query failed; browsing only");
        }
    });
    rx
}

async fn run(
    room_hash: &str,
    interfaces: &[String],
    tx: &mpsc::Sender<PeerInfo>,
) -> std::io::Result<()> {
    let sock = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let q = query();
    send(&sock, interfaces, &q).await?;
    let mut resend = Some(tokio::time::Instant::now() + Duration::from_millis(250));
    let mut buf = vec![0u8; 9000];
    let mut reported: Vec<PeerInfo> = Vec::new();
    loop {
        let got = tokio::select! {
            r = sock.recv_from(&mut buf) => Some(r?),
            _ = async { tokio::time::sleep_until(resend.expect("guarded")).await }, if resend.is_some() => None,
        };
        let Some((n, from)) = got else {
            resend = None;
            let _ = send(&sock, interfaces, &q).await;
            continue;
        };
        if from.port() != MDNS_PORT {
            continue;
        }
        for p in parse_response(&buf[..n], room_hash) {
            if !reported.contains(&p) && reported.len() < 256 {
                reported.push(p.clone());
                if tx.send(p).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The query to 224.0.0.251:5353, out of each of `interfaces` (else out of every IPv4
/// interface that is up and can multicast, loopback included: nodes on this host).
async fn send(
    sock: &tokio::net::UdpSocket,
    interfaces: &[String],
    q: &[u8],
) -> std::io::Result<()> {
    let dest = SocketAddr::from((MDNS_V4, MDNS_PORT));
    let all;
    let interfaces = if interfaces.is_empty() {
        all = ipv4_interfaces();
        if all.is_empty() {
            return sock.send_to(q, dest).await.map(|_| ());
        }
        &all[..]
    } else {
        interfaces
    };
    let mut last = None;
    let mut sent = false;
    for i in interfaces {
        match set_multicast_if(sock, i) {
            Ok(()) => match sock.send_to(q, dest).await {
                Ok(_) => sent = true,
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
    }
    match (sent, last) {
        (true, _) => Ok(()),
        (false, Some(e)) => Err(e),
        (false, None) => Err(std::io::Error::other("no interface to query on")),
    }
}

/// Names of the interfaces that are up with an IPv4 address and can multicast (or are
/// loopback, where Linux delivers IPv4 multicast anyway).
fn ipv4_interfaces() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur points into the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let flags = ifa.ifa_flags as libc::c_int;
        let up = flags & libc::IFF_UP != 0;
        let mcast = flags & (libc::IFF_MULTICAST | libc::IFF_LOOPBACK) != 0;
        // SAFETY: ifa_addr is null or a valid sockaddr.
        let v4 = !ifa.ifa_addr.is_null()
            && unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int == libc::AF_INET;
        if up && mcast && v4 && !ifa.ifa_name.is_null() && out.len() < 32 {
            // SAFETY: ifa_name is a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// Send the socket's multicast out of interface `name` (by index: `ip_mreqn`).
fn set_multicast_if(sock: &tokio::net::UdpSocket, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let req = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr { s_addr: 0 },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: index as libc::c_int,
    };
    // SAFETY: a valid socket and a properly sized ip_mreqn.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            &req as *const libc::ip_mreqn as *const libc::c_void,
            std::mem::size_of::<libc::ip_mreqn>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_name(p: &mut Vec<u8>, n: &str) {
        for l in n.trim_end_matches('.').split('.') {
            p.push(l.len() as u8);
            p.extend_from_slice(l.as_bytes());
        }
        p.push(0);
    }

    fn rr(p: &mut Vec<u8>, owner: &[u8], ty: u16, rdata: &[u8]) {
        p.extend_from_slice(owner);
        p.extend_from_slice(&ty.to_be_bytes());
        p.extend_from_slice(&[0, 1, 0, 0, 0, 10]);
        p.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        p.extend_from_slice(rdata);
    }

    /// A response like mdns-sd's: PTR answer, SRV/TXT/A additionals, with compression.
    fn response(room: &str, port: u16) -> Vec<u8> {
        let mut p = vec![0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 3];
        let svc_at = p.len() as u16;
        put_name(&mut p, SERVICE_TYPE);
        p.extend_from_slice(&[0, 12, 0, 1, 0, 0, 0, 10]);
        let inst_at = p.len() as u16 + 2;
        let mut rd = vec![16];
        rd.extend_from_slice(b"0123456789abcdef");
        rd.extend_from_slice(&(0xc000 | svc_at).to_be_bytes());
        p.extend_from_slice(&(rd.len() as u16).to_be_bytes());
        p.extend_from_slice(&rd);
        let inst = (0xc000 | inst_at).to_be_bytes();
        let mut srv = vec![0, 0, 0, 0];
        srv.extend_from_slice(&port.to_be_bytes());
        put_name(&mut srv, "0123456789abcdef.local.");
        rr(&mut p, &inst, T_SRV, &srv);
        let mut t = Vec::new();
        for kv in [
            "v=3".to_string(),
            "id=0123456789abcdef".into(),
            "name=drums".into(),
            format!("room={room}"),
            format!("port={port}"),
        ] {
            t.push(kv.len() as u8);
            t.extend_from_slice(kv.as_bytes());
        }
        rr(&mut p, &inst, T_TXT, &t);
        let mut host = Vec::new();
        put_name(&mut host, "0123456789abcdef.local.");
        rr(&mut p, &host, T_A, &[10, 0, 0, 7]);
        p
    }

    #[test]
    fn a_response_of_the_room_parses() {
        let hash = crate::net::discovery::room_hash("r");
        let got = parse_response(&response(&hash, 4242), &hash);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].node_id, "0123456789abcdef");
        assert_eq!(got[0].name, "drums");
        assert_eq!(got[0].addrs, vec!["10.0.0.7:4242".parse().unwrap()]);
        // another room's advert, a query, and every truncation are ignored
        assert!(parse_response(
            &response(&hash, 4242),
            &crate::net::discovery::room_hash("x")
        )
        .is_empty());
        let mut q = response(&hash, 4242);
        q[2] = 0;
        assert!(parse_response(&q, &hash).is_empty());
        let full = response(&hash, 4242);
        for n in 0..full.len() {
            assert!(
                parse_response(&full[..n], &hash).is_empty(),
                "truncated at {n}"
            );
        }
    }

    #[test]
    fn hostile_names_are_bounded() {
        // A compression loop, and a pointer past the end.
        let mut p = vec![0, 0, 0x84, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&[0xc0, 12]);
        assert!(name(&p, 12).is_none());
        assert!(parse_response(&p, "h").is_empty());
        assert!(name(&[0xc0, 0xff], 0).is_none());
        assert!(name(&[0x40], 0).is_none());
        assert_eq!(query().len(), 12 + SERVICE_TYPE.len() + 1 + 4);
    }
}
