//! Which of a stack's mounts its generation covers: every mount of every container of the
//! Compose project, judged before a cycle stops anything.
//!
//! A compose stack keeps data where its compose file says, not only in the stack's `path`: most
//! real stacks keep their database in a named volume, some bind-mount a directory elsewhere on
//! the host. A standby that silently lacks those starts healthy on an empty volume and is found
//! out on the day of the failover. So the source lists the mounts ([`MountUse`], from the
//! Docker API) and [`classify`] gives each a [`Verdict`]:
//!
//! | mount | verdict |
//! |---|---|
//! | bind mount inside `path` | [`Verdict::InPath`] |
//! | bind mount inside one of `extra_paths` | [`Verdict::ExtraPath`]: grafted as `.stackclone-paths/<key>` |
//! | named volume, local driver | [`Verdict::Replicated`]: grafted into the generation as `.stackclone-volumes/<key>` |
//! | named volume whose data lies inside `path` | [`Verdict::InPath`] |
//! | anything listed in `ignore_mounts` | [`Verdict::Ignored`], with the reason the config gives |
//! | bind of a host file, socket or device; a host system directory (`/etc`, `/usr`, `/proc`, `/run`, …) | [`Verdict::Reported`] |
//! | anonymous volume, tmpfs | [`Verdict::Reported`] |
//! | other bind-mounted directory | [`Verdict::Refused`] |
//! | named volume with another driver | [`Verdict::Refused`] |
//!
//! A refused mount fails the cycle before anything is stopped ([`Coverage::check`]), with an
//! error naming the service, the mount and the two ways out.
//!
//! Decisions:
//! - **A volume's key** is its Compose key (`db` for `volumes: db:`, from the volume's
//!   `com.docker.compose.volume` label) when the volume belongs to this project, so the standby's
//!   project, whatever its name, finds it under its own `<project>_db`; a volume of another
//!   project or created outside Compose (`external: true`) keeps its Docker name.
//! - **Host files and system paths are reported, not refused.** `/etc/localtime`,
//!   `/var/run/docker.sock` or a device are the host's, not the stack's data: the standby has its
//!   own. Refusing them would make every such stack list them in `ignore_mounts` for nothing.
//! - **Read-only directory binds are refused like writable ones**: a media library mounted
//!   read-only is still data the standby needs to serve; the user decides.
//! - **`ignore_mounts` keys** match a volume by key or Docker name, and a bind mount by its host
//!   path or any directory above it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::is_dangerous_root;

/// One mount of one container, as the Docker API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountUse {
    /// The container's Compose service.
    pub service: String,
    /// Where it is mounted inside the container.
    pub destination: String,
    /// Mounted read-write.
    pub rw: bool,
    pub kind: MountKind,
}

/// What is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A host path.
    Bind {
        source: PathBuf,
    },
    /// A Docker volume.
    Volume {
        /// The Docker volume name (`nextcloud_db`).
        name: String,
        /// Its driver (`local`).
        driver: String,
        /// The Compose key (`db`) when the volume carries this project's Compose labels.
        compose_key: Option<String>,
        /// Where its data is on this host (`…/volumes/nextcloud_db/_data`).
        mountpoint: Option<PathBuf>,
    },
    Tmpfs,
    /// Another mount type (`npipe`, `cluster`, …).
    Other {
        typ: String,
    },
}

/// What a cycle does with one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its data is inside the stack's `path`, so it is in every generation already.
    InPath,
    /// Its data is inside this outside path of the stack's `extra_paths`, replicated as
    /// `.stackclone-paths/<key>`.
    ExtraPath { path: PathBuf },
    /// A named volume, replicated as the tree `.stackclone-volumes/<key>`.
    Replicated { key: String },
    /// Listed in `ignore_mounts`, with the config's reason.
    Ignored { reason: String },
    /// Not data the standby needs (tmpfs, an anonymous volume, a host file or system path):
    /// shown, not replicated, not fatal.
    Reported { why: String },
    /// Holds data the standby would not have: the cycle fails before anything stops.
    Refused { why: String },
}

