//! The room's usage (SPEC §4 "Venue", issue 13): every box keeps a local, crash-safe
//! log of the room's playing periods, and the leader appends the same events to the
//! room's Redis stream with `--redis`.
//!
//! * **Pure part** ([`Tracker`]): fed `(now_unix_ms, playing, tempo, meter, leading)`
//!   every tick of the room task, it gives [`Event`]s: `start`, `tempo` (a change
//!   while playing), `stop` (with `played_ms` and the period's tempi), `leader` (this
//!   box took over the room), and `alive` (every [`ALIVE_EVERY_MS`] while playing).
//! * **Writer** ([`UsageLog`]): a thread of its own, fed through a bounded channel
//!   (`try_send`: the clock loop never waits on a disk). `usage.jsonl` in the state dir
//!   is append-only, one JSON event a line, each `start`/`stop`/`tempo`/`leader` line
//!   `fdatasync`ed. `alive` overwrites the small file `usage.alive` in place (no
//!   fsync but every [`ALIVE_SYNC_MS`]): a period cut by a crash (`kill -9`) is closed
//!   at the last alive stamp, within [`ALIVE_EVERY_MS`] of the real end; one cut by a
//!   power loss within [`ALIVE_SYNC_MS`]. On start, an open period (a `start` with no
//!   `stop`) is closed that way (`"closed": "crash"`). The log is rotated to
//!   `usage.jsonl.1` when it grows past [`MAX_LOG_BYTES`], only between periods (so no
//!   period spans two files); a period records at most [`MAX_TEMPI`] tempi.
//! * **Upstream** ([`Upstream`]): with `--redis`, a task appends the leader's events to
//!   `bandsync:room:<room>:usage` ([`crate::mirror::append_usage`], fenced by the
//!   room's epoch): `event` (`start`, `stop`, `leader`), `t_unix_ms`, `epoch`, and
//!   `played_ms` (with `start_unix_ms`, `tempi`) on `stop` — what the venue's
//!   `played_today_s` sums. Only while this box leads and was not deposed (the room
//!   task tells it through [`Upstream::epoch`]); a queue of at most [`UPSTREAM_QUEUE`]
//!   events survives a Redis outage.
//! * **Reading** ([`read_periods`]): what `bandsync usage` prints.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// The log's file name in the state dir.
pub const LOG_FILE: &str = "usage.jsonl";
/// The rotated log.
pub const OLD_LOG_FILE: &str = "usage.jsonl.1";
/// The last moment known to be playing.
pub const ALIVE_FILE: &str = "usage.alive";
/// How often the alive stamp is rewritten while playing.
pub const ALIVE_EVERY_MS: u64 = 200;
/// How often the alive stamp reaches the disk (fdatasync) while playing.
pub const ALIVE_SYNC_MS: u64 = 5_000;
/// The log is rotated (between periods) past this size.
pub const MAX_LOG_BYTES: u64 = 1 << 20;
/// Most tempi one period records (the first ones).
pub const MAX_TEMPI: usize = 64;
/// Most events waiting for Redis.
pub const UPSTREAM_QUEUE: usize = 1_000;

/// How a period ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Closed {
    /// The room stopped.
    Stop,
    /// The box was shut down while playing.
    Shutdown,
    /// The box crashed or lost power while playing: closed at the last alive stamp.
    Crash,
}

/// One line of the log (and one entry of the Redis stream, but `alive`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Start {
        t_unix_ms: u64,
        tempo: f64,
        meter: u8,
        epoch: u64,
        leading: bool,
    },
    Tempo {
        t_unix_ms: u64,
        tempo: f64,
    },
    Stop {
        t_unix_ms: u64,
        start_unix_ms: u64,
        played_ms: u64,
        tempi: Vec<f64>,
        epoch: u64,
        closed: Closed,
    },
    Leader {
        t_unix_ms: u64,
        epoch: u64,
    },
    Alive {
        t_unix_ms: u64,
        start_unix_ms: u64,
    },
}

