//! Setlists and cues: the room's song list (a last-writer-wins record, see
//! `room.rs`) and its cue board, a replicated log with one order.
//!
//! # Cues: identity, order, merge
//!
//! * **Identity.** A cue is the decision stamp of its posting, `id = (ms, n, node)`
//!   ([`Stamp`]): unique in the room (a box's hybrid logical clock never issues the same
//!   stamp twice, and the node is part of it). Everything else is merged per field.
//! * **Order (`seq`).** Only a leader numbers cues. A box where a cue is posted keeps it
//!   *unnumbered* (`seq` 0) and sends it to every peer; whichever box leads gives every
//!   unnumbered cue it holds `seq = max seq it holds + 1`, in the order of their ids, and
//!   stamps that numbering (`numbered`, a decision stamp of the leader). A follower whose
//!   leader vanished keeps its unnumbered cues and hands them on in every sync, so the
//!   next leader numbers them: none is lost.
//! * **Merge (union).** Cues from two groups (a healed partition, a box that was away)
//!   are merged by id, field by field: `seq` from the later `numbered` stamp, text and
//!   `deleted` from the later `edited` stamp, `seen` (phones' acks per box, a grow-only
//!   counter) by per-box maximum. So every box converges on the same cue set whatever
//!   order frames arrive in.
//! * **Collisions.** Two leaders of a partition both number from the same max, so after
//!   a heal two cues may share a seq. The rule, applied by the leader (alone in its
//!   group: not while another leader of its session is alive): **every** cue whose seq
//!   is shared is renumbered above the current max, in `(old seq, id)` order, with new
//!   `numbered` stamps that win everywhere. Renumbering all of them (not all but one)
//!   matters for phones: a phone of either side that had seen up to seq L gets every
//!   cue it missed by asking for `seq > L` — the other side's cues at seqs ≤ L collided
//!   with its own, so they moved above the max. Phones key cues by `id` as well, so a
//!   renumbered cue replaces its old entry rather than doubling it.
//! * **Retention.** The newest [`MAX_CUES`] numbered cues (by seq) are kept; older ones
//!   are dropped everywhere, and one at or below the dropped `floor` is not taken back
//!   from a peer. Deleted cues stay as tombstones (`deleted`) so the deletion replicates.
//!
//! # Replication (bounded frames)
//!
//! Every announce carries a [`CueSummary`] (max seq, count, digest of every cue's
//! version). A box whose digest differs from a peer's sends it its inventory
//! ([`CueLog::inventory`]: a 64-bit hash of each id and of each version, 16 bytes a cue,
//! ≤ 8 KiB for 500) at most every [`SYNC_EVERY_NS`]; the peer answers with the cues whose
//! version the inventory lacks, at most [`SYNC_BATCH_BYTES`] per frame; the next round
//! carries the rest. New cues, numberings and edits are also pushed to every peer at
//! once. The digest is FNV-1a, the same on every box.

use crate::core::decision::Stamp;
use crate::core::timeline::{Meter, Tempo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Cues kept per room.
pub const MAX_CUES: usize = 500;
/// Longest cue text, in characters.
pub const MAX_CUE_CHARS: usize = 500;
/// Longest author, in characters.
pub const MAX_AUTHOR_CHARS: usize = 64;
/// Songs per setlist.
pub const MAX_SONGS: usize = 200;
/// Longest song title, in characters.
pub const MAX_TITLE_CHARS: usize = 64;
/// Largest count-in, in bars.
pub const MAX_COUNT_IN: u8 = 4;
/// A setlist must encode to at most this many bytes (it travels in one frame).
pub const MAX_SETLIST_BYTES: usize = 14 * 1024;
/// Cues per sync answer: at most this many bytes of text (plus a bounded overhead).
pub const SYNC_BATCH_BYTES: usize = 8 * 1024;
/// A box asks a peer whose digest differs at most this often.
pub const SYNC_EVERY_NS: i64 = 300_000_000;
/// Boxes that count acks on one cue (a room has a handful).
pub const MAX_SEEN_BOXES: usize = 32;

/// One song of a setlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Song {
    pub title: String,
    pub tempo: Tempo,
    pub meter: Meter,
    #[serde(default)]
    pub count_in_bars: u8,
}

