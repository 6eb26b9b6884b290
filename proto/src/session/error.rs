//! Why a cycle ended badly, as types: [`CycleError`] (who, where) around a [`Cause`], whose two
//! open-ended kinds are themselves enums — [`Violation`] (the peer broke the protocol, in the
//! manner of rustls's `PeerMisbehaved`) and [`Failure`] (something on this host failed). Tests,
//! alerts, logs and metrics match on these kinds ([`Cause::kind`]), never on the text; the text
//! is for people, and it is what the wire's `Abort` carries.

use crate::flag::FlagError;
use crate::manifest::ManifestError;
use crate::msg::{Pass, Phase, Refusal};
use crate::path::StackPath;

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
    PeerMisbehaved(Violation),
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
    Local(Failure),
    #[error("the target could not commit: {0}")]
    CommitFailed(String),
}

impl Cause {
    /// A stable name for this kind of cause, for log fields and metric labels: one of a fixed
    /// set, never text from a peer.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::Refused(_) => "refused",
            Cause::PeerMisbehaved(_) => "peer_misbehaved",
            Cause::PeerAborted { .. } => "peer_aborted",
            Cause::ConnectionLost(_) => "connection_lost",
            Cause::Manifest(_) => "manifest",
            Cause::Flag(_) => "flag",
            Cause::EmptySource => "empty_source",
            Cause::TooManyDeletes { .. } => "too_many_deletes",
            Cause::ChangedDuringFinalPass { .. } => "changed_during_final_pass",
            Cause::StopKilled { .. } => "stop_killed",
            Cause::RebuildFailed { .. } => "rebuild_failed",
            Cause::Local(_) => "local",
            Cause::CommitFailed(_) => "commit_failed",
        }
    }

    /// The finer kind where there is one: the [`Refusal`](crate::msg::Refusal), the
    /// [`Violation`] or the [`Failure`].
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            Cause::Refused(r) => Some(r.kind()),
            Cause::PeerMisbehaved(v) => Some(v.kind()),
            Cause::Local(f) => Some(f.kind()),
            _ => None,
        }
    }
}

/// How a peer broke the protocol. Each is the end of the cycle; the peer is told the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A message this side's state has no place for (the state's name, as the docs use it).
    #[error("unexpected {message} while {state}")]
    UnexpectedMessage {
        message: &'static str,
        state: &'static str,
    },
    /// A control frame that did not decode: over the size limit, bytes that are no message, a
    /// path with `..`. The decoder's words.
    #[error("{0}")]
    Malformed(String),
    /// A data stream that is not a transfer of a wanted file: no `FileBegin`, a frame that does
    /// not decode, an id that does not match its stream. The receiver's words.
    #[error("a file stream that is no valid transfer: {0}")]
    BadFileStream(String),

    // The target's view of the source.
    #[error("manifest longer than {max} entries")]
    ManifestTooLong { max: u64 },
    #[error(
        "manifest larger than {max_mib} MiB in memory after {entries} entries (long paths, \
         symlink targets or xattrs); split the stack into smaller ones"
    )]
    ManifestTooLarge { max_mib: u64, entries: u64 },
    #[error("manifest announced {announced} entries, {arrived} arrived")]
    ManifestCount { announced: u64, arrived: u64 },
    #[error("manifest entries do not hash to the announced root")]
    ManifestRoot,
    #[error("manifest changes that do not apply to their base: {0}")]
    ManifestChanges(String),
    #[error("a manifest sent partly whole and partly as changes")]
    ManifestMixed,
    #[error("pre-copy pass in a dry run")]
    PrecopyInDryRun,
    #[error("pre-copy manifest after the final pass began")]
    PrecopyAfterFinal,
    #[error("FinalPass in a dry run")]
    FinalPassInDryRun,
    #[error("FinalPass twice, or inside a manifest")]
    FinalPassRepeated,
    #[error("data for file id {id} outside a transfer (nothing was wanted)")]
    DataOutsideTransfer { id: u32 },
    #[error("data for file id {id}, which was not wanted")]
    DataNotWanted { id: u32 },
    #[error("{path} is declared as {declared} bytes, but the content with its hash has {actual}")]
    SizeMismatch {
        path: StackPath,
        declared: u64,
        actual: u64,
    },

    // The source's view of the target.
    #[error("target speaks protocol version {target}, this source {ours}")]
    Version { target: u32, ours: u32 },
    #[error("target reports the last possible generation")]
    GenerationsExhausted,
    #[error("result for generation {got}, expected {expected}")]
    ResultGeneration { got: u64, expected: u64 },
    #[error("file wanted during a dry run")]
    WantInDryRun,
    #[error("wanted {path}, which is not in the {pass:?} manifest")]
    WantNotInManifest { path: StackPath, pass: Pass },
    #[error("wanted {path}, which is not a regular file")]
    WantNotAFile { path: StackPath },
    #[error("want id {id} used twice")]
    WantIdReused { id: u32 },
    #[error("bad basis signature for {path}: {reason}")]
    BadSignature { path: StackPath, reason: String },
}

