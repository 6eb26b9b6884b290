//! `target.toml` and the target's stack files.

use std::fs;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::alert::AlertConfig;
use crate::config::Location;

use std::collections::BTreeMap;

use super::value::{AbsPath, EnvName, EnvValue, HostName, Secs, ServiceName, StackName};
use super::{
    Address, ConfigError, ConfigWarning, DEFAULT_IDENTITY_DIR, LoadOptions, Names, OverrideProblem,
    PathClaim, PathClaims, Side, SkippedStack, check_stack_dir, is_dangerous_root, parse,
    read_files,
};

/// `max_skew` when the main file sets none: how far a source's signed timestamp may be from
/// the target's clock.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(600);
/// `keep_generations` when a stack file sets none.
pub const DEFAULT_KEEP_GENERATIONS: NonZeroU32 = NonZeroU32::new(3).expect("3 is not zero");
/// `health_timeout` when a stack file sets none.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(120);

/// The target agent's config: `target.toml` plus `conf.d/*.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// The main file it was loaded from.
    pub file: PathBuf,
    /// `listen = "HOST:PORT"`: the UDP address to serve QUIC on. Required; port 0 picks one.
    pub listen: Address,
    /// `name`: this target's name; `None` means the name in its certificate (the usual case).
    pub name: Option<String>,
    /// `identity_dir`, default [`DEFAULT_IDENTITY_DIR`]. A CLI's `--dir` / `STACKCLONE_DIR`
    /// replaces it after loading.
    pub identity_dir: PathBuf,
    /// `metrics_listen = "HOST:PORT"`: serve Prometheus metrics there. Off when absent.
    pub metrics_listen: Option<Address>,
    /// `max_skew` (default 600 s): the largest clock difference accepted in a signed flag.
    pub max_skew: Duration,
    /// `[alerts]`: where failed commits and stale stacks (always) and commits (if asked) are
    /// sent. No channel: off.
    pub alerts: AlertConfig,
    /// The stacks it serves, in `conf.d` file-name order.
    pub stacks: Vec<TargetStack>,
    /// Stacks whose file says `skip = true`: pushes for them are refused.
    pub skipped: Vec<SkippedStack>,
    /// Risky settings to log loudly (an overridden dangerous path).
    pub warnings: Vec<ConfigWarning>,
}

