//! What can go wrong controlling a stack. Every variant that concerns a stack names its Compose
//! project; container-level variants name the service and container.

use std::path::PathBuf;
use std::time::Duration;

use super::report::{ContainerRef, HookPhase};

/// One container that did not come up, for [`DockerError::StartFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    /// The container.
    pub container: ContainerRef,
    /// What the engine said.
    pub error: String,
}

/// One container that was not ready at the deadline, for [`DockerError::HealthTimeout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// The container.
    pub container: ContainerRef,
    /// Its state and health status, e.g. `running, health starting`.
    pub status: String,
    /// The last lines of its health log, oldest first.
    pub health_log: Vec<String>,
}

/// What a first creation of the standby collided with on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostConflict {
    /// A port the compose file publishes is taken on this host (Docker's `port is already
    /// allocated`, or `address already in use` from its proxy).
    Port {
        /// Docker's words, e.g. `Bind for 0.0.0.0:8080 failed: port is already allocated`.
        detail: String,
    },
    /// A `container_name` the compose file sets is taken: container names are global to the
    /// engine.
    ContainerName {
        /// The name.
        name: String,
    },
}

impl HostConflict {
    /// The conflicts Compose's or Docker's output reports, each once, in the order seen.
    pub fn find_all(output: &str) -> Vec<HostConflict> {
        let mut found = Vec::new();
        for line in output.lines() {
            let conflict = if let Some(detail) = port_taken(line) {
                HostConflict::Port { detail }
            } else if line.contains("is already in use by container")
                && let Some((_, rest)) = line.split_once("container name \"")
            {
                let name = rest.split('"').next().unwrap_or("");
                HostConflict::ContainerName {
                    name: name.trim_start_matches('/').to_owned(),
                }
            } else {
                continue;
            };
            if !found.contains(&conflict) {
                found.push(conflict);
            }
        }
        found
    }
}

/// `Bind for 0.0.0.0:8080 failed: port is already allocated` (or the `listen …: address already
/// in use` of Docker's proxy) out of a line that reports it.
fn port_taken(line: &str) -> Option<String> {
    ["port is already allocated", "address already in use"]
        .iter()
        .find_map(|phrase| {
            let end = line.find(phrase)? + phrase.len();
            let line = &line[..end];
            let start = ["Bind for ", "listen "]
                .iter()
                .filter_map(|p| line.find(p))
                .min()
                .unwrap_or(0);
            Some(line[start..].trim().to_owned())
        })
}

impl std::fmt::Display for HostConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostConflict::Port { detail } => {
                write!(f, "a port it publishes is taken on this host ({detail})")
            }
            HostConflict::ContainerName { name } => write!(
                f,
                "its container name {name} is taken on this host (container_name is global to \
                 the engine)"
            ),
        }
    }
}

/// An image the stack's definition needs and the engine does not have, for
/// [`DockerError::ImageUnavailable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingImage {
    /// The image reference as the definition writes it.
    pub image: String,
    /// The service that needs it, when Compose said.
    pub service: Option<String>,
}

impl std::fmt::Display for MissingImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.service {
            Some(service) => write!(f, "{} (service {service})", self.image),
            None => f.write_str(&self.image),
        }
    }
}

