//! What Compose reads in a project dir, read without running Compose: which compose files it
//! loads, and from them the little stackclone needs — which services each service needs started
//! first (Compose v1 writes no dependency label, so this is the start order's only source on such
//! hosts), and the top-level `volumes:` (the names Docker knows the named volumes by).
//!
//! ```text
//! ProjectEnv::load(dir, given)     dir/.env, with `given` (the target's compose_env) over it
//! ComposeFiles::find(dir, &env)    COMPOSE_FILE, else the first of compose.yaml, compose.yml,
//!                                  docker-compose.yml, docker-compose.yaml, plus the first
//!                                  override file that exists
//! ComposeFile::read(&files, &env)  parse each, interpolate what is read, merge in order
//! ComposeFile::load(dir, given)    the three above
//! ```
//!
//! What it owns: [`ComposeFiles`] (which files, in which order), [`ProjectEnv`] (the variables
//! Compose would interpolate with, as far as they can be known), [`ComposeFile`] (the merged
//! [`Service`] dependencies and [`Volume`]s) and [`ComposeFileError`].
//!
//! What it does not do: run Compose, follow `extends`, or read anything but
//! `services.*.{depends_on, links, volumes_from, network_mode, pid, ipc}` and
//! `volumes.*.{name, external, driver}`; every other key is ignored, whatever its value. It
//! never writes.
//!
//! Decisions worth knowing:
//! - **Which files.** Compose v2's names, in its order: the first of [`FILE_NAMES`] that exists,
//!   then the first of [`OVERRIDE_NAMES`] that exists. Compose v1 prefers `docker-compose.yml`
//!   over `compose.yaml`, so a dir holding both is read differently by the two versions:
//!   [`ComposeFiles::ignored`] names the files left out, for the caller to warn about. Unlike
//!   Compose, parent directories are not searched: the project dir is the stack's dir.
//! - **`COMPOSE_FILE`** (from the given environment, else the dir's `.env`, as Compose reads it)
//!   replaces the search, split at `COMPOSE_PATH_SEPARATOR` (default `:`), each path relative to
//!   the dir; no override file is added then (Compose's rule). Users do set it in `.env` to
//!   layer `docker-compose.prod.yml` and the like.
//! - **The environment** is the dir's `.env` with the given variables over it (the shell's
//!   environment wins over `.env` in Compose). The environment of the shell someone once ran
//!   Compose in on the primary cannot be known, and neither is this process's own environment
//!   consulted (an agent's environment is not the one Compose ran with).
//! - **Interpolation** applies to the values read, as Compose does: `$$`, `$VAR`, `${VAR}`,
//!   `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `${VAR:+alt}`,
//!   `${VAR+alt}`. A variable that is not set and has no default is an error naming the file,
//!   line and variable. Compose would substitute an empty string and warn; a volume name built
//!   from an empty string would name another volume, so this never guesses.
//! - **Merge** follows Compose: a later file adds dependencies to a service (a dependency named
//!   again takes the later condition); a volume's `name`, `external` and `driver` set in a later
//!   file replace the earlier ones (Compose v2 merges field by field; v1 replaces the whole entry,
//!   which differs only if an override repeats a volume with fewer keys).
//! - **Errors** name the file, the line and the column (`docker-compose.yml:7:18: …`). A duplicate
//!   key is an error, as in Compose v2 (v1's PyYAML took the last one). Merge keys (`<<: *x`) and
//!   anchors work.
//! - **`.env`** lines are `KEY=VALUE`, optionally prefixed by `export `; `#` starts a comment
//!   line, or a comment after whitespace in an unquoted value; `'…'` is literal, `"…"` knows `\n`,
//!   `\t`, `\"` and `\\`. Values are not interpolated and do not span lines.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// The compose file names Compose looks for, in the order it prefers them (Compose v2's).
pub const FILE_NAMES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
];

/// The override file names Compose adds after the compose file, in the order it prefers them.
pub const OVERRIDE_NAMES: [&str; 4] = [
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
];

/// The file of variables Compose reads in the project dir.
pub const ENV_FILE: &str = ".env";

