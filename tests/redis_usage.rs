//! Issue 13 against a real `redis-server` (Debian package `redis-server`): the room's
//! record is never stale after a restart (a leader refused by the fence leads above
//! the held epoch), a deposed box never overwrites the live leader's record, and the
//! usage log's periods (a `kill -9` in the middle included) match the clicks and the
//! room's Redis stream.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{free_port, http_get, json_body, redis_server, Kill, NodeCmd, BIN};

fn redis_cli(port: u16, args: &[&str]) -> String {
    let o = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn hget(port: u16, room: &str, field: &str) -> String {
    redis_cli(port, &["HGET", &format!("bandsync:room:{room}"), field])
}

/// One box of `room`, its QUIC port, its log.
struct Box {
    dir: PathBuf,
    room: String,
    key: PathBuf,
    quic: u16,
    http: u16,
    redis: u16,
}

impl Box {
    fn new(dir: &Path, name: &str, room: &str, key: &Path, redis: u16) -> Box {
        Box {
            dir: dir.join(name),
            room: room.into(),
            key: key.into(),
            quic: free_port(true),
            http: free_port(false),
            redis,
        }
    }

    fn log(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    fn start(&self, extra: &[&str], clicks: Option<&Path>) -> Kill {
        let mut c = NodeCmd::new(&self.dir)
            .room(&self.room)
            .quic_port(self.quic)
            .http_port(self.http)
            .key_file(&self.key)
            .args(extra)
            .arg("--redis")
            .arg(format!("redis://127.0.0.1:{}/0", self.redis))
            .env("BANDSYNC_LOG", "info")
            .stderr_append(self.log());
        if let Some(l) = clicks {
            c = c.click_log(l);
        }
        let k = Kill(c.spawn());
        let t = Instant::now();
        while http_get(self.http, "/health").is_none_or(|(code, _)| code != 200) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the box did not come up: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        k
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) {
        let o = Command::new(BIN)
            .args(args)
            .arg("--node")
            .arg(format!("127.0.0.1:{}", self.quic))
            .args(["--room", &self.room, "--room-key-file"])
            .arg(&self.key)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn node_id(&self) -> String {
        std::fs::read_to_string(self.dir.join("node-id"))
            .unwrap()
            .trim()
            .to_string()
    }
}

/// Wait until the room's hash has `field` = `want`; the time it took.
fn wait_field(
    port: u16,
    room: &str,
    field: &str,
    want: &str,
    limit: Duration,
    why: &dyn Fn() -> String,
) -> Duration {
    let t = Instant::now();
    loop {
        if hget(port, room, field) == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{field} never became {want} in Redis within {limit:?} (it is {:?}); {}",
            hget(port, room, field),
            why()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn key_file(dir: &Path, name: &str, byte: &str) -> PathBuf {
    let k = dir.join(name);
    std::fs::write(&k, byte.repeat(32)).unwrap();
    k
}

#[test]
fn a_restarted_leader_is_never_stale() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", "ab");
    let rport = free_port(false);
    let _srv = redis_server(rport);
    let room = "restart";
    let b = Box::new(dir.path(), "a", room, &key, rport);
    let node = b.start(&["--tempo", "120"], None);
    let why = || b.log_text();
    wait_field(
        rport,
        room,
        "tempo_mbpm",
        "120000",
        Duration::from_secs(5),
        &why,
    );
    for bpm in ["121", "122", "123"] {
        b.cli(&["tempo", bpm, "--now"]);
    }
    wait_field(
        rport,
        room,
        "tempo_mbpm",
        "123000",
        Duration::from_secs(2),
        &why,
    );
    let before: u64 = hget(rport, room, "version").parse().unwrap();
    assert!(before >= 3, "version {before}");
    node.kill9();
    let _node = b.start(&[], None);
    let t = Instant::now();
    b.cli(&["tempo", "99", "--now"]);
    let lag = wait_field(
        rport,
        room,
        "tempo_mbpm",
        "99000",
        Duration::from_secs(1),
        &why,
    );
    eprintln!("after kill -9 and restart: the change is in Redis {lag:?} after the CLI returned ({:?} in all)", t.elapsed());
    assert!(hget(rport, room, "epoch").parse::<u64>().unwrap() >= 2);
    assert_eq!(hget(rport, room, "leader"), b.node_id());
    assert!(
        b.log_text().contains("leading at a higher epoch"),
        "{}",
        b.log_text()
    );
}

#[test]
fn a_whole_room_restarted_is_never_stale() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", "cd");
    let rport = free_port(false);
    let _srv = redis_server(rport);
    let room = "whole";
    let a = Box::new(dir.path(), "a", room, &key, rport);
    let b = Box::new(dir.path(), "b", room, &key, rport);
    let why = || format!("a: {}\nb: {}", a.log_text(), b.log_text());
    let na = a.start(&["--tempo", "120", "--play"], None);
    let nb = b.start(&[], None);
    wait_field(rport, room, "boxes", "2", Duration::from_secs(20), &why);
    a.cli(&["tempo", "131", "--now"]);
    a.cli(&["tempo", "132", "--now"]);
    wait_field(
        rport,
        room,
        "tempo_mbpm",
        "132000",
        Duration::from_secs(2),
        &why,
    );
    // power cut: both at once
    na.kill9();
    nb.kill9();
    let _na = a.start(&[], None);
    let _nb = b.start(&[], None);
    // A change made at once: the boxes come back alone, and until they have found
    // each other the one Redis sees alive holds the record (the other waits, refused:
    // it cannot tell a restarting room from a live leader elsewhere); once they meet,
    // the later decision wins and the room's leader writes it.
    let t = Instant::now();
    b.cli(&["tempo", "77", "--now"]);
    let lag = wait_field(
        rport,
        room,
        "tempo_mbpm",
        "77000",
        Duration::from_secs(1),
        &why,
    );
    eprintln!(
        "whole room restarted: a change made at once is in Redis {lag:?} after the CLI returned ({:?} in all)",
        t.elapsed()
    );
    // The room back together (one leader, one epoch, one decision on both boxes): each
    // change is in Redis within a second, whoever leads (the restored epochs are fenced
    // out: the leader leads above them).
    wait_field(rport, room, "boxes", "2", Duration::from_secs(20), &why);
    let t = Instant::now();
    loop {
        let view = |b: &Box| {
            let j = http_get(b.http, "/health")
                .map(|(_, body)| json_body(&body))
                .unwrap_or_default();
            (
                j["leader"].clone(),
                j["epoch"].clone(),
                j["decided"].clone(),
            )
        };
        if view(&a) == view(&b) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the room never came back together: {}",
            why()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut lags = Vec::new();
    for (i, bpm) in ["78", "79", "80"].iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        via.cli(&["tempo", bpm, "--now"]);
        lags.push(wait_field(
            rport,
            room,
            "tempo_mbpm",
            &format!("{bpm}000"),
            Duration::from_secs(1),
            &why,
        ));
    }
    let lag = lags.iter().max().unwrap();
    eprintln!("…and after the boxes met again: {lag:?}");
}

#[test]
fn a_deposed_box_never_overwrites_the_live_leader() {
    let dir = tempfile::tempdir().unwrap();
    let rport = free_port(false);
    let _srv = redis_server(rport);
    let room = "deposed";
    // Box A leads the room at first.
    let a = Box::new(
        dir.path(),
        "a",
        room,
        &key_file(dir.path(), "ka", "11"),
        rport,
    );
    let na = a.start(&["--tempo", "100", "--play"], None);
    let why = || a.log_text();
    wait_field(
        rport,
        room,
        "tempo_mbpm",
        "100000",
        Duration::from_secs(5),
        &why,
    );
    a.cli(&["tempo", "101", "--now"]);
    wait_field(
        rport,
        room,
        "tempo_mbpm",
        "101000",
        Duration::from_secs(2),
        &why,
    );
    let a_epoch: u64 = hget(rport, room, "epoch").parse().unwrap();
    na.kill9();
    // A is gone; B (a box A cannot reach: another room key) takes over the room's
    // record once A's heartbeat is stale, above A's epoch.
    std::thread::sleep(Duration::from_millis(3_500));
    let b = Box::new(
        dir.path(),
        "b",
        room,
        &key_file(dir.path(), "kb", "22"),
        rport,
    );
    let nb = b.start(&["--tempo", "140"], None);
    let whyb = || format!("a: {}\nb: {}", a.log_text(), b.log_text());
    wait_field(
        rport,
        room,
        "leader",
        &b.node_id(),
        Duration::from_secs(3),
        &whyb,
    );
    b.cli(&["tempo", "141", "--now"]);
    wait_field(
        rport,
        room,
        "tempo_mbpm",
        "141000",
        Duration::from_secs(2),
        &whyb,
    );
    let b_epoch: u64 = hget(rport, room, "epoch").parse().unwrap();
    assert!(b_epoch > a_epoch, "{b_epoch} > {a_epoch}");

    // A comes back, still believing it leads at its old epoch: Redis shows B, live.
    let a_back = unix_ms();
    let _na = a.start(&[], None);
    a.cli(&["tempo", "66", "--now"]);
    a.cli(&["stop"]);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(hget(rport, room, "leader"), b.node_id(), "{}", whyb());
        assert_eq!(hget(rport, room, "tempo_mbpm"), "141000", "{}", whyb());
        assert_eq!(hget(rport, room, "epoch"), b_epoch.to_string());
        std::thread::sleep(Duration::from_millis(50));
    }
    let want = format!(
        "deposed: Redis shows leader {} at epoch {b_epoch}",
        b.node_id()
    );
    assert!(
        a.log_text().contains(&want),
        "A's log lacks {want:?}: {}",
        a.log_text()
    );
    // no usage entry of A's made it into the stream after B took over
    let entries = stream(rport, room);
    assert!(!entries.is_empty());
    for (id, kv) in &entries {
        let epoch: u64 = field(kv, "epoch").unwrap().parse().unwrap();
        let t: u64 = id.split('-').next().unwrap().parse().unwrap();
        assert!(
            epoch >= b_epoch || (t as f64) < a_back,
            "an entry of A's after B took over: {id} {kv:?}"
        );
    }

    // B goes away: once its heartbeat is stale, A leads the room's record again.
    nb.kill9();
    a.cli(&["tempo", "67", "--now"]);
    let took = wait_field(
        rport,
        room,
        "tempo_mbpm",
        "67000",
        Duration::from_secs(6),
        &whyb,
    );
    eprintln!("B gone: A leads the record again after {took:?}");
    assert_eq!(hget(rport, room, "leader"), a.node_id());
    assert!(hget(rport, room, "epoch").parse::<u64>().unwrap() > b_epoch);
}

/// The room's usage stream: (id, [field, value, …]).
fn stream(port: u16, room: &str) -> Vec<(String, Vec<String>)> {
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "--json",
            "XRANGE",
            &format!("bandsync:room:{room}:usage"),
            "-",
            "+",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn field(kv: &[String], k: &str) -> Option<String> {
    kv.chunks(2).find(|c| c[0] == k).map(|c| c[1].clone())
}

/// One period as `bandsync usage --json` prints it.
#[derive(serde::Deserialize, Debug)]
struct Period {
    start_unix_ms: u64,
    end_unix_ms: Option<u64>,
    duration_s: f64,
    tempi: Vec<f64>,
    closed: String,
}

fn periods(dir: &Path) -> Vec<Period> {
    let o = Command::new(BIN)
        .args(["usage", "--json", "--state-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// (first click, last click) of a click log, as Unix ms.
fn clicks(log: &Path, mono_to_unix_ms: f64) -> (f64, f64) {
    let t: Vec<i64> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["t_mono_ns"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert!(t.len() > 3, "{} clicks in {}", t.len(), log.display());
    let ms = |ns: i64| ns as f64 / 1e6 + mono_to_unix_ms;
    (ms(t[0]), ms(*t.last().unwrap()))
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as f64
        / 1e6
}

#[test]
fn usage_periods_survive_a_kill_and_match_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k", "ef");
    let rport = free_port(false);
    let _srv = redis_server(rport);
    let room = "usage";
    let b = Box::new(dir.path(), "a", room, &key, rport);
    let offset = unix_ms() - bandsync::sys::clock::mono_now_ns() as f64 / 1e6;
    const BEAT_MS: f64 = 400.0; // 150 BPM

    // period 1: --play, then `stop` (at the next beat)
    let c1 = dir.path().join("c1.jsonl");
    let node = b.start(&["--tempo", "150", "--play"], Some(&c1));
    std::thread::sleep(Duration::from_millis(2_500));
    b.cli(&["stop"]);
    std::thread::sleep(Duration::from_millis(1_000));
    let p1 = clicks(&c1, offset);
    drop(node);
    // period 2: started again, tempo changed, then kill -9
    let c2 = dir.path().join("c2.jsonl");
    let node = b.start(&[], Some(&c2));
    b.cli(&["start"]);
    std::thread::sleep(Duration::from_millis(1_500));
    b.cli(&["tempo", "120", "--now"]);
    std::thread::sleep(Duration::from_millis(1_500));
    let killed_at = unix_ms();
    node.kill9();
    let p2 = clicks(&c2, offset);
    // period 3: the restarted box plays on (its saved session was playing)
    let c3 = dir.path().join("c3.jsonl");
    let node = b.start(&[], Some(&c3));
    std::thread::sleep(Duration::from_millis(6_000)); // the recovered period goes upstream after 5 s
    b.cli(&["stop"]);
    std::thread::sleep(Duration::from_millis(1_000));
    let p3 = clicks(&c3, offset);

    let got = periods(&b.dir);
    eprintln!("{got:#?}");
    assert_eq!(got.len(), 3, "{got:?}");
    let close = |what: &str, a: f64, b: f64| {
        assert!(
            (a - b).abs() <= 500.0,
            "{what}: {a} vs {b} ({} ms apart)",
            a - b
        );
        eprintln!("{what}: {:+.0} ms", a - b);
    };
    // (start = the first click; a stop lands on the beat after the last click)
    close("period 1 start", got[0].start_unix_ms as f64, p1.0);
    close(
        "period 1 end",
        got[0].end_unix_ms.unwrap() as f64,
        p1.1 + BEAT_MS,
    );
    assert_eq!(got[0].closed, "stop");
    assert_eq!(got[0].tempi, vec![150.0]);
    close("period 2 start", got[1].start_unix_ms as f64, p2.0);
    close(
        "period 2 end (kill -9)",
        got[1].end_unix_ms.unwrap() as f64,
        killed_at,
    );
    assert_eq!(got[1].closed, "crash");
    assert_eq!(got[1].tempi, vec![150.0, 120.0]);
    close("period 3 start", got[2].start_unix_ms as f64, p3.0);
    close(
        "period 3 end",
        got[2].end_unix_ms.unwrap() as f64,
        p3.1 + 500.0,
    );
    for p in &got {
        let d = (p.end_unix_ms.unwrap() - p.start_unix_ms) as f64 / 1000.0;
        assert!((p.duration_s - d).abs() < 0.002, "{p:?}");
    }
    // --since: a day after today lists nothing, today lists all
    let o = Command::new(BIN)
        .args(["usage", "--csv", "--since", "2999-01-01", "--state-dir"])
        .arg(&b.dir)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "header only"
    );

    // The stream: one stop per period, with the same start and played_ms.
    let entries = stream(rport, room);
    let mut stops: Vec<(u64, u64)> = entries
        .iter()
        .filter(|(_, kv)| field(kv, "event").as_deref() == Some("stop"))
        .map(|(_, kv)| {
            (
                field(kv, "start_unix_ms").unwrap().parse().unwrap(),
                field(kv, "played_ms").unwrap().parse().unwrap(),
            )
        })
        .collect();
    stops.sort();
    let local: Vec<(u64, u64)> = got
        .iter()
        .map(|p| (p.start_unix_ms, p.end_unix_ms.unwrap() - p.start_unix_ms))
        .collect();
    assert_eq!(stops, local, "stream {entries:?}");
    let starts = entries
        .iter()
        .filter(|(_, kv)| field(kv, "event").as_deref() == Some("start"))
        .count();
    assert_eq!(starts, 3, "{entries:?}");
    for (_, kv) in &entries {
        assert!(
            field(kv, "epoch").is_some() && field(kv, "t_unix_ms").is_some(),
            "{kv:?}"
        );
    }
    // …which is what the venue's played_today_s sums (unless the test straddled the
    // local midnight: then only today's share)
    let v = Command::new(BIN)
        .args(["venue", "--json", "--redis"])
        .arg(format!("redis://127.0.0.1:{rport}/0"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let played = v["rooms"][0]["played_today_s"].as_u64().unwrap();
    let total: u64 = local.iter().map(|(_, ms)| ms).sum::<u64>() / 1000;
    let midnight = bandsync::mirror::local_midnight_ms(bandsync::mirror::now_unix_ms());
    if local[0].0 >= midnight {
        assert_eq!(played, total);
    } else {
        assert!(played <= total, "{played} vs {total}");
    }
    drop(node);
}

#[test]
fn outbid_epoch_only_raises_a_leaders_epoch() {
    use bandsync::core::room::{Action, Room, RoomConfig};
    use bandsync::core::timeline::{Meter, Quantum, Tempo, Timeline};
    use bandsync::core::wire::SessionId;
    let mut room = Room::new(
        RoomConfig {
            me: "00000000000000aa".into(),
            name: "a".into(),
            priority: 0,
            quantum: Quantum::Bar,
            wall_offset_ns: 0,
        },
        SessionId {
            born_ms: 1,
            by: 0xaa,
        },
        Timeline::start_at(
            0,
            Tempo::from_bpm(120.0).unwrap(),
            Meter::new(4).unwrap(),
            false,
        ),
    );
    room.restore_epoch(4);
    let mut out = Vec::new();
    room.tick(1_000_000, &mut out);
    out.clear();
    assert!(room.leading());
    assert!(!room.outbid_epoch(4), "not above the epoch it holds");
    assert!(!room.outbid_epoch(u64::MAX), "beyond what the wire carries");
    assert!(room.outbid_epoch(9));
    assert_eq!(room.epoch(), 9);
    room.tick(2_000_000, &mut out);
    // announced, published and persisted at the next tick
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Persist(p) if p.epoch == 9)));
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::Publish { epoch: 9, .. })));
    assert!(out.iter().any(|a| matches!(a, Action::Broadcast(_))));
}
