//! A stack's mounts, as the Docker API reports them, and the standby's named volumes.
//!
//! [`ComposeStack::mounts`] lists every mount of every container of the project for
//! [`coverage`](crate::coverage) to judge; [`ComposeStack::adopt_volume`] makes the standby's
//! volume of a key point at the tree the target committed (see its docs for why a symlink).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::VolumeCreateRequest;
use tracing::{info, warn};

use super::{ComposeStack, PROJECT_LABEL};
use crate::control::DockerError;
use crate::coverage::{MountKind, MountUse};

/// The label Compose puts on a volume it made: the volume's key in the compose file.
pub const VOLUME_LABEL: &str = "com.docker.compose.volume";
/// The label Compose puts on what it made: its version.
pub const VERSION_LABEL: &str = "com.docker.compose.version";

/// What [`ComposeStack::adopt_volume`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopted {
    /// The volume already pointed at the tree.
    Already,
    /// The volume was created (or its empty data dir replaced) and now points at the tree.
    Linked,
    /// The volume held data of its own, which was moved aside to `kept` first.
    Replaced { kept: PathBuf },
}

impl ComposeStack {
    /// Every mount of every container of the project (one-off containers left out), one entry
    /// per container and mount; a volume's labels and data dir come from inspecting it.
    pub async fn mounts(&self) -> Result<Vec<MountUse>, DockerError> {
        let listed = self.listed().await?;
        let mut volumes: HashMap<String, (String, Option<String>, Option<PathBuf>)> =
            HashMap::new();
        let mut found = Vec::new();
        for (service, c) in listed {
            for m in c.mounts.unwrap_or_default() {
                let destination = m.destination.clone().unwrap_or_default();
                let kind = match m.typ.as_deref() {
                    Some("bind") => MountKind::Bind {
                        source: PathBuf::from(m.source.clone().unwrap_or_default()),
                    },
                    Some("volume") => {
                        let name = m.name.clone().unwrap_or_default();
                        if !volumes.contains_key(&name) {
                            let v =
                                self.docker.inspect_volume(&name).await.map_err(|e| {
                                    self.api(&format!("inspecting volume {name}"), e)
                                })?;
                            let key = (v.labels.get(PROJECT_LABEL) == Some(&self.config.project))
                                .then(|| v.labels.get(VOLUME_LABEL).cloned())
                                .flatten();
                            let mountpoint =
                                (!v.mountpoint.is_empty()).then(|| PathBuf::from(&v.mountpoint));
                            volumes.insert(name.clone(), (v.driver, key, mountpoint));
                        }
                        let (driver, compose_key, mountpoint) = volumes[&name].clone();
                        MountKind::Volume {
                            name,
                            driver,
                            compose_key,
                            mountpoint,
                        }
                    }
                    Some("tmpfs") => MountKind::Tmpfs,
                    other => MountKind::Other {
                        typ: other.unwrap_or("unknown").to_owned(),
                    },
                };
                found.push(MountUse {
                    service: service.clone(),
                    destination,
                    rw: m.rw.unwrap_or(true),
                    kind,
                });
            }
        }
        Ok(found)
    }

