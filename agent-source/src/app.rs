//! The commands of `stackclone-source`, as library calls: `main.rs` parses flags and calls
//! these, tests call them too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use stackclone_certs::{Identity, StateDir, Trust};
use stackclone_common::alert::Alert;
use stackclone_common::config::{LoadOptions, OnSuperseded, SourceConfig, SourceStack};
use stackclone_common::control::{DataOnly, StackControl};
use stackclone_common::docker::{ComposeConfig, ComposeStack};
use stackclone_common::metrics::{self, Metrics};
use stackclone_common::ops::Ops;
use stackclone_proto::msg::{Mode, Refusal, Replaced};
use stackclone_proto::session::{Cause, CycleError};
use tracing::{info, warn};

use crate::lock::{LockError, StackLock};
use crate::progress::{CycleProgress, Style, Viewer};
use crate::push::{Ctx, CycleStats, PushError, StackJob, run_cycle};
use crate::status::{self, MountStatus, StackStatus};

/// Where the source keeps its state (status files, hash caches) when not told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stackclone";

/// How long a one-shot push waits, once its connections are closed, for the closes to leave
/// before the process ends (see [`push`]'s end).
const CLOSE_GRACE: Duration = Duration::from_millis(25);

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub config: PathBuf,
    /// `--dir` / `STACKCLONE_DIR`: replaces the config's `identity_dir`.
    pub identity_dir: Option<PathBuf>,
    /// `--state-dir` / `STACKCLONE_STATE_DIR`.
    pub state_dir: PathBuf,
}

/// Loads the config, with the identity dir override applied; logs its warnings.
pub fn load_config(common: &Common) -> anyhow::Result<SourceConfig> {
    let mut cfg = SourceConfig::load_with(&common.config, &LoadOptions::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(dir) = &common.identity_dir {
        cfg.identity_dir = dir.clone();
    }
    for w in &cfg.warnings {
        warn!("{w}");
    }
    Ok(cfg)
}

/// The result of `push` for one stack.
#[derive(Debug, serde::Serialize)]
pub struct PushOutcome {
    pub stack: String,
    pub ok: bool,
    pub generation: u64,
    pub files: u64,
    pub bytes: u64,
    pub files_sent: u64,
    pub bytes_sent: u64,
    /// How long this cycle kept the stack stopped, also when it failed.
    pub source_downtime_ms: Option<u64>,
    pub target_downtime_ms: Option<u64>,
    /// Services Docker had to kill at their stop timeout on this host (their copy is
    /// crash-consistent only) and on the standby.
    pub stop_killed: Vec<String>,
    pub standby_killed: Vec<String>,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// Dry run only.
    pub plan: Option<serde_json::Value>,
    /// The stack's mounts as this cycle judged them.
    pub mounts: Vec<MountStatus>,
    /// The target pushed to.
    pub target: String,
    /// The target's own copy the commit replaced, kept there as a generation (a fail-back,
    /// `--replace-diverged`, or a first push into a directory that held files).
    pub replaced: Option<Replaced>,
    /// A fail-back handed the stack over: the target runs it as the primary now.
    pub handed_over: bool,
}

/// How `push` runs.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub mode: Mode,
    /// Wait for a cycle of the same stack (the daemon's or another `push`) to end instead of
    /// refusing at once.
    pub wait: bool,
    pub style: Style,
    /// `--to NAME`: another `[targets.NAME]` than the stack's own.
    pub to: Option<String>,
    /// `--fail-back`: hand the stack over to the target.
    pub fail_back: bool,
    /// `--replace-diverged`: replace a target copy of another history.
    pub replace_diverged: bool,
}

/// The agent-wide things every cycle uses, built once per process.
#[derive(Debug)]
pub struct Agent {
    pub ctx: Ctx,
    pub ops: Arc<Ops>,
    pub state_dir: PathBuf,
}

