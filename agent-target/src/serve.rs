//! The target's network side: accepts sources over mutual-TLS QUIC and drives one
//! [`TargetSession`] per connection against the stack's [`StackStore`].
//!
//! The session decides; this module does what it asks. Control messages travel on the first
//! bidirectional stream after the hello; each file arrives on its own unidirectional stream
//! (`FileBegin`, `FileData`…, `FileEnd` or `FileAbort`) and is rebuilt in staging on a blocking
//! thread. A connection lost before the flag leaves staging in place (the next cycle resumes);
//! once the flag verified, the commit runs to the end even if the source is gone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use stackclone_certs::{Identity, REFUSED, Role, Trust, TrustError};
use stackclone_common::alert::Alert;
use stackclone_common::control::StackControl;
use stackclone_common::docker::ComposeConfig;
use stackclone_common::metrics::CycleStats;
use stackclone_common::net::{self, ControlEnd};
use stackclone_common::ops::Ops;
use stackclone_proto::delta::{FileReceiver, SignatureBuilder, Verified};
use stackclone_proto::msg::{Phase, Refusal, SourceMsg};
use stackclone_proto::path::StackPath;
use stackclone_proto::session::{
    Cause, CycleError, StackPolicy, StackState, StageOutcome, TargetAction, TargetConfig,
    TargetReport, TargetSession,
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::staleness::Staleness;
use crate::standby;
use crate::store::{
    BasisFile, LocalStage, PatchFile, StackStore, StagingFile, StoreConfig, StoreError,
};

/// A cycle whose source sends nothing (no control message, no file data) for this long is ended:
/// an authenticated peer must not hold a stack's lock forever. A commit under way is exempt, and
/// so is the time the target spends scanning its own live dir (the source may be waiting for
/// that scan, having sent its whole manifest).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an admitted source may take to open its control stream (a real one takes
/// milliseconds); after that the connection is closed.
pub const CONTROL_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read at a time to compute a basis signature.
const SIGNATURE_READ: usize = 1 << 20;
/// Signatures computed at once per cycle: the session may ask for many; each holds a read
/// buffer and reads a whole basis file.
const PARALLEL_SIGNATURES: usize = 4;

/// What the target serves for one stack (from its config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackServe {
    pub stack: String,
    pub store: StoreConfig,
    pub allow: Vec<String>,
    /// The Compose project to stop, start and health-check around a commit; `None` for a
    /// data-only stack.
    pub compose: Option<ComposeConfig>,
    /// Roll back to the previous generation when the stack does not come up healthy.
    pub auto_rollback: bool,
    /// The staleness watch: alert when no generation was committed for this long.
    pub max_age: Option<Duration>,
}

/// The stacks a target serves, by name: one immutable snapshot, replaced whole on reload.
pub type Stacks = HashMap<String, StackServe>;

/// Agent-wide state of a running target.
///
/// The stack set is a snapshot behind a lock: a config reload swaps in a new one
/// ([`replace_stacks`](Self::replace_stacks)), new pushes see it at once, and a cycle keeps the
/// [`StackServe`] it loaded its stack with until it ends, whatever reloads happen meanwhile.
#[derive(Debug)]
pub struct TargetCtx {
    pub name: String,
    pub trust: Trust,
    /// Alerts and metrics.
    pub ops: Arc<Ops>,
    /// When each stack last committed; the staleness watch.
    pub staleness: Staleness,
    max_skew_secs: AtomicI64,
    stacks: RwLock<Arc<Stacks>>,
    /// Stacks with a cycle (or the daemon's recovery) under way, one at a time per stack, and
    /// who holds each.
    busy: Mutex<HashMap<String, Holder>>,
    /// Woken whenever a stack is released.
    released: tokio::sync::Notify,
    /// Set once the target is shutting down: cycles still receiving end without a commit.
    shutdown: watch::Sender<bool>,
    /// When a refusal of each kind and address was last alerted (see [`TargetCtx::refused`]).
    refusals_alerted: Mutex<HashMap<String, Instant>>,
}

/// A peer refused again for the same reason from the same address is alerted at most this
/// often (every refusal is logged).
const REFUSAL_ALERT_EVERY: Duration = Duration::from_secs(3600);

impl TargetCtx {
    pub fn new(
        identity: &Identity,
        trust: Trust,
        max_skew_secs: i64,
        stacks: Vec<StackServe>,
        ops: Arc<Ops>,
    ) -> Self {
        Self {
            name: identity.name().to_string(),
            trust,
            ops,
            staleness: Staleness::new(SystemTime::now()),
            max_skew_secs: AtomicI64::new(max_skew_secs),
            stacks: RwLock::new(Arc::new(by_name(stacks))),
            busy: Mutex::new(Default::default()),
            released: tokio::sync::Notify::new(),
            shutdown: watch::Sender::new(false),
            refusals_alerted: Mutex::default(),
        }
    }

