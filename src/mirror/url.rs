//! [`RedisUrl`]: the validated `--redis` URL, and the `redis` crate client built from it.
//!
//! The `url` crate does the RFC 3986 parsing and percent-encoding; this module only
//! checks what Redis needs and says which part is wrong. `rediss://` URLs take
//! `cacert=PATH` (trust these roots instead of the system's), `cert=PATH` and
//! `key=PATH` (a client certificate, both or neither). The password is never shown:
//! `Display` and `Debug` redact it and no error message quotes the user-info part.

use std::fmt;
use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use super::error::{show, MirrorError};

/// A parsed `redis://[user:pass@]host[:port][/db]` or `rediss://…?cacert=PATH` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    tls: bool,
    host: String,
    port: u16,
    db: u32,
    username: Option<String>,
    password: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
}

const DEFAULT_PORT: u16 = 6379;

impl RedisUrl {
    pub fn parse(s: &str) -> Result<RedisUrl, MirrorError> {
        let bad = |m: String| MirrorError::Url(m);
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace or control characters".into()));
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad(
                "missing scheme: expected redis://[user:pass@]host:port/db or rediss://…".into(),
            ));
        };
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "redis" => false,
            "rediss" => true,
            other => {
                // Only echo a scheme that looks like one (it could be a mangled secret).
                let shown = if other.len() <= 16
                    && other
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                {
                    format!("`{other}://`")
                } else {
                    "the scheme".into()
                };
                return Err(bad(format!(
                    "{shown} is not supported: use redis:// or rediss://"
                )));
            }
        };
        // What may be quoted in an error: the text after the last '@' (a password, even
        // one holding '@', always comes before it).
        let public = rest.rsplit('@').next().unwrap_or_default();
        let authority = public.split(['/', '?', '#']).next().unwrap_or_default();
        if !authority.starts_with('[') && authority.matches(':').count() > 1 {
            return Err(bad(
                "an IPv6 host must be in brackets: redis://[::1]:6379".into()
            ));
        }
        let u =
            url::Url::parse(s).map_err(|e| bad(format!("{e} in `{}`", show(public.as_bytes()))))?;

        let host = match u.host() {
            None => return Err(bad("missing host".into())),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(url::Host::Domain(d)) => {
                if d.is_empty() {
                    return Err(bad("missing host".into()));
                }
                if d.len() > 253
                    || !d
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(bad(format!(
                        "host `{}` is not a host name or IP address",
                        show(d.as_bytes())
                    )));
                }
                d.to_string()
            }
        };
        if host == "0.0.0.0" || host == "::" {
            return Err(bad(format!(
                "host `{host}` is a wildcard address, not a server"
            )));
        }
        let port = match u.port() {
            None => DEFAULT_PORT,
            Some(0) => return Err(bad("port `0` is not a number 1–65535".into())),
            Some(p) => p,
        };
        let db = match u.path().strip_prefix('/').unwrap_or(u.path()) {
            "" => 0,
            p => match p.parse::<u32>() {
                Ok(n) if p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(bad(format!(
                        "database `/{}` is not a number (expected /0, /1, …)",
                        show(p.as_bytes())
                    )))
                }
            },
        };
        let decode = |what: &str, raw: &str| {
            percent_decode_str(raw)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad(format!("the {what} is not UTF-8 after percent-decoding")))
        };
        let username = match u.username() {
            "" => None,
            raw => Some(decode("user name", raw)?),
        };
        let password = match u.password() {
            None | Some("") => None,
            Some(raw) => Some(decode("password", raw)?),
        };
        if username.is_some() && password.is_none() {
            return Err(bad(
                "a user name needs a password: user:password@host (or :password@host)".into(),
            ));
        }
        if u.fragment().is_some() {
            return Err(bad("a fragment (#…) is not allowed".into()));
        }
        let mut url = RedisUrl {
            tls,
            host,
            port,
            db,
            username,
            password,
            ca_file: None,
            client_cert: None,
        };
        let (mut cert, mut key) = (None, None);
        for kv in u
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let slot = match k {
                "cacert" => &mut url.ca_file,
                "cert" => &mut cert,
                "key" => &mut key,
                _ => {
                    return Err(bad(format!(
                        "unknown query parameter `{}` (known: cacert, cert, key)",
                        show(k.as_bytes())
                    )))
                }
            };
            if !tls {
                return Err(bad(format!("`{k}=` is only meaningful for rediss:// URLs")));
            }
            let v = decode(&format!("value of `{k}=`"), v)?;
            if v.is_empty() {
                return Err(bad(format!("`{k}=` needs a file path")));
            }
            *slot = Some(PathBuf::from(v));
        }
        url.client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(bad(
                    "a client certificate needs both `cert=` and `key=`".into()
                ))
            }
        };
        Ok(url)
    }

    pub fn tls(&self) -> bool {
        self.tls
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn db(&self) -> u32 {
        self.db
    }
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }
    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        self.client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()))
    }
    /// Trust the certificates of this PEM file instead of the system's (TLS only).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> RedisUrl {
        self.ca_file = Some(path.into());
        self
    }

    /// `host:port` (IPv6 in brackets), for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `redis` crate client for this URL. Reads the TLS files named by the URL
    /// (an unreadable or empty one is an error naming it); connects to nothing.
    pub fn client(&self) -> Result<redis::Client, MirrorError> {
        let mut settings = RedisConnectionInfo::default()
            .set_db(self.db as i64)
            // No CLIENT SETINFO at connect: a connection carries only our commands.
            .set_skip_set_lib_name();
        if let Some(pw) = &self.password {
            settings = settings.set_password(pw);
            if let Some(u) = &self.username {
                settings = settings.set_username(u);
            }
        }
        let addr = if self.tls {
            ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(self.host.clone(), self.port)
        };
        let tls_err = |msg: String| MirrorError::Tls {
            addr: self.addr(),
            msg,
        };
        let info = addr
            .into_connection_info()
            .map_err(|e| MirrorError::Url(e.to_string()))?
            .set_redis_settings(settings);
        if !self.tls {
            return redis::Client::open(info).map_err(|e| MirrorError::Url(e.to_string()));
        }
        // The redis crate builds its rustls config with the process default provider;
        // make it ring (the only one compiled in) before it asks.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root_cert = match &self.ca_file {
            Some(p) => Some(read_pem(p, "CA certificate", true).map_err(tls_err)?),
            None => None,
        };
        let client_tls = match &self.client_cert {
            Some((c, k)) => Some(redis::ClientTlsConfig {
                client_cert: read_pem(c, "client certificate", true).map_err(tls_err)?,
                client_key: read_pem(k, "client key", false).map_err(tls_err)?,
            }),
            None => None,
        };
        redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(|e| tls_err(e.to_string()))
    }
}