impl Agent {
    /// Loads identity, trust and flag key and opens the client endpoint.
    pub fn new(cfg: &SourceConfig, state_dir: &Path) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
        let dir = StateDir::new(&cfg.identity_dir);
        let identity = Identity::load(&dir).context("loading this host's identity")?;
        let trust = Trust::load(&dir).context("loading the fleet CA")?;
        let flag_key =
            stackclone_certs::load_flag_key(&cfg.identity_dir).context("loading the flag key")?;
        let endpoint =
            stackclone_certs::endpoint("0.0.0.0:0".parse().expect("valid literal address"), None)
                .context("opening a UDP socket")?;
        let client_config = stackclone_certs::client_config(&identity, &trust)?;
        let metrics = Arc::new(Metrics::new());
        let not_after: SystemTime = identity.info().not_after.into();
        metrics.set_certificate_expiry("host", not_after);
        for s in &cfg.stacks {
            metrics.register_stack(&s.name);
        }
        let ops = Arc::new(Ops::new(identity.name(), cfg.alerts.clone(), metrics));
        Ok(Agent {
            ctx: Ctx {
                endpoint,
                client_config: Arc::new(std::sync::RwLock::new(client_config)),
                trust,
                source_name: identity.name().to_string(),
                flag_key,
            },
            ops,
            state_dir: state_dir.to_owned(),
        })
    }

    /// One cycle of `job` with everything around it: Docker control, the status file, metrics
    /// and alerts. The caller holds the stack's [`StackLock`]. With `alerts_in_background` a
    /// hanging alert channel cannot delay the caller (the daemon); without, alerts are sent
    /// before this returns (a one-shot `push`, which exits next). What the cycle measured comes
    /// back however it ended (a failed cycle may have kept the stack down too).
    pub async fn cycle(
        &self,
        job: &StackJob,
        mode: Mode,
        shutdown: tokio::sync::watch::Receiver<bool>,
        progress: &Arc<CycleProgress>,
        alerts_in_background: bool,
    ) -> (CycleStats, Result<(), PushError>) {
        let (stats, result) = match control_for(job, mode).await {
            Ok(control) => run_cycle(&self.ctx, job, mode, control, shutdown, progress).await,
            Err(e) => (CycleStats::default(), Err(e)),
        };
        if let Err(e) = &result {
            warn!(
                stack = %job.stack,
                peer = %job.target_name,
                phase = %e.phase(),
                cause = %e.cause(),
                error = %e,
                source_downtime_ms = stats.source_downtime.map(|d| d.as_millis() as u64),
                "cycle failed"
            );
        }
        if mode == Mode::DryRun {
            return (stats, result);
        }
        let (before, after) = record(&self.state_dir, job, &stats, &result);
        let ops = &self.ops;
        let mut alerts = Vec::new();
        ops.metrics
            .set_superseded(&job.stack, after.role == "superseded");
        ops.metrics
            .set_diverged(&job.stack, after.role == "diverged");
        let refusal = lineage_refusal(&result);
        if let Some(r) = refusal {
            if before.role == after.role {
                info!(stack = %job.stack, role = %after.role, "the target still refuses this host's pushes: {r}");
            } else {
                warn!(stack = %job.stack, role = %after.role, "{r}");
                let message = match r {
                    Refusal::Promoted { at, .. } => format!(
                        "stack `{}` was promoted on standby `{}` at {}; this host is no longer \
                         its primary. Its pushes are refused (and tried again on schedule, \
                         without stopping the stack); {}",
                        job.stack,
                        job.target_name,
                        stackclone_proto::lineage::utc(*at),
                        match job.on_superseded {
                            OnSuperseded::Stop =>
                                "the local stack is stopped now (on_superseded = \"stop\")",
                            OnSuperseded::Alert =>
                                "the local stack is left running: make sure clients use the promoted host",
                        }
                    ),
                    other => other.to_string(),
                };
                alerts.push(Alert::warning(&ops.host, &job.stack, &message));
                if after.role == "superseded" && job.on_superseded == OnSuperseded::Stop {
                    fence(&self.state_dir, job).await;
                }
            }
        } else if result.is_ok() && before.role != "primary" {
            info!(stack = %job.stack, was = %before.role, "the target accepts this host's pushes again");
        }
        if !stats.stop_killed.is_empty() {
            for service in &stats.stop_killed {
                ops.metrics.record_stop_killed(&job.stack, service);
            }
            warn!(stack = %job.stack, services = ?stats.stop_killed,
                "services did not exit within their stop timeout; Docker killed them, so this \
                 copy of their data is crash-consistent only");
        }
        // A failed cycle's alert says it (`on_stop_timeout = "fail"`); a shipped copy's must too.
        if !stats.stop_killed.is_empty() && result.is_ok() {
            alerts.push(Alert::warning(
                &ops.host,
                &job.stack,
                &format!(
                    "{} did not exit within the stop timeout and Docker killed it: the copy of \
                     its data on the standby is crash-consistent only (it runs crash recovery \
                     when it starts). Raise `stop_timeout` for this stack, or set \
                     on_stop_timeout = \"fail\" to refuse such copies",
                    stats.stop_killed.join(", ")
                ),
            ));
        }
        alerts.extend(match &result {
            Ok(()) => {
                ops.metrics.record_cycle(
                    &job.stack,
                    SystemTime::now(),
                    &metrics::CycleStats {
                        generation: stats.report.generation,
                        duration: stats.duration,
                        source_downtime: stats.source_downtime.unwrap_or_default(),
                        target_downtime: Duration::from_millis(
                            stats.report.target_downtime_ms.unwrap_or(0),
                        ),
                        bytes_sent: stats.bytes_sent,
                        files_changed: stats.report.files_sent,
                        ..Default::default()
                    },
                );
                Some(Alert::success(
                    &ops.host,
                    &job.stack,
                    stats.report.generation,
                    &format!(
                        "{} file(s) sent, {} bytes on the wire, source down {} ms, in {:.1} s",
                        stats.report.files_sent,
                        stats.bytes_sent,
                        stats.source_downtime.unwrap_or_default().as_millis(),
                        stats.duration.as_secs_f64()
                    ),
                ))
            }
            Err(e) => {
                let phase = e.phase();
                ops.metrics.record_failure(&job.stack, &phase, e.cause());
                if refusal.is_some() {
                    // Said once, above, when it began; not once per cycle.
                    None
                } else {
                    Some(Alert::failure(
                        &ops.host,
                        &job.stack,
                        &phase,
                        &e.to_string(),
                    ))
                }
            }
        });
        for alert in alerts {
            let alert = alert.with_peer(&job.target_name);
            if alerts_in_background {
                ops.alert_in_background(alert);
            } else {
                ops.alert(alert).await;
            }
        }
        (stats, result)
    }
}

