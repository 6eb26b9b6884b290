//! Safe resolution below a directory fd: the only way the store touches the live dir (and the
//! backup dirs, whose content came from the live dir).
//!
//! Every path is resolved from an `O_DIRECTORY` fd of the root, one component at a time, with
//! `openat(…, O_NOFOLLOW | O_DIRECTORY)`. The final component is only ever used with `*at`
//! calls that do not follow it (`renameat`, `unlinkat`, `mkdirat`, `symlinkat`, `linkat`
//! without `AT_SYMLINK_FOLLOW`, `openat(O_NOFOLLOW)`, `fchownat`/`utimensat` with
//! `AT_SYMLINK_NOFOLLOW`). A symlink planted anywhere in the tree, by a container or anyone
//! else, therefore makes the operation fail (`ELOOP`/`ENOTDIR`) instead of redirecting it
//! outside. No path string is ever joined onto the root for a system call.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT, XattrFlags, fchmod, fchown,
    flistxattr, fremovexattr, fsetxattr, futimens,
};
use rustix::io::Errno;
use stackclone_proto::manifest::{Meta, Xattr};
use stackclone_proto::path::StackPath;

/// Flags for walking a directory component.
pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// Flags for opening an existing entry to read it or set its metadata. `NONBLOCK`: a fifo put in
/// place of a file must not make `open` wait for a writer.
pub(crate) const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// A directory fd, borrowed (the root) or owned (a subdirectory just opened).
#[derive(Debug)]
pub(crate) enum Dir<'a> {
    Root(BorrowedFd<'a>),
    Sub(OwnedFd),
}

impl AsFd for Dir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(fd) => *fd,
            Dir::Sub(fd) => fd.as_fd(),
        }
    }
}

/// A directory tree reached only through its root fd.
#[derive(Debug)]
pub(crate) struct Tree {
    fd: OwnedFd,
    /// For messages only.
    path: PathBuf,
}

impl Tree {
    /// Opens `path` (trusted configuration, already canonical) as a tree root.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// A tree rooted at the subdirectory `name` of `parent` (not following a symlink).
    pub(crate) fn open_at(parent: BorrowedFd<'_>, name: &str, path: PathBuf) -> io::Result<Self> {
        let fd = rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty())?;
        Ok(Self { fd, path })
    }

    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `root/path` for messages a person reads.
    pub(crate) fn show(&self, p: &StackPath) -> String {
        format!("{}/{p}", self.path.display())
    }

    /// Opens the directory at `p` (the root for `None`), never following a symlink. A component
    /// that is not a directory gives `ENOTDIR` or `ELOOP`.
    pub(crate) fn dir(&self, p: Option<&StackPath>) -> io::Result<Dir<'_>> {
        let mut cur = Dir::Root(self.fd.as_fd());
        if let Some(p) = p {
            for c in p.components() {
                let next = rustix::fs::openat(&cur, c, DIR_FLAGS, Mode::empty())?;
                cur = Dir::Sub(next);
            }
        }
        Ok(cur)
    }

    /// The directory holding `p`, and `p`'s last component.
    pub(crate) fn parent<'p>(&self, p: &'p StackPath) -> io::Result<(Dir<'_>, &'p [u8])> {
        let parent = p.parent();
        Ok((self.dir(parent.as_ref())?, p.file_name()))
    }

    /// Opens the regular file at `p` for reading, never following a symlink; anything that is
    /// not a regular file is `EINVAL`-ish ([`not_a_file`]).
    pub(crate) fn open_file(&self, p: &StackPath) -> io::Result<File> {
        let (dir, name) = self.parent(p)?;
        let fd = rustix::fs::openat(&dir, name, READ_FLAGS, Mode::empty())?;
        let st = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(not_a_file());
        }
        // Reads below are plain blocking preads on a regular file; NONBLOCK has no effect there.
        Ok(File::from(fd))
    }

    /// `lstat` of `p` relative to the root. `Ok(None)` if it (or a parent) does not exist as a
    /// path inside the tree (a parent that is a symlink counts as "does not exist").
    pub(crate) fn lstat(&self, p: &StackPath) -> io::Result<Option<rustix::fs::Stat>> {
        let (dir, name) = match self.parent(p) {
            Ok(x) => x,
            Err(e) if is_absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The error for "this is not a regular file".
pub(crate) fn not_a_file() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
}

/// True for errors meaning "no such path inside the tree": missing, or a component that is not
/// a directory (a symlink included, since it is never followed).
pub(crate) fn is_absent(e: &io::Error) -> bool {
    [Errno::NOENT, Errno::NOTDIR, Errno::LOOP]
        .iter()
        .any(|x| e.raw_os_error() == Some(x.raw_os_error()))
}

pub(crate) fn timespec(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

fn times(meta: &Meta) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: timespec(meta.mtime_ns),
    }
}

/// `(uid, gid)` as rustix ids. `u32::MAX` is "leave unchanged" to `chown`, never an owner: it is
/// refused rather than silently ignored.
fn ids(meta: &Meta) -> io::Result<(rustix::fs::Uid, rustix::fs::Gid)> {
    if meta.uid == u32::MAX || meta.gid == u32::MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "uid or gid 4294967295 cannot be set",
        ));
    }
    Ok((
        rustix::fs::Uid::from_raw(meta.uid),
        rustix::fs::Gid::from_raw(meta.gid),
    ))
}

/// Sets owner, mode, `user.*` xattrs and mtime on an open file or directory, in that order:
/// `chown` clears setuid/setgid, so the mode comes after it; the mtime comes last.
pub(crate) fn set_meta_fd(fd: BorrowedFd<'_>, meta: &Meta, xattrs: &[Xattr]) -> io::Result<()> {
    let (uid, gid) = ids(meta)?;
    fchown(fd, Some(uid), Some(gid))?;
    fchmod(fd, Mode::from_raw_mode(meta.mode & 0o7777))?;
    sync_xattrs(fd, xattrs)?;
    futimens(fd, &times(meta))?;
    Ok(())
}

/// Sets owner and mtime of the symlink `name` in `dir` without following it. (Linux symlinks have
/// no mode of their own and no `user.*` xattrs.)
pub(crate) fn set_symlink_meta(dir: BorrowedFd<'_>, name: &[u8], meta: &Meta) -> io::Result<()> {
    let (uid, gid) = ids(meta)?;
    rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
    rustix::fs::utimensat(dir, name, &times(meta), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Makes the `user.*` xattrs of `fd` exactly `want`.
fn sync_xattrs(fd: BorrowedFd<'_>, want: &[Xattr]) -> io::Result<()> {
    let names = match list_xattrs(fd) {
        Ok(n) => n,
        Err(Errno::NOTSUP) if want.is_empty() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        if !want.iter().any(|x| x.name == name) {
            match fremovexattr(fd, name) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for x in want {
        fsetxattr(fd, x.name.as_slice(), &x.value, XattrFlags::empty())?;
    }
    Ok(())
}

fn list_xattrs(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match flistxattr(fd, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if buf.len() < (1 << 17) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
}
