//! Docker stack control for both agents: stop, start, health-check and create a Compose stack
//! through the Docker API ([bollard]), with hooks run by exec.
//!
//! A stack is the set of containers labelled `com.docker.compose.project=<project>`, running or
//! not, keyed by their `com.docker.compose.service` label — never by container names, which
//! Compose v1 (`proj_svc_1`) and v2 (`proj-svc-1`) spell differently.
//!
//! ```text
//! stop():   list by label ─ plan order ─ pre_stop hooks ─ remember running ─ stop, reverse order
//!           ─ note who Docker had to kill at the stop timeout
//! start():  start what stop remembered, in order ─ post_start hooks            (the source)
//! bring_up(): `compose config --hash '*'` ─ containers differ from it (or there are none)?
//!           `up -d --remove-orphans` (`up --no-start …` with strict or standby_stopped)
//!           ─ strict: inspect all ─ keep standby_stopped stopped ─ start every other
//!           stopped container, in order                                        (the standby)
//! wait_healthy(): poll what start/bring_up brought up until healthy, or fail fast; nothing
//!           brought up is never healthy; standby_stopped containers are not waited for
//! create_if_missing(): no container at all → bring_up
//! ```
//!
//! What it owns: [`ComposeStack`] (the [`StackControl`] for a Compose project) and
//! [`ComposeConfig`]. The reports callers measure downtime with ([`StopReport`],
//! [`StartReport`], [`HealthReport`]) and [`DockerError`] are the trait's, defined in
//! [`control`](crate::control) and re-exported here.
//!
//! What it does not do: it never pulls or builds an image itself (Compose may, see below), and
//! recreates a container only through Compose and only where the compose definition changed
//! (stop and start reuse the existing ones, so binds and volumes are untouched). It runs the
//! Compose CLI only in [`ComposeStack::bring_up`] (and `create_if_missing`, which is one). It
//! does not decide *when* to stop: the sync sessions do.
//!
//! Decisions worth knowing:
//! - **Order.** The first of these that says anything ([`OrderSource`]):
//!   1. Compose v2's `com.docker.compose.depends_on` labels, when any container has one;
//!   2. the stack file's `depends_on`, with its `order` breaking ties (alone, `order` is the whole
//!      order);
//!   3. the compose file's `depends_on` (and `links`, `volumes_from`, `network_mode:
//!      service:…`), read from `compose_dir` as Compose would read it ([`crate::compose_file`];
//!      on the target with its `compose_override` and `compose_env`) — Compose v1 orders by it
//!      but writes no label;
//!   4. service names.
//!
//!   The compose file is read only when 1 and 2 say nothing. When a stack of several services
//!   ends at 4, a [`ComposeStack`] warns once (naming the stack and the fix), since stopping a
//!   database before its application is the kind of mistake no test of the data shows; a compose
//!   file that cannot be read is named in that warning and is no error (the stack still stops and
//!   starts). A cycle is a [`DockerError::DependencyCycle`] before anything runs. Several
//!   containers of one service (`scale`) go by name.
//! - **What `start` starts** is exactly what `stop` saw running (`running` or `restarting`) when
//!   it got past the `pre_stop` hooks — never a container that was already stopped. A stop that
//!   fails part-way keeps that list, so `start` (which the agents call on every failure path)
//!   restarts what was stopped; starting a container that is still running is a no-op. `start`
//!   tries every container even when one fails, because the primary's availability matters more
//!   than the order, and keeps the failed ones for the next `start`. A second `stop` before a
//!   successful `start` adds to the list rather than forgetting it.
//! - **A process killed between `stop` and `start`** (SIGKILL, OOM, power loss) must not leave
//!   the stack down for good. With [`ComposeConfig::restart_record`] set, `stop` writes the list
//!   of what it is about to stop to that file (atomically and durably) before it stops the first
//!   container, a `start` that brought everything up removes it, and the next process calls
//!   [`ComposeStack::recover`] before anything else: it starts the recorded containers that
//!   still exist (a no-op for one already running) and removes the record. The agents keep the
//!   record in their state dir, one per stack, and recover when a cycle begins and when the
//!   daemon starts (the target also when a reload adds the stack), with
//!   [`ComposeStack::recover_for_cycle`]: a container that will not start is logged and retried
//!   by the cycle's own `start`, not an error that would fail every cycle from then on.
//! - **`start` without a preceding `stop`** (or after a `pre_stop` hook failed, which stops
//!   nothing) starts nothing and runs no `post_start` hook: the hooks pair with a real stop.
//! - **One-off containers** (`docker-compose run`, label `com.docker.compose.oneoff=True`) are not
//!   part of the stack, nor are containers without a service label.
//! - **Paused** containers are left alone: they are neither stopped nor started.
//! - **The primary starts what it stopped; the standby runs whole.** The source's `start` never
//!   starts a container that was already stopped (someone stopped it on purpose on the primary).
//!   The standby exists to run: [`ComposeStack::bring_up`] brings every service of its stack up,
//!   whatever state it was in (a creation that failed half-way, a `compose stop` by hand, a
//!   host reboot).
//! - **The standby follows its definition** (see [`definition`]). `bring_up` compares the
//!   containers' `com.docker.compose.config-hash` labels with `compose config --hash '*'` and
//!   lets `compose up --remove-orphans` recreate, create and remove only where they differ; an
//!   unchanged definition is started through the API, and no `up` runs. The comparison is
//!   Compose's own, so it covers every file Compose reads and needs no record of ours. It costs
//!   one Compose run per `bring_up`, before the first container starts (Compose v1: 0.5-0.7 s).
//!   Compose v2 also recreates a container whose image changed under the same tag; this check
//!   sees that only with v1, whose hash includes the image ID.
//! - **Kept stopped.** The [`ComposeConfig::standby_stopped`] services get containers
//!   (`up --no-start` for the whole stack, then the others are started in start order, which
//!   does not wait for a `depends_on` condition the way `up -d` does), are never started, are
//!   stopped when found running, and are not health-checked.
//! - **Killed at the stop timeout.** A container that does not exit on its stop signal within
//!   `stop_timeout` is killed by Docker; `stop` names it in [`StopReport::killed`], since what
//!   it left on disk is crash-consistent only.
//! - **Health.** [`ComposeStack::wait_healthy_until`] checks the containers the last `start`,
//!   `bring_up` or `create_if_missing` brought up (a stack with none is
//!   [`DockerError::NoContainers`], never healthy): `healthy`, or running without a health check, is ready;
//!   `unhealthy` or a non-zero exit fails at once with the last health-log lines. A container that
//!   exited with code 0 counts as done (a one-shot service, like Compose's
//!   `service_completed_successfully`), since failing every cycle on a migration job that did its
//!   work would roll the standby back for nothing.
//! - **Hooks** run as argv (no shell unless the hook says `sh -c`), in the first running
//!   container of the named service, with a timeout ([`ComposeConfig::hook_timeout`]). Each
//!   output line is logged (`tracing`, target `stackclone::hook`) and the last 64 KiB are returned
//!   in the report or the error. The Docker API cannot kill an exec, so a timed-out hook may go on
//!   running in its container.
//! - **The standby's own settings.** With [`ComposeConfig::compose_override`], every Compose
//!   command names the project's files with `-f` (as [`ComposeFiles::find`] finds them:
//!   `COMPOSE_FILE`, or the first compose file and override file) and the override last;
//!   without it no `-f` is passed and Compose finds the files itself, as before.
//!   [`ComposeConfig::compose_env`] is the environment of every Compose command, so it wins over
//!   the synced `.env`. Both also apply when the compose file is read for the order.
//! - **A first creation that collides with the host** (a published port or a `container_name`
//!   taken) is [`DockerError::HostConflict`], which says which of those settings to use, and the
//!   containers it made are removed, so that the next cycle creates them with the new settings
//!   instead of starting them as they were made.
//! - **Connecting** honours `DOCKER_HOST` and negotiates the API version (bollard speaks 1.53 by
//!   default; Debian's engine 20.10 speaks 1.41). A missing socket is [`DockerError::Connect`].

pub mod definition;
pub mod mounts;
mod order;
pub mod policy;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::exec::StartExecResults;
use bollard::models::{ExecConfig, HealthStatusEnum};
use bollard::query_parameters::{ListContainersOptionsBuilder, StopContainerOptionsBuilder};
use futures_util::StreamExt;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

// The trait's reports and error, beside the type that makes them; callers import them from here.
pub use crate::control::{
    ContainerEvent, ContainerHealth, ContainerRef, Creation, DockerError, Health, HealthReport,
    HookPhase, HookRun, HostConflict, NotReady, StartFailure, StartReport, StopReport,
};
pub use definition::{Definition, Drift};
pub use order::{OrderSource, parse_depends_on_label};

use crate::compose_file::{ComposeFile, ComposeFileError, ComposeFiles, ProjectEnv};
use crate::config::{DEFAULT_HEALTH_TIMEOUT, DEFAULT_STOP_TIMEOUT, Hook, SourceStack, TargetStack};
use crate::control::{ControlFuture, StackControl};

/// The label naming a container's Compose project (the same in v1 and v2).
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// The label naming a container's Compose service.
pub const SERVICE_LABEL: &str = "com.docker.compose.service";
/// Compose v2's dependency label: `svc:condition:restart,…`.
pub const DEPENDS_ON_LABEL: &str = "com.docker.compose.depends_on";
/// `True` on containers made by `docker compose run`, which are not part of the stack.
pub const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

