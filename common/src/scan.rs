//! The tree scanner: a stack's data dir on disk becomes a [`Manifest`].
//!
//! [`scan`] walks the tree below [`ScanConfig::root`] without following a symlink anywhere below
//! the root, stays on the root's file system, leaves out what the exclude patterns match, and
//! hashes file content with BLAKE3 unless the [hash cache](crate::cache) vouches for it. What it
//! could not represent (sockets, fifos, devices) or did not descend into (other file systems) is
//! listed in [`ScanStats::skipped`]; what it could not read is an error, never a hole in the tree.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest, ManifestError, Meta, Xattr};
use stackclone_proto::path::{PathError, StackPath};

use crate::cache::{self, CacheStatus, LoadedCache, PendingCache, StatKey};

/// Bytes read per `read` call while hashing; memory stays flat whatever the file size.
const HASH_BUF: usize = 1 << 20;
/// How often a path that changes identity under the scanner is looked at again before the scan
/// gives up on it.
const ATTEMPTS: usize = 3;

/// What to scan and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanConfig {
    /// The stack's data dir. It may itself be reached through symlinks; nothing below it is.
    pub root: PathBuf,
    /// Exclude patterns with `.gitignore` semantics, relative to the root: `@eaDir/`,
    /// `.DS_Store`, `/cache` (anchored), `*.tmp`, `!keep.tmp`, `**/logs`. An excluded directory
    /// is not descended into, so a negation cannot bring back something below it (as in git).
    pub exclude: Vec<String>,
    /// Where the hash cache lives; `None` hashes every file every time. Its directory must exist
    /// and be writable (the scan fails otherwise, naming the path). A cache file inside the root
    /// is left out of the manifest, but outside is cleaner.
    pub cache: Option<PathBuf>,
    /// Ignore the cache and hash every file (`--checksum`); the cache is still rewritten.
    pub checksum: bool,
    /// Record `user.*` extended attributes.
    pub xattrs: bool,
}

impl ScanConfig {
    /// Defaults: no excludes, no cache, trust the cache, record xattrs.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            exclude: Vec::new(),
            cache: None,
            checksum: false,
            xattrs: true,
        }
    }
}

/// The result of a scan: the manifest, what it cost, and the local facts behind each entry.
#[derive(Debug, Clone)]
pub struct Scan {
    pub manifest: Manifest,
    pub stats: ScanStats,
    /// `local[i]` belongs to `manifest.entries()[i]`.
    local: Vec<LocalFacts>,
    /// The root directory's own facts (a name added or removed at the top moves its times).
    root_facts: Option<LocalFacts>,
    /// With a hash cache: the instant from which a stat cannot vouch for content (see
    /// [`cache`](crate::cache)): a path whose mtime and ctime are both older cannot change
    /// without its stat changing.
    settled_before_ns: Option<i64>,
}

impl Scan {
    /// What the scan saw on disk for `path`: device, inode, size, mtime and ctime.
    pub fn local(&self, path: &StackPath) -> Option<&LocalFacts> {
        let i = self
            .manifest
            .entries()
            .binary_search_by(|e| e.path.cmp(path))
            .ok()?;
        self.local.get(i)
    }

    /// Regular files whose inode has more links than the scan found inside the tree: the other
    /// links are outside it (or excluded). Sorted by path.
    ///
    /// The target treats such a live file as drift: writing into it, or setting its owner or
    /// mode, would change a file outside the stack, so it is only ever replaced by a rename.
    pub fn outside_links(&self) -> Vec<StackPath> {
        let mut found: HashMap<(u64, u64), u64> = HashMap::new();
        for (e, f) in self.entries_with_facts() {
            if e.file().is_some() && f.nlink > 1 {
                *found.entry((f.dev, f.ino)).or_default() += 1;
            }
        }
        self.entries_with_facts()
            .filter(|(e, f)| {
                e.file().is_some()
                    && f.nlink > 1
                    && found.get(&(f.dev, f.ino)).is_some_and(|&n| f.nlink > n)
            })
            .map(|(e, _)| e.path.clone())
            .collect()
    }

    /// Entries paired with their local facts, in manifest order.
    pub fn entries_with_facts(&self) -> impl Iterator<Item = (&Entry, &LocalFacts)> {
        self.manifest.entries().iter().zip(&self.local)
    }

    /// What it takes to tell later, with one `lstat` per path and no read, that the tree is still
    /// exactly what this scan found ([`Unchanged::holds`]). `None` without a hash cache (the
    /// scan then has no start instant to judge its stats by).
    pub fn unchanged_check(&self) -> Option<Unchanged> {
        Some(Unchanged {
            root: self.manifest.root(),
            root_facts: self.root_facts?,
            facts: self.local.clone(),
            settled_before_ns: self.settled_before_ns?,
        })
    }
}

