//! The delta engine: rsync-style signatures, windowed deltas and a checked, streaming applier.
//!
//! It owns the byte-level half of "send only what changed": the target describes its basis file
//! with a [`SignatureBuilder`], the source turns its new file into [`Chunk`]s with a
//! [`FileSender`] (librsync-format deltas from `fast_rsync`, or literal data when a delta cannot
//! pay off), and the target rebuilds the file with a [`FileReceiver`], which proves the result
//! with BLAKE3 ([`Verified`]).
//!
//! ```text
//! target                                  source
//! basis ──SignatureBuilder──► sig bytes ──► CheckedSignature::parse
//!                                            FileSender::send_window(window)…  (16 MiB windows)
//! FileReceiver::handle_chunk ◄── Chunk… ◄───┘  + BLAKE3 of the very bytes diffed
//!   COPY → Basis::read_at, output → Sink (zero runs → write_zeros)
//! FileReceiver::finish(declared hash) → Verified | HashMismatch (re-request literally)
//! ```
//!
//! Memory stays flat whatever the file size: the signature is built chunk by chunk, the source
//! diffs one window at a time against one global index (so COPY offsets stay absolute in the
//! basis), and the receiver parses the delta opcodes itself, serving COPYs from the basis in
//! bounded pieces, instead of handing whole buffers to `fast_rsync::apply`.
//!
//! What it does **not** do: read or write files (the driver implements [`Basis`] and [`Sink`] and
//! reads windows with `pread`), fsync, rename, decide which files to send, or frame messages
//! (that is [`crate::wire`]). MD4 inside the signatures is not collision-resistant against a
//! hostile peer; the end-to-end BLAKE3 check is what guarantees content.

use std::fmt;
use std::io;

use fast_rsync::{IndexedSignature, Signature, SignatureOptions};
use serde::{Deserialize, Serialize};

use crate::manifest::Hash;
use crate::wire::MAX_DATA_CHUNK;

/// Default window for diff and apply. Big enough that the one or two blocks of extra literal at
/// each window boundary are negligible, small enough that a window, its delta and its compressed
/// delta fit comfortably in a few tens of MiB. A multiple of every block size.
pub const WINDOW: usize = 16 << 20;
/// Largest window a receiver accepts; bounds its buffering per window.
pub const MAX_WINDOW: usize = WINDOW;
/// Smallest block size accepted in a peer's signature. Smaller blocks would make a signature (and
/// the sender's index) huge for little gain.
pub const MIN_BLOCK: u32 = 1 << 10;
/// Largest block size accepted in a peer's signature, and the largest [`block_size_for`] picks.
pub const MAX_BLOCK: u32 = 1 << 20;
/// Strong-hash bytes per block in the signatures we build. 8 bytes of MD4 on top of the 32-bit
/// rolling CRC make accidental mismatches vanishingly rare; BLAKE3 catches the rest.
pub const CRYPTO_HASH_SIZE: u32 = 8;
/// Most blocks accepted in a peer's signature. The sender's index costs about 66 B per block, so
/// this caps it at about 132 MiB whatever a hostile peer sends; [`block_size_for`] stays at or
/// under 1 Mi blocks for files up to 1 TiB.
pub const MAX_SIGNATURE_BLOCKS: u64 = 2 << 20;
/// Largest serialized signature accepted from a peer.
pub const MAX_SIGNATURE_LEN: usize = SIG_HEADER + (MAX_SIGNATURE_BLOCKS as usize) * (4 + 16);

const MD4_MAGIC: u32 = 0x7273_0136;
const DELTA_MAGIC: u32 = 0x7273_0236;
const SIG_HEADER: usize = 12;
const MIN_HASH_SIZE: u32 = 4;
const MAX_HASH_SIZE: u32 = 16;
/// Bytes read from the basis per `read_at` when serving a COPY.
const COPY_PIECE: usize = 1 << 20;
/// Granularity of hole detection: a whole, aligned block of zeros becomes `write_zeros`. 4 KiB is
/// the page and filesystem block size nearly everywhere.
const ZERO_BLOCK: usize = 4096;
/// Share of literal bytes in the first delta window at or above which the rest of the file goes
/// literally (see [`LiteralReason::DeltaDidNotPay`]).
const LITERAL_SHARE_PERCENT: u64 = 90;

/// Block size for a basis of `len` bytes: `clamp(next_pow2(ceil(len / 1 Mi)), 4 KiB, 1 MiB)`.
///
/// Why: the signature costs 12 B and the sender's index about 66 B per block, so the block count
/// is held near 1 Mi (≈ 12 MiB signature + ≈ 66 MiB index) for files up to 1 TiB, while small
/// files keep 4 KiB blocks, which match scattered page-sized writes (databases) tightly.
pub fn block_size_for(len: u64) -> u32 {
    let per_block = len.div_ceil(1 << 20).max(1).next_power_of_two();
    per_block.clamp(4 << 10, u64::from(MAX_BLOCK)) as u32
}