    /// Logs and alerts a peer refused at the handshake or the hello: a certificate that is
    /// revoked, expired, of another CA or of the wrong role, or a source presenting another
    /// flag key than the one pinned for its name. A connection that merely broke or timed out
    /// is not a refusal. Returns whether `err` was one.
    fn refused(&self, remote: std::net::SocketAddr, err: &TrustError) -> bool {
        let kind = match err {
            TrustError::Revoked { .. } => "revoked",
            TrustError::FlagKeyChanged { .. } => "flag key changed",
            TrustError::WrongRole { .. } => "wrong role",
            TrustError::NoPeerCertificate => "no certificate",
            TrustError::UnknownCa { .. } => "unknown CA",
            TrustError::CertificateExpired { .. } | TrustError::CertificateNotYetValid { .. } => {
                "certificate not valid now"
            }
            // The verifier's refusal during the TLS handshake, as QUIC reports it.
            TrustError::Handshake { .. } => "TLS handshake refused",
            _ => return false,
        };
        warn!(%remote, reason = kind, error = %err, "refused a peer");
        let key = format!("{kind} {}", remote.ip());
        let due = match self.refusals_alerted.lock() {
            Ok(mut seen) => {
                let now = Instant::now();
                seen.retain(|_, at| now.duration_since(*at) < REFUSAL_ALERT_EVERY);
                seen.insert(key, now).is_none()
            }
            Err(_) => true,
        };
        if due {
            self.ops.alert_in_background(Alert::peer_refused(
                &self.ops.host,
                &remote.to_string(),
                &format!("refused a connection from {remote}: {err}"),
            ));
        }
        true
    }

    /// The stacks served right now (a snapshot; a reload does not change it).
    pub fn stacks(&self) -> Arc<Stacks> {
        self.stacks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The settings of `stack`, if it is served right now.
    pub fn stack(&self, stack: &str) -> Option<StackServe> {
        self.stacks().get(stack).cloned()
    }

    /// Serves `stacks` from now on (a reload); returns the set it replaced. Cycles under way
    /// keep the settings they started with.
    pub fn replace_stacks(&self, stacks: Vec<StackServe>) -> Arc<Stacks> {
        let mut current = self.stacks.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, Arc::new(by_name(stacks)))
    }

    /// The largest clock difference accepted in a flag, for cycles starting now.
    pub fn max_skew_secs(&self) -> i64 {
        self.max_skew_secs.load(Ordering::Relaxed)
    }

    pub fn set_max_skew_secs(&self, secs: i64) {
        self.max_skew_secs.store(secs, Ordering::Relaxed);
    }

    /// Stacks with a cycle under way.
    pub fn busy_stacks(&self) -> Vec<String> {
        let mut busy: Vec<String> = self
            .busy
            .lock()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default();
        busy.sort();
        busy
    }

    /// Whether the target is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once the target starts shutting down (at once if it already is, or if the
    /// context is gone).
    pub fn shutting_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }

    /// Holds `stack` for work that is not a source's session (the daemon's recovery), if no one
    /// holds it.
    pub(crate) fn claim_idle(self: &Arc<Self>, stack: &str) -> Option<BusyGuard> {
        self.try_claim(stack, None).ok()
    }

    /// Holds `stack` for a cycle of `peer`. A stack held by another source is busy. One held by
    /// an earlier session of the same source (a source that died, or lost its connection,
    /// leaves its session behind until the QUIC idle timeout) is superseded: that session is
    /// told to end (it starts the standby again if it stopped it; a commit under way finishes
    /// first), and this one takes the stack as soon as it is released, waiting at most
    /// [`SUPERSEDE_WAIT`]. The daemon's recovery is waited for the same way.
    async fn claim_for(self: &Arc<Self>, stack: &str, peer: &str) -> Result<BusyGuard, Refusal> {
        let busy = || Refusal::Busy {
            stack: stack.to_string(),
        };
        let deadline = tokio::time::Instant::now() + SUPERSEDE_WAIT;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.try_claim(stack, Some(peer)) {
                Ok(guard) => return Ok(guard),
                Err(Some(other)) if other != peer => return Err(busy()),
                Err(_) => {}
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(busy());
            }
        }
    }

    /// Takes `stack` for `peer` (`None`: the daemon's own work); if it is held, tells an
    /// earlier session of the same peer to end, and says who holds it (`Some(peer)` for a
    /// session, `None` for the daemon).
    fn try_claim(
        self: &Arc<Self>,
        stack: &str,
        peer: Option<&str>,
    ) -> Result<BusyGuard, Option<String>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holder) = busy.get(stack) {
            if peer.is_some() && holder.peer.as_deref() == peer && !*holder.supersede.borrow() {
                info!(%stack, peer = ?peer, "a new session of the same source supersedes the one holding the stack");
                holder.supersede.send_replace(true);
            }
            return Err(holder.peer.clone());
        }
        let (supersede, superseded) = watch::channel(false);
        busy.insert(
            stack.to_string(),
            Holder {
                peer: peer.map(str::to_owned),
                supersede,
            },
        );
        Ok(BusyGuard {
            ctx: self.clone(),
            stack: stack.to_string(),
            superseded,
        })
    }
}

/// How long a new session of a source waits for the earlier session it supersedes to release
/// the stack (which a commit under way does only once it has finished, health check included).
pub const SUPERSEDE_WAIT: Duration = Duration::from_secs(600);

