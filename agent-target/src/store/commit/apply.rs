//! Carrying out a prepared commit with the stack stopped: the last checks against the live dir
//! (patch bases, outside hard links, the tree the commit was planned against), the tree before
//! it, then the journal: publish, apply every op idempotently, fsync, write the state, drop the
//! journal, clear staging. [`StackStore::recover`] replays the same ops after a crash.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use stackclone_common::cache::Seeded;
use stackclone_proto::manifest::Manifest;
use stackclone_proto::path::StackPath;
#[cfg(doc)]
use stackclone_proto::session::Commit;
use tracing::debug;

use super::{CommitReport, Prepared, show};
use crate::store::journal::{Journal, Op};
use crate::store::patch::{self, BaseFacts};
use crate::store::state;
use crate::store::tree::{self, DIR_FLAGS, READ_FLAGS, Tree};
use crate::store::{HASH_CACHE, JOURNAL, JOURNAL_TMP, MARKER, StackStore, StoreError, remove_tree};

/// What applying a journal's ops did, for the [`CommitReport`].
#[derive(Debug, Default)]
pub(super) struct Applied {
    backed_up: usize,
    placed: usize,
    patched: usize,
}

impl StackStore {
    /// Commits what [`StackStore::prepare`] made ready; call it with the stack stopped. `now` is
    /// the target's clock (Unix seconds), recorded as the commit time.
    ///
    /// The live dir must still be exactly the tree the commit was planned against
    /// ([`Commit::live`]); otherwise the commit is [`StoreError::ChangedSincePlanned`] and
    /// nothing is written. When the plan came from this store's last scan, one `lstat` per path
    /// against that scan's facts proves it (no read, no hashing, no second walk); when it cannot
    /// (a path changed, or changed too close to the scan for its stat to tell), the live dir is
    /// rescanned and compared ([`CommitReport::live_rescanned`]).
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
        // since; then it is the tree they left, whose bytes the backup really has. Usually one
        // lstat per path proves it is still the tree the plan was made against (the facts of
        // the scan the plan came from); otherwise a cached scan: one lstat per path, re-hashing
        // only files that changed.
        let planned = p.planned_against.take();
        let fast = self.unchanged_since_scan(planned.as_ref());
        let rescanned = fast.is_none();
        let (before, outside, changed) = match fast {
            Some(outside) => (planned.unwrap_or_default(), outside, None),
            None => {
                let scan = self.scan_live(false)?;
                let outside = scan.outside_links();
                let changed = planned
                    .as_ref()
                    .and_then(|planned| planned.first_difference(&scan.manifest))
                    .cloned();
                (scan.manifest, outside, changed)
            }
        };
        // Nothing is ever written into, chowned or chmodded through a hard link that leaves the
        // stack: the plan replaces such files, and a link made since the plan refuses here.
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
        // The safety net of planning against a stopped standby: the tree is still exactly the
        // one the changes were planned against. Anything else (a container that was not
        // stopped, a process outside Docker) refuses here, with the live dir at N-1; the next
        // cycle plans against the tree as it is then.
        if let Some(path) = changed {
            return Err(StoreError::ChangedSincePlanned {
                stack: self.stack.clone(),
                path: self.live.show(&path),
            });
        }
        self.write_before(p.journal.state_after.generation, &before)?;
        let mut report = self.run_journal(p.journal, p.manifest)?;
        report.live_rescanned = rescanned;
        Ok(report)
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

