//! Small helpers to build test trees: every call panics with the path on failure.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

/// A seeded SplitMix64: reproducible test data and kill points without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Creates parent dirs and writes `data`.
pub fn write(path: impl AsRef<Path>, data: impl AsRef<[u8]>) {
    let path = path.as_ref();
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn mkdir(path: impl AsRef<Path>) {
    let path = path.as_ref();
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
}

pub fn ln_s(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    let (t, l) = (target.as_ref(), link.as_ref());
    symlink(t, l).unwrap_or_else(|e| panic!("ln -s {} {}: {e}", t.display(), l.display()));
}

pub fn ln(existing: impl AsRef<Path>, new: impl AsRef<Path>) {
    let (a, b) = (existing.as_ref(), new.as_ref());
    std::fs::hard_link(a, b).unwrap_or_else(|e| panic!("ln {} {}: {e}", a.display(), b.display()));
}

/// `chmod` (follows symlinks: use on files and dirs only).
pub fn chmod(path: impl AsRef<Path>, mode: u32) {
    let path = path.as_ref();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// `lchown` (call before `chmod`: a chown clears setuid/setgid).
pub fn chown(path: impl AsRef<Path>, uid: u32, gid: u32) {
    let path = path.as_ref();
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", path.display()));
}

/// Sets the mtime (and atime) in ns, not following a symlink.
pub fn set_mtime(path: impl AsRef<Path>, ns: i64) {
    let path = path.as_ref();
    let ts = rustix::fs::Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &times,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

/// Sets a `user.` xattr, not following a symlink.
pub fn set_xattr(path: impl AsRef<Path>, name: &str, value: &[u8]) {
    let path = path.as_ref();
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {name} {}: {e}", path.display()));
}

/// A sparse file of `len` bytes with `blocks` written at the given offsets.
pub fn sparse(path: impl AsRef<Path>, len: u64, blocks: &[(u64, &[u8])]) {
    let path = path.as_ref();
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(len).expect("set_len");
    for (at, data) in blocks {
        f.seek(SeekFrom::Start(*at)).expect("seek");
        f.write_all(data).expect("write");
    }
}

/// Writes `data` at `offset` into an existing file, in place.
pub fn patch(path: impl AsRef<Path>, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let path = path.as_ref();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patch");
    f.write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("patch {}: {e}", path.display()));
}

/// Removes whatever is at `path` (file, link or tree).
pub fn rm(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let md =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    if md.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
    .unwrap_or_else(|e| panic!("rm {}: {e}", path.display()));
}

/// Bytes actually allocated to a file.
pub fn allocated(path: impl AsRef<Path>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).expect("lstat").blocks() * 512
}
