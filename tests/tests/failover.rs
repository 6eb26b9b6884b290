//! Failover end to end, with real processes on 127.0.0.1: the standby is promoted while the
//! primary is gone, the old primary comes back and is refused (told, alerted once, never
//! overwriting the promoted copy), a split brain is refused as diverged until it is resolved
//! explicitly, and what the resolution replaced stays restorable.
//!
//! Alerts go to a recording HTTP server; metrics are scraped from the daemon's `/metrics`.

#[path = "../../common/tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use stackclone_proto::lineage::LINEAGE_FILE;
use stackclone_tests::fsx::{self, Rng};
use stackclone_tests::tree::{assert_same, snapshot};
use stackclone_tests::{Daemon, Pair, STACK, run};
use support::{Recorder, Reply};

fn scrape(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The source's status of `web`, as `status --json` prints it.
fn source_status(p: &Pair) -> serde_json::Value {
    let r = run(p.source_cmd(&["status", "--json"]));
    r.ok();
    r.json()[0].clone()
}

#[test]
fn the_old_primary_is_refused_after_a_promotion_then_a_split_brain_is_resolved_explicitly() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let recorder = rt.block_on(Recorder::start(Reply::Status(200)));
    let hook = recorder.url();
    let alerts = || -> Vec<String> {
        recorder
            .requests()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect()
    };
    let metrics_port = free_tcp_port();
    let mut p = Pair::with(stackclone_tests::PairOptions {
        source_extra: "schedule = \"* * * * * *\"\n".into(),
        ..Default::default()
    });
    let main = std::fs::read_to_string(&p.source_config).expect("source.toml");
    fsx::write(
        &p.source_config,
        format!(
            "metrics_listen = \"127.0.0.1:{metrics_port}\"\n{main}\n[alerts]\n\
             webhook = {{ url = \"{hook}/hook\" }}\n"
        ),
    );
    fsx::write(p.src.join("db/table"), Rng::new(1).bytes(200_000));
    fsx::write(p.src.join("conf"), "v1\n");
    p.start_target();

    // The primary replicates, then dies.
    let d = Daemon::start(&p);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.target_generation() < 1 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(d);
    // The source keeps the data's history in its state dir; it never writes the data dir.
    assert!(!p.src.join(LINEAGE_FILE).exists());
    let history = std::fs::read_to_string(p.src_state.join(format!("{STACK}.lineage")))
        .expect("the source's lineage record");
    let generation = p.target_generation();
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "the standby before failover",
    );

    // Promote the standby, while its daemon runs. The primary died during a cycle of its
    // schedule, maybe: the target holds the stack until that cycle's connection times out, and
    // `promote` says so (for up to the 20 s QUIC idle timeout, if it was killed). An operator
    // tries again.
    let deadline = Instant::now() + Duration::from_secs(40);
    let r = loop {
        let r = run(p.target_cmd(&["promote", STACK, "--json"]));
        if !r.stderr.contains("a cycle holds it right now") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    r.ok();
    let promoted = r.json();
    assert_eq!(promoted["promoted_now"], true, "{promoted}");
    assert_eq!(promoted["generation"], generation, "{promoted}");
    let new_history = promoted["history"].as_str().expect("history").to_owned();
    assert!(
        !history.contains(&new_history),
        "promotion starts a new history"
    );
    let forked = promoted["forked_from"].as_str().expect("forked_from");
    assert!(
        history.contains(forked.split('@').next().unwrap_or("-")),
        "{forked} is not the primary's history {history}"
    );
    let st = p.target_status();
    assert_eq!(st["role"], "promoted", "{st}");
    assert_eq!(st["stale"], false, "{st}");
    // Promoting again changes nothing.
    let again = run(p.target_cmd(&["promote", STACK, "--json"]));
    again.ok();
    assert_eq!(again.json()["promoted_now"], false);
    assert_eq!(again.json()["history"], new_history.as_str());

    // Users write on the promoted copy.
    fsx::write(p.live.join("written-after-failover"), "orders 1001-1042\n");
    fsx::write(p.live.join("conf"), "v2 on the standby\n");
    let standby_tree = snapshot(&p.live);

    // The old primary comes back: its daemon runs a cycle every second, each refused.
    let d = Daemon::start(&p);
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.count("the target still refuses this host's pushes") < 3 {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same(&standby_tree, &snapshot(&p.live), "the promoted copy");
    let s = source_status(&p);
    assert_eq!(s["role"], "superseded", "{s}");
    assert!(s["promoted_at"].as_i64().is_some(), "{s}");
    let m = scrape(&format!("127.0.0.1:{metrics_port}"));
    assert!(m.contains("stackclone_superseded{stack=\"web\"} 1"), "{m}");
    // One alert, saying what happened; no failure alert per refused cycle.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !alerts().iter().any(|a| a.contains("no longer")) {
        assert!(Instant::now() < deadline, "{:?}", alerts());
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = alerts();
    assert_eq!(
        seen.iter().filter(|a| a.contains("no longer")).count(),
        1,
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|a| a.contains("\"failure\"")),
        "a refused cycle alerted as a failure: {seen:?}"
    );
    drop(d);
    // The one-shot push says the same, in words a person can act on.
    let r = run(p.push_cmd(&["--json"]));
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    let err = r.json()[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        err.contains("was promoted on the standby") && err.contains("demote web"),
        "{err}"
    );

    // Demoted without a fail-back: the copies have diverged, and the old primary is still
    // refused, now as a split brain, naming both histories.
    let r = run(p.target_cmd(&["demote", STACK]));
    r.ok();
    assert!(r.stdout.contains("a standby again"), "{}", r.stdout);
    let r = run(p.push_cmd(&["--json"]));
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    let err = r.json()[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(err.contains("has diverged"), "{err}");
    assert!(err.contains(&new_history[..8]), "{err}");
    assert!(err.contains("--replace-diverged"), "{err}");
    assert_eq!(source_status(&p)["role"], "diverged");
    assert_same(&standby_tree, &snapshot(&p.live), "the diverged copy");

    // Resolved in the old primary's favour: its data replaces the copy, which stays
    // restorable.
    let r = run(p.push_cmd(&["--replace-diverged"]));
    r.ok();
    assert!(
        r.stdout.contains("it is kept there") && r.stdout.contains("rollback web --to"),
        "{}",
        r.stdout
    );
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "after --replace-diverged",
    );
    assert_eq!(source_status(&p)["role"], "primary");
    let r = run(p.target_cmd(&["rollback", STACK, "--yes", "--force"]));
    r.ok();
    assert_same(
        &standby_tree,
        &snapshot(&p.live),
        "the replaced copy, restored",
    );
}