/// Who holds a busy stack.
#[derive(Debug)]
struct Holder {
    /// The source whose session holds it; `None` for the daemon's own work.
    peer: Option<String>,
    /// Set when a newer session of the same source wants the stack.
    supersede: watch::Sender<bool>,
}

fn by_name(stacks: Vec<StackServe>) -> Stacks {
    stacks.into_iter().map(|s| (s.stack.clone(), s)).collect()
}

/// Marks a stack busy until dropped.
#[derive(Debug)]
pub(crate) struct BusyGuard {
    ctx: Arc<TargetCtx>,
    stack: String,
    superseded: watch::Receiver<bool>,
}

impl BusyGuard {
    /// Resolves once a newer session of the same source wants the stack.
    async fn superseded(&mut self) {
        let _ = self.superseded.wait_for(|s| *s).await;
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.ctx.busy.lock() {
            busy.remove(&self.stack);
        }
        self.ctx.released.notify_waiters();
    }
}

/// Accepts connections until `shutdown` resolves, then waits for cycles that are committing.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<TargetCtx>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let ctx = ctx.clone();
                let remote = incoming.remote_address();
                tasks.spawn(
                    async move {
                        if let Err(e) = handle_connection(ctx, incoming).await {
                            warn!(error = %e, "connection ended with an error");
                        }
                    }
                    .instrument(info_span!("peer", %remote)),
                );
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    // Stop taking connections; cycles not yet committing end without touching live data
    // (their staging stays for the next cycle); a commit under way runs to its end.
    let busy = ctx.busy_stacks();
    if busy.is_empty() {
        info!("shutting down: no cycle under way");
    } else {
        info!(
            stacks = ?busy,
            "shutting down: cycles still receiving end without touching live data; a commit \
             under way finishes first"
        );
    }
    ctx.shutdown.send_replace(true);
    endpoint.close(0u32.into(), b"target shutting down");
    while tasks.join_next().await.is_some() {}
}

/// Events from helper tasks back to the session loop.
enum Event {
    /// The stack is held for this cycle (or busy).
    Claimed(Result<BusyGuard, Refusal>),
    /// The store is open at this generation, with its state dir; the live dir is being scanned.
    Opened(u64, PathBuf),
    Stack(Result<(StackStore, StackState), Refusal>),
    /// The standby's stack stopped (the services Docker had to kill), or did not; the control
    /// that stopped it, if there is one, for starting it again.
    Stopped {
        control: Option<Arc<dyn StackControl>>,
        result: Result<Vec<String>, String>,
    },
    StoppedScan(Result<StackState, String>),
    Started(Result<(), String>),
    Signature {
        id: u32,
        result: Result<Vec<u8>, String>,
    },
    Staged {
        id: u32,
        outcome: StageOutcome,
    },
    Committed {
        result: Result<u64, (Phase, String)>,
        store: StackStore,
    },
}

/// The standby's stack as this connection's cycle handles it.
#[derive(Default)]
struct StandbyStack {
    /// What stopped it, once a stop returned.
    control: Option<Arc<dyn StackControl>>,
    /// When the stop was asked for: the target's downtime begins here.
    stopped_at: Option<Instant>,
    /// A stop is under way.
    stopping: bool,
    /// The session asked to start it while the stop was still under way.
    start_after_stop: bool,
}

