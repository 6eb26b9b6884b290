//! The standby's own stack, end to end with the real agents and the real Docker engine: a
//! service that writes into its data dir while it runs and again when it stops (as every
//! database does), a standby that is not running, and services Docker has to kill at their stop
//! timeout.
//!
//! The busybox services here are scripts that do what a database does to its files, in a way a
//! test can check exactly; `postgres.rs` runs the real thing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stackclone_tests::compose::{self, Stacks, State, docker, stack, wait_up};
use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{assert_same, snapshot_without};

const MIB: usize = 1 << 20;

/// One service, `writer`, with `./data` and a probe dir outside the synced tree
/// (`$STACKCLONE_PROBE`, which each side's environment sets).
///
/// On the primary (`STACKCLONE_ROLE=primary`, set when the test creates its containers) it
/// writes nothing: the source tree is what the test makes it. On the standby it behaves like a
/// database: when it starts it records the SHA-256 of the three data files it found (what the
/// commit left, before anything else touches them) in `/probe/starts`; while it runs it appends
/// to `small.dat` and overwrites 64 KiB of `big.dat` (2 MiB) every 200 ms; and when it is told
/// to stop it appends to `small.dat` and `untouched.dat` and overwrites part of `big.dat` once
/// more (a shutdown checkpoint) before it exits.
const WRITER: &str = r#"version: "2.4"
services:
  writer:
    image: IMAGE
    volumes: ["./data:/data", "${STACKCLONE_PROBE:-/nonexistent}:/probe"]
    environment:
      ROLE: "${STACKCLONE_ROLE:-standby}"
    command:
      - sh
      - -c
      - |
        if [ "$$ROLE" = primary ]; then
          trap 'exit 0' TERM
          touch /tmp/ready
          while :; do sleep 1 & wait $$!; done
        fi
        cd /data
        { echo start; sha256sum small.dat big.dat untouched.dat; } >> /probe/starts
        checkpoint() {
          echo "stop $$(date +%s)" >> small.dat
          echo "stop $$(date +%s)" >> untouched.dat
          dd if=/dev/urandom of=big.dat bs=4096 count=16 seek=100 conv=notrunc 2>/dev/null
          exit 0
        }
        trap checkpoint TERM
        touch /tmp/ready
        i=0
        while :; do
          i=$$((i + 1))
          echo "run $$i" >> small.dat
          dd if=/dev/urandom of=big.dat bs=4096 count=16 seek=$$((i % 400)) conv=notrunc 2>/dev/null
          sleep 0.2 & wait $$!
        done
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready"]
      interval: 1s
      retries: 30
"#;

/// The three files the standby's writer touches; everything else it leaves alone.
const WRITTEN: [&str; 3] = ["data/small.dat", "data/big.dat", "data/untouched.dat"];

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_owned()
}

/// The hashes the standby's writer recorded when it last started, by file name.
fn last_start(probe: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(probe.join("starts")).unwrap_or_default();
    let block = text.rsplit("start\n").next().unwrap_or_default();
    block
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(hash, name)| (name.to_owned(), hash.to_owned()))
        .collect()
}

fn starts(probe: &Path) -> usize {
    std::fs::read_to_string(probe.join("starts"))
        .unwrap_or_default()
        .matches("start\n")
        .count()
}

struct Writer {
    s: Stacks,
    /// Where the standby's writer records what it found at each start.
    probe: PathBuf,
}

impl Writer {
    fn new(tag: &str, source_extra: &str) -> Writer {
        compose::ensure_image(compose::BUSYBOX);
        let probe = tempfile::Builder::new()
            .prefix("stackclone-probe-")
            .tempdir()
            .expect("probe dir")
            .keep();
        let mut s = Stacks::new(
            tag,
            &WRITER.replace("IMAGE", compose::BUSYBOX),
            &format!("stop_timeout = \"10s\"\n{source_extra}"),
            "stop_timeout = \"10s\"\nhealth_timeout = \"30s\"\n",
        );
        s.p.opts.env = vec![(
            "STACKCLONE_PROBE".into(),
            probe.to_str().expect("utf-8").into(),
        )];
        let mut rng = Rng::new(11);
        fsx::write(s.p.src.join("data/small.dat"), "generation 1\n");
        fsx::write(s.p.src.join("data/big.dat"), rng.bytes(2 * MIB));
        fsx::write(s.p.src.join("data/untouched.dat"), "never changes\n");
        fsx::write(s.p.src.join("data/other"), rng.bytes(100_000));
        let src_probe = s.p.tmp.path().join("src-probe");
        fsx::mkdir(&src_probe);
        // The probe is the test's, not the stack's data: the standby has its own.
        s.p.write_source_stack(&format!(
            "compose_project = \"{}\"\nstop_timeout = \"10s\"\n{source_extra}\
             ignore_mounts = {{ \"{}\" = \"the test's probe, one per side\" }}\n",
            s.src_proj,
            src_probe.display()
        ));
        s.up_source(&[
            ("STACKCLONE_ROLE", "primary"),
            ("STACKCLONE_PROBE", src_probe.to_str().expect("utf-8")),
        ]);
        wait_up(&s.src_proj, &["writer"], Duration::from_secs(60), "source");
        s.p.start_target();
        Writer { s, probe }
    }

