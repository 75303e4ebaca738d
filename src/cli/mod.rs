//! The stage tech's CLI: finds a node of the room (mDNS, or `--node HOST:PORT`),
//! authenticates with the room key over QUIC exactly like a node (but never joins the
//! room), asks one [`Query`] and prints the [`Reply`].

use crate::net::auth::{self, RoomKey};
use crate::core::room::Status;
use crate::core::wire::{Frame, Hello, Query, Reply};
use anyhow::{anyhow, bail, Context};
use std::net::SocketAddr;
use std::time::Duration;

/// How the CLI reaches the room.
pub struct Target {
    pub node: Option<String>,
    pub room: String,
    pub interfaces: Vec<String>,
    pub key: RoomKey,
}

/// Why a request failed, in words a stage tech can act on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no bandsync node of room {0:?} found on the network (is a box running? try --node HOST:PORT)")]
    NoRoom(String),
    #[error("wrong room key: the node at {addr} refused this key ({reason}); check --room-key-file or BANDSYNC_ROOM_KEY")]
    WrongKey { addr: SocketAddr, reason: String },
    #[error("cannot reach the node at {addr}: {why}")]
    Unreachable { addr: SocketAddr, why: String },
}

async fn resolve(target: &Target) -> anyhow::Result<Vec<SocketAddr>> {
    if let Some(n) = &target.node {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(n.as_str())
            .await
            .with_context(|| format!("--node {n:?} is not a reachable HOST:PORT"))?
            .collect();
        if addrs.is_empty() {
            bail!("--node {n:?} resolves to no address");
        }
        return Ok(addrs);
    }
    let found = crate::net::discovery::browse_once(
        &target.room,
        &target.interfaces,
        Duration::from_millis(2500),
    )
    .await?;
    let mut addrs: Vec<SocketAddr> = found.into_iter().flat_map(|p| p.addrs).collect();
    addrs.sort_by_key(|a| (!a.is_ipv4(), *a));
    if addrs.is_empty() {
        return Err(CliError::NoRoom(target.room.clone()).into());
    }
    Ok(addrs)
}

/// Send one query to the first node that answers.
pub async fn request(target: &Target, q: Query) -> anyhow::Result<Reply> {
    auth::install_crypto();
    let addrs = resolve(target).await?;
    let mut last: Option<anyhow::Error> = None;
    for addr in addrs {
        match ask(target, addr, q.clone()).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                if e.downcast_ref::<CliError>()
                    .is_some_and(|c| matches!(c, CliError::WrongKey { .. }))
                {
                    return Err(e);
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no node answered")))
}

async fn ask(target: &Target, addr: SocketAddr, q: Query) -> anyhow::Result<Reply> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut ep = quinn::Endpoint::client(bind).context("creating a QUIC client endpoint")?;
    ep.set_default_client_config(auth::client_config()?);
    let unreachable = |why: String| CliError::Unreachable { addr, why };
    let conn = tokio::time::timeout(
        Duration::from_secs(3),
        ep.connect(addr, "bandsync")
            .map_err(|e| unreachable(e.to_string()))?,
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let me = crate::sys::state::random_id()?;
    let ekm = auth::exporter(&conn)?;
    let hello = Frame::Hello(Hello {
        node: me.clone(),
        name: "cli".into(),
        room: crate::net::discovery::room_hash(&target.room),
        priority: 0,
        cli: true,
        mac: target.key.mac("c", &ekm, &me),
    });
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    send.write_all(&hello.encode())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let refused = |conn: &quinn::Connection| -> Option<anyhow::Error> {
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
    };
    let first =
        match tokio::time::timeout(Duration::from_secs(3), crate::net::frames::read_frame(&mut recv)).await {
            Ok(Ok(Some(f))) => f,
            Ok(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(refused(&conn)
                    .unwrap_or_else(|| anyhow!("the node at {addr} ended the conversation")));
            }
            Err(_) => return Err(unreachable("no answer to the handshake".into()).into()),
        };
    let Frame::Hello(theirs) = first else {
        bail!("the node at {addr} did not answer with Hello")
    };
    if !target.key.verify("s", &ekm, &theirs.node, &theirs.mac) {
        conn.close(0x10u32.into(), b"node does not hold this room's key");
        return Err(CliError::WrongKey {
            addr,
            reason: "its proof does not match our key".into(),
        }
        .into());
    }
    send.write_all(&Frame::Query(q).encode())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let reply =
        match tokio::time::timeout(Duration::from_secs(5), crate::net::frames::read_frame(&mut recv)).await {
            Ok(Ok(Some(Frame::Reply(r)))) => r,
            Ok(Ok(Some(_))) => bail!("the node at {addr} sent something other than a reply"),
            Ok(Ok(None)) => {
                return Err(refused(&conn)
                    .unwrap_or_else(|| anyhow!("the node at {addr} closed without replying")))
            }
            Ok(Err(e)) => bail!("bad reply from {addr}: {e}"),
            Err(_) => bail!("the node at {addr} did not reply in time"),
        };
    let _ = send.finish();
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    Ok(reply)
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
        (Some(p), _) => out.push_str(&format!("control  PIN {p} (phones need it to change anything)\n")),
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
