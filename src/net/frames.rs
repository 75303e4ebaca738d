//! Frames on QUIC streams: the async half of [`crate::core::wire`] (which stays pure).

use crate::core::wire::{Frame, WireError, MAX_FRAME};

/// Read one frame from a QUIC stream. `Ok(None)` at a clean end of stream.
pub async fn read_frame(r: &mut quinn::RecvStream) -> Result<Option<Frame>, FrameReadError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameReadError::Stream(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameReadError::Wire(WireError::TooLarge(len)));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| FrameReadError::Stream(e.to_string()))?;
    Frame::decode_body(&body)
        .map(Some)
        .map_err(FrameReadError::Wire)
}

#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    #[error("{0}")]
    Wire(WireError),
    #[error("stream: {0}")]
    Stream(String),
}
