//! User-space network impairment for tests and the lab (SPEC §5).
//!
//! `BANDSYNC_TEST_IMPAIR="delay_ms=D,jitter_ms=J,loss=P,seed=S"` makes the node's *outgoing*
//! QUIC traffic (every UDP datagram quinn sends: stream packets, ACKs, QUIC datagrams,
//! handshake packets) late by `D` plus a uniformly random `0..=J` milliseconds, and drops
//! each datagram with probability `P`. The kernels the lab runs on have no netem, so this is
//! done here, by wrapping the socket quinn writes to:
//!
//! * [`ImpairedSocket`] implements [`quinn::AsyncUdpSocket`] around the runtime's own socket.
//!   `try_send` never blocks: it splits the transmit into single datagrams (GSO is also
//!   switched off by reporting `max_transmit_segments() == 1`), draws the loss decision and
//!   the jitter from a seeded SplitMix64 generator, copies the bytes and queues them, with
//!   their due time, destination, ECN mark and source address, to a background thread.
//! * A thread keeps the pending datagrams in a heap ordered by due time (ties in send
//!   order), sleeps until the earliest is due and hands it to the inner socket. Jitter can
//!   therefore reorder datagrams, as real Wi-Fi does; with no jitter the order is kept.
//! * At most [`MAX_QUEUED`] datagrams wait at once; beyond that, new ones are dropped and
//!   counted ([`ImpairStats::overflow`]), like a full router queue.
//! * Receiving passes through unchanged.
//!
//! A datagram leaves at or after its due time, normally within tens of microseconds of
//! it (a thread with a deadline, not the Tokio timer, whose millisecond rounding would
//! add up to 1 ms to every delay); never early.
//!
//! The PRNG is seeded by `seed`, so the same traffic yields the same drops and delays
//! (traffic itself depends on timing, so whole runs are only roughly repeatable).
//! [`quinn::Endpoint::rebind`] would swap in a plain socket; the node never rebinds.

use std::collections::BinaryHeap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use std::sync::mpsc;
use std::time::Instant;

/// The environment variable read by [`Impairment::from_env`].
pub const ENV_VAR: &str = "BANDSYNC_TEST_IMPAIR";

/// Most datagrams waiting in one socket's delay queue; more are dropped and counted.
pub const MAX_QUEUED: usize = 10_000;

/// Largest accepted `delay_ms` and `jitter_ms` (one minute).
pub const MAX_MS: f64 = 60_000.0;

const KEYS: &str = "delay_ms, jitter_ms, loss, seed";

/// What to do to outgoing datagrams. The default does nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Fixed extra delay, ns.
    pub delay_ns: u64,
    /// Upper bound of the uniformly random extra delay added to `delay_ns`, ns.
    pub jitter_ns: u64,
    /// Probability (0 to 1) that a datagram is dropped.
    pub loss: f64,
    /// Seed of the loss and jitter generator.
    pub seed: u64,
}

/// A bad `BANDSYNC_TEST_IMPAIR` value; every message names the offending key or item.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImpairError {
    #[error("BANDSYNC_TEST_IMPAIR is not valid UTF-8")]
    NotUnicode,
    #[error("BANDSYNC_TEST_IMPAIR: `{item}` is not key=value (keys: {KEYS})")]
    NotKeyValue { item: String },
    #[error("BANDSYNC_TEST_IMPAIR: unknown key `{key}` (keys: {KEYS})")]
    UnknownKey { key: String },
    #[error("BANDSYNC_TEST_IMPAIR: {key} is given more than once")]
    Duplicate { key: String },
    #[error("BANDSYNC_TEST_IMPAIR: {key}={value} is not {expected}")]
    NotANumber {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("BANDSYNC_TEST_IMPAIR: {key}={value} is out of range ({range})")]
    OutOfRange {
        key: String,
        value: String,
        range: &'static str,
    },
}

