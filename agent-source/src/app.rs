//! The commands of `stackclone-source`, as library calls: `main.rs` parses flags and calls
//! these, tests call them too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use stackclone_certs::{Identity, StateDir, Trust};
use stackclone_common::alert::Alert;
use stackclone_common::config::{LoadOptions, SourceConfig, SourceStack};
use stackclone_common::control::{DataOnly, StackControl};
use stackclone_common::docker::{ComposeConfig, ComposeStack};
use stackclone_common::metrics::{self, Metrics};
use stackclone_common::ops::Ops;
use stackclone_proto::msg::Mode;
use tracing::warn;

use crate::lock::{LockError, StackLock};
use crate::progress::{CycleProgress, Style, Viewer};
use crate::push::{Ctx, CycleStats, PushError, StackJob, run_cycle};
use crate::status::{self, StackStatus};

/// Where the source keeps its state (status files, hash caches) when not told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stackclone";

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
    pub source_downtime_ms: Option<u64>,
    pub target_downtime_ms: Option<u64>,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// Dry run only.
    pub plan: Option<serde_json::Value>,
}

/// How `push` runs.
#[derive(Debug, Clone, Copy)]
pub struct PushOptions {
    pub mode: Mode,
    /// Wait for a cycle of the same stack (the daemon's or another `push`) to end instead of
    /// refusing at once.
    pub wait: bool,
    pub style: Style,
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
        let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid literal address"))
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
    /// before this returns (a one-shot `push`, which exits next).
    pub async fn cycle(
        &self,
        job: &StackJob,
        mode: Mode,
        shutdown: tokio::sync::watch::Receiver<bool>,
        progress: &Arc<CycleProgress>,
        alerts_in_background: bool,
    ) -> Result<CycleStats, PushError> {
        let result = match control_for(job, mode).await {
            Ok(control) => run_cycle(&self.ctx, job, mode, control, shutdown, progress).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            warn!(
                stack = %job.stack,
                peer = %job.target_name,
                phase = %e.phase(),
                error = %e,
                "cycle failed"
            );
        }
        if mode == Mode::DryRun {
            return result;
        }
        record(&self.state_dir, job, &result);
        let ops = &self.ops;
        let alert = match &result {
            Ok(stats) => {
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
                Alert::success(
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
                )
            }
            Err(e) => {
                let phase = e.phase();
                ops.metrics.record_failure(&job.stack, &phase);
                Alert::failure(&ops.host, &job.stack, &phase, &e.to_string())
            }
        }
        .with_peer(&job.target_name);
        if alerts_in_background {
            ops.alert_in_background(alert);
        } else {
            ops.alert(alert).await;
        }
        result
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
        .map(|name| job_for(&cfg, common, name))
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
        let result = agent
            .cycle(job, opts.mode, shutdown.clone(), &progress, false)
            .await;
        watch.finish().await;
        out.push(outcome(job, result));
    }
    if opts.mode == Mode::Sync
        && let Some(url) = &cfg.push_gateway
        && let Err(e) = metrics::push_gateway(url, "stackclone-source", &agent.ops.metrics).await
    {
        warn!(url = %url, error = %e, "could not push metrics to the Pushgateway");
    }
    agent.ctx.endpoint.wait_idle().await;
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
        duration_ms: took.as_millis() as u64,
        error: Some(error.to_owned()),
        plan: None,
    }
}

