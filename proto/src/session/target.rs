//! The target side of a cycle.
//!
//! ```text
//!  Hello ─► Claim ─► LookupStack ─► allow? role and lineage ([`crate::lineage::admit`])?
//!        ─► LoadStack ─► [opened ─► Welcome] ─► stack state (role and lineage again, under
//!           the stack's lock) | Refused
//!  per pass: manifest parts ─► ManifestEnd (checked: count, root; then, once the stack state
//!            is in, the max_delete valve)
//!            ─► for each content not live and not staged: StageLocal (a live file has it) or
//!               [Signature of the live basis ─►] Want ─► Receive ─► handle_staged
//!            ─► PassDone
//!  FinalPass ─► StopStack ─► ScanStopped ─► (the final pass, planned against that scan)
//!  Flag ─► verify (key, stack, source, target, generation, time, root) ─► Commit ─► Result
//! ```
//! **The final pass is planned against a stopped standby.** The standby's own services write
//! while they run and when they stop (a database's shutdown checkpoint rewrites its WAL, its
//! control file and table files), so a plan made against the running standby is stale by the
//! time the commit runs. When the source says the final pass begins ([`SourceMsg::FinalPass`],
//! sent as it starts stopping its own stack), the session asks the driver to stop the standby
//! ([`TargetAction::StopStack`], in parallel with the source's stop), then to scan the stopped
//! live dir ([`TargetAction::ScanStopped`]); the final manifest is planned, asked for and
//! committed against that scan. The pre-copy pass, before it, is planned against the running
//! standby: it only stages content, which a later plan uses wherever it still fits.
//!
//! One exception keeps an idle standby running: when the pre-copy pass found the running live
//! dir already equal to the source's tree, the stop waits for the final manifest, and if the
//! running scan equals that too, the generation is committed without stopping the standby
//! ([`Commit::without_stop`]). Any difference stops it then, and the plan waits for the stopped
//! scan as before.
//!
//! Once the session has asked for `StopStack`, every way out of the cycle other than a commit
//! (which brings the stack up itself) asks for [`TargetAction::StartStack`] before `Done`, so a
//! failed cycle never leaves the standby down.
//! Staging is content-addressed: a staged file is known by its BLAKE3, so an interrupted
//! transfer resumes where it stopped, a pre-copy pass counts for the final pass wherever content
//! did not change, and hardlinks or duplicates cost one transfer. The session never asks for a
//! [`Commit`] unless the flag verified against the manifest it staged and every content that
//! manifest needs is staged or already live at its path.
//!
//! The driver may say the store is open ([`TargetSession::handle_opened`]) before its scan of
//! the live dir is done: `Welcome` then goes out at once, and the source stops its stack and
//! scans while the target scans. A `ManifestEnd` that arrives first waits for the scan. A driver
//! that only calls [`TargetSession::handle_stack`] gets the plain sequence. A held end counts as
//! the transfer (phase and errors alike), so what the source is told never depends on when the
//! scan finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;

use super::{Cause, CycleError, Failure, MAX_IN_FLIGHT, Violation};
use crate::delta::Verified;
use crate::flag::{Expected, SignedStatus, VerifiedStatus};
use crate::lineage::{self, Admit, Claim, Held};
use crate::manifest::{self, ChangesError, Entry, EntryKind, Hash, Manifest};
use crate::msg::{
    CycleResult, MAX_MANIFEST_BYTES, MAX_MANIFEST_ENTRIES, Mode, Outcome, PROTOCOL_VERSION, Pass,
    Phase, PlanSummary, Refusal, Replaced, SourceMsg, TargetMsg,
};
use crate::path::StackPath;
use crate::plan::{Changes, Upsert};

/// Who this target is and who is talking to it.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// This host's certificate name.
    pub target_id: String,
    /// The peer's certificate name (authenticated by mutual TLS).
    pub peer: String,
    /// The flag key bound to the peer's identity, if it has one.
    pub peer_flag_key: Option<VerifyingKey>,
    /// Largest accepted clock difference for a flag, in seconds.
    pub max_skew_secs: i64,
}

/// Who may push a stack: the part of its config the session checks before anything is locked,
/// opened or scanned for a peer.
#[derive(Debug, Clone)]
pub struct StackPolicy {
    /// Source names allowed to push this stack.
    pub allow: Vec<String>,
    /// The stack's role and history as its state file says (read without the stack's lock:
    /// [`StackState::held`] checks them again under it).
    pub held: Held,
    /// Whether a commit keeps the tree it replaces for `rollback` (`keep_generations` > 0).
    /// A fail-back is refused without it: it would throw this host's tree away.
    pub keeps_generations: bool,
}

/// What the driver knows of a stack when a cycle for it starts.
#[derive(Debug, Clone)]
pub struct StackState {
    /// Last committed generation (0: none yet).
    pub last_generation: u64,
    /// The stack's role and history, read under the stack's lock.
    pub held: Held,
    /// A fresh scan of the live dir.
    pub live: Manifest,
    /// Contents already staged, by hash.
    pub staged: HashSet<Hash>,
    /// In-place patches already staged: content hash → the one live path it patches. Counts as
    /// staged only where the wanted tree has that content at exactly that path.
    pub staged_in_place: HashMap<Hash, StackPath>,
    /// Live files whose inode has hard links outside the live dir. Never patched in place, never
    /// given metadata: always replaced (see [`Changes::between_with_outside`]).
    pub outside_links: HashSet<StackPath>,
    /// The manifest of the last committed generation: a source's manifest may come as changes
    /// against it (see [`crate::manifest::Changes`]).
    pub committed: Arc<Manifest>,
}

impl StackState {
    /// What a commit must change to turn this live dir into `want`.
    pub fn changes_to(&self, want: &Manifest) -> Changes {
        Changes::between_with_outside(&self.live, want, &self.outside_links)
    }
}