/// Why the delta engine refused input or could not finish. Every variant that a peer can cause
/// means "this transfer is bad": the caller drops the staged file and asks for it literally.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("signature of {len} bytes is shorter than its 12-byte header")]
    BadSignatureHeader { len: usize },
    #[error("signature magic {magic:#010x} is not the MD4 signature magic {MD4_MAGIC:#010x}")]
    BadSignatureMagic { magic: u32 },
    #[error("signature block size {block_size} is outside [{min}, {max}]")]
    BlockSizeOutOfRange { block_size: u32, min: u32, max: u32 },
    #[error("signature hash size {hash_size} is outside [{min}, {max}]")]
    HashSizeOutOfRange { hash_size: u32, min: u32, max: u32 },
    #[error("signature body of {body_len} bytes is not a whole number of {entry_len}-byte entries")]
    SignatureBodyMisaligned { body_len: usize, entry_len: usize },
    #[error("signature of {len} bytes is larger than the limit of {max}")]
    SignatureTooLarge { len: usize, max: usize },
    #[error("signature has {blocks} blocks, more than the limit of {max}")]
    TooManyBlocks { blocks: u64, max: u64 },
    #[error("window of {len} bytes is larger than the limit of {max}")]
    WindowTooLarge { len: u64, max: u64 },
    #[error("chunk payload of {len} bytes is larger than the limit of {max}")]
    ChunkTooLarge { len: u64, max: u64 },
    #[error("delta of one window is {len} bytes, more than the limit of {max} for its output")]
    DeltaTooLarge { len: u64, max: u64 },
    #[error("delta magic {magic:#010x} is not the librsync delta magic {DELTA_MAGIC:#010x}")]
    BadDeltaMagic { magic: u32 },
    #[error("unknown delta opcode {op:#04x}")]
    UnknownOp { op: u8 },
    #[error("delta ended in the middle of {reading}")]
    Truncated { reading: &'static str },
    #[error("{extra} bytes after the delta's END")]
    TrailingDelta { extra: usize },
    #[error("COPY of {len} bytes at {offset} is outside the basis of {basis_len} bytes")]
    CopyOutOfBasis {
        offset: u64,
        len: u64,
        basis_len: u64,
    },
    #[error("COPY of {len} bytes at {offset}, but there is no basis file")]
    CopyWithoutBasis { offset: u64, len: u64 },
    #[error("COPY of zero bytes")]
    EmptyCopy,
    #[error("{what} would write up to byte {wanted}, past the limit of {max}")]
    OutputTooLong {
        what: &'static str,
        wanted: u64,
        max: u64,
    },
    #[error("delta window declared {declared} bytes of output but produced {actual}")]
    WindowLengthMismatch { declared: u64, actual: u64 },
    #[error("{0}")]
    UnexpectedChunk(&'static str),
    #[error("decompressed data does not fit in {max} bytes or is corrupt: {source}")]
    Decompress { max: u64, source: io::Error },
    #[error("literal chunk declared {declared} bytes but carries {actual}")]
    LiteralLengthMismatch { declared: u64, actual: u64 },
    #[error("file is {actual} bytes, expected {expected}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("content hash {actual} does not match the declared {expected}")]
    HashMismatch { expected: Hash, actual: Hash },
    #[error("fast_rsync diff failed: {0}")]
    Diff(#[from] fast_rsync::DiffError),
    #[error("delta does not apply: {0}")]
    Apply(#[from] fast_rsync::ApplyError),
    #[error("basis or output I/O failed: {0}")]
    Io(#[from] io::Error),
}

// ---------------------------------------------------------------------------------------------
// Signatures

/// Builds the signature of a basis file from chunks, so the target never holds the whole file.
///
/// The result is byte-identical to `fast_rsync::Signature::calculate` over the whole file with
/// the same options, so a source can hand it straight to `fast_rsync`. Chunks of any size are
/// accepted; a block straddling two chunks is carried over (at most one block is buffered), but
/// chunks that are multiples of the block size avoid that copy.
#[derive(Debug)]
pub struct SignatureBuilder {
    options: SignatureOptions,
    signature: Vec<u8>,
    partial: Vec<u8>,
}

impl SignatureBuilder {
    /// A builder for a basis of `basis_len` bytes, with [`block_size_for`] that length.
    pub fn new(basis_len: u64) -> Self {
        let block_size = block_size_for(basis_len);
        let blocks = basis_len.div_ceil(u64::from(block_size));
        Self::build(block_size, blocks)
    }

    /// A builder with an explicit block size (for tests and tuning); it must be within
    /// [`MIN_BLOCK`]..=[`MAX_BLOCK`] so that peers accept the result.
    pub fn with_block_size(block_size: u32) -> Result<Self, DeltaError> {
        check_block_size(block_size)?;
        Ok(Self::build(block_size, 0))
    }

    fn build(block_size: u32, blocks: u64) -> Self {
        let options = SignatureOptions {
            block_size,
            crypto_hash_size: CRYPTO_HASH_SIZE,
        };
        let entry = 4 + CRYPTO_HASH_SIZE as usize;
        // The capacity is only a hint; cap it so a wrong basis_len cannot reserve gigabytes.
        let cap = SIG_HEADER + (blocks.min(MAX_SIGNATURE_BLOCKS) as usize) * entry;
        let mut signature = Vec::with_capacity(cap);
        signature.extend_from_slice(&MD4_MAGIC.to_be_bytes());
        signature.extend_from_slice(&block_size.to_be_bytes());
        signature.extend_from_slice(&CRYPTO_HASH_SIZE.to_be_bytes());
        Self {
            options,
            signature,
            partial: Vec::new(),
        }
    }

    /// The block size written in the signature header.
    pub fn block_size(&self) -> u32 {
        self.options.block_size
    }

    /// Feeds the next bytes of the basis.
    pub fn update(&mut self, mut chunk: &[u8]) {
        let bs = self.options.block_size as usize;
        if !self.partial.is_empty() {
            let take = (bs - self.partial.len()).min(chunk.len());
            self.partial.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.partial.len() < bs {
                return;
            }
            let block = std::mem::take(&mut self.partial);
            self.append(&block);
            self.partial = block;
            self.partial.clear();
        }
        let whole = chunk.len() / bs * bs;
        if whole > 0 {
            self.append(&chunk[..whole]);
        }
        self.partial.extend_from_slice(&chunk[whole..]);
    }

    fn append(&mut self, blocks: &[u8]) {
        let sig = Signature::calculate(blocks, self.options);
        self.signature
            .extend_from_slice(&sig.serialized()[SIG_HEADER..]);
    }

    /// The serialized signature, ready to send.
    pub fn finish(mut self) -> Vec<u8> {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.append(&last);
        }
        self.signature
    }
}

fn check_block_size(block_size: u32) -> Result<(), DeltaError> {
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(DeltaError::BlockSizeOutOfRange {
            block_size,
            min: MIN_BLOCK,
            max: MAX_BLOCK,
        });
    }
    Ok(())
}

/// A peer's signature whose header and size were checked before `fast_rsync` saw it.
///
/// Why: `fast_rsync` panics on a block size of 0 in `diff` and would index gigabytes for a
/// signature with billions of entries; a hostile or broken target could send either. Only this
/// type can build a [`FileSender`] in delta mode.
#[derive(Debug)]
pub struct CheckedSignature {
    signature: Signature,
    block_size: u32,
    blocks: u64,
}

impl CheckedSignature {
    /// Checks magic, block size, hash size, body alignment and total size, then hands the bytes
    /// to `fast_rsync`.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, DeltaError> {
        if bytes.len() > MAX_SIGNATURE_LEN {
            return Err(DeltaError::SignatureTooLarge {
                len: bytes.len(),
                max: MAX_SIGNATURE_LEN,
            });
        }
        let Some((header, body)) = bytes.split_first_chunk::<SIG_HEADER>() else {
            return Err(DeltaError::BadSignatureHeader { len: bytes.len() });
        };
        let word =
            |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (magic, block_size, hash_size) = (word(0), word(4), word(8));
        if magic != MD4_MAGIC {
            return Err(DeltaError::BadSignatureMagic { magic });
        }
        check_block_size(block_size)?;
        if !(MIN_HASH_SIZE..=MAX_HASH_SIZE).contains(&hash_size) {
            return Err(DeltaError::HashSizeOutOfRange {
                hash_size,
                min: MIN_HASH_SIZE,
                max: MAX_HASH_SIZE,
            });
        }
        let entry_len = 4 + hash_size as usize;
        if body.len() % entry_len != 0 {
            return Err(DeltaError::SignatureBodyMisaligned {
                body_len: body.len(),
                entry_len,
            });
        }
        let blocks = (body.len() / entry_len) as u64;
        if blocks > MAX_SIGNATURE_BLOCKS {
            return Err(DeltaError::TooManyBlocks {
                blocks,
                max: MAX_SIGNATURE_BLOCKS,
            });
        }
        // Everything fast_rsync checks was checked above, so this cannot fail; map it anyway
        // rather than trust that two validators stay in step.
        let signature =
            Signature::deserialize(bytes).map_err(|_| DeltaError::BadSignatureMagic { magic })?;
        Ok(Self {
            signature,
            block_size,
            blocks,
        })
    }

    /// Block size of the basis' signature.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of blocks described.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The basis is at most this long (its last block may be short). Useful for sanity checks
    /// against the length the target announced.
    pub fn basis_len_upper_bound(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

// ---------------------------------------------------------------------------------------------
// The wire chunk

/// One piece of a file transfer, sent in order. Plain enum: bincode is not self-describing.
///
/// Every length is bounded: `bytes` by [`MAX_DATA_CHUNK`], a window's output by [`MAX_WINDOW`],
/// a window's delta by a bound derived from its output length, so a receiver never allocates
/// more than a few windows' worth whatever a peer claims.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    /// Part of one window's librsync-format delta; parts are concatenated until `last`, then
    /// decompressed (if `zstd`) and applied. `out_len` is the window's output length, the same
    /// on every part: it bounds decompression and is checked against what the delta produces.
    Delta {
        zstd: bool,
        last: bool,
        out_len: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Literal file data for the next `out_len` bytes of output (after zstd decompression if
    /// `zstd`); each chunk is self-contained.
    Literal {
        zstd: bool,
        out_len: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

impl Chunk {
    /// Whether the chunk's bytes are zstd-compressed.
    pub fn is_zstd(&self) -> bool {
        match self {
            Chunk::Delta { zstd, .. } | Chunk::Literal { zstd, .. } => *zstd,
        }
    }

    /// Bytes of payload carried (for progress and bandwidth accounting).
    pub fn wire_len(&self) -> usize {
        match self {
            Chunk::Delta { bytes, .. } | Chunk::Literal { bytes, .. } => bytes.len(),
        }
    }
}

impl fmt::Debug for Chunk {
    // Payloads are megabytes; print their sizes, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Chunk::Delta {
                zstd,
                last,
                out_len,
                bytes,
            } => write!(
                f,
                "Delta {{ zstd: {zstd}, last: {last}, out_len: {out_len}, bytes: {} B }}",
                bytes.len()
            ),
            Chunk::Literal {
                zstd,
                out_len,
                bytes,
            } => write!(
                f,
                "Literal {{ zstd: {zstd}, out_len: {out_len}, bytes: {} B }}",
                bytes.len()
            ),
        }
    }
}

/// Largest delta a window of `out_len` output bytes can legitimately need.
///
/// fast_rsync emits COPYs of whole blocks (≥ [`MIN_BLOCK`]) and at most one LITERAL between two
/// COPYs, so a window has at most `out_len / 1024` COPYs (≤ 17 B each) and one more LITERAL
/// (≤ 9 B header each) than that: `out_len + 26 · out_len / 1024 + 14` < this bound.
fn max_delta_len(out_len: u64) -> u64 {
    out_len + out_len / 32 + 64
}

// ---------------------------------------------------------------------------------------------
// Delta opcodes

enum Op<'a> {
    End,
    Literal(&'a [u8]),
    Copy { offset: u64, len: u64 },
}

fn take<'a>(buf: &mut &'a [u8], n: usize, reading: &'static str) -> Result<&'a [u8], DeltaError> {
    if buf.len() < n {
        return Err(DeltaError::Truncated { reading });
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn take_be(buf: &mut &[u8], n: usize, reading: &'static str) -> Result<u64, DeltaError> {
    let bytes = take(buf, n, reading)?;
    Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

fn check_delta_magic(buf: &mut &[u8]) -> Result<(), DeltaError> {
    let magic = take_be(buf, 4, "the magic")? as u32;
    if magic != DELTA_MAGIC {
        return Err(DeltaError::BadDeltaMagic { magic });
    }
    Ok(())
}

/// Reads one librsync opcode (as written by fast_rsync 0.2.0's `diff.rs`): 0x00 END;
/// 0x01–0x40 LITERAL of 1–64 bytes; 0x41–0x44 LITERAL with a 1/2/4/8-byte BE length;
/// 0x45–0x54 COPY with (offset, length) in 1/2/4/8-byte BE size classes, `4·class(offset) +
/// class(len)`.
fn read_op<'a>(buf: &mut &'a [u8]) -> Result<Op<'a>, DeltaError> {
    let op = take(buf, 1, "an opcode")?[0];
    match op {
        0x00 => Ok(Op::End),
        0x01..=0x40 => Ok(Op::Literal(take(buf, usize::from(op), "a literal")?)),
        0x41..=0x44 => {
            let len = take_be(buf, 1 << (op - 0x41), "a literal length")?;
            // A length beyond the buffer is truncation, whatever its size; no cast can overflow.
            if len > buf.len() as u64 {
                return Err(DeltaError::Truncated {
                    reading: "a literal",
                });
            }
            Ok(Op::Literal(take(buf, len as usize, "a literal")?))
        }
        0x45..=0x54 => {
            let mode = op - 0x45;
            let offset = take_be(buf, 1 << (mode / 4), "a copy offset")?;
            let len = take_be(buf, 1 << (mode % 4), "a copy length")?;
            Ok(Op::Copy { offset, len })
        }
        _ => Err(DeltaError::UnknownOp { op }),
    }
}

/// Applies a whole in-memory delta to a whole in-memory basis with `fast_rsync::apply_limited`,
/// refusing output beyond `limit` bytes. For small files where windows are pointless, and as an
/// independent cross-check of [`FileReceiver`] in tests.
pub fn apply_in_memory(basis: &[u8], delta: &[u8], limit: usize) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    fast_rsync::apply_limited(basis, delta, &mut out, limit)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Sender

/// Data at least this long is compressed only when a [`COMPRESS_SAMPLE`]-byte sample from its
/// middle shrinks by 1/[`COMPRESS_MIN_GAIN`] or more: compressed media, encrypted files and most
/// database pages then cost a 1/64 of their size in zstd instead of all of it. Shorter data (a
/// small file, the delta of a small change) is simply compressed.
pub const COMPRESS_PROBE_FROM: usize = 256 << 10;
/// Size of the sample that decides for longer data (see [`COMPRESS_PROBE_FROM`]).
pub const COMPRESS_SAMPLE: usize = 64 << 10;
/// A sample must shrink by at least 1/this (3 %) for its data to be compressed.
pub const COMPRESS_MIN_GAIN: usize = 32;

/// Sender settings. Defaults: [`WINDOW`] and zstd level 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderConfig {
    /// Bytes per window the driver reads and feeds to [`FileSender::send_window`]; at most
    /// [`MAX_WINDOW`]. A parameter so tests can cover multi-window files cheaply.
    pub window: usize,
    /// zstd level for deltas and literal data, or `None` to send raw (per-stack setting; useless
    /// for data that is already compressed).
    pub zstd_level: Option<i32>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            window: WINDOW,
            zstd_level: Some(3),
        }
    }
}

/// How a [`FileSender`] turns windows into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendMode {
    /// Diff each window against the target's signature.
    Delta,
    /// Send file data as is (zstd-compressed where that helps).
    Literal(LiteralReason),
}