/// The name the agents give the [restart record](ComposeConfig::restart_record) in a target
/// stack's state dir; the source's is `<state-dir>/<stack>.stopped.json`.
pub const RESTART_RECORD: &str = "stopped-containers.json";

/// How long a hook may run when the config says nothing.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `docker compose up -d` may take when the config says nothing.
pub const DEFAULT_CREATE_TIMEOUT: Duration = Duration::from_secs(300);

/// How often health is polled.
const HEALTH_POLL: Duration = Duration::from_millis(250);
/// How much of a hook's output is kept for the report or error (the tail).
const HOOK_OUTPUT_MAX: usize = 64 * 1024;
/// How many health-log entries an error quotes.
const HEALTH_LOG_LINES: usize = 3;
/// bollard's request timeout is for the whole call, and a stop call returns only when the
/// container is down.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What [`ComposeStack`] needs to know about a stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeConfig {
    /// The stack's name, for messages (the project's name may differ).
    pub stack: String,
    /// The `com.docker.compose.project` label value. Compose v1 lowercases project names, so
    /// use lowercase `a-z0-9_-` for a project this creates.
    pub project: String,
    /// Where the compose file is, for [`ComposeStack::create_if_missing`].
    pub compose_dir: PathBuf,
    /// Grace time before Docker kills a stopping container (whole seconds, rounded up).
    pub stop_timeout: Duration,
    /// Start order of services (stop is the reverse); ties broken by name.
    pub order: Vec<String>,
    /// Service → services it needs started first, for Compose v1 (no depends_on label). With
    /// neither this nor `order`, the compose file's `depends_on` is read (see the module docs).
    pub depends_on: BTreeMap<String, Vec<String>>,
    /// Run in order before stopping; a failure stops nothing.
    pub pre_stop: Vec<Hook>,
    /// Run in order after starting.
    pub post_start: Vec<Hook>,
    /// How long [`StackControl::wait_healthy`] waits.
    pub health_timeout: Duration,
    /// How long one hook may run.
    pub hook_timeout: Duration,
    /// How long one Compose command (`config`, `up`) may run in [`ComposeStack::bring_up`].
    pub create_timeout: Duration,
    /// Where `stop` records what it stopped until `start` brought it all back, so that a
    /// process killed in between can be undone by [`ComposeStack::recover`]. `None`: nothing
    /// is recorded (what was stopped lives in memory only).
    pub restart_record: Option<PathBuf>,
    /// `compose_policy = "strict"`: the stack's directory, outside which no container may
    /// bind-mount (see [`policy`]). Containers are then created with `up --no-start`, checked,
    /// and only started if every one passes. `None`: the compose file runs as written.
    pub strict_root: Option<PathBuf>,
    /// The standby's replicated volumes: the directory holding one tree per Compose volume key
    /// (`<live dir>/.stackclone-volumes`). Before bringing the stack up or creating it, each
    /// key's volume is made to point at its tree ([`ComposeStack::adopt_volumes`]). `None` on
    /// the source, whose volumes are its own.
    pub volume_trees: Option<PathBuf>,
    /// The standby's outside paths: the directory holding one tree per outside path
    /// (`<live dir>/.stackclone-paths`), and where each source path goes on this host (the
    /// target stack file's `extra_paths`). Linked with the volumes
    /// ([`ComposeStack::adopt_volumes`]).
    pub extra_trees: Option<(PathBuf, BTreeMap<String, PathBuf>)>,
    /// A compose file passed to every Compose command after the project's own files, which are
    /// then named with `-f` too ([`ComposeFiles::find`]); it is read for the start order as well.
    /// The target's `compose_override`.
    pub compose_override: Option<PathBuf>,
    /// Variables set for every Compose command (they win over `.env`), and used when the
    /// compose file is read for the start order. The target's `compose_env`.
    pub compose_env: BTreeMap<String, String>,
    /// `standby_stopped` (target only): services that must not run twice, once on the primary
    /// and once here (schedulers, bots, outgoing mail). [`ComposeStack::bring_up`] creates
    /// their containers and keeps them stopped, and health does not wait for them.
    pub standby_stopped: Vec<String>,
}

impl ComposeConfig {
    /// A config with no order, no hooks and the default timeouts.
    /// The stack is named like the project.
    pub fn new(project: impl Into<String>, compose_dir: impl Into<PathBuf>) -> ComposeConfig {
        let project = project.into();
        ComposeConfig {
            stack: project.clone(),
            project,
            compose_dir: compose_dir.into(),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            order: Vec::new(),
            depends_on: BTreeMap::new(),
            pre_stop: Vec::new(),
            post_start: Vec::new(),
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
            create_timeout: DEFAULT_CREATE_TIMEOUT,
            restart_record: None,
            strict_root: None,
            volume_trees: None,
            extra_trees: None,
            compose_override: None,
            compose_env: BTreeMap::new(),
            standby_stopped: Vec::new(),
        }
    }

    /// The same config, recording what `stop` stopped at `path` (see
    /// [`restart_record`](Self::restart_record)).
    pub fn with_restart_record(self, path: impl Into<PathBuf>) -> ComposeConfig {
        ComposeConfig {
            restart_record: Some(path.into()),
            ..self
        }
    }

    /// The source side of a stack: its project, order, hooks and stop timeout. The source
    /// never creates its stack; `compose_dir` is the data dir.
    pub fn for_source(stack: &SourceStack) -> ComposeConfig {
        ComposeConfig {
            stop_timeout: stack.stop_timeout,
            order: stack.order.clone(),
            depends_on: stack.depends_on.clone(),
            pre_stop: stack.pre_stop.clone(),
            post_start: stack.post_start.clone(),
            stack: stack.name.clone(),
            ..ComposeConfig::new(&stack.compose_project, &stack.path)
        }
    }

    /// The target side of a stack: its project, compose dir, order, stop and health timeouts,
    /// policy and `standby_stopped` services. Hooks run on the source only (a target stack is
    /// stopped, committed and started; nothing on it needs flushing).
    pub fn for_target(stack: &TargetStack) -> ComposeConfig {
        ComposeConfig {
            health_timeout: stack.health_timeout,
            stop_timeout: stack.stop_timeout,
            order: stack.order.clone(),
            depends_on: stack.depends_on.clone(),
            strict_root: (stack.compose_policy == crate::config::ComposePolicy::Strict)
                .then(|| std::fs::canonicalize(&stack.path).unwrap_or_else(|_| stack.path.clone())),
            volume_trees: Some(stack.path.join(stackclone_proto::manifest::VOLUMES_DIR)),
            extra_trees: Some((
                stack.path.join(stackclone_proto::manifest::PATHS_DIR),
                stack.extra_paths.clone(),
            )),
            stack: stack.name.clone(),
            compose_override: stack.compose_override.clone(),
            compose_env: stack.compose_env.clone(),
            standby_stopped: stack.standby_stopped.clone(),
            ..ComposeConfig::new(&stack.compose_project, &stack.compose_dir)
        }
    }
}

/// A container of the stack as listed by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackContainer {
    /// Which container.
    pub container: ContainerRef,
    /// Its state: `running`, `exited`, `created`, `paused`, `restarting`, `dead`…
    pub state: String,
    /// The services of its `com.docker.compose.depends_on` label (Compose v2); `None` without
    /// the label.
    pub depends_on: Option<Vec<String>>,
    /// Its `com.docker.compose.config-hash` label: the hash of the service's configuration it
    /// was created from (see [`definition`]); `None` without the label.
    pub config_hash: Option<String>,
    /// Its health check's verdict as Docker lists it (`healthy`, `unhealthy`, `starting`);
    /// `None` without a health check (or not running).
    pub health: Option<String>,
}

impl StackContainer {
    /// Whether `stop` stops it (and so `start` starts it again).
    pub fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "running" | "restarting")
    }
}

/// The order a stack is started in (stop is the reverse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where the order came from.
    pub source: OrderSource,
    /// Services in start order.
    pub start_order: Vec<String>,
}

/// A Compose project, controlled through the Docker API. See the [module docs](self).
///
/// Keep one per stack for a whole cycle: it remembers between [`stop`](Self::stop) and
/// [`start`](Self::start) what was running. `stop`, `start` and `create_if_missing` on one
/// `ComposeStack` run one at a time: a `start` issued while a `stop` is still stopping waits for
/// it and then restarts everything it stopped.
#[derive(Debug)]
pub struct ComposeStack {
    docker: Docker,
    config: ComposeConfig,
    state: Mutex<State>,
    /// Whether it warned that no start order is known (once per `ComposeStack`, i.e. per cycle).
    warned_no_order: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Set once `stop` got past its hooks; taken by a `start` that starts everything.
    to_restart: Option<ToRestart>,
    /// What the last `start`, `bring_up` or `create_if_missing` brought up, for `wait_healthy`.
    brought_up: Vec<ContainerRef>,
    /// What the last `bring_up` kept stopped on purpose (`standby_stopped`).
    kept_stopped: Vec<ContainerRef>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ToRestart {
    containers: Vec<ContainerRef>,
    start_order: Vec<String>,
}

/// The file [`ComposeConfig::restart_record`] names: what to start if the process that
/// stopped it died.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RestartRecord {
    /// The process that stopped the stack.
    pid: u32,
    /// When it began stopping, in ms since the Unix epoch.
    stopped_at_ms: u64,
    #[serde(flatten)]
    restart: ToRestart,
}

