//! End to end: `bandsync run --audio null` as a process, read through its click log.

use bandsync::sys::clock::mono_now_ns;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{NodeCmd, BIN};

#[derive(Debug)]
struct Line {
    node: String,
    beat: i64,
    t: i64,
    epoch: u64,
}

fn read_log(p: &Path) -> Vec<Line> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
            let obj = v.as_object().unwrap();
            assert_eq!(obj.len(), 4, "exactly node, beat, t_mono_ns, epoch: {l}");
            Line {
                node: v["node"].as_str().unwrap().to_string(),
                beat: v["beat"].as_i64().unwrap(),
                t: v["t_mono_ns"].as_i64().unwrap(),
                epoch: v["epoch"].as_u64().unwrap(),
            }
        })
        .collect()
}

/// Run the daemon for `secs`, stop it with SIGTERM, return (spawn time, log lines).
fn run_null(
    extra_env: &[(&str, &str)],
    args: &[&str],
    secs: f64,
) -> (i64, Vec<Line>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("clicks.jsonl");
    // no --http: the daemon's default (it only logs when that port is taken)
    let mut cmd = NodeCmd::new(dir.path().join("state"))
        .no_http()
        .room(&format!(
            "null-{}",
            dir.path().file_name().unwrap().to_string_lossy()
        ))
        .click_log(&log)
        .arg("--play")
        .args(args)
        .env("HOME", dir.path())
        .envs(extra_env.iter().copied())
        .stderr_piped()
        .command();
    let t_spawn = mono_now_ns();
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_secs_f64(secs));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "daemon exited with {:?}: {stderr}",
        out.status
    );
    assert!(
        stderr.contains("shutting down"),
        "clean shutdown expected: {stderr}"
    );
    let lines = read_log(&log);
    (t_spawn, lines, dir)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn null_sink_clicks_every_500ms_and_starts_within_a_second() {
    let (t_spawn, lines, dir) = run_null(&[], &["--tempo", "120"], 4.0);
    assert!(lines.len() >= 6, "{lines:?}");
    let id = std::fs::read_to_string(dir.path().join("state/node-id")).unwrap();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.beat, i as i64, "consecutive beats from 0");
        assert_eq!(l.node, id.trim());
        assert_eq!(l.epoch, 1, "a box alone leads its own session in epoch 1");
    }
    let first = lines[0].t - t_spawn;
    assert!(
        first > 0 && first <= 1_000_000_000,
        "first click {first} ns after spawn"
    );
    let d: Vec<f64> = lines
        .windows(2)
        .map(|w| ((w[1].t - w[0].t) - 500_000_000) as f64)
        .collect();
    let m = median(d.iter().map(|x| x.abs()).collect());
    assert!(m <= 20_000.0, "median |spacing − 500 ms| = {m} ns: {d:?}");
}

#[test]
fn distorted_clock_clicks_fast_in_true_time() {
    // perceived clock 1000 ppm fast: 120 BPM perceived is every 500 ms / 1.001 true
    let (_t, lines, _dir) = run_null(
        &[("BANDSYNC_TEST_CLOCK", "offset_ms=250,skew_ppm=1000")],
        &["--tempo", "120"],
        4.0,
    );
    assert!(lines.len() >= 6);
    let want = 500_000_000.0 / 1.001;
    let d: Vec<f64> = lines
        .windows(2)
        .map(|w| (w[1].t - w[0].t) as f64 - want)
        .collect();
    let m = median(d.iter().map(|x| x.abs()).collect());
    assert!(
        m <= 20_000.0,
        "median |spacing − 499.5005 ms| = {m} ns: {d:?}"
    );
}

#[test]
fn meter_sets_the_accent_grid_and_tempo_the_spacing() {
    let (_t, lines, _dir) = run_null(&[], &["--tempo", "300", "--meter", "3"], 2.0);
    assert!(lines.len() >= 6);
    let d: Vec<i64> = lines.windows(2).map(|w| w[1].t - w[0].t).collect();
    let m = median(d.iter().map(|x| (*x - 200_000_000).abs() as f64).collect());
    assert!(m <= 20_000.0, "{d:?}");
}

fn run_fail(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--state-dir")
        .arg(dir.path())
        .env("HOME", dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_input_gets_clear_errors() {
    let e = run_fail(&["run", "--audio", "null", "--tempo", "500"], &[]);
    assert!(
        e.contains("--tempo") && e.contains("500") && e.contains("20 and 400"),
        "{e}"
    );
    let e = run_fail(&["run", "--audio", "null", "--meter", "0"], &[]);
    assert!(e.contains("--meter") && e.contains('0'), "{e}");
    let e = run_fail(&["run", "--audio", "null", "--tempo", "fast"], &[]);
    assert!(e.contains("fast"), "{e}");
    let e = run_fail(
        &["run", "--audio", "null"],
        &[("BANDSYNC_TEST_CLOCK", "skew_ppm=lots")],
    );
    assert!(
        e.contains("BANDSYNC_TEST_CLOCK") && e.contains("lots"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "tempo = 90\nvolum = 0.5\n").unwrap();
    let e = run_fail(
        &["run", "--audio", "null", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert!(e.contains("c.toml") && e.contains("volum"), "{e}");
    let e = run_fail(
        &["run", "--audio", "null", "--config", "/nonexistent/b.toml"],
        &[],
    );
    assert!(e.contains("/nonexistent/b.toml"), "{e}");
}

#[test]
fn help_documents_every_run_flag() {
    let out = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let h = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--name",
        "--state-dir",
        "--audio",
        "--tempo",
        "--meter",
        "--play",
        "--click-log",
        "--config",
        "--latency-offset-ms",
        "--volume",
    ] {
        assert!(h.contains(flag), "run --help lacks {flag}: {h}");
    }
}
