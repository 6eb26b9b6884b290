//! The standby's stack around a cycle: stop it when the final pass begins, commit with it
//! stopped, bring it up whole and health-check it, roll back an unhealthy generation, and start
//! what a killed target left stopped.
//!
//! The session decides when ([`TargetAction::StopStack`](stackclone_proto::session::TargetAction),
//! `StartStack`, `Commit`); this module does it with a [`StackControl`]: Docker for a compose
//! stack, nothing for a data-only one.
//!
//! - **Stop early, plan stopped.** The standby is stopped as the source's final pass begins,
//!   and the final pass is planned against a scan of the stopped live dir (see the session's
//!   docs). So when the commit runs, the stack is already down: the target's downtime is the
//!   final pass plus the commit, which pre-copy keeps short.
//! - **Whole, running, healthy.** After a commit (and after a cycle that ended without one) the
//!   standby is brought up with [`StackControl::bring_up`]: created if it has no containers,
//!   every stopped container started whatever stopped it, every service of the definition
//!   created; then health covers every container, and a stack with none is never healthy.
//! - **The definition the commit brought is the one that runs.** `bring_up` compares the
//!   containers with the compose definition now in the live dir (for Compose, through its
//!   config hashes), so a commit that changed an image, an environment variable, an
//!   `env_file:` or the set of services has the changed containers recreated, new ones created
//!   and removed ones removed before health is checked; a commit that changed none of that
//!   restarts the same containers. A rollback restores the old files and brings the containers
//!   back to the old definition the same way. Services the stack file keeps stopped
//!   (`standby_stopped`) are created and never started, and health does not wait for them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stackclone_common::control::{DataOnly, StackControl};
use stackclone_common::docker::{ComposeConfig, ComposeStack, RESTART_RECORD, StopReport};
use stackclone_proto::msg::Phase;
use stackclone_proto::session::Commit;
use tracing::{debug, info, warn};

use crate::ctx::{StackServe, TargetCtx};
use crate::store::StackStore;

/// The stack's control: Docker for a compose stack, nothing for a data-only one. What a stop
/// stopped is recorded in the store's state dir, and a stack a killed target left stopped (and
/// the daemon's start has not recovered yet) is started again here, before the cycle stops it.
pub(crate) async fn control_for(
    serve: &StackServe,
    state_path: &Path,
) -> Result<Arc<dyn StackControl>, String> {
    let Some(cfg) = &serve.compose else {
        return Ok(Arc::new(DataOnly));
    };
    let cfg = cfg
        .clone()
        .with_restart_record(state_path.join(RESTART_RECORD));
    let control = ComposeStack::connect(cfg)
        .await
        .map_err(|e| e.to_string())?;
    control
        .recover_for_cycle()
        .await
        .map_err(|e| format!("starting what a killed cycle left stopped: {e}"))?;
    Ok(Arc::new(control))
}

/// Stops the standby's stack for the final pass. The control comes back whenever it exists,
/// also when the stop failed part-way, so that what it stopped can be started again.
pub(crate) async fn stop(
    serve: &StackServe,
    state_path: &Path,
) -> (Option<Arc<dyn StackControl>>, Result<StopReport, String>) {
    let control = match control_for(serve, state_path).await {
        Ok(c) => c,
        Err(e) => return (None, Err(format!("docker: {e}"))),
    };
    let stopped = control.stop().await.map_err(|e| e.to_string());
    (Some(control), stopped)
}

