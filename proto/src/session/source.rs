//! The source side of a cycle.
//!
//! ```text
//!  new ──► Hello ──► Welcome ─┬─ precopy ──► Scan(Precopy) ─► manifest ─► serve wants ─► PassDone ─┐
//!                            │                                                                    │
//!                            └──────────────────────────────────────┬──────────────────────────┘
//!                                                                   ▼
//!                StopStack ─► Scan(Final) ─► manifest ─► serve wants ─► PassDone
//!                ─► StartStack + Flag ─► Result ─► Done
//! ```
//! Once `StopStack` has been asked for, every way out of the cycle — success, error, a peer that
//! vanished — asks for `StartStack` before `Done`, so the source stack is never left stopped.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use ed25519_dalek::SigningKey;

use super::{Cause, CycleError, Failure, Violation};
use crate::delta::CheckedSignature;
use crate::flag::{SignedStatus, Status};
use crate::lineage::{Claim, LINEAGE_FILE};
use crate::manifest::{Changes, Entry, Hash, Manifest};
use crate::msg::{
    MANIFEST_PART_ENTRIES, Mode, Outcome, PROTOCOL_VERSION, Pass, Phase, PlanSummary, Replaced,
    SourceMsg, TargetMsg,
};
use crate::path::StackPath;

/// How many times a final pass is repeated when files changed under it (only with `stop = false`;
/// a stopped stack whose files change is an error).
const LIVE_FINAL_PASS_RETRIES: u32 = 3;

/// What the source side of one cycle is told at the start.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub stack: String,
    /// This host's certificate name.
    pub source_id: String,
    /// The target's certificate name, as authenticated by the connection.
    pub target_id: String,
    pub mode: Mode,
    /// Run a first pass while the stack is still up.
    pub precopy: bool,
    /// Stop the stack for the final pass (`false`: crash-consistent at best).
    pub stop_stack: bool,
    /// Allow an empty source tree (off: an empty tree would wipe the standby).
    pub allow_empty: bool,
    /// Largest share (0.0–1.0) of the target's files one commit may delete.
    pub max_delete: f64,
    /// What a service that Docker had to kill at its stop timeout means for the cycle.
    pub on_stop_timeout: OnStopTimeout,
    /// The history of this host's data, and whether the push replaces a diverged copy or
    /// hands the stack over (see [`crate::lineage`]). With [`Claim::hand_over`], once the
    /// target committed, the stack stays stopped here: the target's copy is the primary from
    /// then on. It is started again if the cycle fails.
    pub claim: Claim,
    /// The manifest this host last saw the target commit, and its generation (the driver's
    /// record, see [`crate::manifest::encode_file`]). When the target's `Welcome` names that
    /// generation, the first manifest goes as [`Changes`] against it; a target that holds
    /// another manifest asks for the whole one ([`TargetMsg::ResendManifest`]).
    pub base: Option<(u64, Arc<Manifest>)>,
}

/// What to do when stopping the stack for the final pass took Docker's kill: the service did not
/// exit within its stop timeout, so what it left on disk is crash-consistent only (a database
/// runs crash recovery on it, on both hosts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnStopTimeout {
    /// Ship the copy and report the killed services (result, log, alert, metrics).
    #[default]
    Warn,
    /// Refuse to ship a crash-consistent copy: the cycle fails, the stack is started again.
    Fail,
}

/// Work for the source driver.
#[derive(Debug)]
pub enum SourceAction {
    /// Scan the stack dir; answer with [`SourceSession::handle_scanned`].
    Scan { pass: Pass },
    /// Stop the stack (pre-stop hooks first); answer with [`SourceSession::handle_stack_stopped`],
    /// naming the services Docker had to kill at their stop timeout.
    StopStack,
    /// Start the containers that were running; answer with [`SourceSession::handle_stack_started`].
    StartStack,
    /// Stream this file on a data stream (`FileBegin`, `FileData`…, `FileEnd`, or `FileAbort`),
    /// as a delta against `basis` if there is one; answer with [`SourceSession::handle_file_sent`].
    SendFile {
        id: u32,
        path: StackPath,
        size: u64,
        hash: Hash,
        basis: Option<CheckedSignature>,
    },
    /// The cycle is over.
    Done(Result<SourceReport, CycleError>),
}

