//! The daemon speaks systemd's notify protocol: READY=1 once it runs, WATCHDOG=1 from
//! its room loop while the click runs, and no more watchdog pings when that loop
//! freezes (test hook `BANDSYNC_TEST_FREEZE_AFTER_MS`).

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{NodeCmd, BIN};

fn recv_all(sock: &UnixDatagram, until: Instant) -> Vec<(Duration, String)> {
    let start = Instant::now();
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((
                start.elapsed(),
                String::from_utf8_lossy(&buf[..n]).to_string(),
            ));
        }
    }
    out
}

#[test]
fn ready_then_watchdog_then_silence_when_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let t0 = Instant::now();
    let mut child = NodeCmd::new(dir.path().join("state"))
        .room(&format!(
            "sd-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        ))
        .arg("--play")
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env("BANDSYNC_TEST_FREEZE_AFTER_MS", "3000")
        .spawn();
    let msgs = recv_all(&sock, t0 + Duration::from_millis(6000));
    let _ = child.kill();
    let _ = child.wait();
    let ready = msgs
        .iter()
        .find(|(_, m)| m.lines().any(|l| l == "READY=1"))
        .expect("READY=1 was sent");
    assert!(
        ready.0 < Duration::from_secs(1),
        "READY=1 after {:?}",
        ready.0
    );
    let dogs: Vec<Duration> = msgs
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|x| x.0)
        .collect();
    let before: Vec<_> = dogs
        .iter()
        .filter(|t| **t < Duration::from_millis(2900))
        .collect();
    // The freeze comes 3 s after the process started, which is no later than READY=1
    // in this test's time (a loaded machine may start the process late).
    let frozen_by = ready.0 + Duration::from_millis(3400);
    let after: Vec<_> = dogs.iter().filter(|t| **t > frozen_by).collect();
    assert!(
        before.len() >= 5,
        "periodic WATCHDOG=1 before the freeze: {dogs:?}"
    );
    assert!(
        after.is_empty(),
        "no WATCHDOG=1 once the loop froze: {dogs:?}"
    );
    assert!(
        msgs.iter()
            .any(|(_, m)| m.starts_with("STATUS=") && m.contains("BPM")),
        "STATUS= with the tempo: {msgs:?}"
    );
}

#[test]
fn the_unit_file_verifies() {
    let o = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/verify-unit.sh"
        ))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn install_script_installs_into_a_staging_root_and_uninstalls() {
    let root = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
            .arg("--root")
            .arg(root.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&["--binary", BIN]);
    assert!(root.path().join("usr/local/bin/bandsync").exists());
    assert!(root.path().join("etc/bandsync/bandsync.toml").exists());
    assert!(root
        .path()
        .join("etc/systemd/system/bandsync.service")
        .exists());
    // the box's kernel settings (fast ARP re-probe after a heal)
    let sysctl = root.path().join("etc/sysctl.d/60-bandsync-net.conf");
    assert!(std::fs::read_to_string(&sysctl)
        .unwrap()
        .contains("retrans_time_ms = 100"));
    run(&["--binary", BIN]); // idempotent
    run(&["--uninstall", "--purge"]);
    assert!(!root.path().join("usr/local/bin/bandsync").exists());
    assert!(!sysctl.exists());
}