impl ComposeStack {
    /// Connects to the local engine (`DOCKER_HOST`, else `/var/run/docker.sock`) and
    /// negotiates the API version.
    pub async fn connect(config: ComposeConfig) -> Result<ComposeStack, DockerError> {
        let host = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
        let connect_error = |source| DockerError::Connect {
            host: host.clone(),
            source,
        };
        let timeout = MIN_REQUEST_TIMEOUT.max(config.stop_timeout + Duration::from_secs(60));
        let docker = Docker::connect_with_local_defaults()
            .map_err(connect_error)?
            .with_timeout(timeout)
            .negotiate_version()
            .await
            .map_err(connect_error)?;
        debug!(project = %config.project, host, version = ?docker.client_version(), "connected to Docker");
        Ok(ComposeStack::with_docker(docker, config))
    }

    /// A stack on an engine connection the caller made (and negotiated). Its request timeout
    /// must exceed `stop_timeout`.
    pub fn with_docker(docker: Docker, config: ComposeConfig) -> ComposeStack {
        ComposeStack {
            docker,
            config,
            state: Mutex::new(State::default()),
            warned_no_order: AtomicBool::new(false),
        }
    }

    /// The config it runs with.
    pub fn config(&self) -> &ComposeConfig {
        &self.config
    }

