//! Room-key authentication and the node's TLS identity.
//!
//! TLS (rustls, self-signed certificates from rcgen) gives each QUIC connection
//! confidentiality but says nothing about who may join. Membership is proven with the
//! room key, bound to the TLS session so that a proof can be neither replayed nor
//! relayed by a man in the middle:
//!
//! ```text
//! ekm = TLS-Exporter("EXPORTER-bandsync-room-auth", context = "", 32 bytes)
//! mac = HMAC-SHA256(room_key, "bandsync/1" ‖ role ‖ ekm ‖ node_id)      role = "c" | "s"
//! ```
//!
//! Each side sends its `mac` in its first frame ([`crate::core::wire::Hello`]) and checks
//! the other's before accepting anything else. Certificates are not verified (there
//! is no PKI in a rehearsal room); the exporter binding is what makes a relay fail.

use anyhow::{anyhow, bail, Context};
use ring::hmac;
use std::path::Path;
use std::sync::Arc;

const EKM_LABEL: &[u8] = b"EXPORTER-bandsync-room-auth";
/// ALPN of the peer protocol.
pub const ALPN: &[u8] = b"bandsync/1";

/// The shared secret of a room.
#[derive(Clone)]
pub struct RoomKey(Vec<u8>);

impl std::fmt::Debug for RoomKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomKey(…)")
    }
}

impl RoomKey {
    /// Parse a key file's content: 64 hex characters (what `bandsync room-key` prints)
    /// or any other text of at least 16 characters, used as is.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<RoomKey> {
        let t = text.trim();
        if t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Ok(RoomKey(hex::decode(t).expect("checked hex")));
        }
        if t.len() < 16 {
            bail!("room key in {origin} is too short: use at least 16 characters (or `bandsync room-key` to make one)");
        }
        Ok(RoomKey(t.as_bytes().to_vec()))
    }

    pub fn generate() -> anyhow::Result<RoomKey> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| anyhow!("no randomness: {e}"))?;
        Ok(RoomKey(k.to_vec()))
    }

    /// Load from `file` if given, else from `<state>/room-key`, generating it there on
    /// first start.
    pub fn load(file: Option<&Path>, state_dir: &Path) -> anyhow::Result<RoomKey> {
        if let Some(p) = file {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read room key file {}", p.display()))?;
            return RoomKey::parse(&t, &p.display().to_string());
        }
        if let Ok(k) = std::env::var("BANDSYNC_ROOM_KEY") {
            if !k.trim().is_empty() {
                return RoomKey::parse(&k, "BANDSYNC_ROOM_KEY");
            }
        }
        let p = state_dir.join("room-key");
        match std::fs::read_to_string(&p) {
            Ok(t) => RoomKey::parse(&t, &p.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = RoomKey::generate()?;
                crate::sys::state::write_secret(&p, format!("{}\n", k.to_hex()).as_bytes())?;
                tracing::info!(path = %p.display(), "generated a new room key (print it with `bandsync room-key`)");
                Ok(k)
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    pub fn to_hex(&self) -> String {
        if self.0.len() == 32 {
            hex::encode(&self.0)
        } else {
            String::from_utf8_lossy(&self.0).into_owned()
        }
    }

    /// The proof for `role` ("c" client / "s" server) and `node_id` over `ekm`.
    pub fn mac(&self, role: &str, ekm: &[u8; 32], node_id: &str) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"bandsync/1");
        ctx.update(role.as_bytes());
        ctx.update(ekm);
        ctx.update(node_id.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Constant-time check of a peer's proof.
    pub fn verify(&self, role: &str, ekm: &[u8; 32], node_id: &str, mac: &[u8; 32]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let mut msg = Vec::with_capacity(80);
        msg.extend_from_slice(b"bandsync/1");
        msg.extend_from_slice(role.as_bytes());
        msg.extend_from_slice(ekm);
        msg.extend_from_slice(node_id.as_bytes());
        hmac::verify(&key, &msg, mac).is_ok()
    }
}

/// Keying material of this connection's TLS session.
pub fn exporter(conn: &quinn::Connection) -> anyhow::Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")
        .map_err(|_| anyhow!("TLS exporter unavailable"))?;
    Ok(out)
}

/// Install rustls' ring provider once per process.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The node's certificate and key, generated once and kept in the state dir.
pub fn load_identity(
    state_dir: &Path,
) -> anyhow::Result<(
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let cp = state_dir.join("cert.der");
    let kp = state_dir.join("key.der");
    if let (Ok(c), Ok(k)) = (std::fs::read(&cp), std::fs::read(&kp)) {
        if !c.is_empty() && !k.is_empty() {
            return Ok((
                rustls::pki_types::CertificateDer::from(c),
                rustls::pki_types::PrivateKeyDer::Pkcs8(
                    rustls::pki_types::PrivatePkcs8KeyDer::from(k),
                ),
            ));
        }
    }
    new_identity(state_dir)
}

/// Make (and keep, the key 0600) a fresh certificate: on first start, or when the
/// kept one is unusable (a corrupt file is replaced with a warning, never a restart loop).
pub fn new_identity(
    state_dir: &Path,
) -> anyhow::Result<(
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let cp = state_dir.join("cert.der");
    let kp = state_dir.join("key.der");
    let cert = rcgen::generate_simple_self_signed(vec!["bandsync".to_string()])
        .context("generating the node certificate")?;
    let c = cert.cert.der().to_vec();
    let k = cert.signing_key.serialize_der();
    crate::sys::state::write_secret(&kp, &k)?;
    crate::sys::state::write_atomic(&cp, &c)?;
    Ok((
        rustls::pki_types::CertificateDer::from(c),
        rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(k)),
    ))
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(3))
            .expect("3 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(std::time::Duration::from_millis(500)));
    t.datagram_receive_buffer_size(Some(64 * 1024));
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Small windows: frames are ≤ 16 KiB and a room exchanges little, so a stranger
    // (before its proof) or a peer can never make us buffer more than this.
    t.stream_receive_window(quinn::VarInt::from_u32(64 * 1024));
    t.receive_window(quinn::VarInt::from_u32(256 * 1024));
    t.send_window(256 * 1024);
    t
}

pub fn server_config(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(qc));
    sc.transport_config(Arc::new(transport()));
    Ok(sc)
}

pub fn client_config() -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert::new()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cc = quinn::ClientConfig::new(Arc::new(qc));
    cc.transport_config(Arc::new(transport()));
    Ok(cc)
}

/// Accepts any server certificate: membership is proven by the room key, bound to the
/// session by the exporter (see the module docs). Signatures are still checked so the
/// handshake itself is sound.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl AnyCert {
    fn new() -> AnyCert {
        AnyCert(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_key_role_session_and_node() {
        let k = RoomKey::parse(&"ab".repeat(32), "t").unwrap();
        let other = RoomKey::parse("another-key-of-the-room", "t").unwrap();
        let ekm = [7u8; 32];
        let m = k.mac("c", &ekm, "0123456789abcdef");
        assert!(k.verify("c", &ekm, "0123456789abcdef", &m));
        assert!(
            !k.verify("s", &ekm, "0123456789abcdef", &m),
            "role is bound"
        );
        assert!(
            !k.verify("c", &[8u8; 32], "0123456789abcdef", &m),
            "session is bound"
        );
        assert!(
            !k.verify("c", &ekm, "fedcba9876543210", &m),
            "node is bound"
        );
        assert!(
            !other.verify("c", &ekm, "0123456789abcdef", &m),
            "key is bound"
        );
        assert!(RoomKey::parse("short", "f")
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }
}
