//! Several daemons on loopback form one room: real mDNS (restricted to `lo`), real
//! QUIC, room-key authentication, clock sync and one shared timeline.
//!
//! These are functional checks with loose bounds (a busy CI machine runs them); the
//! precision targets are measured in the lab (`scripts/lab.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

mod common;
use common::{free_port, NodeCmd, BIN};

struct Node {
    child: Option<Child>,
    dir: PathBuf,
}

impl Node {
    fn start(
        base: &Path,
        i: usize,
        room: &str,
        key: &Path,
        extra_env: &[(&str, &str)],
        args: &[&str],
    ) -> Node {
        Node::start_on(base, i, room, key, extra_env, args, None)
    }
    /// As [`Node::start`], on `--quic quic` instead of an ephemeral port.
    fn start_on(
        base: &Path,
        i: usize,
        room: &str,
        key: &Path,
        extra_env: &[(&str, &str)],
        args: &[&str],
        quic: Option<&str>,
    ) -> Node {
        let dir = base.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = NodeCmd::new(dir.join("state"))
            .room(room)
            .name(&format!("node{i}"))
            .key_file(key)
            .click_log(dir.join("clicks.jsonl"))
            .args(args)
            .env("BANDSYNC_LOG", "info,bandsync=debug")
            .envs(extra_env.iter().copied())
            .stderr_append(dir.join("node.log"));
        if let Some(q) = quic {
            cmd = cmd.quic(q);
        }
        Node {
            child: Some(cmd.spawn()),
            dir,
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
        std::fs::read_to_string(self.dir.join("clicks.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["beat"].as_i64().unwrap(),
                    v["t_mono_ns"].as_i64().unwrap(),
                )
            })
            .collect()
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

fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    p
}

fn room_name(tag: &str) -> String {
    format!("test-{tag}-{}", std::process::id())
}

/// Clicks of the same beat on two nodes, after `after_ns`: |Δt| per shared beat.
fn spreads(a: &[(i64, i64)], b: &[(i64, i64)], after_ns: i64) -> Vec<i64> {
    let bm: std::collections::HashMap<i64, i64> = b.iter().copied().collect();
    a.iter()
        .filter(|(_, t)| *t >= after_ns)
        .filter_map(|(beat, t)| bm.get(beat).map(|tb| (t - tb).abs()))
        .collect()
}

#[test]
fn three_boxes_share_one_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "room.key", &"5a".repeat(32));
    let room = room_name("three");
    let mut a = Node::start(
        dir.path(),
        1,
        &room,
        &key,
        &[("BANDSYNC_TEST_CLOCK", "offset_ms=250,skew_ppm=100")],
        &["--play", "--tempo", "120"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut b = Node::start(
        dir.path(),
        2,
        &room,
        &key,
        &[("BANDSYNC_TEST_CLOCK", "offset_ms=-250,skew_ppm=-100")],
        &["--play", "--tempo", "90"],
    );
    let mut c = Node::start(
        dir.path(),
        3,
        &room,
        &key,
        &[],
        &["--tempo", "60", "--priority", "5"],
    );
    // c outranks the others; it may lead only after it settled (room::SETTLE_NS, 10 s)
    std::thread::sleep(Duration::from_secs(15));
    let t_check = bandsync::sys::clock::mono_now_ns() - 5_000_000_000;
    a.stop();
    b.stop();
    c.stop();
    let (ca, cb, cc) = (a.clicks(), b.clicks(), c.clicks());
    for (n, l) in [(&b, "b"), (&c, "c")] {
        assert!(
            n.log().contains("joined the room's session"),
            "{l} never joined: {}",
            n.log()
        );
    }
    // the late boxes adopted the room's 120 BPM, whatever their own flags said
    for (name, cl) in [("a", &ca), ("b", &cb), ("c", &cc)] {
        let late: Vec<_> = cl.iter().filter(|(_, t)| *t >= t_check).collect();
        assert!(
            late.len() >= 8,
            "{name} clicked {} times in the last 5 s",
            late.len()
        );
        for w in late.windows(2) {
            assert_eq!(w[1].0, w[0].0 + 1, "{name}: beats must be consecutive");
            let d = w[1].1 - w[0].1;
            assert!(
                (d - 500_000_000).abs() < 1_000_000,
                "{name}: spacing {d} ns is not 120 BPM"
            );
        }
    }
    for (x, y, l) in [(&ca, &cb, "a-b"), (&ca, &cc, "a-c"), (&cb, &cc, "b-c")] {
        let s = spreads(x, y, t_check);
        assert!(s.len() >= 8, "{l}: only {} shared beats", s.len());
        let worst = *s.iter().max().unwrap();
        assert!(
            worst < 2_000_000,
            "{l}: clicks {worst} ns apart (spreads {s:?})"
        );
    }
    // the highest-ranked box (priority 5) leads once it has settled
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("state/status.json")).unwrap())
            .unwrap();
    assert_eq!(st["role"], "leader", "{st}");
}