/// One target stack file in `conf.d`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStack {
    /// `stack`: the stack's name, the same on both sides.
    pub name: String,
    /// The `conf.d` file it came from.
    pub file: PathBuf,
    /// `path`: the live copy, absolute. Created by the target if missing; if it exists it must
    /// be a directory (when paths are checked).
    pub path: PathBuf,
    /// `allow = [host names]`: certificate names of the hosts that may push this stack, of
    /// either enrolled role (at fail-back, a standby enrolled as a target pushes).
    /// Never empty.
    pub allow: Vec<String>,
    /// `keep_generations` (default 3): how many generations' replaced data to keep for
    /// rollback.
    pub keep_generations: NonZeroU32,
    /// `docker` (default true): stop, start and health-check the stack's containers around a
    /// commit; `false` commits data only.
    pub docker: bool,
    /// `compose_project` (default the stack name): the `com.docker.compose.project` label.
    pub compose_project: String,
    /// `compose_dir` (default `path`): where the Compose file is, to create the stack's
    /// containers the first time.
    pub compose_dir: PathBuf,
    /// `state_dir`: where the agent keeps this stack's journal and generations; `None` leaves
    /// the choice to the agent.
    pub state_dir: Option<PathBuf>,
    /// `health_timeout` (default 120 s): how long a started stack has to become healthy.
    pub health_timeout: Duration,
    /// `auto_rollback` (default true): roll back to the previous generation when the stack
    /// does not become healthy in time.
    pub auto_rollback: bool,
    /// `allow_dangerous_root` (default false): allow a `path` in [`super::DANGEROUS_ROOTS`].
    pub allow_dangerous_root: bool,
    /// `depends_on = { app = ["db"] }` and `order = ["db", "app"]`: the start order (stop is
    /// the reverse) where the containers carry no `com.docker.compose.depends_on` label (Compose
    /// v1). As on the source; without either, the compose file's `depends_on` is read.
    pub depends_on: BTreeMap<String, Vec<String>>,
    pub order: Vec<String>,
    /// `stop_timeout` (default 30 s): grace time before Docker kills a stopping container.
    pub stop_timeout: Duration,
    /// `max_age`, e.g. `"26h"`: the staleness watch. When no generation has been committed for
    /// this long, `run` alerts once and exposes the stack as stale. `None`: no watch.
    pub max_age: Option<Duration>,
    /// `compose_policy` (default `"trusted"`): what the standby's containers may do. See
    /// [`ComposePolicy`].
    pub compose_policy: ComposePolicy,
    /// `extra_paths = { "/srv/media" = "/srv/media" }`: where each outside path the source
    /// replicates (its `extra_paths`, the key) goes on this host (the value, the path the
    /// standby's containers bind-mount). The tree is kept in the live dir as
    /// `.stackclone-paths/<key>`, and the value becomes a symlink to it before the standby is
    /// brought up; what was there is moved aside, never deleted. Only paths listed here are
    /// ever linked: a source cannot make the target write outside its stack's `path`. Values
    /// are absolute, outside `path`, not system directories (unless `allow_dangerous_root`),
    /// and not another stack's. Default none.
    pub extra_paths: BTreeMap<String, PathBuf>,
    /// `compose_override = "/etc/stackclone/overrides/nextcloud.yml"`: the standby's own compose
    /// file, for what it must do differently from the primary (another `container_name`, other
    /// `environment` values, another `command`, …). Every Compose command of the target then
    /// names the project's own files with `-f` (those Compose would find itself, override file
    /// included) and this one last. Compose merges it like any override: single values and
    /// `environment` keys are replaced, but lists such as `ports` are added to, so a published
    /// port is changed with `compose_env` instead. Absolute; it must be a file (when paths are
    /// checked) and lie outside every stack's `path`, since each commit makes that a copy of the
    /// primary's. Relative paths in it resolve against `compose_dir`, like those of the
    /// project's files.
    pub compose_override: Option<PathBuf>,
    /// `compose_env = { HTTP_PORT = "18080" }`: variables set for every Compose command of the
    /// target. They win over the synced `.env` in Compose's interpolation, as a shell's
    /// variables do; so a value the compose file takes from a variable can differ on the
    /// standby without touching the primary's files.
    pub compose_env: BTreeMap<String, String>,
    /// `standby_stopped = ["cron", "mailer"]`: services that must not run twice, once on the
    /// primary and once on the standby (schedulers, bots, outgoing mail). The standby creates
    /// their containers from the compose file and keeps them stopped; health does not wait for
    /// them. Empty by default.
    pub standby_stopped: Vec<String>,
}