/// What a finished cycle did, as far as the source knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceReport {
    pub generation: u64,
    pub manifest_root: Option<Hash>,
    pub files: u64,
    pub bytes: u64,
    /// Files sent (all passes), and of those, how many as a delta.
    pub files_sent: u64,
    pub files_delta: u64,
    pub target_downtime_ms: Option<u64>,
    /// Dry run only.
    pub plan: Option<PlanSummary>,
    /// The stack was stopped for this cycle (and started again).
    pub stopped_stack: bool,
    /// Services of this stack that Docker had to kill at their stop timeout: the copy of their
    /// data is crash-consistent only.
    pub stop_killed: Vec<String>,
    /// Services of the standby that the target's Docker had to kill at their stop timeout.
    pub standby_killed: Vec<String>,
    /// The target's own tree the commit replaced, kept as a generation there.
    pub replaced: Option<Replaced>,
    /// A hand-over committed: the stack was left stopped here.
    pub handed_over: bool,
}

/// Where the cycle is, with what each step holds.
#[derive(Debug)]
enum State {
    AwaitWelcome,
    Stopping,
    Scanning(Pass),
    /// The manifest of `pass` went out; the target's wants are served from it.
    Serving {
        pass: Pass,
        manifest: Arc<Manifest>,
    },
    AwaitResult,
    /// The cycle is over, and waits for the stack to run again before it says so.
    Closing {
        outcome: Result<(), CycleError>,
    },
    Finished,
}

impl State {
    /// The state's name as protocol errors give it.
    fn name(&self) -> &'static str {
        match self {
            State::AwaitWelcome => "AwaitWelcome",
            State::Stopping => "Stopping",
            State::Scanning(Pass::Precopy) => "Scanning(Precopy)",
            State::Scanning(Pass::Final) => "Scanning(Final)",
            State::Serving {
                pass: Pass::Precopy,
                ..
            } => "Serving(Precopy)",
            State::Serving {
                pass: Pass::Final, ..
            } => "Serving(Final)",
            State::AwaitResult => "AwaitResult",
            State::Closing { .. } | State::Finished => "Finished",
        }
    }

    fn is_over(&self) -> bool {
        matches!(self, State::Closing { .. } | State::Finished)
    }
}

/// The source side of one cycle. See the module doc for the sequence.
#[derive(Debug)]
pub struct SourceSession {
    cfg: SourceConfig,
    key: SigningKey,
    state: State,
    messages: VecDeque<SourceMsg>,
    actions: VecDeque<SourceAction>,
    sending: HashSet<u32>,
    /// The stack is stopped and must be started before `Done`.
    stack_down: bool,
    /// A `StartStack` was asked for and not yet answered.
    starting: bool,
    /// Starting the stack again failed: whatever the target did, the cycle failed (the primary
    /// is down).
    start_failed: Option<CycleError>,
    final_retries: u32,
    report: SourceReport,
    /// The manifest the target holds that the next one may be sent against: the recorded
    /// committed one (from `Welcome` on, if the generation matched), then each manifest sent
    /// in this cycle once the target answered it.
    base: Option<Arc<Manifest>>,
    /// The final manifest the flag signed, once it went out (see
    /// [`SourceSession::signed_manifest`]).
    signed: Option<Arc<Manifest>>,
}

impl SourceSession {
    /// Starts a cycle; the first message (`Hello`) is ready at once.
    pub fn new(cfg: SourceConfig, flag_key: SigningKey) -> Self {
        let mut messages = VecDeque::new();
        messages.push_back(SourceMsg::Hello {
            version: PROTOCOL_VERSION,
            stack: cfg.stack.clone(),
            mode: cfg.mode,
            max_delete: cfg.max_delete,
        });
        messages.push_back(SourceMsg::Claim(cfg.claim));
        Self {
            cfg,
            key: flag_key,
            state: State::AwaitWelcome,
            messages,
            actions: VecDeque::new(),
            sending: HashSet::new(),
            stack_down: false,
            starting: false,
            start_failed: None,
            final_retries: 0,
            report: SourceReport::default(),
            base: None,
            signed: None,
        }
    }

    /// The next control message to send.
    pub fn poll_message(&mut self) -> Option<SourceMsg> {
        self.messages.pop_front()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// True once `Done` has been emitted.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    fn phase(&self) -> Phase {
        match self.state {
            State::AwaitWelcome => Phase::Hello,
            State::Stopping | State::Scanning(_) => Phase::Scan,
            State::Serving { .. } => Phase::Transfer,
            State::AwaitResult | State::Closing { .. } | State::Finished => Phase::Result,
        }
    }

    fn error(&self, phase: Phase, cause: Cause) -> CycleError {
        CycleError {
            stack: self.cfg.stack.clone(),
            peer: self.cfg.target_id.clone(),
            phase,
            cause,
        }
    }