/// Why a setlist, a song choice or a cue was refused. Each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CueError {
    #[error("song {song}: {field}: {why}")]
    Song {
        song: usize,
        field: &'static str,
        why: String,
    },
    #[error("setlist: {0}")]
    Setlist(String),
    #[error("song: {0}")]
    Pick(String),
    #[error("text: {0}")]
    Text(String),
    #[error("author: {0}")]
    Author(String),
    #[error("seq: no cue {0} in this room (see `bandsync cues`)")]
    UnknownSeq(u64),
}

impl CueError {
    /// Short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CueError::Song { .. } | CueError::Setlist(_) => "setlist",
            CueError::Pick(_) => "song",
            CueError::Text(_) | CueError::Author(_) => "text",
            CueError::UnknownSeq(_) => "seq",
        }
    }
}

/// Check a song's fields (`n` is its 1-based number, for the message).
pub fn check_song(n: usize, s: &Song) -> Result<(), CueError> {
    let err = |field, why: String| CueError::Song {
        song: n,
        field,
        why,
    };
    let chars = s.title.chars().count();
    if chars == 0 || chars > MAX_TITLE_CHARS || s.title.chars().any(char::is_control) {
        return Err(err(
            "title",
            format!("must be 1–{MAX_TITLE_CHARS} printable characters (got {chars})"),
        ));
    }
    if s.count_in_bars > MAX_COUNT_IN {
        return Err(err(
            "count_in_bars",
            format!("must be 0–{MAX_COUNT_IN} (got {})", s.count_in_bars),
        ));
    }
    Ok(())
}

/// Check a whole setlist: ≤ [`MAX_SONGS`] songs, each valid, small enough for a frame.
pub fn check_setlist(songs: &[Song]) -> Result<(), CueError> {
    if songs.len() > MAX_SONGS {
        return Err(CueError::Setlist(format!(
            "{} songs; a setlist holds at most {MAX_SONGS}",
            songs.len()
        )));
    }
    for (i, s) in songs.iter().enumerate() {
        check_song(i + 1, s)?;
    }
    let bytes: usize = songs.iter().map(|s| s.title.len() + 8).sum();
    if bytes > MAX_SETLIST_BYTES {
        return Err(CueError::Setlist(format!(
            "the titles take {bytes} bytes; at most {MAX_SETLIST_BYTES} (shorten them)"
        )));
    }
    Ok(())
}

/// Check a cue's text: 1–500 printable characters (newlines and tabs allowed).
pub fn check_text(text: &str) -> Result<(), CueError> {
    let n = text.chars().count();
    if text.trim().is_empty() {
        return Err(CueError::Text("must not be empty".into()));
    }
    if n > MAX_CUE_CHARS {
        return Err(CueError::Text(format!(
            "{n} characters; at most {MAX_CUE_CHARS}"
        )));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(CueError::Text("must not hold control characters".into()));
    }
    Ok(())
}

pub fn check_author(a: &str) -> Result<(), CueError> {
    if a.chars().count() > MAX_AUTHOR_CHARS || a.chars().any(char::is_control) {
        return Err(CueError::Author(format!(
            "must be at most {MAX_AUTHOR_CHARS} printable characters"
        )));
    }
    Ok(())
}