/// The stat facts of a scanned tree, to check without scanning again that nothing in it changed
/// (see [`Scan::unchanged_check`]).
///
/// Every change to a path moves its ctime (content, owner, mode, xattrs, a new hard link) or its
/// inode (a replacement), and every name added, removed or renamed moves its directory's
/// mtime, so a tree whose every path (and its root) `lstat`s as scanned is the tree scanned,
/// provided each of those stats was taken after the path last changed. The scan cannot know that
/// of a path whose mtime or ctime is not older than its own start (a write in the same clock
/// tick leaves the stat as it was, as the hash cache knows): with any such path the check
/// answers "cannot tell", and the caller scans again.
#[derive(Debug, Clone)]
pub struct Unchanged {
    root: Hash,
    root_facts: LocalFacts,
    facts: Vec<LocalFacts>,
    settled_before_ns: i64,
}

impl Unchanged {
    /// True if `manifest` is the tree scanned (same root hash) and every path of it under
    /// `root_dir`, and `root_dir` itself, still `lstat`s exactly as scanned. False if anything
    /// differs, or if some path changed too close to the scan for its stat to tell.
    pub fn holds(&self, root_dir: &Path, manifest: &Manifest) -> io::Result<bool> {
        if manifest.len() != self.facts.len() || manifest.root() != self.root {
            return Ok(false);
        }
        let settled = |f: &LocalFacts| {
            f.mtime_ns < self.settled_before_ns && f.ctime_ns < self.settled_before_ns
        };
        if !settled(&self.root_facts) || !self.facts.iter().all(settled) {
            return Ok(false);
        }
        match fs::symlink_metadata(root_dir) {
            Ok(md) if LocalFacts::of(&md) == self.root_facts => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        // One `lstat` per path, on as many threads as a scan uses: this runs with the
        // standby stopped.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_THREADS);
        let piece = self.facts.len().div_ceil(threads).max(1);
        let check = |entries: &[Entry], facts: &[LocalFacts]| -> io::Result<bool> {
            for (e, f) in entries.iter().zip(facts) {
                if !f.still_match(root_dir, &e.path)? {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        if threads == 1 || self.facts.len() <= NAMES_PER_TASK {
            return check(manifest.entries(), &self.facts);
        }
        std::thread::scope(|s| {
            let mut all = Ok(true);
            let mut handles = Vec::new();
            for (e, f) in manifest
                .entries()
                .chunks(piece)
                .zip(self.facts.chunks(piece))
            {
                match std::thread::Builder::new()
                    .name("scan".into())
                    .spawn_scoped(s, move || check(e, f))
                {
                    Ok(h) => handles.push(h),
                    // No thread (a process limit): this one checks the piece.
                    Err(_) => all = both(all, check(e, f)),
                }
            }
            for h in handles {
                match h.join() {
                    Ok(r) => all = both(all, r),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            all
        })
    }
}

/// True if both pieces of a check held. Otherwise false, or an error of the piece that was
/// looked at first: a later piece's error may be dropped, since either answer means "scan".
fn both(a: io::Result<bool>, b: io::Result<bool>) -> io::Result<bool> {
    Ok(a? && b?)
}

/// The stat facts of one path that are not in the manifest but tell whether the path changed
/// since it was scanned: a later write moves ctime, a replacement changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalFacts {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// The inode's link count.
    pub nlink: u64,
}

impl LocalFacts {
    /// The facts in `md` (from `lstat` or `fstat`).
    pub fn of(md: &Metadata) -> Self {
        let key = StatKey::of(md);
        Self {
            dev: key.dev,
            ino: key.ino,
            size: key.size,
            mtime_ns: key.mtime_ns,
            ctime_ns: key.ctime_ns,
            nlink: md.nlink(),
        }
    }

    /// True if `root/path` still `lstat`s exactly as when these facts were taken. A missing path
    /// is `Ok(false)`. One `lstat`, no reads; like the hash cache, it cannot see a write that
    /// landed in the same timestamp tick as the scan's `stat`.
    pub fn still_match(&self, root: &Path, path: &StackPath) -> io::Result<bool> {
        match fs::symlink_metadata(root.join(OsStr::from_bytes(path.as_bytes()))) {
            Ok(md) => Ok(Self::of(&md) == *self),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What a scan did, for logs, metrics and the summary a person reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanStats {
    /// Entries in the manifest.
    pub entries: u64,
    /// Inodes whose content was read and hashed (a hardlinked inode counts once).
    pub files_hashed: u64,
    /// Files whose hash came from the cache without a read.
    pub files_from_cache: u64,
    /// Content bytes read for hashing.
    pub bytes_hashed: u64,
    /// Paths whose xattrs were read from the file system; a file the cache vouches for with
    /// its xattrs is not read again.
    pub xattrs_read: u64,
    /// Paths the exclude patterns matched (an excluded directory counts once).
    pub excluded: u64,
    /// Paths that are not entries (or, for another file system, not descended into), and why.
    pub skipped: Vec<Skipped>,
    /// Files whose content kept changing while they were hashed (only on a live stack). Their
    /// entry holds what was read, and their hash is not cached.
    pub changed_during_scan: Vec<StackPath>,
    /// What happened to the hash cache file.
    pub cache: CacheStatus,
}

/// A path the scan did not turn into a (complete) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: StackPath,
    pub reason: SkipReason,
}

/// Why a path is in [`ScanStats::skipped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Socket,
    Fifo,
    BlockDevice,
    CharDevice,
    /// A directory on another file system (a mount point): it is an empty directory entry, its
    /// content is not scanned (`rsync -x`).
    OtherFilesystem,
    /// Listed by its directory but gone before it could be looked at.
    Vanished,
}

/// Why a scan failed. Every variant names the path and what was being done to it.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("stack root {root} does not exist")]
    RootMissing { root: PathBuf },
    #[error("stack root {root} is not a directory")]
    RootNotDir { root: PathBuf },
    #[error("resolving stack root {root}: {source}")]
    Root { root: PathBuf, source: io::Error },
    #[error("invalid exclude pattern {pattern:?}: {source}")]
    BadExclude {
        pattern: String,
        source: ignore::Error,
    },
    #[error("lstat {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("reading directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("reading symlink {path}: {source}")]
    ReadLink { path: PathBuf, source: io::Error },
    #[error("reading extended attributes of {path}: {source}")]
    Xattr { path: PathBuf, source: io::Error },
    #[error("{path} was replaced while it was scanned, {ATTEMPTS} times; stop what writes there")]
    Changed { path: PathBuf },
    #[error("{path} cannot be a stack path: {source}")]
    BadPath { path: PathBuf, source: PathError },
    #[error("writing hash cache {path}: {source}")]
    CacheWrite { path: PathBuf, source: io::Error },
    #[error("scanned tree is not a valid manifest: {0}")]
    Manifest(#[from] ManifestError),
}

/// Scans `cfg.root` into a manifest, using and then rewriting the hash cache if one is set.
///
/// Directories are walked by up to [`MAX_THREADS`] threads (one per core), a big directory's
/// names shared out in pieces of [`NAMES_PER_TASK`]: a scan is one `lstat` and one
/// `llistxattr` per path plus the hashing of what the cache cannot vouch for, and it is what a
/// cycle spends with the stack stopped when little changed. The manifest does not depend on the
/// thread count.
pub fn scan(cfg: &ScanConfig) -> Result<Scan, ScanError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    scan_with_threads(cfg, threads)
}

/// [`scan`] with at most `threads` walking threads (at least one, at most [`MAX_THREADS`]); the
/// calling thread is one of them.
pub fn scan_with_threads(cfg: &ScanConfig, threads: usize) -> Result<Scan, ScanError> {
    let root = resolve_root(&cfg.root)?;
    let excludes = build_excludes(&root, &cfg.exclude)?;
    // Before the cache's temporary file exists, so that a failure here leaves none behind.
    let md = lstat(&root)?;

    let (loaded, status) = match &cfg.cache {
        None => (LoadedCache::default(), CacheStatus::Disabled),
        Some(_) if cfg.checksum => (LoadedCache::default(), CacheStatus::Bypassed),
        Some(path) => cache::load(path, &root),
    };
    let (mut pending, cache_names) = match &cfg.cache {
        None => (None, None),
        Some(path) => {
            let pending = PendingCache::begin(path).map_err(|source| ScanError::CacheWrite {
                path: path.clone(),
                source,
            })?;
            (Some(pending), cache_location(path))
        }
    };

    let root_facts = Some(LocalFacts::of(&md));
    let shared = Shared {
        cfg,
        root_dev: md.dev(),
        excludes,
        loaded,
        cache_names,
        record_cache: pending.is_some(),
        inodes: Mutex::new(HashMap::new()),
        queue: Mutex::new(Queue {
            tasks: vec![Task::Dir(PendingDir {
                abs: root.clone(),
                rel: None,
                id: (md.dev(), md.ino()),
            })],
            busy: 0,
            error: None,
            panicked: false,
        }),
        ready: Condvar::new(),
    };
    let workers = run_workers(&shared, threads.clamp(1, MAX_THREADS));
    let Shared { loaded, queue, .. } = shared;
    let walked = match queue
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .error
    {
        Some(e) => Err(e),
        None => Ok(()),
    };

    let mut stats = ScanStats {
        entries: 0,
        files_hashed: 0,
        files_from_cache: 0,
        bytes_hashed: 0,
        xattrs_read: 0,
        excluded: 0,
        skipped: Vec::new(),
        changed_during_scan: Vec::new(),
        cache: status,
    };
    let mut raws = Vec::with_capacity(workers.iter().map(|w| w.raws.len()).sum());
    for mut w in workers {
        raws.append(&mut w.raws);
        stats.files_hashed += w.tally.files_hashed;
        stats.files_from_cache += w.tally.files_from_cache;
        stats.bytes_hashed += w.tally.bytes_hashed;
        stats.xattrs_read += w.tally.xattrs_read;
        stats.excluded += w.tally.excluded;
        stats.skipped.append(&mut w.tally.skipped);
        stats
            .changed_during_scan
            .append(&mut w.tally.changed_during_scan);
        if let Some(p) = &mut pending {
            for (path, key, hash, xattrs, from_cache) in w.records {
                p.record(&path, key, hash, xattrs, from_cache);
            }
        }
    }
    stats.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    stats.changed_during_scan.sort();

    let settled_before_ns = pending.as_ref().map(|p| p.scan_start_ns);
    let manifest = walked.and_then(|()| {
        let (entries, local) = assign_link_groups(raws);
        Ok((Manifest::new(entries)?, local))
    });
    let (manifest, local) = match manifest {
        Ok(m) => m,
        Err(e) => {
            if let Some(p) = pending {
                p.abandon();
            }
            return Err(e);
        }
    };
    if let (Some(p), Some(path)) = (pending, &cfg.cache) {
        if p.same_as(&loaded) {
            p.abandon();
        } else {
            p.commit(&root).map_err(|source| ScanError::CacheWrite {
                path: path.clone(),
                source,
            })?;
        }
    }
    stats.entries = manifest.len() as u64;
    Ok(Scan {
        manifest,
        stats,
        local,
        root_facts,
        settled_before_ns,
    })
}

/// Runs `threads` workers over `shared`'s queue until it is empty and nobody is busy, or one
/// failed; the calling thread is the first worker.
fn run_workers(shared: &Shared<'_>, threads: usize) -> Vec<Found> {
    if threads == 1 {
        return vec![Worker::new(shared).run()];
    }
    std::thread::scope(|s| {
        let spawned: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("scan".into())
                    .spawn_scoped(s, || Worker::new(shared).run())
                    // No thread (a process limit): the others do its share.
                    .ok()
            })
            .collect();
        let mut all = vec![Worker::new(shared).run()];
        for h in spawned {
            match h.join() {
                Ok(w) => all.push(w),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    })
}

/// The entry for a scanned root itself, as the directory `at` of a bigger tree: the root's
/// owner, mode, mtime and (with `xattrs`) `user.*` xattrs, the root reached through symlinks as
/// [`scan`] does. A named volume's root directory is grafted this way, so the standby's volume
/// gets the owner and mode its database checks (PostgreSQL refuses a data dir not owned by it
/// or not `0700`).
pub fn root_entry(root: &Path, at: StackPath, xattrs: bool) -> Result<Entry, ScanError> {
    let resolved = resolve_root(root)?;
    let md = fs::metadata(&resolved).map_err(|source| ScanError::Stat {
        path: resolved.clone(),
        source,
    })?;
    let xattrs = if xattrs {
        user_xattrs(&resolved)?.unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Entry {
        path: at,
        kind: EntryKind::Dir,
        meta: meta(&md),
        xattrs,
    })
}

fn resolve_root(root: &Path) -> Result<PathBuf, ScanError> {
    let resolved = fs::canonicalize(root).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ScanError::RootMissing {
            root: root.to_path_buf(),
        },
        _ => ScanError::Root {
            root: root.to_path_buf(),
            source,
        },
    })?;
    let md = fs::metadata(&resolved).map_err(|source| ScanError::Root {
        root: root.to_path_buf(),
        source,
    })?;
    if !md.is_dir() {
        return Err(ScanError::RootNotDir {
            root: root.to_path_buf(),
        });
    }
    Ok(resolved)
}

fn build_excludes(root: &Path, patterns: &[String]) -> Result<Gitignore, ScanError> {
    let mut builder = GitignoreBuilder::new(root);
    // A typo like `[abc` is an error rather than a literal that silently matches nothing.
    builder.allow_unclosed_class(false);
    for pattern in patterns {
        builder
            .add_line(None, pattern)
            .map_err(|source| ScanError::BadExclude {
                pattern: pattern.clone(),
                source,
            })?;
    }
    builder.build().map_err(|source| ScanError::BadExclude {
        pattern: patterns.join(" "),
        source,
    })
}

/// The cache file's resolved directory and name, so the walk can leave it (and its temporary
/// file) out if it lies inside the root.
fn cache_location(path: &Path) -> Option<(PathBuf, Vec<u8>)> {
    let name = path.file_name()?.as_bytes().to_vec();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some((fs::canonicalize(dir).ok()?, name))
}

/// An entry before hardlink groups are assigned.
struct Raw {
    entry: Entry,
    facts: LocalFacts,
    /// `(dev, ino)` of a file with more than one link.
    inode: Option<(u64, u64)>,
}

/// Walking threads a scan uses at most.
pub const MAX_THREADS: usize = 8;
/// A directory with more names than this is shared out among the workers in pieces this big.
pub const NAMES_PER_TASK: usize = 256;

/// What the walking threads share: the configuration, the cache as loaded, and the queue.
struct Shared<'a> {
    cfg: &'a ScanConfig,
    root_dev: u64,
    excludes: Gitignore,
    loaded: LoadedCache,
    cache_names: Option<(PathBuf, Vec<u8>)>,
    /// A hash cache is kept: the workers note what it may vouch for.
    record_cache: bool,
    /// Size and hash of each multiply-linked inode already resolved, so that every path of it
    /// gets the same content (and it is hashed once, unless two threads meet it at once).
    inodes: Mutex<HashMap<(u64, u64), (u64, Hash)>>,
    queue: Mutex<Queue>,
    /// A task was queued, or the walk is over.
    ready: Condvar,
}

struct Queue {
    tasks: Vec<Task>,
    /// Workers holding a task: while one is, more tasks may come.
    busy: usize,
    /// The first failure; the others stop at their next task.
    error: Option<ScanError>,
    /// A worker panicked: the others stop, and the scan re-raises the panic.
    panicked: bool,
}

enum Task {
    /// Read a directory and visit what is in it.
    Dir(PendingDir),
    /// Visit these names of a directory already read.
    Names(Arc<PendingDir>, Vec<Vec<u8>>),
}

/// A directory still to be read: where it is and which inode `lstat` saw there.
struct PendingDir {
    abs: PathBuf,
    rel: Option<StackPath>,
    id: (u64, u64),
}

enum Visit {
    Done,
    /// The path changed type or inode between `lstat` and `open`: look again.
    Retry,
}

impl Shared<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next task, or `None` when there is none and none can come (or the walk failed).
    fn next(&self) -> Option<Task> {
        let mut q = self.lock();
        loop {
            if q.error.is_some() || q.panicked {
                return None;
            }
            if let Some(t) = q.tasks.pop() {
                q.busy += 1;
                return Some(t);
            }
            if q.busy == 0 {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn push(&self, t: Task) {
        self.lock().tasks.push(t);
        self.ready.notify_one();
    }

    /// A task taken by [`next`](Self::next) is over, with `result`.
    fn done(&self, result: Result<(), ScanError>) {
        let mut q = self.lock();
        q.busy -= 1;
        if let Err(e) = result {
            q.error.get_or_insert(e);
        }
        if q.busy == 0 || q.error.is_some() {
            drop(q);
            self.ready.notify_all();
        }
    }
}

/// Marks the queue if a worker unwinds with a task taken, so the others do not wait for it.
struct PanicGuard<'s, 'a> {
    shared: &'s Shared<'a>,
}

impl Drop for PanicGuard<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.lock().panicked = true;
            self.shared.ready.notify_all();
        }
    }
}

/// What one worker counted; the scan adds them up.
#[derive(Default)]
struct Tally {
    files_hashed: u64,
    files_from_cache: u64,
    bytes_hashed: u64,
    xattrs_read: u64,
    excluded: u64,
    skipped: Vec<Skipped>,
    changed_during_scan: Vec<StackPath>,
}

/// A hash cache entry a worker vouches for: path, stat, hash, xattrs if read, and whether the
/// loaded cache vouched for all of it already.
type CacheRecord = (Vec<u8>, StatKey, Hash, Option<Vec<Xattr>>, bool);

/// What one walking thread found, and the hash cache entries it vouches for.
struct Found {
    raws: Vec<Raw>,
    records: Vec<CacheRecord>,
    tally: Tally,
}

/// One walking thread.
struct Worker<'s, 'a> {
    shared: &'s Shared<'a>,
    raws: Vec<Raw>,
    records: Vec<CacheRecord>,
    buf: Vec<u8>,
    tally: Tally,
}

impl<'s, 'a> Worker<'s, 'a> {
    fn new(shared: &'s Shared<'a>) -> Self {
        Self {
            shared,
            raws: Vec::new(),
            records: Vec::new(),
            buf: Vec::new(),
            tally: Tally::default(),
        }
    }