fn host_conflicts(conflicts: &[HostConflict]) -> String {
    conflicts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn host_conflict_fix(conflicts: &[HostConflict], stack: &str) -> String {
    let mut fixes = vec![
        "The standby may differ from the primary where it must, in the target's stack file"
            .to_owned(),
    ];
    if conflicts
        .iter()
        .any(|c| matches!(c, HostConflict::Port { .. }))
    {
        fixes.push(
            "for a port: write it with a variable in the compose file on the primary \
             (\"${HTTP_PORT:-8080}:80\") and set compose_env = { HTTP_PORT = \"18080\" } on the \
             target, which wins over the synced .env (an override file cannot take a published \
             port away: Compose adds its ports to the project's, unless Compose v2.24+ reads \
             `ports: !override [...]` in it)"
                .to_owned(),
        );
    }
    if conflicts
        .iter()
        .any(|c| matches!(c, HostConflict::ContainerName { .. }))
    {
        fixes.push(format!(
            "for a container name: set compose_override = \
             \"/etc/stackclone/overrides/{stack}.yml\", a compose file kept outside the synced \
             path and passed after the project's own, whose service sets another \
             container_name (or compose_env, if the name comes from a variable)"
        ));
    }
    format!(
        "{}. The containers this attempt created were removed, so the next cycle creates them \
         with the new settings",
        fixes.join("; ")
    )
}

/// Why stopping, starting, checking or creating a stack failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No Docker engine at the socket (missing socket, daemon down, refused API version).
    #[error(
        "cannot reach the Docker engine at {host}: {source} \
         (is dockerd running, may this user use its socket, and is DOCKER_HOST right?)"
    )]
    Connect {
        /// `DOCKER_HOST`, or the default socket.
        host: String,
        /// bollard's error.
        source: bollard::errors::Error,
    },

    /// An API call failed.
    #[error("project {project}: {action} failed: {source}")]
    Api {
        /// The Compose project.
        project: String,
        /// What was being done, e.g. `stopping container app_db_1 (service db)`.
        action: String,
        /// bollard's error.
        source: bollard::errors::Error,
    },

    /// The services' dependencies go round in a circle, so there is no start order.
    #[error(
        "project {project}: the services depend on each other in a circle ({}), \
         so there is no order to start them in; fix depends_on",
        cycle.join(" -> ")
    )]
    DependencyCycle {
        /// The Compose project.
        project: String,
        /// The cycle, first service repeated at the end.
        cycle: Vec<String>,
    },

    /// A hook names a service that has no running container.
    #[error(
        "project {project}: {phase} hook {command:?} names service {service:?}, \
         which has no running container (services seen: {})",
        if services.is_empty() { "none".to_owned() } else { services.join(", ") }
    )]
    HookServiceNotRunning {
        /// The Compose project.
        project: String,
        /// When the hook was to run.
        phase: HookPhase,
        /// The service named by the hook.
        service: String,
        /// The hook's argv.
        command: Vec<String>,
        /// The services of the project, running or not.
        services: Vec<String>,
    },

    /// A hook exited non-zero.
    #[error(
        "project {project}: {phase} hook {command:?} in service {} ({}) exited with {exit_code}{}; \
         output:\n{output}",
        container.service, container.name,
        if *phase == HookPhase::PreStop { ", so nothing was stopped" } else { "" }
    )]
    HookFailed {
        /// The Compose project.
        project: String,
        /// When the hook ran.
        phase: HookPhase,
        /// Where it ran.
        container: Box<ContainerRef>,
        /// The hook's argv.
        command: Vec<String>,
        /// Its exit code.
        exit_code: i64,
        /// Its stdout and stderr as received (the last 64 KiB).
        output: String,
    },

    /// A hook ran longer than the hook timeout. The process may still run in the container:
    /// the Docker API cannot kill an exec.
    #[error(
        "project {project}: {phase} hook {command:?} in service {} ({}) did not finish within \
         {timeout:?}; output so far:\n{output}",
        container.service, container.name
    )]
    HookTimedOut {
        /// The Compose project.
        project: String,
        /// When the hook ran.
        phase: HookPhase,
        /// Where it ran.
        container: Box<ContainerRef>,
        /// The hook's argv.
        command: Vec<String>,
        /// The hook timeout.
        timeout: Duration,
        /// What it printed until then.
        output: String,
    },

    /// Some containers did not start. The others were started; `start` again retries these.
    #[error(
        "project {project}: {} container(s) did not start: {}",
        failures.len(),
        failures.iter().map(|f| format!("{} ({}): {}", f.container.name, f.container.service, f.error))
            .collect::<Vec<_>>().join("; ")
    )]
    StartFailed {
        /// The Compose project.
        project: String,
        /// The containers that failed.
        failures: Vec<StartFailure>,
    },

    /// A container's health check reports `unhealthy`.
    #[error(
        "project {project}: service {} ({}) is unhealthy; last health checks:\n{}",
        container.service, container.name, health_log.join("\n")
    )]
    Unhealthy {
        /// The Compose project.
        project: String,
        /// The container.
        container: Box<ContainerRef>,
        /// The last lines of its health log, oldest first.
        health_log: Vec<String>,
    },

    /// A container that should be up has exited (or is dead, or was never started).
    #[error(
        "project {project}: service {} ({}) is not running: {status}, exit code {exit_code}{}",
        container.service, container.name,
        if health_log.is_empty() { String::new() } else { format!("; last health checks:\n{}", health_log.join("\n")) }
    )]
    NotRunning {
        /// The Compose project.
        project: String,
        /// The container.
        container: Box<ContainerRef>,
        /// Its state (`exited`, `dead`, `created`).
        status: String,
        /// Its last exit code.
        exit_code: i64,
        /// The last lines of its health log, oldest first.
        health_log: Vec<String>,
    },

    /// Nothing was brought up to check: a stack with no container is never healthy.
    #[error(
        "project {project}: has no containers, so it is not running; a stack with no \
         container is never healthy"
    )]
    NoContainers {
        /// The Compose project.
        project: String,
    },

    /// Not every container was ready by the deadline.
    #[error(
        "project {project}: not healthy after {waited:?}: {}",
        pending.iter().map(|p| format!(
            "{} ({}) {}{}", p.container.service, p.container.name, p.status,
            if p.health_log.is_empty() { String::new() } else { format!(", last check: {}", p.health_log[p.health_log.len() - 1]) }
        )).collect::<Vec<_>>().join("; ")
    )]
    HealthTimeout {
        /// The Compose project.
        project: String,
        /// How long it waited.
        waited: Duration,
        /// The containers that were not ready.
        pending: Vec<NotReady>,
    },

    /// `compose_dir` is not a directory, so there is no compose file to create the stack from.
    #[error(
        "project {project}: has no containers, and compose_dir {} is not a directory: {reason}",
        dir.display()
    )]
    ComposeDirMissing {
        /// The Compose project.
        project: String,
        /// The configured `compose_dir`.
        dir: PathBuf,
        /// Why it is not usable.
        reason: String,
    },

    /// Neither `docker compose` nor `docker-compose` runs.
    #[error(
        "project {project}: has no containers, and neither `docker compose` nor `docker-compose` \
         is available to create them ({reason}); install the Compose plugin or docker-compose"
    )]
    ComposeMissing {
        /// The Compose project.
        project: String,
        /// What running them said.
        reason: String,
    },

    /// The file that records what a stop stopped could not be written, read or removed.
    #[error(
        "project {project}: {action} the restart record {} failed: {reason} (it lists the \
         containers a stop stopped, so that they are started again if this process dies)",
        path.display()
    )]
    RestartRecord {
        /// The Compose project.
        project: String,
        /// `writing`, `reading`, `parsing` or `removing`.
        action: String,
        /// The record.
        path: PathBuf,
        /// What failed.
        reason: String,
    },

    /// The Compose CLI failed.
    #[error(
        "project {project}: `{command}` in {} failed ({status}); output:\n{output}",
        dir.display()
    )]
    ComposeFailed {
        /// The Compose project.
        project: String,
        /// The command line.
        command: String,
        /// Where it ran.
        dir: PathBuf,
        /// How it ended (exit status, or `timed out after …`).
        status: String,
        /// Its stdout and stderr.
        output: String,
    },

    /// `compose up` needed images the engine does not have, and pulling them failed (no
    /// registry reachable, no such image, no credentials). Compose pulls before it touches a
    /// container, so nothing was recreated.
    #[error(
        "project {project}: {} not on this host and could not be pulled: {reason}. Load {} on \
         this host (`docker load`, or `docker pull` from a registry it can reach) or change the \
         image in the source's compose file; `{command}` ran in {}",
        if images.len() == 1 { format!("image {} is", images[0]) }
        else { format!("images {} are", images.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")) },
        if images.len() == 1 { "it" } else { "them" },
        dir.display()
    )]
    ImageUnavailable {
        /// The Compose project.
        project: String,
        /// The images missing, as the definition names them.
        images: Vec<MissingImage>,
        /// What the pull said (Compose's output without its progress lines).
        reason: String,
        /// The command line.
        command: String,
        /// Where it ran.
        dir: PathBuf,
    },

    /// `compose_policy = "strict"` and a container breaks it: nothing was started.
    #[error(
        "project {project}: compose_policy = \"strict\" refuses to start the stack, nothing was \
         started: {}. The compose file came from the source; change it there, or set \
         compose_policy = \"trusted\" on this target if the source is meant to have that power",
        violations.join("; ")
    )]
    PolicyRefused {
        /// The Compose project.
        project: String,
        /// `service: why`, one per breach.
        violations: Vec<String>,
    },

    /// The Compose CLI succeeded but no container carries the project's label: Compose
    /// normalised the project name (v1 lowercases it and drops characters other than
    /// `a-z0-9_-`), or the compose file names another project.
    #[error(
        "project {project}: `{command}` in {} succeeded but no container has the label \
         com.docker.compose.project={project}; use a lowercase project name of a-z, 0-9, - and _ \
         (Compose normalises others)",
        dir.display()
    )]
    ComposeCreatedNothing {
        /// The Compose project.
        project: String,
        /// The command line.
        command: String,
        /// Where it ran.
        dir: PathBuf,
    },
    /// The standby's volume or outside path could not be made to hold the replicated tree.
    #[error("project {project}: {what}: {reason}")]
    Volume {
        /// The Compose project.
        project: String,
        /// `standby volume NAME` or `outside path PATH`.
        what: String,
        reason: String,
    },

    /// With a `compose_override`, the project's own compose files must be named to Compose, and
    /// they could not be found or read.
    #[error(
        "project {project}: cannot tell Compose which of the project's files to read before \
         compose_override: {source}"
    )]
    ComposeFiles {
        /// The Compose project.
        project: String,
        /// What was wrong.
        source: crate::compose_file::ComposeFileError,
    },

    /// The first creation of the standby collided with something else on its host. What it
    /// created was removed.
    #[error(
        "stack {stack} (project {project}): creating the standby failed: {}. {}. \
         What failed:\n{output}",
        host_conflicts(conflicts),
        host_conflict_fix(conflicts, stack)
    )]
    HostConflict {
        /// The stack.
        stack: String,
        /// The Compose project.
        project: String,
        /// What it collided with (at least one).
        conflicts: Vec<HostConflict>,
        /// Compose's output, or the engine's errors starting the containers.
        output: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `docker-compose up -d` (1.29.2, engine 20.10) printed for a project whose port and
    /// container name another project held.
    const COMPOSE_V1: &str = "Creating network \"scpcb_default\" with the default driver
Creating scpcnamed   ... error

ERROR: for scpcnamed  Cannot create container for service named: Conflict. The container name \"/scpcnamed\" is already in use by container \"f358b5981f20\". You have to remove (or rename) that container to be able to reuse that name.
Creating scpcb_web_1 ... error

ERROR: for scpcb_web_1  Cannot start service web: driver failed programming external connectivity on endpoint scpcb_web_1 (ac5700efcffa): Bind for 127.0.0.1:38517 failed: port is already allocated

ERROR: for named  Cannot create container for service named: Conflict. The container name \"/scpcnamed\" is already in use by container \"f358b5981f20\". You have to remove (or rename) that container to be able to reuse that name.

ERROR: for web  Cannot start service web: driver failed programming external connectivity on endpoint scpcb_web_1 (ac5700efcffa): Bind for 127.0.0.1:38517 failed: port is already allocated
Encountered errors while bringing up the project.
";

    #[test]
    fn port_and_name_conflicts_are_found_in_composes_output() {
        assert_eq!(
            HostConflict::find_all(COMPOSE_V1),
            [
                HostConflict::ContainerName {
                    name: "scpcnamed".into()
                },
                HostConflict::Port {
                    detail: "Bind for 127.0.0.1:38517 failed: port is already allocated".into()
                },
            ]
        );
        assert_eq!(
            HostConflict::find_all(
                "Error starting userland proxy: listen tcp4 0.0.0.0:80: bind: address already in use"
            ),
            [HostConflict::Port {
                detail: "listen tcp4 0.0.0.0:80: bind: address already in use".into()
            }]
        );
        assert_eq!(
            HostConflict::find_all("ERROR: for app  Cannot start service app: image not found"),
            []
        );
    }

    #[test]
    fn a_host_conflict_says_which_setting_to_use() {
        let e = DockerError::HostConflict {
            stack: "nextcloud".into(),
            project: "nextcloud".into(),
            conflicts: HostConflict::find_all(COMPOSE_V1),
            output: COMPOSE_V1.into(),
        };
        let text = e.to_string();
        for want in [
            "port is already allocated",
            "container name scpcnamed is taken",
            "compose_override = \"/etc/stackclone/overrides/nextcloud.yml\"",
            "compose_env = { HTTP_PORT = \"18080\" }",
            "sets another container_name",
            "cannot take a published port away",
        ] {
            assert!(text.contains(want), "{want:?} missing from: {text}");
        }
    }
}
