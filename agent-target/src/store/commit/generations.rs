//! The generation dirs: `generations/<G>/record` (the state before commit G) and
//! `generations/<G>/before` (the live tree just before it), which rollback reads, and pruning:
//! dirs of commits that never happened, dirs beyond `keep_generations`, and manifests nothing
//! refers to.

use std::collections::HashSet;
use std::io;

use rustix::fs::Mode;
use serde::{Deserialize, Serialize};
use stackclone_proto::manifest::Manifest;

use super::show;
use crate::store::state::{self, StoreState};
use crate::store::tree::{self, DIR_FLAGS, Tree};
use crate::store::{StackStore, StoreError, remove_tree};

/// In a generation dir: the live tree just before that generation's commit.
const BEFORE: &str = "before";

/// The state before commit G, kept in `generations/<G>/record`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GenerationRecord {
    pub(super) generation: u64,
    pub(super) previous: StoreState,
}

impl StackStore {
    /// Saves the live tree as it was before commit `g`, in that commit's generation dir.
    pub(super) fn write_before(&self, g: u64, before: &Manifest) -> Result<(), StoreError> {
        let gen_path = self.generations.path().join(g.to_string());
        let gen_dir = Tree::open(&gen_path).map_err(|e| self.io_err("open", show(&gen_path), e))?;
        let encoded = stackclone_proto::manifest::encode_file(g, before).map_err(|e| {
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
    pub(super) fn read_before(&self, g: u64) -> Result<Option<Manifest>, StoreError> {
        let gen_path = self.generations.path().join(g.to_string());
        let gen_dir = Tree::open(&gen_path).map_err(|e| self.io_err("open", show(&gen_path), e))?;
        let Some(bytes) = state::read_file(gen_dir.fd(), BEFORE)
            .map_err(|e| self.io_err("read", show(&gen_path.join(BEFORE)), e))?
        else {
            return Ok(None);
        };
        let (_, m) = stackclone_proto::manifest::decode_file(&bytes).map_err(|reason| {
            StoreError::StateCorrupt {
                stack: self.stack.clone(),
                path: gen_path.join(BEFORE),
                reason,
            }
        })?;
        Ok(Some(m))
    }

    pub(super) fn record(&self, g: u64) -> Result<Option<GenerationRecord>, StoreError> {
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
