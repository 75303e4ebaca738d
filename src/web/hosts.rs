//! The box's own names and addresses: what a `Host` header and an `Origin` may name.
//!
//! A web page elsewhere (another site, or a name the attacker's DNS rebinds to this
//! box) must not drive the box: `/ws` and every state-changing request need a `Host`
//! that is one of the box's own names or addresses and, when there is an `Origin`, an
//! origin `http(s)://<one of those>[:port]`. The names are the hostname,
//! `<label>.local` of the hostname and of every given name (the box's name, its node
//! id: what mDNS advertises), `localhost`, and any extra names the configuration
//! adds. An IP literal passes when it is loopback or one of the box's interface
//! addresses (`getifaddrs`, cached, re-read at most once a second on a miss and every
//! minute otherwise, at most [`MAX_ADDRS`] kept).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Interface addresses kept at most.
pub const MAX_ADDRS: usize = 256;
/// A miss re-reads the interfaces at most this often.
const REFRESH_ON_MISS: Duration = Duration::from_secs(1);
/// The interfaces are re-read at least this often (addresses come and go).
const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// The allow-list (cheap to clone; the interface cache is shared).
#[derive(Clone, Debug)]
pub struct AllowedHosts(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    names: BTreeSet<String>,
    addrs: Mutex<Addrs>,
}

#[derive(Debug)]
struct Addrs {
    list: Vec<IpAddr>,
    read_at: Option<Instant>,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Host,
    Origin,
}

impl AllowedHosts {
    /// The box's names: its hostname, `localhost`, and `<label>.local` for the hostname
    /// and each of `names` (the box's name, its node id).
    pub fn for_box(names: &[&str]) -> AllowedHosts {
        let mut set = BTreeSet::new();
        set.insert("localhost".to_string());
        if let Some(h) = hostname() {
            let h = normalize(&h);
            if !h.is_empty() {
                let first = h.split('.').next().unwrap_or("").to_string();
                set.insert(format!(
                    "{}.local",
                    crate::net::discovery::dns_label(&first)
                ));
                set.insert(h);
            }
        }
        for n in names {
            if !n.trim().is_empty() {
                set.insert(format!("{}.local", crate::net::discovery::dns_label(n)));
            }
        }
        AllowedHosts::from_names(set)
    }

    /// Only `localhost`, loopback and the interface addresses (tests).
    pub fn local_only() -> AllowedHosts {
        AllowedHosts::from_names(["localhost".to_string()].into_iter().collect())
    }

    /// More names (a venue's own DNS names for the box).
    pub fn with_names<I: IntoIterator<Item = S>, S: AsRef<str>>(self, extra: I) -> AllowedHosts {
        let mut names = self.0.names.clone();
        for n in extra {
            let n = normalize(n.as_ref());
            if !n.is_empty() {
                names.insert(n);
            }
        }
        AllowedHosts::from_names(names)
    }

    fn from_names(names: BTreeSet<String>) -> AllowedHosts {
        AllowedHosts(Arc::new(Inner {
            names,
            addrs: Mutex::new(Addrs {
                list: Vec::new(),
                read_at: None,
            }),
        }))
    }

    /// The names allowed (lowercase, no trailing dot), for logs and errors.
    pub fn names(&self) -> Vec<String> {
        self.0.names.iter().cloned().collect()
    }

    /// Is `host` (a `Host` header: `name`, `name:port`, `1.2.3.4:port`, `[v6]:port`)
    /// one of the box's own names or addresses?
    pub fn host_ok(&self, host: &str) -> bool {
        match split_host(host) {
            Some(Host::Name(n)) => self.0.names.contains(&n),
            Some(Host::Ip(ip)) => self.ip_ok(ip),
            None => false,
        }
    }

