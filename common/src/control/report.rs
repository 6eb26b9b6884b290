//! What the [`StackControl`](super::StackControl) methods report: the containers they stopped
//! and started and when (callers measure downtime with these), the hooks that ran, and how each
//! container passed the health check.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, SystemTime};

/// One container of a stack, as reports and errors name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ContainerRef {
    /// Its `com.docker.compose.service` label.
    pub service: String,
    /// Its name, without the leading `/`.
    pub name: String,
    /// Its full id.
    pub id: String,
}

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPhase {
    /// Before the stack is stopped (a database flush); a failure stops nothing.
    PreStop,
    /// After the stack was started again.
    PostStart,
}

impl fmt::Display for HookPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookPhase::PreStop => "pre_stop",
            HookPhase::PostStart => "post_start",
        })
    }
}

/// A container stopped or started: `began` when the call was made, `done` when the engine
/// said it was done. A container's downtime runs from its stop's `began` (the signal) to its
/// start's `done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Which container.
    pub container: ContainerRef,
    /// When the call was made.
    pub began: SystemTime,
    /// When it returned.
    pub done: SystemTime,
}

/// A hook that ran and exited 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    /// `pre_stop` or `post_start`.
    pub phase: HookPhase,
    /// Where it ran.
    pub container: ContainerRef,
    /// Its argv.
    pub command: Vec<String>,
    /// Its stdout and stderr as received (the last 64 KiB).
    pub output: String,
    /// How long it ran.
    pub took: Duration,
}

/// What [`StackControl::stop`](super::StackControl::stop) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopReport {
    /// The `pre_stop` hooks, in order.
    pub hooks: Vec<HookRun>,
    /// The containers stopped, in stop order.
    pub stopped: Vec<ContainerEvent>,
    /// Of those, the ones that did not exit on their stop signal within the stop timeout, so
    /// that Docker killed them (exit code 137, not an OOM kill): what they left on disk is
    /// crash-consistent only.
    pub killed: Vec<ContainerRef>,
}

impl StopReport {
    /// When the first container was told to stop: the stack's downtime begins here.
    pub fn first_stop(&self) -> Option<SystemTime> {
        self.stopped.iter().map(|e| e.began).min()
    }

    /// The services of [`killed`](Self::killed), sorted, each once.
    pub fn killed_services(&self) -> Vec<String> {
        let services: BTreeSet<&str> = self.killed.iter().map(|c| c.service.as_str()).collect();
        services.into_iter().map(str::to_owned).collect()
    }
}

/// What [`StackControl::start`](super::StackControl::start) or [`StackControl::bring_up`](super::StackControl::bring_up) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartReport {
    /// The containers started, in start order.
    pub started: Vec<ContainerEvent>,
    /// The `post_start` hooks, in order.
    pub hooks: Vec<HookRun>,
    /// The Compose command that created, recreated or removed containers (`bring_up` only),
    /// when the containers differed from the compose definition.
    pub compose: Option<String>,
    /// The containers `bring_up` kept stopped on purpose (`standby_stopped`): they exist and do
    /// not run.
    pub kept_stopped: Vec<ContainerRef>,
}

impl StartReport {
    /// When the last container was running again: the stack's downtime ends here.
    pub fn last_start(&self) -> Option<SystemTime> {
        self.started.iter().map(|e| e.done).max()
    }

    /// From the first stop to the last start; `None` if either did nothing.
    pub fn downtime_since(&self, stop: &StopReport) -> Option<Duration> {
        self.last_start()?.duration_since(stop.first_stop()?).ok()
    }
}

/// How a container passed [`StackControl::wait_healthy`](super::StackControl::wait_healthy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Its health check says `healthy`.
    Healthy,
    /// It has no health check and is running.
    Running,
    /// It exited with code 0 (a one-shot service).
    Completed,
}

/// One container's outcome in a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerHealth {
    /// Which container.
    pub container: ContainerRef,
    /// How it passed.
    pub health: Health,
}

/// What [`StackControl::wait_healthy`](super::StackControl::wait_healthy) saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// Every container checked, in the order they became ready.
    pub containers: Vec<ContainerHealth>,
    /// The containers not checked because they are kept stopped on purpose (`standby_stopped`).
    pub kept_stopped: Vec<ContainerRef>,
    /// How long it took.
    pub waited: Duration,
}

/// What [`StackControl::create_if_missing`](super::StackControl::create_if_missing) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// The project already had containers (running or not); nothing was run.
    Existed,
    /// The Compose CLI created (and started) these.
    Created {
        /// The command line that ran.
        command: String,
        /// The project's containers afterwards.
        containers: Vec<ContainerRef>,
    },
}
