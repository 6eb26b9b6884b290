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
use crate::store::{Drift, RollbackReport, StackStore, StoreConfig, StoreError, StoreState};

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
    let endpoint =
        quinn::Endpoint::server(server, addr).with_context(|| format!("binding UDP {addr}"))?;
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
        StackStatus {
            state,
            busy,
            max_age_secs: max_age.map(|d| d.as_secs()),
            stale,
            standby_stopped: stack.standby_stopped.clone(),
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
