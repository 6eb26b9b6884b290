//! The target's network side: accepts pushing hosts over mutual-TLS QUIC, admits each
//! (certificate, deny list, a flag key that matches the pin for its name; of either enrolled
//! role, since a standby pushes back at fail-back, and each stack's `allow` list decides what it
//! may push), and runs one `Cycle` (the private `cycle` module) per connection until the target
//! shuts down.
//!
//! A connection lost before the flag leaves staging in place (the next cycle resumes); once the
//! flag verified, the commit runs to the end even if the source is gone, and shutdown waits for
//! it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stackclone_certs::REFUSED;
use stackclone_common::net::ControlStream;
use stackclone_proto::session::{TargetConfig, TargetSession};
use tracing::{Instrument, info, info_span, warn};

use crate::ctx::TargetCtx;
use crate::cycle::Cycle;

/// How long an admitted source may take to open its control stream (a real one takes
/// milliseconds); after that the connection is closed.
pub const CONTROL_STREAM_TIMEOUT: Duration = Duration::from_secs(10);

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
    ctx.begin_shutdown();
    endpoint.close(0u32.into(), b"target shutting down");
    while tasks.join_next().await.is_some() {}
}

/// Admits one connection and runs its cycle.
async fn handle_connection(ctx: Arc<TargetCtx>, incoming: quinn::Incoming) -> anyhow::Result<()> {
    let remote = incoming.remote_address();
    let (conn, admission) = match stackclone_certs::accept(incoming, &ctx.trust).await {
        Ok(accepted) => accepted,
        Err(e) if ctx.refused(remote, &e) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let peer = admission.peer.name.clone();
    // An admitted source opens its control stream at once. One that does not is not allowed to
    // hold the connection (QUIC keep-alives would keep it open forever).
    let (send, recv) = match tokio::time::timeout(CONTROL_STREAM_TIMEOUT, conn.accept_bi()).await {
        Ok(stream) => stream?,
        Err(_) => {
            warn!(%peer, secs = CONTROL_STREAM_TIMEOUT.as_secs(), "an admitted source opened no control stream; closing the connection");
            conn.close(REFUSED, b"no control stream");
            return Ok(());
        }
    };
    let session = TargetSession::new(
        TargetConfig {
            target_id: ctx.name.clone(),
            peer: peer.clone(),
            peer_flag_key: admission.peer.flag_key,
            max_skew_secs: ctx.max_skew_secs(),
        },
        Instant::now(),
    );
    Cycle::new(ctx, conn, peer, session, ControlStream::new(send, recv))
        .run()
        .await;
    Ok(())
}