#[test]
fn a_fail_back_sends_only_what_diverged_keeps_the_old_primarys_writes_and_hands_over() {
    let mut p = Pair::new();
    for i in 0..64u64 {
        fsx::write(
            p.src.join(format!("data/f{i:02}")),
            Rng::new(i).bytes(64 * 1024),
        );
    }
    fsx::write(p.src.join("db/big"), Rng::new(99).bytes(4 << 20));
    p.start_target();
    p.push_ok();

    // The primary is gone; the standby is promoted and written to. The old primary wrote too,
    // after its last push (a split brain).
    run(p.target_cmd(&["promote", STACK])).ok();
    let mut big = std::fs::read(p.live.join("db/big")).expect("read");
    big[1 << 20..(1 << 20) + 4096].copy_from_slice(&Rng::new(7).bytes(4096));
    fsx::write(p.live.join("db/big"), big);
    fsx::write(
        p.live.join("after-failover"),
        "written on the promoted standby\n",
    );
    fsx::write(
        p.src.join("split-brain"),
        "written on the old primary after its last push\n",
    );
    std::fs::remove_file(p.src.join("data/f07")).expect("rm");
    let old_primary = snapshot(&p.src);
    let promoted = snapshot(&p.live);

    // The old primary serves as a target of the stack, with the certificate it has; the
    // promoted host fails back to it with the one it has.
    let rev = p.reverse("");
    let target = Daemon::spawn(rev.target_cmd(&["run"]), "target listening");
    let r = run(rev.source_cmd(&["push", STACK, "--to", "primary", "--fail-back", "--json"]));
    assert!(r.status.success(), "{}\n{}", r.dump(), target.log());
    let o = r.json()[0].clone();
    assert_eq!(o["handed_over"], true, "{o}");
    assert_eq!(o["replaced"]["rollback_to"], 0, "{o}");
    assert!(o["replaced"]["paths"].as_u64().unwrap_or(0) >= 3, "{o}");
    let sent = o["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(
        sent < 256 * 1024,
        "{sent} bytes crossed for a 4 KiB change and two small files"
    );
    assert_same(
        &promoted,
        &snapshot(&p.src),
        "the old primary after the fail-back",
    );
    let st = run(rev.target_cmd(&["status", STACK, "--json"]));
    st.ok();
    assert_eq!(st.json()[0]["role"], "promoted", "{}", st.stdout);
    // The host that handed the stack over is fenced off by the same refusal.
    let again = run(rev.source_cmd(&["push", STACK, "--to", "primary", "--json"]));
    assert_eq!(again.code(), Some(1), "{}", again.dump());
    assert!(again.stdout.contains("was promoted"), "{}", again.stdout);

    // Return to normal: the standby is demoted, the primary's pushes resume as deltas.
    run(p.target_cmd(&["demote", STACK])).ok();
    let o = p.push_ok();
    assert!(
        o["bytes_sent"].as_u64().unwrap_or(u64::MAX) < 64 * 1024,
        "the first push after the return sent {o}"
    );
    assert_same(
        &snapshot(&p.src),
        &snapshot(&p.live),
        "the standby after the return",
    );

    // The old primary's own writes were kept: restored on demand, exactly.
    drop(target);
    let r = run(rev.target_cmd(&["rollback", STACK, "--to", "0", "--yes", "--force"]));
    r.ok();
    assert_same(
        &old_primary,
        &snapshot(&p.src),
        "the old primary's tree, restored",
    );
}

