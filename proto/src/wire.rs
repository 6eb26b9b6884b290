//! The one place that knows how messages become bytes.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload: one message encoded with
//! serde + bincode 2 (`standard()` config: little-endian varints). Swapping the format (say, for
//! postcard) means changing this module only.
//!
//! Nothing a peer sends can make us allocate more than [`MAX_FRAME`] bytes per frame: the declared
//! length is checked before any buffer grows, and bincode decodes under a byte limit, so a count
//! inside a message that claims more elements than the frame could hold fails before allocating.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest payload of one frame. Data messages carry at most [`MAX_DATA_CHUNK`] bytes of file
/// data, which leaves room for the message around it.
pub const MAX_FRAME: usize = 8 << 20;
/// Largest file-data payload in one message.
pub const MAX_DATA_CHUNK: usize = 4 << 20;
/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Why bytes from a peer are not a valid frame or message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is larger than the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message has {extra} trailing bytes after its end")]
    TrailingBytes { extra: usize },
    #[error("message of {len} bytes is larger than the limit of {max}")]
    MessageTooLarge { len: usize, max: usize },
}

/// Encodes `msg` as one frame: length prefix and payload.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = vec![0u8; HEADER_LEN];
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(WireError::MessageTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one message from a frame payload (without its length prefix). The whole payload must
/// be consumed.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME,
        });
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(WireError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(msg)
}

/// The canonical bytes of a value, for hashing and signing. Deterministic for the plain structs
/// this crate defines (no maps, no floats).
pub fn canonical<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for our types: they contain no maps with non-string keys,
    // no `serialize_*` errors, and the size limit is checked by decoders, not by this encoder.
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("in-memory bincode encoding of a plain struct cannot fail")
}

/// Splits a byte stream into frames. Sans-IO: feed it whatever arrived with [`push`], take whole
/// payloads out with [`next_frame`].
///
/// [`push`]: FrameDecoder::push
/// [`next_frame`]: FrameDecoder::next_frame
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` (at most [`MAX_FRAME`]).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.min(MAX_FRAME),
        }
    }

    /// Appends received bytes. Fails, without buffering, once a declared length is over the limit.
    pub fn push(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.buf.extend_from_slice(data);
        self.check_header()
    }

    fn check_header(&self) -> Result<(), WireError> {
        if self.buf.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            if len as usize > self.max {
                return Err(WireError::FrameTooLarge {
                    len: len as usize,
                    max: self.max,
                });
            }
        }
        Ok(())
    }

    /// The next complete payload, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        self.check_header()?;
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Reads the declared payload length from a 4-byte header, refusing one over `max`. For drivers
/// that read exactly one frame at a time from a stream.
pub fn frame_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        data: Vec<u8>,
        n: u64,
    }

    #[test]
    fn frames_round_trip_across_arbitrary_splits() {
        let msgs: Vec<Sample> = (0..5)
            .map(|i| Sample {
                name: format!("m{i}"),
                data: vec![i as u8; i * 100],
                n: i as u64,
            })
            .collect();
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode_frame(m).unwrap());
        }
        for split in [1, 3, 7, 64, stream.len()] {
            let mut dec = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                dec.push(chunk).unwrap();
                while let Some(p) = dec.next_frame().unwrap() {
                    got.push(decode::<Sample>(&p).unwrap());
                }
            }
            assert_eq!(got, msgs);
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn declared_length_over_limit_is_refused_before_buffering_the_body() {
        let mut dec = FrameDecoder::new(1024);
        let err = dec.push(&(1025u32).to_be_bytes()).unwrap_err();
        assert!(matches!(
            err,
            WireError::FrameTooLarge {
                len: 1025,
                max: 1024
            }
        ));
        assert!(matches!(
            frame_len(u32::MAX.to_be_bytes(), MAX_FRAME),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn huge_count_inside_a_small_frame_fails_without_allocating() {
        // A Vec<u64> claiming 2^60 elements: varint tag 253 = u64 follows.
        let mut payload = vec![253u8];
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = decode::<Vec<u64>>(&payload).unwrap_err();
        assert!(matches!(err, WireError::Malformed(_)), "{err:?}");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoder(data: Vec<u8>, split in 1usize..64) {
            let mut dec = FrameDecoder::new(1 << 16);
            for piece in data.chunks(split) {
                if dec.push(piece).is_err() {
                    break;
                }
                while let Ok(Some(frame)) = dec.next_frame() {
                    let _ = decode::<crate::msg::SourceMsg>(&frame);
                    let _ = decode::<crate::msg::TargetMsg>(&frame);
                }
                proptest::prop_assert!(dec.buffered() <= (1 << 16) + HEADER_LEN + split);
            }
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut frame = encode_frame(&7u32).unwrap();
        frame.push(0);
        assert!(matches!(
            decode::<u32>(&frame[HEADER_LEN..]),
            Err(WireError::TrailingBytes { extra: 1 })
        ));
    }
}
