//! Compose projects for the end-to-end tests, through the Docker CLI (independently of the
//! agents' own bollard code): the locally built test images, unique project names, a guard that
//! removes a test's containers however it ends, container state from `docker inspect`, and
//! waiting for a project to run healthy.
//!
//! If the Docker daemon does not answer, the tests fail: CI guarantees the daemon.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The busybox test image (`deploy/image/build.sh`).
pub const BUSYBOX: &str = "stackclone-test/busybox:1";
/// The PostgreSQL test image (`deploy/image/build-postgres.sh`).
pub const POSTGRES: &str = "stackclone-test/postgres:15";

/// Builds the test image `image` with its script (once per process, and a no-op when it exists).
pub fn ensure_image(image: &str) {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if built.iter().any(|b| b == image) {
        return;
    }
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .expect("running `docker version`");
    assert!(
        out.status.success(),
        "the Docker daemon must answer (CI guarantees it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = match image {
        BUSYBOX => "build.sh",
        POSTGRES => "build-postgres.sh",
        other => panic!("no script builds {other}"),
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/image")
        .join(script);
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
    built.push(image.to_owned());
}

/// `docker ARGS…`, which must succeed; its stdout.
#[track_caller]
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker");
    assert!(
        out.status.success(),
        "`docker {}` failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique Compose project name: lowercase a-z0-9 only (Compose v1 normalises the rest).
pub fn project_name(tag: &str, side: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!(
        "scdk{}x{}x{nanos}{tag}{side}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the projects' containers and networks by label when dropped (also on panic).
#[derive(Debug)]
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let by_label = |what: &[&str], project: &str| -> Vec<String> {
            Command::new("docker")
                .args(what)
                .args([
                    "-q",
                    "--filter",
                    &format!("label=com.docker.compose.project={project}"),
                ])
                .output()
                .map(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        for project in &self.0 {
            let containers = by_label(&["ps", "-a"], project);
            if !containers.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f", "-v"])
                    .args(&containers)
                    .output();
            }
            // A standby volume stackclone adopted has a data dir that links into the live dir;
            // Docker refuses to remove it until the link is gone.
            for v in by_label(&["volume", "ls"], project) {
                let mountpoint = Command::new("docker")
                    .args(["volume", "inspect", "-f", "{{.Mountpoint}}", &v])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    .unwrap_or_default();
                let data = Path::new(&mountpoint);
                if !mountpoint.is_empty() && data.is_symlink() {
                    let _ = std::fs::remove_file(data);
                }
                let _ = Command::new("docker").args(["volume", "rm", &v]).output();
            }
            let mut networks = by_label(&["network", "ls"], project);
            networks.push(format!("{project}_default"));
            for n in networks {
                let _ = Command::new("docker").args(["network", "rm", &n]).output();
            }
        }
    }
}

/// One container's state from `docker inspect`.
#[derive(Debug, Clone)]
pub struct State {
    pub id: String,
    pub running: bool,
    /// `running`, `exited`, `created`, …
    pub status: String,
    /// `healthy`, `unhealthy`, `starting`, or empty without a health check.
    pub health: String,
    pub exit_code: i64,
    pub started_at: i128,
    pub finished_at: i128,
}

pub fn inspect(id: &str) -> State {
    let out = docker(&["inspect", id]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("docker inspect JSON");
    let s = &j[0]["State"];
    State {
        id: id.to_owned(),
        running: s["Running"].as_bool().expect("State.Running"),
        status: s["Status"].as_str().unwrap_or("").to_owned(),
        health: s["Health"]["Status"].as_str().unwrap_or("").to_owned(),
        exit_code: s["ExitCode"].as_i64().unwrap_or(-1),
        started_at: parse_time(s["StartedAt"].as_str().expect("StartedAt")),
        finished_at: parse_time(s["FinishedAt"].as_str().expect("FinishedAt")),
    }
}

/// service → state of the project's (single, non-one-off) container of that service.
pub fn stack(project: &str) -> HashMap<String, State> {
    let ids = docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
    ]);
    let mut out = HashMap::new();
    for id in ids.split_whitespace() {
        let service = docker(&[
            "inspect",
            "--format",
            "{{index .Config.Labels \"com.docker.compose.service\"}}",
            id,
        ])
        .trim()
        .to_owned();
        let prev = out.insert(service.clone(), inspect(id));
        assert!(prev.is_none(), "{project}: two containers of {service}");
    }
    out
}

/// Whether every one of `services` has a container in `project` that runs, and is healthy if it
/// has a health check.
pub fn all_up(s: &HashMap<String, State>, services: &[&str]) -> bool {
    s.len() == services.len()
        && services.iter().all(|name| {
            s.get(*name)
                .is_some_and(|c| c.running && (c.health.is_empty() || c.health == "healthy"))
        })
}

/// Waits (up to `limit`) for exactly `services` of `project` to run healthy.
#[track_caller]
pub fn wait_up(
    project: &str,
    services: &[&str],
    limit: Duration,
    what: &str,
) -> HashMap<String, State> {
    let deadline = Instant::now() + limit;
    loop {
        let s = stack(project);
        if all_up(&s, services) {
            return s;
        }
        if Instant::now() > deadline {
            panic!("{what}: {project} not running healthy within {limit:?}: {s:#?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `docker-compose -p PROJECT ARGS…` in `dir` with `env`, which must succeed.
#[track_caller]
pub fn compose(dir: &Path, project: &str, env: &[(&str, &str)], args: &[&str]) {
    let out = Command::new("docker-compose")
        .args(["-p", project])
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running docker-compose");
    assert!(
        out.status.success(),
        "docker-compose {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An RFC 3339 UTC time as Docker writes it (`2026-11-22T02:58:59.123456789Z`), in ns since
/// the epoch.
pub fn parse_time(s: &str) -> i128 {
    let bad = format!("unexpected time format {s:?}");
    let s2 = s.strip_suffix('Z').expect(&bad);
    let (date, time) = s2.split_once('T').expect(&bad);
    let num = |x: &str| -> i64 { x.parse().expect(&bad) };
    let d: Vec<i64> = date.split('-').map(num).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(num).collect();
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let mut frac = frac.to_owned();
    frac.truncate(9);
    while frac.len() < 9 {
        frac.push('0');
    }
    i128::from(secs) * 1_000_000_000 + i128::from(num(&frac))
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

pub fn ms(ns: i128) -> i128 {
    ns / 1_000_000
}

/// A [`Pair`](crate::Pair) whose stack is a Compose project on each side: the source's stack
/// file names `src_proj`, the target's `tgt_proj`, and `docker-compose.yml` in the source's
/// data dir (synced, so the standby runs the same definition) is the given file. Both projects
/// are removed when it is dropped. Nothing is started: see [`Stacks::up_source`] and
/// [`Pair::start_target`](crate::Pair::start_target).
#[derive(Debug)]
pub struct Stacks {
    pub p: crate::Pair,
    /// The source's (primary's) Compose project.
    pub src_proj: String,
    /// The target's (standby's) Compose project.
    pub tgt_proj: String,
    /// Last: the target agent is killed (the pair's drop) before the containers go.
    pub cleanup: Cleanup,
}

impl Stacks {
    /// `source_extra` and `target_extra` are added to the stack files after the project name.
    pub fn new(tag: &str, compose_file: &str, source_extra: &str, target_extra: &str) -> Stacks {
        let src_proj = project_name(tag, "src");
        let tgt_proj = project_name(tag, "tgt");
        let cleanup = Cleanup(vec![src_proj.clone(), tgt_proj.clone()]);
        let p = crate::Pair::with(crate::PairOptions {
            docker: true,
            source_extra: format!("compose_project = \"{src_proj}\"\n{source_extra}"),
            target_extra: format!("compose_project = \"{tgt_proj}\"\n{target_extra}"),
            ..Default::default()
        });
        crate::fsx::write(p.src.join("docker-compose.yml"), compose_file);
        Stacks {
            p,
            src_proj,
            tgt_proj,
            cleanup,
        }
    }

    /// `docker-compose up -d` of the source's project, with `env`.
    pub fn up_source(&self, env: &[(&str, &str)]) {
        compose(&self.p.src, &self.src_proj, env, &["up", "-d"]);
    }
}
