//! Strangers on the web side (issue 12): no other web page and no DNS-rebound name
//! drives the box, no PIN means no control (unless the room opted out), PIN guessing
//! is throttled per address and for the whole box while the right PIN still works at
//! once, a slow-header flood leaves the page and `/health` answering, and everything
//! refused is counted on `/metrics`.
//!
//! Mostly against a running node (`bandsync run --audio null …`); the HTTP limits
//! with small values and the `control_open` opt-out in-process, over loopback TCP.
//! Sources other than 127.0.0.1 are other loopback addresses (127.0.0.2, …): the
//! client binds its socket there before connecting.

use bandsync::audio::snapshot::{AudioSnapshot, SnapshotCell};
use bandsync::audio::AudioStats;
use bandsync::core::time::SessionMap;
use bandsync::core::timeline::{Meter, Tempo, Timeline};
use bandsync::net::{self, MeshStats};
use bandsync::sys::clock::{mono_now_ns, NodeClock};
use bandsync::web::gateway::{GatewayLimits, GatewayStats};
use bandsync::web::hosts::AllowedHosts;
use bandsync::web::http::{HttpLimits, HttpState};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

const BIN: &str = env!("CARGO_BIN_EXE_bandsync");
const WAIT: Duration = Duration::from_secs(5);
const PIN: &str = "123456";

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

/// Open `/ws` from `from` with these `Host` (None: the address) and `Origin`
/// headers; `Err((status, body))` when refused.
async fn ws_open(
    from: IpAddr,
    to: SocketAddr,
    host: Option<&str>,
    origin: Option<&str>,
) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{to}/ws").into_client_request().unwrap();
    if let Some(h) = host {
        req.headers_mut().insert("host", h.parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    let tcp = tcp_from(from, to).await.map_err(|e| (0, e.to_string()))?;
    match tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("handshake timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(r)) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Err((r.status().as_u16(), body))
        }
        Err(e) => Err((0, e.to_string())),
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next JSON message of one of these types (others, like broadcasts, skipped).
async fn expect(ws: &mut Ws, types: &[&str]) -> Value {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let m = tokio::time::timeout_at(until, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {types:?} in time"));
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if types.iter().any(|ty| v["type"] == *ty) {
                    return v;
                }
            }
            Some(Ok(Message::Close(f))) => panic!("closed waiting for {types:?}: {f:?}"),
            Some(Ok(_)) => {}
            other => panic!("connection ended waiting for {types:?}: {other:?}"),
        }
    }
}

