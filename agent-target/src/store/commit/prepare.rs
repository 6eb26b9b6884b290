//! Making a commit ready before its journal: the generation dir and record, the new manifest,
//! the op list, the prepared files (content and metadata) in `staging/prep`, the undo copies of
//! what in-place patches will overwrite, and the checks of the ops against the live dir. Nothing
//! in the live dir changes here.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use stackclone_proto::lineage::Lineage;
use stackclone_proto::manifest::{Entry, EntryKind, Hash, Manifest};
use stackclone_proto::path::StackPath;
use stackclone_proto::plan::Changes;
use stackclone_proto::session::Commit;

use super::generations::GenerationRecord;
use super::plan::{self, Staged, TreePlan};
use super::{Prepared, show};
use crate::store::journal::{Journal, Op};
use crate::store::patch::{self, PatchHeader};
use crate::store::state::{self, StoreState};
use crate::store::tree::{self, DIR_FLAGS, READ_FLAGS, Tree};
use crate::store::{LocalStage, StackStore, StoreError, remove_tree};

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
        let encoded = stackclone_proto::manifest::encode_file(g, c.manifest()).map_err(|e| {
            self.io_err(
                "encode manifest",
                show(self.manifests.path()),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        state::write_atomic(self.manifests.fd(), &name, &encoded)
            .map_err(|e| self.io_err("write", show(&self.manifests.path().join(&name)), e))?;

        let (files, bytes) = c.manifest().file_totals();
        let mut state_after = StoreState {
            stack: self.stack.clone(),
            generation: g,
            highest_generation: g.max(self.state.highest_generation),
            committed_at: None,
            manifest_root: Some(c.manifest().root().to_hex()),
            files,
            bytes,
            ..StoreState::default()
        };
        // The history the flag signed; a fork recorded for it stays with it.
        let history = c.status().status().history;
        match self.state.lineage() {
            Some(l) if l.history == history => state_after.set_lineage(&l),
            _ => state_after.set_lineage(&Lineage::new(history)),
        }
        // A fail-back hands the stack over: from this commit on, it is the primary here (dated
        // by the flag, which the session checked against this host's clock).
        if c.hand_over() {
            state_after.promoted_at = Some(c.status().status().created_at);
        }
        let undo = gen_path.join("patches");
        std::fs::create_dir(&undo).map_err(|e| self.io_err("create", show(&undo), e))?;
        let mut prepared = self.make_ready(
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

    /// Plans the ops that turn the live dir into `want` ([`plan::plan`]) and makes what they
    /// need: the prepared files, and with an `undo_dir` (a commit, not a rollback) the undo
    /// copies of what in-place patches will overwrite; then checks the ops against the live dir
    /// and makes it all durable.
    pub(super) fn make_ready(
        &mut self,
        want: &Manifest,
        changes: &Changes,
        backup: String,
        state_after: StoreState,
        drop_generations: Vec<u64>,
        undo_dir: Option<&std::path::Path>,
    ) -> Result<Prepared, StoreError> {
        self.reset_prep()?;
        // A rollback stages every content whole, so it has no patch to write.
        let staged = match undo_dir {
            Some(_) => self.staged_for_plan()?,
            None => Staged::default(),
        };
        let plan = plan::plan(want, changes, &staged);
        for h in &plan.patches {
            if !self.patch_applies(h) {
                return Err(StoreError::NotPrepared {
                    stack: self.stack.clone(),
                    what: format!(
                        "{} changed since its in-place patch was staged; run the cycle again (the \
                         file will be transferred again)",
                        self.live.show(&h.path)
                    ),
                });
            }
        }
        let prep_path = self.staging_dir.path().join("prep");
        let prep = Tree::open_at(self.staging_dir.fd(), "prep", prep_path.clone())
            .map_err(|e| self.io_err("open", show(&prep_path), e))?;
        let mut used: HashSet<Hash> = HashSet::new();
        let mut counts = (0u64, 0u64, 0u64);
        for (n, e) in (0u64..).zip(&plan.prep) {
            let name = n.to_string();
            let shown = show(&prep.path().join(&name));
            self.prepare_file(prep.fd(), name.as_bytes(), shown, e, &mut used, &mut counts)?;
        }
        for (n, t) in plan.trees.iter().enumerate() {
            self.prepare_tree(&prep, n, t, &mut used, &mut counts)?;
        }
        if let Some(undo) = undo_dir {
            for (n, h) in plan.patches.iter().enumerate() {
                self.write_undo(h, &undo.join(n.to_string()))?;
            }
        }
        self.validate(&plan.ops)?;
        let (files_linked, files_copied, files_staged_locally) = counts;
        let mut prepared = Prepared {
            token: 0,
            journal: Journal {
                backup,
                ops: plan.ops,
                state_after,
                drop_generations,
            },
            manifest: want.clone(),
            planned_against: None,
            files_linked,
            files_copied,
            files_staged_locally,
        };
        // One flush of the whole file system makes every staged object, prepared file and their
        // metadata durable before a journal can point at them (staged files are not fsynced one
        // by one; the state dir and the live dir are on this same file system). It also makes
        // the new generation dir durable, which `Backup` ops move entries into. A commit with
        // no `Place`, `PlaceTree`, `Patch` or `Backup` op (nothing changed, or only symlinks,
        // links and metadata in directories that exist) points at nothing unflushed: the record
        // and the manifest were each written with an fsync, so it skips the flush.
        let points_at_prepared = prepared.journal.ops.iter().any(|op| {
            matches!(
                op,
                Op::Place { .. } | Op::PlaceTree { .. } | Op::Patch { .. } | Op::Backup { .. }
            )
        });
        if points_at_prepared {
            rustix::fs::syncfs(prep.fd())
                .map_err(|e| self.io_err("syncfs", show(&prep_path), e.into()))?;
        }
        self.next_token += 1;
        prepared.token = self.next_token;
        self.prepared = Some(prepared.token);
        Ok(prepared)
    }

    /// What [`plan::plan`] needs to know of staging: the readable in-place patches, and which
    /// of their contents are staged whole too.
    fn staged_for_plan(&self) -> Result<Staged, StoreError> {
        let patches: HashMap<Hash, PatchHeader> = self.patches()?.into_iter().collect();
        let whole = patches
            .keys()
            .filter(|h| self.staging.object_exists(h))
            .copied()
            .collect();
        Ok(Staged { patches, whole })
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

    /// Makes `staging/prep/tree-<n>` for the directory `t` placed whole: the directory, and
    /// below it each entry of `t` as it will be live (files as [`prepare_file`] makes them,
    /// symlinks with their owner and mtime). The directories' own metadata are set by the
    /// commit's `Meta` ops once they are live.
    fn prepare_tree(
        &self,
        prep: &Tree,
        n: usize,
        t: &TreePlan<'_>,
        used: &mut HashSet<Hash>,
        counts: &mut (u64, u64, u64),
    ) -> Result<(), StoreError> {
        let name = format!("tree-{n}");
        let tree_path = prep.path().join(&name);
        rustix::fs::mkdirat(prep.fd(), name.as_str(), Mode::from_raw_mode(0o700))
            .map_err(|e| self.io_err("create", show(&tree_path), e.into()))?;
        let tree = Tree::open_at(prep.fd(), &name, tree_path.clone())
            .map_err(|e| self.io_err("open", show(&tree_path), e))?;
        let cut = t.root.as_bytes().len() + 1;
        // Entries come parents first, siblings together: keep the last directory open.
        let mut cur: Option<(Option<StackPath>, tree::Dir<'_>)> = None;
        for e in &t.entries {
            let rel = e
                .path
                .as_bytes()
                .get(cut..)
                .and_then(|b| StackPath::new(b.to_vec()).ok())
                .ok_or_else(|| StoreError::NotPrepared {
                    stack: self.stack.clone(),
                    what: format!("{} is not below {}", e.path, t.root),
                })?;
            let parent = rel.parent();
            let shown = show(&tree_path.join(std::ffi::OsStr::from_bytes(rel.as_bytes())));
            if cur.as_ref().is_none_or(|(p, _)| *p != parent) {
                let dir = tree
                    .dir(parent.as_ref())
                    .map_err(|err| self.io_err("open", shown.clone(), err))?;
                cur = Some((parent, dir));
            }
            let Some((_, dir)) = &cur else {
                continue;
            };
            let fname = rel.file_name();
            match &e.kind {
                EntryKind::Dir => rustix::fs::mkdirat(dir, fname, Mode::from_raw_mode(0o700))
                    .map_err(|err| self.io_err("create", shown, err.into()))?,
                EntryKind::Symlink { target } => {
                    rustix::fs::symlinkat(target.as_slice(), dir, fname)
                        .map_err(|err| self.io_err("create", shown.clone(), err.into()))?;
                    tree::set_symlink_meta(dir.as_fd(), fname, &e.meta)
                        .map_err(|err| self.io_err("set metadata of", shown, err))?;
                }
                EntryKind::File { .. } => {
                    self.prepare_file(dir.as_fd(), fname, shown, e, used, counts)?
                }
            }
        }
        Ok(())
    }

    /// Makes the file `name` in `dir` for the file entry `e`: a hardlink of its object for the
    /// first path that uses the content, a sparse copy for the others; then its metadata.
    fn prepare_file(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        prep_show: String,
        e: &Entry,
        used: &mut HashSet<Hash>,
        counts: &mut (u64, u64, u64),
    ) -> Result<(), StoreError> {
        let Some((size, hash)) = e.file() else {
            return Ok(());
        };
        let hex = hash.to_hex();
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
                dir,
                name,
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
                dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|err| self.io_err("create", prep_show.clone(), err.into()))?;
            let (src, dst) = (std::fs::File::from(src), std::fs::File::from(dst));
            crate::store::staging::copy_sparse(&src, &dst, size)
                .and_then(|()| dst.sync_all())
                .map_err(|err| self.io_err("copy staged object to", prep_show.clone(), err))?;
            counts.1 += 1;
        }
        let fd = rustix::fs::openat(dir, name, READ_FLAGS, Mode::empty())
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
        // Directories placed whole: they and everything below them are made by the commit.
        let trees: Vec<&StackPath> = ops
            .iter()
            .filter_map(|op| match op {
                Op::PlaceTree { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        for t in &trees {
            ok.insert((*t).clone());
        }
        let in_tree = |p: &StackPath| trees.iter().any(|t| p.starts_with(t));
        let not_dir = |p: &StackPath| StoreError::NotADirectory {
            stack: self.stack.clone(),
            path: self.live.show(p),
        };
        let mut check_dir = |p: Option<StackPath>, made: &HashSet<&StackPath>| {
            let Some(p) = p else { return Ok(()) };
            if made.contains(&p) || ok.contains(&p) || in_tree(&p) {
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
                Op::Place { path, .. } | Op::Symlink { path, .. } | Op::PlaceTree { path, .. } => {
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

    /// Empties `staging/prep`.
    pub(crate) fn reset_prep(&self) -> Result<(), StoreError> {
        let p = self.staging_dir.path().join("prep");
        let fd = rustix::fs::openat(self.staging_dir.fd(), "prep", DIR_FLAGS, Mode::empty())
            .map_err(|e| self.io_err("open", show(&p), e.into()))?;
        self.clear_dir(fd.as_fd(), &p)
    }
}
