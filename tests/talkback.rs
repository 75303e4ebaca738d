//! Phones for real (issue 16), in a real browser: HTTPS with the box's own certificate,
//! talkback between phones on two boxes of a room (WebRTC through the boxes' relay),
//! a phone of another room that never sees them, the wake lock on the secure page, the
//! latency calibration, and talkback's bad input. Headless Chromium (Debian's, which
//! `scripts/test` installs), driven over the DevTools protocol.
//!
//! Figures (printed): talkback push-to-talk latency (press on one page → first audio
//! packet at the other, p50/max over 10 tries), the cold call set-up (join → first
//! audio), and the page's beat vs the box's clicks over HTTPS and over HTTP.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::NodeCmd;

type Cdp = tokio_tungstenite::WebSocketStream<TcpStream>;

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon killed on drop.
struct Node {
    child: Child,
    http: u16,
    https: u16,
    dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(name: &str, room: &str, key: &std::path::Path, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (http, https) = (port(), port());
        let child = NodeCmd::new(dir.path().join("state"))
            .name(name)
            .room(room)
            .key_file(key)
            .http_port(http)
            .args(if extra.contains(&"--https") {
                vec![]
            } else {
                vec!["--https".to_string(), format!("127.0.0.1:{https}")]
            })
            .args(["--control-pin", "2468", "--play", "--no-link"])
            .args(extra)
            .env("BANDSYNC_LOG", "info,bandsync::web=debug")
            .stderr_to(dir.path().join("node.log"))
            .spawn();
        assert!(
            common::wait_health(http, Duration::from_secs(20)),
            "{name} never served /health"
        );
        Node {
            child,
            http,
            https,
            dir,
        }
    }
    /// SIGTERM (an orderly stop: its peers hear `Bye`), and wait.
    fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
    fn health(&self) -> Value {
        let (_, b) = common::http_get(self.http, "/health").unwrap_or((0, "{}".into()));
        common::json_body(&b)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
    fn metrics(&self) -> String {
        common::http_get(self.http, "/metrics")
            .map(|x| x.1)
            .unwrap_or_default()
    }
}

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("room-key");
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).unwrap();
    std::fs::write(&p, format!("{}\n", hex::encode(k))).unwrap();
    p
}

// ---------------------------------------------------------------------------------
// Chromium over the DevTools protocol.

struct Group(Child);
impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own child.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

struct Browser {
    _group: Group,
    port: u16,
    _dir: tempfile::TempDir,
}

struct Page {
    ws: Cdp,
    next: u64,
    id: String,
    port: u16,
}

async fn http_json(port: u16, method: &str, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let t = String::from_utf8_lossy(&buf).to_string();
    let body = t.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

impl Browser {
    fn open() -> Browser {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(std::env::var("BANDSYNC_CHROMIUM").unwrap_or("chromium".into()))
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                "--ignore-certificate-errors",
                "--allow-loopback-in-peer-connection",
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromium (scripts/test installs Debian's chromium)");
        let group = Group(child);
        let t = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(dir.path().join("DevToolsActivePort"))
                .ok()
                .and_then(|s| s.lines().next()?.parse().ok())
            {
                break p;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "chromium did not open its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Browser {
            _group: group,
            port,
            _dir: dir,
        }
    }

    /// A new tab at `url`.
    async fn page(&self, url: &str) -> Page {
        let v = http_json(self.port, "PUT", &format!("/json/new?{url}")).await;
        let ws_url = v["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("no tab: {v}"))
            .to_string();
        let req = ws_url.into_client_request().unwrap();
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        Page {
            ws,
            next: 1,
            id: v["id"].as_str().unwrap().to_string(),
            port: self.port,
        }
    }
}

impl Page {
    /// Send an evaluation; its id, for [`Page::result`].
    async fn start(&mut self, expr: &str) -> u64 {
        let id = self.next;
        self.next += 1;
        let m = json!({"id": id, "method": "Runtime.evaluate", "params": {"expression": expr, "returnByValue": true, "awaitPromise": true}});
        self.ws.send(Message::text(m.to_string())).await.unwrap();
        id
    }
    async fn result(&mut self, id: u64, expr: &str) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("DevTools timed out on {expr}"))
                .expect("DevTools closed")
                .unwrap();
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v["result"]["exceptionDetails"].is_null(), "{expr}: {v}");
                    return v["result"]["result"]["value"].clone();
                }
            }
        }
    }
    /// A DevTools command (no parameters); its result.
    async fn call(&mut self, method: &str) -> Value {
        let id = self.next;
        self.next += 1;
        self.ws
            .send(Message::text(
                json!({"id": id, "method": method}).to_string(),
            ))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
        }
    }
    async fn eval(&mut self, expr: &str) -> Value {
        let id = self.start(expr).await;
        self.result(id, expr).await
    }
    /// Poll `expr` until `ok` holds of it.
    async fn until(
        &mut self,
        what: &str,
        expr: &str,
        secs: u64,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let t = Instant::now();
        loop {
            let v = self.eval(expr).await;
            if ok(&v) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "{what}: never; last {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    async fn close(self) {
        http_json(self.port, "GET", &format!("/json/close/{}", self.id)).await;
    }
}