/// Why a project's compose files could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComposeFileError {
    /// The dir holds none of [`FILE_NAMES`] (and `COMPOSE_FILE` is not set).
    #[error("{}: no compose file (looked for {})", dir.display(), FILE_NAMES.join(", "))]
    NotFound { dir: PathBuf },
    /// A compose file or `.env` could not be read.
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not YAML, or YAML whose keys that are read hold values of the wrong shape.
    #[error("{}: {message}", at(file, *line, *column))]
    Parse {
        file: PathBuf,
        /// 1-based; 0 when the parser could not say.
        line: u64,
        column: u64,
        message: String,
    },
    /// A value read uses a variable that is not set (and gives no default), or a `${…}` that is
    /// not one of Compose's forms.
    #[error("{}: {problem}", at(file, *line, *column))]
    Interpolation {
        file: PathBuf,
        line: u64,
        column: u64,
        problem: Interpolation,
    },
}

/// What was wrong with a `$…` in a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Interpolation {
    /// `$VAR` or `${VAR}` with `VAR` set neither in the given environment nor in `.env`.
    Unset { var: String },
    /// `${VAR:?message}` or `${VAR?message}` with `VAR` unset (or empty, for `:?`).
    Required { var: String, message: String },
    /// Not one of the forms Compose knows.
    Syntax { text: String },
}

impl fmt::Display for Interpolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interpolation::Unset { var } => write!(
                f,
                "variable {var} is not set and has no default; stackclone cannot see the \
                 environment Compose ran in, so set it in the project's {ENV_FILE} (or, on a \
                 target, in the stack's compose_env), or give a default: ${{{var}:-value}}"
            ),
            Interpolation::Required { var, message } => {
                write!(f, "required variable {var} is not set: {message}")
            }
            Interpolation::Syntax { text } => write!(
                f,
                "invalid interpolation {text:?}: use $VAR, ${{VAR}}, ${{VAR:-default}} or $$ \
                 for a literal $"
            ),
        }
    }
}

fn at(file: &Path, line: u64, column: u64) -> String {
    if line == 0 {
        file.display().to_string()
    } else {
        format!("{}:{line}:{column}", file.display())
    }
}

/// The variables Compose interpolates a project's files with, as far as they can be known here:
/// the project dir's `.env`, with the given variables over it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectEnv {
    vars: BTreeMap<String, String>,
}

impl ProjectEnv {
    /// `dir/.env` (none is fine) with `given` over it.
    pub fn load(
        dir: &Path,
        given: &BTreeMap<String, String>,
    ) -> Result<ProjectEnv, ComposeFileError> {
        let file = dir.join(ENV_FILE);
        let mut vars = match std::fs::read_to_string(&file) {
            Ok(text) => parse_env_file(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(ComposeFileError::Read { file, source }),
        };
        vars.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(ProjectEnv { vars })
    }

    /// Exactly these variables (no `.env`).
    pub fn from_vars(vars: BTreeMap<String, String>) -> ProjectEnv {
        ProjectEnv { vars }
    }

    /// The value of `var`, if set (perhaps empty).
    pub fn get(&self, var: &str) -> Option<&str> {
        self.vars.get(var).map(String::as_str)
    }
}

/// `KEY=VALUE` lines of a `.env` file (see the module docs for the syntax).
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        vars.insert(key.to_owned(), env_value(value.trim_start()));
    }
    vars
}

fn env_value(raw: &str) -> String {
    if let Some(rest) = raw.strip_prefix('\'') {
        return rest.split('\'').next().unwrap_or("").to_owned();
    }
    if let Some(rest) = raw.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                },
                c => out.push(c),
            }
        }
        return out;
    }
    // An unquoted value ends at a comment that follows whitespace.
    let mut end = raw.len();
    for (i, _) in raw.match_indices('#') {
        if raw[..i].ends_with([' ', '\t']) {
            end = i;
            break;
        }
    }
    raw[..end].trim_end().to_owned()
}

/// How [`ComposeFiles::find`] chose the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilesFrom {
    /// The default names ([`FILE_NAMES`], [`OVERRIDE_NAMES`]).
    DefaultNames,
    /// The `COMPOSE_FILE` variable.
    ComposeFileVar,
}

/// The compose files Compose reads in a project dir, in the order it merges them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeFiles {
    /// The project dir.
    pub dir: PathBuf,
    /// The files, first the compose file, then the override (or `COMPOSE_FILE`'s list). Paths
    /// are `dir` joined with the name; they exist when found by name, and are checked only when
    /// read when they come from `COMPOSE_FILE`.
    pub files: Vec<PathBuf>,
    /// Files with a default name that exist but are not read: Compose v2 reads only the first
    /// of each list. Worth a warning, since Compose v1 prefers `docker-compose.yml`.
    pub ignored: Vec<PathBuf>,
    /// How they were chosen.
    pub from: FilesFrom,
}

