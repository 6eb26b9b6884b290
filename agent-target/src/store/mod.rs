//! The target's on-disk side of one stack: staging, journaled commits, generations, rollback
//! and verification. No network, no Docker: the driver calls these between the session's
//! actions and the stack's stop and start.
//!
//! ## Layout
//!
//! ```text
//! <live dir>                         the stack's data dir (config `path`); only ever reached
//!                                    through an fd of it, component by component (see below)
//! <state dir>                        default <parent of path as written>/.stackclone/<stack>/, 0700,
//!   lock                             flock: one process per stack   on the live dir's file system
//!   state                            StoreState as JSON, replaced atomically
//!   manifests/<G>                    committed manifest of generation G (wire frames)
//!   journal, journal.tmp             redo journal of the commit in progress
//!   journal.backed-up                "the Backup ops of the journal with this hash are done"
//!   hashcache                        scanner hash cache of the live dir
//!   staging/objects/<blake3 hex>     verified content, ready for a commit
//!   staging/tmp/                     files being received
//!   staging/patches/<blake3 hex>     in-place patches: changed ranges of one live file
//!   staging/prep/<n>                 files prepared for the next commit (content + metadata)
//!   generations/<G>/record           the state before commit G (JSON)
//!   generations/<G>/data/<slot>      what commit G replaced or deleted (rsync --backup-dir)
//!   generations/<G>/patches/<n>      bytes commit G overwrote in place
//! ```
//!
//! ## One commit
//!
//! 1. [`StackStore::prepare`] runs once the final pass is staged. The standby's stack is
//!    already stopped then (the final pass was planned against a scan of the stopped live dir:
//!    a running database rewrites its files, at the latest when it stops), except for a
//!    generation that changes nothing. It builds the op list from the
//!    [`Commit`]'s [`Changes`] (a pure function of them, the wanted manifest and what is
//!    staged: the `commit::plan` module, tested without a file system) and makes, for every
//!    file to create or replace, a ready file in
//!    `staging/prep/` — a hardlink of the staged object for the first path that needs that
//!    content, a (sparse) copy for any other path not in the same hardlink group — with owner,
//!    mode, xattrs and mtime already set. It also writes the new manifest and the generation
//!    record, and checks that every parent directory the ops need is a real directory (a
//!    symlink planted there refuses the commit before anything changed).
//! 2. [`StackStore::commit`] runs with the stack stopped, and does only renames and metadata:
//!    it refuses unless the live dir is still exactly the tree the commit was planned against
//!    ([`StoreError::ChangedSincePlanned`]; the next cycle converges) — proved by one `lstat`
//!    per path against the planning scan's stats, or by a rescan where those cannot tell —, then
//!    writes and fsyncs the journal, applies the ops, fsyncs the touched directories, writes
//!    `state`, removes the journal, clears staging and prunes old generations. Its duration
//!    grows with the number of changed paths, never with their size.
//!    [`StackStore::commit_unchanged`] is the same for a generation whose ops change nothing
//!    (the live dir already was the wanted tree): the driver does not stop the stack for it, and
//!    the tree it records as "before" is the tree it commits.
//!
//! ## Why any crash leaves exactly generation N-1 or N
//!
//! Before `journal` exists (it is published by an atomic rename after an fsync), nothing in
//! the live dir changed: the live dir is N-1, and recovery only deletes `journal.tmp`. Once it
//! exists, recovery rolls **forward**: it replays the whole journal, and every op is idempotent:
//!
//! - Phase A (`Backup`, deepest first): move the live entry at a path into the backup dir under
//!   a slot number. Done if the slot exists; nothing to do if the path does not exist (or its
//!   parent is not a directory: then nothing lives at that path inside the tree). Phase A only
//!   ever removes, so repeating it is harmless *while phase B has not started*.
//! - `EndBackups` writes a marker naming the journal by its hash. A replay that finds it skips
//!   phase A: after creation started, a `Backup` would move a *new* entry away.
//! - Phase B: `Mkdir` (done if a directory is there), `Place` (rename a prepared file into
//!   place; done if the prepared file is gone — nothing else removes it), `PlaceTree` (rename
//!   a new directory, built whole in staging with everything below it, into place, refusing to
//!   replace anything; done if the prepared directory is gone, likewise), `Symlink` (done if
//!   that symlink is there), `Link` (done if the path is the leader's inode), `Meta` /
//!   `SymlinkMeta` (setting metadata twice is setting it once), `Patch` (the same bytes at the
//!   same offsets, then the metadata). Directory metadata comes last,
//!   deepest first, for every directory that was created, changed or had children change.
//!
//! A crash after the state was written but before the journal was removed replays the journal
//! once more, harmlessly. Recovery (in [`StackStore::open`]) finishes the commit exactly as the
//! original run would have. Durability across power loss: prepared files are made durable
//! before the journal (one `syncfs` at the end of the prepare); touched directories, the backup dir and the state are fsynced before the journal is
//! removed; the ordering of metadata operations in between is the file system's (ext4 and XFS
//! commit them in order).
//!
//! ## Generations and rollback
//!
//! What commit G moved out of the live dir stays in `generations/<G>/data/` with the state
//! before G in `generations/<G>/record`, and the manifest of the previous generation stays in
//! `manifests/`. [`StackStore::rollback`] turns the clock back one generation at a time: it
//! stages the contents the previous manifest needs from the backup (hardlinks, verified by
//! hashing), from staging or from live files, and then *commits the previous manifest* through
//! the same journaled machinery — so a rollback is itself crash-safe and restores content,
//! owner, mode, mtimes, xattrs, symlinks and hardlinks exactly. It consumes the generation dir
//! it undid. `keep_generations` bounds how many dirs are kept (0: none; rollback impossible).
//!
//! ## Write only what changed
//!
//! Where the session asks for an in-place receive (a big, unlinked file whose basis is the
//! live file at the same path), the transfer is staged as a patch of the ranges that differ
//! ([`PatchFile`], see the `patch` module), not as a whole file. `prepare` saves the bytes the
//! patch will overwrite into `generations/<G>/patches/` (the generation costs the change, not
//! the file) and the commit's `Patch` op writes the ranges into the live file, fdatasyncs it and
//! sets its metadata: writes in proportion to the change, inside the commit window. Repeating
//! the op writes the same bytes again, so replay is safe; the live file must still be the one
//! the patch was made against (device, inode, size, mtime, ctime), checked when the patch is
//! counted as staged, in `prepare`, and again in `commit` before the journal exists. A rollback
//! rebuilds the old version in staging from the live file and the saved bytes, checks its hash,
//! and places it like any other content.
//!
//! ## No escape
//!
//! Every access to the live dir goes through the `tree` module: `openat` from the root fd, one
//! component at a time, `O_NOFOLLOW | O_DIRECTORY`, and `*at` calls that never follow the last
//! component. A symlink planted by a container, in the live dir or anywhere under the state
//! dir, can neither redirect a write nor leak a read outside.
//!
//! ## Decisions
//!
//! - Live roots in the one list of `stackclone_common::config::is_dangerous_root` (system
//!   directories such as `/`, `/var` and `/opt` themselves; anything inside `/etc`, `/usr`,
//!   `/boot`, `/root`, `/lib*`, `/var/spool` …) are refused unless `allow_dangerous_root`, both
//!   as written (`.` and `..` resolved) and after canonicalisation (so `/lib` → `/usr/lib` and
//!   a symlink to `/var` are caught).
//! - The backup dir of commit G is `generations/<G>` (named after the commit that displaced the
//!   entries), so pruning a generation removes exactly what restoring from it would need.
//! - Staged objects are cleared after every commit: a live file that was placed from an object
//!   shares its inode, and a container writing that file would otherwise change the "verified"
//!   object under its name.
//! - Recovery rolls forward only. A damaged published journal is [`StoreError::JournalCorrupt`]
//!   and the store refuses to open rather than guess.
//! - Left out: a rollback assumes the live dir is the committed generation. Divergence (the
//!   target's containers changed files after the commit) is not re-scanned first: the ops are
//!   robust to it (a missing path is skipped, an occupied one backed up), and `verify` shows
//!   what differs afterwards.