/// Starts what a killed target left stopped of `serve`'s stack (its restart record is
/// `record`). The daemon does this when it starts, so a standby is not left down until the next
/// commit. Each try holds the stack as a cycle would (a push meanwhile is refused as busy) and
/// its store's lock (so `stackclone-target rollback` cannot run beside it). A try that cannot
/// run yet (the engine does not answer, a push or a rollback holds the stack) is repeated with a
/// growing pause, at most a minute, until the record is gone or the target shuts down.
pub(crate) async fn recover_left_stopped(
    ctx: Arc<TargetCtx>,
    serve: StackServe,
    record: std::path::PathBuf,
) {
    let shutdown = ctx.shutting_down();
    tokio::pin!(shutdown);
    let mut pause = Duration::from_secs(1);
    while record.exists() {
        match recover_once(&ctx, &serve).await {
            Ok(()) => return,
            Err(why) => warn!(stack = %serve.stack, error = %why, retry_in_secs = pause.as_secs(),
                "cannot start what a killed target left stopped yet; trying again"),
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = &mut shutdown => return,
        }
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

async fn recover_once(ctx: &Arc<TargetCtx>, serve: &StackServe) -> Result<(), String> {
    let Some(_held) = ctx.claim_idle(&serve.stack) else {
        return Err("a push holds the stack".into());
    };
    let config = serve.store.clone();
    let store = tokio::task::spawn_blocking(move || StackStore::open(config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    control_for(serve, store.state_path()).await.map(drop)
}

/// Commits a verified generation and brings the stack up; returns the target's downtime, from
/// the stop (`down_since`, when the final pass began) to the stack running again.
///
/// The standby is already stopped (`control` stopped it), unless [`Commit::without_stop`]: a
/// generation that changes nothing is committed while the stack keeps running (no downtime,
/// no restart of a running container; one that is not running is brought up). Otherwise: prepare, commit (which refuses if the live dir is no longer exactly
/// what the plan was made against), bring the stack up whole and wait for it to be healthy. A
/// refused or failed commit leaves the previous generation live and brings it up again; an
/// unhealthy stack is rolled back to the previous generation (with `auto_rollback`) and the
/// cycle is reported failed.
///
/// The store work runs with `block_in_place`: it owns the store, and a commit must not be torn
/// apart by task cancellation.
pub(crate) async fn commit_stack(
    store: StackStore,
    commit: Commit,
    serve: &StackServe,
    stopped: Option<(Arc<dyn StackControl>, Instant)>,
    bytes_received: u64,
) -> (Result<u64, (Phase, String)>, StackStore) {
    let state_path = store.state_path().to_path_buf();
    let connect = || control_for(serve, &state_path);
    commit_with(
        store,
        commit,
        serve.auto_rollback,
        stopped,
        bytes_received,
        connect,
    )
    .await
}

/// [`commit_stack`], where the control for a commit without a stop comes from `connect`, called
/// once that commit is done: the stack's own (see [`control_for`]), or a test's fake.
async fn commit_with<F, Fut>(
    mut store: StackStore,
    commit: Commit,
    auto_rollback: bool,
    stopped: Option<(Arc<dyn StackControl>, Instant)>,
    bytes_received: u64,
    connect: F,
) -> (Result<u64, (Phase, String)>, StackStore)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Arc<dyn StackControl>, String>>,
{
    let generation = commit.generation();
    let started = Instant::now();
    if commit.without_stop() {
        let applied = tokio::task::block_in_place(|| {
            let prepared = store.prepare(&commit)?;
            store.commit_unchanged(prepared, unix_now())
        });
        if let Err(e) = applied {
            return (Err((Phase::Commit, e.to_string())), store);
        }
        let _ = store.record_cycle(|r| {
            r.target_downtime_ms = 0;
            r.bytes_sent = bytes_received;
        });
        // Not stopped by this cycle is not running: a standby stopped by hand, or whose
        // creation failed, is brought up here too (running containers are left as they are).
        let control = match connect().await {
            Ok(c) => c,
            Err(e) => return (Err((Phase::Health, format!("docker: {e}"))), store),
        };
        let healthy = match control.bring_up().await {
            Ok(_) => control
                .wait_healthy()
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("bringing the stack up failed: {e}")),
        };
        return match healthy {
            Ok(()) => {
                let _ = store.record_cycle(|r| r.last_error = None);
                info!(
                    generation,
                    "generation committed; nothing changed, so the stack kept running"
                );
                (Ok(0), store)
            }
            Err(why) => (Err((Phase::Health, why)), store),
        };
    }
    let Some((control, down)) = stopped else {
        return (
            Err((
                Phase::Commit,
                "the standby's stack was not stopped for a commit that changes it".into(),
            )),
            store,
        );
    };
    let applied = tokio::task::block_in_place(|| {
        let prepared = store.prepare(&commit)?;
        debug!(
            generation,
            ops = prepared.ops(),
            ms = started.elapsed().as_millis() as u64,
            "commit prepared"
        );
        store.commit(prepared, unix_now())
    });
    match &applied {
        Ok(r) => debug!(
            generation,
            apply_ms = r.apply.as_millis() as u64,
            total_ms = r.total.as_millis() as u64,
            rescanned = r.live_rescanned,
            since_stop_ms = down.elapsed().as_millis() as u64,
            "commit applied"
        ),
        Err(e) => {
            // Refused before the journal, or the journal guarantees the live dir is still the
            // old generation: bring that up again.
            let again = match control.bring_up().await {
                Ok(_) => String::new(),
                Err(e) => format!("; bringing the stack up again failed too: {e}"),
            };
            return (Err((Phase::Commit, format!("{e}{again}"))), store);
        }
    }
    let up = control
        .bring_up()
        .await
        .map(drop)
        .map_err(|e| format!("bringing the stack up failed: {e}"));
    let downtime_ms = down.elapsed().as_millis() as u64;
    let healthy = match up {
        Err(e) => Err(e),
        Ok(()) => control
            .wait_healthy()
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    };
    let _ = store.record_cycle(|r| {
        r.target_downtime_ms = downtime_ms;
        r.bytes_sent = bytes_received;
    });
    match healthy {
        Ok(()) => {
            let _ = store.record_cycle(|r| r.last_error = None);
            info!(generation, downtime_ms, "generation committed");
            (Ok(downtime_ms), store)
        }
        Err(why) if auto_rollback && generation > 1 => {
            warn!(generation, error = %why, "stack not healthy on the new generation; rolling back");
            let back = roll_back(&mut store, &*control).await;
            let reason = match back {
                Ok(to) => format!("{why}; rolled back to generation {to}, which is running"),
                Err(e) => format!("{why}; rolling back failed: {e}"),
            };
            (Err((Phase::Health, reason)), store)
        }
        Err(why) => (Err((Phase::Health, why)), store),
    }
}

/// Stops the stack, restores the previous generation, brings it up and waits for health.
pub(crate) async fn roll_back(
    store: &mut StackStore,
    control: &dyn StackControl,
) -> Result<u64, String> {
    if let Err(e) = control.stop().await {
        // A stop that failed part-way: bring the stack up again; the data is untouched.
        let again = match control.bring_up().await {
            Ok(_) => String::new(),
            Err(e) => format!("; bringing it up again failed too: {e}"),
        };
        return Err(format!("stopping: {e}{again}"));
    }
    let rolled = tokio::task::block_in_place(|| store.rollback(None)).map_err(|e| e.to_string());
    let started = control
        .bring_up()
        .await
        .map_err(|e| format!("bringing it up: {e}"));
    let report = rolled?;
    started?;
    control
        .wait_healthy()
        .await
        .map_err(|e| format!("generation {} not healthy either: {e}", report.to))?;
    Ok(report.to)
}

pub(crate) fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests;

/// Moves this host's own volume data of the stack into its live dir before a cycle scans it
/// ([`ComposeStack::import_volumes`]): a fail-back into the old primary then sends only what
/// diverged, and the commit keeps the old primary's data as a generation.
pub(crate) async fn import_volumes(compose: &ComposeConfig) -> Result<(), String> {
    let control = ComposeStack::connect(compose.clone())
        .await
        .map_err(|e| e.to_string())?;
    control
        .import_volumes()
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
