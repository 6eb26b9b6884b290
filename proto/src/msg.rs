//! The messages of one sync cycle.
//!
//! Control messages travel on one bidirectional QUIC stream; file data ([`SourceMsg::FileBegin`],
//! [`SourceMsg::FileData`], [`SourceMsg::FileEnd`] or [`SourceMsg::FileAbort`]) travels on
//! parallel unidirectional streams, each file's messages in order on one stream, one file after
//! another where a stream carries several. Every message is one [`crate::wire`] frame.
//! All types are plain structs and enums: bincode is not self-describing.

use serde::{Deserialize, Serialize};

use crate::delta::Chunk;
use crate::flag::SignedStatus;
use crate::lineage::{Claim, utc};
use crate::manifest::{Entry, Hash};
use crate::path::StackPath;

/// The sync protocol's ALPN, negotiated in the TLS handshake of every agent connection (the
/// endpoint configs of `stackclone-certs` offer it and nothing else).
///
/// It guards the *framing generation*: what a QUIC stream carries and how its bytes become
/// messages ([`crate::wire`] frames, the stream layout, the encoding), up to and including the
/// opening [`SourceMsg::Hello`] and [`TargetMsg::Welcome`]. Bump it (`stackclone/2`) only when a
/// peer of the old generation could no longer read those: peers that differ here fail in the
/// handshake, with no message of ours to tell the person why. Everything else is
/// [`PROTOCOL_VERSION`]'s: keep this value while the framing stays, or an old peer's clear
/// version error becomes a bare TLS failure.
pub const ALPN: &[u8] = b"stackclone/1";

/// Protocol version, sent in the first message of each side ([`SourceMsg::Hello`],
/// [`TargetMsg::Welcome`]) and checked by both sessions, which refuse another version with an
/// error that names both ([`Refusal::Version`] on the target).
///
/// It guards the *message semantics*: which messages and fields exist and what they mean. Bump it
/// on any incompatible change to them; as long as the framing and the opening messages stay
/// readable, the peers then meet, and part with that clear error. When they would not stay
/// readable, bump [`ALPN`] instead.
///
/// 2: [`SourceMsg::FinalPass`], and the standby's killed services in [`Outcome::Committed`].
/// 3: lineage — [`SourceMsg::Claim`] after `Hello`, the history in the signed flag,
/// [`Refusal::Promoted`] and [`Refusal::Diverged`], and the replaced tree in
/// [`Outcome::Committed`].
/// 4: manifests as changes against a base ([`SourceMsg::ManifestChanges`],
/// [`TargetMsg::ResendManifest`]).
/// 5: a data stream may carry several files in a row (a version-4 target took a second
/// `FileBegin` on a stream for a foreign frame).
pub const PROTOCOL_VERSION: u32 = 5;

/// Most entries in one [`SourceMsg::ManifestPart`].
pub const MANIFEST_PART_ENTRIES: usize = 2048;

/// Most entries a manifest may have. Bounds the target's memory before it has checked anything.
pub const MAX_MANIFEST_ENTRIES: u64 = 50_000_000;

/// Most memory a manifest may take on the target while it arrives, as
/// [`Entry::held_bytes`](crate::manifest::Entry::held_bytes) counts it: 1 GiB, some five million
/// entries of typical paths. The entry count alone would allow long paths, symlink targets and
/// xattrs to add up to hundreds of GiB. A stack larger than this is refused with a message
/// that says so; split it into several stacks.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// Whether the cycle changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Transfer, flag, commit.
    Sync,
    /// Compare only: the target answers with a plan and writes nothing.
    DryRun,
}

/// The two passes of a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pass {
    /// Optional first pass while the source stack still runs.
    Precopy,
    /// The pass whose manifest the flag signs; the source stack is stopped (unless `stop = false`).
    Final,
}

/// Where in the cycle something happened, for errors a person reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Hello,
    Scan,
    Manifest,
    Transfer,
    Flag,
    Commit,
    /// Waiting for the target's stack to become healthy on the new generation.
    Health,
    Result,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Hello => "hello",
            Phase::Scan => "scan",
            Phase::Manifest => "manifest",
            Phase::Transfer => "transfer",
            Phase::Flag => "flag",
            Phase::Commit => "commit",
            Phase::Health => "health",
            Phase::Result => "result",
        };
        f.write_str(s)
    }
}