mod commit;
mod error;
mod journal;
mod patch;
mod role;
mod staging;
mod state;
mod tree;
mod verify;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use stackclone_common::{Scan, ScanConfig, Unchanged};
use stackclone_proto::manifest::{Hash, Manifest};
use stackclone_proto::path::StackPath;

pub use commit::{CommitReport, Prepared, RollbackReport};
pub use error::StoreError;
pub use patch::PatchFile;
pub use role::Promotion;
pub use staging::{BasisFile, LocalStage, StagingFile};
pub use state::StoreState;
pub use verify::{Difference, Drift, compare};

use stackclone_proto::session::StackState;
#[cfg(doc)]
use stackclone_proto::{plan::Changes, session::Commit};

use staging::StagingDirs;
use tree::Tree;

/// How a stack's store is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The stack's name; it names the default state dir.
    pub stack: String,
    /// The live data dir. Created if missing (the target may start empty).
    pub path: PathBuf,
    /// The state dir (staging, journal, generations); default `<parent of path>/.stackclone/
    /// <stack>`, the parent of `path` as written (not resolved through symlinks, so that a
    /// swapped stack dir is noticed: see `live-root`). Must be on the live dir's file system and
    /// outside it.
    pub state_dir: Option<PathBuf>,
    /// Generation dirs kept for rollback.
    pub keep_generations: u32,
    /// Accept a system directory as the live dir.
    pub allow_dangerous_root: bool,
}