impl Violation {
    /// A stable name for this kind of violation (see [`Cause::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::UnexpectedMessage { .. } => "unexpected_message",
            Violation::Malformed(_) => "malformed",
            Violation::BadFileStream(_) => "bad_file_stream",
            Violation::ManifestTooLong { .. } => "manifest_too_long",
            Violation::ManifestTooLarge { .. } => "manifest_too_large",
            Violation::ManifestCount { .. } => "manifest_count",
            Violation::ManifestRoot => "manifest_root",
            Violation::ManifestChanges(_) => "manifest_changes",
            Violation::ManifestMixed => "manifest_mixed",
            Violation::PrecopyInDryRun => "precopy_in_dry_run",
            Violation::PrecopyAfterFinal => "precopy_after_final",
            Violation::FinalPassInDryRun => "final_pass_in_dry_run",
            Violation::FinalPassRepeated => "final_pass_repeated",
            Violation::DataOutsideTransfer { .. } => "data_outside_transfer",
            Violation::DataNotWanted { .. } => "data_not_wanted",
            Violation::SizeMismatch { .. } => "size_mismatch",
            Violation::Version { .. } => "version",
            Violation::GenerationsExhausted => "generations_exhausted",
            Violation::ResultGeneration { .. } => "result_generation",
            Violation::WantInDryRun => "want_in_dry_run",
            Violation::WantNotInManifest { .. } => "want_not_in_manifest",
            Violation::WantNotAFile { .. } => "want_not_a_file",
            Violation::WantIdReused { .. } => "want_id_reused",
            Violation::BadSignature { .. } => "bad_signature",
        }
    }
}

/// Something on this host failed (the driver's words in `String`s: an I/O error, Docker's
/// answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Failure {
    // The target.
    #[error("stopping the standby's stack failed: {0}")]
    StopStandby(String),
    #[error("scanning the stopped standby failed: {0}")]
    ScanStopped(String),
    /// Another process committed to the store during the cycle (it holds a lock, so this is a
    /// bug or a hand-edited state dir).
    #[error("the store was at generation {before} and at {after} {when}")]
    GenerationMoved {
        before: u64,
        after: u64,
        when: &'static str,
    },
    #[error("staging {path} failed: {error}")]
    Staging { path: StackPath, error: String },
    #[error("source `{peer}` has no flag key bound to its certificate")]
    NoFlagKey { peer: String },
    /// Belt and braces before a commit: a content the manifest needs is not staged.
    #[error("content of {path} is not staged")]
    NotStaged { path: StackPath },
    /// Belt and braces before a commit: the plan was not made against a stopped standby.
    #[error("the final pass was not planned against a stopped standby")]
    NotPlannedStopped,

    // The source.
    #[error("stopping the stack failed: {0}")]
    StopStack(String),
    #[error("starting the stack again failed: {0}")]
    StartStack(String),
    #[error("scan failed: {0}")]
    Scan(String),
    #[error("reading a file for the final pass failed: {0}")]
    ReadFinal(String),
    #[error("the source agent is shutting down")]
    ShuttingDown,
}

impl Failure {
    /// A stable name for this kind of failure (see [`Cause::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::StopStandby(_) => "stop_standby",
            Failure::ScanStopped(_) => "scan_stopped",
            Failure::GenerationMoved { .. } => "generation_moved",
            Failure::Staging { .. } => "staging",
            Failure::NoFlagKey { .. } => "no_flag_key",
            Failure::NotStaged { .. } => "not_staged",
            Failure::NotPlannedStopped => "not_planned_stopped",
            Failure::StopStack(_) => "stop_stack",
            Failure::StartStack(_) => "start_stack",
            Failure::Scan(_) => "scan",
            Failure::ReadFinal(_) => "read_final",
            Failure::ShuttingDown => "shutting_down",
        }
    }
}