/// A raw HTTP exchange from `from`: `(status, whole response)`; status 0 when the
/// server closed without answering.
async fn raw_http(from: IpAddr, to: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = match tcp_from(from, to).await {
        Ok(s) => s,
        Err(e) => return (0, e.to_string()),
    };
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if len.is_some_and(|n| out.len() >= end + 4 + n) {
                break;
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(until, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("HTTP response timed out"),
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

async fn get(to: SocketAddr, path: &str) -> (u16, String) {
    raw_http(
        ip("127.0.0.1"),
        to,
        format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// A metric's value (`name` with its labels, as printed), or 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(to: SocketAddr) -> String {
    let (code, text) = get(to, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    text
}

// ---------------------------------------------------------------------------------
// A running node.

struct Daemon {
    child: Child,
    http: SocketAddr,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let room = format!(
            "stranger-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let key = dir.path().join("room.key");
        std::fs::write(&key, "5a".repeat(32)).unwrap();
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let child = Command::new(BIN)
            .args([
                "run",
                "--audio",
                "null",
                "--interface",
                "lo",
                "--quic",
                "127.0.0.1:0",
                "--name",
                "strangerbox",
                "--room",
                &room,
            ])
            .arg("--room-key-file")
            .arg(&key)
            .arg("--http")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(args)
            .env_remove("BANDSYNC_TEST_CLOCK")
            .env_remove("BANDSYNC_TEST_IMPAIR")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Join from 127.0.0.1 once the node serves phones and leads.
    async fn phone(&self) -> (Ws, Value) {
        let t = Instant::now();
        loop {
            if let Ok(Ok(mut ws)) =
                tokio::time::timeout(WAIT, ws_open(ip("127.0.0.1"), self.http, None, None)).await
            {
                send(&mut ws, json!({"type": "join_session"})).await;
                let snap = expect(&mut ws, &["snapshot"]).await;
                if snap["role"] == "leader" {
                    return (ws, snap);
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "node never served phones as leader: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `set_tempo` with `pin` on a fresh connection from `from`: the answer
/// (`ack` or `error`) and how long it took.
async fn guess(d: &Daemon, from: &str, pin: &str) -> (Value, Duration) {
    let mut ws = ws_open(ip(from), d.http, None, None)
        .await
        .unwrap_or_else(|e| panic!("{from}: {e:?}"));
    let t = Instant::now();
    send(
        &mut ws,
        json!({"type": "set_tempo", "bpm": 100, "pin": pin}),
    )
    .await;
    let v = expect(&mut ws, &["ack", "error"]).await;
    (v, t.elapsed())
}

fn code(v: &Value) -> &str {
    v["code"]
        .as_str()
        .unwrap_or(v["type"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sites_and_rebound_names_are_refused() {
    let d = Daemon::start(&["--control-pin", PIN]);
    let (_phone, _) = d.phone().await;
    let me = ip("127.0.0.1");
    let port = d.http.port();

    // a page elsewhere: cross-site WebSocket hijacking
    let (status, body) = ws_open(me, d.http, None, Some("http://evil.example"))
        .await
        .expect_err("a foreign Origin got in");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Origin"), "{body}");
    // DNS rebinding: the attacker's name for our address, its own origin
    let rebound = format!("attacker.example:{port}");
    let (status, body) = ws_open(
        me,
        d.http,
        Some(&rebound),
        Some(&format!("http://{rebound}")),
    )
    .await
    .expect_err("a foreign Host got in");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Host"), "{body}");
    // a foreign Host with no Origin (a script, not a browser) neither
    let (status, _) = ws_open(me, d.http, Some("attacker.example"), None)
        .await
        .expect_err("a foreign Host got in");
    assert_eq!(status, 403);
    // `null` (sandboxed frames, files) is not the box
    let (status, _) = ws_open(me, d.http, None, Some("null")).await.err().unwrap();
    assert_eq!(status, 403);
    // a state-changing request from elsewhere: refused before any route
    let (status, _) = raw_http(
        me,
        d.http,
        format!(
            "POST /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 403);

    // the box's own names and addresses, with or without a port, do
    for (host, origin) in [
        (None, None),
        (None, Some(format!("http://127.0.0.1:{port}"))),
        (
            Some(format!("localhost:{port}")),
            Some(format!("http://localhost:{port}")),
        ),
        (
            Some(format!("strangerbox.local:{port}")),
            Some(format!("http://strangerbox.local:{port}")),
        ),
        (
            Some("127.0.0.1".to_string()),
            Some("https://127.0.0.1".to_string()),
        ),
    ] {
        let mut ws = ws_open(me, d.http, host.as_deref(), origin.as_deref())
            .await
            .unwrap_or_else(|e| panic!("{host:?} {origin:?}: {e:?}"));
        send(&mut ws, json!({"type": "ping", "t0": 1})).await;
        expect(&mut ws, &["pong"]).await;
    }
    // reading is not changing: monitoring by any name still works
    let (status, _) = raw_http(
        me,
        d.http,
        b"GET /health HTTP/1.1\r\nHost: monitor.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);

    // a burst of refusals is counted, and logged once
    for _ in 0..40 {
        let _ = ws_open(me, d.http, None, Some("http://evil.example")).await;
    }
    let m = metrics(d.http).await;
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"origin\"}") >= 43.0,
        "{m}"
    );
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"host\"}") >= 2.0,
        "{m}"
    );
    let lines = d.log().matches("HTTP request refused").count();
    assert!(lines <= 4, "{lines} log lines for refusals:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_box_makes_a_pin_and_no_pin_means_no_control() {
    // SPEC §2: a box with no configured PIN makes one on first start (6 digits, in the
    // state dir, printed by `bandsync control-pin`); phones without it change nothing.
    let d = Daemon::start(&["--play"]);
    let (mut ws, snap) = d.phone().await;
    let pin_file = d.dir.path().join("state/control-pin");
    let pin = std::fs::read_to_string(&pin_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        pin.len() == 6 && pin.bytes().all(|b| b.is_ascii_digit()),
        "{pin:?}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pin_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "control-pin is {mode:o}");
    }
    let out = Command::new(BIN)
        .args(["control-pin", "--state-dir"])
        .arg(d.dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pin);
    assert_eq!(snap["control"], "pin", "{snap}");
    assert_eq!(snap["pin_required"], true);
    let wrong = if pin == "000000" { "111111" } else { "000000" };
    for (msg, code) in [
        (json!({"type": "set_tempo", "bpm": 200}), "pin_required"),
        (
            json!({"type": "set_tempo", "bpm": 200, "pin": wrong}),
            "bad_pin",
        ),
        (json!({"type": "pause"}), "pin_required"),
    ] {
        send(&mut ws, msg).await;
        let e = expect(&mut ws, &["error", "ack"]).await;
        assert_eq!(e["code"], code, "{e}");
    }
    // nothing changed
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, h) = get(d.http, "/health").await;
    let body = &h[h.find('{').unwrap()..];
    let h: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(
        (h["tempo"].as_f64(), h["playing"].as_bool()),
        (Some(120.0), Some(true)),
        "{h}"
    );
    assert!(
        h.get("control_pin").is_none(),
        "/health must not show the PIN: {h}"
    );
    let m = metrics(d.http).await;
    assert_eq!(
        metric(&m, "bandsync_phone_control{mode=\"pin\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "bandsync_phone_changes_total"), 0.0, "{m}");
    // the right PIN works
    send(
        &mut ws,
        json!({"type": "set_tempo", "bpm": 133, "pin": pin}),
    )
    .await;
    let a = expect(&mut ws, &["error", "ack"]).await;
    assert_eq!(a["type"], "ack", "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_guessing_is_locked_out_while_the_right_pin_still_works() {
    let d = Daemon::start(&["--control-pin", PIN]);
    let (_phone, snap) = d.phone().await;
    assert_eq!(snap["control"], "pin");
    let attacker = "127.0.0.1";

    // three free tries, the third locks the address out for 1 s
    for i in 0..3 {
        let (v, _) = guess(&d, attacker, &format!("00000{i}")).await;
        assert_eq!(code(&v), "bad_pin", "{v}");
        assert_eq!(v["retry_after_s"].as_u64(), (i == 2).then_some(1), "{v}");
    }
    // … then 2 s, then 4 s (waiting each out)
    for want in [2, 4] {
        tokio::time::sleep(Duration::from_millis(want * 500 + 150)).await;
        let (v, _) = guess(&d, attacker, "111111").await;
        assert_eq!(
            (code(&v), v["retry_after_s"].as_u64()),
            ("bad_pin", Some(want)),
            "{v}"
        );
    }
    // locked out, across connections: not even the right PIN is compared
    let (v, _) = guess(&d, attacker, PIN).await;
    assert_eq!(code(&v), "locked_out", "{v}");
    let wait = v["retry_after_s"].as_u64().unwrap();
    assert!((1..=4).contains(&wait), "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("try again in"),
        "{v}"
    );
    // the right PIN from another address works at once
    let (v, took) = guess(&d, "127.0.0.2", PIN).await;
    assert_eq!(v["type"], "ack", "{v}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // many addresses guessing together: beyond 10 wrong PINs a second on the box,
    // each further wrong PIN locks its address out at once
    let mut tasks = Vec::new();
    for i in 10..70 {
        let http = d.http;
        tasks.push(tokio::spawn(async move {
            let from = format!("127.0.0.{i}");
            let v = Target { http }.guess(&from, "999999").await;
            (from, v)
        }));
    }
    let mut throttled = Vec::new();
    for t in tasks {
        let (from, v) = t.await.unwrap();
        match code(&v) {
            "bad_pin" => {}
            "locked_out" => throttled.push(from),
            _ => panic!("{v}"),
        }
    }
    let throttled = throttled.len();
    assert!(
        throttled >= 10,
        "only {throttled} of 60 wrong PINs throttled"
    );
    // still: the right PIN from an address not locked out works at once
    let (v, took) = guess(&d, "127.0.0.3", PIN).await;
    assert_eq!(v["type"], "ack", "{v}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // (that a throttled address is then locked out is the unit tests' business: its
    // first lockout lasts 1 s, too short to check here without racing)

    let m = metrics(d.http).await;
    assert!(metric(&m, "bandsync_pin_failures_total") >= 65.0, "{m}");
    assert!(metric(&m, "bandsync_pin_lockouts_total") >= 13.0, "{m}");
    assert!(
        metric(&m, "bandsync_pin_refused_total{reason=\"locked_out\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "bandsync_pin_refused_total{reason=\"throttled\"}") >= 10.0,
        "{m}"
    );
    assert!(metric(&m, "bandsync_pin_accepted_total") >= 2.0, "{m}");
    assert!(m.contains("\nbandsync_pin_locked_sources "), "{m}");
}

/// Just the address, for guessing from spawned tasks.
struct Target {
    http: SocketAddr,
}

impl Target {
    async fn guess(&self, from: &str, pin: &str) -> Value {
        let mut ws = ws_open(ip(from), self.http, None, None)
            .await
            .unwrap_or_else(|e| panic!("{from}: {e:?}"));
        send(
            &mut ws,
            json!({"type": "set_tempo", "bpm": 100, "pin": pin}),
        )
        .await;
        expect(&mut ws, &["ack", "error"]).await
    }
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this test process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    assert!(
        r.rlim_cur >= 4096,
        "RLIMIT_NOFILE {} too low for this test",
        r.rlim_cur
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_flood_leaves_the_page_and_health_answering() {
    raise_nofile();
    let mut d = Daemon::start(&["--control-pin", PIN]);
    let (mut phone, _) = d.phone().await;
    // 1500 half-open requests from 30 addresses (50 each, under the per-address cap):
    // more than the connection cap, each dribbling its headers
    let mut flood = Vec::new();
    for i in 0..1500u32 {
        let from = ip(&format!("127.0.1.{}", 10 + i % 30));
        match tcp_from(from, d.http).await {
            Ok(mut s) => {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-a: ").await;
                flood.push(s);
            }
            Err(e) => panic!("connection {i}: {e}"),
        }
    }
    // the page and /health answer at once, from another address
    for path in ["/", "/health", "/metrics"] {
        let t = Instant::now();
        let (code, body) = get(d.http, path).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{path} took {:?}",
            t.elapsed()
        );
    }
    // and a phone can still join
    let t = Instant::now();
    let mut p2 = ws_open(ip("127.0.0.2"), d.http, None, None).await.unwrap();
    send(&mut p2, json!({"type": "join_session"})).await;
    expect(&mut p2, &["snapshot"]).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "join took {:?}",
        t.elapsed()
    );
    // the joined phone was never disturbed
    send(&mut phone, json!({"type": "ping", "t0": 1})).await;
    expect(&mut phone, &["pong"]).await;
    // bounded descriptors: the cap, not the flood
    let pid = d.child.id();
    let fds = open_fds(pid);
    assert!(fds < 1024 + 200, "the node holds {fds} descriptors");
    let m = metrics(d.http).await;
    // the flood beyond the cap was shed: evicted to make room, or cut by the header
    // timeout (on a loaded machine the flood opens slowly enough for the latter)
    let shed = metric(&m, "bandsync_http_evicted_total")
        + metric(&m, "bandsync_http_refused_total{reason=\"header_timeout\"}")
        + metric(&m, "bandsync_http_refused_total{reason=\"conn_cap\"}");
    assert!(shed >= 400.0, "{m}");
    assert!(metric(&m, "bandsync_http_connections") <= 1024.0, "{m}");

    // past the header timeout (5 s) every slow request is gone
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut closed = 0;
    for s in &mut flood {
        let _ = s.write_all(b"b\r\n").await;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1, // EOF, a 408, or a reset
            Err(_) => {}
        }
    }
    assert!(
        closed >= 1490,
        "only {closed} of 1500 slow connections closed"
    );
    drop(flood);
    let m = metrics(d.http).await;
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"header_timeout\"}") >= 500.0,
        "{m}"
    );
    assert!(d.alive(), "the node died: {}", d.log());
    assert!(open_fds(pid) < 200, "descriptors left: {}", open_fds(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_counted() {
    let d = Daemon::start(&["--control-pin", PIN]);
    let me = ip("127.0.0.1");
    let t = Instant::now();
    while get(d.http, "/health").await.0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(15), "{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = raw_http(me, d.http, b"BLAH\x01 / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 400);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (status, _) = raw_http(me, d.http, big.as_bytes()).await;
    assert!(status == 431 || status == 0, "{status}");
    let (status, _) = raw_http(
        me,
        d.http,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413);
    let (status, _) = raw_http(
        me,
        d.http,
        b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403, "two Host headers");
    let m = metrics(d.http).await;
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"bad_request\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"too_large\"}") >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"host\"}") >= 1.0,
        "{m}"
    );
    assert!(metric(&m, "bandsync_http_requests_total") >= 3.0, "{m}");
}

// ---------------------------------------------------------------------------------
// In-process: the router over a fake HttpState (no room behind the handle: status
// unknown, changes answered "the node is shutting down"), with small limits.

struct Fake {
    addr: SocketAddr,
    _changes: tokio::sync::watch::Sender<u64>,
    _status: tokio::sync::watch::Sender<Option<bandsync::core::room::Status>>,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn fake(pin: Option<&str>, open: bool, limits: HttpLimits) -> Fake {
    let tl = Timeline::start_at(
        mono_now_ns() - 1_000_000_000,
        Tempo::from_bpm(120.0).unwrap(),
        Meter::new(4).unwrap(),
        true,
    );
    let cell = Arc::new(SnapshotCell::new(AudioSnapshot {
        timeline: tl,
        map: SessionMap::IDENTITY,
        epoch: 1,
        latency_offset_ns: 0,
        gain: 1.0,
        clock_gen: 0,
    }));
    let (changes, changes_rx) = tokio::sync::watch::channel(0u64);
    let (status, status_rx) = tokio::sync::watch::channel(None);
    let (room, inbox) = net::channel();
    drop(inbox);
    let state = HttpState {
        room,
        audio: Arc::new(AudioStats::default()),
        mesh: Arc::new(MeshStats::default()),
        cell,
        clock: NodeClock::real(),
        changes: changes_rx,
        status: status_rx,
        control_pin: pin.map(str::to_string),
        control_open: open,
        control_updates: None,
        link: None,
        board: Default::default(),
        allowed_hosts: AllowedHosts::local_only(),
        limits: GatewayLimits::default(),
        stats: Arc::new(GatewayStats::default()),
        mirror: None,
        venue: None,
    };
    let (sd_tx, sd_rx) = tokio::sync::watch::channel(false);
    let addr =
        bandsync::web::http::serve_with("127.0.0.1:0".parse().unwrap(), state, limits, sd_rx)
            .await
            .unwrap();
    Fake {
        addr,
        _changes: changes,
        _status: status,
        _shutdown: sd_tx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_open_is_the_explicit_opt_out() {
    for (pin, open, want) in [
        (None, true, "refused"),              // anyone: on to the room (none here)
        (None, false, "pin_required"),        // no PIN, no control
        (Some(""), false, "pin_required"),    // an empty PIN is none
        (Some("4711"), true, "pin_required"), // a PIN wins over the opt-out
    ] {
        let f = fake(pin, open, HttpLimits::default()).await;
        let mut ws = ws_open(ip("127.0.0.1"), f.addr, None, None).await.unwrap();
        send(&mut ws, json!({"type": "join_session"})).await;
        let s = expect(&mut ws, &["snapshot"]).await;
        assert_eq!(
            s["pin_required"],
            !open || pin.is_some_and(|p| !p.is_empty()),
            "{s}"
        );
        send(&mut ws, json!({"type": "play"})).await;
        let e = expect(&mut ws, &["error", "ack"]).await;
        assert_eq!(e["code"], want, "{pin:?} {open}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_caps_per_address_evict_idle_and_time_out_slow_headers() {
    let f = fake(
        Some("4711"),
        false,
        HttpLimits {
            max_connections: 8,
            max_per_ip: 4,
            header_timeout: Duration::from_millis(600),
            ..HttpLimits::default()
        },
    )
    .await;
    let a = ip("127.0.0.5");
    // the per-address cap: the 5th is closed at once
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(a, f.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fifth = tcp_from(a, f.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), fifth.read(&mut buf))
        .await
        .expect("the 5th connection was not closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // the global cap: 4 more from elsewhere fill it; the next evicts the oldest idle one
    for i in 0..4 {
        held.push(
            tcp_from(ip(&format!("127.0.0.{}", 6 + i)), f.addr)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (code, _) = get(f.addr, "/index.html").await;
    assert_eq!(code, 200);
    let n = tokio::time::timeout(Duration::from_secs(1), held[0].read(&mut buf))
        .await
        .expect("the oldest idle connection was not closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // slow headers are cut at the header timeout
    drop(held);
    let mut slow = tcp_from(a, f.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buf))
        .await
        .expect("slow headers never timed out");
    assert!(matches!(n, Ok(_) | Err(_)));
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, m) = get(f.addr, "/metrics").await;
    assert_eq!(
        metric(&m, "bandsync_http_refused_total{reason=\"per_ip\"}"),
        1.0,
        "{m}"
    );
    assert!(metric(&m, "bandsync_http_evicted_total") >= 1.0, "{m}");
    assert!(
        metric(&m, "bandsync_http_refused_total{reason=\"header_timeout\"}") >= 1.0,
        "{m}"
    );
    // with no room behind it, /health says so rather than hanging
    let t = Instant::now();
    let (code, body) = get(f.addr, "/health").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stopping"), "{body}");
    assert!(t.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reads_the_published_status() {
    let f = fake(Some("4711"), false, HttpLimits::default()).await;
    let st = bandsync::core::room::Status {
        node: "abc".into(),
        name: "published".into(),
        role: bandsync::core::room::Role::Leader,
        leader: "abc".into(),
        epoch: 7,
        pinned: None,
        playing: true,
        tempo: 120.0,
        meter: 4,
        synced: true,
        session_ns: 0,
        beat: 0.0,
        peers: vec![],
        decided: Default::default(),
        link: Default::default(),
        redis: "off".into(),
        control_pin: None,
        control: "pin".into(),
        phone_url: None,
        song: None,
        https_url: None,
        cert_sha256: None,
    };
    f._status.send_replace(Some(st));
    let (code, body) = get(f.addr, "/health").await;
    assert_eq!(code, 200, "{body}");
    let h: Value = serde_json::from_str(body[body.find('{').unwrap()..].trim()).unwrap();
    assert_eq!(
        (h["name"].as_str(), h["epoch"].as_u64()),
        (Some("published"), Some(7))
    );
    assert!(
        h["session_ns"].as_i64().unwrap() > 0,
        "fresh from the clock: {h}"
    );
    let (_, m) = get(f.addr, "/metrics").await;
    assert_eq!(metric(&m, "bandsync_epoch"), 7.0, "{m}");
}