/// Work for the target driver.
#[derive(Debug)]
pub enum TargetAction {
    /// Look up the stack's config; answer with [`TargetSession::handle_policy`]. Nothing may be
    /// locked, opened or written for the peer yet: it is not known to be allowed.
    LookupStack { stack: String },
    /// The peer is allowed: take the stack's lock, recover and scan its live dir, list what is
    /// staged; answer with [`TargetSession::handle_stack`], and, as soon as the store is open
    /// (before the scan), optionally with [`TargetSession::handle_opened`].
    LoadStack { stack: String },
    /// Compute the delta signature of the live file at `basis`; answer with
    /// [`TargetSession::handle_signature`].
    Signature { id: u32, basis: StackPath },
    /// Copy the live file at `from` into staging as content `hash` (verifying it); answer with
    /// [`TargetSession::handle_staged`].
    StageLocal {
        id: u32,
        from: StackPath,
        hash: Hash,
    },
    /// Expect `FileBegin`/`FileData`/`FileEnd` for `id`, rebuild it in staging (against the live
    /// file at `basis`, if given) and verify it; answer with [`TargetSession::handle_staged`].
    ///
    /// With `in_place`, stage only the ranges that differ from the basis (a patch), to be
    /// written into the live file inside the commit: a big file with a few changed blocks then
    /// costs writes in proportion to the change. The session asks for it only where that is
    /// safe: the basis is the file at the same path, neither side is a hardlink, the content is
    /// wanted at this one path, and the file is big enough for it to matter.
    Receive {
        id: u32,
        path: StackPath,
        basis: Option<StackPath>,
        in_place: bool,
    },
    /// Stop the standby's stack (the final pass begins); answer with
    /// [`TargetSession::handle_stack_stopped`]. Only asked for once a `LoadStack` opened the
    /// store.
    StopStack,
    /// Scan the live dir again, now that the standby is stopped, and list what is staged; answer
    /// with [`TargetSession::handle_stopped_scan`]. The final pass is planned against it.
    ScanStopped,
    /// The cycle ends without a commit after the standby was stopped: bring its stack up again
    /// on the live data, which the cycle did not touch; answer with
    /// [`TargetSession::handle_stack_started`].
    StartStack,
    /// Commit (the standby is stopped, unless [`Commit::without_stop`]), then bring the stack up
    /// and wait for it to be healthy; answer with [`TargetSession::handle_committed`].
    Commit(Box<Commit>),
    /// The cycle is over.
    Done(Result<TargetReport, CycleError>),
}

/// What the target driver found on a data stream that is not the transfer of a file the
/// session asked for; see [`TargetSession::handle_bad_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadStream {
    /// A file on the stream (its first, or one after another file's end) does not begin with
    /// a `FileBegin`, or its first frame does not decode (what it was).
    NoBegin(String),
    /// A `FileBegin` for a file id the session has not asked to receive (no
    /// [`TargetAction::Receive`] for it, or one already answered).
    NotWanted { id: u32 },
    /// Another file's frame, or a control message (`got`), on the stream of file `id`.
    Foreign { id: u32, got: &'static str },
}

/// How long a cycle that waits for the source may hear nothing from it (no control message, no
/// file data) before it ends; see [`TargetSession::poll_timeout`].
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What staging one file came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutcome {
    /// Rebuilt (or copied), its BLAKE3 matched the hash the source declared, and it is staged
    /// under that hash. Only the delta engine's verifier makes a [`Verified`].
    Staged(Verified),
    /// The rebuilt content did not match the declared hash (a bad delta): ask again, literally.
    Mismatch,
    /// The source could not send it (`FileAbort`).
    SourceAborted(String),
    /// A local failure (disk full, I/O error): the cycle cannot go on.
    Failed(String),
}

/// A verified generation, ready to commit. Only [`TargetSession`] makes one, and only from a
/// flag that verified against the staged manifest.
#[derive(Debug, Clone)]
pub struct Commit {
    status: VerifiedStatus,
    manifest: Manifest,
    /// The scan of the live dir the changes were planned against.
    live: Manifest,
    changes: Changes,
    /// The standby was stopped before `live` was scanned.
    standby_stopped: bool,
    /// Why the push was let in (see [`crate::lineage`]).
    admit: Admit,
    /// The target's own tree this commit replaces, if it is one to report (see [`Replaced`]).
    replaced: Option<Replaced>,
    /// A fail-back: the copy becomes the primary here once committed.
    hand_over: bool,
}

impl Commit {
    pub fn status(&self) -> &VerifiedStatus {
        &self.status
    }
    pub fn generation(&self) -> u64 {
        self.status.generation()
    }
    /// The tree the live dir must hold after the commit.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// How to get there from [`live`](Self::live).
    pub fn changes(&self) -> &Changes {
        &self.changes
    }
    /// The scan of the live dir the changes were planned against: with the standby stopped,
    /// unless [`without_stop`](Self::without_stop). The commit refuses if the live dir, rescanned
    /// just before the journal is written, is not exactly this tree.
    pub fn live(&self) -> &Manifest {
        &self.live
    }
    /// Whether the driver commits this generation without stopping the stack (it was never
    /// stopped in this cycle): the running live dir already is the wanted tree, so the changes
    /// are empty, and it is not the first generation (the first is the one that brings the stack
    /// up). Every other commit comes with the standby already stopped.
    pub fn without_stop(&self) -> bool {
        !self.standby_stopped
    }
    /// Why the push was let in: a fail-back, a first contact, or the history continued.
    pub fn admit(&self) -> Admit {
        self.admit
    }
    /// The tree of the target's own that this commit replaces, where it must be reported: a
    /// fail-back or a first push into a live dir that held files, with changes to make.
    pub fn replaced(&self) -> Option<Replaced> {
        self.replaced
    }
    /// A fail-back ([`Claim::hand_over`]): the driver records the stack as promoted in the
    /// same commit, so that the host that handed it over can no longer push it here.
    pub fn hand_over(&self) -> bool {
        self.hand_over
    }
}

/// What a cycle did on the target.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetReport {
    pub stack: String,
    pub generation: u64,
    pub files: u64,
    pub bytes: u64,
    pub files_received: u64,
    pub files_copied_locally: u64,
    pub upserts: u64,
    pub deletes: u64,
    pub target_downtime_ms: u64,
    /// The standby's services Docker had to kill at their stop timeout.
    pub standby_killed: Vec<String>,
    pub dry_run: bool,
    /// The source's claim, once it arrived.
    pub claim: Option<Claim>,
    /// The target's own tree the commit replaced and kept (see [`Replaced`]).
    pub replaced: Option<Replaced>,
}

/// Where the cycle is, with what each step holds: a state that needs the stack's scan or a
/// manifest carries it, so no step can run without it.
#[derive(Debug)]
enum State {
    AwaitHello,
    /// `Hello` arrived; the source's [`Claim`] comes next.
    AwaitClaim,
    LookingUp,
    LoadingStack,
    /// `Welcome` went out; a manifest arrives in parts. `stack` is the scan of the live dir,
    /// `None` while it still runs (see the module doc). A manifest that ended and passed its own
    /// checks (count, rules, root) waits in `held` for the scans it is planned against.
    Manifest {
        stack: Option<StackState>,
        held: Option<(Pass, Manifest)>,
    },
    /// The contents `manifest` needs are being staged.
    Transfer {
        pass: Pass,
        manifest: Manifest,
        stack: StackState,
    },
    /// Everything `manifest` needs is staged; the source's flag is next.
    AwaitFlag {
        manifest: Manifest,
        stack: StackState,
    },
    /// A [`Commit`] was handed to the driver.
    Committing,
    /// The cycle is over, and waits for the standby to run again before it says so.
    Closing {
        outcome: Result<TargetReport, CycleError>,
    },
    Finished,
}

