//! `ComposeStack` against the real Docker engine: Compose v1 (`docker-compose`) on an API 1.41
//! engine here, images built locally by `deploy/image/build.sh` (nothing can be pulled).
//!
//! Each test brings up its own project (a name unique to the test and the run) from its own
//! temp dir, and a guard removes the project's containers and network however the test ends.
//! If the daemon does not answer, these tests fail: CI guarantees the daemon.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerState;
use stackclone_common::config::Hook;
use stackclone_common::control::StackControl;
use stackclone_common::docker::{
    ComposeConfig, ComposeStack, Creation, DockerError, Health, HookPhase, HostConflict,
    OrderSource, StackContainer,
};
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

mod support;

use support::LogCapture;

const IMAGE: &str = "stackclone-test/busybox:1";

/// Sleeps in the background and `wait`s, so the TERM trap runs at once (PID 1 ignores TERM
/// without a handler, and a foreground `sleep` would delay the trap).
const IDLE: &str = "while :; do sleep 1 & wait $$!; done";

/// `db` (health: a file it touches) and `app` (depends on db, writes to the bind-mounted
/// `./data`, health: that it wrote).
fn two_services() -> String {
    format!(
        r#"version: "2.4"
services:
  db:
    image: {IMAGE}
    command: ["sh", "-c", "trap 'exit 0' TERM; touch /tmp/ready; {IDLE}"]
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready"]
      interval: 1s
      timeout: 2s
      retries: 30
  app:
    image: {IMAGE}
    depends_on: [db]
    volumes: ["./data:/data"]
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do date >> /data/log; sleep 1 & wait $$!; done"]
    healthcheck:
      test: ["CMD-SHELL", "test -s /data/log"]
      interval: 1s
      timeout: 2s
      retries: 30
"#
    )
}

/// A service that stops on TERM at once and has no health check.
fn idle_service(name: &str, extra: &str) -> String {
    format!(
        r#"  {name}:
    image: {IMAGE}
    command: ["sh", "-c", "trap 'exit 0' TERM; {IDLE}"]
{extra}"#
    )
}

fn ensure_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/build.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A Compose project in a temp dir; dropping it removes its containers, volumes and network.
struct Project {
    name: String,
    dir: TempDir,
}