    /// Ends the cycle with `cause`; tells the peer unless it was the peer that ended it.
    fn fail(&mut self, cause: Cause, tell_peer: bool) {
        if self.state.is_over() {
            return;
        }
        let err = self.error(self.phase(), cause);
        if tell_peer {
            self.messages.push_back(SourceMsg::Abort {
                phase: err.phase,
                reason: err.cause.to_string(),
            });
        }
        self.restart_stack();
        self.end(Err(err));
    }

    fn misbehaved(&mut self, violation: Violation) {
        self.fail(Cause::PeerMisbehaved(violation), true);
    }

    fn local(&mut self, failure: Failure) {
        self.fail(Cause::Local(failure), true);
    }

    fn restart_stack(&mut self) {
        if self.stack_down && !self.starting {
            self.starting = true;
            self.actions.push_back(SourceAction::StartStack);
        }
    }

    /// The cycle's outcome is known: say it once the stack runs again. A failed restart
    /// outranks a successful commit.
    fn end(&mut self, outcome: Result<(), CycleError>) {
        let outcome = match (outcome, &self.start_failed) {
            (Ok(()), Some(e)) => Err(e.clone()),
            (outcome, _) => outcome,
        };
        if self.starting {
            self.state = State::Closing { outcome };
        } else {
            self.state = State::Finished;
            let report = std::mem::take(&mut self.report);
            self.actions
                .push_back(SourceAction::Done(outcome.map(|()| report)));
        }
    }

    /// A control message from the target. `now` is the source clock in Unix seconds (it dates
    /// the flag).
    pub fn handle_message(&mut self, msg: TargetMsg, now: i64) {
        if self.state.is_over() {
            return;
        }
        let serving = match &self.state {
            State::Serving { pass, .. } => Some(*pass),
            _ => None,
        };
        match msg {
            TargetMsg::Refused(r) => self.fail(Cause::Refused(r), false),
            TargetMsg::Abort { phase, reason } => {
                self.fail(Cause::PeerAborted { phase, reason }, false)
            }
            TargetMsg::Welcome {
                version,
                last_generation,
            } if matches!(self.state, State::AwaitWelcome) => {
                if version != PROTOCOL_VERSION {
                    return self.misbehaved(Violation::Version {
                        target: version,
                        ours: PROTOCOL_VERSION,
                    });
                }
                let Some(generation) = last_generation.checked_add(1) else {
                    return self.misbehaved(Violation::GenerationsExhausted);
                };
                self.report.generation = generation;
                self.base = self
                    .cfg
                    .base
                    .take()
                    .filter(|(g, _)| *g == last_generation && last_generation > 0)
                    .map(|(_, m)| m);
                if self.cfg.mode == Mode::Sync && self.cfg.precopy {
                    self.scan(Pass::Precopy);
                } else {
                    self.stop_then_final_scan();
                }
            }
            TargetMsg::Want { id, path, basis } if serving.is_some() => {
                self.handle_want(id, path, basis)
            }
            TargetMsg::PassDone {
                pass: done,
                missing,
            } if serving == Some(done) => {
                self.sending.clear();
                self.pass_done(missing, now);
            }
            TargetMsg::Plan(plan)
                if serving == Some(Pass::Final) && self.cfg.mode == Mode::DryRun =>
            {
                self.report.plan = Some(plan);
                self.end(Ok(()));
            }
            TargetMsg::ResendManifest { pass } if serving == Some(pass) => {
                // The target does not hold the base: this pass and the rest go whole.
                self.base = None;
                if let State::Serving { manifest, .. } = &self.state {
                    let manifest = manifest.clone();
                    self.send_manifest(pass, &manifest);
                }
            }
            TargetMsg::Result(result) if matches!(self.state, State::AwaitResult) => {
                if result.generation != self.report.generation {
                    return self.misbehaved(Violation::ResultGeneration {
                        got: result.generation,
                        expected: self.report.generation,
                    });
                }
                let outcome = match result.outcome {
                    Outcome::Committed {
                        target_downtime_ms,
                        standby_killed,
                        replaced,
                    } => {
                        self.report.target_downtime_ms = Some(target_downtime_ms);
                        self.report.standby_killed = standby_killed;
                        self.report.replaced = replaced;
                        self.report.handed_over = self.cfg.claim.hand_over && self.stack_down;
                        Ok(())
                    }
                    Outcome::Failed { phase, reason } => {
                        // A hand-over that did not commit: this host stays the primary.
                        self.restart_stack();
                        Err(self.error(phase, Cause::CommitFailed(reason)))
                    }
                };
                self.end(outcome);
            }
            msg => self.misbehaved(Violation::UnexpectedMessage {
                message: msg.name(),
                state: self.state.name(),
            }),
        }
    }

