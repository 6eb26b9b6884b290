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

/// One side's control stream of a cycle: frames out on the send half, frames in read by a task
/// of their own so that a driver's loop can `select!` on them beside its other events. Both
/// agents' drivers use it; it knows nothing of what the messages mean.
///
/// Once a send fails or the peer's half ends, the stream is down: later sends are dropped
/// (the session was told, and the cycle is ending), and nothing more is read.
pub struct ControlStream<In> {
    send: quinn::SendStream,
    incoming: tokio::sync::mpsc::UnboundedReceiver<Result<In, ControlEnd>>,
    reader: tokio::task::JoinHandle<()>,
    /// Sends still reach the peer.
    up: bool,
    /// Reads still go on (not after the stream ended or a frame did not decode).
    reading: bool,
}

impl<In: DeserializeOwned + Send + 'static> ControlStream<In> {
    /// Starts reading `recv` in its own task.
    pub fn new(send: quinn::SendStream, mut recv: quinn::RecvStream) -> Self {
        let (tx, incoming) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let msg = match self::recv::<In>(&mut recv).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(ControlEnd::of(Ok(()))),
                    Err(e) => Err(ControlEnd::of(Err(e))),
                };
                let end = msg.is_err();
                if tx.send(msg).is_err() || end {
                    return;
                }
            }
        });
        Self {
            send,
            incoming,
            reader,
            up: true,
            reading: true,
        }
    }

    /// Whether sends still reach the peer.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Sends `msg`; on failure the stream is down from here on, and why is returned once.
    /// While it is down, this does nothing.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), NetError> {
        if !self.up {
            return Ok(());
        }
        let sent = self::send(&mut self.send, msg).await;
        if sent.is_err() {
            self.up = false;
        }
        sent
    }

    /// The next message, or why there is none; pending for ever once the stream is down or
    /// ended (for use in `select!`). After a [`ControlEnd`] nothing more is read.
    pub async fn recv(&mut self) -> Result<In, ControlEnd> {
        if !(self.up && self.reading) {
            return std::future::pending().await;
        }
        match self.incoming.recv().await {
            Some(Ok(m)) => Ok(m),
            Some(Err(end)) => {
                self.reading = false;
                if matches!(end, ControlEnd::Lost(_)) {
                    self.up = false;
                }
                Err(end)
            }
            None => {
                self.up = false;
                Err(ControlEnd::Lost("the control stream's reader ended".into()))
            }
        }
    }

    /// Marks the stream down without a failed send (the connection is known to be gone).
    pub fn set_down(&mut self) {
        self.up = false;
    }

    /// Ends the stream: stops reading, finishes the send half and gives the last frames up to
    /// `linger` to reach the peer before the connection is closed.
    pub async fn close(mut self, linger: std::time::Duration) {
        self.reader.abort();
        let _ = self.send.finish();
        let _ = tokio::time::timeout(linger, self.send.stopped()).await;
    }
}

impl<In> std::fmt::Debug for ControlStream<In> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlStream")
            .field("up", &self.up)
            .field("reading", &self.reading)
            .finish_non_exhaustive()
    }
}

impl<In> Drop for ControlStream<In> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
