//! `stackclone-source run`: the daemon. Each stack with a `schedule` gets a task that sleeps
//! until its next firing (plus its random delay), takes the stack's [`StackLock`] and runs a
//! cycle.
//!
//! - **No overlap.** A firing that finds the stack busy (a one-shot `push` of it is running)
//!   is skipped with a warning, not queued: the cycle under way already brings the standby up
//!   to date, and a queue could only grow on a stack whose cycle outlasts its period.
//! - **SIGHUP** reloads the config. New stacks start, removed stacks stop after their running
//!   cycle, changed stacks use their new settings from their next firing; a running cycle is
//!   never dropped. A config that does not load is logged and the old one stays.
//!   `identity_dir`, `metrics_listen` and the certificate are read at start only.
//! - **SIGTERM / SIGINT** end the daemon: sleeping stacks stop at once; a running cycle ends
//!   through its session (the source stack is started again if it was stopped, the target
//!   commits nothing unless the signed flag was already out, in which case the commit is
//!   whole), then the process exits.
//! - The wall clock is re-read at least every minute while waiting, so a clock step (NTP, a
//!   suspended VM) moves the next cycle with it.
//! - **A stack is never left down by a dead process.** Every [`SWEEP`] each stack's task looks
//!   for the restart record a cycle writes before it stops the stack; one whose cycle is not
//!   running (its lock is free: the kernel released it when the process died) was left by a
//!   `push` that was SIGKILLed or OOM-killed, or by a crashed daemon. The task starts what it
//!   names, logs and alerts. A failing start is retried at the next sweep.
//! - **Certificates** are checked at start and hourly ([`stackclone_certs::renewal`]): a due
//!   certificate is renewed where this host can (enrolled over the network, or the CA host) and
//!   new connections use it at once; one that is due and cannot be renewed is logged at warn
//!   and alerted once per process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use stackclone_common::config::{SourceConfig, SourceStack};
use stackclone_common::metrics;
use stackclone_common::schedule::random_delay;
use stackclone_proto::msg::Mode;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::app::{Agent, Common, job_for, load_config};
use crate::lock::{LockError, StackLock};
use crate::progress::CycleProgress;
use crate::push::StackJob;

/// The longest single sleep while waiting for a firing: the wall clock is looked at again
/// after it.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// How often the daemon looks at its certificate.
const CERT_CHECK: Duration = Duration::from_secs(3600);

/// How often each stack's task looks for a restart record a dead process left (one `stat`).
pub const SWEEP: Duration = Duration::from_secs(3);

/// What a stack task runs: the stack's config and the job resolved from it.
#[derive(Debug)]
struct Spec {
    stack: SourceStack,
    job: StackJob,
}

impl Spec {
    /// The job is derived from the stack's config and its target's address: equal those, equal
    /// specs.
    fn same_as(&self, other: &Spec) -> bool {
        self.stack == other.stack
            && self.job.target_addr == other.job.target_addr
            && self.job.target_name == other.job.target_name
    }
}

/// The running daemon: one task per configured stack.
#[derive(Debug)]
pub struct Daemon {
    agent: Arc<Agent>,
    common: Common,
    shutdown: watch::Receiver<bool>,
    stacks: BTreeMap<String, watch::Sender<Arc<Spec>>>,
    tasks: JoinSet<()>,
}

