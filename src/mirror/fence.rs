//! The epoch-fenced writes, as server-side Lua scripts run with `redis::Script`
//! (EVALSHA, and EVAL again when the server's script cache was flushed):
//!
//! * [`write_fenced_outcome`] — the room's record ([`FENCE_SCRIPT`]).
//! * [`append_usage`] — one entry of the room's usage stream ([`USAGE_SCRIPT`]).
//!
//! Epochs and versions travel as decimal strings and the scripts compare them as such,
//! exactly for all of u64 (Lua numbers are doubles).

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::Value;

use super::conn::Conn;
use super::error::{describe, show, MirrorError};
use super::record::{check_room, clip, room_channel, room_key, usage_key, MirrorRecord, ROOMS_KEY};

/// The scripts' helpers: `canon(s)`, a canonical decimal u64; `cmp(a, b)` of two.
macro_rules! lua_decimals {
    () => {
        r#"local function canon(s)
  return type(s) == 'string' and #s <= 20 and (s == '0' or string.match(s, '^[1-9]%d*$') ~= nil)
end
local function cmp(a, b)
  if #a ~= #b then
    if #a < #b then return -1 else return 1 end
  end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      if x < y then return -1 else return 1 end
    end
  end
  return 0
end
"#
    };
}

/// The server-side fencing write of a room's record.
///
/// `KEYS[1]` = `bandsync:room:<room>`, `KEYS[2]` = `bandsync:rooms`; `ARGV[1]` epoch,
/// `ARGV[2]` version (decimal), `ARGV[3]` the channel, `ARGV[4]` the JSON record,
/// `ARGV[5]` the room name, `ARGV[6..]` field/value pairs.
///
/// Returns `{0, epoch, version}` (refused: the stored `(epoch, version)` is newer; the
/// stored pair is returned), 1 (written: the hash is replaced by the record and the
/// JSON published) or 2 (the hash already holds exactly this record: nothing written,
/// nothing published). Unless refused, it also adds the room to `bandsync:rooms` and
/// stamps the hash's `seen_unix_ms` with the server's clock (the leader's heartbeat,
/// not part of the record). A stored hash whose epoch or version is not a decimal
/// integer is overwritten. Needs Redis ≥ 5 (TIME before a write in a script).
pub const FENCE_SCRIPT: &str = concat!(
    "-- bandsync: epoch-fenced write of one room record (v2)\n",
    lua_decimals!(),
    r#"local e, v = ARGV[1], ARGV[2]
if not canon(e) or not canon(v) or #ARGV < 7 or (#ARGV - 5) % 2 ~= 0 then
  return redis.error_reply('ERR bandsync fence: bad arguments')
end
local cur = redis.call('HMGET', KEYS[1], 'epoch', 'version')
if canon(cur[1]) and canon(cur[2]) then
  local c = cmp(e, cur[1])
  if c < 0 or (c == 0 and cmp(v, cur[2]) < 0) then
    return {0, cur[1], cur[2]}
  end
end
local t = redis.call('TIME')
local seen = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
redis.call('SADD', KEYS[2], ARGV[5])
local n = redis.call('HLEN', KEYS[1])
if redis.call('HEXISTS', KEYS[1], 'seen_unix_ms') == 1 then n = n - 1 end
if n == (#ARGV - 5) / 2 then
  local same = true
  for i = 6, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
      same = false
      break
    end
  end
  if same then
    redis.call('HSET', KEYS[1], 'seen_unix_ms', seen)
    return 2
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'seen_unix_ms', seen, unpack(ARGV, 6))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#
);

/// The server-side fenced append to a room's usage stream.
///
/// `KEYS[1]` = `bandsync:room:<room>`, `KEYS[2]` = `bandsync:room:<room>:usage`;
/// `ARGV[1]` the writer's epoch, `ARGV[2]` the approximate MAXLEN, `ARGV[3..]`
/// field/value pairs. Appends (`XADD … MAXLEN ~ n *`) and returns the entry id unless
/// the room's hash holds a newer epoch: then returns `{0, epoch}` and appends nothing.
pub const USAGE_SCRIPT: &str = concat!(
    "-- bandsync: epoch-fenced append to a room's usage stream (v1)\n",
    lua_decimals!(),
    r#"if not canon(ARGV[1]) or not canon(ARGV[2]) or #ARGV < 4 or #ARGV % 2 ~= 0 then
  return redis.error_reply('ERR bandsync usage: bad arguments')
end
local cur = redis.call('HGET', KEYS[1], 'epoch')
if canon(cur) and cmp(ARGV[1], cur) < 0 then
  return {0, cur}
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"#
);

static FENCE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FENCE_SCRIPT));
static USAGE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(USAGE_SCRIPT));

