//! The agents' config files: `source.toml` / `target.toml` plus one file per stack in `conf.d/`.
//!
//! [`SourceConfig::load`] and [`TargetConfig::load`] read `FILE` and every `conf.d/*.toml`
//! beside it, in file-name order, and return a config that has been checked as far as a config
//! can be: every key known, every value parsed (durations, percentages, addresses, names), every
//! cross-reference resolved, every stack path checked on disk. An error names the file, the line
//! and the key (`conf.d/nextcloud.toml:3:1: unknown key "pathh" (expected one of …)`).
//!
//! ```text
//! /etc/stackclone/source.toml        identity_dir, [targets.NAME] address = "HOST:PORT"
//! /etc/stackclone/conf.d/*.toml      one stack per file: stack, path, target, …
//! ```
//!
//! Decisions worth knowing:
//! - **One stack per `conf.d` file, and only there**, like the tool this replaces: the main file
//!   holds what the agent needs (identity, peers, listen address), a stack file holds one stack's
//!   keys at its top level. `[stacks.NAME]` in the main file is an unknown key. Files whose name
//!   does not end in `.toml` or starts with `.` are ignored (editor backups, `x.toml.disabled`);
//!   a missing `conf.d` means no stacks.
//! - **`skip = true`** keeps the stack in [`SourceConfig::skipped`] / [`TargetConfig::skipped`]
//!   by name and file, so `status` can list it, and out of `stacks`, so nothing can run it by
//!   accident. Its keys are still parsed (a typo is still an error) and its name still counts for
//!   uniqueness, but its path and `target` are not checked: a skipped stack may point at a
//!   directory or target that no longer exists.
//! - **Paths** must be absolute and free of `..`; they are normalised (no `.`, no trailing `/`).
//!   With [`LoadOptions::check_paths`] (the default) a source `path` must be an existing
//!   directory, a target `path` must be a directory or not exist yet (the target creates it). Two
//!   stacks on one path, or one inside another, are refused on both sides (compared after
//!   resolving symlinks when the paths exist). A target path that is a system directory
//!   ([`DANGEROUS_ROOTS`], or inside one of [`DANGEROUS_SUBTREES`]) is refused unless the stack
//!   sets `allow_dangerous_root = true`.
//! - **The identity dir** is `identity_dir` from the main file, else [`DEFAULT_IDENTITY_DIR`].
//!   The loader reads no environment: a CLI that takes `--dir` / `STACKCLONE_DIR` (clap's `env`)
//!   overwrites the loaded `identity_dir` with it, so the order is flag, then environment, then
//!   file, then default.
//! - **Durations** are `"30s"`, `"5m"`, `"26h"`, `"1d"`, `"250ms"`, sums like `"1h30m"`, or an
//!   integer number of seconds ([`parse_duration`]). **Shares** (`max_delete`) are `0.5` or
//!   `"50%"` ([`Fraction`]). **Bandwidths** are `"20MiB/s"` and friends ([`parse_bandwidth`]).
//! - Risky but allowed settings (`stop = false`, an overridden dangerous path) come back as
//!   [`ConfigWarning`]s for the agent to log loudly; they are not errors.
//!
//! What it does not do: no network, no Docker, no writes; it does not resolve addresses, read
//! certificates or check that `compose_dir` or `state_dir` exist — that is for the agent that
//! uses them, when it uses them.

mod error;
mod source;
mod target;
mod value;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use error::FileText;
pub use error::{ConfigError, ConfigWarning, Location, OverrideProblem, Side};
pub use source::{DEFAULT_STOP_TIMEOUT, Hook, OnSuperseded, SourceConfig, SourceStack, TargetPeer};
pub use target::{
    ComposePolicy, DEFAULT_HEALTH_TIMEOUT, DEFAULT_KEEP_GENERATIONS, DEFAULT_MAX_SKEW,
    TargetConfig, TargetStack,
};
pub use value::{
    Address, DEFAULT_MAX_DELETE, Fraction, check_host_name, check_stack_name, parse_bandwidth,
    parse_duration,
};

/// Where certificates and keys live when the main file sets no `identity_dir`.
pub const DEFAULT_IDENTITY_DIR: &str = "/etc/stackclone";

/// The directory beside the main file that holds one `*.toml` per stack.
pub const STACK_DIR: &str = "conf.d";

/// System directories whose whole subtree a target refuses as a stack path unless
/// `allow_dangerous_root = true`: a commit anywhere in them would replace the host's own files
/// (`/etc/cron.d` would run the source's files as root). `/lib*` (every top-level `lib`
/// directory: `/lib`, `/lib64`, `/libx32`) counts too. This is the one list: the config and the target's store both ask
/// [`is_dangerous_root`].
pub const DANGEROUS_SUBTREES: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/spool",
    "/var/lib/dpkg",
    "/var/lib/apt",
];

/// Directories refused themselves, whose children are where stacks usually live
/// (`/opt/containers/nextcloud`, `/srv/gitea`, `/home/alice/stacks/x`).
pub const DANGEROUS_ROOTS: &[&str] = &[
    "/", "/home", "/mnt", "/media", "/opt", "/srv", "/tmp", "/var", "/var/lib",
];

