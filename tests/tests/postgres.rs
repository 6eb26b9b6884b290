//! A real database, end to end: a PostgreSQL 15 compose stack (the image built locally from
//! Debian's packages by `deploy/image/build-postgres.sh`) under pgbench load, replicated by the
//! real agents with pre-copy, while the standby's own PostgreSQL runs between cycles, as
//! designed.
//!
//! This is the test that the busybox stacks could not be: PostgreSQL writes while it runs
//! (WAL, table files, autovacuum), when it starts (pg_control, postmaster.pid) and when it stops
//! (the shutdown checkpoint), on both hosts. Each generation must commit, the standby must
//! answer, and `pg_dump` of the standby must equal `pg_dump` of the primary as the cycle's
//! final pass saw it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stackclone_tests::compose::{self, Stacks, docker, stack, wait_up};
use stackclone_tests::fsx;

const PG: &str = r#"version: "2.4"
services:
  db:
    image: IMAGE
    volumes: ["./pgdata:/var/lib/postgresql/data"]
    healthcheck:
      test: ["CMD", "pg_isready", "-U", "postgres", "-h", "127.0.0.1"]
      interval: 1s
      retries: 120
"#;

/// The stack's one service.
const DB: &[&str] = &["db"];

fn container(project: &str) -> String {
    stack(project)
        .remove("db")
        .unwrap_or_else(|| panic!("{project} has no db container"))
        .id
}

/// `docker exec ID ARGS…` as the postgres user, which must succeed; its stdout.
#[track_caller]
fn exec(id: &str, args: &[&str]) -> String {
    docker(&[&["exec", "-u", "postgres", id], args].concat())
}

/// `pg_dump` of the database, without the `\restrict` lines whose key pg_dump draws at random
/// on every run.
fn dump(project: &str) -> String {
    let text = exec(
        &container(project),
        &["pg_dump", "-U", "postgres", "postgres"],
    );
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .collect();
    assert!(
        kept.iter().any(|l| l.contains("pgbench_accounts")),
        "{project}: the dump has no pgbench tables"
    );
    kept.join("\n")
}

fn query(project: &str, sql: &str) -> String {
    exec(
        &container(project),
        &["psql", "-U", "postgres", "-tAc", sql, "postgres"],
    )
    .trim()
    .to_owned()
}

/// Waits until `project`'s database accepts connections (its health check passed).
#[track_caller]
fn wait_db(project: &str, what: &str) {
    wait_up(project, DB, Duration::from_secs(120), what);
}