    /// Makes the volume `name` the standby's volume of Compose key `key`, with its data at
    /// `tree` (a directory the target committed, inside its live dir).
    ///
    /// The volume is created if missing, with the labels Compose gives its own volumes (so
    /// `up` adopts it without a warning), and its data directory (`Mountpoint`,
    /// `…/volumes/NAME/_data`) becomes a symlink to `tree`. Docker mounts a local volume by
    /// bind-mounting its data directory, which follows the link, so the containers see the
    /// committed tree itself: the volume needs no copy, and it is committed, rolled back and
    /// verified with the rest of the generation in one journal. Why not a volume with
    /// `driver_opts: {type: none, o: bind, device: …}`: Compose v1 refuses an existing volume
    /// whose driver options differ from the compose file's ("Configuration for volume … specifies
    /// driver_opt …"), so a user's own `docker-compose up` would fail on the standby. As a
    /// side effect `docker volume rm` (and `down -v`) refuses to delete such a volume ("outside
    /// of the local volume root"): the replicated data cannot be lost by a stray `down -v`.
    ///
    /// A data directory that already holds something (the standby ran before this volume was
    /// replicated and made its own, empty database) is moved aside to `_data.before-stackclone`
    /// (or `…-2`, …), never deleted, and the result says where. Call it with the standby's
    /// containers stopped: a running container keeps the directory it mounted.
    pub async fn adopt_volume(
        &self,
        key: &str,
        name: &str,
        tree: &Path,
    ) -> Result<Adopted, DockerError> {
        let fs_err = |what: &str, path: &Path, e: std::io::Error| DockerError::Volume {
            project: self.config.project.clone(),
            what: format!("standby volume {name}"),
            reason: format!("{what} {}: {e}", path.display()),
        };
        let volume = match self.docker.inspect_volume(name).await {
            Ok(v) => v,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                let labels = HashMap::from([
                    (PROJECT_LABEL.to_owned(), self.config.project.clone()),
                    (VOLUME_LABEL.to_owned(), key.to_owned()),
                    (VERSION_LABEL.to_owned(), "stackclone".to_owned()),
                ]);
                let request = VolumeCreateRequest {
                    name: Some(name.to_owned()),
                    driver: Some("local".to_owned()),
                    labels: Some(labels),
                    ..VolumeCreateRequest::default()
                };
                self.docker
                    .create_volume(request)
                    .await
                    .map_err(|e| self.api(&format!("creating volume {name}"), e))?
            }
            Err(e) => return Err(self.api(&format!("inspecting volume {name}"), e)),
        };
        if let Some(owner) = volume.labels.get(PROJECT_LABEL)
            && *owner != self.config.project
        {
            return Err(DockerError::Volume {
                project: self.config.project.clone(),
                what: format!("standby volume {name}"),
                reason: format!(
                    "it belongs to the Compose project `{owner}`; stackclone only points this \
                     project's volumes at the replicated data"
                ),
            });
        }
        if volume.driver != "local" || volume.mountpoint.is_empty() {
            return Err(DockerError::Volume {
                project: self.config.project.clone(),
                what: format!("standby volume {name}"),
                reason: format!(
                    "it exists with driver `{}`; only a `local` volume can hold the replicated \
                     data (remove it, and stackclone creates it at the next commit)",
                    volume.driver
                ),
            });
        }
        let data = PathBuf::from(&volume.mountpoint);
        let md = std::fs::symlink_metadata(&data);
        if md.as_ref().is_ok_and(|m| m.file_type().is_symlink()) {
            let points = std::fs::read_link(&data).map_err(|e| fs_err("reading", &data, e))?;
            if points == tree {
                return Ok(Adopted::Already);
            }
            std::fs::remove_file(&data).map_err(|e| fs_err("removing the old link", &data, e))?;
            std::os::unix::fs::symlink(tree, &data).map_err(|e| fs_err("linking", &data, e))?;
            info!(project = %self.config.project, volume = name, tree = %tree.display(),
                "standby volume re-pointed at the replicated tree");
            return Ok(Adopted::Linked);
        }
        let mut adopted = Adopted::Linked;
        match md {
            Ok(m) if m.is_dir() => {
                if std::fs::remove_dir(&data).is_err() {
                    let kept = free_name(&data);
                    std::fs::rename(&data, &kept).map_err(|e| fs_err("moving aside", &data, e))?;
                    warn!(project = %self.config.project, volume = name, kept = %kept.display(),
                        "the standby's volume held data of its own; moved aside, not deleted");
                    adopted = Adopted::Replaced { kept };
                }
            }
            Ok(_) => {
                return Err(fs_err(
                    "expected a directory or a link at",
                    &data,
                    std::io::Error::other("something else is there"),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fs_err("looking at", &data, e)),
        }
        std::os::unix::fs::symlink(tree, &data).map_err(|e| fs_err("linking", &data, e))?;
        info!(project = %self.config.project, volume = name, tree = %tree.display(),
            "standby volume points at the replicated tree");
        Ok(adopted)
    }
}

/// What [`ComposeStack::import_volumes`] did with one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub volume: String,
    /// The tree in the live dir its data now lives in.
    pub tree: PathBuf,
}

