//! The small files of the state dir: `state` (JSON), `manifests/<G>` (wire frames) and the
//! atomic write they share.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use stackclone_proto::lineage::{Held, HistoryId, Lineage, Role};

/// What the target knows about a stack's last commit; the `state` file, as JSON (what
/// `stackclone-target status --json` prints, plus the manifest root).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreState {
    pub stack: String,
    /// Last committed generation; 0 before the first commit.
    pub generation: u64,
    /// The highest generation number ever committed here. A rollback lowers `generation` but
    /// not this, and the next cycle numbers its generation above it: a number, once used,
    /// always names the same tree (logs, alerts, `generations/`, the source's status).
    #[serde(default)]
    pub highest_generation: u64,
    /// Unix seconds of the commit, target clock.
    pub committed_at: Option<i64>,
    /// Root hash of the committed manifest, hex.
    pub manifest_root: Option<String>,
    /// Regular files and their bytes in the committed generation.
    pub files: u64,
    pub bytes: u64,
    /// Filled in by the driver ([`super::StackStore::record_cycle`]).
    pub bytes_sent: u64,
    pub source_downtime_ms: u64,
    pub target_downtime_ms: u64,
    /// How long the journaled apply of the last commit took: the store's share of the target
    /// downtime (the rest is stopping and starting the stack).
    pub commit_ms: u64,
    /// The generation this one was rolled back from, if the last change was a rollback.
    pub rolled_back_from: Option<u64>,
    /// The last failed cycle's error, cleared by the next commit.
    pub last_error: Option<String>,
    /// The history of the committed generation (32 hex digits; see
    /// `stackclone_proto::lineage`). `None` before the first commit, and in a state written
    /// before lineage existed: the next push's history is taken then.
    #[serde(default)]
    pub history: Option<String>,
    /// For a history a promotion started: the history it forked from and the generation,
    /// `<hex>@<generation>`.
    #[serde(default)]
    pub forked_from: Option<String>,
    /// Unix seconds of `promote` (or of the fail-back that handed the stack over to this host):
    /// set, the stack is the primary here and every push is refused. Cleared by `demote`.
    #[serde(default)]
    pub promoted_at: Option<i64>,
}

impl StoreState {
    /// The history the state records, if it parses.
    pub fn lineage(&self) -> Option<Lineage> {
        let history: HistoryId = self.history.as_deref()?.parse().ok()?;
        let forked_from = self.forked_from.as_deref().and_then(|f| {
            let (h, g) = f.split_once('@')?;
            Some((h.parse().ok()?, g.parse().ok()?))
        });
        Some(Lineage {
            history,
            forked_from,
        })
    }

    /// Records `l` as the state's history.
    pub fn set_lineage(&mut self, l: &Lineage) {
        self.history = Some(l.history.to_string());
        self.forked_from = l.forked_from.map(|(h, g)| format!("{h}@{g}"));
    }

    /// The role and history a push is judged against.
    pub fn held(&self) -> Held {
        Held {
            role: match self.promoted_at {
                Some(at) => Role::Promoted { at },
                None => Role::Standby,
            },
            history: self.lineage(),
            generation: self.generation,
        }
    }
}

/// Writes `name` in `dir` atomically: `name.tmp`, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let tmp = format!("{name}.tmp");
    write_synced(dir, &tmp, data)?;
    rustix::fs::renameat(dir, tmp.as_str(), dir, name)?;
    rustix::fs::fsync(dir)?;
    Ok(())
}

/// Creates (or truncates) `name` in `dir` with `data`, fsynced.
pub(crate) fn write_synced(dir: BorrowedFd<'_>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Reads `name` in `dir` (not following a symlink); `Ok(None)` if it does not exist.
pub(crate) fn read_file(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut data = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut data)?;
    Ok(Some(data))
}

/// Removes `name` in `dir` if it exists.
pub(crate) fn remove_file(dir: impl AsFd, name: &str) -> std::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
