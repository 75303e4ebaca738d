//! [`MirrorRecord`]: the room state the leader mirrors, its hash encoding, and the total
//! validation of what Redis hands back ([`record_from_hash`]).

use std::collections::HashMap;

use redis::Value;

use super::error::{describe, show, MirrorError};

/// The record the leader mirrors: one per room.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MirrorRecord {
    pub room: String,
    pub epoch: u64,
    pub version: u64,
    pub leader: String,
    pub tempo_mbpm: u32,
    pub meter: u8,
    pub playing: bool,
    pub pinned: Option<String>,
    /// The current song's title (a setlist's song chosen), if any.
    #[serde(default)]
    pub song: Option<String>,
    /// Boxes in the room as the leader sees it (itself included); 0 = unknown (a hash
    /// written before the field existed).
    #[serde(default)]
    pub boxes: u32,
    /// When the leader produced this state (its wall clock).
    pub updated_unix_ms: u64,
}

/// The names of the record's hash fields, in the order they are written.
pub const FIELDS: [&str; 11] = [
    "room",
    "epoch",
    "version",
    "leader",
    "tempo_mbpm",
    "meter",
    "playing",
    "pinned",
    "song",
    "boxes",
    "updated_unix_ms",
];

/// The hash field the fence script stamps with Redis's own clock (ms) on every
/// accepted write or refresh: the leader's heartbeat, for [`super::venue`].
pub const SEEN_FIELD: &str = "seen_unix_ms";

/// Most boxes a record may claim.
pub const MAX_BOXES: u32 = 1024;

impl MirrorRecord {
    /// The hash fields, as strings. `pinned` and `song` are omitted when `None`.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("room", self.room.clone()),
            ("epoch", self.epoch.to_string()),
            ("version", self.version.to_string()),
            ("leader", self.leader.clone()),
            ("tempo_mbpm", self.tempo_mbpm.to_string()),
            ("meter", self.meter.to_string()),
            ("playing", self.playing.to_string()),
        ];
        if let Some(p) = &self.pinned {
            f.push(("pinned", p.clone()));
        }
        if let Some(s) = &self.song {
            f.push(("song", s.clone()));
        }
        f.push(("boxes", self.boxes.to_string()));
        f.push(("updated_unix_ms", self.updated_unix_ms.to_string()));
        f
    }

    /// Check that the record is one bandsync can write and read back.
    pub fn validate(&self) -> Result<(), String> {
        check_room(&self.room)?;
        if !(crate::core::timeline::Tempo::MIN_MBPM..=crate::core::timeline::Tempo::MAX_MBPM)
            .contains(&self.tempo_mbpm)
        {
            return Err(format!(
                "tempo_mbpm {} is outside {}..={}",
                self.tempo_mbpm,
                crate::core::timeline::Tempo::MIN_MBPM,
                crate::core::timeline::Tempo::MAX_MBPM
            ));
        }
        if !(1..=16).contains(&self.meter) {
            return Err(format!("meter {} is outside 1..=16", self.meter));
        }
        if self.boxes > MAX_BOXES {
            return Err(format!("boxes {} is over {MAX_BOXES}", self.boxes));
        }
        check_text("leader", &self.leader)?;
        if let Some(p) = &self.pinned {
            check_text("pinned", p)?;
        }
        if let Some(s) = &self.song {
            check_text("song", s)?;
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch (for `updated_unix_ms`).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The hash key of a room.
pub fn room_key(room: &str) -> String {
    format!("bandsync:room:{room}")
}

/// The channel a room's changes are published on.
pub fn room_channel(room: &str) -> String {
    format!("bandsync:room:{room}:changes")
}

/// The stream of a room's usage entries (SPEC §4 "Venue").
pub fn usage_key(room: &str) -> String {
    format!("bandsync:room:{room}:usage")
}

/// The set of every room name that has a leader mirroring it.
pub const ROOMS_KEY: &str = "bandsync:rooms";

/// A room name bandsync writes to Redis: 1–255 printable characters.
pub fn check_room(room: &str) -> Result<(), String> {
    if room.is_empty() || room.len() > 255 || room.chars().any(|c| c.is_control()) {
        return Err(format!(
            "room name {:?} is invalid: use 1–255 printable characters",
            clip(room)
        ));
    }
    Ok(())
}

pub(crate) fn check_text(what: &str, v: &str) -> Result<(), String> {
    if v.len() > 255 || v.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{what} {:?} is invalid: at most 255 printable characters",
            clip(v)
        ));
    }
    Ok(())
}

