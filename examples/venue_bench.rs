//! The venue at scale (issue 13 item 5): one real `redis-server`, N light in-process
//! writers (one per room, each the mirror's own task, `bandsync::mirror::run_with`,
//! with its own connection, fed through its `watch` channel like a room task does),
//! each changing its room's record every `--change-ms` (phase spread at random) and
//! appending a usage entry every fifth change. Measured meanwhile:
//!
//! * mirror lag: change handed to the mirror → its publish seen by a subscriber
//!   (`PSUBSCRIBE bandsync:room:*:changes`), per room; p50/p99 over all changes and
//!   the distribution of the per-room p99s;
//! * the venue listing ([`bandsync::mirror::venue`]) every 2 s: time taken;
//! * Redis's CPU (`INFO cpu`, user + sys over the run) and memory (`INFO memory`).
//!
//! ```text
//! cargo run --example venue_bench -- [--rooms 1000] [--seconds 30] [--change-ms 1000]
//!                                    [--redis redis://127.0.0.1:6379/0]
//! ```
//!
//! Without `--redis` it starts its own `redis-server` on a spare loopback port (and
//! stops it at the end). It only talks to that loopback server.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bandsync::mirror::{self, MirrorOptions, MirrorRecord, MirrorStats, RedisUrl};
use futures_util::StreamExt;

struct Args {
    rooms: u32,
    seconds: u64,
    change_ms: u64,
    redis: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        rooms: 1000,
        seconds: 30,
        change_ms: 1000,
        redis: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--rooms" => a.rooms = v.parse().expect("--rooms N"),
            "--seconds" => a.seconds = v.parse().expect("--seconds S"),
            "--change-ms" => a.change_ms = v.parse().expect("--change-ms MS"),
            "--redis" => a.redis = Some(v),
            _ => panic!("unknown flag {k}"),
        }
    }
    a
}

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn info(c: &mut redis::aio::MultiplexedConnection, section: &str) -> HashMap<String, String> {
    let s: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .unwrap();
    s.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn cpu_s(i: &HashMap<String, String>) -> f64 {
    ["used_cpu_user", "used_cpu_sys"]
        .iter()
        .map(|k| i[*k].parse::<f64>().unwrap())
        .sum()
}

fn main() {
    let a = args();
    let (url, _server) = match &a.redis {
        Some(u) => (u.clone(), None),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server)");
            let t = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            (format!("redis://127.0.0.1:{port}/0"), Some(Server(child)))
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a, url));
}