/// `push STACK…`: one cycle of each named stack now, one after the other. A stack whose cycle
/// is already running (the daemon's, or another `push`) is refused with a clear error in its
/// outcome, or waited for with `wait`.
pub async fn push(
    common: &Common,
    stacks: &[String],
    opts: PushOptions,
) -> anyhow::Result<Vec<PushOutcome>> {
    let cfg = load_config(common)?;
    let jobs = stacks
        .iter()
        .map(|name| {
            let mut job = job_to(&cfg, common, name, opts.to.as_deref())?;
            job.replace_diverged = opts.replace_diverged || opts.fail_back;
            job.hand_over = opts.fail_back;
            Ok(job)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let agent = Agent::new(&cfg, &common.state_dir)?;
    let shutdown = shutdown_on_signal();
    let viewer = Viewer::new(opts.style);
    let mut out = Vec::new();
    for job in &jobs {
        if *shutdown.borrow() {
            break;
        }
        let started = std::time::Instant::now();
        // A dry run writes nothing anywhere, not even a lock file; a real cycle of the same
        // stack at the same time makes the target refuse it as busy.
        let _lock = if opts.mode == Mode::DryRun {
            None
        } else {
            let lock = if opts.wait {
                StackLock::acquire_waiting(
                    &common.state_dir,
                    &job.stack,
                    Duration::from_millis(500),
                    shutdown.clone(),
                )
                .await
            } else {
                StackLock::try_acquire(&common.state_dir, &job.stack)
            };
            match lock {
                Ok(lock) => Some(lock),
                Err(e) => {
                    warn!(stack = %job.stack, "{e}");
                    out.push(refused(job, &e.to_string(), started.elapsed()));
                    continue;
                }
            }
        };
        let progress = CycleProgress::new();
        let watch = viewer.watch(&job.stack, progress.clone());
        let (stats, result) = agent
            .cycle(job, opts.mode, shutdown.clone(), &progress, false)
            .await;
        watch.finish().await;
        out.push(outcome(job, &stats, result));
    }
    // Progress lines out before the caller prints the summary; bounded, so that a stdout nobody
    // reads cannot keep the process from ending.
    let flushed = tokio::task::spawn_blocking(move || viewer.finish());
    let _ = tokio::time::timeout(Duration::from_secs(5), flushed).await;
    if opts.mode == Mode::Sync
        && let Some(url) = &cfg.push_gateway
        && let Err(e) = metrics::push_gateway(url, "stackclone-source", &agent.ops.metrics).await
    {
        warn!(url = %url, error = %e, "could not push metrics to the Pushgateway");
    }
    // Closing a connection sends its CONNECTION_CLOSE at once; waiting for the endpoint to be
    // idle would then wait out the draining period too (three probe timeouts, some 80 ms on a
    // fast link), which only guards against stray packets of a connection already over. A
    // short bound gives the close time to leave (the peer would otherwise wait for its idle
    // timeout) without billing every push for the drain.
    let _ = tokio::time::timeout(CLOSE_GRACE, agent.ctx.endpoint.wait_idle()).await;
    Ok(out)
}

fn refused(job: &StackJob, error: &str, took: Duration) -> PushOutcome {
    PushOutcome {
        stack: job.stack.clone(),
        ok: false,
        generation: 0,
        files: 0,
        bytes: 0,
        files_sent: 0,
        bytes_sent: 0,
        source_downtime_ms: None,
        target_downtime_ms: None,
        stop_killed: Vec::new(),
        standby_killed: Vec::new(),
        duration_ms: took.as_millis() as u64,
        error: Some(error.to_owned()),
        plan: None,
        mounts: Vec::new(),
        target: job.target_name.clone(),
        replaced: None,
        handed_over: false,
    }
}

pub(crate) fn job_for(cfg: &SourceConfig, common: &Common, name: &str) -> anyhow::Result<StackJob> {
    job_to(cfg, common, name, None)
}

/// [`job_for`], pushing to `[targets.TO]` instead of the stack's own target when given.
fn job_to(
    cfg: &SourceConfig,
    common: &Common,
    name: &str,
    to: Option<&str>,
) -> anyhow::Result<StackJob> {
    let Some(stack) = cfg.stack(name) else {
        if cfg.skipped.iter().any(|s| s.name == name) {
            bail!("stack `{name}` has `skip = true` in its config file");
        }
        bail!("no stack `{name}` in {} or its conf.d", cfg.file.display());
    };
    let target = match to {
        Some(to) => cfg.targets.get(to).with_context(|| {
            let known: Vec<&str> = cfg.targets.keys().map(String::as_str).collect();
            format!(
                "--to {to}: no `[targets.{to}]` in {} (configured: {})",
                cfg.file.display(),
                known.join(", ")
            )
        })?,
        None => cfg.target_of(stack).with_context(|| {
            format!(
                "stack `{name}` names target `{}`, which is not configured",
                stack.target
            )
        })?,
    };
    let addr = target
        .address
        .resolve()
        .with_context(|| format!("target `{}`", target.name))?;
    Ok(job_from(stack, target.name.clone(), addr, common))
}

fn job_from(
    stack: &SourceStack,
    target_name: String,
    target_addr: std::net::SocketAddr,
    common: &Common,
) -> StackJob {
    let base_record = common
        .state_dir
        .join(format!("{}.to-{}.manifest", stack.name, target_name));
    StackJob {
        stack: stack.name.clone(),
        path: stack.path.clone(),
        exclude: stack.exclude.clone(),
        precopy: stack.precopy,
        stop: stack.stop,
        allow_empty: stack.allow_empty,
        max_delete: stack.max_delete.get(),
        on_stop_timeout: stack.on_stop_timeout,
        checksum: stack.checksum,
        compress: stack.compress,
        bandwidth_limit: stack.bandwidth_limit.map(|b| b.get()),
        cache: Some(common.state_dir.join(format!("{}.hashcache", stack.name))),
        compose: compose_config(stack, &common.state_dir),
        ignore_mounts: stack.ignore_mounts.clone(),
        extra_paths: stack.extra_paths.clone(),
        target_name,
        target_addr,
        replace_diverged: false,
        hand_over: false,
        on_superseded: stack.on_superseded,
        lineage: common.state_dir.join(format!("{}.lineage", stack.name)),
        base_record: Some(base_record),
    }
}

/// The Compose project of a stack with `docker = true`, recording what its stops stop in the
/// state dir.
fn compose_config(stack: &SourceStack, state_dir: &Path) -> Option<ComposeConfig> {
    stack.docker.then(|| {
        ComposeConfig::for_source(stack).with_restart_record(restart_record(state_dir, &stack.name))
    })
}

/// The target's refusal of this host's pushes for lineage reasons (promoted there, diverged, or
/// the target is the primary), if that is how the cycle ended.
fn lineage_refusal(result: &Result<(), PushError>) -> Option<&Refusal> {
    match result {
        Err(PushError::Cycle(CycleError {
            cause: Cause::Refused(r),
            ..
        })) if matches!(
            r,
            Refusal::Promoted { .. } | Refusal::Diverged { .. } | Refusal::TargetIsPrimary { .. }
        ) =>
        {
            Some(r)
        }
        _ => None,
    }
}

/// `on_superseded = "stop"`: stops the local stack once, without a restart record (nothing
/// starts it again behind the operator's back).
async fn fence(state_dir: &Path, job: &StackJob) {
    let Some(cfg) = &job.compose else { return };
    let cfg = ComposeConfig {
        restart_record: None,
        ..cfg.clone()
    };
    let stopped = match ComposeStack::connect(cfg).await {
        Ok(control) => control.stop().await.map(|_| ()),
        Err(e) => Err(e),
    };
    match stopped {
        Ok(()) => {
            warn!(stack = %job.stack, "on_superseded = \"stop\": the local stack is stopped");
            if let Ok(Some(mut st)) = status::load(state_dir, &job.stack) {
                st.fenced_at = Some(crate::push::unix_now());
                let _ = status::store(state_dir, &st);
            }
        }
        Err(e) => {
            warn!(stack = %job.stack, error = %e, "on_superseded = \"stop\": stopping the local stack failed")
        }
    }
}

/// Writes the cycle's outcome into the stack's status file; the status before and after.
fn record(
    dir: &std::path::Path,
    job: &StackJob,
    stats: &CycleStats,
    result: &Result<(), PushError>,
) -> (StackStatus, StackStatus) {
    let mut st = status::load(dir, &job.stack)
        .ok()
        .flatten()
        .unwrap_or_else(|| StackStatus {
            stack: job.stack.clone(),
            role: "primary".into(),
            ..Default::default()
        });
    let before = st.clone();
    st.target = job.target_name.clone();
    let now = crate::push::unix_now();
    st.last_attempt_at = Some(now);
    if let Some(h) = stats.history {
        st.history = Some(h.to_string());
    }
    match lineage_refusal(result) {
        Some(r) => {
            let role = match r {
                Refusal::Diverged { .. } => "diverged",
                _ => "superseded",
            };
            if st.role != role {
                st.role = role.into();
                st.refused_since = Some(now);
                st.fenced_at = None;
            }
            if let Refusal::Promoted { at, .. } | Refusal::TargetIsPrimary { at, .. } = r {
                st.promoted_at = Some(*at);
            }
        }
        None if result.is_ok() => {
            st.role = "primary".into();
            st.refused_since = None;
            st.promoted_at = None;
            st.fenced_at = None;
            st.handed_over_at = stats.report.handed_over.then_some(now);
        }
        None => {}
    }
    // Only a cycle that got to ask Docker knows the mounts; keep the last known otherwise.
    if !stats.mounts.is_empty() {
        st.mounts = stats.mounts.iter().map(MountStatus::from).collect();
    }
    match result {
        Ok(()) => {
            st.generation = stats.report.generation;
            st.committed_at = Some(now);
            st.files = stats.report.files;
            st.bytes = stats.report.bytes;
            st.bytes_sent = stats.bytes_sent;
            st.source_downtime_ms = stats.source_downtime.map(|d| d.as_millis() as u64);
            st.target_downtime_ms = stats.report.target_downtime_ms;
            st.last_error = None;
        }
        Err(e) => st.last_error = Some(e.to_string()),
    }
    if let Err(e) = status::store(dir, &st) {
        warn!(stack = %job.stack, error = %e, dir = %dir.display(), "could not write the status file");
    }
    (before, st)
}

fn outcome(job: &StackJob, s: &CycleStats, result: Result<(), PushError>) -> PushOutcome {
    PushOutcome {
        stack: job.stack.clone(),
        ok: result.is_ok(),
        generation: s.report.generation,
        files: s.report.files,
        bytes: s.report.bytes,
        files_sent: s.report.files_sent,
        bytes_sent: s.bytes_sent,
        source_downtime_ms: s.source_downtime.map(|d| d.as_millis() as u64),
        target_downtime_ms: s.report.target_downtime_ms,
        stop_killed: s.stop_killed.clone(),
        standby_killed: s.report.standby_killed.clone(),
        duration_ms: s.duration.as_millis() as u64,
        error: result.err().map(|e| e.to_string()),
        plan: s.report.plan.as_ref().map(plan_json),
        mounts: s.mounts.iter().map(MountStatus::from).collect(),
        target: job.target_name.clone(),
        replaced: s.report.replaced,
        handed_over: s.report.handed_over,
    }
}

fn plan_json(p: &stackclone_proto::msg::PlanSummary) -> serde_json::Value {
    serde_json::json!({
        "send": p.send.iter().map(|(path, size)| serde_json::json!({"path": path.to_string(), "bytes": size})).collect::<Vec<_>>(),
        "delete": p.delete.iter().map(|path| path.to_string()).collect::<Vec<_>>(),
        "send_count": p.send_count,
        "send_bytes": p.send_bytes,
        "copy_local": p.copy_local,
        "delete_count": p.delete_count,
        "meta_only": p.meta_only,
        "unchanged": p.unchanged,
    })
}

/// `status`: every configured stack's last cycle.
pub fn status(common: &Common) -> anyhow::Result<Vec<StackStatus>> {
    let cfg = SourceConfig::load_with(&common.config, &LoadOptions { check_paths: false })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    cfg.stacks
        .iter()
        .map(|s| {
            Ok(
                status::load(&common.state_dir, &s.name)?.unwrap_or_else(|| StackStatus {
                    stack: s.name.clone(),
                    target: s.target.clone(),
                    role: "primary".into(),
                    ..Default::default()
                }),
            )
        })
        .collect()
}

/// A flag that turns true on SIGTERM, SIGINT or SIGHUP: a cycle under way then ends cleanly
/// (its stack started again, nothing committed on the target unless the flag was already out).
///
/// SIGHUP is what a push typed by hand gets when its terminal or SSH session closes; by default
/// it would kill the process on the spot, with the primary's stack perhaps stopped.
pub fn shutdown_on_signal() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot listen for SIGTERM/SIGINT/SIGHUP; a signal will kill a cycle abruptly");
        return rx;
    };
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        };
        warn!(signal = name, "signal received: ending the current cycle");
        let _ = tx.send(true);
    });
    rx
}

