//! The venue view (SPEC §4 "Venue"): every room in one Redis, read in two round trips.
//!
//! 1. `TIME` and `SMEMBERS bandsync:rooms`: the server's clock and the room names.
//! 2. One pipeline: per room, `HGETALL bandsync:room:<room>` and
//!    `XRANGE bandsync:room:<room>:usage <local midnight> + COUNT` [`USAGE_READ_MAX`].
//!
//! Time is Redis's own: a box's wall clock may be wrong (a Pi has no real-time
//! clock), so "gone" compares the leader's heartbeat (`seen_unix_ms`, stamped by the
//! fence script with the server's clock every second while a leader mirrors) with the
//! server's `TIME`; "today" starts at the local midnight of the server's time, and the
//! usage stream's entry ids are server times too.
//!
//! A room whose hash or usage is invalid is listed in [`Venue::invalid`] with the
//! error naming what was wrong; it never hides the other rooms.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Value;

use super::conn::Conn;
use super::error::{describe, show, MirrorError};
use super::record::{check_room, hash_record, room_key, usage_key, ROOMS_KEY};
use super::url::RedisUrl;

/// A room whose leader has not been heard from for this long is `gone`.
pub const GONE_AFTER: Duration = Duration::from_secs(60);
/// Most rooms listed; a larger `bandsync:rooms` is an error.
pub const MAX_VENUE_ROOMS: usize = 10_000;
/// Most usage entries of today read per room.
pub const USAGE_READ_MAX: usize = 2_000;

/// One room as the venue sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VenueRoom {
    pub room: String,
    /// BPM.
    pub tempo: f64,
    pub meter: u8,
    pub playing: bool,
    /// The leader's node id.
    pub leader: String,
    /// Boxes in the room (0: unknown).
    pub boxes: u32,
    /// The current song's title (from the room's setlist), if one is chosen.
    pub song: Option<String>,
    pub epoch: u64,
    /// When the room's state last changed (the leader's clock).
    pub updated_unix_ms: u64,
    /// When the leader last refreshed the record (Redis's clock), if it ever did.
    pub seen_unix_ms: Option<u64>,
    /// Seconds played since local midnight: the sum of the `played_ms` fields of today's
    /// usage entries (0 when there are none).
    pub played_today_s: u64,
    /// No leader refreshed the record for [`GONE_AFTER`].
    pub gone: bool,
}

/// A room of `bandsync:rooms` that could not be listed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InvalidRoom {
    /// The name, escaped if it is not printable UTF-8.
    pub room: String,
    pub error: String,
}

/// Every room of a Redis.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Venue {
    /// Redis's clock when the rooms were read.
    pub now_unix_ms: u64,
    /// By name. A name in `bandsync:rooms` with no hash is left out.
    pub rooms: Vec<VenueRoom>,
    pub invalid: Vec<InvalidRoom>,
}

/// Connect to `url` and list its rooms, all within `timeout`.
pub async fn venue(url: &RedisUrl, timeout: Duration) -> Result<Venue, MirrorError> {
    let work = async {
        let mut c = Conn::connect(url, timeout).await?;
        venue_on(&mut c).await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(MirrorError::Timeout {
            addr: url.addr(),
            what: "the venue (connect, TIME, SMEMBERS, one pipeline)".into(),
            after: timeout,
        }),
    }
}

