//! [`StoreError`]: everything that can go wrong in a stack's store, naming the stack, the path
//! and the operation.

use std::io;
use std::path::PathBuf;

use rustix::io::Errno;
use stackclone_common::ScanError;
use stackclone_proto::manifest::Hash;

/// Why a store operation failed. Every variant names the stack; paths are shown as a person
/// would type them (live paths as `<live dir>/<path>`), lossily for names that are not UTF-8.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "stack `{stack}`: invalid stack name (it names the state dir; use letters, digits, `-`, `_`, `.`)"
    )]
    BadStackName { stack: String },
    #[error(
        "stack `{stack}`: refusing live dir {path}: it is a system directory and a commit would \
         replace its content; point `path` at the stack's own data dir (or set \
         `allow_dangerous_root` if you really mean it)"
    )]
    DangerousRoot { stack: String, path: PathBuf },
    #[error(
        "stack `{stack}`: the live dir {} is not the directory this store recorded (device and \
         inode {recorded}, now {now}): it was replaced, perhaps by a symlink to somewhere else. \
         Nothing is written there. If the data was moved on purpose, remove {} and run again",
        live.display(),
        record.display()
    )]
    LiveRootChanged {
        stack: String,
        live: PathBuf,
        recorded: String,
        now: String,
        record: PathBuf,
    },
    #[error(
        "stack `{stack}`: the state dir {state} is on another file system than the live dir \
         {live}; staging must be on the live dir's file system because renames must be atomic"
    )]
    OtherFilesystem {
        stack: String,
        live: PathBuf,
        state: PathBuf,
    },
    #[error(
        "stack `{stack}`: the state dir {state} lies inside the live dir {live}; it would be \
         synced and deleted with the stack's data, put it beside the live dir"
    )]
    StateInsideLive {
        stack: String,
        live: PathBuf,
        state: PathBuf,
    },
    #[error("stack `{stack}`: {path} is in use by another stackclone process (lock held)")]
    Busy { stack: String, path: PathBuf },
    #[error("stack `{stack}`: {op} {path}: {source}")]
    Io {
        stack: String,
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "stack `{stack}`: no space left on the device while trying to {op} {path}; free space on \
         that file system (staging needs room for what changed); the live dir is unchanged"
    )]
    NoSpace {
        stack: String,
        op: &'static str,
        path: String,
    },
    #[error(
        "stack `{stack}`: {path} is not a plain directory inside the live dir (a symlink or other \
         file is in the way); nothing was followed, and the commit was refused before it began"
    )]
    NotADirectory { stack: String, path: String },
    #[error(
        "stack `{stack}`: the commit journal {path} is damaged ({reason}); the live dir may be \
         between two generations. Check it with `stackclone-target verify {stack}` and restore \
         it (or move the journal aside) before the next cycle"
    )]
    JournalCorrupt {
        stack: String,
        path: PathBuf,
        reason: String,
    },
    #[error("stack `{stack}`: the state file {path} is damaged: {reason}")]
    StateCorrupt {
        stack: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "stack `{stack}`: generation {generation} cannot be restored; restorable: {available:?} \
         (older ones were pruned, see `keep_generations`)"
    )]
    NoSuchGeneration {
        stack: String,
        generation: u64,
        available: Vec<u64>,
    },
    #[error(
        "stack `{stack}`: content {hash} for {path} is neither staged nor anywhere on this host; \
         the commit cannot go on (run the cycle again)"
    )]
    ContentMissing {
        stack: String,
        hash: Hash,
        path: String,
    },
    #[error(
        "stack `{stack}`: the staged content for {path} is corrupt on disk ({object} now hashes to \
         {found}); the commit was refused before the live dir changed{}",
        if *removed {
            ", and the object was removed so the next cycle fetches it again"
        } else {
            "; removing the object failed too, remove it by hand"
        }
    )]
    StagedCorrupt {
        stack: String,
        path: String,
        object: String,
        found: Hash,
        removed: bool,
    },
    #[error("stack `{stack}`: the staged file has {actual} bytes but was verified as {expected}")]
    StagedLengthMismatch {
        stack: String,
        expected: u64,
        actual: u64,
    },
    #[error("stack `{stack}`: {what}")]
    NotPrepared { stack: String, what: String },
    #[error(
        "stack `{stack}`: {path} changed after the commit was planned, although the standby's \
         stack was stopped (does something else write into the live dir?); the commit was \
         refused before the live dir changed, and the next cycle plans against the tree as it \
         is then"
    )]
    ChangedSincePlanned { stack: String, path: String },
    #[error("stack `{stack}`: scanning {path}: {source}")]
    Scan {
        stack: String,
        path: PathBuf,
        #[source]
        source: Box<ScanError>,
    },
    /// A fault injected by a test after this many journal ops: the process "crashed" here.
    #[doc(hidden)]
    #[error("stack `{stack}`: injected crash after {ops} journal ops")]
    InjectedCrash { stack: String, ops: usize },
}

impl StoreError {
    /// Maps an I/O error, turning "disk full" and "quota exceeded" into [`StoreError::NoSpace`].
    pub(crate) fn io(stack: &str, op: &'static str, path: impl Into<String>, e: io::Error) -> Self {
        let full = e.kind() == io::ErrorKind::StorageFull
            || e.kind() == io::ErrorKind::QuotaExceeded
            || e.raw_os_error() == Some(Errno::NOSPC.raw_os_error())
            || e.raw_os_error() == Some(Errno::DQUOT.raw_os_error());
        if full {
            StoreError::NoSpace {
                stack: stack.to_string(),
                op,
                path: path.into(),
            }
        } else {
            StoreError::Io {
                stack: stack.to_string(),
                op,
                path: path.into(),
                source: e,
            }
        }
    }

    /// True if this is a disk-full error.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}