async fn handle_connection(ctx: Arc<TargetCtx>, incoming: quinn::Incoming) -> anyhow::Result<()> {
    let remote = incoming.remote_address();
    let (conn, admission) = match stackclone_certs::accept(incoming, &ctx.trust, Role::Source).await
    {
        Ok(accepted) => accepted,
        Err(e) if ctx.refused(remote, &e) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let started = Instant::now();
    let peer = admission.peer.name.clone();
    // An admitted source opens its control stream at once. One that does not is not allowed to
    // hold the connection (QUIC keep-alives would keep it open forever).
    let (mut ctl_send, mut ctl_recv) = match tokio::time::timeout(
        CONTROL_STREAM_TIMEOUT,
        conn.accept_bi(),
    )
    .await
    {
        Ok(stream) => stream?,
        Err(_) => {
            warn!(%peer, secs = CONTROL_STREAM_TIMEOUT.as_secs(), "an admitted source opened no control stream; closing the connection");
            conn.close(REFUSED, b"no control stream");
            return Ok(());
        }
    };
    let mut session = TargetSession::new(TargetConfig {
        target_id: ctx.name.clone(),
        peer: peer.clone(),
        peer_flag_key: admission.peer.flag_key,
        max_skew_secs: ctx.max_skew_secs(),
    });
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Result<SourceMsg, ControlEnd>>();
    let reader = tokio::spawn(async move {
        loop {
            let msg = match net::recv::<SourceMsg>(&mut ctl_recv).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(ControlEnd::of(Ok(()))),
                Err(e) => Err(ControlEnd::of(Err(e))),
            };
            let end = msg.is_err();
            if ctl_tx.send(msg).is_err() || end {
                return;
            }
        }
    });

    // Set once the stack is loaded: the store (shared with the data streams) and what the
    // session asked to receive, by id.
    let store: Arc<Mutex<Option<StackStore>>> = Arc::new(Mutex::new(None));
    let wanted: Arc<Mutex<HashMap<u32, Wanted>>> = Arc::default();
    let mut guard: Option<BusyGuard> = None;
    let mut superseded = false;
    // The stack's settings as the cycle loaded it: a reload meanwhile changes the next cycle.
    let mut served: Option<StackServe> = None;
    let mut state_path: Option<PathBuf> = None;
    let mut standby = StandbyStack::default();
    // The generation handed to a commit, once one was.
    let mut committing: Option<u64> = None;
    let received = Arc::new(AtomicU64::new(0));
    let data = tokio::spawn(accept_files(
        conn.clone(),
        store.clone(),
        wanted.clone(),
        events_tx.clone(),
        received.clone(),
    ));
    let signatures = Arc::new(tokio::sync::Semaphore::new(PARALLEL_SIGNATURES));
    let mut watchdog = tokio::time::interval(Duration::from_secs(5));
    let mut last_progress = (Instant::now(), 0u64);

    let mut link_up = true;
    let mut reading = true;
    let stop = ctx.shutting_down();
    tokio::pin!(stop);
    let mut stopping = false;
    let outcome: Result<TargetReport, CycleError> = loop {
        let mut done = None;
        while let Some(action) = session.poll_action() {
            match action {
                TargetAction::LookupStack { stack } => match ctx.stacks().get(&stack) {
                    None => session.handle_policy(Err(Refusal::UnknownStack { stack })),
                    Some(serve) => session.handle_policy(Ok(StackPolicy {
                        allow: serve.allow.clone(),
                    })),
                },
                TargetAction::LoadStack { stack } => match ctx.stack(&stack) {
                    None => session.handle_stack(Err(Refusal::UnknownStack { stack })),
                    Some(serve) => {
                        served = Some(serve);
                        let (ctx, peer, tx) = (ctx.clone(), peer.clone(), events_tx.clone());
                        tokio::spawn(async move {
                            let _ = tx.send(Event::Claimed(ctx.claim_for(&stack, &peer).await));
                        });
                    }
                },
                TargetAction::StopStack => {
                    standby.stopping = true;
                    standby.stopped_at = Some(Instant::now());
                    let (serve, path) = (served.clone(), state_path.clone());
                    let tx = events_tx.clone();
                    tokio::spawn(async move {
                        let (control, result) = match (serve, path) {
                            (Some(serve), Some(path)) => standby::stop(&serve, &path).await,
                            _ => (None, Err("the stack is not loaded".to_string())),
                        };
                        let result = result.map(|r| r.killed_services());
                        let _ = tx.send(Event::Stopped { control, result });
                    });
                }
                TargetAction::ScanStopped => {
                    let (store, tx) = (store.clone(), events_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let scanned = with_store(&store, |s| {
                            let started = Instant::now();
                            let state = stack_state(s);
                            debug!(
                                ms = started.elapsed().as_millis() as u64,
                                "stopped standby scanned"
                            );
                            state
                        });
                        let _ = tx.send(Event::StoppedScan(scanned));
                    });
                }
                TargetAction::StartStack => {
                    if standby.stopping {
                        standby.start_after_stop = true;
                    } else {
                        start_standby(&standby, &events_tx);
                    }
                }
                TargetAction::Signature { id, basis } => {
                    let (store, tx) = (store.clone(), events_tx.clone());
                    let permits = signatures.clone();
                    tokio::spawn(async move {
                        let _permit = permits.acquire_owned().await;
                        let result = tokio::task::spawn_blocking(move || signature(&store, &basis))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()));
                        let _ = tx.send(Event::Signature { id, result });
                    });
                }
                TargetAction::StageLocal { id, from, hash } => {
                    let (store, tx) = (store.clone(), events_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let outcome = match with_store(&store, |s| s.stage_local(&from, hash)) {
                            Ok(LocalStage::Staged(v)) => StageOutcome::Staged(v),
                            Ok(LocalStage::Mismatch) => StageOutcome::Mismatch,
                            Err(e) => StageOutcome::Failed(e.to_string()),
                        };
                        let _ = tx.send(Event::Staged { id, outcome });
                    });
                }
                TargetAction::Receive {
                    id,
                    path,
                    basis,
                    in_place,
                } => {
                    if let Ok(mut w) = wanted.lock() {
                        w.insert(
                            id,
                            Wanted {
                                path,
                                basis,
                                in_place,
                            },
                        );
                    }
                }
                TargetAction::Commit(commit) => {
                    let taken = store.lock().ok().and_then(|mut s| s.take());
                    let tx = events_tx.clone();
                    match taken {
                        None => session.handle_committed(Err((
                            Phase::Commit,
                            "the stack store is not open".into(),
                        ))),
                        Some(st) => {
                            committing = Some(commit.generation());
                            let serve = served.clone();
                            let stopped = standby.control.clone().zip(standby.stopped_at);
                            let bytes_received = received.load(Ordering::Relaxed);
                            tokio::spawn(async move {
                                let (result, store) = match serve {
                                    Some(serve) => {
                                        standby::commit_stack(
                                            st,
                                            commit,
                                            &serve,
                                            stopped,
                                            bytes_received,
                                        )
                                        .await
                                    }
                                    None => (
                                        Err((Phase::Commit, "stack no longer configured".into())),
                                        st,
                                    ),
                                };
                                let _ = tx.send(Event::Committed { result, store });
                            });
                        }
                    }
                }
                TargetAction::Done(result) => done = Some(result),
            }
        }
        // Messages after actions: a `Want` must never reach the source before its `Receive`
        // is registered here, or the file's stream could arrive unrecognised.
        while let Some(msg) = session.poll_message() {
            if link_up && let Err(e) = net::send(&mut ctl_send, &msg).await {
                link_up = false;
                session.handle_connection_lost(&e.to_string());
            }
        }
        if let Some(result) = done {
            while let Some(msg) = session.poll_message() {
                if link_up {
                    let _ = net::send(&mut ctl_send, &msg).await;
                }
            }
            break result;
        }
        tokio::select! {
            Some(ev) = events.recv() => match ev {
                Event::Claimed(Ok(g)) => {
                    guard = Some(g);
                    let tx = events_tx.clone();
                    let Some(serve) = served.clone() else { continue };
                    tokio::task::spawn_blocking(move || {
                        let opened = Instant::now();
                        let loaded = open_stack(&serve).and_then(|store| {
                            let _ = tx.send(Event::Opened(
                                store.generation_base(),
                                store.state_path().to_path_buf(),
                            ));
                            scan_stack(store, opened)
                        });
                        let _ = tx.send(Event::Stack(loaded));
                    });
                }
                Event::Claimed(Err(refusal)) => session.handle_stack(Err(refusal)),
                Event::Opened(generation, path) => {
                    state_path = Some(path);
                    session.handle_opened(generation);
                }
                Event::Stack(Ok((st, state))) => {
                    last_progress.0 = Instant::now();
                    if let Ok(mut s) = store.lock() {
                        *s = Some(st);
                    }
                    session.handle_stack(Ok(state));
                }
                Event::Stack(Err(refusal)) => session.handle_stack(Err(refusal)),
                Event::Stopped { control, result } => {
                    last_progress.0 = Instant::now();
                    standby.stopping = false;
                    standby.control = control;
                    let stack = session.stack().to_string();
                    match &result {
                        Ok(killed) => {
                            debug!(%stack, "standby stopped for the final pass");
                            report_killed(&ctx, &stack, &peer, killed);
                        }
                        Err(e) => warn!(%stack, error = %e, "stopping the standby failed"),
                    }
                    session.handle_stack_stopped(result);
                    if std::mem::take(&mut standby.start_after_stop) {
                        start_standby(&standby, &events_tx);
                    }
                }
                Event::StoppedScan(result) => {
                    last_progress.0 = Instant::now();
                    session.handle_stopped_scan(result);
                }
                Event::Started(result) => {
                    if let Err(e) = &result {
                        let stack = session.stack().to_string();
                        warn!(%stack, error = %e, "the cycle ended without a commit, and bringing the standby up again failed");
                        ctx.ops.alert_in_background(
                            Alert::failure(&ctx.ops.host, &stack, "start", &format!(
                                "the cycle ended without a commit, and bringing the standby's \
                                 stack up again on the live data (generation unchanged) failed: {e}"
                            ))
                            .with_peer(&peer),
                        );
                    }
                    session.handle_stack_started(result);
                }
                Event::Signature { id, result } => session.handle_signature(id, result),
                Event::Staged { id, outcome } => session.handle_staged(id, outcome),
                Event::Committed { result, store: st } => {
                    if let Ok(mut s) = store.lock() {
                        *s = Some(st);
                    }
                    session.handle_committed(result);
                }
            },
            Some(msg) = ctl_rx.recv(), if link_up && reading => {
                last_progress.0 = Instant::now();
                match msg {
                    Ok(m) => session.handle_message(m, unix_now()),
                    // The peer is still there to be told why its cycle ended.
                    Err(ControlEnd::Malformed(e)) => {
                        reading = false;
                        session.handle_malformed(&e);
                    }
                    Err(ControlEnd::Lost(e)) => {
                        link_up = false;
                        // Our own shutdown closed it: say so rather than "connection closed".
                        let e = if ctx.is_shutting_down() {
                            "the target is shutting down".to_string()
                        } else {
                            e
                        };
                        session.handle_connection_lost(&e);
                    }
                }
            },
            () = &mut stop, if !stopping => {
                // A commit under way goes on (the session ignores this then); anything earlier
                // ends here, before live data was touched.
                stopping = true;
                session.handle_connection_lost("the target is shutting down");
            },
            () = async { if let Some(g) = guard.as_mut() { g.superseded().await } },
                if guard.is_some() && !superseded => {
                // A commit under way goes on (the session ignores this then).
                superseded = true;
                session.handle_connection_lost("superseded by a newer session of the same source");
            },
            _ = watchdog.tick() => {
                let bytes = received.load(Ordering::Relaxed);
                if bytes != last_progress.1 {
                    last_progress = (Instant::now(), bytes);
                } else if !session.is_committing()
                    && !session.is_waiting_on_driver()
                    && last_progress.0.elapsed() > STALL_TIMEOUT
                {
                    session.handle_connection_lost(&format!(
                        "no progress from the source for {} s",
                        STALL_TIMEOUT.as_secs()
                    ));
                }
            },
        }
    };
    reader.abort();
    data.abort();
    let _ = ctl_send.finish();
    let stack = session.stack().to_string();
    let record_error = |e: &str| {
        if let Ok(mut s) = store.lock()
            && let Some(st) = s.as_mut()
        {
            let _ = st.record_cycle(|r| r.last_error = Some(e.to_string()));
        }
    };
    match &outcome {
        Ok(report) => info!(
            %stack, %peer,
            generation = report.generation,
            files = report.files,
            files_received = report.files_received,
            target_downtime_ms = report.target_downtime_ms,
            standby_killed = ?report.standby_killed,
            dry_run = report.dry_run,
            "cycle done"
        ),
        Err(e) if ctx.is_shutting_down() && committing.is_none() => {
            info!(%stack, %peer, phase = %e.phase, "cycle ended by shutdown before its commit; live data untouched, staging kept for the next cycle");
            record_error(&e.to_string());
        }
        Err(e) => {
            warn!(%stack, %peer, phase = %e.phase, error = %e.cause, "cycle failed");
            record_error(&e.to_string());
        }
    }
    report_cycle(
        &ctx,
        &peer,
        served.as_ref(),
        committing,
        &outcome,
        CycleStats {
            duration: started.elapsed(),
            bytes_sent: received.load(Ordering::Relaxed),
            ..CycleStats::default()
        },
    );
    // Metrics and the staleness watch are up to date before the source can see the connection
    // end. Give the last message (the result) a moment to leave before the connection closes.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), ctl_send.stopped()).await;
    conn.close(0u32.into(), b"cycle over");
    // The store (and its lock) goes before the stack is released to the next cycle. A helper
    // still using it (a signature being computed) is waited for.
    let held = tokio::task::block_in_place(|| store.lock().ok().and_then(|mut s| s.take()));
    drop(held);
    drop(guard);
    Ok(())
}