/// `compose_policy`: how far the target trusts the compose file the source sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComposePolicy {
    /// The compose file runs as written: an allowed source is, in effect, root on the standby.
    #[default]
    Trusted,
    /// Containers are created without starting, and none starts if one is privileged, uses a
    /// host namespace, adds capabilities or devices, or bind-mounts a path outside the stack
    /// (see `crate::docker::policy`).
    Strict,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMain {
    listen: Address,
    name: Option<HostName>,
    identity_dir: Option<AbsPath>,
    metrics_listen: Option<Address>,
    max_skew: Option<Secs>,
    #[serde(default)]
    alerts: AlertConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStack {
    stack: Spanned<StackName>,
    path: Spanned<AbsPath>,
    allow: Spanned<Vec<HostName>>,
    #[serde(default)]
    skip: bool,
    keep_generations: Option<NonZeroU32>,
    docker: Option<bool>,
    compose_project: Option<StackName>,
    compose_dir: Option<AbsPath>,
    state_dir: Option<AbsPath>,
    health_timeout: Option<Secs>,
    auto_rollback: Option<bool>,
    #[serde(default)]
    allow_dangerous_root: bool,
    #[serde(default)]
    depends_on: BTreeMap<ServiceName, Vec<ServiceName>>,
    order: Option<Spanned<Vec<ServiceName>>>,
    stop_timeout: Option<Secs>,
    max_age: Option<Spanned<Secs>>,
    #[serde(default)]
    compose_policy: ComposePolicy,
    extra_paths: Option<Spanned<BTreeMap<String, AbsPath>>>,
    compose_override: Option<Spanned<AbsPath>>,
    #[serde(default)]
    compose_env: BTreeMap<EnvName, EnvValue>,
    standby_stopped: Option<Spanned<Vec<ServiceName>>>,
}

impl TargetConfig {
    /// Loads `path` and `conf.d/*.toml` beside it, checking stack paths on disk.
    pub fn load(path: impl AsRef<Path>) -> Result<TargetConfig, ConfigError> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// [`load`](Self::load) with options.
    pub fn load_with(
        path: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<TargetConfig, ConfigError> {
        let files = read_files(path.as_ref())?;
        let main: RawMain = parse(&files.main)?;
        let mut config = TargetConfig {
            file: files.main.path.clone(),
            listen: main.listen,
            name: main.name.map(|n| n.0),
            identity_dir: main
                .identity_dir
                .map_or_else(|| PathBuf::from(DEFAULT_IDENTITY_DIR), |p| p.0),
            metrics_listen: main.metrics_listen,
            alerts: main.alerts,
            max_skew: main.max_skew.map_or(DEFAULT_MAX_SKEW, |s| s.0),
            stacks: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
        };

        let mut names = Names::default();
        let mut paths = PathClaims::default();
        // (stack, live key, state dir key, where the state dir is set or implied)
        let mut dirs: Vec<(String, PathBuf, PathBuf, Box<Location>)> = Vec::new();
        let mut overrides: Vec<Override> = Vec::new();
        for file in &files.stacks {
            let raw: RawStack = parse(file)?;
            let name = raw.stack.get_ref().0.clone();
            names.claim(&name, file.at(raw.stack.span().start))?;
            if raw.skip {
                config.skipped.push(SkippedStack {
                    name,
                    file: file.path.clone(),
                });
                continue;
            }

            if raw.allow.get_ref().is_empty() {
                return Err(file.invalid(
                    raw.allow.span(),
                    "allow",
                    "empty: name at least one source (its certificate name) that may push \
                     this stack"
                        .to_owned(),
                ));
            }

            let path_at = file.at(raw.path.span().start);
            let path = raw.path.get_ref().0.clone();
            let key = if options.check_paths {
                check_stack_dir(Side::Target, &name, &path, &path_at)?
            } else {
                path.clone()
            };
            // The store's default: `<parent of path as written>/.stackclone/<stack>`.
            let (state, state_at) = match &raw.state_dir {
                Some(s) => (s.0.clone(), path_at.clone()),
                None => (
                    path.parent()
                        .unwrap_or(Path::new("/"))
                        .join(".stackclone")
                        .join(&name),
                    path_at.clone(),
                ),
            };
            let state = if options.check_paths {
                fs::canonicalize(&state).unwrap_or(state)
            } else {
                state
            };
            dirs.push((name.clone(), key.clone(), state, state_at));
            if is_dangerous_root(&path) || is_dangerous_root(&key) {
                if !raw.allow_dangerous_root {
                    return Err(ConfigError::DangerousPath {
                        at: path_at,
                        stack: name,
                        path,
                    });
                }
                config.warnings.push(ConfigWarning {
                    at: (*path_at).clone(),
                    stack: name.clone(),
                    message: format!(
                        "allow_dangerous_root = true: the target may overwrite the system \
                         directory {}",
                        key.display()
                    ),
                });
            }
            paths.claim(PathClaim {
                key,
                path: path.clone(),
                stack: name.clone(),
                at: path_at,
            })?;

            let mut extra_paths = BTreeMap::new();
            if let Some(raw_extra) = raw.extra_paths {
                let span = raw_extra.span();
                let at = file.at(span.start);
                for (from, AbsPath(to)) in raw_extra.into_inner() {
                    let bad = |why: String| file.invalid(span.clone(), "extra_paths", why);
                    if !from.starts_with('/') {
                        return Err(bad(format!(
                            "{from:?}: a key is the source's path, absolute, as its extra_paths \
                             lists it"
                        )));
                    }
                    if to.starts_with(&path) {
                        return Err(bad(format!(
                            "{} lies inside the stack's path; the tree is kept there already \
                             (as .stackclone-paths/…), name the path the standby mounts",
                            to.display()
                        )));
                    }
                    if is_dangerous_root(&to) && !raw.allow_dangerous_root {
                        return Err(bad(format!(
                            "{} is a system directory; stackclone would replace it with a link",
                            to.display()
                        )));
                    }
                    paths.claim(PathClaim {
                        key: to.clone(),
                        path: to.clone(),
                        stack: name.clone(),
                        at: at.clone(),
                    })?;
                    extra_paths.insert(from, to);
                }
            }
            let compose_override = match raw.compose_override {
                Some(o) => {
                    let at = file.at(o.span().start);
                    let path = o.into_inner().0;
                    let key = if options.check_paths {
                        check_override_file(&name, &path, &at)?
                    } else {
                        path.clone()
                    };
                    overrides.push(Override {
                        stack: name.clone(),
                        path: path.clone(),
                        key,
                        at,
                    });
                    Some(path)
                }
                None => None,
            };

            let max_age = match raw.max_age {
                Some(age) if age.get_ref().0.is_zero() => {
                    return Err(file.invalid(
                        age.span(),
                        "max_age",
                        "0 would make every stack stale at once; leave the key out to turn the \
                         staleness watch off"
                            .to_owned(),
                    ));
                }
                Some(age) => Some(age.into_inner().0),
                None => None,
            };
            config.stacks.push(TargetStack {
                compose_project: raw.compose_project.map_or_else(|| name.clone(), |p| p.0),
                compose_dir: raw.compose_dir.map_or_else(|| path.clone(), |p| p.0),
                name,
                file: file.path.clone(),
                path,
                allow: raw.allow.into_inner().into_iter().map(|n| n.0).collect(),
                keep_generations: raw.keep_generations.unwrap_or(DEFAULT_KEEP_GENERATIONS),
                docker: raw.docker.unwrap_or(true),
                state_dir: raw.state_dir.map(|p| p.0),
                health_timeout: raw.health_timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |s| s.0),
                auto_rollback: raw.auto_rollback.unwrap_or(true),
                allow_dangerous_root: raw.allow_dangerous_root,
                depends_on: raw
                    .depends_on
                    .into_iter()
                    .map(|(k, v)| (k.0, v.into_iter().map(|s| s.0).collect()))
                    .collect(),
                order: super::source::order(file, raw.order)?,
                stop_timeout: raw
                    .stop_timeout
                    .map_or(super::source::DEFAULT_STOP_TIMEOUT, |s| s.0),
                max_age,
                compose_policy: raw.compose_policy,
                extra_paths,
                compose_override,
                compose_env: raw
                    .compose_env
                    .into_iter()
                    .map(|(k, v)| (k.0, v.0))
                    .collect(),
                standby_stopped: super::source::services(
                    file,
                    "standby_stopped",
                    raw.standby_stopped,
                )?,
            });
        }
        check_state_dirs(&dirs)?;
        check_overrides(&overrides, &paths)?;
        Ok(config)
    }

    /// The stack named `name`, if it is served (skipped stacks are in
    /// [`skipped`](Self::skipped)).
    pub fn stack(&self, name: &str) -> Option<&TargetStack> {
        self.stacks.iter().find(|s| s.name == name)
    }
}

/// A `compose_override` as written and as compared (symlinks resolved when paths are checked).
struct Override {
    stack: String,
    path: PathBuf,
    key: PathBuf,
    at: Box<Location>,
}

/// Checks that a `compose_override` is a file; the key to compare it by (symlinks resolved).
fn check_override_file(stack: &str, path: &Path, at: &Location) -> Result<PathBuf, ConfigError> {
    let problem = match fs::metadata(path) {
        Ok(m) if m.is_file() => {
            return Ok(fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()));
        }
        Ok(_) => OverrideProblem::NotAFile,
        Err(e) => OverrideProblem::Unreadable(e),
    };
    Err(ConfigError::ComposeOverride {
        at: Box::new(at.clone()),
        stack: stack.to_owned(),
        path: path.to_owned(),
        problem,
    })
}

