//! HTTPS for phones: the box's own certificate, and the rustls server config.
//!
//! A phone page needs a secure origin for the screen wake lock and the microphone
//! (talkback), and a rehearsal room has no Internet and no public name: the box makes
//! its own certificate (rcgen, ECDSA P-256), naming `<name>.local`, the hostname (and
//! its `.local`), `localhost` and every IPv4 interface address, valid for 800 days (under
//! the 825 days iOS accepts for a server certificate). It is kept in the state dir
//! (`https-cert.der`, `https-key.der` 0600, and `https-names`: the names it was made
//! for). A new one is made, with a warning, when the names or addresses change, when
//! it expires within 30 days, or when a kept file is unusable (a corrupt file never
//! stops the box). A phone accepts it once ("this connection is not private" →
//! proceed); the HTTP page shows its SHA-256 fingerprint so the musician can check it
//! is the box's.

use crate::sys::state::{write_atomic, write_secret};
use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// Validity of a new certificate, days.
const VALID_DAYS: i64 = 800;
/// A certificate expiring within this many days is replaced.
const RENEW_DAYS: i64 = 30;

/// The box's HTTPS identity.
#[derive(Clone)]
pub struct HttpsIdentity {
    pub cert: CertificateDer<'static>,
    pub key: Arc<PrivateKeyDer<'static>>,
    /// SHA-256 of the certificate's DER, `AB:CD:…` (what browsers show).
    pub sha256: String,
    /// The names and addresses it names.
    pub names: Vec<String>,
}

/// What the certificate should name: `<name>.local`, the hostname (and its `.local`),
/// `localhost`, and the interface addresses (sorted, deduplicated).
pub fn wanted_names(box_name: &str) -> Vec<String> {
    let mut v = vec!["localhost".to_string()];
    let label = crate::net::discovery::dns_label(box_name);
    if !label.is_empty() {
        v.push(format!("{label}.local"));
    }
    if let Some(h) = crate::web::hosts::hostname() {
        let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
        if !h.is_empty() && h.len() <= 253 {
            let first = h.split('.').next().unwrap_or("").to_string();
            v.push(format!(
                "{}.local",
                crate::net::discovery::dns_label(&first)
            ));
            v.push(h);
        }
    }
    let mut ips: Vec<IpAddr> = crate::web::hosts::interface_addrs()
        .into_iter()
        // IPv4 and IPv6 loopback only: link-local v6 needs a zone a certificate cannot
        // name, and global v6 addresses rotate (privacy addresses, daily) — a new
        // certificate each time would make every phone accept it again. Phones reach
        // the box by <name>.local or its IPv4 address.
        .filter(|ip| ip.is_ipv4() || ip.is_loopback())
        .collect();
    ips.sort();
    ips.dedup();
    ips.truncate(32);
    v.extend(ips.iter().map(|ip| ip.to_string()));
    let mut seen = std::collections::BTreeSet::new();
    v.retain(|n| seen.insert(n.clone()));
    v
}

/// `AB:CD:…` of SHA-256(der).
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn unix_days(now: std::time::SystemTime) -> i64 {
    now.duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0)
}

/// Civil date (y, m, d) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

/// Load the kept certificate if it still fits `names`, else make (and keep) a new one.
pub fn load_or_make(state_dir: &Path, names: &[String]) -> anyhow::Result<HttpsIdentity> {
    let cp = state_dir.join("https-cert.der");
    let kp = state_dir.join("https-key.der");
    let np = state_dir.join("https-names");
    let today = unix_days(std::time::SystemTime::now());
    let want = format!("{}\n", names.join("\n"));
    let kept = (|| -> Result<HttpsIdentity, String> {
        let c = std::fs::read(&cp).map_err(|e| format!("cannot read {}: {e}", cp.display()))?;
        let k = std::fs::read(&kp).map_err(|e| format!("cannot read {}: {e}", kp.display()))?;
        let n = std::fs::read_to_string(&np)
            .map_err(|e| format!("cannot read {}: {e}", np.display()))?;
        let (names_line, until) = n.rsplit_once("until ").ok_or("no expiry recorded")?;
        let until: i64 = until
            .trim()
            .parse()
            .map_err(|_| "bad expiry recorded".to_string())?;
        if names_line != want {
            return Err("the box's names or addresses changed".into());
        }
        if until - today < RENEW_DAYS {
            return Err(format!("it expires in {} days", until - today));
        }
        let id = identity(c, k, names.to_vec());
        server_config(&id).map_err(|e| format!("unusable: {e:#}"))?;
        Ok(id)
    })();
    match kept {
        Ok(id) => return Ok(id),
        Err(why) if cp.exists() || kp.exists() => {
            tracing::warn!(reason = %why, "making a new HTTPS certificate: phones must accept it again");
        }
        Err(_) => tracing::info!("making the box's HTTPS certificate (first start)"),
    }
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).context("naming the HTTPS certificate")?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        names.get(1).cloned().unwrap_or_else(|| "bandsync".into()),
    );
    dn.push(rcgen::DnType::OrganizationName, "bandsync box");
    params.distinguished_name = dn;
    let (y, m, d) = civil(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + VALID_DAYS);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().context("generating the HTTPS key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the HTTPS certificate")?;
    let c = cert.der().to_vec();
    let k = key.serialize_der();
    write_secret(&kp, &k)?;
    write_atomic(&cp, &c)?;
    write_atomic(
        &np,
        format!("{want}until {}\n", today + VALID_DAYS).as_bytes(),
    )?;
    Ok(identity(c, k, names.to_vec()))
}

fn identity(c: Vec<u8>, k: Vec<u8>, names: Vec<String>) -> HttpsIdentity {
    HttpsIdentity {
        sha256: fingerprint(&c),
        cert: CertificateDer::from(c),
        key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k))),
        names,
    }
}

/// rustls server config (ring provider; HTTP/1.1 only: hyper's http1 server).
pub fn server_config(id: &HttpsIdentity) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("the HTTPS certificate and key do not make a TLS config")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(20_513), (2026, 3, 1));
    }

    #[test]
    fn kept_reused_changed_or_corrupt_replaced() {
        let d = tempfile::tempdir().unwrap();
        let names = vec![
            "localhost".to_string(),
            "box.local".into(),
            "127.0.0.1".into(),
        ];
        let a = load_or_make(d.path(), &names).unwrap();
        let b = load_or_make(d.path(), &names).unwrap();
        assert_eq!(a.sha256, b.sha256, "kept");
        let mut other = names.clone();
        other.push("10.0.0.9".into());
        let c = load_or_make(d.path(), &other).unwrap();
        assert_ne!(c.sha256, b.sha256, "new names, new certificate");
        std::fs::write(d.path().join("https-key.der"), b"garbage").unwrap();
        let e = load_or_make(d.path(), &other).unwrap();
        assert_ne!(e.sha256, c.sha256, "corrupt key replaced");
        server_config(&e).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join("https-key.der"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(e.sha256.len(), 32 * 3 - 1);
    }
}
