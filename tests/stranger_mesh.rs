//! Strangers against the room's mesh (issue 12), on loopback against running nodes:
//! a flood of unauthenticated QUIC handshakes, and forged mDNS adverts that claim a
//! member's id at the stranger's address. The room must keep clicking together, stay
//! one room, and count what it refused.

mod common;

use common::{free_port, http_get, json_body, wait_health, NodeCmd};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

struct Node {
    child: Child,
    http: u16,
    quic: u16,
    dir: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(base: &Path, i: usize, room: &str, key: &Path) -> Node {
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
        .args(["--play", "--no-link"])
        .stderr_to(dir.join("node.log"))
        .spawn();
    assert!(
        wait_health(http, Duration::from_secs(10)),
        "node{i} did not come up"
    );
    Node {
        child,
        http,
        quic,
        dir,
    }
}

fn health(n: &Node) -> serde_json::Value {
    let (_, body) = http_get(n.http, "/health").expect("/health answers");
    json_body(&body)
}

fn metric(n: &Node, name: &str) -> f64 {
    let (_, body) = http_get(n.http, "/metrics").expect("/metrics answers");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Both nodes see each other alive and agree on the leader.
fn one_room(a: &Node, b: &Node) -> bool {
    let (ha, hb) = (health(a), health(b));
    let alive = |h: &serde_json::Value| {
        h["peers"]
            .as_array()
            .is_some_and(|p| p.len() == 1 && p[0]["alive"] == true)
    };
    alive(&ha) && alive(&hb) && ha["leader"] == hb["leader"] && ha["leader"].is_string()
}

fn wait_one_room(a: &Node, b: &Node, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if one_room(a, b) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Beats of a click log after `from_ns` (true CLOCK_MONOTONIC).
fn beats_after(n: &Node, from_ns: i64) -> Vec<i64> {
    std::fs::read_to_string(n.dir.join("clicks.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["t_mono_ns"].as_i64().unwrap_or(0) >= from_ns)
        .filter_map(|v| v["beat"].as_i64())
        .collect()
}

fn room_pair(tag: &str) -> (tempfile::TempDir, String, Node, Node) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("room.key");
    std::fs::write(&key, "7b".repeat(32)).unwrap();
    let room = format!("stranger-mesh-{tag}-{}", std::process::id());
    let a = start(dir.path(), 1, &room, &key);
    let b = start(dir.path(), 2, &room, &key);
    assert!(
        wait_one_room(&a, &b, Duration::from_secs(15)).is_some(),
        "the two nodes never formed one room"
    );
    (dir, room, a, b)
}

#[test]
fn a_thousand_unauthenticated_handshakes_leave_the_room_clicking() {
    let (_dir, _room, a, b) = room_pair("flood");
    let t0 = bandsync::sys::clock::mono_now_ns();
    let target: std::net::SocketAddr = format!("127.0.0.1:{}", a.quic).parse().unwrap();
    // 1,000 QUIC connections that complete TLS (or try to) and never prove the key.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (done, refused) = rt.block_on(async move {
        bandsync::net::auth::install_crypto();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(bandsync::net::auth::client_config().unwrap());
        let mut tasks = Vec::new();
        for _ in 0..1000 {
            let ep = ep.clone();
            tasks.push(tokio::spawn(async move {
                match ep.connect(target, "bandsync") {
                    Ok(c) => match tokio::time::timeout(Duration::from_secs(4), c).await {
                        // hold it open without a Hello until the node gives up on us
                        Ok(Ok(conn)) => {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                            true
                        }
                        _ => false,
                    },
                    Err(_) => false,
                }
            }));
        }
        let mut done = 0;
        let mut refused = 0;
        for t in tasks {
            if t.await.unwrap_or(false) {
                done += 1;
            } else {
                refused += 1;
            }
        }
        (done, refused)
    });
    eprintln!("flood: {done} handshakes completed, {refused} refused or timed out");
    assert!(refused > 0, "a flood of 1,000 was not capped at all");
    // The room stayed one room and kept clicking, with no beat skipped or doubled.
    assert!(one_room(&a, &b), "the flood split the room");
    std::thread::sleep(Duration::from_millis(600));
    for n in [&a, &b] {
        let beats = beats_after(n, t0);
        assert!(
            beats.len() >= 8,
            "{} clicked only {} times during the flood",
            n.dir.display(),
            beats.len()
        );
        for w in beats.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "a beat was skipped or doubled during the flood: {beats:?}"
            );
        }
    }
    let counted = metric(&a, "bandsync_refused_total{reason=\"preauth_full\"}")
        + metric(&a, "bandsync_quic_retries_total")
        + metric(&a, "bandsync_refused_total{reason=\"auth\"}");
    assert!(
        counted > 0.0,
        "the refused strangers were not counted in /metrics"
    );
    // bounded log lines: the node log does not carry a line per stranger
    let log = std::fs::read_to_string(a.dir.join("node.log")).unwrap_or_default();
    let lines = log
        .lines()
        .filter(|l| l.contains("authenticat") || l.contains("unauthenticated"))
        .count();
    assert!(lines < 50, "{lines} log lines about strangers");
}

#[test]
fn a_forged_advert_never_splits_the_room() {
    let (dir, room_name, a, mut b) = room_pair("spoof");
    let ids: Vec<String> = [&a, &b]
        .iter()
        .map(|n| health(n)["node"].as_str().unwrap().to_string())
        .collect();
    // A stranger on the network claims both members' ids at its own address (a closed
    // port), in this room (the room hash is public).
    let closed = free_port(true);
    let mut spoofs = Vec::new();
    for id in &ids {
        let (d, _rx) =
            bandsync::net::discovery::Discovery::start(bandsync::net::discovery::DiscoveryConfig {
                node_id: id.clone(),
                name: "evil".into(),
                room: room_name.clone(),
                quic_port: closed,
                interfaces: vec!["lo".into()],
                advertise: true,
                http_port: None,
                https_port: None,
            })
            .expect("the stranger's mDNS");
        spoofs.push(d);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(one_room(&a, &b), "the forged adverts split a running room");
    // The member restarts (new QUIC port, same id): the room must find it again
    // although a stranger claims its id.
    let _ = b.child.kill();
    let _ = b.child.wait();
    let key = dir.path().join("room.key");
    let b2 = {
        let n = start(dir.path(), 2, &room_name, &key);
        // keep the old Node's Drop from killing the new child
        std::mem::replace(&mut b, n)
    };
    drop(b2);
    // (joining the room's session waits for a mature clock estimate: ≤ 8 s)
    let took = wait_one_room(&a, &b, Duration::from_secs(20));
    eprintln!("member back despite forged adverts after {took:?}");
    assert!(
        took.is_some(),
        "a forged advert kept a restarted member out of the room:\n{}\n{}",
        health(&a),
        health(&b)
    );
    for s in spoofs {
        s.shutdown();
    }
}
