//! Finishing a commit whose journal was published when the target died: the journal is replayed
//! whole (its ops are idempotent, and the backups are skipped once the marker says they ran), so
//! the live dir ends at exactly the generation the journal commits.

use crate::store::journal::Journal;
use crate::store::state;
use crate::store::{JOURNAL, JOURNAL_TMP, MARKER, StackStore, StoreError};

impl StackStore {
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
}