fn clicks(path: &std::path::Path) -> std::collections::HashMap<i64, i64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            (
                v["beat"].as_i64().unwrap(),
                v["t_mono_ns"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn ready(p: &mut Page, what: &str) {
    p.until(
        what,
        "window.bandsync && window.bandsyncPhone ? window.bandsync.predictedBeats(2) : null",
        30,
        |v| v["synced"] == true && v["connected"] == true,
    )
    .await;
}

const STATE: &str = "window.bandsyncPhone.talk.state()";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talkback_between_boxes_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_file(tmp.path());
    let a = Node::start("alpha", "talk", &key, &[]);
    let mut b = Node::start("bravo", "talk", &key, &[]);
    // the same key, another room: never in the mesh, never in talkback
    let c = Node::start("charlie", "elsewhere", &key, &[]);
    let t = Instant::now();
    while a.health()["peers"].as_array().map_or(0, |p| p.len()) < 1
        || b.health()["peers"].as_array().map_or(0, |p| p.len()) < 1
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the boxes never met: {}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let browser = Browser::open();
    let mut pa = browser
        .page(&format!("https://127.0.0.1:{}/", a.https))
        .await;
    let mut pb = browser
        .page(&format!("https://127.0.0.1:{}/", b.https))
        .await;
    let mut pc = browser
        .page(&format!("https://127.0.0.1:{}/", c.https))
        .await;
    for (p, w) in [
        (&mut pa, "page on alpha"),
        (&mut pb, "page on bravo"),
        (&mut pc, "page on charlie"),
    ] {
        ready(p, w).await;
        // loopback only: the test's traffic stays on 127.0.0.1
        p.eval(r"window.bandsyncPhone.talk.only('127\\.0\\.0\\.1'); true")
            .await;
    }
    // a wrong PIN: refused by name
    pa.eval("window.bandsyncPhone.talk.join('alice', '0000')")
        .await;
    pa.until(
        "the wrong PIN refused",
        "document.getElementById('talkmsg').textContent",
        10,
        |v| v.as_str().is_some_and(|s| s.to_lowercase().contains("pin")),
    )
    .await;
    let join_at = Instant::now();
    for (p, n) in [(&mut pa, "alice"), (&mut pb, "bob"), (&mut pc, "carol")] {
        assert_eq!(
            p.eval(&format!("window.bandsyncPhone.talk.join('{n}', '2468')"))
                .await,
            true
        );
    }
    // alice and bob see each other (across the boxes) and connect
    let sa = pa
        .until("alice sees bob, connected", STATE, 20, |v| {
            v["peers"]
                .as_array()
                .is_some_and(|p| p.len() == 1 && p[0]["name"] == "bob")
                && v["calls"]
                    .as_array()
                    .is_some_and(|c| c.len() == 1 && c[0]["state"] == "connected")
        })
        .await;
    let sb = pb
        .until("bob sees alice, connected", STATE, 20, |v| {
            v["calls"]
                .as_array()
                .is_some_and(|c| c.len() == 1 && c[0]["state"] == "connected")
        })
        .await;
    let connected_ms = join_at.elapsed().as_millis();
    let (alice, bob) = (
        sa["me"].as_str().unwrap().to_string(),
        sb["me"].as_str().unwrap().to_string(),
    );
    assert_ne!(alice[..8], bob[..8], "ids name their boxes: {alice} {bob}");
    assert_eq!(sb["peers"][0]["id"], alice.as_str());
    // carol, in another room, sees nobody; nobody sees her
    let sc = pc
        .until("carol joined", STATE, 10, |v| v["joined"] == true)
        .await;
    assert_eq!(sc["peers"], json!([]), "carol must see no one: {sc}");
    // push to talk: bob's page receives audio (bytes growing, a level)
    let before = pb.eval("window.bandsyncPhone.talk.stats()").await;
    pa.eval("window.bandsyncPhone.talk.press(''); true").await;
    let t = Instant::now();
    let got = loop {
        let v = pb.eval("window.bandsyncPhone.talk.stats()").await;
        if v[0]["bytes"].as_f64() > before[0]["bytes"].as_f64().map(|x| x + 2000.0)
            && v[0]["level"].as_f64() > Some(0.0)
        {
            break v;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let sa = pa.eval("window.bandsyncPhone.talk.stats()").await;
            let la = pa.eval(STATE).await;
            let lb = pb.eval(STATE).await;
            panic!("bob never heard alice: bob {v}, alice {sa}; alice {la}; bob {lb}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = pb.eval("window.bandsyncPhone.talk.stats()").await;
    assert!(
        later[0]["bytes"].as_f64() > got[0]["bytes"].as_f64(),
        "bytes keep growing: {got} {later}"
    );
    eprintln!("bob's inbound audio: {later}");
    pa.eval("window.bandsyncPhone.talk.release(); true").await;
    let cold_ms = join_at.elapsed().as_millis();
    eprintln!("talkback: join → connected {connected_ms} ms (three pages, two boxes, debug build)");
    let _ = cold_ms;

    // push-to-talk latency: press on alice's page → the first audio packet at bob's
    tokio::time::sleep(Duration::from_millis(600)).await;
    let idle0 = pb.eval("window.bandsyncPhone.talk.stats()").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle1 = pb.eval("window.bandsyncPhone.talk.stats()").await;
    eprintln!(
        "while nobody talks, bob receives {} packets in 0.5 s",
        idle1[0]["packets"].as_f64().unwrap_or(0.0) - idle0[0]["packets"].as_f64().unwrap_or(0.0)
    );
    let watch = r#"(async () => {
        const base = (await window.bandsyncPhone.talk.stats())[0].packets;
        const t0 = performance.now();
        while (performance.now() - t0 < 5000) {
            const s = (await window.bandsyncPhone.talk.stats())[0];
            if (s.packets > base) return performance.timeOrigin + performance.now();
            await new Promise((r) => setTimeout(r, 2));
        }
        return null;
    })()"#;
    let mut setup = Vec::new();
    for _ in 0..10 {
        let id = pb.start(watch).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pressed = pa
            .eval("window.bandsyncPhone.talk.press('')")
            .await
            .as_f64()
            .unwrap();
        let heard = pb.result(id, "watch").await;
        pa.eval("window.bandsyncPhone.talk.release(); true").await;
        let heard = heard
            .as_f64()
            .expect("no audio packet within 5 s of the press");
        setup.push(heard - pressed);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    setup.sort_by(|x, y| x.partial_cmp(y).unwrap());
    eprintln!(
        "talkback press → first audio packet at the other page (10 tries): p50 {:.1} ms, max {:.1} ms (all: {:?})",
        setup[setup.len() / 2],
        setup[setup.len() - 1],
        setup.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>()
    );

    // "talk to one": a third member on alpha; bob alone hears alice
    let mut pd = browser
        .page(&format!("https://127.0.0.1:{}/", a.https))
        .await;
    ready(&mut pd, "dave's page").await;
    pd.eval(r"window.bandsyncPhone.talk.only('127\\.0\\.0\\.1'); window.bandsyncPhone.talk.join('dave', '2468')").await;
    let sd = pd
        .until("dave connects to both", STATE, 20, |v| {
            v["calls"]
                .as_array()
                .is_some_and(|c| c.len() == 2 && c.iter().all(|x| x["state"] == "connected"))
        })
        .await;
    let dave = sd["me"].as_str().unwrap().to_string();
    assert_eq!(
        pc.eval(STATE).await["peers"],
        json!([]),
        "carol still sees no one"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stat_of = |v: &Value, id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .map(|x| x["packets"].as_f64().unwrap())
            .unwrap_or(-1.0)
    };
    let d0 = pd.eval("window.bandsyncPhone.talk.stats()").await;
    let b0 = pb.eval("window.bandsyncPhone.talk.stats()").await;
    pa.eval(&format!("window.bandsyncPhone.talk.press('{bob}'); true"))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d1 = pd.eval("window.bandsyncPhone.talk.stats()").await;
    let b1 = pb.eval("window.bandsyncPhone.talk.stats()").await;
    pa.eval("window.bandsyncPhone.talk.release(); true").await;
    assert!(
        stat_of(&b1, &alice) - stat_of(&b0, &alice) > 20.0,
        "bob hears alice: {b0} {b1}"
    );
    assert!(
        stat_of(&d1, &alice) - stat_of(&d0, &alice) < 5.0,
        "dave does not: {d0} {d1}"
    );

    // ending: dave closes his tab → alice and bob are told (rtc_leave, rtc_peers)
    pd.close().await;
    for (p, w) in [(&mut pa, "alice"), (&mut pb, "bob")] {
        p.until(&format!("{w} forgets dave"), STATE, 10, |v| {
            v["peers"]
                .as_array()
                .is_some_and(|p| !p.iter().any(|x| x["id"] == dave.as_str()))
                && v["calls"].as_array().is_some_and(|c| c.len() == 1)
        })
        .await;
    }
    // bob leaves → alice's call ends; he joins again → a new call
    pb.eval("window.bandsyncPhone.talk.leave(); true").await;
    pa.until("alice's call with bob ends", STATE, 10, |v| {
        v["calls"] == json!([]) && v["peers"] == json!([])
    })
    .await;
    pb.eval("window.bandsyncPhone.talk.join('bob', '2468')")
        .await;
    pa.until("alice and bob again", STATE, 20, |v| {
        v["calls"]
            .as_array()
            .is_some_and(|c| c.len() == 1 && c[0]["state"] == "connected")
    })
    .await;

    // the counters
    let m = a.metrics();
    let relayed = |k: &str| {
        m.lines()
            .find(|l| l.starts_with(&format!("bandsync_talkback_relayed_total{{kind=\"{k}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(relayed("offer") + relayed("answer") >= 2.0, "{m}");
    assert!(
        m.contains("bandsync_talkback_refused_total{reason=\"pin\"} 1"),
        "the wrong PIN is counted: {m}"
    );

    // a box going down ends its phones' calls on the others at once
    let t = Instant::now();
    b.stop();
    pa.until("alice sees bob's box go", STATE, 10, |v| {
        v["peers"] == json!([]) && v["calls"] == json!([])
    })
    .await;
    eprintln!(
        "bravo killed → alice's call ended after {} ms",
        t.elapsed().as_millis()
    );
    drop(pa);
    drop(pc);
    drop(c);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_page_wake_lock_calibration_and_beats() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_file(tmp.path());
    let log = tmp.path().join("clicks.jsonl");
    let n = Node::start(
        "delta",
        "alone",
        &key,
        &["--click-log", log.to_str().unwrap()],
    );
    // the status names the secure page and its certificate
    let h = n.health();
    let sha = h["cert_sha256"]
        .as_str()
        .unwrap_or_else(|| panic!("no cert_sha256: {h}"))
        .to_string();
    assert_eq!(sha.len(), 95, "{sha}");
    assert!(
        h["https_url"]
            .as_str()
            .unwrap()
            .starts_with("https://delta.local:"),
        "{h}"
    );
    let der = std::fs::read(n.dir.path().join("state/https-cert.der")).unwrap();
    let d = ring_sha256(&der);
    assert_eq!(d, sha, "the status shows the certificate's fingerprint");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(n.dir.path().join("state/https-key.der"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (_, info) = common::http_get(n.http, "/https.json").unwrap();
    let info = common::json_body(&info);
    assert_eq!(info["port"], n.https);
    assert_eq!(info["sha256"], sha.as_str());

    let browser = Browser::open();
    let mut s = browser
        .page(&format!("https://127.0.0.1:{}/", n.https))
        .await;
    let mut p = browser.page(&format!("http://127.0.0.1:{}/", n.http)).await;
    ready(&mut s, "the secure page").await;
    ready(&mut p, "the plain page").await;
    // the wake lock on the secure page: present, and the browser's answer (the tab in
    // front: a hidden page is refused)
    s.call("Page.bringToFront").await;
    let w = s.eval("window.bandsyncPhone.keepAwake()").await;
    eprintln!("wake lock over HTTPS: {w}");
    assert_eq!(w["secure"], true, "{w}");
    assert_eq!(w["has_wake_lock"], true, "{w}");
    assert!(
        w["answer"].as_str().is_some_and(|a| !a.is_empty()),
        "granted or the browser's reason: {w}"
    );
    if w["held"] == true {
        // dropped (as when the phone locks) → taken again on the next tap
        let d = s.eval("window.bandsyncPhone.dropWake()").await;
        assert_eq!(
            (d["held"].clone(), d["answer"].clone()),
            (json!(false), json!("released")),
            "{d}"
        );
        s.eval(
            "document.body.dispatchEvent(new PointerEvent('pointerdown', {bubbles: true})); true",
        )
        .await;
        s.until(
            "the wake lock again after a tap",
            "window.bandsyncPhone.wake()",
            5,
            |v| v["held"] == true,
        )
        .await;
    }
    // the plain page offers the secure one with the fingerprint
    let text = p
        .until(
            "the plain page points to HTTPS",
            "document.getElementById('securefp').textContent",
            10,
            |v| v.as_str().is_some_and(|t| t.contains(&sha)),
        )
        .await;
    assert!(text.as_str().unwrap().contains(&sha));
    let link = p.eval("document.getElementById('securelink').href").await;
    assert_eq!(link, format!("https://127.0.0.1:{}/", n.https));

    // calibration: the offset moves the predicted beats (and so the flash and the
    // click) by exactly itself, and it is kept
    let v = s
        .eval(
            "(() => { const P = window.bandsyncPhone, B = window.bandsync; P.setOffset(0);
              const a = B.predictedBeats(4); P.setOffset(182); const b = B.predictedBeats(4);
              return {a, b, shown: document.getElementById('offsetshow').textContent,
                      kept: localStorage.getItem('bandsync.offset_ms')}; })()",
        )
        .await;
    assert_eq!(v["shown"], "your offset: +182 ms (Bluetooth?)", "{v}");
    assert_eq!(v["kept"], "182");
    for i in 0..4 {
        assert_eq!(v["a"]["beats"][i]["beat"], v["b"]["beats"][i]["beat"]);
        assert_eq!(
            v["a"]["times"][i], v["b"]["times"][i],
            "the room's beats do not move"
        );
        let shift =
            v["a"]["local_ms"][i].as_f64().unwrap() - v["b"]["local_ms"][i].as_f64().unwrap();
        assert!(
            (shift - 182.0).abs() < 1e-6,
            "shifted by {shift} ms, not 182: {v}"
        );
    }
    // the tap-along test proposes the median of (tap − nearest beat)
    let e = s
        .eval(
            "(() => { const B = window.bandsync, P = window.bandsyncPhone; const t = B.predictedBeats(3).times;
              return [P.tapError(t[1] + 150e3), P.tapError(t[1] - 40e3)]; })()",
        )
        .await;
    assert!(
        (e[0].as_f64().unwrap() - 150.0).abs() < 1e-3
            && (e[1].as_f64().unwrap() + 40.0).abs() < 1e-3,
        "{e}"
    );
    s.eval("window.bandsyncPhone.setOffset(0); true").await;
    // the page's beat vs the box's clicks, over HTTPS and over HTTP (a box alone: its
    // session clock is its CLOCK_MONOTONIC)
    for (page, what) in [(&mut s, "HTTPS"), (&mut p, "HTTP")] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pr = page.eval("window.bandsync.predictedBeats(8)").await;
        let beats = pr["beats"].as_array().unwrap().clone();
        let last = beats.last().unwrap()["beat"].as_i64().unwrap();
        let t = Instant::now();
        let cl = loop {
            let c = clicks(&log);
            if c.contains_key(&last) {
                break c;
            }
            assert!(t.elapsed() < Duration::from_secs(15), "no click {last}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut errs: Vec<f64> = beats
            .iter()
            .map(|b| {
                (b["t_us"].as_f64().unwrap() - cl[&b["beat"].as_i64().unwrap()] as f64 / 1000.0)
                    .abs()
            })
            .collect();
        errs.sort_by(|x, y| x.partial_cmp(y).unwrap());
        eprintln!(
            "page over {what}: beat grid vs the box's clicks over {} beats: p50 {:.0} µs, worst {:.0} µs (rtt {} µs)",
            errs.len(),
            errs[errs.len() / 2],
            errs[errs.len() - 1],
            pr["rtt_us"]
        );
        assert!(errs[errs.len() - 1] < 5_000.0, "{what}: {errs:?}");
        // where the page puts the beat now, against the box: the page's session clock
        // read between two reads of CLOCK_MONOTONIC (a box alone: its session clock is
        // its CLOCK_MONOTONIC)
        let mut e = Vec::new();
        while e.len() < 40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let before = bandsync::sys::clock::mono_now_ns() as f64 / 1000.0;
            let now = page.eval("window.bandsync.sessionNowUs()").await;
            let after = bandsync::sys::clock::mono_now_ns() as f64 / 1000.0;
            if after - before < 2_000.0 {
                e.push((now.as_f64().unwrap() - (before + after) / 2.0).abs());
            }
        }
        e.sort_by(|x, y| x.partial_cmp(y).unwrap());
        eprintln!(
            "page over {what} vs the box's clock (loopback): p50 {:.0} µs, p95 {:.0} µs, max {:.0} µs ({} readings)",
            e[e.len() / 2],
            e[e.len() * 95 / 100],
            e[e.len() - 1],
            e.len()
        );
        assert!(e[e.len() * 95 / 100] < 5_000.0, "{what}: {e:?}");
    }
}

/// Strangers on the HTTPS port: not TLS, or a TLS hello that never finishes, cost a
/// bounded time and are counted; the page and /health go on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_strangers_are_refused_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let key = key_file(tmp.path());
    let n = Node::start("foxtrot", "strangers", &key, &[]);
    // plain HTTP on the TLS port
    let mut s = TcpStream::connect(("127.0.0.1", n.https)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(_)) | Ok(Err(_))), "closed at once: {r:?}");
    // a silent connection: closed after the header deadline (5 s)
    let mut idle = TcpStream::connect(("127.0.0.1", n.https)).await.unwrap();
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(8), "held for {waited:?}");
    let m = n.metrics();
    for want in [
        "reason=\"tls_handshake\"} 1",
        "reason=\"header_timeout\"} 1",
    ] {
        assert!(m.contains(want), "{want} in {m}");
    }
    // the box still serves over TLS: a real handshake through rustls
    let mut roots = rustls::RootCertStore::empty();
    let der = std::fs::read(n.dir.path().join("state/https-cert.der")).unwrap();
    roots
        .add(rustls::pki_types::CertificateDer::from(der))
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let c = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = TcpStream::connect(("127.0.0.1", n.https)).await.unwrap();
    // the certificate names the box's addresses: 127.0.0.1 verifies
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = c
        .connect(name, tcp)
        .await
        .expect("TLS with the box's own certificate");
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.ok();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"status\":\"ok\""), "{out}");
}

