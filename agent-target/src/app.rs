//! The commands of `stackclone-target`, as library calls: `main.rs` parses flags and calls
//! these, tests call them too. `run` is the daemon's ([`crate::daemon::run`]); it builds on
//! [`bind`] and [`load_config`] from here, and this module needs nothing from it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use stackclone_certs::{Identity, StateDir, Trust};
use stackclone_common::config::{LoadOptions, TargetConfig, TargetStack};
use stackclone_common::control::StackControl;
use stackclone_common::docker::{ComposeConfig, ComposeStack, RESTART_RECORD};
use stackclone_common::metrics::Metrics;
use stackclone_common::ops::Ops;
use tracing::{info, warn};

use crate::ctx::{StackServe, TargetCtx};
use crate::store::{
    Drift, Promotion, RollbackReport, StackStore, StoreConfig, StoreError, StoreState,
};

/// Options every command shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub config: PathBuf,
    /// `--dir` / `STACKCLONE_DIR`: replaces the config's `identity_dir`.
    pub identity_dir: Option<PathBuf>,
}

/// Loads the config with the identity dir override applied; logs its warnings.
pub fn load_config(common: &Common, check_paths: bool) -> anyhow::Result<TargetConfig> {
    let mut cfg = TargetConfig::load_with(&common.config, &LoadOptions { check_paths })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(dir) = &common.identity_dir {
        cfg.identity_dir = dir.clone();
    }
    for w in &cfg.warnings {
        warn!("{w}");
    }
    Ok(cfg)
}

/// The store settings of a configured stack.
pub fn store_config(stack: &TargetStack) -> StoreConfig {
    StoreConfig {
        stack: stack.name.clone(),
        path: stack.path.clone(),
        state_dir: stack.state_dir.clone(),
        keep_generations: stack.keep_generations.get(),
        allow_dangerous_root: stack.allow_dangerous_root,
    }
}

/// What the target serves for a configured stack.
pub fn stack_serve(stack: &TargetStack) -> StackServe {
    StackServe {
        stack: stack.name.clone(),
        store: store_config(stack),
        allow: stack.allow.clone(),
        compose: stack.docker.then(|| ComposeConfig::for_target(stack)),
        auto_rollback: stack.auto_rollback,
        max_age: stack.max_age,
    }
}

fn stack_of<'a>(cfg: &'a TargetConfig, name: &str) -> anyhow::Result<&'a TargetStack> {
    cfg.stack(name)
        .with_context(|| format!("no stack `{name}` in {} or its conf.d", cfg.file.display()))
}

/// A bound, ready target: what `run` serves. Split from [`run`](crate::daemon::run) so tests
/// can bind port 0 and learn the address.
#[derive(Debug)]
pub struct Bound {
    pub endpoint: quinn::Endpoint,
    pub ctx: Arc<TargetCtx>,
    /// The config it was bound with.
    pub config: TargetConfig,
    /// The identity dir its certificate came from.
    pub identity_dir: StateDir,
}

/// Loads identity, trust and config, binds the QUIC endpoint and sets up alerts and metrics
/// (nothing is sent or served yet).
pub fn bind(common: &Common) -> anyhow::Result<Bound> {
    let cfg = load_config(common, true)?;
    let dir = StateDir::new(&cfg.identity_dir);
    let identity = Identity::load(&dir).context("loading this host's identity")?;
    let trust = Trust::load(&dir).context("loading the fleet CA")?;
    if let Some(name) = &cfg.name
        && name != identity.name()
    {
        bail!(
            "config says this target is `{name}`, but its certificate is for `{}`",
            identity.name()
        );
    }
    let addr = cfg.listen.resolve().context("the listen address")?;
    let server = stackclone_certs::server_config(&identity, &trust)?;
    let endpoint = stackclone_certs::endpoint(addr, Some(server))
        .with_context(|| format!("binding UDP {addr}"))?;
    let stacks = cfg.stacks.iter().map(stack_serve).collect();
    let ops = Arc::new(Ops::new(
        identity.name(),
        cfg.alerts.clone(),
        Arc::new(Metrics::new()),
    ));
    let ctx = Arc::new(TargetCtx::new(
        &identity,
        trust,
        cfg.max_skew.as_secs() as i64,
        stacks,
        ops,
    ));
    for s in &cfg.skipped {
        info!(stack = %s.name, file = %s.file.display(), "stack skipped (skip = true)");
    }
    Ok(Bound {
        endpoint,
        ctx,
        config: cfg,
        identity_dir: dir,
    })
}