impl ComposeStack {
    /// Brings the data of this host's own volumes into the live dir, before a cycle scans it:
    /// for each volume of the compose definition that exists, belongs to this project, and
    /// holds a real directory (not yet a link to a replicated tree) while the live dir has no
    /// tree for its key, the directory is *renamed* to `<volume_trees>/<key>` and the volume's
    /// data dir becomes a link to it, as [`adopt_volume`](Self::adopt_volume) would make it.
    ///
    /// Why: the host that receives a fail-back (the old primary) has the stack's data in real
    /// volumes. Scanned as part of the live dir, that data is the basis of the transfer's
    /// deltas (only what diverged crosses) and part of the tree the commit replaces, which it
    /// keeps as a generation that `rollback` restores. Without this the volume would be moved
    /// aside at the commit and arrive whole. A rename moves nothing on disk, and a container
    /// that has the volume mounted keeps writing into the same directory. A volume on another
    /// file system than the live dir is left where it is (the commit moves it aside, as
    /// before), with a warning.
    pub async fn import_volumes(&self) -> Result<Vec<Imported>, DockerError> {
        let Some(trees) = &self.config.volume_trees else {
            return Ok(Vec::new());
        };
        let definition = match self.read_compose_file().await {
            Ok(file) => file,
            // Nothing to import from (a first push into an empty dir has no compose file yet).
            Err(_) => return Ok(Vec::new()),
        };
        let fs_err = |name: &str, what: &str, path: &Path, e: std::io::Error| DockerError::Volume {
            project: self.config.project.clone(),
            what: format!("volume {name}"),
            reason: format!("{what} {}: {e}", path.display()),
        };
        let mut done = Vec::new();
        for key in definition.volumes.keys() {
            let tree = trees.join(key);
            if std::fs::symlink_metadata(&tree).is_ok() {
                continue;
            }
            let Some(name) = self.standby_volume_name(Some(&definition), key)? else {
                continue;
            };
            let volume = match self.docker.inspect_volume(&name).await {
                Ok(v) => v,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => continue,
                Err(e) => return Err(self.api(&format!("inspecting volume {name}"), e)),
            };
            let ours = volume.labels.get(PROJECT_LABEL) == Some(&self.config.project);
            if !ours || volume.driver != "local" || volume.mountpoint.is_empty() {
                continue;
            }
            let data = PathBuf::from(&volume.mountpoint);
            match std::fs::symlink_metadata(&data) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            std::fs::create_dir_all(trees).map_err(|e| fs_err(&name, "creating", trees, e))?;
            // The link names the tree as `adopt_volume` does: by its canonical path.
            let tree = std::fs::canonicalize(trees)
                .map_err(|e| fs_err(&name, "resolving", trees, e))?
                .join(key);
            match std::fs::rename(&data, &tree) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(18) => {
                    warn!(project = %self.config.project, volume = %name, tree = %tree.display(),
                        "the volume is on another file system than the live dir: its data is \
                         not used as the basis of this transfer, and the commit moves it aside");
                    continue;
                }
                Err(e) => return Err(fs_err(&name, "moving into the live dir", &data, e)),
            }
            if let Err(e) = std::os::unix::fs::symlink(&tree, &data) {
                // Put it back: the volume must not be left without its data.
                let _ = std::fs::rename(&tree, &data);
                return Err(fs_err(&name, "linking", &data, e));
            }
            info!(project = %self.config.project, volume = %name, tree = %tree.display(),
                "this host's volume moved into the live dir: the transfer uses it as its basis, \
                 and the commit keeps what it replaces");
            done.push(Imported { volume: name, tree });
        }
        Ok(done)
    }

    /// Points the standby's volume of every tree in [`ComposeConfig::volume_trees`] at that
    /// tree ([`adopt_volume`](Self::adopt_volume)); nothing without volume trees. Called before
    /// the standby is brought up or created, so a container never mounts an empty volume where
    /// the generation has data.
    ///
    /// [`ComposeConfig::volume_trees`]: super::ComposeConfig::volume_trees
    pub async fn adopt_volumes(&self) -> Result<Vec<(String, Adopted)>, DockerError> {
        let mut done = self.link_extra_paths()?;
        let Some(dir) = &self.config.volume_trees else {
            return Ok(done);
        };
        let read_err = |e: std::io::Error| DockerError::Volume {
            project: self.config.project.clone(),
            what: "standby volumes".to_owned(),
            reason: format!("reading {}: {e}", dir.display()),
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
            Err(e) => return Err(read_err(e)),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(read_err)?;
            // Trees are directories the commit made; anything else is not a volume's.
            if entry.file_type().map_err(read_err)?.is_dir()
                && let Some(key) = entry.file_name().to_str()
            {
                keys.push(key.to_owned());
            }
        }
        keys.sort();
        let canonical = std::fs::canonicalize(dir).map_err(read_err)?;
        let definition = match self.read_compose_file().await {
            Ok(file) => Some(file),
            Err(e) => {
                warn!(project = %self.config.project, error = %e,
                    "cannot read the compose definition; naming the standby's volumes <project>_<key>");
                None
            }
        };
        for key in keys {
            // Docker's rule for volume names; anything else is not a volume's tree.
            let valid = key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid {
                return Err(DockerError::Volume {
                    project: self.config.project.clone(),
                    what: format!("standby volume {key:?}"),
                    reason: "not a valid volume name".to_owned(),
                });
            }
            let Some(name) = self.standby_volume_name(definition.as_ref(), &key)? else {
                warn!(project = %self.config.project, key,
                    "a replicated volume is not in the standby's compose definition; its data \
                     stays in the live dir, attached to nothing");
                continue;
            };
            let adopted = self
                .adopt_volume(&key, &name, &canonical.join(&key))
                .await?;
            done.push((name, adopted));
        }
        Ok(done)
    }

    /// Makes each outside path the generation carries (a tree in
    /// [`ComposeConfig::extra_trees`]) a symlink, at the place this host's stack file maps it
    /// to, to its tree: the standby's containers bind-mount that place and see the committed
    /// tree. A tree the stack file has no place for is an error that names the line to add: the
    /// standby would run without that data. What was at the place is moved aside (an empty
    /// directory is removed), never deleted; a missing parent is created.
    ///
    /// [`ComposeConfig::extra_trees`]: super::ComposeConfig::extra_trees
    fn link_extra_paths(&self) -> Result<Vec<(String, Adopted)>, DockerError> {
        let Some((dir, places)) = &self.config.extra_trees else {
            return Ok(Vec::new());
        };
        let err = |what: &str, reason: String| DockerError::Volume {
            project: self.config.project.clone(),
            what: format!("outside path {what}"),
            reason,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err("*", format!("reading {}: {e}", dir.display()))),
        };
        let canonical = std::fs::canonicalize(dir)
            .map_err(|e| err("*", format!("resolving {}: {e}", dir.display())))?;
        let mut keys: Vec<String> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| err("*", format!("reading {}: {e}", dir.display())))?;
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && let Some(key) = entry.file_name().to_str()
            {
                keys.push(key.to_owned());
            }
        }
        keys.sort();
        let mut done = Vec::new();
        for key in keys {
            let Some(source_path) = stackclone_proto::manifest::extra_path_of_key(&key) else {
                continue;
            };
            let Some(place) = places.get(&source_path) else {
                return Err(err(
                    &source_path,
                    format!(
                        "the primary replicates its outside path {source_path}, but this \
                         target's stack file does not say where it goes; add \
                         extra_paths = {{ \"{source_path}\" = \"/the/path/the/standby/mounts\" }} \
                         (often the same path)"
                    ),
                ));
            };
            let tree = canonical.join(&key);
            let adopted = link_place(place, &tree)
                .map_err(|e| err(&source_path, format!("{}: {e}", place.display())))?;
            if adopted != Adopted::Already {
                info!(project = %self.config.project, path = %place.display(),
                    tree = %tree.display(), "outside path linked to the replicated tree");
            }
            done.push((place.display().to_string(), adopted));
        }
        Ok(done)
    }

    /// The Docker name the standby's definition gives the volume tree `key`: the volume of
    /// that key (its `name:`, else `<project>_<key>`), or the external or named volume whose
    /// Docker name is `key` (the source keys a volume that is not its project's own by its
    /// Docker name). `None` if the definition has no such volume; `<project>_<key>` when the
    /// definition could not be read. Under `compose_policy = "strict"` a name outside the
    /// project (`name:`, `external`) is refused: the synced compose file must not be able to
    /// point another stack's volume at this stack's data.
    fn standby_volume_name(
        &self,
        definition: Option<&crate::compose_file::ComposeFile>,
        key: &str,
    ) -> Result<Option<String>, DockerError> {
        let project = &self.config.project;
        let scoped = format!("{project}_{key}");
        let Some(definition) = definition else {
            return Ok(Some(scoped));
        };
        let name = match definition.volume_name(project, key) {
            Some(name) => name,
            None => match definition
                .volumes
                .iter()
                .find(|(k, v)| v.docker_name(project, k) == key)
            {
                Some(_) => key.to_owned(),
                None => return Ok(None),
            },
        };
        if name != scoped && self.config.strict_root.is_some() {
            return Err(DockerError::Volume {
                project: project.clone(),
                what: format!("standby volume {name}"),
                reason: format!(
                    "compose_policy = \"strict\" only lets the standby's data into volumes of \
                     its own project ({scoped}); the compose file names {name}"
                ),
            });
        }
        Ok(Some(name))
    }
}

