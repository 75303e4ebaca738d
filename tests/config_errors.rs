//! `bandsync run` with a bad flag or config file stops before it starts anything: exit
//! code 78 (EX_CONFIG: systemd's unit does not restart on it), a sentence on stderr
//! that names the flag or key (and the value), and nothing written — the state dir
//! stays absent (no node id, no room key, no certificate).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

mod common;
use common::NodeCmd;

/// Every path under `dir`, recursively.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Run the daemon as `bad` configures it (the tempdir is given for files the case
/// needs) and check it is refused: exit 78, stderr naming each of `names`, and nothing
/// written, in the state dir or anywhere else under the tempdir (also `$HOME` and
/// `$XDG_STATE_HOME`).
fn refused(bad: impl FnOnce(NodeCmd, &Path) -> NodeCmd, names: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cmd = NodeCmd::new(&state)
        .room("config-errors")
        .env("HOME", dir.path())
        .env("XDG_STATE_HOME", dir.path().join("xdg"))
        .env_remove("STATE_DIRECTORY")
        .env_remove("BANDSYNC_ROOM_KEY")
        .stderr_piped();
    let cmd = bad(cmd, dir.path());
    let args: Vec<String> = cmd
        .command()
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let before = tree(dir.path());
    let mut child = cmd.spawn();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?}: the daemon accepted it and ran: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stderr);
    assert_eq!(
        status.code(),
        Some(78),
        "{args:?}: exit code 78 (EX_CONFIG) expected, got {status:?}: {stderr}"
    );
    assert!(
        stderr.starts_with("bandsync: ") && !stderr.contains("panicked"),
        "{args:?}: a plain sentence expected: {stderr}"
    );
    for n in names {
        assert!(
            stderr.contains(n),
            "{args:?}: the message does not name {n:?}: {stderr}"
        );
    }
    let in_state = tree(&state);
    assert!(
        in_state.is_empty(),
        "{args:?}: the refused daemon wrote to its state dir: {in_state:?}"
    );
    let after = tree(dir.path());
    let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).collect();
    assert!(new.is_empty(), "{args:?}: the refused daemon wrote {new:?}");
}

#[test]
fn a_bad_redis_url() {
    refused(
        |c, _| c.args(["--redis", "redis://bad url"]),
        &["--redis", "redis://bad url"],
    );
}

#[test]
fn a_bad_interface_name() {
    refused(|c, _| c.interface("bad/name"), &["--interface", "bad/name"]);
}

#[test]
fn an_empty_control_pin() {
    refused(|c, _| c.args(["--control-pin", ""]), &["--control-pin"]);
}

#[test]
fn a_missing_hw_profile() {
    refused(
        |c, _| c.args(["--hw", "/nonexistent.toml"]),
        &["--hw", "/nonexistent.toml"],
    );
}

#[test]
fn a_missing_room_key_file() {
    refused(
        |c, _| c.key_file("/nonexistent"),
        &["--room-key-file", "/nonexistent"],
    );
}

#[test]
fn a_tempo_out_of_range() {
    refused(|c, _| c.args(["--tempo", "1000"]), &["--tempo", "1000"]);
}

#[test]
fn an_unknown_key_in_the_config_file() {
    let cfg_name = "bandsync.toml";
    refused(
        |c, dir| {
            let cfg = dir.join(cfg_name);
            std::fs::write(&cfg, "bogus = 1\n").unwrap();
            c.arg("--config").arg(cfg)
        },
        &[cfg_name, "bogus"],
    );
}