/// Parse a setlist file: `[[song]]` tables with `title`, `tempo` (BPM, 20–400), `meter`
/// (1–16) and optional `count_in_bars` (0–4); no other key. Errors name the song (1-based)
/// and the field.
pub fn parse_setlist(text: &str) -> Result<Vec<Song>, CueError> {
    let doc: toml::Table = toml::from_str(text)
        .map_err(|e| CueError::Setlist(format!("not valid TOML: {}", e.message())))?;
    if let Some(k) = doc.keys().find(|k| *k != "song") {
        return Err(CueError::Setlist(format!(
            "unknown key {k:?} (a setlist is a list of [[song]] tables)"
        )));
    }
    let Some(list) = doc.get("song") else {
        return Err(CueError::Setlist("no [[song]] tables".into()));
    };
    let toml::Value::Array(list) = list else {
        return Err(CueError::Setlist("`song` must be [[song]] tables".into()));
    };
    if list.len() > MAX_SONGS {
        return Err(CueError::Setlist(format!(
            "{} songs; a setlist holds at most {MAX_SONGS}",
            list.len()
        )));
    }
    let mut songs = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let n = i + 1;
        let err = |field, why: String| CueError::Song {
            song: n,
            field,
            why,
        };
        let toml::Value::Table(t) = v else {
            return Err(err("song", "must be a table".into()));
        };
        const KNOWN: [&str; 4] = ["title", "tempo", "meter", "count_in_bars"];
        if let Some(k) = t.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(CueError::Song {
                song: n,
                field: "key",
                why: format!("unknown key {k:?} (known: title, tempo, meter, count_in_bars)"),
            });
        }
        let title = match t.get("title") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(_) => return Err(err("title", "must be a string".into())),
            None => return Err(err("title", "missing".into())),
        };
        let bpm = match t.get("tempo") {
            Some(toml::Value::Integer(x)) => *x as f64,
            Some(toml::Value::Float(x)) => *x,
            Some(_) => return Err(err("tempo", "must be a number (BPM)".into())),
            None => return Err(err("tempo", "missing".into())),
        };
        let tempo = Tempo::from_bpm(bpm)
            .map_err(|_| err("tempo", format!("{bpm} is out of range (20–400 BPM)")))?;
        let meter = match t.get("meter") {
            Some(toml::Value::Integer(x)) => Meter::new(*x)
                .map_err(|_| err("meter", format!("{x} is out of range (1–16 beats per bar)")))?,
            Some(_) => return Err(err("meter", "must be a whole number (1–16)".into())),
            None => return Err(err("meter", "missing".into())),
        };
        let count_in_bars = match t.get("count_in_bars") {
            None => 0,
            Some(toml::Value::Integer(x)) if (0..=MAX_COUNT_IN as i64).contains(x) => *x as u8,
            Some(x) => {
                return Err(err(
                    "count_in_bars",
                    format!("{x} is out of range (0–{MAX_COUNT_IN} bars)"),
                ))
            }
        };
        let song = Song {
            title,
            tempo,
            meter,
            count_in_bars,
        };
        check_song(n, &song)?;
        songs.push(song);
    }
    check_setlist(&songs)?;
    Ok(songs)
}

/// One cue (see the module doc for how its fields merge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cue {
    /// The posting decision: unique in the room.
    pub id: Stamp,
    /// The room's order (1, 2, …); 0 while no leader has numbered it.
    pub seq: u64,
    /// The leader's decision that gave `seq`.
    pub numbered: Stamp,
    pub text: String,
    pub author: String,
    pub posted_unix_ms: u64,
    pub edited_unix_ms: Option<u64>,
    pub deleted: bool,
    /// The decision behind `text` and `deleted` (the posting, or the latest edit).
    pub edited: Stamp,
    /// Phones that acked it, per box (node id → count).
    pub seen: BTreeMap<String, u32>,
}

