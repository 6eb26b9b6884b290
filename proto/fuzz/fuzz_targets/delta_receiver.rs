//! Arbitrary chunks into the delta receiver against a small basis: errors or a hash mismatch,
//! never a panic, never output past the declared length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackclone_proto::delta::{Basis, Chunk, FileReceiver, Sink};
use stackclone_proto::manifest::Hash;
use stackclone_proto::wire::{self, FrameDecoder};

struct Mem(Vec<u8>);
impl Basis for Mem {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let src = self
            .0
            .get(start..start.saturating_add(buf.len()))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

struct Count(u64, u64);
impl Sink for Count {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0 += data.len() as u64;
        assert!(self.0 <= self.1, "wrote past the declared length");
        Ok(())
    }
    fn write_zeros(&mut self, len: u64) -> std::io::Result<()> {
        self.write(&[])?;
        self.0 += len;
        assert!(self.0 <= self.1, "wrote past the declared length");
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let expected = 64 * 1024;
    let mut basis = Mem((0..32 * 1024u32).map(|i| (i % 251) as u8).collect());
    let mut sink = Count(0, expected);
    let mut r = FileReceiver::new(Some(basis.0.len() as u64), expected);
    let mut dec = FrameDecoder::default();
    if dec.push(data).is_err() {
        return;
    }
    while let Ok(Some(frame)) = dec.next_frame() {
        let Ok(chunk) = wire::decode::<Chunk>(&frame) else { return };
        if r.handle_chunk(chunk, &mut basis, &mut sink).is_err() {
            return;
        }
    }
    let _ = r.finish(&mut sink, Hash::of(b""));
});