impl State {
    /// The state's name as protocol errors give it.
    fn name(&self) -> &'static str {
        match self {
            State::AwaitHello => "AwaitHello",
            State::AwaitClaim => "AwaitClaim",
            State::LookingUp => "LookingUp",
            State::LoadingStack => "LoadingStack",
            // A held manifest end is the transfer already, as far as the source can tell: the
            // same message gets the same answer whether or not the scan has finished.
            State::Manifest {
                held: Some((pass, _)),
                ..
            }
            | State::Transfer { pass, .. } => match pass {
                Pass::Precopy => "Transfer(Precopy)",
                Pass::Final => "Transfer(Final)",
            },
            State::Manifest { .. } => "Manifest",
            State::AwaitFlag { .. } => "AwaitFlag",
            State::Committing => "Committing",
            State::Closing { .. } | State::Finished => "Finished",
        }
    }

    fn is_over(&self) -> bool {
        matches!(self, State::Closing { .. } | State::Finished)
    }
}

/// What this cycle did to the standby's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standby {
    /// Not stopped by this cycle (running, or however the cycle found it).
    Untouched,
    /// `StopStack` asked for, not answered yet.
    Stopping,
    /// Stopped; `ScanStopped` is asked for once the running scan is in (`rescanning`).
    Stopped { rescanning: bool },
    /// Stopped and rescanned: the stack state's live manifest is the stopped tree.
    Scanned,
    /// Handed to the commit, which brings the stack up whatever it comes to.
    Committing,
    /// `StartStack` asked for, not answered yet: the cycle's outcome waits for it.
    Starting,
}

impl Standby {
    /// This cycle stopped the stack (or may have) and must start it again before it ends.
    fn is_down(self) -> bool {
        matches!(
            self,
            Standby::Stopping | Standby::Stopped { .. } | Standby::Scanned
        )
    }
}

/// One content the pass needs.
#[derive(Debug, Clone)]
struct Need {
    path: StackPath,
    hash: Hash,
    /// The size the manifest declares; what arrives must have it.
    size: u64,
    /// Live file at the same path, as a delta basis.
    basis: Option<StackPath>,
    /// Live file elsewhere with the same content.
    local: Option<StackPath>,
    /// Stage a patch of the basis rather than a whole file (see [`TargetAction::Receive`]).
    in_place: bool,
}

/// What a held manifest waits for before it is planned.
enum Ready {
    Wait,
    StopFirst,
    Plan,
}

/// The target side of one cycle. See the module doc for the sequence.
#[derive(Debug)]
pub struct TargetSession {
    cfg: TargetConfig,
    state: State,
    stack: String,
    mode: Mode,
    max_delete: f64,
    messages: VecDeque<TargetMsg>,
    actions: VecDeque<TargetAction>,
    parts: Vec<Entry>,
    /// What `parts` holds, by [`Entry::held_bytes`].
    parts_bytes: u64,
    /// The manifest arriving comes as changes against the manifest with this root: `parts`
    /// holds its new and changed entries, `removed` the paths it drops.
    changes_base: Option<Hash>,
    removed: Vec<StackPath>,
    /// The bases a manifest may come as changes against: the last committed manifest (from
    /// the driver) and the last manifest planned in this cycle.
    committed: Option<Arc<Manifest>>,
    previous: Option<Arc<Manifest>>,
    /// [`MAX_MANIFEST_BYTES`] unless lowered.
    max_manifest_bytes: u64,
    /// `Welcome` went out, with this generation, before the stack state was in (see the module
    /// doc).
    welcomed: Option<u64>,
    queue: VecDeque<Need>,
    in_flight: HashMap<u32, Need>,
    next_id: u32,
    missing: Vec<StackPath>,
    retried: HashSet<StackPath>,
    report: TargetReport,
    standby: Standby,
    /// `FinalPass` arrived (or a final manifest without it).
    final_begun: bool,
    /// The pre-copy pass found the running live dir already equal to the source's tree: the
    /// standby's stop waits for the final manifest (see the module doc).
    precopy_unchanged: bool,
    /// The driver said the standby had nothing to stop ([`TargetSession::handle_nothing_to_stop`]).
    nothing_stopped: bool,
    /// The last sign of life from the source, or of the driver's own work (see
    /// [`TargetSession::poll_timeout`]).
    last_progress: Instant,
    /// Why the push was let in, once the policy was checked.
    admit: Option<Admit>,
}

impl TargetSession {
    /// Lowers the most memory a manifest may take while it arrives (default
    /// [`MAX_MANIFEST_BYTES`]): for a small host, and for tests.
    pub fn with_max_manifest_bytes(mut self, max: u64) -> Self {
        self.max_manifest_bytes = max.min(MAX_MANIFEST_BYTES);
        self
    }

    /// A cycle on a connection that was accepted at `now`.
    pub fn new(cfg: TargetConfig, now: Instant) -> Self {
        Self {
            cfg,
            state: State::AwaitHello,
            stack: String::new(),
            mode: Mode::Sync,
            max_delete: super::DEFAULT_MAX_DELETE,
            messages: VecDeque::new(),
            actions: VecDeque::new(),
            parts: Vec::new(),
            parts_bytes: 0,
            changes_base: None,
            removed: Vec::new(),
            committed: None,
            previous: None,
            max_manifest_bytes: MAX_MANIFEST_BYTES,
            welcomed: None,
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            next_id: 0,
            missing: Vec::new(),
            retried: HashSet::new(),
            report: TargetReport::default(),
            standby: Standby::Untouched,
            final_begun: false,
            precopy_unchanged: false,
            nothing_stopped: false,
            last_progress: now,
            admit: None,
        }
    }

    pub fn poll_message(&mut self) -> Option<TargetMsg> {
        self.messages.pop_front()
    }

    pub fn poll_action(&mut self) -> Option<TargetAction> {
        self.actions.pop_front()
    }

    /// The stack this cycle is for, once `Hello` arrived.
    pub fn stack(&self) -> &str {
        &self.stack
    }

