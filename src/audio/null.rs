//! The silent sink: a fake sound card paced by CLOCK_MONOTONIC.
//!
//! It behaves like a real card at 48 kHz with a fixed period: period `k` is due at
//! true time `T0 + k·period`, its first frame is "heard" two periods later, and the
//! renderer is called with that time *as the node perceives it*. Like a real card's
//! crystal, the sink runs in true time, so a node whose clock is distorted
//! (`BANDSYNC_TEST_CLOCK`) sees it drift and the frame clock must track it.

use super::render::Renderer;
use crate::sys::clock::{mono_now_ns, NodeClock};
use std::sync::atomic::{AtomicBool, Ordering};

pub const NULL_RATE: u32 = 48_000;

fn sleep_until(true_ns: i64) {
    let ts = libc::timespec {
        tv_sec: (true_ns / 1_000_000_000) as _,
        tv_nsec: (true_ns % 1_000_000_000) as _,
    };
    // SAFETY: valid timespec; EINTR just means we wake early and re-check.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        );
    }
}

/// Run until `stop` is set.
pub fn run(period_frames: u32, clock: NodeClock, mut renderer: Renderer, stop: &AtomicBool) {
    let period = period_frames.max(16) as i64;
    let period_ns =
        |k: i64| -> i64 { (k as i128 * period as i128 * 1_000_000_000 / NULL_RATE as i128) as i64 };
    let latency = period_ns(2);
    let mut buf = vec![0f32; period as usize];
    let mut t0 = mono_now_ns();
    let mut k: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = t0 + period_ns(k);
        let now = mono_now_ns();
        if now > due + 1_000_000_000 {
            // Not scheduled for over a second (a suspended process): like an xrun,
            // start a new grid. Shorter stalls are caught up below, as a card with
            // a deep buffer would: the late periods render at once, on their own
            // frame times, so no click is lost to a busy CPU.
            t0 = now;
            k = 0;
            continue;
        }
        sleep_until(due);
        renderer.render(&mut buf[..], clock.perceive(due + latency));
        k += 1;
    }
}