impl Cue {
    /// Phones that acked it, across the room.
    pub fn seen_total(&self) -> u64 {
        self.seen.values().map(|&v| v as u64).sum()
    }
    /// What a phone and `bandsync cues --json` see.
    pub fn view(&self) -> CueView {
        CueView {
            seq: self.seq,
            id: format!("{}.{}@{}", self.id.ms, self.id.n, self.id.node),
            text: self.text.clone(),
            author: self.author.clone(),
            posted_unix_ms: self.posted_unix_ms,
            edited_unix_ms: self.edited_unix_ms,
            deleted: self.deleted,
            seen: self.seen_total(),
        }
    }
    fn approx_bytes(&self) -> usize {
        self.text.len() + self.author.len() + 120 + self.seen.len() * 24
    }
}

/// A cue as shown outside the room (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CueView {
    pub seq: u64,
    pub id: String,
    pub text: String,
    pub author: String,
    pub posted_unix_ms: u64,
    pub edited_unix_ms: Option<u64>,
    pub deleted: bool,
    pub seen: u64,
}

/// What an announce says about the cue log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CueSummary {
    pub max_seq: u64,
    pub count: u32,
    pub digest: u64,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}
const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

fn hash_stamp(h: &mut u64, s: &Stamp) {
    fnv(h, &s.ms.to_le_bytes());
    fnv(h, &s.n.to_le_bytes());
    fnv(h, s.node.as_bytes());
    fnv(h, &[0xff]);
}

fn id_hash(id: &Stamp) -> u64 {
    let mut h = FNV0;
    hash_stamp(&mut h, id);
    h
}

fn version_hash(c: &Cue) -> u64 {
    let mut h = FNV0;
    hash_stamp(&mut h, &c.id);
    fnv(&mut h, &c.seq.to_le_bytes());
    hash_stamp(&mut h, &c.numbered);
    hash_stamp(&mut h, &c.edited);
    for (k, v) in &c.seen {
        fnv(&mut h, k.as_bytes());
        fnv(&mut h, &v.to_le_bytes());
    }
    h
}

/// The room's cue log on one box.
#[derive(Debug, Clone, Default)]
pub struct CueLog {
    cues: BTreeMap<Stamp, Cue>,
    /// Highest seq dropped by retention.
    floor: u64,
    summary: CueSummary,
    /// Cues were posted or merged since the last numbering (only then can a cue be
    /// unnumbered or collide: the leader's tick stays cheap).
    to_number: bool,
}

/// What a merge or a leader's numbering changed.
#[derive(Debug, Default)]
pub struct Changed {
    /// Cues whose seq, text or deletion changed (phones are told), and new ones.
    pub visible: Vec<Cue>,
    /// Anything changed (acks included): persist, re-announce.
    pub any: bool,
}