    /// Is `origin` (an `Origin` header) `http(s)://<own name or address>[:port]`?
    /// `null` and every other scheme are not.
    pub fn origin_ok(&self, origin: &str) -> bool {
        let o = origin.trim();
        let rest = if let Some(r) = strip_prefix_ci(o, "http://") {
            r
        } else if let Some(r) = strip_prefix_ci(o, "https://") {
            r
        } else {
            return false;
        };
        // An origin is scheme://host[:port], nothing after (a trailing slash tolerated).
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return false;
        }
        self.host_ok(rest)
    }

    /// Check a request's `Host` and `Origin` (each `None` when absent).
    pub fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<(), Refusal> {
        if !host.is_some_and(|h| self.host_ok(h)) {
            return Err(Refusal::Host);
        }
        if let Some(o) = origin {
            if !self.origin_ok(o) {
                return Err(Refusal::Origin);
            }
        }
        Ok(())
    }

    fn ip_ok(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_loopback() {
            return true;
        }
        let now = Instant::now();
        let mut a = self.0.addrs.lock().unwrap_or_else(|e| e.into_inner());
        let age = a.read_at.map(|t| now.duration_since(t));
        if age.is_none_or(|d| d >= REFRESH_EVERY) {
            a.refresh(now);
        }
        if a.list.contains(&ip) {
            return true;
        }
        if a.read_at
            .is_some_and(|t| now.duration_since(t) >= REFRESH_ON_MISS)
        {
            a.refresh(now);
            return a.list.contains(&ip);
        }
        false
    }
}

impl Addrs {
    fn refresh(&mut self, now: Instant) {
        self.list = interface_addrs();
        self.read_at = Some(now);
    }
}

enum Host {
    Name(String),
    Ip(IpAddr),
}

fn strip_prefix_ci<'a>(s: &'a str, p: &str) -> Option<&'a str> {
    (s.len() >= p.len() && s.is_char_boundary(p.len()) && s[..p.len()].eq_ignore_ascii_case(p))
        .then(|| &s[p.len()..])
}

fn normalize(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` → the host, or `None` when malformed.
fn split_host(h: &str) -> Option<Host> {
    let h = h.trim();
    if h.is_empty() || h.len() > 255 {
        return None;
    }
    let port_ok = |p: &str| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = h.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        return ip
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| Host::Ip(IpAddr::V6(ip)));
    }
    let name = match h.rsplit_once(':') {
        Some((n, p)) if port_ok(p) => n,
        Some(_) => return None, // a bare IPv6 literal or a bad port
        None => h,
    };
    if let Ok(ip) = name.parse::<std::net::Ipv4Addr>() {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    let name = normalize(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || !name.split('.').all(label_ok) {
        return None;
    }
    Some(Host::Name(name))
}

/// This machine's hostname.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_string)
}

/// The addresses of this machine's interfaces (at most [`MAX_ADDRS`]).
pub fn interface_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() && out.len() < MAX_ADDRS {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match (*a).sa_family as i32 {
                    libc::AF_INET => {
                        let s = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(
                            s.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let s = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(std::net::Ipv6Addr::from(s.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        let a = AllowedHosts::for_box(&["Stage Left", "0123abcd"]).with_names(["box1.venue.lan."]);
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "stage-left.local",
            "stage-left.local.:8080",
            "0123abcd.local:80",
            "box1.venue.lan",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(a.host_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "attacker.example",
            "stage-left.local.attacker.example",
            "evil.localhost.example",
            "203.0.113.9:8080",
            "[2001:db8::1]:80",
            "::1",
            "localhost:80:80",
            "localhost:http",
            "local host",
            "localhost/x",
        ] {
            assert!(!a.host_ok(bad), "{bad}");
        }
        for ok in [
            "http://localhost:8080",
            "https://stage-left.local",
            "HTTP://127.0.0.1:8080/",
            "http://[::1]:8080",
        ] {
            assert!(a.origin_ok(ok), "{ok}");
        }
        for bad in [
            "null",
            "http://evil.example",
            "file://",
            "ws://localhost",
            "http://localhost@evil.example",
            "http://localhost/path",
            "http://",
            "http://203.0.113.9",
        ] {
            assert!(!a.origin_ok(bad), "{bad}");
        }
        assert_eq!(a.check(Some("localhost"), None), Ok(()));
        assert_eq!(a.check(None, None), Err(Refusal::Host));
        assert_eq!(
            a.check(Some("localhost"), Some("http://evil.example")),
            Err(Refusal::Origin)
        );
    }

    #[test]
    fn interface_addresses_pass() {
        let a = AllowedHosts::local_only();
        for ip in interface_addrs() {
            let h = match ip {
                IpAddr::V4(v4) => format!("{v4}:8080"),
                IpAddr::V6(v6) => format!("[{v6}]:8080"),
            };
            // link-local v6 addresses carry a scope in the kernel, not in a Host header
            assert!(a.host_ok(&h), "{h}");
        }
    }
}
