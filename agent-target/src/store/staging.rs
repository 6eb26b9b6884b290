//! Receiving into staging: the delta engine's [`Sink`] and [`Basis`] on real files.
//!
//! A transfer writes into `staging/tmp/<unique>`; once the delta engine's verifier produced a
//! [`Verified`] for it, [`StagingFile::persist`] fsyncs it and renames it to
//! `staging/objects/<blake3 hex>`. Objects are content-addressed, so an interrupted transfer
//! resumes at the next file and a content needed at several paths is staged once.
//!
//! Neither the object nor the rename into `objects/` is fsynced here: one fsync per file was the
//! largest cost of a first copy of many small files (20,000 fsyncs per push). Instead the commit
//! runs one `syncfs` over the state dir's file system after it prepared everything and before it
//! publishes its journal, so every byte a journal points at is on disk first. After a power loss
//! an object may be missing (it is fetched again) or torn; a torn one is caught because the
//! commit re-hashes every object it links and the target daemon scrubs staging when it starts
//! ([`StackStore::scrub_staging`](super::StackStore::scrub_staging)).

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use stackclone_proto::delta::{Basis, Chunk, DeltaError, FileReceiver, Sink, Verified};
use stackclone_proto::manifest::Hash;

use super::error::StoreError;

/// Bytes per read when copying a file (into staging or between staging files).
const COPY_BUF: usize = 1 << 20;

/// The staging directories, shared by every [`StagingFile`] (which may live on other threads).
#[derive(Debug)]
pub(crate) struct StagingDirs {
    pub(crate) stack: String,
    pub(crate) tmp: OwnedFd,
    pub(crate) objects: OwnedFd,
    pub(crate) patches: OwnedFd,
    pub(crate) tmp_path: PathBuf,
    pub(crate) objects_path: PathBuf,
    pub(crate) patches_path: PathBuf,
}

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

impl StagingDirs {
    /// A new, empty, uniquely named file in `staging/tmp`.
    pub(crate) fn create_tmp(self: &Arc<Self>) -> Result<StagingFile, StoreError> {
        let (file, name) = self.create_tmp_raw()?;
        Ok(StagingFile {
            file,
            name,
            pos: 0,
            written: 0,
            dirs: Arc::clone(self),
            error: None,
            done: false,
        })
    }

    /// A new, empty, uniquely named file in `staging/tmp`, and its name; the caller removes it.
    pub(crate) fn create_tmp_raw(&self) -> Result<(File, String), StoreError> {
        loop {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!(
                "{}-{}-{nanos}",
                std::process::id(),
                NEXT_TMP.fetch_add(1, Ordering::Relaxed)
            );
            let flags =
                OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rustix::fs::openat(&self.tmp, name.as_str(), flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => return Ok((File::from(fd), name)),
                Err(Errno::EXIST) => continue,
                Err(e) => {
                    return Err(StoreError::io(
                        &self.stack,
                        "create staging file in",
                        self.tmp_path.display().to_string(),
                        e.into(),
                    ));
                }
            }
        }
    }

    pub(crate) fn object_exists(&self, hash: &Hash) -> bool {
        rustix::fs::statat(
            &self.objects,
            hash.to_hex().as_str(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
        })
    }
}

/// A file being rebuilt in `staging/tmp`: the delta engine's [`Sink`].
///
/// `write` appends at the current position; `write_zeros` only moves the position, leaving a
/// hole, and [`persist`](StagingFile::persist) sets the final length, so sparse files stay
/// sparse. The first local I/O failure is remembered with its context (a full disk becomes
/// [`StoreError::NoSpace`]): after the receiver fails, [`StagingFile::discard`] tells a local
/// failure (end the cycle) from a bad transfer (ask again). Dropped without `persist`, the file
/// is removed.
#[derive(Debug)]
pub struct StagingFile {
    file: File,
    name: String,
    pos: u64,
    /// Where the last write ended: the file's length on disk (holes are only seeked over).
    written: u64,
    dirs: Arc<StagingDirs>,
    error: Option<StoreError>,
    done: bool,
}

impl StagingFile {
    fn remember(&mut self, op: &'static str, e: &io::Error) {
        if self.error.is_none() {
            let copy = io::Error::new(e.kind(), e.to_string());
            let copy = match e.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => copy,
            };
            self.error = Some(StoreError::io(
                &self.dirs.stack,
                op,
                format!("{}/{}", self.dirs.tmp_path.display(), self.name),
                copy,
            ));
        }
    }

    /// Bytes of output so far (including trailing holes not yet materialised).
    pub fn len(&self) -> u64 {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Renames the file to `staging/objects/<hash>` (no fsync: see the module docs). `v` must be
    /// the verifier's verdict on exactly what was written here; its length is checked against
    /// the file.
    pub fn persist(mut self, v: &Verified) -> Result<Hash, StoreError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let stack = self.dirs.stack.clone();
        let shown = format!("{}/{}", self.dirs.tmp_path.display(), self.name);
        if self.pos != v.len() {
            return Err(StoreError::StagedLengthMismatch {
                stack,
                expected: v.len(),
                actual: self.pos,
            });
        }
        let io = |op, e: io::Error| StoreError::io(&stack, op, shown.clone(), e);
        // Only a trailing hole needs the length set: one syscall per small file saved.
        if self.written != self.pos {
            self.file.set_len(self.pos).map_err(|e| io("extend", e))?;
        }
        let hash = v.hash();
        rustix::fs::renameat(
            &self.dirs.tmp,
            self.name.as_str(),
            &self.dirs.objects,
            hash.to_hex().as_str(),
        )
        .map_err(|e| io("rename into objects", e.into()))?;
        self.done = true;
        Ok(hash)
    }

    /// Gives the file up (a bad transfer or a local failure) and returns the local failure, if
    /// there was one: `Some` means the cycle cannot go on (disk full, I/O error), `None` means
    /// the data was bad and the file can be asked for again.
    pub fn discard(mut self) -> Option<StoreError> {
        self.error.take()
    }
}