/// [`venue`] on an open connection (each of its two round trips within the
/// connection's deadline).
pub async fn venue_on<C: ConnectionLike>(c: &mut Conn<C>) -> Result<Venue, MirrorError> {
    let addr = c.addr().to_string();
    let bad = |cmd: &str, got: String| MirrorError::bad_reply(&addr, cmd, got);
    let mut first = redis::pipe();
    first.cmd("TIME").cmd("SMEMBERS").arg(ROOMS_KEY);
    let mut replies = c
        .query_pipeline("TIME, SMEMBERS", &first)
        .await?
        .into_iter();
    let (Some(time), Some(members)) = (replies.next(), replies.next()) else {
        return Err(bad("TIME, SMEMBERS", "fewer replies than commands".into()));
    };
    let now_unix_ms = server_ms(&time).ok_or_else(|| bad("TIME", describe(&time)))?;
    let members = match members {
        Value::Array(m) | Value::Set(m) => m,
        other => return Err(bad("SMEMBERS", describe(&other))),
    };
    if members.len() > MAX_VENUE_ROOMS {
        return Err(bad(
            "SMEMBERS",
            format!(
                "{ROOMS_KEY} holds {} rooms, more than {MAX_VENUE_ROOMS}",
                members.len()
            ),
        ));
    }
    let mut invalid = Vec::new();
    let mut names = Vec::with_capacity(members.len());
    for m in members {
        let Value::BulkString(b) = m else {
            return Err(bad(
                "SMEMBERS",
                format!("a member that is {}", describe(&m)),
            ));
        };
        match String::from_utf8(b) {
            Ok(name) => match check_room(&name) {
                Ok(()) => names.push(name),
                Err(e) => invalid.push(InvalidRoom {
                    room: name.escape_debug().to_string(),
                    error: e,
                }),
            },
            Err(e) => invalid.push(InvalidRoom {
                room: show(e.as_bytes()),
                error: "the room name is not UTF-8".into(),
            }),
        }
    }
    names.sort();

    let midnight = local_midnight_ms(now_unix_ms);
    let mut second = redis::pipe();
    second.ignore_errors();
    for name in &names {
        second.cmd("HGETALL").arg(room_key(name));
        second
            .cmd("XRANGE")
            .arg(usage_key(name))
            .arg(midnight)
            .arg("+")
            .arg("COUNT")
            .arg(USAGE_READ_MAX);
    }
    let replies = if names.is_empty() {
        Vec::new()
    } else {
        c.query_pipeline("HGETALL, XRANGE (venue)", &second).await?
    };
    if replies.len() != names.len() * 2 {
        return Err(bad(
            "HGETALL, XRANGE (venue)",
            format!("{} replies to {} commands", replies.len(), names.len() * 2),
        ));
    }
    let mut rooms = Vec::with_capacity(names.len());
    let mut replies = replies.into_iter();
    for name in names {
        let (Some(hash), Some(usage)) = (replies.next(), replies.next()) else {
            unreachable!("counted above");
        };
        match venue_room(&addr, &name, hash, usage, now_unix_ms) {
            Ok(Some(r)) => rooms.push(r),
            Ok(None) => {}
            Err(e) => invalid.push(InvalidRoom {
                room: name,
                error: e.to_string(),
            }),
        }
    }
    Ok(Venue {
        now_unix_ms,
        rooms,
        invalid,
    })
}

fn venue_room(
    addr: &str,
    name: &str,
    hash: Value,
    usage: Value,
    now_unix_ms: u64,
) -> Result<Option<VenueRoom>, MirrorError> {
    if let Value::ServerError(e) = &hash {
        return Err(MirrorError::Server {
            cmd: "HGETALL".into(),
            msg: super::error::clip(&e.to_string()),
        });
    }
    let Some((rec, seen)) = hash_record(name, addr, hash)? else {
        return Ok(None);
    };
    let played_ms = played_ms(addr, name, usage)?;
    let heard = seen.unwrap_or(rec.updated_unix_ms);
    Ok(Some(VenueRoom {
        room: rec.room,
        tempo: rec.tempo_mbpm as f64 / 1000.0,
        meter: rec.meter,
        playing: rec.playing,
        leader: rec.leader,
        boxes: rec.boxes,
        song: rec.song,
        epoch: rec.epoch,
        updated_unix_ms: rec.updated_unix_ms,
        seen_unix_ms: seen,
        played_today_s: played_ms / 1000,
        gone: now_unix_ms.saturating_sub(heard) > GONE_AFTER.as_millis() as u64,
    }))
}

/// Longest `played_ms` one usage entry may claim: a day.
const MAX_PLAYED_MS: u64 = 86_400_000;