/// Whether a stack may not live at `path` (absolute, `.` and `..` resolved): one of
/// [`DANGEROUS_ROOTS`], or anywhere inside one of [`DANGEROUS_SUBTREES`] or a top-level
/// `/lib*`. Compared component-wise, so `/etc/` and `/etc/cron.d` both count.
pub fn is_dangerous_root(path: &Path) -> bool {
    // `/lib`, `/lib32`, `/lib64`, `/libx32`, … (not `/library`).
    let lib = path.components().nth(1).is_some_and(|c| {
        c.as_os_str()
            .as_encoded_bytes()
            .strip_prefix(b"lib")
            .is_some_and(|rest| rest.iter().all(|b| b.is_ascii_digit() || *b == b'x'))
    });
    lib || DANGEROUS_ROOTS.iter().any(|root| Path::new(root) == path)
        || DANGEROUS_SUBTREES
            .iter()
            .any(|tree| path.starts_with(Path::new(tree)))
}

/// How much of the outside world [`SourceConfig::load_with`] / [`TargetConfig::load_with`]
/// look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Check stack paths on disk (exists, is a directory, not the same directory as another
    /// stack's through a symlink). Off only to validate a config written for another host, such
    /// as the shipped examples.
    pub check_paths: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { check_paths: true }
    }
}

/// A stack whose file says `skip = true`: known by name, never run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedStack {
    pub name: String,
    /// The `conf.d` file that declares it.
    pub file: PathBuf,
}

/// The main file and the stack files, read.
struct Files {
    main: FileText,
    stacks: Vec<FileText>,
}

fn read_files(main: &Path) -> Result<Files, ConfigError> {
    let main_text = read_file(main)?;
    let dir = main
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join(STACK_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Files {
                main: main_text,
                stacks: Vec::new(),
            });
        }
        Err(source) => return Err(ConfigError::ReadDir { dir, source }),
    };
    check_not_writable_by_others(&dir)?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::ReadDir {
            dir: dir.clone(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        if name.starts_with(b".") || !name.ends_with(b".toml") {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: a stack file may be a link into a config repository.
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    let stacks = paths
        .iter()
        .map(|p| read_file(p))
        .collect::<Result<_, _>>()?;
    Ok(Files {
        main: main_text,
        stacks,
    })
}

/// Refuses a config file or `conf.d` that group or others may write, as sshd's `StrictModes`
/// does: whoever can edit it decides what the agent (root) syncs, runs as hooks and where it
/// sends alerts. Checked on the file a symlink points to.
fn check_not_writable_by_others(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(ConfigError::WritableByOthers {
            file: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<FileText, ConfigError> {
    check_not_writable_by_others(path)?;
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    Ok(FileText {
        path: path.to_owned(),
        text,
    })
}

fn parse<T: DeserializeOwned>(file: &FileText) -> Result<T, ConfigError> {
    toml::from_str(&file.text).map_err(|e| file.toml_error(&e))
}

/// Stack names seen so far, skipped ones included.
#[derive(Default)]
struct Names(HashMap<String, Box<Location>>);

impl Names {
    fn claim(&mut self, stack: &str, at: Box<Location>) -> Result<(), ConfigError> {
        if let Some(other_at) = self.0.get(stack) {
            return Err(ConfigError::DuplicateStack {
                at,
                stack: stack.to_owned(),
                other_at: other_at.clone(),
            });
        }
        self.0.insert(stack.to_owned(), at);
        Ok(())
    }
}

/// Paths of the stacks that run, to refuse two on one directory or one inside another.
#[derive(Default)]
struct PathClaims(Vec<PathClaim>);

struct PathClaim {
    /// Resolved through symlinks where it exists; what is compared.
    key: PathBuf,
    /// As written (normalised); what messages show.
    path: PathBuf,
    stack: String,
    at: Box<Location>,
}

impl PathClaims {
    fn claim(&mut self, new: PathClaim) -> Result<(), ConfigError> {
        for old in &self.0 {
            let err = if old.key == new.key {
                ConfigError::SamePath {
                    at: new.at,
                    stack: new.stack,
                    other_at: old.at.clone(),
                    other_stack: old.stack.clone(),
                    path: new.path,
                }
            } else if new.key.starts_with(&old.key) || old.key.starts_with(&new.key) {
                ConfigError::NestedPath {
                    at: new.at,
                    stack: new.stack,
                    path: new.path,
                    other_at: old.at.clone(),
                    other_stack: old.stack.clone(),
                    other_path: old.path.clone(),
                }
            } else {
                continue;
            };
            return Err(err);
        }
        self.0.push(new);
        Ok(())
    }
}

/// Checks a stack's `path` on disk and returns the key to compare it by (symlinks resolved).
fn check_stack_dir(
    side: Side,
    stack: &str,
    path: &Path,
    at: &Location,
) -> Result<PathBuf, ConfigError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())),
        Ok(_) => Err(ConfigError::NotADirectory {
            at: Box::new(at.clone()),
            side,
            stack: stack.to_owned(),
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match side {
            Side::Source => Err(ConfigError::SourcePathMissing {
                at: Box::new(at.clone()),
                stack: stack.to_owned(),
                path: path.to_owned(),
            }),
            Side::Target => Ok(path.to_owned()),
        },
        Err(source) => Err(ConfigError::PathCheck {
            at: Box::new(at.clone()),
            stack: stack.to_owned(),
            path: path.to_owned(),
            source,
        }),
    }
}
