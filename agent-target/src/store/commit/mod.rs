//! A commit, by phase: [`StackStore::prepare`] makes it ready (`prepare`), [`StackStore::commit`]
//! journals and applies it (`apply`), [`StackStore::recover`] finishes one a crash interrupted
//! (`recover`), and [`StackStore::rollback`] undoes commits through the same journal
//! (`rollback`). The generation dirs they keep and prune are in `generations`. The crash argument
//! is in the parent module doc.

mod apply;
mod generations;
mod plan;
mod prepare;
mod recover;
mod rollback;

use std::time::Duration;

use stackclone_proto::manifest::Manifest;

#[cfg(doc)]
use super::StackStore;
use super::journal::Journal;

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
    /// The live dir was scanned again before the journal was written, because its stats alone
    /// could not prove it still the tree the commit was planned against (see
    /// [`StackStore::commit`](crate::store::StackStore::commit)).
    pub live_rescanned: bool,
}

/// What a rollback did, step by step (one step per generation undone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackReport {
    pub from: u64,
    pub to: u64,
    pub steps: Vec<CommitReport>,
}

fn show(p: &std::path::Path) -> String {
    p.display().to_string()
}
