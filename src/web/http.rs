//! The node's HTTP listener: the phone page (`/`), its WebSocket (`/ws`, see
//! [`crate::web::gateway`]), `/health` and `/metrics`.

pub use crate::web::state::HttpState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

pub fn router(state: HttpState) -> Router {
    let gw = crate::web::gateway::Gateway::new(&state);
    Router::new()
        .route("/", get(crate::web::gateway::page))
        .route("/index.html", get(crate::web::gateway::page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(
            Router::new()
                .route("/ws", get(crate::web::gateway::ws_handler))
                .with_state(gw),
        )
}

/// Bind and serve until `shutdown`. A port that cannot be bound is an error for the
/// caller to report; the click goes on without HTTP.
pub async fn serve(
    addr: SocketAddr,
    state: HttpState,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind HTTP to {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "HTTP listening (phone page /, /ws, /health, /metrics)");
    tokio::spawn(async move {
        // No Nagle: a phone must get a snapshot the moment it is sent, not after the
        // previous message's (delayed) ACK.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let r = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(local)
}

async fn health(State(st): State<HttpState>) -> impl IntoResponse {
    let Some(s) = st.room.status().await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "stopping"})),
        );
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
        "rt_priority": st.audio.rt_priority.load(Relaxed).max(0),
    });
    (StatusCode::OK, Json(v))
}

