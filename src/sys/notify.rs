//! systemd's readiness and watchdog protocol (`sd_notify(3)`), without libsystemd.
//!
//! Under `Type=notify` systemd passes `NOTIFY_SOCKET` (a filesystem path, or an
//! abstract socket name written with a leading `@`) and, with `WatchdogSec=`,
//! `WATCHDOG_USEC`/`WATCHDOG_PID`. The daemon sends `READY=1` once its sockets are
//! bound and the audio stream runs, `WATCHDOG=1` from the loop that proves the clock
//! is alive (every [`Notifier::watchdog_interval`]), `STATUS=…` lines for
//! `systemctl status`, and `STOPPING=1` on shutdown.
//!
//! Every send is one non-blocking datagram: it never blocks the caller (a full socket
//! queue drops the message), never panics, and failures are only logged at debug
//! level — being supervised is optional, the click is not.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// How the socket was named (for log lines).
    name: String,
}

impl Notifier {
    /// The notifier systemd asked for through `$NOTIFY_SOCKET`, or `None` when the
    /// process is not supervised (variable unset or empty) or the variable is unusable
    /// (logged at debug level).
    pub fn from_env() -> Option<Notifier> {
        let v = std::env::var_os(NOTIFY_SOCKET)?;
        if v.is_empty() {
            return None;
        }
        match Notifier::new(&v) {
            Ok(n) => {
                tracing::debug!(socket = %n.name, "sd_notify: using NOTIFY_SOCKET");
                Some(n)
            }
            Err(e) => {
                tracing::debug!(socket = %v.to_string_lossy(), error = %e, "sd_notify: ignoring unusable NOTIFY_SOCKET");
                None
            }
        }
    }

    /// A notifier sending to `socket`, written as in `$NOTIFY_SOCKET`: an absolute
    /// path, or `@name` for a Linux abstract socket. Used by [`Notifier::from_env`]
    /// and by tests (which bind their own datagram socket).
    pub fn new(socket: impl AsRef<OsStr>) -> io::Result<Notifier> {
        let raw = socket.as_ref();
        let addr = parse_socket_addr(raw)?;
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier {
            sock,
            addr,
            name: raw.to_string_lossy().into_owned(),
        })
    }

    /// Send one raw notification (`KEY=VALUE` lines). Non-blocking: a full receive
    /// queue returns `WouldBlock` at once. The convenience methods below log instead.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let n = self.sock.send_to_addr(state.as_bytes(), &self.addr)?;
        if n != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short datagram: {n} of {} bytes", state.len()),
            ));
        }
        Ok(())
    }

    fn send_logged(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::debug!(socket = %self.name, error = %e, message = %state.lines().next().unwrap_or(""), "sd_notify: send failed");
        }
    }

    /// `READY=1`: start-up is finished (sockets bound, audio running).
    pub fn ready(&self) {
        self.send_logged("READY=1");
    }

    /// `WATCHDOG=1`: the service is alive. Send every [`Notifier::watchdog_interval`].
    pub fn watchdog(&self) {
        self.send_logged("WATCHDOG=1");
    }

    /// `STATUS=…`: one free-form line shown by `systemctl status`. Newlines and other
    /// control characters are replaced by spaces (a newline would start a new
    /// assignment), and the text is cut to 1 KiB.
    pub fn status(&self, s: &str) {
        self.send_logged(&status_message(s));
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send_logged("STOPPING=1");
    }

    /// `EXTEND_TIMEOUT_USEC=…`: ask for more time to start or stop (e.g. a slow
    /// sound card).
    pub fn extend_timeout(&self, d: Duration) {
        self.send_logged(&format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()));
    }

    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` (as `sd_watchdog_enabled`
    /// advises), or `None` when the watchdog is off or meant for another process
    /// (`$WATCHDOG_PID` is not ours).
    pub fn watchdog_interval() -> Option<Duration> {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
    }
}

/// `STATUS=` with the text made safe for the one-line protocol.
fn status_message(s: &str) -> String {
    const MAX: usize = 1024;
    let mut out = String::with_capacity(7 + s.len().min(MAX));
    out.push_str("STATUS=");
    for c in s.chars() {
        if out.len() + c.len_utf8() > 7 + MAX {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// The pure part of [`Notifier::watchdog_interval`].
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    my_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(p) = pid {
        let p: u32 = p.trim().parse().ok()?;
        if p != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// Parse `$NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract socket.
