//! The driver of one target cycle: a [`Cycle`] owns a connection's [`TargetSession`] and does
//! what it asks, one event at a time, in the manner of quinn's connection driver.
//!
//! [`Cycle::run`] loops: it carries out the session's actions
//! ([`handle_action`](Cycle::handle_action): look the stack up, open and scan the store, stop
//! the standby, compute signatures, expect files, commit), sends its messages, then waits for
//! one thing to happen — an answer from the work it started ([`Event`], in
//! [`handle_event`](Cycle::handle_event)), a control message, the file streams' progress, the
//! session's stall deadline ([`TargetSession::poll_timeout`]), the target's shutdown, or a newer
//! session of the same source — and hands it to the session. Every decision is the session's;
//! the driver holds only what the work needs (the store shared with the file streams, what each
//! wanted file is, the standby's control).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stackclone_common::alert::Alert;
use stackclone_common::control::StackControl;
use stackclone_common::metrics::CycleStats;
use stackclone_common::net::{ControlEnd, ControlStream};
use stackclone_proto::manifest::Manifest;
use stackclone_proto::msg::{Phase, Refusal, SourceMsg};
use stackclone_proto::session::{
    CycleError, StackPolicy, StackState, StageOutcome, TargetAction, TargetReport, TargetSession,
};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use crate::ctx::{BusyGuard, StackServe, TargetCtx};
use crate::receive::{self, StreamEnd, Wanted, with_store};
use crate::report;
use crate::standby::{self, unix_now};
use crate::store::{LocalStage, StackStore, StoreError};

/// Signatures computed at once per cycle: the session may ask for many; each holds a read
/// buffer and reads a whole basis file.
const PARALLEL_SIGNATURES: usize = 4;

/// How often the driver looks at the file streams' progress and the session's deadline.
const TICK: Duration = Duration::from_secs(5);

/// Answers from the work a cycle started, back to its loop.
enum Event {
    /// The stack is held for this cycle (or busy).
    Claimed(Result<BusyGuard, Refusal>),
    /// The store is open at this generation, with its state dir; the live dir is being scanned.
    Opened(u64, Arc<Manifest>, PathBuf),
    Stack(Result<Box<(StackStore, StackState)>, Refusal>),
    /// The standby's stack stopped (the services Docker had to kill), or did not; the control
    /// that stopped it, if there is one, for starting it again.
    Stopped {
        control: Option<Arc<dyn StackControl>>,
        result: Result<Vec<String>, String>,
    },
    StoppedScan(Result<Box<StackState>, String>),
    Started(Result<(), String>),
    Signature {
        id: u32,
        result: Result<Vec<u8>, String>,
    },
    /// A file stream ended.
    Stream(StreamEnd),
    Committed {
        result: Result<u64, (Phase, String)>,
        store: Box<StackStore>,
    },
}

/// What woke the loop.
enum Wake {
    /// Boxed: an event can carry a whole store.
    Event(Box<Event>),
    Control(Result<SourceMsg, ControlEnd>),
    Shutdown,
    Superseded,
    Tick,
}

/// The standby's stack as this cycle handles it.
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

/// One connection's cycle on the target. See the module doc.
pub(crate) struct Cycle {
    ctx: Arc<TargetCtx>,
    conn: quinn::Connection,
    peer: String,
    session: TargetSession,
    control: ControlStream<SourceMsg>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// The stack's store once loaded, shared with the file streams (and taken by a commit).
    store: Arc<Mutex<Option<StackStore>>>,
    /// What the session asked to receive, by file id.
    wanted: Arc<Mutex<HashMap<u32, Wanted>>>,
    /// Bytes of file data received.
    received: Arc<AtomicU64>,
    /// `received` as the last tick saw it.
    received_seen: u64,
    signatures: Arc<Semaphore>,
    /// The stack, held for this cycle.
    guard: Option<BusyGuard>,
    superseded: bool,
    shutting_down: bool,
    /// The stack's settings as the cycle loaded it: a reload meanwhile changes the next cycle.
    served: Option<StackServe>,
    state_path: Option<PathBuf>,
    standby: StandbyStack,
    /// The generation handed to a commit, once one was.
    committing: Option<u64>,
    started: Instant,
    files: tokio::task::JoinHandle<()>,
}