/// What a fenced write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WriteOutcome {
    /// The hash now holds the record and the change was published.
    Written,
    /// The hash already held exactly this record (a refresh): nothing published.
    Unchanged,
    /// Refused: Redis holds a record of a newer epoch (this node was deposed). A node
    /// that leads again must take an epoch above `held_epoch`.
    RefusedNewerEpoch { held_epoch: u64 },
    /// Refused: Redis holds the same epoch at a newer version.
    RefusedNewerVersion { held_version: u64 },
}

impl WriteOutcome {
    /// The write was refused by the fence.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            WriteOutcome::RefusedNewerEpoch { .. } | WriteOutcome::RefusedNewerVersion { .. }
        )
    }

    /// The newer epoch Redis holds, when that is why the write was refused.
    pub fn held_epoch(&self) -> Option<u64> {
        match self {
            WriteOutcome::RefusedNewerEpoch { held_epoch } => Some(*held_epoch),
            _ => None,
        }
    }
}

/// The fencing write: Ok(true) written (or already current), Ok(false) refused
/// (older epoch, or same epoch and older version).
pub async fn write_fenced<C: ConnectionLike>(
    conn: &mut Conn<C>,
    room: &str,
    rec: &MirrorRecord,
) -> Result<bool, MirrorError> {
    Ok(!write_fenced_outcome(conn, room, rec).await?.is_refused())
}

/// [`write_fenced`] with the detailed outcome. The record is validated first (an
/// invalid one is [`MirrorError::InvalidRecord`] and nothing is sent).
pub async fn write_fenced_outcome<C: ConnectionLike>(
    conn: &mut Conn<C>,
    room: &str,
    rec: &MirrorRecord,
) -> Result<WriteOutcome, MirrorError> {
    check_room(room).map_err(MirrorError::InvalidRecord)?;
    if rec.room != room {
        return Err(MirrorError::InvalidRecord(format!(
            "record for room {:?} written to room {:?}",
            clip(&rec.room),
            clip(room)
        )));
    }
    rec.validate().map_err(MirrorError::InvalidRecord)?;
    let json = serde_json::to_string(rec).map_err(|e| MirrorError::InvalidRecord(e.to_string()))?;
    let mut inv = FENCE.key(room_key(room));
    inv.key(ROOMS_KEY)
        .arg(rec.epoch.to_string())
        .arg(rec.version.to_string())
        .arg(room_channel(room))
        .arg(json)
        .arg(room);
    for (k, v) in rec.fields() {
        inv.arg(k).arg(v);
    }
    const WHAT: &str = "EVALSHA (fence)";
    let reply = conn
        .run(WHAT, async |c| inv.invoke_async::<Value>(c).await)
        .await?;
    let bad = |got: String| MirrorError::bad_reply(conn.addr(), WHAT, got);
    match reply {
        Value::Int(1) => Ok(WriteOutcome::Written),
        Value::Int(2) => Ok(WriteOutcome::Unchanged),
        Value::Array(a) => match &a[..] {
            [Value::Int(0), e, v] => {
                let held_epoch =
                    decimal(e).ok_or_else(|| bad(format!("held epoch {}", describe(e))))?;
                let held_version =
                    decimal(v).ok_or_else(|| bad(format!("held version {}", describe(v))))?;
                if held_epoch > rec.epoch {
                    Ok(WriteOutcome::RefusedNewerEpoch { held_epoch })
                } else if held_epoch == rec.epoch && held_version > rec.version {
                    Ok(WriteOutcome::RefusedNewerVersion { held_version })
                } else {
                    Err(bad(format!(
                        "a refusal for epoch {held_epoch} version {held_version}, which is not newer"
                    )))
                }
            }
            _ => Err(bad(format!("array of {}", a.len()))),
        },
        v => Err(bad(describe(&v))),
    }
}