fn parse_socket_addr(raw: &OsStr) -> io::Result<SocketAddr> {
    let b = raw.as_bytes();
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {:?}: {why}", raw.to_string_lossy()),
        )
    };
    match b.first() {
        None => Err(bad("empty")),
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(raw)),
        Some(b'@') if b.len() > 1 => abstract_addr(&b[1..]),
        Some(b'@') => Err(bad("abstract socket name is empty")),
        Some(_) => Err(bad(
            "neither an absolute path nor an @abstract name (vsock is not supported)",
        )),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A fake service manager: a datagram socket bound to a fresh path.
    fn fake_manager() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, rx)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).expect("a notification within 5 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_each_message_to_a_path_socket() {
        let (_dir, path, rx) = fake_manager();
        let n = Notifier::new(&path).unwrap();
        n.ready();
        assert_eq!(recv(&rx), "READY=1");
        n.watchdog();
        assert_eq!(recv(&rx), "WATCHDOG=1");
        n.status("leader · 120 BPM · playing");
        assert_eq!(recv(&rx), "STATUS=leader · 120 BPM · playing");
        n.extend_timeout(Duration::from_secs(3));
        assert_eq!(recv(&rx), "EXTEND_TIMEOUT_USEC=3000000");
        n.stopping();
        assert_eq!(recv(&rx), "STOPPING=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "bandsync-notify-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(format!("@{name}")).unwrap();
        n.ready();
        assert_eq!(recv(&rx), "READY=1");
    }

    #[test]
    fn status_is_one_line_and_bounded() {
        let (_dir, path, rx) = fake_manager();
        let n = Notifier::new(&path).unwrap();
        n.status("a\nREADY=1\r\tb");
        assert_eq!(recv(&rx), "STATUS=a READY=1  b");
        n.status(&"é".repeat(2000));
        let m = recv(&rx);
        assert!(
            m.len() <= 7 + 1024 && m.starts_with("STATUS=éé") && !m.contains('\n'),
            "{}",
            m.len()
        );
    }

    #[test]
    fn a_missing_manager_is_not_an_error_for_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("nobody-listens")).unwrap();
        assert!(n.send("READY=1").is_err());
        // The logged variants swallow the error.
        n.ready();
        n.watchdog();
        n.status("x");
        n.stopping();
    }

    #[test]
    fn never_blocks_when_the_manager_does_not_read() {
        let (_dir, path, rx) = fake_manager();
        let n = Notifier::new(&path).unwrap();
        let t = Instant::now();
        // The kernel queues a bounded number of datagrams (net.unix.max_dgram_qlen,
        // and the receive buffer); past that a blocking sender would hang here.
        let mut would_block = false;
        for _ in 0..100_000 {
            match n.send("WATCHDOG=1") {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    would_block = true;
                    break;
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert!(would_block, "the queue never filled");
        for _ in 0..100 {
            n.watchdog(); // dropped, logged at debug, returns at once
        }
        assert!(t.elapsed() < Duration::from_secs(30));
        assert_eq!(recv(&rx), "WATCHDOG=1");
    }

    #[test]
    fn socket_addresses() {
        assert!(parse_socket_addr(OsStr::new("/run/systemd/notify"))
            .unwrap()
            .as_pathname()
            .is_some());
        assert!(parse_socket_addr(OsStr::new("")).is_err());
        assert!(parse_socket_addr(OsStr::new("@")).is_err());
        assert!(parse_socket_addr(OsStr::new("relative/notify")).is_err());
        assert!(parse_socket_addr(OsStr::new("vsock:2:1234")).is_err());
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let a = parse_socket_addr(OsStr::new("@org/systemd/notify")).unwrap();
            assert_eq!(a.as_abstract_name(), Some(&b"org/systemd/notify"[..]));
        }
        assert!(Notifier::new("not-absolute").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec_for_this_pid() {
        let me = 4242;
        assert_eq!(
            watchdog_interval_from(Some("10000000"), None, me),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval_from(Some("10000000"), Some("4242"), me),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval_from(Some("3000001"), Some("4242"), me),
            Some(Duration::from_micros(1_500_000))
        );
        assert_eq!(
            watchdog_interval_from(Some("10000000"), Some("1"), me),
            None,
            "meant for another process"
        );
        assert_eq!(
            watchdog_interval_from(Some("10000000"), Some("x"), me),
            None
        );
        assert_eq!(watchdog_interval_from(Some("0"), None, me), None);
        assert_eq!(watchdog_interval_from(Some("-5"), None, me), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, me), None);
        assert_eq!(watchdog_interval_from(None, Some("4242"), me), None);
    }
}