/// Brings the standby up again after a cycle that stopped it and ended without a commit.
fn start_standby(standby: &StandbyStack, events: &mpsc::UnboundedSender<Event>) {
    let (control, tx) = (standby.control.clone(), events.clone());
    tokio::spawn(async move {
        let result = match control {
            Some(c) => c.bring_up().await.map(drop).map_err(|e| e.to_string()),
            // Nothing was stopped: the stop failed before it had a control.
            None => Ok(()),
        };
        let _ = tx.send(Event::Started(result));
    });
}

/// Logs, counts and alerts the services Docker had to kill at their stop timeout when the
/// standby's stack was stopped for a cycle of `stack`.
fn report_killed(ctx: &TargetCtx, stack: &str, peer: &str, killed: &[String]) {
    if killed.is_empty() {
        return;
    }
    warn!(%stack, services = ?killed, "services did not exit within their stop timeout; Docker killed them");
    for service in killed {
        ctx.ops.metrics.record_stop_killed(stack, service);
    }
    ctx.ops.alert_in_background(
        Alert::warning(
            &ctx.ops.host,
            stack,
            &format!(
                "the standby's {} did not exit within the stop timeout and Docker killed it; \
                 the commit replaces what it left, but raise `stop_timeout` for this stack if \
                 its services need longer to stop",
                killed.join(", ")
            ),
        )
        .with_peer(peer),
    );
}

