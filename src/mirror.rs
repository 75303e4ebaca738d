//! The optional upstream Redis mirror (SPEC §4 "Redis", issue 6).
//!
//! The current leader mirrors its room's session into Redis: a hash per room at
//! `bandsync:room:<room>` whose fields are the [`MirrorRecord`]'s fields as strings, and
//! the JSON record published on `bandsync:room:<room>:changes` whenever it changes.
//!
//! * **Fencing.** Every write goes through [`FENCE_SCRIPT`], a server-side Lua script that
//!   refuses a record whose `(epoch, version)` is lower than the stored one, so a deposed
//!   leader can never overwrite a newer state. The write, the fence and the publish are
//!   one atomic script call.
//! * **Never in the way.** [`run`] is a task of its own. The caller only does
//!   `tx.send_replace(..)` on a `watch` channel: only the latest record is kept (no queue),
//!   and nothing the task does (Redis down, slow, or talking garbage) reaches the caller.
//!   Every command has a timeout; failures are counted in [`MirrorStats`], logged at a
//!   bounded rate, and followed by a reconnect with capped exponential backoff
//!   (100 ms .. 4 s, so that a returning Redis is current again within 5 s) and a
//!   resync of the current record.
//! * **Bad input** (SPEC §7). The RESP2 reader is total and bounded: any byte stream
//!   yields a value or a [`ProtocolError`], never a panic; bulk strings over 1 MiB,
//!   arrays over 10,000 elements, nesting deeper than 8 and replies over 2 MiB are refused.
//!   Records read back by [`fetch`] are validated field by field.
//! * **TLS** (`rediss://`) is rustls (ring) driven by hand over the tokio socket (no extra
//!   crate). Roots: `?cacert=PATH`, else `SSL_CERT_FILE`, else the system bundle; an
//!   optional client certificate with `?cert=PATH&key=PATH`.
//!
//! The password of a URL is never logged nor shown: `Debug` and `Display` of [`RedisUrl`]
//! redact it and no error message quotes the user-info part of a URL.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Largest bulk string accepted from Redis.
pub const MAX_BULK: usize = 1 << 20;
/// Largest array (element count) accepted from Redis.
pub const MAX_ARRAY: usize = 10_000;
/// Deepest nesting of arrays accepted from Redis.
pub const MAX_DEPTH: usize = 8;
/// Longest status / error / integer / length line accepted from Redis.
pub const MAX_LINE: usize = 64 * 1024;
/// Most bytes buffered for one reply.
pub const MAX_REPLY: usize = 2 << 20;
/// Default per-command timeout.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// The record the leader mirrors: one per room.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MirrorRecord {
    pub room: String,
    pub epoch: u64,
    pub version: u64,
    pub leader: String,
    pub tempo_mbpm: u32,
    pub meter: u8,
    pub playing: bool,
    pub pinned: Option<String>,
    pub updated_unix_ms: u64,
}

/// The names of the hash fields, in the order they are written.
pub const FIELDS: [&str; 9] = [
    "room",
    "epoch",
    "version",
    "leader",
    "tempo_mbpm",
    "meter",
    "playing",
    "pinned",
    "updated_unix_ms",
];

impl MirrorRecord {
    /// The hash fields, as strings. `pinned` is omitted when `None`.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("room", self.room.clone()),
            ("epoch", self.epoch.to_string()),
            ("version", self.version.to_string()),
            ("leader", self.leader.clone()),
            ("tempo_mbpm", self.tempo_mbpm.to_string()),
            ("meter", self.meter.to_string()),
            ("playing", self.playing.to_string()),
        ];
        if let Some(p) = &self.pinned {
            f.push(("pinned", p.clone()));
        }
        f.push(("updated_unix_ms", self.updated_unix_ms.to_string()));
        f
    }

    /// Check that the record is one bandsync can write and read back.
    pub fn validate(&self) -> Result<(), String> {
        check_room(&self.room)?;
        if !(crate::core::timeline::Tempo::MIN_MBPM..=crate::core::timeline::Tempo::MAX_MBPM)
            .contains(&self.tempo_mbpm)
        {
            return Err(format!(
                "tempo_mbpm {} is outside 20000..=400000",
                self.tempo_mbpm
            ));
        }
        if !(1..=16).contains(&self.meter) {
            return Err(format!("meter {} is outside 1..=16", self.meter));
        }
        check_text("leader", &self.leader)?;
        if let Some(p) = &self.pinned {
            check_text("pinned", p)?;
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch (for `updated_unix_ms`).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The hash key of a room.
pub fn room_key(room: &str) -> String {
    format!("bandsync:room:{room}")
}

/// The channel a room's changes are published on.
pub fn room_channel(room: &str) -> String {
    format!("bandsync:room:{room}:changes")
}

fn check_room(room: &str) -> Result<(), String> {
    if room.is_empty() || room.len() > 255 || room.chars().any(|c| c.is_control()) {
        return Err(format!(
            "room name {:?} is invalid: use 1–255 printable characters",
            clip(room)
        ));
    }
    Ok(())
}

fn check_text(what: &str, v: &str) -> Result<(), String> {
    if v.len() > 255 || v.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{what} {:?} is invalid: at most 255 printable characters",
            clip(v)
        ));
    }
    Ok(())
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Show untrusted bytes safely: escaped, at most 64 bytes.
fn show(b: &[u8]) -> String {
    let mut s = b[..b.len().min(64)].escape_ascii().to_string();
    if b.len() > 64 {
        s.push('…');
    }
    s
}

// ---------------------------------------------------------------------------------------
// Errors and stats

/// A malformed reply from a Redis server (or something that is not one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown RESP type byte 0x{0:02x}")]
    BadType(u8),
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("line not terminated by CRLF")]
    BadLine,
    #[error("bad length `{0}`")]
    BadLength(String),
    #[error("bad integer `{0}`")]
    BadInteger(String),
    #[error("bulk string of {0} bytes is over the {MAX_BULK}-byte limit")]
    BulkTooLarge(u64),
    #[error("array of {0} elements is over the {MAX_ARRAY}-element limit")]
    ArrayTooLarge(u64),
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("reply larger than {MAX_REPLY} bytes")]
    ReplyTooLarge,
}

