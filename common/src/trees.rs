//! A stack's data as one tree: the data dir (`path`) with each replicated named volume grafted
//! in as [`VOLUMES_DIR`]`/<key>` and each outside path (`extra_paths`) as
//! [`PATHS_DIR`]`/<key>` ([`extra_path_key`]).
//!
//! ```text
//! manifest path                          read from (source)
//! config/app.ini                         <path>/config/app.ini
//! .stackclone-volumes                    (made up: root-owned, 0700, mtime 0)
//! .stackclone-volumes/db                 <volume mountpoint> itself: its owner, mode, mtime, xattrs
//! .stackclone-volumes/db/PG_VERSION      <volume mountpoint>/PG_VERSION
//! .stackclone-paths/srv%2Fmedia/a.jpg    /srv/media/a.jpg
//! ```
//!
//! One manifest, one flag, one generation: a volume goes through the same deltas, staging,
//! journaled commit, rollback and verify as `path`, with no second protocol. The target keeps
//! the tree at the same place in its live dir and points the standby's volume there (see the
//! target's `volumes` module).
//!
//! Each graft is scanned as its own root (its own file system, its own hash cache next to the
//! stack's, no excludes: the stack's `exclude` patterns are relative to `path`), and files are
//! opened beneath the root they belong to, never following a symlink.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use stackclone_proto::manifest::{
    Entry, EntryKind, Manifest, Meta, PATHS_DIR, VOLUMES_DIR, extra_path_key,
};
use stackclone_proto::path::StackPath;

use crate::scan::{ScanConfig, ScanError, root_entry, scan};

/// A directory grafted into the stack's tree at [`VOLUMES_DIR`]`/<key>` (a named volume) or
/// [`PATHS_DIR`]`/<key>` (an outside path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graft {
    /// One path component: the volume's Compose key (or Docker name), or the outside path's
    /// [`extra_path_key`].
    pub key: String,
    /// Where its data is on this host.
    pub dir: PathBuf,
    /// An outside path (else a named volume).
    pub extra: bool,
}

impl Graft {
    /// The named volume of `key`, whose data is in `dir`.
    pub fn volume(key: impl Into<String>, dir: impl Into<PathBuf>) -> Graft {
        Graft {
            key: key.into(),
            dir: dir.into(),
            extra: false,
        }
    }

    /// The outside path `path` (absolute), from `extra_paths`.
    pub fn extra_path(path: &Path) -> Graft {
        Graft {
            key: extra_path_key(&path.to_string_lossy()),
            dir: path.to_path_buf(),
            extra: true,
        }
    }

    /// Where it is in the manifest.
    pub fn at(&self) -> Result<StackPath, TreesError> {
        let bad = || TreesError::BadKey {
            key: self.key.clone(),
        };
        if self.key.contains('/') {
            return Err(bad());
        }
        StackPath::new(format!("{}/{}", self.parent(), self.key)).map_err(|_| bad())
    }

    fn parent(&self) -> &'static str {
        if self.extra { PATHS_DIR } else { VOLUMES_DIR }
    }

    fn what(&self) -> String {
        if self.extra {
            format!("outside path {}", self.dir.display())
        } else {
            format!("named volume `{}`", self.key)
        }
    }
}

/// The data dir and its grafts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTrees {
    pub root: PathBuf,
    /// Sorted by key, keys distinct.
    pub grafts: Vec<Graft>,
}

