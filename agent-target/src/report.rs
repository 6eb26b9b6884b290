//! How the target tells people and machines what a cycle did: the log line, metrics, the
//! staleness watch and alerts. A failure is counted by phase and by the kind of its cause
//! ([`Cause::kind`]); alerts go out for what a person on the target's side must act on.

use std::time::{Duration, SystemTime};

use stackclone_common::alert::Alert;
use stackclone_common::metrics::CycleStats;
use stackclone_proto::msg::Refusal;
use stackclone_proto::session::{Cause, CycleError, TargetReport};
use tracing::{info, warn};

use crate::ctx::{StackServe, TargetCtx};

/// Logs, counts and alerts the services Docker had to kill at their stop timeout when the
/// standby's stack was stopped for a cycle of `stack`.
pub(crate) fn report_killed(ctx: &TargetCtx, stack: &str, peer: &str, killed: &[String]) {
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
pub(crate) fn report_cycle(
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
            ctx.lineage_cleared(&report.stack);
            if let Some(r) = report.replaced {
                warn!(
                    stack = %report.stack, %peer, paths = r.paths, rollback_to = r.rollback_to,
                    "the commit replaced this host's own tree, which is kept: `stackclone-target rollback {} --to {}` restores it",
                    report.stack, r.rollback_to
                );
            }
            if report.claim.is_some_and(|c| c.hand_over) {
                ops.metrics.set_promoted(&report.stack, true);
                ops.alert_in_background(
                    Alert::warning(
                        &ops.host,
                        &report.stack,
                        &format!(
                            "`{peer}` handed stack `{}` over to this host (generation {}): it \
                             is the primary here now and pushes for it are refused",
                            report.stack, report.generation
                        ),
                    )
                    .with_peer(peer)
                    .with_generation(report.generation),
                );
            }
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
            ops.metrics.record_failure(
                &e.stack,
                &e.phase.to_string().to_lowercase(),
                e.cause.kind(),
            );
            if let Cause::Refused(r) = &e.cause {
                ops.metrics.record_refusal(&e.stack, r.kind());
                let lineage = matches!(
                    r,
                    Refusal::Promoted { .. }
                        | Refusal::Diverged { .. }
                        | Refusal::TargetIsPrimary { .. }
                );
                if lineage && ctx.lineage_refused(&e.stack, r.kind()) {
                    let message = match r {
                        Refusal::Promoted { .. } => format!(
                            "`{peer}`, the old primary of `{}`, is back and tried to push it; \
                             refused, because the stack is promoted here (it was told so)",
                            e.stack
                        ),
                        _ => format!("a push from `{peer}` was refused: {r}"),
                    };
                    ops.alert_in_background(
                        Alert::warning(&ops.host, &e.stack, &message).with_peer(peer),
                    );
                }
            }
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

/// The cycle's log line: `cycle done` with what it did, or `cycle failed` with the phase and
/// the kind of its cause (a field to filter on) as well as the words.
pub(crate) fn log_cycle(
    ctx: &TargetCtx,
    stack: &str,
    peer: &str,
    committing: Option<u64>,
    outcome: &Result<TargetReport, CycleError>,
) {
    match outcome {
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
        }
        Err(e) => warn!(
            %stack, %peer,
            phase = %e.phase,
            cause = %e.cause.kind(),
            detail = %e.cause.detail().unwrap_or("-"),
            error = %e.cause,
            "cycle failed"
        ),
    }
}
