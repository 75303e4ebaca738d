//! A CLI connection: queries in, replies out. Never a peer of the room.

use crate::core::wire::{Frame, Hello, Reply};
use crate::net::frames::read_frame;
use crate::net::handle::Event;
use crate::net::peer::PeerCtx;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn serve_cli(
    shared: Arc<PeerCtx>,
    conn: quinn::Connection,
    hello: Hello,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    tracing::debug!(cli = %hello.node, addr = %conn.remote_address(), "CLI connected");
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv)).await
        {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => {
                shared.stats.bad_frames.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "bad frame from CLI");
                let _ = send
                    .write_all(&Frame::Reply(Reply::Error(format!("bad request: {e}"))).encode())
                    .await;
                break;
            }
        };
        let reply = match frame {
            Frame::Query(q) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if shared
                    .events
                    .send(Event::Query { q, reply: tx })
                    .await
                    .is_err()
                {
                    break;
                }
                rx.await
                    .unwrap_or_else(|_| Reply::Error("the node is shutting down".into()))
            }
            other => {
                shared.stats.bad_frames.fetch_add(1, Relaxed);
                Reply::Error(format!(
                    "unexpected frame from a CLI: {}",
                    frame_name(&other)
                ))
            }
        };
        if send.write_all(&Frame::Reply(reply).encode()).await.is_err() {
            break;
        }
    }
    let _ = send.finish();
}

pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Announce(_) => "Announce",
        Frame::Change(_) => "Change",
        Frame::Bye(_) => "Bye",
        Frame::Query(_) => "Query",
        Frame::Reply(_) => "Reply",
        Frame::Pin(_) => "Pin",
        Frame::SetlistGet => "SetlistGet",
        Frame::Setlist(_) => "Setlist",
        Frame::Song(_) => "Song",
        Frame::Cues(_) => "Cues",
        Frame::CueHave(_) => "CueHave",
        Frame::Rtc(_) => "Rtc",
    }
}