pub(crate) fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Field/value pairs, as bytes.
pub(crate) type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The field/value pairs of a hash reply: RESP2's flat array or RESP3's map. Every
/// name and value must be a string; `cmd` names the command for errors.
pub(crate) fn hash_pairs(addr: &str, cmd: &str, v: Value) -> Result<Pairs, MirrorError> {
    let bad = |got: String| MirrorError::bad_reply(addr, cmd, got);
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(bad(format!(
            "a field or value that is {}",
            describe(&other)
        ))),
    };
    match v {
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(bad(format!("an odd array of {}", items.len())));
            }
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((bytes(k)?, bytes(v)?));
            }
            Ok(out)
        }
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
            .collect(),
        other => Err(bad(describe(&other))),
    }
}

/// A decimal u64/u32/u8 field, or an error naming the field and its value.
fn num<T: std::str::FromStr>(f: &str, s: &str) -> Result<T, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "field `{f}`: `{}` is not a decimal number",
            show(s.as_bytes())
        ));
    }
    s.parse()
        .map_err(|_| format!("field `{f}`: `{}` is out of range", show(s.as_bytes())))
}

/// Turn an HGETALL reply into a record: `None` for an empty hash. Total: any reply
/// gives a record or a named error ([`MirrorError::BadReply`] for a reply of the wrong
/// shape, [`MirrorError::BadRecord`] for a hash with a missing or bad field), never a
/// panic. Fields bandsync does not know are ignored (a newer version's).
pub fn record_from_hash(room: &str, v: Value) -> Result<Option<MirrorRecord>, MirrorError> {
    Ok(hash_record(room, "", v)?.map(|(rec, _)| rec))
}