    /// The project's containers as the engine lists them, running or not, each with its
    /// service: one-off containers (`compose run`) and containers without a service label are
    /// not part of the stack.
    pub(crate) async fn listed(
        &self,
    ) -> Result<Vec<(String, bollard::models::ContainerSummary)>, DockerError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{PROJECT_LABEL}={}", self.config.project)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.api("listing the project's containers", e))?;
        let mut out = Vec::with_capacity(listed.len());
        for c in listed {
            let labels = c.labels.as_ref();
            let id = c.id.as_deref().unwrap_or_default();
            if labels
                .and_then(|l| l.get(ONEOFF_LABEL))
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            {
                debug!(project = %self.config.project, id, "skipping a one-off container");
                continue;
            }
            let Some(service) = labels.and_then(|l| l.get(SERVICE_LABEL)).cloned() else {
                debug!(project = %self.config.project, id, "skipping a container without a service label");
                continue;
            };
            out.push((service, c));
        }
        Ok(out)
    }

    /// The project's containers, running or not, by label; sorted by service, then name.
    pub async fn containers(&self) -> Result<Vec<StackContainer>, DockerError> {
        let listed = self.listed().await?;
        let mut containers = Vec::with_capacity(listed.len());
        for (service, c) in listed {
            let labels = c.labels.unwrap_or_default();
            let Some(id) = c.id else { continue };
            let name = c
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.chars().take(12).collect());
            let health = c.status.as_deref().and_then(|s| {
                ["(unhealthy)", "(healthy)", "(health: starting)"]
                    .into_iter()
                    .find(|h| s.contains(h))
                    .map(|h| {
                        h.trim_matches(|c| c == '(' || c == ')')
                            .trim_start_matches("health: ")
                            .to_owned()
                    })
            });
            containers.push(StackContainer {
                container: ContainerRef { service, name, id },
                health,
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                depends_on: labels
                    .get(DEPENDS_ON_LABEL)
                    .map(|v| parse_depends_on_label(v)),
                config_hash: labels.get(definition::CONFIG_HASH_LABEL).cloned(),
            });
        }
        containers.sort_by(|a, b| {
            (&a.container.service, &a.container.name)
                .cmp(&(&b.container.service, &b.container.name))
        });
        Ok(containers)
    }

    /// The start order for these containers (see the module docs for where it comes from).
    pub async fn plan_for(&self, containers: &[StackContainer]) -> Result<Plan, DockerError> {
        let services: BTreeSet<String> = containers
            .iter()
            .map(|c| c.container.service.clone())
            .collect();
        let (source, depends_on) = if containers.iter().any(|c| c.depends_on.is_some()) {
            let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for c in containers {
                let d = deps.entry(c.container.service.clone()).or_default();
                for s in c.depends_on.iter().flatten() {
                    if !d.contains(s) {
                        d.push(s.clone());
                    }
                }
            }
            (OrderSource::Labels, deps)
        } else if !self.config.depends_on.is_empty() {
            (OrderSource::ConfigDependsOn, self.config.depends_on.clone())
        } else if !self.config.order.is_empty() {
            (OrderSource::ConfigOrder, BTreeMap::new())
        } else {
            match self.read_compose_file().await {
                Ok(file) if file.has_dependencies() => {
                    (OrderSource::ComposeFile, file.depends_on())
                }
                read => {
                    self.warn_no_order(&services, read.err());
                    (OrderSource::Names, BTreeMap::new())
                }
            }
        };
        let start_order =
            order::start_order(&services, &depends_on, &self.config.order).map_err(|cycle| {
                DockerError::DependencyCycle {
                    project: self.config.project.clone(),
                    cycle: cycle.0,
                }
            })?;
        Ok(Plan {
            source,
            start_order,
        })
    }

    /// Lists the project and plans its start order.
    pub async fn plan(&self) -> Result<Plan, DockerError> {
        let containers = self.containers().await?;
        self.plan_for(&containers).await
    }

    /// Warns, once per `ComposeStack`, that the services of a stack with several go by name
    /// because nothing says in which order they depend on each other.
    fn warn_no_order(&self, services: &BTreeSet<String>, unreadable: Option<ComposeFileError>) {
        if services.len() < 2 {
            if let Some(e) = unreadable {
                debug!(stack = %self.config.stack, error = %e, "compose file not read for the order");
            }
            return;
        }
        if self.warned_no_order.swap(true, Ordering::Relaxed) {
            return;
        }
        let services: Vec<&str> = services.iter().map(String::as_str).collect();
        let compose_file = match &unreadable {
            None => "the compose file names no depends_on".to_owned(),
            Some(e) => format!("the compose file could not be read ({e})"),
        };
        warn!(stack = %self.config.stack, project = %self.config.project, services = ?services,
            "no start order is known for stack {}: its containers carry no \
             com.docker.compose.depends_on label (Compose v1 writes none), its stack file sets \
             neither depends_on nor order, and {compose_file}; so its services stop and start in \
             name order ({}), which may stop a database before the application that writes to \
             it. Fix: write depends_on in the compose file, or set order = [...] (or depends_on) \
             in the stack's conf.d file on both sides; an order also silences this where the \
             order does not matter",
            self.config.stack, services.join(", "));
    }

    /// The compose files of `compose_dir` and the `compose_override`, read as Compose would
    /// read them with `compose_env` (see [`crate::compose_file`]).
    async fn read_compose_file(&self) -> Result<ComposeFile, ComposeFileError> {
        self.off_runtime(|config| {
            let (files, env) = project_files(config)?;
            ComposeFile::read(&files.files, &env)
        })
        .await
    }

    /// `-f FILE` for each of the project's files and the `compose_override` after them; nothing
    /// without a `compose_override` (Compose then finds the files itself, as it always did).
    async fn file_args(&self) -> Result<Vec<String>, DockerError> {
        if self.config.compose_override.is_none() {
            return Ok(Vec::new());
        }
        let files = self
            .off_runtime(|config| project_files(config).map(|(files, _)| files))
            .await
            .map_err(|source| DockerError::ComposeFiles {
                project: self.config.project.clone(),
                source,
            })?;
        if !files.ignored.is_empty() {
            warn!(stack = %self.config.stack, used = ?files.files, ignored = ?files.ignored,
                "the compose dir holds more than one compose (or override) file; passing the \
                 first of each as Compose v2 chooses (Compose v1 would prefer docker-compose.yml)");
        }
        Ok(files
            .files
            .iter()
            .flat_map(|f| ["-f".to_owned(), f.display().to_string()])
            .collect())
    }

    /// Runs `read` on the config on a blocking thread: it reads files.
    async fn off_runtime<T: Send + 'static>(
        &self,
        read: impl FnOnce(&ComposeConfig) -> Result<T, ComposeFileError> + Send + 'static,
    ) -> Result<T, ComposeFileError> {
        let config = self.config.clone();
        tokio::task::spawn_blocking(move || read(&config))
            .await
            .unwrap_or_else(|e| {
                Err(ComposeFileError::Read {
                    file: self.config.compose_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    /// Runs the `pre_stop` hooks, remembers which containers are running, and stops them in
    /// reverse start order with `stop_timeout`. A failing hook (or a dependency cycle) stops
    /// nothing. If stopping one container fails, the error says so and [`start`](Self::start)
    /// restarts what was stopped.
    pub async fn stop(&self) -> Result<StopReport, DockerError> {
        let mut state = self.state.lock().await;
        let containers = self.containers().await?;
        let plan = self.plan_for(&containers).await?;
        let hooks = self
            .run_hooks(HookPhase::PreStop, &self.config.pre_stop, &containers)
            .await?;

        let mut running: Vec<ContainerRef> = containers
            .iter()
            .filter(|c| c.is_running())
            .map(|c| c.container.clone())
            .collect();
        sort_in_start_order(&mut running, &plan.start_order);
        running.reverse();
        let restart = state.to_restart.get_or_insert_with(|| ToRestart {
            containers: Vec::new(),
            start_order: Vec::new(),
        });
        restart.start_order = plan.start_order.clone();
        // A standby_stopped service found running is stopped, but never started again.
        for c in running.iter().filter(|c| !self.is_kept_stopped(&c.service)) {
            if !restart.containers.iter().any(|r| r.id == c.id) {
                restart.containers.push(c.clone());
            }
        }
        state.brought_up.clear();
        if let Some(record) = state
            .to_restart
            .clone()
            .filter(|r| !r.containers.is_empty())
        {
            self.write_restart_record(record).await?;
        }

        let seconds =
            i32::try_from(self.config.stop_timeout.as_secs_f64().ceil() as i64).unwrap_or(i32::MAX);
        let mut stopped = Vec::with_capacity(running.len());
        let mut killed = Vec::new();
        for (i, c) in running.iter().enumerate() {
            let began = SystemTime::now();
            self.docker
                .stop_container(
                    &c.id,
                    Some(StopContainerOptionsBuilder::default().t(seconds).build()),
                )
                .await
                .map_err(|e| {
                    self.api(
                        &format!(
                            "stopping container {} (service {}), after {i} of {} were stopped \
                             (start restarts them)",
                            c.name,
                            c.service,
                            running.len()
                        ),
                        e,
                    )
                })?;
            let done = SystemTime::now();
            if self.was_killed(c).await {
                warn!(project = %self.config.project, service = %c.service, container = %c.name,
                    stop_timeout_s = seconds, took_ms = elapsed_ms(began, done),
                    "container did not exit within its stop timeout; Docker killed it, so its data is crash-consistent only");
                killed.push(c.clone());
            } else {
                info!(project = %self.config.project, service = %c.service, container = %c.name,
                    took_ms = elapsed_ms(began, done), "container stopped");
            }
            stopped.push(ContainerEvent {
                container: c.clone(),
                began,
                done,
            });
        }
        Ok(StopReport {
            hooks,
            stopped,
            killed,
        })
    }

    /// Whether a container that a stop just stopped was killed by Docker at the stop timeout:
    /// it exited with 137 (SIGKILL) and the kernel's OOM killer was not the one. A container that
    /// cannot be inspected is not counted (and the failure logged).
    async fn was_killed(&self, c: &ContainerRef) -> bool {
        match self.docker.inspect_container(&c.id, None).await {
            Ok(inspected) => {
                let state = inspected.state.unwrap_or_default();
                state.exit_code == Some(137) && state.oom_killed != Some(true)
            }
            Err(e) => {
                warn!(project = %self.config.project, container = %c.name, error = %e,
                    "could not inspect a stopped container to see whether it was killed");
                false
            }
        }
    }

    /// Starts exactly what [`stop`](Self::stop) stopped (nothing if it stopped nothing), in start
    /// order, then runs the `post_start` hooks. Every container is tried even if one fails; the
    /// failed ones stay remembered for the next `start`.
    pub async fn start(&self) -> Result<StartReport, DockerError> {
        let mut state = self.state.lock().await;
        let Some(mut restart) = state.to_restart.take() else {
            debug!(project = %self.config.project, "nothing was stopped, so nothing to start");
            return Ok(StartReport::default());
        };
        sort_in_start_order(&mut restart.containers, &restart.start_order);
        let (started, failures) = self.start_containers(restart.containers).await;
        let mut report = StartReport {
            started,
            ..StartReport::default()
        };
        state.brought_up = report.started.iter().map(|e| e.container.clone()).collect();
        if !failures.is_empty() {
            let left = ToRestart {
                containers: failures.iter().map(|f| f.container.clone()).collect(),
                start_order: restart.start_order,
            };
            // Best effort: the old record (a superset) stays if this fails, which only means
            // the next process starts a few running containers again (a no-op).
            if let Err(e) = self.write_restart_record(left.clone()).await {
                warn!(project = %self.config.project, error = %e, "could not update the restart record");
            }
            state.to_restart = Some(left);
            return Err(DockerError::StartFailed {
                project: self.config.project.clone(),
                failures,
            });
        }
        // Everything is up: a record left behind (it could not be removed) finds every
        // container running next time, and `recover` then only removes it.
        self.forget_restart_record().await;
        report.hooks = self.post_start_hooks().await?;
        Ok(report)
    }

    /// Starts `containers` in the order given. Every container is tried even when one fails.
    async fn start_containers(
        &self,
        containers: Vec<ContainerRef>,
    ) -> (Vec<ContainerEvent>, Vec<StartFailure>) {
        let mut started = Vec::with_capacity(containers.len());
        let mut failures = Vec::new();
        for c in containers {
            let began = SystemTime::now();
            match self.docker.start_container(&c.id, None).await {
                Ok(()) => {
                    let done = SystemTime::now();
                    info!(project = %self.config.project, service = %c.service,
                        container = %c.name, took_ms = elapsed_ms(began, done), "container started");
                    started.push(ContainerEvent {
                        container: c,
                        began,
                        done,
                    });
                }
                Err(e) => {
                    warn!(project = %self.config.project, service = %c.service,
                        container = %c.name, error = %e, "container did not start");
                    failures.push(StartFailure {
                        container: c,
                        error: e.to_string(),
                    });
                }
            }
        }
        (started, failures)
    }

    /// Brings the whole stack up, whatever state it is in, as its compose definition says —
    /// the standby's way of starting:
    ///
    /// 1. The definition is read as Compose sees it (`compose config --hash '*'`, see
    ///    [`definition`]) and compared with the containers' `com.docker.compose.config-hash`
    ///    labels.
    /// 2. No container at all, or containers that differ from it (a service whose image,
    ///    environment or any other setting changed, a service added, one removed): `compose -p P
    ///    up -d --remove-orphans` recreates, creates and removes what differs, and starts the
    ///    stack. With [`standby_stopped`](ComposeConfig::standby_stopped) services or under
    ///    [`strict_root`](ComposeConfig::strict_root) it is `up --no-start --remove-orphans`
    ///    instead, and the next steps start what may run.
    /// 3. Under the strict policy every container is inspected, and none starts if one breaks
    ///    it ([`DockerError::PolicyRefused`]; what step 2 made is removed again).
    /// 4. Containers of `standby_stopped` services are stopped if they run, and never started.
    /// 5. Every other container that is not running (`created` after a creation that failed
    ///    half-way, `exited` after a stop by this agent, by hand or by a reboot) is started in
    ///    start order through the API; paused ones are left alone. When nothing differed, this
    ///    is all that happens: no container is recreated. After `up -d` nothing is: Compose
    ///    started the stack, and what is not running then is a one-shot that already ran.
    ///
    /// [`wait_healthy`](Self::wait_healthy_until) then checks every container but the
    /// `standby_stopped` ones. The `post_start` hooks run when a [`stop`](Self::stop) preceded.
    /// A container that does not start is [`DockerError::StartFailed`] (the others were
    /// started); a Compose run that fails is [`DockerError::ComposeFailed`] with Compose's
    /// output, or [`DockerError::ImageUnavailable`] when it could not pull an image. A
    /// `compose_dir` without a compose file (containers made another way) has no definition to
    /// follow: that is logged, and the containers that exist are the stack; a compose file that
    /// Compose cannot read is an error.
    pub async fn bring_up(&self) -> Result<StartReport, DockerError> {
        let mut state = self.state.lock().await;
        self.bring_up_locked(&mut state).await
    }

    /// [`bring_up`](Self::bring_up) with the state held: the standby's volumes and outside
    /// paths first point at their trees, then the containers are brought to the definition. A
    /// first creation that collided with the host says how the standby may differ.
    async fn bring_up_locked(&self, state: &mut State) -> Result<StartReport, DockerError> {
        self.adopt_volumes().await?;
        let before = self.containers().await?;
        let first = before.is_empty();
        match self.bring_up_from(state, before).await {
            Err(e) if first => Err(self.explain_first_creation(e).await),
            brought => brought,
        }
    }

    async fn bring_up_from(
        &self,
        state: &mut State,
        before: Vec<StackContainer>,
    ) -> Result<StartReport, DockerError> {
        let project = &self.config.project;
        let drift = match self.definition().await? {
            Some(definition) => definition.drift(&before),
            None => Drift::default(),
        };
        let mut report = StartReport::default();
        if before.is_empty() || !drift.is_empty() {
            if before.is_empty() {
                info!(project = %project, dir = %self.config.compose_dir.display(),
                    "the stack has no containers; creating it");
            } else {
                info!(project = %project, %drift,
                    "the containers differ from the compose definition; bringing them to it");
            }
            report.compose = Some(self.compose_up(self.up_args()).await?);
        }
        if let Some(root) = &self.config.strict_root {
            self.check_policy(root, &before).await?;
        }
        let containers = self.containers().await?;
        if containers.is_empty() {
            return Err(DockerError::ComposeCreatedNothing {
                project: project.clone(),
                command: report.compose.unwrap_or_default(),
                dir: self.config.compose_dir.clone(),
            });
        }
        let plan = self.plan_for(&containers).await?;
        let (kept, run): (Vec<&StackContainer>, Vec<&StackContainer>) = containers
            .iter()
            .partition(|c| self.is_kept_stopped(&c.container.service));
        for c in kept.iter().filter(|c| c.is_running()) {
            self.stop_kept(&c.container).await?;
        }
        // After `up -d` whatever is not running is what Compose started and saw end (a one-shot
        // that exited 0) or left paused; starting it again would run a migration twice.
        let compose_started = report.compose.is_some() && !self.up_starts_nothing();
        let mut down: Vec<ContainerRef> = run
            .iter()
            .filter(|c| !compose_started && !c.is_running() && c.state != "paused")
            .map(|c| c.container.clone())
            .collect();
        sort_in_start_order(&mut down, &plan.start_order);
        let (started, failures) = self.start_containers(down).await;
        report.started = started;
        report.kept_stopped = kept.iter().map(|c| c.container.clone()).collect();
        if !report.kept_stopped.is_empty() {
            let services: BTreeSet<&str> =
                kept.iter().map(|c| c.container.service.as_str()).collect();
            info!(project = %project, services = ?services,
                "kept stopped on purpose (standby_stopped): created, not started");
        }
        state.brought_up = run.iter().map(|c| c.container.clone()).collect();
        state.kept_stopped = report.kept_stopped.clone();
        if !failures.is_empty() {
            if let Some(restart) = state.to_restart.as_mut() {
                restart
                    .containers
                    .retain(|r| failures.iter().any(|f| f.container.id == r.id));
                let left = restart.clone();
                // Best effort, as in `start`: the old record is a superset.
                if let Err(e) = self.write_restart_record(left).await {
                    warn!(project = %project, error = %e, "could not update the restart record");
                }
            }
            return Err(DockerError::StartFailed {
                project: project.clone(),
                failures,
            });
        }
        if state.to_restart.take().is_some() {
            self.forget_restart_record().await;
            report.hooks = self.post_start_hooks().await?;
        }
        Ok(report)
    }

    /// Whether `service` is one of [`ComposeConfig::standby_stopped`].
    fn is_kept_stopped(&self, service: &str) -> bool {
        self.config.standby_stopped.iter().any(|s| s == service)
    }

    /// Stops a running container of a `standby_stopped` service: it must not run twice (once on
    /// the primary, once here), whoever started it.
    async fn stop_kept(&self, c: &ContainerRef) -> Result<(), DockerError> {
        warn!(project = %self.config.project, service = %c.service, container = %c.name,
            "a standby_stopped service runs on the standby; stopping it");
        let seconds =
            i32::try_from(self.config.stop_timeout.as_secs_f64().ceil() as i64).unwrap_or(i32::MAX);
        self.docker
            .stop_container(
                &c.id,
                Some(StopContainerOptionsBuilder::default().t(seconds).build()),
            )
            .await
            .map_err(|e| {
                self.api(
                    &format!(
                        "stopping container {} of service {}, which standby_stopped keeps stopped",
                        c.name, c.service
                    ),
                    e,
                )
            })
    }

    /// `up` with what it may start: everything (`-d`), unless some containers must not start
    /// before the caller looked at them (strict policy) or at all (`standby_stopped`), in which
    /// case nothing (`--no-start`) and the caller starts the rest. `--remove-orphans` removes
    /// the containers of services the definition no longer has.
    fn up_args(&self) -> &'static [&'static str] {
        if self.up_starts_nothing() {
            &["up", "--no-start", "--remove-orphans"]
        } else {
            &["up", "-d", "--remove-orphans"]
        }
    }

    /// Whether [`up_args`](Self::up_args) leaves the starting to the caller.
    fn up_starts_nothing(&self) -> bool {
        self.config.strict_root.is_some() || !self.config.standby_stopped.is_empty()
    }

    /// Runs a `compose up` and returns its command line; when it failed because images were
    /// missing and could not be pulled (and the engine confirms they are missing), says so
    /// ([`DockerError::ImageUnavailable`]) rather than quoting Compose's whole output.
    async fn compose_up(&self, args: &[&str]) -> Result<String, DockerError> {
        match self.run_compose(args).await {
            Ok((command, _)) => Ok(command),
            Err(DockerError::ComposeFailed {
                project,
                command,
                dir,
                status,
                output,
            }) => {
                let mut images = Vec::new();
                for candidate in definition::pulled_images(&output) {
                    if self.image_is_missing(&candidate.image).await {
                        images.push(candidate);
                    }
                }
                if images.is_empty() {
                    return Err(DockerError::ComposeFailed {
                        project,
                        command,
                        dir,
                        status,
                        output,
                    });
                }
                Err(DockerError::ImageUnavailable {
                    project,
                    images,
                    reason: definition::pull_failure(&output),
                    command,
                    dir,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the engine says it has no such image (any other answer is not "missing").
    async fn image_is_missing(&self, image: &str) -> bool {
        matches!(
            self.docker.inspect_image(image).await,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                ..
            })
        )
    }

    async fn post_start_hooks(&self) -> Result<Vec<HookRun>, DockerError> {
        if self.config.post_start.is_empty() {
            return Ok(Vec::new());
        }
        let containers = self.containers().await?;
        self.run_hooks(HookPhase::PostStart, &self.config.post_start, &containers)
            .await
    }

    /// The definition in `compose_dir` as Compose sees it (`compose config --hash '*'`).
    /// `None` when there is none to follow: no compose file in `compose_dir` (the containers
    /// were made another way), or no Compose CLI to read one; both are logged. A compose file
    /// Compose cannot read is an error: starting the old containers on new data would hide it.
    pub async fn definition(&self) -> Result<Option<Definition>, DockerError> {
        let project = &self.config.project;
        let (command, out) = match self.run_compose(&["config", "--hash", "*"]).await {
            Ok(ran) => ran,
            Err(
                e @ (DockerError::ComposeDirMissing { .. } | DockerError::ComposeMissing { .. }),
            ) => {
                warn!(project = %project, error = %e,
                    "cannot read the compose definition; bringing up the containers that exist");
                return Ok(None);
            }
            Err(e) if definition::default_compose_files(&self.config.compose_dir).is_empty() => {
                warn!(project = %project, dir = %self.config.compose_dir.display(), error = %e,
                    "no compose file to follow; bringing up the containers that exist");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        Definition::parse(&out)
            .map(Some)
            .map_err(|why| DockerError::ComposeFailed {
                project: project.clone(),
                command,
                dir: self.config.compose_dir.clone(),
                status: format!("exit code 0, but its output is not what Compose prints: {why}"),
                output: out.clone(),
            })
    }

    /// Runs `compose -p P ARGS…` in `compose_dir` with the create timeout: the command line and
    /// its stdout on success, [`DockerError::ComposeFailed`] with its output otherwise.
    async fn run_compose(&self, args: &[&str]) -> Result<(String, String), DockerError> {
        let project = &self.config.project;
        let dir = &self.config.compose_dir;
        match tokio::fs::metadata(dir).await {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(DockerError::ComposeDirMissing {
                    project: project.clone(),
                    dir: dir.clone(),
                    reason: "not a directory".to_owned(),
                });
            }
            Err(e) => {
                return Err(DockerError::ComposeDirMissing {
                    project: project.clone(),
                    dir: dir.clone(),
                    reason: e.to_string(),
                });
            }
        }
        let mut argv = self.compose_cli().await?;
        argv.extend(["-p", project.as_str()].map(str::to_owned));
        argv.extend(self.file_args().await?);
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let command = argv.join(" ");
        let failed = |status: String, output: String| DockerError::ComposeFailed {
            project: project.clone(),
            command: command.clone(),
            dir: dir.clone(),
            status,
            output,
        };
        let run = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .envs(&self.config.compose_env)
            .current_dir(dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(self.config.create_timeout, run).await {
            Err(_) => {
                return Err(failed(
                    format!("timed out after {:?}", self.config.create_timeout),
                    String::new(),
                ));
            }
            Ok(Err(e)) => return Err(failed(format!("could not run it: {e}"), String::new())),
            Ok(Ok(out)) => out,
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            return Err(failed(exit_status(out.status), output));
        }
        debug!(project = %project, command, stdout, stderr = %String::from_utf8_lossy(&out.stderr), "compose finished");
        Ok((command, stdout))
    }

    /// Undoes a stop whose process died before its `start`: if the
    /// [restart record](ComposeConfig::restart_record) exists, starts the recorded containers
    /// that still exist and are stopped, in order, runs the `post_start` hooks and removes the
    /// record (with nothing to start, it only removes the record).
    /// `Ok(None)` when there was nothing to recover. A record that cannot be parsed is an error
    /// naming the file (it is left for a person to look at), never silently ignored.
    pub async fn recover(&self) -> Result<Option<StartReport>, DockerError> {
        let Some(path) = self.config.restart_record.clone() else {
            return Ok(None);
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.record_error(&path, "reading", e.to_string())),
        };
        let record: RestartRecord = serde_json::from_slice(&bytes)
            .map_err(|e| self.record_error(&path, "parsing", e.to_string()))?;
        let existing: HashMap<String, StackContainer> = self
            .containers()
            .await?
            .into_iter()
            .map(|c| (c.container.id.clone(), c))
            .collect();
        // Only what is still down: a recorded container that runs again (the dead process got
        // that far, or someone started it) is not started twice, and a record left behind by a
        // start that could not remove it finds nothing to do and runs no hooks.
        let mut keep = Vec::new();
        for c in record.restart.containers {
            match existing.get(&c.id) {
                None => {
                    warn!(project = %self.config.project, service = %c.service, container = %c.name,
                    "a container recorded as stopped no longer exists; not starting it")
                }
                Some(now) if now.is_running() || now.state == "paused" => {
                    debug!(project = %self.config.project, container = %c.name, state = %now.state,
                        "a recorded container is not stopped; leaving it as it is");
                }
                Some(_) => keep.push(c),
            }
        }
        if keep.is_empty() {
            // Nothing left to start (and no stop for post_start hooks to pair with).
            self.forget_restart_record().await;
            return Ok(None);
        }
        warn!(project = %self.config.project, pid = record.pid, stopped_at_ms = record.stopped_at_ms,
            containers = keep.len(), record = %path.display(),
            "the stack was left stopped by a process that died before starting it again; starting it now");
        {
            let mut state = self.state.lock().await;
            let restart = state.to_restart.get_or_insert_with(|| ToRestart {
                containers: Vec::new(),
                start_order: record.restart.start_order.clone(),
            });
            for c in keep {
                if !restart.containers.iter().any(|r| r.id == c.id) {
                    restart.containers.push(c);
                }
            }
        }
        // `start` removes the record once everything is up, and keeps (rewrites) it naming
        // what did not start.
        let report = self.start().await?;
        Ok(Some(report))
    }

    /// [`recover`](Self::recover) as the first step of a cycle (or of a daemon's start): a
    /// recorded container that does not start again, or a `post_start` hook that fails, is
    /// logged and not returned, so that one broken container does not fail every cycle from
    /// now on. What did not start stays remembered (and in the record), so the cycle's own
    /// `start` tries it again and reports it if it still fails. Errors that leave it unknown
    /// what was stopped (the record unreadable, the engine unreachable) are returned.
    pub async fn recover_for_cycle(&self) -> Result<(), DockerError> {
        match self.recover().await {
            Ok(_) => Ok(()),
            Err(
                e @ (DockerError::StartFailed { .. }
                | DockerError::HookFailed { .. }
                | DockerError::HookTimedOut { .. }
                | DockerError::HookServiceNotRunning { .. }),
            ) => {
                warn!(project = %self.config.project, error = %e,
                    "starting what a killed process left stopped did not fully succeed; going on");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the restart record: temporary file, fsync, rename, fsync of the directory, so
    /// that it is on disk before the first container stops.
    async fn write_restart_record(&self, restart: ToRestart) -> Result<(), DockerError> {
        let Some(path) = self.config.restart_record.clone() else {
            return Ok(());
        };
        let record = RestartRecord {
            pid: std::process::id(),
            stopped_at_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            restart,
        };
        let json = serde_json::to_vec_pretty(&record).expect("a restart record serialises");
        let p = path.clone();
        tokio::task::spawn_blocking(move || write_durably(&p, &json))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| self.record_error(&path, "writing", e.to_string()))
    }

    async fn remove_restart_record(&self) -> Result<(), DockerError> {
        let Some(path) = &self.config.restart_record else {
            return Ok(());
        };
        match tokio::fs::remove_file(path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.record_error(path, "removing", e.to_string())),
        }
    }

    /// Removes the restart record once it is no longer needed; a failure is logged, not
    /// returned (see the callers).
    async fn forget_restart_record(&self) {
        if let Err(e) = self.remove_restart_record().await {
            warn!(project = %self.config.project, error = %e,
                "could not remove the restart record; the next recovery finds nothing stopped and removes it");
        }
    }

    fn record_error(&self, path: &std::path::Path, action: &str, reason: String) -> DockerError {
        DockerError::RestartRecord {
            project: self.config.project.clone(),
            action: action.to_owned(),
            path: path.to_owned(),
            reason,
        }
    }

    /// Waits until every container the last [`start`](Self::start),
    /// [`bring_up`](Self::bring_up) or [`create_if_missing`](Self::create_if_missing) brought
    /// up is ready (healthy, or running without a health check, or exited 0), failing at once
    /// on `unhealthy` or a non-zero exit. Containers `bring_up` kept stopped on purpose
    /// ([`ComposeConfig::standby_stopped`]) are not waited for; they are listed in the report.
    pub async fn wait_healthy_until(&self, deadline: Instant) -> Result<HealthReport, DockerError> {
        let began = Instant::now();
        let (mut pending, kept_stopped) = {
            let state = self.state.lock().await;
            (state.brought_up.clone(), state.kept_stopped.clone())
        };
        if pending.is_empty() && kept_stopped.is_empty() {
            return Err(DockerError::NoContainers {
                project: self.config.project.clone(),
            });
        }
        let mut ready = Vec::with_capacity(pending.len());
        loop {
            let mut not_ready = Vec::new();
            for c in std::mem::take(&mut pending) {
                match self.health_of(&c).await? {
                    Some(health) => {
                        debug!(project = %self.config.project, service = %c.service,
                            container = %c.name, ?health, "container ready");
                        ready.push(ContainerHealth {
                            container: c,
                            health,
                        });
                    }
                    None => {
                        pending.push(c);
                    }
                }
            }
            if pending.is_empty() {
                let waited = began.elapsed();
                info!(project = %self.config.project, containers = ready.len(),
                    kept_stopped = kept_stopped.len(), waited_ms = waited.as_millis() as u64,
                    "stack healthy");
                return Ok(HealthReport {
                    containers: ready,
                    kept_stopped,
                    waited,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                for c in &pending {
                    not_ready.push(self.not_ready(c).await?);
                }
                return Err(DockerError::HealthTimeout {
                    project: self.config.project.clone(),
                    waited: began.elapsed(),
                    pending: not_ready,
                });
            }
            tokio::time::sleep(HEALTH_POLL.min(deadline - now)).await;
        }
    }

    /// If the project has no containers at all, creates them as [`bring_up`](Self::bring_up)
    /// does (`docker compose -p P up -d --remove-orphans` in `compose_dir`, or `docker-compose`
    /// where the plugin is missing). The images are expected to be local; Compose pulls one
    /// that is not, and [`DockerError::ImageUnavailable`] says when it cannot.
    pub async fn create_if_missing(&self) -> Result<Creation, DockerError> {
        let mut state = self.state.lock().await;
        if !self.containers().await?.is_empty() {
            return Ok(Creation::Existed);
        }
        let report = self.bring_up_locked(&mut state).await?;
        Ok(Creation::Created {
            command: report.compose.unwrap_or_default(),
            containers: state
                .brought_up
                .iter()
                .chain(&state.kept_stopped)
                .cloned()
                .collect(),
        })
    }

    /// Under `compose_policy = "strict"`: inspects every container of the project (created,
    /// not started, by `up --no-start`, or there from before) and refuses them all
    /// ([`DockerError::PolicyRefused`], nothing started) if one breaks the policy. The
    /// containers that were not in `before` (this bring-up created or recreated them) are then
    /// removed again.
    async fn check_policy(
        &self,
        root: &std::path::Path,
        before: &[StackContainer],
    ) -> Result<(), DockerError> {
        let containers = self.containers().await?;
        let mut refused = Vec::new();
        for c in &containers {
            let inspected = self
                .docker
                .inspect_container(&c.container.id, None)
                .await
                .map_err(|source| self.api("inspect container", source))?;
            for why in policy::violations(&inspected, root) {
                refused.push(format!("{}: {why}", c.container.service));
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        // What this bring-up made goes again, so that the next one creates it afresh from the
        // compose file as it is then (fixed, perhaps); containers that were there before are
        // the operator's.
        let before: BTreeSet<&str> = before.iter().map(|c| c.container.id.as_str()).collect();
        for c in containers
            .iter()
            .filter(|c| !before.contains(c.container.id.as_str()))
        {
            let options = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            if let Err(e) = self
                .docker
                .remove_container(&c.container.id, Some(options))
                .await
            {
                warn!(project = %self.config.project, container = %c.container.name, error = %e,
                    "cannot remove a container the compose policy refused");
            }
        }
        Err(DockerError::PolicyRefused {
            project: self.config.project.clone(),
            violations: refused,
        })
    }

    /// A first creation that failed because it collided with something else on the host (a
    /// published port, a container name) becomes [`DockerError::HostConflict`], which says how
    /// the standby may differ; the containers it made are removed (the project had none), so
    /// that the next try creates them with the new settings rather than starting them as they
    /// were made. Other errors are returned as they are.
    async fn explain_first_creation(&self, e: DockerError) -> DockerError {
        let output = match &e {
            DockerError::ComposeFailed {
                command,
                status,
                output,
                ..
            } => format!("`{command}` ({status}):\n{output}"),
            DockerError::StartFailed { failures, .. } => failures
                .iter()
                .map(|f| {
                    format!(
                        "{} ({}): {}",
                        f.container.name, f.container.service, f.error
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            _ => return e,
        };
        let conflicts = HostConflict::find_all(&output);
        if conflicts.is_empty() {
            return e;
        }
        match self.containers().await {
            Ok(made) => {
                for c in made {
                    let options =
                        bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                            .force(true)
                            .v(true)
                            .build();
                    if let Err(err) = self
                        .docker
                        .remove_container(&c.container.id, Some(options))
                        .await
                    {
                        warn!(stack = %self.config.stack, container = %c.container.name, error = %err,
                            "cannot remove a container of a creation that collided with the host");
                    }
                }
            }
            Err(err) => {
                warn!(stack = %self.config.stack, error = %err,
                    "cannot list the containers of a creation that collided with the host");
            }
        }
        DockerError::HostConflict {
            stack: self.config.stack.clone(),
            project: self.config.project.clone(),
            conflicts,
            output,
        }
    }

    /// `docker compose` if `docker compose version` works, else `docker-compose`; found once per
    /// process (each probe starts a program, and Compose v1 takes a second to start).
    async fn compose_cli(&self) -> Result<Vec<String>, DockerError> {
        static FOUND: tokio::sync::OnceCell<Vec<String>> = tokio::sync::OnceCell::const_new();
        FOUND
            .get_or_try_init(|| self.probe_compose_cli())
            .await
            .cloned()
    }

    async fn probe_compose_cli(&self) -> Result<Vec<String>, DockerError> {
        let mut reasons = Vec::new();
        for argv in [&["docker", "compose"][..], &["docker-compose"][..]] {
            let probe = tokio::process::Command::new(argv[0])
                .args(&argv[1..])
                .arg("version")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output();
            match tokio::time::timeout(Duration::from_secs(30), probe).await {
                Ok(Ok(out)) if out.status.success() => {
                    return Ok(argv.iter().map(|s| (*s).to_owned()).collect());
                }
                Ok(Ok(out)) => reasons.push(format!(
                    "`{} version`: {}: {}",
                    argv.join(" "),
                    exit_status(out.status),
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Ok(Err(e)) => reasons.push(format!("`{} version`: {e}", argv.join(" "))),
                Err(_) => reasons.push(format!("`{} version`: timed out", argv.join(" "))),
            }
        }
        Err(DockerError::ComposeMissing {
            project: self.config.project.clone(),
            reason: reasons.join("; "),
        })
    }

    /// `Some` when the container is ready, `None` while it may still become ready, an error
    /// when it cannot.
    async fn health_of(&self, c: &ContainerRef) -> Result<Option<Health>, DockerError> {
        let inspected = self
            .docker
            .inspect_container(&c.id, None)
            .await
            .map_err(|e| self.api(&format!("inspecting container {}", c.name), e))?;
        let state = inspected.state.unwrap_or_default();
        let status = state.status.map(|s| s.to_string()).unwrap_or_default();
        let health = state.health.as_ref();
        let log = || health.map(last_health_log).unwrap_or_default();
        match status.as_str() {
            "running" => match health.and_then(|h| h.status) {
                Some(HealthStatusEnum::HEALTHY) => Ok(Some(Health::Healthy)),
                Some(HealthStatusEnum::UNHEALTHY) => Err(DockerError::Unhealthy {
                    project: self.config.project.clone(),
                    container: Box::new(c.clone()),
                    health_log: log(),
                }),
                Some(HealthStatusEnum::STARTING) => Ok(None),
                None | Some(HealthStatusEnum::NONE) | Some(HealthStatusEnum::EMPTY) => {
                    Ok(Some(Health::Running))
                }
            },
            "restarting" | "paused" => Ok(None),
            _ => match state.exit_code.unwrap_or(-1) {
                0 if status == "exited" => Ok(Some(Health::Completed)),
                exit_code => Err(DockerError::NotRunning {
                    project: self.config.project.clone(),
                    container: Box::new(c.clone()),
                    status,
                    exit_code,
                    health_log: log(),
                }),
            },
        }
    }

    async fn not_ready(&self, c: &ContainerRef) -> Result<NotReady, DockerError> {
        let inspected = self
            .docker
            .inspect_container(&c.id, None)
            .await
            .map_err(|e| self.api(&format!("inspecting container {}", c.name), e))?;
        let state = inspected.state.unwrap_or_default();
        let mut status = state.status.map(|s| s.to_string()).unwrap_or_default();
        if let Some(h) = state.health.as_ref().and_then(|h| h.status) {
            status.push_str(&format!(", health {h}"));
        }
        Ok(NotReady {
            container: c.clone(),
            status,
            health_log: state
                .health
                .as_ref()
                .map(last_health_log)
                .unwrap_or_default(),
        })
    }

    async fn run_hooks(
        &self,
        phase: HookPhase,
        hooks: &[Hook],
        containers: &[StackContainer],
    ) -> Result<Vec<HookRun>, DockerError> {
        let mut runs = Vec::with_capacity(hooks.len());
        for hook in hooks {
            runs.push(self.run_hook(phase, hook, containers).await?);
        }
        Ok(runs)
    }

    async fn run_hook(
        &self,
        phase: HookPhase,
        hook: &Hook,
        containers: &[StackContainer],
    ) -> Result<HookRun, DockerError> {
        let project = &self.config.project;
        let Some(target) = containers
            .iter()
            .find(|c| c.container.service == hook.service && c.is_running())
        else {
            let services: BTreeSet<&str> = containers
                .iter()
                .map(|c| c.container.service.as_str())
                .collect();
            return Err(DockerError::HookServiceNotRunning {
                project: project.clone(),
                phase,
                service: hook.service.clone(),
                command: hook.command.clone(),
                services: services.into_iter().map(str::to_owned).collect(),
            });
        };
        let container = target.container.clone();
        info!(project = %project, %phase, service = %container.service, container = %container.name,
            command = ?hook.command, "running hook");
        let action =
            |what: &str| format!("{what} the {phase} hook in container {}", container.name);
        let exec = self
            .docker
            .create_exec(
                &container.id,
                ExecConfig {
                    cmd: Some(hook.command.clone()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.api(&action("creating"), e))?;

        let began = Instant::now();
        let mut output = HookOutput::new(project, phase, &target.container.service);
        let attached = async {
            if let StartExecResults::Attached {
                output: mut stream, ..
            } = self.docker.start_exec(&exec.id, None).await?
            {
                while let Some(chunk) = stream.next().await {
                    output.push(chunk?);
                }
            }
            Ok::<(), bollard::errors::Error>(())
        };
        let ran = tokio::time::timeout(self.config.hook_timeout, attached).await;
        output.flush();
        match ran {
            Err(_) => {
                return Err(DockerError::HookTimedOut {
                    project: project.clone(),
                    phase,
                    container: Box::new(container),
                    command: hook.command.clone(),
                    timeout: self.config.hook_timeout,
                    output: output.text(),
                });
            }
            Ok(Err(e)) => return Err(self.api(&action("running"), e)),
            Ok(Ok(())) => {}
        }
        // The output stream can end a moment before the engine records the exit code.
        let mut exit_code = None;
        for _ in 0..50 {
            let inspected = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| self.api(&action("inspecting"), e))?;
            if inspected.running != Some(true) {
                exit_code = inspected.exit_code;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = began.elapsed();
        let exit_code = exit_code.unwrap_or(-1);
        if exit_code != 0 {
            warn!(project = %project, %phase, service = %container.service, exit_code,
                "hook failed");
            return Err(DockerError::HookFailed {
                project: project.clone(),
                phase,
                container: Box::new(container),
                command: hook.command.clone(),
                exit_code,
                output: output.text(),
            });
        }
        info!(project = %project, %phase, service = %container.service,
            took_ms = took.as_millis() as u64, "hook done");
        Ok(HookRun {
            phase,
            container,
            command: hook.command.clone(),
            output: output.text(),
            took,
        })
    }

    fn api(&self, action: &str, source: bollard::errors::Error) -> DockerError {
        DockerError::Api {
            project: self.config.project.clone(),
            action: action.to_owned(),
            source,
        }
    }
}

impl StackControl for ComposeStack {
    fn stop(&self) -> ControlFuture<'_, StopReport> {
        Box::pin(ComposeStack::stop(self))
    }
    fn start(&self) -> ControlFuture<'_, StartReport> {
        Box::pin(ComposeStack::start(self))
    }
    fn wait_healthy(&self) -> ControlFuture<'_, HealthReport> {
        Box::pin(self.wait_healthy_until(Instant::now() + self.config.health_timeout))
    }
    fn create_if_missing(&self) -> ControlFuture<'_, Creation> {
        Box::pin(ComposeStack::create_if_missing(self))
    }
    fn bring_up(&self) -> ControlFuture<'_, StartReport> {
        Box::pin(ComposeStack::bring_up(self))
    }
    fn mounts(&self) -> ControlFuture<'_, Vec<crate::coverage::MountUse>> {
        Box::pin(ComposeStack::mounts(self))
    }
    fn recover(&self) -> ControlFuture<'_, Option<StartReport>> {
        Box::pin(ComposeStack::recover(self))
    }
    fn hand_over(&self) -> ControlFuture<'_, ()> {
        Box::pin(self.remove_restart_record())
    }
}

/// The project's files and variables as Compose reads them in `compose_dir` (`compose_env` over
/// `.env`), with the `compose_override` last.
fn project_files(config: &ComposeConfig) -> Result<(ComposeFiles, ProjectEnv), ComposeFileError> {
    let env = ProjectEnv::load(&config.compose_dir, &config.compose_env)?;
    let mut files = ComposeFiles::find(&config.compose_dir, &env)?;
    files.files.extend(config.compose_override.iter().cloned());
    Ok((files, env))
}

/// `path` with `bytes`, durably: temporary file beside it, fsync, rename, fsync of the dir.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Sorts by the service's place in `start_order` (services not in it last), then by name.
fn sort_in_start_order(containers: &mut [ContainerRef], start_order: &[String]) {
    containers.sort_by_cached_key(|c| {
        (
            start_order
                .iter()
                .position(|s| *s == c.service)
                .unwrap_or(usize::MAX),
            c.name.clone(),
        )
    });
}

fn elapsed_ms(began: SystemTime, done: SystemTime) -> u64 {
    done.duration_since(began)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn last_health_log(health: &bollard::models::Health) -> Vec<String> {
    let log = health.log.as_deref().unwrap_or_default();
    log[log.len().saturating_sub(HEALTH_LOG_LINES)..]
        .iter()
        .map(|r| {
            let output = r.output.as_deref().unwrap_or("").trim();
            let output: String = output.chars().take(500).collect();
            format!(
                "exit {} at {}: {}",
                r.exit_code.unwrap_or(-1),
                r.start.as_deref().unwrap_or("?"),
                output.replace('\n', " | ")
            )
        })
        .collect()
}

/// A hook's output: logged line by line as it arrives, the tail kept for the report.
struct HookOutput<'a> {
    project: &'a str,
    phase: HookPhase,
    service: &'a str,
    kept: Vec<u8>,
    partial: [Vec<u8>; 2],
}

impl<'a> HookOutput<'a> {
    fn new(project: &'a str, phase: HookPhase, service: &'a str) -> HookOutput<'a> {
        HookOutput {
            project,
            phase,
            service,
            kept: Vec::new(),
            partial: [Vec::new(), Vec::new()],
        }
    }

    fn push(&mut self, chunk: bollard::container::LogOutput) {
        use bollard::container::LogOutput;
        let (stream, bytes) = match chunk {
            LogOutput::StdErr { message } => (1, message),
            LogOutput::StdOut { message }
            | LogOutput::Console { message }
            | LogOutput::StdIn { message } => (0, message),
        };
        self.kept.extend_from_slice(&bytes);
        if self.kept.len() > HOOK_OUTPUT_MAX {
            self.kept.drain(..self.kept.len() - HOOK_OUTPUT_MAX);
        }
        let partial = &mut self.partial[stream];
        partial.extend_from_slice(&bytes);
        while let Some(nl) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=nl).collect();
            Self::log(self.project, self.phase, self.service, stream, &line);
        }
        // A line without a newline is logged in pieces rather than held without bound.
        if partial.len() > HOOK_OUTPUT_MAX {
            let line = std::mem::take(partial);
            Self::log(self.project, self.phase, self.service, stream, &line);
        }
    }

    fn flush(&mut self) {
        for stream in 0..2 {
            let line = std::mem::take(&mut self.partial[stream]);
            if !line.is_empty() {
                Self::log(self.project, self.phase, self.service, stream, &line);
            }
        }
    }

    fn log(project: &str, phase: HookPhase, service: &str, stream: usize, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let stream = if stream == 0 { "stdout" } else { "stderr" };
        info!(target: "stackclone::hook", project, %phase, service, stream,
            line = %line.trim_end_matches(['\n', '\r']), "hook output");
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

fn exit_status(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack whose engine is never asked: `plan_for` gets its containers from the test.
    fn stack_in(dir: &std::path::Path, config: ComposeConfig) -> ComposeStack {
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .expect("a client is made without connecting");
        ComposeStack::with_docker(
            docker,
            ComposeConfig {
                compose_dir: dir.to_owned(),
                ..config
            },
        )
    }

    fn container(service: &str, depends_on_label: Option<&str>) -> StackContainer {
        StackContainer {
            health: None,
            container: ContainerRef {
                service: service.to_owned(),
                name: format!("p_{service}_1"),
                id: format!("id-{service}"),
            },
            state: "running".to_owned(),
            depends_on: depends_on_label.map(parse_depends_on_label),
            config_hash: None,
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A dir whose compose file says `app` depends on `db` and `cache` on nothing: names alone
    /// would start `app` first.
    fn compose_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("docker-compose.yml"),
            "services:\n  app:\n    depends_on: [db]\n  db: {}\n  cache: {}\n",
        )
        .expect("write");
        dir
    }

    #[tokio::test]
    async fn the_compose_file_orders_a_stack_that_says_nothing_else() {
        let dir = compose_dir();
        let stack = stack_in(dir.path(), ComposeConfig::new("p", "/unused"));
        let containers = [
            container("app", None),
            container("cache", None),
            container("db", None),
        ];
        let plan = stack.plan_for(&containers).await.expect("plan");
        assert_eq!(plan.source, OrderSource::ComposeFile);
        assert_eq!(plan.start_order, ["cache", "db", "app"]);
        assert!(!stack.warned_no_order.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn labels_and_then_the_stack_file_come_before_the_compose_file() {
        let dir = compose_dir();
        // Labels say db needs app: they win over everything.
        let labelled = [
            container("app", Some("")),
            container("db", Some("app:service_started:false")),
        ];
        let with_config = ComposeConfig {
            depends_on: [("cache".to_owned(), strings(&["app"]))].into(),
            order: strings(&["cache"]),
            ..ComposeConfig::new("p", "/unused")
        };
        let stack = stack_in(dir.path(), with_config.clone());
        let plan = stack.plan_for(&labelled).await.expect("plan");
        assert_eq!(plan.source, OrderSource::Labels);
        assert_eq!(plan.start_order, ["app", "db"]);

        // No labels: the stack file's depends_on, not the compose file's.
        let plain = [
            container("app", None),
            container("cache", None),
            container("db", None),
        ];
        let plan = stack.plan_for(&plain).await.expect("plan");
        assert_eq!(plan.source, OrderSource::ConfigDependsOn);
        assert_eq!(plan.start_order, ["app", "cache", "db"]);

        // The stack file's order alone also beats the compose file.
        let stack = stack_in(
            dir.path(),
            ComposeConfig {
                order: strings(&["app", "db"]),
                ..ComposeConfig::new("p", "/unused")
            },
        );
        let plan = stack.plan_for(&plain).await.expect("plan");
        assert_eq!(plan.source, OrderSource::ConfigOrder);
        assert_eq!(plan.start_order, ["app", "db", "cache"]);
    }

    #[tokio::test]
    async fn no_dependency_anywhere_goes_by_name_and_warns_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("compose.yaml"),
            "services:\n  app: {}\n  db: {}\n",
        )
        .expect("write");
        let stack = stack_in(dir.path(), ComposeConfig::new("p", "/unused"));
        let plain = [container("db", None), container("app", None)];
        let plan = stack.plan_for(&plain).await.expect("plan");
        assert_eq!(plan.source, OrderSource::Names);
        assert_eq!(plan.start_order, ["app", "db"]);
        assert!(stack.warned_no_order.load(Ordering::Relaxed));

        // One service: nothing to order, nothing to warn about.
        let single = stack_in(dir.path(), ComposeConfig::new("p", "/unused"));
        let plan = single.plan_for(&plain[..1]).await.expect("plan");
        assert_eq!(plan.source, OrderSource::Names);
        assert!(!single.warned_no_order.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn with_compose_override_the_projects_files_are_named_and_the_override_comes_last() {
        let dir = compose_dir();
        std::fs::write(
            dir.path().join("docker-compose.override.yml"),
            "services:\n  db:\n    depends_on: [cache]\n",
        )
        .expect("write");
        let outside = tempfile::tempdir().expect("temp dir");
        let over = outside.path().join("standby.yml");
        std::fs::write(
            &over,
            "services:\n  cache:\n    depends_on: [extra]\n  extra: {}\n",
        )
        .expect("write");

        // Without an override Compose finds the files itself: no -f at all.
        let plain = stack_in(dir.path(), ComposeConfig::new("p", "/unused"));
        assert_eq!(plain.file_args().await.expect("args"), Vec::<String>::new());

        let config = ComposeConfig {
            compose_override: Some(over.clone()),
            ..ComposeConfig::new("p", "/unused")
        };
        let stack = stack_in(dir.path(), config.clone());
        let f = |p: std::path::PathBuf| ["-f".to_owned(), p.display().to_string()];
        let want: Vec<String> = [
            f(dir.path().join("docker-compose.yml")),
            f(dir.path().join("docker-compose.override.yml")),
            f(over.clone()),
        ]
        .concat();
        assert_eq!(stack.file_args().await.expect("args"), want);

        // The order reads the same files: the override's dependencies count.
        let containers = [
            container("app", None),
            container("cache", None),
            container("db", None),
            container("extra", None),
        ];
        let plan = stack.plan_for(&containers).await.expect("plan");
        assert_eq!(plan.source, OrderSource::ComposeFile);
        assert_eq!(plan.start_order, ["extra", "cache", "db", "app"]);

        // COMPOSE_FILE given in compose_env replaces the search, as it does for Compose.
        std::fs::write(dir.path().join("only.yml"), "services: {}\n").expect("write");
        let stack = stack_in(
            dir.path(),
            ComposeConfig {
                compose_env: [("COMPOSE_FILE".to_owned(), "only.yml".to_owned())].into(),
                ..config
            },
        );
        let want: Vec<String> = [f(dir.path().join("only.yml")), f(over)].concat();
        assert_eq!(stack.file_args().await.expect("args"), want);

        // No compose file at all: an error that says why, not a Compose run without files.
        let empty = tempfile::tempdir().expect("temp dir");
        let stack = stack_in(
            empty.path(),
            ComposeConfig {
                compose_override: Some(outside.path().join("standby.yml")),
                ..ComposeConfig::new("p", "/unused")
            },
        );
        let err = stack.file_args().await.expect_err("no files");
        assert!(
            matches!(
                &err,
                DockerError::ComposeFiles {
                    source: ComposeFileError::NotFound { .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_compose_file_that_cannot_be_read_is_no_error_for_the_order() {
        for text in [None, Some("services:\n  app: [\n")] {
            let dir = tempfile::tempdir().expect("temp dir");
            if let Some(text) = text {
                std::fs::write(dir.path().join("compose.yaml"), text).expect("write");
            }
            let stack = stack_in(dir.path(), ComposeConfig::new("p", "/unused"));
            let plain = [container("db", None), container("app", None)];
            let plan = stack.plan_for(&plain).await.expect("plan");
            assert_eq!(plan.source, OrderSource::Names, "{text:?}");
            assert!(stack.warned_no_order.load(Ordering::Relaxed), "{text:?}");
        }
    }
}
