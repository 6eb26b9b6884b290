//! An independent tree snapshot and comparison.
//!
//! Deliberately shares no code with `stackclone_common`'s scanner: a bug there must not hide
//! itself. The walk uses only `symlink_metadata`, `read_link` and `read_dir` (never following a
//! symlink), plus rustix for `user.*` xattrs, and records every attribute that
//! `rsync -aHAXS --numeric-ids` restores.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a path is, with the data that kind carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File {
        size: u64,
        hash: [u8; 32],
    },
    Dir,
    Symlink {
        target: Vec<u8>,
    },
    /// Sockets, fifos, devices: recorded so a diff shows them.
    Other {
        mode: u32,
    },
}

/// One path's recorded attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    /// `user.*` xattrs only.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Not compared directly: used for hardlink grouping and sparse checks.
    pub ino: u64,
    pub blocks: u64,
}

/// A snapshot: every path below the root (relative, as bytes), the root itself excluded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    pub root: PathBuf,
    pub nodes: BTreeMap<Vec<u8>, Node>,
}

impl Tree {
    /// The node at relative path `p`.
    pub fn get(&self, p: impl AsRef<[u8]>) -> Option<&Node> {
        self.nodes.get(p.as_ref())
    }

    /// For every path whose inode has more than one path in this tree: the other paths.
    pub fn link_peers(&self) -> BTreeMap<Vec<u8>, BTreeSet<Vec<u8>>> {
        let mut by_ino: HashMap<u64, Vec<&Vec<u8>>> = HashMap::new();
        for (p, n) in &self.nodes {
            if matches!(n.kind, Kind::File { .. }) {
                by_ino.entry(n.ino).or_default().push(p);
            }
        }
        let mut out = BTreeMap::new();
        for paths in by_ino.values().filter(|v| v.len() > 1) {
            for p in paths {
                let others = paths
                    .iter()
                    .filter(|q| *q != p)
                    .map(|q| (*q).clone())
                    .collect();
                out.insert((*p).clone(), others);
            }
        }
        out
    }

    /// This tree without the given top-level names (and what is below them).
    pub fn without(&self, names: &[&str]) -> Tree {
        let drop = |p: &[u8]| {
            names.iter().any(|n| {
                p == n.as_bytes() || (p.starts_with(n.as_bytes()) && p.get(n.len()) == Some(&b'/'))
            })
        };
        Tree {
            root: self.root.clone(),
            nodes: self
                .nodes
                .iter()
                .filter(|(p, _)| !drop(p))
                .map(|(p, n)| (p.clone(), n.clone()))
                .collect(),
        }
    }

    /// Number of regular files.
    pub fn files(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| matches!(n.kind, Kind::File { .. }))
            .count()
    }
}

/// Shows a relative path the way a person can read it (non-UTF-8 bytes escaped).
pub fn show(p: &[u8]) -> String {
    p.escape_ascii().to_string()
}

/// Walks `root` without following any symlink and records every path below it.
pub fn snapshot(root: &Path) -> Tree {
    snapshot_without(root, &[])
}

/// [`snapshot`] of `root` without the subtrees `skip` names (paths relative to `root`), which
/// are never read: a directory another process writes in meanwhile (an agent's state dir, where
/// files are created and renamed away) cannot make the walk fail, as [`Tree::without`] applied
/// after a whole walk could.
pub fn snapshot_without(root: &Path, skip: &[&str]) -> Tree {
    let mut tree = Tree {
        root: root.to_path_buf(),
        nodes: BTreeMap::new(),
    };
    walk(root, &mut Vec::new(), &mut tree.nodes, skip);
    tree
}

fn walk(dir: &Path, rel: &mut Vec<u8>, out: &mut BTreeMap<Vec<u8>, Node>, skip: &[&str]) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("read_dir entry").file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        if skip.iter().any(|s| s.as_bytes() == rel.as_slice()) {
            rel.truncate(len);
            continue;
        }
        let node = node(&path);
        let is_dir = node.kind == Kind::Dir;
        out.insert(rel.clone(), node);
        if is_dir {
            walk(&path, rel, out, skip);
        }
        rel.truncate(len);
    }
}

