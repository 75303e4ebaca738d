//! The phones' message protocol: error codes, the fields each message may carry, and
//! total validation of every field (a bad message gets an `error` naming the field).

use serde_json::{Map, Value};

/// Largest safe integer of a JSON/JS number.
pub(super) const MAX_SAFE: f64 = 9_007_199_254_740_991.0;

/// What an `error` says went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    BadMessage,
    UnknownType,
    UnknownField,
    BadField,
    TooLarge,
    PinRequired,
    BadPin,
    NotSupported,
    Busy,
    Refused,
    LockedOut,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadJson,
        ErrorCode::BadMessage,
        ErrorCode::UnknownType,
        ErrorCode::UnknownField,
        ErrorCode::BadField,
        ErrorCode::TooLarge,
        ErrorCode::PinRequired,
        ErrorCode::BadPin,
        ErrorCode::NotSupported,
        ErrorCode::Busy,
        ErrorCode::Refused,
        ErrorCode::LockedOut,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::BadField => "bad_field",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::PinRequired => "pin_required",
            ErrorCode::BadPin => "bad_pin",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::Busy => "busy",
            ErrorCode::Refused => "refused",
            ErrorCode::LockedOut => "locked_out",
        }
    }
}

/// A message-level failure: an `error` to send.
#[derive(Debug)]
pub(super) struct Bad {
    pub(super) code: ErrorCode,
    pub(super) field: Option<String>,
    pub(super) reason: String,
    /// Seconds to wait before trying again (`locked_out`).
    pub(super) retry_after_s: Option<u64>,
}

pub(super) fn bad(code: ErrorCode, field: Option<&str>, reason: impl Into<String>) -> Bad {
    Bad {
        code,
        field: field.map(str::to_string),
        reason: reason.into(),
        retry_after_s: None,
    }
}

pub(super) fn bad_field(field: &str, reason: impl Into<String>) -> Bad {
    bad(ErrorCode::BadField, Some(field), reason)
}

/// The fields (besides `type` and `id`) each message type may carry; `None`: unknown type.
pub(super) fn fields_of(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "join_session" => &["name", "last_seq"],
        "ping" => &["t0"],
        "sync_request" => &["t0"],
        "set_tempo" => &["bpm", "pin", "quantum"],
        "set_meter" => &["meter", "pin", "quantum"],
        "play" | "pause" => &["pin", "quantum"],
        "seek" => &["beat", "pin"],
        "heartbeat" => &[],
        "set_song" => &["index", "pin"],
        "post_message" => &["text", "pin"],
        "update_message" => &["seq", "text", "pin"],
        "delete_message" => &["seq", "pin"],
        "ack_message" => &["seq"],
        _ => return None,
    })
}

pub(super) fn check_id(obj: &Map<String, Value>) -> Result<Option<Value>, Bad> {
    match obj.get("id") {
        None => Ok(None),
        Some(Value::Number(n)) if n.as_i64().is_some_and(|x| (x as f64).abs() <= MAX_SAFE) => {
            Ok(Some(Value::Number(n.clone())))
        }
        Some(Value::String(s)) if s.chars().count() <= 64 && !s.chars().any(char::is_control) => {
            Ok(Some(Value::String(s.clone())))
        }
        Some(_) => Err(bad_field(
            "id",
            "id must be an integer or a string of at most 64 printable characters",
        )),
    }
}

pub(super) fn check_text(field: &str, v: &Value, max: usize) -> Result<(), Bad> {
    match v {
        Value::String(s) if s.chars().count() <= max && !s.chars().any(char::is_control) => Ok(()),
        _ => Err(bad_field(
            field,
            format!("{field} must be a string of at most {max} printable characters"),
        )),
    }
}

/// A finite JSON number within ±2⁵³.
pub(super) fn number(field: &str, v: Option<&Value>, required: bool) -> Result<Option<f64>, Bad> {
    match v {
        None if required => Err(bad_field(field, format!("missing {field}"))),
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() && x.abs() <= MAX_SAFE => Ok(Some(x)),
            _ => Err(bad_field(field, format!("{field} is out of range"))),
        },
        Some(_) => Err(bad_field(field, format!("{field} must be a number"))),
    }
}

/// A whole JSON number within ±2⁵³ (`4` and `4.0` both do).
pub(super) fn integer(field: &str, v: Option<&Value>) -> Result<i64, Bad> {
    let x = number(field, v, true)?.unwrap_or(0.0);
    if x.fract() != 0.0 {
        return Err(bad_field(
            field,
            format!("{field} must be a whole number (got {x})"),
        ));
    }
    Ok(x as i64)
}

/// Constant-time comparison (the PIN).
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut d = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for (i, x) in a.iter().enumerate() {
        d |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    d == 0 && a.len() == b.len()
}
