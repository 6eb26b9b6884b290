//! The source's record of each stack's last cycle: one small JSON file per stack in the state
//! dir, written atomically, read by `stackclone-source status`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stackclone_common::coverage::{MountLine, Verdict};
use stackclone_proto::manifest::VOLUMES_DIR;

/// What `status --json` prints per stack.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackStatus {
    pub stack: String,
    pub target: String,
    /// Last committed generation (0: none yet).
    pub generation: u64,
    /// Unix seconds of the last commit.
    pub committed_at: Option<i64>,
    pub files: u64,
    pub bytes: u64,
    /// File data sent by the last successful cycle, in bytes on the wire.
    pub bytes_sent: u64,
    pub source_downtime_ms: Option<u64>,
    pub target_downtime_ms: Option<u64>,
    /// Unix seconds of the last attempt, successful or not.
    pub last_attempt_at: Option<i64>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// The stack's mounts as the last cycle judged them: what is replicated, ignored, only
    /// reported or refused (see `stackclone_common::coverage`).
    #[serde(default)]
    pub mounts: Vec<MountStatus>,
    /// `primary` (the target accepts this host's pushes, or none was tried yet), `superseded`
    /// (the stack was promoted on the target: this host is no longer its primary) or `diverged`
    /// (the target holds another history: a split brain).
    #[serde(default = "primary")]
    pub role: String,
    /// Since when (Unix seconds, this host's clock) the target has refused for that reason,
    /// and, when superseded, the promotion's time on the target.
    #[serde(default)]
    pub refused_since: Option<i64>,
    #[serde(default)]
    pub promoted_at: Option<i64>,
    /// `on_superseded = "stop"` stopped the local stack at this time (once per supersession).
    #[serde(default)]
    pub fenced_at: Option<i64>,
    /// The last push handed the stack over to the target (`push --fail-back`), at this time.
    #[serde(default)]
    pub handed_over_at: Option<i64>,
    /// The history this host's data belongs to (its lineage file), as the last cycle read it.
    #[serde(default)]
    pub history: Option<String>,
}

fn primary() -> String {
    "primary".into()
}

/// One mount of one service, judged, as `status` and `push --json` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStatus {
    pub service: String,
    /// Where it is mounted in the container.
    pub destination: String,
    /// `volume NAME`, `bind /host/path`, `tmpfs`.
    pub mount: String,
    /// `in-path`, `replicated`, `ignored`, `reported` or `refused`.
    pub verdict: String,
    /// The reason, or the tree a volume is replicated as.
    pub detail: Option<String>,
}

impl From<&MountLine> for MountStatus {
    fn from(l: &MountLine) -> Self {
        let detail = match &l.verdict {
            Verdict::InPath => None,
            Verdict::ExtraPath { path } => Some(format!("extra_paths: {}", path.display())),
            Verdict::Replicated { key } => Some(format!("{VOLUMES_DIR}/{key}")),
            Verdict::Ignored { reason } => Some(reason.clone()),
            Verdict::Reported { why } | Verdict::Refused { why } => Some(why.clone()),
        };
        MountStatus {
            service: l.service.clone(),
            destination: l.destination.clone(),
            mount: l.what.clone(),
            verdict: l.verdict.word().to_owned(),
            detail,
        }
    }
}

impl std::fmt::Display for MountStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<10} {}: {} at {}",
            self.verdict, self.service, self.mount, self.destination
        )?;
        match &self.detail {
            Some(d) => write!(f, " ({d})"),
            None => Ok(()),
        }
    }
}

fn file_of(dir: &Path, stack: &str) -> PathBuf {
    dir.join(format!("{stack}.status.json"))
}

/// Reads a stack's status; a missing file is a stack that never ran.
pub fn load(dir: &Path, stack: &str) -> std::io::Result<Option<StackStatus>> {
    match std::fs::read(file_of(dir, stack)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a stack's status atomically (temp file, fsync, rename).
pub fn store(dir: &Path, status: &StackStatus) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = file_of(dir, &status.stack);
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "web").unwrap(), None);
        let st = StackStatus {
            stack: "web".into(),
            generation: 4,
            last_error: Some("x".into()),
            ..Default::default()
        };
        store(dir.path(), &st).unwrap();
        assert_eq!(load(dir.path(), "web").unwrap(), Some(st));
    }
}
