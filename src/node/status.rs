//! `status.json` and the phone URL shown by `status`.

use crate::core::room::{Room, Status};
use crate::node::room_task::Shared;

pub(crate) fn phone_url(shared: &Shared) -> Option<String> {
    shared.cfg.http_port.map(|p| {
        format!(
            "http://{}.local:{p}/",
            crate::net::discovery::dns_label(&shared.cfg.name)
        )
    })
}

/// Publish the status for `/health` and `/metrics` (every call), and rewrite
/// `status.json` when anything but the clock (`session_ns`, `beat`) changed since the
/// last write, and at least every 5 s: an idle box alone mostly writes nothing. The
/// file is written on the blocking pool, never on the clock loop.
pub(crate) fn write_status(
    shared: &Shared,
    room: &Room,
    now: i64,
    last: &mut Option<(Status, i64)>,
) {
    let mut st = room.status(now);
    decorate(shared, &mut st);
    if let Some(tx) = &shared.cfg.status_tx {
        tx.send_replace(Some(st.clone()));
    }
    let mut still = st.clone();
    (still.session_ns, still.beat) = (0, 0.0);
    if last
        .as_ref()
        .is_some_and(|(s, at)| *s == still && now - at < 5_000_000_000)
    {
        return;
    }
    let Ok(json) = serde_json::to_vec_pretty(&st) else {
        return;
    };
    *last = Some((still, now));
    let p = shared.cfg.state_dir.join("status.json");
    let tmp = shared.cfg.state_dir.join(".status.json.tmp");
    // Not fsynced: it is a view, rebuilt every half second.
    tokio::task::spawn_blocking(move || {
        if std::fs::write(&tmp, &json)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .is_err()
        {
            tracing::debug!(path = %p.display(), "cannot write status file");
        }
    });
}

/// What the node adds to the room's status: the phone URL, Link and the mirror.
pub(crate) fn decorate(shared: &Shared, st: &mut Status) {
    use std::sync::atomic::Ordering::Relaxed;
    st.phone_url = phone_url(shared);
    if let Some((port, sha)) = &shared.cfg.https {
        st.https_url = Some(format!(
            "https://{}.local:{port}/",
            crate::net::discovery::dns_label(&shared.cfg.name)
        ));
        st.cert_sha256 = Some(sha.clone());
    }
    if let Some(l) = &shared.cfg.link {
        st.link = crate::core::room::LinkInfo {
            enabled: l.enabled.load(Relaxed),
            peers: l.peers.load(Relaxed),
        };
    }
    if let Some(m) = &shared.cfg.mirror_stats {
        st.redis = match m.snapshot().state {
            crate::mirror::MirrorState::Connected => "connected",
            crate::mirror::MirrorState::Stale => "stale",
            crate::mirror::MirrorState::Off => "off",
        }
        .into();
    }
}