impl Verdict {
    /// A short word for tables and JSON: `in-path`, `replicated`, `ignored`, `reported`,
    /// `refused`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::InPath => "in-path",
            Verdict::ExtraPath { .. } => "extra-path",
            Verdict::Replicated { .. } => "replicated",
            Verdict::Ignored { .. } => "ignored",
            Verdict::Reported { .. } => "reported",
            Verdict::Refused { .. } => "refused",
        }
    }
}

/// One mount, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountLine {
    pub service: String,
    pub destination: String,
    /// `volume nextcloud_db`, `bind /srv/media`, `tmpfs`.
    pub what: String,
    pub verdict: Verdict,
}

impl fmt::Display for MountLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} at {}: {}",
            self.service,
            self.what,
            self.destination,
            self.verdict.word()
        )?;
        match &self.verdict {
            Verdict::InPath => Ok(()),
            Verdict::ExtraPath { path } => write!(f, " (extra_paths: {})", path.display()),
            Verdict::Replicated { key } => {
                write!(f, " as {}/{key}", stackclone_proto::manifest::VOLUMES_DIR)
            }
            Verdict::Ignored { reason } => write!(f, " ({reason})"),
            Verdict::Reported { why } | Verdict::Refused { why } => write!(f, " ({why})"),
        }
    }
}

/// A named volume the generation carries: its key in the tree and where its data is here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeTree {
    pub key: String,
    /// The Docker volume name on this host.
    pub name: String,
    /// Its data directory on this host.
    pub dir: PathBuf,
}

/// Every mount of a stack, judged, and the volumes to replicate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Coverage {
    /// One line per (service, mount), sorted by service, then destination.
    pub lines: Vec<MountLine>,
    /// Sorted by key, each once.
    pub volumes: Vec<VolumeTree>,
}

/// A stack with a mount that holds data no generation would carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "stack `{stack}`: {} not replicated, so the standby would run without {}:\n{}\n\
     Either replicate it (list it in the stack file's `extra_paths`, put the data inside `path`, or \
     use a named volume, which is replicated), or add it to `ignore_mounts` in the stack file \
     with the reason, e.g. \
     ignore_mounts = {{ \"{example}\" = \"restored from the NAS\" }}",
    if refused.len() == 1 { "a mount that holds data is" } else { "mounts that hold data are" },
    if refused.len() == 1 { "it" } else { "them" },
    refused.iter().map(|l| format!("  - {l}")).collect::<Vec<_>>().join("\n")
)]
pub struct CoverageError {
    pub stack: String,
    pub refused: Vec<MountLine>,
    /// The first refused mount's `ignore_mounts` key, for the example.
    pub example: String,
}

impl Coverage {
    /// The refused mounts, if any, as the error a cycle fails with before it stops anything.
    pub fn check(&self, stack: &str) -> Result<(), CoverageError> {
        let refused: Vec<MountLine> = self
            .lines
            .iter()
            .filter(|l| matches!(l.verdict, Verdict::Refused { .. }))
            .cloned()
            .collect();
        let Some(first) = refused.first() else {
            return Ok(());
        };
        let example = first
            .what
            .split_once(' ')
            .map_or(first.what.as_str(), |(_, name)| name)
            .to_owned();
        Err(CoverageError {
            stack: stack.to_owned(),
            refused,
            example,
        })
    }
}

/// Judges `mounts` for a stack whose data dir is `path` (canonical) and whose outside paths are
/// `extra` (`extra_paths`), with the stack file's `ignore_mounts` (key → reason). Pure: the
/// caller lists the mounts and resolves `path`. Host paths are compared as given and after
/// [`std::fs::canonicalize`] where that succeeds.
pub fn classify(
    path: &Path,
    extra: &[PathBuf],
    mounts: &[MountUse],
    ignore: &BTreeMap<String, String>,
) -> Coverage {
    classify_with(path, extra, mounts, ignore, &|p: &Path| {
        let md = std::fs::metadata(p).ok();
        HostPath {
            canonical: std::fs::canonicalize(p).ok(),
            is_dir: md.map(|m| m.is_dir()),
        }
    })
}

