//! The venue view (SPEC §4 "Venue", issue 13 item 4) against a real `redis-server`:
//! `bandsync venue --json` over hundreds of rooms, and a box's `/venue` and
//! `/venue.json` following a room's change live.

use std::process::Command;
use std::time::{Duration, Instant};

use bandsync::mirror::{self, Conn, MirrorRecord, RedisUrl};

mod common;
use common::{free_port, http_get, json_body, redis_server, Kill, NodeCmd, BIN};

/// `n` rooms written through the mirror's fenced write, as their leaders would; room
/// `i` plays at 60 + i/2 BPM when `i` is odd.
fn seed(port: u16, n: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).unwrap();
        let mut c = Conn::connect(&url, Duration::from_secs(2)).await.unwrap();
        for i in 0..n {
            let room = format!("room-{i:04}");
            let rec = MirrorRecord {
                room: room.clone(),
                epoch: 1,
                version: 1,
                leader: format!("node-{i:04}"),
                tempo_mbpm: 60_000 + i * 500,
                meter: (i % 7 + 2) as u8,
                playing: i % 2 == 1,
                pinned: None,
                song: None,
                boxes: 1 + i % 4,
                updated_unix_ms: mirror::now_unix_ms(),
            };
            assert!(mirror::write_fenced(&mut c, &room, &rec).await.unwrap());
            let played = (1000 * (i + 1)).to_string();
            mirror::append_usage(
                &mut c,
                &room,
                1,
                &[("event", "stop"), ("played_ms", &played)],
            )
            .await
            .unwrap();
        }
    });
}

fn venue_json(port: u16) -> (serde_json::Value, Duration) {
    let t = Instant::now();
    let o = Command::new(BIN)
        .args(["venue", "--json", "--redis"])
        .arg(format!("redis://127.0.0.1:{port}/0"))
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (serde_json::from_slice(&o.stdout).unwrap(), took)
}

