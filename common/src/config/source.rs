//! `source.toml` and the source's stack files.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ignore::gitignore::GitignoreBuilder;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use stackclone_proto::session::OnStopTimeout;

use crate::alert::AlertConfig;
use crate::schedule::Schedule;

use super::value::{
    AbsPath, BytesPerSec, DEFAULT_MAX_DELETE, HostName, Secs, ServiceName, StackName,
};
use super::{
    Address, ConfigError, ConfigWarning, DEFAULT_IDENTITY_DIR, FileText, Fraction, LoadOptions,
    Names, PathClaim, PathClaims, Side, SkippedStack, check_stack_dir, parse, read_files,
};

/// `stop_timeout` when a stack file sets none: how long Docker waits for a container to stop
/// before it kills it.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The source agent's config: `source.toml` plus `conf.d/*.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// The main file it was loaded from.
    pub file: PathBuf,
    /// `identity_dir`, default [`DEFAULT_IDENTITY_DIR`]. A CLI's `--dir` / `STACKCLONE_DIR`
    /// replaces it after loading.
    pub identity_dir: PathBuf,
    /// `metrics_listen = "HOST:PORT"`: serve Prometheus metrics there. Off when absent.
    pub metrics_listen: Option<Address>,
    /// `push_gateway = "http://HOST:PORT"`: a one-shot `push` sends its metrics there when it
    /// ends (the daemon is scraped on `metrics_listen` instead). Off when absent.
    pub push_gateway: Option<String>,
    /// `[alerts]`: where failures (always) and successes (if asked) are sent. No channel: off.
    pub alerts: AlertConfig,
    /// `[targets.NAME]` tables, by NAME (the target's certificate name).
    pub targets: BTreeMap<String, TargetPeer>,
    /// The stacks to run, in `conf.d` file-name order.
    pub stacks: Vec<SourceStack>,
    /// Stacks whose file says `skip = true`.
    pub skipped: Vec<SkippedStack>,
    /// Risky settings to log loudly (`stop = false`).
    pub warnings: Vec<ConfigWarning>,
}

/// A `[targets.NAME]` table: where a target agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPeer {
    /// NAME, the name in the target's certificate; the TLS server name to expect.
    pub name: String,
    /// `address = "HOST:PORT"` (UDP), port not 0.
    pub address: Address,
}

