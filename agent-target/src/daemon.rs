//! `stackclone-target run` as a long-lived service: serving pushes, plus what keeps a standby
//! trustworthy between them.
//!
//! - **Reload** ([`Daemon::reload`], on SIGHUP): the config is read again with the same loader
//!   as at start. A config that fails to load is logged with the loader's message and changes
//!   nothing. Otherwise the new stack set is swapped in at once: added stacks are served,
//!   removed ones refused for new pushes, changed settings apply from the next cycle. A cycle
//!   under way keeps the settings it loaded its stack with and is never dropped. Alert channels
//!   and `max_skew` are replaced too; `listen`, `name`, `identity_dir` and `metrics_listen` need
//!   a restart (a reload that changes them says so and keeps the running values).
//! - **Staleness** ([`crate::staleness`]): checked on a timer; a stack past its `max_age` is
//!   alerted once, exposed as `stackclone_stale`, and re-armed by its next commit.
//! - **Metrics** on `metrics_listen` (off by default): per-stack series registered at start and
//!   on reload, the generation each store holds at start, then every cycle ([`crate::serve`]
//!   records those).
//! - **Certificate** ([`Daemon::check_certificate`], at start and hourly): the expiry metric,
//!   renewal when due ([`stackclone_certs::renewal`]), after which new connections get the new
//!   certificate; an alert, once, when it is due and cannot be renewed.
//! - **Stacks a killed target left stopped**: a compose stack whose restart record exists when
//!   the daemon starts (or when a reload adds or moves it) is started again in the background
//!   (`standby::recover_left_stopped`), retried until it works, rather than left down until
//!   the next commit.
//! - **Shutdown**: see [`serve`]; cycles still receiving end without touching live data, a
//!   commit under way finishes.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use stackclone_certs::StateDir;
use stackclone_certs::renewal::{self, Renewal};
use stackclone_common::alert::Alert;
use stackclone_common::config::TargetConfig;
use stackclone_common::docker::RESTART_RECORD;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::app::{Bound, Common, bind, load_config, stack_serve};
use crate::ctx::{StackServe, TargetCtx};
use crate::serve::serve;
use crate::staleness::{Change, check_period, human};
use crate::standby::recover_left_stopped;
use crate::store::{StackStore, StoreError, StoreState};

/// How often the host certificate is checked (and renewed when due).
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// A started target: bound, stores repaired, metrics served. [`run`](Self::run) serves it.
#[derive(Debug)]
pub struct Daemon {
    common: Common,
    endpoint: quinn::Endpoint,
    ctx: Arc<TargetCtx>,
    identity_dir: StateDir,
    /// The config in force; the lock also serialises reloads.
    config: tokio::sync::Mutex<TargetConfig>,
    metrics_addr: Option<SocketAddr>,
    /// A certificate alert was sent and the certificate has not been fine since.
    cert_alerted: AtomicBool,
    /// Wakes the staleness watch after a reload (its period may have changed).
    reloaded: Notify,
}

/// What a successful [`Daemon::reload`] changed, by stack name (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Served before and after, with different settings.
    pub changed: Vec<String>,
    /// Settings the file changed that only a restart applies (the running values stay).
    pub needs_restart: Vec<&'static str>,
}

impl Daemon {
    /// Binds (see [`bind`]), repairs every stack's store (an interrupted commit's journal is
    /// replayed, so each live dir is one whole generation again) and reads its last commit,
    /// starts (in the background) the compose stacks a killed target left stopped, and starts
    /// the metrics server if `metrics_listen` is set.
    pub async fn start(common: &Common) -> anyhow::Result<Daemon> {
        let Bound {
            endpoint,
            ctx,
            config,
            identity_dir,
        } = bind(common)?;
        let mut stacks: Vec<StackServe> = ctx.stacks().values().cloned().collect();
        stacks.sort_by(|a, b| a.stack.cmp(&b.stack));
        let opened = open_stores(stacks, true).await?;
        let now = SystemTime::now();
        for Opened { serve, state, .. } in &opened {
            ctx.ops.metrics.register_stack(&serve.stack);
            match state {
                Ok(state) => {
                    info!(stack = %serve.stack, generation = state.generation, "stack ready");
                    note_state(&ctx, state, now);
                }
                Err(e) => {
                    warn!(stack = %serve.stack, error = %e, "stack cannot be opened; pushes to it will be refused");
                    ctx.staleness.track(&serve.stack, 0, None, now);
                }
            }
        }
        recover_stopped(&ctx, &opened);
        let metrics_addr = match &config.metrics_listen {
            None => None,
            Some(listen) => {
                let addr = listen.resolve().context("metrics_listen")?;
                let bound = stackclone_common::metrics::serve(
                    addr,
                    ctx.ops.metrics.clone(),
                    ctx.shutting_down(),
                )
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
                Some(bound)
            }
        };
        Ok(Daemon {
            common: common.clone(),
            endpoint,
            ctx,
            identity_dir,
            config: tokio::sync::Mutex::new(config),
            metrics_addr,
            cert_alerted: AtomicBool::new(false),
            reloaded: Notify::new(),
        })
    }