    /// Pushes, which must commit `generation`; then checks that the standby runs, that its
    /// writer found exactly the source's files when it started, and that every file it does not
    /// write is the source's, byte for byte, with owner, mode and mtime.
    #[track_caller]
    fn push_and_check(&self, generation: u64) -> serde_json::Value {
        let p = &self.s.p;
        let before = starts(&self.probe);
        let o = p.push_ok();
        assert_eq!(o["generation"], generation, "{o}");
        let tgt = wait_up(
            &self.s.tgt_proj,
            &["writer"],
            Duration::from_secs(30),
            "the standby after the push",
        );
        assert!(tgt["writer"].running);
        // The writer started once more, after the commit, on exactly the source's files.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while starts(&self.probe) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the standby's writer did not start after generation {generation}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let found = last_start(&self.probe);
        for rel in WRITTEN {
            let name = rel.trim_start_matches("data/");
            assert_eq!(
                found.get(name),
                Some(&sha256(&p.src.join(rel))),
                "generation {generation}: the standby started on another {rel} than the \
                 source's\n{}",
                p.target_log()
            );
        }
        let skip = [
            "docker-compose.yml",
            "data/small.dat",
            "data/big.dat",
            "data/untouched.dat",
        ];
        // The writer's files are checked above; directory mtimes move with its writes.
        let files = |root: &Path| {
            let mut t = snapshot_without(root, &skip);
            t.nodes
                .retain(|_, n| n.kind != stackclone_tests::tree::Kind::Dir);
            t
        };
        assert_same(
            &files(&p.src),
            &files(&p.live),
            &format!("generation {generation}"),
        );
        o
    }
}

/// The regression of issue "Real databases" (1, 2), with a script that writes like a database:
/// the standby's service writes while it runs (so the pre-copy pass is planned against a moving
/// tree) and when it stops (the shutdown checkpoint, after the running scan), to files the
/// source changes and to one it never changes. Every cycle commits, and each generation the
/// standby starts on is exactly the source's tree: nothing is "changed after the commit was
/// prepared", and nothing the standby wrote while stopping survives.
#[test]
fn a_standby_that_writes_while_running_and_when_stopping_commits_the_source_tree_every_cycle() {
    let w = Writer::new("writes", "precopy = true\n");
    let p = &w.s.p;
    w.push_and_check(1);
    let mut rng = Rng::new(12);
    for generation in 2..=5u64 {
        std::thread::sleep(Duration::from_millis(700));
        fsx::write(
            p.src.join(format!("data/gen-{generation}")),
            rng.bytes(4096),
        );
        match generation {
            // Both written files change on the source too.
            2 => {
                fsx::write(p.src.join("data/small.dat"), "generation 2\n");
                let mut big = std::fs::read(p.src.join("data/big.dat")).expect("big");
                big[MIB..MIB + 8192].copy_from_slice(&rng.bytes(8192));
                fsx::write(p.src.join("data/big.dat"), big);
            }
            // Only the small one.
            4 => fsx::write(p.src.join("data/small.dat"), "generation 4\n"),
            // Neither: only the standby changed them.
            _ => {}
        }
        let o = w.push_and_check(generation);
        assert!(
            o["target_downtime_ms"].as_u64().unwrap_or(0) > 0,
            "the standby was not stopped for a changing generation: {o}"
        );
    }
    assert_eq!(p.target_generation(), 5);
    // The standby's writes while it ran and stopped were undone by the next cycle, so its
    // files after the last commit are the source's (see `push_and_check`), and `verify` right
    // after a commit finds drift only in what the writer has written since it started.
    let r = stackclone_tests::run(p.target_cmd(&["verify", "web"]));
    for line in r.stdout.lines().filter(|l| l.contains("data/")) {
        assert!(
            WRITTEN.iter().any(|w| line.contains(w)),
            "verify reports drift the standby did not make: {line}\n{}",
            r.dump()
        );
    }
}