    /// True once a `Commit` was handed out: from here on the driver must finish the commit even
    /// if the connection is lost.
    pub fn is_committing(&self) -> bool {
        matches!(self.state, State::Committing)
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// True while the session waits for the driver's own work on the stack (the store opened
    /// and scanned, the standby stopped or rescanned), not for the source: the source may be
    /// waiting for this side then, so silence from it is no stall.
    fn is_waiting_on_driver(&self) -> bool {
        match &self.state {
            State::AwaitHello | State::AwaitClaim | State::Closing { .. } | State::Finished => {
                false
            }
            State::LookingUp | State::LoadingStack | State::Manifest { stack: None, .. } => true,
            _ => matches!(self.standby, Standby::Stopping | Standby::Stopped { .. }),
        }
    }

    /// The source did something (a control message arrived, file data came in), or the driver
    /// answered one of this session's actions, at `now`: the stall clock starts again.
    pub fn handle_progress(&mut self, now: Instant) {
        self.last_progress = self.last_progress.max(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next: [`STALL_TIMEOUT`]
    /// after the last progress, while the cycle waits for the source. `None` while it waits
    /// for this host's own work (a scan, the standby's stop: the source may rightly be silent
    /// then), while a commit runs (it goes on whatever the source does), and once it is over.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_committing() || self.state.is_over() || self.is_waiting_on_driver() {
            return None;
        }
        Some(self.last_progress + STALL_TIMEOUT)
    }

    /// The clock reached `now`: a source silent for [`STALL_TIMEOUT`] while the cycle waits for
    /// it ends the cycle, as a lost connection (QUIC keep-alives keep a stuck peer's
    /// connection open forever).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|at| now >= at) {
            self.fail(
                Cause::ConnectionLost(format!(
                    "no progress from the source for {} s",
                    STALL_TIMEOUT.as_secs()
                )),
                false,
            );
        }
    }

    fn phase(&self) -> Phase {
        match &self.state {
            State::AwaitHello | State::AwaitClaim | State::LookingUp | State::LoadingStack => {
                Phase::Hello
            }
            State::Manifest { held: Some(_), .. } => Phase::Transfer,
            State::Manifest { .. } => Phase::Manifest,
            State::Transfer { .. } => Phase::Transfer,
            State::AwaitFlag { .. } => Phase::Flag,
            State::Committing | State::Closing { .. } | State::Finished => Phase::Commit,
        }
    }

    fn fail(&mut self, cause: Cause, tell_peer: bool) {
        if self.state.is_over() {
            return;
        }
        let err = CycleError {
            stack: self.stack.clone(),
            peer: self.cfg.peer.clone(),
            phase: self.phase(),
            cause,
        };
        if tell_peer {
            let reason = err.cause.to_string();
            self.messages.push_back(TargetMsg::Abort {
                phase: err.phase,
                reason,
            });
        }
        self.finish(Err(err));
    }

    /// Ends the cycle with `outcome`, once the standby runs again if this cycle stopped it.
    fn finish(&mut self, outcome: Result<TargetReport, CycleError>) {
        if self.standby.is_down() {
            self.standby = Standby::Starting;
            self.state = State::Closing { outcome };
            self.actions.push_back(TargetAction::StartStack);
        } else {
            self.state = State::Finished;
            self.actions.push_back(TargetAction::Done(outcome));
        }
    }

    fn misbehaved(&mut self, violation: Violation) {
        self.fail(Cause::PeerMisbehaved(violation), true);
    }

    fn local(&mut self, failure: Failure) {
        self.fail(Cause::Local(failure), true);
    }

    fn refuse(&mut self, refusal: Refusal) {
        self.messages.push_back(TargetMsg::Refused(refusal.clone()));
        self.fail(Cause::Refused(refusal), false);
    }

    fn unexpected(&mut self, msg: &SourceMsg) {
        self.misbehaved(Violation::UnexpectedMessage {
            message: msg.name(),
            state: self.state.name(),
        });
    }

    /// A control message from the source. `now` is this host's clock in Unix seconds.
    pub fn handle_message(&mut self, msg: SourceMsg, now: i64) {
        if self.state.is_over() {
            return;
        }
        let collecting = matches!(self.state, State::Manifest { held: None, .. });
        match msg {
            SourceMsg::Abort { phase, reason } => {
                if !self.is_committing() {
                    self.fail(Cause::PeerAborted { phase, reason }, false);
                }
            }
            SourceMsg::Hello {
                version,
                stack,
                mode,
                max_delete,
            } if matches!(self.state, State::AwaitHello) => {
                // NaN or out of range falls back to the default valve, never to "no valve".
                self.max_delete = if (0.0..=1.0).contains(&max_delete) {
                    max_delete
                } else {
                    super::DEFAULT_MAX_DELETE
                };
                self.stack = stack.clone();
                self.mode = mode;
                if version != PROTOCOL_VERSION {
                    return self.refuse(Refusal::Version {
                        got: version,
                        supported: PROTOCOL_VERSION,
                    });
                }
                self.state = State::AwaitClaim;
            }
            SourceMsg::Claim(claim) if matches!(self.state, State::AwaitClaim) => {
                self.report.claim = Some(claim);
                self.state = State::LookingUp;
                self.actions.push_back(TargetAction::LookupStack {
                    stack: self.stack.clone(),
                });
            }
            SourceMsg::ManifestPart { entries } if collecting => {
                if self.changes_base.is_some() {
                    return self.misbehaved(Violation::ManifestMixed);
                }
                self.manifest_part(entries, Vec::new());
            }
            SourceMsg::ManifestChanges {
                base,
                upsert,
                remove,
            } if collecting => {
                match self.changes_base {
                    None if !self.parts.is_empty() => {
                        return self.misbehaved(Violation::ManifestMixed);
                    }
                    Some(b) if b != base => return self.misbehaved(Violation::ManifestMixed),
                    _ => self.changes_base = Some(base),
                }
                self.manifest_part(upsert, remove);
            }
            SourceMsg::ManifestEnd {
                pass,
                entries,
                root,
            } if collecting => self.manifest_end(pass, entries, root),
            SourceMsg::FinalPass if collecting => self.final_pass(),
            SourceMsg::Flag(flag) if matches!(self.state, State::AwaitFlag { .. }) => {
                self.handle_flag(flag, now)
            }
            msg => self.unexpected(&msg),
        }
    }

    /// The driver looked the stack's config up, or refuses it (unknown, skipped).
    pub fn handle_policy(&mut self, result: Result<StackPolicy, Refusal>) {
        if !matches!(self.state, State::LookingUp) {
            return;
        }
        let policy = match result {
            Ok(p) => p,
            Err(refusal) => return self.refuse(refusal),
        };
        if !policy.allow.iter().any(|a| a == &self.cfg.peer) {
            return self.refuse(Refusal::PeerNotAllowed {
                peer: self.cfg.peer.clone(),
                stack: self.stack.clone(),
            });
        }
        let admit = match self.admit(&policy.held) {
            Ok(a) => a,
            Err(refusal) => return self.refuse(refusal),
        };
        if admit == Admit::FailBack && !policy.keeps_generations && self.mode == Mode::Sync {
            return self.refuse(Refusal::Unavailable {
                stack: self.stack.clone(),
                reason: "a fail-back replaces this host's own tree, and with \
                         `keep_generations = 0` nothing would keep it; set keep_generations \
                         to 1 or more in the stack's file on this host"
                    .into(),
            });
        }
        self.admit = Some(admit);
        self.state = State::LoadingStack;
        self.actions.push_back(TargetAction::LoadStack {
            stack: self.stack.clone(),
        });
    }

    fn admit(&self, held: &Held) -> Result<Admit, Refusal> {
        match &self.report.claim {
            Some(claim) => lineage::admit(&self.stack, held, claim),
            None => Err(Refusal::Unavailable {
                stack: self.stack.clone(),
                reason: "the source sent no claim".into(),
            }),
        }
    }

    /// The driver opened the stack's store (took its lock, recovered an interrupted commit);
    /// its scan of the live dir is still running. The source is welcomed now, so that it stops
    /// and scans its stack while this side scans; [`TargetSession::handle_stack`] follows.
    pub fn handle_opened(&mut self, last_generation: u64, committed: Arc<Manifest>) {
        if !matches!(self.state, State::LoadingStack) {
            return;
        }
        self.committed = Some(committed);
        self.welcome(last_generation);
        self.welcomed = Some(last_generation);
    }

    fn welcome(&mut self, last_generation: u64) {
        self.messages.push_back(TargetMsg::Welcome {
            version: PROTOCOL_VERSION,
            last_generation,
        });
        self.report.stack = self.stack.clone();
        self.report.dry_run = self.mode == Mode::DryRun;
        self.state = State::Manifest {
            stack: None,
            held: None,
        };
    }

    /// The driver loaded the stack (took its lock, recovered and scanned it) or refuses it.
    pub fn handle_stack(&mut self, result: Result<StackState, Refusal>) {
        let waiting =
            self.welcomed.is_some() && matches!(self.state, State::Manifest { stack: None, .. });
        if !matches!(self.state, State::LoadingStack) && !waiting {
            return;
        }
        let state = match result {
            Ok(s) => s,
            Err(refusal) => return self.refuse(refusal),
        };
        // A promotion (or another source's commit) between the lookup and the lock.
        match self.admit(&state.held) {
            Ok(a) if Some(a) == self.admit => {}
            Ok(a) => {
                return self.refuse(Refusal::Unavailable {
                    stack: self.stack.clone(),
                    reason: format!(
                        "its lineage changed while this cycle began (now {a:?}); try again"
                    ),
                });
            }
            Err(refusal) => return self.refuse(refusal),
        }
        if self.committed.is_none() {
            self.committed = Some(state.committed.clone());
        }
        match self.welcomed {
            None => self.welcome(state.last_generation),
            Some(before) if before != state.last_generation => {
                return self.local(Failure::GenerationMoved {
                    before,
                    after: state.last_generation,
                    when: "after the scan",
                });
            }
            Some(_) => {}
        }
        if let State::Manifest { stack, .. } = &mut self.state {
            *stack = Some(state);
        }
        self.rescan_when_ready();
        self.try_plan();
    }

    /// Entries (and, for changes, removed paths) of the manifest that is arriving, within the
    /// limits on its length and memory.
    fn manifest_part(&mut self, entries: Vec<Entry>, removed: Vec<StackPath>) {
        let count = self.parts.len() + self.removed.len() + entries.len() + removed.len();
        if count as u64 > MAX_MANIFEST_ENTRIES {
            return self.misbehaved(Violation::ManifestTooLong {
                max: MAX_MANIFEST_ENTRIES,
            });
        }
        self.parts_bytes += entries.iter().map(Entry::held_bytes).sum::<u64>();
        self.parts_bytes += removed
            .iter()
            .map(|p| (std::mem::size_of::<StackPath>() + p.as_bytes().len()) as u64)
            .sum::<u64>();
        if self.parts_bytes > self.max_manifest_bytes {
            return self.misbehaved(Violation::ManifestTooLarge {
                max_mib: self.max_manifest_bytes >> 20,
                entries: count as u64,
            });
        }
        self.parts.extend(entries);
        self.removed.extend(removed);
    }

    /// The base named `root`, if this side holds it.
    fn base(&self, root: Hash) -> Option<Arc<Manifest>> {
        [&self.previous, &self.committed]
            .into_iter()
            .flatten()
            .find(|m| m.root() == root)
            .cloned()
    }

    fn manifest_end(&mut self, pass: Pass, entries: u64, root: Hash) {
        let mut parts = std::mem::take(&mut self.parts);
        let removed = std::mem::take(&mut self.removed);
        self.parts_bytes = 0;
        if let Some(base_root) = self.changes_base.take() {
            let Some(base) = self.base(base_root) else {
                // Reset or rolled back since the source recorded its base: ask for it whole.
                self.messages.push_back(TargetMsg::ResendManifest { pass });
                return;
            };
            let changes = manifest::Changes {
                upsert: parts,
                remove: removed,
            };
            let whole = match Manifest::apply(&base, changes) {
                Ok(m) => m,
                Err(ChangesError::Manifest(e)) => return self.fail(Cause::Manifest(e), true),
                Err(e) => return self.misbehaved(Violation::ManifestChanges(e.to_string())),
            };
            if whole.len() as u64 > MAX_MANIFEST_ENTRIES {
                return self.misbehaved(Violation::ManifestTooLong {
                    max: MAX_MANIFEST_ENTRIES,
                });
            }
            let held: u64 = whole.entries().iter().map(Entry::held_bytes).sum();
            if held > self.max_manifest_bytes {
                return self.misbehaved(Violation::ManifestTooLarge {
                    max_mib: self.max_manifest_bytes >> 20,
                    entries: whole.len() as u64,
                });
            }
            parts = whole.into_entries();
        }
        if parts.len() as u64 != entries {
            return self.misbehaved(Violation::ManifestCount {
                announced: entries,
                arrived: parts.len() as u64,
            });
        }
        let manifest = match Manifest::new(parts) {
            Ok(m) => m,
            Err(e) => return self.fail(Cause::Manifest(e), true),
        };
        if manifest.root() != root {
            return self.misbehaved(Violation::ManifestRoot);
        }
        if self.mode == Mode::DryRun && pass == Pass::Precopy {
            return self.misbehaved(Violation::PrecopyInDryRun);
        }
        if pass == Pass::Precopy && self.final_begun {
            return self.misbehaved(Violation::PrecopyAfterFinal);
        }
        if pass == Pass::Final {
            // A source that skipped `FinalPass` gets the same plan, only later.
            self.final_begun = true;
        }
        // The manifest itself is checked at once; what it means for this stack waits for the
        // scan of the live dir if that is still running, and for a final pass, for the
        // standby's stop and the scan of the stopped live dir.
        if let State::Manifest { held, .. } = &mut self.state {
            *held = Some((pass, manifest));
        }
        self.try_plan();
    }

    /// The source begins its final pass: stop the standby now, in parallel with the source's
    /// stop, unless the pre-copy pass found nothing to change (see the module doc).
    fn final_pass(&mut self) {
        if self.mode == Mode::DryRun {
            return self.misbehaved(Violation::FinalPassInDryRun);
        }
        if self.final_begun || !self.parts.is_empty() {
            return self.misbehaved(Violation::FinalPassRepeated);
        }
        self.final_begun = true;
        if !self.precopy_unchanged {
            self.stop_standby();
        }
    }

    fn stop_standby(&mut self) {
        if self.standby == Standby::Untouched {
            self.standby = Standby::Stopping;
            self.actions.push_back(TargetAction::StopStack);
        }
    }

    /// Asks for the scan of the stopped live dir once the standby is stopped and the running
    /// scan is in (scans of one store run one at a time).
    fn rescan_when_ready(&mut self) {
        let scanned = matches!(self.state, State::Manifest { stack: Some(_), .. });
        if self.standby == (Standby::Stopped { rescanning: false }) && scanned {
            self.standby = Standby::Stopped { rescanning: true };
            self.actions.push_back(TargetAction::ScanStopped);
        }
    }

    /// Plans the held manifest once what it must be planned against is in: the live scan, and
    /// for a real final pass, the scan of the stopped standby (unless the running one already
    /// is the wanted tree and the standby was never stopped).
    fn try_plan(&mut self) {
        let ready = match &self.state {
            State::Manifest {
                stack: Some(stack),
                held: Some((pass, manifest)),
            } if *pass == Pass::Final && self.mode == Mode::Sync => match self.standby {
                Standby::Scanned => Ready::Plan,
                Standby::Untouched
                    if stack.last_generation > 0 && stack.changes_to(manifest).is_empty() =>
                {
                    Ready::Plan
                }
                Standby::Untouched => Ready::StopFirst,
                Standby::Stopping
                | Standby::Stopped { .. }
                | Standby::Committing
                | Standby::Starting => Ready::Wait,
            },
            State::Manifest {
                stack: Some(_),
                held: Some(_),
            } => Ready::Plan,
            _ => Ready::Wait,
        };
        match ready {
            Ready::Wait => {}
            Ready::StopFirst => self.stop_standby(),
            Ready::Plan => {
                if let State::Manifest { stack, held } = &mut self.state
                    && let (Some(stack), Some((pass, manifest))) = (stack.take(), held.take())
                {
                    self.plan(pass, manifest, stack);
                }
            }
        }
    }

    /// The standby's stack is stopped, with the services Docker had to kill at their stop
    /// timeout; or stopping it failed (part of it may be down: the cycle ends, and the stack is
    /// started again).
    pub fn handle_stack_stopped(&mut self, result: Result<Vec<String>, String>) {
        if self.standby != Standby::Stopping {
            return;
        }
        self.standby = Standby::Stopped { rescanning: false };
        match result {
            Ok(killed) => {
                self.report.standby_killed = killed;
                self.rescan_when_ready();
            }
            Err(e) => self.local(Failure::StopStandby(e)),
        }
    }

    /// The live dir, scanned again with the standby stopped, and what is staged (in-place
    /// patches only where the stopped file is still the one they were made against).
    pub fn handle_stopped_scan(&mut self, result: Result<StackState, String>) {
        if self.standby != (Standby::Stopped { rescanning: true }) {
            return;
        }
        let state = match result {
            Ok(s) => s,
            Err(e) => return self.local(Failure::ScanStopped(e)),
        };
        // Asked for only with the running scan in, and nothing leaves `Manifest` while the
        // standby is stopped and not yet rescanned.
        let State::Manifest {
            stack: Some(running),
            ..
        } = &mut self.state
        else {
            return;
        };
        if running.last_generation != state.last_generation {
            let before = running.last_generation;
            return self.local(Failure::GenerationMoved {
                before,
                after: state.last_generation,
                when: "after the standby stopped",
            });
        }
        *running = state;
        self.standby = Standby::Scanned;
        self.try_plan();
    }

    /// The standby has no stack (a data-only stack): its "stop" stopped nothing, so nothing that
    /// writes into the live dir stopped either, and the scan the stack was loaded with is the
    /// tree a plan is made against; no second scan. (The commit's own scan still refuses a
    /// tree that changed since.) If that plan changes nothing, the generation is committed
    /// [without a stop](Commit::without_stop), as for a running standby that already holds the
    /// tree: nothing was down, and the commit changes no file, so it needs no scan either.
    pub fn handle_nothing_to_stop(&mut self) {
        if self.standby != Standby::Stopping {
            return;
        }
        self.standby = Standby::Scanned;
        self.nothing_stopped = true;
        self.try_plan();
    }

    /// The standby's stack was brought up again after a cycle that ended without a commit. The
    /// cycle's outcome stands either way; a start that failed is the driver's to report.
    pub fn handle_stack_started(&mut self, _result: Result<(), String>) {
        if self.standby != Standby::Starting {
            return;
        }
        self.standby = Standby::Untouched;
        if let State::Closing { outcome } = std::mem::replace(&mut self.state, State::Finished) {
            self.actions.push_back(TargetAction::Done(outcome));
        }
    }

    /// Compares a checked manifest with the live dir: the `max_delete` valve, then the needs.
    fn plan(&mut self, pass: Pass, manifest: Manifest, stack: StackState) {
        let changes = stack.changes_to(&manifest);
        if changes.delete_share() > self.max_delete {
            let cause = Cause::TooManyDeletes {
                removed: changes.removed_files,
                live: changes.live_files,
                share: changes.delete_share(),
                max: self.max_delete,
            };
            return self.fail(cause, true);
        }
        self.queue = needs(&stack, &manifest).into();
        // The source sends its next manifest in this cycle as changes against this one.
        self.previous = Some(Arc::new(manifest.clone()));
        if pass == Pass::Precopy {
            self.precopy_unchanged = changes.is_empty();
        }
        if self.mode == Mode::DryRun {
            self.messages.push_back(TargetMsg::Plan(plan_summary(
                &changes,
                &self.queue,
                &manifest,
            )));
            self.report.files = manifest.file_totals().0;
            self.report.bytes = manifest.file_totals().1;
            let report = std::mem::take(&mut self.report);
            return self.finish(Ok(report));
        }
        self.missing.clear();
        self.state = State::Transfer {
            pass,
            manifest,
            stack,
        };
        self.pump();
    }

    /// Starts work on queued needs while there is room in the pipeline; ends the pass when
    /// nothing is queued or in flight.
    fn pump(&mut self) {
        if !matches!(self.state, State::Transfer { .. }) {
            return;
        }
        while self.in_flight.len() < MAX_IN_FLIGHT {
            let Some(need) = self.queue.pop_front() else {
                break;
            };
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if let Some(from) = &need.local {
                self.actions.push_back(TargetAction::StageLocal {
                    id,
                    from: from.clone(),
                    hash: need.hash,
                });
            } else if let Some(basis) = &need.basis {
                self.actions.push_back(TargetAction::Signature {
                    id,
                    basis: basis.clone(),
                });
            } else {
                self.want(id, &need, None);
            }
            self.in_flight.insert(id, need);
        }
        if !self.in_flight.is_empty() || !self.queue.is_empty() {
            return;
        }
        let State::Transfer {
            pass,
            manifest,
            stack,
        } = std::mem::replace(&mut self.state, State::Finished)
        else {
            return;
        };
        let missing = std::mem::take(&mut self.missing);
        let complete = missing.is_empty();
        self.messages
            .push_back(TargetMsg::PassDone { pass, missing });
        self.state = match (pass, complete) {
            (Pass::Final, true) => State::AwaitFlag { manifest, stack },
            // After an incomplete final pass (files changed under it) the source rescans and
            // sends a new final manifest, or gives up.
            _ => State::Manifest {
                stack: Some(stack),
                held: None,
            },
        };
    }

    fn want(&mut self, id: u32, need: &Need, basis_sig: Option<Vec<u8>>) {
        let basis = basis_sig.as_ref().and(need.basis.clone());
        self.messages.push_back(TargetMsg::Want {
            id,
            path: need.path.clone(),
            basis: basis_sig,
        });
        let in_place = need.in_place && basis.is_some();
        self.actions.push_back(TargetAction::Receive {
            id,
            path: need.path.clone(),
            basis,
            in_place,
        });
    }

    /// The signature of a basis file, or why it could not be computed (then the file is sent
    /// literally).
    pub fn handle_signature(&mut self, id: u32, result: Result<Vec<u8>, String>) {
        let Some(need) = self.in_flight.get(&id).cloned() else {
            return;
        };
        self.want(id, &need, result.ok());
    }

    /// A file was staged (or not). Every `StageLocal` and `Receive` gets exactly one answer.
    pub fn handle_staged(&mut self, id: u32, outcome: StageOutcome) {
        if !matches!(self.state, State::Transfer { .. }) {
            // Outside a transfer nothing is in flight: a file stream now was never wanted. (An
            // ended session ignores late answers.)
            if !self.state.is_over() && !self.is_committing() {
                return self.misbehaved(Violation::DataOutsideTransfer { id });
            }
            return;
        }
        let Some(need) = self.in_flight.remove(&id) else {
            return self.misbehaved(Violation::DataNotWanted { id });
        };
        match outcome {
            StageOutcome::Staged(verified) => {
                let hash = verified.hash();
                if let State::Transfer { stack, .. } = &mut self.state {
                    stack.staged.insert(hash);
                }
                if hash == need.hash && verified.len() != need.size {
                    return self.misbehaved(Violation::SizeMismatch {
                        path: need.path,
                        declared: need.size,
                        actual: verified.len(),
                    });
                }
                if hash == need.hash {
                    if need.local.is_some() {
                        self.report.files_copied_locally += 1;
                    } else {
                        self.report.files_received += 1;
                    }
                } else if need.local.is_some() {
                    // The live copy changed since the scan: fetch it from the source instead.
                    self.queue.push_back(Need {
                        local: None,
                        ..need
                    });
                } else {
                    self.missing.push(need.path);
                }
            }
            StageOutcome::Mismatch => {
                // fast_rsync's MD4 block match is not collision-resistant, and a peer may send
                // garbage; BLAKE3 caught it. Fetch the file literally, once.
                if !self.retried.insert(need.path.clone()) {
                    return self.fail(Cause::RebuildFailed { path: need.path }, true);
                }
                self.queue.push_back(Need {
                    basis: None,
                    local: None,
                    ..need
                });
            }
            StageOutcome::SourceAborted(_) => self.missing.push(need.path),
            StageOutcome::Failed(error) => {
                return self.local(Failure::Staging {
                    path: need.path,
                    error,
                });
            }
        }
        self.pump();
    }

    /// The driver found a data stream that is not the transfer of a file this session asked
    /// for (see [`BadStream`]). The session decides what it means: a stream for a file id that
    /// was not wanted is the peer's violation like any other, and so is a stream that does not
    /// begin as a transfer or mixes another file's frames into one; the cycle ends, the source
    /// is told why, and nothing of the file the bad frame interrupted is staged (files that
    /// ended before it on the same stream were verified and may stay staged).
    pub fn handle_bad_stream(&mut self, bad: BadStream) {
        if self.state.is_over() || self.is_committing() {
            return;
        }
        match bad {
            BadStream::NotWanted { id } if matches!(self.state, State::Transfer { .. }) => {
                self.misbehaved(Violation::DataNotWanted { id })
            }
            BadStream::NotWanted { id } => self.misbehaved(Violation::DataOutsideTransfer { id }),
            BadStream::NoBegin(what) => self.misbehaved(Violation::BadFileStream(format!(
                "a file on it does not begin with FileBegin: {what}"
            ))),
            BadStream::Foreign { id, got } => self.misbehaved(Violation::BadFileStream(format!(
                "{got} on the stream of file id {id}"
            ))),
        }
    }

    fn handle_flag(&mut self, flag: SignedStatus, now: i64) {
        let State::AwaitFlag { manifest, stack } = &self.state else {
            return;
        };
        let checked = self.check_flag(flag, now, manifest, stack);
        let (verified, changes, standby_stopped, admit) = match checked {
            Ok(c) => c,
            Err(cause) => return self.fail(cause, true),
        };
        let State::AwaitFlag { manifest, stack } =
            std::mem::replace(&mut self.state, State::Committing)
        else {
            return;
        };
        let (files, bytes) = manifest.file_totals();
        self.report.files = files;
        self.report.bytes = bytes;
        self.report.generation = verified.generation();
        self.report.upserts = changes.upserts.len() as u64;
        self.report.deletes = changes.deletes.len() as u64;
        let own_tree = matches!(admit, Admit::FailBack | Admit::FirstContact)
            && changes.live_files > 0
            && !changes.is_empty();
        let replaced = own_tree.then(|| Replaced {
            paths: (changes.upserts.len() + changes.deletes.len()) as u64,
            rollback_to: stack.last_generation,
        });
        self.report.replaced = replaced;
        let commit = Commit {
            status: verified,
            manifest,
            live: stack.live,
            changes,
            standby_stopped,
            admit,
            replaced,
            hand_over: self.report.claim.is_some_and(|c| c.hand_over),
        };
        self.standby = Standby::Committing;
        self.actions
            .push_back(TargetAction::Commit(Box::new(commit)));
    }

    /// Verifies the flag against the staged manifest, and checks once more that the commit may
    /// run: everything staged, planned against a stopped standby. The changes, and whether the
    /// standby was stopped.
    fn check_flag(
        &self,
        flag: SignedStatus,
        now: i64,
        manifest: &Manifest,
        stack: &StackState,
    ) -> Result<(VerifiedStatus, Changes, bool, Admit), Cause> {
        let Some(key) = self.cfg.peer_flag_key else {
            return Err(Cause::Local(Failure::NoFlagKey {
                peer: self.cfg.peer.clone(),
            }));
        };
        let (Some(claim), Some(admit)) = (self.report.claim, self.admit) else {
            return Err(Cause::Local(Failure::NotPlannedStopped));
        };
        let expected = Expected {
            stack: &self.stack,
            source_id: &self.cfg.peer,
            target_id: &self.cfg.target_id,
            last_generation: stack.last_generation,
            history: claim.history,
            manifest_root: manifest.root(),
            now,
            max_skew: self.cfg.max_skew_secs,
        };
        let verified = flag.verify(&key, &expected)?;
        let changes = stack.changes_to(manifest);
        // Belt and braces: the pass only ends when every need is staged, but the commit must
        // never start on a generation with content missing, whatever path led here.
        if let Some(lost) = needs(stack, manifest).into_iter().next() {
            return Err(Cause::Local(Failure::NotStaged { path: lost.path }));
        }
        // Likewise: only a stopped standby's scan may plan changes (see the module doc).
        let unchanged = changes.is_empty() && stack.last_generation > 0;
        let standby_stopped = match self.standby {
            Standby::Scanned if self.nothing_stopped && unchanged => false,
            Standby::Scanned => true,
            Standby::Untouched if unchanged => false,
            _ => return Err(Cause::Local(Failure::NotPlannedStopped)),
        };
        Ok((verified, changes, standby_stopped, admit))
    }

    /// The commit finished: the new generation is live, or the commit failed and the previous
    /// generation is live.
    pub fn handle_committed(&mut self, result: Result<u64, (Phase, String)>) {
        if !self.is_committing() {
            return;
        }
        let generation = self.report.generation;
        match result {
            Ok(target_downtime_ms) => {
                self.report.target_downtime_ms = target_downtime_ms;
                self.messages.push_back(TargetMsg::Result(CycleResult {
                    generation,
                    outcome: Outcome::Committed {
                        target_downtime_ms,
                        standby_killed: self.report.standby_killed.clone(),
                        replaced: self.report.replaced,
                    },
                }));
                let report = std::mem::take(&mut self.report);
                self.finish(Ok(report));
            }
            Err((phase, reason)) => {
                self.messages.push_back(TargetMsg::Result(CycleResult {
                    generation,
                    outcome: Outcome::Failed {
                        phase,
                        reason: reason.clone(),
                    },
                }));
                let err = CycleError {
                    stack: self.stack.clone(),
                    peer: self.cfg.peer.clone(),
                    phase,
                    cause: Cause::CommitFailed(reason),
                };
                self.finish(Err(err));
            }
        }
    }

    /// A control message from the source did not decode (a frame over the limit, bytes that are
    /// no message, a path with `..`): the peer broke the protocol. The source is told why, and
    /// nothing is committed; a commit already under way goes on.
    pub fn handle_malformed(&mut self, reason: &str) {
        if !self.is_committing() {
            self.misbehaved(Violation::Malformed(reason.to_string()));
        }
    }

    /// The connection ended before the cycle did. A commit already under way goes on.
    pub fn handle_connection_lost(&mut self, reason: &str) {
        if !self.is_committing() {
            // A QUIC close reason is the peer's text.
            let reason = crate::text::escape_controls(reason).into_owned();
            self.fail(Cause::ConnectionLost(reason), false);
        }
    }
}

