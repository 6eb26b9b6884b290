//! In-place patches: "write only what changed".
//!
//! When the session asks for an in-place receive (a big, unlinked file whose basis is the live
//! file at the same path), the rebuilt output is compared block by block (4 KiB) with the live
//! file as it streams, and only the ranges that differ are kept: their bytes, or "zeros" for a
//! range that became a hole. The delta engine still hashes the *whole* output, so the patch is
//! proven like any staged file: applied to the live file it was made against, it yields exactly
//! the verified content.
//!
//! ```text
//! patch file := data bytes | bincode(PatchHeader) | header len (u64 LE) | "SCPATCH1"
//! ```
//!
//! A patch records the facts of the live file it was made against (device, inode, size, mtime,
//! ctime). It counts as staged only while the live file still has them; the commit checks them
//! again with the stack stopped, before its journal exists. Before the commit, the bytes a patch
//! will overwrite (and a truncated tail) are saved in the same format in
//! `generations/<G>/patches/<slot>`, so a rollback rebuilds the old file exactly (in staging,
//! verified by its hash) — the generation costs the size of the change, not of the file.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::fs::{FallocateFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use stackclone_proto::delta::{Sink, Verified};
use stackclone_proto::manifest::Hash;
use stackclone_proto::path::StackPath;

use super::error::StoreError;
use super::staging::StagingDirs;

const MAGIC: &[u8; 8] = b"SCPATCH1";
const BLOCK: u64 = 4096;
const PIECE: usize = 1 << 20;

/// The stat facts of a live file that say "unchanged since".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BaseFacts {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i64,
    pub(crate) ctime_ns: i64,
}

impl BaseFacts {
    // The stat fields are `c_long` (i32 on 32-bit targets): the casts are not always no-ops.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn of(st: &rustix::fs::Stat) -> Self {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }
}

/// Where an extent's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ExtentData {
    /// Bytes at this offset of the patch file.
    At(u64),
    /// A hole (zeros).
    Zeros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Extent {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) data: ExtentData,
}

/// The trailer of a patch (or undo) file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PatchHeader {
    /// The live path it applies to.
    pub(crate) path: StackPath,
    /// The live file it was made against.
    pub(crate) base: BaseFacts,
    /// The file's length afterwards.
    pub(crate) new_len: u64,
    pub(crate) extents: Vec<Extent>,
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Appends the trailer for `h` to `f`, whose data part is `data_len` bytes.
fn write_trailer(f: &File, data_len: u64, h: &PatchHeader) -> io::Result<()> {
    let bytes = bincode::serde::encode_to_vec(h, config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut tail = bytes;
    tail.extend_from_slice(&(tail.len() as u64).to_le_bytes());
    tail.extend_from_slice(MAGIC);
    f.write_all_at(&tail, data_len)?;
    f.set_len(data_len + tail.len() as u64)
}

/// Reads the trailer of a patch or undo file.
pub(crate) fn read_header(f: &File) -> io::Result<PatchHeader> {
    let bad =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("patch file: {what}"));
    let len = f.metadata()?.len();
    if len < 16 {
        return Err(bad("too short"));
    }
    let mut tail = [0u8; 16];
    f.read_exact_at(&mut tail, len - 16)?;
    if &tail[8..] != MAGIC {
        return Err(bad("bad magic"));
    }
    let hlen = u64::from_le_bytes(tail[..8].try_into().map_err(|_| bad("header length"))?);
    if hlen > len - 16 || hlen > 64 << 20 {
        return Err(bad("header length out of range"));
    }
    let mut h = vec![0u8; hlen as usize];
    f.read_exact_at(&mut h, len - 16 - hlen)?;
    let (header, _): (PatchHeader, usize) =
        bincode::serde::decode_from_slice(&h, config()).map_err(|e| bad(&e.to_string()))?;
    let data_len = len - 16 - hlen;
    for x in &header.extents {
        if let ExtentData::At(at) = x.data
            && at.checked_add(x.len).is_none_or(|end| end > data_len)
        {
            return Err(bad("extent outside the data"));
        }
    }
    Ok(header)
}