impl Drop for StagingFile {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: stale temp files are also removed when the store is next opened.
            let _ = rustix::fs::unlinkat(
                &self.dirs.tmp,
                self.name.as_str(),
                rustix::fs::AtFlags::empty(),
            );
        }
    }
}

impl Sink for StagingFile {
    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self.file.write_all(data) {
            Ok(()) => {
                self.pos += data.len() as u64;
                self.written = self.pos;
                Ok(())
            }
            Err(e) => {
                self.remember("write staging file", &e);
                Err(e)
            }
        }
    }

    fn write_zeros(&mut self, len: u64) -> io::Result<()> {
        let Some(end) = self.pos.checked_add(len) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "file too long"));
        };
        match self.file.seek(SeekFrom::Start(end)) {
            Ok(_) => {
                self.pos = end;
                Ok(())
            }
            Err(e) => {
                self.remember("seek in staging file", &e);
                Err(e)
            }
        }
    }
}

/// A live file opened (safely) as a delta basis: `pread` at any offset.
#[derive(Debug)]
pub struct BasisFile {
    file: File,
    len: u64,
}

impl BasisFile {
    pub(crate) fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }

    /// Length when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The open file, to read it in windows for a signature.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Basis for BasisFile {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// No basis: a literal-only transfer never reads one.
struct NoBasis;

impl Basis for NoBasis {
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "no basis"))
    }
}

/// What copying a live file into staging came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalStage {
    /// Copied and verified; staged under its hash.
    Staged(Verified),
    /// The file's content is not the expected one (it changed since the scan).
    Mismatch,
}

/// Copies `src` (`len` bytes) into `dst` through the delta engine's verifier, as literal
/// chunks, so a local copy is proven exactly like a transfer. Holes are skipped on read where
/// the file system reports them and reappear as holes, because the receiver turns whole zero
/// blocks into `write_zeros`.
pub(crate) fn copy_verified(
    src: &File,
    len: u64,
    dst: &mut StagingFile,
    hash: Hash,
) -> Result<LocalStage, StoreError> {
    let mut receiver = FileReceiver::new(None, len);
    let mut buf = vec![0u8; COPY_BUF];
    let mut at = 0u64;
    let fail = |dst: &mut StagingFile, e: DeltaError| -> Result<LocalStage, StoreError> {
        match dst.error.take() {
            Some(local) => Err(local),
            None => match e {
                DeltaError::Io(e) => Err(StoreError::io(
                    &dst.dirs.stack,
                    "copy into staging",
                    dst.name.clone(),
                    e,
                )),
                _ => Ok(LocalStage::Mismatch),
            },
        }
    };
    while at < len {
        let n = (len - at).min(COPY_BUF as u64) as usize;
        let piece = &mut buf[..n];
        let got = read_full_at(src, piece, at).map_err(|e| {
            StoreError::io(&dst.dirs.stack, "read for staging", dst.name.clone(), e)
        })?;
        if got < n {
            // The file shrank since its size was taken: its content changed.
            return Ok(LocalStage::Mismatch);
        }
        let chunk = Chunk::Literal {
            zstd: false,
            out_len: n as u32,
            bytes: piece.to_vec(),
        };
        if let Err(e) = receiver.handle_chunk(chunk, &mut NoBasis, dst) {
            return fail(dst, e);
        }
        at += n as u64;
    }
    match receiver.finish(dst, hash) {
        Ok(v) => Ok(LocalStage::Staged(v)),
        Err(e) => fail(dst, e),
    }
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Copies `len` bytes of `src` into the empty file `dst`, keeping holes: only the ranges
/// `SEEK_DATA`/`SEEK_HOLE` report as data are read and written, then the length is set.
pub(crate) fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut at = 0u64;
    while at < len {
        let start = match rustix::fs::seek(src.as_fd(), rustix::fs::SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break,
            // No SEEK_DATA support: everything is data.
            Err(Errno::INVAL) => at,
            Err(e) => return Err(e.into()),
        };
        let end = match rustix::fs::seek(src.as_fd(), rustix::fs::SeekFrom::Hole(start)) {
            Ok(e) => e.min(len),
            Err(Errno::INVAL) => len,
            Err(e) => return Err(e.into()),
        };
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(COPY_BUF as u64) as usize;
            let got = read_full_at(src, &mut buf[..n], pos)?;
            if got == 0 {
                break;
            }
            dst.write_all_at(&buf[..got], pos)?;
            pos += got as u64;
        }
        if end <= at {
            break;
        }
        at = end;
    }
    dst.set_len(len)
}