impl StoreConfig {
    /// Defaults: state dir beside the live dir, 3 generations kept, system dirs refused.
    pub fn new(stack: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            stack: stack.into(),
            path: path.into(),
            state_dir: None,
            keep_generations: 3,
            allow_dangerous_root: false,
        }
    }
}

pub use stackclone_common::config::is_dangerous_root;

/// The file in the state dir that records which directory the live dir is.
const LIVE_ROOT: &str = "live-root";

/// The path of a stack is resolved through symlinks every time the store opens; if the
/// directory it leads to is not the one the store recorded (device and inode, at its first
/// open), the stack dir was swapped (for a symlink to somewhere else, say) and the store
/// refuses to write there. Someone who moved the data on purpose removes `live-root`.
fn check_live_root(stack: &str, live: &Tree, state_dir: &Tree) -> Result<(), StoreError> {
    let st = rustix::fs::fstat(live.fd())
        .map_err(|e| StoreError::io(stack, "stat", live.path().display().to_string(), e.into()))?;
    let now = format!("{} {}\n", st.st_dev, st.st_ino);
    let at = state_dir.path().join(LIVE_ROOT);
    match state::read_file(state_dir.fd(), LIVE_ROOT)
        .map_err(|e| StoreError::io(stack, "read", at.display().to_string(), e))?
    {
        Some(recorded) if recorded == now.as_bytes() => Ok(()),
        Some(recorded) => Err(StoreError::LiveRootChanged {
            stack: stack.to_owned(),
            live: live.path().to_path_buf(),
            recorded: String::from_utf8_lossy(&recorded).trim().to_owned(),
            now: now.trim().to_owned(),
            record: at,
        }),
        None => state::write_atomic(state_dir.fd(), LIVE_ROOT, now.as_bytes())
            .map_err(|e| StoreError::io(stack, "write", at.display().to_string(), e)),
    }
}

/// `p` made absolute and with `.` and `..` resolved lexically (before anything exists).
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

const STATE: &str = "state";
const JOURNAL: &str = "journal";
const JOURNAL_TMP: &str = "journal.tmp";
const MARKER: &str = "journal.backed-up";
pub(crate) const HASH_CACHE: &str = "hashcache";

/// One stack's store, open and locked. See the module doc.
#[derive(Debug)]
pub struct StackStore {
    stack: String,
    keep_generations: u32,
    live: Tree,
    state_dir: Tree,
    staging_dir: Tree,
    staging: Arc<StagingDirs>,
    generations: Tree,
    manifests: Tree,
    _lock: OwnedFd,
    state: StoreState,
    manifest: Arc<Manifest>,
    /// Token of the last `prepare`, which a `commit` must present.
    prepared: Option<u64>,
    next_token: u64,
    fail_after_ops: Option<usize>,
    /// The facts of the last [`StackStore::stack_state`] scan, and the live files it found
    /// linked outside the stack: the commit checks with them that the live dir is still the
    /// tree it was planned against, without a second scan (see [`StackStore::commit`]).
    last_scan: std::sync::Mutex<Option<(Unchanged, Vec<StackPath>)>>,
}

