//! What can be wrong with a config, and where: every error a person can fix in a file names the
//! file, the line and column, and the key.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;

/// A position in a config file. Displays as `FILE:LINE:COL`, both 1-based (an editor's `+LINE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// Which agent's config an error is about, where the rule differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// Why a config did not load. The loader stops at the first error. Locations are boxed to keep
/// `Result<_, ConfigError>` small.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The main file or a `conf.d` file could not be read.
    #[error("{}: cannot read config file: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A config file or `conf.d` that group or others may write.
    #[error(
        "{}: mode {mode:04o} lets group or others change it, and with it what this agent (as \
         root) syncs, runs and alerts; refusing it. Run `chmod go-w {}`",
        file.display(),
        file.display()
    )]
    WritableByOthers { file: PathBuf, mode: u32 },
    /// `conf.d` exists but could not be listed.
    #[error("{}: cannot list stack files: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not valid TOML (or TOML whose position names no key).
    #[error("{at}: {message}")]
    Syntax { at: Box<Location>, message: String },
    /// A key the config does not know, often a typo (`deny_unknown_fields`).
    #[error("{at}: unknown key \"{key}\" ({expected})")]
    UnknownKey {
        at: Box<Location>,
        key: String,
        /// `expected one of `stack`, `path`, …`, as serde lists the keys of that table.
        expected: String,
    },
    /// A required key is absent. `table` is the table that lacks it (`targets.backup`), `None`
    /// for the top level of the file.
    #[error("{at}: missing key \"{key}\"{}", in_table(.table))]
    MissingKey {
        at: Box<Location>,
        key: String,
        table: Option<String>,
    },
    /// A value of the wrong type or out of range: a bad duration, percentage, address, name.
    #[error("{at}: bad value{}: {message}", for_key(.key))]
    InvalidValue {
        at: Box<Location>,
        key: Option<String>,
        message: String,
    },
    /// The source's `path` does not exist. (A target creates a missing `path`.)
    #[error(
        "{at}: key \"path\" of stack \"{stack}\": {} does not exist; the source only reads a \
         stack's data dir and never creates it, so create it or fix the path",
        path.display()
    )]
    SourcePathMissing {
        at: Box<Location>,
        stack: String,
        path: PathBuf,
    },
    /// `path` exists but is not a directory.
    #[error(
        "{at}: key \"path\" of stack \"{stack}\": {} exists but is not a directory{}",
        path.display(),
        not_dir_hint(*.side)
    )]
    NotADirectory {
        at: Box<Location>,
        side: Side,
        stack: String,
        path: PathBuf,
    },
    /// `path` could not be examined (permissions, I/O).
    #[error("{at}: key \"path\" of stack \"{stack}\": cannot examine {}: {source}", path.display())]
    PathCheck {
        at: Box<Location>,
        stack: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A target `path` that is (or resolves to) a system directory such as `/etc`.
    #[error(
        "{at}: key \"path\" of stack \"{stack}\": refusing target path {}, a system directory the \
         target would overwrite; set allow_dangerous_root = true only if that is really meant",
        path.display()
    )]
    DangerousPath {
        at: Box<Location>,
        stack: String,
        path: PathBuf,
    },
    /// Two stacks on one path.
    #[error(
        "{at}: key \"path\": stacks \"{stack}\" and \"{other_stack}\" (at {other_at}) both use {}; \
         each stack needs its own directory",
        path.display()
    )]
    SamePath {
        at: Box<Location>,
        stack: String,
        other_at: Box<Location>,
        other_stack: String,
        path: PathBuf,
    },
    /// One stack's path is inside another's, so syncing the outer one would touch the inner.
    #[error(
        "{at}: key \"path\": stack \"{stack}\" at {} is inside {} of stack \"{other_stack}\" (at \
         {other_at}); stack paths must not nest",
        path.display(),
        other_path.display()
    )]
    NestedPath {
        at: Box<Location>,
        stack: String,
        path: PathBuf,
        other_at: Box<Location>,
        other_stack: String,
        other_path: PathBuf,
    },
    /// A stack's state dir overlaps a live dir or another stack's state dir.
    #[error(
        "{at}: stack \"{stack}\" keeps its state (journal, staging, generations) in {}, which \
         overlaps {} of stack \"{other_stack}\"; set `state_dir` to a directory of its own, \
         outside every stack's `path`",
        state.display(),
        other.display()
    )]
    StateDirOverlap {
        at: Box<Location>,
        stack: String,
        state: PathBuf,
        other_stack: String,
        other: PathBuf,
    },
    /// Two files declare the same stack name.
    #[error(
        "{at}: key \"stack\": stack \"{stack}\" is already declared at {other_at}; stack names \
         must be unique"
    )]
    DuplicateStack {
        at: Box<Location>,
        stack: String,
        other_at: Box<Location>,
    },
    /// A target stack's `compose_override` names no file the target can use, or a file that a
    /// commit would replace.
    #[error(
        "{at}: key \"compose_override\" of stack \"{stack}\": {}: {}",
        path.display(),
        override_problem(problem, stack)
    )]
    ComposeOverride {
        at: Box<Location>,
        stack: String,
        path: PathBuf,
        problem: OverrideProblem,
    },
    /// A source stack's `target` names no `[targets.NAME]` table in the main file.
    #[error(
        "{at}: key \"target\" of stack \"{stack}\": no [targets.{target}] in {} ({})",
        main.display(),
        known_targets(.known)
    )]
    UnknownTarget {
        at: Box<Location>,
        stack: String,
        target: String,
        main: PathBuf,
        known: Vec<String>,
    },
}