/// Where a source records what its stop of `stack` stopped, until the start brought it back.
pub fn restart_record(state_dir: &Path, stack: &str) -> PathBuf {
    state_dir.join(format!("{stack}.stopped.json"))
}

/// Docker control for a compose stack; nothing to control for a data-only stack. In a real
/// cycle, a stack that a killed cycle left stopped is started again first (the caller holds the
/// stack's lock, so that cycle is over). A dry run never stops anything, but asks Docker for the
/// stack's mounts, so that it shows what would be replicated and fails where the push would.
async fn control_for(job: &StackJob, mode: Mode) -> Result<Arc<dyn StackControl>, PushError> {
    let docker_error = |e: stackclone_common::docker::DockerError| PushError::Docker {
        stack: job.stack.clone(),
        cause: e.to_string(),
    };
    match (&job.compose, mode) {
        (Some(cfg), Mode::Sync) => {
            let control = ComposeStack::connect(cfg.clone())
                .await
                .map_err(docker_error)?;
            control.recover_for_cycle().await.map_err(docker_error)?;
            Ok(Arc::new(control))
        }
        (Some(cfg), Mode::DryRun) => Ok(Arc::new(
            ComposeStack::connect(cfg.clone())
                .await
                .map_err(docker_error)?,
        )),
        (None, _) => Ok(Arc::new(DataOnly)),
    }
}

