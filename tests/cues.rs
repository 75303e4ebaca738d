//! Setlists and cues end to end (issue 14): two daemons on loopback, the CLI, and
//! phones over the WebSocket.
//!
//! * A phone away during three cues gets exactly those three, in order, when it comes
//!   back with `last_seq`; edits and deletions reach connected phones; acks from
//!   phones on both boxes add up in `cues --json`.
//! * `song 2` through the follower changes tempo and meter on both boxes at the same
//!   beat, a bar boundary (click logs and the phone's snapshot).
//! * Bad input is refused with an error naming the field, changes nothing, and is
//!   counted; phones without the PIN change nothing.
//! * The setlist, the current song and the cues survive a restart.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::{free_port, http_get, json_body, wait_health, NodeCmd, BIN};

const PIN: &str = "424242";

struct Node {
    child: Option<Child>,
    dir: PathBuf,
    quic: u16,
    http: u16,
}

impl Node {
    fn start(base: &Path, i: usize, room: &str, key: &Path, args: &[&str]) -> Node {
        let dir = base.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (quic, http) = (free_port(true), free_port(false));
        let child = NodeCmd::new(dir.join("state"))
            .room(room)
            .name(&format!("node{i}"))
            .key_file(key)
            .quic_port(quic)
            .http_port(http)
            .click_log(dir.join("clicks.jsonl"))
            .args(["--control-pin", PIN])
            .args(args)
            .env("BANDSYNC_LOG", "info,bandsync=debug")
            .stderr_append(dir.join("node.log"))
            .spawn();
        assert!(
            wait_health(http, Duration::from_secs(10)),
            "node{i} did not come up"
        );
        Node {
            child: Some(child),
            dir,
            quic,
            http,
        }
    }
    fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "node exited with {:?}: {}",
                out.status,
                self.log()
            );
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
    fn clicks(&self) -> Vec<(i64, i64)> {
        let mut v: Vec<(i64, i64)> = std::fs::read_to_string(self.dir.join("clicks.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                (
                    v["beat"].as_i64().unwrap(),
                    v["t_mono_ns"].as_i64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v.dedup_by_key(|x| x.0);
        v
    }
    fn health(&self) -> Value {
        json_body(&http_get(self.http, "/health").expect("health").1)
    }
    fn metrics(&self) -> String {
        http_get(self.http, "/metrics").expect("metrics").1
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cli(n: &Node, key: &Path, room: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--node")
        .arg(format!("127.0.0.1:{}", n.quic))
        .args(["--room", room, "--room-key-file"])
        .arg(key)
        .output()
        .unwrap()
}

fn ok(n: &Node, key: &Path, room: &str, args: &[&str]) -> String {
    let o = cli(n, key, room, args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        n.log()
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn fails(n: &Node, key: &Path, room: &str, args: &[&str]) -> String {
    let o = cli(n, key, room, args);
    assert!(
        !o.status.success(),
        "{args:?} should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn cues(n: &Node, key: &Path, room: &str) -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(&ok(n, key, room, &["cues", "--json"])).unwrap()
}

/// Wait until `f` holds (checked every 100 ms), or panic with `what`.
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn phone(http: u16, join: Value) -> Ws {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", http))
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://127.0.0.1:{http}/ws"), tcp)
        .await
        .expect("websocket");
    ws.send(Message::Text(join.to_string().into()))
        .await
        .unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Messages of type `ty` that arrive within `for_ms`.
async fn collect(ws: &mut Ws, ty: &str, for_ms: u64) -> Vec<Value> {
    let until = tokio::time::Instant::now() + Duration::from_millis(for_ms);
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == ty {
                out.push(v);
            }
        }
    }
    out
}

/// The next message of type `ty` (within 5 s).
async fn next_of(ws: &mut Ws, ty: &str) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == ty {
                    return v;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no {ty}: {other:?}"),
        }
    }
}

/// The next message of any of `tys` (within 5 s).
async fn next_of_any(ws: &mut Ws, tys: &[&str]) -> Value {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if tys.iter().any(|ty| v["type"] == *ty) {
                    return v;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("none of {tys:?}: {other:?}"),
        }
    }
}

/// The first beat from which clicks are `period_ns` apart (±1 ms) after being another
/// spacing: where a tempo change took effect.
fn change_beat(clicks: &[(i64, i64)], period_ns: i64) -> Option<i64> {
    clicks.windows(3).find_map(|w| {
        let before = w[1].1 - w[0].1;
        let after = w[2].1 - w[1].1;
        (w[1].0 == w[0].0 + 1
            && w[2].0 == w[1].0 + 1
            && (before - period_ns).abs() > 5_000_000
            && (after - period_ns).abs() < 1_000_000)
            .then_some(w[1].0)
    })
}

#[test]
fn setlists_and_cues_across_two_boxes_phones_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("room.key");
    std::fs::write(&key, "3c".repeat(32)).unwrap();
    let room = format!("test-cues-{}", std::process::id());
    let mut a = Node::start(
        dir.path(),
        1,
        &room,
        &key,
        &["--play", "--tempo", "120", "--priority", "5"],
    );
    let mut b = Node::start(dir.path(), 2, &room, &key, &[]);
    wait_for("b to join a's room", 15, || {
        let h = b.health();
        h["leader"] == a.health()["node"] && h["role"] == "follower"
    });

    // --- setlists: bad files change nothing, name the song and field --------------
    let list = dir.path().join("set.toml");
    std::fs::write(
        &list,
        "[[song]]\ntitle = \"Opener\"\ntempo = 120\nmeter = 4\n\n\
         [[song]]\ntitle = \"Waltz\"\ntempo = 90\nmeter = 3\ncount_in_bars = 2\n\n\
         [[song]]\ntitle = \"Closer\"\ntempo = 140\nmeter = 4\n",
    )
    .unwrap();
    let bad = dir.path().join("bad.toml");
    for (text, want) in [
        (
            "[[song]]\ntitle=\"a\"\ntempo=90\nmeter=4\n[[song]]\ntitle=\"b\"\ntempo=401\nmeter=4\n",
            "song 2: tempo",
        ),
        (
            "[[song]]\ntitle=\"a\"\ntempo=90\nmeter=0\n",
            "song 1: meter",
        ),
        (
            "[[song]]\ntitle=\"a\"\ntempo=90\nmeter=4\nkey=\"D\"\n",
            "song 1: key: unknown key \"key\"",
        ),
        (
            "[[song]]\ntitle=\"a\"\ntempo=90\nmeter=4\ncount_in_bars=9\n",
            "song 1: count_in_bars",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let e = fails(&b, &key, &room, &["setlist", "load", bad.to_str().unwrap()]);
        assert!(e.contains(want) && e.contains("nothing changed"), "{e}");
    }
    let many: String = (0..201)
        .map(|i| format!("[[song]]\ntitle=\"s{i}\"\ntempo=90\nmeter=4\n"))
        .collect();
    std::fs::write(&bad, many).unwrap();
    assert!(
        fails(&b, &key, &room, &["setlist", "load", bad.to_str().unwrap()]).contains("at most 200")
    );
    assert!(ok(&b, &key, &room, &["setlist", "--json"]).contains("\"count\": 0"));
    assert!(fails(&b, &key, &room, &["song", "1"]).contains("no setlist loaded"));

    ok(
        &b,
        &key,
        &room,
        &["setlist", "load", list.to_str().unwrap()],
    );
    wait_for("the setlist on a", 5, || {
        let v: Value = serde_json::from_str(&ok(&a, &key, &room, &["setlist", "--json"])).unwrap();
        v["count"] == 3 && v["songs"][1]["title"] == "Waltz" && v["songs"][1]["count_in_bars"] == 2
    });
    assert!(fails(&b, &key, &room, &["song", "4"]).contains("1–3"));

    // a phone on b follows the song
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut p0 = rt.block_on(phone(
        b.http,
        json!({"type": "join_session", "name": "drums"}),
    ));
    let snap = rt.block_on(next_of(&mut p0, "snapshot"));
    assert_eq!(snap["setlist"].as_array().unwrap().len(), 3, "{snap}");
    assert_eq!(snap["song"], Value::Null);

    // --- song 2 through the follower: tempo and meter at one bar on both boxes -------
    let out = ok(&b, &key, &room, &["song", "2"]);
    assert!(out.contains("Waltz"), "{out}");
    let snap = rt.block_on(async {
        loop {
            let s = next_of(&mut p0, "snapshot").await;
            if s["song"]["index"] == 2
                && s["segments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|g| g["meter"] == 3)
            {
                return s;
            }
        }
    });
    assert_eq!(snap["song"]["title"], "Waltz");
    assert_eq!(snap["song"]["count"], 3);
    let segs = snap["segments"].as_array().unwrap();
    let i = segs.iter().position(|g| g["meter"] == 3).unwrap();
    assert!(i >= 1, "{snap}");
    let (old, new) = (&segs[i - 1], &segs[i]);
    let at = new["b0"].as_i64().unwrap();
    assert_eq!(new["bpm"], 90.0);
    assert_eq!(
        (at - old["downbeat"].as_i64().unwrap()).rem_euclid(old["meter"].as_i64().unwrap()),
        0,
        "the song lands on a bar boundary: {snap}"
    );
    wait_for("song 2 in /health", 5, || {
        a.health()["song"] == json!({"index": 2, "title": "Waltz", "count": 3})
            && b.health()["song"]["index"] == 2
    });
    std::thread::sleep(Duration::from_secs(3)); // a few clicks at the new tempo
    let period_90 = 60_000_000_000 / 90;
    let (ba, bb) = (
        change_beat(&a.clicks(), period_90),
        change_beat(&b.clicks(), period_90),
    );
    assert_eq!(
        ba,
        Some(at),
        "a's clicks change tempo at the scheduled beat"
    );
    assert_eq!(bb, Some(at), "b's clicks change tempo at the same beat");
    let st: Value = serde_json::from_str(&ok(&a, &key, &room, &["status", "--json"])).unwrap();
    assert_eq!(st["song"]["index"], 2);
    assert_eq!(st["meter"], 3);
    assert_eq!(st["tempo"], 90.0);

    // --- cues: a phone away during three cues gets exactly those, in order ----------
    let mut p1 = rt.block_on(phone(
        b.http,
        json!({"type": "join_session", "name": "keys"}),
    ));
    ok(&a, &key, &room, &["cue", "first"]);
    let m = rt.block_on(next_of(&mut p1, "message"));
    assert_eq!(
        (m["seq"].as_u64(), m["text"].as_str()),
        (Some(1), Some("first")),
        "{m}"
    );
    let last_seq = m["seq"].as_u64().unwrap();
    drop(p1);
    ok(&b, &key, &room, &["cue", "chorus twice"]);
    ok(&a, &key, &room, &["cue", "next: song 3 in D"]);
    ok(&b, &key, &room, &["cue", "watch the ending"]);
    wait_for("four numbered cues on both boxes", 5, || {
        [&a, &b].iter().all(|n| {
            let c = cues(n, &key, &room);
            c.len() == 4 && c.iter().all(|c| c["seq"].as_u64().unwrap() > 0)
        })
    });
    let all_a = cues(&a, &key, &room);
    assert_eq!(all_a, cues(&b, &key, &room), "one order on both boxes");
    let seqs: Vec<u64> = all_a.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let mut p1 = rt.block_on(phone(
        b.http,
        json!({"type": "join_session", "name": "keys", "last_seq": last_seq}),
    ));
    let got = rt.block_on(collect(&mut p1, "message", 1500));
    let got: Vec<(u64, String)> = got
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (2, "chorus twice".to_string()),
            (3, "next: song 3 in D".to_string()),
            (4, "watch the ending".to_string())
        ]
    );
    let mut p2 = rt.block_on(phone(a.http, json!({"type": "join_session"})));
    assert_eq!(
        rt.block_on(collect(&mut p2, "message", 1000)).len(),
        4,
        "all of them without last_seq"
    );

    // edits and deletions reach connected phones (on both boxes)
    ok(
        &a,
        &key,
        &room,
        &["cue", "--edit", "3", "next: song 3 in E"],
    );
    ok(&b, &key, &room, &["cue", "--delete", "2"]);
    for p in [&mut p1, &mut p2] {
        let ms = rt.block_on(collect(p, "message", 1500));
        assert!(
            ms.iter().any(|m| m["seq"] == 3
                && m["text"] == "next: song 3 in E"
                && m["edited_unix_ms"].is_u64()),
            "{ms:?}"
        );
        assert!(
            ms.iter().any(|m| m["seq"] == 2 && m["deleted"] == true),
            "{ms:?}"
        );
    }
    // acks from a phone on each box add up; a second ack from one phone does not count
    rt.block_on(async {
        send(&mut p1, json!({"type": "ack_message", "seq": 3})).await;
        send(&mut p1, json!({"type": "ack_message", "seq": 3})).await;
        send(&mut p2, json!({"type": "ack_message", "seq": 3})).await;
        send(&mut p2, json!({"type": "ack_message", "seq": 4})).await;
        send(&mut p2, json!({"type": "ack_message", "seq": 99})).await;
        let e = next_of(&mut p2, "error").await;
        assert_eq!(e["field"], "seq", "{e}");
    });
    wait_for("acks summed across the room", 5, || {
        [&a, &b].iter().all(|n| {
            let c = cues(n, &key, &room);
            c[2]["seen"] == 2 && c[3]["seen"] == 1
        })
    });

    // --- bad input and the PIN --------------------------------------------------------
    let before = cues(&a, &key, &room);
    assert!(fails(&a, &key, &room, &["cue", ""]).contains("text"));
    assert!(fails(&a, &key, &room, &["cue", &"x".repeat(501)]).contains("501 characters"));
    assert!(fails(&a, &key, &room, &["cue", "--edit", "99", "x"]).contains("seq: no cue 99"));
    assert!(fails(&b, &key, &room, &["cue", "--delete", "77"]).contains("seq: no cue 77"));
    let refused = |n: &Node| {
        n.metrics()
            .lines()
            .find(|l| l.contains("reason=\"bad_request\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(refused(&a) >= 1.0 && refused(&b) >= 1.0, "{}", a.metrics());
    rt.block_on(async {
        for (msg, field) in [
            (json!({"type": "post_message", "text": "no pin"}), "pin"),
            (
                json!({"type": "post_message", "text": "bad pin", "pin": "000000"}),
                "pin",
            ),
            (
                json!({"type": "update_message", "seq": 1, "text": "x"}),
                "pin",
            ),
            (json!({"type": "delete_message", "seq": 1}), "pin"),
            (json!({"type": "set_song", "index": "next"}), "pin"),
            (
                json!({"type": "post_message", "text": "", "pin": PIN}),
                "text",
            ),
            (
                json!({"type": "post_message", "text": "y".repeat(501), "pin": PIN}),
                "text",
            ),
            (json!({"type": "set_song", "index": 0, "pin": PIN}), "index"),
        ] {
            send(&mut p2, msg.clone()).await;
            let e = next_of(&mut p2, "error").await;
            assert_eq!(e["field"], field, "{msg}: {e}");
        }
    });
    assert_eq!(
        cues(&a, &key, &room),
        before,
        "refused input changed nothing"
    );
    // with the PIN a phone posts, and moves to the next song
    rt.block_on(async {
        send(
            &mut p2,
            json!({"type": "post_message", "text": "from a phone", "pin": PIN}),
        )
        .await;
        // the ack and the cue's message race (one answers the request, the other is
        // broadcast): take both, in either order
        let (mut ack, mut m) = (None, None);
        while ack.is_none() || m.is_none() {
            let v = next_of_any(&mut p2, &["ack", "message"]).await;
            if v["type"] == "ack" {
                ack = Some(v)
            } else {
                m = Some(v)
            }
        }
        assert_eq!(ack.unwrap()["request"], "post_message");
        let m = m.unwrap();
        assert_eq!(
            (m["seq"].as_u64(), m["author"].as_str()),
            (Some(5), Some("phone"))
        );
        send(
            &mut p2,
            json!({"type": "set_song", "index": "next", "pin": PIN}),
        )
        .await;
        assert_eq!(next_of(&mut p2, "ack").await["request"], "set_song");
    });
    wait_for("song 3 everywhere", 5, || {
        a.health()["song"]["index"] == 3 && b.health()["song"]["index"] == 3
    });
    drop((p0, p1, p2));

    // --- a restart keeps the setlist, the song and the cues -------------------------------
    let cues_before = cues(&a, &key, &room);
    std::thread::sleep(Duration::from_millis(1500)); // cues are saved at most once a second
    b.stop();
    a.stop();
    let a2 = Node::start(dir.path(), 1, &room, &key, &[]);
    let v: Value = serde_json::from_str(&ok(&a2, &key, &room, &["setlist", "--json"])).unwrap();
    assert_eq!(
        (v["count"].as_u64(), v["current"].as_u64()),
        (Some(3), Some(3)),
        "{v}"
    );
    assert_eq!(a2.health()["song"]["title"], "Closer");
    assert_eq!(cues(&a2, &key, &room), cues_before);
    assert!(ok(&a2, &key, &room, &["cues"]).contains("next: song 3 in E"));
}

// ---------------------------------------------------------------------------------
// The page in headless Chromium (skipped, with a note, when there is none).

/// A child process group, killed on drop (chromium forks a family).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own child.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn chromium() -> Option<String> {
    if let Ok(b) = std::env::var("BANDSYNC_CHROMIUM") {
        return Some(b);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|b| path.split(':').any(|d| Path::new(d).join(b).is_file()))
        .map(|b| b.to_string())
}

/// GET on Chromium's DevTools HTTP server (it keeps the connection open: read
/// `Content-Length` bytes).
fn devtools_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())?;
            if body.len() >= len {
                return Some(body.to_string());
            }
        }
    }
}