/// Why a file goes literally; for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiteralReason {
    /// The target has no basis for this file.
    NoBasis,
    /// The file is shorter than one block of the basis' signature, so nothing can match.
    TooSmall,
    /// The first window's delta was at least 90% literal: the files are unrelated (or the data
    /// shifted in a way blocks do not catch), and diffing unrelated data runs at ≈ 65 MiB/s,
    /// slower than a LAN link, so the rest of the file is not diffed.
    DeltaDidNotPay,
}

/// Bytes of the new file sent as literal data vs. rebuilt from the basis (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Bytes sent as literal data (inside deltas or as literal chunks).
    pub literal: u64,
    /// Bytes the receiver copies from its basis.
    pub matched: u64,
}

/// What the source declares about the file it sent: the BLAKE3 and length of exactly the bytes
/// it diffed (a live file that changes mid-read is still described truthfully).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// BLAKE3 of every byte passed to `send_window`, in order.
    pub hash: Hash,
    /// Total bytes passed to `send_window`.
    pub len: u64,
    /// Literal vs. matched bytes.
    pub stats: SendStats,
    /// The mode the file ended in.
    pub mode: SendMode,
}

/// Source side of one file transfer: windows in, [`Chunk`]s out, hash at the end.
///
/// The driver reads the file in windows of `config.window` bytes (only the last may be
/// shorter) and sends each returned chunk in order. One type serves both modes so the driver's
/// loop is the same whether a basis exists or not; [`FileSender::mode`] says which is in use.
pub struct FileSender<'a> {
    index: Option<IndexedSignature<'a>>,
    block_size: u32,
    mode: SendMode,
    config: SenderConfig,
    /// A context for `config.zstd_level` from [`pool`], given back when the sender is dropped.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    hasher: blake3::Hasher,
    len: u64,
    windows: u64,
    stats: SendStats,
}

impl fmt::Debug for FileSender<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSender")
            .field("mode", &self.mode)
            .field("block_size", &self.block_size)
            .field("config", &self.config)
            .field("len", &self.len)
            .field("windows", &self.windows)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for FileSender<'_> {
    fn drop(&mut self) {
        if let (Some(level), Some(compressor)) = (self.config.zstd_level, self.compressor.take()) {
            pool::give_back(level, compressor);
        }
    }
}

/// zstd compression contexts kept between files. Making one costs more than compressing a
/// small file with it (`ZSTD_createCCtx` and its table setup were 15 % of the source's CPU on
/// a first copy of 20,000 small files), and a context is fully reset by every
/// `compress_to_buffer`, so one file's data never influences the next one's output.
mod pool {
    use std::sync::Mutex;

    /// Contexts kept: enough for the files in flight at once, a few MiB each at level 3.
    const KEEP: usize = 16;

    type Ctx = zstd::bulk::Compressor<'static>;
    static POOL: Mutex<Vec<(i32, Ctx)>> = Mutex::new(Vec::new());

    /// A context for `level`, from the pool or new.
    pub(super) fn take(level: i32) -> std::io::Result<Ctx> {
        let reused = POOL.lock().ok().and_then(|mut pool| {
            let at = pool.iter().rposition(|(l, _)| *l == level)?;
            Some(pool.swap_remove(at).1)
        });
        match reused {
            Some(ctx) => Ok(ctx),
            None => Ctx::new(level),
        }
    }

    pub(super) fn give_back(level: i32, ctx: Ctx) {
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < KEEP
        {
            pool.push((level, ctx));
        }
    }
}

impl<'a> FileSender<'a> {
    /// A sender diffing against `signature`, or sending literally when there is none. The
    /// signature's index is built here, once per file (≈ 66 B per block).
    pub fn new(
        signature: Option<&'a CheckedSignature>,
        config: SenderConfig,
    ) -> Result<Self, DeltaError> {
        if config.window == 0 || config.window > MAX_WINDOW {
            return Err(DeltaError::WindowTooLarge {
                len: config.window as u64,
                max: MAX_WINDOW as u64,
            });
        }
        let compressor = match config.zstd_level {
            Some(level) => Some(pool::take(level)?),
            None => None,
        };
        let (index, block_size, mode) = match signature {
            Some(sig) => (Some(sig.signature.index()), sig.block_size, SendMode::Delta),
            None => (None, 0, SendMode::Literal(LiteralReason::NoBasis)),
        };
        Ok(Self {
            index,
            block_size,
            mode,
            config,
            compressor,
            hasher: blake3::Hasher::new(),
            len: 0,
            windows: 0,
            stats: SendStats::default(),
        })
    }

    /// The current mode; may switch from `Delta` to `Literal` after the first window.
    pub fn mode(&self) -> SendMode {
        self.mode
    }

    /// Literal vs. matched bytes so far.
    pub fn stats(&self) -> SendStats {
        self.stats
    }

    /// Turns the next window of the file into chunks, hashing exactly these bytes.
    pub fn send_window(&mut self, window: &[u8]) -> Result<Vec<Chunk>, DeltaError> {
        if window.len() > self.config.window {
            return Err(DeltaError::WindowTooLarge {
                len: window.len() as u64,
                max: self.config.window as u64,
            });
        }
        if window.is_empty() {
            return Ok(Vec::new());
        }
        self.hasher.update(window);
        self.len += window.len() as u64;
        let first = self.windows == 0;
        self.windows += 1;
        if first && self.mode == SendMode::Delta && window.len() < self.block_size as usize {
            self.mode = SendMode::Literal(LiteralReason::TooSmall);
        }
        match (self.mode, &self.index) {
            (SendMode::Delta, Some(index)) => {
                let mut delta = Vec::with_capacity(window.len() / 16 + 64);
                fast_rsync::diff(index, window, &mut delta)?;
                let matched = matched_bytes(&delta)?;
                let literal = window.len() as u64 - matched;
                self.stats.matched += matched;
                self.stats.literal += literal;
                if first && literal * 100 >= window.len() as u64 * LITERAL_SHARE_PERCENT {
                    // This window's delta is already paid for and is valid; only later windows
                    // skip the diff.
                    self.mode = SendMode::Literal(LiteralReason::DeltaDidNotPay);
                }
                Ok(self.delta_chunks(delta, window.len()))
            }
            _ => {
                self.stats.literal += window.len() as u64;
                Ok(self.literal_chunks(window))
            }
        }
    }

    fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let compressor = self.compressor.as_mut()?;
        if data.len() >= COMPRESS_PROBE_FROM {
            // zstd spends as long failing on incompressible data as it does succeeding (level 3
            // ran at ≈ 515 MiB/s on noise, bench/README.md), so a sample decides first.
            let at = (data.len() - COMPRESS_SAMPLE) / 2;
            let sample = &data[at..at + COMPRESS_SAMPLE];
            let mut out = Vec::with_capacity(COMPRESS_SAMPLE - COMPRESS_SAMPLE / COMPRESS_MIN_GAIN);
            if compressor.compress_to_buffer(sample, &mut out).is_err() {
                return None;
            }
        }
        // Capacity one byte short of the input: zstd fails with "destination too small" exactly
        // when compression would not pay, so any error here means "send raw"; nothing is lost.
        let mut out = Vec::with_capacity(data.len().saturating_sub(1));
        match compressor.compress_to_buffer(data, &mut out) {
            Ok(_) if out.len() < data.len() => Some(out),
            _ => None,
        }
    }

    fn delta_chunks(&mut self, delta: Vec<u8>, out_len: usize) -> Vec<Chunk> {
        let (zstd, bytes) = match self.compress(&delta) {
            Some(c) => (true, c),
            None => (false, delta),
        };
        // out_len ≤ config.window ≤ MAX_WINDOW < 4 GiB, checked in new() and send_window().
        let out_len = out_len as u32;
        if bytes.len() <= MAX_DATA_CHUNK {
            return vec![Chunk::Delta {
                zstd,
                last: true,
                out_len,
                bytes,
            }];
        }
        let parts = bytes.len().div_ceil(MAX_DATA_CHUNK);
        bytes
            .chunks(MAX_DATA_CHUNK)
            .enumerate()
            .map(|(i, part)| Chunk::Delta {
                zstd,
                last: i + 1 == parts,
                out_len,
                bytes: part.to_vec(),
            })
            .collect()
    }

    fn literal_chunks(&mut self, window: &[u8]) -> Vec<Chunk> {
        window
            .chunks(MAX_DATA_CHUNK)
            .map(|piece| {
                // piece.len() ≤ MAX_DATA_CHUNK = 4 MiB fits in u32.
                let out_len = piece.len() as u32;
                match self.compress(piece) {
                    Some(bytes) => Chunk::Literal {
                        zstd: true,
                        out_len,
                        bytes,
                    },
                    None => Chunk::Literal {
                        zstd: false,
                        out_len,
                        bytes: piece.to_vec(),
                    },
                }
            })
            .collect()
    }

    /// The hash and length to declare to the receiver, with the stats.
    pub fn finish(self) -> Sent {
        Sent {
            hash: self.hasher.finalize().into(),
            len: self.len,
            stats: self.stats,
            mode: self.mode,
        }
    }
}