pub(crate) fn job_for(cfg: &SourceConfig, common: &Common, name: &str) -> anyhow::Result<StackJob> {
    let Some(stack) = cfg.stack(name) else {
        if cfg.skipped.iter().any(|s| s.name == name) {
            bail!("stack `{name}` has `skip = true` in its config file");
        }
        bail!("no stack `{name}` in {} or its conf.d", cfg.file.display());
    };
    let target = cfg.target_of(stack).with_context(|| {
        format!(
            "stack `{name}` names target `{}`, which is not configured",
            stack.target
        )
    })?;
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
    StackJob {
        stack: stack.name.clone(),
        path: stack.path.clone(),
        exclude: stack.exclude.clone(),
        precopy: stack.precopy,
        stop: stack.stop,
        allow_empty: stack.allow_empty,
        max_delete: stack.max_delete.get(),
        checksum: stack.checksum,
        compress: stack.compress,
        bandwidth_limit: stack.bandwidth_limit.map(|b| b.get()),
        cache: Some(common.state_dir.join(format!("{}.hashcache", stack.name))),
        compose: stack.docker.then(|| {
            ComposeConfig::for_source(stack)
                .with_restart_record(restart_record(&common.state_dir, &stack.name))
        }),
        target_name,
        target_addr,
    }
}

fn record(dir: &std::path::Path, job: &StackJob, result: &Result<CycleStats, PushError>) {
    let mut st = status::load(dir, &job.stack)
        .ok()
        .flatten()
        .unwrap_or_else(|| StackStatus {
            stack: job.stack.clone(),
            ..Default::default()
        });
    st.target = job.target_name.clone();
    let now = crate::push::unix_now();
    st.last_attempt_at = Some(now);
    match result {
        Ok(stats) => {
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
}

fn outcome(job: &StackJob, result: Result<CycleStats, PushError>) -> PushOutcome {
    match result {
        Ok(s) => PushOutcome {
            stack: job.stack.clone(),
            ok: true,
            generation: s.report.generation,
            files: s.report.files,
            bytes: s.report.bytes,
            files_sent: s.report.files_sent,
            bytes_sent: s.bytes_sent,
            source_downtime_ms: s.source_downtime.map(|d| d.as_millis() as u64),
            target_downtime_ms: s.report.target_downtime_ms,
            duration_ms: s.duration.as_millis() as u64,
            error: None,
            plan: s.report.plan.as_ref().map(plan_json),
        },
        Err(e) => refused(job, &e.to_string(), Duration::ZERO),
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
                    ..Default::default()
                }),
            )
        })
        .collect()
}

/// A flag that turns true on SIGTERM or SIGINT: a cycle under way then ends cleanly (its stack
/// started again, nothing committed on the target unless the flag was already out).
pub fn shutdown_on_signal() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot listen for SIGTERM/SIGINT; a signal will kill a cycle abruptly");
        return rx;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("signal received: ending the current cycle");
        let _ = tx.send(true);
    });
    rx
}

/// Where a source records what its stop of `stack` stopped, until the start brought it back.
pub fn restart_record(state_dir: &Path, stack: &str) -> PathBuf {
    state_dir.join(format!("{stack}.stopped.json"))
}

/// Docker control for a compose stack in a real cycle; nothing to control for a data-only stack
/// or a dry run (which never stops anything). A stack that a killed cycle left stopped is
/// started again first (the caller holds the stack's lock, so that cycle is over).
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
        _ => Ok(Arc::new(DataOnly)),
    }
}

/// Starts what a killed cycle of `job` left stopped, unless a cycle of it is running (which
/// recovers it itself). The daemon does this when a stack's task starts, so a stack is not
/// left down until its next firing.
pub async fn recover_stopped(job: &StackJob, state_dir: &Path) {
    let Some(cfg) = &job.compose else { return };
    if !cfg.restart_record.as_ref().is_some_and(|p| p.exists()) {
        return;
    }
    let _lock = match StackLock::try_acquire(state_dir, &job.stack) {
        Ok(lock) => lock,
        Err(LockError::Busy { .. }) => return,
        Err(e) => {
            warn!(stack = %job.stack, error = %e, "cannot take the stack lock to recover it");
            return;
        }
    };
    let recovered = match ComposeStack::connect(cfg.clone()).await {
        Ok(control) => control.recover_for_cycle().await,
        Err(e) => Err(e),
    };
    if let Err(e) = recovered {
        warn!(stack = %job.stack, error = %e, "could not start what a killed cycle left stopped");
    }
}
