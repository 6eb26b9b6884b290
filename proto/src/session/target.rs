//! The target side of a cycle.
//!
//! ```text
//!  Hello ─► LoadStack ─► [opened ─► Welcome] ─► stack state | Refused
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

use ed25519_dalek::VerifyingKey;

use super::{Cause, CycleError, MAX_IN_FLIGHT};
use crate::delta::Verified;
use crate::flag::{Expected, SignedStatus, VerifiedStatus};
use crate::manifest::{Entry, EntryKind, Hash, Manifest};
use crate::msg::{
    CycleResult, MAX_MANIFEST_BYTES, MAX_MANIFEST_ENTRIES, Mode, Outcome, PROTOCOL_VERSION, Pass,
    Phase, PlanSummary, Refusal, SourceMsg, TargetMsg,
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
}

/// What the driver knows of a stack when a cycle for it starts.
#[derive(Debug, Clone)]
pub struct StackState {
    /// Last committed generation (0: none yet).
    pub last_generation: u64,
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
    Commit(Commit),
    /// The cycle is over.
    Done(Result<TargetReport, CycleError>),
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    LookingUp,
    LoadingStack,
    Manifest,
    Transfer(Pass),
    AwaitFlag,
    Committing,
    Finished,
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

/// The target side of one cycle. See the module doc for the sequence.
#[derive(Debug)]
pub struct TargetSession {
    cfg: TargetConfig,
    state: State,
    stack: String,
    mode: Mode,
    max_delete: f64,
    stack_state: Option<StackState>,
    messages: VecDeque<TargetMsg>,
    actions: VecDeque<TargetAction>,
    parts: Vec<Entry>,
    /// What `parts` holds, by [`Entry::held_bytes`].
    parts_bytes: u64,
    /// [`MAX_MANIFEST_BYTES`] unless lowered.
    max_manifest_bytes: u64,
    /// `Welcome` went out, with this generation, before the stack state was in (see the module
    /// doc).
    welcomed: Option<u64>,
    /// A manifest that ended and passed its own checks (count, rules, root), with its pass,
    /// waiting for the stack state to be planned against.
    held_end: Option<(Pass, Manifest)>,
    manifest: Option<Manifest>,
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
    /// The outcome, held back until the standby runs again.
    outcome: Option<Result<TargetReport, CycleError>>,
}

impl TargetSession {
    /// Lowers the most memory a manifest may take while it arrives (default
    /// [`MAX_MANIFEST_BYTES`]): for a small host, and for tests.
    pub fn with_max_manifest_bytes(mut self, max: u64) -> Self {
        self.max_manifest_bytes = max.min(MAX_MANIFEST_BYTES);
        self
    }