impl ComposeFiles {
    /// The files Compose reads in `dir` with the variables `env` (see the module docs).
    pub fn find(dir: &Path, env: &ProjectEnv) -> Result<ComposeFiles, ComposeFileError> {
        if let Some(list) = env.get("COMPOSE_FILE").filter(|l| !l.trim().is_empty()) {
            let sep = env
                .get("COMPOSE_PATH_SEPARATOR")
                .filter(|s| !s.is_empty())
                .unwrap_or(":");
            return Ok(ComposeFiles {
                dir: dir.to_owned(),
                files: list
                    .split(sep)
                    .map(str::trim)
                    .filter(|f| !f.is_empty())
                    .map(|f| dir.join(f))
                    .collect(),
                ignored: Vec::new(),
                from: FilesFrom::ComposeFileVar,
            });
        }
        let existing = |names: &[&str]| -> Vec<PathBuf> {
            names
                .iter()
                .map(|n| dir.join(n))
                .filter(|p| p.is_file())
                .collect()
        };
        let mut found = existing(&FILE_NAMES).into_iter();
        let Some(main) = found.next() else {
            return Err(ComposeFileError::NotFound {
                dir: dir.to_owned(),
            });
        };
        let mut ignored: Vec<PathBuf> = found.collect();
        let mut files = vec![main];
        let mut overrides = existing(&OVERRIDE_NAMES).into_iter();
        files.extend(overrides.next());
        ignored.extend(overrides);
        Ok(ComposeFiles {
            dir: dir.to_owned(),
            files,
            ignored,
            from: FilesFrom::DefaultNames,
        })
    }
}

/// The condition of a `depends_on` entry: what Compose waits for before it starts the
/// dependent service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Condition {
    /// `service_started`, and the list form.
    #[default]
    #[serde(rename = "service_started")]
    Started,
    /// `service_healthy`.
    #[serde(rename = "service_healthy")]
    Healthy,
    /// `service_completed_successfully`.
    #[serde(rename = "service_completed_successfully")]
    CompletedSuccessfully,
}

/// One service, as far as its start order goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    /// `depends_on`, list or map form: service → condition.
    pub depends_on: BTreeMap<String, Condition>,
    /// Services Compose also starts first because this one uses them: `links`, `volumes_from`,
    /// and `network_mode`, `pid` or `ipc` of the form `service:NAME`.
    pub uses: BTreeSet<String>,
}

impl Service {
    /// Every service this one needs started first.
    pub fn start_after(&self) -> BTreeSet<&str> {
        self.depends_on
            .keys()
            .chain(&self.uses)
            .map(String::as_str)
            .collect()
    }
}

/// A top-level `volumes:` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Volume {
    /// `name:`, or for an external volume the legacy `external: { name: … }`.
    pub name: Option<String>,
    /// `external: true` (or the legacy map form): made outside Compose, which never creates it.
    pub external: bool,
    /// `driver:`; `None` is the engine's default (`local`).
    pub driver: Option<String>,
}

impl Volume {
    /// The name Docker knows the volume `key` of Compose project `project` by: its `name:` if
    /// set, else `key` itself for an external volume, else `<project>_<key>` (Compose v1 and v2
    /// alike). `project` is the `com.docker.compose.project` label value, already normalised
    /// (lowercase, as the stack config requires).
    pub fn docker_name(&self, project: &str, key: &str) -> String {
        match (&self.name, self.external) {
            (Some(name), _) => name.clone(),
            (None, true) => key.to_owned(),
            (None, false) => format!("{project}_{key}"),
        }
    }
}

/// A project's compose files, read and merged: the services' dependencies and the volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComposeFile {
    /// The files read, in merge order.
    pub files: Vec<PathBuf>,
    /// Every service any file names, by name.
    pub services: BTreeMap<String, Service>,
    /// The top-level `volumes:`, by key.
    pub volumes: BTreeMap<String, Volume>,
}

impl ComposeFile {
    /// The files Compose reads in `dir` ([`ComposeFiles::find`]), read with `dir/.env` and
    /// `given` over it ([`ProjectEnv::load`]).
    pub fn load(
        dir: &Path,
        given: &BTreeMap<String, String>,
    ) -> Result<ComposeFile, ComposeFileError> {
        let env = ProjectEnv::load(dir, given)?;
        let files = ComposeFiles::find(dir, &env)?;
        ComposeFile::read(&files.files, &env)
    }