/// One stack's status, or why it cannot be read right now.
#[derive(Debug, serde::Serialize)]
pub struct StackStatus {
    #[serde(flatten)]
    pub state: StoreState,
    /// Set when a cycle holds the stack's lock.
    pub busy: bool,
    /// The stack's `max_age`, if it has a staleness watch.
    pub max_age_secs: Option<u64>,
    /// Its last commit is older than `max_age`. A stack never committed is not reported stale
    /// here (the running daemon counts its age from its own start, which `status` cannot know).
    pub stale: bool,
    /// The services this standby keeps stopped on purpose (`standby_stopped`): created, never
    /// started, so that they do not run twice.
    pub standby_stopped: Vec<String>,
    /// `standby` (pushes accepted) or `promoted` (the primary here; pushes refused).
    pub role: &'static str,
    /// Seconds since the committed generation was committed: the standby's RPO right now.
    pub age_secs: Option<u64>,
    /// The stack's containers on this host (compose stacks; filled in by [`containers`]).
    pub containers: Option<Containers>,
}

/// A stack's containers on this host, as `status` shows them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Containers {
    pub total: usize,
    pub running: usize,
    /// Services whose health check says `unhealthy` (or `starting`).
    pub not_healthy: Vec<String>,
    /// Docker could not be asked (why).
    pub error: Option<String>,
}

impl Containers {
    /// `2/2 running`, `1/2 running, unhealthy: db`, `docker: …`.
    pub fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("docker: {e}");
        }
        let mut s = format!("{}/{} running", self.running, self.total);
        if !self.not_healthy.is_empty() {
            s.push_str(&format!(", not healthy: {}", self.not_healthy.join(" ")));
        }
        s
    }
}

/// Asks Docker about each compose stack of `all` (at most `timeout` each), for `status`.
pub async fn containers(
    common: &Common,
    all: &mut [StackStatus],
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let cfg = load_config(common, false)?;
    for s in all.iter_mut() {
        let Some(stack) = cfg.stack(&s.state.stack).filter(|st| st.docker) else {
            continue;
        };
        let asked = tokio::time::timeout(timeout, async {
            let control = ComposeStack::connect(ComposeConfig::for_target(stack)).await?;
            control.containers().await
        })
        .await;
        s.containers = Some(match asked {
            Ok(Ok(list)) => Containers {
                total: list.len(),
                running: list.iter().filter(|c| c.is_running()).count(),
                not_healthy: list
                    .iter()
                    .filter(|c| c.health.as_deref().is_some_and(|h| h != "healthy"))
                    .map(|c| c.container.service.clone())
                    .collect(),
                error: None,
            },
            Ok(Err(e)) => Containers {
                error: Some(e.to_string()),
                ..Containers::default()
            },
            Err(_) => Containers {
                error: Some(format!("no answer within {} s", timeout.as_secs())),
                ..Containers::default()
            },
        });
    }
    Ok(())
}

impl StackStatus {
    fn new(state: StoreState, busy: bool, stack: &TargetStack, now: i64) -> Self {
        let max_age = stack.max_age;
        let stale = match (max_age, state.committed_at) {
            (Some(max_age), Some(at)) => {
                u64::try_from(now.saturating_sub(at)).unwrap_or(0) > max_age.as_secs()
            }
            _ => false,
        };
        let role = if state.promoted_at.is_some() {
            "promoted"
        } else {
            "standby"
        };
        let age_secs = state
            .committed_at
            .map(|at| u64::try_from(now.saturating_sub(at)).unwrap_or(0));
        StackStatus {
            state,
            busy,
            max_age_secs: max_age.map(|d| d.as_secs()),
            // A promoted stack receives no pushes by design: it is not stale.
            stale: stale && role == "standby",
            standby_stopped: stack.standby_stopped.clone(),
            role,
            age_secs,
            containers: None,
        }
    }
}

