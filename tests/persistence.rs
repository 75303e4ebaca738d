//! The session survives `kill -9`: the state file always parses and holds a state the
//! node actually committed, and a box alone comes back with its last session.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{free_port, http_get, json_body, wait_health, NodeCmd, BIN};

struct Box_ {
    child: Child,
    quic: u16,
    http: u16,
}

fn start(state: &Path, key: &Path, room: &str, extra: &[&str]) -> Box_ {
    let (quic, http) = (free_port(true), free_port(false));
    let child = NodeCmd::new(state)
        .room(room)
        .quic_port(quic)
        .http_port(http)
        .key_file(key)
        .args(extra)
        .spawn();
    let b = Box_ { child, quic, http };
    assert!(
        wait_health(b.http, Duration::from_secs(10)),
        "node did not come up"
    );
    b
}

fn cli(b: &Box_, key: &Path, room: &str, args: &[&str]) -> bool {
    Command::new(BIN)
        .args(args)
        .arg("--node")
        .arg(format!("127.0.0.1:{}", b.quic))
        .args(["--room", room, "--room-key-file"])
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn health(b: &Box_) -> serde_json::Value {
    json_body(&http_get(b.http, "/health").unwrap().1)
}

#[test]
fn a_box_alone_comes_back_with_its_session_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "7e".repeat(32)).unwrap();
    let room = format!(
        "persist-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let state = dir.path().join("state");
    let mut b = start(&state, &key, &room, &["--tempo", "120", "--play"]);
    assert!(cli(&b, &key, &room, &["tempo", "137", "--now"]));
    assert!(cli(&b, &key, &room, &["meter", "7"]));
    std::thread::sleep(Duration::from_millis(300));
    b.child.kill().unwrap(); // SIGKILL
    b.child.wait().unwrap();
    // same command line: the saved session wins over the first-start flags
    let mut b = start(&state, &key, &room, &["--tempo", "120", "--play"]);
    let h = health(&b);
    assert_eq!(h["tempo"], 137.0, "{h}");
    assert_eq!(h["meter"], 7, "{h}");
    assert_eq!(h["playing"], true, "{h}");
    b.child.kill().unwrap();
    b.child.wait().unwrap();
}

#[test]
fn kill_9_during_a_burst_of_changes_never_corrupts_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "7f".repeat(32)).unwrap();
    let room = format!(
        "crash-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let state = dir.path().join("state");
    // CRASH_ROUNDS=n for a longer soak (the closing note's figure); CI runs 12.
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut changes_total = 0;
    let mut prev: Option<f64> = None;
    for round in 0..rounds {
        let mut b = start(&state, &key, &room, &[]);
        let mut asked = vec![];
        let until = Instant::now() + Duration::from_millis(300 + 97 * (round % 5) as u64);
        let mut bpm = 60 + round * 7;
        while Instant::now() < until {
            bpm = 40 + (bpm * 13 + 7) % 300;
            if cli(&b, &key, &room, &["tempo", &bpm.to_string(), "--now"]) {
                asked.push(bpm as f64);
            }
        }
        b.child.kill().unwrap();
        b.child.wait().unwrap();
        let text = std::fs::read_to_string(state.join("session.json"))
            .expect("a session file after changes");
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("round {round}: corrupt state {text:?}: {e}"));
        let tempo = v["tempo"].as_u64().expect("tempo in milli-BPM") as f64 / 1000.0;
        // committed means: one of this round's changes, or (if none was saved yet) the
        // state the previous round left
        assert!(
            asked.contains(&tempo) || prev == Some(tempo),
            "round {round}: saved tempo {tempo} was never committed ({asked:?}, before: {prev:?})"
        );
        prev = Some(tempo);
        changes_total += asked.len();
        // and the restarted node reads it back
        let mut b = start(&state, &key, &room, &[]);
        let h = health(&b);
        assert_eq!(
            h["tempo"].as_f64().unwrap(),
            tempo,
            "round {round}: restored tempo"
        );
        b.child.kill().unwrap();
        b.child.wait().unwrap();
    }
    eprintln!(
        "{rounds} kill -9 rounds, {changes_total} committed changes: every state file parsed and held a committed tempo"
    );
}

#[test]
fn a_corrupt_state_file_is_reported_and_the_node_starts_from_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "70".repeat(32)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("session.json"), "{\"tempo\": 13").unwrap();
    let room = format!(
        "corrupt-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    let mut b = start(&state, &key, &room, &[]);
    let h = health(&b);
    assert_eq!(h["tempo"], 120.0);
    b.child.kill().unwrap();
    b.child.wait().unwrap();
}
