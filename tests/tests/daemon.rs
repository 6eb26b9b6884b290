//! The source daemon and the stack lock end to end: real `stackclone-source run` and `push`
//! processes against a real `stackclone-target run`, driven by real signals.
//!
//! Alerts and metrics of a real cycle go to a recording HTTP server and a real `/metrics`
//! scrape on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;

#[path = "../../common/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::{Recorder, Reply};

use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{assert_same, snapshot};
use stackclone_tests::{Daemon, Pair, PairOptions, STACK, signal, spawn};

const MIB: usize = 1 << 20;

/// `stackclone-source run` with its stderr collected.
/// Waits until the target has committed at least `generation`.
#[track_caller]
fn wait_generation(p: &Pair, generation: u64, limit: Duration, d: &Daemon) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let g = p.target_generation();
        if g >= generation {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "generation {generation} not committed within {limit:?} (at {g}):\n--- daemon\n{}\n--- target\n{}",
            d.log(),
            p.target_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until process `pid` holds the stack's lock: the lock file names its holder.
#[track_caller]
fn wait_lock_holder(p: &Pair, pid: u32) {
    let lock = p.src_state.join(format!("{STACK}.lock"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&lock)
        .unwrap_or_default()
        .contains(&format!("pid {pid}"))
    {
        assert!(Instant::now() < deadline, "pid {pid} never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pair(source_extra: &str) -> Pair {
    let mut p = Pair::with(PairOptions {
        source_extra: source_extra.into(),
        ..Default::default()
    });
    p.start_target();
    p
}

#[test]
fn a_scheduled_cycle_runs_and_sigterm_ends_the_daemon_cleanly() {
    let p = pair("schedule = \"* * * * * *\"\n");
    fsx::write(p.src.join("a.txt"), "scheduled\n");
    fsx::write(p.src.join("dir/b.bin"), Rng::new(3).bytes(100_000));
    assert_eq!(p.target_generation(), 0);

    let d = Daemon::start(&p);
    wait_generation(&p, 1, Duration::from_secs(30), &d);
    d.wait_log("cycle committed", Duration::from_secs(10));
    assert_same(&snapshot(&p.src), &snapshot(&p.live), "live");

    // Changes made while the daemon runs arrive on a later firing, with no push.
    fsx::write(p.src.join("a.txt"), "changed while the daemon runs\n");
    let g = p.target_generation();
    wait_generation(&p, g + 1, Duration::from_secs(30), &d);
    // Wait out a cycle that may have started before the change was written.
    let g = p.target_generation();
    wait_generation(&p, g + 1, Duration::from_secs(30), &d);
    assert_same(&snapshot(&p.src), &snapshot(&p.live), "live");

    let (status, log) = d.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("source daemon stopped"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    // The status file the daemon keeps says what the target says.
    let st = p
        .source_cmd(&["status", "--json"])
        .output()
        .expect("status");
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status json");
    assert_eq!(st[0]["stack"], STACK);
    assert_eq!(st[0]["generation"], p.target_generation());
}

#[test]
fn overlapping_pushes_of_one_stack_do_not_run_at_once() {
    // 3 MiB at 1 MiB/s: a push that lasts about three seconds.
    let p = pair("bandwidth_limit = \"1MiB/s\"\ncompress = false\n");
    fsx::write(p.src.join("big.bin"), Rng::new(9).bytes(3 * MIB));

    let first = spawn(
        p.push_cmd(&["--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    wait_lock_holder(&p, first.id());

    // A second push is refused at once, saying who is busy, and changes nothing.
    let t = Instant::now();
    let second = p.push(&["--json"]);
    assert_eq!(second.code(), Some(1), "{}", second.dump());
    let err = second.json()[0]["error"]
        .as_str()
        .expect("error")
        .to_owned();
    assert!(err.contains("stack `web` is busy"), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // A third waits for the first and then runs its own cycle.
    let third = p.push(&["--json", "--wait"]);
    let out = first.wait_with_output().expect("first push");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(first_json[0]["generation"], 1);
    assert!(third.status.success(), "{}", third.dump());
    assert_eq!(third.json()[0]["generation"], 2);
    assert!(
        third.stderr.contains("waiting for the cycle under way"),
        "{}",
        third.dump()
    );
    assert_eq!(p.target_generation(), 2);
    assert_same(&snapshot(&p.src), &snapshot(&p.live), "live");
    // The target never saw two cycles of the stack at once.
    assert!(!p.target_log().contains("busy"), "{}", p.target_log());
}

#[test]
fn a_daemon_firing_skips_a_stack_that_a_push_holds() {
    let p = pair("bandwidth_limit = \"1MiB/s\"\ncompress = false\n");
    fsx::write(p.src.join("big.bin"), Rng::new(5).bytes(3 * MIB));
    let push = spawn(
        p.push_cmd(&["--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    wait_lock_holder(&p, push.id());
    // Now schedule the stack every second and start the daemon while the push runs.
    p.write_source_stack(
        "bandwidth_limit = \"1MiB/s\"\ncompress = false\nschedule = \"* * * * * *\"\n",
    );
    let d = Daemon::start(&p);
    d.wait_log("scheduled cycle skipped", Duration::from_secs(20));
    let out = push.wait_with_output().expect("push");
    assert!(
        out.status.success(),
        "the push was disturbed by the daemon:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // After the push, the daemon's own cycles run.
    wait_generation(&p, 2, Duration::from_secs(30), &d);
    let (status, log) = d.terminate(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(!p.target_log().contains("busy"), "{}", p.target_log());
}

#[test]
fn sighup_picks_up_a_new_stack_and_a_bad_config_keeps_the_old_one() {
    let p = pair("");
    fsx::write(p.src.join("hello.txt"), "hello\n");
    // Start with no stack at all on the source.
    let stack_file = p
        .source_config
        .parent()
        .expect("parent")
        .join("conf.d/web.toml");
    std::fs::remove_file(&stack_file).expect("remove the stack file");
    let d = Daemon::start(&p);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.target_generation(), 0, "{}", d.log());

    // A broken stack file: the reload fails and says why; nothing runs.
    fsx::write(
        &stack_file,
        "stack = \"web\"\nschedule = \"* * * * * *\"\nbogus = 1\n",
    );
    signal(d.child.id(), "HUP");
    d.wait_log("config reload failed", Duration::from_secs(10));
    assert!(d.log().contains("bogus"), "{}", d.log());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(p.target_generation(), 0, "{}", d.log());

    // The stack, scheduled: picked up on SIGHUP, no restart.
    p.write_source_stack("schedule = \"* * * * * *\"\n");
    signal(d.child.id(), "HUP");
    d.wait_log("config reloaded", Duration::from_secs(10));
    wait_generation(&p, 1, Duration::from_secs(30), &d);
    assert_same(&snapshot(&p.src), &snapshot(&p.live), "live");

    // Removed again: no more cycles once the running one is over.
    std::fs::remove_file(&stack_file).expect("remove the stack file");
    signal(d.child.id(), "HUP");
    d.wait_log("removed=[\"web\"]", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    let g = p.target_generation();
    let commits = d.count("cycle committed");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.target_generation(), g, "{}", d.log());
    assert_eq!(d.count("cycle committed"), commits, "{}", d.log());
    let (status, log) = d.terminate(Duration::from_secs(30));
    assert!(status.success(), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Alerts and metrics of real cycles

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn a_daemon_cycle_reports_to_metrics_and_a_failure_reaches_every_alert_channel() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let recorder = rt.block_on(Recorder::start(Reply::Status(200)));
    let hook = recorder.url();
    // (first line, body) of each request.
    let seen = || -> Vec<(String, String)> {
        recorder
            .requests()
            .iter()
            .map(|r| {
                (
                    format!("{} {}", r.method, r.path),
                    String::from_utf8_lossy(&r.body).into_owned(),
                )
            })
            .collect()
    };
    let metrics_port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut p = pair("schedule = \"* * * * * *\"\n");
    // Alerts to all three channel kinds, all on the recorder; metrics on a local port.
    let main = std::fs::read_to_string(&p.source_config).expect("source.toml");
    let main = format!(
        "metrics_listen = \"127.0.0.1:{metrics_port}\"\n{main}\n[alerts]\non_success = true\n\
         telegram = {{ bot_token = \"1:tok\", chat_id = 42, api_url = \"{hook}\" }}\n\
         ntfy = {{ server = \"{hook}\", topic = \"sc\" }}\n\
         webhook = {{ url = \"{hook}/hook\" }}\n"
    );
    fsx::write(&p.source_config, main);
    fsx::write(p.src.join("f.txt"), Rng::new(1).bytes(50_000));

    let d = Daemon::start(&p);
    let g = wait_generation(&p, 1, Duration::from_secs(30), &d);
    d.wait_log("cycle committed", Duration::from_secs(10));
    let addr = format!("127.0.0.1:{metrics_port}");
    // The metrics are recorded right after the commit reply; give the daemon a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&addr);
        if value(&m, "stackclone_generation{stack=\"web\"}").unwrap_or(0.0) >= g as f64 {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        value(
            &m,
            "stackclone_last_success_timestamp_seconds{stack=\"web\"}"
        )
        .unwrap_or(0.0)
            > 1.7e9,
        "{m}"
    );
    assert!(
        value(&m, "stackclone_bytes_sent_total{stack=\"web\"}").unwrap_or(0.0) > 0.0,
        "{m}"
    );
    assert!(
        m.contains("stackclone_cycle_duration_seconds{stack=\"web\"}"),
        "{m}"
    );
    assert!(
        m.contains("stackclone_certificate_expiry_timestamp_seconds"),
        "{m}"
    );

    // Successes were asked for: the webhook got one with the stack and generation.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen()
        .iter()
        .any(|(l, b)| l.contains("/hook") && b.contains("\"success\""))
    {
        assert!(Instant::now() < deadline, "{:?}", seen());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Kill the target: the next cycles fail and every channel hears of it.
    p.kill_target();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = seen();
        let telegram = s
            .iter()
            .any(|(l, b)| l.starts_with("POST /bot1:tok/sendMessage") && b.contains("web"));
        let ntfy = s
            .iter()
            .any(|(l, b)| l.starts_with("POST /sc") && b.contains("web"));
        let webhook = s.iter().any(|(l, b)| {
            l.contains("/hook") && b.contains("\"failure\"") && b.contains("\"phase\":\"connect\"")
        });
        if telegram && ntfy && webhook {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every channel got the failure: {s:#?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = scrape(&addr);
    assert!(
        value(
            &m,
            "stackclone_cycle_failures_total{stack=\"web\",phase=\"connect\",cause=\"connect\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    let (status, log) = d.terminate(Duration::from_secs(60));
    assert!(status.success(), "{log}");
}

/// `stackclone-certs --dir DIR ARGS…`, which must succeed; its stdout.
fn certs_ok(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(stackclone_tests::bin("stackclone-certs"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run stackclone-certs");
    assert!(
        out.status.success(),
        "stackclone-certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A source revoked on the CA host, whose deny list then reaches the standby as a file, is
/// refused by the `stackclone-target run` that was already running — no restart, no SIGHUP —
/// and the refusal is logged and alerted. The revoked source itself never carries the new list,
/// so only the target re-reading its own `deny.json` can stop it.
#[test]
fn a_running_target_refuses_a_source_revoked_after_it_started() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let recorder = rt.block_on(Recorder::start(Reply::Status(200)));
    let mut p = Pair::with(PairOptions {
        allow: vec!["primary".into(), "primary2".into()],
        ..Default::default()
    });
    let main = std::fs::read_to_string(&p.target_config).expect("target.toml");
    fsx::write(
        &p.target_config,
        format!(
            "{main}\n[alerts]\nwebhook = {{ url = \"{}/hook\" }}\n",
            recorder.url()
        ),
    );
    p.start_target();

    // A second source, `primary2`, enrolled offline.
    let t = p.tmp.path();
    let id2 = t.join("src2-id");
    let request = t.join("primary2.csr.json");
    let bundle = t.join("primary2.bundle.json");
    certs_ok(
        &id2,
        &[
            "csr",
            "--name",
            "primary2",
            "--out",
            request.to_str().unwrap(),
        ],
    );
    certs_ok(
        &p.src_id,
        &[
            "sign",
            request.to_str().unwrap(),
            "--role",
            "source",
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    let pin: serde_json::Value =
        serde_json::from_str(&certs_ok(&p.src_id, &["show", "--json"])).expect("json");
    certs_ok(
        &id2,
        &[
            "install",
            bundle.to_str().unwrap(),
            "--ca-pin",
            pin["ca"]["pin"].as_str().unwrap(),
        ],
    );
    let etc2 = t.join("etc-source2");
    fsx::mkdir(etc2.join("conf.d"));
    let main = std::fs::read_to_string(&p.source_config).expect("source.toml");
    let main = main.replace(
        &format!("{:?}", p.src_id.display().to_string()),
        &format!("{:?}", id2.display().to_string()),
    );
    assert!(main.contains("src2-id"), "{main}");
    fsx::write(etc2.join("source.toml"), main);
    std::fs::copy(
        p.source_config.parent().unwrap().join("conf.d/web.toml"),
        etc2.join("conf.d/web.toml"),
    )
    .expect("copy stack file");
    let push2 = || {
        stackclone_tests::run({
            let mut c = std::process::Command::new(stackclone_tests::bin("stackclone-source"));
            c.arg("--config")
                .arg(etc2.join("source.toml"))
                .arg("--state-dir")
                .arg(t.join("src2-state"))
                .args(["push", STACK, "--json"])
                .stdin(Stdio::null());
            c
        })
    };
    fsx::write(p.src.join("a.txt"), "from primary2\n");
    let r = push2();
    assert!(r.status.success(), "{}", r.dump());
    assert_eq!(p.target_generation(), 1);

    // Revoked on the CA host; the list installed on the standby as a file.
    certs_ok(&p.src_id, &["revoke", "primary2"]);
    let copy = t.join("deny-copy.json");
    std::fs::copy(t.join("src-id/deny.json"), &copy).expect("copy deny list");
    let out = certs_ok(&p.tgt_id, &["install", copy.to_str().unwrap()]);
    assert!(out.contains("adopted"), "{out}");

    fsx::write(p.src.join("a.txt"), "after the revocation\n");
    let r = push2();
    assert!(
        !r.status.success(),
        "a revoked source pushed:\n{}",
        r.dump()
    );
    assert!(r.stderr.contains("revoked"), "{}", r.dump());
    assert_eq!(p.target_generation(), 1, "nothing committed");
    assert_eq!(
        std::fs::read(p.live.join("a.txt")).expect("live a.txt"),
        b"from primary2\n"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.target_log().contains("refused a peer") {
        assert!(Instant::now() < deadline, "{}", p.target_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let alert = loop {
        if let Some(r) = recorder.requests().into_iter().find(|r| r.path == "/hook") {
            break r;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "no alert"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let body = alert.json();
    assert_eq!(body["kind"], "peer_refused", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("primary2"),
        "{body}"
    );

    // The real primary is not affected. It continues the history `primary2` began (as a host
    // that took over the stack's state would); without that it would rightly be refused as
    // diverged, which is not what this test is about.
    fsx::mkdir(&p.src_state);
    std::fs::copy(
        t.join("src2-state/web.lineage"),
        p.src_state.join("web.lineage"),
    )
    .expect("copy the lineage record");
    p.push_ok();
    assert_eq!(
        std::fs::read(p.live.join("a.txt")).expect("live a.txt"),
        b"after the revocation\n"
    );
}

/// A standby revoked on the CA host (the source's own state directory) is refused by the
/// `stackclone-source run` that was already running, on its next scheduled cycle.
#[test]
fn a_running_source_daemon_stops_pushing_to_a_standby_revoked_after_it_started() {
    let p = pair("schedule = \"* * * * * *\"\n");
    fsx::write(p.src.join("a.txt"), "first\n");
    let d = Daemon::start(&p);
    wait_generation(&p, 1, Duration::from_secs(30), &d);
    certs_ok(&p.src_id, &["revoke", "standby"]);
    let before = d.count("certificate for `standby`");
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.count("certificate for `standby`") == before {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let g = p.target_generation();
    fsx::write(p.src.join("a.txt"), "never sent\n");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        p.target_generation(),
        g,
        "no cycle commits to a revoked standby"
    );
    assert_ne!(
        std::fs::read(p.live.join("a.txt")).expect("live a.txt"),
        b"never sent\n"
    );
    let (status, log) = d.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status}:\n{log}");
}