impl Impairment {
    /// Parse `"delay_ms=D,jitter_ms=J,loss=P,seed=S"`. Any subset of the keys, in any order;
    /// missing ones are 0. `delay_ms` and `jitter_ms` may be fractional (0 to 60000),
    /// `loss` is a probability (0 to 1), `seed` a u64. Spaces around items are ignored.
    pub fn parse(s: &str) -> Result<Impairment, ImpairError> {
        let mut imp = Impairment::default();
        let mut seen = [false; 4];
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(ImpairError::NotKeyValue {
                    item: item.to_string(),
                });
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                "delay_ms" => 0,
                "jitter_ms" => 1,
                "loss" => 2,
                "seed" => 3,
                _ => {
                    return Err(ImpairError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(ImpairError::Duplicate {
                    key: key.to_string(),
                });
            }
            let not_a_number = |expected| ImpairError::NotANumber {
                key: key.to_string(),
                value: value.to_string(),
                expected,
            };
            let out_of_range = |range| ImpairError::OutOfRange {
                key: key.to_string(),
                value: value.to_string(),
                range,
            };
            match slot {
                0 | 1 => {
                    let ms: f64 = value
                        .parse()
                        .map_err(|_| not_a_number("a number of milliseconds"))?;
                    if !(0.0..=MAX_MS).contains(&ms) {
                        return Err(out_of_range("0 to 60000"));
                    }
                    let ns = (ms * 1e6).round() as u64;
                    if slot == 0 {
                        imp.delay_ns = ns;
                    } else {
                        imp.jitter_ns = ns;
                    }
                }
                2 => {
                    let p: f64 = value.parse().map_err(|_| not_a_number("a probability"))?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(out_of_range("0 to 1"));
                    }
                    imp.loss = p;
                }
                _ => {
                    imp.seed = value
                        .parse()
                        .map_err(|_| not_a_number("an unsigned 64-bit integer"))?
                }
            }
        }
        Ok(imp)
    }

    /// Read [`ENV_VAR`]. Unset or blank: `None`.
    pub fn from_env() -> Result<Option<Impairment>, ImpairError> {
        Self::from_env_value(std::env::var_os(ENV_VAR))
    }

    fn from_env_value(v: Option<std::ffi::OsString>) -> Result<Option<Impairment>, ImpairError> {
        let Some(v) = v else { return Ok(None) };
        let s = v.into_string().map_err(|_| ImpairError::NotUnicode)?;
        if s.trim().is_empty() {
            return Ok(None);
        }
        Self::parse(&s).map(Some)
    }
}

impl fmt::Display for Impairment {
    /// The `BANDSYNC_TEST_IMPAIR` form, which [`Impairment::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delay_ms={},jitter_ms={},loss={},seed={}",
            self.delay_ns as f64 / 1e6,
            self.jitter_ns as f64 / 1e6,
            self.loss,
            self.seed
        )
    }
}

/// Counters of one impaired socket (datagrams, after splitting GSO batches).
#[derive(Debug, Default)]
pub struct ImpairStats {
    /// Handed to the inner socket.
    pub sent: AtomicU64,
    /// Dropped by the `loss` draw.
    pub lost: AtomicU64,
    /// Dropped because [`MAX_QUEUED`] datagrams were already waiting.
    pub overflow: AtomicU64,
    /// The inner socket reported an error (the datagram is gone).
    pub send_errors: AtomicU64,
}

/// A plain copy of [`ImpairStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImpairCounts {
    pub sent: u64,
    pub lost: u64,
    pub overflow: u64,
    pub send_errors: u64,
}

impl ImpairStats {
    pub fn counts(&self) -> ImpairCounts {
        ImpairCounts {
            sent: self.sent.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            overflow: self.overflow.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
        }
    }
}

/// SplitMix64 over an atomic counter: lock-free, and deterministic for a given call order.
#[derive(Debug)]
struct SplitMix(AtomicU64);

impl SplitMix {
    fn next_u64(&self) -> u64 {
        use crate::core::rng;
        rng::mix(
            self.0
                .fetch_add(rng::STEP, Ordering::Relaxed)
                .wrapping_add(rng::STEP),
        )
    }

    /// Uniform in [0, 1).
    fn next_f64(&self) -> f64 {
        crate::core::rng::unit_of(self.next_u64())
    }
}

/// One datagram waiting for its due time.
#[derive(Debug)]
struct Pending {
    due: Instant,
    seq: u64,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    bytes: Box<[u8]>,
}