impl CueLog {
    pub fn new(cues: Vec<Cue>, floor: u64) -> CueLog {
        let mut l = CueLog {
            cues: BTreeMap::new(),
            floor,
            summary: CueSummary::default(),
            to_number: true,
        };
        for c in cues {
            l.cues.insert(c.id.clone(), c);
        }
        l.trim();
        l.refresh();
        l
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn summary(&self) -> CueSummary {
        self.summary
    }

    pub fn all(&self) -> impl Iterator<Item = &Cue> {
        self.cues.values()
    }

    /// Numbered cues in seq order (then id, while a collision is unresolved), then the
    /// unnumbered ones.
    pub fn ordered(&self) -> Vec<&Cue> {
        let mut v: Vec<&Cue> = self.cues.values().collect();
        v.sort_by(|a, b| (a.seq == 0, a.seq, &a.id).cmp(&(b.seq == 0, b.seq, &b.id)));
        v
    }

    pub fn by_seq(&self, seq: u64) -> Option<&Cue> {
        if seq == 0 {
            return None;
        }
        self.cues
            .values()
            .filter(|c| c.seq == seq)
            .min_by(|a, b| a.id.cmp(&b.id))
    }

    pub fn get(&self, id: &Stamp) -> Option<&Cue> {
        self.cues.get(id)
    }

    /// The summary: the digest is the wrapping sum of every cue's version hash (so one
    /// cue's change updates it in O(1), see [`CueLog::ack`]).
    fn refresh(&mut self) {
        let mut d = 0u64;
        let mut max = 0;
        for c in self.cues.values() {
            d = d.wrapping_add(version_hash(c));
            max = max.max(c.seq);
        }
        self.summary = CueSummary {
            max_seq: max.max(self.floor),
            count: self.cues.len() as u32,
            digest: d,
        };
    }

    /// Drop the oldest numbered cues beyond [`MAX_CUES`]; unnumbered ones beyond it too
    /// (the newest ids stay).
    fn trim(&mut self) -> bool {
        let mut changed = false;
        while self.cues.len() > MAX_CUES {
            let victim = self
                .cues
                .values()
                .filter(|c| c.seq != 0)
                .min_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)))
                .or_else(|| self.cues.values().next())
                .map(|c| (c.id.clone(), c.seq));
            let Some((id, seq)) = victim else { break };
            self.cues.remove(&id);
            self.floor = self.floor.max(seq);
            changed = true;
        }
        changed
    }

    /// A new cue posted at this box (already validated), unnumbered.
    pub fn post(&mut self, id: Stamp, text: String, author: String, unix_ms: u64) -> Cue {
        let c = Cue {
            edited: id.clone(),
            id: id.clone(),
            seq: 0,
            numbered: Stamp::DEFAULT,
            text,
            author,
            posted_unix_ms: unix_ms,
            edited_unix_ms: None,
            deleted: false,
            seen: BTreeMap::new(),
        };
        self.cues.insert(id, c.clone());
        self.trim();
        self.refresh();
        self.to_number = true;
        c
    }

    /// Edit (`text: Some`) or delete (`None`) the cue `seq`, a decision `stamp`.
    pub fn edit(
        &mut self,
        seq: u64,
        text: Option<String>,
        stamp: Stamp,
        unix_ms: u64,
    ) -> Result<Cue, CueError> {
        let id = self
            .by_seq(seq)
            .map(|c| c.id.clone())
            .ok_or(CueError::UnknownSeq(seq))?;
        let c = self.cues.get_mut(&id).expect("found above");
        match text {
            Some(t) => c.text = t,
            None => c.deleted = true,
        }
        c.edited = stamp;
        c.edited_unix_ms = Some(unix_ms);
        let c = c.clone();
        self.refresh();
        Ok(c)
    }

    /// A phone acked `seq` at box `me`.
    pub fn ack(&mut self, seq: u64, me: &str) -> Result<(), CueError> {
        let id = self
            .by_seq(seq)
            .map(|c| c.id.clone())
            .ok_or(CueError::UnknownSeq(seq))?;
        let c = self.cues.get_mut(&id).expect("found above");
        if !c.seen.contains_key(me) && c.seen.len() >= MAX_SEEN_BOXES {
            return Ok(());
        }
        // the hot path (every phone acks every cue): update the digest, not recompute it
        let old = version_hash(c);
        let n = c.seen.entry(me.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        self.summary.digest = self
            .summary
            .digest
            .wrapping_sub(old)
            .wrapping_add(version_hash(c));
        Ok(())
    }

    /// Merge cues from a peer (validated by the wire layer).
    pub fn merge(&mut self, incoming: Vec<Cue>) -> Changed {
        let mut out = Changed::default();
        for c in incoming {
            match self.cues.get_mut(&c.id) {
                None => {
                    if c.seq != 0 && c.seq <= self.floor {
                        continue; // dropped by retention here already
                    }
                    out.visible.push(c.clone());
                    self.cues.insert(c.id.clone(), c);
                    out.any = true;
                }
                Some(m) => {
                    let mut vis = false;
                    if c.numbered > m.numbered {
                        vis |= m.seq != c.seq;
                        m.seq = c.seq;
                        m.numbered = c.numbered.clone();
                        out.any = true;
                    }
                    if c.edited > m.edited {
                        vis |= m.text != c.text || m.deleted != c.deleted;
                        m.text = c.text.clone();
                        m.deleted = c.deleted;
                        m.edited = c.edited.clone();
                        m.edited_unix_ms = c.edited_unix_ms;
                        out.any = true;
                    }
                    for (k, v) in &c.seen {
                        let e = m.seen.get(k).copied();
                        if e.is_none_or(|e| *v > e)
                            && (e.is_some() || m.seen.len() < MAX_SEEN_BOXES)
                        {
                            m.seen.insert(k.clone(), *v);
                            out.any = true;
                        }
                    }
                    if vis {
                        out.visible.push(m.clone());
                    }
                }
            }
        }
        if out.any {
            self.to_number = true;
            if self.trim() {
                out.visible.retain(|c| self.cues.contains_key(&c.id));
            }
            self.refresh();
        }
        out
    }

    /// The leader's duty: renumber colliding cues, then number unnumbered ones, each
    /// above the current max with a stamp from `stamp()`. Returns the cues it changed.
    pub fn number(&mut self, mut stamp: impl FnMut() -> Stamp) -> Vec<Cue> {
        if !std::mem::take(&mut self.to_number) {
            return Vec::new();
        }
        let mut by_seq: BTreeMap<u64, Vec<Stamp>> = BTreeMap::new();
        for c in self.cues.values().filter(|c| c.seq != 0) {
            by_seq.entry(c.seq).or_default().push(c.id.clone());
        }
        let mut todo: Vec<(u64, Stamp)> = by_seq
            .into_iter()
            .filter(|(_, ids)| ids.len() > 1)
            .flat_map(|(s, ids)| ids.into_iter().map(move |id| (s, id)))
            .collect();
        todo.sort();
        let mut fresh: Vec<Stamp> = self
            .cues
            .values()
            .filter(|c| c.seq == 0)
            .map(|c| c.id.clone())
            .collect();
        fresh.sort();
        if todo.is_empty() && fresh.is_empty() {
            return Vec::new();
        }
        let mut max = self.summary.max_seq;
        let mut changed = Vec::new();
        for id in todo.into_iter().map(|(_, id)| id).chain(fresh) {
            max += 1;
            let c = self.cues.get_mut(&id).expect("listed above");
            c.seq = max;
            c.numbered = stamp();
            changed.push(c.clone());
        }
        self.trim();
        changed.retain(|c| self.cues.contains_key(&c.id));
        self.refresh();
        changed
    }

    /// Every cue's (id hash, version hash), for a peer to answer with what we lack.
    pub fn inventory(&self) -> Vec<(u64, u64)> {
        self.cues
            .values()
            .map(|c| (id_hash(&c.id), version_hash(c)))
            .collect()
    }

    /// The cues a peer with inventory `have` lacks (or holds another version of), at
    /// most [`SYNC_BATCH_BYTES`] worth; numbered ones by seq, unnumbered first.
    pub fn missing_from(&self, have: &[(u64, u64)]) -> Vec<Cue> {
        let have: BTreeSet<(u64, u64)> = have.iter().copied().collect();
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut v: Vec<&Cue> = self.cues.values().collect();
        v.sort_by_key(|c| (c.seq != 0, c.seq));
        for c in v {
            if have.contains(&(id_hash(&c.id), version_hash(c))) {
                continue;
            }
            bytes += c.approx_bytes();
            if !out.is_empty() && bytes > SYNC_BATCH_BYTES {
                break;
            }
            out.push(c.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(ms: u64, node: &str) -> Stamp {
        Stamp {
            ms,
            n: 0,
            node: node.into(),
        }
    }

    #[test]
    fn the_leader_numbers_in_order_and_edits_merge_by_stamp() {
        let mut a = CueLog::default();
        let c1 = a.post(st(10, "a"), "one".into(), "x".into(), 10);
        let mut b = CueLog::default();
        b.merge(vec![c1]);
        b.post(st(11, "b"), "two".into(), "y".into(), 11);
        let mut t = 100;
        let changed = b.number(|| {
            t += 1;
            st(t, "b")
        });
        assert_eq!(changed.len(), 2);
        assert_eq!(b.by_seq(1).unwrap().text, "one");
        assert_eq!(b.by_seq(2).unwrap().text, "two");
        // a gets the numbering, then edits cue 2 and deletes 1
        a.merge(b.all().cloned().collect());
        assert_eq!(a.summary(), b.summary());
        a.edit(2, Some("TWO".into()), st(200, "a"), 200).unwrap();
        a.edit(1, None, st(201, "a"), 201).unwrap();
        assert_eq!(
            a.edit(9, None, st(202, "a"), 202),
            Err(CueError::UnknownSeq(9))
        );
        let ch = b.merge(a.missing_from(&b.inventory()));
        assert_eq!(ch.visible.len(), 2);
        assert_eq!(b.by_seq(2).unwrap().text, "TWO");
        assert!(b.by_seq(1).unwrap().deleted);
        assert_eq!(a.summary(), b.summary());
        // an older edit arriving late changes nothing
        let mut old = b.by_seq(2).unwrap().clone();
        old.text = "stale".into();
        old.edited = st(150, "b");
        assert!(!b.merge(vec![old]).any);
    }

    #[test]
    fn collisions_after_a_heal_are_all_renumbered_above_the_max() {
        let mut x = CueLog::default();
        let mut y = CueLog::default();
        let base = x.post(st(1, "x"), "base".into(), "".into(), 1);
        x.number(|| st(2, "x"));
        y.merge(x.all().cloned().collect());
        let _ = base;
        // partition: each side posts and numbers from the same max
        x.post(st(10, "x"), "x1".into(), "".into(), 10);
        x.post(st(11, "x"), "x2".into(), "".into(), 11);
        x.post(st(12, "x"), "x3".into(), "".into(), 12);
        x.number(|| st(13, "x"));
        y.post(st(20, "y"), "y1".into(), "".into(), 20);
        y.post(st(21, "y"), "y2".into(), "".into(), 21);
        y.number(|| st(22, "y"));
        // heal: union, then the (single) leader renumbers
        x.merge(y.missing_from(&x.inventory()));
        let mut t = 30;
        let ren = x.number(|| {
            t += 1;
            st(t, "x")
        });
        assert_eq!(ren.len(), 4, "x1, y1, x2, y2 collided");
        y.merge(x.missing_from(&y.inventory()));
        y.merge(x.missing_from(&y.inventory()));
        assert_eq!(x.summary(), y.summary());
        let seqs: Vec<u64> = x.ordered().iter().map(|c| c.seq).collect();
        assert_eq!(seqs, vec![1, 4, 5, 6, 7, 8], "distinct, none lost");
        let texts: Vec<&str> = x.ordered().iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, vec!["base", "x3", "x1", "y1", "x2", "y2"]);
        assert!(x.number(|| st(99, "x")).is_empty(), "stable once resolved");
    }

    #[test]
    fn retention_keeps_the_newest_500() {
        let mut l = CueLog::default();
        for i in 0..520u64 {
            l.post(st(i + 1, "a"), format!("c{i}"), "".into(), 0);
            l.number(|| st(10_000 + i, "a"));
        }
        assert_eq!(l.summary().count as usize, MAX_CUES);
        assert_eq!(l.floor(), 20);
        assert_eq!(l.ordered()[0].seq, 21);
        assert_eq!(l.summary().max_seq, 520);
        // an old cue offered back by a peer is not taken
        let mut old = l.ordered()[0].clone();
        old.id = st(0, "z");
        old.seq = 3;
        assert!(!l.merge(vec![old]).any);
    }

    #[test]
    fn acks_are_a_grow_only_counter_per_box() {
        let mut a = CueLog::default();
        a.post(st(1, "a"), "hi".into(), "".into(), 0);
        a.number(|| st(2, "a"));
        let mut b = a.clone();
        a.ack(1, "a").unwrap();
        a.ack(1, "a").unwrap();
        b.ack(1, "b").unwrap();
        a.merge(b.missing_from(&a.inventory()));
        b.merge(a.missing_from(&b.inventory()));
        assert_eq!(a.by_seq(1).unwrap().seen_total(), 3);
        assert_eq!(a.summary(), b.summary());
        let incremental = a.summary();
        a.refresh();
        assert_eq!(a.summary(), incremental, "the digest kept up with the acks");
        assert_eq!(a.ack(7, "a"), Err(CueError::UnknownSeq(7)));
    }

    #[test]
    fn setlist_files_are_checked_by_song_and_field() {
        let ok = "[[song]]\ntitle = \"Intro\"\ntempo = 96\nmeter = 4\n\n[[song]]\ntitle = \"Waltz\"\ntempo = 152.5\nmeter = 3\ncount_in_bars = 2\n";
        let v = parse_setlist(ok).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].meter.get(), 3);
        assert_eq!(v[1].count_in_bars, 2);
        let e = |t: &str| parse_setlist(t).unwrap_err().to_string();
        let two = |extra: &str| {
            format!("[[song]]\ntitle=\"a\"\ntempo=90\nmeter=4\n[[song]]\ntitle=\"b\"\n{extra}")
        };
        assert_eq!(
            e(&two("tempo=500\nmeter=4")),
            "song 2: tempo: 500 is out of range (20–400 BPM)"
        );
        assert_eq!(
            e(&two("tempo=90\nmeter=17")),
            "song 2: meter: 17 is out of range (1–16 beats per bar)"
        );
        assert_eq!(
            e(&two("tempo=90\nmeter=4\ncount_in_bars=5")),
            "song 2: count_in_bars: 5 is out of range (0–4 bars)"
        );
        assert!(e(&two("tempo=90\nmeter=4\nbpm=3")).starts_with("song 2: key: unknown key \"bpm\""));
        assert!(e(&two("meter=4")).contains("song 2: tempo: missing"));
        assert!(e("title = 3").contains("unknown key \"title\""));
        let many: String = (0..201)
            .map(|i| format!("[[song]]\ntitle=\"s{i}\"\ntempo=90\nmeter=4\n"))
            .collect();
        assert!(e(&many).contains("at most 200"));
    }

    #[test]
    fn bad_input_names_the_field() {
        assert!(matches!(check_text(""), Err(CueError::Text(_))));
        assert!(matches!(check_text("  "), Err(CueError::Text(_))));
        assert!(check_text(&"x".repeat(500)).is_ok());
        assert!(check_text(&"é".repeat(500)).is_ok());
        assert!(matches!(
            check_text(&"x".repeat(501)),
            Err(CueError::Text(_))
        ));
        let song = |title: &str, count_in_bars| Song {
            title: title.into(),
            tempo: Tempo::from_bpm(120.0).unwrap(),
            meter: Meter::new(4).unwrap(),
            count_in_bars,
        };
        assert_eq!(
            check_setlist(&[song("a", 0), song("b", 5)])
                .unwrap_err()
                .to_string(),
            "song 2: count_in_bars: must be 0–4 (got 5)"
        );
        assert!(check_setlist(&[song("", 0)])
            .unwrap_err()
            .to_string()
            .contains("song 1: title"));
        let many: Vec<Song> = (0..201).map(|i| song(&format!("s{i}"), 0)).collect();
        assert!(check_setlist(&many)
            .unwrap_err()
            .to_string()
            .contains("at most 200"));
        let full: Vec<Song> = (0..200)
            .map(|_| song(&"ü".repeat(MAX_TITLE_CHARS), 4))
            .collect();
        assert!(check_setlist(&full).is_err(), "too big for a frame");
    }
}
