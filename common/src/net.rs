//! Frames over QUIC streams: the one place the agents turn [`stackclone_proto::wire`] frames into
//! stream reads and writes.
//!
//! Reads are bounded before allocation: the 4-byte length is checked against the limit, then
//! exactly that many bytes are read. A stream that ends cleanly between frames yields `None`; one
//! that ends inside a frame is an error.

use serde::Serialize;
use serde::de::DeserializeOwned;
use stackclone_proto::text::escape_controls;
use stackclone_proto::wire::{self, HEADER_LEN, MAX_FRAME, WireError};

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("reading from the peer failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing to the peer failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("closing the stream failed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Writes `msg` as one frame.
pub async fn send<T: Serialize>(stream: &mut quinn::SendStream, msg: &T) -> Result<(), NetError> {
    let frame = wire::encode_frame(msg)?;
    stream.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame and decodes it; `Ok(None)` when the peer finished the stream between frames.
pub async fn recv<T: DeserializeOwned>(
    stream: &mut quinn::RecvStream,
) -> Result<Option<T>, NetError> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(NetError::Truncated),
        Err(e) => return Err(e.into()),
    }
    let len = wire::frame_len(header, MAX_FRAME)?;
    let mut payload = vec![0u8; len];
    match stream.read_exact(&mut payload).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(NetError::Truncated),
        Err(e) => return Err(e.into()),
    }
    Ok(Some(wire::decode(&payload)?))
}

/// Why the control stream yielded no message: the peer sent something that is not one (tell it
/// why), or the stream or connection ended (nobody to tell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEnd {
    Malformed(String),
    Lost(String),
}

impl ControlEnd {
    /// Classifies a failed or finished read.
    pub fn of(result: Result<(), NetError>) -> ControlEnd {
        match result {
            Ok(()) => ControlEnd::Lost("the peer closed the control stream".into()),
            // A close reason inside is the peer's text: escaped for the log.
            Err(NetError::Wire(e)) => ControlEnd::Malformed(escape_controls(&e.to_string()).into()),
            Err(e) => ControlEnd::Lost(escape_controls(&e.to_string()).into()),
        }
    }
}
