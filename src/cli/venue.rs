//! `bandsync venue` and `bandsync usage`: the venue's rooms from Redis, and the room's
//! playing periods from this box's own log.

use std::path::Path;
use std::time::Duration;

/// `bandsync venue --redis URL [--json]`: every room of that Redis.
pub fn venue(url: &str, json: bool, timeout: Duration) -> anyhow::Result<String> {
    let url = crate::mirror::RedisUrl::parse(url).map_err(|e| anyhow::anyhow!("--redis: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt
        .block_on(crate::mirror::venue(&url, timeout))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if json {
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    Ok(format_venue(&v))
}

/// The venue as a table, one room a line.
pub fn format_venue(v: &crate::mirror::Venue) -> String {
    let mut s = format!(
        "{:<24} {:<8} {:>7} {:>5} {:>5}  {:<16} {:<20} {:>10}  {}\n",
        "room", "state", "tempo", "meter", "boxes", "leader", "song", "today", "updated"
    );
    for r in &v.rooms {
        let state = if r.gone {
            "gone"
        } else if r.playing {
            "playing"
        } else {
            "stopped"
        };
        s.push_str(&format!(
            "{:<24} {:<8} {:>7.1} {:>5} {:>5}  {:<16} {:<20} {:>9}m  {}\n",
            clip(&r.room, 24),
            state,
            r.tempo,
            r.meter,
            r.boxes,
            clip(&r.leader, 16),
            clip(r.song.as_deref().unwrap_or("-"), 20),
            r.played_today_s / 60,
            crate::node::usage::local_time(r.updated_unix_ms)
        ));
    }
    for i in &v.invalid {
        s.push_str(&format!(
            "unreadable room {}: {}\n",
            clip(&i.room, 64),
            i.error
        ));
    }
    let playing = v.rooms.iter().filter(|r| r.playing && !r.gone).count();
    s.push_str(&format!(
        "{} room(s), {playing} playing, {} gone\n",
        v.rooms.len(),
        v.rooms.iter().filter(|r| r.gone).count()
    ));
    s
}

/// Printable, at most `n` characters.
fn clip(s: &str, n: usize) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(n)
        .collect()
}

/// How `bandsync usage` prints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum UsageFormat {
    Table,
    Json,
    Csv,
}

/// `bandsync usage [--since YYYY-MM-DD]`: the periods in `dir`'s log.
pub fn usage(dir: &Path, since: Option<&str>, format: UsageFormat) -> anyhow::Result<String> {
    let since_ms = since
        .map(crate::node::usage::local_date_ms)
        .transpose()?
        .unwrap_or(0);
    let periods = crate::node::usage::read_periods(dir, since_ms)
        .map_err(|e| anyhow::anyhow!("cannot read the usage log in {}: {e}", dir.display()))?;
    Ok(match format {
        UsageFormat::Table => crate::node::usage::format_table(&periods),
        UsageFormat::Csv => crate::node::usage::format_csv(&periods),
        UsageFormat::Json => serde_json::to_string_pretty(&periods)? + "\n",
    })
}