/// Output bytes produced by COPYs in a delta we just made (for [`SendStats`]).
fn matched_bytes(delta: &[u8]) -> Result<u64, DeltaError> {
    let mut buf = delta;
    check_delta_magic(&mut buf)?;
    let mut matched = 0;
    loop {
        match read_op(&mut buf)? {
            Op::End => return Ok(matched),
            Op::Literal(_) => {}
            Op::Copy { len, .. } => matched += len,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver

/// Random access to the target's basis file, supplied by the driver (`pread` on the old file).
pub trait Basis {
    /// Fills `buf` from `offset`; a short read is an error.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Where the rebuilt file goes, supplied by the driver (a temp file in staging).
pub trait Sink {
    /// Appends `data`.
    fn write(&mut self, data: &[u8]) -> io::Result<()>;
    /// Appends `len` zero bytes, ideally as a hole (seek forward). The driver must make sure
    /// the file ends up with its full length even if it ends in a hole (`set_len` at the end).
    fn write_zeros(&mut self, len: u64) -> io::Result<()>;
}

/// Proof that a rebuilt file has the declared BLAKE3 and length; only [`FileReceiver::finish`]
/// makes one, so staging code can demand it before a rename.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    hash: Hash,
    len: u64,
}

impl Verified {
    /// The BLAKE3 that matched the declared one.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The file's length, equal to the expected length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the verified file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A delta window whose parts are still arriving.
#[derive(Debug)]
struct OpenWindow {
    zstd: bool,
    out_len: u64,
    max_len: u64,
}

/// Target side of one file transfer: chunks in, file data out through a [`Sink`], verified at
/// the end. Buffers at most one window's delta (plus its decompressed form and one COPY piece),
/// whatever the file size; every length a peer sends is checked before it is used.
pub struct FileReceiver {
    basis_len: Option<u64>,
    out: Output,
    open: Option<OpenWindow>,
    parts: Vec<u8>,
    scratch: Vec<u8>,
    copy_buf: Vec<u8>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for FileReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileReceiver")
            .field("basis_len", &self.basis_len)
            .field("out", &self.out)
            .field("open", &self.open)
            .field("parts", &self.parts.len())
            .finish_non_exhaustive()
    }
}

impl FileReceiver {
    /// A receiver for a file of `expected_len` bytes (from the manifest), rebuilt against a
    /// basis of `basis_len` bytes if there is one.
    pub fn new(basis_len: Option<u64>, expected_len: u64) -> Self {
        Self {
            basis_len,
            out: Output::new(expected_len),
            open: None,
            parts: Vec::new(),
            scratch: Vec::new(),
            copy_buf: Vec::new(),
            decompressor: None,
        }
    }

    /// Bytes of output written so far (for progress).
    pub fn written(&self) -> u64 {
        self.out.written
    }

    /// Handles the next chunk, writing whatever it completes to `sink`.
    pub fn handle_chunk(
        &mut self,
        chunk: Chunk,
        basis: &mut impl Basis,
        sink: &mut impl Sink,
    ) -> Result<(), DeltaError> {
        if chunk.wire_len() > MAX_DATA_CHUNK {
            return Err(DeltaError::ChunkTooLarge {
                len: chunk.wire_len() as u64,
                max: MAX_DATA_CHUNK as u64,
            });
        }
        match chunk {
            Chunk::Literal {
                zstd,
                out_len,
                bytes,
            } => {
                if self.open.is_some() {
                    return Err(DeltaError::UnexpectedChunk(
                        "literal chunk inside an unfinished delta window",
                    ));
                }
                let out_len = u64::from(out_len);
                if out_len > MAX_DATA_CHUNK as u64 {
                    return Err(DeltaError::ChunkTooLarge {
                        len: out_len,
                        max: MAX_DATA_CHUNK as u64,
                    });
                }
                self.out.reserve(out_len, "literal chunk")?;
                if zstd {
                    let mut data = std::mem::take(&mut self.scratch);
                    let res = self.decompress(&bytes, out_len, &mut data);
                    let res = res.and_then(|()| {
                        check_literal_len(out_len, data.len())?;
                        Ok(self.out.emit(&data, sink)?)
                    });
                    self.scratch = data;
                    res
                } else {
                    check_literal_len(out_len, bytes.len())?;
                    Ok(self.out.emit(&bytes, sink)?)
                }
            }
            Chunk::Delta {
                zstd,
                last,
                out_len,
                bytes,
            } => {
                let out_len = u64::from(out_len);
                let open = self.open.as_ref().map(|o| (o.zstd, o.out_len, o.max_len));
                let max_len = match open {
                    None => {
                        if out_len > MAX_WINDOW as u64 {
                            return Err(DeltaError::WindowTooLarge {
                                len: out_len,
                                max: MAX_WINDOW as u64,
                            });
                        }
                        self.out.reserve(out_len, "delta window")?;
                        self.parts.clear();
                        let max_len = max_delta_len(out_len);
                        self.open = Some(OpenWindow {
                            zstd,
                            out_len,
                            max_len,
                        });
                        max_len
                    }
                    Some((open_zstd, open_len, max_len)) => {
                        if open_zstd != zstd || open_len != out_len {
                            return Err(DeltaError::UnexpectedChunk(
                                "delta part disagrees with its window's first part",
                            ));
                        }
                        max_len
                    }
                };
                let len = (self.parts.len() + bytes.len()) as u64;
                if len > max_len {
                    return Err(DeltaError::DeltaTooLarge { len, max: max_len });
                }
                if self.parts.is_empty() && last {
                    // The common case, one part: no copy into the parts buffer.
                    self.parts = bytes;
                } else {
                    self.parts.extend_from_slice(&bytes);
                }
                if last {
                    self.finish_window(basis, sink)
                } else {
                    Ok(())
                }
            }
        }
    }

    fn decompress(&mut self, src: &[u8], max: u64, dst: &mut Vec<u8>) -> Result<(), DeltaError> {
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            none => none.insert(zstd::bulk::Decompressor::new()?),
        };
        dst.clear();
        // Capacity is what bounds zstd's output: a bomb fails with "destination too small"
        // instead of growing the buffer. max ≤ max_delta_len(MAX_WINDOW) ≈ 16.5 MiB.
        dst.reserve(max as usize);
        decompressor
            .decompress_to_buffer(src, dst)
            .map_err(|source| DeltaError::Decompress { max, source })?;
        Ok(())
    }

    fn finish_window(
        &mut self,
        basis: &mut impl Basis,
        sink: &mut impl Sink,
    ) -> Result<(), DeltaError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let parts = std::mem::take(&mut self.parts);
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = if open.zstd {
            self.decompress(&parts, open.max_len, &mut scratch)
                .and_then(|()| self.apply_window(&scratch, open.out_len, basis, sink))
        } else {
            self.apply_window(&parts, open.out_len, basis, sink)
        };
        self.parts = parts;
        self.scratch = scratch;
        res
    }

    fn apply_window(
        &mut self,
        delta: &[u8],
        out_len: u64,
        basis: &mut impl Basis,
        sink: &mut impl Sink,
    ) -> Result<(), DeltaError> {
        let mut buf = delta;
        check_delta_magic(&mut buf)?;
        let mut produced = 0u64;
        let mut advance = |n: u64, what: &'static str| {
            let wanted = produced + n;
            if wanted > out_len {
                return Err(DeltaError::OutputTooLong {
                    what,
                    wanted,
                    max: out_len,
                });
            }
            produced = wanted;
            Ok(())
        };
        loop {
            match read_op(&mut buf)? {
                Op::End => break,
                Op::Literal(data) => {
                    advance(data.len() as u64, "delta literal")?;
                    self.out.emit(data, sink)?;
                }
                Op::Copy { offset, len } => {
                    if len == 0 {
                        return Err(DeltaError::EmptyCopy);
                    }
                    let Some(basis_len) = self.basis_len else {
                        return Err(DeltaError::CopyWithoutBasis { offset, len });
                    };
                    if offset.checked_add(len).is_none_or(|end| end > basis_len) {
                        return Err(DeltaError::CopyOutOfBasis {
                            offset,
                            len,
                            basis_len,
                        });
                    }
                    advance(len, "delta copy")?;
                    self.copy(offset, len, basis, sink)?;
                }
            }
        }
        if !buf.is_empty() {
            return Err(DeltaError::TrailingDelta { extra: buf.len() });
        }
        if produced != out_len {
            return Err(DeltaError::WindowLengthMismatch {
                declared: out_len,
                actual: produced,
            });
        }
        Ok(())
    }

    fn copy(
        &mut self,
        offset: u64,
        len: u64,
        basis: &mut impl Basis,
        sink: &mut impl Sink,
    ) -> Result<(), DeltaError> {
        if self.copy_buf.is_empty() {
            self.copy_buf = vec![0; COPY_PIECE];
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(COPY_PIECE as u64) as usize;
            let piece = &mut self.copy_buf[..n];
            basis.read_at(offset + done, piece)?;
            self.out.emit(piece, sink)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Ends the transfer: flushes pending zeros, then checks the length against `expected_len`
    /// and the BLAKE3 of everything written against `declared`. An error means the staged file
    /// must be discarded (and, for a delta, the file re-requested literally).
    pub fn finish(mut self, sink: &mut impl Sink, declared: Hash) -> Result<Verified, DeltaError> {
        if self.open.is_some() {
            return Err(DeltaError::Truncated {
                reading: "a delta window whose last part never came",
            });
        }
        let (hash, len) = self.out.finish(sink)?;
        if len != self.out_expected() {
            return Err(DeltaError::LengthMismatch {
                expected: self.out_expected(),
                actual: len,
            });
        }
        if hash != declared {
            return Err(DeltaError::HashMismatch {
                expected: declared,
                actual: hash,
            });
        }
        Ok(Verified { hash, len })
    }

    fn out_expected(&self) -> u64 {
        self.out.expected_len
    }
}

fn check_literal_len(declared: u64, actual: usize) -> Result<(), DeltaError> {
    if declared != actual as u64 {
        return Err(DeltaError::LiteralLengthMismatch {
            declared,
            actual: actual as u64,
        });
    }
    Ok(())
}

/// The receiver's output: hashes every byte, enforces the expected length, and turns whole,
/// aligned 4 KiB blocks of zeros into `write_zeros` so sparse files stay sparse. Holds back at
/// most one partial block to judge blocks whole.
#[derive(Debug)]
struct Output {
    hasher: blake3::Hasher,
    expected_len: u64,
    /// Bytes accepted (hashed) so far, including `carry` and `pending_zeros`.
    written: u64,
    /// Output bytes promised by `reserve` (a delta window's full length once it opens).
    reserved: u64,
    carry: Vec<u8>,
    pending_zeros: u64,
}

impl Output {
    fn new(expected_len: u64) -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            expected_len,
            written: 0,
            reserved: 0,
            carry: Vec::with_capacity(ZERO_BLOCK),
            pending_zeros: 0,
        }
    }

    /// Checks, before anything is decoded, that `n` more bytes keep the file within its length.
    fn reserve(&mut self, n: u64, what: &'static str) -> Result<(), DeltaError> {
        let wanted = self.reserved + n;
        if wanted > self.expected_len {
            return Err(DeltaError::OutputTooLong {
                what,
                wanted,
                max: self.expected_len,
            });
        }
        self.reserved = wanted;
        Ok(())
    }

    fn emit(&mut self, mut data: &[u8], sink: &mut impl Sink) -> io::Result<()> {
        self.hasher.update(data);
        self.written += data.len() as u64;
        if !self.carry.is_empty() {
            let take = (ZERO_BLOCK - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < ZERO_BLOCK {
                return Ok(());
            }
            let block = std::mem::take(&mut self.carry);
            let res = self.blocks(&block, sink);
            self.carry = block;
            self.carry.clear();
            res?;
        }
        let whole = data.len() / ZERO_BLOCK * ZERO_BLOCK;
        self.blocks(&data[..whole], sink)?;
        self.carry.extend_from_slice(&data[whole..]);
        Ok(())
    }

    /// `data` is whole blocks starting at a block-aligned file offset.
    fn blocks(&mut self, data: &[u8], sink: &mut impl Sink) -> io::Result<()> {
        let mut run_start = None;
        for (i, block) in data.chunks_exact(ZERO_BLOCK).enumerate() {
            let at = i * ZERO_BLOCK;
            if is_zero(block) {
                if let Some(start) = run_start.take() {
                    self.flush_zeros(sink)?;
                    sink.write(&data[start..at])?;
                }
                self.pending_zeros += ZERO_BLOCK as u64;
            } else if run_start.is_none() {
                run_start = Some(at);
            }
        }
        if let Some(start) = run_start {
            self.flush_zeros(sink)?;
            sink.write(&data[start..])?;
        }
        Ok(())
    }

    fn flush_zeros(&mut self, sink: &mut impl Sink) -> io::Result<()> {
        if self.pending_zeros > 0 {
            sink.write_zeros(self.pending_zeros)?;
            self.pending_zeros = 0;
        }
        Ok(())
    }

    fn finish(&mut self, sink: &mut impl Sink) -> io::Result<(Hash, u64)> {
        self.flush_zeros(sink)?;
        if !self.carry.is_empty() {
            sink.write(&self.carry)?;
            self.carry.clear();
        }
        Ok((self.hasher.finalize().into(), self.written))
    }
}

fn is_zero(block: &[u8]) -> bool {
    // The inner fold vectorises; the outer `all` stops at the first non-zero stretch, which for
    // real data is usually the first.
    block
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic test data: xorshift64* noise, or a small-alphabet text that zstd squeezes.
    fn fill(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
            if compressible {
                out.extend(
                    v.to_le_bytes()
                        .iter()
                        .map(|b| b"stack clone \n"[usize::from(b % 13)]),
                );
            } else {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.truncate(len);
        out
    }

    struct MemBasis<'a>(&'a [u8]);

    impl Basis for MemBasis<'_> {
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| self.0.get(start..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    /// Records output and hole calls; panics if anything is written past `limit`, which is the
    /// property "never output past expected_len".
    struct MemSink {
        out: Vec<u8>,
        zeros: Vec<(u64, u64)>,
        limit: u64,
    }

    impl MemSink {
        fn new(limit: u64) -> Self {
            Self {
                out: Vec::new(),
                zeros: Vec::new(),
                limit,
            }
        }
    }

    impl Sink for MemSink {
        fn write(&mut self, data: &[u8]) -> io::Result<()> {
            self.out.extend_from_slice(data);
            assert!(
                self.out.len() as u64 <= self.limit,
                "wrote past expected_len"
            );
            Ok(())
        }
        fn write_zeros(&mut self, len: u64) -> io::Result<()> {
            self.zeros.push((self.out.len() as u64, len));
            self.out.resize(self.out.len() + len as usize, 0);
            assert!(
                self.out.len() as u64 <= self.limit,
                "wrote zeros past expected_len"
            );
            Ok(())
        }
    }

    fn signature(basis: &[u8], block_size: Option<u32>, feed: usize) -> Vec<u8> {
        let mut b = match block_size {
            Some(bs) => SignatureBuilder::with_block_size(bs).unwrap(),
            None => SignatureBuilder::new(basis.len() as u64),
        };
        for c in basis.chunks(feed.max(1)) {
            b.update(c);
        }
        b.finish()
    }

    fn send(
        sig: Option<&CheckedSignature>,
        new: &[u8],
        window: usize,
        zstd_level: Option<i32>,
    ) -> (Vec<Chunk>, Sent) {
        let mut s = FileSender::new(sig, SenderConfig { window, zstd_level }).unwrap();
        let mut chunks = Vec::new();
        for w in new.chunks(window) {
            chunks.extend(s.send_window(w).unwrap());
        }
        (chunks, s.finish())
    }

    fn receive(
        basis: Option<&[u8]>,
        chunks: Vec<Chunk>,
        expected_len: u64,
        declared: Hash,
    ) -> (Result<Verified, DeltaError>, MemSink) {
        let mut sink = MemSink::new(expected_len);
        let mut rx = FileReceiver::new(basis.map(|b| b.len() as u64), expected_len);
        let mut mem = MemBasis(basis.unwrap_or_default());
        for c in chunks {
            if let Err(e) = rx.handle_chunk(c, &mut mem, &mut sink) {
                return (Err(e), sink);
            }
        }
        let res = rx.finish(&mut sink, declared);
        (res, sink)
    }

    fn round_trip(
        basis: Option<&[u8]>,
        new: &[u8],
        window: usize,
        zstd: Option<i32>,
        bs: Option<u32>,
    ) -> Sent {
        let checked = basis.map(|b| CheckedSignature::parse(signature(b, bs, 10_000)).unwrap());
        let (chunks, sent) = send(checked.as_ref(), new, window, zstd);
        assert_eq!(sent.hash, Hash::of(new));
        assert_eq!(sent.len, new.len() as u64);
        assert_eq!(sent.stats.literal + sent.stats.matched, new.len() as u64);
        let (res, sink) = receive(basis, chunks, new.len() as u64, sent.hash);
        let verified = res.unwrap();
        assert!(sink.out == new, "rebuilt file differs");
        assert_eq!(verified.hash(), Hash::of(new));
        assert_eq!(verified.len(), new.len() as u64);
        sent
    }

    /// Long data is compressed only when a sample from its middle is: noise goes raw without a
    /// full zstd pass, text is compressed, and the sample (not the whole) decides.
    #[test]
    fn a_sample_decides_whether_long_data_is_compressed() {
        let is_zstd = |chunks: &[Chunk]| {
            chunks
                .iter()
                .map(|c| matches!(c, Chunk::Literal { zstd: true, .. }))
                .collect::<Vec<_>>()
        };
        let len = 2 * COMPRESS_PROBE_FROM;
        let text = fill(1, len, true);
        let noise = fill(2, len, false);
        let (chunks, sent) = send(None, &text, WINDOW, Some(3));
        assert_eq!(is_zstd(&chunks), [true]);
        let (res, sink) = receive(None, chunks, len as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == text);

        let (chunks, sent) = send(None, &noise, WINDOW, Some(3));
        assert_eq!(is_zstd(&chunks), [false]);
        let (res, sink) = receive(None, chunks, len as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == noise);

        // Text with noise where the sample is taken: sent raw although most of it compresses.
        let mut mixed = text.clone();
        let mid = (len - COMPRESS_SAMPLE) / 2;
        mixed[mid..mid + COMPRESS_SAMPLE].copy_from_slice(&noise[..COMPRESS_SAMPLE]);
        let (chunks, _) = send(None, &mixed, WINDOW, Some(3));
        assert_eq!(is_zstd(&chunks), [false]);
        // Below the probe size the whole is tried, noise and all: this one compresses.
        let short = &mixed[mid - 150_000..mid + COMPRESS_SAMPLE / 4];
        assert!(short.len() < COMPRESS_PROBE_FROM);
        let (chunks, _) = send(None, short, WINDOW, Some(3));
        assert_eq!(is_zstd(&chunks), [true]);
    }

    #[test]
    fn reused_compression_contexts_carry_nothing_from_one_file_to_the_next() {
        let text = fill(7, 200_000, true);
        let noise = fill(8, 100_000, false);
        let alone = send(None, &text, WINDOW, Some(3)).0;
        assert!(
            matches!(alone[0], Chunk::Literal { zstd: true, .. }),
            "text compresses"
        );
        // Interleave files on contexts from the pool: compressible, incompressible (the
        // context's compression fails for lack of room), other levels, then the first file
        // again. Its chunks must be byte for byte what a fresh context made.
        for _ in 0..3 {
            let (chunks, sent) = send(None, &noise, WINDOW, Some(3));
            assert!(matches!(chunks[0], Chunk::Literal { zstd: false, .. }));
            let (res, sink) = receive(None, chunks, noise.len() as u64, sent.hash);
            res.unwrap();
            assert!(sink.out == noise);
            round_trip(None, &text, 64 << 10, Some(19), None);
            round_trip(None, &text, 64 << 10, Some(1), None);
        }
        let (again, sent) = send(None, &text, WINDOW, Some(3));
        assert_eq!(again, alone);
        let (res, sink) = receive(None, again, text.len() as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == text);
    }

    /// Applies random edits: overwrite, insert, delete, truncate, append.
    fn edit(basis: &[u8], edits: &[(u8, u32, usize, u64)]) -> Vec<u8> {
        let mut v = basis.to_vec();
        for &(kind, pos, len, seed) in edits {
            let at = if v.is_empty() {
                0
            } else {
                pos as usize % (v.len() + 1)
            };
            let data = fill(seed, len, seed % 2 == 0);
            match kind % 5 {
                0 => {
                    let end = (at + len).min(v.len());
                    v[at..end].copy_from_slice(&data[..end - at]);
                }
                1 => {
                    v.splice(at..at, data);
                }
                2 => {
                    let end = (at + len).min(v.len());
                    v.drain(at..end);
                }
                3 => v.truncate(at),
                _ => v.extend_from_slice(&data),
            }
        }
        v
    }

    fn edits() -> impl Strategy<Value = Vec<(u8, u32, usize, u64)>> {
        prop::collection::vec((0u8..5, any::<u32>(), 0usize..20_000, any::<u64>()), 0..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn delta_round_trips_after_random_edits(
            len in 0usize..300_000,
            seed in any::<u64>(),
            compressible in any::<bool>(),
            edits in edits(),
            window in prop::sample::select(vec![5_000usize, 16 << 10, 100_000, WINDOW]),
            zstd in prop::sample::select(vec![None, Some(1), Some(3)]),
            bs in prop::sample::select(vec![None, Some(1024u32), Some(8192)]),
        ) {
            let basis = fill(seed, len, compressible);
            let new = edit(&basis, &edits);
            round_trip(Some(&basis), &new, window, zstd, bs);
        }

        #[test]
        fn no_basis_round_trips(
            len in 0usize..300_000,
            seed in any::<u64>(),
            compressible in any::<bool>(),
            window in prop::sample::select(vec![5_000usize, 100_000, WINDOW]),
            zstd in prop::sample::select(vec![None, Some(3)]),
        ) {
            let new = fill(seed, len, compressible);
            let sent = round_trip(None, &new, window, zstd, None);
            prop_assert_eq!(sent.stats.matched, 0);
            if !new.is_empty() {
                prop_assert_eq!(sent.mode, SendMode::Literal(LiteralReason::NoBasis));
            }
        }

        /// Unrelated data: the first window is ≥ 90% literal, the rest goes literally, and the
        /// result is still exact.
        #[test]
        fn literal_fallback_round_trips(
            len in 20_000usize..300_000,
            seed in any::<u64>(),
            window in prop::sample::select(vec![16_384usize, 50_000]),
        ) {
            let basis = fill(seed, len, false);
            let new = fill(seed ^ 0xdead_beef, len, false);
            let sent = round_trip(Some(&basis), &new, window, Some(3), None);
            prop_assert_eq!(sent.mode, SendMode::Literal(LiteralReason::DeltaDidNotPay));
        }

        /// The sender's delta, applied by fast_rsync itself, gives the same file: our opcode
        /// parser and fast_rsync agree on the format.
        #[test]
        fn fast_rsync_apply_agrees(
            len in 0usize..200_000,
            seed in any::<u64>(),
            edits in edits(),
        ) {
            let basis = fill(seed, len, false);
            let new = edit(&basis, &edits);
            let sig = CheckedSignature::parse(signature(&basis, Some(1024), 4096)).unwrap();
            let (chunks, _) = send(Some(&sig), &new, WINDOW, None);
            for c in chunks {
                if let Chunk::Delta { bytes, last: true, .. } = c {
                    prop_assert!(apply_in_memory(&basis, &bytes, new.len()).unwrap() == new);
                }
            }
        }

        /// Chunked signature == whole-buffer `Signature::calculate`, whatever the chunking.
        #[test]
        fn chunked_signature_is_byte_identical(
            len in 0usize..200_000,
            seed in any::<u64>(),
            feed in 1usize..70_000,
            bs in prop::sample::select(vec![1024u32, 4096, 65536]),
        ) {
            let basis = fill(seed, len, false);
            let whole = Signature::calculate(
                &basis,
                SignatureOptions { block_size: bs, crypto_hash_size: CRYPTO_HASH_SIZE },
            );
            prop_assert_eq!(&signature(&basis, Some(bs), feed), whole.serialized());
        }

        /// Any corrupted chunk stream ends in an error (at the latest, a hash or length mismatch
        /// at finish) or in exactly the right file; never a panic, never output past the length.
        #[test]
        fn corrupted_chunks_never_panic_or_overrun(
            len in 0usize..120_000,
            seed in any::<u64>(),
            compressible in any::<bool>(),
            edits in edits(),
            zstd in prop::sample::select(vec![None, Some(3)]),
            literal in any::<bool>(),
            mutations in prop::collection::vec((0u8..9, any::<usize>(), any::<usize>(), any::<u8>()), 1..4),
        ) {
            let basis = fill(seed, len, compressible);
            let new = edit(&basis, &edits);
            let sig = CheckedSignature::parse(signature(&basis, Some(1024), 8192)).unwrap();
            let (mut chunks, sent) = send((!literal).then_some(&sig), &new, 30_000, zstd);
            for (kind, idx, pos, byte) in mutations {
                if chunks.is_empty() {
                    break;
                }
                let i = idx % chunks.len();
                if kind == 7 {
                    chunks.remove(i);
                    continue;
                }
                if kind == 8 {
                    let c = chunks[i].clone();
                    chunks.insert(i, c);
                    continue;
                }
                let (zstd_flag, out_len, bytes) = match &mut chunks[i] {
                    Chunk::Delta { zstd, out_len, bytes, .. }
                    | Chunk::Literal { zstd, out_len, bytes } => (zstd, out_len, bytes),
                };
                let p = if bytes.is_empty() { 0 } else { pos % bytes.len() };
                match kind {
                    0 if !bytes.is_empty() => bytes[p] ^= byte | 1,
                    1 => bytes.insert(p, byte),
                    2 => bytes.truncate(p),
                    3 => *zstd_flag = !*zstd_flag,
                    4 => *out_len = out_len.wrapping_add(u32::from(byte) + 1),
                    5 => *out_len = out_len.saturating_sub(u32::from(byte) + 1),
                    _ if !bytes.is_empty() => bytes[p] = byte,
                    _ => {}
                }
            }
            let (res, sink) = receive(Some(&basis), chunks, new.len() as u64, sent.hash);
            prop_assert!(sink.out.len() <= new.len());
            if res.is_ok() {
                prop_assert!(sink.out == new);
            }
        }
    }

    fn delta_of(ops: &[u8]) -> Vec<u8> {
        let mut d = DELTA_MAGIC.to_be_bytes().to_vec();
        d.extend_from_slice(ops);
        d
    }

    fn delta_chunk(bytes: Vec<u8>, out_len: u32) -> Chunk {
        Chunk::Delta {
            zstd: false,
            last: true,
            out_len,
            bytes,
        }
    }

    fn receive_one(basis: &[u8], chunk: Chunk, expected_len: u64) -> DeltaError {
        let (res, sink) = receive(Some(basis), vec![chunk], expected_len, Hash::of(b""));
        assert!(sink.out.len() as u64 <= expected_len);
        res.unwrap_err()
    }

    #[test]
    fn block_size_grows_with_the_file_and_is_clamped() {
        assert_eq!(block_size_for(0), 4096);
        assert_eq!(block_size_for(1 << 30), 4096);
        assert_eq!(block_size_for(4 << 30), 4096);
        assert_eq!(block_size_for((8 << 30) + 1), 16384);
        assert_eq!(block_size_for(1 << 40), 1 << 20);
        assert_eq!(block_size_for(u64::MAX), MAX_BLOCK);
        for shift in 20..39 {
            let len = 3u64 << shift;
            let blocks = len.div_ceil(u64::from(block_size_for(len)));
            assert!(blocks <= 1 << 20, "{len} bytes -> {blocks} blocks");
        }
    }

    #[test]
    fn signature_with_bad_header_is_rejected_before_fast_rsync() {
        let good = signature(&fill(1, 10_000, false), Some(1024), 4096);
        let with = |at: usize, v: u32| {
            let mut s = good.clone();
            s[at..at + 4].copy_from_slice(&v.to_be_bytes());
            CheckedSignature::parse(s).unwrap_err()
        };
        assert!(matches!(
            with(4, 0),
            DeltaError::BlockSizeOutOfRange { block_size: 0, .. }
        ));
        assert!(matches!(
            with(4, 1 << 30),
            DeltaError::BlockSizeOutOfRange {
                block_size: 0x4000_0000,
                ..
            }
        ));
        assert!(matches!(
            with(0, 0x7273_0137),
            DeltaError::BadSignatureMagic { .. }
        ));
        assert!(matches!(
            with(8, 3),
            DeltaError::HashSizeOutOfRange { hash_size: 3, .. }
        ));
        assert!(matches!(
            with(8, 17),
            DeltaError::HashSizeOutOfRange { hash_size: 17, .. }
        ));
        assert!(matches!(
            CheckedSignature::parse(good[..good.len() - 1].to_vec()).unwrap_err(),
            DeltaError::SignatureBodyMisaligned { entry_len: 12, .. }
        ));
        assert!(matches!(
            CheckedSignature::parse(good[..11].to_vec()).unwrap_err(),
            DeltaError::BadSignatureHeader { len: 11 }
        ));
        let mut huge = good[..12].to_vec();
        huge.resize(MAX_SIGNATURE_LEN + 1, 0);
        assert!(matches!(
            CheckedSignature::parse(huge).unwrap_err(),
            DeltaError::SignatureTooLarge { .. }
        ));
        // 4-byte hashes: 2 Mi + 1 entries fit under the byte limit but not the block limit.
        let mut many = good[..12].to_vec();
        many[8..12].copy_from_slice(&4u32.to_be_bytes());
        many.resize(12 + 8 * (MAX_SIGNATURE_BLOCKS as usize + 1), 0);
        assert!(matches!(
            CheckedSignature::parse(many).unwrap_err(),
            DeltaError::TooManyBlocks { .. }
        ));
        let ok = CheckedSignature::parse(good).unwrap();
        assert_eq!(ok.block_size(), 1024);
        assert_eq!(ok.blocks(), 10);
        assert_eq!(ok.basis_len_upper_bound(), 10 * 1024);
    }

    #[test]
    fn copy_past_the_basis_is_rejected() {
        let basis = fill(2, 8192, false);
        // COPY offset 8000 (2 bytes), len 200 (1 byte): class (1, 0) = 0x45 + 4.
        let d = delta_of(&[0x49, 0x1f, 0x40, 200, 0]);
        let err = receive_one(&basis, delta_chunk(d, 200), 200);
        assert!(matches!(
            err,
            DeltaError::CopyOutOfBasis {
                offset: 8000,
                len: 200,
                basis_len: 8192
            }
        ));
        // An 8-byte offset near u64::MAX must not overflow.
        let mut ops = vec![0x51];
        ops.extend_from_slice(&u64::MAX.to_be_bytes());
        ops.extend_from_slice(&[10, 0]);
        let err = receive_one(&basis, delta_chunk(delta_of(&ops), 10), 10);
        assert!(matches!(err, DeltaError::CopyOutOfBasis { .. }));
        let err = receive_one(&basis, delta_chunk(delta_of(&[0x45, 0, 0, 0]), 0), 10);
        assert!(matches!(err, DeltaError::EmptyCopy));
    }

    #[test]
    fn copy_without_a_basis_is_rejected() {
        let d = delta_of(&[0x45, 0, 10, 0]);
        let (res, sink) = receive(None, vec![delta_chunk(d, 10)], 10, Hash::of(b""));
        assert!(matches!(
            res,
            Err(DeltaError::CopyWithoutBasis { offset: 0, len: 10 })
        ));
        assert!(sink.out.is_empty());
    }

    #[test]
    fn malformed_deltas_are_rejected() {
        let basis = fill(3, 4096, false);
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (vec![0, 0, 0, 0, 0], 0),                    // bad magic
            (delta_of(&[0x55]), 0),                      // unknown opcode
            (delta_of(&[0x03, b'a']), 3),                // literal cut short
            (delta_of(&[0x44, 0xff, 0xff]), 3),          // 8-byte length cut short
            (delta_of(&[0x02, b'a', b'b']), 2),          // no END
            (delta_of(&[0x02, b'a', b'b', 0, 9]), 2),    // bytes after END
            (delta_of(&[0x02, b'a', b'b', 0]), 3),       // produces less than declared
            (delta_of(&[0x03, b'a', b'b', b'c', 0]), 2), // produces more than declared
        ];
        for (d, out_len) in cases {
            let err = receive_one(&basis, delta_chunk(d.clone(), out_len), 3);
            assert!(
                matches!(
                    err,
                    DeltaError::BadDeltaMagic { .. }
                        | DeltaError::UnknownOp { op: 0x55 }
                        | DeltaError::Truncated { .. }
                        | DeltaError::TrailingDelta { extra: 1 }
                        | DeltaError::WindowLengthMismatch {
                            declared: 3,
                            actual: 2
                        }
                        | DeltaError::OutputTooLong {
                            wanted: 3,
                            max: 2,
                            ..
                        }
                ),
                "{d:?}: {err:?}"
            );
        }
    }

    #[test]
    fn output_past_expected_len_is_refused_before_decoding() {
        let basis = fill(4, 4096, false);
        let lit = Chunk::Literal {
            zstd: false,
            out_len: 11,
            bytes: vec![1; 11],
        };
        assert!(matches!(
            receive_one(&basis, lit, 10),
            DeltaError::OutputTooLong {
                wanted: 11,
                max: 10,
                ..
            }
        ));
        let d = delta_chunk(delta_of(&[0x45, 0, 11, 0]), 11);
        assert!(matches!(
            receive_one(&basis, d, 10),
            DeltaError::OutputTooLong {
                wanted: 11,
                max: 10,
                ..
            }
        ));
        let d = delta_chunk(delta_of(&[0]), MAX_WINDOW as u32 + 1);
        assert!(matches!(
            receive_one(&basis, d, u64::MAX),
            DeltaError::WindowTooLarge { .. }
        ));
        let lit = Chunk::Literal {
            zstd: false,
            out_len: 3,
            bytes: vec![1; 2],
        };
        assert!(matches!(
            receive_one(&basis, lit, 10),
            DeltaError::LiteralLengthMismatch {
                declared: 3,
                actual: 2
            }
        ));
    }

    #[test]
    fn zstd_bomb_is_bounded() {
        let basis = fill(5, 4096, false);
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(bomb.len() < 64 << 10);
        // Small enough to pass the delta-size bound, so decompression itself must stop it.
        let small_bomb = zstd::bulk::compress(&vec![0u8; 4 << 20], 19).unwrap();
        assert!(
            small_bomb.len() as u64 <= max_delta_len(1024),
            "{}",
            small_bomb.len()
        );
        let lit = Chunk::Literal {
            zstd: true,
            out_len: 1024,
            bytes: bomb.clone(),
        };
        assert!(matches!(
            receive_one(&basis, lit, 1 << 40),
            DeltaError::Decompress { max: 1024, .. }
        ));
        let d = Chunk::Delta {
            zstd: true,
            last: true,
            out_len: 1024,
            bytes: small_bomb,
        };
        assert!(matches!(
            receive_one(&basis, d, 1 << 40),
            DeltaError::Decompress { max, .. } if max == max_delta_len(1024)
        ));
    }

    #[test]
    fn oversized_and_inconsistent_delta_parts_are_rejected() {
        let basis = fill(6, 4096, false);
        let big = Chunk::Literal {
            zstd: false,
            out_len: 16,
            bytes: vec![0; MAX_DATA_CHUNK + 1],
        };
        assert!(matches!(
            receive_one(&basis, big, 1 << 30),
            DeltaError::ChunkTooLarge { .. }
        ));
        // A tiny window cannot need megabytes of delta.
        let part = Chunk::Delta {
            zstd: false,
            last: false,
            out_len: 100,
            bytes: vec![0; 1000],
        };
        assert!(matches!(
            receive_one(&basis, part, 1 << 30),
            DeltaError::DeltaTooLarge { .. }
        ));
        let parts = vec![
            Chunk::Delta {
                zstd: false,
                last: false,
                out_len: 100,
                bytes: vec![0; 10],
            },
            Chunk::Delta {
                zstd: true,
                last: true,
                out_len: 100,
                bytes: vec![0; 10],
            },
        ];
        let (res, _) = receive(Some(&basis), parts, 1000, Hash::of(b""));
        assert!(matches!(res, Err(DeltaError::UnexpectedChunk(_))));
        let parts = vec![
            Chunk::Delta {
                zstd: false,
                last: false,
                out_len: 100,
                bytes: vec![0; 10],
            },
            Chunk::Literal {
                zstd: false,
                out_len: 1,
                bytes: vec![0],
            },
        ];
        let (res, _) = receive(Some(&basis), parts, 1000, Hash::of(b""));
        assert!(matches!(res, Err(DeltaError::UnexpectedChunk(_))));
        let unfinished = vec![Chunk::Delta {
            zstd: false,
            last: false,
            out_len: 0,
            bytes: vec![],
        }];
        let (res, _) = receive(Some(&basis), unfinished, 0, Hash::of(b""));
        assert!(matches!(res, Err(DeltaError::Truncated { .. })));
    }

    #[test]
    fn wrong_hash_or_length_is_reported_with_both_values() {
        let new = fill(7, 50_000, false);
        let (chunks, sent) = send(None, &new, WINDOW, Some(3));
        let (res, _) = receive(None, chunks.clone(), new.len() as u64, Hash::of(b"other"));
        match res {
            Err(DeltaError::HashMismatch { expected, actual }) => {
                assert_eq!(expected, Hash::of(b"other"));
                assert_eq!(actual, sent.hash);
            }
            other => panic!("{other:?}"),
        }
        let (res, _) = receive(None, chunks, new.len() as u64 + 1, sent.hash);
        assert!(matches!(res, Err(DeltaError::LengthMismatch { .. })));
    }

    #[test]
    fn a_one_mib_zero_run_becomes_write_zeros() {
        let mut new = fill(8, 100 << 10, false);
        new.extend(vec![0u8; 1 << 20]);
        new.extend(fill(9, 100 << 10, false));
        // Literal: the run starts at 100 KiB, block-aligned.
        let (chunks, sent) = send(None, &new, 64 << 10, Some(3));
        let (res, sink) = receive(None, chunks, new.len() as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == new);
        assert_eq!(sink.zeros, vec![(100 << 10, 1 << 20)]);
        // Delta against a basis that has the zeros elsewhere: COPYs of zero blocks are holes too.
        let mut basis = vec![0u8; 1 << 20];
        basis.extend(fill(10, 300 << 10, false));
        let checked = CheckedSignature::parse(signature(&basis, None, 1 << 16)).unwrap();
        let (chunks, sent) = send(Some(&checked), &new, WINDOW, Some(3));
        assert_eq!(sent.mode, SendMode::Delta);
        assert!(sent.stats.matched >= 1 << 20);
        let (res, sink) = receive(Some(&basis), chunks, new.len() as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == new);
        assert!(
            sink.zeros
                .iter()
                .any(|&(at, len)| at == 100 << 10 && len == 1 << 20),
            "{:?}",
            sink.zeros
        );
    }

    #[test]
    fn unaligned_zeros_are_written_as_data_and_a_trailing_hole_is_flushed() {
        let mut new = vec![1u8; 100];
        new.extend(vec![0u8; 3 * 4096]);
        let (chunks, sent) = send(None, &new, 1000, None);
        let (res, sink) = receive(None, chunks, new.len() as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == new);
        // Block 0 holds the ones; blocks 1 and 2 are whole zero blocks; the tail is partial.
        assert_eq!(sink.zeros, vec![(4096, 8192)]);
        let new = vec![0u8; 8192];
        let (chunks, sent) = send(None, &new, 4096, None);
        let (res, sink) = receive(None, chunks, 8192, sent.hash);
        res.unwrap();
        assert_eq!(sink.zeros, vec![(0, 8192)]);
        assert_eq!(sink.out.len(), 8192);
    }

    #[test]
    fn identical_file_is_all_matched_and_tiny_file_goes_literal() {
        let basis = fill(11, 200_000, false);
        let sent = round_trip(Some(&basis), &basis, 64 << 10, Some(3), None);
        assert_eq!(sent.mode, SendMode::Delta);
        // The last short block cannot match (diff only matches whole blocks).
        assert!(sent.stats.literal < 4096, "{:?}", sent.stats);
        let sent = round_trip(Some(&basis), &basis[..1000], WINDOW, Some(3), None);
        assert_eq!(sent.mode, SendMode::Literal(LiteralReason::TooSmall));
        let sent = round_trip(Some(&basis), b"", WINDOW, Some(3), None);
        assert_eq!(sent.mode, SendMode::Delta);
        assert_eq!(sent.len, 0);
    }

    #[test]
    fn a_window_whose_delta_exceeds_one_chunk_is_split_and_rebuilt() {
        let basis = fill(12, 1 << 20, false);
        let mut new = fill(13, WINDOW, false);
        new[..1 << 20].copy_from_slice(&basis);
        let checked = CheckedSignature::parse(signature(&basis, None, 1 << 20)).unwrap();
        let (chunks, sent) = send(Some(&checked), &new, WINDOW, None);
        assert!(chunks.len() >= 4, "{chunks:?}");
        assert!(chunks.iter().all(|c| c.wire_len() <= MAX_DATA_CHUNK));
        assert_eq!(sent.stats.matched, 1 << 20);
        let (res, sink) = receive(Some(&basis), chunks, new.len() as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == new);
    }

    #[test]
    fn chunks_survive_the_wire_codec() {
        let basis = fill(14, 100_000, true);
        let new = edit(&basis, &[(0, 500, 3000, 1), (1, 70_000, 10, 2)]);
        let checked = CheckedSignature::parse(signature(&basis, None, 8192)).unwrap();
        let (chunks, sent) = send(Some(&checked), &new, 40_000, Some(3));
        let decoded: Vec<Chunk> = chunks
            .iter()
            .map(|c| {
                let frame = crate::wire::encode_frame(c).unwrap();
                crate::wire::decode(&frame[crate::wire::HEADER_LEN..]).unwrap()
            })
            .collect();
        assert_eq!(decoded, chunks);
        let (res, sink) = receive(Some(&basis), decoded, new.len() as u64, sent.hash);
        res.unwrap();
        assert!(sink.out == new);
    }

    #[test]
    fn sender_refuses_windows_larger_than_configured() {
        let config = SenderConfig {
            window: 100,
            zstd_level: None,
        };
        let mut s = FileSender::new(None, config).unwrap();
        assert!(matches!(
            s.send_window(&[0; 101]),
            Err(DeltaError::WindowTooLarge { len: 101, max: 100 })
        ));
        let too_big = SenderConfig {
            window: MAX_WINDOW + 1,
            zstd_level: None,
        };
        assert!(FileSender::new(None, too_big).is_err());
    }
}