impl Event {
    pub fn t_unix_ms(&self) -> u64 {
        match self {
            Event::Start { t_unix_ms, .. }
            | Event::Tempo { t_unix_ms, .. }
            | Event::Stop { t_unix_ms, .. }
            | Event::Leader { t_unix_ms, .. }
            | Event::Alive { t_unix_ms, .. } => *t_unix_ms,
        }
    }

    /// The Redis stream's fields (`epoch` is added by the append); `None` for what
    /// stays local (`alive`, `tempo`: the `stop` carries the tempi).
    pub fn stream_fields(&self) -> Option<Vec<(&'static str, String)>> {
        Some(match self {
            Event::Start {
                t_unix_ms,
                tempo,
                meter,
                ..
            } => vec![
                ("event", "start".into()),
                ("t_unix_ms", t_unix_ms.to_string()),
                ("tempo", tempo.to_string()),
                ("meter", meter.to_string()),
            ],
            Event::Stop {
                t_unix_ms,
                start_unix_ms,
                played_ms,
                tempi,
                closed,
                ..
            } => vec![
                ("event", "stop".into()),
                ("t_unix_ms", t_unix_ms.to_string()),
                ("start_unix_ms", start_unix_ms.to_string()),
                ("played_ms", played_ms.to_string()),
                (
                    "tempi",
                    tempi
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                (
                    "closed",
                    match closed {
                        Closed::Stop => "stop",
                        Closed::Shutdown => "shutdown",
                        Closed::Crash => "crash",
                    }
                    .into(),
                ),
            ],
            Event::Leader { t_unix_ms, .. } => vec![
                ("event", "leader".into()),
                ("t_unix_ms", t_unix_ms.to_string()),
            ],
            Event::Tempo { .. } | Event::Alive { .. } => return None,
        })
    }
}

/// The open period.
#[derive(Clone, Debug, PartialEq)]
struct Open {
    start: u64,
    tempi: Vec<f64>,
    tempo_mbpm: u32,
    epoch: u64,
    last_alive: u64,
}

/// What the room task sees of the room at a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The click is playing now.
    pub playing: bool,
    pub tempo_mbpm: u32,
    pub meter: u8,
    /// This box leads the room.
    pub leading: bool,
    /// The room's epoch.
    pub epoch: u64,
}

/// The pure state machine: what the room did, as usage events. Feed it every tick.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    open: Option<Open>,
    leading: Option<bool>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Whether a period is open.
    pub fn playing(&self) -> bool {
        self.open.is_some()
    }

    /// One observation of the room, at `now_ms` (wall clock).
    pub fn feed(&mut self, now_ms: u64, seen: Seen, out: &mut Vec<Event>) {
        let Seen {
            playing,
            tempo_mbpm,
            meter,
            leading,
            epoch,
        } = seen;
        // A box that takes over the room says so (not on its first observation: a box
        // alone leads from the start).
        if leading && self.leading == Some(false) {
            out.push(Event::Leader {
                t_unix_ms: now_ms,
                epoch,
            });
        }
        self.leading = Some(leading);
        let tempo = tempo_mbpm as f64 / 1000.0;
        match (&mut self.open, playing) {
            (None, true) => {
                self.open = Some(Open {
                    start: now_ms,
                    tempi: vec![tempo],
                    tempo_mbpm,
                    epoch,
                    last_alive: now_ms,
                });
                out.push(Event::Start {
                    t_unix_ms: now_ms,
                    tempo,
                    meter,
                    epoch,
                    leading,
                });
            }
            (Some(o), true) => {
                o.epoch = epoch;
                if o.tempo_mbpm != tempo_mbpm {
                    o.tempo_mbpm = tempo_mbpm;
                    if o.tempi.len() < MAX_TEMPI {
                        o.tempi.push(tempo);
                        out.push(Event::Tempo {
                            t_unix_ms: now_ms,
                            tempo,
                        });
                    }
                }
                if now_ms.saturating_sub(o.last_alive) >= ALIVE_EVERY_MS || now_ms < o.last_alive {
                    o.last_alive = now_ms;
                    out.push(Event::Alive {
                        t_unix_ms: now_ms,
                        start_unix_ms: o.start,
                    });
                }
            }
            (Some(_), false) => out.extend(self.close(now_ms, Closed::Stop)),
            (None, false) => {}
        }
    }

    /// Close the open period now (the room stopped, or the box shuts down).
    pub fn close(&mut self, now_ms: u64, how: Closed) -> Option<Event> {
        let o = self.open.take()?;
        Some(Event::Stop {
            t_unix_ms: now_ms.max(o.start),
            start_unix_ms: o.start,
            played_ms: now_ms.saturating_sub(o.start),
            tempi: o.tempi,
            epoch: o.epoch,
            closed: how,
        })
    }
}

