//! Whether the standby's containers still match its compose definition, decided the way Compose
//! decides it.
//!
//! Compose labels every container it creates with `com.docker.compose.config-hash`, a hash of
//! the service's resolved configuration: image (Compose v1 includes the image's ID, so a tag
//! moved to another image counts too), environment after `.env` interpolation and `env_file:`,
//! command, mounts, ports, networks. `compose up` recreates exactly the containers whose label
//! differs from the hash of the definition on disk, and `compose config --hash '*'` prints that
//! hash for every service. Comparing the two ([`Definition::drift`]) therefore covers every file
//! Compose reads (the compose files, `.env`, `env_file:` files, `extends:` files) without this
//! crate knowing which files those are, and needs no record of its own: the containers are the
//! record, so a rollback, a container recreated by hand or a creation that failed half-way are
//! all seen as they are.
//!
//! Pure: the caller runs Compose and lists the containers; this module compares and reads
//! Compose's output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::StackContainer;
use crate::control::MissingImage;

/// The label Compose stores a service's config hash in (v1 and v2).
pub const CONFIG_HASH_LABEL: &str = "com.docker.compose.config-hash";

/// The files Compose reads by default at the top of its project directory; the override files
/// are read on top of the first ones.
const DEFAULT_FILES: [&str; 8] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
    "compose.override.yaml",
    "compose.override.yml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
];

/// The compose files in `dir` that Compose would read without `-f`. Empty means the stack's
/// containers were made some other way, and there is no definition to follow.
pub fn default_compose_files(dir: &Path) -> Vec<PathBuf> {
    DEFAULT_FILES
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| p.is_file())
        .collect()
}

/// A stack's compose definition as Compose sees it: each service's config hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Definition {
    hashes: BTreeMap<String, String>,
}

impl Definition {
    /// Reads the output of `compose config --hash '*'`: one `SERVICE HASH` line per service.
    pub fn parse(stdout: &str) -> Result<Definition, String> {
        let mut hashes = BTreeMap::new();
        for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (service, hash) = match line.split_whitespace().collect::<Vec<_>>()[..] {
                [service, hash] => (service, hash),
                _ => return Err(format!("expected `SERVICE HASH`, got {line:?}")),
            };
            if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{hash:?} (service {service}) is not a hash"));
            }
            if hashes.insert(service.to_owned(), hash.to_owned()).is_some() {
                return Err(format!("service {service} is listed twice"));
            }
        }
        if hashes.is_empty() {
            return Err("it lists no service".to_owned());
        }
        Ok(Definition { hashes })
    }

    /// The services it defines, by name.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.hashes.keys().map(String::as_str)
    }

    /// How `containers` (one project's) differ from this definition: what `compose up` would
    /// recreate, create and, with `--remove-orphans`, remove.
    pub fn drift(&self, containers: &[StackContainer]) -> Drift {
        let mut drift = Drift::default();
        for (service, hash) in &self.hashes {
            let mut of_service = containers
                .iter()
                .filter(|c| c.container.service == *service)
                .peekable();
            if of_service.peek().is_none() {
                drift.create.push(service.clone());
            } else if of_service.any(|c| c.config_hash.as_deref() != Some(hash.as_str())) {
                drift.recreate.push(service.clone());
            }
        }
        let orphans: BTreeSet<&str> = containers
            .iter()
            .map(|c| c.container.service.as_str())
            .filter(|s| !self.hashes.contains_key(*s))
            .collect();
        drift.remove = orphans.into_iter().map(str::to_owned).collect();
        drift
    }
}

/// How a project's containers differ from its definition, by service name (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Defined, but a container of it was made from another configuration.
    pub recreate: Vec<String>,
    /// Defined, with no container.
    pub create: Vec<String>,
    /// Containers of services the definition no longer has.
    pub remove: Vec<String>,
}

impl Drift {
    /// Whether the containers are exactly what the definition says.
    pub fn is_empty(&self) -> bool {
        self.recreate.is_empty() && self.create.is_empty() && self.remove.is_empty()
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("recreate", &self.recreate),
            ("create", &self.create),
            ("remove", &self.remove),
        ]
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(what, s)| format!("{what} {}", s.join(", ")))
        .collect();
        if parts.is_empty() {
            f.write_str("nothing to change")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// The images a failed `compose up` tried to pull, each once, in the order the output names
/// them: from Compose v1's progress line `Pulling SERVICE (IMAGE)...`, or the engine's own words
/// (`pull access denied for IMAGE,`, `manifest for IMAGE not found`), which name no service.
/// Candidates only: whether each is really missing is for the engine to say.
pub fn pulled_images(output: &str) -> Vec<MissingImage> {
    let mut out: Vec<MissingImage> = Vec::new();
    let mut add = |image: &str, service: Option<&str>| {
        let image = image.trim().trim_matches('"');
        if image.is_empty() || image.contains(char::is_whitespace) {
            return;
        }
        // The engine's words name the repository without its tag when Compose's line named
        // the whole reference: one image, not two.
        match out
            .iter_mut()
            .find(|p| p.image == image || repository(&p.image) == image)
        {
            Some(known) if known.service.is_none() => known.service = service.map(str::to_owned),
            Some(_) => {}
            None => out.push(MissingImage {
                image: image.to_owned(),
                service: service.map(str::to_owned),
            }),
        }
    };
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Pulling ")
            && let Some((service, rest)) = rest.split_once(" (")
            && let Some(image) = rest.strip_suffix(")...")
        {
            add(image, Some(service));
        }
        if let Some((_, rest)) = line.split_once("pull access denied for ")
            && let Some((image, _)) = rest.split_once(',')
        {
            add(image, None);
        }
        if let Some((_, rest)) = line.split_once("manifest for ")
            && let Some((image, _)) = rest.split_once(" not found")
        {
            add(image, None);
        }
    }
    out
}

