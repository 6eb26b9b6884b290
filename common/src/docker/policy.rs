//! `compose_policy = "strict"`: what a target lets the containers of a stack it receives do.
//!
//! The compose file of a stack is part of the data the source sends, and the target runs it.
//! So an allowed source of a compose stack is, in effect, root on the standby: its compose file
//! may bind-mount `/`, run a privileged container, or join the host's network and PID
//! namespaces. With `compose_policy = "strict"` the target creates the containers without
//! starting them (`up --no-start`), reads what Docker really made of the definition (inspect:
//! the same facts whatever Compose version wrote them), and starts nothing if any container
//! - is privileged, or has capabilities added, devices, device requests or cgroup rules;
//! - uses the host's network, PID, IPC, UTS or user namespace;
//! - disables AppArmor, seccomp or SELinux labelling (`security_opt: …unconfined` / `label=disable`);
//! - bind-mounts a host path outside the stack's own directory.
//!
//! Named volumes and tmpfs mounts are allowed. The default, `"trusted"`, checks nothing: the
//! README's trust section says what that means.

use std::path::Path;

use bollard::models::ContainerInspectResponse;

/// Why the container `c` may not start under the strict policy, for a stack whose directory is
/// `root` (absolute, symlinks resolved); empty if it may.
pub fn violations(c: &ContainerInspectResponse, root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(h) = &c.host_config {
        if h.privileged == Some(true) {
            out.push("privileged".to_owned());
        }
        if let Some(caps) = h.cap_add.as_ref().filter(|c| !c.is_empty()) {
            out.push(format!("added capabilities {}", caps.join(", ")));
        }
        if h.devices.as_ref().is_some_and(|d| !d.is_empty())
            || h.device_requests.as_ref().is_some_and(|d| !d.is_empty())
            || h.device_cgroup_rules
                .as_ref()
                .is_some_and(|d| !d.is_empty())
        {
            out.push("host devices".to_owned());
        }
        for (what, mode) in [
            ("network", &h.network_mode),
            ("PID", &h.pid_mode),
            ("IPC", &h.ipc_mode),
            ("UTS", &h.uts_mode),
            ("user", &h.userns_mode),
        ] {
            if mode.as_deref() == Some("host") {
                out.push(format!("the host's {what} namespace"));
            }
        }
        for opt in h.security_opt.iter().flatten() {
            let o = opt.to_ascii_lowercase();
            if o.contains("unconfined") || o == "label=disable" || o == "label:disable" {
                out.push(format!("security_opt {opt}"));
            }
        }
    }
    for m in c.mounts.iter().flatten() {
        if m.typ.as_deref() != Some("bind") {
            continue;
        }
        let source = m.source.as_deref().unwrap_or("");
        if !inside(Path::new(source), root) {
            out.push(format!(
                "bind mount of {source} (outside the stack's directory {})",
                root.display()
            ));
        }
    }
    out
}

/// Whether `path` is `root` or below it, `..` counted lexically (Docker reports sources as
/// resolved absolute paths).
fn inside(path: &Path, root: &Path) -> bool {
    use std::path::Component;
    if !path.is_absolute() {
        return false;
    }
    let mut clean = std::path::PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::ParentDir => {
                clean.pop();
            }
            _ => {}
        }
    }
    clean.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{HostConfig, MountPoint};

    fn container(host: HostConfig, binds: &[(&str, &str)]) -> ContainerInspectResponse {
        ContainerInspectResponse {
            host_config: Some(host),
            mounts: Some(
                binds
                    .iter()
                    .map(|(typ, source)| MountPoint {
                        typ: Some((*typ).to_owned()),
                        source: Some((*source).to_owned()),
                        ..MountPoint::default()
                    })
                    .collect(),
            ),
            ..ContainerInspectResponse::default()
        }
    }

    #[test]
    fn a_plain_container_with_its_own_binds_and_volumes_passes() {
        let root = Path::new("/srv/stacks/web");
        let c = container(
            HostConfig {
                network_mode: Some("web_default".into()),
                ..HostConfig::default()
            },
            &[
                ("bind", "/srv/stacks/web/data"),
                ("bind", "/srv/stacks/web"),
                ("volume", "/var/lib/docker/volumes/web_db/_data"),
                ("tmpfs", ""),
            ],
        );
        assert!(
            violations(&c, root).is_empty(),
            "{:?}",
            violations(&c, root)
        );
    }

    #[test]
    fn every_escape_is_named() {
        let root = Path::new("/srv/stacks/web");
        let c = container(
            HostConfig {
                privileged: Some(true),
                cap_add: Some(vec!["SYS_ADMIN".into()]),
                network_mode: Some("host".into()),
                pid_mode: Some("host".into()),
                security_opt: Some(vec!["apparmor=unconfined".into()]),
                ..HostConfig::default()
            },
            &[
                ("bind", "/"),
                ("bind", "/srv/stacks/web/../../../etc"),
                ("bind", "/srv/stacks/webby"),
            ],
        );
        let v = violations(&c, root).join("; ");
        for want in [
            "privileged",
            "SYS_ADMIN",
            "network namespace",
            "PID namespace",
            "apparmor=unconfined",
            "bind mount of / ",
            "bind mount of /srv/stacks/web/../../../etc",
            "bind mount of /srv/stacks/webby",
        ] {
            assert!(v.contains(want), "{want} missing from: {v}");
        }
    }
}