/// Close a period left open in `lines` (the log's events, oldest first) at `alive`
/// (the alive stamp: `(t_unix_ms, start_unix_ms)`), or at the last event of the
/// period when the stamp is missing or belongs to another period. `None` when no
/// period is open.
pub fn recover(lines: &[Event], alive: Option<(u64, u64)>) -> Option<Event> {
    let i = lines
        .iter()
        .rposition(|e| matches!(e, Event::Start { .. } | Event::Stop { .. }))?;
    let Event::Start {
        t_unix_ms: start,
        tempo,
        epoch,
        ..
    } = lines[i]
    else {
        return None;
    };
    let mut end = start;
    let mut tempi = vec![tempo];
    for e in &lines[i + 1..] {
        end = end.max(e.t_unix_ms());
        if let Event::Tempo { tempo, .. } = e {
            tempi.push(*tempo);
        }
    }
    if let Some((t, s)) = alive {
        if s == start && t >= start {
            end = end.max(t);
        }
    }
    Some(Event::Stop {
        t_unix_ms: end,
        start_unix_ms: start,
        played_ms: end - start,
        tempi,
        epoch,
        closed: Closed::Crash,
    })
}

/// Events of a log file, oldest first; lines that are not events (a line torn by a
/// crash) are skipped.
pub fn read_events(path: &Path) -> std::io::Result<Vec<Event>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line?;
        if let Ok(e) = serde_json::from_slice::<Event>(&line) {
            out.push(e);
        }
    }
    Ok(out)
}

/// The alive stamp: `(t_unix_ms, start_unix_ms)`.
fn read_alive(path: &Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let mut it = s.split_whitespace();
    let t = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some((t, start))
}

/// One playing period, as `bandsync usage` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Period {
    pub start_unix_ms: u64,
    /// `None`: still playing (the last alive stamp is in `last_alive_unix_ms`).
    pub end_unix_ms: Option<u64>,
    pub duration_s: f64,
    pub tempi: Vec<f64>,
    /// Songs played (not tracked yet: empty).
    pub songs: Vec<String>,
    pub epoch: u64,
    /// `stop`, `shutdown`, `crash`, or `open`.
    pub closed: String,
}