/// Why a target refused a cycle before anything was staged.
///
/// Every string field of the messages here is escaped as it is decoded (see [`crate::text`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("protocol version {got} is not supported (this target speaks {supported})")]
    Version { got: u32, supported: u32 },
    #[error("no stack `{stack}` is configured on this target")]
    UnknownStack {
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
    },
    #[error("source `{peer}` is not allowed to push stack `{stack}`")]
    PeerNotAllowed {
        #[serde(deserialize_with = "crate::text::escaped")]
        peer: String,
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
    },
    #[error("stack `{stack}` is busy with another cycle")]
    Busy {
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
    },
    #[error("stack `{stack}` cannot be served: {reason}")]
    Unavailable {
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
        #[serde(deserialize_with = "crate::text::escaped")]
        reason: String,
    },
    /// The stack was promoted on the target: it is the primary there now.
    #[error(
        "stack `{stack}` was promoted on the standby at {}: this host is no longer its primary \
         and its pushes are refused. To make this host the primary again, fail back from the \
         promoted host (`stackclone-source push {stack} --fail-back` there), then run \
         `stackclone-target demote {stack}` on it",
        utc(*at)
    )]
    Promoted {
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
        /// Unix seconds of the promotion, target clock.
        at: i64,
        /// The history the promotion started, hex (empty if none).
        #[serde(deserialize_with = "crate::text::escaped")]
        history: String,
    },
    /// A fail-back to a target that runs the stack as its primary (promoted, or handed over
    /// to earlier).
    #[error(
        "the target runs stack `{stack}` as its primary (since {}), so it takes no fail-back: \
         if this host's copy is to become the primary again, run `stackclone-target demote \
         {stack}` on the target first",
        utc(*at)
    )]
    TargetIsPrimary {
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
        at: i64,
    },
    /// The target's copy belongs to another history than the source's data: both were written
    /// since they parted (a split brain).
    #[error(
        "stack `{stack}` has diverged: the target holds history {held}, this source's data is \
         history {claimed}. Both were written since they parted. To keep the target's writes, \
         fail back from the target's host (`stackclone-source push {stack} --fail-back` \
         there); to replace them with this host's data, push again with `--replace-diverged` \
         (the target keeps its tree as a generation that `rollback` restores)"
    )]
    Diverged {
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
        #[serde(deserialize_with = "crate::text::escaped")]
        held: String,
        #[serde(deserialize_with = "crate::text::escaped")]
        claimed: String,
    },
}

impl Refusal {
    /// The refusal's kind, a fixed set of words for metrics labels and log fields.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Version { .. } => "version",
            Refusal::UnknownStack { .. } => "unknown_stack",
            Refusal::PeerNotAllowed { .. } => "peer_not_allowed",
            Refusal::Busy { .. } => "busy",
            Refusal::Unavailable { .. } => "unavailable",
            Refusal::Promoted { .. } => "promoted",
            Refusal::TargetIsPrimary { .. } => "target_is_primary",
            Refusal::Diverged { .. } => "diverged",
        }
    }
}

/// Source to target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SourceMsg {
    /// `max_delete`: the largest share (0.0–1.0) of the target's files this cycle may delete
    /// (the source's per-stack safety valve; the target enforces it).
    Hello {
        version: u32,
        #[serde(deserialize_with = "crate::text::escaped")]
        stack: String,
        mode: Mode,
        max_delete: f64,
    },
    /// Up to [`MANIFEST_PART_ENTRIES`] entries, in order.
    ManifestPart {
        entries: Vec<Entry>,
    },
    /// Closes a manifest: how many entries were sent and the root they hash to.
    ManifestEnd {
        pass: Pass,
        entries: u64,
        root: Hash,
    },
    /// Starts the data of one wanted file; `len` is what the source will send.
    FileBegin {
        id: u32,
        len: u64,
    },
    FileData {
        id: u32,
        chunk: Chunk,
    },
    /// Ends one file: the BLAKE3 of exactly the bytes the source read and diffed.
    FileEnd {
        id: u32,
        hash: Hash,
        len: u64,
    },
    /// The source could not read the file (it vanished during a pre-copy pass, say).
    FileAbort {
        id: u32,
        #[serde(deserialize_with = "crate::text::escaped")]
        reason: String,
    },
    /// The final pass begins: the source is stopping its stack (or, with `stop = false`, scanning
    /// it live) for the manifest the flag will sign. The target stops its standby now, in
    /// parallel, so that the final pass is planned against a stopped standby. Sent once per
    /// cycle, before the final manifest; never in a dry run.
    FinalPass,
    /// Closes the generation.
    Flag(SignedStatus),
    /// The source gives up; nothing is committed.
    Abort {
        phase: Phase,
        #[serde(deserialize_with = "crate::text::escaped")]
        reason: String,
    },
    /// The history of the source's data, sent right after `Hello` (see [`crate::lineage`]).
    /// Last of the variants, so that the others keep their encoding.
    Claim(Claim),
    /// A manifest as [`Changes`](crate::manifest::Changes) against a base the target holds
    /// (its committed manifest, or the previous manifest of this cycle), named by its root;
    /// in parts of up to [`MANIFEST_PART_ENTRIES`] entries and paths together, every part
    /// naming the same base, closed by `ManifestEnd` (whose count and root are those of the
    /// whole manifest). A target that does not hold the base asks for the whole manifest with
    /// [`TargetMsg::ResendManifest`].
    ManifestChanges {
        base: Hash,
        upsert: Vec<Entry>,
        remove: Vec<StackPath>,
    },
}