    fn run(mut self) -> Found {
        let guard = PanicGuard {
            shared: self.shared,
        };
        while let Some(task) = self.shared.next() {
            let result = match task {
                Task::Dir(dir) => self.dir(dir),
                Task::Names(dir, names) => self.names(&dir, names),
            };
            self.shared.done(result);
        }
        drop(guard);
        Found {
            raws: self.raws,
            records: self.records,
            tally: self.tally,
        }
    }

    /// Reads `dir` and visits its names, sharing out all but the first piece of a big one.
    fn dir(&mut self, dir: PendingDir) -> Result<(), ScanError> {
        let mut names = self.read_dir(&dir)?;
        if names.len() <= NAMES_PER_TASK {
            return self.names(&dir, names);
        }
        let dir = Arc::new(dir);
        while names.len() > NAMES_PER_TASK {
            let piece = names.split_off(names.len() - NAMES_PER_TASK);
            self.shared.push(Task::Names(dir.clone(), piece));
        }
        self.names(&dir, names)
    }

    fn names(&mut self, dir: &PendingDir, names: Vec<Vec<u8>>) -> Result<(), ScanError> {
        for name in names {
            let abs = dir.abs.join(OsStr::from_bytes(&name));
            if self.is_cache_file(&dir.abs, &name) {
                continue;
            }
            let rel = match &dir.rel {
                Some(parent) => parent.join(&name),
                None => StackPath::new(name),
            }
            .map_err(|source| ScanError::BadPath {
                path: abs.clone(),
                source,
            })?;
            self.visit_child(abs, rel)?;
        }
        Ok(())
    }

