//! The stack's role on this host: `promote` makes this copy the primary (every push refused from
//! then on) and starts a new history forked from the one it held; `demote` makes it a standby
//! again. Both change only the `state` file and, for `promote`, the lineage file at the root of
//! the live dir (see `stackclone_proto::lineage`); both run under the stack's lock, so never in
//! the middle of a cycle.

use stackclone_proto::lineage::{HistoryId, LINEAGE_FILE, Lineage};

use crate::store::state;
use crate::store::{StackStore, StoreError};

/// What `promote` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// Promoted now: the lineage the copy carries from here on.
    Promoted { lineage: Lineage },
    /// It already was, since `at`.
    Already { at: i64 },
}

impl StackStore {
    /// Records the stack as promoted at `now` (Unix seconds): the lineage file in the live dir
    /// names a new history (`new`) forked from the one the committed generation belongs to,
    /// then the state says so. Nothing else in the live dir changes, so promotion loses no data;
    /// the driver brings the stack up afterwards.
    pub fn promote(&mut self, new: HistoryId, now: i64) -> Result<Promotion, StoreError> {
        if let Some(at) = self.state.promoted_at {
            return Ok(Promotion::Already { at });
        }
        let lineage = match self.state.lineage() {
            Some(l) => l.fork(new, self.state.generation),
            None => Lineage::new(new),
        };
        // The file first: a crash before the state is written leaves a standby whose next
        // push rewrites the file with the source's history.
        state::write_atomic(self.live.fd(), LINEAGE_FILE, lineage.to_text().as_bytes()).map_err(
            |e| {
                self.io_err(
                    "write",
                    self.live.path().join(LINEAGE_FILE).display().to_string(),
                    e,
                )
            },
        )?;
        let mut next = self.state.clone();
        next.promoted_at = Some(now);
        next.set_lineage(&lineage);
        self.write_state(&next)?;
        self.state = next;
        Ok(Promotion::Promoted { lineage })
    }

    /// Makes the stack a standby again: pushes are judged by their history from now on (one
    /// that continues the history this copy holds is accepted; another is refused as
    /// diverged). Returns when it had been promoted, `None` if it was not.
    pub fn demote(&mut self) -> Result<Option<i64>, StoreError> {
        let Some(at) = self.state.promoted_at else {
            return Ok(None);
        };
        let mut next = self.state.clone();
        next.promoted_at = None;
        self.write_state(&next)?;
        self.state = next;
        Ok(Some(at))
    }
}