/// The periods in the state dir's logs (rotated one first), those that started at or
/// after `since_ms`. An open period (the box is playing now, or crashed and has not
/// restarted) is shown up to its last alive stamp, `closed: "open"`.
pub fn read_periods(dir: &Path, since_ms: u64) -> std::io::Result<Vec<Period>> {
    let mut events = read_events(&dir.join(OLD_LOG_FILE))?;
    events.extend(read_events(&dir.join(LOG_FILE))?);
    let mut out = Vec::new();
    let mut open: Option<(u64, Vec<f64>, u64)> = None;
    for e in &events {
        match e {
            Event::Start {
                t_unix_ms,
                tempo,
                epoch,
                ..
            } => open = Some((*t_unix_ms, vec![*tempo], *epoch)),
            Event::Stop {
                t_unix_ms,
                start_unix_ms,
                played_ms,
                tempi,
                epoch,
                closed,
            } => {
                open = None;
                out.push(Period {
                    start_unix_ms: *start_unix_ms,
                    end_unix_ms: Some(*t_unix_ms),
                    duration_s: *played_ms as f64 / 1000.0,
                    tempi: tempi.clone(),
                    songs: Vec::new(),
                    epoch: *epoch,
                    closed: serde_json::to_value(closed)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
    if let Some((start, tempi, epoch)) = open {
        let stop = recover(&events, read_alive(&dir.join(ALIVE_FILE)));
        let end = match stop {
            Some(Event::Stop { t_unix_ms, .. }) => t_unix_ms,
            _ => start,
        };
        out.push(Period {
            start_unix_ms: start,
            end_unix_ms: None,
            duration_s: end.saturating_sub(start) as f64 / 1000.0,
            tempi,
            songs: Vec::new(),
            epoch,
            closed: "open".into(),
        });
    }
    out.retain(|p| p.start_unix_ms >= since_ms);
    Ok(out)
}

/// What the room task hands the writer thread.
enum Msg {
    Event(Event),
    /// Flush and answer (shutdown).
    Sync(std::sync::mpsc::SyncSender<()>),
}

/// The room task's side of the usage log: the tracker, the writer thread and (with
/// `--redis`) the upstream.
pub struct UsageLog {
    tracker: Tracker,
    tx: std::sync::mpsc::SyncSender<Msg>,
    upstream: Option<Upstream>,
    /// A period closed at start-up after a crash, for Redis (see [`UsageLog::tick`]).
    recovered: Option<Event>,
    started_ms: u64,
    /// Events the writer's queue had no room for.
    pub dropped: Arc<AtomicU64>,
    buf: Vec<Event>,
}

/// A box that recovered a crashed period sends it upstream only once it has been up
/// this long and still leads alone (else the room's leader counts the period).
const RECOVERED_UPSTREAM_AFTER_MS: u64 = 5_000;

impl UsageLog {
    /// Open the log in `dir`: close a period a crash left open (appended to the log
    /// now, synchronously: this runs before the room task), and start the writer.
    pub fn open(dir: &Path, upstream: Option<Upstream>) -> anyhow::Result<UsageLog> {
        let path = dir.join(LOG_FILE);
        let events = read_events(&path)?;
        let recovered = recover(&events, read_alive(&dir.join(ALIVE_FILE)));
        let mut w = Writer::open(dir)?;
        if let Some(stop) = &recovered {
            w.append(stop)?;
            tracing::info!(event = ?stop, "usage: closed the playing period a crash or power loss left open, at its last alive stamp");
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);
        std::thread::Builder::new()
            .name("usage-log".into())
            .spawn(move || w.run(rx))?;
        Ok(UsageLog {
            tracker: Tracker::new(),
            tx,
            upstream,
            recovered,
            started_ms: now_unix_ms(),
            dropped: Arc::new(AtomicU64::new(0)),
            buf: Vec::new(),
        })
    }

    /// One tick of the room task: never blocks.
    pub fn tick(&mut self, room: &crate::core::room::Room, now_ns: i64, appendable: bool) {
        let now_ms = now_unix_ms();
        let s_now = room.session_now(now_ns);
        let seg = *room.timeline().current(s_now);
        // (a box started with --play clicks from its first segment's start on)
        let playing = seg.playing && s_now >= seg.t0;
        let leading = room.leading();
        if let Some(u) = &self.upstream {
            u.epoch.store(
                if leading && appendable {
                    room.epoch()
                } else {
                    0
                },
                Relaxed,
            );
        }
        self.tracker.feed(
            now_ms,
            Seen {
                playing,
                tempo_mbpm: seg.tempo.mbpm(),
                meter: seg.meter.get(),
                leading,
                epoch: room.epoch(),
            },
            &mut self.buf,
        );
        if self.recovered.is_some()
            && now_ms.saturating_sub(self.started_ms) >= RECOVERED_UPSTREAM_AFTER_MS
        {
            // (already in the local log: only Redis has yet to hear of it)
            let stop = self.recovered.take();
            if let (Some(u), Some(stop)) = (&self.upstream, stop) {
                if leading && appendable && room.peer_ids().is_empty() {
                    u.send(&stop);
                }
            }
        }
        self.flush_buf(leading);
    }

    fn flush_buf(&mut self, leading: bool) {
        for e in self.buf.drain(..) {
            if leading {
                if let Some(u) = &self.upstream {
                    u.send(&e);
                }
            }
            if self.tx.try_send(Msg::Event(e)).is_err() {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// The box shuts down: close an open period, wait (at most `wait`) for the disk
    /// and for Redis.
    pub async fn shutdown(&mut self, leading: bool, wait: Duration) {
        if let Some(e) = self.tracker.close(now_unix_ms(), Closed::Shutdown) {
            self.buf.push(e);
        }
        self.flush_buf(leading);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let _ = self.tx.try_send(Msg::Sync(tx));
        let deadline = tokio::time::Instant::now() + wait;
        let disk = tokio::task::spawn_blocking(move || rx.recv_timeout(wait).is_ok());
        let _ = tokio::time::timeout_at(deadline, disk).await;
        if let Some(u) = &self.upstream {
            let _ = tokio::time::timeout_at(deadline, u.drained()).await;
        }
    }
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    log: std::fs::File,
    size: u64,
    alive: Option<std::fs::File>,
    alive_synced_ms: u64,
}

impl Writer {
    fn open(dir: &Path) -> std::io::Result<Writer> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))?;
        let mut size = log.metadata()?.len();
        if size > 0 {
            // A line torn by a power loss: the next event starts on a line of its own.
            use std::io::{Read, Seek};
            let mut r = std::fs::File::open(dir.join(LOG_FILE))?;
            r.seek(std::io::SeekFrom::End(-1))?;
            let mut last = [0u8; 1];
            r.read_exact(&mut last)?;
            if last[0] != b'\n' {
                (&log).write_all(b"\n")?;
                size += 1;
            }
        }
        Ok(Writer {
            dir: dir.to_path_buf(),
            log,
            size,
            alive: None,
            alive_synced_ms: 0,
        })
    }

    fn append(&mut self, e: &Event) -> std::io::Result<()> {
        if let Event::Alive {
            t_unix_ms,
            start_unix_ms,
        } = e
        {
            use std::os::unix::fs::FileExt;
            if self.alive.is_none() {
                self.alive = Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(self.dir.join(ALIVE_FILE))?,
                );
            }
            let f = self.alive.as_ref().expect("opened above");
            // Fixed width: one in-place write, never a shorter line over a longer one.
            let line = format!("{t_unix_ms:>20} {start_unix_ms:>20}\n");
            f.write_all_at(line.as_bytes(), 0)?;
            if t_unix_ms.saturating_sub(self.alive_synced_ms) >= ALIVE_SYNC_MS {
                f.sync_data()?;
                self.alive_synced_ms = *t_unix_ms;
            }
            return Ok(());
        }
        if matches!(e, Event::Start { .. }) && self.size > MAX_LOG_BYTES {
            std::fs::rename(self.dir.join(LOG_FILE), self.dir.join(OLD_LOG_FILE))?;
            *self = Writer {
                alive: self.alive.take(),
                ..Writer::open(&self.dir)?
            };
        }
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.log.write_all(&line)?;
        self.log.sync_data()?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn run(mut self, rx: std::sync::mpsc::Receiver<Msg>) {
        let mut failing = false;
        while let Ok(m) = rx.recv() {
            match m {
                Msg::Event(e) => match self.append(&e) {
                    Ok(()) => failing = false,
                    Err(err) => {
                        if !failing {
                            tracing::warn!(error = %err, dir = %self.dir.display(), "usage: cannot write the usage log (the click goes on)");
                        }
                        failing = true;
                    }
                },
                Msg::Sync(done) => {
                    let _ = self.log.sync_data();
                    let _ = done.send(());
                }
            }
        }
    }
}

/// The leader's usage events on their way to Redis.
#[derive(Clone)]
pub struct Upstream {
    tx: tokio::sync::mpsc::Sender<Vec<(&'static str, String)>>,
    /// The epoch appends are fenced with; 0: do not append (not leading, or deposed).
    pub epoch: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
    /// Entries appended, refused by the fence, and failed attempts.
    pub appended: Arc<AtomicU64>,
    pub refused: Arc<AtomicU64>,
}

impl Upstream {
    /// Start the task appending to `room`'s stream in `url`, until `shutdown`.
    pub fn start(
        url: crate::mirror::RedisUrl,
        room: String,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Upstream {
        let (tx, rx) = tokio::sync::mpsc::channel(UPSTREAM_QUEUE);
        let u = Upstream {
            tx,
            epoch: Arc::new(AtomicU64::new(0)),
            queued: Arc::new(AtomicU64::new(0)),
            appended: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
        };
        tokio::spawn(upstream_task(url, room, rx, u.clone(), shutdown));
        u
    }

    fn send(&self, e: &Event) {
        if let Some(f) = e.stream_fields() {
            if self.tx.try_send(f).is_ok() {
                self.queued.fetch_add(1, Relaxed);
            }
        }
    }

    /// Until every queued event was appended, refused or given up.
    async fn drained(&self) {
        while self.queued.load(Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn upstream_task(
    url: crate::mirror::RedisUrl,
    room: String,
    mut rx: tokio::sync::mpsc::Receiver<Vec<(&'static str, String)>>,
    u: Upstream,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    const T: Duration = Duration::from_secs(1);
    let mut queue: VecDeque<Vec<(&'static str, String)>> = VecDeque::new();
    let mut conn: Option<crate::mirror::Conn> = None;
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    loop {
        if queue.is_empty() {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(f) => queue.push_back(f),
                    None => return,
                },
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() {
                    // the room task's shutdown waits on `drained` for what is queued
                    if rx.is_empty() { return }
                },
            }
        }
        while let Ok(f) = rx.try_recv() {
            if queue.len() >= UPSTREAM_QUEUE {
                queue.pop_front();
                u.queued.fetch_sub(1, Relaxed);
            }
            queue.push_back(f);
        }
        let Some(fields) = queue.front() else {
            continue;
        };
        let epoch = u.epoch.load(Relaxed);
        if epoch == 0 {
            // no longer the room's writer: what is queued is not ours to say
            u.queued.fetch_sub(queue.len() as u64, Relaxed);
            queue.clear();
            continue;
        }
        if conn.is_none() {
            match crate::mirror::Conn::connect(&url, T).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "usage: cannot reach Redis; the room's usage events wait (the click goes on)");
                        warned = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match crate::mirror::append_usage(c, &room, epoch, &pairs).await {
            Ok(crate::mirror::UsageOutcome::Appended { .. }) => {
                u.appended.fetch_add(1, Relaxed);
                queue.pop_front();
                u.queued.fetch_sub(1, Relaxed);
                backoff = Duration::from_millis(100);
                warned = false;
            }
            Ok(crate::mirror::UsageOutcome::RefusedNewerEpoch { held_epoch }) => {
                tracing::info!(
                    epoch,
                    held_epoch,
                    "usage: Redis holds a newer epoch; this box's usage event is not appended"
                );
                u.refused.fetch_add(1, Relaxed);
                queue.pop_front();
                u.queued.fetch_sub(1, Relaxed);
            }
            Err(crate::mirror::MirrorError::InvalidUsage(m)) => {
                tracing::warn!(error = %m, "usage: an event could not be appended (dropped)");
                queue.pop_front();
                u.queued.fetch_sub(1, Relaxed);
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "usage: Redis failed; the room's usage events wait");
                    warned = true;
                }
                conn = None;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn now_unix_ms() -> u64 {
    crate::mirror::now_unix_ms()
}

/// The Unix time (ms) of local midnight starting `date` (`YYYY-MM-DD`).
pub fn local_date_ms(date: &str) -> anyhow::Result<u64> {
    let bad = || anyhow::anyhow!("--since {date:?}: give a date as YYYY-MM-DD");
    let mut it = date.split('-');
    let (Some(y), Some(m), Some(d), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    let (y, m, d): (i32, i32, i32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // SAFETY: an all-zero `tm` is valid; mktime reads and normalizes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = y - 1900;
    tm.tm_mon = m - 1;
    tm.tm_mday = d;
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a valid, initialized struct.
    let t = unsafe { libc::mktime(&mut tm) };
    if t < 0 {
        return Err(bad());
    }
    Ok(t as u64 * 1000)
}

/// `bandsync usage`'s table.
pub fn format_table(periods: &[Period]) -> String {
    let mut s = format!(
        "{:<20} {:<20} {:>10}  {:<8} {:>5}  {}\n",
        "start", "end", "duration", "closed", "epoch", "tempi (BPM)"
    );
    for p in periods {
        let tempi = p
            .tempi
            .iter()
            .map(|t| format!("{t}"))
            .collect::<Vec<_>>()
            .join(" ");
        s.push_str(&format!(
            "{:<20} {:<20} {:>9.1}s  {:<8} {:>5}  {}\n",
            local_time(p.start_unix_ms),
            p.end_unix_ms
                .map(local_time)
                .unwrap_or_else(|| "(playing)".into()),
            p.duration_s,
            p.closed,
            p.epoch,
            tempi
        ));
    }
    let total: f64 = periods.iter().map(|p| p.duration_s).sum();
    s.push_str(&format!(
        "{} period(s), {:.1} s played\n",
        periods.len(),
        total
    ));
    s
}

/// `bandsync usage --csv`.
pub fn format_csv(periods: &[Period]) -> String {
    let mut s = String::from("start_unix_ms,end_unix_ms,duration_s,tempi,songs,epoch,closed\n");
    for p in periods {
        s.push_str(&format!(
            "{},{},{:.3},{},{},{},{}\n",
            p.start_unix_ms,
            p.end_unix_ms.map(|e| e.to_string()).unwrap_or_default(),
            p.duration_s,
            p.tempi
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(";"),
            p.songs.join(";").replace([',', '"', '\n'], " "),
            p.epoch,
            p.closed
        ));
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS`, local time.
pub fn local_time(ms: u64) -> String {
    let secs = (ms / 1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is valid; localtime_r writes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return ms.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(t: &mut Tracker, now: u64, playing: bool, bpm: u32, leading: bool) -> Vec<Event> {
        let mut out = Vec::new();
        let seen = Seen {
            playing,
            tempo_mbpm: bpm * 1000,
            meter: 4,
            leading,
            epoch: 3,
        };
        t.feed(now, seen, &mut out);
        out
    }

    #[test]
    fn periods_tempi_alive_and_leadership() {
        let mut t = Tracker::new();
        assert!(feed(&mut t, 1_000, false, 120, false).is_empty());
        let e = feed(&mut t, 1_050, true, 120, false);
        assert!(
            matches!(
                e[..],
                [Event::Start {
                    t_unix_ms: 1_050,
                    leading: false,
                    ..
                }]
            ),
            "{e:?}"
        );
        assert!(feed(&mut t, 1_100, true, 120, false).is_empty());
        let e = feed(&mut t, 1_300, true, 130, true);
        assert!(
            matches!(
                e[0],
                Event::Leader {
                    t_unix_ms: 1_300,
                    epoch: 3
                }
            ),
            "{e:?}"
        );
        assert!(
            matches!(
                e[1],
                Event::Tempo {
                    t_unix_ms: 1_300,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            matches!(
                e[2],
                Event::Alive {
                    t_unix_ms: 1_300,
                    start_unix_ms: 1_050
                }
            ),
            "{e:?}"
        );
        let e = feed(&mut t, 4_050, false, 130, true);
        assert_eq!(
            e,
            vec![Event::Stop {
                t_unix_ms: 4_050,
                start_unix_ms: 1_050,
                played_ms: 3_000,
                tempi: vec![120.0, 130.0],
                epoch: 3,
                closed: Closed::Stop
            }]
        );
        assert!(!t.playing());
        // a box alone leads from its first observation: no `leader` event
        let mut t = Tracker::new();
        assert!(feed(&mut t, 0, false, 120, true).is_empty());
    }

    #[test]
    fn tempi_are_bounded() {
        let mut t = Tracker::new();
        for i in 0..200u32 {
            feed(&mut t, u64::from(i), true, 60 + i, true);
        }
        let Some(Event::Stop { tempi, .. }) = t.close(500, Closed::Shutdown) else {
            panic!()
        };
        assert_eq!(tempi.len(), MAX_TEMPI);
    }

    #[test]
    fn a_crash_is_closed_at_the_last_alive_stamp() {
        let start = Event::Start {
            t_unix_ms: 10_000,
            tempo: 120.0,
            meter: 4,
            epoch: 2,
            leading: true,
        };
        let tempo = Event::Tempo {
            t_unix_ms: 12_000,
            tempo: 90.0,
        };
        let lines = vec![start.clone(), tempo.clone()];
        let Some(Event::Stop {
            t_unix_ms,
            played_ms,
            tempi,
            closed,
            ..
        }) = recover(&lines, Some((15_400, 10_000)))
        else {
            panic!()
        };
        assert_eq!(
            (t_unix_ms, played_ms, closed),
            (15_400, 5_400, Closed::Crash)
        );
        assert_eq!(tempi, vec![120.0, 90.0]);
        // a stamp of another period is not this one's
        let Some(Event::Stop { t_unix_ms, .. }) = recover(&lines, Some((99_000, 5))) else {
            panic!()
        };
        assert_eq!(t_unix_ms, 12_000);
        // closed periods need nothing
        let stop = Tracker::default().close(1, Closed::Stop);
        assert!(stop.is_none());
        let mut closed = lines.clone();
        closed.push(Event::Stop {
            t_unix_ms: 13_000,
            start_unix_ms: 10_000,
            played_ms: 3_000,
            tempi: vec![],
            epoch: 2,
            closed: Closed::Stop,
        });
        assert!(recover(&closed, Some((15_400, 10_000))).is_none());
        assert!(recover(&[], None).is_none());
    }

    #[test]
    fn the_log_survives_torn_lines_and_rotates_between_periods() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path()).unwrap();
        let start = |t| Event::Start {
            t_unix_ms: t,
            tempo: 120.0,
            meter: 4,
            epoch: 1,
            leading: true,
        };
        let stop = |t0, t1| Event::Stop {
            t_unix_ms: t1,
            start_unix_ms: t0,
            played_ms: t1 - t0,
            tempi: vec![120.0],
            epoch: 1,
            closed: Closed::Stop,
        };
        w.append(&start(1_000)).unwrap();
        w.append(&stop(1_000, 2_000)).unwrap();
        w.append(&start(3_000)).unwrap();
        w.append(&Event::Alive {
            t_unix_ms: 3_700,
            start_unix_ms: 3_000,
        })
        .unwrap();
        // a torn last line (power loss in the middle of a write)
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap()
            .write_all(b"{\"event\":\"tem")
            .unwrap();
        let p = read_periods(dir.path(), 0).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].duration_s, 1.0);
        assert_eq!((p[1].closed.as_str(), p[1].duration_s), ("open", 0.7));
        assert_eq!(read_periods(dir.path(), 2_500).unwrap().len(), 1);
        // the next writer starts on a fresh line
        let mut w = Writer::open(dir.path()).unwrap();
        w.append(&stop(3_000, 4_000)).unwrap();
        assert_eq!(read_periods(dir.path(), 0).unwrap()[1].duration_s, 1.0);
        // rotation happens at a start, past the size limit
        w.size = MAX_LOG_BYTES + 1;
        w.append(&start(5_000)).unwrap();
        assert!(dir.path().join(OLD_LOG_FILE).exists());
        let p = read_periods(dir.path(), 0).unwrap();
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn dates() {
        let m = local_date_ms("2026-12-06").unwrap();
        assert_eq!(crate::mirror::local_midnight_ms(m + 3_600_000), m);
        assert!(local_date_ms("2026-13-01").is_err());
        assert!(local_date_ms("yesterday").is_err());
    }
}