/// What the host says about a path: its canonical form and whether it is a directory (`None`
/// when it does not exist).
#[derive(Debug, Clone, Default)]
pub struct HostPath {
    pub canonical: Option<PathBuf>,
    pub is_dir: Option<bool>,
}

/// [`classify`] with the host's file system behind `host` (tests give a table).
pub fn classify_with(
    path: &Path,
    extra: &[PathBuf],
    mounts: &[MountUse],
    ignore: &BTreeMap<String, String>,
    host: &dyn Fn(&Path) -> HostPath,
) -> Coverage {
    let inside =
        |p: &Path| p.starts_with(path) || host(p).canonical.is_some_and(|c| c.starts_with(path));
    let in_extra = |p: &Path| {
        let canonical = host(p).canonical;
        extra
            .iter()
            .find(|x| {
                p.starts_with(x)
                    || canonical.as_ref().is_some_and(|c| {
                        c.starts_with(x) || host(x).canonical.is_some_and(|xc| c.starts_with(xc))
                    })
            })
            .cloned()
    };
    let ignored_path = |p: &Path| {
        ignore.iter().find_map(|(k, reason)| {
            let k = Path::new(k);
            (k.is_absolute() && p.starts_with(k)).then(|| reason.clone())
        })
    };
    let mut lines = Vec::with_capacity(mounts.len());
    let mut volumes: BTreeMap<String, VolumeTree> = BTreeMap::new();
    for m in mounts {
        let (what, verdict) = match &m.kind {
            MountKind::Bind { source } => {
                let what = format!("bind {}", source.display());
                let facts = host(source);
                let verdict = if inside(source) {
                    Verdict::InPath
                } else if let Some(path) = in_extra(source) {
                    Verdict::ExtraPath { path }
                } else if let Some(reason) = ignored_path(source) {
                    Verdict::Ignored { reason }
                } else if facts.is_dir == Some(false) {
                    Verdict::Reported {
                        why: "a host file, socket or device; the standby uses its own".into(),
                    }
                } else if is_host_system_path(source)
                    || facts.canonical.as_deref().is_some_and(is_host_system_path)
                {
                    Verdict::Reported {
                        why: "a host system path; the standby uses its own".into(),
                    }
                } else if facts.is_dir.is_none() {
                    Verdict::Refused {
                        why: format!(
                            "outside the stack's path {}, and not visible to this agent (if it \
                             runs in a container, mount the stacks at the same paths as on the \
                             host)",
                            path.display()
                        ),
                    }
                } else {
                    Verdict::Refused {
                        why: format!("a directory outside the stack's path {}", path.display()),
                    }
                };
                (what, verdict)
            }
            MountKind::Volume {
                name,
                driver,
                compose_key,
                mountpoint,
            } => {
                let what = format!("volume {name}");
                let by_name = ignore.get(name.as_str());
                let by_key = compose_key.as_ref().and_then(|k| ignore.get(k.as_str()));
                let verdict = if let Some(reason) = by_name.or(by_key) {
                    Verdict::Ignored {
                        reason: reason.clone(),
                    }
                } else if compose_key.is_none() && is_anonymous(name) {
                    Verdict::Reported {
                        why: "an anonymous volume; the standby's starts empty".into(),
                    }
                } else if driver != "local" {
                    Verdict::Refused {
                        why: format!(
                            "volume driver `{driver}`: only `local` volumes can be replicated"
                        ),
                    }
                } else if mountpoint.as_deref().is_some_and(inside) {
                    Verdict::InPath
                } else if let Some(dir) = mountpoint {
                    let key = compose_key.clone().unwrap_or_else(|| name.clone());
                    match volumes.get(&key) {
                        Some(v) if v.name != *name => Verdict::Refused {
                            why: format!(
                                "volumes {} and {name} would both be replicated as `{key}`; \
                                 ignore one of them",
                                v.name
                            ),
                        },
                        _ => {
                            volumes.insert(
                                key.clone(),
                                VolumeTree {
                                    key: key.clone(),
                                    name: name.clone(),
                                    dir: dir.clone(),
                                },
                            );
                            Verdict::Replicated { key }
                        }
                    }
                } else {
                    Verdict::Refused {
                        why: "Docker does not say where its data is".into(),
                    }
                };
                (what, verdict)
            }
            MountKind::Tmpfs => (
                "tmpfs".to_owned(),
                Verdict::Reported {
                    why: "memory only".into(),
                },
            ),
            MountKind::Other { typ } => (
                typ.clone(),
                Verdict::Reported {
                    why: "not a file system stackclone can copy".into(),
                },
            ),
        };
        lines.push(MountLine {
            service: m.service.clone(),
            destination: m.destination.clone(),
            what,
            verdict,
        });
    }
    lines.sort_by(|a, b| (&a.service, &a.destination).cmp(&(&b.service, &b.destination)));
    lines.dedup();
    Coverage {
        lines,
        volumes: volumes.into_values().collect(),
    }
}