/// Tells metrics, the staleness watch and the alert channels how a cycle ended. `measured`
/// holds what the driver measured (duration, bytes received); the rest comes from the report.
fn report_cycle(
    ctx: &TargetCtx,
    peer: &str,
    served: Option<&StackServe>,
    committing: Option<u64>,
    outcome: &Result<TargetReport, CycleError>,
    measured: CycleStats,
) {
    let ops = &ctx.ops;
    match outcome {
        Ok(report) if report.dry_run => {}
        Ok(report) => {
            let now = SystemTime::now();
            ops.metrics.record_cycle(
                &report.stack,
                now,
                &CycleStats {
                    generation: report.generation,
                    target_downtime: Duration::from_millis(report.target_downtime_ms),
                    files_changed: report.upserts + report.deletes,
                    ..measured
                },
            );
            if ctx
                .staleness
                .committed(&report.stack, report.generation, now)
            {
                info!(stack = %report.stack, generation = report.generation, "stack no longer stale");
            }
            let message = format!(
                "{} file(s), {} bytes; {} received, {} copied locally; target stack down {} ms",
                report.files,
                report.bytes,
                report.files_received,
                report.files_copied_locally,
                report.target_downtime_ms
            );
            ops.alert_in_background(
                Alert::success(&ops.host, &report.stack, report.generation, &message)
                    .with_peer(peer),
            );
        }
        // Interrupted by our own shutdown: not a failure of the stack.
        Err(_) if ctx.is_shutting_down() && committing.is_none() => {}
        Err(e) => {
            // Only stacks this target serves get series: a peer must not be able to mint
            // label values by naming stacks that do not exist.
            if served.is_none() && ctx.stack(&e.stack).is_none() {
                return;
            }
            ops.metrics
                .record_failure(&e.stack, &e.phase.to_string().to_lowercase());
            if alerts_on(&e.cause) {
                let mut alert = Alert::failure(
                    &ops.host,
                    &e.stack,
                    &e.phase.to_string(),
                    &e.cause.to_string(),
                )
                .with_peer(peer);
                if let Some(generation) = committing {
                    alert = alert.with_generation(generation);
                }
                ops.alert_in_background(alert);
            }
        }
    }
}