/// One source stack file in `conf.d`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceStack {
    /// `stack`: the stack's name, the same on both sides.
    pub name: String,
    /// The `conf.d` file it came from.
    pub file: PathBuf,
    /// `path`: the data dir to sync, absolute; an existing directory (when paths are checked).
    pub path: PathBuf,
    /// `target`: the NAME of a `[targets.NAME]` in the main file.
    pub target: String,
    /// `exclude = [...]`: gitignore-style patterns relative to `path` (see `ScanConfig::exclude`);
    /// checked to compile. Default none.
    pub exclude: Vec<String>,
    /// `precopy` (default: `docker`): a first pass while the stack runs, then only the changes
    /// during the stop. A data-only stack (`docker = false`) stops nothing, so a pre-copy pass
    /// would only read and send everything twice; it runs there only when set to true (for a
    /// target whose standby stack, stopped for the final pass, should stay down briefly).
    pub precopy: bool,
    /// `docker` (default true): the stack is a Compose project to stop and start; `false`
    /// syncs data only.
    pub docker: bool,
    /// `stop` (default true): stop the stack for the final pass. `false` syncs it live, which
    /// is crash-consistent at best, and yields a [`ConfigWarning`].
    pub stop: bool,
    /// `max_delete` (default 50%): a cycle deleting more than this share of the target's files
    /// stops. `0.5` or `"50%"`.
    pub max_delete: Fraction,
    /// `allow_empty` (default false): allow pushing an empty data dir, which would empty the
    /// target's copy.
    pub allow_empty: bool,
    /// `bandwidth_limit` in bytes per second, e.g. `"20MiB/s"`; no limit when absent.
    pub bandwidth_limit: Option<NonZeroU64>,
    /// `compress` (default true): zstd where it helps.
    pub compress: bool,
    /// `checksum` (default false): ignore the hash cache and hash every file.
    pub checksum: bool,
    /// `compose_project` (default the stack name): the `com.docker.compose.project` label.
    pub compose_project: String,
    /// `depends_on = { app = ["db"] }`: service → services it needs started first, for Compose
    /// v1, which writes no `com.docker.compose.depends_on` label. Default empty: then the
    /// compose file's own `depends_on` is read, if there is no `order` either.
    pub depends_on: BTreeMap<String, Vec<String>>,
    /// `order = ["db", "app"]`: start order (stop is the reverse), the simpler alternative to
    /// `depends_on`. Each service at most once. Default empty.
    pub order: Vec<String>,
    /// `stop_timeout` (default 30 s): grace time before Docker kills a stopping container.
    pub stop_timeout: Duration,
    /// `on_stop_timeout` (default `"warn"`): what a service Docker had to kill at its stop
    /// timeout means for the cycle. `"warn"` ships the copy (crash-consistent for that
    /// service) and reports the kill; `"fail"` refuses to ship it.
    pub on_stop_timeout: OnStopTimeout,
    /// `on_superseded` (default `"alert"`): what this host does when the standby says the
    /// stack was promoted there (this host is no longer its primary). `"alert"` logs, alerts
    /// once and leaves the local stack alone; `"stop"` also stops the local stack once, so
    /// that two primaries do not serve clients (fencing).
    pub on_superseded: OnSuperseded,
    /// `pre_stop`: hooks run before the stack is stopped (a database flush), in order.
    pub pre_stop: Vec<Hook>,
    /// `post_start`: hooks run after the stack is started again, in order.
    pub post_start: Vec<Hook>,
    /// `schedule`: a cron expression (local time) on which `run` starts the stack's cycles;
    /// checked when the config loads. `None`: only `push` runs the stack.
    pub schedule: Option<Schedule>,
    /// `random_delay`: up to this much random delay after each scheduled time.
    pub random_delay: Option<Duration>,
    /// `ignore_mounts = { "/srv/media" = "on the NAS, mounted on both hosts", cache = "rebuilt
    /// on start" }`: mounts of the stack's containers that the standby does without, each with
    /// the reason (shown in `push --dry-run` and the logs). A key is a host path (a bind mount
    /// at or below it) or a volume's Compose key or Docker name. A named volume not listed is
    /// replicated; a bind-mounted directory outside `path` not listed fails the cycle before
    /// anything stops (see `stackclone_common::coverage`). Default none.
    pub ignore_mounts: BTreeMap<String, String>,
    /// `extra_paths = ["/srv/media"]`: directories outside `path` that the stack's containers
    /// bind-mount, replicated with it in the same generation (each as
    /// `.stackclone-paths/<key>`); the target's stack file says where each goes there. Each
    /// must exist, may not be a system directory, and may not overlap `path` or another
    /// stack's. An empty one is refused unless `allow_empty`. Default none.
    pub extra_paths: Vec<PathBuf>,
}

