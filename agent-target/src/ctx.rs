//! What a running target knows across connections: the stacks it serves ([`StackServe`], a
//! snapshot a reload replaces whole), who holds each stack (`BusyGuard`: one cycle at a time
//! per stack, a newer session of the same source supersedes an older one), refused peers
//! (logged, alerted at most hourly), the shutdown signal and the staleness watch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use stackclone_certs::{Identity, Trust, TrustError};
use stackclone_common::alert::Alert;
use stackclone_common::docker::ComposeConfig;
use stackclone_common::ops::Ops;
use stackclone_proto::msg::Refusal;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::staleness::{MaxAges, Staleness};
use crate::store::StoreConfig;

/// What the target serves for one stack (from its config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackServe {
    pub stack: String,
    pub store: StoreConfig,
    pub allow: Vec<String>,
    /// The Compose project to stop, start and health-check around a commit; `None` for a
    /// data-only stack.
    pub compose: Option<ComposeConfig>,
    /// Roll back to the previous generation when the stack does not come up healthy.
    pub auto_rollback: bool,
    /// The staleness watch: alert when no generation was committed for this long.
    pub max_age: Option<Duration>,
}

/// The stacks a target serves, by name: one immutable snapshot, replaced whole on reload.
pub type Stacks = HashMap<String, StackServe>;

/// Agent-wide state of a running target.
///
/// The stack set is a snapshot behind a lock: a config reload swaps in a new one
/// ([`replace_stacks`](Self::replace_stacks)), new pushes see it at once, and a cycle keeps the
/// [`StackServe`] it loaded its stack with until it ends, whatever reloads happen meanwhile.
#[derive(Debug)]
pub struct TargetCtx {
    pub name: String,
    pub trust: Trust,
    /// Alerts and metrics.
    pub ops: Arc<Ops>,
    /// When each stack last committed; the staleness watch.
    pub staleness: Staleness,
    max_skew_secs: AtomicI64,
    stacks: RwLock<Arc<Stacks>>,
    /// Stacks with a cycle (or the daemon's recovery) under way, one at a time per stack, and
    /// who holds each.
    busy: Mutex<HashMap<String, Holder>>,
    /// Woken whenever a stack is released.
    released: tokio::sync::Notify,
    /// Set once the target is shutting down: cycles still receiving end without a commit.
    shutdown: watch::Sender<bool>,
    /// When a refusal of each kind and address was last alerted (see [`TargetCtx::refused`]).
    refusals_alerted: Mutex<HashMap<String, Instant>>,
    /// Per stack, the kind of the last lineage refusal alerted (`promoted`, `diverged`, …):
    /// one alert per change, not one per refused cycle. A commit clears it.
    lineage_refusals: Mutex<HashMap<String, &'static str>>,
}

/// A peer refused again for the same reason from the same address is alerted at most this
/// often (every refusal is logged).
const REFUSAL_ALERT_EVERY: Duration = Duration::from_secs(3600);

impl TargetCtx {
    pub fn new(
        identity: &Identity,
        trust: Trust,
        max_skew_secs: i64,
        stacks: Vec<StackServe>,
        ops: Arc<Ops>,
    ) -> Self {
        Self {
            name: identity.name().to_string(),
            trust,
            ops,
            staleness: Staleness::new(SystemTime::now()),
            max_skew_secs: AtomicI64::new(max_skew_secs),
            stacks: RwLock::new(Arc::new(by_name(stacks))),
            busy: Mutex::new(Default::default()),
            released: tokio::sync::Notify::new(),
            shutdown: watch::Sender::new(false),
            refusals_alerted: Mutex::default(),
            lineage_refusals: Mutex::default(),
        }
    }

    /// Notes that a push of `stack` was refused for `kind`; true if that is news (the first
    /// such refusal since the last commit or another kind).
    pub(crate) fn lineage_refused(&self, stack: &str, kind: &'static str) -> bool {
        match self.lineage_refusals.lock() {
            Ok(mut seen) => seen.insert(stack.to_owned(), kind) != Some(kind),
            Err(_) => true,
        }
    }

    /// A commit of `stack`: the next lineage refusal is news again.
    pub(crate) fn lineage_cleared(&self, stack: &str) {
        if let Ok(mut seen) = self.lineage_refusals.lock() {
            seen.remove(stack);
        }
    }

    /// Logs and alerts a peer refused at the handshake or the hello: a certificate that is
    /// revoked, expired or of another CA, that carries no flag key, or that presents another
    /// flag key than the one pinned for its name. A connection that merely broke or timed out
    /// is not a refusal. Returns whether `err` was one.
    pub(crate) fn refused(&self, remote: std::net::SocketAddr, err: &TrustError) -> bool {
        let kind = match err {
            TrustError::Revoked { .. } => "revoked",
            TrustError::FlagKeyChanged { .. } => "flag key changed",
            TrustError::NoFlagKey { .. } => "no flag key",
            TrustError::WrongRole { .. } => "wrong role",
            TrustError::NoPeerCertificate => "no certificate",
            TrustError::UnknownCa { .. } => "unknown CA",
            TrustError::CertificateExpired { .. } | TrustError::CertificateNotYetValid { .. } => {
                "certificate not valid now"
            }
            // The verifier's refusal during the TLS handshake, as QUIC reports it.
            TrustError::Handshake { .. } => "TLS handshake refused",
            _ => return false,
        };
        warn!(%remote, reason = kind, error = %err, "refused a peer");
        let key = format!("{kind} {}", remote.ip());
        let due = match self.refusals_alerted.lock() {
            Ok(mut seen) => {
                let now = Instant::now();
                seen.retain(|_, at| now.duration_since(*at) < REFUSAL_ALERT_EVERY);
                seen.insert(key, now).is_none()
            }
            Err(_) => true,
        };
        if due {
            self.ops.alert_in_background(Alert::peer_refused(
                &self.ops.host,
                &remote.to_string(),
                &format!("refused a connection from {remote}: {err}"),
            ));
        }
        true
    }

