//! [`MirrorError`]: everything that can go wrong between bandsync and Redis, and the
//! mapping of the `redis` crate's errors onto it.
//!
//! No variant ever carries a password: the `redis` crate does not put connection
//! details in its errors, and [`super::RedisUrl`] redacts its own.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Everything that can go wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The `--redis` URL is malformed; the message names the part.
    #[error("bad Redis URL: {0}")]
    Url(String),
    /// TLS setup or handshake (certificate files, an untrusted server, a server that
    /// does not speak TLS).
    #[error("TLS Redis at {addr}: {msg}")]
    Tls { addr: String, msg: String },
    /// AUTH refused (wrong password or user), or a command refused for want of one.
    #[error("Redis at {addr}: authentication failed: {msg}")]
    Auth { addr: String, msg: String },
    /// The server did not answer `what` in time (slow, hung, or unreachable).
    #[error("Redis at {addr} did not answer {what} within {after:?}")]
    Timeout {
        addr: String,
        what: String,
        after: Duration,
    },
    /// The connection could not be made or was lost (refused, reset, closed).
    #[error("Redis at {addr}: {what}: {msg}")]
    Connection {
        addr: String,
        what: String,
        msg: String,
    },
    /// The `redis` client library refused or failed otherwise (its configuration, a
    /// protocol it does not support).
    #[error("Redis client for {addr}: {what}: {msg}")]
    Client {
        addr: String,
        what: String,
        msg: String,
    },
    /// The server sent something that is not RESP, or RESP of a shape the command
    /// never returns (a garbage reply).
    #[error("bad reply from Redis{} to {cmd}: {got}", at(addr))]
    BadReply {
        addr: String,
        cmd: String,
        got: String,
    },
    /// An error reply (`-ERR …`, `WRONGTYPE …`, …).
    #[error("Redis refused {cmd}: {msg}")]
    Server { cmd: String, msg: String },
    /// The room's hash in Redis holds something that is not a valid record.
    #[error("bad record in Redis at {key}: {msg}")]
    BadRecord { key: String, msg: String },
    /// A record this node was about to write is invalid (nothing was sent).
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// A usage entry this node was about to append is invalid (nothing was sent).
    #[error("invalid usage entry: {0}")]
    InvalidUsage(String),
}

/// ` at host:port`, or nothing when the address is unknown (empty).
fn at(addr: &str) -> String {
    if addr.is_empty() {
        String::new()
    } else {
        format!(" at {addr}")
    }
}

impl MirrorError {
    /// A timeout (the server is slow or gone).
    pub fn is_timeout(&self) -> bool {
        matches!(self, MirrorError::Timeout { .. })
    }

    /// The server said something that is not a valid or expected reply.
    pub fn is_bad_reply(&self) -> bool {
        matches!(
            self,
            MirrorError::BadReply { .. } | MirrorError::BadRecord { .. }
        )
    }

    /// The server answered with an error reply on a working connection.
    pub fn is_server_reply(&self) -> bool {
        matches!(self, MirrorError::Server { .. })
    }

    pub(crate) fn bad_reply(addr: &str, cmd: &str, got: String) -> MirrorError {
        MirrorError::BadReply {
            addr: addr.to_string(),
            cmd: cmd.to_string(),
            got,
        }
    }

    /// Map an error of the `redis` crate for command `cmd` sent to `addr`.
    pub(crate) fn from_redis(
        e: RedisError,
        addr: &str,
        cmd: &str,
        timeout: Duration,
    ) -> MirrorError {
        let addr = addr.to_string();
        if let Some(tls) = tls_cause(&e) {
            return MirrorError::Tls { addr, msg: tls };
        }
        if e.is_timeout() {
            return MirrorError::Timeout {
                addr,
                what: cmd.to_string(),
                after: timeout,
            };
        }
        let msg = clip(&e.to_string());
        match e.kind() {
            ErrorKind::AuthenticationFailed => MirrorError::Auth { addr, msg },
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => MirrorError::BadReply {
                addr,
                cmd: cmd.to_string(),
                got: msg,
            },
            ErrorKind::Io => MirrorError::Connection {
                addr,
                what: cmd.to_string(),
                msg,
            },
            ErrorKind::Server(ServerErrorKind::NoPerm) => MirrorError::Auth { addr, msg },
            ErrorKind::Server(_) | ErrorKind::Extension => {
                // NOAUTH / WRONGPASS come back as plain error replies (and a NOAUTH
                // to the SELECT at connect as a response error with its text).
                if matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
                    || e.detail()
                        .is_some_and(|d| d.starts_with("Authentication required"))
                {
                    MirrorError::Auth { addr, msg }
                } else {
                    MirrorError::Server {
                        cmd: cmd.to_string(),
                        msg,
                    }
                }
            }
            _ => MirrorError::Client {
                addr,
                what: cmd.to_string(),
                msg,
            },
        }
    }
}

