//! Stopping and starting a stack, for both agents: the [`StackControl`] trait, implemented by
//! [`ComposeStack`](crate::docker::ComposeStack) for a Compose project and by [`DataOnly`] for a
//! stack with `docker = false`, which has nothing to stop (the source's final pass is still the
//! pass the flag signs).
//!
//! The trait's vocabulary lives here too: the reports its methods return ([`StopReport`],
//! [`StartReport`], [`HealthReport`], [`Creation`]) and [`DockerError`]. So
//! [`docker`](crate::docker), one implementation, depends on this module and not the other way
//! round.

mod error;
mod report;

use std::future::Future;
use std::pin::Pin;

pub use error::{DockerError, HostConflict, MissingImage, NotReady, StartFailure};
pub use report::{
    ContainerEvent, ContainerHealth, ContainerRef, Creation, Health, HealthReport, HookPhase,
    HookRun, StartReport, StopReport,
};

/// The future every [`StackControl`] method returns.
pub type ControlFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DockerError>> + Send + 'a>>;

/// What an agent does to its stack: the source around its final pass, the target around a
/// commit.
pub trait StackControl: Send + Sync + std::fmt::Debug {
    /// Runs the `pre_stop` hooks, then stops the stack, remembering what was running. A failing
    /// hook stops nothing. Call [`start`](Self::start) after it on every path, also when it
    /// failed: a stop that fails part-way is undone by `start`.
    fn stop(&self) -> ControlFuture<'_, StopReport>;
    /// Starts exactly what `stop` stopped, in dependency order, then runs the `post_start`
    /// hooks. Without a preceding `stop` it does nothing.
    fn start(&self) -> ControlFuture<'_, StartReport>;
    /// Waits, up to the stack's health timeout, until what `start` or `create_if_missing`
    /// brought up is healthy; `unhealthy` or an exited container fails at once.
    fn wait_healthy(&self) -> ControlFuture<'_, HealthReport>;
    /// Creates the stack's containers if it has none at all (a target's first commit).
    fn create_if_missing(&self) -> ControlFuture<'_, Creation>;
    /// Brings the whole stack up whatever state it is in: creates it if it has no containers,
    /// starts every container that is not running (not only what `stop` stopped), creates the
    /// services its definition has no container for. The standby's start (see
    /// [`ComposeStack::bring_up`](crate::docker::ComposeStack::bring_up)).
    fn bring_up(&self) -> ControlFuture<'_, StartReport>;
    /// Starts what a process that died between `stop` and `start` left stopped (see
    /// [`ComposeStack::recover`](crate::docker::ComposeStack::recover)); `None` if nothing was.
    /// Call it before the first `stop` of a process.
    fn recover(&self) -> ControlFuture<'_, Option<StartReport>>;
    /// Leaves the stack stopped for good after `stop`: a fail-back handed it over to another
    /// host. Forgets what `stop` stopped (the restart record), so that no recovery starts it
    /// again behind the operator's back.
    fn hand_over(&self) -> ControlFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Every mount of the stack's containers, for [`coverage`](crate::coverage) to judge
    /// before a cycle stops anything. A stack without containers (data only) has none.
    fn mounts(&self) -> ControlFuture<'_, Vec<crate::coverage::MountUse>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// A data-only stack: nothing to stop or start.
#[derive(Debug, Default)]
pub struct DataOnly;

impl StackControl for DataOnly {
    fn stop(&self) -> ControlFuture<'_, StopReport> {
        Box::pin(async { Ok(StopReport::default()) })
    }
    fn start(&self) -> ControlFuture<'_, StartReport> {
        Box::pin(async { Ok(StartReport::default()) })
    }
    fn wait_healthy(&self) -> ControlFuture<'_, HealthReport> {
        Box::pin(async { Ok(HealthReport::default()) })
    }
    fn create_if_missing(&self) -> ControlFuture<'_, Creation> {
        Box::pin(async { Ok(Creation::Existed) })
    }
    fn bring_up(&self) -> ControlFuture<'_, StartReport> {
        Box::pin(async { Ok(StartReport::default()) })
    }
    fn recover(&self) -> ControlFuture<'_, Option<StartReport>> {
        Box::pin(async { Ok(None) })
    }
}