    fn stop_then_final_scan(&mut self) {
        if self.cfg.mode == Mode::Sync {
            // The target stops its standby now, while this side stops and scans.
            self.messages.push_back(SourceMsg::FinalPass);
        }
        if self.cfg.mode == Mode::Sync && self.cfg.stop_stack {
            self.state = State::Stopping;
            self.stack_down = true;
            self.report.stopped_stack = true;
            self.actions.push_back(SourceAction::StopStack);
        } else {
            self.scan(Pass::Final);
        }
    }

    fn scan(&mut self, pass: Pass) {
        self.state = State::Scanning(pass);
        self.actions.push_back(SourceAction::Scan { pass });
    }

    /// The stack is stopped, with the services Docker had to kill at their stop timeout (or it
    /// could not be stopped).
    pub fn handle_stack_stopped(&mut self, result: Result<Vec<String>, String>) {
        if !matches!(self.state, State::Stopping) {
            return;
        }
        match result {
            Ok(killed) if !killed.is_empty() && self.cfg.on_stop_timeout == OnStopTimeout::Fail => {
                self.fail(Cause::StopKilled { services: killed }, true)
            }
            Ok(killed) => {
                self.report.stop_killed = killed;
                self.scan(Pass::Final);
            }
            Err(e) => self.local(Failure::StopStack(e)),
        }
    }

    /// The stack was started again after the cycle.
    pub fn handle_stack_started(&mut self, result: Result<(), String>) {
        if !self.starting {
            return;
        }
        self.starting = false;
        self.stack_down = false;
        if let Err(e) = result {
            self.start_failed =
                Some(self.error(Phase::Result, Cause::Local(Failure::StartStack(e))));
        }
        // Asked for when the cycle ended (`Closing`), or once the final pass was done, while
        // the target commits (`AwaitResult`: a start that failed then turns its result into
        // this failure, see `end`).
        if matches!(self.state, State::Closing { .. })
            && let State::Closing { outcome } = std::mem::replace(&mut self.state, State::Finished)
        {
            self.end(outcome);
        }
    }

    /// A scan finished.
    pub fn handle_scanned(&mut self, pass: Pass, result: Result<Manifest, String>) {
        if !matches!(self.state, State::Scanning(p) if p == pass) {
            return;
        }
        let manifest = match result {
            Ok(m) => m,
            Err(e) => return self.local(Failure::Scan(e)),
        };
        // The lineage file alone is no data: an emptied data dir still holds it.
        let empty = manifest
            .entries()
            .iter()
            .all(|e| e.path.as_bytes() == LINEAGE_FILE.as_bytes());
        if empty && !self.cfg.allow_empty {
            return self.fail(Cause::EmptySource, true);
        }
        let root = self.send_manifest(pass, &manifest);
        if pass == Pass::Final {
            let (files, bytes) = manifest.file_totals();
            self.report.files = files;
            self.report.bytes = bytes;
            self.report.manifest_root = Some(root);
        }
        self.state = State::Serving {
            pass,
            manifest: Arc::new(manifest),
        };
    }

    /// Queues `manifest` for the target: as changes against the base the target holds when
    /// there is one and that is shorter, else whole. Returns its root.
    fn send_manifest(&mut self, pass: Pass, manifest: &Manifest) -> Hash {
        let root = manifest.root();
        let changes = self
            .base
            .as_ref()
            .map(|base| (base.root(), manifest.changes_from(base)))
            .filter(|(_, c)| c.len() < manifest.len());
        match changes {
            Some((base, Changes { upsert, remove })) => {
                // Parts of at most MANIFEST_PART_ENTRIES items, entries first, then paths.
                let mut upsert = upsert.into_iter().peekable();
                let mut remove = remove.into_iter().peekable();
                loop {
                    let up: Vec<Entry> = upsert.by_ref().take(MANIFEST_PART_ENTRIES).collect();
                    let rm: Vec<StackPath> = remove
                        .by_ref()
                        .take(MANIFEST_PART_ENTRIES - up.len())
                        .collect();
                    self.messages.push_back(SourceMsg::ManifestChanges {
                        base,
                        upsert: up,
                        remove: rm,
                    });
                    if upsert.peek().is_none() && remove.peek().is_none() {
                        break;
                    }
                }
            }
            None => {
                for part in manifest.entries().chunks(MANIFEST_PART_ENTRIES) {
                    self.messages.push_back(SourceMsg::ManifestPart {
                        entries: part.to_vec(),
                    });
                }
            }
        }
        self.messages.push_back(SourceMsg::ManifestEnd {
            pass,
            entries: manifest.len() as u64,
            root,
        });
        root
    }

