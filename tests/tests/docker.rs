//! Compose stacks end to end: real `stackclone-source push` against a real `stackclone-target
//! run`, both driving real containers on the local Docker engine (Compose v1, API 1.41, the
//! image built locally by `deploy/image/build.sh`).
//!
//! Each test has its own pair of Compose projects (names unique to the test and the run); a
//! guard removes their containers and networks by label however the test ends. If the Docker
//! daemon does not answer, the tests fail: CI guarantees the daemon.
//!
//! Container state is read with `docker inspect` (the CLI), independently of the agents' own
//! bollard code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use stackclone_tests::Pair;
use stackclone_tests::compose::{self, Cleanup, State, docker, ms, now_ns, stack};
use stackclone_tests::fsx::{self, Rng};

const IMAGE: &str = compose::BUSYBOX;
const MIB: usize = 1 << 20;

/// The stack: `db` and an `app` that depends on it and writes the bind-mounted `./data`.
///
/// The app writes `data/first` (its hostname) only if it does not exist yet, so on the target
/// that file is exactly what the source's app wrote; and it appends to `data/log` on each start.
///
/// Poison (test 3): the compose file is synced with the data, so both sides run the same
/// definition. The app's health check fails when `/data/poison` exists *unless* the container's
/// `STACKCLONE_ROLE` is `primary`. Compose substitutes `${STACKCLONE_ROLE:-standby}` when it
/// creates the containers: the tests run `docker-compose up` for the source with
/// `STACKCLONE_ROLE=primary`, while the target agent creates its copy with Compose in an
/// environment without the variable, so the standby gets `standby`. Poisoned data therefore
/// leaves the source healthy and makes only the standby unhealthy. (`$$` is Compose's escape
/// for a `$` the container's shell sees.)
const COMPOSE: &str = r#"version: "2.4"
services:
  db:
    image: IMAGE
    command: ["sh", "-c", "trap 'exit 0' TERM; touch /tmp/ready; while :; do sleep 1 & wait $$!; done"]
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready"]
      interval: 1s
      timeout: 2s
      retries: 3
  app:
    image: IMAGE
    depends_on: [db]
    volumes: ["./data:/data"]
    environment:
      STACKCLONE_ROLE: "${STACKCLONE_ROLE:-standby}"
    command: ["sh", "-c", "trap 'exit 0' TERM; [ -f /data/first ] || hostname > /data/first; echo \"started $$(hostname)\" >> /data/log; touch /tmp/ready; while :; do sleep 1 & wait $$!; done"]
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready && { test \"$$STACKCLONE_ROLE\" = primary || test ! -f /data/poison; }"]
      interval: 1s
      timeout: 2s
      retries: 3
"#;

// ---------------------------------------------------------------------------------------------
// The stack of COMPOSE: exactly db and app.

fn ensure_image() {
    compose::ensure_image(IMAGE);
}

/// Asserts that `project` has exactly db and app, both running and healthy, right now.
#[track_caller]
fn assert_healthy(project: &str, what: &str) -> HashMap<String, State> {
    let s = stack(project);
    let mut services: Vec<&String> = s.keys().collect();
    services.sort();
    assert_eq!(services, ["app", "db"], "{what}: services of {project}");
    for (name, c) in &s {
        assert!(
            c.running && c.health == "healthy",
            "{what}: {project}/{name} is not running healthy: {c:?}"
        );
    }
    s
}

/// Waits (up to `limit`) for `project`'s db and app to run healthy.
#[track_caller]
fn wait_healthy(project: &str, limit: Duration, what: &str) -> HashMap<String, State> {
    compose::wait_up(project, &["app", "db"], limit, what)
}

// ---------------------------------------------------------------------------------------------
// The world: a pair whose stack is a compose project on each side.

struct World {
    p: Pair,
    /// The source's (primary's) Compose project.
    src_proj: String,
    /// The target's (standby's) Compose project.
    tgt_proj: String,
    // Last: the target agent is killed (Pair's drop) before the containers go.
    _cleanup: Cleanup,
}

impl World {
    /// A pair with `docker = true` on both sides, the source's project up and healthy with
    /// `data/catalog.db` of `catalog` random bytes, and the target agent running.
    fn new(tag: &str, source_extra: &str, target_extra: &str, catalog: usize) -> World {
        Self::with_compose(tag, source_extra, target_extra, catalog, COMPOSE)
    }