/// A one-service stack of the test image that writes nothing; health-checked.
const FENCE_STACK: &str = r#"version: "2.4"
services:
  web:
    image: IMAGE
    volumes: ["./data:/data"]
    command: ["sh", "-c", "trap 'exit 0' TERM; touch /tmp/ready; while :; do sleep 1 & wait $$!; done"]
    healthcheck:
      test: ["CMD-SHELL", "test -f /tmp/ready"]
      interval: 1s
      retries: 30
"#;

#[test]
fn with_on_superseded_stop_the_old_primary_stops_its_stack_once_and_nothing_starts_it_again() {
    use stackclone_tests::compose::{self, Stacks, docker, stack, wait_up};
    compose::ensure_image(compose::BUSYBOX);
    let mut s = Stacks::new(
        "fence",
        &FENCE_STACK.replace("IMAGE", compose::BUSYBOX),
        "stop_timeout = \"5s\"\non_superseded = \"stop\"\n",
        "stop_timeout = \"5s\"\nhealth_timeout = \"60s\"\n",
    );
    fsx::write(s.p.src.join("data/index.html"), "hello\n");
    s.up_source(&[]);
    wait_up(&s.src_proj, &["web"], Duration::from_secs(60), "source");
    s.p.start_target();
    s.p.push_ok();
    wait_up(&s.tgt_proj, &["web"], Duration::from_secs(60), "standby");

    let r = run(s.p.target_cmd(&["promote", STACK, "--json"]));
    r.ok();
    assert_eq!(r.json()["services"][0], "web", "{}", r.stdout);

    // The old primary's push is refused, and it fences itself: its stack is stopped, once.
    let r = s.p.push(&["--json"]);
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    let web = &stack(&s.src_proj)["web"];
    assert!(!web.running, "the superseded primary still serves: {web:?}");
    let st = source_status(&s.p);
    assert_eq!(st["role"], "superseded", "{st}");
    let fenced_at = st["fenced_at"].as_i64().expect("fenced_at");
    // Nothing starts it again behind the operator's back: no restart record for `recover`.
    let r = run(s.p.source_cmd(&["recover", "--json"]));
    r.ok();
    assert!(
        !stack(&s.src_proj)["web"].running,
        "recover started it: {}",
        r.stdout
    );
    // The operator starts it on purpose; the next refused push does not stop it again.
    docker(&["start", &stack(&s.src_proj)["web"].id]);
    wait_up(&s.src_proj, &["web"], Duration::from_secs(60), "source");
    let r = s.p.push(&["--json"]);
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    assert!(stack(&s.src_proj)["web"].running, "stopped a second time");
    assert_eq!(source_status(&s.p)["fenced_at"], fenced_at);
    // The promoted standby ran throughout.
    assert!(stack(&s.tgt_proj)["web"].running);
}