/// [`record_from_hash`] plus the heartbeat field ([`SEEN_FIELD`]) when present.
pub(crate) fn hash_record(
    room: &str,
    addr: &str,
    v: Value,
) -> Result<Option<(MirrorRecord, Option<u64>)>, MirrorError> {
    let key = room_key(room);
    let bad = |msg: String| MirrorError::BadRecord {
        key: key.clone(),
        msg,
    };
    let pairs = hash_pairs(addr, "HGETALL", v)?;
    if pairs.is_empty() {
        return Ok(None);
    }
    let mut map: HashMap<&'static str, String> = HashMap::new();
    let mut seen = None;
    for (k, v) in pairs {
        let known = FIELDS
            .iter()
            .chain([&SEEN_FIELD])
            .find(|f| f.as_bytes() == k);
        let Some(&k) = known else {
            continue; // a field from a newer version: ignored
        };
        let v = String::from_utf8(v).map_err(|e| {
            bad(format!(
                "field `{k}`: `{}` is not UTF-8",
                show(e.as_bytes())
            ))
        })?;
        if k == SEEN_FIELD {
            seen = Some(num::<u64>(k, &v).map_err(bad)?);
        } else {
            map.insert(k, v);
        }
    }
    let get = |f: &str| {
        map.get(f)
            .ok_or_else(|| bad(format!("field `{f}` is missing")))
    };
    let rec = MirrorRecord {
        room: get("room")?.clone(),
        epoch: num("epoch", get("epoch")?).map_err(bad)?,
        version: num("version", get("version")?).map_err(bad)?,
        leader: get("leader")?.clone(),
        tempo_mbpm: num("tempo_mbpm", get("tempo_mbpm")?).map_err(bad)?,
        meter: num("meter", get("meter")?).map_err(bad)?,
        playing: match get("playing")?.as_str() {
            "true" => true,
            "false" => false,
            o => {
                return Err(bad(format!(
                    "field `playing`: `{}` is not true or false",
                    show(o.as_bytes())
                )))
            }
        },
        pinned: map.get("pinned").cloned(),
        song: map.get("song").cloned(),
        boxes: match map.get("boxes") {
            Some(b) => num("boxes", b).map_err(bad)?,
            None => 0,
        },
        updated_unix_ms: num("updated_unix_ms", get("updated_unix_ms")?).map_err(bad)?,
    };
    if rec.room != room {
        return Err(bad(format!(
            "field `room` is {:?}, expected {:?}",
            clip(&rec.room),
            clip(room)
        )));
    }
    rec.validate().map_err(bad)?;
    Ok(Some((rec, seen)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec() -> MirrorRecord {
        MirrorRecord {
            room: "r".into(),
            epoch: u64::MAX,
            version: 7,
            leader: "abcd".into(),
            tempo_mbpm: 137_000,
            meter: 7,
            playing: true,
            pinned: None,
            song: None,
            boxes: 3,
            updated_unix_ms: 1,
        }
    }

    fn hash(r: &MirrorRecord) -> Value {
        Value::Array(
            r.fields()
                .into_iter()
                .flat_map(|(k, v)| {
                    [
                        Value::BulkString(k.as_bytes().to_vec()),
                        Value::BulkString(v.into_bytes()),
                    ]
                })
                .collect(),
        )
    }

    #[test]
    fn hash_round_trip_and_validation() {
        let rec = rec();
        assert_eq!(
            record_from_hash("r", hash(&rec)).unwrap(),
            Some(rec.clone())
        );
        let pinned = MirrorRecord {
            pinned: Some("abcd".into()),
            ..rec.clone()
        };
        assert_eq!(record_from_hash("r", hash(&pinned)).unwrap(), Some(pinned));
        // RESP3 maps too.
        let Value::Array(flat) = hash(&rec) else {
            unreachable!()
        };
        let map = Value::Map(
            flat.chunks(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect(),
        );
        assert_eq!(record_from_hash("r", map).unwrap(), Some(rec.clone()));
        assert_eq!(record_from_hash("r", Value::Array(vec![])).unwrap(), None);
        assert!(record_from_hash("other", hash(&rec)).is_err());
        for bad in [
            MirrorRecord {
                tempo_mbpm: 5,
                ..rec.clone()
            },
            MirrorRecord {
                meter: 0,
                ..rec.clone()
            },
            MirrorRecord {
                boxes: MAX_BOXES + 1,
                ..rec.clone()
            },
            MirrorRecord {
                leader: "a\nb".into(),
                ..rec.clone()
            },
        ] {
            let e = record_from_hash("r", hash(&bad)).unwrap_err();
            assert!(matches!(e, MirrorError::BadRecord { .. }), "{e}");
        }
        // Replies of the wrong shape are bad replies, named.
        let e = record_from_hash("r", Value::Int(3)).unwrap_err();
        assert!(
            e.is_bad_reply() && e.to_string().contains("integer 3"),
            "{e}"
        );
        let e = record_from_hash(
            "r",
            Value::Array(vec![Value::BulkString(b"epoch".to_vec())]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("odd array of 1"), "{e}");
        let e = record_from_hash("r", Value::Array(vec![Value::Int(1), Value::Nil])).unwrap_err();
        assert!(e.to_string().contains("integer 1"), "{e}");

        let Value::Array(mut items) = hash(&rec) else {
            unreachable!()
        };
        items[3] = Value::BulkString(b"-1".to_vec()); // epoch's value
        let e = record_from_hash("r", Value::Array(items.clone())).unwrap_err();
        assert!(e.to_string().contains("field `epoch`: `-1`"), "{e}");
        items[3] = Value::BulkString(b"18446744073709551616".to_vec());
        let e = record_from_hash("r", Value::Array(items.clone())).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        items[3] = Value::BulkString(vec![0xff, 0xfe]);
        let e = record_from_hash("r", Value::Array(items.clone())).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        items.truncate(2);
        let e = record_from_hash("r", Value::Array(items)).unwrap_err();
        assert!(e.to_string().contains("field `epoch` is missing"), "{e}");
    }

    #[test]
    fn old_hashes_without_boxes_and_the_heartbeat() {
        let rec = rec();
        let Value::Array(mut items) = hash(&rec) else {
            unreachable!()
        };
        let i = items
            .iter()
            .position(|v| *v == Value::BulkString(b"boxes".to_vec()))
            .unwrap();
        items.drain(i..i + 2);
        items.push(Value::BulkString(b"future_field".to_vec()));
        items.push(Value::BulkString(b"whatever".to_vec()));
        items.push(Value::BulkString(SEEN_FIELD.as_bytes().to_vec()));
        items.push(Value::BulkString(b"1750000000000".to_vec()));
        let (got, seen) = hash_record("r", "", Value::Array(items)).unwrap().unwrap();
        assert_eq!(got, MirrorRecord { boxes: 0, ..rec });
        assert_eq!(seen, Some(1_750_000_000_000));
    }

    fn value_strategy() -> impl Strategy<Value = Value> {
        let field = prop_oneof![
            proptest::sample::select(FIELDS.to_vec()).prop_map(|f| f.as_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ];
        let leaf = prop_oneof![
            field.prop_map(Value::BulkString),
            "[0-9a-z]{0,8}".prop_map(|s| Value::BulkString(s.into_bytes())),
            any::<i64>().prop_map(Value::Int),
            Just(Value::Nil),
            Just(Value::Okay),
            "[a-zA-Z ]{0,10}".prop_map(Value::SimpleString),
        ];
        leaf.prop_recursive(3, 48, 24, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..24).prop_map(Value::Array),
                proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn any_reply_gives_a_record_or_an_error(v in value_strategy()) {
            if let Ok(Some(r)) = record_from_hash("r", v) {
                prop_assert!(r.validate().is_ok());
            }
        }
    }
}