impl Cycle {
    /// A cycle on an admitted connection from `peer`, with its control stream open.
    pub(crate) fn new(
        ctx: Arc<TargetCtx>,
        conn: quinn::Connection,
        peer: String,
        session: TargetSession,
        control: ControlStream<SourceMsg>,
    ) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let store: Arc<Mutex<Option<StackStore>>> = Arc::default();
        let wanted: Arc<Mutex<HashMap<u32, Wanted>>> = Arc::default();
        let received = Arc::new(AtomicU64::new(0));
        let tx = events_tx.clone();
        let files = tokio::spawn(receive::accept_files(
            conn.clone(),
            store.clone(),
            wanted.clone(),
            received.clone(),
            move |end| {
                let _ = tx.send(Event::Stream(end));
            },
        ));
        Self {
            ctx,
            conn,
            peer,
            session,
            control,
            events_tx,
            events,
            store,
            wanted,
            received,
            received_seen: 0,
            signatures: Arc::new(Semaphore::new(PARALLEL_SIGNATURES)),
            guard: None,
            superseded: false,
            shutting_down: false,
            served: None,
            state_path: None,
            standby: StandbyStack::default(),
            committing: None,
            started: Instant::now(),
            files,
        }
    }

    /// Runs the cycle to its end, reports it, and closes the connection.
    pub(crate) async fn run(mut self) {
        let outcome = self.drive().await;
        self.finish(outcome).await;
    }

    async fn drive(&mut self) -> Result<TargetReport, CycleError> {
        let stop = self.ctx.shutting_down();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        loop {
            let mut done = None;
            while let Some(action) = self.session.poll_action() {
                match action {
                    TargetAction::Done(result) => done = Some(result),
                    action => self.handle_action(action),
                }
            }
            // Messages after actions: a `Want` must never reach the source before its
            // `Receive` is registered here, or the file's stream could arrive unrecognised.
            self.flush().await;
            if let Some(result) = done {
                return result;
            }
            let wake = tokio::select! {
                Some(ev) = self.events.recv() => Wake::Event(Box::new(ev)),
                msg = self.control.recv() => Wake::Control(msg),
                () = &mut stop, if !self.shutting_down => Wake::Shutdown,
                () = async {
                    if let Some(g) = self.guard.as_mut() {
                        g.superseded().await
                    }
                }, if self.guard.is_some() && !self.superseded => Wake::Superseded,
                _ = tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Event(ev) => {
                    self.session.handle_progress(Instant::now());
                    self.handle_event(*ev);
                }
                Wake::Control(msg) => {
                    self.session.handle_progress(Instant::now());
                    self.handle_control(msg);
                }
                Wake::Shutdown => {
                    // A commit under way goes on (the session ignores this then); anything
                    // earlier ends here, before live data was touched.
                    self.shutting_down = true;
                    self.session
                        .handle_connection_lost("the target is shutting down");
                }
                Wake::Superseded => {
                    // A commit under way goes on (the session ignores this then).
                    self.superseded = true;
                    self.session
                        .handle_connection_lost("superseded by a newer session of the same source");
                }
                Wake::Tick => {
                    let bytes = self.received.load(Ordering::Relaxed);
                    if bytes != self.received_seen {
                        self.received_seen = bytes;
                        self.session.handle_progress(Instant::now());
                    }
                    self.session.handle_timeout(Instant::now());
                }
            }
        }
    }

    /// Sends what the session has for the source.
    async fn flush(&mut self) {
        while let Some(msg) = self.session.poll_message() {
            if self.control.is_up()
                && let Err(e) = self.control.send(&msg).await
            {
                self.session.handle_connection_lost(&e.to_string());
            }
        }
    }

    fn handle_control(&mut self, msg: Result<SourceMsg, ControlEnd>) {
        match msg {
            Ok(m) => self.session.handle_message(m, unix_now()),
            // The peer is still there to be told why its cycle ended.
            Err(ControlEnd::Malformed(e)) => self.session.handle_malformed(&e),
            Err(ControlEnd::Lost(e)) => {
                // Our own shutdown closed it: say so rather than "connection closed".
                let e = if self.ctx.is_shutting_down() {
                    "the target is shutting down".to_string()
                } else {
                    e
                };
                self.session.handle_connection_lost(&e);
            }
        }
    }

    fn handle_action(&mut self, action: TargetAction) {
        match action {
            TargetAction::LookupStack { stack } => match self.ctx.stacks().get(&stack) {
                None => self
                    .session
                    .handle_policy(Err(Refusal::UnknownStack { stack })),
                Some(serve) => self.session.handle_policy(Ok(StackPolicy {
                    allow: serve.allow.clone(),
                    // Read without the lock; the load checks it again under it.
                    held: StackStore::peek_state(&serve.store.state_path())
                        .filter(|st| st.stack == serve.stack)
                        .map(|st| st.held())
                        .unwrap_or_default(),
                    keeps_generations: serve.store.keep_generations > 0,
                })),
            },
            TargetAction::LoadStack { stack } => match self.ctx.stack(&stack) {
                None => self
                    .session
                    .handle_stack(Err(Refusal::UnknownStack { stack })),
                Some(serve) => {
                    self.served = Some(serve);
                    let (ctx, peer, tx) = (self.ctx.clone(), self.peer.clone(), self.tx());
                    tokio::spawn(async move {
                        let _ = tx.send(Event::Claimed(ctx.claim_for(&stack, &peer).await));
                    });
                }
            },
            TargetAction::StopStack => {
                self.standby.stopping = true;
                self.standby.stopped_at = Some(Instant::now());
                let (serve, path) = (self.served.clone(), self.state_path.clone());
                let tx = self.tx();
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
                let (store, tx) = (self.store.clone(), self.tx());
                tokio::task::spawn_blocking(move || {
                    let scanned = with_store(&store, |s| {
                        let started = Instant::now();
                        let state = s.stack_state();
                        debug!(
                            ms = started.elapsed().as_millis() as u64,
                            "stopped standby scanned"
                        );
                        state
                    });
                    let _ = tx.send(Event::StoppedScan(scanned.map(Box::new)));
                });
            }
            TargetAction::StartStack => {
                if self.standby.stopping {
                    self.standby.start_after_stop = true;
                } else {
                    self.start_standby();
                }
            }
            TargetAction::Signature { id, basis } => {
                let (store, tx) = (self.store.clone(), self.tx());
                let permits = self.signatures.clone();
                tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let result =
                        tokio::task::spawn_blocking(move || receive::signature(&store, &basis))
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()));
                    let _ = tx.send(Event::Signature { id, result });
                });
            }
            TargetAction::StageLocal { id, from, hash } => {
                let (store, tx) = (self.store.clone(), self.tx());
                tokio::task::spawn_blocking(move || {
                    let outcome = match with_store(&store, |s| s.stage_local(&from, hash)) {
                        Ok(LocalStage::Staged(v)) => StageOutcome::Staged(v),
                        Ok(LocalStage::Mismatch) => StageOutcome::Mismatch,
                        Err(e) => StageOutcome::Failed(e),
                    };
                    let _ = tx.send(Event::Stream(StreamEnd::Staged { id, outcome }));
                });
            }
            TargetAction::Receive {
                id,
                path,
                basis,
                in_place,
            } => {
                if let Ok(mut w) = self.wanted.lock() {
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
                let taken = self.store.lock().ok().and_then(|mut s| s.take());
                let Some(st) = taken else {
                    return self.session.handle_committed(Err((
                        Phase::Commit,
                        "the stack store is not open".into(),
                    )));
                };
                self.committing = Some(commit.generation());
                let serve = self.served.clone();
                let stopped = self.standby.control.clone().zip(self.standby.stopped_at);
                let bytes_received = self.received.load(Ordering::Relaxed);
                let tx = self.tx();
                tokio::spawn(async move {
                    let (result, store) = match serve {
                        Some(serve) => {
                            standby::commit_stack(st, *commit, &serve, stopped, bytes_received)
                                .await
                        }
                        None => (
                            Err((Phase::Commit, "stack no longer configured".into())),
                            st,
                        ),
                    };
                    let _ = tx.send(Event::Committed {
                        result,
                        store: Box::new(store),
                    });
                });
            }
            // Taken by the loop.
            TargetAction::Done(_) => {}
        }
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Claimed(Ok(guard)) => {
                self.guard = Some(guard);
                let Some(serve) = self.served.clone() else {
                    return;
                };
                let tx = self.tx();
                let runtime = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || {
                    let opened = Instant::now();
                    let loaded = open_stack(&serve).and_then(|store| {
                        let _ = tx.send(Event::Opened(
                            store.generation_base(),
                            store.committed(),
                            store.state_path().to_path_buf(),
                        ));
                        // Under the store's lock, before the scan: this host's own volume
                        // data becomes part of the live tree (see `import_volumes`).
                        if let Some(compose) = &serve.compose {
                            runtime
                                .block_on(standby::import_volumes(compose))
                                .map_err(|e| unavailable(&serve.stack, e))?;
                        }
                        scan_stack(store, opened)
                    });
                    let _ = tx.send(Event::Stack(loaded.map(Box::new)));
                });
            }
            Event::Claimed(Err(refusal)) => self.session.handle_stack(Err(refusal)),
            Event::Opened(generation, committed, path) => {
                self.state_path = Some(path);
                self.session.handle_opened(generation, committed);
            }
            Event::Stack(Ok(loaded)) => {
                let (store, state) = *loaded;
                if let Ok(mut s) = self.store.lock() {
                    *s = Some(store);
                }
                self.session.handle_stack(Ok(state));
            }
            Event::Stack(Err(refusal)) => self.session.handle_stack(Err(refusal)),
            Event::Stopped { control, result } => {
                self.standby.stopping = false;
                self.standby.control = control;
                let stack = self.session.stack().to_string();
                match &result {
                    Ok(killed) => {
                        debug!(%stack, "standby stopped for the final pass");
                        report::report_killed(&self.ctx, &stack, &self.peer, killed);
                    }
                    Err(e) => warn!(%stack, error = %e, "stopping the standby failed"),
                }
                let data_only = self.served.as_ref().is_some_and(|s| s.compose.is_none());
                match result {
                    // Nothing ran, so the live dir as loaded is the one to plan against.
                    Ok(killed) if data_only && killed.is_empty() => {
                        self.session.handle_nothing_to_stop()
                    }
                    result => self.session.handle_stack_stopped(result),
                }
                if std::mem::take(&mut self.standby.start_after_stop) {
                    self.start_standby();
                }
            }
            Event::StoppedScan(result) => self.session.handle_stopped_scan(result.map(|s| *s)),
            Event::Started(result) => {
                if let Err(e) = &result {
                    let stack = self.session.stack().to_string();
                    warn!(%stack, error = %e, "the cycle ended without a commit, and bringing the standby up again failed");
                    let ops = &self.ctx.ops;
                    ops.alert_in_background(
                        Alert::failure(
                            &ops.host,
                            &stack,
                            "start",
                            &format!(
                                "the cycle ended without a commit, and bringing the standby's \
                                 stack up again on the live data (generation unchanged) failed: {e}"
                            ),
                        )
                        .with_peer(&self.peer),
                    );
                }
                self.session.handle_stack_started(result);
            }
            Event::Signature { id, result } => self.session.handle_signature(id, result),
            Event::Stream(StreamEnd::Staged { id, outcome }) => {
                self.session.handle_staged(id, outcome)
            }
            Event::Stream(StreamEnd::Bad(bad)) => {
                debug!(?bad, "a file stream that is no valid transfer");
                self.session.handle_bad_stream(bad)
            }
            Event::Committed { result, store } => {
                if let Ok(mut s) = self.store.lock() {
                    *s = Some(*store);
                }
                self.session.handle_committed(result);
            }
        }
    }

    fn tx(&self) -> mpsc::UnboundedSender<Event> {
        self.events_tx.clone()
    }

    /// Brings the standby up again after a cycle that stopped it and ended without a commit.
    fn start_standby(&self) {
        let (control, tx) = (self.standby.control.clone(), self.tx());
        tokio::spawn(async move {
            let result = match control {
                Some(c) => c.bring_up().await.map(drop).map_err(|e| e.to_string()),
                // Nothing was stopped: the stop failed before it had a control.
                None => Ok(()),
            };
            let _ = tx.send(Event::Started(result));
        });
    }

    /// Logs and reports the outcome, records a failure in the store, lets the last message
    /// leave, closes the connection, and only then releases the store and the stack.
    async fn finish(self, outcome: Result<TargetReport, CycleError>) {
        let Cycle {
            ctx,
            conn,
            peer,
            session,
            control,
            store,
            received,
            guard,
            served,
            committing,
            started,
            files,
            ..
        } = self;
        files.abort();
        let stack = session.stack().to_string();
        report::log_cycle(&ctx, &stack, &peer, committing, &outcome);
        if let Err(e) = &outcome
            && let Ok(mut s) = store.lock()
            && let Some(st) = s.as_mut()
        {
            let _ = st.record_cycle(|r| r.last_error = Some(e.to_string()));
        }
        report::report_cycle(
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
        // Metrics and the staleness watch are up to date before the source can see the
        // connection end. Give the last message (the result) a moment to leave first.
        control.close(Duration::from_secs(2)).await;
        conn.close(0u32.into(), b"cycle over");
        // The store (and its lock) goes before the stack is released to the next cycle. A
        // helper still using it (a signature being computed) is waited for.
        let held = tokio::task::block_in_place(|| store.lock().ok().and_then(|mut s| s.take()));
        drop(held);
        drop(guard);
    }
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
    let state = store
        .stack_state()
        .map_err(|e| unavailable(store.stack(), e))?;
    debug!(
        open_ms = opened.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        entries = state.live.len(),
        "stack loaded (store opened, live dir scanned, staging listed)"
    );
    Ok((store, state))
}