/// Refuses a `compose_override` inside any stack's `path`: a commit of that stack would delete
/// it (or replace it with the primary's file of that name).
fn check_overrides(overrides: &[Override], paths: &PathClaims) -> Result<(), ConfigError> {
    for o in overrides {
        if let Some(claim) = paths
            .0
            .iter()
            .find(|c| o.path.starts_with(&c.path) || o.key.starts_with(&c.key))
        {
            return Err(ConfigError::ComposeOverride {
                at: o.at.clone(),
                stack: o.stack.clone(),
                path: o.path.clone(),
                problem: OverrideProblem::InsideStackPath {
                    stack: claim.stack.clone(),
                    path: claim.path.clone(),
                },
            });
        }
    }
    Ok(())
}

/// Refuses a state dir that overlaps a live dir (its own or another stack's) or another stack's
/// state dir: the journal, staging and generations of one stack must never be scanned as
/// another's data, nor two stacks share one journal.
fn check_state_dirs(dirs: &[(String, PathBuf, PathBuf, Box<Location>)]) -> Result<(), ConfigError> {
    let overlap = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
    for (stack, _, state, at) in dirs {
        for (other, other_live, other_state, _) in dirs {
            let clash = if overlap(state, other_live) {
                Some(other_live)
            } else if other != stack && overlap(state, other_state) {
                Some(other_state)
            } else {
                None
            };
            if let Some(with) = clash {
                return Err(ConfigError::StateDirOverlap {
                    at: at.clone(),
                    stack: stack.clone(),
                    state: state.clone(),
                    other_stack: other.clone(),
                    other: with.clone(),
                });
            }
        }
    }
    Ok(())
}
