//! The click log (`--click-log PATH`, SPEC §5), written off the audio thread.
//!
//! One JSON line per click:
//! `{"node":"<id>","beat":<i64>,"t_mono_ns":<true CLOCK_MONOTONIC ns>,"epoch":<u64>}`.
//! The audio thread pushes [`ClickEvent`]s into lock-free rtrb queues; this thread
//! drains them every few milliseconds, converts the node-perceived time back to true
//! CLOCK_MONOTONIC (undoing `BANDSYNC_TEST_CLOCK`) and appends the lines.

use crate::audio::ClickEvent;
use crate::sys::clock::NodeClock;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Format one line (without the newline).
pub fn line(node: &str, beat: i64, t_mono_ns: i64, epoch: u64) -> String {
    format!(r#"{{"node":"{node}","beat":{beat},"t_mono_ns":{t_mono_ns},"epoch":{epoch}}}"#)
}

/// Open (append) the log file; errors name the path.
pub fn open(path: &std::path::Path) -> anyhow::Result<File> {
    use anyhow::Context;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open click log {}", path.display()))
}

/// Run the writer until `stop` is set (then drain once more).
pub fn spawn(
    file: File,
    node: String,
    clock: NodeClock,
    queues: mpsc::Receiver<rtrb::Consumer<ClickEvent>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("click-log".into())
        .spawn(move || {
            let mut w = BufWriter::new(file);
            let mut consumers: Vec<rtrb::Consumer<ClickEvent>> = Vec::new();
            loop {
                let stopping = stop.load(Ordering::Relaxed);
                while let Ok(c) = queues.try_recv() {
                    consumers.push(c);
                }
                let mut wrote = false;
                for c in consumers.iter_mut() {
                    while let Ok(ev) = c.pop() {
                        let t = clock.to_true(ev.t_local_ns);
                        if let Err(e) = writeln!(w, "{}", line(&node, ev.beat, t, ev.epoch)) {
                            tracing::error!(error = %e, "click log write failed");
                        }
                        wrote = true;
                    }
                }
                consumers.retain(|c| !(c.is_abandoned() && c.is_empty()));
                if wrote {
                    if let Err(e) = w.flush() {
                        tracing::error!(error = %e, "click log flush failed");
                    }
                }
                if stopping {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .expect("spawning the click-log thread")
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_format_is_exact() {
        assert_eq!(
            super::line("ab12", 7, 123456789, 3),
            r#"{"node":"ab12","beat":7,"t_mono_ns":123456789,"epoch":3}"#
        );
        let v: serde_json::Value = serde_json::from_str(&super::line("x", -1, 5, 0)).unwrap();
        assert_eq!(v["beat"], -1);
    }
}