    pub fn ctx(&self) -> &Arc<TargetCtx> {
        &self.ctx
    }

    /// The UDP address pushes are served on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Serves pushes until `shutdown` resolves, with the staleness watch and the certificate
    /// check running beside; returns once cycles that were committing have finished.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        match self.endpoint.local_addr() {
            Ok(listen) => info!(%listen, name = %self.ctx.name, "target listening"),
            Err(e) => warn!(error = %e, "target listening on an unknown address"),
        }
        let watch = tokio::spawn(self.clone().watch_staleness());
        let certs = tokio::spawn(self.clone().watch_certificate());
        serve(self.endpoint.clone(), self.ctx.clone(), shutdown).await;
        watch.abort();
        certs.abort();
        info!("target stopped");
    }

    /// Reads the config again and applies it (see the module docs). On error the running
    /// config stays, and the error (the loader's message: file, line, key) is logged and
    /// returned.
    pub async fn reload(&self) -> anyhow::Result<ReloadReport> {
        let mut current = self.config.lock().await;
        let common = self.common.clone();
        let loaded = tokio::task::spawn_blocking(move || load_config(&common, true))
            .await
            .context("config reload task")
            .and_then(|r| r);
        let next = match loaded {
            Ok(cfg) => cfg,
            Err(e) => {
                error!(error = %format!("{e:#}"), "config reload failed; the running config stays");
                return Err(e);
            }
        };
        let mut report = ReloadReport::default();
        for (setting, differs) in [
            ("listen", next.listen != current.listen),
            ("name", next.name != current.name),
            ("identity_dir", next.identity_dir != current.identity_dir),
            (
                "metrics_listen",
                next.metrics_listen != current.metrics_listen,
            ),
        ] {
            if differs {
                warn!(
                    setting,
                    "changed in the config, but only a restart applies it; the running value stays"
                );
                report.needs_restart.push(setting);
            }
        }

        let old = self.ctx.stacks();
        let stacks: Vec<StackServe> = next.stacks.iter().map(stack_serve).collect();
        let names: BTreeSet<String> = stacks.iter().map(|s| s.stack.clone()).collect();
        for s in &stacks {
            match old.get(&s.stack) {
                None => report.added.push(s.stack.clone()),
                Some(before) if before != s => report.changed.push(s.stack.clone()),
                Some(_) => {}
            }
        }
        report.removed = old
            .keys()
            .filter(|n| !names.contains(n.as_str()))
            .cloned()
            .collect();
        report.added.sort();
        report.changed.sort();
        report.removed.sort();

        // Repair and read the stores of new and moved stacks before serving them.
        let to_open: Vec<StackServe> = stacks
            .iter()
            .filter(|s| {
                old.get(&s.stack)
                    .is_none_or(|before| before.store != s.store)
            })
            .cloned()
            .collect();
        let now = SystemTime::now();
        let opened = open_stores(to_open, false).await?;
        for Opened { serve, state, .. } in &opened {
            match state {
                Ok(state) => note_state(&self.ctx, state, now),
                // A cycle with the old settings holds it: what the watch knows stays.
                Err(StoreError::Busy { .. }) if self.ctx.staleness.get(&serve.stack).is_some() => {}
                Err(e) => {
                    if !matches!(e, StoreError::Busy { .. }) {
                        warn!(stack = %serve.stack, error = %e, "stack cannot be opened; pushes to it will be refused");
                    }
                    self.ctx.staleness.track(&serve.stack, 0, None, now);
                }
            }
        }

        self.ctx.replace_stacks(stacks);
        recover_stopped(&self.ctx, &opened);
        self.ctx.staleness.retain(|n| names.contains(n));
        let metrics = &self.ctx.ops.metrics;
        for removed in &report.removed {
            metrics.set_stale(removed, false);
        }
        for name in &names {
            metrics.register_stack(name);
        }
        self.ctx.set_max_skew_secs(next.max_skew.as_secs() as i64);
        self.ctx.ops.set_alerts(next.alerts.clone());
        for s in &next.skipped {
            info!(stack = %s.name, file = %s.file.display(), "stack skipped (skip = true)");
        }
        info!(
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            "config reloaded"
        );
        *current = next;
        drop(current);
        self.reloaded.notify_one();
        Ok(report)
    }

    /// Checks the host certificate, renews it when due (see [`stackclone_certs::renewal`]),
    /// sets `stackclone_certificate_expiry_timestamp_seconds{cert="host"}`, and alerts once
    /// while it is due and cannot be renewed. After a renewal, new connections are served with
    /// the new certificate. Returns what the check found (an error: the identity could not be
    /// read at all).
    pub async fn check_certificate(&self) -> Result<Renewal, stackclone_certs::TrustError> {
        let checked =
            renewal::renew_if_due(&self.identity_dir, time::OffsetDateTime::now_utc()).await;
        let outcome = match checked {
            Ok(outcome) => outcome,
            Err(e) => {
                error!(error = %e, "cannot read this host's certificate to check its expiry");
                return Err(e);
            }
        };
        let expires = outcome.expires();
        self.ctx
            .ops
            .metrics
            .set_certificate_expiry("host", SystemTime::from(expires));
        let expires_text = rfc3339(expires);
        let left = human(
            (expires - time::OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or_default(),
        );
        let problem = match &outcome {
            Renewal::NotDue { .. } => {
                debug!(expires = %expires_text, "host certificate not due for renewal");
                None
            }
            Renewal::Renewed { identity } => {
                match stackclone_certs::server_config(identity, &self.ctx.trust) {
                    Ok(config) => {
                        self.endpoint.set_server_config(Some(config));
                        info!(expires = %expires_text, fingerprint = %identity.info().fingerprint, "host certificate renewed; new connections use it");
                        None
                    }
                    Err(e) => Some(format!(
                        "the certificate was renewed (new one expires {expires_text}) but cannot \
                         be served: {e}; restart the target"
                    )),
                }
            }
            Renewal::DueButNoServer { .. } => Some(format!(
                "the host certificate expires {expires_text} (in {left}) and this host cannot \
                 renew it on its own (no enrollment server recorded): run `stackclone-certs \
                 renew --server HOST:PORT` here, or sign a new one offline"
            )),
            Renewal::Failed { error, .. } => Some(format!(
                "the host certificate expires {expires_text} (in {left}) and renewing it \
                 failed: {error}"
            )),
        };
        match problem {
            None => self.cert_alerted.store(false, Ordering::Relaxed),
            Some(message) => {
                warn!(expires = %expires_text, "{message}");
                if !self.cert_alerted.swap(true, Ordering::Relaxed) {
                    let ops = &self.ctx.ops;
                    ops.alert_in_background(Alert::cert_expiry(&ops.host, &message));
                }
            }
        }
        Ok(outcome)
    }

    async fn watch_certificate(self: Arc<Self>) {
        loop {
            let _ = self.check_certificate().await;
            renewal::refresh_deny_list(&self.identity_dir).await;
            tokio::time::sleep(CERT_CHECK_INTERVAL).await;
        }
    }

    async fn watch_staleness(self: Arc<Self>) {
        let ctx = &self.ctx;
        loop {
            let period = check_period(&ctx.max_ages());
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = self.reloaded.notified() => {}
            }
            for change in ctx.staleness.check(&watched(ctx), SystemTime::now()) {
                match change {
                    Change::Stale {
                        stack,
                        age,
                        max_age,
                        freshness,
                    } => {
                        let since = match freshness.committed_at {
                            Some(at) => format!(
                                "no generation committed for {} (the last at {})",
                                human(age),
                                rfc3339(at.into())
                            ),
                            None => format!(
                                "no generation committed since the target started watching it \
                                 {} ago",
                                human(age)
                            ),
                        };
                        let message = format!("{since}; max_age is {}", human(max_age));
                        warn!(%stack, age_secs = age.as_secs(), max_age_secs = max_age.as_secs(), "stack is stale: {message}");
                        ctx.ops.metrics.set_stale(&stack, true);
                        let mut alert = Alert::staleness(&ctx.ops.host, &stack, &message);
                        if freshness.generation > 0 {
                            alert = alert.with_generation(freshness.generation);
                        }
                        ctx.ops.alert_in_background(alert);
                    }
                    Change::Fresh { stack } => {
                        info!(%stack, "stack no longer stale (its max_age changed)");
                        ctx.ops.metrics.set_stale(&stack, false);
                    }
                }
            }
        }
    }
}