    /// Reads `files` in order and merges them (see the module docs).
    pub fn read(files: &[PathBuf], env: &ProjectEnv) -> Result<ComposeFile, ComposeFileError> {
        let mut merged = ComposeFile::default();
        for file in files {
            let text = std::fs::read_to_string(file).map_err(|source| ComposeFileError::Read {
                file: file.clone(),
                source,
            })?;
            merged.merge(file, &text, env)?;
            merged.files.push(file.clone());
        }
        Ok(merged)
    }

    /// Each service → the services it needs started first (the shape of a stack file's
    /// `depends_on`). Services without dependencies map to an empty list.
    pub fn depends_on(&self) -> BTreeMap<String, Vec<String>> {
        self.services
            .iter()
            .map(|(name, s)| {
                let after = s.start_after().into_iter().map(str::to_owned).collect();
                (name.clone(), after)
            })
            .collect()
    }

    /// Whether any service needs another started first.
    pub fn has_dependencies(&self) -> bool {
        self.services
            .values()
            .any(|s| !s.depends_on.is_empty() || !s.uses.is_empty())
    }

    /// The Docker name of the volume `key` of project `project` ([`Volume::docker_name`]);
    /// `None` if the files declare no such volume.
    pub fn volume_name(&self, project: &str, key: &str) -> Option<String> {
        self.volumes.get(key).map(|v| v.docker_name(project, key))
    }

    fn merge(&mut self, file: &Path, text: &str, env: &ProjectEnv) -> Result<(), ComposeFileError> {
        let raw: RawFile = serde_saphyr::from_str(text).map_err(|e| parse_error(file, &e))?;
        let value = |s: Spanned<String>| interpolate_at(file, s, env);
        for (name, service) in raw.services.unwrap_or_default() {
            let merged = self.services.entry(name).or_default();
            let Some(service) = service else { continue };
            match service.depends_on {
                Some(RawDependsOn::List(list)) => {
                    for s in list {
                        merged.depends_on.insert(value(s)?, Condition::Started);
                    }
                }
                Some(RawDependsOn::Map(map)) => {
                    for (s, dep) in map {
                        let condition = dep.and_then(|d| d.condition).unwrap_or_default();
                        merged.depends_on.insert(s, condition);
                    }
                }
                None => {}
            }
            for link in service.links.into_iter().flatten() {
                let link = value(link)?;
                let target = link.split(':').next().unwrap_or("");
                merged.uses.insert(target.to_owned());
            }
            for from in service.volumes_from.into_iter().flatten() {
                // `svc`, `svc:ro`, `service:svc[:ro]`; `container:NAME` is no service.
                let from = value(from)?;
                let mut parts = from.split(':');
                let used = match parts.next() {
                    Some("container") => None,
                    Some("service") => parts.next(),
                    other => other,
                };
                merged.uses.extend(used.map(str::to_owned));
            }
            for mode in [service.network_mode, service.pid, service.ipc]
                .into_iter()
                .flatten()
            {
                if let Some(used) = value(mode)?.strip_prefix("service:") {
                    merged.uses.insert(used.to_owned());
                }
            }
        }
        for (key, volume) in raw.volumes.unwrap_or_default() {
            let merged = self.volumes.entry(key).or_default();
            let Some(volume) = volume else { continue };
            if let Some(name) = volume.name {
                merged.name = Some(value(name)?);
            }
            match volume.external {
                Some(RawExternal::Flag(flag)) => merged.external = flag,
                Some(RawExternal::Named(name)) => {
                    merged.external = true;
                    if let Some(name) = name {
                        merged.name = Some(value(name)?);
                    }
                }
                None => {}
            }
            if let Some(driver) = volume.driver {
                merged.driver = Some(value(driver)?);
            }
        }
        Ok(())
    }
}

fn parse_error(file: &Path, e: &serde_saphyr::Error) -> ComposeFileError {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = e.without_snippet().to_string();
    if let Some(m) = message.strip_suffix(&format!(" at line {line}, column {column}")) {
        message = m.to_owned();
    }
    // The library's advice names its own options, which mean nothing to the person reading.
    if let Some((m, _)) = message.split_once(", set DuplicateKeyPolicy") {
        message = m.to_owned();
    }
    ComposeFileError::Parse {
        file: file.to_owned(),
        line,
        column,
        message,
    }
}

