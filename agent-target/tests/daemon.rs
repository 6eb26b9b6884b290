//! `stackclone-target run` around its cycles, in-process over real QUIC on 127.0.0.1 with real
//! files: config reload, shutdown, the staleness watch, metrics and alerts.

mod support;

use std::time::Duration;

use stackclone_proto::msg::{Phase, Refusal};
use stackclone_proto::session::Cause;
use stackclone_target::store::{StackStore, StoreConfig};
use support::webhook::{Recorder, Reply};
use support::{Script, World, sample};
use tokio::sync::oneshot;

fn refusal(result: Result<impl std::fmt::Debug, stackclone_proto::session::CycleError>) -> Refusal {
    match result {
        Err(e) => match e.cause {
            Cause::Refused(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        },
        Ok(r) => panic!("expected a refusal, got {r:?}"),
    }
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_an_added_stack_and_refuses_a_removed_one() {
    let w = World::new();
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("index.html", "web v1")]);
    let db = w.source_tree("db", &[("data/pg.conf", "db v1")]);
    let mut t = w.start().await;
    let src = w.source();

    assert_eq!(
        refusal(src.push(t.addr, "db", &db).await),
        Refusal::UnknownStack { stack: "db".into() }
    );
    assert!(!w.live("db").join("data/pg.conf").exists());

    w.write_stack("db", "max_age = \"1h\"");
    w.remove_stack("web");
    let report = t.daemon.reload().await.expect("reload");
    assert_eq!(report.added, vec!["db".to_string()]);
    assert_eq!(report.removed, vec!["web".to_string()]);
    assert!(report.changed.is_empty() && report.needs_restart.is_empty());

    let done = src
        .push(t.addr, "db", &db)
        .await
        .expect("push db after reload");
    assert_eq!(done.generation, 1);
    assert_eq!(read(w.live("db").join("data/pg.conf")), "db v1");
    assert_eq!(
        refusal(src.push(t.addr, "web", &web).await),
        Refusal::UnknownStack {
            stack: "web".into()
        }
    );
    assert!(!w.live("web").join("index.html").exists());

    // The added stack has its series; its staleness watch knows the commit.
    let metrics = t.metrics().await;
    assert_eq!(
        sample(&metrics, r#"stackclone_generation{stack="db"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, r#"stackclone_stale{stack="db"}"#),
        Some(0.0)
    );
    let fresh = t.daemon.ctx().staleness.get("db").expect("db is watched");
    assert_eq!(fresh.generation, 1);
    assert!(fresh.committed_at.is_some());
    assert!(t.daemon.ctx().staleness.get("web").is_none());

    // A changed setting is reported as such and used by the next cycle: `allow` drops the
    // source, so the next push is refused.
    std::fs::write(
        w.conf_d().join("db.toml"),
        format!(
            "stack = \"db\"\npath = {:?}\nallow = [\"someone-else\"]\ndocker = false\n",
            w.live("db")
        ),
    )
    .unwrap();
    let report = t.daemon.reload().await.expect("reload");
    assert_eq!(report.changed, vec!["db".to_string()]);
    assert!(report.added.is_empty() && report.removed.is_empty());
    assert_eq!(
        refusal(src.push(t.addr, "db", &db).await),
        Refusal::PeerNotAllowed {
            peer: "primary".into(),
            stack: "db".into()
        }
    );
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_bad_config_keeps_the_running_one() {
    let w = World::new();
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("index.html", "web v1")]);
    let db = w.source_tree("db", &[("pg.conf", "db v1")]);
    let mut t = w.start().await;
    let src = w.source();

    // A typo in a new stack file, and in the main file: neither applies, nothing else changes.
    std::fs::write(
        w.conf_d().join("db.toml"),
        format!(
            "stack = \"db\"\npathh = {:?}\nallow = [\"primary\"]\n",
            w.live("db")
        ),
    )
    .unwrap();
    let err = format!("{:#}", t.daemon.reload().await.expect_err("bad config"));
    assert!(err.contains("db.toml:2"), "{err}");
    assert!(err.contains("pathh"), "{err}");
    w.remove_stack("db");
    w.write_main("max_skew = \"lots\"");
    let err = format!("{:#}", t.daemon.reload().await.expect_err("bad main file"));
    assert!(err.contains("target.toml:4"), "{err}");
    assert!(err.contains("max_skew"), "{err}");

    // Still the old config: web served, db unknown.
    let done = src
        .push(t.addr, "web", &web)
        .await
        .expect("web still served");
    assert_eq!(done.generation, 1);
    assert_eq!(read(w.live("web").join("index.html")), "web v1");
    assert_eq!(
        refusal(src.push(t.addr, "db", &db).await),
        Refusal::UnknownStack { stack: "db".into() }
    );
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_under_way_keeps_its_settings_and_commits_across_a_reload() {
    let w = World::new();
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("a.txt", "alpha"), ("sub/b.txt", "beta")]);
    let mut t = w.start().await;
    let src = w.source();

    let (reached_tx, reached) = oneshot::channel();
    let (resume, resume_rx) = oneshot::channel::<()>();
    let addr = t.addr;
    let push = tokio::spawn(async move {
        src.push_with(
            addr,
            "web",
            &web,
            Script {
                before_flag: Some((reached_tx, resume_rx)),
                ..Script::default()
            },
        )
        .await
    });
    reached.await.expect("the source reached its flag");
    // Everything is staged; now the stack disappears from the config.
    w.remove_stack("web");
    let report = t.daemon.reload().await.expect("reload");
    assert_eq!(report.removed, vec!["web".to_string()]);
    assert!(!w.live("web").join("a.txt").exists());
    resume.send(()).unwrap();

    let done = push.await.unwrap().expect("the cycle under way commits");
    assert_eq!(done.generation, 1);
    assert_eq!(read(w.live("web").join("a.txt")), "alpha");
    assert_eq!(read(w.live("web").join("sub/b.txt")), "beta");
    // The next one sees the new config.
    let again = w.source_tree("web", &[("a.txt", "alpha 2")]);
    assert_eq!(
        refusal(w.source().push(t.addr, "web", &again).await),
        Refusal::UnknownStack {
            stack: "web".into()
        }
    );
    assert_eq!(read(w.live("web").join("a.txt")), "alpha");
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_receiving_cycle_without_touching_live_data() {
    let w = World::new();
    w.write_stack("web", "");
    std::fs::create_dir_all(w.live("web")).unwrap();
    std::fs::write(w.live("web").join("old.txt"), "old").unwrap();
    let web = w.source_tree("web", &[("new.txt", "new")]);
    let mut t = w.start().await;
    let src = w.source();

    let (reached_tx, reached) = oneshot::channel();
    let (resume, resume_rx) = oneshot::channel::<()>();
    let addr = t.addr;
    let push = tokio::spawn(async move {
        src.push_with(
            addr,
            "web",
            &web,
            Script {
                before_flag: Some((reached_tx, resume_rx)),
                ..Script::default()
            },
        )
        .await
    });
    reached.await.expect("the source reached its flag");
    let started = std::time::Instant::now();
    t.shutdown(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop(resume);
    let err = push.await.unwrap().expect_err("the cycle cannot commit");
    assert_ne!(err.phase, Phase::Commit, "{err}");

    // Live data as it was; the cycle is recorded as ended by the shutdown.
    assert_eq!(read(w.live("web").join("old.txt")), "old");
    assert!(!w.live("web").join("new.txt").exists());
    let store = StackStore::open(StoreConfig::new("web", w.live("web"))).unwrap();
    assert_eq!(store.last_generation(), 0);
    let last_error = store.state().last_error.clone().unwrap_or_default();
    assert!(
        last_error.contains("the target is shutting down"),
        "{last_error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_alerts_once_clears_on_commit_and_alerts_again_later() {
    let hook = Recorder::start(Reply::Status(200)).await;
    let w = World::new();
    w.write_main_with_webhook(&hook.url(), false);
    w.write_stack("web", "max_age = \"2s\"");
    w.write_stack("quiet", "");
    let web = w.source_tree("web", &[("index.html", "v1")]);
    let mut t = w.start().await;

    // Never committed: counts from the start, so it goes stale after 2 s, once.
    let got = hook.wait_for(1, Duration::from_secs(6)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let alert = got[0].json();
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/hook");
    assert_eq!(alert["kind"], "staleness");
    assert_eq!(alert["host"], "standby");
    assert_eq!(alert["stack"], "web");
    let message = alert["message"].as_str().unwrap();
    assert!(message.contains("max_age is 2s"), "{message}");
    assert!(
        message.contains("since the target started watching it"),
        "{message}"
    );
    let metrics = t.metrics().await;
    assert_eq!(
        sample(&metrics, r#"stackclone_stale{stack="web"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, r#"stackclone_stale{stack="quiet"}"#),
        Some(0.0)
    );
    // Still stale a while later: no second alert.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(hook.requests().len(), 1, "{:?}", hook.requests());

    // A commit clears it (and on_success = false sends nothing).
    w.source().push(t.addr, "web", &web).await.expect("push");
    let metrics = t.metrics().await;
    assert_eq!(
        sample(&metrics, r#"stackclone_stale{stack="web"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, r#"stackclone_generation{stack="web"}"#),
        Some(1.0)
    );
    assert!(!t.daemon.ctx().staleness.get("web").unwrap().stale);
    assert_eq!(hook.requests().len(), 1);

    // Re-armed: 2 s after that commit it is stale again, now naming the last generation.
    let got = hook.wait_for(2, Duration::from_secs(6)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let again = got[1].json();
    assert_eq!(again["kind"], "staleness");
    assert_eq!(again["generation"], 1);
    let message = again["message"].as_str().unwrap();
    assert!(
        message.starts_with("no generation committed for "),
        "{message}"
    );
    assert!(message.contains("s (the last at 20"), "{message}");
    assert!(
        again["text"]
            .as_str()
            .unwrap()
            .contains("(last generation 1)")
    );
    let metrics = t.metrics().await;
    assert_eq!(
        sample(&metrics, r#"stackclone_stale{stack="web"}"#),
        Some(1.0)
    );
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_each_commit_and_the_generation_on_disk_after_a_restart() {
    let w = World::new();
    w.write_stack("web", "max_age = \"1h\"");
    w.write_stack("db", "");
    let web = w.source_tree("web", &[("a.txt", "one"), ("b.txt", "two")]);
    let mut t = w.start().await;
    let src = w.source();

    let before = t.metrics().await;
    assert_eq!(
        sample(&before, r#"stackclone_stale{stack="web"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, r#"stackclone_stale{stack="db"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, r#"stackclone_generation{stack="web"}"#),
        None
    );
    assert_eq!(
        sample(&before, r#"stackclone_files_changed_total{stack="web"}"#),
        Some(0.0)
    );

    src.push(t.addr, "web", &web).await.expect("push 1");
    std::fs::write(web.join("b.txt"), "two, changed").unwrap();
    let done = src.push(t.addr, "web", &web).await.expect("push 2");
    assert_eq!(done.generation, 2);

    let m = t.metrics().await;
    assert_eq!(
        sample(&m, r#"stackclone_generation{stack="web"}"#),
        Some(2.0)
    );
    assert_eq!(sample(&m, r#"stackclone_stale{stack="web"}"#), Some(0.0));
    assert_eq!(sample(&m, r#"stackclone_generation{stack="db"}"#), None);
    // Two files created, then one replaced.
    assert_eq!(
        sample(&m, r#"stackclone_files_changed_total{stack="web"}"#),
        Some(3.0),
        "{m}"
    );
    assert!(
        sample(&m, r#"stackclone_bytes_sent_total{stack="web"}"#).unwrap() > 0.0,
        "{m}"
    );
    let last = sample(
        &m,
        r#"stackclone_last_success_timestamp_seconds{stack="web"}"#,
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!((now - last).abs() < 30.0, "{last} vs {now}");
    assert!(
        sample(&m, r#"stackclone_cycle_duration_seconds{stack="web"}"#).unwrap() > 0.0,
        "{m}"
    );
    t.shutdown(Duration::from_secs(10)).await;

    // A new process reads the generation from the store.
    let t = w.start().await;
    let m = t.metrics().await;
    assert_eq!(
        sample(&m, r#"stackclone_generation{stack="web"}"#),
        Some(2.0)
    );
    assert_eq!(sample(&m, r#"stackclone_generation{stack="db"}"#), None);
    let status = stackclone_target::app::status(&w.common(), Some("web")).unwrap();
    assert_eq!(status[0].state.generation, 2);
    assert_eq!(status[0].max_age_secs, Some(3600));
    assert!(!status[0].stale);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json[0]["stale"], false);
    assert_eq!(json[0]["max_age_secs"], 3600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commit_alerts_the_webhook_and_counts_a_failure() {
    let hook = Recorder::start(Reply::Status(200)).await;
    let w = World::new();
    w.write_main_with_webhook(&hook.url(), false);
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("dir/a.txt", "v1")]);
    let mut t = w.start().await;
    let src = w.source();
    src.push(t.addr, "web", &web).await.expect("push 1");
    assert!(hook.requests().is_empty(), "{:?}", hook.requests());

    // Generation 2 changes dir/a.txt; before its flag, the target's own containers replace
    // `dir` with a symlink out of the tree. The commit must refuse, writing nothing.
    std::fs::write(web.join("dir/a.txt"), "v2").unwrap();
    let elsewhere = w.tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let (reached_tx, reached) = oneshot::channel();
    let (resume, resume_rx) = oneshot::channel::<()>();
    let addr = t.addr;
    let push = tokio::spawn(async move {
        src.push_with(
            addr,
            "web",
            &web,
            Script {
                before_flag: Some((reached_tx, resume_rx)),
                ..Script::default()
            },
        )
        .await
    });
    reached.await.unwrap();
    let dir = w.live("web").join("dir");
    std::fs::rename(&dir, w.tmp.path().join("moved-away")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    resume.send(()).unwrap();
    let err = push.await.unwrap().expect_err("the commit fails");
    assert_eq!(err.phase, Phase::Commit, "{err}");
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());

    let got = hook.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let alert = got[0].json();
    assert_eq!(alert["kind"], "failure");
    assert_eq!(alert["host"], "standby");
    assert_eq!(alert["peer"], "primary");
    assert_eq!(alert["stack"], "web");
    assert_eq!(alert["phase"], "commit");
    assert_eq!(alert["generation"], 2);
    let message = alert["message"].as_str().unwrap();
    assert!(message.contains("dir"), "{message}");
    let m = t.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"stackclone_cycle_failures_total{stack="web",phase="commit",cause="commit_failed"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"stackclone_generation{stack="web"}"#),
        Some(1.0)
    );
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_that_does_not_verify_alerts_and_success_alerts_when_asked() {
    let hook = Recorder::start(Reply::Status(200)).await;
    let w = World::new();
    w.write_main_with_webhook(&hook.url(), true);
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("a.txt", "v1")]);
    let mut t = w.start().await;
    let src = w.source();

    let forged = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let err = src
        .push_with(
            t.addr,
            "web",
            &web,
            Script {
                flag_key: Some(forged),
                ..Script::default()
            },
        )
        .await
        .expect_err("a forged flag is refused");
    assert!(
        matches!(
            err.cause,
            Cause::PeerAborted {
                phase: Phase::Flag,
                ..
            }
        ),
        "{err}"
    );
    assert!(!w.live("web").join("a.txt").exists());
    let got = hook.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let alert = got[0].json();
    assert_eq!(alert["kind"], "failure");
    assert_eq!(alert["phase"], "flag");
    assert_eq!(alert["peer"], "primary");

    // A refusal is the source's business: no alert, but a failure count.
    let err = w
        .source()
        .push(t.addr, "nope", &web)
        .await
        .expect_err("unknown stack");
    assert!(matches!(err.cause, Cause::Refused(_)), "{err}");

    src.push(t.addr, "web", &web).await.expect("push");
    let got = hook.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let ok = got[1].json();
    assert_eq!(ok["kind"], "success");
    assert_eq!(ok["generation"], 1);
    assert_eq!(ok["stack"], "web");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.requests().len(), 2, "{:?}", hook.requests());
    let m = t.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"stackclone_cycle_failures_total{stack="web",phase="flag",cause="flag"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert!(!m.contains(r#"stack="nope""#), "{m}");
    t.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_alert_channels() {
    let first = Recorder::start(Reply::Status(200)).await;
    let second = Recorder::start(Reply::Status(200)).await;
    let w = World::new();
    w.write_main_with_webhook(&first.url(), true);
    w.write_stack("web", "");
    let web = w.source_tree("web", &[("a.txt", "v1")]);
    let mut t = w.start().await;
    let src = w.source();
    src.push(t.addr, "web", &web).await.expect("push 1");
    assert_eq!(first.wait_for(1, Duration::from_secs(5)).await.len(), 1);

    w.write_main_with_webhook(&second.url(), true);
    t.daemon.reload().await.expect("reload");
    std::fs::write(web.join("a.txt"), "v2").unwrap();
    src.push(t.addr, "web", &web).await.expect("push 2");
    let got = second.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["generation"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.requests().len(), 1);
    t.shutdown(Duration::from_secs(10)).await;
}
