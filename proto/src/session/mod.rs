//! The two sides of one sync cycle as state machines.
//!
//! A driver owns the connection, the disk, the clock and Docker. It feeds a session what happened
//! (`handle_*`: a message arrived, a scan finished, a file was staged, the stack stopped) and
//! carries out what the session asks for (`poll_message` for control messages to send,
//! `poll_action` for work to do). Every decision about what the sync does next lives here, so it
//! can be tested without sockets: see `tests/pair.rs`.
//!
//! File data is the one thing that does not pass through a session: the source driver streams
//! `FileBegin`/`FileData`/`FileEnd` for each [`SourceAction::SendFile`] with [`crate::delta`], and
//! the target driver rebuilds each [`TargetAction::Receive`] with [`crate::delta::FileReceiver`]
//! and reports the verified result back through [`TargetSession::handle_staged`].

mod source;
mod target;

pub use source::{OnStopTimeout, SourceAction, SourceConfig, SourceReport, SourceSession};
pub use target::{
    Commit, IN_PLACE_MIN_SIZE, StackPolicy, StackState, StageOutcome, TargetAction, TargetConfig,
    TargetReport, TargetSession,
};

use crate::flag::FlagError;
use crate::manifest::ManifestError;
use crate::msg::{Phase, Refusal};
use crate::path::StackPath;

/// Most files a target asks for at once (signatures prepared or wants outstanding). Keeps the
/// pipeline full without a round trip per file, and memory independent of the file count.
pub const MAX_IN_FLIGHT: usize = 256;

/// Default largest share of the target's files one commit may delete.
pub const DEFAULT_MAX_DELETE: f64 = 0.5;

/// Default largest difference between the flag's creation time and the target's clock.
pub const DEFAULT_MAX_SKEW_SECS: i64 = 600;

/// A cycle that ended without a commit (or with a failed one): who, where, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("stack `{stack}`, peer `{peer}`, phase {phase}: {cause}")]
pub struct CycleError {
    pub stack: String,
    pub peer: String,
    pub phase: Phase,
    pub cause: Cause,
}

/// The reason a cycle ended badly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Cause {
    #[error("refused by the target: {0}")]
    Refused(Refusal),
    #[error("the peer broke the protocol: {0}")]
    PeerMisbehaved(String),
    #[error("the peer aborted in phase {phase}: {reason}")]
    PeerAborted { phase: Phase, reason: String },
    #[error("the connection was lost: {0}")]
    ConnectionLost(String),
    #[error("invalid manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("flag refused: {0}")]
    Flag(#[from] FlagError),
    #[error(
        "the source tree is empty; refusing to sync it (it would wipe the standby). \
         Set `allow_empty = true` for this stack if that is really meant"
    )]
    EmptySource,
    #[error(
        "the commit would delete {removed} of the target's {live} files ({:.0}%), more than \
         max_delete = {:.0}%; raise `max_delete` for this stack if that is really meant",
        share * 100.0,
        max * 100.0
    )]
    TooManyDeletes {
        removed: u64,
        live: u64,
        share: f64,
        max: f64,
    },
    #[error(
        "{} file(s) changed while the final pass read them (first: {first}); is the stack really stopped?",
        count
    )]
    ChangedDuringFinalPass { count: usize, first: StackPath },
    #[error(
        "Docker had to kill {} at the stop timeout, so the copy would be crash-consistent \
         only; on_stop_timeout = \"fail\" refuses to ship it. Raise the stack's `stop_timeout` \
         or find out why the service does not stop in time",
        services.join(", ")
    )]
    StopKilled { services: Vec<String> },
    #[error("the rebuilt content of {path} did not match its hash, twice")]
    RebuildFailed { path: StackPath },
    #[error("{0}")]
    Local(String),
    #[error("the target could not commit: {0}")]
    CommitFailed(String),
}