/// `registry:5000/acme/app` of `registry:5000/acme/app:2` or `…/app@sha256:…`.
fn repository(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(repo, _)| repo);
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

/// What a failed pull said, without Compose's progress lines: the lines a person needs.
pub fn pull_failure(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Pulling ") && !l.ends_with("..."))
        .collect();
    lines[lines.len().saturating_sub(5)..].join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ContainerRef;

    fn container(service: &str, n: usize, hash: Option<&str>) -> StackContainer {
        StackContainer {
            health: None,
            container: ContainerRef {
                service: service.to_owned(),
                name: format!("p_{service}_{n}"),
                id: format!("{service}{n}"),
            },
            state: "exited".to_owned(),
            depends_on: None,
            config_hash: hash.map(str::to_owned),
        }
    }

    fn definition(lines: &str) -> Definition {
        Definition::parse(lines).expect("parses")
    }

    #[test]
    fn parse_reads_compose_v1_output_in_any_order() {
        let d = definition("db 6fc6\ncron 971e\n\n");
        assert_eq!(d.services().collect::<Vec<_>>(), ["cron", "db"]);
    }

    #[test]
    fn parse_refuses_what_is_not_a_service_and_hash_per_line() {
        for (bad, says) in [
            ("", "no service"),
            ("db", "SERVICE HASH"),
            ("db 6fc6 extra", "SERVICE HASH"),
            ("db not-hex", "not a hash"),
            ("db 6fc6\ndb 6fc6", "twice"),
            ("WARNING: The FOO variable is not set.", "SERVICE HASH"),
        ] {
            let err = Definition::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn containers_made_from_the_definition_have_no_drift() {
        let d = definition("db aa\nweb bb\n");
        let drift = d.drift(&[
            container("db", 1, Some("aa")),
            container("web", 1, Some("bb")),
            container("web", 2, Some("bb")),
        ]);
        assert!(drift.is_empty(), "{drift}");
        assert_eq!(drift.to_string(), "nothing to change");
    }

    #[test]
    fn a_changed_service_is_recreated_a_new_one_created_a_dropped_one_removed() {
        // db's image or environment changed, cache is new, old is gone from the compose file.
        let d = definition("db a2\nweb bb\ncache cc\n");
        let drift = d.drift(&[
            container("db", 1, Some("aa")),
            container("web", 1, Some("bb")),
            container("old", 1, Some("dd")),
            container("old", 2, Some("dd")),
        ]);
        assert_eq!(
            drift,
            Drift {
                recreate: vec!["db".into()],
                create: vec!["cache".into()],
                remove: vec!["old".into()],
            }
        );
        assert_eq!(drift.to_string(), "recreate db; create cache; remove old");
    }

    #[test]
    fn one_stale_container_of_a_scaled_service_or_one_without_a_hash_is_a_change() {
        let d = definition("web bb\ndb aa\n");
        let drift = d.drift(&[
            container("web", 1, Some("bb")),
            container("web", 2, Some("b0")),
            // Made by something other than Compose: Compose would recreate it too.
            container("db", 1, None),
        ]);
        assert_eq!(drift.recreate, ["db", "web"]);
        assert!(
            drift.create.is_empty() && drift.remove.is_empty(),
            "{drift}"
        );
    }

    #[test]
    fn no_container_at_all_is_every_service_to_create() {
        let drift = definition("b 1\na 2\n").drift(&[]);
        assert_eq!(drift.create, ["a", "b"]);
        assert!(!drift.is_empty());
    }

    #[test]
    fn pulled_images_come_from_compose_v1_lines_and_the_engine_s_words() {
        let v1 = "Pulling cron (stackclone-test/nope:7)...\n\
                  Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: no such host\n";
        assert_eq!(
            pulled_images(v1),
            [MissingImage {
                image: "stackclone-test/nope:7".into(),
                service: Some("cron".into()),
            }]
        );
        assert_eq!(
            pull_failure(v1),
            "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: no such host"
        );
        let denied = "Pulling web (acme/app:2)...\n\
                      ERROR: pull access denied for acme/app, repository does not exist or may require 'docker login'\n\
                      Error response from daemon: manifest for acme/other:1 not found: manifest unknown\n";
        assert_eq!(
            pulled_images(denied),
            [
                MissingImage {
                    image: "acme/app:2".into(),
                    service: Some("web".into()),
                },
                MissingImage {
                    image: "acme/other:1".into(),
                    service: None,
                },
            ]
        );
        assert_eq!(
            repository("registry:5000/acme/app"),
            "registry:5000/acme/app"
        );
        assert_eq!(
            repository("registry:5000/acme/app:2"),
            "registry:5000/acme/app"
        );
        assert_eq!(repository("acme/app@sha256:ab12"), "acme/app");
        // A failure that is not about pulling names no image.
        assert!(
            pulled_images("ERROR: for web  Cannot start service web: port is already allocated")
                .is_empty()
        );
    }

    #[test]
    fn default_compose_files_are_the_top_level_candidates_that_exist() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(default_compose_files(dir.path()).is_empty());
        std::fs::write(dir.path().join("docker-compose.yml"), "services: {}\n").expect("write");
        std::fs::write(dir.path().join("compose.override.yaml"), "").expect("write");
        std::fs::write(dir.path().join(".env"), "A=1\n").expect("write");
        std::fs::create_dir(dir.path().join("compose.yaml")).expect("a dir, not a file");
        assert_eq!(
            default_compose_files(dir.path()),
            [
                dir.path().join("docker-compose.yml"),
                dir.path().join("compose.override.yaml"),
            ]
        );
    }
}