    /// The names in `dir`, read from a descriptor opened without following a symlink and checked
    /// to be the directory `lstat` saw.
    fn read_dir(&self, dir: &PendingDir) -> Result<Vec<Vec<u8>>, ScanError> {
        let err = |source: io::Error| ScanError::ReadDir {
            path: dir.abs.clone(),
            source,
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::open(&dir.abs, flags, Mode::empty()) {
            Ok(fd) => fd,
            // Removed since its lstat, as a running service may: it is gone, and so are its
            // children.
            Err(Errno::NOENT) => return Ok(Vec::new()),
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(ScanError::Changed {
                    path: dir.abs.clone(),
                });
            }
            Err(e) => return Err(err(e.into())),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| err(e.into()))?;
        if (st.st_dev, st.st_ino) != dir.id {
            return Err(ScanError::Changed {
                path: dir.abs.clone(),
            });
        }
        let mut names = Vec::new();
        for item in rustix::fs::Dir::new(fd).map_err(|e| err(e.into()))? {
            let item = item.map_err(|e| err(e.into()))?;
            let name = item.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        Ok(names)
    }

    fn is_cache_file(&self, dir: &Path, name: &[u8]) -> bool {
        let Some((cache_dir, cache_name)) = &self.shared.cache_names else {
            return false;
        };
        dir == cache_dir
            && name.starts_with(cache_name)
            && (name.len() == cache_name.len() || name[cache_name.len()..].starts_with(b".tmp."))
    }

    fn visit_child(&mut self, abs: PathBuf, rel: StackPath) -> Result<(), ScanError> {
        for _ in 0..ATTEMPTS {
            let md = match fs::symlink_metadata(&abs) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.skip(rel, SkipReason::Vanished);
                    return Ok(());
                }
                Err(source) => return Err(ScanError::Stat { path: abs, source }),
            };
            let ft = md.file_type();
            let rel_os = Path::new(OsStr::from_bytes(rel.as_bytes()));
            if self
                .shared
                .excludes
                .matched(rel_os, ft.is_dir())
                .is_ignore()
            {
                self.tally.excluded += 1;
                return Ok(());
            }
            if ft.is_dir() {
                let Some(entry) = self.entry(&abs, rel.clone(), EntryKind::Dir, &md)? else {
                    self.skip(rel, SkipReason::Vanished);
                    return Ok(());
                };
                self.push(entry, &md, None);
                if md.dev() == self.shared.root_dev {
                    self.shared.push(Task::Dir(PendingDir {
                        abs,
                        rel: Some(rel),
                        id: (md.dev(), md.ino()),
                    }));
                } else {
                    self.skip(rel, SkipReason::OtherFilesystem);
                }
                return Ok(());
            } else if ft.is_symlink() {
                let target = match fs::read_link(&abs) {
                    Ok(t) => t.into_os_string().into_vec(),
                    // Replaced by something else since the lstat: look again.
                    Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => continue,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(ScanError::ReadLink { path: abs, source }),
                };
                let entry = Entry {
                    path: rel,
                    kind: EntryKind::Symlink { target },
                    meta: meta(&md),
                    // Linux does not allow user.* xattrs on symlinks.
                    xattrs: Vec::new(),
                };
                self.push(entry, &md, None);
                return Ok(());
            } else if ft.is_file() {
                match self.visit_file(&abs, &rel, &md)? {
                    Visit::Done => return Ok(()),
                    Visit::Retry => continue,
                }
            } else {
                let reason = if ft.is_socket() {
                    SkipReason::Socket
                } else if ft.is_fifo() {
                    SkipReason::Fifo
                } else if ft.is_block_device() {
                    SkipReason::BlockDevice
                } else {
                    SkipReason::CharDevice
                };
                self.skip(rel, reason);
                return Ok(());
            }
        }
        Err(ScanError::Changed { path: abs })
    }