/// `--https` takes ADDR:PORT or "off"; anything else is a configuration error (78)
/// naming the flag and the value, before the state dir is touched.
#[test]
fn https_flag_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = NodeCmd::new(tmp.path().join("state"))
        .args(["--https", "everywhere"])
        .stderr_piped()
        .command()
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("--https") && err.contains("everywhere"),
        "{err}"
    );
    assert!(
        !tmp.path().join("state").exists(),
        "nothing made before the check"
    );
    // off: no HTTPS, no certificate, no https_url
    let key = key_file(tmp.path());
    let n = Node::start("golf", "nohttps", &key, &["--https", "off"]);
    let h = n.health();
    assert!(
        h["https_url"].is_null() && h["cert_sha256"].is_null(),
        "{h}"
    );
    assert!(!n.dir.path().join("state/https-cert.der").exists());
    let (_, info) = common::http_get(n.http, "/https.json").unwrap();
    assert_eq!(common::json_body(&info)["port"], Value::Null);
}

fn ring_sha256(der: &[u8]) -> String {
    bandsync::web::tls::fingerprint(der)
}

// ---------------------------------------------------------------------------------
// Talkback's bad input, over a plain WebSocket client.

async fn ws(port: u16) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio_tungstenite::client_async(req, tcp).await.unwrap().0
}

