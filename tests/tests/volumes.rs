//! The whole stack, end to end with the real agents and the real Docker engine: a named volume
//! is replicated with the data dir and the standby's containers read it from their own volume;
//! a rollback restores it; a bind-mounted directory outside the stack's path fails the cycle
//! before anything stops, until it is replicated or ignored with a reason.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use stackclone_tests::compose::{self, Stacks, docker, stack, wait_up};
use stackclone_tests::fsx;

/// `db` keeps its data in the named volume `db`, like every official database example, and
/// writes to it while it runs (a counter) and when it stops (which side stopped it, and at
/// which count): the write a database makes at shutdown is in the generation only if the
/// volume is copied after the stop. `web` keeps its data in `./data`, inside the stack's path.
const STACK: &str = r#"version: "2.4"
services:
  db:
    image: IMAGE
    volumes: ["db:/var/lib/db"]
    environment:
      ROLE: "${STACKCLONE_ROLE:-standby}"
    command:
      - sh
      - -c
      - |
        i=0
        trap 'echo "$$ROLE stopped at $$i" > /var/lib/db/shutdown; exit 0' TERM
        touch /tmp/ready
        while :; do
          i=$$((i + 1))
          echo "$$i" > /var/lib/db/counter
          sleep 0.2 & wait $$!
        done
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready"]
      interval: 1s
      retries: 30
  web:
    image: IMAGE
    volumes: ["./data:/data"]
    command: ["sh", "-c", "trap 'exit 0' TERM; touch /tmp/ready; while :; do sleep 1 & wait $$!; done"]
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready"]
      interval: 1s
      retries: 30
volumes:
  db: {}
"#;