// Min-heap order on (due, seq) inside `BinaryHeap` (a max-heap): reversed.
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}
impl Eq for Pending {}

/// A [`quinn::AsyncUdpSocket`] that delays and drops what it sends (see the module docs).
#[derive(Debug)]
pub struct ImpairedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    imp: Impairment,
    rng: SplitMix,
    seq: AtomicU64,
    queued: Arc<AtomicUsize>,
    tx: mpsc::Sender<Pending>,
    stats: Arc<ImpairStats>,
    warned_overflow: AtomicBool,
}

impl ImpairedSocket {
    /// Wrap `inner` and start the sending thread.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, imp: Impairment) -> io::Result<Arc<ImpairedSocket>> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(ImpairStats::default());
        {
            let (inner, queued, stats) = (inner.clone(), queued.clone(), stats.clone());
            std::thread::Builder::new()
                .name("bandsync-impair".into())
                .spawn(move || send_thread(inner, rx, queued, stats))?;
        }
        Ok(Arc::new(ImpairedSocket {
            inner,
            imp,
            rng: SplitMix(AtomicU64::new(imp.seed)),
            seq: AtomicU64::new(0),
            queued,
            tx,
            stats,
            warned_overflow: AtomicBool::new(false),
        }))
    }

    pub fn impairment(&self) -> Impairment {
        self.imp
    }

    pub fn stats(&self) -> Arc<ImpairStats> {
        self.stats.clone()
    }

    /// Datagrams waiting in the delay queue right now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn enqueue(&self, now: Instant, t: &Transmit<'_>, bytes: &[u8]) -> io::Result<()> {
        if self.imp.loss > 0.0 && self.rng.next_f64() < self.imp.loss {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.stats.overflow.fetch_add(1, Ordering::Relaxed);
            if !self.warned_overflow.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = MAX_QUEUED,
                    "impairment queue full; dropping outgoing datagrams"
                );
            }
            return Ok(());
        }
        // Uniform in 0..=jitter_ns (the modulo bias is below 2^-20 for any jitter up to a minute).
        let jitter = if self.imp.jitter_ns > 0 {
            self.rng.next_u64() % (self.imp.jitter_ns + 1)
        } else {
            0
        };
        let pending = Pending {
            due: now + Duration::from_nanos(self.imp.delay_ns + jitter),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            destination: t.destination,
            ecn: t.ecn,
            src_ip: t.src_ip,
            bytes: bytes.into(),
        };
        if self.tx.send(pending).is_err() {
            // Only if the sending thread has ended: nothing can go out any more.
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other(
                "the impairment's sending thread has stopped",
            ));
        }
        Ok(())
    }
}

impl AsyncUdpSocket for ImpairedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let now = Instant::now();
        let seg = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(seg) {
            self.enqueue(now, transmit, datagram)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// No GSO: every datagram gets its own loss draw and delay.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// `try_send` only queues, so it never blocks.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Sends each pending datagram through `inner` at its due time, on its own thread: the
/// Tokio timer rounds every sleep up to the next millisecond, which would add a
/// uniform 0–1 ms to every delay and change the shape of the delay distribution near its
/// floor (the part clock sync lives on). A thread waiting on the channel with a
/// deadline (and a 1 µs timer slack) wakes within tens of microseconds. Ends once the
/// socket is gone (channel closed) and everything queued has been sent.
fn send_thread(
    inner: Arc<dyn AsyncUdpSocket>,
    rx: mpsc::Receiver<Pending>,
    queued: Arc<AtomicUsize>,
    stats: Arc<ImpairStats>,
) {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack; no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let mut heap: BinaryHeap<Pending> = BinaryHeap::new();
    let mut open = true;
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|p| p.due <= now) {
            let p = heap.pop().expect("peeked");
            send_now(&*inner, &p, &stats);
            queued.fetch_sub(1, Ordering::Relaxed);
        }
        if !open && heap.is_empty() {
            return;
        }
        let got = match heap.peek() {
            Some(p) if open => rx.recv_timeout(p.due.saturating_duration_since(Instant::now())),
            Some(p) => {
                std::thread::sleep(p.due.saturating_duration_since(Instant::now()));
                continue;
            }
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(p) => {
                heap.push(p);
                // Take whatever else is already waiting without another wakeup.
                while let Ok(p) = rx.try_recv() {
                    heap.push(p);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
        }
    }
}

/// A full socket buffer is retried every 100 µs for at most this long, then the
/// datagram is counted as a send error (the network dropped it).
const SEND_RETRY_FOR: Duration = Duration::from_millis(5);

fn send_now(inner: &dyn AsyncUdpSocket, p: &Pending, stats: &ImpairStats) {
    let t = Transmit {
        destination: p.destination,
        ecn: p.ecn,
        contents: &p.bytes,
        segment_size: None,
        src_ip: p.src_ip,
    };
    let give_up = Instant::now() + SEND_RETRY_FOR;
    loop {
        match inner.try_send(&t) {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < give_up => {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) => {
                stats.send_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, dest = %p.destination, "impaired socket: send failed");
                return;
            }
        }
    }
}