    fn visit_file(
        &mut self,
        abs: &Path,
        rel: &StackPath,
        md: &Metadata,
    ) -> Result<Visit, ScanError> {
        let inode = (md.nlink() > 1).then(|| (md.dev(), md.ino()));
        let key = StatKey::of(md);
        let inodes = || {
            self.shared
                .inodes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        let known = inode.and_then(|i| inodes().get(&i).copied());
        let cached = || {
            if self.shared.cfg.checksum {
                None
            } else {
                self.shared.loaded.lookup_with_xattrs(rel.as_bytes(), &key)
            }
        };
        // The xattrs the cache knows for this very stat, when it vouches for the content too.
        let mut cached_xattrs: Option<Vec<Xattr>> = None;
        let (size, hash, stat, stable, from_cache) = if let Some((size, hash)) = known {
            let from_cache = match cached() {
                Some((h, x)) if h == hash => {
                    cached_xattrs = x.map(<[Xattr]>::to_vec);
                    true
                }
                _ => false,
            };
            (size, hash, md.clone(), true, from_cache)
        } else if let Some((hash, x)) = cached() {
            self.tally.files_from_cache += 1;
            cached_xattrs = x.map(<[Xattr]>::to_vec);
            (md.size(), hash, md.clone(), true, true)
        } else {
            let Some(hashed) = self.hash_file(abs, md)? else {
                return Ok(Visit::Retry);
            };
            self.tally.files_hashed += 1;
            self.tally.bytes_hashed += hashed.size;
            if !hashed.stable {
                self.tally.changed_during_scan.push(rel.clone());
            }
            (hashed.size, hashed.hash, hashed.stat, hashed.stable, false)
        };
        // Every path of an inode gets the content its first one got, even if two threads
        // hashed it at once and it changed in between (then it is not vouched for).
        let (size, hash, stable) = match inode {
            Some(i) => {
                let first = *inodes().entry(i).or_insert((size, hash));
                if stable && first != (size, hash) {
                    self.tally.changed_during_scan.push(rel.clone());
                }
                (first.0, first.1, stable && first == (size, hash))
            }
            None => (size, hash, stable),
        };
        let kind = EntryKind::File {
            size,
            hash,
            link_group: None,
        };
        let xattrs_from_cache = cached_xattrs.is_some();
        let Some(entry) = self.entry_with(abs, rel.clone(), kind, &stat, cached_xattrs)? else {
            self.skip(rel.clone(), SkipReason::Vanished);
            return Ok(Visit::Done);
        };
        if self.shared.record_cache && stable {
            // With xattrs read here, the entry learns them (a cache that did not know them is
            // written again, once).
            let (xattrs, from_cache) = if self.shared.cfg.xattrs {
                (Some(entry.xattrs.clone()), from_cache && xattrs_from_cache)
            } else {
                (None, from_cache)
            };
            self.records.push((
                rel.as_bytes().to_vec(),
                StatKey::of(&stat),
                hash,
                xattrs,
                from_cache,
            ));
        }
        self.push(entry, &stat, inode);
        Ok(Visit::Done)
    }

    /// Hashes the file at `abs`, opened without following a symlink and checked (by `fstat`) to
    /// be the inode `md` describes. `None` if it is not: the caller looks again.
    fn hash_file(&mut self, abs: &Path, md: &Metadata) -> Result<Option<Hashed>, ScanError> {
        // NONBLOCK: if a fifo took the file's place, `open` must not wait for a writer.
        let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits() as i32)
            .open(abs)
        {
            Ok(f) => f,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) =>
            {
                return Ok(None);
            }
            Err(source) => {
                return Err(ScanError::Open {
                    path: abs.to_path_buf(),
                    source,
                });
            }
        };
        let fstat = |file: &File| {
            file.metadata().map_err(|source| ScanError::Stat {
                path: abs.to_path_buf(),
                source,
            })
        };
        let mut before = fstat(&file)?;
        if !before.is_file() || (before.dev(), before.ino()) != (md.dev(), md.ino()) {
            return Ok(None);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (size, hash) = self.hash_content(&mut file, abs)?;
            let after = fstat(&file)?;
            let stable = StatKey::of(&before) == StatKey::of(&after);
            if stable || attempt == ATTEMPTS {
                return Ok(Some(Hashed {
                    size,
                    hash,
                    stat: before,
                    stable,
                }));
            }
            before = after;
        }
    }

    fn hash_content(&mut self, file: &mut File, abs: &Path) -> Result<(u64, Hash), ScanError> {
        let err = |source| ScanError::Read {
            path: abs.to_path_buf(),
            source,
        };
        file.rewind().map_err(err)?;
        if self.buf.is_empty() {
            self.buf = vec![0; HASH_BUF];
        }
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        loop {
            match file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&self.buf[..n]);
                    size += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok((size, hasher.finalize().into()))
    }

    /// The entry for what `md` describes, with its xattrs; `None` if it vanished meanwhile (a
    /// running service deletes files while it is scanned: PostgreSQL recycles WAL segments).
    fn entry(
        &mut self,
        abs: &Path,
        path: StackPath,
        kind: EntryKind,
        md: &Metadata,
    ) -> Result<Option<Entry>, ScanError> {
        self.entry_with(abs, path, kind, md, None)
    }

    /// [`entry`](Self::entry), with the xattrs the hash cache vouches for `md`, if it does:
    /// then they are not read again.
    fn entry_with(
        &mut self,
        abs: &Path,
        path: StackPath,
        kind: EntryKind,
        md: &Metadata,
        known_xattrs: Option<Vec<Xattr>>,
    ) -> Result<Option<Entry>, ScanError> {
        let xattrs = match (self.shared.cfg.xattrs, known_xattrs) {
            (false, _) => Vec::new(),
            (true, Some(x)) => x,
            (true, None) => {
                self.tally.xattrs_read += 1;
                match user_xattrs(abs)? {
                    Some(x) => x,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Entry {
            path,
            kind,
            meta: meta(md),
            xattrs,
        }))
    }

    fn push(&mut self, entry: Entry, md: &Metadata, inode: Option<(u64, u64)>) {
        self.raws.push(Raw {
            entry,
            facts: LocalFacts::of(md),
            inode,
        });
    }

    fn skip(&mut self, path: StackPath, reason: SkipReason) {
        self.tally.skipped.push(Skipped { path, reason });
    }
}

