//! Rollback: which generations can be restored, what restoring one would change, and restoring,
//! one generation at a time. Each step stages the contents the older tree needs (from the
//! generation's backup, rebuilt from its undo copies, or from live files) and commits that tree
//! through the same journal as any commit, so a rollback is crash-safe too.

use std::collections::HashMap;
use std::io;

use rustix::fs::AtFlags;
use rustix::io::Errno;
use stackclone_common::ScanConfig;
use stackclone_proto::manifest::Hash;
use stackclone_proto::path::StackPath;
use stackclone_proto::plan::{Changes, Upsert};

use super::{CommitReport, RollbackReport, show};
use crate::store::patch;
use crate::store::state::{self, StoreState};
use crate::store::tree::Tree;
use crate::store::{LocalStage, StackStore, StoreError};

impl StackStore {
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
                let encoded = stackclone_proto::manifest::encode_file(previous.generation, &before)
                    .map_err(|e| {
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
        // The role is the host's, not the tree's: a rollback does not demote or promote.
        let state_after = StoreState {
            rolled_back_from: Some(n),
            last_error: None,
            highest_generation: self.state.highest_generation.max(n),
            promoted_at: self.state.promoted_at,
            ..previous
        };
        let prepared = self.make_ready(
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
                crate::store::staging::copy_sparse(&live, &tmp, len)?;
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
}