/// Everything that can go wrong talking to Redis. No variant carries a password.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("bad Redis URL: {0}")]
    Url(String),
    #[error("TLS Redis: {0}")]
    Tls(String),
    #[error("Redis at {addr}: {what}: {source}")]
    Io {
        addr: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("Redis at {addr} did not answer {what} within {after:?}")]
    Timeout {
        addr: String,
        what: String,
        after: Duration,
    },
    #[error("Redis at {addr} closed the connection")]
    Closed { addr: String },
    #[error("bad reply from Redis at {addr}: {source}")]
    Protocol { addr: String, source: ProtocolError },
    #[error("unexpected reply from Redis to {cmd}: {got}")]
    UnexpectedReply { cmd: String, got: String },
    #[error("Redis refused {cmd}: {msg}")]
    Server { cmd: String, msg: String },
    #[error("Redis authentication failed: {0}")]
    Auth(String),
    #[error("bad record in Redis at {key}: {msg}")]
    BadRecord { key: String, msg: String },
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("the Redis connection is unusable after an earlier error")]
    Broken,
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
            MirrorError::Protocol { .. }
                | MirrorError::UnexpectedReply { .. }
                | MirrorError::BadRecord { .. }
        )
    }
    fn is_noscript(&self) -> bool {
        matches!(self, MirrorError::Server { msg, .. } if msg.starts_with("NOSCRIPT"))
    }
}

/// Counters of the mirror task, for /metrics.
///
/// `errors` counts every failed attempt (connect, command, timeout, bad reply, server
/// error); `timeouts` and `bad_replies` are the subsets of `errors` of those kinds.
/// `reconnects` counts connections established after the first one.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Records written (the script returned 1). Unchanged refreshes are not counted.
    pub writes: AtomicU64,
    /// Writes refused by the fence: the stored `(epoch, version)` is newer.
    pub fenced: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub bad_replies: AtomicU64,
    pub timeouts: AtomicU64,
    pub connected: AtomicBool,
}

/// A plain copy of [`MirrorStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct MirrorStatsSnapshot {
    pub writes: u64,
    pub fenced: u64,
    pub errors: u64,
    pub reconnects: u64,
    pub bad_replies: u64,
    pub timeouts: u64,
    pub connected: bool,
}

impl MirrorStats {
    pub fn snapshot(&self) -> MirrorStatsSnapshot {
        MirrorStatsSnapshot {
            writes: self.writes.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            bad_replies: self.bad_replies.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }

    fn count_error(&self, e: &MirrorError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if e.is_timeout() {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        if e.is_bad_reply() {
            self.bad_replies.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------
// URL

/// A parsed `redis://[user:pass@]host[:port][/db]` or `rediss://…` URL.
///
/// TLS URLs accept the query parameters `cacert=PATH` (trust these roots instead of the
/// system's), `cert=PATH` and `key=PATH` (a client certificate, both or neither).
/// Percent-escapes are decoded in the user, the password and the query values.
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
        // User info ends at the last '@' (a password may hold '/', '?', '#' or ':').
        let (userinfo, rest) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let Some((u, p)) = ui.split_once(':') else {
                    return Err(bad(
                        "the part before '@' must be user:password or :password".into(),
                    ));
                };
                let u = pct_decode(u).map_err(|m| bad(format!("user name: {m}")))?;
                let p = pct_decode(p).map_err(|m| bad(format!("password: {m}")))?;
                if p.is_empty() {
                    return Err(bad("the password before '@' is empty".into()));
                }
                ((!u.is_empty()).then_some(u), Some(p))
            }
        };
        if rest.contains('#') {
            return Err(bad("a fragment (#…) is not allowed".into()));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
            let Some((h, after)) = r.split_once(']') else {
                return Err(bad(format!(
                    "host `{}`: missing ']' after an IPv6 address",
                    show(hostport.as_bytes())
                )));
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad(format!(
                    "host `[{}]` is not an IPv6 address",
                    show(h.as_bytes())
                )));
            }
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => {
                        return Err(bad(format!(
                            "unexpected `{}` after the IPv6 address",
                            show(p.as_bytes())
                        )))
                    }
                },
            };
            (h.to_string(), port)
        } else {
            let (h, p) = match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            };
            if p.is_some_and(|p| p.contains(':')) {
                return Err(bad(
                    "an IPv6 host must be in brackets: redis://[::1]:6379".into()
                ));
            }
            if h.is_empty() {
                return Err(bad("missing host".into()));
            }
            if h.len() > 253
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(bad(format!(
                    "host `{}` is not a host name or IPv4 address",
                    show(h.as_bytes())
                )));
            }
            (h.to_string(), p)
        };
        let port = match port {
            None => 6379,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(bad(format!(
                        "port `{}` is not a number 1–65535",
                        show(p.as_bytes())
                    )))
                }
            },
        };
        let db = match path {
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
        for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = pct_decode(v)
                .map_err(|m| bad(format!("query parameter `{}`: {m}", show(k.as_bytes()))))?;
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
    /// Trust the certificates of this PEM file instead of the system's (TLS only).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> RedisUrl {
        self.ca_file = Some(path.into());
        self
    }
    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
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

fn pct_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or("a '%' is not followed by two hex digits")?;
            let v = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(v.ok_or("a '%' is not followed by two hex digits")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "not valid UTF-8 after percent-decoding".to_string())
}

// ---------------------------------------------------------------------------------------
// RESP2

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// A null bulk string or a null array.
    Nil,
    Array(Vec<Value>),
}

impl Value {
    /// A short, escaped description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Simple(s) => format!("status `{}`", show(s.as_bytes())),
            Value::Error(s) => format!("error `{}`", show(s.as_bytes())),
            Value::Int(i) => format!("integer {i}"),
            Value::Bulk(b) => format!("bulk `{}`", show(b)),
            Value::Nil => "nil".into(),
            Value::Array(a) => format!("array of {}", a.len()),
        }
    }
}

/// Append the RESP encoding of a command.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Append the RESP encoding of a value (fake servers in tests).
pub fn encode_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Value::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
        Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Value::Bulk(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::Nil => out.extend_from_slice(b"$-1\r\n"),
        Value::Array(a) => {
            out.extend_from_slice(format!("*{}\r\n", a.len()).as_bytes());
            for x in a {
                encode_value(x, out);
            }
        }
    }
}

/// Parse one reply from the front of `buf`: `Ok(Some((value, bytes used)))`,
/// `Ok(None)` when `buf` holds only the beginning of a reply, or the first violation.
/// Total: never panics, for any input; recursion is bounded by [`MAX_DEPTH`].
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut pos = 0;
    Ok(parse_at(buf, &mut pos, 0)?.map(|v| (v, pos)))
}

