//! Rate-limited logging for input from strangers: at most one line per kind of event
//! per interval, the rest counted (a flood must not turn into a flood of log lines).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one log line per `every` per kind of event, with the number left out since.
#[derive(Debug)]
pub struct RateLog {
    every: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
    /// Lines left out.
    pub suppressed: AtomicU64,
}

impl RateLog {
    pub fn new(every: Duration) -> RateLog {
        RateLog {
            every,
            last: Mutex::new(HashMap::new()),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now (`n` similar events were left out since the last line);
    /// `None`: leave it out (counted).
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut m = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(kind) {
            Some((at, skipped)) if now.duration_since(*at) < self.every => {
                *skipped += 1;
                self.suppressed.fetch_add(1, Relaxed);
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                m.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}