struct Cdp {
    ws: Ws,
    next: u64,
}

impl Cdp {
    async fn eval(&mut self, expr: &str) -> Value {
        let id = self.next;
        self.next += 1;
        send(
            &mut self.ws,
            json!({"id": id, "method": "Runtime.evaluate", "params": {"expression": expr, "returnByValue": true}}),
        )
        .await;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["id"] == id {
                        assert!(v["result"]["exceptionDetails"].is_null(), "{expr}: {v}");
                        return v["result"]["result"]["value"].clone();
                    }
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("DevTools: {other:?}"),
            }
        }
    }
    /// Wait until `expr` is true in the page.
    async fn until(&mut self, expr: &str, secs: u64) {
        let t = Instant::now();
        // the page may still be loading: an exception counts as false
        let guarded = format!(
            "(function () {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()"
        );
        while self.eval(&guarded).await != Value::Bool(true) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "the page never showed {expr}"
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

#[test]
fn the_page_shows_the_song_and_cues_and_moves_to_the_next_song() {
    use std::os::unix::process::CommandExt;
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium in PATH (set BANDSYNC_CHROMIUM or install Debian's chromium)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("room.key");
    std::fs::write(&key, "4d".repeat(32)).unwrap();
    let room = format!("test-cuepage-{}", std::process::id());
    let a = Node::start(dir.path(), 1, &room, &key, &["--play"]);
    let list = dir.path().join("set.toml");
    std::fs::write(
        &list,
        "[[song]]\ntitle = \"Opener\"\ntempo = 120\nmeter = 4\n\n[[song]]\ntitle = \"Waltz\"\ntempo = 90\nmeter = 3\n",
    )
    .unwrap();
    ok(
        &a,
        &key,
        &room,
        &["setlist", "load", list.to_str().unwrap()],
    );
    ok(&a, &key, &room, &["song", "1"]);
    ok(&a, &key, &room, &["cue", "from the cli"]);

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/", a.http);
    let _chromium = Group(
        Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-background-timer-throttling",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromium"),
    );
    let mut port = None;
    wait_for("chromium's DevTools port", 30, || {
        port = std::fs::read_to_string(profile.path().join("DevToolsActivePort"))
            .ok()
            .and_then(|s| s.lines().next()?.parse::<u16>().ok());
        port.is_some()
    });
    let port = port.unwrap();
    let mut target = String::new();
    wait_for("the page in chromium", 30, || {
        let Some(body) = devtools_get(port, "/json/list") else {
            return false;
        };
        let pages: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let found = pages.as_array().and_then(|a| {
            a.iter()
                .find(|p| {
                    p["type"] == "page" && p["url"].as_str().is_some_and(|u| u.starts_with(&url))
                })
                .and_then(|p| p["webSocketDebuggerUrl"].as_str().map(str::to_string))
        });
        // its URL names "localhost" without the port: keep the path
        found
            .and_then(|u| u.find("/devtools/").map(|i| u[i..].to_string()))
            .map(|path| target = format!("ws://127.0.0.1:{port}{path}"))
            .is_some()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(target.as_str(), tcp).await.expect("DevTools WebSocket");
        let mut b = Cdp { ws, next: 1 };
        let text = |id: &str| format!("document.getElementById('{id}').textContent");
        b.until(&format!("{}.includes('Opener') && {}.includes('Waltz')", text("songnow"), text("songnext")), 20).await;
        b.until(&format!("{}.includes('from the cli')", text("cues")), 10).await;
        // a cue posted now appears on top, flashing once
        ok(&a, &key, &room, &["cue", "second cue"]);
        b.until("document.querySelector('#cues .cue').textContent.includes('second cue')", 10).await;
        // next song with the PIN (the page asks for it)
        let asked = b.eval("document.getElementById('songnextbtn').click(); document.getElementById('pinbox').classList.contains('show')").await;
        assert_eq!(asked, true, "no PIN prompt");
        b.eval(&format!("document.getElementById('pin').value = '{PIN}'; document.getElementById('pinform').requestSubmit(); true")).await;
        b.until(&format!("{}.includes('Waltz') && {}.includes('last song')", text("songnow"), text("songnext")), 10).await;
    });
    wait_for("song 2 on the box", 5, || a.health()["song"]["index"] == 2);
    let seen = cues(&a, &key, &room);
    assert!(
        seen.iter().all(|c| c["seen"] == 1),
        "the page acked every cue: {seen:?}"
    );
}
