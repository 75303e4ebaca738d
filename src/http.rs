//! The node's HTTP listener: `/health` and `/metrics` (the phone page and its
//! WebSocket join them with the phones issue).

use crate::audio::AudioStats;
use crate::mesh::{MeshStats, RoomHandle};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

#[derive(Clone)]
pub struct HttpState {
    pub room: RoomHandle,
    pub audio: Arc<AudioStats>,
    pub mesh: Arc<MeshStats>,
    /// The current timeline, session map and epoch (what the audio thread plays).
    pub cell: Arc<crate::audio::snapshot::SnapshotCell>,
    pub clock: crate::clock::NodeClock,
    /// Bumped by the room task every time it publishes a new snapshot.
    pub changes: tokio::sync::watch::Receiver<u64>,
    /// Control PIN for changes from phones (None: no PIN).
    pub control_pin: Option<String>,
}

pub fn router(state: HttpState) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(state)
}

/// Bind and serve until `shutdown`. A port that cannot be bound is an error for the
/// caller to report; the click goes on without HTTP.
pub async fn serve(addr: SocketAddr, state: HttpState, mut shutdown: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot bind HTTP to {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "HTTP listening (/health, /metrics)");
    tokio::spawn(async move {
        let r = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            }).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(local)
}

async fn health(State(st): State<HttpState>) -> impl IntoResponse {
    let Some(s) = st.room.status().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "stopping"})));
    };
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    v["status"] = serde_json::json!("ok");
    v["audio"] = serde_json::json!({
        "sink": st.audio.sink_name(),
        "callbacks": st.audio.callbacks.load(Relaxed),
        "clicks": st.audio.clicks.load(Relaxed),
        "late_clicks": st.audio.late_clicks.load(Relaxed),
        "missed_clicks": st.audio.missed_clicks.load(Relaxed),
        "card_rate_ppm": st.audio.rate_ppb.load(Relaxed) as f64 / 1000.0,
    });
    (StatusCode::OK, Json(v))
}

async fn metrics(State(st): State<HttpState>) -> impl IntoResponse {
    let mut m = String::new();
    let mut put = |name: &str, help: &str, kind: &str, lines: Vec<(String, f64)>| {
        m.push_str(&format!("# HELP bandsync_{name} {help}\n# TYPE bandsync_{name} {kind}\n"));
        for (labels, v) in lines {
            m.push_str(&format!("bandsync_{name}{labels} {v}\n"));
        }
    };
    let a = &st.audio;
    put("audio_callbacks_total", "Audio callbacks run.", "counter", vec![(String::new(), a.callbacks.load(Relaxed) as f64)]);
    put("clicks_total", "Clicks played.", "counter", vec![(String::new(), a.clicks.load(Relaxed) as f64)]);
    put("late_clicks_total", "Clicks played late at a buffer start.", "counter", vec![(String::new(), a.late_clicks.load(Relaxed) as f64)]);
    put("missed_clicks_total", "Clicks dropped as too late.", "counter", vec![(String::new(), a.missed_clicks.load(Relaxed) as f64)]);
    put("audio_underruns_total", "Audio stream errors (xruns included).", "counter", vec![(String::new(), a.device_errors.load(Relaxed) as f64)]);
    put("audio_clock_resets_total", "Frame-clock restarts.", "counter", vec![(String::new(), a.clock_resets.load(Relaxed) as f64)]);
    put("card_rate_ppm", "Sound card rate vs nominal, as the node's clock sees it.", "gauge", vec![(String::new(), a.rate_ppb.load(Relaxed) as f64 / 1000.0)]);
    let ms = &st.mesh;
    put(
        "refused_total",
        "Inputs refused, by reason.",
        "counter",
        vec![
            ("{reason=\"auth\"}".into(), ms.auth_failures.load(Relaxed) as f64),
            ("{reason=\"bad_frame\"}".into(), ms.bad_frames.load(Relaxed) as f64),
            ("{reason=\"bad_datagram\"}".into(), ms.bad_datagrams.load(Relaxed) as f64),
            ("{reason=\"other_room\"}".into(), ms.refused_other_room.load(Relaxed) as f64),
            ("{reason=\"clock_sample\"}".into(), ms.rejected_samples.load(Relaxed) as f64),
        ],
    );
    put("peer_connections_total", "Authenticated peer connections.", "counter", vec![(String::new(), ms.connections.load(Relaxed) as f64)]);
    if let Some(s) = st.room.status().await {
        put("leader", "1 when this node leads.", "gauge", vec![(String::new(), if s.role == "leader" { 1.0 } else { 0.0 })]);
        put("epoch", "Leadership epoch.", "gauge", vec![(String::new(), s.epoch as f64)]);
        put("tempo_bpm", "Current tempo.", "gauge", vec![(String::new(), s.tempo)]);
        put("peers", "Connected peers.", "gauge", vec![(String::new(), s.peers.len() as f64)]);
        let lab = |p: &crate::room::PeerStatus| format!("{{peer=\"{}\",name=\"{}\"}}", p.id, p.name.replace(['"', '\\', '\n'], "_"));
        put("peer_offset_us", "Peer's session clock minus ours.", "gauge", s.peers.iter().filter_map(|p| p.offset_us.map(|o| (lab(p), o as f64))).collect());
        put("peer_rtt_us", "Best recent round trip to the peer.", "gauge", s.peers.iter().filter_map(|p| p.rtt_us.map(|o| (lab(p), o as f64))).collect());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m)
}