    /// The manifest the flag signed, once the final pass is done: what the target commits.
    /// The driver records it as the next cycle's base once the result says it was committed.
    pub fn signed_manifest(&self) -> Option<&Arc<Manifest>> {
        self.signed.as_ref()
    }

    fn handle_want(&mut self, id: u32, path: StackPath, basis: Option<Vec<u8>>) {
        if self.cfg.mode == Mode::DryRun {
            return self.misbehaved(Violation::WantInDryRun);
        }
        let State::Serving { pass, manifest } = &self.state else {
            return;
        };
        let Some(entry) = manifest.get(&path) else {
            let pass = *pass;
            return self.misbehaved(Violation::WantNotInManifest { path, pass });
        };
        let Some((size, hash)) = entry.file() else {
            return self.misbehaved(Violation::WantNotAFile { path });
        };
        if !self.sending.insert(id) {
            return self.misbehaved(Violation::WantIdReused { id });
        }
        let basis = match basis.map(CheckedSignature::parse).transpose() {
            Ok(b) => b,
            Err(e) => {
                return self.misbehaved(Violation::BadSignature {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        self.report.files_sent += 1;
        if basis.is_some() {
            self.report.files_delta += 1;
        }
        self.actions.push_back(SourceAction::SendFile {
            id,
            path,
            size,
            hash,
            basis,
        });
    }

    /// The driver finished streaming one file (or gave up on it and sent `FileAbort`).
    pub fn handle_file_sent(&mut self, id: u32, result: Result<(), String>) {
        if !self.sending.remove(&id) {
            return;
        }
        let final_pass = matches!(
            self.state,
            State::Serving {
                pass: Pass::Final,
                ..
            }
        );
        if let (Err(e), true) = (result, final_pass) {
            // In a pre-copy pass a file may vanish under a running stack; the final pass will
            // send what is there then. In the final pass, a file we cannot read ends the cycle.
            self.local(Failure::ReadFinal(e));
        }
    }

    fn pass_done(&mut self, missing: Vec<StackPath>, now: i64) {
        let (pass, manifest) = match &self.state {
            State::Serving { pass, manifest } => (*pass, manifest.clone()),
            _ => return,
        };
        // The target planned this manifest: it holds it for the next one to be sent against.
        self.base = Some(manifest.clone());
        match pass {
            Pass::Precopy => self.stop_then_final_scan(),
            Pass::Final if !missing.is_empty() => {
                if !self.cfg.stop_stack && self.final_retries < LIVE_FINAL_PASS_RETRIES {
                    self.final_retries += 1;
                    self.scan(Pass::Final);
                } else {
                    let count = missing.len();
                    let first = missing.into_iter().next().expect("missing is not empty");
                    self.fail(Cause::ChangedDuringFinalPass { count, first }, true);
                }
            }
            Pass::Final => {
                let status = Status {
                    stack: self.cfg.stack.clone(),
                    generation: self.report.generation,
                    history: self.cfg.claim.history,
                    manifest_root: manifest.root(),
                    source_id: self.cfg.source_id.clone(),
                    target_id: self.cfg.target_id.clone(),
                    created_at: now,
                };
                // The last byte is staged on the target: the source's downtime ends here, before
                // the target commits. A hand-over waits for the result instead.
                if !self.cfg.claim.hand_over {
                    self.restart_stack();
                }
                self.messages
                    .push_back(SourceMsg::Flag(SignedStatus::sign(status, &self.key)));
                self.signed = Some(manifest);
                self.state = State::AwaitResult;
            }
        }
    }

    /// A control message from the target did not decode: the peer broke the protocol. The
    /// target is told why; the stack is started again if it is down.
    pub fn handle_malformed(&mut self, reason: &str) {
        self.misbehaved(Violation::Malformed(reason.to_string()));
    }

    /// The connection ended (closed, timed out, reset) before the cycle did.
    pub fn handle_connection_lost(&mut self, reason: &str) {
        // A QUIC close reason is the peer's text.
        let reason = crate::text::escape_controls(reason).into_owned();
        self.fail(Cause::ConnectionLost(reason), false);
    }

    /// The driver is shutting down (SIGTERM): end the cycle, restarting the stack if it is down;
    /// once the flag is out, the cycle waits for the target's result instead.
    pub fn handle_shutdown(&mut self) {
        // Once the flag is out the target commits whatever this side does, and the stack runs
        // again already (unless it is handed over): wait for the target's answer, so that what
        // this host records is what happened, not a failure that was not one.
        if matches!(self.state, State::AwaitResult) {
            return;
        }
        self.local(Failure::ShuttingDown);
    }
}
