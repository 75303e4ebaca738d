//! The venue side of the Redis mirror (SPEC §4 "Venue") against a real `redis-server`
//! (Debian package `redis-server`) started by each test on a spare loopback port: the
//! set of rooms, the fenced usage stream, and `venue` over hundreds of rooms.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bandsync::mirror::{self, Conn, MirrorError, MirrorRecord, RedisUrl, UsageOutcome};
use redis::Value;

const T: Duration = Duration::from_secs(1);

/// A plain `redis-server` on a spare loopback port, killed on drop.
struct Redis {
    child: Child,
    url: RedisUrl,
    _dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--save", "", "--appendonly", "no"])
            .args(["--dir", dir.path().to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install the Debian package `redis-server` (apt-get install -y redis-server)")
            });
        let url = RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).unwrap();
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = Conn::connect(&url, T).await {
                if c.ping().await.is_ok() {
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not come up on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Redis {
            child,
            url,
            _dir: dir,
        }
    }

    async fn conn(&self) -> Conn {
        Conn::connect(&self.url, T).await.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn cmd(c: &mut Conn, args: &[&str]) -> Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    c.query(&cmd).await.unwrap()
}

fn record(room: &str, i: u32) -> MirrorRecord {
    MirrorRecord {
        room: room.into(),
        epoch: 1 + u64::from(i % 7),
        version: u64::from(i),
        leader: format!("node-{i:04}"),
        tempo_mbpm: 60_000 + i * 500,
        meter: (i % 16 + 1) as u8,
        playing: i % 3 != 0,
        pinned: (i % 5 == 0).then(|| format!("node-{i:04}")),
        song: None,
        boxes: 1 + i % 6,
        updated_unix_ms: mirror::now_unix_ms(),
    }
}

/// `played_ms` of the usage entries of `room` since `since_ms` (by entry id), summed.
async fn played_since(c: &mut Conn, room: &str, since_ms: u64) -> u64 {
    let Value::Array(entries) = cmd(c, &["XRANGE", &mirror::usage_key(room), "-", "+"]).await
    else {
        panic!()
    };
    let mut sum = 0;
    for e in entries {
        let Value::Array(parts) = e else { panic!() };
        let (Value::BulkString(id), Value::Array(kv)) = (&parts[0], &parts[1]) else {
            panic!()
        };
        let ms: u64 = String::from_utf8_lossy(id)
            .split('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        for pair in kv.chunks(2) {
            if let [Value::BulkString(k), Value::BulkString(v)] = pair {
                if k == b"played_ms" && ms >= since_ms {
                    sum += String::from_utf8_lossy(v).parse::<u64>().unwrap();
                }
            }
        }
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn venue_lists_hundreds_of_rooms_quickly() {
    let started_ms = mirror::now_unix_ms();
    let redis = Redis::start().await;
    let mut c = redis.conn().await;
    assert_eq!(
        mirror::venue(&redis.url, T).await.unwrap().rooms,
        vec![],
        "an empty Redis"
    );

    // 240 rooms written by their leaders (which also lists them), some with usage.
    const N: u32 = 240;
    let name = |i: u32| format!("room-{i:03}");
    for i in 0..N {
        let room = name(i);
        assert!(mirror::write_fenced(&mut c, &room, &record(&room, i))
            .await
            .unwrap());
        let epoch = record(&room, i).epoch;
        for k in 0..i % 4 {
            let played = (60_000 * (k + 1)).to_string();
            let out = mirror::append_usage(
                &mut c,
                &room,
                epoch,
                &[
                    ("event", "played"),
                    ("played_ms", &played),
                    ("tempo_mbpm", "120000"),
                ],
            )
            .await
            .unwrap();
            assert!(matches!(out, UsageOutcome::Appended { .. }), "{out:?}");
        }
        if i % 10 == 0 {
            mirror::append_usage(
                &mut c,
                &room,
                epoch,
                &[("event", "leader"), ("leader", "x")],
            )
            .await
            .unwrap();
        }
    }
    // A room whose leader went away two minutes ago (its heartbeat is old).
    let old = (mirror::now_unix_ms() - 120_000).to_string();
    cmd(
        &mut c,
        &[
            "HSET",
            &mirror::room_key(&name(7)),
            mirror::SEEN_FIELD,
            &old,
        ],
    )
    .await;
    // Listed but without a hash (deleted by hand): left out.
    cmd(&mut c, &["DEL", &mirror::room_key(&name(8))]).await;
    // Mangled by someone else, a key of another type, a name that is not one: each
    // listed as invalid, naming what is wrong, never hiding the others.
    cmd(
        &mut c,
        &["HSET", &mirror::room_key(&name(9)), "meter", "seven"],
    )
    .await;
    cmd(&mut c, &["SADD", mirror::ROOMS_KEY, "a-string"]).await;
    cmd(&mut c, &["SET", &mirror::room_key("a-string"), "x"]).await;
    cmd(&mut c, &["SADD", mirror::ROOMS_KEY, "bad\u{1}name"]).await;
    cmd(
        &mut c,
        &[
            "XADD",
            &mirror::usage_key(&name(11)),
            "*",
            "played_ms",
            "lots",
        ],
    )
    .await;

    let mut times = Vec::new();
    let mut v = None;
    for _ in 0..5 {
        let t0 = Instant::now();
        v = Some(mirror::venue(&redis.url, T).await.unwrap());
        times.push(t0.elapsed());
    }
    let v = v.unwrap();
    times.sort();
    println!(
        "venue of {} rooms ({} invalid): best {:?}, worst {:?} of 5 (connect included)",
        v.rooms.len(),
        v.invalid.len(),
        times[0],
        times[4]
    );
    assert!(times[4] < Duration::from_millis(500), "{times:?}");

    let invalid: HashMap<&str, &str> = v
        .invalid
        .iter()
        .map(|r| (r.room.as_str(), r.error.as_str()))
        .collect();
    println!("invalid: {invalid:#?}");
    assert_eq!(invalid.len(), 4, "{invalid:?}");
    assert!(invalid[name(9).as_str()].contains("field `meter`: `seven`"));
    assert!(invalid["a-string"].contains("WRONGTYPE"));
    assert!(invalid["bad\\u{1}name"].contains("room name"));
    assert!(invalid[name(11).as_str()].contains("played_ms `lots`"));

    assert_eq!(
        v.rooms.len() as u32,
        N - 3,
        "all but the deleted and broken ones"
    );
    let names: Vec<&str> = v.rooms.iter().map(|r| r.room.as_str()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by name");
    let midnight = mirror::local_midnight_ms(v.now_unix_ms);
    for r in &v.rooms {
        let i: u32 = r.room[5..].parse().unwrap();
        let want = record(&r.room, i);
        assert_eq!(
            (r.tempo, r.meter, r.playing, &r.leader, r.boxes, r.epoch, &r.song),
            (
                f64::from(want.tempo_mbpm) / 1000.0,
                want.meter,
                want.playing,
                &want.leader,
                want.boxes,
                want.epoch,
                &None
            ),
            "{r:?}"
        );
        assert_eq!(r.gone, i == 7, "{r:?}");
        let seen = r.seen_unix_ms.unwrap();
        assert!(
            seen <= v.now_unix_ms && (i == 7 || v.now_unix_ms - seen < 60_000),
            "{r:?}"
        );
        assert_eq!(
            r.played_today_s,
            played_since(&mut c, &r.room, midnight).await / 1000,
            "{r:?}"
        );
    }
    // Room 3 played 60 + 120 + 180 s today (unless midnight passed during the test).
    assert_eq!(played_since(&mut c, &name(3), 0).await, 360_000);
    let r3 = v.rooms.iter().find(|r| r.room == name(3)).unwrap();
    assert!(r3.played_today_s == 360 || midnight > started_ms, "{r3:?}");
    // The JSON a venue page gets carries the SPEC's fields.
    let json = serde_json::to_value(&v.rooms[0]).unwrap();
    for f in [
        "room",
        "tempo",
        "meter",
        "playing",
        "leader",
        "boxes",
        "song",
        "updated_unix_ms",
        "played_today_s",
        "gone",
    ] {
        assert!(json.get(f).is_some(), "{f} missing in {json}");
    }

    // Nothing listening: an error, quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nobody = RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap();
    let t0 = Instant::now();
    let e = mirror::venue(&nobody, T).await.unwrap_err();
    println!("venue with nobody listening: {e}");
    assert!(t0.elapsed() < T);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_fenced_validated_and_bounded() {
    let redis = Redis::start().await;
    let mut c = redis.conn().await;
    let room = "usage";
    let ev = [("event", "played"), ("played_ms", "1000")];

    // No hash yet: any epoch may append.
    let out = mirror::append_usage(&mut c, room, 3, &ev).await.unwrap();
    let UsageOutcome::Appended { id } = out else {
        panic!("{out:?}")
    };
    assert!(id.contains('-'), "{id}");
    // The leader of epoch 5 writes the hash: epoch 3 is deposed, 5 and later append.
    let rec = MirrorRecord {
        epoch: 5,
        ..record(room, 1)
    };
    assert!(mirror::write_fenced(&mut c, room, &rec).await.unwrap());
    assert_eq!(
        mirror::append_usage(&mut c, room, 3, &ev).await.unwrap(),
        UsageOutcome::RefusedNewerEpoch { held_epoch: 5 }
    );
    for epoch in [5, 6] {
        let out = mirror::append_usage(&mut c, room, epoch, &ev)
            .await
            .unwrap();
        assert!(matches!(out, UsageOutcome::Appended { .. }), "{out:?}");
    }
    assert_eq!(
        cmd(&mut c, &["XLEN", &mirror::usage_key(room)]).await,
        Value::Int(3)
    );
    // Every entry carries its epoch and a time.
    let Value::Array(last) = cmd(
        &mut c,
        &[
            "XREVRANGE",
            &mirror::usage_key(room),
            "+",
            "-",
            "COUNT",
            "1",
        ],
    )
    .await
    else {
        panic!()
    };
    let Value::Array(parts) = &last[0] else {
        panic!()
    };
    let Value::Array(kv) = &parts[1] else {
        panic!()
    };
    let kv: HashMap<String, String> = kv
        .chunks(2)
        .map(|p| match p {
            [Value::BulkString(k), Value::BulkString(v)] => (
                String::from_utf8(k.clone()).unwrap(),
                String::from_utf8(v.clone()).unwrap(),
            ),
            _ => panic!("{p:?}"),
        })
        .collect();
    assert_eq!(kv["event"], "played");
    assert_eq!(kv["epoch"], "6");
    let t: u64 = kv["t_unix_ms"].parse().unwrap();
    assert!(mirror::now_unix_ms() - t < 10_000);

    // Bad entries are refused before anything is sent, naming the problem.
    let long = "x".repeat(mirror::USAGE_MAX_VALUE + 1);
    let many: Vec<(String, &str)> = (0..=mirror::USAGE_MAX_FIELDS)
        .map(|i| (format!("f{i}"), "v"))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    for (fields, want) in [
        (&[("played_ms", "1")][..], "no `event`"),
        (&[("event", "x"), ("Bad", "1")][..], "`Bad`"),
        (&[("event", "x"), ("epoch", "9")][..], "`epoch`"),
        (&[("event", "x"), ("event", "y")][..], "twice"),
        (&[("event", "a\nb")][..], "a\\nb"),
        (&[("event", long.as_str())][..], "at most"),
        (&[][..], "0 fields"),
        (&many[..], "33 fields"),
    ] {
        let e = mirror::append_usage(&mut c, room, 6, fields)
            .await
            .unwrap_err();
        assert!(
            matches!(e, MirrorError::InvalidUsage(_)) && e.to_string().contains(want),
            "{fields:?}: {e}"
        );
    }
    let e = mirror::append_usage(&mut c, "", 6, &ev).await.unwrap_err();
    assert!(e.to_string().contains("room name"), "{e}");

    // The stream stays bounded: MAXLEN ~ trims whole nodes (100 entries by default).
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..(mirror::USAGE_MAXLEN / 4 + 200) {
                mirror::append_usage(&mut c, room, 6, &[("event", "tick")])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let Value::Int(len) = cmd(&mut c, &["XLEN", &mirror::usage_key(room)]).await else {
        panic!()
    };
    println!(
        "{} appends in {:?}; the stream holds {len}",
        mirror::USAGE_MAXLEN + 800,
        t0.elapsed()
    );
    let len = len as u64;
    assert!(
        (mirror::USAGE_MAXLEN..=mirror::USAGE_MAXLEN + 100).contains(&len),
        "{len}"
    );
}
