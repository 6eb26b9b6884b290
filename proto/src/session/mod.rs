//! The two sides of one sync cycle as state machines.
//!
//! A driver owns the connection, the disk, the clock and Docker. It feeds a session what happened
//! (`handle_*`: a message arrived, a scan finished, a file was staged, the stack stopped) and
//! carries out what the session asks for (`poll_message` for control messages to send,
//! `poll_action` for work to do). Every decision about what the sync does next lives here, so it
//! can be tested without sockets: see `tests/pair.rs`. The target session also owns its clock
//! rule: it is made with the time of the connection, hears of progress (`handle_progress`), says
//! when it must be woken (`poll_timeout`) and ends a stalled cycle itself (`handle_timeout`), as
//! quinn-proto's connection does; the pair harness runs it on a virtual clock.
//!
//! A cycle that ends badly says why as a `CycleError` around a `Cause`; the peer's protocol
//! violations are a `Violation` and this host's failures a `Failure`, each with a stable `kind()`
//! for logs, metrics and tests (see `error.rs`).
//!
//! File data is the one thing that does not pass through a session: the source driver streams
//! `FileBegin`/`FileData`/`FileEnd` for each [`SourceAction::SendFile`] with [`crate::delta`], and
//! the target driver rebuilds each [`TargetAction::Receive`] with [`crate::delta::FileReceiver`]
//! and reports the verified result back through [`TargetSession::handle_staged`].

mod error;
mod source;
mod target;

pub use error::{Cause, CycleError, Failure, Violation};

pub use source::{OnStopTimeout, SourceAction, SourceConfig, SourceReport, SourceSession};
pub use target::{
    BadStream, Commit, IN_PLACE_MIN_SIZE, STALL_TIMEOUT, StackPolicy, StackState, StageOutcome,
    TargetAction, TargetConfig, TargetReport, TargetSession,
};

/// Most files a target asks for at once (signatures prepared or wants outstanding). Keeps the
/// pipeline full without a round trip per file, and memory independent of the file count.
pub const MAX_IN_FLIGHT: usize = 256;

/// Default largest share of the target's files one commit may delete.
pub const DEFAULT_MAX_DELETE: f64 = 0.5;

/// Default largest difference between the flag's creation time and the target's clock.
pub const DEFAULT_MAX_SKEW_SECS: i64 = 600;