/// `status [STACK]`.
pub fn status(common: &Common, only: Option<&str>) -> anyhow::Result<Vec<StackStatus>> {
    let cfg = load_config(common, false)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut out = Vec::new();
    for stack in &cfg.stacks {
        if only.is_some_and(|o| o != stack.name) {
            continue;
        }
        match StackStore::open(store_config(stack)) {
            Ok(store) => out.push(StackStatus::new(store.state().clone(), false, stack, now)),
            Err(StoreError::Busy { path, .. }) => out.push(StackStatus::new(
                StackStore::peek_state(&path)
                    .filter(|st| st.stack == stack.name)
                    .unwrap_or_else(|| StoreState {
                        stack: stack.name.clone(),
                        ..Default::default()
                    }),
                true,
                stack,
                now,
            )),
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(o) = only
        && out.is_empty()
    {
        stack_of(&cfg, o)?;
    }
    Ok(out)
}

/// What `promote` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromoteReport {
    pub stack: String,
    /// `false`: it already was promoted (at `promoted_at`); nothing changed but the stack's
    /// containers, which are brought up either way.
    pub promoted_now: bool,
    pub promoted_at: i64,
    /// The generation the stack runs on: the last one committed here.
    pub generation: u64,
    pub committed_at: Option<i64>,
    /// The new history (32 hex digits) and the one it forked from (`<hex>@<generation>`).
    pub history: Option<String>,
    pub forked_from: Option<String>,
    /// Compose stacks: the services running and healthy afterwards.
    pub services: Vec<String>,
}

fn busy_hint(stack: &str, e: StoreError) -> anyhow::Error {
    match e {
        StoreError::Busy { .. } => anyhow::anyhow!(
            "stack `{stack}`: a cycle holds it right now; try again when it is done (or stop \
             the target daemon first)"
        ),
        e => e.into(),
    }
}

/// `promote STACK`: the standby's copy becomes the primary. Records the promotion (the state
/// file, under the stack's lock, so never in the middle of a cycle; it survives restarts),
/// starts a new history forked from the committed one, and, for a compose stack, brings the
/// stack up on the last committed generation and waits for it to be healthy. From then on every
/// push for the stack is refused. No file of the live dir changes but the lineage file, so
/// promotion loses no data. Promoting a promoted stack only brings it up again.
pub async fn promote(common: &Common, stack: &str) -> anyhow::Result<PromoteReport> {
    let cfg = load_config(common, false)?;
    let stack = stack_of(&cfg, stack)?;
    let mut store = StackStore::open(store_config(stack)).map_err(|e| busy_hint(&stack.name, e))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let history =
        stackclone_common::lineage_file::new_history().context("drawing a new history id")?;
    let promotion = store.promote(history, now)?;
    let st = store.state().clone();
    let mut report = PromoteReport {
        stack: stack.name.clone(),
        promoted_now: matches!(promotion, Promotion::Promoted { .. }),
        promoted_at: st.promoted_at.unwrap_or(now),
        generation: st.generation,
        committed_at: st.committed_at,
        history: st.history.clone(),
        forked_from: st.forked_from.clone(),
        services: Vec::new(),
    };
    if report.promoted_now {
        let host = cfg.name.clone().unwrap_or_else(|| "target".into());
        let ops = Ops::new(host, cfg.alerts.clone(), Arc::new(Metrics::new()));
        ops.alert(stackclone_common::alert::Alert::warning(
            &ops.host,
            &stack.name,
            &format!(
                "stack `{}` was promoted on this host: it runs generation {} as the primary, and \
                 pushes for it are refused until `stackclone-target demote {}`",
                stack.name, st.generation, stack.name
            ),
        ))
        .await;
    }
    if !stack.docker {
        return Ok(report);
    }
    let control = ComposeStack::connect(
        ComposeConfig::for_target(stack)
            .with_restart_record(store.state_path().join(RESTART_RECORD)),
    )
    .await
    .with_context(|| format!("stack `{}`: connecting to Docker (the promotion is recorded; run promote again to start it)", stack.name))?;
    control.recover_for_cycle().await.with_context(|| {
        format!(
            "stack `{}`: starting what a killed cycle left stopped",
            stack.name
        )
    })?;
    control.bring_up().await.with_context(|| {
        format!(
            "stack `{}`: starting it on generation {} (the promotion is recorded; fix this and \
             run promote again)",
            stack.name, st.generation
        )
    })?;
    let health = control.wait_healthy().await.with_context(|| {
        format!(
            "stack `{}`: generation {} is not healthy",
            stack.name, st.generation
        )
    })?;
    report.services = health
        .containers
        .iter()
        .map(|c| c.container.service.clone())
        .collect();
    Ok(report)
}

/// `demote STACK`: the stack is a standby again here. Pushes that continue the history this
/// copy holds (after a fail-back, the old primary's do) are accepted from now on; others are
/// refused as diverged. The containers are left as they are. Returns when it had been
/// promoted, `None` if it was not.
pub fn demote(common: &Common, stack: &str) -> anyhow::Result<Option<i64>> {
    let cfg = load_config(common, false)?;
    let stack = stack_of(&cfg, stack)?;
    let mut store = StackStore::open(store_config(stack)).map_err(|e| busy_hint(&stack.name, e))?;
    Ok(store.demote()?)
}

/// `verify STACK`: every path of the live dir that drifted from the last committed manifest.
pub fn verify(common: &Common, stack: &str) -> anyhow::Result<Vec<Drift>> {
    let cfg = load_config(common, false)?;
    let store = StackStore::open(store_config(stack_of(&cfg, stack)?))?;
    Ok(store.verify()?)
}

/// What `rollback` would do, asked before it does it.
#[derive(Debug)]
pub struct RollbackPlan {
    pub from: u64,
    pub to: u64,
    /// Against the manifest of generation `to`.
    pub changes: stackclone_proto::plan::Changes,
}

/// Resolves `--to` and compares the committed generation with the one it would restore.
pub fn rollback_plan(
    common: &Common,
    stack: &str,
    to: Option<u64>,
) -> anyhow::Result<RollbackPlan> {
    let cfg = load_config(common, false)?;
    let stack = stack_of(&cfg, stack)?;
    let store = StackStore::open(store_config(stack))?;
    let (to, changes) = store.rollback_preview(to)?;
    Ok(RollbackPlan {
        from: store.last_generation(),
        to,
        changes,
    })
}

/// `rollback STACK [--to G]`: for a compose stack, stop it, restore, start it and wait for
/// health; for a data-only stack, just restore.
pub async fn rollback(
    common: &Common,
    stack: &str,
    to: Option<u64>,
) -> anyhow::Result<RollbackReport> {
    let cfg = load_config(common, false)?;
    let stack = stack_of(&cfg, stack)?;
    let mut store = StackStore::open(store_config(stack))?;
    if !stack.docker {
        return Ok(store.rollback(to)?);
    }
    let control = ComposeStack::connect(
        ComposeConfig::for_target(stack)
            .with_restart_record(store.state_path().join(RESTART_RECORD)),
    )
    .await
    .with_context(|| format!("stack `{}`: connecting to Docker", stack.name))?;
    control.recover_for_cycle().await.with_context(|| {
        format!(
            "stack `{}`: starting what a killed cycle left stopped",
            stack.name
        )
    })?;
    if let Err(e) = control.stop().await {
        // A stop that failed part-way: bring the stack up again; the data is untouched.
        if let Err(again) = control.bring_up().await {
            warn!(stack = %stack.name, error = %again, "bringing the stack up again failed too");
        }
        return Err(anyhow::Error::new(e).context(format!("stack `{}`: stopping it", stack.name)));
    }
    let rolled = tokio::task::block_in_place(|| store.rollback(to));
    // Whatever the restore did, the stack runs again, whole (on the restored or the unchanged
    // data).
    let started = control.bring_up().await;
    let report = rolled?;
    started.with_context(|| format!("stack `{}`: starting it again", stack.name))?;
    control.wait_healthy().await.with_context(|| {
        format!(
            "stack `{}`: generation {} is not healthy",
            stack.name, report.to
        )
    })?;
    Ok(report)
}