impl ConfigError {
    /// Where in which file the error is, if it is about one place.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Read { .. }
            | ConfigError::ReadDir { .. }
            | ConfigError::WritableByOthers { .. } => None,
            ConfigError::Syntax { at, .. }
            | ConfigError::UnknownKey { at, .. }
            | ConfigError::MissingKey { at, .. }
            | ConfigError::InvalidValue { at, .. }
            | ConfigError::SourcePathMissing { at, .. }
            | ConfigError::NotADirectory { at, .. }
            | ConfigError::PathCheck { at, .. }
            | ConfigError::DangerousPath { at, .. }
            | ConfigError::SamePath { at, .. }
            | ConfigError::NestedPath { at, .. }
            | ConfigError::StateDirOverlap { at, .. }
            | ConfigError::ComposeOverride { at, .. }
            | ConfigError::DuplicateStack { at, .. }
            | ConfigError::UnknownTarget { at, .. } => Some(at),
        }
    }
}

/// What is wrong with a `compose_override` file.
#[derive(Debug)]
#[non_exhaustive]
pub enum OverrideProblem {
    /// It does not exist, or cannot be examined.
    Unreadable(io::Error),
    /// It exists but is not a regular file.
    NotAFile,
    /// It lies inside the synced `path` of a stack (this one or another), which every commit of
    /// that stack makes a copy of the primary's.
    InsideStackPath { stack: String, path: PathBuf },
}

fn override_problem(problem: &OverrideProblem, stack: &str) -> String {
    let outside = format!(
        "keep the standby's own compose file outside every stack's path, e.g. \
         /etc/stackclone/overrides/{stack}.yml"
    );
    match problem {
        OverrideProblem::Unreadable(e) => format!(
            "cannot be read ({e}); create it (a compose file with what the standby must do \
             differently, e.g. other published ports) or fix the path"
        ),
        OverrideProblem::NotAFile => format!("is not a file; {outside}"),
        OverrideProblem::InsideStackPath { stack: other, path } => format!(
            "lies inside {}, the synced path of stack \"{other}\", which every commit replaces \
             with the primary's copy (a file only the standby has is deleted); {outside}",
            path.display()
        ),
    }
}

fn in_table(table: &Option<String>) -> String {
    table
        .as_ref()
        .map(|t| format!(" in [{t}]"))
        .unwrap_or_default()
}

fn for_key(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!(" for key \"{k}\""))
        .unwrap_or_default()
}

fn not_dir_hint(side: Side) -> &'static str {
    match side {
        Side::Source => "",
        Side::Target => " (the target creates a missing path, but never replaces a file)",
    }
}

fn known_targets(known: &[String]) -> String {
    if known.is_empty() {
        "the main file declares no targets".to_owned()
    } else {
        format!("declared: {}", known.join(", "))
    }
}

/// Something allowed but risky, for the agent to log loudly at start and on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub at: Location,
    pub stack: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: stack \"{}\": {}", self.at, self.stack, self.message)
    }
}

/// One config file's name and text, to turn byte offsets into [`Location`]s.
#[derive(Debug)]
pub(crate) struct FileText {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl FileText {
    pub(crate) fn at(&self, offset: usize) -> Box<Location> {
        let offset = floor_char_boundary(&self.text, offset);
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Box::new(Location {
            file: self.path.clone(),
            line: before.matches('\n').count() + 1,
            col: before[line_start..].chars().count() + 1,
        })
    }

