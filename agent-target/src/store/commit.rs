//! Prepare, commit, recover, roll back, prune. The crash argument is in the parent module doc.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use stackclone_common::ScanConfig;
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest};
use stackclone_proto::path::StackPath;
use stackclone_proto::plan::{Changes, Upsert, link_leaders};
use stackclone_proto::session::Commit;

use super::journal::{Journal, Op};
use super::patch::{self, BaseFacts, PatchHeader};
use super::state::{self, StoreState};
use super::tree::{self, DIR_FLAGS, READ_FLAGS, Tree};
use super::{JOURNAL, JOURNAL_TMP, LocalStage, MARKER, StackStore, StoreError, remove_tree};

/// In a generation dir: the live tree just before that generation's commit.
const BEFORE: &str = "before";

/// The state before commit G, kept in `generations/<G>/record`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GenerationRecord {
    generation: u64,
    previous: StoreState,
}

/// A commit made ready before its journal; only [`StackStore::prepare`] makes one, and
/// only the store that made it (with nothing prepared since) accepts it.
#[derive(Debug)]
pub struct Prepared {
    token: u64,
    journal: Journal,
    manifest: Manifest,
    /// The scan of the live dir the commit was planned against (see [`StackStore::commit`]).
    planned_against: Option<Manifest>,
    /// Files prepared as hardlinks of staged objects.
    pub files_linked: u64,
    /// Files prepared as copies (a second, unlinked path with the same content).
    pub files_copied: u64,
    /// Contents not staged but copied from the live file at the same path (a change of hardlink
    /// membership only).
    pub files_staged_locally: u64,
}

impl Prepared {
    /// The generation the live dir will be at.
    pub fn generation(&self) -> u64 {
        self.journal.state_after.generation
    }

    /// Ops the commit will journal and apply.
    pub fn ops(&self) -> usize {
        self.journal.ops.len()
    }
}

/// What a commit (or one rollback step) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// The generation now live.
    pub generation: u64,
    /// Ops journaled and applied.
    pub ops: usize,
    /// Live entries moved into the backup dir.
    pub backed_up: usize,
    /// Files renamed into place.
    pub placed: usize,
    /// Files patched in place (only the changed ranges written).
    pub patched: usize,
    /// Journal write, ops, fsyncs and state: the part of the downtime that must happen with the
    /// stack stopped.
    pub apply: Duration,
    /// `apply` plus clearing staging and pruning generations.
    pub total: Duration,
}

/// What a rollback did, step by step (one step per generation undone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackReport {
    pub from: u64,
    pub to: u64,
    pub steps: Vec<CommitReport>,
}

#[derive(Debug, Default)]
struct Applied {
    backed_up: usize,
    placed: usize,
    patched: usize,
}