/// The sum of the `played_ms` fields of an XRANGE reply.
fn played_ms(addr: &str, room: &str, v: Value) -> Result<u64, MirrorError> {
    let key = usage_key(room);
    let bad = |got: String| MirrorError::bad_reply(addr, &format!("XRANGE {key}"), got);
    let entries = match v {
        Value::Array(e) => e,
        Value::ServerError(e) => {
            return Err(MirrorError::Server {
                cmd: format!("XRANGE {key}"),
                msg: super::error::clip(&e.to_string()),
            })
        }
        other => return Err(bad(describe(&other))),
    };
    let mut sum: u64 = 0;
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err(bad(format!("an entry that is {}", describe(&entry))));
        };
        let [id, fields] = <[Value; 2]>::try_from(parts)
            .map_err(|p| bad(format!("an entry of {} parts", p.len())))?;
        let id = match id {
            Value::BulkString(b) => show(&b),
            other => return Err(bad(format!("an entry id that is {}", describe(&other)))),
        };
        for (k, v) in super::record::hash_pairs(addr, "XRANGE", fields)? {
            if k != b"played_ms" {
                continue;
            }
            let ms = std::str::from_utf8(&v)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|ms| *ms <= MAX_PLAYED_MS)
                .ok_or_else(|| MirrorError::BadRecord {
                    key: key.clone(),
                    msg: format!(
                        "entry {id}: played_ms `{}` is not a number of ms up to a day",
                        show(&v)
                    ),
                })?;
            sum = sum.saturating_add(ms);
        }
    }
    Ok(sum)
}

/// The server's `TIME` reply in ms.
pub(crate) fn server_ms(v: &Value) -> Option<u64> {
    let Value::Array(a) = v else { return None };
    let num = |v: &Value| match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse::<u64>().ok(),
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    };
    match &a[..] {
        [s, us] => num(s)?.checked_mul(1000)?.checked_add(num(us)? / 1000),
        _ => None,
    }
}

/// The Unix time (ms) of the local midnight that starts the day of `now_ms`.
pub fn local_midnight_ms(now_ms: u64) -> u64 {
    let secs = (now_ms / 1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
    if !ok {
        return now_ms - now_ms % 86_400_000; // UTC midnight
    }
    let into_day = tm.tm_hour as u64 * 3600 + tm.tm_min as u64 * 60 + tm.tm_sec as u64;
    (now_ms / 1000).saturating_sub(into_day) * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn midnight_is_earlier_the_same_day() {
        for now in [
            0u64,
            1_750_000_123_456,
            1_767_225_599_999,
            4_102_444_800_000,
        ] {
            let m = local_midnight_ms(now);
            assert!(m <= now && now - m < 25 * 3_600_000, "{now} -> {m}");
            assert_eq!(m % 1000, 0);
            assert_eq!(local_midnight_ms(m), m, "{now}: midnight of midnight");
        }
    }

    #[test]
    fn time_and_usage_replies() {
        assert_eq!(
            server_ms(&Value::Array(vec![bulk("1750000000"), bulk("123456")])),
            Some(1_750_000_000_123)
        );
        assert_eq!(server_ms(&Value::Array(vec![bulk("x"), bulk("1")])), None);
        assert_eq!(server_ms(&Value::Int(3)), None);
        let entry = |id: &str, kv: &[&str]| {
            Value::Array(vec![
                bulk(id),
                Value::Array(kv.iter().map(|s| bulk(s)).collect()),
            ])
        };
        let usage = Value::Array(vec![
            entry("1-0", &["event", "played", "played_ms", "1500"]),
            entry("2-0", &["event", "leader"]),
            entry("3-0", &["played_ms", "2500", "event", "played"]),
        ]);
        assert_eq!(played_ms("h:1", "r", usage).unwrap(), 4000);
        let e = played_ms(
            "h:1",
            "r",
            Value::Array(vec![entry("9-1", &["played_ms", "-5"])]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("entry 9-1: played_ms `-5`"), "{e}");
        let e = played_ms(
            "h:1",
            "r",
            Value::Array(vec![Value::Array(vec![bulk("1-0")])]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("1 parts"), "{e}");
        assert!(played_ms("h:1", "r", Value::Okay)
            .unwrap_err()
            .is_bad_reply());
    }
}