    /// The live files linked outside the stack, if the live dir provably still is `planned`:
    /// the tree of this store's last [`stack_state`](StackStore::stack_state) scan, every path of
    /// which still `lstat`s as that scan found it
    /// ([`Unchanged::holds`](stackclone_common::Unchanged::holds)). `None` if that cannot
    /// be told (no plan, another scan, a path changed or changed too close to the scan, an
    /// error): the caller scans.
    fn unchanged_since_scan(&self, planned: Option<&Manifest>) -> Option<Vec<StackPath>> {
        let planned = planned?;
        let (unchanged, outside) = self.last_scan.lock().ok()?.take()?;
        match unchanged.holds(self.live.path(), planned) {
            Ok(true) => Some(outside),
            Ok(false) => None,
            Err(e) => {
                debug!(stack = %self.stack, error = %e, "checking the live dir by its stats failed; scanning it");
                None
            }
        }
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

    pub(super) fn run_journal(
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
            live_rescanned: false,
        })
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
    pub(super) fn apply(
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
                    Err(Errno::NOENT) if prepared_gone(prep, &n) => {}
                    Err(e) => return Err(fail("place", path, e.into())),
                }
                touched.insert(path.parent());
                Ok(())
            }
            Op::PlaceTree {
                prep: n,
                path,
                files,
            } => {
                let (dir, name) = live.parent(path).map_err(|e| fail("place", path, e))?;
                let n = format!("tree-{n}");
                // Never onto something: the directory's backup moved whatever was there.
                let renamed = match rustix::fs::renameat_with(
                    prep.fd(),
                    n.as_str(),
                    &dir,
                    name,
                    rustix::fs::RenameFlags::NOREPLACE,
                ) {
                    // A file system without `RENAME_NOREPLACE`: look first (the standby is
                    // stopped; nothing else writes here). A replay finds the prepared directory
                    // gone and the live one there: done, not "exists".
                    Err(Errno::INVAL) if prepared_gone(prep, &n) => Err(Errno::NOENT),
                    Err(Errno::INVAL) => {
                        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                            Ok(_) => Err(Errno::EXIST),
                            Err(Errno::NOENT) => {
                                rustix::fs::renameat(prep.fd(), n.as_str(), &dir, name)
                            }
                            Err(e) => Err(e),
                        }
                    }
                    other => other,
                };
                match renamed {
                    Ok(()) => applied.placed += *files as usize,
                    Err(Errno::NOENT) if prepared_gone(prep, &n) => {}
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
    pub(super) fn finish(
        &mut self,
        j: Journal,
        manifest: Manifest,
        t0: Option<Instant>,
    ) -> Result<Duration, StoreError> {
        let placed = placed_files(&j.ops, &manifest);
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
        let manifest = Arc::new(manifest);
        self.manifest = manifest.clone();
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
        // The files this commit wrote are exactly the manifest's content, and the standby is
        // still stopped: tell the hash cache, so the next cycle's scan reads none of them
        // (after a first copy it re-hashed the whole tree). After the objects are cleared: an
        // unlink moves the placed file's ctime. Not after a recovery (`t0` is `None`): a
        // standby that a reboot started again may have written since the journal's ops ran.
        if t0.is_none() {
            return Ok(apply);
        }
        // Their xattrs too: every op that wrote a file set exactly its entry's `user.*` xattrs
        // (a hard link shares its leader's inode, whose entry has the same).
        let files: Vec<Seeded<'_>> = placed
            .iter()
            .filter_map(|p| {
                let e = manifest.get(p)?;
                Some(Seeded {
                    path: p.as_bytes(),
                    hash: e.file()?.1,
                    xattrs: Some(&e.xattrs),
                })
            })
            .collect();
        let cache = self.state_dir.path().join(HASH_CACHE);
        match stackclone_common::cache::seed(&cache, self.live.path(), &files) {
            Ok(n) => {
                debug!(stack = %self.stack, files = n, "hash cache seeded with the commit's files")
            }
            Err(e) => {
                debug!(stack = %self.stack, error = %e, "hash cache not seeded; the next scan hashes the commit's files")
            }
        }
        Ok(apply)
    }
}

/// Whether the prepared entry `name` is no longer in `staging/prep`: a `Place` or `PlaceTree`
/// that finds it gone already ran (nothing else removes it).
fn prepared_gone(prep: &Tree, name: &str) -> bool {
    rustix::fs::statat(prep.fd(), name, AtFlags::SYMLINK_NOFOLLOW).is_err_and(|e| e == Errno::NOENT)
}

/// The live files a commit's ops wrote or whose inode they touched (content, metadata, links),
/// among them every file of `manifest` in a directory placed whole.
fn placed_files(ops: &[Op], manifest: &Manifest) -> Vec<StackPath> {
    let mut out = Vec::new();
    let roots: std::collections::HashSet<&StackPath> = ops
        .iter()
        .filter_map(|op| match op {
            Op::PlaceTree { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    if !roots.is_empty() {
        for e in manifest.entries() {
            if e.file().is_none() {
                continue;
            }
            let mut up = e.path.parent();
            while let Some(p) = up {
                if roots.contains(&p) {
                    out.push(e.path.clone());
                    break;
                }
                up = p.parent();
            }
        }
    }
    for op in ops {
        match op {
            Op::Place { path, .. }
            | Op::Patch { path, .. }
            | Op::Meta {
                path, dir: false, ..
            } => out.push(path.clone()),
            Op::Link { leader, path } => {
                out.push(leader.clone());
                out.push(path.clone());
            }
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}