/// The stacks the staleness watch judges, with their `max_age`: a stack promoted on this host
/// receives no pushes by design, so it has none (and `stackclone_promoted` says why).
fn watched(ctx: &TargetCtx) -> crate::staleness::MaxAges {
    let mut ages = ctx.max_ages();
    for serve in ctx.stacks().values() {
        let promoted = StackStore::peek_state(&serve.store.state_path())
            .is_some_and(|st| st.stack == serve.stack && st.promoted_at.is_some());
        ctx.ops.metrics.set_promoted(&serve.stack, promoted);
        if promoted {
            ages.insert(serve.stack.clone(), None);
        }
    }
    ages
}

/// `run`: serves pushes until SIGTERM or Ctrl-C, reloading the config on SIGHUP (see the
/// [module docs](self)).
pub async fn run(common: &Common) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // First of all: SIGHUP's default action would end the process.
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let daemon = Arc::new(Daemon::start(common).await?);
    let reloader = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                info!("SIGHUP: reloading the config");
                // A failed reload has been logged and changed nothing.
                let _ = daemon.reload().await;
            }
        })
    };
    daemon.run(shutdown_signal()).await;
    reloader.abort();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// One stack's store, opened: its state, and the restart record a killed target left if the
/// stack is still stopped because of it.
struct Opened {
    serve: StackServe,
    state: Result<StoreState, StoreError>,
    left_stopped: Option<PathBuf>,
}