/// The line starting at `start` (without CRLF) and the position after it.
fn line_at(buf: &[u8], start: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = buf.get(start..).unwrap_or(&[]);
    let window = &rest[..rest.len().min(MAX_LINE + 2)];
    match window.iter().position(|&b| b == b'\n') {
        None if window.len() >= MAX_LINE + 2 => Err(ProtocolError::LineTooLong),
        None => {
            // A CR anywhere but last can never become a valid line end.
            match window.iter().position(|&b| b == b'\r') {
                Some(i) if i + 1 < window.len() => Err(ProtocolError::BadLine),
                _ => Ok(None),
            }
        }
        Some(0) => Err(ProtocolError::BadLine),
        Some(n) => {
            let line = &window[..n - 1];
            if window[n - 1] != b'\r' || line.contains(&b'\r') {
                return Err(ProtocolError::BadLine);
            }
            Ok(Some((line, start + n + 1)))
        }
    }
}

fn parse_int(line: &[u8]) -> Option<i64> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', d)) => (true, d),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        v = v.checked_mul(10)?.checked_add((d - b'0') as i64)?;
    }
    Some(if neg { -v } else { v })
}

/// A length field: -1 (nil) or 0.. .
fn parse_len(line: &[u8]) -> Result<Option<u64>, ProtocolError> {
    match parse_int(line) {
        Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        _ => Err(ProtocolError::BadLength(show(line))),
    }
}

fn parse_at(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<Value>, ProtocolError> {
    let Some(&ty) = buf.get(*pos) else {
        return Ok(None);
    };
    if !b"+-:$*".contains(&ty) {
        return Err(ProtocolError::BadType(ty));
    }
    if ty == b'*' && depth >= MAX_DEPTH {
        return Err(ProtocolError::TooDeep);
    }
    let Some((line, next)) = line_at(buf, *pos + 1)? else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(line).into_owned();
    let v = match ty {
        b'+' => Value::Simple(text()),
        b'-' => Value::Error(text()),
        b':' => Value::Int(parse_int(line).ok_or_else(|| ProtocolError::BadInteger(show(line)))?),
        b'$' => match parse_len(line)? {
            None => Value::Nil,
            Some(n) if n > MAX_BULK as u64 => return Err(ProtocolError::BulkTooLarge(n)),
            Some(n) => {
                let n = n as usize;
                let Some(data) = buf.get(next..next + n) else {
                    return Ok(None);
                };
                match buf.get(next + n..next + n + 2) {
                    None if buf.len() == next + n + 1 && buf[next + n] == b'\r' => return Ok(None),
                    None if buf.len() == next + n => return Ok(None),
                    Some(b"\r\n") => {}
                    _ => return Err(ProtocolError::MissingCrlf),
                }
                *pos = next + n + 2;
                return Ok(Some(Value::Bulk(data.to_vec())));
            }
        },
        _ => match parse_len(line)? {
            None => Value::Nil,
            Some(n) if n > MAX_ARRAY as u64 => return Err(ProtocolError::ArrayTooLarge(n)),
            Some(n) => {
                let mut p = next;
                let mut items = Vec::with_capacity((n as usize).min(64));
                for _ in 0..n {
                    match parse_at(buf, &mut p, depth + 1)? {
                        Some(v) => items.push(v),
                        None => return Ok(None),
                    }
                }
                *pos = p;
                return Ok(Some(Value::Array(items)));
            }
        },
    };
    *pos = next;
    Ok(Some(v))
}

// ---------------------------------------------------------------------------------------
// Transport: plain TCP or rustls driven by hand

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

struct TlsStream {
    tcp: TcpStream,
    tls: rustls::ClientConnection,
    raw: Vec<u8>,
    out: Vec<u8>,
}

impl Transport {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(data).await,
            Transport::Tls(t) => {
                t.tls.writer().write_all(data)?;
                t.flush().await
            }
        }
    }

    /// Append what arrives to `dst`; 0 = the peer closed.
    async fn read_some(&mut self, dst: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Transport::Plain(s) => {
                let mut tmp = [0u8; 8192];
                let n = s.read(&mut tmp).await?;
                dst.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Transport::Tls(t) => t.read_some(dst).await,
        }
    }
}

fn tls_io_err(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    async fn flush(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            self.out.clear();
            self.tls.write_tls(&mut self.out)?;
            self.tcp.write_all(&self.out).await?;
        }
        Ok(())
    }

    /// Feed ciphertext from the socket once; false = the socket closed.
    async fn pump(&mut self, dst: Option<&mut Vec<u8>>) -> std::io::Result<(bool, usize, bool)> {
        let n = self.tcp.read(&mut self.raw).await?;
        if n == 0 {
            return Ok((false, 0, false));
        }
        let mut got = 0;
        let mut eof = false;
        let mut slice = &self.raw[..n];
        let mut dst = dst;
        while !slice.is_empty() {
            if self.tls.read_tls(&mut slice)? == 0 {
                return Err(std::io::Error::other("TLS receive buffer full"));
            }
            self.tls.process_new_packets().map_err(tls_io_err)?;
            if let Some(d) = dst.as_deref_mut() {
                let (g, e) = drain_plaintext(&mut self.tls, d)?;
                got += g;
                eof |= e;
            }
        }
        Ok((true, got, eof))
    }

    async fn handshake(&mut self) -> std::io::Result<()> {
        while self.tls.is_handshaking() {
            self.flush().await?;
            if self.tls.is_handshaking() && self.tls.wants_read() {
                let (open, _, _) = self.pump(None).await?;
                if !open {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed during the TLS handshake",
                    ));
                }
            }
        }
        self.flush().await
    }

    async fn read_some(&mut self, dst: &mut Vec<u8>) -> std::io::Result<usize> {
        loop {
            let (got, eof) = drain_plaintext(&mut self.tls, dst)?;
            if got > 0 {
                return Ok(got);
            }
            if eof {
                return Ok(0);
            }
            self.flush().await?;
            let (open, got, eof) = self.pump(Some(dst)).await?;
            if got > 0 {
                return Ok(got);
            }
            if !open || eof {
                return Ok(0);
            }
        }
    }
}