/// The compose file of the health tests: `web` publishes a port (`$STACKCLONE_PORT`, set per
/// side), so a port taken on the standby's host makes its creation fail, as a collision with
/// another service does; `db` has a health check, `web` has none.
const TWO: &str = r#"version: "2.4"
services:
  db:
    image: IMAGE
    command: ["sh", "-c", "trap 'exit 0' TERM; touch /tmp/ready; while :; do sleep 1 & wait $$!; done"]
    healthcheck: {test: ["CMD-SHELL", "test -f /tmp/ready"], interval: 1s, retries: 30}
  web:
    image: IMAGE
    depends_on: [db]
    ports: ["127.0.0.1:${STACKCLONE_PORT:-0}:8080"]
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $$!; done"]
"#;

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[track_caller]
fn assert_all_running(project: &str, what: &str) -> HashMap<String, State> {
    let s = stack(project);
    assert!(
        compose::all_up(&s, &["db", "web"]),
        "{what}: {project} is not running whole: {s:#?}"
    );
    s
}

/// Issue "Real databases" (3): a standby whose creation failed half-way, or that was stopped by
/// hand, is brought up by the next cycle — every service running, healthy where it has a check
/// — and a creation that fails fails the cycle with Compose's own words (one that collides with
/// the host's ports also names the setting to use, and leaves no container behind); a cycle never
/// says "healthy" about a stack that does not run.
#[test]
fn a_standby_that_is_not_running_is_brought_up_by_the_next_cycle_never_called_healthy() {
    compose::ensure_image(compose::BUSYBOX);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let standby_port = taken.local_addr().expect("addr").port();
    let mut s = Stacks::new(
        "health",
        &TWO.replace("IMAGE", compose::BUSYBOX),
        "order = [\"db\", \"web\"]\nstop_timeout = \"5s\"\n",
        "order = [\"db\", \"web\"]\nstop_timeout = \"5s\"\nhealth_timeout = \"30s\"\n",
    );
    s.p.opts.env = vec![("STACKCLONE_PORT".into(), standby_port.to_string())];
    fsx::write(s.p.src.join("data/orders"), "order 1\n");
    let src_port = free_tcp_port().to_string();
    s.up_source(&[("STACKCLONE_PORT", &src_port)]);
    wait_up(
        &s.src_proj,
        &["db", "web"],
        Duration::from_secs(60),
        "source",
    );
    s.p.start_target();
    let p = &s.p;

    // 1. The standby's port is taken: its creation fails. The push fails and says why, in
    //    Compose's words and with the setting that lets the standby differ; what the creation
    //    made is removed, so that the next one is made with whatever fixed the collision.
    let r = p.push(&["--json"]);
    assert!(
        !r.status.success(),
        "a failed creation was a success:\n{}",
        r.dump()
    );
    let error = r.json()[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("up -d")
            && error.contains(&standby_port.to_string())
            && error.contains("compose_env"),
        "the error does not quote Compose's failure and the fix: {error}\n{}",
        r.dump()
    );
    let left = stack(&s.tgt_proj);
    assert!(
        left.is_empty(),
        "the colliding creation left containers: {left:#?}"
    );

    // 2. The cause is fixed, and the standby is as a creation that failed half-way for another
    //    reason leaves it: containers `created`, never started. The next cycle starts them.
    drop(taken);
    compose::compose(
        &p.live,
        &s.tgt_proj,
        &[("STACKCLONE_PORT", &standby_port.to_string())],
        &["up", "--no-start"],
    );
    let created = stack(&s.tgt_proj);
    assert!(
        created.len() == 2 && created.values().all(|c| c.status == "created"),
        "{created:#?}"
    );
    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    let up = assert_all_running(&s.tgt_proj, "after the port was freed");
    for (service, c) in &created {
        assert_eq!(
            up[service].id, c.id,
            "{service} was re-created, not started"
        );
    }
    assert_eq!(
        std::fs::read(p.live.join("data/orders")).expect("orders"),
        b"order 1\n"
    );

    // 3. Stopped by hand (`docker compose stop`): the next cycle starts it, although nothing
    //    changed and the cycle commits without stopping anything.
    compose::compose(&p.live, &s.tgt_proj, &[], &["stop"]);
    assert!(stack(&s.tgt_proj).values().all(|c| !c.running));
    let o = p.push_ok();
    assert_eq!(o["generation"], 3, "{o}");
    assert_all_running(
        &s.tgt_proj,
        "after a stop by hand and a cycle with no change",
    );

    // 4. One service killed (as after an OOM kill or a reboot with `restart: no`), and the data
    //    changes: the cycle stops and starts the standby and brings up all of it.
    let web = stack(&s.tgt_proj)["web"].id.clone();
    docker(&["kill", &web]);
    fsx::write(p.src.join("data/orders"), "order 1\norder 2\n");
    let o = p.push_ok();
    assert_eq!(o["generation"], 4, "{o}");
    assert_all_running(&s.tgt_proj, "after web was killed");
    assert_eq!(
        std::fs::read(p.live.join("data/orders")).expect("orders"),
        b"order 1\norder 2\n"
    );
    let status = p.target_status();
    assert_eq!(status["generation"], 4, "{status}");
    wait_up(
        &s.src_proj,
        &["db", "web"],
        Duration::from_secs(30),
        "source",
    );
}