/// Failures a person on the target side must hear about: a commit that failed (including an
/// unhealthy stack and an automatic rollback), a flag that did not verify, and a local failure
/// (a full disk while staging). What the source did wrong or gave up on (a refusal, a lost
/// connection, a too-large deletion) is the source's to report.
fn alerts_on(cause: &Cause) -> bool {
    matches!(
        cause,
        Cause::CommitFailed(_) | Cause::Flag(_) | Cause::Local(_)
    )
}

use standby::unix_now;

fn with_store<T>(
    store: &Mutex<Option<StackStore>>,
    f: impl FnOnce(&StackStore) -> Result<T, StoreError>,
) -> Result<T, String> {
    let guard = store
        .lock()
        .map_err(|_| "stack store lock poisoned".to_string())?;
    let st = guard.as_ref().ok_or("the stack store is not open")?;
    f(st).map_err(|e| e.to_string())
}

fn unavailable(stack: &str, reason: impl ToString) -> Refusal {
    Refusal::Unavailable {
        stack: stack.to_string(),
        reason: reason.to_string(),
    }
}

/// How long a cycle waits for the store's lock when another holds it: a session this one
/// superseded may still be letting go of it, a `stackclone-target rollback` may be finishing.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Opens the stack's store: takes its lock (waiting up to [`STORE_LOCK_WAIT`] for it) and
/// recovers an interrupted commit.
fn open_stack(serve: &StackServe) -> Result<StackStore, Refusal> {
    let deadline = Instant::now() + STORE_LOCK_WAIT;
    loop {
        match StackStore::open(serve.store.clone()) {
            Err(StoreError::Busy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other.map_err(|e| unavailable(&serve.stack, e)),
        }
    }
}

/// Scans the live dir of an open store and lists what is staged. `started` is when the
/// opening began, for the log.
fn scan_stack(store: StackStore, started: Instant) -> Result<(StackStore, StackState), Refusal> {
    let opened = started.elapsed();
    let state = stack_state(&store).map_err(|e| unavailable(store.stack(), e))?;
    debug!(
        open_ms = opened.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        entries = state.live.len(),
        "stack loaded (store opened, live dir scanned, staging listed)"
    );
    Ok((store, state))
}

/// The live dir as it is now, and what is staged for it.
fn stack_state(store: &StackStore) -> Result<StackState, StoreError> {
    store.stack_state()
}

/// The delta signature of a live file, read in chunks (memory: the signature only).
fn signature(store: &Mutex<Option<StackStore>>, path: &StackPath) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let basis = with_store(store, |s| s.open_basis(path))?;
    let mut builder = SignatureBuilder::new(basis.len());
    // Whole blocks, about 1 MiB at a time, and never more than the file.
    let block = builder.block_size() as usize;
    let chunk = (SIGNATURE_READ / block).max(1) * block;
    let mut buf = vec![0u8; chunk.min(basis.len() as usize)];
    let mut at = 0u64;
    while at < basis.len() {
        let n = ((basis.len() - at) as usize).min(chunk);
        basis
            .file()
            .read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("{path}: {e}"))?;
        builder.update(&buf[..n]);
        at += n as u64;
    }
    Ok(builder.finish())
}

/// Accepts the source's file streams for the whole connection.
async fn accept_files(
    conn: quinn::Connection,
    store: Arc<Mutex<Option<StackStore>>>,
    wanted: Arc<Mutex<HashMap<u32, Wanted>>>,
    events: mpsc::UnboundedSender<Event>,
    received: Arc<AtomicU64>,
) {
    while let Ok(stream) = conn.accept_uni().await {
        let (store, wanted, events) = (store.clone(), wanted.clone(), events.clone());
        let received = received.clone();
        tokio::spawn(async move {
            if let Some((id, outcome)) = receive_file(stream, store, wanted, received).await {
                let _ = events.send(Event::Staged { id, outcome });
            }
        });
    }
}