fn valid_stack_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl StoreConfig {
    /// The state dir this config names: `state_dir`, else `<parent of path>/.stackclone/<stack>`.
    /// The default is beside the path as written, not as resolved: if the stack dir is swapped
    /// for a symlink to somewhere else, the state dir (and its `live-root` record) stays where
    /// it was, and the swap is noticed.
    pub fn state_path(&self) -> PathBuf {
        match &self.state_dir {
            Some(p) => p.clone(),
            None => lexical(&self.path)
                .parent()
                .unwrap_or(Path::new("/"))
                .join(".stackclone")
                .join(&self.stack),
        }
    }
}

impl StackStore {
    /// Opens (creating what is missing) the store of one stack, takes its lock, finishes an
    /// interrupted commit and removes stale temporary files.
    pub fn open(cfg: StoreConfig) -> Result<Self, StoreError> {
        let stack = cfg.stack.clone();
        if !valid_stack_name(&stack) {
            return Err(StoreError::BadStackName { stack });
        }
        let io = |op: &'static str, p: &Path, e: io::Error| {
            StoreError::io(&stack, op, p.display().to_string(), e)
        };
        let given = lexical(&cfg.path);
        if is_dangerous_root(&given) && !cfg.allow_dangerous_root {
            return Err(StoreError::DangerousRoot { stack, path: given });
        }
        if !cfg.path.exists() {
            fs::create_dir_all(&cfg.path).map_err(|e| io("create live dir", &cfg.path, e))?;
        }
        let live_path = fs::canonicalize(&cfg.path).map_err(|e| io("resolve", &cfg.path, e))?;
        if is_dangerous_root(&live_path) && !cfg.allow_dangerous_root {
            return Err(StoreError::DangerousRoot {
                stack,
                path: live_path,
            });
        }
        let live_md = fs::metadata(&live_path).map_err(|e| io("stat", &live_path, e))?;
        if !live_md.is_dir() {
            return Err(io(
                "open live dir",
                &live_path,
                io::Error::from_raw_os_error(Errno::NOTDIR.raw_os_error()),
            ));
        }
        let state_path = cfg.state_path();
        // Check the file system before creating anything there.
        let mut existing = state_path.as_path();
        while !existing.exists() {
            existing = existing.parent().unwrap_or(Path::new("/"));
        }
        let other_fs = |state: PathBuf| StoreError::OtherFilesystem {
            stack: stack.clone(),
            live: live_path.clone(),
            state,
        };
        let dev = fs::metadata(existing)
            .map_err(|e| io("stat", existing, e))?
            .dev();
        if dev != live_md.dev() {
            return Err(other_fs(state_path));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_path)
            .map_err(|e| io("create state dir", &state_path, e))?;
        let state_path =
            fs::canonicalize(&state_path).map_err(|e| io("resolve", &state_path, e))?;
        if state_path.starts_with(&live_path) {
            return Err(StoreError::StateInsideLive {
                stack,
                live: live_path,
                state: state_path,
            });
        }
        let state_md = fs::metadata(&state_path).map_err(|e| io("stat", &state_path, e))?;
        if state_md.dev() != live_md.dev() {
            return Err(other_fs(state_path));
        }
        fs::set_permissions(&state_path, fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod 0700", &state_path, e))?;

        let live = Tree::open(&live_path).map_err(|e| io("open live dir", &live_path, e))?;
        let state_dir =
            Tree::open(&state_path).map_err(|e| io("open state dir", &state_path, e))?;
        let lock = rustix::fs::openat(
            state_dir.fd(),
            "lock",
            OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io("open lock file in", &state_path, e.into()))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(StoreError::Busy {
                    stack,
                    path: state_path,
                });
            }
            Err(e) => return Err(io("lock", &state_path, e.into())),
        }
        check_live_root(&stack, &live, &state_dir)?;
        let subdir = |parent: &Tree, name: &str| -> Result<Tree, StoreError> {
            let p = parent.path().join(name);
            match rustix::fs::mkdirat(parent.fd(), name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io("create", &p, e.into())),
            }
            Tree::open_at(parent.fd(), name, p.clone()).map_err(|e| io("open", &p, e))
        };
        let staging_dir = subdir(&state_dir, "staging")?;
        let tmp = subdir(&staging_dir, "tmp")?;
        let objects = subdir(&staging_dir, "objects")?;
        let patches = subdir(&staging_dir, "patches")?;
        subdir(&staging_dir, "prep")?;
        let generations = subdir(&state_dir, "generations")?;
        let manifests = subdir(&state_dir, "manifests")?;
        let staging = Arc::new(StagingDirs {
            stack: stack.clone(),
            tmp_path: tmp.path().to_path_buf(),
            objects_path: objects.path().to_path_buf(),
            patches_path: patches.path().to_path_buf(),
            tmp: into_fd(tmp),
            objects: into_fd(objects),
            patches: into_fd(patches),
        });

        let mut store = Self {
            stack: stack.clone(),
            keep_generations: cfg.keep_generations,
            live,
            state_dir,
            staging_dir,
            staging,
            generations,
            manifests,
            _lock: lock,
            state: StoreState {
                stack: stack.clone(),
                ..StoreState::default()
            },
            manifest: Arc::default(),
            prepared: None,
            next_token: 0,
            fail_after_ops: None,
            last_scan: std::sync::Mutex::new(None),
        };
        store.load_state()?;
        store.recover()?;
        store.tidy()?;
        Ok(store)
    }

    /// The stack's name.
    pub fn stack(&self) -> &str {
        &self.stack
    }

    /// The live dir, canonical.
    pub fn live_path(&self) -> &Path {
        self.live.path()
    }

    /// The state dir, canonical.
    pub fn state_path(&self) -> &Path {
        self.state_dir.path()
    }

    /// Last committed generation (0: none).
    pub fn last_generation(&self) -> u64 {
        self.state.generation
    }

    /// The generation a new cycle builds on: the committed one, or the highest ever committed
    /// if a rollback went below it, so that generation numbers are never reused (see
    /// [`StoreState::highest_generation`]).
    pub fn generation_base(&self) -> u64 {
        self.state.generation.max(self.state.highest_generation)
    }

    /// What `state` says.
    pub fn state(&self) -> &StoreState {
        &self.state
    }

    /// The manifest of the last committed generation.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest of the last committed generation, shared (a sync session takes it as the
    /// base a source's manifest may come as changes against).
    pub fn committed(&self) -> Arc<Manifest> {
        self.manifest.clone()
    }

    /// Records what the driver knows of the last cycle (bytes sent, downtimes, error) in
    /// `state`, atomically.
    pub fn record_cycle(&mut self, f: impl FnOnce(&mut CycleRecord)) -> Result<(), StoreError> {
        let mut r = CycleRecord {
            bytes_sent: self.state.bytes_sent,
            source_downtime_ms: self.state.source_downtime_ms,
            target_downtime_ms: self.state.target_downtime_ms,
            last_error: self.state.last_error.clone(),
        };
        f(&mut r);
        let mut next = self.state.clone();
        next.bytes_sent = r.bytes_sent;
        next.source_downtime_ms = r.source_downtime_ms;
        next.target_downtime_ms = r.target_downtime_ms;
        next.last_error = r.last_error;
        self.write_state(&next)?;
        self.state = next;
        Ok(())
    }

    /// Contents staged and verified, ready for a commit (by hash).
    pub fn staged(&self) -> Result<HashSet<Hash>, StoreError> {
        let err = |e: io::Error| {
            StoreError::io(
                &self.stack,
                "list",
                self.staging.objects_path.display().to_string(),
                e,
            )
        };
        let fd = rustix::fs::openat(&self.staging.objects, ".", tree::DIR_FLAGS, Mode::empty())
            .map_err(|e| err(e.into()))?;
        let mut out = HashSet::new();
        for item in rustix::fs::Dir::new(fd).map_err(|e| err(e.into()))? {
            let item = item.map_err(|e| err(e.into()))?;
            if let Some(h) = item.file_name().to_str().ok().and_then(Hash::from_hex) {
                out.insert(h);
            }
        }
        Ok(out)
    }

    /// Scans the live dir (with the store's hash cache, which includes ctime and inode, so a
    /// file the target's containers changed is re-hashed even if size and mtime are the same).
    pub fn scan_live(&self, checksum: bool) -> Result<Scan, StoreError> {
        let cfg = ScanConfig {
            root: self.live.path().to_path_buf(),
            exclude: Vec::new(),
            cache: Some(self.state_dir.path().join(HASH_CACHE)),
            checksum,
            xattrs: true,
        };
        stackclone_common::scan(&cfg).map_err(|source| StoreError::Scan {
            stack: self.stack.clone(),
            path: self.live.path().to_path_buf(),
            source: Box::new(source),
        })
    }

    /// What a sync session needs to know of this stack: the live dir as it is now (a cached
    /// scan), which of its files have hard links outside it, and what is staged for it.
    pub fn stack_state(&self) -> Result<StackState, StoreError> {
        let scan = self.scan_live(false)?;
        let outside = scan.outside_links();
        if let Ok(mut last) = self.last_scan.lock() {
            *last = scan.unchanged_check().map(|u| (u, outside.clone()));
        }
        Ok(StackState {
            last_generation: self.generation_base(),
            held: self.state.held(),
            outside_links: outside.into_iter().collect(),
            live: scan.manifest,
            staged: self.staged()?,
            staged_in_place: self.staged_in_place()?,
            committed: self.committed(),
        })
    }

    /// Opens the live file at `path` as a delta basis, never following a symlink.
    pub fn open_basis(&self, path: &StackPath) -> Result<BasisFile, StoreError> {
        let show = || self.live.show(path);
        let file = self
            .live
            .open_file(path)
            .map_err(|e| StoreError::io(&self.stack, "open basis", show(), e))?;
        BasisFile::new(file).map_err(|e| StoreError::io(&self.stack, "stat basis", show(), e))
    }

    /// A new, empty file in `staging/tmp` to rebuild a transfer into.
    pub fn create_staging_file(&self) -> Result<StagingFile, StoreError> {
        self.staging.create_tmp()
    }

    /// Opens the live file at `path` as the basis of an in-place receive and a [`PatchFile`]
    /// that keeps only what differs from it (see the `patch` module doc).
    pub fn create_patch_file(
        &self,
        path: &StackPath,
    ) -> Result<(BasisFile, PatchFile), StoreError> {
        let show = || self.live.show(path);
        let file = self
            .live
            .open_file(path)
            .map_err(|e| StoreError::io(&self.stack, "open basis", show(), e))?;
        let st = rustix::fs::fstat(&file)
            .map_err(|e| StoreError::io(&self.stack, "stat basis", show(), e.into()))?;
        let compare = file
            .try_clone()
            .map_err(|e| StoreError::io(&self.stack, "open basis", show(), e))?;
        let patch = PatchFile::new(
            &self.staging,
            path.clone(),
            compare,
            patch::BaseFacts::of(&st),
        )?;
        let basis = BasisFile::new(file)
            .map_err(|e| StoreError::io(&self.stack, "stat basis", show(), e))?;
        Ok((basis, patch))
    }

    /// In-place patches staged and still applicable (the live file they were made against is
    /// unchanged): content hash → the live path it patches.
    pub fn staged_in_place(&self) -> Result<HashMap<Hash, StackPath>, StoreError> {
        Ok(self
            .patches()?
            .into_iter()
            .filter(|(_, h)| self.patch_applies(h))
            .map(|(hash, h)| (hash, h.path))
            .collect())
    }

    /// Every readable patch in `staging/patches`, by hash.
    fn patches(&self) -> Result<Vec<(Hash, patch::PatchHeader)>, StoreError> {
        let err = |e: io::Error| {
            StoreError::io(
                &self.stack,
                "list",
                self.staging.patches_path.display().to_string(),
                e,
            )
        };
        let fd = rustix::fs::openat(&self.staging.patches, ".", tree::DIR_FLAGS, Mode::empty())
            .map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in rustix::fs::Dir::new(fd).map_err(|e| err(e.into()))? {
            let item = item.map_err(|e| err(e.into()))?;
            let Some(name) = item.file_name().to_str().ok() else {
                continue;
            };
            let Some(hash) = Hash::from_hex(name) else {
                continue;
            };
            // A damaged patch is simply not staged; the content is asked for again.
            if let Ok(h) =
                patch::open_patch(&self.staging, name).and_then(|f| patch::read_header(&f))
            {
                out.push((hash, h));
            }
        }
        Ok(out)
    }

    /// True if the live file a patch was made against is still exactly that file.
    fn patch_applies(&self, h: &patch::PatchHeader) -> bool {
        matches!(self.live.lstat(&h.path), Ok(Some(st))
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
                && patch::BaseFacts::of(&st) == h.base)
    }

    /// Copies the live file at `from` into staging as content `hash`, verified by the delta
    /// engine's verifier (so the session can trust it like a transfer), sparse-aware.
    pub fn stage_local(&self, from: &StackPath, hash: Hash) -> Result<LocalStage, StoreError> {
        let show = || self.live.show(from);
        let file = match self.live.open_file(from) {
            Ok(f) => f,
            // Gone or replaced by something that is not a file since the scan.
            Err(e) if tree::is_absent(&e) || e.kind() == io::ErrorKind::InvalidInput => {
                return Ok(LocalStage::Mismatch);
            }
            Err(e) => return Err(StoreError::io(&self.stack, "open", show(), e)),
        };
        let len = file
            .metadata()
            .map_err(|e| StoreError::io(&self.stack, "stat", show(), e))?
            .len();
        let mut dst = self.create_staging_file()?;
        match staging::copy_verified(&file, len, &mut dst, hash)? {
            LocalStage::Staged(v) => {
                dst.persist(&v)?;
                Ok(LocalStage::Staged(v))
            }
            LocalStage::Mismatch => Ok(LocalStage::Mismatch),
        }
    }

    /// Test hook: make the next journal run "crash" (return [`StoreError::InjectedCrash`] and
    /// leave everything as a killed process would) after this many applied ops.
    #[doc(hidden)]
    pub fn inject_crash_after_ops(&mut self, ops: Option<usize>) {
        self.fail_after_ops = ops;
    }

    fn io_err(&self, op: &'static str, path: impl Into<String>, e: io::Error) -> StoreError {
        StoreError::io(&self.stack, op, path, e)
    }

    fn state_file(&self, name: &str) -> String {
        self.state_dir.path().join(name).display().to_string()
    }

    /// The state a busy store (one a cycle holds) last wrote, read without its lock: the file
    /// is replaced atomically, so this is one whole state, if perhaps one commit old. `None` if
    /// it cannot be read. For `status` while a cycle runs.
    pub fn peek_state(state_path: &Path) -> Option<StoreState> {
        let bytes = fs::read(state_path.join(STATE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn load_state(&mut self) -> Result<(), StoreError> {
        let path = self.state_dir.path().join(STATE);
        let corrupt = |reason: String| StoreError::StateCorrupt {
            stack: self.stack.clone(),
            path: path.clone(),
            reason,
        };
        let Some(bytes) = state::read_file(self.state_dir.fd(), STATE)
            .map_err(|e| self.io_err("read", path.display().to_string(), e))?
        else {
            return Ok(());
        };
        let st: StoreState = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if st.stack != self.stack {
            return Err(corrupt(format!("it belongs to stack `{}`", st.stack)));
        }
        self.manifest = Arc::new(self.load_manifest(st.generation)?);
        self.state = st;
        Ok(())
    }

    fn load_manifest(&self, generation: u64) -> Result<Manifest, StoreError> {
        if generation == 0 {
            return Ok(Manifest::default());
        }
        let name = generation.to_string();
        let path = self.manifests.path().join(&name);
        let corrupt = |reason: String| StoreError::StateCorrupt {
            stack: self.stack.clone(),
            path: path.clone(),
            reason,
        };
        let bytes = state::read_file(self.manifests.fd(), &name)
            .map_err(|e| self.io_err("read", path.display().to_string(), e))?
            .ok_or_else(|| corrupt("missing".into()))?;
        let (g, m) = stackclone_proto::manifest::decode_file(&bytes).map_err(corrupt)?;
        if g != generation {
            return Err(corrupt(format!("it holds generation {g}")));
        }
        Ok(m)
    }

    fn write_state(&self, st: &StoreState) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(st).map_err(|e| {
            self.io_err(
                "encode",
                self.state_file(STATE),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        state::write_atomic(self.state_dir.fd(), STATE, &json)
            .map_err(|e| self.io_err("write", self.state_file(STATE), e))
    }

    /// Removes what an interrupted cycle or commit left behind: partial transfers, prepared
    /// files, generation dirs of commits that never happened, generations beyond
    /// `keep_generations` and manifests nothing refers to. Staged objects stay (they let the
    /// next cycle resume).
    pub fn tidy(&mut self) -> Result<(), StoreError> {
        self.clear_dir(self.staging.tmp.as_fd(), &self.staging.tmp_path)?;
        self.reset_prep()?;
        self.prepared = None;
        self.prune()
    }

    /// Re-hashes every staged object and removes those whose content is not what their name
    /// says (a torn write, a disk error, a hand), and anything in `objects/` that is not named
    /// by a hash. The target daemon runs this once when it starts, since a crash or a power
    /// loss is what leaves a half-written staging area behind; what is removed is fetched again
    /// by the next cycle. Returns (objects kept, entries removed).
    pub fn scrub_staging(&self) -> Result<(u64, u64), StoreError> {
        let dir = &self.staging.objects_path;
        let err = |e: io::Error| self.io_err("scrub", dir.display().to_string(), e);
        let (mut kept, mut removed) = (0, 0);
        for item in fs::read_dir(dir).map_err(err)? {
            let item = item.map_err(err)?;
            let name = item.file_name();
            let good = name
                .to_str()
                .and_then(Hash::from_hex)
                .filter(|_| item.file_type().is_ok_and(|t| t.is_file()))
                .is_some_and(|want| {
                    let mut hasher = blake3::Hasher::new();
                    fs::File::open(item.path())
                        .and_then(|f| hasher.update_reader(f).map(drop))
                        .is_ok()
                        && Hash::from(hasher.finalize()) == want
                });
            if good {
                kept += 1;
                continue;
            }
            tracing::warn!(stack = %self.stack, object = %item.path().display(),
                "removing a staged object whose content does not match its name");
            match fs::remove_file(item.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => remove_tree(&item.path()).map_err(err)?,
            }
        }
        Ok((kept, removed))
    }

    /// Removes every entry of the directory `fd` (at `path`, under the state dir).
    fn clear_dir(&self, fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<(), StoreError> {
        let err = |e: io::Error| self.io_err("clear", path.display().to_string(), e);
        let dup = rustix::fs::openat(fd, ".", tree::DIR_FLAGS, Mode::empty())
            .map_err(|e| err(e.into()))?;
        let mut names = Vec::new();
        for item in rustix::fs::Dir::new(dup).map_err(|e| err(e.into()))? {
            let item = item.map_err(|e| err(e.into()))?;
            let name = item.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        for name in names {
            match rustix::fs::unlinkat(fd, name.as_slice(), rustix::fs::AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) => {
                    let p = path.join(std::ffi::OsStr::from_bytes(&name));
                    remove_tree(&p).map_err(err)?;
                }
                Err(e) => return Err(err(e.into())),
            }
        }
        Ok(())
    }
}

/// What the driver may record about a cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CycleRecord {
    pub bytes_sent: u64,
    pub source_downtime_ms: u64,
    pub target_downtime_ms: u64,
    pub last_error: Option<String>,
}

fn into_fd(t: Tree) -> OwnedFd {
    t.into_fd()
}

/// Removes a directory tree under the state dir, never following a symlink (std's
/// `remove_dir_all` is symlink-safe).
fn remove_tree(p: &Path) -> io::Result<()> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