/// Opens each stack's store on a blocking thread (replaying an interrupted commit) and reads
/// its state. With `scrub` (when the daemon starts, after whatever stopped the last one), staged
/// objects are re-hashed and the damaged ones removed, see [`StackStore::scrub_staging`]; a
/// scrub that fails is logged (the commit checks every object again anyway).
async fn open_stores(stacks: Vec<StackServe>, scrub: bool) -> anyhow::Result<Vec<Opened>> {
    tokio::task::spawn_blocking(move || {
        stacks
            .into_iter()
            .map(|serve| {
                let store = match StackStore::open(serve.store.clone()) {
                    Ok(store) => store,
                    Err(e) => {
                        return Opened {
                            serve,
                            state: Err(e),
                            left_stopped: None,
                        };
                    }
                };
                if scrub {
                    match store.scrub_staging() {
                        Ok((kept, removed)) if kept + removed > 0 => {
                            info!(stack = %serve.stack, kept, removed, "staging checked");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!(stack = %serve.stack, error = %e, "could not check the staging area; the commit checks every object it uses");
                        }
                    }
                }
                let record = store.state_path().join(RESTART_RECORD);
                Opened {
                    left_stopped: (serve.compose.is_some() && record.exists()).then_some(record),
                    state: Ok(store.state().clone()),
                    serve,
                }
            })
            .collect()
    })
    .await
    .context("opening the stack stores")
}

/// Starts, in the background, every stack a killed target left stopped (each holds its stack
/// as a cycle would, so a push meanwhile is refused as busy rather than racing it).
fn recover_stopped(ctx: &Arc<TargetCtx>, opened: &[Opened]) {
    for o in opened {
        if let Some(record) = &o.left_stopped {
            info!(stack = %o.serve.stack, record = %record.display(), "the stack was left stopped by a killed target; starting it");
            tokio::spawn(recover_left_stopped(
                ctx.clone(),
                o.serve.clone(),
                record.clone(),
            ));
        }
    }
}

/// Tells the staleness watch and the metrics what a store holds.
fn note_state(ctx: &TargetCtx, state: &StoreState, now: SystemTime) {
    let committed_at = state.committed_at.and_then(unix_time);
    ctx.staleness
        .track(&state.stack, state.generation, committed_at, now);
    if state.generation > 0
        && let Some(at) = committed_at
    {
        ctx.ops
            .metrics
            .record_generation(&state.stack, state.generation, at);
    }
}

fn unix_time(secs: i64) -> Option<SystemTime> {
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