async fn metrics(State(st): State<HttpState>) -> impl IntoResponse {
    let mut m = String::new();
    let mut put = |name: &str, help: &str, kind: &str, lines: Vec<(String, f64)>| {
        m.push_str(&format!(
            "# HELP bandsync_{name} {help}\n# TYPE bandsync_{name} {kind}\n"
        ));
        for (labels, v) in lines {
            m.push_str(&format!("bandsync_{name}{labels} {v}\n"));
        }
    };
    let a = &st.audio;
    put(
        "audio_callbacks_total",
        "Audio callbacks run.",
        "counter",
        vec![(String::new(), a.callbacks.load(Relaxed) as f64)],
    );
    put(
        "audio_rt_priority",
        "SCHED_FIFO priority of the audio thread (0: normal priority).",
        "gauge",
        vec![(String::new(), a.rt_priority.load(Relaxed).max(0) as f64)],
    );
    put(
        "clicks_total",
        "Clicks played.",
        "counter",
        vec![(String::new(), a.clicks.load(Relaxed) as f64)],
    );
    put(
        "late_clicks_total",
        "Clicks played late at a buffer start.",
        "counter",
        vec![(String::new(), a.late_clicks.load(Relaxed) as f64)],
    );
    put(
        "missed_clicks_total",
        "Clicks dropped as too late.",
        "counter",
        vec![(String::new(), a.missed_clicks.load(Relaxed) as f64)],
    );
    put(
        "audio_underruns_total",
        "Audio stream errors (xruns included).",
        "counter",
        vec![(String::new(), a.device_errors.load(Relaxed) as f64)],
    );
    put(
        "audio_clock_resets_total",
        "Frame-clock restarts.",
        "counter",
        vec![(String::new(), a.clock_resets.load(Relaxed) as f64)],
    );
    put(
        "card_rate_ppm",
        "Sound card rate vs nominal, as the node's clock sees it.",
        "gauge",
        vec![(String::new(), a.rate_ppb.load(Relaxed) as f64 / 1000.0)],
    );
    let ms = &st.mesh;
    put(
        "refused_total",
        "Inputs refused, by reason.",
        "counter",
        vec![
            (
                "{reason=\"auth\"}".into(),
                ms.auth_failures.load(Relaxed) as f64,
            ),
            (
                "{reason=\"bad_frame\"}".into(),
                ms.bad_frames.load(Relaxed) as f64,
            ),
            (
                "{reason=\"bad_datagram\"}".into(),
                ms.bad_datagrams.load(Relaxed) as f64,
            ),
            (
                "{reason=\"other_room\"}".into(),
                ms.refused_other_room.load(Relaxed) as f64,
            ),
            (
                "{reason=\"clock_sample\"}".into(),
                ms.rejected_samples.load(Relaxed) as f64,
            ),
        ],
    );
    put(
        "peer_connections_total",
        "Authenticated peer connections.",
        "counter",
        vec![(String::new(), ms.connections.load(Relaxed) as f64)],
    );
    let g = &st.stats;
    let one = |v: &std::sync::atomic::AtomicU64| vec![(String::new(), v.load(Relaxed) as f64)];
    put(
        "phone_connections",
        "Phone WebSockets open.",
        "gauge",
        one(&g.connections_open),
    );
    put(
        "phone_connections_total",
        "Phone WebSockets accepted.",
        "counter",
        one(&g.connections_total),
    );
    put(
        "phone_refused_total",
        "Phone WebSockets refused at the connection cap.",
        "counter",
        one(&g.refused_full),
    );
    put(
        "phone_messages_received_total",
        "Messages received from phones.",
        "counter",
        one(&g.messages_in),
    );
    put(
        "phone_messages_sent_total",
        "Messages sent to phones.",
        "counter",
        one(&g.messages_out),
    );
    put(
        "phone_broadcasts_total",
        "Snapshots and room stats pushed to every joined phone.",
        "counter",
        one(&g.broadcasts),
    );
    put(
        "phone_broadcast_last_us",
        "Time the last broadcast took to queue for every phone.",
        "gauge",
        one(&g.broadcast_last_us),
    );
    put(
        "phone_errors_total",
        "Errors sent to phones, by code.",
        "counter",
        g.errors_by_code()
            .into_iter()
            .map(|(c, n)| (format!("{{code=\"{c}\"}}"), n as f64))
            .collect(),
    );
    put(
        "phone_rate_limited_total",
        "Phone messages dropped by the rate limit.",
        "counter",
        one(&g.rate_limited),
    );
    put(
        "phone_closed_total",
        "Phone connections closed by the node, by reason.",
        "counter",
        vec![
            (
                "{reason=\"abuse\"}".into(),
                g.closed_abuse.load(Relaxed) as f64,
            ),
            (
                "{reason=\"slow\"}".into(),
                g.dropped_slow.load(Relaxed) as f64,
            ),
            (
                "{reason=\"idle\"}".into(),
                g.closed_idle.load(Relaxed) as f64,
            ),
        ],
    );
    put(
        "phone_changes_total",
        "Changes requested from phones.",
        "counter",
        one(&g.changes_requested),
    );
    let (buckets, sum, count) = g.delivery.cumulative();
    let mut lines: Vec<(String, f64)> = buckets
        .into_iter()
        .map(|(le, n)| {
            (
                format!(
                    "_bucket{{le=\"{}\"}}",
                    le.map_or("+Inf".to_string(), |s| s.to_string())
                ),
                n as f64,
            )
        })
        .collect();
    lines.push(("_sum".into(), sum));
    lines.push(("_count".into(), count as f64));
    put(
        "phone_delivery_seconds",
        "From a broadcast to its message written into each phone's socket.",
        "histogram",
        lines,
    );
    if let Some(s) = st.room.status().await {
        put(
            "leader",
            "1 when this node leads.",
            "gauge",
            vec![(String::new(), if s.role == crate::core::room::Role::Leader { 1.0 } else { 0.0 })],
        );
        put(
            "epoch",
            "Leadership epoch.",
            "gauge",
            vec![(String::new(), s.epoch as f64)],
        );
        put(
            "tempo_bpm",
            "Current tempo.",
            "gauge",
            vec![(String::new(), s.tempo)],
        );
        put(
            "peers",
            "Connected peers.",
            "gauge",
            vec![(String::new(), s.peers.len() as f64)],
        );
        let lab = |p: &crate::core::room::PeerStatus| {
            format!(
                "{{peer=\"{}\",name=\"{}\"}}",
                p.id,
                p.name.replace(['"', '\\', '\n'], "_")
            )
        };
        put(
            "peer_offset_us",
            "Peer's session clock minus ours.",
            "gauge",
            s.peers
                .iter()
                .filter_map(|p| p.offset_us.map(|o| (lab(p), o as f64)))
                .collect(),
        );
        put(
            "peer_rtt_us",
            "Best recent round trip to the peer.",
            "gauge",
            s.peers
                .iter()
                .filter_map(|p| p.rtt_us.map(|o| (lab(p), o as f64)))
                .collect(),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m)
}