    /// As [`World::new`], with another compose file (`IMAGE` is replaced).
    fn with_compose(
        tag: &str,
        source_extra: &str,
        target_extra: &str,
        catalog: usize,
        compose: &str,
    ) -> World {
        ensure_image();
        let compose::Stacks {
            mut p,
            src_proj,
            tgt_proj,
            cleanup,
        } = compose::Stacks::new(
            tag,
            &compose.replace("IMAGE", IMAGE),
            &format!("order = [\"db\", \"app\"]\nstop_timeout = \"5s\"\n{source_extra}"),
            &format!(
                "order = [\"db\", \"app\"]\nstop_timeout = \"5s\"\nhealth_timeout = \"30s\"\n\
                 {target_extra}"
            ),
        );
        fsx::mkdir(p.src.join("data"));
        fsx::write(p.src.join("data/catalog.db"), Rng::new(7).bytes(catalog));
        compose::compose(
            &p.src,
            &src_proj,
            &[("STACKCLONE_ROLE", "primary")],
            &["up", "-d"],
        );
        wait_healthy(&src_proj, Duration::from_secs(60), "the source's stack");
        assert!(
            p.src.join("data/first").is_file(),
            "the app wrote data/first"
        );
        p.start_target();
        World {
            p,
            src_proj,
            tgt_proj,
            _cleanup: cleanup,
        }
    }

    /// A world whose transfers are slow (no pre-copy, 2 MiB/s: the source stack is stopped
    /// before the transfer, which then takes seconds) with generation 1 (`marker`) committed and
    /// both stacks running healthy.
    fn slow_at_generation_1(tag: &str, source_extra: &str) -> World {
        let w = World::new(
            tag,
            &format!("precopy = false\nbandwidth_limit = \"2MiB/s\"\n{source_extra}"),
            "",
            MIB / 4,
        );
        fsx::write(w.src_data("marker"), "generation 1\n");
        let (ok, _, dump, ..) = w.push();
        assert!(ok, "first push failed:\n{dump}");
        assert!(
            !w.p.src_state.join("web.stopped.json").exists(),
            "a finished cycle left its restart record behind"
        );
        assert_healthy(&w.tgt_proj, "the target on generation 1");
        wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
        w
    }

    /// Generation 2: `marker` changed and 64 new files of 128 KiB.
    fn write_generation_2(&self, seed: u64) {
        let mut rng = Rng::new(seed);
        for i in 0..64 {
            fsx::write(
                self.src_data(&format!("many/f{i:02}")),
                rng.bytes(128 * 1024),
            );
        }
        fsx::write(self.src_data("marker"), "generation 2\n");
    }