/// Why the trees cannot be one manifest.
#[derive(Debug, thiserror::Error)]
pub enum TreesError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("{what} ({dir}): {source}")]
    Graft {
        what: String,
        dir: PathBuf,
        source: Box<ScanError>,
    },
    #[error(
        "{root} already holds {at}, where the {what} is replicated; rename that directory, or \
         leave the {what} out"
    )]
    Collision {
        root: PathBuf,
        at: String,
        what: String,
    },
    #[error("{root} holds a {name} that is not a directory; rename it")]
    NotDir { root: PathBuf, name: &'static str },
    #[error(
        "outside path {dir} is empty: refusing to push it, since that would empty the standby's \
         copy (is a network share not mounted?); set allow_empty = true to push it anyway"
    )]
    EmptyExtra { dir: PathBuf },
    #[error("named volume key {key:?} is not a single path component")]
    BadKey { key: String },
    #[error("graft `{key}`: {path} is longer than a stack path may be")]
    TooLong { key: String, path: String },
    #[error("the trees are not one manifest: {0}")]
    Manifest(#[from] stackclone_proto::manifest::ManifestError),
}

impl StackTrees {
    /// The data dir alone.
    pub fn data_dir(root: impl Into<PathBuf>) -> StackTrees {
        StackTrees {
            root: root.into(),
            grafts: Vec::new(),
        }
    }

    /// Scans the data dir with `main` (its root is replaced by [`root`](Self::root)) and every
    /// graft, into one manifest. Without grafts this is exactly [`scan`] of the data dir. An
    /// outside path with nothing in it is refused unless `allow_empty` (a share that is not
    /// mounted looks like that, and would empty the standby's copy).
    pub fn scan(&self, main: &ScanConfig, allow_empty: bool) -> Result<Manifest, TreesError> {
        let cfg = ScanConfig {
            root: self.root.clone(),
            ..main.clone()
        };
        let data = scan(&cfg)?.manifest;
        if self.grafts.is_empty() {
            return Ok(data);
        }
        let mut entries = data.into_entries();
        let mut next_group = entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { link_group, .. } => link_group,
                _ => None,
            })
            .max()
            .map_or(0, |g| g + 1);
        for graft in &self.grafts {
            let parent = graft.parent();
            let parent_path = StackPath::new(parent).expect("a valid path");
            match entries.iter().find(|e| e.path == parent_path) {
                Some(e) if !e.is_dir() => {
                    return Err(TreesError::NotDir {
                        root: self.root.clone(),
                        name: parent,
                    });
                }
                Some(_) => {}
                None => {
                    entries.push(Entry {
                        path: parent_path,
                        kind: EntryKind::Dir,
                        meta: Meta {
                            mode: 0o700,
                            uid: 0,
                            gid: 0,
                            mtime_ns: 0,
                        },
                        xattrs: Vec::new(),
                    });
                }
            }
            let at = graft.at()?;
            if entries.iter().any(|e| e.path == at) {
                return Err(TreesError::Collision {
                    root: self.root.clone(),
                    at: at.to_string(),
                    what: graft.what(),
                });
            }
            let graft_err = |source| TreesError::Graft {
                what: graft.what(),
                dir: graft.dir.clone(),
                source: Box::new(source),
            };
            entries.push(root_entry(&graft.dir, at.clone(), main.xattrs).map_err(graft_err)?);
            let cfg = ScanConfig {
                root: graft.dir.clone(),
                exclude: Vec::new(),
                cache: main.cache.as_ref().map(|c| graft_cache(c, graft)),
                checksum: main.checksum,
                xattrs: main.xattrs,
            };
            let tree = scan(&cfg).map_err(graft_err)?.manifest;
            if graft.extra && tree.is_empty() && !allow_empty {
                return Err(TreesError::EmptyExtra {
                    dir: graft.dir.clone(),
                });
            }
            let groups = next_group;
            for mut e in tree.into_entries() {
                let mut bytes = at.as_bytes().to_vec();
                bytes.push(b'/');
                bytes.extend_from_slice(e.path.as_bytes());
                e.path = StackPath::new(bytes).map_err(|_| TreesError::TooLong {
                    key: graft.key.clone(),
                    path: e.path.to_string(),
                })?;
                if let EntryKind::File {
                    link_group: Some(g),
                    ..
                } = &mut e.kind
                {
                    *g += groups;
                    next_group = next_group.max(*g + 1);
                }
                entries.push(e);
            }
        }
        Ok(Manifest::from_unsorted(entries)?)
    }

    /// Which root `path` lies in and its path relative to that root: a graft's dir for a path
    /// below its place, else the data dir. `None` for a graft's root itself (a directory, never
    /// read as a file).
    pub fn locate(&self, path: &StackPath) -> Option<(&Path, StackPath)> {
        let bytes = path.as_bytes();
        for graft in &self.grafts {
            let Some(rest) = bytes
                .strip_prefix(graft.parent().as_bytes())
                .and_then(|r| r.strip_prefix(b"/"))
            else {
                continue;
            };
            if let Some(below) = rest.strip_prefix(graft.key.as_bytes()) {
                if below.is_empty() {
                    return None;
                }
                if let Some(rel) = below.strip_prefix(b"/") {
                    return StackPath::new(rel).ok().map(|p| (graft.dir.as_path(), p));
                }
            }
        }
        Some((&self.root, path.clone()))
    }

    /// Opens the regular file at `path` for reading, beneath the root it belongs to (see
    /// [`open_beneath`]).
    pub fn open_file(&self, path: &StackPath) -> io::Result<File> {
        let (root, rel) = self
            .locate(path)
            .ok_or_else(|| io::Error::other("a volume's root is a directory"))?;
        open_beneath(root, &rel)
    }
}

