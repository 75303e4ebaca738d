//! The Redis mirror against a real `redis-server` (Debian package `redis-server`), started
//! by each test on a spare loopback port, and against fake servers that answer garbage or
//! nothing at all.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bandsync::mirror::{
    self, Conn, MirrorError, MirrorOptions, MirrorRecord, MirrorState, MirrorStats, RedisUrl,
    WriteOutcome,
};
use futures_util::StreamExt;
use redis::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(1);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` child process, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    extra: Vec<String>,
    dir: tempfile::TempDir,
    url: RedisUrl,
}

impl Redis {
    async fn start() -> Redis {
        Redis::start_with(&[], None).await
    }

    /// `extra`: more redis-server arguments; `url`: how to reach it (default plain).
    async fn start_with(extra: &[&str], url: Option<&dyn Fn(u16) -> String>) -> Redis {
        let port = free_port();
        let url = match url {
            Some(f) => f(port),
            None => format!("redis://127.0.0.1:{port}/0"),
        };
        let mut r = Redis {
            child: None,
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
            url: RedisUrl::parse(&url).unwrap(),
        };
        r.spawn().await;
        r
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none());
        let tls = self.extra.iter().any(|a| a == "--tls-port");
        let mut cmd = Command::new("redis-server");
        if tls {
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--dir",
            self.dir.path().to_str().unwrap(),
            "--logfile",
            self.log().to_str().unwrap(),
        ])
        .args(self.extra.iter().filter(|a| *a != "--tls-port"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}): install the Debian package `redis-server` (apt-get install -y redis-server)")
        });
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let last = match Conn::connect(&self.url, T).await {
                Ok(mut c) => match c.ping().await {
                    Ok(()) => return,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "redis-server exited ({st}): {}",
                    std::fs::read_to_string(self.log()).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not come up on port {} (last error: {last}); its log:\n{}",
                self.port,
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn conn(&self) -> Conn {
        Conn::connect(&self.url, T).await.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn record(room: &str, epoch: u64, version: u64, tempo_bpm: u32, meter: u8) -> MirrorRecord {
    MirrorRecord {
        room: room.into(),
        epoch,
        version,
        leader: format!("node-e{epoch}"),
        tempo_mbpm: tempo_bpm * 1000,
        meter,
        playing: true,
        pinned: None,
        song: None,
        boxes: 2,
        // Deterministic, so that a test can rebuild the record a task was given.
        updated_unix_ms: 1_750_000_000_000u64
            .wrapping_add(epoch.wrapping_mul(1000))
            .wrapping_add(version),
    }
}

async fn hget(c: &mut Conn, room: &str) -> Option<MirrorRecord> {
    let v = c
        .query(redis::cmd("HGETALL").arg(mirror::room_key(room)))
        .await
        .unwrap();
    mirror::record_from_hash(room, v).unwrap()
}

/// Run a command that must succeed.
async fn cmd(c: &mut Conn, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    c.query(&cmd).await.unwrap()
}

/// A hash field as a string (None: no such field).
async fn hfield(c: &mut Conn, room: &str, field: &str) -> Option<String> {
    match cmd(c, &["HGET", &mirror::room_key(room), field]).await {
        Value::BulkString(b) => Some(String::from_utf8(b).unwrap()),
        Value::Nil => None,
        v => panic!("{v:?}"),
    }
}

/// Poll (1 ms) until the hash holds `want`; the time it took.
async fn wait_for(c: &mut Conn, want: &MirrorRecord, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if hget(c, &want.room).await.as_ref() == Some(want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "the hash did not become {want:?} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Task {
    tx: watch::Sender<Option<MirrorRecord>>,
    stats: Arc<MirrorStats>,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

fn spawn_run(url: &RedisUrl, room: &str, first: Option<MirrorRecord>) -> Task {
    spawn_run_with(url, room, first, MirrorOptions::default())
}

fn spawn_run_with(
    url: &RedisUrl,
    room: &str,
    first: Option<MirrorRecord>,
    opts: MirrorOptions,
) -> Task {
    let (tx, rx) = watch::channel(first);
    let (stop, stop_rx) = watch::channel(false);
    let stats = Arc::new(MirrorStats::default());
    let handle = tokio::spawn(mirror::run_with(
        url.clone(),
        room.into(),
        rx,
        stats.clone(),
        stop_rx,
        opts,
    ));
    Task {
        tx,
        stats,
        stop,
        handle,
    }
}

impl Task {
    /// What the caller does: must never wait on the mirror.
    fn set(&self, rec: Option<MirrorRecord>) -> Duration {
        let t0 = Instant::now();
        self.tx.send_replace(rec);
        t0.elapsed()
    }

    async fn stop(self) {
        let t0 = Instant::now();
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(1), self.handle)
            .await
            .expect("the mirror task did not stop within 1 s of shutdown")
            .expect("the mirror task panicked");
        println!("mirror task stopped in {:?}", t0.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_follows_changes_and_publishes_them() {
    let redis = Redis::start().await;
    let room = "stage-a";
    let mut sub = redis
        .url
        .client()
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe(mirror::room_channel(room)).await.unwrap();

    let mut rec = record(room, 3, 1, 120, 4);
    let task = spawn_run(&redis.url, room, Some(rec.clone()));
    let mut c = redis.conn().await;
    let first = wait_for(&mut c, &rec, Duration::from_secs(2)).await;
    println!("first record mirrored {first:?} after start");
    // The room is listed for the venue.
    assert_eq!(
        cmd(&mut c, &["SISMEMBER", mirror::ROOMS_KEY, room]).await,
        Value::Int(1)
    );

    let mut worst = Duration::ZERO;
    for i in 0..20u32 {
        rec = MirrorRecord {
            version: rec.version + 1,
            tempo_mbpm: 100_000 + i * 1_000,
            meter: (i % 16 + 1) as u8,
            playing: i % 2 == 0,
            pinned: (i % 3 == 0).then(|| "node-x".to_string()),
            song: None,
            updated_unix_ms: mirror::now_unix_ms(),
            ..rec
        };
        let t0 = Instant::now();
        let caller = task.set(Some(rec.clone()));
        wait_for(&mut c, &rec, Duration::from_secs(1)).await;
        let lat = t0.elapsed();
        worst = worst.max(lat);
        assert!(caller < Duration::from_millis(200), "send_replace took {caller:?} (the mirror must never block its caller; its command timeout is 1 s)");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("change → Redis hash latency: worst of 20 = {worst:?} (target ≤ 100 ms)");
    assert!(worst < Duration::from_secs(1));

    // Every change was published as the JSON record, in order; the last one is `rec`.
    let mut last = None;
    let mut n = 0;
    let mut messages = sub.on_message();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), messages.next()).await
    {
        assert_eq!(m.get_channel_name(), mirror::room_channel(room));
        let r: MirrorRecord = serde_json::from_slice(m.get_payload_bytes()).unwrap();
        if let Some(MirrorRecord { version, .. }) = &last {
            assert!(r.version > *version);
        }
        last = Some(r);
        n += 1;
    }
    assert_eq!(last.as_ref(), Some(&rec));
    assert_eq!(n, 21, "one message per change");
    drop(messages);

    // A refresh with nothing changed publishes nothing and counts no write, but it
    // stamps the leader's heartbeat (Redis's clock).
    let s = task.stats.snapshot();
    assert_eq!(
        (s.writes, s.errors, s.fenced, s.connected, s.state, s.lag_ms),
        (21, 0, 0, true, MirrorState::Connected, 0),
        "{s:?}"
    );
    let seen = |v: Option<String>| v.unwrap().parse::<u64>().unwrap();
    let seen0 = seen(hfield(&mut c, room, mirror::SEEN_FIELD).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let seen1 = seen(hfield(&mut c, room, mirror::SEEN_FIELD).await);
    assert!(seen1 > seen0, "heartbeat {seen0} -> {seen1}");
    assert_eq!(task.stats.snapshot().writes, 21);
    assert_eq!(hget(&mut c, room).await.as_ref(), Some(&rec));

    // Losing leadership: nothing more is written, and the mirror is off.
    task.set(None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    cmd(&mut c, &["DEL", &mirror::room_key(room)]).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(hget(&mut c, room).await, None, "a follower wrote to Redis");
    let s = task.stats.snapshot();
    assert_eq!(
        (s.state, s.connected, s.lag_ms),
        (MirrorState::Off, false, 0),
        "{s:?}"
    );
    task.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_refuses_older_epochs() {
    let redis = Redis::start().await;
    let room = "fence";
    let mut c = redis.conn().await;
    let newer = record(room, 5, 3, 140, 4);
    assert!(mirror::write_fenced(&mut c, room, &newer).await.unwrap());
    // Older epoch, even with a higher version: refused, and Redis's epoch reported.
    assert!(
        !mirror::write_fenced(&mut c, room, &record(room, 4, 100, 90, 3))
            .await
            .unwrap()
    );
    assert_eq!(
        mirror::write_fenced_outcome(&mut c, room, &record(room, 4, 100, 90, 3))
            .await
            .unwrap(),
        WriteOutcome::RefusedNewerEpoch { held_epoch: 5 }
    );
    // Same epoch, older version: refused.
    assert!(
        !mirror::write_fenced(&mut c, room, &record(room, 5, 2, 90, 3))
            .await
            .unwrap()
    );
    assert_eq!(
        mirror::write_fenced_outcome(&mut c, room, &record(room, 5, 2, 90, 3))
            .await
            .unwrap(),
        WriteOutcome::RefusedNewerVersion { held_version: 3 }
    );
    assert_eq!(
        hget(&mut c, room).await,
        Some(newer.clone()),
        "a refused write changed the hash"
    );
    // The same record again is fine (a resync), and newer ones pass.
    assert_eq!(
        mirror::write_fenced_outcome(&mut c, room, &newer)
            .await
            .unwrap(),
        WriteOutcome::Unchanged
    );
    let v4 = record(room, 5, 4, 141, 4);
    assert!(mirror::write_fenced(&mut c, room, &v4).await.unwrap());
    // Epochs compare exactly beyond 2^53 (Lua numbers are doubles).
    let huge = record(room, (1 << 53) + 1, 0, 150, 4);
    assert!(mirror::write_fenced(&mut c, room, &huge).await.unwrap());
    assert_eq!(
        mirror::write_fenced_outcome(&mut c, room, &record(room, 1 << 53, 9, 90, 4))
            .await
            .unwrap(),
        WriteOutcome::RefusedNewerEpoch {
            held_epoch: (1 << 53) + 1
        }
    );
    assert_eq!(hget(&mut c, room).await, Some(huge.clone()));
    let max = MirrorRecord {
        epoch: u64::MAX,
        version: u64::MAX,
        ..record(room, 9, 9, 150, 4)
    };
    assert!(mirror::write_fenced(&mut c, room, &max).await.unwrap());
    assert_eq!(
        mirror::write_fenced_outcome(&mut c, room, &record(room, u64::MAX - 1, 0, 150, 4))
            .await
            .unwrap()
            .held_epoch(),
        Some(u64::MAX)
    );
    cmd(&mut c, &["DEL", &mirror::room_key(room)]).await;
    assert!(mirror::write_fenced(&mut c, room, &huge).await.unwrap());

    // The script cache flushed behind our back: EVALSHA fails with NOSCRIPT, EVAL works.
    cmd(&mut c, &["SCRIPT", "FLUSH"]).await;
    let next = record(room, (1 << 53) + 2, 0, 151, 4);
    assert!(mirror::write_fenced(&mut c, room, &next).await.unwrap());
    assert_eq!(hget(&mut c, room).await, Some(next));

    // The script refuses malformed arguments itself.
    let r = c
        .query(
            redis::cmd("EVAL")
                .arg(mirror::FENCE_SCRIPT)
                .arg(2)
                .arg("k")
                .arg("rooms")
                .arg(&["1e3", "0", "ch", "{}", "r", "a", "b"][..]),
        )
        .await;
    assert!(
        matches!(&r, Err(MirrorError::Server { msg, .. }) if msg.contains("bad arguments")),
        "{r:?}"
    );
    // And a record for another room is refused before it is sent.
    assert!(matches!(
        mirror::write_fenced(&mut c, "other", &newer).await,
        Err(MirrorError::InvalidRecord(_))
    ));

    // A deposed leader: the new leader (epoch 8) mirrors; the old one (epoch 7) keeps
    // running with its stale record and is refused, again and again.
    let room = "deposed";
    let new_leader = spawn_run(&redis.url, room, Some(record(room, 8, 1, 120, 4)));
    wait_for(&mut c, &record(room, 8, 1, 120, 4), Duration::from_secs(2)).await;
    let old_leader = spawn_run(&redis.url, room, Some(record(room, 7, 50, 60, 3)));
    let t0 = Instant::now();
    while old_leader.stats.fenced.load(Ordering::Relaxed) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the old leader was never fenced"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    old_leader.set(Some(record(room, 7, 51, 61, 3)));
    let cur = record(room, 8, 2, 125, 5);
    new_leader.set(Some(cur.clone()));
    wait_for(&mut c, &cur, Duration::from_secs(1)).await;
    old_leader.set(Some(record(room, 7, 52, 62, 3)));
    tokio::time::sleep(Duration::from_millis(1200)).await; // a refresh period too
    assert_eq!(hget(&mut c, room).await, Some(cur));
    let (o, n) = (old_leader.stats.snapshot(), new_leader.stats.snapshot());
    println!("old leader {o:?}\nnew leader {n:?}");
    assert_eq!(o.writes, 0);
    assert!(o.fenced >= 3, "{o:?}");
    assert_eq!(o.errors, 0);
    assert_eq!(o.held_epoch, Some(8), "{o:?}");
    assert_eq!(
        (o.state, n.state),
        (MirrorState::Connected, MirrorState::Connected)
    );
    assert_eq!((n.writes, n.fenced, n.errors), (2, 0, 0));
    old_leader.stop().await;
    new_leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_recovery() {
    let mut redis = Redis::start().await;
    let room = "outage";
    let rec = record(room, 2, 1, 120, 4);
    let task = spawn_run(&redis.url, room, Some(rec.clone()));
    {
        let mut c = redis.conn().await;
        wait_for(&mut c, &rec, Duration::from_secs(2)).await;
    }
    // Redis goes away; the session changes meanwhile (137 BPM, 7/8).
    redis.kill();
    let changed = MirrorRecord {
        version: 2,
        tempo_mbpm: 137_000,
        meter: 7,
        ..rec.clone()
    };
    let mut worst = Duration::ZERO;
    for i in 0..150 {
        // The caller keeps changing things at 100 Hz while Redis is down.
        let r = if i == 149 {
            changed.clone()
        } else {
            MirrorRecord {
                version: 2,
                tempo_mbpm: 100_000 + i,
                ..rec.clone()
            }
        };
        worst = worst.max(task.set(Some(r)));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("send_replace while Redis is down: worst {worst:?}");
    assert!(
        worst < Duration::from_millis(200),
        "send_replace took {worst:?}: the mirror must never block its caller"
    );
    let s = task.stats.snapshot();
    println!("during the outage: {s:?}");
    assert!(s.errors >= 2, "{s:?}");
    assert!(!s.connected);
    // Redis has been behind since the first change of the outage, 1.5 s ago.
    assert_eq!(s.state, MirrorState::Stale, "{s:?}");
    assert!(s.lag_ms >= 1_200, "{s:?}");

    // Back on the same port, empty (no persistence): the hash is current within 5 s.
    redis.spawn().await;
    let t0 = Instant::now();
    let mut c = redis.conn().await;
    wait_for(&mut c, &changed, Duration::from_secs(5)).await;
    println!(
        "hash current again {:?} after redis-server came back",
        t0.elapsed()
    );
    let s = task.stats.snapshot();
    assert!(s.reconnects >= 1 && s.connected, "{s:?}");
    assert_eq!((s.state, s.lag_ms), (MirrorState::Connected, 0), "{s:?}");

    // A restart with no change at all: the refresh notices and resyncs.
    drop(c);
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.spawn().await;
    let t0 = Instant::now();
    let mut c = redis.conn().await;
    wait_for(&mut c, &changed, Duration::from_secs(5)).await;
    println!(
        "unchanged record resynced {:?} after the second restart",
        t0.elapsed()
    );
    // Someone deletes the key: healed by the refresh too.
    cmd(&mut c, &["DEL", &mirror::room_key(room)]).await;
    wait_for(&mut c, &changed, Duration::from_secs(3)).await;
    println!("final stats {:?}", task.stats.snapshot());
    task.stop().await;
}

/// A fake server: accept connections and hand each to `serve` (by connection index).
async fn fake_server<F, Fut>(serve: F) -> (u16, tokio::task::JoinHandle<()>)
where
    F: Fn(usize, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let h = tokio::spawn(async move {
        let mut i = 0;
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(i, s));
            i += 1;
        }
    });
    (port, h)
}

const JUNK: &[&[u8]] = &[
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    b"$99999999999\r\n",
    b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
    b"*4294967296\r\n",
    b":12x\r\n",
    b"+OK\r\n", // a well-formed reply of the wrong shape
    b"$3\r\nabcdefgh",
    b"+OK\nno carriage return\n",
    b"-ERR something odd\r\n",
    b"", // close at once
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_server_is_counted_and_survived() {
    let (port, server) = fake_server(|i, mut s| async move {
        let mut buf = [0u8; 4096];
        let junk = JUNK[i % JUNK.len()];
        // Answer whatever comes first with junk, then keep reading until closed.
        if s.read(&mut buf).await.unwrap_or(0) > 0 && !junk.is_empty() {
            let _ = s.write_all(junk).await;
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        }
    })
    .await;
    let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap();
    let room = "junk";
    // Short deadlines: some junk (a huge length, a line with no CRLF) is only ever cut
    // by the deadline, and the test wants to see many kinds of junk in 2.5 s.
    let opts = MirrorOptions {
        command_timeout: Duration::from_millis(300),
        backoff_max: Duration::from_millis(200),
        ..MirrorOptions::default()
    };
    let task = spawn_run_with(&url, room, Some(record(room, 1, 1, 120, 4)), opts);
    // The caller goes on at 100 Hz.
    let mut worst = Duration::ZERO;
    let t0 = Instant::now();
    let mut v = 1;
    while t0.elapsed() < Duration::from_millis(2500) {
        v += 1;
        worst = worst.max(task.set(Some(record(room, 1, v, 120, 4))));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = task.stats.snapshot();
    println!("garbage server: {s:?}, caller worst send_replace {worst:?}");
    assert!(
        worst < Duration::from_millis(200),
        "send_replace took {worst:?}: the mirror must never block its caller"
    );
    assert!(!task.handle.is_finished(), "the mirror task ended");
    assert!(s.errors >= 4, "{s:?}");
    assert!(s.bad_replies >= 3, "{s:?}");
    assert_eq!((s.writes, s.reconnects, s.connected), (0, 0, false));
    assert_eq!(s.state, MirrorState::Stale);
    task.stop().await;

    // With AUTH and SELECT in the way too, and fetch: errors, never a panic.
    let url = RedisUrl::parse(&format!("redis://u:pw@127.0.0.1:{port}/4")).unwrap();
    for _ in 0..JUNK.len() {
        let r = mirror::fetch(&url, room, Duration::from_millis(500)).await;
        let e = r.expect_err("junk made a record");
        println!("fetch from a garbage server: {e}");
        assert!(!e.to_string().contains("pw@"), "{e}");
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_server_times_out_without_touching_the_caller() {
    // Accepts, reads, never answers.
    let (port, server) = fake_server(|_, mut s| async move {
        let mut buf = [0u8; 4096];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
    })
    .await;
    let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap();
    let room = "slow";
    let task = spawn_run(&url, room, Some(record(room, 1, 1, 120, 4)));
    // A click-like ticker on the same runtime: 10 ms period, lateness measured.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let t0 = Instant::now();
    let (mut worst_set, mut worst_late) = (Duration::ZERO, Duration::ZERO);
    let mut v = 1;
    while t0.elapsed() < Duration::from_millis(2800) {
        let due = tick.tick().await;
        worst_late = worst_late.max(due.elapsed());
        v += 1;
        worst_set = worst_set.max(task.set(Some(record(room, 1, v, 120, 4))));
    }
    let s = task.stats.snapshot();
    println!("slow server: {s:?}; caller: worst send_replace {worst_set:?}, worst tick lateness {worst_late:?}");
    assert!(s.timeouts >= 2, "{s:?}");
    assert!(s.errors >= s.timeouts);
    assert_eq!(s.writes, 0);
    assert!(
        worst_set < Duration::from_millis(200),
        "send_replace took {worst_set:?}"
    );
    // Lateness is mostly the load of the parallel tests; a caller blocked by the mirror
    // would be late by a whole command timeout (1 s).
    assert!(worst_late < Duration::from_millis(500));
    // Shutdown is prompt even in the middle of a hung command.
    task.stop().await;

    let t0 = Instant::now();
    let r = mirror::fetch(&url, room, Duration::from_millis(300)).await;
    assert!(matches!(r, Err(ref e) if e.is_timeout()), "{r:?}");
    assert!(t0.elapsed() < Duration::from_millis(800));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_for_restore() {
    let redis = Redis::start().await;
    let room = "restore";
    assert_eq!(
        mirror::fetch(&redis.url, room, T).await.unwrap(),
        None,
        "an empty room"
    );
    let mut c = redis.conn().await;
    let rec = MirrorRecord {
        pinned: Some("node-b".into()),
        song: None,
        playing: false,
        ..record(room, 9, 4, 137, 7)
    };
    assert!(mirror::write_fenced(&mut c, room, &rec).await.unwrap());
    assert_eq!(
        mirror::fetch(&redis.url, room, T).await.unwrap(),
        Some(rec.clone())
    );

    // Another database: nothing there (SELECT works).
    let db3 = RedisUrl::parse(&format!("redis://127.0.0.1:{}/3", redis.port)).unwrap();
    assert_eq!(mirror::fetch(&db3, room, T).await.unwrap(), None);

    // A hash someone else mangled: a clear error naming the field.
    cmd(
        &mut c,
        &["HSET", &mirror::room_key(room), "tempo_mbpm", "fast"],
    )
    .await;
    let e = mirror::fetch(&redis.url, room, T).await.unwrap_err();
    println!("mangled hash: {e}");
    assert!(
        e.to_string().contains("tempo_mbpm") && e.to_string().contains("fast"),
        "{e}"
    );
    // A key of another type.
    cmd(&mut c, &["SET", &mirror::room_key("str"), "x"]).await;
    let e = mirror::fetch(&redis.url, "str", T).await.unwrap_err();
    assert!(matches!(e, MirrorError::Server { .. }), "{e}");

    // Nothing listening: an error, quickly.
    let nobody = RedisUrl::parse(&format!("redis://127.0.0.1:{}", free_port())).unwrap();
    let t0 = Instant::now();
    let e = mirror::fetch(&nobody, room, T).await.unwrap_err();
    println!("nobody listening: {e} ({:?})", t0.elapsed());
    assert!(t0.elapsed() < T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_password_and_acl_user() {
    let secret = "s3cr3t-Pw";
    let redis = Redis::start_with(
        &[
            "--requirepass",
            secret,
            "--user",
            "alice",
            "on",
            ">wonderland",
            "~bandsync:*",
            "&*",
            "+@all",
        ],
        Some(&|p| format!("redis://:{secret}@127.0.0.1:{p}/1")),
    )
    .await;
    let room = "auth";
    let task = spawn_run(&redis.url, room, Some(record(room, 1, 1, 120, 4)));
    let mut c = redis.conn().await;
    wait_for(&mut c, &record(room, 1, 1, 120, 4), Duration::from_secs(2)).await;
    task.stop().await;
    let alice = RedisUrl::parse(&format!(
        "redis://alice:wonderland@127.0.0.1:{}/1",
        redis.port
    ))
    .unwrap();
    assert_eq!(
        mirror::fetch(&alice, room, T).await.unwrap(),
        Some(record(room, 1, 1, 120, 4))
    );

    let wrong =
        RedisUrl::parse(&format!("redis://:not-{secret}@127.0.0.1:{}/1", redis.port)).unwrap();
    let e = mirror::fetch(&wrong, room, T).await.unwrap_err();
    println!("wrong password: {e}; url shown as {wrong}");
    assert!(matches!(e, MirrorError::Auth { .. }), "{e}");
    assert!(!e.to_string().contains(secret) && !wrong.to_string().contains(secret));
    let none = RedisUrl::parse(&format!("redis://127.0.0.1:{}/1", redis.port)).unwrap();
    let e = mirror::fetch(&none, room, T).await.unwrap_err();
    println!("no password: {e}");
    assert!(
        matches!(e, MirrorError::Auth { .. }) && e.to_string().contains("Authentication required"),
        "{e}"
    );
    // A mirror task with the wrong password: counted, logged, never written.
    let task = spawn_run(&wrong, "auth2", Some(record("auth2", 1, 1, 120, 4)));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let s = task.stats.snapshot();
    assert!(s.errors >= 1 && s.writes == 0 && !s.connected, "{s:?}");
    task.stop().await;
}

type Ca = rcgen::CertifiedIssuer<'static, rcgen::KeyPair>;

/// A test certificate authority, written to `<dir>/<name>-ca.crt`.
fn make_ca(dir: &Path, name: &str) -> (PathBuf, Ca) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("bandsync test CA {name}"),
    );
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(p, rcgen::KeyPair::generate().unwrap()).unwrap();
    let path = dir.join(format!("{name}-ca.crt"));
    std::fs::write(&path, ca.pem()).unwrap();
    (path, ca)
}

/// A certificate for localhost / 127.0.0.1 signed by `ca`: (cert path, key path).
fn make_cert(dir: &Path, name: &str, ca: &Ca) -> (String, String) {
    let mut p =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_rediss() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_path, ca) = make_ca(dir.path(), "good");
    let (other_ca, _) = make_ca(dir.path(), "other");
    let (s, k) = make_cert(dir.path(), "server", &ca);
    let (cc, ck) = make_cert(dir.path(), "client", &ca);
    let b = ca_path.display().to_string();

    // Server authentication only.
    let ca = b.clone();
    let redis = Redis::start_with(
        &[
            "--tls-port",
            "--tls-cert-file",
            &s,
            "--tls-key-file",
            &k,
            "--tls-ca-cert-file",
            &b,
            "--tls-auth-clients",
            "no",
        ],
        Some(&move |p| format!("rediss://127.0.0.1:{p}/0?cacert={ca}")),
    )
    .await;
    let room = "tls";
    let rec = record(room, 4, 2, 120, 4);
    let task = spawn_run(&redis.url, room, Some(rec.clone()));
    let mut c = redis.conn().await;
    wait_for(&mut c, &rec, Duration::from_secs(2)).await;
    assert_eq!(
        mirror::fetch(&redis.url, room, T).await.unwrap(),
        Some(rec.clone())
    );
    task.stop().await;
    // "localhost" is in the certificate too.
    let by_name =
        RedisUrl::parse(&format!("rediss://localhost:{}/0?cacert={b}", redis.port)).unwrap();
    assert_eq!(
        mirror::fetch(&by_name, room, T).await.unwrap(),
        Some(rec.clone())
    );

    // An untrusted server certificate is refused, clearly.
    let wrong_ca = RedisUrl::parse(&format!(
        "rediss://127.0.0.1:{}/0?cacert={}",
        redis.port,
        other_ca.display()
    ))
    .unwrap();
    let e = mirror::fetch(&wrong_ca, room, T).await.unwrap_err();
    println!("untrusted certificate: {e}");
    assert!(matches!(e, MirrorError::Tls { .. }), "{e}");
    // TLS to a plain-text server, and plain text to a TLS server: errors, no hang.
    let plain = Redis::start().await;
    let to_plain =
        RedisUrl::parse(&format!("rediss://127.0.0.1:{}/0?cacert={b}", plain.port)).unwrap();
    println!(
        "TLS to plain: {}",
        mirror::fetch(&to_plain, room, T).await.unwrap_err()
    );
    let to_tls = RedisUrl::parse(&format!("redis://127.0.0.1:{}/0", redis.port)).unwrap();
    println!(
        "plain to TLS: {}",
        mirror::fetch(&to_tls, room, T).await.unwrap_err()
    );
    let missing = RedisUrl::parse(&format!(
        "rediss://127.0.0.1:{}/0?cacert=/nonexistent.pem",
        redis.port
    ))
    .unwrap();
    let e = mirror::fetch(&missing, room, T).await.unwrap_err();
    assert!(e.to_string().contains("/nonexistent.pem"), "{e}");

    // Mutual TLS: the server requires a client certificate.
    let ca = b.clone();
    let mtls = Redis::start_with(
        &[
            "--tls-port",
            "--tls-cert-file",
            &s,
            "--tls-key-file",
            &k,
            "--tls-ca-cert-file",
            &b,
            "--tls-auth-clients",
            "yes",
        ],
        Some(&move |p| format!("rediss://127.0.0.1:{p}/0?cacert={ca}&cert={cc}&key={ck}")),
    )
    .await;
    let mut c = mtls.conn().await;
    assert!(mirror::write_fenced(&mut c, room, &rec).await.unwrap());
    assert_eq!(mirror::fetch(&mtls.url, room, T).await.unwrap(), Some(rec));
    let no_cert =
        RedisUrl::parse(&format!("rediss://127.0.0.1:{}/0?cacert={b}", mtls.port)).unwrap();
    let e = mirror::fetch(&no_cert, room, T).await.unwrap_err();
    println!("no client certificate: {e}");
}