struct Hashed {
    size: u64,
    hash: Hash,
    /// The `fstat` the hash belongs to.
    stat: Metadata,
    /// False if the file kept changing while it was read.
    stable: bool,
}

fn lstat(path: &Path) -> Result<Metadata, ScanError> {
    fs::symlink_metadata(path).map_err(|source| ScanError::Stat {
        path: path.to_path_buf(),
        source,
    })
}

fn meta(md: &Metadata) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime_ns: cache::timestamp_ns(md.mtime(), md.mtime_nsec()),
    }
}

/// The `user.*` extended attributes of `path` (not following a symlink), sorted by name; `None`
/// if nothing is at `path` any more. A file system without xattr support has none.
fn user_xattrs(path: &Path) -> Result<Option<Vec<Xattr>>, ScanError> {
    let err = |e: Errno| ScanError::Xattr {
        path: path.to_path_buf(),
        source: e.into(),
    };
    let names = match read_sized(|buf| rustix::fs::llistxattr(path, buf)) {
        Ok(names) => names,
        Err(Errno::NOTSUP) => return Ok(Some(Vec::new())),
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut xattrs = Vec::new();
    for name in names.split(|&b| b == 0) {
        if !name.starts_with(b"user.") {
            continue;
        }
        let value = match read_sized(|buf| rustix::fs::lgetxattr(path, name, buf)) {
            Ok(v) => v,
            // Removed between list and get.
            Err(Errno::NODATA) => continue,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        xattrs.push(Xattr {
            name: name.to_vec(),
            value,
        });
    }
    xattrs.sort();
    Ok(Some(xattrs))
}

/// Calls `f` with a growing buffer until what it returns fits (`ERANGE` means it did not).
fn read_sized(
    mut f: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> rustix::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // The kernel's xattr limit is 64 KiB per value and per list; past that, give up.
            Err(Errno::RANGE) if buf.len() < (1 << 17) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e),
        }
    }
}

/// Sorts entries by path and numbers hardlink groups: inodes with at least two paths in the tree
/// get ids 0, 1, 2… in the order of their first path; a lone path of a multiply-linked inode
/// (its other links are outside the tree or excluded) gets none.
fn assign_link_groups(mut raws: Vec<Raw>) -> (Vec<Entry>, Vec<LocalFacts>) {
    raws.sort_by(|a, b| a.entry.path.cmp(&b.entry.path));
    let mut members: HashMap<(u64, u64), u32> = HashMap::new();
    for inode in raws.iter().filter_map(|r| r.inode) {
        *members.entry(inode).or_default() += 1;
    }
    let mut ids: HashMap<(u64, u64), u32> = HashMap::new();
    let mut entries = Vec::with_capacity(raws.len());
    let mut local = Vec::with_capacity(raws.len());
    for mut raw in raws {
        if let (Some(inode), EntryKind::File { link_group, .. }) = (raw.inode, &mut raw.entry.kind)
            && members.get(&inode).is_some_and(|&n| n >= 2)
        {
            let next = ids.len() as u32;
            *link_group = Some(*ids.entry(inode).or_insert(next));
        }
        entries.push(raw.entry);
        local.push(raw.facts);
    }
    (entries, local)
}
