//! The room task's inbox: what peer tasks, CLI connections and the web layer send it,
//! and the small [`RoomHandle`] through which the web layer and the CLI server ask it.

use crate::core::sync::Sample;
use crate::core::time::SessionMap;
use crate::core::wire::{Frame, Query, Reply, RtcRelay};
use tokio::sync::mpsc;

/// How the web layer and the CLI server ask the room task a [`Query`].
#[derive(Clone)]
pub struct RoomHandle(mpsc::Sender<Event>);

impl RoomHandle {
    pub async fn query(&self, q: Query) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.0.send(Event::Query { q, reply: tx }).await.is_err() {
            return Reply::Error("the node is shutting down".into());
        }
        rx.await
            .unwrap_or_else(|_| Reply::Error("the node is shutting down".into()))
    }

    /// Send talkback signalling to the other boxes of the room (never waits; `false`:
    /// the inbox is full or the node is stopping, and it is dropped).
    pub fn rtc_send(&self, r: RtcRelay) -> bool {
        self.0.try_send(Event::RtcOut(r)).is_ok()
    }

    /// Where the room task hands the talkback signalling that other boxes send
    /// (`(from node id, relay)`); the last subscriber wins.
    pub fn rtc_subscribe(&self, tx: mpsc::Sender<(String, RtcRelay)>) -> bool {
        self.0.try_send(Event::RtcSubscribe(tx)).is_ok()
    }

    /// Step the room's Link ghost clock (never waits; `false`: the inbox is full or
    /// the node is stopping).
    pub fn link_steer(&self, base: i64, new: i64) -> bool {
        self.0.try_send(Event::LinkSteer { base, new }).is_ok()
    }

    pub async fn status(&self) -> Option<crate::core::room::Status> {
        match self.query(Query::Status).await {
            Reply::Status(j) => serde_json::from_str(&j).ok(),
            _ => None,
        }
    }
}

/// What the room task tells the phone gateway about the setlist and the cue board.
pub struct Board {
    /// The setlist and the current song (0-based), as they change.
    pub setlist: tokio::sync::watch::Sender<SetlistView>,
    /// Every cue that is new on this box or whose seq, text or deletion changed.
    pub cues: tokio::sync::broadcast::Sender<crate::core::cues::Cue>,
    /// Every numbered cue in seq order, republished after each such change: phones
    /// that join read their backlog here, never from the room task.
    pub all: tokio::sync::watch::Sender<std::sync::Arc<Vec<crate::core::cues::CueView>>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SetlistView {
    pub songs: std::sync::Arc<Vec<crate::core::cues::Song>>,
    pub song: Option<u16>,
}

impl Default for Board {
    fn default() -> Board {
        Board {
            setlist: tokio::sync::watch::channel(SetlistView::default()).0,
            cues: tokio::sync::broadcast::channel(256).0,
            all: tokio::sync::watch::channel(Default::default()).0,
        }
    }
}

/// The room task's inbox; create it before `run` so HTTP can hold a handle.
pub struct Inbox(mpsc::Receiver<Event>, mpsc::Sender<Event>);

impl Inbox {
    /// The receiving end (for the room task) and a sender for the connection tasks.
    pub fn split(self) -> (mpsc::Receiver<Event>, mpsc::Sender<Event>) {
        (self.0, self.1)
    }
}

pub fn channel() -> (RoomHandle, Inbox) {
    let (tx, rx) = mpsc::channel(1024);
    (RoomHandle(tx.clone()), Inbox(rx, tx))
}

pub enum Event {
    Query {
        q: Query,
        reply: tokio::sync::oneshot::Sender<Reply>,
    },
    Up {
        id: String,
        name: String,
        conn: quinn::Connection,
        tx: mpsc::Sender<Frame>,
        /// This node dialed the connection.
        dialer: bool,
        /// The peer's boot id (from its `Hello`).
        boot: u64,
    },
    Down {
        id: String,
        stable: usize,
    },
    Frame {
        from: String,
        frame: Frame,
    },
    Pong {
        from: String,
        sample: Sample,
        map: SessionMap,
    },
    /// Talkback signalling from this box's phones, for the other boxes.
    RtcOut(RtcRelay),
    /// Where to hand the talkback signalling other boxes send.
    RtcSubscribe(mpsc::Sender<(String, RtcRelay)>),
    /// Step the room's Link ghost clock from shift `base` to `new` (ns); the room
    /// takes it when this box leads and still holds `base`.
    LinkSteer {
        base: i64,
        new: i64,
    },
}