/// Records one path (not followed if it is a symlink).
pub fn node(path: &Path) -> Node {
    let md =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        let target =
            std::fs::read_link(path).unwrap_or_else(|e| panic!("readlink {}: {e}", path.display()));
        Kind::Symlink {
            target: target.as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File {
            size: md.len(),
            hash: hash_file(path),
        }
    } else {
        Kind::Other {
            mode: md.mode() & 0o170000,
        }
    };
    Node {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
        xattrs: user_xattrs(path),
        ino: md.ino(),
        blocks: md.blocks(),
    }
}

fn hash_file(path: &Path) -> [u8; 32] {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    *h.finalize().as_bytes()
}

/// `user.*` xattrs of `path` (not followed).
pub fn user_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut list = vec![0u8; 64 << 10];
    let n = match rustix::fs::llistxattr(path, &mut list[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::OPNOTSUPP) => return out,
        Err(e) => panic!("llistxattr {}: {e}", path.display()),
    };
    for name in list[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let mut value = vec![0u8; 64 << 10];
        let cname = std::ffi::CString::new(name).expect("xattr names have no NUL");
        let len = rustix::fs::lgetxattr(path, cname.as_c_str(), &mut value[..])
            .unwrap_or_else(|e| panic!("lgetxattr {} {}: {e}", path.display(), show(name)));
        value.truncate(len);
        out.insert(name.to_vec(), value);
    }
    out
}

/// Every difference between `want` and `got`, one line per path and attribute; empty if equal.
pub fn diff(want: &Tree, got: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    let paths: BTreeSet<&Vec<u8>> = want.nodes.keys().chain(got.nodes.keys()).collect();
    for p in paths {
        let s = show(p);
        match (want.nodes.get(p), got.nodes.get(p)) {
            (Some(_), None) => out.push(format!("{s}: missing")),
            (None, Some(n)) => out.push(format!("{s}: unexpected {:?}", short(&n.kind))),
            (Some(a), Some(b)) => {
                if a.kind != b.kind {
                    out.push(format!(
                        "{s}: kind/content {:?} != {:?}",
                        short(&a.kind),
                        short(&b.kind)
                    ));
                }
                if a.mode != b.mode {
                    out.push(format!("{s}: mode {:o} != {:o}", a.mode, b.mode));
                }
                if (a.uid, a.gid) != (b.uid, b.gid) {
                    out.push(format!(
                        "{s}: owner {}:{} != {}:{}",
                        a.uid, a.gid, b.uid, b.gid
                    ));
                }
                if a.mtime_ns != b.mtime_ns {
                    out.push(format!("{s}: mtime_ns {} != {}", a.mtime_ns, b.mtime_ns));
                }
                if a.xattrs != b.xattrs {
                    out.push(format!(
                        "{s}: xattrs {:?} != {:?}",
                        show_x(&a.xattrs),
                        show_x(&b.xattrs)
                    ));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    let (la, lb) = (want.link_peers(), got.link_peers());
    let linked: BTreeSet<&Vec<u8>> = la.keys().chain(lb.keys()).collect();
    for p in linked {
        let empty = BTreeSet::new();
        let (a, b) = (la.get(p).unwrap_or(&empty), lb.get(p).unwrap_or(&empty));
        if a != b {
            let f = |s: &BTreeSet<Vec<u8>>| s.iter().map(|x| show(x)).collect::<Vec<_>>();
            out.push(format!(
                "{}: hardlinked with {:?} != {:?}",
                show(p),
                f(a),
                f(b)
            ));
        }
    }
    out
}

fn short(k: &Kind) -> String {
    match k {
        Kind::File { size, hash } => format!("file {size} bytes {}", hex8(hash)),
        Kind::Dir => "dir".into(),
        Kind::Symlink { target } => format!("symlink -> {}", show(target)),
        Kind::Other { mode } => format!("special {mode:o}"),
    }
}

fn hex8(h: &[u8; 32]) -> String {
    h[..4].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn show_x(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<String> {
    x.iter()
        .map(|(k, v)| format!("{}={}", show(k), show(v)))
        .collect()
}

/// Panics with every difference if `got` is not `want`.
#[track_caller]
pub fn assert_same(want: &Tree, got: &Tree, what: &str) {
    let d = diff(want, got);
    assert!(
        d.is_empty(),
        "{what}: {} differs from {} in {} way(s):\n  {}",
        got.root.display(),
        want.root.display(),
        d.len(),
        d.join("\n  ")
    );
}

/// Whether `got` is exactly `want`.
pub fn same(want: &Tree, got: &Tree) -> bool {
    diff(want, got).is_empty()
}