#[test]
fn venue_lists_hundreds_of_rooms_within_a_second() {
    let port = free_port(false);
    let _srv = redis_server(port);
    seed(port, 250);
    // one room's leader went quiet long ago
    let o = Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "HSET",
            "bandsync:room:room-0007",
            "seen_unix_ms",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let mut worst = Duration::ZERO;
    for _ in 0..3 {
        let (v, took) = venue_json(port);
        worst = worst.max(took);
        let rooms = v["rooms"].as_array().unwrap();
        assert_eq!(rooms.len(), 250);
        assert!(
            v["invalid"].as_array().unwrap().is_empty(),
            "{}",
            v["invalid"]
        );
        let r = rooms.iter().find(|r| r["room"] == "room-0011").unwrap();
        assert_eq!(r["tempo"], 65.5);
        assert_eq!(r["playing"], true);
        assert_eq!(r["leader"], "node-0011");
        assert_eq!(r["boxes"], 4);
        assert_eq!(r["meter"], 6);
        assert_eq!(r["played_today_s"], 12);
        assert_eq!(r["gone"], false);
        for k in ["song", "updated_unix_ms"] {
            assert!(r.get(k).is_some(), "{k} missing: {r}");
        }
        let gone: Vec<_> = rooms
            .iter()
            .filter(|r| r["gone"] == true)
            .map(|r| r["room"].clone())
            .collect();
        assert_eq!(gone, vec![serde_json::json!("room-0007")]);
    }
    eprintln!(
        "bandsync venue --json over 250 rooms: worst of 3 runs {worst:?} (process start included)"
    );
    assert!(worst <= Duration::from_secs(1), "{worst:?}");
    // the table
    let o = Command::new(BIN)
        .args(["venue", "--redis"])
        .arg(format!("redis://127.0.0.1:{port}/0"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("250 room(s), 124 playing, 1 gone"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("room-0007") && l.contains("gone")),
        "{table}"
    );
}

#[test]
fn a_box_serves_the_venue_live() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "9a".repeat(32)).unwrap();
    let port = free_port(false);
    let mut srv = Some(redis_server(port));
    seed(port, 30);
    let (quic, http) = (free_port(true), free_port(false));
    let _node = Kill(
        NodeCmd::new(dir.path().join("state"))
            .room("front")
            .quic_port(quic)
            .http_port(http)
            .key_file(&key)
            .args(["--tempo", "110", "--play", "--redis"])
            .arg(format!("redis://127.0.0.1:{port}/0"))
            .stderr_to(dir.path().join("node.log"))
            .spawn(),
    );
    let log = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    let front = |v: &serde_json::Value| {
        v["rooms"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["room"] == "front").cloned())
    };
    let wait = |want: f64, limit: Duration| -> Duration {
        let t = Instant::now();
        loop {
            if let Some((200, body)) = http_get(http, "/venue.json") {
                let v = json_body(&body);
                let n = v["rooms"].as_array().unwrap().len();
                assert!(n == 30 || n == 31, "{n} rooms");
                if front(&v).is_some_and(|r| r["tempo"] == want && r["playing"] == true) {
                    return t.elapsed();
                }
            }
            assert!(
                t.elapsed() < limit,
                "/venue.json never showed {want} BPM: {:?}\n{}",
                http_get(http, "/venue.json"),
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait(110.0, Duration::from_secs(20));
    let o = Command::new(BIN)
        .args([
            "tempo",
            "123",
            "--now",
            "--node",
            &format!("127.0.0.1:{quic}"),
            "--room",
            "front",
            "--room-key-file",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let took = wait(123.0, Duration::from_secs(1));
    eprintln!("a tempo change shows in /venue.json {took:?} after the CLI returned");

    // the page: self-contained, polling /venue.json, Redis data as text only
    let (code, page) = http_get(http, "/venue").unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("fetch(\"/venue.json\"") && page.contains("textContent"));
    assert!(!page.contains("innerHTML") && !page.contains("http://") && !page.contains("https://"));

    // the mirror's counters
    let metric = |name: &str| -> f64 {
        let (_, m) = http_get(http, "/metrics").unwrap();
        m.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
    };
    assert!(metric("bandsync_redis_writes_total") >= 2.0);
    assert_eq!(metric("bandsync_redis_refused_total"), 0.0);
    assert_eq!(metric("bandsync_redis_state{state=\"connected\"}"), 1.0);
    assert_eq!(metric("bandsync_redis_lag_seconds"), 0.0);

    // Redis down: the venue says so, the box goes on
    drop(srv.take());
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(metric("bandsync_redis_errors_total") >= 1.0);
    assert_eq!(metric("bandsync_redis_state{state=\"stale\"}"), 1.0);
    // a change Redis cannot take: the lag grows
    let o = Command::new(BIN)
        .args([
            "meter",
            "5",
            "--node",
            &format!("127.0.0.1:{quic}"),
            "--room",
            "front",
            "--room-key-file",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_millis(300));
    assert!(metric("bandsync_redis_lag_seconds") > 0.0);
    let (code, body) = http_get(http, "/venue.json").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(json_body(&body)["error"].as_str().is_some(), "{body}");
    assert_eq!(http_get(http, "/health").unwrap().0, 200);
    srv = Some(redis_server(port));
    let t = Instant::now();
    while http_get(http, "/venue.json").is_none_or(|(c, _)| c != 200) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the venue never came back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    while metric("bandsync_redis_reconnects_total") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the mirror never reconnected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(srv);
}

#[test]
fn a_box_without_redis_has_no_venue() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port(false);
    let _node = Kill(
        NodeCmd::new(dir.path().join("state"))
            .http_port(http)
            .spawn(),
    );
    let t = Instant::now();
    while http_get(http, "/health").is_none() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in ["/venue", "/venue.json"] {
        let (code, body) = http_get(http, p).unwrap();
        assert_eq!(code, 404, "{p}: {body}");
        assert!(body.contains("without --redis"), "{body}");
    }
    let (_, m) = http_get(http, "/metrics").unwrap();
    assert!(
        !m.contains("bandsync_redis_"),
        "no mirror, no redis metrics"
    );
}