fn mountpoint(volume: &str) -> PathBuf {
    PathBuf::from(docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", volume]).trim())
}

/// `cat FILE` in the project's running container of `service`.
fn read_in(project: &str, service: &str, file: &str) -> String {
    let id = stack(project)[service].id.clone();
    docker(&["exec", &id, "cat", file])
}

#[test]
fn a_named_volume_is_replicated_read_by_the_standby_from_its_own_volume_and_rolled_back() {
    compose::ensure_image(compose::BUSYBOX);
    let mut s = Stacks::new(
        "volume",
        &STACK.replace("IMAGE", compose::BUSYBOX),
        "order = [\"db\", \"web\"]\nstop_timeout = \"5s\"\n",
        "order = [\"db\", \"web\"]\nstop_timeout = \"5s\"\nhealth_timeout = \"60s\"\nauto_rollback = true\n",
    );
    fsx::write(s.p.src.join("data/index.html"), "hello\n");
    s.up_source(&[("STACKCLONE_ROLE", "primary")]);
    wait_up(
        &s.src_proj,
        &["db", "web"],
        Duration::from_secs(60),
        "source",
    );
    // What a database keeps: its own owner and a private mode on the volume's root and files.
    let src_volume = mountpoint(&format!("{}_db", s.src_proj));
    fsx::write(src_volume.join("payload"), "generation one\n");
    fsx::chown(src_volume.join("payload"), 999, 999);
    fsx::chmod(src_volume.join("payload"), 0o600);
    fsx::chown(&src_volume, 70, 70);
    fsx::chmod(&src_volume, 0o700);
    s.p.start_target();
    let p = &s.p;

    let o = p.push_ok();
    assert_eq!(o["generation"], 1, "{o}");
    let mounts = o["mounts"].as_array().cloned().unwrap_or_default();
    let verdict = |what: &str| {
        mounts
            .iter()
            .find(|m| m["mount"].as_str().is_some_and(|w| w.contains(what)))
            .map(|m| m["verdict"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(verdict("_db").as_deref(), Some("replicated"), "{o}");
    assert_eq!(verdict("/data").as_deref(), Some("in-path"), "{o}");

    // The standby's own volume, under its own project's name, labelled as Compose's own.
    let tgt_volume = format!("{}_db", s.tgt_proj);
    let labels = docker(&["volume", "inspect", "-f", "{{json .Labels}}", &tgt_volume]);
    assert!(
        labels.contains(&format!(
            "\"com.docker.compose.project\":\"{}\"",
            s.tgt_proj
        )) && labels.contains("\"com.docker.compose.volume\":\"db\""),
        "{labels}"
    );
    // Its container reads what the primary had, including what the primary's db wrote when it
    // was stopped for the final pass (not what the standby's own db wrote at its stop).
    assert_eq!(
        read_in(&s.tgt_proj, "db", "/var/lib/db/payload"),
        "generation one\n"
    );
    let shutdown = read_in(&s.tgt_proj, "db", "/var/lib/db/shutdown");
    assert!(shutdown.starts_with("primary stopped at "), "{shutdown:?}");
    assert_eq!(read_in(&s.tgt_proj, "web", "/data/index.html"), "hello\n");
    // Owner and mode arrived, on the volume's root too (PostgreSQL checks both).
    let tree = p.live.join(".stackclone-volumes/db");
    let root = std::fs::metadata(&tree).expect("volume tree");
    assert_eq!(
        (root.uid(), root.gid(), root.mode() & 0o7777),
        (70, 70, 0o700)
    );
    let payload = std::fs::metadata(tree.join("payload")).expect("payload");
    assert_eq!(
        (payload.uid(), payload.gid(), payload.mode() & 0o7777),
        (999, 999, 0o600)
    );
    // `verify` covers the volume: the standby's running db has rewritten its counter since the
    // commit, and that is the one drift it finds.
    let verify = stackclone_tests::run(p.target_cmd(&["verify", "web"]));
    assert!(
        verify.stdout.contains(".stackclone-volumes/db/counter:")
            && verify.stdout.contains("1 path(s) drifted"),
        "{}",
        verify.dump()
    );

    // Generation 2 changes the volume; the standby follows.
    fsx::write(src_volume.join("payload"), "generation two\n");
    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    assert_eq!(
        read_in(&s.tgt_proj, "db", "/var/lib/db/payload"),
        "generation two\n"
    );

    // A rollback restores the volume with the rest of the generation.
    stackclone_tests::run(p.target_cmd(&["rollback", "web", "--yes"])).ok();
    wait_up(
        &s.tgt_proj,
        &["db", "web"],
        Duration::from_secs(60),
        "standby",
    );
    assert_eq!(
        read_in(&s.tgt_proj, "db", "/var/lib/db/payload"),
        "generation one\n"
    );

    // The primary keeps its own volume and data, and runs.
    assert_eq!(
        std::fs::read_to_string(src_volume.join("payload")).expect("payload"),
        "generation two\n"
    );
    wait_up(
        &s.src_proj,
        &["db", "web"],
        Duration::from_secs(30),
        "source",
    );
}

#[test]
fn an_outside_bind_mount_fails_the_cycle_before_anything_stops_until_ignored() {
    compose::ensure_image(compose::BUSYBOX);
    let outside = tempfile::tempdir().expect("tempdir");
    fsx::write(outside.path().join("photo.jpg"), "jpeg");
    let file = format!(
        r#"version: "2.4"
services:
  media:
    image: {}
    volumes: ["./data:/data", "{}:/media"]
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $$!; done"]
"#,
        compose::BUSYBOX,
        outside.path().display()
    );
    let mut s = Stacks::new("outside", &file, "stop_timeout = \"5s\"\n", "");
    fsx::write(s.p.src.join("data/db"), "rows\n");
    s.up_source(&[]);
    wait_up(&s.src_proj, &["media"], Duration::from_secs(60), "source");
    let started = stack(&s.src_proj)["media"].started_at;
    s.p.start_target();
    let p = &s.p;

    let r = p.push(&["--json"]);
    assert!(
        !r.status.success(),
        "an uncovered mount was pushed:\n{}",
        r.dump()
    );
    let error = r.json()[0]["error"].as_str().unwrap_or_default().to_owned();
    for needle in [
        format!(
            "media: bind {} at /media: refused",
            outside.path().display()
        ),
        "ignore_mounts".to_owned(),
        "named volume".to_owned(),
    ] {
        assert!(error.contains(&needle), "{needle:?} not in {error}");
    }
    // Nothing stopped, nothing sent.
    let now = stack(&s.src_proj)["media"].clone();
    assert!(
        now.running && now.started_at == started,
        "the primary was stopped: {now:?}"
    );
    assert!(
        !p.live.join("data/db").exists(),
        "data arrived after a refused cycle"
    );

    // A dry run shows the mounts and fails the same way.
    let dry = p.push(&["--dry-run"]);
    assert!(!dry.status.success(), "{}", dry.dump());
    assert!(dry.stdout.contains("mount  refused"), "{}", dry.dump());

    // Ignored, with a reason: the cycle runs, and the reason is in the report.
    p.write_source_stack(&format!(
        "compose_project = \"{}\"\nstop_timeout = \"5s\"\nignore_mounts = {{ \"{}\" = \"photos live on the NAS\" }}\n",
        s.src_proj,
        outside.path().display()
    ));
    let o = p.push_ok();
    assert_eq!(o["generation"], 1, "{o}");
    let media = o["mounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["destination"] == "/media").cloned())
        .unwrap_or_default();
    assert_eq!(media["verdict"], "ignored", "{o}");
    assert_eq!(media["detail"], "photos live on the NAS", "{o}");
    assert_eq!(
        std::fs::read(p.live.join("data/db")).expect("db"),
        b"rows\n"
    );
    let status = stackclone_tests::run(p.source_cmd(&["status"]));
    status.ok();
    assert!(
        status.stdout.contains("ignored    media: bind"),
        "{}",
        status.dump()
    );
}

#[test]
fn an_outside_path_is_replicated_where_the_targets_stack_file_says() {
    compose::ensure_image(compose::BUSYBOX);
    let dirs = tempfile::tempdir().expect("tempdir");
    let (src_media, tgt_media) = (dirs.path().join("src/media"), dirs.path().join("tgt/media"));
    fsx::write(src_media.join("photo.jpg"), "jpeg");
    fsx::chown(src_media.join("photo.jpg"), 1234, 1234);
    fsx::chmod(src_media.join("photo.jpg"), 0o640);
    let file = format!(
        r#"version: "2.4"
services:
  media:
    image: {}
    volumes: ["./data:/data", "${{MEDIA_DIR:-/nonexistent}}:/media"]
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $$!; done"]
"#,
        compose::BUSYBOX
    );
    let source_extra = format!(
        "stop_timeout = \"5s\"\nextra_paths = [\"{}\"]\n",
        src_media.display()
    );
    // The standby's containers mount the same compose file's path, which the target agent's
    // environment points elsewhere: a host whose layout differs.
    let mut s = Stacks::new("extra", &file, &source_extra, "");
    s.p.opts.env = vec![("MEDIA_DIR".into(), tgt_media.display().to_string())];
    fsx::write(s.p.src.join("data/db"), "rows\n");
    s.up_source(&[("MEDIA_DIR", &src_media.display().to_string())]);
    wait_up(&s.src_proj, &["media"], Duration::from_secs(60), "source");
    s.p.start_target();

    // The target's stack file does not say where the path goes: the standby is not brought up
    // without it, and the error says what to add.
    let r = s.p.push(&["--json"]);
    assert!(!r.status.success(), "{}", r.dump());
    let error = r.json()[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains(&format!("extra_paths = {{ \"{}\" = ", src_media.display())),
        "{error}"
    );
    assert!(
        !tgt_media.exists(),
        "a path the target's config does not name was written"
    );

    s.p.write_target_stack(&format!(
        "compose_project = \"{}\"\nextra_paths = {{ \"{}\" = \"{}\" }}\n",
        s.tgt_proj,
        src_media.display(),
        tgt_media.display()
    ));
    s.p.stop_target();
    s.p.start_target();
    let o = s.p.push_ok();
    let media = o["mounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["destination"] == "/media").cloned())
        .unwrap_or_default();
    assert_eq!(media["verdict"], "extra-path", "{o}");
    let link = std::fs::read_link(&tgt_media).expect("the target path is a link");
    assert!(
        link.starts_with(std::fs::canonicalize(&s.p.live).expect("live"))
            && link.to_string_lossy().contains(".stackclone-paths/"),
        "{}",
        link.display()
    );
    let photo = std::fs::metadata(tgt_media.join("photo.jpg")).expect("photo");
    assert_eq!(
        (photo.uid(), photo.gid(), photo.mode() & 0o7777),
        (1234, 1234, 0o640)
    );
    assert_eq!(read_in(&s.tgt_proj, "media", "/media/photo.jpg"), "jpeg");
    assert_eq!(read_in(&s.tgt_proj, "media", "/data/db"), "rows\n");
}