/// What [`recover_stopped`] found and did for one stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Recovery {
    /// No restart record: nothing was left stopped (or the stack is data-only).
    Nothing,
    /// A cycle of the stack holds its lock; it starts the stack itself when it ends.
    Busy,
    /// A process that died with the stack stopped left a record: these containers were started
    /// again (the record is gone).
    Started { containers: Vec<String> },
    /// There was a record, and the stack is still not (fully) up.
    Failed { error: String },
}

/// Starts what a process that died in a cycle of `job` left stopped (its restart record,
/// `<state-dir>/<stack>.stopped.json`), unless a cycle of the stack is running: its lock is
/// taken first, so a live cycle's own record is never touched (the kernel drops a dead
/// process's lock). The daemon runs this for every stack when it starts and every
/// [`crate::daemon::SWEEP`]; `stackclone-source recover` runs it by hand or from systemd's
/// `ExecStopPost=`.
pub async fn recover_stopped(
    stack: &str,
    compose: Option<&ComposeConfig>,
    state_dir: &Path,
) -> Recovery {
    let Some(cfg) = compose else {
        return Recovery::Nothing;
    };
    if !cfg.restart_record.as_ref().is_some_and(|p| p.exists()) {
        return Recovery::Nothing;
    }
    let _lock = match StackLock::try_acquire(state_dir, stack) {
        Ok(lock) => lock,
        Err(LockError::Busy { .. }) => return Recovery::Busy,
        Err(e) => {
            return Recovery::Failed {
                error: format!("cannot take the stack lock to recover it: {e}"),
            };
        }
    };
    let recovered = match ComposeStack::connect(cfg.clone()).await {
        Ok(control) => control.recover().await,
        Err(e) => Err(e),
    };
    match recovered {
        Ok(None) => Recovery::Nothing,
        Ok(Some(report)) => Recovery::Started {
            containers: report
                .started
                .iter()
                .map(|e| e.container.name.clone())
                .collect(),
        },
        Err(e) => Recovery::Failed {
            error: e.to_string(),
        },
    }
}

/// `recover [STACK…]`: [`recover_stopped`] for the named stacks, or every configured one.
pub async fn recover(
    common: &Common,
    stacks: &[String],
) -> anyhow::Result<Vec<(String, Recovery)>> {
    let cfg = SourceConfig::load_with(&common.config, &LoadOptions { check_paths: false })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let chosen: Vec<&SourceStack> = if stacks.is_empty() {
        cfg.stacks.iter().collect()
    } else {
        stacks
            .iter()
            .map(|name| {
                cfg.stack(name).with_context(|| {
                    format!("no stack `{name}` in {} or its conf.d", cfg.file.display())
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let mut out = Vec::with_capacity(chosen.len());
    for stack in chosen {
        let compose = compose_config(stack, &common.state_dir);
        let recovery = recover_stopped(&stack.name, compose.as_ref(), &common.state_dir).await;
        out.push((stack.name.clone(), recovery));
    }
    Ok(out)
}
