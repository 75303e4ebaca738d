//! `bandsync run --redis`: the leader mirrors the session into a real redis-server (and
//! lists its room for the venue), an outage never touches the click, and the mirror is
//! current again after it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, redis_server, Kill, NodeCmd, BIN};

fn hget(port: u16, key: &str, field: &str) -> Option<String> {
    let o = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "HGET", key, field])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

fn cli(quic: u16, key: &Path, room: &str, args: &[&str]) {
    let o = Command::new(BIN)
        .args(args)
        .arg("--node")
        .arg(format!("127.0.0.1:{quic}"))
        .args(["--room", room, "--room-key-file"])
        .arg(key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_leader_mirrors_to_redis_and_outages_never_touch_the_click() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    let room = format!(
        "mirror-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let rkey = format!("bandsync:room:{room}");
    let rport = free_port(false);
    let mut srv = Some(redis_server(rport));
    let (quic, http) = (free_port(true), free_port(false));
    let log = dir.path().join("clicks.jsonl");
    let _node = Kill(
        NodeCmd::new(dir.path().join("state"))
            .room(&room)
            .quic_port(quic)
            .http_port(http)
            .key_file(&key)
            .click_log(&log)
            .args(["--play", "--tempo", "150", "--redis"])
            .arg(format!("redis://127.0.0.1:{rport}/0"))
            .stderr_to(dir.path().join("node.log"))
            .spawn(),
    );
    let wait_for = |field: &str, want: &str, limit: Duration| -> Duration {
        let t = Instant::now();
        loop {
            if hget(rport, &rkey, field).as_deref() == Some(want) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < limit,
                "{field} never became {want} in Redis (log: {})",
                std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for("tempo_mbpm", "150000", Duration::from_secs(10));
    let t = Instant::now();
    cli(quic, &key, &room, &["tempo", "137", "--now"]);
    let cli_took = t.elapsed();
    let lag = wait_for("tempo_mbpm", "137000", Duration::from_secs(2));
    eprintln!(
        "tempo change visible in Redis {lag:?} after the CLI returned (CLI took {cli_took:?})"
    );
    assert!(lag < Duration::from_millis(500), "mirror lag {lag:?}");
    assert_eq!(hget(rport, &rkey, "epoch").as_deref(), Some("1"));
    // The venue view: the room is listed, with its one box and the leader's heartbeat.
    assert_eq!(hget(rport, &rkey, "boxes").as_deref(), Some("1"));
    assert!(hget(rport, &rkey, "seen_unix_ms").is_some());
    let member = Command::new("redis-cli")
        .args([
            "-p",
            &rport.to_string(),
            "SISMEMBER",
            "bandsync:rooms",
            &room,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&member.stdout).trim(), "1");

    // outage: stop redis for 10 s, change the meter meanwhile, bring it back
    drop(srv.take());
    let down_at = bandsync::sys::clock::mono_now_ns();
    cli(quic, &key, &room, &["meter", "5"]);
    std::thread::sleep(Duration::from_secs(10));
    let up_at = bandsync::sys::clock::mono_now_ns();
    srv = Some(redis_server(rport));
    let back = wait_for("meter", "5", Duration::from_secs(5));
    eprintln!("mirror current again {back:?} after redis came back");

    // the click never noticed
    let times: Vec<i64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["t_mono_ns"]
                .as_i64()
                .unwrap()
        })
        .filter(|t| *t > down_at - 2_000_000_000 && *t < up_at + 1_000_000_000)
        .collect();
    assert!(times.len() > 20, "{}", times.len());
    let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        worst < 460_000_000,
        "a gap of {worst} ns in the clicks during the Redis outage (137 BPM = 438 ms)"
    );

    // (after the click check: the song changes the tempo)
    // The song: its title is in the record (the venue shows it); no song, no field.
    assert_eq!(hget(rport, &rkey, "song"), None);
    let list = dir.path().join("set.toml");
    std::fs::write(
        &list,
        "[[song]]\ntitle = \"Opener\"\ntempo = 120\nmeter = 4\n\n[[song]]\ntitle = \"Waltz\"\ntempo = 90\nmeter = 3\n",
    )
    .unwrap();
    cli(
        quic,
        &key,
        &room,
        &["setlist", "load", list.to_str().unwrap()],
    );
    cli(quic, &key, &room, &["song", "2"]);
    wait_for("song", "Waltz", Duration::from_secs(2));
    wait_for("tempo_mbpm", "90000", Duration::from_secs(3));
    drop(srv);
}