async fn run(a: Args, url: String) {
    let rurl = RedisUrl::parse(&url).unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut admin).await.unwrap();

    // The subscriber: lag of every published change, per room.
    let lags: Arc<Mutex<HashMap<String, Vec<f64>>>> = Arc::default();
    let mut ps = client.get_async_pubsub().await.unwrap();
    ps.psubscribe("bandsync:room:*:changes").await.unwrap();
    let measuring = Arc::new(AtomicBool::new(false));
    {
        let lags = lags.clone();
        let measuring = measuring.clone();
        tokio::spawn(async move {
            let mut s = ps.on_message();
            while let Some(m) = s.next().await {
                let now = mirror::now_unix_ms() as f64;
                let Ok(payload) = m.get_payload::<String>() else {
                    continue;
                };
                let Ok(rec) = serde_json::from_str::<MirrorRecord>(&payload) else {
                    continue;
                };
                if measuring.load(Ordering::Relaxed) {
                    lags.lock()
                        .unwrap()
                        .entry(rec.room)
                        .or_default()
                        .push(now - rec.updated_unix_ms as f64);
                }
            }
        });
    }

    // The writers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut usage_conn = mirror::Conn::connect(&rurl, Duration::from_secs(2))
        .await
        .unwrap();
    let (usage_tx, mut usage_rx) = tokio::sync::mpsc::channel::<(String, u64)>(10_000);
    tokio::spawn(async move {
        while let Some((room, played)) = usage_rx.recv().await {
            let played = played.to_string();
            let _ = mirror::append_usage(
                &mut usage_conn,
                &room,
                1,
                &[("event", "stop"), ("played_ms", &played)],
            )
            .await;
        }
    });
    let t_setup = Instant::now();
    let mut stats = Vec::new();
    for i in 0..a.rooms {
        let room = format!("bench-{i:05}");
        let st = Arc::new(MirrorStats::default());
        stats.push(st.clone());
        let mut rec = MirrorRecord {
            room: room.clone(),
            epoch: 1,
            version: 0,
            leader: format!("{:016x}", 0xbe00_0000u64 + u64::from(i)),
            tempo_mbpm: 100_000,
            meter: 4,
            playing: true,
            pinned: None,
            song: None,
            boxes: 2,
            updated_unix_ms: mirror::now_unix_ms(),
        };
        let (tx, rx) = tokio::sync::watch::channel(Some(rec.clone()));
        tokio::spawn(mirror::run_with(
            rurl.clone(),
            room.clone(),
            rx,
            st,
            stop_rx.clone(),
            MirrorOptions::default(),
        ));
        let change = Duration::from_millis(a.change_ms);
        let usage_tx = usage_tx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            // spread the phases: room i changes at i/N of the period
            let phase = change.mul_f64(f64::from(i) / f64::from(a.rooms.max(1)));
            tokio::time::sleep(phase).await;
            let mut tick = tokio::time::interval(change);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                rec.version += 1;
                rec.tempo_mbpm = 100_000 + (rec.version % 50) as u32 * 1000;
                rec.updated_unix_ms = mirror::now_unix_ms();
                tx.send_replace(Some(rec.clone()));
                if rec.version % 5 == 0 {
                    let _ = usage_tx.try_send((rec.room.clone(), 5 * change.as_millis() as u64));
                }
            }
        });
    }
    // warm-up: every room written once
    loop {
        let n: u64 = redis::cmd("SCARD")
            .arg(mirror::ROOMS_KEY)
            .query_async(&mut admin)
            .await
            .unwrap();
        if n >= u64::from(a.rooms) {
            break;
        }
        assert!(
            t_setup.elapsed() < Duration::from_secs(60),
            "only {n} rooms after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} rooms mirrored (one mirror task and connection each) after {:.1} s",
        a.rooms,
        t_setup.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cpu0 = cpu_s(&info(&mut admin, "cpu").await);
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    let mut venue_ms = Vec::new();
    let mut listed = 0;
    while t0.elapsed() < Duration::from_secs(a.seconds) {
        let t = Instant::now();
        match mirror::venue(&rurl, Duration::from_secs(5)).await {
            Ok(v) => {
                venue_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                listed = v.rooms.len();
            }
            Err(e) => println!("venue failed: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    measuring.store(false, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_s(&info(&mut admin, "cpu").await);
    let mem = info(&mut admin, "memory").await;
    let clients = info(&mut admin, "clients").await;
    let _ = stop_tx.send(true);

    let lags = lags.lock().unwrap();
    let mut all: Vec<f64> = lags.values().flatten().copied().collect();
    let mut room_p99: Vec<f64> = lags.values().map(|v| pct(&mut v.clone(), 0.99)).collect();
    let errors: u64 = stats.iter().map(|s| s.snapshot().errors).sum();
    let fenced: u64 = stats.iter().map(|s| s.snapshot().fenced).sum();
    println!(
        "rooms: {} (venue listed {listed}), changes every {} ms per room, {:.0} s measured",
        a.rooms, a.change_ms, wall
    );
    println!(
        "mirror lag (change handed -> publish received), ms: p50 {:.0}, p99 {:.0}, max {:.0} over {} changes in {} rooms",
        pct(&mut all, 0.5),
        pct(&mut all, 0.99),
        pct(&mut all, 1.0),
        all.len(),
        lags.len()
    );
    println!(
        "per-room p99 lag, ms: median {:.0}, p99 {:.0}, worst room {:.0}",
        pct(&mut room_p99, 0.5),
        pct(&mut room_p99, 0.99),
        pct(&mut room_p99, 1.0)
    );
    println!(
        "venue listing (connect, TIME+SMEMBERS, one pipeline of HGETALL+XRANGE per room), ms: p50 {:.1}, max {:.1} over {} reads",
        pct(&mut venue_ms, 0.5),
        pct(&mut venue_ms, 1.0),
        venue_ms.len()
    );
    println!(
        "redis-server CPU: {:.1} % of one core (INFO cpu user+sys over the run)",
        (cpu1 - cpu0) / wall * 100.0
    );
    println!(
        "redis-server memory: used_memory {} ({}), rss {}, clients {}",
        mem["used_memory"],
        mem["used_memory_human"],
        mem["used_memory_rss_human"],
        clients["connected_clients"]
    );
    println!("mirror errors {errors}, fenced {fenced}");
}