/// pgbench against the primary until the cycle's stop ends its connections (or 120 s pass).
/// `-n`: no vacuum first, which would also empty `pgbench_history`, whose count the test uses
/// to see that the load wrote.
fn load(project: &str) -> Child {
    stackclone_tests::spawn(
        Command::new("docker")
            .args(["exec", "-u", "postgres", &container(project)])
            .args([
                "pgbench", "-n", "-c", "4", "-T", "120", "-U", "postgres", "postgres",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

/// Waits for the load to end: the stop of the primary's database ended its connections.
#[track_caller]
fn load_ended(mut pgbench: Child) {
    stackclone_tests::wait_exit(
        &mut pgbench,
        Duration::from_secs(30),
        "pgbench, after the push (was the primary never stopped?)",
    );
}

/// The last lines the project's database logged, for a failure message.
fn docker_logs(project: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", "--tail", "80", &container(project)])
        .output()
        .expect("docker logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn history(project: &str) -> u64 {
    query(project, "select count(*) from pgbench_history")
        .parse()
        .expect("a count")
}

struct Db {
    s: Stacks,
}

impl Db {
    fn new() -> Db {
        compose::ensure_image(compose::POSTGRES);
        let s = Stacks::new(
            "pg",
            &PG.replace("IMAGE", compose::POSTGRES),
            "stop_timeout = \"60s\"\nprecopy = true\n",
            "stop_timeout = \"60s\"\nhealth_timeout = \"120s\"\n",
        );
        fsx::mkdir(s.p.src.join("pgdata"));
        s.up_source(&[]);
        wait_db(&s.src_proj, "the primary");
        exec(
            &container(&s.src_proj),
            &["pgbench", "-i", "-s", "4", "-U", "postgres", "postgres"],
        );
        let mut s = s;
        s.p.start_target();
        Db { s }
    }

    fn source_stack(&self, extra: &str) {
        self.s.p.write_source_stack(&format!(
            "compose_project = \"{}\"\nstop_timeout = \"60s\"\n{extra}",
            self.s.src_proj
        ));
    }

    /// One cycle under load, which must commit `generation`; then the standby must answer and
    /// hold exactly the primary's database. Returns the dump.
    #[track_caller]
    fn cycle(&self, generation: u64) -> String {
        let (p, src, tgt) = (&self.s.p, &self.s.src_proj, &self.s.tgt_proj);
        let before = history(src);
        let pgbench = load(src);
        // Let the load run while the pre-copy pass does.
        std::thread::sleep(Duration::from_secs(2));
        let r = p.push(&["--json"]);
        assert!(
            r.status.success(),
            "generation {generation} failed under load:\n{}\n--- target log\n{}",
            r.dump(),
            p.target_log()
        );
        let o = r.json()[0].clone();
        assert_eq!(o["generation"], generation, "{o}");
        assert_eq!(o["stop_killed"], serde_json::json!([]), "{o}");
        assert_eq!(o["standby_killed"], serde_json::json!([]), "{o}");
        load_ended(pgbench);
        wait_db(src, "the primary after the push");
        wait_db(tgt, "the standby after the push");
        let written = history(src);
        assert!(
            written > before,
            "generation {generation}: pgbench wrote nothing ({before} -> {written}); the \
             primary's log:\n{}\n--- push\n{}\n--- target log\n{}",
            docker_logs(src),
            r.dump(),
            p.target_log()
        );
        assert_eq!(
            history(tgt),
            written,
            "generation {generation}: the standby has another history"
        );
        // pgbench's invariant: every committed transaction added its delta to one account and
        // wrote it to the history; a database mixed from different moments breaks it.
        let sums = "select (select sum(abalance) from pgbench_accounts), \
                    (select sum(delta) from pgbench_history)";
        for (side, project) in [("primary", src), ("standby", tgt)] {
            let got = query(project, sums);
            let (accounts, history) = got.split_once('|').expect("two sums");
            assert_eq!(
                accounts, history,
                "generation {generation}: the {side}'s balances do not add up"
            );
        }
        let primary = dump(src);
        assert!(
            primary == dump(tgt),
            "generation {generation}: pg_dump of the standby differs from the primary's"
        );
        eprintln!(
            "generation {generation}: {written} history rows; source down {} ms, standby \
             down {} ms, {} bytes sent",
            o["source_downtime_ms"], o["target_downtime_ms"], o["bytes_sent"]
        );
        primary
    }
}

/// Issue "Real databases", the whole of it against the real thing: at least four cycles in a
/// row with pre-copy and pgbench load, each committing with the standby's PostgreSQL running
/// between cycles (it writes when it starts and stops), the standby answering and its dump equal
/// to the primary's; then a push SIGKILLed mid-transfer with the primary stopped: the source
/// daemon has the primary back within seconds, the standby stays on the old generation, and the
/// next cycle converges.
#[test]
fn a_postgres_stack_under_load_replicates_every_cycle_and_survives_a_killed_push() {
    let db = Db::new();
    let (p, src, tgt) = (&db.s.p, &db.s.src_proj, &db.s.tgt_proj);
    let mut last = String::new();
    for generation in 1..=4 {
        last = db.cycle(generation);
    }

    // A push killed while the primary is stopped. Without pre-copy and with a bandwidth limit
    // the final pass (the WAL the load wrote) takes seconds, with the primary stopped.
    db.source_stack("precopy = false\nbandwidth_limit = \"512KiB/s\"\n");
    let daemon = stackclone_tests::spawn(
        p.source_cmd(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let pgbench = load(src);
    std::thread::sleep(Duration::from_secs(3));
    let mut push = stackclone_tests::spawn(
        p.push_cmd(&["--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let record = p.src_state.join("web.stopped.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let down = stack(src).get("db").is_some_and(|c| !c.running);
        if down && record.exists() {
            break;
        }
        assert!(
            push.try_wait().expect("try_wait").is_none(),
            "the push ended before the primary was stopped"
        );
        assert!(
            Instant::now() < deadline,
            "the primary was not stopped in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The stop is done: the push is in its final scan or transfer.
    assert!(
        push.try_wait().expect("try_wait").is_none(),
        "the push was over before the kill; the kill proves nothing"
    );
    let _ = push.kill();
    let _ = push.wait();
    let killed = Instant::now();
    load_ended(pgbench);
    assert!(record.exists(), "the killed push left no restart record");
    wait_db(src, "the primary, started again by the source daemon");
    let back = killed.elapsed();
    assert!(
        back < Duration::from_secs(15),
        "the primary was down {back:?} after the push was killed"
    );
    eprintln!("the primary was back {back:?} after the push was killed");
    stackclone_tests::signal(daemon.id(), "TERM");
    let out = daemon.wait_with_output().expect("daemon output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("a cycle that died left the stack stopped"),
        "the daemon did not say it started the stack:\n{log}"
    );
    // The standby: generation 4, whole, running again once the dead session ended.
    wait_db(tgt, "the standby after the killed push");
    assert_eq!(p.target_generation(), 4);
    assert!(
        dump(tgt) == last,
        "the standby is not on generation 4 any more"
    );

    // The next cycle converges.
    db.source_stack("precopy = true\n");
    db.cycle(5);
}