/// A command run by exec in one of the stack's services: `{ service = "db", command = ["sh",
/// "-c", "..."] }`. A stack file may give one such table or an array of them (`[[pre_stop]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The Compose service whose container runs the command.
    pub service: String,
    /// argv, not a shell line; non-empty.
    pub command: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMain {
    identity_dir: Option<AbsPath>,
    metrics_listen: Option<Address>,
    push_gateway: Option<Spanned<String>>,
    #[serde(default)]
    alerts: AlertConfig,
    #[serde(default)]
    targets: BTreeMap<HostName, RawTargetPeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetPeer {
    address: Spanned<Address>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStack {
    stack: Spanned<StackName>,
    path: Spanned<AbsPath>,
    target: Spanned<HostName>,
    #[serde(default)]
    skip: bool,
    exclude: Option<Spanned<Vec<String>>>,
    precopy: Option<bool>,
    docker: Option<bool>,
    stop: Option<Spanned<bool>>,
    max_delete: Option<Fraction>,
    #[serde(default)]
    allow_empty: bool,
    bandwidth_limit: Option<BytesPerSec>,
    compress: Option<bool>,
    #[serde(default)]
    checksum: bool,
    compose_project: Option<StackName>,
    #[serde(default)]
    depends_on: BTreeMap<ServiceName, Vec<ServiceName>>,
    order: Option<Spanned<Vec<ServiceName>>>,
    stop_timeout: Option<Secs>,
    on_stop_timeout: Option<RawOnStopTimeout>,
    on_superseded: Option<RawOnSuperseded>,
    #[serde(default)]
    pre_stop: Hooks,
    #[serde(default)]
    post_start: Hooks,
    schedule: Option<Spanned<String>>,
    random_delay: Option<Secs>,
    ignore_mounts: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    extra_paths: Vec<Spanned<AbsPath>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnStopTimeout {
    Warn,
    Fail,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnSuperseded {
    Alert,
    Stop,
}

/// What a source does when its stack was promoted on the standby (see
/// [`SourceStack::on_superseded`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnSuperseded {
    /// Log and alert once; the local stack is left as it is.
    #[default]
    Alert,
    /// Also stop the local stack, once (fencing).
    Stop,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    service: ServiceName,
    command: Spanned<Vec<String>>,
}

/// One hook table or an array of them.
#[derive(Default)]
struct Hooks(Vec<RawHook>);

impl<'de> Deserialize<'de> for Hooks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Hooks;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a hook { service = \"db\", command = [\"sh\", \"-c\", \"...\"] } or an \
                     array of them",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Hooks, A::Error> {
                RawHook::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|h| Hooks(vec![h]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Hooks, A::Error> {
                let mut hooks = Vec::new();
                while let Some(h) = seq.next_element::<RawHook>()? {
                    hooks.push(h);
                }
                Ok(Hooks(hooks))
            }
        }
        d.deserialize_any(V)
    }
}

impl SourceConfig {
    /// Loads `path` and `conf.d/*.toml` beside it, checking stack paths on disk.
    pub fn load(path: impl AsRef<Path>) -> Result<SourceConfig, ConfigError> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// [`load`](Self::load) with options.
    pub fn load_with(
        path: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<SourceConfig, ConfigError> {
        let files = read_files(path.as_ref())?;
        let main_file = &files.main;
        let main: RawMain = parse(main_file)?;

        let mut targets = BTreeMap::new();
        for (HostName(name), peer) in main.targets {
            if peer.address.get_ref().port == 0 {
                return Err(main_file.invalid(
                    peer.address.span(),
                    &format!("targets.{name}.address"),
                    "port 0 cannot be connected to; use the port the target's `listen` names"
                        .to_owned(),
                ));
            }
            let address = peer.address.into_inner();
            targets.insert(name.clone(), TargetPeer { name, address });
        }

        let push_gateway = match main.push_gateway {
            Some(url) => {
                let text = url.get_ref().trim();
                if !(text.starts_with("http://") || text.starts_with("https://"))
                    || text.len() <= "https://".len()
                {
                    return Err(main_file.invalid(
                        url.span(),
                        "push_gateway",
                        "expected the Pushgateway's base URL, such as \"http://127.0.0.1:9091\""
                            .to_owned(),
                    ));
                }
                Some(text.to_owned())
            }
            None => None,
        };
        let mut config = SourceConfig {
            file: main_file.path.clone(),
            identity_dir: main
                .identity_dir
                .map_or_else(|| PathBuf::from(DEFAULT_IDENTITY_DIR), |p| p.0),
            metrics_listen: main.metrics_listen,
            push_gateway,
            alerts: main.alerts,
            targets,
            stacks: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
        };
        let mut names = Names::default();
        let mut paths = PathClaims::default();
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

            let path_at = file.at(raw.path.span().start);
            let path = raw.path.get_ref().0.clone();
            let key = if options.check_paths {
                check_stack_dir(Side::Source, &name, &path, &path_at)?
            } else {
                path.clone()
            };
            paths.claim(PathClaim {
                key,
                path: path.clone(),
                stack: name.clone(),
                at: path_at,
            })?;

            let mut extra_paths = Vec::with_capacity(raw.extra_paths.len());
            for extra in raw.extra_paths {
                let span = extra.span();
                let at = file.at(span.start);
                let dir = extra.into_inner().0;
                if super::is_dangerous_root(&dir) {
                    return Err(file.invalid(
                        span,
                        "extra_paths",
                        format!(
                            "{} is a system directory; replicate the stack's own data directories",
                            dir.display()
                        ),
                    ));
                }
                let key = if options.check_paths {
                    check_stack_dir(Side::Source, &name, &dir, &at)?
                } else {
                    dir.clone()
                };
                paths.claim(PathClaim {
                    key,
                    path: dir.clone(),
                    stack: name.clone(),
                    at,
                })?;
                extra_paths.push(dir);
            }

            let target = raw.target.get_ref().0.clone();
            if !config.targets.contains_key(&target) {
                return Err(ConfigError::UnknownTarget {
                    at: file.at(raw.target.span().start),
                    stack: name,
                    target,
                    main: config.file.clone(),
                    known: config.targets.keys().cloned().collect(),
                });
            }

            let exclude = excludes(file, &path, raw.exclude)?;
            let order = order(file, raw.order)?;

            let docker = raw.docker.unwrap_or(true);
            let stop = match raw.stop {
                Some(stop) => {
                    if docker && !*stop.get_ref() {
                        config.warnings.push(ConfigWarning {
                            at: *file.at(stop.span().start),
                            stack: name.clone(),
                            message: "stop = false: the stack is synced while it runs, so the \
                                      standby copy is crash-consistent at best (like pulling the \
                                      plug); databases may need recovery on the target"
                                .to_owned(),
                        });
                    }
                    stop.into_inner()
                }
                None => true,
            };

            let schedule = match raw.schedule {
                Some(s) if s.get_ref().trim().is_empty() => {
                    return Err(file.invalid(
                        s.span(),
                        "schedule",
                        "empty schedule; leave the key out to run the stack only on `push`"
                            .to_owned(),
                    ));
                }
                Some(s) => match Schedule::parse(s.get_ref()) {
                    Ok(schedule) => Some(schedule),
                    Err(reason) => return Err(file.invalid(s.span(), "schedule", reason)),
                },
                None => None,
            };

            config.stacks.push(SourceStack {
                compose_project: raw.compose_project.map_or_else(|| name.clone(), |p| p.0),
                name,
                file: file.path.clone(),
                path,
                target,
                exclude,
                precopy: raw.precopy.unwrap_or(docker),
                docker,
                stop,
                max_delete: raw.max_delete.unwrap_or(DEFAULT_MAX_DELETE),
                allow_empty: raw.allow_empty,
                bandwidth_limit: raw.bandwidth_limit.map(|b| b.0),
                compress: raw.compress.unwrap_or(true),
                checksum: raw.checksum,
                depends_on: raw
                    .depends_on
                    .into_iter()
                    .map(|(k, v)| (k.0, v.into_iter().map(|s| s.0).collect()))
                    .collect(),
                order,
                stop_timeout: raw.stop_timeout.map_or(DEFAULT_STOP_TIMEOUT, |s| s.0),
                on_stop_timeout: match raw.on_stop_timeout {
                    None | Some(RawOnStopTimeout::Warn) => OnStopTimeout::Warn,
                    Some(RawOnStopTimeout::Fail) => OnStopTimeout::Fail,
                },
                on_superseded: match raw.on_superseded {
                    None | Some(RawOnSuperseded::Alert) => OnSuperseded::Alert,
                    Some(RawOnSuperseded::Stop) => OnSuperseded::Stop,
                },
                pre_stop: hooks(file, "pre_stop", raw.pre_stop)?,
                post_start: hooks(file, "post_start", raw.post_start)?,
                schedule,
                random_delay: raw.random_delay.map(|s| s.0),
                ignore_mounts: ignore_mounts(file, raw.ignore_mounts)?,
                extra_paths,
            });
        }
        Ok(config)
    }

    /// The stack named `name`, if it runs (skipped stacks are in [`skipped`](Self::skipped)).
    pub fn stack(&self, name: &str) -> Option<&SourceStack> {
        self.stacks.iter().find(|s| s.name == name)
    }

    /// The `[targets.NAME]` a stack pushes to. Every loaded stack has one; `None` only if the
    /// config was changed after loading.
    pub fn target_of(&self, stack: &SourceStack) -> Option<&TargetPeer> {
        self.targets.get(&stack.target)
    }
}

/// Checks each pattern compiles under the scanner's rules (`scan::build_excludes`), one at a
/// time so the error names the pattern.
fn excludes(
    file: &FileText,
    root: &Path,
    raw: Option<Spanned<Vec<String>>>,
) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let span = raw.span();
    let patterns = raw.into_inner();
    for pattern in &patterns {
        let mut builder = GitignoreBuilder::new(root);
        builder.allow_unclosed_class(false);
        let built = match builder.add_line(None, pattern) {
            Ok(_) => builder.build().map(drop),
            Err(e) => Err(e),
        };
        built.map_err(|e| {
            file.invalid(span.clone(), "exclude", format!("pattern {pattern:?}: {e}"))
        })?;
    }
    Ok(patterns)
}

/// `ignore_mounts`: each key a host path or a volume name, each with a reason.
fn ignore_mounts(
    file: &FileText,
    raw: Option<Spanned<BTreeMap<String, String>>>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(BTreeMap::new());
    };
    let span = raw.span();
    let mounts = raw.into_inner();
    for (key, reason) in &mounts {
        let volume_name = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !(volume_name || key.starts_with('/')) {
            return Err(file.invalid(
                span,
                "ignore_mounts",
                format!(
                    "{key:?} is neither an absolute host path nor a volume name; use                      \"/srv/media\" for a bind mount or the volume's key, such as \"cache\""
                ),
            ));
        }
        if reason.trim().is_empty() {
            return Err(file.invalid(
                span,
                "ignore_mounts",
                format!(
                    "{key:?} has no reason; say why the standby can do without it, such as \
                     {key:?} = \"rebuilt on start\""
                ),
            ));
        }
    }
    Ok(mounts)
}

/// `order`, each service at most once.
pub(super) fn order(
    file: &FileText,
    raw: Option<Spanned<Vec<ServiceName>>>,
) -> Result<Vec<String>, ConfigError> {
    services(file, "order", raw)
}

/// A list of service names under `key` (each already checked as a [`ServiceName`]), none twice.
pub(super) fn services(
    file: &FileText,
    key: &str,
    raw: Option<Spanned<Vec<ServiceName>>>,
) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let span = raw.span();
    let services: Vec<String> = raw.into_inner().into_iter().map(|s| s.0).collect();
    if let Some((_, dup)) = services
        .iter()
        .enumerate()
        .find(|(i, s)| services[..*i].contains(s))
    {
        return Err(file.invalid(span, key, format!("service {dup:?} is listed twice")));
    }
    Ok(services)
}

fn hooks(file: &FileText, key: &str, raw: Hooks) -> Result<Vec<Hook>, ConfigError> {
    raw.0
        .into_iter()
        .map(|h| {
            if h.command.get_ref().is_empty() {
                return Err(file.invalid(
                    h.command.span(),
                    &format!("{key}.command"),
                    "empty command; give the argv, e.g. [\"sh\", \"-c\", \"...\"]".to_owned(),
                ));
            }
            Ok(Hook {
                service: h.service.0,
                command: h.command.into_inner(),
            })
        })
        .collect()
}