    /// The stacks served right now (a snapshot; a reload does not change it).
    pub fn stacks(&self) -> Arc<Stacks> {
        self.stacks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Each stack served right now with its `max_age`, for the staleness watch.
    pub fn max_ages(&self) -> MaxAges {
        self.stacks()
            .values()
            .map(|s| (s.stack.clone(), s.max_age))
            .collect()
    }

    /// The settings of `stack`, if it is served right now.
    pub fn stack(&self, stack: &str) -> Option<StackServe> {
        self.stacks().get(stack).cloned()
    }

    /// Serves `stacks` from now on (a reload); returns the set it replaced. Cycles under way
    /// keep the settings they started with.
    pub fn replace_stacks(&self, stacks: Vec<StackServe>) -> Arc<Stacks> {
        let mut current = self.stacks.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, Arc::new(by_name(stacks)))
    }

    /// The largest clock difference accepted in a flag, for cycles starting now.
    pub fn max_skew_secs(&self) -> i64 {
        self.max_skew_secs.load(Ordering::Relaxed)
    }

    pub fn set_max_skew_secs(&self, secs: i64) {
        self.max_skew_secs.store(secs, Ordering::Relaxed);
    }

    /// Stacks with a cycle under way.
    pub fn busy_stacks(&self) -> Vec<String> {
        let mut busy: Vec<String> = self
            .busy
            .lock()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default();
        busy.sort();
        busy
    }

    /// From now on the target is shutting down: cycles not yet committing end.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Whether the target is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves once the target starts shutting down (at once if it already is, or if the
    /// context is gone).
    pub fn shutting_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|down| *down).await;
        }
    }

    /// Holds `stack` for work that is not a source's session (the daemon's recovery), if no one
    /// holds it.
    pub(crate) fn claim_idle(self: &Arc<Self>, stack: &str) -> Option<BusyGuard> {
        self.try_claim(stack, None).ok()
    }

    /// Holds `stack` for a cycle of `peer`. A stack held by another source is busy. One held by
    /// an earlier session of the same source (a source that died, or lost its connection,
    /// leaves its session behind until the QUIC idle timeout) is superseded: that session is
    /// told to end (it starts the standby again if it stopped it; a commit under way finishes
    /// first), and this one takes the stack as soon as it is released, waiting at most
    /// [`SUPERSEDE_WAIT`]. The daemon's recovery is waited for the same way.
    pub(crate) async fn claim_for(
        self: &Arc<Self>,
        stack: &str,
        peer: &str,
    ) -> Result<BusyGuard, Refusal> {
        let busy = || Refusal::Busy {
            stack: stack.to_string(),
        };
        let deadline = tokio::time::Instant::now() + SUPERSEDE_WAIT;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.try_claim(stack, Some(peer)) {
                Ok(guard) => return Ok(guard),
                Err(Some(other)) if other != peer => return Err(busy()),
                Err(_) => {}
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(busy());
            }
        }
    }

    /// Takes `stack` for `peer` (`None`: the daemon's own work); if it is held, tells an
    /// earlier session of the same peer to end, and says who holds it (`Some(peer)` for a
    /// session, `None` for the daemon).
    fn try_claim(
        self: &Arc<Self>,
        stack: &str,
        peer: Option<&str>,
    ) -> Result<BusyGuard, Option<String>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holder) = busy.get(stack) {
            if peer.is_some() && holder.peer.as_deref() == peer && !*holder.supersede.borrow() {
                info!(%stack, peer = ?peer, "a new session of the same source supersedes the one holding the stack");
                holder.supersede.send_replace(true);
            }
            return Err(holder.peer.clone());
        }
        let (supersede, superseded) = watch::channel(false);
        busy.insert(
            stack.to_string(),
            Holder {
                peer: peer.map(str::to_owned),
                supersede,
            },
        );
        Ok(BusyGuard {
            ctx: self.clone(),
            stack: stack.to_string(),
            superseded,
        })
    }
}

/// How long a new session of a source waits for the earlier session it supersedes to release
/// the stack (which a commit under way does only once it has finished, health check included).
pub const SUPERSEDE_WAIT: Duration = Duration::from_secs(600);

/// Who holds a busy stack.
#[derive(Debug)]
struct Holder {
    /// The source whose session holds it; `None` for the daemon's own work.
    peer: Option<String>,
    /// Set when a newer session of the same source wants the stack.
    supersede: watch::Sender<bool>,
}

fn by_name(stacks: Vec<StackServe>) -> Stacks {
    stacks.into_iter().map(|s| (s.stack.clone(), s)).collect()
}

/// Marks a stack busy until dropped.
#[derive(Debug)]
pub(crate) struct BusyGuard {
    ctx: Arc<TargetCtx>,
    stack: String,
    superseded: watch::Receiver<bool>,
}

impl BusyGuard {
    /// Resolves once a newer session of the same source wants the stack.
    pub(crate) async fn superseded(&mut self) {
        let _ = self.superseded.wait_for(|s| *s).await;
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.ctx.busy.lock() {
            busy.remove(&self.stack);
        }
        self.ctx.released.notify_waiters();
    }
}