    pub fn new(cfg: TargetConfig) -> Self {
        Self {
            cfg,
            state: State::AwaitHello,
            stack: String::new(),
            mode: Mode::Sync,
            max_delete: super::DEFAULT_MAX_DELETE,
            stack_state: None,
            messages: VecDeque::new(),
            actions: VecDeque::new(),
            parts: Vec::new(),
            parts_bytes: 0,
            max_manifest_bytes: MAX_MANIFEST_BYTES,
            welcomed: None,
            held_end: None,
            manifest: None,
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            next_id: 0,
            missing: Vec::new(),
            retried: HashSet::new(),
            report: TargetReport::default(),
            standby: Standby::Untouched,
            final_begun: false,
            precopy_unchanged: false,
            outcome: None,
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
        self.state == State::Committing
    }

    pub fn is_finished(&self) -> bool {
        self.state == State::Finished && self.outcome.is_none()
    }

    /// True while the session waits for the driver's own work on the stack (the store opened
    /// and scanned, the standby stopped or rescanned), not for the source: the source may be
    /// waiting for this side then, so silence from it is no stall.
    pub fn is_waiting_on_driver(&self) -> bool {
        match self.state {
            State::AwaitHello | State::Finished => false,
            State::LookingUp | State::LoadingStack => true,
            _ => {
                self.stack_state.is_none()
                    || matches!(self.standby, Standby::Stopping | Standby::Stopped { .. })
            }
        }
    }

    fn phase(&self) -> Phase {
        match self.state {
            State::AwaitHello | State::LookingUp | State::LoadingStack => Phase::Hello,
            State::Manifest if self.held_end.is_some() => Phase::Transfer,
            State::Manifest => Phase::Manifest,
            State::Transfer(_) => Phase::Transfer,
            State::AwaitFlag => Phase::Flag,
            State::Committing | State::Finished => Phase::Commit,
        }
    }

    fn fail(&mut self, cause: Cause, tell_peer: bool) {
        if self.state == State::Finished {
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
        self.state = State::Finished;
        if self.standby.is_down() {
            self.standby = Standby::Starting;
            self.outcome = Some(outcome);
            self.actions.push_back(TargetAction::StartStack);
        } else {
            self.actions.push_back(TargetAction::Done(outcome));
        }
    }

    fn misbehaved(&mut self, what: impl Into<String>) {
        self.fail(Cause::PeerMisbehaved(what.into()), true);
    }

    fn refuse(&mut self, refusal: Refusal) {
        self.messages.push_back(TargetMsg::Refused(refusal.clone()));
        self.fail(Cause::Refused(refusal), false);
    }

    /// A control message from the source. `now` is this host's clock in Unix seconds.
    pub fn handle_message(&mut self, msg: SourceMsg, now: i64) {
        if self.state == State::Finished {
            return;
        }
        match (self.state, msg) {
            (_, SourceMsg::Abort { phase, reason }) => {
                if self.state != State::Committing {
                    self.fail(Cause::PeerAborted { phase, reason }, false);
                }
            }
            (
                State::AwaitHello,
                SourceMsg::Hello {
                    version,
                    stack,
                    mode,
                    max_delete,
                },
            ) => {
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
                self.state = State::LookingUp;
                self.actions.push_back(TargetAction::LookupStack { stack });
            }
            // A held manifest end is the transfer already, as far as the source can tell: the
            // same message gets the same answer whether or not the scan has finished.
            (State::Manifest, msg) if let Some((pass, ..)) = self.held_end => {
                self.misbehaved(format!(
                    "unexpected {} while {:?}",
                    short_name(&msg),
                    State::Transfer(pass)
                ))
            }
            (State::Manifest, SourceMsg::ManifestPart { entries }) => {
                if (self.parts.len() + entries.len()) as u64 > MAX_MANIFEST_ENTRIES {
                    return self.misbehaved(format!(
                        "manifest longer than {MAX_MANIFEST_ENTRIES} entries"
                    ));
                }
                self.parts_bytes += entries.iter().map(Entry::held_bytes).sum::<u64>();
                if self.parts_bytes > self.max_manifest_bytes {
                    return self.misbehaved(format!(
                        "manifest larger than {} MiB in memory after {} entries (long paths, \
                         symlink targets or xattrs); split the stack into smaller ones",
                        self.max_manifest_bytes >> 20,
                        self.parts.len() + entries.len()
                    ));
                }
                self.parts.extend(entries);
            }
            (
                State::Manifest,
                SourceMsg::ManifestEnd {
                    pass,
                    entries,
                    root,
                },
            ) => self.manifest_end(pass, entries, root),
            (State::Manifest, SourceMsg::FinalPass) => self.final_pass(),
            (State::AwaitFlag, SourceMsg::Flag(flag)) => self.handle_flag(flag, now),
            (state, msg) => {
                self.misbehaved(format!("unexpected {} while {state:?}", short_name(&msg)))
            }
        }
    }

    /// The driver looked the stack's config up, or refuses it (unknown, skipped).
    pub fn handle_policy(&mut self, result: Result<StackPolicy, Refusal>) {
        if self.state != State::LookingUp {
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
        self.state = State::LoadingStack;
        self.actions.push_back(TargetAction::LoadStack {
            stack: self.stack.clone(),
        });
    }

    /// The driver opened the stack's store (took its lock, recovered an interrupted commit);
    /// its scan of the live dir is still running. The source is welcomed now, so that it stops
    /// and scans its stack while this side scans; [`TargetSession::handle_stack`] follows.
    pub fn handle_opened(&mut self, last_generation: u64) {
        if self.state != State::LoadingStack {
            return;
        }
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
        self.state = State::Manifest;
    }

    /// The driver loaded the stack (took its lock, recovered and scanned it) or refuses it.
    pub fn handle_stack(&mut self, result: Result<StackState, Refusal>) {
        let waiting =
            self.welcomed.is_some() && self.state == State::Manifest && self.stack_state.is_none();
        if self.state != State::LoadingStack && !waiting {
            return;
        }
        let state = match result {
            Ok(s) => s,
            Err(refusal) => return self.refuse(refusal),
        };
        match self.welcomed {
            None => self.welcome(state.last_generation),
            Some(g) if g != state.last_generation => {
                return self.fail(
                    Cause::Local(format!(
                        "the store was at generation {g} when opened and at {} after the scan",
                        state.last_generation
                    )),
                    true,
                );
            }
            Some(_) => {}
        }
        self.stack_state = Some(state);
        self.rescan_when_ready();
        self.try_plan();
    }

    fn manifest_end(&mut self, pass: Pass, entries: u64, root: Hash) {
        let parts = std::mem::take(&mut self.parts);
        self.parts_bytes = 0;
        if parts.len() as u64 != entries {
            return self.misbehaved(format!(
                "manifest announced {entries} entries, {} arrived",
                parts.len()
            ));
        }
        let manifest = match Manifest::new(parts) {
            Ok(m) => m,
            Err(e) => return self.fail(Cause::Manifest(e), true),
        };
        if manifest.root() != root {
            return self.misbehaved("manifest entries do not hash to the announced root");
        }
        if self.mode == Mode::DryRun && pass == Pass::Precopy {
            return self.misbehaved("pre-copy pass in a dry run");
        }
        if pass == Pass::Precopy && self.final_begun {
            return self.misbehaved("pre-copy manifest after the final pass began");
        }
        if pass == Pass::Final {
            // A source that skipped `FinalPass` gets the same plan, only later.
            self.final_begun = true;
        }
        // The manifest itself is checked at once; what it means for this stack waits for the
        // scan of the live dir if that is still running, and for a final pass, for the
        // standby's stop and the scan of the stopped live dir.
        self.held_end = Some((pass, manifest));
        self.try_plan();
    }

    /// The source begins its final pass: stop the standby now, in parallel with the source's
    /// stop, unless the pre-copy pass found nothing to change (see the module doc).
    fn final_pass(&mut self) {
        if self.mode == Mode::DryRun {
            return self.misbehaved("FinalPass in a dry run");
        }
        if self.final_begun || !self.parts.is_empty() {
            return self.misbehaved("FinalPass twice, or inside a manifest");
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
        if self.standby == (Standby::Stopped { rescanning: false }) && self.stack_state.is_some() {
            self.standby = Standby::Stopped { rescanning: true };
            self.actions.push_back(TargetAction::ScanStopped);
        }
    }

    /// Plans the held manifest once what it must be planned against is in: the live scan, and
    /// for a real final pass, the scan of the stopped standby (unless the running one already
    /// is the wanted tree and the standby was never stopped).
    fn try_plan(&mut self) {
        let (Some((pass, manifest)), Some(stack)) = (&self.held_end, &self.stack_state) else {
            return;
        };
        if *pass == Pass::Final && self.mode == Mode::Sync {
            match self.standby {
                Standby::Scanned => {}
                Standby::Untouched => {
                    let unchanged =
                        stack.last_generation > 0 && stack.changes_to(manifest).is_empty();
                    if !unchanged {
                        self.stop_standby();
                        return;
                    }
                }
                Standby::Stopping
                | Standby::Stopped { .. }
                | Standby::Committing
                | Standby::Starting => return,
            }
        }
        if let Some((pass, manifest)) = self.held_end.take() {
            self.plan(pass, manifest);
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
            Err(e) => self.fail(
                Cause::Local(format!("stopping the standby's stack failed: {e}")),
                true,
            ),
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
            Err(e) => {
                return self.fail(
                    Cause::Local(format!("scanning the stopped standby failed: {e}")),
                    true,
                );
            }
        };
        let before = self.stack_state.as_ref().map(|s| s.last_generation);
        if before != Some(state.last_generation) {
            return self.fail(
                Cause::Local(format!(
                    "the store was at generation {before:?} and at {} after the standby stopped",
                    state.last_generation
                )),
                true,
            );
        }
        self.stack_state = Some(state);
        self.standby = Standby::Scanned;
        self.try_plan();
    }

    /// The standby's stack was brought up again after a cycle that ended without a commit. The
    /// cycle's outcome stands either way; a start that failed is the driver's to report.
    pub fn handle_stack_started(&mut self, _result: Result<(), String>) {
        if self.standby != Standby::Starting {
            return;
        }
        self.standby = Standby::Untouched;
        if let Some(outcome) = self.outcome.take() {
            self.actions.push_back(TargetAction::Done(outcome));
        }
    }

    /// Compares a checked manifest with the live dir: the `max_delete` valve, then the needs.
    fn plan(&mut self, pass: Pass, manifest: Manifest) {
        let Some(stack) = self.stack_state.as_ref() else {
            return self.fail(Cause::Local("no stack state".into()), true);
        };
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
        self.queue = needs(&stack.live, stack, &manifest).into();
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
        self.manifest = Some(manifest);
        self.state = State::Transfer(pass);
        self.pump();
    }

    /// Starts work on queued needs while there is room in the pipeline; ends the pass when
    /// nothing is queued or in flight.
    fn pump(&mut self) {
        let State::Transfer(pass) = self.state else {
            return;
        };
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
        if self.in_flight.is_empty() && self.queue.is_empty() {
            let missing = std::mem::take(&mut self.missing);
            let complete = missing.is_empty();
            self.messages
                .push_back(TargetMsg::PassDone { pass, missing });
            self.state = match (pass, complete) {
                (Pass::Final, true) => State::AwaitFlag,
                // After an incomplete final pass (files changed under it) the source rescans
                // and sends a new final manifest, or gives up.
                _ => State::Manifest,
            };
        }
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
        if !matches!(self.state, State::Transfer(_)) {
            // Outside a transfer nothing is in flight: a file stream now was never wanted. (An
            // ended session ignores late answers.)
            if !matches!(self.state, State::Committing | State::Finished) {
                return self.misbehaved(format!(
                    "data for file id {id} outside a transfer (nothing was wanted)"
                ));
            }
            return;
        }
        let Some(need) = self.in_flight.remove(&id) else {
            return self.misbehaved(format!("data for file id {id}, which was not wanted"));
        };
        match outcome {
            StageOutcome::Staged(verified) => {
                let hash = verified.hash();
                if let Some(s) = self.stack_state.as_mut() {
                    s.staged.insert(hash);
                }
                if hash == need.hash && verified.len() != need.size {
                    return self.misbehaved(format!(
                        "{} is declared as {} bytes, but the content with its hash has {}",
                        need.path,
                        need.size,
                        verified.len()
                    ));
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
            StageOutcome::Failed(e) => {
                return self.fail(
                    Cause::Local(format!("staging {} failed: {e}", need.path)),
                    true,
                );
            }
        }
        self.pump();
    }

    fn handle_flag(&mut self, flag: SignedStatus, now: i64) {
        let (Some(stack), Some(manifest)) = (self.stack_state.as_ref(), self.manifest.as_ref())
        else {
            return self.fail(Cause::Local("flag without a staged manifest".into()), true);
        };
        let Some(key) = self.cfg.peer_flag_key else {
            return self.fail(
                Cause::Local(format!(
                    "source `{}` has no flag key bound to its certificate",
                    self.cfg.peer
                )),
                true,
            );
        };
        let expected = Expected {
            stack: &self.stack,
            source_id: &self.cfg.peer,
            target_id: &self.cfg.target_id,
            last_generation: stack.last_generation,
            manifest_root: manifest.root(),
            now,
            max_skew: self.cfg.max_skew_secs,
        };
        let verified = match flag.verify(&key, &expected) {
            Ok(v) => v,
            Err(e) => return self.fail(Cause::Flag(e), true),
        };
        let changes = stack.changes_to(manifest);
        // Belt and braces: the pass only ends when every need is staged, but the commit must
        // never start on a generation with content missing, whatever path led here.
        if let Some(lost) = needs(&stack.live, stack, manifest).into_iter().next() {
            return self.fail(
                Cause::Local(format!("content of {} is not staged", lost.path)),
                true,
            );
        }
        // Likewise: only a stopped standby's scan may plan changes (see the module doc).
        let standby_stopped = match self.standby {
            Standby::Scanned => true,
            Standby::Untouched if changes.is_empty() && stack.last_generation > 0 => false,
            _ => {
                return self.fail(
                    Cause::Local("the final pass was not planned against a stopped standby".into()),
                    true,
                );
            }
        };
        let (files, bytes) = manifest.file_totals();
        self.report.files = files;
        self.report.bytes = bytes;
        self.report.generation = verified.generation();
        self.report.upserts = changes.upserts.len() as u64;
        self.report.deletes = changes.deletes.len() as u64;
        let commit = Commit {
            status: verified,
            manifest: manifest.clone(),
            live: stack.live.clone(),
            changes,
            standby_stopped,
        };
        self.state = State::Committing;
        self.standby = Standby::Committing;
        self.actions.push_back(TargetAction::Commit(commit));
    }

    /// The commit finished: the new generation is live, or the commit failed and the previous
    /// generation is live.
    pub fn handle_committed(&mut self, result: Result<u64, (Phase, String)>) {
        if self.state != State::Committing {
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
        if self.state != State::Committing {
            self.fail(Cause::PeerMisbehaved(reason.to_string()), true);
        }
    }

    /// The connection ended before the cycle did. A commit already under way goes on.
    pub fn handle_connection_lost(&mut self, reason: &str) {
        if self.state != State::Committing {
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
fn needs(live: &Manifest, stack: &StackState, want: &Manifest) -> Vec<Need> {
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
    for e in want.entries() {
        let EntryKind::File {
            hash,
            size,
            link_group,
        } = e.kind
        else {
            continue;
        };
        let live_here = live.get(&e.path);
        // A live file linked outside the stack is never written into, so neither a patch
        // against it nor its being already right counts: its content comes whole.
        let linked_outside = stack.outside_links.contains(&e.path);
        let patched_here = stack.staged_in_place.get(&hash) == Some(&e.path)
            && single_use(&hash)
            && !linked_outside;
        if stack.staged.contains(&hash)
            || patched_here
            || (!linked_outside
                && live_here
                    .and_then(Entry::file)
                    .is_some_and(|(_, h)| h == hash))
        {
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

fn short_name(msg: &SourceMsg) -> &'static str {
    match msg {
        SourceMsg::Hello { .. } => "Hello",
        SourceMsg::ManifestPart { .. } => "ManifestPart",
        SourceMsg::ManifestEnd { .. } => "ManifestEnd",
        SourceMsg::FileBegin { .. } => "FileBegin",
        SourceMsg::FileData { .. } => "FileData",
        SourceMsg::FileEnd { .. } => "FileEnd",
        SourceMsg::FileAbort { .. } => "FileAbort",
        SourceMsg::FinalPass => "FinalPass",
        SourceMsg::Flag(_) => "Flag",
        SourceMsg::Abort { .. } => "Abort",
    }
}