/// What a reload changed, by stack name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reload {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Daemon {
    /// Builds the agent from `cfg` and starts a task per stack.
    pub fn start(
        common: &Common,
        cfg: &SourceConfig,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Daemon> {
        let agent = Arc::new(Agent::new(cfg, &common.state_dir)?);
        let mut daemon = Daemon {
            agent,
            common: common.clone(),
            shutdown,
            stacks: BTreeMap::new(),
            tasks: JoinSet::new(),
        };
        daemon.apply(cfg);
        Ok(daemon)
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Makes the running stacks match `cfg`.
    pub fn apply(&mut self, cfg: &SourceConfig) -> Reload {
        let mut reload = Reload::default();
        let mut wanted = BTreeMap::new();
        for stack in &cfg.stacks {
            match job_for(cfg, &self.common, &stack.name) {
                Ok(job) => {
                    wanted.insert(
                        stack.name.clone(),
                        Arc::new(Spec {
                            stack: stack.clone(),
                            job,
                        }),
                    );
                }
                Err(e) => {
                    error!(stack = %stack.name, "{e:#}; the stack keeps its previous settings");
                    if self.stacks.contains_key(&stack.name) {
                        // Keep the running task as it is.
                        wanted.insert(
                            stack.name.clone(),
                            self.stacks[&stack.name].borrow().clone(),
                        );
                    }
                }
            }
        }
        let names: Vec<String> = self.stacks.keys().cloned().collect();
        for name in names {
            if !wanted.contains_key(&name) {
                // Dropping the sender ends the task once it is between cycles.
                self.stacks.remove(&name);
                reload.removed.push(name);
            }
        }
        for (name, spec) in wanted {
            match self.stacks.get(&name) {
                Some(tx) => {
                    if !tx.borrow().same_as(&spec) {
                        let _ = tx.send(spec);
                        reload.changed.push(name);
                    }
                }
                None => {
                    let (tx, rx) = watch::channel(spec);
                    self.tasks
                        .spawn(stack_loop(self.agent.clone(), rx, self.shutdown.clone()));
                    self.stacks.insert(name.clone(), tx);
                    reload.added.push(name);
                }
            }
        }
        for name in &cfg.stacks {
            self.agent.ops.metrics.register_stack(&name.name);
        }
        self.agent.ops.set_alerts(cfg.alerts.clone());
        reload
    }

    /// Re-reads the config file; on error keeps the running config and returns the error.
    pub fn reload(&mut self) -> anyhow::Result<Reload> {
        let cfg = load_config(&self.common)?;
        Ok(self.apply(&cfg))
    }

    /// Waits for every stack task to end (they end on shutdown, after their running cycle).
    pub async fn finish(mut self) {
        self.stacks.clear();
        while self.tasks.join_next().await.is_some() {}
        self.agent.ctx.endpoint.wait_idle().await;
    }
}

/// `run`: the daemon, until SIGTERM or SIGINT.
pub async fn run(common: &Common) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let cfg = load_config(common)?;
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let mut daemon = Daemon::start(common, &cfg, shutdown.clone())?;
    if let Some(addr) = &cfg.metrics_listen {
        let addr = addr.resolve().context("metrics_listen")?;
        let mut stop = shutdown.clone();
        metrics::serve(addr, daemon.agent().ops.metrics.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tokio::spawn(watch_certificate(
        daemon.agent().clone(),
        cfg.identity_dir.clone(),
        shutdown.clone(),
    ));
    let scheduled: Vec<String> = cfg
        .stacks
        .iter()
        .filter(|s| s.schedule.is_some())
        .map(|s| {
            format!(
                "{} ({})",
                s.name,
                s.schedule.as_ref().map_or("", |c| c.as_str())
            )
        })
        .collect();
    info!(
        source = %daemon.agent().ctx.source_name,
        stacks = cfg.stacks.len(),
        scheduled = %scheduled.join(", "),
        "source daemon running"
    );
    loop {
        tokio::select! {
            _ = hup.recv() => match daemon.reload() {
                Ok(r) => info!(
                    added = ?r.added,
                    removed = ?r.removed,
                    changed = ?r.changed,
                    "config reloaded"
                ),
                Err(e) => error!("config reload failed, keeping the running config: {e:#}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    warn!("shutting down: ending cycles under way");
    let _ = shutdown_tx.send(true);
    daemon.finish().await;
    info!("source daemon stopped");
    Ok(())
}

/// One stack's schedule: wait, lock, cycle, repeat.
async fn stack_loop(
    agent: Arc<Agent>,
    mut spec_rx: watch::Receiver<Arc<Spec>>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Whether the last sweep failed to start the stack (alerted once until it recovers).
    let mut failing = false;
    {
        let spec = spec_rx.borrow().clone();
        sweep(&agent, &spec.job, &mut failing).await;
    }
    let mut sweeps = tokio::time::interval(SWEEP);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'firing: loop {
        if *shutdown.borrow() {
            return;
        }
        let spec = spec_rx.borrow_and_update().clone();
        let name = spec.stack.name.clone();
        let due = spec.stack.schedule.as_ref().and_then(|schedule| {
            let next = schedule.next_after(SystemTime::now())?;
            Some(next + random_delay(spec.stack.random_delay.unwrap_or_default()))
        });
        if let Some(due) = due {
            debug!(stack = %name, due = %fmt_time(due), "next cycle");
        }
        // Sleep until due (or forever without a schedule), in slices, following config changes.
        loop {
            let left = match due {
                Some(due) => match due.duration_since(SystemTime::now()) {
                    Ok(left) if !left.is_zero() => Some(left.min(MAX_SLEEP)),
                    _ => break,
                },
                None => None,
            };
            tokio::select! {
                () = sleep_or_forever(left) => {}
                _ = sweeps.tick() => {
                    sweep(&agent, &spec.job, &mut failing).await;
                    continue;
                }
                changed = spec_rx.changed() => {
                    if changed.is_err() {
                        debug!(stack = %name, "stack removed from the config");
                        return;
                    }
                    continue 'firing;
                }
                _ = shutdown.changed() => return,
            }
        }
        let job = &spec.job;
        let lock = match StackLock::try_acquire(&agent.state_dir, &name) {
            Ok(lock) => lock,
            Err(e @ LockError::Busy { .. }) => {
                warn!(stack = %name, "scheduled cycle skipped: {e}");
                continue;
            }
            Err(e) => {
                error!(stack = %name, "scheduled cycle skipped: {e}");
                agent.ops.metrics.record_failure(&name, "lock", "lock");
                continue;
            }
        };
        let progress = CycleProgress::new();
        // `run_cycle` logs the cycle's one info line (or its warning).
        let _ = agent
            .cycle(job, Mode::Sync, shutdown.clone(), &progress, true)
            .await;
        drop(lock);
    }
}

/// Starts what a process that died mid-cycle (a `push` killed by SIGKILL or the OOM killer, a
/// daemon that crashed) left stopped of `job`'s stack, and says so in the log and an alert.
/// A start that keeps failing is alerted once (`failing`), and logged at each try.
async fn sweep(agent: &Agent, job: &StackJob, failing: &mut bool) {
    use crate::app::{Recovery, recover_stopped};
    let alert = match recover_stopped(&job.stack, job.compose.as_ref(), &agent.state_dir).await {
        Recovery::Nothing | Recovery::Busy => return,
        Recovery::Started { containers } => {
            *failing = false;
            warn!(stack = %job.stack, containers = ?containers,
                "a cycle that died left the stack stopped; started it again");
            stackclone_common::alert::Alert::warning(
                &agent.ops.host,
                &job.stack,
                &format!(
                    "a cycle that died (killed, out of memory, crashed) left the stack stopped; \
                     the source daemon started it again ({})",
                    containers.join(", ")
                ),
            )
        }
        Recovery::Failed { error } => {
            error!(stack = %job.stack, error = %error,
                "a cycle that died left the stack stopped, and starting it again failed");
            if std::mem::replace(failing, true) {
                return;
            }
            stackclone_common::alert::Alert::failure(
                &agent.ops.host,
                &job.stack,
                "recover",
                &format!(
                    "a cycle that died left the stack stopped, and starting it again failed \
                     (the daemon tries again every {} s): {error}",
                    SWEEP.as_secs()
                ),
            )
        }
    };
    agent.ops.alert_in_background(alert);
}

/// Renews this host's certificate when it is due, hourly, until shutdown.
async fn watch_certificate(
    agent: Arc<Agent>,
    identity_dir: std::path::PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    use stackclone_certs::renewal::{Renewal, renew_if_due};
    let dir = stackclone_certs::StateDir::new(&identity_dir);
    let mut alerted = false;
    loop {
        let outcome = renew_if_due(&dir, time::OffsetDateTime::now_utc()).await;
        let problem = match outcome {
            Ok(r) => {
                agent
                    .ops
                    .metrics
                    .set_certificate_expiry("host", r.expires().into());
                match r {
                    Renewal::NotDue { .. } => None,
                    Renewal::Renewed { identity } => {
                        match stackclone_certs::client_config(&identity, &agent.ctx.trust) {
                            Ok(config) => {
                                agent.ctx.set_client_config(config);
                                warn!(
                                    expires = %fmt_time(identity.info().not_after.into()),
                                    "certificate renewed; new connections use it"
                                );
                                None
                            }
                            Err(e) => Some(format!(
                                "the certificate was renewed but cannot be used until a \
                                 restart: {e}"
                            )),
                        }
                    }
                    Renewal::DueButNoServer { expires } => Some(format!(
                        "the certificate expires at {} and this host cannot renew it on its \
                         own; run `stackclone-certs renew --server HOST:PORT`",
                        fmt_time(expires.into())
                    )),
                    Renewal::Failed { error, expires } => Some(format!(
                        "renewing the certificate (expires {}) failed: {error}",
                        fmt_time(expires.into())
                    )),
                }
            }
            Err(e) => Some(format!("cannot read this host's certificate: {e}")),
        };
        if let Some(message) = problem {
            warn!("{message}");
            if !alerted {
                alerted = true;
                agent
                    .ops
                    .alert_in_background(stackclone_common::alert::Alert::cert_expiry(
                        &agent.ops.host,
                        &message,
                    ));
            }
        }
        stackclone_certs::renewal::refresh_deny_list(&dir).await;
        tokio::select! {
            () = tokio::time::sleep(CERT_CHECK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn fmt_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
