//! The stage tech's CLI against a running node, and the node's /health.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

mod common;
use common::{free_port, http_get, json_body, wait_health, NodeCmd, BIN};

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
        let child = NodeCmd::new(dir.path().join("state"))
            .name("stage-left")
            .room(&room)
            .quic_port(quic)
            .http_port(http)
            .key_file(&key)
            .args(args)
            .stderr_to(dir.path().join("node.log"))
            .spawn();
        let d = Daemon {
            child,
            quic,
            http,
            key,
            room,
            dir,
        };
        assert!(
            wait_health(d.http, Duration::from_secs(10)),
            "daemon did not come up: {}",
            d.log()
        );
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

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn status_health_and_changes() {
    let d = Daemon::start(&["--tempo", "100"]);
    let (code, body) = http_get(d.http, "/health").unwrap();
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

    let (code, metrics) = http_get(d.http, "/metrics").unwrap();
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
