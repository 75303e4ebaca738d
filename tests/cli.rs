//! The stage tech's CLI against a running node, and the node's /health.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bandsync");

mod common;
use common::free_port;

struct Daemon {
    child: Child,
    quic: u16,
    http: u16,
    key: PathBuf,
    room: String,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("room.key");
        std::fs::write(&key, "c3".repeat(32)).unwrap();
        let (quic, http) = (free_port(true), free_port(false));
        let room = format!("cli-{}", dir.path().file_name().unwrap().to_string_lossy());
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let child = Command::new(BIN)
            .args([
                "run",
                "--audio",
                "null",
                "--interface",
                "lo",
                "--name",
                "stage-left",
                "--room",
                &room,
            ])
            .arg("--quic")
            .arg(format!("127.0.0.1:{quic}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--room-key-file")
            .arg(&key)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(args)
            .env_remove("BANDSYNC_TEST_CLOCK")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            quic,
            http,
            key,
            room,
            dir,
        };
        let t = Instant::now();
        while get(d.http, "/health").is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "daemon did not come up: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_key(args, &self.key)
    }
    fn cli_with_key(&self, args: &[&str], key: &Path) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--node")
            .arg(format!("127.0.0.1:{}", self.quic))
            .arg("--room")
            .arg(&self.room)
            .arg("--room-key-file")
            .arg(key)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback; `None` while nothing listens.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json_body(body: &str) -> serde_json::Value {
    // tolerate chunked encoding: take the outermost JSON object
    let a = body.find('{').expect("a JSON object");
    let b = body.rfind('}').expect("a JSON object");
    serde_json::from_str(&body[a..=b]).unwrap()
}

#[test]
fn status_health_and_changes() {
    let d = Daemon::start(&["--tempo", "100"]);
    let (code, body) = get(d.http, "/health").unwrap();
    assert_eq!(code, 200);
    let h = json_body(&body);
    for k in [
        "node", "name", "role", "leader", "epoch", "pinned", "playing", "tempo", "peers",
    ] {
        assert!(h.get(k).is_some(), "/health lacks {k}: {h}");
    }
    assert_eq!(h["role"], "leader");
    assert_eq!(h["name"], "stage-left");
    assert_eq!(h["tempo"], 100.0);

    let o = d.cli(&["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["node"], h["node"]);
    assert_eq!(s["playing"], false);
    assert_eq!(
        s["phone_url"],
        format!("http://stage-left.local:{}/", d.http),
        "{s}"
    );
    let o = d.cli(&["status"]);
    assert!(
        o.status.success() && text(&o).contains("leader"),
        "{}",
        text(&o)
    );
    // piped: no QR code unless asked; --qr prints the phone URL as one
    assert!(!text(&o).contains("scan to follow"), "{}", text(&o));
    let o = d.cli(&["status", "--qr"]);
    let qr = bandsync::cli::phone_qr(&format!("http://stage-left.local:{}/", d.http)).unwrap();
    assert!(
        o.status.success() && text(&o).contains("scan to follow") && text(&o).contains(&qr),
        "{}",
        text(&o)
    );

    let o = d.cli(&["tempo", "132", "--now"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("tempo 132"), "{}", text(&o));
    let o = d.cli(&["start"]);
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(2_500));
    let s: serde_json::Value =
        serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["tempo"], 132.0, "{s}");
    assert_eq!(s["playing"], true, "{s}");

    let (code, metrics) = get(d.http, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("bandsync_clicks_total") && metrics.contains("bandsync_epoch"),
        "{metrics}"
    );

    // pin yourself by name, then unpin
    let o = d.cli(&["pin", "stage-left"]);
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(300));
    let s: serde_json::Value =
        serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["pinned"], h["node"], "{s}");
    assert!(d.cli(&["unpin"]).status.success());
}

#[test]
fn cli_errors_are_plain_sentences() {
    let d = Daemon::start(&[]);
    let o = d.cli(&["pin", "nobody-by-that-name"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("unknown node"), "{}", text(&o));

    let o = d.cli(&["tempo", "500"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("between 20 and 400"), "{}", text(&o));

    let o = d.cli(&["meter", "0"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("between 1 and 16"), "{}", text(&o));

    let wrong = d.dir.path().join("wrong.key");
    std::fs::write(&wrong, "d4".repeat(32)).unwrap();
    let o = d.cli_with_key(&["status"], &wrong);
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong room key"), "{}", text(&o));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        d.log().contains("room-key authentication"),
        "the node logs why: {}",
        d.log()
    );

    // no room by that name on loopback
    let o = Command::new(BIN)
        .args([
            "status",
            "--room",
            "no-such-room-anywhere",
            "--interface",
            "lo",
            "--room-key-file",
        ])
        .arg(&d.key)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("no bandsync node"), "{}", text(&o));
}