impl Project {
    fn new(tag: &str, compose: &str) -> Project {
        ensure_image();
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        // Lowercase a-z0-9 only: Compose v1 normalises anything else.
        let name = format!(
            "sct{}x{}x{nanos}{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("docker-compose.yml"), compose).expect("compose file");
        std::fs::create_dir(dir.path().join("data")).expect("data dir");
        Project { name, dir }
    }

    fn config(&self) -> ComposeConfig {
        ComposeConfig {
            stop_timeout: Duration::from_secs(5),
            health_timeout: Duration::from_secs(60),
            ..ComposeConfig::new(&self.name, self.dir.path())
        }
    }

    fn data(&self, rel: &str) -> PathBuf {
        self.dir.path().join("data").join(rel)
    }

    async fn stack(&self, config: ComposeConfig) -> ComposeStack {
        ComposeStack::connect(config)
            .await
            .expect("the Docker daemon must answer (CI guarantees it)")
    }

    /// A stack with the default config whose containers exist and run.
    async fn up(&self) -> ComposeStack {
        let stack = self.stack(self.config()).await;
        match stack.create_if_missing().await {
            Ok(Creation::Created { .. }) => {}
            other => panic!("creating {}: {other:?}", self.name),
        }
        stack
    }
}

impl Drop for Project {
    /// What `docker-compose down -v` does, by label and without its two seconds of Python:
    /// containers (also those made outside Compose, labelled `stackclone.test`), then the
    /// project's networks and volumes.
    fn drop(&mut self) {
        let by_label = |what: &[&str], label: &str| -> Vec<String> {
            Command::new("docker")
                .args(what)
                .args(["-q", "--filter", &format!("label={label}={}", self.name)])
                .output()
                .map(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let remove = |what: &[&str], ids: Vec<String>| {
            if !ids.is_empty() {
                let _ = Command::new("docker").args(what).args(&ids).output();
            }
        };
        let project = "com.docker.compose.project";
        let mut containers = by_label(&["ps", "-a"], project);
        containers.extend(by_label(&["ps", "-a"], "stackclone.test"));
        remove(&["rm", "-f", "-v"], containers);
        remove(&["network", "rm"], by_label(&["network", "ls"], project));
        remove(
            &["volume", "rm", "-f"],
            by_label(&["volume", "ls"], project),
        );
    }
}

async fn engine() -> Docker {
    Docker::connect_with_local_defaults()
        .expect("docker socket")
        .negotiate_version()
        .await
        .expect("the Docker daemon must answer")
}

async fn state(docker: &Docker, id: &str) -> ContainerState {
    docker
        .inspect_container(id, None)
        .await
        .expect("inspect")
        .state
        .expect("state")
}

fn parse_time(s: &str) -> OffsetDateTime {
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("time {s:?}: {e}"))
}

async fn started_at(docker: &Docker, id: &str) -> OffsetDateTime {
    parse_time(&state(docker, id).await.started_at.expect("StartedAt"))
}

async fn finished_at(docker: &Docker, id: &str) -> OffsetDateTime {
    parse_time(&state(docker, id).await.finished_at.expect("FinishedAt"))
}

async fn is_running(docker: &Docker, id: &str) -> bool {
    state(docker, id).await.running == Some(true)
}

/// service → id of its (single) container.
fn ids(containers: &[StackContainer]) -> HashMap<String, String> {
    containers
        .iter()
        .map(|c| (c.container.service.clone(), c.container.id.clone()))
        .collect()
}

fn hook(service: &str, command: &[&str]) -> Hook {
    Hook {
        service: service.to_owned(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_if_missing_brings_up_the_project_with_the_compose_cli() {
    let p = Project::new("create", &two_services());
    let stack = p.stack(p.config()).await;
    assert!(stack.containers().await.expect("list").is_empty());

    let created = stack.create_if_missing().await.expect("create");
    let Creation::Created {
        command,
        containers,
    } = created
    else {
        panic!("expected Created, got {created:?}");
    };
    assert!(
        command.ends_with(&format!("-p {} up -d --remove-orphans", p.name)),
        "command: {command}"
    );
    let mut services: Vec<&str> = containers.iter().map(|c| c.service.as_str()).collect();
    services.sort();
    assert_eq!(services, ["app", "db"]);

    // Things that look like the stack but are not: a container named like one of it without
    // the labels, and a one-off `docker-compose run` container of the project.
    let docker = engine().await;
    let decoy = format!("{}_db_2", p.name);
    let out = Command::new("docker")
        .args(["run", "-d", "--name", &decoy, "--label"])
        .arg(format!("stackclone.test={}", p.name))
        .args([IMAGE, "sleep", "300"])
        .output()
        .expect("docker run");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("docker-compose")
        .args(["-p", &p.name, "run", "-d", "db", "sleep", "300"])
        .current_dir(p.dir.path())
        .output()
        .expect("docker-compose run");
    assert!(out.status.success(), "{out:?}");

    let listed = stack.containers().await.expect("list");
    let by_service: Vec<(&str, &str)> = listed
        .iter()
        .map(|c| (c.container.service.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(by_service, [("app", "running"), ("db", "running")]);
    for c in &listed {
        assert!(is_running(&docker, &c.container.id).await);
        assert!(c.container.name.starts_with(&p.name), "{c:?}");
        assert_eq!(c.depends_on, None, "Compose v1 writes no depends_on label");
    }
    assert!(!listed.iter().any(|c| c.container.name == decoy));

    // The project exists now (even stopped): no second `up`.
    let app = &ids(&listed)["app"];
    docker.stop_container(app, None).await.expect("stop app");
    assert_eq!(
        stack.create_if_missing().await.expect("again"),
        Creation::Existed
    );
    assert!(
        !is_running(&docker, app).await,
        "create_if_missing started an existing stack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_start_restores_exactly_the_running_containers() {
    let compose = format!("{}{}", two_services(), idle_service("extra", ""));
    let p = Project::new("restore", &compose);
    let stack = Arc::new(p.up().await);
    // The agents hold the stack as a trait object.
    let control: Arc<dyn StackControl> = stack.clone();
    let docker = engine().await;
    let before = ids(&stack.containers().await.expect("list"));
    assert_eq!(before.len(), 3);
    docker
        .stop_container(&before["extra"], None)
        .await
        .expect("stop extra beforehand");

    let stopped = control.stop().await.expect("stop");
    let mut services: Vec<&str> = stopped
        .stopped
        .iter()
        .map(|e| e.container.service.as_str())
        .collect();
    services.sort();
    assert_eq!(services, ["app", "db"], "only what was running is stopped");
    for id in before.values() {
        assert!(!is_running(&docker, id).await, "{id} still runs after stop");
    }

    let started = control.start().await.expect("start");
    let mut services: Vec<&str> = started
        .started
        .iter()
        .map(|e| e.container.service.as_str())
        .collect();
    services.sort();
    assert_eq!(services, ["app", "db"]);
    assert!(is_running(&docker, &before["db"]).await);
    assert!(is_running(&docker, &before["app"]).await);
    assert!(
        !is_running(&docker, &before["extra"]).await,
        "a container stopped before the cycle was started"
    );
    // The same containers, not new ones.
    assert_eq!(ids(&stack.containers().await.expect("list")), before);

    let downtime = started.downtime_since(&stopped).expect("downtime");
    assert!(
        downtime > Duration::ZERO && downtime < Duration::from_secs(30),
        "{downtime:?}"
    );
    for e in stopped.stopped.iter().chain(&started.started) {
        assert!(e.began <= e.done);
    }

    // A start with nothing stopped starts nothing.
    docker
        .stop_container(&before["app"], None)
        .await
        .expect("stop app");
    let again = control.start().await.expect("second start");
    assert!(again.started.is_empty(), "{again:?}");
    assert!(!is_running(&docker, &before["app"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_start_follow_dependency_order() {
    // Name order (app, mid, zdb) is the reverse of the dependency order, so a sort by name
    // cannot pass by accident.
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}{}{}",
        idle_service("app", "    depends_on: [mid]\n"),
        idle_service("mid", "    depends_on: [zdb]\n"),
        idle_service("zdb", "")
    );
    let p = Project::new("order", &compose);
    p.up().await;
    let docker = engine().await;

    let by_depends_on = ComposeConfig {
        depends_on: [
            ("app".to_owned(), strings(&["mid"])),
            ("mid".to_owned(), strings(&["zdb"])),
        ]
        .into(),
        ..p.config()
    };
    let by_order = ComposeConfig {
        order: strings(&["zdb", "mid", "app"]),
        ..p.config()
    };
    // Nothing in the stack's config: the compose file's depends_on, which Compose v1 ordered
    // the creation by but wrote no label of.
    for (config, source) in [
        (by_depends_on, OrderSource::ConfigDependsOn),
        (by_order, OrderSource::ConfigOrder),
        (p.config(), OrderSource::ComposeFile),
    ] {
        let stack = p.stack(config).await;
        let plan = stack.plan().await.expect("plan");
        assert_eq!(plan.source, source);
        assert_eq!(plan.start_order, ["zdb", "mid", "app"]);
        let id = ids(&stack.containers().await.expect("list"));

        let stopped = stack.stop().await.expect("stop");
        let order: Vec<&str> = stopped
            .stopped
            .iter()
            .map(|e| e.container.service.as_str())
            .collect();
        assert_eq!(order, ["app", "mid", "zdb"], "{source:?}");
        let (app, mid, zdb) = (
            finished_at(&docker, &id["app"]).await,
            finished_at(&docker, &id["mid"]).await,
            finished_at(&docker, &id["zdb"]).await,
        );
        assert!(
            app < mid && mid < zdb,
            "{source:?}: stopped at app {app}, mid {mid}, zdb {zdb}"
        );

        stack.start().await.expect("start");
        let (app, mid, zdb) = (
            started_at(&docker, &id["app"]).await,
            started_at(&docker, &id["mid"]).await,
            started_at(&docker, &id["zdb"]).await,
        );
        assert!(
            zdb < mid && mid < app,
            "{source:?}: started at zdb {zdb}, mid {mid}, app {app}"
        );
    }
}

// current_thread: the log capture is per thread.
#[tokio::test(flavor = "current_thread")]
async fn a_stack_with_no_order_anywhere_goes_by_name_and_warns_once_per_cycle() {
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}{}",
        idle_service("web", ""),
        idle_service("db", "")
    );
    let p = Project::new("noorder", &compose);
    // Bringing it up is a cycle of its own (and warns itself); count from the next one.
    p.up().await;
    let captured = LogCapture::start();

    // One ComposeStack is one cycle: stop, start, and another plan warn once between them.
    let stack = p.stack(p.config()).await;
    let plan = stack.plan().await.expect("plan");
    assert_eq!(plan.source, OrderSource::Names);
    assert_eq!(plan.start_order, ["db", "web"]);
    stack.stop().await.expect("stop");
    stack.start().await.expect("start");
    let text = captured.text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("no start order is known"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    for want in [
        &format!("stack {}", p.name),
        "db, web",
        "depends_on in the compose file",
        "order = [...]",
    ] {
        assert!(
            warnings[0].contains(want),
            "{want:?} missing from: {}",
            warnings[0]
        );
    }

    // The next cycle warns again.
    p.stack(p.config()).await.plan().await.expect("plan");
    let text = captured.text();
    assert_eq!(text.matches("no start order is known").count(), 2, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_cycle_is_an_error_and_stops_nothing() {
    let p = Project::new("cycle", &two_services());
    let running = p.up().await.containers().await.expect("list");
    let docker = engine().await;
    let stack = p
        .stack(ComposeConfig {
            depends_on: [
                ("app".to_owned(), strings(&["db"])),
                ("db".to_owned(), strings(&["app"])),
            ]
            .into(),
            pre_stop: vec![hook("app", &["touch", "/data/pre_stop_ran"])],
            ..p.config()
        })
        .await;
    let err = stack.stop().await.expect_err("a cycle must fail");
    assert!(
        matches!(&err, DockerError::DependencyCycle { cycle, .. } if cycle == &strings(&["app", "db", "app"])),
        "{err:?}"
    );
    assert!(err.to_string().contains("app -> db -> app"), "{err}");
    for c in &running {
        assert!(is_running(&docker, &c.container.id).await);
    }
    assert!(
        !p.data("pre_stop_ran").exists(),
        "a hook ran although the order was invalid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_stop_hook_stops_nothing_and_reports_its_output() {
    let p = Project::new("hookfail", &two_services());
    let running = p.up().await.containers().await.expect("list");
    let docker = engine().await;
    let mut started_before = Vec::new();
    for c in &running {
        started_before.push(started_at(&docker, &c.container.id).await);
    }

    let stack = p
        .stack(ComposeConfig {
            pre_stop: vec![hook(
                "db",
                &["sh", "-c", "echo flushing; echo disk full >&2; exit 3"],
            )],
            post_start: vec![hook("app", &["touch", "/data/post_start_ran"])],
            ..p.config()
        })
        .await;
    let err = stack.stop().await.expect_err("the hook fails");
    match &err {
        DockerError::HookFailed {
            phase,
            container,
            exit_code,
            output,
            ..
        } => {
            assert_eq!(*phase, HookPhase::PreStop);
            assert_eq!(container.service, "db");
            assert_eq!(*exit_code, 3);
            assert!(
                output.contains("flushing") && output.contains("disk full"),
                "{output:?}"
            );
        }
        other => panic!("expected HookFailed, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("disk full"), "{message}");
    assert!(message.contains("nothing was stopped"), "{message}");
    assert!(
        message.contains(&p.name),
        "the error names the project: {message}"
    );

    for (c, before) in running.iter().zip(&started_before) {
        assert!(
            is_running(&docker, &c.container.id).await,
            "{} was stopped",
            c.container.name
        );
        assert_eq!(
            started_at(&docker, &c.container.id).await,
            *before,
            "{} restarted",
            c.container.name
        );
    }
    // The agent calls start on its failure path: nothing to start, and no post_start hook for
    // a stop that never happened.
    let started = stack.start().await.expect("start after a failed stop");
    assert!(
        started.started.is_empty() && started.hooks.is_empty(),
        "{started:?}"
    );
    assert!(!p.data("post_start_ran").exists());

    // A hook naming a service without a running container fails the same way.
    let stack = p
        .stack(ComposeConfig {
            pre_stop: vec![hook("cache", &["true"])],
            ..p.config()
        })
        .await;
    let err = stack.stop().await.expect_err("no such service");
    assert!(
        matches!(&err, DockerError::HookServiceNotRunning { service, .. } if service == "cache"),
        "{err:?}"
    );
    assert!(err.to_string().contains("app, db"), "{err}");
    for c in &running {
        assert!(is_running(&docker, &c.container.id).await);
    }
}

// current_thread: the log capture is per thread, and the hooks must log on it.
#[tokio::test(flavor = "current_thread")]
async fn hooks_run_in_the_named_service_and_their_output_is_logged_or_returned() {
    let captured = LogCapture::start();

    let p = Project::new("hooks", &two_services());
    let id = ids(&p.up().await.containers().await.expect("list"));
    // Docker's default hostname is the first 12 hex digits of the container id.
    let (app_host, db_host) = (&id["app"][..12], &id["db"][..12]);
    let docker = engine().await;

    let stack = p
        .stack(ComposeConfig {
            pre_stop: vec![
                // Only app has ./data mounted: the file proves where it ran.
                hook("app", &["sh", "-c", "hostname | tee /data/pre_stop_host"]),
                hook("db", &["sh", "-c", "echo line-one; echo line-two"]),
            ],
            post_start: vec![hook(
                "db",
                &[
                    "sh",
                    "-c",
                    "echo post-start in $(hostname); echo to-stderr >&2",
                ],
            )],
            ..p.config()
        })
        .await;
    let stopped = stack.stop().await.expect("stop");
    assert_eq!(stopped.hooks.len(), 2);
    assert_eq!(stopped.hooks[0].container.service, "app");
    assert_eq!(stopped.hooks[0].container.id, id["app"]);
    assert_eq!(stopped.hooks[0].output.trim(), app_host);
    assert_eq!(
        std::fs::read_to_string(p.data("pre_stop_host"))
            .expect("written by the hook")
            .trim(),
        app_host
    );
    assert_eq!(stopped.hooks[1].container.service, "db");
    assert_eq!(stopped.hooks[1].output, "line-one\nline-two\n");
    assert!(!is_running(&docker, &id["app"]).await && !is_running(&docker, &id["db"]).await);

    let started = stack.start().await.expect("start");
    assert_eq!(started.hooks.len(), 1);
    let post = &started.hooks[0];
    assert_eq!(post.phase, HookPhase::PostStart);
    assert_eq!(post.container.service, "db");
    assert!(
        post.output.contains(&format!("post-start in {db_host}")),
        "{:?}",
        post.output
    );
    assert!(post.output.contains("to-stderr"), "{:?}", post.output);

    let log = captured.text();
    for line in [
        "line=line-one",
        "line=line-two",
        &format!("line=post-start in {db_host}"),
        "line=to-stderr",
    ] {
        assert!(log.contains(line), "{line:?} not logged:\n{log}");
    }
    assert!(
        log.contains("stream=\"stderr\"") || log.contains("stream=stderr"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_healthy_succeeds_and_an_unhealthy_stack_fails_with_the_health_log() {
    // Healthy: db has a health check, plain has none.
    let healthy = Project::new(
        "healthy",
        &format!(
            "version: \"2.4\"\nservices:\n{}{}",
            idle_service(
                "db",
                "    healthcheck:\n      test: [\"CMD-SHELL\", \"test -d /tmp\"]\n      interval: 1s\n"
            ),
            idle_service("plain", "")
        ),
    );
    // Unhealthy: fails as soon as Docker says so, with the check's output.
    let sick = Project::new(
        "sick",
        &format!(
            "version: \"2.4\"\nservices:\n{}",
            idle_service(
                "db",
                "    healthcheck:\n      test: [\"CMD-SHELL\", \"echo sick-marker; exit 1\"]\n      interval: 1s\n      retries: 2\n"
            )
        ),
    );
    // Exited non-zero: fails at once with the exit code.
    let crash = Project::new(
        "crash",
        &format!(
            "version: \"2.4\"\nservices:\n  job:\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"exit 7\"]\n"
        ),
    );
    // Still starting at the deadline (the first check is an hour away).
    let slow = Project::new(
        "slow",
        &format!(
            "version: \"2.4\"\nservices:\n{}",
            idle_service(
                "db",
                "    healthcheck:\n      test: [\"CMD-SHELL\", \"true\"]\n      interval: 1h\n"
            )
        ),
    );
    let (healthy_stack, sick_stack, crash_stack, slow_stack) =
        tokio::join!(healthy.up(), sick.up(), crash.up(), slow.up());

    // Through the trait, with the config's health_timeout.
    let report = StackControl::wait_healthy(&healthy_stack)
        .await
        .expect("healthy");
    let mut got: Vec<(&str, Health)> = report
        .containers
        .iter()
        .map(|c| (c.container.service.as_str(), c.health))
        .collect();
    got.sort_by_key(|(s, _)| *s);
    assert_eq!(got, [("db", Health::Healthy), ("plain", Health::Running)]);
    // After a stop and start, the same.
    healthy_stack.stop().await.expect("stop");
    healthy_stack.start().await.expect("start");
    let report = healthy_stack
        .wait_healthy_until(Instant::now() + Duration::from_secs(60))
        .await
        .expect("healthy after restart");
    assert_eq!(report.containers.len(), 2);

    let t = Instant::now();
    let err = sick_stack
        .wait_healthy_until(Instant::now() + Duration::from_secs(60))
        .await
        .expect_err("unhealthy");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "did not fail fast: {:?}",
        t.elapsed()
    );
    match &err {
        DockerError::Unhealthy {
            container,
            health_log,
            ..
        } => {
            assert_eq!(container.service, "db");
            assert!(!health_log.is_empty());
            assert!(
                health_log.iter().all(|l| l.contains("sick-marker")),
                "{health_log:?}"
            );
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
    assert!(err.to_string().contains("sick-marker"), "{err}");

    let err = crash_stack
        .wait_healthy_until(Instant::now() + Duration::from_secs(60))
        .await
        .expect_err("exited");
    assert!(
        matches!(&err, DockerError::NotRunning { exit_code: 7, container, .. } if container.service == "job"),
        "{err:?}"
    );

    let t = Instant::now();
    let err = slow_stack
        .wait_healthy_until(Instant::now() + Duration::from_secs(2))
        .await
        .expect_err("times out");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "gave up early: {:?}",
        t.elapsed()
    );
    match &err {
        DockerError::HealthTimeout { pending, .. } => {
            assert_eq!(pending.len(), 1);
            assert_eq!(pending[0].container.service, "db");
            assert!(pending[0].status.contains("starting"), "{:?}", pending[0]);
        }
        other => panic!("expected HealthTimeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_fails_part_way_is_undone_by_start() {
    // app ignores TERM (a shell as PID 1 without a trap), so its stop takes the whole
    // stop_timeout; meanwhile db is removed behind our back, so stopping it fails.
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}  app:\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"while :; do sleep 1; done\"]\n",
        idle_service("db", "")
    );
    let p = Project::new("partial", &compose);
    p.up().await;
    let docker = engine().await;
    let stack = Arc::new(
        p.stack(ComposeConfig {
            order: strings(&["db", "app"]),
            stop_timeout: Duration::from_secs(3),
            ..p.config()
        })
        .await,
    );
    let id = ids(&stack.containers().await.expect("list"));

    let stopping = tokio::spawn({
        let stack = stack.clone();
        async move { stack.stop().await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = Command::new("docker")
        .args(["rm", "-f", &id["db"]])
        .output()
        .expect("docker rm");
    assert!(out.status.success(), "{out:?}");
    let err = stopping
        .await
        .expect("join")
        .expect_err("stopping db must fail");
    assert!(
        matches!(&err, DockerError::Api { action, .. } if action.contains("service db") && action.contains("after 1 of 2")),
        "{err:?}"
    );
    assert!(
        !is_running(&docker, &id["app"]).await,
        "app should have been stopped first"
    );

    let err = stack.start().await.expect_err("db is gone");
    match &err {
        DockerError::StartFailed { failures, .. } => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].container.service, "db");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    assert!(
        is_running(&docker, &id["app"]).await,
        "start did not restart app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_container_that_cannot_start_is_retried_by_the_cycle_not_fatal_to_it() {
    let p = Project::new("unstartable", &two_services());
    p.up().await;
    let docker = engine().await;
    let record = p.dir.path().join("stopped.json");
    let config = || p.config().with_restart_record(&record);
    let id = ids(&p.stack(config()).await.containers().await.expect("list"));

    // A cycle stops the stack and dies before its start (the handle is dropped); meanwhile the
    // project's network goes, so neither container can start again.
    p.stack(config()).await.stop().await.expect("stop");
    assert!(record.is_file(), "stop wrote no restart record");
    let network = format!("{}_default", p.name);
    let out = Command::new("docker")
        .args(["network", "rm", &network])
        .output()
        .expect("docker network rm");
    assert!(out.status.success(), "{out:?}");

    // The strict recovery reports both containers.
    match p.stack(config()).await.recover().await {
        Err(DockerError::StartFailed { failures, .. }) => {
            let mut services: Vec<&str> = failures
                .iter()
                .map(|f| f.container.service.as_str())
                .collect();
            services.sort();
            assert_eq!(services, ["app", "db"]);
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    // The next cycle's recovery logs it and goes on; the record still names both, and the
    // cycle's own start tries them again.
    let next = p.stack(config()).await;
    next.recover_for_cycle()
        .await
        .expect("a container that does not start must not fail the cycle's recovery");
    let text = std::fs::read_to_string(&record).expect("the record stays");
    for service in ["app", "db"] {
        assert!(
            text.contains(&id[service]),
            "{service} left the record:\n{text}"
        );
        assert!(!is_running(&docker, &id[service]).await);
    }
    match next.start().await {
        Err(DockerError::StartFailed { failures, .. }) => assert_eq!(failures.len(), 2),
        other => panic!("the cycle's start did not retry the containers: {other:?}"),
    }
    // A record that cannot be read is still an error: nothing is known about what was stopped.
    std::fs::write(&record, b"{ not json").expect("write");
    let err = p
        .stack(config())
        .await
        .recover_for_cycle()
        .await
        .expect_err("an unreadable record must be an error");
    assert!(matches!(err, DockerError::RestartRecord { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_starts_only_recorded_containers_that_are_still_stopped() {
    let p = Project::new("stillstopped", &two_services());
    p.up().await;
    let docker = engine().await;
    let record = p.dir.path().join("stopped.json");
    let config = || ComposeConfig {
        // A post_start hook that leaves a trace in the bind-mounted data dir.
        post_start: vec![hook("app", &["sh", "-c", "echo ran >> /data/post_start"])],
        ..p.config().with_restart_record(&record)
    };
    let id = ids(&p.stack(config()).await.containers().await.expect("list"));

    // A cycle stops the stack and dies; someone starts app again by hand before the recovery.
    p.stack(config()).await.stop().await.expect("stop");
    docker
        .start_container(&id["app"], None)
        .await
        .expect("start app by hand");
    let app_started = started_at(&docker, &id["app"]).await;
    let report = p
        .stack(config())
        .await
        .recover()
        .await
        .expect("recover")
        .expect("db was still stopped: something to recover");
    let services: Vec<&str> = report
        .started
        .iter()
        .map(|e| e.container.service.as_str())
        .collect();
    assert_eq!(services, ["db"], "only the stopped container is started");
    assert_eq!(
        started_at(&docker, &id["app"]).await,
        app_started,
        "app, already running, was started again"
    );
    assert!(is_running(&docker, &id["db"]).await);
    assert!(!record.exists(), "the record outlived the recovery");
    assert_eq!(
        std::fs::read_to_string(p.data("post_start")).expect("the hook ran"),
        "ran\n"
    );

    // A record left behind while everything runs (its removal failed, say): nothing is
    // started, no hook runs, the record goes.
    p.stack(config()).await.stop().await.expect("stop");
    let again = p.stack(config()).await;
    let before = std::fs::read(&record).expect("the second stop's record");
    again.recover().await.expect("recover").expect("recovered");
    std::fs::write(&record, before).expect("put the record back");
    let none = p.stack(config()).await.recover().await.expect("recover");
    assert!(none.is_none(), "{none:?}");
    assert!(!record.exists());
    assert_eq!(
        std::fs::read_to_string(p.data("post_start")).expect("hook trace"),
        "ran\nran\n",
        "a hook ran for a recovery that started nothing"
    );
}

/// Runs `connect_with_docker_host_from_env` in a child process with `DOCKER_HOST` pointing
/// nowhere, so this process's environment stays as it is.
#[test]
fn a_missing_docker_socket_is_a_clear_error() {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "connect_with_docker_host_from_env",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child test did not run:\n{stdout}"
    );
    assert!(
        stdout.contains(
            "CONNECT ERROR: cannot reach the Docker engine at unix:///nonexistent/docker.sock: \
             Socket not found: /nonexistent/docker.sock"
        ),
        "{stdout}"
    );
}

#[tokio::test]
#[ignore = "run by a_missing_docker_socket_is_a_clear_error with DOCKER_HOST set"]
async fn connect_with_docker_host_from_env() {
    let err = ComposeStack::connect(ComposeConfig::new("nothing", "/nonexistent"))
        .await
        .expect_err("there is no socket");
    assert!(matches!(err, DockerError::Connect { .. }), "{err:?}");
    println!("CONNECT ERROR: {err}");
}

/// The standby's start: whatever stopped a container (a stop by hand, a creation that got half
/// way), `bring_up` starts every one of them, and creates the services the definition has and
/// the project lacks (through Compose, which then starts the rest too); `wait_healthy` then
/// covers all of them. With nothing missing, it starts them itself, in dependency order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bring_up_starts_every_stopped_container_and_creates_missing_services() {
    let p = Project::new("bringup", &two_services());
    let docker = engine().await;
    let stack = p.up().await;
    StackControl::wait_healthy(&stack).await.expect("healthy");
    let before = ids(&stack.containers().await.expect("list"));
    // Stopped behind the agent's back, as `docker compose stop` does; and `app` removed, as if
    // its creation had never happened.
    for id in before.values() {
        docker
            .stop_container(id, None::<bollard::query_parameters::StopContainerOptions>)
            .await
            .expect("stop");
    }
    docker
        .remove_container(
            &before["app"],
            None::<bollard::query_parameters::RemoveContainerOptions>,
        )
        .await
        .expect("remove app");
    let fresh = p.stack(p.config()).await;
    // A plain `start` starts only what its own `stop` stopped: nothing here.
    assert!(fresh.start().await.expect("start").started.is_empty());
    assert!(!is_running(&docker, &before["db"]).await);

    let report = fresh.bring_up().await.expect("bring up");
    assert_eq!(report.started, [], "Compose started db: {report:?}");
    let compose = report.compose.expect("app was created by Compose");
    assert!(compose.contains("up -d --remove-orphans"), "{compose}");
    let after = ids(&fresh.containers().await.expect("list"));
    assert_eq!(after["db"], before["db"], "db was re-created");
    assert_ne!(after["app"], before["app"], "app was not created again");
    let health = StackControl::wait_healthy(&fresh).await.expect("healthy");
    let mut services: Vec<&str> = health
        .containers
        .iter()
        .map(|c| c.container.service.as_str())
        .collect();
    services.sort_unstable();
    assert_eq!(services, ["app", "db"]);
    for id in after.values() {
        assert!(is_running(&docker, id).await);
    }

    // Stopped again, nothing missing: the API starts them, db first, and Compose is not asked
    // to create anything.
    for id in after.values() {
        docker
            .stop_container(id, None::<bollard::query_parameters::StopContainerOptions>)
            .await
            .expect("stop");
    }
    let ordered = ComposeConfig {
        order: strings(&["db", "app"]),
        ..p.config()
    };
    let report = p.stack(ordered).await.bring_up().await.expect("again");
    assert_eq!(report.compose, None, "{report:?}");
    assert_eq!(
        report
            .started
            .iter()
            .map(|e| e.container.service.as_str())
            .collect::<Vec<_>>(),
        ["db", "app"],
        "{report:?}"
    );
    assert_eq!(ids(&fresh.containers().await.expect("list")), after);
}

/// A container that ignores its stop signal is killed by Docker at the stop timeout; `stop`
/// names it (and only it) in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_names_the_containers_docker_had_to_kill() {
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}  stubborn:\n    image: {IMAGE}\n    command: [\"sh\", \"-c\", \"trap '' TERM; while :; do sleep 1; done\"]\n",
        idle_service("polite", "")
    );
    let p = Project::new("killed", &compose);
    let stack = p.up().await;
    let cfg = ComposeConfig {
        stop_timeout: Duration::from_secs(1),
        ..p.config()
    };
    let stack2 = p.stack(cfg).await;
    drop(stack);
    let began = Instant::now();
    let report = stack2.stop().await.expect("stop");
    assert!(began.elapsed() >= Duration::from_secs(1));
    assert_eq!(report.stopped.len(), 2, "{report:?}");
    assert_eq!(report.killed_services(), ["stubborn"], "{report:?}");
    stack2.start().await.expect("start");
}

/// A stack with no container is never healthy: nothing was brought up, so there is nothing
/// that runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_with_no_container_is_never_healthy() {
    let p = Project::new("empty", &two_services());
    let stack = p.stack(p.config()).await;
    match StackControl::wait_healthy(&stack).await {
        Err(e @ DockerError::NoContainers { .. }) => {
            assert!(e.to_string().contains("never healthy"), "{e}")
        }
        other => panic!("an empty stack was {other:?}"),
    }
}

/// `compose_policy = "strict"`: a compose file the source sent that mounts the host's `/etc`
/// or runs privileged gets its containers created but not one started; a compose file that
/// keeps to the stack's own directory comes up as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strict_policy_starts_nothing_when_one_container_would_escape() {
    let escaping = format!(
        "version: \"2.4\"\nservices:\n{}{}",
        idle_service("web", "    volumes: [\"./data:/data\"]\n"),
        idle_service(
            "sneaky",
            "    privileged: true\n    volumes: [\"/etc:/host-etc\"]\n"
        )
    );
    let p = Project::new("strict", &escaping);
    let strict = ComposeConfig {
        strict_root: Some(std::fs::canonicalize(p.dir.path()).expect("canonical")),
        ..p.config()
    };
    let stack = p.stack(strict.clone()).await;
    let err = stack.bring_up().await.expect_err("refused");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            stackclone_common::docker::DockerError::PolicyRefused { .. }
        ),
        "{msg}"
    );
    assert!(msg.contains("sneaky: privileged"), "{msg}");
    assert!(msg.contains("bind mount of /etc"), "{msg}");
    assert!(
        !msg.contains("web:"),
        "the well-behaved service is not blamed: {msg}"
    );
    let docker = engine().await;
    // Created for inspection, never started, and removed again so that a fixed compose file
    // is used next time.
    assert!(stack.containers().await.expect("list").is_empty());
    // Asking again (the next cycle) refuses again and still starts nothing.
    assert!(stack.bring_up().await.is_err());
    assert!(stack.containers().await.expect("list").is_empty());
    // The source fixes its compose file: the same project comes up.
    std::fs::write(
        p.dir.path().join("docker-compose.yml"),
        format!(
            "version: \"2.4\"\nservices:\n{}{}",
            idle_service("web", "    volumes: [\"./data:/data\"]\n"),
            idle_service("sneaky", "")
        ),
    )
    .expect("fixed compose file");
    stack.bring_up().await.expect("the fixed stack comes up");
    for c in &stack.containers().await.expect("list") {
        assert!(is_running(&docker, &c.container.id).await, "{c:?}");
    }

    let tame = format!(
        "version: \"2.4\"\nservices:\n{}",
        idle_service("web", "    volumes: [\"./data:/data\"]\n")
    );
    let q = Project::new("stricttame", &tame);
    let stack = q
        .stack(ComposeConfig {
            strict_root: Some(std::fs::canonicalize(q.dir.path()).expect("canonical")),
            ..q.config()
        })
        .await;
    stack.bring_up().await.expect("a tame stack comes up");
    let listed = stack.containers().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(is_running(&docker, &listed[0].container.id).await);
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `web` publishes `127.0.0.1:${WEB_PORT:-default}:80` and carries `ROLE: primary`.
fn web_publishing(default_port: u16) -> String {
    format!(
        "version: \"2.4\"\nservices:\n{}",
        idle_service(
            "web",
            &format!(
                "    ports: [\"127.0.0.1:${{WEB_PORT:-{default_port}}}:80\"]\n    environment:\n      \
                 ROLE: primary\n      KEPT: from-the-compose-file\n"
            )
        )
    )
}

/// The standby of a stack whose port is taken on its host: the first creation fails with an
/// error that says to use compose_env, leaves no container behind, and with compose_env (over
/// the synced `.env`) and a compose_override the next creation runs the standby's variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_whose_port_is_taken_is_told_how_to_differ_and_then_differs() {
    let (taken, free) = (free_port(), free_port());
    let holder = Project::new("holder", &web_publishing(taken));
    holder.up().await;
    let standby = Project::new("standby", &web_publishing(taken));
    // The primary's .env, synced with the data: what the standby must override.
    std::fs::write(
        standby.dir.path().join(".env"),
        format!("WEB_PORT={taken}\n"),
    )
    .expect(".env");

    let stack = standby.stack(standby.config()).await;
    let err = stack.bring_up().await.expect_err("the port is taken");
    let DockerError::HostConflict {
        conflicts,
        stack: name,
        ..
    } = &err
    else {
        panic!("expected HostConflict, got {err:?}");
    };
    assert_eq!(name, &standby.name);
    assert!(
        matches!(&conflicts[..], [HostConflict::Port { detail }] if detail.contains(&format!(":{taken}"))),
        "{conflicts:?}"
    );
    let text = err.to_string();
    assert!(text.contains("compose_env = { HTTP_PORT"), "{text}");
    assert!(
        stack.containers().await.expect("list").is_empty(),
        "the failed creation left containers behind"
    );

    // The standby's own settings: the override lives outside the synced dir.
    let outside = tempfile::tempdir().expect("temp dir");
    let over = outside.path().join("standby.yml");
    std::fs::write(
        &over,
        "version: \"2.4\"\nservices:\n  web:\n    environment:\n      ROLE: standby\n",
    )
    .expect("override");
    let config = ComposeConfig {
        compose_override: Some(over.clone()),
        compose_env: [("WEB_PORT".to_owned(), free.to_string())].into(),
        ..standby.config()
    };
    let stack = standby.stack(config).await;
    let report = stack.bring_up().await.expect("the standby comes up");
    let command = report.compose.expect("created with compose");
    assert!(
        command.contains(&format!("-f {}", over.display()))
            && command.contains(&format!(
                "-f {}",
                standby.dir.path().join("docker-compose.yml").display()
            )),
        "{command}"
    );
    stack.wait_healthy().await.expect("healthy");

    let docker = engine().await;
    let id = ids(&stack.containers().await.expect("list"))["web"].clone();
    let inspected = docker.inspect_container(&id, None).await.expect("inspect");
    let env = inspected.config.and_then(|c| c.env).unwrap_or_default();
    assert!(env.iter().any(|e| e == "ROLE=standby"), "{env:?}");
    assert!(
        env.iter().any(|e| e == "KEPT=from-the-compose-file"),
        "{env:?}"
    );
    let bindings = inspected
        .host_config
        .and_then(|h| h.port_bindings)
        .unwrap_or_default();
    let published: Vec<String> = bindings
        .get("80/tcp")
        .cloned()
        .flatten()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| b.host_port)
        .collect();
    assert_eq!(published, [free.to_string()], "{bindings:?}");
}

/// The container's `Config.Env` and `Config.Image`, as Docker made it.
async fn env_and_image(docker: &Docker, id: &str) -> (Vec<String>, String) {
    let config = docker
        .inspect_container(id, None)
        .await
        .expect("inspect")
        .config
        .expect("config");
    (
        config.env.unwrap_or_default(),
        config.image.unwrap_or_default(),
    )
}

/// Another name for the test image, as a new release's tag would be; untagged when dropped.
struct Tag(String);

impl Tag {
    fn new(name: String) -> Tag {
        ensure_image();
        let out = Command::new("docker")
            .args(["tag", IMAGE, &name])
            .output()
            .expect("docker tag");
        assert!(out.status.success(), "{out:?}");
        Tag(name)
    }
}

impl Drop for Tag {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", &self.0]).output();
    }
}

/// An `app` whose image and environment come from `.env` and from an `env_file:` in a
/// subdirectory (a file no top-level check would read), `steady` that never changes, and `old`.
fn defined_by_files() -> String {
    format!(
        "version: \"2.4\"\nservices:\n{}{}{}",
        idle_service(
            "app",
            "    env_file: [./conf/app.env]\n    environment:\n      GREETING: \"${GREETING}\"\n"
        )
        .replace(IMAGE, "${APP_IMAGE}"),
        idle_service("steady", ""),
        idle_service("old", ""),
    )
}

/// The standby follows its compose definition (issue 16, item 6): after a change to an
/// `env_file:` in a subdirectory, to `.env` (an image tag and a variable) and to the set of
/// services, `bring_up` recreates exactly the changed services, creates the new one and removes
/// the dropped one; with nothing changed it recreates nothing and runs no `compose up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bring_up_brings_the_containers_to_a_changed_definition_and_leaves_the_rest() {
    let p = Project::new("follow", &defined_by_files());
    let tag = Tag::new(format!("stackclone-test/busybox:{}", p.name));
    let release = tag.0.clone();
    let write = |rel: &str, text: &str| {
        let path = p.dir.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write(".env", &format!("APP_IMAGE={IMAGE}\nGREETING=hello\n"));
    write("conf/app.env", "FLAVOUR=vanilla\n");
    let docker = engine().await;
    let stack = p.stack(p.config()).await;
    let report = stack.bring_up().await.expect("create");
    assert!(report.compose.is_some(), "{report:?}");
    let first = ids(&stack.containers().await.expect("list"));
    let (env, image) = env_and_image(&docker, &first["app"]).await;
    assert!(env.contains(&"GREETING=hello".to_owned()), "{env:?}");
    assert!(env.contains(&"FLAVOUR=vanilla".to_owned()), "{env:?}");
    assert_eq!(image, IMAGE);

    // A cycle: stop, nothing in the definition changed, bring up. The same containers.
    stack.stop().await.expect("stop");
    let report = stack.bring_up().await.expect("unchanged");
    assert_eq!(
        report.compose, None,
        "Compose ran for an unchanged definition"
    );
    assert_eq!(report.started.len(), 3, "{report:?}");
    assert_eq!(ids(&stack.containers().await.expect("list")), first);

    // Only the env_file in conf/ changed: app is recreated, the others are started as they were.
    stack.stop().await.expect("stop");
    write("conf/app.env", "FLAVOUR=chocolate\n");
    let report = stack.bring_up().await.expect("env_file changed");
    let compose = report.compose.clone().expect("Compose recreated app");
    assert!(compose.ends_with("up -d --remove-orphans"), "{compose}");
    let second = ids(&stack.containers().await.expect("list"));
    assert_ne!(second["app"], first["app"], "app was not recreated");
    assert_eq!(second["steady"], first["steady"], "steady was recreated");
    assert_eq!(second["old"], first["old"], "old was recreated");
    let (env, _) = env_and_image(&docker, &second["app"]).await;
    assert!(env.contains(&"FLAVOUR=chocolate".to_owned()), "{env:?}");

    // `.env` moves app to another image tag and changes a variable; old goes, extra comes.
    stack.stop().await.expect("stop");
    write(".env", &format!("APP_IMAGE={release}\nGREETING=bonjour\n"));
    write(
        "docker-compose.yml",
        &defined_by_files().replace(&idle_service("old", ""), &idle_service("extra", "")),
    );
    stack.bring_up().await.expect("definition changed");
    let third = ids(&stack.containers().await.expect("list"));
    let mut services: Vec<&str> = third.keys().map(String::as_str).collect();
    services.sort_unstable();
    assert_eq!(services, ["app", "extra", "steady"], "old was not removed");
    assert_eq!(third["steady"], first["steady"], "steady was recreated");
    let (env, image) = env_and_image(&docker, &third["app"]).await;
    assert!(env.contains(&"GREETING=bonjour".to_owned()), "{env:?}");
    assert!(env.contains(&"FLAVOUR=chocolate".to_owned()), "{env:?}");
    assert_eq!(image, release);
    let health = StackControl::wait_healthy(&stack).await.expect("healthy");
    assert_eq!(health.containers.len(), 3, "{health:?}");
    for id in third.values() {
        assert!(is_running(&docker, id).await, "{id}");
    }
}

/// `standby_stopped`: a scheduler's container is created from the definition and never started,
/// stopped again when someone started it, and not waited for by the health check; a stack whose
/// every service is kept stopped is healthy with nothing running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_stopped_services_are_created_never_started_and_not_waited_for() {
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}{}",
        idle_service(
            "app",
            "    healthcheck: {test: [\"CMD-SHELL\", \"true\"], interval: 1s, retries: 30}\n"
        ),
        idle_service("cron", "")
    );
    let p = Project::new("kept", &compose);
    let docker = engine().await;
    let config = ComposeConfig {
        standby_stopped: strings(&["cron"]),
        ..p.config()
    };
    let stack = p.stack(config.clone()).await;
    let report = stack.bring_up().await.expect("bring up");
    let compose = report.compose.clone().expect("created by Compose");
    assert!(
        compose.ends_with("up --no-start --remove-orphans"),
        "{compose}"
    );
    let listed = ids(&stack.containers().await.expect("list"));
    let cron = listed["cron"].clone();
    assert_eq!(
        report
            .kept_stopped
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        [cron.as_str()]
    );
    let cron_state = state(&docker, &cron).await;
    assert_eq!(
        cron_state.status.map(|s| s.to_string()).as_deref(),
        Some("created")
    );
    assert!(
        started_at(&docker, &cron).await.year() < 2000,
        "cron was started at some point: {cron_state:?}"
    );
    assert!(is_running(&docker, &listed["app"]).await);
    let health = StackControl::wait_healthy(&stack).await.expect("healthy");
    assert_eq!(
        health
            .containers
            .iter()
            .map(|c| c.container.service.as_str())
            .collect::<Vec<_>>(),
        ["app"]
    );
    assert_eq!(health.kept_stopped.len(), 1, "{health:?}");

    // Started by hand on the standby: the next bring-up stops it (and leaves app running).
    docker
        .start_container(&cron, None)
        .await
        .expect("start cron");
    stack.bring_up().await.expect("again");
    assert!(
        !is_running(&docker, &cron).await,
        "cron runs on the standby"
    );
    assert!(is_running(&docker, &listed["app"]).await);
    // A stop and bring-up (a cycle) does not start it either.
    stack.stop().await.expect("stop");
    stack.bring_up().await.expect("after a stop");
    assert!(
        !is_running(&docker, &cron).await,
        "cron runs on the standby"
    );
    assert!(is_running(&docker, &listed["app"]).await);

    let all_kept = p
        .stack(ComposeConfig {
            standby_stopped: strings(&["app", "cron"]),
            ..config
        })
        .await;
    all_kept.bring_up().await.expect("all kept stopped");
    assert!(!is_running(&docker, &listed["app"]).await);
    let health = StackControl::wait_healthy(&all_kept)
        .await
        .expect("a stack kept stopped on purpose is not a failed one");
    assert!(health.containers.is_empty(), "{health:?}");
    assert_eq!(health.kept_stopped.len(), 2, "{health:?}");
}

/// Issue 16, item 8: a definition that names an image this host does not have and cannot pull
/// fails with the image, the service and the pull's own reason, not Compose's whole output; and
/// since Compose pulls before it touches a container, the stack is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_is_named_and_nothing_is_recreated() {
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}{}",
        idle_service("web", ""),
        idle_service("db", "")
    );
    let p = Project::new("noimage", &compose);
    let stack = p.up().await;
    let before = ids(&stack.containers().await.expect("list"));
    // `.invalid` never resolves: the pull fails the same way with or without a network.
    let absent = "registry.invalid/stackclone/absent:1";
    std::fs::write(
        p.dir.path().join("docker-compose.yml"),
        compose.replacen(IMAGE, absent, 1),
    )
    .expect("rewrite");
    let err = stack.bring_up().await.expect_err("no such image");
    let msg = err.to_string();
    let DockerError::ImageUnavailable { images, .. } = &err else {
        panic!("not ImageUnavailable: {err:?}");
    };
    assert_eq!(images.len(), 1, "{msg}");
    assert_eq!(images[0].image, absent);
    assert!(
        msg.contains(&format!(
            "image {absent} (service web) is not on this host and could not be pulled: "
        )),
        "{msg}"
    );
    assert!(
        msg.contains("registry.invalid"),
        "the pull's reason is missing: {msg}"
    );
    assert!(
        !msg.contains("Pulling web"),
        "Compose's progress is quoted: {msg}"
    );
    let docker = engine().await;
    assert_eq!(ids(&stack.containers().await.expect("list")), before);
    for id in before.values() {
        assert!(is_running(&docker, id).await);
    }
}

/// `compose_policy = "strict"` holds for recreated containers too: a service that a new
/// definition makes privileged is recreated without starting, refused, and removed again; the
/// fixed definition comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strict_policy_checks_recreated_containers_before_they_start() {
    let tame = format!(
        "version: \"2.4\"\nservices:\n{}{}",
        idle_service("web", "    volumes: [\"./data:/data\"]\n"),
        idle_service("db", "")
    );
    let p = Project::new("strictre", &tame);
    let stack = p
        .stack(ComposeConfig {
            strict_root: Some(std::fs::canonicalize(p.dir.path()).expect("canonical")),
            ..p.config()
        })
        .await;
    stack.bring_up().await.expect("a tame stack comes up");
    let before = ids(&stack.containers().await.expect("list"));
    stack.stop().await.expect("stop, as a cycle does");
    std::fs::write(
        p.dir.path().join("docker-compose.yml"),
        tame.replace(
            "    volumes: [\"./data:/data\"]\n",
            "    volumes: [\"./data:/data\"]\n    privileged: true\n",
        ),
    )
    .expect("escalate");
    let err = stack.bring_up().await.expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, DockerError::PolicyRefused { .. }), "{msg}");
    assert!(msg.contains("web: privileged"), "{msg}");
    let docker = engine().await;
    let after = stack.containers().await.expect("list");
    assert!(
        !after.iter().any(|c| c.container.service == "web"),
        "the refused container was kept: {after:?}"
    );
    for c in &after {
        assert!(!is_running(&docker, &c.container.id).await, "{c:?} started");
    }
    std::fs::write(p.dir.path().join("docker-compose.yml"), &tame).expect("fix");
    stack.bring_up().await.expect("the fixed stack comes up");
    let fixed = ids(&stack.containers().await.expect("list"));
    assert_eq!(
        fixed["db"], before["db"],
        "db did not change and was recreated"
    );
    for id in fixed.values() {
        assert!(is_running(&docker, id).await);
    }
}

/// A one-shot service (a migration that exits 0) that `compose up -d` ran is not started a
/// second time by the same bring-up: it would run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_service_run_by_compose_up_is_not_started_again() {
    let compose = format!(
        "version: \"2.4\"\nservices:\n{}  migrate:\n    image: {IMAGE}\n    volumes: [\"./data:/data\"]\n    command: [\"sh\", \"-c\", \"echo ran >> /data/migrations\"]\n",
        idle_service("web", "")
    );
    let p = Project::new("oneshot", &compose);
    let stack = p.stack(p.config()).await;
    let runs = || {
        std::fs::read_to_string(p.data("migrations"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    stack.bring_up().await.expect("created");
    let health = StackControl::wait_healthy(&stack).await.expect("healthy");
    assert!(
        health
            .containers
            .iter()
            .any(|c| c.container.service == "migrate" && c.health == Health::Completed),
        "{health:?}"
    );
    assert_eq!(runs(), 1, "the migration ran more than once on creation");
    // A changed definition recreates web. Compose starts the exited migration once more, as
    // every bring-up of a stopped stack does; once, not twice.
    std::fs::write(
        p.dir.path().join("docker-compose.yml"),
        compose.replacen(
            "    command: [\"sh\", \"-c\", \"trap",
            "    environment: {CHANGED: \"1\"}\n    command: [\"sh\", \"-c\", \"trap",
            1,
        ),
    )
    .expect("rewrite");
    let report = stack.bring_up().await.expect("recreated");
    assert!(report.compose.is_some(), "{report:?}");
    StackControl::wait_healthy(&stack).await.expect("healthy");
    assert_eq!(runs(), 2, "one bring-up ran the migration twice");
}