/// Applies the patch or undo `src` (with header `h`) to `dst`: length first, then every extent.
/// Idempotent: the same bytes land at the same offsets.
pub(crate) fn apply(src: &File, h: &PatchHeader, dst: &File) -> io::Result<()> {
    dst.set_len(h.new_len)?;
    let mut buf = vec![0u8; PIECE];
    for x in &h.extents {
        match x.data {
            ExtentData::At(at) => {
                let mut done = 0u64;
                while done < x.len {
                    let n = (x.len - done).min(PIECE as u64) as usize;
                    src.read_exact_at(&mut buf[..n], at + done)?;
                    dst.write_all_at(&buf[..n], x.offset + done)?;
                    done += n as u64;
                }
            }
            ExtentData::Zeros => {
                let punched = rustix::fs::fallocate(
                    dst.as_fd(),
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    x.offset,
                    x.len,
                );
                if punched.is_err() {
                    let zeros = vec![0u8; PIECE];
                    let mut done = 0u64;
                    while done < x.len {
                        let n = (x.len - done).min(PIECE as u64) as usize;
                        dst.write_all_at(&zeros[..n], x.offset + done)?;
                        done += n as u64;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Writes, into `out`, an undo for `patch`: the current bytes of `live` in every range the
/// patch overwrites, plus the tail it truncates away, so that applying the undo to the patched
/// file gives back `live` as it is now.
pub(crate) fn write_undo(
    live: &File,
    base: BaseFacts,
    patch: &PatchHeader,
    out: &File,
) -> io::Result<()> {
    let mut ranges: Vec<(u64, u64)> = patch
        .extents
        .iter()
        .filter(|x| x.offset < base.size)
        .map(|x| (x.offset, x.len.min(base.size - x.offset)))
        .collect();
    if patch.new_len < base.size {
        ranges.push((patch.new_len, base.size - patch.new_len));
    }
    let mut extents = Vec::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; PIECE];
    for (offset, len) in ranges {
        extents.push(Extent {
            offset,
            len,
            data: ExtentData::At(at),
        });
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(PIECE as u64) as usize;
            live.read_exact_at(&mut buf[..n], offset + done)?;
            out.write_all_at(&buf[..n], at + done)?;
            done += n as u64;
        }
        at += len;
    }
    let h = PatchHeader {
        path: patch.path.clone(),
        base,
        new_len: base.size,
        extents,
    };
    write_trailer(out, at, &h)?;
    out.sync_all()
}

/// An in-place receive: the delta engine's [`Sink`] that keeps only what differs from the
/// live file. Persisted as `staging/patches/<hash>`.
#[derive(Debug)]
pub struct PatchFile {
    out: File,
    name: String,
    basis: File,
    header: PatchHeader,
    pos: u64,
    data_len: u64,
    buf: Vec<u8>,
    dirs: Arc<StagingDirs>,
    error: Option<StoreError>,
    done: bool,
}

impl PatchFile {
    pub(crate) fn new(
        dirs: &Arc<StagingDirs>,
        path: StackPath,
        basis: File,
        base: BaseFacts,
    ) -> Result<Self, StoreError> {
        let (out, name) = dirs.create_tmp_raw()?;
        Ok(Self {
            out,
            name,
            basis,
            header: PatchHeader {
                path,
                base,
                new_len: 0,
                extents: Vec::new(),
            },
            pos: 0,
            data_len: 0,
            buf: vec![0u8; BLOCK as usize],
            dirs: Arc::clone(dirs),
            error: None,
            done: false,
        })
    }

    fn remember(&mut self, op: &'static str, e: &io::Error) {
        if self.error.is_none() {
            let copy = match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(e.kind(), e.to_string()),
            };
            self.error = Some(StoreError::io(
                &self.dirs.stack,
                op,
                format!("{}/{}", self.dirs.tmp_path.display(), self.name),
                copy,
            ));
        }
    }

    /// True if `data` at `offset` equals the basis there.
    fn same_as_basis(&mut self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let base_len = self.header.base.size;
        if offset + data.len() as u64 > base_len {
            return Ok(false);
        }
        let buf = &mut self.buf[..data.len()];
        self.basis.read_exact_at(buf, offset)?;
        Ok(buf == data)
    }

    fn push_extent(&mut self, offset: u64, len: u64, data: ExtentData) {
        if let Some(last) = self.header.extents.last_mut()
            && last.offset + last.len == offset
        {
            match (last.data, data) {
                (ExtentData::Zeros, ExtentData::Zeros) => {
                    last.len += len;
                    return;
                }
                (ExtentData::At(a), ExtentData::At(b)) if a + last.len == b => {
                    last.len += len;
                    return;
                }
                _ => {}
            }
        }
        self.header.extents.push(Extent { offset, len, data });
    }

    fn write_inner(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = (BLOCK - self.pos % BLOCK) as usize;
            let (piece, rest) = data.split_at(room.min(data.len()));
            if !self.same_as_basis(self.pos, piece)? {
                self.out.write_all(piece)?;
                self.push_extent(self.pos, piece.len() as u64, ExtentData::At(self.data_len));
                self.data_len += piece.len() as u64;
            }
            self.pos += piece.len() as u64;
            data = rest;
        }
        Ok(())
    }

    fn zeros_inner(&mut self, len: u64) -> io::Result<()> {
        let end = self.pos + len;
        let zeros = vec![0u8; BLOCK as usize];
        while self.pos < end {
            let room = BLOCK - self.pos % BLOCK;
            let n = room.min(end - self.pos);
            let base_len = self.header.base.size;
            // Past the old end, growing the file makes zeros anyway.
            let differs =
                self.pos < base_len && !self.same_as_basis(self.pos, &zeros[..n as usize])?;
            if differs {
                self.push_extent(self.pos, n, ExtentData::Zeros);
            }
            self.pos += n;
        }
        Ok(())
    }

    /// Bytes of patch data kept so far (what the commit will write).
    pub fn patch_bytes(&self) -> u64 {
        self.data_len
    }

    /// Writes the trailer, fsyncs and renames the patch to `staging/patches/<hash>`. `v` must
    /// be the verifier's verdict on exactly the output fed here.
    pub fn persist(mut self, v: &Verified) -> Result<Hash, StoreError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let stack = self.dirs.stack.clone();
        if self.pos != v.len() {
            return Err(StoreError::StagedLengthMismatch {
                stack,
                expected: v.len(),
                actual: self.pos,
            });
        }
        let shown = format!("{}/{}", self.dirs.tmp_path.display(), self.name);
        let io = |op, e: io::Error| StoreError::io(&stack, op, shown.clone(), e);
        self.header.new_len = self.pos;
        write_trailer(&self.out, self.data_len, &self.header).map_err(|e| io("write", e))?;
        self.out.sync_all().map_err(|e| io("fsync", e))?;
        let hash = v.hash();
        rustix::fs::renameat(
            &self.dirs.tmp,
            self.name.as_str(),
            &self.dirs.patches,
            hash.to_hex().as_str(),
        )
        .map_err(|e| io("rename into patches", e.into()))?;
        self.done = true;
        Ok(hash)
    }

    /// Gives the patch up; returns the local failure, if there was one (see
    /// [`super::StagingFile::discard`]).
    pub fn discard(mut self) -> Option<StoreError> {
        self.error.take()
    }
}

impl Drop for PatchFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = rustix::fs::unlinkat(
                &self.dirs.tmp,
                self.name.as_str(),
                rustix::fs::AtFlags::empty(),
            );
        }
    }
}

impl Sink for PatchFile {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let r = self.write_inner(data);
        if let Err(e) = &r {
            self.remember("write patch", e);
        }
        r
    }

    fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        let r = self.zeros_inner(len);
        if let Err(e) = &r {
            self.remember("write patch", e);
        }
        r
    }
}

/// Opens `name` in the patches dir for reading.
pub(crate) fn open_patch(dirs: &StagingDirs, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        &dirs.patches,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}