/// Makes `place` a symlink to `tree`: already one, re-pointed, created (parents too), or
/// replacing an empty directory; anything else there is moved aside first.
fn link_place(place: &Path, tree: &Path) -> std::io::Result<Adopted> {
    let mut adopted = Adopted::Linked;
    match std::fs::symlink_metadata(place) {
        Ok(m) if m.file_type().is_symlink() => {
            if std::fs::read_link(place)? == tree {
                return Ok(Adopted::Already);
            }
            std::fs::remove_file(place)?;
        }
        Ok(m) if m.is_dir() && std::fs::remove_dir(place).is_ok() => {}
        Ok(_) => {
            let kept = free_name(place);
            std::fs::rename(place, &kept)?;
            warn!(path = %place.display(), kept = %kept.display(),
                "an outside path held data of its own; moved aside, not deleted");
            adopted = Adopted::Replaced { kept };
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = place.parent() {
                std::fs::create_dir_all(parent)?;
            }
        }
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(tree, place)?;
    Ok(adopted)
}

/// `DIR.before-stackclone`, or with `-2`, `-3`, … the first that does not exist.
fn free_name(data: &Path) -> PathBuf {
    let base = format!("{}.before-stackclone", data.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 2;
    while std::fs::symlink_metadata(&candidate).is_ok() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose_file::ComposeFile;
    use crate::docker::ComposeConfig;

    fn stack(strict: bool) -> ComposeStack {
        let docker = bollard::Docker::connect_with_local_defaults().unwrap();
        let mut config = ComposeConfig::new("standby", "/nonexistent");
        if strict {
            config.strict_root = Some("/nonexistent".into());
        }
        ComposeStack::with_docker(docker, config)
    }

    #[test]
    fn the_standbys_volume_names_come_from_its_definition() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("docker-compose.yml"),
            "services: {}\nvolumes:\n  db: {}\n  named: {name: fixed_name}\n  \
             certs: {external: true, name: shared_certs}\n  ext: {external: true}\n",
        )
        .unwrap();
        let file = ComposeFile::load(t.path(), &Default::default()).unwrap();
        let s = stack(false);
        let name = |key| s.standby_volume_name(Some(&file), key).unwrap();
        assert_eq!(name("db").as_deref(), Some("standby_db"));
        assert_eq!(name("named").as_deref(), Some("fixed_name"));
        // The source keys a volume that is not its project's own by its Docker name.
        assert_eq!(name("shared_certs").as_deref(), Some("shared_certs"));
        assert_eq!(name("ext").as_deref(), Some("ext"));
        assert_eq!(name("unknown"), None);
        assert_eq!(
            s.standby_volume_name(None, "x").unwrap().as_deref(),
            Some("standby_x")
        );
        let strict = stack(true);
        assert!(strict.standby_volume_name(Some(&file), "named").is_err());
        assert_eq!(
            strict
                .standby_volume_name(Some(&file), "db")
                .unwrap()
                .as_deref(),
            Some("standby_db")
        );
    }

    #[test]
    fn a_place_becomes_a_link_and_what_was_there_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("live/.stackclone-paths/srv%2Fmedia");
        std::fs::create_dir_all(&tree).unwrap();
        // Missing, parents too: created.
        let place = t.path().join("srv/media");
        assert_eq!(link_place(&place, &tree).unwrap(), Adopted::Linked);
        assert_eq!(std::fs::read_link(&place).unwrap(), tree);
        assert_eq!(link_place(&place, &tree).unwrap(), Adopted::Already);
        // A directory with data: moved aside, then linked.
        std::fs::remove_file(&place).unwrap();
        std::fs::create_dir(&place).unwrap();
        std::fs::write(place.join("own.jpg"), "mine").unwrap();
        let Adopted::Replaced { kept } = link_place(&place, &tree).unwrap() else {
            panic!("not replaced");
        };
        assert_eq!(
            std::fs::read_to_string(kept.join("own.jpg")).unwrap(),
            "mine"
        );
        assert_eq!(std::fs::read_link(&place).unwrap(), tree);
        // A link elsewhere: re-pointed; an empty directory: replaced without a trace.
        let other = t.path().join("other");
        std::fs::remove_file(&place).unwrap();
        std::os::unix::fs::symlink(&other, &place).unwrap();
        assert_eq!(link_place(&place, &tree).unwrap(), Adopted::Linked);
        std::fs::remove_file(&place).unwrap();
        std::fs::create_dir(&place).unwrap();
        assert_eq!(link_place(&place, &tree).unwrap(), Adopted::Linked);
        assert_eq!(
            free_name(&place),
            kept.with_file_name("media.before-stackclone-2")
        );
    }
}