/// Receives one file stream into staging. `None` if the stream died before naming its file
/// (the session then sees the connection end).
async fn receive_file(
    mut stream: quinn::RecvStream,
    store: Arc<Mutex<Option<StackStore>>>,
    wanted: Arc<Mutex<HashMap<u32, Wanted>>>,
    received: Arc<AtomicU64>,
) -> Option<(u32, StageOutcome)> {
    let first = net::recv::<SourceMsg>(&mut stream).await.ok()??;
    let SourceMsg::FileBegin { id, len } = first else {
        debug!("file stream did not start with FileBegin");
        return None;
    };
    let Some(wanted) = wanted.lock().ok()?.remove(&id) else {
        // Not wanted: the session treats a result for an unknown id as a protocol violation.
        return Some((id, StageOutcome::Mismatch));
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<SourceMsg>(4);
    let worker = tokio::task::spawn_blocking(move || rebuild(&store, wanted, len, rx));
    let mut outcome = None;
    loop {
        match net::recv::<SourceMsg>(&mut stream).await {
            Ok(Some(msg)) => {
                let stream_id = match &msg {
                    SourceMsg::FileData { id, chunk } => {
                        received.fetch_add(chunk.wire_len() as u64 + 1, Ordering::Relaxed);
                        Some(*id)
                    }
                    SourceMsg::FileEnd { id, .. } | SourceMsg::FileAbort { id, .. } => Some(*id),
                    _ => None,
                };
                if stream_id != Some(id) {
                    // Another file's message, or a control message, on this file's stream: the
                    // rebuild is not to be trusted. The session re-requests once, then fails.
                    debug!(id, ?stream_id, "foreign message on a file stream");
                    outcome = Some(StageOutcome::Mismatch);
                    break;
                }
                let last = !matches!(msg, SourceMsg::FileData { .. });
                if tx.send(msg).is_err() {
                    break;
                }
                if last {
                    break;
                }
            }
            Ok(None) | Err(_) => {
                outcome = Some(StageOutcome::SourceAborted(
                    "the file stream ended early".into(),
                ));
                break;
            }
        }
    }
    drop(tx);
    let rebuilt = worker
        .await
        .unwrap_or_else(|e| StageOutcome::Failed(e.to_string()));
    Some((
        id,
        outcome
            .filter(|_| !matches!(rebuilt, StageOutcome::Failed(_)))
            .unwrap_or(rebuilt),
    ))
}

/// What a rebuild writes into: a whole file in staging, or a patch of the live file.
trait Staged: stackclone_proto::delta::Sink {
    fn persist(self, v: &Verified) -> Result<stackclone_proto::manifest::Hash, StoreError>;
    fn discard(self) -> Option<StoreError>;
}

impl Staged for StagingFile {
    fn persist(self, v: &Verified) -> Result<stackclone_proto::manifest::Hash, StoreError> {
        StagingFile::persist(self, v)
    }
    fn discard(self) -> Option<StoreError> {
        StagingFile::discard(self)
    }
}

impl Staged for PatchFile {
    fn persist(self, v: &Verified) -> Result<stackclone_proto::manifest::Hash, StoreError> {
        PatchFile::persist(self, v)
    }
    fn discard(self) -> Option<StoreError> {
        PatchFile::discard(self)
    }
}

/// Where one wanted file goes, as the session asked.
#[derive(Debug, Clone)]
struct Wanted {
    path: StackPath,
    basis: Option<StackPath>,
    in_place: bool,
}

/// Applies a file's chunks into staging (a new file, or a patch of the live file) and verifies
/// it.
fn rebuild(
    store: &Mutex<Option<StackStore>>,
    wanted: Wanted,
    len: u64,
    rx: std::sync::mpsc::Receiver<SourceMsg>,
) -> StageOutcome {
    let opened = with_store(store, |s| match (&wanted.basis, wanted.in_place) {
        (Some(_), true) => {
            let (basis, patch) = s.create_patch_file(&wanted.path)?;
            Ok((Some(basis), Err(patch)))
        }
        (basis, _) => {
            let basis = basis.as_ref().map(|b| s.open_basis(b)).transpose()?;
            Ok((basis, Ok(s.create_staging_file()?)))
        }
    });
    match opened {
        Ok((basis, Ok(file))) => apply(basis, file, len, rx),
        Ok((basis, Err(patch))) => apply(basis, patch, len, rx),
        Err(e) => StageOutcome::Failed(e),
    }
}

fn apply(
    mut basis: Option<BasisFile>,
    mut sink: impl Staged,
    len: u64,
    rx: std::sync::mpsc::Receiver<SourceMsg>,
) -> StageOutcome {
    let mut receiver = FileReceiver::new(basis.as_ref().map(|b| b.len()), len);
    let mut no_basis = NoBasis;
    for msg in rx {
        let chunk = match msg {
            SourceMsg::FileData { chunk, .. } => chunk,
            SourceMsg::FileEnd { hash, .. } => {
                return match receiver.finish(&mut sink, hash) {
                    Ok(v) => match sink.persist(&v) {
                        Ok(_) => StageOutcome::Staged(v),
                        Err(e) => StageOutcome::Failed(e.to_string()),
                    },
                    Err(_) => match sink.discard() {
                        Some(local) => StageOutcome::Failed(local.to_string()),
                        None => StageOutcome::Mismatch,
                    },
                };
            }
            SourceMsg::FileAbort { reason, .. } => return StageOutcome::SourceAborted(reason),
            _ => return StageOutcome::Mismatch,
        };
        let applied = match basis.as_mut() {
            Some(b) => receiver.handle_chunk(chunk, b, &mut sink),
            None => receiver.handle_chunk(chunk, &mut no_basis, &mut sink),
        };
        if applied.is_err() {
            return match sink.discard() {
                Some(local) => StageOutcome::Failed(local.to_string()),
                None => StageOutcome::Mismatch,
            };
        }
    }
    StageOutcome::SourceAborted("the file stream ended early".into())
}

/// A literal-only transfer never reads a basis.
struct NoBasis;

impl stackclone_proto::delta::Basis for NoBasis {
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no basis",
        ))
    }
}
