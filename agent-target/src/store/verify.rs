//! `verify`: re-hash the live dir and compare it with the last committed manifest.

use std::collections::HashMap;
use std::fmt;

use stackclone_common::ScanConfig;
use stackclone_proto::manifest::{Entry, EntryKind, Manifest};
use stackclone_proto::path::StackPath;

use super::{StackStore, StoreError};

/// One path where the live dir differs from the committed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub path: StackPath,
    pub what: Vec<Difference>,
}

/// What differs at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// In the manifest, not in the live dir.
    Missing,
    /// In the live dir, not in the manifest.
    Extra,
    Type {
        want: &'static str,
        got: &'static str,
    },
    Content,
    Size {
        want: u64,
        got: u64,
    },
    Mode {
        want: u32,
        got: u32,
    },
    Owner {
        want: (u32, u32),
        got: (u32, u32),
    },
    Mtime {
        want: i64,
        got: i64,
    },
    LinkTarget {
        want: Vec<u8>,
        got: Vec<u8>,
    },
    Xattrs,
    /// Hardlinked to different paths than recorded.
    HardLinks,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing => write!(f, "missing"),
            Difference::Extra => write!(f, "not in the committed generation"),
            Difference::Type { want, got } => write!(f, "type {got}, committed {want}"),
            Difference::Content => write!(f, "content differs"),
            Difference::Size { want, got } => write!(f, "size {got}, committed {want}"),
            Difference::Mode { want, got } => write!(f, "mode {got:o}, committed {want:o}"),
            Difference::Owner { want, got } => write!(
                f,
                "owner {}:{}, committed {}:{}",
                got.0, got.1, want.0, want.1
            ),
            Difference::Mtime { want, got } => write!(f, "mtime {got} ns, committed {want} ns"),
            Difference::LinkTarget { want, got } => write!(
                f,
                "symlink to {:?}, committed {:?}",
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(want)
            ),
            Difference::Xattrs => write!(f, "extended attributes differ"),
            Difference::HardLinks => write!(f, "hardlinks differ"),
        }
    }
}

fn kind_name(k: &EntryKind) -> &'static str {
    match k {
        EntryKind::File { .. } => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink { .. } => "symlink",
    }
}

/// The first path of each hardlink group, by path.
fn leaders(m: &Manifest) -> HashMap<&StackPath, &StackPath> {
    let mut first: HashMap<u32, &StackPath> = HashMap::new();
    let mut out = HashMap::new();
    for e in m.entries() {
        if let EntryKind::File {
            link_group: Some(g),
            ..
        } = e.kind
        {
            out.insert(&e.path, *first.entry(g).or_insert(&e.path));
        }
    }
    out
}

/// Every difference between `want` (committed) and `got` (scanned), path by path, sorted.
pub fn compare(want: &Manifest, got: &Manifest) -> Vec<Drift> {
    let (lw, lg) = (leaders(want), leaders(got));
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let (w, g) = (want.entries(), got.entries());
    while i < w.len() || j < g.len() {
        let order = match (w.get(i), g.get(j)) {
            (Some(a), Some(b)) => a.path.cmp(&b.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                out.push(Drift {
                    path: w[i].path.clone(),
                    what: vec![Difference::Missing],
                });
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(Drift {
                    path: g[j].path.clone(),
                    what: vec![Difference::Extra],
                });
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let what = differences(&w[i], &g[j], lw.get(&w[i].path), lg.get(&g[j].path));
                if !what.is_empty() {
                    out.push(Drift {
                        path: w[i].path.clone(),
                        what,
                    });
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

fn differences(
    w: &Entry,
    g: &Entry,
    wl: Option<&&StackPath>,
    gl: Option<&&StackPath>,
) -> Vec<Difference> {
    let mut d = Vec::new();
    match (&w.kind, &g.kind) {
        (
            EntryKind::File {
                size: ws, hash: wh, ..
            },
            EntryKind::File {
                size: gs, hash: gh, ..
            },
        ) => {
            if ws != gs {
                d.push(Difference::Size {
                    want: *ws,
                    got: *gs,
                });
            }
            if wh != gh {
                d.push(Difference::Content);
            }
            if wl != gl {
                d.push(Difference::HardLinks);
            }
        }
        (EntryKind::Dir, EntryKind::Dir) => {}
        (EntryKind::Symlink { target: wt }, EntryKind::Symlink { target: gt }) => {
            if wt != gt {
                d.push(Difference::LinkTarget {
                    want: wt.clone(),
                    got: gt.clone(),
                });
            }
        }
        (a, b) => {
            d.push(Difference::Type {
                want: kind_name(a),
                got: kind_name(b),
            });
            return d;
        }
    }
    if w.meta.mode != g.meta.mode {
        d.push(Difference::Mode {
            want: w.meta.mode,
            got: g.meta.mode,
        });
    }
    if (w.meta.uid, w.meta.gid) != (g.meta.uid, g.meta.gid) {
        d.push(Difference::Owner {
            want: (w.meta.uid, w.meta.gid),
            got: (g.meta.uid, g.meta.gid),
        });
    }
    if w.meta.mtime_ns != g.meta.mtime_ns {
        d.push(Difference::Mtime {
            want: w.meta.mtime_ns,
            got: g.meta.mtime_ns,
        });
    }
    if w.xattrs != g.xattrs {
        d.push(Difference::Xattrs);
    }
    d
}

impl StackStore {
    /// Re-hashes the whole live dir (no cache) and lists every path that differs from the last
    /// committed manifest, with what differs. Empty: the live dir is exactly the committed
    /// generation.
    pub fn verify(&self) -> Result<Vec<Drift>, StoreError> {
        let cfg = ScanConfig {
            root: self.live_path().to_path_buf(),
            exclude: Vec::new(),
            cache: None,
            checksum: true,
            xattrs: true,
        };
        let scan = stackclone_common::scan(&cfg).map_err(|source| StoreError::Scan {
            stack: self.stack.clone(),
            path: self.live_path().to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(compare(&self.manifest, &scan.manifest))
    }
}