/// A decimal u64 sent as a bulk string.
fn decimal(v: &Value) -> Option<u64> {
    match v {
        Value::BulkString(b) if !b.is_empty() && b.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(b).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// Entries a room's usage stream keeps (approximately: `XADD … MAXLEN ~`).
pub const USAGE_MAXLEN: u64 = 10_000;
/// Most fields one usage entry may carry (besides `epoch` and `t_unix_ms`).
pub const USAGE_MAX_FIELDS: usize = 32;
/// Longest usage field value, in bytes.
pub const USAGE_MAX_VALUE: usize = 1024;

/// What [`append_usage`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageOutcome {
    /// Appended under this stream id.
    Appended { id: String },
    /// Refused: the room's hash holds a newer epoch (this node was deposed).
    RefusedNewerEpoch { held_epoch: u64 },
}

/// Append one entry to the room's usage stream `bandsync:room:<room>:usage`, fenced by
/// epoch (only while the room's hash holds `epoch` or older, or no hash at all) and
/// bounded (`MAXLEN ~` [`USAGE_MAXLEN`]).
///
/// `fields` must hold `event` (what happened: e.g. `played`, `leader`, `song`); the
/// entry also gets `epoch` and, unless given, `t_unix_ms` (now). Field names are
/// 1–64 of `[a-z0-9_]`, values at most [`USAGE_MAX_VALUE`] bytes of printable text.
/// [`super::venue`] sums the `played_ms` fields of today's entries.
pub async fn append_usage<C: ConnectionLike>(
    conn: &mut Conn<C>,
    room: &str,
    epoch: u64,
    fields: &[(&str, &str)],
) -> Result<UsageOutcome, MirrorError> {
    let bad = |m: String| MirrorError::InvalidUsage(m);
    check_room(room).map_err(bad)?;
    if fields.is_empty() || fields.len() > USAGE_MAX_FIELDS {
        return Err(bad(format!(
            "{} fields: give 1–{USAGE_MAX_FIELDS}",
            fields.len()
        )));
    }
    for (i, (k, v)) in fields.iter().enumerate() {
        if k.is_empty()
            || k.len() > 64
            || !k
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(bad(format!(
                "field name `{}` is invalid: use 1–64 of a-z, 0-9, _",
                show(k.as_bytes())
            )));
        }
        if *k == "epoch" {
            return Err(bad("field `epoch` is set by append_usage itself".into()));
        }
        if fields[..i].iter().any(|(p, _)| p == k) {
            return Err(bad(format!("field `{k}` is given twice")));
        }
        if v.len() > USAGE_MAX_VALUE || v.chars().any(|c| c.is_control()) {
            return Err(bad(format!(
                "field `{k}`: value `{}` is invalid: at most {USAGE_MAX_VALUE} bytes of printable text",
                show(v.as_bytes())
            )));
        }
    }
    if !fields.iter().any(|(k, _)| *k == "event") {
        return Err(bad("the entry has no `event` field".into()));
    }
    let mut inv = USAGE.key(room_key(room));
    inv.key(usage_key(room))
        .arg(epoch.to_string())
        .arg(USAGE_MAXLEN.to_string());
    for (k, v) in fields {
        inv.arg(*k).arg(*v);
    }
    inv.arg("epoch").arg(epoch.to_string());
    if !fields.iter().any(|(k, _)| *k == "t_unix_ms") {
        inv.arg("t_unix_ms").arg(super::now_unix_ms().to_string());
    }
    const WHAT: &str = "EVALSHA (usage)";
    let reply = conn
        .run(WHAT, async |c| inv.invoke_async::<Value>(c).await)
        .await?;
    let bad_reply = |got: String| MirrorError::bad_reply(conn.addr(), WHAT, got);
    match reply {
        Value::BulkString(id)
            if !id.is_empty()
                && id.len() <= 48
                && id.iter().all(|b| b.is_ascii_digit() || *b == b'-') =>
        {
            Ok(UsageOutcome::Appended {
                id: String::from_utf8_lossy(&id).into_owned(),
            })
        }
        Value::Array(a) => match &a[..] {
            [Value::Int(0), e] => match decimal(e) {
                Some(held_epoch) if held_epoch > epoch => {
                    Ok(UsageOutcome::RefusedNewerEpoch { held_epoch })
                }
                _ => Err(bad_reply(format!("a refusal with {}", describe(e)))),
            },
            _ => Err(bad_reply(format!("array of {}", a.len()))),
        },
        v => Err(bad_reply(describe(&v))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{FIELDS, SEEN_FIELD};
    use super::*;

    #[test]
    fn scripts_name_the_heartbeat_field() {
        assert!(FENCE_SCRIPT.contains(&format!("'{SEEN_FIELD}'")));
        assert!(!FIELDS.contains(&SEEN_FIELD));
    }

    #[test]
    fn outcomes() {
        assert!(WriteOutcome::RefusedNewerEpoch { held_epoch: 3 }.is_refused());
        assert_eq!(
            WriteOutcome::RefusedNewerEpoch { held_epoch: 3 }.held_epoch(),
            Some(3)
        );
        assert!(!WriteOutcome::Unchanged.is_refused());
        assert_eq!(
            WriteOutcome::RefusedNewerVersion { held_version: 9 }.held_epoch(),
            None
        );
        assert_eq!(
            decimal(&Value::BulkString(b"18446744073709551615".to_vec())),
            Some(u64::MAX)
        );
        assert_eq!(
            decimal(&Value::BulkString(b"18446744073709551616".to_vec())),
            None
        );
        assert_eq!(decimal(&Value::BulkString(b"-1".to_vec())), None);
        assert_eq!(decimal(&Value::Int(3)), None);
    }
}
