//! mDNS advertisements from the network, validated field by field (pure: the mDNS
//! driver in `net::discovery` hands the TXT records and resolved addresses in).
//!
//! | TXT key | value |
//! |---|---|
//! | `v` | protocol version ([`crate::core::wire::PROTOCOL_VERSION`]) |
//! | `id` | node id, 16 lowercase hex characters |
//! | `name` | the node's human name |
//! | `room` | the room name's hash (never the room key) |
//! | `port` | the QUIC port |

use crate::core::id::is_node_id;
use ::core::net::{IpAddr, SocketAddr, SocketAddrV6};

/// TXT records by key: the value of `key`, or `None` when absent or without a value.
pub trait Txt {
    fn get(&self, key: &str) -> Option<&[u8]>;
}

impl Txt for [(&str, &str)] {
    fn get(&self, key: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_bytes())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: String,
    pub name: String,
    /// QUIC addresses: resolved IPs + the advertised QUIC port; IPv4 first, sorted.
    pub addrs: Vec<SocketAddr>,
    pub proto: u16,
}

/// Why an advertisement from the network was ignored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    #[error("TXT `{0}` is missing")]
    Missing(&'static str),
    #[error("TXT `{key}` = {value:?} is invalid")]
    Invalid { key: &'static str, value: String },
    #[error("room hash {0:?} is another room's")]
    OtherRoom(String),
    #[error("no usable address")]
    NoAddress,
}

/// A TXT value as text, or why not.
fn txt<'a>(props: &'a impl Txt, key: &'static str) -> Result<&'a str, AdvertError> {
    let val = props.get(key).ok_or(AdvertError::Missing(key))?;
    std::str::from_utf8(val).map_err(|_| AdvertError::Invalid {
        key,
        value: String::from_utf8_lossy(val).into_owned(),
    })
}

/// A decimal number in 1..=u16::MAX, digits only (no sign, no spaces).
fn txt_u16(props: &impl Txt, key: &'static str) -> Result<u16, AdvertError> {
    let s = txt(props, key)?;
    let bad = || AdvertError::Invalid {
        key,
        value: s.to_string(),
    };
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad()),
    }
}

/// Validate the TXT fields of an advertisement and build the peer it describes.
/// `ips` are the resolved addresses with their interface scope (the driver keeps only unicast addresses of its interfaces).
pub fn parse_advert(
    props: &impl Txt,
    room_hash: &str,
    ips: &[(IpAddr, u32)],
) -> Result<PeerInfo, AdvertError> {
    let proto = txt_u16(props, "v")?;
    let id = txt(props, "id")?;
    if !is_node_id(id) {
        return Err(AdvertError::Invalid {
            key: "id",
            value: id.to_string(),
        });
    }
    let name = txt(props, "name")?;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(AdvertError::Invalid {
            key: "name",
            value: name.to_string(),
        });
    }
    let room = txt(props, "room")?;
    if room != room_hash {
        return Err(AdvertError::OtherRoom(room.to_string()));
    }
    let port = txt_u16(props, "port")?;
    let mut addrs: Vec<SocketAddr> = ips
        .iter()
        .map(|&(ip, scope)| match ip {
            IpAddr::V4(_) => SocketAddr::new(ip, port),
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scope)),
        })
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    if addrs.is_empty() {
        return Err(AdvertError::NoAddress);
    }
    Ok(PeerInfo {
        node_id: id.to_string(),
        name: name.to_string(),
        addrs,
        proto,
    })
}