/// Create a quinn Endpoint on `socket`, wrapping it in the impairment if given.
/// Must be called inside a Tokio runtime.
pub fn make_endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
    imp: Option<Impairment>,
) -> io::Result<quinn::Endpoint> {
    make_endpoint_with_stats(config, server, socket, imp).map(|(ep, _)| ep)
}

/// [`make_endpoint`], also returning the impairment's counters when there is one.
pub fn make_endpoint_with_stats(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
    imp: Option<Impairment>,
) -> io::Result<(quinn::Endpoint, Option<Arc<ImpairStats>>)> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "a QUIC endpoint must be created inside a Tokio runtime",
        ));
    }
    let runtime = Arc::new(quinn::TokioRuntime);
    match imp {
        None => Ok((quinn::Endpoint::new(config, server, socket, runtime)?, None)),
        Some(imp) => {
            let inner = runtime.wrap_udp_socket(socket)?;
            let sock = ImpairedSocket::new(inner, imp)?;
            let stats = sock.stats();
            tracing::info!(impairment = %imp, "outgoing QUIC traffic is impaired ({ENV_VAR})");
            let ep = quinn::Endpoint::new_with_abstract_socket(config, server, sock, runtime)?;
            Ok((ep, Some(stats)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn err(s: &str) -> String {
        Impairment::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn impair_parse_accepts_full_subsets_and_floats() {
        assert_eq!(
            Impairment::parse("delay_ms=3,jitter_ms=20,loss=0.02,seed=7").unwrap(),
            Impairment {
                delay_ns: 3_000_000,
                jitter_ns: 20_000_000,
                loss: 0.02,
                seed: 7
            }
        );
        assert_eq!(
            Impairment::parse("loss=0.3").unwrap(),
            Impairment {
                loss: 0.3,
                ..Default::default()
            }
        );
        assert_eq!(
            Impairment::parse(" seed = 18446744073709551615 , delay_ms=0.25,").unwrap(),
            Impairment {
                delay_ns: 250_000,
                seed: u64::MAX,
                ..Default::default()
            }
        );
        assert_eq!(Impairment::parse("loss=0").unwrap().loss, 0.0);
        assert_eq!(Impairment::parse("loss=1").unwrap().loss, 1.0);
        assert_eq!(Impairment::parse("").unwrap(), Impairment::default());
        let imp = Impairment {
            delay_ns: 3_500_000,
            jitter_ns: 20_000_000,
            loss: 0.02,
            seed: 9,
        };
        assert_eq!(Impairment::parse(&imp.to_string()).unwrap(), imp);
    }

    #[test]
    fn impair_parse_rejects_with_clear_messages() {
        assert_eq!(
            err("loss=1.5"),
            "BANDSYNC_TEST_IMPAIR: loss=1.5 is out of range (0 to 1)"
        );
        assert_eq!(
            err("loss=-0.1"),
            "BANDSYNC_TEST_IMPAIR: loss=-0.1 is out of range (0 to 1)"
        );
        assert_eq!(
            err("loss=NaN"),
            "BANDSYNC_TEST_IMPAIR: loss=NaN is out of range (0 to 1)"
        );
        assert_eq!(
            err("loss=lots"),
            "BANDSYNC_TEST_IMPAIR: loss=lots is not a probability"
        );
        assert_eq!(
            err("delay_ms=-1"),
            "BANDSYNC_TEST_IMPAIR: delay_ms=-1 is out of range (0 to 60000)"
        );
        assert_eq!(
            err("jitter_ms=inf"),
            "BANDSYNC_TEST_IMPAIR: jitter_ms=inf is out of range (0 to 60000)"
        );
        assert_eq!(
            err("delay_ms=3ms"),
            "BANDSYNC_TEST_IMPAIR: delay_ms=3ms is not a number of milliseconds"
        );
        assert_eq!(
            err("seed=-3"),
            "BANDSYNC_TEST_IMPAIR: seed=-3 is not an unsigned 64-bit integer"
        );
        assert_eq!(
            err("delay=3"),
            "BANDSYNC_TEST_IMPAIR: unknown key `delay` (keys: delay_ms, jitter_ms, loss, seed)"
        );
        assert_eq!(err("delay_ms"), "BANDSYNC_TEST_IMPAIR: `delay_ms` is not key=value (keys: delay_ms, jitter_ms, loss, seed)");
        assert_eq!(
            err("loss=0.1,loss=0.2"),
            "BANDSYNC_TEST_IMPAIR: loss is given more than once"
        );
        assert_eq!(
            Impairment::parse("delay_ms=1;loss=0.1"),
            Err(ImpairError::NotANumber {
                key: "delay_ms".into(),
                value: "1;loss=0.1".into(),
                expected: "a number of milliseconds"
            })
        );
    }

    #[test]
    fn impair_from_env_value() {
        assert_eq!(Impairment::from_env_value(None), Ok(None));
        assert_eq!(Impairment::from_env_value(Some("".into())), Ok(None));
        assert_eq!(Impairment::from_env_value(Some("  ".into())), Ok(None));
        assert_eq!(
            Impairment::from_env_value(Some("delay_ms=2".into())),
            Ok(Some(Impairment {
                delay_ns: 2_000_000,
                ..Default::default()
            }))
        );
        assert!(matches!(
            Impairment::from_env_value(Some("loss=2".into())),
            Err(ImpairError::OutOfRange { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            assert_eq!(
                Impairment::from_env_value(Some(std::ffi::OsString::from_vec(vec![0xff]))),
                Err(ImpairError::NotUnicode)
            );
        }
    }

    #[test]
    fn impair_prng_is_seeded_and_uniform() {
        let a = SplitMix(AtomicU64::new(42));
        let b = SplitMix(AtomicU64::new(42));
        let c = SplitMix(AtomicU64::new(43));
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..100).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        let mean = (0..100_000).map(|_| a.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }

    /// (when, destination, ECN, bytes) of one datagram that reached the "wire".
    type Wire = (Instant, SocketAddr, Option<EcnCodepoint>, Vec<u8>);

    /// Records what reaches the "wire"; optionally says WouldBlock on every other send.
    #[derive(Debug, Default)]
    struct Recorder {
        sent: Mutex<Vec<Wire>>,
        flaky: bool,
        calls: AtomicUsize,
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(AlwaysWritable)
        }
        fn try_send(&self, t: &Transmit) -> io::Result<()> {
            if self.flaky && self.calls.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            assert!(t.segment_size.is_none());
            self.sent.lock().unwrap().push((
                Instant::now(),
                t.destination,
                t.ecn,
                t.contents.to_vec(),
            ));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut Context,
            _: &mut [IoSliceMut<'_>],
            _: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok("127.0.0.1:1".parse().unwrap())
        }
    }

    const DEST: &str = "127.0.0.1:9";

    fn transmit(bytes: &[u8], seg: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: DEST.parse().unwrap(),
            ecn: Some(EcnCodepoint::Ect0),
            contents: bytes,
            segment_size: seg,
            src_ip: None,
        }
    }

    fn pair(imp: Impairment, flaky: bool) -> (Arc<Recorder>, Arc<ImpairedSocket>) {
        let rec = Arc::new(Recorder {
            flaky,
            ..Default::default()
        });
        let sock = ImpairedSocket::new(rec.clone(), imp).unwrap();
        (rec, sock)
    }

    async fn wait_for(rec: &Recorder, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while rec.sent.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn impair_splits_gso_batches_and_keeps_order_without_jitter() {
        let (rec, sock) = pair(Impairment::default(), true);
        assert_eq!(sock.max_transmit_segments(), 1);
        let batch: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        sock.try_send(&transmit(&batch, Some(1000))).unwrap();
        sock.try_send(&transmit(b"tail", None)).unwrap();
        wait_for(&rec, 4).await;
        let sent = rec.sent.lock().unwrap();
        let sizes: Vec<usize> = sent.iter().map(|s| s.3.len()).collect();
        assert_eq!(sizes, [1000, 1000, 500, 4]);
        assert_eq!(
            sent.iter()
                .map(|s| s.3.clone())
                .collect::<Vec<_>>()
                .concat(),
            [&batch[..], b"tail"].concat()
        );
        assert!(sent
            .iter()
            .all(|s| s.1 == DEST.parse().unwrap() && s.2 == Some(EcnCodepoint::Ect0)));
        assert_eq!(
            sock.stats().counts(),
            ImpairCounts {
                sent: 4,
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn impair_delays_by_delay_plus_jitter() {
        let imp = Impairment {
            delay_ns: 30_000_000,
            jitter_ns: 20_000_000,
            loss: 0.0,
            seed: 1,
        };
        let (rec, sock) = pair(imp, false);
        let t0 = Instant::now();
        for i in 0..50u8 {
            sock.try_send(&transmit(&[i], None)).unwrap();
        }
        wait_for(&rec, 50).await;
        let sent = rec.sent.lock().unwrap();
        assert_eq!(sent.len(), 50);
        let lat: Vec<Duration> = sent.iter().map(|s| s.0 - t0).collect();
        assert!(
            lat.iter().all(|d| *d >= Duration::from_millis(30)),
            "{lat:?}"
        );
        assert!(
            lat.iter().all(|d| *d < Duration::from_millis(1000)),
            "{lat:?}"
        );
        // Jitter spreads them out (and reorders some).
        let spread = *lat.iter().max().unwrap() - *lat.iter().min().unwrap();
        assert!(spread >= Duration::from_millis(5), "spread {spread:?}");
        let order: Vec<u8> = sent.iter().map(|s| s.3[0]).collect();
        assert_ne!(order, (0..50).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn impair_loss_is_seeded_and_near_p() {
        let mut runs = Vec::new();
        for seed in [5, 5, 6] {
            let (rec, sock) = pair(
                Impairment {
                    loss: 0.3,
                    seed,
                    ..Default::default()
                },
                false,
            );
            for i in 0..5000u32 {
                sock.try_send(&transmit(&i.to_le_bytes(), None)).unwrap();
            }
            // The sending thread runs concurrently: let it drain before counting.
            let t = std::time::Instant::now();
            while sock.queued() > 0 && t.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let c = sock.stats().counts();
            assert_eq!(c.lost + c.sent, 5000);
            assert!((1300..1700).contains(&c.lost), "lost {}", c.lost);
            wait_for(&rec, 5000 - c.lost as usize).await;
            let got: Vec<Vec<u8>> = rec
                .sent
                .lock()
                .unwrap()
                .iter()
                .map(|s| s.3.clone())
                .collect();
            assert_eq!(got.len() as u64, 5000 - c.lost);
            runs.push(got);
        }
        assert_eq!(runs[0], runs[1]);
        assert_ne!(runs[0], runs[2]);
    }

    #[tokio::test]
    async fn impair_queue_is_bounded() {
        let (rec, sock) = pair(
            Impairment {
                delay_ns: 10_000_000_000,
                ..Default::default()
            },
            false,
        );
        for _ in 0..MAX_QUEUED + 5 {
            sock.try_send(&transmit(b"x", None)).unwrap();
        }
        assert_eq!(sock.queued(), MAX_QUEUED);
        assert_eq!(sock.stats().counts().overflow, 5);
        assert!(rec.sent.lock().unwrap().is_empty());
    }
}