impl StackStore {
    /// Makes a verified [`Commit`] ready before anything is journaled: the prepared files (content
    /// and metadata), the generation dir and record, the new manifest, and the op list, checked
    /// against the live dir as it is now. Nothing in the live dir changes.
    pub fn prepare(&mut self, c: &Commit) -> Result<Prepared, StoreError> {
        let g = c.generation();
        if g <= self.state.generation {
            return Err(StoreError::NotPrepared {
                stack: self.stack.clone(),
                what: format!(
                    "generation {g} is not above the committed generation {}",
                    self.state.generation
                ),
            });
        }
        self.prepared = None;
        let name = g.to_string();
        let gen_path = self.generations.path().join(&name);
        remove_tree(&gen_path).map_err(|e| self.io_err("remove", show(&gen_path), e))?;
        for p in [gen_path.clone(), gen_path.join("data")] {
            std::fs::create_dir(&p).map_err(|e| self.io_err("create", show(&p), e))?;
        }
        let gen_dir = Tree::open(&gen_path).map_err(|e| self.io_err("open", show(&gen_path), e))?;
        let record = GenerationRecord {
            generation: g,
            previous: self.state.clone(),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| {
            self.io_err(
                "encode",
                show(&gen_path),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        state::write_atomic(gen_dir.fd(), "record", &json)
            .map_err(|e| self.io_err("write", show(&gen_path.join("record")), e))?;
        let encoded = state::encode_manifest(g, c.manifest()).map_err(|e| {
            self.io_err(
                "encode manifest",
                show(self.manifests.path()),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        state::write_atomic(self.manifests.fd(), &name, &encoded)
            .map_err(|e| self.io_err("write", show(&self.manifests.path().join(&name)), e))?;

        let (files, bytes) = c.manifest().file_totals();
        let state_after = StoreState {
            stack: self.stack.clone(),
            generation: g,
            highest_generation: g.max(self.state.highest_generation),
            committed_at: None,
            manifest_root: Some(c.manifest().root().to_hex()),
            files,
            bytes,
            ..StoreState::default()
        };
        let undo = gen_path.join("patches");
        std::fs::create_dir(&undo).map_err(|e| self.io_err("create", show(&undo), e))?;
        let mut prepared = self.plan(
            c.manifest(),
            c.changes(),
            format!("{g}/data"),
            state_after,
            vec![],
            Some(&undo),
        )?;
        prepared.planned_against = Some(c.live().clone());
        Ok(prepared)
    }

    /// Builds the ops and the prepared files for turning the live dir into `want`.
    fn plan(
        &mut self,
        want: &Manifest,
        changes: &Changes,
        backup: String,
        state_after: StoreState,
        drop_generations: Vec<u64>,
        undo_dir: Option<&std::path::Path>,
    ) -> Result<Prepared, StoreError> {
        self.reset_prep()?;
        // Replacements that can be written in place: an applicable patch is staged for exactly
        // this path and content, and no whole object is.
        let mut patched: HashMap<StackPath, (Hash, PatchHeader)> = HashMap::new();
        if undo_dir.is_some() {
            let patches: HashMap<Hash, PatchHeader> = self.patches()?.into_iter().collect();
            for u in &changes.upserts {
                if let Upsert::Replace(e) = u
                    && let EntryKind::File {
                        hash,
                        link_group: None,
                        ..
                    } = e.kind
                    && !self.staging.object_exists(&hash)
                    && let Some(h) = patches.get(&hash)
                    && h.path == e.path
                {
                    if !self.patch_applies(h) {
                        return Err(StoreError::NotPrepared {
                            stack: self.stack.clone(),
                            what: format!(
                                "{} changed since its in-place patch was staged; run the cycle \
                                 again (the file will be transferred again)",
                                self.live.show(&e.path)
                            ),
                        });
                    }
                    patched.insert(e.path.clone(), (hash, h.clone()));
                }
            }
        }
        let prep_path = self.staging_dir.path().join("prep");
        let prep = Tree::open_at(self.staging_dir.fd(), "prep", prep_path.clone())
            .map_err(|e| self.io_err("open", show(&prep_path), e))?;
        let mut prepared = Prepared {
            token: 0,
            journal: Journal {
                backup,
                ops: Vec::new(),
                state_after,
                drop_generations,
            },
            manifest: want.clone(),
            planned_against: None,
            files_linked: 0,
            files_copied: 0,
            files_staged_locally: 0,
        };
        let ops = &mut prepared.journal.ops;

        let mut slot = 0u64;
        for p in &changes.deletes {
            ops.push(Op::Backup {
                path: p.clone(),
                slot,
            });
            slot += 1;
        }
        // Whatever occupies a path to create or replace goes too (a create's path may have been
        // filled since the scan by the running stack). Deepest first.
        for u in changes.upserts.iter().rev() {
            if let Upsert::Create(e) | Upsert::Replace(e) = u
                && !patched.contains_key(&e.path)
            {
                ops.push(Op::Backup {
                    path: e.path.clone(),
                    slot,
                });
                slot += 1;
            }
        }
        ops.push(Op::EndBackups);

        let leaders = link_leaders(want);
        let mut used: HashSet<Hash> = HashSet::new();
        let mut dirs: BTreeSet<StackPath> = BTreeSet::new();
        let mut next_prep = 0u64;
        let mut next_undo = 0u64;
        for p in &changes.deletes {
            dirs.extend(p.parent());
        }
        let mut counts = (0u64, 0u64, 0u64);
        for u in &changes.upserts {
            let e = u.entry();
            dirs.extend(e.path.parent());
            let path = e.path.clone();
            match (&e.kind, u) {
                (EntryKind::Dir, Upsert::Create(_)) => {
                    ops.push(Op::Mkdir { path: path.clone() });
                    dirs.insert(path);
                }
                (EntryKind::Dir, _) => {
                    dirs.insert(path);
                }
                (EntryKind::Symlink { target }, Upsert::Create(_) | Upsert::Replace(_)) => {
                    ops.push(Op::Symlink {
                        path,
                        target: target.clone(),
                        meta: e.meta,
                    });
                }
                (EntryKind::Symlink { .. }, Upsert::Meta(_)) => {
                    ops.push(Op::SymlinkMeta { path, meta: e.meta });
                }
                (EntryKind::File { .. }, Upsert::Replace(_))
                    if let (Some((hash, h)), Some(undo)) = (patched.get(&e.path), undo_dir) =>
                {
                    self.write_undo(h, &undo.join(next_undo.to_string()))?;
                    next_undo += 1;
                    ops.push(Op::Patch {
                        patch: hash.to_hex(),
                        path,
                        base: h.base,
                        meta: e.meta,
                        xattrs: e.xattrs.clone(),
                    });
                }
                (EntryKind::File { .. }, Upsert::Create(_) | Upsert::Replace(_)) => {
                    match leaders.get(&e.path) {
                        Some(&leader) if *leader != e.path => ops.push(Op::Link {
                            leader: leader.clone(),
                            path,
                        }),
                        _ => {
                            self.prepare_file(&prep, next_prep, e, &mut used, &mut counts)?;
                            ops.push(Op::Place {
                                prep: next_prep,
                                path,
                            });
                            next_prep += 1;
                        }
                    }
                }
                (EntryKind::File { .. }, Upsert::Meta(_)) => ops.push(Op::Meta {
                    path,
                    dir: false,
                    meta: e.meta,
                    xattrs: e.xattrs.clone(),
                }),
            }
        }
        // Directory metadata last, deepest first: creating or removing children moves a
        // directory's mtime.
        let mut dir_entries: Vec<&Entry> = dirs
            .iter()
            .filter_map(|p| want.get(p))
            .filter(|e| e.is_dir())
            .collect();
        dir_entries.sort_by(|a, b| {
            b.path
                .depth()
                .cmp(&a.path.depth())
                .then_with(|| a.path.cmp(&b.path))
        });
        for e in dir_entries {
            ops.push(Op::Meta {
                path: e.path.clone(),
                dir: true,
                meta: e.meta,
                xattrs: e.xattrs.clone(),
            });
        }
        (
            prepared.files_linked,
            prepared.files_copied,
            prepared.files_staged_locally,
        ) = counts;
        self.validate(&prepared.journal.ops)?;
        // One flush of the whole file system makes every staged object, prepared file and their
        // metadata durable before a journal can point at them (staged files are not fsynced one
        // by one; the state dir and the live dir are on this same file system). It also makes
        // the new generation dir durable, which `Backup` ops move entries into. A commit with
        // no `Place`, `Patch` or `Backup` op (nothing changed, or only new directories,
        // symlinks and metadata) points at nothing unflushed: the record and the manifest were
        // each written with an fsync, so it skips the flush.
        let points_at_prepared = prepared
            .journal
            .ops
            .iter()
            .any(|op| matches!(op, Op::Place { .. } | Op::Patch { .. } | Op::Backup { .. }));
        if points_at_prepared {
            rustix::fs::syncfs(prep.fd())
                .map_err(|e| self.io_err("syncfs", show(&prep_path), e.into()))?;
        }
        self.next_token += 1;
        prepared.token = self.next_token;
        self.prepared = Some(prepared.token);
        Ok(prepared)
    }

    /// Re-hashes the staged object `hash` before a commit uses it. Objects were verified as
    /// they arrived, but they may have sat on disk since (an earlier cycle's staging, a disk
    /// error, someone's hands): a commit must never publish content that is not what the
    /// source's manifest says. A corrupt object is removed, so the next cycle fetches it again,
    /// and the commit is refused before anything in the live dir changed. The cost is one read
    /// of the staged bytes before the journal (usually from the page cache).
    /// The object's length must be the manifest's `size` too: a manifest whose size and hash
    /// disagree is refused here whatever route its content took.
    fn check_object(&self, hash: &Hash, size: u64, path: &StackPath) -> Result<(), StoreError> {
        let hex = hash.to_hex();
        let obj_show = show(&self.staging.objects_path.join(&hex));
        let fd = rustix::fs::openat(
            &self.staging.objects,
            hex.as_str(),
            READ_FLAGS,
            Mode::empty(),
        )
        .map_err(|err| self.io_err("open staged object", obj_show.clone(), err.into()))?;
        let file = std::fs::File::from(fd);
        let len = file
            .metadata()
            .map_err(|err| self.io_err("stat staged object", obj_show.clone(), err))?
            .len();
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(file)
            .map_err(|err| self.io_err("read staged object", obj_show.clone(), err))?;
        let found: Hash = hasher.finalize().into();
        if found == *hash && len == size {
            return Ok(());
        }
        if found == *hash {
            // The content is what its name says: the manifest is what is wrong.
            return Err(StoreError::NotPrepared {
                stack: self.stack.clone(),
                what: format!(
                    "{} is declared as {size} bytes, but its content ({hash}) has {len}: the \
                     manifest contradicts itself",
                    self.live.show(path)
                ),
            });
        }
        let removed = state::remove_file(&self.staging.objects, &hex);
        Err(StoreError::StagedCorrupt {
            stack: self.stack.clone(),
            path: self.live.show(path),
            object: obj_show,
            found,
            removed: removed.is_ok(),
        })
    }

    /// Makes `staging/prep/<n>` for the file entry `e`: a hardlink of its object for the first
    /// path that uses the content, a sparse copy for the others; then its metadata.
    fn prepare_file(
        &self,
        prep: &Tree,
        n: u64,
        e: &Entry,
        used: &mut HashSet<Hash>,
        counts: &mut (u64, u64, u64),
    ) -> Result<(), StoreError> {
        let Some((size, hash)) = e.file() else {
            return Ok(());
        };
        let hex = hash.to_hex();
        let name = n.to_string();
        let prep_show = show(&prep.path().join(&name));
        if !self.staging.object_exists(&hash) {
            // Not transferred because the live file at this very path has it (only its hardlink
            // membership changes), or staging was lost: copy it, verified.
            match self.stage_local(&e.path, hash)? {
                LocalStage::Staged(_) => counts.2 += 1,
                LocalStage::Mismatch => {
                    return Err(StoreError::ContentMissing {
                        stack: self.stack.clone(),
                        hash,
                        path: self.live.show(&e.path),
                    });
                }
            }
        }
        if used.insert(hash) {
            self.check_object(&hash, size, &e.path)?;
            rustix::fs::linkat(
                &self.staging.objects,
                hex.as_str(),
                prep.fd(),
                name.as_str(),
                AtFlags::empty(),
            )
            .map_err(|err| self.io_err("link staged object to", prep_show.clone(), err.into()))?;
            counts.0 += 1;
        } else {
            let src = rustix::fs::openat(
                &self.staging.objects,
                hex.as_str(),
                READ_FLAGS,
                Mode::empty(),
            )
            .map_err(|err| {
                self.io_err(
                    "open staged object",
                    show(&self.staging.objects_path.join(&hex)),
                    err.into(),
                )
            })?;
            let dst = rustix::fs::openat(
                prep.fd(),
                name.as_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|err| self.io_err("create", prep_show.clone(), err.into()))?;
            let (src, dst) = (std::fs::File::from(src), std::fs::File::from(dst));
            super::staging::copy_sparse(&src, &dst, size)
                .and_then(|()| dst.sync_all())
                .map_err(|err| self.io_err("copy staged object to", prep_show.clone(), err))?;
            counts.1 += 1;
        }
        let fd = rustix::fs::openat(prep.fd(), name.as_str(), READ_FLAGS, Mode::empty())
            .map_err(|err| self.io_err("open", prep_show.clone(), err.into()))?;
        tree::set_meta_fd(fd.as_fd(), &e.meta, &e.xattrs)
            .map_err(|err| self.io_err("set metadata of", prep_show, err))?;
        Ok(())
    }

    /// Saves what the patch `h` will overwrite in the live file (and the tail it cuts off) as
    /// the undo file `out`, fsynced.
    fn write_undo(&self, h: &PatchHeader, out: &std::path::Path) -> Result<(), StoreError> {
        let live = self
            .live
            .open_file(&h.path)
            .map_err(|e| self.io_err("open", self.live.show(&h.path), e))?;
        let f = std::fs::File::create_new(out).map_err(|e| self.io_err("create", show(out), e))?;
        patch::write_undo(&live, h.base, h, &f).map_err(|e| self.io_err("write", show(out), e))
    }

    /// Checks, before anything is journaled, that every directory the creation ops write into
    /// is a real directory inside the live dir (or is made by an earlier op), and that every
    /// entry whose metadata is set is of the expected type. A symlink planted since the scan
    /// refuses the commit here, with the live dir untouched.
    fn validate(&self, ops: &[Op]) -> Result<(), StoreError> {
        let mut made: HashSet<&StackPath> = HashSet::new();
        let mut ok: HashSet<StackPath> = HashSet::new();
        let not_dir = |p: &StackPath| StoreError::NotADirectory {
            stack: self.stack.clone(),
            path: self.live.show(p),
        };
        let mut check_dir = |p: Option<StackPath>, made: &HashSet<&StackPath>| {
            let Some(p) = p else { return Ok(()) };
            if made.contains(&p) || ok.contains(&p) {
                return Ok(());
            }
            match self.live.dir(Some(&p)) {
                Ok(_) => {
                    ok.insert(p);
                    Ok(())
                }
                Err(_) => Err(not_dir(&p)),
            }
        };
        let check_type = |p: &StackPath, want: FileType| match self.live.lstat(p) {
            Ok(Some(st)) if FileType::from_raw_mode(st.st_mode) == want => Ok(()),
            _ => Err(not_dir(p)),
        };
        for op in ops {
            match op {
                Op::Backup { .. } | Op::EndBackups => {}
                Op::Mkdir { path } => {
                    check_dir(path.parent(), &made)?;
                    made.insert(path);
                }
                Op::Place { path, .. } | Op::Symlink { path, .. } => {
                    check_dir(path.parent(), &made)?;
                }
                Op::Link { leader, path } => {
                    check_dir(path.parent(), &made)?;
                    check_dir(leader.parent(), &made)?;
                }
                Op::Meta { path, dir, .. } => {
                    check_dir(path.parent(), &made)?;
                    if *dir {
                        if !made.contains(path) {
                            check_dir(Some(path.clone()), &made)?;
                        }
                    } else {
                        check_type(path, FileType::RegularFile)?;
                    }
                }
                Op::SymlinkMeta { path, .. } => {
                    check_dir(path.parent(), &made)?;
                    check_type(path, FileType::Symlink)?;
                }
                Op::Patch { path, .. } => {
                    check_dir(path.parent(), &made)?;
                    check_type(path, FileType::RegularFile)?;
                }
            }
        }
        Ok(())
    }

    /// Commits what [`StackStore::prepare`] made ready; call it with the stack stopped. `now` is
    /// the target's clock (Unix seconds), recorded as the commit time.
    ///
    /// The live dir is rescanned first; unless it is exactly the tree the commit was planned
    /// against ([`Commit::live`]), the commit is [`StoreError::ChangedSincePlanned`] and nothing
    /// is written.
    ///
    /// An error before the journal is published leaves the live dir at the previous
    /// generation. An error after it leaves the journal: [`StackStore::open`] (or
    /// [`StackStore::recover`]) finishes the commit.
    pub fn commit(&mut self, mut p: Prepared, now: i64) -> Result<CommitReport, StoreError> {
        self.take_prepared(&p)?;
        // With the stack stopped: every file to patch must still be the one the patch (and
        // its undo) was made against. Nothing is journaled yet, so refusing leaves N-1.
        for op in &p.journal.ops {
            if let Op::Patch { path, base, .. } = op {
                let now_facts = self
                    .live
                    .lstat(path)
                    .map_err(|e| self.io_err("stat", self.live.show(path), e))?
                    .map(|st| BaseFacts::of(&st));
                if now_facts != Some(*base) {
                    return Err(StoreError::NotPrepared {
                        stack: self.stack.clone(),
                        what: format!(
                            "{} changed after the commit was prepared; run the cycle again",
                            self.live.show(path)
                        ),
                    });
                }
            }
        }
        p.journal.state_after.committed_at = Some(now);
        // What the live dir holds right now, with the stack stopped and nothing changed yet:
        // exactly what this commit's backup will hold. Rollback restores this ("undo the
        // commit"), which is generation N-1 unless the target's own containers changed files
        // since; then it is the tree they left, whose bytes the backup really has. A cached
        // scan: one lstat per path, re-hashing only files that changed.
        let scan = self.scan_live(false)?;
        // Nothing is ever written into, chowned or chmodded through a hard link that leaves the
        // stack: the plan replaces such files, and a link made since the plan refuses here.
        let outside = scan.outside_links();
        for op in &p.journal.ops {
            if let Op::Patch { path, .. }
            | Op::Meta {
                path, dir: false, ..
            } = op
                && outside.binary_search(path).is_ok()
            {
                return Err(StoreError::NotPrepared {
                    stack: self.stack.clone(),
                    what: format!(
                        "{} has a hard link outside the stack since the commit was planned; \
                         it is never written through: run the cycle again",
                        self.live.show(path)
                    ),
                });
            }
        }
        let before = scan.manifest;
        // The safety net of planning against a stopped standby: the tree is still exactly the
        // one the changes were planned against. Anything else (a container that was not
        // stopped, a process outside Docker) refuses here, with the live dir at N-1; the next
        // cycle plans against the tree as it is then.
        if let Some(path) = p
            .planned_against
            .as_ref()
            .and_then(|planned| planned.first_difference(&before))
        {
            return Err(StoreError::ChangedSincePlanned {
                stack: self.stack.clone(),
                path: self.live.show(path),
            });
        }
        self.write_before(p.journal.state_after.generation, &before)?;
        self.run_journal(p.journal, p.manifest)
    }

    /// Commits a prepared generation that changes nothing in the live dir: its journal holds no
    /// op but the end-of-backups marker, because the live scan the cycle began with was already
    /// exactly the wanted tree. The target's stack need not stop for it, and the tree before it
    /// is the tree it commits, so no scan is needed either: rolling it back changes no file.
    /// The generation, its manifest and its record are written as for any commit, through the
    /// same journal. Anything else is [`StoreError::NotPrepared`], and nothing is written.
    pub fn commit_unchanged(
        &mut self,
        mut p: Prepared,
        now: i64,
    ) -> Result<CommitReport, StoreError> {
        if let Some(op) = p
            .journal
            .ops
            .iter()
            .find(|op| !matches!(op, Op::EndBackups))
        {
            return Err(StoreError::NotPrepared {
                stack: self.stack.clone(),
                what: format!(
                    "a commit without a stop must change nothing, and this one has {op:?}"
                ),
            });
        }
        self.take_prepared(&p)?;
        p.journal.state_after.committed_at = Some(now);
        self.write_before(p.journal.state_after.generation, &p.manifest)?;
        self.run_journal(p.journal, p.manifest)
    }

    /// Accepts `p` once: it must be what this store prepared last.
    fn take_prepared(&mut self, p: &Prepared) -> Result<(), StoreError> {
        if self.prepared != Some(p.token) {
            return Err(StoreError::NotPrepared {
                stack: self.stack.clone(),
                what: "this commit was not prepared by this store, or something else was \
                       prepared or committed since; prepare it again"
                    .into(),
            });
        }
        self.prepared = None;
        Ok(())
    }

    /// Saves the live tree as it was before commit `g`, in that commit's generation dir.
    fn write_before(&self, g: u64, before: &Manifest) -> Result<(), StoreError> {
        let gen_path = self.generations.path().join(g.to_string());
        let gen_dir = Tree::open(&gen_path).map_err(|e| self.io_err("open", show(&gen_path), e))?;
        let encoded = state::encode_manifest(g, before).map_err(|e| {
            self.io_err(
                "encode manifest",
                show(&gen_path),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        state::write_atomic(gen_dir.fd(), BEFORE, &encoded)
            .map_err(|e| self.io_err("write", show(&gen_path.join(BEFORE)), e))
    }

    /// The live tree as it was before commit `g`, if that commit recorded it.
    fn read_before(&self, g: u64) -> Result<Option<Manifest>, StoreError> {
        let gen_path = self.generations.path().join(g.to_string());
        let gen_dir = Tree::open(&gen_path).map_err(|e| self.io_err("open", show(&gen_path), e))?;
        let Some(bytes) = state::read_file(gen_dir.fd(), BEFORE)
            .map_err(|e| self.io_err("read", show(&gen_path.join(BEFORE)), e))?
        else {
            return Ok(None);
        };
        let (_, m) = state::decode_manifest(&bytes).map_err(|reason| StoreError::StateCorrupt {
            stack: self.stack.clone(),
            path: gen_path.join(BEFORE),
            reason,
        })?;
        Ok(Some(m))
    }

    fn run_journal(
        &mut self,
        journal: Journal,
        manifest: Manifest,
    ) -> Result<CommitReport, StoreError> {
        let t0 = Instant::now();
        let (bytes, hash) = journal.encode().map_err(|e| {
            self.io_err(
                "encode journal",
                self.state_file(JOURNAL),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        let sd = self.state_dir.fd();
        state::remove_file(sd, MARKER)
            .map_err(|e| self.io_err("remove", self.state_file(MARKER), e))?;
        state::write_synced(sd, JOURNAL_TMP, &bytes)
            .map_err(|e| self.io_err("write", self.state_file(JOURNAL_TMP), e))?;
        rustix::fs::renameat(sd, JOURNAL_TMP, sd, JOURNAL)
            .and_then(|()| rustix::fs::fsync(sd))
            .map_err(|e| self.io_err("publish", self.state_file(JOURNAL), e.into()))?;
        let applied = self.apply(&journal, &hash, false)?;
        let ops = journal.ops.len();
        let generation = journal.state_after.generation;
        let apply = self.finish(journal, manifest, Some(t0))?;
        Ok(CommitReport {
            generation,
            ops,
            backed_up: applied.backed_up,
            placed: applied.placed,
            patched: applied.patched,
            apply,
            total: t0.elapsed(),
        })
    }

    /// Finishes a commit whose journal is in the state dir (after a crash); a no-op without
    /// one. [`StackStore::open`] calls it.
    pub fn recover(&mut self) -> Result<(), StoreError> {
        let sd = self.state_dir.fd();
        state::remove_file(sd, JOURNAL_TMP)
            .map_err(|e| self.io_err("remove", self.state_file(JOURNAL_TMP), e))?;
        let Some(bytes) = state::read_file(sd, JOURNAL)
            .map_err(|e| self.io_err("read", self.state_file(JOURNAL), e))?
        else {
            return Ok(());
        };
        let (journal, hash) =
            Journal::decode(&bytes).map_err(|reason| StoreError::JournalCorrupt {
                stack: self.stack.clone(),
                path: self.state_dir.path().join(JOURNAL),
                reason,
            })?;
        let marker = state::read_file(sd, MARKER)
            .map_err(|e| self.io_err("read", self.state_file(MARKER), e))?;
        let backups_done = marker.is_some_and(|m| m == hash.to_hex().as_bytes());
        let manifest = self.load_manifest(journal.state_after.generation)?;
        self.apply(&journal, &hash, backups_done)?;
        self.finish(journal, manifest, None)?;
        Ok(())
    }

    fn crash_point(&self, done: usize) -> Result<(), StoreError> {
        if self.fail_after_ops == Some(done) {
            return Err(StoreError::InjectedCrash {
                stack: self.stack.clone(),
                ops: done,
            });
        }
        Ok(())
    }

    /// Applies the journal's ops in order (skipping the backups if they are known done), then
    /// fsyncs every directory it touched.
    fn apply(
        &mut self,
        j: &Journal,
        hash: &blake3::Hash,
        backups_done: bool,
    ) -> Result<Applied, StoreError> {
        let backup_path = self.generations.path().join(&j.backup);
        let backup = Tree::open(&backup_path)
            .map_err(|e| self.io_err("open backup dir", show(&backup_path), e))?;
        let prep_path = self.staging_dir.path().join("prep");
        let prep = Tree::open_at(self.staging_dir.fd(), "prep", prep_path.clone())
            .map_err(|e| self.io_err("open", show(&prep_path), e))?;
        let mut touched: BTreeSet<Option<StackPath>> = BTreeSet::new();
        let mut applied = Applied::default();
        let mut done = 0usize;
        let mut in_backups = true;
        for op in &j.ops {
            if in_backups && backups_done {
                if matches!(op, Op::EndBackups) {
                    in_backups = false;
                }
                continue;
            }
            if matches!(op, Op::EndBackups) {
                in_backups = false;
            }
            self.crash_point(done)?;
            self.apply_op(op, hash, &backup, &prep, &mut touched, &mut applied)?;
            done += 1;
        }
        self.crash_point(done)?;
        for dir in &touched {
            // A directory that is gone (moved to the backup) needs no fsync here.
            if let Ok(fd) = self.live.dir(dir.as_ref()) {
                rustix::fs::fsync(&fd).map_err(|e| {
                    let shown = dir.as_ref().map_or_else(
                        || self.live.path().display().to_string(),
                        |d| self.live.show(d),
                    );
                    self.io_err("fsync", shown, e.into())
                })?;
            }
        }
        for (fd, p) in [(backup.fd(), &backup_path), (prep.fd(), &prep_path)] {
            rustix::fs::fsync(fd).map_err(|e| self.io_err("fsync", show(p), e.into()))?;
        }
        Ok(applied)
    }

    fn apply_op(
        &self,
        op: &Op,
        hash: &blake3::Hash,
        backup: &Tree,
        prep: &Tree,
        touched: &mut BTreeSet<Option<StackPath>>,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        let live = &self.live;
        let fail =
            |what: &'static str, p: &StackPath, e: io::Error| self.io_err(what, live.show(p), e);
        match op {
            Op::Backup { path, slot } => {
                let slot = slot.to_string();
                if rustix::fs::statat(backup.fd(), slot.as_str(), AtFlags::SYMLINK_NOFOLLOW).is_ok()
                {
                    return Ok(());
                }
                let (dir, name) = match live.parent(path) {
                    Ok(x) => x,
                    Err(e) if tree::is_absent(&e) => return Ok(()),
                    Err(e) => return Err(fail("back up", path, e)),
                };
                match rustix::fs::renameat(&dir, name, backup.fd(), slot.as_str()) {
                    Ok(()) => {
                        touched.insert(path.parent());
                        applied.backed_up += 1;
                        Ok(())
                    }
                    Err(Errno::NOENT) => Ok(()),
                    Err(e) => Err(fail("back up", path, e.into())),
                }
            }
            Op::EndBackups => {
                state::write_synced(self.state_dir.fd(), MARKER, hash.to_hex().as_bytes())
                    .map_err(|e| self.io_err("write", self.state_file(MARKER), e))
            }
            Op::Mkdir { path } => {
                let (dir, name) = live.parent(path).map_err(|e| fail("mkdir", path, e))?;
                match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| fail("stat", path, e.into()))?;
                        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                            return Err(fail("mkdir", path, Errno::EXIST.into()));
                        }
                    }
                    Err(e) => return Err(fail("mkdir", path, e.into())),
                }
                touched.insert(path.parent());
                Ok(())
            }
            Op::Place { prep: n, path } => {
                let (dir, name) = live.parent(path).map_err(|e| fail("place", path, e))?;
                let n = n.to_string();
                match rustix::fs::renameat(prep.fd(), n.as_str(), &dir, name) {
                    Ok(()) => applied.placed += 1,
                    Err(Errno::NOENT)
                        if rustix::fs::statat(prep.fd(), n.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                            .is_err_and(|e| e == Errno::NOENT) => {}
                    Err(e) => return Err(fail("place", path, e.into())),
                }
                touched.insert(path.parent());
                Ok(())
            }
            Op::Symlink { path, target, meta } => {
                let (dir, name) = live.parent(path).map_err(|e| fail("symlink", path, e))?;
                match rustix::fs::symlinkat(target.as_slice(), &dir, name) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let there = rustix::fs::readlinkat(&dir, name, Vec::new())
                            .map_err(|e| fail("symlink", path, e.into()))?;
                        if there.as_bytes() != target.as_slice() {
                            return Err(fail("symlink", path, Errno::EXIST.into()));
                        }
                    }
                    Err(e) => return Err(fail("symlink", path, e.into())),
                }
                tree::set_symlink_meta(dir.as_fd(), name, meta)
                    .map_err(|e| fail("set metadata of", path, e))?;
                touched.insert(path.parent());
                Ok(())
            }
            Op::Link { leader, path } => {
                let (ldir, lname) = live
                    .parent(leader)
                    .map_err(|e| fail("hardlink", leader, e))?;
                let (dir, name) = live.parent(path).map_err(|e| fail("hardlink", path, e))?;
                match rustix::fs::linkat(&ldir, lname, &dir, name, AtFlags::empty()) {
                    Ok(()) => {}
                    Err(Errno::EXIST) => {
                        let a = rustix::fs::statat(&ldir, lname, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| fail("stat", leader, e.into()))?;
                        let b = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(|e| fail("stat", path, e.into()))?;
                        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
                            return Err(fail("hardlink", path, Errno::EXIST.into()));
                        }
                    }
                    Err(e) => return Err(fail("hardlink", path, e.into())),
                }
                touched.insert(path.parent());
                Ok(())
            }
            Op::Meta {
                path,
                dir: is_dir,
                meta,
                xattrs,
            } => {
                let (dir, name) = live
                    .parent(path)
                    .map_err(|e| fail("set metadata of", path, e))?;
                let flags = if *is_dir { DIR_FLAGS } else { READ_FLAGS };
                let fd = rustix::fs::openat(&dir, name, flags, Mode::empty())
                    .map_err(|e| fail("open", path, e.into()))?;
                let st = rustix::fs::fstat(&fd).map_err(|e| fail("stat", path, e.into()))?;
                let want = if *is_dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                if FileType::from_raw_mode(st.st_mode) != want {
                    return Err(fail("set metadata of", path, tree::not_a_file()));
                }
                tree::set_meta_fd(fd.as_fd(), meta, xattrs)
                    .map_err(|e| fail("set metadata of", path, e))?;
                touched.insert(path.parent());
                Ok(())
            }
            Op::Patch {
                patch: name,
                path,
                meta,
                xattrs,
                ..
            } => {
                let src = patch::open_patch(&self.staging, name)
                    .and_then(|f| patch::read_header(&f).map(|h| (f, h)));
                let (src, h) = src.map_err(|e| {
                    self.io_err("read patch", show(&self.staging.patches_path.join(name)), e)
                })?;
                let (dir, file_name) = live.parent(path).map_err(|e| fail("patch", path, e))?;
                let flags = OFlags::WRONLY
                    | OFlags::NOFOLLOW
                    | OFlags::NONBLOCK
                    | OFlags::NOCTTY
                    | OFlags::CLOEXEC;
                let fd = rustix::fs::openat(&dir, file_name, flags, Mode::empty())
                    .map_err(|e| fail("open", path, e.into()))?;
                let st = rustix::fs::fstat(&fd).map_err(|e| fail("stat", path, e.into()))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(fail("patch", path, tree::not_a_file()));
                }
                let f = std::fs::File::from(fd);
                patch::apply(&src, &h, &f)
                    .and_then(|()| f.sync_data())
                    .map_err(|e| fail("patch", path, e))?;
                tree::set_meta_fd(f.as_fd(), meta, xattrs)
                    .map_err(|e| fail("set metadata of", path, e))?;
                applied.patched += 1;
                touched.insert(path.parent());
                Ok(())
            }
            Op::SymlinkMeta { path, meta } => {
                let (dir, name) = live
                    .parent(path)
                    .map_err(|e| fail("set metadata of", path, e))?;
                tree::set_symlink_meta(dir.as_fd(), name, meta)
                    .map_err(|e| fail("set metadata of", path, e))?;
                touched.insert(path.parent());
                Ok(())
            }
        }
    }

    /// After the ops: write the state, drop the journal, then clear staging and prune.
    /// Returns the time since `t0` at the point the state was durable.
    fn finish(
        &mut self,
        j: Journal,
        manifest: Manifest,
        t0: Option<Instant>,
    ) -> Result<Duration, StoreError> {
        let mut st = j.state_after;
        let apply = t0.map(|t| t.elapsed()).unwrap_or_default();
        st.commit_ms = apply.as_millis() as u64;
        self.write_state(&st)?;
        let sd = self.state_dir.fd();
        state::remove_file(sd, JOURNAL)
            .map_err(|e| self.io_err("remove", self.state_file(JOURNAL), e))?;
        rustix::fs::fsync(sd).map_err(|e| self.io_err("fsync", self.state_file(""), e.into()))?;
        state::remove_file(sd, MARKER)
            .map_err(|e| self.io_err("remove", self.state_file(MARKER), e))?;
        self.state = st;
        self.manifest = manifest;
        for g in j.drop_generations {
            let p = self.generations.path().join(g.to_string());
            remove_tree(&p).map_err(|e| self.io_err("remove", show(&p), e))?;
        }
        // Placed files share inodes with their objects: clear them before the stack starts.
        self.clear_dir(
            self.staging.objects.as_fd(),
            &self.staging.objects_path.clone(),
        )?;
        self.clear_dir(
            self.staging.patches.as_fd(),
            &self.staging.patches_path.clone(),
        )?;
        self.tidy()?;
        Ok(apply)
    }

    /// Empties `staging/prep`.
    pub(crate) fn reset_prep(&self) -> Result<(), StoreError> {
        let p = self.staging_dir.path().join("prep");
        let fd = rustix::fs::openat(self.staging_dir.fd(), "prep", DIR_FLAGS, Mode::empty())
            .map_err(|e| self.io_err("open", show(&p), e.into()))?;
        self.clear_dir(fd.as_fd(), &p)
    }

    fn record(&self, g: u64) -> Result<Option<GenerationRecord>, StoreError> {
        let p = self.generations.path().join(g.to_string()).join("record");
        let dir = match Tree::open_at(
            self.generations.fd(),
            &g.to_string(),
            self.generations.path().join(g.to_string()),
        ) {
            Ok(d) => d,
            Err(e) if tree::is_absent(&e) => return Ok(None),
            Err(e) => return Err(self.io_err("open", show(&p), e)),
        };
        let Some(bytes) =
            state::read_file(dir.fd(), "record").map_err(|e| self.io_err("read", show(&p), e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::StateCorrupt {
                stack: self.stack.clone(),
                path: p,
                reason: e.to_string(),
            })
    }

    /// Generations a rollback can restore, newest first: the chain of kept generation dirs from
    /// the committed one back.
    pub fn restorable(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        let mut cur = self.state.generation;
        while cur > 0 {
            let Some(r) = self.record(cur)? else { break };
            let prev = r.previous.generation;
            if prev >= cur {
                break;
            }
            out.push(prev);
            cur = prev;
        }
        Ok(out)
    }

    /// What [`StackStore::rollback`] to `to` would change, against the manifest of the generation
    /// it restores (the live tree may differ where the target's containers changed it): the
    /// generation it resolves to, and the changes, for the `max_delete` valve and the question
    /// a person is asked.
    pub fn rollback_preview(&self, to: Option<u64>) -> Result<(u64, Changes), StoreError> {
        let available = self.restorable()?;
        let target = match to.or(available.first().copied()) {
            Some(t) if available.contains(&t) => t,
            other => {
                return Err(StoreError::NoSuchGeneration {
                    stack: self.stack.clone(),
                    generation: other.unwrap_or(self.state.generation.saturating_sub(1)),
                    available,
                });
            }
        };
        let want = self.load_manifest(target)?;
        Ok((target, Changes::between(&self.manifest, &want)))
    }

    /// Restores the previous generation (or generation `to`, one kept generation at a time),
    /// byte for byte and metadata-exact, through journaled commits. Call it with the stack
    /// stopped.
    pub fn rollback(&mut self, to: Option<u64>) -> Result<RollbackReport, StoreError> {
        let available = self.restorable()?;
        let from = self.state.generation;
        let target = match (to, available.first()) {
            (Some(t), _) => t,
            (None, Some(&p)) => p,
            (None, None) => {
                return Err(StoreError::NoSuchGeneration {
                    stack: self.stack.clone(),
                    generation: from.saturating_sub(1),
                    available,
                });
            }
        };
        if !available.contains(&target) {
            return Err(StoreError::NoSuchGeneration {
                stack: self.stack.clone(),
                generation: target,
                available,
            });
        }
        let mut steps = Vec::new();
        while self.state.generation != target {
            steps.push(self.rollback_step()?);
        }
        Ok(RollbackReport {
            from,
            to: target,
            steps,
        })
    }

    fn rollback_step(&mut self) -> Result<CommitReport, StoreError> {
        let n = self.state.generation;
        let Some(record) = self.record(n)? else {
            return Err(StoreError::NoSuchGeneration {
                stack: self.stack.clone(),
                generation: n,
                available: self.restorable()?,
            });
        };
        let previous = record.previous;
        // Undo commit `n`: back to the tree it replaced (see `commit`), else to the manifest
        // of the generation before it.
        let want = match self.read_before(n)? {
            Some(before) => {
                // From now on, generation `previous` is what was live before commit `n`.
                let encoded =
                    state::encode_manifest(previous.generation, &before).map_err(|e| {
                        self.io_err(
                            "encode manifest",
                            show(self.manifests.path()),
                            io::Error::new(io::ErrorKind::InvalidData, e),
                        )
                    })?;
                let name = previous.generation.to_string();
                if previous.generation > 0 {
                    state::write_atomic(self.manifests.fd(), &name, &encoded).map_err(|e| {
                        self.io_err("write", show(&self.manifests.path().join(&name)), e)
                    })?;
                }
                before
            }
            None => self.load_manifest(previous.generation)?,
        };
        let changes = Changes::between(&self.manifest, &want);
        self.stage_for_rollback(n, &changes)?;
        std::fs::create_dir_all(self.generations.path().join(n.to_string()).join("undo"))
            .map_err(|e| self.io_err("create", show(self.generations.path()), e))?;
        let state_after = StoreState {
            rolled_back_from: Some(n),
            last_error: None,
            highest_generation: self.state.highest_generation.max(n),
            ..previous
        };
        let prepared = self.plan(
            &want,
            &changes,
            format!("{n}/undo"),
            state_after,
            vec![n],
            None,
        )?;
        self.prepared = None;
        self.run_journal(prepared.journal, prepared.manifest)
    }

    /// Puts every content the rollback needs for its created or replaced files into staging: from the
    /// backup of generation `n` (hardlinked, after hashing), or copied from a live file that has
    /// it.
    fn stage_for_rollback(&mut self, n: u64, changes: &Changes) -> Result<(), StoreError> {
        let mut missing: HashMap<Hash, &StackPath> = HashMap::new();
        for u in &changes.upserts {
            if let (Upsert::Create(e) | Upsert::Replace(e), Some((_, h))) = (u, u.entry().file())
                && !self.staging.object_exists(&h)
            {
                missing.entry(h).or_insert(&e.path);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let data_path = self.generations.path().join(n.to_string()).join("data");
        let cfg = ScanConfig {
            root: data_path.clone(),
            exclude: Vec::new(),
            cache: None,
            checksum: true,
            xattrs: false,
        };
        let scan = stackclone_common::scan(&cfg).map_err(|source| StoreError::Scan {
            stack: self.stack.clone(),
            path: data_path.clone(),
            source: Box::new(source),
        })?;
        let data = Tree::open(&data_path).map_err(|e| self.io_err("open", show(&data_path), e))?;
        for e in scan.manifest.entries() {
            let Some((_, h)) = e.file() else { continue };
            if missing.remove(&h).is_none() {
                continue;
            }
            let (dir, name) = data
                .parent(&e.path)
                .map_err(|err| self.io_err("open", show(&data_path), err))?;
            match rustix::fs::linkat(
                &dir,
                name,
                &self.staging.objects,
                h.to_hex().as_str(),
                AtFlags::empty(),
            ) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(err) => {
                    return Err(self.io_err(
                        "link backup into staging",
                        show(&data_path),
                        err.into(),
                    ));
                }
            }
        }
        // Files commit `n` patched in place: rebuild their old content from the live file and
        // the undo, in staging, and keep it if it hashes to what is wanted.
        if !missing.is_empty() {
            self.stage_from_undo(n, &mut missing)?;
        }
        // What the backup does not hold is still live somewhere (a rename, say).
        let live_by_hash: HashMap<Hash, StackPath> = self
            .manifest
            .entries()
            .iter()
            .filter_map(|e| e.file().map(|(_, h)| (h, e.path.clone())))
            .collect();
        for (h, path) in missing {
            let found = match live_by_hash.get(&h) {
                Some(from) => self.stage_local(from, h)?,
                None => LocalStage::Mismatch,
            };
            if found == LocalStage::Mismatch {
                return Err(StoreError::ContentMissing {
                    stack: self.stack.clone(),
                    hash: h,
                    path: self.live.show(path),
                });
            }
        }
        Ok(())
    }

    fn stage_from_undo(
        &self,
        n: u64,
        missing: &mut HashMap<Hash, &StackPath>,
    ) -> Result<(), StoreError> {
        let dir = self.generations.path().join(n.to_string()).join("patches");
        let entries = match std::fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io_err("list", show(&dir), e)),
        };
        for entry in entries {
            let p = entry
                .map_err(|e| self.io_err("list", show(&dir), e))?
                .path();
            let undo = std::fs::File::open(&p).map_err(|e| self.io_err("open", show(&p), e))?;
            let h = patch::read_header(&undo).map_err(|e| self.io_err("read", show(&p), e))?;
            let Ok(live) = self.live.open_file(&h.path) else {
                continue;
            };
            let (tmp, name) = self.staging.create_tmp_raw()?;
            let tmp_show = show(&self.staging.tmp_path.join(&name));
            let built = (|| -> io::Result<Hash> {
                let len = live.metadata()?.len();
                super::staging::copy_sparse(&live, &tmp, len)?;
                patch::apply(&undo, &h, &tmp)?;
                tmp.sync_all()?;
                let mut hasher = blake3::Hasher::new();
                hasher.update_reader(&tmp)?;
                Ok(hasher.finalize().into())
            })();
            let hash = match built {
                Ok(hash) => hash,
                Err(e) => {
                    let _ = state::remove_file(&self.staging.tmp, &name);
                    return Err(self.io_err("rebuild old version in", tmp_show, e));
                }
            };
            if missing.remove(&hash).is_some() {
                rustix::fs::renameat(
                    &self.staging.tmp,
                    name.as_str(),
                    &self.staging.objects,
                    hash.to_hex().as_str(),
                )
                .map_err(|e| self.io_err("rename into objects", tmp_show, e.into()))?;
            } else {
                state::remove_file(&self.staging.tmp, &name)
                    .map_err(|e| self.io_err("remove", tmp_show, e))?;
            }
        }
        Ok(())
    }

    /// Removes generation dirs of commits that never happened (above the committed
    /// generation), those beyond `keep_generations`, and manifests nothing refers to.
    pub(crate) fn prune(&mut self) -> Result<(), StoreError> {
        let list = |t: &Tree| -> Result<Vec<u64>, StoreError> {
            let err = |e: io::Error| self.io_err("list", show(t.path()), e);
            let fd = rustix::fs::openat(t.fd(), ".", DIR_FLAGS, Mode::empty())
                .map_err(|e| err(e.into()))?;
            let mut out = Vec::new();
            for item in rustix::fs::Dir::new(fd).map_err(|e| err(e.into()))? {
                let item = item.map_err(|e| err(e.into()))?;
                if let Some(g) = item
                    .file_name()
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    out.push(g);
                }
            }
            out.sort_unstable();
            Ok(out)
        };
        let current = self.state.generation;
        let mut gens = list(&self.generations)?;
        let mut remove: Vec<u64> = gens.iter().copied().filter(|&g| g > current).collect();
        gens.retain(|&g| g <= current);
        let excess = gens.len().saturating_sub(self.keep_generations as usize);
        remove.extend(gens.drain(..excess));
        for g in remove {
            let p = self.generations.path().join(g.to_string());
            remove_tree(&p).map_err(|e| self.io_err("remove", show(&p), e))?;
        }
        let mut keep: HashSet<u64> = HashSet::from([current]);
        for g in gens {
            if let Some(r) = self.record(g)? {
                keep.insert(r.previous.generation);
            }
        }
        for m in list(&self.manifests)? {
            if !keep.contains(&m) {
                state::remove_file(self.manifests.fd(), &m.to_string())
                    .map_err(|e| self.io_err("remove", show(self.manifests.path()), e))?;
            }
        }
        Ok(())
    }
}

fn show(p: &std::path::Path) -> String {
    p.display().to_string()
}