/// Move decrypted bytes to `dst`: (bytes moved, the peer sent close_notify).
fn drain_plaintext(
    tls: &mut rustls::ClientConnection,
    dst: &mut Vec<u8>,
) -> std::io::Result<(usize, bool)> {
    let mut got = 0;
    let mut tmp = [0u8; 4096];
    loop {
        match tls.reader().read(&mut tmp) {
            Ok(0) => return Ok((got, true)),
            Ok(n) => {
                dst.extend_from_slice(&tmp[..n]);
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok((got, false)),
            Err(e) => return Err(e),
        }
    }
}

const SYSTEM_CA_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn load_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, MirrorError> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            MirrorError::Tls(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(MirrorError::Tls(format!(
            "no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn tls_config(url: &RedisUrl) -> Result<Arc<rustls::ClientConfig>, MirrorError> {
    let mut roots = rustls::RootCertStore::empty();
    let explicit = url
        .ca_file
        .clone()
        .or_else(|| std::env::var_os("SSL_CERT_FILE").map(PathBuf::from));
    match explicit {
        Some(p) => {
            let (ok, _) = roots.add_parsable_certificates(load_certs(&p)?);
            if ok == 0 {
                return Err(MirrorError::Tls(format!(
                    "no usable CA certificate in {}",
                    p.display()
                )));
            }
        }
        None => {
            let Some(p) = SYSTEM_CA_FILES.iter().map(Path::new).find(|p| p.is_file()) else {
                return Err(MirrorError::Tls(
                    "no system CA bundle found: add ?cacert=PATH to the rediss:// URL".into(),
                ));
            };
            roots.add_parsable_certificates(load_certs(p)?);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MirrorError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match &url.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let chain = load_certs(cert)?;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                MirrorError::Tls(format!(
                    "cannot read a private key from {}: {e}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| MirrorError::Tls(format!("client certificate: {e}")))?
        }
    };
    Ok(Arc::new(cfg))
}

// ---------------------------------------------------------------------------------------
// Connection

/// One connection to Redis (after AUTH and SELECT). Every command has a timeout; after a
/// timeout, an I/O or a protocol error the connection refuses further commands
/// ([`MirrorError::Broken`]): drop it and connect again.
pub struct Conn {
    io: Transport,
    buf: Vec<u8>,
    addr: String,
    timeout: Duration,
    script_sha: Option<String>,
    broken: bool,
}

impl Conn {
    /// Connect, handshake TLS if asked, AUTH and SELECT: each step within `timeout`.
    pub async fn connect(url: &RedisUrl, timeout: Duration) -> Result<Conn, MirrorError> {
        let addr = url.addr();
        let to = |what: &str| MirrorError::Timeout {
            addr: addr.clone(),
            what: what.into(),
            after: timeout,
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect((url.host.as_str(), url.port)))
            .await
            .map_err(|_| to("the connection"))?
            .map_err(|source| MirrorError::Io {
                addr: addr.clone(),
                what: "connect",
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let io = if url.tls {
            let cfg = tls_config(url)?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|_| {
                MirrorError::Tls(format!("`{}` is not a valid TLS server name", url.host))
            })?;
            let tls = rustls::ClientConnection::new(cfg, name)
                .map_err(|e| MirrorError::Tls(e.to_string()))?;
            let mut t = Box::new(TlsStream {
                tcp,
                tls,
                raw: vec![0; 16 * 1024],
                out: Vec::new(),
            });
            tokio::time::timeout(timeout, t.handshake())
                .await
                .map_err(|_| to("the TLS handshake"))?
                .map_err(|e| MirrorError::Tls(format!("handshake with {addr}: {e}")))?;
            Transport::Tls(t)
        } else {
            Transport::Plain(tcp)
        };
        let mut c = Conn {
            io,
            buf: Vec::new(),
            addr,
            timeout,
            script_sha: None,
            broken: false,
        };
        if let Some(pw) = &url.password {
            let r = match &url.username {
                Some(u) => {
                    c.command(&[b"AUTH".as_slice(), u.as_bytes(), pw.as_bytes()])
                        .await
                }
                None => c.command(&[b"AUTH".as_slice(), pw.as_bytes()]).await,
            };
            match r {
                Ok(Value::Simple(s)) if s == "OK" => {}
                Ok(v) => {
                    return Err(MirrorError::UnexpectedReply {
                        cmd: "AUTH".into(),
                        got: v.describe(),
                    })
                }
                Err(MirrorError::Server { msg, .. }) => return Err(MirrorError::Auth(msg)),
                Err(e) => return Err(e),
            }
        }
        if url.db != 0 {
            match c
                .command(&["SELECT".to_string(), url.db.to_string()])
                .await?
            {
                Value::Simple(s) if s == "OK" => {}
                v => {
                    return Err(MirrorError::UnexpectedReply {
                        cmd: "SELECT".into(),
                        got: v.describe(),
                    })
                }
            }
        }
        Ok(c)
    }

    /// The per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Send one command and read its reply, within the timeout. An error reply becomes
    /// [`MirrorError::Server`] (the connection stays usable).
    pub async fn command<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Value, MirrorError> {
        let name = args
            .first()
            .map(|a| show(a.as_ref()).to_ascii_uppercase())
            .unwrap_or_default();
        self.send(args).await?;
        match self.read_reply().await? {
            Value::Error(msg) => Err(MirrorError::Server {
                cmd: name,
                msg: clip(&msg).escape_debug().to_string(),
            }),
            v => Ok(v),
        }
    }

    /// Send a command without reading its reply (pub/sub).
    pub async fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<(), MirrorError> {
        if self.broken {
            return Err(MirrorError::Broken);
        }
        let mut out = Vec::new();
        encode_command(args, &mut out);
        let r = tokio::time::timeout(self.timeout, self.io.write_all(&out)).await;
        let what = || {
            args.first()
                .map(|a| show(a.as_ref()).to_ascii_uppercase())
                .unwrap_or_default()
        };
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                self.broken = true;
                Err(MirrorError::Io {
                    addr: self.addr.clone(),
                    what: "send",
                    source,
                })
            }
            Err(_) => {
                self.broken = true;
                Err(MirrorError::Timeout {
                    addr: self.addr.clone(),
                    what: format!("{} (send)", what()),
                    after: self.timeout,
                })
            }
        }
    }

    /// Read one reply (error replies are returned as [`Value::Error`]), within the timeout.
    pub async fn read_reply(&mut self) -> Result<Value, MirrorError> {
        self.read_reply_within(self.timeout).await
    }

    /// Read one reply, waiting at most `wait`.
    pub async fn read_reply_within(&mut self, wait: Duration) -> Result<Value, MirrorError> {
        if self.broken {
            return Err(MirrorError::Broken);
        }
        let r = tokio::time::timeout(wait, self.read_inner()).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(MirrorError::Timeout {
                addr: self.addr.clone(),
                what: "a reply".into(),
                after: wait,
            }),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    async fn read_inner(&mut self) -> Result<Value, MirrorError> {
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((v, used))) => {
                    self.buf.drain(..used);
                    return Ok(v);
                }
                Ok(None) if self.buf.len() > MAX_REPLY => {
                    return Err(MirrorError::Protocol {
                        addr: self.addr.clone(),
                        source: ProtocolError::ReplyTooLarge,
                    })
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(MirrorError::Protocol {
                        addr: self.addr.clone(),
                        source,
                    })
                }
            }
            let n = self
                .io
                .read_some(&mut self.buf)
                .await
                .map_err(|source| MirrorError::Io {
                    addr: self.addr.clone(),
                    what: "receive",
                    source,
                })?;
            if n == 0 {
                return Err(MirrorError::Closed {
                    addr: self.addr.clone(),
                });
            }
        }
    }

    /// PING → PONG.
    pub async fn ping(&mut self) -> Result<(), MirrorError> {
        match self.command(&["PING"]).await? {
            Value::Simple(s) if s == "PONG" => Ok(()),
            v => Err(MirrorError::UnexpectedReply {
                cmd: "PING".into(),
                got: v.describe(),
            }),
        }
    }

    async fn load_script(&mut self) -> Result<String, MirrorError> {
        match self.command(&["SCRIPT", "LOAD", FENCE_SCRIPT]).await? {
            Value::Bulk(b) if b.len() == 40 && b.iter().all(u8::is_ascii_hexdigit) => {
                Ok(String::from_utf8_lossy(&b).to_ascii_lowercase())
            }
            v => Err(MirrorError::UnexpectedReply {
                cmd: "SCRIPT LOAD".into(),
                got: v.describe(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The fencing write

/// The server-side fencing write.
///
/// `KEYS[1]` = `bandsync:room:<room>`; `ARGV[1]` epoch, `ARGV[2]` version (decimal),
/// `ARGV[3]` the channel, `ARGV[4]` the JSON record, `ARGV[5..]` field/value pairs.
/// Returns 0 (refused: the stored `(epoch, version)` is newer), 1 (written: the hash is
/// replaced by the record and the JSON published) or 2 (the hash already holds exactly
/// this record: nothing written, nothing published). Epochs and versions are compared as
/// decimal strings, exactly for all of u64 (Lua numbers are doubles). A stored hash whose
/// epoch or version is not a decimal integer is overwritten.
pub const FENCE_SCRIPT: &str = r#"-- bandsync: epoch-fenced write of one room record (v1)
local function canon(s)
  return type(s) == 'string' and #s <= 20 and (s == '0' or string.match(s, '^[1-9]%d*$') ~= nil)
end
local function cmp(a, b)
  if #a ~= #b then
    if #a < #b then return -1 else return 1 end
  end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      if x < y then return -1 else return 1 end
    end
  end
  return 0
end
local e, v = ARGV[1], ARGV[2]
if not canon(e) or not canon(v) or #ARGV < 6 or #ARGV % 2 ~= 0 then
  return redis.error_reply('ERR bandsync fence: bad arguments')
end
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'version')
if canon(cur[1]) and canon(cur[2]) then
  local c = cmp(e, cur[1])
  if c < 0 or (c == 0 and cmp(v, cur[2]) < 0) then
    return 0
  end
end
if redis.call('HLEN', KEYS[1]) == (#ARGV - 4) / 2 then
  local same = true
  for i = 5, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
      same = false
      break
    end
  end
  if same then return 2 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#;

/// What a fenced write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The hash now holds the record and the change was published.
    Written,
    /// The hash already held exactly this record (a refresh): nothing published.
    Unchanged,
    /// Refused: the stored `(epoch, version)` is newer.
    Fenced,
}

/// The fencing write, exposed for tests: Ok(true) written (or already current),
/// Ok(false) refused (older epoch, or same epoch and older version).
pub async fn write_fenced(
    conn: &mut Conn,
    room: &str,
    rec: &MirrorRecord,
) -> Result<bool, MirrorError> {
    Ok(write_fenced_outcome(conn, room, rec).await? != WriteOutcome::Fenced)
}

/// [`write_fenced`] with the detailed outcome.
pub async fn write_fenced_outcome(
    conn: &mut Conn,
    room: &str,
    rec: &MirrorRecord,
) -> Result<WriteOutcome, MirrorError> {
    check_room(room).map_err(MirrorError::InvalidRecord)?;
    if rec.room != room {
        return Err(MirrorError::InvalidRecord(format!(
            "record for room {:?} written to room {:?}",
            clip(&rec.room),
            clip(room)
        )));
    }
    rec.validate().map_err(MirrorError::InvalidRecord)?;
    let json = serde_json::to_string(rec).map_err(|e| MirrorError::InvalidRecord(e.to_string()))?;
    let mut tail: Vec<String> = vec![
        "1".into(),
        room_key(room),
        rec.epoch.to_string(),
        rec.version.to_string(),
        room_channel(room),
        json,
    ];
    for (k, v) in rec.fields() {
        tail.push(k.into());
        tail.push(v);
    }
    let sha = match &conn.script_sha {
        Some(s) => s.clone(),
        None => {
            let s = conn.load_script().await?;
            conn.script_sha = Some(s.clone());
            s
        }
    };
    let mut args = vec!["EVALSHA".to_string(), sha];
    args.extend(tail.iter().cloned());
    let reply = match conn.command(&args).await {
        Err(e) if e.is_noscript() => {
            // The script cache was flushed (SCRIPT FLUSH, restart behind a proxy): EVAL
            // runs it and caches it again.
            let mut args = vec!["EVAL".to_string(), FENCE_SCRIPT.to_string()];
            args.extend(tail);
            conn.command(&args).await?
        }
        r => r?,
    };
    match reply {
        Value::Int(1) => Ok(WriteOutcome::Written),
        Value::Int(2) => Ok(WriteOutcome::Unchanged),
        Value::Int(0) => Ok(WriteOutcome::Fenced),
        v => Err(MirrorError::UnexpectedReply {
            cmd: "EVALSHA (fence)".into(),
            got: v.describe(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Restore

/// For restore: read the room's record (None if absent), within `timeout` in all
/// (connect included). Errors are returned, never panics; the record is validated.
pub async fn fetch(
    url: &RedisUrl,
    room: &str,
    timeout: Duration,
) -> Result<Option<MirrorRecord>, MirrorError> {
    check_room(room).map_err(MirrorError::InvalidRecord)?;
    let work = async {
        let mut c = Conn::connect(url, timeout).await?;
        let v = c.command(&["HGETALL".to_string(), room_key(room)]).await?;
        record_from_hash(room, v)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(MirrorError::Timeout {
            addr: url.addr(),
            what: "the fetch (connect, AUTH, SELECT, HGETALL)".into(),
            after: timeout,
        }),
    }
}

/// Turn an HGETALL reply into a record: `None` for an empty hash.
pub fn record_from_hash(room: &str, v: Value) -> Result<Option<MirrorRecord>, MirrorError> {
    let key = room_key(room);
    let bad = |msg: String| MirrorError::BadRecord {
        key: key.clone(),
        msg,
    };
    let items = match v {
        Value::Array(a) => a,
        v => {
            return Err(MirrorError::UnexpectedReply {
                cmd: "HGETALL".into(),
                got: v.describe(),
            })
        }
    };
    if items.is_empty() {
        return Ok(None);
    }
    if items.len() % 2 != 0 {
        return Err(MirrorError::UnexpectedReply {
            cmd: "HGETALL".into(),
            got: format!("an odd array of {}", items.len()),
        });
    }
    let mut map: HashMap<String, String> = HashMap::new();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let (Value::Bulk(k), Value::Bulk(v)) = (k, v) else {
            return Err(MirrorError::UnexpectedReply {
                cmd: "HGETALL".into(),
                got: "a non-bulk field or value".into(),
            });
        };
        let k = String::from_utf8(k)
            .map_err(|e| bad(format!("field name `{}` is not UTF-8", show(e.as_bytes()))))?;
        if !FIELDS.contains(&k.as_str()) {
            continue; // a field from a newer version: ignored
        }
        let v = String::from_utf8(v).map_err(|e| {
            bad(format!(
                "field `{k}`: `{}` is not UTF-8",
                show(e.as_bytes())
            ))
        })?;
        map.insert(k, v);
    }
    let get = |f: &str| {
        map.get(f)
            .ok_or_else(|| bad(format!("field `{f}` is missing")))
    };
    fn num<T: std::str::FromStr>(f: &str, s: &str) -> Result<T, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "field `{f}`: `{}` is not a decimal number",
                show(s.as_bytes())
            ));
        }
        s.parse()
            .map_err(|_| format!("field `{f}`: `{}` is out of range", show(s.as_bytes())))
    }
    let rec = MirrorRecord {
        room: get("room")?.clone(),
        epoch: num("epoch", get("epoch")?).map_err(bad)?,
        version: num("version", get("version")?).map_err(bad)?,
        leader: get("leader")?.clone(),
        tempo_mbpm: num("tempo_mbpm", get("tempo_mbpm")?).map_err(bad)?,
        meter: num("meter", get("meter")?).map_err(bad)?,
        playing: match get("playing")?.as_str() {
            "true" => true,
            "false" => false,
            o => {
                return Err(bad(format!(
                    "field `playing`: `{}` is not true or false",
                    show(o.as_bytes())
                )))
            }
        },
        pinned: map.get("pinned").cloned(),
        updated_unix_ms: num("updated_unix_ms", get("updated_unix_ms")?).map_err(bad)?,
    };
    if rec.room != room {
        return Err(bad(format!(
            "field `room` is {:?}, expected {:?}",
            clip(&rec.room),
            clip(room)
        )));
    }
    rec.validate().map_err(bad)?;
    Ok(Some(rec))
}

// ---------------------------------------------------------------------------------------
// The mirror task

/// Knobs of [`run_with`]; [`run`] uses the defaults.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Per command (and per connect step).
    pub command_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often the current record is re-checked while nothing changes (the script
    /// answers "unchanged" without publishing), so a Redis that lost its data, or a
    /// silently dead connection, is noticed and healed.
    pub refresh: Duration,
    /// At most one warning per this period (the rest are counted, then summarized).
    pub log_every: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            backoff_min: Duration::from_millis(100),
            // Redis back → hash current within 5 s (issue 6) needs the longest wait plus
            // one reconnect and write to stay under 5 s.
            backoff_max: Duration::from_secs(4),
            refresh: Duration::from_secs(1),
            log_every: Duration::from_secs(10),
        }
    }
}

struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(n suppressed since the last one)` when a message may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Runs forever (until `shutdown` becomes true or its sender is dropped, or the record
/// sender is dropped): keeps the latest record from `rx` (`None` = this node is not the
/// leader, write nothing) mirrored into Redis, fenced by epoch. See the module docs.
pub async fn run(
    url: RedisUrl,
    room: String,
    rx: watch::Receiver<Option<MirrorRecord>>,
    stats: Arc<MirrorStats>,
    shutdown: watch::Receiver<bool>,
) {
    run_with(url, room, rx, stats, shutdown, MirrorOptions::default()).await
}

/// [`run`] with explicit options.
pub async fn run_with(
    url: RedisUrl,
    room: String,
    mut rx: watch::Receiver<Option<MirrorRecord>>,
    stats: Arc<MirrorStats>,
    mut shutdown: watch::Receiver<bool>,
    opts: MirrorOptions,
) {
    let mut conn: Option<Conn> = None;
    let mut ever_connected = false;
    let mut fresh = false;
    let mut backoff = opts.backoff_min;
    // What this connection last did with which record.
    let mut done: Option<(MirrorRecord, WriteOutcome)> = None;
    let mut next_refresh = Instant::now();
    let mut limiter = LogLimiter {
        every: opts.log_every,
        last: None,
        suppressed: 0,
    };
    let mut fence_log = LogLimiter {
        every: opts.log_every,
        last: None,
        suppressed: 0,
    };
    let mut failing_since: Option<Instant> = None;
    tracing::info!(room = %room, redis = %url, "redis mirror started");

    loop {
        if *shutdown.borrow() {
            break;
        }
        let want = rx.borrow_and_update().clone();
        let Some(rec) = want else {
            // Not the leader: write nothing, hold no connection.
            if conn.take().is_some() {
                stats.connected.store(false, Ordering::Relaxed);
            }
            done = None;
            tokio::select! {
                r = shutdown.changed() => if r.is_err() { break },
                r = rx.changed() => if r.is_err() { break },
            }
            continue;
        };
        let due = done.as_ref().is_none_or(|(d, _)| *d != rec) || Instant::now() >= next_refresh;
        if due {
            let step = async {
                if conn.is_none() {
                    conn = Some(Conn::connect(&url, opts.command_timeout).await?);
                    fresh = true;
                    done = None;
                }
                let c = conn.as_mut().expect("connected above");
                match &done {
                    // Refused before: do not hammer the fence, just check the link.
                    Some((d, WriteOutcome::Fenced)) if *d == rec => c.ping().await?,
                    _ => {
                        let out = write_fenced_outcome(c, &room, &rec).await?;
                        match out {
                            WriteOutcome::Written => {
                                stats.writes.fetch_add(1, Ordering::Relaxed);
                            }
                            WriteOutcome::Unchanged => {}
                            WriteOutcome::Fenced => {
                                stats.fenced.fetch_add(1, Ordering::Relaxed);
                                if let Some(suppressed) = fence_log.allow() {
                                    tracing::warn!(room = %room, epoch = rec.epoch, version = rec.version, suppressed,
                                        "redis mirror: write refused, Redis holds a newer epoch (this node was deposed?)");
                                }
                            }
                        }
                        done = Some((rec.clone(), out));
                    }
                }
                Ok::<(), MirrorError>(())
            };
            // Err(sender gone) when shutdown changed in the middle of a command.
            let r = tokio::select! {
                r = step => Ok(r),
                r = shutdown.changed() => Err(r.is_err()),
            };
            let r = match r {
                Ok(r) => r,
                Err(gone) => {
                    // The command was cut short: the connection may be mid-reply.
                    conn = None;
                    done = None;
                    stats.connected.store(false, Ordering::Relaxed);
                    if gone {
                        break;
                    }
                    continue; // re-checked at the top
                }
            };
            if r.is_ok() && fresh {
                // A connection counts once it has carried a command.
                fresh = false;
                stats.connected.store(true, Ordering::Relaxed);
                if ever_connected {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever_connected = true;
            }
            match r {
                Ok(()) => {
                    next_refresh = Instant::now() + opts.refresh;
                    backoff = opts.backoff_min;
                    if let Some(t) = failing_since.take() {
                        tracing::info!(room = %room, redis = %url, after_ms = t.elapsed().as_millis() as u64,
                            "redis mirror: Redis is back, mirror resynced");
                    }
                }
                Err(e) => {
                    stats.count_error(&e);
                    if conn.take().is_some() {
                        stats.connected.store(false, Ordering::Relaxed);
                    }
                    done = None;
                    failing_since.get_or_insert_with(Instant::now);
                    if let Some(suppressed) = limiter.allow() {
                        tracing::warn!(room = %room, redis = %url, error = %e, suppressed,
                            retry_ms = backoff.as_millis() as u64, "redis mirror: Redis failed; the session goes on, retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        r = shutdown.changed() => if r.is_err() { break },
                    }
                    backoff = (backoff * 2).min(opts.backoff_max);
                    continue;
                }
            }
        }
        let refresh = tokio::time::sleep_until(next_refresh.into());
        tokio::select! {
            r = shutdown.changed() => if r.is_err() { break },
            r = rx.changed() => if r.is_err() { break },
            _ = refresh => {}
        }
    }
    stats.connected.store(false, Ordering::Relaxed);
    tracing::info!(room = %room, "redis mirror stopped");
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_type() {
        let cases: Vec<(&[u8], Value)> = vec![
            (b"+OK\r\n", Value::Simple("OK".into())),
            (b"-ERR x\r\n", Value::Error("ERR x".into())),
            (b":-42\r\n", Value::Int(-42)),
            (b"$3\r\nabc\r\n", Value::Bulk(b"abc".to_vec())),
            (b"$0\r\n\r\n", Value::Bulk(vec![])),
            (b"$-1\r\n", Value::Nil),
            (b"*-1\r\n", Value::Nil),
            (b"*0\r\n", Value::Array(vec![])),
            (
                b"*2\r\n$1\r\na\r\n:1\r\n",
                Value::Array(vec![Value::Bulk(b"a".to_vec()), Value::Int(1)]),
            ),
            (b"$4\r\na\r\nb\r\n", Value::Bulk(b"a\r\nb".to_vec())),
        ];
        for (b, v) in cases {
            assert_eq!(parse_reply(b), Ok(Some((v, b.len()))), "{}", show(b));
            for cut in 0..b.len() {
                assert_eq!(
                    parse_reply(&b[..cut]),
                    Ok(None),
                    "prefix {} of {}",
                    cut,
                    show(b)
                );
            }
        }
    }

    #[test]
    fn crafted_garbage() {
        use ProtocolError::*;
        let cases: Vec<(&[u8], ProtocolError)> = vec![
            (b"HTTP/1.1 400 Bad Request\r\n", BadType(b'H')),
            (b"\x00\x01", BadType(0)),
            (b"+OK\n", BadLine),
            (b"+O\rK\r\n", BadLine),
            (b"+OK\r\r", BadLine),
            (b":12a\r\n", BadInteger("12a".into())),
            (b":\r\n", BadInteger("".into())),
            (
                b":99999999999999999999\r\n",
                BadInteger("99999999999999999999".into()),
            ),
            (b":-\r\n", BadInteger("-".into())),
            (b"$-2\r\n", BadLength("-2".into())),
            (b"$x\r\n", BadLength("x".into())),
            (b"$+3\r\nabc\r\n", BadLength("+3".into())),
            (b"$1048577\r\n", BulkTooLarge(1_048_577)),
            (
                b"$9223372036854775807\r\n",
                BulkTooLarge(9_223_372_036_854_775_807),
            ),
            (b"$3\r\nabcXY", MissingCrlf),
            (b"$3\r\nabc\rX", MissingCrlf),
            (b"*10001\r\n", ArrayTooLarge(10_001)),
            (
                b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n",
                TooDeep,
            ),
            (b"*2\r\n:1\r\n?\r\n", BadType(b'?')),
        ];
        for (b, e) in cases {
            assert_eq!(parse_reply(b), Err(e), "{}", show(b));
        }
        // 8 levels are fine.
        let mut ok = b"*1\r\n".repeat(8);
        ok.extend_from_slice(b":1\r\n");
        assert!(matches!(parse_reply(&ok), Ok(Some(_))));
        // An endless line is refused once it passes the limit, not buffered forever.
        let mut long = b"+".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
        assert_eq!(parse_reply(&long), Err(LineTooLong));
        assert_eq!(parse_reply(&long[..1000]), Ok(None));
        // The largest bulk is accepted.
        let mut big = format!("${MAX_BULK}\r\n").into_bytes();
        big.extend(std::iter::repeat_n(b'x', MAX_BULK));
        big.extend_from_slice(b"\r\n");
        assert!(matches!(parse_reply(&big), Ok(Some((Value::Bulk(b), _))) if b.len() == MAX_BULK));
    }

    fn value_strategy() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,20}".prop_map(Value::Simple),
            "[a-zA-Z0-9 ]{0,20}".prop_map(Value::Error),
            any::<i64>().prop_map(Value::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bulk),
            Just(Value::Nil),
        ];
        leaf.prop_recursive(MAX_DEPTH as u32 - 1, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(Value::Array)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse_reply(&b) {
                prop_assert!(used <= b.len() && used > 0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn resp_shaped_noise_never_panics(parts in proptest::collection::vec(prop_oneof![
            Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b":".to_vec()), Just(b"+".to_vec()),
            Just(b"-".to_vec()), Just(b"\r\n".to_vec()), Just(b"\r".to_vec()), Just(b"\n".to_vec()),
            Just(b"-1".to_vec()), Just(b"3".to_vec()), Just(b"10001".to_vec()),
            Just(b"99999999999999999999".to_vec()), proptest::collection::vec(any::<u8>(), 0..4),
        ], 0..60)) {
            let b: Vec<u8> = parts.concat();
            let _ = parse_reply(&b);
        }

        #[test]
        fn roundtrip_and_prefixes(v in value_strategy(), junk in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut b = Vec::new();
            encode_value(&v, &mut b);
            let n = b.len();
            b.extend_from_slice(&junk);
            prop_assert_eq!(parse_reply(&b), Ok(Some((v.clone(), n))));
            for cut in 0..n {
                prop_assert_eq!(parse_reply(&b[..cut]), Ok(None));
            }
        }
    }

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
        let u = RedisUrl::parse("redis://:p@ss/w?rd#@h").unwrap();
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
        let u = RedisUrl::parse("rediss://h?cert=/c.pem&key=/k.pem").unwrap();
        assert!(u.client_cert.is_some());
    }

    #[test]
    fn url_errors_name_the_part_and_hide_the_password() {
        let secret = "Hunter2Secret";
        let bad = [
            ("http://h", "`http://`"),
            ("h:6379", "missing scheme"),
            ("redis://", "missing host"),
            ("redis://h:0", "port `0`"),
            ("redis://h:99999", "port `99999`"),
            ("redis://h:abc", "port `abc`"),
            ("redis://h/x", "database `/x`"),
            ("redis://h/1/2", "database `/1/2`"),
            ("redis://::1", "brackets"),
            ("redis://[zz]:1", "not an IPv6"),
            ("redis://h?cacert=/x", "only meaningful for rediss"),
            ("rediss://h?foo=1", "unknown query parameter `foo`"),
            ("rediss://h?cert=/x", "both"),
            ("redis://h#frag", "fragment"),
            ("redis://h o", "whitespace"),
            ("redis://user@h", "user:password"),
            ("redis://u:@h", "password before '@' is empty"),
            ("redis://u:%zz@h", "password: a '%'"),
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
            format!("{secret}://h"),
            format!("redis://u:{secret}%@h"),
            format!("redis:/u:{secret}@h"),
        ] {
            let e = RedisUrl::parse(&s).unwrap_err().to_string();
            assert!(!e.contains(secret), "{s}: {e}");
        }
        let u = RedisUrl::parse(&format!("redis://bob:{secret}@h:1/3")).unwrap();
        assert_eq!(u.to_string(), "redis://bob:***@h:1/3");
        assert!(!format!("{u:?}").contains(secret));
    }

    #[test]
    fn hash_round_trip_and_validation() {
        let rec = MirrorRecord {
            room: "r".into(),
            epoch: u64::MAX,
            version: 7,
            leader: "abcd".into(),
            tempo_mbpm: 137_000,
            meter: 7,
            playing: true,
            pinned: None,
            updated_unix_ms: 1,
        };
        let hash = |r: &MirrorRecord| {
            Value::Array(
                r.fields()
                    .into_iter()
                    .flat_map(|(k, v)| {
                        [
                            Value::Bulk(k.as_bytes().to_vec()),
                            Value::Bulk(v.into_bytes()),
                        ]
                    })
                    .collect(),
            )
        };
        assert_eq!(
            record_from_hash("r", hash(&rec)).unwrap(),
            Some(rec.clone())
        );
        let pinned = MirrorRecord {
            pinned: Some("abcd".into()),
            ..rec.clone()
        };
        assert_eq!(record_from_hash("r", hash(&pinned)).unwrap(), Some(pinned));
        assert_eq!(record_from_hash("r", Value::Array(vec![])).unwrap(), None);
        assert!(record_from_hash("other", hash(&rec)).is_err());
        assert!(record_from_hash(
            "r",
            hash(&MirrorRecord {
                tempo_mbpm: 5,
                ..rec.clone()
            })
        )
        .is_err());
        assert!(record_from_hash(
            "r",
            hash(&MirrorRecord {
                meter: 0,
                ..rec.clone()
            })
        )
        .is_err());
        assert!(record_from_hash("r", Value::Int(3)).is_err());
        assert!(record_from_hash("r", Value::Array(vec![Value::Bulk(b"epoch".to_vec())])).is_err());
        let Value::Array(mut items) = hash(&rec) else {
            unreachable!()
        };
        items[3] = Value::Bulk(b"-1".to_vec()); // epoch's value
        let e = record_from_hash("r", Value::Array(items.clone())).unwrap_err();
        assert!(e.to_string().contains("field `epoch`: `-1`"), "{e}");
        items[3] = Value::Bulk(b"18446744073709551616".to_vec());
        let e = record_from_hash("r", Value::Array(items.clone())).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        items.truncate(2);
        let e = record_from_hash("r", Value::Array(items)).unwrap_err();
        assert!(e.to_string().contains("field `epoch` is missing"), "{e}");
    }
}