/// A PEM file's bytes; `certs`: it must hold at least one certificate.
fn read_pem(path: &Path, what: &str, certs: bool) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?;
    let ok = if certs {
        rustls::pki_types::CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .is_ok_and(|v| !v.is_empty())
    } else {
        rustls::pki_types::PrivateKeyDer::from_pem_slice(&bytes).is_ok()
    };
    if !ok {
        return Err(format!("no PEM {what} in {}", path.display()));
    }
    Ok(bytes)
}

/// Shows the URL with the password replaced by `***`.
impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", if self.tls { "rediss" } else { "redis" })?;
        if self.password.is_some() {
            write!(f, "{}:***@", self.username.as_deref().unwrap_or(""))?;
        }
        write!(f, "{}/{}", self.addr(), self.db)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn url_forms() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(
            (
                u.tls(),
                u.host(),
                u.port(),
                u.db(),
                u.username(),
                u.has_password()
            ),
            (false, "127.0.0.1", 6380, 2, None, false)
        );
        let u = RedisUrl::parse("redis://localhost").unwrap();
        assert_eq!((u.port(), u.db()), (6379, 0));
        let u = RedisUrl::parse("REDIS://h:1/").unwrap();
        assert_eq!((u.host(), u.port(), u.db()), ("h", 1, 0));
        let u = RedisUrl::parse("redis://alice:s%40cr%2Ft@h:7/0").unwrap();
        assert_eq!(u.username(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s@cr/t"));
        let u = RedisUrl::parse("redis://:p%40ss%2Fw%3Frd%23@h").unwrap();
        assert_eq!(
            (u.username(), u.password.as_deref(), u.host()),
            (None, Some("p@ss/w?rd#"), "h")
        );
        let u = RedisUrl::parse("rediss://[::1]:6390/1?cacert=/tmp/ca.pem").unwrap();
        assert_eq!(
            (u.tls(), u.host(), u.port(), u.db()),
            (true, "::1", 6390, 1)
        );
        assert_eq!(u.ca_file(), Some(Path::new("/tmp/ca.pem")));
        assert_eq!(u.to_string(), "rediss://[::1]:6390/1");
        let u = RedisUrl::parse("rediss://h?cert=/c.pem&key=/k%20x.pem").unwrap();
        assert_eq!(
            u.client_cert(),
            Some((Path::new("/c.pem"), Path::new("/k x.pem")))
        );
    }

    #[test]
    fn url_errors_name_the_part_and_hide_the_password() {
        let secret = "Hunter2Secret";
        let bad = [
            ("http://h", "`http://`"),
            ("h:6379", "missing scheme"),
            ("redis://", "host"),
            ("redis://h:0", "port `0`"),
            ("redis://h:99999", "invalid port number in `h:99999`"),
            ("redis://h:abc", "invalid port number in `h:abc`"),
            ("redis://h/x", "database `/x`"),
            ("redis://h/1/2", "database `/1/2`"),
            ("redis://::1", "brackets"),
            ("redis://[zz]:1", "invalid IPv6 address in `[zz]:1`"),
            ("redis://0.0.0.0", "wildcard"),
            ("redis://h?cacert=/x", "only meaningful for rediss"),
            ("rediss://h?foo=1", "unknown query parameter `foo`"),
            ("rediss://h?cacert=", "needs a file path"),
            ("rediss://h?cert=/x", "both"),
            ("redis://h#frag", "fragment"),
            ("redis://h o", "whitespace"),
            ("redis://user@h", "needs a password"),
            ("redis://u:%ff@h", "password is not UTF-8"),
            ("redis://h_!:1", "host `h_!`"),
        ];
        for (s, want) in bad {
            let e = RedisUrl::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        for s in [
            format!("redis://u:{secret}@"),
            format!("redis://u:{secret}@h:bad"),
            format!("redis://u:{secret}/x@h:1/x"),
            format!("redis://u:{secret}@h/x"),
            format!("redis://u:{secret}@[zz]"),
            format!("{secret}://h"),
            format!("redis:/u:{secret}@h"),
            format!("redis://{secret}@h"),
            format!("redis://u:{secret}@h?x=1"),
        ] {
            let e = RedisUrl::parse(&s).unwrap_err().to_string();
            assert!(!e.contains(secret), "{s}: {e}");
        }
        let u = RedisUrl::parse(&format!("redis://bob:{secret}@h:1/3")).unwrap();
        assert_eq!(u.to_string(), "redis://bob:***@h:1/3");
        assert!(!format!("{u:?}").contains(secret));
    }

    #[test]
    fn tls_files_are_checked_when_the_client_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let u = RedisUrl::parse(&format!("rediss://h?cacert={}", empty.display())).unwrap();
        let e = u.client().unwrap_err().to_string();
        assert!(
            e.contains("no PEM CA certificate") && e.contains("empty.pem"),
            "{e}"
        );
        let u = RedisUrl::parse("rediss://h?cacert=/nonexistent/ca.pem").unwrap();
        let e = u.client().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        // Plain and system-rooted clients build without touching the network.
        RedisUrl::parse("redis://:pw@h:1/2")
            .unwrap()
            .client()
            .unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn parse_never_panics(s in "(redis|rediss|http)?(://)?[a-z0-9:@%/?#=&.\\[\\]_-]{0,40}") {
            if let Ok(u) = RedisUrl::parse(&s) {
                // What parses shows without its password and parses back the same.
                let shown = u.to_string();
                prop_assert!(!u.has_password() || shown.contains("***"));
                if !u.has_password() && u.ca_file().is_none() && u.client_cert().is_none() {
                    prop_assert_eq!(RedisUrl::parse(&shown).unwrap(), u);
                }
            }
        }
    }
}