    /// Spawns `stackclone-source ARGS…` (a push or the daemon) and returns once its cycle's
    /// transfer is under way: a few objects staged on the target and no journal yet, so what
    /// happens next lands before the commit.
    fn start_slow_cycle(&self, args: &[&str]) -> std::process::Child {
        let staged =
            |p: &Pair| std::fs::read_dir(p.state.join("staging/objects")).map_or(0, |d| d.count());
        let base = staged(&self.p);
        let mut child = stackclone_tests::spawn(
            self.p
                .source_cmd(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while staged(&self.p) < base + 4 {
            if child.try_wait().expect("try_wait").is_some() {
                let out = child.wait_with_output().expect("output");
                panic!(
                    "`{}` ended before the transfer was under way:\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(Instant::now() < deadline, "nothing staged in 60 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !self.p.state.join("journal").exists(),
            "the journal exists already: the cycle is committing"
        );
        child
    }

    fn src_data(&self, rel: &str) -> PathBuf {
        self.p.src.join("data").join(rel)
    }

    fn live_data(&self, rel: &str) -> PathBuf {
        self.p.live.join("data").join(rel)
    }

    /// A push with `--json`, to its end: (exit ok, the stack's outcome, run dump, start ns,
    /// end ns).
    fn push(&self) -> (bool, serde_json::Value, String, i128, i128) {
        let t0 = now_ns();
        let r = self.p.push(&["--json"]);
        let t1 = now_ns();
        let dump = format!("{}\n--- target log\n{}", r.dump(), self.p.target_log());
        let outcome = serde_json::from_str::<serde_json::Value>(&r.stdout)
            .map(|j| j[0].clone())
            .unwrap_or(serde_json::Value::Null);
        (r.status.success(), outcome, dump, t0, t1)
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[track_caller]
fn assert_same_file(a: &Path, b: &Path) {
    assert!(
        read(a) == read(b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_compose_stack_is_pushed_and_the_standby_runs_healthy_on_the_same_data() {
    // 16 MiB at 8 MiB/s: the pre-copy takes two seconds or more while the source runs.
    let w = World::new(
        "push",
        "precopy = true\nbandwidth_limit = \"8MiB/s\"\n",
        "",
        16 * MIB,
    );
    fsx::write(w.src_data("marker"), "written before the push\n");
    let before = stack(&w.src_proj);

    let (ok, o, dump, t0, t1) = w.push();
    assert!(ok, "push failed:\n{dump}");
    assert_eq!(o["ok"], true, "{dump}");
    assert_eq!(o["generation"], 1, "{dump}");

    // The standby: running and healthy when the push reports success, on the same data.
    let tgt = assert_healthy(&w.tgt_proj, "the target after the push");
    for rel in ["marker", "first", "catalog.db"] {
        assert_same_file(&w.src_data(rel), &w.live_data(rel));
    }
    let seen = docker(&["exec", &tgt["app"].id, "cat", "/data/marker", "/data/first"]);
    let want = format!(
        "{}{}",
        String::from_utf8_lossy(&read(&w.src_data("marker"))),
        String::from_utf8_lossy(&read(&w.src_data("first")))
    );
    assert_eq!(seen, want, "what the standby's app sees in /data");

    // The source runs again (the agent does not wait for its health: poll for it).
    let after = wait_healthy(&w.src_proj, Duration::from_secs(30), "the source after");
    let downtime_ms = o["source_downtime_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no source_downtime_ms: {o}")) as i128;
    let duration_ms = o["duration_ms"].as_u64().expect("duration_ms") as i128;
    assert!(
        downtime_ms < duration_ms,
        "source downtime {downtime_ms} ms is not shorter than the push ({duration_ms} ms)"
    );
    let mut first_stop = i128::MAX;
    let mut last_start = i128::MIN;
    for (service, c) in &after {
        assert_eq!(c.id, before[service].id, "{service} was re-created");
        assert!(
            c.finished_at > t0 && c.started_at < t1 && c.finished_at < c.started_at,
            "{service}: stopped at {} ms and started at {} ms after the push began; the push \
             ended at {} ms",
            ms(c.finished_at - t0),
            ms(c.started_at - t0),
            ms(t1 - t0)
        );
        // Pre-copy of 16 MiB at 8 MiB/s ran with the stack up: the stop came well after the
        // push started.
        assert!(
            c.finished_at - t0 > 1_000_000_000,
            "{service} stopped {} ms into the push, before the pre-copy could have run",
            ms(c.finished_at - t0)
        );
        let gap = c.started_at - c.finished_at;
        assert!(
            gap < t1 - t0,
            "{service}: down {} ms, the whole push took {} ms",
            ms(gap),
            ms(t1 - t0)
        );
        first_stop = first_stop.min(c.finished_at);
        last_start = last_start.max(c.started_at);
    }
    // The stack's downtime from the containers' own times agrees with what the push reports.
    let span_ms = ms(last_start - first_stop);
    assert!(
        span_ms <= downtime_ms + 500 && downtime_ms <= span_ms + 2_000,
        "containers were down {span_ms} ms (first stop to last start), the push reports \
         source_downtime_ms = {downtime_ms}"
    );
}

#[test]
fn start_order_follows_dependencies_on_both_sides() {
    let w = World::new("order", "precopy = true\n", "", MIB);
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "first push failed:\n{dump}");
    let created = assert_healthy(&w.tgt_proj, "the target after the first push");

    // Second push: the target's stack exists, so the agent stops and starts it itself.
    fsx::write(w.src_data("marker"), "second\n");
    let (ok, _, dump, t0, t1) = w.push();
    assert!(ok, "second push failed:\n{dump}");

    let tgt = assert_healthy(&w.tgt_proj, "the target after the second push");
    for (service, c) in &tgt {
        assert_eq!(c.id, created[service].id, "target {service} was re-created");
        assert!(
            c.finished_at > t0 && c.started_at > c.finished_at && c.started_at < t1,
            "target {service} was not stopped and started by the second push: {c:?}"
        );
    }
    assert!(
        tgt["db"].started_at < tgt["app"].started_at,
        "target: app started {} ms before db",
        ms(tgt["db"].started_at - tgt["app"].started_at)
    );
    assert!(
        tgt["app"].finished_at <= tgt["db"].finished_at,
        "target: db stopped before app"
    );
    assert_eq!(
        read(&w.live_data("marker")),
        b"second\n",
        "the target's data is the second generation"
    );

    let src = wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
    for (service, c) in &src {
        assert!(
            c.finished_at > t0 && c.started_at < t1,
            "source {service} was not stopped and started by the second push: {c:?}"
        );
    }
    assert!(
        src["db"].started_at < src["app"].started_at,
        "source: app started {} ms before db",
        ms(src["db"].started_at - src["app"].started_at)
    );
    assert!(
        src["app"].finished_at <= src["db"].finished_at,
        "source: db stopped before app"
    );
}

/// A cycle that finds nothing to change commits its generation without stopping the standby:
/// its containers keep running, untouched. The next cycle with a change stops and starts them.
#[test]
fn a_cycle_with_nothing_to_change_leaves_the_standby_running() {
    // The app of COMPOSE appends to data/log on every start, so no two cycles would ever find
    // the same data; this one writes nothing on start.
    let quiet = COMPOSE.replace(r#"echo \"started $$(hostname)\" >> /data/log; "#, "");
    assert_ne!(quiet, COMPOSE);
    let w = World::with_compose("nochange", "", "", MIB, &quiet);
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "first push failed:\n{dump}");
    let created = assert_healthy(&w.tgt_proj, "the target after the first push");

    let (ok, o, dump, t0, _) = w.push();
    assert!(ok, "the unchanged push failed:\n{dump}");
    assert_eq!(o["generation"], 2, "{dump}");
    assert_eq!(o["files_sent"], 0, "{dump}");
    assert_eq!(o["target_downtime_ms"], 0, "{dump}");
    assert_eq!(w.p.target_generation(), 2);
    let kept = assert_healthy(&w.tgt_proj, "the target after the unchanged push");
    for (service, c) in &kept {
        let was = &created[service];
        assert_eq!(c.id, was.id, "target {service} was re-created");
        assert!(
            c.started_at == was.started_at && c.started_at < t0,
            "target {service} was restarted by a cycle with nothing to change: {c:?}"
        );
    }
    // The source was stopped for its final scan all the same: that is what makes the
    // generation consistent, and it cannot know beforehand that nothing changed.
    let src = wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
    assert!(src.values().all(|c| c.finished_at > t0), "{src:?}");

    fsx::write(w.src_data("marker"), "changed\n");
    let (ok, o, dump, t0, t1) = w.push();
    assert!(ok, "the third push failed:\n{dump}");
    assert!(o["target_downtime_ms"].as_u64().unwrap_or(0) > 0, "{dump}");
    let restarted = assert_healthy(&w.tgt_proj, "the target after the third push");
    for (service, c) in &restarted {
        assert!(
            c.finished_at > t0 && c.started_at > c.finished_at && c.started_at < t1,
            "target {service} was not stopped and started for a real change: {c:?}"
        );
    }
    assert_eq!(read(&w.live_data("marker")), b"changed\n");
    assert_eq!(w.p.target_generation(), 3);
}

#[test]
fn an_unhealthy_stack_on_the_target_is_rolled_back_and_restarted_healthy() {
    let w = World::new("health", "precopy = true\n", "auto_rollback = true\n", MIB);
    fsx::write(w.src_data("marker"), "generation 1\n");
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "first push failed:\n{dump}");
    assert_healthy(&w.tgt_proj, "the target on generation 1");
    assert_eq!(w.p.target_generation(), 1);

    // Generation 2 poisons the standby (see COMPOSE): the source stays healthy.
    fsx::write(w.src_data("poison"), "makes the standby's app unhealthy\n");
    fsx::write(w.src_data("marker"), "generation 2\n");
    std::thread::sleep(Duration::from_secs(3));
    assert_healthy(&w.src_proj, "the source with poison (its role is primary)");

    let (ok, o, dump, ..) = w.push();
    assert!(!ok, "a push onto an unhealthy stack succeeded:\n{dump}");
    assert_eq!(o["ok"], false, "{dump}");
    let error = o["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("health") && error.contains("rolled back to generation 1"),
        "the error does not name the health phase and the rollback: {error:?}\n{dump}"
    );

    // Rolled back: generation 1's data, running and healthy again.
    assert!(
        !w.live_data("poison").exists(),
        "the poison is still in the target's live dir"
    );
    assert_eq!(read(&w.live_data("marker")), b"generation 1\n");
    assert_healthy(&w.tgt_proj, "the target after the rollback");
    assert_eq!(w.p.target_generation(), 1, "{dump}");
    wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
}

/// The standby is stopped when the final pass begins (the plan is made against it stopped), so
/// a target agent killed during the transfer leaves it down; its restart record names what to
/// start. The primary runs again at once; the restarted target brings the standby back on the
/// old generation, whole, and the next push converges.
#[test]
fn a_target_killed_mid_cycle_leaves_the_primary_running_and_its_restart_brings_the_standby_back() {
    // A lost peer during the slow transfer finds the source stack down.
    let mut w = World::slow_at_generation_1("kill", "");

    // Generation 2: 64 files of 128 KiB, about 4 s at 2 MiB/s.
    w.write_generation_2(42);
    let t0 = now_ns();
    let mut push = w.start_slow_cycle(&["push", "web", "--json"]);
    w.p.kill_target();
    let killed = Instant::now();

    // The push notices the lost peer and fails; the source restarts its stack.
    let status = stackclone_tests::wait_exit(
        &mut push,
        Duration::from_secs(120),
        "the push, after the target's death",
    );
    eprintln!(
        "the push ended {:?} after the target was killed",
        killed.elapsed()
    );
    let out = push.wait_with_output().expect("push output");
    let dump = format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !status.success(),
        "the push succeeded with a dead target:\n{dump}"
    );
    let src = stack(&w.src_proj);
    for (service, c) in &src {
        assert!(
            c.finished_at > t0,
            "source {service} was not stopped for the pass, the kill proves nothing: {c:?}"
        );
        assert!(
            c.running,
            "source {service} is not running after the failed push: {c:?}\n{dump}"
        );
    }

    // The standby was stopped for the final pass and its agent died: it is down, and the
    // restart record says what to start.
    let record = w.p.state.join("stopped-containers.json");
    let text = std::fs::read_to_string(&record)
        .unwrap_or_else(|e| panic!("no restart record {}: {e}", record.display()));
    for (service, c) in &stack(&w.tgt_proj) {
        assert!(
            c.finished_at > t0 && text.contains(&c.id),
            "target {service} was not stopped for the final pass, or is not in the record: \
             {c:?}\n{text}"
        );
    }
    assert_eq!(read(&w.live_data("marker")), b"generation 1\n");
    assert!(
        !w.live_data("many").exists(),
        "generation 2 leaked into live"
    );

    // A restarted target brings the standby back on generation 1, then converges.
    let restarted = now_ns();
    w.p.start_target();
    let tgt = wait_healthy(&w.tgt_proj, Duration::from_secs(60), "the restarted target");
    for (service, c) in &tgt {
        assert!(
            c.started_at > restarted,
            "target {service} was not started: {c:?}"
        );
    }
    assert_eq!(w.p.target_generation(), 1);
    assert_eq!(read(&w.live_data("marker")), b"generation 1\n");
    wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "the push after the restart failed:\n{dump}");
    assert_eq!(w.p.target_generation(), 2);
    assert_healthy(&w.tgt_proj, "the target on generation 2");
    for rel in ["marker", "first", "catalog.db", "many/f00", "many/f63"] {
        assert_same_file(&w.src_data(rel), &w.live_data(rel));
    }
    wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
}

#[test]
fn sigterm_to_the_source_daemon_mid_cycle_leaves_both_sides_consistent_and_the_stack_running() {
    // The daemon's cycle spends seconds in the transfer with the source stack stopped. The
    // schedule fires every second.
    let w = World::slow_at_generation_1("term", "schedule = \"* * * * * *\"\n");
    let tgt_before = assert_healthy(&w.tgt_proj, "the target on generation 1");

    w.write_generation_2(43);
    let t0 = now_ns();
    let mut daemon = w.start_slow_cycle(&["run"]);
    stackclone_tests::signal(daemon.id(), "TERM");
    let status = stackclone_tests::wait_exit(
        &mut daemon,
        Duration::from_secs(120),
        "the daemon, after SIGTERM",
    );
    let out = daemon.wait_with_output().expect("daemon output");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(status.success(), "the daemon exited with {status}:\n{log}");

    // The source stack was stopped for the cycle and runs again.
    let src = wait_healthy(
        &w.src_proj,
        Duration::from_secs(30),
        "the source after SIGTERM",
    );
    for (service, c) in &src {
        assert!(
            c.finished_at > t0,
            "source {service} was not stopped for the cycle, SIGTERM proves nothing: {c:?}"
        );
        assert!(c.running, "source {service} is not running: {c:?}\n{log}");
    }
    // The target stays on generation 1, whole and untouched: its standby was stopped for the
    // final pass and is started again, on the old data, once the source's abort arrived.
    assert_eq!(w.p.target_generation(), 1, "{log}");
    assert_eq!(read(&w.live_data("marker")), b"generation 1\n");
    assert!(
        !w.live_data("many").exists(),
        "generation 2 leaked into live"
    );
    let tgt = wait_healthy(
        &w.tgt_proj,
        Duration::from_secs(30),
        "the target after the interrupted cycle",
    );
    for (service, c) in &tgt {
        assert_eq!(
            c.id, tgt_before[service].id,
            "target {service} was re-created"
        );
        assert!(
            c.finished_at > t0 && c.started_at > c.finished_at,
            "target {service} was not stopped for the final pass and started again: {c:?}"
        );
    }
    assert!(!w.p.state.join("stopped-containers.json").exists());
    // And the next cycle converges.
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "the push after SIGTERM failed:\n{dump}");
    assert_eq!(w.p.target_generation(), 2);
    for rel in ["marker", "first", "many/f00", "many/f63"] {
        assert_same_file(&w.src_data(rel), &w.live_data(rel));
    }
    wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
}

/// SIGKILLs the source process `child` while its cycle has the source stack stopped, and
/// checks that it is left stopped, with the restart record naming what to start.
fn kill_source_with_the_stack_down(w: &World, mut child: std::process::Child, t0: i128) {
    let _ = child.kill();
    let _ = child.wait();
    let record = w.p.src_state.join("web.stopped.json");
    let text = std::fs::read_to_string(&record)
        .unwrap_or_else(|e| panic!("no restart record {} after SIGKILL: {e}", record.display()));
    for (service, c) in &stack(&w.src_proj) {
        assert!(
            c.finished_at > t0 && !c.running,
            "source {service} should be down after SIGKILL mid-cycle: {c:?}"
        );
        assert!(
            text.contains(&c.id),
            "the restart record does not name {service} ({}):\n{text}",
            c.id
        );
    }
}

/// Issue "Real databases" (5, 6): a push killed (SIGKILL, the OOM killer) with the primary's
/// stack stopped does not leave it down. The source daemon, running all along, notices within
/// seconds and starts it; `stackclone-source recover` does the same by hand (or as a unit's
/// `ExecStopPost=`); and the next push does it before its own cycle. On the target, the dead
/// source's session is superseded by the next push at once instead of holding the stack until
/// QUIC's idle timeout, and a session nobody supersedes gives the standby back on its own.
#[test]
fn a_source_killed_with_its_stack_stopped_is_started_by_the_daemon_recover_or_the_next_push() {
    let w = World::slow_at_generation_1("sigkill", "");

    // 1. The daemon runs (no schedule: it runs no cycle of its own); a push is killed
    //    mid-transfer. The daemon's sweep starts the stack within seconds.
    let daemon = stackclone_tests::spawn(
        w.p.source_cmd(&["run"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    w.write_generation_2(44);
    let t0 = now_ns();
    let push = w.start_slow_cycle(&["push", "web", "--json"]);
    kill_source_with_the_stack_down(&w, push, t0);
    let killed = Instant::now();
    let src = wait_healthy(
        &w.src_proj,
        Duration::from_secs(20),
        "the source, restarted by the daemon's sweep",
    );
    let took = killed.elapsed();
    assert!(src.values().all(|c| c.running));
    assert!(
        took < Duration::from_secs(15),
        "the daemon took {took:?} to start the stack"
    );
    eprintln!("the daemon started the stack {took:?} after the push was killed");
    stackclone_tests::signal(daemon.id(), "TERM");
    let out = daemon.wait_with_output().expect("daemon output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("a cycle that died left the stack stopped; started it again"),
        "the daemon did not say it recovered the stack:\n{log}"
    );
    assert!(!w.p.src_state.join("web.stopped.json").exists(), "{log}");
    // The target's session of the dead push ends on its own (QUIC's idle timeout): the standby,
    // stopped for the final pass, runs again on generation 1.
    wait_healthy(
        &w.tgt_proj,
        Duration::from_secs(60),
        "the standby after its source died",
    );
    assert_eq!(w.p.target_generation(), 1);
    assert_eq!(read(&w.live_data("marker")), b"generation 1\n");

    // 2. Killed again; `stackclone-source recover` starts it.
    w.write_generation_2(45);
    let t0 = now_ns();
    let push = w.start_slow_cycle(&["push", "web", "--json"]);
    kill_source_with_the_stack_down(&w, push, t0);
    let r = stackclone_tests::run(w.p.source_cmd(&["recover", "--json"]));
    r.ok();
    let j = r.json();
    assert_eq!(j[0]["stack"], "web", "{}", r.stdout);
    assert_eq!(j[0]["result"], "started", "{}", r.stdout);
    assert_eq!(
        j[0]["containers"].as_array().map(Vec::len),
        Some(2),
        "{}",
        r.stdout
    );
    wait_healthy(
        &w.src_proj,
        Duration::from_secs(30),
        "the source after recover",
    );
    let again = stackclone_tests::run(w.p.source_cmd(&["recover", "web"]));
    assert_eq!(again.ok().stdout, "web: nothing left stopped\n");

    // 3. Killed once more, and the next push comes at once: it starts the stack before its
    //    own cycle, and the target lets it supersede the dead push's session (still open until
    //    QUIC's idle timeout) rather than refusing it as busy.
    w.write_generation_2(46);
    let t0 = now_ns();
    let push = w.start_slow_cycle(&["push", "web", "--json"]);
    kill_source_with_the_stack_down(&w, push, t0);
    let started = Instant::now();
    let (ok, o, dump, ..) = w.push();
    let took = started.elapsed();
    assert!(ok, "the push after the kill failed:\n{dump}");
    assert!(
        dump.contains("left stopped by a process that died"),
        "the push did not say it recovered the stack:\n{dump}"
    );
    assert!(
        dump.contains("supersedes"),
        "the target did not say the new session superseded the dead one:\n{dump}"
    );
    assert_eq!(o["generation"], 2, "{o}");
    eprintln!("the superseding push took {took:?}");
    for rel in ["marker", "first", "many/f00", "many/f63"] {
        assert_same_file(&w.src_data(rel), &w.live_data(rel));
    }
    wait_healthy(
        &w.src_proj,
        Duration::from_secs(30),
        "the source after the push",
    );
    assert_healthy(&w.tgt_proj, "the target on generation 2");
    assert!(!w.p.src_state.join("web.stopped.json").exists());
}

#[test]
fn a_target_killed_with_its_stack_stopped_starts_it_again_when_it_restarts() {
    let mut w = World::new("tgtkill", "", "", MIB / 4);
    // The target's db ignores SIGTERM, so stopping it takes the whole stop_timeout (5 s): a
    // window, with the app already stopped, in which to kill the target agent. Only the target
    // gets this: its containers are created from the synced compose file, while the source's
    // already exist and keep the command they were created with.
    let file = w.p.src.join("docker-compose.yml");
    let compose = std::fs::read_to_string(&file).expect("compose file");
    let db = "command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; touch /tmp/ready;";
    assert!(compose.contains(db), "the db's command moved:\n{compose}");
    fsx::write(
        &file,
        compose.replace(
            db,
            "command: [\"sh\", \"-c\", \"trap '' TERM; touch /tmp/ready;",
        ),
    );
    fsx::write(w.src_data("marker"), "generation 1\n");
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "first push failed:\n{dump}");
    assert_healthy(&w.tgt_proj, "the target on generation 1");
    let record = w.p.state.join("stopped-containers.json");
    assert!(!record.exists(), "a finished cycle left its restart record");

    // Generation 2's final pass stops the target's stack: kill the agent half-way through the
    // stop.
    w.write_generation_2(46);
    let mut push = stackclone_tests::spawn(
        w.p.push_cmd(&["--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let app_down = stack(&w.tgt_proj).get("app").is_some_and(|c| !c.running);
        if app_down && record.exists() {
            break;
        }
        if push.try_wait().expect("try_wait").is_some() {
            let out = push.wait_with_output().expect("push output");
            panic!(
                "the push ended before the target stopped its stack:\n{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                w.p.target_log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the target did not stop its app in 120 s:\n{}",
            w.p.target_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w.p.kill_target();
    let killed = now_ns();
    // The engine finishes the db's stop on its own (SIGKILL after 5 s): the whole stack is down,
    // and only the record says what to start.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack(&w.tgt_proj).values().any(|c| c.running) {
        assert!(
            Instant::now() < deadline,
            "the target's db is still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&record).expect("the restart record");
    for (service, c) in &stack(&w.tgt_proj) {
        assert!(
            text.contains(&c.id),
            "the restart record does not name {service} ({}):\n{text}",
            c.id
        );
    }

    // A restarted target starts the stack by itself, without waiting for a push.
    w.p.start_target();
    let tgt = wait_healthy(
        &w.tgt_proj,
        Duration::from_secs(60),
        "the target after its agent restarted",
    );
    for (service, c) in &tgt {
        assert!(
            c.running && c.started_at > killed,
            "target {service} was not started by the restarted agent: {c:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while record.exists() {
        assert!(
            Instant::now() < deadline,
            "the restart record outlived the recovery:\n{}",
            w.p.target_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.p.target_log();
    assert!(
        log.contains("left stopped by a killed target"),
        "the target did not say it recovered the stack:\n{log}"
    );
    // The kill came before the commit: the live dir is generation 1, whole.
    assert_eq!(w.p.target_generation(), 1, "{log}");
    assert_eq!(read(&w.live_data("marker")), b"generation 1\n");
    assert!(
        !w.live_data("many").exists(),
        "generation 2 leaked into live"
    );

    // The push that lost its target fails; the next one converges.
    let out = push.wait_with_output().expect("push output");
    assert!(
        !out.status.success(),
        "a push whose target was killed succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_healthy(&w.src_proj, Duration::from_secs(30), "the source");
    let (ok, o, dump, ..) = w.push();
    assert!(ok, "the push after the restart failed:\n{dump}");
    assert_eq!(o["generation"], 2, "{o}");
    for rel in ["marker", "first", "many/f00", "many/f63"] {
        assert_same_file(&w.src_data(rel), &w.live_data(rel));
    }
    assert_healthy(&w.tgt_proj, "the target on generation 2");
    assert!(!record.exists());
}

/// Issue "Real databases" (5): a push typed by hand whose terminal closes (SIGHUP) ends its
/// cycle cleanly, as for Ctrl-C: the stack runs again and the target commits nothing. A push
/// whose output is piped into `head` goes on when the pipe closes, commits, and starts the
/// stack: nothing it prints can hold the stack down.
#[test]
fn a_closed_terminal_or_a_closed_pipe_never_leaves_the_primary_down() {
    let w = World::slow_at_generation_1("hup", "");

    w.write_generation_2(47);
    let t0 = now_ns();
    let mut push = w.start_slow_cycle(&["push", "web"]);
    stackclone_tests::signal(push.id(), "HUP");
    stackclone_tests::wait_exit(&mut push, Duration::from_secs(60), "the push, after SIGHUP");
    let out = push.wait_with_output().expect("push output");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "an interrupted push succeeded:\n{log}"
    );
    assert!(
        log.contains("signal=\"SIGHUP\"") || log.contains("signal=SIGHUP"),
        "{log}"
    );
    let src = wait_healthy(
        &w.src_proj,
        Duration::from_secs(30),
        "the source after SIGHUP",
    );
    for (service, c) in &src {
        assert!(
            c.finished_at > t0,
            "source {service} was never stopped: {c:?}"
        );
    }
    assert!(!w.p.src_state.join("web.stopped.json").exists(), "{log}");
    assert_eq!(w.p.target_generation(), 1);

    // Piped into `head`: head exits after the first lines; the push must not care. First its
    // progress lines alone, then its logs too (`2>&1`: the binary before this test hung there
    // for good with the stack stopped, deaf to SIGTERM).
    let q = |p: &Path| format!("'{}'", p.display());
    let push = format!(
        "{} --config {} --state-dir {} push web",
        q(&stackclone_tests::bin("stackclone-source")),
        q(&w.p.source_config),
        q(&w.p.src_state)
    );
    for (generation, pipe) in [(2, "| head -1"), (3, "2>&1 | head -3")] {
        if generation == 3 {
            fsx::write(w.src_data("marker"), "generation 3\n");
        }
        let mut cmd = std::process::Command::new("timeout");
        let line = format!("{push} {pipe}; exit ${{PIPESTATUS[0]}}");
        cmd.args(["120", "bash", "-c", &line]);
        let r = stackclone_tests::run(cmd);
        assert!(
            r.status.success(),
            "`push {pipe}` failed or hung ({}):\n{}\n--- target log\n{}",
            r.status,
            r.dump(),
            w.p.target_log()
        );
        if generation == 2 {
            assert_eq!(r.stdout, "web: connect\n", "{}", r.dump());
        }
        assert!(!r.stdout.contains("panicked"), "{}", r.dump());
        assert!(!r.stderr.contains("panicked"), "{}", r.dump());
        assert_eq!(w.p.target_generation(), generation);
        wait_healthy(
            &w.src_proj,
            Duration::from_secs(30),
            "the source after a piped push",
        );
    }
    for rel in ["marker", "many/f00", "many/f63"] {
        assert_same_file(&w.src_data(rel), &w.live_data(rel));
    }
    assert_healthy(&w.tgt_proj, "the target on generation 3");
}

/// `compose_policy = "strict"` on the standby, and a source whose compose file mounts the host's
/// `/etc` into `db` (privileged would do, but this machine's nested engine cannot run it): the
/// push fails naming the policy, no container of the standby runs (the primary does), and once
/// the source drops the mount, the next push brings the standby up.
#[test]
fn a_strict_standby_starts_nothing_from_an_escaping_compose_file() {
    let escaping = COMPOSE.replace(
        "  db:\n    image: IMAGE\n",
        "  db:\n    image: IMAGE\n    volumes: [\"/etc:/host-etc:ro\"]\n",
    );
    assert_ne!(escaping, COMPOSE);
    let w = World::with_compose(
        "strict",
        "precopy = true\n",
        "compose_policy = \"strict\"\nauto_rollback = true\n",
        MIB / 8,
        &escaping,
    );
    let (ok, o, dump, ..) = w.push();
    assert!(!ok, "the standby mounted the host's /etc:\n{dump}");
    let error = o["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("compose_policy") && error.contains("db: bind mount of /etc"),
        "{error:?}\n{dump}"
    );
    let standby = stack(&w.tgt_proj);
    assert!(
        standby.values().all(|c| !c.running),
        "a standby container runs: {standby:?}"
    );
    wait_healthy(&w.src_proj, Duration::from_secs(30), "the primary");

    // The source drops the mount; its stack is recreated, and the next push is accepted.
    fsx::write(
        w.p.src.join("docker-compose.yml"),
        COMPOSE.replace("IMAGE", IMAGE),
    );
    compose::compose(
        &w.p.src,
        &w.src_proj,
        &[("STACKCLONE_ROLE", "primary")],
        &["up", "-d"],
    );
    wait_healthy(
        &w.src_proj,
        Duration::from_secs(60),
        "the primary, recreated",
    );
    let (ok, _, dump, ..) = w.push();
    assert!(ok, "the tame stack was refused:\n{dump}");
    assert_healthy(&w.tgt_proj, "the strict standby on the tame compose file");
}

/// `docker inspect`'s `Config.Env` of a container.
fn env_of(id: &str) -> Vec<String> {
    serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        id,
    ]))
    .expect("Config.Env as JSON")
}

/// The standby differs where it must: `compose_env` wins over the `.env` synced from the
/// primary in Compose's interpolation, and a `compose_override` kept outside the synced path
/// adds to the project's files; the primary runs its own definition, and the override survives
/// the commit (a file only the standby had in the synced path would not).
#[test]
fn the_standby_runs_with_its_own_compose_env_and_override_and_the_primary_with_its_files() {
    let own = tempfile::tempdir().expect("temp dir");
    let over = own.path().join("web.yml");
    let over_text = "version: \"2.4\"\nservices:\n  app:\n    environment:\n      \
                     STANDBY_ONLY: from-the-override\n";
    fsx::write(&over, over_text);
    let w = World::new(
        "differ",
        "precopy = true\n",
        &format!(
            "compose_override = \"{}\"\ncompose_env = {{ STACKCLONE_ROLE = \"warm\" }}\n",
            over.display()
        ),
        MIB / 8,
    );
    // The primary's .env, synced with the data: without compose_env the standby would use it.
    fsx::write(w.p.src.join(".env"), "STACKCLONE_ROLE=from-dotenv\n");

    let (ok, _, dump, ..) = w.push();
    assert!(ok, "push failed:\n{dump}");
    let tgt = assert_healthy(&w.tgt_proj, "the standby after the push");
    let standby_env = env_of(&tgt["app"].id);
    for want in ["STACKCLONE_ROLE=warm", "STANDBY_ONLY=from-the-override"] {
        assert!(
            standby_env.iter().any(|e| e == want),
            "{want} missing on the standby: {standby_env:?}\n{dump}"
        );
    }
    let src = wait_healthy(&w.src_proj, Duration::from_secs(30), "the primary");
    let primary_env = env_of(&src["app"].id);
    assert!(
        primary_env.iter().any(|e| e == "STACKCLONE_ROLE=primary")
            && !primary_env.iter().any(|e| e.starts_with("STANDBY_ONLY=")),
        "the primary's app: {primary_env:?}"
    );
    assert_same_file(&w.p.src.join(".env"), &w.p.live.join(".env"));
    assert_eq!(std::fs::read_to_string(&over).expect("override"), over_text);
}