    pub(crate) fn invalid(&self, span: Range<usize>, key: &str, message: String) -> ConfigError {
        ConfigError::InvalidValue {
            at: self.at(span.start),
            key: Some(key.to_owned()),
            message,
        }
    }

    /// Turns a TOML (or serde-inside-TOML) error into one that names the file, line and key.
    pub(crate) fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let span = floor_char_boundary(&self.text, span.start)
            ..floor_char_boundary(&self.text, span.end.max(span.start));
        let at = self.at(span.start);
        let message = e.message();
        let spanned_text = &self.text[span.clone()];

        // serde's wording: "unknown field `x`, expected one of `a`, `b`" or
        // "unknown field `x`, there are no fields".
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((key, expected)) = rest.split_once("`, ")
        {
            return ConfigError::UnknownKey {
                at,
                key: key.to_owned(),
                expected: expected.to_owned(),
            };
        }
        if let Some(rest) = message.strip_prefix("missing field `")
            && let Some(key) = rest.strip_suffix('`')
        {
            let table = header_name(spanned_text)
                .map(str::to_owned)
                .or_else(|| self.key_at(span.start));
            return ConfigError::MissingKey {
                at,
                key: key.to_owned(),
                table,
            };
        }
        if message == "duplicate key" {
            return ConfigError::Syntax {
                at,
                message: format!("duplicate key \"{spanned_text}\""),
            };
        }
        match self.key_at(span.start) {
            Some(key) => ConfigError::InvalidValue {
                at,
                key: Some(key),
                message: message.to_owned(),
            },
            None => ConfigError::Syntax {
                at,
                message: message.to_owned(),
            },
        }
    }

    /// The key whose value starts at `offset`, read back from the text: `key = <value>` on the
    /// same line (also inside an inline table), or the table header `[a.b]` that `offset` is in.
    /// `None` when the text does not say (a value continued from an earlier line).
    fn key_at(&self, offset: usize) -> Option<String> {
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let prefix = &self.text[line_start..offset];
        let line = self.text[line_start..].lines().next().unwrap_or("");
        if !prefix.contains('=')
            && let Some(name) = header_name(line)
        {
            return Some(name.to_owned());
        }
        let before_eq = prefix.trim_end().strip_suffix('=')?.trim_end();
        let key_len = before_eq
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .count();
        let (head, key) = before_eq.split_at(before_eq.len() - key_len);
        let boundary = head
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || c == '{' || c == ',');
        (!key.is_empty() && boundary).then(|| key.to_owned())
    }
}

/// `a.b` for a line that is a table header `[a.b]` or `[[a.b]]` (a trailing comment allowed).
fn header_name(line: &str) -> Option<&str> {
    let t = line.trim();
    let t = t.split_once('#').map_or(t, |(h, _)| h).trim_end();
    let inner = t.strip_prefix("[[").and_then(|t| t.strip_suffix("]]"));
    let inner = inner.or_else(|| t.strip_prefix('[').and_then(|t| t.strip_suffix(']')))?;
    Some(inner.trim())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileText {
        FileText {
            path: PathBuf::from("x.toml"),
            text: text.to_owned(),
        }
    }

    #[test]
    fn key_at_reads_plain_inline_and_header_keys() {
        let f = file("a = 1\n  b.c = { d = 2, e = 3 }\n[targets.x]\nf = [\"p=q\", 4]\n");
        assert_eq!(f.key_at(4).as_deref(), Some("a"));
        let d = f.text.find("2,").unwrap();
        assert_eq!(f.key_at(d).as_deref(), Some("d"));
        let e = f.text.find("3 }").unwrap();
        assert_eq!(f.key_at(e).as_deref(), Some("e"));
        let bc = f.text.find("{ d").unwrap();
        assert_eq!(f.key_at(bc).as_deref(), Some("b.c"));
        let x = f.text.find("x]").unwrap();
        assert_eq!(f.key_at(x).as_deref(), Some("targets.x"));
        // The `=` inside the string must not be taken for a key.
        let four = f.text.find("4]").unwrap();
        assert_eq!(f.key_at(four), None);
    }

    #[test]
    fn locations_are_one_based_and_count_chars() {
        let f = file("é = 1\nab = 2\n");
        assert_eq!(f.at(0).line, 1);
        assert_eq!(f.at(0).col, 1);
        let two = f.text.find('2').unwrap();
        let at = f.at(two);
        assert_eq!((at.line, at.col), (2, 6));
        assert_eq!(at.to_string(), "x.toml:2:6");
    }
}