/// Smallest file staged as an in-place patch; below it a whole rebuilt file costs little.
pub const IN_PLACE_MIN_SIZE: u64 = 1 << 20;

/// The contents `want` needs that are neither staged nor already live at their own path, once
/// per content, in manifest order.
fn needs(stack: &StackState, want: &Manifest) -> Vec<Need> {
    let live = &stack.live;
    // One walk finds the wanted files that are not already right at their live path (in a
    // cycle where little changed, almost none); only then are the indexes by hash built.
    let mut candidates = Vec::new();
    for (w, live_here) in manifest::pair_by_path(want.entries(), live.entries()) {
        let Some(e) = w else { continue };
        let Some((_, hash)) = e.file() else { continue };
        // A live file linked outside the stack is never written into, so neither a patch
        // against it nor its being already right counts: its content comes whole.
        let linked_outside = stack.outside_links.contains(&e.path);
        if !linked_outside
            && live_here
                .and_then(Entry::file)
                .is_some_and(|(_, h)| h == hash)
        {
            continue;
        }
        candidates.push((e, live_here, linked_outside));
    }
    if candidates.is_empty() {
        return Vec::new();
    }
    let mut live_by_hash: HashMap<Hash, &StackPath> = HashMap::new();
    for e in live.entries() {
        if let Some((_, hash)) = e.file() {
            live_by_hash.entry(hash).or_insert(&e.path);
        }
    }
    let mut uses: HashMap<Hash, u32> = HashMap::new();
    for e in want.entries() {
        if let Some((_, hash)) = e.file() {
            *uses.entry(hash).or_default() += 1;
        }
    }
    let single_use = |hash: &Hash| uses.get(hash) == Some(&1);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (e, live_here, linked_outside) in candidates {
        let EntryKind::File {
            hash,
            size,
            link_group,
        } = e.kind
        else {
            continue;
        };
        let patched_here = stack.staged_in_place.get(&hash) == Some(&e.path)
            && single_use(&hash)
            && !linked_outside;
        if stack.staged.contains(&hash) || patched_here {
            continue;
        }
        if !seen.insert(hash) {
            continue;
        }
        let basis = live_here.filter(|l| l.file().is_some_and(|(size, _)| size > 0));
        let in_place = !linked_outside
            && basis.is_some_and(|l| {
                matches!(l.kind, EntryKind::File { link_group: None, size: live_size, .. }
                if live_size >= IN_PLACE_MIN_SIZE)
            })
            && link_group.is_none()
            && size >= IN_PLACE_MIN_SIZE
            && single_use(&hash);
        let local = live_by_hash.get(&hash).map(|p| (*p).clone());
        out.push(Need {
            path: e.path.clone(),
            hash,
            size,
            basis: basis.map(|l| l.path.clone()),
            local,
            in_place,
        });
    }
    out
}

fn plan_summary(changes: &Changes, needs: &VecDeque<Need>, want: &Manifest) -> PlanSummary {
    let mut plan = PlanSummary {
        send_count: needs.iter().filter(|n| n.local.is_none()).count() as u64,
        copy_local: needs.iter().filter(|n| n.local.is_some()).count() as u64,
        delete_count: changes.deletes.len() as u64,
        unchanged: changes.unchanged,
        ..PlanSummary::default()
    };
    for need in needs.iter().filter(|n| n.local.is_none()) {
        let size = want
            .get(&need.path)
            .and_then(Entry::file)
            .map_or(0, |(s, _)| s);
        plan.send_bytes = plan.send_bytes.saturating_add(size);
        if plan.send.len() < PlanSummary::MAX_LISTED {
            plan.send.push((need.path.clone(), size));
        }
    }
    plan.delete = changes
        .deletes
        .iter()
        .take(PlanSummary::MAX_LISTED)
        .cloned()
        .collect();
    plan.meta_only = changes
        .upserts
        .iter()
        .filter(|u| matches!(u, Upsert::Meta(_)))
        .count() as u64;
    plan
}