/// The hash cache of `graft`, next to the stack's cache file `cache`.
fn graft_cache(cache: &Path, graft: &Graft) -> PathBuf {
    let mut name = cache.file_name().unwrap_or_default().to_os_string();
    let kind = if graft.extra { "path" } else { "volume" };
    name.push(format!(".{kind}.{}", graft.key));
    cache.with_file_name(name)
}

/// Opens `path` for reading strictly beneath `root`: no symlink anywhere on the way, no `..`,
/// and only a regular file (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`).
pub fn open_beneath(root: &Path, path: &StackPath) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = rustix::fs::openat2(
        &dir,
        path.as_bytes(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn p(s: &str) -> StackPath {
        StackPath::new(s).unwrap()
    }

    fn setup() -> (tempfile::TempDir, StackTrees) {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        let vol = t.path().join("vol_db/_data");
        fs::create_dir_all(data.join("config")).unwrap();
        fs::write(data.join("config/app.ini"), "a=1\n").unwrap();
        fs::create_dir_all(vol.join("base")).unwrap();
        fs::write(vol.join("PG_VERSION"), "15\n").unwrap();
        fs::write(vol.join("base/1"), "rows").unwrap();
        fs::hard_link(vol.join("base/1"), vol.join("base/2")).unwrap();
        fs::set_permissions(&vol, fs::Permissions::from_mode(0o700)).unwrap();
        let trees = StackTrees {
            root: data,
            grafts: vec![Graft::volume("db", vol)],
        };
        (t, trees)
    }

    #[test]
    fn a_volume_is_grafted_with_its_root_and_content() {
        let (_t, trees) = setup();
        let m = trees.scan(&ScanConfig::new(""), false).unwrap();
        let paths: Vec<String> = m.entries().iter().map(|e| e.path.to_string()).collect();
        assert_eq!(
            paths,
            [
                ".stackclone-volumes",
                ".stackclone-volumes/db",
                ".stackclone-volumes/db/PG_VERSION",
                ".stackclone-volumes/db/base",
                ".stackclone-volumes/db/base/1",
                ".stackclone-volumes/db/base/2",
                "config",
                "config/app.ini",
            ]
        );
        let root = m.get(&p(".stackclone-volumes/db")).unwrap();
        let md = fs::metadata(&trees.grafts[0].dir).unwrap();
        assert_eq!(root.meta.mode, 0o700);
        assert_eq!((root.meta.uid, root.meta.gid), (md.uid(), md.gid()));
        let group = |path: &str| match m.get(&p(path)).unwrap().kind {
            EntryKind::File { link_group, .. } => link_group,
            _ => panic!("{path} is not a file"),
        };
        assert!(group(".stackclone-volumes/db/base/1").is_some());
        assert_eq!(
            group(".stackclone-volumes/db/base/1"),
            group(".stackclone-volumes/db/base/2")
        );
        assert_eq!(m.get(&p(".stackclone-volumes")).unwrap().meta.mode, 0o700);
    }

    #[test]
    fn without_grafts_the_manifest_is_the_data_dir_scan() {
        let (_t, mut trees) = setup();
        trees.grafts.clear();
        let m = trees.scan(&ScanConfig::new(""), false).unwrap();
        assert_eq!(m, scan(&ScanConfig::new(&trees.root)).unwrap().manifest);
    }

    #[test]
    fn files_are_read_from_the_root_they_belong_to() {
        let (_t, trees) = setup();
        let mut s = String::new();
        trees
            .open_file(&p(".stackclone-volumes/db/PG_VERSION"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "15\n");
        s.clear();
        trees
            .open_file(&p("config/app.ini"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "a=1\n");
        assert!(trees.open_file(&p(".stackclone-volumes/db")).is_err());
        // A key that is only a prefix of another is not that graft.
        assert_eq!(
            trees.locate(&p(".stackclone-volumes/dbx/f")).unwrap().0,
            trees.root.as_path()
        );
    }

    #[test]
    fn a_data_dir_that_already_holds_the_graft_is_refused() {
        let (_t, trees) = setup();
        fs::create_dir_all(trees.root.join(".stackclone-volumes/db")).unwrap();
        let err = trees.scan(&ScanConfig::new(""), false).unwrap_err();
        assert!(
            matches!(err, TreesError::Collision { ref at, .. } if at == ".stackclone-volumes/db"),
            "{err}"
        );
        // Another key beside it is fine, and the data dir's own directory keeps its metadata.
        fs::rename(
            trees.root.join(".stackclone-volumes/db"),
            trees.root.join(".stackclone-volumes/other"),
        )
        .unwrap();
        let m = trees.scan(&ScanConfig::new(""), false).unwrap();
        assert!(m.get(&p(".stackclone-volumes/other")).is_some());
        assert_ne!(m.get(&p(".stackclone-volumes")).unwrap().meta.mtime_ns, 0);
    }

    #[test]
    fn a_missing_volume_dir_names_the_volume() {
        let (_t, mut trees) = setup();
        trees.grafts[0].dir = trees.root.join("nope");
        let err = trees
            .scan(&ScanConfig::new(""), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("named volume `db`"), "{err}");
    }

    #[test]
    fn an_outside_path_is_grafted_and_refused_when_empty() {
        let (t, mut trees) = setup();
        let media = t.path().join("srv/media");
        fs::create_dir_all(&media).unwrap();
        trees.grafts.push(Graft::extra_path(&media));
        let err = trees
            .scan(&ScanConfig::new(""), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is empty") && err.contains("allow_empty"),
            "{err}"
        );
        assert!(trees.scan(&ScanConfig::new(""), true).is_ok());
        fs::write(media.join("a.jpg"), "jpeg").unwrap();
        let m = trees.scan(&ScanConfig::new(""), false).unwrap();
        let at = format!(
            ".stackclone-paths/{}/a.jpg",
            extra_path_key(&media.to_string_lossy())
        );
        assert!(m.get(&p(&at)).is_some(), "{at}");
        assert_eq!(m.get(&p(".stackclone-paths")).unwrap().meta.mode, 0o700);
        let mut s = String::new();
        trees
            .open_file(&p(&at))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "jpeg");
    }

    #[test]
    fn graft_caches_sit_beside_the_stacks_cache() {
        assert_eq!(
            graft_cache(
                Path::new("/var/lib/stackclone/app.hashcache"),
                &Graft::volume("db", "/x")
            ),
            Path::new("/var/lib/stackclone/app.hashcache.volume.db")
        );
    }
}