#[test]
fn a_box_with_the_wrong_key_never_joins_and_the_room_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(dir.path(), "good.key", &"11".repeat(32));
    let bad = key_file(dir.path(), "bad.key", &"22".repeat(32));
    let room = room_name("key");
    let mut a = Node::start(dir.path(), 1, &room, &good, &[], &["--play"]);
    std::thread::sleep(Duration::from_millis(800));
    let mut b = Node::start(dir.path(), 2, &room, &bad, &[], &["--play"]);
    std::thread::sleep(Duration::from_secs(6));
    a.stop();
    b.stop();
    assert!(
        a.log().contains("room-key authentication") || a.log().contains("refused us"),
        "a: {}",
        a.log()
    );
    assert!(
        b.log().contains("room-key authentication") || b.log().contains("refused us"),
        "b: {}",
        b.log()
    );
    assert!(
        !b.log().contains("joined the room's session"),
        "b joined with the wrong key: {}",
        b.log()
    );
    assert!(
        !a.log().contains("peer joined the mesh"),
        "a accepted the wrong key: {}",
        a.log()
    );
}

fn status(n: &Node) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(n.dir.join("state/status.json")).unwrap())
        .unwrap()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn pin_moves_leadership_survives_restarts_and_unpin_returns_to_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "room.key", &"3c".repeat(32));
    let room = room_name("pin");
    let ports: Vec<u16> = (0..3).map(|_| free_port(true)).collect();
    let quic = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let prio = ["0", "0", "9"]; // node3 leads by rank
    let start_all = |play: bool| -> Vec<Node> {
        (0..3)
            .map(|i| {
                let q = quic(i);
                let mut a = vec!["--priority", prio[i]];
                if play {
                    a.push("--play");
                }
                let n = Node::start_on(dir.path(), i + 1, &room, &key, &[], &a, Some(&q));
                std::thread::sleep(Duration::from_millis(300));
                n
            })
            .collect()
    };
    let cli = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .args(["--node", &quic(0), "--room", &room, "--room-key-file"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let mut nodes = start_all(true);
    // node3 settles (10 s) and leads by rank
    let id3 = std::fs::read_to_string(nodes[2].dir.join("state/node-id"))
        .unwrap()
        .trim()
        .to_string();
    assert!(
        wait_until(Duration::from_secs(25), || {
            status(&nodes[2])["role"] == "leader"
                && status(&nodes[0])["leader"] == id3.as_str()
                && status(&nodes[1])["leader"] == id3.as_str()
                && status(&nodes[0])["peers"].as_array().map(|p| p.len()) == Some(2)
        })
        .is_some(),
        "node3 never led the room of three"
    );
    let id2 = std::fs::read_to_string(nodes[1].dir.join("state/node-id"))
        .unwrap()
        .trim()
        .to_string();
    let pin_at = bandsync::sys::clock::mono_now_ns();
    cli(&["pin", "node2"]);
    let took = wait_until(Duration::from_secs(3), || {
        status(&nodes[1])["role"] == "leader"
            && status(&nodes[0])["leader"] == id2.as_str()
            && status(&nodes[2])["leader"] == id2.as_str()
    })
    .expect("leadership did not move to the pinned node");
    eprintln!("pin: leadership moved in {took:?}");
    std::thread::sleep(Duration::from_secs(2));
    // no beat lost or doubled around the handover, on any box
    for n in &nodes {
        let c: Vec<_> = n
            .clicks()
            .into_iter()
            .filter(|(_, t)| *t > pin_at - 2_000_000_000)
            .collect();
        for w in c.windows(2) {
            assert_eq!(
                w[1].0,
                w[0].0 + 1,
                "beats around the pin must be consecutive"
            );
            assert!(
                (w[1].1 - w[0].1 - 500_000_000).abs() < 200_000,
                "a click moved around the pin: {:?}",
                w
            );
        }
    }
    // every box restarts: the pin was persisted and replicated
    for n in nodes.iter_mut() {
        n.stop();
    }
    drop(nodes);
    let nodes = start_all(false);
    assert!(
        wait_until(Duration::from_secs(25), || status(&nodes[1])["role"]
            == "leader"
            && status(&nodes[0])["leader"] == id2.as_str()
            && status(&nodes[2])["leader"] == id2.as_str())
        .is_some(),
        "the pinned node did not lead again after a restart of every box: {} / {}",
        status(&nodes[1]),
        status(&nodes[2])
    );
    assert_eq!(status(&nodes[0])["pinned"], id2.as_str());
    cli(&["unpin"]);
    // node3 leads again by rank once it has settled in the restarted room (SETTLE_NS)
    assert!(
        wait_until(Duration::from_secs(30), || status(&nodes[2])["role"]
            == "leader")
        .is_some(),
        "unpin did not return leadership to the highest rank: {} / {} / {}",
        status(&nodes[0]),
        status(&nodes[1]),
        status(&nodes[2])
    );
}