fn interpolate_at(
    file: &Path,
    s: Spanned<String>,
    env: &ProjectEnv,
) -> Result<String, ComposeFileError> {
    interpolate(&s.value, env).map_err(|problem| ComposeFileError::Interpolation {
        file: file.to_owned(),
        line: s.defined.line(),
        column: s.defined.column(),
        problem,
    })
}

/// `text` with Compose's `$` forms replaced from `env` (see the module docs).
fn interpolate(text: &str, env: &ProjectEnv) -> Result<String, Interpolation> {
    let syntax = || Interpolation::Syntax {
        text: text.to_owned(),
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = closing_brace(inner).ok_or_else(syntax)?;
            out.push_str(&braced(&inner[..end], env).ok_or_else(syntax)??);
            rest = &inner[end + 1..];
        } else {
            let len = name_len(after);
            if len == 0 {
                return Err(syntax());
            }
            let var = &after[..len];
            let value = env.get(var).ok_or_else(|| Interpolation::Unset {
                var: var.to_owned(),
            })?;
            out.push_str(value);
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The length of the variable name `s` starts with (0 if none).
fn name_len(s: &str) -> usize {
    let mut len = 0;
    for (i, b) in s.bytes().enumerate() {
        let ok = b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit());
        if !ok {
            break;
        }
        len = i + 1;
    }
    len
}

/// The index of the `}` that closes a `${` whose content starts `s` (nested `${…}` allowed).
fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The value of `${inner}`; `None` when `inner` is not one of the forms.
fn braced(inner: &str, env: &ProjectEnv) -> Option<Result<String, Interpolation>> {
    let len = name_len(inner);
    if len == 0 {
        return None;
    }
    let (var, op) = inner.split_at(len);
    let value = env.get(var);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let word = |w: &str| interpolate(w, env);
    Some(match op {
        "" => value
            .map(str::to_owned)
            .ok_or_else(|| Interpolation::Unset {
                var: var.to_owned(),
            }),
        _ if op.starts_with(":-") => match value.filter(|_| set_nonempty) {
            Some(v) => Ok(v.to_owned()),
            None => word(&op[2..]),
        },
        _ if op.starts_with('-') => match value {
            Some(v) => Ok(v.to_owned()),
            None => word(&op[1..]),
        },
        _ if op.starts_with(":?") || op.starts_with('?') => {
            let strict = op.starts_with(':');
            let message = if strict { &op[2..] } else { &op[1..] };
            match value.filter(|_| set_nonempty || !strict) {
                Some(v) => Ok(v.to_owned()),
                None => Err(Interpolation::Required {
                    var: var.to_owned(),
                    message: message.to_owned(),
                }),
            }
        }
        _ if op.starts_with(":+") => {
            if set_nonempty {
                word(&op[2..])
            } else {
                Ok(String::new())
            }
        }
        _ if op.starts_with('+') => {
            if value.is_some() {
                word(&op[1..])
            } else {
                Ok(String::new())
            }
        }
        _ => return None,
    })
}

// ---- The YAML, as far as it is read ---------------------------------------------------------

#[derive(Deserialize)]
struct RawFile {
    services: Option<BTreeMap<String, Option<RawService>>>,
    volumes: Option<BTreeMap<String, Option<RawVolume>>>,
}

#[derive(Deserialize)]
struct RawService {
    depends_on: Option<RawDependsOn>,
    links: Option<Vec<Spanned<String>>>,
    volumes_from: Option<Vec<Spanned<String>>>,
    network_mode: Option<Spanned<String>>,
    pid: Option<Spanned<String>>,
    ipc: Option<Spanned<String>>,
}

/// `depends_on: [db]` or `depends_on: { db: { condition: service_healthy } }`.
enum RawDependsOn {
    List(Vec<Spanned<String>>),
    Map(BTreeMap<String, Option<RawDependency>>),
}

#[derive(Deserialize)]
struct RawDependency {
    condition: Option<Condition>,
}

#[derive(Deserialize)]
struct RawVolume {
    name: Option<Spanned<String>>,
    external: Option<RawExternal>,
    driver: Option<Spanned<String>>,
}

/// `external: true` or the legacy `external: { name: … }`.
enum RawExternal {
    Flag(bool),
    Named(Option<Spanned<String>>),
}

impl<'de> Deserialize<'de> for RawDependsOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawDependsOn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a list of service names, or a map of service names to \
                     { condition: service_started | service_healthy | \
                     service_completed_successfully }",
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawDependsOn, A::Error> {
                let mut list = Vec::new();
                while let Some(s) = seq.next_element()? {
                    list.push(s);
                }
                Ok(RawDependsOn::List(list))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDependsOn, A::Error> {
                let mut deps = BTreeMap::new();
                while let Some((service, dep)) = map.next_entry()? {
                    deps.insert(service, dep);
                }
                Ok(RawDependsOn::Map(deps))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawExternal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawExternal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or { name: … }")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RawExternal, E> {
                Ok(RawExternal::Flag(b))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawExternal, A::Error> {
                let mut name = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "name" {
                        name = Some(map.next_value()?);
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(RawExternal::Named(name))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> ProjectEnv {
        ProjectEnv::from_vars(
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    /// `files` merged in order, as if read from `name`s in a dir.
    fn read(files: &[(&str, &str)], e: &ProjectEnv) -> Result<ComposeFile, ComposeFileError> {
        let mut merged = ComposeFile::default();
        for (name, text) in files {
            merged.merge(Path::new(name), text, e)?;
        }
        Ok(merged)
    }

    fn deps(f: &ComposeFile, service: &str) -> Vec<(String, Condition)> {
        f.services[service]
            .depends_on
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    #[test]
    fn depends_on_in_list_and_map_form() {
        let f = read(
            &[(
                "compose.yaml",
                "services:\n  app:\n    image: x\n    depends_on: [db, cache]\n  \
                 web:\n    depends_on:\n      app:\n        condition: service_healthy\n        \
                 restart: true\n      migrate:\n        condition: service_completed_successfully\n      \
                 cache: {}\n  db:\n  cache:\n    image: y\n",
            )],
            &env(&[]),
        )
        .expect("parses");
        assert_eq!(
            deps(&f, "app"),
            [
                ("cache".to_owned(), Condition::Started),
                ("db".to_owned(), Condition::Started)
            ]
        );
        assert_eq!(
            deps(&f, "web"),
            [
                ("app".to_owned(), Condition::Healthy),
                ("cache".to_owned(), Condition::Started),
                ("migrate".to_owned(), Condition::CompletedSuccessfully)
            ]
        );
        assert_eq!(f.services["db"], Service::default());
        assert!(f.has_dependencies());
        assert_eq!(f.depends_on()["app"], ["cache", "db"]);
        assert_eq!(f.depends_on()["db"], Vec::<String>::new());
    }

    #[test]
    fn links_volumes_from_and_service_namespaces_are_dependencies_too() {
        let f = read(
            &[(
                "docker-compose.yml",
                "services:\n  app:\n    links: [\"db:database\", cache]\n    \
                 volumes_from: [\"files:ro\", \"container:other\", \"service:logs\"]\n    \
                 network_mode: service:vpn\n    pid: host\n    ipc: service:shm\n",
            )],
            &env(&[]),
        )
        .expect("parses");
        let after: Vec<&str> = f.services["app"].start_after().into_iter().collect();
        assert_eq!(after, ["cache", "db", "files", "logs", "shm", "vpn"]);
    }

    #[test]
    fn anchors_and_merge_keys_are_followed() {
        let f = read(
            &[(
                "compose.yaml",
                "x-common: &common\n  depends_on: [db]\nservices:\n  app:\n    <<: *common\n    \
                 image: x\n  worker:\n    <<: *common\n  db: {}\n",
            )],
            &env(&[]),
        )
        .expect("parses");
        assert_eq!(f.depends_on()["app"], ["db"]);
        assert_eq!(f.depends_on()["worker"], ["db"]);
    }

    #[test]
    fn an_override_adds_dependencies_and_replaces_volume_fields() {
        let f = read(
            &[
                (
                    "compose.yaml",
                    "services:\n  app:\n    depends_on: [db]\n  db: {}\nvolumes:\n  data:\n    \
                     driver: local\n  cache:\n",
                ),
                (
                    "compose.override.yml",
                    "services:\n  app:\n    depends_on:\n      db:\n        condition: \
                     service_healthy\n      cache:\n        condition: service_started\n  \
                     cache: {}\nvolumes:\n  data:\n    name: shared-data\n",
                ),
            ],
            &env(&[]),
        )
        .expect("parses");
        assert_eq!(
            deps(&f, "app"),
            [
                ("cache".to_owned(), Condition::Started),
                ("db".to_owned(), Condition::Healthy)
            ]
        );
        assert_eq!(
            f.volumes["data"],
            Volume {
                name: Some("shared-data".into()),
                external: false,
                driver: Some("local".into())
            }
        );
        assert_eq!(f.volumes["cache"], Volume::default());
    }

    #[test]
    fn volume_names_as_compose_gives_them() {
        let f = read(
            &[(
                "compose.yaml",
                "volumes:\n  plain:\n  named:\n    name: my-data\n  ext:\n    external: true\n  \
                 ext-named:\n    external: true\n    name: outside\n  legacy:\n    external:\n      \
                 name: old-style\n  not-ext:\n    external: false\n  from-env:\n    name: \
                 \"${PREFIX}-db\"\n",
            )],
            &env(&[("PREFIX", "prod")]),
        )
        .expect("parses");
        let name = |key| f.volume_name("web", key);
        assert_eq!(name("plain").as_deref(), Some("web_plain"));
        assert_eq!(name("named").as_deref(), Some("my-data"));
        assert_eq!(name("ext").as_deref(), Some("ext"));
        assert_eq!(name("ext-named").as_deref(), Some("outside"));
        assert_eq!(name("legacy").as_deref(), Some("old-style"));
        assert_eq!(name("not-ext").as_deref(), Some("web_not-ext"));
        assert_eq!(name("from-env").as_deref(), Some("prod-db"));
        assert_eq!(name("undeclared"), None);
        assert!(f.volumes["legacy"].external);
        assert!(!f.volumes["not-ext"].external);
    }

    #[test]
    fn bad_yaml_names_the_file_line_and_column() {
        let err = read(
            &[(
                "docker-compose.yml",
                "services:\n  app:\n    image: a: b\n  db: {}\n",
            )],
            &env(&[]),
        )
        .expect_err("a mapping value where none may be");
        let text = err.to_string();
        assert!(
            matches!(err, ComposeFileError::Parse { line: 3, .. }),
            "{err:?}"
        );
        assert!(text.starts_with("docker-compose.yml:3:"), "{text}");

        let err = read(
            &[("compose.yaml", "services:\n  app:\n    depends_on: 3\n")],
            &env(&[]),
        )
        .expect_err("a number is no depends_on");
        assert_eq!(
            err.to_string(),
            "compose.yaml:3:5: invalid type: integer `3`, expected a list of service names, or \
             a map of service names to { condition: service_started | service_healthy | \
             service_completed_successfully }"
        );

        let err = read(
            &[(
                "compose.yaml",
                "services:\n  app:\n    depends_on:\n      db:\n        condition: started\n",
            )],
            &env(&[]),
        )
        .expect_err("no such condition");
        let text = err.to_string();
        assert!(text.starts_with("compose.yaml:5:"), "{text}");
        assert!(text.contains("service_healthy"), "{text}");

        let err = read(
            &[("compose.yaml", "services:\n  app: {}\n  app: {}\n")],
            &env(&[]),
        )
        .expect_err("duplicate");
        assert_eq!(
            err.to_string(),
            "compose.yaml:3:3: duplicate mapping key: app"
        );
    }

    #[test]
    fn keys_not_read_may_hold_anything() {
        let f = read(
            &[(
                "compose.yaml",
                "version: \"2.4\"\nx-anything: [1, {a: b}]\nservices:\n  app:\n    image: \
                 ${UNSET_IS_FINE_HERE}\n    ports: [\"8080:80\"]\n    healthcheck: {test: [CMD, \
                 true]}\nnetworks:\n  front: {}\nsecrets: {}\n",
            )],
            &env(&[]),
        )
        .expect("parses");
        assert_eq!(f.services.len(), 1);
        assert!(!f.has_dependencies());
    }

    #[test]
    fn an_unset_variable_in_a_value_read_is_an_error_with_its_place() {
        let err = read(
            &[("compose.yaml", "volumes:\n  db:\n    name: ${DB_VOLUME}\n")],
            &env(&[]),
        )
        .expect_err("unset");
        assert!(
            matches!(
                &err,
                ComposeFileError::Interpolation { line: 3, column: 11, problem: Interpolation::Unset { var }, .. }
                    if var == "DB_VOLUME"
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(".env"), "{err}");
    }

    #[test]
    fn interpolation_knows_composes_forms() {
        let e = env(&[("SET", "v"), ("EMPTY", "")]);
        let ok = |s: &str| interpolate(s, &e).expect(s);
        assert_eq!(ok("plain"), "plain");
        assert_eq!(ok("a-$SET-${SET}"), "a-v-v");
        assert_eq!(ok("$$SET"), "$SET");
        assert_eq!(ok("${UNSET:-d}|${EMPTY:-d}|${SET:-d}"), "d|d|v");
        assert_eq!(ok("${UNSET-d}|${EMPTY-d}"), "d|");
        assert_eq!(ok("${UNSET:-${SET}x}"), "vx");
        assert_eq!(
            ok("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}|${UNSET+alt}"),
            "alt||alt|"
        );
        assert_eq!(ok("${EMPTY?m}"), "");
        assert_eq!(
            interpolate("${EMPTY:?must be set}", &e),
            Err(Interpolation::Required {
                var: "EMPTY".into(),
                message: "must be set".into()
            })
        );
        assert_eq!(
            interpolate("x$UNSET", &e),
            Err(Interpolation::Unset {
                var: "UNSET".into()
            })
        );
        for bad in ["${", "${}", "$-", "${SET%x}", "$"] {
            assert!(
                matches!(interpolate(bad, &e), Err(Interpolation::Syntax { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn env_files_parse_like_compose() {
        let vars = parse_env_file(
            "# comment\n\nA=1\nexport B = two words \nC='lit $X # not a comment'\n\
             D=\"say \\\"hi\\\"\\n\" # comment\nE=value # comment\nF=a#b\nNOEQUALS\nG=\n",
        );
        let get = |k: &str| vars.get(k).map(String::as_str);
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("lit $X # not a comment"));
        assert_eq!(get("D"), Some("say \"hi\"\n"));
        assert_eq!(get("E"), Some("value"));
        assert_eq!(get("F"), Some("a#b"));
        assert_eq!(get("G"), Some(""));
        assert_eq!(get("NOEQUALS"), None);
    }

    #[test]
    fn files_are_found_as_compose_finds_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let none = ProjectEnv::default();
        assert!(matches!(
            ComposeFiles::find(d, &none),
            Err(ComposeFileError::NotFound { .. })
        ));

        std::fs::write(d.join("docker-compose.yml"), "services: {}\n").expect("write");
        let found = ComposeFiles::find(d, &none).expect("found");
        assert_eq!(found.files, [d.join("docker-compose.yml")]);
        assert_eq!(found.from, FilesFrom::DefaultNames);

        std::fs::write(d.join("compose.yaml"), "services: {}\n").expect("write");
        std::fs::write(d.join("docker-compose.override.yml"), "services: {}\n").expect("write");
        std::fs::write(d.join("compose.override.yaml"), "services: {}\n").expect("write");
        let found = ComposeFiles::find(d, &none).expect("found");
        assert_eq!(
            found.files,
            [d.join("compose.yaml"), d.join("compose.override.yaml")]
        );
        assert_eq!(
            found.ignored,
            [
                d.join("docker-compose.yml"),
                d.join("docker-compose.override.yml")
            ]
        );
    }

    #[test]
    fn compose_file_from_env_file_or_given_env_replaces_the_search() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        std::fs::write(d.join("compose.yaml"), "services:\n  db: {}\n").expect("write");
        std::fs::write(
            d.join("base.yml"),
            "services:\n  app:\n    depends_on: [db]\n  db: {}\n",
        )
        .expect("write");
        std::fs::write(
            d.join("prod.yml"),
            "services:\n  app:\n    depends_on: [cache]\n",
        )
        .expect("write");
        std::fs::write(d.join(".env"), "COMPOSE_FILE=base.yml:prod.yml\n").expect("write");

        let f = ComposeFile::load(d, &BTreeMap::new()).expect("loads");
        assert_eq!(f.files, [d.join("base.yml"), d.join("prod.yml")]);
        assert_eq!(f.depends_on()["app"], ["cache", "db"]);

        let given = BTreeMap::from([
            ("COMPOSE_FILE".to_owned(), "base.yml;missing.yml".to_owned()),
            ("COMPOSE_PATH_SEPARATOR".to_owned(), ";".to_owned()),
        ]);
        let err = ComposeFile::load(d, &given).expect_err("missing.yml");
        assert!(
            matches!(&err, ComposeFileError::Read { file, .. } if *file == d.join("missing.yml")),
            "{err:?}"
        );
    }
}