/// Target to source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TargetMsg {
    Welcome {
        version: u32,
        last_generation: u64,
    },
    Refused(Refusal),
    /// Send this file; with a basis signature the source sends a delta against it.
    Want {
        id: u32,
        path: StackPath,
        #[serde(with = "serde_bytes")]
        basis: Option<Vec<u8>>,
    },
    /// Everything wanted in this pass is staged and verified, except `missing` (files whose
    /// content changed while they were read).
    PassDone {
        pass: Pass,
        missing: Vec<StackPath>,
    },
    /// Dry run: what a commit would do.
    Plan(PlanSummary),
    /// The outcome of the commit.
    Result(CycleResult),
    /// The target gives up; nothing is committed.
    Abort {
        phase: Phase,
        #[serde(deserialize_with = "crate::text::escaped")]
        reason: String,
    },
    /// The manifest of `pass` came as changes against a base this target does not hold (its
    /// state was reset or rolled back since the source recorded it): send it whole.
    ResendManifest {
        pass: Pass,
    },
}

/// A dry run's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Files whose content would be transferred, with their sizes (the first
    /// [`PlanSummary::MAX_LISTED`] of them).
    pub send: Vec<(StackPath, u64)>,
    /// Paths that would be deleted (the first [`PlanSummary::MAX_LISTED`]).
    pub delete: Vec<StackPath>,
    pub send_count: u64,
    /// Contents the target already has at another path (renames, copies): copied locally.
    pub copy_local: u64,
    pub send_bytes: u64,
    pub delete_count: u64,
    pub meta_only: u64,
    pub unchanged: u64,
}

impl SourceMsg {
    /// The message's name, for protocol errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            SourceMsg::Hello { .. } => "Hello",
            SourceMsg::Claim(_) => "Claim",
            SourceMsg::ManifestPart { .. } => "ManifestPart",
            SourceMsg::ManifestEnd { .. } => "ManifestEnd",
            SourceMsg::FileBegin { .. } => "FileBegin",
            SourceMsg::FileData { .. } => "FileData",
            SourceMsg::FileEnd { .. } => "FileEnd",
            SourceMsg::FileAbort { .. } => "FileAbort",
            SourceMsg::FinalPass => "FinalPass",
            SourceMsg::Flag(_) => "Flag",
            SourceMsg::Abort { .. } => "Abort",
            SourceMsg::ManifestChanges { .. } => "ManifestChanges",
        }
    }
}

impl TargetMsg {
    /// The message's name, for protocol errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            TargetMsg::Welcome { .. } => "Welcome",
            TargetMsg::Refused(_) => "Refused",
            TargetMsg::Want { .. } => "Want",
            TargetMsg::PassDone { .. } => "PassDone",
            TargetMsg::Plan(_) => "Plan",
            TargetMsg::Result(_) => "Result",
            TargetMsg::Abort { .. } => "Abort",
            TargetMsg::ResendManifest { .. } => "ResendManifest",
        }
    }
}

impl PlanSummary {
    /// Longest list carried in one plan message; counts are always complete.
    pub const MAX_LISTED: usize = 10_000;
}

/// A tree of the target's own that a commit replaced, kept as a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// Paths of that tree the commit changed or deleted.
    pub paths: u64,
    /// `stackclone-target rollback STACK --to G` restores it.
    pub rollback_to: u64,
}

/// What the target did with a verified flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleResult {
    pub generation: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The generation is live (and its stack healthy, where health is checked).
    /// `standby_killed`: the standby's services Docker had to kill at their stop timeout when
    /// the target stopped them for this commit.
    ///
    /// `replaced`: the commit replaced a tree the target had not received from this history
    /// (a fail-back, or a first push into a non-empty directory); it is kept (see [`Replaced`]).
    Committed {
        target_downtime_ms: u64,
        #[serde(deserialize_with = "crate::text::escaped_all")]
        standby_killed: Vec<String>,
        replaced: Option<Replaced>,
    },
    /// The commit failed or the stack did not come up healthy; the previous generation is live.
    Failed {
        phase: Phase,
        #[serde(deserialize_with = "crate::text::escaped")]
        reason: String,
    },
}
