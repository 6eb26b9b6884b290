//! Arbitrary bytes into the frame decoder and the message decoders: errors, never panics, never
//! a buffer past the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackclone_proto::msg::{SourceMsg, TargetMsg};
use stackclone_proto::wire::{self, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::default();
    // Feed in uneven pieces, as a network would.
    for piece in data.chunks(7) {
        if dec.push(piece).is_err() {
            return;
        }
        assert!(dec.buffered() <= wire::MAX_FRAME + wire::HEADER_LEN + 7);
        while let Ok(Some(frame)) = dec.next_frame() {
            if let Ok(msg) = wire::decode::<SourceMsg>(&frame) {
                // Whatever decodes must encode again.
                wire::encode_frame(&msg).expect("a decoded message re-encodes");
            }
            let _ = wire::decode::<TargetMsg>(&frame);
        }
    }
});