/// Docker names an anonymous volume with 64 hex digits.
fn is_anonymous(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A host path that is the host's own, not a stack's data: the dangerous roots of the config
/// check plus the kernel's and run-time file systems.
fn is_host_system_path(p: &Path) -> bool {
    is_dangerous_root(p)
        || [
            "/proc",
            "/sys",
            "/dev",
            "/run",
            "/var/run",
            "/var/lib/docker",
        ]
        .iter()
        .any(|root| p.starts_with(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(service: &str, source: &str, dest: &str) -> MountUse {
        MountUse {
            service: service.into(),
            destination: dest.into(),
            rw: true,
            kind: MountKind::Bind {
                source: source.into(),
            },
        }
    }

    fn volume(service: &str, name: &str, key: Option<&str>, driver: &str) -> MountUse {
        MountUse {
            service: service.into(),
            destination: "/data".into(),
            rw: true,
            kind: MountKind::Volume {
                name: name.into(),
                driver: driver.into(),
                compose_key: key.map(Into::into),
                mountpoint: Some(format!("/var/lib/docker/volumes/{name}/_data").into()),
            },
        }
    }

    /// Directories unless the name says file; nothing is a symlink.
    fn host(p: &Path) -> HostPath {
        HostPath {
            canonical: Some(p.to_path_buf()),
            is_dir: Some(!p.to_string_lossy().contains("file")),
        }
    }

    fn run(mounts: &[MountUse], ignore: &[(&str, &str)]) -> Coverage {
        let ignore = ignore
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        classify_with(
            Path::new("/srv/stacks/app"),
            &[PathBuf::from("/srv/photos")],
            mounts,
            &ignore,
            &host,
        )
    }

    fn verdicts(c: &Coverage) -> Vec<(&str, &str)> {
        c.lines
            .iter()
            .map(|l| (l.what.as_str(), l.verdict.word()))
            .collect()
    }

    #[test]
    fn each_kind_of_mount_gets_its_verdict() {
        let anonymous = format!("volume {}", "ab".repeat(32));
        let c = run(
            &[
                bind("app", "/srv/stacks/app/config", "/config"),
                bind("app", "/srv/media", "/media"),
                bind("app", "/etc/localtime-file", "/etc/localtime"),
                bind("app", "/var/run/docker.sock", "/var/run/docker.sock"),
                volume("db", "app_db", Some("db"), "local"),
                volume("db", &"ab".repeat(32), None, "local"),
                volume("db", "app_nfs", Some("nfs"), "nfs"),
                MountUse {
                    service: "web".into(),
                    destination: "/tmp".into(),
                    rw: true,
                    kind: MountKind::Tmpfs,
                },
            ],
            &[],
        );
        assert_eq!(
            verdicts(&c),
            // By service, then destination; stable otherwise.
            vec![
                ("bind /srv/stacks/app/config", "in-path"),
                ("bind /etc/localtime-file", "reported"),
                ("bind /srv/media", "refused"),
                ("bind /var/run/docker.sock", "reported"),
                ("volume app_db", "replicated"),
                (anonymous.as_str(), "reported"),
                ("volume app_nfs", "refused"),
                ("tmpfs", "reported"),
            ]
        );
        assert_eq!(
            c.volumes,
            vec![VolumeTree {
                key: "db".into(),
                name: "app_db".into(),
                dir: "/var/lib/docker/volumes/app_db/_data".into(),
            }]
        );
    }

    #[test]
    fn a_bind_source_the_agent_cannot_see_says_so() {
        let c = classify_with(
            Path::new("/srv/stacks/app"),
            &[],
            &[bind("app", "/host/only/data", "/data")],
            &BTreeMap::new(),
            &|_: &Path| HostPath::default(),
        );
        let err = c.check("app").unwrap_err().to_string();
        assert!(err.contains("not visible to this agent"), "{err}");
    }

    #[test]
    fn refusal_names_service_mount_and_both_ways_out() {
        let c = run(&[bind("media", "/srv/media", "/media")], &[]);
        let err = c.check("app").unwrap_err().to_string();
        assert!(err.contains("stack `app`"), "{err}");
        assert!(
            err.contains("media: bind /srv/media at /media: refused"),
            "{err}"
        );
        assert!(err.contains("named volume"), "{err}");
        assert!(err.contains("ignore_mounts = { \"/srv/media\" = "), "{err}");
    }

    #[test]
    fn ignore_mounts_matches_paths_below_and_volumes_by_key_or_name() {
        let c = run(
            &[
                bind("app", "/srv/media/photos", "/photos"),
                volume("app", "app_cache", Some("cache"), "local"),
                volume("app", "app_nfs", Some("nfs"), "nfs"),
            ],
            &[
                ("/srv/media", "on the NAS"),
                ("cache", "rebuilt on start"),
                ("app_nfs", "the NAS's"),
            ],
        );
        assert_eq!(
            verdicts(&c),
            vec![
                ("volume app_cache", "ignored"),
                ("volume app_nfs", "ignored"),
                ("bind /srv/media/photos", "ignored"),
            ]
        );
        assert!(c.volumes.is_empty());
        assert!(c.check("app").is_ok());
        assert_eq!(
            c.lines[0].verdict,
            Verdict::Ignored {
                reason: "rebuilt on start".into()
            }
        );
    }

    #[test]
    fn a_volume_used_by_two_services_is_one_tree_and_external_volumes_keep_their_name() {
        let c = run(
            &[
                volume("app", "app_db", Some("db"), "local"),
                volume("backup", "app_db", Some("db"), "local"),
                volume("app", "shared_certs", None, "local"),
            ],
            &[],
        );
        let keys: Vec<&str> = c.volumes.iter().map(|v| v.key.as_str()).collect();
        assert_eq!(keys, ["db", "shared_certs"]);
        assert!(c.check("app").is_ok());
    }

    #[test]
    fn a_bind_mount_inside_an_extra_path_is_replicated_with_it() {
        let c = run(&[bind("app", "/srv/photos/2026", "/photos")], &[]);
        assert_eq!(verdicts(&c), vec![("bind /srv/photos/2026", "extra-path")]);
        assert!(c.check("app").is_ok());
    }

    #[test]
    fn two_volumes_on_one_key_are_refused() {
        let c = run(
            &[
                volume("app", "app_db", Some("db"), "local"),
                volume("app", "db", None, "local"),
            ],
            &[],
        );
        assert!(c.check("app").is_err());
        assert_eq!(c.volumes.len(), 1);
    }

    #[test]
    fn a_volume_whose_data_is_inside_path_is_covered_by_path() {
        let mut m = volume("app", "standby_db", Some("db"), "local");
        if let MountKind::Volume { mountpoint, .. } = &mut m.kind {
            *mountpoint = Some("/srv/stacks/app/.stackclone-volumes/db".into());
        }
        let c = run(&[m], &[]);
        assert_eq!(verdicts(&c), vec![("volume standby_db", "in-path")]);
        assert!(c.volumes.is_empty());
    }
}