/// `stubborn` ignores SIGTERM: Docker kills it when its stop timeout (1 s) runs out.
const STUBBORN: &str = r#"version: "2.4"
services:
  stubborn:
    image: IMAGE
    volumes: ["./data:/data"]
    command: ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]
"#;

/// Issue "Real databases" (4): a service Docker had to kill at its stop timeout left
/// crash-consistent data. The push says so (JSON, and the standby's too from its second
/// cycle), and with `on_stop_timeout = "fail"` it refuses to ship such a copy: the standby stays
/// on the previous generation, and the primary runs again.
#[test]
fn a_service_killed_at_its_stop_timeout_is_reported_and_can_refuse_the_cycle() {
    compose::ensure_image(compose::BUSYBOX);
    let s = Stacks::new(
        "kill",
        &STUBBORN.replace("IMAGE", compose::BUSYBOX),
        "stop_timeout = \"1s\"\nprecopy = false\n",
        "stop_timeout = \"1s\"\nhealth_timeout = \"30s\"\n",
    );
    fsx::write(s.p.src.join("data/v"), "1\n");
    s.up_source(&[]);
    wait_up(
        &s.src_proj,
        &["stubborn"],
        Duration::from_secs(60),
        "source",
    );
    let mut s = s;
    s.p.start_target();
    let p = &s.p;

    let o = p.push_ok();
    assert_eq!(o["stop_killed"], serde_json::json!(["stubborn"]), "{o}");
    // The standby had no containers yet: nothing of it was stopped.
    assert_eq!(o["standby_killed"], serde_json::json!([]), "{o}");
    let killed = stack(&s.src_proj)["stubborn"].clone();
    assert!(
        killed.running,
        "the primary was not started again: {killed:?}"
    );

    fsx::write(p.src.join("data/v"), "2\n");
    let o = p.push_ok();
    assert_eq!(o["generation"], 2, "{o}");
    assert_eq!(o["stop_killed"], serde_json::json!(["stubborn"]), "{o}");
    assert_eq!(o["standby_killed"], serde_json::json!(["stubborn"]), "{o}");
    let log = p.target_log();
    assert!(
        log.contains("Docker killed them") && log.contains("stubborn"),
        "the target did not log the kill:\n{log}"
    );

    p.write_source_stack(&format!(
        "compose_project = \"{}\"\nstop_timeout = \"1s\"\nprecopy = false\n\
         on_stop_timeout = \"fail\"\n",
        s.src_proj
    ));
    fsx::write(p.src.join("data/v"), "3\n");
    let r = p.push(&["--json"]);
    assert!(
        !r.status.success(),
        "a killed service's copy was shipped:\n{}",
        r.dump()
    );
    let o = r.json()[0].clone();
    let error = o["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("stubborn") && error.contains("crash-consistent"),
        "the error does not name the killed service and why it matters: {error}"
    );
    assert_eq!(o["stop_killed"], serde_json::json!(["stubborn"]), "{o}");
    assert!(
        o["source_downtime_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 1000),
        "a failed push reports the downtime it caused: {o}"
    );
    assert_eq!(p.target_generation(), 2);
    assert_eq!(std::fs::read(p.live.join("data/v")).expect("v"), b"2\n");
    wait_up(
        &s.src_proj,
        &["stubborn"],
        Duration::from_secs(30),
        "source",
    );
    wait_up(
        &s.tgt_proj,
        &["stubborn"],
        Duration::from_secs(30),
        "standby",
    );
}