async fn ask(w: &mut tokio_tungstenite::WebSocketStream<TcpStream>, m: Value, want: &str) -> Value {
    w.send(Message::text(m.to_string())).await.unwrap();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap_or_else(|_| panic!("no {want} for {m}"))
            .unwrap()
            .unwrap();
        if let Message::Text(t) = r {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == want {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talkback_refuses_bad_input_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_file(tmp.path());
    let mut n = Node::start("echo", "bad", &key, &[]);
    let mut w = ws(n.http).await;
    let e = ask(
        &mut w,
        json!({"type": "rtc_offer", "to": "0123abcd-1", "sdp": "v=0"}),
        "error",
    )
    .await;
    assert_eq!(e["code"], "not_joined", "{e}");
    let e = ask(&mut w, json!({"type": "rtc_join", "name": "x"}), "error").await;
    assert_eq!(e["code"], "pin_required", "{e}");
    let e = ask(
        &mut w,
        json!({"type": "rtc_join", "name": "x\u{7}", "pin": "2468"}),
        "error",
    )
    .await;
    assert_eq!(e["field"], "name", "{e}");
    let e = ask(
        &mut w,
        json!({"type": "rtc_join", "name": "x", "pin": "2468", "extra": 1}),
        "error",
    )
    .await;
    assert_eq!(e["code"], "unknown_field", "{e}");
    let peers = ask(
        &mut w,
        json!({"type": "rtc_join", "name": "x", "pin": "2468"}),
        "rtc_peers",
    )
    .await;
    let me = peers["you"].as_str().unwrap().to_string();
    assert_eq!(peers["peers"], json!([{"id": me, "name": "x"}]));
    let e = ask(
        &mut w,
        json!({"type": "rtc_offer", "to": "0123abcd-9", "sdp": "v=0"}),
        "error",
    )
    .await;
    assert_eq!(e["code"], "unknown_peer", "{e}");
    let e = ask(
        &mut w,
        json!({"type": "rtc_offer", "to": "nobody", "sdp": "v=0"}),
        "error",
    )
    .await;
    assert_eq!(
        (e["code"].as_str(), e["field"].as_str()),
        (Some("bad_field"), Some("to")),
        "{e}"
    );
    let e = ask(
        &mut w,
        json!({"type": "rtc_offer", "to": me, "sdp": "a".repeat(16 * 1024 + 1)}),
        "error",
    )
    .await;
    assert_eq!(e["field"], "sdp", "an SDP over 16 KiB: {e}");
    let e = ask(
        &mut w,
        json!({"type": "rtc_ice", "to": me, "candidate": {"candidate": "a".repeat(1100)}}),
        "error",
    )
    .await;
    assert_eq!(e["field"], "candidate", "a candidate over 1 KiB: {e}");
    let e = ask(
        &mut w,
        json!({"type": "rtc_ice", "to": me, "candidate": 5}),
        "error",
    )
    .await;
    assert_eq!(e["field"], "candidate", "{e}");
    let e = ask(&mut w, json!({"type": "rtc_shout", "to": me}), "error").await;
    assert_eq!(e["code"], "unknown_type", "{e}");
    // a message to oneself is relayed (the page never does it; the box does not care)
    let r = ask(
        &mut w,
        json!({"type": "rtc_ice", "to": me, "candidate": {"candidate": "c"}}),
        "rtc_ice",
    )
    .await;
    assert_eq!(r["from"], me.as_str());
    // the signalling rate cap (30 at once; the connection's own cap is 40)
    for _ in 0..38 {
        w.send(Message::text(
            json!({"type": "rtc_leave", "to": "0123abcd-9"}).to_string(),
        ))
        .await
        .unwrap();
    }
    let r = ask(&mut w, json!({"type": "heartbeat"}), "rate_limit_exceeded").await;
    assert!(r["reason"].as_str().unwrap().contains("talkback"), "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // still a member, still connected
    let r = ask(
        &mut w,
        json!({"type": "rtc_ice", "to": me, "candidate": {"candidate": "d"}}),
        "rtc_ice",
    )
    .await;
    assert_eq!(r["candidate"]["candidate"], "d");
    // the talker cap: 16 in the room
    let mut others = Vec::new();
    for i in 0..15 {
        let mut o = ws(n.http).await;
        let p = ask(
            &mut o,
            json!({"type": "rtc_join", "name": format!("p{i}"), "pin": "2468"}),
            "rtc_peers",
        )
        .await;
        assert!(p["you"].is_string());
        others.push(o);
    }
    let mut last = ws(n.http).await;
    let e = ask(
        &mut last,
        json!({"type": "rtc_join", "name": "one too many", "pin": "2468"}),
        "error",
    )
    .await;
    assert_eq!(e["code"], "talkback_full", "{e}");
    // closing a socket frees its place
    drop(others.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = ask(
        &mut last,
        json!({"type": "rtc_join", "name": "now", "pin": "2468"}),
        "rtc_peers",
    )
    .await;
    assert_eq!(p["peers"].as_array().unwrap().len(), 16);
    let m = n.metrics();
    for r in [
        "full",
        "not_joined",
        "unknown_peer",
        "too_large",
        "bad_field",
        "rate",
        "pin",
    ] {
        let line = m
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "bandsync_talkback_refused_total{{reason=\"{r}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no {r} in {m}"));
        assert!(!line.ends_with(" 0"), "{r} counted: {line}");
    }
    assert!(
        n.child.try_wait().unwrap().is_none(),
        "the node is still up"
    );
}