/// The TLS error somewhere in `e`'s source chain, if any. (The `redis` crate keeps an
/// I/O error as an `Arc<dyn Error>`, whose own `source` skips it: look inside.)
fn tls_cause(e: &RedisError) -> Option<String> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    for _ in 0..16 {
        let err = cur?;
        let err: &(dyn std::error::Error + 'static) = match err.downcast_ref::<Shared>() {
            Some(inner) => inner.as_ref(),
            None => err,
        };
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(clip(&t.to_string()));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(clip(&t.to_string()));
            }
        }
        cur = err.source();
    }
    None
}

/// At most 200 characters of an error text on one line (whitespace runs become one
/// space, other control characters are escaped).
pub(crate) fn clip(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    for c in one_line.chars().take(200) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if one_line.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// Show untrusted bytes safely: escaped, at most 64 bytes.
pub(crate) fn show(b: &[u8]) -> String {
    let mut s = b[..b.len().min(64)].escape_ascii().to_string();
    if b.len() > 64 {
        s.push('…');
    }
    s
}

/// A short, escaped description of a reply, for error messages.
pub fn describe(v: &redis::Value) -> String {
    use redis::Value as V;
    match v {
        V::Nil => "nil".into(),
        V::Int(i) => format!("integer {i}"),
        V::BulkString(b) => format!("bulk `{}`", show(b)),
        V::Array(a) => format!("array of {}", a.len()),
        V::SimpleString(s) => format!("status `{}`", show(s.as_bytes())),
        V::Okay => "status `OK`".into(),
        V::Map(m) => format!("map of {}", m.len()),
        V::Attribute { .. } => "an attribute".into(),
        V::Set(s) => format!("set of {}", s.len()),
        V::Double(d) => format!("double {d}"),
        V::Boolean(b) => format!("boolean {b}"),
        V::VerbatimString { text, .. } => format!("verbatim `{}`", show(text.as_bytes())),
        V::BigNumber(_) => "a big number".into(),
        V::Push { .. } => "a push message".into(),
        V::ServerError(e) => format!("error `{}`", show(e.to_string().as_bytes())),
        #[allow(unreachable_patterns)]
        _ => "an unknown reply".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn classifies_the_crate_errors() {
        let io = |k| RedisError::from(std::io::Error::new(k, "boom"));
        assert!(
            MirrorError::from_redis(io(std::io::ErrorKind::TimedOut), "h:1", "PING", T)
                .is_timeout()
        );
        assert!(matches!(
            MirrorError::from_redis(io(std::io::ErrorKind::ConnectionRefused), "h:1", "PING", T),
            MirrorError::Connection { .. }
        ));
        let tls = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let e = MirrorError::from_redis(tls, "h:1", "PING", T);
        assert!(matches!(e, MirrorError::Tls { .. }), "{e}");
        let auth = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(matches!(
            MirrorError::from_redis(auth, "h:1", "PING", T),
            MirrorError::Auth { .. }
        ));
        let parse = RedisError::from((ErrorKind::Parse, "garbage"));
        assert!(MirrorError::from_redis(parse, "h:1", "PING", T).is_bad_reply());
        let noauth =
            redis::make_extension_error("NOAUTH".into(), Some("Authentication required.".into()));
        let e = MirrorError::from_redis(noauth, "h:1", "HGETALL", T);
        assert!(
            matches!(e, MirrorError::Auth { .. }) && e.to_string().contains("NOAUTH"),
            "{e}"
        );
        let other = redis::make_extension_error("WEIRD".into(), Some("thing".into()));
        assert!(MirrorError::from_redis(other, "h:1", "X", T).is_server_reply());
    }

    #[test]
    fn describe_escapes_and_clips() {
        let d = describe(&redis::Value::BulkString(vec![0, b'\n', b'a']));
        assert_eq!(d, "bulk `\\x00\\na`");
        let long = describe(&redis::Value::SimpleString("x".repeat(500)));
        assert!(long.len() < 100 && long.ends_with("…`"), "{long}");
        assert!(clip(&"é".repeat(300)).ends_with('…'));
    }
}
